//! Planted secrets: credentials every test request carries (the HTTP client and the load
//! generator add them to each request), and the check that none of them reaches anything
//! zerotrace exports, whatever the test is about. Every OTLP receiver scans each request it
//! gets (spans, metrics, profiles), and every agent's output (`tail` lines, log) is
//! scanned when the agent is dropped; a hit fails the test that owns the receiver or agent.
/// What every planted secret contains: a hit on it alone is a leak.
pub const MARKER: &str = "zt-secret-";

/// The credential headers planted in each test request: a bearer token, a session cookie
/// and an API key (the header names redaction must know).
pub const HEADERS: &[(&str, &str)] =
    &[("Authorization", "Bearer zt-secret-bearer-token"), ("Cookie", "zt_session=zt-secret-session-cookie"), ("X-Api-Key", "zt-secret-api-key")];

/// The planted secrets found in `data`, each once (empty: clean).
pub fn find(data: &[u8]) -> Vec<String> {
    let mut hits: Vec<String> = Vec::new();
    for i in memchr::memmem::find_iter(data, MARKER.as_bytes()) {
        let rest = &data[i..];
        let end = rest.iter().position(|&c| !(c.is_ascii_alphanumeric() || c == b'-' || c == b'_')).unwrap_or(rest.len());
        let hit = String::from_utf8_lossy(&rest[..end]).into_owned();
        if !hits.contains(&hit) {
            hits.push(hit);
        }
    }
    hits
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_each_planted_secret_once() {
        assert_eq!(super::find(b"a zt-secret-abc b zt-secret-abc zt-secret-x;"), vec!["zt-secret-abc".to_owned(), "zt-secret-x".to_owned()]);
        assert!(super::find(b"nothing here, not even secret-abc").is_empty());
    }
}
