//! SQL statement text without its literals: every string ('...', E'...', X'...', $tag$...$tag$)
//! and number becomes `?`, so that `db.query.text` never carries a value a program wrote
//! into its statement (a password, an email, an id): the semantic conventions' sanitization.
//! Placeholders (`?`, `$1`, `:name`), identifiers (backquoted ones too) and keywords stay;
//! "double-quoted" text is replaced (a string to MySQL), and a string with a backslash in it
//! (an escape or not, by server) takes the rest of the statement with it.
//! Comments go, as they may hold anything. A statement cut short by the capture ends with
//! `?` where an unterminated literal began. Also the statement's summary (`summary`), the
//! span name the database conventions ask for.

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

/// Longest summary (the conventions' limit), cut at a word.
const SUMMARY_MAX: usize = 255;

/// Keywords that are operations: they go into the summary, in order.
const OPERATIONS: &[&str] = &[
    "SELECT",
    "INSERT",
    "UPDATE",
    "DELETE",
    "UPSERT",
    "REPLACE",
    "MERGE",
    "CREATE",
    "DROP",
    "ALTER",
    "TRUNCATE",
    "BEGIN",
    "START",
    "COMMIT",
    "ROLLBACK",
    "SAVEPOINT",
    "RELEASE",
    "CALL",
    "EXEC",
    "EXECUTE",
    "SHOW",
    "SET",
    "PRAGMA",
    "VACUUM",
    "ANALYZE",
    "EXPLAIN",
    "COPY",
    "LOCK",
    "GRANT",
    "REVOKE",
    "LISTEN",
    "NOTIFY",
    "DECLARE",
    "FETCH",
    "PREPARE",
    "DEALLOCATE",
];

/// Keywords after which the next name is a target (table, view, procedure).
const TARGET_BEFORE: &[&str] = &["FROM", "INTO", "JOIN", "UPDATE", "TABLE", "VIEW", "INDEX", "CALL", "EXEC", "EXECUTE", "TRUNCATE"];

/// Keywords that end a FROM list or an expected target (with QUALIFIERS, the keywords that
/// never are a target's name).
const ENDERS: &[&str] = &[
    "WHERE",
    "ON",
    "USING",
    "GROUP",
    "ORDER",
    "HAVING",
    "LIMIT",
    "OFFSET",
    "SET",
    "VALUES",
    "VALUE",
    "RETURNING",
    "UNION",
    "EXCEPT",
    "INTERSECT",
    "WINDOW",
    "FOR",
    "DEFAULT",
    "SELECT",
    "WITH",
];

/// Keywords that qualify what follows (JOIN's kinds, AS, IF NOT EXISTS, ...): a FROM list or
/// an expected target goes on past them.
const QUALIFIERS: &[&str] = &[
    "LEFT",
    "RIGHT",
    "INNER",
    "OUTER",
    "FULL",
    "CROSS",
    "NATURAL",
    "LATERAL",
    "AS",
    "ONLY",
    "IF",
    "NOT",
    "EXISTS",
    "TEMPORARY",
    "TEMP",
    "UNIQUE",
    "CONCURRENTLY",
    "LOW_PRIORITY",
    "IGNORE",
    "QUICK",
    "DELAYED",
    "HIGH_PRIORITY",
    "TABLE",
    "VIEW",
    "INDEX",
];

/// The statement's summary as the database conventions describe it: its operations and
/// their targets in the order they appear (`SELECT items`, `INSERT audit SELECT orders`,
/// `SELECT songs artists`), from the sanitized text (no literal can be in it), at most
/// 255 bytes. None when the text starts with no known operation.
pub fn summary(text: &str) -> Option<String> {
    /// Where the walk is, per parenthesis depth (a subquery has its own; its `)` gives the
    /// enclosing one back).
    #[derive(Clone, Copy, Default)]
    struct Clause {
        /// A target name comes next.
        expect: bool,
        /// In a FROM list: a comma expects another target.
        from_list: bool,
    }
    let clean = sanitize(text);
    let mut parts: Vec<String> = Vec::new();
    let mut clause = Clause::default();
    let mut outer: Vec<Clause> = Vec::new();
    // Any operation counts at a statement's start (the text's, after `;`), SELECT at a
    // subquery's `(`; further on only the data operations do (`INSERT .. SELECT`), and not
    // after FOR, DO, ON or KEY (a lock, an upsert's action, a foreign key's rule) or as the
    // first word in parentheses (a column named `start`).
    let mut at_start = true;
    let mut after_open = false;
    let mut first = true;
    let mut prev = String::new();
    for tok in tokens(&clean) {
        match tok {
            Token::Word(w) => {
                let up = w.to_ascii_uppercase();
                let word = up.as_str();
                if first {
                    first = false;
                    if !OPERATIONS.contains(&word) && word != "WITH" {
                        return None;
                    }
                }
                let is_op = OPERATIONS.contains(&word)
                    && (at_start
                        || (after_open && word == "SELECT")
                        || (matches!(word, "SELECT" | "INSERT" | "UPDATE" | "DELETE" | "MERGE")
                            && !matches!(prev.as_str(), "FOR" | "DO" | "ON" | "KEY" | "(")));
                at_start = false;
                after_open = false;
                prev = up.clone();
                let keyword = ENDERS.contains(&word) || QUALIFIERS.contains(&word);
                if clause.expect && !keyword && (!is_op || TARGET_BEFORE.contains(&word)) {
                    parts.push(w.trim_matches(['"', '`', '[', ']']).to_owned());
                    clause.expect = false;
                    continue;
                }
                if TARGET_BEFORE.contains(&word) && (is_op || !OPERATIONS.contains(&word)) {
                    if is_op {
                        parts.push(up.clone());
                    }
                    clause.expect = true;
                    clause.from_list = word == "FROM" || word == "JOIN";
                } else if is_op {
                    parts.push(up.clone());
                    clause = Clause::default();
                } else if ENDERS.contains(&word) {
                    clause = Clause::default();
                }
            }
            Token::Comma if clause.from_list => clause.expect = true,
            Token::Open => {
                outer.push(clause);
                clause = Clause::default();
                after_open = true;
                prev = "(".to_owned();
            }
            Token::Close => {
                clause = outer.pop().unwrap_or_default();
                clause.expect = false;
                (at_start, after_open) = (false, false);
            }
            Token::Semicolon => {
                clause = Clause::default();
                outer.clear();
                (at_start, after_open) = (true, false);
            }
            _ => (at_start, after_open) = (false, false),
        }
    }
    let mut out = String::new();
    for p in parts {
        if out.len() + 1 + p.len() > SUMMARY_MAX {
            break;
        }
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(&p);
    }
    (!out.is_empty()).then_some(out)
}

enum Token<'a> {
    /// A keyword or a name (dotted, quoted with "", `` or []).
    Word(&'a str),
    Comma,
    Open,
    Close,
    Semicolon,
    Other,
}

/// The words and the punctuation that matters of a sanitized statement.
fn tokens(text: &str) -> impl Iterator<Item = Token<'_>> {
    let b = text.as_bytes();
    let mut i = 0;
    std::iter::from_fn(move || {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        let start = i;
        let c = *b.get(i)?;
        i += 1;
        Some(match c {
            b',' => Token::Comma,
            b'(' => Token::Open,
            b')' => Token::Close,
            b';' => Token::Semicolon,
            b'"' | b'`' | b'[' | b'a'..=b'z' | b'A'..=b'Z' | b'_' => {
                // A name: quoted parts and dots join it (schema."Table").
                let mut quote = match c {
                    b'"' => Some(b'"'),
                    b'`' => Some(b'`'),
                    b'[' => Some(b']'),
                    _ => None,
                };
                while i < b.len() {
                    let d = b[i];
                    match quote {
                        Some(q) if d == q => quote = None,
                        Some(_) => {}
                        None if d == b'"' => quote = Some(b'"'),
                        None if d == b'`' => quote = Some(b'`'),
                        None if is_ident(d) || d == b'.' || d == b'$' || d >= 0x80 => {}
                        None => break,
                    }
                    i += 1;
                }
                Token::Word(&text[start..i])
            }
            _ => {
                while i < b.len() && !b[i].is_ascii() {
                    i += 1;
                }
                Token::Other
            }
        })
    })
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
    use super::{sanitize, summary};

    /// The conventions' examples and the statements the tests' programs run.
    #[test]
    fn summaries() {
        let cases = [
            ("SELECT wuser_table.username FROM wuser_table WHERE id = 1", Some("SELECT wuser_table")),
            (
                "INSERT INTO shipping_details (order_id, address) SELECT order_id, address FROM orders WHERE order_id = ?",
                Some("INSERT shipping_details SELECT orders"),
            ),
            ("SELECT * FROM songs, artists WHERE songs.artist_id == artists.id", Some("SELECT songs artists")),
            ("SELECT order_date FROM (SELECT * FROM orders o JOIN customers c ON o.customer_id = c.customer_id)", Some("SELECT SELECT orders customers")),
            ("SELECT name FROM items WHERE id = $1", Some("SELECT items")),
            ("  insert into orders(id, qty) values (?, ?)", Some("INSERT orders")),
            ("UPDATE `stock` SET n = n - 1", Some("UPDATE stock")),
            ("DELETE FROM carts", Some("DELETE carts")),
            ("SELECT a FROM t1 AS x LEFT OUTER JOIN public.t2 y ON x.id = y.id", Some("SELECT t1 public.t2")),
            ("SELECT count(*) FROM audit", Some("SELECT audit")),
            ("BEGIN", Some("BEGIN")),
            ("SELECT 1", Some("SELECT")),
            ("SELECT 'FROM secret' FROM t", Some("SELECT t")),
            ("CREATE TABLE IF NOT EXISTS items (id int)", Some("CREATE items")),
            ("SELECT id FROM jobs WHERE n > 1 FOR UPDATE", Some("SELECT jobs")),
            ("INSERT INTO t (id) VALUES (?) ON CONFLICT (id) DO UPDATE SET n = t.n + 1", Some("INSERT t")),
            ("SET search_path = app", Some("SET")),
            ("BEGIN; UPDATE a SET x = 1; COMMIT", Some("BEGIN UPDATE a COMMIT")),
            ("SELECT a, (SELECT max(x) FROM u), b FROM t", Some("SELECT SELECT u t")),
            ("SELECT * FROM a JOIN (SELECT id FROM b) AS bb ON a.id = bb.id, c", Some("SELECT a SELECT b")),
            ("TRUNCATE TABLE logs", Some("TRUNCATE logs")),
            ("CREATE TABLE o (id int REFERENCES c (id) ON DELETE CASCADE ON UPDATE CASCADE)", Some("CREATE o")),
            ("INSERT INTO r (start, stop) VALUES (?, ?)", Some("INSERT r")),
            ("DELETE FROM t WHERE id IN (SELECT id FROM u)", Some("DELETE t SELECT u")),
            ("hello world", None),
            ("", None),
        ];
        for (text, want) in cases {
            assert_eq!(summary(text).as_deref(), want, "{text}");
        }
        let long = format!("SELECT {}", (0..100).map(|i| format!("a FROM table_number_{i}")).collect::<Vec<_>>().join(", "));
        assert!(summary(&long).unwrap().len() <= 255);
    }

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
