//! Self-protection, once a second: sense what the agent costs (its own CPU time, its probes'
//! hits on the targets times a per-hit cost, its anonymous memory), decide whether to shed,
//! act where it is cheapest. CPU over `--cpu-budget`: the kernel keeps 1 in 2^k of the
//! server requests that start (SHED), k rising while the cost stays over and falling once it
//! is well under. Memory over `--memory-limit`: the kernel keeps none and the export queue
//! takes no new span (`spans_dropped_memory_limit`) until memory is back under 80 %.
//! Every change is logged; the measures are gauges (`guard_*`) in stats, status and OTLP.
use std::{
    sync::atomic::{AtomicBool, Ordering::Relaxed},
    time::{Duration, Instant},
};

use zerotrace_common::{COUNTER_SLOTS, Counter, shed};

/// Set while the agent is over its memory limit: outputs take no new span.
pub static OVER_MEMORY_LIMIT: AtomicBool = AtomicBool::new(false);
/// Set while the kernel sheds requests, and for GRACE after: requests the agent never saw
/// may be open, so "the one open request" or "the request this thread read" may be wrong.
pub static SHEDDING: AtomicBool = AtomicBool::new(false);
const GRACE: Duration = Duration::from_secs(10);

/// The smoothed cost that starts shedding (an exponential average over this long): a burst
/// of a few seconds does not shed, a load that stays does.
const SLOW: Duration = Duration::from_secs(30);
/// The quick measure that moves the shift while shedding (the effect of a change shows
/// within seconds).
const QUICK: Duration = Duration::from_secs(3);
/// Least time between two changes of the shift (twice QUICK: a step's effect shows).
const SETTLE: Duration = Duration::from_secs(6);
/// After shedding was found not to lower the cost (it is not the requests'), no new start
/// for this long.
const HOLD_OFF: Duration = Duration::from_secs(60);
/// A step helped when the quick measure fell at least this much.
const HELPED: f64 = 0.9;
/// Most shedding for CPU: 1 in 256 new requests kept.
const MAX_SHIFT: u32 = 8;
/// Memory shedding ends below this share of the limit.
const MEMORY_RECOVERED: f64 = 0.8;
/// What a socket hook run costs a target: a tracepoint hit (~37 ns here) plus the
/// program's work on a traced socket (reading the first bytes, a record): an upper bound,
/// not calibrated (uprobes are, and dominate the cost wherever they are used).
const SOCKET_OP_NS: f64 = 1000.0;

/// Names of the guard's gauges (not monotonic in OTLP).
pub const GAUGES: &[&str] = &["guard_cpu_permille", "guard_cpu_budget_permille", "guard_shed_shift", "guard_memory_bytes", "guard_memory_limit_bytes"];

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GuardSettings {
    /// Cores (0.05: 5 % of one core) the agent and its probes may cost; None: no budget.
    pub cpu_budget: Option<f64>,
    /// Bytes of anonymous memory (RssAnon) the agent may use; None: no limit.
    pub memory_limit: Option<u64>,
}

/// One second's reading.
#[derive(Clone, Copy, Debug)]
struct Reading {
    at: Instant,
    cpu_seconds: f64,
    uprobe_hits: u64,
    socket_ops: u64,
    requests: u64,
}

#[derive(Debug)]
pub struct Guard {
    s: GuardSettings,
    uprobe_hit_ns: f64,
    last: Option<Reading>,
    /// Cost in cores: smoothed over SLOW and over QUICK.
    slow: f64,
    quick: f64,
    shift: u32,
    /// The quick measure when the shift last changed.
    at_step: f64,
    /// New server requests per second (shed ones too), over QUICK.
    requests: f64,
    /// No new start before this (shedding did not lower the cost).
    held_until: Option<Instant>,
    /// When the kernel last shed (for SHEDDING's grace).
    shed_at: Option<Instant>,
    /// Consecutive readings over the memory limit.
    over_readings: u32,
    /// No memory shedding before this (it could not help).
    memory_held_until: Option<Instant>,
    over_memory: bool,
    memory: u64,
    changed: Instant,
}

impl Guard {
    /// `uprobe_hit_ns`: what a uprobe hit costs a target here, calibrated at start.
    pub fn new(s: GuardSettings, uprobe_hit_ns: f64) -> Self {
        Self {
            s,
            uprobe_hit_ns,
            last: None,
            slow: 0.0,
            quick: 0.0,
            shift: 0,
            at_step: 0.0,
            requests: 0.0,
            held_until: None,
            shed_at: None,
            over_readings: 0,
            memory_held_until: None,
            over_memory: false,
            memory: 0,
            changed: Instant::now(),
        }
    }

    /// The shift the kernel should use now (0: keep every request).
    pub fn shift(&self) -> u32 {
        if self.over_memory { shed::KEEP_NONE } else { self.shift }
    }

    /// Senses and decides (the kernel shift to apply is `shift()`). `held`: spans taken
    /// for export and not out yet.
    pub fn tick(&mut self, kernel: &[u64; COUNTER_SLOTS as usize], held: u64) {
        let now = Reading {
            at: Instant::now(),
            cpu_seconds: own_cpu_seconds(),
            uprobe_hits: kernel[Counter::UprobeHits as usize],
            socket_ops: kernel[Counter::SocketOps as usize],
            requests: kernel[Counter::RequestsSeen as usize],
        };
        if let Some(last) = self.last.replace(now) {
            let dt = now.at.duration_since(last.at).as_secs_f64();
            if dt > 0.0 {
                let probes_ns = now.uprobe_hits.saturating_sub(last.uprobe_hits) as f64 * self.uprobe_hit_ns
                    + now.socket_ops.saturating_sub(last.socket_ops) as f64 * SOCKET_OP_NS;
                let cost = ((now.cpu_seconds - last.cpu_seconds).max(0.0) + probes_ns / 1e9) / dt;
                let requests = now.requests.saturating_sub(last.requests) as f64 / dt;
                let quick = 1.0 - (-dt / QUICK.as_secs_f64()).exp();
                self.slow += (cost - self.slow) * (1.0 - (-dt / SLOW.as_secs_f64()).exp());
                self.quick += (cost - self.quick) * quick;
                self.requests += (requests - self.requests) * quick;
                self.decide_cpu(now.at);
            }
        }
        self.memory = own_anon_bytes();
        if self.s.memory_limit.is_some_and(|l| self.memory as f64 > l as f64 * MEMORY_RECOVERED) {
            reclaim_freed();
            self.memory = own_anon_bytes();
        }
        self.decide_memory(now.at, held);
        OVER_MEMORY_LIMIT.store(self.over_memory, Relaxed);
        if self.shift() != 0 {
            self.shed_at = Some(now.at);
        }
        SHEDDING.store(self.shed_at.is_some_and(|t| now.at.duration_since(t) < GRACE), Relaxed);
    }

    fn decide_cpu(&mut self, now: Instant) {
        let Some(budget) = self.s.cpu_budget else { return };
        let (pct, budget_pct) = ((self.quick * 100.0) as u64, (budget * 100.0) as u64);
        if self.shift > 0 && self.requests < 1.0 {
            self.stop_shedding(now, "no requests arrive");
            return;
        }
        if now.duration_since(self.changed) < SETTLE {
            return;
        }
        if self.shift == 0 {
            if self.slow > budget && self.quick > budget && self.requests >= 1.0 && self.held_until.is_none_or(|t| now >= t) {
                self.step(now, 1);
                tracing::warn!(
                    cost_percent = pct,
                    budget_percent = budget_pct,
                    "over the CPU budget (--cpu-budget): shedding, the kernel keeps 1 in 2 new server requests (requests_shed)"
                );
            }
        } else if self.quick > budget {
            let helped = self.quick < self.at_step * HELPED;
            if self.shift == 1 && !helped {
                // The cost is not the requests' (runtime uprobes, attaching, profiling):
                // shedding them loses spans and saves nothing.
                self.held_until = Some(now + HOLD_OFF);
                self.stop_shedding(now, "shedding requests did not lower the cost");
                tracing::warn!(
                    cost_percent = pct,
                    budget_percent = budget_pct,
                    "over the CPU budget, but not because of requests: not shedding them (tried again in 60 s)"
                );
            } else if helped && self.shift < MAX_SHIFT {
                self.step(now, self.shift + 1);
                tracing::debug!(
                    cost_percent = pct,
                    budget_percent = budget_pct,
                    "still over the CPU budget: the kernel keeps 1 in {} new server requests",
                    1u32 << self.shift
                );
            }
        } else if self.quick < budget / 2.0 {
            if self.shift == 1 {
                self.stop_shedding(now, "back under the CPU budget");
            } else {
                self.step(now, self.shift - 1);
                tracing::debug!(
                    cost_percent = pct,
                    budget_percent = budget_pct,
                    "under the CPU budget: the kernel keeps 1 in {} new server requests",
                    1u32 << self.shift
                );
            }
        }
    }

    fn step(&mut self, now: Instant, shift: u32) {
        self.shift = shift;
        self.at_step = self.quick;
        self.changed = now;
    }

    fn stop_shedding(&mut self, now: Instant, why: &str) {
        let deepest = self.shift;
        self.step(now, 0);
        // The slow measure starts again from here: the load that tripped it is gone.
        self.slow = self.quick;
        tracing::info!(cost_percent = (self.quick * 100.0) as u64, deepest_shift = deepest, "not shedding any more ({why}): every request is traced again");
    }

    /// `held`: spans taken for export and not yet out (what refusing new ones lets drain).
    fn decide_memory(&mut self, now: Instant, held: u64) {
        let Some(limit) = self.s.memory_limit else { return };
        let mib = |b: u64| b >> 20;
        // Two readings in a row: a peak of a second (reading a new target's executable)
        // is no trend.
        self.over_readings = if self.memory > limit { self.over_readings + 1 } else { 0 };
        if !self.over_memory {
            if self.over_readings >= 2 && self.memory_held_until.is_none_or(|t| now >= t) {
                self.over_memory = true;
                tracing::warn!(
                    memory_mib = mib(self.memory),
                    limit_mib = mib(limit),
                    "over the memory limit (--memory-limit): shedding, no new spans are taken (spans_dropped_memory_limit, requests_shed)"
                );
            }
        } else if (self.memory as f64) < limit as f64 * MEMORY_RECOVERED {
            self.over_memory = false;
            tracing::info!(memory_mib = mib(self.memory), limit_mib = mib(limit), "back under the memory limit: spans are taken again");
        } else if held == 0 && self.memory <= limit {
            // What shedding frees is gone (the allocator may keep some of it): no reason to
            // refuse spans while under the limit.
            self.over_memory = false;
            tracing::info!(
                memory_mib = mib(self.memory),
                limit_mib = mib(limit),
                "back under the memory limit (nothing held for export): spans are taken again"
            );
        } else if held == 0 && self.over_readings >= 2 {
            // Over the limit with nothing held: refusing spans cannot bring it down.
            self.over_memory = false;
            self.memory_held_until = Some(now + HOLD_OFF);
            tracing::warn!(
                memory_mib = mib(self.memory),
                limit_mib = mib(limit),
                "over the memory limit with no span held for export: shedding cannot help, not shedding (tried again in 60 s); raise --memory-limit"
            );
        }
    }

    /// The gauges named in GAUGES.
    pub fn gauges(&self) -> [(&'static str, u64); 5] {
        let permille = |cores: f64| (cores * 1000.0).round() as u64;
        [
            (GAUGES[0], permille(self.slow)),
            (GAUGES[1], self.s.cpu_budget.map_or(0, permille)),
            (GAUGES[2], self.shift() as u64),
            (GAUGES[3], self.memory),
            (GAUGES[4], self.s.memory_limit.unwrap_or(0)),
        ]
    }
}

/// The agent's CPU time (user + system, every thread) in seconds.
fn own_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// Gives the OS back what the allocator holds freed. The run loop's thread makes the spans
/// and the export tasks free them on other threads: the allocator collects such frees
/// into the owning thread's pages only when that thread allocates from them again, so an
/// agent idle after draining its export queue kept it all (76 MiB with a 64 MiB limit and
/// nothing held). Called on the run loop's thread; mimalloc's `mi_collect(force)` also
/// returns what other threads left.
fn reclaim_freed() {
    // SAFETY: mimalloc's collection entry point, callable from any thread at any time.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// The agent's anonymous resident memory (RssAnon) in bytes.
pub fn own_anon_bytes() -> u64 {
    crate::model::proc::own_status_kib("RssAnon") * 1024
}

/// The default memory limit: 80 % of the memory limit of the agent's cgroup (its own or
/// the tightest of its ancestors'), None when there is none. The rest is room for what the
/// cgroup is also charged that RssAnon does not count (page cache, the kernel maps).
pub fn cgroup_memory_default() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    cgroup_limit(&own, std::path::Path::new("/sys/fs/cgroup")).map(|l| l / 5 * 4)
}

/// The tightest memory limit on the path of `proc_cgroup` (the text of /proc/self/cgroup)
/// under `root`: cgroup v2 `memory.max`, else v1 `memory/.../memory.limit_in_bytes`.
fn cgroup_limit(proc_cgroup: &str, root: &std::path::Path) -> Option<u64> {
    let read = |p: std::path::PathBuf| std::fs::read_to_string(p).ok().and_then(|t| t.trim().parse::<u64>().ok());
    let mut best: Option<u64> = None;
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let (base, file) = match controllers {
            "" => (root.to_path_buf(), "memory.max"),
            c if c.split(',').any(|c| c == "memory") => (root.join("memory"), "memory.limit_in_bytes"),
            _ => continue,
        };
        // The path itself and each ancestor (a pod's limit sits on its parent).
        let mut dir = base.join(path.trim_start_matches('/'));
        loop {
            // v1 says "no limit" with a huge number.
            if let Some(l) = read(dir.join(file)).filter(|l| *l < 1 << 60) {
                best = Some(best.map_or(l, |b| b.min(l)));
            }
            if dir == base || !dir.pop() {
                break;
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tightest_cgroup_limit_on_the_path_is_found() {
        let root = std::env::temp_dir().join(format!("zt-cgroup-{}", std::process::id()));
        let pod = root.join("kubepods/pod1");
        std::fs::create_dir_all(pod.join("ctr")).unwrap();
        std::fs::write(root.join("kubepods/memory.max"), "max\n").unwrap();
        std::fs::write(pod.join("memory.max"), "268435456\n").unwrap();
        std::fs::write(pod.join("ctr/memory.max"), "max\n").unwrap();
        assert_eq!(cgroup_limit("0::/kubepods/pod1/ctr\n", &root), Some(256 << 20));
        // No limit anywhere: none.
        assert_eq!(cgroup_limit("0::/kubepods\n", &root), None);
        // cgroup v1: the memory controller's hierarchy, a huge number meaning none.
        let v1 = root.join("memory/docker/abc");
        std::fs::create_dir_all(&v1).unwrap();
        std::fs::write(v1.join("memory.limit_in_bytes"), "134217728\n").unwrap();
        std::fs::write(root.join("memory/memory.limit_in_bytes"), "9223372036854771712\n").unwrap();
        assert_eq!(cgroup_limit("4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n", &root), Some(128 << 20));
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// One CPU decision at second `at` after the measures are set (None: unchanged), and
    /// the shift it must leave.
    struct Step {
        at: u64,
        slow: Option<f64>,
        quick: Option<f64>,
        requests: Option<f64>,
        shift: u32,
        why: &'static str,
    }

    fn step(at: u64, slow: Option<f64>, quick: Option<f64>, requests: Option<f64>, shift: u32, why: &'static str) -> Step {
        Step { at, slow, quick, requests, shift, why }
    }

    /// A guard with a budget of 10 % of a core, taken through `steps`.
    fn run_cpu(steps: &[Step]) -> Guard {
        let mut g = Guard::new(GuardSettings { cpu_budget: Some(0.1), memory_limit: None }, 9000.0);
        let t0 = Instant::now() - Duration::from_secs(1000);
        g.changed = t0;
        for s in steps {
            g.slow = s.slow.unwrap_or(g.slow);
            g.quick = s.quick.unwrap_or(g.quick);
            g.requests = s.requests.unwrap_or(g.requests);
            g.decide_cpu(t0 + Duration::from_secs(s.at));
            assert_eq!(g.shift, s.shift, "at {} s: {}", s.at, s.why);
        }
        g
    }

    #[test]
    fn shedding_starts_over_budget_deepens_while_it_helps_and_recovers() {
        let g = run_cpu(&[
            step(10, Some(0.05), Some(0.5), Some(4000.0), 0, "a burst does not move the slow measure over the budget at once"),
            step(20, Some(0.2), None, None, 1, "a load that stays does"),
            step(22, None, Some(0.3), None, 1, "not again before SETTLE"),
            step(27, None, None, None, 2, "it helped (0.5 -> 0.3) and the cost is still over: deeper"),
            step(34, None, None, None, 2, "it did not help this time: it stays"),
            step(41, None, Some(0.07), None, 2, "between half the budget and the budget: it stays"),
            step(48, None, Some(0.01), None, 1, "well under: one step back"),
            step(55, None, None, None, 0, "and the last"),
        ]);
        assert_eq!(g.slow, 0.01, "the slow measure starts again from the quick one");
    }

    #[test]
    fn shedding_that_does_not_lower_the_cost_stops_and_holds_off() {
        run_cpu(&[
            step(10, Some(0.5), Some(0.5), Some(100.0), 1, "over the budget"),
            step(20, None, None, None, 0, "the cost stayed where it was: not the requests'"),
            step(40, Some(0.5), None, None, 0, "held off"),
            step(90, None, None, None, 1, "tried again after the hold-off"),
            step(91, None, None, Some(0.0), 0, "no requests at all: nothing to shed"),
        ]);
    }

    #[test]
    fn memory_over_the_limit_keeps_nothing_until_well_under_or_drained() {
        let mut g = Guard::new(GuardSettings { cpu_budget: None, memory_limit: Some(100 << 20) }, 9000.0);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        g.memory = 101 << 20;
        g.decide_memory(at(1), 5000);
        assert_eq!(g.shift(), 0, "one reading over is no trend");
        g.decide_memory(at(2), 5000);
        assert_eq!(g.shift(), shed::KEEP_NONE);
        // Under the limit, still spans held: stays.
        g.memory = 90 << 20;
        g.decide_memory(at(3), 5000);
        assert_eq!(g.shift(), shed::KEEP_NONE);
        g.memory = 70 << 20;
        g.decide_memory(at(4), 5000);
        assert_eq!(g.shift(), 0);
        // Over again; the queue drains and memory stays at 90 %: taken again.
        g.memory = 101 << 20;
        g.decide_memory(at(5), 5000);
        g.decide_memory(at(6), 5000);
        assert_eq!(g.shift(), shed::KEEP_NONE);
        g.memory = 90 << 20;
        g.decide_memory(at(7), 0);
        assert_eq!(g.shift(), 0);
        // Over with nothing held: shedding cannot help, held off for a minute.
        g.memory = 120 << 20;
        g.decide_memory(at(8), 0);
        g.decide_memory(at(9), 0);
        assert_eq!(g.shift(), shed::KEEP_NONE);
        g.decide_memory(at(10), 0);
        assert_eq!(g.shift(), 0);
        g.decide_memory(at(20), 0);
        assert_eq!(g.shift(), 0, "held off");
        g.decide_memory(at(80), 0);
        assert_eq!(g.shift(), shed::KEEP_NONE, "tried again");
    }
}
