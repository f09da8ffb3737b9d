//! HTTP/2 bytes of one direction as capture delivers them: pieces, each followed by bytes
//! that were not captured, through the frame reader, and every header block through one
//! HPACK decoder (whose dynamic table persists, as on a connection).
//! Input: [client side?] then pieces of [len u8][missing u8][len bytes].
#![no_main]
use zerotrace::protocols::http2::{FrameReader, HeaderDecoder, headers_fragment};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&side, mut rest)) = data.split_first() else { return };
    let mut reader = FrameReader::new(side & 1 == 1);
    let mut hpack = HeaderDecoder::default();
    while rest.len() >= 2 {
        let (len, missing) = (rest[0] as usize, u64::from(rest[1]) * 97);
        let end = (2 + len).min(rest.len());
        let piece = &rest[2..end];
        rest = &rest[end..];
        let mut blocks = Vec::new();
        reader.feed(piece, missing, &mut |f| {
            if let Some(p) = f.payload {
                blocks.push(headers_fragment(f.header.flags, p).unwrap_or(p).to_vec());
            }
        });
        for b in blocks {
            let _ = hpack.decode(&b);
        }
    }
});
