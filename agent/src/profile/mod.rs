//! CPU profiles: samples from the kernel's perf_event program (per CPU, cpu-clock, only
//! selected processes), unwound (Go: frame pointers in the kernel; other programs: a copy
//! of the stack unwound here from `.eh_frame`), symbolized per binary, labelled with the
//! goroutine and the span that ran, and written as pprof, flame graph or OTLP profiles.
pub mod collect;
pub mod export;
pub mod flame;
pub mod model;
pub mod native;
pub mod otlp;
pub mod pprof;
