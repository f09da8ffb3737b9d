//! The agent killed without warning (SIGKILL: it runs no code of its own), under load: its
//! targets keep serving, every BPF program, map and link it made is gone (the kernel frees
//! them with the agent's file descriptors; nothing is pinned), and an agent started again
//! attaches and traces. The same for an agent stopped the normal way.
use std::{
    collections::BTreeSet,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use zerotrace_e2e::{
    agent::Agent,
    http::Client,
    otlp::{Kind, Receiver},
    proc::{start_server, start_server_env, wait_until},
    tools,
};

/// The ids of every BPF object of one kind (`prog`, `map`, `link`) on the machine.
fn bpf_ids(kind: &str) -> Result<BTreeSet<u64>> {
    let out = Command::new("bpftool").args([kind, "show", "-j"]).output().context("running bpftool")?;
    ensure!(out.status.success(), "bpftool {kind} show: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| format!("bpftool {kind} show -j"))?;
    Ok(v.as_array().into_iter().flatten().filter_map(|o| o.get("id")?.as_u64()).collect())
}

const KINDS: [&str; 3] = ["prog", "map", "link"];

/// Every BPF object on the machine, by kind.
fn bpf_objects() -> Result<Vec<BTreeSet<u64>>> {
    KINDS.iter().map(|k| bpf_ids(k)).collect()
}

/// The objects in `now` that were not in `before`, by kind.
fn new_objects(before: &[BTreeSet<u64>], now: &[BTreeSet<u64>]) -> Vec<BTreeSet<u64>> {
    before.iter().zip(now).map(|(b, n)| n.difference(b).copied().collect()).collect()
}

/// Waits until none of `ours` exists any more; the ones left otherwise.
fn all_gone(ours: &[BTreeSet<u64>], what: &str) -> Result<()> {
    let left = || -> Vec<(&str, Vec<u64>)> {
        let now = bpf_objects().unwrap_or_default();
        KINDS.iter().zip(ours).zip(&now).map(|((k, o), n)| (*k, o.intersection(n).copied().collect::<Vec<_>>())).filter(|(_, v)| !v.is_empty()).collect()
    };
    wait_until(what, Duration::from_secs(10), || left().is_empty()).with_context(|| format!("BPF objects of the agent still there: {:?}", left()))
}

#[test]
fn an_agent_killed_under_load_leaves_targets_serving_and_nothing_behind() -> Result<()> {
    let (go, go_port) = start_server("killed-go", &tools::httpserver(tools::GO_NEWEST)?)?;
    let (rust, rust_port) = start_server_env("killed-rust", &tools::rust_svc()?, &[("OTEL_SERVICE_NAME", "killed-rust")])?;
    let before = bpf_objects()?;
    let rx = Receiver::start(Kind::Grpc, 0)?;
    let endpoint = rx.endpoint();
    let args = ["--otlp-endpoint", endpoint.as_str(), "--batch-delay", "100ms"];
    let mut agent = Agent::start(&[go.pid(), rust.pid()], &args, &[])?;
    let ours = new_objects(&before, &bpf_objects()?);
    ensure!(!ours[0].is_empty() && !ours[1].is_empty(), "the agent made no BPF programs or maps? {ours:?}");

    // Load on both targets until told to stop; every request must succeed.
    let stop = Arc::new(AtomicBool::new(false));
    let served = [Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0))];
    let load: Vec<_> = [go_port, rust_port]
        .into_iter()
        .zip(&served)
        .map(|(port, served)| {
            let (stop, served) = (stop.clone(), served.clone());
            std::thread::spawn(move || -> Result<()> {
                let mut c = Client::new(port);
                while !stop.load(Ordering::Relaxed) {
                    let r = c.get("/hello")?;
                    ensure!(r.status == 200, "status {} from :{port}", r.status);
                    served.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    agent.proc.signal(libc::SIGKILL);
    let st = agent.proc.wait_timeout(Duration::from_secs(10)).expect("a SIGKILLed agent is gone");
    ensure!(!st.success(), "the agent was killed, not stopped: {st}");
    let at_kill: Vec<u64> = served.iter().map(|n| n.load(Ordering::Relaxed)).collect();
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.join().expect("load thread")?;
    }
    for ((name, n), before) in ["Go", "Rust"].iter().zip(&served).zip(at_kill) {
        let after_kill = n.load(Ordering::Relaxed) - before;
        ensure!(after_kill > 20, "the {name} target served {after_kill} requests in the second after the agent was killed");
    }
    ensure!(rx.spans().len() > 10, "the agent traced the load before it was killed: {} spans", rx.spans().len());
    all_gone(&ours, "the killed agent's BPF objects to be freed")?;

    // Started again: attaches to the same processes and traces them; stopped the normal way,
    // it leaves nothing either.
    let rx2 = Receiver::start(Kind::Grpc, 0)?;
    let endpoint = rx2.endpoint();
    let before = bpf_objects()?;
    let mut again = Agent::start(&[go.pid(), rust.pid()], &["--otlp-endpoint", endpoint.as_str(), "--batch-delay", "100ms"], &[])?;
    let ours = new_objects(&before, &bpf_objects()?);
    for port in [go_port, rust_port] {
        let mut c = Client::new(port);
        for _ in 0..3 {
            ensure!(c.get("/hello")?.status == 200);
        }
    }
    let spans = rx2.wait_for(6, Duration::from_secs(20))?;
    for pid in [go.pid(), rust.pid()] {
        ensure!(spans.iter().any(|s| s.res("process.pid") == pid.to_string()), "the restarted agent traces pid {pid}");
    }
    again.stop()?;
    all_gone(&ours, "the stopped agent's BPF objects to be freed")?;
    Ok(())
}
