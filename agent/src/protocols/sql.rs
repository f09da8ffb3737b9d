//! SQL statement text without its literals: every string ('...', E'...', X'...', $tag$...$tag$)
//! and number becomes `?`, so that `db.query.text` never carries a value a program wrote
//! into its statement (a password, an email, an id): the semantic conventions' sanitization.
//! Placeholders (`?`, `$1`, `:name`), identifiers (backquoted ones too) and keywords stay;
//! "double-quoted" text is replaced (a string to MySQL), and a string with a backslash in it
//! (an escape or not, by server) takes the rest of the statement with it.
//! Comments go, as they may hold anything. A statement cut short by the capture ends with
//! `?` where an unterminated literal began.

/// `text` with its literals replaced by `?` and comments removed.
pub fn sanitize(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    // Bytes of `text` copied verbatim since `from`.
    let mut from = 0;
    let flush = |out: &mut String, from: usize, to: usize| out.push_str(&text[from..to]);
    while i < b.len() {
        let c = b[i];
        let prev_ident = i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_' || b[i - 1] == b'$');
        match c {
            // A string literal, with an optional E/X/B/N prefix (the prefix goes too).
            b'\'' => {
                let start = if i > 0 && matches!(b[i - 1], b'E' | b'e' | b'X' | b'x' | b'B' | b'b' | b'N' | b'n') && !(i > 1 && is_ident(b[i - 2])) {
                    i - 1
                } else {
                    i
                };
                flush(&mut out, from, start);
                out.push('?');
                // E'...' (PostgreSQL) has backslash escapes for sure; elsewhere a backslash
                // means an escape to some servers and a character to others.
                let escapes = start < i && matches!(b[start], b'E' | b'e');
                i = skip_quoted(b, i + 1, b'\'', escapes);
                from = i;
            }
            // A dollar-quoted string ($$...$$ or $tag$...$tag$); `$1` is a placeholder.
            b'$' if !prev_ident && b.get(i + 1).is_some_and(|n| *n == b'$' || n.is_ascii_alphabetic() || *n == b'_') => {
                let tag_end = b[i + 1..].iter().position(|x| *x == b'$').map(|p| i + 1 + p);
                match tag_end {
                    Some(e) if b[i + 1..e].iter().all(|x| is_ident(*x)) => {
                        let tag = &text[i..=e];
                        flush(&mut out, from, i);
                        out.push('?');
                        i = text[e + 1..].find(tag).map_or(b.len(), |p| e + 1 + p + tag.len());
                        from = i;
                    }
                    _ => i += 1,
                }
            }
            // "..." is an identifier in standard SQL and a string in MySQL: replaced, as a
            // string may hold anything. A backquoted identifier (MySQL) is kept whole.
            b'"' => {
                flush(&mut out, from, i);
                out.push('?');
                i = skip_quoted(b, i + 1, b'"', false);
                from = i;
            }
            b'`' => i = skip_quoted(b, i + 1, b'`', false),
            b'-' if b.get(i + 1) == Some(&b'-') => {
                flush(&mut out, from, i);
                i = b[i..].iter().position(|x| *x == b'\n').map_or(b.len(), |p| i + p);
                from = i;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                flush(&mut out, from, i);
                i = text[i + 2..].find("*/").map_or(b.len(), |p| i + 2 + p + 2);
                out.push(' ');
                from = i;
            }
            // A number not part of an identifier or placeholder (`t1`, `$1`).
            b'0'..=b'9' if !prev_ident => {
                flush(&mut out, from, i);
                out.push('?');
                i += 1;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.' || b[i] == b'_') {
                    i += 1;
                }
                from = i;
            }
            b'.' if !prev_ident && b.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                flush(&mut out, from, i);
                out.push('?');
                i += 1;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                    i += 1;
                }
                from = i;
            }
            _ => i += 1,
        }
    }
    if from < b.len() {
        flush(&mut out, from, b.len());
    }
    out
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// The index after the closing `q` of a literal opened before `i` (a doubled `q` stays
/// inside); the end of `b` when it is not closed. With `escapes`, a backslash escapes the
/// next byte. Without, a backslash in a string makes its end ambiguous (an escape to MySQL,
/// a character to standard SQL): the end of `b`, so that the rest of the statement is
/// replaced too rather than read either way.
fn skip_quoted(b: &[u8], mut i: usize, q: u8, escapes: bool) -> usize {
    while i < b.len() {
        if b[i] == b'\\' && escapes {
            i += 2;
        } else if b[i] == b'\\' && q != b'`' {
            return b.len();
        } else if b[i] == q {
            if b.get(i + 1) == Some(&q) {
                i += 2;
            } else {
                return i + 1;
            }
        } else {
            i += 1;
        }
    }
    b.len()
}

#[cfg(test)]
mod tests {
    use super::sanitize;

    #[test]
    fn literals_become_placeholders() {
        for (sql, want) in [
            ("SELECT * FROM users WHERE name = 'alice' AND age > 30", "SELECT * FROM users WHERE name = ? AND age > ?"),
            ("INSERT INTO t (a, b) VALUES ('it''s', -1.5e3)", "INSERT INTO t (a, b) VALUES (?, -?)"),
            ("UPDATE acct SET pw = E'se\\'cret' WHERE id = $1", "UPDATE acct SET pw = ? WHERE id = $1"),
            ("SELECT x'DEADBEEF', .5, t1.c2 FROM t1", "SELECT ?, ?, t1.c2 FROM t1"),
            ("SELECT $$dollar 'quoted'$$, $tag$x$tag$ FROM \"Weird 'Table'\"", "SELECT ?, ? FROM ?"),
            // Ambiguous backslashes: nothing after them is read as statement text.
            ("SELECT a FROM t WHERE p = 'C:\\' AND pw = 'hunter2'", "SELECT a FROM t WHERE p = ?"),
            ("SELECT a FROM t WHERE pw = \"hunter2\" AND x = 'it\\'s' OR y = 'secret'", "SELECT a FROM t WHERE pw = ? AND x = ?"),
            ("SELECT a FROM t WHERE b = ? -- password=hunter2\nAND c = :name", "SELECT a FROM t WHERE b = ? \nAND c = :name"),
            ("SELECT /* token abc */ 1", "SELECT   ?"),
            ("SELECT * FROM t WHERE s = 'cut short", "SELECT * FROM t WHERE s = ?"),
            ("select `order` from `t` where k=0x1F", "select `order` from `t` where k=?"),
        ] {
            assert_eq!(sanitize(sql), want, "{sql}");
        }
    }

    #[test]
    fn anything_goes_without_panicking() {
        for s in ["'", "$", "$a", "$$", "--", "/*", "\\'", "é'ü'", "0", "'\\", "E'", "x"] {
            let _ = sanitize(s);
        }
    }
}
