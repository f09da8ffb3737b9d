//! OTLP receivers for the tests: gRPC (tonic, opentelemetry-proto's generated service) and
//! HTTP/protobuf (a minimal HTTP/1.1 server), both decoding what the agent sends into flat
//! span records the tests assert on. Each runs on its own runtime thread and can be
//! stopped and restarted on the same port (a collector going down and coming back), or
//! told to misbehave for one signal (`Fault`: refuse with a status and Retry-After, answer
//! slowly, reset the connection), recording every export request it got (`attempts`).
//! Every request is also checked, whatever the test: no planted secret in it (`secrets`),
//! every attribute by the semantic conventions (`semconv`); a receiver dropped with a
//! finding fails its test.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use opentelemetry_proto::tonic::{
    collector::metrics::v1::{
        ExportMetricsServiceRequest, ExportMetricsServiceResponse,
        metrics_service_server::{MetricsService, MetricsServiceServer},
    },
    collector::profiles::v1development::{
        ExportProfilesServiceRequest, ExportProfilesServiceResponse,
        profiles_service_server::{ProfilesService, ProfilesServiceServer},
    },
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, any_value},
    metrics::v1::metric,
};
use prost::Message;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// One received span, flattened.
#[derive(Clone, Debug)]
pub struct RSpan {
    pub trace_id: String,
    pub span_id: String,
    /// Empty when the span is a root.
    pub parent_span_id: String,
    pub name: String,
    /// OTLP SpanKind: 2 = server, 3 = client.
    pub kind: i32,
    pub start_ns: u64,
    pub end_ns: u64,
    pub attrs: BTreeMap<String, String>,
    /// OTLP status code: 0 unset, 1 ok, 2 error.
    pub status: i32,
    pub resource: BTreeMap<String, String>,
    pub scope: String,
}

impl RSpan {
    pub fn attr(&self, k: &str) -> &str {
        self.attrs.get(k).map_or("", String::as_str)
    }
    pub fn res(&self, k: &str) -> &str {
        self.resource.get(k).map_or("", String::as_str)
    }
    pub fn duration(&self) -> Duration {
        Duration::from_nanos(self.end_ns.saturating_sub(self.start_ns))
    }
}

fn value(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Flattens one export request.
pub fn flatten(req: &ExportTraceServiceRequest) -> Vec<RSpan> {
    let mut out = Vec::new();
    for rs in &req.resource_spans {
        let resource: BTreeMap<String, String> = rs.resource.iter().flat_map(|r| &r.attributes).map(|kv| (kv.key.clone(), value(&kv.value))).collect();
        for ss in &rs.scope_spans {
            let scope = ss.scope.as_ref().map(|s| s.name.clone()).unwrap_or_default();
            for s in &ss.spans {
                out.push(RSpan {
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: hex(&s.parent_span_id),
                    name: s.name.clone(),
                    kind: s.kind,
                    start_ns: s.start_time_unix_nano,
                    end_ns: s.end_time_unix_nano,
                    attrs: s.attributes.iter().map(|kv| (kv.key.clone(), value(&kv.value))).collect(),
                    status: s.status.as_ref().map_or(0, |st| st.code),
                    resource: resource.clone(),
                    scope: scope.clone(),
                });
            }
        }
    }
    out
}

/// One received CPU sample (OTLP profiles), flattened through the request's dictionary.
#[derive(Clone, Debug)]
pub struct RSample {
    pub resource: BTreeMap<String, String>,
    /// Function names, leaf first (inlined functions first within a location).
    pub frames: Vec<String>,
    /// Hex ids of the linked span, empty when none.
    pub trace_id: String,
    pub span_id: String,
    pub attrs: BTreeMap<String, String>,
    pub values: Vec<i64>,
    pub timestamps: usize,
}

/// Flattens a profiles request. Indices out of range are errors (the dictionary's rules).
pub fn flatten_profiles(req: &ExportProfilesServiceRequest) -> Result<Vec<RSample>> {
    let Some(d) = &req.dictionary else { bail!("profiles request without a dictionary") };
    let st = |i: i32| -> Result<String> { d.string_table.get(usize::try_from(i)?).cloned().ok_or_else(|| anyhow::anyhow!("string index {i} out of range")) };
    let mut out = Vec::new();
    for rp in &req.resource_profiles {
        let resource: BTreeMap<String, String> = rp.resource.iter().flat_map(|r| &r.attributes).map(|kv| (kv.key.clone(), value(&kv.value))).collect();
        for sp in &rp.scope_profiles {
            for p in &sp.profiles {
                for s in &p.samples {
                    let stack = d.stack_table.get(usize::try_from(s.stack_index)?).ok_or_else(|| anyhow::anyhow!("stack index"))?;
                    let mut frames = Vec::new();
                    for &li in &stack.location_indices {
                        let loc = d.location_table.get(usize::try_from(li)?).ok_or_else(|| anyhow::anyhow!("location index {li}"))?;
                        for line in &loc.lines {
                            let f = d.function_table.get(usize::try_from(line.function_index)?).ok_or_else(|| anyhow::anyhow!("function index"))?;
                            frames.push(st(f.name_strindex)?);
                        }
                    }
                    let (mut trace_id, mut span_id) = (String::new(), String::new());
                    if s.link_index > 0 {
                        let l = d.link_table.get(usize::try_from(s.link_index)?).ok_or_else(|| anyhow::anyhow!("link index"))?;
                        trace_id = hex(&l.trace_id);
                        span_id = hex(&l.span_id);
                    }
                    let mut attrs = BTreeMap::new();
                    for &ai in &s.attribute_indices {
                        let a = d.attribute_table.get(usize::try_from(ai)?).ok_or_else(|| anyhow::anyhow!("attribute index"))?;
                        attrs.insert(st(a.key_strindex)?, value(&a.value));
                    }
                    out.push(RSample {
                        resource: resource.clone(),
                        frames,
                        trace_id,
                        span_id,
                        attrs,
                        values: s.values.clone(),
                        timestamps: s.timestamps_unix_nano.len(),
                    });
                }
            }
        }
    }
    Ok(out)
}

/// The three OTLP signals, each with its own export service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Signal {
    Traces,
    Metrics,
    Profiles,
}

/// What the receiver does with one signal's export requests instead of taking them (a
/// collector in trouble).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Refuse with this HTTP status (gRPC: its code as the OTLP specification maps them:
    /// 429 RESOURCE_EXHAUSTED, 503 UNAVAILABLE, 404 UNIMPLEMENTED, 400 INVALID_ARGUMENT,
    /// others INTERNAL) and, when set, a wait in seconds (HTTP `Retry-After`, gRPC
    /// `RetryInfo`).
    Status { http: u16, retry_after: Option<u64> },
    /// Take the request, but answer only after this long.
    Slow(Duration),
    /// Read the request, then reset the connection without an answer (HTTP receivers only).
    Reset,
}

/// One export request as the receiver got it.
#[derive(Clone, Debug)]
pub struct Attempt {
    pub at: Instant,
    pub signal: Signal,
    /// The fault it met, None when it was taken.
    pub fault: Option<Fault>,
    /// Spans in it (traces; 0 for the other signals).
    pub spans: usize,
}

fn span_count(req: &ExportTraceServiceRequest) -> usize {
    req.resource_spans.iter().flat_map(|r| &r.scope_spans).map(|s| s.spans.len()).sum()
}

#[derive(Default)]
struct Store {
    spans: Mutex<Vec<RSpan>>,
    profiles: Mutex<Vec<ExportProfilesServiceRequest>>,
    metrics: Mutex<Vec<RMetric>>,
    requests: AtomicUsize,
    /// Benchmark sink: count requests, decode nothing.
    discard: bool,
    /// Soak sink: count spans, keep none (hours of load would not fit in memory).
    count_only: bool,
    /// Benchmark sink for any exporter (zerotrace or the OpenTelemetry SDK): decode and
    /// count spans, check nothing (the checks hold zerotrace to its own conventions).
    unchecked: bool,
    /// Spans received (kept or not).
    span_total: AtomicUsize,
    /// Planted secrets (`secrets`) and semantic-conventions problems (`semconv`) found in
    /// what was received.
    findings: Mutex<Vec<String>>,
    faults: Mutex<BTreeMap<Signal, Fault>>,
    attempts: Mutex<Vec<Attempt>>,
}

impl Store {
    fn add_raw(&self, body: &[u8]) -> bool {
        if self.discard {
            self.requests.fetch_add(1, Ordering::SeqCst);
            return true;
        }
        match ExportTraceServiceRequest::decode(body) {
            Ok(req) => {
                self.add(&req);
                true
            }
            Err(_) => false,
        }
    }

    /// Records the planted secrets in one request's bytes and its semantic-conventions
    /// problems.
    fn scan(&self, signal: &str, bytes: &[u8], problems: Vec<String>) {
        let found: Vec<String> = crate::secrets::find(bytes).into_iter().map(|s| format!("{signal}: planted secret {s} exported")).chain(problems).collect();
        if !found.is_empty() {
            let mut l = self.findings.lock().unwrap();
            for f in found {
                if !l.contains(&f) && l.len() < 100 {
                    l.push(f);
                }
            }
        }
    }

    fn add(&self, req: &ExportTraceServiceRequest) {
        if !self.unchecked {
            self.scan("spans", &req.encode_to_vec(), crate::semconv::check_traces(req));
        }
        self.requests.fetch_add(1, Ordering::SeqCst);
        self.span_total.fetch_add(span_count(req), Ordering::SeqCst);
        if !self.count_only {
            self.spans.lock().unwrap().extend(flatten(req));
        }
    }

    /// Records one export request of `signal`; returns the fault it meets, if any.
    fn arrive(&self, signal: Signal, spans: usize) -> Option<Fault> {
        // A benchmark sink neither keeps a record nor misbehaves.
        if self.discard {
            return None;
        }
        let fault = self.faults.lock().unwrap().get(&signal).copied();
        self.attempts.lock().unwrap().push(Attempt { at: Instant::now(), signal, fault, spans });
        fault
    }

    /// For the gRPC services: Err(status) for a refusal, after waiting out a slow answer.
    async fn grpc_fault(&self, signal: Signal, spans: usize) -> Result<(), tonic::Status> {
        use tonic_types::{ErrorDetails, StatusExt};
        match self.arrive(signal, spans) {
            None | Some(Fault::Reset) => Ok(()),
            Some(Fault::Slow(d)) => {
                tokio::time::sleep(d).await;
                Ok(())
            }
            Some(Fault::Status { http, retry_after }) => {
                let code = match http {
                    429 => tonic::Code::ResourceExhausted,
                    503 => tonic::Code::Unavailable,
                    404 => tonic::Code::Unimplemented,
                    400 => tonic::Code::InvalidArgument,
                    _ => tonic::Code::Internal,
                };
                Err(match retry_after {
                    Some(secs) => tonic::Status::with_error_details(code, "test fault", ErrorDetails::with_retry_info(Some(Duration::from_secs(secs)))),
                    None => tonic::Status::new(code, "test fault"),
                })
            }
        }
    }
}

struct Svc(Arc<Store>);

/// One received metric data point, flattened: histograms give count and sum, sums a value.
#[derive(Clone, Debug)]
pub struct RMetric {
    pub name: String,
    pub unit: String,
    pub resource: BTreeMap<String, String>,
    pub attrs: BTreeMap<String, String>,
    pub count: u64,
    pub sum: f64,
    pub value: i64,
    pub time_ns: u64,
}

impl RMetric {
    /// An attribute's value, "" when absent.
    pub fn attr(&self, k: &str) -> &str {
        self.attrs.get(k).map_or("", String::as_str)
    }
}

fn flatten_metrics(req: &ExportMetricsServiceRequest) -> Vec<RMetric> {
    let mut out = Vec::new();
    for rm in &req.resource_metrics {
        let resource: BTreeMap<String, String> = rm.resource.iter().flat_map(|r| &r.attributes).map(|kv| (kv.key.clone(), value(&kv.value))).collect();
        for sm in &rm.scope_metrics {
            for m in &sm.metrics {
                let base = |attrs: &[opentelemetry_proto::tonic::common::v1::KeyValue], time_ns| RMetric {
                    name: m.name.clone(),
                    unit: m.unit.clone(),
                    resource: resource.clone(),
                    attrs: attrs.iter().map(|kv| (kv.key.clone(), value(&kv.value))).collect(),
                    count: 0,
                    sum: 0.0,
                    value: 0,
                    time_ns,
                };
                match &m.data {
                    Some(metric::Data::Histogram(h)) => {
                        for p in &h.data_points {
                            out.push(RMetric { count: p.count, sum: p.sum.unwrap_or(0.0), ..base(&p.attributes, p.time_unix_nano) });
                        }
                    }
                    Some(metric::Data::Sum(s)) => {
                        for p in &s.data_points {
                            let v = match p.value {
                                Some(opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsInt(i)) => i,
                                Some(opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsDouble(d)) => d as i64,
                                None => 0,
                            };
                            out.push(RMetric { value: v, ..base(&p.attributes, p.time_unix_nano) });
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    out
}

#[tonic::async_trait]
impl MetricsService for Svc {
    async fn export(&self, req: tonic::Request<ExportMetricsServiceRequest>) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.0.grpc_fault(Signal::Metrics, 0).await?;
        self.0.scan("metrics", &req.get_ref().encode_to_vec(), crate::semconv::check_metrics(req.get_ref()));
        self.0.metrics.lock().unwrap().extend(flatten_metrics(req.get_ref()));
        Ok(tonic::Response::new(ExportMetricsServiceResponse { partial_success: None }))
    }
}

#[tonic::async_trait]
impl ProfilesService for Svc {
    async fn export(&self, req: tonic::Request<ExportProfilesServiceRequest>) -> Result<tonic::Response<ExportProfilesServiceResponse>, tonic::Status> {
        self.0.grpc_fault(Signal::Profiles, 0).await?;
        self.0.scan("profiles", &req.get_ref().encode_to_vec(), crate::semconv::check_profiles(req.get_ref()));
        self.0.profiles.lock().unwrap().push(req.into_inner());
        Ok(tonic::Response::new(ExportProfilesServiceResponse { partial_success: None }))
    }
}

#[tonic::async_trait]
impl TraceService for Svc {
    async fn export(&self, req: tonic::Request<ExportTraceServiceRequest>) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.grpc_fault(Signal::Traces, span_count(req.get_ref())).await?;
        self.0.add(req.get_ref());
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Grpc,
    Http,
}

pub struct Receiver {
    pub port: u16,
    pub kind: Kind,
    store: Arc<Store>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Receiver {
    /// Starts a receiver on 127.0.0.1:`port` (0: any free port).
    pub fn start(kind: Kind, port: u16) -> Result<Receiver> {
        Self::start_with(kind, port, Arc::new(Store::default()))
    }

    /// An OTLP http/protobuf sink that accepts and discards (for benchmarks: it costs the
    /// machine almost nothing, so what is measured is the agent).
    pub fn start_discarding(port: u16) -> Result<Receiver> {
        Self::start_with(Kind::Http, port, Arc::new(Store { discard: true, ..Store::default() }))
    }

    /// A receiver that counts the spans it gets and keeps none (`spans_count`).
    pub fn start_counting(kind: Kind) -> Result<Receiver> {
        Self::start_with(kind, 0, Arc::new(Store { count_only: true, ..Store::default() }))
    }

    /// A benchmark sink for zerotrace and the OpenTelemetry SDK alike: decodes every export
    /// request and counts its spans (`spans_count`), keeps and checks none.
    pub fn start_bench_sink(kind: Kind) -> Result<Receiver> {
        Self::start_with(kind, 0, Arc::new(Store { count_only: true, unchecked: true, ..Store::default() }))
    }

    /// A gRPC receiver over TLS (https): `identity` is the server's (certificate, key) PEM;
    /// with `client_ca`, clients must present a certificate it signed (mTLS).
    pub fn start_tls(identity: (&str, &str), client_ca: Option<&str>) -> Result<Receiver> {
        let mut tls = tonic::transport::ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(identity.0, identity.1));
        if let Some(ca) = client_ca {
            tls = tls.client_ca_root(tonic::transport::Certificate::from_pem(ca));
        }
        let r = Self::start_inner(Kind::Grpc, 0, Arc::new(Store::default()), Some(tls))?;
        Ok(r)
    }

    fn start_with(kind: Kind, port: u16, store: Arc<Store>) -> Result<Receiver> {
        Self::start_inner(kind, port, store, None)
    }

    fn start_inner(kind: Kind, port: u16, store: Arc<Store>, tls: Option<tonic::transport::ServerTlsConfig>) -> Result<Receiver> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        let listener = rt.block_on(tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))))?;
        let port = listener.local_addr()?.port();
        let st = store.clone();
        match kind {
            Kind::Grpc => {
                let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
                let mut server = tonic::transport::Server::builder();
                if let Some(tls) = tls {
                    server = server.tls_config(tls)?;
                }
                rt.spawn(async move {
                    let _ = server
                        .add_service(TraceServiceServer::new(Svc(st.clone())).max_decoding_message_size(64 << 20))
                        .add_service(MetricsServiceServer::new(Svc(st.clone())).max_decoding_message_size(64 << 20))
                        .add_service(ProfilesServiceServer::new(Svc(st)).max_decoding_message_size(64 << 20))
                        .serve_with_incoming(incoming)
                        .await;
                });
            }
            Kind::Http => {
                rt.spawn(async move {
                    while let Ok((sock, _)) = listener.accept().await {
                        let st = st.clone();
                        tokio::spawn(async move {
                            let _ = serve_http(sock, st).await;
                        });
                    }
                });
            }
        }
        Ok(Receiver { port, kind, store, rt: Some(rt) })
    }

    pub fn endpoint(&self) -> String {
        match self.kind {
            Kind::Grpc => format!("http://127.0.0.1:{}", self.port),
            Kind::Http => format!("http://127.0.0.1:{}/v1/traces", self.port),
        }
    }

    /// Every metric data point received (cumulative: later points carry the totals).
    pub fn metrics(&self) -> Vec<RMetric> {
        self.store.metrics.lock().unwrap().clone()
    }

    /// Every profiles request received.
    pub fn profile_requests(&self) -> Vec<ExportProfilesServiceRequest> {
        self.store.profiles.lock().unwrap().clone()
    }

    /// Every CPU sample received, flattened (an error when a request breaks the
    /// dictionary's index rules).
    pub fn samples(&self) -> Result<Vec<RSample>> {
        let mut out = Vec::new();
        for r in self.profile_requests() {
            out.extend(flatten_profiles(&r)?);
        }
        Ok(out)
    }

    pub fn spans(&self) -> Vec<RSpan> {
        self.store.spans.lock().unwrap().clone()
    }

    /// Waits until `want` spans have arrived or their count stopped moving for 250 ms, for
    /// at most `polls` such periods (every span the agent will send has arrived then);
    /// returns the count.
    pub fn settle(&self, want: u64, polls: u32) -> u64 {
        let mut last = u64::MAX;
        for _ in 0..polls {
            std::thread::sleep(std::time::Duration::from_millis(250));
            let n = self.spans_count() as u64;
            if n >= want || n == last {
                return n;
            }
            last = n;
        }
        self.spans_count() as u64
    }

    /// Spans received so far (also by a counting receiver).
    pub fn spans_count(&self) -> usize {
        self.store.span_total.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> usize {
        self.store.requests.load(Ordering::SeqCst)
    }

    /// From now on, `signal`'s export requests meet `fault` (None: taken again).
    pub fn set_fault(&self, signal: Signal, fault: Option<Fault>) {
        assert!(!(fault == Some(Fault::Reset) && self.kind == Kind::Grpc), "the gRPC receiver cannot reset connections");
        let mut f = self.store.faults.lock().unwrap();
        match fault {
            Some(fault) => f.insert(signal, fault),
            None => f.remove(&signal),
        };
    }

    /// Every export request received so far, taken or not, in order of arrival.
    pub fn attempts(&self) -> Vec<Attempt> {
        self.store.attempts.lock().unwrap().clone()
    }

    /// Waits until `signal` has had at least `n` export requests; returns them.
    pub fn wait_for_attempts(&self, signal: Signal, n: usize, timeout: Duration) -> Result<Vec<Attempt>> {
        let end = Instant::now() + timeout;
        loop {
            let got: Vec<Attempt> = self.attempts().into_iter().filter(|a| a.signal == signal).collect();
            if got.len() >= n {
                return Ok(got);
            }
            if Instant::now() > end {
                bail!("received {} {signal:?} export requests, expected {n}, within {timeout:?}", got.len());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until at least `n` spans arrived; returns all of them.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Result<Vec<RSpan>> {
        let end = Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if spans.len() >= n {
                return Ok(spans);
            }
            if Instant::now() > end {
                bail!("received {} spans, expected {n}, within {timeout:?}", spans.len());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Stops listening (connections are dropped): the collector is down.
    pub fn stop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }

    /// Listens again on the same port, keeping what was received: the collector is back.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        let again = Self::start_with(self.kind, self.port, self.store.clone())?;
        let mut again = again;
        self.rt = again.rt.take();
        // The stand-in shares this one's store: its drop must not report what this one will.
        again.store = Arc::new(Store::default());
        Ok(())
    }
}

impl Drop for Receiver {
    /// Stops it; planted secrets or semantic-conventions problems in what it received fail
    /// the test that owns it.
    fn drop(&mut self) {
        self.stop();
        let findings = self.store.findings.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        if !findings.is_empty() {
            // Printed first: a test that already failed keeps its own error, and shows these.
            eprintln!("what the agent exported breaks a rule of every test:\n{}", findings.join("\n"));
            if !std::thread::panicking() {
                panic!("what the agent exported breaks a rule of every test (above)");
            }
        }
    }
}

/// POST /v1/traces (or /v1/metrics) with a protobuf body; answers 200 with an empty
/// response message.
async fn serve_http(sock: tokio::net::TcpStream, store: Arc<Store>) -> Result<()> {
    let mut r = BufReader::new(sock);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            r.read_line(&mut h).await?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':')
                && k.trim().eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body).await?;
        let signal = if line.starts_with("POST /v1development/profiles ") {
            Signal::Profiles
        } else if line.starts_with("POST /v1/metrics ") {
            Signal::Metrics
        } else {
            Signal::Traces
        };
        let spans = match signal {
            Signal::Traces if !store.discard => ExportTraceServiceRequest::decode(body.as_slice()).map_or(0, |r| span_count(&r)),
            _ => 0,
        };
        match store.arrive(signal, spans) {
            None => {}
            Some(Fault::Slow(d)) => tokio::time::sleep(d).await,
            Some(Fault::Reset) => {
                // SO_LINGER 0: closing sends a reset, not a FIN.
                r.get_ref().set_zero_linger()?;
                return Ok(());
            }
            Some(Fault::Status { http, retry_after }) => {
                let wait = retry_after.map(|s| format!("Retry-After: {s}\r\n")).unwrap_or_default();
                let head = format!("HTTP/1.1 {http} Test Fault\r\n{wait}Content-Length: 0\r\n\r\n");
                r.get_mut().write_all(head.as_bytes()).await?;
                continue;
            }
        }
        let ok = if line.starts_with("POST /v1development/profiles ") {
            match ExportProfilesServiceRequest::decode(body.as_slice()) {
                Ok(req) => {
                    store.scan("profiles", &body, crate::semconv::check_profiles(&req));
                    store.profiles.lock().unwrap().push(req);
                    true
                }
                Err(_) => false,
            }
        } else if line.starts_with("POST /v1/metrics ") {
            match ExportMetricsServiceRequest::decode(body.as_slice()) {
                Ok(req) => {
                    store.scan("metrics", &body, crate::semconv::check_metrics(&req));
                    store.metrics.lock().unwrap().extend(flatten_metrics(&req));
                    true
                }
                Err(_) => false,
            }
        } else {
            line.starts_with("POST /v1/traces ") && store.add_raw(&body)
        };
        let status = if ok { "200 OK" } else { "400 Bad Request" };
        let resp = ExportTraceServiceResponse { partial_success: None }.encode_to_vec();
        let head = format!("HTTP/1.1 {status}\r\nContent-Type: application/x-protobuf\r\nContent-Length: {}\r\n\r\n", resp.len());
        r.get_mut().write_all(head.as_bytes()).await?;
        r.get_mut().write_all(&resp).await?;
    }
}
