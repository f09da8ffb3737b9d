//! The request/response cycle of server-side connections, seen at read(2) and write(2):
//! the first read after a response (or the first ever) starts request n and sends its first
//! bytes; the first write after it starts the response (status line kept, Go route pattern
//! read); the next read attempt or close ends it. No uprobe is involved per request.
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, generated::bpf_ringbuf_output},
    macros::tracepoint,
    programs::TracePointContext,
};
use zerotrace_common::{
    ConnKey, ConnRole, ConnState, Counter, EventKind, GoOffsets, HTTP_REQUEST_MAX,
    HttpRequestEvent, HttpResponseEvent, Inflight, TargetConfig, bounds, op, phase,
};

use crate::{
    maps::{CONNS, EVENTS, INFLIGHT, SCRATCH, TARGETS, settings},
    sockets::{ARG0, ARG1, ARG2, RET},
    util::{count, current_goroutine, go_ptr, header, now, read_user, read_user_bytes, wake_flags},
};

const REQ_HDR: usize = core::mem::size_of::<HttpRequestEvent>();

/// Records a read or write on a tracked socket so that its exit can find the arguments.
#[inline(always)]
fn enter(ctx: &TracePointContext, which: u32) -> Option<()> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let pid = (pid_tgid >> 32) as u32;
    TARGETS.get_ptr(pid)?;
    // SAFETY: offsets of the fd and buf arguments in the sys_enter record.
    let fd = unsafe { ctx.read_at::<u64>(ARG0) }.ok()? as u32;
    let buf = unsafe { ctx.read_at::<u64>(ARG1) }.ok()?;
    let key = ConnKey { pid, fd };
    let conn = CONNS.get_ptr_mut(&key)?;
    count(Counter::SocketSyscalls);
    let ts = now();
    if which == op::WRITE {
        // SAFETY: map value pointer, valid for this program run.
        let conn = unsafe { &mut *conn };
        if conn.role == ConnRole::Server as u8 && conn.phase == phase::REQUEST {
            // SAFETY: offset of the count argument.
            let len = unsafe { ctx.read_at::<u64>(ARG2) }.unwrap_or(0);
            start_response(conn, pid, buf, len, ts);
        }
    }
    let rec = Inflight { ts, buf, fd: fd as i32, op: which };
    if INFLIGHT.insert(&pid_tgid, &rec, 0).is_err() {
        count(Counter::InflightFull);
    }
    Some(())
}

/// The first write after a request: keep the status line, and for Go read the route pattern
/// of the request being answered (conn.curReq -> response.req -> Pattern / pat.str).
#[inline(always)]
fn start_response(conn: &mut ConnState, pid: u32, buf: u64, len: u64, ts: u64) {
    conn.phase = phase::RESPONSE;
    conn.resp_ts = ts;
    conn.last_write_ts = ts;
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

/// A read returned `ret` bytes on a tracked socket.
#[inline(always)]
fn read_done(ctx: &TracePointContext, pid_tgid: u64, cfg: *const TargetConfig, rec: &Inflight) -> Option<()> {
    // SAFETY: offset of `ret` in the sys_exit record.
    let ret = unsafe { ctx.read_at::<i64>(RET) }.ok()?;
    let pid = (pid_tgid >> 32) as u32;
    let key = ConnKey { pid, fd: rec.fd as u32 };
    let conn = CONNS.get_ptr_mut(&key)?;
    // SAFETY: map value pointer, valid for this program run.
    let conn = unsafe { &mut *conn };
    if conn.role != ConnRole::Server as u8 {
        return Some(());
    }
    // Any read attempt after a response ends it: the server is waiting for what comes next.
    finish_response(conn, pid_tgid, rec.fd, rec.ts, 0);
    if ret <= 0 {
        return Some(());
    }
    conn.bytes_in += ret as u64;
    if conn.phase != phase::IDLE {
        return Some(());
    }
    conn.phase = phase::REQUEST;
    conn.seq += 1;
    conn.req_ts = rec.ts;
    conn.bytes_in = ret as u64;
    conn.bytes_out = 0;
    count(Counter::Requests);
    // SAFETY: map value pointer, valid for this program run.
    let cfg = unsafe { &*cfg };
    let (goroutine, goid) = if cfg.flags & zerotrace_common::target_flags::GO != 0 {
        current_goroutine(cfg)
    } else {
        (0, 0)
    };
    send_request(conn, pid_tgid, rec, ret as u64, goroutine, goid);
    Some(())
}

/// Copies the request header and the first bytes read into a variable-length record.
#[inline(always)]
fn send_request(conn: &ConnState, pid_tgid: u64, rec: &Inflight, len: u64, goroutine: u64, goid: u64) {
    let Some(buf) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    let buf = buf as *mut u8;
    let mut cap = settings().req_capture as u64;
    if cap > bounds::REQ_CAPTURE_MAX as u64 {
        cap = bounds::REQ_CAPTURE_MAX as u64;
    }
    let want = if len < cap { len } else { cap };
    // SAFETY: the scratch value holds REQ_HDR + REQ_CAPTURE_MAX bytes.
    let captured = read_user_bytes::<{ bounds::REQ_CAPTURE_MAX }>(unsafe { buf.add(REQ_HDR) }, rec.buf, want);
    let size = REQ_HDR as u64 + captured as u64;
    let ev = buf as *mut HttpRequestEvent;
    // SAFETY: the scratch value starts with room for the header.
    unsafe {
        (*ev).hdr = header(EventKind::HttpRequest, size as usize, pid_tgid, now());
        (*ev).conn_id = conn.id;
        (*ev).goroutine = goroutine;
        (*ev).goid = goid;
        (*ev).start_ns = rec.ts;
        (*ev).fd = rec.fd;
        (*ev).seq = conn.seq;
        (*ev).read_len = len as u32;
        (*ev).captured = captured;
    }
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

#[inline(always)]
fn exit(ctx: &TracePointContext) -> Option<()> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let cfg = TARGETS.get_ptr((pid_tgid >> 32) as u32)?;
    // SAFETY: map value pointer, copied before removal.
    let rec = unsafe { *INFLIGHT.get_ptr(&pid_tgid)? };
    let _ = INFLIGHT.remove(&pid_tgid);
    match rec.op {
        op::READ => read_done(ctx, pid_tgid, cfg, &rec),
        op::WRITE => {
            // SAFETY: offset of `ret` in the sys_exit record.
            let ret = unsafe { ctx.read_at::<i64>(RET) }.ok()?;
            let key = ConnKey { pid: (pid_tgid >> 32) as u32, fd: rec.fd as u32 };
            let conn = CONNS.get_ptr_mut(&key)?;
            // SAFETY: map value pointer, valid for this program run.
            let conn = unsafe { &mut *conn };
            if ret > 0 {
                conn.bytes_out += ret as u64;
                if conn.phase == phase::RESPONSE {
                    conn.last_write_ts = now();
                }
            }
            Some(())
        }
        _ => Some(()),
    }
}

#[tracepoint]
pub fn sys_enter_read(ctx: TracePointContext) -> u32 {
    let _ = enter(&ctx, op::READ);
    0
}

#[tracepoint]
pub fn sys_exit_read(ctx: TracePointContext) -> u32 {
    let _ = exit(&ctx);
    0
}

#[tracepoint]
pub fn sys_enter_write(ctx: TracePointContext) -> u32 {
    let _ = enter(&ctx, op::WRITE);
    0
}

#[tracepoint]
pub fn sys_exit_write(ctx: TracePointContext) -> u32 {
    let _ = exit(&ctx);
    0
}
