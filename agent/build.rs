//! Builds the kernel programs (ebpf/zerotrace-ebpf) with the pinned nightly and bpf-linker,
//! so that the agent embeds the exact object it was built with. `cargo xtask build` installs
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
    aya_build::build_ebpf([aya_build::Package { name: "zerotrace-ebpf", root_dir: root.as_str(), ..Default::default() }], aya_build::Toolchain::Custom(NIGHTLY))
        .with_context(|| format!("building the kernel programs with {NIGHTLY}; `cargo xtask build` installs what is missing"))
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
