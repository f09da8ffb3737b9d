//! Span assembly on recorded event streams (no kernel, no privileges).
use super::*;
use crate::events::{decode, record};

const PID: u32 = 4242;
const OFFSET: i128 = 1_700_000_000_000_000_000;

fn run(stream: &[Vec<u8>]) -> (Vec<Span>, Stats) {
    let mut c = Correlator::with_memory(Clock::fixed(OFFSET), Box::new(record::fake_memory));
    let mut out = Vec::new();
    for rec in stream {
        c.on_event(decode(rec).expect("recorded records decode"), &mut out);
    }
    (out, c.stats)
}

const SK: u64 = 0xffff_8880_0a0b_0c00;

fn open(conn: u64, _fd: i32) -> Vec<u8> {
    record::conn_open(PID, 1_000, conn, SK, ([127, 0, 0, 1], 8080), ([127, 0, 0, 1], 51000))
}

/// A native client connection of `pid` (ConnOpen with the client role).
fn client_open(pid: u32, conn: u64, sk: u64, local_port: u16) -> Vec<u8> {
    let mut v = record::conn_open(pid, 1_000, conn, sk, ([127, 0, 0, 1], local_port), ([127, 0, 0, 1], 8080));
    let at = std::mem::offset_of!(zerotrace_common::ConnOpenEvent, role);
    v[at] = zerotrace_common::ConnRole::Client as u8;
    v
}

fn s(span: &Span, key: &str) -> String {
    span.attr(key).map(ToString::to_string).unwrap_or_default()
}

#[test]
fn request_and_response_make_one_server_span() {
    let (spans, stats) = run(&[
        open(1, 7),
        record::request(PID, 2_000_000, 1, 1, 0xc000123000, b"GET /items/42?debug=1 HTTP/1.1\r\nHost: shop:8080\r\nUser-Agent: curl/8.1\r\n\r\n"),
        record::response(PID, 5_000_000, 1, 1, b"HTTP/1.1 200 OK\r", "GET /items/{id}"),
    ]);
    assert_eq!(spans.len(), 1, "{stats:?}");
    let sp = &spans[0];
    assert_eq!(sp.name, "GET /items/{id}");
    assert_eq!(sp.kind, SpanKind::Server);
    assert_eq!(s(sp, "http.request.method"), "GET");
    assert_eq!(s(sp, "url.path"), "/items/42");
    assert_eq!(s(sp, "http.route"), "/items/{id}");
    assert_eq!(s(sp, "http.response.status_code"), "200");
    assert_eq!(s(sp, "server.port"), "8080");
    assert_eq!(s(sp, "server.address"), "shop");
    assert_eq!(s(sp, "network.peer.address"), "127.0.0.1");
    assert_eq!(s(sp, "network.peer.port"), "51000");
    assert_eq!(s(sp, "user_agent.original"), "curl/8.1");
    assert_eq!(s(sp, "url.scheme"), "http");
    assert_eq!(sp.start_unix_ns, (2_000_000 + OFFSET) as u64);
    assert_eq!(sp.end_unix_ns, (5_000_000 + OFFSET) as u64);
    assert_eq!(sp.status, Status::Unset);
    assert!(sp.parent.is_none());
    assert_eq!(stats.spans, 1);
}

#[test]
fn keep_alive_requests_stay_apart() {
    let mut stream = vec![open(1, 7)];
    for i in 1..=3u32 {
        let path = format!("GET /n/{i} HTTP/1.1\r\n\r\n");
        stream.push(record::request(PID, u64::from(i) * 10_000, 1, i, 0, path.as_bytes()));
        stream.push(record::response(PID, u64::from(i) * 10_000 + 5_000, 1, i, b"HTTP/1.1 204 No", ""));
    }
    let (spans, _) = run(&stream);
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["GET /n/1", "GET /n/2", "GET /n/3"]);
    let traces: std::collections::HashSet<_> = spans.iter().map(|s| s.trace_id).collect();
    assert_eq!(traces.len(), 3, "each request is its own trace");
}

#[test]
fn incoming_traceparent_sets_the_parent() {
    let (spans, _) = run(&[
        open(1, 7),
        record::request(PID, 10, 1, 1, 0, b"GET / HTTP/1.1\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\r\n"),
        record::response(PID, 20, 1, 1, b"HTTP/1.1 503 Ser", ""),
    ]);
    let sp = &spans[0];
    assert_eq!(sp.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(sp.parent.unwrap().to_string(), "00f067aa0ba902b7");
    assert!(sp.parent_is_remote);
    assert_eq!(sp.status, Status::Error(String::new()), "5xx is an error on a server span");
}

#[test]
fn what_cannot_be_matched_is_counted_not_guessed() {
    let (spans, stats) = run(&[
        open(1, 7),
        // A response for a request zerotrace never saw (attached mid-request).
        record::response(PID, 20, 1, 3, b"HTTP/1.1 200 OK\r", ""),
        // TLS bytes on a tracked socket.
        record::request(PID, 30, 1, 4, 0, b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03"),
        record::response(PID, 40, 1, 4, b"\x16\x03\x03\x00\x7a", ""),
        // A request whose connection closes before any response.
        record::request(PID, 50, 1, 5, 0, b"GET /slow HTTP/1.1\r\n\r\n"),
        record::conn_close(PID, 60, 1, SK),
    ]);
    assert!(spans.is_empty());
    assert_eq!(stats.unmatched_responses, 1);
    assert_eq!(stats.not_http, 1);
    assert_eq!(stats.abandoned, 1);
}

#[test]
fn without_a_pattern_the_name_uses_the_path() {
    let (spans, _) = run(&[
        open(1, 7),
        record::request(PID, 10, 1, 1, 0, b"BREW /pot HTTP/1.1\r\n\r\n"),
        record::response(PID, 20, 1, 1, b"HTTP/1.1 418 I'm", ""),
        record::request(PID, 30, 1, 2, 0, b"DELETE /cart/9 HTTP/1.0\r\n\r\n"),
        record::response(PID, 40, 1, 2, b"HTTP/1.0 200 OK\r", ""),
    ]);
    assert_eq!(spans[0].name, "HTTP");
    assert_eq!(s(&spans[0], "http.request.method"), "_OTHER");
    assert_eq!(s(&spans[0], "http.request.method_original"), "BREW");
    assert_eq!(spans[1].name, "DELETE /cart/9");
    assert_eq!(s(&spans[1], "network.protocol.version"), "1.0");
}

#[test]
fn a_head_read_in_pieces_is_joined() {
    // Go's background reader takes the first byte, the serving goroutine the rest.
    let (spans, stats) = run(&[
        open(1, 7),
        record::request_part(PID, 10, 1, 1, 0xbbb000, b"G", 0),
        record::request_part(PID, 11, 1, 1, 0xaaa000, b"ET /joined HTTP/1.1\r\nUser-Agent: split\r\n\r\n", 1),
        record::response(PID, 20, 1, 1, b"HTTP/1.1 200 OK\r", ""),
    ]);
    assert_eq!(stats.not_http, 0, "{stats:?}");
    assert_eq!(spans[0].name, "GET /joined");
    assert_eq!(s(&spans[0], "user_agent.original"), "split");
    assert_eq!(s(&spans[0], crate::attributes::GOROUTINE_ID), (0xaaa000u64 / 8).to_string(), "the goroutine that read the head");
}

#[test]
fn route_of_patterns() {
    assert_eq!(route_of("GET /items/{id}"), Some("/items/{id}"));
    assert_eq!(route_of("/static/"), Some("/static/"));
    assert_eq!(route_of("example.com/x"), Some("/x"));
    assert_eq!(route_of("POST   api.example.com/v1/{rest...}"), Some("/v1/{rest...}"));
    assert_eq!(route_of("GET /{$}"), Some("/"));
    assert_eq!(route_of("/users/{$}"), Some("/users/"));
    assert_eq!(route_of(""), None);
}

fn go_event(sk: u64, pattern: &str, status: i64) -> crate::events::Event {
    crate::events::Event::GoServerRequest(Box::new(GoServerRequest {
        pid: PID,
        tid: PID,
        goroutine: 0xc000222000,
        goid: 77,
        start_ns: 12,
        end_ns: 18,
        content_length: 0,
        status,
        sk,
        method: "GET".into(),
        path: "/users/5".into(),
        pattern: pattern.into(),
        host: "localhost:8080".into(),
        remote_addr: "127.0.0.1:51000".into(),
        proto: "HTTP/1.1".into(),
    }))
}

#[test]
fn handler_mode_merges_into_the_syscall_span() {
    let mut c = Correlator::with_memory(Clock::fixed(0), Box::new(record::fake_memory));
    let mut out = Vec::new();
    c.on_event(decode(&open(1, 7)).unwrap(), &mut out);
    c.on_event(decode(&record::request(PID, 10, 1, 1, 0, b"GET /users/5 HTTP/1.1\r\nUser-Agent: t\r\n\r\n")).unwrap(), &mut out);
    c.on_event(go_event(SK, "GET /users/{id}", 0), &mut out);
    assert!(out.is_empty(), "the handler record waits for the response");
    c.on_event(decode(&record::response(PID, 30, 1, 1, b"HTTP/1.1 200 OK\r", "")).unwrap(), &mut out);
    assert_eq!(out.len(), 1, "one span, not two");
    assert_eq!(out[0].name, "GET /users/{id}");
    assert_eq!(s(&out[0], crate::attributes::GOROUTINE_ID), "77");
    assert_eq!(s(&out[0], "user_agent.original"), "t");
}

#[test]
fn handler_mode_alone_still_makes_a_span() {
    let mut c = Correlator::with_memory(Clock::fixed(0), Box::new(record::fake_memory));
    let mut out = Vec::new();
    c.on_event(go_event(0, "", 0), &mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].name, "GET /users/5");
    assert_eq!(s(&out[0], "http.response.status_code"), "200");
    assert_eq!((out[0].start_unix_ns, out[0].end_unix_ns), (12, 18));
}

/// A SQL span: named by its summary, the driver's database, the server, the text without
/// literals; a failure with the driver's SQLSTATE, and one whose code is not a SQLSTATE
/// (not trusted); a call a gRPC server span made: every part from the records.
#[test]
fn sql_and_grpc_spans_from_their_records() {
    use zerotrace_common::sql_system;
    let (spans, stats) = run(&[
        record::rpc_start(PID, 1_000, 9, 0xaaaa, "/shop.v1.Catalog/Get"),
        record::sql_start(PID, 1_100, 9, 0xbbbb, 0xaaaa, "SELECT name FROM items WHERE secret = 'hunter2'", sql_system::POSTGRESQL),
        record::sql_done(PID, 1_200, 9, 0xbbbb, 0x77, "42P01", ([127, 0, 0, 1], 5432)),
        record::sql_start(PID, 1_300, 9, 0xcccc, 0xaaaa, "UPDATE stock SET n = 1", sql_system::MYSQL),
        record::sql_done(PID, 1_400, 9, 0xcccc, 0x77, "4'2\0", ([127, 0, 0, 1], 3306)),
        record::sql_start(PID, 1_500, 9, 0xdddd, 0xaaaa, "VACUUM", sql_system::NONE),
        record::sql_done(PID, 1_600, 9, 0xdddd, 0, "", ([0; 4], 0)),
        record::rpc_end(PID, 2_000, 9, 0xaaaa, 5),
    ]);
    assert_eq!(spans.len(), 4, "{stats:?}");
    let rpc = spans.iter().find(|s| s.span_id == traces::span_id(0xaaaa)).unwrap();
    assert_eq!((rpc.kind, rpc.name.as_str(), rpc.parent), (SpanKind::Server, "shop.v1.Catalog/Get", None));
    assert_eq!(
        (s(rpc, "rpc.method"), s(rpc, "rpc.response.status_code"), s(rpc, "error.type")),
        ("shop.v1.Catalog/Get".into(), "NOT_FOUND".into(), String::new())
    );
    let q = spans.iter().find(|s| s.span_id == traces::span_id(0xbbbb)).unwrap();
    assert_eq!((q.kind, q.parent, q.trace_id), (SpanKind::Client, Some(rpc.span_id), rpc.trace_id));
    assert_eq!(q.name, "SELECT items");
    assert_eq!(s(q, "db.query.text"), "SELECT name FROM items WHERE secret = ?");
    assert_eq!((s(q, "db.system.name"), s(q, "server.address"), s(q, "server.port")), ("postgresql".into(), "127.0.0.1".into(), "5432".into()));
    assert_eq!((s(q, "db.response.status_code"), s(q, "error.type")), ("42P01".into(), "42P01".into()));
    assert!(matches!(q.status, Status::Error(_)));
    let u = spans.iter().find(|s| s.span_id == traces::span_id(0xcccc)).unwrap();
    assert_eq!((s(u, "db.system.name"), s(u, "db.response.status_code"), s(u, "error.type")), ("mysql".into(), String::new(), "_OTHER".into()));
    let v = spans.iter().find(|s| s.span_id == traces::span_id(0xdddd)).unwrap();
    assert_eq!((v.name.as_str(), s(v, "db.system.name"), s(v, "server.address")), ("VACUUM", "other_sql".into(), String::new()));
    assert!(matches!(v.status, Status::Unset));
}

/// A Go HTTP/2 stream: its span from the two records, under the same-host client span the
/// kernel linked, with the HTTP/1 attributes and version 2; its pattern names the route;
/// a status the kernel could not read is left out; a call it made sits under it.
#[test]
fn go_http2_stream_spans_from_their_records() {
    let (spans, stats) = run(&[
        record::client_request(PID, 900, 3, 0x1111, 0, "GET", "https://127.0.0.1:8443/items/4"),
        record::h2_start(PID + 1, 1_000, 0xaaaa, 0x1111, 0, "GET", "/items/4"),
        record::client_request(PID + 1, 1_100, 7, 0xbbbb, 0xaaaa, "GET", "http://127.0.0.1:9000/stock"),
        record::client_response(PID + 1, 1_200, 7, 0xbbbb, 200, 0),
        record::h2_end(PID + 1, 2_000, 7, 0xaaaa, 404, "GET /items/{id}"),
        record::client_response(PID, 2_100, 3, 0x1111, 404, 0),
        record::h2_start(PID + 1, 3_000, 0xcccc, 0, 0, "POST", "/x"),
        record::h2_end(PID + 1, 3_100, 7, 0xcccc, 0, ""),
    ]);
    assert_eq!(spans.len(), 4, "{stats:?}");
    let client = spans.iter().find(|s| s.span_id == traces::span_id(0x1111)).unwrap();
    let h2 = spans.iter().find(|s| s.span_id == traces::span_id(0xaaaa)).unwrap();
    assert_eq!((h2.kind, h2.name.as_str(), h2.parent, h2.trace_id), (SpanKind::Server, "GET /items/{id}", Some(client.span_id), client.trace_id));
    assert_eq!((s(h2, "network.protocol.version"), s(h2, "url.scheme"), s(h2, "http.response.status_code")), ("2".into(), "https".into(), "404".into()));
    assert_eq!((s(h2, "server.address"), s(h2, "http.route")), ("localhost".into(), "/items/{id}".into()));
    let call = spans.iter().find(|s| s.span_id == traces::span_id(0xbbbb)).unwrap();
    assert_eq!((call.parent, call.trace_id), (Some(h2.span_id), h2.trace_id));
    let other = spans.iter().find(|s| s.span_id == traces::span_id(0xcccc)).unwrap();
    assert_eq!((other.parent, s(other, "http.response.status_code"), other.name.as_str()), (None, String::new(), "POST /x"));
    assert_eq!(stats.linked, 1);
}

/// A grpc-go client stream: a CLIENT span under the span that made it, with the server's
/// address; every code but OK is an error on a client.
#[test]
fn grpc_client_spans_from_their_records() {
    let (spans, stats) = run(&[
        record::h2_start(PID, 1_000, 0xaaaa, 0, 0, "GET", "/front"),
        record::rpc_client_start(PID, 1_100, 0xbbbb, 0xaaaa, "/shop.v1.Catalog/Get", (40_000, 50_051)),
        record::rpc_end(PID, 1_900, 5, 0xbbbb, 5),
        record::h2_end(PID, 2_000, 7, 0xaaaa, 200, ""),
    ]);
    assert_eq!(spans.len(), 2, "{stats:?}");
    let front = spans.iter().find(|s| s.span_id == traces::span_id(0xaaaa)).unwrap();
    let call = spans.iter().find(|s| s.span_id == traces::span_id(0xbbbb)).unwrap();
    assert_eq!((call.kind, call.name.as_str(), call.parent, call.trace_id), (SpanKind::Client, "shop.v1.Catalog/Get", Some(front.span_id), front.trace_id));
    assert_eq!((s(call, "server.port"), s(call, "rpc.response.status_code"), s(call, "error.type")), ("50051".into(), "NOT_FOUND".into(), "NOT_FOUND".into()));
    assert_eq!(s(call, "client.address"), "");
    assert!(matches!(call.status, Status::Error(_)));
}

/// The kernel's database numbers name the right databases.
#[test]
fn sql_systems_are_named() {
    use zerotrace_common::sql_system as s;
    let named = |n: u32| super::sql_system_name(n as u8);
    assert_eq!(
        [s::NONE, s::OTHER, s::POSTGRESQL, s::MYSQL, s::SQLITE, s::CLICKHOUSE, 200].map(named),
        ["other_sql", "other_sql", "postgresql", "mysql", "sqlite", "clickhouse", "other_sql"]
    );
    assert!(named(s::SQL_SERVER).starts_with("microsoft") && named(s::ORACLE).starts_with("oracle"));
    assert_eq!(crate::attributes::DB_SYSTEM_NAMES.len() as u32, s::CLICKHOUSE);
}

#[test]
fn client_and_sql_spans_sit_under_their_parent() {
    let (spans, stats) = run(&[
        open(1, 7),
        record::request_linked(PID, 1_000, 1, 1, b"GET /buy HTTP/1.1\r\n\r\n", 0xaaaa, 0),
        record::client_request(PID, 2_000, 9, 0xbbbb, 0xaaaa, "GET", "http://stock:8080/items/1"),
        record::client_response(PID, 3_000, 9, 0xbbbb, 503, 0),
        record::client_request(PID, 3_500, 9, 0xcccc, 0x1234, "POST", "https://pay/charge"),
        record::client_response(PID, 3_600, 9, 0xcccc, 0, 0x5555),
        record::response(PID, 4_000, 1, 1, b"HTTP/1.1 200 OK\r", ""),
    ]);
    assert_eq!(spans.len(), 3, "{stats:?}");
    let server = spans.iter().find(|s| s.kind == SpanKind::Server).unwrap();
    assert_eq!(server.span_id, traces::span_id(0xaaaa));
    let c = spans.iter().find(|s| s.span_id == traces::span_id(0xbbbb)).unwrap();
    assert_eq!((c.kind, c.parent, c.trace_id), (SpanKind::Client, Some(server.span_id), server.trace_id));
    assert_eq!(s(c, "url.full"), "http://stock:8080/items/1");
    assert_eq!(s(c, "server.address"), "stock");
    assert_eq!(s(c, "server.port"), "8080");
    assert_eq!(s(c, "http.response.status_code"), "503");
    assert_eq!(s(c, "error.type"), "503");
    assert!(matches!(c.status, Status::Error(_)));
    // A parent the agent never saw: a new trace, no parent, counted; a transport error.
    let f = spans.iter().find(|s| s.span_id == traces::span_id(0xcccc)).unwrap();
    assert_eq!(f.parent, None);
    assert_ne!(f.trace_id, server.trace_id);
    assert_eq!(s(f, "server.port"), "443");
    assert_eq!(s(f, "http.response.status_code"), "");
    assert!(matches!(f.status, Status::Error(_)));
}

#[test]
fn a_server_request_links_to_the_same_host_client_that_sent_it() {
    let (spans, stats) = run(&[
        record::client_request(PID, 1_000, 9, 0xbbbb, 0, "GET", "http://127.0.0.1:8080/x"),
        open(1, 7),
        record::request_linked(PID + 1, 2_000, 1, 1, b"GET /x HTTP/1.1\r\n\r\n", 0xdddd, 0xbbbb),
        record::response(PID + 1, 3_000, 1, 1, b"HTTP/1.1 200 OK\r", ""),
        record::client_response(PID, 4_000, 9, 0xbbbb, 200, 0),
    ]);
    assert_eq!(spans.len(), 2);
    assert_eq!(stats.linked, 1);
    let (server, client) = (&spans[0], &spans[1]);
    assert_eq!(server.parent, Some(client.span_id));
    assert_eq!(server.trace_id, client.trace_id);
    assert!(!server.parent_is_remote);
}

/// A native (hyper-like) server: the span ends at the send that completes the response by
/// its Content-Length, not at the next read (which may never come); the kernel's own end
/// record, when it comes later, adds nothing.
#[test]
fn native_server_span_ends_at_its_framing() {
    use zerotrace_common::EventKind as K;
    let head = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n";
    let (spans, stats) = run(&[
        open(1, 7),
        record::request_linked(PID, 2_000_000, 1, 1, b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n", 0x51, 0),
        // First send: the head (39 bytes) and 4 body bytes, then the last 6.
        record::bytes_record(K::SockServerResponse, PID, 3_000_000, 1, 1, head, head.len() as u32 + 4, 0),
        record::sock_bytes(K::SockServerSend, PID, 4_000_000, 1, 1, 6, b"efghij"),
        record::response(PID, 9_000_000, 1, 1, b"HTTP/1.1 200 OK\r", ""),
    ]);
    assert_eq!(spans.len(), 1, "{stats:?}");
    assert_eq!(spans[0].end_unix_ns - spans[0].start_unix_ns, 2_000_000, "ends at the completing send");
    assert_eq!(s(&spans[0], "http.response.status_code"), "200");
    assert_eq!(stats.unmatched_responses, 0, "the later end record is expected");
}

/// A native client: request, chunked response over three reads; the span ends at the read
/// with the last chunk; the server it called (another traced process) is its child; a
/// client request made while exactly one server request is open in its process is that
/// request's child.
#[test]
fn native_client_spans_and_their_parents() {
    use zerotrace_common::EventKind as K;
    const FRONT: u32 = 77;
    let open_front = record::conn_open(FRONT, 1_000, 10, SK + 1, ([127, 0, 0, 1], 9000), ([127, 0, 0, 1], 40000));
    let client_conn = client_open(FRONT, 11, SK + 2, 40001);
    let (spans, stats) = run(&[
        open_front,
        client_conn,
        open(1, 7),
        // The front process serves a request (its only open one) ...
        record::request_linked(FRONT, 1_000_000, 10, 1, b"GET /front HTTP/1.1\r\n\r\n", 0xf0, 0),
        // ... and calls the downstream meanwhile.
        record::bytes_record(K::SockClientRequest, FRONT, 2_000_000, 11, 1, b"GET /down?secret=1 HTTP/1.1\r\nHost: down:8080\r\n\r\n", 47, 0xc1),
        // The downstream (another process) reads it: linked through the flow.
        record::request_linked(PID, 2_100_000, 1, 1, b"GET /down HTTP/1.1\r\n\r\n", 0xd1, 0xc1),
        record::response(PID, 2_500_000, 1, 1, b"HTTP/1.1 200 OK\r", ""),
        record::bytes_record(K::SockClientResponse, FRONT, 3_000_000, 11, 1, b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n", 60, 0),
        record::sock_bytes(K::SockClientRecv, FRONT, 4_000_000, 11, 1, 20, b"abc\r\n"),
        record::sock_bytes(K::SockClientRecv, FRONT, 5_000_000, 11, 1, 5, b"0\r\n\r\n"),
        record::response(FRONT, 6_000_000, 10, 1, b"HTTP/1.1 200 OK\r", ""),
    ]);
    assert_eq!(spans.len(), 3, "{stats:?} {spans:#?}");
    let by = |k: SpanKind, pid: u32| spans.iter().find(|x| x.kind == k && x.pid == pid).expect("span");
    let (front, call, down) = (by(SpanKind::Server, FRONT), by(SpanKind::Client, FRONT), by(SpanKind::Server, PID));
    assert_eq!(call.parent, Some(front.span_id), "the one open request is the parent");
    assert_eq!(down.parent, Some(call.span_id), "the flow link");
    assert!(call.trace_id == front.trace_id && down.trace_id == front.trace_id);
    assert_eq!(call.end_unix_ns - call.start_unix_ns, 3_000_000, "ends at the read with the last chunk");
    assert_eq!(s(call, "url.full"), "http://down:8080/down", "no query values");
    assert_eq!(s(call, "http.response.status_code"), "200");
}

/// HTTP/2 pieces of one syscall must come in order: a lost piece (a record dropped by a
/// full ring) makes the direction unreadable, and the open streams end there (incomplete),
/// instead of frames being read from the wrong place.
#[test]
fn http2_lost_piece_ends_open_streams() {
    use zerotrace_common::EventKind as K;
    let mut enc = loona_hpack::Encoder::new();
    let block = enc.encode([(&b":method"[..], &b"GET"[..]), (b":path", b"/a"), (b":scheme", b"http"), (b":authority", b"x")]);
    let frame = |kind: u8, flags: u8, stream: u32, p: &[u8]| {
        let mut v = vec![(p.len() >> 16) as u8, (p.len() >> 8) as u8, p.len() as u8, kind, flags];
        v.extend_from_slice(&stream.to_be_bytes());
        v.extend_from_slice(p);
        v
    };
    let mut first = crate::protocols::http2::PREFACE.to_vec();
    first.extend(frame(1, 0x4 | 0x1, 1, &block));
    // A server connection: the client's HEADERS arrive in one read (one piece, last).
    let piece = |bytes: &[u8], offset: u32, last: bool, total: u32| {
        let mut v = record::bytes_record(K::SockH2Recv, PID, 2_000_000 + u64::from(offset), 1, 1, bytes, total, 0);
        let at = std::mem::offset_of!(zerotrace_common::HttpRequestEvent, offset);
        v[at..at + 4].copy_from_slice(&offset.to_ne_bytes());
        let at = std::mem::offset_of!(zerotrace_common::HttpRequestEvent, tls);
        v[at] = u8::from(last);
        v
    };
    let (spans, stats) = run(&[
        open(1, 7),
        piece(&first, 0, true, first.len() as u32),
        // The next read came in two pieces; the first piece was lost: offset 2048 first.
        piece(&[0; 16], 2048, true, 2064),
    ]);
    assert_eq!(stats.h2_unreadable, 1);
    assert_eq!(spans.len(), 1, "the open stream ended: {spans:#?}");
    assert_eq!(spans[0].kind, SpanKind::Server);
    assert_eq!(s(&spans[0], "zerotrace.http2.incomplete"), "connection closed before the stream ended");
}

/// HTTP/1 pipelining on a server: three requests in one read (the second's body looks like
/// a request, and is skipped by its Content-Length). The kernel starts the first; each later
/// response head that no read started comes as SockServerPipelined with its own sequence
/// number and span id, and the request it answers is the next one in the first's capture.
#[test]
fn pipelined_server_requests_each_get_a_span() {
    use zerotrace_common::EventKind as K;
    let batch = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nPOST /b HTTP/1.1\r\nContent-Length: 17\r\n\r\nGET /z HTTP/1.1\r\nGET /c?q=1 HTTP/1.1\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n";
    let small = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n";
    let big = b"HTTP/1.1 200 OK\r\ncontent-length: 5000\r\n\r\n";
    let (spans, stats) = run(&[
        open(1, 7),
        record::request_linked(PID, 1_000_000, 1, 1, batch, 0xa1, 0),
        record::response(PID, 2_000_000, 1, 1, b"HTTP/1.1 200 OK\r", ""),
        // The whole response in its head's send: ended by its framing ...
        record::bytes_record(K::SockServerPipelined, PID, 3_000_000, 1, 2, small, small.len() as u32, 0xa2),
        // ... so the kernel's end record for it adds nothing.
        record::response(PID, 3_500_000, 1, 2, b"HTTP/1.1 404 Not", ""),
        // A response written in several sends ends with the kernel's record.
        record::bytes_record(K::SockServerPipelined, PID, 4_000_000, 1, 3, big, big.len() as u32, 0xa3),
        record::response(PID, 6_000_000, 1, 3, b"HTTP/1.1 200 OK\r", ""),
        // A fourth response, whose request was never captured: no span, counted.
        record::bytes_record(K::SockServerPipelined, PID, 7_000_000, 1, 4, small, small.len() as u32, 0xa4),
    ]);
    assert_eq!(spans.len(), 3, "{stats:?} {spans:#?}");
    let got: Vec<(String, String, u64)> =
        spans.iter().map(|x| (s(x, "url.path"), s(x, "http.response.status_code"), (x.end_unix_ns - OFFSET as u64) / 1_000_000)).collect();
    assert_eq!(got, [("/a".into(), "200".into(), 2), ("/b".into(), "404".into(), 3), ("/c".into(), "200".into(), 6)]);
    assert!(spans.iter().all(|x| x.start_unix_ns == (1_000_000 + OFFSET) as u64), "all were read at once");
    assert_eq!(spans[1].span_id, span_id(0xa2));
    assert_eq!(spans[2].parent.map(|p| p.to_string()), Some("b7ad6b7169203331".into()), "its own traceparent");
    assert_ne!(spans[0].trace_id, spans[1].trace_id, "no client linked the later ones: traces of their own");
    assert_eq!((stats.pipelined_uncaptured, stats.unmatched_responses), (1, 0));
}

/// HTTP/1 pipelining on a native client: three requests in one write, and the three
/// responses read at once (their heads all in the capture), then a fourth request's
/// response in a read of its own.
#[test]
fn pipelined_client_responses_read_together_are_split() {
    use zerotrace_common::EventKind as K;
    let client = client_open(PID, 11, SK + 2, 40001);
    let reqs = b"GET /1 HTTP/1.1\r\nHost: d\r\n\r\nHEAD /2 HTTP/1.1\r\nHost: d\r\n\r\nGET /3 HTTP/1.1\r\nHost: d\r\n\r\nGET /4 HTTP/1.1\r\nHost: d\r\n\r\n";
    let three = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\ncontent-length: 99\r\n\r\nHTTP/1.1 500 Oops\r\ntransfer-encoding: chunked\r\n\r\n2\r\nno\r\n0\r\n\r\n";
    let fourth = b"HTTP/1.1 404 Not Found\r\ncontent-length: 3\r\n\r\n";
    let (spans, stats) = run(&[
        client,
        record::bytes_record(K::SockClientRequest, PID, 1_000_000, 11, 1, reqs, reqs.len() as u32, 0xc1),
        record::bytes_record(K::SockClientResponse, PID, 2_000_000, 11, 1, three, three.len() as u32, 0),
        record::bytes_record(K::SockClientResponse, PID, 3_000_000, 11, 1, fourth, fourth.len() as u32 + 1, 0),
        record::sock_bytes(K::SockClientRecv, PID, 4_000_000, 11, 1, 2, b"ne"),
    ]);
    let got: Vec<(String, String, u64)> =
        spans.iter().map(|x| (s(x, "url.full"), s(x, "http.response.status_code"), (x.end_unix_ns - OFFSET as u64) / 1_000_000)).collect();
    assert_eq!(
        got,
        [
            ("http://d/1".into(), "200".into(), 2),
            ("http://d/2".into(), "200".into(), 2),
            ("http://d/3".into(), "500".into(), 2),
            ("http://d/4".into(), "404".into(), 4)
        ],
        "{stats:?}"
    );
    assert_eq!(spans[0].span_id, span_id(0xc1));
    let ids: std::collections::HashSet<_> = spans.iter().map(|x| x.span_id).collect();
    assert_eq!(ids.len(), 4);
    assert_eq!(stats.pipelined_uncaptured, 0);
}

/// Pipelined requests between two traced processes on one host: the kernel offers only the
/// batch's first request on the flow, and both ends derive the later ones' ids alike, so
/// every server span is its client span's child (each pair a trace of its own).
#[test]
fn pipelined_requests_link_across_processes() {
    use zerotrace_common::EventKind as K;
    const FRONT: u32 = 77;
    let client = client_open(FRONT, 11, SK + 2, 40001);
    let reqs = b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\nGET /3 HTTP/1.1\r\n\r\n";
    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
    let (spans, stats) = run(&[
        client,
        open(1, 7),
        record::bytes_record(K::SockClientRequest, FRONT, 1_000_000, 11, 1, reqs, reqs.len() as u32, 0xc1),
        record::request_linked(PID, 1_100_000, 1, 1, reqs, 0xd1, 0xc1),
        record::bytes_record(K::SockServerResponse, PID, 1_200_000, 1, 1, ok, ok.len() as u32, 0),
        record::bytes_record(K::SockServerPipelined, PID, 1_300_000, 1, 2, ok, ok.len() as u32, 0xd2),
        record::bytes_record(K::SockServerPipelined, PID, 1_400_000, 1, 3, ok, ok.len() as u32, 0xd3),
        record::bytes_record(K::SockClientResponse, FRONT, 1_500_000, 11, 1, &ok.repeat(3), 3 * ok.len() as u32, 0),
    ]);
    assert_eq!(spans.len(), 6, "{stats:?} {spans:#?}");
    let path = |x: &Span| s(x, "url.path").chars().chain(s(x, "url.full").chars().skip(7)).collect::<String>();
    for n in 1..=3 {
        let server = spans.iter().find(|x| x.kind == SpanKind::Server && path(x) == format!("/{n}")).expect("server span");
        let client = spans.iter().find(|x| x.kind == SpanKind::Client && path(x).ends_with(&format!("/{n}"))).expect("client span");
        assert_eq!(server.parent, Some(client.span_id), "request {n}");
        assert_eq!(server.trace_id, client.trace_id, "request {n}");
    }
    let traces: std::collections::HashSet<_> = spans.iter().map(|x| x.trace_id).collect();
    assert_eq!(traces.len(), 3, "roots written together are traces of their own");
    assert_eq!(stats.linked, 3);
}

/// A native client writes two requests in two writes before reading: its kernel offers
/// only the first on the flow. The server reads and answers them one at a time, so the
/// second is a read of its own with the same offer: it is the client's second request's
/// child, never the first's.
#[test]
fn a_second_read_under_the_same_offer_is_the_next_request() {
    use zerotrace_common::EventKind as K;
    const FRONT: u32 = 77;
    let client = client_open(FRONT, 11, SK + 2, 40001);
    let (r1, r2) = (&b"GET /1 HTTP/1.1\r\n\r\n"[..], &b"GET /2 HTTP/1.1\r\n\r\n"[..]);
    let mut second = record::bytes_record(K::SockClientRequest, FRONT, 1_050_000, 11, 1, r2, r2.len() as u32, 0xc1);
    let off = std::mem::offset_of!(zerotrace_common::HttpRequestEvent, offset);
    second[off..off + 4].copy_from_slice(&(r1.len() as u32).to_ne_bytes());
    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
    let (spans, stats) = run(&[
        client,
        open(1, 7),
        record::bytes_record(K::SockClientRequest, FRONT, 1_000_000, 11, 1, r1, r1.len() as u32, 0xc1),
        second,
        record::request_linked(PID, 1_100_000, 1, 1, r1, 0xd1, 0xc1),
        record::bytes_record(K::SockServerResponse, PID, 1_200_000, 1, 1, ok, ok.len() as u32, 0),
        record::request_linked(PID, 1_300_000, 1, 2, r2, 0xd2, 0xc1),
        record::bytes_record(K::SockServerResponse, PID, 1_400_000, 1, 2, ok, ok.len() as u32, 0),
        record::bytes_record(K::SockClientResponse, FRONT, 1_500_000, 11, 1, &ok.repeat(2), 2 * ok.len() as u32, 0),
    ]);
    assert_eq!(spans.len(), 4, "{stats:?} {spans:#?}");
    let find = |k: SpanKind, n: u32| {
        spans.iter().find(|x| x.kind == k && (s(x, "url.path") == format!("/{n}") || s(x, "url.full").ends_with(&format!("/{n}")))).expect("span")
    };
    for n in 1..=2 {
        assert_eq!(find(SpanKind::Server, n).parent, Some(find(SpanKind::Client, n).span_id), "request {n}");
    }
}

/// A native server that sends two pipelined responses in one send: which request the next
/// head answers is unknown, so the requests after it get no span rather than shifted ones.
#[test]
fn responses_sent_together_do_not_shift_the_pairing() {
    use zerotrace_common::EventKind as K;
    let batch = b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\nGET /3 HTTP/1.1\r\n\r\n";
    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
    let (spans, stats) = run(&[
        open(1, 7),
        record::request_linked(PID, 1_000_000, 1, 1, batch, 0xd1, 0),
        // Responses 1 and 2 in one send (only the first head captured) ...
        record::bytes_record(K::SockServerResponse, PID, 1_100_000, 1, 1, ok, 2 * ok.len() as u32, 0),
        // ... then response 3's head.
        record::bytes_record(K::SockServerPipelined, PID, 1_200_000, 1, 2, ok, ok.len() as u32, 0xd3),
    ]);
    let paths: Vec<String> = spans.iter().map(|x| s(x, "url.path")).collect();
    assert_eq!(paths, ["/1"], "{stats:?}");
    assert_eq!(stats.pipelined_uncaptured, 2, "the batch's rest, and the head that found no request");
}

/// A native client's chunked response too big to be measured whose last chunk came in one
/// read with the next response's first bytes: the next read that starts with a head ends it
/// (the requests after it are followed).
#[test]
fn a_head_read_ends_an_unmeasured_chunked_response() {
    use zerotrace_common::EventKind as K;
    let client = client_open(PID, 11, SK + 2, 40001);
    let reqs = b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\nGET /3 HTTP/1.1\r\n\r\n";
    let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1000\r\n";
    let ok = b"HTTP/1.1 204 No Content\r\n\r\n";
    let (spans, stats) = run(&[
        client,
        record::bytes_record(K::SockClientRequest, PID, 1_000_000, 11, 1, reqs, reqs.len() as u32, 0xc1),
        record::bytes_record(K::SockClientResponse, PID, 2_000_000, 11, 1, chunked, 3000, 0),
        // The chunk's end, the last chunk and response 2's head: the tail is response 2's.
        record::sock_bytes(K::SockClientRecv, PID, 3_000_000, 11, 1, 1200, b"ntent\r\n\r"),
        record::bytes_record(K::SockClientResponse, PID, 4_000_000, 11, 1, ok, ok.len() as u32, 0),
    ]);
    let got: Vec<(String, String)> = spans.iter().map(|x| (s(x, "url.full"), s(x, "http.response.status_code"))).collect();
    assert_eq!(got.len(), 2, "{stats:?} {got:?}");
    assert_eq!(got[0].1, "200");
    assert!(got[0].0.ends_with("/1"));
    assert_eq!(spans[0].end_unix_ns - OFFSET as u64, 3_000_000, "ended at its last read");
    assert!(got[1].0.ends_with("/2") && got[1].1 == "204", "{got:?}");
}

/// A connection whose close record was lost (full ring) is closed by the sweep at the second
/// miss in a row (the first may be a close still in the ring), its open request counted as
/// abandoned; live connections and a connection seen again are kept. Go client and SQL
/// calls whose return never came are forgotten after CALL_EXPIRY.
#[test]
fn the_sweep_closes_what_the_kernel_forgot() {
    let mut c = Correlator::with_memory(Clock::fixed(OFFSET), Box::new(record::fake_memory));
    let mut out = Vec::new();
    let feed = |c: &mut Correlator, out: &mut Vec<Span>, recs: &[Vec<u8>]| {
        for r in recs {
            c.on_event(decode(r).expect("recorded records decode"), out);
        }
    };
    feed(
        &mut c,
        &mut out,
        &[
            open(1, 7),
            record::conn_open(PID, 1_000, 2, SK + 8, ([127, 0, 0, 1], 8080), ([127, 0, 0, 1], 51001)),
            record::request(PID, 2_000, 1, 1, 0, b"GET /lost HTTP/1.1\r\n\r\n"),
            record::request(PID, 2_000, 2, 1, 0, b"GET /kept HTTP/1.1\r\n\r\n"),
            record::client_request(PID, 3_000, 9, 0xbbbb, 0, "GET", "http://stock:8080/items/1"),
        ],
    );
    let live = |ids: &[u64]| ids.iter().copied().collect::<HashSet<u64>>();
    let minute = 60_000_000_000;
    // Connection 1 is missing once, then live again: one miss closes nothing.
    c.sweep(&live(&[2]), minute, &mut out);
    c.sweep(&live(&[1, 2]), 2 * minute, &mut out);
    assert_eq!((c.conns.len(), c.stats.closed_unseen), (2, 0), "one miss closes nothing");
    // Now missing twice in a row: closed, its request abandoned; connection 2 stays.
    c.sweep(&live(&[2]), 3 * minute, &mut out);
    assert_eq!(c.stats.closed_unseen, 0);
    c.sweep(&live(&[2]), 4 * minute, &mut out);
    assert_eq!((c.stats.closed_unseen, c.stats.abandoned), (1, 1));
    assert!(!c.conns.contains_key(&1) && !c.pending.contains_key(&1) && !c.by_sk.contains_key(&SK));
    assert!(c.conns.contains_key(&2) && c.pending.contains_key(&2));
    // Connection 2's request still ends as a span.
    feed(&mut c, &mut out, &[record::response(PID, 5_000, 2, 1, b"HTTP/1.1 200 OK\r", "")]);
    assert_eq!(out.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["GET /kept"]);
    // The client call without a return: kept until CALL_EXPIRY after its start.
    assert_eq!((c.clients.len(), c.stats.calls_expired), (1, 0));
    let expiry = CALL_EXPIRY.as_nanos() as u64;
    c.sweep(&live(&[2]), 3_000 + expiry - 1, &mut out);
    assert_eq!((c.clients.len(), c.stats.calls_expired), (1, 0));
    c.sweep(&live(&[2]), 3_000 + expiry, &mut out);
    assert_eq!((c.clients.len(), c.stats.calls_expired), (0, 1));
}
