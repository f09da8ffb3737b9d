//! The agent's OTLP is decoded by an implementation that is not ours (Python grpcio +
//! opentelemetry-proto from PyPI): spans must arrive complete and correct there too.
use std::{process::Command, time::Duration};

use anyhow::{Context, Result};
use zerotrace_e2e::{
    agent::Agent,
    http::Client,
    proc::{Proc, start_server, wait_until},
    tools,
};

#[test]
fn python_opentelemetry_proto_decodes_our_spans() -> Result<()> {
    let out = tools::work_dir().join(format!("py-spans-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&out);
    let mut cmd = Command::new(tools::python()?);
    cmd.arg(tools::root().join("tests/e2e/py/otlp_receiver.py")).arg(&out);
    let py = Proc::spawn("py-receiver", cmd)?;
    let mut port = 0u16;
    wait_until("the Python receiver to listen", Duration::from_secs(30), || {
        port = py.stdout_text().lines().find_map(|l| l.strip_prefix("PORT ")?.trim().parse().ok()).unwrap_or(0);
        port != 0
    })
    .with_context(|| py.stderr_text())?;

    let (srv, srv_port) = start_server("httpserver", &tools::httpserver(tools::GO_NEWEST)?)?;
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut agent = Agent::start(&[srv.pid()], &["--otlp-endpoint", &endpoint, "--batch-delay", "200ms"], &[("OTEL_SERVICE_NAME", "checkout")])?;
    let mut client = Client::new(srv_port);
    let paths = ["/users/1", "/users/2", "/status/500", "/hello"];
    for p in paths {
        client.request("GET", p, &[("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")])?;
    }
    let mut lines: Vec<serde_json::Value> = Vec::new();
    wait_until("4 spans at the Python receiver", Duration::from_secs(20), || {
        lines = std::fs::read_to_string(&out).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        lines.len() >= paths.len()
    })?;
    agent.stop()?;
    assert_eq!(lines.len(), paths.len());
    lines.sort_by_key(|v| v["start"].as_u64());
    let names: Vec<&str> = lines.iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["GET /users/{id}", "GET /users/{id}", "GET /status/", "GET /hello"]);
    for v in &lines {
        assert_eq!(v["kind"], 2, "SPAN_KIND_SERVER");
        assert_eq!(v["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736", "incoming traceparent joins the trace");
        assert_eq!(v["parent_span_id"], "00f067aa0ba902b7");
        assert_eq!(v["resource"]["service.name"], "checkout");
        assert_eq!(v["resource"]["process.pid"], srv.pid());
        assert_eq!(v["resource"]["process.runtime.name"], "go");
        assert_eq!(v["scope"], "zerotrace");
        assert!(v["end"].as_u64() >= v["start"].as_u64());
        assert_eq!(v["attributes"]["server.port"], srv_port);
    }
    assert_eq!(lines[2]["attributes"]["http.response.status_code"], 500);
    assert_eq!(lines[2]["status"], 2, "STATUS_CODE_ERROR");
    assert_eq!(lines[0]["attributes"]["url.path"], "/users/1");
    assert_eq!(lines[0]["attributes"]["http.route"], "/users/{id}");
    Ok(())
}
