//! Network namespaces made by a test and deleted when it is done: veth pairs, addresses,
//! routes and nftables rules inside them, processes started in them, and code run from
//! inside one (a thread that joins it). Traffic stays inside the namespaces.
use std::{
    io::Write,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail, ensure};

/// A named network namespace (`ip netns`), with its loopback up; deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// `zt-e2e-TAG-PID`. Namespaces left by test processes that were killed (no PID alive)
    /// are deleted first.
    pub fn new(tag: &str) -> Result<Netns> {
        remove_leftovers();
        let name = format!("zt-e2e-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).stderr(Stdio::null()).status();
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n NAME ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        run(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// `program` to be started inside the namespace (`ip netns exec` execs it: same pid).
    pub fn command(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `program ARGS` inside the namespace to its end, `stdin` on its standard input.
    pub fn exec(&self, program: &str, args: &[&str], stdin: &str) -> Result<()> {
        let mut cmd = self.command(Path::new(program));
        cmd.args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
        child.stdin.take().expect("piped stdin").write_all(stdin.as_bytes())?;
        let out = child.wait_with_output()?;
        ensure!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        Ok(())
    }

    /// An interface `ifname` here with `addr` (CIDR), up, joined by a veth pair to `peer_if`
    /// with `peer_addr` in `peer`.
    pub fn veth(&self, ifname: &str, addr: &str, peer: &Netns, peer_if: &str, peer_addr: &str) -> Result<()> {
        self.ip(&["link", "add", ifname, "type", "veth", "peer", "name", peer_if, "netns", &peer.name])?;
        for (ns, i, a) in [(self, ifname, addr), (peer, peer_if, peer_addr)] {
            ns.ip(&["addr", "add", a, "dev", i])?;
            ns.ip(&["link", "set", i, "up"])?;
        }
        Ok(())
    }

    /// Runs `f` on a thread that has joined this namespace (sockets it opens live here).
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
                // SAFETY: setns(2) on an fd we own; it moves only this thread.
                if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) } != 0 {
                    bail!("joining {}: {}", self.name, std::io::Error::last_os_error());
                }
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("a thread inside {} panicked", self.name))?
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Deletes `zt-e2e-*-PID` namespaces whose test process is gone.
fn remove_leftovers() {
    let Ok(dir) = std::fs::read_dir("/var/run/netns") else { return };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("zt-e2e-").and_then(|r| r.rsplit_once('-')).and_then(|(_, p)| p.parse::<u32>().ok()) else { continue };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).stderr(Stdio::null()).status();
        }
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    Ok(())
}
