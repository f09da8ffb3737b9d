//! Ring-buffer records decoded into typed events. Records are `#[repr(C)]` structs from
//! zerotrace_common; a record that is short, of unknown kind or of the wrong size is an
//! error that is counted, never a panic.
pub mod reader;
pub mod recording;

use std::net::{IpAddr, Ipv6Addr};

use zerotrace_common::{
    ConnCloseEvent, ConnOpenEvent, CpuSampleEvent, EventHeader, EventKind, FlowKey, GoClientRequestEvent, GoClientResponseEvent, GoH2EndEvent, GoH2StartEvent,
    GoRpcEndEvent, GoRpcStartEvent, GoServerRequestEvent, GoSqlEndEvent, GoSqlStartEvent, GoStr, H2BytesEvent, HttpRequestEvent, HttpResponseEvent,
    PipelinedRequestEvent, ProcExecEvent, SockAddrs, SockBytesEvent, TraceparentEvent, bounds, h2_start,
};

use crate::spans::{RemoteParent, SpanId, TraceId};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: IpAddr,
    pub port: u16,
}

/// Local and peer address of a socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Addrs {
    pub local: Endpoint,
    pub peer: Endpoint,
}

impl Addrs {
    pub fn from_raw(a: &SockAddrs) -> Self {
        Addrs { local: Endpoint { addr: ip(a.local_addr), port: a.local_port }, peer: Endpoint { addr: ip(a.peer_addr), port: a.peer_port } }
    }
}

/// IPv4-mapped addresses are shown as IPv4.
fn ip(raw: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(raw);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    ConnOpen {
        pid: u32,
        ts: u64,
        conn_id: u64,
        sk: u64,
        role: u8,
        addrs: Addrs,
    },
    ConnClose {
        pid: u32,
        ts: u64,
        conn_id: u64,
        sk: u64,
    },
    HttpRequest(HttpRequest),
    HttpResponse(HttpResponse),
    GoServerRequest(Box<GoServerRequest>),
    GoClientRequest(Box<GoClientRequest>),
    GoClientResponse(GoClientResponse),
    GoSqlStart(Box<GoSqlStart>),
    GoSqlEnd(GoSqlEnd),
    GoRpcStart(Box<GoRpcStart>),
    GoRpcEnd(GoRpcEnd),
    GoH2Start(Box<GoH2Start>),
    GoH2End(Box<GoH2End>),
    Traceparent(Traceparent),
    /// A process exec'd (discovery): the agent decides whether to trace it.
    ProcExec {
        pid: u32,
    },
    /// A native (not Go) client's request bytes (`offset` 0: a new request) and the first
    /// bytes of its response (`start_ns`: the read), as HttpRequest.
    SockClientRequest(HttpRequest),
    SockClientResponse(HttpRequest),
    /// A later read of a native client's response.
    SockClientRecv(SockBytes),
    /// A native server's response: its first bytes (`start_ns`: the send; `read_len`: the
    /// bytes of that send), as HttpRequest.
    SockServerResponse(HttpRequest),
    /// A later send of a native server's response.
    SockServerSend(SockBytes),
    /// A server's response head that answers a pipelined request (no read started it).
    SockServerPipelined(PipelinedRequest),
    /// HTTP/2 bytes read or sent on a native process's connection.
    SockH2(H2Bytes),
    /// A CPU sample of a selected process.
    CpuSample(Box<CpuSample>),
}

/// One CPU sample: Go samples carry frame-pointer user frames (`ustack`), others a copy of
/// the user stack (`stack`, from `stack_base`) to unwind.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuSample {
    /// A program that is not Go (its stack is in `stack`, not `ustack`).
    pub native: bool,
    pub pid: u32,
    pub tid: u32,
    pub ts_ns: u64,
    pub cpu: u32,
    pub goid: u64,
    pub span_id: u64,
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
    pub kstack: Vec<u64>,
    pub ustack: Vec<u64>,
    pub stack_base: u64,
    pub stack: Vec<u8>,
}

/// One read or send on an HTTP/2 connection of a native process: its first bytes and how
/// many there were (the rest were not captured).
#[derive(Clone, Debug, PartialEq)]
pub struct H2Bytes {
    pub pid: u32,
    pub tid: u32,
    pub ts: u64,
    pub conn_id: u64,
    /// The process sent them (else it read them).
    pub sent: bool,
    pub total: u32,
    /// Where `bytes` start among them (a syscall's bytes come in pieces), and whether this
    /// is the syscall's last piece (the rest of `total` was not captured).
    pub offset: u32,
    pub last: bool,
    /// The connection was open before the agent: its first bytes seen were not the preface.
    pub joined: bool,
    pub bytes: Vec<u8>,
}

/// Bytes of a response moved (a native client's read, a native server's send): how many,
/// and the last of them.
#[derive(Clone, Debug, PartialEq)]
pub struct SockBytes {
    pub pid: u32,
    pub ts: u64,
    pub conn_id: u64,
    pub seq: u32,
    pub len: u32,
    /// The read's last bytes (at most 8).
    pub tail: Vec<u8>,
}

/// `--inject-traceparent`: what the kernel decided for a client span's request.
#[derive(Clone, Debug, PartialEq)]
pub struct Traceparent {
    pub pid: u32,
    pub span_id: u64,
    /// The trace the header names (the kernel's; zero when it did not know one).
    pub trace_id: [u8; 16],
    /// zerotrace_common::inject_outcome.
    pub outcome: u8,
    /// The sampled flag the header carries.
    pub sampled: bool,
}

/// A database/sql call started (queryDC/execDC or Stmt.QueryContext/ExecContext entry).
#[derive(Clone, Debug, PartialEq)]
pub struct GoSqlStart {
    pub pid: u32,
    pub tid: u32,
    pub goid: u64,
    pub start_ns: u64,
    pub span_id: u64,
    pub parent_span: u64,
    pub exec: bool,
    /// A prepared statement's call.
    pub prepared: bool,
    /// The driver's database (zerotrace_common::sql_system).
    pub system: u8,
    /// The statement's text as the kernel read it (None: not readable there).
    pub text: Option<String>,
    /// Where the text is in the target, and its full length.
    pub text_ptr: u64,
    pub text_len: u32,
}

/// A grpc-go server stream met its handler, or a client stream was made.
#[derive(Clone, Debug, PartialEq)]
pub struct GoRpcStart {
    pub pid: u32,
    pub tid: u32,
    pub goid: u64,
    pub start_ns: u64,
    pub span_id: u64,
    /// A client's stream (its RPC's CLIENT span), else a server's.
    pub client: bool,
    /// A client's: the span of the goroutine that made it (0: none).
    pub parent_span: u64,
    /// A server's: the `traceparent` of the call's metadata.
    pub trace: Option<RemoteParent>,
    /// Without one: the trace the kernel gave the span (its parent's, else new; 0: none).
    pub kernel_trace: [u8; 16],
    pub stream_id: u32,
    /// The connection: (client, server), when the kernel found it.
    pub flow: Option<(std::net::SocketAddr, std::net::SocketAddr)>,
    /// `/package.Service/Method` as the client sent it (cut at GO_STR_MAX).
    pub method: String,
}

/// A Go net/http HTTP/2 stream met its handler.
#[derive(Clone, Debug, PartialEq)]
pub struct GoH2Start {
    pub pid: u32,
    pub tid: u32,
    pub goid: u64,
    pub start_ns: u64,
    pub span_id: u64,
    /// The client span a traced client on this host offered for the stream (0: none).
    pub parent_span: u64,
    /// The request's `traceparent`.
    pub trace: Option<RemoteParent>,
    /// Without one: the trace the kernel gave the span (its linked client's, else new).
    pub kernel_trace: [u8; 16],
    pub sk: u64,
    pub stream_id: u32,
    /// The connection: (client, server), when the kernel found it.
    pub flow: Option<(std::net::SocketAddr, std::net::SocketAddr)>,
    pub tls: bool,
    pub content_length: i64,
    pub method: String,
    pub path: String,
    pub host: String,
    pub remote_addr: String,
}

/// Its handler returned.
#[derive(Clone, Debug, PartialEq)]
pub struct GoH2End {
    pub pid: u32,
    pub end_ns: u64,
    pub span_id: u64,
    /// The status written (None: not known).
    pub status: Option<i64>,
    pub pattern: String,
}

/// Its status was written.
#[derive(Clone, Debug, PartialEq)]
pub struct GoRpcEnd {
    pub pid: u32,
    pub end_ns: u64,
    pub span_id: u64,
    /// The gRPC status code (None: not readable).
    pub code: Option<i64>,
}

/// A database/sql call returned.
#[derive(Clone, Debug, PartialEq)]
pub struct GoSqlEnd {
    pub pid: u32,
    pub end_ns: u64,
    pub span_id: u64,
    /// It returned an error.
    pub failed: bool,
    /// The server of the connection it wrote to, when the socket hooks saw one.
    pub server: Option<Endpoint>,
    /// The driver's error code (SQLSTATE), as the program holds it (not yet checked).
    pub code: Option<String>,
}

/// A Go HTTP client call started (Transport.roundTrip entry).
#[derive(Clone, Debug, PartialEq)]
pub struct GoClientRequest {
    pub pid: u32,
    pub tid: u32,
    pub goid: u64,
    pub start_ns: u64,
    pub span_id: u64,
    /// The span active in the calling goroutine (0: none).
    pub parent_span: u64,
    /// The kernel's trace id for the call (used when it starts a trace).
    pub trace_id: [u8; 16],
    pub method: String,
    pub scheme: String,
    pub host: String,
    pub path: String,
}

/// The Go HTTP client call returned.
#[derive(Clone, Debug, PartialEq)]
pub struct GoClientResponse {
    pub pid: u32,
    pub end_ns: u64,
    pub span_id: u64,
    pub status: i64,
    /// The call returned an error (transport failure).
    pub failed: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct HttpRequest {
    pub pid: u32,
    pub tid: u32,
    pub conn_id: u64,
    pub seq: u32,
    pub goroutine: u64,
    pub goid: u64,
    pub start_ns: u64,
    pub read_len: u32,
    /// Bytes of this request captured before these (0: the request's first record).
    pub offset: u32,
    /// The server span's id (kernel-made), and the same-host client span that sent the
    /// request (0: none).
    pub span_id: u64,
    pub link_span: u64,
    /// The kernel's trace id for the span (used when it starts a trace; zero: none).
    pub trace_id: [u8; 16],
    /// Read in plaintext from a TLS connection.
    pub tls: bool,
    /// zerotrace_common::trace_origin of `trace_id`.
    pub trace_origin: u8,
    pub head: Vec<u8>,
}

/// A server sent the head of a response no read started (`head`, of `read_len` bytes sent
/// at `start_ns`): the answer to a request that came pipelined behind another. `seq`,
/// `span_id` and the trace are the new request's.
#[derive(Clone, Debug, PartialEq)]
pub struct PipelinedRequest {
    pub pid: u32,
    pub tid: u32,
    pub conn_id: u64,
    pub seq: u32,
    pub start_ns: u64,
    pub read_len: u32,
    pub span_id: u64,
    pub trace_id: [u8; 16],
    pub trace_origin: u8,
    /// Go: where the route pattern of the request answered is in the target (0: none).
    pub pattern_ptr: u64,
    pub pattern_len: u16,
    pub head: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct HttpResponse {
    pub pid: u32,
    pub tid: u32,
    pub conn_id: u64,
    pub seq: u32,
    pub resp_start_ns: u64,
    pub end_ns: u64,
    pub bytes_in: u64,
    pub closed: bool,
    /// The first bytes of the response (status line), `status_len` of them valid.
    pub status_line: [u8; 16],
    pub status_len: u8,
    /// Go: where the route pattern string is in the target (0: none).
    pub pattern_ptr: u64,
    pub pattern_len: u16,
}

#[derive(Clone, Debug, PartialEq)]
pub struct GoServerRequest {
    pub pid: u32,
    pub tid: u32,
    pub goroutine: u64,
    pub goid: u64,
    pub start_ns: u64,
    pub end_ns: u64,
    pub content_length: i64,
    pub status: i64,
    /// Kernel socket of the request's connection, 0 if unknown.
    pub sk: u64,
    pub method: String,
    pub path: String,
    pub pattern: String,
    pub host: String,
    pub remote_addr: String,
    pub proto: String,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("record kind {0} is unknown")]
    UnknownKind(u16),
    #[error("record kind {kind:?}: {got} bytes, expected {want}")]
    Size { kind: EventKind, got: usize, want: usize },
}

/// Reads a `T` from the start of `b` (records are not aligned for T in the ring).
fn read<T: Copy>(b: &[u8]) -> T {
    debug_assert!(b.len() >= std::mem::size_of::<T>());
    // SAFETY: length checked by every caller; T is a repr(C) POD from zerotrace_common.
    unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<T>()) }
}

/// GoRpcStartEvent as ABI 9 wrote it (record kind GoRpcStart).
#[repr(C)]
#[derive(Clone, Copy)]
struct GoRpcStartEventV9 {
    hdr: EventHeader,
    goid: u64,
    span_id: u64,
    parent_span: u64,
    stream: u64,
    stream_id: u32,
    has_flow: u32,
    flow: FlowKey,
    method: GoStr,
}

/// A record's connection as (client, server), when it has one.
fn flow_of(has: bool, f: &FlowKey) -> Option<(std::net::SocketAddr, std::net::SocketAddr)> {
    has.then(|| (std::net::SocketAddr::new(ip(f.client_addr), f.client_port), std::net::SocketAddr::new(ip(f.server_addr), f.server_port)))
}

/// A kernel-read `traceparent` (`has` 1), as the agent's parse would give it.
fn remote_parent(has: u8, trace_id: [u8; 16], span: u64, flags: u8) -> Option<RemoteParent> {
    (has != 0).then(|| RemoteParent { trace_id: TraceId(trace_id), span_id: SpanId(span.to_be_bytes()), sampled: flags & 1 != 0, trace_state: None })
}

fn exact<T: Copy>(b: &[u8], kind: EventKind) -> Result<T, DecodeError> {
    let want = std::mem::size_of::<T>();
    if b.len() < want {
        return Err(DecodeError::Size { kind, got: b.len(), want });
    }
    Ok(read::<T>(b))
}

/// The `n` captured bytes that follow a capture record's header (all three capture
/// records have HttpRequestEvent's size).
fn captured(b: &[u8], kind: EventKind, n: u32) -> Result<Vec<u8>, DecodeError> {
    let start = std::mem::size_of::<HttpRequestEvent>();
    let end = start + n as usize;
    b.get(start..end).map(<[u8]>::to_vec).ok_or(DecodeError::Size { kind, got: b.len(), want: end })
}

fn go_str(s: &GoStr) -> String {
    let kept = (s.kept as usize).min(s.buf.len());
    String::from_utf8_lossy(&s.buf[..kept]).into_owned()
}

pub fn decode(b: &[u8]) -> Result<Event, DecodeError> {
    if b.len() < std::mem::size_of::<EventHeader>() {
        return Err(DecodeError::Short(b.len()));
    }
    let hdr: EventHeader = read(b);
    let kind = EventKind::from_u16(hdr.kind).ok_or(DecodeError::UnknownKind(hdr.kind))?;
    Ok(match kind {
        EventKind::ConnOpen => {
            let e: ConnOpenEvent = exact(b, kind)?;
            Event::ConnOpen { pid: hdr.pid, ts: hdr.ts_ns, conn_id: e.conn_id, sk: e.sk, role: e.role, addrs: Addrs::from_raw(&e.addrs) }
        }
        EventKind::ConnClose => {
            let e: ConnCloseEvent = exact(b, kind)?;
            Event::ConnClose { pid: hdr.pid, ts: hdr.ts_ns, conn_id: e.conn_id, sk: e.sk }
        }
        EventKind::HttpRequest | EventKind::SockClientRequest | EventKind::SockClientResponse | EventKind::SockServerResponse => {
            let e: HttpRequestEvent = exact(b, kind)?;
            let head = captured(b, kind, e.captured)?;
            let r = HttpRequest {
                pid: hdr.pid,
                tid: hdr.tid,
                conn_id: e.conn_id,
                seq: e.seq,
                goroutine: e.goroutine,
                goid: e.goid,
                start_ns: e.start_ns,
                read_len: e.read_len,
                offset: e.offset,
                span_id: e.span_id,
                link_span: e.link_span,
                trace_id: e.trace_id,
                tls: e.tls != 0,
                trace_origin: e.trace_origin,
                head,
            };
            match kind {
                EventKind::SockClientRequest => Event::SockClientRequest(r),
                EventKind::SockClientResponse => Event::SockClientResponse(r),
                EventKind::SockServerResponse => Event::SockServerResponse(r),
                _ => Event::HttpRequest(r),
            }
        }
        EventKind::SockServerPipelined => {
            let e: PipelinedRequestEvent = exact(b, kind)?;
            Event::SockServerPipelined(PipelinedRequest {
                pid: hdr.pid,
                tid: hdr.tid,
                conn_id: e.conn_id,
                seq: e.seq,
                start_ns: e.start_ns,
                read_len: e.read_len,
                span_id: e.span_id,
                trace_id: e.trace_id,
                trace_origin: e.trace_origin,
                pattern_ptr: e.pattern_ptr,
                pattern_len: e.pattern_len.min(u64::from(u16::MAX)) as u16,
                head: captured(b, kind, e.captured)?,
            })
        }
        EventKind::SockH2Recv | EventKind::SockH2Send => {
            let e: H2BytesEvent = exact(b, kind)?;
            Event::SockH2(H2Bytes {
                pid: hdr.pid,
                tid: hdr.tid,
                ts: e.ts_ns,
                conn_id: e.conn_id,
                sent: kind == EventKind::SockH2Send,
                total: e.total,
                offset: e.offset,
                last: e.last != 0,
                joined: e.start == u32::from(h2_start::JOINED),
                bytes: captured(b, kind, e.captured)?,
            })
        }
        EventKind::SockClientRecv | EventKind::SockServerSend => {
            let e: SockBytesEvent = exact(b, kind)?;
            let n = (e.tail_len as usize).min(e.tail.len());
            let bytes = SockBytes { pid: hdr.pid, ts: hdr.ts_ns, conn_id: e.conn_id, seq: e.seq, len: e.len, tail: e.tail[..n].to_vec() };
            if kind == EventKind::SockServerSend { Event::SockServerSend(bytes) } else { Event::SockClientRecv(bytes) }
        }
        EventKind::HttpResponse => {
            let e: HttpResponseEvent = exact(b, kind)?;
            let sl = (e.status_len as usize).min(e.status.len());
            Event::HttpResponse(HttpResponse {
                pid: hdr.pid,
                tid: hdr.tid,
                conn_id: e.conn_id,
                seq: e.seq,
                resp_start_ns: e.resp_start_ns,
                end_ns: e.end_ns,
                bytes_in: e.bytes_in,
                closed: e.closed != 0,
                status_line: e.status,
                status_len: sl as u8,
                pattern_ptr: e.pattern_ptr,
                pattern_len: e.pattern_len,
            })
        }
        EventKind::GoServerRequest => {
            let e: GoServerRequestEvent = exact(b, kind)?;
            Event::GoServerRequest(Box::new(GoServerRequest {
                pid: hdr.pid,
                tid: hdr.tid,
                goroutine: e.goroutine,
                goid: e.goid,
                start_ns: e.start_ns,
                end_ns: e.end_ns,
                content_length: e.content_length,
                status: e.status,
                sk: e.sk,
                method: go_str(&e.method),
                path: go_str(&e.path),
                pattern: go_str(&e.pattern),
                host: go_str(&e.host),
                remote_addr: go_str(&e.remote_addr),
                proto: go_str(&e.proto),
            }))
        }
        EventKind::GoClientRequest => {
            let e: GoClientRequestEvent = exact(b, kind)?;
            Event::GoClientRequest(Box::new(GoClientRequest {
                pid: hdr.pid,
                tid: hdr.tid,
                goid: e.goid,
                start_ns: hdr.ts_ns,
                span_id: e.span_id,
                parent_span: e.parent_span,
                trace_id: e.trace_id,
                method: go_str(&e.method),
                scheme: go_str(&e.scheme),
                host: go_str(&e.url_host),
                path: go_str(&e.path),
            }))
        }
        EventKind::GoSqlStart => {
            let e: GoSqlStartEvent = exact(b, kind)?;
            let kept = (e.kept as usize).min(e.text.len());
            Event::GoSqlStart(Box::new(GoSqlStart {
                pid: hdr.pid,
                tid: hdr.tid,
                goid: e.goid,
                start_ns: hdr.ts_ns,
                span_id: e.span_id,
                parent_span: e.parent_span,
                exec: e.kind == zerotrace_common::sql_kind::EXEC,
                prepared: e.prepared != 0,
                system: e.system,
                text: (kept > 0 || e.text_len == 0).then(|| String::from_utf8_lossy(&e.text[..kept]).into_owned()),
                text_ptr: e.text_ptr,
                text_len: e.text_len,
            }))
        }
        // Recordings before ABI 9: the HTTP client's end record (status 0).
        EventKind::GoSqlEnd => {
            let e: GoClientResponseEvent = exact(b, kind)?;
            Event::GoSqlEnd(GoSqlEnd { pid: hdr.pid, end_ns: hdr.ts_ns, span_id: e.span_id, failed: e.err_type != 0, server: None, code: None })
        }
        // Recordings of ABI 9: a server's, without traceparent.
        EventKind::GoRpcStart => {
            let e: GoRpcStartEventV9 = exact(b, kind)?;
            Event::GoRpcStart(Box::new(GoRpcStart {
                pid: hdr.pid,
                tid: hdr.tid,
                goid: e.goid,
                start_ns: hdr.ts_ns,
                span_id: e.span_id,
                client: false,
                parent_span: 0,
                trace: None,
                kernel_trace: [0; 16],
                stream_id: e.stream_id,
                flow: flow_of(e.has_flow != 0, &e.flow),
                method: go_str(&e.method),
            }))
        }
        EventKind::GoRpcServerStart | EventKind::GoRpcClientStart => {
            let e: GoRpcStartEvent = exact(b, kind)?;
            let client = kind == EventKind::GoRpcClientStart;
            Event::GoRpcStart(Box::new(GoRpcStart {
                pid: hdr.pid,
                tid: hdr.tid,
                goid: e.goid,
                start_ns: hdr.ts_ns,
                span_id: e.span_id,
                client,
                parent_span: if client { e.parent_span } else { 0 },
                trace: remote_parent(e.has_trace, e.trace_id, e.remote_span, e.trace_flags),
                kernel_trace: if e.has_trace == 0 { e.trace_id } else { [0; 16] },
                stream_id: e.stream_id,
                flow: flow_of(e.has_flow != 0, &e.flow),
                method: go_str(&e.method),
            }))
        }
        EventKind::GoRpcEnd => {
            let e: GoRpcEndEvent = exact(b, kind)?;
            Event::GoRpcEnd(GoRpcEnd { pid: hdr.pid, end_ns: hdr.ts_ns, span_id: e.span_id, code: (e.code >= 0).then_some(e.code) })
        }
        EventKind::GoH2Start => {
            let e: GoH2StartEvent = exact(b, kind)?;
            Event::GoH2Start(Box::new(GoH2Start {
                pid: hdr.pid,
                tid: hdr.tid,
                goid: e.goid,
                start_ns: hdr.ts_ns,
                span_id: e.span_id,
                parent_span: e.parent_span,
                trace: remote_parent(e.has_trace, e.trace_id, e.remote_span, e.trace_flags),
                kernel_trace: if e.has_trace == 0 { e.trace_id } else { [0; 16] },
                sk: e.sk,
                stream_id: e.stream_id,
                flow: flow_of(e.has_flow != 0, &e.flow),
                tls: e.tls != 0,
                content_length: e.content_length,
                method: go_str(&e.method),
                path: go_str(&e.path),
                host: go_str(&e.host),
                remote_addr: go_str(&e.remote_addr),
            }))
        }
        EventKind::GoH2End => {
            let e: GoH2EndEvent = exact(b, kind)?;
            Event::GoH2End(Box::new(GoH2End {
                pid: hdr.pid,
                end_ns: hdr.ts_ns,
                span_id: e.span_id,
                status: (e.status > 0).then_some(e.status),
                pattern: go_str(&e.pattern),
            }))
        }
        EventKind::GoSqlDone => {
            let e: GoSqlEndEvent = exact(b, kind)?;
            let code = &e.code[..(e.code_len as usize).min(e.code.len())];
            Event::GoSqlEnd(GoSqlEnd {
                pid: hdr.pid,
                end_ns: hdr.ts_ns,
                span_id: e.span_id,
                failed: e.err_type != 0,
                server: (e.server_port != 0).then(|| Endpoint { addr: ip(e.server_addr), port: e.server_port }),
                code: (!code.is_empty()).then(|| String::from_utf8_lossy(code).into_owned()),
            })
        }
        EventKind::ProcExec => {
            let _: ProcExecEvent = exact(b, kind)?;
            Event::ProcExec { pid: hdr.pid }
        }
        EventKind::Traceparent => {
            let e: TraceparentEvent = exact(b, kind)?;
            Event::Traceparent(Traceparent { pid: hdr.pid, span_id: e.span_id, trace_id: e.trace_id, outcome: e.outcome, sampled: e.sampled != 0 })
        }
        EventKind::GoClientResponse => Event::GoClientResponse(call_end(&hdr, &exact(b, kind)?)),
        EventKind::CpuSample | EventKind::CpuSampleNative => {
            let e: CpuSampleEvent = exact(b, kind)?;
            let frames = |v: &[u64], bytes: u32| v[..((bytes / 8) as usize).min(v.len())].to_vec();
            let stack = if kind == EventKind::CpuSampleNative {
                let start = std::mem::size_of::<CpuSampleEvent>();
                let want = start + std::mem::size_of::<[u8; bounds::STACK_PAGES * bounds::PAGE]>();
                if b.len() < want {
                    return Err(DecodeError::Size { kind, got: b.len(), want });
                }
                b[start..start + (e.stack_len as usize).min(bounds::STACK_PAGES * bounds::PAGE)].to_vec()
            } else {
                Vec::new()
            };
            Event::CpuSample(Box::new(CpuSample {
                native: kind == EventKind::CpuSampleNative,
                pid: hdr.pid,
                tid: hdr.tid,
                ts_ns: hdr.ts_ns,
                cpu: e.cpu,
                goid: e.goid,
                span_id: e.span_id,
                ip: e.ip,
                sp: e.sp,
                bp: e.bp,
                kstack: frames(&e.kstack, e.kstack_len),
                ustack: frames(&e.ustack, e.ustack_len),
                stack_base: e.stack_base,
                stack,
            }))
        }
    })
}

fn call_end(hdr: &EventHeader, e: &GoClientResponseEvent) -> GoClientResponse {
    GoClientResponse { pid: hdr.pid, end_ns: hdr.ts_ns, span_id: e.span_id, status: e.status, failed: e.err_type != 0 }
}

/// Encoders for recorded streams in tests: the exact bytes the kernel would send.
#[cfg(test)]
pub mod record {
    use zerotrace_common::*;

    fn bytes_of<T>(v: &T) -> Vec<u8> {
        // SAFETY: T is a repr(C) POD; we copy its bytes.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }.to_vec()
    }

    pub fn header(kind: EventKind, size: usize, pid: u32, ts: u64) -> EventHeader {
        EventHeader { kind: kind as u16, _pad: 0, size: size as u32, pid, tid: pid, ts_ns: ts }
    }

    pub fn conn_open(pid: u32, ts: u64, conn_id: u64, sk: u64, local: ([u8; 4], u16), peer: ([u8; 4], u16)) -> Vec<u8> {
        let m = |a: [u8; 4]| [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3]];
        let e = ConnOpenEvent {
            hdr: header(EventKind::ConnOpen, std::mem::size_of::<ConnOpenEvent>(), pid, ts),
            conn_id,
            sk,
            role: ConnRole::Server as u8,
            _pad: [0; 7],
            addrs: SockAddrs { local_addr: m(local.0), peer_addr: m(peer.0), local_port: local.1, peer_port: peer.1, family: 2, _pad: 0 },
        };
        bytes_of(&e)
    }

    pub fn conn_close(pid: u32, ts: u64, conn_id: u64, sk: u64) -> Vec<u8> {
        bytes_of(&ConnCloseEvent { hdr: header(EventKind::ConnClose, std::mem::size_of::<ConnCloseEvent>(), pid, ts), conn_id, sk })
    }

    pub fn request(pid: u32, ts: u64, conn_id: u64, seq: u32, goroutine: u64, head: &[u8]) -> Vec<u8> {
        request_part(pid, ts, conn_id, seq, goroutine, head, 0)
    }

    /// A record carrying bytes of request `seq` after the first `offset` ones.
    pub fn request_part(pid: u32, ts: u64, conn_id: u64, seq: u32, goroutine: u64, head: &[u8], offset: u32) -> Vec<u8> {
        let e = HttpRequestEvent {
            hdr: header(EventKind::HttpRequest, std::mem::size_of::<HttpRequestEvent>() + head.len(), pid, ts),
            conn_id,
            goroutine,
            goid: goroutine / 8,
            start_ns: ts,
            seq,
            read_len: head.len() as u32,
            captured: head.len() as u32,
            offset,
            span_id: 0,
            link_span: 0,
            trace_id: [0; 16],
            tls: 0,
            trace_origin: 0,
            _pad: [0; 6],
        };
        let mut v = bytes_of(&e);
        v.extend_from_slice(head);
        v
    }

    /// A record of the HttpRequestEvent layout of any `kind` (native client/server bytes):
    /// `head` captured of `read_len` moved, kernel span id `span_id`.
    #[allow(clippy::too_many_arguments)]
    pub fn bytes_record(kind: EventKind, pid: u32, ts: u64, conn_id: u64, seq: u32, head: &[u8], read_len: u32, span_id: u64) -> Vec<u8> {
        let mut v = request_part(pid, ts, conn_id, seq, 0, head, 0);
        v[..2].copy_from_slice(&(kind as u16).to_ne_bytes());
        let at = std::mem::offset_of!(HttpRequestEvent, read_len);
        v[at..at + 4].copy_from_slice(&read_len.to_ne_bytes());
        let at = std::mem::offset_of!(HttpRequestEvent, span_id);
        v[at..at + 8].copy_from_slice(&span_id.to_ne_bytes());
        let at = std::mem::offset_of!(HttpRequestEvent, goroutine);
        v[at..at + 16].fill(0);
        v
    }

    /// A later read (SockClientRecv) or send (SockServerSend) of `len` bytes ending in `tail`.
    pub fn sock_bytes(kind: EventKind, pid: u32, ts: u64, conn_id: u64, seq: u32, len: u32, tail: &[u8]) -> Vec<u8> {
        let mut t = [0u8; 8];
        t[..tail.len()].copy_from_slice(tail);
        bytes_of(&SockBytesEvent {
            hdr: header(kind, std::mem::size_of::<SockBytesEvent>(), pid, ts),
            conn_id,
            seq,
            len,
            tail: t,
            tail_len: tail.len() as u8,
            _pad: [0; 7],
        })
    }

    /// A server request with its kernel span id and the same-host client span that sent it.
    pub fn request_linked(pid: u32, ts: u64, conn_id: u64, seq: u32, head: &[u8], span_id: u64, link_span: u64) -> Vec<u8> {
        let mut v = request_part(pid, ts, conn_id, seq, 0, head, 0);
        let at = std::mem::offset_of!(HttpRequestEvent, span_id);
        v[at..at + 8].copy_from_slice(&span_id.to_ne_bytes());
        v[at + 8..at + 16].copy_from_slice(&link_span.to_ne_bytes());
        v
    }

    fn go_str(s: &str) -> GoStr {
        let mut g = GoStr { len: s.len() as u32, kept: s.len().min(128) as u32, buf: [0; 128] };
        g.buf[..g.kept as usize].copy_from_slice(&s.as_bytes()[..g.kept as usize]);
        g
    }

    /// A Go client call's start: `url` is "scheme://host/path".
    pub fn client_request(pid: u32, ts: u64, goid: u64, span_id: u64, parent_span: u64, method: &str, url: &str) -> Vec<u8> {
        let (scheme, rest) = url.split_once("://").unwrap();
        let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        bytes_of(&GoClientRequestEvent {
            hdr: header(EventKind::GoClientRequest, std::mem::size_of::<GoClientRequestEvent>(), pid, ts),
            goid,
            span_id,
            parent_span,
            trace_id: [0; 16],
            method: go_str(method),
            scheme: go_str(scheme),
            url_host: go_str(host),
            path: go_str(path),
        })
    }

    pub fn client_response(pid: u32, ts: u64, goid: u64, span_id: u64, status: i64, err_type: u64) -> Vec<u8> {
        bytes_of(&GoClientResponseEvent {
            hdr: header(EventKind::GoClientResponse, std::mem::size_of::<GoClientResponseEvent>(), pid, ts),
            goid,
            span_id,
            status,
            err_type,
        })
    }

    /// A database/sql call's start with its statement's text, by a driver of `system`.
    pub fn sql_start(pid: u32, ts: u64, goid: u64, span_id: u64, parent_span: u64, text: &str, system: u32) -> Vec<u8> {
        let mut e = GoSqlStartEvent {
            hdr: header(EventKind::GoSqlStart, std::mem::size_of::<GoSqlStartEvent>(), pid, ts),
            goid,
            span_id,
            parent_span,
            text_ptr: 0x1000,
            text_len: text.len() as u32,
            kept: text.len().min(bounds::SQL_TEXT_MAX) as u32,
            kind: sql_kind::QUERY,
            system: system as u8,
            prepared: 0,
            _pad: [0; 5],
            text: [0; bounds::SQL_TEXT_MAX],
        };
        e.text[..e.kept as usize].copy_from_slice(&text.as_bytes()[..e.kept as usize]);
        bytes_of(&e)
    }

    /// Its end: an error (`err_type` not 0) with `code`, the server it wrote to.
    pub fn sql_done(pid: u32, ts: u64, goid: u64, span_id: u64, err_type: u64, code: &str, server: ([u8; 4], u16)) -> Vec<u8> {
        let a = server.0;
        let mut e = GoSqlEndEvent {
            hdr: header(EventKind::GoSqlDone, std::mem::size_of::<GoSqlEndEvent>(), pid, ts),
            goid,
            span_id,
            err_type,
            server_addr: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3]],
            server_port: server.1,
            code_len: code.len() as u8,
            _pad: [0; 5],
            code: [0; bounds::SQL_CODE_MAX],
        };
        e.code[..code.len()].copy_from_slice(code.as_bytes());
        bytes_of(&e)
    }

    /// A grpc-go server stream's start (handleStream) and end (WriteStatus).
    pub fn rpc_start(pid: u32, ts: u64, goid: u64, span_id: u64, method: &str) -> Vec<u8> {
        bytes_of(&GoRpcStartEvent {
            hdr: header(EventKind::GoRpcServerStart, std::mem::size_of::<GoRpcStartEvent>(), pid, ts),
            goid,
            span_id,
            parent_span: 0,
            stream: 0xc000_0000,
            stream_id: 1,
            has_flow: 0,
            has_trace: 0,
            trace_flags: 0,
            _pad: 0,
            flow: FlowKey::default(),
            trace_id: [0; 16],
            remote_span: 0,
            method: go_str(method),
        })
    }

    /// A grpc-go client stream's start (NewStream's RET) on the connection from 127.0.0.1:
    /// `client_port` to 127.0.0.1:`server_port`, stream 1, made in span `parent_span`.
    pub fn rpc_client_start(pid: u32, ts: u64, span_id: u64, parent_span: u64, method: &str, ports: (u16, u16)) -> Vec<u8> {
        let lo = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1];
        bytes_of(&GoRpcStartEvent {
            hdr: header(EventKind::GoRpcClientStart, std::mem::size_of::<GoRpcStartEvent>(), pid, ts),
            goid: 5,
            span_id,
            parent_span,
            stream: 0xc000_1000,
            stream_id: 1,
            has_flow: 1,
            has_trace: 0,
            trace_flags: 0,
            _pad: 0,
            flow: FlowKey { client_addr: lo, server_addr: lo, client_port: ports.0, server_port: ports.1, _pad: 0 },
            trace_id: [0; 16],
            remote_span: 0,
            method: go_str(method),
        })
    }

    pub fn rpc_end(pid: u32, ts: u64, goid: u64, span_id: u64, code: i64) -> Vec<u8> {
        bytes_of(&GoRpcEndEvent { hdr: header(EventKind::GoRpcEnd, std::mem::size_of::<GoRpcEndEvent>(), pid, ts), goid, span_id, code })
    }

    /// A Go HTTP/2 stream's start (runHandler entry, goroutine 7) on socket `sk`, linked to
    /// client span `parent_span` (0: none), and its end.
    pub fn h2_start(pid: u32, ts: u64, span_id: u64, parent_span: u64, sk: u64, method: &str, path: &str) -> Vec<u8> {
        bytes_of(&GoH2StartEvent {
            hdr: header(EventKind::GoH2Start, std::mem::size_of::<GoH2StartEvent>(), pid, ts),
            goid: 7,
            span_id,
            parent_span,
            sk,
            content_length: 0,
            stream_id: 1,
            has_flow: 0,
            tls: 1,
            has_trace: 0,
            trace_flags: 0,
            flow: FlowKey::default(),
            trace_id: [0; 16],
            remote_span: 0,
            method: go_str(method),
            path: go_str(path),
            host: go_str("localhost:8443"),
            remote_addr: go_str("127.0.0.1:40000"),
        })
    }

    pub fn h2_end(pid: u32, ts: u64, goid: u64, span_id: u64, status: i64, pattern: &str) -> Vec<u8> {
        bytes_of(&GoH2EndEvent {
            hdr: header(EventKind::GoH2End, std::mem::size_of::<GoH2EndEvent>(), pid, ts),
            goid,
            span_id,
            status,
            pattern: go_str(pattern),
        })
    }

    /// A response; its route pattern, when not empty, is "at" address `pattern.as_ptr()`:
    /// tests read it back with `fake_memory`.
    pub fn response(pid: u32, ts: u64, conn_id: u64, seq: u32, status: &[u8], pattern: &'static str) -> Vec<u8> {
        let mut e = HttpResponseEvent {
            hdr: header(EventKind::HttpResponse, std::mem::size_of::<HttpResponseEvent>(), pid, ts),
            conn_id,
            resp_start_ns: ts.saturating_sub(1000),
            end_ns: ts,
            bytes_in: 0,
            seq,
            status_len: status.len().min(16) as u8,
            closed: 0,
            pattern_len: pattern.len() as u16,
            status: [0; 16],
            pattern_ptr: if pattern.is_empty() { 0 } else { pattern.as_ptr() as u64 },
        };
        e.status[..status.len().min(16)].copy_from_slice(&status[..status.len().min(16)]);
        bytes_of(&e)
    }

    /// Reads "target memory" from this process, where `response` patterns live.
    pub fn fake_memory(_pid: u32, addr: u64, len: usize) -> Option<String> {
        // SAFETY: tests only pass addresses of 'static strs given to `response`.
        let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, len) };
        Some(String::from_utf8_lossy(bytes).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_each_kind() {
        let open = record::conn_open(7, 10, 99, 0xffff_8000_1234_0000, ([127, 0, 0, 1], 8080), ([127, 0, 0, 1], 50000));
        match decode(&open).unwrap() {
            Event::ConnOpen { pid, conn_id, sk, addrs, .. } => {
                assert_eq!((pid, conn_id, sk), (7, 99, 0xffff_8000_1234_0000));
                assert_eq!(addrs.local.addr.to_string(), "127.0.0.1");
                assert_eq!(addrs.peer.port, 50000);
            }
            e => panic!("wrong event {e:?}"),
        }
        let req = record::request(7, 20, 99, 1, 0xc000001000, b"GET / HTTP/1.1\r\n\r\n");
        let Event::HttpRequest(r) = decode(&req).unwrap() else { panic!() };
        assert_eq!(r.head, b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(r.seq, 1);
        let resp = record::response(7, 30, 99, 1, b"HTTP/1.1 200 OK\r", "GET /");
        let Event::HttpResponse(r) = decode(&resp).unwrap() else { panic!() };
        assert_eq!(&r.status_line[..r.status_len as usize], b"HTTP/1.1 200 OK\r");
        assert_eq!(record::fake_memory(7, r.pattern_ptr, r.pattern_len as usize).as_deref(), Some("GET /"));
        assert!(matches!(decode(&record::conn_close(7, 40, 99, 5)).unwrap(), Event::ConnClose { .. }));
    }

    #[test]
    fn rejects_malformed_records() {
        assert_eq!(decode(&[1, 2, 3]), Err(DecodeError::Short(3)));
        let mut bad = record::conn_close(1, 1, 1, 1);
        bad[0] = 200;
        assert_eq!(decode(&bad), Err(DecodeError::UnknownKind(200)));
        let req = record::request(7, 20, 99, 1, 0, b"GET / HTTP/1.1\r\n\r\n");
        assert!(matches!(decode(&req[..req.len() - 3]), Err(DecodeError::Size { .. })));
        let open = record::conn_open(7, 10, 99, 5, ([1, 2, 3, 4], 1), ([1, 2, 3, 4], 2));
        assert!(matches!(decode(&open[..40]), Err(DecodeError::Size { .. })));
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..20_000 {
            let len = rng.usize(0..400);
            let mut b: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            if b.len() >= 2 && rng.bool() {
                b[0] = rng.u8(1..10);
                b[1] = 0;
            }
            let _ = decode(&b);
        }
    }
}
