//! Loading and attaching the kernel programs. One `Probes` owns the loaded object: the
//! socket-layer tracepoints are attached once for the whole machine (they filter on the
//! SELECTED bitmap in the kernel), uprobes per traced process, or once per executable file
//! under discovery by executable (the programs filter on TARGETS). Dropping `Probes`
//! detaches everything; the kernel also does it if the agent dies, so targets run on
//! unchanged.
pub mod btf;
mod calibrate;
pub mod features;
pub mod go;
pub mod guard;
pub mod hooks;
mod kfuncs;
pub mod occupancy;

use std::{
    collections::{HashMap, HashSet},
    num::NonZeroU32,
    path::Path,
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::Array,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        RawTracePoint, UProbe,
        uprobe::{UProbeLinkId, UProbeScope},
    },
};
use zerotrace_common::{COUNTER_SLOTS, ConnKey, ConnRole, ConnState, Counter, KernelOffsets, ListenKey, Settings, TargetConfig, bounds, names};

use crate::model::proc::FileId;

/// The kernel object built from ebpf/zerotrace-ebpf by build.rs.
static KERNEL_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/zerotrace"));

pub use hooks::{HookSet, SocketHooks};

/// Uprobe programs (attached per process).
pub mod uprobes {
    pub const GO_CONN_SERVE: &str = "go_conn_serve";
    pub const GO_SERVE_HTTP: &str = "go_serve_http";
    pub const GO_SERVE_HTTP_RET: &str = "go_serve_http_ret";
    pub const GO_ROUND_TRIP: &str = "go_round_trip";
    pub const GO_ROUND_TRIP_RET: &str = "go_round_trip_ret";
    pub const GO_NEWPROC1_RET: &str = "go_newproc1_ret";
    pub const GO_SPAWN_CALL: &str = "go_spawn_call";
    pub const GO_CHAN_SEND: &str = "go_chan_send";
    pub const GO_CHAN_RECV: &str = "go_chan_recv";
    pub const GO_CHAN_PUT: &str = "go_chan_put";
    pub const GO_CHAN_TAKE: &str = "go_chan_take";
    pub const GO_CHAN_REFILL: &str = "go_chan_refill";
    pub const GO_SQL_QUERY: &str = "go_sql_query";
    pub const GO_SQL_EXEC: &str = "go_sql_exec";
    pub const GO_SQL_RET: &str = "go_sql_ret";
    pub const GO_SQL_STMT_QUERY: &str = "go_sql_stmt_query";
    pub const GO_SQL_STMT_EXEC: &str = "go_sql_stmt_exec";
    pub const GO_GRPC_STREAM: &str = "go_grpc_stream";
    pub const GO_GRPC_STATUS: &str = "go_grpc_status";
    pub const GO_GRPC_CLIENT_STREAM: &str = "go_grpc_client_stream";
    pub const GO_GRPC_CLIENT_FINISH: &str = "go_grpc_client_finish";
    pub const GO_H2_HANDLER: &str = "go_h2_handler";
    pub const GO_H2_HANDLER_RET: &str = "go_h2_handler_ret";
    pub const GO_H2_XNET_HANDLER: &str = "go_h2_xnet_handler";
    pub const GO_H2_XNET_HANDLER_RET: &str = "go_h2_xnet_handler_ret";
    pub const GO_TLS_READ: &str = "go_tls_read";
    /// GO_TLS_READ's twin that reads incoming traceparents (loaded instead of it with
    /// --inject-traceparent; not in ALL).
    pub const GO_TLS_READ_INJECT: &str = "go_tls_read_inject";
    pub const GO_TLS_WRITE: &str = "go_tls_write";
    /// Loaded only with --inject-traceparent (not in ALL).
    pub const GO_INJECT: &str = "go_inject";
    pub const ALL: &[&str] = &[
        GO_TLS_READ,
        GO_TLS_WRITE,
        GO_SQL_QUERY,
        GO_SQL_EXEC,
        GO_SQL_RET,
        GO_SQL_STMT_QUERY,
        GO_SQL_STMT_EXEC,
        GO_GRPC_STREAM,
        GO_GRPC_STATUS,
        GO_GRPC_CLIENT_STREAM,
        GO_GRPC_CLIENT_FINISH,
        GO_H2_HANDLER,
        GO_H2_HANDLER_RET,
        GO_H2_XNET_HANDLER,
        GO_H2_XNET_HANDLER_RET,
        GO_CHAN_PUT,
        GO_CHAN_TAKE,
        GO_CHAN_REFILL,
        GO_CONN_SERVE,
        GO_SERVE_HTTP,
        GO_SERVE_HTTP_RET,
        GO_ROUND_TRIP,
        GO_ROUND_TRIP_RET,
        GO_NEWPROC1_RET,
        GO_SPAWN_CALL,
        GO_CHAN_SEND,
        GO_CHAN_RECV,
    ];
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Btf(#[from] btf::BtfError),
    #[error("loading the kernel programs failed: {0}; run `zerotrace doctor` to see what this kernel allows")]
    Load(String),
    #[error("program {name}: {detail}; run `zerotrace doctor` to see what this kernel allows")]
    Program { name: String, detail: String },
    #[error(
        "the kernel refused the traceparent writer ({0}); bpf_probe_write_user needs CAP_SYS_ADMIN and no kernel lockdown: run without --inject-traceparent"
    )]
    Inject(String),
    /// A kernel zerotrace cannot run on, found before loading anything.
    #[error("{0}")]
    Kernel(String),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("the kernel object has no {0} (agent and kernel programs out of step; rebuild with `cargo xtask build`)")]
    Missing(String),
    #[error("{0}")]
    Hooks(String),
}

impl ProbeError {
    /// Loading or attaching program `name` failed: one line, the verifier's log (if any) in
    /// a file that line names.
    pub fn program(name: impl Into<String>, source: aya::programs::ProgramError) -> Self {
        let name = name.into();
        let detail = log_aside(&name, source.to_string());
        ProbeError::Program { name, detail }
    }
}

/// `msg` in one line: a verifier's log in it (hundreds of lines) goes to a file in the
/// temporary directory, named in the line, and to the debug log (`--log debug`).
fn log_aside(what: &str, msg: String) -> String {
    let Some(at) = msg.find("Verifier output:").or_else(|| msg.find('\n')) else { return msg };
    tracing::debug!(program = what, "{msg}");
    let file: String = what.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '-' }).collect();
    let path = std::env::temp_dir().join(format!("zerotrace-verifier-{file}.log"));
    let head = msg[..at].trim_end_matches(['.', ' ']);
    match std::fs::write(&path, &msg) {
        Ok(()) => format!("{head} (the kernel's log is in {}; `--log debug` prints it)", path.display()),
        Err(_) => format!("{head} (`--log debug` prints the kernel's log)"),
    }
}

/// Load-time knobs of the kernel side.
#[derive(Clone, Debug)]
pub struct KernelSettings {
    pub req_capture: u32,
    pub max_conns: u32,
    pub hooks: SocketHooks,
    /// `--inject-traceparent`: keep trace ids per span and load the program that decides
    /// (and, when On, writes).
    pub inject: Inject,
    /// The trace sampler as the kernel applies it (`zerotrace_common::sampler_mode` and the
    /// ratio bound): injected traceparents say sampled only for traces the agent keeps.
    pub sampler: (u32, u64),
}

/// `--inject-traceparent`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Inject {
    Off,
    /// Write the header.
    On,
    /// Decide and report on each client span (`zerotrace.traceparent*`), write nothing:
    /// works under kernel lockdown and without CAP_SYS_ADMIN.
    DryRun,
}

pub struct Probes {
    ebpf: Ebpf,
    /// The socket hook set in use.
    pub hooks: HookSet,
    /// The program behind GO_TLS_READ (its `_inject` twin with injection on).
    tls_read: &'static str,
    /// Ports each target listens on, as last written to LISTEN.
    listening: HashMap<u32, Vec<u16>>,
    /// Per process: (program, link, temporary). Temporary links are dropped early.
    uprobe_links: HashMap<u32, Vec<(&'static str, UProbeLinkId, bool)>>,
    /// Uprobes attached once per executable file for every process running it, and which
    /// file each traced process shares.
    shared: HashMap<(u64, u64), Shared>,
    shared_of: HashMap<u32, (u64, u64)>,
    /// The file of each process with uprobes of its own.
    own_file: HashMap<u32, FileId>,
    /// Threads removing uprobes no longer wanted (of the file, when they were shared).
    detaching: Vec<(Option<FileId>, std::thread::JoinHandle<()>)>,
    /// The kernel maps' entry counts, refreshed at most every few seconds.
    occupancy: occupancy::Occupancy,
    /// Each program's skipped runs as last read (a rise is logged with the program's name).
    skipped: std::sync::Mutex<HashMap<String, u64>>,
    /// The socket hook programs attached (for their run counts).
    socket_programs: Vec<String>,
    /// Linux 7.0+: programs get twins (hooks::run_twins).
    run_twins: bool,
}

/// The uprobes of one executable file, attached for every process running it.
struct Shared {
    links: Vec<(&'static str, UProbeLinkId)>,
    /// The file, open read-only with a read lease: checked every second and at SIGIO for
    /// a writer waiting (and for a change on disk).
    held: std::fs::File,
    /// The traced processes running the file.
    pids: HashSet<u32>,
    /// Since when no traced process runs it.
    idle_since: Option<Instant>,
}

/// Takes a read lease on `f` (opened read-only): an open for writing or a truncation of the
/// file then waits for the lease's holder (SIGIO tells it) to give it up.
fn read_lease(f: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl on a descriptor we own; the result is checked.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLEASE, libc::F_RDLCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether uprobes on `f` may be shared: not on overlayfs (the kernel places them on the
/// file underneath, which another container's overlay shows under another identity).
fn shareable(f: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    const OVERLAYFS_SUPER_MAGIC: i64 = 0x794c_7630;
    // SAFETY: fstatfs into a zeroed struct on a descriptor we own; the result is checked.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(f.as_raw_fd(), &mut st) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if st.f_type as i64 == OVERLAYFS_SUPER_MAGIC {
        return Err(std::io::Error::other("on overlayfs"));
    }
    Ok(())
}

/// Whether the lease on `f` is being broken (someone waits to write the file).
fn lease_breaking(f: &std::fs::File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl on a descriptor we own.
    unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETLEASE) == libc::F_UNLCK }
}

/// A path naming an open file through this process's descriptor (valid while it is open,
/// whatever happens to the process the file was found through).
fn fd_path(f: &std::fs::File) -> std::path::PathBuf {
    use std::os::fd::AsRawFd;
    std::path::PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()))
}

/// Start-up stages timed at debug level (`ZEROTRACE_LOG=info,zerotrace::probes=debug`):
/// where start time goes on a slow machine (vmtest's emulated guests keep these lines).
struct Stages(std::time::Instant);

impl Stages {
    fn start() -> Self {
        Self(std::time::Instant::now())
    }

    fn done(&mut self, stage: &str) {
        tracing::debug!(ms = self.0.elapsed().as_millis() as u64, "start-up: {stage}");
        self.0 = std::time::Instant::now();
    }
}

impl Probes {
    pub fn load(ks: &KernelSettings) -> Result<Self, ProbeError> {
        if KERNEL_OBJECT.is_empty() {
            return Err(ProbeError::Missing(
                "the kernel programs in this binary: it was built with AYA_BUILD_SKIP=1 (for fuzzing); build it with `cargo xtask build`".into(),
            ));
        }
        // Decided before anything is loaded: a kernel zerotrace cannot run on, or without any
        // socket hook set, is refused here in one line.
        let mut stage = Stages::start();
        let inject = ks.inject != Inject::Off;
        features::preflight(inject).map_err(ProbeError::Kernel)?;
        // The socket-layer sets need no tracefs (BTF and raw tracepoints, uprobes through the
        // uprobe PMU); the syscall set does (its tracepoints' ids). It is mounted when it can
        // be: in a pod without CAP_SYS_ADMIN it cannot, and the DaemonSet mounts the node's.
        if let Err(e) = features::ensure_tracefs() {
            tracing::debug!(error = %e, "tracefs is not mounted (the socket-layer hook sets do not need it)");
        }
        let hooks = hooks::choose(ks.hooks).map_err(ProbeError::Hooks)?;
        stage.done("kernel checked (its BTF read), socket hook set chosen");
        let kernel: KernelOffsets = btf::kernel_offsets(btf::kernel()?.as_ref())?;
        stage.done("kernel offsets taken from BTF");
        // aya's own model of the kernel BTF (relocations, BTF tracepoints): parsed once here.
        let aya_btf = aya::Btf::from_sys_fs().ok();
        stage.done("kernel BTF read again (aya)");
        use zerotrace_common::settings_flags::{INJECT, INJECT_WRITE, RUN_TWINS};
        let run_twins = hooks::run_twins();
        let flags = match ks.inject {
            Inject::Off => 0,
            Inject::DryRun => INJECT,
            Inject::On => INJECT | INJECT_WRITE,
        } | if run_twins { RUN_TWINS } else { 0 };
        let (sampler, ratio_bound) = ks.sampler;
        let settings = Settings { req_capture: ks.req_capture, flags, sampler, ratio_bound, ..Settings::default() };
        let (object, preemption, calls) = kfuncs::rewrite(KERNEL_OBJECT, Some(btf::kernel()?.as_ref())).map_err(ProbeError::Load)?;
        tracing::debug!(?preemption, calls, "kernel object: preemption calls rewritten");
        let mut ebpf = EbpfLoader::new()
            .btf(aya_btf.as_ref())
            .override_global("KERNEL", &kernel, true)
            .override_global("SETTINGS", &settings, true)
            .map_max_entries(names::CONNS, ks.max_conns)
            .map_max_entries(names::RUN_MARK, if run_twins { zerotrace_common::RUN_MARK_SLOTS } else { 1 })
            .load(&object)
            .map_err(|e| ProbeError::Load(log_aside("object", e.to_string())))?;
        drop(object);
        stage.done("object parsed, maps created");
        let socket_programs = hooks::attach(&mut ebpf, aya_btf.as_ref(), hooks, inject, run_twins)?;
        stage.done("socket hook programs verified and attached");
        drop(aya_btf);
        btf::forget_kernel();
        tracing::info!(socket_hooks = hooks.name(), forced = ks.hooks != SocketHooks::Auto, run_twins, "socket hooks attached");
        // With injection on, the TLS read probe's twin that reads incoming traceparents.
        let tls_read = if inject { uprobes::GO_TLS_READ_INJECT } else { uprobes::GO_TLS_READ };
        for name in uprobes::ALL.iter().map(|n| if *n == uprobes::GO_TLS_READ { tls_read } else { n }) {
            let prog: &mut UProbe = program(&mut ebpf, name)?;
            prog.load().map_err(|source| ProbeError::program(name.to_string(), source))?;
        }
        // The one program that writes into targets exists in the kernel only when asked for.
        if inject {
            let prog: &mut UProbe = program(&mut ebpf, uprobes::GO_INJECT)?;
            prog.load().map_err(|source| ProbeError::Inject(log_aside(uprobes::GO_INJECT, source.to_string())))?;
        }
        stage.done("uprobe programs verified");
        Ok(Self {
            ebpf,
            hooks,
            tls_read,
            listening: HashMap::new(),
            uprobe_links: HashMap::new(),
            shared: HashMap::new(),
            shared_of: HashMap::new(),
            own_file: HashMap::new(),
            detaching: Vec::new(),
            occupancy: Default::default(),
            skipped: Default::default(),
            socket_programs,
            run_twins,
        })
    }

    /// Reports every exec to the agent (`--exe` discovery; `--pid` targets that exec).
    pub fn watch_execs(&mut self) -> Result<(), ProbeError> {
        const EXEC: &str = "sched_process_exec";
        let prog: &mut RawTracePoint = program(&mut self.ebpf, EXEC)?;
        prog.load().map_err(|source| ProbeError::program(EXEC, source))?;
        prog.attach(EXEC).map_err(|source| ProbeError::program(format!("raw tracepoint {EXEC}"), source))?;
        if self.run_twins {
            const TWIN: &str = "sched_process_exec_twin";
            let prog: &mut RawTracePoint = program(&mut self.ebpf, TWIN)?;
            prog.load().map_err(|source| ProbeError::program(TWIN, source))?;
            prog.attach(EXEC).map_err(|source| ProbeError::program(format!("raw tracepoint {EXEC} (twin)"), source))?;
        }
        Ok(())
    }

    /// Starts CPU sampling: the perf_event program on every online CPU's cpu-clock at
    /// `frequency` Hz (it keeps samples of selected processes only). Returns the number of
    /// CPUs sampled.
    pub fn start_profiling(&mut self, frequency: u64) -> Result<usize, ProbeError> {
        use aya::programs::perf_event::{PerfEvent, PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent};
        const NAME: &str = "cpu_sample";
        let cpus = aya::util::online_cpus().map_err(|(_, e)| ProbeError::Missing(format!("the list of online CPUs ({e})")))?;
        let prog: &mut PerfEvent = program(&mut self.ebpf, NAME)?;
        prog.load().map_err(|source| ProbeError::program(NAME, source))?;
        for cpu in &cpus {
            prog.attach(
                PerfEventConfig::Software(SoftwareEvent::CpuClock),
                PerfEventScope::AllProcessesOneCpu { cpu: *cpu },
                SamplePolicy::Frequency(frequency),
                false,
            )
            .map_err(|source| ProbeError::program(format!("{NAME} on CPU {cpu} (perf_event cpu-clock)"), source))?;
        }
        Ok(cpus.len())
    }

    /// Starts following process `pid` in the kernel: its configuration first, then its bit.
    pub fn add_target(&mut self, pid: u32, cfg: &TargetConfig) -> Result<(), ProbeError> {
        let mut targets: BpfHashMap<_, u32, TargetConfig> = self.map_mut(names::TARGETS)?;
        targets.insert(pid, cfg, 0).map_err(|source| ProbeError::Map { name: names::TARGETS, source })?;
        self.select(pid, true)
    }

    /// Sets or clears `pid`'s bit in the SELECTED bitmap.
    fn select(&mut self, pid: u32, on: bool) -> Result<(), ProbeError> {
        if pid >= bounds::MAX_PID {
            return Err(ProbeError::Missing(format!("room for pid {pid} (above {})", bounds::MAX_PID)));
        }
        let mut bits: Array<_, u64> = self.map_mut(names::SELECTED)?;
        let idx = pid / 64;
        let word = bits.get(&idx, 0).map_err(|source| ProbeError::Map { name: names::SELECTED, source })?;
        let word = if on { word | 1 << (pid % 64) } else { word & !(1 << (pid % 64)) };
        bits.set(idx, word, 0).map_err(|source| ProbeError::Map { name: names::SELECTED, source })
    }

    /// Tells the kernel which ports `pid` listens on (sockets on them are server sockets).
    pub fn set_listening(&mut self, pid: u32, ports: &[u16]) -> Result<(), ProbeError> {
        let old = self.listening.get(&pid).cloned().unwrap_or_default();
        if old == ports {
            return Ok(());
        }
        let mut map: BpfHashMap<_, ListenKey, u8> = self.map_mut(names::LISTEN)?;
        for port in old.iter().filter(|p| !ports.contains(p)) {
            let _ = map.remove(&ListenKey { pid, port: *port, _pad: 0 });
        }
        for port in ports.iter().filter(|p| !old.contains(p)) {
            map.insert(ListenKey { pid, port: *port, _pad: 0 }, 1, 0).map_err(|source| ProbeError::Map { name: names::LISTEN, source })?;
        }
        self.listening.insert(pid, ports.to_vec());
        Ok(())
    }

    /// Attaches the uprobes of `plan` for process `pid`, whose executable the agent opened
    /// (`exe`, identity `file`): for that process only, or (`shared`) once for every process
    /// running that file. A later process of a shared file attaches nothing: it joins (the
    /// kernel programs act only for processes in TARGETS). Every uprobe hit in an untraced
    /// process of that file then costs the trap, so sharing is for discovery by executable,
    /// where every such process is selected. Returns whether the process shares its file's.
    pub fn attach_go(&mut self, pid: u32, exe: &std::fs::File, file: FileId, plan: &go::Plan, shared: bool) -> Result<bool, ProbeError> {
        let path = fd_path(exe);
        let inode = file.inode();
        // The file's shared uprobes fire in this process already (their lease guarantees the
        // file was not written since they were placed, whatever its mtime says now).
        if let Some(s) = self.shared.get_mut(&inode) {
            s.pids.insert(pid);
            s.idle_since = None;
            self.shared_of.insert(pid, inode);
            return Ok(true);
        }
        // Shared only when no process of the file has its own (they would fire twice there)
        // and under a read lease on the file: the kernel holds an opener for writing back
        // until the lease is given up, so a file rewritten in place (allowed once no process
        // runs it) never meets uprobes placed for its old content (see `release_idle`). No
        // lease (a file of another owner without CAP_LEASE, leases disabled), or a file on
        // overlayfs (the kernel places uprobes on the file underneath, which containers of
        // one image share under different identities): per-process uprobes.
        let held = match shared.then(|| self.own_file.values().all(|f| f.inode() != inode)) {
            Some(true) => exe.try_clone().and_then(|f| shareable(&f).and_then(|()| read_lease(&f)).map(|()| f)),
            _ => Err(std::io::Error::other("not shared")),
        };
        let held = match held {
            Ok(f) => f,
            Err(e) => {
                if shared {
                    tracing::debug!(pid, error = %e, "the executable's uprobes are attached for this process only");
                }
                self.wait_detached(file, false);
                self.own_file.insert(pid, file);
                for site in &plan.sites {
                    let link = self.attach_site(site, &path, Some(pid))?;
                    self.uprobe_links.entry(pid).or_default().push((site.prog, link.1, false));
                }
                return Ok(false);
            }
        };
        self.wait_detached(file, true);
        let mut links = Vec::with_capacity(plan.sites.len());
        for site in &plan.sites {
            match self.attach_site(site, &path, None) {
                Ok(l) => links.push(l),
                Err(e) => {
                    self.detach_later(Some(file), links, Some(held));
                    return Err(e);
                }
            }
        }
        self.shared.insert(inode, Shared { links, held, pids: HashSet::from([pid]), idle_since: None });
        self.shared_of.insert(pid, inode);
        Ok(true)
    }

    /// Attaches a temporary uprobe (the catch-up probe) for process `pid` only.
    pub fn attach_temporary(&mut self, pid: u32, prog: &'static str, exe: &std::fs::File, offset: u64) -> Result<(), ProbeError> {
        let link = self.attach_site(&go::Site { prog, offset }, &fd_path(exe), Some(pid))?;
        self.uprobe_links.entry(pid).or_default().push((prog, link.1, true));
        Ok(())
    }

    /// Attaches one uprobe, for process `pid` or (None) every process running `exe`.
    fn attach_site(&mut self, site: &go::Site, exe: &Path, pid: Option<u32>) -> Result<(&'static str, UProbeLinkId), ProbeError> {
        let prog = if site.prog == uprobes::GO_TLS_READ { self.tls_read } else { site.prog };
        let p: &mut UProbe = program(&mut self.ebpf, prog)?;
        let scope = match pid {
            Some(pid) => UProbeScope::OneProcess(NonZeroU32::new(pid).ok_or_else(|| ProbeError::Missing("pid 0".into()))?),
            None => UProbeScope::AllProcesses,
        };
        let offset = site.offset;
        let link = p.attach(offset, exe, scope).map_err(|source| ProbeError::program(format!("{prog} at {}+{offset:#x}", exe.display()), source))?;
        Ok((prog, link))
    }

    /// Removes `links` (of executable `file`) on a thread of its own: removing a uprobe
    /// waits for a kernel grace period, one uprobe at a time (~0.1 s each here, ~45 per Go
    /// program), and the run loop keeps draining events and attaching new processes meanwhile.
    /// `lease`: the file's descriptor holding the read lease, given up once they are gone.
    fn detach_later(&mut self, file: Option<FileId>, links: Vec<(&'static str, UProbeLinkId)>, lease: Option<std::fs::File>) {
        let mut owned = Vec::new();
        for (prog, link) in links {
            if let Ok(p) = program::<UProbe>(&mut self.ebpf, prog)
                && let Ok(l) = p.take_link(link)
            {
                owned.push(l);
            }
        }
        self.detaching.retain(|(_, t)| !t.is_finished());
        if !owned.is_empty() {
            let t = std::thread::Builder::new().name("uprobe-detach".into()).spawn(move || {
                drop(owned);
                drop(lease);
            });
            if let Ok(t) = t {
                self.detaching.push((file, t));
            }
        }
    }

    /// Waits for removals under way of uprobes on the same file (device and inode) as
    /// `file` that would make new ones wrong. The kernel keeps one uprobe per file offset
    /// with the instruction it copied from the file when it was first placed: until the
    /// last link of it is gone, a new link reuses that copy, which is wrong for a file
    /// rewritten in place since (`file`'s size or mtime differ). And `shared` links over
    /// ones still going (even of the same content) would fire twice in every process.
    fn wait_detached(&mut self, file: FileId, shared: bool) {
        let conflicts = |f: &Option<FileId>| f.is_some_and(|f| f.inode() == file.inode() && (shared || f != file));
        if !self.detaching.iter().any(|(f, _)| conflicts(f)) {
            return;
        }
        let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.detaching).into_iter().partition(|(f, _)| conflicts(f));
        self.detaching = rest;
        tracing::debug!(?file, removals = mine.len(), "waiting for the removal of the file's previous uprobes");
        for (_, t) in mine {
            let _ = t.join();
        }
    }

    /// Every second and at SIGIO (a lease break): removes the shared uprobes of files no
    /// traced process has run for `linger` (kept that long for the next process of the same
    /// file: a short-lived program started again and again attaches once), and at once those
    /// of a file someone opens for writing (its lease breaks: the writer waits until the
    /// uprobes are gone and the lease given up, at most the kernel's lease-break-time) or
    /// that changed on disk anyway.
    pub fn release_idle(&mut self, linger: Duration) {
        let gone: Vec<((u64, u64), bool)> = self
            .shared
            .iter()
            .filter_map(|(f, s)| {
                let written = lease_breaking(&s.held);
                (written || s.idle_since.is_some_and(|t| t.elapsed() >= linger)).then_some((*f, written))
            })
            .collect();
        for (inode, written) in gone {
            let Some(s) = self.shared.remove(&inode) else { continue };
            if written {
                // Processes still running it (a kernel that let the file be opened for
                // writing while it runs) keep their other hooks and lose these.
                tracing::info!(traced_processes_running_it = s.pids.len(), "a traced executable is being written: its shared uprobes are removed first");
            }
            self.shared_of.retain(|_, f| *f != inode);
            let file = s.held.metadata().ok().map(|m| FileId::of(&m));
            self.detach_later(file, s.links, Some(s.held));
        }
    }

    /// Stops following `pid`: its uprobes are detached and its kernel state dropped.
    /// `purge`: also walk the maps keyed by pid for its entries (not at shutdown).
    /// Shared uprobes stay for the file's other processes (and for `release_idle`).
    pub fn remove_target(&mut self, pid: u32, purge: bool) {
        let own = self.uprobe_links.remove(&pid).unwrap_or_default();
        let file = self.own_file.remove(&pid);
        self.detach_later(file, own.into_iter().map(|(prog, link, _)| (prog, link)).collect(), None);
        if let Some(file) = self.shared_of.remove(&pid)
            && let Some(s) = self.shared.get_mut(&file)
        {
            s.pids.remove(&pid);
            if s.pids.is_empty() {
                s.idle_since = Some(Instant::now());
            }
        }
        let _ = self.select(pid, false);
        let _ = self.set_listening(pid, &[]);
        self.listening.remove(&pid);
        let mut go = false;
        if let Ok(mut targets) = self.map_mut::<BpfHashMap<_, u32, TargetConfig>>(names::TARGETS) {
            go = targets.get(&pid, 0).is_ok_and(|t| t.flags & zerotrace_common::target_flags::GO != 0);
            let _ = targets.remove(&pid);
        }
        if let Ok(mut conns) = self.map_mut::<BpfHashMap<_, ConnKey, ConnState>>(names::CONNS) {
            let stale: Vec<ConnKey> = conns.iter().filter_map(Result::ok).filter(|(_, v)| v.pid == pid).map(|(k, _)| k).collect();
            for k in stale {
                let _ = conns.remove(&k);
            }
        }
        // Receives in progress (syscall hook set): a thread of a process no longer selected
        // would not remove its own.
        if let Ok(mut recvs) = self.map_mut::<BpfHashMap<_, u64, zerotrace_common::RecvArgs>>(names::RECV_ARGS) {
            let stale: Vec<u64> = recvs.keys().filter_map(Result::ok).filter(|k| (k >> 32) as u32 == pid).collect();
            for k in stale {
                let _ = recvs.remove(&k);
            }
        }
        // A Go program's goroutine state, channel slots and client calls in flight
        // (--inject-traceparent): the kernel removes these when a request or call ends, not
        // when a process does. (Each map is walked: not at shutdown, when the maps go anyway.)
        if go && purge {
            for map in occupancy::PER_PROCESS {
                if let Some(m) = occupancy::RawMap::of(&self.ebpf, map) {
                    m.purge_pid(pid);
                }
            }
        }
    }

    /// Detaches the temporary uprobes of `pid`; returns how many there were.
    pub fn detach_temporary(&mut self, pid: u32) -> usize {
        let Some(links) = self.uprobe_links.remove(&pid) else { return 0 };
        let (temp, keep): (Vec<_>, Vec<_>) = links.into_iter().partition(|(_, _, t)| *t);
        let n = temp.len();
        for (prog, link, _) in temp {
            if let Ok(p) = program::<UProbe>(&mut self.ebpf, prog) {
                let _ = p.detach(link);
            }
        }
        self.uprobe_links.insert(pid, keep);
        n
    }

    /// The ids of every connection CONNS holds (None: the map could not be read), for the
    /// correlator's sweep of connections whose close record was lost.
    pub fn live_conn_ids(&self) -> Option<rustc_hash::FxHashSet<u64>> {
        // Every key, by the bounded walk (a key deleted under aya's iterator restarts it); a
        // walk that did not finish reads as nothing known.
        let keys = occupancy::RawMap::of(&self.ebpf, names::CONNS)?.all_keys()?;
        let conns = BpfHashMap::<_, ConnKey, ConnState>::try_from(self.ebpf.map(names::CONNS)?).ok()?;
        let mut live = rustc_hash::FxHashSet::default();
        for k in keys {
            let sk = u64::from_ne_bytes(k.as_slice().try_into().ok()?);
            match conns.get(&ConnKey { sk }, 0) {
                Ok(c) => {
                    live.insert(c.id);
                }
                // Gone since the walk: its connection is closed, its id not live.
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(_) => return None,
            }
        }
        Some(live)
    }

    /// Socket inodes of `pid` whose Go connection the kernel knows.
    pub fn go_resolved_inodes(&self, pid: u32) -> std::collections::HashSet<u64> {
        let Some(map) = self.ebpf.map(names::CONNS) else { return Default::default() };
        let Ok(conns) = BpfHashMap::<_, ConnKey, ConnState>::try_from(map) else { return Default::default() };
        conns.iter().filter_map(Result::ok).filter(|(_, c)| c.pid == pid && c.role == ConnRole::Server as u8 && c.go_conn != 0).map(|(_, c)| c.ino).collect()
    }

    /// The ring buffer of all events; can be taken once.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, ProbeError> {
        let map = self.ebpf.take_map(names::EVENTS).ok_or_else(|| ProbeError::Missing(names::EVENTS.into()))?;
        RingBuf::try_from(map).map_err(|source| ProbeError::Map { name: names::EVENTS, source })
    }

    /// Kernel counters summed over CPUs, indexed by `Counter`.
    pub fn counters(&self) -> Counters {
        let mut out = [0u64; COUNTER_SLOTS as usize];
        let Some(map) = self.ebpf.map(names::COUNTERS) else { return out };
        let Ok(arr) = PerCpuArray::<_, u64>::try_from(map) else { return out };
        for (i, slot) in out.iter_mut().enumerate() {
            if let Ok(values) = arr.get(&(i as u32), 0) {
                *slot = values.iter().sum();
            }
        }
        out
    }

    /// Entries of every kernel hash map (`map_<name>_entries`), counted now when `fresh`,
    /// else at most every `occupancy::EVERY`.
    /// And `uprobe_detach_backlog`: sets of uprobes (a process's, or a file's shared ones)
    /// still being removed; `uprobe_files_shared`: executable files whose uprobes are
    /// attached once for all their processes.
    pub fn occupancy(&mut self, fresh: bool) -> Vec<(&'static str, u64)> {
        let mut v = self.occupancy.get(&self.ebpf, fresh);
        self.detaching.retain(|(_, t)| !t.is_finished());
        v.push(("uprobe_detach_backlog", self.detaching.len() as u64));
        v.push(("uprobe_files_shared", self.shared.len() as u64));
        v
    }

    /// Runs of zerotrace's loaded programs the kernel skipped (`recursion_misses` in each
    /// program's fdinfo, Linux 5.12+; 0 where the kernel does not say). The kernel runs a
    /// program at most once per CPU at a time: since Linux 7.0 tracepoint programs run with
    /// preemption enabled, so a program preempted mid-run makes the kernel skip that program
    /// (a perf tracepoint program: any tracepoint program) for every other task on that CPU
    /// until it resumes. Each skip is an event zerotrace never saw (docs/limits.md), unless
    /// the program's twin handled it (`kernel_runs_rescued`, subtracted by the caller).
    pub fn runs_skipped(&self) -> u64 {
        let mut last = self.skipped.lock().unwrap_or_else(|e| e.into_inner());
        let mut total = 0;
        for (name, p) in self.ebpf.programs() {
            let Ok(fd) = p.fd() else { continue };
            // A twin's own skips lose nothing unless its program was skipped too, and those
            // are the program's skips that were not rescued.
            if name.ends_with("_twin") {
                continue;
            }
            let Some(info) = fdinfo(fd) else { continue };
            let n = fdinfo_field(&info, "recursion_misses").unwrap_or(0);
            total += n;
            let seen = last.entry(name.to_owned()).or_default();
            if n > *seen {
                tracing::debug!(program = name, skipped = n, "the kernel skipped runs of a program (kernel_runs_skipped)");
                *seen = n;
            }
        }
        total
    }

    /// How often the socket hook programs ran and for how long in all (ns): the kernel
    /// counts only while `kernel.bpf_stats_enabled` is 1 (else both are 0). `cargo xtask
    /// vmtest` turns it on to compare hook sets by program runs per request.
    pub fn socket_program_runs(&self) -> (u64, u64) {
        let mut total = (0, 0);
        for name in &self.socket_programs {
            let Some(info) = self.ebpf.program(name).and_then(|p| p.fd().ok()).and_then(fdinfo) else { continue };
            total.0 += fdinfo_field(&info, "run_cnt").unwrap_or(0);
            total.1 += fdinfo_field(&info, "run_time_ns").unwrap_or(0);
        }
        total
    }

    fn map_mut<'a, T>(&'a mut self, name: &'static str) -> Result<T, ProbeError>
    where
        T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
    {
        let map = self.ebpf.map_mut(name).ok_or_else(|| ProbeError::Missing(name.into()))?;
        T::try_from(map).map_err(|source| ProbeError::Map { name, source })
    }
}

/// What the verifier said about one program (`zerotrace doctor --programs`).
pub struct ProgramCheck {
    pub name: String,
    /// Ok: accepted, in this time; Err: refused (one line, the log in a file it names).
    /// None: not loadable on this kernel by design (the reason).
    pub outcome: Result<std::time::Duration, String>,
    pub skipped: Option<String>,
    /// Instructions the verifier walked (what its time grows with), where the kernel says.
    pub walked: Option<u64>,
}

/// Loads every program of the kernel object that this kernel could run, one at a time, and
/// reports what the verifier said: the programs of hook sets this kernel lacks are checked
/// too where the kernel can load them (raw tracepoints load without their tracepoint), so
/// one kernel checks more than it runs. Nothing is attached.
pub fn check_programs() -> Result<Vec<ProgramCheck>, ProbeError> {
    if KERNEL_OBJECT.is_empty() {
        return Err(ProbeError::Missing("the kernel programs in this binary (built with AYA_BUILD_SKIP=1)".into()));
    }
    features::preflight(false).map_err(ProbeError::Kernel)?;
    let kernel: KernelOffsets = btf::kernel_offsets(btf::kernel()?.as_ref())?;
    use zerotrace_common::settings_flags::{INJECT, INJECT_WRITE};
    // The traceparent writer as it loads with --inject-traceparent=on, unless lockdown
    // forbids writing (then as in dry-run, where the write is dead code).
    let locked = features::lockdown().is_some_and(|m| m != "none");
    // Twins checked as they run on Linux 7.0+ (with RUN_TWINS clear their work is dead code).
    let flags = if locked { INJECT } else { INJECT | INJECT_WRITE } | zerotrace_common::settings_flags::RUN_TWINS;
    let settings = Settings { flags, ..Settings::default() };
    let btf = aya::Btf::from_sys_fs().ok();
    let (object, _, _) = kfuncs::rewrite(KERNEL_OBJECT, Some(btf::kernel()?.as_ref())).map_err(ProbeError::Load)?;
    let mut ebpf = EbpfLoader::new()
        .btf(btf.as_ref())
        .override_global("KERNEL", &kernel, true)
        .override_global("SETTINGS", &settings, true)
        .load(&object)
        .map_err(|e| ProbeError::Load(log_aside("object", e.to_string())))?;
    let has_loop = features::helper(features::HELPER_LOOP);
    let mut out = Vec::new();
    let mut names: Vec<String> = ebpf.programs().map(|(n, _)| n.to_owned()).collect();
    names.sort();
    for name in names {
        let skip = |why: String| ProgramCheck { name: name.clone(), outcome: Ok(Default::default()), skipped: Some(why), walked: None };
        // The `_inject` twins read incoming traceparents with bpf_loop.
        if name.ends_with("_inject") && !has_loop {
            out.push(skip("needs bpf_loop (Linux 5.17; --inject-traceparent is refused here)".into()));
            continue;
        }
        let Some(prog) = ebpf.program_mut(&name) else { continue };
        let started = std::time::Instant::now();
        let result = match prog {
            aya::programs::Program::UProbe(p) => p.load(),
            aya::programs::Program::TracePoint(p) => p.load(),
            aya::programs::Program::RawTracePoint(p) => {
                let target = hooks::btf_target(&name);
                if !raw_tracepoint_exists(btf.is_some(), target) {
                    out.push(skip(format!("tracepoint {target} not on this kernel")));
                    continue;
                }
                p.load()
            }
            aya::programs::Program::PerfEvent(p) => p.load(),
            aya::programs::Program::BtfTracePoint(_) | aya::programs::Program::FEntry(_) | aya::programs::Program::FExit(_) => {
                // Tracing programs: their target must be in this kernel and loadable.
                let btf_tp = matches!(prog, aya::programs::Program::BtfTracePoint(_));
                let target = if btf_tp {
                    let target = hooks::btf_target(&name);
                    features::btf_tracepoint(target).map(|()| target).map_err(|why| format!("BTF tracepoint {target} not on this kernel ({why})"))
                } else {
                    hooks::fentry_target(&name).map_err(|why| format!("not loadable here ({why})"))
                };
                let (btf, target) = match (&btf, target) {
                    (Some(btf), Ok(target)) => (btf, target),
                    (_, Err(why)) => {
                        out.push(skip(why));
                        continue;
                    }
                    (None, _) => {
                        out.push(skip("no kernel BTF".into()));
                        continue;
                    }
                };
                match prog {
                    aya::programs::Program::BtfTracePoint(p) => p.load(target, btf),
                    aya::programs::Program::FEntry(p) => p.load(target, btf),
                    aya::programs::Program::FExit(p) => p.load(target, btf),
                    _ => unreachable!("matched above"),
                }
            }
            _ => {
                out.push(skip("a program type zerotrace does not use".into()));
                continue;
            }
        };
        let outcome = match result {
            Ok(()) => Ok(started.elapsed()),
            Err(source) => match ProbeError::program(name.clone(), source) {
                ProbeError::Program { detail, .. } => Err(detail),
                other => Err(other.to_string()),
            },
        };
        // The instructions the verifier walked (fdinfo `verified_insns`, Linux 5.16+).
        let walked = ebpf.program(&name).and_then(|p| p.fd().ok()).and_then(fdinfo).and_then(|info| fdinfo_field(&info, "verified_insns"));
        out.push(ProgramCheck { name, outcome, skipped: None, walked });
    }
    Ok(out)
}

/// Whether raw tracepoint `name` exists here (its `btf_trace_` type is in the kernel's BTF;
/// without BTF the load decides).
fn raw_tracepoint_exists(has_btf: bool, name: &str) -> bool {
    !has_btf || btf::kernel().ok().is_none_or(|b| b.id_of(&format!("btf_trace_{name}")).is_some())
}

/// A loaded program's fdinfo (the kernel's counts of its runs, skips and verification).
fn fdinfo(fd: &aya::programs::ProgramFd) -> Option<String> {
    use std::os::fd::{AsFd, AsRawFd};
    std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd())).ok()
}

/// The number on line `key:` of a program's fdinfo (None when the kernel has no such line).
fn fdinfo_field(fdinfo: &str, key: &str) -> Option<u64> {
    fdinfo.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(':')?.trim().parse().ok())
}

/// The kernel's counters summed over CPUs, indexed by `Counter`.
pub type Counters = [u64; COUNTER_SLOTS as usize];

pub fn counter(values: &Counters, c: Counter) -> u64 {
    values[c as usize]
}

pub(crate) fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, ProbeError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = ebpf.program_mut(name).ok_or_else(|| ProbeError::Missing(format!("program {name}")))?;
    p.try_into().map_err(|source| ProbeError::program(name.to_string(), source))
}

impl Drop for Probes {
    /// The kernel objects go with the last reference: wait for the detaching threads first,
    /// so that nothing of ours is left attached when the agent is gone. Then the fields, in
    /// order: `ebpf` (every link) before `shared` (the files' leases), so a writer waiting
    /// on a lease goes on only once the uprobes are gone.
    fn drop(&mut self) {
        for (_, t) in self.detaching.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_fields_from_fdinfo() {
        let info =
            "pos:\t0\nflags:\t02000002\nprog_type:\t26\nprog_id:\t13\nrun_time_ns:\t68220831\nrun_cnt:\t205\nrecursion_misses:\t2\nverified_insns:\t61709\n";
        assert_eq!(super::fdinfo_field(info, "recursion_misses"), Some(2));
        assert_eq!(super::fdinfo_field(info, "run_cnt"), Some(205));
        assert_eq!(super::fdinfo_field(info, "run_time_ns"), Some(68220831));
        assert_eq!(super::fdinfo_field(info, "verified_insns"), Some(61709));
        assert_eq!(super::fdinfo_field("prog_type:\t26\n", "recursion_misses"), None);
    }
}
