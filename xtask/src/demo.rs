//! `cargo xtask demo`: builds the agent, the demo shop (two Go services and a load
//! generator) and the Rust test services (a "reviews" HTTP service that calls a "ratings"
//! gRPC service), starts them, attaches `zerotrace tail` to all four by PID and prints
//! every request's trace tree live (Go -> Go, Go -> Rust -> Rust over gRPC). OTLP export is
//! optional (--otlp URL, or OTEL_EXPORTER_OTLP_ENDPOINT). Ctrl-C stops everything: load
//! first, then the agent (which flushes and detaches), then the services.
//!
//! Nothing outlives the demo, whatever ends it. Each child runs in its own process group, so
//! that a terminal's Ctrl-C reaches only xtask, which stops them in order; a `Demo` guard
//! stops every child started so far on every return, error or panic (a busy port included);
//! each child dies with xtask when xtask itself is killed and runs no code
//! (PR_SET_PDEATHSIG, `zerotrace_e2e::proc::die_with_parent`). A closed stdout (`| tee`, then
//! Ctrl-C) ends the agent's output, which ends the demo through the same ordered stop.
use std::{
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Args;
use zerotrace_e2e::{proc::die_with_parent, tools};

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
    /// Use binaries built already (ZEROTRACE_BIN, ZEROTRACE_RUST_SVC, the Go toolchain in the
    /// cache) instead of running cargo: for the end-to-end test that runs the demo while
    /// `cargo test` holds the build directory.
    #[arg(long, hide = true)]
    pub prebuilt: bool,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Every child the demo started, stopped in reverse order of start (load, agent, then the
/// services) when the guard is dropped: on every way out of `run`.
#[derive(Default)]
struct Demo {
    children: Vec<(&'static str, Child)>,
}

impl Demo {
    /// Starts a child in its own process group (Ctrl-C reaches only xtask, which stops things
    /// in order) that dies with xtask.
    fn spawn(&mut self, name: &'static str, cmd: &mut Command, quiet: bool) -> Result<u32> {
        cmd.process_group(0).stdin(Stdio::null());
        die_with_parent(cmd);
        if quiet {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        }
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        let pid = child.id();
        self.children.push((name, child));
        Ok(pid)
    }

    /// The first child that has exited, with its status.
    fn exited(&mut self) -> Option<(&'static str, std::process::ExitStatus)> {
        self.children.iter_mut().find_map(|(n, c)| c.try_wait().ok().flatten().map(|st| (*n, st)))
    }

    fn exited_named(&mut self, name: &str) -> Option<std::process::ExitStatus> {
        self.children.iter_mut().find(|(n, _)| *n == name).and_then(|(_, c)| c.try_wait().ok().flatten())
    }

    /// Stops every child, newest first: the agent gets SIGINT and up to 15 s to flush and
    /// detach, the others SIGKILL. Idempotent.
    fn stop(&mut self) {
        while let Some((name, mut c)) = self.children.pop() {
            if name == "zerotrace" && matches!(c.try_wait(), Ok(None)) {
                // SAFETY: signalling our own child.
                unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
                let end = Instant::now() + Duration::from_secs(15);
                while matches!(c.try_wait(), Ok(None)) && Instant::now() < end {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        self.stop();
    }
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

/// The agent, the Go toolchain and the Rust services: built here, or (`--prebuilt`) taken
/// from what `cargo xtask test` built.
fn binaries(a: &DemoArgs) -> Result<(PathBuf, PathBuf, PathBuf)> {
    if a.prebuilt {
        return Ok((tools::zerotrace_bin()?, tools::go(setup::GO_NEWEST)?, tools::rust_svc()?));
    }
    setup::kernel_toolchain()?;
    let go = setup::go(setup::GO_NEWEST)?;
    let agent_bin = build_release()?;
    let rust_svc = crate::util::build_rust_services()?;
    Ok((agent_bin, go, rust_svc))
}

pub fn run(a: DemoArgs) -> Result<()> {
    // Signals first: a Ctrl-C while things start still stops what was started.
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
    let (agent_bin, go, rust_svc) = binaries(&a)?;
    step(format!("building the demo shop with Go {}", setup::GO_NEWEST));
    let shop = root().join("target/demo/shop");
    std::fs::create_dir_all(shop.parent().unwrap())?;
    tools::go_build(&go, &root().join("demo/go/shop"), &shop, &[])?;

    let mut demo = Demo::default();
    let (front, cat, rev, rat) = (a.port, a.port + 1, a.port + 2, a.port + 3);
    step(format!("starting catalog (Go) on :{cat}, ratings (Rust, gRPC) on :{rat}, reviews (Rust) on :{rev}, frontend (Go) on :{front}"));
    let catalog = demo.spawn("catalog", Command::new(&shop).args(["catalog", &format!("127.0.0.1:{cat}")]).env("OTEL_SERVICE_NAME", "catalog"), true)?;
    let ratings = demo.spawn("ratings", Command::new(&rust_svc).args(["grpc", &format!("127.0.0.1:{rat}")]).env("OTEL_SERVICE_NAME", "ratings"), true)?;
    let reviews = demo.spawn(
        "reviews",
        Command::new(&rust_svc).arg(format!("127.0.0.1:{rev}")).env("OTEL_SERVICE_NAME", "reviews").env("RUST_SVC_GRPC", format!("http://127.0.0.1:{rat}")),
        true,
    )?;
    let frontend = demo.spawn(
        "frontend",
        Command::new(&shop)
            .args(["frontend", &format!("127.0.0.1:{front}"), &format!("127.0.0.1:{cat}"), &format!("127.0.0.1:{rev}")])
            .env("OTEL_SERVICE_NAME", "frontend"),
        true,
    )?;
    let busy = || format!("is one of ports {front}-{rat} in use? pick others with --port");
    for port in [cat, rat, rev, front] {
        wait_port(port).with_context(busy)?;
    }
    std::thread::sleep(Duration::from_millis(200));
    // A service that could not bind its port exits; another program answering on that port
    // made wait_port succeed.
    if let Some((name, st)) = demo.exited() {
        bail!("the demo {name} exited ({st}): {}", busy());
    }

    let otlp = a.otlp.clone().or_else(|| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok());
    let mut cmd = Command::new(&agent_bin);
    // `tail`: each request as a trace tree (frontend -> catalog, frontend -> reviews ->
    // ratings), as a user would watch it.
    cmd.arg("tail");
    for pid in [catalog, frontend, reviews, ratings] {
        cmd.args(["--pid", &pid.to_string()]);
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
    demo.spawn("zerotrace", &mut cmd, false)?;
    std::thread::sleep(Duration::from_secs(2));
    if let Some(st) = demo.exited_named("zerotrace") {
        bail!("zerotrace exited early ({st}); run `{} doctor` to check this machine", agent_bin.display());
    }
    step(format!("load: {} requests/s against the frontend; Ctrl-C stops the demo", a.rps));
    demo.spawn("load", Command::new(&shop).args(["load", &format!("127.0.0.1:{front}"), &a.rps.to_string()]), true)?;

    let started = Instant::now();
    while !STOP.load(Ordering::SeqCst) {
        if a.seconds > 0 && started.elapsed() >= Duration::from_secs(a.seconds) {
            break;
        }
        // The agent ends when its stdout is closed (`| tee`, then Ctrl-C), any other child
        // when it fails: either way the demo is over.
        if let Some((name, st)) = demo.exited() {
            step(format!("{name} exited ({st})"));
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    step("stopping: load, then zerotrace (flush and detach), then the services");
    demo.stop();
    Ok(())
}
