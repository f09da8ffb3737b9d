//! Where the Go uprobes of one process go: function entries from the symbol table, RET
//! instructions by decoding the function (no uretprobes on Go), file offsets for the kernel.
use std::path::Path;

use zerotrace_common::{GoOffsets, TargetConfig, target_flags};

use super::{ProbeError, Probes, uprobes};
use crate::{
    cli::GoHttpProbes,
    settings::GoCausality,
    model::Target,
    symbols::{Executable, SymbolError, disasm},
};

pub const CONN_SERVE: &str = "net/http.(*conn).serve";
pub const CONN_READ_REQUEST: &str = "net/http.(*conn).readRequest";
pub const SERVE_HTTP: &str = "net/http.serverHandler.ServeHTTP";
pub const ROUND_TRIP: &str = "net/http.(*Transport).roundTrip";
pub const NEWPROC1: &str = "runtime.newproc1";
/// The closure `newproc` runs on the system stack: newproc1, then runqput(pp, newg, next).
pub const NEWPROC_FUNC1: &str = "runtime.newproc.func1";
pub const RUNQPUT: &str = "runtime.runqput";
pub const SQL_QUERY: &str = "database/sql.(*DB).queryDC";
pub const SQL_EXEC: &str = "database/sql.(*DB).execDC";
pub const CHAN_SEND: &str = "runtime.send";
pub const CHAN_RECV: &str = "runtime.recv";
pub const CHANSEND: &str = "runtime.chansend";
pub const CHANRECV: &str = "runtime.chanrecv";
pub const SELECTGO: &str = "runtime.selectgo";
pub const TYPEDMEMMOVE: &str = "runtime.typedmemmove";
pub const TYPEDMEMCLR: &str = "runtime.typedmemclr";

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

/// Finds the channel buffer CALL sites from each function's direct calls. The runtime's
/// source fixes their shape in Go 1.21-1.27 (see ARCHITECTURE.md): chansend calls
/// typedmemmove once (the buffered enqueue); chanrecv's typedmemclr calls clear either the
/// slot just taken or, on a closed channel, the receiver's variable; select's bufrecv case
/// is a typedmemmove directly followed by a typedmemclr of the same slot, its bufsend case
/// the other typedmemmove; recv moves the old value out, then the sender's value in (its
/// last typedmemmove). Anything else is refused rather than guessed.
pub fn channel_sites(
    calls_of: &dyn Fn(&str) -> Option<Vec<(u64, u64)>>,
    typedmemmove: u64,
    typedmemclr: u64,
) -> Result<ChannelSites, String> {
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
    let sends: Vec<u64> = sel_moves
        .iter()
        .filter(|&&i| sel.get(i + 1).is_none_or(|(_, t)| *t != typedmemclr))
        .map(|&i| sel[i].0)
        .collect();
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
    /// Client spans (Transport.roundTrip hooked), goroutine spawns and channel handoffs
    /// followed.
    pub client: bool,
    pub sql: bool,
    pub spawns: bool,
    pub channels: bool,
}

/// The kernel-side configuration of a Go target.
pub fn target_config(t: &Target) -> TargetConfig {
    TargetConfig { flags: target_flags::GO, _pad: 0, go: t.layout.biased(t.bias) }
}

/// Attaches the hooks that make span trees: client calls (entry and RETs of
/// `(*Transport).roundTrip`, when the program has an HTTP client), goroutine spawns (RETs of
/// `runtime.newproc1`) and channel handoffs (entries of `runtime.send`/`runtime.recv`).
/// A function a program does not have is skipped (the program cannot make that edge);
/// runtime layout fields a Go version lacks switch the matching hook off, said in the log.
pub fn attach_causality(
    probes: &mut Probes,
    t: &Target,
    exe: &Executable,
    path: &Path,
    want: &GoCausality,
    report: &mut AttachReport,
) -> Result<(), AttachError> {
    let go = &t.layout.offsets;
    if exe.symbol(ROUND_TRIP).is_some() {
        report.uprobes += 1 + attach_call(probes, t.pid, exe, path, ROUND_TRIP, uprobes::GO_ROUND_TRIP, uprobes::GO_ROUND_TRIP_RET)?;
        report.client = true;
    }
    if exe.symbol(SQL_QUERY).is_some() && exe.symbol(SQL_EXEC).is_some() {
        for (name, prog) in [(SQL_QUERY, uprobes::GO_SQL_QUERY), (SQL_EXEC, uprobes::GO_SQL_EXEC)] {
            report.uprobes += 1 + attach_call(probes, t.pid, exe, path, name, prog, uprobes::GO_SQL_RET)?;
        }
        report.sql = true;
    }
    if want.spawns {
        if go.g_parent_goid == GoOffsets::NONE {
            tracing::warn!(pid = t.pid, "this Go version has no g.parentGoid: spans are not followed into spawned goroutines");
        } else {
            // Cheapest: the CALL to runqput that follows newproc1 in newproc's closure (an
            // emulated probe); else every RET of newproc1 (single-stepped).
            let site = spawn_call_site(exe).and_then(|a| exe.file_offset(a));
            match site {
                Some(off) => {
                    probes.attach_uprobe(t.pid, uprobes::GO_SPAWN_CALL, path, off, false)?;
                    report.uprobes += 1;
                }
                None => report.uprobes += attach_rets(probes, t.pid, exe, path, NEWPROC1, uprobes::GO_NEWPROC1_RET)?,
            }
            report.spawns = true;
        }
    }
    if want.channels {
        let sites = match (exe.symbol(TYPEDMEMMOVE), exe.symbol(TYPEDMEMCLR)) {
            (Some(m), Some(c)) => channel_sites(&|f| direct_calls(exe, f), m.addr, c.addr),
            _ => Err("runtime.typedmemmove/typedmemclr not found".into()),
        };
        match sites {
            Err(why) => tracing::warn!(pid = t.pid, %why, "the Go runtime's channel code is not understood: spans are not followed over channels"),
            Ok(_) if go.sudog_g == GoOffsets::NONE || go.hchan_dataqsiz == GoOffsets::NONE => {
                tracing::warn!(pid = t.pid, "runtime channel layout unknown: spans are not followed over channels")
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
                probes.attach_uprobe(t.pid, uprobes::GO_CHAN_SEND, path, send, false)?;
                probes.attach_uprobe(t.pid, uprobes::GO_CHAN_RECV, path, recv, false)?;
                for a in &sites.put {
                    probes.attach_uprobe(t.pid, uprobes::GO_CHAN_PUT, path, file(*a)?, false)?;
                }
                for a in &sites.take {
                    probes.attach_uprobe(t.pid, uprobes::GO_CHAN_TAKE, path, file(*a)?, false)?;
                }
                probes.attach_uprobe(t.pid, uprobes::GO_CHAN_REFILL, path, file(sites.refill)?, false)?;
                report.uprobes += 3 + sites.put.len() + sites.take.len();
                report.channels = true;
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
fn attach_call(
    probes: &mut Probes,
    pid: u32,
    exe: &Executable,
    path: &Path,
    name: &str,
    entry: &'static str,
    ret: &'static str,
) -> Result<usize, AttachError> {
    let off = entry_offset(exe, name)?;
    probes.attach_uprobe(pid, entry, path, off, false)?;
    attach_rets(probes, pid, exe, path, name, ret)
}

/// Hooks every RET of function `name` with program `ret`; returns how many there are.
fn attach_rets(probes: &mut Probes, pid: u32, exe: &Executable, path: &Path, name: &str, ret: &'static str) -> Result<usize, AttachError> {
    let rets = ret_offsets(exe, name)?;
    for off in &rets {
        probes.attach_uprobe(pid, ret, path, *off, false)?;
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
            let rets = attach_call(probes, t.pid, exe, path, SERVE_HTTP, uprobes::GO_SERVE_HTTP, uprobes::GO_SERVE_HTTP_RET)?;
            report.uprobes += 1 + rets;
            report.ret_sites = rets;
        }
    }
    Ok(report)
}
