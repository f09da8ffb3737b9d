//! The OpenTelemetry resource of a traced process: who produced the spans.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use opentelemetry::KeyValue;
use opentelemetry_sdk::Resource;

use crate::model::{Target, TargetEnv, target::NativeTarget};

pub const DISTRO_NAME: &str = "zerotrace";
pub const DISTRO_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Resource attributes of one target, in the order they are exported. service.name comes
/// from, in order: --service-name, the target's own OTEL_SERVICE_NAME (or service.name in
/// its OTEL_RESOURCE_ATTRIBUTES), for a pod's container the Kubernetes rules (model::k8s),
/// the agent's OTEL_SERVICE_NAME (or its resource attributes), the executable's name. Other attributes from the target's environment win
/// over the agent's.
/// Who a traced process is, for its resource.
pub struct Process<'a> {
    pub pid: u32,
    pub exe_name: &'a str,
    pub exe_path: &'a std::path::Path,
    pub env: &'a TargetEnv,
    /// Language runtime name and version, when known.
    pub runtime: Option<(&'a str, &'a str)>,
}

impl<'a> From<&'a Target> for Process<'a> {
    fn from(t: &'a Target) -> Self {
        Process { pid: t.pid, exe_name: &t.exe_name, exe_path: &t.exe_path, env: &t.env, runtime: Some(("go", &t.build.go_version)) }
    }
}

impl<'a> From<&'a NativeTarget> for Process<'a> {
    fn from(t: &'a NativeTarget) -> Self {
        let runtime = t.runtime.as_ref().map(|(n, v)| (n.as_str(), v.as_str()));
        Process { pid: t.pid, exe_name: &t.exe_name, exe_path: &t.exe_path, env: &t.env, runtime }
    }
}

pub fn attributes(t: &Process<'_>, flag: Option<&str>, agent_env_service: Option<&str>, agent_attrs: &[(String, String)]) -> Vec<(String, AttrValue)> {
    let in_attrs = |attrs: &[(String, String)]| attrs.iter().find(|(k, _)| k == "service.name").map(|(_, v)| v.clone());
    // The container it runs in (its cgroup) and, for a pod's, the names the runtime keeps.
    let container = crate::model::container::of_pid(std::path::Path::new("/proc"), t.pid);
    let pod = container.as_ref().and_then(|c| crate::model::k8s::lookup(&c.id));
    let k8s_service = pod.as_ref().map(|(p, well_known)| p.service(*well_known)).unwrap_or_default();
    let service = flag
        .map(str::to_owned)
        .or_else(|| t.env.service_name.clone())
        .or_else(|| in_attrs(&t.env.resource_attrs))
        .or_else(|| k8s_service.iter().find(|(k, _)| *k == "service.name").map(|(_, v)| v.clone()))
        .or_else(|| agent_env_service.map(str::to_owned))
        .or_else(|| in_attrs(agent_attrs))
        .unwrap_or_else(|| t.exe_name.to_owned());
    let mut out: Vec<(String, AttrValue)> = vec![
        ("service.name".into(), AttrValue::Str(service)),
        ("process.pid".into(), AttrValue::Int(i64::from(t.pid))),
        ("process.executable.name".into(), AttrValue::Str(t.exe_name.to_owned())),
        ("process.executable.path".into(), AttrValue::Str(t.exe_path.display().to_string())),
        ("host.name".into(), AttrValue::Str(node_name().unwrap_or_else(host_name))),
        ("telemetry.distro.name".into(), AttrValue::Str(DISTRO_NAME.into())),
        ("telemetry.distro.version".into(), AttrValue::Str(DISTRO_VERSION.into())),
    ];
    if let Some((name, version)) = t.runtime {
        out.push(("process.runtime.name".into(), AttrValue::Str(name.into())));
        out.push(("process.runtime.version".into(), AttrValue::Str(version.into())));
    }
    if let Some(c) = container {
        out.push(("container.id".into(), AttrValue::Str(c.id)));
        match &pod {
            Some((p, _)) => {
                for (k, v) in p.attributes() {
                    out.push((k.into(), AttrValue::Str(v)));
                }
            }
            None => {
                if let Some(uid) = c.pod_uid {
                    out.push(("k8s.pod.uid".into(), AttrValue::Str(uid)));
                }
            }
        }
    }
    // service.namespace, .instance.id, .version by the Kubernetes rules, unless the target
    // sets its own.
    for (k, v) in k8s_service.into_iter().filter(|(k, _)| *k != "service.name") {
        if !t.env.resource_attrs.iter().any(|(ok, _)| ok == k) {
            out.push((k.into(), AttrValue::Str(v)));
        }
    }
    if let Some(node) = node_name() {
        out.push(("k8s.node.name".into(), AttrValue::Str(node)));
    }
    for (k, v) in t.env.resource_attrs.iter().chain(agent_attrs) {
        if !out.iter().any(|(ok, _)| ok == k) {
            out.push((k.clone(), AttrValue::Str(v.clone())));
        }
    }
    out
}

#[derive(Clone, Debug, PartialEq)]
pub enum AttrValue {
    Str(String),
    Int(i64),
}

/// The Kubernetes node the agent runs on (`K8S_NODE_NAME`, from the downward API): in a pod
/// the host name is the pod's, so this names the host.
pub fn node_name() -> Option<String> {
    std::env::var("K8S_NODE_NAME").ok().filter(|n| !n.is_empty())
}

pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buf is writable for its length.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Resources of traced processes, by pid, shared with the run loop that discovers them.
pub type Resources = Arc<Mutex<HashMap<u32, Resource>>>;

pub fn resource(attrs: &[(String, AttrValue)]) -> Resource {
    Resource::builder_empty()
        .with_attributes(attrs.iter().map(|(k, v)| match v {
            AttrValue::Str(s) => KeyValue::new(k.clone(), s.clone()),
            AttrValue::Int(i) => KeyValue::new(k.clone(), *i),
        }))
        .build()
}
