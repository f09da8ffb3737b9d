//! Which sockets of a traced process are followed (CONNS). A socket is known by its kernel
//! `struct sock` and becomes tracked the first time the process does I/O on it (or when Go
//! starts serving it), so sockets that existed before zerotrace attached are followed too.
//! Its role comes from the ports the process listens on (LISTEN, kept by the agent). It
//! stops being tracked when TCP moves it to CLOSE (`io::on_close`); no state is made for a
//! socket past CLOSE, and state found with another socket's inode (an earlier socket at
//! the same kernel address) is replaced, so a new socket never inherits an old one's role.
//! Also: which processes
//! are selected at all (the SELECTED bit every hook tests first), and the way from a file
//! descriptor to its socket.
use aya_ebpf::helpers::{bpf_get_current_task, bpf_get_smp_processor_id};
use zerotrace_common::{ConnCloseEvent, ConnKey, ConnOpenEvent, ConnRole, ConnState, Counter, EventKind, FlowKey, ListenKey, SockAddrs, phase};

use crate::{
    maps::{CONNS, EVENTS, LISTEN, SCRATCH, SELECTED, kernel},
    util::{count, header, now, read_kernel, read_user, target, wake_flags},
};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// Whether process `pid` is selected: one bit per pid in an array (an inlined lookup), so
/// that the cost for every other process on the machine is a few instructions.
#[inline(always)]
pub fn selected(pid: u32) -> bool {
    match SELECTED.get(pid >> 6) {
        Some(word) => word & (1u64 << (pid & 63)) != 0,
        None => false,
    }
}

/// Addresses of a kernel socket (struct sock starts with struct sock_common), written into
/// `a` (in per-CPU scratch: the BPF stack has no room for it); false for anything but
/// IPv4/IPv6.
#[inline(always)]
pub fn sk_addrs(sk: u64, a: &mut SockAddrs) -> bool {
    let k = kernel();
    let Some(family) = read_kernel::<u16>(sk + k.skc_family as u64) else { return false };
    if family != AF_INET && family != AF_INET6 {
        return false;
    }
    a.family = family;
    a._pad = 0;
    a.local_port = read_kernel::<u16>(sk + k.skc_num as u64).unwrap_or(0);
    a.peer_port = u16::from_be(read_kernel::<u16>(sk + k.skc_dport as u64).unwrap_or(0));
    if family == AF_INET {
        let d = read_kernel::<[u8; 4]>(sk + k.skc_daddr as u64).unwrap_or([0; 4]);
        let s = read_kernel::<[u8; 4]>(sk + k.skc_rcv_saddr as u64).unwrap_or([0; 4]);
        a.peer_addr = v4_mapped(d);
        a.local_addr = v4_mapped(s);
    } else {
        a.peer_addr = read_kernel::<[u8; 16]>(sk + k.skc_v6_daddr as u64).unwrap_or([0; 16]);
        a.local_addr = read_kernel::<[u8; 16]>(sk + k.skc_v6_rcv_saddr as u64).unwrap_or([0; 16]);
    }
    true
}

/// Where conn_for assembles a new socket's state and addresses: per-CPU scratch space.
const ADDRS_AT: usize = 512;

/// The kernel socket behind file descriptor `fd` of the current task:
/// task->files->fdt->fd[fd]->private_data (struct socket)->sk.
#[inline(always)]
pub fn fd_to_sk(fd: u32) -> Option<u64> {
    let k = kernel();
    // SAFETY: only used as an address to read from.
    let task = unsafe { bpf_get_current_task() };
    let files = read_kernel::<u64>(task + k.task_files as u64)?;
    let fdt = read_kernel::<u64>(files + k.files_fdt as u64)?;
    let fds = read_kernel::<u64>(fdt + k.fdtable_fd as u64)?;
    let file = read_kernel::<u64>(fds + 8 * fd as u64)?;
    let sock = read_kernel::<u64>(file + k.file_private_data as u64)?;
    let sk = read_kernel::<u64>(sock + k.socket_sk as u64)?;
    (sk != 0).then_some(sk)
}

/// The kernel socket behind the Go `net.Conn` interface value stored at `at` (a
/// *net.TCPConn, or a *tls.Conn wrapping one) of the current task.
#[inline(always)]
pub fn go_iface_sk(go: &zerotrace_common::GoOffsets, at: u64) -> Option<u64> {
    let iface = read_user::<[u64; 2]>(at)?;
    let fd = crate::util::go_conn_fd(go, iface[0], iface[1]);
    if fd < 0 {
        return None;
    }
    fd_to_sk(fd as u32)
}

/// Inode number of the socket file of `sk` (socket_alloc = struct socket + its inode).
#[inline(always)]
fn sk_inode(sk: u64) -> u64 {
    let k = kernel();
    let Some(sock) = read_kernel::<u64>(sk + k.sock_sk_socket as u64) else { return 0 };
    if sock == 0 {
        return 0;
    }
    read_kernel::<u64>(sock + k.socket_alloc_inode as u64 + k.inode_ino as u64).unwrap_or(0)
}

/// The flow of a socket from the client's side: a server's peer is the client.
/// Written in place: the BPF stack has no room for another copy.
#[inline(always)]
fn set_flow(f: &mut FlowKey, a: &SockAddrs, role: ConnRole) {
    if role == ConnRole::Server {
        f.client_addr = a.peer_addr;
        f.server_addr = a.local_addr;
        f.client_port = a.peer_port;
        f.server_port = a.local_port;
    } else {
        f.client_addr = a.local_addr;
        f.server_addr = a.peer_addr;
        f.client_port = a.local_port;
        f.server_port = a.peer_port;
    }
    f._pad = 0;
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

#[inline(always)]
fn listens(pid: u32, port: u16) -> bool {
    LISTEN.get_ptr(&ListenKey { pid, port, _pad: 0 }).is_some()
}

#[inline(always)]
fn announce(conn: &ConnState, sk: u64, addrs: &SockAddrs, tid: u32) {
    let Some(mut ev) = EVENTS.reserve::<ConnOpenEvent>(0) else {
        count(Counter::EventsDroppedRingFull);
        return;
    };
    let e = ev.as_mut_ptr();
    // SAFETY: e points at a reserved record of the right size; every field is written.
    unsafe {
        (*e).hdr = header(EventKind::ConnOpen, core::mem::size_of::<ConnOpenEvent>(), conn.pid, tid, now());
        (*e).conn_id = conn.id;
        (*e).sk = sk;
        (*e).role = conn.role;
        (*e)._pad = [0; 7];
        (*e).addrs = *addrs;
    }
    ev.submit(wake_flags());
}

/// TCP states (include/net/tcp_states.h).
const TCP_CLOSE: u8 = 7;
const TCP_LISTEN: u8 = 10;

/// Whether socket `sk` can still carry a connection: not yet in CLOSE (nor a listener).
/// TCP's CLOSE is where a tracked socket's state is removed (`io::on_close`); state made
/// for a socket after it (a read that returns the reset, a send that fails) would never be
/// removed, and the next socket the kernel allocates at the same address would inherit it.
/// An unreadable state counts as open.
#[inline(always)]
fn open_socket(sk: u64) -> bool {
    let state = read_kernel::<u8>(sk + kernel().skc_state as u64).unwrap_or(0);
    state != TCP_CLOSE && state != TCP_LISTEN
}

/// The record that tells the agent a connection it was told about has ended.
#[inline(always)]
pub fn announce_close(conn: &ConnState, sk: u64, ts: u64) {
    if conn.role != ConnRole::Server as u8 && conn.native == 0 {
        // Go's client sockets are tracked quietly: the agent never heard of them.
        return;
    }
    let ev = ConnCloseEvent { hdr: header(EventKind::ConnClose, core::mem::size_of::<ConnCloseEvent>(), conn.pid, 0, ts), conn_id: conn.id, sk };
    if EVENTS.output::<ConnCloseEvent>(&ev, wake_flags()).is_err() {
        count(Counter::EventsDroppedRingFull);
    }
}

/// The state of socket `sk` of the current (selected) process, created at first sight.
/// `server`: the caller knows the process serves this socket (Go's conn.serve). Server
/// sockets, and every socket of a process that is not Go, are announced to the agent;
/// others are tracked quietly.
#[inline(always)]
pub fn conn_for(pid_tgid: u64, sk: u64, server: bool) -> Option<*mut ConnState> {
    let key = ConnKey { sk };
    let pid = (pid_tgid >> 32) as u32;
    let ino = sk_inode(sk);
    // BPF_NOEXIST: another CPU may be creating the same state right now.
    let mut flags = 1;
    if let Some(c) = CONNS.get_ptr_mut(&key) {
        // SAFETY: map value pointer, valid for this program run.
        let conn = unsafe { &mut *c };
        if ino != 0 && conn.ino != ino {
            // The state of an earlier socket the kernel had at this address, whose CLOSE
            // came before the state was made (or was never seen): a new connection, made
            // new below. Had it been kept, its role, addresses and phase would be the old
            // socket's, and the new connection's requests would all be lost.
            count(Counter::ConnectionsStaleReplaced);
            announce_close(conn, sk, now());
            flags = 0;
        } else {
            if conn.role != ConnRole::Server as u8 && (server || listens(pid, conn.local_port)) {
                // A listener the agent learnt about later, or Go serving it: it is a server
                // socket, and what was made of it as a client (a response taken for a
                // request) is undone.
                conn.role = ConnRole::Server as u8;
                conn.phase = phase::IDLE;
                conn.seq = 0;
                conn.other = 0;
                conn.h2 = 0;
                conn.captured = 0;
                let scratch = SCRATCH.get_ptr_mut(0)? as *mut u8;
                // SAFETY: the scratch value has room for SockAddrs at ADDRS_AT; only this CPU uses it.
                let addrs = unsafe { &mut *(scratch.add(ADDRS_AT) as *mut SockAddrs) };
                if sk_addrs(sk, addrs) {
                    set_flow(&mut conn.flow, addrs, ConnRole::Server);
                    announce(conn, sk, addrs, pid_tgid as u32);
                }
            }
            return Some(c);
        }
    }
    if !open_socket(sk) {
        return None;
    }
    // The new state is assembled in per-CPU scratch space: it is too big for the BPF stack.
    let raw = SCRATCH.get_ptr_mut(0)? as *mut u8;
    let scratch = raw as *mut ConnState;
    // SAFETY: the scratch value has room for SockAddrs at ADDRS_AT; only this CPU uses it.
    let addrs = unsafe { &mut *(raw.add(ADDRS_AT) as *mut SockAddrs) };
    if !sk_addrs(sk, addrs) {
        return None;
    }
    let role = if server || listens(pid, addrs.local_port) { ConnRole::Server } else { ConnRole::Client };
    // A native process (not Go): its client requests are followed at the socket (native.rs).
    let native = match target(pid) {
        Some(cfg) => cfg.flags & zerotrace_common::target_flags::GO == 0,
        None => false,
    };
    // SAFETY: the scratch value is larger than a ConnState and only used by this CPU.
    unsafe {
        core::ptr::write_bytes(scratch, 0, 1);
        (*scratch).id = new_conn_id();
        (*scratch).role = role as u8;
        (*scratch).phase = phase::IDLE;
        (*scratch).pid = pid;
        (*scratch).native = native as u8;
        (*scratch).local_port = addrs.local_port;
        (*scratch).ino = ino;
        set_flow(&mut (*scratch).flow, addrs, role);
    }
    // SAFETY: fully initialised above.
    if let Err(e) = CONNS.insert(&key, unsafe { &*scratch }, flags) {
        if e != -17 {
            count(Counter::ConnectionsDroppedMapFull);
            return None;
        }
        return CONNS.get_ptr_mut(&key);
    }
    if !open_socket(sk) {
        // TCP closed the socket while its state was made (on another CPU: a reset), after
        // `io::on_close` looked for it: nothing would remove it.
        let _ = CONNS.remove(&key);
        return None;
    }
    let c = CONNS.get_ptr_mut(&key)?;
    if role == ConnRole::Server || native {
        // SAFETY: map value pointer, valid for this program run.
        announce(unsafe { &*c }, sk, addrs, pid_tgid as u32);
    }
    Some(c)
}
