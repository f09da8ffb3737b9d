//! Client sockets of Go processes: Go's client spans come from uprobes (go_client.rs), so
//! the socket only marks where requests start. The first send after a response (or the
//! first ever) starts a request, and the span of the goroutine writing it is offered to a
//! server on this host that will read it (CLIENT_LINK by flow). A request written outside
//! any span withdraws the offer. A request written inside a database/sql call names the
//! call's server.
use zerotrace_common::{ConnState, phase, sql_system, target_flags};

use crate::{
    causality::{offer_link, span_of, withdraw_link},
    go_sql::note_server,
    util::{current_goroutine, now, target},
};

/// A Go client connection `conn` sends (at the socket, or plaintext into crypto/tls).
#[inline(always)]
pub fn client_send(conn: &mut ConnState) {
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
