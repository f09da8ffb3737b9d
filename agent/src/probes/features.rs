//! What this kernel allows, and what zerotrace does where it does not. `TABLE` lists every
//! kernel feature the programs use with the first Linux release that has it and the path
//! older kernels take (ARCHITECTURE.md has the same table); `preflight` checks the ones
//! that can stop zerotrace before anything is loaded, so a kernel that cannot run it gets
//! one line naming what is missing. The checks try things for real: each loads the smallest
//! possible program of a type and attaches it the way zerotrace would. Used by `zerotrace
//! doctor` and before loading.
use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_PROG_LOAD: libc::c_long = 5;
const PROG_KPROBE: u32 = 2;
const PROG_TRACEPOINT: u32 = 5;
const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
const PROG_PERF_EVENT: u32 = 7;
const PROG_TRACING: u32 = 26;
const MAP_RINGBUF: u32 = 27;
const ATTACH_TRACE_FENTRY: u32 = 24;
const ATTACH_TRACE_RAW_TP: u32 = 23;
const PERF_TYPE_SOFTWARE: u32 = 1;
const PERF_TYPE_TRACEPOINT: u32 = 2;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
const PERF_EVENT_IOC_SET_BPF: libc::c_ulong = 0x4004_2408;
pub const TRACEFS: &str = "/sys/kernel/tracing";

/// Result of one check: whether it works and, if not, why.
pub type Probe = Result<(), String>;

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> io::Result<OwnedFd> {
    // SAFETY: attr is a zero-padded bpf_attr of the size we pass.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len() as u32) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn put32(a: &mut [u8], off: usize, v: u32) {
    a[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}
fn put64(a: &mut [u8], off: usize, v: u64) {
    a[off..off + 8].copy_from_slice(&v.to_ne_bytes());
}

/// Loads `r0 = 0; exit` as a program of `prog_type`.
fn load_trivial(prog_type: u32, expected_attach: u32, attach_btf_id: u32) -> io::Result<OwnedFd> {
    let insns: [u64; 2] = [0x0000_0000_0000_00b7, 0x0000_0000_0000_0095];
    load_insns(prog_type, expected_attach, attach_btf_id, &insns, None)
}

/// Loads `insns` as a program of `prog_type`, with the verifier's log in `log` if given.
fn load_insns(prog_type: u32, expected_attach: u32, attach_btf_id: u32, insns: &[u64], log: Option<&mut [u8]>) -> io::Result<OwnedFd> {
    let license = b"GPL\0";
    let mut attr = [0u8; 128];
    put32(&mut attr, 0, prog_type);
    put32(&mut attr, 4, insns.len() as u32);
    put64(&mut attr, 8, insns.as_ptr() as u64);
    put64(&mut attr, 16, license.as_ptr() as u64);
    if let Some(log) = log {
        put32(&mut attr, 24, 1);
        put32(&mut attr, 28, log.len() as u32);
        put64(&mut attr, 32, log.as_mut_ptr() as u64);
    }
    put32(&mut attr, 68, expected_attach);
    put32(&mut attr, 108, attach_btf_id);
    bpf(BPF_PROG_LOAD, &mut attr)
}

/// Whether BPF helper `id` exists for tracing programs: a call of it with no arguments set
/// up is refused either way, but only a missing helper is refused as unknown.
pub fn helper(id: u32) -> bool {
    // call id; r0 = 0; exit
    let insns: [u64; 3] = [0x85 | (u64::from(id) << 32), 0x0000_0000_0000_00b7, 0x0000_0000_0000_0095];
    let mut log = vec![0u8; 4096];
    if load_insns(PROG_TRACEPOINT, 0, 0, &insns, Some(&mut log)).is_ok() {
        return true;
    }
    let text = String::from_utf8_lossy(&log);
    !(text.contains("unknown func") || text.contains("invalid func"))
}

/// bpf_loop (include/uapi/linux/bpf.h): the incoming traceparent scan needs it.
pub const HELPER_LOOP: u32 = 181;

/// The running kernel's release, e.g. "5.10.0-32-cloud-amd64", and machine, e.g. "x86_64".
pub fn uname() -> (String, String) {
    // SAFETY: utsname is plain data; uname fills it.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-pointer.
    if unsafe { libc::uname(&mut u) } != 0 {
        return (String::new(), String::new());
    }
    let field = |f: &[libc::c_char]| {
        let bytes: Vec<u8> = f.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    (field(&u.release), field(&u.machine))
}

/// (major, minor) of a kernel release string ("6.12.95+deb12-cloud-amd64" -> (6, 12)).
pub fn release_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The running kernel's (major, minor).
pub fn kernel_version() -> Option<(u32, u32)> {
    release_version(&uname().0)
}

/// The oldest kernel zerotrace supports (the fentry and syscall hook sets; tested in VMs).
pub const MINIMUM: (u32, u32) = (5, 10);

/// What zerotrace does on a kernel that lacks a feature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Without {
    /// Refused before loading: the kernel is too old for zerotrace (below MINIMUM anyway).
    Refuse,
    /// Another way, with the same results.
    Fallback(&'static str),
    /// The option that needs it is refused in one line; the rest works.
    RefuseOption(&'static str),
}

/// A kernel feature the programs use.
pub struct Feature {
    pub name: &'static str,
    /// The first Linux release that has it.
    pub since: (u32, u32),
    pub used_for: &'static str,
    pub without: Without,
}

/// Every kernel feature the kernel programs use, with the path of kernels without it.
/// (ARCHITECTURE.md, "Kernels", has the same table.)
pub const TABLE: &[Feature] = &[
    Feature {
        name: "BPF instruction set v3 (jmp32, alu32)",
        since: (5, 1),
        used_for: "every program (built with bpf-linker --cpu v3)",
        without: Without::Refuse,
    },
    Feature { name: "global data (.rodata, .bss)", since: (5, 2), used_for: "kernel offsets and settings set at load", without: Without::Refuse },
    Feature { name: "bounded loops", since: (5, 3), used_for: "iovec sums, HTTP/2 pieces, Go map reads", without: Without::Refuse },
    Feature { name: "kernel BTF (/sys/kernel/btf/vmlinux)", since: (5, 4), used_for: "kernel struct offsets", without: Without::Refuse },
    Feature { name: "bpf_probe_read_user/_kernel", since: (5, 5), used_for: "reading target and kernel memory", without: Without::Refuse },
    Feature {
        name: "BTF tracepoints (tp_btf)",
        since: (5, 5),
        used_for: "socket-btf set, the close hook",
        without: Without::Fallback("raw tracepoints (socket-raw set, raw close hook)"),
    },
    Feature {
        name: "BPF trampolines (fentry/fexit)",
        since: (5, 5),
        used_for: "socket-fentry set (before the socket-layer tracepoints)",
        without: Without::Fallback("the syscall set (also where the kernel refuses tracing programs: built without ftrace)"),
    },
    Feature { name: "BPF ring buffer", since: (5, 8), used_for: "every record to the agent", without: Without::Refuse },
    Feature {
        name: "BPF memory charged to memory cgroups",
        since: (5, 11),
        used_for: "map memory",
        without: Without::Fallback("RLIMIT_MEMLOCK raised to unlimited (needs CAP_SYS_RESOURCE unless the limit is already high)"),
    },
    Feature {
        name: "bpf_get_current_task_btf, bpf_task_pt_regs",
        since: (5, 15),
        used_for: "the socket-layer tracepoint sets: user buffers from the saved registers",
        without: Without::Fallback(
            "the socket-fentry set and CPU samples read the saved registers at the top of the kernel stack; the syscall set has its arguments in its context",
        ),
    },
    Feature {
        name: "bpf_loop",
        since: (5, 17),
        used_for: "reading an incoming traceparent in the kernel (--inject-traceparent)",
        without: Without::RefuseOption("--inject-traceparent"),
    },
    Feature {
        name: "bpf_preempt_disable/enable (kernel functions)",
        since: (6, 10),
        used_for: "socket programs and the Go programs sharing their scratch run unpreempted (Linux 7.0 runs tracepoint programs preemptible)",
        without: Without::Fallback(
            "the calls become no-ops: tracepoint programs ran unpreempted before 7.0; fentry and uprobe programs stay preemptible on fully preemptible kernels",
        ),
    },
    Feature {
        name: "sock:sock_recv_length, tcp:tcp_sendmsg_locked",
        since: (6, 16),
        used_for: "the socket-layer sets (fire only for socket I/O)",
        without: Without::Fallback("the socket-fentry set, else the syscall set (syscalls:sys_enter/exit_* of the data syscalls)"),
    },
];

/// Which hook set and options this kernel takes: checked before anything is loaded.
/// `inject`: --inject-traceparent is on. Err: one line naming what is missing.
pub fn preflight(inject: bool) -> Result<(), String> {
    if !cfg!(target_arch = "x86_64") || uname().1 != "x86_64" {
        return Err(format!("zerotrace runs on x86_64 (amd64) only for now; this machine is {}", uname().1));
    }
    let (release, _) = uname();
    let version = release_version(&release);
    if version.is_some_and(|v| v < MINIMUM) {
        return Err(format!("zerotrace needs Linux {}.{} or newer; this kernel is {release}", MINIMUM.0, MINIMUM.1));
    }
    if !Path::new(super::btf::VMLINUX_BTF).exists() {
        return Err(format!(
            "zerotrace needs the kernel's BTF ({}, CONFIG_DEBUG_INFO_BTF=y; Linux 5.4+ distributions ship it); this kernel {release} has none",
            super::btf::VMLINUX_BTF
        ));
    }
    ring_buffer().map_err(|e| format!("zerotrace needs the BPF ring buffer (Linux 5.8): {e}"))?;
    if inject && !helper(HELPER_LOOP) {
        return Err(format!(
            "--inject-traceparent needs bpf_loop (Linux 5.17) to read an incoming traceparent in the kernel; this kernel {release} has none: run without it"
        ));
    }
    memlock(version)
}

/// Linux before 5.11 charges BPF maps to the locked-memory limit (RLIMIT_MEMLOCK, often
/// 64 KiB or 8 MiB): it is raised to unlimited, which needs CAP_SYS_RESOURCE unless the hard
/// limit already allows it.
fn memlock(version: Option<(u32, u32)>) -> Result<(), String> {
    if version.is_none_or(|v| v >= (5, 11)) {
        return Ok(());
    }
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: setrlimit with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } == 0 {
        return Ok(());
    }
    // SAFETY: plain data; getrlimit fills it.
    let mut now: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-pointer.
    unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut now) };
    if now.rlim_max == libc::RLIM_INFINITY || now.rlim_max >= MEMLOCK_NEEDED {
        let raised = libc::rlimit { rlim_cur: now.rlim_max, rlim_max: now.rlim_max };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raised) } == 0 {
            return Ok(());
        }
    }
    Err(format!(
        "Linux before 5.11 charges BPF maps to the locked-memory limit, which is {} KiB here and cannot be raised without CAP_SYS_RESOURCE: grant it (e.g. add SYS_RESOURCE to the container's capabilities) or raise the limit (ulimit -l unlimited)",
        now.rlim_cur / 1024
    ))
}

/// Locked memory the maps need at most with default bounds (ring buffer and hash maps).
const MEMLOCK_NEEDED: u64 = 64 << 20;

#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
    config2: u64,
    _rest: [u64; 8],
}

fn perf_open(attr: &PerfEventAttr, pid: i32, cpu: i32) -> io::Result<OwnedFd> {
    // SAFETY: attr is a valid perf_event_attr with its size set.
    let fd = unsafe { libc::syscall(libc::SYS_perf_event_open, attr as *const PerfEventAttr, pid, cpu, -1, PERF_FLAG_FD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn set_bpf(perf: &OwnedFd, prog: &OwnedFd) -> io::Result<()> {
    // SAFETY: both fds are open; the ioctl only reads the int.
    let rc = unsafe { libc::ioctl(perf.as_raw_fd(), PERF_EVENT_IOC_SET_BPF as _, prog.as_raw_fd()) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

fn pmu_type(name: &str) -> io::Result<u32> {
    let s = std::fs::read_to_string(format!("/sys/bus/event_source/devices/{name}/type"))?;
    s.trim().parse().map_err(|_| io::Error::other("bad PMU type"))
}

fn attr(kind: u32, config: u64) -> PerfEventAttr {
    PerfEventAttr { kind, size: std::mem::size_of::<PerfEventAttr>() as u32, config, ..Default::default() }
}

/// Mounts tracefs at /sys/kernel/tracing if no tracefs is reachable.
pub fn ensure_tracefs() -> io::Result<()> {
    if Path::new(TRACEFS).join("events").exists() || Path::new("/sys/kernel/debug/tracing/events").exists() {
        return Ok(());
    }
    let src = CString::new("tracefs").expect("no NUL");
    let dst = CString::new(TRACEFS).expect("no NUL");
    // SAFETY: plain mount(2) with valid C strings.
    let rc = unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), src.as_ptr(), 0, std::ptr::null()) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

pub fn tracefs_mounted() -> bool {
    Path::new(TRACEFS).join("events").exists() || Path::new("/sys/kernel/debug/tracing/events").exists()
}

fn tracepoint_id(category: &str, name: &str) -> io::Result<u64> {
    tracefs_file(category, name, "id")?.trim().parse().map_err(|_| io::Error::other("bad tracepoint id"))
}

/// The `format` file of tracepoint `category:name` (its record's fields); NotFound when the
/// kernel has no such tracepoint.
pub fn tracepoint_format(category: &str, name: &str) -> io::Result<String> {
    tracefs_file(category, name, "format")
}

/// Whether the kernel has tracepoint `category:name`: its tracefs entry, or without tracefs
/// (a pod that cannot mount it) the `btf_trace_<name>` type every tracepoint has in the
/// kernel's BTF. Enough for the BTF and raw tracepoints, which attach by name.
pub fn tracepoint_exists(category: &str, name: &str) -> bool {
    tracepoint_format(category, name).is_ok() || kernel_func_btf_id(&format!("btf_trace_{name}")).is_some()
}

fn tracefs_file(category: &str, name: &str, file: &str) -> io::Result<String> {
    for root in [TRACEFS, "/sys/kernel/debug/tracing"] {
        if let Ok(s) = std::fs::read_to_string(format!("{root}/events/{category}/{name}/{file}")) {
            return Ok(s);
        }
    }
    Err(io::Error::new(io::ErrorKind::NotFound, format!("tracepoint {category}:{name} not found")))
}

pub fn ring_buffer() -> Probe {
    let mut a = [0u8; 128];
    put32(&mut a, 0, MAP_RINGBUF);
    put32(&mut a, 12, 4096);
    bpf(BPF_MAP_CREATE, &mut a).map(drop).map_err(|e| format!("BPF_MAP_CREATE ringbuf: {e}"))
}

pub fn tracepoints() -> Probe {
    let id = tracepoint_id("syscalls", "sys_enter_getppid").map_err(|e| e.to_string())?;
    let prog = load_trivial(PROG_TRACEPOINT, 0, 0).map_err(|e| format!("BPF_PROG_LOAD tracepoint: {e}"))?;
    let perf = perf_open(&attr(PERF_TYPE_TRACEPOINT, id), -1, 0).map_err(|e| format!("perf_event_open: {e}"))?;
    set_bpf(&perf, &prog).map_err(|e| format!("attach: {e}"))
}

/// Whether tracepoint `name` can be hooked by a BTF tracing program (tp_btf, Linux 5.5).
pub fn btf_tracepoint(name: &str) -> Probe {
    let id = kernel_func_btf_id(&format!("btf_trace_{name}")).ok_or_else(|| format!("btf_trace_{name} not in kernel BTF"))?;
    let prog = load_trivial(PROG_TRACING, ATTACH_TRACE_RAW_TP, id).map_err(|e| format!("BPF_PROG_LOAD tp_btf: {e}"))?;
    let mut a = [0u8; 128];
    put32(&mut a, 8, prog.as_raw_fd() as u32);
    bpf(BPF_RAW_TRACEPOINT_OPEN, &mut a).map(drop).map_err(|e| format!("attach tp_btf: {e}"))
}

/// A function in this executable for the uprobe check to attach to.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn zerotrace_doctor_uprobe_target() -> u64 {
    std::hint::black_box(7)
}

pub fn uprobes() -> Probe {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let elf = crate::symbols::Executable::open(&exe).map_err(|e| e.to_string())?;
    let sym = elf.symbol("zerotrace_doctor_uprobe_target").ok_or("own symbol not found")?;
    let off = elf.file_offset(sym.addr).ok_or("own symbol outside segments")?;
    let kind = pmu_type("uprobe").map_err(|e| format!("no uprobe PMU: {e}"))?;
    let prog = load_trivial(PROG_KPROBE, 0, 0).map_err(|e| format!("BPF_PROG_LOAD kprobe-type: {e}"))?;
    let path = CString::new(exe.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    let mut a = attr(kind, 0);
    a.config1 = path.as_ptr() as u64;
    a.config2 = off;
    let perf = perf_open(&a, std::process::id() as i32, -1).map_err(|e| format!("perf_event_open uprobe: {e}"))?;
    set_bpf(&perf, &prog).map_err(|e| format!("attach: {e}"))?;
    zerotrace_doctor_uprobe_target();
    Ok(())
}

pub fn kprobes() -> Probe {
    let kind = pmu_type("kprobe").map_err(|_| "no kprobe PMU (CONFIG_KPROBES off)".to_string())?;
    let prog = load_trivial(PROG_KPROBE, 0, 0).map_err(|e| format!("BPF_PROG_LOAD kprobe: {e}"))?;
    let func = CString::new("do_nanosleep").expect("no NUL");
    let mut a = attr(kind, 0);
    a.config1 = func.as_ptr() as u64;
    let perf = perf_open(&a, -1, 0).map_err(|e| format!("perf_event_open kprobe: {e}"))?;
    set_bpf(&perf, &prog).map_err(|e| format!("attach: {e}"))
}

pub fn perf_events() -> Probe {
    let prog = load_trivial(PROG_PERF_EVENT, 0, 0).map_err(|e| format!("BPF_PROG_LOAD perf_event: {e}"))?;
    let mut a = attr(PERF_TYPE_SOFTWARE, 0 /* PERF_COUNT_SW_CPU_CLOCK */);
    a.sample_period = 10_000_000;
    let perf = perf_open(&a, -1, 0).map_err(|e| format!("perf_event_open cpu-clock: {e}"))?;
    set_bpf(&perf, &prog).map_err(|e| format!("attach: {e}"))
}

pub fn fentry() -> Probe {
    let id = kernel_func_btf_id("do_nanosleep").ok_or("do_nanosleep not in kernel BTF")?;
    load_trivial(PROG_TRACING, ATTACH_TRACE_FENTRY, id).map(drop).map_err(|e| format!("BPF_PROG_LOAD fentry: {e}"))
}

/// Whether an fentry program can be attached to kernel function `name` (a BPF trampoline
/// made, and removed again when the check's descriptors close).
pub fn fentry_on(name: &str) -> Probe {
    let (id, _) = super::btf::kernel().ok().and_then(|b| b.func(name)).ok_or_else(|| format!("{name} not in kernel BTF"))?;
    let prog = load_trivial(PROG_TRACING, ATTACH_TRACE_FENTRY, id).map_err(|e| format!("BPF_PROG_LOAD fentry: {e}"))?;
    let mut a = [0u8; 128];
    put32(&mut a, 8, prog.as_raw_fd() as u32);
    bpf(BPF_RAW_TRACEPOINT_OPEN, &mut a).map(drop).map_err(|e| format!("attach fentry/{name}: {e}"))
}

fn kernel_func_btf_id(name: &str) -> Option<u32> {
    super::btf::kernel().ok()?.id_of(name)
}

/// Effective capabilities of this process.
pub fn capabilities() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("CapEff:").map(|v| u64::from_str_radix(v.trim(), 16).ok())))
        .flatten()
        .unwrap_or(0)
}

pub const CAP_SYS_PTRACE: u32 = 19;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

pub fn has_cap(caps: u64, cap: u32) -> bool {
    caps & (1 << cap) != 0
}

const SECURITYFS: &str = "/sys/kernel/security";

/// The kernel lockdown mode selected in /sys/kernel/security/lockdown ("none",
/// "integrity", "confidentiality"); None when the kernel has no lockdown LSM, which means
/// none. securityfs is mounted first if it is not (as tracefs is): an unmounted securityfs
/// must not pass for "no lockdown".
pub fn lockdown() -> Option<String> {
    let file = Path::new(SECURITYFS).join("lockdown");
    if !file.exists() && Path::new(SECURITYFS).is_dir() {
        let src = CString::new("securityfs").expect("no NUL");
        let dst = CString::new(SECURITYFS).expect("no NUL");
        // SAFETY: plain mount(2) with valid C strings; failure leaves things as they were.
        let _ = unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), src.as_ptr(), 0, std::ptr::null()) };
    }
    lockdown_mode(&std::fs::read_to_string(file).ok()?)
}

/// The bracketed entry of a lockdown file: "none [integrity] confidentiality" -> integrity.
pub fn lockdown_mode(text: &str) -> Option<String> {
    let start = text.find('[')? + 1;
    let end = start + text[start..].find(']')?;
    Some(text[start..end].to_owned())
}

/// Why `--inject-traceparent` cannot work here (None: it can). Writing into a process's
/// memory from the kernel (bpf_probe_write_user) needs CAP_SYS_ADMIN and is refused under
/// any kernel lockdown.
pub fn injection_refusal(caps: u64, lockdown: Option<&str>) -> Option<String> {
    if let Some(mode) = lockdown.filter(|m| *m != "none") {
        return Some(format!(
            "the kernel is locked down ({mode}), which forbids eBPF programs from writing into process memory; \
             run without --inject-traceparent (same-host services are still linked without headers)"
        ));
    }
    if !has_cap(caps, CAP_SYS_ADMIN) {
        return Some(
            "writing a traceparent into requests needs CAP_SYS_ADMIN (bpf_probe_write_user), which this agent \
             does not have; run it as root, or run without --inject-traceparent"
                .to_owned(),
        );
    }
    None
}

/// What tracing needs: CAP_BPF + CAP_PERFMON (or CAP_SYS_ADMIN), and CAP_SYS_PTRACE to read
/// other users' executables. Returns the missing ones by name.
pub fn missing_privileges(caps: u64) -> Vec<&'static str> {
    let admin = has_cap(caps, CAP_SYS_ADMIN);
    let mut missing = Vec::new();
    if !admin && !has_cap(caps, CAP_BPF) {
        missing.push("CAP_BPF");
    }
    if !admin && !has_cap(caps, CAP_PERFMON) {
        missing.push("CAP_PERFMON");
    }
    if !has_cap(caps, CAP_SYS_PTRACE) {
        missing.push("CAP_SYS_PTRACE");
    }
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases() {
        assert_eq!(release_version("5.10.0-32-cloud-amd64"), Some((5, 10)));
        assert_eq!(release_version("6.12.95+deb12-cloud-amd64"), Some((6, 12)));
        assert_eq!(release_version("6.19.14+deb13-cloud-amd64"), Some((6, 19)));
        assert_eq!(release_version("4.18.0-553.el8_10.x86_64"), Some((4, 18)));
        assert_eq!(release_version("garbage"), None);
        assert!(TABLE.windows(2).all(|w| w[0].since <= w[1].since), "TABLE is ordered by release");
    }

    #[test]
    fn privileges_from_capability_mask() {
        assert_eq!(missing_privileges(0), vec!["CAP_BPF", "CAP_PERFMON", "CAP_SYS_PTRACE"]);
        let root = (1 << CAP_SYS_ADMIN) | (1 << CAP_SYS_PTRACE);
        assert!(missing_privileges(root).is_empty());
        assert_eq!(injection_refusal(root, None), None);
        assert_eq!(injection_refusal(root, Some("none")), None);
        assert!(injection_refusal(root, Some("integrity")).unwrap().contains("locked down (integrity)"));
        let no_admin = (1 << CAP_BPF) | (1 << CAP_PERFMON) | (1 << CAP_SYS_PTRACE);
        assert!(injection_refusal(no_admin, None).unwrap().contains("CAP_SYS_ADMIN"));
        assert_eq!(lockdown_mode("none [integrity] confidentiality\n").as_deref(), Some("integrity"));
        assert_eq!(lockdown_mode("[none] integrity confidentiality").as_deref(), Some("none"));
        assert_eq!(lockdown_mode("garbage"), None);
        let fine = (1 << CAP_BPF) | (1 << CAP_PERFMON) | (1 << CAP_SYS_PTRACE);
        assert!(missing_privileges(fine).is_empty());
    }
}
