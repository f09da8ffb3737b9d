//! zerotrace agent library: probes (load/attach) -> events (ring buffer decode) -> model
//! (targets, /proc) -> protocols (byte parsers) -> correlate (span assembly) -> export
//! (OTLP, terminal). `main.rs` is a thin CLI over `run` and `doctor`.
pub mod attributes;
pub mod cli;
pub mod config;
pub mod control;
pub mod correlate;
pub mod doctor;
pub mod events;
pub mod export;
pub mod health;
pub mod model;
pub mod otel_env;
pub mod probes;
pub mod profile;
pub mod protocols;
pub mod replay;
pub mod run;
pub mod settings;
pub mod spans;
pub mod symbols;
