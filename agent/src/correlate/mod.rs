//! Span assembly: kernel events in, finished spans out. A server span is the request read on
//! a connection (its first bytes, parsed) joined with the response that ends it; in handler
//! mode the Go handler's own record (route, status, goroutine) is merged into that same span,
//! never emitted twice. Timestamps become wall-clock time here.
pub mod clock;
mod framing;
mod h2;
mod native;
mod pipeline;
pub mod sampling;
pub mod traces;

use std::sync::Arc;

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

use crate::{
    events::{
        Addrs, Event, GoClientRequest, GoClientResponse, GoH2End, GoH2Start, GoRpcStart, GoServerRequest, GoSqlEnd, GoSqlStart, HttpRequest, HttpResponse,
    },
    protocols::http1,
    spans::{RemoteParent, Span, SpanId, SpanKind, Status, TraceId, Value},
};
pub use clock::Clock;

/// How a native process's client requests find their parent (`--native-parents`): the
/// process's one open server request (async runtimes), or the request the calling thread
/// serves (thread-per-request servers).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum NativeParents {
    #[default]
    OneOpen,
    Thread,
}

use traces::{Traces, span_id};

/// The correlator's figures that are gauges, not running totals.
pub const GAUGES: &[&str] = &["connections_held"];

/// Requests waiting for their response, at most.
pub const MAX_PENDING: usize = 65_536;
/// A Go client or SQL call whose return has not come this long after its start is forgotten
/// (`client_calls_expired`): its return was lost (a panic unwound past its RET probes, a
/// record lost to a full ring buffer).
pub const CALL_EXPIRY: std::time::Duration = std::time::Duration::from_secs(30 * 60);
/// Distinct route patterns remembered, at most.
pub const MAX_PATTERNS: usize = 16_384;

#[derive(Clone, Debug)]
struct Conn {
    pid: u32,
    /// zerotrace_common::ConnRole.
    role: u8,
    /// The kernel socket (what Go handler records refer to).
    sk: u64,
    addrs: Addrs,
    /// The peer address, rendered once per connection.
    peer: Arc<str>,
}

#[derive(Debug)]
struct Pending {
    pid: u32,
    /// The thread that read the request's first bytes (`--native-parents thread`).
    first_tid: u32,
    seq: u32,
    tid: u32,
    goid: u64,
    start_ns: u64,
    /// Request bytes captured so far (possibly from several reads), parsed at the end.
    bytes: Vec<u8>,
    /// Size of the largest read so far: its thread and goroutine are the request's.
    largest_read: u32,
    /// The same-host client span the kernel linked the read to (0: none), and the place of
    /// this request among those that came pipelined in that read (1: the first).
    link_span: u64,
    index: u32,
    /// Handler mode: what the Go handler reported for this request.
    go: Option<Box<GoServerRequest>>,
    /// Kernel span id (0: none) and where the span sits: decided when the request starts,
    /// because children may need its trace before the response ends it.
    span_id: u64,
    ids: Ids,
    /// The request came in plaintext from a TLS connection (https).
    tls: bool,
    /// The trace the kernel gave the span and where it came from (see Traces::alias).
    kernel_trace: [u8; 16],
    kernel_trace_origin: u8,
    /// A native server's response so far (where it ends), once it started.
    framing: Option<framing::Progress>,
    /// A pipelined request's Go route pattern, read when its response started.
    route: Option<Arc<str>>,
    /// Handler mode: records of Go handlers that ran for requests pipelined behind this one
    /// (the handler of request n + 1 returns before its response, so before this one ends).
    #[allow(clippy::vec_box)]
    queued_go: Vec<Box<GoServerRequest>>,
}

/// Who made a Go call and when.
struct Call {
    pid: u32,
    tid: u32,
    goid: u64,
    span_id: u64,
    start_ns: u64,
    end_ns: u64,
}

/// A span's place in its trace.
#[derive(Clone, Debug)]
struct Ids {
    trace_id: TraceId,
    parent: Option<SpanId>,
    /// The parent came from an incoming traceparent header.
    remote: bool,
    trace_state: Option<String>,
}

/// A database/sql call waiting for its return.
#[derive(Debug)]
struct PendingSql {
    start: Box<GoSqlStart>,
    text: Option<String>,
    trace_id: TraceId,
    parent: Option<SpanId>,
}

/// A grpc-go server stream waiting for its status.
#[derive(Debug)]
struct PendingRpc {
    start: Box<GoRpcStart>,
    trace_id: TraceId,
    /// The client stream's span on this host that it answers (same flow and stream id), or
    /// its incoming traceparent's parent (`remote`).
    parent: Option<SpanId>,
    remote: bool,
}

/// A Go HTTP/2 server stream waiting for its handler's return.
#[derive(Debug)]
struct PendingH2 {
    start: Box<GoH2Start>,
    ids: Ids,
    /// Its connection's addresses, taken at the start (the client may close the connection
    /// before the handler's end record is read).
    addrs: Option<(Addrs, Arc<str>)>,
}

/// A Go client call waiting for its return.
#[derive(Debug)]
struct PendingClient {
    req: Box<GoClientRequest>,
    trace_id: TraceId,
    parent: Option<SpanId>,
    /// `--inject-traceparent`: the kernel's decision for this request, the trace it named and
    /// its sampled flag.
    traceparent: Option<(u8, [u8; 16], bool)>,
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
    /// Server spans linked to a same-host client span (no header needed).
    pub linked: u64,
    /// Client call returns whose start was not seen.
    pub unmatched_client_returns: u64,
    /// HTTP/2 connection directions that became unreadable (no preface, or bytes not
    /// captured where a frame header was).
    pub h2_unreadable: u64,
    /// Responses to pipelined requests whose bytes were not captured (beyond the capture
    /// size, or a body the capture cut): no span.
    pub pipelined_uncaptured: u64,
    /// Connections closed by a sweep: the kernel no longer had them and no close record
    /// came (lost to a full ring; or state made again by a record that came after the close,
    /// or for a connection whose kernel state the agent removed).
    pub closed_unseen: u64,
    /// Go client and SQL calls forgotten `CALL_EXPIRY` after their start (return not seen).
    pub calls_expired: u64,
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
    clients: HashMap<u64, PendingClient>,
    rpcs: HashMap<u64, PendingRpc>,
    h2_streams: HashMap<u64, PendingH2>,
    sql: HashMap<u64, PendingSql>,
    /// Native (not Go) client requests waiting for their response's end, by connection.
    native: HashMap<u64, native::NativeCall>,
    /// Open server requests per process: (connection, HTTP/2 stream or 0) -> span id.
    open: HashMap<u32, HashMap<(u64, u32), u64>>,
    /// `--native-parents thread`: the open HTTP/1 server request each thread read, by
    /// (pid, tid): (connection, span id).
    threads: HashMap<(u32, u32), (u64, u64)>,
    /// How native client requests find their parent inside their process.
    pub native_parents: NativeParents,
    /// Connections held here that CONNS did not have at the last sweep (`sweep`).
    unseen_closes: HashSet<u64>,
    /// HTTP/2 connections of native processes, and client streams offered for links.
    h2: HashMap<u64, h2::H2Conn>,
    h2_links: HashMap<h2::LinkKey, u64>,
    /// Native server requests already ended by their response's framing, by connection:
    /// the kernel's end record for them (at the next read) is expected and dropped.
    finished: HashMap<u64, u32>,
    /// Server requests that came pipelined behind one already answered, by connection.
    leftovers: HashMap<u64, pipeline::Leftover>,
    /// Native clients' batches of pipelined requests, by the first request's span id.
    batches: HashMap<u64, pipeline::Batch>,
    /// Per server connection: the same-host client offer its last request was read with,
    /// and that request's place among those the offer covers.
    last_link: HashMap<u64, (u64, u32)>,
    /// Whether (pid, addr, len) is read-only file-backed memory of the target (safe to read
    /// later: it cannot change).
    readonly: Box<dyn Fn(u32, u64, u64) -> bool + Send>,
    pub traces: Traces,
    /// Which traces are kept (applied by the run loop to finished spans).
    pub sampling: sampling::Sampling,
    pub stats: Stats,
}

impl Correlator {
    /// A correlator that reads route patterns from the traced processes.
    pub fn new(clock: Clock) -> Self {
        let mut c = Self::with_memory(
            clock,
            Box::new(|pid, addr, len| crate::model::memory::read(pid, addr, len).ok().map(|b| String::from_utf8_lossy(&b).into_owned())),
        );
        c.readonly = Box::new(crate::model::proc::in_readonly_file_mapping);
        c
    }

    pub fn with_memory(clock: Clock, memory: MemoryReader) -> Self {
        Self {
            clock,
            memory,
            patterns: HashMap::default(),
            conns: HashMap::default(),
            by_sk: HashMap::default(),
            pending: HashMap::default(),
            clients: HashMap::default(),
            rpcs: HashMap::default(),
            h2_streams: HashMap::default(),
            sql: HashMap::default(),
            native: HashMap::default(),
            open: HashMap::default(),
            threads: HashMap::default(),
            native_parents: NativeParents::OneOpen,
            h2: HashMap::default(),
            h2_links: HashMap::default(),
            unseen_closes: HashSet::default(),
            finished: HashMap::default(),
            leftovers: HashMap::default(),
            batches: HashMap::default(),
            last_link: HashMap::default(),
            readonly: Box::new(|_, _, _| true),
            traces: Traces::default(),
            sampling: sampling::Sampling::new(sampling::Sampler::AlwaysOn),
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
    pub fn add_conn(&mut self, conn_id: u64, pid: u32, sk: u64, role: u8, addrs: Addrs) {
        let peer: Arc<str> = addrs.peer.addr.to_string().into();
        self.conns.insert(conn_id, Conn { pid, role, sk, addrs, peer });
        self.by_sk.insert(sk, conn_id);
    }

    /// Forgets everything about a process that is no longer traced.
    pub fn forget_pid(&mut self, pid: u32) {
        let ids: Vec<u64> = self.conns.iter().filter(|(_, c)| c.pid == pid).map(|(id, _)| *id).collect();
        for id in ids {
            self.drop_conn(id);
        }
        self.clients.retain(|_, c| c.req.pid != pid);
        self.sql.retain(|_, c| c.start.pid != pid);
        self.rpcs.retain(|_, c| c.start.pid != pid);
        self.h2_streams.retain(|_, c| c.start.pid != pid);
        self.open.remove(&pid);
        self.threads.retain(|(p, _), _| *p != pid);
        // Else a churn of processes fills the cache (MAX_PATTERNS) with the gone ones'
        // patterns, and new processes' patterns are read from their memory at every request.
        self.patterns.retain(|(p, _, _), _| *p != pid);
    }

    /// A connection's end: what waited for it is finished (or counted), then forgotten.
    fn close_conn(&mut self, conn_id: u64, out: &mut Vec<Span>) {
        self.end_native(conn_id, out);
        self.close_h2(conn_id, out);
        self.drop_leftover(conn_id, out);
        if let Some(p) = self.pending.get_mut(&conn_id) {
            let queued = std::mem::take(&mut p.queued_go);
            self.flush_go(queued, out);
        }
        self.drop_conn(conn_id);
    }

    /// Closes the connections the kernel no longer tracks (`live`: the ids in CONNS) though
    /// no close record came for them (lost to a full ring buffer): at the second sweep in a
    /// row that misses one, since at the first its close may still be in the ring. Also
    /// forgets Go client and SQL calls started more than `CALL_EXPIRY` before `now_ns` (their
    /// return was never seen). Counted: `connections_closed_unseen`, `client_calls_expired`.
    pub fn sweep(&mut self, live: &HashSet<u64>, now_ns: u64, out: &mut Vec<Span>) {
        let missing: HashSet<u64> = self.held_ids().filter(|id| !live.contains(id)).collect();
        let (gone, suspects): (Vec<u64>, Vec<u64>) = missing.into_iter().partition(|id| self.unseen_closes.contains(id));
        for id in gone {
            self.close_conn(id, out);
            self.stats.closed_unseen += 1;
        }
        self.unseen_closes = suspects.into_iter().collect();
        let conns = &self.conns;
        self.by_sk.retain(|_, id| conns.contains_key(id));
        let fresh = |start_ns: u64| now_ns.saturating_sub(start_ns) < CALL_EXPIRY.as_nanos() as u64;
        let before = self.clients.len() + self.sql.len() + self.rpcs.len() + self.h2_streams.len();
        self.clients.retain(|_, c| fresh(c.req.start_ns));
        self.sql.retain(|_, q| fresh(q.start.start_ns));
        self.rpcs.retain(|_, r| fresh(r.start.start_ns));
        self.h2_streams.retain(|_, r| fresh(r.start.start_ns));
        self.stats.calls_expired += (before - self.clients.len() - self.sql.len() - self.rpcs.len() - self.h2_streams.len()) as u64;
    }

    /// Whether a sweep has anything to look at (else the walk of CONNS is skipped).
    pub fn holds_anything(&self) -> bool {
        self.held_ids().next().is_some()
            || !self.by_sk.is_empty()
            || !self.clients.is_empty()
            || !self.sql.is_empty()
            || !self.rpcs.is_empty()
            || !self.h2_streams.is_empty()
    }

    /// The connection ids of every per-connection table (an id once per table).
    fn held_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.conns
            .keys()
            .chain(self.pending.keys())
            .chain(self.native.keys())
            .chain(self.h2.keys())
            .chain(self.finished.keys())
            .chain(self.leftovers.keys())
            .chain(self.last_link.keys())
            .copied()
    }

    /// How many connections the correlator holds state for (`connections_held`, a gauge:
    /// back to 0 once every traced connection has closed).
    pub fn connections_held(&self) -> u64 {
        self.held_ids().collect::<HashSet<u64>>().len() as u64
    }

    fn drop_conn(&mut self, id: u64) {
        if let Some(c) = self.conns.remove(&id)
            && self.by_sk.get(&c.sk) == Some(&id)
        {
            self.by_sk.remove(&c.sk);
        }
        if self.take_pending(id).is_some() {
            self.stats.abandoned += 1;
        }
        if let Some(c) = self.native.remove(&id) {
            self.batches.remove(&c.first);
        }
        self.finished.remove(&id);
        self.leftovers.remove(&id);
        self.last_link.remove(&id);
        self.h2.remove(&id);
    }

    /// Removes the open server request of connection `id` (and from its process's open set).
    fn take_pending(&mut self, id: u64) -> Option<Pending> {
        let p = self.pending.remove(&id)?;
        if let Some(m) = self.open.get_mut(&p.pid) {
            m.remove(&(id, 0));
            if m.is_empty() {
                self.open.remove(&p.pid);
            }
        }
        if self.threads.get(&(p.pid, p.first_tid)).is_some_and(|(c, _)| *c == id) {
            self.threads.remove(&(p.pid, p.first_tid));
        }
        Some(p)
    }

    /// Feeds one event; finished spans are appended to `out`.
    pub fn on_event(&mut self, ev: Event, out: &mut Vec<Span>) {
        match ev {
            Event::ConnOpen { pid, conn_id, sk, role, addrs, .. } => self.add_conn(conn_id, pid, sk, role, addrs),
            Event::ConnClose { conn_id, .. } => self.close_conn(conn_id, out),
            Event::HttpRequest(r) => self.on_request(r, out),
            Event::SockClientRequest(r) => self.on_native_request(r, out),
            Event::SockClientResponse(r) => self.on_native_response(r, out),
            Event::SockClientRecv(r) => self.on_native_recv(r, out),
            Event::SockServerResponse(r) => self.on_server_response(r, out),
            Event::SockServerSend(b) => self.on_server_send(b, out),
            Event::SockServerPipelined(r) => self.on_server_pipelined(r, out),
            Event::SockH2(b) => self.on_h2(b, out),
            // CPU samples go to the profiler (run loop); a replay has no use for them here.
            Event::CpuSample(_) => {}
            Event::HttpResponse(r) => self.on_response(r, out),
            Event::GoServerRequest(g) => self.on_go_request(g, out),
            Event::GoClientRequest(c) => self.on_client_request(c),
            Event::GoSqlStart(q) => self.on_sql_start(q),
            Event::GoRpcStart(q) => self.on_rpc_start(q),
            Event::GoRpcEnd(r) => match self.rpcs.remove(&r.span_id) {
                Some(p) => {
                    // A client stream's offer ends with it (its server, if on this host,
                    // took it long before).
                    if p.start.client
                        && let Some((c, s)) = p.start.flow
                    {
                        self.h2_links.remove(&(c, s, p.start.stream_id));
                    }
                    self.stats.spans += 1;
                    out.push(self.rpc_span(p, &r));
                }
                None => self.stats.unmatched_client_returns += 1,
            },
            Event::GoH2Start(q) => self.on_h2_start(q),
            Event::GoH2End(r) => match self.h2_streams.remove(&r.span_id) {
                Some(p) => {
                    self.stats.spans += 1;
                    out.push(self.h2_span(p, &r));
                }
                None => self.stats.unmatched_client_returns += 1,
            },
            Event::GoSqlEnd(r) => {
                if let Some(p) = self.sql.remove(&r.span_id) {
                    self.stats.spans += 1;
                    out.push(self.sql_span(p, &r));
                } else {
                    self.stats.unmatched_client_returns += 1;
                }
            }
            Event::GoClientResponse(r) => {
                if let Some(span) = self.on_client_response(r) {
                    self.stats.spans += 1;
                    out.push(span);
                }
            }
            // Handled by the run loop (discovery), never routed here.
            Event::ProcExec { .. } => {}
            Event::Traceparent(t) => {
                if let Some(p) = self.clients.get_mut(&t.span_id) {
                    p.traceparent = Some((t.outcome, t.trace_id, t.sampled));
                }
            }
        }
    }

    /// Where a server span sits: under the incoming traceparent when the request has one,
    /// else under the same-host client span that sent it, else at the root of a new trace.
    fn server_ids(&mut self, head: &[u8], link_span: u64, kernel_trace: [u8; 16], origin: u8) -> Ids {
        if let Some(rp) = traceparent_in(head) {
            let trace_id = self.traces.resolve(rp.trace_id);
            // Only an id the kernel drew for this span alone stands for the incoming trace;
            // an inherited one is shared with other spans.
            if origin == zerotrace_common::trace_origin::DRAWN {
                self.traces.alias(kernel_trace, trace_id);
            }
            self.sampling.remote_decision(trace_id, rp.sampled);
            return Ids { trace_id, parent: Some(rp.span_id), remote: true, trace_state: rp.trace_state };
        }
        let (trace_id, parent) = self.traces.child_of(link_span, kernel_trace);
        if parent.is_some() {
            self.stats.linked += 1;
        }
        Ids { trace_id, parent, remote: false, trace_state: None }
    }

    /// A Go call (client or SQL) started while `open` calls of its kind are waiting: its
    /// trace and parent (its parent's trace, else a new one), remembered for its own
    /// children. None (counted) when MAX_PENDING are open already.
    fn call_ids(&mut self, open: usize, span: u64, parent: u64, kernel_trace: [u8; 16]) -> Option<(TraceId, Option<SpanId>)> {
        if open >= MAX_PENDING {
            self.stats.pending_full += 1;
            return None;
        }
        let (trace_id, parent) = self.traces.child_of(parent, kernel_trace);
        self.traces.remember(span, trace_id);
        Some((trace_id, parent))
    }

    fn on_client_request(&mut self, c: Box<GoClientRequest>) {
        let Some((trace_id, parent)) = self.call_ids(self.clients.len(), c.span_id, c.parent_span, c.trace_id) else { return };
        self.clients.insert(c.span_id, PendingClient { req: c, trace_id, parent, traceparent: None });
    }

    fn on_sql_start(&mut self, q: Box<GoSqlStart>) {
        let Some((trace_id, parent)) = self.call_ids(self.sql.len(), q.span_id, q.parent_span, [0; 16]) else { return };
        // The kernel could not read the text (page not resident): read it here, but only
        // from read-only file-backed memory (a constant in the executable), which cannot
        // have changed since.
        let len = (q.text_len as usize).min(zerotrace_common::bounds::SQL_TEXT_MAX);
        let text = q.text.clone().or_else(|| ((self.readonly)(q.pid, q.text_ptr, len as u64)).then(|| (self.memory)(q.pid, q.text_ptr, len)).flatten());
        self.sql.insert(q.span_id, PendingSql { start: q, text, trace_id, parent });
    }

    /// A grpc-go stream met its handler: its parent is the client stream offered on the
    /// same connection under the same stream id (a traced client on this host), if any.
    fn on_rpc_start(&mut self, q: Box<GoRpcStart>) {
        if q.client {
            // A client stream: under the span that made it; offered to the server on this
            // host that reads the stream (grpc-go or native) by connection and stream id.
            let Some((trace_id, parent)) = self.call_ids(self.rpcs.len(), q.span_id, q.parent_span, q.kernel_trace) else { return };
            if let Some((c, s)) = q.flow {
                self.offer_h2_link((c, s, q.stream_id), q.span_id);
            }
            self.rpcs.insert(q.span_id, PendingRpc { start: q, trace_id, parent, remote: false });
            return;
        }
        if self.rpcs.len() >= MAX_PENDING {
            self.stats.pending_full += 1;
            return;
        }
        let offered = q.flow.and_then(|(c, s)| self.h2_links.remove(&(c, s, q.stream_id))).unwrap_or(0);
        let ids = self.stream_ids(q.trace.as_ref(), offered, q.kernel_trace);
        self.traces.remember(q.span_id, ids.trace_id);
        self.rpcs.insert(q.span_id, PendingRpc { start: q, trace_id: ids.trace_id, parent: ids.parent, remote: ids.remote });
    }

    /// A Go HTTP/2 stream met its handler: its parent is the client stream a traced client
    /// on this host offered (the kernel's link, else a native client's stream on the same
    /// connection under the same id).
    fn on_h2_start(&mut self, q: Box<GoH2Start>) {
        if self.h2_streams.len() >= MAX_PENDING {
            self.stats.pending_full += 1;
            return;
        }
        let offered = match q.parent_span {
            0 => q.flow.and_then(|(c, s)| self.h2_links.remove(&(c, s, q.stream_id))).unwrap_or(0),
            p => p,
        };
        let ids = self.stream_ids(q.trace.as_ref(), offered, q.kernel_trace);
        self.traces.remember(q.span_id, ids.trace_id);
        let addrs = if q.sk != 0 { self.by_sk.get(&q.sk).and_then(|id| self.conns.get(id)).map(|c| (c.addrs, c.peer.clone())) } else { None };
        self.h2_streams.insert(q.span_id, PendingH2 { start: q, ids, addrs });
    }

    /// Where a server stream's span sits: under its incoming traceparent, else under the
    /// same-host client span `offered` (0: none), else at the root of a new trace (the one
    /// the kernel drew, `kernel`, when it did).
    fn stream_ids(&mut self, incoming: Option<&crate::spans::RemoteParent>, offered: u64, kernel: [u8; 16]) -> Ids {
        if let Some(rp) = incoming {
            let trace_id = self.traces.resolve(rp.trace_id);
            self.sampling.remote_decision(trace_id, rp.sampled);
            return Ids { trace_id, parent: Some(rp.span_id), remote: true, trace_state: None };
        }
        let (trace_id, parent) = self.traces.child_of(offered, kernel);
        if parent.is_some() {
            self.stats.linked += 1;
        }
        Ids { trace_id, parent, remote: false, trace_state: None }
    }

    /// The SERVER span of a Go HTTP/2 stream: the attributes of an HTTP/1 request's.
    fn h2_span(&self, p: PendingH2, r: &GoH2End) -> Span {
        let q = &p.start;
        self.server_span(ServerFields {
            pid: q.pid,
            tid: q.tid,
            goid: q.goid,
            method: &q.method,
            path: &q.path,
            pattern: &r.pattern,
            status: r.status,
            host: (!q.host.is_empty()).then_some(q.host.as_str()),
            user_agent: None,
            version: Some("2"),
            scheme: if q.tls { "https" } else { "http" },
            span_id: q.span_id,
            ids: Some(p.ids),
            addrs: p.addrs,
            start_ns: q.start_ns,
            end_ns: r.end_ns.max(q.start_ns),
        })
    }

    /// The SERVER or CLIENT span of a grpc-go stream.
    fn rpc_span(&self, p: PendingRpc, r: &crate::events::GoRpcEnd) -> Span {
        let q = &p.start;
        let mut a: Vec<(&'static str, Value)> = Vec::with_capacity(8);
        let (name, status) = h2::grpc_attributes(&q.method, r.code, !q.client, &mut a);
        if q.client {
            if let Some((_, server)) = q.flow {
                a.push(("server.address", Value::Str(server.ip().to_string())));
                a.push(("server.port", Value::Int(i64::from(server.port()))));
                a.push(("network.peer.address", Value::Str(server.ip().to_string())));
                a.push(("network.peer.port", Value::Int(i64::from(server.port()))));
            }
        } else if let Some((client, server)) = q.flow {
            a.push(("server.address", Value::Str(server.ip().to_string())));
            a.push(("server.port", Value::Int(i64::from(server.port()))));
            a.push(("client.address", Value::Str(client.ip().to_string())));
            a.push(("client.port", Value::Int(i64::from(client.port()))));
            a.push(("network.peer.address", Value::Str(client.ip().to_string())));
            a.push(("network.peer.port", Value::Int(i64::from(client.port()))));
        }
        a.push(("network.protocol.name", Value::Static("http")));
        a.push(("network.protocol.version", Value::Static("2")));
        a.push(("thread.id", Value::Int(i64::from(q.tid))));
        a.push((crate::attributes::GOROUTINE_ID, Value::Int(q.goid as i64)));
        Span {
            pid: q.pid,
            trace_id: p.trace_id,
            span_id: span_id(q.span_id),
            parent: p.parent,
            parent_is_remote: p.remote,
            trace_state: None,
            kind: if q.client { SpanKind::Client } else { SpanKind::Server },
            name,
            start_unix_ns: self.clock.to_unix(q.start_ns),
            end_unix_ns: self.clock.to_unix(r.end_ns.max(q.start_ns)),
            attributes: a,
            status,
        }
    }

    fn sql_span(&self, p: PendingSql, r: &GoSqlEnd) -> Span {
        let q = &p.start;
        let mut a: Vec<(&'static str, Value)> = Vec::with_capacity(8);
        let system = sql_system_name(q.system);
        a.push(("db.system.name", Value::Static(system)));
        // The span name: the statement's summary, else the database (the conventions' rule).
        let summary = p.text.as_deref().and_then(crate::protocols::sql::summary);
        let name = summary.clone().unwrap_or_else(|| system.to_owned());
        if let Some(s) = summary {
            a.push(("db.query.summary", Value::Str(s)));
        }
        // Never the values a program wrote into its statement: literals become `?`.
        if let Some(t) = p.text {
            a.push(("db.query.text", Value::Str(crate::protocols::sql::sanitize(&t))));
        }
        if let Some(server) = r.server {
            a.push(("server.address", Value::Str(server.addr.to_string())));
            a.push(("server.port", Value::Int(i64::from(server.port))));
        }
        let status = if r.failed {
            match r.code.as_deref().filter(|c| is_sqlstate(c)) {
                Some(code) => {
                    a.push(("db.response.status_code", Value::Str(code.to_owned())));
                    a.push(("error.type", Value::Str(code.to_owned())));
                    Status::Error(format!("SQLSTATE {code}"))
                }
                None => {
                    a.push(("error.type", Value::Static("_OTHER")));
                    Status::Error("the statement returned an error".into())
                }
            }
        } else {
            Status::Unset
        };
        let call = Call { pid: q.pid, tid: q.tid, goid: q.goid, span_id: q.span_id, start_ns: q.start_ns, end_ns: r.end_ns };
        self.call_span(&call, p.trace_id, p.parent, name, a, status)
    }

    /// A CLIENT span of a Go call (HTTP or SQL) from what both kinds share.
    fn call_span(&self, c: &Call, trace_id: TraceId, parent: Option<SpanId>, name: String, mut attributes: Vec<(&'static str, Value)>, status: Status) -> Span {
        attributes.push(("thread.id", Value::Int(i64::from(c.tid))));
        if c.goid != 0 {
            attributes.push((crate::attributes::GOROUTINE_ID, Value::Int(c.goid as i64)));
        }
        Span {
            pid: c.pid,
            trace_id,
            span_id: span_id(c.span_id),
            parent,
            parent_is_remote: false,
            trace_state: None,
            kind: SpanKind::Client,
            name,
            start_unix_ns: self.clock.to_unix(c.start_ns),
            end_unix_ns: self.clock.to_unix(c.end_ns.max(c.start_ns)),
            attributes,
            status,
        }
    }

    fn on_client_response(&mut self, r: GoClientResponse) -> Option<Span> {
        let Some(p) = self.clients.remove(&r.span_id) else {
            self.stats.unmatched_client_returns += 1;
            return None;
        };
        Some(self.client_span(p, &r))
    }

    fn client_span(&self, p: PendingClient, r: &GoClientResponse) -> Span {
        let c = &p.req;
        let known = http1::known_method(&c.method);
        let mut a: Vec<(&'static str, Value)> = Vec::with_capacity(12);
        a.push(("http.request.method", Value::Static(known.unwrap_or("_OTHER"))));
        if known.is_none() {
            a.push(("http.request.method_original", Value::Str(c.method.clone())));
        }
        let scheme = if c.scheme.is_empty() { "http" } else { c.scheme.as_str() };
        // Only scheme, host and path: query values are never exported.
        a.push(("url.full", Value::Str(format!("{scheme}://{}{}", c.host, c.path))));
        let (host, port) = split_host_port(&c.host);
        if !host.is_empty() {
            a.push(("server.address", Value::Str(host.to_owned())));
        }
        let port = port.or(match scheme {
            "https" => Some(443),
            "http" => Some(80),
            _ => None,
        });
        if let Some(port) = port {
            a.push(("server.port", Value::Int(i64::from(port))));
        }
        if r.status > 0 {
            a.push(("http.response.status_code", Value::Int(r.status)));
        }
        let status = if r.failed {
            a.push(("error.type", Value::Static("_OTHER")));
            Status::Error("the request failed before a response arrived".into())
        } else if r.status >= 400 {
            a.push(("error.type", Value::Str(r.status.to_string())));
            Status::Error(String::new())
        } else {
            Status::Unset
        };
        if let Some((outcome, trace, sampled)) = p.traceparent {
            use zerotrace_common::inject_outcome as o;
            let said = match outcome {
                o::WRITTEN => "written",
                o::DRY_RUN => "dry-run",
                o::OWN_HEADER => "request has its own",
                o::NO_ROOM => "no room in the write buffer",
                o::FAILED => "write failed",
                _ => "not checkable",
            };
            a.push(("zerotrace.traceparent.outcome", Value::Static(said)));
            if matches!(outcome, o::WRITTEN | o::DRY_RUN) {
                let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
                a.push(("zerotrace.traceparent", Value::Str(format!("00-{}-{:016x}-{:02x}", hex(&trace), c.span_id, u8::from(sampled)))));
            }
        }
        let call = Call { pid: c.pid, tid: c.tid, goid: c.goid, span_id: c.span_id, start_ns: c.start_ns, end_ns: r.end_ns };
        self.call_span(&call, p.trace_id, p.parent, known.unwrap_or("HTTP").to_owned(), a, status)
    }

    fn on_request(&mut self, r: HttpRequest, out: &mut Vec<Span>) {
        if r.offset > 0 {
            // More bytes of a request already open: append them where they belong.
            if let Some(p) = self.pending.get_mut(&r.conn_id)
                && p.seq == r.seq
                && p.bytes.len() == r.offset as usize
            {
                p.bytes.extend_from_slice(&r.head);
                if r.read_len > p.largest_read {
                    (p.largest_read, p.tid, p.goid) = (r.read_len, r.tid, r.goid);
                }
                // A traceparent in a later piece of the head still decides the trace.
                if !p.ids.remote
                    && let Some(rp) = traceparent_in(&p.bytes)
                {
                    let trace_id = self.traces.resolve(rp.trace_id);
                    if p.kernel_trace_origin == zerotrace_common::trace_origin::DRAWN {
                        self.traces.alias(p.kernel_trace, trace_id);
                    }
                    self.sampling.remote_decision(trace_id, rp.sampled);
                    p.ids = Ids { trace_id, parent: Some(rp.span_id), remote: true, trace_state: rp.trace_state };
                    let (span, trace) = (p.span_id, p.ids.trace_id);
                    self.traces.remember(span, trace);
                }
            }
            return;
        }
        // A new read: requests pipelined behind the last one that were never answered are
        // not coming.
        self.drop_leftover(r.conn_id, out);
        if !self.pending.contains_key(&r.conn_id) && self.pending.len() >= MAX_PENDING {
            self.stats.pending_full += 1;
            return;
        }
        // A client that wrote several requests before reading (pipelining, in separate
        // writes) offered only the first on the flow: a later read with the same offer is
        // its next request, never a child of the first.
        let (link_span, index) = self.batch_place(r.conn_id, r.link_span);
        let ids = if index > 1 {
            self.batch_ids(&r.head, link_span, index, r.trace_id, r.trace_origin)
        } else {
            self.server_ids(&r.head, r.link_span, r.trace_id, r.trace_origin)
        };
        self.traces.remember(r.span_id, ids.trace_id);
        self.open.entry(r.pid).or_default().insert((r.conn_id, 0), r.span_id);
        if self.native_parents == NativeParents::Thread {
            self.threads.insert((r.pid, r.tid), (r.conn_id, r.span_id));
        }
        let p = Pending {
            pid: r.pid,
            first_tid: r.tid,
            seq: r.seq,
            tid: r.tid,
            goid: r.goid,
            start_ns: r.start_ns,
            bytes: r.head,
            largest_read: r.read_len,
            link_span,
            index,
            go: None,
            span_id: r.span_id,
            ids,
            tls: r.tls,
            kernel_trace: r.trace_id,
            kernel_trace_origin: r.trace_origin,
            framing: None,
            route: None,
            queued_go: Vec::new(),
        };
        self.open_pending(r.conn_id, p);
    }

    /// Server request `p` is open on connection `conn_id` (its response not ended yet).
    fn open_pending(&mut self, conn_id: u64, p: Pending) {
        self.finished.remove(&conn_id);
        if self.pending.insert(conn_id, p).is_some() {
            self.stats.lost_responses += 1;
        }
    }

    fn on_response(&mut self, r: HttpResponse, out: &mut Vec<Span>) {
        if self.finished.get(&r.conn_id) == Some(&r.seq) {
            // Ended by its framing already (a native server).
            self.finished.remove(&r.conn_id);
            return;
        }
        if self.pending.get(&r.conn_id).is_none_or(|p| p.seq != r.seq) {
            self.stats.unmatched_responses += 1;
            return;
        }
        let Some(p) = self.take_pending(r.conn_id) else { return };
        let status = http1::parse_status(&r.status_line[..r.status_len as usize]).map(i64::from);
        let pattern = self.pattern(r.pid, r.pattern_ptr, r.pattern_len);
        self.server_done(p, r.pid, r.conn_id, status, pattern, r.end_ns, out);
    }

    /// The server span of request `p` on connection `conn_id`, whose response ended at
    /// `end_ns` (status from its first bytes; Go: route pattern from the process). Requests
    /// that came pipelined behind it wait for their responses (`leftovers`).
    #[allow(clippy::too_many_arguments)]
    fn server_done(&mut self, mut p: Pending, pid: u32, conn_id: u64, status: Option<i64>, kernel_pattern: Option<Arc<str>>, end_ns: u64, out: &mut Vec<Span>) {
        self.keep_pipelined(conn_id, &mut p, out);
        let Some(head) = http1::parse_request(&p.bytes) else {
            self.stats.not_http += 1;
            tracing::debug!(pid, conn = conn_id, seq = p.seq, head = %String::from_utf8_lossy(&p.bytes[..p.bytes.len().min(48)]).escape_debug(), "request bytes are not HTTP/1");
            return;
        };
        let kernel_pattern = kernel_pattern.or(p.route.take());
        let mut status = status;
        let conn = self.conns.get(&conn_id).map(|c| (c.addrs, c.peer.clone()));
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
            pid,
            tid: p.tid,
            goid,
            method: &head.method,
            path: head.path(),
            pattern,
            status,
            host: head.host.as_deref(),
            user_agent: head.user_agent.as_deref(),
            version: Some(if head.minor_version == 0 { "1.0" } else { "1.1" }),
            scheme: if p.tls { "https" } else { "http" },
            span_id: p.span_id,
            ids: Some(p.ids.clone()),
            addrs: conn,
            start_ns: p.start_ns,
            end_ns: end_ns.max(p.start_ns),
        };
        let span = self.server_span(fields);
        self.stats.spans += 1;
        out.push(span);
    }

    /// Handler mode: a serverHandler.ServeHTTP call finished. If the connection's request is
    /// open at the syscall level, the Go facts wait for the response there (one span); a
    /// second record while it is open, or one while pipelined requests wait for their
    /// responses, belongs to a pipelined request and waits for it. Else the handler's record
    /// is the span.
    fn on_go_request(&mut self, g: Box<GoServerRequest>, out: &mut Vec<Span>) {
        if g.sk != 0
            && let Some(&id) = self.by_sk.get(&g.sk)
        {
            if let Some(p) = self.pending.get_mut(&id) {
                if p.go.is_none() {
                    p.go = Some(g);
                    return;
                }
                if p.queued_go.len() < pipeline::MAX_QUEUED_GO {
                    p.queued_go.push(g);
                    return;
                }
            } else if let Some(l) = self.leftovers.get_mut(&id)
                && l.go.len() < pipeline::MAX_QUEUED_GO
            {
                l.go.push(g);
                return;
            }
        }
        let span = self.go_alone(&g);
        self.stats.spans += 1;
        out.push(span);
    }

    /// The span of a Go handler's record alone (no request seen at the socket for it).
    fn go_alone(&self, g: &GoServerRequest) -> Span {
        let addrs = if g.sk != 0 { self.by_sk.get(&g.sk).and_then(|id| self.conns.get(id)).map(|c| (c.addrs, c.peer.clone())) } else { None };
        let version = match g.proto.as_str() {
            "HTTP/1.0" => Some("1.0"),
            "HTTP/1.1" => Some("1.1"),
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
            version,
            scheme: "http",
            span_id: 0,
            ids: None,
            addrs,
            start_ns: g.start_ns,
            end_ns: g.end_ns,
        };
        self.server_span(fields)
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
        a.push(("url.scheme", Value::Static(f.scheme)));
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
        if let Some(v) = f.version {
            a.push(("network.protocol.name", Value::Static("http")));
            a.push(("network.protocol.version", Value::Static(v)));
        }
        a.push(("thread.id", Value::Int(i64::from(f.tid))));
        if f.goid != 0 {
            a.push((crate::attributes::GOROUTINE_ID, Value::Int(f.goid as i64)));
        }
        let status = match f.status {
            Some(s) if s >= 500 => Status::Error(String::new()),
            _ => Status::Unset,
        };
        let ids = f.ids.unwrap_or_else(|| Ids { trace_id: TraceId::random(), parent: None, remote: false, trace_state: None });
        let (trace_id, parent, remote, trace_state) = (ids.trace_id, ids.parent, ids.remote, ids.trace_state);
        Span {
            pid: f.pid,
            trace_id,
            span_id: if f.span_id != 0 { span_id(f.span_id) } else { SpanId::random() },
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
    /// `network.protocol.version`: "1.0", "1.1" or "2".
    version: Option<&'static str>,
    scheme: &'static str,
    /// Kernel span id (0: make one) and the span's place in its trace (None: a new root).
    span_id: u64,
    ids: Option<Ids>,
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

/// The W3C trace context of a request head, if it carries one. Most heads do not: a
/// substring search decides before any parsing.
fn traceparent_in(head: &[u8]) -> Option<RemoteParent> {
    let finder = memchr::memmem::find(head, b"raceparent").or_else(|| memchr::memmem::find(head, b"RACEPARENT"));
    finder?;
    let h = http1::parse_request(head)?;
    RemoteParent::parse(h.traceparent.as_deref()?, h.tracestate.as_deref())
}

/// `db.system.name` of a driver's database (zerotrace_common::sql_system; NONE and
/// unknown values read as OTHER).
fn sql_system_name(system: u8) -> &'static str {
    use crate::attributes::DB_SYSTEM_NAMES as NAMES;
    NAMES.get(usize::from(system).saturating_sub(zerotrace_common::sql_system::OTHER as usize)).copied().unwrap_or(NAMES[0])
}

/// A SQLSTATE: five digits or upper-case letters (what a driver's error holds is checked,
/// not trusted).
fn is_sqlstate(code: &str) -> bool {
    code.len() == 5 && code.bytes().all(|c| c.is_ascii_digit() || c.is_ascii_uppercase())
}

/// "host:port" -> (host, port); "[::1]:80" -> ("::1", 80); "host" -> (host, None).
fn split_host_port(h: &str) -> (&str, Option<u16>) {
    if let Some(rest) = h.strip_prefix('[') {
        let (host, tail) = rest.split_once(']').unwrap_or((rest, ""));
        return (host, tail.strip_prefix(':').and_then(|p| p.parse().ok()));
    }
    match h.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => (host, port.parse().ok()),
        _ => (h, None),
    }
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
