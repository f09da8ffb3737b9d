//! CPU profiles: samples from the kernel's perf_event program (per CPU, cpu-clock, only
//! selected processes), unwound (Go: frame pointers in the kernel; other programs: a copy
//! of the stack unwound here from `.eh_frame`), symbolized per binary, labelled with the
//! goroutine and the span that ran, and written as pprof, flame graph or OTLP profiles.
pub mod collect;
pub mod flame;
pub mod model;
pub mod native;
pub mod pprof;
pub mod tables;

use std::{path::PathBuf, time::Duration};

/// The cached entries to drop so that those no process uses stay within `bound` bytes:
/// `unused` as (key, last use, bytes), least recently used first out. The profiler's
/// binary and Go-table caches share this rule.
fn over_bound<K>(mut unused: Vec<(K, u64, usize)>, bound: usize) -> Vec<K> {
    let mut total: usize = unused.iter().map(|u| u.2).sum();
    unused.sort_by_key(|u| u.1);
    let mut out = Vec::new();
    for (k, _, bytes) in unused {
        if total <= bound {
            break;
        }
        total -= bytes;
        out.push(k);
    }
    out
}

/// CPU profiling: how often to sample and where profiles go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProfileSettings {
    pub frequency: u64,
    /// Send each window's profile over OTLP (with the traces' endpoint).
    pub otlp: bool,
    /// `zerotrace profile`: stop after this long, then write the files.
    pub duration: Option<Duration>,
    pub pprof: Option<PathBuf>,
    pub flamegraph: Option<PathBuf>,
}

/// `zerotrace profile`: the pprof file and flame graph at the end.
pub fn write_files(ps: &ProfileSettings, profile: &model::Profile) {
    let samples: u64 = profile.samples.iter().map(|s| s.count).sum();
    if ps.pprof.is_none() && ps.flamegraph.is_none() {
        return;
    }
    if samples == 0 {
        tracing::warn!("no CPU samples were taken: the processes were idle (or exited at once); writing an empty profile");
    }
    if let Some(path) = &ps.pprof {
        match pprof::write(profile, path) {
            Ok(()) => tracing::info!(path = %path.display(), samples, "wrote the pprof profile (go tool pprof reads it)"),
            Err(e) => tracing::error!(path = %path.display(), error = %e, "cannot write the pprof profile"),
        }
    }
    if let Some(path) = &ps.flamegraph {
        let title = format!("CPU: {} samples at {} Hz", samples, ps.frequency);
        match flame::write_svg(profile, &title, path) {
            Ok(()) => tracing::info!(path = %path.display(), samples, "wrote the flame graph"),
            Err(e) => tracing::error!(path = %path.display(), error = %e, "cannot write the flame graph"),
        }
    }
}

#[cfg(test)]
mod tests {
    /// Least recently used first, until what is left fits.
    #[test]
    fn over_bound_drops_the_least_recently_used_until_it_fits() {
        let unused = vec![("a", 3, 40), ("b", 1, 30), ("c", 2, 50)];
        assert_eq!(super::over_bound(unused.clone(), 120), Vec::<&str>::new());
        assert_eq!(super::over_bound(unused.clone(), 90), ["b"]);
        assert_eq!(super::over_bound(unused.clone(), 50), ["b", "c"]);
        assert_eq!(super::over_bound(unused, 0), ["b", "c", "a"]);
    }
}
