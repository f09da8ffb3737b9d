//! OTLP trace export requests encoded straight from our spans: the protobuf bytes of an
//! `ExportTraceServiceRequest` (one resource, one scope, a batch of one process's spans)
//! written in one pass into one exactly sized buffer. The bytes are those prost writes for
//! the opentelemetry-proto messages the SDK (`SpanData` -> opentelemetry-proto) built before:
//! fields in tag order, proto3 defaults left out, `flags` with SAMPLED and the
//! parent-is-remote bits. No `SpanData`, no per-span allocation (except a span with a
//! `tracestate`, normalised as the SDK did).
use std::{borrow::Cow, sync::OnceLock};

use opentelemetry::trace::TraceState;
use opentelemetry_proto::{
    tonic::{common::v1::InstrumentationScope, resource::v1::Resource as ProtoResource},
    transform::common::tonic::ResourceAttributesWithSchema,
};
use prost::encoding::encoded_len_varint;

use crate::spans::{Span, SpanKind, Status, Value};

/// A process's resource, encoded once: the `resource` field (key, length, `Resource`
/// message) and the `schema_url` field (empty when none) of its `ResourceSpans`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EncodedResource {
    resource: Vec<u8>,
    schema_url: Vec<u8>,
}

impl EncodedResource {
    /// `None`: a process whose resource is not known (an empty resource, as the SDK's
    /// exporter without one).
    pub fn new(r: Option<&opentelemetry_sdk::Resource>) -> Self {
        let a = r.map(ResourceAttributesWithSchema::from).unwrap_or_default();
        let res = ProtoResource { attributes: a.attributes.0, dropped_attributes_count: 0, entity_refs: vec![] };
        let mut resource = Vec::new();
        prost::encoding::message::encode(1, &res, &mut resource);
        let mut schema_url = Vec::new();
        if let Some(url) = a.schema_url.filter(|u| !u.is_empty()) {
            prost::encoding::string::encode(3, &url, &mut schema_url);
        }
        Self { resource, schema_url }
    }
}

/// The `scope` field of every `ScopeSpans`: name zerotrace, the agent's version.
fn scope_field() -> &'static [u8] {
    static SCOPE: OnceLock<Vec<u8>> = OnceLock::new();
    SCOPE.get_or_init(|| {
        let scope = InstrumentationScope { name: "zerotrace".into(), version: env!("CARGO_PKG_VERSION").into(), ..Default::default() };
        let mut b = Vec::new();
        prost::encoding::message::encode(1, &scope, &mut b);
        b
    })
}

// Field keys ((tag << 3) | wire type) of the messages written here: 0 varint, 1 fixed64,
// 2 length-delimited, 5 fixed32.
const REQUEST_RESOURCE_SPANS: u8 = 1 << 3 | 2;
const RESOURCE_SPANS_SCOPE_SPANS: u8 = 2 << 3 | 2;
const SCOPE_SPANS_SPANS: u8 = 2 << 3 | 2;
const SPAN_TRACE_ID: u8 = 1 << 3 | 2;
const SPAN_SPAN_ID: u8 = 2 << 3 | 2;
const SPAN_TRACE_STATE: u8 = 3 << 3 | 2;
const SPAN_PARENT_SPAN_ID: u8 = 4 << 3 | 2;
const SPAN_NAME: u8 = 5 << 3 | 2;
const SPAN_KIND: u8 = 6 << 3;
const SPAN_START: u8 = 7 << 3 | 1;
const SPAN_END: u8 = 8 << 3 | 1;
const SPAN_ATTRIBUTES: u8 = 9 << 3 | 2;
const SPAN_STATUS: u8 = 15 << 3 | 2;
/// Tag 16, fixed32: (16 << 3) | 5 = 133, a two-byte varint.
const SPAN_FLAGS: [u8; 2] = [0x85, 0x01];
const STATUS_MESSAGE: u8 = 2 << 3 | 2;
const STATUS_CODE: u8 = 3 << 3;
const KEY_VALUE_KEY: u8 = 1 << 3 | 2;
const KEY_VALUE_VALUE: u8 = 2 << 3 | 2;
const ANY_VALUE_STRING: u8 = 1 << 3 | 2;
const ANY_VALUE_INT: u8 = 3 << 3;

/// SpanFlags: the W3C sampled flag (every exported span is sampled), "has is-remote" and
/// "is remote" (of the parent).
const FLAG_SAMPLED: u32 = 0x01;
const FLAG_HAS_IS_REMOTE: u32 = 0x100;
const FLAG_IS_REMOTE: u32 = 0x200;

/// Status.code ERROR (opentelemetry.proto.trace.v1; UNSET is 0, left out).
const STATUS_CODE_ERROR: u64 = 2;

/// Span.kind (SPAN_KIND_INTERNAL = 1, SERVER = 2, CLIENT = 3).
fn kind_code(k: SpanKind) -> u8 {
    match k {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
    }
}

/// A varint (prost's `encode_varint` through `BufMut` is not inlined; most are one byte).
#[inline(always)]
fn encode_varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Bytes of a length-delimited field with a one-byte key and a body of `len` bytes.
#[inline]
fn delimited_len(len: usize) -> usize {
    1 + encoded_len_varint(len as u64) + len
}

#[inline]
fn put_delimited(out: &mut Vec<u8>, key: u8, bytes: &[u8]) {
    out.push(key);
    encode_varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

#[inline]
fn put_header(out: &mut Vec<u8>, key: u8, len: usize) {
    out.push(key);
    encode_varint(len as u64, out);
}

/// The trace state as the SDK exported it: parsed (an invalid one is dropped) and written
/// back in canonical form.
fn trace_state(s: &Span) -> Cow<'_, str> {
    match s.trace_state.as_deref() {
        None | Some("") => Cow::Borrowed(""),
        Some(t) => Cow::Owned(t.parse::<TraceState>().map(|t| t.header()).unwrap_or_default()),
    }
}

fn parent(s: &Span) -> Option<&[u8; 8]> {
    s.parent.as_ref().map(|p| &p.0).filter(|p| **p != [0; 8])
}

fn str_value(v: &Value) -> Option<&str> {
    match v {
        Value::Str(s) => Some(s),
        Value::Static(s) => Some(s),
        Value::Shared(s) => Some(s),
        Value::Int(_) => None,
    }
}

fn any_value_len(v: &Value) -> usize {
    match v {
        Value::Int(i) => 1 + encoded_len_varint(*i as u64),
        other => delimited_len(str_value(other).map_or(0, str::len)),
    }
}

fn key_value_len(k: &str, v: &Value) -> usize {
    let key = if k.is_empty() { 0 } else { delimited_len(k.len()) };
    key + delimited_len(any_value_len(v))
}

fn status_len(s: &Status) -> usize {
    match s {
        Status::Unset => 0,
        Status::Error(m) => 2 + if m.is_empty() { 0 } else { delimited_len(m.len()) },
    }
}

/// The `Span` message's length.
fn span_len(s: &Span, trace_state: &str) -> usize {
    let mut n = 2 + 16 + 2 + 8; // trace and span id
    if !trace_state.is_empty() {
        n += delimited_len(trace_state.len());
    }
    if parent(s).is_some() {
        n += 2 + 8;
    }
    if !s.name.is_empty() {
        n += delimited_len(s.name.len());
    }
    n += 2; // kind
    if s.start_unix_ns != 0 {
        n += 9;
    }
    if s.end_unix_ns != 0 {
        n += 9;
    }
    for (k, v) in &s.attributes {
        n += delimited_len(key_value_len(k, v));
    }
    n += delimited_len(status_len(&s.status));
    n + 2 + 4 // flags
}

fn put_span(out: &mut Vec<u8>, s: &Span, trace_state: &str) {
    put_delimited(out, SPAN_TRACE_ID, &s.trace_id.0);
    put_delimited(out, SPAN_SPAN_ID, &s.span_id.0);
    if !trace_state.is_empty() {
        put_delimited(out, SPAN_TRACE_STATE, trace_state.as_bytes());
    }
    if let Some(p) = parent(s) {
        put_delimited(out, SPAN_PARENT_SPAN_ID, p);
    }
    if !s.name.is_empty() {
        put_delimited(out, SPAN_NAME, s.name.as_bytes());
    }
    out.extend_from_slice(&[SPAN_KIND, kind_code(s.kind)]);
    if s.start_unix_ns != 0 {
        out.push(SPAN_START);
        out.extend_from_slice(&s.start_unix_ns.to_le_bytes());
    }
    if s.end_unix_ns != 0 {
        out.push(SPAN_END);
        out.extend_from_slice(&s.end_unix_ns.to_le_bytes());
    }
    for (k, v) in &s.attributes {
        put_header(out, SPAN_ATTRIBUTES, key_value_len(k, v));
        if !k.is_empty() {
            put_delimited(out, KEY_VALUE_KEY, k.as_bytes());
        }
        put_header(out, KEY_VALUE_VALUE, any_value_len(v));
        match v {
            Value::Int(i) => {
                out.push(ANY_VALUE_INT);
                encode_varint(*i as u64, out);
            }
            other => put_delimited(out, ANY_VALUE_STRING, str_value(other).unwrap_or_default().as_bytes()),
        }
    }
    put_header(out, SPAN_STATUS, status_len(&s.status));
    if let Status::Error(m) = &s.status {
        if !m.is_empty() {
            put_delimited(out, STATUS_MESSAGE, m.as_bytes());
        }
        out.push(STATUS_CODE);
        encode_varint(STATUS_CODE_ERROR, out);
    }
    out.extend_from_slice(&SPAN_FLAGS);
    let flags = FLAG_SAMPLED | FLAG_HAS_IS_REMOTE | if s.parent_is_remote { FLAG_IS_REMOTE } else { 0 };
    out.extend_from_slice(&flags.to_le_bytes());
}

/// The protobuf bytes of the `ExportTraceServiceRequest` of one process's `spans`.
pub fn request(resource: &EncodedResource, spans: &[Span]) -> Vec<u8> {
    let scope = scope_field();
    let mut lens = Vec::with_capacity(spans.len());
    let mut scope_spans = scope.len();
    for s in spans {
        let n = span_len(s, &trace_state(s));
        scope_spans += delimited_len(n);
        lens.push(n);
    }
    let resource_spans = resource.resource.len() + if spans.is_empty() { 0 } else { delimited_len(scope_spans) } + resource.schema_url.len();
    let total = delimited_len(resource_spans);
    let mut out = Vec::with_capacity(total);
    put_header(&mut out, REQUEST_RESOURCE_SPANS, resource_spans);
    out.extend_from_slice(&resource.resource);
    if !spans.is_empty() {
        put_header(&mut out, RESOURCE_SPANS_SCOPE_SPANS, scope_spans);
        out.extend_from_slice(scope);
        for (s, n) in spans.iter().zip(lens) {
            put_header(&mut out, SCOPE_SPANS_SPANS, n);
            let start = out.len();
            put_span(&mut out, s, &trace_state(s));
            debug_assert_eq!(out.len() - start, n, "span length of {s:?}");
        }
    }
    out.extend_from_slice(&resource.schema_url);
    debug_assert_eq!(out.len(), total);
    out
}

#[cfg(test)]
mod tests {
    use std::{
        borrow::Cow,
        sync::Arc,
        time::{Duration, SystemTime},
    };

    use opentelemetry::{
        InstrumentationScope, KeyValue,
        trace::{SpanContext, SpanId as OtelSpanId, SpanKind as OtelKind, Status as OtelStatus, TraceFlags, TraceId as OtelTraceId},
    };
    use opentelemetry_proto::{tonic::collector::trace::v1::ExportTraceServiceRequest, transform::trace::tonic::group_spans_by_resource_and_scope};
    use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
    use prost::Message;

    use super::*;
    use crate::{
        export::resource::{AttrValue, resource},
        spans::{SpanId, TraceId},
    };

    /// The conversion the exporter used with opentelemetry-otlp (the oracle).
    fn to_span_data(s: &Span) -> SpanData {
        let trace_state = s.trace_state.as_deref().and_then(|t| t.parse::<TraceState>().ok()).unwrap_or_default();
        SpanData {
            span_context: SpanContext::new(OtelTraceId::from_bytes(s.trace_id.0), OtelSpanId::from_bytes(s.span_id.0), TraceFlags::SAMPLED, false, trace_state),
            parent_span_id: s.parent.map_or(OtelSpanId::INVALID, |p| OtelSpanId::from_bytes(p.0)),
            parent_span_is_remote: s.parent_is_remote,
            span_kind: match s.kind {
                SpanKind::Server => OtelKind::Server,
                SpanKind::Client => OtelKind::Client,
                SpanKind::Internal => OtelKind::Internal,
            },
            name: Cow::Owned(s.name.clone()),
            start_time: SystemTime::UNIX_EPOCH + Duration::from_nanos(s.start_unix_ns),
            end_time: SystemTime::UNIX_EPOCH + Duration::from_nanos(s.end_unix_ns),
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
            instrumentation_scope: InstrumentationScope::builder("zerotrace").with_version(env!("CARGO_PKG_VERSION")).build(),
        }
    }

    fn sdk_request(r: Option<&opentelemetry_sdk::Resource>, spans: &[Span]) -> ExportTraceServiceRequest {
        let res = r.map(ResourceAttributesWithSchema::from).unwrap_or_default();
        ExportTraceServiceRequest { resource_spans: group_spans_by_resource_and_scope(spans.iter().map(to_span_data).collect(), &res) }
    }

    fn span(n: u8) -> Span {
        Span {
            pid: 42,
            trace_id: TraceId([n; 16]),
            span_id: SpanId([n.wrapping_add(1); 8]),
            parent: None,
            parent_is_remote: false,
            trace_state: None,
            kind: SpanKind::Server,
            name: "GET /users/{id}".into(),
            start_unix_ns: 1_700_000_000_123_456_789,
            end_unix_ns: 1_700_000_000_223_456_789,
            attributes: vec![
                ("http.request.method", Value::Static("GET")),
                ("url.path", Value::Str("/users/7".into())),
                ("server.address", Value::Shared(Arc::from("localhost"))),
                ("http.response.status_code", Value::Int(200)),
            ],
            status: Status::Unset,
        }
    }

    fn spans() -> Vec<Span> {
        let mut out = vec![span(1)];
        // A local child: client, error with a message, negative and zero ints, an empty
        // string, a long value (multi-byte lengths).
        let mut s = span(2);
        s.parent = Some(SpanId([1; 8]));
        s.kind = SpanKind::Client;
        s.status = Status::Error("connection reset".into());
        s.attributes.push(("x.neg", Value::Int(-5)));
        s.attributes.push(("x.zero", Value::Int(0)));
        s.attributes.push(("x.max", Value::Int(i64::MAX)));
        s.attributes.push(("x.empty", Value::Str(String::new())));
        s.attributes.push(("db.query.text", Value::Str("SELECT ".repeat(400))));
        out.push(s);
        // A remote parent with a trace state the SDK normalises.
        let mut s = span(3);
        s.parent = Some(SpanId([9; 8]));
        s.parent_is_remote = true;
        s.trace_state = Some(" congo=t61rcWkgMzE , rojo=00f067aa0ba902b7".into());
        out.push(s);
        // An invalid trace state (dropped), an error without message, an internal span.
        let mut s = span(4);
        s.trace_state = Some("not a trace state".into());
        s.kind = SpanKind::Internal;
        s.status = Status::Error(String::new());
        s.attributes.clear();
        out.push(s);
        // Edge values: an all-zero parent (none), empty name, zero times, zero ids.
        let mut s = span(0);
        s.span_id = SpanId([0; 8]);
        s.parent = Some(SpanId([0; 8]));
        s.name = String::new();
        s.start_unix_ns = 0;
        s.end_unix_ns = 0;
        s.trace_state = Some(String::new());
        out.push(s);
        // Non-ASCII text.
        let mut s = span(5);
        s.name = "GET /café".into();
        s.attributes.push(("url.path", Value::Str("/ünïcode/😀".into())));
        out.push(s);
        out
    }

    fn assert_same(r: Option<&opentelemetry_sdk::Resource>, spans: &[Span]) {
        let want = sdk_request(r, spans);
        let got = request(&EncodedResource::new(r), spans);
        let decoded = ExportTraceServiceRequest::decode(got.as_slice()).expect("valid protobuf");
        assert_eq!(decoded, want);
        assert_eq!(got, want.encode_to_vec(), "the same bytes as prost");
    }

    #[test]
    fn encodes_as_the_sdk_did() {
        let res = resource(&[
            ("service.name".into(), AttrValue::Str("checkout".into())),
            ("process.pid".into(), AttrValue::Int(4242)),
            ("host.name".into(), AttrValue::Str("box".into())),
        ]);
        let all = spans();
        for s in &all {
            assert_same(Some(&res), std::slice::from_ref(s));
        }
        assert_same(Some(&res), &all);
        assert_same(None, &all);
        assert_same(Some(&res), &[]);
        // A batch over 16 KiB (three-byte lengths) of many spans.
        let many: Vec<Span> = (0..600).map(|i| all[i % all.len()].clone()).collect();
        assert_same(Some(&res), &many);
        let flags: Vec<u32> = ExportTraceServiceRequest::decode(request(&EncodedResource::new(None), &all).as_slice()).unwrap().resource_spans[0].scope_spans
            [0]
        .spans
        .iter()
        .map(|s| s.flags)
        .collect();
        assert_eq!(flags[..3], [0x101, 0x101, 0x301], "sampled, has-is-remote, is-remote for a remote parent");
    }

    #[test]
    fn a_resource_with_a_schema_url() {
        let res = opentelemetry_sdk::Resource::builder_empty()
            .with_schema_url([KeyValue::new("service.name", "s"), KeyValue::new("b", true), KeyValue::new("f", 1.5)], "https://opentelemetry.io/schemas/1.26.0")
            .build();
        assert_same(Some(&res), &spans());
    }
}
