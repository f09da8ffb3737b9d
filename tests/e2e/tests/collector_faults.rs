//! A collector in trouble, end to end: the OTLP receiver refuses with 429/503 and a
//! Retry-After (HTTP) or RetryInfo (gRPC), resets connections, refuses for good (400),
//! answers slowly, or does not serve a signal at all. The agent waits as long as it is
//! asked, retries what is worth retrying, drops the rest counted by reason, logs the
//! recovery, and never holds up the traced service. Every test ends on the account:
//! spans assembled = exported + dropped, each drop under its reason.
//!
//! These tests are about export, not the socket hook set: the `syscalls` pass of
//! `cargo xtask test` leaves them out (`--skip collector_`).
use std::time::Duration;

use anyhow::{Result, ensure};
use zerotrace_e2e::{
    agent::Agent,
    http::Client,
    otlp::{Fault, Kind, Receiver, Signal},
    proc::{Proc, start_server, wait_until},
    tools,
};

fn go_server(name: &str) -> Result<(Proc, u16)> {
    start_server(name, &tools::httpserver(tools::GO_NEWEST)?)
}

/// The agent's flags for exporting to `rx` with short batches.
fn export_args(rx: &Receiver) -> Vec<String> {
    let mut a = vec!["--otlp-endpoint".to_owned(), rx.endpoint(), "--batch-delay".into(), "100ms".into(), "--otlp-timeout".into(), "2s".into()];
    if rx.kind == Kind::Http {
        a.extend(["--otlp-protocol".into(), "http/protobuf".into()]);
    }
    a
}

fn start_agent(pid: u32, rx: &Receiver, more: &[&str], env: &[(&str, &str)]) -> Result<Agent> {
    let mut args = export_args(rx);
    args.extend(more.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Agent::start(&[pid], &args, env)
}

/// Every span the agent assembled is exported or counted under one reason (sampling
/// included); returns the drops by reason that are not zero.
fn assert_accounted(agent: &Agent) -> Vec<(&'static str, u64)> {
    let reasons = ["spans_not_sampled", "spans_dropped_queue_full", "spans_dropped_export_failed", "spans_dropped_rejected", "spans_dropped_shutdown"];
    let drops: Vec<(&str, u64)> = reasons.iter().map(|r| (*r, agent.stat(r))).filter(|(_, n)| *n > 0).collect();
    let assembled = agent.stat("spans_assembled");
    let exported = agent.stat("spans_exported");
    assert_eq!(assembled, exported + drops.iter().map(|(_, n)| n).sum::<u64>(), "assembled = exported + drops by reason ({drops:?}); {:?}", agent.stats().ok());
    drops
}

/// A 429 (HTTP) or RESOURCE_EXHAUSTED (gRPC) asking to wait 3 s: nothing is sent before
/// then, not even by the other export tasks, and nothing is lost.
#[test]
fn collector_retry_after_is_obeyed() -> Result<()> {
    let (srv, port) = go_server("retry-after")?;
    for kind in [Kind::Http, Kind::Grpc] {
        let rx = Receiver::start(kind, 0)?;
        rx.set_fault(Signal::Traces, Some(Fault::Status { http: 429, retry_after: Some(3) }));
        let mut agent = start_agent(srv.pid(), &rx, &[], &[])?;
        let mut client = Client::new(port);
        for i in 0..20 {
            client.get(&format!("/users/{i}"))?;
        }
        let first = rx.wait_for_attempts(Signal::Traces, 1, Duration::from_secs(20))?[0].at;
        rx.set_fault(Signal::Traces, None);
        // More spans while the collector's wait runs: they wait too.
        for i in 20..40 {
            client.get(&format!("/users/{i}"))?;
        }
        rx.wait_for(40, Duration::from_secs(30))?;
        agent.stop()?;
        let attempts: Vec<_> = rx.attempts().into_iter().filter(|a| a.signal == Signal::Traces).collect();
        // Requests already on their way when the first answer came may arrive just after it.
        let early: Vec<Duration> = attempts
            .iter()
            .map(|a| a.at.saturating_duration_since(first))
            .filter(|d| *d > Duration::from_millis(300) && *d < Duration::from_millis(2900))
            .collect();
        ensure!(early.is_empty(), "{kind:?}: export requests sent during the 3 s the collector asked to wait, at {early:?} after the refusal");
        let taken = attempts.iter().find(|a| a.fault.is_none()).expect("a request was taken");
        ensure!(taken.at - first >= Duration::from_millis(2900), "{kind:?}: retried {:?} after a Retry-After of 3 s", taken.at - first);
        ensure!(agent.stat("export_retry_after") >= 1, "{kind:?}: {:?}", agent.stats().ok());
        let drops = assert_accounted(&agent);
        ensure!(drops.is_empty(), "{kind:?}: a wait the collector asked for loses nothing: {drops:?}");
        ensure!(agent.stat("spans_exported") as usize == rx.spans().len(), "{kind:?}: every span exported arrived once");
    }
    Ok(())
}

/// Resets mid-request and 503s are retried until the collector takes the spans, and the
/// recovery is logged; a 400 is final: its spans are dropped as rejected, never sent again.
#[test]
fn collector_resets_and_refusals_are_retried_or_dropped_by_reason() -> Result<()> {
    let (srv, port) = go_server("refusals")?;
    let rx = Receiver::start(Kind::Http, 0)?;
    rx.set_fault(Signal::Traces, Some(Fault::Reset));
    let mut agent = start_agent(srv.pid(), &rx, &[], &[])?;
    let mut client = Client::new(port);
    for i in 0..10 {
        client.get(&format!("/users/{i}"))?;
    }
    rx.wait_for_attempts(Signal::Traces, 2, Duration::from_secs(20))?;
    rx.set_fault(Signal::Traces, Some(Fault::Status { http: 503, retry_after: None }));
    rx.wait_for_attempts(Signal::Traces, 3, Duration::from_secs(20))?;
    rx.set_fault(Signal::Traces, None);
    rx.wait_for(10, Duration::from_secs(30))?;
    wait_until("the agent to log the recovery", Duration::from_secs(10), || agent.proc.stderr_text().contains("OTLP export works again"))?;

    // Refused for good: dropped at once, counted, not retried.
    rx.set_fault(Signal::Traces, Some(Fault::Status { http: 400, retry_after: None }));
    let before = rx.attempts().len();
    for i in 10..20 {
        client.get(&format!("/users/{i}"))?;
    }
    rx.wait_for_attempts(Signal::Traces, before + 1, Duration::from_secs(20))?;
    // Longer than the first backoffs (0.5 s, 1 s): a retry would show here.
    std::thread::sleep(Duration::from_secs(3));
    agent.stop()?;
    let refused: Vec<_> = rx.attempts().into_iter().filter(|a| a.fault == Some(Fault::Status { http: 400, retry_after: None })).collect();
    let refused_spans: usize = refused.iter().map(|a| a.spans).sum();
    ensure!(refused_spans == 10, "the 10 refused spans were sent {refused_spans} times in all, in {} requests (a 400 is not retried)", refused.len());
    let drops = assert_accounted(&agent);
    ensure!(drops == [("spans_dropped_rejected", 10)], "only the refused spans are dropped, as rejected: {drops:?}");
    ensure!(agent.stat("export_errors") >= 3, "{:?}", agent.stats().ok());
    let log = agent.proc.stderr_text();
    ensure!(log.contains("the collector refused spans"), "{log}");
    Ok(())
}

/// A collector that answers each request after 1 s: the service's requests never wait for
/// it, the bounded queue sheds what export cannot carry (counted), and what is left at the
/// shutdown deadline is counted too.
#[test]
fn collector_that_is_slow_never_holds_up_the_service() -> Result<()> {
    let (srv, port) = go_server("slow-collector")?;
    let rx = Receiver::start(Kind::Grpc, 0)?;
    rx.set_fault(Signal::Traces, Some(Fault::Slow(Duration::from_secs(1))));
    let mut agent = start_agent(srv.pid(), &rx, &["--batch-queue", "100", "--batch-size", "20"], &[])?;
    let mut client = Client::new(port);
    for i in 0..1500 {
        let r = client.get(&format!("/users/{i}"))?;
        ensure!(r.status == 200);
    }
    rx.wait_for_attempts(Signal::Traces, 4, Duration::from_secs(20))?;
    agent.stop()?;
    // Export waits in its own tasks: the agent kept reading the kernel's records meanwhile.
    ensure!(agent.stat("events_dropped_ring_full") == 0, "the agent stopped reading while export waited: {:?}", agent.stats().ok());
    let drops = assert_accounted(&agent);
    ensure!(agent.stat("spans_dropped_queue_full") > 0, "1500 spans through a queue of 100 at 80 spans/s: {drops:?}");
    let (exported, shutdown) = (agent.stat("spans_exported") as usize, agent.stat("spans_dropped_shutdown") as usize);
    let got = rx.spans().len();
    // A request answered after the deadline arrived but is counted as dropped at shutdown.
    ensure!(got >= exported && got <= exported + shutdown, "received {got}, exported {exported}, dropped at shutdown {shutdown}");
    Ok(())
}

/// A collector without a metrics service: one log line, the signal tried again only after a
/// minute (not at every interval), counted; spans still go.
#[test]
fn collector_without_metrics_is_told_once() -> Result<()> {
    let (srv, port) = go_server("no-metrics")?;
    for kind in [Kind::Http, Kind::Grpc] {
        let rx = Receiver::start(kind, 0)?;
        rx.set_fault(Signal::Metrics, Some(Fault::Status { http: 404, retry_after: None }));
        let mut agent = start_agent(srv.pid(), &rx, &["--metrics", "on"], &[("OTEL_METRIC_EXPORT_INTERVAL", "300")])?;
        let mut client = Client::new(port);
        client.get("/users/1")?;
        rx.wait_for_attempts(Signal::Metrics, 1, Duration::from_secs(20))?;
        // Ten intervals.
        std::thread::sleep(Duration::from_secs(3));
        client.get("/users/2")?;
        rx.wait_for(2, Duration::from_secs(20))?;
        agent.stop()?;
        let tries = rx.attempts().iter().filter(|a| a.signal == Signal::Metrics).count();
        ensure!(tries == 1, "{kind:?}: metrics sent {tries} times to a collector that does not take them");
        let log = agent.proc.stderr_text();
        let told = log.lines().filter(|l| l.contains("does not accept this signal")).count();
        ensure!(told == 1, "{kind:?}: said {told} times:\n{log}");
        ensure!(agent.stat("metrics_unsupported") >= 5, "{kind:?}: {:?}", agent.stats().ok());
        assert_accounted(&agent);
    }
    Ok(())
}
