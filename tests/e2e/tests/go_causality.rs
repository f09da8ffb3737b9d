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
    proc::{Proc, free_port, wait_for_port},
    tools::{self, GO_NEWEST, GO_OLDEST},
};

const SERVER: i32 = 2;
const CLIENT: i32 = 3;

struct Services {
    front: Proc,
    down: Proc,
    front_port: u16,
    down_port: u16,
}

fn start(version: &str) -> Result<Services> {
    start_bin(version, &tools::causal(version)?)
}

fn start_bin(version: &str, bin: &std::path::Path) -> Result<Services> {
    let bin = bin.to_path_buf();
    let down_port = free_port();
    let mut cmd = Command::new(&bin);
    cmd.arg(format!("127.0.0.1:{down_port}"));
    let down = Proc::spawn(&format!("causal-down-{version}"), cmd)?;
    wait_for_port(down_port, Duration::from_secs(10))?;
    let front_port = free_port();
    let mut cmd = Command::new(&bin);
    cmd.arg(format!("127.0.0.1:{front_port}")).arg(format!("http://127.0.0.1:{down_port}"));
    let front = Proc::spawn(&format!("causal-front-{version}"), cmd)?;
    wait_for_port(front_port, Duration::from_secs(10))?;
    Ok(Services { front, down, front_port, down_port })
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
    assert_eq!(client.kind, CLIENT, "{client:#?}");
    assert_eq!(client.name, "GET");
    assert_eq!(client.trace_id, parent.trace_id, "client span in its parent's trace");
    assert_eq!(client.parent_span_id, parent.span_id);
    assert_eq!(client.attr("url.full"), format!("http://127.0.0.1:{down_port}{leaf_path}"));
    assert_eq!(client.attr("server.address"), "127.0.0.1");
    assert_eq!(client.attr("server.port"), down_port.to_string());
    assert_eq!(client.attr("http.request.method"), "GET");
    assert_eq!(client.res("process.pid"), parent.res("process.pid"), "the client span is the calling process's");
    let leaf = f.children(client);
    assert_eq!(leaf.len(), 1, "one downstream server span under the client span {client:#?}: {leaf:#?}");
    let leaf = leaf[0];
    assert_eq!(leaf.kind, SERVER);
    assert_eq!(leaf.attr("url.path"), leaf_path);
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
    assert_eq!(spans.len(), want, "no more, no fewer spans: {:#?}", spans.iter().map(|s| (&s.name, s.attr("url.path"), s.attr("url.full"))).collect::<Vec<_>>());
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
/// the request's span: statement text (never argument values), operation, table, errors.
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
        let got: Vec<(&str, &str, &str, i32)> =
            kids.iter().map(|k| (k.name.as_str(), k.attr("db.operation.name"), k.attr("db.query.text"), k.status)).collect();
        assert_eq!(
            got,
            vec![
                ("SELECT items", "SELECT", "SELECT name FROM items WHERE id = ?", 0),
                ("UPDATE stock", "UPDATE", "UPDATE stock SET n = n - 1 WHERE id = ?", 0),
                ("SELECT broken", "SELECT", "SELECT x FROM broken", 2),
                ("INSERT audit", "INSERT", "INSERT INTO audit(id) VALUES (?)", 0),
            ],
            "Go {version}"
        );
        for k in &kids {
            assert_eq!(k.kind, CLIENT);
            assert_eq!(k.trace_id, root.trace_id);
            assert_eq!(k.attr("db.system.name"), "other_sql");
            assert!(!format!("{:?}", k.attrs).contains("42"), "argument values are never captured: {k:#?}");
            assert!(root.start_ns <= k.start_ns && k.end_ns <= root.end_ns);
        }
        assert_eq!(kids[0].attr("db.collection.name"), "items");
        assert_eq!(kids[2].attr("error.type"), "_OTHER");
    }
    Ok(())
}
