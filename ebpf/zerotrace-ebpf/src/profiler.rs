//! CPU sampling: a perf_event program on every CPU's cpu-clock (19 Hz by default) that
//! keeps only samples of selected processes. Go programs: user frames walked by frame
//! pointers in the kernel (bpf_get_stack), plus the goroutine and its span (GO_CTX).
//! Other programs (Rust/C release builds have no frame pointers): a copy of the user stack
//! (whole pages from the one holding the stack pointer) and the registers, unwound by the
//! agent from `.eh_frame`. Kernel frames in both cases. The user registers come from the
//! sample's context or the task's kernel stack (`user_regs`), which every kernel has.
use aya_ebpf::{
    EbpfContext,
    bindings::pt_regs,
    helpers::{
        bpf_get_current_pid_tgid,
        generated::bpf_probe_read_user as raw_read_user,
        generated::{bpf_get_smp_processor_id, bpf_get_stack},
    },
    macros::perf_event,
    programs::PerfEventContext,
};
use zerotrace_common::{Counter, CpuSampleEvent, CpuSampleNativeEvent, EventKind, bounds, target_flags};

use crate::{
    causality::span_of,
    maps::EVENTS,
    socket::conns::selected,
    util::{count, current_goroutine, header, now, read_kernel, saved_user_regs, target, wake_flags},
};

/// bpf_get_stack flag: the user stack (else the kernel's).
const BPF_F_USER_STACK: u64 = 1 << 8;

/// The user registers (ip, sp, bp) of the sampled thread: the perf context's own when the
/// sample interrupted user code, else those saved on entry to the kernel (`saved_user_regs`).
#[inline(always)]
fn user_regs(ctx: &PerfEventContext) -> Option<(u64, u64, u64)> {
    // SAFETY: a perf_event program's context starts with the interrupted registers.
    let r = unsafe { &*(ctx.as_ptr() as *const pt_regs) };
    if r.cs & 3 == 3 {
        return Some((r.rip, r.rsp, r.rbp));
    }
    let (at, seg) = saved_user_regs()?;
    let bp = read_kernel::<u64>(at + core::mem::offset_of!(pt_regs, rbp) as u64)?;
    Some((seg[0], seg[3], bp))
}

#[perf_event]
pub fn cpu_sample(ctx: PerfEventContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let pid = (pid_tgid >> 32) as u32;
    let tid = pid_tgid as u32;
    if tid == 0 || !selected(pid) {
        return 0;
    }
    let Some(cfg) = target(pid) else {
        return 0;
    };
    // A kernel thread's samples and unreadable registers: nothing to attribute.
    let Some((ip, sp, bp)) = user_regs(&ctx) else {
        return 0;
    };
    if cfg.flags & target_flags::GO != 0 {
        go_sample(&ctx, pid, tid, cfg, ip, sp, bp);
    } else {
        native_sample(&ctx, pid, tid, ip, sp, bp);
    }
    0
}

/// Fills the common part of a sample: header, registers, kernel frames.
#[inline(always)]
unsafe fn fill(ctx: &PerfEventContext, e: *mut CpuSampleEvent, kind: EventKind, size: usize, pid: u32, tid: u32, regs: (u64, u64, u64)) {
    // SAFETY: the caller passes a reserved record; every field is written.
    unsafe {
        (*e).hdr = header(kind, size, pid, tid, now());
        (*e).goid = 0;
        (*e).span_id = 0;
        (*e).ip = regs.0;
        (*e).sp = regs.1;
        (*e).bp = regs.2;
        (*e).stack_base = 0;
        (*e).cpu = bpf_get_smp_processor_id();
        (*e).ustack_len = 0;
        (*e).stack_len = 0;
        let k = bpf_get_stack(ctx.as_ptr(), (*e).kstack.as_mut_ptr().cast(), (bounds::KSTACK_MAX * 8) as u32, 0);
        (*e).kstack_len = if k > 0 { k as u32 } else { 0 };
    }
}

#[inline(always)]
fn go_sample(ctx: &PerfEventContext, pid: u32, tid: u32, cfg: &zerotrace_common::TargetConfig, ip: u64, sp: u64, bp: u64) {
    let Some(mut ev) = EVENTS.reserve::<CpuSampleEvent>(0) else {
        count(Counter::EventsDroppedRingFull);
        return;
    };
    let e = ev.as_mut_ptr();
    let (_, goid) = current_goroutine(cfg);
    // SAFETY: e points at a reserved record of the right size; fill writes the rest.
    unsafe {
        fill(ctx, e, EventKind::CpuSample, core::mem::size_of::<CpuSampleEvent>(), pid, tid, (ip, sp, bp));
        (*e).goid = goid;
        (*e).span_id = span_of(pid, goid);
        let u = bpf_get_stack(ctx.as_ptr(), (*e).ustack.as_mut_ptr().cast(), (bounds::USTACK_MAX * 8) as u32, BPF_F_USER_STACK);
        (*e).ustack_len = if u > 0 { u as u32 } else { 0 };
    }
    count(Counter::CpuSamplesTaken);
    ev.submit(wake_flags());
}

#[inline(always)]
fn native_sample(ctx: &PerfEventContext, pid: u32, tid: u32, ip: u64, sp: u64, bp: u64) {
    let Some(mut ev) = EVENTS.reserve::<CpuSampleNativeEvent>(0) else {
        count(Counter::EventsDroppedRingFull);
        return;
    };
    let e = ev.as_mut_ptr();
    let base = sp & !(bounds::PAGE as u64 - 1);
    // SAFETY: e points at a reserved record of the right size; fill writes the sample's
    // fields, the loop the stack pages it could read (the rest is never read by the agent).
    unsafe {
        let s = &raw mut (*e).sample;
        fill(ctx, s, EventKind::CpuSampleNative, core::mem::size_of::<CpuSampleNativeEvent>(), pid, tid, (ip, sp, bp));
        (*s).stack_base = base;
        let mut copied = 0u32;
        if sp != 0 {
            let dst = (*e).stack.as_mut_ptr();
            for i in 0..bounds::STACK_PAGES {
                // Page by page: a read that ran past the stack's mapping would fail whole.
                let rc = raw_read_user(dst.add(i * bounds::PAGE).cast(), bounds::PAGE as u32, (base + (i * bounds::PAGE) as u64) as *const _);
                if rc < 0 {
                    break;
                }
                copied += bounds::PAGE as u32;
            }
        }
        (*s).stack_len = copied;
    }
    count(Counter::CpuSamplesTaken);
    ev.submit(wake_flags());
}
