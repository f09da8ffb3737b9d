//! What the agent knows about the world it traces: target processes (from /proc) and the
//! sockets they had before zerotrace attached.
pub mod container;
pub mod k8s;
pub mod memory;
pub mod proc;
pub mod select;
pub mod sockdiag;
pub mod target;

pub use target::{Target, TargetEnv};
