//! What each executable file is, read once: a Go program's build info, struct layout and
//! uprobe plan, a native program's runtime, remembered by the file's identity, so that the
//! next process of the same file is inspected for what is its own alone (path, environment,
//! load bias). Under process churn this is the difference between reading a Go executable's
//! tables and DWARF at every exec and a few /proc reads.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use crate::{
    model::{
        proc::{self, FileId},
        target::{Inspected, Program, TargetError},
    },
    probes::go,
};

/// Executable files remembered, at most (one entry is a few KiB: build info, layout, plan).
const MAX_PROGRAMS: usize = 1024;

/// A file's program and, for Go, where its uprobes go.
struct Known {
    program: Program,
    plan: Option<Arc<go::Plan>>,
}

/// A process ready to be attached: what it is, its uprobe plan (Go programs), the identity
/// of the file it runs.
pub struct Ready {
    pub inspected: Inspected,
    pub plan: Option<Arc<go::Plan>>,
    pub file: Option<FileId>,
}

impl Ready {
    pub fn pid(&self) -> u32 {
        self.inspected.pid()
    }
}

/// The programs read so far; shared by the threads that inspect processes.
#[derive(Clone)]
pub struct Programs {
    known: Arc<Mutex<HashMap<FileId, Arc<Known>>>>,
    settings: go::PlanSettings,
}

impl Programs {
    pub fn new(settings: go::PlanSettings) -> Self {
        Self { known: Arc::default(), settings }
    }

    /// Inspects process `pid`: its file's program read once per file, then what is the
    /// process's own.
    pub fn inspect(&self, pid: u32) -> Result<Ready, TargetError> {
        let file = proc::exe_identity(pid);
        let cached = file.and_then(|f| self.known.lock().expect("not poisoned").get(&f).cloned());
        let known = match cached {
            Some(k) => k,
            None => {
                let (program, exe) = Program::read(pid)?;
                let plan = match (&program, exe) {
                    (Program::Go(g), Some(exe)) => {
                        Some(Arc::new(go::plan(pid, &g.layout, &g.build, &exe, &self.settings).map_err(|source| TargetError::Symbols { pid, source })?))
                    }
                    _ => None,
                };
                let known = Arc::new(Known { program, plan });
                // Remembered only when the process ran the same file before and after the
                // read (an exec in between: what was read may be another file).
                if let Some(f) = file
                    && proc::exe_identity(pid) == Some(f)
                {
                    let mut map = self.known.lock().expect("not poisoned");
                    if map.len() >= MAX_PROGRAMS
                        && let Some(old) = map.keys().next().copied()
                    {
                        map.remove(&old);
                    }
                    map.insert(f, known.clone());
                }
                known
            }
        };
        let inspected = known.program.inspect(pid)?;
        Ok(Ready { inspected, plan: known.plan.clone(), file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file is read once: this test program inspected twice is one remembered program, a
    /// native one with its Rust version; a pid that does not exist is an error, remembered
    /// nowhere.
    #[test]
    fn a_file_is_read_once() {
        let settings = go::PlanSettings { http: go::GoHttpProbes::Conn, causality: go::GoCausality { spawns: true, channels: true }, tls: true, inject: false };
        let programs = Programs::new(settings);
        let me = std::process::id();
        for _ in 0..2 {
            let ready = programs.inspect(me).expect("inspects itself");
            assert!(ready.plan.is_none() && ready.file.is_some());
            let Inspected::Native(n) = ready.inspected else { panic!("this test is not a Go program") };
            assert_eq!(n.runtime.map(|r| r.0).as_deref(), Some("rust"));
        }
        assert_eq!(programs.known.lock().unwrap().len(), 1);
        assert!(matches!(programs.inspect(u32::MAX - 1), Err(TargetError::NoSuchProcess(_))));
        assert_eq!(programs.known.lock().unwrap().len(), 1);
    }
}
