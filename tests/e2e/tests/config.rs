//! The configuration file, end to end: it selects processes and sets where spans go and
//! what they are called; an environment variable beats it, a flag beats both; a mistake in
//! it is refused with the key named.
use std::{process::Command, time::Duration};

use anyhow::Result;
use zerotrace_e2e::{
    agent::Agent,
    http::Client,
    otlp::{Kind, Receiver},
    proc::{Proc, free_port, wait_for_port},
    tools::{self, GO_NEWEST},
};

#[test]
fn file_then_environment_then_flags() -> Result<()> {
    let bin = tools::causal(GO_NEWEST)?;
    let port = free_port();
    let mut cmd = Command::new(&bin);
    cmd.arg(format!("127.0.0.1:{port}"));
    let svc = Proc::spawn("config-svc", cmd)?;
    wait_for_port(port, Duration::from_secs(10))?;
    let (file_rx, env_rx, flag_rx) = (Receiver::start(Kind::Grpc, 0)?, Receiver::start(Kind::Grpc, 0)?, Receiver::start(Kind::Grpc, 0)?);
    let dir = tools::work_dir().join(format!("config-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("zerotrace.toml");
    let exe = bin.file_name().unwrap().to_string_lossy().into_owned();
    std::fs::write(
        &path,
        format!(
            "# selected by executable, named and exported as the file says\nexe = [{exe:?}]\notlp-endpoint = {:?}\nservice-name = \"from-file\"\nbatch-delay = \"200ms\"\n",
            file_rx.endpoint()
        ),
    )?;
    let config = path.to_string_lossy().into_owned();
    let round = |extra: &[&str], env: &[(&str, &str)], rx: &Receiver, path: &str| -> Result<String> {
        let mut args = vec!["--config", config.as_str()];
        args.extend_from_slice(extra);
        let mut agent = Agent::start_discovering_env("run", &args, env)?;
        agent_traces(&agent, svc.pid())?;
        assert_eq!(Client::new(port).get(path)?.status, 200);
        rx.wait_for(1, Duration::from_secs(20))?;
        agent.stop()?;
        let spans = rx.spans();
        let s = spans.iter().find(|s| s.attr("url.path") == path).expect("the request's span");
        Ok(s.res("service.name").to_owned())
    };
    // The file alone.
    assert_eq!(round(&[], &[], &file_rx, "/leaf/file")?, "from-file");
    // The environment beats the file (endpoint and name).
    let env_ep = env_rx.endpoint();
    assert_eq!(round(&[], &[("OTEL_EXPORTER_OTLP_ENDPOINT", &env_ep), ("OTEL_SERVICE_NAME", "from-env")], &env_rx, "/leaf/env")?, "from-env");
    // A flag beats both.
    let flag_ep = flag_rx.endpoint();
    assert_eq!(
        round(&["--otlp-endpoint", &flag_ep, "--service-name", "from-flag"], &[("OTEL_EXPORTER_OTLP_ENDPOINT", &env_ep)], &flag_rx, "/leaf/flag")?,
        "from-flag"
    );
    assert!(file_rx.spans().iter().all(|s| s.attr("url.path") == "/leaf/file"), "the file's endpoint got only the first round");
    assert!(env_rx.spans().iter().all(|s| s.attr("url.path") == "/leaf/env"));

    // Mistakes name the key (and the accepted values), before anything is attached.
    std::fs::write(&path, "go-spawns = \"maybe\"\n")?;
    let out = Command::new(tools::zerotrace_bin()?).args(["--config", &config, "run", "--pid", &svc.pid().to_string()]).output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("config file") && err.contains("--go-spawns") && err.contains("on, off"), "{err}");
    std::fs::write(&path, "otlp_endpoint = \"x\"\n")?;
    let out = Command::new(tools::zerotrace_bin()?).args(["--config", &config, "config", "--print"]).output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("unknown key \"otlp_endpoint\"") && err.contains("otlp-endpoint"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn agent_traces(agent: &Agent, pid: u32) -> Result<()> {
    let needle = format!("tracing pid={pid} ");
    zerotrace_e2e::proc::wait_until("the agent to trace the service", Duration::from_secs(10), || agent.proc.stderr_text().contains(&needle))
}
