//! Captured HTTP/1 bytes: request heads, response heads and status lines.
#![no_main]
use zerotrace::protocols::http1;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some(h) = http1::parse_request(data) {
        let _ = h.path();
    }
    let _ = http1::parse_response(data, "GET");
    let _ = http1::parse_response(data, "HEAD");
    let _ = http1::parse_status(data);
});
