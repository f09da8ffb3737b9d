//! What zerotrace learns from a program's executable: ELF symbols and segments, Go build
//! info, Go struct offsets (DWARF), and the RET instructions of functions it hooks.
//! Binaries are read through /proc/PID/exe so that other mount namespaces work too.

pub mod buildinfo;
pub mod disasm;
pub mod dwarf;
pub mod elf;
pub mod go;

use std::path::PathBuf;

pub use elf::{Executable, FunctionSym};

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
}

/// Hint shown when a Go binary was stripped of its symbol table or DWARF.
pub const STRIPPED_HINT: &str =
    "the binary looks stripped (-ldflags='-s -w'); rebuild without -s -w to trace it (support for stripped binaries is planned)";
