//! zerotrace's own span model: what the correlator produces and every exporter consumes.
//! Only `export` turns it into OpenTelemetry types.
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct TraceId(pub [u8; 16]);
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SpanId(pub [u8; 8]);

impl TraceId {
    pub fn random() -> Self {
        let mut b = [0u8; 16];
        while b == [0; 16] {
            b = fastrand::u128(..).to_be_bytes();
        }
        TraceId(b)
    }
}

impl SpanId {
    pub fn random() -> Self {
        let mut b = [0u8; 8];
        while b == [0; 8] {
            b = fastrand::u64(..).to_be_bytes();
        }
        SpanId(b)
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}
impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// A W3C trace context taken from an incoming `traceparent` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteParent {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub sampled: bool,
    pub trace_state: Option<String>,
}

impl RemoteParent {
    /// Parses `traceparent` (version 00 layout; future versions read the same prefix).
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<Self> {
        let t = traceparent.trim();
        let parts: Vec<&str> = t.split('-').collect();
        if parts.len() < 4 || parts[0].len() != 2 || parts[0] == "ff" {
            return None;
        }
        if parts[0] == "00" && parts.len() != 4 {
            return None;
        }
        let trace = hex::<16>(parts[1])?;
        let span = hex::<8>(parts[2])?;
        let flags = hex::<1>(parts[3])?;
        if trace == [0; 16] || span == [0; 8] {
            return None;
        }
        Some(RemoteParent {
            trace_id: TraceId(trace),
            span_id: SpanId(span),
            sampled: flags[0] & 1 == 1,
            trace_state: tracestate.map(str::to_owned).filter(|s| !s.is_empty()),
        })
    }
}

fn hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != N * 2 || !s.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanKind {
    Server,
    Client,
    Internal,
}

/// An attribute value. Constant and per-connection strings are not copied per span.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Str(String),
    Static(&'static str),
    Shared(std::sync::Arc<str>),
    Int(i64),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Str(s) => f.write_str(s),
            Value::Static(s) => f.write_str(s),
            Value::Shared(s) => f.write_str(s),
            Value::Int(i) => write!(f, "{i}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    Unset,
    Error(String),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Span {
    /// The traced process the span belongs to (its resource).
    pub pid: u32,
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent: Option<SpanId>,
    pub parent_is_remote: bool,
    pub trace_state: Option<String>,
    pub kind: SpanKind,
    pub name: String,
    /// Wall-clock nanoseconds since the Unix epoch.
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    pub attributes: Vec<(&'static str, Value)>,
    pub status: Status,
}

impl Span {
    pub fn attr(&self, key: &str) -> Option<&Value> {
        self.attributes.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    pub fn duration_ns(&self) -> u64 {
        self.end_unix_ns.saturating_sub(self.start_unix_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent() {
        let p = RemoteParent::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", Some("k=v")).unwrap();
        assert_eq!(p.trace_id.to_string(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(p.span_id.to_string(), "b7ad6b7169203331");
        assert!(p.sampled);
        assert_eq!(p.trace_state.as_deref(), Some("k=v"));
        for bad in [
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "garbage",
        ] {
            assert!(RemoteParent::parse(bad, None).is_none(), "{bad}");
        }
        // A future version may append fields.
        assert!(RemoteParent::parse("01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00-x", None).is_some());
    }
}
