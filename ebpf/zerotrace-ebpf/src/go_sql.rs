//! database/sql client spans: uprobes at the entry and every RET of `(*DB).queryDC` and
//! `(*DB).execDC` (every DB, Conn and Tx Query and Exec goes through them) and of
//! `(*Stmt).QueryContext` and `(*Stmt).ExecContext` (prepared statements, which do not).
//! Only the statement's text is read, never its arguments. During the call the span is the
//! goroutine's own, so a driver's own network I/O to a traced database server on this host
//! is linked under it, and the socket hooks note the server it writes to (`note_server`).
//! At the RET, an error of the driver's error type gives its code (SQLSTATE).
use aya_ebpf::{macros::uprobe, programs::ProbeContext};
use zerotrace_common::{Counter, EventKind, FlowKey, GoSqlEndEvent, GoSqlStartEvent, GoSqlState, GoroutineKey, TargetConfig, bounds, sql_kind};

use crate::{
    causality::{enter_own, leave_own, set_own, take_call},
    maps::{EVENTS, GO_SQL},
    util::{count, go_caller_config, go_itab_type, header, now, read_user, read_user_bytes, regs, wake_flags},
};

#[inline(always)]
fn start(ctx: &ProbeContext, kind: u8, prepared: u8, text_ptr: u64, text_len: u64) {
    let Some((pid_tgid, cfg, k)) = go_caller_config(ctx) else { return };
    start_call(pid_tgid, cfg, &k, kind, prepared, text_ptr, text_len);
}

#[inline(always)]
fn start_call(pid_tgid: u64, cfg: &TargetConfig, k: &GoroutineKey, kind: u8, prepared: u8, text_ptr: u64, text_len: u64) {
    let (span, parent, prev) = enter_own(k);
    let state = GoSqlState { span_id: span, kind, _pad: [0; 5], server_port: 0, server_addr: [0; 16], prev };
    if GO_SQL.insert(k, &state, 0).is_err() {
        count(Counter::GoCallsDroppedMapFull);
        return;
    }
    set_own(k, span);
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
        (*e).system = cfg.sql_system as u8;
        (*e).prepared = prepared;
        (*e)._pad = [0; 5];
        (*e).kept = read_user_bytes::<{ bounds::SQL_TEXT_MAX }>((*e).text.as_mut_ptr(), text_ptr, text_len);
    }
    ev.submit(wake_flags());
}

/// `queryDC(db, ctx, txctx, dc, releaseConn, query string, args)`: query in R10 (pointer)
/// and R11 (length).
#[uprobe]
pub fn go_sql_query(ctx: ProbeContext) -> u32 {
    let r = regs(&ctx);
    start(&ctx, sql_kind::QUERY, 0, r.r10, r.r11);
    0
}

/// `execDC(db, ctx, dc, release, query string, args)`: query in R8 and R9.
#[uprobe]
pub fn go_sql_exec(ctx: ProbeContext) -> u32 {
    let r = regs(&ctx);
    start(&ctx, sql_kind::EXEC, 0, r.r8, r.r9);
    0
}

/// `(*Stmt).QueryContext(s, ctx, args...)` and `ExecContext`: s in RAX; the statement's
/// text is `s.query`, the string right after `s.db` (Go 1.21-1.27).
#[inline(always)]
fn stmt(ctx: &ProbeContext, kind: u8) {
    let Some((pid_tgid, cfg, k)) = go_caller_config(ctx) else { return };
    let s = regs(ctx).rax;
    let Some(text) = read_user::<[u64; 2]>(s + 8) else { return };
    start_call(pid_tgid, cfg, &k, kind, 1, text[0], text[1]);
}

#[uprobe]
pub fn go_sql_stmt_query(ctx: ProbeContext) -> u32 {
    stmt(&ctx, sql_kind::QUERY);
    0
}

#[uprobe]
pub fn go_sql_stmt_exec(ctx: ProbeContext) -> u32 {
    stmt(&ctx, sql_kind::EXEC);
    0
}

/// A RET of any of them: the Query forms return (*Rows, error) -> the error in RBX (type
/// word) and RCX (data); the Exec forms return (Result, error) -> RCX and RDI.
#[uprobe]
pub fn go_sql_ret(ctx: ProbeContext) -> u32 {
    let r = regs(&ctx);
    // Every candidate register is loaded before choosing: the verifier refuses a context
    // access at a computed offset.
    // SAFETY: plain loads of fields of the register set.
    let (rbx, rcx, rdi) = unsafe { (core::ptr::read_volatile(&r.rbx), core::ptr::read_volatile(&r.rcx), core::ptr::read_volatile(&r.rdi)) };
    let Some((pid_tgid, cfg, k)) = go_caller_config(&ctx) else { return 0 };
    let Some(st) = take_call(&GO_SQL, &k) else { return 0 };
    leave_own(&k, &st.prev);
    let (err_type, err_data) = if st.kind == sql_kind::QUERY { (rbx, rcx) } else { (rcx, rdi) };
    let Some(mut ev) = EVENTS.reserve::<GoSqlEndEvent>(0) else {
        count(Counter::EventsDroppedRingFull);
        return 0;
    };
    let e = ev.as_mut_ptr();
    // SAFETY: e points at a reserved record of the right size; every field is written.
    unsafe {
        (*e).hdr = header(EventKind::GoSqlDone, core::mem::size_of::<GoSqlEndEvent>(), k.pid, pid_tgid as u32, now());
        (*e).goid = k.goid;
        (*e).span_id = st.span_id;
        (*e).err_type = err_type;
        (*e).server_addr = st.server_addr;
        (*e).server_port = st.server_port;
        (*e)._pad = [0; 5];
        (*e).code = [0; bounds::SQL_CODE_MAX];
        (*e).code_len = 0;
        // The driver's error: its code is a Go string in the error's value.
        if err_type != 0
            && cfg.sql_error_type != 0
            && go_itab_type(err_type) == cfg.sql_error_type
            && let Some(code) = read_user::<[u64; 2]>(err_data + cfg.sql_error_code as u64)
        {
            (*e).code_len = read_user_bytes::<{ bounds::SQL_CODE_MAX }>((*e).code.as_mut_ptr(), code[0], code[1]) as u8;
        }
    }
    ev.submit(wake_flags());
    0
}

/// The socket hooks saw goroutine `goid` of `pid` start a request on the client connection
/// `flow`: if that goroutine is inside a database/sql call that has not written yet, the
/// flow's server is the call's.
#[inline(always)]
pub fn note_server(pid: u32, goid: u64, flow: &FlowKey) {
    let k = GoroutineKey { pid, _pad: 0, goid };
    if let Some(st) = GO_SQL.get_ptr_mut(&k) {
        // SAFETY: map value pointer, valid for this program run.
        let st = unsafe { &mut *st };
        if st.server_port == 0 {
            st.server_addr = flow.server_addr;
            st.server_port = flow.server_port;
        }
    }
}
