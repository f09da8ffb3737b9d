//! Go build info (`.go.buildinfo`): the toolchain version and the module/build settings,
//! read without running the program. Layout since Go 1.18: 14-byte magic, pointer size,
//! flags (bit 1: strings inline), padding to 32, then two uvarint-prefixed strings.

const MAGIC: &[u8] = b"\xff Go buildinf:";
const FLAG_INLINE: u8 = 0x2;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuildInfo {
    /// e.g. "go1.27.3".
    pub go_version: String,
    /// Main package path, e.g. "example.com/shop/cmd/api".
    pub path: Option<String>,
    /// `build` settings (GOARCH, CGO_ENABLED, DefaultGODEBUG, ...).
    pub settings: Vec<(String, String)>,
    /// The modules the program is built with, (path, version) (`dep` lines; a `=>`
    /// replacement keeps the path and version it replaces).
    pub deps: Vec<(String, String)>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum BuildInfoError {
    /// No magic: not a Go binary (or a very old one).
    NotGo,
    /// Go 1.17 or older pointer format.
    PointerFormat,
    Truncated,
}

impl BuildInfo {
    pub fn parse(section: &[u8]) -> Result<Self, BuildInfoError> {
        let start = find(section, MAGIC).ok_or(BuildInfoError::NotGo)?;
        let s = &section[start..];
        if s.len() < 32 {
            return Err(BuildInfoError::Truncated);
        }
        if s[15] & FLAG_INLINE == 0 {
            return Err(BuildInfoError::PointerFormat);
        }
        let mut rest = &s[32..];
        let version = read_str(&mut rest).ok_or(BuildInfoError::Truncated)?;
        let modinfo = read_str(&mut rest).unwrap_or_default();
        let mut info = BuildInfo { go_version: version, ..Default::default() };
        // modinfo is wrapped in 16-byte sentinels when present.
        let body = if modinfo.len() >= 33 { &modinfo[16..modinfo.len() - 16] } else { "" };
        for line in body.lines() {
            let mut parts = line.splitn(3, '\t');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("path"), Some(p), _) => info.path = Some(p.to_owned()),
                (Some("dep"), Some(p), v) => info.deps.push((p.to_owned(), v.unwrap_or("").split('\t').next().unwrap_or("").to_owned())),
                (Some("build"), Some(kv), _) => {
                    if let Some((k, v)) = kv.split_once('=') {
                        info.settings.push((k.to_owned(), v.to_owned()));
                    }
                }
                _ => {}
            }
        }
        Ok(info)
    }

    pub fn setting(&self, key: &str) -> Option<&str> {
        self.settings.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// (major, minor, patch) of a release version such as go1.22.10 or go1.23rc1.
    pub fn version_tuple(&self) -> Option<(u32, u32, u32)> {
        parse_go_version(&self.go_version)
    }
}

pub fn parse_go_version(v: &str) -> Option<(u32, u32, u32)> {
    let v = v.strip_prefix("go")?;
    let v = v.split([' ', '-', '+']).next()?;
    let mut it = v.split('.');
    let major = it.next()?.parse().ok()?;
    let minor_raw = it.next()?;
    let minor_digits: String = minor_raw.chars().take_while(|c| c.is_ascii_digit()).collect();
    let minor = minor_digits.parse().ok()?;
    let patch = it.next().map(|p| p.chars().take_while(|c| c.is_ascii_digit()).collect::<String>()).and_then(|p| p.parse().ok()).unwrap_or(0);
    Some((major, minor, patch))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn read_uvarint(b: &mut &[u8]) -> Option<u64> {
    let mut x = 0u64;
    for (i, &byte) in b.iter().enumerate().take(10) {
        x |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            *b = &b[i + 1..];
            return Some(x);
        }
    }
    None
}

fn read_str(b: &mut &[u8]) -> Option<String> {
    let n = read_uvarint(b)? as usize;
    if n > b.len() {
        return None;
    }
    let s = String::from_utf8_lossy(&b[..n]).into_owned();
    *b = &b[n..];
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(version: &str, modinfo: &str) -> Vec<u8> {
        let mut s = MAGIC.to_vec();
        s.push(8);
        s.push(FLAG_INLINE);
        s.resize(32, 0);
        s.push(version.len() as u8);
        s.extend_from_slice(version.as_bytes());
        let mut n = modinfo.len();
        while n >= 0x80 {
            s.push((n as u8) | 0x80);
            n >>= 7;
        }
        s.push(n as u8);
        s.extend_from_slice(modinfo.as_bytes());
        s
    }

    #[test]
    fn parses_inline_format() {
        let sentinel = "0123456789abcdef";
        let modinfo = format!(
            "{sentinel}path\texample.com/demo\nmod\texample.com/demo\t(devel)\t\ndep\tgithub.com/lib/pq\tv1.12.3\n=>\t/src/pq\t(devel)\t\nbuild\tGOARCH=amd64\nbuild\tCGO_ENABLED=0\n{sentinel}"
        );
        let info = BuildInfo::parse(&section("go1.22.10", &modinfo)).unwrap();
        assert_eq!(info.go_version, "go1.22.10");
        assert_eq!(info.path.as_deref(), Some("example.com/demo"));
        assert_eq!(info.setting("GOARCH"), Some("amd64"));
        assert_eq!(info.setting("CGO_ENABLED"), Some("0"));
        assert_eq!(info.deps, [("github.com/lib/pq".to_owned(), "v1.12.3".to_owned())]);
        assert_eq!(info.version_tuple(), Some((1, 22, 10)));
    }

    #[test]
    fn rejects_non_go_and_old_formats() {
        assert_eq!(BuildInfo::parse(b"hello world, nothing here").unwrap_err(), BuildInfoError::NotGo);
        let mut old = section("go1.16", "");
        old[15] = 0;
        assert_eq!(BuildInfo::parse(&old).unwrap_err(), BuildInfoError::PointerFormat);
        let mut cut = section("go1.21.13", "");
        cut.truncate(20);
        assert_eq!(BuildInfo::parse(&cut).unwrap_err(), BuildInfoError::Truncated);
    }

    #[test]
    fn version_forms() {
        assert_eq!(parse_go_version("go1.21.13"), Some((1, 21, 13)));
        assert_eq!(parse_go_version("go1.23rc1"), Some((1, 23, 0)));
        assert_eq!(parse_go_version("go1.24"), Some((1, 24, 0)));
        assert_eq!(parse_go_version("go1.25.5 X:nocoverageredesign"), Some((1, 25, 5)));
        assert_eq!(parse_go_version("devel +abc"), None);
    }
}
