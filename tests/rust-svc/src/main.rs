//! `rust-svc`: a Rust service for the end-to-end tests, written the way people write them
//! (tokio, axum, reqwest, hyper) and knowing nothing about tracing: no headers are propagated.
//!
//! Usage:
//!   rust-svc ADDR [DOWNSTREAM_BASE_URL]   serve HTTP/1.1 on ADDR (RUST_SVC_GRPC=URL: the gRPC
//!                                      service that `/grpc/ID` calls)
//!   rust-svc grpc ADDR                     serve the gRPC Echo service (h2c) on ADDR
//!   rust-svc threads ADDR DOWN_ADDR        a thread-per-connection HTTP/1.1 server (std only):
//!                                      `/chain/ID` waits 30 ms, then GETs DOWN_ADDR/chain/ID
//!   rust-svc grpc-call URL unary|stream N CONCURRENCY [START_FILE]
//!                                      N calls over one HTTP/2 connection, CONCURRENCY at
//!                                      a time: unary call i asks for status [0, 5, 13][i % 3],
//!                                      stream call i for 3 replies then [0, 14][i % 2];
//!                                      with RUST_SVC_WARM=1 one call is made on the connection
//!                                      before waiting for START_FILE; RUST_SVC_PAYLOAD=N adds N
//!                                      bytes to each unary request (echoed back)
//!   rust-svc get URL COUNT [START_FILE]    COUNT GETs of URL followed by the request's number, on
//!                                      one keep-alive connection (once START_FILE exists)
//!   rust-svc pipeline ADDR START_FILE REQ... once START_FILE exists, writes every REQ
//!                                      (`METHOD:PATH[:BODY]`) in one write on one
//!                                      connection (HTTP/1 pipelining), then reads the
//!                                      responses in order and prints "STATUS BODY" each
//!                                      (RUST_SVC_APART_MS=N: one write per request, N ms
//!                                      apart, still before reading any response)
//!
//! Routes: `/hello` answers "hello"; `/status/CODE` answers that status; `/chain/ID` calls
//! DOWNSTREAM/chain/ID and answers with its body (at the end of a chain: "leaf ID");
//! `/slow/MS` sleeps MS milliseconds; `/grpc/ID` makes a unary gRPC call (RUST_SVC_GRPC);
//! `POST /echo` answers its body (reading it makes hyper send 100 Continue when asked);
//! `GET /upgrade` switches the connection to a raw echo protocol (101).
use std::{net::SocketAddr, time::Duration};

use axum::{
    Router,
    extract::{Path, State},
    http::StatusCode,
    routing::get,
};

mod echo {
    tonic::include_proto!("zerotrace.test.v1");
}

use echo::{
    EchoReply, EchoRequest,
    echo_client::EchoClient,
    echo_server::{Echo, EchoServer},
};

#[derive(Clone)]
struct App {
    down: Option<String>,
    client: reqwest::Client,
    grpc: Option<EchoClient<tonic::transport::Channel>>,
}

/// The Echo service: answers, or fails with the status the caller asked for.
struct EchoService;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(&self, req: tonic::Request<EchoRequest>) -> Result<tonic::Response<EchoReply>, tonic::Status> {
        let r = req.into_inner();
        if r.code != 0 {
            return Err(tonic::Status::new(tonic::Code::from_i32(r.code), format!("asked for {}", r.code)));
        }
        // A failed call answers without the (possibly big) payload.
        Ok(tonic::Response::new(EchoReply { text: r.text }))
    }

    type StreamStream = tokio_stream::wrappers::ReceiverStream<Result<EchoReply, tonic::Status>>;

    async fn stream(&self, req: tonic::Request<EchoRequest>) -> Result<tonic::Response<Self::StreamStream>, tonic::Status> {
        let r = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            for i in 0..r.count {
                let _ = tx.send(Ok(EchoReply { text: format!("{} {i}", r.text) })).await;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            if r.code != 0 {
                let _ = tx.send(Err(tonic::Status::new(tonic::Code::from_i32(r.code), "asked"))).await;
            }
        });
        Ok(tonic::Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}

async fn grpc_call(State(app): State<App>, Path(id): Path<String>) -> (StatusCode, String) {
    let Some(mut c) = app.grpc.clone() else {
        return (StatusCode::NOT_FOUND, "no RUST_SVC_GRPC".into());
    };
    match c.unary(EchoRequest { text: id, code: 0, count: 0 }).await {
        Ok(r) => (StatusCode::OK, r.into_inner().text),
        Err(e) => (StatusCode::BAD_GATEWAY, format!("gRPC: {e}")),
    }
}

async fn serve_grpc(addr: SocketAddr) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder().add_service(EchoServer::new(EchoService).max_decoding_message_size(64 << 20)).serve(addr).await
}

/// N calls on one channel (one HTTP/2 connection), `concurrency` at a time, once `start`
/// exists (after one call when `warm`).
async fn grpc_calls(url: &str, stream: bool, n: u32, concurrency: u32, start: Option<&str>, warm: bool) -> Result<(), Box<dyn std::error::Error>> {
    let wait = || async {
        if let Some(file) = start {
            while !std::path::Path::new(file).exists() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    if !warm {
        wait().await;
    }
    // RUST_SVC_PAYLOAD=N: unary requests (and their echoes) carry N more bytes.
    let pad: usize = std::env::var("RUST_SVC_PAYLOAD").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())?.connect().await?;
    let client = EchoClient::new(channel).max_decoding_message_size(64 << 20);
    if warm {
        client.clone().unary(EchoRequest { text: "warm".into(), code: 0, count: 0 }).await?;
        println!("warm: done");
        wait().await;
    }
    let mut i = 0;
    while i < n {
        let batch: Vec<u32> = (i..(i + concurrency.max(1)).min(n)).collect();
        i += batch.len() as u32;
        let calls = batch.into_iter().map(|i| {
            let mut c = client.clone();
            async move {
                if stream {
                    let code = [0, 14][i as usize % 2];
                    match c.stream(EchoRequest { text: format!("s{i}"), code, count: 3 }).await {
                        Ok(r) => {
                            let mut s = r.into_inner();
                            let mut got = 0;
                            let end = loop {
                                match s.message().await {
                                    Ok(Some(_)) => got += 1,
                                    Ok(None) => break 0,
                                    Err(e) => break e.code() as i32,
                                }
                            };
                            (i, end, got)
                        }
                        Err(e) => (i, e.code() as i32, 0),
                    }
                } else {
                    let code = [0, 5, 13][i as usize % 3];
                    let text = format!("u{i}{}", "x".repeat(pad));
                    match c.unary(EchoRequest { text, code, count: 0 }).await {
                        Ok(_) => (i, 0, 1),
                        Err(e) => (i, e.code() as i32, 0),
                    }
                }
            }
        });
        for (i, code, got) in futures_join(calls).await {
            println!("{i}: status {code} replies {got}");
        }
    }
    Ok(())
}

/// Runs futures concurrently on this task and returns their results in order.
async fn futures_join<F: std::future::Future>(fs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut set = Vec::new();
    for f in fs {
        set.push(Box::pin(f));
    }
    let mut out: Vec<Option<F::Output>> = (0..set.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (k, f) in set.iter_mut().enumerate() {
            if out[k].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[k] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending { std::task::Poll::Pending } else { std::task::Poll::Ready(()) }
    })
    .await;
    out.into_iter().map(|v| v.expect("every future finished")).collect()
}

async fn hello() -> &'static str {
    "hello"
}

async fn status(Path(code): Path<u16>) -> (StatusCode, String) {
    let s = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST);
    (s, format!("status {}", s.as_u16()))
}

async fn echo_body(body: axum::body::Bytes) -> axum::body::Bytes {
    body
}

/// 101 Switching Protocols, then every byte received is sent back.
async fn upgrade(mut req: axum::extract::Request) -> axum::response::Response {
    let on = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(up) = on.await {
            let mut io = hyper_util::rt::TokioIo::new(up);
            let mut buf = [0u8; 1024];
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok(n) = io.read(&mut buf).await {
                if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    });
    axum::response::Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "upgrade")
        .header("upgrade", "echo")
        .body(axum::body::Body::empty())
        .expect("a valid response")
}

async fn slow(Path(ms): Path<u64>) -> String {
    tokio::time::sleep(Duration::from_millis(ms.min(10_000))).await;
    format!("slept {ms}")
}

/// CPU burn with a known call chain for the profiler tests: burn_outer -> burn_middle ->
/// burn_inner (the hot one), never inlined; the release build has no frame pointers.
#[inline(never)]
fn burn_inner(until: std::time::Instant) -> u64 {
    // Plain operators only (xorshift): no inlined helper becomes the hottest frame.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    while std::time::Instant::now() < until {
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
        }
    }
    x
}

#[inline(never)]
fn burn_middle(until: std::time::Instant) -> u64 {
    std::hint::black_box(burn_inner(until)).wrapping_add(1)
}

#[inline(never)]
fn burn_outer(ms: u64) -> u64 {
    let until = std::time::Instant::now() + Duration::from_millis(ms);
    std::hint::black_box(burn_middle(until)).wrapping_add(2)
}

/// Burns ms of CPU in the handler (on a tokio worker).
async fn burn(Path(ms): Path<u64>) -> String {
    format!("burned {}", burn_outer(ms.min(10_000)) & 1)
}

async fn chain(State(app): State<App>, Path(id): Path<String>) -> (StatusCode, String) {
    let Some(down) = &app.down else {
        return (StatusCode::OK, format!("leaf {id}"));
    };
    match app.client.get(format!("{down}/chain/{id}")).send().await {
        Ok(r) => {
            let code = r.status();
            let body = r.text().await.unwrap_or_default();
            (if code.is_success() { StatusCode::OK } else { StatusCode::BAD_GATEWAY }, body)
        }
        Err(e) => (StatusCode::BAD_GATEWAY, format!("downstream: {e}")),
    }
}

async fn serve(addr: SocketAddr, down: Option<String>) -> std::io::Result<()> {
    let grpc = std::env::var("RUST_SVC_GRPC")
        .ok()
        .map(|u| EchoClient::new(tonic::transport::Endpoint::from_shared(u).expect("RUST_SVC_GRPC is a URL").connect_lazy()));
    let app = App { down, client: reqwest::Client::new(), grpc };
    let router = Router::new()
        .route("/hello", get(hello))
        .route("/status/{code}", get(status))
        .route("/slow/{ms}", get(slow))
        .route("/burn/{ms}", get(burn))
        .route("/chain/{id}", get(chain))
        .route("/grpc/{id}", get(grpc_call))
        .route("/echo", axum::routing::post(echo_body))
        .route("/upgrade", get(upgrade))
        .with_state(app);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, router).await
}

/// COUNT requests one after another on ONE connection (hyper's connection API: a pooled
/// client may open more than one).
async fn get_many(url: &str, count: u32) -> Result<(), Box<dyn std::error::Error>> {
    use http_body_util::{BodyExt, Empty};
    let rest = url.strip_prefix("http://").ok_or("only http:// URLs")?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let stream = tokio::net::TcpStream::connect(authority).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    for i in 0..count {
        let req = hyper::Request::get(format!("{path}{i}")).header(hyper::header::HOST, authority).body(Empty::<hyper::body::Bytes>::new())?;
        sender.ready().await?;
        let r = sender.send_request(req).await?;
        let code = r.status();
        r.into_body().collect().await?;
        if i == 0 || i + 1 == count {
            println!("{i}: {}", code.as_u16());
        }
    }
    Ok(())
}

/// The thread-per-connection server: one OS thread per connection, blocking I/O, the way
/// std-only or servlet-style servers work.
fn serve_threads(addr: &str, down: &str) -> std::io::Result<()> {
    let listener = std::net::TcpListener::bind(addr)?;
    for conn in listener.incoming() {
        let (Ok(conn), down) = (conn, down.to_owned()) else { continue };
        std::thread::spawn(move || {
            let _ = serve_thread_conn(conn, &down);
        });
    }
    Ok(())
}

fn serve_thread_conn(conn: std::net::TcpStream, down: &str) -> std::io::Result<()> {
    use std::io::{BufRead, Read, Write};
    let mut r = std::io::BufReader::new(conn.try_clone()?);
    let mut w = conn;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
        loop {
            let mut h = String::new();
            if r.read_line(&mut h)? == 0 || h.trim_end().is_empty() {
                break;
            }
        }
        let body = match path.strip_prefix("/chain/") {
            Some(id) => {
                std::thread::sleep(Duration::from_millis(30));
                let mut d = std::net::TcpStream::connect(down)?;
                write!(d, "GET /chain/{id} HTTP/1.1\r\nHost: {down}\r\nConnection: close\r\n\r\n")?;
                let mut all = Vec::new();
                d.read_to_end(&mut all)?;
                let text = String::from_utf8_lossy(&all).into_owned();
                text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default()
            }
            None => "hello".to_owned(),
        };
        write!(w, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len())?;
    }
}

/// HTTP/1 pipelining by hand (no common client does it): all requests in one write, then
/// the responses (Content-Length framed) read back in order.
fn pipeline(addr: &str, reqs: &[&str]) -> std::io::Result<()> {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let apart = std::env::var("RUST_SVC_APART_MS").ok().and_then(|v| v.parse::<u64>().ok());
    let mut batch = Vec::new();
    for (i, r) in reqs.iter().enumerate() {
        if let (Some(ms), true) = (apart, i > 0) {
            s.write_all(&batch)?;
            batch.clear();
            std::thread::sleep(Duration::from_millis(ms));
        }
        let mut parts = r.splitn(3, ':');
        let (method, path, body) = (parts.next().unwrap_or("GET"), parts.next().unwrap_or("/"), parts.next());
        write!(batch, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n")?;
        if let Some(b) = body {
            write!(batch, "Content-Length: {}\r\n", b.len())?;
        }
        batch.extend_from_slice(b"\r\n");
        batch.extend_from_slice(body.unwrap_or("").as_bytes());
    }
    s.write_all(&batch)?;
    let mut r = BufReader::new(s);
    for _ in reqs {
        let mut line = String::new();
        r.read_line(&mut line)?;
        let status = line.split_whitespace().nth(1).unwrap_or("?").to_owned();
        let mut len = 0;
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some(v) = l.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body)?;
        println!("{status} {}", String::from_utf8_lossy(&body).trim_end());
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
    let code = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["get", url, count, ref start @ ..] if start.len() <= 1 => {
            let count: u32 = count.parse().unwrap_or(1);
            if let Some(file) = start.first() {
                while !std::path::Path::new(file).exists() {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            match rt.block_on(get_many(url, count)) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("rust-svc get: {e}");
                    1
                }
            }
        }
        ["pipeline", addr, start, ref reqs @ ..] if !reqs.is_empty() => {
            while !std::path::Path::new(start).exists() {
                std::thread::sleep(Duration::from_millis(10));
            }
            match pipeline(addr, reqs) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("rust-svc pipeline: {e}");
                    1
                }
            }
        }
        ["burn", secs] => {
            println!("burning pid={}", std::process::id());
            let secs: u64 = secs.parse().unwrap_or(10);
            burn_outer(secs * 1000);
            0
        }
        ["threads", addr, down] => match serve_threads(addr, down) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("rust-svc threads: {e}");
                1
            }
        },
        ["grpc", addr] => {
            let Ok(addr) = addr.parse::<SocketAddr>() else {
                eprintln!("rust-svc: {addr} is not an address (ip:port)");
                std::process::exit(2);
            };
            match rt.block_on(serve_grpc(addr)) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("rust-svc grpc: {e}");
                    1
                }
            }
        }
        ["grpc-call", url, kind @ ("unary" | "stream"), n, concurrency, ref start @ ..] if start.len() <= 1 => {
            let (n, c) = (n.parse().unwrap_or(1), concurrency.parse().unwrap_or(1));
            let warm = std::env::var_os("RUST_SVC_WARM").is_some();
            match rt.block_on(grpc_calls(url, kind == "stream", n, c, start.first().copied(), warm)) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("rust-svc grpc-call: {e}");
                    1
                }
            }
        }
        [addr, ref rest @ ..] if rest.len() <= 1 => {
            let Ok(addr) = addr.parse::<SocketAddr>() else {
                eprintln!("rust-svc: {addr} is not an address (ip:port)");
                std::process::exit(2);
            };
            let down = rest.first().map(|d| d.trim_end_matches('/').to_owned());
            match rt.block_on(serve(addr, down)) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("rust-svc: {e}");
                    1
                }
            }
        }
        _ => {
            eprintln!(
                "usage: rust-svc ADDR [DOWNSTREAM_BASE_URL] | rust-svc get URL COUNT [START_FILE] | rust-svc grpc ADDR | rust-svc threads ADDR DOWN_ADDR | rust-svc burn SECS | rust-svc grpc-call URL unary|stream N CONCURRENCY [START_FILE] | rust-svc pipeline ADDR START_FILE METHOD:PATH[:BODY]..."
            );
            2
        }
    };
    std::process::exit(code);
}
