//! Soak: a Go and a Rust service under steady load (2,500 req/s each), traced and exported
//! over OTLP to a local receiver, while the agent's RSS and CPU are sampled. After the
//! warm-up (a third of the run, at least 90 s: the cache of recent spans' traces, 196,608
//! spans, is full after ~40 s at this rate, and RSS settles by ~70-90 s) RSS must be flat (its
//! peak grows < 1 MiB/min with 8 MiB of slack, and from 5 minutes on its fitted slope is
//! under 1 MiB/min), nothing
//! dropped while the receiver keeps up, and CPU per span stable. The curve is written to
//! target/soak/ (CSV and SVG). ZEROTRACE_SOAK_SECONDS sets the length (CI: 150 s;
//! `cargo xtask soak`: 600 s), ZEROTRACE_SOAK_SAMPLE_SECONDS the sampling period (5 s
//! below 300 s, else 10 s).
use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};
use zerotrace_e2e::{
    agent::Agent,
    load,
    otlp::{Kind, Receiver},
    proc::{rss_kib, start_server_env},
    tools::{self, GO_NEWEST},
};

/// Requests per second per service.
const RATE: f64 = 2_500.0;
/// How much higher the second half's RSS peak may be than the first's.
const PEAK_SLACK_MIB: f64 = 8.0;

/// One sample of the agent: time since the load started, RSS, CPU seconds used so far, and
/// spans the receiver holds.
#[derive(Clone, Copy, Debug)]
struct Sample {
    at: f64,
    rss_kib: u64,
    cpu_s: f64,
    spans: u64,
}

/// CPU seconds (user + system) process `pid` has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime and stime are the 12th
    // and 13th of them.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

/// Least-squares slope of y over x.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    let (mx, my) = (points.iter().map(|p| p.0).sum::<f64>() / n, points.iter().map(|p| p.1).sum::<f64>() / n);
    let num: f64 = points.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    let den: f64 = points.iter().map(|(x, _)| (x - mx) * (x - mx)).sum();
    if den == 0.0 { 0.0 } else { num / den }
}

/// The curve as an SVG: RSS (MiB, left scale) and CPU (% of a core, right scale) over time.
fn svg(samples: &[Sample], warm: f64) -> String {
    let (w, h, pad) = (720.0, 360.0, 50.0);
    let t_max = samples.last().map_or(1.0, |s| s.at).max(1.0);
    let rss: Vec<f64> = samples.iter().map(|s| s.rss_kib as f64 / 1024.0).collect();
    let cpu: Vec<f64> = samples.windows(2).map(|p| 100.0 * (p[1].cpu_s - p[0].cpu_s) / (p[1].at - p[0].at).max(1e-9)).collect();
    let rss_max = rss.iter().cloned().fold(1.0, f64::max) * 1.2;
    let cpu_max = cpu.iter().cloned().fold(1.0, f64::max) * 1.2;
    let x = |t: f64| pad + (w - 2.0 * pad) * t / t_max;
    let y = |v: f64, max: f64| h - pad - (h - 2.0 * pad) * v / max;
    let mut out = format!(r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#);
    let _ = write!(out, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = write!(out, r#"<line x1="{pad}" y1="{}" x2="{}" y2="{}" stroke="black"/>"#, h - pad, w - pad, h - pad);
    let _ = write!(out, r##"<line x1="{0}" y1="{pad}" x2="{0}" y2="{1}" stroke="#888" stroke-dasharray="4"/>"##, x(warm), h - pad);
    let _ = write!(out, r#"<text x="{}" y="{}">time (s), 0 to {t_max:.0}; warm-up to the dashed line</text>"#, pad, h - pad + 30.0);
    let line = |pts: Vec<(f64, f64)>, color: &str| {
        let p: Vec<String> = pts.iter().map(|(a, b)| format!("{a:.1},{b:.1}")).collect();
        format!(r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#, p.join(" "))
    };
    out.push_str(&line(samples.iter().zip(&rss).map(|(s, r)| (x(s.at), y(*r, rss_max))).collect(), "#1f77b4"));
    out.push_str(&line(samples.iter().skip(1).zip(&cpu).map(|(s, c)| (x(s.at), y(*c, cpu_max))).collect(), "#d62728"));
    let _ = write!(out, r##"<text x="{pad}" y="20" fill="#1f77b4">agent RSS (MiB, 0 to {rss_max:.0})</text>"##);
    let _ = write!(out, r##"<text x="{}" y="20" fill="#d62728" text-anchor="end">agent CPU (% of a core, 0 to {cpu_max:.0})</text>"##, w - pad);
    out.push_str("</svg>\n");
    out
}

#[test]
fn soak_rss_flat_nothing_dropped_cpu_per_span_stable() -> Result<()> {
    let env_secs = |k: &str, d: u64| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let seconds = env_secs("ZEROTRACE_SOAK_SECONDS", 150).max(150);
    let every = env_secs("ZEROTRACE_SOAK_SAMPLE_SECONDS", if seconds < 300 { 5 } else { 10 }).max(1);
    let warm = (seconds as f64 / 3.0).max(90.0);
    let rx = Receiver::start_counting(Kind::Grpc)?;
    let (go, go_port) = start_server_env("soak-go", &tools::causal(GO_NEWEST)?, &[("OTEL_SERVICE_NAME", "soak-go")])?;
    let (rust, rust_port) = start_server_env("soak-rust", &tools::rust_svc()?, &[("OTEL_SERVICE_NAME", "soak-rust")])?;
    let endpoint = rx.endpoint();
    let mut agent = Agent::start(&[go.pid(), rust.pid()], &["--otlp-endpoint", endpoint.as_str()], &[])?;
    let pid = agent.proc.pid();
    let duration = Duration::from_secs(seconds);
    let loads: Vec<_> = [(go_port, "/leaf/soak"), (rust_port, "/hello")]
        .into_iter()
        .map(|(port, path)| std::thread::spawn(move || load::at_rate(port, path, 8, RATE, duration)))
        .collect();
    let start = Instant::now();
    let sample = || Sample { at: start.elapsed().as_secs_f64(), rss_kib: rss_kib(pid), cpu_s: cpu_seconds(pid), spans: rx.spans_count() as u64 };
    let mut samples = vec![sample()];
    while start.elapsed() < duration {
        std::thread::sleep(Duration::from_secs(every).min(duration.saturating_sub(start.elapsed())));
        samples.push(sample());
    }
    let mut served = 0;
    for l in loads {
        let r = l.join().expect("load thread")?;
        ensure!(r.errors == 0 && r.non_2xx == 0, "the services failed requests: {r:?}");
        ensure!(r.behind < (RATE * seconds as f64 * 0.05) as u64, "the load fell behind its rate (this machine is too busy for a soak): {r:?}");
        served += r.requests;
    }
    // The last spans in flight.
    rx.settle(served, 40);
    agent.stop()?;

    let dir = tools::root().join("target/soak");
    std::fs::create_dir_all(&dir)?;
    let mut csv = String::from("seconds,rss_kib,cpu_seconds,spans\n");
    for s in &samples {
        let _ = writeln!(csv, "{:.1},{},{:.3},{}", s.at, s.rss_kib, s.cpu_s, s.spans);
    }
    std::fs::write(dir.join("soak.csv"), csv)?;
    std::fs::write(dir.join("soak.svg"), svg(&samples, warm))?;

    // After the warm-up: RSS, and CPU per span in the first and second halves of the rest.
    // The allocator hands memory back and takes it again (RSS moves by tens of MiB between
    // samples), so growth is judged by each half's peak; the least-squares slope is shown.
    let steady: Vec<&Sample> = samples.iter().filter(|s| s.at >= warm - 0.5).collect();
    let rss_slope = slope(&steady.iter().map(|s| (s.at / 60.0, s.rss_kib as f64 / 1024.0)).collect::<Vec<_>>());
    let mid = steady.len() / 2;
    let peak = |h: &[&Sample]| h.iter().map(|s| s.rss_kib).max().unwrap_or(0) as f64 / 1024.0;
    let center = |h: &[&Sample]| h.iter().map(|s| s.at).sum::<f64>() / h.len().max(1) as f64;
    let (peak_a, peak_b) = (peak(&steady[..mid]), peak(&steady[mid..]));
    let minutes = (center(&steady[mid..]) - center(&steady[..mid])) / 60.0;
    let per_span = |a: &Sample, b: &Sample| (b.cpu_s - a.cpu_s) * 1e6 / (b.spans.saturating_sub(a.spans)).max(1) as f64;
    let (first, middle, end) = (steady[0], steady[mid], steady[steady.len() - 1]);
    let (cpu_a, cpu_b) = (per_span(first, middle), per_span(middle, end));
    let counted = agent.counted_losses()?;
    let spans = rx.spans_count() as u64;
    println!(
        "soak {seconds} s: {served} requests ({:.0}/s), {spans} spans, {counted} dropped; agent RSS {} KiB at start, peaks after warm-up {peak_a:.1} then {peak_b:.1} MiB ({:+.2} MiB/min; least-squares slope {rss_slope:.2} MiB/min); \
         agent CPU per span {cpu_a:.2} us then {cpu_b:.2} us ({:.1} % of a core); curve in {}",
        served as f64 / seconds as f64,
        samples[0].rss_kib,
        (peak_b - peak_a) / minutes,
        100.0 * (end.cpu_s - samples[0].cpu_s) / end.at,
        dir.join("soak.svg").display()
    );
    // Samples move by up to ~20 MiB either way as the allocator returns and takes memory
    // (the 10-minute run: 138-158 MiB throughout), so the halves' peaks get that much
    // slack, and a run long enough for a fitted slope to mean something (5 min and more)
    // must also stay under 1 MiB/min by least squares.
    ensure!(
        peak_b <= peak_a + (1.0 * minutes).max(PEAK_SLACK_MIB),
        "agent RSS grows after the warm-up: peak {peak_a:.1} then {peak_b:.1} MiB, {minutes:.1} min apart (samples: {samples:?})"
    );
    ensure!(seconds < 300 || rss_slope < 1.0, "agent RSS grows after the warm-up: {rss_slope:.2} MiB/min by least squares (samples: {samples:?})");
    ensure!(counted == 0 && spans == served, "{served} requests, {spans} spans, {counted} counted as dropped: the receiver kept up, nothing may be lost");
    ensure!((cpu_b / cpu_a - 1.0).abs() < 0.35, "agent CPU per span moved from {cpu_a:.2} us to {cpu_b:.2} us");
    Ok(())
}
