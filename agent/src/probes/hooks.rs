//! The socket hook sets: which kernel events the socket programs hang on. Each set makes
//! the same records (the kernel programs share everything below the hooks), so nothing
//! above `events` can tell which one ran. The set is chosen before anything is loaded,
//! cheapest first among those this kernel has, or forced with `--socket-hooks`:
//! - `socket-btf` / `socket-raw`: the socket-layer tracepoints `sock:sock_recv_length`
//!   (Linux 6.5) and `tcp:tcp_sendmsg_locked` (~6.16: Debian's 6.12 lacks it), as BTF or raw
//!   tracepoints. They fire only for socket I/O, and are a stable interface.
//! - `socket-fentry`: fexit on `tcp_recvmsg` and fentry on `tcp_sendmsg` (BPF trampolines,
//!   Linux 5.5; every supported kernel that has them: one built without ftrace refuses
//!   tracing programs). They too fire only for TCP I/O; a trampoline costs a little
//!   more than a tracepoint, and a function's arguments can change (tcp_recvmsg's did in
//!   5.19 and again in 6.18: the program is chosen by its parameters in the kernel's BTF).
//! - `syscalls`: the data syscalls' own tracepoints (`syscalls:sys_enter_read`, ...), which
//!   every kernel has: they fire for every read and write of every process, and the program
//!   follows the file descriptor to its socket.
//!
//! No kprobe set: on amd64 from 5.10 with BTF, wherever kprobes can be attached, BPF
//! trampolines work too (both need the kernel's probing machinery and the same privileges),
//! and a kprobe's trap costs more than a trampoline's call.
//!
//! Every set ends sockets at `sock:inet_sock_set_state` (Linux 4.16).
use std::time::{Duration, Instant};

use aya::{
    Btf, Ebpf,
    programs::{BtfTracePoint, FEntry, FExit, RawTracePoint, TracePoint},
};

use super::{ProbeError, features, program};

/// `--socket-hooks`: which set to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SocketHooks {
    /// The cheapest set this kernel has.
    Auto,
    /// Socket-layer tracepoints as BTF tracepoints (tp_btf).
    #[value(name = "socket-btf", alias = "btf")]
    SocketBtf,
    /// Socket-layer tracepoints as raw tracepoints.
    #[value(name = "socket-raw", alias = "raw")]
    SocketRaw,
    /// fentry/fexit programs on TCP's send and receive functions.
    #[value(name = "socket-fentry", alias = "fentry")]
    SocketFentry,
    /// The data syscalls' tracepoints (every kernel).
    Syscalls,
}

/// A hook set the programs can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookSet {
    SocketBtf,
    SocketRaw,
    SocketFentry,
    Syscalls,
}

impl HookSet {
    /// Cheapest first (`auto` takes the first this kernel has).
    pub const ALL: [HookSet; 4] = [HookSet::SocketBtf, HookSet::SocketRaw, HookSet::SocketFentry, HookSet::Syscalls];

    pub fn name(self) -> &'static str {
        match self {
            HookSet::SocketBtf => "socket-btf",
            HookSet::SocketRaw => "socket-raw",
            HookSet::SocketFentry => "socket-fentry",
            HookSet::Syscalls => "syscalls",
        }
    }

    fn forced(want: SocketHooks) -> Option<HookSet> {
        match want {
            SocketHooks::Auto => None,
            SocketHooks::SocketBtf => Some(HookSet::SocketBtf),
            SocketHooks::SocketRaw => Some(HookSet::SocketRaw),
            SocketHooks::SocketFentry => Some(HookSet::SocketFentry),
            SocketHooks::Syscalls => Some(HookSet::Syscalls),
        }
    }

    /// Whether this kernel has what the set needs, tried without loading zerotrace's
    /// programs; Err says what is missing.
    pub fn available(self) -> Result<(), String> {
        match self {
            HookSet::SocketBtf => {
                socket_tracepoints()?;
                features::btf_tracepoint("sock_recv_length").map_err(|e| format!("BTF tracepoints: {e}"))
            }
            HookSet::SocketRaw => socket_tracepoints(),
            HookSet::SocketFentry => {
                recv_program()?;
                send_function()?;
                features::fentry_on("tcp_sendmsg").map_err(|e| format!("fentry: {e}"))?;
                close_tracepoint()
            }
            HookSet::Syscalls => {
                for name in SYSCALLS_ENTER.iter().chain(SYSCALLS_ENTER4).chain(SYSCALLS_EXIT) {
                    features::tracepoint_format("syscalls", name).map_err(|_| format!("tracepoint syscalls:{name} missing (CONFIG_FTRACE_SYSCALLS)"))?;
                }
                syscall_record_layout()?;
                close_tracepoint()
            }
        }
    }

    /// The minimum kernel of the set, for messages.
    pub fn minimum(self) -> &'static str {
        match self {
            HookSet::SocketBtf | HookSet::SocketRaw => "Linux 6.16 (sock:sock_recv_length 6.5, tcp:tcp_sendmsg_locked later)",
            HookSet::SocketFentry | HookSet::Syscalls => "Linux 5.10",
        }
    }
}

/// The set to use: the one forced, if this kernel has it, else the cheapest it has.
pub fn choose(want: SocketHooks) -> Result<HookSet, String> {
    if let Some(set) = HookSet::forced(want) {
        return set.available().map(|()| set).map_err(|why| format!("--socket-hooks {}: {why} (needs {})", set.name(), set.minimum()));
    }
    let mut gaps = Vec::new();
    for set in HookSet::ALL {
        match set.available() {
            Ok(()) => return Ok(set),
            Err(why) => gaps.push(format!("{}: {why}", set.name())),
        }
    }
    Err(format!("no socket hook set works on this kernel ({}); zerotrace needs Linux 5.10 or newer", gaps.join("; ")))
}

/// The socket-layer tracepoints (the close one too).
fn socket_tracepoints() -> Result<(), String> {
    for (cat, name) in [("sock", "sock_recv_length"), ("tcp", "tcp_sendmsg_locked")] {
        if !features::tracepoint_exists(cat, name) {
            return Err(format!("tracepoint {cat}:{name} missing"));
        }
    }
    close_tracepoint()
}

/// The fexit program for this kernel's `tcp_recvmsg`, by its parameters in the kernel's
/// BTF: `(sk, msg, len, nonblock, flags, addr_len)` before Linux 5.19, then without
/// `nonblock`, and without `addr_len` in recent kernels (6.18 has 4 parameters).
pub fn recv_program() -> Result<&'static str, String> {
    let btf = super::btf::kernel().map_err(|e| format!("kernel BTF: {e}"))?;
    let (_, params) = btf.func("tcp_recvmsg").ok_or("tcp_recvmsg not in the kernel's BTF")?;
    let names: Vec<&str> = params.iter().map(String::as_str).collect();
    match names[..] {
        ["sk", "msg", "len", "flags"] => Ok("tcp_recvmsg4_fexit"),
        ["sk", "msg", "len", "flags", "addr_len"] => Ok("tcp_recvmsg5_fexit"),
        ["sk", "msg", "len", "nonblock", "flags", "addr_len"] => Ok("tcp_recvmsg6_fexit"),
        _ => Err(format!("tcp_recvmsg({}) is not a signature zerotrace knows", names.join(", "))),
    }
}

fn send_function() -> Result<(), String> {
    let btf = super::btf::kernel().map_err(|e| format!("kernel BTF: {e}"))?;
    let (_, params) = btf.func("tcp_sendmsg").ok_or("tcp_sendmsg not in the kernel's BTF")?;
    if params.len() == 3 && params[0] == "sk" && params[1] == "msg" {
        Ok(())
    } else {
        Err(format!("tcp_sendmsg({}) is not a signature zerotrace knows", params.join(", ")))
    }
}

fn close_tracepoint() -> Result<(), String> {
    if features::tracepoint_exists("sock", "inet_sock_set_state") {
        Ok(())
    } else {
        Err("tracepoint sock:inet_sock_set_state missing (Linux 4.16+ has it)".to_owned())
    }
}

/// Syscalls whose entries the syscall set hooks (the program keeps sends at their entry and
/// the socket and buffer of receives for their exit).
const SYSCALLS_ENTER: &[&str] =
    &["sys_enter_read", "sys_enter_readv", "sys_enter_recvmsg", "sys_enter_write", "sys_enter_sendto", "sys_enter_writev", "sys_enter_sendmsg"];
/// recvfrom's entry has a program of its own, which reads a fourth argument (the flags).
const SYSCALLS_ENTER4: &[&str] = &["sys_enter_recvfrom"];
const SYSCALLS_EXIT: &[&str] = &["sys_exit_read", "sys_exit_recvfrom", "sys_exit_readv", "sys_exit_recvmsg"];

/// The kernel programs read the syscall number at offset 8 of a syscall tracepoint's record
/// and the arguments (or the return value) from offset 16: checked here against tracefs.
fn syscall_record_layout() -> Result<(), String> {
    let enter = features::tracepoint_format("syscalls", "sys_enter_read").map_err(|e| e.to_string())?;
    let exit = features::tracepoint_format("syscalls", "sys_exit_read").map_err(|e| e.to_string())?;
    let ok = field_offset(&enter, "__syscall_nr") == Some(8)
        && field_offset(&enter, "fd") == Some(16)
        && field_offset(&exit, "__syscall_nr") == Some(8)
        && field_offset(&exit, "ret") == Some(16);
    if ok { Ok(()) } else { Err("the syscall tracepoints' record layout is not the one zerotrace knows".into()) }
}

/// The offset of field `name` in a tracepoint's `format` file.
fn field_offset(format: &str, name: &str) -> Option<u32> {
    format.lines().find_map(|l| {
        let decl = l.trim().strip_prefix("field:")?.split(';').next()?;
        if decl.rsplit([' ', '*']).next()? != name {
            return None;
        }
        l.split(';').find_map(|f| f.trim().strip_prefix("offset:")?.parse().ok())
    })
}

/// Loads and attaches the programs of `set`. `inject`: the receiving programs' twins that
/// read incoming traceparents (`_inject`, which need bpf_loop).
/// `run_twins`: the socket-btf receive and send programs' twins too, attached after them
/// (see [`run_twins`]).
pub fn attach(ebpf: &mut Ebpf, btf: Option<&Btf>, set: HookSet, inject: bool, run_twins: bool) -> Result<Vec<String>, ProbeError> {
    let twin = if inject { "_inject" } else { "" };
    let mut names = Vec::new();
    match set {
        HookSet::SocketBtf => {
            let btf = kernel_btf(btf)?;
            names.push(attach_btf(ebpf, btf, &format!("sock_recv_length_btf{twin}"), "sock_recv_length")?);
            for name in ["tcp_sendmsg_locked", "inet_sock_set_state"] {
                names.push(attach_btf(ebpf, btf, &format!("{name}_btf"), name)?);
            }
            if run_twins {
                // The twins run their program by a tail call (kernel crate: TWIN_RECV,
                // TWIN_SEND), whose entry lives as long as the map's descriptor, which `ebpf`
                // keeps.
                for (map, name) in [("TWIN_RECV", format!("sock_recv_length_btf{twin}")), ("TWIN_SEND", "tcp_sendmsg_locked_btf".to_owned())] {
                    let prog: &mut BtfTracePoint = program(ebpf, &name)?;
                    let fd = prog.fd().and_then(|fd| fd.try_clone().map_err(Into::into)).map_err(|source| ProbeError::program(name.clone(), source))?;
                    let map_ref = ebpf.map_mut(map).ok_or_else(|| ProbeError::Missing(format!("map {map}")))?;
                    let mut target: aya::maps::ProgramArray<_> =
                        map_ref.try_into().map_err(|source| ProbeError::Map { name: "TWIN_RECV/TWIN_SEND", source })?;
                    target.set(0, &fd, 0).map_err(|source| ProbeError::Map { name: "TWIN_RECV/TWIN_SEND", source })?;
                }
                names.push(attach_btf(ebpf, btf, "sock_recv_length_btf_twin", "sock_recv_length")?);
                names.push(attach_btf(ebpf, btf, "tcp_sendmsg_locked_btf_twin", "tcp_sendmsg_locked")?);
            }
        }
        HookSet::SocketRaw => {
            names.push(attach_raw(ebpf, &format!("sock_recv_length{twin}"), "sock_recv_length")?);
            for name in ["tcp_sendmsg_locked", "inet_sock_set_state"] {
                names.push(attach_raw(ebpf, name, name)?);
            }
        }
        HookSet::SocketFentry => {
            let btf = kernel_btf(btf)?;
            names.push(attach_close(ebpf, Some(btf))?);
            let recv = format!("{}{twin}", recv_program().map_err(ProbeError::Missing)?);
            let prog: &mut FExit = program(ebpf, &recv)?;
            let started = Instant::now();
            prog.load("tcp_recvmsg", btf).map_err(|source| ProbeError::program(recv.clone(), source))?;
            let loaded = started.elapsed();
            prog.attach().map_err(|source| ProbeError::program("fexit/tcp_recvmsg", source))?;
            timed(&recv, started, loaded);
            names.push(recv);
            let prog: &mut FEntry = program(ebpf, "tcp_sendmsg_fentry")?;
            let started = Instant::now();
            prog.load("tcp_sendmsg", btf).map_err(|source| ProbeError::program("tcp_sendmsg_fentry", source))?;
            let loaded = started.elapsed();
            prog.attach().map_err(|source| ProbeError::program("fentry/tcp_sendmsg", source))?;
            timed("tcp_sendmsg_fentry", started, loaded);
            names.push("tcp_sendmsg_fentry".into());
        }
        HookSet::Syscalls => {
            names.push(attach_close(ebpf, btf)?);
            let exit = format!("sys_exit_data{twin}");
            for (prog_name, tracepoints) in [("sys_enter_data", SYSCALLS_ENTER), ("sys_enter_recvfrom", SYSCALLS_ENTER4), (exit.as_str(), SYSCALLS_EXIT)] {
                let prog: &mut TracePoint = program(ebpf, prog_name)?;
                let started = Instant::now();
                prog.load().map_err(|source| ProbeError::program(prog_name, source))?;
                let loaded = started.elapsed();
                for name in tracepoints {
                    prog.attach("syscalls", name).map_err(|source| ProbeError::program(format!("tracepoint syscalls:{name}"), source))?;
                }
                timed(prog_name, started, loaded);
                names.push(prog_name.to_owned());
            }
        }
    }
    Ok(names)
}

/// `inet_sock_set_state` for the syscall set: a BTF tracepoint when this kernel allows
/// them, else a raw one.
fn attach_close(ebpf: &mut Ebpf, btf: Option<&Btf>) -> Result<String, ProbeError> {
    const NAME: &str = "inet_sock_set_state";
    if features::btf_tracepoint(NAME).is_ok() { attach_btf(ebpf, kernel_btf(btf)?, &format!("{NAME}_btf"), NAME) } else { attach_raw(ebpf, NAME, NAME) }
}

/// The tracepoint a BTF tracepoint program hangs on: its name without `_btf`/`_inject`/`_twin`.
pub fn btf_target(program: &str) -> &str {
    program.trim_end_matches("_twin").trim_end_matches("_inject").trim_end_matches("_btf")
}

/// Whether programs get twins here: Linux 7.0 runs tracepoint programs preemptible, and
/// the kernel skips a program for every other task on a CPU while it is preempted there
/// (at the latest where it enables preemption again, after its work). A twin, attached
/// after its program, handles the events whose thread the program did not mark (kernel
/// crate: `RUN_MARK`, `mark_run`, `twin_runs`). The socket-btf set's receive and send programs and the
/// exec watch have twins.
/// `ZEROTRACE_RUN_TWINS=on` gives them on any kernel: the e2e suite checks on this machine
/// that twins change nothing where the kernel skips nothing.
pub fn run_twins() -> bool {
    std::env::var("ZEROTRACE_RUN_TWINS").is_ok_and(|v| v == "on") || features::kernel_version().is_some_and(|v| v >= (7, 0))
}

/// The kernel function an fentry/fexit program hangs on, when it can be loaded on this
/// kernel (`doctor --programs`); Err: why not.
pub fn fentry_target(program: &str) -> Result<&'static str, String> {
    let base = program.trim_end_matches("_inject");
    let function = if base == "tcp_sendmsg_fentry" { "tcp_sendmsg" } else { "tcp_recvmsg" };
    if function == "tcp_recvmsg" && recv_program()? != base {
        return Err("for another tcp_recvmsg signature than this kernel's".into());
    }
    features::fentry_on(function).map_err(|e| format!("fentry: {e}"))?;
    Ok(function)
}

fn kernel_btf(btf: Option<&Btf>) -> Result<&Btf, ProbeError> {
    btf.ok_or_else(|| ProbeError::Missing(format!("kernel BTF at {} (aya could not parse it)", super::btf::VMLINUX_BTF)))
}

fn attach_btf(ebpf: &mut Ebpf, btf: &Btf, prog_name: &str, tracepoint: &str) -> Result<String, ProbeError> {
    let prog: &mut BtfTracePoint = program(ebpf, prog_name)?;
    let started = Instant::now();
    prog.load(tracepoint, btf).map_err(|source| ProbeError::program(prog_name.to_owned(), source))?;
    let loaded = started.elapsed();
    prog.attach().map_err(|source| ProbeError::program(format!("tp_btf:{tracepoint}"), source))?;
    timed(prog_name, started, loaded);
    Ok(prog_name.to_owned())
}

fn attach_raw(ebpf: &mut Ebpf, prog_name: &str, tracepoint: &str) -> Result<String, ProbeError> {
    let prog: &mut RawTracePoint = program(ebpf, prog_name)?;
    let started = Instant::now();
    prog.load().map_err(|source| ProbeError::program(prog_name.to_owned(), source))?;
    let loaded = started.elapsed();
    prog.attach(tracepoint).map_err(|source| ProbeError::program(format!("raw tracepoint {tracepoint}"), source))?;
    timed(prog_name, started, loaded);
    Ok(prog_name.to_owned())
}

/// The start-up cost of one socket program (debug level): verifying it, then attaching it.
fn timed(program: &str, started: Instant, loaded: Duration) {
    let attach = started.elapsed().saturating_sub(loaded);
    tracing::debug!(program, verify_ms = loaded.as_millis() as u64, attach_ms = attach.as_millis() as u64, "start-up: socket program");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_tracepoint_field_offsets() {
        let enter = "name: sys_enter_read\nID: 1\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\n\tfield:int __syscall_nr;\toffset:8;\tsize:4;\tsigned:1;\n\tfield:unsigned int fd;\toffset:16;\tsize:8;\tsigned:0;\n\tfield:char * buf;\toffset:24;\tsize:8;\tsigned:0;\n";
        assert_eq!(field_offset(enter, "__syscall_nr"), Some(8));
        assert_eq!(field_offset(enter, "fd"), Some(16));
        assert_eq!(field_offset(enter, "buf"), Some(24));
        assert_eq!(field_offset(enter, "count"), None);
    }
}
