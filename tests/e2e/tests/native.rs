//! Native processes (not Go) traced from their sockets: Rust services (tokio, axum, reqwest; tests/rust-svc) traced
//! with zero code changes at the socket level, next to Go services traced by uprobes. No
//! service propagates headers: every parent/child link below comes from the agent (the
//! kernel's same-host flow links across processes, "one open server request" inside a
//! Rust process). Spans are read back from a real OTLP receiver.
use std::{collections::HashMap, process::Command, time::Duration};

use anyhow::{Result, ensure};
use zerotrace_e2e::{
    agent::Agent,
    http::Client,
    netns::Netns,
    otlp::{Kind, RSpan, Receiver},
    proc::{Proc, free_port, wait_for_port},
    tools::{self, GO_NEWEST},
};

const SERVER: i32 = 2;
const CLIENT: i32 = 3;

/// A Rust service on a fresh port, named `name` (OTEL_SERVICE_NAME in its environment, which
/// the agent reads), calling `down` if given.
fn rust_service(name: &str, down: Option<&str>) -> Result<(Proc, u16)> {
    let port = free_port();
    let mut cmd = Command::new(tools::rust_svc()?);
    cmd.arg(format!("127.0.0.1:{port}")).args(down).env("OTEL_SERVICE_NAME", name);
    let p = Proc::spawn(name, cmd)?;
    wait_for_port(port, Duration::from_secs(10))?;
    Ok((p, port))
}

fn go_service(name: &str, down: &str) -> Result<(Proc, u16)> {
    let port = free_port();
    let mut cmd = Command::new(tools::causal(GO_NEWEST)?);
    cmd.arg(format!("127.0.0.1:{port}")).arg(down).env("OTEL_SERVICE_NAME", name);
    let p = Proc::spawn(name, cmd)?;
    wait_for_port(port, Duration::from_secs(10))?;
    Ok((p, port))
}

fn agent(pids: &[u32], rx: &Receiver) -> Result<Agent> {
    let endpoint = rx.endpoint();
    Agent::start(pids, &["--otlp-endpoint", endpoint.as_str(), "--batch-delay", "200ms"], &[])
}

/// `client` (the Rust test service, maybe inside a network namespace) named `name` GETs
/// `url` followed by 0..n over one connection once the agent traces it and `server`; the
/// spans of both sides (`2 * n`, waited for up to `wait`).
fn traced_gets(mut client: Command, name: &str, url: &str, n: usize, server: &Proc, rx: &Receiver, wait: Duration) -> Result<Vec<RSpan>> {
    let start = start_file(name);
    client.args(["get", url, &n.to_string()]).arg(&start).env("OTEL_SERVICE_NAME", name);
    let mut client = Proc::spawn(name, client)?;
    let mut agent = agent(&[server.pid(), client.pid()], rx)?;
    std::fs::write(&start, b"go")?;
    let st = client.wait_timeout(Duration::from_secs(60)).expect("the client finishes");
    ensure!(st.success(), "client failed: {}", client.stderr_text());
    let spans = rx.wait_for(2 * n, wait)?;
    agent.stop()?;
    Ok(spans)
}

/// The one span that matches, with a readable failure.
fn one<'a>(spans: &'a [RSpan], what: &str, f: impl Fn(&RSpan) -> bool) -> &'a RSpan {
    let found: Vec<&RSpan> = spans.iter().filter(|s| f(s)).collect();
    assert_eq!(found.len(), 1, "exactly one {what}, got {}: {found:#?}", found.len());
    found[0]
}

fn within(child: &RSpan, parent: &RSpan) -> bool {
    child.start_ns >= parent.start_ns && child.end_ns <= parent.end_ns
}

/// HTTP client -> Rust (axum, reqwest) -> Go (net/http) -> Rust: one trace per request, five
/// spans in a line, over connections each service keeps alive between requests.
#[test]
fn rust_go_rust_chain_is_one_trace_without_headers() -> Result<()> {
    let rx = Receiver::start(Kind::Grpc, 0)?;
    let (leaf, leaf_port) = rust_service("rust-leaf", None)?;
    let (mid, mid_port) = go_service("go-mid", &format!("http://127.0.0.1:{leaf_port}"))?;
    let (front, front_port) = rust_service("rust-front", Some(&format!("http://127.0.0.1:{mid_port}")))?;
    let mut agent = agent(&[front.pid(), mid.pid(), leaf.pid()], &rx)?;
    let mut c = Client::new(front_port);
    for i in 0..5 {
        let r = c.get(&format!("/chain/c{i}"))?;
        assert_eq!((r.status, String::from_utf8_lossy(&r.body).into_owned()), (200, format!("leaf c{i}")));
    }
    let spans = rx.wait_for(25, Duration::from_secs(30))?;
    agent.stop()?;
    for i in 0..5 {
        let path = format!("/chain/c{i}");
        let front_srv = one(&spans, "front server span", |s| s.kind == SERVER && s.res("service.name") == "rust-front" && s.attr("url.path") == path);
        assert_eq!(front_srv.parent_span_id, "", "the test's client is not traced: a root");
        assert_eq!(front_srv.res("process.runtime.name"), "rust");
        assert_eq!(front_srv.attr("http.response.status_code"), "200");
        let front_cli = one(&spans, "front client span", |s| s.kind == CLIENT && s.parent_span_id == front_srv.span_id);
        assert_eq!(front_cli.res("service.name"), "rust-front");
        assert_eq!(front_cli.attr("url.full"), format!("http://127.0.0.1:{mid_port}{path}"));
        assert_eq!((front_cli.attr("http.request.method"), front_cli.attr("http.response.status_code")), ("GET", "200"));
        assert_eq!(front_cli.attr("server.port"), mid_port.to_string());
        let mid_srv = one(&spans, "Go server span", |s| s.kind == SERVER && s.parent_span_id == front_cli.span_id);
        assert_eq!((mid_srv.res("service.name"), mid_srv.attr("url.path")), ("go-mid", path.as_str()));
        let mid_cli = one(&spans, "Go client span", |s| s.kind == CLIENT && s.parent_span_id == mid_srv.span_id);
        let leaf_srv = one(&spans, "leaf server span", |s| s.kind == SERVER && s.parent_span_id == mid_cli.span_id);
        assert_eq!((leaf_srv.res("service.name"), leaf_srv.attr("url.path")), ("rust-leaf", path.as_str()));
        for s in [front_cli, mid_srv, mid_cli, leaf_srv] {
            assert_eq!(s.trace_id, front_srv.trace_id, "one trace: {s:#?}");
        }
        // Time nests as the calls did (one host, one clock).
        assert!(within(front_cli, front_srv) && within(mid_cli, mid_srv), "{front_srv:#?} {front_cli:#?} {mid_srv:#?} {mid_cli:#?}");
        assert!(front_cli.start_ns <= mid_srv.start_ns && mid_cli.start_ns <= leaf_srv.start_ns);
    }
    // Exactly the spans of the five requests: no duplicates from two layers.
    assert_eq!(spans.len(), 25, "{spans:#?}");
    Ok(())
}

/// One keep-alive connection, 1,000 requests from a Rust client to a Rust server: every
/// request is its own client span and its own server span, each server span the child of
/// its own client span, none mixed up.
#[test]
fn keep_alive_reuse_across_1000_requests() -> Result<()> {
    const N: usize = 1000;
    let rx = Receiver::start(Kind::Grpc, 0)?;
    let (server, port) = rust_service("ka-server", None)?;
    let client = Command::new(tools::rust_svc()?);
    let spans = traced_gets(client, "ka-client", &format!("http://127.0.0.1:{port}/chain/k"), N, &server, &rx, Duration::from_secs(60))?;
    let servers: HashMap<&str, &RSpan> =
        spans.iter().filter(|s| s.kind == SERVER && s.res("service.name") == "ka-server").map(|s| (s.attr("url.path"), s)).collect();
    let clients: Vec<&RSpan> = spans.iter().filter(|s| s.kind == CLIENT && s.res("service.name") == "ka-client").collect();
    assert_eq!((servers.len(), clients.len()), (N, N), "one server and one client span per request, paths distinct");
    let mut peer_ports: Vec<&str> = Vec::new();
    for c in &clients {
        let path = c.attr("url.full").strip_prefix(&format!("http://127.0.0.1:{port}")).expect("url.full names the server");
        let s = servers.get(path).unwrap_or_else(|| panic!("no server span for {path}"));
        assert_eq!((s.parent_span_id.as_str(), s.trace_id.as_str()), (c.span_id.as_str(), c.trace_id.as_str()), "{path}: {c:#?} {s:#?}");
        assert_eq!(c.parent_span_id, "", "the client's requests start traces");
        assert_eq!(c.attr("http.response.status_code"), "200");
        assert!(c.end_ns >= s.end_ns && c.start_ns <= s.start_ns, "the server's work lies inside the client's call: {c:#?} {s:#?}");
        peer_ports.push(s.attr("network.peer.port"));
    }
    peer_ports.sort_unstable();
    peer_ports.dedup();
    assert_eq!(peer_ports.len(), 1, "one connection, reused: {peer_ports:?}");
    Ok(())
}

/// A keep-alive connection opened (and used) before the agent started is followed from its
/// next request on.
#[test]
fn a_connection_opened_before_the_agent() -> Result<()> {
    let rx = Receiver::start(Kind::Grpc, 0)?;
    let (server, port) = rust_service("early", None)?;
    let mut c = Client::new(port);
    let local = c.connect()?;
    assert_eq!(c.get("/chain/before")?.status, 200);
    let mut agent = agent(&[server.pid()], &rx)?;
    for i in 0..3 {
        let r = c.get(&format!("/chain/after{i}"))?;
        assert_eq!((r.status, r.local_port), (200, local), "the same connection");
    }
    rx.wait_for(3, Duration::from_secs(20))?;
    std::thread::sleep(Duration::from_millis(500));
    agent.stop()?;
    let spans: Vec<RSpan> = rx.spans().into_iter().filter(|s| s.res("service.name") == "early").collect();
    assert!(spans.len() >= 3);
    for i in 0..3 {
        let s = one(&spans, "server span", |s| s.attr("url.path") == format!("/chain/after{i}"));
        assert_eq!((s.kind, s.attr("network.peer.port")), (SERVER, local.to_string().as_str()));
        assert_eq!(s.attr("http.response.status_code"), "200");
    }
    assert!(spans.iter().all(|s| s.attr("url.path") != "/chain/before"), "nothing from before the agent");
    assert_eq!(spans.len(), 3, "{spans:#?}");
    Ok(())
}

/// A client pod calls a server pod through a Service's virtual IP, as kube-proxy routes it:
/// client, server and node each in their own network namespace (veth pairs), the node
/// DNATs VIP:80 to the server pod's address. The client's socket names the VIP, the
/// server's the pod address; the same-host link survives (by the client's address and
/// port) and every server span is the child of its client span.
#[test]
fn a_call_through_a_service_virtual_ip_is_linked() -> Result<()> {
    const N: usize = 20;
    const VIP: &str = "10.96.0.10";
    let (node, pod_a, pod_b) = (Netns::new("node")?, Netns::new("client")?, Netns::new("server")?);
    pod_a.veth("eth0", "10.244.1.2/24", &node, "veth-a", "10.244.1.1/24")?;
    pod_b.veth("eth0", "10.244.2.2/24", &node, "veth-b", "10.244.2.1/24")?;
    pod_a.ip(&["route", "add", "default", "via", "10.244.1.1"])?;
    pod_b.ip(&["route", "add", "default", "via", "10.244.2.1"])?;
    node.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"], "")?;
    let rules = format!(
        "table ip zt {{\n chain pre {{\n type nat hook prerouting priority dstnat; policy accept;\n ip daddr {VIP} tcp dport 80 dnat to 10.244.2.2:8080\n }}\n}}\n"
    );
    node.exec("nft", &["-f", "-"], &rules)?;

    let rx = Receiver::start(Kind::Grpc, 0)?;
    let mut cmd = pod_b.command(&tools::rust_svc()?);
    cmd.arg("10.244.2.2:8080").env("OTEL_SERVICE_NAME", "svc-server");
    let server = Proc::spawn("svc-server", cmd)?;
    pod_a.enter(|| {
        zerotrace_e2e::proc::wait_until("the server through the VIP", Duration::from_secs(10), || {
            std::net::TcpStream::connect_timeout(&format!("{VIP}:80").parse().expect("an address"), Duration::from_millis(200)).is_ok()
        })
    })??;
    let client = pod_a.command(&tools::rust_svc()?);
    let spans = traced_gets(client, "svc-client", &format!("http://{VIP}:80/chain/v"), N, &server, &rx, Duration::from_secs(30))?;
    for i in 0..N {
        let path = format!("/chain/v{i}");
        let c = one(&spans, "client span", |s| s.kind == CLIENT && s.attr("url.full").ends_with(&path));
        assert_eq!((c.res("service.name"), c.attr("server.address")), ("svc-client", VIP), "the client called the VIP: {c:#?}");
        let s = one(&spans, "server span", |s| s.kind == SERVER && s.attr("url.path") == path);
        assert_eq!((s.res("service.name"), s.attr("network.peer.address")), ("svc-server", "10.244.1.2"), "the server saw the pod: {s:#?}");
        assert_eq!((s.parent_span_id.as_str(), s.trace_id.as_str()), (c.span_id.as_str(), c.trace_id.as_str()), "{path}: linked through DNAT: {c:#?} {s:#?}");
    }
    assert_eq!(spans.len(), 2 * N, "{spans:#?}");
    Ok(())
}

/// Connections opened and ended under load, half of them by a reset (RST) while the
/// server waits for the next request: TCP closes the server's socket before the server
/// reads it again, and the kernel hands the socket's memory to the next connection it
/// accepts. Every request served becomes a server span on its own connection (its client
/// port), or a loss counted by the agent; each connection is followed from its first
/// request.
#[test]
fn every_connection_is_followed_through_resets_under_load() -> Result<()> {
    const THREADS: usize = 8;
    const CONNS: usize = 40;
    const REQS: usize = 3;
    let rx = Receiver::start(Kind::Grpc, 0)?;
    let (server, port) = rust_service("churn", None)?;
    let mut agent = agent(&[server.pid()], &rx)?;
    let clients: Vec<_> = (0..THREADS)
        .map(|t| {
            std::thread::spawn(move || -> Result<Vec<(u16, String)>> {
                let mut served = Vec::new();
                for c in 0..CONNS {
                    let mut client = Client::new(port);
                    for r in 0..REQS {
                        let path = format!("/chain/t{t}c{c}r{r}");
                        let resp = client.get(&path)?;
                        ensure!(resp.status == 200, "{path}: status {}", resp.status);
                        served.push((resp.local_port, path));
                    }
                    if c % 2 == 0 {
                        client.reset()?;
                    }
                }
                Ok(served)
            })
        })
        .collect();
    let mut served: Vec<(u16, String)> = Vec::new();
    for c in clients {
        served.extend(c.join().expect("client thread")?);
    }
    rx.settle(served.len() as u64, 40);
    std::thread::sleep(Duration::from_millis(500));
    agent.stop()?;
    let spans: Vec<RSpan> = rx.spans().into_iter().filter(|s| s.kind == SERVER && s.res("service.name") == "churn").collect();
    let got: HashMap<&str, &str> = spans.iter().map(|s| (s.attr("url.path"), s.attr("network.peer.port"))).collect();
    let missing: Vec<&(u16, String)> = served.iter().filter(|(_, p)| !got.contains_key(p.as_str())).collect();
    let ports: std::collections::HashSet<u16> = served.iter().map(|(p, _)| *p).collect();
    let lost_ports: std::collections::HashSet<u16> = missing.iter().map(|(p, _)| *p).collect();
    let stats = agent.stats()?;
    let counted = agent.counted_losses()?;
    println!(
        "{} requests on {} connections: {} server spans, {} requests missing on {} connections, {counted} counted as lost; connections_stale_replaced={:?}",
        served.len(),
        ports.len(),
        spans.len(),
        missing.len(),
        lost_ports.len(),
        stats.get("zerotrace_connections_stale_replaced")
    );
    assert!(
        missing.len() as u64 <= counted,
        "{} of {} requests served have no span and no counter counts them (connections never followed: {} of {}); first: {:?}",
        missing.len(),
        served.len(),
        lost_ports.len(),
        ports.len(),
        &missing[..missing.len().min(5)]
    );
    for (port, path) in &served {
        if let Some(peer) = got.get(path.as_str()) {
            assert_eq!(*peer, port.to_string(), "{path}: the span names its own connection's client port");
        }
    }
    assert_eq!(spans.len(), got.len(), "one span per request, none twice");
    // State left by an earlier socket at the same address is counted where it is replaced.
    let _ = agent.stat("connections_stale_replaced");
    Ok(())
}

/// A process that is not selected is not captured at all: the kernel filter drops its
/// socket I/O before anything else. Here it even calls the traced service: had its
/// requests been seen, the traced server's spans would have parents (offered on the flow),
/// and the kernel's counters would count them.
#[test]
fn a_process_that_is_not_selected_is_not_captured() -> Result<()> {
    let rx = Receiver::start(Kind::Grpc, 0)?;
    let (traced, traced_port) = rust_service("selected", None)?;
    let (other, other_port) = rust_service("not-selected", Some(&format!("http://127.0.0.1:{traced_port}")))?;
    let mut agent = agent(&[traced.pid()], &rx)?;
    let mut direct = Client::new(traced_port);
    let mut via = Client::new(other_port);
    for i in 0..10 {
        assert_eq!(direct.get(&format!("/chain/d{i}"))?.status, 200);
        assert_eq!(via.get(&format!("/chain/v{i}"))?.status, 200);
    }
    rx.wait_for(20, Duration::from_secs(20))?;
    std::thread::sleep(Duration::from_millis(500));
    agent.stop()?;
    let spans = rx.spans();
    assert_eq!(spans.len(), 20, "{spans:#?}");
    for s in &spans {
        assert_eq!((s.kind, s.res("service.name")), (SERVER, "selected"), "{s:#?}");
        assert_eq!(s.parent_span_id, "", "no offer from the unselected caller: {s:#?}");
        assert_ne!(s.res("process.pid"), other.pid().to_string());
    }
    assert_eq!(agent.stat("requests_seen"), 20, "the kernel counted only the selected process's requests");
    assert_eq!(agent.stat("socket_client_requests_seen"), 0, "nor any client request of the other");
    Ok(())
}

/// A gRPC server (tonic) on a fresh port.
fn grpc_service(name: &str) -> Result<(Proc, u16)> {
    let port = free_port();
    let mut cmd = Command::new(tools::rust_svc()?);
    cmd.args(["grpc", &format!("127.0.0.1:{port}")]).env("OTEL_SERVICE_NAME", name);
    let p = Proc::spawn(name, cmd)?;
    wait_for_port(port, Duration::from_secs(10))?;
    Ok((p, port))
}

/// A file that does not exist yet, which a client started by the test waits for.
fn start_file(name: &str) -> std::path::PathBuf {
    let start = tools::work_dir().join("logs").join(format!("{name}-start-{}", std::process::id()));
    let _ = std::fs::remove_file(&start);
    start
}

/// A gRPC client (tonic) that makes `n` calls of `kind` over one HTTP/2 connection,
/// `concurrency` at a time, once the returned file exists; `env` adds to its environment.
fn grpc_client(name: &str, port: u16, kind: &str, n: u32, concurrency: u32, env: &[(&str, &str)]) -> Result<(Proc, std::path::PathBuf)> {
    let start = start_file(name);
    let mut cmd = Command::new(tools::rust_svc()?);
    cmd.args(["grpc-call", &format!("http://127.0.0.1:{port}"), kind, &n.to_string(), &concurrency.to_string()])
        .arg(&start)
        .env("OTEL_SERVICE_NAME", name)
        .envs(env.iter().copied());
    Ok((Proc::spawn(name, cmd)?, start))
}

/// Client and server spans of gRPC calls between two traced Rust processes, paired by the
/// server span's parent (the kernel saw both ends of each HTTP/2 stream).
fn grpc_pairs<'a>(spans: &'a [RSpan], client: &str, server: &str) -> Vec<(&'a RSpan, &'a RSpan)> {
    let mut clients: Vec<&RSpan> = spans.iter().filter(|s| s.kind == CLIENT && s.res("service.name") == client).collect();
    clients.sort_by_key(|s| s.start_ns);
    clients
        .into_iter()
        .map(|c| (c, one(spans, "server span of a call", |s| s.kind == SERVER && s.res("service.name") == server && s.parent_span_id == c.span_id)))
        .collect()
}

/// Unary and server-streaming gRPC calls with status codes: names, rpc.* attributes, status
/// codes on both sides, errors as the semantic conventions say (server: only codes that
/// mean the server failed; client: any code but OK), client and server linked.
#[test]
fn grpc_unary_and_streaming_calls_with_status_codes() -> Result<()> {
    let rx = Receiver::start(Kind::Grpc, 0)?;
    let (server, port) = grpc_service("grpc-server")?;
    let (mut unary, go_unary) = grpc_client("grpc-unary", port, "unary", 6, 1, &[])?;
    let (mut stream, go_stream) = grpc_client("grpc-stream", port, "stream", 2, 1, &[])?;
    let mut agent = agent(&[server.pid(), unary.pid(), stream.pid()], &rx)?;
    std::fs::write(&go_unary, b"go")?;
    ensure!(unary.wait_timeout(Duration::from_secs(30)).is_some_and(|s| s.success()), "unary client: {}", unary.stderr_text());
    std::fs::write(&go_stream, b"go")?;
    ensure!(stream.wait_timeout(Duration::from_secs(30)).is_some_and(|s| s.success()), "stream client: {}", stream.stderr_text());
    rx.wait_for(16, Duration::from_secs(20))?;
    agent.stop()?;
    let spans = rx.spans();
    let unary_pairs = grpc_pairs(&spans, "grpc-unary", "grpc-server");
    assert_eq!(unary_pairs.len(), 6);
    for (i, (c, s)) in unary_pairs.iter().enumerate() {
        let (code, name) = [(0, "OK"), (5, "NOT_FOUND"), (13, "INTERNAL")][i % 3];
        for x in [c, s] {
            assert_eq!(x.name, "zerotrace.test.v1.Echo/Unary");
            assert_eq!((x.attr("rpc.system.name"), x.attr("rpc.method")), ("grpc", "zerotrace.test.v1.Echo/Unary"));
            assert_eq!(x.attr("rpc.response.status_code"), name, "call {i}: {x:#?}");
            assert_eq!(x.attr("network.protocol.version"), "2");
            assert_eq!(x.trace_id, c.trace_id);
        }
        assert_eq!(c.status == 2, code != 0, "client error iff not OK: {c:#?}");
        assert_eq!(s.status == 2, code == 13, "server error only for INTERNAL: {s:#?}");
        assert_eq!(c.parent_span_id, "");
        assert!(c.start_ns <= s.start_ns && s.end_ns <= c.end_ns, "{c:#?} {s:#?}");
    }
    let stream_pairs = grpc_pairs(&spans, "grpc-stream", "grpc-server");
    assert_eq!(stream_pairs.len(), 2);
    for (i, (c, s)) in stream_pairs.iter().enumerate() {
        let (code, name) = [(0, "OK"), (14, "UNAVAILABLE")][i % 2];
        for x in [c, s] {
            assert_eq!(x.name, "zerotrace.test.v1.Echo/Stream");
            assert_eq!(x.attr("rpc.response.status_code"), name, "stream {i}: {x:#?}");
        }
        assert_eq!((c.status == 2, s.status == 2), (code != 0, code == 14), "UNAVAILABLE is a server error: {c:#?} {s:#?}");
        // Three replies 2 ms apart: the stream lasts until the last one and the trailers.
        assert!(s.duration() >= Duration::from_millis(4), "{s:#?}");
    }
    assert_eq!(spans.len(), 16, "one span per call and side: {spans:#?}");
    Ok(())
}

/// gRPC calls of 256 KiB each way: every send spans several passes of TCP's copy loop and
/// more than the 16 KiB captured per syscall, yet every header block of the connection is
/// read right (counted once per syscall, never captured twice).
#[test]
fn grpc_large_messages() -> Result<()> {
    let rx = Receiver::start(Kind::Grpc, 0)?;
    let (server, port) = grpc_service("big-server")?;
    let (mut client, start) = grpc_client("big-client", port, "unary", 6, 1, &[("RUST_SVC_PAYLOAD", "262144")])?;
    let mut agent = agent(&[server.pid(), client.pid()], &rx)?;
    std::fs::write(&start, b"go")?;
    ensure!(client.wait_timeout(Duration::from_secs(30)).is_some_and(|s| s.success()), "client: {}", client.stderr_text());
    rx.wait_for(12, Duration::from_secs(20))?;
    agent.stop()?;
    let spans = rx.spans();
    let pairs = grpc_pairs(&spans, "big-client", "big-server");
    assert_eq!(pairs.len(), 6, "{spans:#?}");
    for (i, (c, s)) in pairs.iter().enumerate() {
        let code = ["OK", "NOT_FOUND", "INTERNAL"][i % 3];
        for x in [c, s] {
            assert_eq!((x.name.as_str(), x.attr("rpc.response.status_code")), ("zerotrace.test.v1.Echo/Unary", code), "call {i}: {x:#?}");
            assert_eq!(x.attr("zerotrace.http2.headers"), "", "{x:#?}");
        }
    }
    assert_eq!(spans.len(), 12);
    assert_eq!(agent.stat("http2_directions_unreadable"), 0);
    Ok(())
}

/// 50 calls at once over one HTTP/2 connection: 50 streams interleaved in the same reads
/// and writes, each its own pair of spans.
#[test]
fn http2_with_50_concurrent_streams() -> Result<()> {
    let rx = Receiver::start(Kind::Grpc, 0)?;
    let (server, port) = grpc_service("h2-server")?;
    let (mut client, go) = grpc_client("h2-client", port, "unary", 50, 50, &[])?;
    let mut agent = agent(&[server.pid(), client.pid()], &rx)?;
    std::fs::write(&go, b"go")?;
    ensure!(client.wait_timeout(Duration::from_secs(30)).is_some_and(|s| s.success()), "client: {}", client.stderr_text());
    rx.wait_for(100, Duration::from_secs(20))?;
    agent.stop()?;
    let spans = rx.spans();
    let pairs = grpc_pairs(&spans, "h2-client", "h2-server");
    assert_eq!(pairs.len(), 50);
    let mut codes = [0usize; 3];
    let mut peer_ports: Vec<&str> = Vec::new();
    for (c, s) in &pairs {
        assert_eq!(c.attr("rpc.response.status_code"), s.attr("rpc.response.status_code"), "{c:#?} {s:#?}");
        assert_eq!(s.attr("zerotrace.http2.headers"), "", "headers read: {s:#?}");
        codes[match s.attr("rpc.response.status_code") {
            "OK" => 0,
            "NOT_FOUND" => 1,
            "INTERNAL" => 2,
            other => panic!("unexpected code {other}"),
        }] += 1;
        peer_ports.push(s.attr("network.peer.port"));
    }
    assert_eq!(codes, [17, 17, 16], "each call's own status");
    peer_ports.sort_unstable();
    peer_ports.dedup();
    assert_eq!(peer_ports.len(), 1, "one connection");
    assert_eq!(spans.len(), 100);
    Ok(())
}

/// HTTP/1 into a Rust service that calls a gRPC service: the gRPC client span sits under
/// the HTTP server span, the gRPC server span under the client span.
#[test]
fn http_request_that_makes_a_grpc_call() -> Result<()> {
    let rx = Receiver::start(Kind::Grpc, 0)?;
    let (grpc, grpc_port) = grpc_service("echo-grpc")?;
    let port = free_port();
    let mut cmd = Command::new(tools::rust_svc()?);
    cmd.arg(format!("127.0.0.1:{port}")).env("OTEL_SERVICE_NAME", "web").env("RUST_SVC_GRPC", format!("http://127.0.0.1:{grpc_port}"));
    let web = Proc::spawn("web", cmd)?;
    wait_for_port(port, Duration::from_secs(10))?;
    let mut agent = agent(&[web.pid(), grpc.pid()], &rx)?;
    let mut c = Client::new(port);
    for i in 0..3 {
        let r = c.get(&format!("/grpc/g{i}"))?;
        assert_eq!((r.status, String::from_utf8_lossy(&r.body).into_owned()), (200, format!("g{i}")));
    }
    rx.wait_for(9, Duration::from_secs(20))?;
    agent.stop()?;
    let spans = rx.spans();
    for i in 0..3 {
        let http = one(&spans, "HTTP server span", |s| s.kind == SERVER && s.attr("url.path") == format!("/grpc/g{i}"));
        let call = one(&spans, "gRPC client span", |s| s.kind == CLIENT && s.parent_span_id == http.span_id);
        assert_eq!((call.name.as_str(), call.res("service.name")), ("zerotrace.test.v1.Echo/Unary", "web"));
        let served = one(&spans, "gRPC server span", |s| s.kind == SERVER && s.parent_span_id == call.span_id);
        assert_eq!((served.res("service.name"), served.attr("rpc.response.status_code")), ("echo-grpc", "OK"));
        assert!(call.trace_id == http.trace_id && served.trace_id == http.trace_id);
    }
    assert_eq!(spans.len(), 9, "{spans:#?}");
    Ok(())
}

/// An HTTP/2 connection that was open (and used) before the agent started: its later
/// streams still become spans, linked client to server, and say that their headers could
/// not be read (the HPACK tables were built before the agent saw anything) instead of
/// showing garbage.
#[test]
fn an_http2_connection_joined_mid_way_degrades_gracefully() -> Result<()> {
    let rx = Receiver::start(Kind::Grpc, 0)?;
    let (server, port) = grpc_service("joined-server")?;
    let (mut client, start) = grpc_client("joined-client", port, "unary", 6, 1, &[("RUST_SVC_WARM", "1")])?;
    zerotrace_e2e::proc::wait_until("the warm-up call", Duration::from_secs(10), || client.stdout_text().contains("warm: done"))?;
    let mut agent = agent(&[server.pid(), client.pid()], &rx)?;
    std::fs::write(&start, b"go")?;
    ensure!(client.wait_timeout(Duration::from_secs(30)).is_some_and(|s| s.success()), "client: {}", client.stderr_text());
    rx.wait_for(12, Duration::from_secs(20))?;
    std::thread::sleep(Duration::from_millis(500));
    agent.stop()?;
    let spans = rx.spans();
    let pairs = grpc_pairs(&spans, "joined-client", "joined-server");
    assert_eq!(pairs.len(), 6, "{spans:#?}");
    for (c, s) in pairs {
        for x in [c, s] {
            assert!(x.attr("zerotrace.http2.headers").starts_with("not captured"), "says what is missing: {x:#?}");
            assert_eq!((x.name.as_str(), x.attr("network.protocol.version")), ("HTTP", "2"));
            assert_eq!(x.attr("rpc.response.status_code"), "", "nothing made up: {x:#?}");
        }
        assert!(c.start_ns <= s.start_ns && s.end_ns <= c.end_ns);
    }
    assert_eq!(spans.len(), 12, "{spans:#?}");
    Ok(())
}

/// Reads a response head (status line and headers) from `r`; returns the status and the
/// Content-Length.
fn read_head(r: &mut impl std::io::BufRead) -> Result<(u16, usize)> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut len = 0;
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            return Ok((status, len));
        }
        if let Some(v) = l.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
    }
}

/// HTTP/1 edge cases on a Rust server: a request whose body waits for `100 Continue` is one
/// span with the final status (the interim response is not the response), and after `101
/// Switching Protocols` the connection's bytes are never taken for requests, even bytes
/// that look like one.
#[test]
fn expect_continue_and_upgrade() -> Result<()> {
    use std::io::{BufReader, Read, Write};
    let rx = Receiver::start(Kind::Grpc, 0)?;
    let (server, port) = rust_service("edge", None)?;
    let mut agent = agent(&[server.pid()], &rx)?;
    let connect = || -> Result<(BufReader<std::net::TcpStream>, std::net::TcpStream)> {
        let s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok((BufReader::new(s.try_clone()?), s))
    };
    let (mut r, mut w) = connect()?;
    w.write_all(b"POST /echo HTTP/1.1\r\nHost: edge\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")?;
    assert_eq!(read_head(&mut r)?.0, 100, "the server asks for the body");
    w.write_all(b"hello")?;
    let (status, len) = read_head(&mut r)?;
    let mut body = vec![0; len];
    r.read_exact(&mut body)?;
    assert_eq!((status, body.as_slice()), (200, &b"hello"[..]));

    let (mut r, mut w) = connect()?;
    w.write_all(b"GET /upgrade HTTP/1.1\r\nHost: edge\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")?;
    assert_eq!(read_head(&mut r)?.0, 101);
    for msg in [&b"GET /not-a-request HTTP/1.1\r\n\r\n"[..], b"PING\r\n"] {
        w.write_all(msg)?;
        let mut back = vec![0; msg.len()];
        r.read_exact(&mut back)?;
        assert_eq!(back, msg, "the upgraded protocol echoes");
    }
    drop((r, w));
    rx.wait_for(2, Duration::from_secs(20))?;
    std::thread::sleep(Duration::from_millis(700));
    agent.stop()?;
    let spans = rx.spans();
    let post = one(&spans, "POST span", |s| s.attr("url.path") == "/echo");
    assert_eq!(post.attr("http.response.status_code"), "200", "the final status, not 100: {post:#?}");
    let up = one(&spans, "upgrade span", |s| s.attr("url.path") == "/upgrade");
    assert_eq!(up.attr("http.response.status_code"), "101");
    assert_eq!(spans.len(), 2, "nothing from the upgraded connection's bytes: {spans:#?}");
    Ok(())
}

/// Eight concurrent requests into a thread-per-connection server (std only) that calls a
/// downstream while each request is open. With `--native-parents thread` each downstream
/// call sits under the request its thread serves; with the default (`one-open`) they are
/// roots, because eight requests are open at once: unlinked, never linked to a wrong one.
#[test]
fn thread_per_request_server_parents() -> Result<()> {
    let (leaf, leaf_port) = rust_service("tpr-leaf", None)?;
    let port = free_port();
    let mut cmd = Command::new(tools::rust_svc()?);
    cmd.args(["threads", &format!("127.0.0.1:{port}"), &format!("127.0.0.1:{leaf_port}")]).env("OTEL_SERVICE_NAME", "tpr");
    let tpr = Proc::spawn("tpr", cmd)?;
    wait_for_port(port, Duration::from_secs(10))?;
    for mode in ["thread", "one-open"] {
        let rx = Receiver::start(Kind::Grpc, 0)?;
        let endpoint = rx.endpoint();
        let mut agent = Agent::start(&[tpr.pid(), leaf.pid()], &["--otlp-endpoint", &endpoint, "--batch-delay", "200ms", "--native-parents", mode], &[])?;
        let calls: Vec<_> = (0..8).map(|i| std::thread::spawn(move || Client::new(port).get(&format!("/chain/{mode}{i}")).map(|r| r.status))).collect();
        for c in calls {
            assert_eq!(c.join().expect("client thread")?, 200);
        }
        rx.wait_for(24, Duration::from_secs(20))?;
        agent.stop()?;
        let spans = rx.spans();
        let mut roots = 0;
        for i in 0..8 {
            let path = format!("/chain/{mode}{i}");
            let srv = one(&spans, "tpr server span", |s| s.kind == SERVER && s.res("service.name") == "tpr" && s.attr("url.path") == path);
            let call = one(&spans, "tpr client span", |s| s.kind == CLIENT && s.attr("url.full").ends_with(&path));
            let down = one(&spans, "leaf span", |s| s.kind == SERVER && s.res("service.name") == "tpr-leaf" && s.attr("url.path") == path);
            assert_eq!(down.parent_span_id, call.span_id, "the flow link");
            if mode == "thread" {
                assert_eq!(call.parent_span_id, srv.span_id, "{path}: the request its thread serves");
            } else {
                // A request that ran alone (a late client thread) is linked, rightly.
                assert!(call.parent_span_id.is_empty() || call.parent_span_id == srv.span_id, "{path}: never a wrong parent");
                roots += usize::from(call.parent_span_id.is_empty());
            }
        }
        if mode == "one-open" {
            assert!(roots >= 4, "with eight requests open at once, no guesses: {roots} roots");
        }
    }
    Ok(())
}

/// HTTP/1 pipelining: a client (rust-svc, Rust) writes four requests in one write before it
/// reads any response, to a Rust server (hyper) and to Go servers (net/http, oldest and
/// newest Go), all of which answer them one by one from their read buffer. Every request gets its own server span
/// (its path, status and route, ending in order) and its own client span, in conn mode and
/// with Go handler probes alike (no request twice); each server span is the child of its
/// client span in the other process, without headers. With handler
/// probes a pipelined request starts at its handler's entry, so the downstream call each
/// handler makes (Go -> Rust) is that request's child; in conn mode such a call is unlinked
/// (the kernel sees the serving goroutine move on to another request), never misplaced.
#[test]
fn pipelined_requests_each_get_their_spans() -> Result<()> {
    /// A server, the requests a client pipelines to it, and (path, status, route) of each.
    struct Target {
        service: &'static str,
        proc: Proc,
        port: u16,
        reqs: [&'static str; 4],
        want: [(&'static str, &'static str, &'static str); 4],
        /// Each request in a write of its own, 30 ms apart (still all before reading).
        apart: bool,
    }
    let go_server = |service: &'static str, version: &str| -> Result<(Proc, u16)> {
        let port = free_port();
        let mut cmd = Command::new(tools::httpserver(version)?);
        cmd.arg(format!("127.0.0.1:{port}")).env("OTEL_SERVICE_NAME", service);
        let p = Proc::spawn(service, cmd)?;
        wait_for_port(port, Duration::from_secs(10))?;
        Ok((p, port))
    };
    let (rust, rust_port) = rust_service("pipe-rust", None)?;
    let (apart, apart_port) = rust_service("pipe-rust-apart", None)?;
    let (new_go, new_port) = go_server("pipe-go-new", GO_NEWEST)?;
    let (old_go, old_port) = go_server("pipe-go-old", tools::GO_OLDEST)?;
    let targets = [
        Target {
            service: "pipe-rust",
            proc: rust,
            port: rust_port,
            reqs: ["GET:/hello", "GET:/status/404", "POST:/echo:GET /x HTTP/1.1", "GET:/slow/30"],
            want: [("/hello", "200", ""), ("/status/404", "404", ""), ("/echo", "200", ""), ("/slow/30", "200", "")],
            apart: false,
        },
        // The server reads (and answers) each request alone: the client's kernel offered
        // only the first on the flow, yet each is linked to its own client span.
        Target {
            service: "pipe-rust-apart",
            proc: apart,
            port: apart_port,
            reqs: ["GET:/hello", "GET:/status/404", "POST:/echo:GET /x HTTP/1.1", "GET:/slow/30"],
            want: [("/hello", "200", ""), ("/status/404", "404", ""), ("/echo", "200", ""), ("/slow/30", "200", "")],
            apart: true,
        },
        // Go 1.22+ patterns: GET-only routes answer POST with 405 (no route).
        Target {
            service: "pipe-go-new",
            proc: new_go,
            port: new_port,
            reqs: ["GET:/hello", "GET:/status/404", "POST:/users/7:hi", "GET:/sleep?ms=30"],
            want: [("/hello", "200", "/hello"), ("/status/404", "404", "/status/"), ("/users/7", "405", ""), ("/sleep", "200", "/sleep")],
            apart: false,
        },
        Target {
            service: "pipe-go-old",
            proc: old_go,
            port: old_port,
            reqs: ["GET:/hello", "GET:/status/503", "POST:/users/7:hi", "GET:/sleep?ms=30"],
            // Go 1.21's ServeMux keeps no pattern on the request: no route.
            want: [("/hello", "200", ""), ("/status/503", "503", ""), ("/users/7", "200", ""), ("/sleep", "200", "")],
            apart: false,
        },
    ];
    let (chain, chain_port) = go_service("pipe-chain", &format!("http://127.0.0.1:{rust_port}"))?;
    for mode in ["conn", "handler"] {
        let rx = Receiver::start(Kind::Grpc, 0)?;
        let mut clients = Vec::new();
        for t in &targets {
            let name = format!("{}-client-{mode}", t.service);
            let start = start_file(&name);
            let mut cmd = Command::new(tools::rust_svc()?);
            cmd.args(["pipeline", &format!("127.0.0.1:{}", t.port)]).arg(&start).args(t.reqs).env("OTEL_SERVICE_NAME", &name);
            if t.apart {
                cmd.env("RUST_SVC_APART_MS", "30");
            }
            clients.push((Proc::spawn(&name, cmd)?, start));
        }
        let chain_start = start_file(&format!("pipe-chain-client-{mode}"));
        let mut cmd = Command::new(tools::rust_svc()?);
        cmd.args(["pipeline", &format!("127.0.0.1:{chain_port}")]).arg(&chain_start).args(["GET:/chain/p1", "GET:/chain/p2", "GET:/chain/p3"]);
        let mut chain_client = Proc::spawn("pipe-chain-client", cmd)?;
        let mut pids: Vec<u32> = targets.iter().map(|t| t.proc.pid()).collect();
        pids.push(chain.pid());
        pids.extend(clients.iter().map(|c| c.0.pid()));
        let endpoint = rx.endpoint();
        let mut agent = Agent::start(&pids, &["--otlp-endpoint", &endpoint, "--batch-delay", "200ms", "--go-http-probes", mode], &[])?;
        for ((p, start), t) in clients.iter_mut().zip(&targets) {
            std::fs::write(&*start, b"")?;
            let status = p.wait_timeout(Duration::from_secs(20));
            ensure!(status.is_some_and(|s| s.success()), "the client of {} failed: {}", t.service, p.stderr_text());
            let statuses: Vec<String> = p.stdout_text().lines().map(|l| l.split(' ').next().unwrap_or("").to_owned()).collect();
            assert_eq!(statuses, t.want.map(|w| w.1), "{} answered each request", t.service);
        }
        std::fs::write(&chain_start, b"")?;
        ensure!(chain_client.wait_timeout(Duration::from_secs(20)).is_some_and(|s| s.success()), "chain client: {}", chain_client.stderr_text());
        rx.wait_for(targets.len() * 8 + 9, Duration::from_secs(20))?;
        std::thread::sleep(Duration::from_millis(700));
        agent.stop()?;
        let spans = rx.spans();
        for t in &targets {
            let (service, want) = (t.service, &t.want);
            let client_name = format!("{service}-client-{mode}");
            let mut servers: Vec<&RSpan> =
                spans.iter().filter(|s| s.kind == SERVER && s.res("service.name") == service && !s.attr("url.path").starts_with("/chain/")).collect();
            servers.sort_by_key(|s| s.end_ns);
            let got: Vec<(&str, &str, &str)> =
                servers.iter().map(|s| (s.attr("url.path"), s.attr("http.response.status_code"), s.attr("http.route"))).collect();
            assert_eq!(got, want.to_vec(), "{mode}: one server span per pipelined request of {service}, in order: {servers:#?}");
            let mut clients: Vec<&RSpan> = spans.iter().filter(|s| s.kind == CLIENT && s.res("service.name") == client_name).collect();
            clients.sort_by_key(|s| s.end_ns);
            let got: Vec<(&str, &str)> = clients.iter().map(|s| (s.attr("url.full"), s.attr("http.response.status_code"))).collect();
            assert_eq!(clients.len(), 4, "{mode}: one client span per pipelined request to {service}: {got:?}");
            for (c, w) in clients.iter().zip(want.iter()) {
                assert!(c.attr("url.full").contains(w.0), "{mode}: client spans in order: {clients:#?}");
                assert_eq!(c.attr("http.response.status_code"), w.1, "{c:#?}");
            }
            let ids: std::collections::HashSet<&str> = servers.iter().chain(clients.iter()).map(|s| s.span_id.as_str()).collect();
            assert_eq!(ids.len(), 8, "every span its own id");
            for (s, c) in servers.iter().zip(clients.iter()) {
                assert_eq!((&s.parent_span_id, &s.trace_id), (&c.span_id, &c.trace_id), "{mode}: each request linked across the processes");
                assert!(
                    s.start_ns <= s.end_ns && c.start_ns <= s.start_ns + 1_000_000 && s.end_ns <= c.end_ns + 1_000_000,
                    "{mode}: server within client: {s:#?} {c:#?}"
                );
            }
            let slow = servers[3];
            assert!(slow.duration() >= Duration::from_millis(30), "{mode}: the slow request lasts its 30 ms: {slow:#?}");
        }
        let chained: Vec<&RSpan> = spans.iter().filter(|s| s.kind == SERVER && s.res("service.name") == "pipe-chain").collect();
        assert_eq!(chained.len(), 3, "{mode}: one span per pipelined chain request: {chained:#?}");
        for i in 1..=3 {
            let path = format!("/chain/p{i}");
            let srv = one(&spans, "chain server span", |s| s.kind == SERVER && s.res("service.name") == "pipe-chain" && s.attr("url.path") == path);
            let call = one(&spans, "chain call", |s| s.kind == CLIENT && s.res("service.name") == "pipe-chain" && s.attr("url.full").ends_with(&path));
            if mode == "handler" || i == 1 {
                assert_eq!(call.parent_span_id, srv.span_id, "{mode} {path}: the handler's call is its request's child");
            } else {
                // Conn mode does not see a pipelined request start before its response: its
                // handler's call is unlinked, never put under the request before it.
                assert_eq!(call.parent_span_id, "", "{mode} {path}: no parent rather than a wrong one");
            }
            let down = one(&spans, "downstream span", |s| s.kind == SERVER && s.res("service.name") == "pipe-rust" && s.attr("url.path") == path);
            assert_eq!(down.parent_span_id, call.span_id, "{path}: and the Rust service's span the call's");
        }
        assert_eq!(agent.stat("pipelined_requests_not_captured"), 0);
    }
    Ok(())
}

/// At saturation (32 keep-alive connections as fast as the service answers), with each
/// export protocol: every request the service served is a span the collector received, or
/// a loss the agent counted. The load generator counts exactly what was served (it reads
/// every response in flight to its end before it stops).
#[test]
fn saturation_loses_nothing_uncounted_with_either_export_protocol() -> Result<()> {
    for kind in [Kind::Grpc, Kind::Http] {
        let rx = Receiver::start(kind, 0)?;
        let (server, port) = rust_service("saturated", None)?;
        let endpoint = rx.endpoint();
        let mut args = vec!["--otlp-endpoint", endpoint.as_str(), "--batch-delay", "200ms"];
        if kind == Kind::Http {
            args.extend(["--otlp-protocol", "http/protobuf"]);
        }
        let mut agent = Agent::start(&[server.pid()], &args, &[])?;
        let load = zerotrace_e2e::load::saturate(port, "/hello", 32, Duration::from_secs(3))?;
        ensure!(load.errors == 0 && load.non_2xx == 0, "{kind:?}: the service failed requests: {load:?}");
        rx.settle(load.requests, 60);
        agent.stop()?;
        let spans = rx.spans().into_iter().filter(|s| s.kind == SERVER && s.attr("url.path") == "/hello").count() as u64;
        // Export side, exactly: every span assembled was received or dropped by reason.
        let assembled = agent.stat("spans_assembled");
        let export_drops: u64 =
            ["spans_not_sampled", "spans_dropped_queue_full", "spans_dropped_export_failed", "spans_dropped_rejected", "spans_dropped_shutdown"]
                .iter()
                .map(|r| agent.stat(r))
                .sum();
        ensure!(assembled == agent.stat("spans_exported") + export_drops, "{kind:?}: spans lost in export uncounted: {:?}", agent.stats().ok());
        let counted = agent.counted_losses()?;
        println!(
            "{kind:?}: {} requests served ({:.0}/s) on {} connections: {spans} spans, {counted} counted as lost (kernel ring full: {}; export: {export_drops})",
            load.requests,
            load.rate(),
            load.per_conn.len(),
            agent.stat("events_dropped_ring_full")
        );
        ensure!(spans <= load.requests, "{kind:?}: {spans} spans for {} requests", load.requests);
        ensure!(
            load.requests - spans <= counted,
            "{kind:?}: {} of {} requests served have no span and no counter counts them",
            load.requests - spans - counted,
            load.requests
        );
    }
    Ok(())
}
