//! Where finished spans and CPU samples go: the OTLP exporter, `tail`'s trees, `--print`
//! lines, the control service's watchers, the RED metrics, and the profiler. Adding an
//! output means adding it here: `start` builds it, `deliver` feeds it, `forget` and
//! `finish` end it.
use std::{
    collections::{HashSet, VecDeque},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

use super::{RunError, RunSettings, stats, targets::Targets};
use crate::{
    control::Control,
    correlate::Correlator,
    events::CpuSample,
    export::{
        ExportSettings, ExportStats, Exporter,
        metrics::{MetricsSink, Red, SharedRed},
        otlp::OtlpExport,
        print, profiles,
        resource::Resources,
        sink::{SinkError, SinkState},
        tail::Tail,
    },
    model::proc,
    probes::Probes,
    profile::{
        ProfileSettings,
        collect::{Profiler, ProfilerStats},
        model::ProcessInfo,
    },
    spans::Span,
};

/// How much CPU time one OTLP profile covers.
const PROFILE_WINDOW: Duration = Duration::from_secs(10);
/// How long the resource of a process that is no longer traced is kept (its last spans
/// are exported by then).
const RESOURCE_AFTERLIFE: Duration = Duration::from_secs(60);

/// RED metrics and the agent's counters over OTLP: what the run loop and the export task
/// share.
#[derive(Clone)]
struct MetricsState {
    red: SharedRed,
    /// The last counters, for the next export.
    snapshot: Arc<Mutex<Vec<(&'static str, u64)>>>,
    errors: Arc<AtomicU64>,
    start_ns: u64,
}

struct Metrics {
    state: MetricsState,
    task: tokio::task::JoinHandle<()>,
}

/// The CPU profiler and where its profiles go.
struct Profiling {
    profiler: Profiler,
    settings: ProfileSettings,
    /// The task sending each window over OTLP.
    task: Option<tokio::task::JoinHandle<()>>,
    /// Processes the profiler knows by name.
    announced: HashSet<u32>,
}

#[derive(Default)]
pub struct Outputs {
    print: bool,
    export: Option<OtlpExport>,
    pub export_stats: Arc<ExportStats>,
    export_settings: Option<ExportSettings>,
    /// Resources of traced processes by pid (the exporters' and the targets').
    pub resources: Resources,
    /// Processes no longer traced, and since when: their resource goes a minute later.
    gone: VecDeque<(u32, Instant)>,
    tail: Option<Tail>,
    control: Option<Control>,
    /// The control socket this agent made (removed at exit; never someone else's).
    own_socket: Option<PathBuf>,
    metrics: Option<Metrics>,
    profiling: Option<Profiling>,
    profiler_stats: Arc<ProfilerStats>,
    /// What the metrics and profiles sinks held back or saw refused.
    metrics_sink: Arc<SinkState>,
    profiles_sink: Arc<SinkState>,
    metrics_errors: Arc<AtomicU64>,
}

impl Outputs {
    pub async fn start(s: &RunSettings, probes: &mut Probes) -> Result<Self, RunError> {
        let mut o = Outputs { print: s.print, export_settings: Some(s.export.clone()), tail: s.tail.clone().map(Tail::new), ..Default::default() };
        if s.export.exporter == Exporter::Otlp {
            o.export = Some(OtlpExport::start(&s.export, o.resources.clone(), o.export_stats.clone())?);
            tracing::info!(endpoint = %s.export.endpoint, protocol = ?s.export.protocol, "exporting spans over OTLP");
        }
        if let Some(p) = &s.profile {
            o.profiling = start_profiling(p, probes, &s.export, &o.resources, &o.profiler_stats, &o.profiles_sink)?;
        }
        if let Some(path) = &s.control_socket {
            o.control = crate::control::serve(path).await;
            o.own_socket = o.control.is_some().then(|| path.clone());
        }
        if let (Some(addr), Some(token)) = (s.control_tcp, s.control_token.as_deref()) {
            let c = o.control.get_or_insert_with(Control::new);
            crate::control::serve_tcp(addr, token, c).await;
        }
        if let Some(every) = s.metrics_interval {
            o.metrics = Some(start_metrics(every, &s.export, &o.resources, &o.metrics_sink, &o.metrics_errors));
        }
        Ok(o)
    }

    /// A CPU sample from the kernel: the profiler takes it with the span it ran for.
    pub fn sample(&mut self, smp: Box<CpuSample>, correlator: &mut Correlator) {
        if let Some(p) = &mut self.profiling {
            let span = correlator.sample_span(smp.pid, smp.tid, smp.span_id, smp.native);
            p.profiler.offer(smp, span);
        }
    }

    /// Hands the spans the correlator finished to every output (and empties `spans`).
    pub fn deliver(&mut self, spans: &mut Vec<Span>, correlator: &mut Correlator, targets: &Targets<'_>) {
        if let Some(p) = &mut self.profiling {
            p.profiler.annotate(spans);
        }
        // Metrics count every request, sampled or not (a 10% sampler must not make rates
        // 10x lower).
        if let Some(m) = &self.metrics
            && !spans.is_empty()
        {
            let mut r = m.state.red.lock().expect("not poisoned");
            spans.iter().for_each(|sp| r.record(sp));
        }
        let before = spans.len();
        spans.retain(|sp| correlator.sampling.keeps(&sp.trace_id));
        correlator.sampling.dropped += (before - spans.len()) as u64;
        let unknown: Arc<str> = Arc::from("?");
        let service = |pid: u32| targets.service(pid).unwrap_or(&unknown);
        if let Some(c) = self.control.as_ref().filter(|c| c.watched()) {
            for sp in spans.iter() {
                c.publish(sp, service(sp.pid));
            }
        }
        if let Some(t) = &mut self.tail {
            let now = Instant::now();
            let mut out = Vec::new();
            for sp in spans.iter() {
                out.extend(t.offer(sp, service(sp.pid), now));
            }
            out.extend(t.due(now));
            print::print(&out);
        }
        if spans.is_empty() {
            return;
        }
        if self.print {
            let lines: Vec<String> = spans.iter().map(|sp| print::line(sp, service(sp.pid))).collect();
            print::print(&lines);
        }
        match &mut self.export {
            Some(e) => e.offer_all(spans),
            None => spans.clear(),
        }
    }

    /// Traced process `pid` is gone (or runs another program).
    pub fn forget(&mut self, pid: u32) {
        if let Some(p) = &self.profiling {
            p.profiler.forget(pid);
        }
        // Its metric series stay as long as its resource: the calls it made just before it
        // ended are exported at the next interval.
        self.gone.push_back((pid, Instant::now()));
    }

    /// Tells the profiler the names of traced processes it has not heard of.
    pub fn announce(&mut self, targets: &Targets<'_>) {
        let Some(p) = &mut self.profiling else { return };
        for (pid, service) in targets.services() {
            if p.announced.insert(pid) {
                let executable =
                    proc::exe_link(pid).ok().and_then(|e| e.file_name().map(|n| n.to_string_lossy().into_owned())).unwrap_or_else(|| service.to_string());
                p.profiler.process(ProcessInfo { pid, service_name: service.to_string(), executable });
            }
        }
        p.announced.retain(|pid| targets.contains(*pid));
    }

    /// Once a second: resources and metric series of processes gone for a minute are dropped.
    pub fn housekeeping(&mut self, targets: &Targets<'_>) {
        while self.gone.front().is_some_and(|(_, t)| t.elapsed() > RESOURCE_AFTERLIFE) {
            let (pid, _) = self.gone.pop_front().expect("checked");
            if !targets.contains(pid) {
                self.resources.lock().expect("not poisoned").remove(&pid);
                if let Some(m) = &self.metrics {
                    m.state.red.lock().expect("not poisoned").forget_pid(pid);
                }
            }
        }
    }

    /// Whether some output shows the agent's counters (status, metrics).
    pub fn wants_counters(&self) -> bool {
        self.metrics.is_some() || self.control.is_some()
    }

    pub fn publish_counters(&self, counters: Vec<(&'static str, u64)>, targets: &Targets<'_>, started: Instant, hooks: &str) {
        if let Some(c) = &self.control {
            c.set_status(stats::status(targets, &counters, started, hooks));
        }
        if let Some(m) = &self.metrics {
            *m.state.snapshot.lock().expect("not poisoned") = counters;
        }
    }

    /// The outputs' own counters (export and profiler).
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        let mut v: Vec<_> = self.profiler_stats.snapshot().into();
        v.extend(self.export_stats.snapshot());
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        v.extend([
            ("metrics_export_errors", n(&self.metrics_errors)),
            ("metrics_unsupported", n(&self.metrics_sink.unsupported)),
            ("metrics_held_retry_after", n(&self.metrics_sink.held)),
            ("profiles_unsupported", n(&self.profiles_sink.unsupported)),
            ("profiles_held_retry_after", n(&self.profiles_sink.held)),
        ]);
        v
    }

    /// At exit: the last tail trees, the profile (files, OTLP), the last metrics, every span
    /// exported (at most `deadline` each), the control socket removed. `counters` are the
    /// pipeline's; returns the outputs' own, final.
    pub async fn finish(mut self, targets: &Targets<'_>, counters: &[(&'static str, u64)], deadline: Duration) -> Vec<(&'static str, u64)> {
        if let Some(t) = self.tail.as_mut() {
            print::print(&t.flush());
        }
        self.announce(targets);
        if let Some(p) = self.profiling.take() {
            finish_profile(p, self.export_settings.as_ref(), &self.resources, &self.profiler_stats, &self.profiles_sink, deadline).await;
        }
        if let Some(m) = self.metrics.take() {
            // The totals up to now.
            m.task.abort();
            let mut all = counters.to_vec();
            all.extend(self.counters());
            *m.state.snapshot.lock().expect("not poisoned") = all;
            if let Some(settings) = &self.export_settings {
                let mut sink = MetricsSink::new(settings, self.metrics_sink.clone());
                let _ = tokio::time::timeout(deadline, export_metrics(&mut sink, &m.state, &self.resources)).await;
            }
        }
        if let Some(e) = self.export.take() {
            e.shutdown(deadline).await;
        }
        if let Some(path) = &self.own_socket {
            crate::control::unlink(path);
        }
        self.counters()
    }
}

/// CPU profiles: the perf_event program on every CPU, a thread that unwinds and
/// symbolizes, and (OTLP) a task that sends each window. `run` goes on tracing when the
/// kernel refuses the sampling program; `zerotrace profile` fails.
fn start_profiling(
    p: &ProfileSettings,
    probes: &mut Probes,
    export: &ExportSettings,
    resources: &Resources,
    stats: &Arc<ProfilerStats>,
    sink_state: &Arc<SinkState>,
) -> Result<Option<Profiling>, RunError> {
    match probes.start_profiling(p.frequency) {
        Ok(cpus) => tracing::info!(frequency_hz = p.frequency, cpus, otlp = p.otlp, "profiling CPU"),
        Err(e) if p.duration.is_none() => {
            tracing::warn!(error = %e, "CPU profiles are off: the kernel refused the sampling program (tracing goes on; --profiles off silences this)");
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    }
    let (every, task) = if p.otlp {
        let (tx, rx) = mpsc::channel(4);
        let task = tokio::spawn(profiles::export_task(export.clone(), resources.clone(), rx, stats.clone(), sink_state.clone()));
        (Some((PROFILE_WINDOW, tx)), Some(task))
    } else {
        (None, None)
    };
    let profiler = Profiler::start(p.frequency, every, stats.clone()).map_err(RunError::Events)?;
    Ok(Some(Profiling { profiler, settings: p.clone(), task, announced: HashSet::new() }))
}

/// The profile at exit: its files (`zerotrace profile`) and its last OTLP window.
async fn finish_profile(
    p: Profiling,
    export: Option<&ExportSettings>,
    resources: &Resources,
    stats: &ProfilerStats,
    sink_state: &Arc<SinkState>,
    deadline: Duration,
) {
    let Profiling { profiler, settings, task, .. } = p;
    let profile = tokio::task::spawn_blocking(move || profiler.finish()).await.unwrap_or_default();
    crate::profile::write_files(&settings, &profile);
    // The windows before this one first (the profiler's end closed their queue), so that
    // the last window goes after them and meets the collector's latest answer.
    if let Some(t) = task {
        let _ = tokio::time::timeout(deadline, t).await;
    }
    if let (true, Some(export)) = (settings.otlp && !profile.samples.is_empty(), export) {
        let req = profiles::to_request(&profile, &|pid| profiles::resource_of(resources, pid));
        let mut sink = profiles::ProfilesSink::new(export, sink_state.clone());
        match tokio::time::timeout(deadline, sink.send(req)).await {
            Ok(Ok(())) => {
                stats.exported.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(SinkError::NotTaken(_))) => {
                stats.profiles_dropped.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(e)) => {
                stats.export_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "OTLP profiles export failed");
            }
            Err(_) => {
                stats.export_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("OTLP profiles export timed out");
            }
        }
    }
}

fn start_metrics(every: Duration, settings: &ExportSettings, resources: &Resources, sink_state: &Arc<SinkState>, errors: &Arc<AtomicU64>) -> Metrics {
    let state = MetricsState {
        red: Arc::new(Mutex::new(Red::default())),
        snapshot: Arc::new(Mutex::new(Vec::new())),
        errors: errors.clone(),
        start_ns: crate::export::metrics::now_ns(),
    };
    tracing::info!(every = ?every, "exporting RED metrics and the agent's counters over OTLP");
    let (m, resources, settings, sink_state) = (state.clone(), resources.clone(), settings.clone(), sink_state.clone());
    let task = tokio::spawn(async move {
        let mut sink = MetricsSink::new(&settings, sink_state);
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            export_metrics(&mut sink, &m, &resources).await;
        }
    });
    Metrics { state, task }
}

/// One OTLP metrics export of the RED histograms and the last counters snapshot; a failure
/// is counted and logged once (cumulative totals: the next export makes up for it).
async fn export_metrics(sink: &mut MetricsSink, m: &MetricsState, resources: &Resources) {
    let req = {
        let r = m.red.lock().expect("not poisoned");
        let snap = m.snapshot.lock().expect("not poisoned");
        crate::export::metrics::request(&r, resources, &snap, m.start_ns)
    };
    match sink.send(req).await {
        Ok(()) => {}
        // Counted by the sink (the collector does not take metrics, or asked to wait).
        Err(SinkError::NotTaken(_)) => {}
        Err(SinkError::Failed(why)) => {
            if m.errors.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!(error = %why, "OTLP metrics export failed (counted; the next export carries the totals)");
            }
        }
    }
}
