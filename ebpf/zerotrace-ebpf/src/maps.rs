//! Every map of the kernel programs, with its bound (see zerotrace_common::bounds) and the
//! load-time globals the agent fills in (kernel struct offsets, settings).
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
};
use zerotrace_common::{
    COUNTER_SLOTS, ClientLink, ConnKey, ConnState, FlowKey, GoClientState, GoH2State, GoRequestKey, GoRequestState, GoRpcKey, GoRpcState, GoSqlState,
    GoroutineCtx, GoroutineKey, HTTP_REQUEST_MAX, KernelOffsets, ListenKey, RUN_MARK_SLOTS, RecvArgs, Settings, SlotKey, TargetConfig, TraceCtx, bounds,
};

/// All events for the agent, variable-length records each starting with an EventHeader.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(bounds::RING_BYTES, 0);

/// Selected processes (tgid) and what to do for them. Filled by the agent only.
#[map]
pub static TARGETS: HashMap<u32, TargetConfig> = HashMap::with_max_entries(bounds::MAX_TARGETS, 0);

/// One bit per pid: set for selected processes (bounds::MAX_PID bits). Checked first by
/// every syscall program, before any hash lookup.
#[map]
pub static SELECTED: Array<u64> = Array::with_max_entries(bounds::MAX_PID / 64, 0);

/// Ports traced processes listen on, kept by the agent from /proc: a socket whose local
/// port is one of them is a server socket.
#[map]
pub static LISTEN: HashMap<ListenKey, u8> = HashMap::with_max_entries(bounds::MAX_LISTEN, 0);

/// Tracked sockets of selected processes, keyed by kernel socket.
#[map]
pub static CONNS: HashMap<ConnKey, ConnState> = HashMap::with_max_entries(bounds::MAX_CONNS, 0);

/// Handler probe mode: goroutines inside serverHandler.ServeHTTP.
#[map]
pub static GO_REQUESTS: HashMap<GoRequestKey, GoRequestState> = HashMap::with_max_entries(bounds::MAX_GO_REQUESTS, 0);

/// The span each goroutine's work belongs to (see zerotrace_common::ctx_origin). LRU: when
/// full, the goroutine touched least recently loses its context (it is most likely gone).
#[map]
pub static GO_CTX: LruHashMap<GoroutineKey, GoroutineCtx> = LruHashMap::with_max_entries(bounds::MAX_GO_CTX, 0);

/// Goroutines inside `(*http.Transport).roundTrip`: their client span and the context to
/// restore when it returns.
#[map]
pub static GO_CLIENTS: HashMap<GoroutineKey, GoClientState> = HashMap::with_max_entries(bounds::MAX_GO_CLIENTS, 0);

/// grpc-go server streams between their handler's start and their status. LRU: a stream
/// whose status is never written (the client reset it, the connection broke) ages out.
#[map]
pub static GO_RPC: LruHashMap<GoRpcKey, GoRpcState> = LruHashMap::with_max_entries(bounds::MAX_GO_CLIENTS, 0);

/// Go HTTP/2 handler goroutines inside runHandler: their stream's span and response state.
/// LRU: a handler that never returns (it blocks forever) ages out.
#[map]
pub static GO_H2: LruHashMap<GoroutineKey, GoH2State> = LruHashMap::with_max_entries(bounds::MAX_GO_CLIENTS, 0);

/// Goroutines inside database/sql's queryDC/execDC.
#[map]
pub static GO_SQL: HashMap<GoroutineKey, GoSqlState> = HashMap::with_max_entries(bounds::MAX_GO_CLIENTS, 0);

/// The span of the request a traced client last wrote on each flow: a server on this host
/// that reads the request links its span to it.
#[map]
pub static CLIENT_LINK: LruHashMap<FlowKey, ClientLink> = LruHashMap::with_max_entries(bounds::MAX_CLIENT_LINKS, 0);

/// The same offers keyed by the client's address and port alone (`causality::nat_key`),
/// for a server that reads on another address than the client wrote to (a Service's
/// virtual IP, DNAT). Loopback clients are left out: their address is not unique across
/// network namespaces.
#[map]
pub static CLIENT_LINK_NAT: LruHashMap<u64, ClientLink> = LruHashMap::with_max_entries(bounds::MAX_CLIENT_LINKS, 0);

/// The span of the goroutine that put each value in a channel buffer (only values sent from
/// inside a span; a slot written outside any span is removed).
#[map]
pub static CHAN_SLOTS: LruHashMap<SlotKey, u64> = LruHashMap::with_max_entries(bounds::MAX_CHAN_SLOTS, 0);

/// Between `runtime.recv`'s entry and its refill of a full buffer (same thread, channel
/// lock held): the span of the blocked sender whose value goes into the freed slot.
#[map]
pub static RECV_SENDER: LruHashMap<u64, u64> = LruHashMap::with_max_entries(4096, 0);

/// With `--inject-traceparent` only: the trace id of each span the kernel made (server
/// requests, client calls), so that a client call can name its trace in the header it
/// writes. LRU: a span forgotten this way is not propagated (its request is long done).
#[map]
pub static SPAN_TRACE: LruHashMap<u64, TraceCtx> = LruHashMap::with_max_entries(bounds::MAX_SPAN_TRACES, 0);

/// With `--inject-traceparent` only: client calls in flight by their request's Header map
/// (the one `(*Request).write` hands to `Header.writeSubset`) -> [client span, calls in
/// flight with this map]. A map shared by calls in flight has span 0 until all of them
/// returned: none of them gets a header.
#[map]
pub static CLIENT_HDR: HashMap<SlotKey, [u64; 2]> = HashMap::with_max_entries(bounds::MAX_GO_CLIENTS, 0);

/// Syscall hook set: receives on TCP sockets in progress, by thread (pid_tgid), from their
/// entry to their exit (which removes them, also for a syscall a signal interrupted). The
/// agent removes a process's entries when it stops tracing it.
#[map]
pub static RECV_ARGS: HashMap<u64, RecvArgs> = HashMap::with_max_entries(bounds::MAX_RECV_ARGS, 0);

/// Load shedding: [0] the shift of `zerotrace_common::shed` (0: every request kept).
#[map]
pub static SHED: Array<u32> = Array::with_max_entries(1, 0);

/// Per-CPU counters, indexed by zerotrace_common::Counter.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// Linux 7.0+ (settings_flags::RUN_TWINS; one entry otherwise): per thread (its id modulo
/// RUN_MARK_SLOTS), the key (util::run_key) of the last event a program with a twin
/// handled. The kernel runs a program once per CPU at a time and, since 7.0, lets it be
/// preempted (at the latest where it enables preemption again, after its work), skipping
/// it meanwhile for every other task on the CPU: the socket-btf receive and send programs
/// and the exec watch each have a twin attached after them, which runs the program for an
/// event only when the event's mark is not there (and takes the mark when it is).
#[map]
pub static RUN_MARK: Array<u64> = Array::with_max_entries(RUN_MARK_SLOTS, 0);

/// Linux 7.0+: the socket-btf receive and send programs, which their twins run by a tail
/// call for a thread the kernel skipped them for. One array each: the kernel lets a prog
/// array hold tracing programs of one attach point only.
#[map]
pub static TWIN_RECV: ProgramArray = ProgramArray::with_max_entries(1, 0);
#[map]
pub static TWIN_SEND: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Per CPU: the event (its run key) a twin hands to its program by the tail call
/// (util::rescue).
#[map]
pub static RESCUE: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU space to assemble a variable-length record before it is copied to EVENTS.
#[map]
pub static SCRATCH: PerCpuArray<[u8; HTTP_REQUEST_MAX]> = PerCpuArray::with_max_entries(1, 0);

/// Kernel structure offsets, from BTF by the agent (aya emits no CO-RE relocations).
#[unsafe(no_mangle)]
pub static KERNEL: KernelOffsets = KernelOffsets {
    task_fsbase: 0,
    task_files: 0,
    files_fdt: 0,
    fdtable_fd: 0,
    file_private_data: 0,
    socket_sk: 0,
    skc_family: 0,
    skc_daddr: 0,
    skc_rcv_saddr: 0,
    skc_dport: 0,
    skc_num: 0,
    skc_v6_daddr: 0,
    skc_v6_rcv_saddr: 0,
    skc_state: 0,
    sock_sk_socket: 0,
    socket_alloc_inode: 0,
    inode_ino: 0,
    msghdr_iter_count: 0,
    tcp_write_seq: 0,
    fdtable_max_fds: 0,
    file_inode: 0,
    inode_mode: 0,
    sk_type: 0,
    sk_protocol: 0,
    task_stack: 0,
};

#[unsafe(no_mangle)]
pub static SETTINGS: Settings =
    Settings { req_capture: 1024, abi_version: zerotrace_common::ABI_VERSION, flags: 0, sampler: zerotrace_common::sampler_mode::ALWAYS_ON, ratio_bound: 0 };

#[inline(always)]
pub fn kernel() -> KernelOffsets {
    // SAFETY: a plain read of a global the loader may have rewritten; volatile keeps the
    // compiler from folding the default values in.
    unsafe { core::ptr::read_volatile(&KERNEL) }
}

#[inline(always)]
pub fn settings() -> Settings {
    // SAFETY: as for kernel().
    unsafe { core::ptr::read_volatile(&SETTINGS) }
}
