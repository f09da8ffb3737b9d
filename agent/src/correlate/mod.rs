//! Span assembly: kernel events in, finished spans out. A server span is the request read on
//! a connection (its first bytes, parsed) joined with the response that ends it; in handler
//! mode the Go handler's own record (route, status, goroutine) is merged into that same span,
//! never emitted twice. Timestamps become wall-clock time here.
pub mod clock;

use std::{collections::HashMap, sync::Arc};

use crate::{
    events::{Addrs, Event, GoServerRequest, HttpRequest, HttpResponse},
    protocols::http1,
    spans::{RemoteParent, Span, SpanId, SpanKind, Status, TraceId, Value},
};
pub use clock::Clock;

/// Requests waiting for their response, at most.
pub const MAX_PENDING: usize = 65_536;
/// Distinct route patterns remembered, at most.
pub const MAX_PATTERNS: usize = 16_384;

#[derive(Clone, Debug)]
struct Conn {
    pid: u32,
    /// The kernel socket (what Go handler records refer to).
    sk: u64,
    addrs: Addrs,
    /// The peer address, rendered once per connection.
    peer: Arc<str>,
}

#[derive(Debug)]
struct Pending {
    seq: u32,
    tid: u32,
    goid: u64,
    start_ns: u64,
    /// Request bytes captured so far (possibly from several reads), parsed at the end.
    bytes: Vec<u8>,
    /// Size of the largest read so far: its thread and goroutine are the request's.
    largest_read: u32,
    /// Handler mode: what the Go handler reported for this request.
    go: Option<Box<GoServerRequest>>,
}

/// What the correlator saw go wrong; all counted, reported by the agent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub spans: u64,
    /// A response whose request was never seen (attached mid-request, or an event lost).
    pub unmatched_responses: u64,
    /// Bytes read that are not an HTTP/1 request (other protocols, TLS).
    pub not_http: u64,
    /// A request replaced by the next one before its response came (response lost).
    pub lost_responses: u64,
    /// Requests still open when their connection closed.
    pub abandoned: u64,
    /// Requests not tracked because MAX_PENDING were open.
    pub pending_full: u64,
    /// Route patterns that could not be read from the target.
    pub pattern_reads_failed: u64,
}

/// Reads `len` bytes of a target's memory at an address, as a string.
pub type MemoryReader = Box<dyn Fn(u32, u64, usize) -> Option<String> + Send>;

pub struct Correlator {
    clock: Clock,
    memory: MemoryReader,
    /// Route patterns by (pid, address, length): read once, they do not change.
    patterns: HashMap<(u32, u64, u16), Arc<str>>,
    conns: HashMap<u64, Conn>,
    by_sk: HashMap<u64, u64>,
    pending: HashMap<u64, Pending>,
    pub stats: Stats,
}

impl Correlator {
    /// A correlator that reads route patterns from the traced processes.
    pub fn new(clock: Clock) -> Self {
        Self::with_memory(
            clock,
            Box::new(|pid, addr, len| {
                crate::model::memory::read(pid, addr, len).ok().map(|b| String::from_utf8_lossy(&b).into_owned())
            }),
        )
    }

    pub fn with_memory(clock: Clock, memory: MemoryReader) -> Self {
        Self {
            clock,
            memory,
            patterns: HashMap::new(),
            conns: HashMap::new(),
            by_sk: HashMap::new(),
            pending: HashMap::new(),
            stats: Stats::default(),
        }
    }

    /// The route pattern at (addr, len) in `pid`, read once and cached.
    fn pattern(&mut self, pid: u32, addr: u64, len: u16) -> Option<Arc<str>> {
        if addr == 0 || len == 0 {
            return None;
        }
        if let Some(p) = self.patterns.get(&(pid, addr, len)) {
            return Some(p.clone());
        }
        match (self.memory)(pid, addr, len as usize) {
            Some(s) => {
                let s: Arc<str> = s.into();
                if self.patterns.len() < MAX_PATTERNS {
                    self.patterns.insert((pid, addr, len), s.clone());
                }
                Some(s)
            }
            None => {
                self.stats.pattern_reads_failed += 1;
                None
            }
        }
    }

    pub fn clock_mut(&mut self) -> &mut Clock {
        &mut self.clock
    }

    /// A server connection the kernel announced.
    pub fn add_conn(&mut self, conn_id: u64, pid: u32, sk: u64, addrs: Addrs) {
        let peer: Arc<str> = addrs.peer.addr.to_string().into();
        self.conns.insert(conn_id, Conn { pid, sk, addrs, peer });
        self.by_sk.insert(sk, conn_id);
    }

    /// Forgets everything about a process that is no longer traced.
    pub fn forget_pid(&mut self, pid: u32) {
        let ids: Vec<u64> = self.conns.iter().filter(|(_, c)| c.pid == pid).map(|(id, _)| *id).collect();
        for id in ids {
            self.drop_conn(id);
        }
    }

    fn drop_conn(&mut self, id: u64) {
        if let Some(c) = self.conns.remove(&id) {
            if self.by_sk.get(&c.sk) == Some(&id) {
                self.by_sk.remove(&c.sk);
            }
        }
        if self.pending.remove(&id).is_some() {
            self.stats.abandoned += 1;
        }
    }

    /// Feeds one event; finished spans are appended to `out`.
    pub fn on_event(&mut self, ev: Event, out: &mut Vec<Span>) {
        match ev {
            Event::ConnOpen { pid, conn_id, sk, addrs, .. } => self.add_conn(conn_id, pid, sk, addrs),
            Event::ConnClose { conn_id, .. } => self.drop_conn(conn_id),
            Event::HttpRequest(r) => self.on_request(r),
            Event::HttpResponse(r) => {
                if let Some(span) = self.on_response(r) {
                    self.stats.spans += 1;
                    out.push(span);
                }
            }
            Event::GoServerRequest(g) => {
                if let Some(span) = self.on_go_request(g) {
                    self.stats.spans += 1;
                    out.push(span);
                }
            }
        }
    }

    fn on_request(&mut self, r: HttpRequest) {
        if r.offset > 0 {
            // More bytes of a request already open: append them where they belong.
            if let Some(p) = self.pending.get_mut(&r.conn_id) {
                if p.seq == r.seq && p.bytes.len() == r.offset as usize {
                    p.bytes.extend_from_slice(&r.head);
                    if r.read_len > p.largest_read {
                        (p.largest_read, p.tid, p.goid) = (r.read_len, r.tid, r.goid);
                    }
                }
            }
            return;
        }
        if !self.pending.contains_key(&r.conn_id) && self.pending.len() >= MAX_PENDING {
            self.stats.pending_full += 1;
            return;
        }
        let p = Pending {
            seq: r.seq,
            tid: r.tid,
            goid: r.goid,
            start_ns: r.start_ns,
            bytes: r.head,
            largest_read: r.read_len,
            go: None,
        };
        if self.pending.insert(r.conn_id, p).is_some() {
            self.stats.lost_responses += 1;
        }
    }

    fn on_response(&mut self, r: HttpResponse) -> Option<Span> {
        let Some(p) = self.pending.remove(&r.conn_id) else {
            self.stats.unmatched_responses += 1;
            return None;
        };
        if p.seq != r.seq {
            self.stats.unmatched_responses += 1;
            return None;
        }
        let Some(head) = http1::parse_request(&p.bytes) else {
            self.stats.not_http += 1;
            tracing::debug!(pid = r.pid, conn = r.conn_id, seq = r.seq, head = %String::from_utf8_lossy(&p.bytes[..p.bytes.len().min(48)]).escape_debug(), "request bytes are not HTTP/1");
            return None;
        };
        let conn = self.conns.get(&r.conn_id).map(|c| (c.addrs, c.peer.clone()));
        let mut status = http1::parse_status(&r.status_line[..r.status_len as usize]).map(i64::from);
        let kernel_pattern = self.pattern(r.pid, r.pattern_ptr, r.pattern_len);
        let mut pattern: &str = kernel_pattern.as_deref().unwrap_or("");
        let mut goid = p.goid;
        if let Some(go) = &p.go {
            if pattern.is_empty() {
                pattern = &go.pattern;
            }
            if status.is_none() && go.status > 0 {
                status = Some(go.status);
            }
            goid = go.goid;
        }
        let fields = ServerFields {
            pid: r.pid,
            tid: p.tid,
            goid,
            method: &head.method,
            path: head.path(),
            pattern,
            status,
            host: head.host.as_deref(),
            user_agent: head.user_agent.as_deref(),
            minor_version: Some(head.minor_version),
            parent: head.traceparent.as_deref().and_then(|tp| RemoteParent::parse(tp, head.tracestate.as_deref())),
            addrs: conn,
            start_ns: p.start_ns,
            end_ns: r.end_ns.max(p.start_ns),
        };
        Some(self.server_span(fields))
    }

    /// Handler mode: a serverHandler.ServeHTTP call finished. If the connection's request is
    /// open at the syscall level, the Go facts wait for the response there (one span); else
    /// the handler's record is the span.
    fn on_go_request(&mut self, g: Box<GoServerRequest>) -> Option<Span> {
        if g.sk != 0 {
            if let Some(id) = self.by_sk.get(&g.sk) {
                if let Some(p) = self.pending.get_mut(id) {
                    p.go = Some(g);
                    return None;
                }
            }
        }
        let addrs = if g.sk != 0 {
            self.by_sk.get(&g.sk).and_then(|id| self.conns.get(id)).map(|c| (c.addrs, c.peer.clone()))
        } else {
            None
        };
        let minor = match g.proto.as_str() {
            "HTTP/1.0" => Some(0),
            "HTTP/1.1" => Some(1),
            _ => None,
        };
        let host = (!g.host.is_empty()).then_some(g.host.as_str());
        let fields = ServerFields {
            pid: g.pid,
            tid: g.tid,
            goid: g.goid,
            method: &g.method,
            path: &g.path,
            pattern: &g.pattern,
            // An untouched response is an implicit 200.
            status: Some(if g.status > 0 { g.status } else { 200 }),
            host,
            user_agent: None,
            minor_version: minor,
            parent: None,
            addrs,
            start_ns: g.start_ns,
            end_ns: g.end_ns,
        };
        Some(self.server_span(fields))
    }

    fn server_span(&self, f: ServerFields<'_>) -> Span {
        let route = route_of(f.pattern);
        let known = http1::known_method(f.method);
        let name = match (route, known) {
            (Some(r), Some(m)) => format!("{m} {r}"),
            (Some(r), None) => format!("HTTP {r}"),
            (None, Some(m)) => format!("{m} {}", f.path),
            (None, None) => "HTTP".to_owned(),
        };
        let mut a: Vec<(&'static str, Value)> = Vec::with_capacity(16);
        a.push(("http.request.method", Value::Static(known.unwrap_or("_OTHER"))));
        if known.is_none() {
            a.push(("http.request.method_original", Value::Str(f.method.to_owned())));
        }
        a.push(("url.path", Value::Str(f.path.to_owned())));
        a.push(("url.scheme", Value::Static("http")));
        if let Some(r) = route {
            a.push(("http.route", Value::Str(r.to_owned())));
        }
        if let Some(s) = f.status {
            a.push(("http.response.status_code", Value::Int(s)));
        }
        if let Some(h) = f.host.and_then(host_name) {
            a.push(("server.address", Value::Str(h.to_owned())));
        }
        if let Some((addrs, peer)) = f.addrs {
            a.push(("server.port", Value::Int(i64::from(addrs.local.port))));
            a.push(("network.peer.address", Value::Shared(peer.clone())));
            a.push(("network.peer.port", Value::Int(i64::from(addrs.peer.port))));
            a.push(("client.address", Value::Shared(peer)));
        }
        if let Some(ua) = f.user_agent {
            a.push(("user_agent.original", Value::Str(ua.to_owned())));
        }
        if let Some(m) = f.minor_version {
            a.push(("network.protocol.name", Value::Static("http")));
            a.push(("network.protocol.version", Value::Static(if m == 0 { "1.0" } else { "1.1" })));
        }
        a.push(("thread.id", Value::Int(i64::from(f.tid))));
        if f.goid != 0 {
            a.push(("go.goroutine.id", Value::Int(f.goid as i64)));
        }
        let status = match f.status {
            Some(s) if s >= 500 => Status::Error(String::new()),
            _ => Status::Unset,
        };
        let (trace_id, parent, remote, trace_state) = match f.parent {
            Some(p) => (p.trace_id, Some(p.span_id), true, p.trace_state),
            None => (TraceId::random(), None, false, None),
        };
        Span {
            pid: f.pid,
            trace_id,
            span_id: SpanId::random(),
            parent,
            parent_is_remote: remote,
            trace_state,
            kind: SpanKind::Server,
            name,
            start_unix_ns: self.clock.to_unix(f.start_ns),
            end_unix_ns: self.clock.to_unix(f.end_ns),
            attributes: a,
            status,
        }
    }
}

struct ServerFields<'a> {
    pid: u32,
    tid: u32,
    goid: u64,
    method: &'a str,
    path: &'a str,
    pattern: &'a str,
    status: Option<i64>,
    host: Option<&'a str>,
    user_agent: Option<&'a str>,
    minor_version: Option<u8>,
    parent: Option<RemoteParent>,
    addrs: Option<(Addrs, Arc<str>)>,
    start_ns: u64,
    end_ns: u64,
}

/// The path template of a Go ServeMux pattern: "[METHOD ][HOST]/PATH" -> "/PATH", with
/// Go's exact-match marker dropped ("/{$}" is the route "/").
pub fn route_of(pattern: &str) -> Option<&str> {
    let p = pattern.trim();
    if p.is_empty() {
        return None;
    }
    let p = match p.split_once([' ', '\t']) {
        Some((_, rest)) => rest.trim_start(),
        None => p,
    };
    let route = &p[p.find('/')?..];
    Some(route.strip_suffix("{$}").unwrap_or(route))
}

/// Host part of a Host header ("api:8080" -> "api", "[::1]:80" -> "::1").
fn host_name(h: &str) -> Option<&str> {
    let h = h.trim();
    if let Some(rest) = h.strip_prefix('[') {
        return rest.split(']').next().filter(|s| !s.is_empty());
    }
    h.split(':').next().filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests;
