//! `cargo xtask image`: the agent's container image, FROM scratch, with no registry and no
//! base image: the release binary the build already made (debug sections stripped, symbols
//! kept), the shared libraries it loads and the dynamic loader, as one OCI archive at
//! `target/image/zerotrace.oci.tar` named `docker.io/library/zerotrace:dev`.
use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result};
use clap::Args;
use zerotrace_e2e::oci::{self, ImageSpec};

use crate::util::{build_release, root, run, step};

/// The name the manifests use (`image: zerotrace:dev` resolves to it in containerd and podman).
pub const IMAGE_NAME: &str = "docker.io/library/zerotrace:dev";

#[derive(Args)]
pub struct ImageArgs {
    /// Use this agent binary instead of building target/release/zerotrace.
    #[arg(long)]
    pub binary: Option<PathBuf>,
}

pub fn run_image(args: ImageArgs) -> Result<()> {
    let bin = match args.binary {
        Some(b) => b,
        None => {
            crate::setup::kernel_toolchain()?;
            build_release()?
        }
    };
    let w = build(&bin)?;
    println!(
        "{} ({:.1} MiB; layer {:.1} MiB uncompressed), manifest {}\n  podman load -i {0}\n  ctr -n k8s.io images import {0}\n  push: skopeo copy oci-archive:{0} docker://REGISTRY/zerotrace:TAG, then `kustomize edit set image zerotrace=REGISTRY/zerotrace:TAG` (deploy/README.md)",
        w.archive.display(),
        w.archive_bytes as f64 / 1048576.0,
        w.layer_bytes as f64 / 1048576.0,
        w.manifest_digest,
    );
    Ok(())
}

/// Builds the image from an already built agent binary (no second build).
pub fn build(bin: &std::path::Path) -> Result<oci::Written> {
    step("assembling the agent's OCI image (FROM scratch: the binary, its shared libraries, the loader)");
    let dir = root().join("target/image");
    std::fs::create_dir_all(&dir)?;
    // The line tables are for debugging the build tree; the symbol table stays (panics and
    // the agent's own profile frames keep their names).
    let stripped = dir.join("zerotrace");
    run(Command::new("objcopy").arg("--strip-debug").arg(bin).arg(&stripped)).context("objcopy (Debian package binutils)")?;
    let files = oci::program_files(&stripped, "/zerotrace")?;
    let spec = ImageSpec {
        name: IMAGE_NAME.to_owned(),
        files,
        entrypoint: vec!["/zerotrace".into()],
        // With no arguments the image says what the node allows.
        cmd: vec!["doctor".into()],
        env: vec!["PATH=/".into()],
        // Mount points a read-only root needs: the control socket's directory, the config.
        dirs: vec!["/run/zerotrace".into(), "/etc/zerotrace".into(), "/tmp".into()],
    };
    oci::write_archive(&spec, &dir.join("zerotrace.oci.tar"))
}
