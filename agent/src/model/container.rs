//! Which container a process runs in, from its /proc/PID/cgroup: the container id and, for
//! Kubernetes pods, the pod's uid. Every runtime names its cgroups differently (docker,
//! containerd, CRI-O, podman; the systemd and cgroupfs drivers; cgroup v1 and v2), and a
//! reader in its own cgroup namespace sees paths relative to its root (`/../../pod.../ID`):
//! the id is the last path component that is (or holds, between a runtime's prefix and
//! `.scope`) 64 hex digits; the pod uid is the component that names `pod<uid>`.
use std::path::Path;

/// The container a process belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Container {
    /// 64 lower-case hex digits, as the runtime (and `container.id`) names it.
    pub id: String,
    /// The runtime the cgroup name points at, when it says.
    pub runtime: Option<Runtime>,
    /// Kubernetes pod uid (with dashes), when the cgroup is under kubepods.
    pub pod_uid: Option<String>,
}

/// Container runtimes recognised by their cgroup names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    Docker,
    Containerd,
    CriO,
    Podman,
}

/// Reads /proc/PID/cgroup; `None` when the process is in no container (or has exited).
pub fn of_pid(proc_root: &Path, pid: u32) -> Option<Container> {
    let text = std::fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup")).ok()?;
    parse_cgroup_file(&text)
}

/// Parses a /proc/PID/cgroup file: the unified (v2) line first, then the v1 hierarchies.
pub fn parse_cgroup_file(text: &str) -> Option<Container> {
    let mut v1 = None;
    for line in text.lines() {
        // hierarchy-ID:controller-list:cgroup-path (the path may itself contain ':').
        let mut parts = line.splitn(3, ':');
        let (Some(hier), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else { continue };
        if hier == "0" && controllers.is_empty() {
            if let Some(c) = parse_path(path) {
                return Some(c);
            }
        } else if v1.is_none() {
            v1 = parse_path(path);
        }
    }
    v1
}

/// The container named by one cgroup path.
pub fn parse_path(path: &str) -> Option<Container> {
    let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty() && *c != "." && *c != "..").collect();
    let (index, id, runtime) = components.iter().enumerate().rev().find_map(|(i, c)| container_id(c).map(|(id, rt)| (i, id, rt)))?;
    let pod_uid = components[..index].iter().rev().find_map(|c| pod_uid(c));
    // A plain 64-hex directory under kubepods (cgroupfs driver) is some CRI runtime's.
    Some(Container { id, runtime, pod_uid })
}

/// The id in one path component: `ID`, `PREFIX-ID`, `PREFIX-ID.scope` (systemd driver).
/// Monitors (`libpod-conmon-ID.scope`, `crio-conmon-ID.scope`) are not containers.
fn container_id(component: &str) -> Option<(String, Option<Runtime>)> {
    let c = component.strip_suffix(".scope").unwrap_or(component);
    if c.contains("conmon") {
        return None;
    }
    let (prefix, id) = match c.rsplit_once('-') {
        Some((prefix, id)) => (Some(prefix), id),
        None => (None, c),
    };
    if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let runtime = match prefix {
        None => None,
        Some("docker") => Some(Runtime::Docker),
        Some("cri-containerd") | Some("containerd") => Some(Runtime::Containerd),
        Some("crio") => Some(Runtime::CriO),
        Some("libpod") => Some(Runtime::Podman),
        // Unknown prefixes still name a container (e.g. `cri-dockerd`'s docker ones).
        Some(_) => None,
    };
    Some((id.to_ascii_lowercase(), runtime))
}

/// `pod<uid>` (cgroupfs driver) or `kubepods-<qos>-pod<uid with _>.slice` (systemd driver).
fn pod_uid(component: &str) -> Option<String> {
    let c = component.strip_suffix(".slice").unwrap_or(component);
    let at = c.rfind("pod")?;
    let uid = c[at + 3..].replace('_', "-");
    let b = uid.as_bytes();
    let dashes = [8, 13, 18, 23];
    let ok = b.len() == 36 && b.iter().enumerate().all(|(i, ch)| if dashes.contains(&i) { *ch == b'-' } else { ch.is_ascii_hexdigit() });
    ok.then(|| uid.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4c1b7e9f0e3d5a6b8c9d0e1f2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d";
    const UID: &str = "5f1c2a9e-7b3d-4e8f-9a0b-1c2d3e4f5a6b";

    fn parse(text: &str) -> Option<Container> {
        parse_cgroup_file(&text.replace("{ID}", ID).replace("{UID}", UID).replace("{UID_}", &UID.replace('-', "_")))
    }

    fn expect(text: &str, runtime: Option<Runtime>, pod: bool) {
        let c = parse(text).unwrap_or_else(|| panic!("no container in {text:?}"));
        assert_eq!(c.id, ID, "{text}");
        assert_eq!(c.runtime, runtime, "{text}");
        assert_eq!(c.pod_uid.as_deref(), pod.then_some(UID), "{text}");
    }

    #[test]
    fn podman_cgroupfs_here() {
        // podman 4.3 + runc, cgroupfs manager, no systemd (this machine).
        expect("0::/libpod_parent/libpod-{ID}\n", Some(Runtime::Podman), false);
    }

    #[test]
    fn podman_systemd() {
        expect("0::/machine.slice/libpod-{ID}.scope/container\n", Some(Runtime::Podman), false);
        // Rootless podman under a user's systemd.
        expect("0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container\n", Some(Runtime::Podman), false);
        // conmon, the monitor, is no container.
        assert_eq!(parse("0::/machine.slice/libpod-conmon-{ID}.scope\n"), None);
    }

    #[test]
    fn kubernetes_containerd_cgroupfs() {
        // A CRI container with kubelet's cgroup parent, containerd 1.6 (this machine).
        expect("0::/kubepods/besteffort/pod{UID}/{ID}\n", None, true);
        expect("0::/kubepods/burstable/pod{UID}/{ID}\n", None, true);
        expect("0::/kubepods/pod{UID}/{ID}\n", None, true);
    }

    #[test]
    fn kubernetes_containerd_systemd() {
        expect("0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope\n", Some(Runtime::Containerd), true);
        // Guaranteed QoS has no QoS slice; kind nests kubelet's slice.
        expect("0::/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope\n", Some(Runtime::Containerd), true);
        expect(
            "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope\n",
            Some(Runtime::Containerd),
            true,
        );
    }

    #[test]
    fn kubernetes_crio() {
        expect("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-{ID}.scope\n", Some(Runtime::CriO), true);
        expect("0::/kubepods/burstable/pod{UID}/crio-{ID}\n", Some(Runtime::CriO), true);
        assert_eq!(parse("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-conmon-{ID}.scope\n"), None);
    }

    #[test]
    fn docker() {
        expect("0::/system.slice/docker-{ID}.scope\n", Some(Runtime::Docker), false);
        // cgroup v1, cgroupfs driver: every hierarchy names it.
        expect("12:pids:/docker/{ID}\n11:memory:/docker/{ID}\n1:name=systemd:/docker/{ID}\n0::/docker/{ID}\n", None, false);
    }

    #[test]
    fn cgroup_v1_only() {
        expect(
            "11:cpu,cpuacct:/kubepods/besteffort/pod{UID}/{ID}\n10:memory:/kubepods/besteffort/pod{UID}/{ID}\n1:name=systemd:/kubepods/besteffort/pod{UID}/{ID}\n",
            None,
            true,
        );
        // Hybrid hosts: v1 controllers plus an empty unified line for a host process.
        assert_eq!(parse("12:memory:/user.slice\n1:name=systemd:/user.slice/session-1.scope\n0::/user.slice/session-1.scope\n"), None);
        // Hybrid, the unified line at the root while v1 names the container.
        expect("4:memory:/docker/{ID}\n0::/\n", None, false);
    }

    #[test]
    fn containerd_without_kubernetes() {
        // `ctr run`: the containerd namespace is the parent.
        expect("0::/default/{ID}\n", None, false);
        expect("0::/system.slice/containerd.service/k8s.io/{ID}\n", None, false);
    }

    #[test]
    fn through_a_cgroup_namespace() {
        // The agent in its own cgroup namespace (containerd on cgroup v2 gives pods one) sees
        // other pods' paths relative to its own cgroup.
        expect("0::/../../besteffort/pod{UID}/{ID}\n", None, true);
        expect("0::/../../../kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope\n", Some(Runtime::Containerd), true);
        // Its own cgroup (and its own containers' processes) is the namespace's root.
        assert_eq!(parse("0::/\n"), None);
    }

    #[test]
    fn nested_and_not_containers() {
        // systemd running inside a container: the container is the outer scope.
        expect("0::/system.slice/docker-{ID}.scope/init.scope\n", Some(Runtime::Docker), false);
        assert_eq!(parse("0::/system.slice/sshd.service\n"), None);
        assert_eq!(parse("0::/init.scope\n"), None);
        assert_eq!(parse(""), None);
        assert_eq!(parse("garbage\n::\n0::\n"), None);
        // Not 64 hex digits.
        assert_eq!(parse("0::/docker/4c1b7e9f0e3d\n"), None);
        // A pod-like name that is no uid.
        let c = parse("0::/kubepods/podcast/{ID}\n").unwrap();
        assert_eq!(c.pod_uid, None);
    }

    #[test]
    fn this_process() {
        // Whatever this test runs in, reading our own file works and does not panic.
        let _ = of_pid(Path::new("/proc"), std::process::id());
    }
}
