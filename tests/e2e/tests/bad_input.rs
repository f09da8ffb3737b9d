//! Bad input gets a clear error and changes nothing; trouble while tracing (collector down,
//! a target exiting) is survived, counted and reported.
use std::{process::Command, time::Duration};

use anyhow::Result;
use zerotrace_e2e::{
    agent::Agent,
    http::Client,
    otlp::{Kind, Receiver},
    proc::{Proc, start_server, wait_until},
    tools,
};

/// Runs the agent to completion and returns (exit code, stderr).
fn run_to_end(pids: &[u32], extra: &[&str], env: &[(&str, &str)]) -> Result<(i32, String)> {
    let mut a = Agent::spawn(pids, extra, env)?;
    let st = a.proc.wait_timeout(Duration::from_secs(30)).expect("the agent exits by itself");
    Ok((st.code().unwrap_or(-1), a.proc.stderr_text()))
}

#[test]
fn a_pid_that_does_not_exist() -> Result<()> {
    let pid = (400_000..4_000_000).find(|p| !std::path::Path::new(&format!("/proc/{p}")).exists()).unwrap();
    let (code, err) = run_to_end(&[pid], &["--exporter", "none"], &[])?;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(&format!("no process with PID {pid}")) && err.contains("ps -p"), "{err}");
    Ok(())
}

/// A program that is not Go is no error any more: it is traced at the socket level, and
/// the agent says so; detaching leaves it running.
#[test]
fn a_pid_that_is_not_a_go_program_is_traced_at_the_socket_level() -> Result<()> {
    let sleeper = Proc::spawn("sleep", {
        let mut c = Command::new("sleep");
        c.arg("60");
        c
    })?;
    let mut agent = Agent::start(&[sleeper.pid()], &["--exporter", "none"], &[])?;
    let err = agent.proc.stderr_text();
    assert!(err.contains("layer=\"socket\""), "{err}");
    assert!(err.contains("native program (not Go)"), "says what it does instead: {err}");
    let st = agent.stop()?;
    assert!(st.success(), "{st:?}");
    assert!(std::path::Path::new(&format!("/proc/{}", sleeper.pid())).exists());
    Ok(())
}

/// Stripped binaries used to be refused; now they are traced with the generated offsets
/// table (go_binaries.rs checks their spans), and the agent says so.
#[test]
fn a_stripped_go_binary_is_traced_with_the_offsets_table() -> Result<()> {
    let out = tools::work_dir().join("httpserver-stripped");
    tools::go_build(&tools::go(tools::GO_NEWEST)?, &tools::root().join("tests/e2e/go/httpserver"), &out, &["-ldflags=-s -w"])?;
    let (mut srv, _) = start_server("stripped", &out)?;
    let mut agent = Agent::spawn(&[srv.pid()], &["--exporter", "none"], &[])?;
    wait_until("the agent attaches", Duration::from_secs(20), || agent.proc.stderr_text().contains("offsets=\"table\""))?;
    // When its only target exits, the agent exits cleanly.
    srv.signal(libc::SIGTERM);
    srv.wait_timeout(Duration::from_secs(10));
    let st = agent.proc.wait_timeout(Duration::from_secs(30)).expect("the agent exits by itself");
    assert_eq!(st.code(), Some(0), "{}", agent.proc.stderr_text());
    Ok(())
}

#[test]
fn without_privileges_the_agent_says_what_it_needs() -> Result<()> {
    let (srv, _) = start_server("httpserver", &tools::httpserver(tools::GO_NEWEST)?)?;
    let bin = tools::zerotrace_bin()?;
    let unprivileged = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"])
            .arg(&bin)
            .args(args)
            .env("NO_COLOR", "1")
            .output()
            .expect("setpriv runs")
    };
    let out = unprivileged(&["run", "--pid", &srv.pid().to_string(), "--exporter", "none"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("needs more privileges") && err.contains("CAP_BPF") && err.contains("root"), "{err}");
    let doctor = unprivileged(&["doctor"]);
    let text = String::from_utf8_lossy(&doctor.stdout);
    assert_eq!(doctor.status.code(), Some(1), "{text}");
    assert!(text.contains("privileges      missing"), "{text}");
    assert!(text.contains("zerotrace cannot trace here: privileges: missing CAP_BPF"), "{text}");
    Ok(())
}

/// A forced hook set is used where the kernel has it, and refused in one line where it
/// does not (this machine forbids tracing programs, so `socket-fentry` is refused here; the
/// VM kernels of `cargo xtask vmtest` run it).
#[test]
fn a_forced_hook_set_is_used_or_refused_in_one_line() -> Result<()> {
    let (srv, _) = start_server("httpserver", &tools::httpserver(tools::GO_NEWEST)?)?;
    let doctor = Command::new(tools::zerotrace_bin()?).arg("doctor").env("NO_COLOR", "1").output()?;
    let report = String::from_utf8_lossy(&doctor.stdout).into_owned();
    let row = report.lines().find(|l| l.starts_with("socket-fentry ")).unwrap_or_else(|| panic!("doctor has a socket-fentry row: {report}")).to_owned();
    if row.contains(" ok ") {
        let agent = Agent::start(&[srv.pid()], &["--exporter", "none", "--socket-hooks", "fentry"], &[])?;
        assert!(agent.proc.stderr_text().contains("socket_hooks=\"socket-fentry\""), "{}", agent.proc.stderr_text());
        return Ok(());
    }
    let (code, err) = run_to_end(&[srv.pid()], &["--exporter", "none", "--socket-hooks", "fentry"], &[])?;
    assert_eq!(code, 2, "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {err}");
    assert!(lines[0].contains("--socket-hooks socket-fentry:") && lines[0].contains("fentry") && lines[0].contains("Linux 5.10"), "{err}");
    assert!(row.contains("missing"), "doctor names the gap: {row}");
    Ok(())
}

#[test]
fn invalid_settings_name_the_key() -> Result<()> {
    let (srv, _) = start_server("httpserver", &tools::httpserver(tools::GO_NEWEST)?)?;
    let (code, err) = run_to_end(&[srv.pid()], &[], &[("OTEL_EXPORTER_OTLP_PROTOCOL", "thrift")])?;
    assert_eq!(code, 2);
    assert!(err.contains("OTEL_EXPORTER_OTLP_PROTOCOL") && err.contains("grpc or http/protobuf"), "{err}");
    Ok(())
}

#[test]
fn a_collector_that_is_down_then_back() -> Result<()> {
    let (srv, port) = start_server("httpserver", &tools::httpserver(tools::GO_NEWEST)?)?;
    let mut rx = Receiver::start(Kind::Grpc, 0)?;
    rx.stop();
    let endpoint = rx.endpoint();
    let mut agent = Agent::start(
        &[srv.pid()],
        &["--otlp-endpoint", &endpoint, "--batch-queue", "50", "--batch-size", "10", "--batch-delay", "100ms", "--otlp-timeout", "1s"],
        &[],
    )?;
    let mut client = Client::new(port);
    for _ in 0..300 {
        client.get("/hello")?;
    }
    // The agent keeps running with the collector down, and says so.
    wait_until("the agent to report failing exports", Duration::from_secs(15), || agent.proc.stderr_text().contains("OTLP export failed"))?;
    assert!(agent.proc.child.try_wait()?.is_none(), "the agent is still running");
    rx.restart()?;
    // Tracing resumes: new requests reach the collector.
    let mut got_new = false;
    wait_until("spans of requests made after the collector came back", Duration::from_secs(40), || {
        let _ = client.get("/users/after");
        got_new = rx.spans().iter().any(|s| s.attr("url.path") == "/users/after");
        got_new
    })?;
    agent.stop()?;
    assert!(agent.proc.stderr_text().contains("OTLP export works again"), "{}", agent.proc.stderr_text());
    let dropped = agent.stat("spans_dropped_queue_full") + agent.stat("spans_dropped_export_failed");
    assert!(dropped > 0, "spans beyond the bounded queue are dropped and counted: {:?}", agent.stats()?);
    assert!(agent.stat("export_errors") > 0);
    assert!(agent.stat("spans_exported") > 0);
    let assembled = agent.stat("spans_assembled");
    assert_eq!(assembled, agent.stat("spans_queued") + agent.stat("spans_dropped_queue_full"), "every span is accounted for");
    Ok(())
}

#[test]
fn a_target_that_exits_while_traced() -> Result<()> {
    let bin = tools::httpserver(tools::GO_NEWEST)?;
    let (mut first, _) = start_server("first", &bin)?;
    let (second, port2) = start_server("second", &bin)?;
    let rx = Receiver::start(Kind::Grpc, 0)?;
    let mut agent = Agent::start(&[first.pid(), second.pid()], &["--otlp-endpoint", &rx.endpoint(), "--batch-delay", "100ms"], &[])?;
    let first_pid = first.pid();
    first.child.kill()?;
    first.child.wait()?;
    wait_until("the agent to notice the exit", Duration::from_secs(10), || {
        agent.proc.stderr_text().lines().any(|l| l.contains("traced process exited") && l.contains(&format!("pid={first_pid} ")))
    })
    .map_err(|e| anyhow::anyhow!("{e}: {}", agent.proc.stderr_text()))?;
    // The other target is still traced.
    let mut c = Client::new(port2);
    c.get("/users/7")?;
    let spans = rx.wait_for(1, Duration::from_secs(10))?;
    assert_eq!(spans[0].res("process.pid"), second.pid().to_string());
    assert_eq!(spans[0].name, "GET /users/{id}");
    // When the last target exits, the agent finishes on its own.
    drop(second);
    let st = agent.proc.wait_timeout(Duration::from_secs(20)).expect("the agent exits when nothing is left to trace");
    assert!(st.success(), "{}", agent.proc.stderr_text());
    assert!(agent.proc.stderr_text().contains("every traced process has exited"));
    Ok(())
}
