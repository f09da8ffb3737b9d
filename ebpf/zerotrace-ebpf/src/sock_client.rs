//! Client requests of processes that are not Go (Rust, C, anything), seen at the socket
//! (and the byte counts of native servers' responses, `bytes_event`):
//! the first send after a response (or the first ever) starts request n, whose span id is
//! drawn here and offered to a server on this host that will read it (CLIENT_LINK by flow);
//! its first bytes go to the agent. The first receive after it brings the response's first
//! bytes; every receive its length and last bytes, from which the agent tells where the
//! response ends (Content-Length, chunked end, or the next request / close). Go
//! processes never come here: their client spans come from `(*Transport).roundTrip`.
use aya_ebpf::helpers::generated::bpf_ringbuf_output;
use zerotrace_common::{ClientLink, ConnState, Counter, EventKind, HTTP_REQUEST_MAX, HttpRequestEvent, SockBytesEvent, bounds, phase};

use crate::{
    causality::new_span_id,
    http_server::{capture_size, is_tls_record, send_capture},
    maps::{CLIENT_LINK, EVENTS, SCRATCH, kernel},
    socket_hooks::{SyscallArgs, recv_buffer, send_buffer},
    util::{count, header, now, read_kernel, read_user, read_user_bytes, wake_flags},
};

/// Whether the bytes at `buf` start HTTP/2's client preface ("PRI * HTTP/2.0").
#[inline(always)]
pub fn h2_preface(buf: u64) -> bool {
    buf != 0 && read_user::<[u8; 4]>(buf) == Some(*b"PRI ")
}

/// Whether the bytes at `buf` can start an HTTP/2 frame (a connection that was open before
/// the agent, seen from its first read or send after attaching): a length within the
/// default maximum frame size, a known type, the reserved bit clear, and a stream id of 0
/// exactly for connection-level frames. No HTTP/1 or TLS bytes pass (their first three
/// bytes make a length above 16 KiB).
#[inline(always)]
pub fn h2_frame_start(buf: u64) -> bool {
    if buf == 0 {
        return false;
    }
    let Some(b) = read_user::<[u8; 9]>(buf) else { return false };
    let len = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
    let (kind, stream_hi) = (b[3], b[5]);
    let stream_zero = b[5] | b[6] | b[7] | b[8] == 0;
    let conn_level = kind == 4 || kind == 6 || kind == 7;
    let stream_level = kind <= 3 || kind == 5 || kind == 9;
    len <= 16_384 && kind <= 9 && stream_hi & 0x80 == 0 && (!conn_level || stream_zero) && (!stream_level || !stream_zero)
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
    const HDR: usize = core::mem::size_of::<HttpRequestEvent>();
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else { return };
    let scratch = scratch as *mut u8;
    // SAFETY: the scratch value holds HDR + REQ_CAPTURE_MAX bytes.
    let captured = if buf == 0 { 0 } else { read_user_bytes::<{ bounds::REQ_CAPTURE_MAX }>(unsafe { scratch.add(HDR) }, buf + at, n) };
    let ev = scratch as *mut HttpRequestEvent;
    // SAFETY: the scratch value starts with room for the header.
    unsafe {
        (*ev).hdr = header(kind, HDR + captured as usize, conn.pid, pid_tgid as u32, ts);
        (*ev).conn_id = conn.id;
        (*ev).goroutine = 0;
        (*ev).goid = 0;
        (*ev).start_ns = ts;
        // 1: the connection started with the preface; 2: joined mid-connection.
        (*ev).seq = conn.h2 as u32;
        (*ev).read_len = if total > u32::MAX as u64 { u32::MAX } else { total as u32 };
        (*ev).captured = captured;
        (*ev).offset = at as u32;
        (*ev).span_id = 0;
        (*ev).link_span = 0;
        (*ev).trace_id = [0; 16];
        (*ev).tls = last as u8;
        (*ev).trace_origin = 0;
        (*ev)._pad = [0; 6];
    }
    let mut size = HDR as u64 + captured as u64;
    if size > HTTP_REQUEST_MAX as u64 {
        size = HTTP_REQUEST_MAX as u64;
    }
    // SAFETY: scratch holds HTTP_REQUEST_MAX bytes and size is bounded by it.
    let rc = unsafe { bpf_ringbuf_output(core::ptr::addr_of!(EVENTS) as *mut _, scratch.cast(), size, wake_flags()) };
    if rc < 0 {
        count(Counter::RingFull);
    }
}

/// Whether the bytes at `buf` can start an HTTP/1 request: an upper-case method of 3 to 7
/// letters and a space.
#[inline(always)]
pub fn starts_request(buf: u64) -> bool {
    let Some(b) = read_user::<[u8; 8]>(buf) else { return false };
    let mut i = 0;
    while i < 8 {
        let c = b[i];
        if c == b' ' {
            return i >= 3;
        }
        if !c.is_ascii_uppercase() {
            return false;
        }
        i += 1;
    }
    false
}

/// The process hands bytes to TCP on client socket `conn`.
#[inline(always)]
pub fn on_send<A: SyscallArgs>(conn: &mut ConnState, pid_tgid: u64, msg: u64) {
    if conn.other != 0 {
        return;
    }
    let (buf, len) = send_buffer::<A>();
    if conn.h2 == 0 && conn.seq == 0 && conn.phase == phase::IDLE {
        if h2_preface(buf) {
            conn.h2 = 1;
        } else if h2_frame_start(buf) {
            conn.h2 = 2;
        }
    }
    if conn.h2 != 0 {
        h2_bytes(conn, pid_tgid, EventKind::SockH2Send, buf, len, send_total(msg, len));
        return;
    }
    if conn.phase == phase::REQUEST {
        // More of the same request (a head written in pieces).
        if buf != 0 && conn.captured < capture_size() {
            send_capture(conn, pid_tgid, EventKind::SockClientRequest, buf, len, len, conn.req_ts, 0, 0);
        }
        return;
    }
    if buf == 0 || !starts_request(buf) {
        // Not HTTP/1 (or bytes zerotrace cannot see): the connection is left alone, and a
        // stale offer on its flow withdrawn.
        if conn.seq == 0 || (buf != 0 && is_tls_record(buf)) {
            conn.other = 1;
        }
        let _ = CLIENT_LINK.remove(&conn.flow);
        return;
    }
    let ts = now();
    conn.phase = phase::REQUEST;
    conn.seq += 1;
    conn.req_ts = ts;
    conn.captured = 0;
    conn.bytes_in = 0;
    conn.span_id = new_span_id();
    count(Counter::SockClientRequests);
    let _ = CLIENT_LINK.insert(&conn.flow, &ClientLink { span_id: conn.span_id, ts_ns: ts }, 0);
    count(Counter::ClientLinks);
    send_capture(conn, pid_tgid, EventKind::SockClientRequest, buf, len, len, ts, 0, 0);
}

/// A receive on client socket `conn` returned `ret` > 0 bytes.
#[inline(always)]
pub fn on_recv<A: SyscallArgs>(conn: &mut ConnState, pid_tgid: u64, ret: u64) {
    if conn.other != 0 {
        return;
    }
    let (buf, room) = recv_buffer::<A>();
    let n = if ret < room { ret } else { room };
    if conn.phase == phase::IDLE && conn.h2 == 0 {
        // A connection older than the agent whose first bytes seen are HTTP/2 frames.
        if conn.seq != 0 || !h2_frame_start(buf) {
            return;
        }
        conn.h2 = 2;
    }
    if conn.h2 != 0 {
        h2_bytes(conn, pid_tgid, EventKind::SockH2Recv, buf, n, ret);
        return;
    }
    if conn.phase == phase::REQUEST {
        match crate::http_server::interim_status(buf) {
            // 100 Continue: the request goes on (its body follows); the final response is
            // the next read's.
            crate::http_server::Interim::Yes => return,
            // After 101 the connection carries another protocol: this is its last response.
            crate::http_server::Interim::Upgrade => conn.other = 1,
            crate::http_server::Interim::No => {}
        }
        // The response's first bytes: its head (status, framing).
        conn.phase = phase::RESPONSE;
        conn.captured = 0;
        // The head, and the count of this first read: one record.
        send_capture(conn, pid_tgid, EventKind::SockClientResponse, buf, n, ret, now(), 0, 0);
        return;
    }
    if crate::http_server::is_final_head(buf) {
        // A read that starts with another response head: the answer to a pipelined request
        // (or body bytes that look like one: the agent tells by the framing so far).
        conn.captured = 0;
        send_capture(conn, pid_tgid, EventKind::SockClientResponse, buf, n, ret, now(), 0, 0);
        return;
    }
    // Where a vectored read's bytes end is not looked for: its tail is then unknown.
    let tail_len = if ret <= room { ret } else { 0 };
    bytes_event(conn, pid_tgid, EventKind::SockClientRecv, ret, buf, tail_len);
}

/// Bytes a send hands to TCP: the kernel's count of the message (every iovec), else the
/// syscall's own length.
#[inline(always)]
pub fn send_total(msg: u64, len: u64) -> u64 {
    let off = kernel().msghdr_iter_count;
    if off == 0 || msg == 0 {
        return len;
    }
    read_kernel::<u64>(msg + off as u64).unwrap_or(len)
}

/// Reports `len` bytes of the current response moved on `conn`; their last bytes (up to
/// 8) are the end of the `buf_len` bytes at `buf` (0: not known).
#[inline(always)]
pub fn bytes_event(conn: &ConnState, pid_tgid: u64, kind: EventKind, len: u64, buf: u64, buf_len: u64) {
    let Some(mut ev) = EVENTS.reserve::<SockBytesEvent>(0) else {
        count(Counter::RingFull);
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
