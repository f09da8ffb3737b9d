//! The profiler's own thread: CPU samples from the run loop (with the span each belongs to,
//! resolved there) are unwound, symbolized and aggregated here, away from the loop that
//! assembles spans. The loop keeps only what it needs at once: samples per span, added to
//! each span as it finishes. Bounded: a full queue drops samples (counted), the aggregate
//! holds at most MAX_STACKS distinct stacks per window.
use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

use super::{
    model::{Labels, ProcessInfo, Profile, StackSample},
    native::{NativeProfiler, UserStack},
};
use crate::{
    correlate::Clock,
    events::CpuSample,
    model::proc::FileId,
    spans::{Span, TraceId, Value},
    symbols::{Executable, gosym::GoSymbolizer},
};

/// Samples waiting for the profiler thread, at most.
const QUEUE: usize = 4096;
/// Distinct (stack, labels) entries per window; more samples are dropped (counted).
const MAX_STACKS: usize = 100_000;
/// Spans whose sample counts are kept while they run.
const MAX_SPANS: usize = 65_536;
/// Forgotten processes whose names are kept until their window is taken.
const MAX_GONE: usize = 65_536;
/// User frames unwound per sample, at most.
const MAX_FRAMES: usize = 128;

/// Counters of the profiler (read by the run loop's stats).
#[derive(Default, Debug)]
pub struct ProfilerStats {
    /// Samples taken in (from the kernel).
    pub samples: AtomicU64,
    /// Samples dropped: the queue to the profiler thread was full, or too many stacks.
    pub dropped: AtomicU64,
    /// Samples whose user stack gave no frame at all.
    pub empty_stacks: AtomicU64,
    /// Profiles the exporter could not take (its queue full).
    pub profiles_dropped: AtomicU64,
    /// Profiles the collector accepted, and failed exports.
    pub exported: AtomicU64,
    pub export_errors: AtomicU64,
}

impl ProfilerStats {
    /// The counters as the agent's stats name them.
    pub fn snapshot(&self) -> [(&'static str, u64); 6] {
        [
            ("cpu_samples", self.samples.load(Ordering::Relaxed)),
            ("cpu_samples_dropped", self.dropped.load(Ordering::Relaxed)),
            ("cpu_samples_without_user_stack", self.empty_stacks.load(Ordering::Relaxed)),
            ("profiles_exported", self.exported.load(Ordering::Relaxed)),
            ("profiles_dropped", self.profiles_dropped.load(Ordering::Relaxed)),
            ("profile_export_errors", self.export_errors.load(Ordering::Relaxed)),
        ]
    }
}

/// What the run loop tells the profiler thread.
enum Msg {
    Sample(Box<CpuSample>, Option<(TraceId, u64)>),
    Process(ProcessInfo),
    Forget(u32),
    Flush(std::sync::mpsc::Sender<Profile>),
}

/// The run loop's end of the profiler.
pub struct Profiler {
    tx: SyncSender<Msg>,
    thread: Option<JoinHandle<()>>,
    pub stats: Arc<ProfilerStats>,
    /// Samples per kernel span id while its span runs.
    per_span: HashMap<u64, u32>,
    pub period_ns: u64,
}

impl Profiler {
    /// Starts the profiler thread. `every`: a window's profile is handed to `sink` this
    /// often (OTLP export); None: only at the end (`finish`).
    pub fn start(frequency: u64, every: Option<(Duration, tokio::sync::mpsc::Sender<Profile>)>, stats: Arc<ProfilerStats>) -> std::io::Result<Self> {
        let period_ns = 1_000_000_000 / frequency.max(1);
        let (tx, rx) = sync_channel(QUEUE);
        let st = stats.clone();
        let thread = std::thread::Builder::new().name("profiler".into()).spawn(move || worker(rx, period_ns, every, st))?;
        Ok(Self { tx, thread: Some(thread), stats, per_span: HashMap::default(), period_ns })
    }

    /// A sample from the kernel and the span it belongs to (trace, kernel span id).
    pub fn offer(&mut self, s: Box<CpuSample>, span: Option<(TraceId, u64)>) {
        self.stats.samples.fetch_add(1, Ordering::Relaxed);
        if let Some((_, id)) = span {
            if self.per_span.len() >= MAX_SPANS && !self.per_span.contains_key(&id) {
                self.per_span.clear();
            }
            *self.per_span.entry(id).or_default() += 1;
        }
        match self.tx.try_send(Msg::Sample(s, span)) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Adds to each finished span the CPU samples taken while it was active on a
    /// goroutine or thread: `zerotrace.cpu.samples` and `zerotrace.cpu.time_ns`.
    pub fn annotate(&mut self, spans: &mut [Span]) {
        if self.per_span.is_empty() {
            return;
        }
        for sp in spans {
            let id = u64::from_be_bytes(sp.span_id.0);
            if let Some(n) = self.per_span.remove(&id) {
                sp.attributes.push(("zerotrace.cpu.samples", Value::Int(i64::from(n))));
                sp.attributes.push(("zerotrace.cpu.time_ns", Value::Int((u64::from(n) * self.period_ns) as i64)));
            }
        }
    }

    /// A process to profile (its name in the profile's resource).
    pub fn process(&self, info: ProcessInfo) {
        let _ = self.tx.send(Msg::Process(info));
    }

    /// The process is gone: what it left is kept, its maps are dropped.
    pub fn forget(&self, pid: u32) {
        let _ = self.tx.send(Msg::Forget(pid));
    }

    /// The last window's profile; stops the thread.
    pub fn finish(mut self) -> Profile {
        let (tx, rx) = std::sync::mpsc::channel();
        let profile = if self.tx.send(Msg::Flush(tx)).is_ok() { rx.recv().unwrap_or_default() } else { Profile::default() };
        drop(self.tx);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        profile
    }
}

fn worker(rx: Receiver<Msg>, period_ns: u64, every: Option<(Duration, tokio::sync::mpsc::Sender<Profile>)>, stats: Arc<ProfilerStats>) {
    let mut w = Worker::new(period_ns, stats);
    let mut last = Instant::now();
    loop {
        let wait = every.as_ref().map_or(Duration::from_secs(3600), |(d, _)| d.saturating_sub(last.elapsed()));
        match rx.recv_timeout(wait) {
            Ok(Msg::Sample(s, span)) => w.add(&s, span),
            Ok(Msg::Process(p)) => {
                w.gone.retain(|&g| g != p.pid);
                w.processes.insert(p.pid, p);
            }
            Ok(Msg::Forget(pid)) => w.forget(pid),
            Ok(Msg::Flush(reply)) => {
                let _ = reply.send(w.take());
                return;
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        if let Some((d, sink)) = &every
            && last.elapsed() >= *d
        {
            last = Instant::now();
            let p = w.take();
            if !p.samples.is_empty() && sink.try_send(p).is_err() {
                w.stats.profiles_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Go's tables of one executable (None: unreadable), with the sample count of their last
/// use, by (device, inode).
type GoTables = HashMap<FileId, (Option<Arc<GoSymbolizer>>, u64)>;

/// Bytes of Go tables kept for executables no traced process runs any more.
const MAX_GO_TABLE_BYTES: usize = 64 << 20;

struct Worker {
    period_ns: u64,
    stats: Arc<ProfilerStats>,
    clock: Clock,
    native: NativeProfiler,
    go: GoTables,
    /// Per Go process: the executable's identity (its tables are in `go`).
    go_pids: HashMap<u32, Option<FileId>>,
    /// Lookups of Go tables so far (their clock of last use).
    uses: u64,
    /// Aggregated samples of this window: index by (labels, addresses).
    index: HashMap<(Labels, Vec<u64>), usize>,
    samples: Vec<StackSample>,
    processes: BTreeMap<u32, ProcessInfo>,
    /// Processes forgotten during this window (their names go with it).
    gone: Vec<u32>,
    window_start: u64,
}

impl Worker {
    fn new(period_ns: u64, stats: Arc<ProfilerStats>) -> Self {
        let clock = Clock::system();
        let window_start = clock.to_unix(Clock::monotonic_now());
        Self {
            period_ns,
            stats,
            clock,
            native: NativeProfiler::new(),
            go: HashMap::default(),
            go_pids: HashMap::default(),
            uses: 0,
            index: HashMap::default(),
            samples: Vec::new(),
            processes: BTreeMap::new(),
            gone: Vec::new(),
            window_start,
        }
    }

    fn forget(&mut self, pid: u32) {
        self.native.forget(pid);
        self.go_pids.remove(&pid);
        // Its name is still needed for this window's samples: dropped when it is taken (or,
        // in a window that never ends, once MAX_GONE processes went: the oldest half).
        if self.gone.len() >= MAX_GONE {
            for old in self.gone.drain(..MAX_GONE / 2) {
                self.processes.remove(&old);
            }
        }
        self.gone.push(pid);
    }

    /// Go's tables for process `pid` (read once per executable).
    /// Over MAX_GO_TABLE_BYTES, the least recently used tables of executables no process
    /// runs any more are dropped (read again if one comes back).
    fn go_tables(&mut self, pid: u32) -> Option<Arc<GoSymbolizer>> {
        let id = *self.go_pids.entry(pid).or_insert_with(|| crate::model::proc::exe_identity(pid));
        let id = id?;
        self.uses += 1;
        if let Some((g, used)) = self.go.get_mut(&id) {
            *used = self.uses;
            return g.clone();
        }
        // An executable that cannot be opened or read is remembered as such (None).
        let g = Executable::open(&crate::model::proc::exe_open_path(pid)).ok().and_then(|exe| match GoSymbolizer::new(&exe) {
            Ok(g) => Some(Arc::new(g)),
            Err(e) => {
                tracing::warn!(pid, error = %e, "cannot read Go's function table for profiles; Go frames stay unsymbolized");
                None
            }
        });
        // The bound is on the tables of executables no process runs (those in use stay).
        let size = |g: &Option<Arc<GoSymbolizer>>| g.as_ref().map_or(0, |g| g.bytes());
        let running: HashSet<FileId> = self.go_pids.values().flatten().copied().collect();
        let unused = self.go.iter().filter(|&(k, _)| !running.contains(k)).map(|(k, (g, used))| (*k, *used, size(g))).collect();
        for k in super::over_bound(unused, MAX_GO_TABLE_BYTES) {
            self.go.remove(&k);
        }
        self.go.insert(id, (g.clone(), self.uses));
        g
    }

    fn add(&mut self, s: &CpuSample, span: Option<(TraceId, u64)>) {
        let go = !s.native;
        let user: Vec<u64> = if go {
            s.ustack.clone()
        } else {
            let st = UserStack { ip: s.ip, sp: s.sp, bp: s.bp, base: s.stack_base, stack: &s.stack };
            self.native.unwind(s.pid, &st, MAX_FRAMES)
        };
        if user.is_empty() {
            self.stats.empty_stacks.fetch_add(1, Ordering::Relaxed);
        }
        let labels = Labels { pid: s.pid, tid: s.tid, goroutine: s.goid, trace_id: span.map(|(t, _)| t.0), span_id: span.map(|(_, id)| id) };
        let mut addrs = Vec::with_capacity(s.kstack.len() + user.len() + 1);
        addrs.extend_from_slice(&s.kstack);
        // A marker between kernel and user frames keeps (k=[a], u=[b]) apart from (k=[], u=[a, b]).
        addrs.push(0);
        addrs.extend_from_slice(&user);
        let ts = self.clock.to_unix(s.ts_ns);
        let slot = match self.index.entry((labels, addrs)) {
            std::collections::hash_map::Entry::Occupied(o) => {
                let e = &mut self.samples[*o.get()];
                e.count += 1;
                e.timestamps_unix_ns.push(ts);
                return;
            }
            std::collections::hash_map::Entry::Vacant(v) => v,
        };
        if self.samples.len() >= MAX_STACKS {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let labels = slot.key().0.clone();
        slot.insert(self.samples.len());
        // Kernel callers are looked up at their return address - 1 (NativeProfiler caches).
        let mut locations = self.native.symbolize_kernel(&s.kstack);
        if !user.is_empty() {
            let tables = if go { self.go_tables(s.pid) } else { None };
            let lines = tables.as_ref().map(|t| move |vaddr: u64| t.lines(vaddr));
            let user_locs = match &lines {
                Some(f) => self.native.symbolize(s.pid, &user, Some(f)),
                None => self.native.symbolize(s.pid, &user, None),
            };
            locations.extend(user_locs);
        }
        self.samples.push(StackSample { locations, labels, count: 1, timestamps_unix_ns: vec![ts] });
    }

    /// This window's profile; a new window starts.
    fn take(&mut self) -> Profile {
        self.clock.refresh();
        let now = self.clock.to_unix(Clock::monotonic_now());
        self.index.clear();
        let samples = std::mem::take(&mut self.samples);
        let mut processes: Vec<ProcessInfo> = Vec::new();
        let mut seen: Vec<u32> = samples.iter().map(|s| s.labels.pid).collect();
        seen.sort_unstable();
        seen.dedup();
        for pid in seen {
            processes.push(self.processes.get(&pid).cloned().unwrap_or_else(|| {
                let comm = crate::model::proc::comm(pid);
                ProcessInfo { pid, service_name: comm.clone().unwrap_or_else(|| format!("pid-{pid}")), executable: comm.unwrap_or_default() }
            }));
        }
        let p = Profile { period_ns: self.period_ns, start_unix_ns: self.window_start, duration_ns: now.saturating_sub(self.window_start), samples, processes };
        self.window_start = now;
        for pid in self.gone.drain(..) {
            self.processes.remove(&pid);
        }
        p
    }
}
