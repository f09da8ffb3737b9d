//! Client spans of processes that are not Go, from the socket: a request's first bytes
//! (method, target, Host), the response's first bytes (status, framing) and the length of
//! every later read, until the response is complete by its framing (Content-Length, the
//! last chunk, no body), or the connection's next request or close ends it at its last read.
//!
//! Where such a span sits in its process: thread and task identity mean nothing for async
//! runtimes (tokio moves a request's work between threads, and one thread interleaves
//! many requests), so a client request's parent is the process's server request only when
//! exactly one server request is open in that process as it starts. With concurrent server
//! requests it gets no parent (a root of its own) rather than a guessed one. Across
//! processes it always links: the kernel offered its span id on the connection's flow.
use crate::{
    events::{HttpRequest, SockBytes},
    protocols::http1,
    spans::{Span, SpanKind, Status, TraceId, Value},
};

use super::{Correlator, MAX_PENDING, framing::Progress, split_host_port, traces::span_id};

/// A native client request waiting for the end of its response.
#[derive(Debug)]
pub(super) struct NativeCall {
    pid: u32,
    tid: u32,
    seq: u32,
    span_id: u64,
    start_ns: u64,
    trace_id: TraceId,
    parent: Option<crate::spans::SpanId>,
    request: Vec<u8>,
    response: Option<Progress>,
    /// Pipelining: the span id of the batch's first request, and this one's place in it.
    pub(super) first: u64,
    index: u32,
}

impl Correlator {
    /// A native client started a request (offset 0) or wrote more of its head.
    pub(super) fn on_native_request(&mut self, r: HttpRequest, out: &mut Vec<Span>) {
        if r.offset > 0 {
            if let Some(c) = self.native.get_mut(&r.conn_id).filter(|c| c.seq == r.seq && c.request.len() == r.offset as usize) {
                c.request.extend_from_slice(&r.head);
                let (first, trace_id, parented) = (c.first, c.trace_id, c.parent.is_some());
                if c.index == 1 && http1::next_request(&c.request).is_some() {
                    self.register_batch(first, trace_id, parented);
                }
            }
            return;
        }
        // The connection's previous request ends here, at its last read.
        self.end_native(r.conn_id, out);
        if self.native.len() >= MAX_PENDING {
            self.stats.pending_full += 1;
            return;
        }
        let parent = self.native_parent(r.pid, r.tid);
        let (trace_id, parent) = self.traces.child_of(parent, r.trace_id);
        self.traces.remember(r.span_id, trace_id);
        let call = NativeCall {
            pid: r.pid,
            tid: r.tid,
            seq: r.seq,
            span_id: r.span_id,
            start_ns: r.start_ns,
            trace_id,
            parent,
            request: r.head,
            response: None,
            first: r.span_id,
            index: 1,
        };
        if http1::next_request(&call.request).is_some() {
            // Pipelined requests: the server that reads them derives their ids alike.
            self.register_batch(call.first, call.trace_id, call.parent.is_some());
        }
        self.native.insert(r.conn_id, call);
    }

    /// A native client wrote several requests at once, the first with span id `first`.
    fn register_batch(&mut self, first: u64, trace_id: TraceId, parented: bool) {
        if self.batches.len() < MAX_PENDING {
            self.batches.insert(first, super::pipeline::Batch { trace_id, parented });
        }
    }

    /// The first bytes of the response to a native client's request, or a later read that
    /// starts like a response head: the answer to the next pipelined request once the one
    /// before is complete, else more of the current response.
    pub(super) fn on_native_response(&mut self, r: HttpRequest, out: &mut Vec<Span>) {
        let Some(c) = self.native.get_mut(&r.conn_id) else {
            self.stats.unmatched_client_returns += 1;
            return;
        };
        if c.seq != r.seq {
            return;
        }
        match c.response.as_mut() {
            None => c.response = Some(Progress::first(&c.request, &r)),
            // A chunked response too big to be measured, whose end came in a read with other
            // bytes (the next response's start): a read that starts with a head while more
            // requests wait means it ended before this read.
            Some(p) if !p.done && p.chunked && http1::next_request(&c.request).is_some() => {
                p.done = true;
                self.native_answered(r.conn_id, None, out);
                if let Some(next) = self.native.get_mut(&r.conn_id).filter(|n| n.seq == r.seq && n.response.is_none()) {
                    next.response = Some(Progress::first(&next.request, &r));
                }
            }
            Some(p) => {
                p.add_read(&r.head, u64::from(r.read_len), r.start_ns);
            }
        }
        self.native_answered(r.conn_id, Some((&r.head, u64::from(r.read_len))), out);
    }

    /// Ends the native client call on `conn_id` if its response is complete; when the bytes
    /// it wrote hold another request after its own (pipelined), that one is the connection's
    /// call from now on. The read that completed it (`rec`: its captured bytes and length)
    /// may hold the next responses' starts too.
    fn native_answered(&mut self, conn_id: u64, mut rec: Option<(&[u8], u64)>, out: &mut Vec<Span>) {
        loop {
            let Some(c) = self.native.get(&conn_id) else { return };
            let Some(p) = c.response.as_ref().filter(|p| p.done) else { return };
            let (excess, last_ns) = (p.excess(), p.last_ns);
            let next = http1::next_request(&c.request);
            let Some(mut c) = self.native.remove(&conn_id) else { return };
            let Some(at) = next else {
                self.batches.remove(&c.first);
                self.finish_native(c, conn_id, out);
                return;
            };
            let request = c.request.split_off(at);
            let index = c.index + 1;
            // Written together: under the same parent, else each a trace of its own; ids
            // derived as the server reading them derives them.
            let batch = self.batches.get(&c.first).copied().unwrap_or(super::pipeline::Batch { trace_id: c.trace_id, parented: c.parent.is_some() });
            let call = NativeCall {
                pid: c.pid,
                tid: c.tid,
                seq: c.seq,
                span_id: super::pipeline::batch_span(c.first, index),
                start_ns: c.start_ns,
                trace_id: super::pipeline::batch_trace(&batch, c.first, index),
                parent: c.parent,
                request,
                response: None,
                first: c.first,
                index,
            };
            self.finish_native(c, conn_id, out);
            self.traces.remember(call.span_id, call.trace_id);
            let mut call = call;
            if excess > 0 {
                // The next response started in the same read.
                match rec {
                    Some((head, len)) if len >= excess && ((len - excess) as usize) < head.len() => {
                        let rest = &head[(len - excess) as usize..];
                        call.response = Some(Progress::starting(&call.request, rest, excess, last_ns));
                        rec = Some((rest, excess));
                    }
                    _ => {
                        // Its start was not captured: the requests after it are not followed.
                        self.stats.pipelined_uncaptured += 1;
                        self.batches.remove(&call.first);
                        return;
                    }
                }
            }
            if self.native.len() >= MAX_PENDING {
                self.stats.pending_full += 1;
                self.batches.remove(&call.first);
                return;
            }
            self.native.insert(conn_id, call);
        }
    }

    /// A native server started its response (its first bytes).
    pub(super) fn on_server_response(&mut self, r: HttpRequest, out: &mut Vec<Span>) {
        let Some(p) = self.pending.get_mut(&r.conn_id) else { return };
        if p.seq != r.seq || p.framing.is_some() {
            return;
        }
        let f = Progress::first(&p.bytes, &r);
        let (done, status) = (f.done, f.status.map(i64::from));
        p.framing = Some(f);
        if done {
            self.server_framed(r.pid, r.conn_id, r.seq, status, r.start_ns, out);
        }
    }

    /// A native server sent bytes of its response: once its framing says it is complete,
    /// the span ends there (the kernel's own end, the next read, may come much later).
    pub(super) fn on_server_send(&mut self, b: SockBytes, out: &mut Vec<Span>) {
        let Some(p) = self.pending.get_mut(&b.conn_id) else { return };
        if p.seq != b.seq {
            return;
        }
        let Some(f) = p.framing.as_mut() else { return };
        f.add(u64::from(b.len), &b.tail, b.ts);
        if !f.done {
            return;
        }
        let status = f.status.map(i64::from);
        self.server_framed(b.pid, b.conn_id, b.seq, status, b.ts, out);
    }

    /// A native server's response is complete by its framing at `ts`: its span ends there.
    pub(super) fn server_framed(&mut self, pid: u32, conn_id: u64, seq: u32, status: Option<i64>, ts: u64, out: &mut Vec<Span>) {
        let Some(p) = self.take_pending(conn_id) else { return };
        self.finished.insert(conn_id, seq);
        self.server_done(p, pid, conn_id, status, None, ts, out);
    }

    /// A later read of a native client's response.
    pub(super) fn on_native_recv(&mut self, r: SockBytes, out: &mut Vec<Span>) {
        let Some(c) = self.native.get_mut(&r.conn_id) else { return };
        if c.seq != r.seq {
            return;
        }
        let Some(p) = c.response.as_mut() else { return };
        p.add(u64::from(r.len), &r.tail, r.ts);
        self.native_answered(r.conn_id, None, out);
    }

    /// The native client call waiting on `conn_id` ends (complete, the next request, or
    /// the connection's close).
    pub(super) fn end_native(&mut self, conn_id: u64, out: &mut Vec<Span>) {
        if let Some(c) = self.native.remove(&conn_id) {
            self.batches.remove(&c.first);
            self.finish_native(c, conn_id, out);
        }
    }

    /// The parent (kernel span id, 0: none) of a client request that thread `tid` of native
    /// process `pid` starts, by `--native-parents`.
    pub(super) fn native_parent(&self, pid: u32, tid: u32) -> u64 {
        // While the kernel sheds (and shortly after), requests the agent never saw may be
        // open: the rule could name the wrong one, so none is named.
        if crate::probes::guard::SHEDDING.load(std::sync::atomic::Ordering::Relaxed) {
            return 0;
        }
        match self.native_parents {
            super::NativeParents::OneOpen => self.single_open_request(pid),
            super::NativeParents::Thread => self.threads.get(&(pid, tid)).map_or(0, |(_, span)| *span),
        }
    }

    /// The span a CPU sample of thread `tid` of `pid` belongs to: the kernel's (a Go
    /// goroutine's span), else for a native process the server request the same rule as
    /// client parents names (`--native-parents`). Returns (trace, kernel span id).
    pub fn sample_span(&self, pid: u32, tid: u32, kernel_span: u64, native: bool) -> Option<(crate::spans::TraceId, u64)> {
        let span = if kernel_span != 0 || !native { kernel_span } else { self.native_parent(pid, tid) };
        if span == 0 {
            return None;
        }
        Some((self.traces.trace_of(span)?, span))
    }

    /// The one server request open in `pid` (its kernel span id), 0 when none or several.
    pub(super) fn single_open_request(&self, pid: u32) -> u64 {
        match self.open.get(&pid) {
            Some(m) if m.len() == 1 => m.values().next().copied().unwrap_or(0),
            _ => 0,
        }
    }

    fn finish_native(&mut self, c: NativeCall, conn_id: u64, out: &mut Vec<Span>) {
        let Some(head) = http1::parse_request(&c.request) else {
            self.stats.not_http += 1;
            return;
        };
        let known = http1::known_method(&head.method);
        let mut a: Vec<(&'static str, Value)> = Vec::with_capacity(14);
        a.push(("http.request.method", Value::Static(known.unwrap_or("_OTHER"))));
        if known.is_none() {
            a.push(("http.request.method_original", Value::Str(head.method.clone().into_owned())));
        }
        let conn = self.conns.get(&conn_id);
        let host =
            head.host.as_deref().map(str::to_owned).or_else(|| conn.map(|c| std::net::SocketAddr::new(c.addrs.peer.addr, c.addrs.peer.port).to_string()));
        // Only scheme, host and path: query values are never exported.
        if let Some(h) = &host {
            a.push(("url.full", Value::Str(format!("http://{h}{}", head.path()))));
            let (name, port) = split_host_port(h);
            if !name.is_empty() {
                a.push(("server.address", Value::Str(name.to_owned())));
            }
            if let Some(p) = port.or(conn.map(|c| c.addrs.peer.port)) {
                a.push(("server.port", Value::Int(i64::from(p))));
            }
        }
        if let Some(c) = conn {
            a.push(("network.peer.address", Value::Shared(c.peer.clone())));
            a.push(("network.peer.port", Value::Int(i64::from(c.addrs.peer.port))));
        }
        a.push(("network.protocol.name", Value::Static("http")));
        let minor = c.response.as_ref().and_then(|p| p.minor).unwrap_or(head.minor_version);
        a.push(("network.protocol.version", Value::Static(if minor == 0 { "1.0" } else { "1.1" })));
        let status_code = c.response.as_ref().and_then(|p| p.status);
        if let Some(s) = status_code {
            a.push(("http.response.status_code", Value::Int(i64::from(s))));
        }
        let status = match (&c.response, status_code) {
            (None, _) => {
                a.push(("error.type", Value::Static("_OTHER")));
                Status::Error("no response was read before the connection closed or was reused".into())
            }
            (Some(_), Some(s)) if s >= 400 => {
                a.push(("error.type", Value::Str(s.to_string())));
                Status::Error(String::new())
            }
            _ => Status::Unset,
        };
        a.push(("thread.id", Value::Int(i64::from(c.tid))));
        let end = c.response.as_ref().map_or(c.start_ns, |p| p.last_ns).max(c.start_ns);
        self.stats.spans += 1;
        out.push(Span {
            pid: c.pid,
            trace_id: c.trace_id,
            span_id: span_id(c.span_id),
            parent: c.parent,
            parent_is_remote: false,
            trace_state: None,
            kind: SpanKind::Client,
            name: known.unwrap_or("HTTP").to_owned(),
            start_unix_ns: self.clock.to_unix(c.start_ns),
            end_unix_ns: self.clock.to_unix(end),
            attributes: a,
            status,
        });
    }
}
