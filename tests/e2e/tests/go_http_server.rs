//! Go net/http server spans, end to end: a real Go service built with the oldest and the
//! newest supported Go, traced by PID by the real agent, requests driven over loopback, spans
//! read back from an OTLP receiver and checked one by one against what the client saw.
use std::time::Duration;

use anyhow::Result;
use zerotrace_e2e::{
    agent::Agent,
    http::{Client, Response},
    otlp::{Kind, RSpan, Receiver},
    proc::{start_server, start_server_env},
    tools::{self, GO_NEWEST, GO_OLDEST},
};

/// A request the test makes and what its span must say.
struct Case {
    path: &'static str,
    status: u16,
    /// Span name with Go 1.22+ patterns, and without (Go 1.21).
    name_with_pattern: &'static str,
    route: &'static str,
    name_without: &'static str,
    url_path: &'static str,
    /// The handler takes at least this long.
    min: Duration,
}

const CASES: &[Case] = &[
    Case { path: "/hello", status: 200, name_with_pattern: "GET /hello", route: "/hello", name_without: "GET /hello", url_path: "/hello", min: Duration::ZERO },
    Case {
        path: "/users/42",
        status: 200,
        name_with_pattern: "GET /users/{id}",
        route: "/users/{id}",
        name_without: "GET /users/42",
        url_path: "/users/42",
        min: Duration::ZERO,
    },
    Case {
        path: "/sleep?ms=30",
        status: 200,
        name_with_pattern: "GET /sleep",
        route: "/sleep",
        name_without: "GET /sleep",
        url_path: "/sleep",
        min: Duration::from_millis(30),
    },
    Case {
        path: "/status/503",
        status: 503,
        name_with_pattern: "GET /status/",
        route: "/status/",
        name_without: "GET /status/503",
        url_path: "/status/503",
        min: Duration::ZERO,
    },
    Case {
        path: "/status/404",
        status: 404,
        name_with_pattern: "GET /status/",
        route: "/status/",
        name_without: "GET /status/404",
        url_path: "/status/404",
        min: Duration::ZERO,
    },
    Case {
        path: "/nothing/here",
        status: 404,
        name_with_pattern: "GET /nothing/here",
        route: "",
        name_without: "GET /nothing/here",
        url_path: "/nothing/here",
        min: Duration::ZERO,
    },
];

struct Run {
    version: &'static str,
    pid: u32,
    port: u16,
    exe: String,
    sent: Vec<(&'static Case, Response)>,
    spans: Vec<RSpan>,
    agent: Agent,
}

/// Starts the service and the agent, sends every case `rounds` times (keep-alive, plus one
/// fresh connection per round), stops the agent and collects what the receiver got.
fn trace(version: &'static str, kind: Kind, extra: &[&str], rounds: usize) -> Result<Run> {
    trace_with(version, kind, extra, &[], rounds)
}

fn trace_with(version: &'static str, kind: Kind, extra: &[&str], env: &[(&str, &str)], rounds: usize) -> Result<Run> {
    let bin = tools::httpserver(version)?;
    let (srv, port) = start_server(&format!("httpserver-{version}"), &bin)?;
    let rx = Receiver::start(kind, 0)?;
    let proto = if kind == Kind::Grpc { "grpc" } else { "http/protobuf" };
    // The goroutine and channel hooks are off: these tests count the HTTP hooks' hits
    // exactly (go_causality.rs covers the others).
    let mut args = vec![
        "--otlp-endpoint",
        &*Box::leak(rx.endpoint().into_boxed_str()),
        "--otlp-protocol",
        proto,
        "--batch-delay",
        "200ms",
        "--go-spawns",
        "off",
        "--go-channels",
        "off",
    ];
    args.extend_from_slice(extra);
    let mut agent = Agent::start(&[srv.pid()], &args, env)?;
    let mut sent = Vec::new();
    let mut keep_alive = Client::new(port);
    for _ in 0..rounds {
        for case in CASES {
            let r = keep_alive.get(case.path)?;
            assert_eq!(r.status, case.status, "{}", case.path);
            sent.push((case, r));
        }
        // One request on a connection of its own, closed by the client afterwards.
        let mut fresh = Client::new(port);
        let r = fresh.request("GET", "/hello", &[("Connection", "close")])?;
        sent.push((&CASES[0], r));
    }
    let spans = rx.wait_for(sent.len(), Duration::from_secs(20))?;
    agent.stop()?;
    // Nothing more may arrive: exactly one span per request.
    std::thread::sleep(Duration::from_millis(300));
    let spans_after = rx.spans();
    assert_eq!(spans_after.len(), sent.len(), "one span per request, no more: {:#?}", names(&spans_after));
    let _ = spans;
    let exe = bin.display().to_string();
    drop(srv);
    Ok(Run { version, pid: 0, port, exe, sent, spans: spans_after, agent }).map(|mut r| {
        r.pid = r.spans.first().and_then(|s| s.res("process.pid").parse().ok()).unwrap_or(0);
        r
    })
}

fn names(spans: &[RSpan]) -> Vec<&str> {
    spans.iter().map(|s| s.name.as_str()).collect()
}

/// Checks every span against the request it belongs to (requests were sequential, so the
/// n-th span by start time is the n-th request).
fn check(run: &Run, with_patterns: bool) {
    let mut spans = run.spans.clone();
    spans.sort_by_key(|s| s.start_ns);
    for ((case, resp), span) in run.sent.iter().zip(&spans) {
        let ctx = format!("Go {} {} -> {span:#?}", run.version, case.path);
        let (name, route) = if with_patterns { (case.name_with_pattern, case.route) } else { (case.name_without, "") };
        assert_eq!(span.name, name, "{ctx}");
        assert_eq!(span.kind, 2, "SERVER kind: {ctx}");
        assert_eq!(span.attr("http.route"), route, "{ctx}");
        assert_eq!(span.attr("http.request.method"), "GET", "{ctx}");
        assert_eq!(span.attr("url.path"), case.url_path, "{ctx}");
        assert_eq!(span.attr("url.scheme"), "http", "{ctx}");
        assert_eq!(span.attr("http.response.status_code"), case.status.to_string(), "{ctx}");
        assert_eq!(span.attr("server.port"), run.port.to_string(), "{ctx}");
        assert_eq!(span.attr("network.peer.address"), "127.0.0.1", "{ctx}");
        assert_eq!(span.attr("network.peer.port"), resp.local_port.to_string(), "{ctx}");
        assert_eq!(span.attr("user_agent.original"), "zerotrace-e2e/1", "{ctx}");
        assert_eq!(span.status, if case.status >= 500 { 2 } else { 0 }, "5xx is an error: {ctx}");
        assert!(span.parent_span_id.is_empty(), "{ctx}");
        assert_eq!(span.trace_id.len(), 32);
        // The span lies inside what the client measured, and covers the handler's own time.
        assert!(span.duration() <= resp.elapsed, "span {:?} longer than client {:?}: {ctx}", span.duration(), resp.elapsed);
        assert!(span.duration() >= case.min, "span {:?} shorter than the handler's {:?}: {ctx}", span.duration(), case.min);
        assert!(resp.elapsed - span.duration() < Duration::from_millis(25), "client {:?} vs span {:?}: {ctx}", resp.elapsed, span.duration());
        // Wall-clock times, close to now.
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
        assert!(span.start_ns < now && now - span.start_ns < 600_000_000_000, "{ctx}");
    }
    let r = &spans[0];
    let exe_name = std::path::Path::new(&run.exe).file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(r.res("service.name"), exe_name);
    assert_eq!(r.res("process.executable.name"), exe_name);
    assert_eq!(r.res("process.executable.path"), run.exe);
    assert_eq!(r.res("process.runtime.name"), "go");
    assert_eq!(r.res("process.runtime.version"), format!("go{}", run.version));
    assert_eq!(r.res("telemetry.distro.name"), "zerotrace");
    assert!(!r.res("host.name").is_empty());
    assert!(run.pid > 0);
    assert_eq!(r.scope, "zerotrace");
}

#[test]
fn newest_go_server_spans_over_grpc() -> Result<()> {
    let run = trace(GO_NEWEST, Kind::Grpc, &[], 3)?;
    check(&run, true);
    // The default probes cost one uprobe hit per connection (placed after the stack-growth
    // check, so a growing goroutine stack does not make it fire twice), none per request.
    let hits = run.agent.stat("uprobe_hits");
    let connections = 1 + 3;
    assert_eq!(hits, connections, "uprobe hits for {connections} connections and {} requests", run.sent.len());
    Ok(())
}

/// Every supported Go minor version gives the same spans (struct layouts differ between
/// them: g.goid moved in 1.23 and back in 1.25, response.status in 1.27, Pattern came in 1.23).
#[test]
fn every_go_version_gives_the_same_spans() -> Result<()> {
    for version in tools::GO_MATRIX {
        let run = trace(version, Kind::Grpc, &[], 1)?;
        check(&run, *version != GO_OLDEST);
        let connections = 2;
        assert_eq!(run.agent.stat("uprobe_hits"), connections, "Go {version}: one uprobe hit per connection");
        // Handler probes read the Go structs themselves (method, path, status, pattern).
        let run = trace(version, Kind::Grpc, &["--go-http-probes", "handler"], 1)?;
        check(&run, *version != GO_OLDEST);
        assert_eq!(run.agent.stat("uprobe_hits"), 2 * run.sent.len() as u64, "Go {version}: entry + RET per request");
    }
    Ok(())
}

#[test]
fn oldest_go_server_spans_over_http_protobuf() -> Result<()> {
    let run = trace(GO_OLDEST, Kind::Http, &[], 2)?;
    check(&run, false);
    Ok(())
}

/// The fallback for kernels that refuse BTF tracing programs gives the same spans.
#[test]
fn raw_tracepoint_hooks_give_the_same_spans() -> Result<()> {
    let run = trace(GO_NEWEST, Kind::Grpc, &["--socket-hooks", "raw"], 2)?;
    assert!(run.agent.proc.stderr_text().contains("socket_hooks=\"socket-raw\""), "{}", run.agent.proc.stderr_text());
    check(&run, true);
    Ok(())
}

/// Linux 7.0+ gives the socket-btf programs twins for the runs the kernel skips; forced on
/// here, where the kernel skips none, they must change nothing: every span once, nothing
/// rescued.
#[test]
fn twin_programs_change_nothing_where_nothing_is_skipped() -> Result<()> {
    let run = trace_with(GO_NEWEST, Kind::Grpc, &["--socket-hooks", "btf"], &[("ZEROTRACE_RUN_TWINS", "on")], 2)?;
    let log = run.agent.proc.stderr_text();
    assert!(log.contains("run_twins=true") && log.contains("socket_hooks=\"socket-btf\""), "{log}");
    check(&run, true);
    assert_eq!(run.agent.stat("kernel_runs_rescued"), 0);
    assert_eq!(run.agent.stat("kernel_runs_skipped"), 0);
    Ok(())
}

#[test]
fn handler_probes_give_the_same_spans() -> Result<()> {
    for version in [GO_OLDEST, GO_NEWEST] {
        let run = trace(version, Kind::Grpc, &["--go-http-probes", "handler"], 2)?;
        check(&run, version != GO_OLDEST);
        // Exactly entry + RET per request.
        let hits = run.agent.stat("uprobe_hits");
        let requests = run.sent.len() as u64;
        assert_eq!(hits, 2 * requests, "two uprobe hits per request");
        assert_eq!(run.agent.stat("handler_returns_unmatched"), 0);
    }
    Ok(())
}

#[test]
fn a_keep_alive_connection_opened_before_the_agent() -> Result<()> {
    let (srv, port) = start_server("httpserver", &tools::httpserver(GO_NEWEST)?)?;
    let mut client = Client::new(port);
    let local = client.connect()?;
    assert_eq!(client.get("/hello")?.status, 200);
    let rx = Receiver::start(Kind::Grpc, 0)?;
    let endpoint = rx.endpoint();
    let mut agent = Agent::start(&[srv.pid()], &["--otlp-endpoint", &endpoint, "--batch-delay", "200ms", "--go-spawns", "off", "--go-channels", "off"], &[])?;
    assert!(agent.proc.stderr_text().contains("existing_connections=1"), "{}", agent.proc.stderr_text());
    for i in 0..5 {
        let r = client.get(&format!("/users/{i}"))?;
        assert_eq!(r.local_port, local, "same connection as before the agent");
    }
    let spans = rx.wait_for(5, Duration::from_secs(15))?;
    // The catch-up probe ties the connection to its Go conn at its first request, then goes.
    std::thread::sleep(Duration::from_millis(1500));
    for i in 5..25 {
        client.get(&format!("/users/{i}"))?;
    }
    let spans_later = rx.wait_for(25, Duration::from_secs(15))?;
    agent.stop()?;
    assert_eq!(rx.spans().len(), 25, "the request made before the agent is not reported, the rest are");
    for s in spans.iter().chain(&spans_later) {
        assert_eq!(s.name, "GET /users/{id}", "route known on a connection that predates the agent");
        assert_eq!(s.attr("network.peer.port"), local.to_string());
    }
    // Without removal the catch-up probe would fire for each of the 25 requests; it may fire
    // for the first 5 (made before the agent's next housekeeping tick), twice at most each.
    let hits = agent.stat("uprobe_hits");
    assert!(hits <= 10, "catch-up probe removed after use: {hits} uprobe hits for 25 requests");
    Ok(())
}

#[test]
fn concurrent_clients_do_not_mix() -> Result<()> {
    // The service's own OpenTelemetry environment names it.
    let env = [("OTEL_SERVICE_NAME", "orders"), ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=test,team=shop")];
    let (srv, port) = start_server_env("httpserver", &tools::httpserver(GO_NEWEST)?, &env)?;
    let rx = Receiver::start(Kind::Grpc, 0)?;
    let endpoint = rx.endpoint();
    let mut agent = Agent::start(&[srv.pid()], &["--otlp-endpoint", &endpoint, "--batch-delay", "200ms"], &[])?;
    const THREADS: usize = 8;
    const EACH: usize = 25;
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            std::thread::spawn(move || -> Result<(u16, Vec<String>)> {
                let mut c = Client::new(port);
                let local = c.connect()?;
                let mut paths = Vec::new();
                for i in 0..EACH {
                    let p = if i % 5 == 4 { format!("/sleep?ms={}", t + 1) } else { format!("/users/t{t}-{i}") };
                    assert_eq!(c.get(&p)?.status, 200);
                    paths.push(p);
                }
                Ok((local, paths))
            })
        })
        .collect();
    let sent: Vec<(u16, Vec<String>)> = handles.into_iter().map(|h| h.join().expect("client thread")).collect::<Result<_>>()?;
    rx.wait_for(THREADS * EACH, Duration::from_secs(20))?;
    agent.stop()?;
    let spans = rx.spans();
    assert_eq!(spans.len(), THREADS * EACH, "exactly one span per request");
    for (local, paths) in &sent {
        let mut mine: Vec<_> = spans.iter().filter(|s| s.attr("network.peer.port") == local.to_string()).collect();
        mine.sort_by_key(|s| s.start_ns);
        let got: Vec<String> = mine.iter().map(|s| s.attr("url.path").to_owned()).collect();
        let want: Vec<String> = paths.iter().map(|p| p.split('?').next().unwrap().to_owned()).collect();
        assert_eq!(got, want, "each connection's spans are its own requests, in order");
    }
    let ids: std::collections::HashSet<_> = spans.iter().map(|s| &s.span_id).collect();
    assert_eq!(ids.len(), spans.len(), "no duplicate spans");
    assert_eq!(spans[0].res("service.name"), "orders");
    assert_eq!(spans[0].res("deployment.environment.name"), "test");
    assert_eq!(spans[0].res("team"), "shop");
    Ok(())
}
