//! Which discovered processes (`--all`, `--exe`, `--port`) are left alone: node-wide tracing
//! that is safe by default skips what the operator names, by executable
//! (`--exclude-exe GLOB`, e.g. the collector), Kubernetes namespace
//! (`--include-namespace`, `--exclude-namespace`), pod label (`--exclude-pod-label K=V`) and
//! container name (`--exclude-container`). Pod facts come from the CRI (model::k8s); a
//! process that is in no pod is never excluded by them, except that `--include-namespace`
//! keeps only pods of those namespaces. A `--pid` is always traced.
use std::path::Path;

use super::k8s::PodContainer;

#[derive(Clone, Debug, Default)]
pub struct Selection {
    pub exclude_exe: Vec<glob::Pattern>,
    pub include_namespaces: Vec<String>,
    pub exclude_namespaces: Vec<String>,
    pub exclude_pod_labels: Vec<(String, String)>,
    pub exclude_containers: Vec<String>,
}

impl Selection {
    fn needs_pod(&self) -> bool {
        !(self.include_namespaces.is_empty() && self.exclude_namespaces.is_empty() && self.exclude_pod_labels.is_empty() && self.exclude_containers.is_empty())
    }

    /// Why process `pid` is excluded, or None.
    pub fn excluded(&self, pid: u32) -> Option<String> {
        if self.exclude_exe.is_empty() && !self.needs_pod() {
            return None;
        }
        let exe = super::proc::exe_link(pid).ok();
        let pod =
            if self.needs_pod() { super::container::of_pid(Path::new("/proc"), pid).and_then(|c| super::k8s::lookup(&c.id)).map(|(p, _)| p) } else { None };
        self.excluded_by(exe.as_deref(), pod.as_deref())
    }

    /// The rules, given the executable and the pod (if any).
    pub fn excluded_by(&self, exe: Option<&Path>, pod: Option<&PodContainer>) -> Option<String> {
        if let Some(path) = exe {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let full = path.to_string_lossy();
            if let Some(g) = self.exclude_exe.iter().find(|g| g.matches(&full) || g.matches(&name)) {
                return Some(format!("--exclude-exe {}", g.as_str()));
            }
        }
        match pod {
            Some(p) => {
                if !self.include_namespaces.is_empty() && !self.include_namespaces.contains(&p.namespace) {
                    return Some(format!("namespace {} is not in --include-namespace", p.namespace));
                }
                if self.exclude_namespaces.contains(&p.namespace) {
                    return Some(format!("--exclude-namespace {}", p.namespace));
                }
                if let Some((k, v)) = self.exclude_pod_labels.iter().find(|(k, v)| p.pod_labels.get(k) == Some(v)) {
                    return Some(format!("--exclude-pod-label {k}={v}"));
                }
                if self.exclude_containers.contains(&p.container_name) {
                    return Some(format!("--exclude-container {}", p.container_name));
                }
                None
            }
            None if !self.include_namespaces.is_empty() => Some("not in a pod, and --include-namespace is given".into()),
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, container: &str, labels: &[(&str, &str)]) -> PodContainer {
        PodContainer {
            pod_name: "p-0".into(),
            namespace: ns.into(),
            container_name: container.into(),
            pod_labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn rules() {
        let s = Selection {
            exclude_exe: vec![glob::Pattern::new("otelcol*").unwrap()],
            exclude_namespaces: vec!["kube-system".into()],
            exclude_pod_labels: vec![("zerotrace".into(), "off".into())],
            exclude_containers: vec!["istio-proxy".into()],
            ..Default::default()
        };
        let exe = Path::new("/usr/bin/otelcol-contrib");
        assert!(s.excluded_by(Some(exe), None).unwrap().contains("otelcol*"));
        let app = Path::new("/app/server");
        assert_eq!(s.excluded_by(Some(app), None), None, "a host process: no pod rule applies");
        assert_eq!(s.excluded_by(Some(app), Some(&pod("shop", "server", &[]))), None);
        assert!(s.excluded_by(Some(app), Some(&pod("kube-system", "coredns", &[]))).unwrap().contains("kube-system"));
        assert!(s.excluded_by(Some(app), Some(&pod("shop", "server", &[("zerotrace", "off")]))).unwrap().contains("zerotrace=off"));
        assert_eq!(s.excluded_by(Some(app), Some(&pod("shop", "server", &[("zerotrace", "on")]))), None);
        assert!(s.excluded_by(Some(app), Some(&pod("shop", "istio-proxy", &[]))).unwrap().contains("istio-proxy"));
        let only = Selection { include_namespaces: vec!["shop".into()], ..Default::default() };
        assert_eq!(only.excluded_by(Some(app), Some(&pod("shop", "server", &[]))), None);
        assert!(only.excluded_by(Some(app), Some(&pod("other", "server", &[]))).is_some());
        assert!(only.excluded_by(Some(app), None).is_some(), "host processes are not in an included namespace");
        assert_eq!(Selection::default().excluded(std::process::id()), None);
    }
}
