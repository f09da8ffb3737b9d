//! `--print`: one line per finished span on stdout, for people watching a terminal.
use std::{fmt::Write as _, io::Write as _};

use crate::spans::{Span, SpanKind, Status};

/// Formats one span as a line (no trailing newline).
pub fn line(s: &Span, service: &str) -> String {
    let mut out = String::with_capacity(160);
    let secs = s.start_unix_ns / 1_000_000_000;
    let (h, m, sec) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    let ms = (s.start_unix_ns / 1_000_000) % 1000;
    let kind = match s.kind {
        SpanKind::Server => "SERVER",
        SpanKind::Client => "CLIENT",
        SpanKind::Internal => "INTERNAL",
    };
    let _ = write!(out, "{h:02}:{m:02}:{sec:02}.{ms:03}Z {service}[{}] {kind} {:?}", s.pid, s.name);
    if let Some(code) = s.attr("http.response.status_code") {
        let _ = write!(out, " status={code}");
    }
    let _ = write!(out, " dur={:.3}ms", s.duration_ns() as f64 / 1e6);
    if matches!(s.status, Status::Error(_)) {
        out.push_str(" ERROR");
    }
    let _ = write!(out, " trace={} span={}", s.trace_id, s.span_id);
    if let Some(p) = s.parent {
        let _ = write!(out, " parent={p}");
    }
    if let (Some(a), Some(p)) = (s.attr("network.peer.address"), s.attr("network.peer.port")) {
        let _ = write!(out, " peer={a}:{p}");
    }
    if let Some(g) = s.attr(crate::attributes::GOROUTINE_ID) {
        let _ = write!(out, " goroutine={g}");
    }
    if let Some(ua) = s.attr("user_agent.original") {
        let _ = write!(out, " ua={:?}", ua.to_string());
    }
    out
}

static CLOSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Writes lines to stdout; a closed stdout (e.g. `| head`) is not an error, it is noted
/// (`stdout_closed`): a tail whose reader went away stops.
pub fn print(lines: &[String]) {
    if lines.is_empty() {
        return;
    }
    let stdout = std::io::stdout();
    let mut lock = stdout.lock();
    for l in lines {
        if let Err(e) = writeln!(lock, "{l}") {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                CLOSED.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            return;
        }
    }
    if let Err(e) = lock.flush()
        && e.kind() == std::io::ErrorKind::BrokenPipe
    {
        CLOSED.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Whether whoever read stdout has gone (a broken pipe).
pub fn stdout_closed() -> bool {
    CLOSED.load(std::sync::atomic::Ordering::Relaxed)
}
