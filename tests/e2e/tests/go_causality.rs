//! Causal span trees, end to end: a Go front service hands work to other goroutines in the
//! ways Go programs do (spawn, WaitGroup fan-out, nested spawns, worker pools over
//! unbuffered and buffered channels, select with a timeout) and calls a downstream Go
//! service from there, with no header propagation anywhere. Both run as separate processes
//! traced by one agent; trees are asserted by structure (trace ids, parent ids, kinds,
//! names, attributes) from what a real OTLP receiver got.
use std::{collections::HashMap, process::Command, time::Duration};

use anyhow::Result;
use zerotrace_e2e::{
    agent::Agent,
    http::Client,
    otlp::{Kind, RSpan, Receiver},
    proc::{CausalPair, Proc, causal_pair, free_port, wait_for_port},
    tools::{self, GO_NEWEST, GO_OLDEST},
};

const SERVER: i32 = 2;
const CLIENT: i32 = 3;

type Services = CausalPair;

fn start(version: &str) -> Result<Services> {
    start_bin(version, &tools::causal(version)?)
}

fn start_bin(version: &str, bin: &std::path::Path) -> Result<Services> {
    causal_pair(bin, &format!("causal-{version}"), "http", &|_| {})
}

fn agent(s: &Services, rx: &Receiver, extra: &[&str]) -> Result<Agent> {
    let endpoint = rx.endpoint();
    let mut args = vec!["--otlp-endpoint", endpoint.as_str(), "--batch-delay", "200ms"];
    args.extend_from_slice(extra);
    Agent::start(&[s.front.pid(), s.down.pid()], &args, &[])
}

/// Spans by id, and children by parent id.
struct Forest<'a> {
    by_id: HashMap<&'a str, &'a RSpan>,
    children: HashMap<&'a str, Vec<&'a RSpan>>,
}

impl<'a> Forest<'a> {
    fn new(spans: &'a [RSpan]) -> Self {
        let mut by_id = HashMap::new();
        let mut children: HashMap<&str, Vec<&RSpan>> = HashMap::new();
        for s in spans {
            assert!(by_id.insert(s.span_id.as_str(), s).is_none(), "duplicate span id {}", s.span_id);
            if !s.parent_span_id.is_empty() {
                children.entry(s.parent_span_id.as_str()).or_default().push(s);
            }
        }
        Forest { by_id, children }
    }

    /// The front server span of request `path`.
    fn server(&self, path: &str) -> &'a RSpan {
        let found: Vec<_> = self.by_id.values().filter(|s| s.kind == SERVER && s.attr("url.path") == path).collect();
        assert_eq!(found.len(), 1, "one server span for {path}: {:#?}", found);
        found[0]
    }

    fn children(&self, parent: &RSpan) -> Vec<&'a RSpan> {
        let mut v = self.children.get(parent.span_id.as_str()).cloned().unwrap_or_default();
        v.sort_by(|a, b| a.attr("url.full").cmp(b.attr("url.full")));
        v
    }

    fn root(&self, mut s: &'a RSpan) -> &'a RSpan {
        for _ in 0..32 {
            match self.by_id.get(s.parent_span_id.as_str()) {
                Some(p) => s = p,
                None => return s,
            }
        }
        panic!("parent chain of {} too long (cycle?)", s.span_id);
    }
}

/// A client span under `parent` that called `leaf_path` downstream, and the downstream
/// server span under it; both in the parent's trace.
fn assert_call(f: &Forest, parent: &RSpan, client: &RSpan, down_port: u16, leaf_path: &str) {
    assert_call_over(f, parent, client, "http", down_port, leaf_path)
}

fn assert_call_over(f: &Forest, parent: &RSpan, client: &RSpan, scheme: &str, down_port: u16, leaf_path: &str) {
    assert_eq!(client.kind, CLIENT, "{client:#?}");
    assert_eq!(client.name, "GET");
    assert_eq!(client.trace_id, parent.trace_id, "client span in its parent's trace");
    assert_eq!(client.parent_span_id, parent.span_id);
    assert_eq!(client.attr("url.full"), format!("{scheme}://127.0.0.1:{down_port}{leaf_path}"));
    assert_eq!(client.attr("server.address"), "127.0.0.1");
    assert_eq!(client.attr("server.port"), down_port.to_string());
    assert_eq!(client.attr("http.request.method"), "GET");
    assert_eq!(client.res("process.pid"), parent.res("process.pid"), "the client span is the calling process's");
    let leaf = f.children(client);
    assert_eq!(leaf.len(), 1, "one downstream server span under the client span {client:#?}: {leaf:#?}");
    let leaf = leaf[0];
    assert_eq!(leaf.kind, SERVER);
    assert_eq!(leaf.attr("url.path"), leaf_path);
    assert_eq!(leaf.attr("url.scheme"), scheme);
    assert_eq!(leaf.trace_id, parent.trace_id, "linked across processes without any header");
    assert_ne!(leaf.res("process.pid"), parent.res("process.pid"));
    assert_eq!(client.attr("http.response.status_code"), leaf.attr("http.response.status_code"));
    assert!(client.start_ns <= leaf.start_ns && leaf.end_ns <= client.end_ns + 1_000_000, "server inside client: {client:#?} {leaf:#?}");
}

/// Sends one request per case and checks every tree.
fn check_trees(version: &str) -> Result<()> {
    check_trees_of(start(version)?)
}

fn check_trees_of(s: Services) -> Result<()> {
    let rx = Receiver::start(Kind::Grpc, 0)?;
    let mut agent = agent(&s, &rx, &[])?;
    let mut c = Client::new(s.front_port);
    let cases: &[(&str, u16)] = &[
        ("/sync/1", 200),
        ("/fanout/2", 200),
        ("/nested/3", 200),
        ("/unbuffered/4", 200),
        ("/buffered/5", 200),
        ("/select/6", 200),
        ("/fail/7", 502),
        ("/err5xx/8", 500),
    ];
    for (path, status) in cases {
        assert_eq!(c.get(path)?.status, *status, "{path}");
    }
    // Front server spans 8, client spans 1+3+1+1+1+2+1+1 = 11, downstream server spans 10.
    let want = 8 + 11 + 10;
    rx.wait_for(want, Duration::from_secs(20))?;
    agent.stop()?;
    let spans = rx.spans();
    assert_eq!(
        spans.len(),
        want,
        "no more, no fewer spans: {:#?}",
        spans.iter().map(|s| (&s.name, s.attr("url.path"), s.attr("url.full"))).collect::<Vec<_>>()
    );
    let f = Forest::new(&spans);
    let dp = s.down_port;

    let leaf_calls = |path: &str, leaves: &[&str]| {
        let root = f.server(path);
        assert!(root.parent_span_id.is_empty(), "{path} is a root");
        let kids = f.children(root);
        assert_eq!(kids.len(), leaves.len(), "{path}: client spans under the handler's span: {kids:#?}");
        for (k, leaf) in kids.iter().zip(leaves) {
            assert_call(&f, root, k, dp, leaf);
        }
    };
    leaf_calls("/sync/1", &["/leaf/sync-1"]);
    leaf_calls("/fanout/2", &["/leaf/fanout-2-0", "/leaf/fanout-2-1", "/leaf/fanout-2-2"]);
    leaf_calls("/nested/3", &["/leaf/nested-3"]);
    leaf_calls("/unbuffered/4", &["/leaf/unbuffered-4"]);
    leaf_calls("/buffered/5", &["/leaf/buffered-5"]);
    leaf_calls("/select/6", &["/leaf/select-timeout-6", "/leaf/select-worker-6"]);

    // A transport error: the client span is an error without a status code.
    let root = f.server("/fail/7");
    assert_eq!(root.status, 2, "502 is a server error");
    let kids = f.children(root);
    assert_eq!(kids.len(), 1);
    let k = kids[0];
    assert_eq!((k.kind, k.status), (CLIENT, 2), "{k:#?}");
    assert_eq!(k.attr("url.full"), "http://127.0.0.1:1/unreachable");
    assert_eq!(k.attr("http.response.status_code"), "");
    assert_eq!(k.attr("error.type"), "_OTHER");
    assert!(f.children(k).is_empty());

    // A downstream 503 under a front 500: both errors, the client span too.
    let root = f.server("/err5xx/8");
    assert_eq!(root.status, 2);
    let kids = f.children(root);
    assert_eq!(kids.len(), 1);
    assert_call(&f, root, kids[0], dp, "/status/503");
    assert_eq!(kids[0].status, 2);
    assert_eq!(kids[0].attr("error.type"), "503");
    assert_eq!(f.children(kids[0])[0].status, 2);

    // Each request is its own trace.
    let traces: std::collections::HashSet<_> = spans.iter().map(|s| s.trace_id.as_str()).collect();
    assert_eq!(traces.len(), cases.len(), "one trace per request");
    assert!(agent.stat("goroutines_inherited_span") >= 3 + 3, "fan-out and nested spawns inherited");
    assert!(agent.stat("channel_edges") >= 2, "worker pools got their jobs' spans");
    assert_eq!(agent.stat("server_spans_linked"), 10, "every downstream request linked to its client span");
    Ok(())
}

#[test]
fn span_trees_newest_go() -> Result<()> {
    check_trees(GO_NEWEST)
}

#[test]
fn span_trees_oldest_go() -> Result<()> {
    check_trees(GO_OLDEST)
}

/// Many requests at once over every path: every downstream span's tree ends at the front
/// request that caused it (the id in the path), never at another one.
#[test]
fn concurrent_requests_keep_their_trees_apart() -> Result<()> {
    let s = start(GO_NEWEST)?;
    let rx = Receiver::start(Kind::Grpc, 0)?;
    let mut agent = agent(&s, &rx, &[])?;
    const N: usize = 200;
    let routes = ["sync", "fanout", "unbuffered", "buffered", "nested"];
    let port = s.front_port;
    let handles: Vec<_> = (0..8)
        .map(|t| {
            std::thread::spawn(move || -> Result<()> {
                let mut c = Client::new(port);
                for i in (t..N).step_by(8) {
                    let route = routes[i % routes.len()];
                    let r = c.get(&format!("/{route}/{i}"))?;
                    anyhow::ensure!(r.status == 200, "/{route}/{i}: {}", r.status);
                }
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join().expect("client thread")?;
    }
    // Per request: sync/unbuffered/buffered/nested 3 spans, fanout 7.
    let want: usize = (0..N).map(|i| if routes[i % routes.len()] == "fanout" { 7 } else { 3 }).sum();
    rx.wait_for(want, Duration::from_secs(30))?;
    agent.stop()?;
    let spans = rx.spans();
    assert_eq!(spans.len(), want);
    let f = Forest::new(&spans);
    let mut leaves = 0;
    for leaf in spans.iter().filter(|s| s.kind == SERVER && s.attr("url.path").starts_with("/leaf/")) {
        leaves += 1;
        // /leaf/<route>-<id>, or /leaf/fanout-<id>-<k>
        let path = leaf.attr("url.path");
        let parts: Vec<&str> = path.trim_start_matches("/leaf/").split('-').collect();
        let root = f.root(leaf);
        assert_eq!(root.attr("url.path"), format!("/{}/{}", parts[0], parts[1]), "leaf {path} ends at the request that caused it");
        assert_eq!(root.trace_id, leaf.trace_id);
        assert!(root.parent_span_id.is_empty());
        assert_eq!(root.kind, SERVER);
        let client = f.by_id[leaf.parent_span_id.as_str()];
        assert_eq!(client.kind, CLIENT);
        assert!(client.attr("url.full").ends_with(path));
    }
    let fanouts = (0..N).filter(|i| routes[i % routes.len()] == "fanout").count();
    assert_eq!(leaves, (N - fanouts) + 3 * fanouts, "every downstream span checked");
    Ok(())
}

/// The goroutine and channel hooks are switches: off, the spans they would have linked are
/// roots of their own traces (never wrongly linked), and their hooks are not attached.
#[test]
fn causality_switches_off() -> Result<()> {
    let s = start(GO_NEWEST)?;
    let rx = Receiver::start(Kind::Grpc, 0)?;
    let mut agent = agent(&s, &rx, &["--go-spawns", "off", "--go-channels", "off"])?;
    assert!(agent.proc.stderr_text().contains("spawns=false channels=false"), "{}", agent.proc.stderr_text());
    let mut c = Client::new(s.front_port);
    assert_eq!(c.get("/sync/1")?.status, 200);
    assert_eq!(c.get("/fanout/2")?.status, 200);
    rx.wait_for(3 + 7, Duration::from_secs(20))?;
    agent.stop()?;
    let spans = rx.spans();
    let f = Forest::new(&spans);
    // The synchronous call needs no goroutine hook for its client span; its request is
    // written by Transport's writer goroutine, which learns the span over a channel: with
    // channels off the downstream span stays a root (unlinked, not wrongly linked).
    let root = f.server("/sync/1");
    let kids = f.children(root);
    assert_eq!(kids.len(), 1);
    assert_eq!(kids[0].kind, CLIENT);
    assert!(f.children(kids[0]).is_empty());
    // Fan-out clients run in spawned goroutines: unlinked without the spawn hook.
    let root = f.server("/fanout/2");
    assert!(f.children(root).is_empty(), "{:#?}", f.children(root));
    for leaf in spans.iter().filter(|s| s.attr("url.path").starts_with("/leaf/")) {
        assert!(leaf.parent_span_id.is_empty(), "{leaf:#?}");
    }
    assert_eq!(agent.stat("goroutines_spawned"), 0);
    assert_eq!(agent.stat("channel_handoffs"), 0);
    Ok(())
}

/// The same trees with every supported Go minor version (runtime layouts and channel code
/// differ between them: g.goid and hchan fields moved in 1.23, sudog in 1.26, timers changed).
#[test]
fn span_trees_every_go_version() -> Result<()> {
    for version in &tools::GO_MATRIX[1..tools::GO_MATRIX.len() - 1] {
        check_trees(version).map_err(|e| e.context(format!("Go {version}")))?;
    }
    Ok(())
}

/// A stripped PIE build (functions from the pclntab, offsets from the generated table, the
/// channel CALL sites decoded from pclntab-sized functions) gives the same trees.
#[test]
fn span_trees_stripped_pie() -> Result<()> {
    for version in [GO_OLDEST, GO_NEWEST] {
        let bin = tools::causal_built(version, "-stripped-pie", &["-buildmode=pie", "-ldflags=-s -w"])?;
        check_trees_of(start_bin(version, &bin)?).map_err(|e| e.context(format!("stripped PIE, Go {version}")))?;
    }
    Ok(())
}

/// An incoming traceparent roots the whole tree, across goroutines and processes.
/// HTTPS end to end: a front and a downstream Go service that both serve TLS (a
/// self-signed certificate made for the test; HTTP/2 left enabled on the servers), requests
/// from a client process of their own over one keep-alive TLS connection, and the front's
/// HTTPS calls downstream (keep-alive too). The server spans come from crypto/tls plaintext,
/// the trees are the same as over plain HTTP.
#[test]
fn https_servers_and_clients() -> Result<()> {
    for version in [GO_OLDEST, GO_NEWEST] {
        check_https(version, false)?;
    }
    Ok(())
}

/// The same trees over HTTP/2 (TLS with ALPN, as Go's clients and servers negotiate by
/// default): every client speaks h2, so the front's three fan-out calls are concurrent
/// streams on one connection. Each server span is its stream's (two uprobe hits at
/// runHandler), parent of the handler's calls, and linked to the client stream that
/// caused it by connection and stream id, with no header. Go 1.21 and 1.24 (net/http's
/// bundled HTTP/2) and 1.27 (its own package).
#[test]
fn http2_servers_and_clients() -> Result<()> {
    for version in [GO_OLDEST, tools::GO_MATRIX[3], GO_NEWEST] {
        check_https(version, true).map_err(|e| e.context(format!("HTTP/2, Go {version}")))?;
    }
    Ok(())
}

fn check_https(version: &str, h2: bool) -> Result<()> {
    let bin = tools::causal(version)?;
    let dir = tools::work_dir().join(format!("tls-{version}-{h2}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let st = Command::new(&bin).arg("gencert").arg(&dir).status()?;
    assert!(st.success(), "gencert");
    let tls = |cmd: &mut Command| {
        cmd.env("CAUSAL_TLS_DIR", &dir);
        if h2 {
            cmd.env("CAUSAL_H2", "1");
        }
    };
    let label = if h2 { "causal-h2" } else { "causal-tls" };
    let s = causal_pair(&bin, &format!("{label}-{version}"), "https", &tls)?;
    let front_port = s.front_port;

    let rx = Receiver::start(Kind::Grpc, 0)?;
    let mut agent = agent(&s, &rx, &[])?;
    let paths = ["/sync/1", "/sync/2", "/fanout/3", "/err5xx/4"];
    let mut get = Command::new(&bin);
    get.arg("get").args(paths.iter().map(|p| format!("https://127.0.0.1:{front_port}{p}")));
    tls(&mut get);
    let out = get.output()?;
    assert!(out.status.success(), "client: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200\n200\n200\n500\n");
    // Front server spans 4, client spans 1+1+3+1, downstream server spans 6.
    let mut want = 4 + 6 + 6;
    // Over HTTP/2 also a request that carries a traceparent (curl, ALPN h2): it roots its
    // tree, the Go client's streams link the rest.
    let (trace, parent) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    if h2 {
        let tp = format!("traceparent: 00-{trace}-{parent}-01");
        let out = Command::new("curl")
            .args(["-sk", "--http2", "-o", "/dev/null", "-w", "%{http_code} %{http_version}", "-H", &tp])
            .arg(format!("https://127.0.0.1:{front_port}/fanout/9"))
            .output()?;
        assert_eq!(String::from_utf8_lossy(&out.stdout), "200 2", "curl: {}", String::from_utf8_lossy(&out.stderr));
        want += 7;
    }
    rx.wait_for(want, Duration::from_secs(20))?;
    agent.stop()?;
    let spans = rx.spans();
    assert_eq!(spans.len(), want, "Go {version}: {:#?}", spans.iter().map(|s| (&s.name, s.attr("url.path"), s.attr("url.full"))).collect::<Vec<_>>());
    let f = Forest::new(&spans);
    if h2 {
        let root = f.server("/fanout/9");
        assert_eq!(root.parent_span_id, parent, "{root:#?}");
        let tree: Vec<&RSpan> = spans.iter().filter(|s| s.trace_id == trace).collect();
        assert_eq!(tree.len(), 7, "{tree:#?}");
        for sp in tree {
            assert_eq!(f.root(sp).span_id, root.span_id, "every span under the request's span: {sp:#?}");
        }
    }
    let dp = s.down_port;
    for (path, leaves) in [
        ("/sync/1", &["/leaf/sync-1"][..]),
        ("/sync/2", &["/leaf/sync-2"]),
        ("/fanout/3", &["/leaf/fanout-3-0", "/leaf/fanout-3-1", "/leaf/fanout-3-2"]),
        ("/err5xx/4", &["/status/503"]),
    ] {
        let root = f.server(path);
        assert!(root.parent_span_id.is_empty(), "{path} is a root");
        assert_eq!(root.attr("url.scheme"), "https", "{root:#?}");
        // Go 1.21's ServeMux keeps no pattern on the request, and from 1.27 an HTTP/2
        // handler's request is made where no hook sees it: no route there.
        let routed = version != GO_OLDEST && !(h2 && version == GO_NEWEST);
        let route = if routed { format!("/{}/", path.split('/').nth(1).unwrap()) } else { String::new() };
        assert_eq!(root.attr("http.route"), route, "{root:#?}");
        assert_eq!(root.attr("network.protocol.version"), if h2 { "2" } else { "1.1" }, "{root:#?}");
        assert_eq!(root.attr("server.port"), front_port.to_string(), "{root:#?}");
        assert_eq!(root.attr("client.address"), "127.0.0.1", "{root:#?}");
        let kids = f.children(root);
        assert_eq!(kids.len(), leaves.len(), "Go {version} {path}: {kids:#?}");
        for (k, leaf) in kids.iter().zip(leaves) {
            assert_call_over(&f, root, k, "https", dp, leaf);
            if h2 {
                assert_eq!(f.children(k)[0].attr("network.protocol.version"), "2");
            }
        }
    }
    assert_eq!(f.server("/sync/1").attr("http.response.status_code"), "200");
    assert_eq!(f.server("/err5xx/4").attr("http.response.status_code"), "500");
    assert_eq!(agent.stat("server_spans_linked"), if h2 { 9 } else { 6 }, "every downstream request linked to its client span");
    assert_eq!(agent.stat("requests_not_http"), 0);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Whether this kernel lets eBPF write into process memory: no lockdown (securityfs is
/// mounted first if needed, as the agent does).
fn kernel_allows_writes() -> bool {
    let file = std::path::Path::new("/sys/kernel/security/lockdown");
    if !file.exists() {
        let _ = Command::new("mount").args(["-t", "securityfs", "securityfs", "/sys/kernel/security"]).status();
    }
    match std::fs::read_to_string(file) {
        Ok(s) => s.contains("[none]"),
        Err(_) => true,
    }
}

/// `--inject-traceparent` across three traced Go processes A -> B -> C on this host. Where
/// the kernel allows writing (no lockdown): one trace, and the header C received names B's
/// client span (so a service zerotrace does not see would continue the trace too). Under
/// lockdown: `on` is refused with a message that says why, and `dry-run` runs the same
/// kernel decisions without the write, reported on the client spans. Either way: a request
/// that carries the application's own traceparent gets no second one, and a request whose
/// writer has no room for the line is left as it is.
#[test]
fn injected_traceparent_chains_three_processes() -> Result<()> {
    // Oldest and newest: Header maps are hash maps in one and Swiss tables in the other.
    for version in [GO_OLDEST, GO_NEWEST] {
        check_injection(version)?;
    }
    Ok(())
}

fn check_injection(version: &str) -> Result<()> {
    let bin = tools::causal(version)?;
    let serve = |name: &str, down: Option<u16>| -> Result<(Proc, u16)> {
        let port = free_port();
        let mut cmd = Command::new(&bin);
        cmd.arg(format!("127.0.0.1:{port}"));
        if let Some(d) = down {
            cmd.arg(format!("http://127.0.0.1:{d}"));
        }
        let p = Proc::spawn(name, cmd)?;
        wait_for_port(port, Duration::from_secs(10))?;
        Ok((p, port))
    };
    let (c_proc, c_port) = serve("inject-c", None)?;
    let (b_proc, b_port) = serve("inject-b", Some(c_port))?;
    let (a_proc, a_port) = serve("inject-a", Some(b_port))?;
    let pids = [a_proc.pid(), b_proc.pid(), c_proc.pid()];
    let rx = Receiver::start(Kind::Grpc, 0)?;
    let endpoint = rx.endpoint();
    let writes = kernel_allows_writes();
    let base = ["--otlp-endpoint", endpoint.as_str(), "--batch-delay", "200ms"];
    if !writes {
        let refused = Agent::start(&pids, &[&base[..], &["--inject-traceparent"]].concat(), &[]);
        let err = format!("{:#}", refused.err().expect("--inject-traceparent is refused under lockdown"));
        assert!(err.contains("--inject-traceparent: the kernel is locked down (integrity)") || err.contains("locked down"), "{err}");
    }
    let mode = if writes { "--inject-traceparent=on" } else { "--inject-traceparent=dry-run" };
    let mut agent = Agent::start(&pids, &[&base[..], &[mode]].concat(), &[])?;
    let mut client = Client::new(a_port);
    let chained = client.get("/chain/1")?;
    assert_eq!(chained.status, 200);
    let own = client.get("/ownctx/2")?;
    let full = client.get("/full/3")?;
    let (t_in, p_in) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let joined = client.request("GET", "/chain/4", &[("traceparent", &format!("00-{t_in}-{p_in}-01"))])?;
    // chains: 3 server + 2 client spans each; ownctx and full: A server, A client, B server.
    let want = 5 + 3 + 3 + 5;
    rx.wait_for(want, Duration::from_secs(20))?;
    agent.stop()?;
    let spans = rx.spans();
    assert_eq!(spans.len(), want, "{:#?}", spans.iter().map(|s| (&s.name, s.attr("url.path"), s.attr("url.full"))).collect::<Vec<_>>());
    let f = Forest::new(&spans);

    // Every hop serves /chain/1: A's span is the root.
    let a = spans.iter().find(|s| s.kind == SERVER && s.attr("url.path") == "/chain/1" && s.parent_span_id.is_empty()).expect("A's span");
    let chain: Vec<&RSpan> = spans.iter().filter(|s| s.trace_id == a.trace_id).collect();
    assert_eq!(chain.len(), 5, "A -> B -> C is one trace: {chain:#?}");
    let a_client = &f.children(a)[..];
    assert_eq!(a_client.len(), 1);
    let b = &f.children(a_client[0])[..];
    assert_eq!((b.len(), b[0].kind, b[0].attr("url.path")), (1, SERVER, "/chain/1"));
    let b_client = &f.children(b[0])[..];
    assert_eq!(b_client.len(), 1);
    let c = &f.children(b_client[0])[..];
    assert_eq!((c.len(), c[0].attr("url.path")), (1, "/chain/1"));
    assert_ne!(c[0].res("process.pid"), b[0].res("process.pid"));
    // The header each hop carries (or would carry): the exported trace, the client span.
    let outcome = if writes { "written" } else { "dry-run" };
    for cs in [a_client[0], b_client[0]] {
        assert_eq!(cs.attr("zerotrace.traceparent.outcome"), outcome, "{cs:#?}");
        assert_eq!(cs.attr("zerotrace.traceparent"), format!("00-{}-{}-01", a.trace_id, cs.span_id), "{cs:#?}");
    }
    // What C received on the wire.
    let header = String::from_utf8_lossy(&chained.body).into_owned();
    if writes {
        assert_eq!(header, format!("00-{}-{}-01", a.trace_id, b_client[0].span_id), "traceparent C received");
    } else {
        assert_eq!(header, "", "dry-run writes nothing");
    }

    // The application's own traceparent is sent alone, and B joins that trace.
    assert_eq!(String::from_utf8_lossy(&own.body), "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
    let own_client = spans.iter().find(|s| s.kind == CLIENT && s.attr("url.full").ends_with("/echo/2")).expect("ownctx client span");
    assert_eq!(own_client.attr("zerotrace.traceparent.outcome"), "request has its own");
    let own_b = spans.iter().find(|s| s.kind == SERVER && s.attr("url.path") == "/echo/2").expect("B span of ownctx");
    assert_eq!((own_b.trace_id.as_str(), own_b.parent_span_id.as_str()), ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"));

    // No room in the writer's buffer: nothing written, the request is intact.
    assert_eq!(full.status, 200);
    assert_eq!(String::from_utf8_lossy(&full.body), "", "no header when the buffer has no room");
    let full_client = spans.iter().find(|s| s.kind == CLIENT && s.attr("url.full").ends_with("/echo/3")).expect("full client span");
    assert_eq!(full_client.attr("zerotrace.traceparent.outcome"), "no room in the write buffer");
    let full_b = spans.iter().find(|s| s.kind == SERVER && s.attr("url.path") == "/echo/3").expect("B span of full");
    assert_eq!(full_b.trace_id, f.server("/full/3").trace_id, "still linked through the TCP connection");

    // A chain whose request came with a traceparent: the kernel parsed it, so the headers
    // A and B write name the caller's trace too.
    let a4 = spans.iter().find(|s| s.kind == SERVER && s.attr("url.path") == "/chain/4" && s.parent_span_id == p_in).expect("A's span of /chain/4");
    let chain4: Vec<&RSpan> = spans.iter().filter(|s| s.trace_id == t_in).collect();
    assert_eq!(chain4.len(), 5, "{chain4:#?}");
    let a4_client = f.children(a4)[0];
    let b4_client = f.children(f.children(a4_client)[0])[0];
    for cs in [a4_client, b4_client] {
        assert_eq!(cs.attr("zerotrace.traceparent"), format!("00-{t_in}-{}-01", cs.span_id), "{cs:#?}");
    }
    if writes {
        assert_eq!(String::from_utf8_lossy(&joined.body), format!("00-{t_in}-{}-01", b4_client.span_id));
    }

    let decided = if writes { "traceparent_injected" } else { "traceparent_dry_run" };
    assert_eq!(agent.stat(decided), 4, "A->B and B->C of both chains");
    assert_eq!(agent.stat("traceparent_no_room"), 1);
    assert_eq!(agent.stat("traceparent_skipped"), 1, "the request with its own header");
    assert_eq!(agent.stat("traceparent_write_failed"), 0);
    Ok(())
}

/// The sampled flag of an injected traceparent follows the agent's sampler: with a ratio of
/// 0 every trace is dropped here, so the headers say "not sampled" (`-00`) and a
/// parent-based sampler downstream drops them too; where the kernel allows writing, C
/// receives exactly that on the wire (under lockdown the same decisions run in dry-run).
#[test]
fn injected_traceparent_follows_the_sampler() -> Result<()> {
    let bin = tools::causal(GO_NEWEST)?;
    let serve = |name: &str, down: Option<u16>| -> Result<(Proc, u16)> {
        let port = free_port();
        let mut cmd = Command::new(&bin);
        cmd.arg(format!("127.0.0.1:{port}"));
        if let Some(d) = down {
            cmd.arg(format!("http://127.0.0.1:{d}"));
        }
        let p = Proc::spawn(name, cmd)?;
        wait_for_port(port, Duration::from_secs(10))?;
        Ok((p, port))
    };
    let (c_proc, c_port) = serve("sampled-c", None)?;
    let (b_proc, b_port) = serve("sampled-b", Some(c_port))?;
    let (a_proc, a_port) = serve("sampled-a", Some(b_port))?;
    let pids = [a_proc.pid(), b_proc.pid(), c_proc.pid()];
    let writes = kernel_allows_writes();
    let mode = if writes { "--inject-traceparent=on" } else { "--inject-traceparent=dry-run" };
    let args = ["--exporter", "none", "--sampler", "traceidratio", "--sampler-arg", "0", mode];
    let mut agent = Agent::start(&pids, &args, &[])?;
    let mut client = Client::new(a_port);
    let r = client.get("/chain/1")?;
    assert_eq!(r.status, 200);
    // An incoming sampled flag does not matter to a sampler that is not parent-based.
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let joined = client.request("GET", "/chain/2", &[("traceparent", tp)])?;
    std::thread::sleep(Duration::from_millis(500));
    agent.stop()?;
    let header = String::from_utf8_lossy(&r.body).into_owned();
    if writes {
        assert!(header.starts_with("00-") && header.ends_with("-00"), "C received {header:?}: the trace was dropped, so not sampled");
        let joined = String::from_utf8_lossy(&joined.body).into_owned();
        assert!(joined.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && joined.ends_with("-00"), "{joined:?}");
    } else {
        assert_eq!(header, "", "dry-run writes nothing");
    }
    let decided = if writes { "traceparent_injected" } else { "traceparent_dry_run" };
    assert_eq!(agent.stat(decided), 4, "A->B and B->C of both requests");
    assert_eq!(agent.stat("traceparent_unsampled"), 4, "each with the sampled flag off");
    assert!(agent.stat("spans_not_sampled") >= 10, "the agent dropped those traces: {}", agent.stat("spans_not_sampled"));
    Ok(())
}

#[test]
fn incoming_traceparent_roots_the_tree() -> Result<()> {
    let s = start(GO_NEWEST)?;
    let rx = Receiver::start(Kind::Grpc, 0)?;
    let mut agent = agent(&s, &rx, &[])?;
    let (trace, parent) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let tp = format!("00-{trace}-{parent}-01");
    let mut c = Client::new(s.front_port);
    let r = c.request("GET", "/fanout/9", &[("traceparent", &tp), ("tracestate", "vendor=x")])?;
    assert_eq!(r.status, 200);
    rx.wait_for(7, Duration::from_secs(20))?;
    agent.stop()?;
    let spans = rx.spans();
    assert_eq!(spans.len(), 7);
    let f = Forest::new(&spans);
    let root = f.server("/fanout/9");
    assert_eq!(root.parent_span_id, parent);
    for sp in &spans {
        assert_eq!(sp.trace_id, trace, "{sp:#?}");
        assert_eq!(f.root(sp).span_id, root.span_id, "every span under the request's span");
    }
    Ok(())
}

/// database/sql calls inside a handler (and in a goroutine it spawns) are CLIENT spans under
/// the request's span: statement text (its literals replaced by `?`, never argument values), its summary, errors.
#[test]
fn sql_inside_a_handler() -> Result<()> {
    for version in [GO_OLDEST, GO_NEWEST] {
        let s = start(version)?;
        let rx = Receiver::start(Kind::Grpc, 0)?;
        let mut agent = agent(&s, &rx, &[])?;
        assert!(agent.proc.stderr_text().contains("sql_spans=true"), "{}", agent.proc.stderr_text());
        let mut c = Client::new(s.front_port);
        assert_eq!(c.get("/sql/42")?.status, 200);
        rx.wait_for(5, Duration::from_secs(20))?;
        agent.stop()?;
        let spans = rx.spans();
        assert_eq!(spans.len(), 5, "Go {version}: {spans:#?}");
        let f = Forest::new(&spans);
        let root = f.server("/sql/42");
        let mut kids = f.children(root);
        kids.sort_by_key(|k| k.start_ns);
        let got: Vec<(&str, &str, &str, i32)> = kids.iter().map(|k| (k.name.as_str(), k.attr("db.query.summary"), k.attr("db.query.text"), k.status)).collect();
        assert_eq!(
            got,
            vec![
                ("SELECT items", "SELECT items", "SELECT name FROM items WHERE id = ?", 0),
                ("UPDATE stock", "UPDATE stock", "UPDATE stock SET n = n - ? WHERE id = ?", 0),
                ("SELECT broken", "SELECT broken", "SELECT x FROM broken", 2),
                ("INSERT audit", "INSERT audit", "INSERT INTO audit(id) VALUES (?)", 0),
            ],
            "Go {version}"
        );
        for k in &kids {
            assert_eq!(k.kind, CLIENT);
            assert_eq!(k.trace_id, root.trace_id);
            // An in-process driver zerotrace does not know; no socket, so no server.
            assert_eq!(k.attr("db.system.name"), "other_sql");
            assert_eq!(k.attr("server.address"), "");
            // The argument is 42; thread and goroutine ids are numbers that may contain it.
            let leaked = k.attrs.iter().any(|(key, v)| key != "thread.id" && key != "zerotrace.go.goroutine.id" && v.contains("42"));
            assert!(!leaked, "argument values are never captured: {k:#?}");
            assert!(root.start_ns <= k.start_ns && k.end_ns <= root.end_ns);
        }
        assert_eq!(kids[2].attr("error.type"), "_OTHER");
        assert_eq!(kids[2].attr("db.response.status_code"), "");
    }
    Ok(())
}

/// HTTP/1 pipelining over TLS (Go crypto/tls, conn mode): a client (Python's ssl, not
/// traced) writes three requests in one TLS write; the server answers them one by one, and
/// each gets its own server span from the plaintext (path, status, in order).
#[test]
fn https_pipelined_requests() -> Result<()> {
    let bin = tools::causal(GO_NEWEST)?;
    let dir = tools::work_dir().join(format!("tls-pipe-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    assert!(Command::new(&bin).arg("gencert").arg(&dir).status()?.success(), "gencert");
    let port = zerotrace_e2e::proc::free_port();
    let mut cmd = Command::new(&bin);
    cmd.arg(format!("127.0.0.1:{port}")).env("CAUSAL_TLS_DIR", &dir).env("OTEL_SERVICE_NAME", "tls-pipe");
    let server = zerotrace_e2e::proc::Proc::spawn("tls-pipe", cmd)?;
    zerotrace_e2e::proc::wait_for_port(port, Duration::from_secs(10))?;
    let rx = Receiver::start(Kind::Grpc, 0)?;
    let endpoint = rx.endpoint();
    let mut agent = Agent::start(&[server.pid()], &["--otlp-endpoint", &endpoint, "--batch-delay", "200ms"], &[])?;
    let script = r#"
import socket, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[2])
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", int(sys.argv[1]))), server_hostname="127.0.0.1")
paths = ["/leaf/a", "/status/404", "/leaf/b"]
s.sendall(b"".join(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % p.encode() for p in paths))
f = s.makefile("rb")
for _ in paths:
    status = f.readline().split()[1].decode()
    n = 0
    while True:
        line = f.readline().strip()
        if not line:
            break
        k, _, v = line.partition(b":")
        if k.lower() == b"content-length":
            n = int(v)
    f.read(n)
    print(status)
"#;
    let out = Command::new(tools::python()?).arg("-c").arg(script).arg(port.to_string()).arg(dir.join("cert.pem")).output()?;
    assert!(out.status.success(), "client: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200\n404\n200\n");
    rx.wait_for(3, Duration::from_secs(20))?;
    std::thread::sleep(Duration::from_millis(700));
    agent.stop()?;
    let mut spans = rx.spans();
    spans.sort_by_key(|s| s.end_ns);
    let got: Vec<(&str, &str, &str)> = spans.iter().map(|s| (s.attr("url.path"), s.attr("http.response.status_code"), s.attr("url.scheme"))).collect();
    assert_eq!(got, [("/leaf/a", "200", "https"), ("/status/404", "404", "https"), ("/leaf/b", "200", "https")], "{spans:#?}");
    Ok(())
}

/// HTTP/2 in the clear: two services behind golang.org/x/net's h2c handler (x/net v0.28.0
/// from the offline module sources), the front calling the other with Go's own client over
/// unencrypted HTTP/2 (Go 1.24+), requests from curl with prior knowledge. Each stream is
/// one server span from x/net's runHandler (two hits), the front's call sits under its
/// stream, the downstream stream under the call (linked by connection and stream id), and a
/// request's traceparent roots its span. Go 1.24 and 1.27, and 1.27 stripped as a PIE (the
/// x/net layout by its version).
#[test]
fn h2c_servers_and_clients() -> Result<()> {
    for (version, tag, flags) in [(tools::GO_MATRIX[3], "", &[][..]), (GO_NEWEST, "", &[]), (GO_NEWEST, "-stripped-pie", &["-buildmode=pie", "-ldflags=-s -w"])]
    {
        check_h2c(version, tag, flags).map_err(|e| e.context(format!("h2c, Go {version}{tag}")))?;
    }
    Ok(())
}

fn check_h2c(version: &str, tag: &str, flags: &[&str]) -> Result<()> {
    let bin = tools::h2cshop(version, tag, flags)?;
    let serve = |name: &str, down: Option<u16>| -> Result<(Proc, u16)> {
        let port = free_port();
        let mut cmd = Command::new(&bin);
        cmd.arg(format!("127.0.0.1:{port}"));
        if let Some(d) = down {
            cmd.arg(format!("http://127.0.0.1:{d}"));
        }
        let p = Proc::spawn(name, cmd)?;
        wait_for_port(port, Duration::from_secs(10))?;
        Ok((p, port))
    };
    let (down, down_port) = serve("h2c-down", None)?;
    let (front, front_port) = serve("h2c-front", Some(down_port))?;
    let rx = Receiver::start(Kind::Grpc, 0)?;
    let endpoint = rx.endpoint();
    let mut agent = Agent::start(&[front.pid(), down.pid()], &["--otlp-endpoint", endpoint.as_str(), "--batch-delay", "200ms"], &[])?;
    let (trace, parent) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let curl = |path: &str, extra: &[&str]| -> Result<String> {
        let out = Command::new("curl")
            .args(["-s", "--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_code} %{http_version}"])
            .args(extra)
            .arg(format!("http://127.0.0.1:{front_port}{path}"))
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    assert_eq!(curl("/call/1", &[])?, "200 2");
    assert_eq!(curl("/call/missing", &[])?, "404 2");
    assert_eq!(curl("/leaf/tp", &["-H", &format!("traceparent: 00-{trace}-{parent}-01")])?, "200 2");
    rx.wait_for(7, Duration::from_secs(20))?;
    agent.stop()?;
    let log = agent.proc.stderr_text();
    assert!(!log.contains("layout differs"), "{log}");
    let spans = rx.spans();
    assert_eq!(spans.len(), 7, "{:#?}", spans.iter().map(|s| (&s.name, s.attr("url.path"), s.attr("url.full"))).collect::<Vec<_>>());
    let f = Forest::new(&spans);
    for (path, leaf, status) in [("/call/1", "/leaf/1", "200"), ("/call/missing", "/leaf/missing", "404")] {
        let root = f.server(path);
        assert!(root.parent_span_id.is_empty(), "{root:#?}");
        assert_eq!((root.attr("network.protocol.version"), root.attr("url.scheme")), ("2", "http"), "{root:#?}");
        assert_eq!((root.attr("http.route"), root.attr("http.response.status_code")), ("/call/", status), "{root:#?}");
        assert_eq!(root.attr("server.port"), front_port.to_string(), "{root:#?}");
        let kids = f.children(root);
        assert_eq!(kids.len(), 1, "{path}: {kids:#?}");
        assert_call_over(&f, root, kids[0], "http", down_port, leaf);
        assert_eq!(f.children(kids[0])[0].attr("network.protocol.version"), "2");
    }
    let tp = f.server("/leaf/tp");
    assert_eq!((tp.trace_id.as_str(), tp.parent_span_id.as_str()), (trace, parent), "{tp:#?}");
    assert_eq!(agent.stat("server_spans_linked"), 2);
    Ok(())
}
