//! `zerotrace replay FILE`: the agent's pipeline after the kernel, in one thread and without
//! a network: a `--record` recording is decoded, correlated into spans and encoded as OTLP
//! export requests (per batch, with the exporter's own `export::encode::request`), and the
//! throughput is printed as JSON. `cargo xtask bench pipeline` records live traffic and runs
//! this.
use std::{path::Path, time::Instant};

use crate::{
    correlate::{Clock, Correlator},
    events::{decode, recording},
    export::encode::{EncodedResource, request as encode_request},
    spans::Span,
};

/// Spans per encoded export request (as the exporter batches them).
const BATCH: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("cannot read the recording {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{0} holds no records: record one with `zerotrace run --record FILE`")]
    Empty(String),
    #[error("{path} was recorded with record format {version}, which this zerotrace does not read (it reads {readable:?}): record it again")]
    Version { path: String, version: u32, readable: &'static [u32] },
}

/// Replays `path` `rounds` times (with OTLP encoding when `encode`); returns the
/// measurements as one JSON object.
pub fn run(path: &Path, rounds: u32, encode: bool) -> Result<String, ReplayError> {
    let bytes = std::fs::read(path).map_err(|source| ReplayError::Read { path: path.display().to_string(), source })?;
    let version = recording::version(&bytes).0;
    if !recording::READABLE.contains(&version) {
        return Err(ReplayError::Version { path: path.display().to_string(), version, readable: recording::READABLE });
    }
    let records: Vec<&[u8]> = recording::records(&bytes).collect();
    if records.is_empty() {
        return Err(ReplayError::Empty(path.display().to_string()));
    }
    let resource = EncodedResource::new(Some(&crate::export::resource::resource(&[(
        "service.name".to_owned(),
        crate::export::resource::AttrValue::Str("replay".into()),
    )])));
    let mut best = f64::INFINITY;
    let (mut events, mut spans_total, mut encoded, mut undecodable) = (0u64, 0u64, 0u64, 0u64);
    for _ in 0..rounds.max(1) {
        let mut c = Correlator::with_memory(Clock::system(), Box::new(|_, _, _| None));
        let (mut spans, mut batch): (u64, Vec<Span>) = (0, Vec::with_capacity(BATCH));
        let mut bytes_out = 0u64;
        let start = Instant::now();
        let flush = |batch: &mut Vec<Span>| {
            if !encode {
                batch.clear();
                return 0;
            }
            // As the exporter: encode the batch, then free its spans.
            let n = encode_request(&resource, batch).len() as u64;
            batch.clear();
            n
        };
        let mut bad = 0;
        for r in &records {
            match decode(r) {
                Ok(ev) => c.on_event(ev, &mut batch),
                Err(_) => bad += 1,
            }
            if batch.len() >= BATCH {
                spans += batch.len() as u64;
                bytes_out += flush(&mut batch);
            }
        }
        spans += batch.len() as u64;
        bytes_out += flush(&mut batch);
        let secs = start.elapsed().as_secs_f64();
        best = best.min(secs);
        (events, spans_total, encoded, undecodable) = (records.len() as u64, spans, bytes_out, bad);
    }
    let per_s = |n: u64| (n as f64 / best).round();
    Ok(format!(
        "{{\"events\":{events},\"undecodable\":{undecodable},\"spans\":{spans_total},\"otlp_bytes\":{encoded},\"best_seconds\":{best:.6},\"events_per_s\":{},\"spans_per_s\":{},\"peak_rss_kib\":{}}}",
        per_s(events),
        per_s(spans_total),
        peak_rss_kib()
    ))
}

/// The process's peak resident set (VmHWM), KiB.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}
