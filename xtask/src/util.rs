//! Helpers shared by the tasks: running commands with visible progress, paths, builds.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask has a parent").to_owned()
}

/// A progress line on stderr. A closed stderr (`2>&1 | tee`, then Ctrl-C) is ignored: output
/// ends, whatever was about to happen (e.g. the demo's shutdown) still happens.
pub fn step(msg: impl AsRef<str>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "\x1b[1m==>\x1b[0m {}", msg.as_ref());
}

/// Runs a command with inherited output; fails with the command line in the message.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

/// Runs a command and returns its stdout (stderr passes through).
pub fn output(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.stderr(std::process::Stdio::inherit()).output().with_context(|| format!("starting {shown}"))?;
    if !out.status.success() {
        bail!("{shown} failed with {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// For existence and version checks: the stdout of a command that succeeded, else None,
/// printing nothing (a missing tool is about to be installed, not an error to show).
pub fn probe(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(std::process::Stdio::null()).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// The Rust services the end-to-end tests trace (tests/rust-svc), release build.
pub fn build_rust_services() -> Result<PathBuf> {
    build_test_package("rust-svc", "the Rust test services")
}

/// The overhead bench's OpenTelemetry SDK peer (tests/rust-svc-otel), release build.
pub fn build_sdk_peer() -> Result<PathBuf> {
    build_test_package("rust-svc-otel", "the OpenTelemetry SDK peer (tests/rust-svc-otel)")
}

/// Release build of a test package whose binary is named after it.
fn build_test_package(package: &str, what: &str) -> Result<PathBuf> {
    step(format!("building {what} (release)"));
    run(cargo().current_dir(root()).args(["build", "--release", "-p", package]))?;
    Ok(root().join("target/release").join(package))
}

/// Release build of the agent: target/release/zerotrace.
pub fn build_release() -> Result<PathBuf> {
    step("building zerotrace (release; the first build takes a few minutes)");
    run(cargo().current_dir(root()).args(["build", "--release", "-p", "zerotrace", "--bin", "zerotrace"]))?;
    let bin = root().join("target/release/zerotrace");
    if !bin.exists() {
        bail!("{} missing after the build", bin.display());
    }
    Ok(bin)
}
