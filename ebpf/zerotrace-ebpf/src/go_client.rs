//! Go net/http client spans: uprobes at the entry and at every RET of
//! `net/http.(*Transport).roundTrip(t, req *Request) (*Response, error)` (never a
//! uretprobe). During the call the client span is the calling goroutine's own context, so
//! the goroutines that write the request (Transport's writeLoop, reached over a channel)
//! carry it to the socket, where a server on this host can link to it.
use core::intrinsics::{AtomicOrdering, atomic_xadd, atomic_xsub};

use aya_ebpf::{macros::uprobe, programs::ProbeContext};
use zerotrace_common::{Counter, EventKind, GoClientRequestEvent, GoClientResponseEvent, GoClientState, GoOffsets, SlotKey};

use crate::{
    causality::{enter_own, injecting, leave_own, set_own, take_call, trace_for},
    maps::{CLIENT_HDR, EVENTS, GO_CLIENTS},
    util::{count, go_caller, go_ptr, header, now, read_go_string, read_user, regs, wake_flags},
};

/// Entry: t in RAX, req in RBX, the calling goroutine in R14.
#[uprobe]
pub fn go_round_trip(ctx: ProbeContext) -> u32 {
    let Some((pid_tgid, go, k)) = go_caller(&ctx) else { return 0 };
    let r = regs(&ctx);
    let (span, parent, prev) = enter_own(&k);
    let req = r.rbx;
    let hdr_map = if injecting() { go_ptr(req, go.request_header) } else { 0 };
    if GO_CLIENTS.insert(&k, &GoClientState { span_id: span, prev, header: hdr_map }, 0).is_err() {
        count(Counter::GoCallsDroppedMapFull);
        return 0;
    }
    if hdr_map != 0 {
        offer_header(k.pid, hdr_map, span);
    }
    set_own(&k, span);

    let Some(mut ev) = EVENTS.reserve::<GoClientRequestEvent>(0) else {
        count(Counter::EventsDroppedRingFull);
        return 0;
    };
    let e = ev.as_mut_ptr();
    let url = go_ptr(req, go.request_url);
    // SAFETY: e points at a reserved record of the right size; every field is written.
    unsafe {
        (*e).hdr = header(EventKind::GoClientRequest, core::mem::size_of::<GoClientRequestEvent>(), k.pid, pid_tgid as u32, now());
        (*e).goid = k.goid;
        (*e).span_id = span;
        (*e).parent_span = parent;
        (*e).trace_id = trace_for(span, parent).0;
        for s in [&mut (*e).method, &mut (*e).scheme, &mut (*e).url_host, &mut (*e).path] {
            s.len = 0;
            s.kept = 0;
        }
        read_go_string(req + go.request_method as u64, &mut (*e).method);
        if url != 0 {
            if go.url_scheme != GoOffsets::NONE {
                read_go_string(url + go.url_scheme as u64, &mut (*e).scheme);
            }
            if go.url_host != GoOffsets::NONE {
                read_go_string(url + go.url_host as u64, &mut (*e).url_host);
            }
            read_go_string(url + go.url_path as u64, &mut (*e).path);
        }
    }
    ev.submit(wake_flags());
    0
}

/// A RET: *Response in RAX, the error's type word in RBX (0: nil error).
#[uprobe]
pub fn go_round_trip_ret(ctx: ProbeContext) -> u32 {
    let Some((pid_tgid, go, k)) = go_caller(&ctx) else { return 0 };
    let r = regs(&ctx);
    let Some(st) = take_call(&GO_CLIENTS, &k) else { return 0 };
    leave_own(&k, &st.prev);
    if st.header != 0 {
        withdraw_header(k.pid, st.header);
    }
    let resp = r.rax;
    let status = if resp != 0 && go.resp_status_code != GoOffsets::NONE { read_user::<i64>(resp + go.resp_status_code as u64).unwrap_or(0) } else { 0 };
    let ev = GoClientResponseEvent {
        hdr: header(EventKind::GoClientResponse, core::mem::size_of::<GoClientResponseEvent>(), k.pid, pid_tgid as u32, now()),
        goid: k.goid,
        span_id: st.span_id,
        status,
        err_type: r.rbx,
    };
    if EVENTS.output::<GoClientResponseEvent>(&ev, wake_flags()).is_err() {
        count(Counter::EventsDroppedRingFull);
    }
    0
}

/// `--inject-traceparent`: the call's request Header map `h` now names its span (for
/// go_inject at `(*Request).write`), unless another call in flight uses the same map: then
/// it names none until every such call returned.
#[inline(always)]
fn offer_header(pid: u32, h: u64, span: u64) {
    let key = SlotKey { pid, _pad: 0, addr: h };
    if CLIENT_HDR.get_ptr_mut(&key).is_none() && CLIENT_HDR.insert(&key, &[span, 1], 1).is_ok() {
        return;
    }
    if let Some(v) = CLIENT_HDR.get_ptr_mut(&key) {
        // SAFETY: map value pointer; the count is updated atomically (other CPUs may race).
        unsafe {
            (*v)[0] = 0;
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&mut (*v)[1], 1);
        }
    }
}

/// The call returned: one call fewer uses its Header map; the last one removes the entry.
#[inline(always)]
fn withdraw_header(pid: u32, h: u64) {
    let key = SlotKey { pid, _pad: 0, addr: h };
    let Some(v) = CLIENT_HDR.get_ptr_mut(&key) else { return };
    // SAFETY: map value pointer, counted atomically (core's AtomicU64 has no
    // read-modify-write on the BPF target; the intrinsic is BPF's atomic add, whose result
    // cannot be used on the instruction set we build for: the count is read after it).
    // Whoever sees 0 removes the entry; a call entering meanwhile just gets no header.
    let left = unsafe {
        atomic_xsub::<u64, u64, { AtomicOrdering::Relaxed }>(&mut (*v)[1], 1);
        core::ptr::read_volatile(&(*v)[1])
    };
    if left == 0 || left > u32::MAX as u64 {
        let _ = CLIENT_HDR.remove(&key);
    }
}
