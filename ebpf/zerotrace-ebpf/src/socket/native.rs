//! The client side of native processes (not Go: Rust, C, anything), seen at the socket.
//! The first send after a response (or the first ever) starts request n, whose span id is
//! drawn here and offered to a server on this host that will read it (CLIENT_LINK by
//! flow); its first bytes go to the agent. The first receive after it brings the
//! response's first bytes; every receive its length and last bytes, from which the agent
//! tells where the response ends (Content-Length, chunked end, or the next request /
//! close). HTTP/2 connections have every read and send captured. Go processes never come
//! here: their client spans come from `(*Transport).roundTrip` (go_client.rs).
use zerotrace_common::{ConnState, Counter, EventKind, h2_start, phase};

use super::{
    args::{SyscallArgs, recv_buffer, send_buffer},
    bytes::{Interim, h2_frame_start, h2_preface, interim_status, is_final_head, is_tls_record, starts_request},
    records::{bytes_event, capture_size, h2_bytes, native_capture},
};
use crate::{
    causality::{new_span_id, offer_link, withdraw_link},
    util::{count, now},
};

/// The process hands bytes to TCP on client socket `conn`.
#[inline(always)]
pub fn on_send(conn: &mut ConnState, pid_tgid: u64, sys: &SyscallArgs) {
    if conn.other != 0 {
        return;
    }
    let (buf, len) = send_buffer(sys);
    if conn.h2 == 0 && conn.seq == 0 && conn.phase == phase::IDLE {
        if h2_preface(buf) {
            conn.h2 = h2_start::PREFACE;
        } else if h2_frame_start(buf) {
            conn.h2 = h2_start::JOINED;
        }
    }
    if conn.h2 != 0 {
        h2_bytes(conn, pid_tgid, EventKind::SockH2Send, buf, len, sys.send_total(len));
        return;
    }
    if conn.phase == phase::REQUEST {
        // More of the same request (a head written in pieces).
        if buf != 0 && conn.captured < capture_size() {
            native_capture(conn, pid_tgid, EventKind::SockClientRequest, buf, len, len, conn.req_ts);
        }
        return;
    }
    if buf == 0 || !starts_request(buf) {
        // Not HTTP/1 (or bytes zerotrace cannot see): the connection is left alone, and a
        // stale offer on its flow withdrawn.
        if conn.seq == 0 || is_tls_record(buf) {
            conn.other = 1;
        }
        withdraw_link(&conn.flow);
        return;
    }
    let ts = now();
    conn.phase = phase::REQUEST;
    conn.seq += 1;
    conn.req_ts = ts;
    conn.captured = 0;
    conn.bytes_in = 0;
    conn.span_id = new_span_id();
    count(Counter::SocketClientRequestsSeen);
    offer_link(&conn.flow, conn.span_id, ts);
    native_capture(conn, pid_tgid, EventKind::SockClientRequest, buf, len, len, ts);
}

/// A receive on client socket `conn` returned `ret` > 0 bytes.
#[inline(always)]
pub fn on_recv(conn: &mut ConnState, pid_tgid: u64, ret: u64, sys: &SyscallArgs) {
    if conn.other != 0 {
        return;
    }
    let (buf, room) = recv_buffer(sys);
    let n = if ret < room { ret } else { room };
    if conn.phase == phase::IDLE && conn.h2 == 0 {
        // A connection older than the agent whose first bytes seen are HTTP/2 frames.
        if conn.seq != 0 || !h2_frame_start(buf) {
            return;
        }
        conn.h2 = h2_start::JOINED;
    }
    if conn.h2 != 0 {
        h2_bytes(conn, pid_tgid, EventKind::SockH2Recv, buf, n, ret);
        return;
    }
    if conn.phase == phase::REQUEST {
        match interim_status(buf) {
            // 100 Continue: the request goes on (its body follows); the final response is
            // the next read's.
            Interim::Yes => return,
            // After 101 the connection carries another protocol: this is its last response.
            Interim::Upgrade => conn.other = 1,
            Interim::No => {}
        }
        // The response's first bytes: its head (status, framing).
        conn.phase = phase::RESPONSE;
        conn.captured = 0;
        // The head, and the count of this first read: one record.
        native_capture(conn, pid_tgid, EventKind::SockClientResponse, buf, n, ret, now());
        return;
    }
    if is_final_head(buf) {
        // A read that starts with another response head: the answer to a pipelined request
        // (or body bytes that look like one: the agent tells by the framing so far).
        conn.captured = 0;
        native_capture(conn, pid_tgid, EventKind::SockClientResponse, buf, n, ret, now());
        return;
    }
    // Where a vectored read's bytes end is not looked for: its tail is then unknown.
    let tail_len = if ret <= room { ret } else { 0 };
    bytes_event(conn, pid_tgid, EventKind::SockClientRecv, ret, buf, tail_len);
}
