//! RED metrics and the agent's own counters over OTLP metrics. Every finished span (after
//! sampling) adds its duration to a histogram of its process, per current semantic
//! conventions: `http.server.request.duration` (method, route, status code, scheme,
//! protocol version, error.type), `http.client.request.duration` (method, server address and
//! port, status code, error.type), `db.client.operation.duration` (db system, query
//! summary, response status code, error.type, server address and port) and `rpc.server.call.duration` /
//! `rpc.client.call.duration` (rpc system, method, status code, error.type; the client's
//! also server address and port), in seconds, low-cardinality attributes only (the route, never the
//! raw path). Cumulative temporality: a failed export loses nothing, the next one carries
//! the totals. The agent's counters go out as `zerotrace_<name>` sums under the agent's own
//! resource (service.name = zerotrace). Aggregation and encoding are ours (a few histogram
//! series per route), the wire types are opentelemetry-proto's.
use std::{
    collections::hash_map::Entry,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use opentelemetry_proto::tonic::{
    collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse},
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    metrics::v1::{
        AggregationTemporality, Histogram, HistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum, metric, number_data_point,
    },
    resource::v1::Resource as ProtoResource,
};

use rustc_hash::FxHashMap as HashMap;

use super::{ExportSettings, resource::Resources};
use crate::spans::{Span, SpanKind, Status, Value};

/// Bucket boundaries of duration histograms (seconds), as the HTTP semantic conventions
/// recommend.
pub const BOUNDS: [f64; 14] = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0];
/// Database operations: the database semantic conventions' boundaries (as many buckets).
pub const DB_BOUNDS: [f64; 14] = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 7.5, 10.0];

fn bounds_of(metric: &str) -> &'static [f64; 14] {
    if metric == "db.client.operation.duration" { &DB_BOUNDS } else { &BOUNDS }
}
/// Series (process, metric, attribute set) kept at most; more are dropped and counted.
pub const MAX_SERIES: usize = 16_384;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Attr {
    Str(String),
    Int(i64),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SeriesKey {
    pid: u32,
    metric: &'static str,
    attrs: Vec<(&'static str, Attr)>,
}

#[derive(Clone, Debug, Default)]
struct Hist {
    counts: [u64; BOUNDS.len() + 1],
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
}

/// Histograms of finished spans.
#[derive(Debug, Default)]
pub struct Red {
    series: HashMap<SeriesKey, Hist>,
    pub dropped_series: u64,
}

fn attr(s: &Span, key: &'static str) -> Option<(&'static str, Attr)> {
    s.attr(key).map(|v| {
        (
            key,
            match v {
                Value::Int(i) => Attr::Int(*i),
                other => Attr::Str(other.to_string()),
            },
        )
    })
}

impl Red {
    /// Adds a finished span to its histogram (spans that are neither HTTP nor database
    /// calls are not counted).
    pub fn record(&mut self, s: &Span) {
        let (metric, keys): (&'static str, &[&'static str]) = match s.kind {
            SpanKind::Server if s.attr("rpc.system.name").is_some() => {
                ("rpc.server.call.duration", &["rpc.system.name", "rpc.method", "rpc.response.status_code", "error.type"])
            }
            SpanKind::Client if s.attr("rpc.system.name").is_some() => {
                ("rpc.client.call.duration", &["rpc.system.name", "rpc.method", "rpc.response.status_code", "error.type", "server.address", "server.port"])
            }
            SpanKind::Server if s.attr("http.request.method").is_some() => (
                "http.server.request.duration",
                &["http.request.method", "http.route", "http.response.status_code", "url.scheme", "network.protocol.version", "error.type"],
            ),
            SpanKind::Client if s.attr("db.system.name").is_some() => (
                "db.client.operation.duration",
                &["db.system.name", "db.query.summary", "db.response.status_code", "error.type", "server.address", "server.port"],
            ),
            SpanKind::Client if s.attr("http.request.method").is_some() => {
                ("http.client.request.duration", &["http.request.method", "server.address", "server.port", "http.response.status_code", "error.type"])
            }
            _ => return,
        };
        let mut attrs: Vec<(&'static str, Attr)> = keys.iter().filter_map(|k| attr(s, k)).collect();
        // A server error without an error.type (a 5xx): the status code is the type.
        if matches!(s.status, Status::Error(_))
            && !attrs.iter().any(|(k, _)| *k == "error.type")
            && let Some(code) = s.attr("http.response.status_code")
        {
            attrs.push(("error.type", Attr::Str(code.to_string())));
        }
        let key = SeriesKey { pid: s.pid, metric, attrs };
        let full = self.series.len() >= MAX_SERIES;
        let h = match self.series.entry(key) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(_) if full => {
                self.dropped_series += 1;
                return;
            }
            Entry::Vacant(e) => e.insert(Hist::default()),
        };
        let secs = s.duration_ns() as f64 / 1e9;
        let bounds = bounds_of(metric);
        let bucket = bounds.iter().position(|b| secs <= *b).unwrap_or(bounds.len());
        h.counts[bucket] += 1;
        if h.count == 0 || secs < h.min {
            h.min = secs;
        }
        if h.count == 0 || secs > h.max {
            h.max = secs;
        }
        h.count += 1;
        h.sum += secs;
    }

    /// Processes whose series are gone with them.
    pub fn forget_pid(&mut self, pid: u32) {
        self.series.retain(|k, _| k.pid != pid);
    }
}

/// A resource's attributes as OTLP key-values (integers stay integers, the rest strings):
/// the resource of a process in metrics and profiles.
pub fn proto_attributes(r: &opentelemetry_sdk::Resource) -> Vec<KeyValue> {
    r.iter()
        .map(|(k, v)| {
            let v = match v {
                opentelemetry::Value::I64(i) => any_value::Value::IntValue(*i),
                other => any_value::Value::StringValue(other.to_string()),
            };
            kv(k.as_str(), v)
        })
        .collect()
}

fn kv(key: &str, v: any_value::Value) -> KeyValue {
    KeyValue { key: key.to_owned(), value: Some(AnyValue { value: Some(v) }), ..Default::default() }
}

fn proto_attr(k: &str, a: &Attr) -> KeyValue {
    match a {
        Attr::Str(s) => kv(k, any_value::Value::StringValue(s.clone())),
        Attr::Int(i) => kv(k, any_value::Value::IntValue(*i)),
    }
}

fn scope() -> Option<InstrumentationScope> {
    Some(InstrumentationScope { name: "zerotrace".into(), version: env!("CARGO_PKG_VERSION").into(), ..Default::default() })
}

/// Wall-clock nanoseconds since the Unix epoch.
pub fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// One export request: the RED histograms per process (under its resource) and the agent's
/// counters (under its own).
pub fn request(red: &Red, resources: &Resources, counters: &[(&'static str, u64)], start_ns: u64) -> ExportMetricsServiceRequest {
    let now = now_ns();
    let mut by_pid: HashMap<u32, HashMap<&'static str, Vec<HistogramDataPoint>>> = HashMap::default();
    for (k, h) in &red.series {
        let point = HistogramDataPoint {
            attributes: k.attrs.iter().map(|(n, a)| proto_attr(n, a)).collect(),
            start_time_unix_nano: start_ns,
            time_unix_nano: now,
            count: h.count,
            sum: Some(h.sum),
            bucket_counts: h.counts.to_vec(),
            explicit_bounds: bounds_of(k.metric).to_vec(),
            min: Some(h.min),
            max: Some(h.max),
            ..Default::default()
        };
        by_pid.entry(k.pid).or_default().entry(k.metric).or_default().push(point);
    }
    let res = resources.lock().expect("not poisoned");
    let mut out = Vec::new();
    for (pid, metrics) in by_pid {
        let attributes = res.get(&pid).map(proto_attributes).unwrap_or_default();
        let metrics = metrics
            .into_iter()
            .map(|(name, points)| Metric {
                name: name.to_owned(),
                description: String::new(),
                unit: "s".into(),
                data: Some(metric::Data::Histogram(Histogram { data_points: points, aggregation_temporality: AggregationTemporality::Cumulative as i32 })),
                ..Default::default()
            })
            .collect();
        out.push(ResourceMetrics {
            resource: Some(ProtoResource { attributes, ..Default::default() }),
            scope_metrics: vec![ScopeMetrics { scope: scope(), metrics, ..Default::default() }],
            ..Default::default()
        });
    }
    drop(res);
    let own = counters
        .iter()
        .map(|(name, v)| Metric {
            name: format!("zerotrace_{name}"),
            description: String::new(),
            unit: "1".into(),
            data: Some(metric::Data::Sum(Sum {
                data_points: vec![NumberDataPoint {
                    start_time_unix_nano: start_ns,
                    time_unix_nano: now,
                    value: Some(number_data_point::Value::AsInt(*v as i64)),
                    ..Default::default()
                }],
                aggregation_temporality: AggregationTemporality::Cumulative as i32,
                // Counts that go down as well as up.
                is_monotonic: !matches!(*name, "processes_traced" | "uprobe_detach_backlog" | "uprobe_files_shared")
                    && !crate::probes::occupancy::is_entries(name)
                    && !crate::probes::guard::GAUGES.contains(name)
                    && !crate::correlate::GAUGES.contains(name),
            })),
            ..Default::default()
        })
        .collect();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_default();
    out.push(ResourceMetrics {
        resource: Some(ProtoResource {
            attributes: vec![
                kv("service.name", any_value::Value::StringValue("zerotrace".into())),
                kv("host.name", any_value::Value::StringValue(host)),
                kv("process.pid", any_value::Value::IntValue(i64::from(std::process::id()))),
            ],
            ..Default::default()
        }),
        scope_metrics: vec![ScopeMetrics { scope: scope(), metrics: own, ..Default::default() }],
        ..Default::default()
    });
    ExportMetricsServiceRequest { resource_metrics: out }
}

/// Where metrics go: the traces' collector (gRPC: the same endpoint; http/protobuf: the
/// `/v1/metrics` path beside `/v1/traces`).
/// Where metrics go: the traces' collector, `/v1/metrics` for http/protobuf.
pub struct MetricsSink(super::sink::Sink);

impl MetricsSink {
    pub fn new(settings: &ExportSettings, stats: Arc<super::sink::SinkState>) -> Self {
        Self(super::sink::Sink::new(settings, "metrics", "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export", "/v1/metrics", stats))
    }

    /// Sends one request; Err: why (the caller counts it; the next export has the totals).
    pub async fn send(&mut self, req: ExportMetricsServiceRequest) -> Result<(), super::sink::SinkError> {
        self.0.send::<_, ExportMetricsServiceResponse>(req).await
    }
}

/// The interval between exports: OTEL_METRIC_EXPORT_INTERVAL (ms), default 60 s.
pub fn interval(env: &dyn Fn(&str) -> Option<String>) -> Result<Duration, String> {
    match env("OTEL_METRIC_EXPORT_INTERVAL").filter(|v| !v.trim().is_empty()) {
        None => Ok(Duration::from_secs(60)),
        Some(v) => match v.trim().parse::<u64>() {
            Ok(ms) if ms >= 100 => Ok(Duration::from_millis(ms)),
            _ => Err(v),
        },
    }
}

/// Shared between the pipeline (recording) and the exporting task.
pub type SharedRed = Arc<Mutex<Red>>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spans::{SpanId, TraceId};

    fn span(kind: SpanKind, attrs: Vec<(&'static str, Value)>, dur_ms: u64, status: Status) -> Span {
        Span {
            pid: 7,
            trace_id: TraceId([1; 16]),
            span_id: SpanId([1; 8]),
            parent: None,
            parent_is_remote: false,
            trace_state: None,
            kind,
            name: "x".into(),
            start_unix_ns: 1_000_000_000,
            end_unix_ns: 1_000_000_000 + dur_ms * 1_000_000,
            attributes: attrs,
            status,
        }
    }

    #[test]
    fn spans_become_histograms_by_route_not_path() {
        let mut red = Red::default();
        let server = |path: &str, code: i64, ms: u64| {
            span(
                SpanKind::Server,
                vec![
                    ("http.request.method", Value::Static("GET")),
                    ("url.path", Value::Str(path.into())),
                    ("http.route", Value::Static("/users/{id}")),
                    ("http.response.status_code", Value::Int(code)),
                ],
                ms,
                if code >= 500 { Status::Error(String::new()) } else { Status::Unset },
            )
        };
        red.record(&server("/users/1", 200, 3));
        red.record(&server("/users/2", 200, 30));
        red.record(&server("/users/3", 503, 300));
        red.record(&span(SpanKind::Client, vec![("http.request.method", Value::Static("GET")), ("server.address", Value::Static("db"))], 1, Status::Unset));
        red.record(&span(SpanKind::Internal, vec![], 1, Status::Unset));
        assert_eq!(red.series.len(), 3, "two server series (200, 503+error.type) and one client: {:?}", red.series.keys());
        let ok = red
            .series
            .iter()
            .find(|(k, _)| k.metric == "http.server.request.duration" && k.attrs.contains(&("http.response.status_code", Attr::Int(200))))
            .unwrap()
            .1;
        assert_eq!(ok.count, 2);
        assert!((ok.sum - 0.033).abs() < 1e-9);
        assert_eq!(ok.counts[0], 1, "3 ms <= 5 ms");
        assert_eq!(ok.counts[3], 1, "30 ms in (25, 50] ms");
        let err = red.series.keys().find(|k| k.attrs.contains(&("http.response.status_code", Attr::Int(503)))).unwrap();
        assert!(err.attrs.contains(&("error.type", Attr::Str("503".into()))));
        assert!(!red.series.keys().any(|k| k.attrs.iter().any(|(n, _)| *n == "url.path")), "never the raw path");
        let resources: Resources = Arc::new(Mutex::new(Default::default()));
        let req = request(&red, &resources, &[("spans_assembled", 4)], 1);
        assert_eq!(req.resource_metrics.len(), 2, "the process's and the agent's own");
        red.forget_pid(7);
        assert!(red.series.is_empty());
    }

    #[test]
    fn export_interval_from_the_environment() {
        assert_eq!(interval(&|_| None), Ok(Duration::from_secs(60)));
        assert_eq!(interval(&|_| Some("500".into())), Ok(Duration::from_millis(500)));
        assert!(interval(&|_| Some("soon".into())).is_err());
    }
}
