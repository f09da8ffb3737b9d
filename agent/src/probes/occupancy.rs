//! How full the kernel's hash maps are: each map's entry count (`map_<name>_entries` in the
//! stats log, `--stats-file`, `zerotrace status` and OTLP), so that what churn and failures
//! leave behind can be seen and tested. A BPF hash map keeps no count: counting walks its
//! keys, one bpf(2) call each, at most `max_entries` of them, and the run loop counts at
//! most every `EVERY` (the last figures are shown in between). Also: removing a gone
//! process's entries from the maps whose keys start with its pid.
use std::{
    os::fd::{AsFd, AsRawFd, OwnedFd},
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    maps::{Map, MapData},
};
use zerotrace_common::names;

/// The hash maps counted, with the names their figures take. The LRU ones (GO_CTX, GO_RPC, GO_H2,
/// CLIENT_LINK*, CHAN_SLOTS, RECV_SENDER, SPAN_TRACE) are caches bounded by their size;
/// the others hold only what is live and go back to their baseline.
pub const MAPS: &[(&str, &str)] = &[
    (names::TARGETS, "map_targets_entries"),
    (names::LISTEN, "map_listen_entries"),
    (names::CONNS, "map_conns_entries"),
    (names::RECV_ARGS, "map_recv_args_entries"),
    (names::GO_REQUESTS, "map_go_requests_entries"),
    (names::GO_CTX, "map_go_ctx_entries"),
    (names::GO_CLIENTS, "map_go_clients_entries"),
    (names::GO_SQL, "map_go_sql_entries"),
    (names::GO_RPC, "map_go_rpc_entries"),
    (names::GO_H2, "map_go_h2_entries"),
    (names::CLIENT_HDR, "map_client_hdr_entries"),
    (names::CLIENT_LINK, "map_client_link_entries"),
    (names::CLIENT_LINK_NAT, "map_client_link_nat_entries"),
    (names::CHAN_SLOTS, "map_chan_slots_entries"),
    (names::RECV_SENDER, "map_recv_sender_entries"),
    (names::SPAN_TRACE, "map_span_trace_entries"),
];

/// The maps whose keys start with the owning process's pid (`GoroutineKey`,
/// `GoRequestKey`, `SlotKey`, `GoRpcKey`): a forgotten process's entries are removed from them.
pub const PER_PROCESS: &[&str] =
    &[names::GO_REQUESTS, names::GO_CTX, names::GO_CLIENTS, names::GO_SQL, names::GO_RPC, names::GO_H2, names::CHAN_SLOTS, names::CLIENT_HDR];

/// Counting walks at most this often.
pub const EVERY: Duration = Duration::from_secs(5);

/// Whether counter `name` is one of these entry counts (a gauge, not a running total).
pub fn is_entries(name: &str) -> bool {
    name.starts_with("map_") && name.ends_with("_entries")
}

/// The last count of every map.
pub struct Occupancy {
    last: Vec<(&'static str, u64)>,
    at: Option<Instant>,
}

impl Default for Occupancy {
    fn default() -> Self {
        Occupancy { last: MAPS.iter().map(|(_, n)| (*n, 0)).collect(), at: None }
    }
}

impl Occupancy {
    /// The entries of every map: counted now if the last count is older than `EVERY` (or
    /// `fresh`), else the last count.
    pub fn get(&mut self, ebpf: &Ebpf, fresh: bool) -> Vec<(&'static str, u64)> {
        if fresh || self.at.is_none_or(|t| t.elapsed() >= EVERY) {
            self.last = MAPS.iter().map(|(map, name)| (*name, RawMap::of(ebpf, map).map_or(0, |m| m.for_each_key(|_| {})))).collect();
            self.at = Some(Instant::now());
        }
        self.last.clone()
    }
}

/// A hash map's fd, key size and bound, for walks over raw keys (aya's typed maps need the
/// key type; these walks serve every map alike).
pub struct RawMap {
    fd: OwnedFd,
    key_size: usize,
    max_entries: u32,
}

impl RawMap {
    /// Hash map `name` (plain or LRU), if the object has it.
    pub fn of(ebpf: &Ebpf, name: &str) -> Option<RawMap> {
        let data: &MapData = match ebpf.map(name)? {
            Map::HashMap(m) | Map::LruHashMap(m) => m,
            _ => return None,
        };
        let info = data.info().ok()?;
        let fd = data.fd().as_fd().try_clone_to_owned().ok()?;
        Some(RawMap { fd, key_size: info.key_size() as usize, max_entries: info.max_entries() })
    }

    /// Calls `f` with each key once; returns how many there were. A key deleted under the
    /// walk makes the kernel start again from the first key: keys already seen are skipped,
    /// and the walk stops after twice the map's bound of steps.
    pub fn for_each_key(&self, f: impl FnMut(&[u8])) -> u64 {
        self.walk(f).0
    }

    /// Every key, or None when the walk did not reach the map's end (its step bound, or an
    /// error): a caller that acts on what is missing needs them all.
    pub fn all_keys(&self) -> Option<Vec<Vec<u8>>> {
        let mut keys = Vec::new();
        let (_, complete) = self.walk(|k| keys.push(k.to_vec()));
        complete.then_some(keys)
    }

    /// `for_each_key`, and whether the walk ended at the map's end.
    fn walk(&self, mut f: impl FnMut(&[u8])) -> (u64, bool) {
        let mut key = vec![0u8; self.key_size];
        let mut next = vec![0u8; self.key_size];
        let mut seen: std::collections::HashSet<Vec<u8>> = std::collections::HashSet::new();
        let mut first = true;
        let mut complete = false;
        for _ in 0..2 * u64::from(self.max_entries) + 1 {
            if !bpf_key_op(BPF_MAP_GET_NEXT_KEY, self.fd.as_raw_fd(), if first { None } else { Some(&key) }, Some(&mut next)) {
                complete = std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOENT);
                break;
            }
            first = false;
            if seen.insert(next.clone()) {
                f(&next);
            }
            std::mem::swap(&mut key, &mut next);
        }
        (seen.len() as u64, complete)
    }

    /// Deletes every entry whose key starts with `pid`; returns how many went.
    pub fn purge_pid(&self, pid: u32) -> u64 {
        let mut stale = Vec::new();
        self.for_each_key(|k| {
            if k.get(..4) == Some(&pid.to_ne_bytes()[..]) {
                stale.push(k.to_vec());
            }
        });
        stale.iter().filter(|k| bpf_key_op(BPF_MAP_DELETE_ELEM, self.fd.as_raw_fd(), Some(k), None)).count() as u64
    }
}

const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// BPF_MAP_GET_NEXT_KEY or BPF_MAP_DELETE_ELEM on raw key bytes.
fn bpf_key_op(cmd: libc::c_long, fd: i32, key: Option<&[u8]>, next: Option<&mut [u8]>) -> bool {
    /// The map-element part of `union bpf_attr`, zero-padded to a size every kernel takes.
    #[repr(C)]
    struct Attr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        next_key: u64,
        _rest: [u64; 13],
    }
    let attr =
        Attr { map_fd: fd as u32, _pad: 0, key: key.map_or(0, |k| k.as_ptr() as u64), next_key: next.map_or(0, |n| n.as_mut_ptr() as u64), _rest: [0; 13] };
    // SAFETY: bpf(2) with an attribute block of a size the kernel accepts for these commands
    // (zeroed past the fields it reads); the key buffers are the map's key size and outlive
    // the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, &attr as *const Attr, std::mem::size_of::<Attr>() as u32) };
    r == 0
}
