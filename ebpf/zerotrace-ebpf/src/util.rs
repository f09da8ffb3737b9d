//! Small helpers shared by the programs: counters, the ring-buffer wake-up policy, the
//! uprobe preamble, the current goroutine from thread-local storage, bounded reads of
//! target memory.
use aya_ebpf::helpers::{bpf_get_current_task, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user, generated::bpf_probe_read_user as raw_read_user};
use aya_ebpf::{helpers::bpf_get_current_pid_tgid, programs::ProbeContext};
use zerotrace_common::{Counter, EventHeader, GoOffsets, GoStr, GoroutineKey, RUN_MARK_SLOTS, TargetConfig, bounds, settings_flags};

use crate::maps::{COUNTERS, EVENTS, RESCUE, RUN_MARK, TARGETS, kernel, settings};

const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;

#[inline(always)]
pub fn count(c: Counter) {
    if let Some(p) = COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: helper without side effects.
    unsafe { bpf_ktime_get_ns() }
}

/// Wake the agent only when enough data is pending; otherwise it drains on its timer.
#[inline(always)]
pub fn wake_flags() -> u64 {
    if EVENTS.query(BPF_RB_AVAIL_DATA) > bounds::WAKEUP_BYTES { BPF_RB_FORCE_WAKEUP } else { BPF_RB_NO_WAKEUP }
}

#[inline(always)]
pub fn header(kind: zerotrace_common::EventKind, size: usize, pid: u32, tid: u32, ts: u64) -> EventHeader {
    EventHeader { kind: kind as u16, _pad: 0, size: size as u32, pid, tid, ts_ns: ts }
}

#[inline(always)]
pub fn read_user<T>(addr: u64) -> Option<T> {
    // SAFETY: bpf_probe_read_user copes with any address; failure is reported, not faulted.
    match unsafe { bpf_probe_read_user(addr as *const T) } {
        Ok(v) => Some(v),
        Err(_) => {
            count(Counter::TargetReadsFailed);
            None
        }
    }
}

#[inline(always)]
pub fn read_kernel<T>(addr: u64) -> Option<T> {
    // SAFETY: as read_user, for kernel memory.
    match unsafe { bpf_probe_read_kernel(addr as *const T) } {
        Ok(v) => Some(v),
        Err(_) => {
            count(Counter::KernelReadsFailed);
            None
        }
    }
}

/// `v` when it is at most `max` (else None), checked on the value the caller then uses, so
/// that every verifier sees the bound. The compiler drops a comparison it can prove from
/// earlier ones (`len < room` with room <= max), and moves values through the stack;
/// verifiers before Linux 5.11 neither compare two registers' ranges nor carry a bound to a
/// copy spilled before the comparison, so a size bounded only that way is refused ("R2 min
/// value is negative"). The volatile read hides what the compiler knows.
#[inline(always)]
pub fn checked_at_most(v: u64, max: u64) -> Option<u64> {
    // SAFETY: a read of a local.
    let v = unsafe { core::ptr::read_volatile(&v) };
    if v > max { None } else { Some(v) }
}

/// Copies `min(len, CAP)` bytes of target memory at `src` into `dst` (CAP bytes of room).
/// Returns the number of bytes copied, 0 on failure.
#[inline(always)]
pub fn read_user_bytes<const CAP: usize>(dst: *mut u8, src: u64, len: u64) -> u32 {
    let n = if len > CAP as u64 { CAP as u64 } else { len };
    if n == 0 {
        return 0;
    }
    let Some(n) = checked_at_most(n, CAP as u64) else { return 0 };
    // SAFETY: dst has CAP bytes of room and n <= CAP.
    let rc = unsafe { raw_read_user(dst.cast(), n as u32, src as *const _) };
    if rc < 0 {
        count(Counter::TargetReadsFailed);
        return 0;
    }
    n as u32
}

/// The user registers a uprobe fired with.
#[inline(always)]
pub fn regs(ctx: &ProbeContext) -> &aya_ebpf::bindings::pt_regs {
    // SAFETY: a uprobe context is the user register set.
    unsafe { &*ctx.regs }
}

/// What zerotrace knows of traced process `pid` (None: not traced).
#[inline(always)]
pub fn target(pid: u32) -> Option<&'static TargetConfig> {
    // SAFETY: map value pointer, valid for this program run.
    TARGETS.get_ptr(pid).map(|c| unsafe { &*c })
}

/// Where every uprobe starts: the hit is counted, then the calling thread's pid_tgid and
/// its process's configuration (None outside traced processes).
#[inline(always)]
pub fn uprobe_target() -> Option<(u64, &'static TargetConfig)> {
    count(Counter::UprobeHits);
    let pid_tgid = bpf_get_current_pid_tgid();
    Some((pid_tgid, target((pid_tgid >> 32) as u32)?))
}

/// The goid of goroutine `g` (0 for a null or unreadable g).
#[inline(always)]
pub fn goid_of(go: &GoOffsets, g: u64) -> u64 {
    if g == 0 {
        return 0;
    }
    read_user::<u64>(g + go.g_goid as u64).unwrap_or(0)
}

/// `uprobe_target` for a uprobe in Go code running on a user goroutine (R14 = g): the
/// pid_tgid, the process's Go layout and the goroutine's key. None outside traced
/// processes or when g cannot be read.
#[inline(always)]
pub fn go_caller(ctx: &ProbeContext) -> Option<(u64, &'static GoOffsets, GoroutineKey)> {
    let (pid_tgid, cfg, k) = go_caller_config(ctx)?;
    Some((pid_tgid, &cfg.go, k))
}

/// `go_caller` with the whole target configuration.
#[inline(always)]
pub fn go_caller_config(ctx: &ProbeContext) -> Option<(u64, &'static TargetConfig, GoroutineKey)> {
    let (pid_tgid, cfg) = uprobe_target()?;
    let goid = read_user::<u64>(regs(ctx).r14 + cfg.go.g_goid as u64)?;
    Some((pid_tgid, cfg, GoroutineKey { pid: (pid_tgid >> 32) as u32, _pad: 0, goid }))
}

/// Calls with these helper numbers are rewritten by the agent before loading
/// (agent/src/probes/kfuncs.rs): into calls of the kernel functions bpf_preempt_disable and
/// bpf_preempt_enable where the kernel has them (Linux 6.10+), else into `r0 = 0`.
pub const CALL_PREEMPT_DISABLE: u32 = 0x7a70_0001;
pub const CALL_PREEMPT_ENABLE: u32 = 0x7a70_0002;

/// Runs `f` with preemption disabled. Linux 7.0 runs tracepoint programs preemptible (uprobe
/// and fentry programs are on preemptible kernels too): a program preempted mid-run could
/// have its per-CPU scratch space overwritten by the next program on the CPU. The kernel
/// still preempts the program before `f` and where preemption is enabled again, inside its
/// once-per-CPU guard, and skips the program for other tasks on the CPU meanwhile: that is
/// what the twins are for (maps::RUN_MARK).
#[inline(always)]
pub fn unpreempted<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: a helper call the agent turns into bpf_preempt_disable() or a no-op; both
    // clobber only the caller-saved registers named.
    unsafe {
        core::arch::asm!("call {n}", n = const CALL_PREEMPT_DISABLE, out("r0") _, out("r1") _, out("r2") _, out("r3") _, out("r4") _, out("r5") _, options(nostack));
    }
    let r = f();
    // SAFETY: as above, bpf_preempt_enable() or a no-op.
    unsafe {
        core::arch::asm!("call {n}", n = const CALL_PREEMPT_ENABLE, out("r0") _, out("r1") _, out("r2") _, out("r3") _, out("r4") _, out("r5") _, options(nostack));
    }
    r
}

/// x86-64 user code and stack segment selectors (__USER_CS, __USER_DS).
const USER_CS: u64 = 0x33;
const USER_SS: u64 = 0x2b;
/// Where a task's saved user registers are: at the top of its kernel stack, below
/// TOP_OF_KERNEL_STACK_PADDING (0, or 16 with FRED since Linux 6.9), in a stack of
/// THREAD_SIZE bytes (16 KiB, 32 KiB with KASAN). The candidate whose code and stack
/// segments are the user ones is taken.
const PT_REGS_SIZE: u64 = core::mem::size_of::<aya_ebpf::bindings::pt_regs>() as u64;
const STACK_TOPS: [u64; 4] = [16 << 10, (16 << 10) - 16, 32 << 10, (32 << 10) - 16];

/// The current task's user registers as saved on entry to the kernel: the address of its
/// `struct pt_regs` and (rip, cs, flags, rsp, ss) there. Works on every kernel (the helper
/// for this, bpf_task_pt_regs, needs Linux 5.15); None in a kernel thread.
#[inline(always)]
pub fn saved_user_regs() -> Option<(u64, [u64; 5])> {
    // SAFETY: returns the current task pointer, only used as an address to read from.
    let task = unsafe { bpf_get_current_task() };
    let stack = read_kernel::<u64>(task + kernel().task_stack as u64)?;
    if stack == 0 {
        return None;
    }
    for top in STACK_TOPS {
        let at = stack + top - PT_REGS_SIZE;
        let Some(seg) = read_kernel::<[u64; 5]>(at + core::mem::offset_of!(aya_ebpf::bindings::pt_regs, rip) as u64) else { continue };
        // The selectors are the low 16 bits (FRED keeps more above).
        if seg[1] & 0xffff == USER_CS && seg[4] & 0xffff == USER_SS {
            return Some((at, seg));
        }
    }
    None
}

/// The goroutine running on this thread: g is at fsbase + tls_g (normally -8) and its goid at
/// g + g_goid. Returns (0, 0) outside Go code that set up TLS (e.g. a cgo thread).
#[inline(always)]
pub fn current_goroutine(cfg: &TargetConfig) -> (u64, u64) {
    let k = kernel();
    // SAFETY: returns the current task pointer, only used as an address to read from.
    let task = unsafe { bpf_get_current_task() };
    let Some(fsbase) = read_kernel::<u64>(task + k.task_fsbase as u64) else {
        return (0, 0);
    };
    if fsbase == 0 {
        return (0, 0);
    }
    let Some(g) = read_user::<u64>(fsbase.wrapping_add(cfg.go.tls_g as u64)) else {
        return (0, 0);
    };
    if g == 0 {
        return (0, 0);
    }
    (g, goid_of(&cfg.go, g))
}

/// Reads a Go string header (pointer, length) at `addr` and up to GO_STR_MAX of its bytes.
#[inline(always)]
pub fn read_go_string(addr: u64, out: &mut GoStr) {
    let Some(hdr) = read_user::<[u64; 2]>(addr) else {
        return;
    };
    let (ptr, len) = (hdr[0], hdr[1]);
    if ptr == 0 || len == 0 || len > (1 << 30) {
        return;
    }
    out.len = len as u32;
    out.kept = read_user_bytes::<{ bounds::GO_STR_MAX }>(out.buf.as_mut_ptr(), ptr, len);
}

/// Reads a pointer field at `base + off`; 0 for a missing field or a failed read.
#[inline(always)]
pub fn go_ptr(base: u64, off: u16) -> u64 {
    if base == 0 || off == GoOffsets::NONE {
        return 0;
    }
    read_user::<u64>(base + off as u64).unwrap_or(0)
}

/// The runtime type of the value in a Go interface whose itab is `itab` (itab._type).
#[inline(always)]
pub fn go_itab_type(itab: u64) -> u64 {
    if itab == 0 {
        return 0;
    }
    read_user::<u64>(itab + 8).unwrap_or(0)
}

/// Socket fd behind a Go `net.Conn` interface value (itab, data): a *net.TCPConn directly, or
/// a *tls.Conn wrapping one. -1 when it is some other type.
#[inline(always)]
pub fn go_conn_fd(go: &GoOffsets, itab: u64, data: u64) -> i32 {
    if go.type_tcpconn == 0 {
        return -1;
    }
    let ty = go_itab_type(itab);
    let mut tcp = 0u64;
    if ty == go.type_tcpconn {
        tcp = data;
    } else if ty != 0
        && ty == go.type_tlsconn
        && go.tlsconn_conn != GoOffsets::NONE
        && let Some(inner) = read_user::<[u64; 2]>(data + go.tlsconn_conn as u64)
        && go_itab_type(inner[0]) == go.type_tcpconn
    {
        tcp = inner[1];
    }
    if tcp == 0 {
        return -1;
    }
    let netfd = go_ptr(tcp, go.tcpconn_fd);
    if netfd == 0 || go.netfd_sysfd == GoOffsets::NONE {
        return -1;
    }
    read_user::<i64>(netfd + go.netfd_sysfd as u64).map_or(-1, |fd| fd as i32)
}

/// An event's key in RUN_MARK: its thread's id in the low half; in the high half a mix of
/// the hook (`hook`) and what the hook was passed (`a`, `b`, `c`: socket, length, ...), so
/// a mark no twin took (the twin was skipped itself) matches no later event of the thread.
#[inline(always)]
pub fn run_key(tid: u32, hook: u64, a: u64, b: u64, c: u64) -> u64 {
    let mix = (a ^ b.rotate_left(21) ^ c.rotate_left(42) ^ hook).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (mix & 0xffff_ffff_0000_0000) | tid as u64
}

/// Linux 7.0+ (RUN_TWINS; see maps::RUN_MARK): a program with a twin marks the event it
/// handles (`key`, from run_key; computed only then), unless its twin handed it this event (RESCUE: a rescue,
/// counted; the twin takes no mark then).
#[inline(always)]
pub fn mark_run(key: impl FnOnce() -> u64) {
    if settings().flags & settings_flags::RUN_TWINS == 0 {
        return;
    }
    let key = key();
    if let Some(r) = RESCUE.get_ptr_mut(0) {
        // SAFETY: per-CPU value pointer, valid for this program run.
        unsafe {
            if *r == key {
                *r = 0;
                count(Counter::KernelRunsRescued);
                return;
            }
        }
    }
    if let Some(mark) = RUN_MARK.get_ptr_mut(key as u32 & (RUN_MARK_SLOTS - 1)) {
        // SAFETY: array value pointer, valid for this program run; a plain store (a
        // collision of two threads' slots costs at worst one event handled twice or lost).
        unsafe { *mark = key };
    }
}

/// In a twin: whether its program was skipped for the event `key` (no such mark), else
/// the mark is taken and the twin does nothing.
#[inline(always)]
pub fn twin_runs(key: u64) -> bool {
    if settings().flags & settings_flags::RUN_TWINS == 0 {
        return false;
    }
    let Some(mark) = RUN_MARK.get_ptr_mut(key as u32 & (RUN_MARK_SLOTS - 1)) else { return false };
    // SAFETY: as in mark_run.
    unsafe {
        if *mark == key {
            *mark = 0;
            return false;
        }
    }
    true
}

/// In a twin whose program was skipped: runs the program itself for the event `key` (a
/// tail call into `target`, so the twin is verified without the program's work), telling
/// it not to mark the event. Only this twin's run uses this CPU's RESCUE meanwhile (the
/// kernel runs the twin once per CPU at a time).
#[inline(always)]
pub fn rescue<C: aya_ebpf::EbpfContext>(ctx: &C, target: &aya_ebpf::maps::ProgramArray, key: u64) {
    let Some(r) = RESCUE.get_ptr_mut(0) else { return };
    // SAFETY: per-CPU value pointer, valid for this program run; the tail call does not
    // return when it succeeds.
    unsafe {
        *r = key;
        target.tail_call(ctx, 0);
        *r = 0;
    }
}
