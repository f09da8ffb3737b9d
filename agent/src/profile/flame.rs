//! Flame graphs: a [`Profile`] as folded stacks and as an interactive SVG (inferno).
use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
};

use inferno::flamegraph::{self, Options, Palette, color::MultiPalette};

use super::model::Profile;

/// Folded stacks, `root;caller;...;leaf COUNT`, one line per distinct stack, sorted.
///
/// The root frame names the process (`service (pid N)`, else `executable (pid N)`, else
/// `pid N`). Inlined functions are separate frames, marked `_[i]`; kernel frames are
/// marked `_[k]` (perf's and inferno's annotations: inferno strips them from the labels
/// and colours by them). Unsymbolized frames show as `[module]`.
pub fn folded(p: &Profile) -> Vec<String> {
    let roots: HashMap<u32, String> = p
        .processes
        .iter()
        .map(|pi| {
            let name = if pi.service_name.is_empty() { &pi.executable } else { &pi.service_name };
            (pi.pid, if name.is_empty() { format!("pid {}", pi.pid) } else { format!("{} (pid {})", clean(name), pi.pid) })
        })
        .collect();
    let mut stacks: BTreeMap<String, u64> = BTreeMap::new();
    for s in p.samples.iter().filter(|s| s.count > 0) {
        let mut stack = roots.get(&s.labels.pid).cloned().unwrap_or_else(|| format!("pid {}", s.labels.pid));
        for loc in s.locations.iter().rev() {
            let kernel = if loc.kernel { "_[k]" } else { "" };
            if loc.lines.is_empty() {
                stack.push_str(&format!(";[{}]{kernel}", clean(&loc.module)));
            }
            // Outermost (the physical function) first; the ones before it are inlined into it.
            for (i, line) in loc.lines.iter().enumerate().rev() {
                let inlined = if i + 1 < loc.lines.len() && !loc.kernel { "_[i]" } else { "" };
                stack.push_str(&format!(";{}{inlined}{kernel}", clean(&line.function)));
            }
        }
        let n = stacks.entry(stack).or_default();
        *n = n.saturating_add(s.count);
    }
    stacks.into_iter().map(|(stack, n)| format!("{stack} {n}")).collect()
}

/// Frame names must not contain the folded format's separators.
fn clean(name: &str) -> String {
    name.replace(';', ":").replace(['\n', '\r'], " ")
}

/// Writes the profile as a flame graph SVG (widths in samples). Fails with `InvalidInput`
/// on a profile without samples (nothing is written then).
pub fn write_svg(p: &Profile, title: &str, path: &Path) -> std::io::Result<()> {
    let lines = folded(p);
    if lines.is_empty() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "the profile has no samples"));
    }
    let mut opt = Options::default();
    opt.title = title.to_owned();
    // The java palette reads the _[k] / _[i] annotations (kernel orange, inlined aqua).
    opt.colors = Palette::Multi(MultiPalette::Java);
    opt.hash = true;
    opt.count_name = "samples".to_owned();
    let mut svg = Vec::new();
    flamegraph::from_lines(&mut opt, lines.iter().map(String::as_str), &mut svg)?;
    std::fs::write(path, svg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::pprof::tests::synthetic;

    #[test]
    fn folded_aggregates_and_annotates() {
        let mut p = synthetic();
        // The same stack as sample 0 from another thread, without a span: merged.
        let mut again = p.samples[0].clone();
        again.labels.tid = 103;
        again.labels.trace_id = None;
        again.count = 5;
        p.samples.push(again);
        let got = folded(&p);
        assert_eq!(
            got,
            [
                "checkout (pid 100);rust_svc::main;[rust-svc] 1",
                "checkout (pid 100);rust_svc::main;rust_svc::handler;read;do_syscall_64_[k];_copy_to_user_[k] 2",
                "checkout (pid 100);rust_svc::main;rust_svc::handler;rust_svc::hot;rust_svc::inner_hot_[i] 12",
                "gsvc (pid 200);runtime.main;main.main;main.(*T).hot;main.add_[i] 3",
            ]
        );
        assert!(folded(&Profile::default()).is_empty());
    }

    #[test]
    fn svg_has_the_functions() {
        let dir = std::env::temp_dir().join(format!("zerotrace-flame-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cpu.svg");
        write_svg(&synthetic(), "zerotrace CPU", &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<?xml") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("zerotrace CPU"));
        for f in ["checkout (pid 100)", "gsvc (pid 200)", "rust_svc::inner_hot", "rust_svc::handler", "_copy_to_user", "main.(*T).hot"] {
            assert!(svg.contains(f), "{f} missing");
        }
        // Annotations are stripped from the labels.
        assert!(!svg.contains("inner_hot_[i]") && !svg.contains("_copy_to_user_[k]"));
        // Kernel frames are coloured orange (blue 0) through their annotation.
        let fill = |f: &str| {
            let rest = svg.split(&format!("<title>{f} (")).nth(1)?;
            rest.split("fill=\"").nth(1)?.split('"').next()
        };
        assert!(fill("_copy_to_user").is_some_and(|c| c.ends_with(",0)")), "{:?}", fill("_copy_to_user"));
        assert!(write_svg(&Profile::default(), "empty", &dir.join("empty.svg")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
