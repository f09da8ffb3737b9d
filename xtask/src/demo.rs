//! `cargo xtask demo`: builds the agent, the demo shop (two Go services and a load
//! generator) and the Rust test services (a "reviews" HTTP service that calls a "ratings"
//! gRPC service), starts them, attaches `zerotrace tail` to all four by PID and prints
//! every request's trace tree live (Go -> Go, Go -> Rust -> Rust over gRPC). OTLP export is optional (--otlp URL, or OTEL_EXPORTER_OTLP_ENDPOINT). Ctrl-C
//! stops everything: load first, then the agent (which flushes and detaches), then the
//! services.
use std::{
    os::unix::process::CommandExt,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Args;
use zerotrace_e2e::tools;

use crate::{
    setup,
    util::{build_release, root, step},
};

#[derive(Args)]
pub struct DemoArgs {
    /// Send spans to this OTLP/gRPC endpoint too (default: OTEL_EXPORTER_OTLP_ENDPOINT if set).
    #[arg(long, value_name = "URL")]
    pub otlp: Option<String>,
    /// Requests per second from the load generator.
    #[arg(long, default_value_t = 5)]
    pub rps: u32,
    /// Stop by itself after this many seconds (0: run until Ctrl-C).
    #[arg(long, default_value_t = 0)]
    pub seconds: u64,
    /// Port of the frontend; the catalog, reviews and ratings use the next three.
    #[arg(long, default_value_t = 18080)]
    pub port: u16,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// A child in its own process group, so Ctrl-C reaches only xtask, which stops things in order.
fn spawn(name: &str, cmd: &mut Command, quiet: bool) -> Result<Child> {
    cmd.process_group(0).stdin(Stdio::null());
    if quiet {
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
    }
    cmd.spawn().with_context(|| format!("starting {name}"))
}

fn wait_port(port: u16) -> Result<()> {
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("port {port} did not open; is it in use? try --port")
}

pub fn run(a: DemoArgs) -> Result<()> {
    setup::kernel_toolchain()?;
    let go = setup::go(setup::GO_NEWEST)?;
    let agent_bin = build_release()?;
    step(format!("building the demo shop with Go {}", setup::GO_NEWEST));
    let shop = root().join("target/demo/shop");
    std::fs::create_dir_all(shop.parent().unwrap())?;
    tools::go_build(&go, &root().join("demo/go/shop"), &shop, &[])?;

    let rust_svc = crate::util::build_rust_services()?;

    let (front, cat, rev, rat) = (a.port, a.port + 1, a.port + 2, a.port + 3);
    step(format!("starting catalog (Go) on :{cat}, ratings (Rust, gRPC) on :{rat}, reviews (Rust) on :{rev}, frontend (Go) on :{front}"));
    let mut catalog = spawn("catalog", Command::new(&shop).args(["catalog", &format!("127.0.0.1:{cat}")]).env("OTEL_SERVICE_NAME", "catalog"), true)?;
    let mut ratings = spawn("ratings", Command::new(&rust_svc).args(["grpc", &format!("127.0.0.1:{rat}")]).env("OTEL_SERVICE_NAME", "ratings"), true)?;
    let mut reviews = spawn(
        "reviews",
        Command::new(&rust_svc).arg(format!("127.0.0.1:{rev}")).env("OTEL_SERVICE_NAME", "reviews").env("RUST_SVC_GRPC", format!("http://127.0.0.1:{rat}")),
        true,
    )?;
    let mut frontend = spawn(
        "frontend",
        Command::new(&shop)
            .args(["frontend", &format!("127.0.0.1:{front}"), &format!("127.0.0.1:{cat}"), &format!("127.0.0.1:{rev}")])
            .env("OTEL_SERVICE_NAME", "frontend"),
        true,
    )?;
    wait_port(cat)?;
    wait_port(rat)?;
    wait_port(rev)?;
    wait_port(front)?;
    std::thread::sleep(Duration::from_millis(200));
    for (name, c) in [("catalog", &mut catalog), ("frontend", &mut frontend), ("reviews", &mut reviews), ("ratings", &mut ratings)] {
        if let Some(st) = c.try_wait()? {
            bail!("the demo {name} exited ({st}): is one of ports {front}-{rat} in use? pick others with --port");
        }
    }

    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let otlp = a.otlp.clone().or_else(|| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok());
    let mut cmd = Command::new(&agent_bin);
    // `tail`: each request as a trace tree (frontend -> catalog, frontend -> reviews ->
    // ratings), as a user would watch it.
    cmd.arg("tail");
    for c in [&catalog, &frontend, &reviews, &ratings] {
        cmd.args(["--pid", &c.id().to_string()]);
    }
    match &otlp {
        Some(url) => {
            step(format!("attaching zerotrace to the four services; trace trees below and spans to OTLP at {url}"));
            cmd.args(["--otlp-endpoint", url]);
        }
        None => {
            step("attaching zerotrace to the four services; trace trees below (add --otlp URL to also export them)");
            cmd.args(["--exporter", "none"]);
        }
    }
    cmd.args(["--stats-interval", "30s"]);
    let mut agent = spawn("zerotrace", &mut cmd, false)?;
    std::thread::sleep(Duration::from_secs(2));
    if let Some(st) = agent.try_wait()? {
        for c in [&mut catalog, &mut frontend, &mut reviews, &mut ratings] {
            let _ = c.kill();
        }
        bail!("zerotrace exited early ({st}); run `{} doctor` to check this machine", agent_bin.display());
    }
    step(format!("load: {} requests/s against the frontend; Ctrl-C stops the demo", a.rps));
    let mut load = spawn("load", Command::new(&shop).args(["load", &format!("127.0.0.1:{front}"), &a.rps.to_string()]), true)?;

    let started = Instant::now();
    while !STOP.load(Ordering::SeqCst) {
        if a.seconds > 0 && started.elapsed() >= Duration::from_secs(a.seconds) {
            break;
        }
        if let Some(st) = agent.try_wait()? {
            eprintln!("zerotrace exited ({st})");
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    step("stopping: load, then zerotrace (flush and detach), then the services");
    let _ = load.kill();
    let _ = load.wait();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.id() as i32, libc::SIGINT) };
    let end = Instant::now() + Duration::from_secs(15);
    while agent.try_wait()?.is_none() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = agent.kill();
    let _ = agent.wait();
    for mut c in [catalog, frontend, reviews, ratings] {
        let _ = c.kill();
        let _ = c.wait();
    }
    Ok(())
}
