//! The syscall behind a socket hook: its number, its arguments and the user buffers they
//! name, shared by every hook flavour. The tracepoint and fentry flavours find the
//! arguments in the task's saved user registers (read once a hook knows the socket is
//! followed: `Syscall::resolve`); the syscall flavour has them in its own context. Nothing
//! here knows about connections.
use aya_ebpf::{
    bindings::pt_regs,
    helpers::generated::{bpf_get_current_task_btf, bpf_task_pt_regs},
};

use crate::{
    maps::kernel,
    util::{read_kernel, read_user, saved_user_regs},
};

/// x86-64 syscall numbers whose second argument is the data buffer (third: its length).
pub const SYS_READ: u64 = 0;
pub const SYS_WRITE: u64 = 1;
pub const SYS_SENDTO: u64 = 44;
pub const SYS_RECVFROM: u64 = 45;
/// Syscalls whose data is described by an iovec array: second argument (the array, or a
/// `struct msghdr` whose `msg_iov`/`msg_iovlen` are at 16/24), third the count.
pub const SYS_READV: u64 = 19;
pub const SYS_WRITEV: u64 = 20;
pub const SYS_SENDMSG: u64 = 46;
pub const SYS_RECVMSG: u64 = 47;
const MSGHDR_IOV: u64 = 16;
/// Offsets in x86-64 `struct pt_regs` (a stable user ABI).
const REGS_DX: u64 = 96;
const REGS_ORIG_AX: u64 = 120;
/// Most iovecs zerotrace looks through for a vectored send's last buffer.
const IOV_MAX: u64 = 1024;
/// Most iovecs summed for the bytes a send asks for.
const IOV_SUM_MAX: u64 = 16;

/// The syscall a socket hook fired in, as each hook flavour sees it.
pub trait Syscall {
    /// Its number, arguments, bytes to send and whether this is the syscall's first hook hit,
    /// read once as plain values: the hooks call this once they know the socket is
    /// followed, and everything below them sees only `SyscallArgs` (the registers are read
    /// once, and the verifier walks one shape whatever the hook flavour).
    fn resolve(&self) -> SyscallArgs;
}

/// Where a hook flavour finds the task's saved user registers (`TaskRegs`): through
/// bpf_task_pt_regs (Linux 5.15) as a trusted BTF pointer read with plain loads, or with
/// bpf_probe_read_kernel; or at the top of the task's kernel stack (every kernel).
pub const REGS_BTF: u8 = 0;
pub const REGS_READ: u8 = 1;
pub const REGS_STACK: u8 = 2;

/// Tracepoint and fentry flavours: the arguments come from the task's saved user
/// registers, found the `HOW` way (`REGS_*`); `msg` is the kernel's `struct msghdr` of a
/// send (0 for receives).
pub struct TaskRegs<const HOW: u8> {
    msg: u64,
}

impl<const HOW: u8> TaskRegs<HOW> {
    #[inline(always)]
    pub fn new(msg: u64) -> Self {
        TaskRegs { msg }
    }
}

impl<const HOW: u8> TaskRegs<HOW> {
    /// (syscall number, second argument, third argument); u64::MAX as the number when
    /// unknown.
    #[inline(always)]
    fn args(&self) -> (u64, u64, u64) {
        if HOW == REGS_BTF {
            // SAFETY: bpf_task_pt_regs returns a trusted BTF pointer to the task's saved user
            // registers; the verifier checks each field load.
            unsafe {
                let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as *const pt_regs;
                ((*regs).orig_rax, (*regs).rsi, (*regs).rdx)
            }
        } else {
            let regs = if HOW == REGS_READ {
                // SAFETY: helpers for the current task; the result is only read from.
                unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) as u64 }
            } else {
                match saved_user_regs() {
                    Some((at, _)) => at,
                    None => 0,
                }
            };
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

    /// The kernel's count of the message (every iovec), left to copy.
    #[inline(always)]
    fn send_total(&self, len: u64) -> u64 {
        let off = kernel().msghdr_iter_count;
        if off == 0 || self.msg == 0 {
            return len;
        }
        read_kernel::<u64>(self.msg + off as u64).unwrap_or(len)
    }
}

impl<const HOW: u8> Syscall for TaskRegs<HOW> {
    #[inline(always)]
    /// Later passes of TCP's copy loop see fewer bytes left in `msg` than the syscall asked
    /// to send (unknown, e.g. more than IOV_SUM_MAX iovecs: first).
    fn resolve(&self) -> SyscallArgs {
        let (nr, a1, a2) = self.args();
        // 0: not known (then a send's own length counts, as in send_total).
        let left = self.send_total(0);
        let first = match requested((nr, a1, a2)) {
            Some(asked) => left == 0 || left >= asked,
            None => true,
        };
        SyscallArgs { nr, a1, a2, total: left, first }
    }
}

/// The syscall flavour: the number and arguments as the syscall tracepoint passed them;
/// also what every flavour resolves to (`Syscall::resolve`).
#[derive(Clone, Copy)]
pub struct SyscallArgs {
    pub nr: u64,
    pub a1: u64,
    pub a2: u64,
    /// A send's bytes (all its iovecs), summed once (`SyscallArgs::send`): a sum at each
    /// place that needs it would put the iovec loop in the program several times over.
    pub total: u64,
    /// Whether this is the first hook hit of its syscall (see `SyscallArgs::first_pass`).
    pub first: bool,
}

impl SyscallArgs {
    /// A send syscall.
    #[inline(always)]
    pub fn send(nr: u64, a1: u64, a2: u64) -> Self {
        let total = requested((nr, a1, a2)).unwrap_or(0);
        SyscallArgs { nr, a1, a2, total, first: true }
    }

    /// A receive syscall.
    #[inline(always)]
    pub fn recv(nr: u64, a1: u64, a2: u64) -> Self {
        SyscallArgs { nr, a1, a2, total: 0, first: true }
    }
}

impl SyscallArgs {
    #[inline(always)]
    pub fn args(&self) -> (u64, u64, u64) {
        (self.nr, self.a1, self.a2)
    }

    /// Bytes this send hands to TCP (every iovec); `len` when that cannot be told.
    #[inline(always)]
    pub fn send_total(&self, len: u64) -> u64 {
        if self.total != 0 { self.total } else { len }
    }

    /// Whether this hit is the first of its syscall. The `tcp_sendmsg_locked` tracepoint
    /// fires once per pass of TCP's copy loop; a syscall hook fires once.
    #[inline(always)]
    pub fn first_pass(&self) -> bool {
        self.first
    }
}

impl Syscall for SyscallArgs {
    #[inline(always)]
    fn resolve(&self) -> SyscallArgs {
        *self
    }
}

/// Bytes a send syscall `(nr, a1, a2)` asked to send (all its iovecs), when it can be told.
#[inline(always)]
fn requested((nr, a1, a2): (u64, u64, u64)) -> Option<u64> {
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
    if n == 0 || n > IOV_SUM_MAX {
        return None;
    }
    let mut sum = 0u64;
    let mut i = 0u64;
    while i < IOV_SUM_MAX {
        if i >= n {
            break;
        }
        let v = read_user::<[u64; 2]>(iov + 16 * i)?;
        sum += v[1];
        i += 1;
    }
    Some(sum)
}

/// The first (or, `last`, the last) data buffer of the current syscall and its size: named
/// directly by read/recvfrom (`recv`) or write/sendto, else an iovec of readv/recvmsg or
/// writev/sendmsg. (0, 0) for anything else: no bytes are read then.
#[inline(always)]
fn data_buffer(sys: &SyscallArgs, recv: bool, last: bool) -> (u64, u64) {
    let (nr, a1, a2) = sys.args();
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

/// The receive buffer and its size, when the syscall names one.
#[inline(always)]
pub fn recv_buffer(sys: &SyscallArgs) -> (u64, u64) {
    data_buffer(sys, true, false)
}

/// The send buffer and its length, when the syscall names one.
#[inline(always)]
pub fn send_buffer(sys: &SyscallArgs) -> (u64, u64) {
    data_buffer(sys, false, false)
}

/// The last send buffer and its length (where a vectored send ends).
#[inline(always)]
pub fn last_send_buffer(sys: &SyscallArgs) -> (u64, u64) {
    data_buffer(sys, false, true)
}
