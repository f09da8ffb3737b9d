//! HTTP/2 from captured bytes: a frame reader per direction of a connection that copes with
//! what capture leaves out (each read or send arrives as its first bytes plus a count of
//! the rest), and header blocks decoded with HPACK (loona-hpack), one dynamic table per
//! direction. Everything is bounded: frame payloads are kept only for the frames that
//! carry headers or codes, header blocks up to `MAX_HEADER_BLOCK`, the dynamic table up
//! to `MAX_TABLE`. Garbage makes a direction `Broken`, never a panic.
use std::borrow::Cow;

/// The client connection preface.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Largest header block (HEADERS + CONTINUATION) kept for decoding.
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// Largest HPACK dynamic table a peer may ask for (SETTINGS_HEADER_TABLE_SIZE beyond
/// this makes the direction's headers unreadable instead of growing memory).
pub const MAX_TABLE: usize = 64 * 1024;

pub const DATA: u8 = 0;
pub const HEADERS: u8 = 1;
pub const RST_STREAM: u8 = 3;
pub const PUSH_PROMISE: u8 = 5;
pub const GOAWAY: u8 = 7;
pub const CONTINUATION: u8 = 9;
pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub len: u32,
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
}

/// What the reader hands out: a frame's header, and its payload when it was captured whole
/// and is of a kind whose payload matters (HEADERS, CONTINUATION, RST_STREAM, GOAWAY).
#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub header: FrameHeader,
    pub payload: Option<&'a [u8]>,
}

#[derive(Debug)]
enum State {
    /// Expecting the client preface: this many bytes of it still to come.
    Preface(usize),
    /// Between frames, or inside a frame header (`have` bytes of it in `head`).
    Header { head: [u8; 9], have: usize },
    /// Inside a payload: `left` bytes to go; kept in `buf` when wanted and still whole.
    Payload { header: FrameHeader, left: u64, keep: bool, lost: bool },
}

/// Why a direction stopped being read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Broken {
    /// The bytes do not start with the client preface.
    NoPreface,
    /// Bytes were not captured where a frame header was (its length is unknown, so
    /// nothing after it can be placed).
    LostFrameBoundary,
    /// Joined mid-connection: a frame header that no peer would send (unknown type, or a
    /// length beyond 1 MiB): the bytes were not at a frame boundary.
    Implausible,
}

/// Frames of one direction of a connection.
#[derive(Debug)]
pub struct FrameReader {
    state: State,
    buf: Vec<u8>,
    pub broken: Option<Broken>,
    /// Joined mid-connection: frame headers are checked for plausibility.
    strict: bool,
}

impl FrameReader {
    /// A reader for the client's side (starts with the preface) or the server's.
    pub fn new(client_side: bool) -> Self {
        let state = if client_side { State::Preface(PREFACE.len()) } else { State::Header { head: [0; 9], have: 0 } };
        FrameReader { state, buf: Vec::new(), broken: None, strict: false }
    }

    /// A reader for a direction of a connection that was open before the agent: it starts
    /// at a frame header, and a frame header that no peer would send breaks it.
    pub fn joined() -> Self {
        FrameReader { state: State::Header { head: [0; 9], have: 0 }, buf: Vec::new(), broken: None, strict: true }
    }

    /// Feeds `data`, followed by `missing` bytes that were not captured; calls `f` for
    /// every complete frame (payload None when not kept or not captured whole).
    pub fn feed(&mut self, data: &[u8], missing: u64, f: &mut dyn FnMut(Frame<'_>)) {
        let mut at = 0;
        while at < data.len() && self.broken.is_none() {
            at += self.step(&data[at..], f);
        }
        if missing > 0 && self.broken.is_none() {
            self.skip(missing, f);
        }
    }

    /// Consumes bytes from the start of `d`; returns how many.
    fn step(&mut self, d: &[u8], f: &mut dyn FnMut(Frame<'_>)) -> usize {
        match &mut self.state {
            State::Preface(left) => {
                let done = PREFACE.len() - *left;
                let n = (*left).min(d.len());
                if d[..n] != PREFACE[done..done + n] {
                    self.broken = Some(Broken::NoPreface);
                    return d.len();
                }
                *left -= n;
                if *left == 0 {
                    self.state = State::Header { head: [0; 9], have: 0 };
                }
                n
            }
            State::Header { head, have } => {
                let n = (9 - *have).min(d.len());
                head[*have..*have + n].copy_from_slice(&d[..n]);
                *have += n;
                if *have == 9 {
                    let h = parse_header(head);
                    self.begin(h, f);
                }
                n
            }
            State::Payload { header, left, keep, lost } => {
                let n = (*left).min(d.len() as u64) as usize;
                if *keep && !*lost {
                    self.buf.extend_from_slice(&d[..n]);
                }
                *left -= n as u64;
                if *left == 0 {
                    let (h, whole) = (*header, *keep && !*lost);
                    self.finish(h, whole, f);
                }
                n
            }
        }
    }

    /// Bytes that were not captured: a payload can absorb them; anywhere else they break
    /// the stream of frames.
    fn skip(&mut self, mut n: u64, f: &mut dyn FnMut(Frame<'_>)) {
        while n > 0 && self.broken.is_none() {
            match &mut self.state {
                State::Payload { header, left, lost, .. } => {
                    let take = (*left).min(n);
                    *left -= take;
                    n -= take;
                    *lost = true;
                    if *left == 0 {
                        let h = *header;
                        self.finish(h, false, f);
                    }
                }
                _ => self.broken = Some(Broken::LostFrameBoundary),
            }
        }
    }

    fn begin(&mut self, h: FrameHeader, f: &mut dyn FnMut(Frame<'_>)) {
        if self.strict && (h.kind > CONTINUATION || h.len > 1 << 20) {
            self.broken = Some(Broken::Implausible);
            return;
        }
        let keep = matches!(h.kind, HEADERS | CONTINUATION | RST_STREAM | GOAWAY | PUSH_PROMISE) && (h.len as usize) <= MAX_HEADER_BLOCK;
        self.buf.clear();
        if h.len == 0 {
            self.finish(h, keep, f);
        } else {
            self.state = State::Payload { header: h, left: u64::from(h.len), keep, lost: false };
        }
    }

    fn finish(&mut self, h: FrameHeader, whole: bool, f: &mut dyn FnMut(Frame<'_>)) {
        self.state = State::Header { head: [0; 9], have: 0 };
        let payload = whole.then_some(self.buf.as_slice());
        f(Frame { header: h, payload });
        self.buf.clear();
    }
}

fn parse_header(b: &[u8; 9]) -> FrameHeader {
    FrameHeader { len: u32::from_be_bytes([0, b[0], b[1], b[2]]), kind: b[3], flags: b[4], stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff }
}

/// The header block fragment of a HEADERS frame's payload (padding and priority removed).
pub fn headers_fragment(flags: u8, payload: &[u8]) -> Option<&[u8]> {
    let mut p = payload;
    let mut pad = 0usize;
    if flags & PADDED != 0 {
        pad = *p.first()? as usize;
        p = &p[1..];
    }
    if flags & PRIORITY != 0 {
        p = p.get(5..)?;
    }
    p.get(..p.len().checked_sub(pad)?)
}

/// The headers of one block that spans care about.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Headers {
    pub method: Option<String>,
    pub path: Option<String>,
    pub authority: Option<String>,
    pub scheme: Option<String>,
    pub status: Option<u16>,
    pub content_type: Option<String>,
    pub grpc_status: Option<i64>,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
    pub user_agent: Option<String>,
}

/// HPACK state of one direction.
pub struct HeaderDecoder {
    hpack: loona_hpack::Decoder<'static>,
    /// A header block could not be decoded or was not captured: the dynamic table may
    /// differ from the peer's from here on, so nothing more is decoded.
    pub lost: bool,
}

impl Default for HeaderDecoder {
    fn default() -> Self {
        let mut hpack = loona_hpack::Decoder::new();
        hpack.set_max_allowed_table_size(MAX_TABLE);
        HeaderDecoder { hpack, lost: false }
    }
}

impl HeaderDecoder {
    /// Decodes a complete header block; None (and `lost`) when it cannot be.
    pub fn decode(&mut self, block: &[u8]) -> Option<Headers> {
        if self.lost {
            return None;
        }
        let mut h = Headers::default();
        let text = |v: &[u8]| -> String {
            let v = &v[..v.len().min(512)];
            match String::from_utf8_lossy(v) {
                Cow::Borrowed(s) => s.to_owned(),
                Cow::Owned(s) => s,
            }
        };
        let r = self.hpack.decode_with_cb(block, |name, value| match &*name {
            b":method" => h.method = Some(text(&value)),
            b":path" => h.path = Some(text(&value)),
            b":authority" | b"host" => h.authority = Some(text(&value)),
            b":scheme" => h.scheme = Some(text(&value)),
            b":status" => h.status = std::str::from_utf8(&value).ok().and_then(|v| v.parse().ok()),
            b"content-type" => h.content_type = Some(text(&value)),
            b"grpc-status" => h.grpc_status = std::str::from_utf8(&value).ok().and_then(|v| v.trim().parse().ok()),
            b"traceparent" => h.traceparent = Some(text(&value)),
            b"tracestate" => h.tracestate = Some(text(&value)),
            b"user-agent" => h.user_agent = Some(text(&value)),
            _ => {}
        });
        match r {
            Ok(()) => Some(h),
            Err(_) => {
                self.lost = true;
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut v = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        v.extend_from_slice(&stream.to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn collect(r: &mut FrameReader, d: &[u8], missing: u64) -> Vec<(FrameHeader, Option<Vec<u8>>)> {
        let mut out = Vec::new();
        r.feed(d, missing, &mut |f| out.push((f.header, f.payload.map(<[u8]>::to_vec))));
        out
    }

    #[test]
    fn frames_across_reads_and_holes_in_payloads() {
        let mut enc = loona_hpack::Encoder::new();
        let block = enc.encode([(&b":method"[..], &b"POST"[..]), (b":path", b"/echo.Echo/Unary"), (b"content-type", b"application/grpc")]);
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(4, 0, 0, &[0; 6]));
        bytes.extend(frame(HEADERS, END_HEADERS, 1, &block));
        bytes.extend(frame(DATA, END_STREAM, 1, &[7; 100]));
        let mut r = FrameReader::new(true);
        // In two pieces, the second one cut short inside the DATA payload.
        let cut = bytes.len() - 60;
        let mut got = collect(&mut r, &bytes[..10], 0);
        got.extend(collect(&mut r, &bytes[10..cut], 60));
        assert_eq!(r.broken, None);
        assert_eq!(got.len(), 3);
        assert_eq!(got[1].0, FrameHeader { len: block.len() as u32, kind: HEADERS, flags: END_HEADERS, stream: 1 });
        let mut d = HeaderDecoder::default();
        let h = d.decode(headers_fragment(END_HEADERS, got[1].1.as_deref().unwrap()).unwrap()).unwrap();
        assert_eq!((h.method.as_deref(), h.path.as_deref()), (Some("POST"), Some("/echo.Echo/Unary")));
        // The DATA frame's flags are known although its payload was not captured.
        assert_eq!((got[2].0.flags, got[2].1.as_deref()), (END_STREAM, None));
    }

    #[test]
    fn a_hole_at_a_frame_boundary_breaks_the_direction() {
        let mut r = FrameReader::new(false);
        let f = frame(DATA, 0, 1, &[1, 2, 3]);
        collect(&mut r, &f, 5);
        assert_eq!(r.broken, Some(Broken::LostFrameBoundary));
        let mut r = FrameReader::new(true);
        collect(&mut r, b"GET / HTTP/1.1\r\n", 0);
        assert_eq!(r.broken, Some(Broken::NoPreface));
    }

    #[test]
    fn garbage_and_adversarial_blocks_never_panic() {
        let mut rng = fastrand::Rng::with_seed(11);
        for _ in 0..5_000 {
            let len = rng.usize(0..300);
            let b: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            let mut r = FrameReader::new(rng.bool());
            r.feed(&b, rng.u64(0..100_000), &mut |f| {
                if let Some(p) = f.payload {
                    let _ = HeaderDecoder::default().decode(headers_fragment(f.header.flags, p).unwrap_or(p));
                }
            });
            let _ = HeaderDecoder::default().decode(&b);
        }
        // A literal that claims a 2 GiB value, and a table size update far above the bound.
        let mut d = HeaderDecoder::default();
        assert!(d.decode(&[0x40, 0x01, b'a', 0x7f, 0xff, 0xff, 0xff, 0xff, 0x07]).is_none());
        let mut d = HeaderDecoder::default();
        assert!(d.decode(&[0x3f, 0xe1, 0xff, 0xff, 0x07, 0x82]).is_none());
        assert!(d.lost);
    }
}
