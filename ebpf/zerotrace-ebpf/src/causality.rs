//! Span contexts of goroutines: which span a goroutine's work belongs to (GO_CTX), how it
//! gets one (serving a connection, its own client call, inherited at spawn, received over a
//! channel) and how a client request written on a socket offers its span to the server on
//! this host that reads it (CLIENT_LINK). The rules are in ARCHITECTURE.md ("Causality").
use aya_ebpf::{helpers::bpf_get_prandom_u32, maps::HashMap};
use zerotrace_common::{ConnKey, GoroutineCtx, GoroutineKey, ctx_origin, phase};

use crate::{
    maps::{CONNS, GO_CTX},
    util::count,
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
    if s.pid == pid && s.phase != phase::IDLE { s.span_id } else { 0 }
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
        count(Counter::ChanEdges);
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
    count(Counter::GoSpawnsInherited);
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
    let Some(st) = calls.get_ptr(k).map(|p| unsafe { *p }) else {
        count(Counter::GoReturnUnmatched);
        return None;
    };
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
