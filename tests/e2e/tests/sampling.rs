//! Sampling (OTEL_TRACES_SAMPLER), end to end over two traced Go processes: a ratio keeps
//! about its share of traces, always whole (the same decision for every span of a trace, in
//! both processes), by the rule the OpenTelemetry SDKs use on the trace id; a parent-based
//! sampler follows an incoming traceparent's sampled flag.
use std::{collections::HashMap, process::Command, time::Duration};

use anyhow::Result;
use zerotrace_e2e::{
    agent::Agent,
    http::Client,
    otlp::{Kind, Receiver},
    proc::{CausalPair, causal_pair},
    tools::{self, GO_NEWEST},
};

fn start() -> Result<CausalPair> {
    causal_pair(&tools::causal(GO_NEWEST)?, "sample", "http", &|_| {})
}

/// The TraceIdRatioBased rule: last 8 bytes of the id, big-endian, >> 1, below ratio x 2^63.
fn ratio_keeps(ratio: f64, trace_hex: &str) -> bool {
    let low = u64::from_str_radix(&trace_hex[16..32], 16).unwrap();
    (low >> 1) < (ratio * (1u64 << 63) as f64) as u64
}

#[test]
fn a_ratio_keeps_whole_traces_in_proportion() -> Result<()> {
    let p = start()?;
    let rx = Receiver::start(Kind::Grpc, 0)?;
    let endpoint = rx.endpoint();
    let mut agent = Agent::start(
        &[p.front.pid(), p.down.pid()],
        &["--otlp-endpoint", endpoint.as_str(), "--batch-delay", "200ms"],
        &[("OTEL_TRACES_SAMPLER", "traceidratio"), ("OTEL_TRACES_SAMPLER_ARG", "0.5")],
    )?;
    let n = 200;
    let mut c = Client::new(p.front_port);
    for i in 0..n {
        assert_eq!(c.get(&format!("/sync/{i}"))?.status, 200);
    }
    std::thread::sleep(Duration::from_secs(2));
    agent.stop()?;
    let spans = rx.spans();
    let mut traces: HashMap<&str, usize> = HashMap::new();
    for s in &spans {
        *traces.entry(s.trace_id.as_str()).or_default() += 1;
    }
    for (t, count) in &traces {
        assert_eq!(*count, 3, "trace {t} kept whole (front server, client, downstream server)");
        assert!(ratio_keeps(0.5, t), "trace {t} kept against the rule");
    }
    let kept = traces.len();
    // Binomial(200, 0.5): mean 100, sd 7.1; 5 sd either side.
    assert!((65..=135).contains(&kept), "kept {kept} of {n} traces");
    assert_eq!(agent.stat("spans_not_sampled"), 3 * (n - kept) as u64);
    assert_eq!(agent.stat("spans_assembled"), 3 * n as u64);
    Ok(())
}

#[test]
fn parent_based_follows_the_incoming_flag() -> Result<()> {
    let p = start()?;
    let rx = Receiver::start(Kind::Grpc, 0)?;
    let endpoint = rx.endpoint();
    let mut agent = Agent::start(
        &[p.front.pid(), p.down.pid()],
        &["--otlp-endpoint", endpoint.as_str(), "--batch-delay", "200ms"],
        &[("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"), ("OTEL_TRACES_SAMPLER_ARG", "0")],
    )?;
    let mut c = Client::new(p.front_port);
    let sampled = "4bf92f3577b34da6a3ce929d0e0e4736";
    let unsampled = "5bf92f3577b34da6a3ce929d0e0e4737";
    let tp = |t: &str, flags: &str| format!("00-{t}-00f067aa0ba902b7-{flags}");
    assert_eq!(c.request("GET", "/sync/1", &[("traceparent", &tp(sampled, "01"))])?.status, 200);
    assert_eq!(c.request("GET", "/sync/2", &[("traceparent", &tp(unsampled, "00"))])?.status, 200);
    assert_eq!(c.get("/sync/3")?.status, 200);
    rx.wait_for(3, Duration::from_secs(20))?;
    std::thread::sleep(Duration::from_millis(800));
    agent.stop()?;
    let spans = rx.spans();
    assert_eq!(spans.len(), 3, "only the sampled caller's trace: {spans:#?}");
    assert!(spans.iter().all(|s| s.trace_id == sampled));
    assert_eq!(agent.stat("spans_not_sampled"), 6);

    // A bad sampler is refused before anything is attached.
    let out = Command::new(tools::zerotrace_bin()?)
        .args(["run", "--pid", &p.front.pid().to_string()])
        .env("OTEL_TRACES_SAMPLER", "traceidratio")
        .env("OTEL_TRACES_SAMPLER_ARG", "1.5")
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("OTEL_TRACES_SAMPLER_ARG") && err.contains("0 to 1"), "{err}");
    Ok(())
}
