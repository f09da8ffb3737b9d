//! The end of the pipeline: finished spans go to OTLP (batched, bounded, retried) and, with
//! `--print`, to stdout, or as trace trees with `zerotrace tail`. This is the only module
//! that knows OpenTelemetry types.
pub mod encode;
pub mod metrics;
pub mod otlp;
pub mod print;
pub mod resource;
pub mod sink;
pub mod tail;
pub mod tls;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Export counters, shared between the pipeline and the exporter task.
#[derive(Debug, Default)]
pub struct ExportStats {
    pub queued: AtomicU64,
    /// Dropped because the queue was full (collector slow or down).
    pub dropped_queue_full: AtomicU64,
    /// Dropped after the retries of their batch ran out.
    pub dropped_failed: AtomicU64,
    pub exported: AtomicU64,
    pub export_errors: AtomicU64,
    /// The CPU profiler's counters.
    pub profiles: crate::profile::collect::ProfilerStats,
}

impl ExportStats {
    pub fn snapshot(&self) -> [(&'static str, u64); 11] {
        let p = &self.profiles;
        [
            ("cpu_samples", p.samples.load(Relaxed)),
            ("cpu_samples_dropped", p.dropped.load(Relaxed)),
            ("cpu_samples_without_user_stack", p.empty_stacks.load(Relaxed)),
            ("profiles_exported", p.exported.load(Relaxed)),
            ("profiles_dropped", p.profiles_dropped.load(Relaxed)),
            ("profile_export_errors", p.export_errors.load(Relaxed)),
            ("spans_queued", self.queued.load(Relaxed)),
            ("spans_exported", self.exported.load(Relaxed)),
            ("spans_dropped_queue_full", self.dropped_queue_full.load(Relaxed)),
            ("spans_dropped_export_failed", self.dropped_failed.load(Relaxed)),
            ("export_errors", self.export_errors.load(Relaxed)),
        ]
    }
}
