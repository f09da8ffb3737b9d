//! An HTTP/1.1 load generator that knows exactly how many requests the server answered:
//! keep-alive connections on one tokio thread (as cheap per request as wrk), each writing a
//! request and reading its whole response before the next. At the deadline no new request
//! is written and every request in flight is read to its end, so `requests` is the number
//! of requests the server served, not an estimate (wrk stops with requests in flight).
//! Closed loop (`saturate`: as fast as the server answers) or open loop (`at_rate`).
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// What one load run did.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    /// Responses read to their end (= requests the server served).
    pub requests: u64,
    /// Requests written whose response never came (connection reset or closed): the server
    /// may or may not have served them.
    pub errors: u64,
    /// Responses with a status other than 2xx (counted in `requests` too).
    pub non_2xx: u64,
    /// Requests per connection, and each connection's local port.
    pub per_conn: Vec<(u16, u64)>,
    pub elapsed: Duration,
    /// Requests an open-loop run was behind its schedule at the end (the server or this
    /// generator could not keep up).
    pub behind: u64,
}

impl LoadReport {
    pub fn rate(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// `conns` connections to 127.0.0.1:`port`, each sending GET `path` as soon as the previous
/// response was read, for `duration`.
pub fn saturate(port: u16, path: &str, conns: usize, duration: Duration) -> Result<LoadReport> {
    run(port, path, conns, duration, None)
}

/// The same at a fixed total `rate` (requests per second, spread over the connections;
/// a request whose time came while its connection was busy goes as soon as it is free).
pub fn at_rate(port: u16, path: &str, conns: usize, rate: f64, duration: Duration) -> Result<LoadReport> {
    run(port, path, conns, duration, Some(rate))
}

fn run(port: u16, path: &str, conns: usize, duration: Duration, rate: Option<f64>) -> Result<LoadReport> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let start = Instant::now();
        let end = start + duration;
        let request = request_bytes(port, path);
        let mut tasks = tokio::task::JoinSet::new();
        for c in 0..conns {
            let request = request.clone();
            // Open loop: connection c sends at start + offset + k * interval.
            let schedule = rate.map(|r| {
                let interval = Duration::from_secs_f64(conns as f64 / r);
                (interval, interval.mul_f64(c as f64 / conns as f64))
            });
            tasks.spawn(async move { connection(port, request, start, end, schedule).await });
        }
        let mut report = LoadReport::default();
        while let Some(r) = tasks.join_next().await {
            let one = r.context("load task")??;
            report.requests += one.requests;
            report.errors += one.errors;
            report.non_2xx += one.non_2xx;
            report.behind += one.behind;
            report.per_conn.extend(one.per_conn);
        }
        report.elapsed = start.elapsed().min(duration.max(Duration::from_millis(1)));
        Ok(report)
    })
}

async fn connection(port: u16, request: Vec<u8>, start: Instant, end: Instant, schedule: Option<(Duration, Duration)>) -> Result<LoadReport> {
    let mut out = LoadReport::default();
    let mut stream: Option<(TcpStream, u16)> = None;
    let mut buf = Vec::with_capacity(4096);
    let mut on_port = 0u64;
    let mut k = 0u32;
    loop {
        if let Some((interval, offset)) = schedule {
            let due = start + offset + interval * k;
            if due >= end {
                break;
            }
            let now = Instant::now();
            if due > now {
                tokio::time::sleep(due - now).await;
            }
            k += 1;
        } else if Instant::now() >= end {
            break;
        }
        if stream.is_none() {
            let s = TcpStream::connect(("127.0.0.1", port)).await.context("connecting to the service under load")?;
            s.set_nodelay(true)?;
            let local = s.local_addr()?.port();
            stream = Some((s, local));
            buf.clear();
        }
        let (s, local) = stream.as_mut().expect("connected");
        let local = *local;
        let done = async {
            s.write_all(&request).await?;
            read_response(s, &mut buf).await
        };
        match tokio::time::timeout(Duration::from_secs(30), done).await {
            Ok(Ok((status, keep))) => {
                out.requests += 1;
                on_port += 1;
                if !(200..300).contains(&status) {
                    out.non_2xx += 1;
                }
                if !keep {
                    out.per_conn.push((local, std::mem::take(&mut on_port)));
                    stream = None;
                }
            }
            Ok(Err(_)) | Err(_) => {
                out.errors += 1;
                out.per_conn.push((local, std::mem::take(&mut on_port)));
                stream = None;
            }
        }
    }
    if let Some((_, local)) = stream {
        out.per_conn.push((local, on_port));
    }
    if let Some((interval, offset)) = schedule {
        let scheduled = ((end - start).saturating_sub(offset).as_secs_f64() / interval.as_secs_f64()).ceil() as u64;
        out.behind = scheduled.saturating_sub(u64::from(k));
    }
    Ok(out)
}

/// Reads one response (head, then a Content-Length or chunked body) from `s`; `buf` keeps
/// bytes read past it. Returns the status and whether the connection stays open.
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(u16, bool)> {
    let head_end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i + 4;
        }
        fill(s, buf).await?;
    };
    let head = std::str::from_utf8(&buf[..head_end]).context("response head is not text")?;
    let status: u16 = head.split_whitespace().nth(1).and_then(|v| v.parse().ok()).with_context(|| format!("bad status line in {head:?}"))?;
    let (mut len, mut chunked, mut keep) = (None, false, true);
    for line in head.lines().skip(1) {
        let Some((k, v)) = line.split_once(':') else { continue };
        let (k, v) = (k.trim(), v.trim());
        if k.eq_ignore_ascii_case("content-length") {
            len = v.parse::<usize>().ok();
        } else if k.eq_ignore_ascii_case("transfer-encoding") {
            chunked = v.eq_ignore_ascii_case("chunked");
        } else if k.eq_ignore_ascii_case("connection") {
            keep = !v.eq_ignore_ascii_case("close");
        }
    }
    buf.drain(..head_end);
    if chunked {
        loop {
            let line_end = loop {
                if let Some(i) = find(buf, b"\r\n") {
                    break i;
                }
                fill(s, buf).await?;
            };
            let size = usize::from_str_radix(std::str::from_utf8(&buf[..line_end])?.split(';').next().unwrap_or("").trim(), 16)?;
            let need = line_end + 2 + size + 2;
            while buf.len() < need {
                fill(s, buf).await?;
            }
            buf.drain(..need);
            if size == 0 {
                break;
            }
        }
    } else if let Some(n) = len {
        while buf.len() < n {
            fill(s, buf).await?;
        }
        buf.drain(..n);
    } else if (100..200).contains(&status) || status == 204 || status == 304 {
    } else {
        bail!("a response without a length (this generator needs Content-Length or chunked)");
    }
    Ok((status, keep))
}

async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<()> {
    let mut tmp = [0u8; 4096];
    let n = s.read(&mut tmp).await?;
    if n == 0 {
        bail!("connection closed by the server");
    }
    buf.extend_from_slice(&tmp[..n]);
    Ok(())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Connection churn: `total` short connections to 127.0.0.1:`port`, `parallel` at a time,
/// each sending one GET `path`, reading the response and closing; every fourth ends with a
/// reset (SO_LINGER 0) instead of a FIN. `per_conn` holds each connection's local port and
/// whether it was answered (1) or not (0).
pub fn churn(port: u16, path: &str, parallel: usize, total: usize) -> Result<LoadReport> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let start = Instant::now();
        let request = request_bytes(port, path);
        let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..parallel {
            let (request, next) = (request.clone(), next.clone());
            tasks.spawn(async move {
                let mut out = LoadReport::default();
                let mut buf = Vec::with_capacity(1024);
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= total {
                        return Ok::<_, anyhow::Error>(out);
                    }
                    let s = TcpStream::connect(("127.0.0.1", port)).await.context("connecting to the service under churn")?;
                    let local = s.local_addr()?.port();
                    if i % 4 == 3 {
                        crate::http::set_zero_linger(std::os::fd::AsRawFd::as_raw_fd(&s))?;
                    }
                    let mut s = s;
                    buf.clear();
                    let done = async {
                        s.write_all(&request).await?;
                        read_response(&mut s, &mut buf).await
                    };
                    match tokio::time::timeout(Duration::from_secs(30), done).await {
                        Ok(Ok((status, _))) => {
                            out.requests += 1;
                            if !(200..300).contains(&status) {
                                out.non_2xx += 1;
                            }
                            out.per_conn.push((local, 1));
                        }
                        Ok(Err(_)) | Err(_) => {
                            out.errors += 1;
                            out.per_conn.push((local, 0));
                        }
                    }
                }
            });
        }
        let mut report = LoadReport::default();
        while let Some(r) = tasks.join_next().await {
            let one = r.context("churn task")??;
            report.requests += one.requests;
            report.errors += one.errors;
            report.non_2xx += one.non_2xx;
            report.per_conn.extend(one.per_conn);
        }
        report.elapsed = start.elapsed();
        Ok(report)
    })
}

/// GET `path` with the planted credentials every test request carries (`secrets`).
fn request_bytes(port: u16, path: &str) -> Vec<u8> {
    let mut r = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: zerotrace-load/1\r\n");
    for (k, v) in crate::secrets::HEADERS {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str("\r\n");
    r.into_bytes()
}
