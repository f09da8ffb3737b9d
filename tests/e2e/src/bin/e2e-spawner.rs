//! A stand-in for a test binary, for the test that kills one (tests/left_behind.rs): starts
//! children the way every e2e test does (`Proc`: a Go and a Rust service and the agent
//! tracing both), prints their pids on one line, then waits to be killed.
use std::{process::Command, time::Duration};

use anyhow::Result;
use zerotrace_e2e::{
    agent::Agent,
    proc::{start_server, wait_for_port},
    tools,
};

fn main() -> Result<()> {
    let (go, _) = start_server("spawner-go", &tools::httpserver(tools::GO_NEWEST)?)?;
    let port = zerotrace_e2e::proc::free_port();
    let mut cmd = Command::new(tools::rust_svc()?);
    cmd.arg(format!("127.0.0.1:{port}"));
    let rust = zerotrace_e2e::proc::Proc::spawn("spawner-rust", cmd)?;
    wait_for_port(port, Duration::from_secs(10))?;
    let agent = Agent::start(&[go.pid(), rust.pid()], &["--exporter", "none"], &[])?;
    println!("pids {} {} {}", go.pid(), rust.pid(), agent.proc.pid());
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
