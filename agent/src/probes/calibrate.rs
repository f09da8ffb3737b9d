//! What a uprobe hit costs a target on this machine, measured at start for the CPU budget:
//! the agent puts the empty `calibration_point` uprobe on a function of its own and times
//! calls to it with and without (the trap dominates: ~9 us on this VM, far more under
//! emulation). Three rounds, the smallest difference kept (noise only adds).
use std::{hint::black_box, num::NonZeroU32, time::Instant};

use aya::programs::{UProbe, uprobe::UProbeScope};

use super::{ProbeError, Probes, program};

const NAME: &str = "calibration_point";
const CALLS: u32 = 500;
const ROUNDS: usize = 3;
/// A uprobe hit is a trap into the kernel and back: less than this is a measuring error.
const MIN_PLAUSIBLE_NS: f64 = 200.0;

/// The probed function: a call that does nothing the optimiser can remove.
#[inline(never)]
#[unsafe(no_mangle)]
pub extern "C" fn zerotrace_calibration_point(x: u64) -> u64 {
    black_box(x).wrapping_mul(3)
}

fn time_calls() -> f64 {
    let t = Instant::now();
    let mut acc = 0u64;
    for i in 0..CALLS {
        acc = acc.wrapping_add(zerotrace_calibration_point(black_box(i as u64)));
    }
    black_box(acc);
    t.elapsed().as_nanos() as f64
}

/// The file offset of `addr` in the agent's own executable (/proc/self/exe, which the
/// kernel resolves even when the file was replaced or its path has spaces), from the
/// mapping of /proc/self/maps that holds it and has the executable's inode.
fn own_file_offset(addr: u64) -> Option<(std::path::PathBuf, u64)> {
    use std::os::unix::fs::MetadataExt;
    let exe = std::path::PathBuf::from("/proc/self/exe");
    let ino = std::fs::metadata(&exe).ok()?.ino();
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (range, off, inode) = (f.first()?, f.get(2)?, f.get(4)?);
        let (start, end) = range.split_once('-')?;
        let (start, end) = (u64::from_str_radix(start, 16).ok()?, u64::from_str_radix(end, 16).ok()?);
        if start <= addr && addr < end && inode.parse::<u64>().ok()? == ino {
            Some((exe.clone(), addr - start + u64::from_str_radix(off, 16).ok()?))
        } else {
            None
        }
    })
}

impl Probes {
    /// Nanoseconds a uprobe hit costs a process here.
    pub fn uprobe_hit_ns(&mut self) -> Result<f64, ProbeError> {
        let addr = zerotrace_calibration_point as *const () as u64;
        let (exe, offset) =
            own_file_offset(addr).ok_or_else(|| ProbeError::Missing("the agent's own executable in /proc/self/maps (to time a uprobe hit)".into()))?;
        let pid = NonZeroU32::new(std::process::id()).ok_or_else(|| ProbeError::Missing("the agent's pid".into()))?;
        let p: &mut UProbe = program(&mut self.ebpf, NAME)?;
        p.load().map_err(|source| ProbeError::program(NAME, source))?;
        // Interleaved rounds, the fastest of each kind kept: noise (preemption on a busy
        // machine) only adds.
        let (mut bare, mut probed) = (f64::MAX, f64::MAX);
        for _ in 0..ROUNDS {
            bare = bare.min(time_calls());
            let link = p
                .attach(offset, &exe, UProbeScope::OneProcess(pid))
                .map_err(|source| ProbeError::program(format!("{NAME} at {}+{offset:#x}", exe.display()), source))?;
            probed = probed.min(time_calls());
            p.detach(link).map_err(|source| ProbeError::program(NAME, source))?;
        }
        let _ = p.unload();
        let ns = (probed - bare) / CALLS as f64;
        if ns < MIN_PLAUSIBLE_NS {
            return Err(ProbeError::Missing(format!("a plausible uprobe hit time (measured {ns:.0} ns)")));
        }
        Ok(ns)
    }

    /// Load shedding in the kernel: keep 1 in 2^`shift` new server requests.
    pub fn set_shed(&mut self, shift: u32) -> Result<(), ProbeError> {
        let mut m: aya::maps::Array<_, u32> = self.map_mut(zerotrace_common::names::SHED)?;
        m.set(0, shift, 0).map_err(|source| ProbeError::Map { name: zerotrace_common::names::SHED, source })
    }
}
