//! Role-based access control: Envoy's `envoy.filters.http.rbac` and
//! `envoy.filters.network.rbac` evaluated on a request (or a connection).
//!
//! A policy matches when any of its permissions (what: path, method and
//! other headers, destination port/IP) and any of its principals (who: the
//! verified TLS peer's SPIFFE ID, its address, a header) match; `and`,
//! `or` and `not` combine rules. With `ALLOW`, a request is allowed when
//! some policy matches; with `DENY`, it is denied when some policy matches;
//! `LOG` allows everything. `shadow_rules` are evaluated the same way but
//! only counted (`shadow_allowed` / `shadow_denied`), which is how a new
//! policy is tried on live traffic before it is enforced.
//!
//! The engine reads requests through [`RequestView`], so the same policy
//! works for any protocol that implements it; without a request (the
//! network filter) header, path and method rules never match.

use std::net::SocketAddr;

use mesh_core::config::rbac::{Permission, Principal, Rbac, RbacAction, RbacPolicy, RbacRules};
use mesh_core::config::tls::{CidrRange, StringMatcher};
use mesh_core::identity::PeerIdentity;
use mesh_core::router::CompiledHeaderMatcher;
use mesh_core::stats::{Counter, Store};
use mesh_core::string_match::CompiledStringMatcher;
use mesh_core::view::RequestView;

/// What RBAC knows about the connection a request arrived on.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionFacts<'a> {
    /// The peer address of the connection (`direct_remote_ip`).
    pub peer: SocketAddr,
    /// The local address (`destination_port`, `destination_ip`).
    pub local: SocketAddr,
    /// The verified TLS peer, when the connection is TLS.
    pub identity: Option<&'a PeerIdentity>,
}

/// Compiles `m`; `path` names it in errors.
fn string_matcher(m: &StringMatcher, path: &str) -> Result<CompiledStringMatcher, String> {
    CompiledStringMatcher::compile(m).map_err(|e| format!("{path}: {e}"))
}

#[derive(Debug)]
enum Perm {
    Any,
    And(Vec<Perm>),
    Or(Vec<Perm>),
    Not(Box<Perm>),
    Header(CompiledHeaderMatcher),
    UrlPath(CompiledStringMatcher),
    DestinationPort(u16),
    DestinationIp(CidrRange),
}

#[derive(Debug)]
enum Princ {
    Any,
    And(Vec<Princ>),
    Or(Vec<Princ>),
    Not(Box<Princ>),
    Authenticated(Option<CompiledStringMatcher>),
    DirectRemoteIp(CidrRange),
    RemoteIp(CidrRange),
    Header(CompiledHeaderMatcher),
}

fn compile_perm(p: &Permission, path: &str) -> Result<Perm, String> {
    let list = |ps: &[Permission], key: &str| {
        ps.iter()
            .enumerate()
            .map(|(i, p)| compile_perm(p, &format!("{path}.{key}.rules[{i}]")))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(match p {
        Permission::Any => Perm::Any,
        Permission::And(ps) => Perm::And(list(ps, "and_rules")?),
        Permission::Or(ps) => Perm::Or(list(ps, "or_rules")?),
        Permission::Not(p) => Perm::Not(Box::new(compile_perm(p, &format!("{path}.not_rule"))?)),
        Permission::Header(h) => Perm::Header(
            CompiledHeaderMatcher::compile(h, &format!("{path}.header"))
                .map_err(|e| e.to_string())?,
        ),
        Permission::UrlPath(m) => Perm::UrlPath(string_matcher(m, &format!("{path}.url_path"))?),
        Permission::DestinationPort(p) => Perm::DestinationPort(*p),
        Permission::DestinationIp(c) => Perm::DestinationIp(*c),
    })
}

fn compile_princ(p: &Principal, path: &str) -> Result<Princ, String> {
    let list = |ps: &[Principal], key: &str| {
        ps.iter()
            .enumerate()
            .map(|(i, p)| compile_princ(p, &format!("{path}.{key}.ids[{i}]")))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(match p {
        Principal::Any => Princ::Any,
        Principal::And(ps) => Princ::And(list(ps, "and_ids")?),
        Principal::Or(ps) => Princ::Or(list(ps, "or_ids")?),
        Principal::Not(p) => Princ::Not(Box::new(compile_princ(p, &format!("{path}.not_id"))?)),
        Principal::Authenticated(m) => Princ::Authenticated(match m {
            None => None,
            Some(m) => Some(string_matcher(
                m,
                &format!("{path}.authenticated.principal_name"),
            )?),
        }),
        Principal::DirectRemoteIp(c) | Principal::SourceIp(c) => Princ::DirectRemoteIp(*c),
        Principal::RemoteIp(c) => Princ::RemoteIp(*c),
        Principal::Header(h) => Princ::Header(
            CompiledHeaderMatcher::compile(h, &format!("{path}.header"))
                .map_err(|e| e.to_string())?,
        ),
    })
}

fn path_of(v: &str) -> &str {
    v.split('?').next().unwrap_or(v)
}

impl Perm {
    fn matches<R: RequestView>(&self, req: Option<&R>, c: &ConnectionFacts<'_>) -> bool {
        match self {
            Perm::Any => true,
            Perm::And(ps) => ps.iter().all(|p| p.matches(req, c)),
            Perm::Or(ps) => ps.iter().any(|p| p.matches(req, c)),
            Perm::Not(p) => !p.matches(req, c),
            Perm::Header(h) => req.is_some_and(|r| h.matches(r)),
            Perm::UrlPath(m) => req.is_some_and(|r| m.matches(path_of(r.path()))),
            Perm::DestinationPort(p) => c.local.port() == *p,
            Perm::DestinationIp(cidr) => cidr.contains(c.local.ip()),
        }
    }
}

impl Princ {
    fn matches<R: RequestView>(&self, req: Option<&R>, c: &ConnectionFacts<'_>) -> bool {
        match self {
            Princ::Any => true,
            Princ::And(ps) => ps.iter().all(|p| p.matches(req, c)),
            Princ::Or(ps) => ps.iter().any(|p| p.matches(req, c)),
            Princ::Not(p) => !p.matches(req, c),
            Princ::Authenticated(m) => match (c.identity, m) {
                (Some(id), None) => id.peer_certificate,
                (Some(id), Some(m)) => {
                    id.peer_certificate && id.principal().is_some_and(|p| m.matches(p))
                }
                (None, _) => false,
            },
            Princ::DirectRemoteIp(cidr) | Princ::RemoteIp(cidr) => cidr.contains(c.peer.ip()),
            Princ::Header(h) => req.is_some_and(|r| h.matches(r)),
        }
    }
}

#[derive(Debug)]
struct CompiledPolicy {
    permissions: Vec<Perm>,
    principals: Vec<Princ>,
}

/// Compiled `rules` (or `shadow_rules`).
#[derive(Debug)]
pub struct RbacEngine {
    action: RbacAction,
    policies: Vec<(String, CompiledPolicy)>,
}

impl RbacEngine {
    /// Compiles `rules`; `path` names them in errors.
    pub fn compile(rules: &RbacRules, path: &str) -> Result<Self, String> {
        let mut policies = Vec::new();
        for (name, p) in &rules.policies {
            let ppath = format!("{path}.policies[{name:?}]");
            let RbacPolicy {
                permissions,
                principals,
            } = p;
            let permissions = permissions
                .iter()
                .enumerate()
                .map(|(i, p)| compile_perm(p, &format!("{ppath}.permissions[{i}]")))
                .collect::<Result<_, _>>()?;
            let principals = principals
                .iter()
                .enumerate()
                .map(|(i, p)| compile_princ(p, &format!("{ppath}.principals[{i}]")))
                .collect::<Result<_, _>>()?;
            policies.push((
                name.clone(),
                CompiledPolicy {
                    permissions,
                    principals,
                },
            ));
        }
        Ok(RbacEngine {
            action: rules.action,
            policies,
        })
    }

    /// The first policy (in configuration order) that matches.
    pub fn matching_policy<R: RequestView>(
        &self,
        req: Option<&R>,
        conn: &ConnectionFacts<'_>,
    ) -> Option<&str> {
        self.policies
            .iter()
            .find(|(_, p)| {
                p.permissions.iter().any(|x| x.matches(req, conn))
                    && p.principals.iter().any(|x| x.matches(req, conn))
            })
            .map(|(n, _)| n.as_str())
    }

    /// Whether the request is allowed.
    pub fn allows<R: RequestView>(&self, req: Option<&R>, conn: &ConnectionFacts<'_>) -> bool {
        let matched = self.matching_policy(req, conn).is_some();
        match self.action {
            RbacAction::Allow => matched,
            RbacAction::Deny => !matched,
            RbacAction::Log => true,
        }
    }
}

/// `rbac.allowed`, `rbac.denied`, `rbac.shadow_allowed`, `rbac.shadow_denied`.
#[derive(Debug, Clone)]
pub struct RbacStats {
    /// Requests (connections) allowed by the enforced rules.
    pub allowed: Counter,
    /// Requests (connections) denied.
    pub denied: Counter,
    /// Requests the shadow rules would allow.
    pub shadow_allowed: Counter,
    /// Requests the shadow rules would deny.
    pub shadow_denied: Counter,
}

impl RbacStats {
    /// Registers `<name>_rbac_allowed{labels}`, ... in `store` (for example
    /// `envoy_http_rbac_allowed{envoy_http_conn_manager_prefix=...}`).
    pub fn new(store: &Store, name: &str, labels: &[(&'static str, String)]) -> Self {
        let c = |s: &str| store.counter(&format!("{name}_rbac_{s}"), labels);
        RbacStats {
            allowed: c("allowed"),
            denied: c("denied"),
            shadow_allowed: c("shadow_allowed"),
            shadow_denied: c("shadow_denied"),
        }
    }
}

/// An RBAC filter: enforced rules, shadow rules and stats.
#[derive(Debug)]
pub struct RbacFilter {
    rules: Option<RbacEngine>,
    shadow: Option<RbacEngine>,
    stats: RbacStats,
}

/// The body of the 403 an HTTP RBAC denial answers with (Envoy's text).
pub const DENIED_BODY: &str = "RBAC: access denied";

impl RbacFilter {
    /// Compiles the filter's configuration.
    pub fn new(config: &Rbac, stats: RbacStats) -> Result<Self, String> {
        Ok(RbacFilter {
            rules: config
                .rules
                .as_ref()
                .map(|r| RbacEngine::compile(r, "rules"))
                .transpose()?,
            shadow: config
                .shadow_rules
                .as_ref()
                .map(|r| RbacEngine::compile(r, "shadow_rules"))
                .transpose()?,
            stats,
        })
    }

    /// Evaluates a request (or, with `None`, a connection), counting the
    /// outcome; `false` means deny.
    pub fn check<R: RequestView>(&self, req: Option<&R>, conn: &ConnectionFacts<'_>) -> bool {
        if let Some(shadow) = &self.shadow {
            if shadow.allows(req, conn) {
                self.stats.shadow_allowed.inc();
            } else {
                self.stats.shadow_denied.inc();
            }
        }
        match &self.rules {
            None => true,
            Some(rules) => {
                let ok = rules.allows(req, conn);
                if ok {
                    self.stats.allowed.inc();
                } else {
                    self.stats.denied.inc();
                    tracing::debug!(peer = %conn.peer,
                        principal = ?conn.identity.and_then(|i| i.principal()),
                        "rbac: access denied");
                }
                ok
            }
        }
    }

    /// As [`RbacFilter::check`]; a denial names the enforced policy that
    /// decided it (`None` when an `ALLOW` list matched nothing), for
    /// Envoy's `rbac_access_denied_matched_policy[...]` details.
    pub fn check_policy<R: RequestView>(
        &self,
        req: Option<&R>,
        conn: &ConnectionFacts<'_>,
    ) -> Result<(), Option<&str>> {
        if self.check(req, conn) {
            return Ok(());
        }
        Err(self
            .rules
            .as_ref()
            .filter(|r| r.action == RbacAction::Deny)
            .and_then(|r| r.matching_policy(req, conn)))
    }

    /// The stats.
    pub fn stats(&self) -> &RbacStats {
        &self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::config::tls::StringMatch;
    use mesh_core::config::{HeaderMatchKind, HeaderMatcher};

    fn exact(s: &str) -> StringMatcher {
        StringMatcher {
            kind: StringMatch::Exact(s.into()),
            ignore_case: false,
        }
    }

    fn method(m: &str) -> Permission {
        Permission::Header(HeaderMatcher {
            name: ":method".into(),
            kind: HeaderMatchKind::Exact(m.into()),
            invert: false,
            treat_missing_as_empty: false,
        })
    }

    fn req(m: &str, path: &str) -> http::Request<()> {
        http::Request::builder()
            .method(m)
            .uri(path)
            .header("host", "x")
            .body(())
            .unwrap()
    }

    fn facts(id: Option<&PeerIdentity>) -> ConnectionFacts<'_> {
        ConnectionFacts {
            peer: "10.1.2.3:5000".parse().unwrap(),
            local: "127.0.0.1:8443".parse().unwrap(),
            identity: id,
        }
    }

    #[test]
    fn allow_by_principal_path_and_method() {
        let rules = RbacRules {
            action: RbacAction::Allow,
            policies: vec![(
                "web-reads".into(),
                RbacPolicy {
                    permissions: vec![Permission::And(vec![
                        method("GET"),
                        Permission::UrlPath(StringMatcher {
                            kind: StringMatch::Prefix("/api/".into()),
                            ignore_case: false,
                        }),
                    ])],
                    principals: vec![Principal::Authenticated(Some(exact(
                        "spiffe://cluster.local/ns/default/sa/web",
                    )))],
                },
            )],
        };
        let e = RbacEngine::compile(&rules, "rules").unwrap();
        let web = PeerIdentity {
            uri_sans: vec!["spiffe://cluster.local/ns/default/sa/web".into()],
            peer_certificate: true,
            ..Default::default()
        };
        let other = PeerIdentity {
            uri_sans: vec!["spiffe://cluster.local/ns/default/sa/db".into()],
            peer_certificate: true,
            ..Default::default()
        };
        assert!(e.allows(Some(&req("GET", "/api/x?q=1")), &facts(Some(&web))));
        assert!(!e.allows(Some(&req("POST", "/api/x")), &facts(Some(&web))));
        assert!(!e.allows(Some(&req("GET", "/admin")), &facts(Some(&web))));
        assert!(!e.allows(Some(&req("GET", "/api/x")), &facts(Some(&other))));
        assert!(!e.allows(Some(&req("GET", "/api/x")), &facts(None)));
    }

    #[test]
    fn deny_not_and_ip_rules_and_shadow_stats() {
        let rules = RbacRules {
            action: RbacAction::Deny,
            policies: vec![(
                "block".into(),
                RbacPolicy {
                    permissions: vec![Permission::Not(Box::new(Permission::DestinationPort(9999)))],
                    principals: vec![Principal::Or(vec![
                        Principal::DirectRemoteIp(CidrRange {
                            address: "10.1.0.0".parse().unwrap(),
                            prefix_len: 16,
                        }),
                        Principal::Not(Box::new(Principal::Any)),
                    ])],
                },
            )],
        };
        let store = Store::new();
        let f = RbacFilter::new(
            &Rbac {
                rules: None,
                shadow_rules: Some(rules.clone()),
                stat_prefix: String::new(),
            },
            RbacStats::new(&store, "t", &[]),
        )
        .unwrap();
        // Shadow rules only count: the request is allowed.
        assert!(f.check(Some(&req("GET", "/")), &facts(None)));
        assert_eq!(f.stats().shadow_denied.get(), 1);
        let e = RbacEngine::compile(&rules, "rules").unwrap();
        assert!(!e.allows(Some(&req("GET", "/")), &facts(None)));
        assert!(e.allows(
            None::<&http::Request<()>>,
            &ConnectionFacts {
                peer: "192.168.0.1:1".parse().unwrap(),
                ..facts(None)
            }
        ));
    }
}
