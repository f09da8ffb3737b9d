//! The guests' initramfs: an uncompressed cpio (newc) holding busybox, /init
//! (tests/vm/init.sh), the agent, the test services and exactly the shared libraries `ldd`
//! names for the dynamically linked ones (plus their loader), at the paths they have here.
//! Uncompressed because the kernel would otherwise decompress it under emulation.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

/// What goes into the archive: path inside the guest -> file here (or a directory).
pub struct Image {
    files: BTreeMap<String, Entry>,
}

enum Entry {
    Dir,
    File { from: PathBuf, mode: u32 },
    Bytes { data: Vec<u8>, mode: u32 },
    CharDev { major: u32, minor: u32 },
}

impl Image {
    pub fn new() -> Image {
        let mut img = Image { files: BTreeMap::new() };
        for d in ["bin", "dev", "proc", "sys", "tmp", "run", "root", "etc", "zt", "vmtest"] {
            img.dir(d);
        }
        // The kernel opens /dev/console for /init before devtmpfs is mounted.
        img.files.insert("dev/console".into(), Entry::CharDev { major: 5, minor: 1 });
        img
    }

    fn dir(&mut self, path: &str) {
        let mut acc = String::new();
        for part in path.trim_matches('/').split('/') {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(part);
            self.files.entry(acc.clone()).or_insert(Entry::Dir);
        }
    }

    fn parent(&mut self, path: &str) {
        if let Some((dir, _)) = path.rsplit_once('/') {
            self.dir(dir);
        }
    }

    /// A file of this machine at `guest_path` (its content, following symlinks).
    pub fn file(&mut self, guest_path: &str, from: &Path, mode: u32) {
        let p = guest_path.trim_start_matches('/').to_owned();
        self.parent(&p);
        self.files.insert(p, Entry::File { from: from.to_owned(), mode });
    }

    pub fn bytes(&mut self, guest_path: &str, data: impl Into<Vec<u8>>, mode: u32) {
        let p = guest_path.trim_start_matches('/').to_owned();
        self.parent(&p);
        self.files.insert(p, Entry::Bytes { data: data.into(), mode });
    }

    /// An executable at `guest_path`, and the libraries it needs when it is dynamically
    /// linked (what `ldd` names, at the same paths, and the loader).
    pub fn executable(&mut self, guest_path: &str, from: &Path) -> Result<()> {
        self.file(guest_path, from, 0o755);
        for lib in needed_libraries(from)? {
            let guest = lib.to_string_lossy().into_owned();
            self.file(&guest, &lib, 0o755);
        }
        Ok(())
    }

    /// Writes the archive.
    pub fn write(&self, to: &Path) -> Result<u64> {
        let out = std::fs::File::create(to).with_context(|| format!("creating {}", to.display()))?;
        let mut out = std::io::BufWriter::new(out);
        for (ino, (path, entry)) in self.files.iter().enumerate() {
            let b = cpio::newc::Builder::new(path).ino(ino as u32 + 1).uid(0).gid(0);
            out = match entry {
                Entry::Dir => b.mode(0o040_755).nlink(2).write(out, 0).finish()?,
                Entry::CharDev { major, minor } => b.mode(0o020_600).nlink(1).rdev_major(*major).rdev_minor(*minor).write(out, 0).finish()?,
                Entry::Bytes { data, mode } => {
                    let mut w = b.mode(0o100_000 | mode).nlink(1).write(out, data.len() as u32);
                    std::io::Write::write_all(&mut w, data)?;
                    w.finish()?
                }
                Entry::File { from, mode } => {
                    let mut f = std::fs::File::open(from).with_context(|| format!("opening {}", from.display()))?;
                    let len = f.metadata()?.len();
                    if len > u32::MAX as u64 {
                        bail!("{} is too large for a cpio archive", from.display());
                    }
                    let mut w = b.mode(0o100_000 | mode).nlink(1).write(out, len as u32);
                    std::io::copy(&mut f, &mut w)?;
                    w.finish()?
                }
            };
        }
        let out = cpio::newc::trailer(out)?;
        let f = out.into_inner().map_err(|e| e.into_error())?;
        Ok(f.metadata()?.len())
    }
}

/// Absolute paths `ldd` prints for `exe` (libraries and the loader); none for a static one.
fn needed_libraries(exe: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(exe).output().context("running ldd (Debian package libc-bin)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // "not a dynamic executable": nothing to copy.
        return Ok(Vec::new());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.contains("not found") {
            bail!("{}: ldd cannot find a library it needs: {line}", exe.display());
        }
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)".
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}
