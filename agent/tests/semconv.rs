//! Every attribute and metric zerotrace exports follows the OpenTelemetry semantic
//! conventions registry v1.44 (its model YAML, tests/semconv/v1.44.0): each key the agent
//! declares (`zerotrace::attributes`) is a registry key that is not deprecated, of the
//! registry's type, with registry values where the registry lists them, or one of
//! zerotrace's own `zerotrace.*` keys, documented in docs/attributes.md. So that the list
//! cannot drift from the code, every attribute-like string written in the stages that make
//! exported data must be declared (the end-to-end suite checks what receivers got as well).
use std::path::Path;

use zerotrace::attributes::{self, Type};
use zerotrace_semconv::{Registry, Type as RegType};

fn reg_type(t: Type) -> RegType {
    match t {
        Type::Str => RegType::Str,
        Type::Int => RegType::Int,
    }
}

#[test]
fn declared_keys_follow_the_registry() {
    let reg = Registry::load().expect("the committed registry reads");
    let mut problems = Vec::new();
    for k in attributes::ALL {
        if let Err(p) = reg.check(k.name, reg_type(k.ty), None) {
            problems.push(p.to_string());
        }
        for v in k.values {
            if let Err(p) = reg.check(k.name, reg_type(k.ty), Some(v)) {
                problems.push(p.to_string());
            }
        }
    }
    for (name, unit) in attributes::METRICS {
        if let Err(p) = reg.check_metric(name, Some(unit)) {
            problems.push(p.to_string());
        }
    }
    assert!(problems.is_empty(), "attributes or metrics against the semantic conventions v{}:\n{}", zerotrace_semconv::VERSION, problems.join("\n"));
}

#[test]
fn keys_are_declared_once() {
    let mut names: Vec<&str> = attributes::ALL.iter().map(|k| k.name).collect();
    names.sort_unstable();
    let before = names.len();
    names.dedup();
    assert_eq!(before, names.len(), "a key declared twice");
}

/// zerotrace's own keys are documented, and the documentation names no key that is gone.
#[test]
fn own_keys_are_documented() {
    let doc_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/attributes.md");
    let doc = std::fs::read_to_string(&doc_path).expect("docs/attributes.md");
    for k in attributes::ALL.iter().filter(|k| k.name.starts_with("zerotrace.")) {
        assert!(doc.contains(&format!("`{}`", k.name)), "{} is not documented in docs/attributes.md", k.name);
    }
    for word in doc.split('`').skip(1).step_by(2) {
        if word.starts_with("zerotrace.") && !word.contains(" ") && !word.contains("*") {
            assert!(attributes::find(word).is_some(), "docs/attributes.md documents {word}, which the agent does not declare");
        }
    }
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).expect("source folder") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Strings that look like attribute keys (`a.b`, lower case) in the code of the stages
/// that build exported data, tests left out.
fn keys_in_code() -> Vec<(String, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    for stage in ["correlate", "export", "profile", "run", "spans.rs"] {
        let p = src.join(stage);
        if p.is_dir() {
            rust_files(&p, &mut files);
        } else {
            files.push(p);
        }
    }
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).expect("readable");
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
            for lit in line.split('"').skip(1).step_by(2) {
                let keyish = lit.contains('.')
                    && lit.split('.').all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                    && lit.starts_with(|c: char| c.is_ascii_lowercase());
                if keyish {
                    out.push((lit.to_owned(), f.strip_prefix(&src).unwrap_or(&f).display().to_string()));
                }
            }
        }
    }
    out
}

#[test]
fn every_key_in_the_code_is_declared() {
    let found = keys_in_code();
    assert!(found.iter().any(|(k, _)| k == "http.response.status_code"), "the scan finds nothing: {found:?}");
    let undeclared: Vec<String> = found
        .iter()
        .filter(|(k, _)| attributes::find(k).is_none() && !attributes::METRICS.iter().any(|(m, _)| m == k))
        .map(|(k, f)| format!("{k} ({f})"))
        .collect();
    assert!(undeclared.is_empty(), "keys written in the code but not declared in agent/src/attributes.rs:\n{}", undeclared.join("\n"));
}
