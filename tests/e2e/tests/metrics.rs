//! RED metrics and self-telemetry over OTLP, end to end: two traced Go services, requests
//! through them, and the histograms a real OTLP receiver got: per process (its resource),
//! per route (never the raw path), with errors typed; plus the agent's own counters.
use std::time::Duration;

use anyhow::Result;
use zerotrace_e2e::{
    agent::Agent,
    http::Client,
    otlp::{Kind, RMetric, Receiver},
    proc::{CausalPair, causal_pair, wait_until},
    tools::{self, GO_NEWEST},
};

/// The newest point of `name` whose attributes include all of `attrs`.
fn latest<'a>(ms: &'a [RMetric], name: &str, attrs: &[(&str, &str)]) -> Option<&'a RMetric> {
    ms.iter().filter(|m| m.name == name && attrs.iter().all(|(k, v)| m.attrs.get(*k).map(String::as_str) == Some(*v))).max_by_key(|m| m.time_ns)
}

#[test]
fn red_metrics_and_own_counters() -> Result<()> {
    let bin = tools::causal(GO_NEWEST)?;
    let CausalPair { front, down, front_port, down_port } = causal_pair(&bin, "metrics", "http", &|_| {})?;

    let rx = Receiver::start(Kind::Grpc, 0)?;
    let endpoint = rx.endpoint();
    let mut agent =
        Agent::start(&[front.pid(), down.pid()], &["--otlp-endpoint", endpoint.as_str(), "--batch-delay", "200ms"], &[("OTEL_METRIC_EXPORT_INTERVAL", "500")])?;
    let mut c = Client::new(front_port);
    for i in 0..10 {
        assert_eq!(c.get(&format!("/sync/{i}"))?.status, 200);
    }
    for i in 0..3 {
        assert_eq!(c.get(&format!("/err5xx/{i}"))?.status, 500);
    }
    let front_pid = front.pid().to_string();
    let done = || {
        let ms = rx.metrics();
        latest(&ms, "http.server.request.duration", &[("http.route", "/sync/")]).is_some_and(|m| m.count == 10)
            && latest(&ms, "http.server.request.duration", &[("http.route", "/err5xx/")]).is_some_and(|m| m.count == 3)
    };
    wait_until("the RED metrics", Duration::from_secs(20), done)?;
    agent.stop()?;
    let ms = rx.metrics();
    let sync = latest(&ms, "http.server.request.duration", &[("http.route", "/sync/")]).unwrap();
    assert_eq!(sync.unit, "s");
    assert_eq!(sync.resource.get("process.pid"), Some(&front_pid), "the front process's resource: {sync:?}");
    assert_eq!(sync.attrs.get("http.request.method").map(String::as_str), Some("GET"));
    assert_eq!(sync.attrs.get("http.response.status_code").map(String::as_str), Some("200"));
    assert!(sync.sum > 0.0 && sync.sum < 10.0, "{sync:?}");
    let failed = latest(&ms, "http.server.request.duration", &[("http.route", "/err5xx/")]).unwrap();
    assert_eq!(failed.attrs.get("error.type").map(String::as_str), Some("500"), "{failed:?}");
    // The downstream: /leaf/ 10 times, /status/ (503) 3 times, in its own process.
    let leaf = latest(&ms, "http.server.request.duration", &[("http.route", "/leaf/")]).unwrap();
    assert_eq!(leaf.count, 10);
    assert_eq!(leaf.resource.get("process.pid"), Some(&down.pid().to_string()));
    let calls = latest(&ms, "http.client.request.duration", &[("http.response.status_code", "200")]).unwrap();
    assert_eq!(calls.count, 10);
    assert_eq!(calls.attrs.get("server.port"), Some(&down_port.to_string()));
    assert!(!ms.iter().any(|m| m.attrs.contains_key("url.path") || m.attrs.contains_key("url.full")), "no raw paths");
    // The agent's own counters, under its own resource.
    let own = latest(&ms, "zerotrace_spans_assembled", &[]).expect("self-telemetry");
    assert_eq!(own.resource.get("service.name").map(String::as_str), Some("zerotrace"));
    assert!(own.value >= 13 * 3, "{own:?}");
    let procs = latest(&ms, "zerotrace_processes_traced", &[]).expect("processes traced");
    assert_eq!(procs.value, 2, "{procs:?}");
    Ok(())
}
