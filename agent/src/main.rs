//! The `zerotrace` binary: parses the command line, sets up logging, runs a subcommand and
//! turns errors into one clear message and a non-zero exit status.
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use zerotrace::{cli::{Cli, Command}, doctor, run, settings};

/// mimalloc: the pipeline allocates small strings per span; glibc malloc showed up as a
/// third of the agent's CPU under load.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_new(&cli.log).unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).with_ansi(ansi).init();
    match cli.command {
        Command::Doctor => {
            let lines = doctor::check();
            print!("{}", doctor::render(&lines));
            if doctor::baseline_ok(&lines) {
                println!("baseline ok: zerotrace can trace on this machine");
                ExitCode::SUCCESS
            } else {
                println!("baseline missing: zerotrace needs the ring buffer, tracepoints and uprobes (see above)");
                ExitCode::FAILURE
            }
        }
        Command::Run(args) => {
            let env = |k: &str| std::env::var(k).ok();
            match settings::resolve(&args, &env) {
                Ok(s) => run_agent(s),
                Err(e) => fail(&e),
            }
        }
        Command::Tail(args) => {
            let env = |k: &str| std::env::var(k).ok();
            let color = std::io::IsTerminal::is_terminal(&std::io::stdout()) && std::env::var_os("NO_COLOR").is_none();
            match settings::resolve_tail(&args, &env, color) {
                Ok(s) => run_agent(s),
                Err(e) => fail(&e),
            }
        }
    }
}

fn run_agent(settings: settings::RunSettings) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(&e),
    };
    match rt.block_on(run::run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("zerotrace: error: {e}");
    ExitCode::from(2)
}
