//! The records of bytes a socket moved, as the agent reads them: captures of request and
//! response bytes (HttpRequestEvent and PipelinedRequestEvent, assembled in per-CPU
//! scratch space: too big for the BPF stack), HTTP/2 pieces (H2BytesEvent) and byte counts
//! (SockBytesEvent). Deciding *when* to send them is the callers' business (server.rs,
//! native.rs).
use aya_ebpf::helpers::generated::bpf_ringbuf_output;
use zerotrace_common::{
    ConnState, Counter, EventKind, H2BytesEvent, HTTP_REQUEST_MAX, HttpRequestEvent, PipelinedRequestEvent, SockBytesEvent, bounds, trace_origin,
};

use crate::{
    causality::{incoming_trace, injecting, linked_span, remember_trace, trace_for},
    maps::{EVENTS, SCRATCH, settings},
    util::{checked_at_most, count, header, now, read_user, read_user_bytes, wake_flags},
};

const REQ_HDR: usize = core::mem::size_of::<HttpRequestEvent>();

/// Request bytes captured per request, from the settings, never above the hard maximum.
#[inline(always)]
pub fn capture_size() -> u32 {
    let cap = settings().req_capture;
    if cap > bounds::REQ_CAPTURE_MAX as u32 { bounds::REQ_CAPTURE_MAX as u32 } else { cap }
}

/// Copies `min(len, room)` bytes at `src` behind a record header in scratch space and fills
/// the fields every capture record shares; bytes already captured for this request count
/// against the capture size. Returns the scratch space and the number of bytes captured.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn fill_capture(conn: &ConnState, pid_tgid: u64, kind: EventKind, src: u64, len: u64, read_len: u64, start_ns: u64) -> Option<(*mut u8, u32)> {
    if conn.shed != 0 {
        return None;
    }
    let buf = SCRATCH.get_ptr_mut(0)? as *mut u8;
    let room = capture_size().saturating_sub(conn.captured) as u64;
    let want = if src == 0 {
        0
    } else if len < room {
        len
    } else {
        room
    };
    // SAFETY: the scratch value holds REQ_HDR + REQ_CAPTURE_MAX bytes.
    let captured = read_user_bytes::<{ bounds::REQ_CAPTURE_MAX }>(unsafe { buf.add(REQ_HDR) }, src, want);
    let ev = buf as *mut HttpRequestEvent;
    // SAFETY: the scratch value starts with room for the header.
    unsafe {
        (*ev).hdr = header(kind, REQ_HDR + captured as usize, conn.pid, pid_tgid as u32, now());
        (*ev).conn_id = conn.id;
        (*ev).goroutine = 0;
        (*ev).goid = 0;
        (*ev).start_ns = start_ns;
        (*ev).seq = conn.seq;
        (*ev).read_len = if read_len > u32::MAX as u64 { u32::MAX } else { read_len as u32 };
        (*ev).captured = captured;
        (*ev).offset = conn.captured;
        (*ev).span_id = conn.span_id;
        (*ev).link_span = 0;
        (*ev).trace_id = [0; 16];
        (*ev).tls = conn.tls;
        (*ev).trace_origin = 0;
        (*ev)._pad = [0; 6];
    }
    Some((buf, captured))
}

/// Sends the record assembled in scratch space `buf` (`captured` bytes behind its header).
#[inline(always)]
fn output(buf: *mut u8, captured: u32) {
    let Some(size) = checked_at_most(REQ_HDR as u64 + captured as u64, HTTP_REQUEST_MAX as u64) else { return };
    // SAFETY: buf holds HTTP_REQUEST_MAX bytes and size is bounded by it.
    let rc = unsafe { bpf_ringbuf_output(core::ptr::addr_of!(EVENTS) as *mut _, buf.cast(), size, wake_flags()) };
    if rc < 0 {
        count(Counter::EventsDroppedRingFull);
    }
}

/// Bytes of a request read by a server (`HttpRequest`): `len` at `src` of `read_len` read.
/// Its first record names the same-host client that sent it (CLIENT_LINK) and the trace the
/// kernel gives its span; `goroutine`/`goid`: the Go goroutine serving it (0: none).
/// `SCAN`: the program reads an incoming traceparent (with injection on). The scan needs
/// bpf_loop (Linux 5.17), which older verifiers refuse even as dead code, so only the
/// `_inject` twins of the receiving programs have it.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn request_capture<const SCAN: bool>(conn: &mut ConnState, pid_tgid: u64, src: u64, len: u64, read_len: u64, start_ns: u64, goroutine: u64, goid: u64) {
    let Some((buf, captured)) = fill_capture(conn, pid_tgid, EventKind::HttpRequest, src, len, read_len, start_ns) else {
        return;
    };
    let ev = buf as *mut HttpRequestEvent;
    // SAFETY: the scratch value holds the header filled above and `captured` bytes after it.
    unsafe {
        (*ev).goroutine = goroutine;
        (*ev).goid = goid;
        if conn.captured == 0 {
            if let Some(span) = linked_span(&conn.flow) {
                (*ev).link_span = span;
            }
            // With injection on, an incoming traceparent decides the trace here already (the
            // agent decides it too, but only later): outgoing requests must name it.
            let incoming = if SCAN && injecting() { incoming_trace(buf.add(REQ_HDR), captured) } else { None };
            conn.trace_in = incoming.is_some() as u8;
            (*ev).trace_id = match incoming {
                Some((t, flags)) => {
                    remember_trace(conn.span_id, &t, flags);
                    (*ev).trace_origin = trace_origin::INCOMING;
                    t
                }
                None => {
                    let (t, origin) = trace_for(conn.span_id, (*ev).link_span);
                    (*ev).trace_origin = origin;
                    t
                }
            };
        } else if SCAN && conn.trace_in == 0 && injecting() {
            // A head that came in pieces: its traceparent may be in this one (the handler, and
            // so any outgoing request, starts only once the head is complete).
            if let Some((t, flags)) = incoming_trace(buf.add(REQ_HDR), captured) {
                remember_trace(conn.span_id, &t, flags);
                conn.trace_in = 1;
            }
        }
    }
    conn.captured += captured;
    output(buf, captured);
}

/// A native process's request or response bytes (`kind` SockClientRequest,
/// SockClientResponse or SockServerResponse): `len` at `src` of `read_len` moved at
/// `start_ns`. Where the span sits is the agent's decision.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn native_capture(conn: &mut ConnState, pid_tgid: u64, kind: EventKind, src: u64, len: u64, read_len: u64, start_ns: u64) {
    let Some((buf, captured)) = fill_capture(conn, pid_tgid, kind, src, len, read_len, start_ns) else {
        return;
    };
    conn.captured += captured;
    output(buf, captured);
}

/// The head of a response to a request that came pipelined (`SockServerPipelined`): `len`
/// at `src` of `read_len` sent at `start_ns`, the route pattern of the request answered
/// (Go), and the trace the kernel gives its span (no client offered it: the offer on the
/// flow was the first request's).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn pipelined_capture(conn: &mut ConnState, pid_tgid: u64, src: u64, len: u64, read_len: u64, start_ns: u64, pattern_ptr: u64, pattern_len: u64) {
    let Some((buf, captured)) = fill_capture(conn, pid_tgid, EventKind::SockServerPipelined, src, len, read_len, start_ns) else {
        return;
    };
    let ev = buf as *mut PipelinedRequestEvent;
    let (t, origin) = trace_for(conn.span_id, 0);
    // SAFETY: the same scratch record, through the type with the same layout.
    unsafe {
        (*ev).pattern_ptr = pattern_ptr;
        (*ev).pattern_len = pattern_len;
        (*ev).trace_id = t;
        (*ev).trace_origin = origin;
    }
    conn.captured += captured;
    output(buf, captured);
}

/// HTTP/2 bytes moved on a native process's connection (`kind` SockH2Recv or SockH2Send):
/// up to H2_CHUNKS records of the first `len` of them at `buf`, and how many there were.
#[inline(always)]
pub fn h2_bytes(conn: &mut ConnState, pid_tgid: u64, kind: EventKind, buf: u64, len: u64, total: u64) {
    const CHUNK: u64 = bounds::REQ_CAPTURE_MAX as u64;
    let take = if len < total { len } else { total };
    let ts = now();
    let mut i = 0;
    while i < bounds::H2_CHUNKS as u64 {
        let at = i * CHUNK;
        let last = at + CHUNK >= take || i + 1 == bounds::H2_CHUNKS as u64;
        let n = if take - at < CHUNK { take - at } else { CHUNK };
        h2_chunk(conn, pid_tgid, kind, buf, at, n, total, ts, last);
        if last {
            break;
        }
        i += 1;
    }
}

/// One record of `h2_bytes`: `n` bytes at `buf + at`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn h2_chunk(conn: &ConnState, pid_tgid: u64, kind: EventKind, buf: u64, at: u64, n: u64, total: u64, ts: u64, last: bool) {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else { return };
    let scratch = scratch as *mut u8;
    // SAFETY: the scratch value holds REQ_HDR + REQ_CAPTURE_MAX bytes.
    let captured = if buf == 0 { 0 } else { read_user_bytes::<{ bounds::REQ_CAPTURE_MAX }>(unsafe { scratch.add(REQ_HDR) }, buf + at, n) };
    let ev = scratch as *mut H2BytesEvent;
    // SAFETY: the scratch value starts with room for the header.
    unsafe {
        (*ev).hdr = header(kind, REQ_HDR + captured as usize, conn.pid, pid_tgid as u32, ts);
        (*ev).conn_id = conn.id;
        (*ev)._unused = [0; 2];
        (*ev).ts_ns = ts;
        (*ev).start = conn.h2 as u32;
        (*ev).total = if total > u32::MAX as u64 { u32::MAX } else { total as u32 };
        (*ev).captured = captured;
        (*ev).offset = at as u32;
        (*ev)._unused2 = [0; 4];
        (*ev).last = last as u8;
        (*ev)._pad = [0; 7];
    }
    output(scratch, captured);
}

/// Reports `len` bytes of the current response moved on `conn`; their last bytes (up to
/// 8) are the end of the `buf_len` bytes at `buf` (0: not known).
#[inline(always)]
pub fn bytes_event(conn: &ConnState, pid_tgid: u64, kind: EventKind, len: u64, buf: u64, buf_len: u64) {
    if conn.shed != 0 {
        return;
    }
    let Some(mut ev) = EVENTS.reserve::<SockBytesEvent>(0) else {
        count(Counter::EventsDroppedRingFull);
        return;
    };
    let e = ev.as_mut_ptr();
    // SAFETY: e points at a reserved record of the right size; every field is written.
    unsafe {
        (*e).hdr = header(kind, core::mem::size_of::<SockBytesEvent>(), conn.pid, pid_tgid as u32, now());
        (*e).conn_id = conn.id;
        (*e).seq = conn.seq;
        (*e).len = if len > u32::MAX as u64 { u32::MAX } else { len as u32 };
        (*e)._pad = [0; 7];
        // Always 8 bytes (a fixed-size read): fewer than 8 are the first `buf_len` of them.
        let from = if buf_len >= 8 { buf + buf_len - 8 } else { buf };
        let tail = if buf == 0 || buf_len == 0 { None } else { read_user::<[u8; 8]>(from) };
        (*e).tail = tail.unwrap_or([0; 8]);
        (*e).tail_len = match tail {
            Some(_) if buf_len >= 8 => 8,
            Some(_) => buf_len as u8,
            None => 0,
        };
    }
    ev.submit(wake_flags());
}
