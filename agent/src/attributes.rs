//! Every attribute key and metric name zerotrace exports, with its type, where it appears
//! and (for enumerations) the values it takes: the list the semantic-conventions check reads
//! (agent/tests/semconv.rs checks it against the OpenTelemetry registry, and that every key
//! written in the code is in it; the end-to-end suite checks every key a receiver got). Keys
//! outside the registry are zerotrace's own, under `zerotrace.*` (docs/attributes.md).
//! Self-contained on purpose (no imports): the e2e harness reads this same file.

/// An attribute's value type, as exported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Type {
    Str,
    Int,
}

/// Where an attribute is exported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    Span,
    Resource,
    Metric,
    Profile,
}

/// One exported attribute.
#[derive(Clone, Copy, Debug)]
pub struct Key {
    pub name: &'static str,
    pub ty: Type,
    pub on: &'static [Signal],
    /// The values zerotrace writes when they are a fixed set (empty: free-form).
    pub values: &'static [&'static str],
}

use Signal::{Metric as M, Profile as P, Resource as R, Span as S};
use Type::{Int, Str};

const fn key(name: &'static str, ty: Type, on: &'static [Signal]) -> Key {
    Key { name, ty, on, values: &[] }
}

const fn values(name: &'static str, on: &'static [Signal], values: &'static [&'static str]) -> Key {
    Key { name, ty: Str, on, values }
}

pub const HTTP_METHODS: &[&str] = &["CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE", "QUERY", "_OTHER"];

/// The gRPC status codes by number, named as `rpc.response.status_code` wants them.
pub const GRPC_STATUS: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// zerotrace's own key for a Go goroutine's id (the registry has none).
pub const GOROUTINE_ID: &str = "zerotrace.go.goroutine.id";

/// `db.system.name` of each database a Go database/sql driver is known for, in the order of
/// zerotrace_common::sql_system from OTHER (1) on.
pub const DB_SYSTEM_NAMES: &[&str] = &["other_sql", "postgresql", "mysql", "sqlite", "microsoft.sql_server", "oracle.db", "clickhouse"];

pub const ALL: &[Key] = &[
    // HTTP, server and client spans (and the RED metrics' attributes).
    values("http.request.method", &[S, M], HTTP_METHODS),
    key("http.request.method_original", Str, &[S]),
    key("http.response.status_code", Int, &[S, M]),
    key("http.route", Str, &[S, M]),
    key("url.path", Str, &[S]),
    key("url.full", Str, &[S]),
    values("url.scheme", &[S, M], &["http", "https"]),
    key("server.address", Str, &[S, M]),
    key("server.port", Int, &[S, M]),
    key("client.address", Str, &[S]),
    key("client.port", Int, &[S]),
    key("network.peer.address", Str, &[S]),
    key("network.peer.port", Int, &[S]),
    values("network.protocol.name", &[S, M], &["http"]),
    values("network.protocol.version", &[S, M], &["1.0", "1.1", "2"]),
    key("user_agent.original", Str, &[S]),
    // Status codes of failed requests, and `_OTHER` for failures without one.
    key("error.type", Str, &[S, M]),
    // gRPC streams (socket level).
    values("rpc.system.name", &[S, M], &["grpc"]),
    key("rpc.method", Str, &[S, M]),
    key("rpc.method_original", Str, &[S]),
    values("rpc.response.status_code", &[S, M], &GRPC_STATUS),
    // database/sql client calls.
    values("db.system.name", &[S, M], DB_SYSTEM_NAMES),
    key("db.query.summary", Str, &[S, M]),
    key("db.query.text", Str, &[S]),
    key("db.response.status_code", Str, &[S, M]),
    // Who ran it.
    key("thread.id", Int, &[S, P]),
    key(GOROUTINE_ID, Int, &[S, P]),
    // zerotrace's own span attributes.
    key("zerotrace.http2.rst_stream", Int, &[S]),
    key("zerotrace.http2.incomplete", Str, &[S]),
    key("zerotrace.http2.headers", Str, &[S]),
    key("zerotrace.traceparent", Str, &[S]),
    values(
        "zerotrace.traceparent.outcome",
        &[S],
        &["written", "dry-run", "request has its own", "no room in the write buffer", "write failed", "not checkable"],
    ),
    key("zerotrace.cpu.samples", Int, &[S]),
    key("zerotrace.cpu.time_ns", Int, &[S]),
    // Resources (each traced process; the agent's own for its counters).
    key("service.name", Str, &[R]),
    key("process.pid", Int, &[R, P]),
    key("process.executable.name", Str, &[R]),
    key("process.executable.path", Str, &[R]),
    key("process.runtime.name", Str, &[R]),
    key("process.runtime.version", Str, &[R]),
    key("host.name", Str, &[R]),
    values("telemetry.distro.name", &[R], &["zerotrace"]),
    key("telemetry.distro.version", Str, &[R]),
    // Containers and Kubernetes (from the node's CRI socket and the pod's labels), and the
    // service keys Kubernetes' conventions derive from them.
    key("container.id", Str, &[R]),
    key("k8s.pod.name", Str, &[R]),
    key("k8s.pod.uid", Str, &[R]),
    key("k8s.namespace.name", Str, &[R]),
    key("k8s.container.name", Str, &[R]),
    key("k8s.node.name", Str, &[R]),
    key("k8s.deployment.name", Str, &[R]),
    key("k8s.replicaset.name", Str, &[R]),
    key("k8s.statefulset.name", Str, &[R]),
    key("k8s.daemonset.name", Str, &[R]),
    key("k8s.job.name", Str, &[R]),
    key("k8s.cronjob.name", Str, &[R]),
    key("service.namespace", Str, &[R]),
    key("service.version", Str, &[R]),
    key("service.instance.id", Str, &[R]),
    // Profiles: mappings and frames.
    key("process.executable.build_id.gnu", Str, &[P]),
    key("process.executable.build_id.go", Str, &[P]),
    values("profile.frame.type", &[P], &["kernel", "native"]),
];

/// Metrics zerotrace exports besides its counters (`zerotrace_<counter>`), with their unit.
pub const METRICS: &[(&str, &str)] = &[
    ("http.server.request.duration", "s"),
    ("http.client.request.duration", "s"),
    ("db.client.operation.duration", "s"),
    ("rpc.server.call.duration", "s"),
    ("rpc.client.call.duration", "s"),
];

/// The declared key `name`, if any.
pub fn find(name: &str) -> Option<&'static Key> {
    ALL.iter().find(|k| k.name == name)
}
