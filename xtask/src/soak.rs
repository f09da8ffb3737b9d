//! `cargo xtask soak`: the long versions of the trust suites, with a time budget. The soak
//! (a Go and a Rust service at 2,500 req/s each, traced and exported over OTLP; agent RSS
//! and CPU sampled every 10 s, the curve in target/soak/), connection churn (600,000 short
//! connections) and process churn (2,000 short-lived Go and Rust processes over 5 min, under
//! `--exe` and under `--all`); then the other promises at their one length, each printing
//! its figures: self-protection (CPU budget, memory limit), collector, agent and target
//! faults, hostile traffic, nothing left behind. `cargo xtask test` runs every suite, the
//! first three in short versions.
use anyhow::Result;
use clap::Args;

use crate::{
    setup, test,
    util::{self, build_release, build_rust_services, cargo, root, step},
};

#[derive(Args)]
pub struct SoakArgs {
    /// Minutes of steady load (the first third, at least 90 s, is warm-up; at least 150 s).
    #[arg(long, default_value_t = 10)]
    pub minutes: u64,
    /// Short connections of the connection churn.
    #[arg(long, default_value_t = 600_000)]
    pub connections: u64,
    /// Short-lived processes of each process churn (under `--exe`, then under `--all`).
    #[arg(long, default_value_t = 2_000)]
    pub processes: u64,
    /// Minutes each process churn is spread over.
    #[arg(long, default_value_t = 5)]
    pub churn_minutes: u64,
}

pub fn run(args: SoakArgs) -> Result<()> {
    setup::all()?;
    let bin = build_release()?;
    let rust_svc = build_rust_services()?;
    let gos = test::go_toolchains()?;
    step(format!(
        "soak: {} short connections, {} short-lived processes twice over {} min, then {} min of steady load (the curve goes to target/soak/)",
        args.connections, args.processes, args.churn_minutes, args.minutes
    ));
    let mut cmd = cargo();
    cmd.current_dir(root()).args([
        "test",
        "--release",
        "-p",
        "zerotrace-e2e",
        "--no-fail-fast",
        "--test",
        "soak",
        "--test",
        "churn",
        "--test",
        "self_protection",
        "--test",
        "collector_faults",
        "--test",
        "agent_faults",
        "--test",
        "target_faults",
        "--test",
        "hostile",
        "--test",
        "left_behind",
        "--",
        "--test-threads=1",
        "--nocapture",
    ]);
    test::e2e_env(&mut cmd, &bin, &rust_svc, &gos);
    cmd.env("ZEROTRACE_SOAK_SECONDS", (args.minutes.max(2) * 60).to_string())
        .env("ZEROTRACE_CHURN_CONNECTIONS", args.connections.to_string())
        .env("ZEROTRACE_CHURN_PROCESSES", args.processes.to_string())
        .env("ZEROTRACE_CHURN_PROCESS_SECONDS", (args.churn_minutes * 60).to_string());
    util::run(&mut cmd)
}
