//! HTTP/2 and gRPC spans of native processes, from the frames of their h2c connections
//! (every read and send arrives with its first bytes: protocols/http2.rs). One span per
//! stream: SERVER on a connection the process accepted, CLIENT on one it opened. A stream
//! starts at the request's HEADERS and ends at the response's END_STREAM (or a
//! RST_STREAM, or the connection's close: then it says it is incomplete).
//!
//! Links: a client stream is offered under (connection flow, stream id); the server
//! stream with the same flow and id, seen later in the same ring buffer, takes it as its
//! parent; that is how two traced processes on one host link over HTTP/2 with no header.
//! Inside a process, a client stream's parent is the process's one open server request
//! (HTTP/1 or HTTP/2), as for HTTP/1 clients (native.rs). An incoming `traceparent` wins.
//!
//! When bytes that carried a header block were not captured, the direction's HPACK table
//! can no longer be trusted: streams are still timed and closed from frame flags, and
//! their spans say that their headers were not read (`zerotrace.http2.headers`).
use std::net::SocketAddr;

use rustc_hash::FxHashMap as HashMap;

use crate::{
    events::H2Bytes,
    protocols::http2::{
        self, CONTINUATION, DATA, END_HEADERS, END_STREAM, FrameHeader, FrameReader, HEADERS, HeaderDecoder, Headers, PUSH_PROMISE, RST_STREAM,
    },
    spans::{RemoteParent, Span, SpanId, SpanKind, Status, TraceId, Value},
};

use super::{Correlator, split_host_port, traces::span_id};

/// Streams open at once on one connection that are followed, at most.
const MAX_STREAMS: usize = 1024;
/// Client streams offered for same-host links, at most.
const MAX_LINKS: usize = 65_536;
const REQUEST: usize = 0;
const RESPONSE: usize = 1;

/// A flow (client, server) and a stream id.
pub(super) type LinkKey = (SocketAddr, SocketAddr, u32);

pub(super) struct H2Conn {
    pid: u32,
    server: bool,
    flow: (SocketAddr, SocketAddr),
    /// Request side (client to server) and response side.
    readers: [FrameReader; 2],
    decoders: [HeaderDecoder; 2],
    /// A header block in progress per side: stream, HEADERS flags, bytes so far.
    blocks: [Option<(u32, u8, Vec<u8>)>; 2],
    streams: HashMap<u32, Stream>,
    last_ns: u64,
    /// Per side: where the next piece of the current syscall starts (None: a new syscall).
    next_offset: [Option<u32>; 2],
    /// A direction became unreadable: its open streams were ended (incomplete) and the
    /// connection is not followed any more.
    dead: bool,
}

struct Stream {
    span: u64,
    trace_id: TraceId,
    parent: Option<SpanId>,
    remote: bool,
    trace_state: Option<String>,
    tid: u32,
    start_ns: u64,
    request: Option<Headers>,
    response: Option<Headers>,
    grpc_status: Option<i64>,
    reset: Option<u32>,
    /// A header block of this stream was not read (not captured, or HPACK lost).
    headers_lost: bool,
}

/// What a frame does to its stream.
enum Effect {
    None,
    Finish,
}

impl Correlator {
    /// A client stream (native or grpc-go) offers its span to the server on this host that
    /// reads stream `key` (bounded: the oldest offers go all at once when full).
    pub(super) fn offer_h2_link(&mut self, key: LinkKey, span: u64) {
        if self.h2_links.len() >= MAX_LINKS {
            self.h2_links.clear();
        }
        self.h2_links.insert(key, span);
    }

    /// Bytes read or sent on an HTTP/2 connection of a native process.
    pub(super) fn on_h2(&mut self, b: H2Bytes, out: &mut Vec<Span>) {
        if !self.h2.contains_key(&b.conn_id) {
            let Some(c) = self.conns.get(&b.conn_id) else {
                self.stats.not_http += 1;
                return;
            };
            let server = c.role == zerotrace_common::ConnRole::Server as u8;
            let local = SocketAddr::new(c.addrs.local.addr, c.addrs.local.port);
            let peer = SocketAddr::new(c.addrs.peer.addr, c.addrs.peer.port);
            // A connection joined mid-way starts at a frame boundary (as far as the kernel
            // could tell) and its HPACK tables are unknown: headers are never decoded.
            let readers = if b.joined { [FrameReader::joined(), FrameReader::joined()] } else { [FrameReader::new(true), FrameReader::new(false)] };
            let mut decoders = [HeaderDecoder::default(), HeaderDecoder::default()];
            if b.joined {
                decoders.iter_mut().for_each(|d| d.lost = true);
            }
            let conn = H2Conn {
                pid: b.pid,
                server,
                flow: if server { (peer, local) } else { (local, peer) },
                readers,
                decoders,
                blocks: [None, None],
                streams: HashMap::default(),
                last_ns: b.ts,
                next_offset: [None, None],
                dead: false,
            };
            self.h2.insert(b.conn_id, conn);
        }
        let Some(conn) = self.h2.get_mut(&b.conn_id) else { return };
        if conn.dead {
            return;
        }
        conn.last_ns = b.ts;
        let side = if conn.server != b.sent { REQUEST } else { RESPONSE };
        let was_broken = conn.readers[side].broken.is_some();
        // The pieces of one syscall come in order; a missing piece (a record lost to a full
        // ring) is a hole of unknown size.
        if b.offset != conn.next_offset[side].unwrap_or(0) {
            conn.readers[side].broken.get_or_insert(http2::Broken::LostFrameBoundary);
        }
        conn.next_offset[side] = (!b.last).then(|| b.offset + b.bytes.len() as u32);
        let mut frames: Vec<(FrameHeader, Option<Vec<u8>>)> = Vec::new();
        // After a syscall's last piece: the bytes that were not captured.
        let seen = u64::from(b.offset) + b.bytes.len() as u64;
        let missing = if b.last { u64::from(b.total).saturating_sub(seen) } else { 0 };
        conn.readers[side].feed(&b.bytes, missing, &mut |f| {
            let keep = matches!(f.header.kind, HEADERS | CONTINUATION | RST_STREAM);
            frames.push((f.header, if keep { f.payload.map(<[u8]>::to_vec) } else { None }));
        });
        let broke = !was_broken && conn.readers[side].broken.is_some();
        for (h, payload) in frames {
            self.on_frame(b.conn_id, side, h, payload.as_deref(), b.ts, b.tid, out);
        }
        if broke {
            // Nothing after this point of the direction can be placed: the open streams end
            // here (incomplete) rather than stay open, and the connection is left alone.
            self.stats.h2_unreadable += 1;
            let conn = self.h2.get_mut(&b.conn_id).expect("present");
            tracing::debug!(pid = b.pid, conn = b.conn_id, why = ?conn.readers[side].broken, "HTTP/2 direction no longer readable");
            conn.dead = true;
            let ids: Vec<u32> = conn.streams.keys().copied().collect();
            for id in ids {
                self.finish_stream(b.conn_id, id, b.ts, true, out);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_frame(&mut self, conn_id: u64, side: usize, h: FrameHeader, payload: Option<&[u8]>, ts: u64, tid: u32, out: &mut Vec<Span>) {
        if h.stream == 0 {
            return;
        }
        let effect = match h.kind {
            HEADERS => {
                let block = payload.and_then(|p| http2::headers_fragment(h.flags, p));
                let conn = self.h2.get_mut(&conn_id).expect("present");
                conn.blocks[side] = None;
                match block {
                    Some(b) if h.flags & END_HEADERS != 0 => {
                        let headers = conn.decoders[side].decode(b);
                        self.on_headers(conn_id, side, h.stream, h.flags, headers, ts, tid)
                    }
                    Some(b) => {
                        conn.blocks[side] = Some((h.stream, h.flags, b.to_vec()));
                        // The stream starts now; its headers follow in CONTINUATION frames.
                        self.on_headers(conn_id, side, h.stream, h.flags & !END_STREAM, Some(Headers::default()), ts, tid);
                        Effect::None
                    }
                    None => {
                        conn.decoders[side].lost = true;
                        self.on_headers(conn_id, side, h.stream, h.flags, None, ts, tid)
                    }
                }
            }
            CONTINUATION => {
                let conn = self.h2.get_mut(&conn_id).expect("present");
                let Some((stream, flags, mut block)) = conn.blocks[side].take() else { return };
                match payload {
                    Some(p) if stream == h.stream && block.len() + p.len() <= http2::MAX_HEADER_BLOCK => block.extend_from_slice(p),
                    _ => {
                        conn.decoders[side].lost = true;
                        return;
                    }
                }
                if h.flags & END_HEADERS == 0 {
                    conn.blocks[side] = Some((stream, flags, block));
                    return;
                }
                let headers = conn.decoders[side].decode(&block);
                self.on_headers(conn_id, side, stream, flags, headers, ts, tid)
            }
            DATA if side == RESPONSE && h.flags & END_STREAM != 0 => Effect::Finish,
            // Its header block changes the HPACK table of this direction, which is not
            // followed for pushed streams: later header blocks cannot be trusted.
            PUSH_PROMISE => {
                if let Some(c) = self.h2.get_mut(&conn_id) {
                    c.decoders[side].lost = true;
                }
                Effect::None
            }
            RST_STREAM => {
                let code = payload.and_then(|p| p.get(..4)).map_or(0, |c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
                if let Some(s) = self.h2.get_mut(&conn_id).and_then(|c| c.streams.get_mut(&h.stream)) {
                    s.reset = Some(code);
                }
                Effect::Finish
            }
            _ => Effect::None,
        };
        if let Effect::Finish = effect {
            self.finish_stream(conn_id, h.stream, ts, false, out);
        }
    }

    /// A complete header block (None: not readable) of `stream` on `side`.
    #[allow(clippy::too_many_arguments)]
    fn on_headers(&mut self, conn_id: u64, side: usize, stream: u32, flags: u8, headers: Option<Headers>, ts: u64, tid: u32) -> Effect {
        let conn = self.h2.get_mut(&conn_id).expect("present");
        if side == RESPONSE {
            let Some(s) = conn.streams.get_mut(&stream) else { return Effect::None };
            match headers {
                Some(h) => {
                    if h.grpc_status.is_some() {
                        s.grpc_status = h.grpc_status;
                    }
                    if s.response.is_none() {
                        s.response = Some(h);
                    }
                }
                None => s.headers_lost = true,
            }
            return if flags & END_STREAM != 0 { Effect::Finish } else { Effect::None };
        }
        if let Some(s) = conn.streams.get_mut(&stream) {
            // The rest of a request's header block (after CONTINUATION), or its trailers.
            match headers {
                Some(h) if s.request.as_ref().is_some_and(|r| r.method.is_none()) => s.request = Some(h),
                None => s.headers_lost = true,
                _ => {}
            }
            return Effect::None;
        }
        if conn.streams.len() >= MAX_STREAMS {
            self.stats.pending_full += 1;
            return Effect::None;
        }
        let (pid, server, flow) = (conn.pid, conn.server, conn.flow);
        let span = loop {
            let v = fastrand::u64(..);
            if v != 0 {
                break v;
            }
        };
        let incoming = headers.as_ref().and_then(|h| RemoteParent::parse(h.traceparent.as_deref()?, h.tracestate.as_deref()));
        let (trace_id, parent, remote, trace_state) = if let Some(rp) = incoming {
            let trace_id = self.traces.resolve(rp.trace_id);
            self.sampling.remote_decision(trace_id, rp.sampled);
            (trace_id, Some(rp.span_id), true, rp.trace_state)
        } else {
            let parent = if server { self.h2_links.remove(&(flow.0, flow.1, stream)).unwrap_or(0) } else { self.native_parent(pid, tid) };
            let (trace_id, parent) = self.traces.child_of(parent, [0; 16]);
            if server && parent.is_some() {
                self.stats.linked += 1;
            }
            (trace_id, parent, false, None)
        };
        self.traces.remember(span, trace_id);
        if server {
            self.open.entry(pid).or_default().insert((conn_id, stream), span);
        } else {
            self.offer_h2_link((flow.0, flow.1, stream), span);
        }
        let headers_lost = headers.is_none();
        let s = Stream {
            span,
            trace_id,
            parent,
            remote,
            trace_state,
            tid,
            start_ns: ts,
            request: headers,
            response: None,
            grpc_status: None,
            reset: None,
            headers_lost,
        };
        self.h2.get_mut(&conn_id).expect("present").streams.insert(stream, s);
        Effect::None
    }

    fn finish_stream(&mut self, conn_id: u64, stream: u32, ts: u64, cut: bool, out: &mut Vec<Span>) {
        let Some(conn) = self.h2.get_mut(&conn_id) else { return };
        let Some(s) = conn.streams.remove(&stream) else { return };
        let (pid, server, flow) = (conn.pid, conn.server, conn.flow);
        if server {
            if let Some(m) = self.open.get_mut(&pid) {
                m.remove(&(conn_id, stream));
                if m.is_empty() {
                    self.open.remove(&pid);
                }
            }
        } else {
            self.h2_links.remove(&(flow.0, flow.1, stream));
        }
        self.stats.spans += 1;
        out.push(self.stream_span(pid, server, flow, s, ts, cut));
    }

    /// The connection closed: its open streams end (incomplete).
    pub(super) fn close_h2(&mut self, conn_id: u64, out: &mut Vec<Span>) {
        let Some(conn) = self.h2.get(&conn_id) else { return };
        let (last, ids): (u64, Vec<u32>) = (conn.last_ns, conn.streams.keys().copied().collect());
        for id in ids {
            self.finish_stream(conn_id, id, last, true, out);
        }
        self.h2.remove(&conn_id);
    }

    fn stream_span(&self, pid: u32, server: bool, flow: (SocketAddr, SocketAddr), s: Stream, end_ns: u64, cut: bool) -> Span {
        let req = s.request.clone().unwrap_or_default();
        let grpc = req.content_type.as_deref().is_some_and(|c| c.starts_with("application/grpc"));
        let mut a: Vec<(&'static str, Value)> = Vec::with_capacity(16);
        let path = req.path.as_deref().unwrap_or("");
        let path_only = path.split(['?', '#']).next().unwrap_or("");
        let status;
        let name;
        if grpc {
            let code = s.grpc_status.or(s.response.as_ref().and_then(|r| r.grpc_status));
            (name, status) = grpc_attributes(path, code, server, &mut a);
        } else {
            let method = req.method.as_deref().unwrap_or("");
            let known = crate::protocols::http1::known_method(method);
            name = known.unwrap_or("HTTP").to_owned();
            a.push(("http.request.method", Value::Static(known.unwrap_or("_OTHER"))));
            if server {
                a.push(("url.path", Value::Str(path_only.to_owned())));
                a.push(("url.scheme", Value::Str(req.scheme.clone().unwrap_or_else(|| "http".into()))));
            } else if let Some(auth) = &req.authority {
                // Only scheme, host and path: query values are never exported.
                a.push(("url.full", Value::Str(format!("{}://{auth}{path_only}", req.scheme.as_deref().unwrap_or("http")))));
            }
            let code = s.response.as_ref().and_then(|r| r.status);
            if let Some(c) = code {
                a.push(("http.response.status_code", Value::Int(i64::from(c))));
            }
            let failed = code.is_some_and(|c| if server { c >= 500 } else { c >= 400 });
            if failed {
                a.push(("error.type", Value::Str(code.unwrap_or(0).to_string())));
            }
            status = if failed { Status::Error(String::new()) } else { Status::Unset };
        }
        let status = match s.reset {
            Some(code) => {
                if !a.iter().any(|(k, _)| *k == "error.type") {
                    a.push(("error.type", Value::Static("_OTHER")));
                }
                a.push(("zerotrace.http2.rst_stream", Value::Int(i64::from(code))));
                Status::Error(format!("stream reset (HTTP/2 error code {code})"))
            }
            None if cut => {
                a.push(("zerotrace.http2.incomplete", Value::Static("connection closed before the stream ended")));
                status
            }
            None => status,
        };
        if let Some(auth) = &req.authority {
            let (host, port) = split_host_port(auth);
            if !host.is_empty() {
                a.push(("server.address", Value::Str(host.to_owned())));
            }
            if let Some(p) = port.or(Some(flow.1.port())) {
                a.push(("server.port", Value::Int(i64::from(p))));
            }
        }
        let peer = if server { flow.0 } else { flow.1 };
        a.push(("network.peer.address", Value::Str(peer.ip().to_string())));
        a.push(("network.peer.port", Value::Int(i64::from(peer.port()))));
        if server {
            a.push(("client.address", Value::Str(peer.ip().to_string())));
        }
        a.push(("network.protocol.name", Value::Static("http")));
        a.push(("network.protocol.version", Value::Static("2")));
        if s.headers_lost || s.request.is_none() {
            a.push(("zerotrace.http2.headers", Value::Static("not captured (joined mid-connection, or beyond the capture size)")));
        }
        a.push(("thread.id", Value::Int(i64::from(s.tid))));
        Span {
            pid,
            trace_id: s.trace_id,
            span_id: span_id(s.span),
            parent: s.parent,
            parent_is_remote: s.remote,
            trace_state: s.trace_state,
            kind: if server { SpanKind::Server } else { SpanKind::Client },
            name: if name.is_empty() { "HTTP/2".to_owned() } else { name },
            start_unix_ns: self.clock.to_unix(s.start_ns),
            end_unix_ns: self.clock.to_unix(end_ns.max(s.start_ns)),
            attributes: a,
            status,
        }
    }
}

/// The attributes of a gRPC call (server or client side) by the semantic conventions
/// v1.44 (RPC, gRPC), from its path and status code; returns the span's name and status.
/// `rpc.method` is the fully-qualified `package.Service/Method` and names the span; a method
/// the server did not recognise (UNIMPLEMENTED) or a path that is not `/Service/Method` is
/// `_OTHER`, with the path in `rpc.method_original` and the span named after the system.
pub(super) fn grpc_attributes(path: &str, code: Option<i64>, server: bool, a: &mut Vec<(&'static str, Value)>) -> (String, Status) {
    let name;
    let full = path.strip_prefix('/').filter(|p| p.split_once('/').is_some_and(|(svc, m)| !svc.is_empty() && !m.is_empty() && !m.contains('/')));
    a.push(("rpc.system.name", Value::Static("grpc")));
    match full {
        Some(m) if code != Some(12) => {
            name = m.to_owned();
            a.push(("rpc.method", Value::Str(m.to_owned())));
        }
        _ => {
            name = "grpc".to_owned();
            a.push(("rpc.method", Value::Static("_OTHER")));
            let original = path.trim_start_matches('/');
            if !original.is_empty() {
                a.push(("rpc.method_original", Value::Str(original.to_owned())));
            }
        }
    }
    let code_name = code
        .map(|c| usize::try_from(c).ok().and_then(|i| crate::attributes::GRPC_STATUS.get(i)).map_or_else(|| Value::Str(c.to_string()), |n| Value::Static(n)));
    if let Some(n) = &code_name {
        a.push(("rpc.response.status_code", n.clone()));
    }
    // Server errors are the codes that mean the server failed; for a client every code
    // but OK is one. `error.type` is the status code of a failed call.
    let failed = match code {
        Some(c) if server => matches!(c, 2 | 4 | 12 | 13 | 14 | 15),
        Some(c) => c != 0,
        None => false,
    };
    if failed && let Some(n) = code_name {
        a.push(("error.type", n));
    }
    (name, if failed { Status::Error(format!("gRPC status {}", code.unwrap_or(0))) } else { Status::Unset })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::correlate::Clock;

    fn grpc_span(path: &str, code: Option<i64>, server: bool) -> Span {
        let c = Correlator::new(Clock::fixed(0));
        let request = Headers {
            method: Some("POST".into()),
            path: Some(path.into()),
            authority: Some("127.0.0.1:50051".into()),
            content_type: Some("application/grpc".into()),
            ..Headers::default()
        };
        let s = Stream {
            span: 1,
            trace_id: TraceId([1; 16]),
            parent: None,
            remote: false,
            trace_state: None,
            tid: 7,
            start_ns: 10,
            request: Some(request),
            response: None,
            grpc_status: code,
            reset: None,
            headers_lost: false,
        };
        let flow = ("127.0.0.1:40000".parse().unwrap(), "127.0.0.1:50051".parse().unwrap());
        c.stream_span(1, server, flow, s, 20, false)
    }

    fn attr(s: &Span, k: &str) -> Option<String> {
        s.attr(k).map(|v| v.to_string())
    }

    /// Semantic conventions v1.44 for gRPC: `rpc.system.name`, the fully-qualified
    /// `rpc.method` as the span's name, the status code's name, `error.type` on failure.
    #[test]
    fn grpc_spans_follow_the_rpc_conventions() {
        let s = grpc_span("/shop.v1.Catalog/Get", Some(5), true);
        assert_eq!(s.name, "shop.v1.Catalog/Get");
        assert_eq!(attr(&s, "rpc.system.name").as_deref(), Some("grpc"));
        assert_eq!(attr(&s, "rpc.method").as_deref(), Some("shop.v1.Catalog/Get"));
        assert_eq!(attr(&s, "rpc.response.status_code").as_deref(), Some("NOT_FOUND"));
        assert_eq!(attr(&s, "error.type"), None, "NOT_FOUND is not a server error");
        assert_eq!(s.status, Status::Unset);
        for old in ["rpc.system", "rpc.service", "rpc.grpc.status_code"] {
            assert_eq!(attr(&s, old), None, "{old}");
        }
        let c = grpc_span("/shop.v1.Catalog/Get", Some(5), false);
        assert_eq!(attr(&c, "error.type").as_deref(), Some("NOT_FOUND"), "every code but OK fails a client call");
        let s = grpc_span("/shop.v1.Catalog/Get", Some(13), true);
        assert_eq!((attr(&s, "error.type").as_deref(), s.status.clone()), (Some("INTERNAL"), Status::Error("gRPC status 13".into())));
        // An unknown code keeps its number.
        assert_eq!(attr(&grpc_span("/a.B/C", Some(42), true), "rpc.response.status_code").as_deref(), Some("42"));
        // No trailers: no status code made up.
        assert_eq!(attr(&grpc_span("/a.B/C", None, true), "rpc.response.status_code"), None);
    }

    /// A method the server does not know (UNIMPLEMENTED) or a path that is not
    /// `/Service/Method` is `_OTHER`, with the original in `rpc.method_original`, and the
    /// span is named after the system.
    #[test]
    fn unknown_grpc_methods_are_other() {
        let s = grpc_span("/shop.v1.Catalog/Nope", Some(12), true);
        assert_eq!((s.name.as_str(), attr(&s, "rpc.method").as_deref()), ("grpc", Some("_OTHER")));
        assert_eq!(attr(&s, "rpc.method_original").as_deref(), Some("shop.v1.Catalog/Nope"));
        assert_eq!(attr(&s, "error.type").as_deref(), Some("UNIMPLEMENTED"));
        for path in ["/", "/justone", "/a/b/c", ""] {
            let s = grpc_span(path, Some(0), true);
            assert_eq!((s.name.as_str(), attr(&s, "rpc.method").as_deref()), ("grpc", Some("_OTHER")), "{path}");
        }
    }
}
