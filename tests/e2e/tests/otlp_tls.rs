//! OTLP export to a collector over TLS and mTLS, as clusters require: a gRPC receiver with a
//! certificate from a CA the test makes (rcgen), the agent given that CA with
//! OTEL_EXPORTER_OTLP_CERTIFICATE; then a receiver that requires client certificates, the
//! agent given its certificate and key with the per-signal variables
//! (OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE, _CLIENT_KEY); and the same receiver refusing
//! an agent without one (nothing arrives, the errors are counted).
use std::{path::Path, process::Command, time::Duration};

use anyhow::{Result, ensure};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use zerotrace_e2e::{
    agent::Agent,
    http::Client,
    otlp::Receiver,
    proc::{Proc, free_port, wait_for_port},
    tools::{self, GO_NEWEST},
};

struct Pems {
    ca: String,
    server: (String, String),
    client: (String, String),
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA.
fn make_certs() -> Result<Pems> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "zerotrace e2e CA");
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |names: Vec<String>, cn: &str| -> Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(names)?;
        p.distinguished_name.push(DnType::CommonName, cn);
        let cert = p.signed_by(&key, &issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    Ok(Pems {
        ca: ca.pem(),
        server: leaf(vec!["127.0.0.1".into(), "localhost".into()], "collector")?,
        client: leaf(vec!["zerotrace-agent".into()], "zerotrace-agent")?,
    })
}

fn write(dir: &Path, name: &str, pem: &str) -> Result<String> {
    let p = dir.join(name);
    std::fs::write(&p, pem)?;
    Ok(p.to_string_lossy().into_owned())
}

#[test]
fn otlp_export_over_tls_and_mtls() -> Result<()> {
    let dir = tools::work_dir().join("tls");
    std::fs::create_dir_all(&dir)?;
    let pems = make_certs()?;
    let ca = write(&dir, "ca.pem", &pems.ca)?;
    let client_cert = write(&dir, "client.pem", &pems.client.0)?;
    let client_key = write(&dir, "client.key", &pems.client.1)?;
    let port = free_port();
    let svc = Proc::spawn("tls-go", {
        let mut c = Command::new(tools::httpserver(GO_NEWEST)?);
        c.arg(format!("127.0.0.1:{port}"));
        c
    })?;
    wait_for_port(port, Duration::from_secs(10))?;
    let traffic = || -> Result<()> {
        let mut c = Client::new(port);
        for _ in 0..3 {
            ensure!(c.get("/hello")?.status == 200);
        }
        Ok(())
    };
    let server = (pems.server.0.as_str(), pems.server.1.as_str());

    // TLS: the collector's CA from OTEL_EXPORTER_OTLP_CERTIFICATE.
    let rx = Receiver::start_tls(server, None)?;
    let endpoint = format!("https://127.0.0.1:{}", rx.port);
    let mut agent =
        Agent::start(&[svc.pid()], &["--batch-delay", "200ms"], &[("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint), ("OTEL_EXPORTER_OTLP_CERTIFICATE", &ca)])?;
    traffic()?;
    let spans = rx.wait_for(3, Duration::from_secs(20))?;
    agent.stop()?;
    ensure!(spans.iter().all(|s| s.res("process.pid") == svc.pid().to_string()), "spans over TLS");

    // mTLS with the traces' own variables.
    let rx = Receiver::start_tls(server, Some(&pems.ca))?;
    let endpoint = format!("https://127.0.0.1:{}", rx.port);
    let mut agent = Agent::start(
        &[svc.pid()],
        &["--batch-delay", "200ms"],
        &[
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &endpoint),
            ("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", &ca),
            ("OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE", &client_cert),
            ("OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY", &client_key),
        ],
    )?;
    traffic()?;
    rx.wait_for(3, Duration::from_secs(20))?;
    agent.stop()?;

    // The same collector refuses an agent without a client certificate.
    let rx_strict = Receiver::start_tls(server, Some(&pems.ca))?;
    let endpoint = format!("https://127.0.0.1:{}", rx_strict.port);
    let mut agent =
        Agent::start(&[svc.pid()], &["--batch-delay", "200ms"], &[("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint), ("OTEL_EXPORTER_OTLP_CERTIFICATE", &ca)])?;
    traffic()?;
    std::thread::sleep(Duration::from_secs(4));
    agent.stop()?;
    ensure!(rx_strict.spans().is_empty(), "the mTLS collector took spans from an agent without a client certificate");
    ensure!(agent.stat("export_errors") > 0, "refused exports are counted: {:?}", agent.stats().ok());
    // A failed handshake loses spans only by a counted reason.
    let drops: u64 = ["spans_dropped_queue_full", "spans_dropped_export_failed", "spans_dropped_rejected", "spans_dropped_shutdown", "spans_not_sampled"]
        .iter()
        .map(|r| agent.stat(r))
        .sum();
    ensure!(
        agent.stat("spans_exported") == 0 && agent.stat("spans_assembled") == drops && drops > 0,
        "every span of a refused handshake is a counted drop: {:?}",
        agent.stats().ok()
    );

    // A CA file that does not exist stops the agent before it starts, naming the variable.
    let mut bad = Agent::spawn(&[svc.pid()], &[], &[("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint), ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/nonexistent/ca.pem")])?;
    let st = bad.proc.wait_timeout(Duration::from_secs(20));
    ensure!(st.is_some_and(|s| !s.success()), "the agent ran with a missing CA file");
    ensure!(bad.proc.stderr_text().contains("OTEL_EXPORTER_OTLP_CERTIFICATE"), "{}", bad.proc.stderr_text());
    Ok(())
}
