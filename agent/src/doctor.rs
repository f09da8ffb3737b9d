//! `zerotrace doctor`: one line per capability of this kernel and this process, each with
//! ok/missing and what follows from it, then one summary line naming the first gap. Exit
//! status 0 when the baseline zerotrace needs (BASELINE: a supported kernel, privileges,
//! BTF, the ring buffer, a socket hook set) works; without uprobes Go programs are traced at
//! the socket level, as programs that are not Go.
use std::fmt::Write as _;

use crate::probes::{HookSet, SocketHooks, btf, features, hooks};

pub struct Line {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
    pub consequence: &'static str,
}

pub fn check() -> Vec<Line> {
    let mut lines = Vec::new();
    let mut push = |name, r: Result<String, String>, ok_says: &'static str, missing_says: &'static str| {
        let (ok, detail) = match r {
            Ok(d) => (true, d),
            Err(d) => (false, d),
        };
        lines.push(Line { name, ok, detail, consequence: if ok { ok_says } else { missing_says } });
    };
    let (release, machine) = features::uname();
    let supported = machine == "x86_64" && features::release_version(&release).is_some_and(|v| v >= features::MINIMUM);
    push(
        "kernel",
        if supported { Ok(format!("Linux {release} {machine}")) } else { Err(format!("Linux {release} {machine}")) },
        "",
        "zerotrace needs Linux 5.10 or newer on x86_64 (amd64)",
    );
    let caps = features::capabilities();
    let missing = features::missing_privileges(caps);
    push(
        "privileges",
        if missing.is_empty() { Ok(format!("CapEff={caps:#x}")) } else { Err(format!("missing {}", missing.join(", "))) },
        "can load programs and read targets",
        "run as root or grant CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE; the checks below may fail for this reason alone",
    );
    let tracefs = if features::tracefs_mounted() {
        Ok("mounted".to_owned())
    } else {
        features::ensure_tracefs().map(|()| format!("mounted it at {}", features::TRACEFS)).map_err(|e| format!("not mounted, mount failed: {e}"))
    };
    push("tracefs", tracefs, "tracepoints can be found", "the syscall hook set (kernels before 6.16) needs it: mount -t tracefs tracefs /sys/kernel/tracing");
    push(
        "btf",
        btf::kernel().and_then(|b| btf::kernel_offsets(b.as_ref())).map(|_| btf::VMLINUX_BTF.to_owned()).map_err(|e| e.to_string()),
        "kernel struct offsets resolved (sockets, thread pointer)",
        "socket addresses and goroutine ids cannot be read",
    );
    push("ring buffer", features::ring_buffer().map(|()| "BPF_MAP_TYPE_RINGBUF".into()), "events reach the agent", "no event transport: zerotrace cannot run");
    push("tracepoints", features::tracepoints().map(|()| "syscalls:* attachable".into()), "tracepoints usable", "no tracepoints: zerotrace cannot run");
    for set in HookSet::ALL {
        push(set.name(), set.available().map(|()| format!("available (needs {})", set.minimum())), "", "not on this kernel");
    }
    push(
        "socket hooks",
        hooks::choose(SocketHooks::Auto).map(|set| format!("{} (the cheapest this kernel has; --socket-hooks forces one)", set.name())),
        "socket traffic of selected processes is seen",
        "no socket layer: zerotrace cannot trace here",
    );
    push(
        "uprobes",
        features::uprobes().map(|()| "uprobe PMU works".into()),
        "Go functions can be hooked",
        "Go programs are traced at the socket level only (uprobes need CAP_SYS_ADMIN: no goroutine causality, Go client/SQL/TLS spans)",
    );
    push("perf events", features::perf_events().map(|()| "cpu-clock sampling attachable".into()), "CPU profiling possible", "no CPU profiles");
    push(
        "bpf_loop",
        if features::helper(features::HELPER_LOOP) { Ok("helper present".into()) } else { Err("helper missing (Linux 5.17 has it)".into()) },
        "--inject-traceparent reads incoming traceparents in the kernel",
        "--inject-traceparent is refused (everything else works)",
    );
    push(
        "preemption",
        match btf::kernel().ok().and_then(|b| b.func("bpf_preempt_disable")) {
            Some(_) => Ok("bpf_preempt_disable present".into()),
            None => Err("kernel functions bpf_preempt_disable/enable missing (Linux 6.10 has them)".into()),
        },
        "socket programs run unpreempted",
        "tracepoint programs run unpreempted before Linux 7.0; fentry and uprobe programs can be preempted on fully preemptible kernels (skipped runs: kernel_runs_skipped)",
    );
    if features::release_version(&release).is_some_and(|v| v < (5, 11)) {
        push(
            "memlock",
            memlock_room(caps),
            "BPF maps fit under RLIMIT_MEMLOCK (Linux before 5.11 charges them there)",
            "maps cannot be created: grant CAP_SYS_RESOURCE or raise `ulimit -l` to unlimited",
        );
    }
    push(
        "kprobes",
        features::kprobes().map(|()| "kprobe PMU works".into()),
        "kernel function probes available (unused: fentry serves wherever kprobes do)",
        "not needed: no hook set uses kprobes",
    );
    push(
        "fentry",
        features::fentry().map(|()| "BPF_TRACE_FENTRY loads".into()),
        "the socket-fentry set can run (kernels before the socket-layer tracepoints take it)",
        "kernels before the socket-layer tracepoints (6.16) take the syscall set instead",
    );
    let lockdown = features::lockdown();
    push(
        "lockdown",
        match lockdown.as_deref() {
            None => Ok("not available (no LSM lockdown)".into()),
            Some("none") => Ok("none".into()),
            Some(m) => Err(m.to_owned()),
        },
        "--inject-traceparent can write into targets (with CAP_SYS_ADMIN)",
        "reading is unaffected; --inject-traceparent is refused",
    );
    lines
}

/// What tracing needs; each missing one stops zerotrace.
const BASELINE: &[&str] = &["kernel", "privileges", "btf", "ring buffer", "socket hooks", "memlock"];

/// Linux before 5.11: whether the locked-memory limit can hold the maps.
fn memlock_room(caps: u64) -> Result<String, String> {
    // SAFETY: plain data; getrlimit fills it.
    let mut now: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-pointer.
    unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut now) };
    let kib = |v: u64| if v == libc::RLIM_INFINITY { "unlimited".to_owned() } else { format!("{} KiB", v / 1024) };
    const CAP_SYS_RESOURCE: u32 = 24;
    if features::has_cap(caps, CAP_SYS_RESOURCE) || now.rlim_max == libc::RLIM_INFINITY {
        Ok(format!("limit {}, raised to unlimited at start", kib(now.rlim_cur)))
    } else {
        Err(format!("limit {} (hard {}) and no CAP_SYS_RESOURCE to raise it", kib(now.rlim_cur), kib(now.rlim_max)))
    }
}

/// The baseline: no line of BASELINE missing (memlock is checked only where it applies).
pub fn baseline_ok(lines: &[Line]) -> bool {
    BASELINE.iter().all(|n| lines.iter().filter(|l| l.name == *n).all(|l| l.ok))
}

/// One line: whether zerotrace can trace here, and if not, what is missing (the first gap
/// of the baseline, with its detail).
pub fn summary(lines: &[Line]) -> String {
    let gaps: Vec<String> = BASELINE.iter().filter_map(|n| lines.iter().find(|l| l.name == *n && !l.ok)).map(|l| format!("{}: {}", l.name, l.detail)).collect();
    if gaps.is_empty() { "baseline ok: zerotrace can trace on this machine".to_owned() } else { format!("zerotrace cannot trace here: {}", gaps.join("; ")) }
}

pub fn render(lines: &[Line]) -> String {
    let mut out = String::new();
    for l in lines {
        let state = if l.ok { "ok     " } else { "missing" };
        let _ = write!(out, "{:<15} {state} {}", l.name, l.detail);
        if !l.consequence.is_empty() {
            let _ = write!(out, " -> {}", l.consequence);
        }
        out.push('\n');
    }
    out
}

/// `doctor --programs`: one line per kernel program (accepted with its verification time,
/// refused with where its log is, or not loadable here and why), and whether none was
/// refused.
pub fn programs() -> Result<(String, bool), crate::probes::ProbeError> {
    let checks = crate::probes::check_programs()?;
    let mut out = String::new();
    let mut ok = true;
    for c in &checks {
        match (&c.skipped, &c.outcome) {
            (Some(why), _) => {
                let _ = writeln!(out, "program {:<28} skipped  {why}", c.name);
            }
            (None, Ok(t)) => {
                let walked = c.walked.map(|n| format!(" ({n} instructions walked)")).unwrap_or_default();
                let _ = writeln!(out, "program {:<28} ok       verified in {} ms{walked}", c.name, t.as_millis());
            }
            (None, Err(e)) => {
                ok = false;
                let _ = writeln!(out, "program {:<28} REFUSED  {e}", c.name);
            }
        }
    }
    let refused = checks.iter().filter(|c| c.skipped.is_none() && c.outcome.is_err()).count();
    let loaded = checks.iter().filter(|c| c.skipped.is_none() && c.outcome.is_ok()).count();
    let _ = writeln!(out, "programs: {loaded} accepted, {refused} refused, {} not loadable on this kernel", checks.len() - loaded - refused);
    Ok((out, ok))
}
