//! CPU profiles: real processes with a known hot function, sampled by the kernel's
//! perf_event program, unwound (Go: frame pointers; Rust release builds without frame
//! pointers: .eh_frame in the agent), symbolized, and read back by the real `go tool
//! pprof` and from a real OTLP receiver. A handler that burns CPU gives samples that carry
//! its request's span.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use zerotrace_e2e::{
    agent::Agent,
    http::Client,
    otlp::{Kind, Receiver},
    proc::{Proc, free_port, start_server, wait_for_port},
    tools::{self, GO_NEWEST, GO_OLDEST},
};

/// `go tool pprof ARGS FILE` with the newest Go; its stdout.
fn pprof(args: &[&str], file: &Path) -> Result<String> {
    let out = Command::new(tools::go(GO_NEWEST)?)
        .args(["tool", "pprof"])
        .args(args)
        .arg(file)
        .env("GOTOOLCHAIN", "local")
        .env("GOTELEMETRY", "off")
        .env("PPROF_TMPDIR", tools::work_dir())
        .output()
        .context("running go tool pprof")?;
    ensure!(out.status.success(), "go tool pprof {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The function with the most self time in `go tool pprof -top` output.
fn top_function(top: &str) -> Option<String> {
    // Rows: "flat flat% sum% cum cum% name"; the first row after the header is the top.
    top.lines().skip_while(|l| !l.trim_start().starts_with("flat")).nth(1).and_then(|l| l.split_whitespace().nth(5).map(str::to_owned))
}

/// Whether some sample's stack in `go tool pprof -traces` output holds `chain` (leaf
/// first) as consecutive frames.
fn has_chain(traces: &str, chain: &[&str]) -> bool {
    for sample in traces.split("-----------+-------------------------------------------------------") {
        let frames: Vec<String> = sample
            .lines()
            .filter_map(|l| {
                // A sample's first line has "  <value>  <frame>", the others just the frame.
                let l = l.trim();
                if l.is_empty()
                    || l.starts_with("File:")
                    || l.starts_with("Type:")
                    || l.starts_with("Time:")
                    || l.starts_with("Duration:")
                    || l.contains(": ") && !l.contains("::")
                {
                    return None;
                }
                l.split_whitespace().last().map(str::to_owned)
            })
            .collect();
        if frames.windows(chain.len()).any(|w| w.iter().zip(chain).all(|(f, c)| f == c)) {
            return true;
        }
    }
    false
}

fn out_path(name: &str) -> PathBuf {
    let p = tools::work_dir().join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

/// Runs `zerotrace profile` on `pid` while `load` runs; returns the agent's stderr.
fn profile(pid: u32, args: &[&str], load: impl FnOnce() -> Result<()>) -> Result<String> {
    let mut a = Agent::start_as("profile", &[pid], args, &[])?;
    load()?;
    match a.proc.wait_timeout(Duration::from_secs(60)) {
        Some(st) if st.success() => Ok(a.proc.stderr_text()),
        Some(st) => bail!("zerotrace profile exited with {st}; stderr:\n{}", a.proc.stderr_text()),
        None => {
            a.proc.signal(libc::SIGKILL);
            bail!("zerotrace profile did not end after its duration; stderr:\n{}", a.proc.stderr_text())
        }
    }
}

/// GET /burn?ms=N in a loop for `total`.
fn burn_go(port: u16, ms: u32, total: Duration) -> Result<u32> {
    let mut c = Client::new(port);
    let end = Instant::now() + total;
    let mut n = 0;
    while Instant::now() < end {
        let r = c.get(&format!("/burn?ms={ms}"))?;
        ensure!(r.status == 200, "burn answered {}", r.status);
        n += 1;
    }
    Ok(n)
}

fn go_hot_function(version: &str, bin: &Path, label: &str) -> Result<()> {
    let (srv, port) = start_server(&format!("httpserver-{label}"), bin)?;
    let pb = out_path(&format!("go-{label}.pb.gz"));
    let svg = out_path(&format!("go-{label}.svg"));
    let (pb_s, svg_s) = (pb.to_string_lossy().into_owned(), svg.to_string_lossy().into_owned());
    let log = profile(srv.pid(), &["--duration", "6s", "--frequency", "99", "-o", &pb_s, "--flamegraph", &svg_s], || {
        burn_go(port, 100, Duration::from_secs(4)).map(drop)
    })?;
    ensure!(log.contains("wrote the pprof profile"), "Go {version} {label}: no profile written:\n{log}");
    let top = pprof(&["-top", "-nodecount=10"], &pb)?;
    assert_eq!(top_function(&top).as_deref(), Some("main.burnHot"), "Go {version} {label}: top self-time function\n{top}");
    let traces = pprof(&["-traces"], &pb)?;
    assert!(
        has_chain(&traces, &["main.burnHot", "main.burnMiddle", "main.burnOuter", "main.burn"]),
        "Go {version} {label}: no sample with burnHot <- burnMiddle <- burnOuter <- burn:\n{}",
        &traces[..traces.len().min(6000)]
    );
    // Samples inside the handler carry the request's span (labels).
    let tags = pprof(&["-tags"], &pb)?;
    for label in ["span_id", "trace_id", "goroutine", "thread"] {
        assert!(tags.contains(label), "Go {version} {label}: label missing in -tags:\n{tags}");
    }
    let svg_text = std::fs::read_to_string(&svg)?;
    assert!(svg_text.contains("<svg") && svg_text.contains("main.burnHot"), "flame graph lacks main.burnHot");
    Ok(())
}

/// A Go service with a known hot function, oldest and newest Go: `go tool pprof` reads our
/// file, the hot function has the most self time, and its call chain is whole.
#[test]
fn go_hot_function_in_pprof() -> Result<()> {
    for version in [GO_OLDEST, GO_NEWEST] {
        go_hot_function(version, &tools::httpserver(version)?, &format!("go{version}"))?;
    }
    Ok(())
}

/// A stripped Go binary (no symbol table, no DWARF) symbolizes from Go's own table.
#[test]
fn stripped_go_binary_symbolizes() -> Result<()> {
    let out = tools::work_dir().join(format!("httpserver-go{GO_NEWEST}-stripped-prof"));
    tools::go_build(&tools::go(GO_NEWEST)?, &tools::root().join("tests/e2e/go/httpserver"), &out, &["-ldflags=-s -w"])?;
    let bytes = std::fs::read(&out)?;
    assert!(!bytes.windows(11).any(|w| w == b".debug_info"), "not stripped");
    go_hot_function(GO_NEWEST, &out, "stripped")
}

/// Whether `func` in `bin` sets up a frame pointer (push rbp; mov rbp,rsp) in its prologue.
fn sets_frame_pointer(bin: &Path, func: &str) -> Result<bool> {
    let out = Command::new("objdump").args(["-d", "--no-show-raw-insn", "-M", "intel", "-C"]).arg(bin).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let start = text.find(&format!("<{func}>:")).with_context(|| format!("{func} not in objdump output"))?;
    let body: Vec<&str> = text[start..].lines().skip(1).take(6).collect();
    Ok(body.iter().any(|l| l.contains("mov    rbp,rsp")))
}

/// A Rust release binary WITHOUT frame pointers: the hot function called through three
/// frames comes out whole (unwound from .eh_frame in the agent).
#[test]
fn rust_without_frame_pointers_unwinds() -> Result<()> {
    let bin = tools::rust_svc()?;
    if Command::new("objdump").arg("--version").output().is_ok() {
        ensure!(!sets_frame_pointer(&bin, "rust_svc::burn_inner")?, "rust-svc was built with frame pointers: the test would prove nothing");
    }
    let mut cmd = Command::new(&bin);
    cmd.args(["burn", "20"]);
    let p = Proc::spawn("rust-svc-burn", cmd)?;
    zerotrace_e2e::proc::wait_until("rust-svc to start burning", Duration::from_secs(10), || p.stdout_text().contains("burning"))?;
    let pb = out_path("rust.pb.gz");
    let pb_s = pb.to_string_lossy().into_owned();
    let log = profile(p.pid(), &["--duration", "4s", "--frequency", "99", "-o", &pb_s], || Ok(()))?;
    p.signal(libc::SIGKILL);
    ensure!(log.contains("layer=\"socket\""), "rust-svc should be traced as a native process:\n{log}");
    let top = pprof(&["-top", "-nodecount=10"], &pb)?;
    assert_eq!(top_function(&top).as_deref(), Some("rust_svc::burn_inner"), "top self-time function\n{top}");
    let traces = pprof(&["-traces"], &pb)?;
    assert!(
        has_chain(&traces, &["rust_svc::burn_inner", "rust_svc::burn_middle", "rust_svc::burn_outer", "rust_svc::main"]),
        "no sample with burn_inner <- burn_middle <- burn_outer <- main:\n{}",
        &traces[..traces.len().min(6000)]
    );
    // Nearly every sample unwinds to main: a broken unwinder stops early.
    let full = traces.matches("rust_svc::main").count();
    let samples = traces.matches("-----------+").count();
    assert!(full * 10 >= samples * 8, "only {full} of {samples} samples unwound to main:\n{}", &traces[..traces.len().min(6000)]);
    Ok(())
}

/// `zerotrace run`: profiles over OTLP next to the traces; samples of a burning handler carry
/// its span (Go: the goroutine's span; Rust/tokio: the one open request), and the span
/// says how many samples it got.
#[test]
fn request_samples_carry_their_span() -> Result<()> {
    let rx = Receiver::start(Kind::Grpc, 0)?;
    let endpoint = rx.endpoint();
    let (go, go_port) = start_server("httpserver-prof", &tools::httpserver(GO_NEWEST)?)?;
    let rs_port = free_port();
    let mut cmd = Command::new(tools::rust_svc()?);
    cmd.arg(format!("127.0.0.1:{rs_port}")).env("OTEL_SERVICE_NAME", "rust-burn");
    let rs = Proc::spawn("rust-svc-prof", cmd)?;
    wait_for_port(rs_port, Duration::from_secs(10))?;
    let mut agent = Agent::start(&[go.pid(), rs.pid()], &["--otlp-endpoint", endpoint.as_str(), "--batch-delay", "200ms", "--profile-frequency", "99"], &[])?;
    let mut gc = Client::new(go_port);
    let mut rc = Client::new(rs_port);
    for _ in 0..3 {
        ensure!(gc.get("/burn?ms=400")?.status == 200);
        ensure!(rc.get("/burn/400")?.status == 200);
        std::thread::sleep(Duration::from_millis(100));
    }
    agent.stop()?;
    let spans = rx.spans();
    let samples = rx.samples()?;
    ensure!(!samples.is_empty(), "no profile samples received; agent stderr:\n{}", agent.proc.stderr_text());
    for (route, hot) in [("/burn", "main.burnHot"), ("/burn/400", "rust_svc::burn_inner")] {
        let burns: Vec<_> = spans.iter().filter(|s| s.attr("url.path") == route && s.kind == 2).collect();
        assert_eq!(burns.len(), 3, "{route}: server spans: {spans:#?}");
        for sp in &burns {
            let n: u64 = sp.attr("zerotrace.cpu.samples").parse().unwrap_or(0);
            // 400 ms at 99 Hz is ~40 samples; a loaded CI machine still gives many.
            assert!(n >= 10, "{route}: span {} got {n} CPU samples", sp.span_id);
            let linked: Vec<_> = samples.iter().filter(|s| s.span_id == sp.span_id).collect();
            assert!(!linked.is_empty(), "{route}: no profile sample links span {}", sp.span_id);
            assert!(linked.iter().all(|s| s.trace_id == sp.trace_id), "{route}: linked samples name another trace");
            assert!(
                linked.iter().any(|s| s.frames.first().is_some_and(|f| f == hot)),
                "{route}: no linked sample has {hot} on top: {:?}",
                linked.iter().map(|s| s.frames.first()).collect::<Vec<_>>()
            );
        }
    }
    // Outside requests (idle), nothing is linked to a span that is not a server span.
    let ids: std::collections::HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    for s in samples.iter().filter(|s| !s.span_id.is_empty()) {
        assert!(ids.contains(s.span_id.as_str()), "a sample links span {} that was never exported", s.span_id);
    }
    Ok(())
}

/// A target that exits while profiled: the profile of what ran is written at once (the
/// agent ends with its last target), and go tool pprof reads it.
#[test]
fn a_target_that_exits_keeps_its_samples() -> Result<()> {
    let mut cmd = Command::new(tools::rust_svc()?);
    cmd.args(["burn", "3"]);
    let p = Proc::spawn("rust-svc-burn-exit", cmd)?;
    zerotrace_e2e::proc::wait_until("rust-svc to start burning", Duration::from_secs(10), || p.stdout_text().contains("burning"))?;
    let pb = out_path("exit.pb.gz");
    let pb_s = pb.to_string_lossy().into_owned();
    let started = Instant::now();
    let log = profile(p.pid(), &["--duration", "60s", "--frequency", "99", "-o", &pb_s], || Ok(()))?;
    ensure!(started.elapsed() < Duration::from_secs(30), "the agent did not end with its target:\n{log}");
    ensure!(log.contains("every traced process has exited"), "{log}");
    let top = pprof(&["-top", "-nodecount=5"], &pb)?;
    assert_eq!(top_function(&top).as_deref(), Some("rust_svc::burn_inner"), "{top}");
    Ok(())
}

/// Bad input: a PID that does not exist, a zero duration: a clear message, exit 2, no file.
#[test]
fn profile_bad_input_says_what_to_do() -> Result<()> {
    let pb = out_path("bad.pb.gz");
    for (args, needle) in [(vec!["--pid", "999999", "--duration", "2s"], "999999"), (vec!["--pid", "1", "--duration", "0s"], "--duration")] {
        let out = Command::new(tools::zerotrace_bin()?).arg("profile").args(&args).arg("-o").arg(&pb).output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle) && err.contains("error"), "{args:?}: {err}");
        assert!(!pb.exists(), "{args:?} wrote a profile");
    }
    Ok(())
}

/// Profiles over OTLP http/protobuf (POST /v1development/profiles next to /v1/traces).
#[test]
fn profiles_over_http_protobuf() -> Result<()> {
    let rx = Receiver::start(Kind::Http, 0)?;
    let endpoint = rx.endpoint();
    let (go, port) = start_server("httpserver-prof-http", &tools::httpserver(GO_NEWEST)?)?;
    let mut agent = Agent::start(
        &[go.pid()],
        &["--otlp-protocol", "http/protobuf", "--otlp-endpoint", endpoint.as_str(), "--batch-delay", "200ms", "--profile-frequency", "99"],
        &[],
    )?;
    burn_go(port, 300, Duration::from_secs(1))?;
    agent.stop()?;
    let samples = rx.samples()?;
    let spans = rx.spans();
    let burn = spans.iter().find(|s| s.attr("url.path") == "/burn").context("no /burn span")?;
    assert!(
        samples.iter().any(|s| s.span_id == burn.span_id && s.frames.first().is_some_and(|f| f == "main.burnHot")),
        "no sample of main.burnHot linked to the /burn span over HTTP: {} samples",
        samples.len()
    );
    assert_eq!(agent.stat("profile_export_errors"), 0);
    assert!(agent.stat("profiles_exported") >= 1, "profiles_exported = {}", agent.stat("profiles_exported"));
    Ok(())
}
