//! Kernel timestamps (CLOCK_MONOTONIC, from bpf_ktime_get_ns) to wall-clock time. The offset
//! is re-read periodically so that wall-clock adjustments are followed.

#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// realtime - monotonic, in nanoseconds.
    offset_ns: i128,
}

fn now(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out-pointer; both clocks always exist on Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

impl Clock {
    pub fn system() -> Self {
        let mut c = Clock { offset_ns: 0 };
        c.refresh();
        c
    }

    /// A clock with a fixed offset, for recorded streams.
    pub fn fixed(offset_ns: i128) -> Self {
        Clock { offset_ns }
    }

    pub fn refresh(&mut self) {
        // Bracket the realtime read by two monotonic reads and take their middle.
        let m1 = now(libc::CLOCK_MONOTONIC);
        let r = now(libc::CLOCK_REALTIME);
        let m2 = now(libc::CLOCK_MONOTONIC);
        self.offset_ns = r - (m1 + m2) / 2;
    }

    pub fn to_unix(&self, mono_ns: u64) -> u64 {
        (mono_ns as i128 + self.offset_ns).max(0) as u64
    }

    /// The current monotonic time, as the kernel programs see it.
    pub fn monotonic_now() -> u64 {
        now(libc::CLOCK_MONOTONIC) as u64
    }
}
