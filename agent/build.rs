//! Builds the kernel programs (ebpf/zerotrace-ebpf) with the pinned nightly and bpf-linker,
//! so that the agent embeds the exact object it was built with. `cargo xtask build` installs
//! both; a bare `cargo build` on a machine without them stops here with what to run.
use anyhow::{Context as _, anyhow};

/// Must match ebpf/rust-toolchain.toml.
const NIGHTLY: &str = "nightly-2026-05-20";

fn main() -> anyhow::Result<()> {
    if std::process::Command::new("bpf-linker").arg("--version").output().is_err() {
        return Err(anyhow!(
            "bpf-linker is not installed: run `cargo xtask build` (it installs bpf-linker and the {NIGHTLY} toolchain)"
        ));
    }
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let pkg = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "zerotrace-ebpf")
        .ok_or_else(|| anyhow!("zerotrace-ebpf package not found in the workspace"))?;
    let root = pkg
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", pkg.manifest_path))?;
    aya_build::build_ebpf(
        [aya_build::Package { name: "zerotrace-ebpf", root_dir: root.as_str(), ..Default::default() }],
        aya_build::Toolchain::Custom(NIGHTLY),
    )
    .with_context(|| format!("building the kernel programs with {NIGHTLY}; `cargo xtask build` installs what is missing"))
}
