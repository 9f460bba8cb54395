//! Load-balancing fields: policies, their settings, endpoint metadata,
//! hash policies and `metadata_match`, and the errors for bad values.

use super::*;

fn cluster(b: &Bootstrap) -> &Cluster {
    &b.clusters[0]
}

#[test]
fn named_policies_and_settings() {
    for (name, policy) in [
        ("ROUND_ROBIN", LbPolicy::RoundRobin),
        ("RANDOM", LbPolicy::Random),
        ("LEAST_REQUEST", LbPolicy::LeastRequest),
        ("RING_HASH", LbPolicy::RingHash),
        ("MAGLEV", LbPolicy::Maglev),
    ] {
        let mut v = bench();
        cluster_json(&mut v)["lb_policy"] = json!(name);
        assert_eq!(cluster(&ok(&v)).lb_policy, policy);
    }
    let mut v = bench();
    let c = cluster_json(&mut v);
    c["lb_policy"] = json!("LEAST_REQUEST");
    c["least_request_lb_config"] = json!({"choice_count": 3, "active_request_bias": {"default_value": 0.5, "runtime_key": "x"}});
    c["least_request_lb_config"]["active_request_bias"]
        .as_object_mut()
        .expect("map")
        .remove("runtime_key");
    c["ring_hash_lb_config"] = json!({"minimum_ring_size": 64, "maximum_ring_size": "4096"});
    c["maglev_lb_config"] = json!({"table_size": 251});
    c["common_lb_config"] = json!({
        "healthy_panic_threshold": {"value": 25.0},
        "zone_aware_lb_config": {"routing_enabled": {"value": 80}, "min_cluster_size": 3}
    });
    c["load_assignment"]["policy"] =
        json!({"overprovisioning_factor": 200, "weighted_priority_health": true});
    let b = ok(&v);
    let lb = &cluster(&b).lb;
    assert_eq!(lb.choice_count, 3);
    assert_eq!(lb.active_request_bias, 0.5);
    assert_eq!((lb.minimum_ring_size, lb.maximum_ring_size), (64, 4096));
    assert_eq!(lb.maglev_table_size, 251);
    assert_eq!(lb.healthy_panic_threshold, 25.0);
    let za = lb.zone_aware.as_ref().expect("zone aware");
    assert_eq!((za.routing_enabled, za.min_cluster_size), (80.0, 3));
    assert_eq!(lb.overprovisioning_factor, 200);
    assert!(lb.weighted_priority_health);
}

#[test]
fn typed_load_balancing_policies() {
    let typed = |name: &str, ty: &str, extra: Value| {
        let mut tc = json!({"@type": format!("type.googleapis.com/{ty}")});
        if let (Some(t), Value::Object(e)) = (tc.as_object_mut(), extra) {
            t.extend(e);
        }
        json!({"policies": [{"typed_extension_config": {"name": name, "typed_config": tc}}]})
    };
    let cases = [
        (
            "envoy.load_balancing_policies.least_request",
            "envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest",
            json!({"choice_count": 4}),
            LbPolicy::LeastRequest,
        ),
        (
            "envoy.load_balancing_policies.ring_hash",
            "envoy.extensions.load_balancing_policies.ring_hash.v3.RingHash",
            json!({"minimum_ring_size": 128}),
            LbPolicy::RingHash,
        ),
        (
            "envoy.load_balancing_policies.maglev",
            "envoy.extensions.load_balancing_policies.maglev.v3.Maglev",
            json!({"table_size": 65537}),
            LbPolicy::Maglev,
        ),
        (
            "mesh.load_balancing_policies.peak_ewma",
            "mesh.load_balancing_policies.peak_ewma.PeakEwma",
            json!({"default_rtt": "0.01s", "decay_time": "5s"}),
            LbPolicy::PeakEwma,
        ),
        (
            "envoy.load_balancing_policies.round_robin",
            "envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin",
            json!({"locality_lb_config": {"locality_weighted_lb_config": {}}}),
            LbPolicy::RoundRobin,
        ),
    ];
    for (name, ty, extra, policy) in cases {
        let mut v = bench();
        cluster_json(&mut v)["load_balancing_policy"] = typed(name, ty, extra);
        let b = ok(&v);
        let c = cluster(&b);
        assert_eq!(c.lb_policy, policy, "{name}");
        match policy {
            LbPolicy::LeastRequest => assert_eq!(c.lb.choice_count, 4),
            LbPolicy::RingHash => assert_eq!(c.lb.minimum_ring_size, 128),
            LbPolicy::PeakEwma => {
                assert_eq!(c.lb.ewma_default_rtt, Duration::from_millis(10));
                assert_eq!(c.lb.ewma_decay, Duration::from_secs(5));
            }
            LbPolicy::RoundRobin => assert!(c.lb.locality_weighted),
            _ => {}
        }
    }
    let mut v = bench();
    cluster_json(&mut v)["load_balancing_policy"] = typed("x.custom", "x.Custom", json!({}));
    assert_eq!(
        errs(&v),
        vec![format!("unsupported: {CLUSTER_PATH}.load_balancing_policy.policies[0].typed_extension_config.typed_config.@type (unknown load balancing policy type.googleapis.com/x.Custom)")]
    );
}

#[test]
fn bad_lb_values_name_the_field() {
    let mut v = bench();
    let c = cluster_json(&mut v);
    c["least_request_lb_config"] = json!({"choice_count": 1});
    c["ring_hash_lb_config"] = json!({"minimum_ring_size": 9_000_000, "maximum_ring_size": 0});
    c["maglev_lb_config"] = json!({"table_size": 65536});
    c["common_lb_config"] = json!({"healthy_panic_threshold": {"value": 150}});
    c["load_assignment"]["policy"] = json!({"overprovisioning_factor": 0});
    c["load_assignment"]["endpoints"][0]["load_balancing_weight"] = json!(0);
    let eps = c["load_assignment"]["endpoints"][0]["lb_endpoints"].clone();
    let mut two = eps.as_array().expect("list").clone();
    two.extend(eps.as_array().expect("list").iter().cloned());
    c["load_assignment"]["endpoints"][0]["lb_endpoints"] = json!(two);
    let la = format!("{CLUSTER_PATH}.load_assignment");
    assert_eq!(
        errs(&v),
        vec![
            format!("{CLUSTER_PATH}.least_request_lb_config.choice_count: must be at least 2"),
            format!("{CLUSTER_PATH}.ring_hash_lb_config.minimum_ring_size: must be at most 8388608, found 9000000"),
            format!("{CLUSTER_PATH}.ring_hash_lb_config.maximum_ring_size: must be at least 1"),
            format!("{CLUSTER_PATH}.maglev_lb_config.table_size: must be a prime number, found 65536"),
            format!("{CLUSTER_PATH}.common_lb_config.healthy_panic_threshold.value: must be from 0 to 100"),
            format!("{la}.policy.overprovisioning_factor: must be greater than 0"),
            format!("{la}.endpoints[0].load_balancing_weight: must be at least 1"),
            format!("{la}.endpoints[0].lb_endpoints[1]: duplicate endpoint 127.0.0.1:18080 (also {la}.endpoints[0].lb_endpoints[0])"),
        ]
    );
    let mut v = bench();
    cluster_json(&mut v)["ring_hash_lb_config"] =
        json!({"minimum_ring_size": 4096, "maximum_ring_size": 1024});
    assert_eq!(
        errs(&v),
        vec![format!("{CLUSTER_PATH}.ring_hash_lb_config.minimum_ring_size: minimum_ring_size (4096) must not be greater than maximum_ring_size (1024)")]
    );
}

#[test]
fn subsets_metadata_and_hash_policies() {
    let mut v = bench();
    let c = cluster_json(&mut v);
    c["lb_subset_config"] = json!({
        "fallback_policy": "DEFAULT_SUBSET",
        "default_subset": {"version": "v1"},
        "subset_selectors": [{"keys": ["version", "stage"]}, {"keys": ["version"]}]
    });
    c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["metadata"] =
        json!({"filter_metadata": {"envoy.lb": {"version": "v2", "canary": true, "n": 1.0}}});
    let r = route_json(&mut v);
    r["route"]["hash_policy"] = json!([
        {"header": {"header_name": "X-User"}, "terminal": true},
        {"cookie": {"name": "s", "ttl": "60s", "path": "/"}},
        {"connection_properties": {"source_ip": true}},
        {"query_parameter": {"name": "u"}}
    ]);
    r["route"]["metadata_match"] = json!({"filter_metadata": {"envoy.lb": {"version": "v2"}}});
    let b = ok(&v);
    let s = cluster(&b).lb.subset.as_ref().expect("subset");
    assert_eq!(s.fallback_policy, SubsetFallback::DefaultSubset);
    assert_eq!(
        s.selectors,
        vec![
            vec!["stage".to_string(), "version".to_string()],
            vec!["version".to_string()]
        ]
    );
    let md = &cluster(&b).localities[0].lb_endpoints[0].metadata;
    assert_eq!(md["version"], MetadataValue::String("v2".into()));
    assert_eq!(md["canary"], MetadataValue::Bool(true));
    assert_eq!(md["n"], MetadataValue::number(1.0));
    let a = route_action(&b);
    assert_eq!(
        a.hash_policy,
        vec![
            HashPolicy {
                kind: HashPolicyKind::Header("x-user".into()),
                terminal: true
            },
            HashPolicy {
                kind: HashPolicyKind::Cookie {
                    name: "s".into(),
                    ttl: Some(Duration::from_secs(60)),
                    path: Some("/".into())
                },
                terminal: false
            },
            HashPolicy {
                kind: HashPolicyKind::SourceIp,
                terminal: false
            },
            HashPolicy {
                kind: HashPolicyKind::QueryParameter("u".into()),
                terminal: false
            },
        ]
    );
    assert_eq!(
        a.metadata_match["version"],
        MetadataValue::String("v2".into())
    );

    let mut v = bench();
    let r = route_json(&mut v);
    r["route"]["hash_policy"] = json!([{"filter_state": {"key": "k"}}]);
    r["route"]["metadata_match"] = json!({"filter_metadata": {"istio": {"a": "b"}}});
    let rp = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.route_config.virtual_hosts[0].routes[0].route";
    assert_eq!(
        errs(&v),
        vec![
            format!("unsupported: {rp}.hash_policy[0].filter_state (filter state is not supported)"),
            format!("unsupported: {rp}.metadata_match.filter_metadata.istio (only the envoy.lb namespace is used)"),
        ]
    );
}
