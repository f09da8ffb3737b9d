//! Native (not Go) user stacks and kernel frames: unwinding of a copied user stack with the
//! `.eh_frame` CFI of each mapped binary (framehop, frame pointers as its fallback),
//! symbolization with ELF symbols + DWARF (blazesym), kernel frames from /proc/kallsyms.
//!
//! Binaries are read through `/proc/PID/root` (or `/proc/PID/map_files` for deleted files)
//! and cached by build id, else by (dev, inode, size, mtime), so a library mapped by many
//! processes is parsed once. Every cache is bounded; failures give empty frames.
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blazesym::symbolize::evict::{Elf as EvictElf, Evict};
use blazesym::symbolize::source::{Elf as ElfSource, Source};
use blazesym::symbolize::{CodeInfo, Input, Sym, Symbolized, Symbolizer};
use framehop::x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64};
use framehop::{ExplicitModuleSectionInfo, Module, Unwinder};
use object::{ReadCache, ReadRef};

use crate::{
    model::proc::{self, Mapping as MapsLine},
    profile::model::{Line, Location},
    symbols::elf,
};

/// Minimum time between two reads of one process's maps.
const MAPS_REFRESH: Duration = Duration::from_millis(200);
/// Processes whose maps and unwinder modules are kept.
const MAX_PROCS: usize = 4096;
/// Executable mappings kept per process.
const MAX_MAPPINGS: usize = 1024;
/// Binaries (unwind sections, segments, open file) kept when no process uses them.
const MAX_BINARIES: usize = 256;
/// Unwind section bytes kept for binaries no process uses any more (those in use stay).
const MAX_BINARY_BYTES: usize = 64 << 20;
/// Binaries whose symbolizer state (ELF symbols, DWARF) blazesym keeps.
const MAX_SYM_FILES: usize = 32;
/// Largest unwind section copied.
const MAX_SECTION: u64 = 64 << 20;
/// Entries of the symbolization caches before they are cleared.
const MAX_SYM_CACHE: usize = 1 << 16;
/// Largest `[vdso]` read from the process.
const MAX_VDSO: u64 = 1 << 20;
/// Above this, an address is not a user address.
const USER_END: u64 = 1 << 56;
/// Largest distance from a kernel symbol to an address it covers.
const MAX_KSYM_SIZE: u64 = 1 << 20;

/// (binary id, file offset looked up, Go tables used).
type SymKey = (u64, u64, bool);

/// Unwind section data shared by the modules of every process mapping a binary.
type Data = Arc<[u8]>;

/// A copy of a thread's user stack with its registers at the sample.
pub struct UserStack<'a> {
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
    /// Address of stack[0] (page-aligned, <= sp).
    pub base: u64,
    pub stack: &'a [u8],
}

/// Identity of a file's contents when it has no build id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
}

impl FileId {
    fn of(m: &std::fs::Metadata) -> Self {
        FileId { dev: m.dev(), ino: m.ino(), size: m.size(), mtime: m.mtime(), mtime_nsec: m.mtime_nsec() }
    }
}

/// A PT_LOAD segment.
#[derive(Clone, Copy, Debug)]
struct Segment {
    offset: u64,
    vaddr: u64,
    filesz: u64,
    exec: bool,
}

/// What one binary (executable, shared library, vDSO) gives for unwinding and symbols.
struct Binary {
    /// Unique for the life of the profiler (key of the symbolization cache).
    id: u64,
    name: Arc<str>,
    build_id: Arc<str>,
    file_id: Option<FileId>,
    segments: Vec<Segment>,
    unwind: Option<ExplicitModuleSectionInfo<Data>>,
    /// Kept open: blazesym reads it as `/proc/self/fd/N`, even after the process exited.
    file: Option<File>,
    /// Dynamic text symbols (start, end, name), only for binaries without a file (vDSO).
    dynsyms: Vec<(u64, u64, Arc<str>)>,
    /// What its copies take (unwind sections, symbols), for the cache's byte bound.
    bytes: usize,
}

impl Binary {
    /// The PT_LOAD segment holding file offset `off` (its page-aligned start counts).
    fn segment(&self, off: u64) -> Option<&Segment> {
        let hit = |s: &&Segment| s.offset & !0xfff <= off && off < s.offset.saturating_add(s.filesz);
        self.segments.iter().filter(hit).find(|s| s.exec).or_else(|| self.segments.iter().find(hit))
    }

    /// ELF virtual address of file offset `off`.
    fn vaddr(&self, off: u64) -> Option<u64> {
        let s = self.segment(off)?;
        Some(s.vaddr.wrapping_add(off).wrapping_sub(s.offset))
    }

    /// Load bias (address of virtual address 0) of a mapping at `start` of file offset `offset`.
    fn bias(&self, start: u64, offset: u64) -> Option<u64> {
        let v = self.vaddr(offset)?;
        start.checked_sub(v)
    }

    /// Approximate heap bytes held.
    #[cfg(test)]
    fn heap_bytes(&self) -> usize {
        let u = self.unwind.as_ref().map_or(0, |u| [&u.eh_frame, &u.eh_frame_hdr, &u.debug_frame].iter().map(|d| d.as_ref().map_or(0, |d| d.len())).sum());
        u + self.segments.len() * size_of::<Segment>() + self.dynsyms.len() * 40 + self.name.len() + self.build_id.len()
    }
}

/// One executable mapping of a process.
struct Mapping {
    start: u64,
    end: u64,
    offset: u64,
    dev: u64,
    inode: u64,
    path: Arc<str>,
    bin: Option<Arc<Binary>>,
}

impl Mapping {
    fn same(&self, r: &MapsLine) -> bool {
        (self.start, self.end, self.offset, self.dev, self.inode) == (r.start, r.end, r.offset, r.dev, r.inode) && *self.path == *r.path
    }

    fn module(&self) -> Arc<str> {
        match &self.bin {
            Some(b) => b.name.clone(),
            None if self.path.is_empty() => "[anon]".into(),
            None => file_name(&self.path).into(),
        }
    }
}

/// A process: its executable mappings and the unwinder built from them.
struct Proc {
    maps: Vec<Mapping>,
    unwinder: UnwinderX86_64<Data>,
    read_at: Option<Instant>,
    /// (st_dev, st_ino) and link target of /proc/PID/exe.
    exe: Option<(u64, u64)>,
    exe_path: Option<String>,
    used: u64,
}

impl Proc {
    fn find(&self, addr: u64) -> Option<&Mapping> {
        let i = self.maps.partition_point(|m| m.start <= addr);
        self.maps.get(i.checked_sub(1)?).filter(|m| addr < m.end)
    }

    fn is_main(&self, m: &Mapping) -> bool {
        let by_file = m.bin.as_ref().and_then(|b| b.file_id).map(|f| (f.dev, f.ino));
        (self.exe.is_some() && (by_file == self.exe || Some((m.dev, m.inode)) == self.exe)) || self.exe_path.as_deref() == Some(&*m.path)
    }
}

/// blazesym's `Symbolizer`, which is not `Send` because it holds `Rc`s.
struct Blaze(Symbolizer);

// SAFETY: every `Rc`/`RefCell` inside the Symbolizer is owned by it alone: we never register
// external resolvers, and results borrowed from it are converted to owned data before each
// call returns. Moving the whole Symbolizer to another thread thus cannot leave a
// non-atomic reference count shared between threads.
unsafe impl Send for Blaze {}

/// Text symbols of /proc/kallsyms, sorted by address.
struct Kallsyms {
    syms: Vec<KSym>,
    names: String,
    modules: Vec<Arc<str>>,
}

struct KSym {
    addr: u64,
    name: u32,
    len: u16,
    module: u16,
}

impl Kallsyms {
    fn load() -> Self {
        let text = std::fs::read_to_string("/proc/kallsyms").unwrap_or_default();
        Self::parse(&text)
    }

    fn parse(text: &str) -> Self {
        let mut k = Kallsyms { syms: Vec::new(), names: String::new(), modules: vec!["[kernel]".into()] };
        let mut module_ids: HashMap<&str, u16> = HashMap::new();
        for line in text.lines() {
            let mut f = line.split_ascii_whitespace();
            let (Some(addr), Some(ty), Some(name)) = (f.next(), f.next(), f.next()) else {
                continue;
            };
            if !matches!(ty, "t" | "T" | "w" | "W") || name.len() > usize::from(u16::MAX) {
                continue;
            }
            let Ok(addr) = u64::from_str_radix(addr, 16) else {
                continue;
            };
            let Ok(off) = u32::try_from(k.names.len()) else { break };
            if addr == 0 {
                continue;
            }
            let module = match f.next() {
                Some(m) if m.starts_with('[') => {
                    let next = k.modules.len();
                    match module_ids.get(m) {
                        Some(&i) => i,
                        None => match u16::try_from(next) {
                            Ok(i) => {
                                module_ids.insert(m, i);
                                k.modules.push(m.into());
                                i
                            }
                            Err(_) => 0,
                        },
                    }
                }
                _ => 0,
            };
            k.names.push_str(name);
            k.syms.push(KSym { addr, name: off, len: name.len() as u16, module });
        }
        k.syms.sort_by_key(|s| s.addr);
        k.syms.dedup_by_key(|s| s.addr);
        k.syms.shrink_to_fit();
        k.names.shrink_to_fit();
        k
    }

    /// (function, module) covering `addr`.
    fn find(&self, addr: u64) -> Option<(&str, &Arc<str>)> {
        let i = self.syms.partition_point(|s| s.addr <= addr).checked_sub(1)?;
        let s = &self.syms[i];
        if addr - s.addr > MAX_KSYM_SIZE {
            return None;
        }
        let name = self.names.get(s.name as usize..s.name as usize + usize::from(s.len))?;
        Some((name, self.modules.get(usize::from(s.module))?))
    }
}

/// Unwinding and symbolization for programs that are not Go, and kernel frames. One per agent.
pub struct NativeProfiler {
    procs: HashMap<u32, Proc>,
    /// Cached binaries by id, with the tick of their last use.
    binaries: HashMap<u64, (Arc<Binary>, u64)>,
    by_file: HashMap<FileId, u64>,
    by_build_id: HashMap<Arc<str>, u64>,
    next_id: u64,
    tick: u64,
    cache: CacheX86_64,
    /// Unwinders created (see `new_unwinder`).
    unwinders: u64,
    blaze: Blaze,
    /// Binaries known to blazesym (path `/proc/self/fd/N` of their file), with last use.
    sym_files: HashMap<u64, (Arc<Binary>, u64)>,
    /// (binary id, file offset looked up, Go tables used) -> location.
    sym_cache: HashMap<SymKey, Arc<Location>>,
    strings: HashSet<Arc<str>>,
    kallsyms: Option<Kallsyms>,
    /// (address, exact) -> location.
    kernel_cache: HashMap<(u64, bool), Arc<Location>>,
}

impl Default for NativeProfiler {
    fn default() -> Self {
        Self::new()
    }
}

impl NativeProfiler {
    /// An empty profiler; /proc/kallsyms is read on the first kernel symbolization.
    pub fn new() -> Self {
        let sym = Symbolizer::builder()
            .enable_auto_reload(false)
            .enable_code_info(true)
            .enable_inlined_fns(true)
            .enable_demangling(true)
            // Separate debug files (/usr/lib/debug) are not looked up: libc's DWARF alone
            // held ~15 MB, for file:line in frames that symbol names describe well enough.
            .set_debug_dirs(Some(Vec::<std::path::PathBuf>::new()))
            .build();
        NativeProfiler {
            procs: HashMap::new(),
            binaries: HashMap::new(),
            by_file: HashMap::new(),
            by_build_id: HashMap::new(),
            next_id: 1,
            tick: 0,
            cache: CacheX86_64::new(),
            unwinders: 0,
            blaze: Blaze(sym),
            sym_files: HashMap::new(),
            sym_cache: HashMap::new(),
            strings: HashSet::new(),
            kallsyms: None,
            kernel_cache: HashMap::new(),
        }
    }

    /// Addresses of the user stack: ip first, then return addresses, at most `max`.
    /// Uses .eh_frame (CFI) of each mapped binary (executable and shared libraries), with
    /// frame pointers as framehop's fallback. Never panics on garbage.
    pub fn unwind(&mut self, pid: u32, stack: &UserStack<'_>, max: usize) -> Vec<u64> {
        if max == 0 || stack.ip == 0 || stack.ip >= USER_END {
            return Vec::new();
        }
        self.touch(pid);
        if self.procs.get(&pid).is_some_and(|p| p.find(stack.ip).is_none()) {
            self.refresh(pid);
        }
        let mut out = walk(self.procs.get(&pid), &mut self.cache, stack, max);
        let unknown = self.procs.get(&pid).is_some_and(|p| out.iter().skip(1).any(|&a| p.find(a - 1).is_none()));
        if unknown && self.refresh(pid) {
            out = walk(self.procs.get(&pid), &mut self.cache, stack, max);
        }
        out
    }

    /// One Location per address of pid (addrs[0] is exact, later ones are return
    /// addresses: look up addr-1 but report addr). `go`: for a Go program, lines of an
    /// ELF virtual address of its main executable (the caller owns Go's own tables); when
    /// Some, addresses that fall in the main executable (/proc/PID/exe, same dev+inode
    /// as the mapping) are symbolized by it, others (libc of a cgo program) by ELF/DWARF.
    pub fn symbolize(&mut self, pid: u32, addrs: &[u64], go: Option<&dyn Fn(u64) -> Vec<Line>>) -> Vec<Arc<Location>> {
        let lookup = |i: usize, a: u64| if i == 0 { a } else { a.saturating_sub(1) };
        self.touch(pid);
        let missing = self.procs.get(&pid).is_some_and(|p| addrs.iter().enumerate().any(|(i, &a)| p.find(lookup(i, a)).is_none()));
        if missing {
            self.refresh(pid);
        }
        if self.sym_cache.len() >= MAX_SYM_CACHE {
            self.sym_cache.clear();
            self.strings.clear();
        }
        let mut out: Vec<Option<Arc<Location>>> = vec![None; addrs.len()];
        // (index, binary, virtual address, cache key) to symbolize with blazesym.
        let mut misses: Vec<(usize, Arc<Binary>, u64, SymKey)> = Vec::new();
        let proc = self.procs.get(&pid);
        for (i, &addr) in addrs.iter().enumerate() {
            let at = lookup(i, addr);
            let Some(m) = proc.and_then(|p| p.find(at)) else {
                out[i] = Some(location(addr, "[unknown]".into(), "".into(), Vec::new()));
                continue;
            };
            let Some(bin) = &m.bin else {
                out[i] = Some(location(addr, m.module(), "".into(), Vec::new()));
                continue;
            };
            let off = at - m.start + m.offset;
            let go = go.filter(|_| proc.is_some_and(|p| p.is_main(m)));
            let key = (bin.id, off, go.is_some());
            if let Some(l) = self.sym_cache.get(&key) {
                out[i] = Some(if l.address == addr { l.clone() } else { location(addr, l.module.clone(), l.build_id.clone(), l.lines.clone()) });
                continue;
            }
            let Some(vaddr) = bin.vaddr(off) else {
                out[i] = Some(location(addr, bin.name.clone(), bin.build_id.clone(), Vec::new()));
                continue;
            };
            if let Some(go) = go {
                let l = location(addr, bin.name.clone(), bin.build_id.clone(), go(vaddr));
                self.sym_cache.insert(key, l.clone());
                out[i] = Some(l);
            } else {
                misses.push((i, bin.clone(), vaddr, key));
            }
        }
        misses.sort_by_key(|m| m.1.id);
        for group in misses.chunk_by(|a, b| a.1.id == b.1.id) {
            let bin = &group[0].1;
            let vaddrs: Vec<u64> = group.iter().map(|m| m.2).collect();
            let lines = self.symbolize_elf(bin, &vaddrs);
            for ((i, _, _, key), lines) in group.iter().zip(lines) {
                let l = location(addrs[*i], bin.name.clone(), bin.build_id.clone(), lines);
                self.sym_cache.insert(*key, l.clone());
                out[*i] = Some(l);
            }
        }
        out.into_iter().zip(addrs).map(|(l, &a)| l.unwrap_or_else(|| location(a, "[unknown]".into(), "".into(), Vec::new()))).collect()
    }

    /// Kernel addresses from /proc/kallsyms (module "[kernel]" or "[module_name]").
    pub fn symbolize_kernel(&mut self, addrs: &[u64]) -> Vec<Arc<Location>> {
        let ks = self.kallsyms.get_or_insert_with(Kallsyms::load);
        if self.kernel_cache.len() >= MAX_SYM_CACHE {
            self.kernel_cache.clear();
        }
        let mut out = Vec::with_capacity(addrs.len());
        for (i, &addr) in addrs.iter().enumerate() {
            let l = self.kernel_cache.entry((addr, i == 0)).or_insert_with(|| {
                let at = if i == 0 { addr } else { addr.saturating_sub(1) };
                let (module, lines) = match ks.find(at) {
                    Some((f, m)) => (m.clone(), vec![Line { function: f.into(), file: None, line: 0 }]),
                    None => ("[kernel]".into(), Vec::new()),
                };
                Arc::new(Location { address: addr, module, build_id: "".into(), lines, kernel: true })
            });
            out.push(l.clone());
        }
        out
    }

    /// The process exited: drop its maps and unwinder modules (binary caches stay).
    pub fn forget(&mut self, pid: u32) {
        self.procs.remove(&pid);
    }

    /// Marks pid used, creating it (and reading its maps) when new.
    fn touch(&mut self, pid: u32) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(p) = self.procs.get_mut(&pid) {
            p.used = tick;
            return;
        }
        if self.procs.len() >= MAX_PROCS
            && let Some(old) = self.procs.iter().min_by_key(|(_, p)| p.used).map(|(&k, _)| k)
        {
            self.procs.remove(&old);
        }
        let p = Proc { maps: Vec::new(), unwinder: self.new_unwinder(), read_at: None, exe: None, exe_path: None, used: tick };
        self.procs.insert(pid, p);
        self.refresh(pid);
    }

    /// Re-reads the maps of pid unless read less than MAPS_REFRESH ago; true when they changed.
    fn refresh(&mut self, pid: u32) -> bool {
        let Some(p) = self.procs.get_mut(&pid) else {
            return false;
        };
        let now = Instant::now();
        if p.read_at.is_some_and(|t| now.duration_since(t) < MAPS_REFRESH) {
            return false;
        }
        p.read_at = Some(now);
        let Some(raws) = read_maps(pid) else { return false };
        let old = std::mem::take(&mut p.maps);
        let unchanged = old.len() == raws.len() && old.iter().zip(&raws).all(|(m, r)| m.same(r));
        if unchanged {
            p.maps = old;
            return false;
        }
        let mut maps = Vec::with_capacity(raws.len());
        for r in raws {
            let bin = match old.binary_search_by_key(&r.start, |m| m.start) {
                Ok(i) if old[i].same(&r) => old[i].bin.clone(),
                _ => self.load_binary(pid, &r),
            };
            maps.push(Mapping { start: r.start, end: r.end, offset: r.offset, dev: r.dev, inode: r.inode, path: r.path.into(), bin });
        }
        let mut unwinder = self.new_unwinder();
        for m in &maps {
            let Some(b) = &m.bin else { continue };
            let (Some(info), Some(bias)) = (&b.unwind, b.bias(m.start, m.offset)) else {
                continue;
            };
            unwinder.add_module(Module::new(b.name.to_string(), m.start..m.end, bias, info.clone()));
        }
        let exe = std::fs::metadata(format!("/proc/{pid}/exe")).ok().map(|m| (m.dev(), m.ino()));
        let exe_path = std::fs::read_link(format!("/proc/{pid}/exe")).ok().and_then(|p| p.into_os_string().into_string().ok());
        if let Some(p) = self.procs.get_mut(&pid) {
            p.maps = maps;
            p.unwinder = unwinder;
            p.exe = exe;
            p.exe_path = exe_path;
        }
        true
    }

    /// A new (empty) unwinder. framehop tells its unwinders apart in the shared rule cache by
    /// a global u16 generation that wraps: the cache is renewed long before a reused
    /// generation could meet a stale rule.
    fn new_unwinder(&mut self) -> UnwinderX86_64<Data> {
        self.unwinders += 1;
        if self.unwinders.is_multiple_of(8192) {
            self.cache = CacheX86_64::new();
        }
        UnwinderX86_64::new()
    }

    /// The binary of an executable mapping, from the caches or read now.
    fn load_binary(&mut self, pid: u32, r: &MapsLine) -> Option<Arc<Binary>> {
        if r.path == "[vdso]" {
            return self.load_vdso(pid, r);
        }
        if !r.path.starts_with('/') {
            return None;
        }
        let (file, meta) = open_mapped(pid, r)?;
        let fid = FileId::of(&meta);
        if let Some(b) = self.cached(self.by_file.get(&fid).copied()) {
            return Some(b);
        }
        let info = parse_elf(&ReadCache::new(&file), false);
        let build_id = info.as_ref().map_or_else(String::new, |i| hex(&i.build_id));
        if !build_id.is_empty()
            && let Some(b) = self.cached(self.by_build_id.get(build_id.as_str()).copied())
        {
            self.by_file.insert(fid, b.id);
            return Some(b);
        }
        let name = file_name(r.path.strip_suffix(" (deleted)").unwrap_or(&r.path));
        Some(self.insert_binary(name, build_id, Some(fid), Some(file), info))
    }

    /// The vDSO, read from the process's memory, cached by build id.
    fn load_vdso(&mut self, pid: u32, r: &MapsLine) -> Option<Arc<Binary>> {
        let len = r.end.checked_sub(r.start).filter(|&l| l <= MAX_VDSO)?;
        let mem = File::open(format!("/proc/{pid}/mem")).ok()?;
        let mut buf = vec![0u8; usize::try_from(len).ok()?];
        mem.read_exact_at(&mut buf, r.start).ok()?;
        let info = parse_elf(buf.as_slice(), true)?;
        let build_id = hex(&info.build_id);
        if let Some(b) = self.cached(self.by_build_id.get(build_id.as_str()).copied()) {
            return Some(b);
        }
        Some(self.insert_binary("[vdso]", build_id, None, None, Some(info)))
    }

    fn cached(&mut self, id: Option<u64>) -> Option<Arc<Binary>> {
        let (b, used) = self.binaries.get_mut(&id?)?;
        *used = self.tick;
        Some(b.clone())
    }

    fn insert_binary(&mut self, name: &str, build_id: String, file_id: Option<FileId>, file: Option<File>, info: Option<ElfInfo>) -> Arc<Binary> {
        let (segments, unwind, dynsyms) = info.map_or_else(Default::default, |i| (i.segments, i.unwind, i.dynsyms));
        let section = |d: &Option<Data>| d.as_ref().map_or(0, |d| d.len());
        let bytes = unwind.as_ref().map_or(0, |u| section(&u.eh_frame) + section(&u.eh_frame_hdr) + section(&u.debug_frame))
            + dynsyms.iter().map(|(_, _, n)| 24 + n.len()).sum::<usize>();
        // Over the count: the least recently used go, those no process maps first.
        while self.binaries.len() >= MAX_BINARIES {
            let Some(old) = self.binaries.iter().min_by_key(|(_, (b, used))| (Arc::strong_count(b) > 1, *used)).map(|(&k, _)| k) else { break };
            self.evict_binary(old);
        }
        // Over the bytes of binaries no process maps (those in use keep their memory anyway):
        // the least recently used of them go.
        let unused = self.binaries.iter().filter(|(_, (b, _))| Arc::strong_count(b) == 1).map(|(&k, (b, used))| (k, *used, b.bytes)).collect();
        for old in super::over_bound(unused, MAX_BINARY_BYTES) {
            self.evict_binary(old);
        }
        let id = self.next_id;
        self.next_id += 1;
        let build_id: Arc<str> = build_id.into();
        let b = Arc::new(Binary { id, name: name.into(), build_id: build_id.clone(), file_id, segments, unwind, file, dynsyms, bytes });
        self.binaries.insert(id, (b.clone(), self.tick));
        if let Some(f) = file_id {
            self.by_file.insert(f, id);
        }
        if !build_id.is_empty() {
            self.by_build_id.insert(build_id, id);
        }
        b
    }

    fn evict_binary(&mut self, old: u64) {
        self.binaries.remove(&old);
        self.by_file.retain(|_, id| *id != old);
        self.by_build_id.retain(|_, id| *id != old);
    }

    /// Lines of ELF virtual addresses of one binary (ELF symbols + DWARF, inlined calls).
    fn symbolize_elf(&mut self, bin: &Arc<Binary>, vaddrs: &[u64]) -> Vec<Vec<Line>> {
        let strings = &mut self.strings;
        let Some(file) = &bin.file else {
            return vaddrs.iter().map(|&a| dynsym_lines(bin, a, strings)).collect();
        };
        let path = format!("/proc/self/fd/{}", file.as_raw_fd());
        let tick = self.tick;
        if let Some(e) = self.sym_files.get_mut(&bin.id) {
            e.1 = tick;
        } else {
            if self.sym_files.len() >= MAX_SYM_FILES
                && let Some((_, (old, _))) =
                    self.sym_files.iter().min_by_key(|(_, (_, used))| *used).map(|(&k, _)| k).and_then(|k| self.sym_files.remove_entry(&k))
                && let Some(f) = &old.file
            {
                // Evict before `old` (and its descriptor) may be dropped.
                let _ = self.blaze.0.evict(&Evict::Elf(EvictElf::new(format!("/proc/self/fd/{}", f.as_raw_fd()))));
            }
            self.sym_files.insert(bin.id, (bin.clone(), tick));
        }
        let src = Source::Elf(ElfSource::new(path.clone()));
        let mut out: Vec<Vec<Line>> = match self.blaze.0.symbolize(&src, Input::VirtOffset(vaddrs)) {
            Ok(syms) => syms
                .iter()
                .map(|s| match s {
                    Symbolized::Sym(sym) => sym_lines(sym, strings),
                    _ => Vec::new(),
                })
                .collect(),
            Err(_) => vec![Vec::new(); vaddrs.len()],
        };
        // DWARF of line-tables-only builds (cargo's `debug = "line-tables-only"`) names
        // functions without their module path (`burn_inner`); the symbol table has the
        // whole demangled name (`rust_svc::burn_inner`): it names the physical function.
        if out.iter().any(|l| l.last().is_some_and(|f| !f.function.contains("::"))) {
            let mut symtab = ElfSource::new(path);
            symtab.debug_syms = false;
            if let Ok(syms) = self.blaze.0.symbolize(&Source::Elf(symtab), Input::VirtOffset(vaddrs)) {
                for (lines, s) in out.iter_mut().zip(syms.iter()) {
                    if let (Some(last), Symbolized::Sym(sym)) = (lines.last_mut(), s)
                        && qualifies(&sym.name, &last.function)
                    {
                        last.function = intern(strings, &sym.name);
                    }
                }
            }
        }
        out
    }

    /// Binaries cached (for tests and stats): count and approximate heap bytes.
    #[cfg(test)]
    fn binaries_heap(&self) -> (usize, usize) {
        (self.binaries.len(), self.binaries.values().map(|(b, _)| b.heap_bytes()).sum())
    }
}

/// Unwinds `stack` with the modules of `proc` (frame pointers only when unknown).
fn walk(proc: Option<&Proc>, cache: &mut CacheX86_64, stack: &UserStack<'_>, max: usize) -> Vec<u64> {
    let (base, data) = (stack.base, stack.stack);
    let mut read = |addr: u64| -> Result<u64, ()> {
        let off = usize::try_from(addr.checked_sub(base).ok_or(())?).map_err(|_| ())?;
        let b = data.get(off..off.checked_add(8).ok_or(())?).ok_or(())?;
        Ok(u64::from_le_bytes(b.try_into().map_err(|_| ())?))
    };
    let empty;
    let unwinder = match proc {
        Some(p) => &p.unwinder,
        None => {
            empty = UnwinderX86_64::new();
            &empty
        }
    };
    let regs = UnwindRegsX86_64::new(stack.ip, stack.sp, stack.bp);
    let mut it = unwinder.iter_frames(stack.ip, regs, cache, &mut read);
    let mut out = Vec::with_capacity(max.min(64));
    while out.len() < max {
        match it.next() {
            Ok(Some(f)) if (0x1000..USER_END).contains(&f.address()) => out.push(f.address()),
            _ => break,
        }
    }
    out
}

fn location(address: u64, module: Arc<str>, build_id: Arc<str>, lines: Vec<Line>) -> Arc<Location> {
    Arc::new(Location { address, module, build_id, lines, kernel: false })
}

fn intern(set: &mut HashSet<Arc<str>>, s: &str) -> Arc<str> {
    if let Some(a) = set.get(s) {
        return a.clone();
    }
    let a: Arc<str> = s.into();
    set.insert(a.clone());
    a
}

/// Whether `full` (a symbol table name) is `short` (a DWARF name) with its module path.
fn qualifies(full: &str, short: &str) -> bool {
    !short.contains("::") && full.len() > short.len() && full.ends_with(short) && full[..full.len() - short.len()].ends_with("::")
}

/// Lines of a blazesym symbol: inlined callees (innermost first), then the function.
fn sym_lines(sym: &Sym<'_>, strings: &mut HashSet<Arc<str>>) -> Vec<Line> {
    let mut line = |name: &str, ci: Option<&CodeInfo<'_>>| Line {
        function: intern(strings, name),
        file: ci.map(|c| intern(strings, &c.to_path().to_string_lossy())),
        line: ci.and_then(|c| c.line).unwrap_or(0),
    };
    let mut v: Vec<Line> = sym.inlined.iter().rev().map(|f| line(&f.name, f.code_info.as_ref())).collect();
    v.push(line(&sym.name, sym.code_info.as_deref()));
    v
}

fn dynsym_lines(bin: &Binary, vaddr: u64, strings: &mut HashSet<Arc<str>>) -> Vec<Line> {
    let i = bin.dynsyms.partition_point(|s| s.0 <= vaddr);
    match i.checked_sub(1).map(|i| &bin.dynsyms[i]) {
        Some((_, end, name)) if vaddr < *end => {
            vec![Line { function: intern(strings, name), file: None, line: 0 }]
        }
        _ => Vec::new(),
    }
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Executable mappings of pid, sorted by address (None when the process is gone).
fn read_maps(pid: u32) -> Option<Vec<MapsLine>> {
    let mut out: Vec<MapsLine> = proc::maps(pid).ok()?.into_iter().filter(MapsLine::executable).take(MAX_MAPPINGS).collect();
    out.sort_by_key(|m| m.start);
    Some(out)
}

/// Opens the file of a mapping: through the process's root (other mount namespaces), else
/// `/proc/PID/map_files` (deleted or replaced files).
fn open_mapped(pid: u32, r: &MapsLine) -> Option<(File, std::fs::Metadata)> {
    let open = |p: &str| {
        let f = File::open(p).ok()?;
        let m = f.metadata().ok()?;
        m.is_file().then_some((f, m))
    };
    let mut fallback = None;
    if !r.path.ends_with(" (deleted)") {
        match open(&format!("/proc/{pid}/root{}", r.path)) {
            Some((f, m)) if r.inode == 0 || m.ino() == r.inode => return Some((f, m)),
            other => fallback = other,
        }
    }
    open(&format!("/proc/{pid}/map_files/{:x}-{:x}", r.start, r.end)).or(fallback)
}

/// What is read from an ELF file: the facts `symbols::elf::mapped` gives, with its unwind
/// sections as framehop takes them.
struct ElfInfo {
    build_id: Vec<u8>,
    segments: Vec<Segment>,
    unwind: Option<ExplicitModuleSectionInfo<Data>>,
    dynsyms: Vec<(u64, u64, Arc<str>)>,
}

fn parse_elf<'d, R: ReadRef<'d>>(data: R, syms: bool) -> Option<ElfInfo> {
    let m = elf::mapped(data, syms, MAX_SECTION)?;
    let u = m.unwind;
    let unwind = (u.eh_frame.is_some() || u.debug_frame.is_some()).then(|| ExplicitModuleSectionInfo {
        base_svma: 0,
        text_svma: u.text,
        got_svma: u.got,
        eh_frame_svma: u.eh_frame_range,
        eh_frame_hdr_svma: u.eh_frame_hdr_range,
        eh_frame_hdr: u.eh_frame_hdr,
        eh_frame: u.eh_frame,
        debug_frame: u.debug_frame,
        ..Default::default()
    });
    let segments = m.segments.iter().map(|g| Segment { offset: g.offset, vaddr: g.vaddr, filesz: g.filesz, exec: g.exec }).collect();
    Some(ElfInfo { build_id: m.build_id, segments, unwind, dynsyms: m.dynsyms })
}

const _: () = {
    const fn send<T: Send>() {}
    send::<NativeProfiler>();
};

#[cfg(test)]
mod tests {
    use super::*;
    use std::hint::black_box;

    /// Registers and a copy of the stack (from `sp & !0xfff`, up to 32 KiB, within its mapping).
    struct Snapshot {
        ip: u64,
        sp: u64,
        bp: u64,
        base: u64,
        stack: Vec<u8>,
    }

    impl Snapshot {
        fn user_stack(&self) -> UserStack<'_> {
            UserStack { ip: self.ip, sp: self.sp, bp: self.bp, base: self.base, stack: &self.stack }
        }
    }

    /// Copies the stack of pid above `sp` through /proc/PID/mem.
    fn copy_stack(pid: u32, ip: u64, sp: u64, bp: u64) -> Snapshot {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
        let end = maps
            .lines()
            .filter_map(|l| {
                let (s, e) = l.split(' ').next()?.split_once('-')?;
                Some((u64::from_str_radix(s, 16).ok()?, u64::from_str_radix(e, 16).ok()?))
            })
            .find(|&(s, e)| s <= sp && sp < e)
            .expect("stack mapping")
            .1;
        let base = sp & !0xfff;
        let len = (end - base).min(32 << 10);
        let mut stack = vec![0u8; len as usize];
        let mem = File::open(format!("/proc/{pid}/mem")).expect("mem");
        mem.read_exact_at(&mut stack, base).expect("read stack");
        Snapshot { ip, sp, bp, base, stack }
    }

    #[inline(never)]
    fn level3() -> Snapshot {
        let (ip, sp, bp): (u64, u64, u64);
        // SAFETY: reads rip, rsp and rbp into registers; no memory or stack access.
        unsafe {
            std::arch::asm!(
                "lea {ip}, [rip]",
                "mov {sp}, rsp",
                "mov {bp}, rbp",
                ip = out(reg) ip,
                sp = out(reg) sp,
                bp = out(reg) bp,
                options(nomem, nostack, preserves_flags),
            );
        }
        black_box(copy_stack(std::process::id(), ip, sp, bp))
    }

    #[inline(never)]
    fn level2() -> Snapshot {
        black_box(level3())
    }

    #[inline(never)]
    fn level1() -> Snapshot {
        black_box(level2())
    }

    fn functions(locs: &[Arc<Location>]) -> Vec<String> {
        locs.iter().flat_map(|l| l.lines.iter().map(|x| x.function.to_string())).collect()
    }

    /// Positions of `names` in `funcs` (the first function ending with each), in order.
    fn assert_chain(funcs: &[String], names: &[&str]) {
        let mut at = 0;
        for n in names {
            let i = funcs[at..].iter().position(|f| f.ends_with(n)).unwrap_or_else(|| panic!("{n} missing after #{at} in {funcs:#?}"));
            at += i + 1;
        }
    }

    /// (anonymous, file-backed) resident KiB.
    fn rss_kib() -> (u64, u64) {
        use crate::model::proc::own_status_kib;
        (own_status_kib("RssAnon"), own_status_kib("RssFile"))
    }

    #[test]
    fn self_unwind_and_symbolize() {
        let snap = level1();
        let pid = std::process::id();
        let mut np = NativeProfiler::new();
        let t = Instant::now();
        let addrs = np.unwind(pid, &snap.user_stack(), 64);
        let first_unwind = t.elapsed();
        assert!(addrs.len() >= 4, "{addrs:x?}");
        let rss0 = rss_kib();
        let t = Instant::now();
        let locs = np.symbolize(pid, &addrs, None);
        let first_sym = t.elapsed();
        let rss1 = rss_kib();
        let funcs = functions(&locs);
        assert_chain(&funcs, &["::level3", "::level2", "::level1"]);
        assert!(funcs.iter().any(|f| f.contains("test::run_test")), "{funcs:#?}");
        assert!(locs[0].module.starts_with("zerotrace"), "{}", locs[0].module);
        assert!(!locs[0].build_id.is_empty());
        assert!(locs[0].lines.iter().any(|l| l.file.as_deref().is_some_and(|f| f.ends_with("native.rs"))));

        let n = 2000u32;
        let t = Instant::now();
        for _ in 0..n {
            black_box(np.unwind(pid, &snap.user_stack(), 64));
        }
        let unwind = t.elapsed() / n;
        let t = Instant::now();
        for _ in 0..n {
            black_box(np.symbolize(pid, &addrs, None));
        }
        let sym = t.elapsed() / n;
        let (count, heap) = np.binaries_heap();
        eprintln!(
            "self: {} frames; first unwind (maps + {count} binaries) {first_unwind:?}, warm unwind {unwind:?}; \
             first symbolize {first_sym:?} (+{} KiB anon, +{} KiB file RSS), warm symbolize {sym:?}; \
             binaries heap {} KiB",
            addrs.len(),
            rss1.0.saturating_sub(rss0.0),
            rss1.1.saturating_sub(rss0.1),
            heap >> 10
        );
        for (b, _) in np.binaries.values() {
            eprintln!("  {} {} KiB build id {}", b.name, b.heap_bytes() >> 10, b.build_id);
        }

        // Go: addresses of the main executable go to the caller's tables (ELF virtual
        // address), others (libc) to ELF/DWARF.
        // SAFETY: dlsym with a NUL-terminated name.
        let getpid = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"getpid".as_ptr()) } as u64;
        let go = |v: u64| vec![Line { function: format!("go@{v:x}").into(), file: None, line: 0 }];
        let locs = np.symbolize(pid, &[getpid, snap.ip + 1], Some(&go));
        let m = np.procs[&pid].find(snap.ip).expect("mapping");
        let b = m.bin.as_ref().expect("binary");
        let vaddr = snap.ip - b.bias(m.start, m.offset).expect("bias");
        assert_eq!(&*locs[1].lines[0].function, format!("go@{vaddr:x}"));
        assert!(locs[0].lines.iter().any(|l| l.function.contains("getpid")), "{:?}", locs[0]);
    }

    #[test]
    fn garbage_never_panics() {
        let mut np = NativeProfiler::new();
        let pid = std::process::id();
        let junk: Vec<u8> = (0..8192u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        for (ip, sp, base) in [(0x1234, 0x7fff_0000, 0x7fff_0000), (u64::MAX, 0, 0), (0x40_0000, u64::MAX - 4, u64::MAX - 4096)] {
            let s = UserStack { ip, sp, bp: sp, base, stack: &junk };
            let a = np.unwind(pid, &s, 128);
            np.symbolize(pid, &a, None);
        }
        let f = level1();
        let s = UserStack { ip: f.ip, sp: f.sp, bp: 0xdead, base: f.base, stack: &junk };
        let a = np.unwind(pid, &s, 128);
        assert!(a.len() <= 128);
        np.symbolize(pid, &a, None);
        np.symbolize(u32::MAX - 1, &[1, 2, 3], None);
        np.forget(pid);
    }

    #[test]
    fn libc_and_kernel() {
        let pid = std::process::id();
        let mut np = NativeProfiler::new();
        // SAFETY: dlsym with a NUL-terminated name.
        let getpid = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"getpid".as_ptr()) } as u64;
        assert_ne!(getpid, 0);
        let rss0 = rss_kib();
        let t = Instant::now();
        let l = np.symbolize(pid, &[getpid], None);
        let rss1 = rss_kib();
        eprintln!(
            "libc first symbolize {:?} (+{} KiB anon, +{} KiB file RSS): {:?}",
            t.elapsed(),
            rss1.0.saturating_sub(rss0.0),
            rss1.1.saturating_sub(rss0.1),
            l[0].lines
        );
        assert!(l[0].module.starts_with("libc"), "{:?}", l[0]);
        assert!(l[0].lines.iter().any(|x| x.function.contains("getpid")), "{:?}", l[0]);

        let text = std::fs::read_to_string("/proc/kallsyms").expect("kallsyms");
        let ks = Kallsyms::parse(&text);
        let sym = ks.syms.iter().find(|s| ks.find(s.addr + 1).is_some_and(|(n, _)| n == "schedule"));
        let sym = sym.expect("/proc/kallsyms shows no addresses (kptr_restrict): run the tests as root, as `cargo xtask test` does");
        let t = Instant::now();
        let l = np.symbolize_kernel(&[sym.addr + 1, sym.addr + 8, 1]);
        eprintln!("kallsyms load + symbolize {:?}, {} symbols", t.elapsed(), ks.syms.len());
        assert_eq!(&*l[0].lines[0].function, "schedule");
        assert_eq!(&*l[0].module, "[kernel]");
        assert!(l[0].kernel);
        assert!(l[2].lines.is_empty());
        let module = text.lines().find(|l| l.contains(" t ") && l.ends_with(']'));
        if let Some(m) = module {
            let mut f = m.split_ascii_whitespace();
            let addr = u64::from_str_radix(f.next().unwrap_or("0"), 16).unwrap_or(0);
            let l = np.symbolize_kernel(&[addr]);
            assert!(l[0].module.starts_with('['), "{:?}", l[0]);
            assert_ne!(&*l[0].module, "[kernel]", "{:?}", l[0]);
        }
    }

    #[test]
    fn vdso() {
        let pid = std::process::id();
        let mut np = NativeProfiler::new();
        np.symbolize(pid, &[], None);
        let p = &np.procs[&pid];
        let Some(m) = p.maps.iter().find(|m| &*m.path == "[vdso]") else {
            eprintln!("no vdso");
            return;
        };
        let b = m.bin.as_ref().expect("vdso parsed");
        assert!(b.unwind.is_some());
        let (v, _, _) = b.dynsyms.iter().find(|s| s.2.contains("clock_gettime")).expect("clock_gettime");
        let addr = b.bias(m.start, m.offset).expect("bias") + v + 1;
        let l = np.symbolize(pid, &[addr], None);
        assert_eq!(&*l[0].module, "[vdso]");
        assert!(l[0].lines[0].function.contains("clock_gettime"), "{:?}", l[0]);
    }

    const SPIN: &str = r#"
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
static STOP: AtomicBool = AtomicBool::new(false);
#[inline(never)]
fn level3(n: u64) -> u64 {
    let mut x = n;
    while !STOP.load(Ordering::Relaxed) {
        x = black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
    }
    x
}
#[inline(never)]
fn level2(n: u64) -> u64 { black_box(level3(black_box(n + 1))) ^ 2 }
#[inline(never)]
fn level1(n: u64) -> u64 { black_box(level2(black_box(n + 1))) ^ 3 }
fn main() {
    use std::io::Write;
    println!("{}", std::process::id());
    std::io::stdout().flush().ok();
    println!("{}", level1(black_box(1)));
}
"#;

    fn rustc() -> std::path::PathBuf {
        if let Some(r) = std::env::var_os("RUSTC") {
            return r.into();
        }
        if let Some(c) = std::env::var_os("CARGO") {
            let r = std::path::PathBuf::from(c).with_file_name("rustc");
            if r.exists() {
                return r;
            }
        }
        "rustc".into()
    }

    /// Snapshot of a stopped thread with ptrace (PTRACE_SEIZE + PTRACE_INTERRUPT).
    fn ptrace_snapshot(pid: i32) -> Snapshot {
        let null = std::ptr::null_mut::<libc::c_void>();
        // SAFETY: plain ptrace/waitpid calls on our own child; regs is a valid out pointer.
        let regs = unsafe {
            assert_eq!(libc::ptrace(libc::PTRACE_SEIZE, pid, null, null), 0, "seize");
            assert_eq!(libc::ptrace(libc::PTRACE_INTERRUPT, pid, null, null), 0, "interrupt");
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, libc::__WALL), pid);
            let mut regs: libc::user_regs_struct = std::mem::zeroed();
            let r = libc::ptrace(libc::PTRACE_GETREGS, pid, null, &mut regs as *mut _ as *mut libc::c_void);
            assert_eq!(r, 0, "getregs");
            regs
        };
        let snap = copy_stack(pid as u32, regs.rip, regs.rsp, regs.rbp);
        // SAFETY: as above.
        unsafe { libc::ptrace(libc::PTRACE_DETACH, pid, null, null) };
        snap
    }

    #[test]
    fn no_frame_pointers_eh_frame() {
        use std::io::BufRead;
        let dir = std::env::temp_dir().join(format!("zt-native-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let src = dir.join("spin.rs");
        std::fs::write(&src, SPIN).expect("write src");
        let bin = dir.join("spin");
        let st = std::process::Command::new(rustc())
            .args(["-C", "opt-level=3", "-C", "force-frame-pointers=no", "-C", "debuginfo=1", "--crate-name", "spin", "-o"])
            .arg(&bin)
            .arg(&src)
            .status()
            .expect("rustc");
        assert!(st.success());
        let mut child = std::process::Command::new(&bin).stdout(std::process::Stdio::piped()).spawn().expect("spawn");
        let mut line = String::new();
        let out = child.stdout.take().expect("stdout");
        std::io::BufReader::new(out).read_line(&mut line).expect("pid line");
        let pid: i32 = line.trim().parse().expect("pid");
        assert_eq!(pid as u32, child.id());
        std::thread::sleep(Duration::from_millis(100));

        let mut np = NativeProfiler::new();
        let mut result = None;
        // A few samples: each must unwind through the whole chain.
        for _ in 0..5 {
            let snap = ptrace_snapshot(pid);
            let t = Instant::now();
            let addrs = np.unwind(pid as u32, &snap.user_stack(), 64);
            let unwind = t.elapsed();
            let t = Instant::now();
            let locs = np.symbolize(pid as u32, &addrs, None);
            let sym = t.elapsed();
            let funcs = functions(&locs);
            assert_chain(&funcs, &["spin::level3", "spin::level2", "spin::level1", "spin::main"]);
            assert_eq!(&*locs[0].module, "spin");
            // Frame pointers alone cannot do it.
            let fp = walk(None, &mut CacheX86_64::new(), &snap.user_stack(), 64);
            let fp_funcs = functions(&np.symbolize(pid as u32, &fp, None));
            result.get_or_insert((addrs.len(), unwind, sym, funcs, fp_funcs));
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(&dir);
        if let Some((n, unwind, sym, funcs, fp)) = result {
            eprintln!("spin: {n} frames, first unwind {unwind:?}, first symbolize {sym:?}\n  cfi: {funcs:?}\n  fp only: {fp:?}");
            assert!(!fp.iter().any(|f| f.ends_with("::level1")), "frame pointers alone found the chain: {fp:?}");
        }
    }
}
