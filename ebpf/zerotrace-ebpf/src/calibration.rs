//! The uprobe the agent times at start, on a function of its own, to learn what a uprobe
//! hit costs a target on this machine (the trap dominates: ~9 us on this VM).
use aya_ebpf::{macros::uprobe, programs::ProbeContext};

/// Does nothing: a hit costs the trap and an empty run.
#[uprobe]
pub fn calibration_point(_ctx: ProbeContext) -> u32 {
    0
}
