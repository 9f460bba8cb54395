//! Compiled Envoy `type.matcher.v3.StringMatcher`s ([`StringMatcher`]), as
//! the RBAC engine (`url_path`, `principal_name`) and TLS
//! `match_typed_subject_alt_names` compare values. (Header matchers have
//! their own compiled form in [`crate::router`], with presence and range
//! matches.)

use crate::config::tls::{StringMatch, StringMatcher};

/// A compiled [`StringMatcher`].
#[derive(Debug, Clone)]
pub struct CompiledStringMatcher {
    kind: Kind,
    ignore_case: bool,
}

#[derive(Debug, Clone)]
enum Kind {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
    Regex(regex::Regex),
}

impl CompiledStringMatcher {
    /// Compiles `m`: a regex must match the whole value; `ignore_case`
    /// folds the other kinds (Envoy ignores it for regexes). The error is
    /// the regex compiler's message.
    pub fn compile(m: &StringMatcher) -> Result<Self, String> {
        let fold = |s: &String| {
            if m.ignore_case {
                s.to_lowercase()
            } else {
                s.clone()
            }
        };
        let kind = match &m.kind {
            StringMatch::Exact(s) => Kind::Exact(fold(s)),
            StringMatch::Prefix(s) => Kind::Prefix(fold(s)),
            StringMatch::Suffix(s) => Kind::Suffix(fold(s)),
            StringMatch::Contains(s) => Kind::Contains(fold(s)),
            StringMatch::Regex(r) => {
                Kind::Regex(regex::Regex::new(&format!("^(?:{r})$")).map_err(|e| e.to_string())?)
            }
        };
        Ok(CompiledStringMatcher {
            kind,
            ignore_case: m.ignore_case,
        })
    }

    /// Whether `value` matches.
    pub fn matches(&self, value: &str) -> bool {
        let lowered;
        let v = if self.ignore_case && !matches!(self.kind, Kind::Regex(_)) {
            lowered = value.to_lowercase();
            lowered.as_str()
        } else {
            value
        };
        match &self.kind {
            Kind::Exact(s) => v == s,
            Kind::Prefix(s) => v.starts_with(s.as_str()),
            Kind::Suffix(s) => v.ends_with(s.as_str()),
            Kind::Contains(s) => v.contains(s.as_str()),
            Kind::Regex(r) => r.is_match(v),
        }
    }

    /// The value of an `exact` matcher (lower-cased with `ignore_case`).
    pub fn exact(&self) -> Option<&str> {
        match &self.kind {
            Kind::Exact(s) => Some(s),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(kind: StringMatch, ignore_case: bool) -> CompiledStringMatcher {
        CompiledStringMatcher::compile(&StringMatcher { kind, ignore_case }).unwrap()
    }

    #[test]
    fn kinds_fold_case_and_regexes_match_the_whole_value() {
        assert!(compile(StringMatch::Exact("/a".into()), false).matches("/a"));
        assert!(!compile(StringMatch::Exact("/a".into()), false).matches("/A"));
        assert!(compile(StringMatch::Prefix("/API".into()), true).matches("/api/x"));
        assert!(compile(StringMatch::Suffix(".Com".into()), true).matches("A.COM"));
        assert!(compile(StringMatch::Contains("mid".into()), false).matches("amidst"));
        let re = compile(StringMatch::Regex("[a-z]+".into()), true);
        assert!(re.matches("abc"));
        assert!(!re.matches("ABC"), "ignore_case does not apply to regexes");
        assert!(!re.matches("abc1"), "anchored at both ends");
        assert_eq!(
            compile(StringMatch::Exact("A.b".into()), true).exact(),
            Some("a.b")
        );
        let bad = StringMatcher {
            kind: StringMatch::Regex("(".into()),
            ignore_case: false,
        };
        assert!(CompiledStringMatcher::compile(&bad).is_err());
    }
}
