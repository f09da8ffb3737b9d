//! Targets that misbehave while traced: one killed mid-request, one that execs another
//! program, a pid reused by another program, an executable replaced on disk. The agent
//! never crashes, never exports a span under the wrong process or program, and attaches
//! again correctly (Go in depth, anything else at the socket level).
use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use zerotrace_e2e::{
    agent::Agent,
    http::Client,
    otlp::{Kind, RSpan, Receiver},
    proc::{Proc, die_with_parent, free_port, start_server, wait_for_port, wait_until},
    tools::{self, GO_NEWEST},
};

/// Copies of the test programs under names of this test's own (`--exe` selects them).
fn copies(tag: &str) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let dir = tools::work_dir().join(format!("faults-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let go = dir.join("zt-fault-go");
    let rust = dir.join("zt-fault-rust");
    std::fs::copy(tools::httpserver(GO_NEWEST)?, &go)?;
    std::fs::copy(tools::rust_svc()?, &rust)?;
    Ok((go, rust))
}

fn traced(agent: &Agent, pid: u32) -> bool {
    agent.proc.stderr_text().contains(&format!("tracing pid={pid} "))
}

/// Whether the kernel's LISTEN map (the agent's record of which ports each traced process
/// listens on) holds `pid`'s `port`; read with bpftool.
fn listen_known(pid: u32, port: u16) -> bool {
    let want: Vec<u8> = [pid.to_le_bytes().as_slice(), port.to_le_bytes().as_slice()].concat();
    tools::bpf_map_keys("LISTEN").is_ok_and(|keys| keys.iter().any(|k| k.len() >= 6 && k[..6] == want[..]))
}

fn pid_of(s: &RSpan) -> u32 {
    s.res("process.pid").parse().unwrap_or(0)
}

/// Starts `cmd` as process `pid` (root writes the pid namespace's last pid, then forks; the
/// rest of the machine forks too, so it may take a few tries).
fn spawn_as_pid(cmd: &mut Command, pid: u32) -> Result<Child> {
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    die_with_parent(cmd);
    for _ in 0..200 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).context("writing /proc/sys/kernel/ns_last_pid (needs root)")?;
        let mut c = cmd.spawn()?;
        if c.id() == pid {
            return Ok(c);
        }
        let _ = c.kill();
        let _ = c.wait();
    }
    bail!("could not start a process as pid {pid} in 200 tries")
}

/// A Go target SIGKILLed with a request in flight, its pid then taken by a Rust program that
/// `--exe` also selects: the killed request gets no made-up span, the new program at the old
/// pid is traced as itself (socket level, its own resource), and a new Go target is traced.
#[test]
fn killed_mid_request_and_pid_reused() -> Result<()> {
    let (go, rust) = copies("reuse")?;
    let rx = Receiver::start(Kind::Grpc, 0)?;
    let endpoint = rx.endpoint();
    let mut agent =
        Agent::start_discovering("run", &["--exe", "zt-fault-*", "--otlp-endpoint", endpoint.as_str(), "--batch-delay", "200ms", "--profiles", "off"])?;
    let (mut a, a_port) = start_server("fault-a", &go)?;
    let pid = a.pid();
    wait_until("the Go target to be traced", Duration::from_secs(30), || traced(&agent, pid))?;
    assert_eq!(Client::new(a_port).get("/users/before")?.status, 200);
    // A request that will never be answered: the target dies under it.
    let inflight = std::thread::spawn(move || Client::new(a_port).get("/sleep?ms=5000"));
    std::thread::sleep(Duration::from_millis(500));
    a.child.kill()?;
    a.child.wait()?;
    ensure!(inflight.join().expect("client thread").is_err(), "the in-flight request was answered");
    wait_until("the agent to forget the killed target", Duration::from_secs(20), || agent.proc.stderr_text().contains(&format!("pid={pid} remaining")))?;
    // The same pid, another program (selected too).
    let b_port = free_port();
    let mut b = spawn_as_pid(Command::new(&rust).arg(format!("127.0.0.1:{b_port}")), pid)?;
    wait_for_port(b_port, Duration::from_secs(10))?;
    wait_until("the new program at the reused pid to be traced", Duration::from_secs(30), || {
        agent.proc.stderr_text().matches(&format!("tracing pid={pid} ")).count() >= 2
    })?;
    // The agent read the new program's listening ports at its exec, before it listened: it
    // knows its server sockets once it has read them again (every second; docs/limits.md).
    wait_until("the agent to know the new program's listening port", Duration::from_secs(10), || listen_known(pid, b_port))?;
    for i in 0..5 {
        assert_eq!(Client::new(b_port).get(&format!("/hello?reused={i}"))?.status, 200);
    }
    let (c, c_port) = start_server("fault-c", &go)?;
    wait_until("a new Go target to be traced", Duration::from_secs(30), || traced(&agent, c.pid()))?;
    assert_eq!(Client::new(c_port).get("/users/after")?.status, 200);
    rx.wait_for(7, Duration::from_secs(20))?;
    agent.stop()?;
    ensure!(agent.proc.child.try_wait()?.is_some_and(|s| s.success()), "the agent failed: {}", agent.proc.stderr_text());
    let spans = rx.spans();
    let at_pid: Vec<&RSpan> = spans.iter().filter(|s| pid_of(s) == pid).collect();
    // Before the kill: one Go span; after: five Rust spans; nothing for the killed request.
    let go_spans: Vec<_> = at_pid.iter().filter(|s| s.res("process.runtime.name") == "go").collect();
    assert_eq!(go_spans.len(), 1, "{go_spans:#?}");
    assert_eq!(go_spans[0].attr("url.path"), "/users/before");
    assert!(
        !spans.iter().any(|s| s.attr("url.path") == "/sleep" && s.attr("http.response.status_code") == "200"),
        "a span for the killed request claims success"
    );
    let reused: Vec<_> = at_pid.iter().filter(|s| s.attr("url.path") == "/hello").collect();
    assert_eq!(reused.len(), 5, "the reused pid's requests: {at_pid:#?}");
    for s in reused {
        assert_eq!(s.res("process.executable.name"), "zt-fault-rust", "the new program's own resource: {s:#?}");
        assert_ne!(s.res("process.runtime.name"), "go", "{s:#?}");
    }
    assert!(spans.iter().any(|s| pid_of(s) == c.pid() && s.attr("http.route") == "/users/{id}"), "the new Go target is traced in depth");
    let _ = b.kill();
    let _ = b.wait();
    Ok(())
}

/// A `--pid` target that execs a Go server: the agent drops the old program and attaches
/// to the new one (Go uprobes: route patterns), whose spans carry its own resource.
#[test]
fn a_traced_process_that_execs_is_traced_as_its_new_program() -> Result<()> {
    let (go, _) = copies("exec")?;
    let port = free_port();
    // The shell execs once the agent traces it (it waits for a file the test makes then).
    let go_on = tools::work_dir().join(format!("exec-go-on-{}", std::process::id()));
    let _ = std::fs::remove_file(&go_on);
    let mut cmd = Command::new("bash");
    cmd.args(["-c", &format!("while [ ! -e {} ]; do sleep 0.05; done; exec {} 127.0.0.1:{port}", go_on.display(), go.display())]);
    let p = Proc::spawn("fault-exec", cmd)?;
    let rx = Receiver::start(Kind::Grpc, 0)?;
    let endpoint = rx.endpoint();
    let mut agent = Agent::start(&[p.pid()], &["--otlp-endpoint", endpoint.as_str(), "--batch-delay", "200ms", "--profiles", "off"], &[])?;
    std::fs::write(&go_on, b"go")?;
    wait_for_port(port, Duration::from_secs(20))?;
    wait_until("the agent to attach to the exec'd program", Duration::from_secs(30), || {
        agent.proc.stderr_text().matches(&format!("tracing pid={} ", p.pid())).count() >= 2
    })?;
    for i in 0..3 {
        assert_eq!(Client::new(port).get(&format!("/users/x{i}"))?.status, 200);
    }
    rx.wait_for(3, Duration::from_secs(20))?;
    agent.stop()?;
    let spans = rx.spans();
    assert_eq!(spans.len(), 3, "{spans:#?}");
    for s in &spans {
        assert_eq!((s.res("process.executable.name"), s.res("process.runtime.name")), ("zt-fault-go", "go"), "{s:#?}");
        assert_eq!(s.attr("http.route"), "/users/{id}", "Go uprobes attached to the new program: {s:#?}");
    }
    assert!(agent.proc.stderr_text().contains("exec'd another program"), "{}", agent.proc.stderr_text());
    Ok(())
}

/// The executable of a traced Go process is replaced on disk (a new file renamed over it,
/// as package managers and deploys do): the running process stays traced in depth, and a
/// process started from the new file is traced as the program it is.
#[test]
fn an_executable_replaced_on_disk_while_traced() -> Result<()> {
    let (go, rust) = copies("replace")?;
    let rx = Receiver::start(Kind::Grpc, 0)?;
    let endpoint = rx.endpoint();
    let mut agent =
        Agent::start_discovering("run", &["--exe", "zt-fault-go", "--otlp-endpoint", endpoint.as_str(), "--batch-delay", "200ms", "--profiles", "off"])?;
    let (a, a_port) = start_server("fault-old", &go)?;
    wait_until("the Go target to be traced", Duration::from_secs(30), || traced(&agent, a.pid()))?;
    let tmp = go.with_extension("new");
    std::fs::copy(&rust, &tmp)?;
    std::fs::rename(&tmp, &go)?;
    assert_eq!(Client::new(a_port).get("/users/old")?.status, 200);
    let (b, b_port) = start_server("fault-new", &go)?;
    wait_until("the new program to be traced", Duration::from_secs(30), || traced(&agent, b.pid()))?;
    wait_until("the agent to know the new program's listening port", Duration::from_secs(10), || listen_known(b.pid(), b_port))?;
    assert_eq!(Client::new(b_port).get("/hello?new=1")?.status, 200);
    assert_eq!(Client::new(a_port).get("/users/old2")?.status, 200);
    rx.wait_for(3, Duration::from_secs(20))?;
    agent.stop()?;
    let spans = rx.spans();
    let old: Vec<_> = spans.iter().filter(|s| pid_of(s) == a.pid()).collect();
    let new: Vec<_> = spans.iter().filter(|s| pid_of(s) == b.pid()).collect();
    assert_eq!(old.len(), 2, "{spans:#?}");
    for s in &old {
        assert_eq!((s.res("process.runtime.name"), s.attr("http.route")), ("go", "/users/{id}"), "{s:#?}");
    }
    assert_eq!(new.len(), 1, "{spans:#?}");
    assert_ne!(new[0].res("process.runtime.name"), "go", "{:#?}", new[0]);
    assert_eq!(new[0].attr("url.path"), "/hello");
    Ok(())
}

/// A `--pid` target that execs a program that then exits at once: the agent notices that
/// nothing is left to trace and ends by itself.
#[test]
fn a_pid_target_that_execs_and_exits_ends_the_agent() -> Result<()> {
    let go_on = tools::work_dir().join(format!("exec-true-go-on-{}", std::process::id()));
    let _ = std::fs::remove_file(&go_on);
    let mut cmd = Command::new("bash");
    cmd.args(["-c", &format!("while [ ! -e {} ]; do sleep 0.05; done; exec true", go_on.display())]);
    let p = Proc::spawn("fault-exec-true", cmd)?;
    let mut agent = Agent::start(&[p.pid()], &["--exporter", "none"], &[])?;
    std::fs::write(&go_on, b"go")?;
    let st = agent.proc.wait_timeout(Duration::from_secs(30));
    ensure!(st.is_some_and(|s| s.success()), "the agent did not end by itself: {}", agent.proc.stderr_text());
    ensure!(agent.proc.stderr_text().contains("every traced process has exited"), "{}", agent.proc.stderr_text());
    Ok(())
}
