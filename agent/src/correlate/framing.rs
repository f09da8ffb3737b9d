//! How far an HTTP/1 response has come, by its framing (Content-Length, chunked, no body):
//! for native clients' responses, native servers' responses, and pipelined requests, whose
//! next response starts where one ends.
use crate::{
    events::HttpRequest,
    protocols::http1::{self, Body},
};

/// How far a response has come (a native client's, or a native server's).
#[derive(Debug)]
pub(super) struct Progress {
    pub(super) status: Option<u16>,
    pub(super) minor: Option<u8>,
    /// Bytes the response needs in all (head and body), when its framing says so.
    total: Option<u64>,
    pub(super) chunked: bool,
    received: u64,
    /// The last bytes received (for the end of a chunked body).
    tail: Vec<u8>,
    pub(super) last_ns: u64,
    pub(super) done: bool,
}

const TAIL_KEPT: usize = 8;
/// The end of a chunked body (no trailers): the CRLF that ends the last data chunk, then the
/// zero-size chunk. Without the leading CRLF, data that ends in "0" would match.
const LAST_CHUNK: &[u8] = b"\r\n0\r\n\r\n";

impl Progress {
    /// A response to a `method` request that starts with `head` (its first bytes), at `ts`.
    pub(super) fn new(head: &[u8], method: &str, ts: u64) -> Progress {
        let h = http1::parse_response(head, method);
        let mut p = Progress {
            status: h.map(|h| h.status),
            minor: h.map(|h| h.minor_version),
            total: None,
            chunked: false,
            received: 0,
            tail: Vec::new(),
            last_ns: ts,
            done: false,
        };
        if let Some(h) = h {
            match (h.head_len, h.body) {
                (Some(n), Some(Body::Empty)) => p.total = Some(n as u64),
                (Some(n), Some(Body::Length(l))) => p.total = Some((n as u64).saturating_add(l)),
                // A chunked body seen whole (a small response) is measured; else its end
                // is told by the last chunk.
                (Some(n), Some(Body::Chunked)) => match http1::chunked_len(&head[n..]) {
                    Some(c) => p.total = Some((n + c) as u64),
                    None => p.chunked = true,
                },
                _ => {}
            }
        }
        p
    }

    /// A response to the request whose captured bytes are `request`, from the record that
    /// brought its first bytes (`read_len` moved, the first of them captured: their tail is
    /// known only when all were).
    pub(super) fn first(request: &[u8], r: &HttpRequest) -> Progress {
        Progress::starting(request, &r.head, u64::from(r.read_len), r.start_ns)
    }

    /// A response to the request whose captured bytes are `request`, starting with `head`
    /// (captured) of `len` bytes moved at `ts`.
    pub(super) fn starting(request: &[u8], head: &[u8], len: u64, ts: u64) -> Progress {
        let method = http1::request_method(request).unwrap_or_default();
        let mut p = Progress::new(head, method, ts);
        p.add_read(head, len, ts);
        p
    }

    /// `len` more bytes moved at `ts`, whose start `head` was captured: their last bytes
    /// are known only when all of them were.
    pub(super) fn add_read(&mut self, head: &[u8], len: u64, ts: u64) {
        let tail: &[u8] = if head.len() as u64 >= len { &head[head.len().saturating_sub(TAIL_KEPT)..] } else { &[] };
        self.add(len, tail, ts);
    }

    /// Bytes moved past the response's end (by Content-Length or a measured chunked body):
    /// the start of the next response, when the requests were pipelined.
    pub(super) fn excess(&self) -> u64 {
        match self.total {
            Some(t) if self.done => self.received.saturating_sub(t),
            _ => 0,
        }
    }

    /// `len` more bytes of the response moved at `ts`, ending with `tail`.
    pub(super) fn add(&mut self, len: u64, tail: &[u8], ts: u64) {
        self.received = self.received.saturating_add(len);
        self.last_ns = ts;
        if len as usize > tail.len() {
            // Bytes between the kept tail and this read's tail were not seen.
            self.tail.clear();
        }
        self.tail.extend_from_slice(tail);
        let cut = self.tail.len().saturating_sub(TAIL_KEPT);
        self.tail.drain(..cut);
        self.done = match (self.total, self.chunked) {
            (Some(t), _) => self.received >= t,
            (None, true) => self.tail.ends_with(LAST_CHUNK),
            _ => false,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::Progress;

    #[test]
    fn chunked_end_needs_the_zero_chunk_after_a_crlf() {
        let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
        let mut p = Progress::new(head, "GET", 0);
        // A data chunk whose bytes end in "0" followed by its CRLF is not the end.
        p.add(12, b"\r\nn=10\r\n", 1);
        assert!(!p.done);
        p.add(10, b"a\r\n0\r\n\r\n", 2);
        assert!(p.done);
        // Content-Length: done exactly when head + body bytes moved.
        let head = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n";
        let mut p = Progress::new(head, "GET", 0);
        p.add(head.len() as u64 + 2, b"", 1);
        assert!(!p.done);
        p.add(1, b"c", 2);
        assert!(p.done);
    }
}
