//! Process discovery (`--exe`) and `--pid` targets that exec: every exec on the machine is
//! reported to the agent, which decides by the new executable's path whether to trace the
//! process, or attaches a `--pid` target again as its new program. Attached only for those;
//! an exec is rare enough that reporting all of them costs nothing measurable.
use aya_ebpf::{helpers::bpf_get_current_pid_tgid, macros::raw_tracepoint, programs::RawTracePointContext};
use zerotrace_common::{Counter, EventKind, ProcExecEvent};

use crate::{
    maps::EVENTS,
    util::{count, header, mark_run, now, run_key, twin_runs, unpreempted},
};

/// sched:sched_process_exec, in the task that just exec'd (its new image is mapped).
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn sched_process_exec(ctx: RawTracePointContext) -> u32 {
    unpreempted(|| {
        mark_run(|| exec_key(&ctx));
        exec();
    });
    0
}

/// Linux 7.0+: its twin, attached after it, for the execs the kernel skipped it for (see
/// maps::RUN_MARK): a missed exec is a process `--exe` never traces.
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn sched_process_exec_twin(ctx: RawTracePointContext) -> u32 {
    let key = exec_key(&ctx);
    unpreempted(|| {
        if twin_runs(key) {
            count(Counter::KernelRunsRescued);
            exec();
        }
    });
    0
}

/// The run key of an exec: the task, its pid before and its binprm.
#[inline(always)]
fn exec_key(ctx: &RawTracePointContext) -> u64 {
    run_key(bpf_get_current_pid_tgid() as u32, 3, ctx.arg(0), ctx.arg(1), ctx.arg(2))
}

#[inline(always)]
fn exec() {
    let pid_tgid = bpf_get_current_pid_tgid();
    let ev = ProcExecEvent { hdr: header(EventKind::ProcExec, core::mem::size_of::<ProcExecEvent>(), (pid_tgid >> 32) as u32, pid_tgid as u32, now()) };
    // Woken at once: a new process should be traced before it does much.
    if EVENTS.output::<ProcExecEvent>(&ev, 0).is_err() {
        count(Counter::EventsDroppedRingFull);
    }
}
