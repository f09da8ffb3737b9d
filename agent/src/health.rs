//! `--health-listen ADDR`: the liveness and readiness endpoints a DaemonSet probes.
//! `GET /healthz` answers 200 while the run loop turns (it ticks every second; a loop stuck
//! for 30 s is not alive); `GET /readyz` answers 200 once the kernel programs are attached
//! and while the exporter is not failing (its errors grew over the last 30 s and nothing was
//! exported meanwhile). Both bodies are JSON with the detail. Requests are parsed with
//! httparse; anything else gets 404, and a connection is served one request and closed.
use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::export::ExportStats;

/// How long the exporter may fail without exporting anything before the agent is unready.
const EXPORT_WINDOW: Duration = Duration::from_secs(30);
/// A loop that has not ticked for this long is not alive.
const STALL: Duration = Duration::from_secs(30);

#[derive(thiserror::Error, Debug)]
pub enum HealthError {
    #[error("--health-listen {addr}: cannot listen there ({source}); pick another address or port")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// What the run loop tells the endpoints.
pub struct Health {
    started: Instant,
    /// Milliseconds since `started` of the run loop's last tick.
    last_tick_ms: AtomicU64,
    attached: AtomicBool,
    targets: AtomicU64,
    stats: Arc<ExportStats>,
    exporting: bool,
    /// (when, spans exported, export errors), one per tick, the last EXPORT_WINDOW of them.
    history: Mutex<VecDeque<(Instant, u64, u64)>>,
}

impl Health {
    pub fn new(stats: Arc<ExportStats>, exporting: bool) -> Arc<Self> {
        Arc::new(Health {
            started: Instant::now(),
            last_tick_ms: AtomicU64::new(0),
            attached: AtomicBool::new(false),
            targets: AtomicU64::new(0),
            stats,
            exporting,
            history: Mutex::new(VecDeque::new()),
        })
    }

    /// The kernel programs are loaded and attached.
    pub fn set_attached(&self) {
        self.attached.store(true, Relaxed);
    }

    /// Called by the run loop every second.
    pub fn tick(&self, targets: usize) {
        self.last_tick_ms.store(self.started.elapsed().as_millis() as u64, Relaxed);
        self.targets.store(targets as u64, Relaxed);
        let now = Instant::now();
        let mut h = self.history.lock().unwrap_or_else(|e| e.into_inner());
        h.push_back((now, self.stats.exported.load(Relaxed), self.stats.export_errors.load(Relaxed)));
        while h.front().is_some_and(|(t, _, _)| now.duration_since(*t) > EXPORT_WINDOW) {
            h.pop_front();
        }
    }

    fn exporter_failing(&self) -> bool {
        let h = self.history.lock().unwrap_or_else(|e| e.into_inner());
        match (h.front(), h.back()) {
            (Some(first), Some(last)) => last.2 > first.2 && last.1 == first.1,
            _ => false,
        }
    }

    fn alive(&self) -> (bool, u64) {
        let since = (self.started.elapsed().as_millis() as u64).saturating_sub(self.last_tick_ms.load(Relaxed));
        (since < STALL.as_millis() as u64, since)
    }

    /// (status code, JSON body) for a path.
    pub fn answer(&self, path: &str) -> (u16, String) {
        let (alive, since_ms) = self.alive();
        match path {
            "/healthz" => {
                let body = serde_json::json!({ "alive": alive, "last_loop_tick_ms_ago": since_ms });
                (if alive { 200 } else { 503 }, body.to_string())
            }
            "/readyz" => {
                let attached = self.attached.load(Relaxed);
                let failing = self.exporting && self.exporter_failing();
                let ready = alive && attached && !failing;
                let exporter = if !self.exporting {
                    "off"
                } else if failing {
                    "failing"
                } else {
                    "ok"
                };
                let body = serde_json::json!({
                    "ready": ready,
                    "probes_attached": attached,
                    "exporter": exporter,
                    "targets": self.targets.load(Relaxed),
                    "spans_exported": self.stats.exported.load(Relaxed),
                    "export_errors": self.stats.export_errors.load(Relaxed),
                    "alive": alive,
                });
                (if ready { 200 } else { 503 }, body.to_string())
            }
            _ => (404, "{\"error\":\"not found: /healthz or /readyz\"}".to_owned()),
        }
    }
}

/// Binds `addr` and serves the endpoints on a task of their own.
pub async fn serve(addr: SocketAddr, health: Arc<Health>) -> Result<tokio::task::JoinHandle<()>, HealthError> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| HealthError::Bind { addr, source })?;
    tracing::info!(%addr, "health endpoints: /healthz, /readyz");
    Ok(tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let health = health.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), answer(&mut sock, &health)).await;
            });
        }
    }))
}

async fn answer(sock: &mut tokio::net::TcpStream, health: &Health) -> std::io::Result<()> {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    let path = loop {
        let n = sock.read(&mut buf[len..]).await?;
        if n == 0 {
            return Ok(());
        }
        len += n;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[..len]) {
            Ok(httparse::Status::Complete(_)) => break req.path.unwrap_or("/").split('?').next().unwrap_or("/").to_owned(),
            Ok(httparse::Status::Partial) if len < buf.len() => continue,
            _ => break String::new(),
        }
    };
    let (code, body) = if path.is_empty() { (400, "{\"error\":\"bad request\"}".to_owned()) } else { health.answer(&path) };
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        503 => "Service Unavailable",
        _ => "Bad Request",
    };
    let head = format!("HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    sock.write_all(head.as_bytes()).await?;
    sock.write_all(body.as_bytes()).await?;
    sock.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_attached_and_exporting() {
        let stats = Arc::new(ExportStats::default());
        let h = Health::new(stats.clone(), true);
        h.tick(0);
        assert_eq!(h.answer("/healthz").0, 200);
        let (code, body) = h.answer("/readyz");
        assert_eq!(code, 503, "{body}");
        assert!(body.contains("\"probes_attached\":false"), "{body}");
        h.set_attached();
        assert_eq!(h.answer("/readyz").0, 200);
        // Errors and nothing exported over the window: failing.
        stats.export_errors.fetch_add(3, Relaxed);
        h.tick(2);
        let (code, body) = h.answer("/readyz");
        assert_eq!(code, 503, "{body}");
        assert!(body.contains("\"exporter\":\"failing\""), "{body}");
        // Something got through: ok again.
        stats.exported.fetch_add(10, Relaxed);
        h.tick(2);
        assert_eq!(h.answer("/readyz").0, 200);
        assert_eq!(h.answer("/nope").0, 404);
    }

    #[test]
    fn not_exporting_is_ready() {
        let h = Health::new(Arc::new(ExportStats::default()), false);
        h.set_attached();
        h.tick(1);
        let (code, body) = h.answer("/readyz");
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("\"exporter\":\"off\""));
    }

    #[tokio::test]
    async fn serves_over_tcp() {
        let h = Health::new(Arc::new(ExportStats::default()), false);
        h.tick(0);
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let _task = serve(addr, h).await.unwrap();
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.ends_with("{\"alive\":true,\"last_loop_tick_ms_ago\":0}") || out.contains("\"alive\":true"), "{out}");
        assert!(serve(addr, Health::new(Arc::new(ExportStats::default()), false)).await.is_err());
    }
}
