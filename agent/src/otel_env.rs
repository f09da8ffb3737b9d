//! The formats of OpenTelemetry's environment variables that the agent reads for itself and
//! from its targets: `key=value` lists (OTEL_RESOURCE_ATTRIBUTES, OTEL_EXPORTER_OTLP_HEADERS)
//! with percent-encoded values.

/// "k=v,k2=v2" with values percent-decoded; None when an item has no `=` or an empty key.
pub fn kv_list(s: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (k, v) = item.split_once('=')?;
        let k = k.trim();
        if k.is_empty() {
            return None;
        }
        out.push((k.to_owned(), percent_decode(v.trim())));
    }
    Some(out)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        // Bytes, not a str slice: a '%' before a multi-byte character must not split it.
        if b[i] == b'%'
            && let (Some(hi), Some(lo)) = (b.get(i + 1).and_then(|c| (*c as char).to_digit(16)), b.get(i + 2).and_then(|c| (*c as char).to_digit(16)))
        {
            out.push((hi * 16 + lo) as u8);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::kv_list;

    #[test]
    fn lists() {
        assert_eq!(kv_list("api-key=a%20b, x=1").unwrap(), vec![("api-key".into(), "a b".into()), ("x".into(), "1".into())]);
        assert_eq!(kv_list("").unwrap(), vec![]);
        assert!(kv_list("novalue").is_none());
        assert!(kv_list("=v").is_none());
        // A '%' before a multi-byte character, or at the end, is kept as it is.
        assert_eq!(kv_list("k=%é%4").unwrap(), vec![("k".into(), "%é%4".into())]);
    }
}
