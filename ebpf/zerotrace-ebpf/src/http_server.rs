//! The request/response cycle of server-side connections, seen at read(2) and write(2):
//! the first read after a response (or the first ever) starts request n and sends its first
//! bytes; the first write after it starts the response (status line kept, Go route pattern
//! read); the next read attempt or close ends it. No uprobe is involved per request: these
//! are called from the raw syscall tracepoints in syscalls.rs.
use aya_ebpf::helpers::generated::bpf_ringbuf_output;
use zerotrace_common::{
    ConnKey, ConnRole, ConnState, Counter, EventKind, GoOffsets, HTTP_REQUEST_MAX,
    HttpRequestEvent, HttpResponseEvent, bounds, phase,
};

use crate::{
    maps::{CONNS, EVENTS, SCRATCH, TARGETS, settings},
    util::{count, current_goroutine, go_ptr, header, now, read_user, read_user_bytes, wake_flags},
};

const REQ_HDR: usize = core::mem::size_of::<HttpRequestEvent>();

/// Entry of write(2) on socket `fd` of a selected process. Everything is known here
/// (buffer, length), so there is no exit hook: the response's end is the entry of its last
/// write, the moment its last bytes are handed to the kernel (the peer can have them before
/// the write returns).
#[inline(always)]
pub fn on_write(pid_tgid: u64, fd: u64, buf: u64, len: u64) -> Option<()> {
    let pid = (pid_tgid >> 32) as u32;
    let conn = CONNS.get_ptr_mut(&ConnKey { pid, fd: fd as u32 })?;
    count(Counter::SocketSyscalls);
    // SAFETY: map value pointer, valid for this program run.
    let conn = unsafe { &mut *conn };
    if conn.role != ConnRole::Server as u8 {
        return Some(());
    }
    let ts = now();
    if conn.phase == phase::REQUEST {
        start_response(conn, pid, buf, len, ts);
    }
    if conn.phase == phase::RESPONSE {
        conn.last_write_ts = ts;
        conn.bytes_out += len;
    }
    Some(())
}

/// The first write after a request: keep the status line, and for Go read the route pattern
/// of the request being answered (conn.curReq -> response.req -> Pattern / pat.str).
#[inline(always)]
fn start_response(conn: &mut ConnState, pid: u32, buf: u64, len: u64, ts: u64) {
    conn.phase = phase::RESPONSE;
    conn.resp_ts = ts;
    conn.status_len = read_user_bytes::<{ bounds::STATUS_CAPTURE }>(conn.status.as_mut_ptr(), buf, len) as u8;
    conn.pattern_len = 0;
    if conn.go_conn == 0 {
        return;
    }
    let Some(cfg) = TARGETS.get_ptr(pid) else {
        return;
    };
    // SAFETY: map value pointer, valid for this program run.
    let go = unsafe { &(*cfg).go };
    let w = go_ptr(conn.go_conn, go.conn_curreq);
    let r = go_ptr(w, go.response_req);
    if r == 0 {
        return;
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
        return;
    }
    let Some(s) = read_user::<[u64; 2]>(str_at) else {
        return;
    };
    if s[0] != 0 && s[1] != 0 {
        conn.pattern_len =
            read_user_bytes::<{ bounds::PATTERN_MAX }>(conn.pattern.as_mut_ptr(), s[0], s[1]) as u16;
    }
}

/// Sends the record that ends the current response, if one is being written.
#[inline(always)]
pub fn finish_response(conn: &mut ConnState, pid_tgid: u64, fd: i32, ts: u64, closed: u8) {
    if conn.phase != phase::RESPONSE {
        return;
    }
    conn.phase = phase::IDLE;
    let Some(mut ev) = EVENTS.reserve::<HttpResponseEvent>(0) else {
        count(Counter::RingFull);
        return;
    };
    let e = ev.as_mut_ptr();
    // SAFETY: e points at a reserved record of the right size; every field is written.
    unsafe {
        (*e).hdr = header(EventKind::HttpResponse, core::mem::size_of::<HttpResponseEvent>(), pid_tgid, ts);
        (*e).conn_id = conn.id;
        (*e).resp_start_ns = conn.resp_ts;
        (*e).end_ns = conn.last_write_ts;
        (*e).bytes_in = conn.bytes_in;
        (*e).bytes_out = conn.bytes_out;
        (*e).fd = fd;
        (*e).seq = conn.seq;
        (*e).status_len = conn.status_len;
        (*e).closed = closed;
        (*e).pattern_len = conn.pattern_len;
        (*e)._pad = 0;
        (*e).status = conn.status;
        (*e).pattern = conn.pattern;
    }
    ev.submit(wake_flags());
}

/// Exit of read(2) on `fd` of a selected process, which returned `ret` (bytes or -errno).
#[inline(always)]
pub fn on_read(pid_tgid: u64, fd: u64, buf: u64, ret: i64) -> Option<()> {
    let pid = (pid_tgid >> 32) as u32;
    let conn = CONNS.get_ptr_mut(&ConnKey { pid, fd: fd as u32 })?;
    count(Counter::SocketSyscalls);
    let fd = fd as i32;
    let ts = now();
    // SAFETY: map value pointer, valid for this program run.
    let conn = unsafe { &mut *conn };
    if conn.role != ConnRole::Server as u8 {
        return Some(());
    }
    // Any read attempt after a response ends it: the server is waiting for what comes next.
    finish_response(conn, pid_tgid, fd, ts, 0);
    if ret <= 0 {
        return Some(());
    }
    conn.bytes_in += ret as u64;
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
        // The request is here once a read returned its first bytes (the read's entry may
        // precede the peer's write: data can arrive while the syscall runs).
        conn.req_ts = ts;
        conn.bytes_in = ret as u64;
        conn.bytes_out = 0;
        conn.captured = 0;
        count(Counter::Requests);
    }
    let cfg = TARGETS.get_ptr(pid)?;
    // SAFETY: map value pointer, valid for this program run.
    let cfg = unsafe { &*cfg };
    let (goroutine, goid) = if cfg.flags & zerotrace_common::target_flags::GO != 0 {
        current_goroutine(cfg)
    } else {
        (0, 0)
    };
    send_request(conn, pid_tgid, fd, buf, ret as u64, goroutine, goid);
    Some(())
}

/// Request bytes captured per request, from the settings, never above the hard maximum.
#[inline(always)]
fn capture_size() -> u32 {
    let cap = settings().req_capture;
    if cap > bounds::REQ_CAPTURE_MAX as u32 { bounds::REQ_CAPTURE_MAX as u32 } else { cap }
}

/// Copies the record header and the bytes read into a variable-length record.
#[inline(always)]
fn send_request(conn: &mut ConnState, pid_tgid: u64, fd: i32, src: u64, len: u64, goroutine: u64, goid: u64) {
    let Some(buf) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    let buf = buf as *mut u8;
    let room = capture_size().saturating_sub(conn.captured) as u64;
    let want = if len < room { len } else { room };
    // SAFETY: the scratch value holds REQ_HDR + REQ_CAPTURE_MAX bytes.
    let captured = read_user_bytes::<{ bounds::REQ_CAPTURE_MAX }>(unsafe { buf.add(REQ_HDR) }, src, want);
    let size = REQ_HDR as u64 + captured as u64;
    let ev = buf as *mut HttpRequestEvent;
    // SAFETY: the scratch value starts with room for the header.
    unsafe {
        (*ev).hdr = header(EventKind::HttpRequest, size as usize, pid_tgid, now());
        (*ev).conn_id = conn.id;
        (*ev).goroutine = goroutine;
        (*ev).goid = goid;
        (*ev).start_ns = conn.req_ts;
        (*ev).fd = fd;
        (*ev).seq = conn.seq;
        (*ev).read_len = len as u32;
        (*ev).captured = captured;
        (*ev).offset = conn.captured;
        (*ev)._pad = 0;
    }
    conn.captured += captured;
    let mut size = size;
    if size > HTTP_REQUEST_MAX as u64 {
        size = HTTP_REQUEST_MAX as u64;
    }
    // SAFETY: buf holds HTTP_REQUEST_MAX bytes and size is bounded by it.
    let rc = unsafe { bpf_ringbuf_output(core::ptr::addr_of!(EVENTS) as *mut _, buf.cast(), size, wake_flags()) };
    if rc < 0 {
        count(Counter::RingFull);
    }
}
