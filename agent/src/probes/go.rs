//! Where the Go uprobes of one process go: function entries from the symbol table, RET
//! instructions by decoding the function (no uretprobes on Go), file offsets for the kernel.
use zerotrace_common::{GoOffsets, TargetConfig, sql_system, target_flags};

use super::uprobes;
use crate::{
    model::Target,
    symbols::{Executable, SymbolError, buildinfo::BuildInfo, disasm, go::GoLayout},
};

/// How Go net/http server requests are observed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GoHttpProbes {
    /// Socket syscalls per request, one uprobe per connection (`(*conn).serve`): cheapest.
    Conn,
    /// Uprobes at the entry and every RET of `serverHandler.ServeHTTP`: two uprobe hits per
    /// request (~9 us each on this VM), exact handler window, works for any transport.
    Handler,
}

/// Which Go runtime hooks carry span contexts between goroutines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GoCausality {
    pub spawns: bool,
    pub channels: bool,
}

pub const CONN_SERVE: &str = "net/http.(*conn).serve";
pub const CONN_READ_REQUEST: &str = "net/http.(*conn).readRequest";
pub const SERVE_HTTP: &str = "net/http.serverHandler.ServeHTTP";
/// Where an HTTP/2 stream meets its handler, on the handler's goroutine: net/http's bundled
/// copy (Go 1.21-1.26), its own package from 1.27.
pub const H2_RUN_HANDLER: [&str; 2] = ["net/http.(*http2serverConn).runHandler", "net/http/internal/http2.(*serverConn).runHandler"];
pub const ROUND_TRIP: &str = "net/http.(*Transport).roundTrip";
pub const NEWPROC1: &str = "runtime.newproc1";
/// The closure `newproc` runs on the system stack: newproc1, then runqput(pp, newg, next).
pub const NEWPROC_FUNC1: &str = "runtime.newproc.func1";
pub const RUNQPUT: &str = "runtime.runqput";
pub const SQL_QUERY: &str = "database/sql.(*DB).queryDC";
pub const SQL_EXEC: &str = "database/sql.(*DB).execDC";
pub const SQL_STMT_QUERY: &str = "database/sql.(*Stmt).QueryContext";
pub const SQL_STMT_EXEC: &str = "database/sql.(*Stmt).ExecContext";
pub const GRPC_HANDLE_STREAM: &str = "google.golang.org/grpc.(*Server).handleStream";
pub const GRPC_WRITE_STATUS: &str = "google.golang.org/grpc/internal/transport.(*http2Server).WriteStatus";
const GRPC_STREAM: &str = "google.golang.org/grpc/internal/transport.Stream";
const GRPC_STATUS_PROTO: &str = "google.golang.org/genproto/googleapis/rpc/status.Status";
const GRPC_HTTP2_SERVER: &str = "google.golang.org/grpc/internal/transport.http2Server";
pub const GRPC_NEW_STREAM: &str = "google.golang.org/grpc/internal/transport.(*http2Client).NewStream";
pub const GRPC_CLIENT_FINISH: &str = "google.golang.org/grpc.(*clientStream).finish";
const GRPC_HTTP2_CLIENT: &str = "google.golang.org/grpc/internal/transport.http2Client";
const GRPC_CLIENT_STREAM: &str = "google.golang.org/grpc.clientStream";
const GRPC_ATTEMPT: &str = "google.golang.org/grpc.csAttempt";
const GRPC_STATUS_ERROR: &str = "google.golang.org/grpc/internal/status.Error";
/// The genproto `googleapis/rpc` release whose status proto layout is checked (Code at 40,
/// after state, sizeCache, unknownFields); protoc-gen-go 1.36 moved those last, later
/// releases may have Code at 8.
const GENPROTO_RPC_CHECKED: &str = "20240814211410";
pub const CHAN_SEND: &str = "runtime.send";
pub const CHAN_RECV: &str = "runtime.recv";
pub const CHANSEND: &str = "runtime.chansend";
pub const CHANRECV: &str = "runtime.chanrecv";
pub const SELECTGO: &str = "runtime.selectgo";
pub const TYPEDMEMMOVE: &str = "runtime.typedmemmove";
pub const TYPEDMEMCLR: &str = "runtime.typedmemclr";
pub const TLS_READ: &str = "crypto/tls.(*Conn).Read";
pub const TLS_WRITE: &str = "crypto/tls.(*Conn).Write";
pub const TLS_WRITE_RECORD: &str = "crypto/tls.(*Conn).writeRecordLocked";
pub const MEMMOVE: &str = "runtime.memmove";
pub const REQUEST_WRITE: &str = "net/http.(*Request).write";
pub const WRITE_SUBSET: &str = "net/http.Header.writeSubset";
/// Size of bytes.Reader (s []byte, i int64, prevRune int): accesses to `c.input` fall in
/// [input, input + 40).
const BYTES_READER_SIZE: u64 = 40;

/// Where the crypto/tls plaintext hooks go (addresses of CALL instructions).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsSites {
    /// The copy out of the decrypted record in `(*Conn).Read` (`c.input.Read(b)`, inlined
    /// to a `runtime.memmove`), and the register holding c there.
    pub read: u64,
    pub read_c_reg: u32,
    /// `c.writeRecordLocked(recordTypeApplicationData, ..)` in `(*Conn).Write`.
    pub write: Vec<u64>,
}

/// Finds the TLS plaintext CALL sites. In `(*Conn).Read` exactly one memmove must copy out
/// of `c.input` (proven by decoding: c's register was just used to reach `c.input`, see
/// `disasm::call_base_register`); a CALL of `(*bytes.Reader).Read` would do too, but Go
/// 1.21-1.27 inline it. Anything else is refused rather than guessed.
pub fn tls_sites(exe: &Executable, input_off: u16) -> Result<TlsSites, String> {
    if input_off == GoOffsets::NONE {
        return Err("tls.Conn.input offset unknown".into());
    }
    let memmove = exe.symbol(MEMMOVE).ok_or("runtime.memmove not found")?.addr;
    let read = exe.symbol(TLS_READ).ok_or("crypto/tls.(*Conn).Read not found")?;
    let code = exe.bytes_at(read.addr, read.size).ok_or("crypto/tls.(*Conn).Read not in the file")?;
    let input = input_off as u64;
    let copies = disasm::call_base_register(code, read.addr, memmove, input..input + BYTES_READER_SIZE)?;
    let proven: Vec<_> = copies.iter().filter_map(|(a, r)| r.map(|r| (*a, r))).collect();
    let [(read_at, reg)] = proven[..] else {
        return Err(format!("{TLS_READ}: {} memmove calls, {} of them out of c.input (expected 1)", copies.len(), proven.len()));
    };
    let read_c_reg = disasm::GPR_ORDER.iter().position(|g| *g == reg).ok_or("unexpected register")? as u32;
    let record = exe.symbol(TLS_WRITE_RECORD).ok_or("crypto/tls.(*Conn).writeRecordLocked not found")?.addr;
    let write: Vec<u64> = direct_calls(exe, TLS_WRITE)
        .ok_or("crypto/tls.(*Conn).Write not found or not decodable")?
        .into_iter()
        .filter(|(_, t)| *t == record)
        .map(|(a, _)| a)
        .collect();
    if write.is_empty() {
        return Err(format!("{TLS_WRITE} never calls writeRecordLocked"));
    }
    Ok(TlsSites { read: read_at, read_c_reg, write })
}

/// Where values enter and leave channel buffers, found by decoding the runtime (addresses of
/// CALL instructions, not yet file offsets).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ChannelSites {
    /// typedmemmove into a buffer slot: chansend's, and select's send case.
    pub put: Vec<u64>,
    /// typedmemclr of a slot after a receive: chanrecv's and select's.
    pub take: Vec<u64>,
    /// recv's refill of a full buffer with the blocked sender's value.
    pub refill: u64,
}

/// A function's direct calls, (CALL address, target), by its name; None when it cannot be
/// found or decoded.
pub type CallsOf<'a> = dyn Fn(&str) -> Option<Vec<(u64, u64)>> + 'a;

/// Finds the channel buffer CALL sites from each function's direct calls. The runtime's
/// source fixes their shape in Go 1.21-1.27 (see docs/causality.md): chansend calls
/// typedmemmove once (the buffered enqueue); chanrecv's typedmemclr calls clear either the
/// slot just taken or, on a closed channel, the receiver's variable; select's bufrecv case
/// is a typedmemmove directly followed by a typedmemclr of the same slot, its bufsend case
/// the other typedmemmove; recv moves the old value out, then the sender's value in (its
/// last typedmemmove). Anything else is refused rather than guessed.
pub fn channel_sites(calls_of: &CallsOf<'_>, typedmemmove: u64, typedmemclr: u64) -> Result<ChannelSites, String> {
    let get = |f: &str| calls_of(f).ok_or_else(|| format!("{f} not found or not decodable"));
    let to = |calls: &[(u64, u64)], target: u64| calls.iter().filter(|(_, t)| *t == target).map(|(a, _)| *a).collect::<Vec<_>>();
    let send = get(CHANSEND)?;
    let mut put = to(&send, typedmemmove);
    if put.len() != 1 {
        return Err(format!("{CHANSEND} calls typedmemmove {} times (expected 1)", put.len()));
    }
    let recv = get(CHANRECV)?;
    let mut take = to(&recv, typedmemclr);
    if take.is_empty() {
        return Err(format!("{CHANRECV} never calls typedmemclr"));
    }
    let sel = get(SELECTGO)?;
    let sel_moves: Vec<usize> = sel.iter().enumerate().filter(|(_, (_, t))| *t == typedmemmove).map(|(i, _)| i).collect();
    let sends: Vec<u64> = sel_moves.iter().filter(|&&i| sel.get(i + 1).is_none_or(|(_, t)| *t != typedmemclr)).map(|&i| sel[i].0).collect();
    if sends.len() != 1 {
        return Err(format!("{SELECTGO}: {} candidate buffered-send sites (expected 1)", sends.len()));
    }
    put.extend(sends);
    let clears = to(&sel, typedmemclr);
    if clears.is_empty() {
        return Err(format!("{SELECTGO} never calls typedmemclr"));
    }
    take.extend(clears);
    let r = get(CHAN_RECV)?;
    let moves = to(&r, typedmemmove);
    if moves.len() != 2 {
        return Err(format!("{CHAN_RECV} calls typedmemmove {} times (expected 2)", moves.len()));
    }
    Ok(ChannelSites { put, take, refill: moves[1] })
}

/// The `CALL runtime.runqput` that directly follows `CALL runtime.newproc1` in
/// `runtime.newproc.func1` (Go 1.21-1.27: `newg := newproc1(..); runqput(pp, newg, true)`).
fn spawn_call_site(exe: &Executable) -> Option<u64> {
    let (newproc1, runqput) = (exe.symbol(NEWPROC1)?.addr, exe.symbol(RUNQPUT)?.addr);
    let calls = direct_calls(exe, NEWPROC_FUNC1)?;
    let i = calls.iter().position(|(_, t)| *t == newproc1)?;
    calls.get(i + 1).filter(|(_, t)| *t == runqput).map(|(a, _)| *a)
}

fn direct_calls(exe: &Executable, name: &str) -> Option<Vec<(u64, u64)>> {
    let sym = exe.symbol(name)?;
    let code = exe.bytes_at(sym.addr, sym.size)?;
    disasm::calls(code, sym.addr).ok()
}

/// One uprobe: its program at a file offset of the executable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Site {
    pub prog: &'static str,
    pub offset: u64,
}

/// Where the uprobes of a Go executable go and what they give, worked out once per
/// executable file (offsets in the file are the same for every process running it, PIE or
/// not) and attached for each process, or once for all of them.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    pub sites: Vec<Site>,
    /// `(*conn).readRequest`'s entry: the temporary catch-up probe for connections older
    /// than the agent (`GoHttpProbes::Conn` only; attached per process when it has some).
    pub catch_up: Option<u64>,
    /// The crypto/tls plaintext sites, when hooked.
    pub tls: Option<TlsSites>,
    /// The database/sql driver, when database/sql is hooked.
    pub sql: Option<SqlDriver>,
    /// Where grpc-go keeps what its server hooks read, when they are attached.
    pub grpc: Option<GrpcLayout>,
    /// golang.org/x/net/http2's server offsets (TargetConfig::xnet_h2), when hooked.
    pub xnet_h2: Option<[u16; 5]>,
    pub report: AttachReport,
}

/// A Go program's database/sql driver, known by the driver module it is built with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SqlDriver {
    /// `zerotrace_common::sql_system`.
    pub system: u32,
    /// The driver module, for the log.
    pub module: Option<&'static str>,
    /// The runtime type of the driver's error (not yet biased) and where its code string
    /// lies in the error's value.
    pub error_type: Option<u64>,
    pub error_code: u32,
}

/// Offsets the grpc-go hooks read: `transport.Stream`'s `id`, `method` and `ct` (its client
/// transport), the status proto's `Code`, `http2Server`'s and `http2Client`'s `conn`,
/// `clientStream.attempt` and `csAttempt.s`. A side's offsets are NO_OFFSET when that side
/// is not hooked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrpcLayout {
    pub stream_id: u32,
    pub stream_method: u32,
    pub status_code: u32,
    pub server_conn: u32,
    pub stream_ct: u32,
    pub client_conn: u32,
    pub cs_attempt: u32,
    pub attempt_stream: u32,
    /// `Stream.ctx` (a server stream's metadata context).
    pub stream_ctx: u32,
    /// The runtime type of `*transport.http2Server` (not yet biased; 0: servers not hooked).
    pub transport_type: u64,
    /// The runtime type of `*internal/status.Error` (not yet biased; 0: unknown, a client's
    /// errors are then UNKNOWN).
    pub error_type: u64,
    /// "dwarf" or the grpc version whose known layout was used.
    pub source: &'static str,
}

const NO: u32 = TargetConfig::NO_OFFSET;

impl GrpcLayout {
    pub fn server(&self) -> bool {
        self.transport_type != 0 && self.server_conn != NO
    }

    pub fn client(&self) -> bool {
        self.cs_attempt != NO
    }

    /// The offsets, for comparing two sources on the fields both have.
    fn fields(&self) -> [u32; 9] {
        [
            self.stream_id,
            self.stream_method,
            self.status_code,
            self.server_conn,
            self.stream_ct,
            self.client_conn,
            self.cs_attempt,
            self.attempt_stream,
            self.stream_ctx,
        ]
    }
}

/// grpc-go versions whose layout is known without DWARF (compared with the DWARF of every
/// program that has both, a warning when they differ; the e2e suite builds v1.67.1 with
/// both Go ends and asserts no warning): `Stream{id uint32; st, ct ServerTransport/ClientTransport;
/// ctx context.Context; cancel; done; doneFunc; ctxDone; method string}`, `spb.Status{state, sizeCache,
/// unknownFields; Code int32}`, `http2Server{lastRead int64; done chan; conn net.Conn}`,
/// `http2Client.conn` after 128 bytes, `clientStream.attempt` after 216, `csAttempt{ctx; cs;
/// t ClientTransport; s *Stream}`. From v1.69 handleStream takes a `*ServerStream` and
/// WriteStatus is `writeStatus`. The status proto's layout is the genproto module's: used
/// only up to GENPROTO_RPC_CHECKED.
const GRPC_KNOWN: &[(&str, GrpcLayout)] = &[(
    "v1.67.",
    GrpcLayout {
        stream_id: 0,
        stream_method: 88,
        status_code: 40,
        server_conn: 16,
        stream_ct: 24,
        client_conn: 128,
        cs_attempt: 216,
        attempt_stream: 40,
        stream_ctx: 40,
        transport_type: 0,
        error_type: 0,
        source: "v1.67",
    },
)];

/// The grpc-go hooks, when the program serves or calls gRPC and its layout is known (from
/// its DWARF, else by its grpc version; otherwise said in the log): servers at the entries
/// of handleStream and WriteStatus, clients at NewStream's RETs and clientStream.finish's
/// entry (2 hits per RPC on each side).
fn plan_grpc(p: &mut Plan, pid: u32, exe: &Executable, build: &BuildInfo) -> Result<(), SymbolError> {
    let has = |n: &str| exe.symbol(n).is_some();
    let version = build.deps.iter().find(|(m, _)| m == "google.golang.org/grpc").map_or("", |(_, v)| v.as_str());
    let mut server = has(GRPC_HANDLE_STREAM);
    if server && !has(GRPC_WRITE_STATUS) {
        tracing::warn!(pid, grpc = version, "this grpc-go version's server is not understood (no http2Server.WriteStatus): its RPCs get no server spans");
        server = false;
    }
    let client = has(GRPC_NEW_STREAM) && has(GRPC_CLIENT_FINISH);
    if !server && !client {
        return Ok(());
    }
    let minor = build.version_tuple().map_or(u32::MAX, |v| v.1);
    let tables = exe.go_tables().map_err(str::to_owned);
    let runtime_type = |name: &str| tables.as_ref().map_err(Clone::clone).and_then(|t| t.runtime_type(exe, minor, name));
    let mut transport_type = 0;
    if server {
        match runtime_type(&format!("*{GRPC_HTTP2_SERVER}")) {
            Ok(Some(t)) => transport_type = t,
            other => {
                tracing::warn!(pid, grpc = version, why = ?other.err(), "grpc-go's transport type was not found: its RPCs get no server spans");
                server = false;
            }
        }
    }
    let error_type = if client { runtime_type(&format!("*{GRPC_STATUS_ERROR}")).ok().flatten().unwrap_or(0) } else { 0 };
    if !server && !client {
        return Ok(());
    }
    // The status proto's layout is known for genproto releases up to the one checked (a
    // pseudo-version's date).
    let genproto = build.deps.iter().find(|(m, _)| m == "google.golang.org/genproto/googleapis/rpc").map_or("", |(_, v)| v.as_str());
    let genproto_known = genproto.split('-').nth(1).is_some_and(|date| date.len() == GENPROTO_RPC_CHECKED.len() && date <= GENPROTO_RPC_CHECKED);
    let dwarf = crate::symbols::dwarf::GoDwarf::load(
        exe,
        &[GRPC_STREAM, GRPC_STATUS_PROTO, GRPC_HTTP2_SERVER, GRPC_HTTP2_CLIENT, GRPC_CLIENT_STREAM, GRPC_ATTEMPT],
        &[],
    )
    .ok();
    let from_dwarf = dwarf.as_ref().and_then(|d| {
        let m = |ty: &str, f: &str| d.member(ty, f).and_then(|o| u32::try_from(o).ok());
        let side = |on: bool, ty: &str, f: &str| if on { m(ty, f) } else { Some(NO) };
        Some(GrpcLayout {
            stream_id: m(GRPC_STREAM, "id")?,
            stream_method: m(GRPC_STREAM, "method")?,
            status_code: m(GRPC_STATUS_PROTO, "Code")?,
            server_conn: side(server, GRPC_HTTP2_SERVER, "conn")?,
            stream_ct: side(client, GRPC_STREAM, "ct")?,
            client_conn: side(client, GRPC_HTTP2_CLIENT, "conn")?,
            cs_attempt: side(client, GRPC_CLIENT_STREAM, "attempt")?,
            attempt_stream: side(client, GRPC_ATTEMPT, "s")?,
            stream_ctx: side(server, GRPC_STREAM, "ctx")?,
            transport_type,
            error_type,
            source: "dwarf",
        })
    });
    let known = GRPC_KNOWN.iter().find(|(v, _)| version.starts_with(v) && genproto_known).map(|(_, l)| GrpcLayout {
        server_conn: if server { l.server_conn } else { NO },
        stream_ct: if client { l.stream_ct } else { NO },
        client_conn: if client { l.client_conn } else { NO },
        cs_attempt: if client { l.cs_attempt } else { NO },
        attempt_stream: if client { l.attempt_stream } else { NO },
        stream_ctx: if server { l.stream_ctx } else { NO },
        transport_type,
        error_type,
        ..*l
    });
    if let (Some(d), Some(k)) = (from_dwarf, known)
        && d.fields() != k.fields()
    {
        tracing::warn!(pid, grpc = version, dwarf = ?d, table = ?k, "the known grpc-go layout differs from this program's DWARF: stripped builds of this version would be misread");
    }
    let Some(layout) = from_dwarf.or(known) else {
        tracing::warn!(pid, grpc = version, genproto, "this grpc-go version's layout is not known without DWARF: its RPCs get no spans");
        return Ok(());
    };
    if server {
        p.add(uprobes::GO_GRPC_STREAM, entry_offset(exe, GRPC_HANDLE_STREAM)?);
        p.add(uprobes::GO_GRPC_STATUS, entry_offset(exe, GRPC_WRITE_STATUS)?);
    }
    if client {
        plan_rets(p, exe, GRPC_NEW_STREAM, uprobes::GO_GRPC_CLIENT_STREAM)?;
        p.add(uprobes::GO_GRPC_CLIENT_FINISH, entry_offset(exe, GRPC_CLIENT_FINISH)?);
    }
    p.grpc = Some(layout);
    Ok(())
}

/// A known database/sql driver: module path (a prefix: major versions are suffixes), the
/// element of the package its database/sql driver is in (its `Open` method is linked into a
/// program that registers it), the database (`sql_system`), and, when its code is a Go
/// string in the error's value, the error's pointer type as DWARF names it and the code's
/// offset there.
type KnownDriver = (&'static str, &'static str, u32, Option<(&'static str, u32)>);

const SQL_DRIVERS: &[KnownDriver] = &[
    // lib/pq: Error{Severity string; Code ErrorCode (string); ...}, the same since v1.0.
    ("github.com/lib/pq", "/pq.", sql_system::POSTGRESQL, Some(("*github.com/lib/pq.Error", 16))),
    ("github.com/jackc/pgx", "/stdlib.", sql_system::POSTGRESQL, None),
    ("github.com/go-sql-driver/mysql", "/mysql.", sql_system::MYSQL, None),
    ("github.com/mattn/go-sqlite3", "/go-sqlite3.", sql_system::SQLITE, None),
    ("modernc.org/sqlite", "/sqlite.", sql_system::SQLITE, None),
    ("github.com/microsoft/go-mssqldb", "/go-mssqldb.", sql_system::SQL_SERVER, None),
    ("github.com/denisenkom/go-mssqldb", "/go-mssqldb.", sql_system::SQL_SERVER, None),
    ("github.com/sijms/go-ora", "/go-ora", sql_system::ORACLE, None),
    ("github.com/godror/godror", "/godror.", sql_system::ORACLE, None),
    ("github.com/ClickHouse/clickhouse-go", "/clickhouse-go", sql_system::CLICKHOUSE, None),
];

/// The known drivers a program registers with database/sql: a module it is built with (its
/// build info) whose database/sql driver's `Open` method is among its `functions`.
fn drivers_of<'a>(build: &BuildInfo, functions: impl Iterator<Item = &'a str>) -> Vec<&'static KnownDriver> {
    let built: Vec<&KnownDriver> = SQL_DRIVERS
        .iter()
        .filter(|(m, _, _, _)| build.deps.iter().any(|(d, _)| d == m || d.strip_prefix(m).is_some_and(|rest| rest.starts_with('/'))))
        .collect();
    if built.is_empty() {
        return built;
    }
    let mut linked = vec![false; built.len()];
    for f in functions.filter(|f| f.ends_with(".Open")) {
        for (i, (m, pkg, _, _)) in built.iter().enumerate() {
            if f.starts_with(m) && f.contains(pkg) {
                linked[i] = true;
            }
        }
    }
    built.into_iter().zip(linked).filter(|(_, l)| *l).map(|(d, _)| d).collect()
}

/// The driver of a program with database/sql: the known driver when the drivers it
/// registers name one database, else `other_sql` (drivers of two databases, or a driver
/// zerotrace does not know: a span never names the wrong database).
fn sql_driver(pid: u32, exe: &Executable, build: &BuildInfo) -> SqlDriver {
    let found = match exe.go_tables() {
        Ok(t) => drivers_of(build, t.functions().map(|(n, _)| n)),
        Err(_) => Vec::new(),
    };
    let Some(first) = found.first() else { return SqlDriver { system: sql_system::OTHER, ..Default::default() } };
    if found.iter().any(|d| d.2 != first.2) {
        tracing::info!(pid, drivers = ?found.iter().map(|d| d.0).collect::<Vec<_>>(), "database/sql drivers of several databases: db.system.name is other_sql");
        return SqlDriver { system: sql_system::OTHER, ..Default::default() };
    }
    let mut d = SqlDriver { system: first.2, module: Some(first.0), ..Default::default() };
    if let [(_, _, _, Some((ty, code)))] = found[..] {
        let minor = build.version_tuple().map_or(u32::MAX, |v| v.1);
        match exe.go_tables().map_err(str::to_owned).and_then(|t| t.runtime_type(exe, minor, ty)) {
            Ok(Some(t)) => (d.error_type, d.error_code) = (Some(t), *code),
            Ok(None) => tracing::debug!(pid, ty, "the driver's error type is not in the program: no error codes"),
            Err(why) => tracing::warn!(pid, ty, %why, "the driver's error type was not found: SQL spans carry no error codes"),
        }
    }
    d
}

/// The run's settings that decide a plan.
#[derive(Clone, Copy, Debug)]
pub struct PlanSettings {
    pub http: GoHttpProbes,
    pub causality: GoCausality,
    pub tls: bool,
    pub inject: bool,
}

/// The plan for Go executable `exe` with `layout`; `pid` names the first process that runs it
/// in the log lines that say what it will not get.
pub fn plan(pid: u32, layout: &GoLayout, build: &BuildInfo, exe: &Executable, s: &PlanSettings) -> Result<Plan, SymbolError> {
    let mut p = Plan::default();
    plan_http(&mut p, exe, s.http)?;
    plan_h2(&mut p, pid, layout, exe, build)?;
    plan_causality(&mut p, pid, layout, exe, build, &s.causality)?;
    plan_grpc(&mut p, pid, exe, build)?;
    p.tls = tls_plan(pid, layout, exe, s.tls);
    if let Some(sites) = p.tls.take() {
        plan_tls(&mut p, exe, &sites)?;
        p.tls = Some(sites);
    }
    if s.inject {
        plan_inject(&mut p, pid, layout, exe)?;
    }
    p.report.uprobes = p.sites.len();
    Ok(p)
}

impl Plan {
    fn add(&mut self, prog: &'static str, offset: u64) {
        self.sites.push(Site { prog, offset });
    }
}

/// net/http's HTTP/2 server streams (entry and RETs of runHandler: 2 hits per stream, none
/// per HTTP/1 request), when the program has the server and its layout is known; the same
/// for golang.org/x/net/http2's server (h2c), laid out by the program's DWARF or its x/net
/// version.
fn plan_h2(p: &mut Plan, pid: u32, layout: &GoLayout, exe: &Executable, build: &BuildInfo) -> Result<(), SymbolError> {
    if let Some(name) = H2_RUN_HANDLER.into_iter().find(|n| exe.symbol(n).is_some()) {
        if layout.offsets.h2_rw_rws == GoOffsets::NONE {
            tracing::warn!(pid, "this program's HTTP/2 server layout is not known: its HTTP/2 requests get no server spans");
        } else {
            p.report.h2 = true;
            plan_call(p, exe, name, uprobes::GO_H2_HANDLER, uprobes::GO_H2_HANDLER_RET)?;
        }
    }
    if exe.symbol(XNET_RUN_HANDLER).is_none() {
        return Ok(());
    }
    let version = build.deps.iter().find(|(m, _)| m == "golang.org/x/net").map_or("", |(_, v)| v.as_str());
    let x = |t: &str| format!("golang.org/x/net/http2.{t}");
    let members = [("responseWriter", "rws"), ("responseWriterState", "stream"), ("responseWriterState", "status"), ("stream", "id"), ("serverConn", "conn")];
    let structs: Vec<String> = members.iter().map(|(t, _)| x(t)).collect();
    let refs: Vec<&str> = structs.iter().map(String::as_str).collect();
    let from_dwarf = crate::symbols::dwarf::GoDwarf::load(exe, &refs, &[]).ok().and_then(|d| {
        let mut o = [0u16; 5];
        for (slot, (t, f)) in o.iter_mut().zip(members) {
            *slot = u16::try_from(d.member(&x(t), f)?).ok()?;
        }
        Some(o)
    });
    let known = XNET_KNOWN.iter().find(|(v, _)| version.starts_with(v)).map(|(_, o)| *o);
    if let (Some(d), Some(k)) = (from_dwarf, known)
        && d != k
    {
        tracing::warn!(pid, x_net = version, dwarf = ?d, table = ?k, "the known golang.org/x/net/http2 layout differs from this program's DWARF: stripped builds of this version would be misread");
    }
    let Some(offsets) = from_dwarf.or(known) else {
        tracing::warn!(
            pid,
            x_net = version,
            "this golang.org/x/net/http2 server's layout is not known without DWARF: its HTTP/2 (h2c) requests get no server spans"
        );
        return Ok(());
    };
    p.xnet_h2 = Some(offsets);
    p.report.h2 = true;
    plan_call(p, exe, XNET_RUN_HANDLER, uprobes::GO_H2_XNET_HANDLER, uprobes::GO_H2_XNET_HANDLER_RET)?;
    Ok(())
}

/// golang.org/x/net/http2's runHandler (h2c servers and other direct users of its Server).
pub const XNET_RUN_HANDLER: &str = "golang.org/x/net/http2.(*serverConn).runHandler";

/// golang.org/x/net versions whose HTTP/2 server layout is known without DWARF (compared
/// with the DWARF of every program that has both; the e2e h2c service is built with
/// v0.28.0): `responseWriter.rws`, `responseWriterState.stream` / `.status`, `stream.id`,
/// `serverConn.conn`.
const XNET_KNOWN: &[(&str, [u16; 5])] = &[("v0.28.", [0, 0, 72, 8, 16])];

/// What was attached for one process, for the log line and the tests.
#[derive(Debug, Default, Clone)]
pub struct AttachReport {
    pub uprobes: usize,
    pub ret_sites: usize,
    /// Client spans (Transport.roundTrip hooked), goroutine spawns and channel handoffs
    /// followed.
    pub client: bool,
    pub sql: bool,
    /// HTTP/2 server streams (runHandler hooked).
    pub h2: bool,
    pub spawns: bool,
    pub channels: bool,
    /// HTTPS server requests (crypto/tls plaintext hooks).
    pub tls: bool,
    /// traceparent written into outgoing requests.
    pub inject: bool,
}

/// The kernel-side configuration of a Go target traced with `plan`.
pub fn target_config(t: &Target, plan: &Plan) -> TargetConfig {
    let sql = plan.sql.clone().unwrap_or_default();
    TargetConfig {
        flags: target_flags::GO,
        tls_c_reg: plan.tls.as_ref().map_or(TargetConfig::NO_REG, |s| s.read_c_reg),
        go: t.layout.biased(t.bias),
        sql_error_type: sql.error_type.map_or(0, |a| a.wrapping_add(t.bias)),
        sql_error_code: sql.error_code,
        sql_system: sql.system,
        grpc_stream_id: plan.grpc.map_or(TargetConfig::NO_OFFSET, |g| g.stream_id),
        grpc_stream_method: plan.grpc.map_or(TargetConfig::NO_OFFSET, |g| g.stream_method),
        grpc_status_code: plan.grpc.map_or(TargetConfig::NO_OFFSET, |g| g.status_code),
        grpc_server_conn: plan.grpc.map_or(TargetConfig::NO_OFFSET, |g| g.server_conn),
        grpc_transport_type: plan.grpc.filter(GrpcLayout::server).map_or(0, |g| g.transport_type.wrapping_add(t.bias)),
        grpc_stream_ct: plan.grpc.map_or(TargetConfig::NO_OFFSET, |g| g.stream_ct),
        grpc_client_conn: plan.grpc.map_or(TargetConfig::NO_OFFSET, |g| g.client_conn),
        grpc_cs_attempt: plan.grpc.map_or(TargetConfig::NO_OFFSET, |g| g.cs_attempt),
        grpc_attempt_stream: plan.grpc.map_or(TargetConfig::NO_OFFSET, |g| g.attempt_stream),
        grpc_error_type: plan.grpc.filter(|g| g.error_type != 0).map_or(0, |g| g.error_type.wrapping_add(t.bias)),
        grpc_stream_ctx: plan.grpc.map_or(TargetConfig::NO_OFFSET, |g| g.stream_ctx),
        _pad2: 0,
        xnet_h2: plan.xnet_h2.unwrap_or([GoOffsets::NONE; 5]),
        _pad3: [0; 3],
    }
}

/// The TLS plaintext sites of a program that has crypto/tls, if wanted and understood
/// (otherwise said in the log: HTTPS servers then get no spans).
fn tls_plan(pid: u32, layout: &GoLayout, exe: &Executable, want: bool) -> Option<TlsSites> {
    if !want || exe.symbol(TLS_READ).is_none() {
        return None;
    }
    match tls_sites(exe, layout.offsets.tlsconn_input) {
        Ok(s) => Some(s),
        Err(why) => {
            tracing::warn!(pid, %why, "crypto/tls code not understood: HTTPS requests of this program are not traced");
            None
        }
    }
}

/// The CALL of `Header.writeSubset` in `(*Request).write` where --inject-traceparent
/// writes: `r.Header.writeSubset(w, ..)`, the first in the code (Go 1.21-1.27; the second,
/// when there is one, is the Transport's extra headers through the inlined `Header.write`,
/// which comes later in the source and the code).
pub fn inject_site(exe: &Executable) -> Result<u64, String> {
    let target = exe.symbol(WRITE_SUBSET).ok_or("net/http.Header.writeSubset not found")?.addr;
    let calls = direct_calls(exe, REQUEST_WRITE).ok_or("net/http.(*Request).write not found or not decodable")?;
    let sites: Vec<u64> = calls.iter().filter(|(_, t)| *t == target).map(|(a, _)| *a).collect();
    match sites[..] {
        [first] | [first, _] => Ok(first),
        _ => Err(format!("{REQUEST_WRITE} calls writeSubset {} times (expected 1 or 2)", sites.len())),
    }
}

/// The traceparent writer (`--inject-traceparent`) when the program makes client spans and
/// its layout has what the writer checks; otherwise says why in the log.
fn plan_inject(p: &mut Plan, pid: u32, layout: &GoLayout, exe: &Executable) -> Result<(), SymbolError> {
    let go = &layout.offsets;
    let why = if !p.report.client {
        Some("the program has no net/http client".to_owned())
    } else if layout.type_bufio_writer.is_none() || go.request_header == GoOffsets::NONE {
        Some("bufio.Writer type or Request.Header offset unknown".to_owned())
    } else {
        inject_site(exe).err()
    };
    if let Some(why) = why {
        tracing::warn!(pid, %why, "no traceparent is written into this program's requests");
        return Ok(());
    }
    let site = inject_site(exe).ok().and_then(|a| exe.file_offset(a)).ok_or_else(|| SymbolError::Disassembly {
        path: exe.path.clone(),
        name: WRITE_SUBSET.into(),
        reason: "call site outside the segments".into(),
    })?;
    p.add(uprobes::GO_INJECT, site);
    p.report.inject = true;
    Ok(())
}

/// The crypto/tls plaintext hooks at `sites`.
fn plan_tls(p: &mut Plan, exe: &Executable, sites: &TlsSites) -> Result<(), SymbolError> {
    let file = |a: u64| {
        exe.file_offset(a).ok_or_else(|| SymbolError::Disassembly {
            path: exe.path.clone(),
            name: "crypto/tls call".into(),
            reason: format!("{a:#x} outside the segments"),
        })
    };
    p.add(uprobes::GO_TLS_READ, file(sites.read)?);
    for a in &sites.write {
        p.add(uprobes::GO_TLS_WRITE, file(*a)?);
    }
    p.report.tls = true;
    Ok(())
}

/// The hooks that make span trees: client calls (entry and RETs of
/// `(*Transport).roundTrip`, when the program has an HTTP client), goroutine spawns (RETs of
/// `runtime.newproc1`) and channel handoffs (entries of `runtime.send`/`runtime.recv`).
/// A function a program does not have is skipped (the program cannot make that edge);
/// runtime layout fields a Go version lacks switch the matching hook off, said in the log.
fn plan_causality(p: &mut Plan, pid: u32, layout: &GoLayout, exe: &Executable, build: &BuildInfo, want: &GoCausality) -> Result<(), SymbolError> {
    let go = &layout.offsets;
    if exe.symbol(ROUND_TRIP).is_some() {
        plan_call(p, exe, ROUND_TRIP, uprobes::GO_ROUND_TRIP, uprobes::GO_ROUND_TRIP_RET)?;
        p.report.client = true;
    }
    // Each database/sql path the program has (the linker leaves out what it never runs:
    // a program that only queries has no execDC, one without prepared statements no Stmt
    // methods).
    let sql = [
        (SQL_QUERY, uprobes::GO_SQL_QUERY),
        (SQL_EXEC, uprobes::GO_SQL_EXEC),
        (SQL_STMT_QUERY, uprobes::GO_SQL_STMT_QUERY),
        (SQL_STMT_EXEC, uprobes::GO_SQL_STMT_EXEC),
    ];
    for (name, prog) in sql {
        if exe.symbol(name).is_some() {
            plan_call(p, exe, name, prog, uprobes::GO_SQL_RET)?;
            p.report.sql = true;
        }
    }
    if p.report.sql {
        p.sql = Some(sql_driver(pid, exe, build));
    }
    if want.spawns {
        if go.g_parent_goid == GoOffsets::NONE {
            tracing::warn!(pid, "this Go version has no g.parentGoid: spans are not followed into spawned goroutines");
        } else {
            // Cheapest: the CALL to runqput that follows newproc1 in newproc's closure (an
            // emulated probe); else every RET of newproc1 (single-stepped).
            let site = spawn_call_site(exe).and_then(|a| exe.file_offset(a));
            match site {
                Some(off) => p.add(uprobes::GO_SPAWN_CALL, off),
                None => {
                    plan_rets(p, exe, NEWPROC1, uprobes::GO_NEWPROC1_RET)?;
                }
            }
            p.report.spawns = true;
        }
    }
    if want.channels {
        let sites = match (exe.symbol(TYPEDMEMMOVE), exe.symbol(TYPEDMEMCLR)) {
            (Some(m), Some(c)) => channel_sites(&|f| direct_calls(exe, f), m.addr, c.addr),
            _ => Err("runtime.typedmemmove/typedmemclr not found".into()),
        };
        match sites {
            Err(why) => tracing::warn!(pid, %why, "the Go runtime's channel code is not understood: spans are not followed over channels"),
            Ok(_) if go.sudog_g == GoOffsets::NONE || go.hchan_dataqsiz == GoOffsets::NONE => {
                tracing::warn!(pid, "runtime channel layout unknown: spans are not followed over channels")
            }
            Ok(sites) => {
                let file = |a: u64| {
                    exe.file_offset(a).ok_or_else(|| SymbolError::Disassembly {
                        path: exe.path.clone(),
                        name: "channel buffer call".into(),
                        reason: format!("{a:#x} outside the segments"),
                    })
                };
                let send = entry_offset(exe, CHAN_SEND)?;
                let recv = entry_offset(exe, CHAN_RECV)?;
                p.add(uprobes::GO_CHAN_SEND, send);
                p.add(uprobes::GO_CHAN_RECV, recv);
                for a in &sites.put {
                    p.add(uprobes::GO_CHAN_PUT, file(*a)?);
                }
                for a in &sites.take {
                    p.add(uprobes::GO_CHAN_TAKE, file(*a)?);
                }
                p.add(uprobes::GO_CHAN_REFILL, file(sites.refill)?);
                p.report.channels = true;
            }
        }
    }
    Ok(())
}

fn function(exe: &Executable, name: &str) -> Result<(u64, u64), SymbolError> {
    let sym = exe.symbol(name).ok_or_else(|| SymbolError::MissingSymbol {
        path: exe.path.clone(),
        name: name.to_owned(),
        hint: "the program does not use net/http's server, or the linker removed it",
    })?;
    let off = exe.file_offset(sym.addr).ok_or_else(|| SymbolError::MissingSymbol {
        path: exe.path.clone(),
        name: format!("{name} (outside the loaded segments)"),
        hint: "the executable looks damaged",
    })?;
    Ok((sym.addr, off))
}

/// Hooks a whole call of function `name`: `entry` after its stack check, `ret` at every RET
/// (never a uretprobe). Returns the number of RET sites.
fn plan_call(p: &mut Plan, exe: &Executable, name: &str, entry: &'static str, ret: &'static str) -> Result<usize, SymbolError> {
    p.add(entry, entry_offset(exe, name)?);
    plan_rets(p, exe, name, ret)
}

/// Hooks every RET of function `name` with program `ret`; returns how many there are.
fn plan_rets(p: &mut Plan, exe: &Executable, name: &str, ret: &'static str) -> Result<usize, SymbolError> {
    let rets = ret_offsets(exe, name)?;
    for off in &rets {
        p.add(ret, *off);
    }
    Ok(rets.len())
}

/// File offset of where a uprobe "at the entry" of `name` goes: after its stack-growth
/// check when it has one (fires once per call), else the entry itself.
pub fn entry_offset(exe: &Executable, name: &str) -> Result<u64, SymbolError> {
    let (addr, off) = function(exe, name)?;
    let size = exe.symbol(name).map_or(0, |s| s.size).min(64);
    let after = exe.bytes_at(addr, size).and_then(|code| disasm::after_stack_check(code, addr));
    Ok(match after.and_then(|a| exe.file_offset(a)) {
        Some(o) => o,
        None => off,
    })
}

/// File offsets of every RET of `name`.
pub fn ret_offsets(exe: &Executable, name: &str) -> Result<Vec<u64>, SymbolError> {
    let (addr, _) = function(exe, name)?;
    let size = exe.symbol(name).map_or(0, |s| s.size);
    let code = exe.bytes_at(addr, size).ok_or_else(|| SymbolError::Disassembly {
        path: exe.path.clone(),
        name: name.to_owned(),
        reason: "function bytes not in the file".into(),
    })?;
    let rets = disasm::ret_addresses(code, addr).map_err(|reason| SymbolError::Disassembly { path: exe.path.clone(), name: name.to_owned(), reason })?;
    if rets.is_empty() {
        return Err(SymbolError::Disassembly { path: exe.path.clone(), name: name.to_owned(), reason: "no RET found".into() });
    }
    rets.iter()
        .map(|a| {
            exe.file_offset(*a).ok_or_else(|| SymbolError::Disassembly {
                path: exe.path.clone(),
                name: name.to_owned(),
                reason: format!("RET at {a:#x} outside the segments"),
            })
        })
        .collect()
}

/// The Go net/http server probes. With `GoHttpProbes::Conn`, also where the temporary
/// catch-up probe goes (`(*conn).readRequest`: it learns the Go connection of sockets that
/// were open before zerotrace attached).
fn plan_http(p: &mut Plan, exe: &Executable, mode: GoHttpProbes) -> Result<(), SymbolError> {
    match mode {
        GoHttpProbes::Conn => {
            p.add(uprobes::GO_CONN_SERVE, entry_offset(exe, CONN_SERVE)?);
            p.catch_up = entry_offset(exe, CONN_READ_REQUEST).ok();
        }
        GoHttpProbes::Handler => {
            p.report.ret_sites = plan_call(p, exe, SERVE_HTTP, uprobes::GO_SERVE_HTTP, uprobes::GO_SERVE_HTTP_RET)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A driver counts when the program is built with its module and links its database/sql
    /// driver; major-version paths match; a module used without database/sql does not.
    #[test]
    fn sql_drivers_by_module_and_linked_open() {
        let build = |deps: &[&str]| BuildInfo { deps: deps.iter().map(|d| (d.to_string(), "v1.0.0".to_string())).collect(), ..Default::default() };
        let names = |found: Vec<&'static KnownDriver>| found.iter().map(|d| d.0).collect::<Vec<_>>();
        let pq = build(&["github.com/lib/pq"]);
        assert_eq!(names(drivers_of(&pq, ["github.com/lib/pq.Driver.Open", "main.main"].into_iter())), ["github.com/lib/pq"]);
        assert!(drivers_of(&pq, ["github.com/lib/pq.QuoteIdentifier"].into_iter()).is_empty(), "linked but not registered");
        let pgx = build(&["github.com/jackc/pgx/v5"]);
        assert!(drivers_of(&pgx, ["github.com/jackc/pgx/v5/pgxpool.(*Pool).Acquire"].into_iter()).is_empty(), "pgx without database/sql");
        assert_eq!(names(drivers_of(&pgx, ["github.com/jackc/pgx/v5/stdlib.(*Driver).Open"].into_iter())), ["github.com/jackc/pgx"]);
        let both = build(&["github.com/lib/pq", "github.com/go-sql-driver/mysql"]);
        let found = drivers_of(&both, ["github.com/lib/pq.Driver.Open", "github.com/go-sql-driver/mysql.MySQLDriver.Open"].into_iter());
        assert_eq!(found.len(), 2);
        assert!(drivers_of(&build(&["example.com/other"]), ["example.com/other.Driver.Open"].into_iter()).is_empty());
    }
    use crate::symbols::{
        buildinfo::BuildInfo,
        go::layout,
        go_offsets_table::GO_OFFSETS,
        testgo::{self, Variant},
    };

    /// The crypto/tls plaintext sites are found, and proven, in every Go of the matrix, plain,
    /// PIE and stripped: c's register at the read copy, and the application-data writes.
    #[test]
    fn tls_sites_for_every_version() {
        for entry in GO_OFFSETS {
            let v = entry.toolchain;
            for variant in [Variant::Plain, Variant::Pie, Variant::PieStripped] {
                let exe = Executable::open(&testgo::build(v, variant)).unwrap();
                let info = BuildInfo::parse(&exe.section(".go.buildinfo").expect("buildinfo")).expect("parses");
                let l = layout(&exe, &info).unwrap();
                let s = tls_sites(&exe, l.offsets.tlsconn_input).unwrap_or_else(|e| panic!("Go {v} {variant:?}: {e}"));
                assert!((s.read_c_reg as usize) < disasm::GPR_ORDER.len(), "Go {v} {variant:?}");
                assert!(!s.write.is_empty() && s.write.len() <= 2, "Go {v} {variant:?}: {s:?}");
                inject_site(&exe).unwrap_or_else(|e| panic!("Go {v} {variant:?}: {e}"));
            }
        }
    }
}
