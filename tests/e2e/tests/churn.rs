//! Churn: short-lived processes (under `--exe` and `--all`) and many short connections
//! through traced services leave no kernel state behind (the maps' entry counts, read with
//! `zerotrace status`, come back to where they were), every request still gets its span,
//! survivors stay traced, and the agent's memory stays bounded. The CI sizes are the
//! defaults; `cargo xtask soak` sets ZEROTRACE_CHURN_CONNECTIONS (600,000),
//! ZEROTRACE_CHURN_PROCESSES (2,000) and ZEROTRACE_CHURN_PROCESS_SECONDS (300).
use std::{
    collections::{HashMap, HashSet},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use zerotrace_e2e::{
    agent::Agent,
    http::Client,
    load,
    otlp::{Kind, Receiver},
    proc::{die_with_parent, rss_anon_kib, rss_kib, start_server_env, wait_until},
    tools::{self, GO_NEWEST},
};

const SERVER: i32 = 2;

/// Every figure a running agent shows in `zerotrace status` (its counters, which it lists
/// when non-zero, and every kernel map's entries), without the `zerotrace_` prefix.
fn status(socket: &str) -> Result<HashMap<String, u64>> {
    let text = zerotrace_e2e::agent::status_text(socket)?;
    ensure!(text.contains("kernel maps"), "no kernel maps in status:\n{text}");
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.strip_prefix("zerotrace_")?.to_owned(), w.next()?.parse().ok()?))
        })
        .collect())
}

/// The kernel maps' entry counts from `status`, by map (`conns`, `targets`, ...).
fn map_entries(socket: &str) -> Result<HashMap<String, u64>> {
    Ok(status(socket)?.into_iter().filter_map(|(k, v)| Some((k.strip_prefix("map_")?.strip_suffix("_entries")?.to_owned(), v))).collect())
}

/// The maps that hold only what is live (not LRU caches): back to their count from before
/// a churn once it is over.
const LIVE_MAPS: &[&str] = &["targets", "listen", "conns", "recv_args", "go_requests", "go_clients", "go_sql", "client_hdr"];

/// The maps keyed by pid, LRU caches among them (GO_CTX, CHAN_SLOTS: a live process's
/// goroutines keep their entries until evicted): no entry may belong to a gone process.
const PID_KEYED_MAPS: &[&str] = &["GO_CTX", "CHAN_SLOTS", "GO_CLIENTS", "GO_SQL", "GO_REQUESTS", "CLIENT_HDR"];

/// The pids the keys of kernel map `name` start with, read with bpftool.
fn pids_in_map(name: &str) -> Result<HashSet<u32>> {
    Ok(tools::bpf_map_keys(name)?.iter().filter_map(|k| Some(u32::from_le_bytes(k.get(..4)?.try_into().ok()?))).collect())
}

/// How the churned processes are selected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Select {
    Exe,
    All,
}

/// `processes` short-lived programs (half Go, half Rust, each making HTTP calls to two
/// long-lived traced servers, the survivors) started evenly over `seconds`, at most 6 at
/// once, with the agent discovering them by `select`. Then: the agent forgot every one
/// (traced processes back to the survivors, no uprobe removal left), the live maps are back
/// to their counts from before (exactly under `--exe`; under `--all` the rest of the machine
/// comes and goes, so within `slack`), memory bounded, and the survivors still traced.
fn process_churn(select: Select, processes: usize, seconds: u64, slack: u64) -> Result<()> {
    use std::process::Stdio;
    // The churned programs under names of their own, so that --exe selects them alone.
    let dir = tools::work_dir().join("churn");
    std::fs::create_dir_all(&dir)?;
    let (go_bin, rust_bin) = (dir.join("zt-churn-go"), dir.join("zt-churn-rust"));
    for (from, to) in [(tools::causal(GO_NEWEST)?, &go_bin), (tools::rust_svc()?, &rust_bin)] {
        std::fs::copy(&from, to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    }
    let (go_srv, go_port) = start_server_env("churn-survivor-go", &tools::httpserver(GO_NEWEST)?, &[])?;
    let (rust_srv, rust_port) = start_server_env("churn-survivor-rust", &rust_bin, &[])?;
    let rx = Receiver::start(Kind::Grpc, 0)?;
    let endpoint = rx.endpoint();
    let socket = tools::work_dir().join(format!("pchurn-{select:?}-{}.sock", std::process::id())).to_string_lossy().into_owned();
    let mut args = vec!["--otlp-endpoint", endpoint.as_str(), "--batch-delay", "500ms", "--control-socket", &socket];
    let extra = std::env::var("ZT_CHURN_EXTRA").unwrap_or_default();
    args.extend(extra.split_whitespace());
    match select {
        Select::Exe => args.extend(["--exe", "zt-churn-*", "--exe", "httpserver-go*"]),
        Select::All => args.push("--all"),
    }
    let mut agent = Agent::start_discovering("run", &args)?;
    let survivors = [go_srv.pid(), rust_srv.pid()];
    wait_until("the survivors to be traced", Duration::from_secs(60), || {
        survivors.iter().all(|p| agent.proc.stderr_text().contains(&format!("tracing pid={p} ")))
    })?;
    let survey = |tag: &str, n: usize| -> Result<usize> {
        let (mut g, mut r) = (Client::new(go_port), Client::new(rust_port));
        for i in 0..n {
            ensure!(g.get(&format!("/survey/{tag}/{i}"))?.status < 500, "the Go survivor failed");
            ensure!(r.get(&format!("/survey/{tag}/{i}"))?.status < 500, "the Rust survivor failed");
        }
        Ok(2 * n)
    };
    survey("warm", 20)?;
    // A count of the maps taken after the warm-up (they are counted every 5 s, at the
    // agent's 1 s housekeeping: at most 6 s old).
    std::thread::sleep(Duration::from_secs(7));
    let before = map_entries(&socket)?;
    let traced_before = status(&socket)?.get("processes_traced").copied().unwrap_or(0);
    let (rss_before, anon_before) = (rss_kib(agent.proc.pid()), rss_anon_kib(agent.proc.pid()));

    let start = Instant::now();
    let (mut started, mut failed, mut backlog_max, mut rss_max) = (0usize, 0usize, 0u64, rss_before);
    // Anonymous memory once half the processes have run: the first half warms the caches
    // that fill once per distinct program (profiling's unwind tables and symbols of each
    // binary on the machine, bounded by count); the second half must not add to it.
    let mut anon_mid = None;
    let mut running: Vec<std::process::Child> = Vec::new();
    let mut sampled = Instant::now();
    while started < processes || !running.is_empty() {
        running.retain_mut(|c| match c.try_wait() {
            Ok(Some(st)) => {
                failed += usize::from(!st.success());
                false
            }
            Ok(None) => true,
            Err(_) => false,
        });
        let due = start + Duration::from_secs(seconds).mul_f64(started as f64 / processes as f64);
        if started < processes && running.len() < 6 && Instant::now() >= due {
            let mut cmd = if started % 2 == 0 {
                let mut c = Command::new(&go_bin);
                c.args(["get", &format!("http://127.0.0.1:{go_port}/sleep?ms=200"), &format!("http://127.0.0.1:{rust_port}/slow/200")]);
                c
            } else {
                let mut c = Command::new(&rust_bin);
                c.args(["get", &format!("http://127.0.0.1:{rust_port}/slow/20"), "2"]);
                c
            };
            cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
            die_with_parent(&mut cmd);
            running.push(cmd.spawn()?);
            started += 1;
        }
        if anon_mid.is_none() && started >= processes / 2 {
            anon_mid = Some(rss_anon_kib(agent.proc.pid()));
        }
        if sampled.elapsed() >= Duration::from_secs(1) {
            sampled = Instant::now();
            rss_max = rss_max.max(rss_kib(agent.proc.pid()));
            backlog_max = backlog_max.max(status(&socket)?.get("uprobe_detach_backlog").copied().unwrap_or(0));
        }
        ensure!(agent.proc.child.try_wait()?.is_none(), "the agent exited during the churn; its log:\n{}", agent.proc.stderr_text());
        std::thread::sleep(Duration::from_millis(5));
    }
    let elapsed = start.elapsed();
    let anon_mid = anon_mid.unwrap_or(anon_before);
    // Settled: every churned process forgotten and its uprobes removed.
    let settled = wait_until("the agent to forget the churned processes", Duration::from_secs(120), || {
        status(&socket).is_ok_and(|st| {
            (select == Select::All || st.get("processes_traced").copied().unwrap_or(0) <= traced_before) && !st.contains_key("uprobe_detach_backlog")
        })
    });
    std::thread::sleep(Duration::from_secs(7));
    let after = map_entries(&socket)?;
    let (rss_after, anon_after) = (rss_kib(agent.proc.pid()), rss_anon_kib(agent.proc.pid()));
    let mut stale = Vec::new();
    for m in PID_KEYED_MAPS {
        let pids = pids_in_map(m)?;
        // The Go survivor's goroutines keep theirs: a dump that reads nothing is a broken read.
        ensure!(*m != "GO_CTX" || !pids.is_empty(), "GO_CTX read empty with a traced Go survivor");
        stale.extend(pids.into_iter().filter(|p| !std::path::Path::new(&format!("/proc/{p}")).exists()).map(|p| format!("{m}: pid {p}")));
    }
    let log = agent.proc.stderr_text();
    let traced = [&go_bin, &rust_bin]
        .iter()
        .map(|b| log.lines().filter(|l| l.contains("tracing pid=") && l.contains(b.file_name().and_then(|n| n.to_str()).unwrap_or("?"))).count())
        .sum::<usize>()
        .saturating_sub(1);
    // Discovered processes that exited before they could be traced, counted (under --all,
    // any short-lived process of the machine too).
    let exited_early = status(&socket)?.get("processes_exited_before_traced").copied().unwrap_or(0) as usize;
    let spans_before = rx.spans().len();
    let asked = survey("after", 10)?;
    let _ = rx.wait_for(spans_before + asked, Duration::from_secs(20));
    let after_spans: Vec<_> =
        rx.spans().into_iter().skip(spans_before).filter(|sp| sp.kind == SERVER && sp.attr("url.path").starts_with("/survey/after/")).collect();
    let survivor_spans = after_spans.len();
    if survivor_spans != asked {
        for sp in &after_spans {
            println!("  {} pid={} span={} peer={}", sp.attr("url.path"), sp.res("process.pid"), sp.span_id, sp.attr("network.peer.port"));
        }
        // Which survivor lost its spans, and where the agent says they went.
        println!("  survivors: Go pid {}, Rust pid {}; agent status: {:?}", survivors[0], survivors[1], status(&socket));
        let log = agent.proc.stderr_text();
        for l in log.lines().filter(|l| survivors.iter().any(|p| l.contains(&format!("pid={p}")))) {
            println!("  agent: {l}");
        }
    }
    println!(
        "{select:?}: {started} processes in {:.0} s ({failed} failed, ~{traced} traced, {exited_early} exited before they could be); agent RSS {rss_before} KiB before, {rss_max} max, {rss_after} after (anonymous: {anon_before} before, {anon_mid} at half-way, {anon_after} after); \
         uprobe removals in flight at most {backlog_max}; survivors: {survivor_spans} of {asked} requests traced after; maps before {before:?} after {after:?}",
        elapsed.as_secs_f64()
    );
    agent.stop()?;
    settled?;
    ensure!(failed * 20 <= started, "{failed} of {started} churned processes failed");
    // Processes living ~0.05-0.4 s: each file is read once and a Go file's uprobes are
    // attached once for all its processes, so a later process costs a few /proc reads and a
    // TARGETS insert. At 2,000 over 5 min (`cargo xtask soak`) all of them were traced
    // under --exe and --all here; the first process of each file may be gone before its
    // file is read.
    ensure!(traced * 10 >= started * 9, "the agent traced only {traced} of {started} churned processes");
    for m in LIVE_MAPS {
        let (b, a) = (before.get(*m).copied().unwrap_or(0), after.get(*m).copied().unwrap_or(0));
        ensure!(a <= b + slack, "{m}: {b} entries before the churn, {a} after it");
    }
    ensure!(stale.is_empty(), "kernel entries of gone processes: {stale:?}");
    ensure!(
        anon_after <= anon_mid + 32 * 1024,
        "agent memory (RssAnon) grew from {anon_mid} KiB half-way through the churn to {anon_after} KiB (before it: {anon_before})"
    );
    ensure!(backlog_max <= 64, "uprobe removals in flight reached {backlog_max}");
    ensure!(survivor_spans == asked, "survivors: {survivor_spans} spans for {asked} requests made after the churn");
    Ok(())
}

/// Processes churned in CI (ZEROTRACE_CHURN_PROCESSES) over ZEROTRACE_CHURN_PROCESS_SECONDS;
/// `cargo xtask soak` runs 2,000 over 300 s.
fn churn_size(processes: usize, seconds: u64) -> (usize, u64) {
    let var = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    (var("ZEROTRACE_CHURN_PROCESSES").map_or(processes, |v| v as usize), var("ZEROTRACE_CHURN_PROCESS_SECONDS").unwrap_or(seconds))
}

#[test]
fn process_churn_under_exe_leaves_nothing_behind() -> Result<()> {
    let (n, secs) = churn_size(60, 30);
    process_churn(Select::Exe, n, secs, 0)
}

#[test]
fn process_churn_under_all_leaves_nothing_behind() -> Result<()> {
    let (n, secs) = churn_size(40, 20);
    process_churn(Select::All, n, secs, 64)
}

#[test]
fn connection_churn_leaves_no_state_behind() -> Result<()> {
    let total: usize = std::env::var("ZEROTRACE_CHURN_CONNECTIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(60_000);
    let rx = Receiver::start(Kind::Grpc, 0)?;
    let (server, port) = start_server_env("conn-churn", &tools::rust_svc()?, &[("OTEL_SERVICE_NAME", "conn-churn")])?;
    let socket = tools::work_dir().join(format!("churn-{}.sock", std::process::id())).to_string_lossy().into_owned();
    let endpoint = rx.endpoint();
    let mut agent = Agent::start(&[server.pid()], &["--otlp-endpoint", endpoint.as_str(), "--batch-delay", "200ms", "--control-socket", &socket], &[])?;
    let agent_pid = agent.proc.pid();
    // Two halves: the first sizes the agent's tables and queues; over the second, memory
    // must not grow with the connections.
    let warm = load::churn(port, "/hello", 16, total / 2)?;
    ensure!(warm.errors == 0 && warm.non_2xx == 0, "the service failed requests: {:?}", (warm.errors, warm.non_2xx));
    std::thread::sleep(Duration::from_secs(1));
    let rss_before = rss_kib(agent_pid);
    let churn = load::churn(port, "/hello", 16, total - total / 2)?;
    ensure!(churn.errors == 0 && churn.non_2xx == 0, "the service failed requests: {:?}", (churn.errors, churn.non_2xx));
    let served = warm.requests + churn.requests;
    rx.settle(served, 80);
    let rss_after = rss_kib(agent_pid);
    // The maps are counted every few seconds: wait for a count taken after the last close.
    // The service's listening socket has no entry (it does no I/O): every connection's entry
    // must be gone.
    let mut maps = HashMap::new();
    let gone = wait_until("the connections' kernel state to be gone", Duration::from_secs(15), || {
        maps = map_entries(&socket).unwrap_or_default();
        maps.get("conns") == Some(&0)
    });
    println!(
        "{} connections, the second half in {:.1} s ({:.0}/s), 1 request each, a quarter reset: agent RSS over the second half {} -> {} KiB; kernel maps after: {maps:?}",
        served,
        churn.elapsed.as_secs_f64(),
        churn.requests as f64 / churn.elapsed.as_secs_f64(),
        rss_before,
        rss_after
    );
    gone.with_context(|| format!("kernel maps after the churn: {maps:?}"))?;
    // The agent's own per-connection state goes with the connections too (at their close
    // records, or at the sweep against CONNS for a close record lost).
    let mut held = u64::MAX;
    wait_until("the agent's per-connection state to be gone", Duration::from_secs(30), || {
        held = status(&socket).ok().and_then(|s| s.get("connections_held").copied()).unwrap_or(u64::MAX);
        held == 0
    })
    .with_context(|| format!("the agent still holds state for {held} connections"))?;
    ensure!(maps.get("targets") == Some(&1) && maps.get("recv_args") == Some(&0), "per-target state: {maps:?}");
    // Bounded: per-connection state in the agent goes with the connection (above). What
    // still grows is the cache of recent spans' traces (their children's parents), up to its
    // bound of 196,608 spans in a table made at its final size: a first half that fills it
    // leaves the second flat (`cargo xtask soak`'s 600,000 connections). A shorter run still
    // sees it fill, and the allocator's RSS moves by ~20 MiB either way: there only a gross
    // leak (1 KiB per connection) is caught; the counts above are exact at every size.
    let bound = if warm.requests >= 196_608 { 8 * 1024 } else { 32 * 1024 };
    ensure!(rss_after <= rss_before + bound, "agent RSS grew from {rss_before} to {rss_after} KiB over the last {} connections", churn.requests);
    agent.stop()?;
    let spans = rx.spans().into_iter().filter(|s| s.kind == SERVER && s.res("service.name") == "conn-churn").count() as u64;
    let counted = agent.counted_losses()?;
    ensure!(spans <= served && served - spans <= counted, "{served} requests served, {spans} spans, {counted} counted as lost");
    // The stats file is written once every target is forgotten: nothing of the Rust
    // service's sockets, listeners and target left.
    for m in ["conns", "targets", "listen", "recv_args"] {
        assert_eq!(agent.stat(&format!("map_{m}_entries")), 0, "{m} entries left at exit");
    }
    drop(server);
    Ok(())
}
