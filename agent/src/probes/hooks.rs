//! The socket hook sets: which kernel events the socket programs hang on. Each set makes
//! the same records (the kernel programs share everything below the hooks), so nothing
//! above `events` can tell which one ran. The set is chosen before anything is loaded,
//! cheapest first among those this kernel has, or forced with `--socket-hooks`:
//! - `socket-btf` / `socket-raw`: the socket-layer tracepoints `sock:sock_recv_length`
//!   (Linux 6.5) and `tcp:tcp_sendmsg_locked` (~6.16: Debian's 6.12 lacks it), as BTF or raw
//!   tracepoints. They fire only for socket I/O.
//! - `syscalls`: the data syscalls' own tracepoints (`syscalls:sys_enter_read`, ...), which
//!   every kernel has: they fire for every read and write of every process, and the program
//!   follows the file descriptor to its socket.
//!
//! Every set ends sockets at `sock:inet_sock_set_state` (Linux 4.16).
use aya::{
    Btf, Ebpf,
    programs::{BtfTracePoint, RawTracePoint, TracePoint},
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
    /// The data syscalls' tracepoints (every kernel).
    Syscalls,
}

/// A hook set the programs can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookSet {
    SocketBtf,
    SocketRaw,
    Syscalls,
}

impl HookSet {
    /// Cheapest first (`auto` takes the first this kernel has).
    pub const ALL: [HookSet; 3] = [HookSet::SocketBtf, HookSet::SocketRaw, HookSet::Syscalls];

    pub fn name(self) -> &'static str {
        match self {
            HookSet::SocketBtf => "socket-btf",
            HookSet::SocketRaw => "socket-raw",
            HookSet::Syscalls => "syscalls",
        }
    }

    fn forced(want: SocketHooks) -> Option<HookSet> {
        match want {
            SocketHooks::Auto => None,
            SocketHooks::SocketBtf => Some(HookSet::SocketBtf),
            SocketHooks::SocketRaw => Some(HookSet::SocketRaw),
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
            HookSet::Syscalls => "Linux 5.10",
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
pub fn attach(ebpf: &mut Ebpf, btf: Option<&Btf>, set: HookSet, inject: bool) -> Result<(), ProbeError> {
    let twin = if inject { "_inject" } else { "" };
    match set {
        HookSet::SocketBtf => {
            let btf = kernel_btf(btf)?;
            attach_btf(ebpf, btf, &format!("sock_recv_length_btf{twin}"), "sock_recv_length")?;
            for name in ["tcp_sendmsg_locked", "inet_sock_set_state"] {
                attach_btf(ebpf, btf, &format!("{name}_btf"), name)?;
            }
        }
        HookSet::SocketRaw => {
            attach_raw(ebpf, &format!("sock_recv_length{twin}"), "sock_recv_length")?;
            for name in ["tcp_sendmsg_locked", "inet_sock_set_state"] {
                attach_raw(ebpf, name, name)?;
            }
        }
        HookSet::Syscalls => {
            attach_close(ebpf, btf)?;
            let exit = format!("sys_exit_data{twin}");
            for (prog_name, names) in [("sys_enter_data", SYSCALLS_ENTER), ("sys_enter_recvfrom", SYSCALLS_ENTER4), (exit.as_str(), SYSCALLS_EXIT)] {
                let prog: &mut TracePoint = program(ebpf, prog_name)?;
                prog.load().map_err(|source| ProbeError::program(prog_name, source))?;
                for name in names {
                    prog.attach("syscalls", name).map_err(|source| ProbeError::program(format!("tracepoint syscalls:{name}"), source))?;
                }
            }
        }
    }
    Ok(())
}

/// `inet_sock_set_state` for the syscall set: a BTF tracepoint when this kernel allows
/// them, else a raw one.
fn attach_close(ebpf: &mut Ebpf, btf: Option<&Btf>) -> Result<(), ProbeError> {
    const NAME: &str = "inet_sock_set_state";
    if features::btf_tracepoint(NAME).is_ok() { attach_btf(ebpf, kernel_btf(btf)?, &format!("{NAME}_btf"), NAME) } else { attach_raw(ebpf, NAME, NAME) }
}

/// The tracepoint a BTF tracepoint program hangs on: its name without `_btf`/`_inject`.
pub fn btf_target(program: &str) -> &str {
    program.trim_end_matches("_inject").trim_end_matches("_btf")
}

fn kernel_btf(btf: Option<&Btf>) -> Result<&Btf, ProbeError> {
    btf.ok_or_else(|| ProbeError::Missing(format!("kernel BTF at {} (aya could not parse it)", super::btf::VMLINUX_BTF)))
}

fn attach_btf(ebpf: &mut Ebpf, btf: &Btf, prog_name: &str, tracepoint: &str) -> Result<(), ProbeError> {
    let prog: &mut BtfTracePoint = program(ebpf, prog_name)?;
    prog.load(tracepoint, btf).map_err(|source| ProbeError::program(prog_name.to_owned(), source))?;
    prog.attach().map_err(|source| ProbeError::program(format!("tp_btf:{tracepoint}"), source))?;
    Ok(())
}

fn attach_raw(ebpf: &mut Ebpf, prog_name: &str, tracepoint: &str) -> Result<(), ProbeError> {
    let prog: &mut RawTracePoint = program(ebpf, prog_name)?;
    prog.load().map_err(|source| ProbeError::program(prog_name.to_owned(), source))?;
    prog.attach(tracepoint).map_err(|source| ProbeError::program(format!("raw tracepoint {tracepoint}"), source))?;
    Ok(())
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
