//! Span contexts of goroutines: which span a goroutine's work belongs to (GO_CTX), how it
//! gets one (serving a connection, its own client call, inherited at spawn, received over a
//! channel) and how a client request written on a socket offers its span to the server on
//! this host that reads it (CLIENT_LINK, and CLIENT_LINK_NAT for a server behind a
//! Service's virtual IP). The rules are in docs/causality.md.
use aya_ebpf::{
    cty::c_void,
    helpers::{bpf_get_prandom_u32, generated::bpf_loop},
    maps::HashMap,
};
use zerotrace_common::{ClientLink, ConnKey, FlowKey, GoroutineCtx, GoroutineKey, TraceCtx, ctx_origin, phase, sampler_mode, trace_origin};

use crate::{
    maps::{CLIENT_LINK, CLIENT_LINK_NAT, CONNS, GO_CTX, SPAN_TRACE, settings},
    util::{count, now},
};
use zerotrace_common::Counter;

/// A new span id: 64 random bits, never 0.
#[inline(always)]
pub fn new_span_id() -> u64 {
    // SAFETY: helpers without side effects.
    let (hi, lo) = unsafe { (bpf_get_prandom_u32(), bpf_get_prandom_u32()) };
    let id = ((hi as u64) << 32) | lo as u64;
    if id == 0 { 1 } else { id }
}

/// A new trace id: 128 random bits.
#[inline(always)]
pub fn new_trace_id() -> [u8; 16] {
    let mut t = [0u8; 16];
    for i in 0..4 {
        // SAFETY: helper without side effects.
        let r = unsafe { bpf_get_prandom_u32() };
        t[i * 4..i * 4 + 4].copy_from_slice(&r.to_ne_bytes());
    }
    t
}

/// Key of `CLIENT_LINK_NAT`: a flow's client address hashed to 32 bits (an IPv4 address
/// exactly: the other words of its v4-mapped form are constant; IPv6 words are mixed by
/// odd multipliers, so addresses differing in a pattern do not collide) above its port.
/// None for a loopback or unspecified client, whose address and port other network
/// namespaces reuse.
#[inline(always)]
fn nat_key(f: &FlowKey) -> Option<u64> {
    let a = &f.client_addr;
    let w = |i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
    let (w0, w1, w2, w3) = (w(0), w(4), w(8), w(12));
    if w0 == 0 && w1 == 0 {
        let v4_loopback = w2 == u32::from_ne_bytes([0, 0, 0xff, 0xff]) && a[12] == 127;
        let v6_loopback = w2 == 0 && (w3 == 0 || w3 == u32::from_ne_bytes([0, 0, 0, 1]));
        if v4_loopback || v6_loopback {
            return None;
        }
    }
    let h = w0.wrapping_mul(0x9E37_79B1) ^ w1.wrapping_mul(0x85EB_CA77) ^ w2.wrapping_mul(0xC2B2_AE3D) ^ w3;
    Some(((h as u64) << 16) | f.client_port as u64)
}

/// Oldest client offer a server reached through DNAT takes (a server reads a request's
/// head well within it; an older offer is one whose withdrawal was never seen).
const NAT_LINK_MAX_AGE_NS: u64 = 10_000_000_000;

/// A traced client writing a request on `flow` offers its span to the server on this host
/// that will read it.
#[inline(always)]
pub fn offer_link(flow: &FlowKey, span: u64, ts: u64) {
    let link = ClientLink { span_id: span, ts_ns: ts };
    let _ = CLIENT_LINK.insert(flow, &link, 0);
    if let Some(k) = nat_key(flow) {
        let _ = CLIENT_LINK_NAT.insert(&k, &link, 0);
    }
    count(Counter::ClientLinksOffered);
}

/// The offer on `flow` is void (its connection closed, or its next request is untraced).
#[inline(always)]
pub fn withdraw_link(flow: &FlowKey) {
    let _ = CLIENT_LINK.remove(flow);
    if let Some(k) = nat_key(flow) {
        let _ = CLIENT_LINK_NAT.remove(&k);
    }
}

/// The span a traced client on this host offered for the request a server reads on
/// `flow`: the offer on the same flow, else (the client wrote to a Service's virtual IP
/// that DNAT sent here) the offer of a client at the same address and port made in the
/// last NAT_LINK_MAX_AGE_NS.
#[inline(always)]
pub fn linked_span(flow: &FlowKey) -> Option<u64> {
    if let Some(l) = CLIENT_LINK.get_ptr(flow) {
        count(Counter::ServerRequestsLinkedKernel);
        // SAFETY: map value pointer, valid for this program run.
        return Some(unsafe { (*l).span_id });
    }
    let l = CLIENT_LINK_NAT.get_ptr(&nat_key(flow)?)?;
    // SAFETY: as above.
    let (span, ts) = unsafe { ((*l).span_id, (*l).ts_ns) };
    if now().wrapping_sub(ts) > NAT_LINK_MAX_AGE_NS {
        return None;
    }
    count(Counter::ServerRequestsLinkedKernel);
    count(Counter::ServerRequestsLinkedThroughNat);
    Some(span)
}

/// HTTP/2: a traced client writes the HEADERS of stream `stream_id` on `flow`; the server
/// on this host whose handler takes that stream links its span to `span`. The key is the
/// flow with the stream id in its padding (HTTP/1 offers leave it 0; client stream ids are
/// odd). No DNAT fallback: a client address and port say nothing of the stream.
#[inline(always)]
pub fn offer_stream_link(flow: &FlowKey, stream_id: u32, span: u64) {
    let mut k = *flow;
    k._pad = stream_id;
    let _ = CLIENT_LINK.insert(&k, &ClientLink { span_id: span, ts_ns: now() }, 0);
    count(Counter::ClientLinksOffered);
}

/// The span a traced client on this host offered for stream `stream_id` of `flow`, taken
/// (0: none).
#[inline(always)]
pub fn take_stream_link(flow: &FlowKey, stream_id: u32) -> u64 {
    let mut k = *flow;
    k._pad = stream_id;
    // SAFETY: map value pointer, copied at once.
    let Some(span) = CLIENT_LINK.get_ptr(&k).map(|l| unsafe { (*l).span_id }) else { return 0 };
    let _ = CLIENT_LINK.remove(&k);
    count(Counter::ServerRequestsLinkedKernel);
    span
}

/// Whether `--inject-traceparent` is on (the kernel then keeps trace ids per span).
#[inline(always)]
pub fn injecting() -> bool {
    settings().flags & zerotrace_common::settings_flags::INJECT != 0
}

/// With injection on, span `span` belongs to `trace` (an incoming traceparent's, whose flags
/// were `flags`): sampled as the agent's parent-based sampler follows the flag, any other by
/// its rule.
#[inline(always)]
pub fn remember_trace(span: u64, trace: &[u8; 16], flags: u8) {
    if injecting() {
        let mode = settings().sampler;
        let sampled = if mode & sampler_mode::PARENT_BASED != 0 { flags & 1 } else { sampled_here(trace) };
        let _ = SPAN_TRACE.insert(&span, &TraceCtx { trace_id: *trace, sampled, _pad: [0; 7] }, 0);
    }
}

/// Whether the agent's sampler keeps trace `t`, which starts here (no incoming flag):
/// the same rule as the agent's `correlate::sampling` (for a ratio, on the trace id's last
/// 8 bytes), so the flag a header carries agrees with whether the agent exports the trace.
#[inline(always)]
fn sampled_here(t: &[u8; 16]) -> u8 {
    let s = settings();
    match s.sampler & !sampler_mode::PARENT_BASED {
        sampler_mode::ALWAYS_OFF => 0,
        sampler_mode::RATIO => zerotrace_common::trace_id_ratio_keeps(t, s.ratio_bound) as u8,
        _ => 1,
    }
}

/// How far into a request head an incoming `traceparent` is looked for.
const TRACEPARENT_SCAN: u32 = 1024;
/// "\ntraceparent:" lower-cased; every byte has bit 0x20 set, so `b | 0x20` compares
/// letters without case.
const TP_NAME: &[u8; 13] = b"\ntraceparent:";

/// The trace id and flags of a `traceparent` header in the `len` captured head bytes at
/// `head` (version 00, lower- or upper-case hex), if there is one. Only used with injection on:
/// the header a request carries names the trace its outgoing requests must name.
/// `head` must have at least TRACEPARENT_SCAN + 72 readable bytes. The scan runs in
/// bpf_loop (verified once, not once per byte: inline, it made the socket program too
/// complex for the verifier).
#[inline(always)]
pub fn incoming_trace(head: *const u8, len: u32) -> Option<([u8; 16], u8)> {
    let mut scan = Scan { head, len, at: 0 };
    // SAFETY: the callback only reads `scan`, which lives across the call.
    unsafe {
        bpf_loop(TRACEPARENT_SCAN, scan_step as *mut c_void, &mut scan as *mut Scan as *mut c_void, 0);
    }
    let at = scan.at as u64;
    if at == 0 || at > TRACEPARENT_SCAN as u64 {
        return None;
    }
    // The mask repeats the bound in a form the verifier keeps (TRACEPARENT_SCAN is a
    // power of two).
    let i = (at - 1) & (TRACEPARENT_SCAN as u64 - 1);
    // SAFETY: i < TRACEPARENT_SCAN; trace_after reads at most 72 bytes past it.
    trace_after(unsafe { head.add(i as usize + 13) }).map(|(t, _, flags)| (t, flags))
}

#[repr(C)]
struct Scan {
    head: *const u8,
    len: u32,
    /// 1 + the offset of the "\ntraceparent:" found, 0: none yet.
    at: u32,
}

/// One position of the scan: 1 stops the loop.
extern "C" fn scan_step(i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: ctx is the Scan incoming_trace passed.
    let s = unsafe { &mut *(ctx as *mut Scan) };
    // Bounds in 64 bits, on the value used for the address: the verifier must see them.
    if i >= TRACEPARENT_SCAN as u64 {
        return 1;
    }
    // The name and a whole value ("00-" 32 "-" 16 "-" 2) must fit.
    if i + 13 + 55 > s.len as u64 {
        return 1;
    }
    // SAFETY: i < TRACEPARENT_SCAN; name_at reads 13 bytes.
    let p = unsafe { s.head.add(i as usize) };
    if unsafe { *p } == b'\n' {
        if name_at(p) {
            s.at = i as u32 + 1;
            return 1;
        }
        // The blank line that ends the head: what follows (a body, or requests that came
        // pipelined behind this one) is not this request's.
        // SAFETY: i + 68 <= len (checked above).
        if unsafe { *p.add(1) == b'\r' && *p.add(2) == b'\n' } {
            return 1;
        }
    }
    0
}

#[inline(always)]
fn name_at(p: *const u8) -> bool {
    for k in 1..13 {
        // SAFETY: see incoming_trace.
        if unsafe { *p.add(k) } | 0x20 != TP_NAME[k] {
            return false;
        }
    }
    true
}

/// Parses the value after "traceparent:" as the agent's `RemoteParent::parse` does:
/// version (two lower-case hex digits, not ff), trace id (32, not all zero), parent id (16,
/// not all zero), flags (2): the trace id, the parent span id and the flags.
#[inline(always)]
pub fn trace_after(mut q: *const u8) -> Option<([u8; 16], u64, u8)> {
    for _ in 0..2 {
        // SAFETY: see incoming_trace.
        let c = unsafe { *q };
        if c == b' ' || c == b'\t' {
            q = unsafe { q.add(1) };
        }
    }
    // SAFETY (all reads below): see incoming_trace; at most 70 bytes past the name's start.
    let at = |k: usize| unsafe { *q.add(k) };
    let version = (hex(at(0))?, hex(at(1))?);
    if version == (15, 15) || at(2) != b'-' || at(35) != b'-' || at(52) != b'-' {
        return None;
    }
    let mut t = [0u8; 16];
    for k in 0..16 {
        t[k] = hex(at(3 + 2 * k))? << 4 | hex(at(4 + 2 * k))?;
    }
    let mut span = 0u64;
    for k in 0..16 {
        span = span << 4 | hex(at(36 + k))? as u64;
    }
    let flags = hex(at(53))? << 4 | hex(at(54))?;
    (t != [0; 16] && span != 0).then_some((t, span, flags))
}

/// A lower-case hex digit (W3C trace context allows no upper case).
#[inline(always)]
fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// The trace of a new span whose parent is `parent` (0: none): the parent's trace when the
/// kernel knows it, else a new one. With injection on, remembered for the span's children
/// (with the parent's sampled flag, or the sampler's rule for a new trace).
#[inline(always)]
pub fn trace_for(span: u64, parent: u64) -> ([u8; 16], u8) {
    let known = if parent != 0 { SPAN_TRACE.get_ptr(&parent) } else { None };
    // SAFETY: map value pointer, copied at once.
    let (ctx, origin) = match known {
        Some(t) => (unsafe { *t }, trace_origin::INHERITED),
        None => {
            let trace_id = new_trace_id();
            (TraceCtx { trace_id, sampled: sampled_here(&trace_id), _pad: [0; 7] }, trace_origin::DRAWN)
        }
    };
    if injecting() {
        let _ = SPAN_TRACE.insert(&span, &ctx, 0);
    }
    (ctx.trace_id, origin)
}

#[inline(always)]
fn key(pid: u32, goid: u64) -> GoroutineKey {
    GoroutineKey { pid, _pad: 0, goid }
}

/// The span active in goroutine `goid` of `pid`, 0 when none.
#[inline(always)]
pub fn span_of(pid: u32, goid: u64) -> u64 {
    if goid == 0 {
        return 0;
    }
    let Some(c) = GO_CTX.get_ptr(&key(pid, goid)) else {
        return 0;
    };
    // SAFETY: map value pointer, copied at once.
    let c = unsafe { *c };
    if c.origin != ctx_origin::CONN {
        return c.span_id;
    }
    let Some(s) = CONNS.get_ptr(&ConnKey { sk: c.sk }) else {
        return 0;
    };
    // SAFETY: map value pointer, valid for this program run.
    let s = unsafe { &*s };
    if s.pid != pid || s.phase == phase::IDLE || s.phase == phase::RESPONSE && serves_later_request(pid, s) {
        return 0;
    }
    s.span_id
}

/// The span goroutine `goid` of `pid` owns (a call of its own) or inherited when it was
/// spawned, 0 otherwise: not one received over a channel, which a long-lived goroutine
/// keeps after the work it was for (grpc-go's transport writer, woken over a channel by
/// every caller, would offer a stale span for another call's stream).
#[inline(always)]
pub fn spawned_or_own_span(pid: u32, goid: u64) -> u64 {
    if goid == 0 {
        return 0;
    }
    // SAFETY: map value pointer, copied at once.
    let Some(c) = GO_CTX.get_ptr(&key(pid, goid)).map(|c| unsafe { *c }) else { return 0 };
    if c.origin == ctx_origin::OWN || c.origin == ctx_origin::SPAWN { c.span_id } else { 0 }
}

/// Go: whether the goroutine serving connection `s` (whose response has started) has moved
/// on to a later request: one that came pipelined, which no read started, so the kernel
/// does not know it yet. Its work then belongs to no span rather than to the previous one.
#[inline(always)]
fn serves_later_request(pid: u32, s: &zerotrace_common::ConnState) -> bool {
    if s.go_conn == 0 || s.resp_w == 0 {
        return false;
    }
    let Some(cfg) = crate::util::target(pid) else {
        return false;
    };
    let off = cfg.go.conn_curreq;
    if off == zerotrace_common::GoOffsets::NONE {
        return false;
    }
    match crate::util::read_user::<u64>(s.go_conn + off as u64) {
        Some(cur) => cur != s.resp_w,
        None => false,
    }
}

/// The goroutine serving socket `sk` takes that socket's current request as its span.
#[inline(always)]
pub fn serve_conn(pid: u32, goid: u64, sk: u64) {
    if goid == 0 {
        return;
    }
    let ctx = GoroutineCtx { span_id: 0, sk, origin: ctx_origin::CONN, _pad: [0; 7] };
    let _ = GO_CTX.insert(&key(pid, goid), &ctx, 0);
}

/// Goroutine `to` received a value from a goroutine whose span is `span` (0: none). Its
/// work from now on belongs to that span, until its next receive; a goroutine that has a
/// span of its own (serving a request, inside a client call) keeps it.
#[inline(always)]
pub fn receive(pid: u32, to: u64, span: u64) {
    if to == 0 {
        return;
    }
    let k = key(pid, to);
    let had = match GO_CTX.get_ptr(&k) {
        Some(c) => {
            // SAFETY: map value pointer.
            let origin = unsafe { (*c).origin };
            if origin == ctx_origin::CONN || origin == ctx_origin::OWN {
                return;
            }
            true
        }
        None => false,
    };
    if span != 0 {
        let ctx = GoroutineCtx { span_id: span, sk: 0, origin: ctx_origin::CHANNEL, _pad: [0; 7] };
        let _ = GO_CTX.insert(&k, &ctx, 0);
        count(Counter::ChannelEdges);
    } else if had {
        let _ = GO_CTX.remove(&k);
    }
}

/// A goroutine spawned by one whose span is `span` inherits it.
#[inline(always)]
pub fn spawn(pid: u32, child: u64, span: u64) {
    if child == 0 || span == 0 {
        return;
    }
    let ctx = GoroutineCtx { span_id: span, sk: 0, origin: ctx_origin::SPAWN, _pad: [0; 7] };
    let _ = GO_CTX.insert(&key(pid, child), &ctx, 0);
    count(Counter::GoroutinesInheritedSpan);
}

/// A goroutine enters a call that is a span of its own (client call, SQL statement): the
/// span is drawn, becomes the goroutine's context, and the context it had is returned (to
/// be restored by `leave_own`) with the parent span (0: none).
#[inline(always)]
pub fn enter_own(k: &GoroutineKey) -> (u64, u64, GoroutineCtx) {
    let parent = span_of(k.pid, k.goid);
    let span = new_span_id();
    // SAFETY: map value pointer, copied at once.
    let prev = GO_CTX.get_ptr(k).map(|c| unsafe { *c }).unwrap_or_default();
    (span, parent, prev)
}

/// Makes `span` the goroutine's own context (after its call state was stored).
#[inline(always)]
pub fn set_own(k: &GoroutineKey, span: u64) {
    let own = GoroutineCtx { span_id: span, sk: 0, origin: ctx_origin::OWN, _pad: [0; 7] };
    let _ = GO_CTX.insert(k, &own, 0);
}

/// The state `enter_own` stored for a call of goroutine `k` in `calls`, removed (None: the
/// call began before zerotrace attached, counted).
#[inline(always)]
pub fn take_call<V: Copy>(calls: &HashMap<GoroutineKey, V>, k: &GoroutineKey) -> Option<V> {
    // SAFETY: map value pointer, copied before removal.
    let Some(p) = calls.get_ptr(k) else {
        count(Counter::HandlerReturnsUnmatched);
        return None;
    };
    // SAFETY: map value pointer, copied before removal (only once known: go_inject.rs says
    // why not through an Option).
    let st = unsafe { *p };
    let _ = calls.remove(k);
    Some(st)
}

/// The call returned: the goroutine's context is what it was before.
#[inline(always)]
pub fn leave_own(k: &GoroutineKey, prev: &GoroutineCtx) {
    if prev.origin != 0 {
        let _ = GO_CTX.insert(k, prev, 0);
    } else {
        let _ = GO_CTX.remove(k);
    }
}
