//! Which sockets of a traced process are followed: accepted ones (server side) become
//! entries of CONNS with their addresses read from the kernel's socket; close ends them.
use aya_ebpf::helpers::{bpf_get_current_task, bpf_get_smp_processor_id};
use zerotrace_common::{
    ConnCloseEvent, ConnKey, ConnOpenEvent, ConnRole, ConnState, Counter, EventKind, SockAddrs, phase,
};

use crate::{
    http_server::finish_response,
    maps::{CONNS, EVENTS, SCRATCH, kernel},
    util::{count, header, now, read_kernel, wake_flags},
};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// Addresses of the socket behind `fd` of the current task:
/// task->files->fdt->fd[fd]->private_data (struct socket) ->sk (struct sock_common first).
#[inline(always)]
fn sock_addrs(fd: u32) -> Option<SockAddrs> {
    let k = kernel();
    // SAFETY: only used as an address to read from.
    let task = unsafe { bpf_get_current_task() };
    let files = read_kernel::<u64>(task + k.task_files as u64)?;
    let fdt = read_kernel::<u64>(files + k.files_fdt as u64)?;
    let fds = read_kernel::<u64>(fdt + k.fdtable_fd as u64)?;
    let file = read_kernel::<u64>(fds + 8 * fd as u64)?;
    let sock = read_kernel::<u64>(file + k.file_private_data as u64)?;
    let sk = read_kernel::<u64>(sock + k.socket_sk as u64)?;
    let family = read_kernel::<u16>(sk + k.skc_family as u64)?;
    let mut a = SockAddrs { family, ..SockAddrs::default() };
    a.local_port = read_kernel::<u16>(sk + k.skc_num as u64)?;
    a.peer_port = u16::from_be(read_kernel::<u16>(sk + k.skc_dport as u64)?);
    match family {
        AF_INET => {
            let d = read_kernel::<[u8; 4]>(sk + k.skc_daddr as u64)?;
            let s = read_kernel::<[u8; 4]>(sk + k.skc_rcv_saddr as u64)?;
            a.peer_addr = v4_mapped(d);
            a.local_addr = v4_mapped(s);
        }
        AF_INET6 => {
            a.peer_addr = read_kernel::<[u8; 16]>(sk + k.skc_v6_daddr as u64)?;
            a.local_addr = read_kernel::<[u8; 16]>(sk + k.skc_v6_rcv_saddr as u64)?;
        }
        _ => return None,
    }
    Some(a)
}

#[inline(always)]
fn v4_mapped(v4: [u8; 4]) -> [u8; 16] {
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3]]
}

/// A new id for a connection: monotonic time and CPU, unique for the agent's lifetime.
#[inline(always)]
fn new_conn_id() -> u64 {
    // SAFETY: helper without side effects.
    let cpu = unsafe { bpf_get_smp_processor_id() } as u64;
    (now() << 8) | (cpu & 0xff)
}

/// Starts tracking TCP socket `fd` of the current process (the caller checked TARGETS).
/// Returns false for non-TCP sockets and when CONNS is full.
#[inline(always)]
pub fn track_socket(pid_tgid: u64, fd: i32, role: ConnRole) -> bool {
    if fd < 0 {
        return false;
    }
    let Some(addrs) = sock_addrs(fd as u32) else {
        return false;
    };
    let id = new_conn_id();
    let key = ConnKey { pid: (pid_tgid >> 32) as u32, fd: fd as u32 };
    // The new state is assembled in per-CPU scratch space: it is too big for the BPF stack.
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    let state = scratch as *mut ConnState;
    // SAFETY: the scratch value is larger than a ConnState and only used by this CPU.
    unsafe {
        core::ptr::write_bytes(state, 0, 1);
        (*state).id = id;
        (*state).role = role as u8;
        (*state).phase = phase::IDLE;
    }
    // SAFETY: state was fully initialised above.
    if CONNS.insert(&key, unsafe { &*state }, 0).is_err() {
        count(Counter::ConnsFull);
        return false;
    }
    let Some(mut ev) = EVENTS.reserve::<ConnOpenEvent>(0) else {
        count(Counter::RingFull);
        return true;
    };
    let e = ev.as_mut_ptr();
    // SAFETY: e points at a reserved record of the right size; every field is written.
    unsafe {
        (*e).hdr = header(EventKind::ConnOpen, core::mem::size_of::<ConnOpenEvent>(), pid_tgid, now());
        (*e).conn_id = id;
        (*e).fd = fd;
        (*e).role = role as u8;
        (*e)._pad = [0; 3];
        (*e).addrs = addrs;
    }
    ev.submit(wake_flags());
    true
}

/// Exit of accept/accept4 in a selected process: `ret` is the new socket's fd.
#[inline(always)]
pub fn on_accept(pid_tgid: u64, ret: i64) {
    if ret >= 0 {
        track_socket(pid_tgid, ret as i32, ConnRole::Server);
    }
}

/// Entry of close(2) in a selected process: a tracked socket ends here.
#[inline(always)]
pub fn on_close(pid_tgid: u64, fd: u64) {
    let pid = (pid_tgid >> 32) as u32;
    let key = ConnKey { pid, fd: fd as u32 };
    let Some(conn) = CONNS.get_ptr_mut(&key) else {
        return;
    };
    // SAFETY: map value pointer, valid for this program run.
    let conn = unsafe { &mut *conn };
    let ts = now();
    finish_response(conn, pid_tgid, fd as i32, ts, 1);
    let ev = ConnCloseEvent {
        hdr: header(EventKind::ConnClose, core::mem::size_of::<ConnCloseEvent>(), pid_tgid, ts),
        conn_id: conn.id,
        fd: fd as i32,
        _pad: 0,
        bytes_in: conn.bytes_in,
        bytes_out: conn.bytes_out,
    };
    if EVENTS.output::<ConnCloseEvent>(&ev, wake_flags()).is_err() {
        count(Counter::RingFull);
    }
    let _ = CONNS.remove(&key);
}
