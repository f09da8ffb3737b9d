//! Which pod a container belongs to, from the node's container runtime over its CRI socket
//! (containerd, CRI-O): `k8s.pod.name`, `k8s.namespace.name`, `k8s.container.name`,
//! `k8s.pod.uid`, the workload's name where the pod's own labels name it, and `service.*`
//! by the OpenTelemetry semantic conventions' rules for Kubernetes (v1.44, "Specify
//! resource attributes using Kubernetes annotations"). One thread owns the gRPC client; callers
//! wait at most LOOKUP_TIMEOUT for an answer, and after a runtime was slow to answer one
//! nobody waits for QUIET_AFTER_TIMEOUT (those containers are named by id only). Answers are
//! cached per container id (and pods per sandbox id), a bounded number of each: a container
//! that starts has a new id, so it is looked up afresh.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, OnceLock, mpsc},
    time::{Duration, Instant},
};

#[allow(clippy::all, dead_code)]
mod cri {
    tonic::include_proto!("runtime.v1");
}

/// Sockets tried, in order, when none is given (containerd, k3s's containerd, CRI-O).
pub const DEFAULT_SOCKETS: &[&str] =
    &["/run/containerd/containerd.sock", "/run/k3s/containerd/containerd.sock", "/run/crio/crio.sock", "/var/run/crio/crio.sock"];
/// How long a lookup may hold up whoever asks (the first process of a new container).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
/// After a lookup that took half of LOOKUP_TIMEOUT or more (answered or not), lookups
/// return nothing at once for this long: a hung runtime holds up the agent's loop for at
/// most LOOKUP_TIMEOUT per this period.
const QUIET_AFTER_TIMEOUT: Duration = Duration::from_secs(30);
/// Containers (and pods) remembered.
const CACHE_BOUND: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("--cri-socket {0}: no such socket")]
    NoSocket(PathBuf),
}

/// A container of a pod, as the runtime names it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodContainer {
    pub pod_name: String,
    pub namespace: String,
    pub pod_uid: String,
    pub container_name: String,
    pub pod_labels: HashMap<String, String>,
    pub pod_annotations: HashMap<String, String>,
}

impl PodContainer {
    /// The owning workload (kind attribute, name), from what the controllers put on their
    /// pods: ReplicaSets of Deployments (`pod-template-hash`), StatefulSets
    /// (`statefulset.kubernetes.io/pod-name`), DaemonSets (`pod-template-generation`), Jobs
    /// (`batch.kubernetes.io/job-name`, `job-name`) and their CronJobs (a job named
    /// `<cronjob>-<scheduled minute>`). No API server is asked.
    pub fn workloads(&self) -> Vec<(&'static str, String)> {
        let l = &self.pod_labels;
        let mut out = Vec::new();
        // Pod names of controllers end in "-" and a 5-character random suffix.
        let without_suffix = |name: &str| name.rsplit_once('-').map(|(base, _)| base.to_owned());
        if let Some(hash) = l.get("pod-template-hash") {
            if let Some(rs) = without_suffix(&self.pod_name) {
                if let Some(deploy) = rs.strip_suffix(&format!("-{hash}")) {
                    out.push(("k8s.deployment.name", deploy.to_owned()));
                }
                out.push(("k8s.replicaset.name", rs));
            }
        } else if l.contains_key("statefulset.kubernetes.io/pod-name") {
            if let Some((sts, ordinal)) = self.pod_name.rsplit_once('-')
                && ordinal.bytes().all(|b| b.is_ascii_digit())
            {
                out.push(("k8s.statefulset.name", sts.to_owned()));
            }
        } else if l.contains_key("pod-template-generation") {
            if let Some(ds) = without_suffix(&self.pod_name) {
                out.push(("k8s.daemonset.name", ds));
            }
        } else if let Some(job) = l.get("batch.kubernetes.io/job-name").or_else(|| l.get("job-name")) {
            if let Some((cron, minute)) = job.rsplit_once('-')
                && minute.len() >= 8
                && minute.bytes().all(|b| b.is_ascii_digit())
            {
                out.push(("k8s.cronjob.name", cron.to_owned()));
            }
            out.push(("k8s.job.name", job.clone()));
        }
        out
    }

    /// `service.name`, `service.namespace`, `service.instance.id` (and `service.version`
    /// when an annotation or label says), by the semantic conventions' order: the pod's
    /// `resource.opentelemetry.io/*` annotations, the well-known `app.kubernetes.io/*` labels
    /// (opt-in, as the conventions ask: users may not know their labels are used), the
    /// workload, the pod, the container.
    pub fn service(&self, well_known_labels: bool) -> Vec<(&'static str, String)> {
        let ann = |k: &str| self.pod_annotations.get(&format!("resource.opentelemetry.io/{k}")).filter(|v| !v.is_empty()).cloned();
        let label = |k: &str| if well_known_labels { self.pod_labels.get(k).filter(|v| !v.is_empty()).cloned() } else { None };
        let workloads = self.workloads();
        let workload = |kind: &str| workloads.iter().find(|(k, _)| *k == kind).map(|(_, v)| v.clone());
        let name = ann("service.name")
            .or_else(|| label("app.kubernetes.io/instance"))
            .or_else(|| label("app.kubernetes.io/name"))
            .or_else(|| workload("k8s.deployment.name"))
            .or_else(|| workload("k8s.replicaset.name"))
            .or_else(|| workload("k8s.statefulset.name"))
            .or_else(|| workload("k8s.daemonset.name"))
            .or_else(|| workload("k8s.cronjob.name"))
            .or_else(|| workload("k8s.job.name"))
            .or_else(|| Some(self.pod_name.clone()).filter(|n| !n.is_empty()))
            .unwrap_or_else(|| self.container_name.clone());
        let mut out = vec![
            ("service.name", name),
            ("service.namespace", ann("service.namespace").unwrap_or_else(|| self.namespace.clone())),
            ("service.instance.id", ann("service.instance.id").unwrap_or_else(|| format!("{}.{}.{}", self.namespace, self.pod_name, self.container_name))),
        ];
        if let Some(v) = ann("service.version").or_else(|| label("app.kubernetes.io/version")) {
            out.push(("service.version", v));
        }
        out
    }

    /// Resource attributes naming the pod (service.* aside).
    pub fn attributes(&self) -> Vec<(&'static str, String)> {
        let mut out = vec![
            ("k8s.namespace.name", self.namespace.clone()),
            ("k8s.pod.name", self.pod_name.clone()),
            ("k8s.pod.uid", self.pod_uid.clone()),
            ("k8s.container.name", self.container_name.clone()),
        ];
        out.retain(|(_, v)| !v.is_empty());
        out.extend(self.workloads());
        out
    }
}

type Reply = mpsc::SyncSender<Option<Arc<PodContainer>>>;

/// The CRI client and its caches.
pub struct Cri {
    socket: PathBuf,
    requests: Mutex<mpsc::SyncSender<(String, Reply)>>,
    containers: Mutex<HashMap<String, Option<Arc<PodContainer>>>>,
    /// Until when lookups are not asked (the runtime was slow to answer the last one).
    quiet_until: Mutex<Option<Instant>>,
    /// `app.kubernetes.io/*` labels count for service.name (`--k8s-well-known-labels`).
    pub well_known_labels: bool,
}

static CRI: OnceLock<Option<Cri>> = OnceLock::new();

/// Picks the CRI socket (`auto`: the first of DEFAULT_SOCKETS that exists; `off`: none) and
/// starts the client's thread. Once per process; later calls change nothing.
pub fn init(socket: &str, well_known_labels: bool) -> Result<(), CriError> {
    let path = match socket {
        "off" => None,
        "auto" => DEFAULT_SOCKETS.iter().map(PathBuf::from).find(|p| p.exists()),
        p if Path::new(p).exists() => Some(PathBuf::from(p)),
        p => return Err(CriError::NoSocket(p.into())),
    };
    let cri = path.map(|p| Cri::start(p, well_known_labels));
    match &cri {
        Some(c) => tracing::info!(socket = %c.socket.display(), "pod and container names from the container runtime (CRI)"),
        None if socket == "auto" => tracing::debug!("no CRI socket found: spans name containers by id only"),
        None => {}
    }
    let _ = CRI.set(cri);
    Ok(())
}

/// The pod container with this id (None: no CRI, not a CRI container, or no answer in time).
pub fn lookup(container_id: &str) -> Option<(Arc<PodContainer>, bool)> {
    let cri = CRI.get()?.as_ref()?;
    cri.get(container_id).map(|p| (p, cri.well_known_labels))
}

impl Cri {
    fn start(socket: PathBuf, well_known_labels: bool) -> Cri {
        let (tx, rx) = mpsc::sync_channel::<(String, Reply)>(64);
        let path = socket.clone();
        let spawned = std::thread::Builder::new().name("cri".into()).spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(serve(path, rx));
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the CRI client thread: no pod names");
        }
        Cri { socket, requests: Mutex::new(tx), containers: Mutex::new(HashMap::new()), quiet_until: Mutex::new(None), well_known_labels }
    }

    fn get(&self, id: &str) -> Option<Arc<PodContainer>> {
        if let Some(hit) = self.containers.lock().unwrap_or_else(|e| e.into_inner()).get(id) {
            return hit.clone();
        }
        let mut quiet = self.quiet_until.lock().unwrap_or_else(|e| e.into_inner());
        if quiet.is_some_and(|until| Instant::now() < until) {
            return None;
        }
        let (reply_tx, reply_rx) = mpsc::sync_channel(1);
        self.requests.lock().unwrap_or_else(|e| e.into_inner()).try_send((id.to_owned(), reply_tx)).ok()?;
        let asked = Instant::now();
        let reply = reply_rx.recv_timeout(LOOKUP_TIMEOUT);
        if asked.elapsed() >= LOOKUP_TIMEOUT / 2 {
            // Hung or slow (no answer in time, or the client thread gave up on it, or a
            // connection that took that long): nobody waits for a while.
            // At most once per quiet period (a lookup during one returned above).
            tracing::warn!(socket = %self.socket.display(), timeout = ?LOOKUP_TIMEOUT, quiet = ?QUIET_AFTER_TIMEOUT, "the container runtime is slow to answer CRI lookups: containers starting in the quiet period are named by id only");
            *quiet = Some(Instant::now() + QUIET_AFTER_TIMEOUT);
        }
        drop(quiet);
        // No answer: not cached, so the next process of that container asks again.
        let answer = reply.ok()?;
        let mut cache = self.containers.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_BOUND {
            cache.clear();
        }
        cache.insert(id.to_owned(), answer.clone());
        answer
    }
}

/// A pod sandbox's labels and annotations, by sandbox id.
type Sandboxes = HashMap<String, (HashMap<String, String>, HashMap<String, String>)>;

/// The client thread: connects (again after a failure), answers lookups one at a time.
async fn serve(socket: PathBuf, rx: mpsc::Receiver<(String, Reply)>) {
    let mut client: Option<cri::runtime_service_client::RuntimeServiceClient<tonic::transport::Channel>> = None;
    let mut pods: Sandboxes = HashMap::new();
    let mut warned = false;
    while let Ok((id, reply)) = rx.recv() {
        if client.is_none() {
            match connect(&socket).await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    if !warned {
                        tracing::warn!(socket = %socket.display(), error = %e, "cannot reach the container runtime's CRI socket: no pod names");
                        warned = true;
                    }
                    let _ = reply.send(None);
                    continue;
                }
            }
        }
        let c = client.as_mut().expect("connected above");
        match tokio::time::timeout(LOOKUP_TIMEOUT, query(c, &mut pods, &id)).await {
            Ok(Ok(found)) => {
                let _ = reply.send(found.map(Arc::new));
            }
            Ok(Err(e)) => {
                tracing::debug!(container = %id, error = %e, "CRI lookup failed");
                if e.code() == tonic::Code::Unavailable {
                    client = None;
                }
                let _ = reply.send(None);
            }
            Err(_) => {
                client = None;
            }
        }
    }
}

async fn connect(socket: &Path) -> Result<cri::runtime_service_client::RuntimeServiceClient<tonic::transport::Channel>, tonic::transport::Error> {
    let path = socket.to_owned();
    // The URI is not used: every connection goes to the unix socket.
    let channel = tonic::transport::Endpoint::from_static("http://cri.invalid")
        .connect_timeout(LOOKUP_TIMEOUT)
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let p = path.clone();
            async move { tokio::net::UnixStream::connect(p).await.map(hyper_util::rt::TokioIo::new) }
        }))
        .await?;
    Ok(cri::runtime_service_client::RuntimeServiceClient::new(channel))
}

/// The container (ListContainers by id: its sandbox, names, labels) and its pod (its
/// sandbox's labels and annotations: kubelet puts the pod's own there).
async fn query(
    c: &mut cri::runtime_service_client::RuntimeServiceClient<tonic::transport::Channel>,
    pods: &mut Sandboxes,
    id: &str,
) -> Result<Option<PodContainer>, tonic::Status> {
    let filter = cri::ContainerFilter { id: id.to_owned(), ..Default::default() };
    let list = c.list_containers(cri::ListContainersRequest { filter: Some(filter) }).await?.into_inner();
    let Some(ctr) = list.containers.into_iter().find(|k| k.id == id) else { return Ok(None) };
    let sandbox = ctr.pod_sandbox_id.clone();
    if !pods.contains_key(&sandbox) {
        let st = c.pod_sandbox_status(cri::PodSandboxStatusRequest { pod_sandbox_id: sandbox.clone(), verbose: false }).await?.into_inner();
        let (labels, annotations) = st.status.map(|s| (s.labels, s.annotations)).unwrap_or_default();
        if pods.len() >= CACHE_BOUND {
            pods.clear();
        }
        pods.insert(sandbox.clone(), (labels, annotations));
    }
    let (pod_labels, pod_annotations) = pods.get(&sandbox).cloned().unwrap_or_default();
    Ok(Some(from_labels(&ctr.labels, ctr.metadata.map(|m| m.name), pod_labels, pod_annotations)))
}

/// A container's names from kubelet's labels (`io.kubernetes.*`), which every CRI runtime keeps.
fn from_labels(
    labels: &HashMap<String, String>,
    meta_name: Option<String>,
    mut pod_labels: HashMap<String, String>,
    pod_annotations: HashMap<String, String>,
) -> PodContainer {
    let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
    // kubelet's own labels on the sandbox are not the pod's.
    pod_labels.retain(|k, _| !k.starts_with("io.kubernetes."));
    PodContainer {
        pod_name: get("io.kubernetes.pod.name"),
        namespace: get("io.kubernetes.pod.namespace"),
        pod_uid: get("io.kubernetes.pod.uid"),
        container_name: labels.get("io.kubernetes.container.name").cloned().or(meta_name).unwrap_or_default(),
        pod_labels,
        pod_annotations,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> PodContainer {
        PodContainer {
            pod_name: name.into(),
            namespace: "shop".into(),
            pod_uid: "5f1c2a9e-7b3d-4e8f-9a0b-1c2d3e4f5a6b".into(),
            container_name: "app".into(),
            pod_labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            pod_annotations: annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    fn service(p: &PodContainer, wk: bool) -> HashMap<&'static str, String> {
        p.service(wk).into_iter().collect()
    }

    #[test]
    fn workloads_from_controller_labels() {
        let d = pod("checkout-7d4b9c8f6d-x2k9q", &[("pod-template-hash", "7d4b9c8f6d")], &[]);
        assert_eq!(d.workloads(), vec![("k8s.deployment.name", "checkout".into()), ("k8s.replicaset.name", "checkout-7d4b9c8f6d".into())]);
        let s = pod("db-2", &[("statefulset.kubernetes.io/pod-name", "db-2"), ("controller-revision-hash", "db-5c9")], &[]);
        assert_eq!(s.workloads(), vec![("k8s.statefulset.name", "db".into())]);
        let ds = pod("zerotrace-4kq7z", &[("pod-template-generation", "1"), ("controller-revision-hash", "6d9")], &[]);
        assert_eq!(ds.workloads(), vec![("k8s.daemonset.name", "zerotrace".into())]);
        let cj = pod("report-29012345-abcde", &[("batch.kubernetes.io/job-name", "report-29012345")], &[]);
        assert_eq!(cj.workloads(), vec![("k8s.cronjob.name", "report".into()), ("k8s.job.name", "report-29012345".into())]);
        let j = pod("migrate-xk2p9", &[("job-name", "migrate")], &[]);
        assert_eq!(j.workloads(), vec![("k8s.job.name", "migrate".into())]);
        assert!(pod("bare", &[], &[]).workloads().is_empty());
    }

    #[test]
    fn service_attributes_follow_the_conventions_order() {
        let labels = [
            ("pod-template-hash", "7d4b9c8f6d"),
            ("app.kubernetes.io/name", "checkout-svc"),
            ("app.kubernetes.io/instance", "checkout-eu"),
            ("app.kubernetes.io/version", "1.4.2"),
        ];
        // The annotation wins over everything.
        let p = pod(
            "checkout-7d4b9c8f6d-x2k9q",
            &labels,
            &[("resource.opentelemetry.io/service.name", "payments"), ("resource.opentelemetry.io/service.namespace", "retail")],
        );
        let s = service(&p, true);
        assert_eq!((s["service.name"].as_str(), s["service.namespace"].as_str()), ("payments", "retail"));
        // Well-known labels when opted in: instance before name; version from its label.
        let p = pod("checkout-7d4b9c8f6d-x2k9q", &labels, &[]);
        let s = service(&p, true);
        assert_eq!(s["service.name"], "checkout-eu");
        assert_eq!(s["service.version"], "1.4.2");
        assert_eq!(s["service.namespace"], "shop");
        assert_eq!(s["service.instance.id"], "shop.checkout-7d4b9c8f6d-x2k9q.app");
        // Not opted in: the workload.
        let s = service(&p, false);
        assert_eq!(s["service.name"], "checkout");
        assert!(!s.contains_key("service.version"));
        // No workload: the pod; no pod name: the container.
        assert_eq!(service(&pod("standalone", &[], &[]), false)["service.name"], "standalone");
        assert_eq!(service(&pod("", &[], &[]), false)["service.name"], "app");
        let p = pod("x", &[], &[("resource.opentelemetry.io/service.instance.id", "i-1")]);
        assert_eq!(service(&p, false)["service.instance.id"], "i-1");
    }

    #[test]
    fn names_from_kubelet_labels() {
        let labels: HashMap<String, String> = [
            ("io.kubernetes.pod.name", "web-0"),
            ("io.kubernetes.pod.namespace", "shop"),
            ("io.kubernetes.pod.uid", "5f1c2a9e-7b3d-4e8f-9a0b-1c2d3e4f5a6b"),
            ("io.kubernetes.container.name", "server"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let sandbox: HashMap<String, String> =
            [("io.kubernetes.pod.name", "web-0"), ("app", "web")].iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let p = from_labels(&labels, Some("ignored".into()), sandbox, HashMap::new());
        assert_eq!((p.pod_name.as_str(), p.namespace.as_str(), p.container_name.as_str()), ("web-0", "shop", "server"));
        assert_eq!(p.pod_labels.len(), 1, "kubelet's labels are not the pod's: {:?}", p.pod_labels);
        let attrs: HashMap<_, _> = p.attributes().into_iter().collect();
        assert_eq!(attrs["k8s.pod.uid"], "5f1c2a9e-7b3d-4e8f-9a0b-1c2d3e4f5a6b");
    }

    /// A runtime that accepts connections and never answers holds up one lookup for
    /// LOOKUP_TIMEOUT; the lookups after it return at once.
    #[test]
    fn a_hung_runtime_holds_up_one_lookup_only() {
        let dir = std::env::temp_dir().join(format!("zt-cri-hung-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let socket = dir.join("cri.sock");
        let _ = std::fs::remove_file(&socket);
        let listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
        let held = std::thread::spawn(move || listener.incoming().take(4).filter_map(Result::ok).collect::<Vec<_>>());
        let cri = Cri::start(socket.clone(), false);
        let t = Instant::now();
        assert!(cri.get("0123abcd").is_none());
        let first = t.elapsed();
        assert!(first >= LOOKUP_TIMEOUT - Duration::from_millis(100), "the first lookup waited for its answer: {first:?}");
        let t = Instant::now();
        for id in ["4567ef01", "89abcdef", "0123abcd"] {
            assert!(cri.get(id).is_none());
        }
        assert!(t.elapsed() < LOOKUP_TIMEOUT / 2, "later lookups did not wait: {:?}", t.elapsed());
        drop(held);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unknown_socket_is_an_error() {
        assert!(matches!(init("/nonexistent/cri.sock", false), Err(CriError::NoSocket(_))));
    }
}
