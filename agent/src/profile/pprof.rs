//! pprof output: a [`Profile`] as google/pprof's `profile.proto`, gzipped on disk for `go tool pprof`.
use std::{io::Write, path::Path};

use prost::Message;

use super::{
    model::{Labels, Profile},
    tables::Tables,
};

/// google/pprof's `proto/profile.proto` (package `perftools.profiles`), field numbers as upstream.
pub mod proto {
    /// The whole profile; every `i64` naming a string is an index into `string_table`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Profile {
        #[prost(message, repeated, tag = "1")]
        pub sample_type: Vec<ValueType>,
        #[prost(message, repeated, tag = "2")]
        pub sample: Vec<Sample>,
        #[prost(message, repeated, tag = "3")]
        pub mapping: Vec<Mapping>,
        #[prost(message, repeated, tag = "4")]
        pub location: Vec<Location>,
        #[prost(message, repeated, tag = "5")]
        pub function: Vec<Function>,
        #[prost(string, repeated, tag = "6")]
        pub string_table: Vec<String>,
        #[prost(int64, tag = "7")]
        pub drop_frames: i64,
        #[prost(int64, tag = "8")]
        pub keep_frames: i64,
        #[prost(int64, tag = "9")]
        pub time_nanos: i64,
        #[prost(int64, tag = "10")]
        pub duration_nanos: i64,
        #[prost(message, optional, tag = "11")]
        pub period_type: Option<ValueType>,
        #[prost(int64, tag = "12")]
        pub period: i64,
        #[prost(int64, repeated, tag = "13")]
        pub comment: Vec<i64>,
        #[prost(int64, tag = "14")]
        pub default_sample_type: i64,
        #[prost(string, tag = "15")]
        pub doc_url: String,
    }

    /// Type and unit of a value (string indices).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ValueType {
        #[prost(int64, tag = "1")]
        pub r#type: i64,
        #[prost(int64, tag = "2")]
        pub unit: i64,
    }

    /// A stack (leaf first) with one value per sample type and its labels.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Sample {
        #[prost(uint64, repeated, tag = "1")]
        pub location_id: Vec<u64>,
        #[prost(int64, repeated, tag = "2")]
        pub value: Vec<i64>,
        #[prost(message, repeated, tag = "3")]
        pub label: Vec<Label>,
    }

    /// A label: `str` (string index) or `num` (with optional `num_unit`).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Label {
        #[prost(int64, tag = "1")]
        pub key: i64,
        #[prost(int64, tag = "2")]
        pub str: i64,
        #[prost(int64, tag = "3")]
        pub num: i64,
        #[prost(int64, tag = "4")]
        pub num_unit: i64,
    }

    /// A binary mapped into the address space.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Mapping {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub memory_start: u64,
        #[prost(uint64, tag = "3")]
        pub memory_limit: u64,
        #[prost(uint64, tag = "4")]
        pub file_offset: u64,
        #[prost(int64, tag = "5")]
        pub filename: i64,
        #[prost(int64, tag = "6")]
        pub build_id: i64,
        #[prost(bool, tag = "7")]
        pub has_functions: bool,
        #[prost(bool, tag = "8")]
        pub has_filenames: bool,
        #[prost(bool, tag = "9")]
        pub has_line_numbers: bool,
        #[prost(bool, tag = "10")]
        pub has_inline_frames: bool,
    }

    /// An address with its lines, innermost inlined function first.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Location {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub mapping_id: u64,
        #[prost(uint64, tag = "3")]
        pub address: u64,
        #[prost(message, repeated, tag = "4")]
        pub line: Vec<Line>,
        #[prost(bool, tag = "5")]
        pub is_folded: bool,
    }

    /// One source line of a location.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Line {
        #[prost(uint64, tag = "1")]
        pub function_id: u64,
        #[prost(int64, tag = "2")]
        pub line: i64,
        #[prost(int64, tag = "3")]
        pub column: i64,
    }

    /// A function (string indices).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Function {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(int64, tag = "2")]
        pub name: i64,
        #[prost(int64, tag = "3")]
        pub system_name: i64,
        #[prost(int64, tag = "4")]
        pub filename: i64,
        #[prost(int64, tag = "5")]
        pub start_line: i64,
    }
}

/// The profile as uncompressed `profile.proto` bytes.
pub fn encode(p: &Profile) -> Vec<u8> {
    build(p).encode_to_vec()
}

/// Writes the profile gzipped, the form `go tool pprof` reads.
pub fn write(p: &Profile, path: &Path) -> std::io::Result<()> {
    let mut gz = flate2::write::GzEncoder::new(std::fs::File::create(path)?, flate2::Compression::default());
    gz.write_all(&encode(p))?;
    gz.finish()?.sync_all()
}

fn sat(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A profile being built: the shared tables, and the samples.
#[derive(Default)]
struct Builder<'a> {
    t: Tables<'a>,
    out: proto::Profile,
}

impl Builder<'_> {
    fn str(&mut self, s: &str) -> i64 {
        self.t.str(s) as i64
    }

    fn labels(&mut self, l: &Labels) -> Vec<proto::Label> {
        let mut out = Vec::new();
        if let Some(t) = l.trace_id {
            let key = self.str("trace_id");
            let str = self.str(&t.iter().map(|b| format!("{b:02x}")).collect::<String>());
            out.push(proto::Label { key, str, ..Default::default() });
        }
        if let Some(s) = l.span_id {
            let key = self.str("span_id");
            let str = self.str(&format!("{s:016x}"));
            out.push(proto::Label { key, str, ..Default::default() });
        }
        if l.goroutine != 0 {
            out.push(proto::Label { key: self.str("goroutine"), num: sat(l.goroutine), ..Default::default() });
        }
        out.push(proto::Label { key: self.str("thread"), num: l.tid.into(), ..Default::default() });
        out.push(proto::Label { key: self.str("pid"), num: l.pid.into(), ..Default::default() });
        out
    }
}

fn build(p: &Profile) -> proto::Profile {
    let mut b = Builder::default();
    let samples = b.str("samples");
    let count = b.str("count");
    let cpu = b.str("cpu");
    let nanoseconds = b.str("nanoseconds");
    b.out.sample_type = vec![proto::ValueType { r#type: samples, unit: count }, proto::ValueType { r#type: cpu, unit: nanoseconds }];
    b.out.period_type = Some(proto::ValueType { r#type: cpu, unit: nanoseconds });
    b.out.period = sat(p.period_ns);
    b.out.time_nanos = sat(p.start_unix_ns);
    b.out.duration_nanos = sat(p.duration_ns);
    for s in &p.samples {
        let location_id = s.locations.iter().map(|l| b.t.location(l) as u64).collect();
        let label = b.labels(&s.labels);
        let value = vec![sat(s.count), sat(s.count.saturating_mul(p.period_ns))];
        b.out.sample.push(proto::Sample { location_id, value, label });
    }
    let Builder { mut t, mut out } = b;
    let build_ids: Vec<i64> = t.mappings.iter().map(|m| m.build_id).collect::<Vec<_>>().into_iter().map(|id| t.str(id) as i64).collect();
    out.mapping = t
        .mappings
        .iter()
        .zip(build_ids)
        .enumerate()
        .map(|(i, (m, build_id))| proto::Mapping {
            id: i as u64 + 1,
            memory_start: m.memory_start,
            memory_limit: m.memory_limit,
            filename: m.file as i64,
            build_id,
            has_functions: m.has_functions,
            has_filenames: m.has_filenames,
            has_line_numbers: m.has_line_numbers,
            has_inline_frames: m.has_inline_frames,
            ..Default::default()
        })
        .collect();
    out.location = t
        .locations
        .iter()
        .enumerate()
        .map(|(i, l)| proto::Location {
            id: i as u64 + 1,
            mapping_id: l.mapping as u64,
            address: l.address,
            line: l.lines.iter().map(|&(f, line)| proto::Line { function_id: f as u64, line: line.into(), column: 0 }).collect(),
            is_folded: false,
        })
        .collect();
    out.function = t
        .functions
        .iter()
        .enumerate()
        .map(|(i, f)| proto::Function { id: i as u64 + 1, name: f.name as i64, system_name: f.name as i64, filename: f.file as i64, start_line: 0 })
        .collect();
    out.string_table = t.strings;
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use std::{process::Command, sync::Arc};

    use super::*;
    use crate::profile::model::{Line, Location, ProcessInfo, StackSample};

    fn loc(address: u64, module: &str, kernel: bool, lines: &[(&str, u32)]) -> Arc<Location> {
        Arc::new(Location {
            address,
            module: module.into(),
            build_id: if kernel { "".into() } else { format!("{module}-build").into() },
            lines: lines.iter().map(|&(f, line)| Line { function: f.into(), file: (!kernel).then(|| format!("src/{module}.rs").into()), line }).collect(),
            kernel,
        })
    }

    pub const TRACE: [u8; 16] = [0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e, 0x47, 0x36];
    pub const SPAN: u64 = 0x00f0_67aa_0ba9_02b7;

    /// Rust process 100 (inlined hot loop under a span, a read syscall through libc, an
    /// unsymbolized frame) and Go process 200 (inlined `main.add`, goroutine 17).
    pub fn synthetic() -> Profile {
        let hot = loc(0x1010, "rust-svc", false, &[("rust_svc::inner_hot", 12), ("rust_svc::hot", 30)]);
        let handler = loc(0x2020, "rust-svc", false, &[("rust_svc::handler", 40)]);
        let main = loc(0x3030, "rust-svc", false, &[("rust_svc::main", 50)]);
        let copy = loc(0xffff_ffff_8100_1000, "[kernel]", true, &[("_copy_to_user", 0)]);
        let sys = loc(0xffff_ffff_8100_2000, "[kernel]", true, &[("do_syscall_64", 0)]);
        let read = loc(0x7f00_0000_1000, "libc.so.6", false, &[("read", 0)]);
        let unknown = loc(0x5555, "rust-svc", false, &[]);
        let ghot = loc(0x40_1000, "gsvc", false, &[("main.add", 7), ("main.(*T).hot", 20)]);
        let gmain = loc(0x40_2000, "gsvc", false, &[("main.main", 30)]);
        let rmain = loc(0x40_3000, "gsvc", false, &[("runtime.main", 283)]);
        let labels = |pid, tid, goroutine| Labels { pid, tid, goroutine, trace_id: None, span_id: None };
        let start = 1_700_000_000_000_000_000;
        Profile {
            period_ns: 10_000_000,
            start_unix_ns: start,
            duration_ns: 1_000_000_000,
            samples: vec![
                StackSample {
                    locations: vec![hot, handler.clone(), main.clone()],
                    labels: Labels { trace_id: Some(TRACE), span_id: Some(SPAN), ..labels(100, 101, 0) },
                    count: 7,
                    timestamps_unix_ns: (0..7).map(|i| start + i * 10_000_000).collect(),
                },
                StackSample {
                    locations: vec![copy, sys, read, handler, main.clone()],
                    labels: labels(100, 102, 0),
                    count: 2,
                    timestamps_unix_ns: vec![start + 1, start + 2],
                },
                StackSample { locations: vec![ghot, gmain, rmain], labels: labels(200, 201, 17), count: 3, timestamps_unix_ns: vec![] },
                StackSample { locations: vec![unknown, main], labels: labels(100, 101, 0), count: 1, timestamps_unix_ns: vec![] },
            ],
            processes: vec![
                ProcessInfo { pid: 100, service_name: "checkout".into(), executable: "rust-svc".into() },
                ProcessInfo { pid: 200, service_name: String::new(), executable: "gsvc".into() },
            ],
        }
    }

    #[test]
    fn encode_dedups_and_round_trips() {
        let p = synthetic();
        let d = proto::Profile::decode(encode(&p).as_slice()).unwrap();
        let s = |i: i64| d.string_table[i as usize].as_str();
        assert_eq!(s(0), "");
        assert_eq!(d.string_table.len(), d.string_table.iter().collect::<std::collections::HashSet<_>>().len());
        assert_eq!(d.sample.len(), 4);
        assert_eq!(d.location.len(), 10);
        assert_eq!(d.function.len(), 11);
        // rust-svc, [kernel], libc.so.6, gsvc.
        assert_eq!(d.mapping.len(), 4);
        let kernel = d.mapping.iter().find(|m| s(m.filename) == "[kernel]").unwrap();
        assert_eq!(kernel.memory_start, 0xffff_ffff_8100_1000);
        assert_eq!(kernel.memory_limit, 0xffff_ffff_8100_2001);
        assert_eq!((s(d.sample_type[0].r#type), s(d.sample_type[1].unit)), ("samples", "nanoseconds"));
        assert_eq!(d.period, 10_000_000);
        assert_eq!(d.sample[0].value, vec![7, 70_000_000]);
        let hot = &d.location[d.sample[0].location_id[0] as usize - 1];
        let names: Vec<_> = hot.line.iter().map(|l| s(d.function[l.function_id as usize - 1].name)).collect();
        assert_eq!(names, ["rust_svc::inner_hot", "rust_svc::hot"]);
        let labels: Vec<_> = d.sample[0].label.iter().map(|l| (s(l.key), if l.str != 0 { s(l.str).to_owned() } else { l.num.to_string() })).collect();
        let want = [("trace_id", "4bf92f3577b34da6a3ce929d0e0e4736"), ("span_id", "00f067aa0ba902b7"), ("thread", "101"), ("pid", "100")];
        assert_eq!(labels, want.map(|(k, v)| (k, v.to_owned())));
        assert!(d.sample[2].label.iter().any(|l| s(l.key) == "goroutine" && l.num == 17));
        assert!(encode(&Profile::default()).len() < 100);
    }

    #[test]
    fn go_tool_pprof_reads_it() {
        let go = crate::symbols::testgo::go("1.25.5");
        let dir = std::env::temp_dir().join(format!("zerotrace-pprof-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("cpu.pb.gz");
        write(&synthetic(), &file).unwrap();
        let pprof = |args: &[&str]| {
            let out = Command::new(&go).arg("tool").arg("pprof").args(args).arg(&file).env("PPROF_TMPDIR", &dir).output().unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(out.status.success(), "pprof {args:?}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
            eprintln!("--- pprof {args:?}\n{stdout}");
            stdout
        };

        let top = pprof(&["-top", "-nodecount=50"]);
        let rows: Vec<&str> = top.lines().skip_while(|l| !l.trim_start().starts_with("flat")).skip(1).collect();
        // Inlined functions are marked "(inline)"; pprof trims leading underscores of C names.
        assert!(rows[0].contains(" rust_svc::inner_hot"), "{top}");
        assert!(rows[0].trim_start().starts_with("70ms"), "{top}");
        for f in ["main.add (inline)", "copy_to_user", "[rust-svc]", "rust_svc::hot", "rust_svc::main", "runtime.main"] {
            assert!(top.contains(f), "{f} missing:\n{top}");
        }
        assert!(top.contains("Total samples = 130ms"), "{top}");

        let tags = pprof(&["-tags"]);
        let tag = |key: &str, value: &str| {
            let block = tags.split("\n\n").find(|b| b.trim_start().starts_with(&format!("{key}:")));
            block.is_some_and(|b| b.lines().any(|l| l.trim_end().ends_with(&format!(": {value}"))))
        };
        for (k, v) in [("trace_id", "4bf92f3577b34da6a3ce929d0e0e4736"), ("span_id", "00f067aa0ba902b7"), ("goroutine", "17")] {
            assert!(tag(k, v), "{k}={v} missing:\n{tags}");
        }
        for (k, v) in [("thread", "101"), ("thread", "102"), ("thread", "201"), ("pid", "100"), ("pid", "200")] {
            assert!(tag(k, v), "{k}={v} missing:\n{tags}");
        }

        let traces = pprof(&["-traces"]);
        let names = |chain: &[&str]| {
            let lines: Vec<&str> = traces.lines().map(|l| l.trim().trim_end_matches(" (inline)")).collect();
            lines.windows(chain.len()).any(|w| w.iter().zip(chain).all(|(l, f)| l.ends_with(f)))
        };
        assert!(names(&["rust_svc::inner_hot", "rust_svc::hot", "rust_svc::handler", "rust_svc::main"]), "{traces}");
        assert!(names(&["copy_to_user", "do_syscall_64", "read", "rust_svc::handler", "rust_svc::main"]), "{traces}");
        assert!(names(&["main.add", "main.(*T).hot", "main.main", "runtime.main"]), "{traces}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
