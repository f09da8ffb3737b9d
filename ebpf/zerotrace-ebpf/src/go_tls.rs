//! HTTPS servers in Go: the plaintext of `crypto/tls.(*Conn)` reads and writes, fed into the
//! same request/response cycle as plain sockets (socket/server.rs). Both hooks sit on CALL
//! instructions (which the kernel emulates: one trap, no single-step), found by decoding:
//! - in `(*Conn).Read`, the `runtime.memmove` that copies decrypted bytes out of `c.input`
//!   (`c.input.Read(b)`, inlined): source and length are its arguments; c is in a register
//!   the agent proved by decoding;
//! - in `(*Conn).Write`, each CALL `c.writeRecordLocked(recordTypeApplicationData, b)`:
//!   the plaintext before it is encrypted.
//!
//! The socket comes from `c.conn` (a *net.TCPConn) -> fd -> struct sock. On client
//! connections the plaintext only marks requests and responses (the span itself comes from
//! Transport.roundTrip): the first write after a response offers the writer's span to a
//! same-host server (CLIENT_LINK), as the socket hooks do for plain TCP.
use aya_ebpf::{bindings::pt_regs, macros::uprobe, programs::ProbeContext};
use zerotrace_common::{ConnRole, ConnState, GoOffsets, phase};

use crate::{
    socket::{
        bytes::is_final_head,
        conns::{conn_for, go_iface_sk},
        go_client::client_send,
        server::{finish_response, pipelined_response, recv_bytes, send_bytes},
    },
    util::{now, regs, unpreempted, uprobe_target},
};

/// TLS record type of application data.
const APPLICATION_DATA: u64 = 23;

/// The state of the socket under `*tls.Conn` c, marked TLS; None for sockets not tracked
/// and connections over anything but TCP.
#[inline(always)]
fn tls_conn(pid_tgid: u64, go: &GoOffsets, c: u64) -> Option<&'static mut ConnState> {
    if go.tlsconn_conn == GoOffsets::NONE {
        return None;
    }
    let sk = go_iface_sk(go, c + go.tlsconn_conn as u64)?;
    let conn = conn_for(pid_tgid, sk, false)?;
    // SAFETY: map value pointer, valid for this program run.
    let conn = unsafe { &mut *conn };
    if conn.tls == 0 {
        // Learnt here (a client connection, or a server connection older than the agent):
        // whatever the socket hooks made of the handshake or ciphertext is dropped.
        conn.tls = 1;
        if conn.role != ConnRole::Server as u8 || conn.phase == phase::REQUEST {
            conn.phase = phase::IDLE;
        }
    }
    Some(conn)
}

/// A general-purpose register by the agent's index (`disasm::GPR_ORDER`). The registers
/// are copied to the stack at constant offsets first (volatile: otherwise the compiler
/// turns this back into a load at a variable offset from the context pointer, which the
/// verifier refuses), then picked from there.
#[inline(always)]
fn reg_by_index(r: &pt_regs, i: u32) -> Option<u64> {
    use core::ptr::{read_volatile, write_volatile};
    let vals = [r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r15];
    let mut a = [0u64; 13];
    for k in 0..13 {
        // SAFETY: k < 13.
        unsafe { write_volatile(a.as_mut_ptr().add(k), vals[k]) };
    }
    let i = i as usize;
    if i >= 13 {
        return None;
    }
    // SAFETY: i < 13.
    Some(unsafe { read_volatile(a.as_ptr().add(i)) })
}

/// The CALL `runtime.memmove(b, c.input.s[c.input.i:], n)` that `(*tls.Conn).Read` makes
/// when it hands out decrypted bytes (`c.input.Read(b)`, inlined): source in RBX, length in
/// RCX, c in the register the agent proved holds it (TargetConfig::tls_c_reg).
#[uprobe]
pub fn go_tls_read(ctx: ProbeContext) -> u32 {
    unpreempted(|| tls_read::<false>(&ctx))
}

/// `go_tls_read` that also reads an incoming traceparent (`--inject-traceparent`).
#[uprobe]
pub fn go_tls_read_inject(ctx: ProbeContext) -> u32 {
    unpreempted(|| tls_read::<true>(&ctx))
}

#[inline(always)]
fn tls_read<const SCAN: bool>(ctx: &ProbeContext) -> u32 {
    let Some((pid_tgid, cfg)) = uprobe_target() else { return 0 };
    let r = regs(ctx);
    let Some(c) = reg_by_index(r, cfg.tls_c_reg) else { return 0 };
    let (src, n) = (r.rbx, r.rcx);
    if n == 0 || src == 0 {
        return 0;
    }
    let Some(conn) = tls_conn(pid_tgid, &cfg.go, c) else { return 0 };
    if conn.role == ConnRole::Server as u8 {
        // Usually the socket read before this already ended the last response; not when
        // the next request came in the same TLS record as the previous one.
        finish_response(conn, pid_tgid as u32, now(), 0);
        let _ = recv_bytes::<SCAN>(conn, pid_tgid, src, n);
    } else {
        // A client reading its response: its next write is a new request.
        conn.phase = phase::RESPONSE;
    }
    0
}

/// CALL `c.writeRecordLocked(typ, data)` in `(*tls.Conn).Write`: c in RAX, the record type
/// in BL, data as (RCX, RDI).
#[uprobe]
pub fn go_tls_write(ctx: ProbeContext) -> u32 {
    unpreempted(|| tls_write(&ctx))
}

#[inline(always)]
fn tls_write(ctx: &ProbeContext) -> u32 {
    let Some((pid_tgid, cfg)) = uprobe_target() else { return 0 };
    let r = regs(ctx);
    if r.rbx & 0xff != APPLICATION_DATA || r.rdi == 0 {
        return 0;
    }
    let Some(conn) = tls_conn(pid_tgid, &cfg.go, r.rax) else { return 0 };
    if conn.role == ConnRole::Server as u8 {
        // A response head with no request read since: a pipelined request's (see on_send).
        if conn.phase != phase::REQUEST && conn.seq != 0 && conn.other == 0 && conn.h2 == 0 && is_final_head(r.rcx) {
            pipelined_response(conn, pid_tgid, r.rcx, r.rdi, r.rdi, 0);
        } else {
            send_bytes(conn, r.rcx, r.rdi);
        }
    } else {
        // A client writing a request: its span is offered to the server that reads it.
        // (At the socket, TLS handshake records would make the wrong goroutine's offer.)
        client_send(conn, r.rcx, r.rdi);
    }
    0
}
