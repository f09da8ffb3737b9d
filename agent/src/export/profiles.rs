//! OTLP profiles (v1development): a [`Profile`] as an `ExportProfilesServiceRequest`, one
//! resource per process, all tables in the request's shared `ProfilesDictionary`; and the
//! task that sends each window to the traces' collector (gRPC `ProfilesService/Export`, or
//! HTTP POST to `/v1development/profiles`). A failed export is counted and dropped (the next
//! window has its own samples).
use std::collections::{BTreeMap, HashMap};

use opentelemetry_proto::tonic::{
    collector::profiles::v1development::ExportProfilesServiceRequest,
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value::Value},
    profiles::v1development as pb,
    resource::v1::Resource,
};

use crate::profile::{
    model::{Profile, StackSample},
    tables::Tables,
};
use std::sync::{Arc, atomic::Ordering};

use opentelemetry_proto::tonic::collector::profiles::v1development::ExportProfilesServiceResponse;

use super::{ExportSettings, resource::Resources, sink::Sink};
use crate::profile::collect::ProfilerStats;

/// Sample attribute: the thread (OS tid) that ran (semantic conventions `thread.id`).
pub const THREAD_ID: &str = "thread.id";
/// Sample attribute: the Go goroutine id that ran, when nonzero (the registry has no key for
/// it: zerotrace's own namespace).
pub const GOROUTINE_ID: &str = crate::attributes::GOROUTINE_ID;
/// Location attribute: `kernel` or `native` (semantic conventions `profile.frame.type`).
pub const FRAME_TYPE: &str = "profile.frame.type";
/// Mapping attribute for a hex GNU build id (semantic conventions).
pub const BUILD_ID_GNU: &str = "process.executable.build_id.gnu";
/// Mapping attribute for a Go build id (semantic conventions).
pub const BUILD_ID_GO: &str = "process.executable.build_id.go";
/// Resource attribute added when the resource closure does not set it.
pub const PROCESS_PID: &str = "process.pid";

/// The request for `p`: one `ResourceProfiles` per pid that has samples (ascending pid),
/// with `resource(pid)` as its attributes (plus `process.pid` when absent), one scope
/// `zerotrace`, one profile: sample type `samples`/`count`, period type
/// `cpu`/`nanoseconds`, period `p.period_ns`. A sample whose timestamps match its count
/// carries them with a value of 1 each, otherwise its count as a single value. Samples
/// with a trace id and span id link to the span through the dictionary's link table.
pub fn to_request(p: &Profile, resource: &dyn Fn(u32) -> Vec<KeyValue>) -> ExportProfilesServiceRequest {
    let mut d = Dict::new();
    let sample_type = pb::ValueType { type_strindex: d.str("samples"), unit_strindex: d.str("count") };
    let period_type = pb::ValueType { type_strindex: d.str("cpu"), unit_strindex: d.str("nanoseconds") };
    let mut by_pid: BTreeMap<u32, Vec<&StackSample>> = BTreeMap::new();
    for s in p.samples.iter().filter(|s| s.count > 0) {
        by_pid.entry(s.labels.pid).or_default().push(s);
    }
    let resource_profiles = by_pid
        .into_iter()
        .map(|(pid, samples)| {
            let mut attributes = resource(pid);
            if !attributes.iter().any(|kv| kv.key == PROCESS_PID) {
                attributes.push(KeyValue { key: PROCESS_PID.into(), value: Some(int(pid.into())), ..Default::default() });
            }
            let profile = pb::Profile {
                sample_type: Some(sample_type),
                samples: d.samples(&samples),
                time_unix_nano: p.start_unix_ns,
                duration_nano: p.duration_ns,
                period_type: Some(period_type),
                period: i64::try_from(p.period_ns).unwrap_or(i64::MAX),
                ..Default::default()
            };
            pb::ResourceProfiles {
                resource: Some(Resource { attributes, ..Default::default() }),
                scope_profiles: vec![pb::ScopeProfiles {
                    scope: Some(InstrumentationScope { name: "zerotrace".into(), version: env!("CARGO_PKG_VERSION").into(), ..Default::default() }),
                    profiles: vec![profile],
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }
        })
        .collect();
    ExportProfilesServiceRequest { resource_profiles, dictionary: Some(d.finish()) }
}

fn int(v: i64) -> AnyValue {
    AnyValue { value: Some(Value::IntValue(v)) }
}

fn ix(len: usize) -> i32 {
    i32::try_from(len).unwrap_or(i32::MAX)
}

#[derive(Clone, PartialEq, Eq, Hash)]
enum AttrValue {
    Int(i64),
    Str(String),
}

/// The dictionary being built: the tables every profile format shares (strings, functions,
/// mappings, locations), and OTLP's own (attributes, stacks, links); every table starts
/// with its zero element, entries deduplicated.
struct Dict<'a> {
    t: Tables<'a>,
    attribute_table: Vec<pb::KeyValueAndUnit>,
    attributes: HashMap<(i32, AttrValue), i32>,
    stack_table: Vec<pb::Stack>,
    stacks: HashMap<Vec<i32>, i32>,
    link_table: Vec<pb::Link>,
    links: HashMap<([u8; 16], u64), i32>,
}

/// A sample being merged with others of the same stack, attributes and link.
struct Acc {
    stack: i32,
    attributes: Vec<i32>,
    link: i32,
    count: u64,
    /// One per sample while every merged sample had them.
    timestamps: Option<Vec<u64>>,
}

impl<'a> Dict<'a> {
    fn new() -> Self {
        Dict {
            t: Tables::default(),
            attribute_table: vec![pb::KeyValueAndUnit::default()],
            attributes: HashMap::new(),
            stack_table: vec![pb::Stack::default()],
            stacks: HashMap::from([(Vec::new(), 0)]),
            link_table: vec![pb::Link::default()],
            links: HashMap::new(),
        }
    }

    fn str(&mut self, s: &str) -> i32 {
        ix(self.t.str(s))
    }

    fn attribute(&mut self, key: &str, value: AttrValue) -> i32 {
        let key_strindex = self.str(key);
        let next = ix(self.attribute_table.len());
        let table = &mut self.attribute_table;
        *self.attributes.entry((key_strindex, value)).or_insert_with_key(|(_, v)| {
            let value = match v {
                AttrValue::Int(i) => int(*i),
                AttrValue::Str(s) => AnyValue { value: Some(Value::StringValue(s.clone())) },
            };
            table.push(pb::KeyValueAndUnit { key_strindex, value: Some(value), unit_strindex: 0 });
            next
        })
    }

    fn stack(&mut self, s: &'a StackSample) -> i32 {
        let indices: Vec<i32> = s.locations.iter().map(|l| ix(self.t.location(l))).collect();
        let next = ix(self.stack_table.len());
        let table = &mut self.stack_table;
        *self.stacks.entry(indices).or_insert_with_key(|k| {
            table.push(pb::Stack { location_indices: k.clone() });
            next
        })
    }

    fn link(&mut self, trace_id: [u8; 16], span_id: u64) -> i32 {
        let next = ix(self.link_table.len());
        let table = &mut self.link_table;
        *self.links.entry((trace_id, span_id)).or_insert_with(|| {
            table.push(pb::Link { trace_id: trace_id.to_vec(), span_id: span_id.to_be_bytes().to_vec() });
            next
        })
    }

    /// The request's dictionary: the shared tables in OTLP's form (a mapping's build id and
    /// a location's frame type are attributes).
    fn finish(mut self) -> pb::ProfilesDictionary {
        let mappings = std::mem::take(&mut self.t.mappings);
        let mut mapping_table = vec![pb::Mapping::default()];
        for m in &mappings {
            let mut attribute_indices = Vec::new();
            if !m.build_id.is_empty() {
                let hex = m.build_id.bytes().all(|b| b.is_ascii_hexdigit());
                let key = if hex { BUILD_ID_GNU } else { BUILD_ID_GO };
                attribute_indices.push(self.attribute(key, AttrValue::Str(m.build_id.to_owned())));
            }
            mapping_table.push(pb::Mapping {
                memory_start: m.memory_start,
                memory_limit: m.memory_limit,
                file_offset: 0,
                filename_strindex: ix(m.file),
                attribute_indices,
            });
        }
        let locations = std::mem::take(&mut self.t.locations);
        let mut location_table = vec![pb::Location::default()];
        for l in &locations {
            let frame_type = self.attribute(FRAME_TYPE, AttrValue::Str(if l.kernel { "kernel" } else { "native" }.into()));
            location_table.push(pb::Location {
                mapping_index: ix(l.mapping),
                address: l.address,
                lines: l.lines.iter().map(|&(f, line)| pb::Line { function_index: ix(f), line: line.into(), column: 0 }).collect(),
                attribute_indices: vec![frame_type],
            });
        }
        let function_table = std::iter::once(pb::Function::default())
            .chain(self.t.functions.iter().map(|f| pb::Function {
                name_strindex: ix(f.name),
                system_name_strindex: ix(f.name),
                filename_strindex: ix(f.file),
                start_line: 0,
            }))
            .collect();
        pb::ProfilesDictionary {
            mapping_table,
            location_table,
            function_table,
            link_table: self.link_table,
            string_table: self.t.strings,
            attribute_table: self.attribute_table,
            stack_table: self.stack_table,
        }
    }

    fn samples(&mut self, samples: &[&'a StackSample]) -> Vec<pb::Sample> {
        let mut accs: Vec<Acc> = Vec::new();
        let mut pos: HashMap<(i32, Vec<i32>, i32), usize> = HashMap::new();
        for s in samples {
            let stack = self.stack(s);
            let mut attributes = vec![self.attribute(THREAD_ID, AttrValue::Int(s.labels.tid.into()))];
            if s.labels.goroutine != 0 {
                let g = i64::try_from(s.labels.goroutine).unwrap_or(i64::MAX);
                attributes.push(self.attribute(GOROUTINE_ID, AttrValue::Int(g)));
            }
            let link = match (s.labels.trace_id, s.labels.span_id) {
                (Some(t), Some(sp)) if t != [0; 16] && sp != 0 => self.link(t, sp),
                _ => 0,
            };
            let ts = s.timestamps_unix_ns.len() as u64 == s.count;
            let key = (stack, attributes, link);
            match pos.get(&key) {
                Some(&i) => {
                    let a = &mut accs[i];
                    a.count = a.count.saturating_add(s.count);
                    match (&mut a.timestamps, ts) {
                        (Some(v), true) => v.extend_from_slice(&s.timestamps_unix_ns),
                        _ => a.timestamps = None,
                    }
                }
                None => {
                    pos.insert(key.clone(), accs.len());
                    let (stack, attributes, link) = key;
                    let timestamps = ts.then(|| s.timestamps_unix_ns.clone());
                    accs.push(Acc { stack, attributes, link, count: s.count, timestamps });
                }
            }
        }
        accs.into_iter()
            .map(|a| {
                let (values, timestamps_unix_nano) = match a.timestamps {
                    Some(ts) => (vec![1; ts.len()], ts),
                    None => (vec![i64::try_from(a.count).unwrap_or(i64::MAX)], Vec::new()),
                };
                pb::Sample { stack_index: a.stack, attribute_indices: a.attributes, link_index: a.link, values, timestamps_unix_nano }
            })
            .collect()
    }
}

/// Where profiles go: the traces' collector, `/v1development/profiles` for http/protobuf.
pub struct ProfilesSink(Sink);

impl ProfilesSink {
    pub fn new(settings: &ExportSettings, stats: Arc<super::sink::SinkState>) -> Self {
        Self(Sink::new(settings, "profiles", "/opentelemetry.proto.collector.profiles.v1development.ProfilesService/Export", "/v1development/profiles", stats))
    }

    /// Sends one request; Err: why.
    pub async fn send(&mut self, req: ExportProfilesServiceRequest) -> Result<(), super::sink::SinkError> {
        self.0.send::<_, ExportProfilesServiceResponse>(req).await
    }
}

/// The resource attributes of process `pid` as the traces carry them.
pub fn resource_of(resources: &Resources, pid: u32) -> Vec<KeyValue> {
    let res = resources.lock().unwrap_or_else(|e| e.into_inner());
    res.get(&pid).map(super::metrics::proto_attributes).unwrap_or_default()
}

/// The task that sends each window's profile; returns when the profiler is gone.
pub async fn export_task(
    settings: ExportSettings,
    resources: Resources,
    mut rx: tokio::sync::mpsc::Receiver<Profile>,
    stats: Arc<ProfilerStats>,
    sink_state: Arc<super::sink::SinkState>,
) {
    let mut sink = ProfilesSink::new(&settings, sink_state);
    while let Some(p) = rx.recv().await {
        let req = to_request(&p, &|pid| resource_of(&resources, pid));
        match sink.send(req).await {
            Ok(()) => {
                stats.exported.fetch_add(1, Ordering::Relaxed);
            }
            // Not sent (the collector does not take profiles, or asked to wait): counted
            // by the sink, and that window is lost.
            Err(super::sink::SinkError::NotTaken(_)) => {
                stats.profiles_dropped.fetch_add(1, Ordering::Relaxed);
            }
            Err(why) => {
                if stats.export_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::warn!(error = %why, "OTLP profiles export failed (counted; later windows are still sent)");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::profile::pprof::tests::{SPAN, TRACE, synthetic};

    fn kv(key: &str, v: &str) -> KeyValue {
        KeyValue { key: key.into(), value: Some(AnyValue { value: Some(Value::StringValue(v.into())) }), ..Default::default() }
    }

    #[test]
    fn request_round_trips_with_valid_indices() {
        let mut p = synthetic();
        // Same stack and thread as sample 0 but no span: its own sample.
        let mut nospan = p.samples[0].clone();
        nospan.labels.trace_id = None;
        nospan.labels.span_id = None;
        nospan.count = 1;
        nospan.timestamps_unix_ns.truncate(1);
        p.samples.push(nospan);
        // Same stack, labels and link as sample 2 (no timestamps): merged into it.
        p.samples.push(p.samples[2].clone());
        let req = to_request(&p, &|pid| vec![kv("service.name", &format!("svc{pid}"))]);
        let req = ExportProfilesServiceRequest::decode(req.encode_to_vec().as_slice()).unwrap();
        let d = req.dictionary.as_ref().unwrap();

        // Zero elements first.
        assert_eq!(d.string_table[0], "");
        assert_eq!(d.mapping_table[0], pb::Mapping::default());
        assert_eq!(d.location_table[0], pb::Location::default());
        assert_eq!(d.function_table[0], pb::Function::default());
        assert_eq!(d.link_table[0], pb::Link::default());
        assert_eq!(d.attribute_table[0], pb::KeyValueAndUnit::default());
        assert_eq!(d.stack_table[0], pb::Stack::default());
        let unique = d.string_table.iter().collect::<std::collections::HashSet<_>>();
        assert_eq!(unique.len(), d.string_table.len());

        // Every index in range.
        let ok = |i: i32, len: usize| usize::try_from(i).is_ok_and(|i| i < len);
        let s = |i: i32| d.string_table[i as usize].as_str();
        let attrs_ok = |v: &[i32]| v.iter().all(|&i| ok(i, d.attribute_table.len()));
        let str_ok = |i: i32| ok(i, d.string_table.len());
        assert!(d.attribute_table.iter().all(|a| str_ok(a.key_strindex) && str_ok(a.unit_strindex)));
        assert!(d.function_table.iter().all(|f| [f.name_strindex, f.system_name_strindex, f.filename_strindex].into_iter().all(str_ok)));
        assert!(d.mapping_table.iter().all(|m| ok(m.filename_strindex, d.string_table.len()) && attrs_ok(&m.attribute_indices)));
        for l in &d.location_table {
            assert!(ok(l.mapping_index, d.mapping_table.len()) && attrs_ok(&l.attribute_indices));
            assert!(l.lines.iter().all(|line| ok(line.function_index, d.function_table.len())));
        }
        assert!(d.stack_table.iter().all(|st| st.location_indices.iter().all(|&i| ok(i, d.location_table.len()))));

        assert_eq!(req.resource_profiles.len(), 2);
        let mut samples = Vec::new();
        for (rp, pid) in req.resource_profiles.iter().zip([100i64, 200]) {
            let res = rp.resource.as_ref().unwrap();
            assert_eq!(res.attributes[0], kv("service.name", &format!("svc{pid}")));
            assert!(res.attributes.iter().any(|a| a.key == PROCESS_PID && a.value == Some(int(pid))));
            let sp = &rp.scope_profiles[0];
            assert_eq!(sp.scope.as_ref().unwrap().name, "zerotrace");
            let prof = &sp.profiles[0];
            let st = prof.sample_type.unwrap();
            assert_eq!((s(st.type_strindex), s(st.unit_strindex)), ("samples", "count"));
            let pt = prof.period_type.unwrap();
            assert_eq!((s(pt.type_strindex), s(pt.unit_strindex), prof.period), ("cpu", "nanoseconds", 10_000_000));
            assert_eq!((prof.time_unix_nano, prof.duration_nano), (p.start_unix_ns, p.duration_ns));
            for sample in &prof.samples {
                assert!(ok(sample.stack_index, d.stack_table.len()) && sample.stack_index != 0);
                assert!(ok(sample.link_index, d.link_table.len()) && attrs_ok(&sample.attribute_indices));
                assert!(sample.timestamps_unix_nano.is_empty() || sample.timestamps_unix_nano.len() == sample.values.len());
                samples.push((pid, sample.clone()));
            }
        }
        assert_eq!(samples.len(), 5);

        let func = |sample: &pb::Sample, frame: usize, line: usize| {
            let loc = &d.location_table[d.stack_table[sample.stack_index as usize].location_indices[frame] as usize];
            s(d.function_table[loc.lines[line].function_index as usize].name_strindex)
        };
        let attr = |sample: &pb::Sample, key: &str| {
            let mut attrs = sample.attribute_indices.iter().map(|&i| &d.attribute_table[i as usize]);
            attrs.find(|a| s(a.key_strindex) == key).and_then(|a| a.value.clone())
        };

        // The span's sample: leaf first, inlined callee first, linked, thread attribute.
        let (_, hot) = &samples[0];
        let chain = [func(hot, 0, 0), func(hot, 0, 1), func(hot, 1, 0), func(hot, 2, 0)];
        assert_eq!(chain, ["rust_svc::inner_hot", "rust_svc::hot", "rust_svc::handler", "rust_svc::main"]);
        let link = &d.link_table[hot.link_index as usize];
        assert_eq!(link.trace_id, TRACE.to_vec());
        assert_eq!(link.span_id, SPAN.to_be_bytes().to_vec());
        assert_eq!(link.span_id, [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
        assert_eq!(attr(hot, THREAD_ID), Some(int(101)));
        assert_eq!(attr(hot, GOROUTINE_ID), None);
        assert_eq!((hot.values.len(), hot.timestamps_unix_nano.len()), (7, 7));
        assert!(hot.values.iter().all(|&v| v == 1));

        // Kernel frames: their own mapping, frame type kernel.
        let (_, sys) = &samples[1];
        assert_eq!(sys.link_index, 0);
        let kloc = &d.location_table[d.stack_table[sys.stack_index as usize].location_indices[0] as usize];
        assert_eq!(s(d.mapping_table[kloc.mapping_index as usize].filename_strindex), "[kernel]");
        let ft = &d.attribute_table[kloc.attribute_indices[0] as usize];
        assert_eq!(s(ft.key_strindex), FRAME_TYPE);
        assert_eq!(ft.value, Some(AnyValue { value: Some(Value::StringValue("kernel".into())) }));

        // Same stack without a span: a separate sample with no link.
        let nospan = samples.iter().filter(|(_, x)| x.stack_index == hot.stack_index && x.link_index == 0);
        assert_eq!(nospan.map(|(_, x)| x.values.clone()).collect::<Vec<_>>(), [vec![1]]);

        // Go: goroutine attribute, the duplicate merged into one sample (3 + 3, no timestamps).
        let go: Vec<_> = samples.iter().filter(|(pid, _)| *pid == 200).map(|(_, x)| x).collect();
        assert_eq!(go.len(), 1);
        assert_eq!((func(go[0], 0, 0), func(go[0], 0, 1)), ("main.add", "main.(*T).hot"));
        assert_eq!(attr(go[0], GOROUTINE_ID), Some(int(17)));
        assert_eq!((go[0].values.clone(), go[0].timestamps_unix_nano.len()), (vec![6], 0));

        let empty = to_request(&Profile::default(), &|_| Vec::new());
        assert!(empty.resource_profiles.is_empty());
    }
}
