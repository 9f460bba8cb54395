use super::*;
use crate::config::{HeaderMutations, RouteAction, RouteMatch as CfgMatch, WeightedCluster};

fn route_to(path: PathMatch, cluster: &str) -> Route {
    Route {
        name: String::new(),
        matcher: CfgMatch {
            path,
            case_sensitive: true,
            headers: vec![],
            query_parameters: vec![],
            grpc: false,
        },
        action: Action::Route(RouteAction::new(ClusterSpecifier::Cluster(cluster.into()))),
        headers: HeaderMutations::default(),
        policy: Default::default(),
    }
}

fn table(vhosts: Vec<(&[&str], Vec<Route>)>) -> RouteTable {
    RouteTable::new(&RouteConfiguration {
        name: "t".into(),
        virtual_hosts: vhosts
            .into_iter()
            .enumerate()
            .map(|(i, (domains, routes))| VirtualHost {
                name: format!("vh{i}"),
                domains: domains.iter().map(|d| d.to_string()).collect(),
                routes,
                headers: HeaderMutations::default(),
                policy: Default::default(),
            })
            .collect(),
        headers: HeaderMutations::default(),
    })
    .unwrap()
}

fn req(host: &str, path: &str) -> http::Request<()> {
    http::Request::builder()
        .uri(path)
        .header("host", host)
        .body(())
        .unwrap()
}

fn cluster_of(t: &RouteTable, r: &http::Request<()>) -> Option<String> {
    let m = t.route(r)?;
    match &m.route.action {
        CompiledAction::Route(a) => Some(a.choose_cluster().name.to_string()),
        _ => Some("<local>".into()),
    }
}

#[test]
fn domain_search_order_matches_envoy() {
    let t = table(vec![
        (&["*"], vec![route_to(PathMatch::Prefix("/".into()), "any")]),
        (
            &["*.example.com"],
            vec![route_to(PathMatch::Prefix("/".into()), "suffix")],
        ),
        (
            &["*.b.example.com"],
            vec![route_to(PathMatch::Prefix("/".into()), "longer-suffix")],
        ),
        (
            &["api.*"],
            vec![route_to(PathMatch::Prefix("/".into()), "prefix")],
        ),
        (
            &["www.example.com", "www.example.com:8080"],
            vec![route_to(PathMatch::Prefix("/".into()), "exact")],
        ),
    ]);
    assert_eq!(
        cluster_of(&t, &req("WWW.example.com", "/")).unwrap(),
        "exact"
    );
    assert_eq!(
        cluster_of(&t, &req("www.example.com:8080", "/")).unwrap(),
        "exact"
    );
    assert_eq!(
        cluster_of(&t, &req("x.example.com", "/")).unwrap(),
        "suffix"
    );
    assert_eq!(
        cluster_of(&t, &req("x.b.example.com", "/")).unwrap(),
        "longer-suffix"
    );
    assert_eq!(
        cluster_of(&t, &req("api.example.org", "/")).unwrap(),
        "prefix"
    );
    // Suffix beats prefix.
    assert_eq!(
        cluster_of(&t, &req("api.example.com", "/")).unwrap(),
        "suffix"
    );
    // A wildcard covers at least one character; the port is part of the host.
    assert_eq!(cluster_of(&t, &req(".example.com", "/")).unwrap(), "any");
    assert_eq!(
        cluster_of(&t, &req("x.example.com:99", "/")).unwrap(),
        "any"
    );
}

#[test]
fn path_matching_rules() {
    let mut insensitive = route_to(PathMatch::Prefix("/CI".into()), "ci");
    insensitive.matcher.case_sensitive = false;
    let t = table(vec![(
        &["*"],
        vec![
            route_to(PathMatch::Exact("/exact".into()), "exact"),
            route_to(PathMatch::Regex("/re/[0-9]+".into()), "regex"),
            route_to(PathMatch::SeparatedPrefix("/sep".into()), "sep"),
            insensitive,
            route_to(PathMatch::Prefix("/p".into()), "prefix"),
        ],
    )]);
    assert_eq!(cluster_of(&t, &req("h", "/exact?q=1")).unwrap(), "exact");
    assert_eq!(cluster_of(&t, &req("h", "/exact/more")), None);
    assert_eq!(cluster_of(&t, &req("h", "/re/123")).unwrap(), "regex");
    // Regexes are anchored: a partial match is no match.
    assert_eq!(cluster_of(&t, &req("h", "/re/123x")), None);
    assert_eq!(cluster_of(&t, &req("h", "/sep")).unwrap(), "sep");
    assert_eq!(cluster_of(&t, &req("h", "/sep/x")).unwrap(), "sep");
    assert_eq!(cluster_of(&t, &req("h", "/sepx")), None);
    assert_eq!(cluster_of(&t, &req("h", "/ci/x")).unwrap(), "ci");
    assert_eq!(cluster_of(&t, &req("h", "/px")).unwrap(), "prefix");
}

#[test]
fn header_and_query_matchers() {
    let mut r = route_to(PathMatch::Prefix("/".into()), "hdr");
    r.matcher.headers = vec![
        HeaderMatcher {
            name: "x-env".into(),
            kind: HeaderMatchKind::Exact("canary".into()),
            invert: false,
            treat_missing_as_empty: false,
        },
        HeaderMatcher {
            name: "x-debug".into(),
            kind: HeaderMatchKind::Present(true),
            invert: true,
            treat_missing_as_empty: false,
        },
    ];
    r.matcher.query_parameters = vec![QueryParameterMatcher {
        name: "v".into(),
        kind: HeaderMatchKind::Regex("[12]".into()),
    }];
    let t = table(vec![(
        &["*"],
        vec![r, route_to(PathMatch::Prefix("/".into()), "default")],
    )]);
    let mut q = req("h", "/x?a=b&v=2");
    q.headers_mut().insert("x-env", "canary".parse().unwrap());
    assert_eq!(cluster_of(&t, &q).unwrap(), "hdr");
    q.headers_mut().insert("x-debug", "1".parse().unwrap());
    assert_eq!(cluster_of(&t, &q).unwrap(), "default");
    let mut q = req("h", "/x?v=3");
    q.headers_mut().insert("x-env", "canary".parse().unwrap());
    assert_eq!(cluster_of(&t, &q).unwrap(), "default");
}

#[test]
fn weighted_clusters_split_by_weight() {
    let mut r = route_to(PathMatch::Prefix("/".into()), "unused");
    if let Action::Route(a) = &mut r.action {
        a.cluster = ClusterSpecifier::Weighted(vec![
            WeightedCluster {
                name: "a".into(),
                weight: 80,
                headers: Default::default(),
                metadata_match: Default::default(),
            },
            WeightedCluster {
                name: "b".into(),
                weight: 20,
                headers: Default::default(),
                metadata_match: Default::default(),
            },
        ]);
    }
    let t = table(vec![(&["*"], vec![r])]);
    let q = req("h", "/");
    let n = 20_000;
    let a = (0..n)
        .filter(|_| cluster_of(&t, &q).unwrap() == "a")
        .count();
    let share = a as f64 / n as f64;
    assert!((0.77..0.83).contains(&share), "share of a = {share}");
}

#[test]
fn rewrites() {
    let mut r = route_to(PathMatch::Prefix("/api/".into()), "c");
    if let Action::Route(a) = &mut r.action {
        a.prefix_rewrite = Some("/v2/".into());
    }
    let mut re = route_to(PathMatch::Prefix("/re/".into()), "c");
    if let Action::Route(a) = &mut re.action {
        a.regex_rewrite = Some(("^/re/([a-z]+)/x$".into(), "/\\1/y".into()));
    }
    let t = table(vec![(&["*"], vec![r, re])]);
    let q = req("h", "/api/users?id=1");
    let m = t.route(&q).unwrap();
    assert_eq!(
        m.rewritten_path("/api/users?id=1").unwrap(),
        "/v2/users?id=1"
    );
    let q = req("h", "/re/abc/x?z");
    let m = t.route(&q).unwrap();
    assert_eq!(m.rewritten_path("/re/abc/x?z").unwrap(), "/abc/y?z");
}

#[test]
fn duplicate_domains_are_refused() {
    let cfg = RouteConfiguration {
        name: "t".into(),
        virtual_hosts: vec![
            VirtualHost {
                name: "a".into(),
                domains: vec!["x.com".into()],
                ..Default::default()
            },
            VirtualHost {
                name: "b".into(),
                domains: vec!["X.com".into()],
                ..Default::default()
            },
        ],
        headers: HeaderMutations::default(),
    };
    let e = RouteTable::new(&cfg).unwrap_err();
    assert_eq!(e.path, "virtual_hosts[1].domains[0]");
}

#[test]
fn redirect_locations() {
    let mut r = route_to(PathMatch::Prefix("/old/".into()), "c");
    r.action = Action::Redirect(RedirectAction {
        scheme: Some("https".into()),
        host: None,
        port: None,
        path: Some(RedirectPath::PrefixRewrite("/new/".into())),
        response_code: 301,
        strip_query: false,
    });
    let t = table(vec![(&["*"], vec![r])]);
    let q = req("example.com", "/old/page?x=1");
    let m = t.route(&q).unwrap();
    let CompiledAction::Redirect(rd) = &m.route.action else {
        panic!()
    };
    assert_eq!(
        redirect_location(rd, &m, &q, "http"),
        "https://example.com/new/page?x=1"
    );
}
