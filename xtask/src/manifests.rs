//! The Kubernetes manifests, checked offline: every kustomization under deploy/kubernetes
//! (the base and each overlay) is rendered with the pinned kubectl's kustomize and validated
//! against the OpenAPI schemas of a current Kubernetes release (kubernetes-validate,
//! strict: unknown fields fail). The rendered documents are kept, as YAML and JSON, under
//! target/manifests for the container tests, which derive their flags from them.
use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};

use crate::{
    setup,
    util::{output, root, run, step},
};

/// Renders and validates every kustomization; returns the directory of rendered manifests
/// (`NAME.yaml`, `NAME.json`: `base` for deploy/kubernetes, else the overlay's name).
pub fn check() -> Result<PathBuf> {
    let bin = setup::k8s_tools()?;
    step(format!("Kubernetes manifests: kustomize renders deploy/kubernetes and its overlays; validated against Kubernetes {}", setup::K8S_SCHEMA_VERSION));
    let deploy = root().join("deploy/kubernetes");
    let mut dirs = vec![("base".to_owned(), deploy.clone())];
    let mut overlays: Vec<_> = std::fs::read_dir(deploy.join("overlays"))?.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    overlays.sort();
    for o in overlays {
        dirs.push((o.file_name().unwrap().to_string_lossy().into_owned(), o));
    }
    let out = root().join("target/manifests");
    std::fs::create_dir_all(&out)?;
    let readme = std::fs::read_to_string(root().join("deploy/README.md")).context("reading deploy/README.md")?;
    for (name, dir) in &dirs {
        let yaml = output(Command::new(bin.join("kubectl")).arg("kustomize").arg(dir)).with_context(|| format!("kubectl kustomize {}", dir.display()))?;
        let yaml_path = out.join(format!("{name}.yaml"));
        std::fs::write(&yaml_path, &yaml)?;
        run(Command::new(bin.join("kubernetes-validate")).args(["--strict", "--quiet", "-k", setup::K8S_SCHEMA_VERSION]).arg(&yaml_path))
            .with_context(|| format!("the manifests of {} do not validate", dir.display()))?;
        let json = output(
            Command::new(bin.join("python"))
                .args(["-c", "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)"])
                .stdin(std::fs::File::open(&yaml_path)?),
        )?;
        let docs: serde_json::Value = serde_json::from_str(&json)?;
        check_daemonset(name, &docs, &readme)?;
        std::fs::write(out.join(format!("{name}.json")), json)?;
        println!("  {name}: {} documents, valid", docs.as_array().map_or(0, Vec::len));
    }
    Ok(out)
}

/// What the schemas cannot say: the agent's pod is not privileged, shares the host's PID
/// namespace, runs from a read-only root, drops every capability but the ones it lists, and
/// each of those is justified in deploy/README.md.
fn check_daemonset(name: &str, docs: &serde_json::Value, readme: &str) -> Result<()> {
    let ds = docs.as_array().and_then(|d| d.iter().find(|d| d["kind"] == "DaemonSet")).with_context(|| format!("{name}: no DaemonSet"))?;
    let pod = &ds["spec"]["template"]["spec"];
    if pod["hostPID"] != true {
        bail!("{name}: the DaemonSet's pod must have hostPID: true");
    }
    for c in pod["containers"].as_array().into_iter().flatten() {
        let sc = &c["securityContext"];
        if sc["privileged"] == true {
            bail!("{name}: container {} is privileged; list capabilities instead", c["name"]);
        }
        if sc["readOnlyRootFilesystem"] != true {
            bail!("{name}: container {} must have a read-only root filesystem", c["name"]);
        }
        if sc["capabilities"]["drop"] != serde_json::json!(["ALL"]) {
            bail!("{name}: container {} must drop ALL capabilities before adding its own", c["name"]);
        }
        for cap in sc["capabilities"]["add"].as_array().into_iter().flatten() {
            let cap = cap.as_str().unwrap_or_default();
            if !readme.contains(&format!("| `CAP_{cap}` |")) {
                bail!("{name}: capability {cap} has no row in deploy/README.md's capability table (`| `CAP_{cap}` | ...`)");
            }
        }
    }
    Ok(())
}
