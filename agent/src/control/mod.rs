//! The local control service of `zerotrace run` (proto/zerotrace/v1/agent.proto) on a unix
//! socket, mode 0600: `zerotrace tail --connect` streams the spans a running agent finishes,
//! `zerotrace status` asks what it traces and its counters. Several clients may watch; a
//! slow one loses spans (counted in its records), the agent never waits for it. The
//! clients' side (`status`, `tail --connect`) is in `client`.
use std::{
    os::unix::fs::PermissionsExt,
    path::Path,
    sync::{Arc, Mutex},
};

use tokio::sync::broadcast;
use tokio_stream::{
    StreamExt,
    wrappers::{BroadcastStream, UnixListenerStream, errors::BroadcastStreamRecvError},
};

use crate::spans::{Span, SpanId, SpanKind, Status, TraceId, Value};

pub mod client;
pub mod proto {
    tonic::include_proto!("zerotrace.v1");
}

pub use client::{ConnectError, connect, status};

use proto::{
    Attribute, SpanRecord, SpansRequest, StatusReply, StatusRequest,
    agent_server::{Agent, AgentServer},
    attribute,
};

/// Where `zerotrace run` listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/zerotrace/agent.sock";
/// Spans buffered per watching client.
const PER_CLIENT: usize = 4096;

/// The agent's side: what clients see.
#[derive(Clone)]
pub struct Control {
    spans: broadcast::Sender<SpanRecord>,
    status: Arc<Mutex<StatusReply>>,
}

impl Control {
    /// Whether anyone watches (spans are converted only then).
    pub fn watched(&self) -> bool {
        self.spans.receiver_count() > 0
    }

    pub fn publish(&self, s: &Span, service: &str) {
        let _ = self.spans.send(record(s, service));
    }

    pub fn set_status(&self, reply: StatusReply) {
        *self.status.lock().expect("not poisoned") = reply;
    }
}

struct Svc(Control);

#[tonic::async_trait]
impl Agent for Svc {
    type SpansStream = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<SpanRecord, tonic::Status>> + Send>>;

    async fn spans(&self, _: tonic::Request<SpansRequest>) -> Result<tonic::Response<Self::SpansStream>, tonic::Status> {
        let mut missed = 0u64;
        let stream = BroadcastStream::new(self.0.spans.subscribe()).filter_map(move |r| match r {
            Ok(mut rec) => {
                rec.dropped = missed;
                Some(Ok(rec))
            }
            Err(BroadcastStreamRecvError::Lagged(n)) => {
                missed += n;
                None
            }
        });
        Ok(tonic::Response::new(Box::pin(stream)))
    }

    async fn status(&self, _: tonic::Request<StatusRequest>) -> Result<tonic::Response<StatusReply>, tonic::Status> {
        Ok(tonic::Response::new(self.0.status.lock().expect("not poisoned").clone()))
    }
}

impl Control {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(PER_CLIENT);
        Control { spans: tx, status: Arc::new(Mutex::new(StatusReply::default())) }
    }
}

impl Default for Control {
    fn default() -> Self {
        Self::new()
    }
}

/// Checks `authorization: Bearer <token>` on TCP (constant time).
#[derive(Clone)]
struct TokenCheck(Arc<str>);

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let got = req.metadata().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
        let want = format!("Bearer {}", self.0);
        let same = got.len() == want.len() && got.bytes().zip(want.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
        if same { Ok(req) } else { Err(tonic::Status::unauthenticated("a valid token is needed (--control-token / ZEROTRACE_CONTROL_TOKEN)")) }
    }
}

/// Also serves `control` on TCP at `addr` (only when asked), for clients that present
/// `token`.
pub async fn serve_tcp(addr: std::net::SocketAddr, token: &str, control: &Control) -> bool {
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(%addr, error = %e, "cannot serve the control service on TCP");
            return false;
        }
    };
    let svc = AgentServer::with_interceptor(Svc(control.clone()), TokenCheck(Arc::from(token)));
    tokio::spawn(async move {
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let _ = tonic::transport::Server::builder().add_service(svc).serve_with_incoming(incoming).await;
    });
    tracing::info!(%addr, "control service on TCP (token required)");
    true
}

/// Starts serving on `path`. A live socket of another agent there is left alone (None, said
/// in the log); a stale one is replaced.
pub async fn serve(path: &Path) -> Option<Control> {
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            tracing::warn!(path = %path.display(), "another zerotrace agent serves this control socket; this one serves none (use --control-socket PATH)");
            return None;
        }
        let _ = std::fs::remove_file(path);
    }
    if let Some(dir) = path.parent()
        && std::fs::create_dir_all(dir).is_ok()
    {
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
    }
    let listener = match tokio::net::UnixListener::bind(path) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot serve the control socket: tail --connect and status will not reach this agent");
            return None;
        }
    };
    // Only this user (root, normally) may watch: spans can hold what requests carried.
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    let control = Control::new();
    let svc = AgentServer::new(Svc(control.clone()));
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder().add_service(svc).serve_with_incoming(UnixListenerStream::new(listener)).await;
    });
    tracing::info!(path = %path.display(), "control socket: zerotrace tail --connect / zerotrace status");
    Some(control)
}

/// Removes the socket file (at exit).
pub fn unlink(path: &Path) {
    let _ = std::fs::remove_file(path);
}

fn record(s: &Span, service: &str) -> SpanRecord {
    SpanRecord {
        trace_id: s.trace_id.0.to_vec(),
        span_id: s.span_id.0.to_vec(),
        parent_span_id: s.parent.map(|p| p.0.to_vec()).unwrap_or_default(),
        parent_is_remote: s.parent_is_remote,
        pid: s.pid,
        service: service.to_owned(),
        kind: match s.kind {
            SpanKind::Server => 1,
            SpanKind::Client => 2,
            SpanKind::Internal => 3,
        },
        name: s.name.clone(),
        start_unix_nano: s.start_unix_ns,
        end_unix_nano: s.end_unix_ns,
        error: matches!(s.status, Status::Error(_)),
        status_message: match &s.status {
            Status::Error(m) => m.clone(),
            Status::Unset => String::new(),
        },
        attributes: s
            .attributes
            .iter()
            .map(|(k, v)| Attribute {
                key: (*k).to_owned(),
                value: Some(match v {
                    Value::Int(i) => attribute::Value::Int(*i),
                    other => attribute::Value::Str(other.to_string()),
                }),
            })
            .collect(),
        dropped: 0,
    }
}

/// A received record as a span again (attribute keys leaked once per distinct key, a
/// bounded set in practice: the agent's own attribute names).
pub fn span_of(r: &SpanRecord) -> Option<(Span, String)> {
    let id16 = <[u8; 16]>::try_from(r.trace_id.as_slice()).ok()?;
    let id8 = <[u8; 8]>::try_from(r.span_id.as_slice()).ok()?;
    let parent = <[u8; 8]>::try_from(r.parent_span_id.as_slice()).ok().map(SpanId);
    let attributes = r
        .attributes
        .iter()
        .filter_map(|a| {
            let key = intern(&a.key);
            Some((
                key,
                match a.value.as_ref()? {
                    attribute::Value::Int(i) => Value::Int(*i),
                    attribute::Value::Str(s) => Value::Str(s.clone()),
                },
            ))
        })
        .collect();
    let span = Span {
        pid: r.pid,
        trace_id: TraceId(id16),
        span_id: SpanId(id8),
        parent,
        parent_is_remote: r.parent_is_remote,
        trace_state: None,
        kind: match r.kind {
            1 => SpanKind::Server,
            2 => SpanKind::Client,
            _ => SpanKind::Internal,
        },
        name: r.name.clone(),
        start_unix_ns: r.start_unix_nano,
        end_unix_ns: r.end_unix_nano,
        attributes,
        status: if r.error { Status::Error(r.status_message.clone()) } else { Status::Unset },
    };
    Some((span, r.service.clone()))
}

/// Attribute names as the `&'static str` spans use; each distinct name is stored once.
fn intern(key: &str) -> &'static str {
    static KEYS: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
    let mut keys = KEYS.lock().expect("not poisoned");
    if let Some(k) = keys.iter().find(|k| **k == key) {
        return k;
    }
    if keys.len() >= 1024 {
        return "zerotrace.attribute";
    }
    let k: &'static str = Box::leak(key.to_owned().into_boxed_str());
    keys.push(k);
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_to_spans() {
        let s = Span {
            pid: 9,
            trace_id: TraceId([3; 16]),
            span_id: SpanId([4; 8]),
            parent: Some(SpanId([5; 8])),
            parent_is_remote: false,
            trace_state: None,
            kind: SpanKind::Client,
            name: "GET".into(),
            start_unix_ns: 10,
            end_unix_ns: 20,
            attributes: vec![("http.response.status_code", Value::Int(503)), ("url.full", Value::Static("http://x/y"))],
            status: Status::Error("bad".into()),
        };
        let (back, service) = span_of(&record(&s, "front")).unwrap();
        assert_eq!(service, "front");
        assert_eq!(back.attributes[0], ("http.response.status_code", Value::Int(503)));
        assert_eq!(back.attributes[1], ("url.full", Value::Str("http://x/y".into())));
        assert_eq!((back.trace_id, back.span_id, back.parent, back.kind), (s.trace_id, s.span_id, s.parent, s.kind));
        assert_eq!(back.status, s.status.clone());
        let mut bad = record(&s, "x");
        bad.trace_id.truncate(3);
        assert!(span_of(&bad).is_none(), "malformed records are skipped, never a panic");
    }
}
