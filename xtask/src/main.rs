//! `cargo xtask`: one entry point for setting up a machine, building, running the demo, the
//! test suite, the long trust runs (`soak`), the VM tests on Debian kernels (`vmtest`), the
//! benchmarks and regenerating generated sources (`codegen`). Every task
//! installs what it needs first (idempotently, saying what it does), so a fresh machine needs
//! nothing but this repository and Rust.
mod bench;
mod codegen;
mod demo;
mod fuzz;
mod image;
mod manifests;
mod setup;
mod soak;
mod test;
mod util;
mod vmtest;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "zerotrace developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the pinned nightly, bpf-linker, Go toolchains and test dependencies.
    Setup,
    /// Build everything; the agent ends up at target/release/zerotrace.
    Build,
    /// The agent's OCI image (FROM scratch) at target/image/zerotrace.oci.tar, zerotrace:dev.
    Image(image::ImageArgs),
    /// Run the bundled Go demo services under load, traced live, spans in the terminal.
    Demo(demo::DemoArgs),
    /// Set up, then run the whole test suite (unit, kernel, end-to-end).
    Test(test::TestArgs),
    /// Fuzz every parser of captured bytes for a bounded time (cargo-fuzz).
    Fuzz(fuzz::FuzzArgs),
    /// Benchmarks (with agent vs without, in one run).
    Bench {
        #[command(subcommand)]
        which: bench::Bench,
    },
    /// The long trust runs: connection churn, process churn, and a soak at steady load (RSS
    /// and CPU curve in target/soak/); `test` runs them short.
    Soak(soak::SoakArgs),
    /// Boot Debian kernels under qemu and run an end-to-end subset in each (results in
    /// target/vmtest/results.txt).
    Vmtest(vmtest::VmtestArgs),
    /// Regenerate checked-in generated sources.
    Codegen {
        #[command(subcommand)]
        which: codegen::Codegen,
    },
}

fn main() -> std::process::ExitCode {
    match dispatch(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\x1b[1;31merror:\x1b[0m {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> Result<()> {
    match cli.task {
        Task::Setup => {
            setup::all()?;
            Ok(())
        }
        Task::Build => {
            setup::kernel_toolchain()?;
            util::build_release()?;
            Ok(())
        }
        Task::Image(args) => image::run_image(args),
        Task::Demo(args) => demo::run(args),
        Task::Test(args) => test::run(args),
        Task::Fuzz(args) => fuzz::run_fuzz(args),
        Task::Bench { which } => bench::run(which),
        Task::Soak(args) => soak::run(args),
        Task::Vmtest(args) => vmtest::run(args),
        Task::Codegen { which } => codegen::run_codegen(which),
    }
}
