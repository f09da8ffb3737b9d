//! Loading and attaching the kernel programs. One `Probes` owns the loaded object: the
//! socket-layer tracepoints are attached once for the whole machine (they filter on the
//! SELECTED bitmap in the kernel), uprobes are attached per traced process. Dropping `Probes` detaches
//! everything; the kernel also does it if the agent dies, so targets run on unchanged.
pub mod btf;
pub mod features;
pub mod go;

use std::{collections::HashMap, num::NonZeroU32, path::Path};

use aya::{
    Ebpf, EbpfLoader,
    maps::Array,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        BtfTracePoint, RawTracePoint, UProbe,
        uprobe::{UProbeLinkId, UProbeScope},
    },
};
use zerotrace_common::{COUNTER_SLOTS, ConnKey, ConnRole, ConnState, Counter, KernelOffsets, ListenKey, Settings, SlotKey, TargetConfig, bounds, names};

/// The kernel object built from ebpf/zerotrace-ebpf by build.rs.
static KERNEL_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/zerotrace"));

/// The socket layer's tracepoints the kernel programs hang on, attached once for the machine
/// (the programs filter on the SELECTED bitmap first): as BTF tracepoints when the kernel
/// allows them, else as raw tracepoints. Each program is named like its tracepoint (the BTF
/// flavour with a `_btf` suffix).
pub const SOCKET_HOOKS: &[&str] = &["sock_recv_length", "tcp_sendmsg_locked", "inet_sock_set_state"];

/// Which flavour of socket hooks to load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum HookFlavour {
    /// BTF tracepoints if the kernel allows them, else raw tracepoints.
    Auto,
    /// tp_btf programs only.
    Btf,
    /// raw_tracepoint programs only.
    Raw,
}

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
    pub const GO_TLS_READ: &str = "go_tls_read";
    pub const GO_TLS_WRITE: &str = "go_tls_write";
    /// Loaded only with --inject-traceparent (not in ALL).
    pub const GO_INJECT: &str = "go_inject";
    pub const ALL: &[&str] = &[
        GO_TLS_READ,
        GO_TLS_WRITE,
        GO_SQL_QUERY,
        GO_SQL_EXEC,
        GO_SQL_RET,
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
    Load(#[source] aya::EbpfError),
    #[error("program {name}: {source}; run `zerotrace doctor` to see what this kernel allows")]
    Program {
        name: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error(
        "the kernel refused the traceparent writer ({source}); bpf_probe_write_user needs CAP_SYS_ADMIN and no kernel lockdown: run without --inject-traceparent"
    )]
    Inject {
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("the kernel object has no {0} (agent and kernel programs out of step; rebuild with `cargo xtask build`)")]
    Missing(String),
}

/// Load-time knobs of the kernel side.
#[derive(Clone, Debug)]
pub struct KernelSettings {
    pub req_capture: u32,
    pub max_conns: u32,
    pub hooks: HookFlavour,
    /// `--inject-traceparent`: keep trace ids per span and load the program that decides
    /// (and, when On, writes).
    pub inject: Inject,
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
    /// "btf" or "raw": the socket hooks in use.
    pub hooks: &'static str,
    /// Ports each target listens on, as last written to LISTEN.
    listening: HashMap<u32, Vec<u16>>,
    /// Per process: (program, link, temporary). Temporary links are dropped early.
    uprobe_links: HashMap<u32, Vec<(&'static str, UProbeLinkId, bool)>>,
    /// Threads removing the uprobes of processes no longer traced.
    detaching: Vec<std::thread::JoinHandle<()>>,
}

impl Probes {
    pub fn load(ks: &KernelSettings) -> Result<Self, ProbeError> {
        if KERNEL_OBJECT.is_empty() {
            return Err(ProbeError::Missing(
                "the kernel programs in this binary: it was built with AYA_BUILD_SKIP=1 (for fuzzing); build it with `cargo xtask build`".into(),
            ));
        }
        // Nothing zerotrace attaches needs tracefs (BTF and raw tracepoints, uprobes through
        // the uprobe PMU); it is mounted when it can be, for tools. In a pod without
        // CAP_SYS_ADMIN it cannot, and need not.
        if let Err(e) = features::ensure_tracefs() {
            tracing::debug!(error = %e, "tracefs is not mounted (not needed: BTF and raw tracepoints, the uprobe PMU)");
        }
        let kernel: KernelOffsets = btf::kernel_offsets(Path::new(btf::VMLINUX_BTF))?;
        use zerotrace_common::settings_flags::{INJECT, INJECT_WRITE};
        let flags = match ks.inject {
            Inject::Off => 0,
            Inject::DryRun => INJECT,
            Inject::On => INJECT | INJECT_WRITE,
        };
        let settings = Settings { req_capture: ks.req_capture, flags, ..Settings::default() };
        let mut ebpf = EbpfLoader::new()
            .override_global("KERNEL", &kernel, true)
            .override_global("SETTINGS", &settings, true)
            .map_max_entries(names::CONNS, ks.max_conns)
            .load(KERNEL_OBJECT)
            .map_err(ProbeError::Load)?;
        let hooks = match ks.hooks {
            HookFlavour::Raw => attach_raw(&mut ebpf).map(|()| "raw")?,
            HookFlavour::Btf => attach_btf(&mut ebpf).map(|()| "btf")?,
            HookFlavour::Auto => match attach_btf(&mut ebpf) {
                Ok(()) => "btf",
                Err(e) => {
                    tracing::debug!(error = %e, "BTF tracepoints refused; using raw tracepoints");
                    attach_raw(&mut ebpf).map(|()| "raw")?
                }
            },
        };
        for name in uprobes::ALL {
            let prog: &mut UProbe = program(&mut ebpf, name)?;
            prog.load().map_err(|source| ProbeError::Program { name: name.to_string(), source })?;
        }
        // The one program that writes into targets exists in the kernel only when asked for.
        if ks.inject != Inject::Off {
            let prog: &mut UProbe = program(&mut ebpf, uprobes::GO_INJECT)?;
            prog.load().map_err(|source| ProbeError::Inject { source })?;
        }
        Ok(Self { ebpf, hooks, listening: HashMap::new(), uprobe_links: HashMap::new(), detaching: Vec::new() })
    }

    /// Reports every exec to the agent (`--exe` discovery).
    pub fn watch_execs(&mut self) -> Result<(), ProbeError> {
        const EXEC: &str = "sched_process_exec";
        let prog: &mut RawTracePoint = program(&mut self.ebpf, EXEC)?;
        prog.load().map_err(|source| ProbeError::Program { name: EXEC.into(), source })?;
        prog.attach(EXEC).map_err(|source| ProbeError::Program { name: format!("raw tracepoint {EXEC}"), source })?;
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
        prog.load().map_err(|source| ProbeError::Program { name: NAME.into(), source })?;
        for cpu in &cpus {
            prog.attach(
                PerfEventConfig::Software(SoftwareEvent::CpuClock),
                PerfEventScope::AllProcessesOneCpu { cpu: *cpu },
                SamplePolicy::Frequency(frequency),
                false,
            )
            .map_err(|source| ProbeError::Program { name: format!("{NAME} on CPU {cpu} (perf_event cpu-clock)"), source })?;
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

    /// Attaches uprobe program `prog` at file offset `offset` of `exe`, for process `pid` only.
    pub fn attach_uprobe(&mut self, pid: u32, prog: &'static str, exe: &Path, offset: u64, temporary: bool) -> Result<(), ProbeError> {
        let p: &mut UProbe = program(&mut self.ebpf, prog)?;
        let scope = UProbeScope::OneProcess(NonZeroU32::new(pid).ok_or_else(|| ProbeError::Missing("pid 0".into()))?);
        let link = p.attach(offset, exe, scope).map_err(|source| ProbeError::Program { name: format!("{prog} at {}+{offset:#x}", exe.display()), source })?;
        self.uprobe_links.entry(pid).or_default().push((prog, link, temporary));
        Ok(())
    }

    /// Stops following `pid`: its uprobes are detached and its kernel state dropped.
    pub fn remove_target(&mut self, pid: u32) {
        // Removing a uprobe waits for a kernel grace period, one uprobe at a time (~0.1 s
        // each here, ~45 per Go process): done on a thread of its own, so that the run loop
        // keeps draining events and attaching new processes meanwhile.
        let mut owned = Vec::new();
        for (prog, link, _) in self.uprobe_links.remove(&pid).unwrap_or_default() {
            if let Ok(p) = program::<UProbe>(&mut self.ebpf, prog)
                && let Ok(l) = p.take_link(link)
            {
                owned.push(l);
            }
        }
        self.detaching.retain(|t| !t.is_finished());
        if !owned.is_empty() {
            let t = std::thread::Builder::new().name(format!("detach-{pid}")).spawn(move || drop(owned));
            if let Ok(t) = t {
                self.detaching.push(t);
            }
        }
        let _ = self.select(pid, false);
        let _ = self.set_listening(pid, &[]);
        self.listening.remove(&pid);
        if let Ok(mut targets) = self.map_mut::<BpfHashMap<_, u32, TargetConfig>>(names::TARGETS) {
            let _ = targets.remove(&pid);
        }
        if let Ok(mut conns) = self.map_mut::<BpfHashMap<_, ConnKey, ConnState>>(names::CONNS) {
            let stale: Vec<ConnKey> = conns.iter().filter_map(Result::ok).filter(|(_, v)| v.pid == pid).map(|(k, _)| k).collect();
            for k in stale {
                let _ = conns.remove(&k);
            }
        }
        // Client calls that were in flight when the process went (--inject-traceparent).
        if let Ok(mut hdrs) = self.map_mut::<BpfHashMap<_, SlotKey, [u64; 2]>>(names::CLIENT_HDR) {
            let stale: Vec<SlotKey> = hdrs.keys().filter_map(Result::ok).filter(|k| k.pid == pid).collect();
            for k in stale {
                let _ = hdrs.remove(&k);
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
    pub fn counters(&self) -> [u64; COUNTER_SLOTS as usize] {
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

    fn map_mut<'a, T>(&'a mut self, name: &'static str) -> Result<T, ProbeError>
    where
        T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
    {
        let map = self.ebpf.map_mut(name).ok_or_else(|| ProbeError::Missing(name.into()))?;
        T::try_from(map).map_err(|source| ProbeError::Map { name, source })
    }
}

fn attach_raw(ebpf: &mut Ebpf) -> Result<(), ProbeError> {
    for name in SOCKET_HOOKS {
        let prog: &mut RawTracePoint = program(ebpf, name)?;
        prog.load().map_err(|source| ProbeError::Program { name: name.to_string(), source })?;
        prog.attach(name).map_err(|source| ProbeError::Program { name: format!("raw tracepoint {name}"), source })?;
    }
    Ok(())
}

fn attach_btf(ebpf: &mut Ebpf) -> Result<(), ProbeError> {
    let btf = aya::Btf::from_sys_fs().map_err(|e| ProbeError::Missing(format!("kernel BTF ({e})")))?;
    for name in SOCKET_HOOKS {
        let prog_name = format!("{name}_btf");
        let prog: &mut BtfTracePoint = program(ebpf, &prog_name)?;
        prog.load(name, &btf).map_err(|source| ProbeError::Program { name: prog_name.clone(), source })?;
        prog.attach().map_err(|source| ProbeError::Program { name: format!("tp_btf:{name}"), source })?;
    }
    Ok(())
}

pub fn counter(values: &[u64; COUNTER_SLOTS as usize], c: Counter) -> u64 {
    values[c as usize]
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, ProbeError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = ebpf.program_mut(name).ok_or_else(|| ProbeError::Missing(format!("program {name}")))?;
    p.try_into().map_err(|source| ProbeError::Program { name: name.to_string(), source })
}

impl Drop for Probes {
    /// The kernel objects go with the last reference: wait for the detaching threads first,
    /// so that nothing of ours is left attached when the agent is gone.
    fn drop(&mut self) {
        for t in self.detaching.drain(..) {
            let _ = t.join();
        }
    }
}
