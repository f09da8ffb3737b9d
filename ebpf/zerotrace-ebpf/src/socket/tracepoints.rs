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
use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{btf_tracepoint, raw_tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext},
};

use super::{
    args::TaskRegs,
    io::{on_close, on_recv, on_send},
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
    on_recv::<_, SCAN>(bpf_get_current_pid_tgid(), sk, ret as i64, flags as i64, &TaskRegs::<true> { msg: 0 });
    0
}

#[btf_tracepoint(function = "tcp_sendmsg_locked")]
pub fn tcp_sendmsg_locked_btf(ctx: BtfTracePointContext) -> u32 {
    on_send(bpf_get_current_pid_tgid(), ctx.arg(0), &TaskRegs::<true> { msg: ctx.arg(1) });
    0
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state_btf(ctx: BtfTracePointContext) -> u32 {
    let newstate: i32 = ctx.arg(2);
    on_close(ctx.arg(0), newstate);
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
    on_recv::<_, SCAN>(bpf_get_current_pid_tgid(), sk, ret as i32 as i64, flags as i32 as i64, &TaskRegs::<false> { msg: 0 });
    0
}

#[raw_tracepoint(tracepoint = "tcp_sendmsg_locked")]
pub fn tcp_sendmsg_locked(ctx: RawTracePointContext) -> u32 {
    on_send(bpf_get_current_pid_tgid(), ctx.arg(0), &TaskRegs::<false> { msg: ctx.arg(1) });
    0
}

#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: RawTracePointContext) -> u32 {
    let newstate: u64 = ctx.arg(2);
    on_close(ctx.arg(0), newstate as i32);
    0
}
