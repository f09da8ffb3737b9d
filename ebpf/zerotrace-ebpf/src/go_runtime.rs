//! Uprobes on the Go runtime that carry span contexts between goroutines:
//! - `newproc`'s CALL to runqput right after newproc1 (or, when not found, every RET of
//!   `runtime.newproc1`): one hit per `go` statement, the new goroutine inherits its
//!   parent's span (parent found by `g.parentGoid`: no entry probe, no caller registers);
//! - entry of `runtime.send` (a value handed to a goroutine blocked receiving) and of
//!   `runtime.recv` (a value taken from a goroutine blocked sending): the receiver takes
//!   the sender's span. Both also run for `select`. They fire only when a goroutine was
//!   waiting, not for every channel operation;
//! - the CALLs that move a value into a channel buffer (`typedmemmove` in `chansend` and in
//!   `select`'s send case) and out of it (`typedmemclr` in `chanrecv` and `select`'s
//!   receive case; the last `typedmemmove` of `recv`, which refills a full buffer): the
//!   buffer slot remembers the sender's span until a receiver takes the value. The slot's
//!   address is the call's RBX; RAX is the element type, whose size (its first word) is 0
//!   for `chan struct{}`, whose slots all share one address (no span is carried then).
//!
//! Every value that crosses a channel between goroutines costs one hit.
use aya_ebpf::{macros::uprobe, programs::ProbeContext};
use zerotrace_common::{Counter, GoOffsets, SlotKey};

use crate::{
    causality::{receive, span_of, spawn},
    maps::{CHAN_SLOTS, RECV_SENDER},
    util::{count, go_ptr, goid_of, read_user, regs, uprobe_target},
};

/// A RET of `runtime.newproc1(...) *g`: the new g is in RAX, fully set up (goid,
/// parentGoid). Runs on the system stack, so R14 is g0 and not used.
#[uprobe]
pub fn go_newproc1_ret(ctx: ProbeContext) -> u32 {
    spawned(regs(&ctx).rax);
    0
}

/// `newproc`'s `CALL runtime.runqput(pp, newg, true)` right after newproc1 returned: the new
/// g is in RBX. A uprobe on a CALL is emulated by the kernel (no single-step), so this is
/// the cheaper place when the program has it.
#[uprobe]
pub fn go_spawn_call(ctx: ProbeContext) -> u32 {
    spawned(regs(&ctx).rbx);
    0
}

#[inline(always)]
fn spawned(newg: u64) {
    let Some((pid_tgid, cfg)) = uprobe_target() else { return };
    count(Counter::GoroutinesSpawned);
    let pid = (pid_tgid >> 32) as u32;
    let go = &cfg.go;
    if go.g_parent_goid == GoOffsets::NONE || newg == 0 {
        return;
    }
    let Some(child) = read_user::<u64>(newg + go.g_goid as u64) else { return };
    let parent = read_user::<u64>(newg + go.g_parent_goid as u64).unwrap_or(0);
    spawn(pid, child, span_of(pid, parent));
}

/// Entry of `runtime.send(c *hchan, sg *sudog, ep, unlockf, skip)`: the current goroutine
/// (R14) hands a value to the goroutine waiting in `sg` (RBX).
#[uprobe]
pub fn go_chan_send(ctx: ProbeContext) -> u32 {
    count(Counter::ChannelHandoffs);
    let Some((pid_tgid, cfg)) = uprobe_target() else { return 0 };
    let pid = (pid_tgid >> 32) as u32;
    let go = &cfg.go;
    let r = regs(&ctx);
    let receiver = goid_of(go, go_ptr(r.rbx, go.sudog_g));
    let sender = goid_of(go, r.r14);
    receive(pid, receiver, span_of(pid, sender));
    0
}

/// Entry of `runtime.recv(c *hchan, sg *sudog, ep, unlockf, skip)`: the current goroutine
/// takes a value from the sender waiting in `sg`. On an unbuffered channel the value is
/// the sender's; on a full buffered channel it is the oldest buffered value, and the
/// sender's value refills its slot (both at go_chan_refill).
#[uprobe]
pub fn go_chan_recv(ctx: ProbeContext) -> u32 {
    count(Counter::ChannelHandoffs);
    let Some((pid_tgid, cfg)) = uprobe_target() else { return 0 };
    let pid = (pid_tgid >> 32) as u32;
    let go = &cfg.go;
    let r = regs(&ctx);
    let sender = span_of(pid, goid_of(go, go_ptr(r.rbx, go.sudog_g)));
    let buffered = go.hchan_dataqsiz != GoOffsets::NONE && read_user::<u64>(r.rax + go.hchan_dataqsiz as u64).unwrap_or(1) != 0;
    if buffered {
        // The receiver takes the oldest buffered value and the sender's value takes its
        // slot: both happen at go_chan_refill, which needs the sender's span.
        let _ = RECV_SENDER.insert(&pid_tgid, &sender, 0);
    } else {
        receive(pid, goid_of(go, r.r14), sender);
    }
    0
}

/// Element size of the channel whose element type is `elemtype` (its first word).
#[inline(always)]
fn elem_size(elemtype: u64) -> u64 {
    read_user::<u64>(elemtype).unwrap_or(0)
}

/// `typedmemmove(elemtype, slot, src)` putting a sent value into a channel buffer.
#[uprobe]
pub fn go_chan_put(ctx: ProbeContext) -> u32 {
    count(Counter::ChannelHandoffs);
    let Some((pid_tgid, cfg)) = uprobe_target() else { return 0 };
    let pid = (pid_tgid >> 32) as u32;
    let r = regs(&ctx);
    if elem_size(r.rax) == 0 {
        return 0;
    }
    let key = SlotKey { pid, _pad: 0, addr: r.rbx };
    let span = span_of(pid, goid_of(&cfg.go, r.r14));
    if span != 0 {
        let _ = CHAN_SLOTS.insert(&key, &span, 0);
    } else {
        let _ = CHAN_SLOTS.remove(&key);
    }
    0
}

/// `typedmemclr(elemtype, slot)` after a receiver took a value out of a channel buffer
/// (the same call with the receiver's own variable, on a closed channel, finds no slot:
/// the receiver got a zero value and its context is cleared).
#[uprobe]
pub fn go_chan_take(ctx: ProbeContext) -> u32 {
    count(Counter::ChannelHandoffs);
    let Some((pid_tgid, cfg)) = uprobe_target() else { return 0 };
    let pid = (pid_tgid >> 32) as u32;
    let r = regs(&ctx);
    let receiver = goid_of(&cfg.go, r.r14);
    let mut span = 0;
    if elem_size(r.rax) != 0 {
        let key = SlotKey { pid, _pad: 0, addr: r.rbx };
        // SAFETY: map value pointer, copied at once.
        if let Some(s) = CHAN_SLOTS.get_ptr(&key).map(|p| unsafe { *p }) {
            span = s;
            let _ = CHAN_SLOTS.remove(&key);
        }
    }
    receive(pid, receiver, span);
    0
}

/// `recv`'s `typedmemmove(elemtype, slot, sender's value)`: the receiver has taken the
/// oldest value of a full buffer from `slot`, and the blocked sender's value goes there.
#[uprobe]
pub fn go_chan_refill(ctx: ProbeContext) -> u32 {
    let Some((pid_tgid, cfg)) = uprobe_target() else { return 0 };
    let pid = (pid_tgid >> 32) as u32;
    let r = regs(&ctx);
    // SAFETY: map value pointer, copied at once.
    let sender = RECV_SENDER.get_ptr(&pid_tgid).map(|p| unsafe { *p }).unwrap_or(0);
    let _ = RECV_SENDER.remove(&pid_tgid);
    let receiver = goid_of(&cfg.go, r.r14);
    if elem_size(r.rax) == 0 {
        receive(pid, receiver, 0);
        return 0;
    }
    let key = SlotKey { pid, _pad: 0, addr: r.rbx };
    // SAFETY: map value pointer, copied at once.
    let taken = CHAN_SLOTS.get_ptr(&key).map(|p| unsafe { *p }).unwrap_or(0);
    receive(pid, receiver, taken);
    if sender != 0 {
        let _ = CHAN_SLOTS.insert(&key, &sender, 0);
    } else {
        let _ = CHAN_SLOTS.remove(&key);
    }
    0
}
