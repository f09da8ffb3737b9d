//! `--inject-traceparent`: a W3C `traceparent` header written into outgoing Go net/http
//! requests, so that services this agent does not see (or sees on another host) continue
//! the trace. The only program that writes into a target, loaded only when asked for; in
//! dry-run it decides and reports (TraceparentEvent) but its write is dead code the
//! verifier drops. Every decision is reported to the agent, which puts it on the client
//! span.
//!
//! Where: the CALL of `Header.writeSubset(h, w, ..)` inside `(*Request).write`, after the
//! request line and Host/User-Agent, before the request's own headers are formatted into
//! `w`, Transport's `*bufio.Writer`. The line goes into the writer's free buffer space at
//! `n` and `n` moves past it, exactly as if `w.WriteString` had been called; nothing else is
//! touched. It is written only when all of these hold (else counted, nothing written):
//! - `h` belongs to a client call in flight (CLIENT_HDR, set at roundTrip's entry) whose
//!   trace the kernel knows (SPAN_TRACE);
//! - `w` is a `*bufio.Writer` (itab type check) with room for the whole line in `buf`;
//! - `h` is a map small enough to read in one group/bucket and has no `traceparent` key
//!   (the application propagates its own context: never a second header).
use aya_ebpf::{helpers::bpf_probe_write_user, macros::uprobe, programs::ProbeContext};
use zerotrace_common::{Counter, EventKind, GoOffsets, SlotKey, TraceCtx, TraceparentEvent, inject_outcome, settings_flags};

use crate::{
    causality::trace_after,
    maps::{CLIENT_HDR, EVENTS, SPAN_TRACE, settings},
    util::{count, go_itab_type, header, now, read_user, regs, uprobe_target, wake_flags},
};

/// "traceparent: 00-" + 32 hex + "-" + 16 hex + "-01\r\n" (or "-00": not sampled).
const LINE: usize = 70;
const HEX: &[u8; 16] = b"0123456789abcdef";
/// A Go map[string][]string slot: key (string, 16 bytes) and value (slice, 24 bytes).
const KEY: u64 = 16;
const ELEM: u64 = 24;
/// Swiss-table group: one control word, then 8 slots of key and value.
const GROUP_SLOTS: u64 = 8;
/// Old map bucket: tophash [8]u8, keys [8]string, elems [8][]string. A tophash below 5
/// marks an empty slot.
const MIN_TOPHASH: u8 = 5;

#[uprobe]
pub fn go_inject(ctx: ProbeContext) -> u32 {
    let Some((pid_tgid, cfg)) = uprobe_target() else { return 0 };
    let pid = (pid_tgid >> 32) as u32;
    let r = regs(&ctx);
    // SAFETY: map value pointer, copied at once.
    let Some(span) = CLIENT_HDR.get_ptr(&SlotKey { pid, _pad: 0, addr: r.rax }).map(|p| unsafe { (*p)[0] }) else { return 0 };
    if span == 0 {
        // One Header map, two calls in flight: neither is named.
        count(Counter::TraceparentSkipped);
        return 0;
    }
    // Copied into a value defined either way: an Option of a struct leaves its payload
    // undefined when None, and the compiler may then store whatever register it likes,
    // one a helper call just clobbered, which verifiers refuse ("R1 !read_ok").
    let lookup = SPAN_TRACE.get_ptr(&span);
    let known = lookup.is_some();
    // SAFETY: map value pointer, copied at once.
    let trace = lookup.map_or(TraceCtx::default(), |p| unsafe { *p });
    let outcome = if known { inject(&cfg.go, r.rax, r.rbx, r.rcx, span, &trace) } else { inject_outcome::UNCHECKED };
    if trace.sampled == 0 && matches!(outcome, inject_outcome::WRITTEN | inject_outcome::DRY_RUN) {
        count(Counter::TraceparentUnsampled);
    }
    count(match outcome {
        inject_outcome::WRITTEN => Counter::TraceparentInjected,
        inject_outcome::DRY_RUN => Counter::TraceparentDryRun,
        inject_outcome::NO_ROOM => Counter::TraceparentNoRoom,
        inject_outcome::FAILED => Counter::TraceparentWriteFailed,
        _ => Counter::TraceparentSkipped,
    });
    let ev = TraceparentEvent {
        hdr: header(EventKind::Traceparent, core::mem::size_of::<TraceparentEvent>(), pid, pid_tgid as u32, now()),
        span_id: span,
        trace_id: trace.trace_id,
        outcome,
        sampled: trace.sampled,
        _pad: [0; 6],
    };
    if EVENTS.output::<TraceparentEvent>(&ev, wake_flags()).is_err() {
        count(Counter::EventsDroppedRingFull);
    }
    0
}

/// Checks and (unless dry-run) writes the line for `span` of `trace` into writer `w`
/// (interface itab `w_itab`) about to format Header map `h`; returns the outcome. The flags
/// say sampled only when the agent's sampler keeps the trace, so that parent-based
/// samplers downstream drop what this agent dropped.
#[inline(always)]
fn inject(go: &GoOffsets, h: u64, w_itab: u64, w: u64, span: u64, ctx: &TraceCtx) -> u8 {
    let trace = &ctx.trace_id;
    if go.type_bufio_writer == 0 || go_itab_type(w_itab) != go.type_bufio_writer {
        return inject_outcome::UNCHECKED;
    }
    match has_traceparent(go, h) {
        Some(false) => {}
        Some(true) => return inject_outcome::OWN_HEADER,
        None => return inject_outcome::UNCHECKED,
    }
    let Some(buf) = read_user::<[u64; 2]>(w + go.bufw_buf as u64) else { return inject_outcome::UNCHECKED };
    let Some(n) = read_user::<u64>(w + go.bufw_n as u64) else { return inject_outcome::UNCHECKED };
    if buf[0] == 0 || n > buf[1] || buf[1] - n < LINE as u64 {
        return inject_outcome::NO_ROOM;
    }
    if settings().flags & settings_flags::INJECT_WRITE == 0 {
        return inject_outcome::DRY_RUN;
    }
    let mut line = *b"traceparent: 00-00000000000000000000000000000000-0000000000000000-01\r\n";
    for i in 0..16 {
        line[16 + 2 * i] = HEX[(trace[i] >> 4) as usize];
        line[16 + 2 * i + 1] = HEX[(trace[i] & 15) as usize];
    }
    let sb = span.to_be_bytes();
    for i in 0..8 {
        line[49 + 2 * i] = HEX[(sb[i] >> 4) as usize];
        line[49 + 2 * i + 1] = HEX[(sb[i] & 15) as usize];
    }
    if ctx.sampled == 0 {
        line[LINE - 3] = b'0';
    }
    // The bytes first, then the length that makes them part of the request: if the second
    // write failed, the first would only have filled unused buffer space.
    // SAFETY: the destination is the writer's own buffer between n and len(buf), checked
    // above; the target thread is stopped at this instruction.
    if unsafe { bpf_probe_write_user((buf[0] + n) as *mut [u8; LINE], &line) }.is_err() {
        return inject_outcome::FAILED;
    }
    let grown = n + LINE as u64;
    // SAFETY: bufio.Writer.n of the writer the CALL is about to use.
    if unsafe { bpf_probe_write_user((w + go.bufw_n as u64) as *mut u64, &grown) }.is_err() {
        return inject_outcome::FAILED;
    }
    inject_outcome::WRITTEN
}

/// Whether Go map `h` (an http.Header) has a key that is "traceparent" in any case. None
/// when that cannot be read here (a map bigger than one group or bucket, an unknown
/// layout): the caller then writes nothing.
#[inline(always)]
fn has_traceparent(go: &GoOffsets, h: u64) -> Option<bool> {
    traceparent_elem(go, h).map(|e| e.is_some())
}

/// Where the value ([]string) of the key of Go map `h` (a `map[string][]string`: an
/// http.Header, gRPC metadata) that is "traceparent" in any case lies: Some(None) when
/// there is none, None when that cannot be read here (a map bigger than one group or
/// bucket, an unknown layout).
#[inline(always)]
pub fn traceparent_elem(go: &GoOffsets, h: u64) -> Option<Option<u64>> {
    if h == 0 {
        return Some(None);
    }
    if go.map_dirptr != GoOffsets::NONE && go.map_dirlen != GoOffsets::NONE {
        // Swiss table: a small map (dirLen 0) is one group at dirPtr: control word, then
        // 8 slots of key and element.
        let dir_len = read_user::<i64>(h + go.map_dirlen as u64)?;
        if dir_len != 0 {
            return None;
        }
        let group = read_user::<u64>(h + go.map_dirptr as u64)?;
        if group == 0 {
            return Some(None);
        }
        let ctrl = read_user::<[u8; 8]>(group)?;
        for i in 0..GROUP_SLOTS {
            let slot = group + 8 + i * (KEY + ELEM);
            // A full slot's control byte has its high bit clear.
            if ctrl[i as usize] & 0x80 == 0 && key_is_traceparent(slot)? {
                return Some(Some(slot + KEY));
            }
        }
        return Some(None);
    }
    if go.hmap_b != GoOffsets::NONE && go.hmap_buckets != GoOffsets::NONE {
        if read_user::<u8>(h + go.hmap_b as u64)? != 0 {
            return None;
        }
        let bucket = read_user::<u64>(h + go.hmap_buckets as u64)?;
        if bucket == 0 {
            return Some(None);
        }
        // tophash[8], then the 8 keys, then the 8 elements.
        let tophash = read_user::<[u8; 8]>(bucket)?;
        for i in 0..8u64 {
            if tophash[i as usize] >= MIN_TOPHASH && key_is_traceparent(bucket + 8 + i * KEY)? {
                return Some(Some(bucket + 8 + 8 * KEY + i * ELEM));
            }
        }
        return Some(None);
    }
    None
}

/// The traceparent in Go map `h` (`map[string][]string`, key in any case): trace id,
/// parent span id and flags, when there is a valid one and the map can be read here.
#[inline(always)]
pub fn incoming_traceparent(go: &GoOffsets, h: u64) -> Option<([u8; 16], u64, u8)> {
    let elem = traceparent_elem(go, h)??;
    // The []string: its first value.
    let [ptr, len, _] = read_user::<[u64; 3]>(elem)?;
    if len == 0 {
        return None;
    }
    let [s, n] = read_user::<[u64; 2]>(ptr)?;
    if n < TRACEPARENT_LEN as u64 {
        return None;
    }
    let mut buf = [0u8; TRACEPARENT_LEN + 2];
    let v = read_user::<[u8; TRACEPARENT_LEN]>(s)?;
    buf[..TRACEPARENT_LEN].copy_from_slice(&v);
    // SAFETY: trace_after reads at most TRACEPARENT_LEN bytes from buf (no leading blanks:
    // Go keeps a header's value trimmed), and two more if there are: buf has them.
    trace_after(buf.as_ptr())
}

/// "00-" 32 "-" 16 "-" 2.
const TRACEPARENT_LEN: usize = 55;

/// Whether the Go string at `at` is "traceparent", ignoring case.
#[inline(always)]
fn key_is_traceparent(at: u64) -> Option<bool> {
    let s = read_user::<[u64; 2]>(at)?;
    if s[1] != 11 {
        return Some(false);
    }
    let b = read_user::<[u8; 11]>(s[0])?;
    let want = b"traceparent";
    for i in 0..11 {
        if b[i] | 0x20 != want[i] {
            return Some(false);
        }
    }
    Some(true)
}
