//! A real PostgreSQL server for the database tests: the Debian package's binaries, a fresh
//! cluster in a temporary directory, listening on loopback only, run as the `postgres`
//! user (the server refuses root), stopped and removed when dropped.
use std::{
    os::unix::process::CommandExt,
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::proc::{Proc, free_port, wait_for_port};

/// The database the tests' programs use.
pub const DATABASE: &str = "shop";
/// The role every test connects as (trust authentication on loopback).
pub const USER: &str = "zt";

/// The folder with `initdb` and `postgres`: `ZEROTRACE_PG_BIN`, else the newest
/// /usr/lib/postgresql/N/bin (Debian's layout: not on PATH), else PATH.
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("ZEROTRACE_PG_BIN") {
        return Ok(PathBuf::from(d));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let e = e.ok()?;
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    let out = Command::new("sh").args(["-c", "command -v initdb"]).output()?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    match PathBuf::from(&path).parent() {
        Some(dir) if out.status.success() => Ok(dir.to_owned()),
        _ => bail!("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb); `cargo xtask setup` installs Debian's postgresql"),
    }
}

/// The uid and gid of a user, by `id`.
fn ids(user: &str) -> Result<(u32, u32)> {
    let id = |flag: &str| -> Result<u32> {
        let out = Command::new("id").args([flag, user]).output()?;
        if !out.status.success() {
            bail!("no user {user} (the postgresql package makes it)");
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    };
    Ok((id("-u")?, id("-g")?))
}

/// A cluster's directory, removed when dropped (on every path, a failed start too).
struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Directories of clusters whose test process is gone (SIGKILLed before its drop ran).
fn sweep_leftovers() {
    for e in std::fs::read_dir(std::env::temp_dir()).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("zerotrace-pg-").and_then(|r| r.split('-').next()).and_then(|p| p.parse::<u32>().ok()) else { continue };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A running server; on drop SIGQUIT (immediate shutdown), SIGKILL if it has not exited in
/// 10 s, then its directory removed.
pub struct Postgres {
    pub port: u16,
    pub proc: Proc,
    _dir: Dir,
}

impl Postgres {
    /// initdb into a new temporary directory, start the server on 127.0.0.1 and make the
    /// role `USER` and the database `DATABASE`.
    pub fn start() -> Result<Postgres> {
        static N: AtomicU32 = AtomicU32::new(0);
        let bin = bin_dir()?;
        let (uid, gid) = ids("postgres")?;
        sweep_leftovers();
        let dir = Dir(std::env::temp_dir().join(format!("zerotrace-pg-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))));
        let _ = std::fs::remove_dir_all(&dir.0);
        std::fs::create_dir_all(&dir.0)?;
        std::os::unix::fs::chown(&dir.0, Some(uid), Some(gid))?;
        let data = dir.0.join("data");
        let out = Command::new(bin.join("initdb"))
            .args(["-D"])
            .arg(&data)
            .args(["-U", USER, "--auth=trust", "-E", "UTF8", "--no-sync", "--locale=C"])
            .uid(uid)
            .gid(gid)
            .output()
            .context("running initdb")?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let port = free_port();
        let mut cmd = Command::new(bin.join("postgres"));
        cmd.arg("-D").arg(&data).arg("-k").arg(&dir.0).args(["-h", "127.0.0.1", "-p", &port.to_string()]);
        // A test database: durability is not what is measured.
        cmd.args(["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off", "-c", "max_connections=200"]);
        cmd.uid(uid).gid(gid);
        let proc = Proc::spawn("postgres", cmd)?;
        let pg = Postgres { port, proc, _dir: dir };
        wait_for_port(port, Duration::from_secs(30)).with_context(|| format!("postgres did not start: {}", pg.proc.stderr_text()))?;
        // The server listens before it accepts sessions ("the database system is starting
        // up"): createdb is retried until then.
        let mut last = String::new();
        for _ in 0..120 {
            let out = Command::new(bin.join("createdb"))
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", USER, DATABASE])
                .uid(uid)
                .gid(gid)
                .output()
                .context("running createdb")?;
            if out.status.success() {
                return Ok(pg);
            }
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            std::thread::sleep(Duration::from_millis(250));
        }
        bail!("createdb failed: {last}")
    }

    /// The lib/pq connection string (URL form) for `DATABASE` as `USER`.
    pub fn dsn(&self) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{DATABASE}?sslmode=disable", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.proc.signal(libc::SIGQUIT);
        if self.proc.wait_timeout(Duration::from_secs(10)).is_none() {
            let _ = self.proc.child.kill();
            let _ = self.proc.child.wait();
        }
        // Then `_dir` goes (fields drop after this).
    }
}
