//! The two hooks every syscall passes through: `sys_enter` and `sys_exit` (raw_syscalls).
//! They are cheaper than the per-syscall `syscalls:*` tracepoints, which copy every call's
//! arguments into a perf buffer before any program runs: here the program looks at the
//! syscall number and a bit of the SELECTED bitmap, and reads arguments from the saved
//! registers only for selected processes. Each hook exists twice: as a BTF tracepoint
//! (tp_btf: registers read with plain loads), and as a raw tracepoint (registers read with
//! bpf_probe_read_kernel) for kernels that refuse BTF tracing programs. The agent loads one.
use aya_ebpf::{
    bindings::pt_regs,
    helpers::bpf_get_current_pid_tgid,
    macros::{btf_tracepoint, raw_tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext},
};

use crate::{
    http_server::{on_read, on_write},
    maps::SELECTED,
    sockets::{on_accept, on_close},
    util::read_kernel,
};

/// x86-64 syscall numbers.
const SYS_READ: u64 = 0;
const SYS_WRITE: u64 = 1;
const SYS_CLOSE: u64 = 3;
const SYS_ACCEPT: u64 = 43;
const SYS_ACCEPT4: u64 = 288;

/// Offset of (dx, si, di, orig_ax) in x86-64 `struct pt_regs` (a stable user ABI): the
/// third, second and first syscall arguments and the syscall number, contiguous.
const REGS_DX: u64 = 96;

/// Whether process `pid` is selected: one bit per pid in an array (an inlined lookup), so
/// that the cost for every other process on the machine is a few instructions.
#[inline(always)]
fn selected(pid: u32) -> bool {
    match SELECTED.get(pid >> 6) {
        Some(word) => word & (1u64 << (pid & 63)) != 0,
        None => false,
    }
}

/// (first, second, third argument, syscall number) from the saved user registers.
#[inline(always)]
fn args(regs: u64) -> Option<(u64, u64, u64, u64)> {
    let r = read_kernel::<[u64; 4]>(regs + REGS_DX)?;
    Some((r[2], r[1], r[0], r[3]))
}

#[inline(always)]
fn on_enter(pid_tgid: u64, id: u64, a0: u64, a1: u64, a2: u64) {
    if id == SYS_WRITE {
        let _ = on_write(pid_tgid, a0, a1, a2);
    } else {
        on_close(pid_tgid, a0);
    }
}

#[inline(always)]
fn on_exit(pid_tgid: u64, nr: u64, a0: u64, a1: u64, ret: i64) {
    match nr {
        SYS_READ => {
            let _ = on_read(pid_tgid, a0, a1, ret);
        }
        SYS_ACCEPT | SYS_ACCEPT4 => on_accept(pid_tgid, ret),
        _ => {}
    }
}

#[inline(always)]
fn wanted_at_entry(id: u64) -> bool {
    id == SYS_WRITE || id == SYS_CLOSE
}

#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn sys_enter(ctx: RawTracePointContext) -> u32 {
    let id: u64 = ctx.arg(1);
    if !wanted_at_entry(id) {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    if !selected((pid_tgid >> 32) as u32) {
        return 0;
    }
    if let Some((a0, a1, a2, _)) = args(ctx.arg(0)) {
        on_enter(pid_tgid, id, a0, a1, a2);
    }
    0
}

#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn sys_exit(ctx: RawTracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !selected((pid_tgid >> 32) as u32) {
        return 0;
    }
    if let Some((a0, a1, _, nr)) = args(ctx.arg(0)) {
        on_exit(pid_tgid, nr, a0, a1, ctx.arg(1));
    }
    0
}

#[btf_tracepoint(function = "sys_enter")]
pub fn sys_enter_btf(ctx: BtfTracePointContext) -> u32 {
    let id: u64 = ctx.arg(1);
    if !wanted_at_entry(id) {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    if !selected((pid_tgid >> 32) as u32) {
        return 0;
    }
    let regs: *const pt_regs = ctx.arg(0);
    // SAFETY: a trusted kernel pointer (BTF-typed argument); the verifier checks each load.
    let (a0, a1, a2) = unsafe { ((*regs).rdi, (*regs).rsi, (*regs).rdx) };
    on_enter(pid_tgid, id, a0, a1, a2);
    0
}

#[btf_tracepoint(function = "sys_exit")]
pub fn sys_exit_btf(ctx: BtfTracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !selected((pid_tgid >> 32) as u32) {
        return 0;
    }
    let regs: *const pt_regs = ctx.arg(0);
    // SAFETY: as in sys_enter_btf.
    let (nr, a0, a1) = unsafe { ((*regs).orig_rax, (*regs).rdi, (*regs).rsi) };
    on_exit(pid_tgid, nr, a0, a1, ctx.arg(1));
    0
}
