//! Hostile input on live traced servers (a Go net/http server, a Rust axum server, a Rust
//! tonic gRPC server over h2c): slowloris connections, a 1 MB header block, invalid HPACK,
//! 10,000 pipelined requests on one connection, binary garbage on an HTTP port, all while
//! legitimate requests go on. The agent never panics or dies, its memory stays bounded
//! (RSS sampled throughout), what it cannot use is counted, and every legitimate request
//! still becomes its span.
use std::{
    io::{Read, Write},
    net::TcpStream,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};
use zerotrace_e2e::{
    agent::Agent,
    http::Client,
    otlp::{Kind, Receiver},
    proc::{Proc, free_port, rss_kib, start_server, wait_for_port},
    tools::{self, GO_NEWEST},
};

fn connect(port: u16) -> Result<TcpStream> {
    let s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    Ok(s)
}

/// Reads until the peer closes or goes quiet; the byte count.
fn drain(s: &mut TcpStream) -> usize {
    let mut buf = [0u8; 65536];
    let mut n = 0;
    while let Ok(k) = s.read(&mut buf) {
        if k == 0 {
            break;
        }
        n += k;
    }
    n
}

/// Slowloris: `n` connections that send a request head one byte at a time, never ending it.
fn slowloris(port: u16, n: usize, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut conns: Vec<TcpStream> = (0..n).filter_map(|_| connect(port).ok()).collect();
        let head = b"GET /slowloris HTTP/1.1\r\nHost: x\r\nX-a: ";
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) {
            let b = [head.get(i).copied().unwrap_or(b'a')];
            conns.retain_mut(|c| c.write_all(&b).is_ok());
            i += 1;
            std::thread::sleep(Duration::from_millis(50));
        }
    })
}

fn huge_header(port: u16) -> Result<()> {
    let mut s = connect(port)?;
    let big = "a".repeat(1 << 20);
    let _ = s.write_all(format!("GET /huge HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n").as_bytes());
    drain(&mut s);
    Ok(())
}

fn garbage(port: u16) -> Result<()> {
    let mut s = connect(port)?;
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let bytes: Vec<u8> = (0..65536)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let _ = s.write_all(&bytes);
    drain(&mut s);
    Ok(())
}

/// 10,000 requests written at once on one connection; every response read back.
fn pipelined(port: u16, n: usize) -> Result<usize> {
    let mut s = connect(port)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut all = Vec::new();
    for i in 0..n {
        all.extend_from_slice(format!("GET /pipe/{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
    }
    let mut w = s.try_clone()?;
    let writer = std::thread::spawn(move || w.write_all(&all));
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    let end = Instant::now() + Duration::from_secs(60);
    while Instant::now() < end {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(k) => got.extend_from_slice(&buf[..k]),
        }
        if memchr_count(&got, b"HTTP/1.1 ") >= n {
            break;
        }
    }
    let _ = writer.join();
    Ok(memchr_count(&got, b"HTTP/1.1 "))
}

fn memchr_count(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

/// HTTP/2 prior knowledge, then a HEADERS frame whose HPACK block is invalid (an index far
/// beyond the tables, then a literal whose length runs past the block), then one claiming
/// a header list of 2 GiB through CONTINUATION frames that never end.
fn bad_hpack(port: u16) -> Result<()> {
    let mut s = connect(port)?;
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // SETTINGS, empty
    let block = [0xff, 0xff, 0xff, 0xff, 0x0f, 0x40, 0x7f, 0xff, 0xff, 0xff, 0x07, b'x'];
    out.extend_from_slice(&[0, 0, block.len() as u8, 1, 0x04 | 0x01, 0, 0, 0, 1]);
    out.extend_from_slice(&block);
    // Stream 3: HEADERS without END_HEADERS, then CONTINUATIONs of junk.
    out.extend_from_slice(&[0, 0, 4, 1, 0, 0, 0, 0, 3, 0x82, 0x86, 0x84, 0x41]);
    for _ in 0..64 {
        out.extend_from_slice(&[0, 0x10, 0, 9, 0, 0, 0, 0, 3]);
        out.extend(std::iter::repeat_n(0x7fu8, 4096));
    }
    let _ = s.write_all(&out);
    drain(&mut s);
    Ok(())
}

#[test]
fn hostile_traffic_is_survived_counted_and_legitimate_requests_still_traced() -> Result<()> {
    let (go, go_port) = start_server("hostile-go", &tools::httpserver(GO_NEWEST)?)?;
    let (rust, rust_port) = start_server("hostile-rust", &tools::rust_svc()?)?;
    let grpc_port = free_port();
    let mut cmd = Command::new(tools::rust_svc()?);
    cmd.args(["grpc", &format!("127.0.0.1:{grpc_port}")]);
    let grpc = Proc::spawn("hostile-grpc", cmd)?;
    wait_for_port(grpc_port, Duration::from_secs(10))?;
    let rx = Receiver::start(Kind::Grpc, 0)?;
    let endpoint = rx.endpoint();
    let mut agent =
        Agent::start(&[go.pid(), rust.pid(), grpc.pid()], &["--otlp-endpoint", endpoint.as_str(), "--batch-delay", "200ms", "--profiles", "off"], &[])?;
    let apid = agent.proc.pid();
    let rss_start = rss_kib(apid);

    // Legitimate traffic all along, on both HTTP servers.
    let stop = Arc::new(AtomicBool::new(false));
    let legit = {
        let stop = stop.clone();
        std::thread::spawn(move || -> Result<usize> {
            let (mut g, mut r) = (Client::new(go_port), Client::new(rust_port));
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                ensure!(g.get(&format!("/users/legit-{n}"))?.status == 200, "Go server failed a legitimate request");
                ensure!(r.get(&format!("/hello?legit={n}"))?.status == 200, "Rust server failed a legitimate request");
                n += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(n)
        })
    };
    let lorises = [slowloris(go_port, 50, stop.clone()), slowloris(rust_port, 50, stop.clone())];
    let mut rss_max = rss_start;
    let mut sample = |what: &str| {
        let r = rss_kib(apid);
        rss_max = rss_max.max(r);
        eprintln!("after {what}: agent RSS {r} KiB");
    };
    for p in [go_port, rust_port] {
        huge_header(p)?;
        sample("a 1 MB header block");
        garbage(p)?;
        sample("64 KiB of garbage");
    }
    bad_hpack(grpc_port)?;
    bad_hpack(rust_port)?;
    sample("invalid HPACK");
    let mut answered = Vec::new();
    for p in [go_port, rust_port] {
        answered.push(pipelined(p, 10_000)?);
        sample("10,000 pipelined requests");
    }
    stop.store(true, Ordering::Relaxed);
    for l in lorises {
        let _ = l.join();
    }
    let legit_n = legit.join().expect("legitimate client")?;
    ensure!(agent.proc.child.try_wait()?.is_none(), "the agent died: {}", agent.proc.stderr_text());
    std::thread::sleep(Duration::from_secs(2));
    sample("the end");
    agent.stop()?;
    let log = agent.proc.stderr_text();
    ensure!(!log.contains("panicked"), "the agent panicked:\n{log}");
    let spans = rx.spans();
    let go_legit = spans.iter().filter(|s| s.kind == 2 && s.attr("url.path").starts_with("/users/legit-")).count();
    let rust_legit = spans.iter().filter(|s| s.kind == 2 && s.attr("url.path") == "/hello").count();
    eprintln!(
        "legitimate requests: {legit_n} per server; spans: Go {go_legit}, Rust {rust_legit}; pipelined answered {answered:?}; agent RSS {rss_start} KiB at start, {rss_max} KiB max; not HTTP {}, pipelined not captured {}, HTTP/2 directions unreadable {}",
        agent.stat("requests_not_http"),
        agent.stat("pipelined_requests_not_captured"),
        agent.stat("http2_directions_unreadable")
    );
    assert!(go_legit >= legit_n && rust_legit >= legit_n, "every legitimate request traced: {legit_n} made, Go {go_legit}, Rust {rust_legit}");
    assert!(rss_max <= rss_start + 64 * 1024, "agent RSS grew from {rss_start} to {rss_max} KiB");
    assert!(agent.stat("requests_not_http") > 0, "the garbage was counted");
    Ok(())
}
