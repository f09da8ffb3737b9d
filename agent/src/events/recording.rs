//! Recordings of kernel records (`zerotrace run --record FILE`): each record as the ring
//! buffer held it, preceded by its length (u32, little endian). Replayed by `cargo xtask
//! bench pipeline` and used as the fuzzing corpus of the decoders and the correlator.
use std::io::{self, Write};

/// Appends one record.
pub fn write(w: &mut impl Write, record: &[u8]) -> io::Result<()> {
    w.write_all(&(record.len() as u32).to_le_bytes())?;
    w.write_all(record)
}

/// The records of a recording, in order; a truncated last record ends it.
pub fn records(mut b: &[u8]) -> impl Iterator<Item = &[u8]> {
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
        let mut v = Vec::new();
        super::write(&mut v, b"abc").unwrap();
        super::write(&mut v, b"").unwrap();
        super::write(&mut v, b"defg").unwrap();
        let all: Vec<&[u8]> = super::records(&v).collect();
        assert_eq!(all, [&b"abc"[..], b"", b"defg"]);
        assert_eq!(super::records(&v[..v.len() - 1]).count(), 2);
        assert_eq!(super::records(&[0xff, 0xff, 0xff, 0x7f, 1]).count(), 0);
    }
}
