//! The control socket of a running agent, end to end: two `zerotrace tail --connect`
//! watch one `zerotrace run` at once and both draw the trace trees; `zerotrace status`
//! shows what the agent traces and its counters; the socket is private (0600) and gone
//! after the agent; a missing agent is a clear error.
use std::{os::unix::fs::PermissionsExt, process::Command, time::Duration};

use anyhow::Result;
use zerotrace_e2e::{
    agent::Agent,
    http::Client,
    proc::{CausalPair, Proc, causal_pair, free_port, wait_until},
    tools::{self, GO_NEWEST},
};

#[test]
fn tails_and_status_through_the_control_socket() -> Result<()> {
    let bin = tools::causal(GO_NEWEST)?;
    let CausalPair { front, down, front_port, .. } = causal_pair(&bin, "control", "http", &|_| {})?;

    let socket = tools::work_dir().join(format!("control-{}.sock", std::process::id()));
    let sock = socket.to_string_lossy().into_owned();
    let tcp_port = free_port();
    let tcp = format!("127.0.0.1:{tcp_port}");
    let mut agent = Agent::start(
        &[front.pid(), down.pid()],
        &["--exporter", "none", "--control-socket", &sock, "--control-tcp", &tcp, "--control-token", "s3cret-token"],
        &[],
    )?;
    assert_eq!(std::fs::metadata(&socket)?.permissions().mode() & 0o777, 0o600, "only root may watch");
    let zt = tools::zerotrace_bin()?;
    let tail = |name: &str| -> Result<Proc> {
        let mut c = Command::new(&zt);
        c.args(["tail", "--connect", &sock]).env("NO_COLOR", "1");
        Proc::spawn(name, c)
    };
    let (t1, t2) = (tail("tail-1")?, tail("tail-2")?);
    for t in [&t1, &t2] {
        wait_until("the tail to connect", Duration::from_secs(10), || t.stderr_text().contains("watching the agent's spans"))?;
    }
    assert_eq!(Client::new(front_port).get("/sync/1")?.status, 200);
    let svc = format!("causal-go{GO_NEWEST}");
    for t in [&t1, &t2] {
        wait_until("the tree", Duration::from_secs(10), || t.stdout_text().contains("GET /leaf/"))?;
        let out = t.stdout_text();
        assert!(out.contains(&format!("{svc} SERVER GET /sync/ 200 ")), "{out}");
        assert!(out.contains(&format!("└─ {svc} CLIENT GET 200 ")), "{out}");
        assert!(out.contains(&format!("   └─ {svc} SERVER GET /leaf/ 200 ")), "{out}");
    }
    std::thread::sleep(Duration::from_millis(1200));
    let st = Command::new(&zt).args(["status", "--connect", &sock]).output()?;
    let text = String::from_utf8_lossy(&st.stdout);
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    assert!(text.contains(&format!("(pid {})", agent.proc.pid())) && text.contains("tracing 2 process(es)"), "{text}");
    assert!(text.contains(&format!("pid {:<8} {svc}", front.pid())), "{text}");
    assert!(text.lines().any(|l| l.trim_start().starts_with("zerotrace_spans_assembled") && l.trim_end().ends_with(" 3")), "{text}");
    // Over TCP (only when asked): with the token only.
    let url = format!("tcp://{tcp}");
    let ok = Command::new(&zt).args(["status", "--connect", &url, "--token", "s3cret-token"]).output()?;
    assert!(ok.status.success() && String::from_utf8_lossy(&ok.stdout).contains("tracing 2 process(es)"), "{}", String::from_utf8_lossy(&ok.stderr));
    for bad in [&["--token", "guess"][..], &[][..]] {
        let out = Command::new(&zt).args(["status", "--connect", &url]).args(bad).env_remove("ZEROTRACE_CONTROL_TOKEN").output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("token"), "{err}");
    }
    agent.stop()?;
    assert!(!socket.exists(), "the socket goes with the agent");
    // The tails notice.
    for t in [t1, t2] {
        let mut t = t;
        let st = t.wait_timeout(Duration::from_secs(10)).expect("the tail ends when the agent does");
        assert_eq!(st.code(), Some(2));
        assert!(t.stderr_text().contains("went away"), "{}", t.stderr_text());
    }
    let st = Command::new(&zt).args(["status", "--connect", &sock]).output()?;
    let err = String::from_utf8_lossy(&st.stderr);
    assert_eq!(st.status.code(), Some(2));
    assert!(err.contains("no zerotrace agent serves") && err.contains("zerotrace run"), "{err}");
    Ok(())
}
