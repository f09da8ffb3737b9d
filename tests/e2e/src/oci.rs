//! OCI image archives built FROM scratch, with no registry and no base image: a program and
//! exactly the shared libraries it loads (found with `ldd`), in one layer. `cargo xtask image`
//! makes the agent's image with it, and the container tests make their services' images.
//! Written with the `oci-spec` types, `tar`, `flate2` and `sha2`, not by hand.
use std::{
    collections::{BTreeMap, HashMap},
    io::Write,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, DescriptorBuilder, Digest, ImageConfigurationBuilder, ImageIndexBuilder, ImageManifestBuilder, MediaType,
    OciLayoutBuilder, Os, RootFsBuilder, Sha256Digest,
};
use sha2::{Digest as _, Sha256};

/// One file of the image: where it goes, where its bytes come from, its mode.
#[derive(Clone, Debug)]
pub struct File {
    pub path: String,
    pub source: PathBuf,
    pub mode: u32,
}

/// What an image holds and how it starts.
#[derive(Clone, Debug, Default)]
pub struct ImageSpec {
    /// Fully qualified name, e.g. `docker.io/library/zerotrace:dev`: podman and containerd
    /// both name the loaded image from the index's `io.containerd.image.name` annotation.
    pub name: String,
    pub files: Vec<File>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    /// Empty directories the image provides (mount points, e.g. `/tmp`).
    pub dirs: Vec<String>,
}

/// What was written.
#[derive(Debug)]
pub struct Written {
    pub archive: PathBuf,
    /// Size of the archive in bytes.
    pub archive_bytes: u64,
    /// Uncompressed size of the one layer.
    pub layer_bytes: u64,
    /// `sha256:...` of the manifest (what runtimes call the image's digest).
    pub manifest_digest: String,
}

/// The executable `program` at `image_path` plus every shared library it needs at the path
/// the dynamic loader looks for it (as `ldd` resolves it on this machine) and the loader
/// itself; a static executable is just itself.
pub fn program_files(program: &Path, image_path: &str) -> Result<Vec<File>> {
    let mut files = vec![File { path: image_path.to_owned(), source: program.to_owned(), mode: 0o755 }];
    for lib in shared_libraries(program)? {
        let path = lib.to_string_lossy().into_owned();
        files.push(File { path, source: lib, mode: 0o755 });
    }
    Ok(files)
}

/// Shared libraries and the loader of a dynamic executable (empty for a static one).
pub fn shared_libraries(program: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(program).output().context("running ldd (Debian package libc-bin)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // "not a dynamic executable": nothing to add.
        if text.contains("not a dynamic executable") || String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable") {
            return Ok(Vec::new());
        }
        bail!("ldd {} failed: {}", program.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    parse_ldd(&text)
}

/// Paths from `ldd` output: `name => /path (addr)` lines and the loader's `/path (addr)`;
/// the vDSO (no path) is the kernel's. A library `ldd` cannot find is an error.
pub fn parse_ldd(text: &str) -> Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.contains("statically linked") {
            return Ok(Vec::new());
        }
        let path = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    bail!("ldd: {} not found on this machine", name.trim());
                }
                rest.split_whitespace().next().unwrap_or("")
            }
            None => line.split_whitespace().next().unwrap_or(""),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

fn sha256_hex(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn descriptor(media_type: MediaType, bytes: &[u8]) -> Result<(Descriptor, String)> {
    let hex = sha256_hex(bytes);
    let digest: Digest = hex.parse::<Sha256Digest>()?.into();
    let desc = DescriptorBuilder::default().media_type(media_type).digest(digest).size(bytes.len() as u64).build()?;
    Ok((desc, hex))
}

/// The layer: every file (and its parent directories) as root-owned entries with a fixed
/// time, so the same inputs give the same digest.
fn layer_tar(spec: &ImageSpec) -> Result<Vec<u8>> {
    let mut dirs: BTreeMap<String, ()> = BTreeMap::new();
    let mut add_parents = |path: &str| {
        let mut p = Path::new(path.trim_start_matches('/'));
        while let Some(parent) = p.parent() {
            if parent.as_os_str().is_empty() {
                break;
            }
            dirs.insert(parent.to_string_lossy().into_owned(), ());
            p = parent;
        }
    };
    for f in &spec.files {
        add_parents(&f.path);
    }
    for d in &spec.dirs {
        add_parents(&format!("{}/x", d.trim_end_matches('/')));
    }
    let mut b = tar::Builder::new(Vec::new());
    b.mode(tar::HeaderMode::Deterministic);
    for dir in dirs.keys() {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        h.set_mtime(0);
        b.append_data(&mut h, format!("{dir}/"), std::io::empty())?;
    }
    let mut seen = HashMap::new();
    for f in &spec.files {
        let rel = f.path.trim_start_matches('/').to_owned();
        if seen.insert(rel.clone(), ()).is_some() {
            continue;
        }
        let bytes = std::fs::read(&f.source).with_context(|| format!("reading {}", f.source.display()))?;
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(f.mode);
        h.set_size(bytes.len() as u64);
        h.set_mtime(0);
        b.append_data(&mut h, &rel, bytes.as_slice())?;
    }
    Ok(b.into_inner()?)
}

/// Writes `spec` as an OCI archive (an OCI image layout in a tar) at `out`.
pub fn write_archive(spec: &ImageSpec, out: &Path) -> Result<Written> {
    let layer = layer_tar(spec)?;
    let diff_id = format!("sha256:{}", sha256_hex(&layer));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&layer)?;
    let layer_gz = gz.finish()?;
    let (layer_desc, layer_hex) = descriptor(MediaType::ImageLayerGzip, &layer_gz)?;

    let mut config = ConfigBuilder::default().entrypoint(spec.entrypoint.clone());
    if !spec.cmd.is_empty() {
        config = config.cmd(spec.cmd.clone());
    }
    if !spec.env.is_empty() {
        config = config.env(spec.env.clone());
    }
    let image_config = ImageConfigurationBuilder::default()
        .architecture(Arch::Amd64)
        .os(Os::Linux)
        .config(config.build()?)
        .rootfs(RootFsBuilder::default().typ("layers").diff_ids(vec![diff_id]).build()?)
        .build()?;
    let config_json = image_config.to_string()?.into_bytes();
    let (config_desc, config_hex) = descriptor(MediaType::ImageConfig, &config_json)?;

    let manifest =
        ImageManifestBuilder::default().schema_version(2u32).media_type(MediaType::ImageManifest).config(config_desc).layers(vec![layer_desc]).build()?;
    let manifest_json = manifest.to_string()?.into_bytes();
    let (mut manifest_desc, manifest_hex) = descriptor(MediaType::ImageManifest, &manifest_json)?;
    // containerd's importer names the image from io.containerd.image.name; podman reads the
    // same annotation first (then the OCI ref name, which alone would be a bare tag).
    let tag = spec.name.rsplit_once(':').map(|(_, t)| t).filter(|t| !t.contains('/')).unwrap_or("latest");
    manifest_desc.set_annotations(Some(HashMap::from([
        ("io.containerd.image.name".to_owned(), spec.name.clone()),
        ("org.opencontainers.image.ref.name".to_owned(), tag.to_owned()),
    ])));
    let index = ImageIndexBuilder::default().schema_version(2u32).media_type(MediaType::ImageIndex).manifests(vec![manifest_desc]).build()?;
    let index_json = index.to_string()?.into_bytes();
    let layout = serde_json::to_vec(&OciLayoutBuilder::default().image_layout_version("1.0.0").build()?)?;

    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = out.with_extension("tmp");
    let mut ar = tar::Builder::new(std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?);
    let mut put = |name: &str, bytes: &[u8]| -> Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(bytes.len() as u64);
        h.set_mtime(0);
        ar.append_data(&mut h, name, bytes)?;
        Ok(())
    };
    put("oci-layout", &layout)?;
    put("index.json", &index_json)?;
    put(&format!("blobs/sha256/{manifest_hex}"), &manifest_json)?;
    put(&format!("blobs/sha256/{config_hex}"), &config_json)?;
    put(&format!("blobs/sha256/{layer_hex}"), &layer_gz)?;
    ar.into_inner()?.sync_all()?;
    std::fs::rename(&tmp, out)?;
    Ok(Written {
        archive: out.to_owned(),
        archive_bytes: std::fs::metadata(out)?.len(),
        layer_bytes: layer.len() as u64,
        manifest_digest: format!("sha256:{manifest_hex}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_lines() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd5a3f2000)\n\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f0a)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0b)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f0c)\n";
        let libs = parse_ldd(text).unwrap();
        assert_eq!(libs, ["/lib/x86_64-linux-gnu/libgcc_s.so.1", "/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2"].map(PathBuf::from));
        assert!(parse_ldd("\tstatically linked\n").unwrap().is_empty());
        assert!(parse_ldd("\tlibfoo.so.1 => not found\n").is_err());
    }

    #[test]
    fn archive_has_layout_and_names() {
        let dir = std::env::temp_dir().join(format!("oci-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let prog = dir.join("prog");
        std::fs::write(&prog, b"#!not really\n").unwrap();
        let spec = ImageSpec {
            name: "docker.io/library/t:dev".into(),
            files: vec![File { path: "/prog".into(), source: prog, mode: 0o755 }],
            entrypoint: vec!["/prog".into()],
            dirs: vec!["/tmp".into()],
            ..Default::default()
        };
        let w = write_archive(&spec, &dir.join("t.tar")).unwrap();
        let mut ar = tar::Archive::new(std::fs::File::open(&w.archive).unwrap());
        let mut names = Vec::new();
        let mut index = String::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            if name == "index.json" {
                std::io::Read::read_to_string(&mut e, &mut index).unwrap();
            }
            names.push(name);
        }
        assert_eq!(names.len(), 5, "{names:?}");
        assert!(names.contains(&"oci-layout".to_owned()));
        let index: serde_json::Value = serde_json::from_str(&index).unwrap();
        let m = &index["manifests"][0];
        assert_eq!(m["annotations"]["io.containerd.image.name"], "docker.io/library/t:dev");
        assert_eq!(m["annotations"]["org.opencontainers.image.ref.name"], "dev");
        assert_eq!(format!("{}", m["digest"].as_str().unwrap()), w.manifest_digest);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
