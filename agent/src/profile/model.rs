//! The profile as every output sees it (pprof, flame graph, OTLP profiles): stacks of
//! symbolized locations with per-sample labels, independent of how they were collected.
use std::sync::Arc;

pub use crate::symbols::Line;

/// One frame's address, symbolized.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Location {
    /// The address in the process (kernel address for kernel frames). For callers it is
    /// the return address.
    pub address: u64,
    /// File name of the binary (`rust-svc`, `libc.so.6`, `[kernel]`).
    pub module: Arc<str>,
    /// Build id of the binary in hex (GNU or Go build id), empty when unknown.
    pub build_id: Arc<str>,
    /// Innermost first; empty when the address could not be symbolized.
    pub lines: Vec<Line>,
    pub kernel: bool,
}

/// Labels of one sample.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Labels {
    pub pid: u32,
    pub tid: u32,
    /// Go: goid of the goroutine that ran; 0 otherwise.
    pub goroutine: u64,
    /// The span active on that goroutine/thread, when one was.
    pub trace_id: Option<[u8; 16]>,
    pub span_id: Option<u64>,
}

/// Samples that share a stack and labels.
#[derive(Clone, Debug)]
pub struct StackSample {
    /// Leaf first: kernel frames (if any), then user frames.
    pub locations: Vec<Arc<Location>>,
    pub labels: Labels,
    /// Samples taken (each stands for one period of CPU time).
    pub count: u64,
    /// Wall-clock time of each sample, ns since the Unix epoch.
    pub timestamps_unix_ns: Vec<u64>,
}

/// A process that was profiled (its resource in OTLP).
#[derive(Clone, Debug)]
pub struct ProcessInfo {
    pub pid: u32,
    pub service_name: String,
    /// Main executable's file name.
    pub executable: String,
}

/// A whole profile.
#[derive(Clone, Debug, Default)]
pub struct Profile {
    /// CPU time one sample stands for, ns (1e9 / frequency).
    pub period_ns: u64,
    pub start_unix_ns: u64,
    pub duration_ns: u64,
    pub samples: Vec<StackSample>,
    pub processes: Vec<ProcessInfo>,
}
