//! Client sockets of Go processes: Go's client spans come from uprobes (go_client.rs), so
//! the socket only marks where requests start. The first send after a response (or the
//! first ever) starts a request, and the span of the goroutine writing it is offered to a
//! server on this host that will read it (CLIENT_LINK by flow). A request written outside
//! any span withdraws the offer. A request written inside a database/sql call names the
//! call's server. On an HTTP/2 connection (it began with the client preface) each HEADERS
//! frame written offers the writer's span for its stream instead (Go writes a request's
//! HEADERS from a goroutine the round trip spawned, which inherits its span); only a span
//! the writer owns or inherited at spawn, never one received over a channel.
use zerotrace_common::{ConnState, h2_start, phase, sql_system, target_flags};

use super::bytes::h2_preface;
use crate::{
    causality::{offer_link, offer_stream_link, span_of, spawned_or_own_span, withdraw_link},
    go_sql::note_server,
    util::{current_goroutine, now, read_user, target},
};

/// The HTTP/2 client connection preface's length ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").
const PREFACE_LEN: u64 = 24;
/// Frames looked at in one write (Go flushes each request's HEADERS on its own; a write
/// can also carry the preface, SETTINGS and WINDOW_UPDATE).
const FRAMES_PER_WRITE: usize = 4;
/// HTTP/2 frame type HEADERS.
const HEADERS: u8 = 1;

/// A Go client connection `conn` sends `len` bytes at `buf` (at the socket, or plaintext
/// into crypto/tls).
#[inline(always)]
pub fn client_send(conn: &mut ConnState, buf: u64, len: u64) {
    let mut at = 0;
    if conn.h2 == 0 && conn.phase != phase::REQUEST && h2_preface(buf) {
        conn.h2 = h2_start::PREFACE;
        at = PREFACE_LEN;
    }
    if conn.h2 != 0 {
        return h2_client_send(conn, buf, len, at);
    }
    if conn.phase == phase::REQUEST {
        return;
    }
    conn.phase = phase::REQUEST;
    let pid = conn.pid;
    let mut span = 0;
    if let Some(cfg) = target(pid)
        && cfg.flags & target_flags::GO != 0
    {
        let (_, goid) = current_goroutine(cfg);
        span = span_of(pid, goid);
        if span != 0 && cfg.sql_system != sql_system::NONE {
            note_server(pid, goid, &conn.flow);
        }
    }
    if span != 0 {
        offer_link(&conn.flow, span, now());
    } else {
        withdraw_link(&conn.flow);
    }
}

/// An HTTP/2 client write: the writer's span is offered for each HEADERS frame's stream.
#[inline(always)]
fn h2_client_send(conn: &ConnState, buf: u64, len: u64, mut at: u64) {
    let mut span = u64::MAX;
    for _ in 0..FRAMES_PER_WRITE {
        if buf == 0 || at + 9 > len {
            return;
        }
        let Some(b) = read_user::<[u8; 9]>(buf + at) else { return };
        let flen = (b[0] as u64) << 16 | (b[1] as u64) << 8 | b[2] as u64;
        let stream_id = u32::from_be_bytes([b[5] & 0x7f, b[6], b[7], b[8]]);
        if b[3] == HEADERS && stream_id != 0 {
            if span == u64::MAX {
                span = 0;
                if let Some(cfg) = target(conn.pid)
                    && cfg.flags & target_flags::GO != 0
                {
                    span = spawned_or_own_span(conn.pid, current_goroutine(cfg).1);
                }
            }
            if span == 0 {
                return;
            }
            offer_stream_link(&conn.flow, stream_id, span);
        }
        at += 9 + flen;
    }
}
