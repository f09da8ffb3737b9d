//! OTLP trace export: a bounded queue (drops counted, the pipeline never waits; the spans of
//! one drain go in as one message, so the exporting task wakes once per drain), batches per
//! traced process (each process is its own resource, encoded once) by size or delay, each
//! batch encoded straight to an `ExportTraceServiceRequest` (`encode`) and sent over gRPC
//! (tonic) or HTTP (reqwest), up to MAX_IN_FLIGHT export requests at once, with retries and
//! exponential backoff while the collector is down or overloaded (a Retry-After or gRPC
//! RetryInfo holds every request back until then; OTLP's rules in `retry`). When it comes
//! back, export resumes with whatever is queued then. Every span taken in ends exported or
//! counted under the reason it was dropped (queue full, retries spent, refused by the
//! collector, still queued at the shutdown deadline).
use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use opentelemetry_sdk::Resource;
use prost::{
    Message as _,
    bytes::{BufMut as _, Bytes},
};
use rustc_hash::FxHashMap as HashMap;
use tokio::sync::mpsc;

use super::{
    ExportSettings, ExportStats, Protocol,
    encode::{self, EncodedResource},
    resource::Resources,
    retry::{Failure, grpc_failure, http_failure},
};
use crate::spans::Span;

/// Retries of one batch before it is dropped, and the backoff between them.
const MAX_ATTEMPTS: u32 = 6;
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot set up the OTLP exporter for {endpoint}: {reason}")]
    Build { endpoint: String, reason: String },
}

/// Export requests in flight at once (each a batch of one process's spans).
const MAX_IN_FLIGHT: usize = 4;

pub struct OtlpExport {
    tx: Option<mpsc::Sender<Vec<Span>>>,
    /// Spans in the queue (its bound is in spans, its messages hold a drain's spans each).
    queued: Arc<AtomicUsize>,
    queue: usize,
    task: tokio::task::JoinHandle<()>,
    /// Told at the shutdown deadline: the task ends every export in flight and returns.
    stop: Arc<tokio::sync::Notify>,
    pub stats: Arc<ExportStats>,
}

impl OtlpExport {
    /// Starts the exporting task (in the current tokio runtime); fails on a configuration
    /// the exporter cannot use.
    pub fn start(settings: &ExportSettings, resources: Resources, stats: Arc<ExportStats>) -> Result<Self, ExportError> {
        let transport = Transport::new(settings)?;
        // Every message holds at least one span, so the span bound also bounds messages.
        let (tx, rx) = mpsc::channel(settings.queue.max(1));
        let queued = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(tokio::sync::Notify::new());
        let task = tokio::spawn(run(rx, queued.clone(), settings.clone(), transport, resources, stats.clone(), stop.clone()));
        Ok(Self { tx: Some(tx), queued, queue: settings.queue, task, stop, stats })
    }

    /// Queues `spans` (emptied) as one message; never waits. What does not fit in the
    /// queue is dropped and counted (the last spans of the lot).
    pub fn offer_all(&mut self, spans: &mut Vec<Span>) {
        let n = spans.len();
        let Some(tx) = self.tx.as_ref().filter(|_| n > 0) else {
            spans.clear();
            return;
        };
        if crate::probes::guard::OVER_MEMORY_LIMIT.load(Relaxed) {
            self.stats.dropped_memory_limit.fetch_add(n as u64, Relaxed);
            spans.clear();
            return;
        }
        // Only the owner (`&mut self`) adds to the count, so the room seen here cannot shrink.
        let room = self.queue.saturating_sub(self.queued.load(Relaxed));
        if room < n {
            self.stats.dropped_queue_full.fetch_add((n - room) as u64, Relaxed);
            spans.truncate(room);
        }
        let k = spans.len();
        if k == 0 {
            return;
        }
        self.queued.fetch_add(k, Relaxed);
        // The caller's buffer keeps its capacity for the next drain.
        let lot = std::mem::replace(spans, Vec::with_capacity(spans.capacity()));
        match tx.try_send(lot) {
            Ok(()) => {
                self.stats.queued.fetch_add(k as u64, Relaxed);
            }
            Err(_) => {
                self.queued.fetch_sub(k, Relaxed);
                self.stats.dropped_queue_full.fetch_add(k as u64, Relaxed);
            }
        }
    }

    /// Sends what is queued, waiting at most `deadline`.
    pub async fn shutdown(mut self, deadline: Duration) {
        self.tx = None;
        if tokio::time::timeout(deadline, &mut self.task).await.is_err() {
            // Every export task has ended (none can count a span after this) before the
            // rest is counted as dropped.
            self.stop.notify_one();
            if tokio::time::timeout(Duration::from_secs(2), &mut self.task).await.is_err() {
                self.task.abort();
                let _ = (&mut self.task).await;
            }
            let left = self.stats.unaccounted();
            self.stats.dropped_shutdown.fetch_add(left, Relaxed);
            tracing::warn!(seconds = deadline.as_secs(), spans = left, "export did not finish in time; the spans left are dropped (spans_dropped_shutdown)");
        }
    }
}

/// The gRPC method export requests go to.
const GRPC_SERVICE: &str = "opentelemetry.proto.collector.trace.v1.TraceService";
const GRPC_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// Where export requests go: one connection (gRPC: one HTTP/2 channel, lazily connected
/// and reconnected; HTTP: reqwest's pool) shared by all processes, since each request
/// carries its own resource. Cloned into each export task.
#[derive(Clone)]
enum Transport {
    Grpc { grpc: tonic::client::Grpc<tonic::transport::Channel>, metadata: tonic::metadata::MetadataMap, timeout: Duration },
    Http { client: reqwest::Client, url: reqwest::Url, headers: reqwest::header::HeaderMap, timeout: Duration },
}

impl Transport {
    /// Needs a tokio runtime (the gRPC channel's worker is spawned on it).
    fn new(s: &ExportSettings) -> Result<Self, ExportError> {
        let err = |reason: String| ExportError::Build { endpoint: s.endpoint.clone(), reason };
        match s.protocol {
            Protocol::Grpc => {
                let mut metadata = tonic::metadata::MetadataMap::new();
                for (k, v) in &s.headers {
                    let key =
                        tonic::metadata::MetadataKey::from_bytes(k.to_ascii_lowercase().as_bytes()).map_err(|_| err(format!("invalid header name {k:?}")))?;
                    let val = v.parse().map_err(|_| err(format!("invalid header value for {k}")))?;
                    metadata.insert(key, val);
                }
                let channel = super::tls::grpc_endpoint(&s.endpoint, &s.tls).map_err(&err)?.timeout(s.timeout).connect_lazy();
                Ok(Transport::Grpc { grpc: tonic::client::Grpc::new(channel), metadata, timeout: s.timeout })
            }
            Protocol::HttpProtobuf => {
                let url = reqwest::Url::parse(&s.endpoint).map_err(|e| err(format!("invalid endpoint: {e}")))?;
                // As opentelemetry-otlp did: a header that is not a valid HTTP header is left out.
                let mut headers = reqwest::header::HeaderMap::new();
                for (k, v) in &s.headers {
                    match (reqwest::header::HeaderName::from_bytes(k.as_bytes()), reqwest::header::HeaderValue::from_str(v)) {
                        (Ok(k), Ok(v)) => {
                            headers.insert(k, v);
                        }
                        _ => tracing::warn!(header = %k, "not a valid HTTP header; not sent"),
                    }
                }
                let client = super::tls::http_builder(&s.tls)
                    .map_err(&err)?
                    .timeout(s.timeout)
                    .user_agent(concat!("zerotrace/", env!("CARGO_PKG_VERSION")))
                    .build()
                    .map_err(|e| err(format!("cannot build the HTTP client: {e}")))?;
                Ok(Transport::Http { client, url, headers, timeout: s.timeout })
            }
        }
    }

    /// Sends one encoded `ExportTraceServiceRequest`; Ok: how many of its spans the
    /// collector rejected (OTLP partial success); Err: why it failed.
    async fn send(&mut self, body: Bytes) -> Result<u64, Failure> {
        let timeout = match self {
            Transport::Grpc { timeout, .. } | Transport::Http { timeout, .. } => *timeout,
        };
        let response = match tokio::time::timeout(timeout, self.send_once(body)).await {
            Ok(r) => r?,
            Err(_) => return Err(Failure::transport(format!("no answer within {} ms", timeout.as_millis()))),
        };
        let rejected = response.partial_success.as_ref().map_or(0, |p| p.rejected_spans.max(0) as u64);
        if let Some(p) = response.partial_success.filter(|p| p.rejected_spans > 0 || !p.error_message.is_empty()) {
            static WARNED: AtomicBool = AtomicBool::new(false);
            if WARNED.swap(true, Relaxed) {
                tracing::debug!(rejected_spans = p.rejected_spans, message = %p.error_message, "the collector rejected spans");
            } else {
                tracing::warn!(rejected_spans = p.rejected_spans, message = %p.error_message, "the collector rejected spans (further rejections are logged at debug level)");
            }
        }
        Ok(rejected)
    }

    async fn send_once(&mut self, body: Bytes) -> Result<ExportTraceServiceResponse, Failure> {
        match self {
            Transport::Grpc { grpc, metadata, .. } => {
                grpc.ready().await.map_err(|e| Failure::transport(format!("gRPC channel not ready: {}", chain(&e))))?;
                let mut ext = tonic::Extensions::new();
                ext.insert(tonic::GrpcMethod::new(GRPC_SERVICE, "Export"));
                let req = tonic::Request::from_parts(metadata.clone(), ext, body);
                let path = tonic::codegen::http::uri::PathAndQuery::from_static(GRPC_PATH);
                grpc.unary(req, path, RawCodec).await.map(tonic::Response::into_inner).map_err(|st| {
                    // The collector's message can echo secrets (auth headers): the code
                    // only, and the cause when the error is local (connecting, timing out).
                    let why = match std::error::Error::source(&st) {
                        Some(src) => format!("gRPC status {:?}: {}", st.code(), chain(src)),
                        None => format!("gRPC status {:?}", st.code()),
                    };
                    grpc_failure(&st, why)
                })
            }
            Transport::Http { client, url, headers, .. } => {
                let resp = client
                    .post(url.clone())
                    .headers(headers.clone())
                    .header(reqwest::header::CONTENT_TYPE, "application/x-protobuf")
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| Failure::transport(format!("HTTP request failed: {}", chain(&e))))?;
                let status = resp.status();
                if !status.is_success() {
                    let retry_after = resp.headers().get(reqwest::header::RETRY_AFTER).and_then(|v| v.to_str().ok());
                    return Err(http_failure(status.as_u16(), retry_after, std::time::SystemTime::now()));
                }
                let bytes = resp.bytes().await.map_err(|e| Failure::transport(format!("HTTP response failed: {}", chain(&e))))?;
                Ok(ExportTraceServiceResponse::decode(bytes).unwrap_or_default())
            }
        }
    }
}

/// An error and its causes, "a: b: c".
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut next = e.source();
    while let Some(c) = next {
        let c_text = c.to_string();
        if !s.ends_with(&c_text) {
            s.push_str(": ");
            s.push_str(&c_text);
        }
        next = c.source();
    }
    s
}

/// A gRPC codec whose requests are already encoded (`encode::request`'s bytes).
#[derive(Clone, Copy, Default)]
struct RawCodec;

struct RawEncoder;

impl tonic::codec::Encoder for RawEncoder {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Codec for RawCodec {
    type Encode = Bytes;
    type Decode = ExportTraceServiceResponse;
    type Encoder = RawEncoder;
    type Decoder = tonic_prost::ProstDecoder<ExportTraceServiceResponse>;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

/// Each traced process's resource, encoded once. An entry is rebuilt when its process's
/// resource changed (a pid that now runs another program) and dropped after IDLE without
/// spans (a process long gone), so the set follows the processes traced.
struct EncodedResources {
    resources: Resources,
    by_pid: HashMap<u32, (Arc<EncodedResource>, Option<Resource>, Instant)>,
}

/// A resource unused this long is dropped (encoded again if its process sends spans again).
const IDLE: Duration = Duration::from_secs(300);

impl EncodedResources {
    fn get(&mut self, pid: u32) -> Arc<EncodedResource> {
        let current = self.resources.lock().ok().and_then(|r| r.get(&pid).cloned());
        if let Some((e, res, used)) = self.by_pid.get_mut(&pid)
            && (*res == current || current.is_none())
        {
            *used = Instant::now();
            return e.clone();
        }
        let e = Arc::new(EncodedResource::new(current.as_ref()));
        self.by_pid.insert(pid, (e.clone(), current, Instant::now()));
        e
    }

    /// Drops resources idle for IDLE that no export uses.
    fn evict_idle(&mut self) {
        self.by_pid.retain(|_, (e, _, used)| used.elapsed() < IDLE || Arc::strong_count(e) > 1);
    }
}

async fn run(
    rx: mpsc::Receiver<Vec<Span>>,
    queued: Arc<AtomicUsize>,
    s: ExportSettings,
    transport: Transport,
    resources: Resources,
    stats: Arc<ExportStats>,
    stop: Arc<tokio::sync::Notify>,
) {
    let mut in_flight = tokio::task::JoinSet::new();
    tokio::select! {
        biased;
        _ = stop.notified() => {}
        _ = gather(rx, queued, s, transport, resources, stats, &mut in_flight) => {}
    }
    // Stopped (or done): the exports still in flight are cancelled and waited for.
    in_flight.shutdown().await;
}

/// Gathers spans into per-process batches and exports them until the queue is closed and
/// everything in it was sent.
async fn gather(
    mut rx: mpsc::Receiver<Vec<Span>>,
    queued: Arc<AtomicUsize>,
    s: ExportSettings,
    transport: Transport,
    resources: Resources,
    stats: Arc<ExportStats>,
    in_flight: &mut tokio::task::JoinSet<()>,
) {
    let mut resources = EncodedResources { resources, by_pid: HashMap::default() };
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let failing = Arc::new(Mutex::new(Failing::default()));
    let mut batches: HashMap<u32, Vec<Span>> = HashMap::default();
    let mut open = true;
    let ctx = Ctx { transport, stats, failing };
    while open {
        // Wait for a first message, then gather until a batch is full or the delay is over.
        let Some(first) = rx.recv().await else { break };
        let deadline = tokio::time::Instant::now() + s.delay;
        // Spans gathered in partial batches (many processes, each below a batch): at most a
        // queue's worth (sent when reached). A message's spans count as queued until they
        // are in batches (counted before each wait), so memory stays within twice the queue
        // plus a few batches.
        let mut held = 0usize;
        let mut next = Some(first);
        while let Some(spans) = next.take() {
            let mut taken = 0usize;
            for span in spans {
                held += 1;
                taken += 1;
                let pid = span.pid;
                let b = batches.entry(pid).or_default();
                b.push(span);
                if b.len() >= s.batch {
                    held -= b.len();
                    let full = std::mem::take(b);
                    queued.fetch_sub(std::mem::take(&mut taken), Relaxed);
                    // Waiting for a free export slot is the backpressure: meanwhile the
                    // bounded queue fills and further spans are dropped and counted.
                    let permit = permits.clone().acquire_owned().await.expect("never closed");
                    spawn_export(in_flight, &ctx, resources.get(pid), full, permit, true);
                } else if held >= s.queue {
                    queued.fetch_sub(std::mem::take(&mut taken), Relaxed);
                    flush(&mut batches, &permits, in_flight, &ctx, &mut resources, true).await;
                    held = 0;
                }
            }
            queued.fetch_sub(taken, Relaxed);
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(spans)) => next = Some(spans),
                Ok(None) => open = false,
                Err(_) => {}
            }
        }
        flush(&mut batches, &permits, in_flight, &ctx, &mut resources, open).await;
        while in_flight.try_join_next().is_some() {}
        resources.evict_idle();
        batches.retain(|_, b| !b.is_empty());
    }
    // Closed: what is left goes out in full batches, one attempt each.
    let mut rest: HashMap<u32, Vec<Span>> = batches;
    while let Ok(spans) = rx.try_recv() {
        queued.fetch_sub(spans.len(), Relaxed);
        for span in spans {
            rest.entry(span.pid).or_default().push(span);
        }
    }
    for (pid, mut spans) in rest {
        while !spans.is_empty() {
            let chunk: Vec<Span> = spans.drain(..s.batch.max(1).min(spans.len())).collect();
            let permit = permits.clone().acquire_owned().await.expect("never closed");
            spawn_export(in_flight, &ctx, resources.get(pid), chunk, permit, false);
        }
    }
    while in_flight.join_next().await.is_some() {}
}

/// Sends every partial batch (each process's spans gathered so far).
async fn flush(
    batches: &mut HashMap<u32, Vec<Span>>,
    permits: &Arc<tokio::sync::Semaphore>,
    in_flight: &mut tokio::task::JoinSet<()>,
    ctx: &Ctx,
    resources: &mut EncodedResources,
    retry: bool,
) {
    for (pid, b) in batches.iter_mut().filter(|(_, b)| !b.is_empty()) {
        let permit = permits.clone().acquire_owned().await.expect("never closed");
        spawn_export(in_flight, ctx, resources.get(*pid), std::mem::take(b), permit, retry);
    }
}

/// What every export task shares.
struct Ctx {
    transport: Transport,
    stats: Arc<ExportStats>,
    failing: Arc<Mutex<Failing>>,
}

/// The collector's state as the export tasks see it: failing since when, and until when
/// it asked everyone to wait.
#[derive(Default)]
struct Failing {
    since: Option<Instant>,
    errors: u64,
    resume_at: Option<tokio::time::Instant>,
}

impl Failing {
    /// When the next request may go (a Retry-After still running), if later than now.
    fn hold(f: &Mutex<Failing>) -> Option<tokio::time::Instant> {
        let at = f.lock().expect("not poisoned").resume_at?;
        (at > tokio::time::Instant::now()).then_some(at)
    }
}

/// Encodes one process's batch and sends it in a task of its own, holding `permit` until
/// done.
fn spawn_export(
    set: &mut tokio::task::JoinSet<()>,
    ctx: &Ctx,
    resource: Arc<EncodedResource>,
    batch: Vec<Span>,
    permit: tokio::sync::OwnedSemaphorePermit,
    retry: bool,
) {
    if batch.is_empty() {
        return;
    }
    let (mut transport, stats, failing) = (ctx.transport.clone(), ctx.stats.clone(), ctx.failing.clone());
    set.spawn(async move {
        // Encoded once: retries send the same bytes, and the spans are freed now.
        let body = Bytes::from(encode::request(&resource, &batch));
        let n = batch.len() as u64;
        drop((batch, resource));
        send_batch(&mut transport, body, n, &stats, &failing, retry).await;
        drop(permit);
    });
}

/// Exports one encoded batch of `n` spans, retrying with backoff when `retry` is set and the
/// failure is worth another try; every span ends up exported or counted as dropped.
async fn send_batch(transport: &mut Transport, body: Bytes, n: u64, stats: &ExportStats, failing: &Mutex<Failing>, retry: bool) {
    let mut backoff = FIRST_BACKOFF;
    let attempts = if retry { MAX_ATTEMPTS } else { 1 };
    for attempt in 1..=attempts {
        // A collector that asked to wait gets nothing before then, from any task.
        while let Some(at) = Failing::hold(failing) {
            tokio::time::sleep_until(at).await;
        }
        let failure = match transport.send(body.clone()).await {
            Ok(rejected) => {
                let rejected = rejected.min(n);
                stats.exported.fetch_add(n - rejected, Relaxed);
                stats.dropped_rejected.fetch_add(rejected, Relaxed);
                let mut f = failing.lock().expect("not poisoned");
                if let Some(since) = f.since.take() {
                    tracing::info!(failed_requests = f.errors, down_for_s = since.elapsed().as_secs(), "OTLP export works again");
                    f.errors = 0;
                }
                return;
            }
            Err(e) => e,
        };
        stats.export_errors.fetch_add(1, Relaxed);
        {
            let mut f = failing.lock().expect("not poisoned");
            f.errors += 1;
            if f.since.is_none() {
                f.since = Some(Instant::now());
                match &failure {
                    Failure::Retry { .. } => {
                        tracing::warn!(error = %failure, "OTLP export failed; retrying with backoff, spans queue up (bounded) meanwhile")
                    }
                    Failure::Rejected { .. } => {
                        tracing::warn!(error = %failure, "the collector refused spans; they are dropped (spans_dropped_rejected), not sent again")
                    }
                    Failure::Unsupported { .. } => tracing::warn!(
                        error = %failure,
                        "the collector does not accept traces at this endpoint; spans are dropped (spans_dropped_rejected): check the endpoint"
                    ),
                }
            }
            if let Failure::Retry { after: Some(wait), .. } = &failure {
                stats.retry_after.fetch_add(1, Relaxed);
                let at = tokio::time::Instant::now() + *wait;
                if f.resume_at.is_none_or(|r| r < at) {
                    f.resume_at = Some(at);
                }
                if !wait.is_zero() {
                    tracing::debug!(wait_ms = wait.as_millis() as u64, "the collector asked to wait");
                }
            }
        }
        match failure {
            Failure::Retry { .. } if attempt < attempts => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Failure::Retry { .. } => {}
            Failure::Rejected { .. } | Failure::Unsupported { .. } => {
                stats.dropped_rejected.fetch_add(n, Relaxed);
                return;
            }
        }
    }
    stats.dropped_failed.fetch_add(n, Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        export::{Exporter, TlsSettings},
        spans::{SpanId, SpanKind, Status, TraceId},
    };

    fn span(i: u64) -> Span {
        Span {
            pid: 1 + (i % 3) as u32,
            trace_id: TraceId([1; 16]),
            span_id: SpanId((i + 1).to_be_bytes()),
            parent: None,
            parent_is_remote: false,
            trace_state: None,
            kind: SpanKind::Server,
            name: "GET".into(),
            start_unix_ns: 1,
            end_unix_ns: 2,
            attributes: Vec::new(),
            status: Status::Unset,
        }
    }

    /// A lot larger than the queue: what fits is queued, the rest dropped and counted, and at
    /// shutdown (the collector unreachable) every queued span is exported or dropped under
    /// one reason.
    #[test]
    fn every_span_offered_is_queued_or_dropped_once() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let settings = ExportSettings {
            exporter: Exporter::Otlp,
            protocol: Protocol::Grpc,
            endpoint: "http://127.0.0.1:9".into(),
            headers: Vec::new(),
            timeout: Duration::from_millis(200),
            queue: 10,
            batch: 4,
            delay: Duration::from_millis(20),
            tls: TlsSettings::default(),
        };
        let stats = Arc::new(ExportStats::default());
        let mut e = {
            let _g = rt.enter();
            OtlpExport::start(&settings, Default::default(), stats.clone()).unwrap()
        };
        let mut lot: Vec<Span> = (0..25).map(span).collect();
        e.offer_all(&mut lot);
        assert!(lot.is_empty() && lot.capacity() >= 25, "the caller's buffer is emptied and keeps its capacity");
        assert_eq!((stats.queued.load(Relaxed), stats.dropped_queue_full.load(Relaxed)), (10, 15));
        let mut more: Vec<Span> = (25..27).map(span).collect();
        e.offer_all(&mut more);
        let offered = 27;
        assert_eq!(stats.queued.load(Relaxed) + stats.dropped_queue_full.load(Relaxed), offered);
        rt.block_on(e.shutdown(Duration::from_secs(1)));
        assert_eq!(stats.unaccounted(), 0, "{stats:?}");
        assert_eq!(stats.exported.load(Relaxed), 0);
    }
}
