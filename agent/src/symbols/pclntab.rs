//! Go's own function table (`.gopclntab`): function names, entry addresses and sizes, read
//! without the ELF symbol table, so stripped binaries (`-ldflags='-s -w'`) can be traced.
//! Header formats since Go 1.16: magic 0xfffffffa (1.16-1.17: absolute entries), 0xfffffff0
//! (1.18-1.19) and 0xfffffff1 (1.20+), whose entries are 32-bit offsets from the start of
//! the module's text. Every read is bounds-checked: garbage gives an error, never a panic.

/// Go 1.16-1.17.
pub const MAGIC_116: u32 = 0xffff_fffa;
/// Go 1.18-1.19.
pub const MAGIC_118: u32 = 0xffff_fff0;
/// Go 1.20 and later.
pub const MAGIC_120: u32 = 0xffff_fff1;

use super::Executable;

/// At most this many functions: a header claiming more is garbage.
const MAX_FUNCS: u64 = 4 << 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PclntabError {
    #[error("no Go function table (.gopclntab) found")]
    NotFound,
    #[error("function table truncated: {0}")]
    Truncated(&'static str),
    #[error("unknown function table magic {0:#010x} (Go 1.15 or older, or not a function table)")]
    BadMagic(u32),
    #[error("implausible function table header: {0}")]
    BadHeader(String),
    #[error("the function table's text start is unknown (Go 1.26+ stores it in moduledata only)")]
    NoTextStart,
}

/// The fixed part of the table (runtime.pcHeader).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PcHeader {
    pub magic: u32,
    pub min_lc: u8,
    pub ptr_size: u8,
    pub nfunc: u64,
    pub nfiles: u64,
    /// Go 1.18-1.25: runtime.text as linked (unrelocated for PIE). 0 when not stored
    /// (Go 1.26+) and for Go 1.16-1.17 (entries are absolute).
    pub text_start: u64,
    pub funcname_offset: u64,
    pub cu_offset: u64,
    pub filetab_offset: u64,
    pub pctab_offset: u64,
    pub pcln_offset: u64,
}

impl PcHeader {
    /// Size of the header in bytes (64-bit).
    pub fn size(&self) -> usize {
        if self.magic == MAGIC_116 { 8 + 7 * 8 } else { 8 + 8 * 8 }
    }

    /// Parses and sanity-checks the header at the start of `data` (amd64: pointer size 8,
    /// instruction quantum 1; offsets inside `data`).
    pub fn parse(data: &[u8]) -> Result<Self, PclntabError> {
        let magic = read_u32(data, 0).ok_or(PclntabError::Truncated("header"))?;
        if data.len() < 8 {
            return Err(PclntabError::Truncated("header"));
        }
        if ![MAGIC_116, MAGIC_118, MAGIC_120].contains(&magic) {
            return Err(PclntabError::BadMagic(magic));
        }
        let (pad1, pad2, min_lc, ptr_size) = (data[4], data[5], data[6], data[7]);
        if pad1 != 0 || pad2 != 0 || min_lc != 1 || ptr_size != 8 {
            return Err(PclntabError::BadHeader(format!("pad {pad1},{pad2}, minLC {min_lc}, ptrSize {ptr_size} (want 0,0, 1, 8: amd64)")));
        }
        let word = |i: usize| read_u64(data, 8 + 8 * i).ok_or(PclntabError::Truncated("header"));
        let old = magic == MAGIC_116;
        let base = if old { 2 } else { 3 };
        let h = PcHeader {
            magic,
            min_lc,
            ptr_size,
            nfunc: word(0)?,
            nfiles: word(1)?,
            text_start: if old { 0 } else { word(2)? },
            funcname_offset: word(base)?,
            cu_offset: word(base + 1)?,
            filetab_offset: word(base + 2)?,
            pctab_offset: word(base + 3)?,
            pcln_offset: word(base + 4)?,
        };
        if h.nfunc == 0 || h.nfunc > MAX_FUNCS {
            return Err(PclntabError::BadHeader(format!("{} functions", h.nfunc)));
        }
        let len = data.len() as u64;
        let size = h.size() as u64;
        for (what, off) in
            [("funcnametab", h.funcname_offset), ("cutab", h.cu_offset), ("filetab", h.filetab_offset), ("pctab", h.pctab_offset), ("functab", h.pcln_offset)]
        {
            if off < size || off >= len {
                return Err(PclntabError::BadHeader(format!("{what} offset {off:#x} outside the table ({len:#x} bytes)")));
            }
        }
        Ok(h)
    }

    /// Whether function entries are offsets from a text start (Go 1.18+).
    pub fn relative_entries(&self) -> bool {
        self.magic != MAGIC_116
    }
}

/// One function: name and [entry, end) as linked (before any load bias).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Func {
    pub name: String,
    pub entry: u64,
    pub end: u64,
}

/// Every function of the table. `text_start` is where Go 1.18+ entry offsets count from
/// (runtime.text, i.e. moduledata.text); it is ignored for Go 1.16-1.17.
pub fn functions(data: &[u8], h: &PcHeader, text_start: u64) -> Result<Vec<Func>, PclntabError> {
    let functab = data.get(h.pcln_offset as usize..).ok_or(PclntabError::Truncated("functab"))?;
    let names = data.get(h.funcname_offset as usize..).ok_or(PclntabError::Truncated("funcnametab"))?;
    let n = h.nfunc as usize;
    // nfunc (entry, funcoff) pairs, then the end of the last function.
    let field = if h.relative_entries() { 4 } else { 8 };
    let need = (2 * n + 1).checked_mul(field).ok_or(PclntabError::Truncated("functab"))?;
    if functab.len() < need {
        return Err(PclntabError::Truncated("functab"));
    }
    let get = |i: usize| -> u64 { if field == 4 { u64::from(read_u32(functab, i * 4).unwrap_or(0)) } else { read_u64(functab, i * 8).unwrap_or(0) } };
    let entry_at = |i: usize| -> Result<u64, PclntabError> {
        let e = get(2 * i);
        if h.relative_entries() { text_start.checked_add(e).ok_or_else(|| PclntabError::BadHeader("entry overflows".into())) } else { Ok(e) }
    };
    let mut out = Vec::with_capacity(n);
    let mut prev = 0u64;
    for i in 0..n {
        let entry = entry_at(i)?;
        let end = if i + 1 < n {
            entry_at(i + 1)?
        } else {
            let e = get(2 * n);
            if h.relative_entries() { text_start.saturating_add(e) } else { e }
        };
        if entry < prev || end < entry {
            return Err(PclntabError::BadHeader(format!("function {i} out of order ({entry:#x}..{end:#x})")));
        }
        prev = entry;
        // _func: entryOff u32, nameOff i32 (1.18+); entry uintptr, nameOff i32 (1.16).
        let funcoff = get(2 * i + 1) as usize;
        let name_field = if h.relative_entries() { 4 } else { 8 };
        let name_off = funcoff.checked_add(name_field).and_then(|o| read_u32(functab, o)).ok_or(PclntabError::Truncated("_func"))? as i32;
        if name_off < 0 {
            return Err(PclntabError::BadHeader(format!("function {i} has a negative name offset")));
        }
        let name = c_str(names, name_off as usize).ok_or(PclntabError::Truncated("function name"))?;
        out.push(Func { name: String::from_utf8_lossy(name).into_owned(), entry, end });
    }
    Ok(out)
}

/// The function table of `exe`: its virtual address and its bytes (to the end of the
/// segment holding it). The `.gopclntab` section when the section headers name it, else
/// the `runtime.pclntab` or `runtime.firstmoduledata` symbols, else the first 8-aligned
/// header in a loaded segment whose function list parses (external linkers merge the
/// section into `.data.rel.ro` for PIE builds of Go 1.21-1.25).
pub fn locate(exe: &Executable) -> Result<(u64, &[u8]), PclntabError> {
    locate_by_section(exe).or_else(|| locate_by_symbol(exe)).or_else(|| locate_by_scan(exe)).ok_or(PclntabError::NotFound)
}

fn valid_at(exe: &Executable, va: u64) -> Option<(u64, &[u8])> {
    let b = exe.bytes_from(va)?;
    PcHeader::parse(b).ok().map(|_| (va, b))
}

fn locate_by_section(exe: &Executable) -> Option<(u64, &[u8])> {
    [".gopclntab", ".data.rel.ro.gopclntab"].iter().find_map(|name| exe.section_range(name).and_then(|(va, _)| valid_at(exe, va)))
}

fn locate_by_symbol(exe: &Executable) -> Option<(u64, &[u8])> {
    let va =
        exe.symtab_symbol("runtime.pclntab").map(|s| s.addr).or_else(|| exe.symtab_symbol("runtime.firstmoduledata").and_then(|s| exe.read_u64(s.addr)))?;
    valid_at(exe, va)
}

/// The first 8-aligned header in a loaded segment whose function list parses.
fn locate_by_scan(exe: &Executable) -> Option<(u64, &[u8])> {
    for (va, bytes, _) in exe.loaded_segments() {
        let first = ((8 - va % 8) % 8) as usize;
        let Some(hay) = bytes.get(first..) else { continue };
        for off in scan_for_header(hay) {
            let b = &hay[off..];
            let Ok(h) = PcHeader::parse(b) else { continue };
            if functions(b, &h, 0).is_ok() {
                return Some((va + (first + off) as u64, b));
            }
        }
    }
    None
}

/// Offsets in `hay` (a multiple of 8 from its start) where a plausible header begins.
pub fn scan_for_header(hay: &[u8]) -> impl Iterator<Item = usize> + '_ {
    (0..hay.len().saturating_sub(64)).step_by(8).filter(move |&i| {
        let m = read_u32(hay, i).unwrap_or(0);
        [MAGIC_116, MAGIC_118, MAGIC_120].contains(&m) && PcHeader::parse(&hay[i..]).is_ok()
    })
}

fn c_str(b: &[u8], off: usize) -> Option<&[u8]> {
    let s = b.get(off..)?;
    let end = s.iter().take(4096).position(|&c| c == 0)?;
    Some(&s[..end])
}

pub(crate) fn read_u32(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off.checked_add(4)?)?.try_into().ok()?))
}

pub(crate) fn read_u64(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off.checked_add(8)?)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny Go 1.20+ table with two functions, "a.f" at text+0x10 and "b.g" at text+0x40,
    /// text ending at +0x80.
    fn synthetic() -> Vec<u8> {
        let mut t = Vec::new();
        t.extend_from_slice(&MAGIC_120.to_le_bytes());
        t.extend_from_slice(&[0, 0, 1, 8]);
        let hdr = 8 + 8 * 8;
        let names = hdr as u64;
        let names_bytes = b"\0a.f\0b.g\0";
        let functab = names + names_bytes.len() as u64 + 3; // some padding
        for w in [2u64, 0, 0x1000, names, functab, functab, functab, functab] {
            t.extend_from_slice(&w.to_le_bytes());
        }
        t.extend_from_slice(names_bytes);
        t.resize(functab as usize, 0);
        // functab: (entry, funcoff) x2, end; then the two _func records.
        let funcs_at = 5 * 4;
        for w in [0x10u32, funcs_at, 0x40, funcs_at + 8, 0x80] {
            t.extend_from_slice(&w.to_le_bytes());
        }
        for (entry, name) in [(0x10u32, 1i32), (0x40, 5)] {
            t.extend_from_slice(&entry.to_le_bytes());
            t.extend_from_slice(&name.to_le_bytes());
        }
        t
    }

    #[test]
    fn parses_a_synthetic_table() {
        let t = synthetic();
        let h = PcHeader::parse(&t).unwrap();
        assert_eq!(h.nfunc, 2);
        assert_eq!(h.text_start, 0x1000);
        let f = functions(&t, &h, 0x40_0000).unwrap();
        assert_eq!(f, vec![Func { name: "a.f".into(), entry: 0x40_0010, end: 0x40_0040 }, Func { name: "b.g".into(), entry: 0x40_0040, end: 0x40_0080 },]);
        assert_eq!(scan_for_header(&[vec![0u8; 24], t.clone()].concat()).collect::<Vec<_>>(), vec![24]);
    }

    /// Every function the agent hooks.
    const HOOKED: &[&str] = &[
        "net/http.(*conn).serve",
        "net/http.(*conn).readRequest",
        "net/http.serverHandler.ServeHTTP",
        "net/http.(*Transport).roundTrip",
        "runtime.newproc1",
        "runtime.send",
        "runtime.recv",
        "runtime.chansend",
        "runtime.chanrecv",
        "runtime.selectgo",
        "runtime.typedmemmove",
        "runtime.typedmemclr",
        "database/sql.(*DB).queryDC",
        "database/sql.(*DB).execDC",
        "crypto/tls.(*Conn).Read",
        "crypto/tls.(*Conn).Write",
    ];

    /// pclntab entries equal the symbol table's for every hooked function; a function's
    /// pclntab size runs to the next entry, so it covers the symbol's size plus alignment
    /// padding.
    fn assert_matches_symtab(exe: &Executable, symtab: &Executable, ctx: &str) {
        let tables = exe.go_tables().unwrap_or_else(|e| panic!("{ctx}: {e}"));
        for name in HOOKED {
            let s = symtab.symtab_symbol(name).unwrap_or_else(|| panic!("{ctx}: {name} not in the symbol table"));
            let p = tables.function(name).unwrap_or_else(|| panic!("{ctx}: {name} not in pclntab"));
            assert_eq!(p.addr, s.addr, "{ctx}: {name}");
            assert!(p.size >= s.size && p.size - s.size < 64, "{ctx}: {name}: pclntab size {} vs symtab {}", p.size, s.size);
            assert_eq!(exe.symbol(name).map(|f| f.addr), Some(s.addr), "{ctx}: {name}");
        }
    }

    #[test]
    fn pclntab_matches_the_symbol_table_for_every_version_and_build() {
        use crate::symbols::{
            go_offsets_table::GO_OFFSETS,
            testgo::{self, Variant},
        };
        assert!(testgo::have_c_compiler(), "no C compiler (gcc/cc) for the cgo builds: install gcc (`cargo xtask setup` does)");
        for entry in GO_OFFSETS {
            let v = entry.toolchain;
            let open = |variant| Executable::open(&testgo::build(v, variant)).unwrap();
            let pairs = [
                (Variant::Plain, Variant::Plain),
                (Variant::Stripped, Variant::Plain),
                (Variant::Pie, Variant::Pie),
                (Variant::PieStripped, Variant::Pie),
                (Variant::Cgo, Variant::Cgo),
                (Variant::CgoPieStripped, Variant::CgoPie),
            ];
            for (variant, reference) in pairs {
                let ctx = format!("Go {v} {variant:?}");
                let exe = open(variant);
                let symtab = open(reference);
                assert_matches_symtab(&exe, &symtab, &ctx);
                // The symbol-less fallback finds the same table as the section or symbols.
                let scanned = locate_by_scan(&exe).unwrap_or_else(|| panic!("{ctx}: scan found no table"));
                assert_eq!(scanned.0, locate(&exe).unwrap().0, "{ctx}");
                let tables = exe.go_tables().unwrap();
                let md = tables.moduledata.as_ref().unwrap_or_else(|| panic!("{ctx}: no moduledata"));
                if let Some(first) = symtab.symtab_symbol("runtime.firstmoduledata").filter(|_| variant == reference) {
                    assert_eq!(md.vaddr, first.addr, "{ctx}");
                }
                if let Some(text) = symtab.symtab_symbol("runtime.text") {
                    assert_eq!(tables.text_start, text.addr, "{ctx}");
                }
            }
        }
    }

    #[test]
    fn garbage_and_truncated_tables_are_errors() {
        let t = synthetic();
        // Every truncation: an error (or a shorter table that still parses), never a panic.
        for len in 0..t.len() {
            let cut = &t[..len];
            if let Ok(h) = PcHeader::parse(cut) {
                let _ = functions(cut, &h, 0x40_0000);
            }
        }
        assert_eq!(PcHeader::parse(&t[..6]), Err(PclntabError::Truncated("header")));
        assert!(matches!(PcHeader::parse(&[0xffu8; 128]), Err(PclntabError::BadMagic(_))));
        let mut wrong_ptr = t.clone();
        wrong_ptr[7] = 4;
        assert!(matches!(PcHeader::parse(&wrong_ptr), Err(PclntabError::BadHeader(_))));
        // Pseudo-random garbage behind a valid magic, many times over.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            let mut g = MAGIC_118.to_le_bytes().to_vec();
            g.extend_from_slice(&[0, 0, 1, 8]);
            for _ in 0..40 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                // Small numbers, so that offsets land inside the buffer sometimes.
                g.extend_from_slice(&(seed % 300).to_le_bytes()[..4]);
            }
            if let Ok(h) = PcHeader::parse(&g) {
                let _ = functions(&g, &h, seed);
            }
        }
        // Offsets that point outside the table.
        let mut far = t.clone();
        far[8 + 8 * 7..8 + 8 * 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(PcHeader::parse(&far), Err(PclntabError::BadHeader(_))));
        // Functions out of order.
        let mut swapped = t.clone();
        let ft = read_u64(&t, 8 + 8 * 7).unwrap() as usize;
        swapped[ft..ft + 4].copy_from_slice(&0x50u32.to_le_bytes());
        let h = PcHeader::parse(&swapped).unwrap();
        assert!(functions(&swapped, &h, 0).is_err());
    }
}
