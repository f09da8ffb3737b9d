//! `zerotrace tail`: finished spans grouped by trace and printed as indented trees (or one
//! JSON object per span). Spans end children first, so a trace waits until its root has
//! arrived (plus a short grace for stragglers) or until `wait` has passed since its first
//! span, whichever comes first; a span that arrives after its trace was printed is printed
//! on its own, marked late. Filters select whole traces: a trace is shown when one of its
//! spans matches every filter given.
use std::{
    collections::{HashMap, HashSet, VecDeque},
    fmt::Write as _,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::spans::{Span, SpanId, SpanKind, Status, TraceId, Value};

/// Traces waiting to be printed, at most; more are printed early (oldest first).
pub const MAX_PENDING_TRACES: usize = 4096;
/// Spans kept per waiting trace; more are counted and dropped.
pub const MAX_SPANS_PER_TRACE: usize = 1024;
/// Printed trace ids remembered to recognise late spans.
const MAX_PRINTED: usize = 16_384;
/// How long a trace waits for stragglers once its root has arrived.
const GRACE: Duration = Duration::from_millis(150);

/// What to show.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// service.name is one of these (empty: any).
    pub services: Vec<String>,
    /// The span name matches this glob.
    pub name: Option<glob::Pattern>,
    pub min_duration: Option<Duration>,
    /// Only spans with status Error.
    pub errors: bool,
    /// The trace id starts with this (lower-case hex).
    pub trace_id: Option<String>,
    /// Attribute K has value V (as printed).
    pub attrs: Vec<(String, String)>,
}

impl Filter {
    fn matches(&self, s: &Span, service: &str) -> bool {
        (self.services.is_empty() || self.services.iter().any(|x| x == service))
            && self.name.as_ref().is_none_or(|p| p.matches(&s.name))
            && self.min_duration.is_none_or(|d| s.duration_ns() >= d.as_nanos() as u64)
            && (!self.errors || matches!(s.status, Status::Error(_)))
            && self.trace_id.as_ref().is_none_or(|t| s.trace_id.to_string().starts_with(t.as_str()))
            && self.attrs.iter().all(|(k, v)| s.attr(k).is_some_and(|a| a.to_string() == *v))
    }
}

#[derive(Clone, Debug)]
pub struct TailSettings {
    pub filter: Filter,
    /// Longest wait for a trace's root before it is printed anyway.
    pub wait: Duration,
    pub json: bool,
    /// ANSI colours (errors in red, dim ids): only when stdout is a terminal.
    pub color: bool,
}

struct Waiting {
    spans: Vec<(Span, Arc<str>)>,
    first: Instant,
    root_at: Option<Instant>,
}

pub struct Tail {
    s: TailSettings,
    waiting: HashMap<TraceId, Waiting>,
    order: VecDeque<TraceId>,
    /// Printed traces, and whether they were shown (passed the filters): a late span is
    /// printed only with a shown trace.
    printed: HashMap<TraceId, bool>,
    printed_order: VecDeque<TraceId>,
    /// Spans dropped because their trace had MAX_SPANS_PER_TRACE already.
    pub dropped: u64,
}

impl Tail {
    pub fn new(s: TailSettings) -> Self {
        Self { s, waiting: HashMap::new(), order: VecDeque::new(), printed: HashMap::new(), printed_order: VecDeque::new(), dropped: 0 }
    }

    /// A finished span of process `service`. Returns output for a span whose trace was
    /// printed already (late), else nothing yet.
    pub fn offer(&mut self, span: &Span, service: &Arc<str>, now: Instant) -> Option<String> {
        if let Some(shown) = self.printed.get(&span.trace_id) {
            if !shown {
                return None;
            }
            return Some(if self.s.json { json_line(span, service) } else { self.late_line(span, service) });
        }
        let w = self.waiting.entry(span.trace_id).or_insert_with(|| {
            self.order.push_back(span.trace_id);
            Waiting { spans: Vec::new(), first: now, root_at: None }
        });
        if w.spans.len() >= MAX_SPANS_PER_TRACE {
            self.dropped += 1;
            return None;
        }
        if span.parent.is_none_or(|p| p == span.span_id) || span.parent_is_remote {
            w.root_at = Some(now);
        }
        w.spans.push((span.clone(), service.clone()));
        None
    }

    /// Output for every trace that is ready at `now` (and for the oldest ones when too many
    /// wait).
    pub fn due(&mut self, now: Instant) -> Vec<String> {
        let ready: Vec<TraceId> =
            self.waiting.iter().filter(|(_, w)| w.root_at.is_some_and(|t| now >= t + GRACE) || now >= w.first + self.s.wait).map(|(t, _)| *t).collect();
        let mut out = Vec::new();
        for t in ready {
            self.emit(t, &mut out);
        }
        while self.waiting.len() > MAX_PENDING_TRACES {
            let Some(t) = self.order.pop_front() else { break };
            self.emit(t, &mut out);
        }
        out
    }

    /// Output for every trace still waiting (at exit).
    pub fn flush(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(t) = self.order.pop_front() {
            self.emit(t, &mut out);
        }
        out
    }

    fn emit(&mut self, t: TraceId, out: &mut Vec<String>) {
        let Some(w) = self.waiting.remove(&t) else { return };
        self.order.retain(|x| *x != t);
        let shown = w.spans.iter().any(|(s, svc)| self.s.filter.matches(s, svc));
        self.printed.insert(t, shown);
        self.printed_order.push_back(t);
        while self.printed_order.len() > MAX_PRINTED {
            if let Some(old) = self.printed_order.pop_front() {
                self.printed.remove(&old);
            }
        }
        if !shown {
            return;
        }
        if self.s.json {
            out.extend(w.spans.iter().map(|(s, svc)| json_line(s, svc)));
        } else {
            out.push(self.tree(&w.spans));
        }
    }

    /// One trace as an indented tree: a header line, then every span under its parent
    /// (spans whose parent is not in the trace start their own tree), in start order.
    fn tree(&self, spans: &[(Span, Arc<str>)]) -> String {
        let ids: HashSet<SpanId> = spans.iter().map(|(s, _)| s.span_id).collect();
        let mut children: HashMap<SpanId, Vec<usize>> = HashMap::new();
        let mut roots = Vec::new();
        for (i, (s, _)) in spans.iter().enumerate() {
            match s.parent.filter(|p| ids.contains(p) && *p != s.span_id) {
                Some(p) => children.entry(p).or_default().push(i),
                None => roots.push(i),
            }
        }
        let by_start = |v: &mut Vec<usize>| v.sort_by_key(|&i| (spans[i].0.start_unix_ns, i));
        by_start(&mut roots);
        for v in children.values_mut() {
            by_start(v);
        }
        let start = spans.iter().map(|(s, _)| s.start_unix_ns).min().unwrap_or(0);
        let end = spans.iter().map(|(s, _)| s.end_unix_ns).max().unwrap_or(0);
        let errors = spans.iter().filter(|(s, _)| matches!(s.status, Status::Error(_))).count();
        let mut out = String::new();
        let head = format!(
            "trace {}  {} span{}  {}{}",
            spans[0].0.trace_id,
            spans.len(),
            if spans.len() == 1 { "" } else { "s" },
            ms(end.saturating_sub(start)),
            if errors > 0 { format!("  {errors} error{}", if errors == 1 { "" } else { "s" }) } else { String::new() }
        );
        let _ = writeln!(out, "{}", self.paint(&head, if errors > 0 { BOLD_RED } else { BOLD }));
        // Depth-first, bounded by the span count (a cycle cannot occur: each span is visited
        // from its one parent, and roots have none in the trace).
        let mut stack: Vec<(usize, String, bool, bool)> = roots.iter().rev().map(|&i| (i, String::new(), true, true)).collect();
        let mut seen = HashSet::new();
        loop {
            let Some((i, prefix, last, root)) = stack.pop() else {
                // Spans in a parent cycle are reached from no root: each starts a tree.
                match (0..spans.len()).find(|i| !seen.contains(i)) {
                    Some(i) => {
                        stack.push((i, String::new(), true, true));
                        continue;
                    }
                    None => break,
                }
            };
            if !seen.insert(i) {
                continue;
            }
            let (s, svc) = &spans[i];
            let branch = if root {
                ""
            } else if last {
                "└─ "
            } else {
                "├─ "
            };
            let _ = writeln!(out, "{prefix}{branch}{}", self.span_text(s, svc));
            let kids = children.get(&s.span_id).cloned().unwrap_or_default();
            let child_prefix = if root { prefix.clone() } else { format!("{prefix}{}", if last { "   " } else { "│  " }) };
            for (k, &c) in kids.iter().enumerate().rev() {
                stack.push((c, child_prefix.clone(), k == kids.len() - 1, false));
            }
        }
        out.pop();
        out
    }

    /// service, kind, name, status code, duration, key attributes, ERROR.
    fn span_text(&self, s: &Span, service: &str) -> String {
        let kind = match s.kind {
            SpanKind::Server => "SERVER",
            SpanKind::Client => "CLIENT",
            SpanKind::Internal => "INTERNAL",
        };
        let mut t = format!("{service} {kind} {}", s.name);
        for key in ["http.response.status_code", "rpc.response.status_code"] {
            if let Some(v) = s.attr(key) {
                let _ = write!(t, " {v}");
            }
        }
        let _ = write!(t, " {}", ms(s.duration_ns()));
        for key in ["url.full", "db.query.text"] {
            if let Some(v) = s.attr(key) {
                let _ = write!(t, " {v}");
            }
        }
        if let Status::Error(msg) = &s.status {
            let why = s.attr("error.type").map(|v| v.to_string()).unwrap_or_else(|| msg.clone());
            t.push_str(" ERROR");
            if !why.is_empty() {
                let _ = write!(t, " ({why})");
            }
            return self.paint(&t, RED);
        }
        t
    }

    fn late_line(&self, s: &Span, service: &str) -> String {
        format!("trace {} (late) {}", s.trace_id, self.span_text(s, service))
    }

    fn paint(&self, text: &str, code: &str) -> String {
        if self.s.color { format!("\x1b[{code}m{text}\x1b[0m") } else { text.to_owned() }
    }
}

const RED: &str = "31";
const BOLD: &str = "1";
const BOLD_RED: &str = "1;31";

fn ms(ns: u64) -> String {
    format!("{:.3}ms", ns as f64 / 1e6)
}

/// One span as a JSON object (fields documented in README.md, "zerotrace tail").
pub fn json_line(s: &Span, service: &str) -> String {
    let attrs: serde_json::Map<String, serde_json::Value> = s
        .attributes
        .iter()
        .map(|(k, v)| {
            let j = match v {
                Value::Int(i) => serde_json::Value::from(*i),
                other => serde_json::Value::from(other.to_string()),
            };
            ((*k).to_owned(), j)
        })
        .collect();
    let (status, message) = match &s.status {
        Status::Unset => ("unset", String::new()),
        Status::Error(m) => ("error", m.clone()),
    };
    let v = serde_json::json!({
        "trace_id": s.trace_id.to_string(),
        "span_id": s.span_id.to_string(),
        "parent_span_id": s.parent.map(|p| p.to_string()).unwrap_or_default(),
        "service": service,
        "pid": s.pid,
        "kind": match s.kind { SpanKind::Server => "server", SpanKind::Client => "client", SpanKind::Internal => "internal" },
        "name": s.name,
        "start_unix_nano": s.start_unix_ns,
        "end_unix_nano": s.end_unix_ns,
        "duration_ms": s.duration_ns() as f64 / 1e6,
        "status": status,
        "status_message": message,
        "attributes": attrs,
    });
    v.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(trace: u8, id: u8, parent: Option<u8>, name: &str, start: u64, end: u64, kind: SpanKind) -> Span {
        Span {
            pid: 1,
            trace_id: TraceId([trace; 16]),
            span_id: SpanId([id; 8]),
            parent: parent.map(|p| SpanId([p; 8])),
            parent_is_remote: false,
            trace_state: None,
            kind,
            name: name.to_owned(),
            start_unix_ns: start,
            end_unix_ns: end,
            attributes: vec![("http.response.status_code", Value::Int(200))],
            status: Status::Unset,
        }
    }

    fn settings(filter: Filter, json: bool) -> TailSettings {
        TailSettings { filter, wait: Duration::from_secs(2), json, color: false }
    }

    #[test]
    fn a_trace_prints_as_a_tree_once_its_root_arrived() {
        let mut t = Tail::new(settings(Filter::default(), false));
        let svc: Arc<str> = "front".into();
        let now = Instant::now();
        // Children end (and arrive) first.
        t.offer(&span(1, 3, Some(2), "GET /leaf/", 2_000_000, 3_000_000, SpanKind::Server), &svc, now);
        t.offer(&span(1, 2, Some(1), "GET", 1_500_000, 3_500_000, SpanKind::Client), &svc, now);
        t.offer(&span(1, 4, Some(1), "SELECT items", 4_000_000, 4_500_000, SpanKind::Client), &svc, now);
        assert!(t.due(now + Duration::from_secs(1)).is_empty(), "no root yet");
        t.offer(&span(1, 1, None, "GET /sync/", 1_000_000, 5_000_000, SpanKind::Server), &svc, now);
        assert!(t.due(now).is_empty(), "grace for stragglers");
        let out = t.due(now + Duration::from_millis(200));
        assert_eq!(out.len(), 1);
        let want = "trace 01010101010101010101010101010101  4 spans  4.000ms\n\
                    front SERVER GET /sync/ 200 4.000ms\n\
                    ├─ front CLIENT GET 200 2.000ms\n\
                    │  └─ front SERVER GET /leaf/ 200 1.000ms\n\
                    └─ front CLIENT SELECT items 200 0.500ms";
        assert_eq!(out[0], want);
        // A span of that trace arriving later is printed on its own.
        let late = t.offer(&span(1, 5, Some(1), "GET", 6_000_000, 7_000_000, SpanKind::Client), &svc, now).unwrap();
        assert!(late.starts_with("trace 01010101010101010101010101010101 (late) front CLIENT GET"), "{late}");
    }

    #[test]
    fn a_trace_without_its_root_prints_after_the_wait() {
        let mut t = Tail::new(settings(Filter::default(), false));
        let svc: Arc<str> = "s".into();
        let now = Instant::now();
        t.offer(&span(2, 3, Some(9), "GET", 0, 1_000, SpanKind::Client), &svc, now);
        assert!(t.due(now + Duration::from_millis(1900)).is_empty());
        let out = t.due(now + Duration::from_secs(2));
        assert_eq!(out.len(), 1);
        assert!(out[0].ends_with("s CLIENT GET 200 0.001ms"), "{}", out[0]);
    }

    #[test]
    fn filters_select_whole_traces_and_json_is_one_object_per_span() {
        let filter = Filter { name: Some(glob::Pattern::new("SELECT *").unwrap()), ..Filter::default() };
        let mut t = Tail::new(settings(filter, true));
        let svc: Arc<str> = "db".into();
        let now = Instant::now();
        t.offer(&span(3, 2, Some(1), "SELECT items", 0, 10, SpanKind::Client), &svc, now);
        t.offer(&span(3, 1, None, "GET /sql/", 0, 20, SpanKind::Server), &svc, now);
        t.offer(&span(4, 1, None, "GET /other/", 0, 20, SpanKind::Server), &svc, now);
        let out = t.due(now + Duration::from_secs(1));
        assert_eq!(out.len(), 2, "both spans of the matching trace, nothing of the other: {out:?}");
        let v: serde_json::Value = serde_json::from_str(&out[0]).unwrap();
        assert_eq!(v["trace_id"], "03030303030303030303030303030303");
        assert_eq!(v["service"], "db");
        assert_eq!(v["attributes"]["http.response.status_code"], 200);
        let min = Filter { min_duration: Some(Duration::from_nanos(15)), errors: false, ..Filter::default() };
        let mut t = Tail::new(settings(min, false));
        t.offer(&span(5, 1, None, "fast", 0, 10, SpanKind::Server), &svc, now);
        assert!(t.flush().is_empty());
        let errs = Filter { errors: true, ..Filter::default() };
        let mut t = Tail::new(settings(errs, false));
        let mut bad = span(6, 1, None, "GET /fail/", 0, 10, SpanKind::Server);
        bad.status = Status::Error(String::new());
        t.offer(&bad, &svc, now);
        t.offer(&span(7, 1, None, "GET /ok/", 0, 10, SpanKind::Server), &svc, now);
        let out = t.flush();
        assert_eq!(out.len(), 1);
        assert!(out[0].contains("1 error") && out[0].contains("GET /fail/ 200 0.000ms ERROR"), "{}", out[0]);
    }

    #[test]
    fn odd_parents_are_drawn_and_late_spans_follow_their_trees_filter() {
        let mut t = Tail::new(settings(Filter { errors: true, ..Filter::default() }, false));
        let svc: Arc<str> = "s".into();
        let now = Instant::now();
        // A span that names itself as parent is a root; two spans that name each other are
        // still drawn.
        let mut bad = span(8, 1, Some(1), "self", 0, 10, SpanKind::Server);
        bad.status = Status::Error(String::new());
        t.offer(&bad, &svc, now);
        t.offer(&span(8, 2, Some(3), "a", 0, 5, SpanKind::Client), &svc, now);
        t.offer(&span(8, 3, Some(2), "b", 0, 5, SpanKind::Client), &svc, now);
        let out = t.due(now + Duration::from_millis(200));
        assert_eq!(out.len(), 1, "the root arrived: printed after the grace");
        assert!(out[0].contains("s SERVER self") && out[0].contains(" a ") && out[0].contains(" b "), "{}", out[0]);
        // A trace filtered out: its late spans are not printed either.
        t.offer(&span(9, 1, None, "ok", 0, 10, SpanKind::Server), &svc, now);
        assert!(t.flush().is_empty());
        assert!(t.offer(&span(9, 2, Some(1), "late", 0, 5, SpanKind::Client), &svc, now).is_none());
        assert!(t.offer(&span(8, 4, Some(1), "late", 0, 5, SpanKind::Client), &svc, now).is_some(), "a shown trace's late span is");
    }
}
