//! `rsvc`: a Rust service for the end-to-end tests, written the way people write them
//! (tokio, axum, reqwest, hyper) and knowing nothing about tracing: no headers are propagated.
//!
//! Usage:
//!   rsvc ADDR [DOWNSTREAM_BASE_URL]   serve HTTP/1.1 on ADDR
//!   rsvc get URL COUNT [START_FILE]    COUNT GETs of URL followed by the request's number, on
//!                                      one keep-alive connection (once START_FILE exists)
//!
//! Routes: `/hello` answers "hello"; `/status/CODE` answers that status; `/chain/ID` calls
//! DOWNSTREAM/chain/ID and answers with its body (at the end of a chain: "leaf ID");
//! `/slow/MS` sleeps MS milliseconds.
use std::{net::SocketAddr, time::Duration};

use axum::{
    Router,
    extract::{Path, State},
    http::StatusCode,
    routing::get,
};

#[derive(Clone)]
struct App {
    down: Option<String>,
    client: reqwest::Client,
}

async fn hello() -> &'static str {
    "hello"
}

async fn status(Path(code): Path<u16>) -> (StatusCode, String) {
    let s = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST);
    (s, format!("status {}", s.as_u16()))
}

async fn slow(Path(ms): Path<u64>) -> String {
    tokio::time::sleep(Duration::from_millis(ms.min(10_000))).await;
    format!("slept {ms}")
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
    let app = App { down, client: reqwest::Client::new() };
    let router = Router::new()
        .route("/hello", get(hello))
        .route("/status/{code}", get(status))
        .route("/slow/{ms}", get(slow))
        .route("/chain/{id}", get(chain))
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
        let req = hyper::Request::get(format!("{path}{i}"))
            .header(hyper::header::HOST, authority)
            .body(Empty::<hyper::body::Bytes>::new())?;
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
                    eprintln!("rsvc get: {e}");
                    1
                }
            }
        }
        [addr, ref rest @ ..] if rest.len() <= 1 => {
            let Ok(addr) = addr.parse::<SocketAddr>() else {
                eprintln!("rsvc: {addr} is not an address (ip:port)");
                std::process::exit(2);
            };
            let down = rest.first().map(|d| d.trim_end_matches('/').to_owned());
            match rt.block_on(serve(addr, down)) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("rsvc: {e}");
                    1
                }
            }
        }
        _ => {
            eprintln!("usage: rsvc ADDR [DOWNSTREAM_BASE_URL] | rsvc get URL COUNT");
            2
        }
    };
    std::process::exit(code);
}
