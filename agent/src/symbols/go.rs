//! A Go program's layout as the kernel programs need it (zerotrace_common::GoOffsets):
//! thread-local g slot, struct member offsets and runtime type descriptors. Member offsets
//! come from the executable's own DWARF when it has some (exact for that build), else from
//! the generated per-version table (`go_offsets_table.rs`, `cargo xtask codegen
//! go-offsets`), for stripped binaries; both answer through the same `Members` lookup and
//! the same `MEMBERS` list. Type descriptors come from DWARF plus `runtime.types`, else
//! from the module data (`moduledata.rs`). `GoLayout::source` says which one answered.
use zerotrace_common::GoOffsets;

use super::{
    Executable, SymbolError,
    buildinfo::{BuildInfo, parse_go_version},
    dwarf::GoDwarf,
    go_offsets_table::GO_OFFSETS,
};

/// Offsets of one executable, before the load bias of a running process is applied.
#[derive(Clone, Debug)]
pub struct GoLayout {
    pub offsets: GoOffsets,
    /// Virtual addresses (not yet biased) of the runtime types zerotrace compares against.
    pub type_tcpconn: Option<u64>,
    pub type_tlsconn: Option<u64>,
    pub type_response: Option<u64>,
    pub type_bufio_writer: Option<u64>,
    /// "dwarf" or "table".
    pub source: &'static str,
    /// Fields this Go version does not have (e.g. Request.Pattern before 1.23), and type
    /// descriptors that were not found.
    pub absent: Vec<&'static str>,
}

impl GoLayout {
    /// The offsets with runtime type addresses moved by the process's load bias.
    pub fn biased(&self, bias: u64) -> GoOffsets {
        let mut o = self.offsets;
        o.type_tcpconn = self.type_tcpconn.map_or(0, |a| a.wrapping_add(bias));
        o.type_tlsconn = self.type_tlsconn.map_or(0, |a| a.wrapping_add(bias));
        o.type_response = self.type_response.map_or(0, |a| a.wrapping_add(bias));
        o.type_bufio_writer = self.type_bufio_writer.map_or(0, |a| a.wrapping_add(bias));
        o
    }
}

/// Struct member offsets by Go struct name (as DWARF spells it) and member name.
pub trait Members {
    /// Offset of `field` in struct `ty`, e.g. ("net/http.conn", "rwc").
    fn member(&self, ty: &str, field: &str) -> Option<u64>;
    fn has_struct(&self, ty: &str) -> bool;
}

impl Members for GoDwarf {
    fn member(&self, ty: &str, field: &str) -> Option<u64> {
        GoDwarf::member(self, ty, field)
    }

    fn has_struct(&self, ty: &str) -> bool {
        GoDwarf::has_struct(self, ty)
    }
}

/// Every (struct, member) the layout reads: what the DWARF reader collects, what the
/// generated table holds, and what the two are compared on.
pub const MEMBERS: &[(&str, &str)] = &[
    ("runtime.g", "goid"),
    ("runtime.g", "parentGoid"),
    ("runtime.sudog", "g"),
    ("runtime.hchan", "dataqsiz"),
    ("net/http.conn", "rwc"),
    ("net/http.conn", "curReq"),
    ("sync/atomic.Pointer[net/http.response]", "v"),
    ("net/http.response", "req"),
    ("net/http.response", "status"),
    ("net/http.response", "conn"),
    ("net/http.Request", "Method"),
    ("net/http.Request", "URL"),
    ("net/http.Request", "Proto"),
    ("net/http.Request", "ContentLength"),
    ("net/http.Request", "Host"),
    ("net/http.Request", "RemoteAddr"),
    ("net/http.Request", "Pattern"),
    ("net/http.Request", "pat"),
    ("net/http.pattern", "str"),
    ("net/http.Response", "StatusCode"),
    ("net/url.URL", "Scheme"),
    ("net/url.URL", "Host"),
    ("net/url.URL", "Path"),
    ("net.TCPConn", "conn"),
    ("net.conn", "fd"),
    ("net.netFD", "pfd"),
    ("internal/poll.FD", "Sysfd"),
    ("crypto/tls.Conn", "conn"),
    ("crypto/tls.Conn", "input"),
    ("bufio.Writer", "buf"),
    ("bufio.Writer", "n"),
    ("net/http.Request", "Header"),
    ("internal/runtime/maps.Map", "dirPtr"),
    ("internal/runtime/maps.Map", "dirLen"),
    ("runtime.hmap", "B"),
    ("runtime.hmap", "buckets"),
    // HTTP/2 server: bundled into net/http up to 1.26, its own package from 1.27.
    ("net/http.http2responseWriter", "rws"),
    ("net/http.http2responseWriterState", "stream"),
    ("net/http.http2responseWriterState", "status"),
    ("net/http.http2stream", "id"),
    ("net/http.http2serverConn", "conn"),
    ("net/http/internal/http2.responseWriter", "rws"),
    ("net/http/internal/http2.responseWriterState", "stream"),
    ("net/http/internal/http2.responseWriterState", "status"),
    ("net/http/internal/http2.stream", "id"),
    ("net/http/internal/http2.serverConn", "conn"),
    ("net/http/internal/http2.ServerRequest", "Method"),
    ("net/http/internal/http2.ServerRequest", "URL"),
    ("net/http/internal/http2.ServerRequest", "Host"),
    ("net/http/internal/http2.ServerRequest", "RemoteAddr"),
    ("net/http/internal/http2.ServerRequest", "ContentLength"),
    ("net/http/internal/http2.ServerRequest", "Header"),
];

/// Runtime type descriptors the kernel compares interface values against (DWARF names).
pub const TYPES: [&str; N_TYPES] = ["*net.TCPConn", "*crypto/tls.Conn", "*net/http.response", "*bufio.Writer"];
pub const N_TYPES: usize = 4;

/// The structs of `MEMBERS`, each once.
pub fn structs() -> Vec<&'static str> {
    let mut s: Vec<&str> = MEMBERS.iter().map(|(t, _)| *t).collect();
    s.dedup();
    s.sort_unstable();
    s.dedup();
    s
}

/// The kernel's offsets from a member lookup. Err names the first required member missing.
pub fn offsets(m: &dyn Members, tls_g: i64) -> Result<(GoOffsets, Vec<&'static str>), String> {
    let mut absent = Vec::new();
    let need = |ty: &str, f: &str| m.member(ty, f).map(|v| v as u16).ok_or_else(|| format!("{ty}.{f}"));
    let mut opt = |ty: &str, f: &str, label: &'static str| -> u16 {
        match m.member(ty, f) {
            Some(v) => v as u16,
            None => {
                absent.push(label);
                GoOffsets::NONE
            }
        }
    };
    let curreq_inner = m.member("sync/atomic.Pointer[net/http.response]", "v").unwrap_or(0) as u16;
    let netfd_sysfd = need("net.netFD", "pfd")? + need("internal/poll.FD", "Sysfd")?;
    // net.TCPConn embeds net.conn whose first member is fd.
    let tcpconn_fd = need("net.TCPConn", "conn")? + need("net.conn", "fd")?;
    let request_pattern = opt("net/http.Request", "Pattern", "Request.Pattern");
    let request_pat = opt("net/http.Request", "pat", "Request.pat");
    let pattern_str = if m.has_struct("net/http.pattern") { opt("net/http.pattern", "str", "pattern.str") } else { GoOffsets::NONE };
    let tlsconn_conn = opt("crypto/tls.Conn", "conn", "tls.Conn.conn");
    let h2 = h2_offsets(m);
    let offsets = GoOffsets {
        tls_g,
        type_tcpconn: 0,
        type_tlsconn: 0,
        type_response: 0,
        type_bufio_writer: 0,
        g_goid: need("runtime.g", "goid")?,
        conn_rwc: need("net/http.conn", "rwc")?,
        conn_curreq: need("net/http.conn", "curReq")? + curreq_inner,
        response_req: need("net/http.response", "req")?,
        response_status: need("net/http.response", "status")?,
        response_conn: need("net/http.response", "conn")?,
        request_method: need("net/http.Request", "Method")?,
        request_url: need("net/http.Request", "URL")?,
        request_proto: need("net/http.Request", "Proto")?,
        request_content_length: need("net/http.Request", "ContentLength")?,
        request_host: need("net/http.Request", "Host")?,
        request_remote_addr: need("net/http.Request", "RemoteAddr")?,
        request_pattern,
        request_pat,
        pattern_str,
        url_path: need("net/url.URL", "Path")?,
        tcpconn_fd,
        netfd_sysfd,
        tlsconn_conn,
        g_parent_goid: opt("runtime.g", "parentGoid", "g.parentGoid"),
        sudog_g: opt("runtime.sudog", "g", "sudog.g"),
        hchan_dataqsiz: opt("runtime.hchan", "dataqsiz", "hchan.dataqsiz"),
        url_scheme: opt("net/url.URL", "Scheme", "URL.Scheme"),
        url_host: opt("net/url.URL", "Host", "URL.Host"),
        resp_status_code: opt("net/http.Response", "StatusCode", "Response.StatusCode"),
        tlsconn_input: opt("crypto/tls.Conn", "input", "tls.Conn.input"),
        bufw_buf: opt("bufio.Writer", "buf", "bufio.Writer.buf"),
        bufw_n: opt("bufio.Writer", "n", "bufio.Writer.n"),
        request_header: opt("net/http.Request", "Header", "Request.Header"),
        map_dirptr: opt("internal/runtime/maps.Map", "dirPtr", "maps.Map.dirPtr"),
        map_dirlen: opt("internal/runtime/maps.Map", "dirLen", "maps.Map.dirLen"),
        hmap_b: opt("runtime.hmap", "B", "hmap.B"),
        hmap_buckets: opt("runtime.hmap", "buckets", "hmap.buckets"),
        h2_rw_rws: h2.rw_rws,
        h2_rws_stream: h2.rws_stream,
        h2_rws_status: h2.rws_status,
        h2_stream_id: h2.stream_id,
        h2_sc_conn: h2.sc_conn,
        h2_req_method: h2.req[0],
        h2_req_url: h2.req[1],
        h2_req_host: h2.req[2],
        h2_req_remote_addr: h2.req[3],
        h2_req_content_length: h2.req[4],
        h2_req_http: h2.req_http,
        h2_req_header: h2.req[5],
        _pad: [0; 3],
    };
    if h2.rw_rws == GoOffsets::NONE {
        absent.push("http2 server");
    }
    Ok((offsets, absent))
}

/// The HTTP/2 server's offsets (GoOffsets::h2_*), all NONE when any is missing.
struct H2Offsets {
    rw_rws: u16,
    rws_stream: u16,
    rws_status: u16,
    stream_id: u16,
    sc_conn: u16,
    /// Method, URL, Host, RemoteAddr, ContentLength, Header of the handler's request.
    req: [u16; 6],
    req_http: u16,
}

fn h2_offsets(m: &dyn Members) -> H2Offsets {
    const NONE: H2Offsets = H2Offsets {
        rw_rws: GoOffsets::NONE,
        rws_stream: GoOffsets::NONE,
        rws_status: GoOffsets::NONE,
        stream_id: GoOffsets::NONE,
        sc_conn: GoOffsets::NONE,
        req: [GoOffsets::NONE; 6],
        req_http: 0,
    };
    const REQ_FIELDS: [&str; 6] = ["Method", "URL", "Host", "RemoteAddr", "ContentLength", "Header"];
    // (package prefix, the request's struct, whether it is net/http's Request).
    let found = [("net/http.http2", "net/http.Request", 1), ("net/http/internal/http2.", "net/http/internal/http2.ServerRequest", 0)].into_iter().find_map(
        |(pkg, req, http)| {
            let f = |ty: &str, field: &str| m.member(&format!("{pkg}{ty}"), field).and_then(|v| u16::try_from(v).ok());
            let mut r = [0u16; 6];
            for (slot, name) in r.iter_mut().zip(REQ_FIELDS) {
                *slot = u16::try_from(m.member(req, name)?).ok()?;
            }
            Some(H2Offsets {
                rw_rws: f("responseWriter", "rws")?,
                rws_stream: f("responseWriterState", "stream")?,
                rws_status: f("responseWriterState", "status")?,
                stream_id: f("stream", "id")?,
                sc_conn: f("serverConn", "conn")?,
                req: r,
                req_http: http,
            })
        },
    );
    found.unwrap_or(NONE)
}

/// Members where DWARF (`a`) and the table (`b`) disagree, as "struct.member (dwarf X,
/// table Y)". Structs the program does not use (absent from its DWARF) are skipped.
pub fn disagreements(a: &dyn Members, b: &dyn Members) -> Vec<String> {
    let show = |v: Option<u64>| v.map_or("absent".to_owned(), |v| v.to_string());
    MEMBERS
        .iter()
        .filter(|(ty, _)| a.has_struct(ty))
        .filter_map(|&(ty, f)| {
            let (x, y) = (a.member(ty, f), b.member(ty, f));
            (x != y).then(|| format!("{ty}.{f} (dwarf {}, table {})", show(x), show(y)))
        })
        .collect()
}

/// One Go minor version's members, as generated into `go_offsets_table.rs`.
#[derive(Debug)]
pub struct TableEntry {
    /// "1.21".
    pub go: &'static str,
    /// The toolchain whose DWARF produced the entry, e.g. "1.21.13".
    pub toolchain: &'static str,
    pub members: &'static [(&'static str, &'static str, u64)],
}

impl Members for TableEntry {
    fn member(&self, ty: &str, field: &str) -> Option<u64> {
        self.members.iter().find(|(t, f, _)| *t == ty && *f == field).map(|m| m.2)
    }

    fn has_struct(&self, ty: &str) -> bool {
        self.members.iter().any(|(t, _, _)| *t == ty)
    }
}

impl TableEntry {
    fn minor(&self) -> u32 {
        parse_go_version(&format!("go{}", self.go)).map_or(0, |v| v.1)
    }
}

/// The table entry for a Go version: (entry, exact). A version newer than the newest entry
/// gets the newest (not exact); an older one, or an unparsable one, none.
pub fn table_entry(go_version: &str) -> Option<(&'static TableEntry, bool)> {
    let (major, minor, _) = parse_go_version(go_version)?;
    if major != 1 {
        return None;
    }
    if let Some(e) = GO_OFFSETS.iter().find(|e| e.minor() == minor) {
        return Some((e, true));
    }
    let newest = GO_OFFSETS.iter().max_by_key(|e| e.minor())?;
    (minor > newest.minor()).then_some((newest, false))
}

/// Where g lives relative to the thread pointer. Go's g slot is the executable's TLS block,
/// which sits right below the thread pointer (x86-64 TLS variant II): -round_up(memsz, align).
/// Without a PT_TLS segment Go uses the same -8 slot. Program headers survive stripping.
pub fn tls_g_offset(exe: &Executable) -> i64 {
    match exe.tls {
        Some((memsz, align)) if memsz > 0 => -((memsz.div_ceil(align) * align) as i64),
        _ => -8,
    }
}

/// The Go minor version of a build, for the module data layout.
fn minor_of(info: &BuildInfo) -> u32 {
    info.version_tuple().map_or(u32::MAX, |v| v.1)
}

/// Runtime type descriptors through the module data; labels of those not found go to
/// `absent`.
fn types_from_moduledata(exe: &Executable, info: &BuildInfo, absent: &mut Vec<&'static str>) -> [Option<u64>; N_TYPES] {
    let minor = minor_of(info);
    let find = |name: &str| -> Result<Option<u64>, String> {
        let tables = exe.go_tables().map_err(str::to_owned)?;
        tables.runtime_type(exe, minor, name)
    };
    let mut out = [None; N_TYPES];
    for (i, name) in TYPES.iter().enumerate() {
        match find(name) {
            Ok(Some(a)) => out[i] = Some(a),
            Ok(None) => absent.push(type_label(i)),
            Err(e) => {
                tracing::warn!(path = %exe.path.display(), "runtime type {name} not found: {e}; interface values of this type are not recognised");
                absent.push(type_label(i));
            }
        }
    }
    out
}

fn type_label(i: usize) -> &'static str {
    ["type *net.TCPConn", "type *crypto/tls.Conn", "type *net/http.response", "type *bufio.Writer"][i]
}

fn make_layout(offsets: GoOffsets, types: [Option<u64>; N_TYPES], source: &'static str, absent: Vec<&'static str>) -> GoLayout {
    GoLayout { offsets, type_tcpconn: types[0], type_tlsconn: types[1], type_response: types[2], type_bufio_writer: types[3], source, absent }
}

/// Where Go struct offsets come from.
pub trait OffsetSource {
    fn name(&self) -> &'static str;
    fn layout(&self, exe: &Executable, info: &BuildInfo) -> Result<GoLayout, SymbolError>;
}

/// Offsets read from the executable's own DWARF (exact for that build).
pub struct DwarfSource;

impl DwarfSource {
    fn layout_from(&self, exe: &Executable, info: &BuildInfo, d: &GoDwarf) -> Result<GoLayout, SymbolError> {
        let (offsets, mut absent) = offsets(d, tls_g_offset(exe)).map_err(|what| SymbolError::MissingDwarf {
            path: exe.path.clone(),
            what,
            hint: "this Go version's layout is not understood; please report it with the Go version",
        })?;
        let types = match exe.symtab_symbol("runtime.types").map(|s| s.addr) {
            Some(base) => {
                let t = |i: usize| d.runtime_type(TYPES[i]).map(|off| base + off);
                let found: [Option<u64>; N_TYPES] = std::array::from_fn(t);
                for (i, f) in found.iter().enumerate() {
                    if f.is_none() {
                        absent.push(type_label(i));
                    }
                }
                found
            }
            // DWARF without a symbol table (-s without -w on old linkers): the module data.
            None => types_from_moduledata(exe, info, &mut absent),
        };
        Ok(make_layout(offsets, types, self.name(), absent))
    }
}

impl OffsetSource for DwarfSource {
    fn name(&self) -> &'static str {
        "dwarf"
    }

    fn layout(&self, exe: &Executable, info: &BuildInfo) -> Result<GoLayout, SymbolError> {
        let d = GoDwarf::load(exe, &structs(), &TYPES)?;
        self.layout_from(exe, info, &d)
    }
}

/// Offsets from the generated table, by the binary's Go version (for binaries without
/// DWARF); type descriptors from the module data.
pub struct TableSource;

impl OffsetSource for TableSource {
    fn name(&self) -> &'static str {
        "table"
    }

    fn layout(&self, exe: &Executable, info: &BuildInfo) -> Result<GoLayout, SymbolError> {
        let no_layout =
            |table: String| SymbolError::NoLayout { path: exe.path.clone(), version: info.go_version.clone(), dwarf: "none (stripped)".into(), table };
        let newest = GO_OFFSETS.iter().map(|e| e.go).max_by_key(|g| parse_go_version(&format!("go{g}")));
        let Some((entry, exact)) = table_entry(&info.go_version) else {
            return Err(no_layout(format!(
                "no entry for {} (the table covers Go {} to {})",
                info.go_version,
                GO_OFFSETS.first().map_or("?", |e| e.go),
                newest.unwrap_or("?")
            )));
        };
        if !exact {
            tracing::warn!(
                path = %exe.path.display(),
                "{} is newer than the newest Go in zerotrace's offsets table (Go {}): using that entry, struct offsets are UNVERIFIED for {}; \
                 rebuild the target without -ldflags='-s -w' for exact offsets, or update zerotrace",
                info.go_version, entry.go, info.go_version
            );
        }
        let (offsets, mut absent) = offsets(entry, tls_g_offset(exe)).map_err(|m| no_layout(format!("Go {} entry lacks {m}", entry.go)))?;
        // Without DWARF the functions come from the pclntab: make sure it is there.
        exe.go_tables().map_err(|e| no_layout(format!("offsets known, but {e}")))?;
        let types = types_from_moduledata(exe, info, &mut absent);
        Ok(make_layout(offsets, types, self.name(), absent))
    }
}

/// DWARF when the executable has it (with a cross-check against the table: disagreements
/// are logged, DWARF wins), else the table. The error says what both sources lacked.
pub fn layout(exe: &Executable, info: &BuildInfo) -> Result<GoLayout, SymbolError> {
    let has_dwarf = exe.section(".debug_info").is_some_and(|s| !s.is_empty());
    if !has_dwarf {
        return TableSource.layout(exe, info);
    }
    let dwarf = GoDwarf::load(exe, &structs(), &TYPES).and_then(|d| {
        let l = DwarfSource.layout_from(exe, info, &d)?;
        Ok((d, l))
    });
    match dwarf {
        Ok((d, l)) => {
            if let Some((entry, true)) = table_entry(&info.go_version) {
                let diff = disagreements(&d, entry);
                if !diff.is_empty() {
                    tracing::warn!(
                        path = %exe.path.display(),
                        "DWARF and the Go {} offsets table disagree on {}: using DWARF; please report this with the Go version ({})",
                        entry.go, diff.join(", "), info.go_version
                    );
                }
            }
            Ok(l)
        }
        Err(dwarf_err) => TableSource.layout(exe, info).map_err(|table_err| SymbolError::NoLayout {
            path: exe.path.clone(),
            version: info.go_version.clone(),
            dwarf: dwarf_err.to_string(),
            table: match table_err {
                SymbolError::NoLayout { table, .. } => table,
                e => e.to_string(),
            },
        }),
    }
}

/// Source text of `go_offsets_table.rs` from each toolchain's member lookup (in order).
pub fn render_table(entries: &[(&str, &dyn Members)]) -> String {
    let mut s = String::new();
    s.push_str("//! Generated by `cargo xtask codegen go-offsets` from the DWARF of tests/e2e/go/goprobe built\n");
    s.push_str("//! by each Go toolchain of the test matrix: do not edit. Go struct member offsets by Go minor\n");
    s.push_str("//! version (amd64) for binaries without DWARF; see symbols/go.rs (MEMBERS, TableSource).\n");
    s.push_str("use super::go::TableEntry;\n\n");
    s.push_str("pub const GO_OFFSETS: &[TableEntry] = &[\n");
    for (toolchain, m) in entries {
        let go: String = toolchain.split('.').take(2).collect::<Vec<_>>().join(".");
        s.push_str(&format!("    TableEntry {{\n        go: \"{go}\",\n        toolchain: \"{toolchain}\",\n        members: &[\n"));
        for (ty, f) in MEMBERS {
            if let Some(v) = m.member(ty, f) {
                s.push_str(&format!("            (\"{ty}\", \"{f}\", {v}),\n"));
            }
        }
        s.push_str("        ],\n    },\n");
    }
    s.push_str("];\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::symbols::testgo::{self, Variant};

    fn build_info(exe: &Executable) -> BuildInfo {
        BuildInfo::parse(&exe.section(".go.buildinfo").expect("buildinfo")).expect("parses")
    }

    #[test]
    fn table_entries_by_version() {
        assert_eq!(table_entry("go1.21.13").map(|(e, x)| (e.go, x)), Some(("1.21", true)));
        assert_eq!(table_entry("go1.27.0").map(|(e, x)| (e.go, x)), Some(("1.27", true)));
        let newest = GO_OFFSETS.iter().map(|e| e.minor()).max().unwrap();
        let newer = format!("go1.{}.1", newest + 3);
        let (e, exact) = table_entry(&newer).unwrap();
        assert_eq!((e.minor(), exact), (newest, false));
        assert!(table_entry("go1.20.5").is_none());
        assert!(table_entry("devel abc").is_none());
    }

    /// The committed table equals what each toolchain's DWARF says, member by member, and
    /// rendering it again gives the committed file. With ZEROTRACE_UPDATE_GO_OFFSETS=1 (set by
    /// `cargo xtask codegen go-offsets`, with ZEROTRACE_GO_VERSIONS) it rewrites the file.
    #[test]
    fn go_offsets_table_matches_dwarf() {
        let update = std::env::var_os("ZEROTRACE_UPDATE_GO_OFFSETS").is_some();
        let versions: Vec<String> = match std::env::var("ZEROTRACE_GO_VERSIONS") {
            Ok(v) if update => v.split(',').map(str::to_owned).collect(),
            _ => GO_OFFSETS.iter().map(|e| e.toolchain.to_owned()).collect(),
        };
        let mut dwarfs = Vec::new();
        for v in &versions {
            let exe = Executable::open(&testgo::build(v, Variant::Plain)).unwrap();
            dwarfs.push((v.clone(), GoDwarf::load(&exe, &structs(), &TYPES).unwrap()));
        }
        let entries: Vec<(&str, &dyn Members)> = dwarfs.iter().map(|(v, d)| (v.as_str(), d as &dyn Members)).collect();
        let text = render_table(&entries);
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/symbols/go_offsets_table.rs");
        if update {
            std::fs::write(&path, &text).unwrap();
            eprintln!("wrote {}", path.display());
            return;
        }
        for ((v, d), entry) in dwarfs.iter().zip(GO_OFFSETS) {
            assert_eq!(entry.toolchain, v);
            assert_eq!(disagreements(d, entry), Vec::<String>::new(), "Go {v}: table vs DWARF");
            // Same kernel offsets from both.
            let (a, aa) = offsets(d, -8).unwrap();
            let (b, ab) = offsets(entry, -8).unwrap();
            assert_eq!((a, aa), (b, ab), "Go {v}");
        }
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text, "go_offsets_table.rs is stale: run `cargo xtask codegen go-offsets`");
    }

    /// DWARF and table layouts (types through DWARF + runtime.types vs the module data)
    /// agree on unstripped builds of every version, and a stripped build gets the same
    /// layout from the table.
    #[test]
    fn dwarf_and_table_layouts_agree_for_every_version() {
        for entry in GO_OFFSETS {
            let v = entry.toolchain;
            for variant in [Variant::Plain, Variant::Pie] {
                let exe = Executable::open(&testgo::build(v, variant)).unwrap();
                let info = build_info(&exe);
                let d = DwarfSource.layout(&exe, &info).unwrap();
                let t = TableSource.layout(&exe, &info).unwrap();
                let ctx = format!("Go {v} {variant:?}");
                assert_eq!(d.source, "dwarf");
                assert_eq!(t.source, "table");
                assert!(d.type_tcpconn.is_some() && d.type_tlsconn.is_some() && d.type_response.is_some(), "{ctx}: {d:?}");
                assert_eq!(d.offsets, t.offsets, "{ctx}");
                // Every version has the HTTP/2 server's offsets, its request's Header too.
                let o = &d.offsets;
                let h2 = [
                    o.h2_rw_rws,
                    o.h2_rws_stream,
                    o.h2_rws_status,
                    o.h2_stream_id,
                    o.h2_sc_conn,
                    o.h2_req_method,
                    o.h2_req_url,
                    o.h2_req_host,
                    o.h2_req_header,
                ];
                assert!(!h2.contains(&GoOffsets::NONE) && o.h2_req_header != 0 && o.h2_rws_status != 0, "{ctx}: {o:?}");
                let minor: u32 = v.split('.').nth(1).and_then(|m| m.parse().ok()).unwrap();
                assert_eq!(o.h2_req_http, u16::from(minor < 27), "{ctx}: an *http.Request up to 1.26");
                assert_eq!((d.type_tcpconn, d.type_tlsconn, d.type_response), (t.type_tcpconn, t.type_tlsconn, t.type_response), "{ctx}");
                assert_eq!(d.absent, t.absent, "{ctx}");
            }
        }
    }

    #[test]
    fn stripped_builds_get_the_unstripped_layout() {
        for entry in GO_OFFSETS {
            let v = entry.toolchain;
            for (full, stripped) in [(Variant::Plain, Variant::Stripped), (Variant::Pie, Variant::PieStripped)] {
                let exe = Executable::open(&testgo::build(v, full)).unwrap();
                let s = Executable::open(&testgo::build(v, stripped)).unwrap();
                assert!(s.section(".debug_info").is_none() && s.symtab_symbol("runtime.types").is_none());
                let info = build_info(&s);
                let d = layout(&exe, &info).unwrap();
                let t = layout(&s, &info).unwrap();
                assert_eq!(t.source, "table", "Go {v}");
                assert_eq!(d.offsets, t.offsets, "Go {v} {stripped:?}");
                assert!(t.type_tcpconn.is_some() && t.type_tlsconn.is_some() && t.type_response.is_some(), "Go {v} {stripped:?}: {t:?}");
            }
        }
    }

    #[test]
    fn cgo_builds_get_the_same_layout() {
        assert!(testgo::have_c_compiler(), "no C compiler (gcc/cc) for the cgo builds: install gcc (`cargo xtask setup` does)");
        for v in [GO_OFFSETS[0].toolchain, GO_OFFSETS[GO_OFFSETS.len() - 1].toolchain] {
            let exe = Executable::open(&testgo::build(v, Variant::Cgo)).unwrap();
            let info = build_info(&exe);
            let d = DwarfSource.layout(&exe, &info).unwrap();
            let t = TableSource.layout(&exe, &info).unwrap();
            assert_eq!(d.offsets, t.offsets, "Go {v}");
            assert_eq!((d.type_tcpconn, d.type_tlsconn, d.type_response), (t.type_tcpconn, t.type_tlsconn, t.type_response), "Go {v}");
            // The g slot: runtime.tlsg's offset in the TLS block, from the end of the block.
            let s = Executable::open(&testgo::build(v, Variant::CgoPieStripped)).unwrap();
            let ts = layout(&s, &info).unwrap();
            assert_eq!(ts.source, "table");
            assert_eq!(ts.offsets.tls_g, d.offsets.tls_g, "Go {v}");
            assert!(ts.type_tcpconn.is_some() && ts.type_tlsconn.is_some() && ts.type_response.is_some(), "Go {v}: {ts:?}");
        }
    }

    /// A member lookup from a list, for tests.
    struct Fake(Vec<(&'static str, &'static str, u64)>);

    impl Members for Fake {
        fn member(&self, ty: &str, field: &str) -> Option<u64> {
            self.0.iter().find(|(t, f, _)| *t == ty && *f == field).map(|m| m.2)
        }

        fn has_struct(&self, ty: &str) -> bool {
            self.0.iter().any(|(t, _, _)| *t == ty)
        }
    }

    #[test]
    fn disagreements_name_the_fields() {
        let entry = &GO_OFFSETS[GO_OFFSETS.len() - 1];
        let mut members = entry.members.to_vec();
        for m in &mut members {
            if (m.0, m.1) == ("runtime.g", "goid") {
                m.2 += 8;
            }
        }
        members.retain(|m| (m.0, m.1) != ("net/http.Request", "Pattern"));
        let diff = disagreements(&Fake(members), entry);
        assert_eq!(diff.len(), 2, "{diff:?}");
        assert!(diff[0].starts_with("runtime.g.goid (dwarf "), "{diff:?}");
        assert!(diff[1].starts_with("net/http.Request.Pattern (dwarf absent, table "), "{diff:?}");
        assert!(disagreements(entry, entry).is_empty());
        // A program that does not use a struct at all is not a disagreement.
        let no_tls: Vec<_> = entry.members.iter().copied().filter(|m| m.0 != "crypto/tls.Conn").collect();
        assert!(disagreements(&Fake(no_tls), entry).is_empty());
        // A required member missing is named.
        assert_eq!(offsets(&Fake(vec![]), -8).unwrap_err(), "net.netFD.pfd");
    }

    #[test]
    fn neither_dwarf_nor_table_is_a_clear_error() {
        // The test executable itself: DWARF without Go structs, no Go function table.
        let exe = Executable::open(&std::env::current_exe().unwrap()).unwrap();
        let info = BuildInfo { go_version: "go1.27.3".into(), ..Default::default() };
        let err = layout(&exe, &info).unwrap_err().to_string();
        assert!(err.contains("DWARF: ") && err.contains("offsets table: ") && err.contains("-s -w"), "{err}");
        assert!(err.contains("no Go function table"), "{err}");
        let old = BuildInfo { go_version: "go1.19.2".into(), ..Default::default() };
        let err = layout(&exe, &old).unwrap_err().to_string();
        assert!(err.contains("no entry for go1.19.2"), "{err}");
    }

    /// g's TLS slot from PT_TLS (kept by stripping) is runtime.tlsg's place in the block
    /// (-8 in every build here, including cgo ones linked by the system linker).
    #[test]
    fn tls_g_slot_matches_runtime_tlsg() {
        use object::{Object, ObjectSymbol};
        let mut variants = vec![Variant::Pie];
        if testgo::have_c_compiler() {
            variants.extend([Variant::Cgo, Variant::CgoPie]);
        }
        for v in [GO_OFFSETS[0].toolchain, GO_OFFSETS[GO_OFFSETS.len() - 1].toolchain] {
            for variant in &variants {
                let path = testgo::build(v, *variant);
                let exe = Executable::open(&path).unwrap();
                let data = std::fs::read(&path).unwrap();
                let file = object::File::parse(&*data).unwrap();
                let (memsz, align) = exe.tls.expect("PT_TLS");
                // Go's own linker names no TLS symbol; its block holds g alone.
                let at = file.symbols().find(|s| s.name() == Ok("runtime.tlsg")).map_or(0, |s| s.address());
                let want = at as i64 - (memsz.div_ceil(align) * align) as i64;
                assert_eq!(tls_g_offset(&exe), want, "Go {v} {variant:?}");
                assert_eq!(want, -8, "Go {v} {variant:?}");
            }
        }
    }

    #[test]
    fn newer_go_than_the_table_uses_the_newest_entry() {
        let newest = GO_OFFSETS.iter().max_by_key(|e| e.minor()).unwrap();
        let exe = Executable::open(&testgo::build(newest.toolchain, Variant::Stripped)).unwrap();
        let mut info = build_info(&exe);
        info.go_version = format!("go1.{}.0", newest.minor() + 1);
        let l = layout(&exe, &info).unwrap();
        assert_eq!(l.source, "table");
        assert_eq!(l.offsets, offsets(newest, tls_g_offset(&exe)).unwrap().0);
    }
}
