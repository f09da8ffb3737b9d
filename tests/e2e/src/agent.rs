//! The agent under test: `zerotrace run` (or `tail`) as a child process, ready once it says
//! it traces every PID, stopped with SIGINT like a user would.
use std::{
    path::PathBuf,
    process::{Command, ExitStatus},
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use anyhow::{Result, bail};

use crate::{proc::Proc, tools};

static SEQ: AtomicUsize = AtomicUsize::new(0);

pub struct Agent {
    pub proc: Proc,
    pub stats_file: PathBuf,
    /// The test drives the agent past its CPU budget or memory limit on purpose; any other
    /// agent that sheds fails its test (the defaults must never trip at the suite's loads).
    pub sheds_on_purpose: bool,
}

/// `zerotrace status --connect SOCKET`: its text.
pub fn status_text(socket: &str) -> Result<String> {
    let out = Command::new(tools::zerotrace_bin()?).args(["status", "--connect", socket]).output()?;
    anyhow::ensure!(out.status.success(), "zerotrace status: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Agent {
    /// `zerotrace run --pid ...` plus `extra` args and environment; waits until attached.
    pub fn start(pids: &[u32], extra: &[&str], env: &[(&str, &str)]) -> Result<Agent> {
        Self::start_as("run", pids, extra, env)
    }

    /// `zerotrace SUBCOMMAND --pid ...` (run or tail); waits until attached.
    pub fn start_as(subcommand: &str, pids: &[u32], extra: &[&str], env: &[(&str, &str)]) -> Result<Agent> {
        let mut a = Self::spawn_as(subcommand, pids, extra, env)?;
        for pid in pids {
            let needle = format!("tracing pid={pid} ");
            let r = crate::proc::wait_until(&format!("the agent to attach to {pid}"), Duration::from_secs(60), || {
                a.proc.stderr_text().contains(&needle) || a.proc.child.try_wait().ok().flatten().is_some()
            });
            if r.is_err() || !a.proc.stderr_text().contains(&needle) {
                let _ = a.proc.child.kill();
                bail!("agent did not attach to {pid}; its stderr:\n{}", a.proc.stderr_text());
            }
        }
        Ok(a)
    }

    /// `zerotrace SUBCOMMAND` with `--exe` discovery in `extra` and no --pid; waits until it
    /// watches for processes (it has attached to matching ones running already by then).
    pub fn start_discovering(subcommand: &str, extra: &[&str]) -> Result<Agent> {
        Self::start_discovering_env(subcommand, extra, &[])
    }

    /// The same, with environment variables for the agent.
    pub fn start_discovering_env(subcommand: &str, extra: &[&str], env: &[(&str, &str)]) -> Result<Agent> {
        let mut a = Self::spawn_as(subcommand, &[], extra, env)?;
        let r = crate::proc::wait_until("the agent to start discovering", Duration::from_secs(60), || {
            a.proc.stderr_text().contains("discovering processes") || a.proc.child.try_wait().ok().flatten().is_some()
        });
        if r.is_err() || !a.proc.stderr_text().contains("discovering processes") {
            let _ = a.proc.child.kill();
            bail!("agent did not start discovering; its stderr:\n{}", a.proc.stderr_text());
        }
        Ok(a)
    }

    /// Spawns without waiting (for tests of failures).
    pub fn spawn(pids: &[u32], extra: &[&str], env: &[(&str, &str)]) -> Result<Agent> {
        Self::spawn_as("run", pids, extra, env)
    }

    fn spawn_as(subcommand: &str, pids: &[u32], extra: &[&str], env: &[(&str, &str)]) -> Result<Agent> {
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let stats_file = tools::work_dir().join("logs").join(format!("agent-{}-{n}.stats.json", std::process::id()));
        let _ = std::fs::remove_file(&stats_file);
        let mut cmd = Command::new(tools::zerotrace_bin()?);
        cmd.arg(subcommand);
        for pid in pids {
            cmd.arg("--pid").arg(pid.to_string());
        }
        cmd.arg("--stats-file").arg(&stats_file).args(extra);
        for var in ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SERVICE_NAME", "OTEL_TRACES_EXPORTER"] {
            cmd.env_remove(var);
        }
        cmd.env("NO_COLOR", "1");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let proc = Proc::spawn(&format!("agent-{n}"), cmd)?;
        Ok(Agent { proc, stats_file, sheds_on_purpose: false })
    }

    /// SIGINT, then wait: the agent flushes for at most 10 s, and the kernel removes uprobes
    /// one at a time, each after a grace period (~0.1 s here, more on a loaded machine:
    /// about 45 per Go process), so two or three targets take several seconds.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        self.proc.signal(libc::SIGINT);
        match self.proc.wait_timeout(Duration::from_secs(45)) {
            Some(st) => Ok(st),
            None => bail!("agent did not exit within 45 s of SIGINT; stderr:\n{}", self.proc.stderr_text()),
        }
    }

    /// Planted secrets (`secrets`) in what the agent printed: `tail` lines and its log.
    pub fn leaks(&self) -> Vec<String> {
        let mut out = crate::secrets::find(self.proc.stdout_text().as_bytes());
        out.extend(crate::secrets::find(self.proc.stderr_text().as_bytes()));
        out
    }

    /// Every loss the agent counted at exit: the sum of its `*dropped*` and `*lost*`
    /// counters.
    pub fn counted_losses(&self) -> Result<u64> {
        Ok(self
            .stats()?
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, _)| k.contains("dropped") || k.contains("lost") || k.ends_with("_shed"))
            .filter_map(|(_, v)| v.as_u64())
            .sum())
    }

    /// The counters the agent wrote at exit.
    pub fn stats(&self) -> Result<serde_json::Value> {
        let text = std::fs::read_to_string(&self.stats_file)?;
        Ok(serde_json::from_str(&text)?)
    }

    /// One counter from the stats file; a name the agent does not write fails the test (a
    /// renamed counter must not read as zero).
    pub fn stat(&self, name: &str) -> u64 {
        let stats = self.stats().unwrap_or_else(|e| panic!("the agent's stats file {}: {e}", self.stats_file.display()));
        let key = format!("zerotrace_{name}");
        match stats.get(&key).and_then(|v| v.as_u64()) {
            Some(v) => v,
            None => {
                let known: Vec<&String> = stats.as_object().map(|o| o.keys().collect()).unwrap_or_default();
                panic!("the agent writes no counter {key}; it writes {known:?}")
            }
        }
    }
}

impl Drop for Agent {
    /// Planted secrets in the agent's output fail the test that owns it.
    fn drop(&mut self) {
        // Shedding where no test asked for it: the default budget or limit tripped.
        if !self.sheds_on_purpose
            && let Ok(stats) = self.stats()
        {
            let get = |k: &str| stats.get(format!("zerotrace_{k}")).and_then(|v| v.as_u64()).unwrap_or(0);
            let (shed, memory) = (get("requests_shed"), get("spans_dropped_memory_limit"));
            if (shed > 0 || memory > 0) && !std::thread::panicking() {
                panic!(
                    "the agent shed load at this test's load (requests_shed={shed}, spans_dropped_memory_limit={memory}): the default --cpu-budget and --memory-limit must never trip in the suite; its log:\n{}",
                    self.proc.stderr_text()
                );
            }
        }
        let leaks = self.leaks();
        if !leaks.is_empty() {
            eprintln!("planted secrets in the agent's output: {leaks:?}");
            if !std::thread::panicking() {
                panic!("planted secrets in the agent's output: {leaks:?}");
            }
        }
    }
}
