//! `cargo xtask vmtest`: zerotrace on the kernels people run, each booted under qemu with
//! software emulation (TCG, 1 vCPU, 2 GiB, no network device). One initramfs (busybox, the
//! agent, the Go and Rust test services, tests/vm/init.sh as /init) serves every kernel; the
//! guest runs an end-to-end subset and writes what it saw to a second serial port; every
//! assertion is made here, on the host (vmtest/checks.rs). A guest that hangs or panics is
//! killed at its deadline and its kernel gets FAIL rows saying so. Results:
//! target/vmtest/results.txt, with each kernel's console and data logs next to it.
mod checks;
mod initramfs;
mod kernels;

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Args;
use zerotrace_e2e::tools::{self, GO_NEWEST, GO_OLDEST};

use crate::{
    setup,
    util::{build_release, build_rust_services, root, step},
};

/// Every kernel series `--all` boots: Debian's cloud kernels from bullseye (5.10), bookworm
/// (6.1), Debian 13 / bookworm-backports (6.12), trixie-backports (6.16: the first with
/// `tcp:tcp_sendmsg_locked`; 6.19), and the newest series Debian offers.
pub const MATRIX: &[&str] = &["5.10", "6.1", "6.12", "6.16", "6.19", "newest"];
/// What `cargo xtask vmtest` and `cargo xtask test` boot by default: the oldest (the fentry
/// hook set, no bpf_loop), 6.19 (the socket-layer tracepoints) and the newest series (7.3
/// today: Linux 7.0+ runs tracepoint programs preemptible, where the twins rescue the runs
/// the kernel skips; docs/limits.md).
pub const DEFAULT_KERNELS: &[&str] = &["5.10", "6.19", "newest"];
/// A guard against a hung start, not a speed goal: under TCG the kernel's verifier and the
/// agent's BTF parsing run ~25-40x slower than on hardware, and the start time is a
/// measurement shown in the table (speed goals live in `cargo xtask bench`).
const READY_WITHIN_S: f64 = 120.0;
/// The first kernel series with bpf_loop, which `--inject-traceparent` needs.
const BPF_LOOP_SINCE: (u32, u32) = (5, 17);
/// `zerotrace tail --json` spans the guest waits for: two Go span trees (29 each), Rust
/// HTTP/1 (12) and gRPC (6); injection: two A -> B -> C chains (5 each).
const TRACE_SPANS: usize = 29 * 2 + 12 + 6;
const INJECT_SPANS: usize = 10;

#[derive(Args, Clone, Debug)]
pub struct VmtestArgs {
    /// Kernel series to boot, comma-separated: 5.10, 6.1, 6.12, 6.16, 6.19, newest (or any
    /// series Debian has). Default: the oldest and the newest.
    #[arg(long, value_delimiter = ',')]
    pub kernel: Vec<String>,
    /// Every kernel of the matrix.
    #[arg(long)]
    pub all: bool,
    /// The agent's --socket-hooks in every guest run (auto, btf, raw, or any set the agent
    /// offers), so the same scenarios run with a forced hook set.
    #[arg(long, default_value = "auto")]
    pub socket_hooks: String,
    /// Seconds a guest may run before it is killed and its kernel marked FAIL.
    #[arg(long, default_value_t = 420)]
    pub timeout: u64,
    /// Guests at once (each emulated CPU keeps one host core busy). Default: one per core.
    #[arg(long, default_value_t = cores())]
    pub jobs: usize,
    /// The agent's log filter in the guests (ZEROTRACE_LOG, e.g. debug).
    #[arg(long, default_value = "info")]
    pub agent_log: String,
    /// Record every kernel record of the guests' agent runs (`zerotrace --record`), kept as
    /// target/vmtest/SERIES/RUN.rec (for `zerotrace replay` and bug reports).
    #[arg(long)]
    pub record: bool,
    /// Look for newer kernel packages than the cached ones.
    #[arg(long)]
    pub refresh_kernels: bool,
}

impl VmtestArgs {
    /// The defaults with these kernels (for `cargo xtask test`).
    pub fn kernels(kernel: Vec<String>) -> VmtestArgs {
        VmtestArgs {
            kernel,
            all: false,
            socket_hooks: "auto".into(),
            timeout: 420,
            jobs: cores(),
            agent_log: "info".into(),
            record: false,
            refresh_kernels: false,
        }
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

pub fn run(args: VmtestArgs) -> Result<()> {
    setup::kernel_toolchain()?;
    let agent = build_release()?;
    let rust_svc = build_rust_services()?;
    run_with(&args, &agent, &rust_svc)
}

/// The VM tests with an agent and Rust test service already built.
pub fn run_with(args: &VmtestArgs, agent: &Path, rust_svc: &Path) -> Result<()> {
    let started = Instant::now();
    let series: Vec<String> = if args.all {
        MATRIX.iter().map(|s| s.to_string()).collect()
    } else if args.kernel.is_empty() {
        DEFAULT_KERNELS.iter().map(|s| s.to_string()).collect()
    } else {
        args.kernel.clone()
    };
    for s in &series {
        let ok = s == "newest" || (s.split('.').count() == 2 && s.split('.').all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())));
        if !ok {
            bail!("--kernel {s}: a kernel series is MAJOR.MINOR (e.g. 6.1) or `newest`");
        }
    }
    prerequisites()?;
    let go_newest = setup::go(GO_NEWEST)?;
    setup::go(GO_OLDEST)?;
    step(format!("building the Go test service with CGO_ENABLED=0 (Go {GO_OLDEST} and {GO_NEWEST}; cached in target/e2e)"));
    let causal_old = tools::causal_static(GO_OLDEST)?;
    let causal_new = tools::causal_static(GO_NEWEST)?;
    let busybox = kernels::busybox(args.refresh_kernels)?;
    let kernels: Vec<(String, Result<kernels::Kernel, String>)> =
        series.iter().map(|s| (s.clone(), kernels::kernel(s, args.refresh_kernels).map_err(|e| format!("{e:#}")))).collect();

    let out = root().join("target/vmtest");
    let stage = out.join("stage");
    std::fs::create_dir_all(&stage)?;
    step("writing the guests' initramfs (busybox, agent, test services, tests/vm/init.sh)");
    let mut img = initramfs::Image::new();
    img.file("/bin/busybox", &busybox, 0o755);
    img.file("/init", &root().join("tests/vm/init.sh"), 0o755);
    // Debug sections are dropped (the archive is copied into guest memory); symbol tables
    // are kept: the agent and the profile's symbolization need them.
    img.executable("/zt/zerotrace", &strip_debug(agent, &stage.join("zerotrace"))?)?;
    img.executable("/zt/rust-svc", &strip_debug(rust_svc, &stage.join("rust-svc"))?)?;
    // The Go services keep their DWARF: the agent reads Go struct offsets from it.
    img.executable(&format!("/zt/causal-go{GO_OLDEST}"), &causal_old)?;
    img.executable(&format!("/zt/causal-go{GO_NEWEST}"), &causal_new)?;
    let env = format!(
        "HOOKS='{}'\nRECORD={}\nexport ZEROTRACE_LOG='{}'\nGO_OLD={GO_OLDEST}\nGO_NEW={GO_NEWEST}\nTRACE_SPANS={TRACE_SPANS}\nINJECT_SPANS={INJECT_SPANS}\n",
        args.socket_hooks.replace('\'', ""),
        if args.record { "1" } else { "" },
        args.agent_log.replace('\'', "")
    );
    img.bytes("/vmtest/env", env, 0o644);
    let initrd = out.join("initramfs.cpio");
    let size = img.write(&initrd)?;
    eprintln!("    {} ({:.0} MiB)", initrd.display(), size as f64 / (1 << 20) as f64);

    let ctx = Ctx { initrd, go: go_newest, timeout: Duration::from_secs(args.timeout) };
    let queue: Vec<(String, Result<kernels::Kernel, String>)> = kernels;
    let reports: Mutex<Vec<Option<Report>>> = Mutex::new((0..queue.len()).map(|_| None).collect());
    let next = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..args.jobs.max(1).min(queue.len().max(1)) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some((series, kernel)) = queue.get(i) else { break };
                    let report = match kernel {
                        Ok(k) => run_kernel(k, &ctx, &out),
                        Err(e) => Report::broken(series, "", &format!("kernel not available: {}", checks::cut(e, 300))),
                    };
                    eprintln!("    {}", report.one_line());
                    reports.lock().expect("not poisoned")[i] = Some(report);
                }
            });
        }
    });
    let reports: Vec<Report> = reports.into_inner().expect("not poisoned").into_iter().flatten().collect();
    let text = render(&reports, args, started.elapsed());
    std::fs::write(out.join("results.txt"), &text)?;
    eprintln!("\n{text}");
    eprintln!("(also in {})", out.join("results.txt").display());
    let failed: Vec<String> = reports.iter().filter(|r| r.failed_count() > 0).map(|r| format!("{} ({} FAIL)", r.name(), r.failed_count())).collect();
    if !failed.is_empty() {
        bail!("VM tests failed on {}: see target/vmtest/results.txt", failed.join(", "));
    }
    Ok(())
}

/// qemu (installed with apt-get, without recommends: no GUI), and the Debian tools the
/// harness calls.
fn prerequisites() -> Result<()> {
    for (command, package) in [("qemu-system-x86_64", "qemu-system-x86"), ("dpkg-deb", "dpkg"), ("strip", "binutils"), ("ldd", "libc-bin")] {
        let have =
            Command::new("sh").args(["-c", &format!("command -v {command}")]).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
        if have {
            continue;
        }
        step(format!("installing {package} (apt-get, for the VM tests)"));
        let _ = Command::new("apt-get").args(["update", "-q"]).status();
        crate::util::run(Command::new("apt-get").args(["install", "-y", "-q", "--no-install-recommends", package]).env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    Ok(())
}

/// `strip --strip-debug` into `to` (symbol tables stay), unless `to` is newer than `from`.
fn strip_debug(from: &Path, to: &Path) -> Result<PathBuf> {
    let newer = |a: &Path, b: &Path| -> bool {
        let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        matches!((m(a), m(b)), (Some(x), Some(y)) if x > y)
    };
    if !newer(to, from) {
        crate::util::run(Command::new("strip").arg("--strip-debug").arg("-o").arg(to).arg(from))?;
    }
    Ok(to.to_owned())
}

struct Ctx {
    initrd: PathBuf,
    /// `go` of the newest toolchain (go tool pprof).
    go: PathBuf,
    timeout: Duration,
}

/// How a guest ended.
enum End {
    /// It reached the end of /init (powered off).
    Done,
    /// qemu exited before the guest's last line: a panic (panic=-1 reboots, -no-reboot
    /// exits) or qemu's own failure.
    Exited(String),
    TimedOut(Duration),
}

struct CheckRow {
    name: String,
    pass: bool,
    detail: String,
}

struct Report {
    series: String,
    release: String,
    hooks: String,
    cycle: Option<Duration>,
    ready: Option<f64>,
    rows: Vec<CheckRow>,
}

impl Report {
    fn broken(series: &str, release: &str, why: &str) -> Report {
        Report {
            series: series.into(),
            release: release.into(),
            hooks: "-".into(),
            cycle: None,
            ready: None,
            rows: vec![CheckRow { name: "boot".into(), pass: false, detail: why.into() }],
        }
    }

    fn name(&self) -> String {
        if self.release.is_empty() { self.series.clone() } else { format!("Linux {}", self.release) }
    }

    fn failed_count(&self) -> usize {
        self.rows.iter().filter(|r| !r.pass).count()
    }

    fn one_line(&self) -> String {
        let pass = self.rows.len() - self.failed_count();
        format!(
            "{}: {pass} PASS, {} FAIL{}",
            self.name(),
            self.failed_count(),
            self.cycle.map(|c| format!(" ({:.0} s under TCG)", c.as_secs_f64())).unwrap_or_default()
        )
    }
}

/// Boots one kernel and checks what its guest reported.
fn run_kernel(k: &kernels::Kernel, ctx: &Ctx, out: &Path) -> Report {
    let dir = out.join(&k.series);
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        return Report::broken(&k.series, &k.release, &format!("cannot create {}: {e}", dir.display()));
    }
    step(format!("booting Linux {} under qemu (TCG, 1 vCPU, 2 GiB, no network; at most {} s)", k.release, ctx.timeout.as_secs()));
    let (cycle, end) = match boot(k, ctx, &dir) {
        Ok(x) => x,
        Err(e) => return Report::broken(&k.series, &k.release, &format!("{e:#}")),
    };
    let data = checks::GuestData::parse(&std::fs::read(dir.join("data.log")).unwrap_or_default());
    let console = std::fs::read_to_string(dir.join("console.log")).unwrap_or_default();
    for (name, s) in &data.sections {
        let file = dir.join(name.replace(':', "-").replace('/', "_"));
        if name.ends_with(".rec") {
            use base64::Engine as _;
            let b64: String = s.text.split_whitespace().collect();
            let _ = std::fs::write(file, base64::engine::general_purpose::STANDARD.decode(b64).unwrap_or_default());
        } else if name != "profile.pb.gz" {
            let _ = std::fs::write(file, &s.text);
        }
    }
    let mut r = evaluate(k, ctx, &data, &console, &end, &dir);
    r.cycle = Some(cycle);
    r
}

fn boot(k: &kernels::Kernel, ctx: &Ctx, dir: &Path) -> Result<(Duration, End)> {
    let log = std::fs::File::create(dir.join("qemu.log"))?;
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-nodefaults", "-no-user-config", "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", "2048"])
        .args(["-nic", "none", "-display", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(&k.vmlinuz)
        .arg("-initrd")
        .arg(&ctx.initrd)
        .args(["-append", "console=ttyS0 panic=-1 random.trust_cpu=on"])
        .arg("-serial")
        .arg(format!("file:{}", dir.join("console.log").display()))
        .arg("-serial")
        .arg(format!("file:{}", dir.join("data.log").display()))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let t0 = Instant::now();
    let mut child = cmd.spawn().context("starting qemu-system-x86_64")?;
    loop {
        if let Some(st) = child.try_wait()? {
            let done = std::fs::read_to_string(dir.join("data.log")).unwrap_or_default().contains("@@ZT DONE");
            let end = if done { End::Done } else { End::Exited(format!("qemu exited ({st}) before the guest finished")) };
            return Ok((t0.elapsed(), end));
        }
        if t0.elapsed() > ctx.timeout {
            // Our own child: killed by its handle.
            let _ = child.kill();
            let _ = child.wait();
            return Ok((t0.elapsed(), End::TimedOut(ctx.timeout)));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Why data is missing: how the guest ended, with the console's panic line if any.
fn end_reason(end: &End, console: &str, d: &checks::GuestData) -> String {
    let step = d.events.last().map(|e| format!("; the guest's last step: {}", e.join(" "))).unwrap_or_default();
    let panic = console.lines().find(|l| l.contains("Kernel panic") || l.contains("BUG:") || l.contains("Oops:")).map(|l| checks::cut(l.trim(), 200));
    let last = console.lines().rev().map(str::trim).find(|l| !l.is_empty()).map(|l| checks::cut(l, 160)).unwrap_or_default();
    match (end, panic) {
        (_, Some(p)) => format!("guest kernel: {p}"),
        (End::TimedOut(t), None) => format!("guest hung: killed after {} s (console's last line: {last}{step})", t.as_secs()),
        (End::Exited(why), None) => format!("{why} (console's last line: {last}{step})"),
        (End::Done, None) => "the guest sent nothing for this".into(),
    }
}

fn evaluate(k: &kernels::Kernel, ctx: &Ctx, d: &checks::GuestData, console: &str, end: &End, dir: &Path) -> Report {
    let missing = || end_reason(end, console, d);
    let mut rows: Vec<CheckRow> = Vec::new();
    let mut row = |name: &str, r: Result<String>| {
        let (pass, detail) = match r {
            Ok(s) => (true, s),
            Err(e) => (false, checks::cut(&format!("{e:#}").replace('\n', " "), 400)),
        };
        rows.push(CheckRow { name: name.into(), pass, detail });
    };
    // Boot and kernel.
    row(
        "boot",
        match d.event("BOOT", "") {
            Some(e) if e.first().is_some_and(|r| *r == k.release) => {
                Ok(format!("/init ran {} s after the kernel started (guest clock)", e.get(1).map_or("?", String::as_str)))
            }
            Some(e) => Err(anyhow::anyhow!("booted {:?}, not {}", e.first(), k.release)),
            None => Err(anyhow::anyhow!("{}", missing())),
        },
    );
    row(
        "kernel BTF",
        if d.event("HAVE", "/sys/kernel/btf/vmlinux").is_some() {
            Ok("/sys/kernel/btf/vmlinux present".into())
        } else if d.event("LACK", "/sys/kernel/btf/vmlinux").is_some() {
            Err(anyhow::anyhow!("/sys/kernel/btf/vmlinux missing"))
        } else {
            Err(anyhow::anyhow!("{}", missing()))
        },
    );
    // `doctor --programs`: the baseline, and every kernel program through this kernel's
    // verifier (those this kernel cannot have are named, not loaded).
    row(
        "doctor, every program verified",
        match d.section("doctor") {
            Some(s) if s.rc == Some(0) => {
                let pick = |p: &str| s.text.lines().find(|l| l.starts_with(p)).unwrap_or("").trim().to_owned();
                Ok(format!("{}; {}", pick("baseline"), pick("programs:")))
            }
            Some(s) => {
                let line = s
                    .text
                    .lines()
                    .find(|l| l.contains(" REFUSED "))
                    .or_else(|| s.text.lines().find(|l| l.contains("missing") && l.contains("cannot run")))
                    .or_else(|| s.text.lines().find(|l| l.starts_with("baseline missing")))
                    .unwrap_or_else(|| s.text.lines().last().unwrap_or("(no output)"));
                Err(anyhow::anyhow!("exit {:?}: {}", s.rc, line.split_whitespace().collect::<Vec<_>>().join(" ")))
            }
            None => Err(anyhow::anyhow!("{}", missing())),
        },
    );
    // Run 1: the agent starts (every kernel program passes the verifier) and is ready in time.
    let trace_err = d.section("trace.err").map_or("", |s| s.text.as_str());
    let started = d.ready("trace");
    let agent_failed = || anyhow::anyhow!("agent did not start: {}", checks::first_error(trace_err));
    let hooks = hook_set(trace_err);
    row(
        "kernel programs load",
        match started {
            Some((_, true)) => Ok(format!("`zerotrace tail` traces 9 processes (socket hooks {})", hooks.as_deref().unwrap_or("?"))),
            Some((_, false)) => Err(agent_failed()),
            None => Err(anyhow::anyhow!("{}", missing())),
        },
    );
    let ready = started.filter(|r| r.1).map(|r| r.0);
    row(
        "agent ready (start time measured)",
        match (started, ready) {
            (_, Some(t)) if t <= READY_WITHIN_S => {
                Ok(format!("{t:.1} s from start to tracing all 9 processes under TCG{}{}", also_ready(d), checks::start_stages(trace_err)))
            }
            (_, Some(t)) => Err(anyhow::anyhow!("{t:.1} s from start to tracing all 9 processes: over the {READY_WITHIN_S:.0} s hang guard{}", also_ready(d))),
            (Some(_), None) => Err(agent_failed()),
            (None, None) => Err(anyhow::anyhow!("{}", missing())),
        },
    );
    let spans_of = |run: &str| -> Result<Vec<zerotrace_e2e::otlp::RSpan>> {
        match (d.ready(run), d.section(&format!("{run}.out"))) {
            (Some((_, true)), Some(out)) if out.rc.is_some() => checks::spans(&out.text),
            (Some((_, true)), _) => bail!("no spans came back: {}", missing()),
            (Some((_, false)), _) => bail!("agent did not start: {}", checks::first_error(d.section(&format!("{run}.err")).map_or("", |s| s.text.as_str()))),
            (None, _) => bail!("{}", missing()),
        }
    };
    let trace = spans_of("trace");
    if let Some(out) = d.section("trace.out") {
        let _ = std::fs::write(dir.join("trace.jsonl"), &out.text);
    }
    let with = |f: &dyn Fn(&[zerotrace_e2e::otlp::RSpan]) -> Result<String>| match &trace {
        Ok(spans) => f(spans),
        Err(e) => Err(anyhow::anyhow!("{e:#}")),
    };
    // A span lost to a program run the kernel skipped (Linux 7.0+: docs/limits.md) says so.
    let stats = d.section("trace.stats").map_or("", |s| s.text.as_str());
    let skipped = stat(stats, "kernel_runs_skipped");
    let note = |r: Result<String>| -> Result<String> {
        r.map_err(|e| if skipped > 0 { anyhow::anyhow!("{e:#} [the kernel skipped {skipped} program runs: kernel_runs_skipped]") } else { e })
    };
    // What the hook set cost in this run, counted by the kernel (kernel.bpf_stats_enabled):
    // program runs, comparable between hook sets on one kernel (times under TCG are not).
    if let Ok(spans) = &trace {
        let (runs, rescued) = (stat(stats, "socket_program_runs"), stat(stats, "kernel_runs_rescued"));
        row(
            "socket program runs (counted)",
            if runs == 0 {
                Err(anyhow::anyhow!("the kernel counted no socket program run (kernel.bpf_stats_enabled not on?)"))
            } else {
                Ok(format!(
                    "{runs} runs for {} spans ({:.1} per span, {} hook set){}",
                    spans.len(),
                    runs as f64 / spans.len().max(1) as f64,
                    hooks.as_deref().unwrap_or("?"),
                    if rescued > 0 { format!("; {rescued} skipped runs handled by twins (kernel_runs_rescued)") } else { String::new() }
                ))
            },
        );
    }
    row(&format!("Go {GO_OLDEST} span tree"), note(with(&|s| checks::go_trees(d, s, "old", 18001))));
    row(&format!("Go {GO_NEWEST} span tree"), note(with(&|s| checks::go_trees(d, s, "new", 18011))));
    row("Rust HTTP/1 links", note(with(&checks::rust_http)));
    row("Rust gRPC links", note(with(&checks::rust_grpc)));
    // Run 2: traceparent injection; on a kernel without bpf_loop, a refusal in one line.
    let inject = spans_of("inject");
    if kernel_series(&k.release).is_some_and(|v| v < BPF_LOOP_SINCE) {
        let err = d.section("inject.err").map_or("", |s| s.text.as_str());
        row(
            "traceparent refused in one line (no bpf_loop)",
            match d.ready("inject") {
                Some((_, false)) => checks::one_line_refusal(err, "needs bpf_loop"),
                Some((_, true)) => Err(anyhow::anyhow!("the agent started with --inject-traceparent on a kernel without bpf_loop")),
                None => Err(anyhow::anyhow!("{}", missing())),
            },
        );
    } else {
        for (v, go) in [("old", GO_OLDEST), ("new", GO_NEWEST)] {
            row(
                &format!("traceparent on the wire, Go {go}"),
                match &inject {
                    Ok(spans) => checks::injection(d, spans, v),
                    Err(e) => Err(anyhow::anyhow!("{e:#}")),
                },
            );
        }
    }
    // Run 3: CPU profile.
    row(
        "CPU profile (Rust, no frame pointers)",
        if d.section("profile.err").is_some() && d.section("profile.pb.gz").is_some_and(|s| s.rc.is_some()) {
            checks::profile(d, &ctx.go, dir)
        } else {
            Err(anyhow::anyhow!("{}", missing()))
        },
    );
    if !matches!(end, End::Done) {
        row("guest finished", Err(anyhow::anyhow!("{}", missing())));
    }
    // The hook set the agent logged; when it never got that far, what doctor says.
    let doctor_hooks = d.section("doctor").and_then(|s| {
        let line = s.text.lines().find(|l| l.starts_with("socket hooks"))?;
        let mut words = line.trim_start_matches("socket hooks").split_whitespace();
        let set = match (words.next()?, words.next()) {
            ("ok", Some(set)) => set,
            _ => "none",
        };
        Some(format!("{set} (doctor)"))
    });
    let hooks = hooks.or(doctor_hooks).unwrap_or_else(|| "-".into());
    Report { series: k.series.clone(), release: k.release.clone(), hooks, cycle: None, ready, rows }
}

/// The injection run's start, for the record (it loads one more program).
/// The hook set the agent logged at start (`socket_hooks="syscalls"`).
fn hook_set(agent_log: &str) -> Option<String> {
    agent_log.split_whitespace().find_map(|w| w.strip_prefix("socket_hooks=")).map(|h| h.trim_matches('"').to_owned())
}

/// `zerotrace_<name>` in the last line of a `--stats-file` (0 when absent).
fn stat(stats: &str, name: &str) -> u64 {
    let key = format!("\"zerotrace_{name}\":");
    let last = stats.lines().rev().find(|l| l.contains(&key)).unwrap_or("");
    last.find(&key).and_then(|i| last[i + key.len()..].split([',', '}']).next()?.trim().parse().ok()).unwrap_or(0)
}

/// (major, minor) of a kernel release string such as `5.10.0-32-cloud-amd64`.
fn kernel_series(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(['.', '-', '+']);
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn also_ready(d: &checks::GuestData) -> String {
    match d.ready("inject") {
        Some((t, true)) => format!(" (the injection run's 6: {t:.1} s)"),
        _ => String::new(),
    }
}

fn render(reports: &[Report], args: &VmtestArgs, took: Duration) -> String {
    let mut t = String::new();
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(root())
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let _ = writeln!(t, "zerotrace vmtest at {commit}: --socket-hooks {}, {} kernel(s), {:.0} s in all", args.socket_hooks, reports.len(), took.as_secs_f64());
    let _ = writeln!(t, "cycle = boot + tests + power-off under software emulation (qemu TCG, 1 vCPU): a cost of this test run, not a measure of zerotrace.");
    let _ = writeln!(t, "ready = from the agent's start to its `tracing` line for every process of the first run (guest clock).\n");
    let _ = writeln!(t, "{:<34} {:<14} {:>7} {:>7}  result", "kernel", "socket hooks", "cycle", "ready");
    for r in reports {
        let _ = writeln!(
            t,
            "{:<34} {:<14} {:>7} {:>7}  {} PASS, {} FAIL",
            checks::cut(&r.name(), 34),
            r.hooks,
            r.cycle.map(|c| format!("{:.0} s", c.as_secs_f64())).unwrap_or_else(|| "-".into()),
            r.ready.map(|c| format!("{c:.1} s")).unwrap_or_else(|| "-".into()),
            r.rows.len() - r.failed_count(),
            r.failed_count()
        );
    }
    for r in reports {
        let _ = writeln!(
            t,
            "\n{} (series {})  socket hooks: {}  cycle: {}  agent ready: {}",
            r.name(),
            r.series,
            r.hooks,
            r.cycle.map(|c| format!("{:.1} s", c.as_secs_f64())).unwrap_or_else(|| "-".into()),
            r.ready.map(|c| format!("{c:.1} s")).unwrap_or_else(|| "-".into())
        );
        for row in &r.rows {
            let _ = writeln!(t, "  {}  {:<38} {}", if row.pass { "PASS" } else { "FAIL" }, row.name, row.detail);
        }
        let _ = writeln!(t, "  logs: target/vmtest/{}/ (console.log, data.log, doctor, trace.err, ...)", r.series);
    }
    t
}
