//! Empty library target: lets the agent declare a build-dependency on this crate so that
//! cargo rebuilds the agent when the kernel programs change (they live in main.rs).
#![no_std]
