//! Container runtimes for the container tests: podman (with runc and the cgroupfs manager: no
//! systemd here, mixed cgroup v1 + v2) configured by a containers.conf this harness writes,
//! images FROM scratch loaded from OCI archives, and the agent's pod spec turned into podman
//! flags from the rendered DaemonSet (never a hand-kept copy).
use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{oci, tools};

/// The agent's image (`cargo xtask image`, made by `cargo xtask test` before the suites).
pub fn agent_image() -> Result<PathBuf> {
    let p = std::env::var_os("ZEROTRACE_IMAGE").map(PathBuf::from).unwrap_or_else(|| tools::root().join("target/image/zerotrace.oci.tar"));
    if !p.exists() {
        bail!("{} not found (ZEROTRACE_IMAGE); run the suite with `cargo xtask test`, which builds the image", p.display());
    }
    Ok(p)
}

/// The rendered manifests of one kustomization (`base` or an overlay's name), as JSON.
pub fn manifests(name: &str) -> Result<Vec<Value>> {
    let dir = std::env::var_os("ZEROTRACE_MANIFESTS").map(PathBuf::from).unwrap_or_else(|| tools::root().join("target/manifests"));
    let path = dir.join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {} (ZEROTRACE_MANIFESTS); run the suite with `cargo xtask test`, which renders them", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

/// The DaemonSet of a rendered kustomization and the ConfigMaps beside it.
pub fn daemonset(docs: &[Value]) -> Result<&Value> {
    docs.iter().find(|d| d["kind"] == "DaemonSet").context("no DaemonSet in the rendered manifests")
}

fn need(cmd: &str, package: &str) -> Result<()> {
    let found = Command::new("sh").arg("-c").arg(format!("command -v {cmd} >/dev/null || test -x /usr/sbin/{cmd}")).status()?;
    if !found.success() {
        bail!("{cmd} is not installed: `cargo xtask setup` installs it (apt-get install {package})");
    }
    Ok(())
}

/// The containers.conf podman runs with here: runc (crun refuses mixed cgroups), cgroupfs
/// (no systemd), and ulimits root may set without CAP_SYS_RESOURCE.
fn containers_conf() -> Result<PathBuf> {
    static CONF: OnceLock<PathBuf> = OnceLock::new();
    if let Some(p) = CONF.get() {
        return Ok(p.clone());
    }
    need("podman", "podman")?;
    need("runc", "runc")?;
    let dir = tools::work_dir().join("containers");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("containers.conf");
    std::fs::write(
        &path,
        "[containers]\ndefault_ulimits = [\"nofile=20000:20000\", \"nproc=32768:32768\"]\nlog_driver = \"k8s-file\"\n\n[engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n",
    )?;
    Ok(CONF.get_or_init(|| path).clone())
}

/// `podman` with the harness's configuration.
pub fn podman() -> Result<Command> {
    let conf = containers_conf()?;
    let mut cmd = Command::new("podman");
    cmd.env("CONTAINERS_CONF", conf);
    Ok(cmd)
}

/// Runs podman with `args`; its stdout, or an error with its stderr.
pub fn podman_out(args: &[&str]) -> Result<String> {
    let out = podman()?.args(args).output().context("running podman")?;
    if !out.status.success() {
        bail!("podman {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Removes a container by name if it exists (a previous run killed before cleaning up).
pub fn podman_rm(name: &str) {
    if let Ok(mut c) = podman() {
        let _ = c.args(["rm", "-f", "-t", "0", name]).output();
    }
}

/// Loads an OCI archive into podman; returns the names podman reports.
pub fn podman_load(archive: &Path) -> Result<String> {
    podman_out(&["load", "-i", &archive.to_string_lossy()])
}

/// An image of one program (plus its shared libraries) FROM scratch, as an OCI archive:
/// (image name, archive).
pub fn program_archive(name: &str, program: &Path) -> Result<(String, PathBuf)> {
    let full = format!("docker.io/library/{name}:e2e");
    let spec = oci::ImageSpec {
        name: full.clone(),
        files: oci::program_files(program, &format!("/{name}"))?,
        entrypoint: vec![format!("/{name}")],
        dirs: vec!["/tmp".into()],
        ..Default::default()
    };
    let archive = tools::work_dir().join("containers").join(format!("{name}.oci.tar"));
    oci::write_archive(&spec, &archive)?;
    Ok((full, archive))
}

/// The same, loaded into podman. Returns the image name.
pub fn program_image(name: &str, program: &Path) -> Result<String> {
    let (full, archive) = program_archive(name, program)?;
    podman_load(&archive)?;
    Ok(full)
}

/// The full id of a container.
pub fn podman_id(name: &str) -> Result<String> {
    podman_out(&["inspect", "--format", "{{.Id}}", name])
}

/// The host pid of a container's first process.
pub fn podman_pid(name: &str) -> Result<u32> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let pid: u32 = podman_out(&["inspect", "--format", "{{.State.Pid}}", name])?.parse().unwrap_or(0);
        if pid != 0 {
            return Ok(pid);
        }
        if std::time::Instant::now() > deadline {
            bail!("container {name} has no pid after 20 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// How the agent's container runs, taken from the DaemonSet's pod spec.
#[derive(Debug, Default)]
pub struct PodRun {
    /// `podman run` flags (namespaces, capabilities, read-only root, seccomp, mounts, env).
    pub flags: Vec<String>,
    /// The container's arguments (after the image).
    pub args: Vec<String>,
    /// Capabilities the pod spec adds (without `CAP_`).
    pub caps: Vec<String>,
    pub grace_seconds: u64,
}

/// Turns the DaemonSet's pod spec into podman flags: hostPID, the capabilities (all dropped,
/// the listed ones added), the read-only root, the memory limit, the seccomp profile, every volume mount
/// (hostPath bind, emptyDir tmpfs, the ConfigMap's data as files), the environment (downward
/// API fields from `node`), and the arguments. `overrides` replace environment variables
/// (the collector endpoint: the test's receiver). The network: the host's, to reach the test's
/// receiver on 127.0.0.1 (a pod has its own network namespace; the agent needs none).
pub fn pod_run(docs: &[Value], node: &str, overrides: &[(&str, &str)]) -> Result<PodRun> {
    let ds = daemonset(docs)?;
    let pod = &ds["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let mut run = PodRun { grace_seconds: pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30), ..Default::default() };
    let f = &mut run.flags;
    f.push("--network=host".into());
    if pod["hostPID"] == true {
        f.push("--pid=host".into());
    }
    let sc = &c["securityContext"];
    if sc["privileged"] == true {
        f.push("--privileged".into());
    }
    if sc["readOnlyRootFilesystem"] == true {
        f.push("--read-only".into());
        // A pod's root is read-only, full stop: no tmpfs podman would add on its own.
        f.push("--read-only-tmpfs=false".into());
    }
    if sc["allowPrivilegeEscalation"] == false {
        f.push("--security-opt=no-new-privileges".into());
    }
    if let Some(uid) = sc["runAsUser"].as_u64() {
        f.push(format!("--user={uid}"));
    }
    for cap in sc["capabilities"]["drop"].as_array().into_iter().flatten() {
        f.push(format!("--cap-drop={}", cap.as_str().unwrap_or_default().to_ascii_lowercase()));
    }
    for cap in sc["capabilities"]["add"].as_array().into_iter().flatten() {
        let cap = cap.as_str().unwrap_or_default().to_owned();
        f.push(format!("--cap-add={cap}"));
        run.caps.push(cap);
    }
    // The memory limit (the agent's --memory-limit defaults to 80 % of it): Kubernetes'
    // binary suffixes are podman's units.
    if let Some(mem) = c["resources"]["limits"]["memory"].as_str() {
        let (num, unit) = mem.split_at(mem.find(|ch: char| !ch.is_ascii_digit()).unwrap_or(mem.len()));
        let unit = match unit {
            "" => "b",
            "Ki" => "k",
            "Mi" => "m",
            "Gi" => "g",
            other => anyhow::bail!("memory limit {mem:?}: unit {other:?} is not one podman takes"),
        };
        f.push(format!("--memory={num}{unit}"));
    }
    match sc["seccompProfile"]["type"].as_str() {
        Some("Unconfined") => f.push("--security-opt=seccomp=unconfined".into()),
        Some("Localhost") => {
            let name = sc["seccompProfile"]["localhostProfile"].as_str().unwrap_or_default();
            let path = tools::root().join("deploy/kubernetes/seccomp").join(Path::new(name).file_name().unwrap_or_default());
            f.push(format!("--security-opt=seccomp={}", path.display()));
        }
        // RuntimeDefault, or nothing: podman's own default profile.
        _ => {}
    }
    // Volumes by name, then the container's mounts of them.
    let volumes: Vec<&Value> = pod["volumes"].as_array().map(|v| v.iter().collect()).unwrap_or_default();
    for m in c["volumeMounts"].as_array().into_iter().flatten() {
        let name = m["name"].as_str().unwrap_or_default();
        let target = m["mountPath"].as_str().context("volumeMount without mountPath")?;
        let ro = if m["readOnly"] == true { ":ro" } else { "" };
        let v = volumes.iter().find(|v| v["name"] == name).with_context(|| format!("volume {name} is mounted but not declared"))?;
        if let Some(host) = v["hostPath"]["path"].as_str() {
            if v["hostPath"]["type"] == "DirectoryOrCreate" {
                std::fs::create_dir_all(host)?;
            }
            f.push(format!("--volume={host}:{target}{ro}"));
        } else if v.get("emptyDir").is_some() {
            f.push(format!("--tmpfs={target}:rw,size=16m,mode=0755"));
        } else if let Some(cm) = v["configMap"]["name"].as_str() {
            let data = docs.iter().find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == cm).map(|d| &d["data"]);
            let dir = tools::work_dir().join("containers").join(format!("configmap-{cm}"));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir)?;
            match data.and_then(Value::as_object) {
                Some(files) => {
                    for (file, content) in files {
                        std::fs::write(dir.join(file), content.as_str().unwrap_or_default())?;
                    }
                }
                None if v["configMap"]["optional"] == true => {}
                None => bail!("ConfigMap {cm} is mounted but not in the manifests"),
            }
            f.push(format!("--volume={}:{target}{ro}", dir.display()));
        } else {
            bail!("volume {name}: only hostPath, emptyDir and configMap volumes are turned into podman mounts");
        }
    }
    // Environment, with $(VAR) references to earlier variables expanded as kubelet does.
    let mut env: Vec<(String, String)> = Vec::new();
    for e in c["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().unwrap_or_default().to_owned();
        let value = if let Some(v) = e["value"].as_str() {
            expand(v, &env)
        } else {
            match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("spec.nodeName") => node.to_owned(),
                Some("status.hostIP") | Some("status.podIP") => "127.0.0.1".to_owned(),
                other => bail!("env {name}: valueFrom {other:?} is not known to the harness"),
            }
        };
        env.push((name, value));
    }
    for (k, v) in overrides {
        env.retain(|(n, _)| n != k);
        env.push(((*k).to_owned(), (*v).to_owned()));
    }
    for (k, v) in env {
        f.push(format!("--env={k}={v}"));
    }
    run.args = c["args"].as_array().into_iter().flatten().map(|a| a.as_str().unwrap_or_default().to_owned()).collect();
    Ok(run)
}

fn expand(value: &str, env: &[(String, String)]) -> String {
    let mut out = value.to_owned();
    for (k, v) in env {
        out = out.replace(&format!("$({k})"), v);
    }
    out
}
