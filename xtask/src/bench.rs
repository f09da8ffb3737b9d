//! Benchmarks, reported as ratios measured in one run (with the agent vs without, rounds
//! alternating), never as timed tests.
//!
//! `overhead`: the demo shop's frontend under load on loopback. A no-op handler at
//! saturation (wrk), and a 1 ms handler at a fixed rate (an open-loop generator here that
//! measures latency from each request's scheduled time). Each "with" round attaches a fresh
//! agent and reports its CPU, probe hits per request and ring-buffer wake-ups. The https
//! case loads a Go HTTPS server (the e2e test service, with a certificate it makes) at
//! saturation: the cost of the crypto/tls plaintext hooks. The rust-* cases load the Rust
//! test service (axum), traced at the socket level (no uprobes). rust-sdk adds the peer a
//! user would pick instead: the same no-op route instrumented by hand with the OpenTelemetry
//! SDK (tests/rust-svc-otel), each run exporting to a fresh local OTLP/gRPC receiver. The
//! grpc case loads a grpc-go server (the e2e grpcshop, no-op Echo/Unary) at saturation from
//! grpcshop's own load mode (32 goroutines on one connection): hits per RPC of the grpc-go
//! hooks.
//! Every round alternates which side runs first; ratios are paired by round and reported
//! as median (min-max); a side with fewer than one span per completed request fails.
//!
//! `pipeline`: live traffic (Rust -> Go -> Rust over HTTP/1, gRPC) recorded by the agent
//! (`--record`), then replayed through decode -> correlate -> OTLP encoding in one thread
//! (`zerotrace replay`): events and spans per second per core, peak memory.
use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use zerotrace_e2e::{
    agent::Agent,
    http::Client,
    otlp::{Kind, Receiver},
    proc::{Proc, free_port, wait_for_port},
    tools,
};

use crate::{
    setup,
    util::{build_release, root, step},
};

#[derive(Subcommand)]
pub enum Bench {
    /// Cost of tracing a Go or Rust HTTP service: throughput and latency with vs without zerotrace.
    Overhead(OverheadArgs),
    /// Throughput of the agent's pipeline after the kernel, on recorded live traffic.
    Pipeline(PipelineArgs),
    /// The agent's CPU and memory while it profiles a busy machine (19 Hz and 99 Hz).
    Profile(ProfileArgs),
}

#[derive(Args)]
pub struct ProfileArgs {
    /// Seconds measured per frequency (after a few seconds of warm-up).
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// Sampling frequencies to measure.
    #[arg(long, value_delimiter = ',', default_value = "19,99")]
    pub frequencies: Vec<u64>,
}

#[derive(Args)]
pub struct PipelineArgs {
    /// HTTP requests through the Rust -> Go -> Rust chain while recording (gRPC calls: a fifth of it).
    #[arg(long, default_value_t = 5000)]
    pub requests: u32,
    /// Replays of the recording (the best is reported).
    #[arg(long, default_value_t = 5)]
    pub rounds: u32,
    /// Seconds the exporter is fed at each rate.
    #[arg(long, default_value_t = 5)]
    pub export_seconds: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Export {
    /// Spans assembled, not exported (kernel + pipeline cost).
    None,
    /// OTLP/gRPC to a local receiver that decodes every request (agent + collector cost).
    Grpc,
    /// OTLP http/protobuf to a local sink that discards the bytes (agent-side cost).
    Http,
}

#[derive(Args)]
pub struct OverheadArgs {
    /// Rounds per case (each round: one run without the agent and one per "with" side, the
    /// order reversed every other round).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Seconds per run.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Export variants to measure.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "none,grpc")]
    pub export: Vec<Export>,
    /// Fixed request rate for the 1 ms handler.
    #[arg(long, default_value_t = 2000)]
    pub rate: u32,
    /// How Go HTTP server requests are probed (conn: per connection, handler: per request).
    #[arg(long, default_value = "conn")]
    pub go_http_probes: String,
    /// Handlers to load: noop (saturation), work (1 ms, fixed rate), fanout (three
    /// goroutines answering over a channel, saturation), fanout-rate (the same at the fixed
    /// rate), https (a no-op handler over TLS at saturation), rust-noop and rust-work (the
    /// Rust service: no-op at saturation, 1 ms at the fixed rate), rust-sdk (the Rust no-op
    /// traced by zerotrace vs instrumented by hand with the OpenTelemetry SDK, both exporting
    /// over OTLP/gRPC; measured with the grpc export only), grpc (a grpc-go no-op unary
    /// method at saturation, 32 concurrent calls on one connection).
    #[arg(long, value_delimiter = ',', default_value = "noop,work,fanout,fanout-rate,https,grpc,rust-noop,rust-work,rust-sdk")]
    pub cases: Vec<String>,
    /// The goroutine and channel hooks (--go-spawns/--go-channels) in the "with" runs:
    /// on, off, or both (on,off: each case measured twice).
    #[arg(long, value_delimiter = ',', default_value = "on")]
    pub causality: Vec<String>,
    /// Socket hook sets (`--socket-hooks`) of the "with" runs: each round runs without the
    /// agent, then with it once per set, so that the sets are compared under the same load.
    #[arg(long, value_delimiter = ',', default_value = "auto")]
    pub socket_hooks: Vec<String>,
}

pub fn run(b: Bench) -> Result<()> {
    match b {
        Bench::Overhead(a) => overhead(a),
        Bench::Pipeline(a) => pipeline(a),
        Bench::Profile(a) => profile(a),
    }
}

/// Peak resident memory (VmHWM) of `pid`, KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return 0 };
    s.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap_or(0)
}

/// `bench profile`: both cores kept busy by profiled processes (a Rust release binary
/// without frame pointers spinning, unwound from .eh_frame by the agent; a Go service
/// burning CPU in request handlers, frame pointers), `zerotrace profile` on both; the
/// agent's CPU over the measured window (after warm-up: first symbolization) and its peak
/// RSS.
fn profile(a: ProfileArgs) -> Result<()> {
    setup::kernel_toolchain()?;
    let go = setup::go(setup::GO_NEWEST)?;
    let agent_bin = build_release()?;
    let rust_svc = crate::util::build_rust_services()?;
    let http = root().join("target/bench/httpserver");
    std::fs::create_dir_all(http.parent().unwrap())?;
    tools::go_build(&go, &root().join("tests/e2e/go/httpserver"), &http, &[])?;
    let _ = agent_bin;
    let warm = 5u64;
    let mut report = String::from("profile (agent cost while profiling a busy 2-core machine; `zerotrace profile`, one run per frequency)\n");
    // 0 Hz: the same targets traced without sampling (`run --exporter none`): the
    // tracer's own share of the figures below.
    let mut freqs = vec![0u64];
    freqs.extend(a.frequencies.iter().copied());
    for &hz in &freqs {
        let total = warm + a.seconds + 3;
        let mut burner = Command::new(&rust_svc);
        burner.args(["burn", &(total + 10).to_string()]);
        let rust = Proc::spawn("bench-burn", burner)?;
        let port = free_port();
        let mut srv = Command::new(&http);
        srv.arg(format!("127.0.0.1:{port}"));
        let gosrv = Proc::spawn("bench-http", srv)?;
        wait_for_port(port, Duration::from_secs(10))?;
        // The Go service burns in its handlers, one request at a time, all along.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let st = stop.clone();
        let load = std::thread::spawn(move || {
            let mut c = Client::new(port);
            while !st.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = c.get("/burn?ms=200");
            }
        });
        step(format!("bench profile: {hz} Hz, {} s measured", a.seconds));
        let out = root().join(format!("target/bench/profile-{hz}.pb.gz"));
        let (duration, freq, path) = (format!("{total}s"), hz.to_string(), out.display().to_string());
        let mut agent = if hz == 0 {
            Agent::start(&[rust.pid(), gosrv.pid()], &["--exporter", "none"], &[])?
        } else {
            Agent::start_as("profile", &[rust.pid(), gosrv.pid()], &["--duration", &duration, "--frequency", &freq, "-o", &path], &[])?
        };
        let apid = agent.proc.pid();
        std::thread::sleep(Duration::from_secs(warm));
        let (c0, t0) = (cpu_seconds(apid), Instant::now());
        std::thread::sleep(Duration::from_secs(a.seconds));
        let (c1, dt) = (cpu_seconds(apid), t0.elapsed().as_secs_f64());
        let rss = peak_rss_kib(apid);
        let machine_busy = (cpu_seconds(rust.pid()) + cpu_seconds(gosrv.pid())) / (t0.elapsed().as_secs_f64() + warm as f64);
        if hz == 0 {
            agent.proc.signal(libc::SIGINT);
        }
        let status = agent.proc.wait_timeout(Duration::from_secs(60));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = load.join();
        if !status.is_some_and(|s| s.success()) {
            bail!("zerotrace profile failed: {}", agent.proc.stderr_text());
        }
        let samples = agent.stat("cpu_samples");
        let dropped = agent.stat("cpu_samples_dropped") + agent.stat("events_dropped_ring_full");
        let what = if hz == 0 { "tracing only, no sampling".to_owned() } else { format!("{hz} Hz") };
        let line = format!(
            "  {what:>25}: agent CPU {:.2}% of one core, peak RSS {:.1} MiB; {samples} samples ({dropped} dropped), targets busy {:.2} cores{}\n",
            100.0 * (c1 - c0) / dt,
            rss as f64 / 1024.0,
            machine_busy,
            if hz == 19 { " (goal <= 0.5% and <= 100 MiB)" } else { "" },
        );
        eprint!("{line}");
        report.push_str(&line);
        drop((rust, gosrv));
    }
    println!("\n{report}");
    let path = root().join("target/bench/profile.txt");
    std::fs::write(&path, &report)?;
    eprintln!("(also written to {})", path.display());
    Ok(())
}

fn pipeline(a: PipelineArgs) -> Result<()> {
    setup::kernel_toolchain()?;
    let go = setup::go(setup::GO_NEWEST)?;
    let agent_bin = build_release()?;
    let rust_svc = crate::util::build_rust_services()?;
    let causal = root().join("target/bench/causal");
    std::fs::create_dir_all(causal.parent().unwrap())?;
    tools::go_build(&go, &root().join("tests/e2e/go/causal"), &causal, &[])?;
    let serve = |name: &str, bin: &std::path::Path, args: &[String]| -> Result<(Proc, u16)> {
        let port = free_port();
        let mut cmd = Command::new(bin);
        cmd.args(args.iter().map(|a| a.replace("PORT", &port.to_string())));
        let p = Proc::spawn(name, cmd)?;
        wait_for_port(port, Duration::from_secs(10))?;
        Ok((p, port))
    };
    let (leaf, leaf_port) = serve("pipe-leaf", &rust_svc, &["127.0.0.1:PORT".into()])?;
    let (mid, mid_port) = serve("pipe-mid", &causal, &["127.0.0.1:PORT".into(), format!("http://127.0.0.1:{leaf_port}")])?;
    let (front, front_port) = serve("pipe-front", &rust_svc, &["127.0.0.1:PORT".into(), format!("http://127.0.0.1:{mid_port}")])?;
    let (grpc, grpc_port) = serve("pipe-grpc", &rust_svc, &["grpc".into(), "127.0.0.1:PORT".into()])?;
    let rec = root().join("target/bench/pipeline.zrec");
    let rec_s = rec.display().to_string();
    step(format!("bench pipeline: recording {} requests (Rust -> Go -> Rust) and {} gRPC calls", a.requests, a.requests / 5));
    let mut agent = Agent::start(&[front.pid(), mid.pid(), leaf.pid(), grpc.pid()], &["--exporter", "none", "--record", &rec_s], &[])?;
    let st =
        Command::new(&rust_svc).args(["get", &format!("http://127.0.0.1:{front_port}/chain/p"), &a.requests.to_string()]).stdout(Stdio::null()).status()?;
    let st2 = Command::new(&rust_svc)
        .args(["grpc-call", &format!("http://127.0.0.1:{grpc_port}"), "unary", &(a.requests / 5).to_string(), "10"])
        .stdout(Stdio::null())
        .status()?;
    if !st.success() || !st2.success() {
        bail!("the load generators failed");
    }
    std::thread::sleep(Duration::from_millis(500));
    agent.stop()?;
    let dropped = agent.stat("events_dropped_ring_full");
    step(format!("replaying {} ({} KiB) {} times", rec.display(), std::fs::metadata(&rec)?.len() / 1024, a.rounds));
    let out = Command::new(&agent_bin).args(["replay", &rec_s, "--rounds", &a.rounds.to_string()]).output()?;
    if !out.status.success() {
        bail!("zerotrace replay failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let f = |k: &str| json.get(k).and_then(serde_json::Value::as_f64).unwrap_or(0.0);
    let out = Command::new(&agent_bin).args(["replay", &rec_s, "--rounds", &a.rounds.to_string(), "--no-encode"]).output()?;
    let json2: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let g = |k: &str| json2.get(k).and_then(serde_json::Value::as_f64).unwrap_or(0.0);
    let report = format!(
        "pipeline (decode -> correlate -> OTLP encode, one thread, recorded live traffic)\n\
         \x20 recording: {} events ({} lost to a full ring while recording), {} spans\n\
         \x20 events/s per core {:.0} (goal >= 2,000,000)   spans/s per core {:.0} (goal >= 1,000,000)\n\
         \x20 OTLP bytes {:.0}   best round {:.3} s   peak RSS {:.1} MiB\n\
         \x20 without OTLP encoding (decode -> correlate): events/s per core {:.0}   spans/s per core {:.0}\n",
        f("events"),
        dropped,
        f("spans"),
        f("events_per_s"),
        f("spans_per_s"),
        f("otlp_bytes"),
        f("best_seconds"),
        f("peak_rss_kib") / 1024.0,
        g("events_per_s"),
        g("spans_per_s"),
    );
    // The exporter: the recording's spans offered at the goal's rate, sent over OTLP/gRPC
    // to a Rust receiver in this process that decodes every request.
    let mut report = format!("{}{report}", machine_line());
    for rate in [200_000u64, 400_000] {
        let sink = Receiver::start_bench_sink(Kind::Grpc)?;
        step(format!("OTLP/gRPC export at {rate} spans/s for {} s to a local receiver", a.export_seconds));
        let out = Command::new(&agent_bin)
            .args(["replay", &rec_s, "--export-to", &sink.endpoint(), "--rate", &rate.to_string(), "--seconds", &a.export_seconds.to_string()])
            .output()?;
        if !out.status.success() {
            bail!("zerotrace replay --export-to failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let h = |k: &str| json.get(k).and_then(serde_json::Value::as_f64).unwrap_or(0.0);
        report.push_str(&format!(
            "  OTLP/gRPC export offered {rate} spans/s: exported {:.0} spans/s, {:.0} of {:.0} dropped, receiver counted {} (goal at 200,000: none dropped)\n",
            h("exported_per_s"),
            h("dropped"),
            h("offered"),
            sink.spans_count()
        ));
    }
    println!("\n{report}");
    let path = root().join("target/bench/pipeline.txt");
    std::fs::write(&path, &report)?;
    eprintln!("(also written to {})", path.display());
    drop((front, mid, leaf, grpc));
    Ok(())
}

#[derive(Clone, Copy, Debug, Default)]
struct Load {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    /// Responses completed in the measured window.
    completed: u64,
}

/// What one "with" run cost: the agent's figures (zerotrace), or only the spans the sink
/// received (the SDK peer, whose cost is inside the target).
#[derive(Clone, Copy, Debug, Default)]
struct AgentCost {
    cpu_s: f64,
    requests: u64,
    uprobe_hits: u64,
    socket_syscalls: u64,
    wakeups: u64,
    records: u64,
    spans: u64,
    dropped: u64,
}

/// One way of running the service in a round.
#[derive(Clone, Debug, PartialEq)]
enum Side {
    Without,
    /// zerotrace attached, with this socket hook set.
    Zerotrace(String),
    /// The peer: the service instrumented by hand with the OpenTelemetry SDK.
    Sdk,
}

/// Runs of one side over the rounds.
struct Runs {
    side: Side,
    loads: Vec<Load>,
    costs: Vec<AgentCost>,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// Median of `v` with its min and max: "0.812 (0.790-0.826)".
fn spread(v: &[f64]) -> String {
    let (lo, hi) = v.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    format!("{:.3} ({lo:.3}-{hi:.3})", median(v.to_vec()))
}

/// Date, CPU and kernel of this run, the first line of every report.
fn machine_line() -> String {
    let out =
        |cmd: &str, args: &[&str]| Command::new(cmd).args(args).output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()).unwrap_or_default();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo.lines().find_map(|l| l.strip_prefix("model name")).and_then(|l| l.split_once(':')).map_or("?", |(_, m)| m.trim()).to_owned();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{} | {cpus} x {model} | Linux {} | load generator on the same machine\n\n", out("date", &["-u", "+%Y-%m-%d %H:%M UTC"]), out("uname", &["-r"]))
}

/// The cases and what each loads.
const CASES: &str = "noop, work, fanout, fanout-rate, https, grpc, rust-noop, rust-work, rust-sdk";

/// The grpc case's program (grpcshop): its server, and its load mode as the load generator.
static GRPCSHOP: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

fn overhead(a: OverheadArgs) -> Result<()> {
    if a.cases.iter().any(|c| c == "rust-sdk") && !a.export.contains(&Export::Grpc) {
        eprintln!("  (the rust-sdk case compares exports over OTLP/gRPC: it runs only with grpc in --export)");
    }
    setup::kernel_toolchain()?;
    setup::apt("wrk", "wrk")?;
    let go = setup::go(setup::GO_NEWEST)?;
    build_release()?;
    let shop = root().join("target/demo/shop");
    std::fs::create_dir_all(shop.parent().unwrap())?;
    tools::go_build(&go, &root().join("demo/go/shop"), &shop, &[])?;
    let port = free_port();
    let mut cmd = Command::new(&shop);
    cmd.args(["frontend", &format!("127.0.0.1:{port}"), "127.0.0.1:9"]);
    let srv = Proc::spawn("bench-frontend", cmd)?;
    wait_for_port(port, Duration::from_secs(10))?;
    // The HTTPS server and the Rust service, only when a case needs them.
    let tls = if a.cases.iter().any(|c| c == "https") { Some(https_server(&go)?) } else { None };
    let rust = if a.cases.iter().any(|c| c.starts_with("rust-")) {
        let rust_svc = crate::util::build_rust_services()?;
        let port = free_port();
        let mut cmd = Command::new(rust_svc);
        cmd.arg(format!("127.0.0.1:{port}"));
        let p = Proc::spawn("bench-rust", cmd)?;
        wait_for_port(port, Duration::from_secs(10))?;
        Some((p, port))
    } else {
        None
    };
    let grpc = if a.cases.iter().any(|c| c == "grpc") { Some(grpc_server(&go)?) } else { None };
    let sdk_bin = if a.cases.iter().any(|c| c == "rust-sdk") { Some(crate::util::build_sdk_peer()?) } else { None };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    step(format!(
        "bench overhead: Go {} frontend on :{port}, {cpus} CPUs, {} rounds x {} s, exports {:?}, probes {}",
        setup::GO_NEWEST,
        a.rounds,
        a.seconds,
        a.export,
        a.go_http_probes
    ));
    let mut report = machine_line();
    let mut failures = Vec::new();
    for export in &a.export {
        for causality in &a.causality {
            for case in a.cases.iter().map(String::as_str) {
                if case == "rust-sdk" && *export != Export::Grpc {
                    continue;
                }
                let (pid, port) = match (&tls, &rust, case) {
                    (Some((p, tls_port)), _, "https") => (p.pid(), *tls_port),
                    (_, _, "grpc") => grpc.as_ref().map(|(p, port)| (p.pid(), *port)).expect("started for the grpc case"),
                    (_, Some((p, rust_port)), c) if c.starts_with("rust-") => (p.pid(), *rust_port),
                    _ => (srv.pid(), port),
                };
                let mut sides = vec![Side::Without];
                if case == "rust-sdk" {
                    sides.extend([Side::Zerotrace("auto".into()), Side::Sdk]);
                } else {
                    sides.extend(a.socket_hooks.iter().map(|h| Side::Zerotrace(h.clone())));
                }
                let mut runs: Vec<Runs> = sides.iter().map(|s| Runs { side: s.clone(), loads: Vec::new(), costs: Vec::new() }).collect();
                for round in 0..a.rounds {
                    eprintln!("  {case} / {export:?} / goroutine+channel hooks {causality}: round {} of {}", round + 1, a.rounds);
                    // Which side goes first alternates between rounds.
                    let order: Vec<usize> = if round % 2 == 0 { (0..runs.len()).collect() } else { (0..runs.len()).rev().collect() };
                    for i in order {
                        let r = &mut runs[i];
                        let (load, cost) = match &r.side {
                            Side::Without => {
                                // Warm the service and the caches identically before every run.
                                drive(case, port, &a, Duration::from_secs(1))?;
                                (drive(case, port, &a, Duration::from_secs(a.seconds))?, AgentCost::default())
                            }
                            Side::Zerotrace(hooks) => {
                                drive(case, port, &a, Duration::from_secs(1))?;
                                with_agent(pid, *export, causality, hooks, &a, || drive(case, port, &a, Duration::from_secs(a.seconds)))?
                            }
                            Side::Sdk => with_sdk(sdk_bin.as_deref().expect("built for rust-sdk"), case, &a)?,
                        };
                        r.loads.push(load);
                        r.costs.push(cost);
                    }
                }
                let (text, failed) = summarize(case, *export, causality, &a, &runs);
                report.push_str(&text);
                failures.extend(failed);
            }
        }
    }
    println!("\n{report}");
    let out = root().join("target/bench/overhead.txt");
    std::fs::create_dir_all(out.parent().unwrap())?;
    std::fs::write(&out, &report)?;
    eprintln!("(also written to {})", out.display());
    if !failures.is_empty() {
        bail!("{}", failures.join("; "));
    }
    Ok(())
}

fn title(case: &str, a: &OverheadArgs) -> String {
    match case {
        "noop" => "no-op handler at saturation (wrk -t1 -c32)".to_owned(),
        "fanout" => "fan-out handler (3 goroutines + channel) at saturation (wrk -t1 -c32)".to_owned(),
        "fanout-rate" => format!("fan-out handler (3 goroutines + channel) at {} req/s (32 connections, open loop)", a.rate),
        "https" => "no-op handler over HTTPS (TLS 1.3, keep-alive) at saturation (wrk -t1 -c32)".to_owned(),
        "grpc" => "grpc-go no-op unary method at saturation (32 concurrent calls on one connection, grpc-go v1.67 client)".to_owned(),
        "rust-noop" => "Rust (axum) no-op handler at saturation (wrk -t1 -c32), socket level".to_owned(),
        "rust-work" => format!("Rust (axum) 1 ms handler at {} req/s (32 connections, open loop), socket level", a.rate),
        "rust-sdk" => "Rust (axum) no-op handler at saturation (wrk -t1 -c32): zerotrace on the uninstrumented build vs the same service \
                       instrumented by hand with the OpenTelemetry SDK (tracing + tracing-opentelemetry + OTLP batch exporter), both \
                       exporting OTLP/gRPC to a local receiver (a fresh one per run)"
            .to_owned(),
        _ => format!("1 ms handler at {} req/s (32 connections, open loop)", a.rate),
    }
}

/// The report of one case: each side's median load, its ratios to the runs without
/// (paired by round; median and min-max), and what zerotrace cost per request. A side whose
/// spans per request fall below 1 fails the bench: no ratio may be won by losing spans.
fn summarize(case: &str, export: Export, causality: &str, a: &OverheadArgs, runs: &[Runs]) -> (String, Vec<String>) {
    let mut failures = Vec::new();
    let m = |v: &[Load], f: fn(&Load) -> f64| median(v.iter().map(f).collect());
    let without = &runs.iter().find(|r| r.side == Side::Without).expect("every case runs without").loads;
    let mut text = format!("{}, goroutine+channel hooks {causality}, export {export:?}\n", title(case, a));
    let errors: u64 = runs.iter().flat_map(|r| &r.loads).map(|l| l.errors).sum();
    for r in runs {
        let name = match &r.side {
            Side::Without => "without agent".to_owned(),
            Side::Zerotrace(h) => format!("zerotrace ({h})"),
            Side::Sdk => "OpenTelemetry SDK".to_owned(),
        };
        text.push_str(&format!(
            "  {name:<22} {:>9.0} req/s  p50 {:.3} ms  p99 {:.3} ms\n",
            m(&r.loads, |l| l.rps),
            m(&r.loads, |l| l.p50_ms),
            m(&r.loads, |l| l.p99_ms)
        ));
    }
    for r in runs.iter().filter(|r| r.side != Side::Without) {
        let paired = |f: fn(&Load, &Load) -> f64| -> Vec<f64> { r.loads.iter().zip(without).map(|(w, wo)| f(w, wo)).collect() };
        let thr = paired(|w, wo| w.rps / wo.rps.max(1e-9));
        let p50 = paired(|w, wo| wo.p50_ms / w.p50_ms.max(1e-9));
        let p99 = paired(|w, wo| wo.p99_ms / w.p99_ms.max(1e-9));
        let completed: u64 = r.loads.iter().map(|l| l.completed).sum::<u64>().max(1);
        let spans: u64 = r.costs.iter().map(|c| c.spans).sum();
        let spans_per = spans as f64 / completed as f64;
        let label = match &r.side {
            Side::Sdk => "OpenTelemetry SDK".to_owned(),
            Side::Zerotrace(h) => format!("zerotrace ({h})"),
            Side::Without => unreachable!(),
        };
        text.push_str(&format!(
            "  {label}: throughput ratio {}   p50 latency ratio {}   p99 latency ratio {}   spans per request {spans_per:.3}\n",
            spread(&thr),
            spread(&p50),
            spread(&p99)
        ));
        if spans_per < 1.0 {
            failures.push(format!("{case}, {label}: {spans_per:.3} spans per request (below 1: spans were lost)"));
        }
        let dropped: u64 = r.costs.iter().map(|c| c.dropped).sum();
        if dropped > 0 {
            failures.push(format!("{case}, {label}: {dropped} records or spans dropped"));
        }
        if let Side::Zerotrace(_) = r.side {
            let c = &r.costs;
            // gRPC calls are no HTTP/1 requests the socket hooks count: per completed call.
            let reqs: u64 = if case == "grpc" { completed } else { c.iter().map(|c| c.requests).sum::<u64>().max(1) };
            let cpu: f64 = c.iter().map(|c| c.cpu_s).sum();
            let run_s = a.seconds as f64 * c.len() as f64;
            let per = |x: u64| x as f64 / reqs as f64;
            text.push_str(&format!(
                "    agent CPU {:.1}% of one core ({:.2} us/request); per request: {:.3} uprobe hits, {:.2} traced socket operations, {:.2} ring records; \
                 ring wake-ups {} for {} records; spans dropped {}\n",
                100.0 * cpu / run_s,
                1e6 * cpu / reqs as f64,
                per(c.iter().map(|c| c.uprobe_hits).sum()),
                per(c.iter().map(|c| c.socket_syscalls).sum()),
                per(c.iter().map(|c| c.records).sum()),
                c.iter().map(|c| c.wakeups).sum::<u64>(),
                c.iter().map(|c| c.records).sum::<u64>(),
                c.iter().map(|c| c.dropped).sum::<u64>(),
            ));
        }
    }
    text.push_str(&format!("  errors {errors}\n\n"));
    (text, failures)
}

/// CPU seconds (user + system) used so far by `pid`.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

fn with_agent(pid: u32, export: Export, causality: &str, hooks: &str, a: &OverheadArgs, load: impl FnOnce() -> Result<Load>) -> Result<(Load, AgentCost)> {
    let mut sink = None;
    // `auto` is the default: not passed (a build older than the hook sets runs too).
    let mut args: Vec<String> = if hooks == "auto" { vec![] } else { vec!["--socket-hooks".into(), hooks.into()] };
    args.extend(["--go-http-probes".into(), a.go_http_probes.clone(), "--go-spawns".into(), causality.into(), "--go-channels".into(), causality.into()]);
    // Full tracing is what is measured: the default budget (half a core, probe hits
    // included) sheds in the fan-out case at saturation, where the targets' probe hits
    // alone cost about a core; shedding would also improve the ratio.
    args.extend(["--cpu-budget".into(), "off".into()]);
    match export {
        Export::None => args.extend(["--exporter".into(), "none".into()]),
        Export::Grpc => {
            let r = Receiver::start_bench_sink(Kind::Grpc)?;
            args.extend(["--otlp-endpoint".into(), r.endpoint()]);
            sink = Some(r);
        }
        Export::Http => {
            let r = Receiver::start_discarding(0)?;
            args.extend(["--otlp-protocol".into(), "http/protobuf".into(), "--otlp-endpoint".into(), r.endpoint()]);
            sink = Some(r);
        }
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut agent = Agent::start(&[pid], &refs, &[])?;
    let apid = agent.proc.pid();
    let cpu0 = cpu_seconds(apid);
    let result = load()?;
    let cpu1 = cpu_seconds(apid);
    agent.stop()?;
    // Spans exported count as what the sink received; without export, as assembled.
    let spans = match (&sink, export) {
        (Some(r), Export::Grpc) => r.spans_count() as u64,
        _ => agent.stat("spans_assembled"),
    };
    drop(sink);
    // No ratio is won by dropping spans: any shedding fails the bench (reported here, not
    // again when the agent is dropped).
    agent.sheds_on_purpose = true;
    let (shed, refused) = (agent.stat("requests_shed"), agent.stat("spans_dropped_memory_limit"));
    if shed + refused > 0 {
        bail!("the agent shed load in this run (requests_shed={shed}, spans_dropped_memory_limit={refused}): its --memory-limit tripped at the bench's load");
    }
    let cost = AgentCost {
        cpu_s: cpu1 - cpu0,
        requests: agent.stat("requests_seen"),
        uprobe_hits: agent.stat("uprobe_hits"),
        socket_syscalls: agent.stat("socket_ops"),
        wakeups: agent.stat("ring_wakeups"),
        records: agent.stat("events_read"),
        spans,
        dropped: agent.stat("events_dropped_ring_full") + agent.stat("spans_dropped_queue_full") + agent.stat("spans_dropped_export_failed"),
    };
    Ok((result, cost))
}

/// One run of the SDK peer: a fresh process exporting to a fresh counting receiver, warmed
/// for a second, measured, then stopped (SIGTERM flushes its batches) so that every span it
/// made is counted. Its queue is sized so that the batch processor drops nothing at this
/// load (its default 2,048 would drop spans and make its ratio look better than its cost).
fn with_sdk(bin: &std::path::Path, case: &str, a: &OverheadArgs) -> Result<(Load, AgentCost)> {
    let sink = Receiver::start_bench_sink(Kind::Grpc)?;
    let port = free_port();
    let mut cmd = Command::new(bin);
    cmd.arg(format!("127.0.0.1:{port}"))
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", sink.endpoint())
        .env("OTEL_BSP_MAX_QUEUE_SIZE", "262144")
        .env("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "4096");
    let mut p = Proc::spawn("bench-sdk", cmd)?;
    wait_for_port(port, Duration::from_secs(10))?;
    let warm = drive(case, port, a, Duration::from_secs(1))?;
    let load = drive(case, port, a, Duration::from_secs(a.seconds))?;
    p.signal(libc::SIGTERM);
    if !p.wait_timeout(Duration::from_secs(90)).is_some_and(|s| s.success()) {
        bail!("the SDK peer did not flush and exit within 90 s of SIGTERM ({} spans received): {}", sink.spans_count(), p.stderr_text());
    }
    // The warm-up's spans are in the count too: only the measured run's are kept.
    let spans = (sink.spans_count() as u64).saturating_sub(warm.completed);
    Ok((load, AgentCost { spans, ..AgentCost::default() }))
}

fn drive(case: &str, port: u16, a: &OverheadArgs, d: Duration) -> Result<Load> {
    match case {
        "noop" => wrk(port, "/noop", d),
        "fanout" => wrk(port, "/fanout", d),
        "fanout-rate" => fixed_rate(port, "/fanout", a.rate, 32, d),
        "work" => fixed_rate(port, "/work", a.rate, 32, d),
        "https" => wrk_url(&format!("https://127.0.0.1:{port}/leaf/bench"), d),
        "grpc" => grpc_load(port, d),
        "rust-noop" | "rust-sdk" => wrk(port, "/hello", d),
        "rust-work" => fixed_rate(port, "/slow/1", a.rate, 32, d),
        other => bail!("unknown case {other:?} ({CASES})"),
    }
}

/// The e2e test service serving HTTPS (HTTP/2 stays on; wrk speaks HTTP/1.1) with a
/// certificate it makes itself.
fn https_server(go: &std::path::Path) -> Result<(Proc, u16)> {
    let bin = root().join("target/bench/causal");
    std::fs::create_dir_all(bin.parent().unwrap())?;
    tools::go_build(go, &root().join("tests/e2e/go/causal"), &bin, &[])?;
    let dir = root().join("target/bench/tls");
    std::fs::create_dir_all(&dir)?;
    let st = Command::new(&bin).arg("gencert").arg(&dir).status()?;
    if !st.success() {
        bail!("making the benchmark's certificate failed");
    }
    let port = free_port();
    let mut cmd = Command::new(&bin);
    cmd.arg(format!("127.0.0.1:{port}")).env("CAUSAL_TLS_DIR", &dir);
    let p = Proc::spawn("bench-https", cmd)?;
    wait_for_port(port, Duration::from_secs(10))?;
    Ok((p, port))
}

/// The grpc-go test service (grpc-go from the offline module sources) serving on a port of
/// its own; also the grpc case's load generator.
fn grpc_server(go: &std::path::Path) -> Result<(Proc, u16)> {
    let bin = root().join("target/bench/grpcshop");
    std::fs::create_dir_all(bin.parent().unwrap())?;
    tools::go_build_with(go, &root().join("tests/e2e/go/grpcshop"), &bin, &[], &[], tools::GRPC)?;
    let (port, http_port) = (free_port(), free_port());
    let mut cmd = Command::new(&bin);
    cmd.args(["serve", &format!("127.0.0.1:{port}"), &format!("127.0.0.1:{http_port}")]);
    let p = Proc::spawn("bench-grpc", cmd)?;
    wait_for_port(port, Duration::from_secs(10))?;
    let _ = GRPCSHOP.set(bin);
    Ok((p, port))
}

/// grpcshop's load mode at saturation: "completed N errors E p50_ms X p99_ms Y".
fn grpc_load(port: u16, d: Duration) -> Result<Load> {
    let bin = GRPCSHOP.get().context("the grpc server was not built")?;
    let out =
        Command::new(bin).args(["load", &format!("127.0.0.1:{port}"), &d.as_secs().max(1).to_string(), "32"]).output().context("running grpcshop load")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("grpcshop load: {text} {}", String::from_utf8_lossy(&out.stderr));
    }
    let w: Vec<&str> = text.split_whitespace().collect();
    let num = |key: &str| -> Result<f64> {
        w.iter().position(|x| *x == key).and_then(|i| w.get(i + 1)?.parse().ok()).with_context(|| format!("grpcshop load printed {text:?}"))
    };
    let completed = num("completed")? as u64;
    Ok(Load { rps: completed as f64 / d.as_secs_f64(), p50_ms: num("p50_ms")?, p99_ms: num("p99_ms")?, errors: num("errors")? as u64, completed })
}

/// wrk at saturation; parses requests/s and the 50th/99th latency percentiles.
fn wrk(port: u16, path: &str, d: Duration) -> Result<Load> {
    wrk_url(&format!("http://127.0.0.1:{port}{path}"), d)
}

fn wrk_url(url: &str, d: Duration) -> Result<Load> {
    let out = Command::new("wrk")
        .args(["-t1", "-c32", &format!("-d{}s", d.as_secs().max(1)), "--latency", url])
        .stderr(Stdio::inherit())
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut l = Load::default();
    for line in text.lines() {
        let t = line.trim();
        if let Some((n, _)) = t.split_once(" requests in ") {
            l.completed = n.trim().parse().unwrap_or(0);
        } else if let Some(v) = t.strip_prefix("Requests/sec:") {
            l.rps = v.trim().parse().unwrap_or(0.0);
        } else if let Some(v) = t.strip_prefix("50%") {
            l.p50_ms = wrk_ms(v.trim());
        } else if let Some(v) = t.strip_prefix("99%") {
            l.p99_ms = wrk_ms(v.trim());
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            l.errors += v.trim().parse::<u64>().unwrap_or(0);
        } else if t.starts_with("Socket errors:") {
            l.errors += t.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse::<u64>().ok()).sum::<u64>();
        }
    }
    if l.rps == 0.0 || l.completed == 0 {
        bail!("wrk printed no throughput or request count:\n{text}");
    }
    Ok(l)
}

fn wrk_ms(v: &str) -> f64 {
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
    let n: f64 = num.parse().unwrap_or(0.0);
    match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        _ => n,
    }
}

/// Open-loop load at `rate` req/s over `conns` keep-alive connections; latency counts from
/// each request's scheduled time, so a stall is not hidden by sending less. Throughput is
/// the responses completed in the window (a generator that falls behind finishes what was
/// due after the window, uncounted), so a slower service shows a lower rate, not the
/// schedule's.
fn fixed_rate(port: u16, path: &str, rate: u32, conns: usize, d: Duration) -> Result<Load> {
    let start = Instant::now() + Duration::from_millis(50);
    let end = start + d;
    let interval = Duration::from_secs_f64(conns as f64 / rate as f64);
    let handles: Vec<_> = (0..conns)
        .map(|c| {
            let path = path.to_owned();
            std::thread::spawn(move || -> Result<(Vec<f64>, u64, u64)> {
                let mut client = Client::new(port);
                client.connect()?;
                let (mut lat, mut errors, mut in_window) = (Vec::new(), 0, 0);
                let offset = interval.mul_f64(c as f64 / conns as f64);
                let mut k = 0u32;
                loop {
                    // Every request due in the window is sent, late or not: its latency
                    // counts from when it was due.
                    let due = start + offset + interval * k;
                    if due > end {
                        break;
                    }
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    if !(200..300).contains(&client.get(&path)?.status) {
                        errors += 1;
                    }
                    lat.push(due.elapsed().as_secs_f64() * 1000.0);
                    if Instant::now() <= end {
                        in_window += 1;
                    }
                    k += 1;
                }
                Ok((lat, errors, in_window))
            })
        })
        .collect();
    let (mut all, mut errors, mut completed) = (Vec::new(), 0, 0);
    for h in handles {
        let (lat, e, n) = h.join().map_err(|_| anyhow::anyhow!("load thread panicked"))??;
        all.extend(lat);
        errors += e;
        completed += n;
    }
    all.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1))).copied().unwrap_or(0.0);
    Ok(Load { rps: completed as f64 / d.as_secs_f64(), p50_ms: pct(0.5), p99_ms: pct(0.99), errors, completed })
}
