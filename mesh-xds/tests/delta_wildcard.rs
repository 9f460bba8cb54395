//! A delta wildcard subscription to a type the snapshot has none of is
//! answered with an empty response, so the client's initial fetch of that
//! type completes at once (Envoy otherwise waits for its
//! `initial_fetch_timeout`, 15 s by default, before going live).

use std::collections::BTreeSet;
use std::time::Duration;

use mesh_xds::client::{self, ClientConfig};
use mesh_xds::convert::json_to_any;
use mesh_xds::server::{AdsServer, Snapshot, SnapshotCache};
use mesh_xds::types::{Protocol, CLUSTER, LISTENER};
use serde_json::json;

const NODE: &str = "node-1";

#[tokio::test]
async fn empty_wildcard_type_is_answered_once() {
    let cache = SnapshotCache::new();
    let cluster = json_to_any(
        CLUSTER,
        &json!({"name": "a", "type": "STATIC", "load_assignment": {"cluster_name": "a"}}),
    )
    .unwrap();
    cache.set_snapshot(
        NODE,
        Snapshot::new("v1")
            .with_resources(CLUSTER, [cluster])
            .unwrap(),
    );
    let (addr, _srv) = AdsServer::new(cache.clone())
        .spawn("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let mut cfg = ClientConfig::new(format!("http://{addr}"), client::node(NODE, "test"));
    cfg.protocol = Protocol::Delta;
    let (handle, mut rx) = client::start(cfg);
    handle.subscribe(LISTENER, BTreeSet::new());
    let d = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("an answer for the empty listener set")
        .expect("client running");
    assert_eq!(d.update.type_url, LISTENER);
    assert!(d.update.resources.is_empty());
    assert!(d.update.removed.is_empty());
    d.reply(Ok(()));
    assert!(
        cache
            .wait_for(NODE, Duration::from_secs(5), |s| s
                .acked
                .contains_key(LISTENER))
            .await
    );
    // Nothing more is sent until the snapshot changes.
    assert!(tokio::time::timeout(Duration::from_millis(300), rx.recv())
        .await
        .is_err());
}
