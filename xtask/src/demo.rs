//! `cargo xtask demo`: placeholder replaced below.
use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub struct DemoArgs {}

pub fn run(_a: DemoArgs) -> Result<()> {
    Ok(())
}
