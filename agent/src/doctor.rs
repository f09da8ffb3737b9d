//! `zerotrace doctor`: one line per capability of this kernel and this process, each with
//! ok/missing and what follows from it. Exit status 0 when the baseline zerotrace needs
//! (tracepoints + uprobes + ring buffer) works.
use std::fmt::Write as _;

use crate::probes::{btf, features};

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
    let uname = kernel_release();
    push("kernel", Ok(uname), "", "");
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
    push("tracefs", tracefs, "tracepoints can be found", "tracepoints cannot be attached: mount -t tracefs tracefs /sys/kernel/tracing");
    push(
        "btf",
        btf::kernel_offsets(std::path::Path::new(btf::VMLINUX_BTF)).map(|_| btf::VMLINUX_BTF.to_owned()).map_err(|e| e.to_string()),
        "kernel struct offsets resolved (sockets, thread pointer)",
        "socket addresses and goroutine ids cannot be read",
    );
    push("ring buffer", features::ring_buffer().map(|()| "BPF_MAP_TYPE_RINGBUF".into()), "events reach the agent", "no event transport: zerotrace cannot run");
    push("tracepoints", features::tracepoints().map(|()| "syscalls:* attachable".into()), "tracepoints usable", "no tracepoints: zerotrace cannot run");
    push(
        "socket hooks",
        features::socket_tracepoints().map(|()| "sock_recv_length, tcp_sendmsg_locked, inet_sock_set_state attachable".into()),
        "socket traffic of selected processes is seen (the cheap hot path)",
        "no socket layer: zerotrace cannot run (it needs Linux 6.5 or newer)",
    );
    push(
        "btf tracing",
        features::btf_tracepoints().map(|()| "tp_btf programs load".into()),
        "socket hooks load in their faster flavour",
        "socket hooks fall back to raw tracepoints (slower, same results)",
    );
    push("uprobes", features::uprobes().map(|()| "uprobe PMU works".into()), "Go functions can be hooked", "no Go probes: zerotrace cannot run");
    push("perf events", features::perf_events().map(|()| "cpu-clock sampling attachable".into()), "CPU profiling possible", "no CPU profiles");
    push(
        "kprobes",
        features::kprobes().map(|()| "kprobe PMU works".into()),
        "kernel function probes available (optional fast path)",
        "not needed: the baseline uses tracepoints",
    );
    push(
        "fentry",
        features::fentry().map(|()| "BPF_TRACE_FENTRY loads".into()),
        "fentry available (optional fast path)",
        "not needed: the baseline uses tracepoints",
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

/// The baseline: ring buffer + tracepoints + uprobes.
pub fn baseline_ok(lines: &[Line]) -> bool {
    ["ring buffer", "tracepoints", "socket hooks", "uprobes", "tracefs", "btf"].iter().all(|n| lines.iter().any(|l| l.name == *n && l.ok))
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

fn kernel_release() -> String {
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-pointer.
    if unsafe { libc::uname(&mut u) } != 0 {
        return "unknown".into();
    }
    let field = |f: &[libc::c_char]| {
        let bytes: Vec<u8> = f.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    format!("Linux {} {}", field(&u.release), field(&u.machine))
}
