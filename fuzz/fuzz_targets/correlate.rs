//! A whole recording (`zerotrace run --record`: length-prefixed kernel records) through
//! decoding and the correlator: spans come out or nothing does, never a panic.
#![no_main]
use zerotrace::{
    correlate::{Clock, Correlator},
    events::{decode, recording},
};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut c = Correlator::with_memory(Clock::system(), Box::new(|_, _, _| Some("/fuzz/{id}".into())));
    let mut out = Vec::new();
    for r in recording::records(data).take(10_000) {
        if let Ok(ev) = decode(r) {
            c.on_event(ev, &mut out);
        }
        out.clear();
    }
});
