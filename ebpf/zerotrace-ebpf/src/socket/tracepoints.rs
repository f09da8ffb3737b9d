//! The socket-layer tracepoint set (Linux 6.16+, where both exist): tracepoints that fire
//! only for socket I/O, not for every syscall of every process:
//! - `sock:sock_recv_length` after every receive (bytes or -errno),
//! - `tcp:tcp_sendmsg_locked` as TCP takes bytes to send (before copying them; once per
//!   pass of its copy loop),
//! - `sock:inet_sock_set_state` at TCP state changes (CLOSE ends a tracked socket; every
//!   hook set uses it, it exists since Linux 4.16).
//!
//! The user buffer of a receive or send is found in the syscall's saved registers
//! (read/recvfrom, write/sendto; the first iovec of readv/writev and recvmsg/sendmsg).
//! Each hook exists twice: as a BTF tracepoint (tp_btf, typed arguments) and as a raw
//! tracepoint for kernels that refuse BTF tracing programs. The agent loads one flavour.
//! On Linux 7.0+ the BTF receive and send programs also get twins (`util::twin_runs`).
use aya_ebpf::{
    EbpfContext,
    helpers::bpf_get_current_pid_tgid,
    macros::{btf_tracepoint, raw_tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext},
};

use super::{
    args::{REGS_BTF, REGS_READ, TaskRegs},
    io::{on_close, on_recv, on_send},
};
use crate::{
    maps::{TWIN_RECV, TWIN_SEND},
    util::{mark_run, read_kernel, rescue, run_key, twin_runs, unpreempted},
};

#[btf_tracepoint(function = "sock_recv_length")]
pub fn sock_recv_length_btf(ctx: BtfTracePointContext) -> u32 {
    recv_btf::<false>(&ctx)
}

/// The same, reading incoming traceparents (`--inject-traceparent`).
#[btf_tracepoint(function = "sock_recv_length")]
pub fn sock_recv_length_btf_inject(ctx: BtfTracePointContext) -> u32 {
    recv_btf::<true>(&ctx)
}

#[inline(always)]
fn recv_btf<const SCAN: bool>(ctx: &BtfTracePointContext) -> u32 {
    let sk: u64 = ctx.arg(0);
    let ret: i32 = ctx.arg(1);
    let flags: i32 = ctx.arg(2);
    unpreempted(|| {
        mark_run(|| args_key(ctx, 1));
        on_recv::<_, SCAN>(bpf_get_current_pid_tgid(), sk, ret as i64, flags as i64, &TaskRegs::<REGS_BTF>::new(0));
    });
    0
}

#[btf_tracepoint(function = "tcp_sendmsg_locked")]
pub fn tcp_sendmsg_locked_btf(ctx: BtfTracePointContext) -> u32 {
    let (sk, msg) = (ctx.arg(0), ctx.arg(1));
    unpreempted(|| {
        mark_run(|| args_key(&ctx, 2));
        on_send(bpf_get_current_pid_tgid(), sk, &TaskRegs::<REGS_BTF>::new(msg));
    });
    0
}

/// Linux 7.0+: the twins, attached after the programs above, for the events the kernel
/// skipped them for (see maps::RUN_MARK): they run the program (the receive one with
/// injection on, when the agent put that in TWIN_RECV) by a tail call.
#[btf_tracepoint(function = "sock_recv_length")]
pub fn sock_recv_length_btf_twin(ctx: BtfTracePointContext) -> u32 {
    let key = args_key(&ctx, 1);
    if twin_runs(key) {
        rescue(&ctx, &TWIN_RECV, key);
    }
    0
}

#[btf_tracepoint(function = "tcp_sendmsg_locked")]
pub fn tcp_sendmsg_locked_btf_twin(ctx: BtfTracePointContext) -> u32 {
    let key = args_key(&ctx, 2);
    if twin_runs(key) {
        rescue(&ctx, &TWIN_SEND, key);
    }
    0
}

/// The run key of an event: the hook's first three arguments, read from the context as
/// plain words (the verifier allows no arithmetic on the typed pointers among them): a
/// receive's socket, result and flags; a send's socket, message and the buffer TCP fills
/// (each pass of its copy loop is an event of its own).
#[inline(always)]
fn args_key(ctx: &BtfTracePointContext, hook: u64) -> u64 {
    let a = read_kernel::<[u64; 3]>(ctx.as_ptr() as u64).unwrap_or([0; 3]);
    run_key(bpf_get_current_pid_tgid() as u32, hook, a[0], a[1], a[2])
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state_btf(ctx: BtfTracePointContext) -> u32 {
    let newstate: i32 = ctx.arg(2);
    let sk = ctx.arg(0);
    unpreempted(|| on_close(sk, newstate));
    0
}

#[raw_tracepoint(tracepoint = "sock_recv_length")]
pub fn sock_recv_length(ctx: RawTracePointContext) -> u32 {
    recv_raw::<false>(&ctx)
}

/// The same, reading incoming traceparents (`--inject-traceparent`).
#[raw_tracepoint(tracepoint = "sock_recv_length")]
pub fn sock_recv_length_inject(ctx: RawTracePointContext) -> u32 {
    recv_raw::<true>(&ctx)
}

#[inline(always)]
fn recv_raw<const SCAN: bool>(ctx: &RawTracePointContext) -> u32 {
    let sk: u64 = ctx.arg(0);
    let ret: u64 = ctx.arg(1);
    let flags: u64 = ctx.arg(2);
    unpreempted(|| on_recv::<_, SCAN>(bpf_get_current_pid_tgid(), sk, ret as i32 as i64, flags as i32 as i64, &TaskRegs::<REGS_READ>::new(0)));
    0
}

#[raw_tracepoint(tracepoint = "tcp_sendmsg_locked")]
pub fn tcp_sendmsg_locked(ctx: RawTracePointContext) -> u32 {
    let (sk, msg) = (ctx.arg(0), ctx.arg(1));
    unpreempted(|| on_send(bpf_get_current_pid_tgid(), sk, &TaskRegs::<REGS_READ>::new(msg)));
    0
}

#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: RawTracePointContext) -> u32 {
    let newstate: u64 = ctx.arg(2);
    let sk = ctx.arg(0);
    unpreempted(|| on_close(sk, newstate as i32));
    0
}
