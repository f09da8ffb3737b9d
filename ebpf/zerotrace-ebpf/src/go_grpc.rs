//! grpc-go server and client spans: two uprobes per RPC on each side. `go_grpc_stream` at the entry of
//! `(*Server).handleStream`, which runs on the goroutine that then runs the handler (so
//! the RPC's span becomes that goroutine's own: client calls, SQL, spawned goroutines and
//! channels of the handler go under it), and `go_grpc_status` at the entry of
//! `(*http2Server).WriteStatus`, which ends it with the status the handler returned. Both
//! find the stream by its `*transport.Stream`. A client RPC starts at a RET of
//! `(*http2Client).NewStream` (the stream exists, with its id, on the caller's goroutine:
//! its parent is that goroutine's span) and ends at the entry of `(*clientStream).finish`
//! with the status of the error it ends with. Its record names the connection and stream
//! id, by which the agent links the server's span (grpc-go, tonic) to it. Field offsets come
//! from the agent (TargetConfig::grpc_*), from the program's DWARF or its grpc version.
use aya_ebpf::{macros::uprobe, programs::ProbeContext};
use zerotrace_common::{ConnKey, Counter, EventKind, FlowKey, GoRpcEndEvent, GoRpcKey, GoRpcStartEvent, GoRpcState, GoroutineCtx, GoroutineKey, TargetConfig};

use crate::{
    causality::{enter_own, leave_own, new_span_id, remember_trace, set_own, span_of, trace_for},
    go_inject::incoming_traceparent,
    maps::{CONNS, EVENTS, GO_RPC},
    socket::conns::go_iface_sk,
    util::{count, go_caller_config, go_itab_type, header, now, read_go_string, read_user, regs, wake_flags},
};

/// `(*Server).handleStream(s, t ServerTransport, stream *Stream)`: s in RAX, t in RBX/RCX,
/// stream in RDI; R14 is the handler's goroutine.
#[uprobe]
pub fn go_grpc_stream(ctx: ProbeContext) -> u32 {
    let r = regs(&ctx);
    // SAFETY: plain loads of fields of the register set.
    let (itab, transport, stream) = unsafe { (core::ptr::read_volatile(&r.rbx), core::ptr::read_volatile(&r.rcx), core::ptr::read_volatile(&r.rdi)) };
    let Some((pid_tgid, cfg, k)) = go_caller_config(&ctx) else { return 0 };
    // Only grpc's own HTTP/2 transport, whose WriteStatus is hooked (ServeHTTP's is not).
    if cfg.grpc_stream_method == TargetConfig::NO_OFFSET || stream == 0 || cfg.grpc_transport_type == 0 || go_itab_type(itab) != cfg.grpc_transport_type {
        return 0;
    }
    // The record first: no span becomes a goroutine's own unless it is reported.
    let Some(mut ev) = EVENTS.reserve::<GoRpcStartEvent>(0) else {
        count(Counter::EventsDroppedRingFull);
        return 0;
    };
    // A server span: its parent is the client's, never what the goroutine carried, and at
    // its end the goroutine carries nothing (a worker goroutine serves the next stream
    // clean, whatever an earlier stream left).
    let (span, _, _) = enter_own(&k);
    let key = GoRpcKey { pid: k.pid, _pad: 0, stream };
    if GO_RPC.insert(&key, &GoRpcState { span_id: span, goid: k.goid, prev: GoroutineCtx::default() }, 0).is_err() {
        count(Counter::GoCallsDroppedMapFull);
        ev.discard(0);
        return 0;
    }
    set_own(&k, span);
    let e = ev.as_mut_ptr();
    // SAFETY: e points at a reserved record of the right size; every field is written.
    unsafe {
        (*e).hdr = header(EventKind::GoRpcServerStart, core::mem::size_of::<GoRpcStartEvent>(), k.pid, pid_tgid as u32, now());
        (*e).goid = k.goid;
        (*e).span_id = span;
        (*e).parent_span = 0;
        (*e).stream = stream;
        (*e).stream_id = read_user::<u32>(stream + cfg.grpc_stream_id as u64).unwrap_or(0);
        (*e).has_trace = 0;
        (*e).trace_flags = 0;
        (*e)._pad = 0;
        (*e).trace_id = [0; 16];
        (*e).remote_span = 0;
        if let Some((t, parent, flags)) = metadata_traceparent(cfg, stream) {
            (*e).has_trace = 1;
            (*e).trace_flags = flags;
            (*e).trace_id = t;
            (*e).remote_span = parent;
            remember_trace(span, &t, flags);
        } else {
            // A new trace (its client's link is made in the agent): kept for injection, and
            // the id the agent gives the trace when nothing links it.
            (*e).trace_id = trace_for(span, 0).0;
        }
        // The connection (for links from the client's stream): the transport is an
        // *http2Server (handler-based transports have another type and no conn there).
        (*e).has_flow =
            if cfg.grpc_server_conn != TargetConfig::NO_OFFSET { conn_flow(cfg, transport + cfg.grpc_server_conn as u64, &mut (*e).flow) } else { 0 };
        if (*e).has_flow == 0 {
            (*e).flow = FlowKey::default();
        }
        (*e).method.len = 0;
        (*e).method.kept = 0;
        read_go_string(stream + cfg.grpc_stream_method as u64, &mut (*e).method);
    }
    ev.submit(wake_flags());
    0
}

/// The flow of the connection whose net.Conn interface lies at `at`, written to `out`:
/// 1 when it is a followed TCP (or TLS over TCP) connection, else 0 (`out` untouched).
#[inline(always)]
fn conn_flow(cfg: &TargetConfig, at: u64, out: &mut FlowKey) -> u8 {
    let Some(c) = go_iface_sk(&cfg.go, at).and_then(|sk| CONNS.get_ptr(&ConnKey { sk })) else { return 0 };
    // SAFETY: map value pointer, valid for this program run.
    *out = unsafe { (*c).flow };
    1
}

/// The `traceparent` of a server stream's incoming metadata: `Stream.ctx` is the
/// `context.valueCtx` that `metadata.NewIncomingContext` made (Context, key, val: its
/// value's data word is the `metadata.MD` map) unless grpc's stats tags or a tap handler
/// wrapped it once more: then the map read finds no traceparent.
#[inline(always)]
fn metadata_traceparent(cfg: &TargetConfig, stream: u64) -> Option<([u8; 16], u64, u8)> {
    if cfg.grpc_stream_ctx == TargetConfig::NO_OFFSET {
        return None;
    }
    let ctx = read_user::<u64>(stream + cfg.grpc_stream_ctx as u64 + 8)?;
    if ctx == 0 {
        return None;
    }
    let md = read_user::<u64>(ctx + VALUE_CTX_VAL_DATA)?;
    incoming_traceparent(&cfg.go, md)
}

/// `context.valueCtx{Context; key, val any}`: the data word of `val`.
const VALUE_CTX_VAL_DATA: u64 = 40;

/// `(*http2Server).WriteStatus(t, s *Stream, st *status.Status)`: s in RBX, st in RCX
/// (`status.Status` holds one pointer, to the status proto). The first call for a stream
/// ends it; the handler's goroutine gets back what it had.
#[uprobe]
pub fn go_grpc_status(ctx: ProbeContext) -> u32 {
    let r = regs(&ctx);
    // SAFETY: plain loads of fields of the register set.
    let (stream, st) = unsafe { (core::ptr::read_volatile(&r.rbx), core::ptr::read_volatile(&r.rcx)) };
    let Some((pid_tgid, cfg, k)) = go_caller_config(&ctx) else { return 0 };
    let key = GoRpcKey { pid: k.pid, _pad: 0, stream };
    // SAFETY: map value pointer, copied before removal.
    let Some(state) = GO_RPC.get_ptr(&key).map(|p| unsafe { *p }) else { return 0 };
    let _ = GO_RPC.remove(&key);
    if state.goid == k.goid {
        leave_own(&k, &state.prev);
    }
    let proto = if st == 0 { 0 } else { read_user::<u64>(st).unwrap_or(0) };
    // A nil proto is OK (status.New(codes.OK, "") keeps one, but be lenient).
    let code = if proto == 0 { 0 } else { read_user::<i32>(proto + cfg.grpc_status_code as u64).map_or(-1, i64::from) };
    send_end(pid_tgid, &k, state.span_id, code);
    0
}

/// A RET of `(*http2Client).NewStream(ctx, callHdr) (*Stream, error)`: the stream in RAX
/// (nil on error), on the calling goroutine.
#[uprobe]
pub fn go_grpc_client_stream(ctx: ProbeContext) -> u32 {
    let r = regs(&ctx);
    // SAFETY: a plain load of a field of the register set.
    let stream = unsafe { core::ptr::read_volatile(&r.rax) };
    let Some((pid_tgid, cfg, k)) = go_caller_config(&ctx) else { return 0 };
    if stream == 0 || cfg.grpc_cs_attempt == TargetConfig::NO_OFFSET {
        return 0;
    }
    let Some(mut ev) = EVENTS.reserve::<GoRpcStartEvent>(0) else {
        count(Counter::EventsDroppedRingFull);
        return 0;
    };
    let span = new_span_id();
    let key = GoRpcKey { pid: k.pid, _pad: 0, stream };
    if GO_RPC.insert(&key, &GoRpcState { span_id: span, goid: 0, prev: GoroutineCtx::default() }, 0).is_err() {
        count(Counter::GoCallsDroppedMapFull);
        ev.discard(0);
        return 0;
    }
    let e = ev.as_mut_ptr();
    // SAFETY: e points at a reserved record of the right size; every field is written.
    unsafe {
        (*e).hdr = header(EventKind::GoRpcClientStart, core::mem::size_of::<GoRpcStartEvent>(), k.pid, pid_tgid as u32, now());
        (*e).goid = k.goid;
        (*e).span_id = span;
        (*e).parent_span = span_of(k.pid, k.goid);
        (*e).stream = stream;
        (*e).stream_id = read_user::<u32>(stream + cfg.grpc_stream_id as u64).unwrap_or(0);
        (*e).has_trace = 0;
        (*e).trace_flags = 0;
        (*e)._pad = 0;
        // Its parent's trace when the kernel knows it, else a new one (as a Go HTTP call).
        (*e).trace_id = trace_for(span, (*e).parent_span).0;
        (*e).remote_span = 0;
        // Stream.ct is the ClientTransport: an *http2Client, whose conn is the connection.
        let transport = read_user::<u64>(stream + cfg.grpc_stream_ct as u64 + 8).unwrap_or(0);
        (*e).has_flow = if transport != 0 { conn_flow(cfg, transport + cfg.grpc_client_conn as u64, &mut (*e).flow) } else { 0 };
        if (*e).has_flow == 0 {
            (*e).flow = FlowKey::default();
        }
        (*e).method.len = 0;
        (*e).method.kept = 0;
        read_go_string(stream + cfg.grpc_stream_method as u64, &mut (*e).method);
    }
    ev.submit(wake_flags());
    0
}

/// The RPC of span `span` ended with status `code` (-1: not readable), seen by goroutine `k`.
#[inline(always)]
fn send_end(pid_tgid: u64, k: &GoroutineKey, span: u64, code: i64) {
    let ev = GoRpcEndEvent {
        hdr: header(EventKind::GoRpcEnd, core::mem::size_of::<GoRpcEndEvent>(), k.pid, pid_tgid as u32, now()),
        goid: k.goid,
        span_id: span,
        code,
    };
    if EVENTS.output::<GoRpcEndEvent>(&ev, wake_flags()).is_err() {
        count(Counter::EventsDroppedRingFull);
    }
}

/// gRPC status codes this side names without reading a status.
const OK: i64 = 0;
const UNKNOWN: i64 = 2;

/// Whether error value `data` is io.EOF (`errors.New("EOF")`, an `*errors.errorString`
/// whose one field is the text): a stream that ended well.
#[inline(always)]
fn is_eof(data: u64) -> bool {
    let Some([ptr, len]) = read_user::<[u64; 2]>(data) else { return false };
    len == 3 && read_user::<[u8; 3]>(ptr) == Some(*b"EOF")
}

/// Entry of `(*clientStream).finish(cs, err error)`: cs in RAX, err as (itab RBX, data RCX).
/// The first call for a stream ends its RPC: nil or io.EOF (a stream that ended) is OK, a
/// status error carries its code, any other error is UNKNOWN.
#[uprobe]
pub fn go_grpc_client_finish(ctx: ProbeContext) -> u32 {
    let r = regs(&ctx);
    // SAFETY: plain loads of fields of the register set.
    let (cs, itab, data) = unsafe { (core::ptr::read_volatile(&r.rax), core::ptr::read_volatile(&r.rbx), core::ptr::read_volatile(&r.rcx)) };
    let Some((pid_tgid, cfg, k)) = go_caller_config(&ctx) else { return 0 };
    if cfg.grpc_cs_attempt == TargetConfig::NO_OFFSET {
        return 0;
    }
    let attempt = read_user::<u64>(cs + cfg.grpc_cs_attempt as u64).unwrap_or(0);
    if attempt == 0 {
        return 0;
    }
    let stream = read_user::<u64>(attempt + cfg.grpc_attempt_stream as u64).unwrap_or(0);
    let key = GoRpcKey { pid: k.pid, _pad: 0, stream };
    // SAFETY: map value pointer, copied before removal.
    let Some(state) = GO_RPC.get_ptr(&key).map(|p| unsafe { *p }) else { return 0 };
    let _ = GO_RPC.remove(&key);
    let code = if itab == 0 {
        OK
    } else if cfg.grpc_error_type != 0 && go_itab_type(itab) == cfg.grpc_error_type {
        // *status.Error -> *status.Status (its only field) -> the proto.
        let st = read_user::<u64>(data).unwrap_or(0);
        let proto = if st == 0 { 0 } else { read_user::<u64>(st).unwrap_or(0) };
        if proto == 0 { UNKNOWN } else { read_user::<i32>(proto + cfg.grpc_status_code as u64).map_or(-1, i64::from) }
    } else if is_eof(data) {
        OK
    } else {
        UNKNOWN
    };
    send_end(pid_tgid, &k, state.span_id, code);
    0
}
