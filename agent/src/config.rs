//! The configuration file (`--config FILE` or `ZEROTRACE_CONFIG`): TOML whose keys are the
//! long names of the `run`/`tail` options (`otlp-endpoint = "http://c:4317"`, `exe =
//! ["*/shop"]`, `go-spawns = "off"`, `print = true`). Precedence, highest first: command-line
//! flags, environment variables (`OTEL_*` where OpenTelemetry defines one), the file,
//! defaults. A file value becomes the flag it names when neither the command line nor the
//! environment set that option; the flag's own parser then checks it, so one rule decides
//! what a valid value is. Unknown keys, tables and values of the wrong shape are errors that
//! name the key.
use std::path::{Path, PathBuf};

use clap::{Args, Command};

use crate::cli::{RunArgs, TailArgs};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("cannot read the config file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("config file {path}: {reason}")]
    Invalid { path: String, reason: String },
}

/// Environment variables that set the same option as a key (they win over the file).
const ENV_OF: &[(&str, &[&str])] = &[
    ("exporter", &["OTEL_TRACES_EXPORTER"]),
    ("otlp-endpoint", &["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"]),
    ("otlp-protocol", &["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"]),
    ("otlp-headers", &["OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS"]),
    ("otlp-timeout", &["OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"]),
    ("service-name", &["OTEL_SERVICE_NAME"]),
    ("batch-queue", &["OTEL_BSP_MAX_QUEUE_SIZE"]),
    ("batch-size", &["OTEL_BSP_MAX_EXPORT_BATCH_SIZE"]),
    ("batch-delay", &["OTEL_BSP_SCHEDULE_DELAY"]),
    ("sampler", &["OTEL_TRACES_SAMPLER"]),
    ("sampler-arg", &["OTEL_TRACES_SAMPLER_ARG"]),
    ("metrics", &["OTEL_METRICS_EXPORTER"]),
];

/// The environment variables of `key`, if OpenTelemetry defines some.
pub fn env_of(key: &str) -> &'static [&'static str] {
    ENV_OF.iter().find(|(k, _)| *k == key).map_or(&[], |(_, v)| v)
}

/// One option the file sets: its key and the command-line words it stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    /// The value as the flag would take it (several for lists; empty for a false switch).
    pub values: Vec<String>,
    /// A switch (`print = true`): the flag alone.
    pub switch: bool,
}

#[derive(Clone, Debug)]
pub struct FileConfig {
    pub path: PathBuf,
    pub entries: Vec<Entry>,
}

/// The long options of `run` and `tail` (what the file may set), and which are switches.
fn known(subcommand: &str) -> Vec<(String, bool)> {
    let cmd = if subcommand == "tail" { TailArgs::augment_args(Command::new("tail")) } else { RunArgs::augment_args(Command::new("run")) };
    cmd.get_arguments()
        .filter_map(|a| {
            let long = a.get_long()?.to_owned();
            let switch = matches!(a.get_action(), clap::ArgAction::SetTrue);
            Some((long, switch))
        })
        .collect()
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read { path: path.display().to_string(), reason: e.to_string() })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let bad = |reason: String| ConfigError::Invalid { path: path.display().to_string(), reason };
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| bad(e.message().to_owned()))?;
        let all = known("tail");
        let mut entries = Vec::new();
        for (key, value) in table {
            let Some((_, switch)) = all.iter().find(|(k, _)| *k == key) else {
                let mut names: Vec<&str> = all.iter().map(|(k, _)| k.as_str()).filter(|k| *k != "config").collect();
                names.sort_unstable();
                return Err(bad(format!("unknown key {key:?}; the keys are the long option names: {}", names.join(", "))));
            };
            let scalar = |v: &toml::Value| -> Result<String, ConfigError> {
                match v {
                    toml::Value::String(s) => Ok(s.clone()),
                    toml::Value::Integer(i) => Ok(i.to_string()),
                    toml::Value::Float(f) => Ok(f.to_string()),
                    toml::Value::Boolean(b) => Ok(if *b { "on" } else { "off" }.to_owned()),
                    other => Err(bad(format!("{key}: expected a string, number or boolean, found {}", other.type_str()))),
                }
            };
            let entry = match (&value, switch) {
                (toml::Value::Boolean(b), true) => Entry { key: key.clone(), values: Vec::new(), switch: *b },
                (_, true) => return Err(bad(format!("{key}: expected true or false, found {}", value.type_str()))),
                (toml::Value::Array(items), false) => Entry { key: key.clone(), values: items.iter().map(scalar).collect::<Result<_, _>>()?, switch: false },
                (v, false) => Entry { key: key.clone(), values: vec![scalar(v)?], switch: false },
            };
            entries.push(entry);
        }
        Ok(Self { path: path.to_owned(), entries })
    }

    /// The command-line words for the entries that apply to `subcommand` and that neither
    /// the command line (`on_cli`) nor the environment (`env`) set.
    pub fn args(&self, subcommand: &str, on_cli: &dyn Fn(&str) -> bool, env: &dyn Fn(&str) -> Option<String>) -> Vec<String> {
        let valid = known(subcommand);
        let mut out = Vec::new();
        for e in &self.entries {
            if !valid.iter().any(|(k, _)| *k == e.key) || on_cli(&e.key) || env_of(&e.key).iter().any(|v| env(v).is_some_and(|x| !x.trim().is_empty())) {
                continue;
            }
            if e.switch {
                out.push(format!("--{}", e.key));
            }
            for v in &e.values {
                out.push(format!("--{}={v}", e.key));
            }
        }
        out
    }

    /// `zerotrace config --print`: every option the file sets, what decides it in the end.
    pub fn render(&self, env: &dyn Fn(&str) -> Option<String>) -> String {
        let mut out = format!("# configuration from {} (flags on a command line still win)\n", self.path.display());
        for e in &self.entries {
            let value = if e.switch || (e.values.is_empty()) {
                e.switch.to_string()
            } else if e.values.len() == 1 {
                format!("{:?}", e.values[0])
            } else {
                format!("[{}]", e.values.iter().map(|v| format!("{v:?}")).collect::<Vec<_>>().join(", "))
            };
            match env_of(&e.key).iter().find_map(|v| env(v).filter(|x| !x.trim().is_empty()).map(|x| (*v, x))) {
                Some((var, x)) => out.push_str(&format!("# {} = {value}  (overridden by {var}={x:?})\n", e.key)),
                None => out.push_str(&format!("{} = {value}\n", e.key)),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<FileConfig, ConfigError> {
        FileConfig::parse(Path::new("z.toml"), text)
    }

    #[test]
    fn keys_become_flags_below_the_command_line_and_the_environment() {
        let c =
            parse("exe = [\"*/shop\", \"catalog\"]\notlp-endpoint = \"http://c:4317\"\nbatch-delay = \"1s\"\ngo-spawns = false\nprint = true\nerrors = true\n")
                .unwrap();
        let none = |_: &str| None;
        assert_eq!(
            c.args("run", &|_| false, &none),
            ["--batch-delay=1s", "--exe=*/shop", "--exe=catalog", "--go-spawns=off", "--otlp-endpoint=http://c:4317", "--print"],
            "`errors` is a tail option: not for run (keys in name order)"
        );
        assert!(c.args("tail", &|_| false, &none).contains(&"--errors".to_owned()));
        let cli = |k: &str| k == "batch-delay";
        let env = |v: &str| (v == "OTEL_EXPORTER_OTLP_ENDPOINT").then(|| "http://env:4317".to_owned());
        assert_eq!(c.args("run", &cli, &env), ["--exe=*/shop", "--exe=catalog", "--go-spawns=off", "--print"]);
        let r = c.render(&env);
        assert!(r.contains("# otlp-endpoint = \"http://c:4317\"  (overridden by OTEL_EXPORTER_OTLP_ENDPOINT=\"http://env:4317\")"), "{r}");
        assert!(r.contains("exe = [\"*/shop\", \"catalog\"]"), "{r}");
    }

    #[test]
    fn mistakes_name_the_key() {
        let e = parse("otlp-endpiont = \"x\"").unwrap_err().to_string();
        assert!(e.contains("unknown key \"otlp-endpiont\"") && e.contains("otlp-endpoint"), "{e}");
        let e = parse("print = \"yes\"").unwrap_err().to_string();
        assert!(e.contains("print: expected true or false"), "{e}");
        let e = parse("[otlp]\nendpoint = \"x\"").unwrap_err().to_string();
        assert!(e.contains("unknown key \"otlp\""), "{e}");
        let e = parse("exe = [[1]]").unwrap_err().to_string();
        assert!(e.contains("exe: expected a string, number or boolean"), "{e}");
        let e = parse("pid = ").unwrap_err().to_string();
        assert!(e.starts_with("config file z.toml: "), "{e}");
    }
}
