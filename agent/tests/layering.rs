//! The agent's import graph flows one way: entry points (cli, settings, main) -> run ->
//! the pipeline's stages in order -> shared types. This test reads the `crate::` and
//! `super::` paths of every file in agent/src and fails when a stage names a later stage (or
//! `cli`/`run`), or when files import each other in a circle. Re-exports cannot hide an
//! import from it: it reads every path, not only `use` lines.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// Stages from the bottom up: a module may use its own stage and the ones before it.
const STAGES: &[&[&str]] = &[
    &["attributes", "spans", "otel_env"],
    &["protocols", "symbols", "events"],
    &["model"],
    &["probes"],
    &["correlate"],
    &["profile"],
    &["export"],
    &["control", "health"],
    &["run"],
    &["replay", "doctor", "settings", "config", "cli", "lib", "main"],
];

/// Files that are allowed to import each other: the generated Go offsets table names the
/// entry type its generator's reader defines.
const GENERATED_PAIRS: &[(&str, &str)] = &[("symbols::go", "symbols::go_offsets_table"), ("symbols::go_offsets_table", "symbols::go")];

fn rank(stage: &str) -> Option<usize> {
    STAGES.iter().position(|s| s.contains(&stage))
}

/// `agent/src/a/b.rs` -> ["a", "b"]; `a/mod.rs` -> ["a"]; `lib.rs` -> ["lib"].
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).expect("under src");
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let last = parts.pop().expect("a file name");
    let stem = last.trim_end_matches(".rs").to_owned();
    if stem != "mod" {
        parts.push(stem);
    }
    parts
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("readable source folder") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The code of a file without comments (doc comments name paths in prose) and string
/// literals.
fn code(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with("//") {
            continue;
        }
        let mut in_str = false;
        let mut prev = ' ';
        let mut kept = String::new();
        for c in line.chars() {
            if !in_str && c == '/' && prev == '/' {
                kept.pop();
                break;
            }
            if c == '"' && prev != '\\' {
                in_str = !in_str;
            } else if !in_str {
                kept.push(c);
            }
            prev = c;
        }
        out.push_str(&kept);
        out.push('\n');
    }
    out
}

fn ident_at(s: &str) -> &str {
    let end = s.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(s.len());
    &s[..end]
}

/// Every path a file names that starts at the crate root or climbs with `super`, resolved
/// to absolute module paths (as far as they go: `crate::a::b::Type` gives a, b, Type).
fn references(module: &[String], text: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < text.len() {
        let rest = &text[i..];
        let boundary = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_' || bytes[i - 1] == b':');
        let (base, skip): (Vec<String>, usize) = if boundary && rest.starts_with("crate::") {
            (Vec::new(), "crate::".len())
        } else if boundary && rest.starts_with("super::") {
            // Each `super` climbs one module: `a/b.rs` is a::b and `a/mod.rs` is a, so the
            // module path already says where the file sits.
            let mut base = module.to_vec();
            let mut r = rest;
            while let Some(t) = r.strip_prefix("super::") {
                base.pop();
                r = t;
            }
            (base, rest.len() - r.len())
        } else {
            i += rest.chars().next().map_or(1, char::len_utf8);
            continue;
        };
        let after = &rest[skip..];
        collect(&base, after, &mut out);
        i += skip;
    }
    out
}

/// Paths at `s` (just after `prefix::`): one ident chain, or a `{...}` group of them.
fn collect(prefix: &[String], s: &str, out: &mut Vec<Vec<String>>) {
    if let Some(group) = s.strip_prefix('{') {
        let mut depth = 0;
        let mut start = 0;
        for (j, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    item(prefix, &group[start..j], out);
                    return;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    item(prefix, &group[start..j], out);
                    start = j + 1;
                }
                _ => {}
            }
        }
        return;
    }
    let mut path = prefix.to_vec();
    let mut r = s;
    loop {
        let id = ident_at(r);
        if id.is_empty() {
            break;
        }
        path.push(id.to_owned());
        r = &r[id.len()..];
        match r.strip_prefix("::") {
            Some(t) if t.starts_with('{') => {
                collect(&path, t, out);
                return;
            }
            Some(t) => r = t,
            None => break,
        }
    }
    if path.len() > prefix.len() {
        out.push(path);
    }
}

fn item(prefix: &[String], s: &str, out: &mut Vec<Vec<String>>) {
    let s = s.trim();
    if s.is_empty() || s == "self" {
        return;
    }
    collect(prefix, s, out);
}

#[test]
fn stages_import_only_earlier_stages_and_files_form_no_circle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    files(&src, &mut all);
    let modules: BTreeMap<Vec<String>, PathBuf> = all.iter().map(|f| (module_path(&src, f), f.clone())).collect();
    let mut wrong = Vec::new();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, file) in &modules {
        let stage = &module[0];
        let Some(own) = rank(stage) else {
            wrong.push(format!("{}: stage `{stage}` is not in this test's STAGES list: place it", file.display()));
            continue;
        };
        let text = code(&std::fs::read_to_string(file).expect("readable source"));
        for path in references(module, &text) {
            let Some(first) = path.first() else { continue };
            if let Some(r) = rank(first)
                && r > own
            {
                wrong.push(format!("{}: stage `{stage}` uses `{}` of a later stage", file.display(), path.join("::")));
            }
            // The file this path lands in: its longest prefix that is a module.
            let target = (1..=path.len()).rev().map(|n| path[..n].to_vec()).find(|p| modules.contains_key(p));
            if let Some(t) = target
                && &t != module
            {
                // A folder's mod.rs and the files inside it are one room.
                let parent_child = t.len() == module.len() + 1 && t.starts_with(module) || module.len() == t.len() + 1 && module.starts_with(&t);
                if !parent_child {
                    edges.entry(module.join("::")).or_default().insert(t.join("::"));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "imports against the pipeline's direction:\n{}", wrong.join("\n"));
    let circles = circles(&edges);
    assert!(circles.is_empty(), "files that import each other in a circle:\n{}", circles.join("\n"));
}

/// Strongly connected components with more than one file (Tarjan), minus the generated pair.
fn circles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    struct S<'a> {
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        next: usize,
        out: Vec<Vec<&'a str>>,
    }
    fn visit<'a>(s: &mut S<'a>, v: &'a str) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on.insert(v);
        if let Some(ws) = s.edges.get(v) {
            for w in ws {
                let w = w.as_str();
                let allowed = GENERATED_PAIRS.contains(&(v, w));
                if allowed {
                    continue;
                }
                if !s.index.contains_key(w) {
                    visit(s, w);
                    let lw = s.low[w];
                    let lv = s.low[v];
                    s.low.insert(v, lv.min(lw));
                } else if s.on.contains(w) {
                    let iw = s.index[w];
                    let lv = s.low[v];
                    s.low.insert(v, lv.min(iw));
                }
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on.remove(w);
                comp.push(w);
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                s.out.push(comp);
            }
        }
    }
    let mut s = S { edges, index: BTreeMap::new(), low: BTreeMap::new(), stack: Vec::new(), on: BTreeSet::new(), next: 0, out: Vec::new() };
    for v in edges.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.out
        .into_iter()
        .map(|c| {
            let ties: Vec<String> = c.iter().flat_map(|a| edges[*a].iter().filter(|b| c.contains(&b.as_str())).map(move |b| format!("{a} -> {b}"))).collect();
            ties.join(", ")
        })
        .collect()
}

#[test]
fn the_checker_sees_groups_super_and_later_stages() {
    let m = vec!["correlate".to_owned(), "native".to_owned()];
    let refs = references(&m, "use crate::{events::{A, B}, spans::Span};\nuse super::{framing::Progress, Correlator};\nlet x = crate::run::go();");
    let joined: Vec<String> = refs.iter().map(|p| p.join("::")).collect();
    for want in ["events::A", "events::B", "spans::Span", "correlate::framing::Progress", "correlate::Correlator", "run::go"] {
        assert!(joined.contains(&want.to_owned()), "{want} missing from {joined:?}");
    }
    assert!(code("// crate::run::x\nlet s = \"crate::run\"; // crate::cli\n").trim().starts_with("let s ="));
    assert!(!code("let s = \"crate::run\";").contains("run"));
}
