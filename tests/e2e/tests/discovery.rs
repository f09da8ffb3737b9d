//! `--exe` discovery, end to end: a Go service running before the agent and one started
//! after it are both traced (the second joins the uprobes attached once for their shared
//! executable, and gets every span once), a restarted service is traced again under its new
//! pid, and a process whose executable does not match is left alone.
use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Result;
use zerotrace_e2e::{
    agent::Agent,
    http::Client,
    otlp::{Kind, Receiver},
    proc::{Proc, free_port, wait_for_port, wait_until},
    tools::{self, GO_NEWEST},
};

fn serve(bin: &std::path::Path, name: &str, port: u16) -> Result<Proc> {
    serve_calling(bin, name, port, None)
}

/// `serve`, with the routes that call `downstream` (a base URL) when it is given.
fn serve_calling(bin: &std::path::Path, name: &str, port: u16, downstream: Option<&str>) -> Result<Proc> {
    let mut cmd = Command::new(bin);
    cmd.arg(format!("127.0.0.1:{port}"));
    cmd.args(downstream);
    let p = Proc::spawn(name, cmd)?;
    wait_for_port(port, Duration::from_secs(10))?;
    Ok(p)
}

/// Waits until the agent says it traces `pid`; returns how long that took.
fn traced_within(agent: &Agent, pid: u32, limit: Duration) -> Result<Duration> {
    let t0 = Instant::now();
    let needle = format!("tracing pid={pid} ");
    wait_until(&format!("the agent to trace {pid}"), limit, || agent.proc.stderr_text().contains(&needle))?;
    Ok(t0.elapsed())
}

#[test]
fn processes_are_found_by_executable_now_and_later() -> Result<()> {
    let bin = tools::causal(GO_NEWEST)?;
    let exe_name = bin.file_name().unwrap().to_string_lossy().into_owned();
    let other = tools::httpserver(GO_NEWEST)?;
    let before_port = free_port();
    let before = serve(&bin, "disc-before", before_port)?;
    let rx = Receiver::start(Kind::Grpc, 0)?;
    let endpoint = rx.endpoint();
    let mut agent = Agent::start_discovering("run", &["--exe", &exe_name, "--otlp-endpoint", endpoint.as_str(), "--batch-delay", "200ms"])?;
    traced_within(&agent, before.pid(), Duration::from_secs(1))?;

    // Started after the agent: attached at its exec, before it serves (the port is
    // accepting only once main runs). It runs the same file as `before`, so it joins the
    // uprobes attached for `before` and attaches none of its own.
    let after_port = free_port();
    let t0 = Instant::now();
    let after = serve_calling(&bin, "disc-after", after_port, Some(&format!("http://127.0.0.1:{before_port}")))?;
    traced_within(&agent, after.pid(), Duration::from_secs(5))?;
    eprintln!("process started and traced within {:?}", t0.elapsed());
    // Its work in three spawned goroutines, each calling `before`: the joined process's
    // uprobes (spawns, client calls) and the first one's (its server) each give every span
    // once.
    assert_eq!(Client::new(after_port).get("/fanout/shared")?.status, 200);
    // A Go program with another executable name: never traced.
    let unrelated_port = free_port();
    let mut cmd = Command::new(&other);
    cmd.arg(format!("127.0.0.1:{unrelated_port}"));
    let unrelated = Proc::spawn("disc-unrelated", cmd)?;
    std::thread::sleep(Duration::from_millis(1500));

    for port in [before_port, after_port] {
        assert_eq!(Client::new(port).get("/leaf/x")?.status, 200);
    }
    // Restarted: a new process under a new pid, traced again.
    let after_pid = after.pid();
    drop(after);
    let again = serve(&bin, "disc-again", after_port)?;
    assert_ne!(again.pid(), after_pid);
    traced_within(&agent, again.pid(), Duration::from_secs(5))?;
    assert_eq!(Client::new(after_port).get("/leaf/y")?.status, 200);

    rx.wait_for(10, Duration::from_secs(20))?;
    agent.stop()?;
    let log = agent.proc.stderr_text();
    let spans = rx.spans();
    let joined = log.lines().find(|l| l.contains(&format!("tracing pid={after_pid} "))).unwrap_or("");
    assert!(joined.contains("shared=true"), "the second process shares the file's uprobes: {log}");
    let of = |pid: u32, kind: i32, path: &str| -> Vec<&zerotrace_e2e::otlp::RSpan> {
        spans.iter().filter(|s| s.res("process.pid") == pid.to_string() && s.kind == kind && s.attr("url.path").starts_with(path)).collect()
    };
    let fanout = of(after_pid, 2, "/fanout/shared");
    assert_eq!(fanout.len(), 1, "server spans of /fanout/shared: {fanout:?}");
    let calls: Vec<_> = spans.iter().filter(|s| s.kind == 3 && s.attr("url.full").contains("/leaf/fanout-shared-")).collect();
    assert_eq!(calls.len(), 3, "client spans of the fan-out: {calls:?}");
    assert!(
        calls.iter().all(|c| c.res("process.pid") == after_pid.to_string() && c.parent_span_id == fanout[0].span_id),
        "client spans under the request: {calls:?}"
    );
    let served = of(before.pid(), 2, "/leaf/fanout-shared-");
    assert_eq!(served.len(), 3, "server spans of the fan-out's calls in the first process: {served:?}");
    let pids: Vec<String> = spans.iter().map(|s| s.res("process.pid").to_string()).collect();
    for p in [before.pid(), after_pid, again.pid()] {
        assert!(pids.contains(&p.to_string()), "a span from pid {p}: {pids:?}\n{log}");
    }
    assert!(!log.contains(&format!("tracing pid={} ", unrelated.pid())), "{log}");
    assert!(log.contains(&format!("pid={after_pid}")) && log.contains("traced process exited"), "{log}");
    Ok(())
}

/// `--port`: the process listening on the port is traced, also when it starts after the
/// agent; one on another port is not. `--all`: every Go process with its uprobes, every
/// other process at the socket level (also one started later), never the agent itself.
#[test]
fn processes_are_found_by_port_and_all() -> Result<()> {
    let bin = tools::causal(GO_NEWEST)?;
    let (port, other_port) = (free_port(), free_port());
    let mut agent = Agent::start_discovering("run", &["--port", &port.to_string(), "--exporter", "none"])?;
    let svc = serve(&bin, "port-svc", port)?;
    let other = serve(&bin, "port-other", other_port)?;
    // Ports are looked at every second.
    traced_within(&agent, svc.pid(), Duration::from_secs(5))?;
    std::thread::sleep(Duration::from_millis(2500));
    agent.stop()?;
    let log = agent.proc.stderr_text();
    assert!(!log.contains(&format!("tracing pid={} ", other.pid())), "{log}");

    let sleeper = Proc::spawn("not-go", {
        let mut c = Command::new("sleep");
        c.arg("60");
        c
    })?;
    let mut agent = Agent::start_discovering("run", &["--all", "--exporter", "none"])?;
    traced_within(&agent, svc.pid(), Duration::from_secs(2))?;
    traced_within(&agent, other.pid(), Duration::from_secs(2))?;
    traced_within(&agent, sleeper.pid(), Duration::from_secs(2))?;
    let late_port = free_port();
    let late = serve(&bin, "all-late", late_port)?;
    traced_within(&agent, late.pid(), Duration::from_secs(5))?;
    let rust_port = free_port();
    let rust = Proc::spawn("all-rust", {
        let mut c = Command::new(tools::rust_svc()?);
        c.arg(format!("127.0.0.1:{rust_port}"));
        c
    })?;
    traced_within(&agent, rust.pid(), Duration::from_secs(5))?;
    agent.stop()?;
    let log = agent.proc.stderr_text();
    let line = |pid: u32| log.lines().find(|l| l.contains(&format!("tracing pid={pid} "))).unwrap_or("").to_owned();
    assert!(line(sleeper.pid()).contains("layer=\"socket\""), "{log}");
    assert!(line(rust.pid()).contains("layer=\"socket\"") && line(rust.pid()).contains("runtime=\"rust\""), "{log}");
    assert!(line(late.pid()).contains("go=go"), "Go with uprobes: {log}");
    assert!(!log.contains(&format!("tracing pid={} ", agent.proc.pid())), "never itself: {log}");
    assert!(!log.contains("ERROR"), "{log}");
    Ok(())
}

/// A Go executable whose uprobes are shared (`--exe`) is rewritten in place after its
/// process exited (`cp` over it: the kernel allows it once nothing runs it), while the agent
/// keeps those uprobes for the file's next process. The kernel keeps each uprobe's copy of
/// the instruction it replaced: a program started from the new file with them in place
/// would run the old file's instructions at the old offsets. The writer waits until they
/// are gone (the agent's read lease on the file), so the new program (another Go server)
/// starts, serves and is traced as what it is now.
#[test]
fn an_executable_rewritten_in_place_never_meets_the_old_uprobes() -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dir = tools::work_dir().join("rewrite");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("zt-rewrite-svc");
    let _ = std::fs::remove_file(&path);
    std::fs::copy(tools::causal(GO_NEWEST)?, &path)?;
    let agent = Agent::start_discovering("run", &["--exe", "zt-rewrite-*", "--exporter", "none"])?;
    let first = serve(&path, "rewrite-first", free_port())?;
    let first_pid = first.pid();
    traced_within(&agent, first_pid, Duration::from_secs(5))?;
    drop(first);
    wait_until("the agent to forget the first process", Duration::from_secs(10), || {
        agent.proc.stderr_text().lines().any(|l| l.contains("traced process exited") && l.contains(&format!("pid={first_pid}")))
    })?;
    assert!(!agent.proc.stderr_text().contains("is being written"), "no writer yet");

    // In place: the same inode, another program's bytes.
    let ino = std::fs::metadata(&path)?.ino();
    let t0 = Instant::now();
    {
        let mut out = std::fs::OpenOptions::new().write(true).truncate(true).open(&path)?;
        std::io::copy(&mut std::fs::File::open(tools::httpserver(GO_NEWEST)?)?, &mut out)?;
    }
    eprintln!("the writer waited {:?} for the uprobes to go", t0.elapsed());
    assert_eq!(std::fs::metadata(&path)?.ino(), ino, "rewritten in place");
    let log = agent.proc.stderr_text();
    assert!(log.contains("is being written"), "the agent saw the writer: {log}");

    let port = free_port();
    let mut second = serve(&path, "rewrite-second", port)?;
    traced_within(&agent, second.pid(), Duration::from_secs(5))?;
    let mut client = Client::new(port);
    for i in 0..50 {
        assert_eq!(client.get(&format!("/users/{i}"))?.status, 200, "the rewritten program serves");
    }
    assert!(second.child.try_wait()?.is_none(), "the rewritten program runs on: {}", second.stderr_text());
    Ok(())
}
