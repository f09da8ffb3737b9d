//! The request/response cycle of server connections (the phase machine), seen where bytes
//! cross the socket layer: the first receive with data after a response (or the first
//! ever) starts request n and sends its first bytes; the first send after it starts the
//! response (status line kept, Go route pattern read); the next receive attempt or TCP
//! close ends it. A response head sent with no request read for it answers a pipelined
//! request, which starts there (or, in Go handler mode, at its handler's entry). No uprobe
//! is involved per request: `io.rs` calls in here from every socket hook flavour. On TLS
//! connections the request and response bytes come in plaintext from the crypto/tls hooks
//! (go_tls.rs) instead; the socket hooks keep their timing.
use zerotrace_common::{ConnKey, ConnRole, ConnState, Counter, EventKind, GoOffsets, HttpResponseEvent, bounds, h2_start, phase};

use super::{
    args::{SyscallArgs, last_send_buffer, recv_buffer, send_buffer},
    bytes::{Interim, h2_frame_start, h2_preface, interim_status, is_final_head, is_tls_record, starts_request},
    records::{bytes_event, capture_size, h2_bytes, native_capture, pipelined_capture, request_capture},
};
use crate::{
    causality::new_span_id,
    maps::{CONNS, EVENTS, SHED, kernel},
    util::{count, current_goroutine, go_ptr, header, now, read_kernel, read_user, read_user_bytes, target, wake_flags},
};

/// Server connection `conn` (socket `sk`) hands bytes to TCP: a socket hook before they
/// are copied (the peer can have them before the send returns, so this moment, not the
/// send's return, is the response's end candidate). The user buffer is read only at the
/// first send of a response.
#[inline(always)]
pub fn on_send(conn: &mut ConnState, pid_tgid: u64, sk: u64, sys: &SyscallArgs) {
    count(Counter::SocketOps);
    if conn.tls != 0 {
        // The response's bytes came through crypto/tls (send_bytes); this is its timing.
        if conn.phase == phase::RESPONSE {
            conn.last_write_ts = now();
        }
        return;
    }
    // Native processes' byte counts and HTTP/2 capture: once per syscall (see first_pass).
    if conn.native != 0 && !sys.first_pass() {
        if conn.phase == phase::RESPONSE {
            conn.last_write_ts = now();
        }
        return;
    }
    if conn.native != 0 && conn.h2 != 0 {
        let (buf, len) = send_buffer(sys);
        h2_bytes(conn, pid_tgid, EventKind::SockH2Send, buf, len, sys.send_total(len));
        return;
    }
    // A native server's sends are all reported (where its response ends is told by its
    // framing: hyper, for one, reads nothing after a response until the next request).
    let native = conn.native != 0 && conn.h2 == 0;
    let starting = conn.phase == phase::REQUEST;
    let (buf, len) = send_buffer(sys);
    // A response head sent with no request read since the last one answers a request that
    // came pipelined (Go and hyper answer them one by one from their read buffer). Go's
    // sends are seen once per pass of TCP's copy loop: only a syscall's first counts; and
    // a send tried again (nothing was queued since the response started) is no new one.
    if !starting && conn.seq != 0 && conn.other == 0 && is_final_head(buf) && (native || sys.first_pass()) {
        let wseq = write_seq(sk);
        if conn.phase == phase::IDLE || wseq.is_none_or(|w| w != conn.resp_wseq) {
            let total = sys.send_total(len);
            pipelined_response(conn, pid_tgid, buf, len, total, wseq.unwrap_or(0));
            return;
        }
    }
    send_bytes(conn, buf, len);
    if starting && conn.phase == phase::RESPONSE {
        conn.resp_wseq = write_seq(sk).unwrap_or(0);
    }
    if native && conn.phase == phase::RESPONSE {
        let total = sys.send_total(len);
        if starting {
            // The head, and the count of this first send: one record.
            conn.captured = 0;
            native_capture(conn, pid_tgid, EventKind::SockServerResponse, buf, len, total, conn.resp_ts);
        } else {
            let (last, last_len) = last_send_buffer(sys);
            bytes_event(conn, pid_tgid, EventKind::SockServerSend, total, last, last_len);
        }
    }
}

/// Whether the request starting now is shed: the agent's guard sets SHED's shift while
/// it sheds load; a random draw keeps 1 in 2^shift.
#[inline(always)]
fn shed_this() -> bool {
    let k = SHED.get(0).copied().unwrap_or(0);
    // SAFETY: helper without side effects.
    k != 0 && !zerotrace_common::shed::keeps(k, unsafe { aya_ebpf::helpers::bpf_get_prandom_u32() })
}

/// tcp_sock.write_seq of socket `sk`: moves as bytes are queued to send.
#[inline(always)]
fn write_seq(sk: u64) -> Option<u32> {
    let off = kernel().tcp_write_seq;
    if off == 0 {
        return None;
    }
    read_kernel::<u32>(sk + off as u64)
}

/// Server connection `conn` sends the head of a response (`len` bytes at `buf`, `total` in
/// the send) with no request read for it: the request came pipelined behind an earlier one.
/// The response being written (if any) ends, and request n + 1 starts here with a span id
/// of its own; the agent finds its bytes in the capture of the read that brought them all.
/// `wseq`: the socket's write_seq now (0: not known).
#[inline(always)]
pub fn pipelined_response(conn: &mut ConnState, pid_tgid: u64, buf: u64, len: u64, total: u64, wseq: u32) {
    let ts = now();
    start_unread_request(conn, pid_tgid, ts);
    conn.resp_wseq = wseq;
    conn.captured = 0;
    fill_response(conn, buf, len, ts);
    // SAFETY: plain field stores through a valid reference (ordered as in send_bytes).
    unsafe {
        core::ptr::write_volatile(&mut conn.last_write_ts, ts);
        core::ptr::write_volatile(&mut conn.phase, phase::RESPONSE);
    }
    let (pattern, pattern_len) = (conn.pattern_ptr, conn.pattern_len as u64);
    pipelined_capture(conn, pid_tgid, buf, len, total, ts, pattern, pattern_len);
}

/// A request that no read started (pipelined) starts on `conn` at `ts`: the response being
/// written, if any, ends, and the request gets the next sequence number and a span id.
#[inline(always)]
fn start_unread_request(conn: &mut ConnState, pid_tgid: u64, ts: u64) {
    finish_response(conn, pid_tgid as u32, ts, 0);
    // Volatile, as fill_response's: another CPU that sees RESPONSE must see these too.
    // SAFETY: plain field stores through a valid reference.
    unsafe {
        core::ptr::write_volatile(&mut conn.seq, conn.seq + 1);
        core::ptr::write_volatile(&mut conn.span_id, new_span_id());
    }
    conn.req_ts = ts;
    conn.bytes_in = 0;
    conn.trace_in = 0;
    count(Counter::PipelinedRequestsSeen);
    // A request that came pipelined behind a shed one is shed with it: its bytes were in
    // the read that was not captured.
    if conn.shed != 0 {
        conn.span_id = 0;
        count(Counter::RequestsShed);
    }
}

/// Handler mode: a Go handler starts on server socket `sk`. When no read started its
/// request (it came pipelined, and Go took it from its read buffer), it starts here, so
/// that the handler's work belongs to it from its first instruction: the previous response
/// is complete (Go flushes it before reading the next request) and ends now.
#[inline(always)]
pub fn handler_entry(pid_tgid: u64, sk: u64) {
    let Some(conn) = CONNS.get_ptr_mut(&ConnKey { sk }) else { return };
    // SAFETY: map value pointer, valid for this program run.
    let conn = unsafe { &mut *conn };
    if conn.pid != (pid_tgid >> 32) as u32
        || conn.role != ConnRole::Server as u8
        || conn.seq == 0
        || conn.h2 != 0
        || conn.other != 0
        || conn.phase == phase::REQUEST
    {
        return;
    }
    let ts = now();
    start_unread_request(conn, pid_tgid, ts);
    // Its bytes came with the first request's capture; reads until its response add none.
    conn.captured = capture_size();
    pipelined_capture(conn, pid_tgid, 0, 0, 0, ts, 0, 0);
    conn.phase = phase::REQUEST;
}

/// A server connection hands `len` bytes at `buf` to be sent (a socket send, or plaintext
/// to crypto/tls before it is encrypted): the first of a response starts it. An interim
/// response (100 Continue) does not: the request goes on (its body may follow).
#[inline(always)]
pub fn send_bytes(conn: &mut ConnState, buf: u64, len: u64) {
    if conn.h2 != 0 || conn.other != 0 && conn.phase != phase::RESPONSE {
        return;
    }
    let ts = now();
    if conn.phase == phase::REQUEST {
        match interim_status(buf) {
            Interim::Yes => return,
            // The span of the upgrade request ends with this response; nothing after it on
            // this connection is HTTP/1.
            Interim::Upgrade => conn.other = 1,
            Interim::No => {}
        }
        fill_response(conn, buf, len, ts);
        // Published last: another CPU (a receive attempt on this socket, e.g. Go's
        // background read while the handler writes) ends a response as soon as it sees
        // RESPONSE, and must then see its fields, not the previous response's.
        // Volatile stores keep their order (fill_response's are volatile too).
        // SAFETY: plain field stores through a valid reference.
        unsafe {
            core::ptr::write_volatile(&mut conn.last_write_ts, ts);
            core::ptr::write_volatile(&mut conn.phase, phase::RESPONSE);
        }
        return;
    }
    if conn.phase == phase::RESPONSE {
        conn.last_write_ts = ts;
    }
}

/// The first send after a request: keep the status line, and for Go read the route pattern
/// of the request being answered (conn.curReq -> response.req -> Pattern / pat.str). The
/// caller then moves the connection to RESPONSE.
#[inline(always)]
fn fill_response(conn: &mut ConnState, buf: u64, len: u64, ts: u64) {
    let status_len = if buf != 0 { read_user_bytes::<{ bounds::STATUS_CAPTURE }>(conn.status.as_mut_ptr(), buf, len) as u8 } else { 0 };
    let (pattern_ptr, pattern_len, w) = route_pattern(conn);
    // SAFETY: plain field stores through a valid reference; volatile so that they stay
    // before the caller's (volatile) move to RESPONSE.
    unsafe {
        core::ptr::write_volatile(&mut conn.resp_w, w);
        core::ptr::write_volatile(&mut conn.resp_ts, ts);
        core::ptr::write_volatile(&mut conn.status_len, status_len);
        core::ptr::write_volatile(&mut conn.pattern_ptr, pattern_ptr);
        core::ptr::write_volatile(&mut conn.pattern_len, pattern_len);
    }
}

/// Go: the address and length of the route pattern of the request `conn` is answering
/// (0, 0: none or not Go), and its `*response` (conn.curReq; 0: unknown).
#[inline(always)]
fn route_pattern(conn: &ConnState) -> (u64, u16, u64) {
    if conn.go_conn == 0 {
        return (0, 0, 0);
    }
    let Some(cfg) = target(conn.pid) else {
        return (0, 0, 0);
    };
    let go = &cfg.go;
    let w = go_ptr(conn.go_conn, go.conn_curreq);
    let r = go_ptr(w, go.response_req);
    if r == 0 {
        return (0, 0, w);
    }
    let mut str_at = 0u64;
    if go.request_pattern != GoOffsets::NONE {
        str_at = r + go.request_pattern as u64;
    } else if go.request_pat != GoOffsets::NONE && go.pattern_str != GoOffsets::NONE {
        let p = go_ptr(r, go.request_pat);
        if p != 0 {
            str_at = p + go.pattern_str as u64;
        }
    }
    if str_at == 0 {
        return (0, 0, w);
    }
    let Some(s) = read_user::<[u64; 2]>(str_at) else {
        return (0, 0, w);
    };
    if s[0] != 0 && s[1] != 0 { (s[0], if s[1] > bounds::PATTERN_MAX as u64 { bounds::PATTERN_MAX as u16 } else { s[1] as u16 }, w) } else { (0, 0, w) }
}

/// Sends the record that ends the current response, if one is being written. `tid`: the
/// thread that caused it (0 when TCP closed the socket outside the process).
#[inline(always)]
pub fn finish_response(conn: &mut ConnState, tid: u32, ts: u64, closed: u8) {
    if conn.phase != phase::RESPONSE {
        return;
    }
    conn.phase = phase::IDLE;
    if conn.shed != 0 {
        return;
    }
    let Some(mut ev) = EVENTS.reserve::<HttpResponseEvent>(0) else {
        count(Counter::EventsDroppedRingFull);
        return;
    };
    let e = ev.as_mut_ptr();
    // SAFETY: e points at a reserved record of the right size; every field is written.
    unsafe {
        (*e).hdr = header(EventKind::HttpResponse, core::mem::size_of::<HttpResponseEvent>(), conn.pid, tid, ts);
        (*e).conn_id = conn.id;
        (*e).resp_start_ns = conn.resp_ts;
        (*e).end_ns = conn.last_write_ts;
        (*e).bytes_in = conn.bytes_in;
        (*e).seq = conn.seq;
        (*e).status_len = conn.status_len;
        (*e).closed = closed;
        (*e).pattern_len = conn.pattern_len;
        (*e).status = conn.status;
        (*e).pattern_ptr = conn.pattern_ptr;
    }
    ev.submit(wake_flags());
}

/// `len` request bytes at `buf` arrived on server connection `conn` (from a socket read,
/// or in plaintext from crypto/tls): the first after a response start request n.
#[inline(always)]
pub fn recv_bytes<const SCAN: bool>(conn: &mut ConnState, pid_tgid: u64, buf: u64, len: u64) -> Option<()> {
    // HTTP/2 has no phases; an upgraded connection (101) carries another protocol.
    if conn.h2 != 0 || conn.other != 0 {
        return Some(());
    }
    if conn.phase != phase::REQUEST && conn.seq == 0 && h2_preface(buf) {
        // The HTTP/2 client preface ("PRI * HTTP/2.0"): a Go HTTPS server that negotiated h2.
        conn.h2 = h2_start::PREFACE;
        return Some(());
    }
    if conn.native != 0 && conn.phase != phase::REQUEST && len >= 4 && !starts_request(buf) {
        // A native server speaking another protocol (a database, a cache): its bytes are
        // never HTTP/1, so the connection is left alone from here on.
        conn.other = 1;
        return Some(());
    }
    let ts = now();
    conn.bytes_in += len;
    let cap = capture_size();
    if conn.phase == phase::REQUEST {
        // More of the same request: keep capturing until the capture size is reached (a
        // head can arrive in pieces, e.g. Go's background reader takes its first byte).
        if conn.captured >= cap {
            return Some(());
        }
    } else {
        conn.phase = phase::REQUEST;
        conn.seq += 1;
        // The request is here once a receive returned its first bytes.
        conn.req_ts = ts;
        conn.bytes_in = len;
        conn.captured = 0;
        conn.span_id = new_span_id();
        count(Counter::RequestsSeen);
        conn.shed = shed_this() as u8;
        if conn.shed != 0 {
            // No records, and no span id for the goroutines it spawns to inherit.
            conn.span_id = 0;
            count(Counter::RequestsShed);
        }
    }
    if conn.shed != 0 {
        return Some(());
    }
    // The goroutine serving the connection, as Go's conn.serve told us; else (other
    // runtimes, connections older than the agent) whatever runs on this thread.
    let (goroutine, goid) = if conn.go_g != 0 {
        (conn.go_g, conn.goid)
    } else {
        let cfg = target(conn.pid)?;
        if cfg.flags & zerotrace_common::target_flags::GO != 0 { current_goroutine(cfg) } else { (0, 0) }
    };
    request_capture::<SCAN>(conn, pid_tgid, buf, len, len, conn.req_ts, goroutine, goid);
    Some(())
}

/// A receive on server connection `conn` returned `ret` (bytes or -errno). The user buffer
/// is read only when bytes are captured.
#[inline(always)]
pub fn on_recv<const SCAN: bool>(conn: &mut ConnState, pid_tgid: u64, ret: i64, sys: &SyscallArgs) {
    count(Counter::SocketOps);
    // Any receive attempt after a response ends it: the server waits for what comes next.
    finish_response(conn, pid_tgid as u32, now(), 0);
    // TLS records carry no request bytes we can read: the crypto/tls hooks bring them. An
    // upgraded connection carries another protocol.
    if ret <= 0 || conn.tls != 0 || conn.other != 0 {
        return;
    }
    let (buf, room) = recv_buffer(sys);
    // A vectored read: only its first buffer is looked at.
    let len = if (ret as u64) < room { ret as u64 } else { room };
    if buf == 0 {
        count(Counter::ReceivesWithoutBuffer);
    } else if conn.phase != phase::REQUEST && is_tls_record(buf) {
        // A TLS handshake or record where a request would start (a TLS server that is not
        // Go's, or a Go connection older than the agent): never parsed as HTTP.
        conn.tls = 1;
        return;
    }
    if conn.native != 0 && conn.h2 == 0 && conn.seq == 0 && conn.phase == phase::IDLE {
        if h2_preface(buf) {
            conn.h2 = h2_start::PREFACE;
        } else if h2_frame_start(buf) {
            // Joined an HTTP/2 connection that was open before the agent.
            conn.h2 = h2_start::JOINED;
        }
    }
    if conn.native != 0 && conn.h2 != 0 {
        // HTTP/2 (h2c, prior knowledge): every read goes to the agent, which reads frames.
        h2_bytes(conn, pid_tgid, EventKind::SockH2Recv, buf, len, ret as u64);
        return;
    }
    recv_bytes::<SCAN>(conn, pid_tgid, buf, len);
}
