//! Go symbolization from the executable's own function table (`.gopclntab`, Go 1.20+), so
//! stripped binaries are symbolized too: the function containing a pc (binary search of the
//! functab), its file and line (pcvalue tables through cutab and filetab), and the inlined
//! calls at that pc (the inline tree, FUNCDATA_InlTree, indexed by PCDATA_InlTreeIndex),
//! walked as the runtime's `inlineUnwinder` does. Function names are printed as the runtime
//! prints them (`runtime.funcNameForPrint`: generic shapes become `[...]`).
//!
//! `_func` (Go 1.20-1.27, 44 bytes): entryOff, nameOff, args, deferreturn, pcsp, pcfile,
//! pcln, npcdata, cuOffset, startLine (u32/i32 each), funcID, flag, pad, nfuncdata (u8),
//! then npcdata u32 offsets into pctab and nfuncdata u32 offsets from moduledata.gofunc
//! (`^0`: none). `inlinedCall` (16 bytes): funcID u8, pad [3], nameOff, parentPc (from the
//! entry), startLine (i32 each). Every read is bounds-checked: garbage gives fewer lines.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use super::Line;
use super::{
    Executable,
    buildinfo::BuildInfo,
    pclntab::{MAGIC_120, read_u32},
};

/// abi.PCDATA_InlTreeIndex.
const PCDATA_INL_TREE_INDEX: u32 = 2;
/// abi.FUNCDATA_InlTree.
const FUNCDATA_INL_TREE: u32 = 3;
/// Size of the fixed part of `_func`.
const FUNC_SIZE: usize = 44;
/// Size of an `inlinedCall`.
const INLINED_CALL_SIZE: usize = 16;
/// Inline levels followed at one pc (Go's own limit is far lower in practice).
const MAX_INLINE_DEPTH: usize = 64;
/// Interned names kept before the cache is emptied.
const MAX_CACHED: usize = 1 << 16;
/// Longest name or file read.
const MAX_NAME: usize = 1 << 16;
/// Largest inline tree copied (entries).
const MAX_TREE_ENTRIES: u64 = 1 << 20;

/// Symbolizes code addresses of one Go executable from its function table. Owns copies of
/// the tables it needs, so it outlives the [`Executable`]; `Send + Sync`.
pub struct GoSymbolizer {
    /// The function table from its header on.
    tab: Vec<u8>,
    funcnametab: usize,
    cutab: usize,
    filetab: usize,
    pctab: usize,
    functab: usize,
    nfunc: usize,
    /// runtime.text: functab entries count from it.
    text_start: u64,
    /// `go:func.*` from moduledata.gofunc on (as far as inline trees reach); empty when the
    /// module data was not found (no inlined frames then).
    funcdata: Vec<u8>,
    names: Mutex<Names>,
}

/// Interned function names (by funcnametab offset) and files (by filetab offset).
#[derive(Default)]
struct Names {
    funcs: HashMap<u32, Arc<str>>,
    files: HashMap<u32, Arc<str>>,
}

/// The fields of one `_func` that symbolization needs.
#[derive(Clone, Copy, Debug)]
struct Func {
    /// Offset of the `_func` in `tab`.
    rec: usize,
    entry: u64,
    end: u64,
    name_off: u32,
    pcfile: u32,
    pcln: u32,
    npcdata: u32,
    cu_offset: u32,
    nfuncdata: u8,
}

impl GoSymbolizer {
    /// The bytes its copies of the executable's tables take.
    pub fn bytes(&self) -> usize {
        self.tab.len() + self.funcdata.len()
    }

    /// Built from the executable's function table (works on stripped binaries). Inlined
    /// frames need the module data (for moduledata.gofunc); without it every pc gets its
    /// physical function only.
    pub fn new(exe: &Executable) -> Result<Self, String> {
        let t = exe.go_tables().map_err(str::to_owned)?;
        let h = t.header;
        if h.magic != MAGIC_120 {
            return Err(format!("Go function table magic {:#010x}: symbolization needs Go 1.20 or later (magic {MAGIC_120:#010x})", h.magic));
        }
        let all = exe.bytes_from(t.pclntab).ok_or("the Go function table is not in the file")?;
        let functab = h.pcln_offset as usize;
        let nfunc = h.nfunc as usize;
        // The module data knows where the tables end; else keep the rest of the segment.
        let need = functab.saturating_add(8 * nfunc + 4);
        let len = t
            .moduledata
            .as_ref()
            .and_then(|m| m.pclntab_len())
            .and_then(|l| usize::try_from(l).ok())
            .filter(|&l| l >= need)
            .map_or(all.len(), |l| l.min(all.len()));
        if len < need {
            return Err("the Go function table is truncated".into());
        }
        let mut s = GoSymbolizer {
            tab: all[..len].to_vec(),
            funcnametab: h.funcname_offset as usize,
            cutab: h.cu_offset as usize,
            filetab: h.filetab_offset as usize,
            pctab: h.pctab_offset as usize,
            functab,
            nfunc,
            text_start: t.text_start,
            funcdata: Vec::new(),
            names: Mutex::new(Names::default()),
        };
        let minor = exe.section(".go.buildinfo").and_then(|b| BuildInfo::parse(&b).ok()).and_then(|b| b.version_tuple()).map(|(_, minor, _)| minor);
        if let Some(gofunc) = t.moduledata.as_ref().and_then(|m| m.gofunc(minor)) {
            let want = s.funcdata_len();
            if let Some(b) = exe.bytes_from(gofunc) {
                s.funcdata = b[..b.len().min(want)].to_vec();
            }
        }
        Ok(s)
    }

    /// The source lines at code address `pc` (an ELF virtual address as linked, i.e. the
    /// process address minus the load bias; callers pass return address - 1 for caller
    /// frames). Innermost first: inlined callees first, the physical function last.
    /// Empty when pc is outside every function. Never panics on garbage tables.
    pub fn lines(&self, pc: u64) -> Vec<Line> {
        let Some(f) = self.find(pc) else { return Vec::new() };
        let mut out = Vec::new();
        let tree = self.funcdata_off(&f, FUNCDATA_INL_TREE).and_then(|off| self.funcdata.get(off as usize..));
        let mut pc = pc;
        if let Some(tree) = tree {
            let mut index = self.pcdata(&f, PCDATA_INL_TREE_INDEX, pc);
            while index >= 0 && out.len() < MAX_INLINE_DEPTH {
                let Some(call) = tree.get(index as usize * INLINED_CALL_SIZE..).and_then(|c| c.get(..INLINED_CALL_SIZE)) else {
                    break;
                };
                let (name_off, parent_pc) = (read_i32(call, 4), read_i32(call, 8));
                out.push(self.line(&f, name_off.map_or(u32::MAX, |n| n as u32), pc));
                // The call site: an instruction of the caller's position, from the entry.
                let Some(parent) = parent_pc.and_then(|p| u64::try_from(p).ok()).and_then(|p| f.entry.checked_add(p)) else { break };
                if parent >= f.end {
                    break;
                }
                pc = parent;
                index = self.pcdata(&f, PCDATA_INL_TREE_INDEX, pc);
            }
        }
        out.push(self.line(&f, f.name_off, pc));
        out
    }

    /// Function `name_off` at `pc` of `f`'s code.
    fn line(&self, f: &Func, name_off: u32, pc: u64) -> Line {
        let function = self.func_name(name_off).unwrap_or_else(|| Arc::from("?"));
        let line = self.pcvalue(f, f.pcln, pc).max(0) as u32;
        Line { function, file: self.file(f, pc), line }
    }

    /// The function whose code contains `pc`.
    fn find(&self, pc: u64) -> Option<Func> {
        let off = u32::try_from(pc.checked_sub(self.text_start)?).ok()?;
        let entry = |i: usize| read_u32(&self.tab, self.functab + 8 * i);
        // The last function whose entry is <= off.
        let (mut lo, mut hi) = (0usize, self.nfunc);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if entry(mid)? <= off { lo = mid + 1 } else { hi = mid }
        }
        let i = lo.checked_sub(1)?;
        // functab[nfunc].entry is the end of the last function.
        let end = entry(i + 1)?;
        if off >= end {
            return None;
        }
        self.func_at(i, end)
    }

    /// The `_func` of functab entry `i`, whose code ends at text offset `end`.
    fn func_at(&self, i: usize, end: u32) -> Option<Func> {
        let entry = read_u32(&self.tab, self.functab + 8 * i)?;
        let rec = self.functab.checked_add(read_u32(&self.tab, self.functab + 8 * i + 4)? as usize)?;
        let r = self.tab.get(rec..rec.checked_add(FUNC_SIZE)?)?;
        let field = |n: usize| read_u32(r, 4 * n).unwrap_or(0);
        if field(0) != entry || end < entry {
            return None;
        }
        Some(Func {
            rec,
            entry: self.text_start.checked_add(u64::from(entry))?,
            end: self.text_start.checked_add(u64::from(end))?,
            name_off: field(1),
            pcfile: field(5),
            pcln: field(6),
            npcdata: field(7),
            cu_offset: field(8),
            nfuncdata: r[43],
        })
    }

    /// The value of pcdata table `table` at `pc`, -1 when absent.
    fn pcdata(&self, f: &Func, table: u32, pc: u64) -> i32 {
        if table >= f.npcdata {
            return -1;
        }
        let at = f.rec + FUNC_SIZE + 4 * table as usize;
        read_u32(&self.tab, at).map_or(-1, |off| self.pcvalue(f, off, pc))
    }

    /// Funcdata `i` of `f`: its offset from moduledata.gofunc.
    fn funcdata_off(&self, f: &Func, i: u32) -> Option<u32> {
        if i >= u32::from(f.nfuncdata) {
            return None;
        }
        let at = (f.rec + FUNC_SIZE).checked_add(4 * (f.npcdata as usize).checked_add(i as usize)?)?;
        read_u32(&self.tab, at).filter(|&o| o != u32::MAX)
    }

    /// The value at `target` of the pcvalue table at `off` of pctab (runtime.pcvalue,
    /// non-strict): -1 when there is no table or it does not cover `target`.
    fn pcvalue(&self, f: &Func, off: u32, target: u64) -> i32 {
        let mut found = -1;
        self.walk_pcvalue(f, off, |val, start, end| {
            if target < end {
                found = if target >= start { val } else { -1 };
                return false;
            }
            true
        });
        found
    }

    /// Calls `each(value, start, end)` for every run of the pcvalue table at `off` of
    /// pctab until it returns false; stops at the table's end or at garbage. A function
    /// of n bytes has at most n runs, so the walk stops after 2n + 64 steps.
    fn walk_pcvalue(&self, f: &Func, off: u32, mut each: impl FnMut(i32, u64, u64) -> bool) {
        if off == 0 {
            return;
        }
        let Some(mut p) = self.pctab.checked_add(off as usize).and_then(|o| self.tab.get(o..)) else { return };
        let (mut pc, mut val) = (f.entry, -1i32);
        let steps = (f.end - f.entry).saturating_mul(2).saturating_add(64);
        for _ in 0..steps {
            let Some((uv, n)) = uvarint(p) else { return };
            // A zero value delta ends the table, except on the first step.
            if uv == 0 && pc != f.entry {
                return;
            }
            p = &p[n..];
            val = val.wrapping_add(((uv >> 1) as i32) ^ -((uv & 1) as i32));
            let Some((pcd, n)) = uvarint(p) else { return };
            p = &p[n..];
            let start = pc;
            pc = pc.saturating_add(u64::from(pcd)); // PCQuantum 1 (amd64)
            if !each(val, start, pc) {
                return;
            }
        }
    }

    /// The file of `f`'s code at `pc`: pcfile, then cutab[cuOffset + fileno] into filetab.
    fn file(&self, f: &Func, pc: u64) -> Option<Arc<str>> {
        let fileno = u32::try_from(self.pcvalue(f, f.pcfile, pc)).ok()?;
        let index = (f.cu_offset as usize).checked_add(fileno as usize)?;
        let off = read_u32(&self.tab, self.cutab.checked_add(index.checked_mul(4)?)?).filter(|&o| o != u32::MAX)?;
        self.intern(false, off, |s| s.to_owned())
    }

    fn func_name(&self, off: u32) -> Option<Arc<str>> {
        self.intern(true, off, print_name)
    }

    /// The string at `off` of funcnametab (`func`) or filetab, interned.
    fn intern(&self, func: bool, off: u32, render: impl FnOnce(&str) -> String) -> Option<Arc<str>> {
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        let map = if func { &mut names.funcs } else { &mut names.files };
        if let Some(s) = map.get(&off) {
            return Some(s.clone());
        }
        let base = if func { self.funcnametab } else { self.filetab };
        let bytes = c_str(&self.tab, base.checked_add(off as usize)?)?;
        let s: Arc<str> = Arc::from(render(&String::from_utf8_lossy(bytes)));
        if map.len() >= MAX_CACHED {
            map.clear();
        }
        map.insert(off, s.clone());
        Some(s)
    }

    /// How many bytes of `go:func.*` the inline trees span: up to the end of the tree
    /// with the highest offset, whose size is given by the largest inline index its
    /// function's pcdata uses.
    fn funcdata_len(&self) -> usize {
        let funcs = || {
            (0..self.nfunc).filter_map(|i| {
                let end = read_u32(&self.tab, self.functab + 8 * (i + 1))?;
                let f = self.func_at(i, end)?;
                Some((f, self.funcdata_off(&f, FUNCDATA_INL_TREE)?))
            })
        };
        let Some(last) = funcs().map(|(_, off)| off).max() else { return 0 };
        let mut entries = 0u64;
        for (f, _) in funcs().filter(|&(_, off)| off == last) {
            let Some(table) = read_u32(&self.tab, f.rec + FUNC_SIZE + 4 * PCDATA_INL_TREE_INDEX as usize).filter(|_| f.npcdata > PCDATA_INL_TREE_INDEX) else {
                continue;
            };
            self.walk_pcvalue(&f, table, |val, _, _| {
                entries = entries.max(u64::try_from(val).map_or(0, |v| v + 1));
                true
            });
        }
        let len = u64::from(last) + entries.min(MAX_TREE_ENTRIES) * INLINED_CALL_SIZE as u64;
        usize::try_from(len).unwrap_or(usize::MAX)
    }
}

/// A function name as the runtime prints it (funcNameForPrint): the type arguments of a
/// generic function become `[...]` (`pkg.F[go.shape.int]` -> `pkg.F[...]`, also for a
/// generic method of a generic type); malformed brackets leave the name as it is.
fn print_name(name: &str) -> String {
    let Some(i) = name.find('[') else { return name.to_owned() };
    let Some(j) = name.rfind(']') else { return name.to_owned() };
    if j <= i {
        return name.to_owned();
    }
    let interior = &name[i + 1..j];
    if !interior.contains('[') {
        return format!("{}[...]{}", &name[..i], &name[j + 1..]);
    }
    // "...]___[...": a generic method of a generic type.
    let (mut depth, mut rbr, mut lbr) = (1i32, None, None);
    for (k, c) in interior.char_indices() {
        if c == '[' {
            depth += 1;
            if depth == 1 {
                lbr = Some(k);
                break;
            }
        } else if c == ']' {
            depth -= 1;
            if depth < 0 {
                break;
            }
            if depth == 0 {
                rbr = Some(k);
            }
        }
    }
    if depth == 1 {
        match (rbr, lbr) {
            (Some(r), Some(l)) if l > r => {
                return format!("{}[...]{}[...]{}", &name[..i], &interior[r + 1..l], &name[j + 1..]);
            }
            (None, None) => return format!("{}[...]{}", &name[..i], &name[j + 1..]),
            _ => {}
        }
    }
    name.to_owned()
}

/// An unsigned LEB128 of at most 5 bytes (a u32) and its length.
fn uvarint(p: &[u8]) -> Option<(u32, usize)> {
    let mut v = 0u32;
    for (n, &b) in p.iter().take(5).enumerate() {
        v |= u32::from(b & 0x7f) << (7 * n);
        if b & 0x80 == 0 {
            return Some((v, n + 1));
        }
    }
    None
}

fn read_i32(b: &[u8], off: usize) -> Option<i32> {
    read_u32(b, off).map(|v| v as i32)
}

/// The NUL-terminated string at `off`.
fn c_str(b: &[u8], off: usize) -> Option<&[u8]> {
    let s = b.get(off..)?;
    let end = s.iter().take(MAX_NAME).position(|&c| c == 0)?;
    Some(&s[..end])
}

#[cfg(test)]
mod tests {
    use std::{
        io::Write,
        path::Path,
        process::{Command, Stdio},
    };

    use super::*;
    use crate::symbols::testgo::{self, Variant};

    /// `go tool addr2line` of Go `version` on `bin` at each pc: (function, file, line).
    fn addr2line(version: &str, bin: &Path, pcs: &[u64]) -> Vec<(String, String, u32)> {
        let go = testgo::go(version);
        let mut child = Command::new(&go)
            .args(["tool", "addr2line"])
            .arg(bin)
            .env("GOTOOLCHAIN", "local")
            .env("GOTELEMETRY", "off")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("go tool addr2line");
        let input: String = pcs.iter().map(|pc| format!("{pc:#x}\n")).collect();
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2 * pcs.len(), "addr2line output: {text}");
        lines
            .chunks(2)
            .map(|c| {
                let (file, line) = c[1].rsplit_once(':').unwrap();
                // ":-1" or ":0" where the table has no line (alignment padding).
                (c[0].to_owned(), file.to_owned(), line.parse::<i64>().unwrap_or(0).max(0) as u32)
            })
            .collect()
    }

    /// Entries of the table's functions by (unprinted) name, in table order (some names
    /// occur twice: an assembly function and its ABI wrapper).
    fn entries_by_name(s: &GoSymbolizer) -> HashMap<String, Vec<u64>> {
        let mut out: HashMap<String, Vec<u64>> = HashMap::new();
        for i in 0..s.nfunc {
            let Some(f) = read_u32(&s.tab, s.functab + 8 * (i + 1)).and_then(|end| s.func_at(i, end)) else { continue };
            let name = c_str(&s.tab, s.funcnametab + f.name_off as usize).unwrap();
            out.entry(String::from_utf8_lossy(name).into_owned()).or_default().push(f.entry);
        }
        out
    }

    /// `n` pcs spread over the text of `s`, off any alignment.
    fn spread(s: &GoSymbolizer, n: u64) -> Vec<u64> {
        let end = s.text_start + u64::from(read_u32(&s.tab, s.functab + 8 * s.nfunc).unwrap());
        let first = s.text_start + u64::from(read_u32(&s.tab, s.functab).unwrap());
        let step = (end - first) / n;
        (0..n).map(|k| first + k * step + (k * 7) % 13).collect()
    }

    /// Go toolchains of the test matrix with the builds to check (cgo ones when a C compiler
    /// is installed).
    fn matrix() -> Vec<(&'static str, Vec<Variant>)> {
        assert!(testgo::have_c_compiler(), "no C compiler (gcc/cc) for the cgo builds: install gcc (`cargo xtask setup` does)");
        let variants = vec![Variant::Plain, Variant::Stripped, Variant::Pie, Variant::PieStripped, Variant::Cgo, Variant::CgoPieStripped];
        crate::symbols::go_offsets_table::GO_OFFSETS.iter().map(|e| (e.toolchain, variants.clone())).collect()
    }

    /// The unstripped build of the same kind.
    fn reference(variant: Variant) -> Variant {
        match variant {
            Variant::Stripped => Variant::Plain,
            Variant::PieStripped => Variant::Pie,
            Variant::CgoPieStripped => Variant::CgoPie,
            v => v,
        }
    }

    /// The function containing `pc`: (unprinted) name, which of the functions of that
    /// name, and pc's offset in it.
    fn locate(s: &GoSymbolizer, names: &HashMap<String, Vec<u64>>, pc: u64) -> Option<(String, usize, u64)> {
        let f = s.find(pc)?;
        let name = String::from_utf8_lossy(c_str(&s.tab, s.funcnametab + f.name_off as usize)?).into_owned();
        let nth = names.get(&name)?.iter().position(|&e| e == f.entry)?;
        Some((name, nth, pc - f.entry))
    }

    /// Checks `ours` against addr2line's answers; returns how many pcs have inlined frames.
    fn check(ctx: &str, pcs: &[u64], ours: &[Vec<Line>], want: &[(String, String, u32)], src: &str) -> usize {
        let mut inlined = 0;
        for ((pc, got), (func, file, line)) in pcs.iter().zip(ours).zip(want) {
            if func == "?" {
                assert!(got.is_empty(), "{ctx}: {pc:#x}: addr2line knows nothing, we say {got:?}");
                continue;
            }
            assert_eq!(got.last().map(|l| &*l.function), Some(print_name(func).as_str()), "{ctx}: {pc:#x}: {got:?}");
            let inner = &got[0];
            let file = file.replace(src, "SRC");
            let ours = inner.file.as_deref().unwrap_or("").replace(src, "SRC");
            assert_eq!((ours.as_str(), inner.line), (file.as_str(), *line), "{ctx}: {pc:#x}: {got:?}");
            inlined += usize::from(got.len() > 1);
        }
        inlined
    }

    /// The innermost line at a few hundred pcs spread over the text is addr2line's file and
    /// line (its function is the physical one, ours last), for every toolchain and build.
    /// Stripped builds are also checked against addr2line and our whole chains on the
    /// unstripped build of the same source, matched by function name and offset; a
    /// stripped external-linked PIE only so: addr2line finds no table in Go 1.21-1.25 ones (no .gopclntab section) and
    /// takes .text's start for runtime.text in Go 1.26+ ones (every answer 0x100 off).
    #[test]
    fn innermost_lines_match_addr2line() {
        for (v, variants) in matrix() {
            for variant in variants {
                let ctx = format!("Go {v} {variant:?}");
                let bin = testgo::build(v, variant);
                let exe = Executable::open(&bin).unwrap();
                let start = std::time::Instant::now();
                exe.go_tables().unwrap();
                let tables = start.elapsed();
                let start = std::time::Instant::now();
                let s = GoSymbolizer::new(&exe).unwrap_or_else(|e| panic!("{ctx}: {e}"));
                let built = start.elapsed();
                let mut pcs = spread(&s, 400);
                let names = entries_by_name(&s);
                if let Some(&[main]) = names.get("main.main").map(Vec::as_slice) {
                    pcs.extend((0..40).map(|d| main + d * 3));
                }
                let start = std::time::Instant::now();
                let ours: Vec<Vec<Line>> = pcs.iter().map(|&pc| s.lines(pc)).collect();
                let per_call = start.elapsed() / pcs.len() as u32;
                let src = |bin: &Path| format!("{}.src", bin.file_name().unwrap().to_string_lossy());
                let mut inlined = 0;
                if variant != Variant::CgoPieStripped {
                    let direct = addr2line(v, &bin, &pcs);
                    inlined = check(&ctx, &pcs, &ours, &direct, &src(&bin));
                    assert!(inlined > 10, "{ctx}: only {inlined} of {} pcs have inlined frames", pcs.len());
                }
                let refv = reference(variant);
                if refv != variant {
                    let ref_bin = testgo::build(v, refv);
                    let ref_sym = GoSymbolizer::new(&Executable::open(&ref_bin).unwrap()).unwrap();
                    let ref_names = entries_by_name(&ref_sym);
                    // Our pcs moved to the same function and offset of the reference build.
                    let (mut kept, mut mapped, mut kept_lines) = (Vec::new(), Vec::new(), Vec::new());
                    for (pc, got) in pcs.iter().zip(&ours) {
                        let Some((name, nth, off)) = locate(&s, &names, *pc) else { continue };
                        let entry = ref_names.get(&name).and_then(|e| e.get(nth)).unwrap_or_else(|| panic!("{ctx}: {name} not in {refv:?}"));
                        kept.push(*pc);
                        mapped.push(entry + off);
                        kept_lines.push(
                            got.iter().map(|l| Line { file: l.file.as_deref().map(|f| f.replace(&src(&bin), &src(&ref_bin)).into()), ..l.clone() }).collect(),
                        );
                    }
                    // Whole chains (inlined frames too) equal the unstripped build's.
                    for ((pc, got), r) in kept.iter().zip(&kept_lines).zip(&mapped) {
                        assert_eq!(got, &ref_sym.lines(*r), "{ctx}: {pc:#x} vs {refv:?} {r:#x}");
                    }
                    let want = addr2line(v, &ref_bin, &mapped);
                    let n = check(&format!("{ctx} vs {refv:?}"), &kept, &kept_lines, &want, &src(&ref_bin));
                    assert!(n > 10, "{ctx}: only {n} of {} pcs have inlined frames", kept.len());
                    inlined = inlined.max(n);
                }
                eprintln!("{ctx}: go_tables() {tables:?}, then new() {built:?}, lines() {per_call:?} per pc, {inlined} of {} pcs inlined", pcs.len());
            }
        }
    }

    /// The inlined calls of DWARF (DW_TAG_inlined_subroutine, innermost first) at `pcs`:
    /// (function, call line) per level.
    fn dwarf_inlined(exe: &Executable, pcs: &[u64]) -> Vec<Vec<(String, u64)>> {
        use gimli::{AttributeValue, EndianSlice, LittleEndian};
        let sections =
            gimli::DwarfSections::load(|id| -> Result<std::borrow::Cow<'_, [u8]>, gimli::Error> { Ok(exe.section(id.name()).unwrap_or_default()) }).unwrap();
        let dwarf = sections.borrow(|s| EndianSlice::new(s, LittleEndian));
        let mut sorted: Vec<(u64, usize)> = pcs.iter().enumerate().map(|(i, &pc)| (pc, i)).collect();
        sorted.sort();
        // Names of every subprogram by .debug_info offset (abstract origins may lie in
        // other units), and every inlined instance: (pc index, depth, origin, call line).
        let mut names = HashMap::new();
        let mut found: Vec<(usize, isize, usize, u64)> = Vec::new();
        let mut units = dwarf.units();
        while let Some(header) = units.next().unwrap() {
            let unit = dwarf.unit(header).unwrap();
            let mut entries = unit.entries();
            while let Some(e) = entries.next_dfs().unwrap() {
                let here = e.offset().to_debug_info_offset(&unit.header).unwrap().0;
                if e.tag() == gimli::DW_TAG_subprogram
                    && let Some(n) = e.attr_value(gimli::DW_AT_name)
                {
                    names.insert(here, dwarf.attr_string(&unit, n).unwrap().to_string_lossy().into_owned());
                }
                if e.tag() != gimli::DW_TAG_inlined_subroutine {
                    continue;
                }
                let origin = match e.attr_value(gimli::DW_AT_abstract_origin) {
                    Some(AttributeValue::UnitRef(r)) => r.to_debug_info_offset(&unit.header).unwrap().0,
                    Some(AttributeValue::DebugInfoRef(r)) => r.0,
                    other => panic!("abstract origin {other:?}"),
                };
                let call_line = e.attr_value(gimli::DW_AT_call_line).and_then(|v| v.udata_value()).unwrap_or(0);
                let mut ranges = dwarf.die_ranges(&unit, e).unwrap();
                while let Some(r) = ranges.next().unwrap() {
                    let first = sorted.partition_point(|&(pc, _)| pc < r.begin);
                    for &(_, i) in sorted[first..].iter().take_while(|&&(pc, _)| pc < r.end) {
                        found.push((i, e.depth(), origin, call_line));
                    }
                }
            }
        }
        let mut out = vec![Vec::new(); pcs.len()];
        found.sort_by_key(|&(i, depth, ..)| (i, std::cmp::Reverse(depth)));
        for (i, _, origin, call_line) in found {
            out[i].push((names.get(&origin).cloned().unwrap_or_default(), call_line));
        }
        out
    }

    /// The inline chains agree with DWARF's inlined subroutines: same callees innermost
    /// first, and each caller's line is DWARF's call line.
    #[test]
    fn inlined_frames_match_dwarf() {
        for v in ["1.21.13", "1.27.3"] {
            let exe = Executable::open(&testgo::build(v, Variant::Plain)).unwrap();
            let s = GoSymbolizer::new(&exe).unwrap();
            let pcs = spread(&s, 3000);
            let dwarf = dwarf_inlined(&exe, &pcs);
            let (mut agree, mut inlined) = (0, 0);
            for (pc, want) in pcs.iter().zip(&dwarf) {
                let got = s.lines(*pc);
                if got.is_empty() {
                    continue;
                }
                let chain: Vec<(String, u64)> = got.windows(2).map(|w| (w[0].function.to_string(), u64::from(w[1].line))).collect();
                let want: Vec<(String, u64)> = want.iter().map(|(f, l)| (print_name(f), *l)).collect();
                inlined += usize::from(!chain.is_empty());
                if chain == want {
                    agree += 1;
                } else {
                    eprintln!("Go {v} {pc:#x}: ours {got:?}\n    DWARF {want:?}");
                }
            }
            eprintln!("Go {v}: {agree} of {} pcs agree with DWARF, {inlined} inlined", pcs.len());
            assert!(inlined > 300, "Go {v}: only {inlined} inlined pcs");
            assert!(agree * 100 >= pcs.len() * 99, "Go {v}: {agree} of {} agree", pcs.len());
        }
    }

    /// Every inline tree entry some pcdata names lies in the copied `go:func.*` bytes, and
    /// the module data's gofunc is the go:func.* symbol, whether the Go version is known.
    #[test]
    fn inline_trees_are_copied_whole() {
        for (v, _) in matrix() {
            let minor = crate::symbols::buildinfo::parse_go_version(&format!("go{v}")).unwrap().1;
            for variant in [Variant::Plain, Variant::PieStripped] {
                let ctx = format!("Go {v} {variant:?}");
                let exe = Executable::open(&testgo::build(v, variant)).unwrap();
                let md = exe.go_tables().unwrap().moduledata.as_ref().unwrap();
                let gofunc = md.gofunc(Some(minor)).unwrap();
                assert_eq!(md.gofunc(None), Some(gofunc), "{ctx}");
                if let Some(sym) = exe.symtab_symbol("go:func.*") {
                    assert_eq!(gofunc, sym.addr, "{ctx}");
                }
                let s = GoSymbolizer::new(&exe).unwrap();
                let mut trees = 0;
                for i in 0..s.nfunc {
                    let f = s.func_at(i, read_u32(&s.tab, s.functab + 8 * (i + 1)).unwrap()).unwrap();
                    let Some(tree) = s.funcdata_off(&f, FUNCDATA_INL_TREE) else { continue };
                    trees += 1;
                    let table = read_u32(&s.tab, f.rec + FUNC_SIZE + 4 * PCDATA_INL_TREE_INDEX as usize).unwrap();
                    s.walk_pcvalue(&f, table, |val, _, _| {
                        let end = tree as usize + (val.max(-1) + 1) as usize * INLINED_CALL_SIZE;
                        assert!(end <= s.funcdata.len(), "{ctx}: tree of function {i} reaches {end:#x}");
                        true
                    });
                }
                assert!(trees > 1000, "{ctx}: {trees} inline trees");
            }
        }
    }

    #[test]
    fn pcs_outside_the_text_have_no_lines() {
        let exe = Executable::open(&testgo::build("1.27.3", Variant::Plain)).unwrap();
        let s = GoSymbolizer::new(&exe).unwrap();
        let end = s.text_start + u64::from(read_u32(&s.tab, s.functab + 8 * s.nfunc).unwrap());
        for pc in [0, s.text_start - 1, end, end + 1, u64::MAX, s.text_start + (1 << 32)] {
            assert_eq!(s.lines(pc), Vec::new(), "{pc:#x}");
        }
        assert!(!s.lines(end - 1).is_empty());
        fn send_sync<T: Send + Sync>() {}
        send_sync::<GoSymbolizer>();
    }

    /// Random corruption of the tables (and truncation) gives some or no lines, never a
    /// panic or an endless walk.
    #[test]
    fn garbage_tables_never_panic() {
        let exe = Executable::open(&testgo::build("1.21.13", Variant::Plain)).unwrap();
        let good = GoSymbolizer::new(&exe).unwrap();
        let pcs = spread(&good, 200);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let copy = |tab: Vec<u8>, funcdata: Vec<u8>| GoSymbolizer { tab, funcdata, names: Mutex::default(), ..good };
        for round in 0..60 {
            let (mut tab, mut funcdata) = (good.tab.clone(), good.funcdata.clone());
            match round % 3 {
                0 => {
                    // Flip bytes everywhere, densest in the functab and _func records.
                    for _ in 0..20_000 {
                        let r = next();
                        let at = if r % 2 == 0 { good.functab + (r >> 8) as usize % (tab.len() - good.functab) } else { (r >> 8) as usize % tab.len() };
                        tab[at] = (r >> 40) as u8;
                    }
                }
                1 => {
                    for _ in 0..5_000 {
                        let r = next();
                        let at = (r >> 8) as usize % funcdata.len();
                        funcdata[at] = (r >> 40) as u8;
                    }
                }
                _ => {
                    tab.truncate((next() as usize) % tab.len());
                    funcdata.truncate((next() as usize) % (funcdata.len() + 1));
                }
            }
            let s = copy(tab, funcdata);
            for &pc in &pcs {
                assert!(s.lines(pc).len() <= MAX_INLINE_DEPTH + 1);
            }
            let _ = s.funcdata_len();
        }
    }

    #[test]
    fn names_print_like_the_runtime() {
        assert_eq!(print_name("main.(*T).hot"), "main.(*T).hot");
        assert_eq!(print_name("main.F[go.shape.int]"), "main.F[...]");
        assert_eq!(print_name("main.(*List[go.shape.string]).Push"), "main.(*List[...]).Push");
        assert_eq!(print_name("main.F[go.shape.[]int]"), "main.F[...]");
        assert_eq!(print_name("p.T[go.shape.int].M[go.shape.string]"), "p.T[...].M[...]");
        assert_eq!(print_name("p.F[go.shape.int].func1"), "p.F[...].func1");
        assert_eq!(print_name("odd]name["), "odd]name[");
        assert_eq!(print_name("p.F[a]]b[c]"), "p.F[a]]b[c]");
    }
}
