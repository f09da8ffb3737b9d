//! Parsers of bytes captured from traced processes. They take untrusted input: bounded
//! work, no panics, and a partial result rather than none when the capture was cut short.
pub mod http1;
pub mod http2;
pub mod sql;
