//! `zerotrace run`: inspect the targets, load and attach the probes, then pump kernel events
//! through the correlator to the exporters until SIGINT/SIGTERM or until every target has
//! exited. On the way out: stop the kernel side, drain, flush (at most 10 s), detach.
use std::{
    collections::{HashMap, HashSet},
    os::fd::{FromRawFd, OwnedFd},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::{io::unix::AsyncFd, signal::unix::{SignalKind, signal}, sync::mpsc};
use zerotrace_common::Counter;

use crate::{
    cli::{Exporter, GoHttpProbes},
    correlate::{Clock, Correlator},
    events::reader::EventReader,
    export::{
        ExportStats,
        metrics::{MetricsSink, Red, SharedRed},
        otlp::{OtlpExport, Resources, resource},
        print,
        resource::{AttrValue, Process, attributes},
        tail::Tail,
    },
    model::{Target, proc, sockdiag, target::Inspected},
    probes::{self, Probes, features, go},
    settings::RunSettings,
    spans::Span,
};

/// How often the ring buffer is drained when the kernel does not wake the agent.
const DRAIN_TICK: Duration = Duration::from_millis(20);
/// ... and at most this long when little is happening: the tick doubles after each drain
/// that found fewer than QUIET_RECORDS records (an idle agent wakes 10 times a second, not
/// 50) and is back to DRAIN_TICK at the first busy drain.
const QUIET_TICK: Duration = Duration::from_millis(100);
const QUIET_RECORDS: usize = 64;
/// Longest time the temporary catch-up probes stay attached.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(30);
/// Longest flush at shutdown.
const FLUSH_DEADLINE: Duration = Duration::from_secs(10);
/// How much CPU time one OTLP profile covers.
const PROFILE_WINDOW: Duration = Duration::from_secs(10);

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
    Attach { pid: u32, #[source] source: go::AttachError },
    #[error(transparent)]
    Export(#[from] crate::export::otlp::ExportError),
    #[error("reading kernel events: {0}")]
    Events(std::io::Error),
    #[error(transparent)]
    Health(#[from] crate::health::HealthError),
    #[error(transparent)]
    Cri(#[from] crate::model::k8s::CriError),
}

/// A traced process while it is traced.
struct Traced {
    service: String,
    /// The same, shared with the tail's spans.
    service_name: Arc<str>,
    /// When the temporary catch-up probe (for connections older than the agent) went on,
    /// and the socket inodes of those connections still waiting for it.
    catch_up_since: Option<Instant>,
    catch_up_inodes: HashSet<u64>,
}

pub async fn run(s: RunSettings) -> Result<(), RunError> {
    let missing = features::missing_privileges(features::capabilities());
    if !missing.is_empty() {
        return Err(RunError::Privileges { missing: missing.join(", ") });
    }
    if s.kernel.inject == crate::cli::Inject::On {
        if let Some(why) = features::injection_refusal(features::capabilities(), features::lockdown().as_deref()) {
            return Err(RunError::Inject(why));
        }
    }
    crate::model::k8s::init(&s.cri_socket, s.k8s_well_known_labels)?;
    // Look at every target before touching the kernel: a bad --pid changes nothing.
    let mut targets = Vec::new();
    for &pid in &s.pids {
        targets.push(crate::model::target::inspect(pid)?);
    }
    let mut probes = Probes::load(&s.kernel)?;
    let mut reader = EventReader::new(probes.take_events()?).map_err(RunError::Events)?;
    if let Some(path) = &s.record {
        reader.record_to(path).map_err(RunError::Events)?;
        tracing::info!(path = %path.display(), "recording every kernel record");
    }
    let stats = Arc::new(ExportStats::default());
    let resources: Resources = Arc::new(Mutex::new(HashMap::new()));
    let export = match s.export.exporter {
        Exporter::Otlp => Some(OtlpExport::start(&s.export, resources.clone(), stats.clone())?),
        Exporter::None => None,
    };
    if export.is_some() {
        tracing::info!(endpoint = %s.export.endpoint, protocol = ?s.export.protocol, "exporting spans over OTLP");
    }
    let health = crate::health::Health::new(stats.clone(), export.is_some());
    let _health_task = match s.health_listen {
        Some(addr) => Some(crate::health::serve(addr, health.clone()).await?),
        None => None,
    };
    // CPU profiles: the perf_event program on every CPU, a thread that unwinds and
    // symbolizes, and (OTLP) a task that sends each window.
    let mut profile_task = None;
    let sampling = match &s.profile {
        Some(p) => match probes.start_profiling(p.frequency) {
            Ok(cpus) => {
                tracing::info!(frequency_hz = p.frequency, cpus, otlp = p.otlp, "profiling CPU");
                true
            }
            // `run`: tracing goes on without profiles; `zerotrace profile` has nothing to do.
            Err(e) if p.duration.is_none() => {
                tracing::warn!(error = %e, "CPU profiles are off: the kernel refused the sampling program (tracing goes on; --profiles off silences this)");
                false
            }
            Err(e) => return Err(e.into()),
        },
        None => false,
    };
    let mut profiler = match &s.profile {
        Some(p) if sampling => {
            let every = if p.otlp {
                let (tx, rx) = mpsc::channel(4);
                let task = crate::profile::export::export_task(s.export.clone(), resources.clone(), rx, stats.clone());
                profile_task = Some(tokio::spawn(task));
                Some((PROFILE_WINDOW, tx))
            } else {
                None
            };
            Some(crate::profile::collect::Profiler::start(p.frequency, every, stats.clone()).map_err(RunError::Events)?)
        }
        _ => None,
    };
    let mut correlator = Correlator::new(Clock::system());
    correlator.traces.record_aliases = s.kernel.inject != crate::cli::Inject::Off;
    correlator.sampling = crate::correlate::sampling::Sampling::new(s.sampler);
    correlator.native_parents = s.native_parents;
    if s.sampler != crate::correlate::sampling::Sampler::AlwaysOn {
        tracing::info!(sampler = ?s.sampler, "sampling traces");
    }
    let (exit_tx, mut exit_rx) = mpsc::unbounded_channel::<u32>();
    let mut traced: HashMap<u32, Traced> = HashMap::new();

    let mut ctx = AttachCtx { s: &s, resources: &resources, exit_tx: exit_tx.clone(), rejected: HashMap::new(), uprobes: uprobes_allowed() };
    for target in &targets {
        let t = attach_any(&mut probes, &mut ctx, target)?;
        traced.insert(target.pid(), t);
    }
    let discover = Discover::new(&s.exe_globs, &s.ports, s.all);
    if let Some(d) = &discover {
        if d.by_exe() {
            probes.watch_execs()?;
        }
        for pid in d.running(&traced) {
            try_discovered(&mut probes, &mut ctx, &mut traced, pid);
        }
        tracing::info!(
            exe = ?s.exe_globs.iter().map(|g| g.as_str()).collect::<Vec<_>>(),
            ports = ?s.ports,
            all = s.all,
            traced = traced.len(),
            "discovering processes (by executable at exec, by port every second)"
        );
    }
    health.set_attached();
    health.tick(traced.len());
    let mut execs: Vec<u32> = Vec::new();
    // Processes the profiler knows by name.
    let mut announced: HashSet<u32> = HashSet::new();
    if let Some(p) = &profiler {
        announce(p, &traced, &mut announced);
    }
    let (inspect_tx, mut inspect_rx) = mpsc::unbounded_channel::<Inspection>();
    let mut inspecting: HashSet<u32> = HashSet::new();
    // Processes no longer traced, and since when: their resource is forgotten a minute later
    // (their last spans have been exported by then).
    let mut gone: std::collections::VecDeque<(u32, Instant)> = std::collections::VecDeque::new();

    let profile_until = s.profile.as_ref().and_then(|p| p.duration);
    let profile_end = tokio::time::Instant::now() + profile_until.unwrap_or(Duration::from_secs(86400 * 365));
    let mut sigint = signal(SignalKind::interrupt()).map_err(RunError::Events)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(RunError::Events)?;
    let mut housekeeping = tokio::time::interval(Duration::from_secs(1));
    let mut tick = DRAIN_TICK;
    let mut last_stats = Instant::now();
    let mut spans: Vec<Span> = Vec::with_capacity(1024);
    let started = Instant::now();
    let mut tail = s.tail.clone().map(Tail::new);
    let mut control = match &s.control_socket {
        Some(path) => crate::control::serve(path).await,
        None => None,
    };
    // Only a socket this agent made is removed at exit.
    let own_socket = control.is_some();
    if let (Some(addr), Some(token)) = (s.control_tcp, s.control_token.as_deref()) {
        let c = control.get_or_insert_with(crate::control::Control::new);
        crate::control::serve_tcp(addr, token, c).await;
    }
    // RED metrics and the agent's counters over OTLP (with span export).
    let red: Option<SharedRed> = s.metrics_interval.map(|_| Arc::new(Mutex::new(Red::default())));
    let snapshot: Arc<Mutex<Vec<(&'static str, u64)>>> = Arc::new(Mutex::new(Vec::new()));
    let metrics_errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let metrics_start = crate::export::metrics::now_ns();
    let metrics_task = match (s.metrics_interval, &red) {
        (Some(every), Some(red)) => {
            let (red, res, snap, errors, settings) = (red.clone(), resources.clone(), snapshot.clone(), metrics_errors.clone(), s.export.clone());
            tracing::info!(every = ?every, "exporting RED metrics and the agent's counters over OTLP");
            Some(tokio::spawn(async move {
                let mut sink = MetricsSink::new(&settings);
                let mut tick = tokio::time::interval(every);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    export_metrics(&mut sink, &red, &res, &snap, metrics_start, &errors).await;
                }
            }))
        }
        _ => None,
    };

    loop {
        tokio::select! {
            _ = reader.wait(tick) => {
                let n = pump(&mut reader, &mut correlator, &mut spans, &s, &traced, export.as_ref(), tail.as_mut(), &mut execs, red.as_ref(), control.as_ref(), profiler.as_mut());
                tick = if n >= QUIET_RECORDS { DRAIN_TICK } else { (tick * 2).min(QUIET_TICK) };
                if let Some(d) = &discover {
                    for pid in execs.drain(..) {
                        // A traced process that exec'd runs another program now.
                        if traced.remove(&pid).is_some() {
                            probes.remove_target(pid);
                            correlator.forget_pid(pid);
                            if let Some(p) = &profiler {
                                p.forget(pid);
                            }
                            if let Some(r) = &red {
                                r.lock().expect("not poisoned").forget_pid(pid);
                            }
                            gone.push_back((pid, Instant::now()));
                            tracing::info!(pid, "traced process exec'd another program; stopped tracing its old one");
                        }
                        if d.matches(pid) {
                            inspect_later(&ctx, &traced, &mut inspecting, &inspect_tx, pid);
                        }
                    }
                }
            }
            Some((pid, started, exe, result)) = inspect_rx.recv() => {
                inspecting.remove(&pid);
                // It ran another program by now (an exec during the inspection): what was
                // read is not what runs; its exec event brings it back.
                if exe.is_some() && proc::exe_identity(pid) != exe {
                    tracing::debug!(pid, "process exec'd while it was inspected; inspecting again");
                    if discover.as_ref().is_some_and(|d| d.matches(pid)) {
                        inspect_later(&ctx, &traced, &mut inspecting, &inspect_tx, pid);
                    }
                    continue;
                }
                attach_inspected(&mut probes, &mut ctx, &mut traced, pid, started, result);
            }
            _ = sigint.recv() => { tracing::info!("SIGINT: detaching"); break; }
            _ = tokio::time::sleep_until(profile_end), if profile_until.is_some() => {
                tracing::info!("profile duration reached: detaching");
                break;
            }
            _ = tokio::time::sleep(Duration::from_millis(200)), if s.tail.is_some() && print::stdout_closed() => {
                tracing::info!("stdout closed: detaching");
                break;
            }
            _ = sigterm.recv() => { tracing::info!("SIGTERM: detaching"); break; }
            Some(pid) = exit_rx.recv() => {
                if !traced.contains_key(&pid) {
                    continue;
                }
                // Finish what the process sent before it went away.
                pump(&mut reader, &mut correlator, &mut spans, &s, &traced, export.as_ref(), tail.as_mut(), &mut execs, red.as_ref(), control.as_ref(), profiler.as_mut());
                probes.remove_target(pid);
                correlator.forget_pid(pid);
                traced.remove(&pid);
                if let Some(p) = &profiler {
                    p.forget(pid);
                }
                if let Some(r) = &red {
                    r.lock().expect("not poisoned").forget_pid(pid);
                }
                gone.push_back((pid, Instant::now()));
                tracing::info!(pid, remaining = traced.len(), "traced process exited; stopped tracing it");
                if traced.is_empty() && discover.is_none() {
                    tracing::info!("every traced process has exited");
                    break;
                }
            }
            _ = housekeeping.tick() => {
                correlator.clock_mut().refresh();
                health.tick(traced.len());
                if let Some(p) = &profiler {
                    announce(p, &traced, &mut announced);
                }
                let listeners = sockdiag::listening().ok();
                for pid in traced.keys() {
                    if let Err(e) = probes.set_listening(*pid, &proc::listening_ports(*pid, listeners.as_deref())) {
                        tracing::warn!(pid, error = %e, "cannot update the listening ports");
                    }
                }
                catch_up(&mut probes, &mut traced);
                while gone.front().is_some_and(|(_, t)| t.elapsed() > Duration::from_secs(60)) {
                    let (pid, _) = gone.pop_front().expect("checked");
                    if !traced.contains_key(&pid) {
                        resources.lock().expect("not poisoned").remove(&pid);
                    }
                }
                if red.is_some() || control.is_some() {
                    let mut list = counters_list(&probes.counters(), &reader, &correlator, &stats);
                    list.push(("processes_traced", traced.len() as u64));
                    if let Some(c) = &control {
                        c.set_status(status_reply(&traced, &list, started));
                    }
                    *snapshot.lock().expect("not poisoned") = list;
                }
                // --port: processes that started listening since.
                if let Some(d) = &discover {
                    for pid in d.listening(&traced, listeners.as_deref()) {
                        inspect_later(&ctx, &traced, &mut inspecting, &inspect_tx, pid);
                    }
                }
                if !s.stats_interval.is_zero() && last_stats.elapsed() >= s.stats_interval {
                    last_stats = Instant::now();
                    log_stats(&probes, &reader, &correlator, &stats);
                }
            }
        }
    }

    // Stop producing, take what is in flight, detach, flush.
    for pid in traced.keys().copied().collect::<Vec<_>>() {
        probes.remove_target(pid);
    }
    pump(&mut reader, &mut correlator, &mut spans, &s, &traced, export.as_ref(), tail.as_mut(), &mut execs, red.as_ref(), control.as_ref(), profiler.as_mut());
    if let Some(t) = tail.as_mut() {
        print::print(&t.flush());
    }
    if let Some(p) = profiler.take() {
        announce(&p, &traced, &mut announced);
        let profile = tokio::task::spawn_blocking(move || p.finish()).await.unwrap_or_default();
        if let Some(ps) = &s.profile {
            write_profile(ps, &profile);
            if ps.otlp && !profile.samples.is_empty() {
                let req = crate::profile::otlp::to_request(&profile, &|pid| crate::profile::export::resource_of(&resources, pid));
                let mut sink = crate::profile::export::ProfilesSink::new(&s.export);
                match tokio::time::timeout(FLUSH_DEADLINE, sink.send(req)).await {
                    Ok(Ok(())) => {
                        stats.profiles.exported.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Ok(Err(e)) => {
                        stats.profiles.export_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::warn!(error = %e, "OTLP profiles export failed");
                    }
                    Err(_) => {
                        stats.profiles.export_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::warn!("OTLP profiles export timed out");
                    }
                }
            }
        }
        if let Some(t) = profile_task.take() {
            let _ = tokio::time::timeout(FLUSH_DEADLINE, t).await;
        }
    }
    let kernel = probes.counters();
    // Last metrics: the totals up to now.
    if let (Some(task), Some(r)) = (metrics_task, &red) {
        task.abort();
        *snapshot.lock().expect("not poisoned") = counters_list(&kernel, &reader, &correlator, &stats);
        let mut sink = MetricsSink::new(&s.export);
        let _ = tokio::time::timeout(FLUSH_DEADLINE, export_metrics(&mut sink, r, &resources, &snapshot, metrics_start, &metrics_errors)).await;
    }
    // Spans first; then wait for the uprobes to be gone (the kernel removes them one at a
    // time: seconds per process).
    if let Some(e) = export {
        e.shutdown(FLUSH_DEADLINE).await;
    }
    drop(probes);
    if let (Some(path), true) = (&s.control_socket, own_socket) {
        crate::control::unlink(path);
    }
    log_stats_values(&kernel, &reader, &correlator, &stats);
    reader.flush_recording();
    if let Some(path) = &s.stats_file {
        let json = stats_json(&kernel, &reader, &correlator, &stats, started.elapsed());
        if let Err(e) = std::fs::write(path, json) {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the stats file");
        }
    }
    Ok(())
}

/// Drains the ring buffer into the correlator and hands finished spans on.
#[allow(clippy::too_many_arguments)]
fn pump(
    reader: &mut EventReader,
    correlator: &mut Correlator,
    spans: &mut Vec<Span>,
    s: &RunSettings,
    traced: &HashMap<u32, Traced>,
    export: Option<&OtlpExport>,
    tail: Option<&mut Tail>,
    execs: &mut Vec<u32>,
    red: Option<&SharedRed>,
    control: Option<&crate::control::Control>,
    mut profiler: Option<&mut crate::profile::collect::Profiler>,
) -> usize {
    let n = reader.drain(|ev| match ev {
        crate::events::Event::ProcExec { pid } => execs.push(pid),
        crate::events::Event::CpuSample(smp) => {
            if let Some(p) = profiler.as_deref_mut() {
                let span = correlator.sample_span(smp.pid, smp.tid, smp.span_id, smp.native);
                p.offer(smp, span);
            }
        }
        other => correlator.on_event(other, spans),
    });
    if let Some(p) = profiler {
        p.annotate(spans);
    }
    // Metrics count every request, sampled or not (a 10% sampler must not make rates 10x
    // lower).
    if let Some(r) = red {
        if !spans.is_empty() {
            let mut r = r.lock().expect("not poisoned");
            spans.iter().for_each(|sp| r.record(sp));
        }
    }
    let before = spans.len();
    spans.retain(|sp| correlator.sampling.keeps(&sp.trace_id));
    correlator.sampling.dropped += (before - spans.len()) as u64;
    if let Some(c) = control.filter(|c| c.watched()) {
        for sp in spans.iter() {
            c.publish(sp, traced.get(&sp.pid).map_or("?", |t| t.service.as_str()));
        }
    }
    if let Some(t) = tail {
        let now = Instant::now();
        let mut out = Vec::new();
        for sp in spans.iter() {
            let service = traced.get(&sp.pid).map_or_else(|| Arc::<str>::from("?"), |t| t.service_name.clone());
            out.extend(t.offer(sp, &service, now));
        }
        out.extend(t.due(now));
        print::print(&out);
    }
    if spans.is_empty() {
        return n;
    }
    if s.print {
        let lines: Vec<String> = spans
            .iter()
            .map(|sp| print::line(sp, traced.get(&sp.pid).map_or("?", |t| t.service.as_str())))
            .collect();
        print::print(&lines);
    }
    match export {
        Some(e) => spans.drain(..).for_each(|sp| e.offer(sp)),
        None => spans.clear(),
    }
    n
}

/// Detaches the temporary readRequest probes once every connection older than the agent has
/// been tied to its Go connection (it had a request) or is gone, or after CATCH_UP_LIMIT.
fn catch_up(probes: &mut Probes, traced: &mut HashMap<u32, Traced>) {
    for (pid, t) in traced.iter_mut() {
        let Some(since) = t.catch_up_since else { continue };
        let open = proc::socket_fds(*pid).unwrap_or_default();
        let resolved = probes.go_resolved_inodes(*pid);
        t.catch_up_inodes.retain(|ino| open.contains_key(ino) && !resolved.contains(ino));
        if t.catch_up_inodes.is_empty() || since.elapsed() > CATCH_UP_LIMIT {
            let n = probes.detach_temporary(*pid);
            tracing::debug!(pid, detached = n, left = t.catch_up_inodes.len(), "catch-up probes removed");
            t.catch_up_since = None;
        }
    }
}

/// Tells the run loop when `pid` exits, via a pidfd (no polling).
/// Reports `pid` on `tx` when that process exits. False: it is gone already (or cannot be
/// watched).
fn watch_exit(pid: u32, tx: mpsc::UnboundedSender<u32>) -> bool {
    // SAFETY: pidfd_open with valid arguments; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
    if fd < 0 {
        tracing::warn!(pid, "cannot watch the process for exit (pidfd_open failed): not traced");
        return false;
    }
    // SAFETY: a fresh fd we own.
    let owned = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    tokio::spawn(async move {
        // SAFETY: the pidfd is owned by the AsyncFd and stays open with it.
        if let Ok(afd) = unsafe { AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE) } {
            let _ = afd.readable().await;
        }
        let _ = tx.send(pid);
    });
    true
}

fn counters_list<'a>(
    kernel: &[u64; zerotrace_common::COUNTER_SLOTS as usize],
    reader: &EventReader,
    c: &Correlator,
    stats: &'a ExportStats,
) -> Vec<(&'static str, u64)> {
    let k = |x: Counter| probes::counter(kernel, x);
    let mut v = vec![
        ("events_read", reader.records),
        ("events_undecodable", reader.decode_errors),
        ("ring_wakeups", reader.wakeups),
        ("events_dropped_ring_full", k(Counter::RingFull)),
        ("connections_dropped_map_full", k(Counter::ConnsFull)),
        ("target_reads_failed", k(Counter::ReadUserFailed)),
        ("kernel_reads_failed", k(Counter::ReadKernelFailed)),
        ("socket_ops", k(Counter::SocketSyscalls)),
        ("receives_without_buffer", k(Counter::RecvNoBuffer)),
        ("uprobe_hits", k(Counter::UprobeHits)),
        ("requests_seen", k(Counter::Requests)),
        ("socket_client_requests_seen", k(Counter::SockClientRequests)),
        ("pipelined_requests_seen", k(Counter::PipelinedRequests)),
        ("pipelined_requests_not_captured", c.stats.pipelined_uncaptured),
        ("handler_returns_unmatched", k(Counter::GoReturnUnmatched)),
        ("goroutines_spawned", k(Counter::GoSpawns)),
        ("goroutines_inherited_span", k(Counter::GoSpawnsInherited)),
        ("channel_handoffs", k(Counter::ChanHandoffs)),
        ("channel_edges", k(Counter::ChanEdges)),
        ("client_links_offered", k(Counter::ClientLinks)),
        ("server_requests_linked_kernel", k(Counter::ServerLinked)),
        ("traceparent_injected", k(Counter::Injected)),
        ("traceparent_dry_run", k(Counter::InjectDryRun)),
        ("traceparent_skipped", k(Counter::InjectSkipped)),
        ("traceparent_no_room", k(Counter::InjectNoRoom)),
        ("traceparent_write_failed", k(Counter::InjectFailed)),
        ("server_spans_linked", c.stats.linked),
        ("client_returns_unmatched", c.stats.unmatched_client_returns),
        ("http2_directions_unreadable", c.stats.h2_unreadable),
        ("parents_unknown", c.traces.parents_unknown),
        ("spans_assembled", c.stats.spans),
        ("spans_not_sampled", c.sampling.dropped),
        ("responses_unmatched", c.stats.unmatched_responses),
        ("requests_not_http", c.stats.not_http),
        ("responses_lost", c.stats.lost_responses),
        ("requests_abandoned", c.stats.abandoned),
        ("requests_dropped_pending_full", c.stats.pending_full),
        ("route_pattern_reads_failed", c.stats.pattern_reads_failed),
    ];
    v.extend(stats.snapshot());
    v
}

fn log_stats(probes: &Probes, reader: &EventReader, c: &Correlator, stats: &ExportStats) {
    log_stats_values(&probes.counters(), reader, c, stats);
}

fn log_stats_values(kernel: &[u64; zerotrace_common::COUNTER_SLOTS as usize], reader: &EventReader, c: &Correlator, stats: &ExportStats) {
    let list = counters_list(kernel, reader, c, stats);
    let text: Vec<String> = list.iter().filter(|(_, v)| *v > 0).map(|(k, v)| format!("{k}={v}")).collect();
    tracing::info!(target: "zerotrace::stats", "{}", text.join(" "));
}

fn stats_json(kernel: &[u64; zerotrace_common::COUNTER_SLOTS as usize], reader: &EventReader, c: &Correlator, stats: &ExportStats, uptime: Duration) -> String {
    let list = counters_list(kernel, reader, c, stats);
    let mut s = String::from("{");
    for (k, v) in &list {
        s.push_str(&format!("\"zerotrace_{k}\":{v},"));
    }
    s.push_str(&format!("\"uptime_ms\":{}}}", uptime.as_millis()));
    s
}

/// Tells the profiler the names of traced processes it has not heard of.
fn announce(p: &crate::profile::collect::Profiler, traced: &HashMap<u32, Traced>, announced: &mut HashSet<u32>) {
    for (pid, t) in traced {
        if announced.insert(*pid) {
            let executable = proc::exe_link(*pid)
                .ok()
                .and_then(|e| e.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| t.service.clone());
            p.process(crate::profile::model::ProcessInfo { pid: *pid, service_name: t.service.clone(), executable });
        }
    }
    announced.retain(|pid| traced.contains_key(pid));
}

/// `zerotrace profile`: the pprof file and flame graph at the end.
fn write_profile(ps: &crate::settings::ProfileSettings, profile: &crate::profile::model::Profile) {
    let samples: u64 = profile.samples.iter().map(|s| s.count).sum();
    if ps.pprof.is_none() && ps.flamegraph.is_none() {
        return;
    }
    if samples == 0 {
        tracing::warn!("no CPU samples were taken: the processes were idle (or exited at once); writing an empty profile");
    }
    if let Some(path) = &ps.pprof {
        match crate::profile::pprof::write(profile, path) {
            Ok(()) => tracing::info!(path = %path.display(), samples, "wrote the pprof profile (go tool pprof reads it)"),
            Err(e) => tracing::error!(path = %path.display(), error = %e, "cannot write the pprof profile"),
        }
    }
    if let Some(path) = &ps.flamegraph {
        let title = format!("CPU: {} samples at {} Hz", samples, ps.frequency);
        match crate::profile::flame::write_svg(profile, &title, path) {
            Ok(()) => tracing::info!(path = %path.display(), samples, "wrote the flame graph"),
            Err(e) => tracing::error!(path = %path.display(), error = %e, "cannot write the flame graph"),
        }
    }
}

/// What attaching a target needs besides the probes.
struct AttachCtx<'a> {
    s: &'a RunSettings,
    resources: &'a Resources,
    exit_tx: mpsc::UnboundedSender<u32>,
    /// Discovered processes that could not be traced, with their start time.
    rejected: HashMap<u32, u64>,
    /// The kernel lets this agent create uprobes (else Go programs are traced at the socket
    /// level).
    uprobes: bool,
}

/// Whether uprobes can be created with the capabilities the agent has. Linux requires
/// CAP_SYS_ADMIN for them since 2025 (CAP_PERFMON no longer suffices; stable kernels got the
/// change too), and a pod is often given less: then Go programs are traced at the socket
/// level, said once, instead of failing.
fn uprobes_allowed() -> bool {
    match features::uprobes() {
        Ok(()) => true,
        Err(e) if !features::has_cap(features::capabilities(), features::CAP_SYS_ADMIN) => {
            tracing::warn!(
                error = %e,
                "this kernel refuses uprobes without CAP_SYS_ADMIN: Go programs are traced at the socket level like any other program \
                 (no goroutine context, no Go client, SQL or HTTPS spans); grant CAP_SYS_ADMIN for Go depth"
            );
            false
        }
        // Another reason: attaching says what it is.
        Err(_) => true,
    }
}

/// Starts tracing a selected process: a Go program with its uprobes, anything else at the
/// socket level.
fn attach_any(probes: &mut Probes, ctx: &mut AttachCtx<'_>, target: &Inspected) -> Result<Traced, RunError> {
    match target {
        Inspected::Go(b) if !ctx.uprobes => {
            let t = &b.0;
            let n = crate::model::target::NativeTarget {
                pid: t.pid,
                exe_path: t.exe_path.clone(),
                exe_name: t.exe_name.clone(),
                runtime: Some(("go".into(), t.build.go_version.clone())),
                env: t.env.clone(),
            };
            attach_socket_level(probes, ctx, &n, "a Go program, at the socket level: no uprobes without CAP_SYS_ADMIN")
        }
        Inspected::Go(b) => attach_target(probes, ctx, &b.0, &b.1),
        Inspected::Native(n) => attach_socket_level(probes, ctx, n, "not a Go program: HTTP/1 server and client spans from its sockets, no goroutines"),
    }
}

fn attach_socket_level(probes: &mut Probes, ctx: &mut AttachCtx<'_>, n: &crate::model::target::NativeTarget, note: &str) -> Result<Traced, RunError> {
    let service = begin_tracing(probes, ctx, n.pid, &Process::from(n))?;
    probes.add_target(n.pid, &zerotrace_common::TargetConfig::native())?;
    tracing::info!(
        pid = n.pid,
        exe = %n.exe_path.display(),
        runtime = n.runtime.as_ref().map_or("unknown", |r| r.0.as_str()),
        layer = "socket",
        note,
        "tracing"
    );
    Ok(Traced { service_name: Arc::from(service.as_str()), service, catch_up_since: None, catch_up_inodes: HashSet::new() })
}

/// What every traced process gets first: a watch on its exit, its resource, its listening
/// ports. Returns its service name.
fn begin_tracing(probes: &mut Probes, ctx: &mut AttachCtx<'_>, pid: u32, who: &Process<'_>) -> Result<String, RunError> {
    let s = ctx.s;
    // The exit watch first: a process that exits while it is being attached must not stay
    // "traced" forever (its pid then blocks a later process with the same pid).
    if !watch_exit(pid, ctx.exit_tx.clone()) {
        return Err(RunError::Target(crate::model::target::TargetError::NoSuchProcess(pid)));
    }
    let attrs = attributes(who, s.service_name.as_deref(), s.env_service_name.as_deref(), &s.resource_attrs);
    let service = match &attrs[0].1 {
        AttrValue::Str(v) => v.clone(),
        AttrValue::Int(_) => who.exe_name.to_owned(),
    };
    ctx.resources.lock().expect("not poisoned").insert(pid, resource(&attrs));
    // Server sockets are those on ports the process listens on (kept fresh by the run loop).
    probes.set_listening(pid, &proc::listening_ports(pid, sockdiag::listening().ok().as_deref()))?;
    Ok(service)
}

/// Starts tracing one inspected Go process: its resource, its kernel configuration, its
/// uprobes, a watch on its exit.
fn attach_target(probes: &mut Probes, ctx: &mut AttachCtx<'_>, target: &Target, exe: &crate::symbols::Executable) -> Result<Traced, RunError> {
    let s = ctx.s;
    let pid = target.pid;
    let service = begin_tracing(probes, ctx, pid, &Process::from(target))?;
    let tls = go::tls_plan(target, exe, s.go_tls);
    probes.add_target(pid, &go::target_config(target, tls.as_ref()))?;
    // Connections accepted before zerotrace started are picked up at their next request;
    // their Go connection is learnt by a temporary probe on (*conn).readRequest.
    let existing: HashSet<u64> = proc::accepted_connections(pid).map(|c| c.into_iter().map(|s| s.inode).collect()).unwrap_or_default();
    let catch_up = s.go_http_probes == GoHttpProbes::Conn && !existing.is_empty();
    let open_path = proc::exe_open_path(pid);
    let attach = |probes: &mut Probes| -> Result<go::AttachReport, go::AttachError> {
        let mut report = go::attach_http(probes, target, exe, &open_path, s.go_http_probes, catch_up)?;
        go::attach_causality(probes, target, exe, &open_path, &s.go_causality, &mut report)?;
        if let Some(sites) = &tls {
            go::attach_tls(probes, target, exe, &open_path, sites, &mut report)?;
        }
        if s.kernel.inject != crate::cli::Inject::Off {
            go::attach_inject(probes, target, exe, &open_path, &mut report)?;
        }
        Ok(report)
    };
    let report = match attach(probes) {
        Ok(r) => r,
        Err(source) => {
            probes.remove_target(pid);
            return Err(RunError::Attach { pid, source });
        }
    };
    tracing::info!(
        pid,
        exe = %target.exe_path.display(),
        go = %target.build.go_version,
        offsets = target.layout.source,
        uprobes = report.uprobes,
        client_spans = report.client,
        sql_spans = report.sql,
        spawns = report.spawns,
        channels = report.channels,
        https = report.tls,
        inject_traceparent = report.inject,
        existing_connections = existing.len(),
        mode = ?s.go_http_probes,
        hooks = probes.hooks,
        "tracing"
    );
    tracing::debug!(pid, offsets = ?target.layout.offsets, tcpconn = ?target.layout.type_tcpconn, response = ?target.layout.type_response, "Go layout");
    if !target.layout.absent.is_empty() {
        tracing::debug!(pid, absent = ?target.layout.absent, "fields this Go version does not have");
    }
    Ok(Traced {
        service_name: Arc::from(service.as_str()),
        service,
        catch_up_since: catch_up.then(Instant::now),
        catch_up_inodes: existing,
    })
}

/// Discovery: which processes to trace besides --pid: by executable (`--exe`, `--all`;
/// checked at start and at every exec) and by listening port (`--port`; checked at start and
/// every second).
struct Discover {
    globs: Vec<glob::Pattern>,
    ports: Vec<u16>,
    all: bool,
}

impl Discover {
    fn new(globs: &[glob::Pattern], ports: &[u16], all: bool) -> Option<Self> {
        (!globs.is_empty() || !ports.is_empty() || all).then(|| Self { globs: globs.to_vec(), ports: ports.to_vec(), all })
    }

    /// Whether execs are worth watching (selection by executable).
    fn by_exe(&self) -> bool {
        self.all || !self.globs.is_empty()
    }

    /// Whether process `pid` is selected by its executable (full path or file name).
    fn matches(&self, pid: u32) -> bool {
        if self.all {
            return true;
        }
        let Ok(path) = proc::exe_link(pid) else { return false };
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let full = path.to_string_lossy();
        self.globs.iter().any(|g| g.matches(&full) || g.matches(&name))
    }

    /// Selected processes running now, not traced yet (and not this agent).
    fn running(&self, traced: &HashMap<u32, Traced>) -> Vec<u32> {
        let me = std::process::id();
        let mut pids = Vec::new();
        if self.by_exe() {
            if let Ok(dir) = std::fs::read_dir("/proc") {
                pids.extend(
                    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                        .filter(|p| *p != me && !traced.contains_key(p) && self.matches(*p)),
                );
            }
        }
        let listeners = crate::model::sockdiag::listening().ok();
        pids.extend(self.listening(traced, listeners.as_deref()));
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Processes listening on a selected port, not traced yet.
    fn listening(&self, traced: &HashMap<u32, Traced>, listeners: Option<&[(u64, u16)]>) -> Vec<u32> {
        if self.ports.is_empty() {
            return Vec::new();
        }
        let inodes: HashSet<u64> = listeners.unwrap_or_default().iter().filter(|(_, p)| self.ports.contains(p)).map(|(i, _)| *i).collect();
        if inodes.is_empty() {
            return Vec::new();
        }
        let me = std::process::id();
        proc::pids_with_sockets(&inodes, &|p| p == me || traced.contains_key(&p))
    }
}

/// Traces a selected process if zerotrace can; anything else is said in the log and
/// skipped (never fatal: it is not a --pid). Inspects it on the calling thread (at start).
fn try_discovered(probes: &mut Probes, ctx: &mut AttachCtx<'_>, traced: &mut HashMap<u32, Traced>, pid: u32) {
    if traced.contains_key(&pid) || ctx.refused_before(pid) {
        return;
    }
    let started = proc::start_ticks(pid);
    let inspected = match ctx.s.selection.excluded(pid) {
        Some(reason) => Err(crate::model::target::TargetError::Excluded { pid, reason }),
        None => crate::model::target::inspect(pid),
    };
    attach_inspected(probes, ctx, traced, pid, started, inspected);
}

/// Where the run loop gets back the processes it had inspected off the loop: pid, start
/// time, executable identity before the inspection, the result.
type Inspection = (u32, Option<u64>, Option<(u64, u64)>, Result<Inspected, crate::model::target::TargetError>);

/// The same for processes found while running (exec, --port): reading a big executable
/// takes a while, so it happens on a blocking thread and the result comes back through
/// `tx` (the loop attaches it with `attach_inspected`).
fn inspect_later(ctx: &AttachCtx<'_>, traced: &HashMap<u32, Traced>, inspecting: &mut HashSet<u32>, tx: &mpsc::UnboundedSender<Inspection>, pid: u32) {
    if traced.contains_key(&pid) || ctx.refused_before(pid) || !inspecting.insert(pid) {
        return;
    }
    let tx = tx.clone();
    let selection = ctx.s.selection.clone();
    tokio::task::spawn_blocking(move || {
        let started = proc::start_ticks(pid);
        let exe = proc::exe_identity(pid);
        // Excluded ones are not inspected (a CRI lookup may wait here, off the loop).
        let inspected = match selection.excluded(pid) {
            Some(reason) => Err(crate::model::target::TargetError::Excluded { pid, reason }),
            None => crate::model::target::inspect(pid),
        };
        let _ = tx.send((pid, started, exe, inspected));
    });
}

impl AttachCtx<'_> {
    /// A process that was refused once is not inspected again (--port looks every second)
    /// until its pid names another process (an exec, or a new process).
    fn refused_before(&self, pid: u32) -> bool {
        let started = proc::start_ticks(pid);
        started.is_some() && self.rejected.get(&pid) == started.as_ref()
    }
}

/// Attaches an inspected process, or remembers that it was refused.
fn attach_inspected(
    probes: &mut Probes,
    ctx: &mut AttachCtx<'_>,
    traced: &mut HashMap<u32, Traced>,
    pid: u32,
    started: Option<u64>,
    inspected: Result<Inspected, crate::model::target::TargetError>,
) {
    if traced.contains_key(&pid) {
        return;
    }
    let refused = match inspected {
        Ok(target) => match attach_any(probes, ctx, &target) {
            Ok(t) => {
                traced.insert(pid, t);
                false
            }
            Err(e) => {
                tracing::warn!(pid, error = %e, "discovered process not traced");
                true
            }
        },
        Err(crate::model::target::TargetError::NoSuchProcess(_)) => false,
        Err(e @ crate::model::target::TargetError::Excluded { .. }) => {
            tracing::debug!(pid, "{e}");
            true
        }
        Err(e) => {
            tracing::warn!(pid, error = %e, "discovered process not traced");
            true
        }
    };
    if let (true, Some(t)) = (refused, started) {
        if ctx.rejected.len() >= 65_536 {
            ctx.rejected.retain(|p, _| proc::exists(*p));
        }
        ctx.rejected.insert(pid, t);
    }
}

/// One OTLP metrics export of the RED histograms and the last counters snapshot; a failure
/// is counted and logged once (cumulative totals: the next export makes up for it).
async fn export_metrics(
    sink: &mut MetricsSink,
    red: &SharedRed,
    resources: &Resources,
    snapshot: &Mutex<Vec<(&'static str, u64)>>,
    start_ns: u64,
    errors: &std::sync::atomic::AtomicU64,
) {
    let req = {
        let r = red.lock().expect("not poisoned");
        let snap = snapshot.lock().expect("not poisoned");
        crate::export::metrics::request(&r, resources, &snap, start_ns)
    };
    if let Err(why) = sink.send(req).await {
        if errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed) == 0 {
            tracing::warn!(error = %why, "OTLP metrics export failed (counted; the next export carries the totals)");
        }
    }
}

/// What `zerotrace status` shows.
fn status_reply(traced: &HashMap<u32, Traced>, counters: &[(&'static str, u64)], started: Instant) -> crate::control::proto::StatusReply {
    use crate::control::proto::{Counter as C, StatusReply, Target as T};
    let mut targets: Vec<T> = traced.iter().map(|(pid, t)| T { pid: *pid, service: t.service.clone() }).collect();
    targets.sort_by_key(|t| t.pid);
    StatusReply {
        agent_pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").into(),
        uptime_seconds: started.elapsed().as_secs(),
        targets,
        counters: counters.iter().map(|(n, v)| C { name: format!("zerotrace_{n}"), value: *v }).collect(),
    }
}

/// `zerotrace tail --connect`: the spans of a running agent, through its control socket,
/// drawn as by a tail that traces by itself. Ends at SIGINT/SIGTERM or when the agent goes.
pub async fn tail_remote(socket: &std::path::Path, token: Option<&str>, settings: crate::export::tail::TailSettings) -> Result<(), crate::control::ConnectError> {
    let mut client = crate::control::connect(socket, token).await?;
    let lost = |reason: String| crate::control::ConnectError::Lost { path: socket.display().to_string(), reason };
    let mut stream = client.spans(crate::control::proto::SpansRequest {}).await.map_err(|e| lost(e.message().to_owned()))?.into_inner();
    tracing::info!(socket = %socket.display(), "watching the agent's spans");
    let mut tail = Tail::new(settings);
    let mut services: HashMap<String, Arc<str>> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut sigint = signal(SignalKind::interrupt()).map_err(|e| lost(e.to_string()))?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(|e| lost(e.to_string()))?;
    let mut missed = 0u64;
    let end = loop {
        tokio::select! {
            msg = stream.message() => match msg {
                Ok(Some(rec)) => {
                    if rec.dropped > missed {
                        tracing::warn!(missed = rec.dropped - missed, "this tail was too slow: spans were dropped for it");
                        missed = rec.dropped;
                    }
                    if let Some((span, service)) = crate::control::span_of(&rec) {
                        let svc = services.entry(service.clone()).or_insert_with(|| Arc::from(service.as_str())).clone();
                        let late = tail.offer(&span, &svc, Instant::now());
                        print::print(&late.into_iter().collect::<Vec<_>>());
                    }
                }
                Ok(None) => break Err(lost("the agent stopped".into())),
                Err(e) => break Err(lost(e.message().to_owned())),
            },
            _ = tick.tick() => print::print(&tail.due(Instant::now())),
            _ = sigint.recv() => break Ok(()),
            _ = sigterm.recv() => break Ok(()),
        }
    };
    print::print(&tail.flush());
    end
}

