//! Drains the kernel's ring buffer. The kernel programs only wake the agent when a lot is
//! pending (see bounds::WAKEUP_BYTES); otherwise the agent drains on a short timer, so a
//! busy target costs one wake-up per tick, not one per event.
use std::{
    io::{self, Write},
    path::Path,
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;

use super::{Event, decode};

pub struct EventReader {
    ring: AsyncFd<RingBuf<MapData>>,
    /// Records read, and records that did not decode.
    pub records: u64,
    pub decode_errors: u64,
    /// Times the kernel woke the agent (the rest of the drains are timer ticks).
    pub wakeups: u64,
    /// `--record`: every record as read, and the bytes written so far.
    record: Option<(io::BufWriter<std::fs::File>, u64)>,
}

/// `--record` stops writing past this size.
pub const RECORD_MAX_BYTES: u64 = 256 << 20;

impl EventReader {
    pub fn new(ring: RingBuf<MapData>) -> io::Result<Self> {
        // SAFETY: the ring buffer owns its fd and keeps it open as long as the AsyncFd lives.
        let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }.map_err(io::Error::from)?;
        Ok(Self { ring, records: 0, decode_errors: 0, wakeups: 0, record: None })
    }

    /// Writes every record from now on to `path` (format: `recording::write`).
    pub fn record_to(&mut self, path: &Path) -> io::Result<()> {
        // The records hold captured bytes (headers included): only root may read them.
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
        let mut w = io::BufWriter::new(f);
        super::recording::write_header(&mut w)?;
        self.record = Some((w, super::recording::MAGIC.len() as u64 + 4));
        Ok(())
    }

    /// Flushes the recording, if any.
    pub fn flush_recording(&mut self) {
        if let Some((w, _)) = &mut self.record {
            let _ = w.flush();
        }
    }

    /// Returns when the kernel signals data or after `tick`, whichever is first.
    pub async fn wait(&mut self, tick: Duration) {
        tokio::select! {
            guard = self.ring.readable_mut() => {
                if let Ok(mut g) = guard {
                    g.clear_ready();
                    self.wakeups += 1;
                }
            }
            _ = tokio::time::sleep(tick) => {}
        }
    }

    /// Decodes every pending record and hands it to `f`; returns how many were read.
    pub fn drain(&mut self, mut f: impl FnMut(Event)) -> usize {
        let mut n = 0;
        let ring = self.ring.get_mut();
        while let Some(item) = ring.next() {
            n += 1;
            if let Some((w, written)) = &mut self.record
                && *written < RECORD_MAX_BYTES
            {
                if super::recording::write(w, &item).is_err() {
                    *written = RECORD_MAX_BYTES;
                }
                *written += 4 + item.len() as u64;
                if *written >= RECORD_MAX_BYTES {
                    tracing::warn!(max = RECORD_MAX_BYTES, "--record: the recording is full (or failed); later records are not written");
                }
            }
            match decode(&item) {
                Ok(ev) => f(ev),
                Err(e) => {
                    self.decode_errors += 1;
                    if self.decode_errors <= 5 {
                        tracing::warn!(error = %e, "dropped an undecodable kernel record");
                    }
                }
            }
        }
        self.records += n as u64;
        n
    }
}
