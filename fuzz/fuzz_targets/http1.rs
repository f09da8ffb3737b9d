//! Captured HTTP/1 bytes: request heads, response heads and status lines, pipelined
//! requests and chunked bodies.
#![no_main]
use zerotrace::protocols::http1;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some(h) = http1::parse_request(data) {
        let _ = h.path();
    }
    let _ = http1::parse_response(data, "GET");
    let _ = http1::parse_response(data, "HEAD");
    let _ = http1::parse_status(data);
    if let Some(at) = http1::next_request(data) {
        assert!(at < data.len());
    }
    if let Some(n) = http1::chunked_len(data) {
        assert!(n <= data.len());
    }
});
