//! OTLP export with opentelemetry-otlp: a bounded queue (drops counted, the pipeline never
//! waits), batches per traced process (each process is its own resource and has its own
//! exporter) by size or delay, up to MAX_IN_FLIGHT export requests at once, and retries with
//! exponential backoff while the collector is down. When it comes back, export resumes with
//! whatever is queued then.
use std::{
    borrow::Cow,
    collections::HashMap,
    sync::{Arc, Mutex, atomic::Ordering::Relaxed},
    time::{Duration, Instant, SystemTime},
};

use opentelemetry::{
    InstrumentationScope, KeyValue,
    trace::{SpanContext, SpanId as OtelSpanId, SpanKind as OtelKind, Status as OtelStatus, TraceFlags, TraceId as OtelTraceId, TraceState},
};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::{
    Resource,
    trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks},
};
use tokio::sync::mpsc;

use super::{ExportStats, resource::AttrValue};
use crate::{
    cli::Protocol,
    settings::ExportSettings,
    spans::{Span, SpanKind, Status, Value},
};

/// Retries of one batch before it is dropped, and the backoff between them.
const MAX_ATTEMPTS: u32 = 6;
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot set up the OTLP exporter for {endpoint}: {reason}")]
    Build { endpoint: String, reason: String },
}

/// Resources of traced processes, by pid, shared with the run loop that discovers them.
pub type Resources = Arc<Mutex<HashMap<u32, Resource>>>;

pub fn resource(attrs: &[(String, AttrValue)]) -> Resource {
    Resource::builder_empty()
        .with_attributes(attrs.iter().map(|(k, v)| match v {
            AttrValue::Str(s) => KeyValue::new(k.clone(), s.clone()),
            AttrValue::Int(i) => KeyValue::new(k.clone(), *i),
        }))
        .build()
}

/// Export requests in flight at once (each a batch of one process's spans).
const MAX_IN_FLIGHT: usize = 4;

pub struct OtlpExport {
    tx: Option<mpsc::Sender<Span>>,
    task: tokio::task::JoinHandle<()>,
    pub stats: Arc<ExportStats>,
}

impl OtlpExport {
    pub fn start(settings: &ExportSettings, resources: Resources, stats: Arc<ExportStats>) -> Result<Self, ExportError> {
        // Fail early on a configuration the exporter cannot use.
        drop(build(settings)?);
        let (tx, rx) = mpsc::channel(settings.queue);
        let task = tokio::spawn(run(rx, settings.clone(), resources, stats.clone()));
        Ok(Self { tx: Some(tx), task, stats })
    }

    /// Queues a span; never waits. A full queue drops the span and counts it.
    pub fn offer(&self, span: Span) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(span) {
            Ok(()) => {
                self.stats.queued.fetch_add(1, Relaxed);
            }
            Err(_) => {
                self.stats.dropped_queue_full.fetch_add(1, Relaxed);
            }
        }
    }

    /// Sends what is queued, waiting at most `deadline`.
    pub async fn shutdown(mut self, deadline: Duration) {
        self.tx = None;
        if tokio::time::timeout(deadline, &mut self.task).await.is_err() {
            tracing::warn!(seconds = deadline.as_secs(), "export did not finish in time; remaining spans are dropped");
            self.task.abort();
        }
    }
}

fn build(s: &ExportSettings) -> Result<opentelemetry_otlp::SpanExporter, ExportError> {
    let err = |e: opentelemetry_otlp::ExporterBuildError| ExportError::Build { endpoint: s.endpoint.clone(), reason: e.to_string() };
    match s.protocol {
        Protocol::Grpc => {
            let mut md = tonic::metadata::MetadataMap::new();
            for (k, v) in &s.headers {
                let key = tonic::metadata::MetadataKey::from_bytes(k.to_ascii_lowercase().as_bytes())
                    .map_err(|_| ExportError::Build { endpoint: s.endpoint.clone(), reason: format!("invalid header name {k:?}") })?;
                let val = v.parse().map_err(|_| ExportError::Build { endpoint: s.endpoint.clone(), reason: format!("invalid header value for {k}") })?;
                md.insert(key, val);
            }
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(s.endpoint.clone())
                .with_timeout(s.timeout)
                .with_metadata(md)
                .build()
                .map_err(err)
        }
        Protocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(s.endpoint.clone())
            .with_timeout(s.timeout)
            .with_headers(s.headers.iter().cloned().collect())
            .build()
            .map_err(err),
    }
}

/// One exporter per traced process: its resource is fixed, so exports of different
/// processes can be in flight together. An exporter is rebuilt when its process's resource
/// changed (a pid that now runs another program) and dropped after IDLE without spans (a
/// process long gone), so the set follows the processes traced.
struct Exporters {
    settings: ExportSettings,
    resources: Resources,
    by_pid: HashMap<u32, (Arc<opentelemetry_otlp::SpanExporter>, Option<Resource>, Instant)>,
}

/// An exporter unused this long is dropped (rebuilt if its process sends spans again).
const IDLE: Duration = Duration::from_secs(300);

impl Exporters {
    fn get(&mut self, pid: u32) -> Option<Arc<opentelemetry_otlp::SpanExporter>> {
        let current = self.resources.lock().ok().and_then(|r| r.get(&pid).cloned());
        if let Some((e, res, used)) = self.by_pid.get_mut(&pid) {
            if *res == current || current.is_none() {
                *used = Instant::now();
                return Some(e.clone());
            }
        }
        let mut e = match build(&self.settings) {
            Ok(e) => e,
            Err(err) => {
                tracing::warn!(error = %err, "cannot build an OTLP exporter");
                return None;
            }
        };
        if let Some(r) = &current {
            e.set_resource(r);
        }
        let e = Arc::new(e);
        self.by_pid.insert(pid, (e.clone(), current, Instant::now()));
        Some(e)
    }

    /// Drops exporters idle for IDLE that no export uses.
    fn evict_idle(&mut self) {
        self.by_pid.retain(|_, (e, _, used)| used.elapsed() < IDLE || Arc::strong_count(e) > 1);
    }
}

async fn run(mut rx: mpsc::Receiver<Span>, s: ExportSettings, resources: Resources, stats: Arc<ExportStats>) {
    let mut exporters = Exporters { settings: s.clone(), resources, by_pid: HashMap::new() };
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let failing = Arc::new(Mutex::new(Failing::default()));
    let mut in_flight = tokio::task::JoinSet::new();
    let mut batches: HashMap<u32, Vec<Span>> = HashMap::new();
    let mut open = true;
    while open {
        // Wait for a first span, then gather until a batch is full or the delay is over.
        match rx.recv().await {
            Some(span) => batches.entry(span.pid).or_default().push(span),
            None => break,
        }
        let deadline = tokio::time::Instant::now() + s.delay;
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(span)) => {
                    let pid = span.pid;
                    let b = batches.entry(pid).or_default();
                    b.push(span);
                    if b.len() >= s.batch {
                        let full = std::mem::take(b);
                        // Waiting for a free export slot is the backpressure: meanwhile the
                        // bounded queue fills and further spans are dropped and counted.
                        let permit = permits.clone().acquire_owned().await.expect("never closed");
                        spawn_export(&mut in_flight, &mut exporters, pid, full, permit, &stats, &failing, true);
                    }
                }
                Ok(None) => {
                    open = false;
                    break;
                }
                Err(_) => break,
            }
        }
        for (pid, b) in batches.iter_mut().filter(|(_, b)| !b.is_empty()) {
            let permit = permits.clone().acquire_owned().await.expect("never closed");
            spawn_export(&mut in_flight, &mut exporters, *pid, std::mem::take(b), permit, &stats, &failing, open);
        }
        while in_flight.try_join_next().is_some() {}
        exporters.evict_idle();
        batches.retain(|_, b| !b.is_empty());
    }
    // Closed: what is left goes out in full batches, one attempt each.
    let mut rest: HashMap<u32, Vec<Span>> = batches;
    while let Ok(span) = rx.try_recv() {
        rest.entry(span.pid).or_default().push(span);
    }
    for (pid, spans) in rest {
        for chunk in spans.chunks(s.batch.max(1)) {
            let permit = permits.clone().acquire_owned().await.expect("never closed");
            spawn_export(&mut in_flight, &mut exporters, pid, chunk.to_vec(), permit, &stats, &failing, false);
        }
    }
    while in_flight.join_next().await.is_some() {}
    for (e, _, _) in exporters.by_pid.values() {
        let _ = e.shutdown();
    }
}

#[derive(Default)]
struct Failing {
    since: Option<Instant>,
    errors: u64,
}

#[allow(clippy::too_many_arguments)]
fn spawn_export(
    set: &mut tokio::task::JoinSet<()>,
    exporters: &mut Exporters,
    pid: u32,
    batch: Vec<Span>,
    permit: tokio::sync::OwnedSemaphorePermit,
    stats: &Arc<ExportStats>,
    failing: &Arc<Mutex<Failing>>,
    retry: bool,
) {
    if batch.is_empty() {
        return;
    }
    let Some(exporter) = exporters.get(pid) else {
        stats.dropped_failed.fetch_add(batch.len() as u64, Relaxed);
        return;
    };
    let (stats, failing) = (stats.clone(), failing.clone());
    set.spawn(async move {
        send_batch(&exporter, &batch, &stats, &failing, retry).await;
        drop(permit);
    });
}

/// Exports one process's batch, retrying with backoff when `retry` is set.
async fn send_batch(
    exporter: &opentelemetry_otlp::SpanExporter,
    batch: &[Span],
    stats: &ExportStats,
    failing: &Mutex<Failing>,
    retry: bool,
) {
    let mut backoff = FIRST_BACKOFF;
    let attempts = if retry { MAX_ATTEMPTS } else { 1 };
    for attempt in 1..=attempts {
        let data: Vec<SpanData> = batch.iter().map(to_span_data).collect();
        match exporter.export(data).await {
            Ok(()) => {
                stats.exported.fetch_add(batch.len() as u64, Relaxed);
                let mut f = failing.lock().expect("not poisoned");
                if let Some(since) = f.since.take() {
                    tracing::info!(failed_requests = f.errors, down_for_s = since.elapsed().as_secs(), "OTLP export works again");
                    f.errors = 0;
                }
                return;
            }
            Err(e) => {
                stats.export_errors.fetch_add(1, Relaxed);
                {
                    let mut f = failing.lock().expect("not poisoned");
                    f.errors += 1;
                    if f.since.is_none() {
                        f.since = Some(Instant::now());
                        tracing::warn!(error = %e, "OTLP export failed; retrying with backoff, spans queue up (bounded) meanwhile");
                    }
                }
                if attempt < attempts {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
    stats.dropped_failed.fetch_add(batch.len() as u64, Relaxed);
}

fn to_time(unix_ns: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_nanos(unix_ns)
}

pub fn to_span_data(s: &Span) -> SpanData {
    let trace_state = s
        .trace_state
        .as_deref()
        .and_then(|t| t.parse::<TraceState>().ok())
        .unwrap_or_default();
    SpanData {
        span_context: SpanContext::new(
            OtelTraceId::from_bytes(s.trace_id.0),
            OtelSpanId::from_bytes(s.span_id.0),
            TraceFlags::SAMPLED,
            false,
            trace_state,
        ),
        parent_span_id: s.parent.map_or(OtelSpanId::INVALID, |p| OtelSpanId::from_bytes(p.0)),
        parent_span_is_remote: s.parent_is_remote,
        span_kind: match s.kind {
            SpanKind::Server => OtelKind::Server,
            SpanKind::Client => OtelKind::Client,
            SpanKind::Internal => OtelKind::Internal,
        },
        name: Cow::Owned(s.name.clone()),
        start_time: to_time(s.start_unix_ns),
        end_time: to_time(s.end_unix_ns),
        attributes: s
            .attributes
            .iter()
            .map(|(k, v)| match v {
                Value::Str(x) => KeyValue::new(*k, x.clone()),
                Value::Static(x) => KeyValue::new(*k, *x),
                Value::Shared(x) => KeyValue::new(*k, opentelemetry::StringValue::from(x.clone())),
                Value::Int(i) => KeyValue::new(*k, *i),
            })
            .collect(),
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: match &s.status {
            Status::Unset => OtelStatus::Unset,
            Status::Error(d) => OtelStatus::error(d.clone()),
        },
        instrumentation_scope: scope(),
    }
}

fn scope() -> InstrumentationScope {
    static SCOPE: std::sync::OnceLock<InstrumentationScope> = std::sync::OnceLock::new();
    SCOPE
        .get_or_init(|| InstrumentationScope::builder("zerotrace").with_version(env!("CARGO_PKG_VERSION")).build())
        .clone()
}
