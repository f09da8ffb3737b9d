//! What an OTLP export failure means and when to try again, by the OTLP specification's
//! rules: HTTP 429/502/503/504 and gRPC's transient codes are tried again, after the
//! `Retry-After` header (seconds or an HTTP date) or gRPC `RetryInfo` when the collector
//! sent one; a signal the collector does not serve (HTTP 404, gRPC UNIMPLEMENTED) is tried
//! again rarely (`Rare`); anything else is final. Shared by the spans' exporter (`otlp`) and
//! the one-request sinks of metrics and profiles (`sink`).
use std::time::{Duration, Instant, SystemTime};

use tonic_types::StatusExt as _;

/// Longest wait a collector can ask for: a larger Retry-After is taken as this (a
/// misconfigured collector must not silence export for days).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// Why one export request failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Worth trying again: the collector is down, slow, overloaded or reset the
    /// connection; `after`: the wait it asked for (Retry-After, RetryInfo).
    Retry { after: Option<Duration>, why: String },
    /// The collector refused this request for good (malformed, unauthorised, too large):
    /// trying it again would fail the same way.
    Rejected { why: String },
    /// The collector does not serve this signal at all (HTTP 404, gRPC UNIMPLEMENTED).
    Unsupported { why: String },
}

impl Failure {
    pub fn why(&self) -> &str {
        match self {
            Failure::Retry { why, .. } | Failure::Rejected { why } | Failure::Unsupported { why } => why,
        }
    }

    /// A failure below HTTP/gRPC (connect, reset, timeout): always worth another try.
    pub fn transport(why: String) -> Self {
        Failure::Retry { after: None, why }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.why())
    }
}

/// An HTTP answer that was not a success (`retry_after`: the header's value, if any).
pub fn http_failure(status: u16, retry_after: Option<&str>, now: SystemTime) -> Failure {
    let why = format!("HTTP status {status}");
    match status {
        429 | 502 | 503 | 504 => Failure::Retry { after: retry_after.and_then(|v| parse_retry_after(v, now)), why },
        404 => Failure::Unsupported { why },
        _ => Failure::Rejected { why },
    }
}

/// A gRPC status other than OK. `why` describes it without the collector's message (it can
/// echo credentials).
pub fn grpc_failure(status: &tonic::Status, why: String) -> Failure {
    use tonic::Code;
    // A status tonic made from a local error (a reset connection comes back as UNKNOWN, an
    // HTTP/2 reset as INTERNAL): the collector said nothing, so it is worth another try.
    if std::error::Error::source(status).is_some() {
        return Failure::transport(why);
    }
    let after = status.get_details_retry_info().and_then(|r| r.retry_delay).map(|d| d.min(MAX_RETRY_AFTER));
    match status.code() {
        Code::Cancelled | Code::DeadlineExceeded | Code::Aborted | Code::OutOfRange | Code::Unavailable | Code::DataLoss => Failure::Retry { after, why },
        // Only a collector that says when to come back is overloaded; otherwise the request
        // itself is too much (OTLP's rule).
        Code::ResourceExhausted if after.is_some() => Failure::Retry { after, why },
        Code::Unimplemented => Failure::Unsupported { why },
        _ => Failure::Rejected { why },
    }
}

/// `Retry-After`: delay-seconds or an HTTP date (RFC 9110 10.2.3), capped at
/// MAX_RETRY_AFTER; a date in the past means now. None when it is neither.
pub fn parse_retry_after(v: &str, now: SystemTime) -> Option<Duration> {
    let v = v.trim();
    let wait = if let Ok(secs) = v.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let at = httpdate::parse_http_date(v).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// The rare retry of a signal the collector does not serve: the first refusal closes the
/// gate for FIRST, each later one doubles it up to LAST.
#[derive(Debug, Default)]
pub struct Rare {
    closed_until: Option<Instant>,
    wait: Duration,
}

impl Rare {
    const FIRST: Duration = Duration::from_secs(60);
    const LAST: Duration = Duration::from_secs(16 * 60);

    /// Whether a request may go now.
    pub fn open(&self, now: Instant) -> bool {
        self.closed_until.is_none_or(|t| now >= t)
    }

    /// Whether the signal was refused before (and not accepted since).
    pub fn refused(&self) -> bool {
        self.closed_until.is_some()
    }

    /// The collector refused the signal again: the next try is this much later.
    pub fn refuse(&mut self, now: Instant) -> Duration {
        self.wait = if self.wait.is_zero() { Self::FIRST } else { (self.wait * 2).min(Self::LAST) };
        self.closed_until = Some(now + self.wait);
        self.wait
    }

    /// The collector took the signal: back to normal.
    pub fn accepted(&mut self) {
        *self = Rare::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:49:40 GMT", now), Some(Duration::from_secs(3)));
        // A date in the past: now.
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:49:00 GMT", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("86400", now), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }

    #[test]
    fn http_statuses_follow_otlp() {
        let now = SystemTime::UNIX_EPOCH;
        assert_eq!(http_failure(429, Some("7"), now), Failure::Retry { after: Some(Duration::from_secs(7)), why: "HTTP status 429".into() });
        assert!(matches!(http_failure(503, None, now), Failure::Retry { after: None, .. }));
        assert!(matches!(http_failure(502, None, now), Failure::Retry { .. }));
        assert!(matches!(http_failure(504, None, now), Failure::Retry { .. }));
        assert!(matches!(http_failure(404, None, now), Failure::Unsupported { .. }));
        assert!(matches!(http_failure(400, Some("3"), now), Failure::Rejected { .. }));
        assert!(matches!(http_failure(500, None, now), Failure::Rejected { .. }));
    }

    #[test]
    fn grpc_codes_follow_otlp() {
        use tonic::Code;
        use tonic_types::ErrorDetails;
        let with_delay = tonic::Status::with_error_details(Code::ResourceExhausted, "busy", ErrorDetails::with_retry_info(Some(Duration::from_secs(4))));
        assert_eq!(grpc_failure(&with_delay, "x".into()), Failure::Retry { after: Some(Duration::from_secs(4)), why: "x".into() });
        assert!(matches!(grpc_failure(&tonic::Status::new(Code::ResourceExhausted, "too big"), "x".into()), Failure::Rejected { .. }));
        assert!(matches!(grpc_failure(&tonic::Status::new(Code::Unavailable, ""), "x".into()), Failure::Retry { after: None, .. }));
        assert!(matches!(grpc_failure(&tonic::Status::new(Code::Unimplemented, ""), "x".into()), Failure::Unsupported { .. }));
        assert!(matches!(grpc_failure(&tonic::Status::new(Code::InvalidArgument, ""), "x".into()), Failure::Rejected { .. }));
        let reset = tonic::Status::from_error(Box::new(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer")));
        assert_eq!(reset.code(), Code::Unknown);
        assert!(matches!(grpc_failure(&reset, "x".into()), Failure::Retry { after: None, .. }), "a reset is retried, not taken for a refusal");
        let long = tonic::Status::with_error_details(Code::Unavailable, "", ErrorDetails::with_retry_info(Some(Duration::from_secs(99_999))));
        assert_eq!(grpc_failure(&long, "x".into()), Failure::Retry { after: Some(MAX_RETRY_AFTER), why: "x".into() });
    }

    #[test]
    fn rare_retry_backs_off_to_minutes() {
        let t0 = Instant::now();
        let mut r = Rare::default();
        assert!(r.open(t0) && !r.refused());
        assert_eq!(r.refuse(t0), Duration::from_secs(60));
        assert!(!r.open(t0 + Duration::from_secs(59)));
        assert!(r.open(t0 + Duration::from_secs(60)));
        assert_eq!(r.refuse(t0), Duration::from_secs(120));
        for _ in 0..10 {
            r.refuse(t0);
        }
        assert_eq!(r.refuse(t0), Duration::from_secs(16 * 60));
        r.accepted();
        assert!(r.open(t0) && !r.refused());
    }
}
