//! Credentials never leave the agent: query values, Authorization, Cookie and Set-Cookie
//! of server requests and of client calls appear in no exported span (OTLP) and in no line
//! `zerotrace tail --json` prints, while the spans themselves are complete.
use std::time::Duration;

use anyhow::Result;
use zerotrace_e2e::{
    agent::Agent,
    http::Client,
    otlp::{Kind, Receiver},
    proc::{CausalPair, causal_pair},
    tools::{self, GO_NEWEST},
};

#[test]
fn credentials_are_never_exported() -> Result<()> {
    let bin = tools::causal(GO_NEWEST)?;
    let CausalPair { front, down, front_port, down_port } = causal_pair(&bin, "redact", "http", &|_| {})?;

    let rx = Receiver::start(Kind::Grpc, 0)?;
    let endpoint = rx.endpoint();
    let pids = [front.pid(), down.pid()];
    let mut agent = Agent::start_as("tail", &pids, &["--json", "--otlp-endpoint", endpoint.as_str(), "--batch-delay", "200ms"], &[])?;
    let mut c = Client::new(front_port);
    let r = c.request(
        "GET",
        "/creds/1?token=secret-server-query&x=secret-other",
        &[("Authorization", "Basic c2VjcmV0"), ("Cookie", "session=secret-server-cookie"), ("X-Api-Key", "secret-api-key")],
    )?;
    assert_eq!(r.status, 200);
    rx.wait_for(3, Duration::from_secs(20))?;
    agent.stop()?;
    let spans = rx.spans();
    assert_eq!(spans.len(), 3, "{spans:#?}");
    let everything = format!("{spans:?}\n{}", agent.proc.stdout_text());
    for secret in ["secret", "c2VjcmV0"] {
        assert!(!everything.contains(secret), "{secret:?} leaked:\n{everything}");
    }
    // The spans are still all there, with their paths.
    let server = spans.iter().find(|s| s.kind == 2 && s.attr("url.path") == "/creds/1").expect("front server span");
    assert_eq!(server.attr("http.response.status_code"), "200");
    let client = spans.iter().find(|s| s.kind == 3).expect("client span");
    assert_eq!(client.attr("url.full"), format!("http://127.0.0.1:{down_port}/leaf/q-1"));
    assert!(spans.iter().any(|s| s.kind == 2 && s.attr("url.path") == "/leaf/q-1"));
    assert_eq!(agent.proc.stdout_text().lines().count(), 3, "tail printed the 3 spans");
    Ok(())
}
