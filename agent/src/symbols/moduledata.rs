//! Go's runtime tables of one executable without the ELF symbol table or DWARF: the function
//! table (pclntab) and the module data (runtime.firstmoduledata) that points at it, and
//! through it the runtime type descriptors (`*net.TCPConn`, ...) the kernel compares
//! interface values against.
//!
//! moduledata (amd64, 8-byte words; the prefix up to `gcbss` is the same since Go 1.16):
//! 0 pcHeader, 1-3 funcnametab, 4-6 cutab, 7-9 filetab, 10-12 pctab, 13-15 pclntable,
//! 16-18 ftab, 19 findfunctab, 20 minpc, 21 maxpc, 22 text, 23 etext, 24-36 data/bss/...,
//! then Go 1.21-1.25: 37 types, 38 etypes, 39 rodata, 40 gofunc, 41-43 textsectmap,
//! 44-46 typelinks; Go 1.26: epclntab at 41 moves textsectmap to 42-44 and typelinks to
//! 45-47; Go 1.27: 37 types, 38 typedesclen, 39 etypes, 40-41 itab offset/size, no
//! typelinks (type descriptors lie in [types + 8, types + typedesclen)).
//!
//! Type descriptors (internal/abi.Type, 48 bytes; unchanged 1.21-1.27): Size_, PtrBytes,
//! Hash u32 @16, TFlag u8 @20, Align, FieldAlign, Kind_ u8 @23 (low 5 bits: kind),
//! Equal @24, GCData @32, Str NameOff i32 @40 (from types), PtrToThis @44; a pointer type
//! adds Elem *Type @48. A name is a flags byte, a uvarint length and the bytes; with
//! TFlagExtraStar the stored string has a '*' too many (T shares "*T" with its pointer).
use std::collections::HashMap;

use super::{
    Executable, FunctionSym,
    pclntab::{self, PcHeader, read_u32, read_u64},
};

const WORDS: usize = 48;
const KIND_POINTER: u8 = 22;
const TFLAG_EXTRA_STAR: u8 = 1 << 1;
const TYPE_SIZE: usize = 48;

/// The Go function table and module data of an executable.
#[derive(Debug)]
pub struct GoTables {
    /// Virtual address of the pcHeader (unrelocated).
    pub pclntab: u64,
    pub header: PcHeader,
    /// Where function entries count from (runtime.text).
    pub text_start: u64,
    pub moduledata: Option<Moduledata>,
    funcs: HashMap<String, FunctionSym>,
}

impl GoTables {
    /// Locates and parses the function table, and the module data pointing at it.
    pub fn load(exe: &Executable) -> Result<Self, String> {
        let (pclntab, bytes) = pclntab::locate(exe).map_err(|e| e.to_string())?;
        let header = PcHeader::parse(bytes).map_err(|e| e.to_string())?;
        let moduledata = Moduledata::find(exe, pclntab, &header).ok();
        let text_start = if !header.relative_entries() {
            0
        } else if header.text_start != 0 {
            header.text_start
        } else if let Some(md) = &moduledata {
            md.text()
        } else if let Some(s) = exe.symtab_symbol("runtime.text") {
            s.addr
        } else {
            return Err(pclntab::PclntabError::NoTextStart.to_string());
        };
        let list = pclntab::functions(bytes, &header, text_start).map_err(|e| e.to_string())?;
        let mut funcs = HashMap::with_capacity(list.len());
        for f in list {
            funcs.entry(f.name).or_insert(FunctionSym { addr: f.entry, size: f.end - f.entry });
        }
        Ok(GoTables { pclntab, header, text_start, moduledata, funcs })
    }

    pub fn function(&self, name: &str) -> Option<FunctionSym> {
        self.funcs.get(name).copied()
    }

    pub fn functions(&self) -> impl Iterator<Item = (&str, FunctionSym)> {
        self.funcs.iter().map(|(n, f)| (n.as_str(), *f))
    }

    /// Address of the runtime type descriptor of a pointer type named as in DWARF (e.g.
    /// `*crypto/tls.Conn`), found through the module data of a Go `minor` binary.
    pub fn runtime_type(&self, exe: &Executable, minor: u32, dwarf_name: &str) -> Result<Option<u64>, String> {
        let md = self.moduledata.as_ref().ok_or("the Go module data (runtime.firstmoduledata) was not found")?;
        let region = md.types(exe, minor)?;
        Ok(region.find_pointer_type(exe, &rtype_name(dwarf_name)))
    }
}

/// The string a type descriptor holds for a type named as in DWARF: packages are named by
/// the last element of their path (`*crypto/tls.Conn` -> `*tls.Conn`; a package whose name
/// differs from it, as `gopkg.in/yaml.v3`'s `yaml`, is not found this way).
pub fn rtype_name(dwarf_name: &str) -> String {
    let stars = dwarf_name.len() - dwarf_name.trim_start_matches('*').len();
    let rest = &dwarf_name[stars..];
    // The package path ends at its last '/' (module paths have dots: github.com/lib/pq),
    // before any type arguments.
    let head = rest.split('[').next().unwrap_or(rest);
    let cut = head.rfind('/').map_or(0, |i| i + 1);
    format!("{}{}", &dwarf_name[..stars], &rest[cut..])
}

/// The first words of a runtime.moduledata.
#[derive(Clone, Debug)]
pub struct Moduledata {
    pub vaddr: u64,
    words: Vec<u64>,
}

/// Where the type descriptors of a module lie.
#[derive(Clone, Copy, Debug)]
pub struct TypesRegion {
    pub types: u64,
    pub etypes: u64,
    /// typelinks slice (pointer, length) of Go 1.21-1.26.
    pub typelinks: Option<(u64, u64)>,
    /// End of the descriptors (Go 1.27+: types + typedesclen; else etypes).
    pub desc_end: u64,
}

impl Moduledata {
    fn read(exe: &Executable, vaddr: u64) -> Option<Self> {
        let b = exe.bytes_at(vaddr, (WORDS * 8) as u64)?;
        let words = (0..WORDS).map(|i| read_u64(b, i * 8).unwrap_or(0)).collect();
        Some(Moduledata { vaddr, words })
    }

    fn word(&self, i: usize) -> u64 {
        self.words.get(i).copied().unwrap_or(0)
    }

    pub fn text(&self) -> u64 {
        self.word(22)
    }

    pub fn etext(&self) -> u64 {
        self.word(23)
    }

    pub fn minpc(&self) -> u64 {
        self.word(20)
    }

    /// moduledata.gofunc (`go:func.*`), the base of every `_func.funcdata` offset, by the
    /// layout of Go `minor` (Go 1.21-1.26: rodata at word 39, gofunc at 40; 1.27+: 42, 43).
    /// An unknown version takes the first layout whose gofunc lies at or after its rodata.
    /// None when the words are implausible (zero, or before rodata).
    pub fn gofunc(&self, minor: Option<u32>) -> Option<u64> {
        let layouts: &[(usize, usize)] = match minor {
            Some(..=26) => &[(39, 40)],
            Some(_) => &[(42, 43)],
            None => &[(39, 40), (42, 43)],
        };
        layouts.iter().find_map(|&(rodata, gofunc)| {
            let (r, g) = (self.word(rodata), self.word(gofunc));
            (r != 0 && g >= r).then_some(g)
        })
    }

    /// Bytes from the pcHeader to the end of the furthest table slice (funcnametab, cutab,
    /// filetab, pctab, pclntable, ftab) this module data describes; None when a slice
    /// starts before the header or its end overflows.
    pub fn pclntab_len(&self) -> Option<u64> {
        let start = self.word(0);
        // (pointer word, element size); the length follows the pointer.
        let slices = [(1, 1), (4, 4), (7, 1), (10, 1), (13, 1), (16, 8)];
        let mut end = start;
        for (i, elem) in slices {
            let len = self.word(i + 1).checked_mul(elem)?;
            end = end.max(self.word(i).checked_add(len)?);
            if self.word(i) < start {
                return None;
            }
        }
        Some(end - start)
    }

    /// Whether this is the module data of the table at `pclntab`: its slices point into
    /// the table at the header's offsets, and its pc range lies inside its text.
    fn matches(&self, pclntab: u64, h: &PcHeader) -> bool {
        let at = |off: u64| pclntab.wrapping_add(off);
        self.word(0) == pclntab
            && self.word(1) == at(h.funcname_offset)
            && self.word(4) == at(h.cu_offset)
            && self.word(7) == at(h.filetab_offset)
            && self.word(10) == at(h.pctab_offset)
            && self.word(13) == at(h.pcln_offset)
            && self.word(16) == at(h.pcln_offset)
            && self.text() <= self.minpc()
            && self.minpc() < self.word(21)
            && self.word(21) <= self.etext()
    }

    /// The module data of the table at `pclntab`: runtime.firstmoduledata when the symbol
    /// table has it, else found by scanning the writable segments for a word pointing at
    /// the table, validated against the table's header.
    pub fn find(exe: &Executable, pclntab: u64, h: &PcHeader) -> Result<Self, String> {
        if let Some(md) = exe.symtab_symbol("runtime.firstmoduledata").and_then(|s| Self::read(exe, s.addr)).filter(|m| m.matches(pclntab, h)) {
            return Ok(md);
        }
        for (va, bytes, writable) in exe.loaded_segments() {
            if !writable {
                continue;
            }
            let first = ((8 - va % 8) % 8) as usize;
            for off in (first..bytes.len().saturating_sub(WORDS * 8)).step_by(8) {
                if read_u64(bytes, off) != Some(pclntab) {
                    continue;
                }
                if let Some(md) = Self::read(exe, va + off as u64).filter(|m| m.matches(pclntab, h)) {
                    return Ok(md);
                }
            }
        }
        Err(format!("no module data points at the function table at {pclntab:#x}"))
    }

    /// The type descriptor region, by the layout of Go `minor` (newer: the newest known).
    pub fn types(&self, exe: &Executable, minor: u32) -> Result<TypesRegion, String> {
        let types = self.word(37);
        let (etypes, desc_end, typelinks) = match minor {
            ..=25 => (self.word(38), self.word(38), Some((self.word(44), self.word(45)))),
            26 => (self.word(38), self.word(38), Some((self.word(45), self.word(46)))),
            _ => (self.word(39), types.wrapping_add(self.word(38)), None),
        };
        let in_file = |a: u64| exe.bytes_at(a, 1).is_some();
        if types == 0 || etypes <= types || desc_end > etypes || !in_file(types) {
            return Err(format!("module data at {:#x} has no plausible types range ({types:#x}..{etypes:#x}) for the Go 1.{minor} layout", self.vaddr));
        }
        let typelinks = typelinks.filter(|&(p, n)| n > 0 && n < (1 << 24) && exe.bytes_at(p, n * 4).is_some());
        Ok(TypesRegion { types, etypes, typelinks, desc_end })
    }
}

impl TypesRegion {
    /// The descriptor of the pointer type whose string is `name` (e.g. `*tls.Conn`): from
    /// typelinks when the module has them, else by scanning the descriptors.
    pub fn find_pointer_type(&self, exe: &Executable, name: &str) -> Option<u64> {
        let region = exe.bytes_at(self.types, self.etypes - self.types)?;
        let check = |off: usize| self.is_pointer_type(region, off, name).then_some(self.types + off as u64);
        if let Some((ptr, n)) = self.typelinks {
            let links = exe.bytes_at(ptr, n * 4)?;
            let found = (0..n as usize).filter_map(|i| read_u32(links, i * 4)).find_map(|off| check(off as usize));
            if found.is_some() {
                return found;
            }
        }
        let end = (self.desc_end - self.types) as usize;
        (0..end.saturating_sub(TYPE_SIZE)).step_by(8).find_map(check)
    }

    /// Whether the bytes at `off` are the descriptor of pointer type `name`: kind pointer,
    /// that name (without an extra star), and an element type whose name is the same
    /// without the star.
    fn is_pointer_type(&self, region: &[u8], off: usize, name: &str) -> bool {
        let Some(t) = region.get(off..off + TYPE_SIZE + 8) else { return false };
        if t[23] & 0x1f != KIND_POINTER || t[20] & TFLAG_EXTRA_STAR != 0 {
            return false;
        }
        let str_off = read_u32(t, 40).unwrap_or(u32::MAX) as i32;
        if str_off < 0 || type_name(region, str_off as usize) != Some(name.as_bytes()) {
            return false;
        }
        let elem = read_u64(t, 48).unwrap_or(0);
        if elem < self.types || elem >= self.etypes {
            return false;
        }
        let e = (elem - self.types) as usize;
        let Some(et) = region.get(e..e + TYPE_SIZE) else { return false };
        let estr = read_u32(et, 40).unwrap_or(u32::MAX) as i32;
        let Some(mut ename) = (estr >= 0).then(|| type_name(region, estr as usize)).flatten() else { return false };
        if et[20] & TFLAG_EXTRA_STAR != 0 {
            ename = ename.get(1..).unwrap_or_default();
        }
        ename == name.as_bytes().get(1..).unwrap_or_default()
    }
}

/// The bytes of the name at `off` of the types region (flags, uvarint length, bytes).
fn type_name(region: &[u8], off: usize) -> Option<&[u8]> {
    let mut len = 0usize;
    let mut i = off.checked_add(1)?;
    for shift in (0..28).step_by(7) {
        let b = *region.get(i)?;
        i += 1;
        len |= usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return region.get(i..i.checked_add(len)?);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtype_names_use_the_last_path_element() {
        assert_eq!(rtype_name("*net.TCPConn"), "*net.TCPConn");
        assert_eq!(rtype_name("*crypto/tls.Conn"), "*tls.Conn");
        assert_eq!(rtype_name("*net/http.response"), "*http.response");
        assert_eq!(rtype_name("runtime.g"), "runtime.g");
        assert_eq!(rtype_name("*github.com/lib/pq.Error"), "*pq.Error");
    }

    #[test]
    fn names_are_bounds_checked() {
        assert_eq!(type_name(&[0, 3, b'a', b'b', b'c'], 0), Some(&b"abc"[..]));
        assert_eq!(type_name(&[0, 9, b'a'], 0), None);
        assert_eq!(type_name(&[0, 0x80, 0x80, 0x80, 0x80, 0x80], 0), None);
        assert_eq!(type_name(&[], 5), None);
    }
}
