//! Listening TCP sockets from the kernel's sock_diag netlink interface, asked for by state:
//! unlike /proc/PID/net/tcp, which makes the kernel walk every socket of the namespace, this
//! visits only listeners, so the agent can refresh the listening ports of its targets often.
//! It answers for the agent's own network namespace.
use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_DONE: u16 = 3;
const NLMSG_ERROR: u16 = 2;
const TCP_LISTEN: u32 = 10;

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct NlMsgHdr {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct DiagSockId {
    sport: u16,
    dport: u16,
    src: [u32; 4],
    dst: [u32; 4],
    ifindex: u32,
    cookie: [u32; 2],
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct DiagReq {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: DiagSockId,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct DiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: DiagSockId,
    expires: u32,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
}

/// (socket inode, local port) of every listening TCP socket, IPv4 and IPv6.
pub fn listening() -> io::Result<Vec<(u64, u16)>> {
    let mut out = Vec::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        dump(family, &mut out)?;
    }
    Ok(out)
}

fn dump(family: u8, out: &mut Vec<(u64, u16)>) -> io::Result<()> {
    // SAFETY: plain socket(2); the result is checked and owned.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, NETLINK_SOCK_DIAG) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    #[repr(C)]
    struct Request {
        hdr: NlMsgHdr,
        req: DiagReq,
    }
    let req = Request {
        hdr: NlMsgHdr { len: size_of::<Request>() as u32, kind: SOCK_DIAG_BY_FAMILY, flags: NLM_F_REQUEST | NLM_F_DUMP, seq: 1, pid: 0 },
        req: DiagReq { family, protocol: libc::IPPROTO_TCP as u8, states: 1 << TCP_LISTEN, ..Default::default() },
    };
    // SAFETY: sending a fully initialised repr(C) struct of the stated size.
    let n = unsafe { libc::send(sock.as_raw_fd(), (&req as *const Request).cast(), size_of::<Request>(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: receiving into our own buffer of its length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut off = 0usize;
        let n = n as usize;
        while off + size_of::<NlMsgHdr>() <= n {
            // SAFETY: bounds checked above; the kernel writes whole messages.
            let hdr: NlMsgHdr = unsafe { std::ptr::read_unaligned(buf[off..].as_ptr().cast()) };
            let len = hdr.len as usize;
            if len < size_of::<NlMsgHdr>() || off + len > n {
                return Err(io::Error::other("malformed sock_diag reply"));
            }
            match hdr.kind {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => return Err(io::Error::other("sock_diag refused the request")),
                SOCK_DIAG_BY_FAMILY if len >= size_of::<NlMsgHdr>() + size_of::<DiagMsg>() => {
                    // SAFETY: length checked just above.
                    let m: DiagMsg = unsafe { std::ptr::read_unaligned(buf[off + size_of::<NlMsgHdr>()..].as_ptr().cast()) };
                    out.push((u64::from(m.inode), u16::from_be(m.id.sport)));
                }
                _ => {}
            }
            off += (len + 3) & !3;
        }
    }
}

/// Whether process `pid` shares the agent's network namespace (sock_diag sees its sockets).
pub fn same_netns(pid: u32) -> bool {
    let ns = |p: &str| std::fs::metadata(p).ok().map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    match (ns("/proc/self/ns/net"), ns(&format!("/proc/{pid}/ns/net"))) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sees_a_listener_of_this_process() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let all = listening().expect("sock_diag works (no privileges needed)");
        assert!(all.iter().any(|(_, p)| *p == port), "port {port} not in {all:?}");
        assert!(same_netns(std::process::id()));
    }
}
