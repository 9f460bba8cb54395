//! Load-balancing configuration: a cluster's `lb_policy` /
//! `load_balancing_policy` and their settings (`least_request_lb_config`,
//! `ring_hash_lb_config`, `maglev_lb_config`, `common_lb_config`,
//! `lb_subset_config`), the load assignment `policy`, endpoint metadata,
//! and a route's `hash_policy` and `metadata_match`.
//!
//! Limits follow Envoy's validation rules: `choice_count` ≥ 2, ring sizes
//! at most 8M (8388608) with the minimum not above the maximum, a Maglev
//! table size that is prime and at most 5000011, an overprovisioning
//! factor above 0, percentages from 0 to 100.

use mesh_core::config::socket_match::TRANSPORT_SOCKET_MATCH_NAMESPACE;
use mesh_core::config::{
    HashPolicy, HashPolicyKind, HealthStatus, LbConfig, LbMetadata, LbPolicy, MetadataValue,
    SubsetConfig, SubsetFallback, ZoneAwareConfig,
};
use serde_json::Value;

use super::reader::{describe, one_of, Ctx, Obj};

/// Envoy's largest ring (`ring_hash_lb_config.*_ring_size`).
const MAX_RING_SIZE: u64 = 8 * 1024 * 1024;
/// Envoy's largest Maglev table.
const MAX_MAGLEV_TABLE: u64 = 5_000_011;

const TYPE_PREFIX: &str = "type.googleapis.com/";

/// The typed extensions of `load_balancing_policy.policies[]`, by
/// extension name and `@type`.
const POLICIES: &[(&str, &str, LbPolicy)] = &[
    (
        "envoy.load_balancing_policies.round_robin",
        "envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin",
        LbPolicy::RoundRobin,
    ),
    (
        "envoy.load_balancing_policies.random",
        "envoy.extensions.load_balancing_policies.random.v3.Random",
        LbPolicy::Random,
    ),
    (
        "envoy.load_balancing_policies.least_request",
        "envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest",
        LbPolicy::LeastRequest,
    ),
    (
        "envoy.load_balancing_policies.ring_hash",
        "envoy.extensions.load_balancing_policies.ring_hash.v3.RingHash",
        LbPolicy::RingHash,
    ),
    (
        "envoy.load_balancing_policies.maglev",
        "envoy.extensions.load_balancing_policies.maglev.v3.Maglev",
        LbPolicy::Maglev,
    ),
    (
        "mesh.load_balancing_policies.peak_ewma",
        "mesh.load_balancing_policies.peak_ewma.PeakEwma",
        LbPolicy::PeakEwma,
    ),
];

fn as_f64(cx: &mut Ctx, path: &str, v: &Value) -> Option<f64> {
    let n = match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.parse::<f64>().ok(),
        _ => None,
    };
    match n {
        Some(n) if n.is_finite() => Some(n),
        _ => {
            cx.error(path, format!("expected a number, found {}", describe(v)));
            None
        }
    }
}

/// A `type.v3.Percent` (`{value: 50.0}`), 0 to 100.
fn percent(cx: &mut Ctx, o: &mut Obj<'_>, key: &str) -> Option<f64> {
    let mut p = o.obj(cx, key)?;
    let path = p.at("value");
    let v = p
        .take("value")
        .and_then(|v| as_f64(cx, &path, v))
        .unwrap_or(0.0);
    p.finish(cx);
    if !(0.0..=100.0).contains(&v) {
        cx.error(&path, "must be from 0 to 100");
        return None;
    }
    Some(v)
}

/// A `google.protobuf.UInt32Value`/`UInt64Value` wrapper: `{value: N}` or,
/// as the JSON mapping allows, a bare number.
fn wrapped_u64(cx: &mut Ctx, o: &mut Obj<'_>, key: &str) -> Option<u64> {
    match o.peek(key) {
        Some(Value::Object(_)) => {
            let mut w = o.obj(cx, key)?;
            let v = w.u64(cx, "value");
            w.finish(cx);
            v
        }
        Some(_) => o.u64(cx, key),
        None => {
            o.take(key);
            None
        }
    }
}

/// The cluster's policy and settings. `o` is the cluster; `lb_policy` was
/// read from its `lb_policy` field.
pub(crate) fn cluster_lb(
    cx: &mut Ctx,
    o: &mut Obj<'_>,
    lb_policy: LbPolicy,
) -> (LbPolicy, LbConfig) {
    let mut cfg = LbConfig::default();
    let mut policy = lb_policy;
    if let Some(mut lr) = o.obj(cx, "least_request_lb_config") {
        least_request(cx, &mut lr, &mut cfg);
        lr.refuse(cx, "slow_start_config", "slow start is not supported");
        lr.finish(cx);
    }
    if let Some(mut rh) = o.obj(cx, "ring_hash_lb_config") {
        ring_hash(cx, &mut rh, &mut cfg);
        rh.finish(cx);
    }
    if let Some(mut m) = o.obj(cx, "maglev_lb_config") {
        maglev(cx, &mut m, &mut cfg);
        m.finish(cx);
    }
    if let Some(mut c) = o.obj(cx, "common_lb_config") {
        common(cx, &mut c, &mut cfg);
        c.finish(cx);
    }
    if let Some(s) = o.obj(cx, "lb_subset_config") {
        cfg.subset = Some(subset(cx, s));
    }
    if let Some(p) = o.obj(cx, "load_balancing_policy") {
        if let Some(p) = load_balancing_policy(cx, p, &mut cfg) {
            policy = p;
        }
    }
    (policy, cfg)
}

fn least_request(cx: &mut Ctx, o: &mut Obj<'_>, cfg: &mut LbConfig) {
    let path = o.at("choice_count");
    if let Some(n) = wrapped_u64(cx, o, "choice_count") {
        if n < 2 {
            cx.error(&path, "must be at least 2");
        } else {
            cfg.choice_count = n.min(u64::from(u32::MAX)) as u32;
        }
    }
    if let Some(mut b) = o.obj(cx, "active_request_bias") {
        let bpath = b.at("default_value");
        let v = b.take("default_value").and_then(|v| as_f64(cx, &bpath, v));
        b.refuse(cx, "runtime_key", "runtime keys are not supported");
        b.finish(cx);
        match v {
            Some(v) if v >= 0.0 => cfg.active_request_bias = v,
            Some(_) => cx.error(&bpath, "must be at least 0"),
            None => {}
        }
    }
}

fn ring_hash(cx: &mut Ctx, o: &mut Obj<'_>, cfg: &mut LbConfig) {
    o.enumeration(
        cx,
        "hash_function",
        &[("XX_HASH", ()), ("DEFAULT_HASH", ())],
        &[("MURMUR_HASH_2", "only XX_HASH")],
    );
    let min_path = o.at("minimum_ring_size");
    let max_path = o.at("maximum_ring_size");
    let min = wrapped_u64(cx, o, "minimum_ring_size");
    let max = wrapped_u64(cx, o, "maximum_ring_size");
    for (v, path) in [(min, &min_path), (max, &max_path)] {
        if let Some(v) = v {
            if v > MAX_RING_SIZE {
                cx.error(path, format!("must be at most {MAX_RING_SIZE}, found {v}"));
            } else if v == 0 {
                cx.error(path, "must be at least 1");
            }
        }
    }
    if let Some(v) = min.filter(|v| (1..=MAX_RING_SIZE).contains(v)) {
        cfg.minimum_ring_size = v;
    }
    if let Some(v) = max.filter(|v| (1..=MAX_RING_SIZE).contains(v)) {
        cfg.maximum_ring_size = v;
    }
    if cfg.minimum_ring_size > cfg.maximum_ring_size {
        cx.error(
            &min_path,
            format!(
                "minimum_ring_size ({}) must not be greater than maximum_ring_size ({})",
                cfg.minimum_ring_size, cfg.maximum_ring_size
            ),
        );
    }
    if let Some(h) = o.obj(cx, "consistent_hashing_lb_config") {
        consistent_hashing(cx, h, cfg);
    }
    // The cluster-level message's own `use_hostname_for_hashing` is gone in
    // v3; the typed extension's is handled by the caller.
    o.refuse(cx, "hash_balance_factor", "bounded load is not supported");
}

fn consistent_hashing(cx: &mut Ctx, mut o: Obj<'_>, cfg: &mut LbConfig) {
    if let Some(b) = o.bool(cx, "use_hostname_for_hashing") {
        cfg.use_hostname_for_hashing = b;
    }
    o.refuse(cx, "hash_balance_factor", "bounded load is not supported");
    o.finish(cx);
}

fn maglev(cx: &mut Ctx, o: &mut Obj<'_>, cfg: &mut LbConfig) {
    let path = o.at("table_size");
    if let Some(n) = wrapped_u64(cx, o, "table_size") {
        if n > MAX_MAGLEV_TABLE {
            cx.error(
                &path,
                format!("must be at most {MAX_MAGLEV_TABLE}, found {n}"),
            );
        } else if !mesh_lb::is_prime(n) {
            cx.error(&path, format!("must be a prime number, found {n}"));
        } else {
            cfg.maglev_table_size = n;
        }
    }
    if let Some(h) = o.obj(cx, "consistent_hashing_lb_config") {
        consistent_hashing(cx, h, cfg);
    }
}

fn zone_aware(cx: &mut Ctx, mut z: Obj<'_>) -> ZoneAwareConfig {
    let mut za = ZoneAwareConfig::default();
    if let Some(p) = percent(cx, &mut z, "routing_enabled") {
        za.routing_enabled = p;
    }
    if let Some(n) = wrapped_u64(cx, &mut z, "min_cluster_size") {
        za.min_cluster_size = n;
    }
    if let Some(b) = z.bool(cx, "fail_traffic_on_panic") {
        za.fail_traffic_on_panic = b;
    }
    z.refuse(cx, "force_local_zone", "force_local_zone is not supported");
    z.finish(cx);
    za
}

/// `locality_weighted_lb_config` / `zone_aware_lb_config` (one of).
fn locality_config(cx: &mut Ctx, o: &mut Obj<'_>, cfg: &mut LbConfig) {
    match one_of(
        cx,
        o,
        &["zone_aware_lb_config", "locality_weighted_lb_config"],
        false,
    ) {
        Some("zone_aware_lb_config") => {
            if let Some(z) = o.obj(cx, "zone_aware_lb_config") {
                cfg.zone_aware = Some(zone_aware(cx, z));
            }
        }
        Some(_) => {
            o.empty_obj(cx, "locality_weighted_lb_config");
            cfg.locality_weighted = true;
        }
        None => {
            o.take("zone_aware_lb_config");
            o.take("locality_weighted_lb_config");
        }
    }
}

fn common(cx: &mut Ctx, o: &mut Obj<'_>, cfg: &mut LbConfig) {
    if let Some(p) = percent(cx, o, "healthy_panic_threshold") {
        cfg.healthy_panic_threshold = p;
    }
    locality_config(cx, o, cfg);
    if let Some(h) = o.obj(cx, "consistent_hashing_lb_config") {
        consistent_hashing(cx, h, cfg);
    }
    // `update_merge_window` only batches updates in Envoy; mesh applies
    // each update at once.
    o.duration(cx, "update_merge_window");
    for (k, why) in [
        (
            "ignore_new_hosts_until_first_hc",
            "arrives with active health checking",
        ),
        ("close_connections_on_host_set_change", "not supported"),
        ("override_host_status", "not supported"),
    ] {
        o.refuse(cx, k, why);
    }
}

fn subset(cx: &mut Ctx, mut o: Obj<'_>) -> SubsetConfig {
    let mut s = SubsetConfig {
        fallback_policy: o
            .enumeration(
                cx,
                "fallback_policy",
                &[
                    ("NO_FALLBACK", SubsetFallback::NoFallback),
                    ("ANY_ENDPOINT", SubsetFallback::AnyEndpoint),
                    ("DEFAULT_SUBSET", SubsetFallback::DefaultSubset),
                ],
                &[],
            )
            .unwrap_or_default(),
        ..SubsetConfig::default()
    };
    if let Some(d) = o.obj(cx, "default_subset") {
        s.default_subset = struct_values(cx, d);
    }
    for (path, v) in o.list(cx, "subset_selectors") {
        let Some(mut sel) = Obj::new(cx, path, v) else {
            continue;
        };
        let keys_path = sel.at("keys");
        let mut keys: Vec<String> = sel
            .strings(cx, "keys")
            .into_iter()
            .map(|(_, k)| k)
            .collect();
        keys.sort();
        keys.dedup();
        if keys.is_empty() {
            cx.error(&keys_path, "at least one key is required");
        }
        sel.refuse(cx, "single_host_per_subset", "not supported");
        sel.refuse(cx, "fallback_keys_subset", "not supported");
        sel.enumeration(
            cx,
            "fallback_policy",
            &[("NOT_DEFINED", ())],
            &[
                ("NO_FALLBACK", "per-selector fallback is not supported"),
                ("ANY_ENDPOINT", "per-selector fallback is not supported"),
                ("DEFAULT_SUBSET", "per-selector fallback is not supported"),
                ("KEYS_SUBSET", "per-selector fallback is not supported"),
            ],
        );
        sel.finish(cx);
        if !keys.is_empty() {
            s.selectors.push(keys);
        }
    }
    for k in [
        "locality_weight_aware",
        "scale_locality_weight",
        "panic_mode_any",
        "list_as_any",
        "metadata_fallback_policy",
        "allow_redundant_keys",
    ] {
        o.refuse(cx, k, "not supported");
    }
    o.finish(cx);
    s
}

fn load_balancing_policy(cx: &mut Ctx, mut o: Obj<'_>, cfg: &mut LbConfig) -> Option<LbPolicy> {
    let policies_path = o.at("policies");
    let list = o.list(cx, "policies");
    o.finish(cx);
    if list.is_empty() {
        cx.error(&policies_path, "at least one policy is required");
        return None;
    }
    // Envoy uses the first policy it knows; mesh refuses unknown ones so a
    // file does not quietly fall back to another policy.
    let (path, v) = list.into_iter().next()?;
    let mut p = Obj::new(cx, path, v)?;
    let mut t = match p.obj(cx, "typed_extension_config") {
        Some(t) => t,
        None => {
            if !p.has("typed_extension_config") {
                cx.missing(&p.at("typed_extension_config"));
            }
            p.finish(cx);
            return None;
        }
    };
    p.finish(cx);
    let name = t.string(cx, "name");
    let tc_path = t.at("typed_config");
    let mut tc = match t.obj(cx, "typed_config") {
        Some(tc) => tc,
        None => {
            if !t.has("typed_config") {
                cx.missing(&tc_path);
            }
            t.finish(cx);
            return None;
        }
    };
    t.finish(cx);
    let ty_path = tc.at("@type");
    let ty = tc.string(cx, "@type");
    let by_type = ty
        .as_deref()
        .and_then(|t| t.strip_prefix(TYPE_PREFIX))
        .and_then(|t| POLICIES.iter().find(|p| p.1 == t));
    let by_name = name
        .as_deref()
        .and_then(|n| POLICIES.iter().find(|p| p.0 == n));
    let entry = match (by_type, ty.as_deref()) {
        (Some(e), _) => e,
        (None, Some(t)) => {
            cx.unsupported(
                &ty_path,
                Some(&format!("unknown load balancing policy {t}")),
            );
            return None;
        }
        (None, None) => {
            cx.missing(&ty_path);
            return None;
        }
    };
    if let (Some(n), Some(b)) = (name.as_deref(), by_name) {
        if b.2 != entry.2 {
            cx.error(
                &tc_path,
                format!("@type {} does not match name {n}", entry.1),
            );
        }
    }
    match entry.2 {
        LbPolicy::LeastRequest => {
            least_request(cx, &mut tc, cfg);
            for k in ["slow_start_config", "enable_full_scan", "selection_method"] {
                tc.refuse(cx, k, "not supported");
            }
        }
        LbPolicy::RingHash => {
            ring_hash(cx, &mut tc, cfg);
            if let Some(b) = tc.bool(cx, "use_hostname_for_hashing") {
                cfg.use_hostname_for_hashing = b;
            }
        }
        LbPolicy::Maglev => maglev(cx, &mut tc, cfg),
        LbPolicy::RoundRobin => tc.refuse(cx, "slow_start_config", "not supported"),
        LbPolicy::PeakEwma => {
            for (k, slot) in [
                ("default_rtt", &mut cfg.ewma_default_rtt),
                ("decay_time", &mut cfg.ewma_decay),
            ] {
                let path = tc.at(k);
                if let Some(d) = tc.duration(cx, k) {
                    if d.is_zero() {
                        cx.error(&path, "must be greater than 0s");
                    } else {
                        *slot = d;
                    }
                }
            }
        }
        LbPolicy::Random => {}
    }
    if let Some(mut l) = tc.obj(cx, "locality_lb_config") {
        locality_config(cx, &mut l, cfg);
        l.finish(cx);
    }
    if matches!(entry.2, LbPolicy::RingHash | LbPolicy::Maglev)
        && tc.empty_obj(cx, "locality_weighted_lb_config")
    {
        cfg.locality_weighted = true;
    }
    tc.finish(cx);
    Some(entry.2)
}

/// One scalar `google.protobuf.Value`.
fn metadata_value(cx: &mut Ctx, path: &str, v: &Value) -> Option<MetadataValue> {
    match v {
        Value::Null => Some(MetadataValue::Null),
        Value::Bool(b) => Some(MetadataValue::Bool(*b)),
        Value::Number(n) => n.as_f64().map(MetadataValue::number),
        Value::String(s) => Some(MetadataValue::String(s.clone())),
        Value::Array(_) | Value::Object(_) => {
            cx.unsupported(path, Some("only scalar metadata values are supported"));
            None
        }
    }
}

/// A `google.protobuf.Struct` of scalar values.
pub(crate) fn struct_values(cx: &mut Ctx, mut o: Obj<'_>) -> LbMetadata {
    let mut out = LbMetadata::new();
    for (k, path, v) in o.take_all() {
        if let Some(v) = metadata_value(cx, &path, v) {
            out.insert(k.to_string(), v);
        }
    }
    o.finish(cx);
    out
}

/// `metadata` of an endpoint or `metadata_match` of a route: the
/// `envoy.lb` namespace of `filter_metadata`. Other namespaces (e.g.
/// `istio`, which control planes put on every endpoint) and
/// `typed_filter_metadata` are data for filters mesh does not run: they are
/// accepted and ignored, as they change no load-balancing decision (Envoy's
/// subset matching reads `envoy.lb` only, too).
pub(crate) fn lb_metadata(cx: &mut Ctx, o: Obj<'_>) -> LbMetadata {
    endpoint_metadata(cx, o).0
}

/// An endpoint's (or locality's) `metadata`: the `envoy.lb` namespace (see
/// [`lb_metadata`]) and the `envoy.transport_socket_match` namespace, which
/// picks the cluster's `transport_socket_matches` entry.
pub(crate) fn endpoint_metadata(cx: &mut Ctx, mut o: Obj<'_>) -> (LbMetadata, LbMetadata) {
    let mut out = (LbMetadata::new(), LbMetadata::new());
    if let Some(mut fm) = o.obj(cx, "filter_metadata") {
        for (k, path, v) in fm.take_all() {
            let slot = match k {
                "envoy.lb" => &mut out.0,
                TRANSPORT_SOCKET_MATCH_NAMESPACE => &mut out.1,
                _ => continue,
            };
            if let Some(s) = Obj::new(cx, path, v) {
                *slot = struct_values(cx, s);
            }
        }
        fm.finish(cx);
    }
    let _ = o.take("typed_filter_metadata");
    o.finish(cx);
    out
}

/// A route's (or tcp_proxy's) `hash_policy` list. With `tcp`, only
/// `source_ip` is allowed, as Envoy's tcp_proxy.
pub(crate) fn hash_policies(cx: &mut Ctx, o: &mut Obj<'_>, tcp: bool) -> Vec<HashPolicy> {
    let mut out = Vec::new();
    for (path, v) in o.list(cx, "hash_policy") {
        let Some(mut h) = Obj::new(cx, path, v) else {
            continue;
        };
        if tcp {
            let kind = match one_of(cx, &h, &["source_ip", "filter_state"], true) {
                Some("source_ip") => {
                    h.empty_obj(cx, "source_ip");
                    Some(HashPolicyKind::SourceIp)
                }
                Some(_) => {
                    h.refuse(cx, "filter_state", "filter state is not supported");
                    None
                }
                None => None,
            };
            h.finish(cx);
            out.extend(kind.map(|kind| HashPolicy {
                kind,
                terminal: false,
            }));
            continue;
        }
        let terminal = h.bool(cx, "terminal").unwrap_or(false);
        let keys = [
            "header",
            "cookie",
            "connection_properties",
            "query_parameter",
            "filter_state",
        ];
        let kind = match one_of(cx, &h, &keys, true) {
            Some("header") => h.obj(cx, "header").and_then(|mut x| {
                let name = x.req_string(cx, "header_name");
                x.refuse(cx, "regex_rewrite", "not supported");
                x.finish(cx);
                name.map(|n| HashPolicyKind::Header(n.to_ascii_lowercase()))
            }),
            Some("cookie") => h.obj(cx, "cookie").and_then(|mut x| {
                let name = x.req_string(cx, "name");
                let ttl = x.duration(cx, "ttl");
                let path = x.string(cx, "path");
                x.empty_list(cx, "attributes", "cookie attributes are not supported");
                x.finish(cx);
                name.map(|name| HashPolicyKind::Cookie { name, ttl, path })
            }),
            Some("connection_properties") => {
                h.obj(cx, "connection_properties").and_then(|mut x| {
                    let on = x.bool(cx, "source_ip").unwrap_or(false);
                    x.finish(cx);
                    on.then_some(HashPolicyKind::SourceIp)
                })
            }
            Some("query_parameter") => h.obj(cx, "query_parameter").and_then(|mut x| {
                let name = x.req_string(cx, "name");
                x.finish(cx);
                name.map(HashPolicyKind::QueryParameter)
            }),
            Some(_) => {
                h.refuse(cx, "filter_state", "filter state is not supported");
                None
            }
            None => {
                for k in keys {
                    h.take(k);
                }
                None
            }
        };
        h.finish(cx);
        out.extend(kind.map(|kind| HashPolicy { kind, terminal }));
    }
    out
}

/// `metadata_match` of a route action or weighted cluster.
pub(crate) fn metadata_match(cx: &mut Ctx, o: &mut Obj<'_>) -> LbMetadata {
    match o.obj(cx, "metadata_match") {
        Some(m) => lb_metadata(cx, m),
        None => LbMetadata::new(),
    }
}

/// An endpoint's `health_status`.
pub(crate) fn health_status(cx: &mut Ctx, o: &mut Obj<'_>) -> HealthStatus {
    o.enumeration(
        cx,
        "health_status",
        &[
            ("UNKNOWN", HealthStatus::Unknown),
            ("HEALTHY", HealthStatus::Healthy),
            ("UNHEALTHY", HealthStatus::Unhealthy),
            ("DRAINING", HealthStatus::Unhealthy),
            ("TIMEOUT", HealthStatus::Unhealthy),
            ("DEGRADED", HealthStatus::Degraded),
        ],
        &[],
    )
    .unwrap_or_default()
}
