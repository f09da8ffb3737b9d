//! Recordings of kernel records (`zerotrace run --record FILE`): a header (MAGIC and the
//! record ABI version it was written with, u32 little endian), then each record as the
//! ring buffer held it, preceded by its length (u32, little endian). Replayed by `cargo
//! xtask bench pipeline` and used as the fuzzing corpus of the decoders and the
//! correlator. Recordings made before the header existed (record ABI 6) have none; their
//! records read the same as ABI 7's.
use std::io::{self, Write};

/// The first bytes of a recording.
pub const MAGIC: &[u8; 8] = b"ZTRECORD";
/// The record ABI of recordings without a header.
pub const HEADERLESS_ABI: u32 = 6;
/// Record ABI versions this build decodes (their records have the same layout; 8 changed
/// only map values; 9 added the GoSqlDone record and the database of a SQL start in its
/// padding, which older recordings have as 0: `other_sql`; 10 added the HTTP/2 stream
/// records and the grpc-go client and server start records (kinds 27 and 28, with a
/// traceparent); ABI 9's grpc-go server start, kind 23, is read in its own layout).
pub const READABLE: &[u32] = &[HEADERLESS_ABI, 7, 8, 9, zerotrace_common::ABI_VERSION];

/// Starts a recording: the header.
pub fn write_header(w: &mut impl Write) -> io::Result<()> {
    w.write_all(MAGIC)?;
    w.write_all(&zerotrace_common::ABI_VERSION.to_le_bytes())
}

/// Appends one record.
pub fn write(w: &mut impl Write, record: &[u8]) -> io::Result<()> {
    w.write_all(&(record.len() as u32).to_le_bytes())?;
    w.write_all(record)
}

/// The record ABI a recording was written with, and where its records start.
pub fn version(b: &[u8]) -> (u32, usize) {
    match b.strip_prefix(MAGIC.as_slice()).and_then(|r| r.get(..4)) {
        Some(v) => (u32::from_le_bytes(v.try_into().expect("4 bytes")), MAGIC.len() + 4),
        None => (HEADERLESS_ABI, 0),
    }
}

/// The records of a recording, in order; a truncated last record ends it.
pub fn records(b: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut b = &b[version(b).1..];
    std::iter::from_fn(move || {
        let len = u32::from_le_bytes(b.get(..4)?.try_into().ok()?) as usize;
        let rec = b.get(4..4 + len)?;
        b = &b[4 + len..];
        Some(rec)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trip_and_truncation() {
        for header in [false, true] {
            let mut v = Vec::new();
            if header {
                super::write_header(&mut v).unwrap();
            }
            super::write(&mut v, b"abc").unwrap();
            super::write(&mut v, b"").unwrap();
            super::write(&mut v, b"defg").unwrap();
            let want = if header { zerotrace_common::ABI_VERSION } else { super::HEADERLESS_ABI };
            assert_eq!(super::version(&v).0, want);
            assert!(super::READABLE.contains(&want));
            let all: Vec<&[u8]> = super::records(&v).collect();
            assert_eq!(all, [&b"abc"[..], b"", b"defg"]);
            assert_eq!(super::records(&v[..v.len() - 1]).count(), 2);
        }
        assert_eq!(super::records(&[0xff, 0xff, 0xff, 0x7f, 1]).count(), 0);
    }
}
