//! zerotrace as the DaemonSet runs it, on real container runtimes: the agent's image (FROM
//! scratch, `cargo xtask image`) run by podman with the flags of the DaemonSet's own pod spec
//! (rendered by kustomize, turned into podman flags by the harness: host PID namespace, only
//! the listed capabilities, read-only root, the seccomp profile, the mounts, the
//! environment and the arguments), tracing services that run in their own containers (images
//! FROM scratch) and on the host. Spans are read back from the test's OTLP receiver.
use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use zerotrace_e2e::{
    containers::{self, agent_image, manifests, pod_run, podman, podman_id, podman_out, podman_pid, podman_rm, program_image},
    http::Client,
    otlp::{Kind, RSpan, Receiver},
    proc::{Proc, free_port, wait_for_port, wait_until},
    tools::{self, GO_NEWEST},
};

const SERVER: i32 = 2;
const NODE: &str = "e2e-node-1";
const AGENT: &str = "zt-e2e-agent";

/// The image the rendered DaemonSet names (after kustomize's `images:`).
fn daemonset_image(docs: &[serde_json::Value]) -> Result<String> {
    let ds = containers::daemonset(docs)?;
    Ok(ds["spec"]["template"]["spec"]["containers"][0]["image"].as_str().context("no image")?.to_owned())
}

/// Starts the agent's pod spec under podman; waits until it traces each of `pids`.
fn start_agent(docs: &[serde_json::Value], rx: &Receiver, pids: &[u32], extra_env: &[(&str, &str)]) -> Result<(Proc, containers::PodRun)> {
    let endpoint = rx.endpoint();
    let mut env = vec![("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "200"), ("NO_COLOR", "1")];
    env.extend_from_slice(extra_env);
    let run = pod_run(docs, NODE, &env)?;
    podman_rm(AGENT);
    let mut cmd = podman()?;
    cmd.args(["run", "--rm", "--name", AGENT]).args(&run.flags).arg(daemonset_image(docs)?).args(&run.args);
    eprintln!("agent: podman {}", cmd.get_args().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" "));
    let agent = Proc::spawn("agent-pod", cmd)?;
    let mut agent = agent;
    for pid in pids {
        let needle = format!("tracing pid={pid} ");
        let r = wait_until(&format!("the agent's pod to trace pid {pid}"), Duration::from_secs(90), || {
            agent.stderr_text().contains(&needle) || agent.child.try_wait().ok().flatten().is_some()
        });
        if r.is_err() || !agent.stderr_text().contains(&needle) {
            podman_rm(AGENT);
            let _ = agent.wait_timeout(Duration::from_secs(5));
            anyhow::bail!("the agent's pod did not trace pid {pid}; its output:\n{}", agent.stderr_text());
        }
    }
    Ok((agent, run))
}

fn spans_of(spans: &[RSpan], pid: u32) -> Vec<&RSpan> {
    spans.iter().filter(|s| s.kind == SERVER && s.res("process.pid") == pid.to_string()).collect()
}

/// The image loads in podman under the name the manifests use, runs its entrypoint from a
/// read-only root, and has no shell.
#[test]
fn image_loads_and_runs_read_only_without_a_shell() -> Result<()> {
    let t0 = Instant::now();
    let archive = agent_image()?;
    let size = std::fs::metadata(&archive)?.len();
    let loaded = containers::podman_load(&archive)?;
    ensure!(loaded.contains("docker.io/library/zerotrace:dev"), "podman load named it: {loaded}");
    // The short name of the manifests resolves to it.
    let docs = manifests("base")?;
    let image = daemonset_image(&docs)?;
    ensure!(image == "docker.io/library/zerotrace:dev", "the DaemonSet runs {image}");
    let id_full = podman_out(&["image", "inspect", "--format", "{{.Id}}", &image])?;
    let id_short = podman_out(&["image", "inspect", "--format", "{{.Id}}", "zerotrace:dev"])?;
    ensure!(id_full == id_short, "zerotrace:dev resolves to {id_short}, not {id_full}");
    let version = podman_out(&["run", "--rm", "--read-only", "--read-only-tmpfs=false", "--network=none", &image, "--version"])?;
    ensure!(version.starts_with("zerotrace "), "{version}");
    let entry = podman_out(&["image", "inspect", "--format", "{{json .Config.Entrypoint}}", &image])?;
    ensure!(entry == r#"["/zerotrace"]"#, "entrypoint {entry}");
    for shell in ["/bin/sh", "/bin/bash", "/busybox"] {
        let out = podman()?.args(["run", "--rm", "--network=none", "--entrypoint", shell, &image]).output()?;
        ensure!(!out.status.success(), "{shell} ran in the image");
    }
    eprintln!("image {:.1} MiB, checked in {:?}", size as f64 / 1048576.0, t0.elapsed());
    Ok(())
}

/// A Go and a Rust service in containers of their own, both running as nobody (uid 65534),
/// and a Go service on the host.
struct Services {
    go: (u32, String, u16),
    go_img: String,
    rust: (u32, String, u16),
    host: Proc,
    host_port: u16,
    _guards: [Guard; 2],
}

impl Services {
    fn start() -> Result<Services> {
        let go_img = program_image("zt-go-svc", &tools::httpserver(GO_NEWEST)?)?;
        let rust_img = program_image("zt-rust-svc", &tools::rust_svc()?)?;
        let (go_port, rust_port, host_port) = (free_port(), free_port(), free_port());
        let (go_name, rust_name) = ("zt-e2e-go", "zt-e2e-rust");
        let guards = [run_service(go_name, &go_img, go_port)?, run_service(rust_name, &rust_img, rust_port)?];
        let host = Proc::spawn("host-go", {
            let mut c = Command::new(tools::httpserver(GO_NEWEST)?);
            c.arg(format!("127.0.0.1:{host_port}"));
            c
        })?;
        for p in [go_port, rust_port, host_port] {
            wait_for_port(p, Duration::from_secs(20))?;
        }
        Ok(Services {
            go: (podman_pid(go_name)?, podman_id(go_name)?, go_port),
            go_img,
            rust: (podman_pid(rust_name)?, podman_id(rust_name)?, rust_port),
            host,
            host_port,
            _guards: guards,
        })
    }

    /// The Go container stopped and run again: a new container (id) and process.
    fn restart_go(&mut self) -> Result<()> {
        podman_out(&["stop", "-t", "5", "zt-e2e-go"])?;
        podman_rm("zt-e2e-go");
        std::mem::forget(run_service("zt-e2e-go", &self.go_img, self.go.2)?);
        wait_for_port(self.go.2, Duration::from_secs(20))?;
        self.go.0 = podman_pid("zt-e2e-go")?;
        self.go.1 = podman_id("zt-e2e-go")?;
        Ok(())
    }

    fn pids(&self) -> [u32; 3] {
        [self.go.0, self.rust.0, self.host.pid()]
    }
}

/// A service container: its own PID, mount, user and cgroup namespaces, as nobody; the host's
/// network (loopback ports the test reaches).
fn run_service(name: &'static str, img: &str, port: u16) -> Result<Guard> {
    podman_rm(name);
    podman_out(&["run", "-d", "--rm", "--name", name, "--network=host", "--user", "65534:65534", "--read-only", img, &format!("127.0.0.1:{port}")])?;
    Ok(Guard(name))
}

/// Names of the agent's kernel programs still loaded (bpftool; the kernel truncates names
/// to 15 characters).
fn our_programs() -> Result<Vec<String>> {
    let out = Command::new("bpftool").args(["prog", "show", "--json"]).output().context("running bpftool (`cargo xtask setup` installs it)")?;
    ensure!(out.status.success(), "bpftool prog show: {}", String::from_utf8_lossy(&out.stderr));
    let progs: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let ours = ["sock_recv_lengt", "tcp_sendmsg_loc", "inet_sock_set_s", "go_conn_serve", "cpu_sample"];
    Ok(progs.as_array().into_iter().flatten().filter_map(|p| p["name"].as_str()).filter(|n| ours.iter().any(|o| n.starts_with(o))).map(str::to_owned).collect())
}

/// The DaemonSet's pod, run by podman, traces a Go service and a Rust service in their own
/// containers (as nobody) and a Go service on the host: every span names its container
/// (`container.id`, the runtime's full id) or none, and the node. /readyz says ready;
/// SIGTERM (podman stop, as kubelet does) flushes and detaches within the pod's grace period.
#[test]
fn daemonset_pod_traces_containers_and_host() -> Result<()> {
    let t0 = Instant::now();
    containers::podman_load(&agent_image()?)?;
    let docs = manifests("base")?;
    let mut svcs = Services::start()?;
    eprintln!("services up in {:?}", t0.elapsed());

    let rx = Receiver::start(Kind::Grpc, 0)?;
    let t_agent = Instant::now();
    let (mut agent, run) = start_agent(&docs, &rx, &svcs.pids(), &[])?;
    let _agent_guard = Guard(AGENT);
    eprintln!("agent's pod tracing the three services {:?} after its start", t_agent.elapsed());
    ensure!(run.caps.iter().any(|c| c == "BPF"), "the pod spec lists capabilities: {:?}", run.caps);

    // Readiness as kubelet would probe it (the pod's port; the host network here).
    let health_port: u16 = run
        .args
        .iter()
        .find_map(|a| a.strip_prefix("--health-listen="))
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .context("--health-listen in the DaemonSet's args")?;
    wait_until("/readyz to answer 200", Duration::from_secs(30), || Client::new(health_port).get("/readyz").is_ok_and(|r| r.status == 200))?;
    let ready = Client::new(health_port).get("/readyz")?;
    let body = String::from_utf8_lossy(&ready.body).into_owned();
    ensure!(body.contains("\"probes_attached\":true") && body.contains("\"exporter\":\"ok\""), "{body}");
    ensure!(Client::new(health_port).get("/healthz")?.status == 200);

    for port in [svcs.go.2, svcs.rust.2, svcs.host_port] {
        let mut c = Client::new(port);
        for _ in 0..3 {
            ensure!(c.get("/hello")?.status == 200);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let spans = loop {
        let spans = rx.spans();
        if svcs.pids().iter().all(|p| spans_of(&spans, *p).len() >= 3) || Instant::now() > deadline {
            break spans;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let log = agent.stderr_text();
    let rss_kib = rss_kib(&run, &log);
    // --memory-limit's default: 80 % of the pod's memory limit (400Mi), read from its cgroup.
    ensure!(log.contains("memory_limit_mib=320"), "the agent did not take its memory limit from the pod's cgroup; its log:\n{log}");
    for (what, pid, id) in [
        ("Go (container, uid 65534)", svcs.go.0, Some(&svcs.go.1)),
        ("Rust (container, uid 65534)", svcs.rust.0, Some(&svcs.rust.1)),
        ("Go (host)", svcs.host.pid(), None),
    ] {
        let mine = spans_of(&spans, pid);
        ensure!(mine.len() >= 3, "{what}: {} server spans of pid {pid}; agent log:\n{log}", mine.len());
        for s in mine {
            ensure!(s.attr("url.path") == "/hello", "{what}: {s:?}");
            ensure!(s.res("container.id") == id.map_or("", |s| s.as_str()), "{what}: container.id {:?}, want {id:?}", s.res("container.id"));
            ensure!(s.res("k8s.node.name") == NODE && s.res("host.name") == NODE, "{what}: node {:?}", s.res("k8s.node.name"));
        }
    }

    // A service container restarted (a new container, a new process): the agent, watching
    // execs, traces it again under its new container id.
    svcs.restart_go()?;
    let needle = format!("tracing pid={} ", svcs.go.0);
    wait_until("the restarted container to be traced", Duration::from_secs(20), || agent.stderr_text().contains(&needle))?;
    // Requests until one has its span: a process attached at its exec has its listening
    // ports read again every second, and a request in the second before that is not known
    // for a server's.
    let mut client = Client::new(svcs.go.2);
    wait_until("a span of the restarted container", Duration::from_secs(20), || {
        let _ = client.get("/hello");
        rx.spans().iter().any(|s| s.res("process.pid") == svcs.go.0.to_string() && s.res("container.id") == svcs.go.1)
    })?;
    ensure!(client.get("/hello")?.status == 200, "the restarted container serves");

    // SIGTERM, as kubelet stops a pod: the agent flushes and exits well within the grace
    // period (podman stop would SIGKILL it at the end of it).
    let t_stop = Instant::now();
    podman_out(&["stop", "-t", &run.grace_seconds.to_string(), AGENT])?;
    let status = agent.wait_timeout(Duration::from_secs(run.grace_seconds + 10)).context("the agent's podman run did not end")?;
    let took = t_stop.elapsed();
    let log = agent.stderr_text();
    ensure!(log.contains("SIGTERM: detaching"), "{log}");
    ensure!(status.success(), "the agent exited with {status} after SIGTERM:\n{log}");
    ensure!(took < Duration::from_secs(run.grace_seconds), "stopping took {took:?}, the grace period is {} s", run.grace_seconds);
    ensure!(!log.contains(" ERROR "), "{log}");
    // Nothing left behind in the kernel.
    let left = our_programs()?;
    ensure!(left.is_empty(), "kernel programs left after the agent's pod stopped: {left:?}");
    // The pod started again (a rolling update) attaches to the same services again.
    let (mut again, _) = start_agent(&docs, &rx, &svcs.pids(), &[])?;
    podman_out(&["stop", "-t", &run.grace_seconds.to_string(), AGENT])?;
    ensure!(again.wait_timeout(Duration::from_secs(run.grace_seconds + 10)).is_some_and(|s| s.success()), "{}", again.stderr_text());
    ensure!(our_programs()?.is_empty(), "kernel programs left after the second run");
    eprintln!("agent RSS {} MiB; stopped in {took:?} (grace {} s); whole test {:?}", rss_kib / 1024, run.grace_seconds, t0.elapsed());
    Ok(())
}

/// The agent's resident memory (from the host's /proc: the pod shares its PID namespace).
fn rss_kib(_run: &containers::PodRun, _log: &str) -> u64 {
    let Ok(pid) = podman_pid(AGENT) else { return 0 };
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmRSS:").and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())))
        .unwrap_or(0)
}

/// Least privilege: the pod spec's capabilities are each needed. With one of them removed
/// the agent refuses to start, or runs and says what it cannot do, naming that capability.
/// The go-uprobes overlay's CAP_SYS_ADMIN is what Go uprobes take (the base traces Go at the
/// socket level and says so).
#[test]
fn least_privilege_each_capability_is_needed() -> Result<()> {
    let t0 = Instant::now();
    containers::podman_load(&agent_image()?)?;
    let svcs = Services::start()?;
    let rx = Receiver::start(Kind::Grpc, 0)?;
    let mut report = Vec::new();
    let base_caps = pod_run(&manifests("base")?, NODE, &[])?.caps;
    for overlay in ["base", "go-uprobes"] {
        let docs = manifests(overlay)?;
        let (mut agent, run) = start_agent(&docs, &rx, &svcs.pids(), &[])?;
        let _g = Guard(AGENT);
        let log = agent.stderr_text();
        let go_line = log.lines().find(|l| l.contains(&format!("tracing pid={} ", svcs.go.0))).unwrap_or_default().to_owned();
        if run.caps.iter().any(|c| c == "SYS_ADMIN") {
            ensure!(go_line.contains("go=go"), "{overlay}: Go with uprobes: {go_line}");
        } else {
            ensure!(go_line.contains("layer=\"socket\"") && log.contains("CAP_SYS_ADMIN"), "{overlay}: Go at the socket level, saying why: {log}");
        }
        podman_rm(AGENT);
        let _ = agent.wait_timeout(Duration::from_secs(30));
        // Each capability removed in turn (an overlay: the ones it adds; CAP_SYS_ADMIN implies
        // CAP_BPF and CAP_PERFMON to the kernel, so with it those two are not measurable).
        let caps: Vec<String> = run.caps.iter().filter(|c| overlay == "base" || !base_caps.contains(c)).cloned().collect();
        for cap in caps {
            let mut env = vec![("OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(), rx.endpoint())];
            env.push(("NO_COLOR".into(), "1".into()));
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let mut less = pod_run(&docs, NODE, &env)?;
            less.flags.retain(|f| f != &format!("--cap-add={cap}"));
            podman_rm(AGENT);
            let mut cmd = podman()?;
            cmd.args(["run", "--rm", "--name", AGENT]).args(&less.flags).arg(daemonset_image(&docs)?).args(&less.args);
            let mut p = Proc::spawn(&format!("agent-without-{cap}"), cmd)?;
            let needle = format!("CAP_{cap}");
            let said = wait_until(&format!("the agent without {needle} to name it"), Duration::from_secs(40), || {
                p.stderr_text().contains(&needle) || p.child.try_wait().ok().flatten().is_some()
            });
            // A refusal ends the process right after saying so.
            let exited = p.wait_timeout(Duration::from_secs(3));
            let log = p.stderr_text();
            podman_rm(AGENT);
            let _ = p.wait_timeout(Duration::from_secs(30));
            ensure!(said.is_ok() && log.contains(&needle), "{overlay} without {needle}: nothing names it (exited: {exited:?}):\n{log}");
            let line = log.lines().find(|l| l.contains(&needle)).unwrap_or_default().trim().to_owned();
            let outcome = match exited {
                Some(st) if !st.success() => "refuses to start",
                _ => "runs, degraded",
            };
            eprintln!("{overlay} without CAP_{cap}: {outcome}: {line}");
            report.push((overlay, cap, outcome, line));
        }
    }
    ensure!(report.iter().any(|(o, c, _, _)| *o == "go-uprobes" && c == "SYS_ADMIN"), "SYS_ADMIN was measured");
    eprintln!("least privilege measured in {:?}", t0.elapsed());
    Ok(())
}

/// Removes a container when the test ends, however it ends.
struct Guard(&'static str);

impl Drop for Guard {
    fn drop(&mut self) {
        podman_rm(self.0);
    }
}

/// Pods made through containerd's CRI as kubelet makes them (kubelet's labels, BestEffort
/// cgroup parents, the pods' own labels and annotations on their sandboxes), their
/// containers running as nobody: the agent asks the runtime over its CRI socket, and every
/// span names its pod, namespace, container, pod uid and container id; service.name follows
/// the semantic conventions' Kubernetes rules (the annotation first, else the Deployment the
/// pod's labels name), service.instance.id is namespace.pod.container.
#[test]
fn cri_pods_spans_carry_pod_names() -> Result<()> {
    use zerotrace_e2e::cri::{Containerd, Pod};
    let t0 = Instant::now();
    let mut ctrd = Containerd::start()?;
    let (go_img, go_archive) = containers::program_archive("zt-go-svc", &tools::httpserver(GO_NEWEST)?)?;
    let (rust_img, rust_archive) = containers::program_archive("zt-rust-svc", &tools::rust_svc()?)?;
    ctrd.import(&go_archive)?;
    ctrd.import(&rust_archive)?;
    // The agent's own image imports under the name the manifests use.
    let imported = ctrd.import(&agent_image()?)?;
    ensure!(imported.contains("docker.io/library/zerotrace:dev"), "ctr import: {imported}");
    eprintln!("containerd up, images imported in {:?}", t0.elapsed());

    let frontend = Pod {
        name: "frontend-7d4b9c8f6d-x2k9q".into(),
        namespace: "shop".into(),
        uid: "0b6f3c1e-2a4d-4c8e-9f10-1a2b3c4d5e6f".into(),
        labels: [("pod-template-hash", "7d4b9c8f6d"), ("app.kubernetes.io/name", "web")].iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    };
    let ratings = Pod {
        name: "ratings-0".into(),
        namespace: "shop".into(),
        uid: "7c2d9e4f-5b6a-4d1c-8e2f-3a4b5c6d7e8f".into(),
        labels: [("statefulset.kubernetes.io/pod-name", "ratings-0")].iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        annotations: [("resource.opentelemetry.io/service.name", "ratings-api")].iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
    };
    // Two more that node-wide selection leaves alone: one in an excluded namespace, one
    // whose pod opts out by label.
    let system =
        Pod { name: "dns-5d8f7c9b6-abcde".into(), namespace: "kube-system".into(), uid: "1d2e3f40-5a6b-4c7d-8e9f-0a1b2c3d4e5f".into(), ..Default::default() };
    let quiet = Pod {
        name: "batch-0".into(),
        namespace: "shop".into(),
        uid: "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d".into(),
        labels: [("zerotrace", "off")].iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    };
    let (go_port, rust_port, sys_port, quiet_port) = (free_port(), free_port(), free_port(), free_port());
    let (go_id, go_pid) = ctrd.run_pod(&frontend, "server", &go_img, &[format!("127.0.0.1:{go_port}")], 65534)?;
    let (rust_id, rust_pid) = ctrd.run_pod(&ratings, "api", &rust_img, &[format!("127.0.0.1:{rust_port}")], 65534)?;
    let (_, sys_pid) = ctrd.run_pod(&system, "dns", &go_img, &[format!("127.0.0.1:{sys_port}")], 65534)?;
    let (_, quiet_pid) = ctrd.run_pod(&quiet, "job", &rust_img, &[format!("127.0.0.1:{quiet_port}")], 65534)?;
    for p in [go_port, rust_port, sys_port, quiet_port] {
        wait_for_port(p, Duration::from_secs(20))?;
    }
    let cgroup = std::fs::read_to_string(format!("/proc/{go_pid}/cgroup"))?;
    ensure!(cgroup.contains(&format!("/kubepods/besteffort/pod{}/{go_id}", frontend.uid)), "kubelet's cgroup parent: {cgroup}");
    eprintln!("pods running {:?} after the start", t0.elapsed());

    let rx = Receiver::start(Kind::Grpc, 0)?;
    let endpoint = rx.endpoint();
    // Discovered by executable, as a node-wide agent finds them, with the DaemonSet's
    // exclusions plus a label.
    let mut agent = zerotrace_e2e::agent::Agent::start_discovering_env(
        "run",
        &[
            "--exe",
            "zt-go-svc",
            "--exe",
            "zt-rust-svc",
            "--exclude-namespace",
            "kube-system",
            "--exclude-pod-label",
            "zerotrace=off",
            "--otlp-endpoint",
            &endpoint,
            "--batch-delay",
            "200ms",
            "--cri-socket",
            zerotrace_e2e::cri::SOCKET,
        ],
        &[("K8S_NODE_NAME", NODE)],
    )?;
    for pid in [go_pid, rust_pid] {
        let needle = format!("tracing pid={pid} ");
        wait_until(&format!("pid {pid} to be traced"), Duration::from_secs(20), || agent.proc.stderr_text().contains(&needle))?;
    }
    for port in [go_port, rust_port] {
        let mut c = Client::new(port);
        for _ in 0..3 {
            ensure!(c.get("/hello")?.status == 200);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let spans = loop {
        let spans = rx.spans();
        if [go_pid, rust_pid].iter().all(|p| spans_of(&spans, *p).len() >= 3) || Instant::now() > deadline {
            break spans;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    agent.stop()?;
    let log = agent.proc.stderr_text();
    for (pid, why) in [(sys_pid, "kube-system"), (quiet_pid, "zerotrace=off")] {
        ensure!(!log.contains(&format!("tracing pid={pid} ")), "the pod excluded by {why} was traced:\n{log}");
        ensure!(!spans.iter().any(|s| s.res("process.pid") == pid.to_string()), "spans of the pod excluded by {why}");
    }
    for (pid, id, pod, container, service) in [(go_pid, &go_id, &frontend, "server", "frontend"), (rust_pid, &rust_id, &ratings, "api", "ratings-api")] {
        let mine = spans_of(&spans, pid);
        ensure!(mine.len() >= 3, "{}: {} spans; agent log:\n{log}", pod.name, mine.len());
        for s in mine {
            let want = [
                ("container.id", id.as_str()),
                ("k8s.pod.name", pod.name.as_str()),
                ("k8s.namespace.name", pod.namespace.as_str()),
                ("k8s.container.name", container),
                ("k8s.pod.uid", pod.uid.as_str()),
                ("k8s.node.name", NODE),
                ("service.name", service),
                ("service.namespace", "shop"),
            ];
            for (k, v) in want {
                ensure!(s.res(k) == v, "{}: {k} = {:?}, want {v:?}", pod.name, s.res(k));
            }
            ensure!(s.res("service.instance.id") == format!("shop.{}.{container}", pod.name), "{}", s.res("service.instance.id"));
        }
    }
    let front = spans_of(&spans, go_pid)[0];
    ensure!(
        front.res("k8s.deployment.name") == "frontend" && front.res("k8s.replicaset.name") == "frontend-7d4b9c8f6d",
        "{:?}",
        front.res("k8s.deployment.name")
    );
    ensure!(spans_of(&spans, rust_pid)[0].res("k8s.statefulset.name") == "ratings");
    eprintln!("CRI pod identity test {:?}", t0.elapsed());
    Ok(())
}
