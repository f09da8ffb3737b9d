//! `cargo xtask codegen go-offsets`: regenerates agent/src/symbols/go_offsets_table.rs, the
//! Go struct member offsets zerotrace uses for binaries without DWARF (stripped). For each Go
//! toolchain of the test matrix it builds tests/e2e/go/goprobe (which links every struct the
//! agent reads) and reads its DWARF with the agent's own reader and member list: that is the
//! agent test `symbols::go::tests::go_offsets_table_matches_dwarf`, run here in update mode
//! (it checks the committed table against DWARF otherwise).
use anyhow::Result;
use clap::Subcommand;

use crate::{
    setup::{self, GO_MATRIX},
    util::{cargo, root, run, step},
};

#[derive(Subcommand)]
pub enum Codegen {
    /// Go struct offsets per Go minor version (agent/src/symbols/go_offsets_table.rs).
    GoOffsets,
}

pub fn run_codegen(which: Codegen) -> Result<()> {
    match which {
        Codegen::GoOffsets => go_offsets(),
    }
}

fn go_offsets() -> Result<()> {
    // The agent's tests build the agent, which embeds the kernel programs.
    setup::kernel_toolchain()?;
    let mut gos = Vec::new();
    for v in GO_MATRIX {
        gos.push((format!("ZEROTRACE_GO_{}", v.replace('.', "_")), setup::go(v)?));
    }
    let test = |update: bool| -> Result<()> {
        let mut cmd = cargo();
        cmd.current_dir(root())
            .args(["test", "--release", "-p", "zerotrace", "--lib", "symbols::go::tests::go_offsets_table_matches_dwarf", "--", "--exact"])
            .env("ZEROTRACE_GO_VERSIONS", GO_MATRIX.join(","));
        if update {
            cmd.env("ZEROTRACE_UPDATE_GO_OFFSETS", "1");
        }
        for (var, go) in &gos {
            cmd.env(var, go);
        }
        run(&mut cmd)
    };
    step(format!("building the Go probe program with Go {} and reading its DWARF", GO_MATRIX.join(", ")));
    test(true)?;
    step("checking the written table against DWARF");
    test(false)?;
    step("wrote agent/src/symbols/go_offsets_table.rs (commit it)");
    Ok(())
}
