//! grpc-go servers and clients, end to end: a Go service (tests/e2e/go/grpcshop, grpc-go
//! v1.67.1 built from the offline module sources) serves grpc-go's interop TestService; its
//! own client mode, traced too, calls it (OK, NOT_FOUND, past a deadline, a server stream,
//! a method the server does not have, then 100 calls at once on one connection). Each RPC
//! is one CLIENT span and one SERVER span under it (linked by connection and stream id,
//! no header), named `package.Service/Method` with the current RPC conventions, and the
//! HTTP call the handler makes sits under the server's. Oldest and newest Go, and the
//! newest stripped as a PIE. Across languages: a tonic client on the same host is the
//! parent of the grpc-go spans it caused, and a grpc-go client of the tonic spans.
use std::{collections::BTreeSet, process::Command, time::Duration};

use anyhow::Result;
use zerotrace_e2e::{
    agent::Agent,
    otlp::{Kind, RSpan, Receiver},
    proc::{Proc, free_port, wait_for_port, wait_until},
    tools::{self, GO_NEWEST, GO_OLDEST},
};

const SERVER: i32 = 2;
const CLIENT: i32 = 3;
const UNARY: &str = "grpc.testing.TestService/UnaryCall";
const CONCURRENT: usize = 100;

/// grpcshop `bin` serving gRPC and its HTTP route, both listening: it and its gRPC port.
fn serve(bin: &std::path::Path) -> Result<(Proc, u16)> {
    let (grpc_port, http_port) = (free_port(), free_port());
    let mut cmd = Command::new(bin);
    cmd.args(["serve", &format!("127.0.0.1:{grpc_port}"), &format!("127.0.0.1:{http_port}")]).env("OTEL_SERVICE_NAME", "grpcshop");
    let server = Proc::spawn("grpcshop", cmd)?;
    wait_for_port(grpc_port, Duration::from_secs(30))?;
    wait_for_port(http_port, Duration::from_secs(30))?;
    Ok((server, grpc_port))
}

fn run(version: &str, tag: &str, flags: &[&str]) -> Result<()> {
    let ctx = format!("Go {version}{tag}");
    let bin = tools::grpcshop(version, tag, flags)?;
    let (server, grpc_port) = serve(&bin)?;
    let rx = Receiver::start(Kind::Grpc, 0)?;
    let endpoint = rx.endpoint();
    let start = tools::work_dir().join("logs").join(format!("grpc-call-{}{tag}-{}", version, std::process::id()));
    let _ = std::fs::remove_file(&start);
    let mut cmd = Command::new(&bin);
    cmd.args(["call", &format!("127.0.0.1:{grpc_port}"), &CONCURRENT.to_string()]).arg(&start).env("OTEL_SERVICE_NAME", "grpcshop-client");
    let mut client = Proc::spawn("grpcshop-client", cmd)?;
    let mut agent =
        Agent::start(&[server.pid(), client.pid()], &["--otlp-endpoint", &endpoint, "--batch-delay", "200ms"], &[("OTEL_METRIC_EXPORT_INTERVAL", "500")])?;
    let log = agent.proc.stderr_text();
    // Offsets from the program's DWARF, or from the grpc version when it has none; both
    // sides hooked in each (the client mode links the server too).
    let source = if tag.contains("stripped") { "grpc_spans=\"v1.67\"" } else { "grpc_spans=\"dwarf\"" };
    assert_eq!(log.matches(source).count(), 2, "{ctx}: {log}");
    assert_eq!(log.matches("grpc_client=true").count(), 2, "{ctx}: {log}");
    assert!(!log.contains("layout differs"), "{ctx}: {log}");
    std::fs::write(&start, b"go")?;
    anyhow::ensure!(client.wait_timeout(Duration::from_secs(30)).is_some_and(|s| s.success()), "{ctx}: client: {}", client.stderr_text());
    let said = client.stdout_text();
    let _ = std::fs::remove_file(&start);
    assert_eq!(
        said.lines().collect::<Vec<_>>(),
        [
            "ok OK",
            "notfound NotFound",
            "deadline DeadlineExceeded",
            "stream 3 OK",
            "unimplemented Unimplemented",
            "unknown service Unimplemented",
            &format!("concurrent {CONCURRENT}")
        ],
        "{ctx}"
    );
    // 106 RPCs; the 101 that succeed each make an HTTP call to the same process (a client
    // span and the /leaf/ server span).
    let rpcs = 6 + CONCURRENT;
    let ok_unary = 1 + CONCURRENT;
    let want = 2 * rpcs + 2 * ok_unary;
    rx.wait_for(want, Duration::from_secs(30))?;
    let count_ok = |ms: &[zerotrace_e2e::otlp::RMetric]| {
        ms.iter()
            .filter(|m| m.name == "rpc.server.call.duration" && m.attr("rpc.method") == UNARY && m.attr("rpc.response.status_code") == "OK")
            .max_by_key(|m| m.time_ns)
            .map(|m| m.count)
    };
    let client_ok = |ms: &[zerotrace_e2e::otlp::RMetric]| {
        ms.iter()
            .filter(|m| m.name == "rpc.client.call.duration" && m.attr("rpc.method") == UNARY && m.attr("rpc.response.status_code") == "OK")
            .max_by_key(|m| m.time_ns)
            .map(|m| m.count)
    };
    let metrics_done = wait_until("the RPC metrics", Duration::from_secs(20), || {
        let ms = rx.metrics();
        count_ok(&ms) == Some(ok_unary as u64) && client_ok(&ms) == Some(ok_unary as u64)
    });
    if metrics_done.is_err() {
        let ms = rx.metrics();
        let names: BTreeSet<(&str, &str, &str, u64)> = ms
            .iter()
            .filter(|m| m.name.starts_with("rpc."))
            .map(|m| (m.name.as_str(), m.attr("rpc.method"), m.attr("rpc.response.status_code"), m.count))
            .collect();
        panic!("{ctx}: RPC metrics {names:#?}");
    }
    agent.stop()?;
    let spans = rx.spans();
    assert_eq!(spans.len(), want, "{ctx}: {:#?}", spans.iter().map(|s| (&s.name, s.kind, s.attr("rpc.response.status_code"))).collect::<Vec<_>>());
    let rpc: Vec<&RSpan> = spans.iter().filter(|s| s.kind == SERVER && s.attr("rpc.system.name") == "grpc").collect();
    assert_eq!(rpc.len(), rpcs, "{ctx}");
    let by_code = |code: &str| rpc.iter().filter(|s| s.attr("rpc.response.status_code") == code).copied().collect::<Vec<_>>();
    let ok = by_code("OK");
    assert_eq!(ok.len(), ok_unary + 1, "{ctx}: the unary calls and the stream");
    let mut leaf_paths = BTreeSet::new();
    for s in &ok {
        assert_eq!((s.status, s.attr("error.type")), (0, ""), "{ctx}: {s:#?}");
        if s.name == "grpc.testing.TestService/StreamingOutputCall" {
            continue;
        }
        assert_eq!((s.name.as_str(), s.attr("rpc.method")), (UNARY, UNARY), "{ctx}: {s:#?}");
        // The handler's HTTP call is its one child, in its trace, within its time.
        let kids: Vec<&RSpan> = spans.iter().filter(|k| k.parent_span_id == s.span_id).collect();
        assert_eq!(kids.len(), 1, "{ctx}: {s:#?} {kids:#?}");
        let k = kids[0];
        assert_eq!((k.kind, k.trace_id.as_str()), (CLIENT, s.trace_id.as_str()), "{ctx}: {k:#?}");
        assert!(s.start_ns <= k.start_ns && k.end_ns <= s.end_ns, "{ctx}: {s:#?} {k:#?}");
        let path = k.attr("url.full").rsplit_once('/').map(|(_, id)| id.to_owned()).unwrap_or_default();
        assert!(leaf_paths.insert(path), "{ctx}: two RPCs with the same downstream call: {k:#?}");
    }
    let want_paths: BTreeSet<String> = std::iter::once(1).chain(100..100 + CONCURRENT).map(|i| i.to_string()).collect();
    assert_eq!(leaf_paths, want_paths, "{ctx}: every call's downstream request under its own RPC");
    let not_found = by_code("NOT_FOUND");
    assert_eq!(not_found.len(), 1, "{ctx}");
    assert_eq!((not_found[0].status, not_found[0].attr("error.type")), (0, ""), "{ctx}: NOT_FOUND is no server error");
    // Past its deadline: the server's own timer (from grpc-timeout) ends the handler with
    // DEADLINE_EXCEEDED, a server error, unless the client's reset arrives first: then
    // the handler's context is cancelled (CANCELLED, no server error). Both are races a
    // real server runs; either way the span lasts until the deadline.
    let late: Vec<&RSpan> = rpc.iter().filter(|s| matches!(s.attr("rpc.response.status_code"), "DEADLINE_EXCEEDED" | "CANCELLED")).copied().collect();
    assert_eq!(late.len(), 1, "{ctx}");
    let l = late[0];
    let failed = l.attr("rpc.response.status_code") == "DEADLINE_EXCEEDED";
    assert_eq!((l.status, l.attr("error.type")), if failed { (2, "DEADLINE_EXCEEDED") } else { (0, "") }, "{ctx}: {l:#?}");
    assert!(l.duration() >= Duration::from_millis(90), "{ctx}: {l:#?}");
    // A method the service stubs out, and a service the server does not have (grpc-go
    // answers it in handleStream itself).
    let mut unknown = by_code("UNIMPLEMENTED");
    unknown.sort_by_key(|s| s.start_ns);
    let got: Vec<(&str, &str, &str)> = unknown.iter().map(|u| (u.name.as_str(), u.attr("rpc.method"), u.attr("rpc.method_original"))).collect();
    assert_eq!(got, [("grpc", "_OTHER", "grpc.testing.TestService/UnimplementedCall"), ("grpc", "_OTHER", "x.Nope/Method")], "{ctx}");
    for u in unknown {
        assert_eq!((u.status, u.attr("error.type")), (2, "UNIMPLEMENTED"), "{ctx}");
    }
    // Each server span sits under the client span of its call: same trace, same method,
    // same code (but for the race above), within its time.
    let calls: Vec<&RSpan> = spans.iter().filter(|s| s.kind == CLIENT && s.attr("rpc.system.name") == "grpc").collect();
    assert_eq!(calls.len(), rpcs, "{ctx}");
    let slack = Duration::from_millis(2).as_nanos() as u64;
    for s in &rpc {
        let c = calls.iter().find(|c| c.span_id == s.parent_span_id);
        let Some(c) = c else { panic!("{ctx}: a server span under no client call: {s:#?}") };
        assert_eq!(
            (c.trace_id.as_str(), c.name.as_str(), c.attr("rpc.method")),
            (s.trace_id.as_str(), s.name.as_str(), s.attr("rpc.method")),
            "{ctx}: {c:#?} {s:#?}"
        );
        assert!(c.parent_span_id.is_empty(), "{ctx}: the client's calls start their traces: {c:#?}");
        assert!(c.start_ns <= s.start_ns + slack && s.end_ns <= c.end_ns + slack, "{ctx}: {c:#?} {s:#?}");
        assert_eq!((c.attr("server.address"), c.attr("server.port")), ("127.0.0.1", grpc_port.to_string().as_str()), "{ctx}: {c:#?}");
        assert_eq!(c.res("service.name"), "grpcshop-client");
        let code = c.attr("rpc.response.status_code");
        if code != "DEADLINE_EXCEEDED" {
            assert_eq!(code, s.attr("rpc.response.status_code"), "{ctx}: {c:#?} {s:#?}");
        }
        // On a client every code but OK is an error.
        assert_eq!((c.status == 2, c.attr("error.type") == code), (code != "OK", code != "OK"), "{ctx}: {c:#?}");
    }
    let codes: BTreeSet<&str> = calls.iter().map(|c| c.attr("rpc.response.status_code")).collect();
    assert_eq!(codes, ["DEADLINE_EXCEEDED", "NOT_FOUND", "OK", "UNIMPLEMENTED"].into_iter().collect(), "{ctx}");
    Ok(())
}

#[test]
fn grpc_server_oldest_go() -> Result<()> {
    run(GO_OLDEST, "", &[])
}

#[test]
fn grpc_server_newest_go() -> Result<()> {
    run(GO_NEWEST, "", &[])
}

#[test]
fn grpc_server_stripped_pie() -> Result<()> {
    run(GO_NEWEST, "-stripped-pie", &["-buildmode=pie", "-ldflags=-s -w"])
}

/// Across languages on one host, with no header: a tonic client (rust-svc, traced at the
/// socket level) calls the grpc-go server's Echo service twelve times on one connection,
/// three at a time; each call's grpc-go SERVER span is the child of the tonic CLIENT span
/// of the same stream, in its trace, with the same code and the connection's addresses.
#[test]
fn tonic_client_to_grpc_go_server() -> Result<()> {
    let (server, grpc_port) = serve(&tools::grpcshop(GO_NEWEST, "", &[])?)?;
    let start = tools::work_dir().join("logs").join(format!("tonic-to-go-start-{}", std::process::id()));
    let _ = std::fs::remove_file(&start);
    let mut cmd = Command::new(tools::rust_svc()?);
    cmd.args(["grpc-call", &format!("http://127.0.0.1:{grpc_port}"), "unary", "12", "3"]).arg(&start).env("OTEL_SERVICE_NAME", "tonic-client");
    let mut client = Proc::spawn("tonic-client", cmd)?;
    let rx = Receiver::start(Kind::Grpc, 0)?;
    let endpoint = rx.endpoint();
    let mut agent = Agent::start(&[server.pid(), client.pid()], &["--otlp-endpoint", &endpoint, "--batch-delay", "200ms"], &[])?;
    std::fs::write(&start, b"go")?;
    anyhow::ensure!(client.wait_timeout(Duration::from_secs(30)).is_some_and(|s| s.success()), "tonic client: {}", client.stderr_text());
    rx.wait_for(24, Duration::from_secs(30))?;
    agent.stop()?;
    let spans = rx.spans();
    assert_eq!(spans.len(), 24, "{spans:#?}");
    let calls: Vec<&RSpan> = spans.iter().filter(|s| s.kind == CLIENT && s.res("service.name") == "tonic-client").collect();
    assert_eq!(calls.len(), 12);
    // Call i asks for [OK, NOT_FOUND, INTERNAL][i % 3]: four of each.
    for code in ["OK", "NOT_FOUND", "INTERNAL"] {
        assert_eq!(calls.iter().filter(|c| c.attr("rpc.response.status_code") == code).count(), 4, "{code}: {calls:#?}");
    }
    // The two ends' times come from different records: a little slack.
    let slack = Duration::from_millis(2).as_nanos() as u64;
    for (i, c) in calls.iter().enumerate() {
        let code = c.attr("rpc.response.status_code");
        let served: Vec<&RSpan> = spans.iter().filter(|s| s.kind == SERVER && s.parent_span_id == c.span_id).collect();
        assert_eq!(served.len(), 1, "call {i}: one grpc-go span under the tonic call: {c:#?} {spans:#?}");
        let s = served[0];
        assert_eq!(s.res("service.name"), "grpcshop");
        assert_eq!(s.trace_id, c.trace_id);
        for x in [*c, s] {
            assert_eq!(
                (x.name.as_str(), x.attr("rpc.method"), x.attr("rpc.response.status_code")),
                ("zerotrace.test.v1.Echo/Unary", "zerotrace.test.v1.Echo/Unary", code),
                "call {i}: {x:#?}"
            );
        }
        assert_eq!(s.status == 2, code == "INTERNAL", "a server error only for INTERNAL: {s:#?}");
        assert!(c.start_ns <= s.start_ns + slack && s.end_ns <= c.end_ns + slack, "call {i}: {c:#?} {s:#?}");
        assert_eq!((s.attr("server.address"), s.attr("server.port")), ("127.0.0.1", grpc_port.to_string().as_str()), "{s:#?}");
        assert_eq!(s.attr("network.peer.address"), "127.0.0.1");
    }
    Ok(())
}

/// A grpc-go client is the parent of the tonic server spans it caused: its record names
/// the connection and stream id, and the tonic server's stream, read at the socket, is
/// found by them. 12 calls, 3 at a time on one connection: OK, NOT_FOUND, INTERNAL in turn.
#[test]
fn grpc_go_client_to_tonic_server() -> Result<()> {
    let port = free_port();
    let mut cmd = Command::new(tools::rust_svc()?);
    cmd.args(["grpc", &format!("127.0.0.1:{port}")]).env("OTEL_SERVICE_NAME", "tonic-server");
    let server = Proc::spawn("tonic-server", cmd)?;
    wait_for_port(port, Duration::from_secs(10))?;
    let start = tools::work_dir().join("logs").join(format!("go-to-tonic-start-{}", std::process::id()));
    let _ = std::fs::remove_file(&start);
    let mut cmd = Command::new(tools::grpcshop(GO_NEWEST, "", &[])?);
    cmd.args(["echo", &format!("127.0.0.1:{port}"), "12"]).arg(&start).env("OTEL_SERVICE_NAME", "grpcshop-client");
    let mut client = Proc::spawn("grpcshop-client", cmd)?;
    let rx = Receiver::start(Kind::Grpc, 0)?;
    let endpoint = rx.endpoint();
    let mut agent = Agent::start(&[server.pid(), client.pid()], &["--otlp-endpoint", &endpoint, "--batch-delay", "200ms"], &[])?;
    std::fs::write(&start, b"go")?;
    anyhow::ensure!(client.wait_timeout(Duration::from_secs(30)).is_some_and(|s| s.success()), "grpc-go client: {}", client.stderr_text());
    let _ = std::fs::remove_file(&start);
    let said = client.stdout_text();
    let want: Vec<String> = (0..12).map(|i| format!("{i} {}", ["OK", "NotFound", "Internal"][i % 3])).collect();
    assert_eq!(said.lines().collect::<Vec<_>>(), want);
    rx.wait_for(24, Duration::from_secs(30))?;
    agent.stop()?;
    let spans = rx.spans();
    assert_eq!(spans.len(), 24, "{spans:#?}");
    let calls: Vec<&RSpan> = spans.iter().filter(|s| s.kind == CLIENT && s.res("service.name") == "grpcshop-client").collect();
    assert_eq!(calls.len(), 12);
    let slack = Duration::from_millis(2).as_nanos() as u64;
    for (i, c) in calls.iter().enumerate() {
        let code = c.attr("rpc.response.status_code");
        let served: Vec<&RSpan> = spans.iter().filter(|s| s.kind == SERVER && s.parent_span_id == c.span_id).collect();
        assert_eq!(served.len(), 1, "call {i}: one tonic span under the grpc-go call: {c:#?} {spans:#?}");
        let s = served[0];
        assert_eq!(s.res("service.name"), "tonic-server");
        assert_eq!(s.trace_id, c.trace_id);
        for x in [*c, s] {
            assert_eq!(
                (x.name.as_str(), x.attr("rpc.method"), x.attr("rpc.response.status_code")),
                ("zerotrace.test.v1.Echo/Unary", "zerotrace.test.v1.Echo/Unary", code),
                "call {i}: {x:#?}"
            );
        }
        assert_eq!(c.status == 2, code != "OK", "a client error for every code but OK: {c:#?}");
        assert!(c.start_ns <= s.start_ns + slack && s.end_ns <= c.end_ns + slack, "call {i}: {c:#?} {s:#?}");
        assert_eq!((c.attr("server.address"), c.attr("server.port")), ("127.0.0.1", port.to_string().as_str()), "{c:#?}");
    }
    for code in ["OK", "NOT_FOUND", "INTERNAL"] {
        assert_eq!(calls.iter().filter(|c| c.attr("rpc.response.status_code") == code).count(), 4, "{code}: {calls:#?}");
    }
    Ok(())
}

/// A call's incoming `traceparent` metadata roots the grpc-go server's span (its client is
/// not traced): the kernel reads it from the stream's metadata map, a hash map on Go 1.21
/// and a Swiss table on 1.27.
#[test]
fn grpc_incoming_traceparent() -> Result<()> {
    let (trace, parent) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    for version in [GO_OLDEST, GO_NEWEST] {
        let bin = tools::grpcshop(version, "", &[])?;
        let (server, grpc_port) = serve(&bin)?;
        let rx = Receiver::start(Kind::Grpc, 0)?;
        let endpoint = rx.endpoint();
        let mut agent = Agent::start(&[server.pid()], &["--otlp-endpoint", &endpoint, "--batch-delay", "200ms"], &[])?;
        let out = Command::new(&bin)
            .args(["echo", &format!("127.0.0.1:{grpc_port}"), "3"])
            .env("GRPCSHOP_TRACEPARENT", format!("00-{trace}-{parent}-01"))
            .output()?;
        assert!(out.status.success(), "Go {version}: {}", String::from_utf8_lossy(&out.stderr));
        rx.wait_for(3, Duration::from_secs(20))?;
        agent.stop()?;
        let spans = rx.spans();
        assert_eq!(spans.len(), 3, "Go {version}: {spans:#?}");
        for s in &spans {
            assert_eq!((s.kind, s.trace_id.as_str(), s.parent_span_id.as_str()), (SERVER, trace, parent), "Go {version}: {s:#?}");
        }
        drop(server);
    }
    Ok(())
}
