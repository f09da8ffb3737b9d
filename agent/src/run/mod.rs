//! `zerotrace run` (and `tail`, `profile`): inspect the targets, load and attach the probes,
//! then pump kernel records through the correlator to the outputs until SIGINT/SIGTERM or
//! until every target has exited. On the way out: stop the kernel side, drain, flush (at
//! most 10 s), detach. Which processes are traced lives in `targets` (what each executable
//! file is, read once, in `programs`), where spans and profiles go in `outputs`, the
//! agent's counters in `stats`.
mod outputs;
mod programs;
mod stats;
mod targets;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use tokio::signal::unix::{SignalKind, signal};

use crate::{
    correlate::{Clock, Correlator, NativeParents, sampling::Sampler},
    events::{Event, reader::EventReader},
    export::{ExportSettings, print, tail::TailSettings},
    model::sockdiag,
    probes::{self, Inject, KernelSettings, Probes, features, go},
    profile::ProfileSettings,
    spans::Span,
};
use outputs::Outputs;
use targets::{Discover, Targets};

/// How often the ring buffer is drained when the kernel does not wake the agent.
const DRAIN_TICK: Duration = Duration::from_millis(20);
/// ... and at most this long when little is happening: the tick doubles after each drain
/// that found fewer than QUIET_RECORDS records (an idle agent wakes 10 times a second, not
/// 50) and is back to DRAIN_TICK at the first busy drain.
const QUIET_TICK: Duration = Duration::from_millis(100);
const QUIET_RECORDS: usize = 64;
/// Longest flush at shutdown.
const FLUSH_DEADLINE: Duration = Duration::from_secs(10);
/// How often the correlator's connections are compared with the kernel's (CONNS): a
/// connection missing twice in a row lost its close record and is closed.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// How long a Go executable's shared uprobes stay once no traced process runs it: a program
/// started again and again (a cron job, a CLI in a loop) attaches once.
const SHARED_LINGER: Duration = Duration::from_secs(30);

/// Everything `run` needs, resolved and validated (see `crate::settings`) before anything
/// starts. Each stage's part is that stage's own type.
#[derive(Clone, Debug)]
pub struct RunSettings {
    pub pids: Vec<u32>,
    /// The control socket to serve (None: off).
    pub control_socket: Option<PathBuf>,
    /// `--control-tcp` and its token.
    pub control_tcp: Option<std::net::SocketAddr>,
    pub control_token: Option<String>,
    /// `--health-listen`: where /healthz and /readyz are served.
    pub health_listen: Option<std::net::SocketAddr>,
    /// `--cri-socket` and `--k8s-well-known-labels`.
    pub cri_socket: String,
    pub k8s_well_known_labels: bool,
    /// What discovery leaves alone (--exclude-*, --include-namespace).
    pub selection: std::sync::Arc<crate::model::select::Selection>,
    /// OTLP metrics every this often (None: no metrics).
    pub metrics_interval: Option<Duration>,
    /// OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG.
    pub sampler: Sampler,
    /// `--exe`: executables to discover (now and later).
    pub exe_globs: Vec<glob::Pattern>,
    /// `--port`: listening ports whose processes are traced (now and later).
    pub ports: Vec<u16>,
    /// `--all`: every process (Go in depth, native ones from their sockets).
    pub all: bool,
    pub print: bool,
    /// `zerotrace tail`: traces as trees (or JSON) on stdout.
    pub tail: Option<TailSettings>,
    pub export: ExportSettings,
    /// --service-name: service.name of every target, over anything else.
    pub service_name: Option<String>,
    /// The agent's own OTEL_SERVICE_NAME: used for targets that do not set their own.
    pub env_service_name: Option<String>,
    /// OTEL_RESOURCE_ATTRIBUTES.
    pub resource_attrs: Vec<(String, String)>,
    pub go_http_probes: go::GoHttpProbes,
    pub go_causality: go::GoCausality,
    /// HTTPS server spans from crypto/tls plaintext (--go-tls).
    pub go_tls: bool,
    pub native_parents: NativeParents,
    pub kernel: KernelSettings,
    /// `--cpu-budget`, `--memory-limit`.
    pub guard: probes::guard::GuardSettings,
    pub stats_interval: Duration,
    pub stats_file: Option<PathBuf>,
    /// `--record`: where every kernel record is written.
    pub record: Option<PathBuf>,
    /// CPU profiling (None: off).
    pub profile: Option<ProfileSettings>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(
        "zerotrace needs more privileges: missing {missing}. Run it as root (sudo zerotrace ...) or grant \
         CAP_BPF, CAP_PERFMON and CAP_SYS_PTRACE (e.g. setcap cap_bpf,cap_perfmon,cap_sys_ptrace+ep $(which zerotrace))"
    )]
    Privileges { missing: String },
    #[error("--inject-traceparent: {0}")]
    Inject(String),
    #[error(transparent)]
    Target(#[from] crate::model::target::TargetError),
    #[error(transparent)]
    Probe(#[from] probes::ProbeError),
    #[error("attaching to PID {pid}: {source}")]
    Attach {
        pid: u32,
        #[source]
        source: probes::ProbeError,
    },
    #[error(transparent)]
    Export(#[from] crate::export::otlp::ExportError),
    #[error("reading kernel events: {0}")]
    Events(std::io::Error),
    #[error(transparent)]
    Health(#[from] crate::health::HealthError),
    #[error(transparent)]
    Cri(#[from] crate::model::k8s::CriError),
}

/// The pipeline while it runs: kernel side, decoder, correlator, who is traced, where
/// spans go.
struct Agent<'s> {
    s: &'s RunSettings,
    probes: Probes,
    reader: EventReader,
    correlator: Correlator,
    targets: Targets<'s>,
    outputs: Outputs,
    /// Finished spans between the correlator and the outputs (reused).
    spans: Vec<Span>,
    /// Processes that exec'd since the last drain.
    execs: Vec<u32>,
    /// --cpu-budget, --memory-limit.
    guard: probes::guard::Guard,
    /// The shift the kernel's SHED holds.
    shed_applied: u32,
    /// When the correlator last compared its connections with CONNS.
    last_sweep: Instant,
    started: Instant,
}

/// The self-protection loop, with what a uprobe hit costs here (timed when there is a CPU
/// budget).
fn start_guard(s: &RunSettings, probes: &mut Probes) -> probes::guard::Guard {
    /// Used when a uprobe hit cannot be timed (this VM measures ~9 us).
    const UPROBE_HIT_NS: f64 = 10_000.0;
    let g = s.guard;
    let hit_ns = match g.cpu_budget {
        None => UPROBE_HIT_NS,
        Some(_) => probes.uprobe_hit_ns().unwrap_or_else(|e| {
            tracing::info!(error = %e, "cannot time a uprobe hit; the CPU budget counts 10 us per hit");
            UPROBE_HIT_NS
        }),
    };
    let mib = |b: u64| b >> 20;
    tracing::info!(
        cpu_budget_percent = g.cpu_budget.map(|c| (c * 100.0).round() as u64),
        memory_limit_mib = g.memory_limit.map(mib),
        uprobe_hit_ns = hit_ns.round() as u64,
        "self-protection"
    );
    probes::guard::Guard::new(g, hit_ns)
}

pub async fn run(s: RunSettings) -> Result<(), RunError> {
    let missing = features::missing_privileges(features::capabilities());
    if !missing.is_empty() {
        return Err(RunError::Privileges { missing: missing.join(", ") });
    }
    if s.kernel.inject == Inject::On
        && let Some(why) = features::injection_refusal(features::capabilities(), features::lockdown().as_deref())
    {
        return Err(RunError::Inject(why));
    }
    crate::model::k8s::init(&s.cri_socket, s.k8s_well_known_labels)?;
    // Look at every target before touching the kernel: a bad --pid changes nothing.
    let programs =
        programs::Programs::new(go::PlanSettings { http: s.go_http_probes, causality: s.go_causality, tls: s.go_tls, inject: s.kernel.inject != Inject::Off });
    let mut inspected = Vec::new();
    for &pid in &s.pids {
        inspected.push(programs.inspect(pid)?);
    }
    let mut probes = Probes::load(&s.kernel)?;
    let guard = start_guard(&s, &mut probes);
    let mut reader = EventReader::new(probes.take_events()?).map_err(RunError::Events)?;
    if let Some(path) = &s.record {
        reader.record_to(path).map_err(RunError::Events)?;
        tracing::info!(path = %path.display(), "recording every kernel record");
    }
    let outputs = Outputs::start(&s, &mut probes).await?;
    let health = crate::health::Health::new(outputs.export_stats.clone(), s.export.exporter == crate::export::Exporter::Otlp);
    let _health_task = match s.health_listen {
        Some(addr) => Some(crate::health::serve(addr, health.clone()).await?),
        None => None,
    };
    let mut correlator = Correlator::new(Clock::system());
    correlator.traces.record_aliases = s.kernel.inject != Inject::Off;
    correlator.sampling = crate::correlate::sampling::Sampling::new(s.sampler);
    correlator.native_parents = s.native_parents;
    if s.sampler != Sampler::AlwaysOn {
        tracing::info!(sampler = ?s.sampler, "sampling traces");
    }
    // From the first attach on, SIGINT and SIGTERM detach (the loop below sees them, also
    // when they came during the rest of the start); before it, they end the process, which
    // leaves nothing behind either.
    let mut sigint = signal(SignalKind::interrupt()).map_err(RunError::Events)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(RunError::Events)?;
    // A lease on a shared executable breaking (someone opens it for writing): its uprobes go
    // first. Installed before any lease is taken (SIGIO's default action ends the process).
    let mut sigio = signal(SignalKind::io()).map_err(RunError::Events)?;
    let (mut targets, mut exits, mut inspections) = Targets::new(&s, outputs.resources.clone(), programs);
    for target in &inspected {
        targets.attach_given(&mut probes, target)?;
    }
    let discover = Discover::new(&s.exe_globs, &s.ports, s.all);
    // Execs matter for discovery by executable, and for every --pid target: one that execs
    // runs another program, whose spans must not carry the old one's resource and probes.
    if discover.as_ref().is_some_and(Discover::by_exe) || !s.pids.is_empty() {
        probes.watch_execs()?;
    }
    if let Some(d) = discover {
        targets.discover(d, &mut probes);
    }
    health.set_attached();
    health.tick(targets.len());
    let mut agent = Agent {
        s: &s,
        probes,
        reader,
        correlator,
        targets,
        outputs,
        spans: Vec::with_capacity(1024),
        execs: Vec::new(),
        guard,
        shed_applied: 0,
        last_sweep: Instant::now(),
        started: Instant::now(),
    };
    agent.outputs.announce(&agent.targets);

    let profile_until = s.profile.as_ref().and_then(|p| p.duration);
    let profile_end = tokio::time::Instant::now() + profile_until.unwrap_or(Duration::from_secs(86400 * 365));
    let mut housekeeping = tokio::time::interval(Duration::from_secs(1));
    let mut tick = DRAIN_TICK;
    let mut last_stats = Instant::now();
    // The --pid targets whose exit their pidfd watch reported.
    let mut exited: std::collections::HashSet<u32> = std::collections::HashSet::new();
    loop {
        // Checked on every turn: a timer branch in the select below would be re-armed, and so
        // never fire, while records keep arriving faster than it.
        if s.tail.is_some() && print::stdout_closed() {
            tracing::info!("stdout closed: detaching");
            break;
        }
        tokio::select! {
            _ = agent.reader.wait(tick) => {
                let n = agent.pump();
                tick = if n >= QUIET_RECORDS { DRAIN_TICK } else { (tick * 2).min(QUIET_TICK) };
                agent.after_execs();
            }
            Some(done) = inspections.recv() => {
                let a = &mut agent;
                a.targets.inspected(&mut a.probes, done);
                // A --pid target that exec'd and exited while it was inspected again: its exit
                // came while the inspection ran, so the end is seen here. (Exits as the pidfd
                // reports them: a process not yet reaped by its parent still has its /proc.)
                if a.targets.is_empty() && !a.targets.discovering() && !a.targets.inspecting_any() && s.pids.iter().all(|p| exited.contains(p)) {
                    tracing::info!("every traced process has exited");
                    break;
                }
            }
            _ = sigint.recv() => { tracing::info!("SIGINT: detaching"); break; }
            _ = tokio::time::sleep_until(profile_end), if profile_until.is_some() => {
                tracing::info!("profile duration reached: detaching");
                break;
            }
            _ = sigterm.recv() => { tracing::info!("SIGTERM: detaching"); break; }
            _ = sigio.recv() => agent.probes.release_idle(SHARED_LINGER),
            Some(pid) = exits.recv() => {
                if s.pids.contains(&pid) {
                    exited.insert(pid);
                }
                if agent.targets.contains(pid) {
                    // Finish what the process sent before it went away.
                    agent.pump();
                    agent.forget(pid);
                    tracing::info!(pid, remaining = agent.targets.len(), "traced process exited; stopped tracing it");
                }
                // (A --pid target that exec'd into something not traced any more still ends
                // the agent when it exits.)
                if agent.targets.is_empty() && !agent.targets.discovering() && !agent.targets.inspecting_any() {
                    tracing::info!("every traced process has exited");
                    break;
                }
            }
            _ = housekeeping.tick() => {
                agent.housekeeping();
                health.tick(agent.targets.len());
                if !s.stats_interval.is_zero() && last_stats.elapsed() >= s.stats_interval {
                    last_stats = Instant::now();
                    stats::log(&agent.counters());
                }
            }
        }
    }
    agent.finish().await;
    Ok(())
}

impl Agent<'_> {
    /// Drains the ring buffer into the correlator and hands finished spans and samples on.
    fn pump(&mut self) -> usize {
        let Self { reader, correlator, outputs, spans, execs, .. } = self;
        let n = reader.drain(|ev| match ev {
            Event::ProcExec { pid } => execs.push(pid),
            Event::CpuSample(smp) => outputs.sample(smp, correlator),
            other => correlator.on_event(other, spans),
        });
        self.outputs.deliver(&mut self.spans, &mut self.correlator, &self.targets);
        n
    }

    /// A traced process that exec'd runs another program now: its old one is forgotten;
    /// any process that exec'd is inspected again when discovery selects it.
    /// A `--pid` target that exec'd is inspected and attached again as the program it runs
    /// now (the user named the process, not the program).
    fn after_execs(&mut self) {
        for pid in std::mem::take(&mut self.execs) {
            if self.targets.contains(pid) {
                self.forget(pid);
                tracing::info!(pid, "traced process exec'd another program; stopped tracing its old one");
            }
            // Also when its last program was refused: this one may be traceable.
            if self.s.pids.contains(&pid) {
                self.targets.reattach(pid);
                continue;
            }
            if self.targets.discovering() {
                self.targets.exec_seen(pid);
            }
        }
    }

    /// Stops tracing `pid` everywhere: kernel, correlator, targets, outputs.
    fn forget(&mut self, pid: u32) {
        self.probes.remove_target(pid, true);
        self.correlator.forget_pid(pid);
        self.targets.remove(pid);
        self.outputs.forget(pid);
    }

    /// Once a second: clock, listening ports, catch-up probes, discovery by port, resources
    /// of gone processes, counters for status and metrics.
    fn housekeeping(&mut self) {
        self.correlator.clock_mut().refresh();
        self.outputs.announce(&self.targets);
        let listeners = sockdiag::listening().ok();
        self.targets.refresh(&mut self.probes, listeners.as_deref());
        self.probes.release_idle(SHARED_LINGER);
        self.outputs.housekeeping(&self.targets);
        let kernel = self.probes.counters();
        self.guard.tick(&kernel, self.outputs.export_stats.unaccounted());
        let shift = self.guard.shift();
        if shift != self.shed_applied {
            // Tried again each second until the kernel has it.
            match self.probes.set_shed(shift) {
                Ok(()) => self.shed_applied = shift,
                Err(e) => tracing::warn!(error = %e, "cannot set load shedding in the kernel"),
            }
        }
        if self.last_sweep.elapsed() >= SWEEP_EVERY && self.correlator.holds_anything() {
            self.last_sweep = Instant::now();
            if let Some(live) = self.probes.live_conn_ids() {
                self.correlator.sweep(&live, Clock::monotonic_now(), &mut self.spans);
            }
        }
        if self.outputs.wants_counters() {
            let counters = self.counters_with(&kernel);
            self.outputs.publish_counters(counters, &self.targets, self.started, self.probes.hooks.name());
        }
    }

    /// Every counter and gauge; the kernel maps' entries are counted at most every few
    /// seconds.
    fn counters(&mut self) -> Vec<(&'static str, u64)> {
        let kernel = self.probes.counters();
        self.counters_with(&kernel)
    }

    /// `counters` with the kernel's counters already read.
    fn counters_with(&mut self, kernel: &probes::Counters) -> Vec<(&'static str, u64)> {
        let mut list = stats::counters(kernel, &self.probes, &self.reader, &self.correlator);
        list.extend(self.outputs.counters());
        list.push(("processes_traced", self.targets.len() as u64));
        list.push(("processes_exited_before_traced", self.targets.exited_before_traced));
        list.extend(self.guard.gauges());
        list.extend(self.probes.occupancy(false));
        list
    }

    /// Stop producing, take what is in flight, flush the outputs, detach.
    async fn finish(mut self) {
        for pid in self.targets.pids() {
            self.probes.remove_target(pid, false);
        }
        self.pump();
        let Agent { s, mut probes, mut reader, correlator, targets, outputs, started, guard, .. } = self;
        let mut counters = stats::counters(&probes.counters(), &probes, &reader, &correlator);
        counters.extend(guard.gauges());
        // What the kernel maps still hold once every target is forgotten: nothing of their
        // connections, listeners and targets (the maps keyed by pid are not walked at
        // shutdown: they go with the agent).
        counters.extend(probes.occupancy(true));
        let hooks = probes.hooks;
        let more = outputs.finish(&targets, &counters, FLUSH_DEADLINE).await;
        counters.extend(more);
        // Spans are out; now wait for the uprobes to be gone (the kernel removes them one at
        // a time: seconds per process).
        drop(probes);
        stats::log(&counters);
        reader.flush_recording();
        if let Some(path) = &s.stats_file
            && let Err(e) = std::fs::write(path, stats::json(&counters, started.elapsed(), hooks.name()))
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the stats file");
        }
    }
}
