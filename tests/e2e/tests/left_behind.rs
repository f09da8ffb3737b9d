//! Nothing left behind: every process the demo or the test harness starts ends with them,
//! however they end (an error, a closed output pipe, SIGINT, SIGKILL). Each test looks for
//! survivors by pid or by the addresses in their command lines, after the fact.
use std::{
    io::{BufRead, BufReader, Read},
    net::TcpListener,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use zerotrace_e2e::{proc::wait_until, tools};

/// Whether `pid` runs (a zombie does not: it is dead, only not reaped yet).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// Running processes whose command line contains one of `needles`, with that line.
fn running_with(needles: &[String]) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        let line = String::from_utf8_lossy(&raw).replace('\0', " ");
        if needles.iter().any(|n| line.contains(n.as_str())) && alive(pid) {
            out.push((pid, line));
        }
    }
    out
}

/// Every process below `pid` (children, their children...), from /proc's parent links.
fn descendants(pid: u32) -> Vec<u32> {
    let mut parents = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else { continue };
        // Fields after the command name: state, ppid, ...
        let ppid = stat.rsplit_once(") ").and_then(|(_, rest)| rest.split(' ').nth(1)?.parse::<u32>().ok());
        if let Some(pp) = ppid {
            parents.push((p, pp));
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let cur = out[i];
        out.extend(parents.iter().filter(|(_, pp)| *pp == cur).map(|(p, _)| *p));
        i += 1;
    }
    out.remove(0);
    out
}

/// Four consecutive ports that are free now (the demo takes a base port and the next three).
fn four_free_ports() -> u16 {
    for _ in 0..200 {
        let base = 20000 + fastrand_port() % 20000;
        if (0..4).all(|i| TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return base;
        }
    }
    panic!("no four consecutive free ports between 20000 and 40000")
}

fn fastrand_port() -> u16 {
    (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() % 65521) as u16
}

/// The demo's processes carry their addresses on their command lines.
fn demo_needles(base: u16) -> Vec<String> {
    (0..4).map(|i| format!("127.0.0.1:{}", base + i)).collect()
}

/// `cargo xtask demo` on `base`, with binaries `cargo xtask test` built; stdout piped to us.
fn start_demo(base: u16) -> Result<Child> {
    let mut cmd = Command::new(tools::xtask_bin()?);
    cmd.args(["demo", "--prebuilt", "--rps", "50", "--port", &base.to_string()]);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.env("NO_COLOR", "1").env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
    zerotrace_e2e::proc::die_with_parent(&mut cmd);
    cmd.spawn().context("starting the demo")
}

/// Waits for the demo to exit; its stderr in the error otherwise.
fn wait_exit(demo: &mut Child, within: Duration, stderr: &std::sync::Mutex<String>) -> Result<std::process::ExitStatus> {
    let end = Instant::now() + within;
    loop {
        if let Some(st) = demo.try_wait()? {
            return Ok(st);
        }
        if Instant::now() > end {
            let _ = demo.kill();
            bail!("the demo did not exit within {within:?}; its stderr:\n{}", stderr.lock().unwrap());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Collects a child's stderr on a thread (so that the demo never blocks on it).
fn collect_stderr(demo: &mut Child) -> std::sync::Arc<std::sync::Mutex<String>> {
    let text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut err = demo.stderr.take().expect("piped");
    let t = text.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = err.read(&mut buf) {
            if n == 0 {
                break;
            }
            t.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    text
}

/// Reads the demo's stdout until a whole trace tree (frontend -> reviews -> ratings) has
/// been printed: every service and the agent run then.
fn wait_for_trees(demo: &mut Child, stderr: &std::sync::Mutex<String>) -> Result<BufReader<std::process::ChildStdout>> {
    let mut out = BufReader::new(demo.stdout.take().expect("piped"));
    let end = Instant::now() + Duration::from_secs(240);
    let mut line = String::new();
    while Instant::now() < end {
        line.clear();
        if out.read_line(&mut line)? == 0 {
            bail!("the demo's stdout ended before a trace tree; its stderr:\n{}", stderr.lock().unwrap());
        }
        if line.contains("ratings SERVER") {
            return Ok(out);
        }
    }
    bail!("no trace tree from the demo within 240 s; its stderr:\n{}", stderr.lock().unwrap())
}

/// No process with one of `needles` on its command line runs, nor any of `pids`.
fn assert_none_left(needles: &[String], pids: &[u32], what: &str) {
    // Killed children are reaped by init. A killed agent takes a while to be gone: the
    // kernel removes its uprobes as it exits, one grace period (~0.1 s here) each, ~45 per
    // Go service of the demo.
    let gone = || running_with(needles).is_empty() && pids.iter().all(|p| !alive(*p));
    let _ = wait_until("the demo's processes to end", Duration::from_secs(30), gone);
    let left = running_with(needles);
    let pids_left: Vec<String> = pids
        .iter()
        .copied()
        .filter(|p| alive(*p))
        .map(|p| format!("{p} ({})", std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default().trim()))
        .collect();
    assert!(left.is_empty() && pids_left.is_empty(), "{what}: processes left running: {left:#?}, pids {pids_left:?}");
}

/// A demo that cannot start one of its services (its port is taken) stops the ones it
/// started before failing.
#[test]
fn demo_stops_what_it_started_when_a_port_is_busy() -> Result<()> {
    let base = four_free_ports();
    // The ratings service (base + 3) cannot bind; the catalog started before it.
    let _taken = TcpListener::bind(("127.0.0.1", base + 3))?;
    let mut demo = start_demo(base)?;
    let stderr = collect_stderr(&mut demo);
    let st = wait_exit(&mut demo, Duration::from_secs(240), &stderr)?;
    let text = stderr.lock().unwrap().clone();
    assert!(!st.success(), "the demo succeeded with a busy port; stderr:\n{text}");
    assert!(text.contains("in use"), "the demo's error does not say a port is in use:\n{text}");
    assert!(text.contains("starting catalog"), "the demo failed before starting anything, so this test proves nothing:\n{text}");
    assert_none_left(&demo_needles(base), &[], "after the demo failed on a busy port");
    Ok(())
}

/// `cargo xtask demo | tee log`, then Ctrl-C: the pipe closes and xtask gets SIGINT; the
/// load, the agent and every service stop, and xtask exits.
#[test]
fn demo_stops_everything_when_its_pipe_closes_and_ctrl_c() -> Result<()> {
    let base = four_free_ports();
    let mut demo = start_demo(base)?;
    let stderr = collect_stderr(&mut demo);
    let out = wait_for_trees(&mut demo, &stderr)?;
    let needles = demo_needles(base);
    let before = running_with(&needles);
    assert!(before.len() >= 5, "expected four services and the load generator running, found {before:#?}");
    let children = descendants(demo.id());
    assert!(children.len() >= 6, "expected four services, the agent and the load generator below the demo, found {children:?}");
    drop(out);
    // SAFETY: signalling our own child, as a terminal's Ctrl-C does.
    unsafe { libc::kill(demo.id() as i32, libc::SIGINT) };
    wait_exit(&mut demo, Duration::from_secs(60), &stderr)?;
    assert_none_left(&needles, &children, "after the demo's pipe closed and it got SIGINT");
    Ok(())
}

/// Only the pipe closes (the reader went away, no signal): the agent's output fails, the
/// agent detaches, and the demo stops everything and exits.
#[test]
fn demo_stops_everything_when_only_its_pipe_closes() -> Result<()> {
    let base = four_free_ports();
    let mut demo = start_demo(base)?;
    let stderr = collect_stderr(&mut demo);
    let out = wait_for_trees(&mut demo, &stderr)?;
    let children = descendants(demo.id());
    assert!(children.len() >= 6, "expected four services, the agent and the load generator below the demo, found {children:?}");
    drop(out);
    wait_exit(&mut demo, Duration::from_secs(60), &stderr)?;
    assert_none_left(&demo_needles(base), &children, "after the demo's pipe closed");
    Ok(())
}

/// xtask SIGKILLed (no code of it runs): its children die with it.
#[test]
fn demo_children_die_when_the_demo_is_killed() -> Result<()> {
    let base = four_free_ports();
    let mut demo = start_demo(base)?;
    let stderr = collect_stderr(&mut demo);
    let _out = wait_for_trees(&mut demo, &stderr)?;
    let needles = demo_needles(base);
    let children = descendants(demo.id());
    assert!(children.len() >= 6, "expected four services, the agent and the load generator below the demo, found {children:?}");
    demo.kill()?;
    demo.wait()?;
    assert_none_left(&needles, &children, "after the demo was SIGKILLed");
    Ok(())
}

/// The test harness's children (services and the agent, started through `Proc` like in every
/// e2e test) die when the test binary is SIGKILLed mid-test.
#[test]
fn harness_children_die_with_a_killed_test_binary() -> Result<()> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_e2e-spawner"));
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    zerotrace_e2e::proc::die_with_parent(&mut cmd);
    let mut spawner = cmd.spawn()?;
    let stderr = collect_stderr(&mut spawner);
    let mut line = String::new();
    BufReader::new(spawner.stdout.take().expect("piped")).read_line(&mut line)?;
    let pids: Vec<u32> = line.strip_prefix("pids ").map(|l| l.split_whitespace().filter_map(|p| p.parse().ok()).collect()).unwrap_or_default();
    if pids.len() != 3 {
        let _ = spawner.kill();
        bail!("the spawner did not start its children (said {line:?}); its stderr:\n{}", stderr.lock().unwrap());
    }
    assert!(pids.iter().all(|p| alive(*p)), "a child of the spawner was not running before the kill");
    spawner.kill()?;
    spawner.wait()?;
    wait_until("the harness's children to die with it", Duration::from_secs(5), || pids.iter().all(|p| !alive(*p)))
        .with_context(|| format!("still running: {:?}", pids.iter().filter(|p| alive(**p)).collect::<Vec<_>>()))?;
    Ok(())
}
