//! Child processes that are killed when the test is done (even on panic), free ports, and
//! waiting for things with a deadline.
use std::{
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// A running child; SIGKILLed on drop unless it already exited.
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
