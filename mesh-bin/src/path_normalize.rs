//! The HTTP connection manager's path normalisation (`normalize_path`,
//! `merge_slashes`, `path_with_escaped_slashes_action`), applied to a
//! request's path before routing, in Envoy's order: escaped slashes first,
//! then RFC 3986 normalisation, then slash merging. The query is never
//! changed.

use mesh_core::config::{EscapedSlashesAction, PathNormalization};

/// What to do with a request after normalising its path.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Route the request with this path and query (`None`: unchanged).
    Continue(Option<String>),
    /// Answer 307 with this `Location` (`UNESCAPE_AND_REDIRECT`).
    Redirect(String),
    /// Answer 400 (`REJECT_REQUEST`, or a path normalisation cannot fix).
    Reject,
}

/// Normalises `path_and_query` (a request target starting with `/`).
pub(crate) fn normalize(cfg: &PathNormalization, path_and_query: &str) -> Outcome {
    let (path, query) = match path_and_query.find('?') {
        Some(i) => path_and_query.split_at(i),
        None => (path_and_query, ""),
    };
    if !path.starts_with('/') {
        // `*` (OPTIONS) and authority forms are left alone.
        return Outcome::Continue(None);
    }
    let mut out = std::borrow::Cow::Borrowed(path);
    let mut redirect = false;
    if cfg.escaped_slashes != EscapedSlashesAction::KeepUnchanged {
        if let Some(unescaped) = unescape_slashes(&out) {
            match cfg.escaped_slashes {
                EscapedSlashesAction::RejectRequest => return Outcome::Reject,
                EscapedSlashesAction::UnescapeAndRedirect => redirect = true,
                _ => {}
            }
            out = unescaped.into();
        }
    }
    if cfg.normalize_path {
        match canonical_path(&out) {
            Some(p) => out = p.into(),
            None => return Outcome::Reject,
        }
    }
    if cfg.merge_slashes && out.contains("//") {
        out = merge_slashes(&out).into();
    }
    if out == path {
        return Outcome::Continue(None);
    }
    let full = format!("{out}{query}");
    if redirect {
        Outcome::Redirect(full)
    } else {
        Outcome::Continue(Some(full))
    }
}

/// `%2F`/`%2f` becomes `/` and `%5C`/`%5c` becomes `\`; `None` when there are none.
fn unescape_slashes(path: &str) -> Option<String> {
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(path.len());
    let mut found = false;
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let pair = [b[i + 1].to_ascii_uppercase(), b[i + 2].to_ascii_uppercase()];
            let c = match &pair {
                b"2F" => Some(b'/'),
                b"5C" => Some(b'\\'),
                _ => None,
            };
            if let Some(c) = c {
                out.push(c);
                found = true;
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    // Only ASCII bytes were replaced: the text stays UTF-8.
    found.then(|| String::from_utf8(out).ok()).flatten()
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

fn unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')
}

/// RFC 3986 normalisation as Envoy's `normalize_path` does it: `\` becomes
/// `/`, escapes of unreserved characters are decoded (other escapes are
/// kept as they are), then `.` and `..` segments are removed (never above the
/// root). A `%` without two hex digits is kept. `None` for a path with a
/// control character.
fn canonical_path(path: &str) -> Option<String> {
    let b = path.as_bytes();
    let mut decoded = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let pair = (
                    b.get(i + 1).copied().and_then(hex),
                    b.get(i + 2).copied().and_then(hex),
                );
                let (Some(hi), Some(lo)) = pair else {
                    // Not an escape: kept as it is, as Envoy does.
                    decoded.push(b'%');
                    i += 1;
                    continue;
                };
                let c = hi * 16 + lo;
                if unreserved(c) {
                    decoded.push(c);
                } else {
                    decoded.push(b'%');
                    decoded.push(b[i + 1]);
                    decoded.push(b[i + 2]);
                }
                i += 3;
                continue;
            }
            b'\\' => decoded.push(b'/'),
            c if c.is_ascii_control() => return None,
            c => decoded.push(c),
        }
        i += 1;
    }
    let text = String::from_utf8(decoded).ok()?;
    Some(remove_dot_segments(&text))
}

/// RFC 3986 section 5.2.4 for an absolute path.
fn remove_dot_segments(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let parts: Vec<&str> = path[1..].split('/').collect();
    let last = parts.len() - 1;
    for (i, seg) in parts.iter().enumerate() {
        match *seg {
            "." | ".." => {
                if *seg == ".." {
                    segments.pop();
                }
                if i == last {
                    // `/a/..` and `/a/.` end with a slash.
                    segments.push("");
                }
            }
            s => segments.push(s),
        }
    }
    format!("/{}", segments.join("/"))
}

fn merge_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if !(c == '/' && out.ends_with('/')) {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(normalize: bool, merge: bool, esc: EscapedSlashesAction) -> PathNormalization {
        PathNormalization {
            normalize_path: normalize,
            merge_slashes: merge,
            escaped_slashes: esc,
        }
    }

    fn run(c: &PathNormalization, p: &str) -> String {
        match normalize(c, p) {
            Outcome::Continue(None) => p.to_string(),
            Outcome::Continue(Some(p)) => p,
            Outcome::Redirect(p) => format!("307 {p}"),
            Outcome::Reject => "400".into(),
        }
    }

    #[test]
    fn rfc3986_normalisation() {
        let c = cfg(true, false, EscapedSlashesAction::KeepUnchanged);
        for (input, want) in [
            ("/a/../b", "/b"),
            ("/a/./b", "/a/b"),
            ("/../../b", "/b"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/a/%2e%2E/b", "/b"),
            ("/%7Euser/%41", "/~user/A"),
            ("/a%2fb", "/a%2fb"),
            ("/a\\b", "/a/b"),
            ("/a//b", "/a//b"),
            ("/a/../b?x=/../y", "/b?x=/../y"),
            ("/a%zz", "/a%zz"),
            ("/a%2", "/a%2"),
            ("/a\u{1}", "400"),
        ] {
            assert_eq!(run(&c, input), want, "{input}");
        }
    }

    #[test]
    fn merge_slashes_after_normalisation() {
        let c = cfg(true, true, EscapedSlashesAction::KeepUnchanged);
        assert_eq!(run(&c, "//a///b/"), "/a/b/");
        assert_eq!(run(&c, "/a/.//../b"), "/a/b");
        let c = cfg(false, true, EscapedSlashesAction::KeepUnchanged);
        assert_eq!(run(&c, "/a//b?q=//"), "/a/b?q=//");
    }

    #[test]
    fn escaped_slashes_actions() {
        use EscapedSlashesAction::*;
        assert_eq!(run(&cfg(false, false, KeepUnchanged), "/a%2Fb"), "/a%2Fb");
        assert_eq!(run(&cfg(false, false, RejectRequest), "/a%2fb"), "400");
        assert_eq!(run(&cfg(false, false, RejectRequest), "/a%5Cb"), "400");
        assert_eq!(run(&cfg(false, false, RejectRequest), "/a/b"), "/a/b");
        assert_eq!(
            run(&cfg(false, false, UnescapeAndRedirect), "/a%2Fb?q=1"),
            "307 /a/b?q=1"
        );
        assert_eq!(
            run(&cfg(false, false, UnescapeAndForward), "/a%2F%2fb"),
            "/a//b"
        );
        assert_eq!(
            run(&cfg(true, true, UnescapeAndForward), "/a%2F%2fb"),
            "/a/b"
        );
        assert_eq!(run(&cfg(true, false, UnescapeAndForward), "/a%5Cb"), "/a/b");
        // Unterminated escapes are left to the other steps.
        assert_eq!(run(&cfg(false, false, UnescapeAndForward), "/a%2"), "/a%2");
    }
}
