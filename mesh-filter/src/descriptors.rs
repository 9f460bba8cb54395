//! Rate limit descriptors: what a route's and virtual host's `rate_limits`
//! make of a request (Envoy `config.route.v3.RateLimit`), for the local
//! rate limit filter to look up its `descriptors` buckets.
//!
//! Each `rate_limits` entry makes at most one descriptor: the entries of its
//! actions, in order. When an action cannot produce its entry (a missing
//! header, headers that do not match), the whole descriptor is dropped, as
//! in Envoy, unless the action is a `request_headers` with
//! `skip_if_absent`, which drops only its own entry.

use std::net::SocketAddr;

use mesh_core::policy::{RateLimitAction, RateLimitPolicy};
use mesh_core::router::CompiledHeaderMatcher;
use mesh_core::view::RequestView;

/// One descriptor: `(key, value)` entries in order.
pub type Descriptor = Vec<(String, String)>;

#[derive(Debug)]
enum Action {
    RequestHeaders {
        header_name: String,
        descriptor_key: String,
        skip_if_absent: bool,
    },
    RemoteAddress,
    GenericKey(String, String),
    HeaderValueMatch {
        key: String,
        value: String,
        expect_match: bool,
        headers: Vec<CompiledHeaderMatcher>,
    },
    DestinationCluster,
}

/// A compiled `rate_limits` entry.
#[derive(Debug)]
pub struct RateLimitEntry {
    stage: u32,
    actions: Vec<Action>,
}

/// What the actions may read of a request besides its headers.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    /// The downstream peer (`remote_address`).
    pub remote: SocketAddr,
    /// The route's cluster (`destination_cluster`), when it has one.
    pub cluster: Option<&'a str>,
}

impl RateLimitEntry {
    /// Compiles `p`; `path` names it in errors.
    pub fn compile(p: &RateLimitPolicy, path: &str) -> Result<Self, String> {
        let mut actions = Vec::with_capacity(p.actions.len());
        for (i, a) in p.actions.iter().enumerate() {
            actions.push(match a {
                RateLimitAction::RequestHeaders {
                    header_name,
                    descriptor_key,
                    skip_if_absent,
                } => Action::RequestHeaders {
                    header_name: header_name.clone(),
                    descriptor_key: descriptor_key.clone(),
                    skip_if_absent: *skip_if_absent,
                },
                RateLimitAction::RemoteAddress => Action::RemoteAddress,
                RateLimitAction::GenericKey {
                    descriptor_key,
                    descriptor_value,
                } => Action::GenericKey(descriptor_key.clone(), descriptor_value.clone()),
                RateLimitAction::HeaderValueMatch {
                    descriptor_key,
                    descriptor_value,
                    expect_match,
                    headers,
                } => Action::HeaderValueMatch {
                    key: descriptor_key.clone(),
                    value: descriptor_value.clone(),
                    expect_match: *expect_match,
                    headers: headers
                        .iter()
                        .enumerate()
                        .map(|(j, h)| {
                            CompiledHeaderMatcher::compile(
                                h,
                                &format!("{path}.actions[{i}].header_value_match.headers[{j}]"),
                            )
                            .map_err(|e| format!("{}: {}", e.path, e.message))
                        })
                        .collect::<Result<_, _>>()?,
                },
                RateLimitAction::DestinationCluster => Action::DestinationCluster,
            });
        }
        Ok(RateLimitEntry {
            stage: p.stage,
            actions,
        })
    }

    /// The entry's `stage`.
    pub fn stage(&self) -> u32 {
        self.stage
    }

    /// The descriptor this entry makes of `req`, if every action produced
    /// its part (an empty descriptor counts as none).
    pub fn descriptor<R: RequestView>(
        &self,
        req: &R,
        facts: RequestFacts<'_>,
    ) -> Option<Descriptor> {
        let mut out = Vec::with_capacity(self.actions.len());
        for a in &self.actions {
            match a {
                Action::RequestHeaders {
                    header_name,
                    descriptor_key,
                    skip_if_absent,
                } => {
                    let value = if header_name.starts_with(':') {
                        req.pseudo_or_header(header_name).map(|v| v.into_owned())
                    } else {
                        req.header(header_name).map(str::to_owned)
                    };
                    match value {
                        Some(v) => out.push((descriptor_key.clone(), v)),
                        None if *skip_if_absent => {}
                        None => return None,
                    }
                }
                Action::RemoteAddress => {
                    out.push(("remote_address".to_owned(), facts.remote.ip().to_string()))
                }
                Action::GenericKey(k, v) => out.push((k.clone(), v.clone())),
                Action::HeaderValueMatch {
                    key,
                    value,
                    expect_match,
                    headers,
                } => {
                    if headers.iter().all(|h| h.matches(req)) != *expect_match {
                        return None;
                    }
                    out.push((key.clone(), value.clone()));
                }
                Action::DestinationCluster => {
                    out.push(("destination_cluster".to_owned(), facts.cluster?.to_owned()))
                }
            }
        }
        (!out.is_empty()).then_some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::config::{HeaderMatchKind, HeaderMatcher};

    fn facts() -> RequestFacts<'static> {
        RequestFacts {
            remote: "10.0.0.7:5555".parse().unwrap(),
            cluster: Some("web"),
        }
    }

    fn req(headers: &[(&str, &str)]) -> http::Request<()> {
        let mut b = http::Request::builder()
            .uri("http://h/p?q=1")
            .method("POST");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    fn entry(actions: Vec<RateLimitAction>) -> RateLimitEntry {
        RateLimitEntry::compile(&RateLimitPolicy { stage: 0, actions }, "rate_limits[0]").unwrap()
    }

    #[test]
    fn actions_make_entries_in_order() {
        let e = entry(vec![
            RateLimitAction::GenericKey {
                descriptor_key: "generic_key".into(),
                descriptor_value: "g".into(),
            },
            RateLimitAction::RequestHeaders {
                header_name: "x-user".into(),
                descriptor_key: "user".into(),
                skip_if_absent: false,
            },
            RateLimitAction::RequestHeaders {
                header_name: ":path".into(),
                descriptor_key: "path".into(),
                skip_if_absent: false,
            },
            RateLimitAction::RemoteAddress,
            RateLimitAction::DestinationCluster,
        ]);
        let d = e.descriptor(&req(&[("x-user", "ann")]), facts()).unwrap();
        let want: Descriptor = [
            ("generic_key", "g"),
            ("user", "ann"),
            ("path", "/p?q=1"),
            ("remote_address", "10.0.0.7"),
            ("destination_cluster", "web"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(d, want);
        // A missing header drops the whole descriptor.
        assert_eq!(e.descriptor(&req(&[]), facts()), None);
    }

    #[test]
    fn skip_if_absent_drops_only_the_entry() {
        let e = entry(vec![
            RateLimitAction::RequestHeaders {
                header_name: "x-user".into(),
                descriptor_key: "user".into(),
                skip_if_absent: true,
            },
            RateLimitAction::GenericKey {
                descriptor_key: "k".into(),
                descriptor_value: "v".into(),
            },
        ]);
        assert_eq!(
            e.descriptor(&req(&[]), facts()),
            Some(vec![("k".into(), "v".into())])
        );
    }

    #[test]
    fn header_value_match_and_expect_match() {
        let m = |expect_match| {
            entry(vec![RateLimitAction::HeaderValueMatch {
                descriptor_key: "header_match".into(),
                descriptor_value: "beta".into(),
                expect_match,
                headers: vec![HeaderMatcher {
                    name: "x-beta".into(),
                    kind: HeaderMatchKind::Present(true),
                    invert: false,
                    treat_missing_as_empty: false,
                }],
            }])
        };
        let with = req(&[("x-beta", "1")]);
        let without = req(&[]);
        assert!(m(true).descriptor(&with, facts()).is_some());
        assert!(m(true).descriptor(&without, facts()).is_none());
        assert!(m(false).descriptor(&with, facts()).is_none());
        assert_eq!(
            m(false).descriptor(&without, facts()),
            Some(vec![("header_match".into(), "beta".into())])
        );
    }
}
