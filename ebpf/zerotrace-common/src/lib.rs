//! Types shared by the kernel programs (`zerotrace-ebpf`) and the agent: map keys and
//! values, ring-buffer records, bounds and names. Everything is `#[repr(C)]`, has explicit
//! padding and a compile-time size check, because the agent reads ring-buffer records
//! zero-copy and both sides must agree byte for byte.
#![no_std]

/// Bumped whenever a record or map layout changes; the agent refuses a mismatched object.
pub const ABI_VERSION: u32 = 10;

/// Names of maps and programs, shared so that neither side spells them twice.
pub mod names {
    pub const EVENTS: &str = "EVENTS";
    pub const TARGETS: &str = "TARGETS";
    pub const CONNS: &str = "CONNS";
    pub const SELECTED: &str = "SELECTED";
    pub const LISTEN: &str = "LISTEN";
    pub const COUNTERS: &str = "COUNTERS";
    pub const SCRATCH: &str = "SCRATCH";
    pub const RUN_MARK: &str = "RUN_MARK";
    pub const GO_REQUESTS: &str = "GO_REQUESTS";
    pub const GO_CTX: &str = "GO_CTX";
    pub const GO_CLIENTS: &str = "GO_CLIENTS";
    pub const CLIENT_LINK: &str = "CLIENT_LINK";
    pub const CLIENT_LINK_NAT: &str = "CLIENT_LINK_NAT";
    pub const CHAN_SLOTS: &str = "CHAN_SLOTS";
    pub const SPAN_TRACE: &str = "SPAN_TRACE";
    pub const CLIENT_HDR: &str = "CLIENT_HDR";
    pub const RECV_SENDER: &str = "RECV_SENDER";
    pub const GO_SQL: &str = "GO_SQL";
    pub const GO_RPC: &str = "GO_RPC";
    pub const GO_H2: &str = "GO_H2";
    pub const RECV_ARGS: &str = "RECV_ARGS";
    pub const KERNEL: &str = "KERNEL";
    pub const SETTINGS: &str = "SETTINGS";
    pub const SHED: &str = "SHED";
}

/// Bounds of every map and buffer. Each one is documented in docs/limits.md; the agent
/// may lower or raise the map sizes at load time, the capture sizes are hard limits.
pub mod bounds {
    /// Processes traced at once.
    pub const MAX_TARGETS: u32 = 4096;
    /// Sockets tracked at once across all traced processes (default; `--max-connections`).
    pub const MAX_CONNS: u32 = 16384;
    /// Largest pid the selection bitmap covers (the kernel's PID_MAX_LIMIT on 64-bit).
    pub const MAX_PID: u32 = 4 * 1024 * 1024;
    /// (process, port) pairs traced processes listen on.
    pub const MAX_LISTEN: u32 = 4096;
    /// Goroutines inside `serverHandler.ServeHTTP` at once (handler probe mode).
    pub const MAX_GO_REQUESTS: u32 = 16384;
    /// Goroutines with an active span context at once (LRU: the least recently used go).
    pub const MAX_GO_CTX: u32 = 65536;
    /// Goroutines inside `(*http.Transport).roundTrip` at once.
    pub const MAX_GO_CLIENTS: u32 = 16384;
    /// Threads of traced processes inside a socket receive at once (syscall hook set).
    pub const MAX_RECV_ARGS: u32 = 16384;
    /// Client requests of traced processes whose span a same-host server can still link to.
    pub const MAX_CLIENT_LINKS: u32 = 16384;
    /// Channel buffer slots holding a value sent from inside a span, at once (LRU).
    pub const MAX_CHAN_SLOTS: u32 = 65536;
    /// Spans whose trace id the kernel remembers for traceparent injection (LRU).
    pub const MAX_SPAN_TRACES: u32 = 65536;
    /// Ring buffer for all events (bytes, power of two).
    pub const RING_BYTES: u32 = 8 << 20;
    /// Bytes of pending ring-buffer data after which a producer wakes the agent up;
    /// below it the agent drains on its own timer (no wake-up per event).
    pub const WAKEUP_BYTES: u64 = 512 << 10;
    /// Largest request-head prefix captured per request (the setting may lower it).
    pub const REQ_CAPTURE_MAX: usize = 2048;
    /// HTTP/2: bytes of one read or send captured (in records of REQ_CAPTURE_MAX), so that
    /// many streams' frames coalesced into one syscall are all seen.
    pub const H2_CHUNKS: usize = 8;
    /// Bytes of a response kept to read its status line.
    pub const STATUS_CAPTURE: usize = 16;
    /// Bytes of a SQL statement's text kept per call.
    pub const SQL_TEXT_MAX: usize = 1024;
    /// Bytes of a database error code kept (SQLSTATE is 5; MySQL error numbers fit too).
    pub const SQL_CODE_MAX: usize = 8;
    /// Longest Go route pattern the agent reads (`GET /users/{id}`); longer ones are cut.
    pub const PATTERN_MAX: usize = 256;
    /// Longest Go string copied for method, path, host or remote address.
    pub const GO_STR_MAX: usize = 128;
    /// Kernel frames kept per CPU sample.
    pub const KSTACK_MAX: usize = 64;
    /// User frames kept per CPU sample of a Go program (frame-pointer walk in the kernel;
    /// the kernel's own limit, kernel.perf_event_max_stack, is 127 by default).
    pub const USTACK_MAX: usize = 128;
    /// Pages of user stack copied per CPU sample of a program that is not Go (unwound in
    /// the agent from .eh_frame): 32 KiB from the page holding the stack pointer.
    pub const STACK_PAGES: usize = 8;
    pub const PAGE: usize = 4096;
}

/// Counters kept per CPU in the `COUNTERS` array; the agent sums and reports them under
/// `name()` (log, `--stats-file` as `zerotrace_<name>`, `status`, OTLP metrics): one name
/// from here to the user.
macro_rules! counters {
    ($($(#[$doc:meta])* $variant:ident = $n:literal, $name:literal;)*) => {
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Counter {
            $($(#[$doc])* $variant = $n,)*
        }

        impl Counter {
            /// Every counter, in slot order.
            pub const ALL: &[Counter] = &[$(Counter::$variant,)*];

            /// The name the agent exports it under.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Counter::$variant => $name,)*
                }
            }
        }
    };
}

counters! {
    /// A record did not fit in the ring buffer (agent too slow): the event is lost.
    EventsDroppedRingFull = 0, "events_dropped_ring_full";
    /// `CONNS` was full when a new connection arrived: it is not traced.
    ConnectionsDroppedMapFull = 1, "connections_dropped_map_full";
    /// Bytes received through a call zerotrace cannot read the buffer of.
    ReceivesWithoutBuffer = 2, "receives_without_buffer";
    /// Reading target memory failed (paged out, freed, bad offset).
    TargetReadsFailed = 3, "target_reads_failed";
    /// Reading a kernel structure failed.
    KernelReadsFailed = 4, "kernel_reads_failed";
    /// Receives and sends of traced processes on tracked server sockets (socket hook hits).
    SocketOps = 5, "socket_ops";
    /// Uprobe hits, all Go functions together.
    UprobeHits = 6, "uprobe_hits";
    /// Server requests seen starting.
    RequestsSeen = 7, "requests_seen";
    /// `GO_REQUESTS`, `GO_CLIENTS` or `GO_SQL` was full at a call's entry: not traced.
    GoCallsDroppedMapFull = 8, "go_calls_dropped_map_full";
    /// A Go handler, client call or SQL call returned with no recorded entry (attached
    /// mid-call).
    HandlerReturnsUnmatched = 9, "handler_returns_unmatched";
    /// Goroutines spawned (spawn hooks hit).
    GoroutinesSpawned = 10, "goroutines_spawned";
    /// Goroutines spawned while a span was active: they inherited it.
    GoroutinesInheritedSpan = 11, "goroutines_inherited_span";
    /// Values handed over a channel from one goroutine to another (hooks hit).
    ChannelHandoffs = 12, "channel_handoffs";
    /// Handoffs that carried a span context to the receiver.
    ChannelEdges = 13, "channel_edges";
    /// Client requests written on a socket with a span context (same-host link offered).
    ClientLinksOffered = 14, "client_links_offered";
    /// Server requests that found the span of the same-host client that sent them.
    ServerRequestsLinkedKernel = 15, "server_requests_linked_kernel";
    /// `--inject-traceparent`: headers written into outgoing requests.
    TraceparentInjected = 16, "traceparent_injected";
    /// Not injected: the request already has a traceparent, its Header map is too big to
    /// check, its writer is not a bufio.Writer, or its span's trace is unknown.
    TraceparentSkipped = 17, "traceparent_skipped";
    /// Not injected: the writer's buffer has no room for the line.
    TraceparentNoRoom = 18, "traceparent_no_room";
    /// Writing into the target failed (nothing was changed).
    TraceparentWriteFailed = 19, "traceparent_write_failed";
    /// `--inject-traceparent=dry-run`: headers that would have been written.
    TraceparentDryRun = 20, "traceparent_dry_run";
    /// Client requests of native processes (not Go), seen starting at the socket.
    SocketClientRequestsSeen = 21, "socket_client_requests_seen";
    /// CPU samples of selected processes sent to the agent.
    CpuSamplesTaken = 22, "cpu_samples_taken";
    /// Requests that came pipelined behind another (no read started them): seen at their
    /// response head, or in handler mode at their handler's entry.
    PipelinedRequestsSeen = 23, "pipelined_requests_seen";
    /// The syscall hook set: RECV_ARGS was full when a receive started (more threads in
    /// socket receives at once than its bound): that receive is not seen.
    ReceivesLostMapFull = 24, "receives_lost_map_full";
    /// `--inject-traceparent`: headers written (or, dry-run, decided) with the sampled flag
    /// off, because the agent's sampler drops their trace.
    TraceparentUnsampled = 25, "traceparent_unsampled";
    /// A socket's I/O found the state of an earlier socket at the same kernel address (one
    /// whose end was not seen): that state was replaced, so the new connection is followed
    /// from this I/O with its own role and addresses.
    ConnectionsStaleReplaced = 26, "connections_stale_replaced";
    /// Server requests linked to their same-host client by the client's address and port
    /// alone: the client wrote to another address (a Service's virtual IP, DNAT) than the
    /// one the server reads on. Included in `server_requests_linked_kernel`.
    ServerRequestsLinkedThroughNat = 27, "server_requests_linked_through_nat";
    /// Server requests the kernel did not report because the agent was shedding load
    /// (over its CPU budget or memory limit: SHED keeps 1 in 2^k new requests).
    RequestsShed = 28, "requests_shed";
    /// Linux 7.0+: events a program's twin handled because the kernel skipped the program
    /// itself (it was preempted in another task on the CPU; see RUN_MARK).
    KernelRunsRescued = 29, "kernel_runs_rescued";
}

pub const COUNTER_SLOTS: u32 = 30;
const _: () = {
    assert!(Counter::ALL.len() == COUNTER_SLOTS as usize);
    let mut i = 0;
    while i < Counter::ALL.len() {
        assert!(Counter::ALL[i] as usize == i);
        i += 1;
    }
};

/// Kinds of ring-buffer records, the first field of every record.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    ConnOpen = 1,
    ConnClose = 2,
    HttpRequest = 3,
    HttpResponse = 4,
    GoServerRequest = 5,
    GoClientRequest = 6,
    GoClientResponse = 7,
    GoSqlStart = 8,
    GoSqlEnd = 9,
    Traceparent = 10,
    ProcExec = 11,
    /// A process that is not Go sends a request on a client socket (HttpRequestEvent layout:
    /// the request's first bytes; `link_span` 0).
    SockClientRequest = 12,
    /// The first bytes of the response to it (HttpRequestEvent layout, `start_ns` the read,
    /// `read_len` the bytes it returned).
    SockClientResponse = 13,
    /// A later read of that response (SockBytesEvent: length, last bytes).
    SockClientRecv = 14,
    /// A native server's response: its first bytes (HttpRequestEvent layout, `start_ns`
    /// the send, `read_len` the bytes of that send).
    SockServerResponse = 15,
    /// A later send of that response (SockBytesEvent).
    SockServerSend = 16,
    /// HTTP/2 on a native process's connection: the first bytes of every read, in pieces of
    /// at most REQ_CAPTURE_MAX (H2BytesEvent).
    SockH2Recv = 17,
    /// ... and of every send (`read_len`: the bytes handed to TCP).
    SockH2Send = 18,
    /// A CPU sample of a Go program (CpuSampleEvent: frame-pointer user stack).
    CpuSample = 19,
    /// A CPU sample of another program (CpuSampleEvent + a copy of its user stack).
    CpuSampleNative = 20,
    /// A server connection sends the head of a response while no request was read for it:
    /// the answer to a request that came pipelined, in the same read as an earlier one
    /// (PipelinedRequestEvent).
    /// In Go handler mode it comes at the handler's entry instead, with no head (`read_len`
    /// 0): the response then ends with an HttpResponse as usual.
    SockServerPipelined = 21,
    /// A database/sql call returned (GoSqlEndEvent: its error's SQLSTATE when the driver's
    /// error type is known, the server it talked to). Replaces GoSqlEnd (still read in
    /// recordings).
    GoSqlDone = 22,
    /// A grpc-go server stream met its handler: recordings of ABI 9 (GoRpcStartEvent's
    /// layout then: no traceparent). Replaced by GoRpcServerStart.
    GoRpcStart = 23,
    /// Its status was written (GoRpcEndEvent).
    GoRpcEnd = 24,
    /// A Go net/http HTTP/2 stream met its handler (GoH2StartEvent).
    GoH2Start = 25,
    /// Its handler returned (GoH2EndEvent).
    GoH2End = 26,
    /// A grpc-go client stream was made (GoRpcStartEvent; `parent_span` the caller's).
    GoRpcClientStart = 27,
    /// A grpc-go server stream met its handler (GoRpcStartEvent).
    GoRpcServerStart = 28,
}

impl EventKind {
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Self::ConnOpen,
            2 => Self::ConnClose,
            3 => Self::HttpRequest,
            4 => Self::HttpResponse,
            5 => Self::GoServerRequest,
            6 => Self::GoClientRequest,
            7 => Self::GoClientResponse,
            8 => Self::GoSqlStart,
            9 => Self::GoSqlEnd,
            10 => Self::Traceparent,
            11 => Self::ProcExec,
            12 => Self::SockClientRequest,
            13 => Self::SockClientResponse,
            14 => Self::SockClientRecv,
            15 => Self::SockServerResponse,
            16 => Self::SockServerSend,
            17 => Self::SockH2Recv,
            18 => Self::SockH2Send,
            19 => Self::CpuSample,
            20 => Self::CpuSampleNative,
            21 => Self::SockServerPipelined,
            22 => Self::GoSqlDone,
            23 => Self::GoRpcStart,
            24 => Self::GoRpcEnd,
            25 => Self::GoH2Start,
            26 => Self::GoH2End,
            27 => Self::GoRpcClientStart,
            28 => Self::GoRpcServerStart,
            _ => return None,
        })
    }
}

/// First 24 bytes of every ring-buffer record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct EventHeader {
    pub kind: u16,
    pub _pad: u16,
    /// Bytes of the whole record, header included.
    pub size: u32,
    /// Process (tgid) and thread (pid in kernel terms) that caused the event.
    pub pid: u32,
    pub tid: u32,
    /// CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns).
    pub ts_ns: u64,
}

/// Which side of a connection the traced process is.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnRole {
    /// The process accepted it (its local port is one the process listens on, or Go's
    /// `(*conn).serve` runs for it): it is the server side.
    Server = 1,
    /// Any other socket of the process (outbound connections).
    Client = 2,
}

/// Key of `CONNS`: the kernel socket (`struct sock *`), unique while the socket lives.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub sk: u64,
}

/// Key of `LISTEN`: a port a traced process listens on.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListenKey {
    pub pid: u32,
    pub port: u16,
    pub _pad: u16,
}

/// Where a server-side connection is in its request/response cycle.
pub mod phase {
    pub const IDLE: u8 = 0;
    pub const REQUEST: u8 = 1;
    pub const RESPONSE: u8 = 2;
}

/// Value of `CONNS`: what the kernel knows about one tracked socket.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConnState {
    /// Unique id of this connection for its lifetime (fd numbers are reused).
    pub id: u64,
    /// Go: address of the `net/http.conn` serving this socket, 0 if unknown.
    pub go_conn: u64,
    /// Exit time of the read that returned the first bytes of the current request.
    pub req_ts: u64,
    /// Entry time of the first write of the current response.
    pub resp_ts: u64,
    /// Entry time of the latest write of the current response.
    pub last_write_ts: u64,
    /// Bytes received since the current request started.
    pub bytes_in: u64,
    /// The process that owns the socket.
    pub pid: u32,
    /// Local port (to re-check the role of client sockets against LISTEN).
    pub local_port: u16,
    /// 1: the process is not Go: its client requests are followed at the socket (no
    /// uprobes make client spans for it).
    pub native: u8,
    /// 1: a native client's connection whose first bytes were not an HTTP/1 request (another
    /// protocol, or HTTP/2): not followed.
    pub other: u8,
    /// Inode number of the socket (what /proc/PID/fd shows as socket:[N]).
    pub ino: u64,
    /// Requests started on this connection; the current one's number.
    pub seq: u32,
    pub role: u8,
    pub phase: u8,
    pub status_len: u8,
    /// 1: the bytes on this socket are TLS records. Its requests and responses are seen in
    /// plaintext by the Go crypto/tls hooks; the socket hooks keep only timing.
    pub tls: u8,
    pub pattern_len: u16,
    /// 1: the connection speaks HTTP/2 (its first bytes were the client preface). Go's
    /// are not followed; a native process's bytes all go to the agent, which reads the
    /// frames (HTTP/2 has no request/response phases on the wire).
    pub h2: u8,
    /// Injection on: the current request's traceparent was found (SPAN_TRACE has its trace).
    pub trace_in: u8,
    /// Bytes of the current request captured so far (a head split over reads is
    /// captured until the capture size is reached).
    pub captured: u32,
    pub status: [u8; bounds::STATUS_CAPTURE],
    /// Go: address of the route pattern string of the current request (the agent reads
    /// the bytes once per distinct pattern: Go's mux keeps them for the process's life).
    pub pattern_ptr: u64,
    /// Go: the goroutine serving this connection (conn.serve's) and its goid.
    pub go_g: u64,
    pub goid: u64,
    /// Server: span id of the current request (made by the kernel, used by the agent as
    /// the OpenTelemetry span id, and by children as their parent).
    pub span_id: u64,
    /// Go: the `*response` serving the current request when its response started
    /// (conn.curReq then): while the serving goroutine's curReq is another, it works for
    /// a request that came pipelined, not for this one.
    pub resp_w: u64,
    /// tcp_sock.write_seq when the current response started: a later send that starts
    /// like a response head while it has not moved is the same send tried again (the
    /// socket's buffer was full), not the next response.
    pub resp_wseq: u32,
    /// 1: the current request is shed (SHED): none of its records are sent.
    pub shed: u8,
    pub _pad2: [u8; 3],
    /// The connection from its client's side (same-host link key).
    pub flow: FlowKey,
}

/// A TCP connection as its client sees it: client address and port, server address and
/// port. A client's socket and the server's accepted socket on the same host have the same
/// flow, which links a client span to the server span it caused.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub client_addr: [u8; 16],
    pub server_addr: [u8; 16],
    pub client_port: u16,
    pub server_port: u16,
    pub _pad: u32,
}

/// Value of `CLIENT_LINK`: the span of the request a client last wrote on a flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ClientLink {
    pub span_id: u64,
    pub ts_ns: u64,
}

/// Key of `GO_CTX` and `GO_CLIENTS`: one goroutine of one process. goids are never reused
/// inside a process (g structs are), so a stale entry can never be mistaken for a new
/// goroutine.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GoroutineKey {
    pub pid: u32,
    pub _pad: u32,
    pub goid: u64,
}

/// How a goroutine came by its span context.
pub mod ctx_origin {
    /// It serves a connection: its span is the connection's current request (CONNS[sk]).
    pub const CONN: u8 = 1;
    /// It is inside a span of its own (a client call): not replaced by what it receives.
    pub const OWN: u8 = 2;
    /// Inherited from the goroutine that spawned it.
    pub const SPAWN: u8 = 3;
    /// Received with a value over a channel.
    pub const CHANNEL: u8 = 4;
}

/// Value of `GO_CTX`: the span a goroutine's work belongs to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GoroutineCtx {
    /// The span (0 with origin CONN: read CONNS[sk] instead).
    pub span_id: u64,
    /// Origin CONN: the socket whose current request is the span.
    pub sk: u64,
    pub origin: u8,
    pub _pad: [u8; 7],
}

/// Key of `CHAN_SLOTS`: a slot of a channel's buffer (its address in the target).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SlotKey {
    pub pid: u32,
    pub _pad: u32,
    pub addr: u64,
}

/// Value of `GO_CLIENTS`: a goroutine inside `(*http.Transport).roundTrip`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GoClientState {
    pub span_id: u64,
    /// The goroutine's context before the call (restored at its return); origin 0: none.
    pub prev: GoroutineCtx,
    /// `--inject-traceparent`: the request's Header map (its CLIENT_HDR key), 0: none.
    pub header: u64,
}

/// Socket addresses, IPv4 mapped into IPv6 (`::ffff:a.b.c.d`), ports in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockAddrs {
    pub local_addr: [u8; 16],
    pub peer_addr: [u8; 16],
    pub local_port: u16,
    pub peer_port: u16,
    /// AF_INET (2) or AF_INET6 (10); 0 when unknown.
    pub family: u16,
    pub _pad: u16,
}

/// A socket of a traced process became tracked (at its first I/O, or when Go started
/// serving it).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConnOpenEvent {
    pub hdr: EventHeader,
    pub conn_id: u64,
    pub sk: u64,
    pub role: u8,
    pub _pad: [u8; 7],
    pub addrs: SockAddrs,
}

/// A process called exec (`--exe` discovery only): the header's pid runs a new program.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProcExecEvent {
    pub hdr: EventHeader,
}

/// A tracked socket reached TCP_CLOSE.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConnCloseEvent {
    pub hdr: EventHeader,
    pub conn_id: u64,
    pub sk: u64,
}

/// Bytes of a response moved on a socket of a process that is not Go (a client's read, a
/// server's send): enough for the agent to tell where the response ends (its length, and
/// its last bytes for chunked bodies).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SockBytesEvent {
    pub hdr: EventHeader,
    pub conn_id: u64,
    pub seq: u32,
    /// Bytes the read returned, or the send handed to TCP.
    pub len: u32,
    /// The last `tail_len` bytes of them (at most 8), in `tail[..tail_len]` (0: not seen).
    pub tail: [u8; 8],
    pub tail_len: u8,
    pub _pad: [u8; 7],
}

/// One CPU sample (perf_event cpu-clock) of a selected process: the thread that ran, its
/// goroutine and span (Go), its user registers, kernel frames, and either user frames
/// walked by frame pointers (Go) or, in CpuSampleNativeEvent, a copy of the stack.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CpuSampleEvent {
    pub hdr: EventHeader,
    /// Go: the goroutine that ran (0: none, e.g. the scheduler's own stack).
    pub goid: u64,
    /// Go: the span active on that goroutine (GO_CTX), 0 when none.
    pub span_id: u64,
    /// User registers at the sample (the task's saved registers when the sample hit
    /// kernel code).
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
    /// Native: user address of the first copied stack byte (sp rounded down to a page).
    pub stack_base: u64,
    pub cpu: u32,
    /// Bytes of `kstack` / `ustack` filled (bpf_get_stack's result, 8 per frame).
    pub kstack_len: u32,
    pub ustack_len: u32,
    /// Native: bytes of stack copied after this struct (whole pages).
    pub stack_len: u32,
    pub kstack: [u64; bounds::KSTACK_MAX],
    pub ustack: [u64; bounds::USTACK_MAX],
}

/// A CPU sample of a program that is not Go, with its stack copied for unwinding.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CpuSampleNativeEvent {
    pub sample: CpuSampleEvent,
    pub stack: [u8; bounds::STACK_PAGES * bounds::PAGE],
}

/// Bytes a socket moved, captured (variable length: `captured` bytes follow): a request
/// read by a server (`HttpRequest`; when the head arrived in several reads, further
/// records carry the next bytes at `offset`, up to the capture size), and a native
/// process's request or response bytes (`SockClientRequest`, `SockClientResponse`,
/// `SockServerResponse`). `PipelinedRequestEvent` and `H2BytesEvent` have the same size
/// and the shared fields at the same places, so one writer in the kernel fills all three.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HttpRequestEvent {
    pub hdr: EventHeader,
    pub conn_id: u64,
    /// Go: the goroutine (g pointer) and its goid that read the request, else 0.
    pub goroutine: u64,
    pub goid: u64,
    /// Time the first bytes of the request were received (or sent: the native kinds).
    pub start_ns: u64,
    pub seq: u32,
    /// Bytes the read returned (or the send handed to TCP).
    pub read_len: u32,
    /// Bytes copied into `data` (at most the capture size).
    pub captured: u32,
    /// Bytes of this request captured in earlier records.
    pub offset: u32,
    /// The server span's id (kernel-made) and, when a traced client on this host sent the
    /// request from inside a span, that client span's id (0: none).
    pub span_id: u64,
    pub link_span: u64,
    /// The trace the kernel gave the span (random for a new trace; the linked client's
    /// trace when the kernel knows it). The agent uses it for spans that start a trace.
    pub trace_id: [u8; 16],
    /// 1: read in plaintext from a TLS connection.
    pub tls: u8,
    /// Where `trace_id` comes from (`trace_origin`; 0 in later pieces of a head).
    pub trace_origin: u8,
    pub _pad: [u8; 6],
}

/// `SockServerPipelined`: a server sends the head of a response no read started (the
/// answer to a request that came pipelined behind another): the new request's sequence
/// number, span and trace, the head captured (`captured` bytes follow), and for Go the
/// route pattern of the request being answered (address and length in the target).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PipelinedRequestEvent {
    pub hdr: EventHeader,
    pub conn_id: u64,
    /// Go: where the route pattern string is in the target, and its length (0: none).
    pub pattern_ptr: u64,
    pub pattern_len: u64,
    /// The send of the head.
    pub start_ns: u64,
    pub seq: u32,
    /// Bytes of that send (0: Go handler mode, where the request starts at its handler).
    pub read_len: u32,
    pub captured: u32,
    pub offset: u32,
    pub span_id: u64,
    /// Always 0: the offer on the flow was the first request's.
    pub link_span: u64,
    pub trace_id: [u8; 16],
    pub tls: u8,
    pub trace_origin: u8,
    pub _pad: [u8; 6],
}

/// `SockH2Recv` / `SockH2Send`: one piece (at most REQ_CAPTURE_MAX bytes, `captured` of
/// them follow) of the bytes a read or send moved on a native process's HTTP/2
/// connection. Same size as HttpRequestEvent; the `_unused` words keep the shared fields
/// in place.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct H2BytesEvent {
    pub hdr: EventHeader,
    pub conn_id: u64,
    pub _unused: [u64; 2],
    /// The read or send.
    pub ts_ns: u64,
    /// h2_start::PREFACE: the connection started with the client preface; JOINED: it was
    /// open before the agent, joined at a plausible frame header.
    pub start: u32,
    /// Bytes the read returned or the send handed to TCP.
    pub total: u32,
    pub captured: u32,
    /// Where this piece starts among `total`.
    pub offset: u32,
    pub _unused2: [u64; 4],
    /// 1: the syscall's last piece (the rest of `total` was not captured).
    pub last: u8,
    pub _pad: [u8; 7],
}

/// How zerotrace came to follow an HTTP/2 connection (`ConnState::h2`, `H2BytesEvent::start`).
pub mod h2_start {
    pub const PREFACE: u8 = 1;
    pub const JOINED: u8 = 2;
}

/// Where the kernel's trace id of a span comes from.
pub mod trace_origin {
    /// Drawn at random: the span starts a trace, as far as the kernel knows.
    pub const DRAWN: u8 = 1;
    /// The parent's (a same-host client's) trace.
    pub const INHERITED: u8 = 2;
    /// An incoming traceparent the kernel read (injection on).
    pub const INCOMING: u8 = 3;
}

/// Largest HTTP request record: header plus the maximal capture.
pub const HTTP_REQUEST_MAX: usize = core::mem::size_of::<HttpRequestEvent>() + bounds::REQ_CAPTURE_MAX;

/// The response to request `seq` is complete (the server read again or closed).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HttpResponseEvent {
    pub hdr: EventHeader,
    pub conn_id: u64,
    pub resp_start_ns: u64,
    pub end_ns: u64,
    pub bytes_in: u64,
    pub seq: u32,
    pub status_len: u8,
    /// 1 when the connection closed right after this response.
    pub closed: u8,
    pub pattern_len: u16,
    pub status: [u8; bounds::STATUS_CAPTURE],
    /// Go: address and length of the route pattern string in the target (0: none).
    pub pattern_ptr: u64,
}

/// A Go string read from the target (truncated to GO_STR_MAX).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GoStr {
    /// Length in the target; may exceed the bytes kept.
    pub len: u32,
    /// Bytes kept in `buf`.
    pub kept: u32,
    pub buf: [u8; bounds::GO_STR_MAX],
}

/// Handler probe mode: one request handled by `net/http.serverHandler.ServeHTTP`,
/// from its entry to one of its RET instructions.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GoServerRequestEvent {
    pub hdr: EventHeader,
    pub goroutine: u64,
    pub goid: u64,
    pub start_ns: u64,
    pub end_ns: u64,
    pub content_length: i64,
    pub status: i64,
    /// Kernel socket serving the request when it is a plain TCP or TLS connection, else 0.
    pub sk: u64,
    pub method: GoStr,
    pub path: GoStr,
    pub pattern: GoStr,
    pub host: GoStr,
    pub remote_addr: GoStr,
    pub proto: GoStr,
}

/// A Go HTTP client call started (entry of `(*http.Transport).roundTrip`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GoClientRequestEvent {
    pub hdr: EventHeader,
    pub goid: u64,
    /// The client span's id, and the span active in the calling goroutine (0: none).
    pub span_id: u64,
    pub parent_span: u64,
    /// The trace the kernel gave the call (its parent's when known, else new).
    pub trace_id: [u8; 16],
    pub method: GoStr,
    pub scheme: GoStr,
    /// URL.Host (host[:port]) and Request.Host (the Host header override, often empty).
    pub url_host: GoStr,
    pub path: GoStr,
}

/// The Go HTTP client call returned (a RET of `(*http.Transport).roundTrip`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GoClientResponseEvent {
    pub hdr: EventHeader,
    pub goid: u64,
    pub span_id: u64,
    /// Response.StatusCode, 0 without a response.
    pub status: i64,
    /// Type word of the returned error (0: no error).
    pub err_type: u64,
}

/// A database/sql call started (entry of `(*DB).queryDC` or `(*DB).execDC`). The statement's
/// text is copied when the kernel can read it; else (its page not resident) `text_ptr`
/// lets the agent read it if it lies in the executable's read-only data.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GoSqlStartEvent {
    pub hdr: EventHeader,
    pub goid: u64,
    pub span_id: u64,
    pub parent_span: u64,
    pub text_ptr: u64,
    pub text_len: u32,
    /// Bytes of the text in `text` (0: not read).
    pub kept: u32,
    /// sql_kind::QUERY or EXEC.
    pub kind: u8,
    /// The driver's database (sql_system), from the target's configuration.
    pub system: u8,
    /// 1: a prepared statement's call (`(*Stmt).QueryContext`/`ExecContext`).
    pub prepared: u8,
    pub _pad: [u8; 5],
    pub text: [u8; bounds::SQL_TEXT_MAX],
}

/// The database a Go program's database/sql driver talks to, known from the driver module
/// the program is built with (`db.system.name`).
pub mod sql_system {
    /// The program has no database/sql hooks.
    pub const NONE: u32 = 0;
    /// database/sql with a driver zerotrace does not know (`other_sql`).
    pub const OTHER: u32 = 1;
    pub const POSTGRESQL: u32 = 2;
    pub const MYSQL: u32 = 3;
    pub const SQLITE: u32 = 4;
    pub const SQL_SERVER: u32 = 5;
    pub const ORACLE: u32 = 6;
    pub const CLICKHOUSE: u32 = 7;
}

pub mod sql_kind {
    pub const QUERY: u8 = 1;
    pub const EXEC: u8 = 2;
}

/// A database/sql call returned (a RET of queryDC, execDC, `(*Stmt).QueryContext` or
/// `(*Stmt).ExecContext`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GoSqlEndEvent {
    pub hdr: EventHeader,
    pub goid: u64,
    pub span_id: u64,
    /// Type word of the returned error (0: no error).
    pub err_type: u64,
    /// The server of the first connection the call wrote to (`server_port` 0: none seen),
    /// IPv4 as mapped IPv6, as FlowKey.
    pub server_addr: [u8; 16],
    pub server_port: u16,
    /// Bytes of `code`: the error's SQLSTATE (or the driver's code), read when the error
    /// is of the driver's error type (`TargetConfig::sql_error_type`); 0: none.
    pub code_len: u8,
    pub _pad: [u8; 5],
    pub code: [u8; bounds::SQL_CODE_MAX],
}

/// A grpc-go server stream met its handler: entry of `(*Server).handleStream`, on the
/// goroutine that runs the handler.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GoRpcStartEvent {
    pub hdr: EventHeader,
    pub goid: u64,
    pub span_id: u64,
    /// The span the goroutine had (0: none).
    pub parent_span: u64,
    /// The `*transport.Stream` (the key its end is found by).
    pub stream: u64,
    /// HTTP/2 stream id.
    pub stream_id: u32,
    /// 1: `flow` is the stream's connection (found through the transport's net.Conn).
    pub has_flow: u8,
    /// A server's: 1 when the call's metadata carried a valid `traceparent` (`trace_id`,
    /// `remote_span`, `trace_flags`).
    pub has_trace: u8,
    pub trace_flags: u8,
    pub _pad: u8,
    pub flow: FlowKey,
    pub trace_id: [u8; 16],
    pub remote_span: u64,
    /// `/package.Service/Method`.
    pub method: GoStr,
}

/// The stream's status was written: entry of `(*http2Server).WriteStatus`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GoRpcEndEvent {
    pub hdr: EventHeader,
    pub goid: u64,
    pub span_id: u64,
    /// The gRPC status code; -1: not readable.
    pub code: i64,
}

/// A Go net/http HTTP/2 stream met its handler: entry of `(*serverConn).runHandler`, on the
/// goroutine that runs the handler.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GoH2StartEvent {
    pub hdr: EventHeader,
    pub goid: u64,
    pub span_id: u64,
    /// The client span a traced client on this host offered for this stream (0: none).
    pub parent_span: u64,
    /// The kernel socket of the stream's connection (0: not found).
    pub sk: u64,
    pub content_length: i64,
    /// HTTP/2 stream id.
    pub stream_id: u32,
    /// 1: `flow` is the stream's connection.
    pub has_flow: u8,
    /// 1: the connection is TLS.
    pub tls: u8,
    /// 1: the request carried a valid `traceparent` (`trace_id`, `remote_span`,
    /// `trace_flags`).
    pub has_trace: u8,
    pub trace_flags: u8,
    pub flow: FlowKey,
    pub trace_id: [u8; 16],
    pub remote_span: u64,
    pub method: GoStr,
    pub path: GoStr,
    /// `:authority`.
    pub host: GoStr,
    pub remote_addr: GoStr,
}

/// The stream's handler returned: a RET of `runHandler`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GoH2EndEvent {
    pub hdr: EventHeader,
    pub goid: u64,
    pub span_id: u64,
    /// The status the handler wrote; 0: not known (the response state was already reused).
    pub status: i64,
    /// The ServeMux pattern that matched (Go 1.22-1.26: the request is an `*http.Request`).
    pub pattern: GoStr,
}

/// Value of `GO_H2`: a handler goroutine inside `runHandler` (key: GoroutineKey).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GoH2State {
    pub span_id: u64,
    /// The stream's `responseWriterState` and `stream`: its status is read at the end only
    /// while the state still belongs to the stream (the state is pooled).
    pub rws: u64,
    pub stream: u64,
    /// The request (an `*http.Request` in Go 1.21-1.26: its pattern is read at the end).
    pub req: u64,
    pub prev: GoroutineCtx,
}

/// Key of `GO_RPC`: a server stream of a process.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GoRpcKey {
    pub pid: u32,
    pub _pad: u32,
    pub stream: u64,
}

/// Value of `GO_RPC`: the stream's span and what its handler goroutine had before.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GoRpcState {
    pub span_id: u64,
    pub goid: u64,
    pub prev: GoroutineCtx,
}

/// Value of `GO_SQL`: a goroutine inside a database/sql call.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GoSqlState {
    pub span_id: u64,
    pub kind: u8,
    pub _pad: [u8; 5],
    /// The server of the first connection the call wrote to, set by the socket hooks
    /// (`server_port` 0: none yet).
    pub server_port: u16,
    pub server_addr: [u8; 16],
    pub prev: GoroutineCtx,
}

/// Per-request state of the handler probe mode, keyed by (pid, g).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GoRequestKey {
    pub pid: u32,
    pub _pad: u32,
    pub goroutine: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GoRequestState {
    pub start_ns: u64,
    pub request: u64,
    pub response: u64,
    /// 1: the socket's request this handler serves was shed (SHED): no record.
    pub shed: u64,
}

/// Offsets into Go runtime and net/http structures of one executable, from its DWARF (or,
/// later, a generated table). `u16::MAX`/`NONE` marks a field the version does not have.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GoOffsets {
    /// g pointer location relative to the thread pointer (fsbase), usually -8.
    pub tls_g: i64,
    /// Addresses of the runtime type descriptors of `*net.TCPConn`, `*crypto/tls.Conn` and
    /// `*net/http.response` (load bias applied; 0: unknown). An interface value holds one
    /// of these when its itab's type (itab + 8) equals it.
    pub type_tcpconn: u64,
    pub type_tlsconn: u64,
    pub type_response: u64,
    /// `*bufio.Writer` (traceparent injection writes only into one of these).
    pub type_bufio_writer: u64,
    pub g_goid: u16,
    pub conn_rwc: u16,
    pub conn_curreq: u16,
    pub response_req: u16,
    pub response_status: u16,
    pub response_conn: u16,
    pub request_method: u16,
    pub request_url: u16,
    pub request_proto: u16,
    pub request_content_length: u16,
    pub request_host: u16,
    pub request_remote_addr: u16,
    /// `Request.Pattern` (Go 1.23+).
    pub request_pattern: u16,
    /// `Request.pat` (Go 1.22 and later) and `pattern.str`.
    pub request_pat: u16,
    pub pattern_str: u16,
    pub url_path: u16,
    /// `net.TCPConn` -> `conn.fd` (*netFD), `netFD.pfd` + `poll.FD.Sysfd`.
    pub tcpconn_fd: u16,
    pub netfd_sysfd: u16,
    /// `tls.Conn.conn` (net.Conn interface).
    pub tlsconn_conn: u16,
    /// `g.parentGoid`: the goid of the goroutine that spawned g (Go 1.21+).
    pub g_parent_goid: u16,
    /// `sudog.g`: the goroutine waiting on a channel with this sudog.
    pub sudog_g: u16,
    /// `hchan.dataqsiz`: a channel's buffer capacity (0: unbuffered).
    pub hchan_dataqsiz: u16,
    /// `url.URL.Scheme` and `url.URL.Host` (client spans).
    pub url_scheme: u16,
    pub url_host: u16,
    /// `http.Response.StatusCode` (client spans).
    pub resp_status_code: u16,
    /// `tls.Conn.input` (a bytes.Reader over the decrypted record): the agent finds the
    /// register holding c at the plaintext copy by it.
    pub tlsconn_input: u16,
    /// `bufio.Writer.buf` / `.n` and `http.Request.Header` (traceparent injection).
    pub bufw_buf: u16,
    pub bufw_n: u16,
    pub request_header: u16,
    /// Go maps, to see whether a request's Header already has a traceparent: Swiss-table
    /// maps (Go 1.24+) `maps.Map.dirPtr` / `.dirLen`; older ones `hmap.B` / `.buckets`.
    pub map_dirptr: u16,
    pub map_dirlen: u16,
    pub hmap_b: u16,
    pub hmap_buckets: u16,
    /// HTTP/2 server (net/http's own: `http2` in 1.21-1.26, `internal/http2` from 1.27):
    /// `responseWriter.rws`, `responseWriterState.stream` / `.status`, `stream.id`,
    /// `serverConn.conn` (net.Conn).
    pub h2_rw_rws: u16,
    pub h2_rws_stream: u16,
    pub h2_rws_status: u16,
    pub h2_stream_id: u16,
    pub h2_sc_conn: u16,
    /// The handler's request: `*http.Request` up to 1.26 (the Request offsets), the
    /// package's own `ServerRequest` from 1.27.
    pub h2_req_method: u16,
    pub h2_req_url: u16,
    pub h2_req_host: u16,
    pub h2_req_remote_addr: u16,
    pub h2_req_content_length: u16,
    /// 1: the request is an `*http.Request` (its route pattern is readable), 0: not.
    pub h2_req_http: u16,
    /// The request's Header map (`map[string][]string`).
    pub h2_req_header: u16,
    pub _pad: [u16; 3],
}

impl GoOffsets {
    pub const NONE: u16 = u16::MAX;
}

/// Value of `TARGETS`: one traced process.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetConfig {
    pub flags: u32,
    /// Which register holds the `*tls.Conn` at the plaintext CALL in `(*tls.Conn).Read`
    /// (an index into the agent's `disasm::GPR_ORDER`), found by decoding; NO_REG: none.
    pub tls_c_reg: u32,
    pub go: GoOffsets,
    /// database/sql: the runtime type of the driver's error (load bias applied; 0: no
    /// driver known), and where the code string (Go string header) lies in its value.
    pub sql_error_type: u64,
    pub sql_error_code: u32,
    /// The driver's database (`sql_system`), put on every SQL start record.
    pub sql_system: u32,
    /// grpc-go: offsets of `transport.Stream`'s `id` and `method`, and of `Code` in the
    /// status proto (`spb.Status`); NO_OFFSET when the program's grpc is not understood.
    pub grpc_stream_id: u32,
    pub grpc_stream_method: u32,
    pub grpc_status_code: u32,
    /// Offset of `http2Server.conn` (the connection's net.Conn).
    pub grpc_server_conn: u32,
    /// The runtime type of `*transport.http2Server` (load bias applied): streams of other
    /// transports (grpc's ServeHTTP) are not followed, their status goes elsewhere.
    pub grpc_transport_type: u64,
    /// grpc-go clients: `Stream.ct` (the ClientTransport interface), `http2Client.conn`,
    /// `clientStream.attempt`, `csAttempt.s`; NO_OFFSET when not understood.
    pub grpc_stream_ct: u32,
    pub grpc_client_conn: u32,
    pub grpc_cs_attempt: u32,
    pub grpc_attempt_stream: u32,
    /// `Stream.ctx` (a server stream's context: the metadata's valueCtx), NO_OFFSET: not
    /// read.
    pub grpc_stream_ctx: u32,
    pub _pad2: u32,
    /// golang.org/x/net/http2's server (h2c): `responseWriter.rws`,
    /// `responseWriterState.stream` / `.status`, `stream.id`, `serverConn.conn` (its
    /// request is an `*http.Request`: GoOffsets' Request offsets); NONE in [0]: not hooked.
    pub xnet_h2: [u16; 5],
    pub _pad3: [u16; 3],
    /// The runtime type of `*internal/status.Error` (load bias applied): an RPC error that
    /// carries a status (`Error.s` -> `Status.s` -> the proto's Code).
    pub grpc_error_type: u64,
}

impl TargetConfig {
    pub const NO_REG: u32 = u32::MAX;
    pub const NO_OFFSET: u32 = u32::MAX;

    /// A process that is not Go: sockets only.
    pub fn native() -> Self {
        TargetConfig {
            flags: 0,
            tls_c_reg: Self::NO_REG,
            go: GoOffsets::default(),
            sql_error_type: 0,
            sql_error_code: 0,
            sql_system: sql_system::NONE,
            grpc_stream_id: Self::NO_OFFSET,
            grpc_stream_method: Self::NO_OFFSET,
            grpc_status_code: Self::NO_OFFSET,
            grpc_server_conn: Self::NO_OFFSET,
            grpc_transport_type: 0,
            grpc_stream_ct: Self::NO_OFFSET,
            grpc_client_conn: Self::NO_OFFSET,
            grpc_cs_attempt: Self::NO_OFFSET,
            grpc_attempt_stream: Self::NO_OFFSET,
            grpc_stream_ctx: Self::NO_OFFSET,
            _pad2: 0,
            xnet_h2: [GoOffsets::NONE; 5],
            _pad3: [0; 3],
            grpc_error_type: 0,
        }
    }
}

pub mod target_flags {
    /// (no flag) A process that is not Go: sockets only, client requests followed there.
    /// The process is a Go program: read the goroutine from TLS.
    pub const GO: u32 = 1;
    /// Follow spans into goroutines the process spawns (newproc1 hook attached).
    pub const GO_SPAWN: u32 = 2;
    /// Follow spans over channels (runtime send/recv hooks attached).
    pub const GO_CHANNELS: u32 = 4;
}

/// Kernel structure offsets from /sys/kernel/btf/vmlinux, set once at load time.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub task_fsbase: u32,
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdtable_fd: u32,
    pub file_private_data: u32,
    pub socket_sk: u32,
    pub skc_family: u32,
    pub skc_daddr: u32,
    pub skc_rcv_saddr: u32,
    pub skc_dport: u32,
    pub skc_num: u32,
    pub skc_v6_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
    /// sock_common.skc_state: the TCP state (a socket already in CLOSE is not tracked).
    pub skc_state: u32,
    /// sock.sk_socket, socket_alloc.vfs_inode (the inode after the socket), inode.i_ino.
    pub sock_sk_socket: u32,
    pub socket_alloc_inode: u32,
    pub inode_ino: u32,
    /// msghdr.msg_iter.count: the bytes a sendmsg hands to TCP (all iovecs together).
    pub msghdr_iter_count: u32,
    /// tcp_sock.write_seq: the sequence number after the last byte queued to send (0: not
    /// known; then a send's retry cannot be told from a new send).
    pub tcp_write_seq: u32,
    /// The syscall hook set's way from a file descriptor to a TCP socket: fdtable.max_fds,
    /// file.f_inode, inode.i_mode, sock.sk_type and sock.sk_protocol.
    pub fdtable_max_fds: u32,
    pub file_inode: u32,
    pub inode_mode: u32,
    pub sk_type: u32,
    pub sk_protocol: u32,
    /// task_struct.stack: the task's kernel stack, whose top holds its saved user
    /// registers (CPU samples).
    pub task_stack: u32,
}

/// Value of `RECV_ARGS` (syscall hook set): a receive on a TCP socket in progress, keyed by
/// thread (pid_tgid): its socket, syscall number, second and third arguments and flags.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RecvArgs {
    pub sk: u64,
    pub nr: u64,
    pub a1: u64,
    pub a2: u64,
    pub flags: u64,
}

/// Load-time settings of the kernel programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Bytes of each request head to capture (<= REQ_CAPTURE_MAX).
    pub req_capture: u32,
    pub abi_version: u32,
    /// `settings_flags` bits.
    pub flags: u32,
    /// The agent's sampler (`sampler_mode`), for the sampled flag of injected traceparents.
    pub sampler: u32,
    /// RATIO: a trace is sampled when the last 8 bytes of its id (big endian), shifted
    /// right by one, are below this (the OpenTelemetry SDKs' TraceIdRatioBased rule).
    pub ratio_bound: u64,
}

/// The OpenTelemetry SDKs' TraceIdRatioBased rule: trace `t` is kept when the last 8 bytes
/// of its id (big endian), shifted right by one, are below `bound` (ratio x 2^63). The
/// agent's sampler and the kernel's injected sampled flags both decide with this.
#[inline(always)]
pub fn trace_id_ratio_keeps(t: &[u8; 16], bound: u64) -> bool {
    let low = u64::from_be_bytes([t[8], t[9], t[10], t[11], t[12], t[13], t[14], t[15]]);
    (low >> 1) < bound
}

/// Load shedding (SHED[0], written by the agent's guard): shift `k` keeps 1 in 2^k of the
/// server requests that start from now on (each drawn at random, in every traced process
/// alike); KEEP_NONE and above keep none.
pub mod shed {
    pub const KEEP_NONE: u32 = 32;

    /// Whether a request that starts with random number `r` is kept at shift `k`.
    #[inline(always)]
    pub fn keeps(k: u32, r: u32) -> bool {
        k == 0 || k < KEEP_NONE && r & ((1u32 << k) - 1) == 0
    }
}

/// `Settings::sampler`: the rule for traces that start here, plus PARENT_BASED when an
/// incoming traceparent's sampled flag decides its trace instead.
pub mod sampler_mode {
    pub const ALWAYS_ON: u32 = 0;
    pub const ALWAYS_OFF: u32 = 1;
    pub const RATIO: u32 = 2;
    pub const PARENT_BASED: u32 = 0x10;
}

/// Value of `SPAN_TRACE` (injection on): the trace a span belongs to, and whether the
/// agent's sampler keeps it (the flag an injected traceparent carries).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceCtx {
    pub trace_id: [u8; 16],
    pub sampled: u8,
    pub _pad: [u8; 7],
}

pub mod settings_flags {
    /// `--inject-traceparent` (on or dry-run): the kernel keeps each span's trace id
    /// (SPAN_TRACE) and decides, per outgoing Go request, the traceparent it carries.
    pub const INJECT: u32 = 1;
    /// ... and writes it (not in dry-run). Read from frozen .rodata: when clear, the
    /// verifier drops the write as dead code, so dry-run loads even under kernel lockdown.
    pub const INJECT_WRITE: u32 = 2;
    /// Linux 7.0+: the programs with twins (socket-btf receive and send, the exec watch) mark
    /// each event they handle in RUN_MARK, and their twins (attached after them) handle the
    /// events they were skipped for.
    pub const RUN_TWINS: u32 = 4;
}

/// RUN_MARK's entries (a thread's slot is its id modulo this).
pub const RUN_MARK_SLOTS: u32 = 1 << 16;

/// What `--inject-traceparent` did for one outgoing request (`TraceparentEvent::outcome`).
pub mod inject_outcome {
    pub const WRITTEN: u8 = 1;
    /// Decided and checked, not written (`--inject-traceparent=dry-run`).
    pub const DRY_RUN: u8 = 2;
    /// The request has its own traceparent header.
    pub const OWN_HEADER: u8 = 3;
    /// The writer's buffer has no room for the line.
    pub const NO_ROOM: u8 = 4;
    /// Not checkable: Header map too big to read here, writer not a bufio.Writer, or the
    /// span's trace unknown.
    pub const UNCHECKED: u8 = 5;
    /// Writing into the target failed (nothing changed).
    pub const FAILED: u8 = 6;
}

/// `--inject-traceparent`: the decision for a client span's request.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TraceparentEvent {
    pub hdr: EventHeader,
    pub span_id: u64,
    pub trace_id: [u8; 16],
    pub outcome: u8,
    /// The sampled flag the header carries (`-01` or `-00`).
    pub sampled: u8,
    pub _pad: [u8; 6],
}

impl Default for Settings {
    fn default() -> Self {
        Self { req_capture: 1024, abi_version: ABI_VERSION, flags: 0, sampler: sampler_mode::ALWAYS_ON, ratio_bound: 0 }
    }
}

macro_rules! assert_size {
    ($t:ty, $n:expr) => {
        const _: () = assert!(core::mem::size_of::<$t>() == $n);
    };
}
assert_size!(EventHeader, 24);
assert_size!(CpuSampleEvent, 24 + 6 * 8 + 16 + 8 * (bounds::KSTACK_MAX + bounds::USTACK_MAX));
assert_size!(ConnKey, 8);
assert_size!(ListenKey, 8);
assert_size!(ConnState, 184);
assert_size!(FlowKey, 40);
assert_size!(ClientLink, 16);
assert_size!(GoroutineKey, 16);
assert_size!(SlotKey, 16);
assert_size!(GoroutineCtx, 24);
assert_size!(GoClientState, 40);
assert_size!(GoClientRequestEvent, 64 + 4 * 136);
assert_size!(GoClientResponseEvent, 56);
assert_size!(GoSqlStartEvent, 24 + 48 + 1024);
assert_size!(GoSqlState, 56);
assert_size!(GoSqlEndEvent, 24 + 24 + 24 + bounds::SQL_CODE_MAX);
assert_size!(SockAddrs, 40);
assert_size!(TraceparentEvent, 56);
assert_size!(ProcExecEvent, 24);
assert_size!(ConnOpenEvent, 88);
assert_size!(ConnCloseEvent, 40);
assert_size!(SockBytesEvent, 56);
assert_size!(HttpRequestEvent, 112);
assert_size!(PipelinedRequestEvent, 112);
assert_size!(H2BytesEvent, 112);
/// The capture writer fills these through HttpRequestEvent's fields.
macro_rules! assert_same_place {
    ($t:ty, $($a:ident = $b:ident),*) => {
        $(const _: () = assert!(core::mem::offset_of!($t, $a) == core::mem::offset_of!(HttpRequestEvent, $b));)*
    };
}
assert_same_place!(
    PipelinedRequestEvent,
    conn_id = conn_id,
    pattern_ptr = goroutine,
    pattern_len = goid,
    start_ns = start_ns,
    seq = seq,
    read_len = read_len,
    captured = captured,
    offset = offset,
    span_id = span_id,
    trace_id = trace_id,
    trace_origin = trace_origin
);
assert_same_place!(H2BytesEvent, conn_id = conn_id, ts_ns = start_ns, start = seq, total = read_len, captured = captured, offset = offset, last = tls);
assert_size!(HttpResponseEvent, 88);
assert_size!(GoStr, 136);
assert_size!(GoServerRequestEvent, 24 + 56 + 6 * 136);
assert_size!(GoOffsets, 40 + 48 * 2);
assert_size!(TargetConfig, 8 + 136 + 16 + 16 + 8 + 16 + 8 + 16 + 8);
assert_size!(GoH2StartEvent, 24 + 48 + 40 + 24 + 4 * 136);
assert_size!(GoH2EndEvent, 48 + 136);
assert_size!(GoH2State, 32 + 24);
assert_size!(GoRpcStartEvent, 24 + 40 + 40 + 24 + 8 + bounds::GO_STR_MAX);
assert_size!(GoRpcEndEvent, 48);
assert_size!(GoRpcKey, 16);
assert_size!(GoRpcState, 16 + 24);
assert_size!(KernelOffsets, 100);
assert_size!(Settings, 24);
assert_size!(TraceCtx, 24);
assert_size!(RecvArgs, 40);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)], made of integers and byte arrays with explicit
    // padding, so every bit pattern is valid.
    unsafe impl aya::Pod for ConnKey {}
    unsafe impl aya::Pod for ListenKey {}
    unsafe impl aya::Pod for ConnState {}
    unsafe impl aya::Pod for TargetConfig {}
    unsafe impl aya::Pod for KernelOffsets {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for GoRequestKey {}
    unsafe impl aya::Pod for GoRequestState {}
    unsafe impl aya::Pod for GoroutineKey {}
    unsafe impl aya::Pod for SlotKey {}
    unsafe impl aya::Pod for GoroutineCtx {}
    unsafe impl aya::Pod for GoClientState {}
    unsafe impl aya::Pod for GoSqlState {}
    unsafe impl aya::Pod for GoH2State {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for ClientLink {}
    unsafe impl aya::Pod for RecvArgs {}
    unsafe impl aya::Pod for TraceCtx {}
}
