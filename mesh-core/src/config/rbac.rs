//! RBAC policies (Envoy `config.rbac.v3.RBAC`), for the
//! `envoy.filters.http.rbac` and `envoy.filters.network.rbac` filters.

use super::tls::{CidrRange, StringMatcher};
use super::HeaderMatcher;

/// `RBAC.action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RbacAction {
    /// `ALLOW`: a request matching a policy is allowed, others denied.
    #[default]
    Allow,
    /// `DENY`: a request matching a policy is denied, others allowed.
    Deny,
    /// `LOG`: always allowed (the match is only reported).
    Log,
}

/// Envoy `config.rbac.v3.RBAC`: an action and named policies.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RbacRules {
    /// `action`.
    pub action: RbacAction,
    /// `policies`, by name (in the file's order).
    pub policies: Vec<(String, RbacPolicy)>,
}

/// Envoy `config.rbac.v3.Policy`: matches when any permission and any
/// principal match.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RbacPolicy {
    /// `permissions`.
    pub permissions: Vec<Permission>,
    /// `principals`.
    pub principals: Vec<Principal>,
}

/// Envoy `config.rbac.v3.Permission`: what is being done.
#[derive(Debug, Clone, PartialEq)]
pub enum Permission {
    /// `any: true`.
    Any,
    /// `and_rules.rules`.
    And(Vec<Permission>),
    /// `or_rules.rules`.
    Or(Vec<Permission>),
    /// `not_rule`.
    Not(Box<Permission>),
    /// `header` (pseudo-headers such as `:method` and `:path` too).
    Header(HeaderMatcher),
    /// `url_path.path`: the path without the query string.
    UrlPath(StringMatcher),
    /// `destination_port`.
    DestinationPort(u16),
    /// `destination_ip`.
    DestinationIp(CidrRange),
}

/// Envoy `config.rbac.v3.Principal`: who is doing it.
#[derive(Debug, Clone, PartialEq)]
pub enum Principal {
    /// `any: true`.
    Any,
    /// `and_ids.ids`.
    And(Vec<Principal>),
    /// `or_ids.ids`.
    Or(Vec<Principal>),
    /// `not_id`.
    Not(Box<Principal>),
    /// `authenticated`: a verified TLS peer; with `principal_name`, its URI
    /// SAN (else DNS SAN, else subject) must match.
    Authenticated(Option<StringMatcher>),
    /// `direct_remote_ip`: the peer address of the connection.
    DirectRemoteIp(CidrRange),
    /// `remote_ip`: the client address (mesh: the peer address, as without
    /// the proxy protocol or XFF trust).
    RemoteIp(CidrRange),
    /// `source_ip` (deprecated alias of `direct_remote_ip`).
    SourceIp(CidrRange),
    /// `header` (HTTP only).
    Header(HeaderMatcher),
}

/// The configuration of an RBAC filter (HTTP or network).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rbac {
    /// `rules`: enforced. `None` allows everything.
    pub rules: Option<RbacRules>,
    /// `shadow_rules`: evaluated and counted only.
    pub shadow_rules: Option<RbacRules>,
    /// `stat_prefix` (network filter: required; HTTP: optional).
    pub stat_prefix: String,
}
