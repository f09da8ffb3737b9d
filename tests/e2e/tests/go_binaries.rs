//! Go binaries as people build them: stripped (`-ldflags='-s -w'`, no symbol table, no
//! DWARF: functions from Go's pclntab, offsets from the generated table, runtime types from
//! the module data), position independent (`-buildmode=pie`, load bias), and cgo linked by
//! the system linker. Each gives the same server spans as the plain build, in both probe modes.
use std::time::Duration;

use anyhow::{Result, bail};
use zerotrace_e2e::{
    agent::Agent,
    http::Client,
    otlp::{Kind, RSpan, Receiver},
    proc::start_server,
    tools::{self, GO_NEWEST, GO_OLDEST},
};

/// A request and what its span must say (`route` with Go 1.22+ patterns; empty before).
struct Case {
    path: &'static str,
    status: u16,
    name_with_pattern: &'static str,
    route: &'static str,
    name_without: &'static str,
    url_path: &'static str,
}

const CASES: &[Case] = &[
    Case { path: "/hello", status: 200, name_with_pattern: "GET /hello", route: "/hello", name_without: "GET /hello", url_path: "/hello" },
    Case { path: "/users/42", status: 200, name_with_pattern: "GET /users/{id}", route: "/users/{id}", name_without: "GET /users/42", url_path: "/users/42" },
    Case { path: "/status/503", status: 503, name_with_pattern: "GET /status/", route: "/status/", name_without: "GET /status/503", url_path: "/status/503" },
    Case {
        path: "/nothing/here",
        status: 404,
        name_with_pattern: "GET /nothing/here",
        route: "",
        name_without: "GET /nothing/here",
        url_path: "/nothing/here",
    },
];

/// One way of building tests/e2e/go/httpserver.
struct Build {
    label: &'static str,
    version: &'static str,
    flags: &'static [&'static str],
    cgo: bool,
    /// GoLayout::source the agent must report.
    source: &'static str,
}

fn have_c_compiler() -> bool {
    ["gcc", "cc"].iter().any(|c| std::process::Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()))
}

/// Builds the service (a cgo build without a C compiler is a failure that says what to install).
fn build(b: &Build) -> Result<std::path::PathBuf> {
    if b.cgo {
        if !have_c_compiler() {
            bail!("{}: no C compiler (gcc or cc) is installed, so cgo builds cannot be made: install gcc (`cargo xtask setup` does)", b.label);
        }
        if std::env::var("CGO_ENABLED").is_ok_and(|v| v == "0") {
            bail!("CGO_ENABLED=0 in the environment: unset it to run the cgo case");
        }
    }
    let out = tools::work_dir().join(format!("httpserver-go{}-{}", b.version, b.label.replace(' ', "-")));
    tools::go_build(&tools::go(b.version)?, &tools::root().join("tests/e2e/go/httpserver"), &out, b.flags)?;
    let bytes = std::fs::read(&out)?;
    let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    if b.cgo {
        // Linked by the system linker against libc: it has a program interpreter.
        assert!(has(b"/lib64/ld-linux-x86-64.so.2"), "{}: not a cgo (dynamically linked) build", b.label);
    }
    if b.flags.iter().any(|f| f.contains("-s -w")) {
        assert!(!has(b".debug_info") && !has(b"runtime.types\0"), "{}: not stripped", b.label);
    }
    Ok(out)
}

/// Traces the service in one probe mode and checks every span; returns the agent's log.
fn trace_and_check(b: &Build, bin: &std::path::Path, extra: &[&str]) -> Result<String> {
    let (srv, port) = start_server(&format!("httpserver-{}", b.label), bin)?;
    let rx = Receiver::start(Kind::Grpc, 0)?;
    let endpoint = rx.endpoint();
    let mut args = vec!["--otlp-endpoint", endpoint.as_str(), "--batch-delay", "200ms"];
    args.extend_from_slice(extra);
    let mut agent = Agent::start(&[srv.pid()], &args, &[])?;
    let mut client = Client::new(port);
    let mut sent = Vec::new();
    for _ in 0..2 {
        for case in CASES {
            let r = client.get(case.path)?;
            assert_eq!(r.status, case.status, "{} {}", b.label, case.path);
            sent.push((case, r));
        }
    }
    rx.wait_for(sent.len(), Duration::from_secs(20))?;
    agent.stop()?;
    std::thread::sleep(Duration::from_millis(300));
    let log = agent.proc.stderr_text();
    let mut spans: Vec<RSpan> = rx.spans().into_iter().filter(|s| s.kind == 2).collect();
    assert_eq!(spans.len(), sent.len(), "{}: one server span per request: {log}", b.label);
    spans.sort_by_key(|s| s.start_ns);
    let patterns = b.version != GO_OLDEST;
    for ((case, resp), span) in sent.iter().zip(&spans) {
        let ctx = format!("{} {:?} {} -> {span:#?}", b.label, extra, case.path);
        let (name, route) = if patterns { (case.name_with_pattern, case.route) } else { (case.name_without, "") };
        assert_eq!(span.name, name, "{ctx}");
        assert_eq!(span.attr("http.route"), route, "{ctx}");
        assert_eq!(span.attr("http.request.method"), "GET", "{ctx}");
        assert_eq!(span.attr("url.path"), case.url_path, "{ctx}");
        assert_eq!(span.attr("url.scheme"), "http", "{ctx}");
        assert_eq!(span.attr("http.response.status_code"), case.status.to_string(), "{ctx}");
        assert_eq!(span.attr("server.port"), port.to_string(), "{ctx}");
        assert_eq!(span.attr("network.peer.port"), resp.local_port.to_string(), "{ctx}");
        assert!(span.attr("zerotrace.go.goroutine.id").parse::<u64>().is_ok_and(|g| g > 0), "goroutine id read at g.goid: {ctx}");
        assert_eq!(span.status, if case.status >= 500 { 2 } else { 0 }, "{ctx}");
        assert!(span.duration() <= resp.elapsed, "{ctx}");
    }
    assert_eq!(spans[0].res("process.runtime.version"), format!("go{}", b.version));
    let source = format!("offsets=\"{}\"", b.source);
    assert!(log.contains(&source), "{}: the agent says where offsets came from ({source}): {log}", b.label);
    if extra.contains(&"handler") {
        // Entry (after the stack check) and RET sites found in a function sized by pclntab.
        assert_eq!(agent.stat("uprobe_hits"), 2 * sent.len() as u64, "{}: entry + RET per request", b.label);
        assert_eq!(agent.stat("handler_returns_unmatched"), 0, "{}", b.label);
    }
    drop(srv);
    Ok(log)
}

fn run(b: &Build) -> Result<()> {
    let bin = build(b)?;
    // Default probes (conn mode, goroutine and channel hooks on: every hook is found).
    let log = trace_and_check(b, &bin, &[])?;
    for warning in ["disagree", "UNVERIFIED", "not found"] {
        assert!(!log.contains(warning), "{}: no layout warning for a supported Go version: {log}", b.label);
    }
    // Handler probes: the Go structs are read in the kernel at every request.
    trace_and_check(b, &bin, &["--go-http-probes", "handler", "--go-spawns", "off", "--go-channels", "off"])?;
    Ok(())
}

const STRIP: &str = "-ldflags=-s -w";

#[test]
fn stripped_newest_go() -> Result<()> {
    run(&Build { label: "stripped", version: GO_NEWEST, flags: &[STRIP], cgo: false, source: "table" })
}

#[test]
fn stripped_oldest_go() -> Result<()> {
    run(&Build { label: "stripped", version: GO_OLDEST, flags: &[STRIP], cgo: false, source: "table" })
}

#[test]
fn pie_newest_go() -> Result<()> {
    run(&Build { label: "pie", version: GO_NEWEST, flags: &["-buildmode=pie"], cgo: false, source: "dwarf" })
}

#[test]
fn stripped_pie_newest_go() -> Result<()> {
    run(&Build { label: "stripped pie", version: GO_NEWEST, flags: &["-buildmode=pie", STRIP], cgo: false, source: "table" })
}

#[test]
fn cgo_external_link_newest_go() -> Result<()> {
    run(&Build { label: "cgo", version: GO_NEWEST, flags: &["-ldflags=-linkmode=external"], cgo: true, source: "dwarf" })
}

/// The hardest case: the system linker merges .gopclntab into .data.rel.ro (Go 1.21-1.25)
/// and there are no symbols, so the function table is found by scanning for its header.
#[test]
fn cgo_stripped_pie_oldest_go() -> Result<()> {
    run(&Build { label: "cgo stripped pie", version: GO_OLDEST, flags: &["-buildmode=pie", "-ldflags=-linkmode=external -s -w"], cgo: true, source: "table" })
}
