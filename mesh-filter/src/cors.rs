//! CORS (`envoy.filters.http.cors`): answers preflight requests from
//! allowed origins and adds `access-control-*` headers to the responses of
//! cross-origin requests, from the route's (or virtual host's) `CorsPolicy`.
//!
//! As in Envoy, a request is a CORS request when it has a non-empty
//! `origin` header allowed by `allow_origin_string_match` (a matcher that
//! matches `*` allows every origin); it is a preflight when it is also an
//! `OPTIONS` with `access-control-request-method`. A preflight is answered
//! 200 by the proxy with `access-control-allow-{origin,credentials,methods,
//! headers,private-network}` and `-max-age`; other CORS requests go on and
//! their responses get `access-control-allow-origin` (the request's origin),
//! `-allow-credentials` and `-expose-headers`. A preflight from an origin
//! that is not allowed goes upstream unless `forward_not_matching_preflights`
//! is false (then it gets an empty 200).

use crate::fault::{roll, View};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use mesh_core::config::HeaderMatcher;
use mesh_core::policy::{CorsPolicy, FractionalPercent};
use mesh_core::router::CompiledHeaderMatcher;
use mesh_core::stats::{Counter, Store};

/// Envoy's CORS stats (`http.<stat_prefix>.cors.*`).
#[derive(Debug, Clone, Default)]
pub struct CorsStats {
    /// `origin_valid`.
    pub origin_valid: Counter,
    /// `origin_invalid`.
    pub origin_invalid: Counter,
}

impl CorsStats {
    /// Registers the stats of the HCM `stat_prefix`.
    pub fn new(store: &Store, stat_prefix: &str) -> Self {
        let l = vec![("envoy_http_conn_manager_prefix", stat_prefix.to_owned())];
        CorsStats {
            origin_valid: store.counter("envoy_http_cors_origin_valid", &l),
            origin_invalid: store.counter("envoy_http_cors_origin_invalid", &l),
        }
    }
}

/// A compiled CORS policy.
#[derive(Debug)]
pub struct Cors {
    origins: Vec<CompiledHeaderMatcher>,
    allow_methods: Option<HeaderValue>,
    allow_headers: Option<HeaderValue>,
    expose_headers: Option<HeaderValue>,
    max_age: Option<HeaderValue>,
    allow_credentials: bool,
    allow_private_network_access: bool,
    forward_not_matching_preflights: bool,
    enabled: FractionalPercent,
    shadow: Option<FractionalPercent>,
    stats: CorsStats,
    /// `origin: *`, to find matchers that allow every origin.
    star: HeaderMap,
}

/// What the CORS filter decided for one request.
#[derive(Debug)]
pub enum CorsDecision {
    /// Not a CORS request (or the policy is off): nothing to do.
    Skip,
    /// A preflight: answer 200 with these headers now.
    Preflight(HeaderMap),
    /// A CORS request: go on, add these headers to the response.
    Actual(Vec<(HeaderName, HeaderValue)>),
}

fn value(s: &Option<String>, field: &str) -> Result<Option<HeaderValue>, String> {
    match s.as_deref().filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(v) => HeaderValue::from_str(v)
            .map(Some)
            .map_err(|_| format!("{field}: not a valid header value")),
    }
}

impl Cors {
    /// Compiles `policy`, the fields it leaves unset taken from `parent`
    /// (the virtual host's policy of a route).
    pub fn new(
        policy: &CorsPolicy,
        parent: Option<&CorsPolicy>,
        stats: CorsStats,
    ) -> Result<Self, String> {
        let p = policy;
        let up = parent.cloned().unwrap_or_default();
        let pick = |a: &Option<String>, b: &Option<String>| a.clone().or_else(|| b.clone());
        let origins: &[HeaderMatcher] = if p.allow_origin.is_empty() {
            &up.allow_origin
        } else {
            &p.allow_origin
        };
        let origins = origins
            .iter()
            .enumerate()
            .map(|(i, m)| {
                CompiledHeaderMatcher::compile(m, &format!("allow_origin_string_match[{i}]"))
                    .map_err(|e| format!("{}: {}", e.path, e.message))
            })
            .collect::<Result<_, _>>()?;
        Ok(Cors {
            origins,
            allow_methods: value(&pick(&p.allow_methods, &up.allow_methods), "allow_methods")?,
            allow_headers: value(&pick(&p.allow_headers, &up.allow_headers), "allow_headers")?,
            expose_headers: value(
                &pick(&p.expose_headers, &up.expose_headers),
                "expose_headers",
            )?,
            max_age: value(&pick(&p.max_age, &up.max_age), "max_age")?,
            allow_credentials: p.allow_credentials.or(up.allow_credentials) == Some(true),
            allow_private_network_access: p
                .allow_private_network_access
                .or(up.allow_private_network_access)
                == Some(true),
            forward_not_matching_preflights: p
                .forward_not_matching_preflights
                .or(up.forward_not_matching_preflights)
                .unwrap_or(true),
            enabled: p
                .filter_enabled
                .or(up.filter_enabled)
                .unwrap_or(FractionalPercent::HUNDRED),
            shadow: p.shadow_enabled.or(up.shadow_enabled),
            stats,
            star: HeaderMap::from_iter([(http::header::ORIGIN, HeaderValue::from_static("*"))]),
        })
    }

    /// Whether the `origin` of `headers` is allowed.
    fn origin_allowed(&self, headers: &HeaderMap) -> bool {
        self.origins
            .iter()
            .any(|m| m.matches(&View(headers)) || m.matches(&View(&self.star)))
    }

    /// Decides for a request with `method` and `headers`.
    pub fn decide(&self, method: &Method, headers: &HeaderMap) -> CorsDecision {
        let enabled = roll(self.enabled);
        let shadow = !enabled && self.shadow.is_some_and(roll);
        if !enabled && !shadow {
            return CorsDecision::Skip;
        }
        let Some(origin) = headers.get(http::header::ORIGIN).filter(|o| !o.is_empty()) else {
            return CorsDecision::Skip;
        };
        let allowed = self.origin_allowed(headers);
        if allowed {
            self.stats.origin_valid.inc();
        } else {
            self.stats.origin_invalid.inc();
        }
        if shadow {
            return CorsDecision::Skip;
        }
        let request_method = headers
            .get(http::header::ACCESS_CONTROL_REQUEST_METHOD)
            .filter(|m| !m.is_empty());
        let Some(request_method) = request_method.filter(|_| method == Method::OPTIONS) else {
            return match allowed {
                true => CorsDecision::Actual(self.response_headers(origin)),
                false => CorsDecision::Skip,
            };
        };
        if !allowed && self.forward_not_matching_preflights {
            return CorsDecision::Skip;
        }
        // A preflight, answered here. A `*` method or header list echoes
        // what the preflight asks for.
        let mut h = HeaderMap::new();
        if self.allow_credentials {
            h.insert(
                http::header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        let echo = |configured: &Option<HeaderValue>, asked: Option<&HeaderValue>| {
            configured.as_ref().and_then(|v| match v == "*" {
                true => asked.cloned(),
                false => Some(v.clone()),
            })
        };
        if let Some(v) = echo(&self.allow_methods, Some(request_method)) {
            h.insert(http::header::ACCESS_CONTROL_ALLOW_METHODS, v);
        }
        let asked_headers = headers.get(http::header::ACCESS_CONTROL_REQUEST_HEADERS);
        if let Some(v) = echo(&self.allow_headers, asked_headers) {
            h.insert(http::header::ACCESS_CONTROL_ALLOW_HEADERS, v);
        }
        if let Some(v) = &self.max_age {
            h.insert(http::header::ACCESS_CONTROL_MAX_AGE, v.clone());
        }
        if self.allow_private_network_access
            && headers
                .get("access-control-request-private-network")
                .is_some_and(|v| v == "true")
        {
            h.insert(
                HeaderName::from_static("access-control-allow-private-network"),
                HeaderValue::from_static("true"),
            );
        }
        // The answer is a response of a CORS request too.
        if allowed {
            for (k, v) in self.response_headers(origin) {
                h.insert(k, v);
            }
        }
        CorsDecision::Preflight(h)
    }

    /// What the response of a CORS request from an allowed `origin` gets.
    fn response_headers(&self, origin: &HeaderValue) -> Vec<(HeaderName, HeaderValue)> {
        let mut out = vec![(http::header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone())];
        if self.allow_credentials {
            out.push((
                http::header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            ));
        }
        if let Some(v) = &self.expose_headers {
            out.push((http::header::ACCESS_CONTROL_EXPOSE_HEADERS, v.clone()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::config::HeaderMatchKind;

    fn policy() -> CorsPolicy {
        CorsPolicy {
            allow_origin: vec![HeaderMatcher {
                name: "origin".into(),
                kind: HeaderMatchKind::Suffix(".example.com".into()),
                invert: false,
                treat_missing_as_empty: false,
            }],
            allow_methods: Some("GET, PUT".into()),
            max_age: Some("600".into()),
            expose_headers: Some("x-id".into()),
            ..CorsPolicy::default()
        }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (HeaderName::from_static(k), HeaderValue::from_static(v)))
            .collect()
    }

    #[test]
    fn preflight_actual_and_other_origins() {
        let c = Cors::new(&policy(), None, CorsStats::default()).unwrap();
        let pre = headers(&[
            ("origin", "https://a.example.com"),
            ("access-control-request-method", "PUT"),
        ]);
        let CorsDecision::Preflight(h) = c.decide(&Method::OPTIONS, &pre) else {
            panic!("not a preflight answer");
        };
        assert_eq!(h["access-control-allow-origin"], "https://a.example.com");
        assert_eq!(h["access-control-allow-methods"], "GET, PUT");
        assert_eq!(h["access-control-max-age"], "600");
        assert_eq!(h["access-control-expose-headers"], "x-id");
        assert!(h.get("access-control-allow-credentials").is_none());
        let CorsDecision::Actual(h) = c.decide(&Method::GET, &pre) else {
            panic!("not a CORS request");
        };
        assert_eq!(h.len(), 2);
        let evil = headers(&[("origin", "https://evil.test")]);
        assert!(matches!(c.decide(&Method::GET, &evil), CorsDecision::Skip));
        assert!(matches!(
            c.decide(&Method::GET, &HeaderMap::new()),
            CorsDecision::Skip
        ));
    }

    #[test]
    fn a_route_inherits_unset_fields_and_star_allows_all() {
        let route = CorsPolicy {
            allow_origin: vec![HeaderMatcher {
                name: "origin".into(),
                kind: HeaderMatchKind::Exact("*".into()),
                invert: false,
                treat_missing_as_empty: false,
            }],
            allow_credentials: Some(true),
            forward_not_matching_preflights: Some(false),
            ..CorsPolicy::default()
        };
        let c = Cors::new(&route, Some(&policy()), CorsStats::default()).unwrap();
        let pre = headers(&[
            ("origin", "https://evil.test"),
            ("access-control-request-method", "PUT"),
        ]);
        let CorsDecision::Preflight(h) = c.decide(&Method::OPTIONS, &pre) else {
            panic!("not a preflight answer");
        };
        assert_eq!(h["access-control-allow-methods"], "GET, PUT");
        assert_eq!(h["access-control-allow-credentials"], "true");
        assert_eq!(h["access-control-allow-origin"], "https://evil.test");
    }

    #[test]
    fn a_refused_preflight_is_answered_without_origin() {
        let route = CorsPolicy {
            forward_not_matching_preflights: Some(false),
            allow_headers: Some("*".into()),
            ..policy()
        };
        let c = Cors::new(&route, None, CorsStats::default()).unwrap();
        let pre = headers(&[
            ("origin", "https://evil.test"),
            ("access-control-request-method", "PUT"),
            ("access-control-request-headers", "x-q"),
        ]);
        let CorsDecision::Preflight(h) = c.decide(&Method::OPTIONS, &pre) else {
            panic!("not a preflight answer");
        };
        assert!(h.get("access-control-allow-origin").is_none());
        assert!(h.get("access-control-expose-headers").is_none());
        assert_eq!(h["access-control-allow-headers"], "x-q");
    }
}
