//! Child processes that are killed when the test is done (even on panic) and die with the
//! test binary (even when it is SIGKILLed), free ports, and waiting for things with a deadline.
use std::{
    net::{TcpListener, TcpStream},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// Makes the process `cmd` starts die (SIGKILL) when the thread that starts it ends, which
/// for the harness and xtask means when the test binary or xtask ends, however it ends: a
/// SIGKILLed parent runs no code, so only the kernel can stop its children then
/// (PR_SET_PDEATHSIG). Drop guards cover every exit path that does run code. The signal is
/// tied to the spawning *thread*: spawn long-lived children from the thread that owns them
/// (a test's own thread, xtask's main thread), never from a helper thread that ends first.
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
    // SAFETY: getpid before the fork; the closure runs in the child between fork and exec
    // and only calls async-signal-safe functions (prctl, getppid, _exit).
    let parent = unsafe { libc::getpid() };
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl: then nobody will signal us.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        })
    }
}

/// A running child; SIGKILLed on drop unless it already exited, and when the test binary
/// dies (`die_with_parent`).
pub struct Proc {
    pub child: Child,
    pub name: String,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with stdout/stderr going to files named after `name` in target/e2e.
    pub fn spawn(name: &str, mut cmd: Command) -> Result<Proc> {
        let dir = crate::tools::work_dir().join("logs");
        std::fs::create_dir_all(&dir)?;
        let tag = format!("{name}-{}", std::process::id());
        let stdout = dir.join(format!("{tag}.out"));
        let stderr = dir.join(format!("{tag}.err"));
        cmd.stdin(Stdio::null()).stdout(std::fs::File::create(&stdout)?).stderr(std::fs::File::create(&stderr)?);
        die_with_parent(&mut cmd);
        let child = cmd.spawn().with_context(|| format!("spawning {name}: {cmd:?}"))?;
        Ok(Proc { child, name: name.to_owned(), stdout, stderr })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits for exit up to `timeout`; None if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stdout_text(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("bind 127.0.0.1:0")
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}

pub fn wait_for_port(port: u16, timeout: Duration) -> Result<()> {
    wait_until(&format!("127.0.0.1:{port} to accept connections"), timeout, || TcpStream::connect(("127.0.0.1", port)).is_ok())
}

/// Starts a program that serves HTTP on a fresh port; returns it once it accepts connections.
pub fn start_server(name: &str, bin: &Path) -> Result<(Proc, u16)> {
    start_server_env(name, bin, &[])
}

/// As `start_server`, with extra environment for the server.
pub fn start_server_env(name: &str, bin: &Path, env: &[(&str, &str)]) -> Result<(Proc, u16)> {
    let port = free_port();
    let mut cmd = Command::new(bin);
    cmd.arg(format!("127.0.0.1:{port}"));
    cmd.envs(env.iter().copied());
    let p = Proc::spawn(name, cmd)?;
    wait_for_port(port, Duration::from_secs(10))?;
    Ok((p, port))
}

/// Two instances of the e2e test service (tests/e2e/go/causal): a downstream and a front
/// that calls it, both accepting connections.
pub struct CausalPair {
    pub front: Proc,
    pub down: Proc,
    pub front_port: u16,
    pub down_port: u16,
}

/// Starts a downstream, then a front calling it over `scheme` (http or https); `label` names
/// the processes' logs, `prepare` adjusts both commands (e.g. the TLS environment).
pub fn causal_pair(bin: &Path, label: &str, scheme: &str, prepare: &dyn Fn(&mut Command)) -> Result<CausalPair> {
    let down_port = free_port();
    let mut cmd = Command::new(bin);
    cmd.arg(format!("127.0.0.1:{down_port}"));
    prepare(&mut cmd);
    let down = Proc::spawn(&format!("{label}-down"), cmd)?;
    wait_for_port(down_port, Duration::from_secs(10))?;
    let front_port = free_port();
    let mut cmd = Command::new(bin);
    cmd.arg(format!("127.0.0.1:{front_port}")).arg(format!("{scheme}://127.0.0.1:{down_port}"));
    prepare(&mut cmd);
    let front = Proc::spawn(&format!("{label}-front"), cmd)?;
    wait_for_port(front_port, Duration::from_secs(10))?;
    Ok(CausalPair { front, down, front_port, down_port })
}

/// A process's resident memory (VmRSS) in KiB; 0 when it is gone.
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// A process's anonymous resident memory (RssAnon: its heap and stacks, without the pages
/// of files it maps) in KiB; 0 when it is gone.
pub fn rss_anon_kib(pid: u32) -> u64 {
    status_kib(pid, "RssAnon:")
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}
