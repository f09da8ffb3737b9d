//! The agent's counters under the names users see (log line, `--stats-file` keys with a
//! `zerotrace_` prefix, `zerotrace status`, OTLP self-telemetry): the kernel's per-CPU
//! counters, the reader's and the correlator's; the outputs add their own.
use std::time::{Duration, Instant};

use zerotrace_common::Counter;

use super::targets::Targets;
use crate::{
    control::proto::StatusReply,
    correlate::Correlator,
    events::reader::EventReader,
    probes::{self, Probes},
};

/// The pipeline's counters: kernel, reader, correlator.
pub fn counters(kernel: &probes::Counters, probes: &Probes, reader: &EventReader, c: &Correlator) -> Vec<(&'static str, u64)> {
    let mut v = vec![("events_read", reader.records), ("events_undecodable", reader.decode_errors), ("ring_wakeups", reader.wakeups)];
    // The kernel's counters under the names zerotrace_common gives them.
    v.extend(Counter::ALL.iter().map(|&k| (k.name(), probes::counter(kernel, k))));
    // Skipped runs a twin rescued are no loss (probes::hooks::run_twins).
    v.push(("kernel_runs_skipped", probes.runs_skipped().saturating_sub(probes::counter(kernel, Counter::KernelRunsRescued))));
    let (runs, ns) = probes.socket_program_runs();
    v.extend([("socket_program_runs", runs), ("socket_program_ns", ns)]);
    v.extend([
        ("pipelined_requests_not_captured", c.stats.pipelined_uncaptured),
        ("connections_closed_unseen", c.stats.closed_unseen),
        ("client_calls_expired", c.stats.calls_expired),
        (crate::correlate::GAUGES[0], c.connections_held()),
        ("server_spans_linked", c.stats.linked),
        ("client_returns_unmatched", c.stats.unmatched_client_returns),
        ("http2_directions_unreadable", c.stats.h2_unreadable),
        ("parents_unknown", c.traces.parents_unknown),
        ("spans_assembled", c.stats.spans),
        ("spans_not_sampled", c.sampling.dropped),
        ("responses_unmatched", c.stats.unmatched_responses),
        ("requests_not_http", c.stats.not_http),
        ("responses_lost", c.stats.lost_responses),
        ("requests_abandoned", c.stats.abandoned),
        ("requests_dropped_pending_full", c.stats.pending_full),
        ("route_pattern_reads_failed", c.stats.pattern_reads_failed),
    ]);
    v
}

/// One log line with every counter that is not zero.
pub fn log(counters: &[(&'static str, u64)]) {
    let text: Vec<String> = counters.iter().filter(|(_, v)| *v > 0).map(|(k, v)| format!("{k}={v}")).collect();
    tracing::info!(target: "zerotrace::stats", "{}", text.join(" "));
}

/// `--stats-file`: every counter as `zerotrace_<name>`, the socket hook set and the uptime.
pub fn json(counters: &[(&'static str, u64)], uptime: Duration, hooks: &str) -> String {
    let mut s = String::from("{");
    for (k, v) in counters {
        s.push_str(&format!("\"zerotrace_{k}\":{v},"));
    }
    s.push_str(&format!("\"socket_hooks\":\"{hooks}\","));
    s.push_str(&format!("\"uptime_ms\":{}}}", uptime.as_millis()));
    s
}

/// What `zerotrace status` shows.
pub fn status(targets: &Targets<'_>, counters: &[(&'static str, u64)], started: Instant, hooks: &str) -> StatusReply {
    use crate::control::proto::{Counter as C, Target as T};
    let mut list: Vec<T> = targets.services().map(|(pid, service)| T { pid, service: service.to_string() }).collect();
    list.sort_by_key(|t| t.pid);
    StatusReply {
        agent_pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").into(),
        uptime_seconds: started.elapsed().as_secs(),
        targets: list,
        counters: counters.iter().map(|(n, v)| C { name: format!("zerotrace_{n}"), value: *v }).collect(),
        socket_hooks: hooks.to_owned(),
    }
}
