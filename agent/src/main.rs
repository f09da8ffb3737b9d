//! The `zerotrace` binary: parses the command line, sets up logging, runs a subcommand and
//! turns errors into one clear message and a non-zero exit status.
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, parser::ValueSource};
use tracing_subscriber::EnvFilter;
use zerotrace::{
    cli::{Cli, Command},
    config, control, doctor, run, settings,
};

/// mimalloc: the pipeline allocates small strings per span; glibc malloc showed up as a
/// third of the agent's CPU under load.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc options (`mi_option_e`, the same in its v2 and v3): return freed memory to the
/// OS after 20 ms (default 10 ms x 10 for arenas kept the start-up peak of loading the
/// kernel object resident: 84 -> 38 MiB peak RSS; the pipeline benchmark is unchanged) and
/// commit arena memory as it is used.
const MI_OPTION_ARENA_EAGER_COMMIT: i32 = 4;
const MI_OPTION_PURGE_DELAY: i32 = 15;

fn main() -> ExitCode {
    // SAFETY: option setters of the allocator; no other thread exists yet.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 20);
        libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0);
    }
    let cli = match parse_with_config() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let filter = EnvFilter::try_new(&cli.log).unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).with_ansi(ansi).init();
    match cli.command {
        Command::Doctor(args) => {
            let lines = doctor::check();
            print!("{}", doctor::render(&lines));
            println!("{}", doctor::summary(&lines));
            let mut ok = doctor::baseline_ok(&lines);
            if args.programs {
                match doctor::programs() {
                    Ok((text, all_ok)) => {
                        print!("{text}");
                        ok &= all_ok;
                    }
                    Err(e) => {
                        println!("programs: {e}");
                        ok = false;
                    }
                }
            }
            if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
        Command::Run(args) => {
            let env = |k: &str| std::env::var(k).ok();
            if args.connect.is_some() {
                return fail(&"--connect is for `zerotrace tail` (and `zerotrace status`): `run` traces by itself");
            }
            match settings::resolve(&args, &env) {
                Ok(s) => run_agent(s),
                Err(e) => fail(&e),
            }
        }
        Command::Profile(args) => {
            let env = |k: &str| std::env::var(k).ok();
            if args.run.connect.is_some() {
                return fail(&"--connect is for `zerotrace tail` (and `zerotrace status`): `profile` samples by itself");
            }
            match settings::resolve_profile(&args, &env) {
                Ok(s) => run_agent(s),
                Err(e) => fail(&e),
            }
        }
        Command::Config(_) => {
            let env = |k: &str| std::env::var(k).ok();
            match &cli.config {
                None => {
                    println!("# no configuration file (--config FILE or ZEROTRACE_CONFIG); flags, OTEL_* variables and defaults apply");
                    ExitCode::SUCCESS
                }
                Some(path) => match config::FileConfig::load(path) {
                    Ok(c) => {
                        print!("{}", c.render(&env));
                        ExitCode::SUCCESS
                    }
                    Err(e) => fail(&e),
                },
            }
        }
        Command::Replay(args) => match match &args.export_to {
            Some(endpoint) => zerotrace::replay::export(&args.file, endpoint, args.rate, args.seconds),
            None => zerotrace::replay::run(&args.file, args.rounds, !args.no_encode),
        } {
            Ok(json) => {
                println!("{json}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        Command::Status(args) => block_on(async move { control::status(&args.connect, args.token.as_deref()).await.map(|t| print!("{t}")) }),
        Command::Tail(args) if args.run.connect.is_some() => {
            let env = |k: &str| std::env::var(k).ok();
            let color = std::io::IsTerminal::is_terminal(&std::io::stdout()) && std::env::var_os("NO_COLOR").is_none();
            let socket = args.run.connect.clone().expect("checked");
            match settings::resolve_tail(&args, &env, color) {
                Ok(s) => {
                    let token = args.run.control_token.clone();
                    block_on(async move { control::client::tail(&socket, token.as_deref(), s.tail.expect("tail settings")).await })
                }
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

/// Runs a client future (tail --connect, status) on a small runtime.
fn block_on<E: std::fmt::Display>(f: impl std::future::Future<Output = Result<(), E>>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(&e),
    };
    match rt.block_on(f) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("zerotrace: error: {e}");
    ExitCode::from(2)
}

/// The command line, with what the configuration file sets for options that neither the
/// command line nor the environment set (inserted as flags right after the subcommand, so
/// their own parsers check them). Err: the exit code after the message.
fn parse_with_config() -> Result<Cli, ExitCode> {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // First pass, lenient: where the file is and which options the command line set (a
    // required --pid may come from the file as `exe`).
    let lenient = Cli::command().ignore_errors(true).try_get_matches_from(&argv).ok();
    let path = lenient
        .as_ref()
        .and_then(|m| m.get_one::<std::path::PathBuf>("config").cloned())
        .or_else(|| std::env::var_os("ZEROTRACE_CONFIG").filter(|v| !v.is_empty()).map(Into::into));
    let strict = || Cli::from_arg_matches(&Cli::command().get_matches_from(&argv)).unwrap_or_else(|e| e.exit());
    let (Some(path), Some(matches)) = (path, lenient) else { return Ok(strict()) };
    let Some((sub, sub_m)) = matches.subcommand() else { return Ok(strict()) };
    if sub != "run" && sub != "tail" && sub != "profile" {
        return Ok(strict());
    }
    let file = config::FileConfig::load(&path).map_err(|e| fail(&e))?;
    let cmd = Cli::command();
    let sub_cmd = cmd.find_subcommand(sub).expect("parsed subcommand exists");
    let on_cli = |long: &str| {
        sub_cmd.get_arguments().find(|a| a.get_long() == Some(long)).is_some_and(|a| sub_m.value_source(a.get_id().as_str()) == Some(ValueSource::CommandLine))
    };
    let env = |k: &str| std::env::var(k).ok();
    let extra = file.args(sub, &on_cli, &env);
    if extra.is_empty() {
        return Ok(strict());
    }
    let at = argv.iter().position(|a| a == sub).map_or(argv.len(), |i| i + 1);
    let mut merged = argv[..at].to_vec();
    merged.extend(extra.iter().map(std::ffi::OsString::from));
    merged.extend_from_slice(&argv[at..]);
    let matches = Cli::command().try_get_matches_from(&merged).map_err(|e| {
        eprintln!("zerotrace: error: in config file {}: {}", path.display(), e.kind());
        eprintln!("{}", e.render());
        ExitCode::from(2)
    })?;
    Ok(Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit()))
}
