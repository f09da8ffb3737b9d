//! The clients of a running agent's control service: `zerotrace status` (what it traces, its
//! counters) and `zerotrace tail --connect` (its spans, drawn as trees by the same `Tail` a
//! tracing tail uses), over the unix socket or `tcp://HOST:PORT` with a token.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::signal::unix::{SignalKind, signal};

use super::{
    DEFAULT_SOCKET,
    proto::{SpansRequest, StatusRequest, agent_client::AgentClient},
};
use crate::export::{
    print,
    tail::{Tail, TailSettings},
};

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(
        "no zerotrace agent serves {path} ({reason}); start one with `zerotrace run ...` (it serves {DEFAULT_SOCKET} unless told otherwise) or give its --control-socket path"
    )]
    Unreachable { path: String, reason: String },
    #[error("the agent at {path} went away: {reason}")]
    Lost { path: String, reason: String },
}

/// Adds the token to a TCP client's requests.
#[derive(Clone)]
pub struct WithToken(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for WithToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub type Client = AgentClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, WithToken>>;

/// A client of the agent at `path`: a unix socket, or `tcp://HOST:PORT` with `token`.
pub async fn connect(path: &Path, token: Option<&str>) -> Result<Client, ConnectError> {
    let p: PathBuf = path.to_owned();
    let unreachable = |reason: String| ConnectError::Unreachable { path: path.display().to_string(), reason };
    let why = |e: tonic::transport::Error| format!("{e}: {}", std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default());
    let text = path.to_string_lossy();
    let channel = match text.strip_prefix("tcp://") {
        Some(addr) => tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| unreachable(e.to_string()))?
            .connect_timeout(Duration::from_secs(3))
            .connect()
            .await
            .map_err(|e| unreachable(why(e)))?,
        None => tonic::transport::Endpoint::from_static("http://[::1]:50051")
            .connect_timeout(Duration::from_secs(3))
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let p = p.clone();
                async move { tokio::net::UnixStream::connect(p).await.map(hyper_util::rt::TokioIo::new) }
            }))
            .await
            .map_err(|e| unreachable(why(e)))?,
    };
    let token = match token {
        Some(t) => Some(format!("Bearer {t}").parse().map_err(|_| unreachable("the token is not valid header text".into()))?),
        None => None,
    };
    Ok(AgentClient::with_interceptor(channel, WithToken(token)))
}

/// `zerotrace status`: one text block.
pub async fn status(path: &Path, token: Option<&str>) -> Result<String, ConnectError> {
    let mut c = connect(path, token).await?;
    let r = c.status(StatusRequest {}).await.map_err(|e| ConnectError::Lost { path: path.display().to_string(), reason: e.message().to_owned() })?.into_inner();
    let mut out = format!(
        "zerotrace {} (pid {}), up {} s, socket hooks {}, tracing {} process(es)\n",
        r.version,
        r.agent_pid,
        r.uptime_seconds,
        r.socket_hooks,
        r.targets.len()
    );
    for t in &r.targets {
        out.push_str(&format!("  pid {:<8} {}\n", t.pid, t.service));
    }
    let entries = |c: &&crate::control::proto::Counter| {
        c.name.strip_prefix("zerotrace_").is_some_and(|n| crate::probes::occupancy::is_entries(n) || crate::correlate::GAUGES.contains(&n))
    };
    let gauge = |c: &&crate::control::proto::Counter| c.name.strip_prefix("zerotrace_").is_some_and(|n| crate::probes::guard::GAUGES.contains(&n));
    out.push_str(&self_protection(&r.counters));
    out.push_str("counters (non-zero):\n");
    for c in r.counters.iter().filter(|c| c.value > 0 && !entries(c) && !gauge(c)) {
        out.push_str(&format!("  {:<36} {}\n", c.name, c.value));
    }
    // Every map, empty ones too: what is left behind shows as a count that does not go back.
    out.push_str("kernel maps (entries, counted every few seconds) and the agent's connections:\n");
    for c in r.counters.iter().filter(entries) {
        out.push_str(&format!("  {:<36} {}\n", c.name, c.value));
    }
    Ok(out)
}

/// The self-protection line of `status`: cost against budget, memory against limit, and
/// what is shed.
fn self_protection(counters: &[crate::control::proto::Counter]) -> String {
    let get = |n: &str| counters.iter().find(|c| c.name.strip_prefix("zerotrace_") == Some(n)).map_or(0, |c| c.value);
    let (cpu, budget, shift) = (get("guard_cpu_permille"), get("guard_cpu_budget_permille"), get("guard_shed_shift"));
    let (mem, limit) = (get("guard_memory_bytes") >> 20, get("guard_memory_limit_bytes") >> 20);
    let pct = |p: u64| format!("{}.{}%", p / 10, p % 10);
    let budget = if budget == 0 { "no budget".to_owned() } else { format!("budget {}", pct(budget)) };
    let limit = if limit == 0 { "no limit".to_owned() } else { format!("limit {limit} MiB") };
    let shed = match shift {
        0 => "every request traced".to_owned(),
        s if s >= zerotrace_common::shed::KEEP_NONE as u64 => "SHEDDING: no new request traced".to_owned(),
        s => format!("SHEDDING: 1 in {} new server requests traced", 1u64 << s),
    };
    format!("self-protection: CPU {} of a core ({budget}), memory {mem} MiB ({limit}); {shed}\n", pct(cpu))
}

/// `zerotrace tail --connect`: the spans of a running agent, through its control socket,
/// drawn as by a tail that traces by itself. Ends at SIGINT/SIGTERM or when the agent goes.
pub async fn tail(socket: &Path, token: Option<&str>, settings: TailSettings) -> Result<(), ConnectError> {
    let mut client = connect(socket, token).await?;
    let lost = |reason: String| ConnectError::Lost { path: socket.display().to_string(), reason };
    let mut stream = client.spans(SpansRequest {}).await.map_err(|e| lost(e.message().to_owned()))?.into_inner();
    tracing::info!(socket = %socket.display(), "watching the agent's spans");
    let mut tail = Tail::new(settings);
    let mut services: HashMap<String, Arc<str>> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut sigint = signal(SignalKind::interrupt()).map_err(|e| lost(e.to_string()))?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(|e| lost(e.to_string()))?;
    let mut missed = 0u64;
    let end = loop {
        tokio::select! {
            msg = stream.message() => match msg {
                Ok(Some(rec)) => {
                    if rec.dropped > missed {
                        tracing::warn!(missed = rec.dropped - missed, "this tail was too slow: spans were dropped for it");
                        missed = rec.dropped;
                    }
                    if let Some((span, service)) = super::span_of(&rec) {
                        let svc = services.entry(service.clone()).or_insert_with(|| Arc::from(service.as_str())).clone();
                        let late = tail.offer(&span, &svc, Instant::now());
                        print::print(&late.into_iter().collect::<Vec<_>>());
                    }
                }
                Ok(None) => break Err(lost("the agent stopped".into())),
                Err(e) => break Err(lost(e.message().to_owned())),
            },
            _ = tick.tick() => print::print(&tail.due(Instant::now())),
            _ = sigint.recv() => break Ok(()),
            _ = sigterm.recv() => break Ok(()),
        }
    };
    print::print(&tail.flush());
    end
}
