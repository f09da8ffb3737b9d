//! Go net/http HTTP/2 server spans: `go_h2_handler` at the entry of
//! `(*serverConn).runHandler` (net/http's own HTTP/2: `http2serverConn` up to Go 1.26,
//! `internal/http2.serverConn` from 1.27; `go_h2_xnet_handler` for golang.org/x/net/http2's,
//! which h2c servers use), which runs on the goroutine that then runs the handler, and
//! `go_h2_handler_ret` (`go_h2_xnet_handler_ret`) at each of its RETs (never a uretprobe):
//! two hits per stream, none per HTTP/1 request. The stream's span is the handler goroutine's own, so
//! its client calls, SQL, goroutines and channels go under it; its parent is the client
//! stream a traced client on this host offered on the same connection under the same
//! stream id (socket/go_client.rs); an incoming `traceparent` (the request's Header map,
//! when it is small enough to read here) wins over that link. Offsets: GoOffsets::h2_*, and
//! TargetConfig::xnet_h2 with the Request offsets for x/net.
use aya_ebpf::{macros::uprobe, programs::ProbeContext};
use zerotrace_common::{ConnKey, Counter, EventKind, FlowKey, GoH2EndEvent, GoH2StartEvent, GoH2State, GoOffsets, TargetConfig};

use crate::{
    causality::{enter_own, leave_own, remember_trace, set_own, take_stream_link, trace_for},
    go_http::read_request_pattern,
    go_inject::incoming_traceparent,
    maps::{CONNS, EVENTS, GO_H2},
    socket::conns::go_iface_sk,
    util::{count, go_caller_config, go_ptr, header, now, read_go_string, read_user, regs, wake_flags},
};

/// Where one HTTP/2 server package keeps what the hooks read.
struct Layout {
    rw_rws: u16,
    rws_stream: u16,
    rws_status: u16,
    stream_id: u16,
    sc_conn: u16,
    /// Method, URL, Host, RemoteAddr, ContentLength, Header of the handler's request.
    req: [u16; 6],
    /// The request is an `*http.Request` (its route pattern is readable at the end).
    req_http: bool,
}

/// net/http's own (`XNET` false) or golang.org/x/net/http2's.
#[inline(always)]
fn layout<const XNET: bool>(cfg: &TargetConfig) -> Layout {
    let go = &cfg.go;
    if XNET {
        let x = &cfg.xnet_h2;
        Layout {
            rw_rws: x[0],
            rws_stream: x[1],
            rws_status: x[2],
            stream_id: x[3],
            sc_conn: x[4],
            req: [go.request_method, go.request_url, go.request_host, go.request_remote_addr, go.request_content_length, go.request_header],
            req_http: true,
        }
    } else {
        Layout {
            rw_rws: go.h2_rw_rws,
            rws_stream: go.h2_rws_stream,
            rws_status: go.h2_rws_status,
            stream_id: go.h2_stream_id,
            sc_conn: go.h2_sc_conn,
            req: [go.h2_req_method, go.h2_req_url, go.h2_req_host, go.h2_req_remote_addr, go.h2_req_content_length, go.h2_req_header],
            req_http: go.h2_req_http != 0,
        }
    }
}

/// The kernel socket under the serverConn's net.Conn at `at`: a TCP or TLS connection, or
/// one wrapping it as its first field (h2c's `bufConn{net.Conn; *bufio.Reader}`).
#[inline(always)]
fn conn_sk(go: &GoOffsets, at: u64) -> u64 {
    go_iface_sk(go, at).or_else(|| go_iface_sk(go, read_user::<u64>(at + 8)?)).unwrap_or(0)
}

/// `runHandler(sc, rw *responseWriter, req, handler)`: sc in RAX, rw in RBX, req in RCX;
/// R14 is the handler's goroutine.
#[uprobe]
pub fn go_h2_handler(ctx: ProbeContext) -> u32 {
    handler::<false>(&ctx)
}

/// `go_h2_handler` for golang.org/x/net/http2's `runHandler` (same arguments).
#[uprobe]
pub fn go_h2_xnet_handler(ctx: ProbeContext) -> u32 {
    handler::<true>(&ctx)
}

#[inline(always)]
fn handler<const XNET: bool>(ctx: &ProbeContext) -> u32 {
    let r = regs(ctx);
    // SAFETY: plain loads of fields of the register set.
    let (sc, rw, req) = unsafe { (core::ptr::read_volatile(&r.rax), core::ptr::read_volatile(&r.rbx), core::ptr::read_volatile(&r.rcx)) };
    let Some((pid_tgid, cfg, k)) = go_caller_config(ctx) else { return 0 };
    let go = &cfg.go;
    let l = layout::<XNET>(cfg);
    if l.rw_rws == GoOffsets::NONE || rw == 0 || req == 0 {
        return 0;
    }
    let rws = go_ptr(rw, l.rw_rws);
    let stream = go_ptr(rws, l.rws_stream);
    if stream == 0 {
        return 0;
    }
    // The record first: no span becomes a goroutine's own unless it is reported.
    let Some(mut ev) = EVENTS.reserve::<GoH2StartEvent>(0) else {
        count(Counter::EventsDroppedRingFull);
        return 0;
    };
    // A server span: its parent is the client's, never what the goroutine inherited from
    // the connection's serve loop that spawned it.
    let (span, _, _) = enter_own(&k);
    let state = GoH2State { span_id: span, rws, stream, req, prev: Default::default() };
    if GO_H2.insert(&k, &state, 0).is_err() {
        count(Counter::GoCallsDroppedMapFull);
        ev.discard(0);
        return 0;
    }
    set_own(&k, span);
    let stream_id = read_user::<u32>(stream + l.stream_id as u64).unwrap_or(0);
    let sk = conn_sk(go, sc + l.sc_conn as u64);
    let e = ev.as_mut_ptr();
    // SAFETY: e points at a reserved record of the right size; every field is written.
    unsafe {
        (*e).hdr = header(EventKind::GoH2Start, core::mem::size_of::<GoH2StartEvent>(), k.pid, pid_tgid as u32, now());
        (*e).goid = k.goid;
        (*e).span_id = span;
        (*e).parent_span = 0;
        (*e).sk = sk;
        (*e).stream_id = stream_id;
        (*e).has_flow = 0;
        (*e).tls = 0;
        (*e).flow = FlowKey::default();
        (*e).has_trace = 0;
        (*e).trace_flags = 0;
        (*e).trace_id = [0; 16];
        (*e).remote_span = 0;
        if l.req[5] != GoOffsets::NONE
            && let Some((t, parent, flags)) = incoming_traceparent(go, go_ptr(req, l.req[5]))
        {
            (*e).has_trace = 1;
            (*e).trace_flags = flags;
            (*e).trace_id = t;
            (*e).remote_span = parent;
            remember_trace(span, &t, flags);
        }
        if sk != 0
            && let Some(c) = CONNS.get_ptr(&ConnKey { sk })
        {
            (*e).flow = (*c).flow;
            (*e).has_flow = 1;
            (*e).tls = (*c).tls;
            (*e).parent_span = take_stream_link(&(*c).flow, stream_id);
        }
        if (*e).has_trace == 0 {
            // The linked client's trace, else a new one (kept for injection; the agent
            // starts a new trace with this id, so both agree).
            (*e).trace_id = trace_for(span, (*e).parent_span).0;
        }
        (*e).content_length = read_user::<i64>(req + l.req[4] as u64).unwrap_or(-1);
        for s in [&mut (*e).method, &mut (*e).path, &mut (*e).host, &mut (*e).remote_addr] {
            s.len = 0;
            s.kept = 0;
        }
        read_go_string(req + l.req[0] as u64, &mut (*e).method);
        let url = go_ptr(req, l.req[1]);
        if url != 0 {
            read_go_string(url + go.url_path as u64, &mut (*e).path);
        }
        read_go_string(req + l.req[2] as u64, &mut (*e).host);
        read_go_string(req + l.req[3] as u64, &mut (*e).remote_addr);
    }
    ev.submit(wake_flags());
    0
}

/// A RET of `runHandler`: the handler returned (its deferred cleanup, which gives the
/// response state back to a pool, has run).
#[uprobe]
pub fn go_h2_handler_ret(ctx: ProbeContext) -> u32 {
    handler_ret::<false>(&ctx)
}

/// `go_h2_handler_ret` for golang.org/x/net/http2's `runHandler`.
#[uprobe]
pub fn go_h2_xnet_handler_ret(ctx: ProbeContext) -> u32 {
    handler_ret::<true>(&ctx)
}

#[inline(always)]
fn handler_ret<const XNET: bool>(ctx: &ProbeContext) -> u32 {
    let Some((pid_tgid, cfg, k)) = go_caller_config(ctx) else { return 0 };
    let go = &cfg.go;
    let l = layout::<XNET>(cfg);
    // SAFETY: map value pointer, copied before removal.
    let Some(st) = GO_H2.get_ptr(&k).map(|p| unsafe { *p }) else {
        count(Counter::HandlerReturnsUnmatched);
        return 0;
    };
    let _ = GO_H2.remove(&k);
    // A handler goroutine runs one stream: it ends carrying nothing.
    leave_own(&k, &st.prev);
    let Some(mut ev) = EVENTS.reserve::<GoH2EndEvent>(0) else {
        count(Counter::EventsDroppedRingFull);
        return 0;
    };
    let e = ev.as_mut_ptr();
    // SAFETY: e points at a reserved record of the right size; every field is written.
    unsafe {
        (*e).hdr = header(EventKind::GoH2End, core::mem::size_of::<GoH2EndEvent>(), k.pid, pid_tgid as u32, now());
        (*e).goid = k.goid;
        (*e).span_id = st.span_id;
        // The state went back to its pool; another stream may have it already.
        (*e).status = if go_ptr(st.rws, l.rws_stream) == st.stream { read_user::<i64>(st.rws + l.rws_status as u64).unwrap_or(0) } else { 0 };
        (*e).pattern.len = 0;
        (*e).pattern.kept = 0;
        if l.req_http {
            read_request_pattern(go, st.req, &mut (*e).pattern);
        }
    }
    ev.submit(wake_flags());
    0
}
