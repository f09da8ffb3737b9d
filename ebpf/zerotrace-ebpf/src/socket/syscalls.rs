//! The syscall hook set, for every kernel (the socket-layer tracepoints need Linux 6.16):
//! the data syscalls' own tracepoints (`syscalls:sys_enter_read`, ...): one program attached
//! to the entries of read, readv, recvmsg, write, sendto, writev and sendmsg, one to
//! recvfrom's (it reads a fourth argument), one to the exits of the four receives. Only
//! those syscalls run a program. (`raw_syscalls:sys_enter`/`sys_exit`, which run a program
//! for every syscall of every process, measured slower: ARCHITECTURE.md, "Kernels".)
//! A receive is seen at its exit (its length), with the socket and buffer its entry left in
//! RECV_ARGS; a send at its entry (before TCP copies the bytes, as `tcp_sendmsg_locked`).
//! The file descriptor leads to the socket through the task's file table, only when it is
//! a TCP socket (S_IFSOCK, SOCK_STREAM, IPPROTO_TCP). Closes come from
//! `sock:inet_sock_set_state` (tracepoints.rs), which every kernel has. What runs next is
//! the same as for the tracepoint set (io.rs), so the records are too.
use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_current_pid_tgid, bpf_get_current_task},
    macros::tracepoint,
    programs::TracePointContext,
};
use zerotrace_common::{Counter, RecvArgs};

use super::{
    args::{SYS_READ, SYS_READV, SYS_RECVFROM, SYS_RECVMSG, SYS_SENDMSG, SYS_SENDTO, SYS_WRITE, SYS_WRITEV, SyscallArgs},
    conns::selected,
    io::{on_recv, on_send},
};
use crate::{
    maps::{RECV_ARGS, kernel},
    util::{count, read_kernel, unpreempted},
};

/// Where the syscall tracepoints' records keep the syscall number and arguments (or the
/// return value): the same on every kernel since 2.6.33 (checked by the agent against
/// tracefs before loading).
const TP_NR: usize = 8;
const TP_ARGS: usize = 16;

const S_IFMT: u16 = 0o170000;
const S_IFSOCK: u16 = 0o140000;
const SOCK_STREAM: u16 = 1;
const IPPROTO_TCP: u16 = 6;

/// Whether `nr` receives data (read, recvfrom, readv, recvmsg).
#[inline(always)]
fn is_recv(nr: u64) -> bool {
    nr == SYS_READ || nr == SYS_RECVFROM || nr == SYS_READV || nr == SYS_RECVMSG
}

/// Whether `nr` sends data (write, sendto, writev, sendmsg).
#[inline(always)]
fn is_send(nr: u64) -> bool {
    nr == SYS_WRITE || nr == SYS_SENDTO || nr == SYS_WRITEV || nr == SYS_SENDMSG
}

/// The TCP socket (`struct sock`) behind file descriptor `fd` of the current task:
/// task->files->fdt->fd[fd] (within max_fds), a socket inode, its `struct socket`'s sk,
/// a stream socket of protocol TCP. None for every other file.
#[inline(always)]
fn tcp_sock_of(fd: u64) -> Option<u64> {
    let k = kernel();
    // SAFETY: only used as an address to read from.
    let task = unsafe { bpf_get_current_task() };
    let files = read_kernel::<u64>(task + k.task_files as u64)?;
    let fdt = read_kernel::<u64>(files + k.files_fdt as u64)?;
    let max = read_kernel::<u32>(fdt + k.fdtable_max_fds as u64)?;
    if fd >= max as u64 {
        return None;
    }
    let fds = read_kernel::<u64>(fdt + k.fdtable_fd as u64)?;
    let file = read_kernel::<u64>(fds + 8 * fd)?;
    if file == 0 {
        return None;
    }
    let inode = read_kernel::<u64>(file + k.file_inode as u64)?;
    let mode = read_kernel::<u16>(inode + k.inode_mode as u64)?;
    if mode & S_IFMT != S_IFSOCK {
        return None;
    }
    let sock = read_kernel::<u64>(file + k.file_private_data as u64)?;
    let sk = read_kernel::<u64>(sock + k.socket_sk as u64)?;
    if sk == 0 {
        return None;
    }
    let ty = read_kernel::<u16>(sk + k.sk_type as u64)?;
    let proto = read_kernel::<u16>(sk + k.sk_protocol as u64)?;
    (ty == SOCK_STREAM && proto == IPPROTO_TCP).then_some(sk)
}

/// A data syscall `nr` of a thread of `pid_tgid` starts, with its first four arguments.
/// Sends are handled here; receives leave their socket and buffer for the exit.
/// `RECV_ONLY`: the program hangs only on receives (recvfrom's), so it carries no send path.
#[inline(always)]
fn enter<const RECV_ONLY: bool>(pid_tgid: u64, nr: u64, a: [u64; 4]) {
    let recv = RECV_ONLY || is_recv(nr);
    if !recv && !is_send(nr) || !selected((pid_tgid >> 32) as u32) {
        return;
    }
    let Some(sk) = tcp_sock_of(a[0]) else { return };
    if !recv {
        on_send(pid_tgid, sk, &SyscallArgs::send(nr, a[1], a[2]));
        return;
    }
    // recvfrom(fd, buf, len, flags, ..), recvmsg(fd, msg, flags).
    let flags = if nr == SYS_RECVFROM {
        a[3]
    } else if nr == SYS_RECVMSG {
        a[2]
    } else {
        0
    };
    let args = RecvArgs { sk, nr, a1: a[1], a2: a[2], flags };
    if RECV_ARGS.insert(&pid_tgid, &args, 0).is_err() {
        count(Counter::ReceivesLostMapFull);
    }
}

/// A syscall `nr` of a thread of `pid_tgid` returns `ret`: a receive that `enter` kept
/// ends here. `SCAN`: see `records::request_capture`.
#[inline(always)]
fn exit<const SCAN: bool>(pid_tgid: u64, nr: u64, ret: i64) {
    if !is_recv(nr) || !selected((pid_tgid >> 32) as u32) {
        return;
    }
    let Some(p) = RECV_ARGS.get_ptr(&pid_tgid) else { return };
    // SAFETY: map value pointer, copied at once (only once known: an Option of a struct
    // can leave undefined bytes the compiler fills from a clobbered register, go_inject.rs).
    let args = unsafe { *p };
    let _ = RECV_ARGS.remove(&pid_tgid);
    // A stale entry (its syscall's exit was not seen) belongs to another call.
    if args.nr != nr {
        return;
    }
    on_recv::<_, SCAN>(pid_tgid, args.sk, ret, args.flags as i64, &SyscallArgs::recv(nr, args.a1, args.a2));
}

/// Entry of read, readv, recvmsg, write, sendto, writev or sendmsg (one program, attached
/// to each `syscalls:sys_enter_*` tracepoint). It reads three arguments: the kernel refuses
/// to attach a program that reads past the record of a syscall with three.
#[tracepoint]
pub fn sys_enter_data(ctx: TracePointContext) -> u32 {
    enter_tp::<false>(&ctx)
}

/// Entry of recvfrom: its fourth argument is the flags (MSG_PEEK).
#[tracepoint]
pub fn sys_enter_recvfrom(ctx: TracePointContext) -> u32 {
    enter_tp::<true>(&ctx)
}

#[inline(always)]
fn enter_tp<const FOUR: bool>(ctx: &TracePointContext) -> u32 {
    let p = ctx.as_ptr() as *const u8;
    // SAFETY: constant offsets inside the tracepoint's record (checked by the verifier).
    let (nr, a) = unsafe {
        let nr = *(p.add(TP_NR) as *const i32) as u64;
        let args = p.add(TP_ARGS) as *const u64;
        (nr, [*args, *args.add(1), *args.add(2), if FOUR { *args.add(3) } else { 0 }])
    };
    unpreempted(|| enter::<FOUR>(bpf_get_current_pid_tgid(), nr, a));
    0
}

/// Exit of read, recvfrom, readv or recvmsg (`syscalls:sys_exit_*`).
#[tracepoint]
pub fn sys_exit_data(ctx: TracePointContext) -> u32 {
    exit_tp::<false>(&ctx)
}

/// The same, reading incoming traceparents (`--inject-traceparent`, Linux 5.17+).
#[tracepoint]
pub fn sys_exit_data_inject(ctx: TracePointContext) -> u32 {
    exit_tp::<true>(&ctx)
}

#[inline(always)]
fn exit_tp<const SCAN: bool>(ctx: &TracePointContext) -> u32 {
    let p = ctx.as_ptr() as *const u8;
    // SAFETY: constant offsets inside the tracepoint's record (checked by the verifier).
    let (nr, ret) = unsafe { (*(p.add(TP_NR) as *const i32) as u64, *(p.add(TP_ARGS) as *const i64)) };
    unpreempted(|| exit::<SCAN>(bpf_get_current_pid_tgid(), nr, ret));
    0
}
