//! `cargo xtask fuzz`: every parser of captured bytes under libFuzzer (cargo-fuzz, the
//! pinned nightly, AddressSanitizer), each for a bounded time, starting from the corpus
//! checked in under fuzz/corpus (new inputs go to target/fuzz-corpus, crashes to
//! fuzz/artifacts and fail the task; `--minutes N` is a campaign whose finds are kept in
//! fuzz/corpus). `--seed-from REC` rebuilds the checked-in corpus from
//! a recording (`zerotrace run --record`).
use std::{path::Path, process::Command};

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::{
    setup,
    util::{root, run, step},
};

pub const TARGETS: &[&str] = &["events", "http1", "http2", "correlate"];

#[derive(Args)]
pub struct FuzzArgs {
    /// Seconds per target.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// A campaign: minutes per target (overrides --seconds); the new inputs it finds go
    /// into the checked-in corpus (fuzz/corpus/<target>), to be committed.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub minutes: Option<u64>,
    /// Targets to run (default: all).
    #[arg(long, value_delimiter = ',')]
    pub targets: Vec<String>,
    /// Unoptimized targets: they build in about half the time and fuzz slower; for short
    /// runs (`cargo xtask test` uses it), not campaigns.
    #[arg(long)]
    pub dev: bool,
    /// Rebuild fuzz/corpus from this recording instead of fuzzing.
    #[arg(long, value_name = "REC")]
    pub seed_from: Option<std::path::PathBuf>,
}

pub fn run_fuzz(a: FuzzArgs) -> Result<()> {
    if let Some(rec) = &a.seed_from {
        return seed(rec);
    }
    setup::cargo_fuzz()?;
    let targets: Vec<&str> = if a.targets.is_empty() { TARGETS.to_vec() } else { a.targets.iter().map(String::as_str).collect() };
    // cargo-fuzz's default build is optimized with debug assertions (`--release` would
    // turn those off).
    let profile: &[&str] = if a.dev { &["--dev"] } else { &[] };
    step(format!(
        "building the fuzz targets ({} with AddressSanitizer, {}; a few minutes the first time)",
        setup::NIGHTLY,
        if a.dev { "unoptimized" } else { "optimized" }
    ));
    run(fuzz_cmd().arg("build").args(profile))?;
    let seconds = a.minutes.map_or(a.seconds, |m| m * 60);
    for t in targets {
        let seeds = root().join("fuzz/corpus").join(t);
        // libFuzzer writes what it finds into the first corpus directory: a campaign's finds
        // are kept in the repository, a short run's under target/.
        let fresh = if a.minutes.is_some() { seeds.clone() } else { root().join("target/fuzz-corpus").join(t) };
        std::fs::create_dir_all(&fresh)?;
        step(format!("fuzzing {t} for {seconds} s (corpus: {}{})", seeds.display(), if a.minutes.is_some() { ", new inputs kept there" } else { "" }));
        let mut cmd = fuzz_cmd();
        cmd.arg("run").args(profile).arg(t).arg(&fresh);
        if fresh != seeds {
            cmd.arg(&seeds);
        }
        let st = cmd
            .args(["--", &format!("-max_total_time={seconds}"), "-rss_limit_mb=2048", "-max_len=65536", "-print_final_stats=1"])
            .status()
            .context("running cargo fuzz")?;
        if !st.success() {
            bail!("fuzz target {t} found a crash or a leak: see fuzz/artifacts/{t} and reproduce with `cargo +{} fuzz run {t} <file>`", setup::NIGHTLY);
        }
    }
    Ok(())
}

fn fuzz_cmd() -> Command {
    let mut c = Command::new("cargo");
    c.current_dir(root()).arg(format!("+{}", setup::NIGHTLY)).arg("fuzz");
    // The fuzz builds never load kernel programs: skip building them.
    c.env("AYA_BUILD_SKIP", "1");
    c
}

/// Writes the seed corpus from a recording: runs of records for `correlate`, single records
/// for `events`, request and response heads for `http1`, HTTP/2 bytes for `http2`.
fn seed(rec: &Path) -> Result<()> {
    let bytes = std::fs::read(rec).with_context(|| format!("reading {}", rec.display()))?;
    let mut records = Vec::new();
    // A recording's header: "ZTRECORD" and its record format (older recordings have none).
    let mut at = if bytes.starts_with(b"ZTRECORD") { 12 } else { 0 };
    while at + 4 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let Some(r) = bytes.get(at + 4..at + 4 + len) else { break };
        records.push(r);
        at += 4 + len;
    }
    let dir = |t: &str| -> Result<std::path::PathBuf> {
        let d = root().join("fuzz/corpus").join(t);
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d)?;
        Ok(d)
    };
    let kind = |r: &[u8]| u16::from_le_bytes([r[0], r[1]]);
    // The capture records' fixed part (HttpRequestEvent, PipelinedRequestEvent and
    // H2BytesEvent have one size); the captured bytes follow (kinds 3, 12, 13, 15, 17, 18).
    const HEAD: usize = 112;
    let payload = |r: &'_ [u8]| -> Option<Vec<u8>> { matches!(kind(r), 3 | 12 | 13 | 15 | 17 | 18).then(|| r.get(HEAD..).unwrap_or(&[]).to_vec()) };
    let (corr, ev, h1, h2) = (dir("correlate")?, dir("events")?, dir("http1")?, dir("http2")?);
    for (i, chunk) in records.chunks(64).step_by((records.len() / 64 / 12).max(1)).take(12).enumerate() {
        let mut out = Vec::new();
        for r in chunk {
            out.extend_from_slice(&(r.len() as u32).to_le_bytes());
            out.extend_from_slice(r);
        }
        std::fs::write(corr.join(format!("run-{i:02}")), out)?;
    }
    let mut seen = std::collections::HashMap::<u16, usize>::new();
    let (mut n1, mut n2) = (0, 0);
    for r in &records {
        let k = kind(r);
        let c = seen.entry(k).or_default();
        if *c < 3 {
            std::fs::write(ev.join(format!("kind{k}-{c}")), r)?;
            *c += 1;
        }
        match (k, payload(r)) {
            (3 | 12 | 13 | 15, Some(p)) if n1 < 16 && !p.is_empty() => {
                std::fs::write(h1.join(format!("head-{n1:02}")), p)?;
                n1 += 1;
            }
            (17 | 18, Some(p)) if n2 < 16 && !p.is_empty() => {
                // The http2 target's format: side, then pieces [len][missing][bytes].
                let mut out = vec![u8::from(k == 17)];
                for piece in p.chunks(255) {
                    out.push(piece.len() as u8);
                    out.push(0);
                    out.extend_from_slice(piece);
                }
                std::fs::write(h2.join(format!("h2-{n2:02}")), out)?;
                n2 += 1;
            }
            _ => {}
        }
    }
    step(format!("seeded fuzz/corpus from {} records", records.len()));
    Ok(())
}
