//! containerd with its CRI plugin, started by a test with a configuration this harness writes
//! (its own root, state and socket; the pause image a local one built FROM scratch), images
//! imported from OCI archives, and pods made through CRI the way kubelet makes them: kubelet's
//! `io.kubernetes.*` labels, its cgroup parents (`/kubepods/besteffort/pod<uid>`), the pod's
//! labels and annotations on the sandbox.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::{oci, proc::Proc, tools};

#[allow(clippy::all, dead_code)]
pub mod api {
    tonic::include_proto!("runtime.v1");
}

use api::runtime_service_client::RuntimeServiceClient;

/// The runtime's socket, state and root: separate from any containerd the machine runs.
pub const SOCKET: &str = "/run/zerotrace-e2e/containerd/containerd.sock";
const STATE: &str = "/run/zerotrace-e2e/containerd/state";
pub const PAUSE_IMAGE: &str = "docker.io/library/zt-pause:e2e";

pub struct Containerd {
    pub proc: Proc,
    rt: tokio::runtime::Runtime,
    client: RuntimeServiceClient<tonic::transport::Channel>,
    pods: Vec<String>,
}

fn need(cmd: &str) -> Result<()> {
    if !Command::new("sh").arg("-c").arg(format!("command -v {cmd} >/dev/null")).status()?.success() {
        bail!("{cmd} is not installed: `cargo xtask setup` installs it (apt-get install containerd runc)");
    }
    Ok(())
}

/// The pause program (tests/e2e/c/pause.c), static, as an image.
fn pause_archive() -> Result<PathBuf> {
    let dir = tools::work_dir().join("containers");
    std::fs::create_dir_all(&dir)?;
    let bin = dir.join("pause");
    let src = tools::root().join("tests/e2e/c/pause.c");
    let st = Command::new("cc").args(["-static", "-O2", "-o"]).arg(&bin).arg(&src).status().context("running cc (Debian package gcc)")?;
    if !st.success() {
        bail!("cc -static {} failed (static libc: Debian package libc6-dev)", src.display());
    }
    let spec = oci::ImageSpec {
        name: PAUSE_IMAGE.into(),
        files: vec![oci::File { path: "/pause".into(), source: bin, mode: 0o755 }],
        entrypoint: vec!["/pause".into()],
        ..Default::default()
    };
    let archive = dir.join("zt-pause.oci.tar");
    oci::write_archive(&spec, &archive)?;
    Ok(archive)
}

impl Containerd {
    /// Starts containerd and waits until its CRI service answers.
    pub fn start() -> Result<Containerd> {
        need("containerd")?;
        need("runc")?;
        need("ctr")?;
        let dir = tools::work_dir().join("containerd");
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("config.toml");
        // restrict_oom_score_adj: root here lacks CAP_SYS_RESOURCE. The pods use the host's
        // network, so no CNI configuration is needed.
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{STATE}\"\n[grpc]\n  address = \"{SOCKET}\"\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"{PAUSE_IMAGE}\"\n  restrict_oom_score_adj = true\n  [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n    runtime_type = \"io.containerd.runc.v2\"\n",
                root = dir.join("root").display()
            ),
        )?;
        let _ = std::fs::remove_file(SOCKET);
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(&config);
        let proc = Proc::spawn("containerd", cmd)?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let client = loop {
            if Path::new(SOCKET).exists()
                && let Ok(mut c) = rt.block_on(connect(SOCKET))
                && rt.block_on(c.version(api::VersionRequest::default())).is_ok()
            {
                break c;
            }
            if std::time::Instant::now() > deadline {
                bail!("containerd's CRI did not answer within 30 s; its log:\n{}", proc.stderr_text());
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let c = Containerd { proc, rt, client, pods: Vec::new() };
        c.import(&pause_archive()?)?;
        Ok(c)
    }

    /// `ctr -n k8s.io images import`: what an operator does on a node without a registry.
    pub fn import(&self, archive: &Path) -> Result<String> {
        let out = Command::new("ctr").args(["--address", SOCKET, "-n", "k8s.io", "images", "import"]).arg(archive).output()?;
        if !out.status.success() {
            bail!("ctr images import {} failed: {}", archive.display(), String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A pod as kubelet makes it (host network, BestEffort cgroup parent) with one container
    /// running `image` with `args` as `uid`; returns (container id, its host pid).
    pub fn run_pod(&mut self, pod: &Pod, container: &str, image: &str, args: &[String], uid: i64) -> Result<(String, u32)> {
        let kubelet_labels = |c: Option<&str>| {
            let mut l: HashMap<String, String> = [
                ("io.kubernetes.pod.name", pod.name.as_str()),
                ("io.kubernetes.pod.namespace", pod.namespace.as_str()),
                ("io.kubernetes.pod.uid", pod.uid.as_str()),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
            if let Some(c) = c {
                l.insert("io.kubernetes.container.name".into(), c.into());
            }
            l
        };
        let mut sandbox_labels = kubelet_labels(None);
        sandbox_labels.extend(pod.labels.clone());
        let sandbox = api::PodSandboxConfig {
            metadata: Some(api::PodSandboxMetadata { name: pod.name.clone(), uid: pod.uid.clone(), namespace: pod.namespace.clone(), attempt: 0 }),
            // The host's network: its hostname must stay unset.
            hostname: String::new(),
            labels: sandbox_labels,
            annotations: pod.annotations.clone(),
            linux: Some(api::LinuxPodSandboxConfig {
                cgroup_parent: format!("/kubepods/besteffort/pod{}", pod.uid),
                security_context: Some(api::LinuxSandboxSecurityContext {
                    namespace_options: Some(api::NamespaceOption { network: api::NamespaceMode::Node as i32, ..Default::default() }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let c = &mut self.client;
        let sandbox_id = self
            .rt
            .block_on(c.run_pod_sandbox(api::RunPodSandboxRequest { config: Some(sandbox.clone()), runtime_handler: String::new() }))
            .context("RunPodSandbox")?
            .into_inner()
            .pod_sandbox_id;
        self.pods.push(sandbox_id.clone());
        let config = api::ContainerConfig {
            metadata: Some(api::ContainerMetadata { name: container.into(), attempt: 0 }),
            image: Some(api::ImageSpec { image: image.into(), ..Default::default() }),
            args: args.to_vec(),
            labels: kubelet_labels(Some(container)),
            linux: Some(api::LinuxContainerConfig {
                security_context: Some(api::LinuxContainerSecurityContext {
                    run_as_user: Some(api::Int64Value { value: uid }),
                    readonly_rootfs: true,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let id = self
            .rt
            .block_on(c.create_container(api::CreateContainerRequest { pod_sandbox_id: sandbox_id, config: Some(config), sandbox_config: Some(sandbox) }))
            .context("CreateContainer")?
            .into_inner()
            .container_id;
        self.rt.block_on(c.start_container(api::StartContainerRequest { container_id: id.clone() })).context("StartContainer")?;
        let status = self
            .rt
            .block_on(c.container_status(api::ContainerStatusRequest { container_id: id.clone(), verbose: true }))
            .context("ContainerStatus")?
            .into_inner();
        let info: serde_json::Value = serde_json::from_str(status.info.get("info").map(String::as_str).unwrap_or("{}"))?;
        let pid = info["pid"].as_u64().with_context(|| format!("no pid in the container's status: {info}"))? as u32;
        Ok((id, pid))
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Pods first (their shims and processes), then containerd itself.
        for id in std::mem::take(&mut self.pods) {
            let c = &mut self.client;
            let _ = self.rt.block_on(c.stop_pod_sandbox(api::StopPodSandboxRequest { pod_sandbox_id: id.clone() }));
            let _ = self.rt.block_on(c.remove_pod_sandbox(api::RemovePodSandboxRequest { pod_sandbox_id: id }));
        }
        self.proc.signal(libc::SIGTERM);
        let _ = self.proc.wait_timeout(Duration::from_secs(10));
    }
}

/// A pod's identity and its own labels and annotations.
#[derive(Clone, Debug, Default)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub labels: HashMap<String, String>,
    pub annotations: HashMap<String, String>,
}

async fn connect(socket: &str) -> Result<RuntimeServiceClient<tonic::transport::Channel>> {
    let path = socket.to_owned();
    let channel = tonic::transport::Endpoint::from_static("http://cri.invalid")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let p = path.clone();
            async move { tokio::net::UnixStream::connect(p).await.map(hyper_util::rt::TokioIo::new) }
        }))
        .await?;
    Ok(RuntimeServiceClient::new(channel))
}
