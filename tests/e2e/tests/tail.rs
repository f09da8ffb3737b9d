//! `zerotrace tail`, end to end: two traced Go services, requests through them, and what the
//! tail printed on stdout (not a terminal: plain text) read back: trace trees with the
//! downstream call under the request that made it, filters, and JSON lines.
use std::{process::Command, time::Duration};

use anyhow::Result;
use zerotrace_e2e::{
    agent::Agent,
    http::Client,
    proc::{CausalPair, causal_pair},
    tools::{self, GO_NEWEST},
};

fn start() -> Result<CausalPair> {
    causal_pair(&tools::causal(GO_NEWEST)?, "tail", "http", &|_| {})
}

/// Waits until stdout has `n` lines containing `needle`.
fn wait_lines(agent: &Agent, needle: &str, n: usize) -> String {
    let _ = zerotrace_e2e::proc::wait_until("tail output", Duration::from_secs(15), || {
        agent.proc.stdout_text().lines().filter(|l| l.contains(needle)).count() >= n
    });
    agent.proc.stdout_text()
}

#[test]
fn tail_draws_trace_trees() -> Result<()> {
    let p = start()?;
    let svc = format!("causal-go{GO_NEWEST}");
    let mut agent = Agent::start_as("tail", &[p.front.pid(), p.down.pid()], &[], &[])?;
    let mut c = Client::new(p.front_port);
    assert_eq!(c.get("/sync/1")?.status, 200);
    assert_eq!(c.get("/fanout/2")?.status, 200);
    let out = wait_lines(&agent, "trace ", 2);
    agent.stop()?;
    let trees: Vec<&str> = out.split("trace ").filter(|t| !t.trim().is_empty()).collect();
    assert_eq!(trees.len(), 2, "two trees:\n{out}");
    let dp = p.down_port;
    // Exactly this shape (durations vary): the handler, its call, the downstream server.
    let sync = trees.iter().find(|t| t.contains("GET /sync/")).expect("sync tree");
    let lines: Vec<&str> = sync.lines().collect();
    assert!(lines[0].ends_with("ms") && lines[0].contains("  3 spans  "), "{sync}");
    assert!(lines[1].starts_with(&format!("{svc} SERVER GET /sync/ 200 ")), "{sync}");
    assert!(lines[2].starts_with(&format!("└─ {svc} CLIENT GET 200 ")) && lines[2].ends_with(&format!(" http://127.0.0.1:{dp}/leaf/sync-1")), "{sync}");
    assert!(lines[3].starts_with(&format!("   └─ {svc} SERVER GET /leaf/ 200 ")), "{sync}");
    assert_eq!(lines.len(), 4, "{sync}");
    // Fan-out: three calls under the handler, each with its downstream span.
    let fan = trees.iter().find(|t| t.contains("GET /fanout/")).expect("fanout tree");
    let lines: Vec<&str> = fan.lines().collect();
    assert!(lines[0].contains("  7 spans  "), "{fan}");
    assert_eq!(lines.iter().filter(|l| l.starts_with("├─ ") || l.starts_with("└─ ")).count(), 3, "{fan}");
    assert_eq!(lines.iter().filter(|l| l.starts_with("│  └─ ") || l.starts_with("   └─ ")).count(), 3, "{fan}");
    assert!(!out.contains('\x1b'), "no colours when stdout is not a terminal");
    Ok(())
}

#[test]
fn tail_filters_and_json() -> Result<()> {
    let p = start()?;
    let mut agent = Agent::start_as("tail", &[p.front.pid(), p.down.pid()], &["--errors", "--json"], &[])?;
    let mut c = Client::new(p.front_port);
    assert_eq!(c.get("/sync/1")?.status, 200);
    assert_eq!(c.get("/err5xx/2")?.status, 500);
    let out = wait_lines(&agent, "\"trace_id\"", 3);
    agent.stop()?;
    let spans: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).expect("a JSON object per line")).collect();
    // Only the failing request's trace: front server, its client call, the downstream 503.
    assert_eq!(spans.len(), 3, "{out}");
    let trace = spans[0]["trace_id"].as_str().unwrap();
    for s in &spans {
        assert_eq!(s["trace_id"], trace);
        assert_eq!(s["status"], "error", "{s}");
        assert!(s["duration_ms"].as_f64().unwrap() >= 0.0);
        assert!(s["pid"].as_u64().unwrap() > 0);
    }
    let server = spans.iter().find(|s| s["kind"] == "server" && s["attributes"]["url.path"] == "/err5xx/2").expect("front span");
    assert_eq!(server["attributes"]["http.response.status_code"], 500);
    assert_eq!(server["parent_span_id"], "");
    let client = spans.iter().find(|s| s["kind"] == "client").expect("client span");
    assert_eq!(client["parent_span_id"], server["span_id"]);
    assert_eq!(client["attributes"]["url.full"], format!("http://127.0.0.1:{}/status/503", p.down_port));
    assert!(!out.contains("/sync/1"), "the successful trace is filtered out");

    // A bad filter is refused before anything is attached.
    let out = Command::new(tools::zerotrace_bin()?).args(["tail", "--pid", &p.front.pid().to_string(), "--attr", "nokey"]).output()?;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--attr"), "{}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// In a real terminal (tmux): trees drawn, error spans in red, and Ctrl-C stops the tail
/// cleanly.
#[test]
fn tail_in_a_terminal() -> Result<()> {
    let p = start()?;
    let session = format!("zerotrace-tail-{}", std::process::id());
    let bin = tools::zerotrace_bin()?;
    let line = format!("{} tail --pid {} --pid {}; echo TAIL-EXITED $?; sleep 30", bin.display(), p.front.pid(), p.down.pid());
    let st = Command::new("tmux").args(["new-session", "-d", "-s", &session, "-x", "220", "-y", "60", &line]).status()?;
    assert!(st.success(), "tmux starts");
    struct Kill(String);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = Command::new("tmux").args(["kill-session", "-t", &self.0]).status();
        }
    }
    let _kill = Kill(session.clone());
    let pane = |escapes: bool| -> String {
        let mut cmd = Command::new("tmux");
        cmd.args(["capture-pane", "-p", "-J", "-t", &session]);
        if escapes {
            cmd.arg("-e");
        }
        cmd.output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
    };
    zerotrace_e2e::proc::wait_until("the tail to attach", Duration::from_secs(60), || pane(false).contains("tracing pid="))?;
    // Twice: the log lines of the second attach scroll by before the first request.
    zerotrace_e2e::proc::wait_until("both attached", Duration::from_secs(60), || pane(false).matches("tracing pid=").count() >= 2)?;
    let mut c = Client::new(p.front_port);
    assert_eq!(c.get("/sync/1")?.status, 200);
    assert_eq!(c.get("/err5xx/2")?.status, 500);
    zerotrace_e2e::proc::wait_until("two trees", Duration::from_secs(15), || pane(false).contains("GET /err5xx/") && pane(false).contains("GET /sync/"))?;
    let plain = pane(false);
    let svc = format!("causal-go{GO_NEWEST}");
    assert!(plain.contains(&format!("{svc} SERVER GET /sync/ 200 ")), "{plain}");
    assert!(plain.contains(&format!("└─ {svc} CLIENT GET 200 ")), "{plain}");
    assert!(plain.contains(&format!("   └─ {svc} SERVER GET /leaf/ 200 ")), "{plain}");
    let colored = pane(true);
    // The failed request: the error spans are red (SGR 31), the trace header bold red.
    let red = colored.lines().filter(|l| l.contains("\x1b[31m") && l.contains("ERROR")).count();
    assert!(red >= 3, "error spans in red:\n{colored:?}");
    assert!(colored.contains("\x1b[1;31mtrace ") || colored.contains("\x1b[1m\x1b[31mtrace "), "{colored:?}");
    // Ctrl-C: detaches and exits 0.
    Command::new("tmux").args(["send-keys", "-t", &session, "C-c"]).status()?;
    zerotrace_e2e::proc::wait_until("the tail to exit", Duration::from_secs(45), || pane(false).contains("TAIL-EXITED"))?;
    assert!(pane(false).contains("TAIL-EXITED 0"), "{}", pane(false));
    Ok(())
}
