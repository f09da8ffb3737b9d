//! The OpenTelemetry semantic conventions registry, read from its own model YAML (v1.44.0,
//! committed unmodified under `v1.44.0/`), and the rules zerotrace's exported attributes
//! must follow: a key is a registry key that is not deprecated, of the registry's type, with
//! one of its enum values when the registry lists them; or it is in zerotrace's own
//! namespace (`zerotrace.*`, documented in docs/attributes.md). Used by the agent's unit test
//! (every key the code declares) and the end-to-end suite (every key a receiver got).
use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
};

use serde::Deserialize;

/// The registry version the files under `v1.44.0/` come from.
pub const VERSION: &str = "1.44.0";

/// Enumerations whose listed values are examples, not the whole set: `error.type` is the
/// failure's own code (an HTTP status, a gRPC code's name) and `_OTHER` only when there is
/// none (semantic conventions, "Recording errors").
pub const OPEN_ENUMS: &[&str] = &["error.type"];

/// zerotrace's own attribute namespace.
pub const OWN_PREFIX: &str = "zerotrace.";

/// The value type of an attribute, as the registry names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Type {
    Str,
    Int,
    Double,
    Bool,
    StrArray,
    IntArray,
    DoubleArray,
    BoolArray,
    /// A type the checker does not compare (`any`, maps).
    Other,
}

impl Type {
    fn parse(s: &str) -> Type {
        // `template[string]` keys are prefixes (`<key>.<name>`) with values of that type.
        let s = s.strip_prefix("template[").and_then(|t| t.strip_suffix(']')).unwrap_or(s);
        match s {
            "string" => Type::Str,
            "int" => Type::Int,
            "double" => Type::Double,
            "boolean" => Type::Bool,
            "string[]" => Type::StrArray,
            "int[]" => Type::IntArray,
            "double[]" => Type::DoubleArray,
            "boolean[]" => Type::BoolArray,
            _ => Type::Other,
        }
    }
}

/// One attribute of the registry.
#[derive(Clone, Debug)]
pub struct Attribute {
    pub key: String,
    pub ty: Type,
    /// An enum's values (strings, or integers written as strings); empty when free-form.
    pub members: Vec<String>,
    /// Why it is deprecated (e.g. "renamed to rpc.system.name"), when it is.
    pub deprecated: Option<String>,
    /// `template[...]`: the key is a prefix.
    pub template: bool,
}

/// One metric of the registry.
#[derive(Clone, Debug)]
pub struct Metric {
    pub name: String,
    pub instrument: String,
    pub unit: String,
    pub deprecated: Option<String>,
}

/// What is wrong with an exported attribute or metric.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem(pub String);

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub struct Registry {
    pub attributes: BTreeMap<String, Attribute>,
    pub metrics: BTreeMap<String, Metric>,
}

#[derive(Deserialize)]
struct File {
    #[serde(default)]
    groups: Vec<Group>,
    /// `file_format: definition/2` files list attributes at the top, keyed by `key`.
    #[serde(default)]
    attributes: Vec<Entry>,
}

#[derive(Deserialize)]
struct Group {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    attributes: Vec<Entry>,
    #[serde(default)]
    metric_name: Option<String>,
    #[serde(default)]
    instrument: Option<String>,
    #[serde(default)]
    unit: Option<String>,
    #[serde(default)]
    deprecated: Option<Deprecated>,
}

#[derive(Deserialize)]
struct Entry {
    /// Set where the attribute is defined (`ref` entries only refer to one); `key` in
    /// definition/2 files.
    #[serde(default, alias = "key")]
    id: Option<String>,
    #[serde(default, rename = "type")]
    ty: Option<TypeSpec>,
    #[serde(default)]
    deprecated: Option<Deprecated>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TypeSpec {
    Simple(String),
    Enum { members: Vec<Member> },
}

#[derive(Deserialize)]
struct Member {
    value: Scalar,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Scalar {
    Int(i64),
    Double(f64),
    Bool(bool),
    Str(String),
}

impl Scalar {
    fn text(&self) -> String {
        match self {
            Scalar::Int(i) => i.to_string(),
            Scalar::Double(d) => d.to_string(),
            Scalar::Bool(b) => b.to_string(),
            Scalar::Str(s) => s.clone(),
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Deprecated {
    Text(String),
    Detail {
        #[serde(default)]
        reason: Option<String>,
        #[serde(default)]
        renamed_to: Option<String>,
        #[serde(default)]
        note: Option<String>,
    },
}

impl Deprecated {
    fn describe(&self) -> String {
        match self {
            Deprecated::Text(t) => t.trim().to_owned(),
            Deprecated::Detail { reason, renamed_to, note } => match (renamed_to, note) {
                (Some(to), _) => format!("renamed to {to}"),
                (None, Some(n)) => n.trim().to_owned(),
                (None, None) => reason.clone().unwrap_or_else(|| "deprecated".into()),
            },
        }
    }
}

/// The directory of the committed model.
pub fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("v1.44.0/model")
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            yaml_files(&p, out)?;
        } else if p.extension().is_some_and(|x| x == "yaml") {
            out.push(p);
        }
    }
    Ok(())
}

impl Registry {
    /// Reads every YAML file of the committed model.
    pub fn load() -> Result<Registry, String> {
        Self::load_from(&model_dir())
    }

    pub fn load_from(dir: &Path) -> Result<Registry, String> {
        let mut files = Vec::new();
        yaml_files(dir, &mut files).map_err(|e| format!("{}: {e}", dir.display()))?;
        files.sort();
        let mut attributes = BTreeMap::new();
        let mut metrics = BTreeMap::new();
        for path in &files {
            let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let file: File = serde_saphyr::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            let top = Group { kind: None, attributes: file.attributes, metric_name: None, instrument: None, unit: None, deprecated: None };
            for g in file.groups.into_iter().chain([top]) {
                if g.kind.as_deref() == Some("metric")
                    && let Some(name) = g.metric_name
                {
                    let deprecated = g.deprecated.as_ref().map(Deprecated::describe);
                    metrics.insert(name.clone(), Metric { name, instrument: g.instrument.unwrap_or_default(), unit: g.unit.unwrap_or_default(), deprecated });
                }
                for a in g.attributes {
                    let Some(key) = a.id else { continue };
                    let (ty, members, template) = match &a.ty {
                        Some(TypeSpec::Simple(s)) => (Type::parse(s), Vec::new(), s.starts_with("template[")),
                        Some(TypeSpec::Enum { members }) => {
                            let values: Vec<String> = members.iter().map(|m| m.value.text()).collect();
                            let ty = if members.iter().all(|m| matches!(m.value, Scalar::Int(_))) { Type::Int } else { Type::Str };
                            (ty, values, false)
                        }
                        None => (Type::Other, Vec::new(), false),
                    };
                    let deprecated = a.deprecated.as_ref().map(Deprecated::describe);
                    attributes.insert(key.clone(), Attribute { key, ty, members, deprecated, template });
                }
            }
        }
        if attributes.len() < 500 {
            return Err(format!("only {} attributes read from {}: the model is incomplete", attributes.len(), dir.display()));
        }
        Ok(Registry { attributes, metrics })
    }

    /// The registry's definition of `key`: the attribute itself, or the template it is a
    /// member of (`rpc.request.metadata.<key>`).
    pub fn attribute(&self, key: &str) -> Option<&Attribute> {
        self.attributes.get(key).or_else(|| self.attributes.values().find(|a| a.template && key.starts_with(&format!("{}.", a.key))))
    }

    /// Checks one exported attribute: key, type and (for enums) value. `value` is None when
    /// only the key and type are known (a declared key).
    pub fn check(&self, key: &str, ty: Type, value: Option<&str>) -> Result<(), Problem> {
        let Some(a) = self.attribute(key) else {
            if key.starts_with(OWN_PREFIX) {
                return Ok(());
            }
            return Err(Problem(format!("{key}: not in the semantic conventions registry v{VERSION} and not in the zerotrace.* namespace")));
        };
        if let Some(why) = &a.deprecated {
            return Err(Problem(format!("{key}: deprecated in the registry v{VERSION} ({why})")));
        }
        if a.ty != Type::Other && a.ty != ty {
            return Err(Problem(format!("{key}: exported as {ty:?}, the registry says {:?}", a.ty)));
        }
        if let Some(v) = value
            && !a.members.is_empty()
            && !OPEN_ENUMS.contains(&key)
            && !a.members.iter().any(|m| m == v)
        {
            return Err(Problem(format!("{key}: value {v:?} is not one of the registry's values {:?}", a.members)));
        }
        Ok(())
    }

    /// Checks an exported metric name: a registry metric that is not deprecated, or one of
    /// zerotrace's own (`zerotrace_` counters, `zerotrace.` names).
    pub fn check_metric(&self, name: &str, unit: Option<&str>) -> Result<(), Problem> {
        if name.starts_with("zerotrace_") || name.starts_with(OWN_PREFIX) {
            return Ok(());
        }
        let Some(m) = self.metrics.get(name) else {
            return Err(Problem(format!("metric {name}: not in the registry v{VERSION} and not zerotrace's own")));
        };
        if let Some(why) = &m.deprecated {
            return Err(Problem(format!("metric {name}: deprecated ({why})")));
        }
        if let Some(u) = unit
            && u != m.unit
        {
            return Err(Problem(format!("metric {name}: unit {u:?}, the registry says {:?}", m.unit)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_reads_and_knows_what_changed() {
        let r = Registry::load().unwrap();
        assert!(r.attributes.len() > 800, "{}", r.attributes.len());
        assert!(r.check("http.request.method", Type::Str, Some("GET")).is_ok());
        assert!(r.check("http.request.method", Type::Str, Some("BREW")).is_err(), "not an enum value");
        assert!(r.check("http.response.status_code", Type::Str, None).is_err(), "an int");
        assert!(r.check("rpc.system", Type::Str, Some("grpc")).unwrap_err().0.contains("renamed to rpc.system.name"));
        assert!(r.check("rpc.grpc.status_code", Type::Int, None).is_err());
        assert!(r.check("rpc.service", Type::Str, None).is_err());
        assert!(r.check("go.goroutine.id", Type::Int, None).unwrap_err().0.contains("not in the semantic conventions registry"));
        assert!(r.check("zerotrace.cpu.samples", Type::Int, None).is_ok());
        assert!(r.check("rpc.request.metadata.x-id", Type::StrArray, None).is_ok(), "a template member");
        assert!(r.check("rpc.system.name", Type::Str, Some("grpc")).is_ok());
        assert!(r.check("error.type", Type::Str, Some("404")).is_ok(), "an open enumeration");
        assert!(r.check("rpc.response.status_code", Type::Str, Some("NOT_FOUND")).is_ok());
        assert!(r.check_metric("http.server.request.duration", Some("s")).is_ok());
        assert!(r.check_metric("http.server.duration", None).is_err());
        assert!(r.check_metric("zerotrace_spans_assembled", None).is_ok());
    }
}
