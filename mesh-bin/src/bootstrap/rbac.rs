//! `envoy.filters.http.rbac` and `envoy.filters.network.rbac` typed configs
//! (`config.rbac.v3.RBAC` rules and shadow rules).

use mesh_core::config::rbac::{Permission, Principal, Rbac, RbacAction, RbacPolicy, RbacRules};
use mesh_core::config::tls::CidrRange;

use super::reader::{one_of, Ctx, Obj};
use super::route::{header_matcher, string_matcher};
use super::tls::to_string_matcher;

/// The typed config of either RBAC filter. `network` requires a
/// `stat_prefix` (Envoy does too).
pub(crate) fn rbac(cx: &mut Ctx, mut o: Obj<'_>, network: bool) -> Rbac {
    let stat_prefix = if network {
        o.req_string(cx, "stat_prefix").unwrap_or_default()
    } else {
        String::new()
    };
    let enforced = o.obj(cx, "rules").map(|r| rules(cx, r));
    let shadow_rules = o.obj(cx, "shadow_rules").map(|r| rules(cx, r));
    o.finish(cx);
    Rbac {
        rules: enforced,
        shadow_rules,
        stat_prefix,
    }
}

fn rules(cx: &mut Ctx, mut o: Obj<'_>) -> RbacRules {
    let action = o
        .enumeration(
            cx,
            "action",
            &[
                ("ALLOW", RbacAction::Allow),
                ("DENY", RbacAction::Deny),
                ("LOG", RbacAction::Log),
            ],
            &[],
        )
        .unwrap_or_default();
    let mut policies = Vec::new();
    if let Some(mut ps) = o.obj(cx, "policies") {
        for (name, path, v) in ps.take_all() {
            let Some(mut p) = Obj::new(cx, path, v) else {
                continue;
            };
            let permissions: Vec<Permission> = p
                .list(cx, "permissions")
                .into_iter()
                .filter_map(|(path, v)| Obj::new(cx, path, v).and_then(|o| permission(cx, o)))
                .collect();
            let principals: Vec<Principal> = p
                .list(cx, "principals")
                .into_iter()
                .filter_map(|(path, v)| Obj::new(cx, path, v).and_then(|o| principal(cx, o)))
                .collect();
            if permissions.is_empty() {
                cx.error(&p.at("permissions"), "at least one permission is required");
            }
            if principals.is_empty() {
                cx.error(&p.at("principals"), "at least one principal is required");
            }
            p.finish(cx);
            policies.push((
                name.to_string(),
                RbacPolicy {
                    permissions,
                    principals,
                },
            ));
        }
        ps.finish(cx);
    }
    o.finish(cx);
    RbacRules { action, policies }
}

fn cidr(cx: &mut Ctx, mut o: Obj<'_>) -> Option<CidrRange> {
    let apath = o.at("address_prefix");
    let addr = o.req_string(cx, "address_prefix");
    let lpath = o.at("prefix_len");
    let len = o.u32(cx, "prefix_len");
    o.finish(cx);
    let ip: std::net::IpAddr = match addr?.parse() {
        Ok(ip) => ip,
        Err(_) => {
            cx.error(&apath, "not an IP address");
            return None;
        }
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = len.unwrap_or(max);
    if len > max {
        cx.error(&lpath, format!("must be at most {max}"));
        return None;
    }
    Some(CidrRange {
        address: ip,
        prefix_len: len as u8,
    })
}

const PERMISSION_KEYS: &[&str] = &[
    "any",
    "and_rules",
    "or_rules",
    "not_rule",
    "header",
    "url_path",
    "destination_port",
    "destination_ip",
];

fn permission(cx: &mut Ctx, mut o: Obj<'_>) -> Option<Permission> {
    let given = one_of(cx, &o, PERMISSION_KEYS, true);
    let out = match given {
        Some("any") => {
            let path = o.at("any");
            if o.bool(cx, "any") != Some(true) {
                cx.error(&path, "must be true");
            }
            Some(Permission::Any)
        }
        Some(k @ ("and_rules" | "or_rules")) => o.obj(cx, k).map(|mut s| {
            let rules = s
                .list(cx, "rules")
                .into_iter()
                .filter_map(|(p, v)| Obj::new(cx, p, v).and_then(|o| permission(cx, o)))
                .collect();
            s.finish(cx);
            if k == "and_rules" {
                Permission::And(rules)
            } else {
                Permission::Or(rules)
            }
        }),
        Some("not_rule") => o
            .obj(cx, "not_rule")
            .and_then(|n| permission(cx, n))
            .map(|p| Permission::Not(Box::new(p))),
        Some("header") => o
            .obj(cx, "header")
            .map(|h| Permission::Header(header_matcher(cx, h))),
        Some("url_path") => o.obj(cx, "url_path").and_then(|mut u| {
            u.refuse(cx, "or", "url_path.or is not supported");
            let m = u.obj(cx, "path").and_then(|s| string_matcher(cx, s));
            u.finish(cx);
            m.and_then(to_string_matcher).map(Permission::UrlPath)
        }),
        Some("destination_port") => {
            let path = o.at("destination_port");
            match o.u32(cx, "destination_port").map(u16::try_from) {
                Some(Ok(p)) => Some(Permission::DestinationPort(p)),
                Some(Err(_)) => {
                    cx.error(&path, "expected a port");
                    None
                }
                None => None,
            }
        }
        Some(_) => o
            .obj(cx, "destination_ip")
            .and_then(|c| cidr(cx, c))
            .map(Permission::DestinationIp),
        None => {
            for k in PERMISSION_KEYS {
                o.take(k);
            }
            None
        }
    };
    o.finish(cx);
    out
}

const PRINCIPAL_KEYS: &[&str] = &[
    "any",
    "and_ids",
    "or_ids",
    "not_id",
    "authenticated",
    "direct_remote_ip",
    "remote_ip",
    "source_ip",
    "header",
];

fn principal(cx: &mut Ctx, mut o: Obj<'_>) -> Option<Principal> {
    let given = one_of(cx, &o, PRINCIPAL_KEYS, true);
    let out = match given {
        Some("any") => {
            let path = o.at("any");
            if o.bool(cx, "any") != Some(true) {
                cx.error(&path, "must be true");
            }
            Some(Principal::Any)
        }
        Some(k @ ("and_ids" | "or_ids")) => o.obj(cx, k).map(|mut s| {
            let ids = s
                .list(cx, "ids")
                .into_iter()
                .filter_map(|(p, v)| Obj::new(cx, p, v).and_then(|o| principal(cx, o)))
                .collect();
            s.finish(cx);
            if k == "and_ids" {
                Principal::And(ids)
            } else {
                Principal::Or(ids)
            }
        }),
        Some("not_id") => o
            .obj(cx, "not_id")
            .and_then(|n| principal(cx, n))
            .map(|p| Principal::Not(Box::new(p))),
        Some("authenticated") => o.obj(cx, "authenticated").map(|mut a| {
            let m = a
                .obj(cx, "principal_name")
                .and_then(|s| string_matcher(cx, s))
                .and_then(to_string_matcher);
            a.finish(cx);
            Principal::Authenticated(m)
        }),
        Some(k @ ("direct_remote_ip" | "remote_ip" | "source_ip")) => {
            o.obj(cx, k).and_then(|c| cidr(cx, c)).map(|c| match k {
                "direct_remote_ip" => Principal::DirectRemoteIp(c),
                "remote_ip" => Principal::RemoteIp(c),
                _ => Principal::SourceIp(c),
            })
        }
        Some(_) => o
            .obj(cx, "header")
            .map(|h| Principal::Header(header_matcher(cx, h))),
        None => {
            for k in PRINCIPAL_KEYS {
                o.take(k);
            }
            None
        }
    };
    o.finish(cx);
    out
}
