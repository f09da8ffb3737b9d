//! Process discovery (`--exe`) and `--pid` targets that exec: every exec on the machine is
//! reported to the agent, which decides by the new executable's path whether to trace the
//! process, or attaches a `--pid` target again as its new program. Attached only for those;
//! an exec is rare enough that reporting all of them costs nothing measurable.
use aya_ebpf::{helpers::bpf_get_current_pid_tgid, macros::raw_tracepoint, programs::RawTracePointContext};
use zerotrace_common::{Counter, EventKind, ProcExecEvent};

use crate::{
    maps::EVENTS,
    util::{count, header, now},
};

/// sched:sched_process_exec, in the task that just exec'd (its new image is mapped).
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn sched_process_exec(_ctx: RawTracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let ev = ProcExecEvent { hdr: header(EventKind::ProcExec, core::mem::size_of::<ProcExecEvent>(), (pid_tgid >> 32) as u32, pid_tgid as u32, now()) };
    // Woken at once: a new process should be traced before it does much.
    if EVENTS.output::<ProcExecEvent>(&ev, 0).is_err() {
        count(Counter::EventsDroppedRingFull);
    }
    0
}
