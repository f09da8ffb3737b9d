//! Which processes are traced: the ones given by `--pid`, and those discovery selects
//! (`--exe` and `--all` at start and at every exec, `--port` at start and every second).
//! Attaching a process: its exit watch, its resource, its listening ports, its kernel
//! configuration, and for Go programs their uprobes (once per executable file under
//! discovery by executable); native programs (not Go) are traced from their sockets alone.
use std::{
    collections::{HashMap, HashSet},
    os::fd::{FromRawFd, OwnedFd},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{io::unix::AsyncFd, sync::mpsc};

use super::{
    RunError, RunSettings,
    programs::{Programs, Ready},
};
use crate::{
    export::resource::{AttrValue, Process, Resources, attributes, resource},
    model::{
        Target,
        proc::{self, FileId},
        select::Selection,
        sockdiag,
        target::{Inspected, NativeTarget, TargetError},
    },
    probes::{Probes, features, go, uprobes},
};

/// Longest time the temporary catch-up probes stay attached.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(30);
/// Processes remembered as refused (their pid and start time) before the list is pruned.
const MAX_REFUSED: usize = 65_536;

/// A traced process while it is traced.
struct Traced {
    /// Its service.name, shared with the tail's spans.
    service: Arc<str>,
    /// When the temporary catch-up probe (for connections older than the agent) went on,
    /// and the socket inodes of those connections still waiting for it.
    catch_up_since: Option<Instant>,
    catch_up_inodes: HashSet<u64>,
}

/// Where the run loop gets back the processes it had inspected off the loop: pid, start
/// time, executable identity before the inspection, the result.
pub type Inspection = (u32, Option<u64>, Option<FileId>, Result<Ready, TargetError>);

/// The traced processes and the discovery of new ones.
pub struct Targets<'s> {
    s: &'s RunSettings,
    traced: HashMap<u32, Traced>,
    resources: Resources,
    exit_tx: mpsc::UnboundedSender<u32>,
    /// Discovered processes that could not be traced, with their start time.
    refused: HashMap<u32, u64>,
    discover: Option<Discover>,
    /// Processes being inspected on a blocking thread, and where the results come back.
    inspecting: HashSet<u32>,
    /// Discovered processes that exited before they could be traced
    /// (`processes_exited_before_traced`: shorter-lived than inspecting and attaching).
    pub exited_before_traced: u64,
    inspect_tx: mpsc::UnboundedSender<Inspection>,
    /// The programs read so far, by executable file.
    programs: Programs,
    /// The kernel lets this agent create uprobes (else Go programs are traced at the socket
    /// level).
    uprobes: bool,
    /// Discovery by executable (`--exe`, `--all`): a Go executable it selects has its
    /// uprobes attached once for all its processes (every process of it is selected).
    by_exe: Option<Discover>,
}

impl<'s> Targets<'s> {
    /// The set, and the channels the run loop waits on: pids that exited, inspections done.
    pub fn new(s: &'s RunSettings, resources: Resources, programs: Programs) -> (Self, mpsc::UnboundedReceiver<u32>, mpsc::UnboundedReceiver<Inspection>) {
        let (exit_tx, exits) = mpsc::unbounded_channel();
        let (inspect_tx, inspections) = mpsc::unbounded_channel();
        let t = Self {
            s,
            traced: HashMap::new(),
            resources,
            exit_tx,
            refused: HashMap::new(),
            discover: None,
            inspecting: HashSet::new(),
            exited_before_traced: 0,
            inspect_tx,
            programs,
            uprobes: uprobes_allowed(),
            by_exe: Discover::new(&s.exe_globs, &[], s.all),
        };
        (t, exits, inspections)
    }

    pub fn contains(&self, pid: u32) -> bool {
        self.traced.contains_key(&pid)
    }

    pub fn len(&self) -> usize {
        self.traced.len()
    }

    pub fn is_empty(&self) -> bool {
        self.traced.is_empty()
    }

    pub fn pids(&self) -> Vec<u32> {
        self.traced.keys().copied().collect()
    }

    /// Whether processes are discovered (`--exe`, `--port`, `--all`): the agent then keeps
    /// running when none is left.
    pub fn discovering(&self) -> bool {
        self.discover.is_some()
    }

    /// The service.name of traced process `pid`.
    pub fn service(&self, pid: u32) -> Option<&Arc<str>> {
        self.traced.get(&pid).map(|t| &t.service)
    }

    /// (pid, service.name) of every traced process.
    pub fn services(&self) -> impl Iterator<Item = (u32, &Arc<str>)> {
        self.traced.iter().map(|(pid, t)| (*pid, &t.service))
    }

    pub fn remove(&mut self, pid: u32) {
        self.traced.remove(&pid);
    }

    /// A `--pid` target: failing to attach it is fatal.
    pub fn attach_given(&mut self, probes: &mut Probes, target: &Ready) -> Result<(), RunError> {
        let t = self.attach(probes, target)?;
        self.traced.insert(target.pid(), t);
        Ok(())
    }

    /// Starts discovery: watches for execs (the caller attached that probe) and attaches the
    /// selected processes running now.
    pub fn discover(&mut self, d: Discover, probes: &mut Probes) {
        for pid in d.running(&self.traced) {
            if self.traced.contains_key(&pid) || self.refused_before(pid) {
                continue;
            }
            let started = proc::start_ticks(pid);
            let inspected = inspect_unless_excluded(&self.s.selection, &self.programs, pid);
            self.attach_inspected(probes, pid, started, inspected);
        }
        tracing::info!(
            exe = ?d.globs.iter().map(|g| g.as_str()).collect::<Vec<_>>(),
            ports = ?d.ports,
            all = d.all,
            traced = self.traced.len(),
            "discovering processes (by executable at exec, by port every second)"
        );
        self.discover = Some(d);
    }

    /// Whether an inspection runs now (its process may become a target).
    pub fn inspecting_any(&self) -> bool {
        !self.inspecting.is_empty()
    }

    /// A `--pid` target exec'd: inspect and attach it again, as the program it runs now.
    pub fn reattach(&mut self, pid: u32) {
        self.refused.remove(&pid);
        self.inspect_later(pid);
    }

    /// A process exec'd: inspect it if discovery selects its new executable.
    pub fn exec_seen(&mut self, pid: u32) {
        if self.discover.as_ref().is_some_and(|d| d.matches(pid)) {
            self.inspect_later(pid);
        }
    }

    /// An inspection done off the loop comes back: attach it, unless the process ran
    /// another program by now (what was read is not what runs; its exec brings it back).
    pub fn inspected(&mut self, probes: &mut Probes, (pid, started, exe, result): Inspection) {
        self.inspecting.remove(&pid);
        if exe.is_some() && proc::exe_identity(pid) != exe {
            tracing::debug!(pid, "process exec'd while it was inspected; inspecting again");
            if self.s.pids.contains(&pid) {
                self.inspect_later(pid);
            } else {
                self.exec_seen(pid);
            }
            return;
        }
        self.attach_inspected(probes, pid, started, result);
    }

    /// Once a second: listening ports of every target, the end of catch-up probes, and
    /// processes that started listening on a `--port`.
    pub fn refresh(&mut self, probes: &mut Probes, listeners: Option<&[(u64, u16)]>) {
        for pid in self.traced.keys() {
            if let Err(e) = probes.set_listening(*pid, &proc::listening_ports(*pid, listeners)) {
                tracing::warn!(pid, error = %e, "cannot update the listening ports");
            }
        }
        self.catch_up(probes);
        let new: Vec<u32> = self.discover.as_ref().map(|d| d.listening(&self.traced, listeners)).unwrap_or_default();
        for pid in new {
            self.inspect_later(pid);
        }
    }

    /// Reading a big executable takes a while, so processes found while running are
    /// inspected on a blocking thread; the result comes back to `inspected`.
    fn inspect_later(&mut self, pid: u32) {
        if self.traced.contains_key(&pid) || self.refused_before(pid) || !self.inspecting.insert(pid) {
            return;
        }
        let tx = self.inspect_tx.clone();
        let selection = self.s.selection.clone();
        let programs = self.programs.clone();
        tokio::task::spawn_blocking(move || {
            let started = proc::start_ticks(pid);
            let exe = proc::exe_identity(pid);
            // Excluded ones are not inspected (a CRI lookup may wait here, off the loop).
            let _ = tx.send((pid, started, exe, inspect_unless_excluded(&selection, &programs, pid)));
        });
    }

    /// A process that was refused once is not inspected again (--port looks every second)
    /// until its pid names another process (an exec, or a new process).
    fn refused_before(&self, pid: u32) -> bool {
        let started = proc::start_ticks(pid);
        started.is_some() && self.refused.get(&pid) == started.as_ref()
    }

    /// Attaches an inspected process found by discovery, or remembers that it was refused
    /// (never fatal: it is not a --pid).
    fn attach_inspected(&mut self, probes: &mut Probes, pid: u32, started: Option<u64>, inspected: Result<Ready, TargetError>) {
        if self.traced.contains_key(&pid) {
            return;
        }
        let refused = match inspected.map_err(RunError::from).and_then(|t| self.attach(probes, &t)) {
            Ok(t) => {
                self.traced.insert(pid, t);
                false
            }
            Err(RunError::Target(TargetError::NoSuchProcess(_))) => {
                self.exited_before_traced += 1;
                false
            }
            Err(e @ RunError::Target(TargetError::Excluded { .. })) => {
                tracing::debug!(pid, "{e}");
                true
            }
            Err(e) if self.s.pids.contains(&pid) => {
                tracing::warn!(pid, error = %e, "the --pid target exec'd a program that is not traced; it is tried again at its next exec");
                true
            }
            Err(e) => {
                tracing::warn!(pid, error = %e, "discovered process not traced");
                true
            }
        };
        if let (true, Some(t)) = (refused, started) {
            if self.refused.len() >= MAX_REFUSED {
                self.refused.retain(|p, _| proc::exists(*p));
            }
            self.refused.insert(pid, t);
        }
    }

    /// Starts tracing a selected process: a Go program with its uprobes, anything else at the
    /// socket level (Go programs too when the kernel refuses this agent uprobes).
    fn attach(&mut self, probes: &mut Probes, ready: &Ready) -> Result<Traced, RunError> {
        match (&ready.inspected, &ready.plan) {
            (Inspected::Go(t), _) if !self.uprobes => {
                let n = NativeTarget {
                    pid: t.pid,
                    exe_path: t.exe_path.clone(),
                    exe_name: t.exe_name.clone(),
                    runtime: Some(("go".into(), t.build.go_version.clone())),
                    env: t.env.clone(),
                };
                self.attach_socket_level(probes, &n, "a Go program, at the socket level: no uprobes without CAP_SYS_ADMIN")
            }
            (Inspected::Go(t), Some(plan)) => self.attach_go(probes, t, plan, ready.file),
            (Inspected::Go(t), None) => Err(RunError::Target(TargetError::NotGo { pid: t.pid, path: t.exe_path.display().to_string() })),
            (Inspected::Native(n), _) => {
                self.attach_socket_level(probes, n, "native program (not Go): HTTP/1 and HTTP/2 server and client spans from its sockets, no goroutines")
            }
        }
    }

    fn attach_socket_level(&mut self, probes: &mut Probes, n: &NativeTarget, note: &str) -> Result<Traced, RunError> {
        let service = self.begin(probes, n.pid, &Process::from(n))?;
        probes.add_target(n.pid, &zerotrace_common::TargetConfig::native())?;
        tracing::info!(pid = n.pid, exe = %n.exe_path.display(), runtime = n.runtime.as_ref().map_or("unknown", |r| r.0.as_str()), layer = "socket", note, "tracing");
        Ok(Traced { service, catch_up_since: None, catch_up_inodes: HashSet::new() })
    }

    /// What every traced process gets first: a watch on its exit, its resource, its
    /// listening ports. Returns its service name.
    fn begin(&mut self, probes: &mut Probes, pid: u32, who: &Process<'_>) -> Result<Arc<str>, RunError> {
        let s = self.s;
        // The exit watch first: a process that exits while it is being attached must not stay
        // "traced" forever (its pid then blocks a later process with the same pid).
        if !watch_exit(pid, self.exit_tx.clone()) {
            return Err(RunError::Target(TargetError::NoSuchProcess(pid)));
        }
        let attrs = attributes(who, s.service_name.as_deref(), s.env_service_name.as_deref(), &s.resource_attrs);
        let service = match &attrs[0].1 {
            AttrValue::Str(v) => v.clone(),
            AttrValue::Int(_) => who.exe_name.to_owned(),
        };
        self.resources.lock().expect("not poisoned").insert(pid, resource(&attrs));
        // Server sockets are those on ports the process listens on (kept fresh by `refresh`).
        probes.set_listening(pid, &proc::listening_ports(pid, sockdiag::listening().ok().as_deref()))?;
        Ok(Arc::from(service))
    }

    /// Starts tracing one inspected Go process: its resource, its kernel configuration, its
    /// uprobes (`plan`; shared with the other processes of its `file` under discovery by
    /// executable), a watch on its exit.
    fn attach_go(&mut self, probes: &mut Probes, target: &Target, plan: &go::Plan, file: Option<FileId>) -> Result<Traced, RunError> {
        let s = self.s;
        let pid = target.pid;
        let service = self.begin(probes, pid, &Process::from(target))?;
        probes.add_target(pid, &go::target_config(target, plan))?;
        // Connections accepted before zerotrace started are picked up at their next request;
        // their Go connection is learnt by a temporary probe on (*conn).readRequest.
        let existing: HashSet<u64> = proc::accepted_connections(pid).map(|c| c.into_iter().map(|s| s.inode).collect()).unwrap_or_default();
        let catch_up = plan.catch_up.filter(|_| !existing.is_empty());
        // The file opened once and named by this agent's fd: a process that exits while its
        // uprobes are attached leaves the path valid (shared uprobes stay for the file's next
        // process). A process that exec'd since its inspection is not attached here; its
        // exec brings it back.
        let gone = |probes: &mut Probes| {
            probes.remove_target(pid, true);
            Err(RunError::Target(TargetError::NoSuchProcess(pid)))
        };
        let (exe, id) = match proc::open_exe(pid) {
            Ok((f, id)) if file.is_none_or(|want| want == id) => (f, id),
            Ok(_) => return gone(probes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound || !proc::exists(pid) => return gone(probes),
            Err(source) => {
                probes.remove_target(pid, true);
                return Err(RunError::Target(TargetError::Access { pid, source }));
            }
        };
        // --pid and --port targets that discovery by executable does not select keep uprobes
        // of their own: other processes of their file are not traced and would pay the traps.
        let share = self.by_exe.as_ref().is_some_and(|d| d.matches(pid));
        let attached = probes.attach_go(pid, &exe, id, plan, share).and_then(|shared| match catch_up {
            Some(off) => probes.attach_temporary(pid, uprobes::GO_CONN_SERVE, &exe, off).map(|()| shared),
            None => Ok(shared),
        });
        drop(exe);
        let shared = match attached {
            Ok(shared) => shared,
            // Exited (a zombie has no executable any more).
            Err(_) if proc::exe_identity(pid).is_none() => return gone(probes),
            Err(source) => {
                probes.remove_target(pid, true);
                return Err(RunError::Attach { pid, source });
            }
        };
        let report = &plan.report;
        tracing::info!(
            pid,
            exe = %target.exe_path.display(),
            go = %target.build.go_version,
            offsets = target.layout.source,
            uprobes = report.uprobes + usize::from(catch_up.is_some()),
            shared,
            client_spans = report.client,
            sql_spans = report.sql,
            http2_spans = report.h2,
            sql_driver = plan.sql.as_ref().and_then(|d| d.module).unwrap_or("-"),
            sql_error_codes = plan.sql.as_ref().is_some_and(|d| d.error_type.is_some()),
            grpc_spans = plan.grpc.map_or("-", |g| g.source),
            grpc_server = plan.grpc.is_some_and(|g| g.server()),
            grpc_client = plan.grpc.is_some_and(|g| g.client()),
            spawns = report.spawns,
            channels = report.channels,
            https = report.tls,
            inject_traceparent = report.inject,
            existing_connections = existing.len(),
            mode = ?s.go_http_probes,
            socket_hooks = probes.hooks.name(),
            "tracing"
        );
        tracing::debug!(pid, offsets = ?target.layout.offsets, tcpconn = ?target.layout.type_tcpconn, response = ?target.layout.type_response, "Go layout");
        if !target.layout.absent.is_empty() {
            tracing::debug!(pid, absent = ?target.layout.absent, "fields this Go version does not have");
        }
        Ok(Traced { service, catch_up_since: catch_up.map(|_| Instant::now()), catch_up_inodes: existing })
    }

    /// Detaches the temporary readRequest probes once every connection older than the agent
    /// has been tied to its Go connection (it had a request) or is gone, or after
    /// CATCH_UP_LIMIT.
    fn catch_up(&mut self, probes: &mut Probes) {
        for (pid, t) in self.traced.iter_mut() {
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
}

/// Inspects a discovered process, unless the node-wide selection leaves it alone.
fn inspect_unless_excluded(selection: &Selection, programs: &Programs, pid: u32) -> Result<Ready, TargetError> {
    match selection.excluded(pid) {
        Some(reason) => Err(TargetError::Excluded { pid, reason }),
        None => programs.inspect(pid),
    }
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

/// Reports `pid` on `tx` when that process exits, via a pidfd (no polling). False: it is
/// gone already (or cannot be watched).
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

/// Discovery: which processes to trace besides --pid: by executable (`--exe`, `--all`;
/// checked at start and at every exec) and by listening port (`--port`; checked at start and
/// every second).
pub struct Discover {
    globs: Vec<glob::Pattern>,
    ports: Vec<u16>,
    all: bool,
}

impl Discover {
    pub fn new(globs: &[glob::Pattern], ports: &[u16], all: bool) -> Option<Self> {
        (!globs.is_empty() || !ports.is_empty() || all).then(|| Self { globs: globs.to_vec(), ports: ports.to_vec(), all })
    }

    /// Whether execs are worth watching (selection by executable).
    pub fn by_exe(&self) -> bool {
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
        if self.by_exe()
            && let Ok(dir) = std::fs::read_dir("/proc")
        {
            pids.extend(
                dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()).filter(|p| *p != me && !traced.contains_key(p) && self.matches(*p)),
            );
        }
        let listeners = sockdiag::listening().ok();
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
