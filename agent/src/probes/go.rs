//! Where the Go uprobes of one process go: function entries from the symbol table, RET
//! instructions by decoding the function (no uretprobes on Go), file offsets for the kernel.
use std::path::Path;

use zerotrace_common::{TargetConfig, target_flags};

use super::{ProbeError, Probes, uprobes};
use crate::{
    cli::GoHttpProbes,
    model::Target,
    symbols::{Executable, SymbolError, disasm},
};

pub const CONN_SERVE: &str = "net/http.(*conn).serve";
pub const CONN_READ_REQUEST: &str = "net/http.(*conn).readRequest";
pub const SERVE_HTTP: &str = "net/http.serverHandler.ServeHTTP";

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Symbols(#[from] SymbolError),
    #[error(transparent)]
    Probe(#[from] ProbeError),
}

/// What was attached for one process, for the log line and the tests.
#[derive(Debug, Default, Clone)]
pub struct AttachReport {
    pub uprobes: usize,
    pub ret_sites: usize,
}

/// The kernel-side configuration of a Go target.
pub fn target_config(t: &Target) -> TargetConfig {
    TargetConfig { flags: target_flags::GO, _pad: 0, go: t.layout.biased(t.bias) }
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
    let rets = disasm::ret_addresses(code, addr)
        .map_err(|reason| SymbolError::Disassembly { path: exe.path.clone(), name: name.to_owned(), reason })?;
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

/// Attaches the Go net/http probes of `t` (whose executable is `exe`, opened at `path`).
/// `catch_up`: also hook `(*conn).readRequest` (temporarily) to learn the Go connection of
/// sockets that were open before zerotrace attached.
pub fn attach_http(
    probes: &mut Probes,
    t: &Target,
    exe: &Executable,
    path: &Path,
    mode: GoHttpProbes,
    catch_up: bool,
) -> Result<AttachReport, AttachError> {
    let mut report = AttachReport::default();
    match mode {
        GoHttpProbes::Conn => {
            let off = entry_offset(exe, CONN_SERVE)?;
            probes.attach_uprobe(t.pid, uprobes::GO_CONN_SERVE, path, off, false)?;
            report.uprobes += 1;
            if catch_up {
                if let Ok(off) = entry_offset(exe, CONN_READ_REQUEST) {
                    probes.attach_uprobe(t.pid, uprobes::GO_CONN_SERVE, path, off, true)?;
                    report.uprobes += 1;
                }
            }
        }
        GoHttpProbes::Handler => {
            let entry = entry_offset(exe, SERVE_HTTP)?;
            let rets = ret_offsets(exe, SERVE_HTTP)?;
            probes.attach_uprobe(t.pid, uprobes::GO_SERVE_HTTP, path, entry, false)?;
            for off in &rets {
                probes.attach_uprobe(t.pid, uprobes::GO_SERVE_HTTP_RET, path, *off, false)?;
            }
            report.uprobes += 1 + rets.len();
            report.ret_sites = rets.len();
        }
    }
    Ok(report)
}
