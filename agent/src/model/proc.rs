//! Reading /proc: process existence, executable, load bias, and the TCP sockets a process
//! holds (to recover connections opened before zerotrace started).
use std::{
    collections::{HashMap, HashSet},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use crate::events::{Addrs, Endpoint};

pub fn exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Path of the process's executable as the process sees it (inside its mount namespace).
pub fn exe_link(pid: u32) -> io::Result<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/exe"))
}

/// A path through which the agent can open the process's executable, whatever mount
/// namespace it lives in.
pub fn exe_open_path(pid: u32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/exe"))
}

/// The environment the process was started with (what /proc/PID/environ shows).
pub fn environ(pid: u32) -> Vec<(String, String)> {
    let Ok(raw) = std::fs::read(format!("/proc/{pid}/environ")) else { return Vec::new() };
    raw.split(|&b| b == 0)
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            let (k, v) = kv.split_once('=')?;
            Some((k.to_owned(), v.to_owned()))
        })
        .collect()
}

/// Process name (comm).
/// One line of /proc/PID/maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    /// The permissions as written (`r-xp`).
    pub perms: [u8; 4],
    pub offset: u64,
    pub dev: u64,
    /// 0 for anonymous mappings.
    pub inode: u64,
    /// The file (with ` (deleted)` when it was), `[vdso]`-like names, or empty.
    pub path: String,
}

impl Mapping {
    pub fn readable(&self) -> bool {
        self.perms[0] == b'r'
    }
    pub fn writable(&self) -> bool {
        self.perms[1] == b'w'
    }
    pub fn executable(&self) -> bool {
        self.perms[2] == b'x'
    }
}

/// The mappings of process `pid`, in the kernel's (ascending address) order.
pub fn maps(pid: u32) -> io::Result<Vec<Mapping>> {
    Ok(std::fs::read_to_string(format!("/proc/{pid}/maps"))?.lines().filter_map(parse_maps_line).collect())
}

/// One maps line: `start-end perms offset major:minor inode   path` (the path may contain
/// spaces).
pub fn parse_maps_line(line: &str) -> Option<Mapping> {
    let mut rest = line;
    let mut field = || {
        let s = rest.trim_start();
        let end = s.find(' ').unwrap_or(s.len());
        rest = &s[end..];
        &s[..end]
    };
    let (range, perms, offset, dev, inode) = (field(), field(), field(), field(), field());
    let (start, end) = range.split_once('-')?;
    let (major, minor) = dev.split_once(':')?;
    Some(Mapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        perms: perms.as_bytes().try_into().ok()?,
        offset: u64::from_str_radix(offset, 16).ok()?,
        dev: libc::makedev(u32::from_str_radix(major, 16).ok()?, u32::from_str_radix(minor, 16).ok()?),
        inode: inode.parse().ok()?,
        path: rest.trim_start().to_string(),
    })
}

/// Whether `[addr, addr + len)` lies in a read-only, file-backed mapping of `pid` (e.g. the
/// executable's .rodata): bytes there cannot change, so reading them later is safe.
pub fn in_readonly_file_mapping(pid: u32, addr: u64, len: u64) -> bool {
    let Ok(maps) = maps(pid) else { return false };
    maps.iter().any(|m| m.readable() && !m.writable() && m.inode != 0 && addr >= m.start && addr.saturating_add(len) <= m.end)
}

/// A `kB` figure of this process's /proc/self/status (`RssAnon`, `RssFile`, ...), in KiB; 0
/// when it cannot be read.
pub fn own_status_kib(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(':')).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap_or(0)
}

pub fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).ok().map(|s| s.trim().to_owned())
}

/// Load bias of a position-independent executable: where its first segment was mapped
/// minus the address the ELF file asks for.
pub fn load_bias(pid: u32, exe: &Path, first_vaddr: u64) -> io::Result<u64> {
    let want = exe.to_string_lossy();
    maps(pid)?
        .iter()
        .find(|m| m.offset == 0 && m.path.trim_end_matches(" (deleted)") == want)
        .map(|m| m.start.wrapping_sub(first_vaddr & !0xfff))
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{want} is not mapped in process {pid}")))
}

/// Socket fds of the process: fd -> socket inode.
pub fn socket_fds(pid: u32) -> io::Result<HashMap<u64, u32>> {
    let mut out = HashMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(entry) = entry else { continue };
        let Ok(target) = std::fs::read_link(entry.path()) else { continue };
        let t = target.to_string_lossy();
        if let Some(inode) = t.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']'))
            && let (Ok(inode), Ok(fd)) = (inode.parse::<u64>(), entry.file_name().to_string_lossy().parse::<u32>())
        {
            out.insert(inode, fd);
        }
    }
    Ok(out)
}

/// When process `pid` started (clock ticks after boot, /proc/PID/stat field 22): with the
/// pid, it names one process (pids are reused).
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    after.split_whitespace().nth(19)?.parse().ok()
}

/// Processes with a socket whose inode is in `inodes` (listening sockets of the ports asked
/// for), except `skip`.
pub fn pids_with_sockets(inodes: &std::collections::HashSet<u64>, skip: &dyn Fn(u32) -> bool) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut out: Vec<u32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| !skip(*p))
        .filter(|p| socket_fds(*p).is_ok_and(|s| s.keys().any(|i| inodes.contains(i))))
        .collect();
    out.sort_unstable();
    out
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpSocket {
    pub inode: u64,
    pub addrs: Addrs,
    /// Kernel TCP state (1 = ESTABLISHED, 10 = LISTEN).
    pub state: u8,
}

pub const TCP_ESTABLISHED: u8 = 1;
pub const TCP_LISTEN: u8 = 10;

/// TCP sockets of the process's network namespace (/proc/PID/net/tcp and tcp6).
pub fn tcp_sockets(pid: u32) -> Vec<TcpSocket> {
    let mut out = Vec::new();
    for (file, v6) in [("tcp", false), ("tcp6", true)] {
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")) {
            out.extend(s.lines().skip(1).filter_map(|l| parse_tcp_line(l, v6)));
        }
    }
    out
}

fn parse_tcp_line(line: &str, v6: bool) -> Option<TcpSocket> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.len() < 10 {
        return None;
    }
    let local = parse_endpoint(f[1], v6)?;
    let peer = parse_endpoint(f[2], v6)?;
    let state = u8::from_str_radix(f[3], 16).ok()?;
    let inode = f[9].parse().ok()?;
    Some(TcpSocket { inode, addrs: Addrs { local, peer }, state })
}

/// "0100007F:1F90" (v4) or 32 hex digits (v6), each 32-bit word in host order.
fn parse_endpoint(s: &str, v6: bool) -> Option<Endpoint> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let addr = if v6 {
        if addr.len() != 32 {
            return None;
        }
        let mut b = [0u8; 16];
        for i in 0..4 {
            let w = u32::from_str_radix(&addr[8 * i..8 * i + 8], 16).ok()?;
            b[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
        }
        let v6 = Ipv6Addr::from(b);
        v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
    } else {
        let w = u32::from_str_radix(addr, 16).ok()?;
        IpAddr::V4(Ipv4Addr::from(w.to_le_bytes()))
    };
    Some(Endpoint { addr, port })
}

/// Established TCP connections of `pid` that it accepted (their local port is one it listens
/// on).
pub fn accepted_connections(pid: u32) -> io::Result<Vec<TcpSocket>> {
    let fds = socket_fds(pid)?;
    let sockets = tcp_sockets(pid);
    let listening: HashSet<u16> = sockets.iter().filter(|s| s.state == TCP_LISTEN && fds.contains_key(&s.inode)).map(|s| s.addrs.local.port).collect();
    Ok(sockets.into_iter().filter(|s| s.state == TCP_ESTABLISHED && listening.contains(&s.addrs.local.port) && fds.contains_key(&s.inode)).collect())
}

/// Ports the process listens on: its sockets among `listeners` (the agent's namespace's
/// listening sockets from sock_diag, fetched once for all targets), or from /proc/PID/net/tcp
/// when it lives in another network namespace or sock_diag failed.
pub fn listening_ports(pid: u32, listeners: Option<&[(u64, u16)]>) -> Vec<u16> {
    let fds = match socket_fds(pid) {
        Ok(fds) => fds,
        Err(e) => {
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                warn_fd_access(pid);
            }
            return Vec::new();
        }
    };
    let own;
    let listeners: &[(u64, u16)] = match listeners {
        Some(l) if super::sockdiag::same_netns(pid) => l,
        _ => {
            own = tcp_sockets(pid).into_iter().filter(|s| s.state == TCP_LISTEN).map(|s| (s.inode, s.addrs.local.port)).collect::<Vec<_>>();
            &own
        }
    };
    let mut ports: Vec<u16> = listeners.iter().filter(|(ino, _)| fds.contains_key(ino)).map(|(_, p)| *p).collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// /proc/PID/fd of a process running as another user is closed to root without
/// CAP_DAC_READ_SEARCH (a pod that dropped it): its listening sockets cannot be told, so a
/// server that is not Go gets no server spans. Said once per agent, naming the capability.
fn warn_fd_access(pid: u32) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(
            pid,
            "cannot read /proc/{pid}/fd (a process of another user): CAP_DAC_READ_SEARCH is needed to find the listening sockets of \
             such processes; without it their server spans are missed unless they are Go programs traced with uprobes"
        );
    }
}

/// Identity of an executable file: device and inode (an exec changes them even when the
/// path stays), size and modification time (a file rewritten in place while no process ran
/// it keeps its inode).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
}

impl FileId {
    /// The file itself (device, inode), whatever its content's size and time.
    pub fn inode(&self) -> (u64, u64) {
        (self.dev, self.ino)
    }

    pub fn of(m: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        FileId { dev: m.dev(), ino: m.ino(), size: m.size(), mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128 }
    }
}

/// The identity of the file process `pid` runs (/proc/PID/exe).
pub fn exe_identity(pid: u32) -> Option<FileId> {
    std::fs::metadata(format!("/proc/{pid}/exe")).ok().map(|m| FileId::of(&m))
}

/// The file process `pid` runs, opened (it stays usable after the process is gone), with
/// its identity.
pub fn open_exe(pid: u32) -> io::Result<(std::fs::File, FileId)> {
    let f = std::fs::File::open(exe_open_path(pid))?;
    let id = FileId::of(&f.metadata()?);
    Ok((f, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_line() {
        let m = parse_maps_line("7f0000000000-7f0000021000 r-xp 00002000 fd:01 123456   /usr/lib/a b.so (deleted)").expect("parsed");
        assert_eq!((m.start, m.end, m.offset, m.inode), (0x7f00_0000_0000, 0x7f00_0002_1000, 0x2000, 123456));
        assert_eq!(m.dev, libc::makedev(0xfd, 1));
        assert_eq!(m.path, "/usr/lib/a b.so (deleted)");
        assert!(!parse_maps_line("7f00-7f01 r--p 0 00:00 0").expect("parsed").executable());
        assert_eq!(parse_maps_line("7f00-7f01 r-xp 0 00:00 0").map(|m| m.path), Some(String::new()));
    }

    #[test]
    fn parses_proc_net_tcp_lines() {
        let l = "   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 123456 1 0000000000000000 20 4 30 10 -1";
        let s = parse_tcp_line(l, false).unwrap();
        assert_eq!(s.addrs.local, Endpoint { addr: "127.0.0.1".parse().unwrap(), port: 8080 });
        assert_eq!(s.addrs.peer.port, 50000);
        assert_eq!(s.state, TCP_ESTABLISHED);
        assert_eq!(s.inode, 123456);
        let l6 = "   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 777 1 0000000000000000 100 0 0 10 0";
        let s6 = parse_tcp_line(l6, true).unwrap();
        assert_eq!(s6.addrs.local.addr, "::1".parse::<IpAddr>().unwrap());
        assert_eq!(s6.state, TCP_LISTEN);
        assert!(parse_tcp_line("garbage", false).is_none());
    }

    #[test]
    fn own_process_is_visible() {
        let me = std::process::id();
        assert!(exists(me));
        let exe = exe_link(me).unwrap();
        assert!(exe.is_absolute());
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let _c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (_s, _) = l.accept().unwrap();
        assert!(listening_ports(me, None).contains(&port));
        let diag = super::super::sockdiag::listening().unwrap();
        assert!(listening_ports(me, Some(&diag)).contains(&port));
        let accepted = accepted_connections(me).unwrap();
        assert!(accepted.iter().any(|s| s.addrs.local.port == port), "{accepted:?}");
    }
}
