//! ELF facts of an executable: its load segments (for virtual address -> file offset, as
//! uprobes want), its symbol table (with Go's own function table as the fallback for
//! stripped binaries), its TLS segment and its sections; and, for the profiler's binaries
//! (shared libraries and the vDSO too), what unwinding and symbolizing a mapping needs
//! (`mapped`).
use std::{
    borrow::Cow,
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
};

use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol, elf, read::elf::ProgramHeader};

use super::{SymbolError, moduledata::GoTables};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FunctionSym {
    pub addr: u64,
    pub size: u64,
}

#[derive(Clone, Copy, Debug)]
struct Segment {
    vaddr: u64,
    memsz: u64,
    offset: u64,
    filesz: u64,
    writable: bool,
}

/// The bytes of an executable: mapped from its file (only the pages read become
/// resident; a running executable cannot be truncated, ETXTBSY), or owned.
enum Data {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Data {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Data::Mapped(m) => m,
            Data::Owned(v) => v,
        }
    }
}

/// An executable with the index zerotrace needs.
pub struct Executable {
    pub path: PathBuf,
    data: Data,
    /// ET_DYN (PIE): addresses in the process are the ELF's plus a load bias.
    pub is_pie: bool,
    pub machine: u16,
    segments: Vec<Segment>,
    /// Symbol table by name, built on first use (a Rust binary has tens of thousands).
    symbols: OnceLock<HashMap<String, FunctionSym>>,
    /// PT_TLS (memsz, align) when present.
    pub tls: Option<(u64, u64)>,
    /// Go's function table and module data, read on first use.
    go: OnceLock<Result<GoTables, String>>,
}

impl Executable {
    pub fn open(path: &Path) -> Result<Self, SymbolError> {
        let read = |source| SymbolError::Read { path: path.to_owned(), source };
        let f = std::fs::File::open(path).map_err(read)?;
        // SAFETY: the mapping is read-only and private; executables are not truncated while
        // they run (the kernel refuses writes to a running executable's file).
        let data = match unsafe { memmap2::Mmap::map(&f) } {
            Ok(m) => Data::Mapped(m),
            Err(_) => Data::Owned(std::fs::read(path).map_err(read)?),
        };
        Self::parse(path.to_owned(), data)
    }

    pub fn from_bytes(path: PathBuf, data: Vec<u8>) -> Result<Self, SymbolError> {
        Self::parse(path, Data::Owned(data))
    }

    fn parse(path: PathBuf, data: Data) -> Result<Self, SymbolError> {
        let not_elf = |reason: String| SymbolError::NotElf { path: path.clone(), reason };
        let file = object::File::parse(&*data).map_err(|e| not_elf(e.to_string()))?;
        if file.format() != object::BinaryFormat::Elf {
            return Err(not_elf(format!("format {:?}", file.format())));
        }
        let is_pie = file.kind() == object::ObjectKind::Dynamic;
        let machine = match file.architecture() {
            object::Architecture::X86_64 => elf::EM_X86_64,
            object::Architecture::Aarch64 => elf::EM_AARCH64,
            _ => 0,
        };
        let segments = file
            .segments()
            .map(|s| {
                let (offset, filesz) = s.file_range();
                let writable = matches!(s.flags(), object::SegmentFlags::Elf { p_flags } if p_flags & elf::PF_W != 0);
                Segment { vaddr: s.address(), memsz: s.size(), offset, filesz, writable }
            })
            .collect();
        let tls = tls_segment(&data);
        drop(file);
        Ok(Self { path, data, is_pie, machine, segments, symbols: OnceLock::new(), tls, go: OnceLock::new() })
    }

    /// A symbol by name: from the ELF symbol table, else (functions of a stripped Go
    /// binary) from Go's function table, whose sizes run to the next function's entry.
    pub fn symbol(&self, name: &str) -> Option<FunctionSym> {
        self.symtab_symbol(name).or_else(|| self.go_tables().ok()?.function(name))
    }

    /// A symbol from the ELF symbol tables only (.symtab, .dynsym).
    pub fn symtab_symbol(&self, name: &str) -> Option<FunctionSym> {
        self.symbol_map().get(name).copied()
    }

    pub fn has_symbols(&self) -> bool {
        !self.symbol_map().is_empty()
    }

    fn symbol_map(&self) -> &HashMap<String, FunctionSym> {
        self.symbols.get_or_init(|| {
            let mut symbols = HashMap::new();
            let Ok(file) = object::File::parse(&*self.data) else { return symbols };
            for sym in file.symbols().chain(file.dynamic_symbols()) {
                if sym.address() == 0 {
                    continue;
                }
                if let Ok(name) = sym.name() {
                    symbols.entry(name.to_owned()).or_insert(FunctionSym { addr: sym.address(), size: sym.size() });
                }
            }
            symbols
        })
    }

    /// Go's function table and module data (located and parsed once); the error says why
    /// they could not be found.
    pub fn go_tables(&self) -> Result<&GoTables, &str> {
        self.go.get_or_init(|| GoTables::load(self)).as_ref().map_err(String::as_str)
    }

    /// Loaded segments with file contents: (vaddr, bytes, writable).
    pub fn loaded_segments(&self) -> impl Iterator<Item = (u64, &[u8], bool)> + '_ {
        self.segments.iter().filter_map(|s| {
            let len = s.filesz.min(s.memsz) as usize;
            let start = s.offset as usize;
            let bytes = self.data.get(start..start.checked_add(len)?)?;
            (!bytes.is_empty()).then_some((s.vaddr, bytes, s.writable))
        })
    }

    /// The file-backed bytes from `vaddr` to the end of its segment.
    pub fn bytes_from(&self, vaddr: u64) -> Option<&[u8]> {
        self.loaded_segments().find(|(va, b, _)| vaddr >= *va && vaddr - va < b.len() as u64).map(|(va, b, _)| &b[(vaddr - va) as usize..])
    }

    /// A little-endian 64-bit word at `vaddr` as stored in the file (for a PIE, the value
    /// before relocation: Go's linker and the system linkers write RELA addends in place).
    pub fn read_u64(&self, vaddr: u64) -> Option<u64> {
        Some(u64::from_le_bytes(self.bytes_at(vaddr, 8)?.try_into().ok()?))
    }

    /// Virtual address and size of a section.
    pub fn section_range(&self, name: &str) -> Option<(u64, u64)> {
        let file = object::File::parse(&*self.data).ok()?;
        let sec = file.section_by_name(name)?;
        Some((sec.address(), sec.size()))
    }

    /// File offset of a virtual address inside a loaded segment.
    pub fn file_offset(&self, vaddr: u64) -> Option<u64> {
        self.segments.iter().find(|s| vaddr >= s.vaddr && vaddr < s.vaddr + s.filesz.min(s.memsz)).map(|s| vaddr - s.vaddr + s.offset)
    }

    /// The bytes of the file mapped at [vaddr, vaddr + len).
    pub fn bytes_at(&self, vaddr: u64, len: u64) -> Option<&[u8]> {
        let off = self.file_offset(vaddr)? as usize;
        self.data.get(off..off.checked_add(len as usize)?)
    }

    /// Lowest virtual address of a loaded segment (the load bias of a PIE is measured from it).
    pub fn first_load_vaddr(&self) -> u64 {
        self.segments.iter().filter(|s| s.memsz > 0).map(|s| s.vaddr).min().unwrap_or(0)
    }

    /// Contents of a section by name, decompressed if needed.
    pub fn section(&self, name: &str) -> Option<Cow<'_, [u8]>> {
        let file = object::File::parse(&*self.data).ok()?;
        let sec = file.section_by_name(name)?;
        let bytes = sec.uncompressed_data().ok()?;
        // Re-borrow from self.data when the section is stored plainly, else own the copy.
        Some(match bytes {
            Cow::Borrowed(b) => {
                let start = b.as_ptr() as usize - self.data.as_ptr() as usize;
                Cow::Borrowed(&self.data[start..start + b.len()])
            }
            Cow::Owned(v) => Cow::Owned(v),
        })
    }
}

fn tls_segment(data: &[u8]) -> Option<(u64, u64)> {
    let elf = object::read::elf::ElfFile64::<object::Endianness>::parse(data).ok()?;
    let endian = elf.endian();
    elf.elf_program_headers().iter().find(|ph| ph.p_type(endian) == elf::PT_TLS).map(|ph| (ph.p_memsz(endian), ph.p_align(endian).max(1)))
}

/// Go's build id note type (NT_GNU_BUILD_ID is 3).
const NT_GO_BUILD_ID: u32 = 4;

/// A PT_LOAD segment of a mapped binary.
#[derive(Clone, Copy, Debug)]
pub struct LoadSegment {
    pub offset: u64,
    pub vaddr: u64,
    pub filesz: u64,
    pub exec: bool,
}

/// The sections unwinding needs, as addresses and (when present) their bytes.
#[derive(Default)]
pub struct UnwindSections {
    pub text: Option<std::ops::Range<u64>>,
    pub got: Option<std::ops::Range<u64>>,
    pub eh_frame_range: Option<std::ops::Range<u64>>,
    pub eh_frame_hdr_range: Option<std::ops::Range<u64>>,
    pub eh_frame: Option<Arc<[u8]>>,
    pub eh_frame_hdr: Option<Arc<[u8]>>,
    /// Only read when there is no .eh_frame.
    pub debug_frame: Option<Arc<[u8]>>,
}

/// What the profiler reads from a mapped binary.
pub struct Mapped {
    /// GNU build id, else Go's; empty when neither.
    pub build_id: Vec<u8>,
    pub segments: Vec<LoadSegment>,
    pub unwind: UnwindSections,
    /// Dynamic text symbols (start, end, name), sorted, when asked for.
    pub dynsyms: Vec<(u64, u64, Arc<str>)>,
}

/// Build id, PT_LOAD segments and unwind sections of a 64-bit ELF file (and its dynamic text
/// symbols when `syms`), reading only the headers and those sections; sections larger than
/// `max_section` bytes, compressed or without file bytes are left out.
pub fn mapped<'d, R: object::ReadRef<'d>>(data: R, syms: bool, max_section: u64) -> Option<Mapped> {
    use object::{
        Endianness,
        elf::{FileHeader64, NT_GNU_BUILD_ID, PF_X, PT_LOAD, SHF_COMPRESSED, SHT_NOBITS},
        read::elf::{FileHeader, SectionHeader},
    };
    let hdr = FileHeader64::<Endianness>::parse(data).ok()?;
    let e = hdr.endian().ok()?;
    let segments = hdr
        .program_headers(e, data)
        .ok()?
        .iter()
        .filter(|p| p.p_type(e) == PT_LOAD)
        .map(|p| LoadSegment { offset: p.p_offset(e), vaddr: p.p_vaddr(e), filesz: p.p_filesz(e), exec: p.p_flags(e) & PF_X != 0 })
        .collect();
    let sections = hdr.sections(e, data).ok()?;
    let (mut gnu, mut go) = (None, None);
    for s in sections.iter() {
        let Ok(Some(mut notes)) = s.notes(e, data) else {
            continue;
        };
        while let Ok(Some(n)) = notes.next() {
            match (n.name(), n.n_type(e)) {
                (b"GNU", NT_GNU_BUILD_ID) => gnu = Some(n.desc().to_vec()),
                (b"Go", NT_GO_BUILD_ID) => go = Some(n.desc().to_vec()),
                _ => {}
            }
        }
    }
    let section = |name: &[u8]| sections.section_by_name(e, name).map(|(_, s)| s);
    let range = |name: &[u8]| section(name).map(|s| s.sh_addr(e)..s.sh_addr(e).saturating_add(s.sh_size(e)));
    let bytes = |name: &[u8]| {
        let s = section(name)?;
        let ok = s.sh_type(e) != SHT_NOBITS && s.sh_flags(e) & u64::from(SHF_COMPRESSED) == 0 && s.sh_size(e) <= max_section;
        ok.then(|| s.data(e, data).ok()).flatten().map(Arc::<[u8]>::from)
    };
    let eh_frame = bytes(b".eh_frame");
    let debug_frame = if eh_frame.is_none() { bytes(b".debug_frame") } else { None };
    let unwind = UnwindSections {
        text: range(b".text"),
        got: range(b".got"),
        eh_frame_range: range(b".eh_frame"),
        eh_frame_hdr_range: range(b".eh_frame_hdr"),
        eh_frame_hdr: bytes(b".eh_frame_hdr"),
        eh_frame,
        debug_frame,
    };
    let mut dynsyms = Vec::new();
    if syms && let Ok(f) = object::read::elf::ElfFile64::<Endianness, R>::parse(data) {
        for s in f.dynamic_symbols() {
            if s.kind() == object::SymbolKind::Text
                && let Ok(name) = s.name()
            {
                dynsyms.push((s.address(), s.address().saturating_add(s.size().max(1)), Arc::from(name)));
            }
        }
        dynsyms.sort_by_key(|s| s.0);
    }
    Some(Mapped { build_id: gnu.or(go).unwrap_or_default(), segments, unwind, dynsyms })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_executable() {
        let exe = std::env::current_exe().unwrap();
        let e = Executable::open(&exe).unwrap();
        assert_eq!(e.machine, elf::EM_X86_64);
        assert!(e.has_symbols());
        let main = e.symbol("main").expect("main symbol");
        let off = e.file_offset(main.addr).expect("main is in a segment");
        assert!(off > 0);
        assert!(e.bytes_at(main.addr, 4).is_some());
    }
}
