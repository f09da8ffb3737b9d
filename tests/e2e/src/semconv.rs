//! The semantic-conventions check of everything the receivers get: each attribute key,
//! value type and enumeration value of spans, resources, metrics and profiles must follow
//! the OpenTelemetry registry v1.44 (tests/semconv) or be zerotrace's own `zerotrace.*`, and
//! be declared by the agent (agent/src/attributes.rs, read here as the agent compiles it),
//! so that neither the code nor the declared list can drift from what is exported.
use std::sync::OnceLock;

use opentelemetry_proto::tonic::{
    collector::{metrics::v1::ExportMetricsServiceRequest, profiles::v1development::ExportProfilesServiceRequest, trace::v1::ExportTraceServiceRequest},
    common::v1::{AnyValue, KeyValue, any_value},
    metrics::v1::metric,
};
use zerotrace_semconv::{Registry, Type};

/// The agent's own list of what it exports.
#[path = "../../../agent/src/attributes.rs"]
#[allow(dead_code)]
pub mod declared;

/// Resource keys the tests themselves set through OTEL_RESOURCE_ATTRIBUTES: the user's, not
/// zerotrace's (the agent passes them on as they are).
const USER_RESOURCE_KEYS: &[&str] = &["team", "deployment.environment.name"];

fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(|| Registry::load().unwrap_or_else(|e| panic!("the semantic conventions registry: {e}")))
}

fn type_and_value(v: &Option<AnyValue>) -> (Type, Option<String>) {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => (Type::Str, Some(s.clone())),
        Some(any_value::Value::IntValue(i)) => (Type::Int, Some(i.to_string())),
        Some(any_value::Value::BoolValue(b)) => (Type::Bool, Some(b.to_string())),
        Some(any_value::Value::DoubleValue(d)) => (Type::Double, Some(d.to_string())),
        Some(any_value::Value::ArrayValue(_)) => (Type::StrArray, None),
        _ => (Type::Other, None),
    }
}

fn check_kv(key: &str, value: &Option<AnyValue>, what: &str, resource: bool, out: &mut Vec<String>) {
    if resource && USER_RESOURCE_KEYS.contains(&key) {
        return;
    }
    let (ty, v) = type_and_value(value);
    if let Err(p) = registry().check(key, ty, v.as_deref()) {
        out.push(format!("{what}: {p}"));
    }
    if declared::find(key).is_none() {
        out.push(format!("{what}: {key} is exported but not declared in agent/src/attributes.rs"));
    }
}

fn check_all(kvs: &[KeyValue], what: &str, resource: bool, out: &mut Vec<String>) {
    for kv in kvs {
        check_kv(&kv.key, &kv.value, what, resource, out);
    }
}

/// Problems with one traces request (empty: it follows the conventions).
pub fn check_traces(req: &ExportTraceServiceRequest) -> Vec<String> {
    let mut out = Vec::new();
    for rs in &req.resource_spans {
        check_all(rs.resource.as_ref().map_or(&[][..], |r| &r.attributes), "span resource", true, &mut out);
        for ss in &rs.scope_spans {
            for s in &ss.spans {
                check_all(&s.attributes, &format!("span {:?}", s.name), false, &mut out);
            }
        }
    }
    out
}

/// Problems with one metrics request: names, units, data point attributes, resources.
pub fn check_metrics(req: &ExportMetricsServiceRequest) -> Vec<String> {
    let mut out = Vec::new();
    for rm in &req.resource_metrics {
        check_all(rm.resource.as_ref().map_or(&[][..], |r| &r.attributes), "metric resource", true, &mut out);
        for sm in &rm.scope_metrics {
            for m in &sm.metrics {
                let unit = (!m.name.starts_with("zerotrace_")).then_some(m.unit.as_str());
                if let Err(p) = registry().check_metric(&m.name, unit) {
                    out.push(p.to_string());
                }
                if !m.name.starts_with("zerotrace_") && !declared::METRICS.iter().any(|(n, _)| *n == m.name) {
                    out.push(format!("metric {} is exported but not declared in agent/src/attributes.rs", m.name));
                }
                let what = format!("metric {}", m.name);
                match &m.data {
                    Some(metric::Data::Histogram(h)) => h.data_points.iter().for_each(|p| check_all(&p.attributes, &what, false, &mut out)),
                    Some(metric::Data::Sum(s)) => s.data_points.iter().for_each(|p| check_all(&p.attributes, &what, false, &mut out)),
                    Some(metric::Data::Gauge(g)) => g.data_points.iter().for_each(|p| check_all(&p.attributes, &what, false, &mut out)),
                    _ => {}
                }
            }
        }
    }
    out
}

/// Problems with one profiles request: the dictionary's attributes (samples, locations,
/// mappings) and the resources.
pub fn check_profiles(req: &ExportProfilesServiceRequest) -> Vec<String> {
    let mut out = Vec::new();
    for rp in &req.resource_profiles {
        check_all(rp.resource.as_ref().map_or(&[][..], |r| &r.attributes), "profile resource", true, &mut out);
    }
    if let Some(d) = &req.dictionary {
        for a in &d.attribute_table {
            let key = d.string_table.get(usize::try_from(a.key_strindex).unwrap_or(usize::MAX)).cloned().unwrap_or_default();
            // attribute_table[0] is the zero value every table starts with.
            if !key.is_empty() {
                check_kv(&key, &a.value, "profile attribute", false, &mut out);
            }
        }
    }
    out
}
