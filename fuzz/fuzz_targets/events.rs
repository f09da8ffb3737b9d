//! One kernel record, as bytes: decoding never panics, whatever it holds.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = zerotrace::events::decode(data);
});
