//! Go net/http uprobes. `go_conn_serve` fires once per connection (entry of
//! `net/http.(*conn).serve`) and ties the kernel socket to the Go `conn`, so the socket
//! programs can read the route pattern without any per-request uprobe. In handler mode,
//! `go_serve_http` / `go_serve_http_ret` fire at the entry and at every RET instruction of
//! `net/http.serverHandler.ServeHTTP` (never a uretprobe: goroutine stacks move).
use aya_ebpf::{macros::uprobe, programs::ProbeContext};
use zerotrace_common::{ConnKey, Counter, EventKind, GoOffsets, GoRequestKey, GoRequestState, GoServerRequestEvent, GoStr, TargetConfig};

use crate::{
    causality::serve_conn,
    maps::{CONNS, EVENTS, GO_REQUESTS},
    socket::{
        conns::{conn_for, fd_to_sk, go_iface_sk},
        server::handler_entry,
    },
    util::{count, go_conn_fd, go_itab_type, go_ptr, goid_of, header, now, read_go_string, read_user, regs, unpreempted, uprobe_target, wake_flags},
};

/// Entry of `net/http.(*conn).serve(c *conn, ctx context.Context)`: c arrives in RAX.
#[uprobe]
pub fn go_conn_serve(ctx: ProbeContext) -> u32 {
    unpreempted(|| conn_serve(&ctx))
}

#[inline(always)]
fn conn_serve(ctx: &ProbeContext) -> u32 {
    let Some((pid_tgid, cfg)) = uprobe_target() else { return 0 };
    let pid = (pid_tgid >> 32) as u32;
    let go = &cfg.go;
    let c = regs(ctx).rax;
    let Some(rwc) = read_user::<[u64; 2]>(c + go.conn_rwc as u64) else {
        return 0;
    };
    let fd = go_conn_fd(go, rwc[0], rwc[1]);
    if fd < 0 {
        return 0;
    }
    let Some(sk) = fd_to_sk(fd as u32) else {
        return 0;
    };
    // Go serves this socket: it is a server socket whatever LISTEN says. The goroutine
    // running conn.serve handles every request of the connection (HTTP/1).
    if let Some(conn) = conn_for(pid_tgid, sk, true) {
        let g = regs(ctx).r14;
        let goid = goid_of(go, g);
        // SAFETY: map value pointer, valid for this program run.
        unsafe {
            (*conn).go_conn = c;
            (*conn).go_g = g;
            (*conn).goid = goid;
            // HTTPS: the socket carries TLS records; go_tls.rs brings the plaintext.
            if go.type_tlsconn != 0 && go_itab_type(rwc[0]) == go.type_tlsconn {
                (*conn).tls = 1;
            }
        }
        // Whatever this goroutine does belongs to the connection's current request.
        serve_conn(pid, goid, sk);
    }
    0
}

/// Entry of `serverHandler.ServeHTTP(sh, rw ResponseWriter, req *Request)`:
/// sh.srv in RAX, rw as (itab RBX, data RCX), req in RDI, the goroutine in R14.
#[uprobe]
pub fn go_serve_http(ctx: ProbeContext) -> u32 {
    unpreempted(|| serve_http(&ctx))
}

#[inline(always)]
fn serve_http(ctx: &ProbeContext) -> u32 {
    let Some((pid_tgid, cfg)) = uprobe_target() else { return 0 };
    let pid = (pid_tgid >> 32) as u32;
    let go = &cfg.go;
    let r = regs(ctx);
    let key = GoRequestKey { pid, _pad: 0, goroutine: r.r14 };
    let response = if go.type_response != 0 && go_itab_type(r.rbx) == go.type_response { r.rcx } else { 0 };
    // Another ResponseWriter is an HTTP/2 stream's, whose span go_h2.rs makes (when the
    // program's HTTP/2 server layout is known: its runHandler is hooked then).
    if go.type_response != 0 && response == 0 && go.h2_rw_rws != GoOffsets::NONE {
        return 0;
    }
    let start_ns = now();
    // The handler's goroutine works for the request read on its connection (which may
    // start here, pipelined); a handler of a shed request sends no record.
    let mut shed = 0;
    if response != 0 {
        let sk = response_sk(go, response);
        if sk != 0 {
            let goid = goid_of(go, r.r14);
            handler_entry(pid_tgid, sk);
            serve_conn(pid, goid, sk);
            if let Some(c) = CONNS.get_ptr(&ConnKey { sk }) {
                // SAFETY: map value pointer, valid for this program run.
                shed = unsafe { (*c).shed } as u64;
            }
        }
    }
    let state = GoRequestState { start_ns, request: r.rdi, response, shed };
    if GO_REQUESTS.insert(&key, &state, 0).is_err() {
        count(Counter::GoCallsDroppedMapFull);
    }
    0
}

/// A RET instruction of `serverHandler.ServeHTTP`: the handler is done.
#[uprobe]
pub fn go_serve_http_ret(ctx: ProbeContext) -> u32 {
    let Some((pid_tgid, cfg)) = uprobe_target() else { return 0 };
    let pid = (pid_tgid >> 32) as u32;
    let g = regs(&ctx).r14;
    let key = GoRequestKey { pid, _pad: 0, goroutine: g };
    let Some(p) = GO_REQUESTS.get_ptr(&key) else {
        count(Counter::HandlerReturnsUnmatched);
        return 0;
    };
    // SAFETY: map value pointer, copied before removal (only once known: go_inject.rs says
    // why not through an Option).
    let state = unsafe { *p };
    let _ = GO_REQUESTS.remove(&key);
    if state.shed == 0 {
        send_server_request(cfg, pid_tgid, g, &state);
    }
    0
}

#[inline(always)]
fn send_server_request(cfg: &TargetConfig, pid_tgid: u64, g: u64, st: &GoRequestState) {
    let go = &cfg.go;
    let Some(mut ev) = EVENTS.reserve::<GoServerRequestEvent>(0) else {
        count(Counter::EventsDroppedRingFull);
        return;
    };
    let e = ev.as_mut_ptr();
    let r = st.request;
    let url = go_ptr(r, go.request_url);
    // SAFETY: e points at a reserved record of the right size; every field is written.
    unsafe {
        (*e).hdr = header(EventKind::GoServerRequest, core::mem::size_of::<GoServerRequestEvent>(), (pid_tgid >> 32) as u32, pid_tgid as u32, now());
        (*e).goroutine = g;
        (*e).goid = goid_of(go, g);
        (*e).start_ns = st.start_ns;
        (*e).end_ns = (*e).hdr.ts_ns;
        (*e).content_length = read_user::<i64>(r + go.request_content_length as u64).unwrap_or(-1);
        (*e).status = if st.response != 0 { read_user::<i64>(st.response + go.response_status as u64).unwrap_or(0) } else { 0 };
        (*e).sk = 0;
        for s in [&mut (*e).method, &mut (*e).path, &mut (*e).pattern, &mut (*e).host, &mut (*e).remote_addr, &mut (*e).proto] {
            s.len = 0;
            s.kept = 0;
        }
        read_go_string(r + go.request_method as u64, &mut (*e).method);
        if url != 0 {
            read_go_string(url + go.url_path as u64, &mut (*e).path);
        }
        read_request_pattern(go, r, &mut (*e).pattern);
        read_go_string(r + go.request_host as u64, &mut (*e).host);
        read_go_string(r + go.request_remote_addr as u64, &mut (*e).remote_addr);
        read_go_string(r + go.request_proto as u64, &mut (*e).proto);
        if st.response != 0 {
            (*e).sk = response_sk(go, st.response);
        }
    }
    ev.submit(wake_flags());
}

/// The ServeMux pattern that matched `*http.Request` r (`Request.Pattern` from Go 1.23,
/// `Request.pat.str` in 1.22; none before), into `out`.
#[inline(always)]
pub fn read_request_pattern(go: &GoOffsets, r: u64, out: &mut GoStr) {
    if go.request_pattern != GoOffsets::NONE {
        read_go_string(r + go.request_pattern as u64, out);
    } else if go.request_pat != GoOffsets::NONE {
        let p = go_ptr(r, go.request_pat);
        if p != 0 {
            read_go_string(p + go.pattern_str as u64, out);
        }
    }
}

/// The kernel socket of the connection a Go `*http.response` writes to, 0 if unknown.
#[inline(always)]
fn response_sk(go: &GoOffsets, response: u64) -> u64 {
    let conn = go_ptr(response, go.response_conn);
    if conn == 0 {
        return 0;
    }
    go_iface_sk(go, conn + go.conn_rwc as u64).unwrap_or(0)
}
