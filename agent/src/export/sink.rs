//! One OTLP request at a time to the traces' collector, for the signals sent now and then
//! (metrics every interval, profiles every window): gRPC (a unary call on `grpc_path`, the
//! channel connected lazily) or http/protobuf (POST to the traces endpoint with its
//! `/v1/traces` replaced by `http_path`). Spans have their own pipelined transport
//! (`otlp.rs`). A collector that does not serve the signal (HTTP 404, gRPC UNIMPLEMENTED)
//! gets one log line, and the signal is then tried rarely (`retry::Rare`: from a minute up
//! to 16), not at every interval; a collector that asks to wait (Retry-After, RetryInfo)
//! gets nothing before then. Requests not sent for either reason are counted.
use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant, SystemTime},
};

use super::{
    ExportSettings, Protocol,
    retry::{Failure, Rare, grpc_failure, http_failure},
};

/// One signal's standing with the collector, shared by every sink of that signal (the
/// periodic one and the last one at exit), and what its sinks did, for the agent's counters.
#[derive(Debug, Default)]
pub struct SinkState {
    /// Requests not sent or refused because the collector does not serve the signal.
    pub unsupported: AtomicU64,
    /// Requests not sent because the collector asked to wait (Retry-After, RetryInfo).
    pub held: AtomicU64,
    gate: Mutex<Gate>,
}

/// When the next request may go.
#[derive(Debug, Default)]
struct Gate {
    rare: Rare,
    not_before: Option<Instant>,
}

/// Why a request did not reach the collector.
#[derive(Debug)]
pub enum SinkError {
    /// Not taken, and already counted and said by the sink: the collector does not serve
    /// this signal (it refused it now, or lately: tried again rarely) or asked to wait.
    NotTaken(&'static str),
    /// Sent and failed.
    Failed(Failure),
}

impl std::fmt::Display for SinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SinkError::NotTaken(why) => f.write_str(why),
            SinkError::Failed(e) => e.fmt(f),
        }
    }
}

pub struct Sink {
    settings: ExportSettings,
    grpc: Option<tonic::client::Grpc<tonic::transport::Channel>>,
    grpc_path: &'static str,
    http: Option<reqwest::Client>,
    url: String,
    /// The signal's name in logs ("metrics", "profiles").
    signal: &'static str,
    state: Arc<SinkState>,
}

impl Sink {
    pub fn new(settings: &ExportSettings, signal: &'static str, grpc_path: &'static str, http_path: &str, state: Arc<SinkState>) -> Self {
        let url = match settings.protocol {
            Protocol::Grpc => settings.endpoint.clone(),
            Protocol::HttpProtobuf => match settings.endpoint.strip_suffix("/v1/traces") {
                Some(base) => format!("{base}{http_path}"),
                None => format!("{}{http_path}", settings.endpoint.trim_end_matches('/')),
            },
        };
        Self { settings: settings.clone(), grpc: None, grpc_path, http: None, url, signal, state }
    }

    /// Sends one request unless the collector refused the signal lately or asked to wait;
    /// Err: why it did not get there (the caller counts failures).
    pub async fn send<Req, Resp>(&mut self, req: Req) -> Result<(), SinkError>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        {
            let now = Instant::now();
            let gate = self.state.gate.lock().expect("not poisoned");
            if !gate.rare.open(now) {
                self.state.unsupported.fetch_add(1, Relaxed);
                return Err(SinkError::NotTaken("the collector does not accept this signal (tried again later)"));
            }
            if gate.not_before.is_some_and(|t| now < t) {
                self.state.held.fetch_add(1, Relaxed);
                return Err(SinkError::NotTaken("the collector asked to wait (Retry-After)"));
            }
        }
        let result = self.send_once::<Req, Resp>(req).await;
        let mut gate = self.state.gate.lock().expect("not poisoned");
        match result {
            Ok(()) => {
                if gate.rare.refused() {
                    tracing::info!(signal = self.signal, url = %self.url, "the collector accepts this signal now");
                    gate.rare.accepted();
                }
                Ok(())
            }
            Err(f) => {
                match &f {
                    Failure::Unsupported { why } => {
                        self.state.unsupported.fetch_add(1, Relaxed);
                        let first = !gate.rare.refused();
                        let next = gate.rare.refuse(Instant::now());
                        if first {
                            tracing::warn!(
                                signal = self.signal,
                                url = %self.url,
                                answer = %why,
                                retry_in_s = next.as_secs(),
                                "the collector does not accept this signal; it is tried again rarely (up to every 16 min), counted as {}_unsupported",
                                self.signal
                            );
                        } else {
                            tracing::debug!(signal = self.signal, retry_in_s = next.as_secs(), "the collector still does not accept this signal");
                        }
                    }
                    Failure::Retry { after: Some(wait), .. } => gate.not_before = Some(Instant::now() + *wait),
                    _ => {}
                }
                if matches!(f, Failure::Unsupported { .. }) {
                    return Err(SinkError::NotTaken("the collector does not accept this signal"));
                }
                Err(SinkError::Failed(f))
            }
        }
    }

    async fn send_once<Req, Resp>(&mut self, req: Req) -> Result<(), Failure>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let timeout = self.settings.timeout;
        match self.settings.protocol {
            Protocol::Grpc => {
                if self.grpc.is_none() {
                    let ch = super::tls::grpc_endpoint(&self.url, &self.settings.tls).map_err(|why| Failure::Rejected { why })?.timeout(timeout).connect_lazy();
                    self.grpc = Some(tonic::client::Grpc::new(ch));
                }
                let Some(grpc) = self.grpc.as_mut() else { return Err(Failure::transport("no gRPC channel".into())) };
                let mut r = tonic::Request::new(req);
                for (k, v) in &self.settings.headers {
                    if let (Ok(k), Ok(v)) = (k.parse::<tonic::metadata::MetadataKey<_>>(), v.parse()) {
                        r.metadata_mut().insert(k, v);
                    }
                }
                grpc.ready().await.map_err(|e| Failure::transport(e.to_string()))?;
                let path = tonic::codegen::http::uri::PathAndQuery::from_static(self.grpc_path);
                let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
                let call = grpc.unary(r, path, codec);
                match tokio::time::timeout(timeout + Duration::from_secs(1), call).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(st)) => {
                        let why = format!("gRPC status {:?}", st.code());
                        Err(grpc_failure(&st, why))
                    }
                    Err(_) => Err(Failure::transport(format!("no answer within {} ms", timeout.as_millis()))),
                }
            }
            Protocol::HttpProtobuf => {
                if self.http.is_none() {
                    self.http = Some(
                        super::tls::http_builder(&self.settings.tls)
                            .and_then(|b| b.build().map_err(|e| e.to_string()))
                            .map_err(|why| Failure::Rejected { why })?,
                    );
                }
                let Some(client) = self.http.as_ref() else { return Err(Failure::transport("no HTTP client".into())) };
                let mut b = client.post(&self.url).timeout(timeout).header("content-type", "application/x-protobuf").body(req.encode_to_vec());
                for (k, v) in &self.settings.headers {
                    b = b.header(k.as_str(), v.as_str());
                }
                let resp = b.send().await.map_err(|e| Failure::transport(e.to_string()))?;
                let status = resp.status();
                if status.is_success() {
                    return Ok(());
                }
                let retry_after = resp.headers().get(reqwest::header::RETRY_AFTER).and_then(|v| v.to_str().ok()).map(str::to_owned);
                Err(http_failure(status.as_u16(), retry_after.as_deref(), SystemTime::now()))
            }
        }
    }
}
