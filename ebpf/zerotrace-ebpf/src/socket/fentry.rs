//! The fentry set (Linux 5.10+, where BPF trampolines work: kernels before the socket-layer
//! tracepoints): programs on TCP's own send and receive functions, which run only for TCP
//! I/O, not for every syscall of every process:
//! - `fexit/tcp_recvmsg` after every TCP receive (bytes or -errno). Its arguments changed in
//!   Linux 5.19 (`nonblock` dropped) and again later (`addr_len` dropped; 6.18 has 4), so
//!   there is a program per signature; the agent loads the one the kernel's BTF shows;
//! - `fentry/tcp_sendmsg` as a process hands bytes to TCP (once per send);
//! - sockets end at `sock:inet_sock_set_state`, as in every set (tracepoints.rs).
//!
//! The user buffer is found in the syscall's saved registers, which these programs read at
//! the top of the task's kernel stack (bpf_task_pt_regs needs 5.15).
use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{fentry, fexit},
    programs::{FEntryContext, FExitContext},
};

use super::{
    args::{REGS_STACK, TaskRegs},
    io::{on_recv, on_send},
};
use crate::util::unpreempted;

/// `tcp_recvmsg(sk, msg, len, flags)` (recent kernels: 6.18 has it).
#[fexit(function = "tcp_recvmsg")]
pub fn tcp_recvmsg4_fexit(ctx: FExitContext) -> u32 {
    recv::<3, 4, false>(&ctx)
}

/// The same, reading incoming traceparents (`--inject-traceparent`).
#[fexit(function = "tcp_recvmsg")]
pub fn tcp_recvmsg4_fexit_inject(ctx: FExitContext) -> u32 {
    recv::<3, 4, true>(&ctx)
}

/// `tcp_recvmsg(sk, msg, len, flags, addr_len)` (Linux 5.19+).
#[fexit(function = "tcp_recvmsg")]
pub fn tcp_recvmsg5_fexit(ctx: FExitContext) -> u32 {
    recv::<3, 5, false>(&ctx)
}

/// The same, reading incoming traceparents.
#[fexit(function = "tcp_recvmsg")]
pub fn tcp_recvmsg5_fexit_inject(ctx: FExitContext) -> u32 {
    recv::<3, 5, true>(&ctx)
}

/// `tcp_recvmsg(sk, msg, len, nonblock, flags, addr_len)` (before Linux 5.19).
#[fexit(function = "tcp_recvmsg")]
pub fn tcp_recvmsg6_fexit(ctx: FExitContext) -> u32 {
    recv::<4, 6, false>(&ctx)
}

/// The same, reading incoming traceparents (Linux 5.17-5.18: bpf_loop).
#[fexit(function = "tcp_recvmsg")]
pub fn tcp_recvmsg6_fexit_inject(ctx: FExitContext) -> u32 {
    recv::<4, 6, true>(&ctx)
}

/// A receive returned: `FLAGS` and `RET` are the indexes of the flags argument and of the
/// return value (after the arguments) in the program's context.
#[inline(always)]
fn recv<const FLAGS: usize, const RET: usize, const SCAN: bool>(ctx: &FExitContext) -> u32 {
    let sk: u64 = ctx.arg(0);
    let flags: u64 = ctx.arg(FLAGS);
    let ret: u64 = ctx.arg(RET);
    unpreempted(|| on_recv::<_, SCAN>(bpf_get_current_pid_tgid(), sk, ret as i32 as i64, flags as i32 as i64, &TaskRegs::<REGS_STACK>::new(0)));
    0
}

/// `tcp_sendmsg(sk, msg, size)`.
#[fentry(function = "tcp_sendmsg")]
pub fn tcp_sendmsg_fentry(ctx: FEntryContext) -> u32 {
    let (sk, msg) = (ctx.arg(0), ctx.arg(1));
    unpreempted(|| on_send(bpf_get_current_pid_tgid(), sk, &TaskRegs::<REGS_STACK>::new(msg)));
    0
}
