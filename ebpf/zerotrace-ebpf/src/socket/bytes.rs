//! What the first bytes of a read or send are: an HTTP/1 request or response head, a TLS
//! record, HTTP/2's preface or a frame. Each test reads a few bytes of target memory at
//! `buf` (0: no buffer known, never a match).
use crate::util::read_user;

/// Whether the bytes at `buf` start a TLS record (content type 20-23, version 3.x): no
/// HTTP/1 request starts like that.
#[inline(always)]
pub fn is_tls_record(buf: u64) -> bool {
    if buf == 0 {
        return false;
    }
    match read_user::<[u8; 3]>(buf) {
        Some(b) => (0x14..=0x17).contains(&b[0]) && b[1] == 3 && b[2] <= 4,
        None => false,
    }
}

/// Whether the bytes at `buf` start the head of a final response ("HTTP/1.x NNN ", not
/// 1xx).
#[inline(always)]
pub fn is_final_head(buf: u64) -> bool {
    if buf == 0 {
        return false;
    }
    let Some(b) = read_user::<[u8; 13]>(buf) else { return false };
    b[..7] == *b"HTTP/1." && b[8] == b' ' && (b'2'..=b'5').contains(&b[9]) && b[10].is_ascii_digit() && b[11].is_ascii_digit() && b[12] == b' '
}

/// What a status line at `buf` says about the response it starts.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Interim {
    /// A final response (or bytes zerotrace cannot read).
    No,
    /// 1xx other than 101 (100 Continue, 103 Early Hints): the final response follows.
    Yes,
    /// 101 Switching Protocols: after it the connection carries another protocol.
    Upgrade,
}

#[inline(always)]
pub fn interim_status(buf: u64) -> Interim {
    if buf == 0 {
        return Interim::No;
    }
    let Some(b) = read_user::<[u8; 13]>(buf) else { return Interim::No };
    if b[..7] != *b"HTTP/1." || b[8] != b' ' || b[9] != b'1' || b[12] != b' ' {
        return Interim::No;
    }
    if b[10] == b'0' && b[11] == b'1' { Interim::Upgrade } else { Interim::Yes }
}

/// Whether the bytes at `buf` can start an HTTP/1 request: an upper-case method of 3 to 7
/// letters and a space.
#[inline(always)]
pub fn starts_request(buf: u64) -> bool {
    if buf == 0 {
        return false;
    }
    let Some(b) = read_user::<[u8; 8]>(buf) else { return false };
    let mut i = 0;
    while i < 8 {
        let c = b[i];
        if c == b' ' {
            return i >= 3;
        }
        if !c.is_ascii_uppercase() {
            return false;
        }
        i += 1;
    }
    false
}

/// Whether the bytes at `buf` start HTTP/2's client preface ("PRI * HTTP/2.0").
#[inline(always)]
pub fn h2_preface(buf: u64) -> bool {
    buf != 0 && read_user::<[u8; 4]>(buf) == Some(*b"PRI ")
}

/// Whether the bytes at `buf` can start an HTTP/2 frame (a connection that was open before
/// the agent, seen from its first read or send after attaching): a length within the
/// default maximum frame size, a known type, the reserved bit clear, and a stream id of 0
/// exactly for connection-level frames. No HTTP/1 or TLS bytes pass (their first three
/// bytes make a length above 16 KiB).
#[inline(always)]
pub fn h2_frame_start(buf: u64) -> bool {
    if buf == 0 {
        return false;
    }
    let Some(b) = read_user::<[u8; 9]>(buf) else { return false };
    let len = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
    let (kind, stream_hi) = (b[3], b[5]);
    let stream_zero = b[5] | b[6] | b[7] | b[8] == 0;
    let conn_level = kind == 4 || kind == 6 || kind == 7;
    let stream_level = kind <= 3 || kind == 5 || kind == 9;
    len <= 16_384 && kind <= 9 && stream_hi & 0x80 == 0 && (!conn_level || stream_zero) && (!stream_level || !stream_zero)
}
