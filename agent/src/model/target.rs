//! A process chosen for tracing: who it is (executable, Go version) and how it is laid out
//! (Go struct offsets, load bias). Every way this can fail has a message that says what
//! to do next.
use std::path::PathBuf;

use crate::symbols::{
    Executable, SymbolError,
    buildinfo::{BuildInfo, BuildInfoError},
    go::{GoLayout, layout},
};

use super::proc;

/// Oldest Go release zerotrace supports (register ABI, current net/http layout).
pub const MIN_GO: (u32, u32) = (1, 21);

#[derive(Debug)]
pub struct Target {
    pub pid: u32,
    /// Executable path as the process sees it.
    pub exe_path: PathBuf,
    pub exe_name: String,
    pub build: BuildInfo,
    pub layout: GoLayout,
    /// Load bias (0 unless the executable is position independent).
    pub bias: u64,
    /// OpenTelemetry settings in the process's own environment.
    pub env: TargetEnv,
}

/// OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES as the target process was started with.
#[derive(Debug, Default, Clone)]
pub struct TargetEnv {
    pub service_name: Option<String>,
    pub resource_attrs: Vec<(String, String)>,
}

impl TargetEnv {
    pub fn read(pid: u32) -> TargetEnv {
        let mut env = TargetEnv::default();
        for (k, v) in proc::environ(pid) {
            match k.as_str() {
                "OTEL_SERVICE_NAME" if !v.trim().is_empty() => env.service_name = Some(v.trim().to_owned()),
                "OTEL_RESOURCE_ATTRIBUTES" => {
                    env.resource_attrs = crate::otel_env::kv_list(&v).unwrap_or_default();
                }
                _ => {}
            }
        }
        env
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("no process with PID {0}: it may have exited; check with `ps -p {0}`")]
    NoSuchProcess(u32),
    #[error("cannot inspect PID {pid}: {source}; zerotrace must run as root (or with CAP_SYS_PTRACE) to read another process's executable")]
    Access { pid: u32, source: std::io::Error },
    #[error(
        "PID {pid} ({path}) is not a Go program: no Go build info in its executable. zerotrace attaches \
         to Go programs built by Go {}.{} or newer (stripped or not); point --pid at the Go service itself \
         (not a shell or wrapper script that started it)",
        MIN_GO.0, MIN_GO.1
    )]
    NotGo { pid: u32, path: String },
    #[error("PID {pid} ({path}) was built by {version}; zerotrace supports Go {}.{} and newer: rebuild it with a newer Go", MIN_GO.0, MIN_GO.1)]
    TooOld { pid: u32, path: String, version: String },
    #[error("PID {pid} ({path}) is a {arch} program; zerotrace traces linux/amd64 programs")]
    Arch { pid: u32, path: String, arch: String },
    #[error("PID {pid}: {source}")]
    Symbols {
        pid: u32,
        #[source]
        source: SymbolError,
    },
    #[error("PID {pid} is left alone: {reason}")]
    Excluded { pid: u32, reason: String },
}

/// A process that is not a Go program: traced at the socket level (HTTP/1 server and
/// client spans; no goroutines, no uprobes).
#[derive(Debug)]
pub struct NativeTarget {
    pub pid: u32,
    pub exe_path: PathBuf,
    pub exe_name: String,
    /// The language runtime, when the executable says (rustc's `.comment` note):
    /// (name, version).
    pub runtime: Option<(String, String)>,
    pub env: TargetEnv,
}

/// What a selected process turned out to be.
pub enum Inspected {
    Go(Box<Target>),
    Native(NativeTarget),
}

impl Inspected {
    pub fn pid(&self) -> u32 {
        match self {
            Inspected::Go(t) => t.pid,
            Inspected::Native(n) => n.pid,
        }
    }
}

/// What an executable file is, read once per file: the same for every process running it.
#[derive(Clone, Debug)]
pub enum Program {
    /// A Go program of a supported version and architecture.
    Go(Box<GoProgram>),
    /// Any other program, traced at the socket level; the language runtime when the
    /// executable says (rustc's `.comment` note): (name, version).
    Native { runtime: Option<(String, String)> },
}

/// What a Go executable file is.
#[derive(Clone, Debug)]
pub struct GoProgram {
    pub build: BuildInfo,
    pub layout: GoLayout,
    pub is_pie: bool,
    pub first_load_vaddr: u64,
}

impl Program {
    /// Reads the executable of process `pid` (the slow part of inspecting: a Go program's
    /// build info and struct layout), with the opened executable for a Go program (where
    /// its uprobes go is read from it).
    pub fn read(pid: u32) -> Result<(Program, Option<Executable>), TargetError> {
        if pid == 0 || !proc::exists(pid) {
            return Err(TargetError::NoSuchProcess(pid));
        }
        let shown = exe_path(pid)?.display().to_string();
        let exe = Executable::open(&proc::exe_open_path(pid)).map_err(|e| match e {
            SymbolError::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound => TargetError::NoSuchProcess(pid),
            SymbolError::Read { source, .. } => TargetError::Access { pid, source },
            SymbolError::NotElf { .. } => TargetError::NotGo { pid, path: shown.clone() },
            source => TargetError::Symbols { pid, source },
        });
        let exe = match exe {
            Err(TargetError::NotGo { .. }) => return Ok((Program::Native { runtime: None }, None)),
            other => other?,
        };
        let section = exe.section(".go.buildinfo");
        let build = match section.as_deref().map(BuildInfo::parse) {
            Some(Ok(b)) => b,
            Some(Err(BuildInfoError::PointerFormat)) => {
                return Err(TargetError::TooOld { pid, path: shown, version: "Go 1.17 or older".into() });
            }
            _ => {
                let runtime = exe.section(".comment").and_then(|c| rust_version(&c)).map(|v| ("rust".to_owned(), v));
                return Ok((Program::Native { runtime }, None));
            }
        };
        if exe.machine != object::elf::EM_X86_64 {
            let arch = build.setting("GOARCH").unwrap_or("a non-amd64").to_owned();
            return Err(TargetError::Arch { pid, path: shown, arch });
        }
        match build.version_tuple() {
            Some((maj, min, _)) if (maj, min) < MIN_GO => {
                return Err(TargetError::TooOld { pid, path: shown, version: build.go_version.clone() });
            }
            _ => {}
        }
        // Stripped binaries (-ldflags='-s -w') work too: functions come from Go's own function
        // table, struct offsets from the generated table (GoLayout::source says which).
        let layout = layout(&exe, &build).map_err(|source| TargetError::Symbols { pid, source })?;
        let program = Program::Go(Box::new(GoProgram { build, layout, is_pie: exe.is_pie, first_load_vaddr: exe.first_load_vaddr() }));
        Ok((program, Some(exe)))
    }

    /// Process `pid` running this program: what is its own (path, name, environment, load
    /// bias).
    pub fn inspect(&self, pid: u32) -> Result<Inspected, TargetError> {
        let exe_path = exe_path(pid)?;
        let exe_name = exe_name(pid, &exe_path);
        let env = TargetEnv::read(pid);
        match self {
            Program::Native { runtime } => Ok(Inspected::Native(NativeTarget { pid, exe_path, exe_name, runtime: runtime.clone(), env })),
            Program::Go(g) => {
                let gone_or = |source| if proc::exists(pid) { TargetError::Access { pid, source } } else { TargetError::NoSuchProcess(pid) };
                let bias = if g.is_pie { proc::load_bias(pid, &exe_path, g.first_load_vaddr).map_err(gone_or)? } else { 0 };
                Ok(Inspected::Go(Box::new(Target { pid, exe_path, exe_name, build: g.build.clone(), layout: g.layout.clone(), bias, env })))
            }
        }
    }
}

/// The executable process `pid` runs, as it sees it.
fn exe_path(pid: u32) -> Result<PathBuf, TargetError> {
    proc::exe_link(pid).map_err(|source| {
        // A zombie (exited, not yet reaped) still has /proc/PID but no executable.
        if source.kind() == std::io::ErrorKind::NotFound || !proc::exists(pid) { TargetError::NoSuchProcess(pid) } else { TargetError::Access { pid, source } }
    })
}

/// The executable's file name, else the process's comm, else "pid-N".
fn exe_name(pid: u32, exe_path: &std::path::Path) -> String {
    exe_path.file_name().map(|n| n.to_string_lossy().into_owned()).or_else(|| proc::comm(pid)).unwrap_or_else(|| format!("pid-{pid}"))
}

/// The rustc version in an ELF `.comment` section ("rustc version 1.95.0 (hash date)").
fn rust_version(comment: &[u8]) -> Option<String> {
    let at = memchr::memmem::find(comment, b"rustc version ")? + "rustc version ".len();
    let rest = &comment[at..];
    let end = rest.iter().position(|&b| b == b' ' || b == 0).unwrap_or(rest.len()).min(32);
    std::str::from_utf8(&rest[..end]).ok().filter(|v| !v.is_empty()).map(str::to_owned)
}
