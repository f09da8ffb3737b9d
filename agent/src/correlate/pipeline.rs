//! HTTP/1 pipelining on the server side: a client that writes requests n + 1, n + 2, ...
//! before reading the response to n. They arrive in one read (or in the reads of request
//! n), so the kernel starts only request n; Go's net/http and hyper then answer them one
//! by one from their read buffer, and the kernel reports each later response head with a
//! sequence number and span id of its own (`SockServerPipelined`). Their request bytes are
//! in the capture of request n: what follows request n's head and body there is kept when
//! its span ends (`Leftover`) and becomes the request the next such head answers.
//!
//! Across processes: the kernel offers only a batch's first request on its flow (one send,
//! one offer), so the n-th request of a batch has ids both ends derive alike: span id and
//! trace from the first request's span id and n (`batch_span`, `batch_trace`). The client
//! side registers the batch (`Batch`) when it writes it; the server side, reading request
//! n of a batch whose first request was linked, takes the derived span as parent.
//!
//! Handler mode: the Go handler of request n + 1 returns before its response is written,
//! so while request n is still open; its record waits with the leftover bytes instead of
//! being merged into request n (or emitted alone beside the request's own span).
use crate::{
    events::{GoServerRequest, PipelinedRequest},
    protocols::http1,
    spans::Span,
};

use super::{Correlator, Ids, MAX_PENDING, Pending, framing::Progress, traces::span_id};
use crate::spans::TraceId;

/// Go handler records waiting for the pipelined requests they belong to, per connection.
pub(super) const MAX_QUEUED_GO: usize = 16;

/// A native client's batch of pipelined requests, by its first request's span id: that
/// request's trace, and whether it had a parent in its process (then the batch shares it).
#[derive(Clone, Copy, Debug)]
pub(super) struct Batch {
    pub(super) trace_id: TraceId,
    pub(super) parented: bool,
}

/// The span id of the `n`-th request (n >= 2) of a batch whose first request is `first`:
/// both ends of a same-host connection derive it alike (splitmix64 of the two).
pub(super) fn batch_span(first: u64, n: u32) -> u64 {
    let mut z = first ^ u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    if z == 0 { 1 } else { z }
}

/// The trace of the `n`-th request of `batch` (first request's span id `first`): the
/// batch's own when it was written inside a request, else a trace of its own, derived.
pub(super) fn batch_trace(batch: &Batch, first: u64, n: u32) -> TraceId {
    if batch.parented {
        return batch.trace_id;
    }
    let mut b = batch.trace_id.0;
    let hi = batch_span(first ^ u64::from_be_bytes(b[..8].try_into().unwrap_or_default()), n);
    let lo = batch_span(hi, n);
    b[..8].copy_from_slice(&hi.to_be_bytes());
    b[8..].copy_from_slice(&lo.to_be_bytes());
    TraceId(b)
}

/// Requests that came pipelined behind one whose span ended: their captured bytes and
/// where they were read.
#[derive(Debug)]
pub(super) struct Leftover {
    pub(super) bytes: Vec<u8>,
    /// The same-host client span the batch's first request was linked to (0: none), and
    /// the place of the first request waiting here in the batch.
    link_span: u64,
    index: u32,
    start_ns: u64,
    tid: u32,
    first_tid: u32,
    goid: u64,
    tls: bool,
    /// Handler mode: records of handlers that ran for these requests, oldest first (boxed as
    /// they come and as `Pending::go` keeps them).
    #[allow(clippy::vec_box)]
    pub(super) go: Vec<Box<GoServerRequest>>,
}

impl Correlator {
    /// Request `p` on `conn_id` ends: when its captured bytes hold another request after
    /// it, that one (and any after it) waits for the response head that answers it.
    pub(super) fn keep_pipelined(&mut self, conn_id: u64, p: &mut Pending, out: &mut Vec<Span>) {
        let queued = std::mem::take(&mut p.queued_go);
        if p.framing.as_ref().is_some_and(|f| f.excess() > 0) {
            // Its response was sent together with the next ones (one send): which request
            // the next head answers is not known, so none is guessed.
            if http1::next_request(&p.bytes).is_some() {
                self.stats.pipelined_uncaptured += 1;
            }
            return self.flush_go(queued, out);
        }
        let at = match http1::next_request(&p.bytes) {
            Some(at) if self.leftovers.len() < MAX_PENDING || self.leftovers.contains_key(&conn_id) => at,
            _ => return self.flush_go(queued, out),
        };
        let l = Leftover {
            bytes: p.bytes[at..].to_vec(),
            link_span: p.link_span,
            index: p.index + 1,
            start_ns: p.start_ns,
            tid: p.tid,
            first_tid: p.first_tid,
            goid: p.goid,
            tls: p.tls,
            go: queued,
        };
        p.bytes.truncate(at);
        if let Some(old) = self.leftovers.insert(conn_id, l) {
            self.flush_go(old.go, out);
        }
    }

    /// Pipelined requests on `conn_id` that were never answered (the connection closed, or
    /// a new read started requests again): forgotten; their handlers' records become spans
    /// of their own.
    pub(super) fn drop_leftover(&mut self, conn_id: u64, out: &mut Vec<Span>) {
        if let Some(l) = self.leftovers.remove(&conn_id) {
            self.flush_go(l.go, out);
        }
    }

    #[allow(clippy::vec_box)]
    pub(super) fn flush_go(&mut self, gs: Vec<Box<GoServerRequest>>, out: &mut Vec<Span>) {
        for g in gs {
            let span = self.go_alone(&g);
            self.stats.spans += 1;
            out.push(span);
        }
    }

    /// A server sent the head of a response no read started: the answer to the next
    /// pipelined request of its connection.
    pub(super) fn on_server_pipelined(&mut self, r: PipelinedRequest, out: &mut Vec<Span>) {
        // The request before it, if still open (its end record lost), ends here.
        if self.pending.get(&r.conn_id).is_some_and(|p| p.seq != r.seq)
            && let Some(p) = self.take_pending(r.conn_id)
        {
            let status = p.framing.as_ref().and_then(|f| f.status).map(i64::from);
            self.server_done(p, r.pid, r.conn_id, status, None, r.start_ns, out);
        }
        let Some(l) = self.leftovers.remove(&r.conn_id) else {
            // Its request was not captured (past the capture size), or the connection is
            // older than the agent: no span rather than one without a request.
            self.stats.pipelined_uncaptured += 1;
            return;
        };
        if self.pending.len() >= MAX_PENDING {
            self.stats.pending_full += 1;
            return self.flush_go(l.go, out);
        }
        let ids = self.batch_ids(&l.bytes, l.link_span, l.index, r.trace_id, r.trace_origin);
        self.last_link.insert(r.conn_id, (l.link_span, l.index));
        self.traces.remember(r.span_id, ids.trace_id);
        self.open.entry(r.pid).or_default().insert((r.conn_id, 0), r.span_id);
        let route = self.pattern(r.pid, r.pattern_ptr, r.pattern_len);
        let framing = Progress::starting(&l.bytes, &r.head, u64::from(r.read_len), r.start_ns);
        let (done, status) = (framing.done, framing.status.map(i64::from));
        let mut go = l.go;
        let first_go = (!go.is_empty()).then(|| go.remove(0));
        let p = Pending {
            pid: r.pid,
            first_tid: l.first_tid,
            seq: r.seq,
            tid: l.tid,
            goid: l.goid,
            start_ns: l.start_ns,
            bytes: l.bytes,
            largest_read: 0,
            link_span: l.link_span,
            index: l.index,
            go: first_go,
            span_id: r.span_id,
            ids,
            tls: l.tls,
            kernel_trace: r.trace_id,
            kernel_trace_origin: r.trace_origin,
            framing: Some(framing),
            route,
            queued_go: go,
        };
        self.open_pending(r.conn_id, p);
        if done {
            // The whole response in this one send (Go writes small ones so).
            self.server_framed(r.pid, r.conn_id, r.seq, status, r.start_ns, out);
        }
    }
}

impl Correlator {
    /// Where the server span of the `index`-th request (>= 2) read under same-host client
    /// offer `link` sits: under its own traceparent, else under the client request of the
    /// same place in that client's batch (when the client registered it), else a root: never
    /// under the first request, which the offer names.
    pub(super) fn batch_ids(&mut self, head: &[u8], link: u64, index: u32, kernel_trace: [u8; 16], origin: u8) -> Ids {
        let batch = if link != 0 { self.batches.get(&link).copied() } else { None };
        let Some(batch) = batch.filter(|_| super::traceparent_in(head).is_none()) else {
            return self.server_ids(head, 0, kernel_trace, origin);
        };
        let trace_id = batch_trace(&batch, link, index);
        if origin == zerotrace_common::trace_origin::DRAWN {
            self.traces.alias(kernel_trace, trace_id);
        }
        self.stats.linked += 1;
        Ids { trace_id, parent: Some(span_id(batch_span(link, index))), remote: false, trace_state: None }
    }

    /// A request is read on server connection `conn_id` under client offer `link`: the
    /// offer and this request's place among those it covers (1 unless the connection's last
    /// request was read under the same offer).
    pub(super) fn batch_place(&mut self, conn_id: u64, link: u64) -> (u64, u32) {
        let index = match self.last_link.get(&conn_id) {
            Some(&(l, i)) if link != 0 && l == link => i + 1,
            _ => 1,
        };
        if link != 0 || self.last_link.contains_key(&conn_id) {
            self.last_link.insert(conn_id, (link, index));
        }
        (link, index)
    }
}
