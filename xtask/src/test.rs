//! `cargo xtask test`: set up, build, then every test tier, each timed: style (rustfmt and
//! clippy over every crate), unit tests (decoders, parsers, correlator on recorded streams,
//! the layering rule), the end-to-end suites that load the real kernel programs and trace
//! real Go and Rust processes (run one at a time: they share the kernel), and a bounded
//! fuzzing run of every parser of captured bytes, and last the VM tests on the oldest and
//! newest Debian kernels (`vmtest`). The tiers' times are printed at the end, also when one
//! failed.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use clap::Args;

use crate::{
    setup,
    util::{self, build_release, build_rust_services, cargo, root, step},
};

#[derive(Args)]
pub struct TestArgs {
    /// Only run tests whose name contains this (passed to the test harness).
    pub filter: Option<String>,
    /// Skip the style checks and the unit tests.
    #[arg(long)]
    pub e2e_only: bool,
    /// Seconds each fuzz target runs after the tests (0: no fuzzing); long campaigns are
    /// `cargo xtask fuzz`.
    #[arg(long, default_value_t = 10)]
    pub fuzz_seconds: u64,
    /// Kernel series the VM tier boots (`cargo xtask vmtest --kernel`), comma-separated;
    /// `none` leaves the tier out (said so in the output).
    #[arg(long, value_delimiter = ',', default_values_t = crate::vmtest::DEFAULT_KERNELS.iter().map(|s| s.to_string()))]
    pub vm_kernels: Vec<String>,
    /// Skip the second end-to-end pass, which forces the syscall hook set (the socket
    /// layer of kernels without socket-layer tracepoints or BPF trampolines) on every agent
    /// the tests start.
    #[arg(long)]
    pub no_syscalls_pass: bool,
}

/// The tiers run so far, with their times.
#[derive(Default)]
struct Tiers(Vec<(&'static str, Duration, bool)>);

impl Tiers {
    /// Runs one tier, timing it; a failure ends the run (after the table).
    fn run(&mut self, name: &'static str, f: impl FnOnce() -> Result<()>) -> Result<()> {
        let t = Instant::now();
        let r = f();
        self.0.push((name, t.elapsed(), r.is_ok()));
        r
    }

    fn print(&self) {
        let total: Duration = self.0.iter().map(|t| t.1).sum();
        eprintln!("\n\x1b[1mtest tiers\x1b[0m");
        for (name, took, ok) in &self.0 {
            eprintln!("  {:<44} {:>7.1} s  {}", name, took.as_secs_f64(), if *ok { "ok" } else { "FAILED" });
        }
        eprintln!("  {:<44} {:>7.1} s", "total", total.as_secs_f64());
    }
}

pub fn run(args: TestArgs) -> Result<()> {
    let mut tiers = Tiers::default();
    let r = run_tiers(&args, &mut tiers);
    tiers.print();
    r
}

fn run_tiers(args: &TestArgs, tiers: &mut Tiers) -> Result<()> {
    tiers.run("setup (toolchains, test dependencies)", setup::all)?;
    if !args.e2e_only {
        tiers.run("style (rustfmt, clippy on every crate)", style)?;
    }
    let mut bin = None;
    let mut rust_svc = None;
    tiers.run("build (agent, Rust test services; release)", || {
        bin = Some(build_release()?);
        rust_svc = Some(build_rust_services()?);
        Ok(())
    })?;
    let (bin, rust_svc) = (bin.expect("built"), rust_svc.expect("built"));
    let gos = go_toolchains()?;
    let py = setup::python()?;
    let mut manifests = None;
    tiers.run("Kubernetes manifests (kustomize render, schema validation)", || {
        manifests = Some(crate::manifests::check()?);
        Ok(())
    })?;
    let mut image = None;
    tiers.run("image (OCI archive FROM scratch)", || {
        let i = crate::image::build(&bin)?;
        step(format!("image {} ({:.1} MiB)", i.archive.display(), i.archive_bytes as f64 / 1048576.0));
        image = Some(i);
        Ok(())
    })?;
    let (manifests, image) = (manifests.expect("checked"), image.expect("built"));
    let env = |cmd: &mut Command| {
        e2e_env(cmd, &bin, &rust_svc, &gos);
        cmd.env("ZEROTRACE_PYTHON", &py).env("ZEROTRACE_MANIFESTS", &manifests).env("ZEROTRACE_IMAGE", &image.archive);
    };
    if !args.e2e_only {
        tiers.run("unit tests", || {
            step("unit tests (no privileges needed)");
            let mut cmd = cargo();
            cmd.current_dir(root()).args([
                "test",
                "--release",
                "--workspace",
                "--exclude",
                "zerotrace-e2e",
                "--exclude",
                "zerotrace-ebpf",
                "--exclude",
                "rust-svc",
                // The benchmark's SDK peer has no tests (clippy still checks it).
                "--exclude",
                "rust-svc-otel",
            ]);
            if let Some(f) = &args.filter {
                cmd.args(["--", f]);
            }
            util::run(&mut cmd)
        })?;
    }
    tiers.run("end-to-end (real kernel programs and processes)", || {
        step("end-to-end tests: real kernel programs, real Go and Rust processes, spans read back over OTLP");
        let mut cmd = cargo();
        cmd.current_dir(root()).args(["test", "--release", "-p", "zerotrace-e2e", "--", "--test-threads=1"]);
        if let Some(f) = &args.filter {
            cmd.arg(f);
        }
        env(&mut cmd);
        cmd.env_remove("ZEROTRACE_SOCKET_HOOKS");
        util::run(&mut cmd)
    })?;
    // The suites that go through the socket hooks again, with the syscall hook set forced
    // (what kernels before 6.16 run): every agent the tests start inherits it
    // (`--socket-hooks` reads ZEROTRACE_SOCKET_HOOKS).
    if !args.no_syscalls_pass {
        tiers.run("end-to-end, socket hooks forced to `syscalls`", || {
            step("end-to-end tests again, with the syscall socket hook set forced");
            let mut cmd = cargo();
            cmd.current_dir(root()).args(["test", "--release", "-p", "zerotrace-e2e"]);
            for suite in SOCKET_SUITES {
                cmd.args(["--test", suite]);
            }
            cmd.args(["--", "--test-threads=1"]);
            for t in SOCKET_SUITES_SKIP {
                cmd.args(["--skip", t]);
            }
            if let Some(f) = &args.filter {
                cmd.arg(f);
            }
            env(&mut cmd);
            cmd.env("ZEROTRACE_SOCKET_HOOKS", "syscalls");
            util::run(&mut cmd)
        })?;
    }
    if args.fuzz_seconds > 0 && args.filter.is_none() {
        tiers.run("fuzzing (every parser of captured bytes)", || {
            step("fuzzing every parser of captured bytes (bounded time per target)");
            crate::fuzz::run_fuzz(crate::fuzz::FuzzArgs { seconds: args.fuzz_seconds, minutes: None, targets: Vec::new(), dev: true, seed_from: None })
        })?;
    }
    // Last: the slowest tier, and a failure in a VM keeps no other tier from running.
    if args.filter.is_none() {
        if args.vm_kernels.iter().any(|k| k == "none") {
            step("VM tests left out (--vm-kernels none)");
        } else {
            tiers.run("VMs (e2e subset on Linux 5.10, 6.19 and the newest)", || {
                step(format!("VM tests: Linux {} under qemu (TCG), end-to-end subset in each", args.vm_kernels.join(", ")));
                crate::vmtest::run_with(&crate::vmtest::VmtestArgs::kernels(args.vm_kernels.clone()), &bin, &rust_svc)
            })?;
        }
    }
    Ok(())
}

/// Every Go toolchain of the matrix, as (ZEROTRACE_GO_<version> variable, go binary).
pub fn go_toolchains() -> Result<Vec<(String, PathBuf)>> {
    setup::GO_MATRIX.iter().map(|v| Ok((format!("ZEROTRACE_GO_{}", v.replace('.', "_")), setup::go(v)?))).collect()
}

/// What every e2e test run needs in its environment: the agent, the Rust test service, the
/// Go toolchains, and this binary (the e2e tests that run the demo run it: cargo holds the
/// build directory meanwhile, so it cannot be `cargo xtask`).
pub fn e2e_env(cmd: &mut Command, bin: &Path, rust_svc: &Path, gos: &[(String, PathBuf)]) {
    cmd.env("ZEROTRACE_BIN", bin).env("ZEROTRACE_RUST_SVC", rust_svc);
    if let Ok(me) = std::env::current_exe() {
        cmd.env("ZEROTRACE_XTASK", me);
    }
    for (var, go) in gos {
        cmd.env(var, go);
    }
}

/// The e2e suites whose spans go through the socket hooks (server and client I/O, links
/// across processes, connection state), run again with each forced hook set. Left out
/// because the hook set does not enter them: CPU profiles, Go binary layouts (uprobe
/// offsets), settings, the control socket, OTLP over TLS, export faults, the decoder
/// cross-check, redaction, and what the demo and the harness leave behind.
const SOCKET_SUITES: &[&str] = &[
    "native",
    "churn",
    "go_http_server",
    "go_causality",
    "go_sql",
    "go_grpc",
    "containers",
    "discovery",
    "tail",
    "hostile",
    "sampling",
    "metrics",
    "bad_input",
    "agent_faults",
    "target_faults",
];

/// Tests of those suites that vary what the hook set does not see: the Go version matrix
/// and binary layouts (uprobe offsets per release and build; the newest Go runs), what
/// only Go uprobes do (the traceparent writer, SQL with an in-process driver, the causality
/// switch), process churn
/// (discovery, attach and detach), the image and its capabilities, the agent's refusals
/// before it loads anything, and the tests that choose their own hook set (twins, a forced
/// set).
const SOCKET_SUITES_SKIP: &[&str] = &[
    "every_go_version",
    "oldest_go",
    "stripped",
    "injected_traceparent",
    "sql_inside",
    "causality_switches_off",
    "process_churn",
    "image_loads",
    "least_privilege",
    "a_pid_that_does_not_exist",
    "without_privileges",
    "invalid_settings",
    "twin_programs",
    "a_forced_hook_set",
];

/// rustfmt (rustfmt.toml) and clippy with warnings as errors over every crate: the
/// workspace, the fuzz targets, and the kernel programs for their own target.
fn style() -> Result<()> {
    step("style: rustfmt --check on every crate");
    let fmt_ok = cargo().current_dir(root()).args(["fmt", "--all", "--", "--check"]).status()?.success()
        && cargo().current_dir(root()).args(["fmt", "--manifest-path", "fuzz/Cargo.toml", "--", "--check"]).status()?.success();
    if !fmt_ok {
        bail!("code is not formatted: run `cargo fmt --all && cargo fmt --manifest-path fuzz/Cargo.toml`");
    }
    step("style: clippy -D warnings (agent, xtask, tests, fuzz targets)");
    // AYA_BUILD_SKIP: clippy checks the agent's own code; the kernel object it embeds is
    // checked below for its own target.
    util::run(cargo().current_dir(root()).env("AYA_BUILD_SKIP", "1").args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--exclude",
        "zerotrace-ebpf",
        "--",
        "-D",
        "warnings",
    ]))?;
    util::run(cargo().current_dir(root()).env("AYA_BUILD_SKIP", "1").args([
        "clippy",
        "--manifest-path",
        "fuzz/Cargo.toml",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    step("style: clippy -D warnings (kernel programs, bpfel-unknown-none)");
    util::run(Command::new("cargo").current_dir(root().join("ebpf/zerotrace-ebpf")).arg(format!("+{}", setup::NIGHTLY)).args([
        "clippy",
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--",
        "-D",
        "warnings",
    ]))
}
