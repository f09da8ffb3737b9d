//! Harness for zerotrace's end-to-end tests (and the demo and benchmarks, through xtask):
//! building Go programs with real toolchains, running processes that clean up after
//! themselves, a small HTTP/1.1 client that measures what it sees, OTLP receivers that
//! decode what the agent sends, and the agent itself.
pub mod agent;
pub mod containers;
pub mod cri;
pub mod http;
pub mod load;
pub mod netns;
pub mod oci;
pub mod otlp;
pub mod postgres;
pub mod proc;
pub mod secrets;
pub mod semconv;
pub mod tools;
