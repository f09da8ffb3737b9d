//! Command-line interface (raw arguments only): clap parses them, `settings` resolves and
//! validates them into `run::RunSettings` before anything starts. The option types belong to
//! the stages that read them; this module only names them on the command line.
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{
    correlate::NativeParents,
    export::{Exporter, Protocol},
    probes::{Inject, SocketHooks, go::GoHttpProbes},
};

#[derive(Parser, Debug)]
#[command(
    name = "zerotrace",
    version,
    about = "Traces running Go and Rust programs with zero code changes: eBPF probes -> span trees and CPU profiles -> OTLP",
    long_about = None,
)]
pub struct Cli {
    /// Log filter for the agent's own diagnostics (e.g. info, debug, zerotrace=trace).
    #[arg(long, global = true, env = "ZEROTRACE_LOG", default_value = "info")]
    pub log: String,
    /// A TOML file of run/tail options, keyed by their long names (see README: flags win,
    /// then environment variables, then this file).
    #[arg(long, global = true, env = "ZEROTRACE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Check what this kernel and this process's privileges allow, one line each.
    Doctor(DoctorArgs),
    /// Attach to running processes and trace them until SIGINT/SIGTERM.
    Run(RunArgs),
    /// Trace processes and watch their traces live in the terminal, as trees (or JSON, one
    /// span per line). Takes every `run` option; exports over OTLP only when an endpoint
    /// or exporter is given.
    Tail(TailArgs),
    /// Profile the CPU of running processes for a while and write a pprof profile (and/or
    /// an SVG flame graph): which functions burned the CPU, and in which span. Takes every
    /// `run` option; exports spans and profiles over OTLP only when an endpoint or exporter
    /// is given.
    Profile(ProfileArgs),
    /// Show what the configuration file sets, and which settings the environment overrides.
    Config(ConfigArgs),
    /// What a running agent traces, and its counters (through its control socket).
    Status(StatusArgs),
    /// Replays a `--record` recording through decode, correlate and OTLP encoding in this
    /// process and prints the throughput as JSON (`cargo xtask bench pipeline`).
    #[command(hide = true)]
    Replay(ReplayArgs),
}

#[derive(Args, Debug, Clone)]
pub struct ReplayArgs {
    /// The recording (`zerotrace run --record FILE`).
    pub file: PathBuf,
    /// Times the recording is replayed (each with a fresh correlator).
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Stop after the correlator (no OTLP encoding): the cost of decode + correlate alone.
    #[arg(long)]
    pub no_encode: bool,
    /// Instead: send the recording's spans through the OTLP/gRPC exporter to this endpoint,
    /// offered at --rate spans/s for --seconds (the recording's spans over and over), with
    /// the default queue and batch; prints what was exported and dropped.
    #[arg(long, value_name = "URL")]
    pub export_to: Option<String>,
    /// Spans offered per second with --export-to.
    #[arg(long, default_value_t = 200_000)]
    pub rate: u64,
    /// Seconds of offering with --export-to.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
}

#[derive(Args, Debug, Clone)]
pub struct DoctorArgs {
    /// Also load every kernel program this kernel can run (nothing is attached) and say
    /// which the verifier accepts, with the time it took.
    #[arg(long)]
    pub programs: bool,
}

#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    /// The agent's control socket (a path, or tcp://HOST:PORT with --token).
    #[arg(long, value_name = "SOCKET", default_value = crate::control::DEFAULT_SOCKET)]
    pub connect: PathBuf,
    /// The token of a TCP control service.
    #[arg(long, env = "ZEROTRACE_CONTROL_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct ConfigArgs {
    /// Print the options the file sets (the default and only action for now).
    #[arg(long)]
    pub print: bool,
}

#[derive(Args, Debug, Clone)]
pub struct TailArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Only traces with a span of this service (repeat for several).
    #[arg(long, value_name = "NAME")]
    pub service: Vec<String>,
    /// Only traces with a span whose name matches this glob (e.g. 'GET /users/*').
    #[arg(long, value_name = "GLOB")]
    pub name: Option<String>,
    /// Only traces with a span at least this long (e.g. 50ms).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub min_duration: Option<std::time::Duration>,
    /// Only traces with an error span.
    #[arg(long)]
    pub errors: bool,
    /// Only the trace whose id starts with this (hex).
    #[arg(long, value_name = "HEX")]
    pub trace_id: Option<String>,
    /// Only traces with a span that has attribute K equal to V (repeat: all must hold).
    #[arg(long, value_name = "K=V")]
    pub attr: Vec<String>,
    /// One JSON object per span instead of trees (fields: see README).
    #[arg(long)]
    pub json: bool,
    /// Longest wait for a trace's root span before the trace is printed anyway.
    #[arg(long, value_parser = parse_duration, default_value = "2s", value_name = "DURATION")]
    pub wait: std::time::Duration,
}

#[derive(Args, Debug, Clone)]
pub struct ProfileArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// How long to profile (SIGINT ends it earlier; the profile is written either way).
    #[arg(long, value_parser = parse_duration, default_value = "30s", value_name = "DURATION")]
    pub duration: std::time::Duration,
    /// Samples per second per CPU (19 is cheap; 99 for short runs).
    #[arg(long, value_name = "HZ", value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub frequency: Option<u64>,
    /// Where to write the pprof profile (gzipped protobuf, as `go tool pprof` reads)
    /// [default: cpu.pb.gz unless only --flamegraph is given].
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Also (or only) write an SVG flame graph.
    #[arg(long, value_name = "FILE")]
    pub flamegraph: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Process to trace (repeat for several). It keeps running; nothing in it changes.
    #[arg(long = "pid", required_unless_present_any = ["exe", "port", "all", "connect"], value_name = "PID")]
    pub pids: Vec<u32>,

    /// Trace every process whose executable (full path or file name) matches this glob:
    /// those running now and those started later (attached at their exec; a restarted
    /// process is picked up again). Repeat for several.
    #[arg(long = "exe", value_name = "GLOB")]
    pub exe: Vec<String>,

    /// Trace the processes listening on this TCP port, now and later (checked every
    /// second). Repeat for several.
    #[arg(long = "port", value_name = "PORT")]
    pub port: Vec<u16>,

    /// Trace every process on the machine, now and later (Go programs in depth, native
    /// programs from their sockets).
    #[arg(long)]
    pub all: bool,

    /// The local control socket this agent serves (`tail --connect`, `status`); off: none.
    #[arg(long, value_name = "PATH|off", default_value = crate::control::DEFAULT_SOCKET)]
    pub control_socket: String,

    /// Also serve the control service on TCP at this address (e.g. 127.0.0.1:7171); clients
    /// must present --control-token.
    #[arg(long, value_name = "ADDR", requires = "control_token")]
    pub control_tcp: Option<std::net::SocketAddr>,

    /// The token TCP clients of the control service present (and `tail --connect
    /// tcp://...` sends).
    #[arg(long, env = "ZEROTRACE_CONTROL_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    pub control_token: Option<String>,

    /// Serve the health endpoints on this address (e.g. 0.0.0.0:8686): GET /healthz (the
    /// agent is alive), GET /readyz (probes attached and exporter healthy); JSON bodies.
    #[arg(long, env = "ZEROTRACE_HEALTH_LISTEN", value_name = "ADDR")]
    pub health_listen: Option<std::net::SocketAddr>,

    /// The container runtime's CRI socket, for pod, namespace and container names: a path,
    /// auto (containerd's, k3s's, CRI-O's, the first that exists) or off.
    #[arg(long, env = "ZEROTRACE_CRI_SOCKET", value_name = "PATH|auto|off", default_value = "auto")]
    pub cri_socket: String,

    /// Let the well-known `app.kubernetes.io/instance`, `/name` and `/version` pod labels set
    /// service.name and service.version (after the `resource.opentelemetry.io/*` annotations).
    #[arg(long, env = "ZEROTRACE_K8S_WELL_KNOWN_LABELS", value_enum, default_value = "off")]
    pub k8s_well_known_labels: OnOff,

    /// Never trace discovered processes whose executable (full path or file name) matches
    /// (e.g. the collector: otelcol*). Repeatable. A --pid is always traced.
    #[arg(long, value_name = "GLOB")]
    pub exclude_exe: Vec<String>,

    /// Trace only discovered processes in pods of this Kubernetes namespace (repeatable;
    /// processes outside pods are then left alone too).
    #[arg(long, value_name = "NAMESPACE")]
    pub include_namespace: Vec<String>,

    /// Never trace discovered processes in pods of this Kubernetes namespace. Repeatable.
    #[arg(long, value_name = "NAMESPACE")]
    pub exclude_namespace: Vec<String>,

    /// Never trace discovered processes in pods carrying this label. Repeatable.
    #[arg(long, value_name = "KEY=VALUE")]
    pub exclude_pod_label: Vec<String>,

    /// Never trace discovered processes in containers of this name (e.g. a sidecar). Repeatable.
    #[arg(long, value_name = "NAME")]
    pub exclude_container: Vec<String>,

    /// tail only: watch a running agent through its control socket instead of tracing
    /// (a path, or tcp://HOST:PORT with --control-token).
    #[arg(long, value_name = "SOCKET", num_args = 0..=1, default_missing_value = crate::control::DEFAULT_SOCKET)]
    pub connect: Option<PathBuf>,

    /// Also print each finished span as one line on stdout.
    #[arg(long)]
    pub print: bool,

    /// Where spans go [env: OTEL_TRACES_EXPORTER] [default: otlp].
    #[arg(long, value_enum)]
    pub exporter: Option<Exporter>,

    /// OTLP endpoint [env: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_EXPORTER_OTLP_ENDPOINT]
    /// [default: http://localhost:4317 for grpc, http://localhost:4318/v1/traces for http/protobuf].
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,

    /// OTLP protocol [env: OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, OTEL_EXPORTER_OTLP_PROTOCOL] [default: grpc].
    #[arg(long, value_enum)]
    pub otlp_protocol: Option<Protocol>,

    /// Extra OTLP headers as k=v,k2=v2 [env: OTEL_EXPORTER_OTLP_TRACES_HEADERS, OTEL_EXPORTER_OTLP_HEADERS].
    #[arg(long, value_name = "K=V,...")]
    pub otlp_headers: Option<String>,

    /// Timeout of one export request [env: OTEL_EXPORTER_OTLP_TIMEOUT in ms] [default: 10s].
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub otlp_timeout: Option<std::time::Duration>,

    /// service.name of every traced process [env: OTEL_SERVICE_NAME] [default: the executable's name].
    #[arg(long, value_name = "NAME")]
    pub service_name: Option<String>,

    /// Spans waiting for export at most; more are dropped and counted [env: OTEL_BSP_MAX_QUEUE_SIZE] [default: 8192].
    #[arg(long, value_name = "N")]
    pub batch_queue: Option<usize>,

    /// Spans per export request at most [env: OTEL_BSP_MAX_EXPORT_BATCH_SIZE] [default: 512].
    #[arg(long, value_name = "N")]
    pub batch_size: Option<usize>,

    /// Longest wait before a partial batch is sent [env: OTEL_BSP_SCHEDULE_DELAY in ms] [default: 5s].
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub batch_delay: Option<std::time::Duration>,

    /// How Go net/http server requests are observed.
    #[arg(long, value_enum, default_value = "conn")]
    pub go_http_probes: GoHttpProbes,

    /// Follow spans into goroutines spawned while they are active (a uprobe on newproc's
    /// CALL of runqput: one hit, ~3.5 us here, per `go` statement in the target).
    #[arg(long, value_enum, default_value = "on", value_name = "on|off")]
    pub go_spawns: OnOff,

    /// Follow spans over channels (uprobes on runtime.send/recv and the channel buffer
    /// CALLs: one hit per value that crosses a channel between goroutines).
    #[arg(long, value_enum, default_value = "on", value_name = "on|off")]
    pub go_channels: OnOff,

    /// Parent of a client request inside a process that is not Go: `one-open` (the
    /// process's server request, when exactly one is open: right for async runtimes such
    /// as tokio, which give no other safe clue) or `thread` (the server request the
    /// calling thread is serving: right for thread-per-request servers, wrong for async
    /// runtimes).
    #[arg(long, value_enum, default_value = "one-open", value_name = "one-open|thread")]
    pub native_parents: NativeParents,

    /// HTTPS server spans from crypto/tls plaintext (uprobes on two CALLs inside
    /// (*tls.Conn).Read and Write: one hit per TLS read or write that carries data).
    #[arg(long, value_enum, default_value = "on", value_name = "on|off")]
    pub go_tls: OnOff,

    /// Write a W3C traceparent header into outgoing Go net/http (HTTP/1) requests, so that
    /// services on other hosts continue the trace. Off by default: this is the only thing
    /// zerotrace writes into a target's memory (into the request writer's spare buffer
    /// space, never past it; nothing when the request already has a traceparent). Needs
    /// CAP_SYS_ADMIN and no kernel lockdown. `dry-run` decides and reports on each client
    /// span (attributes zerotrace.traceparent*) but writes nothing.
    #[arg(long, value_enum, num_args = 0..=1, default_value = "off", default_missing_value = "on", value_name = "on|dry-run|off")]
    pub inject_traceparent: Inject,

    /// RED metrics (request durations per route) and the agent's own counters over OTLP
    /// metrics, to the traces' collector, every OTEL_METRIC_EXPORT_INTERVAL ms (default
    /// 60000) [env: OTEL_METRICS_EXPORTER=otlp|none] [default: on when exporting].
    #[arg(long, value_enum, value_name = "on|off")]
    pub metrics: Option<OnOff>,

    /// CPU profiles of the traced processes over OTLP (the profiles signal), each sample
    /// labelled with its span, and `zerotrace.cpu.samples` on every span that got samples
    /// [env: ZEROTRACE_PROFILES=on|off] [default: on when exporting].
    #[arg(long, value_enum, value_name = "on|off")]
    pub profiles: Option<OnOff>,
    /// CPU samples per second per CPU for profiles.
    #[arg(long, default_value_t = 19, value_name = "HZ", value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub profile_frequency: u64,
    /// Trace sampler: always_on, always_off, traceidratio, parentbased_always_on,
    /// parentbased_always_off, parentbased_traceidratio [env: OTEL_TRACES_SAMPLER] [default: always_on].
    #[arg(long, value_name = "NAME")]
    pub sampler: Option<String>,

    /// The ratio of a ratio sampler, 0 to 1 [env: OTEL_TRACES_SAMPLER_ARG] [default: 1].
    #[arg(long, value_name = "RATIO")]
    pub sampler_arg: Option<String>,

    /// Bytes of each request head captured at the read syscall (64..=2048).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(64..=2048))]
    pub capture_bytes: u32,

    /// Sockets tracked at once across all traced processes.
    #[arg(long, default_value_t = zerotrace_common::bounds::MAX_CONNS, value_parser = clap::value_parser!(u32).range(64..=1_048_576))]
    pub max_connections: u32,

    /// CPU the agent and its probes may cost: its own CPU time plus its probes' hits on the
    /// targets (each uprobe hit at its cost measured at start), smoothed over 30 s. Over it,
    /// the kernel sheds new server requests (keeps 1 in 2, 4, ... 256; counted as
    /// requests_shed) until the cost is back under half of it. "50%" or "500m" (of one
    /// core), "1.5" (cores), or "off".
    #[arg(long, default_value = "50%", value_parser = parse_cpu, value_name = "CORES")]
    pub cpu_budget: f64,

    /// Anonymous memory (RssAnon) the agent may use; over it, it takes no new spans
    /// (spans_dropped_memory_limit, requests_shed) until it is back under 80 %. "256MiB",
    /// "512Mi", "1G", bytes, "off", or "auto": 80 % of its cgroup's memory limit, off when
    /// it has none.
    #[arg(long, default_value = "auto", value_parser = parse_memory, value_name = "BYTES")]
    pub memory_limit: MemoryLimit,

    /// Which kernel events the socket programs hang on: auto (the cheapest this kernel
    /// has: `zerotrace doctor` shows it), socket-btf or socket-raw (socket-layer
    /// tracepoints, Linux 6.16+), socket-fentry (fentry/fexit on TCP's send and receive
    /// functions, Linux 5.10+ where tracing programs are allowed), syscalls (the data
    /// syscalls' tracepoints, every kernel). The spans are the same whichever runs.
    #[arg(long, value_enum, default_value = "auto", env = "ZEROTRACE_SOCKET_HOOKS", value_name = "SET")]
    pub socket_hooks: SocketHooks,

    /// Print the agent's counters (events, drops, spans) every this often; 0 disables.
    #[arg(long, value_parser = parse_duration, default_value = "0s", value_name = "DURATION")]
    pub stats_interval: std::time::Duration,

    /// Where to write the agent's counters as JSON at exit (for benchmarks and tests).
    #[arg(long, value_name = "FILE")]
    pub stats_file: Option<PathBuf>,

    /// Write every kernel record to FILE as read (at most 256 MiB): for bug reports,
    /// `cargo xtask bench pipeline` and fuzzing corpora.
    #[arg(long, value_name = "FILE")]
    pub record: Option<PathBuf>,
}

/// `--memory-limit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryLimit {
    /// From the agent's cgroup.
    Auto,
    Off,
    Bytes(u64),
}

/// "50%", "500m" (millicores), "1.5" (cores), "off" (0).
pub fn parse_cpu(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let bad = || format!("invalid CPU budget {s:?}: use e.g. 50%, 500m, 1.5 or off");
    if t == "off" {
        return Ok(0.0);
    }
    let cores = if let Some(p) = t.strip_suffix('%') {
        p.trim().parse::<f64>().map_err(|_| bad())? / 100.0
    } else if let Some(m) = t.strip_suffix('m') {
        m.trim().parse::<f64>().map_err(|_| bad())? / 1000.0
    } else {
        t.parse::<f64>().map_err(|_| bad())?
    };
    if !cores.is_finite() || cores <= 0.0 || cores > 1024.0 {
        return Err(bad());
    }
    Ok(cores)
}

/// "256MiB", "512Mi", "1G", "1GB", a number of bytes, "auto" or "off".
pub fn parse_memory(s: &str) -> Result<MemoryLimit, String> {
    let t = s.trim();
    let bad = || format!("invalid memory limit {s:?}: use e.g. 256MiB, 512Mi, 1G, auto or off");
    match t {
        "auto" => return Ok(MemoryLimit::Auto),
        "off" => return Ok(MemoryLimit::Off),
        _ => {}
    }
    let i = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
    let n: f64 = t[..i].parse().map_err(|_| bad())?;
    let unit: f64 = match t[i..].trim() {
        "" | "B" => 1.0,
        "K" | "KB" | "k" | "kB" => 1e3,
        "Ki" | "KiB" => 1024.0,
        "M" | "MB" => 1e6,
        "Mi" | "MiB" => 1048576.0,
        "G" | "GB" => 1e9,
        "Gi" | "GiB" => 1073741824.0,
        _ => return Err(bad()),
    };
    let bytes = n * unit;
    // Below 16 MiB the agent cannot start its own pipeline.
    if !bytes.is_finite() || bytes < 16.0 * 1048576.0 {
        return Err(format!("invalid memory limit {s:?}: at least 16MiB"));
    }
    Ok(MemoryLimit::Bytes(bytes as u64))
}

/// "500ms", "5s", "2m", or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num.parse().map_err(|_| format!("invalid duration {s:?}: use e.g. 500ms, 5s, 2m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("invalid duration unit in {s:?}: use ms, s, m or h")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("invalid duration {s:?}"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap().as_millis(), 500);
        assert_eq!(parse_duration("5s").unwrap().as_secs(), 5);
        assert_eq!(parse_duration("2m").unwrap().as_secs(), 120);
        assert_eq!(parse_duration("3").unwrap().as_secs(), 3);
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn budgets_and_limits() {
        assert_eq!(parse_cpu("50%").unwrap(), 0.5);
        assert_eq!(parse_cpu("250m").unwrap(), 0.25);
        assert_eq!(parse_cpu("1.5").unwrap(), 1.5);
        assert_eq!(parse_cpu("off").unwrap(), 0.0);
        assert!(parse_cpu("0").is_err() && parse_cpu("-1").is_err() && parse_cpu("lots").is_err());
        assert_eq!(parse_memory("256MiB").unwrap(), MemoryLimit::Bytes(256 << 20));
        assert_eq!(parse_memory("512Mi").unwrap(), MemoryLimit::Bytes(512 << 20));
        assert_eq!(parse_memory("1G").unwrap(), MemoryLimit::Bytes(1_000_000_000));
        assert_eq!(parse_memory("auto").unwrap(), MemoryLimit::Auto);
        assert_eq!(parse_memory("off").unwrap(), MemoryLimit::Off);
        assert!(parse_memory("1MiB").is_err() && parse_memory("12 parsecs").is_err());
    }
}
