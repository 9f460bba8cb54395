//! `MetadataMutation`: the attachment / header changes of an RPC route.

use mesh_core::policy::MetadataMutation;

fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn removals_then_sets_ignoring_case_and_keeping_order() {
    let m = MetadataMutation {
        set: kv(&[("X-Env", "canary"), ("x-new", "1")]),
        remove: vec!["TRACEID".into()],
    };
    let mut headers = kv(&[
        ("traceId", "t"),
        ("x-env", "prod"),
        ("path", "svc"),
        ("X-ENV", "dup"),
    ]);
    m.apply(&mut headers);
    // The first x-env keeps its place and key case and takes the value;
    // its repeat goes; a new key is appended in the case it was written.
    assert_eq!(
        headers,
        kv(&[("x-env", "canary"), ("path", "svc"), ("x-new", "1")])
    );
    assert!(!m.is_empty());
    assert!(MetadataMutation::default().is_empty());
}
