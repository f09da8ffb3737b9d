//! TLS for https collector endpoints (gRPC through tonic, http/protobuf through reqwest, both
//! rustls with ring): the CA named by OTEL_EXPORTER_OTLP_CERTIFICATE on top of the Mozilla
//! roots built into the binary (the agent's image has no system store), and a client
//! certificate and key for mTLS. Plain http endpoints get none of it.
use super::TlsSettings;

/// rustls needs one process-wide crypto provider; ring's, installed once.
fn provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // ring's provider has no post-quantum key exchange (hence the deprecation); the
        // alternative, aws-lc-rs, needs cmake and a C toolchain to build.
        #[allow(deprecated)]
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A tonic endpoint for `url`, with TLS when it is https.
pub fn grpc_endpoint(url: &str, tls: &TlsSettings) -> Result<tonic::transport::Endpoint, String> {
    let ep = tonic::transport::Endpoint::from_shared(url.to_owned()).map_err(|e| format!("invalid endpoint: {e}"))?;
    if !url.starts_with("https://") {
        return Ok(ep);
    }
    provider();
    let mut cfg = tonic::transport::ClientTlsConfig::new().with_webpki_roots();
    if let Some(ca) = &tls.ca {
        cfg = cfg.ca_certificate(tonic::transport::Certificate::from_pem(ca));
    }
    if let (Some(cert), Some(key)) = (&tls.client_cert, &tls.client_key) {
        cfg = cfg.identity(tonic::transport::Identity::from_pem(cert, key));
    }
    ep.tls_config(cfg).map_err(|e| format!("TLS configuration: {e}"))
}

/// A reqwest client builder with the same TLS material.
pub fn http_builder(tls: &TlsSettings) -> Result<reqwest::ClientBuilder, String> {
    provider();
    let mut b = reqwest::Client::builder();
    if let Some(ca) = &tls.ca {
        for cert in reqwest::Certificate::from_pem_bundle(ca).map_err(|e| format!("OTEL_EXPORTER_OTLP_CERTIFICATE: {e}"))? {
            b = b.add_root_certificate(cert);
        }
    }
    if let (Some(cert), Some(key)) = (&tls.client_cert, &tls.client_key) {
        let mut pem = cert.clone();
        pem.push(b'\n');
        pem.extend_from_slice(key);
        b = b.identity(reqwest::Identity::from_pem(&pem).map_err(|e| format!("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE/_KEY: {e}"))?);
    }
    Ok(b)
}
