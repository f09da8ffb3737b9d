//! HTTP/1.x request heads and status lines, from the first bytes of a request or response.
//! A head cut off by the capture size still yields its request line and complete headers.
//! Fields borrow from the captured bytes (no copies on the hot path).
use std::borrow::Cow;

/// What the span needs from a request head.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestHead<'a> {
    pub method: Cow<'a, str>,
    /// Request target as sent (origin form: path and query).
    pub target: Cow<'a, str>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    pub host: Option<Cow<'a, str>>,
    pub user_agent: Option<Cow<'a, str>>,
    pub traceparent: Option<Cow<'a, str>>,
    pub tracestate: Option<Cow<'a, str>>,
    pub content_length: Option<u64>,
    /// The capture ended inside the head: some headers may be missing.
    pub truncated: bool,
}

impl RequestHead<'_> {
    /// Path part of the target (before '?'), for `url.path`.
    pub fn path(&self) -> &str {
        let t: &str = &self.target;
        let t = t.split(['?', '#']).next().unwrap_or(t);
        // Absolute form (proxies): keep only the path.
        if let Some(rest) = t.strip_prefix("http://").or_else(|| t.strip_prefix("https://")) {
            return rest.find('/').map_or("/", |i| &rest[i..]);
        }
        t
    }
}

const MAX_HEADERS: usize = 96;

/// The method of the request head in `buf` (its first token, after the empty lines a
/// request line may follow), without parsing the rest: what a response's framing needs to
/// know of its request (whether it was HEAD). None when `buf` starts with no token and a
/// space.
pub fn request_method(buf: &[u8]) -> Option<&str> {
    let start = buf.iter().position(|&b| b != b'\r' && b != b'\n')?;
    let rest = &buf[start..];
    let end = rest.iter().position(|&b| b == b' ')?;
    let token = &rest[..end];
    // RFC 9110 tchar.
    let tchar = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b);
    if token.is_empty() || !token.iter().all(tchar) {
        return None;
    }
    std::str::from_utf8(token).ok()
}

/// Parses a request head from captured bytes; None when the bytes are not an HTTP/1 request.
pub fn parse_request(buf: &[u8]) -> Option<RequestHead<'_>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(_)) => Some(from_parsed(&req, false)),
        Ok(httparse::Status::Partial) => {
            // Cut at the last complete line and close the head there (rare: owned copies).
            let method = req.method?.to_owned();
            let target = req.path?.to_owned();
            let minor = req.version.unwrap_or(1);
            let cut = last_crlf(buf)?;
            let mut closed = buf[..cut + 2].to_vec();
            closed.extend_from_slice(b"\r\n");
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut again = httparse::Request::new(&mut headers);
            match again.parse(&closed) {
                Ok(httparse::Status::Complete(_)) => Some(into_owned(from_parsed(&again, true))),
                _ => Some(RequestHead { method: Cow::Owned(method), target: Cow::Owned(target), minor_version: minor, truncated: true, ..Default::default() }),
            }
        }
        Err(_) => None,
    }
}

fn into_owned(h: RequestHead<'_>) -> RequestHead<'static> {
    let own = |c: Cow<'_, str>| Cow::Owned(c.into_owned());
    RequestHead {
        method: own(h.method),
        target: own(h.target),
        minor_version: h.minor_version,
        host: h.host.map(own),
        user_agent: h.user_agent.map(own),
        traceparent: h.traceparent.map(own),
        tracestate: h.tracestate.map(own),
        content_length: h.content_length,
        truncated: h.truncated,
    }
}

fn last_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).rposition(|w| w == b"\r\n")
}

fn from_parsed<'b>(req: &httparse::Request<'_, 'b>, truncated: bool) -> RequestHead<'b> {
    let mut h = RequestHead {
        method: Cow::Borrowed(req.method.unwrap_or_default()),
        target: Cow::Borrowed(req.path.unwrap_or_default()),
        minor_version: req.version.unwrap_or(1),
        truncated,
        ..Default::default()
    };
    for hdr in req.headers.iter() {
        let value = || match String::from_utf8_lossy(hdr.value) {
            Cow::Borrowed(s) => Cow::Borrowed(s.trim()),
            Cow::Owned(s) => Cow::Owned(s.trim().to_owned()),
        };
        let name = hdr.name;
        if name.eq_ignore_ascii_case("host") {
            h.host = Some(value());
        } else if name.eq_ignore_ascii_case("user-agent") {
            h.user_agent = Some(value());
        } else if name.eq_ignore_ascii_case("traceparent") {
            h.traceparent = Some(value());
        } else if name.eq_ignore_ascii_case("tracestate") {
            h.tracestate = Some(value());
        } else if name.eq_ignore_ascii_case("content-length") {
            h.content_length = std::str::from_utf8(hdr.value).ok().and_then(|v| v.trim().parse().ok());
        }
    }
    h
}

/// Status code from the start of a response ("HTTP/1.1 503 ..."), None if it is not one.
pub fn parse_status(buf: &[u8]) -> Option<u16> {
    let rest = buf.strip_prefix(b"HTTP/1.")?;
    let rest = rest.get(1..)?;
    let rest = rest.strip_prefix(b" ")?;
    let digits = rest.get(..3)?;
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Where a response's body ends (RFC 9112 section 6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    /// No body: a response to HEAD, or 1xx/204/304.
    Empty,
    /// `Content-Length` bytes after the head.
    Length(u64),
    /// Chunked: ends with the last chunk ("0\r\n\r\n", trailers aside).
    Chunked,
    /// Neither: the body ends when the connection closes.
    UntilClose,
}

/// What a client needs from the first bytes of a response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub minor_version: u8,
    /// Bytes of the head (status line, headers, blank line); None when the captured bytes
    /// end inside it (then `body` is unknown).
    pub head_len: Option<usize>,
    pub body: Option<Body>,
}

/// Parses the start of a response to a request with method `method`. An interim 1xx
/// response (100 Continue) followed by the final one in the same bytes is skipped.
pub fn parse_response(buf: &[u8], method: &str) -> Option<ResponseHead> {
    let mut at = 0;
    // A few interim responses at most: each is at least 18 bytes.
    for _ in 0..4 {
        let bytes = &buf[at..];
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(bytes) {
            Ok(httparse::Status::Complete(n)) => {
                let status = resp.code?;
                if (100..200).contains(&status) && status != 101 && n < bytes.len() {
                    at += n;
                    continue;
                }
                let mut length = None;
                let mut chunked = false;
                for h in resp.headers.iter() {
                    if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        chunked = h.value.split(|&c| c == b',').next_back().is_some_and(|v| v.trim_ascii().eq_ignore_ascii_case(b"chunked"));
                    } else if h.name.eq_ignore_ascii_case("content-length") {
                        length = std::str::from_utf8(h.value).ok().and_then(|v| v.trim().parse::<u64>().ok());
                    }
                }
                let body = if method.eq_ignore_ascii_case("HEAD") || (100..200).contains(&status) || status == 204 || status == 304 {
                    Body::Empty
                } else if chunked {
                    Body::Chunked
                } else if let Some(l) = length {
                    Body::Length(l)
                } else {
                    Body::UntilClose
                };
                return Some(ResponseHead { status, minor_version: resp.version.unwrap_or(1), head_len: Some(at + n), body: Some(body) });
            }
            Ok(httparse::Status::Partial) => {
                let status = parse_status(bytes)?;
                return Some(ResponseHead { status, minor_version: u8::from(bytes.get(7) != Some(&b'0')), head_len: None, body: None });
            }
            Err(_) => return None,
        }
    }
    None
}

/// Where the request after the first one in `buf` starts, when `buf` holds all of the
/// first (head, and a Content-Length or chunked body) and the start of another: requests
/// that came pipelined, several in one read or write. None otherwise.
pub fn next_request(buf: &[u8]) -> Option<usize> {
    // Most captures end with their head (no body, nothing after): found without parsing.
    let end = memchr::memmem::find(buf, b"\r\n\r\n")?;
    if end + 4 >= buf.len() {
        return None;
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(n) = req.parse(buf).ok()? else { return None };
    let mut length = 0u64;
    let mut chunked = false;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = h.value.split(|&c| c == b',').next_back().is_some_and(|v| v.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if h.name.eq_ignore_ascii_case("content-length") {
            length = std::str::from_utf8(h.value).ok()?.trim().parse().ok()?;
        }
    }
    let body = if chunked { chunked_len(&buf[n..])? } else { usize::try_from(length).ok()? };
    let end = n.checked_add(body)?;
    starts_request(buf.get(end..)?).then_some(end)
}

/// Whether `b` starts like a request line: an upper-case method of 3 to 16 letters (or '-')
/// and a space.
fn starts_request(b: &[u8]) -> bool {
    let n = b.iter().take(17).position(|&c| c == b' ');
    n.is_some_and(|n| n >= 3 && b[..n].iter().all(|&c| c.is_ascii_uppercase() || c == b'-'))
}

/// Bytes of the chunked body at the start of `body` (through the last chunk and the
/// trailer section), when all of it is there.
pub fn chunked_len(body: &[u8]) -> Option<usize> {
    let mut at = 0usize;
    loop {
        let httparse::Status::Complete((n, size)) = httparse::parse_chunk_size(body.get(at..)?).ok()? else { return None };
        at = at.checked_add(n)?;
        if size == 0 {
            // Trailer fields, then an empty line.
            loop {
                let rest = body.get(at..)?;
                let line = rest.windows(2).position(|w| w == b"\r\n")?;
                at += line + 2;
                if line == 0 {
                    return Some(at);
                }
            }
        }
        at = at.checked_add(usize::try_from(size).ok()?)?;
        if body.get(at..at.checked_add(2)?)? != b"\r\n" {
            return None;
        }
        at += 2;
    }
}

/// The method if it is one OpenTelemetry knows by name (others are reported as "_OTHER").
pub fn known_method(m: &str) -> Option<&'static str> {
    Some(match m {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "CONNECT" => "CONNECT",
        "OPTIONS" => "OPTIONS",
        "TRACE" => "TRACE",
        "PATCH" => "PATCH",
        "QUERY" => "QUERY",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_method_is_the_first_token() {
        assert_eq!(request_method(b"HEAD /x HTTP/1.1\r\nhost: a\r\n\r\n"), Some("HEAD"));
        assert_eq!(request_method(b"\r\nGET / HTTP/1.1\r\n"), Some("GET"));
        // A head cut short before its first line ended still names its method (parse_request
        // gives None there, which used to frame a HEAD's response as if it had a body).
        assert_eq!(request_method(b"HEAD /a HT"), Some("HEAD"));
        assert!(parse_request(b"HEAD /a HT").is_none());
        for bad in [&b""[..], b"GET", b" GET / HTTP/1.1", b"G(T / HTTP/1.1", b"\x16\x03\x01 hello"] {
            assert_eq!(request_method(bad), None, "{bad:?}");
        }
        let head = b"DELETE /a HTTP/1.1\r\n\r\n";
        assert_eq!(request_method(head), parse_request(head).map(|h| h.method.into_owned()).as_deref());
    }

    #[test]
    fn response_framing() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello", "GET").unwrap();
        assert_eq!((r.status, r.head_len, r.body), (200, Some(38), Some(Body::Length(5))));
        let r = parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n", "GET").unwrap();
        assert_eq!(r.body, Some(Body::Chunked));
        let r = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", "HEAD").unwrap();
        assert_eq!(r.body, Some(Body::Empty));
        let r = parse_response(b"HTTP/1.0 404 Not Found\r\n\r\n", "GET").unwrap();
        assert_eq!((r.status, r.minor_version, r.body), (404, 0, Some(Body::UntilClose)));
        let r = parse_response(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n", "POST").unwrap();
        assert_eq!((r.status, r.head_len, r.body), (201, Some(25 + 43), Some(Body::Length(0))));
        let r = parse_response(b"HTTP/1.1 503 Service Unavailable\r\ncontent-le", "GET").unwrap();
        assert_eq!((r.status, r.head_len, r.body), (503, None, None));
        assert_eq!(parse_response(b"SSH-2.0-OpenSSH\r\n", "GET"), None);
        // A header block that claims a huge body is only a number.
        let r = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 18446744073709551615\r\n\r\n", "GET").unwrap();
        assert_eq!(r.body, Some(Body::Length(u64::MAX)));
    }

    #[test]
    fn pipelined_requests_are_found_after_the_first() {
        let two = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\n\r\n";
        assert_eq!(next_request(two), Some(28));
        let body = b"POST /a HTTP/1.1\r\nContent-Length: 6\r\n\r\nGET /xGET /b HTTP/1.1\r\n\r\n";
        assert_eq!(&body[next_request(body).unwrap()..][..6], b"GET /b", "the body is skipped, even when it looks like a request");
        let chunked = b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\nT: 1\r\n\r\nDELETE /b HTTP/1.1\r\n\r\n";
        assert_eq!(&chunked[next_request(chunked).unwrap()..][..9], b"DELETE /b");
        // Only one request, the body cut by the capture, or garbage after it: none.
        assert_eq!(next_request(b"GET /a HTTP/1.1\r\n\r\n"), None);
        assert_eq!(next_request(b"POST /a HTTP/1.1\r\nContent-Length: 50\r\n\r\nGET / HTTP/1.1\r\n\r\n"), None);
        assert_eq!(next_request(b"GET /a HTTP/1.1\r\n\r\n\x16\x03\x01"), None);
        assert_eq!(next_request(b"GET /a HTTP/1.1\r\nContent-Length: 18446744073709551615\r\n\r\nGET"), None);
    }

    #[test]
    fn chunked_bodies_are_measured_when_all_there() {
        assert_eq!(chunked_len(b"5\r\nhello\r\n0\r\n\r\nHTTP/1.1"), Some(15));
        assert_eq!(chunked_len(b"5\r\nhello\r\n"), None);
        assert_eq!(chunked_len(b"ffffffffffffffff\r\nab"), None);
        assert_eq!(chunked_len(b"5\r\nhelloXX0\r\n\r\n"), None);
    }

    #[test]
    fn complete_head() {
        let h = parse_request(b"GET /users/42?x=1 HTTP/1.1\r\nHost: api:8080\r\nUser-Agent: curl/8.0\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\nbody").unwrap();
        assert_eq!(h.method, "GET");
        assert_eq!(h.target, "/users/42?x=1");
        assert_eq!(h.path(), "/users/42");
        assert_eq!(h.host.as_deref(), Some("api:8080"));
        assert_eq!(h.user_agent.as_deref(), Some("curl/8.0"));
        assert!(h.traceparent.is_some());
        assert!(!h.truncated);
    }

    #[test]
    fn truncated_head_keeps_complete_lines() {
        let h = parse_request(b"POST /upload HTTP/1.1\r\nUser-Agent: wrk\r\nContent-Length: 12\r\nX-Long: aaaaaaa").unwrap();
        assert_eq!(h.method, "POST");
        assert_eq!(h.path(), "/upload");
        assert_eq!(h.user_agent.as_deref(), Some("wrk"));
        assert_eq!(h.content_length, Some(12));
        assert!(h.truncated);
        // Cut inside the request line: not enough to say anything.
        assert!(parse_request(b"GET /very/long/pa").is_none());
    }

    #[test]
    fn not_http() {
        assert!(parse_request(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03").is_none());
        // The HTTP/2 preface is not an HTTP/1 request.
        assert!(parse_request(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").is_none());
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(parse_status(b"HTTP/1.0 503 Service"), Some(503));
        assert_eq!(parse_status(b"HTTP/1.1 20"), None);
        assert_eq!(parse_status(b"garbage"), None);
    }

    #[test]
    fn absolute_form_path() {
        let h = RequestHead { target: Cow::Borrowed("http://example.com/a/b?c"), ..Default::default() };
        assert_eq!(h.path(), "/a/b");
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = fastrand::Rng::with_seed(1);
        let seeds: [&[u8]; 3] = [b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"HTTP/1.1 200 OK\r\n", b"POST /x HTTP/1.0\r\n"];
        for i in 0..50_000 {
            let mut b = seeds[i % 3].to_vec();
            for _ in 0..rng.usize(1..6) {
                let n = b.len();
                match rng.u8(0..3) {
                    0 if n > 0 => b[rng.usize(0..n)] = rng.u8(..),
                    1 => b.truncate(rng.usize(0..=n)),
                    _ => b.insert(rng.usize(0..=n), rng.u8(..)),
                }
            }
            let _ = parse_request(&b);
            let _ = parse_status(&b);
            let _ = next_request(&b);
            let _ = chunked_len(&b);
        }
    }
}
