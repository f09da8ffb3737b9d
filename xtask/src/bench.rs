//! Benchmarks: placeholder replaced below.
use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum Bench {
    Overhead,
}

pub fn run(_b: Bench) -> Result<()> {
    Ok(())
}
