//! `zerotrace replay FILE`: the agent's pipeline after the kernel, in one thread and without
//! a network: a `--record` recording is decoded, correlated into spans and encoded as OTLP
//! export requests (per batch, with the exporter's own `export::encode::request`), and the
//! throughput is printed as JSON. `cargo xtask bench pipeline` records live traffic and runs
//! this. With `--export-to`, the recording's spans go through the real OTLP/gRPC exporter
//! (queue, batches, requests in flight) at a fixed rate instead: what it sustains.
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
    #[error("{0}")]
    Export(String),
}

/// The records of the recording at `path`, checked.
fn load(path: &Path) -> Result<Vec<u8>, ReplayError> {
    let bytes = std::fs::read(path).map_err(|source| ReplayError::Read { path: path.display().to_string(), source })?;
    let version = recording::version(&bytes).0;
    if !recording::READABLE.contains(&version) {
        return Err(ReplayError::Version { path: path.display().to_string(), version, readable: recording::READABLE });
    }
    if recording::records(&bytes).next().is_none() {
        return Err(ReplayError::Empty(path.display().to_string()));
    }
    Ok(bytes)
}

/// Offers the spans of the recording at `path` to the OTLP/gRPC exporter (default queue,
/// batch and requests in flight) at `rate` spans/s for `seconds`, a 20 ms drain's worth
/// at a time, then shuts it down
/// (30 s deadline); returns offered, exported and dropped spans and the rate exported, as
/// one JSON object.
pub fn export(path: &Path, endpoint: &str, rate: u64, seconds: u64) -> Result<String, ReplayError> {
    use std::sync::{Arc, atomic::Ordering::Relaxed};

    use crate::export::{ExportSettings, ExportStats, Exporter, Protocol, TlsSettings, otlp::OtlpExport};
    let bytes = load(path)?;
    let mut spans = Vec::new();
    let mut c = Correlator::with_memory(Clock::system(), Box::new(|_, _, _| None));
    for r in recording::records(&bytes) {
        if let Ok(ev) = decode(r) {
            c.on_event(ev, &mut spans);
        }
    }
    if spans.is_empty() {
        return Err(ReplayError::Empty(path.display().to_string()));
    }
    let settings = ExportSettings {
        exporter: Exporter::Otlp,
        protocol: Protocol::Grpc,
        endpoint: endpoint.to_owned(),
        headers: Vec::new(),
        timeout: crate::settings::DEFAULT_TIMEOUT,
        queue: crate::settings::DEFAULT_QUEUE,
        batch: crate::settings::DEFAULT_BATCH,
        delay: crate::settings::DEFAULT_DELAY,
        tls: TlsSettings::default(),
    };
    // As `run`: two tokio workers; the spans are offered from this thread.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().map_err(|e| ReplayError::Export(e.to_string()))?;
    let stats = Arc::new(ExportStats::default());
    let mut exporter = {
        let _guard = rt.enter();
        OtlpExport::start(&settings, Default::default(), stats.clone()).map_err(|e| ReplayError::Export(e.to_string()))?
    };
    let start = Instant::now();
    let mut offered = 0u64;
    while start.elapsed().as_secs() < seconds {
        // As the run loop drains the ring while records flow: every 20 ms, the spans due
        // since, in one message (4,000 at 200k spans/s).
        std::thread::sleep(std::time::Duration::from_millis(20));
        let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
        let mut burst = Vec::with_capacity((due - offered) as usize);
        while offered < due {
            burst.push(spans[(offered % spans.len() as u64) as usize].clone());
            offered += 1;
        }
        exporter.offer_all(&mut burst);
    }
    rt.block_on(exporter.shutdown(std::time::Duration::from_secs(30)));
    let secs = start.elapsed().as_secs_f64();
    let exported = stats.exported.load(Relaxed);
    let dropped = stats.dropped_queue_full.load(Relaxed)
        + stats.dropped_failed.load(Relaxed)
        + stats.dropped_rejected.load(Relaxed)
        + stats.dropped_shutdown.load(Relaxed);
    Ok(format!(
        "{{\"offered\":{offered},\"exported\":{exported},\"dropped\":{dropped},\"seconds\":{secs:.3},\"exported_per_s\":{:.0},\"peak_rss_kib\":{}}}",
        exported as f64 / secs,
        peak_rss_kib()
    ))
}

/// Replays `path` `rounds` times (with OTLP encoding when `encode`); returns the
/// measurements as one JSON object.
pub fn run(path: &Path, rounds: u32, encode: bool) -> Result<String, ReplayError> {
    let bytes = load(path)?;
    let records: Vec<&[u8]> = recording::records(&bytes).collect();
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
