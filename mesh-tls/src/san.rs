//! `match_typed_subject_alt_names`: which peer certificates are accepted by
//! their subject alternative names (SPIFFE IDs as URI SANs in a mesh).

use mesh_core::config::tls::{SanMatcher, SanType};
use mesh_core::string_match::CompiledStringMatcher;

use crate::material::SubjectAltName;
use crate::TlsError;

/// Compiled `match_typed_subject_alt_names`: a certificate passes when any
/// of its SANs matches any matcher of the same type, or when there are no
/// matchers.
#[derive(Debug, Clone, Default)]
pub struct SanMatchers(Vec<(SanType, CompiledStringMatcher)>);

impl SanMatchers {
    /// Compiles the matchers.
    pub fn compile(list: &[SanMatcher]) -> Result<Self, TlsError> {
        let mut out = Vec::new();
        for (i, m) in list.iter().enumerate() {
            let c = CompiledStringMatcher::compile(&m.matcher).map_err(|e| {
                TlsError::Invalid(format!("match_typed_subject_alt_names[{i}].matcher: {e}"))
            })?;
            out.push((m.san_type, c));
        }
        Ok(SanMatchers(out))
    }

    /// True when no matcher is configured.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether a certificate with these SANs is accepted.
    pub fn accepts(&self, sans: &[SubjectAltName]) -> bool {
        if self.0.is_empty() {
            return true;
        }
        sans.iter().any(|san| {
            let (ty, value) = match san {
                SubjectAltName::Dns(v) => (SanType::Dns, v),
                SubjectAltName::Uri(v) => (SanType::Uri, v),
                SubjectAltName::Email(v) => (SanType::Email, v),
                SubjectAltName::Ip(v) => (SanType::IpAddress, v),
            };
            self.0.iter().any(|(t, m)| {
                *t == ty
                    && if ty == SanType::Dns {
                        dns_matches(m, value)
                    } else {
                        m.matches(value)
                    }
            })
        })
    }
}

/// A DNS SAN matches an exact matcher also through a wildcard in the
/// certificate (`*.example.com` matches `a.example.com`), as Envoy does.
fn dns_matches(m: &CompiledStringMatcher, san: &str) -> bool {
    if m.matches(san) {
        return true;
    }
    if let (Some(suffix), Some(want)) = (san.strip_prefix('*'), m.exact()) {
        if let Some((label, rest)) = want.split_once('.') {
            return !label.is_empty() && suffix.eq_ignore_ascii_case(&format!(".{rest}"));
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::config::tls::{StringMatch, StringMatcher};

    fn m(t: SanType, k: StringMatch) -> SanMatcher {
        SanMatcher {
            san_type: t,
            matcher: StringMatcher {
                kind: k,
                ignore_case: false,
            },
        }
    }

    #[test]
    fn uri_and_dns_matchers() {
        let ms = SanMatchers::compile(&[
            m(
                SanType::Uri,
                StringMatch::Prefix("spiffe://cluster.local/ns/default/".into()),
            ),
            m(SanType::Dns, StringMatch::Exact("api.example.com".into())),
        ])
        .unwrap();
        assert!(ms.accepts(&[SubjectAltName::Uri(
            "spiffe://cluster.local/ns/default/sa/web".into()
        )]));
        assert!(!ms.accepts(&[SubjectAltName::Uri(
            "spiffe://cluster.local/ns/other/sa/web".into()
        )]));
        // A DNS value does not satisfy a URI matcher.
        assert!(!ms.accepts(&[SubjectAltName::Dns(
            "spiffe://cluster.local/ns/default/sa/web".into()
        )]));
        assert!(ms.accepts(&[SubjectAltName::Dns("*.example.com".into())]));
        assert!(!ms.accepts(&[]));
        assert!(SanMatchers::default().accepts(&[]));
    }

    #[test]
    fn regex_is_anchored_and_ignore_case_folds() {
        let ms = SanMatchers::compile(&[m(
            SanType::Uri,
            StringMatch::Regex("spiffe://[a-z.]+/ns/prod/sa/.*".into()),
        )])
        .unwrap();
        assert!(ms.accepts(&[SubjectAltName::Uri("spiffe://td.local/ns/prod/sa/x".into())]));
        assert!(!ms.accepts(&[SubjectAltName::Uri(
            "xspiffe://td.local/ns/prod/sa/x".into()
        )]));
        let c = CompiledStringMatcher::compile(&StringMatcher {
            kind: StringMatch::Suffix(".EXAMPLE.com".into()),
            ignore_case: true,
        })
        .unwrap();
        assert!(c.matches("a.example.COM"));
    }
}
