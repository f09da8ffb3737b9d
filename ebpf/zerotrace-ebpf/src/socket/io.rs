//! What every socket hook flavour calls: a receive returned, a send starts, TCP closed a
//! socket. The selected-process test comes first (every other process pays a few
//! instructions); then the socket's state (conns.rs) decides who handles it: the server
//! phase machine, the native client side, or a Go client's span offer. The hook flavours
//! (tracepoints.rs, fentry.rs, syscalls.rs) differ only in how they find the socket and the syscall's
//! arguments, so the records are the same whichever set runs.
use zerotrace_common::{ConnKey, ConnRole, phase};

use super::{
    args::{Syscall, send_buffer},
    bytes::is_tls_record,
    conns::{announce_close, conn_for, selected},
    go_client::client_send,
    native, server,
};
use crate::{causality::withdraw_link, maps::CONNS, util::now};

const MSG_PEEK: i64 = 2;
/// TCP states (include/net/tcp_states.h).
const TCP_CLOSE: i32 = 7;

/// A receive on socket `sk` returned `ret` (bytes or -errno); `flags` are the receive's
/// (a MSG_PEEK leaves the bytes for the next read, which is the one that counts). `SCAN`:
/// see `records::request_capture`.
#[inline(always)]
pub fn on_recv<S: Syscall, const SCAN: bool>(pid_tgid: u64, sk: u64, ret: i64, flags: i64, sys: &S) {
    if !selected((pid_tgid >> 32) as u32) || flags & MSG_PEEK != 0 {
        return;
    }
    let Some(conn) = conn_for(pid_tgid, sk, false) else { return };
    // SAFETY: map value pointer, valid for this program run.
    let conn = unsafe { &mut *conn };
    let sys = &sys.resolve();
    if conn.role == ConnRole::Server as u8 {
        return server::on_recv::<SCAN>(conn, pid_tgid, ret, sys);
    }
    // A client reading its response: its next send is a new request.
    if ret > 0 && conn.tls == 0 {
        if conn.native != 0 {
            native::on_recv(conn, pid_tgid, ret as u64, sys);
        } else {
            conn.phase = phase::RESPONSE;
        }
    }
}

/// The process hands bytes to TCP on socket `sk` (before they are copied).
#[inline(always)]
pub fn on_send<S: Syscall>(pid_tgid: u64, sk: u64, sys: &S) {
    if !selected((pid_tgid >> 32) as u32) {
        return;
    }
    let Some(conn) = conn_for(pid_tgid, sk, false) else { return };
    // SAFETY: map value pointer, valid for this program run.
    let conn = unsafe { &mut *conn };
    let sys = &sys.resolve();
    if conn.role == ConnRole::Server as u8 {
        return server::on_send(conn, pid_tgid, sk, sys);
    }
    // TLS clients are followed in plaintext (go_tls.rs): a handshake or other record is no
    // request, and without plaintext hooks a TLS client makes no offers at all (its
    // handshake is sent by whichever goroutine dialled).
    if conn.tls == 0 && conn.phase != phase::REQUEST {
        let (buf, _) = send_buffer(sys);
        if is_tls_record(buf) {
            conn.tls = 1;
            conn.phase = phase::IDLE;
            return;
        }
    }
    if conn.tls != 0 {
        return;
    }
    if conn.native != 0 {
        // Once per syscall: a later pass of TCP's copy loop would count (and capture) the
        // same bytes again.
        if sys.first_pass() {
            native::on_send(conn, pid_tgid, sys);
        }
    } else if sys.first_pass() {
        let (buf, len) = send_buffer(sys);
        client_send(conn, buf, len);
    }
}

/// TCP moved `sk` to `newstate`; at CLOSE a tracked socket ends (whatever task this runs
/// in: state changes also happen in softirq context).
#[inline(always)]
pub fn on_close(sk: u64, newstate: i32) {
    if newstate != TCP_CLOSE {
        return;
    }
    let key = ConnKey { sk };
    let Some(conn) = CONNS.get_ptr_mut(&key) else {
        return;
    };
    // SAFETY: map value pointer, valid for this program run.
    let conn = unsafe { &mut *conn };
    let ts = now();
    server::finish_response(conn, 0, ts, 1);
    if conn.role != ConnRole::Server as u8 {
        // A client's offer dies with its connection: a later connection on the same four
        // addresses and ports (an untraced client) must not find it.
        withdraw_link(&conn.flow);
    }
    announce_close(conn, sk, ts);
    let _ = CONNS.remove(&key);
}
