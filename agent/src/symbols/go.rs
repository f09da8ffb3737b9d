//! A Go program's layout as the kernel programs need it (zerotrace_common::GoOffsets):
//! thread-local g slot, struct member offsets and runtime type descriptors. The source of
//! the offsets is pluggable: DWARF today, a generated per-version table for stripped
//! binaries later; `GoLayout::source` says which one answered.
use zerotrace_common::GoOffsets;

use super::{Executable, SymbolError, buildinfo::BuildInfo, dwarf::GoDwarf};

/// Offsets of one executable, before the load bias of a running process is applied.
#[derive(Clone, Debug)]
pub struct GoLayout {
    pub offsets: GoOffsets,
    /// Virtual addresses (not yet biased) of the runtime types zerotrace compares against.
    pub type_tcpconn: Option<u64>,
    pub type_tlsconn: Option<u64>,
    pub type_response: Option<u64>,
    pub source: &'static str,
    /// Fields this Go version does not have (e.g. Request.Pattern before 1.23).
    pub absent: Vec<&'static str>,
}

impl GoLayout {
    /// The offsets with runtime type addresses moved by the process's load bias.
    pub fn biased(&self, bias: u64) -> GoOffsets {
        let mut o = self.offsets;
        o.type_tcpconn = self.type_tcpconn.map_or(0, |a| a.wrapping_add(bias));
        o.type_tlsconn = self.type_tlsconn.map_or(0, |a| a.wrapping_add(bias));
        o.type_response = self.type_response.map_or(0, |a| a.wrapping_add(bias));
        o
    }
}

/// Where Go struct offsets come from.
pub trait OffsetSource {
    fn name(&self) -> &'static str;
    fn layout(&self, exe: &Executable, info: &BuildInfo) -> Result<GoLayout, SymbolError>;
}

/// Offsets read from the executable's own DWARF (exact for that build).
pub struct DwarfSource;

const STRUCTS: &[&str] = &[
    "runtime.g",
    "net/http.conn",
    "sync/atomic.Pointer[net/http.response]",
    "net/http.response",
    "net/http.Request",
    "net/http.pattern",
    "net/url.URL",
    "net.TCPConn",
    "net.conn",
    "net.netFD",
    "internal/poll.FD",
    "crypto/tls.Conn",
    "runtime.sudog",
    "runtime.hchan",
    "net/http.Response",
];
const TYPES: &[&str] = &["*net.TCPConn", "*crypto/tls.Conn", "*net/http.response"];

impl OffsetSource for DwarfSource {
    fn name(&self) -> &'static str {
        "dwarf"
    }

    fn layout(&self, exe: &Executable, _info: &BuildInfo) -> Result<GoLayout, SymbolError> {
        let d = GoDwarf::load(exe, STRUCTS, TYPES)?;
        let mut absent = Vec::new();
        let need = |ty: &str, m: &str| -> Result<u16, SymbolError> {
            d.member(ty, m).map(|v| v as u16).ok_or_else(|| SymbolError::MissingDwarf {
                path: exe.path.clone(),
                what: format!("{ty}.{m}"),
                hint: "this Go version's layout is not understood; please report it with the Go version",
            })
        };
        let mut opt = |ty: &str, m: &str, label: &'static str| -> u16 {
            match d.member(ty, m) {
                Some(v) => v as u16,
                None => {
                    absent.push(label);
                    GoOffsets::NONE
                }
            }
        };
        let curreq_inner = d.member("sync/atomic.Pointer[net/http.response]", "v").unwrap_or(0) as u16;
        let netfd_sysfd = need("net.netFD", "pfd")? + need("internal/poll.FD", "Sysfd")?;
        // net.TCPConn embeds net.conn whose first member is fd.
        let tcpconn_fd = need("net.TCPConn", "conn")? + need("net.conn", "fd")?;
        let request_pattern = opt("net/http.Request", "Pattern", "Request.Pattern");
        let request_pat = opt("net/http.Request", "pat", "Request.pat");
        let pattern_str = if d.has_struct("net/http.pattern") {
            opt("net/http.pattern", "str", "pattern.str")
        } else {
            GoOffsets::NONE
        };
        let tlsconn_conn = opt("crypto/tls.Conn", "conn", "tls.Conn.conn");
        let offsets = GoOffsets {
            tls_g: tls_g_offset(exe),
            type_tcpconn: 0,
            type_tlsconn: 0,
            type_response: 0,
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
            _pad: [0; 3],
        };
        let types_base = exe.symbol("runtime.types").map(|s| s.addr);
        let ty = |name: &str| Some(types_base? + d.runtime_type(name)?);
        Ok(GoLayout {
            offsets,
            type_tcpconn: ty("*net.TCPConn"),
            type_tlsconn: ty("*crypto/tls.Conn"),
            type_response: ty("*net/http.response"),
            source: self.name(),
            absent,
        })
    }
}

/// Where g lives relative to the thread pointer. Go's g slot is the executable's TLS block,
/// which sits right below the thread pointer (x86-64 TLS variant II): -round_up(memsz, align).
/// Without a PT_TLS segment Go uses the same -8 slot.
pub fn tls_g_offset(exe: &Executable) -> i64 {
    match exe.tls {
        Some((memsz, align)) if memsz > 0 => -((memsz.div_ceil(align) * align) as i64),
        _ => -8,
    }
}

/// Tries each source in order of preference; the first that answers wins.
pub fn layout(exe: &Executable, info: &BuildInfo) -> Result<GoLayout, SymbolError> {
    DwarfSource.layout(exe, info)
}
