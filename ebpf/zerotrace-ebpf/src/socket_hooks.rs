//! Where the kernel programs meet the traffic: tracepoints of the socket layer, which fire
//! only for socket I/O (not for every syscall of every process, and without putting all
//! syscalls on the slow tracing path as syscall tracepoints do):
//! - `sock:sock_recv_length` after every receive (bytes or -errno),
//! - `tcp:tcp_sendmsg_locked` as TCP takes bytes to send (before copying them),
//! - `sock:inet_sock_set_state` at TCP state changes (CLOSE ends a tracked socket).
//!
//! A bit test in SELECTED comes first. The user buffer of a receive or send is found in the
//! syscall's saved registers (read/recvfrom, write/sendto; the first iovec of readv/writev
//! and recvmsg/sendmsg, which tokio/mio and many C libraries use). Each hook exists twice: as a BTF
//! tracepoint (tp_btf, typed arguments) and as a raw tracepoint for kernels that refuse BTF
//! tracing programs. The agent loads one flavour.
use aya_ebpf::{
    bindings::pt_regs,
    helpers::{
        bpf_get_current_pid_tgid,
        generated::{bpf_get_current_task_btf, bpf_task_pt_regs},
    },
    macros::{btf_tracepoint, raw_tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext},
};

use crate::{
    http_server::{on_recv, on_send},
    maps::SELECTED,
    sockets::on_state,
    util::{read_kernel, read_user},
};

/// x86-64 syscall numbers whose second argument is the data buffer (third: its length).
const SYS_READ: u64 = 0;
const SYS_WRITE: u64 = 1;
const SYS_SENDTO: u64 = 44;
const SYS_RECVFROM: u64 = 45;
/// Syscalls whose data is described by an iovec array: second argument (the array, or a
/// `struct msghdr` whose `msg_iov`/`msg_iovlen` are at 16/24), third the count.
const SYS_READV: u64 = 19;
const SYS_WRITEV: u64 = 20;
const SYS_SENDMSG: u64 = 46;
const SYS_RECVMSG: u64 = 47;
const MSGHDR_IOV: u64 = 16;
/// Offsets in x86-64 `struct pt_regs` (a stable user ABI).
const REGS_DX: u64 = 96;
const REGS_ORIG_AX: u64 = 120;
const MSG_PEEK: i64 = 2;

/// Whether process `pid` is selected: one bit per pid in an array (an inlined lookup), so
/// that the cost for every other process on the machine is a few instructions.
#[inline(always)]
pub fn selected(pid: u32) -> bool {
    match SELECTED.get(pid >> 6) {
        Some(word) => word & (1u64 << (pid & 63)) != 0,
        None => false,
    }
}

/// Where the user buffer of the current syscall is: (syscall number, buffer, length) from
/// the saved registers. Read only when a program needs the bytes.
pub trait SyscallArgs {
    fn read() -> (u64, u64, u64);
}

/// BTF flavour: the registers are a typed pointer, read with plain loads.
pub struct BtfArgs;
impl SyscallArgs for BtfArgs {
    #[inline(always)]
    fn read() -> (u64, u64, u64) {
        // SAFETY: bpf_task_pt_regs returns a trusted BTF pointer to the task's saved user
        // registers; the verifier checks each field load.
        unsafe {
            let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as *const pt_regs;
            ((*regs).orig_rax, (*regs).rsi, (*regs).rdx)
        }
    }
}

/// Raw flavour: the registers are read with bpf_probe_read_kernel.
pub struct RawArgs;
impl SyscallArgs for RawArgs {
    #[inline(always)]
    fn read() -> (u64, u64, u64) {
        // SAFETY: helpers for the current task; the result is only read from.
        let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as u64;
        if regs == 0 {
            return (u64::MAX, 0, 0);
        }
        let nr = read_kernel::<u64>(regs + REGS_ORIG_AX).unwrap_or(u64::MAX);
        let Some(a) = read_kernel::<[u64; 2]>(regs + REGS_DX) else {
            return (nr, 0, 0);
        };
        (nr, a[1], a[0])
    }
}

/// Most iovecs zerotrace looks through for a vectored send's last buffer.
const IOV_MAX: u64 = 1024;

/// The first (or, `last`, the last) data buffer of the current syscall and its size: named
/// directly by read/recvfrom (`recv`) or write/sendto, else an iovec of readv/recvmsg or
/// writev/sendmsg. (0, 0) for anything else: no bytes are read then.
#[inline(always)]
fn data_buffer<A: SyscallArgs>(recv: bool, last: bool) -> (u64, u64) {
    let (nr, a1, a2) = A::read();
    let (direct, vector, msg) = if recv {
        (nr == SYS_READ || nr == SYS_RECVFROM, nr == SYS_READV, nr == SYS_RECVMSG)
    } else {
        (nr == SYS_WRITE || nr == SYS_SENDTO, nr == SYS_WRITEV, nr == SYS_SENDMSG)
    };
    if direct {
        return (a1, a2);
    }
    let (iov, n) = if vector && a2 != 0 {
        (a1, a2)
    } else if msg {
        match read_user::<[u64; 2]>(a1 + MSGHDR_IOV) {
            Some([iov, n]) if n != 0 => (iov, n),
            _ => return (0, 0),
        }
    } else {
        return (0, 0);
    };
    let at = if last && n <= IOV_MAX { iov + 16 * (n - 1) } else { iov };
    match read_user::<[u64; 2]>(at) {
        Some([base, len]) => (base, len),
        None => (0, 0),
    }
}

/// Whether this `tcp_sendmsg_locked` hit is the first of its syscall. The tracepoint fires
/// once per pass of TCP's copy loop (a send larger than the segment goal, or one that
/// waited for buffer space, makes several); later passes see fewer bytes left in `msg`
/// than the syscall asked to send. Unknown (more than 16 iovecs, unreadable): first.
#[inline(always)]
pub fn first_pass<A: SyscallArgs>(msg: u64) -> bool {
    let left = crate::sock_client::send_total(msg, u64::MAX);
    match requested::<A>() {
        Some(asked) => left >= asked,
        None => true,
    }
}

/// Bytes the current send syscall asked to send (all its iovecs), when it can be told.
#[inline(always)]
fn requested<A: SyscallArgs>() -> Option<u64> {
    let (nr, a1, a2) = A::read();
    if nr == SYS_WRITE || nr == SYS_SENDTO {
        return Some(a2);
    }
    let (iov, n) = if nr == SYS_WRITEV {
        (a1, a2)
    } else if nr == SYS_SENDMSG {
        let m = read_user::<[u64; 2]>(a1 + MSGHDR_IOV)?;
        (m[0], m[1])
    } else {
        return None;
    };
    if n == 0 || n > 16 {
        return None;
    }
    let mut sum = 0u64;
    let mut i = 0u64;
    while i < 16 {
        if i >= n {
            break;
        }
        let v = read_user::<[u64; 2]>(iov + 16 * i)?;
        sum += v[1];
        i += 1;
    }
    Some(sum)
}

/// The receive buffer and its size, when the syscall names one.
#[inline(always)]
pub fn recv_buffer<A: SyscallArgs>() -> (u64, u64) {
    data_buffer::<A>(true, false)
}

/// The send buffer and its length, when the syscall names one.
#[inline(always)]
pub fn send_buffer<A: SyscallArgs>() -> (u64, u64) {
    data_buffer::<A>(false, false)
}

/// The last send buffer and its length (where a vectored send ends).
#[inline(always)]
pub fn last_send_buffer<A: SyscallArgs>() -> (u64, u64) {
    data_buffer::<A>(false, true)
}

#[inline(always)]
fn recv<A: SyscallArgs>(sk: u64, ret: i64, flags: i64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !selected((pid_tgid >> 32) as u32) || flags & MSG_PEEK != 0 {
        return;
    }
    let _ = on_recv::<A>(pid_tgid, sk, ret);
}

/// `msg`: the kernel's `struct msghdr` of the send (its iterator counts the bytes).
#[inline(always)]
fn send<A: SyscallArgs>(sk: u64, msg: u64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !selected((pid_tgid >> 32) as u32) {
        return;
    }
    let _ = on_send::<A>(pid_tgid, sk, msg);
}

#[btf_tracepoint(function = "sock_recv_length")]
pub fn sock_recv_length_btf(ctx: BtfTracePointContext) -> u32 {
    let sk: u64 = ctx.arg(0);
    let ret: i32 = ctx.arg(1);
    let flags: i32 = ctx.arg(2);
    recv::<BtfArgs>(sk, ret as i64, flags as i64);
    0
}

#[btf_tracepoint(function = "tcp_sendmsg_locked")]
pub fn tcp_sendmsg_locked_btf(ctx: BtfTracePointContext) -> u32 {
    send::<BtfArgs>(ctx.arg(0), ctx.arg(1));
    0
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state_btf(ctx: BtfTracePointContext) -> u32 {
    let newstate: i32 = ctx.arg(2);
    on_state(ctx.arg(0), newstate);
    0
}

#[raw_tracepoint(tracepoint = "sock_recv_length")]
pub fn sock_recv_length(ctx: RawTracePointContext) -> u32 {
    let sk: u64 = ctx.arg(0);
    let ret: u64 = ctx.arg(1);
    let flags: u64 = ctx.arg(2);
    recv::<RawArgs>(sk, ret as i32 as i64, flags as i32 as i64);
    0
}

#[raw_tracepoint(tracepoint = "tcp_sendmsg_locked")]
pub fn tcp_sendmsg_locked(ctx: RawTracePointContext) -> u32 {
    send::<RawArgs>(ctx.arg(0), ctx.arg(1));
    0
}

#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: RawTracePointContext) -> u32 {
    let newstate: u64 = ctx.arg(2);
    on_state(ctx.arg(0), newstate as i32);
    0
}
