//! Builds the kernel programs (ebpf/zerotrace-ebpf) with the pinned nightly and bpf-linker,
//! for a pinned BPF instruction set, so that the agent embeds the exact object it was built
//! with. `cargo xtask build` installs
//! both; a bare `cargo build` on a machine without them stops here with what to run. It also
//! generates the local control service from proto/zerotrace/v1/agent.proto.
use anyhow::{Context as _, anyhow};

/// Must match ebpf/rust-toolchain.toml.
const NIGHTLY: &str = "nightly-2026-05-20";

fn main() -> anyhow::Result<()> {
    control_service()?;
    cri_client()?;
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    if std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        // Builds that never load the kernel programs (fuzzing, docs): an empty object, which
        // Probes::load refuses with a message.
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR").context("OUT_DIR")?);
        std::fs::write(out.join("zerotrace"), b"").context("writing the empty kernel object")?;
        return Ok(());
    }
    if std::process::Command::new("bpf-linker").arg("--version").output().is_err() {
        return Err(anyhow!("bpf-linker is not installed: run `cargo xtask build` (it installs bpf-linker and the {NIGHTLY} toolchain)"));
    }
    let metadata = cargo_metadata::MetadataCommand::new().no_deps().exec().context("cargo metadata")?;
    let pkg = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "zerotrace-ebpf")
        .ok_or_else(|| anyhow!("zerotrace-ebpf package not found in the workspace"))?;
    let root = pkg.manifest_path.parent().ok_or_else(|| anyhow!("no parent for {}", pkg.manifest_path))?;
    build_kernel_object(root.as_std_path())
}

/// The BPF instruction set the kernel object is built for: v3 (32-bit jumps and ALU ops)
/// is accepted from Linux 5.1, below the oldest kernel zerotrace supports (5.10); pinned
/// so that a newer LLVM's default (v4 needs 6.6) cannot leave older kernels behind.
const BPF_CPU: &str = "v3";

/// Builds the kernel programs with the pinned nightly (build-std for bpfel-unknown-none),
/// bpf-linker emitting BTF, and copies the object to OUT_DIR/zerotrace. (aya-build does the
/// same but sets the compiler flags itself, so the instruction set could not be pinned.)
fn build_kernel_object(root: &std::path::Path) -> anyhow::Result<()> {
    // Cargo rebuilds the agent when the kernel crate's library changes (a build
    // dependency); its binary (the programs) is watched here.
    println!("cargo:rerun-if-changed={}", root.display());
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").context("OUT_DIR")?);
    let target_dir = out.join("ebpf-target");
    // Flags separated by 0x1f, as CARGO_ENCODED_RUSTFLAGS wants them.
    let flags = ["--cfg=bpf_target_arch=\"x86_64\"", "-Cdebuginfo=2", "-Clink-arg=--btf", &format!("-Ctarget-cpu={BPF_CPU}")].join("\x1f");
    let status = std::process::Command::new("rustup")
        .args(["run", NIGHTLY, "cargo", "build", "--package", "zerotrace-ebpf", "--bins", "--release"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core", "--target-dir"])
        .arg(&target_dir)
        .current_dir(root)
        .env("CARGO_ENCODED_RUSTFLAGS", flags)
        // The outer build's compiler and wrappers are not the nightly's.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTFLAGS")
        .status()
        .with_context(|| format!("running cargo with the {NIGHTLY} toolchain (rustup run {NIGHTLY} cargo)"))?;
    if !status.success() {
        return Err(anyhow!("building the kernel programs with {NIGHTLY} failed ({status}); `cargo xtask build` installs what is missing"));
    }
    let built = target_dir.join("bpfel-unknown-none/release/zerotrace");
    std::fs::copy(&built, out.join("zerotrace")).with_context(|| format!("copying {}", built.display()))?;
    Ok(())
}

/// The client of the container runtime's CRI (proto/cri/runtime/v1/api.proto, Kubernetes'
/// cri-api v1 as published), for pod and container names.
fn cri_client() -> anyhow::Result<()> {
    let proto = "../proto/cri/runtime/v1/api.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["../proto/cri"]).map_err(|e| anyhow!("compiling {proto}: {e}"))?;
    tonic_prost_build::configure().build_client(true).build_server(false).compile_fds(fds).context("generating the CRI client")?;
    Ok(())
}

/// The local control service (proto/zerotrace/v1/agent.proto), compiled with protox (no
/// protoc needed) and tonic's generator.
fn control_service() -> anyhow::Result<()> {
    let proto = "../proto/zerotrace/v1/agent.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["../proto"]).map_err(|e| anyhow!("compiling {proto}: {e}"))?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds).context("generating the control service")?;
    Ok(())
}
