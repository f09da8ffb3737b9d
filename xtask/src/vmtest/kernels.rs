//! Debian kernels and busybox for the VM tests: downloaded (never installed) with apt-get
//! under a private apt configuration in ~/.cache/zerotrace/kernels, so that bullseye,
//! bookworm(-backports) and trixie(-backports) can be searched from any Debian host without
//! touching its own sources. Only the vmlinuz (and busybox) is kept; a kernel once there is
//! used again without any network access.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result, bail};

use crate::util::step;

/// The suites searched. Packages roll within them: the newest of a series that downloads is
/// the one used, never a hard-coded version.
const SOURCES: &str = "\
deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bullseye main
deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main
deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main
deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie-backports main
";

/// A kernel ready to boot.
#[derive(Clone, Debug)]
pub struct Kernel {
    /// What was asked for: "5.10", ..., or "newest".
    pub series: String,
    /// The kernel release, e.g. "6.19.14+deb13-cloud-amd64".
    pub release: String,
    pub vmlinuz: PathBuf,
}

pub fn dir() -> PathBuf {
    zerotrace_e2e::tools::cache_dir().join("kernels")
}

/// apt-get and apt-cache under the private configuration.
struct Apt {
    root: PathBuf,
    updated: bool,
}

impl Apt {
    fn new() -> Result<Apt> {
        let root = dir().join("apt");
        for d in ["etc", "lists/partial", "cache/archives/partial"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        let list = root.join("etc/sources.list");
        if std::fs::read_to_string(&list).ok().as_deref() != Some(SOURCES) {
            std::fs::write(&list, SOURCES)?;
        }
        Ok(Apt { root, updated: false })
    }

    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        let r = &self.root;
        for opt in [
            format!("Dir::Etc::sourcelist={}", r.join("etc/sources.list").display()),
            "Dir::Etc::sourceparts=-".to_owned(),
            format!("Dir::State::Lists={}", r.join("lists").display()),
            format!("Dir::Cache={}", r.join("cache").display()),
            "APT::Architectures=amd64".to_owned(),
            // Files under ~/.cache are not readable by apt's sandbox user.
            "APT::Sandbox::User=root".to_owned(),
            "Acquire::Languages=none".to_owned(),
            "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".to_owned(),
            "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false".to_owned(),
            "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false".to_owned(),
            "Acquire::IndexTargets::deb::CNF::DefaultEnabled=false".to_owned(),
        ] {
            c.arg("-o").arg(opt);
        }
        c
    }

    /// Package lists are fetched when missing or older than a day (only when something has
    /// to be looked up: a cached kernel needs none).
    fn update(&mut self, force: bool) -> Result<()> {
        if self.updated {
            return Ok(());
        }
        let stamp = self.root.join("updated");
        let fresh = std::fs::metadata(&stamp)
            .and_then(|m| m.modified())
            .is_ok_and(|t| SystemTime::now().duration_since(t).unwrap_or_default() < Duration::from_secs(86_400));
        if force || !fresh {
            step("fetching Debian package lists for the VM kernels (bullseye, bookworm, trixie and their backports; ~30 MB)");
            let out = self.cmd("apt-get").args(["-q", "update"]).stdout(Stdio::null()).output().context("running apt-get update")?;
            if !out.status.success() {
                bail!("apt-get update (private configuration under {}) failed:\n{}", self.root.display(), String::from_utf8_lossy(&out.stderr));
            }
            std::fs::write(&stamp, b"")?;
        }
        self.updated = true;
        Ok(())
    }

    fn pkgnames(&self, prefix: &str) -> Result<Vec<String>> {
        let out = self.cmd("apt-cache").args(["pkgnames", prefix]).stderr(Stdio::null()).output()?;
        Ok(String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect())
    }

    /// The candidate version of a package, if it has one.
    fn version(&self, pkg: &str) -> Option<String> {
        self.versions(&[pkg.to_owned()]).ok()?.remove(pkg)
    }

    /// Candidate versions of packages (one apt-cache run); names without one are left out.
    fn versions(&self, pkgs: &[String]) -> Result<std::collections::HashMap<String, String>> {
        let mut found = std::collections::HashMap::new();
        if pkgs.is_empty() {
            return Ok(found);
        }
        let out = self.cmd("apt-cache").args(["--no-all-versions", "show"]).args(pkgs).stderr(Stdio::null()).output()?;
        let mut name = None;
        for l in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(n) = l.strip_prefix("Package: ") {
                name = Some(n.to_owned());
            } else if let Some(v) = l.strip_prefix("Version: ")
                && let Some(n) = name.take()
            {
                found.insert(n, v.to_owned());
            }
        }
        Ok(found)
    }

    /// Downloads `pkg` into `into` and returns the .deb.
    fn download(&self, pkg: &str, into: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(into)?;
        let out = self.cmd("apt-get").current_dir(into).args(["-q", "download", pkg]).stdout(Stdio::null()).output()?;
        if !out.status.success() {
            bail!("apt-get download {pkg}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        std::fs::read_dir(into)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&format!("{pkg}_")) && n.to_string_lossy().ends_with(".deb")))
            .with_context(|| format!("apt-get download {pkg} left no .deb in {}", into.display()))
    }
}

fn checks_cut(s: &str) -> String {
    super::checks::cut(s.lines().last().unwrap_or(s), 200)
}

/// Debian version order (`dpkg --compare-versions`).
fn newer(a: &str, b: &str) -> bool {
    Command::new("dpkg").args(["--compare-versions", a, "gt", b]).status().is_ok_and(|s| s.success())
}

/// Extracts the file `member` (a path inside the package, e.g. "./boot/vmlinuz-R") of `deb`
/// to `to`.
fn extract(deb: &Path, member: &str, to: &Path) -> Result<bool> {
    let tmp = to.with_extension("extract");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    let sh = format!("dpkg-deb --fsys-tarfile '{}' | tar -x -C '{}' '{member}'", deb.display(), tmp.display());
    let ok = Command::new("sh").args(["-c", &sh]).stderr(Stdio::null()).status()?.success();
    let got = tmp.join(member.trim_start_matches("./"));
    let found = ok && got.is_file();
    if found {
        std::fs::rename(&got, to)?;
    }
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(found)
}

/// Whether kernel release `release` (e.g. "6.1.0-50-cloud-amd64") is a cloud kernel of
/// `series` ("6.1"; "newest": any).
fn in_series(series: &str, release: &str) -> bool {
    // "6.1" must not match 6.12: the series is followed by "." or "-".
    let series_ok = if series == "newest" {
        release.starts_with(|c: char| c.is_ascii_digit())
    } else {
        release.strip_prefix(series).is_some_and(|rest| rest.starts_with(['.', '-']))
    };
    series_ok && release.ends_with("-cloud-amd64") && !release.contains("unsigned")
}

/// Kernel releases of `series` ("5.10", "6.19", ...; "newest": every series) with cloud
/// images, newest first, as (release, package version).
fn releases(apt: &Apt, series: &str) -> Result<Vec<(String, String)>> {
    let prefix = if series == "newest" { "linux-image-".to_owned() } else { format!("linux-image-{series}") };
    let names: Vec<String> = apt.pkgnames(&prefix)?.into_iter().filter(|name| in_series(series, &name["linux-image-".len()..])).collect();
    let versions = apt.versions(&names)?;
    let mut found: Vec<(String, String)> = names.iter().filter_map(|n| Some((n["linux-image-".len()..].to_owned(), versions.get(n)?.clone()))).collect();
    // Newest first.
    found.sort_by(|a, b| {
        if newer(&a.1, &b.1) {
            std::cmp::Ordering::Less
        } else if newer(&b.1, &a.1) {
            std::cmp::Ordering::Greater
        } else {
            std::cmp::Ordering::Equal
        }
    });
    Ok(found)
}

/// The kernel of `series`: the cached one, else the newest that downloads (the vmlinuz is
/// in `linux-binary-R` from 6.19 on, in `linux-image-R` before).
pub fn kernel(series: &str, refresh: bool) -> Result<Kernel> {
    let home = dir().join(series);
    let marker = home.join("release");
    if !refresh && let Ok(release) = std::fs::read_to_string(&marker) {
        let release = release.trim().to_owned();
        let vmlinuz = home.join(format!("vmlinuz-{release}"));
        if vmlinuz.is_file() {
            return Ok(Kernel { series: series.to_owned(), release, vmlinuz });
        }
    }
    let mut apt = Apt::new()?;
    apt.update(refresh)?;
    let mut candidates = releases(&apt, series)?;
    if candidates.is_empty() && !refresh {
        // Lists of a day ago may lack a series Debian has just added.
        apt.updated = false;
        apt.update(true)?;
        candidates = releases(&apt, series)?;
    }
    if candidates.is_empty() {
        bail!("Debian has no cloud kernel of series {series} in bullseye, bookworm, trixie or their backports (apt-cache pkgnames linux-image-{series})");
    }
    std::fs::create_dir_all(&home)?;
    let debs = dir().join("debs");
    let mut tried = Vec::new();
    for (release, version) in candidates {
        let binary = format!("linux-binary-{release}");
        let pkgs: Vec<String> = if apt.version(&binary).is_some() { vec![binary] } else { vec![format!("linux-image-{release}")] };
        for pkg in pkgs {
            step(format!("downloading Linux {release} ({pkg} {version}) into {}", home.display()));
            let deb = match apt.download(&pkg, &debs) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("    {}: trying the next", checks_cut(&format!("{e:#}")));
                    tried.push(format!("{e:#}"));
                    continue;
                }
            };
            let vmlinuz = home.join(format!("vmlinuz-{release}"));
            // /boot until Linux 7.1, /usr/lib/modules/R/ from 7.2 on.
            let ok =
                extract(&deb, &format!("./boot/vmlinuz-{release}"), &vmlinuz)? || extract(&deb, &format!("./usr/lib/modules/{release}/vmlinuz"), &vmlinuz)?;
            let _ = std::fs::remove_file(&deb);
            if ok {
                std::fs::write(&marker, &release)?;
                return Ok(Kernel { series: series.to_owned(), release, vmlinuz });
            }
            eprintln!("    {pkg} holds no vmlinuz (boot/ nor usr/lib/modules/): trying the next");
            tried.push(format!("{pkg} has no vmlinuz"));
        }
    }
    bail!("no kernel of series {series} could be downloaded: {}", tried.join("; "))
}

/// A static busybox (shell and tools of the guests) from Debian's busybox-static.
pub fn busybox(refresh: bool) -> Result<PathBuf> {
    let home = dir().join("busybox-static");
    let bin = home.join("busybox");
    if bin.is_file() && !refresh {
        return Ok(bin);
    }
    let mut apt = Apt::new()?;
    apt.update(refresh)?;
    let version = apt.version("busybox-static").context("no busybox-static package in the VM kernels' apt lists")?;
    step(format!("downloading busybox-static {version} (the VM guests' shell) into {}", home.display()));
    std::fs::create_dir_all(&home)?;
    let deb = apt.download("busybox-static", &dir().join("debs"))?;
    let ok = extract(&deb, "./usr/bin/busybox", &bin)? || extract(&deb, "./bin/busybox", &bin)?;
    let _ = std::fs::remove_file(&deb);
    if !ok {
        bail!("{} holds no usr/bin/busybox nor bin/busybox", deb.display());
    }
    Ok(bin)
}

#[cfg(test)]
mod tests {
    use super::in_series;

    #[test]
    fn series_names_do_not_overlap() {
        assert!(in_series("6.1", "6.1.0-50-cloud-amd64"));
        assert!(!in_series("6.1", "6.12.95+deb12-cloud-amd64"));
        assert!(in_series("6.12", "6.12.95+deb12-cloud-amd64"));
        assert!(in_series("5.10", "5.10.0-32-cloud-amd64"));
        assert!(!in_series("5.10", "5.10.0-32-cloud-amd64-dbg"));
        assert!(!in_series("6.19", "6.19.14+deb13-amd64"));
        assert!(in_series("newest", "7.3.4+deb13-cloud-amd64"));
        assert!(!in_series("newest", "cloud-amd64"));
    }
}
