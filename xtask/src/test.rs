//! `cargo xtask test`: set up, build, then every test tier: unit tests (decoders, parsers,
//! correlator on recorded streams), the end-to-end suites that load the real kernel
//! programs and trace real Go and Rust processes (run one at a time: they share the
//! kernel), and a bounded fuzzing run of every parser of captured bytes.
use std::process::Command;

use anyhow::Result;
use clap::Args;

use crate::{setup, util::{self, build_release, build_rust_services, cargo, root, step}};

#[derive(Args)]
pub struct TestArgs {
    /// Only run tests whose name contains this (passed to the test harness).
    pub filter: Option<String>,
    /// Skip the unit tests.
    #[arg(long)]
    pub e2e_only: bool,
    /// Seconds each fuzz target runs after the tests (0: no fuzzing).
    #[arg(long, default_value_t = 20)]
    pub fuzz_seconds: u64,
}

pub fn run_tests(args: TestArgs) -> Result<()> {
    setup::all()?;
    let bin = build_release()?;
    let rsvc = build_rust_services()?;
    let gos: Vec<(String, std::path::PathBuf)> =
        setup::GO_MATRIX.iter().map(|v| Ok((format!("ZEROTRACE_GO_{}", v.replace('.', "_")), setup::go(v)?))).collect::<Result<_>>()?;
    let py = setup::python()?;
    let manifests = crate::manifests::check()?;
    let image = crate::image::build(&bin)?;
    println!("  image {} ({:.1} MiB)", image.archive.display(), image.archive_bytes as f64 / 1048576.0);
    let env = |cmd: &mut Command| {
        cmd.env("ZEROTRACE_BIN", &bin).env("ZEROTRACE_PYTHON", &py).env("ZEROTRACE_RSVC", &rsvc);
        cmd.env("ZEROTRACE_MANIFESTS", &manifests).env("ZEROTRACE_IMAGE", &image.archive);
        for (var, go) in &gos {
            cmd.env(var, go);
        }
    };
    if !args.e2e_only {
        step("unit tests (no privileges needed)");
        let mut cmd = cargo();
        cmd.current_dir(root()).args(["test", "--release", "--workspace", "--exclude", "zerotrace-e2e", "--exclude", "zerotrace-ebpf", "--exclude", "zerotrace-testsvc"]);
        if let Some(f) = &args.filter {
            cmd.args(["--", f]);
        }
        util::run(&mut cmd)?;
    }
    step("end-to-end tests: real kernel programs, real Go processes, spans read back over OTLP");
    let mut cmd = cargo();
    cmd.current_dir(root()).args(["test", "--release", "-p", "zerotrace-e2e", "--", "--test-threads=1"]);
    if let Some(f) = &args.filter {
        cmd.arg(f);
    }
    env(&mut cmd);
    util::run(&mut cmd)?;
    if args.fuzz_seconds > 0 && args.filter.is_none() {
        step("fuzzing every parser of captured bytes (bounded time per target)");
        crate::fuzz::run_fuzz(crate::fuzz::FuzzArgs { seconds: args.fuzz_seconds, targets: Vec::new(), seed_from: None })?;
    }
    Ok(())
}

pub fn run(args: TestArgs) -> Result<()> {
    run_tests(args)
}
