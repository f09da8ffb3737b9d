//! Resolved settings: command-line flags over OpenTelemetry's standard environment variables
//! over defaults. Invalid values are errors that name the key and what is accepted.
use std::{path::PathBuf, time::Duration};

pub use crate::run::RunSettings;
use crate::{
    cli::{OnOff, ProfileArgs, RunArgs, TailArgs},
    correlate::sampling::Sampler,
    export::{ExportSettings, Exporter, Protocol, TlsSettings, tail},
    probes::{KernelSettings, go::GoCausality},
    profile::ProfileSettings,
};

/// Spans waiting for export at most, by default. Larger than the SDKs' 2,048: an agent
/// exports a whole node's spans, and a drain of the ring hands the exporter ~1,000 at once.
/// At 95k spans/s on two saturated cores (`bench overhead --cases rust-sdk`), 2,048 dropped
/// 0.07 % of the spans in such bursts and 8,192 none.
pub const DEFAULT_QUEUE: usize = 8192;
/// Spans per export request, longest wait for a partial batch, and per request (the SDKs'
/// defaults).
pub const DEFAULT_BATCH: usize = 512;
pub const DEFAULT_DELAY: Duration = Duration::from_secs(5);
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The TLS variables, the signal's own first.
fn resolve_tls(env: &dyn Fn(&str) -> Option<String>) -> Result<TlsSettings, SettingsError> {
    let read = |keys: &[&'static str]| -> Result<Option<Vec<u8>>, SettingsError> {
        match first(env, keys) {
            None => Ok(None),
            Some((k, path)) => std::fs::read(&path).map(Some).map_err(|_| invalid(k, &path, "a readable PEM file")),
        }
    };
    let tls = TlsSettings {
        ca: read(&["OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", "OTEL_EXPORTER_OTLP_CERTIFICATE"])?,
        client_cert: read(&["OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE", "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE"])?,
        client_key: read(&["OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY", "OTEL_EXPORTER_OTLP_CLIENT_KEY"])?,
    };
    if tls.client_cert.is_some() != tls.client_key.is_some() {
        return Err(invalid("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", "", "set together with OTEL_EXPORTER_OTLP_CLIENT_KEY (mTLS needs both)"));
    }
    Ok(tls)
}

/// `zerotrace profile`: the run settings of `tail` (export only when asked for), profiling
/// on, ending after `--duration` with the files written.
pub fn resolve_profile(args: &ProfileArgs, env: &dyn Fn(&str) -> Option<String>) -> Result<RunSettings, SettingsError> {
    let mut run = args.run.clone();
    export_only_when_asked(&mut run, env);
    if run.control_socket == crate::control::DEFAULT_SOCKET {
        run.control_socket = "off".into();
    }
    let mut s = resolve(&run, env)?;
    if args.duration.is_zero() {
        return Err(invalid("--duration", "0", "a positive duration, e.g. 30s"));
    }
    let pprof = match (&args.output, &args.flamegraph) {
        (None, None) => Some(PathBuf::from("cpu.pb.gz")),
        (o, _) => o.clone(),
    };
    let frequency = args.frequency.unwrap_or(args.run.profile_frequency);
    s.profile = Some(ProfileSettings {
        frequency,
        otlp: s.export.exporter == Exporter::Otlp && s.profile.is_some(),
        duration: Some(args.duration),
        pprof,
        flamegraph: args.flamegraph.clone(),
    });
    Ok(s)
}

/// `tail` and `profile` export only when an exporter or an OTLP endpoint is given, by flag
/// or environment (`run` exports by default).
fn export_only_when_asked(run: &mut RunArgs, env: &dyn Fn(&str) -> Option<String>) {
    let endpoint_env = first(env, &["OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"]).is_some();
    if run.exporter.is_none() && run.otlp_endpoint.is_none() && !endpoint_env {
        run.exporter = Some(Exporter::None);
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SettingsError {
    #[error("invalid {key}={value:?}: {expected}")]
    Invalid { key: &'static str, value: String, expected: &'static str },
}

fn invalid(key: &'static str, value: &str, expected: &'static str) -> SettingsError {
    SettingsError::Invalid { key, value: value.to_owned(), expected }
}

/// First variable of `keys` that is set (and not empty).
fn first(env: &dyn Fn(&str) -> Option<String>, keys: &[&'static str]) -> Option<(&'static str, String)> {
    keys.iter().find_map(|k| env(k).filter(|v| !v.trim().is_empty()).map(|v| (*k, v.trim().to_owned())))
}

/// `zerotrace tail`: the run settings (exporting only when an exporter or an OTLP endpoint
/// is given, by flag or environment) plus what to show and how.
pub fn resolve_tail(args: &TailArgs, env: &dyn Fn(&str) -> Option<String>, color: bool) -> Result<RunSettings, SettingsError> {
    let mut run = args.run.clone();
    export_only_when_asked(&mut run, env);
    run.print = false;
    let mut s = resolve(&run, env)?;
    let name = match &args.name {
        Some(g) => Some(glob::Pattern::new(g).map_err(|e| invalid("--name", g, leak(format!("a glob ({e})"))))?),
        None => None,
    };
    let mut attrs = Vec::new();
    for a in &args.attr {
        let (k, v) = a.split_once('=').filter(|(k, _)| !k.is_empty()).ok_or_else(|| invalid("--attr", a, "K=V"))?;
        attrs.push((k.to_owned(), v.to_owned()));
    }
    let trace_id = match &args.trace_id {
        Some(t) if !t.is_empty() && t.len() <= 32 && t.bytes().all(|c| c.is_ascii_hexdigit()) => Some(t.to_ascii_lowercase()),
        Some(t) => return Err(invalid("--trace-id", t, "up to 32 hex digits")),
        None => None,
    };
    let filter = tail::Filter { services: args.service.clone(), name, min_duration: args.min_duration, errors: args.errors, trace_id, attrs };
    s.tail = Some(tail::TailSettings { filter, wait: args.wait, json: args.json, color: color && !args.json });
    Ok(s)
}

/// A message built at run time where a static one is expected (settings errors, once).
fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

pub fn resolve(args: &RunArgs, env: &dyn Fn(&str) -> Option<String>) -> Result<RunSettings, SettingsError> {
    let exporter = match args.exporter {
        Some(e) => e,
        None => match first(env, &["OTEL_TRACES_EXPORTER"]) {
            None => Exporter::Otlp,
            Some((_, v)) if v == "otlp" => Exporter::Otlp,
            Some((_, v)) if v == "none" => Exporter::None,
            Some((k, v)) => return Err(invalid(k, &v, "otlp or none")),
        },
    };
    let protocol = match args.otlp_protocol {
        Some(p) => p,
        None => match first(env, &["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"]) {
            None => Protocol::Grpc,
            Some((_, v)) if v == "grpc" => Protocol::Grpc,
            Some((_, v)) if v == "http/protobuf" => Protocol::HttpProtobuf,
            Some((k, v)) => return Err(invalid(k, &v, "grpc or http/protobuf")),
        },
    };
    let endpoint = resolve_endpoint(args.otlp_endpoint.as_deref(), protocol, env)?;
    let headers = match &args.otlp_headers {
        Some(h) => parse_kv_list("--otlp-headers", h)?,
        None => match first(env, &["OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS"]) {
            Some((k, v)) => parse_kv_list(k, &v)?,
            None => Vec::new(),
        },
    };
    let timeout = match args.otlp_timeout {
        Some(t) => t,
        None => ms_var(env, &["OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"])?.unwrap_or(DEFAULT_TIMEOUT),
    };
    let queue = match args.batch_queue {
        Some(q) => q,
        None => num_var(env, "OTEL_BSP_MAX_QUEUE_SIZE")?.unwrap_or(DEFAULT_QUEUE),
    };
    let batch = match args.batch_size {
        Some(b) => b,
        None => num_var(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE")?.unwrap_or(DEFAULT_BATCH),
    };
    let delay = match args.batch_delay {
        Some(d) => d,
        None => ms_var(env, &["OTEL_BSP_SCHEDULE_DELAY"])?.unwrap_or(DEFAULT_DELAY),
    };
    if queue == 0 {
        return Err(invalid("batch queue size", "0", "at least 1"));
    }
    if batch == 0 || batch > queue {
        return Err(invalid("batch size", &batch.to_string(), "between 1 and the queue size"));
    }
    let service_name = args.service_name.clone();
    let env_service_name = first(env, &["OTEL_SERVICE_NAME"]).map(|(_, v)| v);
    let resource_attrs = match first(env, &["OTEL_RESOURCE_ATTRIBUTES"]) {
        Some((k, v)) => parse_kv_list(k, &v)?,
        None => Vec::new(),
    };
    let name = args.sampler.clone().map(|v| ("--sampler", v)).or_else(|| first(env, &["OTEL_TRACES_SAMPLER"]));
    let sampler = match name {
        None => Sampler::AlwaysOn,
        Some((name_key, name)) => {
            let arg = args.sampler_arg.clone().map(|v| ("--sampler-arg", v)).or_else(|| first(env, &["OTEL_TRACES_SAMPLER_ARG"]));
            Sampler::parse(&name, arg.as_ref().map(|(_, v)| v.as_str())).map_err(|(which, expected)| {
                if which == "OTEL_TRACES_SAMPLER" {
                    invalid(name_key, &name, expected)
                } else {
                    let (k, v) = arg.clone().unwrap_or(("OTEL_TRACES_SAMPLER_ARG", String::new()));
                    invalid(k, &v, expected)
                }
            })?
        }
    };
    let metrics_on = match args.metrics {
        Some(m) => m == OnOff::On,
        None => match first(env, &["OTEL_METRICS_EXPORTER"]) {
            None => true,
            Some((_, v)) if v == "otlp" => true,
            Some((_, v)) if v == "none" => false,
            Some((k, v)) => return Err(invalid(k, &v, "otlp or none")),
        },
    };
    let metrics_interval = if metrics_on && exporter == Exporter::Otlp {
        Some(crate::export::metrics::interval(env).map_err(|v| invalid("OTEL_METRIC_EXPORT_INTERVAL", &v, "milliseconds, at least 100"))?)
    } else {
        None
    };
    let profiles_on = match args.profiles {
        Some(p) => p == OnOff::On,
        None => match first(env, &["ZEROTRACE_PROFILES"]) {
            None => true,
            Some((_, v)) if v == "on" => true,
            Some((_, v)) if v == "off" => false,
            Some((k, v)) => return Err(invalid(k, &v, "on or off")),
        },
    };
    let profile = (profiles_on && exporter == Exporter::Otlp).then_some(ProfileSettings {
        frequency: args.profile_frequency,
        otlp: true,
        duration: None,
        pprof: None,
        flamegraph: None,
    });
    let exe_globs =
        args.exe.iter().map(|g| glob::Pattern::new(g).map_err(|e| invalid("--exe", g, leak(format!("a glob ({e})"))))).collect::<Result<Vec<_>, _>>()?;
    Ok(RunSettings {
        pids: args.pids.clone(),
        control_socket: (args.control_socket != "off").then(|| args.control_socket.clone().into()),
        control_tcp: args.control_tcp,
        control_token: args.control_token.clone(),
        health_listen: args.health_listen,
        cri_socket: args.cri_socket.clone(),
        k8s_well_known_labels: args.k8s_well_known_labels == OnOff::On,
        selection: std::sync::Arc::new(crate::model::select::Selection {
            exclude_exe: args
                .exclude_exe
                .iter()
                .map(|g| glob::Pattern::new(g).map_err(|e| invalid("--exclude-exe", g, leak(format!("a glob ({e})")))))
                .collect::<Result<Vec<_>, _>>()?,
            include_namespaces: args.include_namespace.clone(),
            exclude_namespaces: args.exclude_namespace.clone(),
            exclude_pod_labels: args
                .exclude_pod_label
                .iter()
                .map(|l| l.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())).ok_or_else(|| invalid("--exclude-pod-label", l, "KEY=VALUE")))
                .collect::<Result<Vec<_>, _>>()?,
            exclude_containers: args.exclude_container.clone(),
        }),
        metrics_interval,
        exe_globs,
        ports: args.port.clone(),
        all: args.all,
        sampler,
        print: args.print,
        tail: None,
        export: ExportSettings { exporter, protocol, endpoint, headers, timeout, queue, batch, delay, tls: resolve_tls(env)? },
        service_name,
        env_service_name,
        resource_attrs,
        go_http_probes: args.go_http_probes,
        go_causality: GoCausality { spawns: args.go_spawns == OnOff::On, channels: args.go_channels == OnOff::On },
        go_tls: args.go_tls == OnOff::On,
        native_parents: args.native_parents,
        kernel: KernelSettings {
            req_capture: args.capture_bytes,
            max_conns: args.max_connections,
            hooks: args.socket_hooks,
            inject: args.inject_traceparent,
            sampler: sampler.kernel_rule(),
        },
        guard: crate::probes::guard::GuardSettings {
            cpu_budget: (args.cpu_budget > 0.0).then_some(args.cpu_budget),
            memory_limit: match args.memory_limit {
                crate::cli::MemoryLimit::Auto => crate::probes::guard::cgroup_memory_default(),
                crate::cli::MemoryLimit::Off => None,
                crate::cli::MemoryLimit::Bytes(b) => Some(b),
            },
        },
        stats_interval: args.stats_interval,
        stats_file: args.stats_file.clone(),
        record: args.record.clone(),
        profile,
    })
}

fn resolve_endpoint(flag: Option<&str>, protocol: Protocol, env: &dyn Fn(&str) -> Option<String>) -> Result<String, SettingsError> {
    let (key, url, append_path) = if let Some(f) = flag {
        ("--otlp-endpoint", f.to_owned(), false)
    } else if let Some((k, v)) = first(env, &["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]) {
        (k, v, false)
    } else if let Some((k, v)) = first(env, &["OTEL_EXPORTER_OTLP_ENDPOINT"]) {
        (k, v, protocol == Protocol::HttpProtobuf)
    } else {
        return Ok(match protocol {
            Protocol::Grpc => "http://localhost:4317".to_owned(),
            Protocol::HttpProtobuf => "http://localhost:4318/v1/traces".to_owned(),
        });
    };
    let rest = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://"));
    if rest.is_none_or(str::is_empty) {
        return Err(invalid(key, &url, "a URL such as http://collector:4317 or https://collector:4317"));
    }
    Ok(if append_path { format!("{}/v1/traces", url.trim_end_matches('/')) } else { url })
}

fn num_var(env: &dyn Fn(&str) -> Option<String>, key: &'static str) -> Result<Option<usize>, SettingsError> {
    match first(env, &[key]) {
        None => Ok(None),
        Some((k, v)) => v.parse().map(Some).map_err(|_| invalid(k, &v, "a whole number")),
    }
}

fn ms_var(env: &dyn Fn(&str) -> Option<String>, keys: &[&'static str]) -> Result<Option<Duration>, SettingsError> {
    match first(env, keys) {
        None => Ok(None),
        Some((k, v)) => v.parse::<u64>().map(|ms| Some(Duration::from_millis(ms))).map_err(|_| invalid(k, &v, "milliseconds, a whole number")),
    }
}

/// "k=v,k2=v2" as in OTEL_EXPORTER_OTLP_HEADERS and OTEL_RESOURCE_ATTRIBUTES.
pub fn parse_kv_list(key: &'static str, s: &str) -> Result<Vec<(String, String)>, SettingsError> {
    crate::otel_env::kv_list(s).ok_or_else(|| invalid(key, s, "a list of key=value pairs separated by commas"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::collections::HashMap;

    fn args(extra: &[&str]) -> RunArgs {
        let mut v = vec!["zerotrace", "run", "--pid", "1"];
        v.extend_from_slice(extra);
        match crate::cli::Cli::parse_from(v).command {
            crate::cli::Command::Run(a) => a,
            _ => unreachable!(),
        }
    }

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn defaults() {
        let s = resolve(&args(&[]), &env(&[])).unwrap();
        assert_eq!(s.export.endpoint, "http://localhost:4317");
        assert_eq!(s.export.protocol, Protocol::Grpc);
        assert_eq!((s.export.queue, s.export.batch, s.export.delay), (8192, 512, Duration::from_secs(5)));
        assert_eq!(s.export.exporter, Exporter::Otlp);
    }

    #[test]
    fn env_endpoints_follow_the_spec() {
        let e = env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318/"), ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")]);
        assert_eq!(resolve(&args(&[]), &e).unwrap().export.endpoint, "http://c:4318/v1/traces");
        let e = env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"), ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:9/x")]);
        assert_eq!(resolve(&args(&[]), &e).unwrap().export.endpoint, "http://t:9/x");
        // A flag beats the environment.
        let s = resolve(&args(&["--otlp-endpoint", "http://f:1"]), &e).unwrap();
        assert_eq!(s.export.endpoint, "http://f:1");
    }

    #[test]
    fn headers_resource_and_service() {
        let e = env(&[
            ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=a%20b, x=1"),
            ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=prod,team=core"),
            ("OTEL_SERVICE_NAME", "shop"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "100"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "10"),
            ("OTEL_BSP_SCHEDULE_DELAY", "250"),
        ]);
        let s = resolve(&args(&[]), &e).unwrap();
        assert_eq!(s.export.headers, vec![("api-key".into(), "a b".into()), ("x".into(), "1".into())]);
        assert_eq!(s.resource_attrs[0], ("deployment.environment".into(), "prod".into()));
        assert_eq!(s.env_service_name.as_deref(), Some("shop"));
        assert_eq!(s.service_name, None);
        assert_eq!((s.export.queue, s.export.batch, s.export.delay), (100, 10, Duration::from_millis(250)));
        let s = resolve(&args(&["--service-name", "flag"]), &e).unwrap();
        assert_eq!(s.service_name.as_deref(), Some("flag"));
    }

    #[test]
    fn tls_endpoints_and_certificates() {
        let dir = std::env::temp_dir().join(format!("zt-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, b"-----BEGIN CERTIFICATE-----\n").unwrap();
        let ca = ca.to_string_lossy().into_owned();
        let pairs = [("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c:4317"), ("OTEL_EXPORTER_OTLP_CERTIFICATE", ca.as_str())];
        let e = env(&pairs);
        let s = resolve(&args(&[]), &e).unwrap();
        assert_eq!(s.export.endpoint, "https://c:4317");
        assert!(s.export.tls.ca.is_some() && s.export.tls.client_cert.is_none());
        let e = env(&[("OTEL_EXPORTER_OTLP_CERTIFICATE", "/nonexistent/ca.pem")]);
        assert!(resolve(&args(&[]), &e).unwrap_err().to_string().contains("OTEL_EXPORTER_OTLP_CERTIFICATE"));
        // A client certificate needs its key.
        let pairs = [("OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE", ca.as_str())];
        let e = env(&pairs);
        assert!(resolve(&args(&[]), &e).is_err());
        assert!(resolve(&args(&["--otlp-endpoint", "ftp://x"]), &env(&[])).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn invalid_values_name_the_key() {
        let cases: &[(&str, &str)] = &[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "thrift"),
            ("OTEL_TRACES_EXPORTER", "zipkin"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "lots"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "novalue"),
        ];
        for (k, v) in cases {
            let err = resolve(&args(&[]), &env(&[(k, v)])).unwrap_err();
            assert!(err.to_string().contains(k), "{err}");
        }
        let err = resolve(&args(&["--batch-size", "10000"]), &env(&[])).unwrap_err();
        assert!(err.to_string().contains("batch size"), "{err}");
    }
}
