//! A small HTTP/1.1 client for driving test services: keep-alive by default, and it times
//! each exchange from its first byte written to its last byte read, the numbers the
//! agent's span durations are checked against.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    /// From the first byte written to the last byte read.
    pub elapsed: Duration,
    /// Local port of the connection used (to tell connections apart).
    pub local_port: u16,
}

pub struct Client {
    port: u16,
    conn: Option<BufReader<TcpStream>>,
    pub user_agent: String,
}

impl Client {
    pub fn new(port: u16) -> Self {
        Client { port, conn: None, user_agent: "zerotrace-e2e/1".into() }
    }

    /// Opens the connection now (e.g. before the agent starts).
    pub fn connect(&mut self) -> Result<u16> {
        let s = TcpStream::connect(("127.0.0.1", self.port)).context("connect")?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let port = s.local_addr()?.port();
        self.conn = Some(BufReader::new(s));
        Ok(port)
    }

    pub fn get(&mut self, path: &str) -> Result<Response> {
        self.request("GET", path, &[])
    }

    pub fn request(&mut self, method: &str, path: &str, headers: &[(&str, &str)]) -> Result<Response> {
        if self.conn.is_none() {
            self.connect()?;
        }
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nUser-Agent: {}\r\n", self.port, self.user_agent);
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        // Every request carries planted credentials (after the caller's own headers), which
        // nothing exported may contain (`secrets`).
        for (k, v) in crate::secrets::HEADERS {
            if !headers.iter().any(|(h, _)| h.eq_ignore_ascii_case(k)) {
                req.push_str(&format!("{k}: {v}\r\n"));
            }
        }
        req.push_str("\r\n");
        let conn = self.conn.as_mut().expect("connected");
        let local_port = conn.get_ref().local_addr()?.port();
        let start = Instant::now();
        conn.get_mut().write_all(req.as_bytes())?;
        let (status, body, close) = read_response(conn)?;
        let elapsed = start.elapsed();
        if close {
            self.conn = None;
        }
        Ok(Response { status, body, elapsed, local_port })
    }

    /// Ends the connection with a reset (RST, SO_LINGER 0) instead of a FIN: the server's
    /// socket goes straight to CLOSE while the server may still read it.
    pub fn reset(&mut self) -> Result<()> {
        use std::os::fd::AsRawFd;
        let Some(conn) = self.conn.take() else { return Ok(()) };
        set_zero_linger(conn.get_ref().as_raw_fd())?;
        drop(conn);
        Ok(())
    }
}

/// SO_LINGER 0 on socket `fd`: closing it sends a reset (RST) instead of a FIN.
pub fn set_zero_linger(fd: std::os::fd::RawFd) -> Result<()> {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt on a socket the caller owns, with a value of the size given.
    let rc = unsafe {
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_LINGER, (&linger as *const libc::linger).cast(), std::mem::size_of::<libc::linger>() as libc::socklen_t)
    };
    if rc != 0 {
        bail!("SO_LINGER: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn read_response(r: &mut BufReader<TcpStream>) -> Result<(u16, Vec<u8>, bool)> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).with_context(|| format!("bad status line {line:?}"))?;
    let mut len = None;
    let mut chunked = false;
    let mut close = false;
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            bail!("connection closed inside the response head");
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').unwrap_or((l, ""));
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        match k.as_str() {
            "content-length" => len = v.parse::<usize>().ok(),
            "transfer-encoding" => chunked = v.eq_ignore_ascii_case("chunked"),
            "connection" => close = v.eq_ignore_ascii_case("close"),
            _ => {}
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let n = usize::from_str_radix(line.trim().split(';').next().unwrap_or("0"), 16)?;
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk)?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(n) = len {
        body.resize(n, 0);
        r.read_exact(&mut body)?;
    } else {
        r.read_to_end(&mut body)?;
        close = true;
    }
    Ok((status, body, close))
}
