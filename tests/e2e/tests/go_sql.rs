//! database/sql against a real PostgreSQL server: a Go service (tests/e2e/go/pgshop, lib/pq
//! built from the offline module sources) reaches it along every database/sql path (DB,
//! Conn, Tx, prepared Stmt, Tx-bound Stmt) and one failing statement, inside its HTTP
//! handlers. Each statement is one CLIENT span under its request's span, named by its
//! summary, with the database the driver speaks (`postgresql`), the server it talked to,
//! the text without literals and, for the failure, the SQLSTATE from the driver's error. The
//! oldest and newest Go, and the newest stripped as a PIE (no symbol table, no DWARF).
use std::{process::Command, time::Duration};

use anyhow::Result;
use zerotrace_e2e::{
    agent::Agent,
    http::Client,
    otlp::{Kind, RMetric, RSpan, Receiver},
    postgres::Postgres,
    proc::{Proc, free_port, wait_for_port, wait_until},
    tools::{self, GO_NEWEST, GO_OLDEST},
};

const SERVER: i32 = 2;
const CLIENT: i32 = 3;

/// (request path, its status, the statements it runs: (span name, db.query.text)).
type Case = (&'static str, u16, &'static [(&'static str, &'static str)]);

const CASES: &[Case] = &[
    ("/query/913", 200, &[("SELECT items", "SELECT name FROM items WHERE id = $1")]),
    ("/exec/913", 200, &[("UPDATE items", "UPDATE items SET stock = stock - ? WHERE id = $1 AND name <> ?")]),
    ("/stmt/913", 200, &[("SELECT items", "SELECT name FROM items WHERE id = $1"), ("UPDATE items", "UPDATE items SET stock = stock + ? WHERE id = $1")]),
    ("/tx/913", 200, &[("INSERT audit", "INSERT INTO audit (item) VALUES ($1)"), ("SELECT items", "SELECT name FROM items WHERE id = $1")]),
    ("/conn/913", 200, &[("SELECT audit", "SELECT count(*) FROM audit")]),
    ("/broken/913", 500, &[("SELECT missing_table", "SELECT id FROM missing_table")]),
];

const DB_METRIC: &str = "db.client.operation.duration";

/// The newest point of the database metric whose attributes are `attrs` (an empty value:
/// the attribute is absent).
fn latest<'a>(ms: &'a [RMetric], attrs: &[(&str, &str)]) -> Option<&'a RMetric> {
    ms.iter().filter(|m| m.name == DB_METRIC && attrs.iter().all(|(k, v)| m.attrs.get(*k).map_or("", String::as_str) == *v)).max_by_key(|m| m.time_ns)
}

/// pgshop built with Go `version` (`tag`, `flags`) against `pg`, listening: it and its port.
fn start_shop(pg: &Postgres, version: &str, tag: &str, flags: &[&str]) -> Result<(Proc, u16)> {
    let bin = tools::pgshop(version, tag, flags)?;
    let port = free_port();
    let mut cmd = Command::new(&bin);
    cmd.arg(format!("127.0.0.1:{port}")).arg(pg.dsn()).env("OTEL_SERVICE_NAME", "pgshop");
    let shop = Proc::spawn("pgshop", cmd)?;
    wait_for_port(port, Duration::from_secs(30)).map_err(|e| anyhow::anyhow!("{e}: {}", shop.stderr_text()))?;
    Ok((shop, port))
}

fn run(version: &str, tag: &str, flags: &[&str]) -> Result<()> {
    let ctx = format!("Go {version}{tag}");
    let pg = Postgres::start()?;
    let (shop, port) = start_shop(&pg, version, tag, flags)?;
    let rx = Receiver::start(Kind::Grpc, 0)?;
    let endpoint = rx.endpoint();
    let mut agent = Agent::start(&[shop.pid()], &["--otlp-endpoint", &endpoint, "--batch-delay", "200ms"], &[("OTEL_METRIC_EXPORT_INTERVAL", "500")])?;
    let log = agent.proc.stderr_text();
    assert!(log.contains("sql_spans=true"), "{ctx}: {log}");
    let mut c = Client::new(port);
    for (path, status, _) in CASES {
        let r = c.get(path)?;
        assert_eq!(r.status, *status, "{ctx} {path}: {}", String::from_utf8_lossy(&r.body));
        if path.starts_with("/broken") {
            assert!(r.body.starts_with(b"pq: "), "{ctx}: the driver's error: {}", String::from_utf8_lossy(&r.body));
        }
    }
    let want: usize = CASES.iter().map(|(_, _, s)| 1 + s.len()).sum();
    rx.wait_for(want, Duration::from_secs(30))?;
    // The statements' duration histogram: by database, summary and error.
    let selects = |ms: &[RMetric]| latest(ms, &[("db.query.summary", "SELECT items"), ("error.type", "")]).map(|m| m.count);
    let failed = |ms: &[RMetric]| latest(ms, &[("db.query.summary", "SELECT missing_table"), ("error.type", "42P01")]).map(|m| m.count);
    wait_until("the database metrics", Duration::from_secs(20), || {
        let ms = rx.metrics();
        selects(&ms) == Some(3) && failed(&ms) == Some(1)
    })
    .map_err(|e| anyhow::anyhow!("{ctx}: {e}: {:#?}", rx.metrics().iter().filter(|m| m.name == DB_METRIC).collect::<Vec<_>>()))?;
    let ms = rx.metrics();
    let m = latest(&ms, &[("db.query.summary", "SELECT missing_table")]).expect("seen above");
    assert_eq!((m.unit.as_str(), m.attr("db.system.name"), m.attr("db.response.status_code")), ("s", "postgresql", "42P01"), "{ctx}: {m:?}");
    assert_eq!(m.attr("server.port"), pg.port.to_string(), "{ctx}: {m:?}");
    agent.stop()?;
    let spans = rx.spans();
    assert_eq!(spans.len(), want, "{ctx}: {spans:#?}");
    for (path, _, statements) in CASES {
        let server: Vec<&RSpan> = spans.iter().filter(|s| s.kind == SERVER && s.attr("url.path") == *path).collect();
        assert_eq!(server.len(), 1, "{ctx}: one server span for {path}: {spans:#?}");
        let server = server[0];
        let mut kids: Vec<&RSpan> = spans.iter().filter(|s| s.parent_span_id == server.span_id).collect();
        kids.sort_by_key(|k| k.start_ns);
        let got: Vec<(&str, &str)> = kids.iter().map(|k| (k.name.as_str(), k.attr("db.query.text"))).collect();
        assert_eq!(got, statements.to_vec(), "{ctx} {path}: {kids:#?}");
        for k in &kids {
            assert_eq!(k.kind, CLIENT, "{ctx} {path}");
            assert_eq!(k.trace_id, server.trace_id, "{ctx} {path}");
            assert!(server.start_ns <= k.start_ns && k.end_ns <= server.end_ns, "{ctx} {path}: the statement within its request");
            assert_eq!(k.attr("db.system.name"), "postgresql", "{ctx} {path}: {k:#?}");
            assert_eq!(k.attr("db.query.summary"), k.name, "{ctx} {path}");
            assert_eq!((k.attr("server.address"), k.attr("server.port")), ("127.0.0.1", pg.port.to_string().as_str()), "{ctx} {path}: {k:#?}");
            // No literal and no argument value (913) in any attribute but the ids.
            let leaked = k.attrs.iter().any(|(key, v)| {
                key != "thread.id" && key != "zerotrace.go.goroutine.id" && key != "server.port" && (v.contains("913") || v.contains("hunter2"))
            });
            assert!(!leaked, "{ctx} {path}: argument values are never captured: {k:#?}");
            if path.starts_with("/broken") {
                assert_eq!(k.status, 2, "{ctx}: {k:#?}");
                assert_eq!((k.attr("db.response.status_code"), k.attr("error.type")), ("42P01", "42P01"), "{ctx}: {k:#?}");
            } else {
                assert_eq!(k.status, 0, "{ctx} {path}: {k:#?}");
                assert_eq!(k.attr("db.response.status_code"), "", "{ctx} {path}");
            }
        }
    }
    Ok(())
}

#[test]
fn lib_pq_against_postgresql_oldest_go() -> Result<()> {
    run(GO_OLDEST, "", &[])
}

#[test]
fn lib_pq_against_postgresql_newest_go() -> Result<()> {
    run(GO_NEWEST, "", &[])
}

#[test]
fn lib_pq_against_postgresql_stripped_pie() -> Result<()> {
    run(GO_NEWEST, "-stripped-pie", &["-buildmode=pie", "-ldflags=-s -w"])
}

/// 16 clients at once, 4 requests each, each request running a prepared query and update
/// while the others run theirs (8 database connections): every statement is under its own
/// request, with its own server, and none is lost or doubled.
#[test]
fn concurrent_statements_stay_with_their_requests() -> Result<()> {
    let pg = Postgres::start()?;
    let (shop, port) = start_shop(&pg, GO_NEWEST, "", &[])?;
    let rx = Receiver::start(Kind::Grpc, 0)?;
    let endpoint = rx.endpoint();
    let mut agent = Agent::start(&[shop.pid()], &["--otlp-endpoint", &endpoint, "--batch-delay", "200ms"], &[])?;
    let (clients, each) = (16, 4);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..clients)
            .map(|w| {
                s.spawn(move || -> Result<()> {
                    let mut c = Client::new(port);
                    for i in 0..each {
                        let r = c.get(&format!("/stmt/{}", 1 + w * each + i))?;
                        anyhow::ensure!(r.status == 200, "status {}", r.status);
                    }
                    Ok(())
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| w.join().expect("client thread"))
    })?;
    let want = clients * each * 3;
    rx.wait_for(want, Duration::from_secs(30))?;
    agent.stop()?;
    let spans = rx.spans();
    assert_eq!(spans.len(), want, "{spans:#?}");
    let servers: Vec<&RSpan> = spans.iter().filter(|s| s.kind == SERVER).collect();
    assert_eq!(servers.len(), clients * each);
    for server in servers {
        let mut kids: Vec<&RSpan> = spans.iter().filter(|s| s.parent_span_id == server.span_id).collect();
        kids.sort_by_key(|k| k.start_ns);
        let names: Vec<&str> = kids.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(names, ["SELECT items", "UPDATE items"], "{}: {kids:#?}", server.attr("url.path"));
        for k in kids {
            assert_eq!(k.trace_id, server.trace_id);
            assert!(server.start_ns <= k.start_ns && k.end_ns <= server.end_ns, "{k:#?}");
            assert_eq!(k.attr("server.port"), pg.port.to_string());
        }
    }
    Ok(())
}
