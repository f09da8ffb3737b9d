//! database/sql client spans: uprobes at the entry and every RET of `(*DB).queryDC` and
//! `(*DB).execDC`, the two functions every DB/Conn/Tx Query and Exec goes through (prepared
//! statements do not). Only the statement's text is read, never its arguments. During the
//! call the span is the goroutine's own, so a driver's own network I/O to a traced database
//! server on this host is linked under it.
use aya_ebpf::{macros::uprobe, programs::ProbeContext};
use zerotrace_common::{Counter, EventKind, GoClientResponseEvent, GoSqlStartEvent, GoSqlState, bounds, sql_kind};

use crate::{
    causality::{enter_own, leave_own, set_own, take_call},
    maps::{EVENTS, GO_SQL},
    util::{count, go_caller, header, now, read_user_bytes, regs, wake_flags},
};

#[inline(always)]
fn start(ctx: &ProbeContext, kind: u8, text_ptr: u64, text_len: u64) {
    let Some((pid_tgid, _, k)) = go_caller(ctx) else { return };
    let (span, parent, prev) = enter_own(&k);
    if GO_SQL.insert(&k, &GoSqlState { span_id: span, kind, _pad: [0; 7], prev }, 0).is_err() {
        count(Counter::GoCallsDroppedMapFull);
        return;
    }
    set_own(&k, span);
    let Some(mut ev) = EVENTS.reserve::<GoSqlStartEvent>(0) else {
        count(Counter::EventsDroppedRingFull);
        return;
    };
    let e = ev.as_mut_ptr();
    // SAFETY: e points at a reserved record of the right size; every field is written.
    unsafe {
        (*e).hdr = header(EventKind::GoSqlStart, core::mem::size_of::<GoSqlStartEvent>(), k.pid, pid_tgid as u32, now());
        (*e).goid = k.goid;
        (*e).span_id = span;
        (*e).parent_span = parent;
        (*e).text_ptr = text_ptr;
        (*e).text_len = if text_len > u32::MAX as u64 { u32::MAX } else { text_len as u32 };
        (*e).kind = kind;
        (*e)._pad = [0; 7];
        (*e).kept = read_user_bytes::<{ bounds::SQL_TEXT_MAX }>((*e).text.as_mut_ptr(), text_ptr, text_len);
    }
    ev.submit(wake_flags());
}

/// `queryDC(db, ctx, txctx, dc, releaseConn, query string, args)`: query in R10 (pointer)
/// and R11 (length).
#[uprobe]
pub fn go_sql_query(ctx: ProbeContext) -> u32 {
    let r = regs(&ctx);
    start(&ctx, sql_kind::QUERY, r.r10, r.r11);
    0
}

/// `execDC(db, ctx, dc, release, query string, args)`: query in R8 and R9.
#[uprobe]
pub fn go_sql_exec(ctx: ProbeContext) -> u32 {
    let r = regs(&ctx);
    start(&ctx, sql_kind::EXEC, r.r8, r.r9);
    0
}

/// A RET of either: queryDC returns (*Rows, error) -> the error's type word in RBX;
/// execDC returns (Result, error) -> RCX.
#[uprobe]
pub fn go_sql_ret(ctx: ProbeContext) -> u32 {
    let r = regs(&ctx);
    // Both candidate error registers are loaded before choosing: the verifier refuses a
    // context access at a computed offset.
    // SAFETY: plain loads of fields of the register set.
    let (rbx, rcx) = unsafe { (core::ptr::read_volatile(&r.rbx), core::ptr::read_volatile(&r.rcx)) };
    let Some((pid_tgid, _, k)) = go_caller(&ctx) else { return 0 };
    let Some(st) = take_call(&GO_SQL, &k) else { return 0 };
    leave_own(&k, &st.prev);
    let err_type = if st.kind == sql_kind::QUERY { rbx } else { rcx };
    let ev = GoClientResponseEvent {
        hdr: header(EventKind::GoSqlEnd, core::mem::size_of::<GoClientResponseEvent>(), k.pid, pid_tgid as u32, now()),
        goid: k.goid,
        span_id: st.span_id,
        status: 0,
        err_type,
    };
    if EVENTS.output::<GoClientResponseEvent>(&ev, wake_flags()).is_err() {
        count(Counter::EventsDroppedRingFull);
    }
    0
}
