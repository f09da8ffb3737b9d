//! The end of the pipeline: finished spans go to OTLP (batched, bounded, retried) and, with
//! `--print`, to stdout, or as trace trees with `zerotrace tail`. This is the only module
//! that knows OpenTelemetry types.
pub mod encode;
pub mod metrics;
pub mod otlp;
pub mod print;
pub mod profiles;
pub mod resource;
pub mod retry;
pub mod sink;
pub mod tail;
pub mod tls;

use std::{
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Duration,
};

/// Where spans (and metrics and profiles, to the same collector) go.
#[derive(Clone, Debug, PartialEq)]
pub struct ExportSettings {
    pub exporter: Exporter,
    pub protocol: Protocol,
    /// Full URL requests go to (for http/protobuf including /v1/traces).
    pub endpoint: String,
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
    pub queue: usize,
    pub batch: usize,
    pub delay: Duration,
    /// Certificates for https endpoints.
    pub tls: TlsSettings,
}

/// TLS material for https endpoints, PEM, read from the files the OTLP variables name when
/// the settings are resolved (a missing file stops the agent before it starts).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TlsSettings {
    /// OTEL_EXPORTER_OTLP_(TRACES_)CERTIFICATE: the CA that signed the collector's certificate.
    pub ca: Option<Vec<u8>>,
    /// OTEL_EXPORTER_OTLP_(TRACES_)CLIENT_CERTIFICATE and _CLIENT_KEY: mTLS.
    pub client_cert: Option<Vec<u8>>,
    pub client_key: Option<Vec<u8>>,
}

/// OTLP's transports (OTEL_EXPORTER_OTLP_PROTOCOL).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    #[value(name = "grpc")]
    Grpc,
    #[value(name = "http/protobuf")]
    HttpProtobuf,
}

/// Where spans go (OTEL_TRACES_EXPORTER).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Exporter {
    /// OTLP to a collector (OTEL_EXPORTER_OTLP_* apply).
    Otlp,
    /// No export (e.g. with --print only).
    None,
}

/// Export counters, shared between the pipeline and the exporter task. Every span offered
/// is counted once: queued or dropped (queue full); every queued span ends
/// exported or dropped for one reason (retries spent, refused, left at the shutdown
/// deadline).
#[derive(Debug, Default)]
pub struct ExportStats {
    pub queued: AtomicU64,
    /// Dropped because the queue was full (collector slow or down).
    pub dropped_queue_full: AtomicU64,
    /// Dropped because the agent was over its memory limit (--memory-limit).
    pub dropped_memory_limit: AtomicU64,
    /// Dropped after the retries of their batch ran out.
    pub dropped_failed: AtomicU64,
    /// Refused by the collector for good (a non-retryable status, or rejected in a partial
    /// success).
    pub dropped_rejected: AtomicU64,
    /// Still queued when the shutdown deadline passed.
    pub dropped_shutdown: AtomicU64,
    pub exported: AtomicU64,
    pub export_errors: AtomicU64,
    /// Times the collector asked to wait (Retry-After, gRPC RetryInfo).
    pub retry_after: AtomicU64,
}

impl ExportStats {
    pub fn snapshot(&self) -> [(&'static str, u64); 9] {
        [
            ("spans_queued", self.queued.load(Relaxed)),
            ("spans_exported", self.exported.load(Relaxed)),
            ("spans_dropped_queue_full", self.dropped_queue_full.load(Relaxed)),
            ("spans_dropped_memory_limit", self.dropped_memory_limit.load(Relaxed)),
            ("spans_dropped_export_failed", self.dropped_failed.load(Relaxed)),
            ("spans_dropped_rejected", self.dropped_rejected.load(Relaxed)),
            ("spans_dropped_shutdown", self.dropped_shutdown.load(Relaxed)),
            ("export_errors", self.export_errors.load(Relaxed)),
            ("export_retry_after", self.retry_after.load(Relaxed)),
        ]
    }

    /// Queued spans neither exported nor dropped yet (in the queue, a batch or a request).
    pub fn unaccounted(&self) -> u64 {
        let done = self.exported.load(Relaxed) + self.dropped_failed.load(Relaxed) + self.dropped_rejected.load(Relaxed) + self.dropped_shutdown.load(Relaxed);
        self.queued.load(Relaxed).saturating_sub(done)
    }
}
