//! On-demand (lazy) subscription against the snapshot server over real
//! sockets: the endpoint subscription grows one name at a time with
//! `XdsHandle::subscribe_more`, the server sees exactly the names asked for
//! and sends only their resources, and `unsubscribe` shrinks it again;
//! state-of-the-world and delta.

use std::collections::BTreeSet;
use std::time::Duration;

use mesh_xds::client::{self, ClientConfig, Delivery};
use mesh_xds::convert::json_to_any;
use mesh_xds::pb::google::protobuf::Any;
use mesh_xds::server::{AdsServer, Snapshot, SnapshotCache};
use mesh_xds::types::{Protocol, CLUSTER, ENDPOINT};
use serde_json::json;
use tokio::sync::mpsc::Receiver;

const NODE: &str = "node-1";
const WAIT: Duration = Duration::from_secs(5);

fn cluster(name: &str) -> Any {
    json_to_any(
        CLUSTER,
        &json!({"name": name, "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}}}),
    )
    .unwrap()
}

fn cla(name: &str, port: u16) -> Any {
    json_to_any(
        ENDPOINT,
        &json!({"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}),
    )
    .unwrap()
}

fn names(set: &[&str]) -> BTreeSet<String> {
    set.iter().map(|s| s.to_string()).collect()
}

/// The next delivery of `type_url`, ACKed; other types are ACKed and
/// skipped.
async fn next_of(rx: &mut Receiver<Delivery>, type_url: &str) -> client::Update {
    loop {
        let d = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("a delivery in time")
            .expect("client running");
        let u = d.update.clone();
        d.reply(Ok(()));
        if u.type_url == type_url {
            return u;
        }
    }
}

fn received(u: &client::Update) -> BTreeSet<String> {
    u.resources.iter().map(|r| r.name.clone()).collect()
}

async fn grows_on_demand(protocol: Protocol) {
    let cache = SnapshotCache::new();
    let all: Vec<String> = (0..50).map(|i| format!("c{i:02}")).collect();
    cache.set_snapshot(
        NODE,
        Snapshot::new("v1")
            .with_resources(CLUSTER, all.iter().map(|c| cluster(c)))
            .unwrap()
            .with_resources(ENDPOINT, all.iter().map(|c| cla(c, 9000)))
            .unwrap(),
    );
    let (addr, _srv) = AdsServer::new(cache.clone())
        .spawn("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let mut cfg = ClientConfig::new(format!("http://{addr}"), client::node(NODE, "test"));
    cfg.protocol = protocol;
    let (handle, mut rx) = client::start(cfg);
    handle.subscribe(CLUSTER, BTreeSet::new());
    let u = next_of(&mut rx, CLUSTER).await;
    assert_eq!(u.resources.len(), 50);
    assert!(handle.subscribed(ENDPOINT).is_empty());

    // Nothing asks for endpoints yet: none arrive.
    assert!(tokio::time::timeout(Duration::from_millis(300), rx.recv())
        .await
        .is_err());

    // The first use of c07 subscribes it alone.
    handle.subscribe_more(ENDPOINT, names(&["c07"]));
    let u = next_of(&mut rx, ENDPOINT).await;
    assert_eq!(received(&u), names(&["c07"]));
    assert!(
        cache
            .wait_for(NODE, WAIT, |s| s.subscribed.get(ENDPOINT)
                == Some(&names(&["c07"])))
            .await
    );

    // A second cluster: the server now sees both names; state-of-the-world
    // resends both assignments, delta only the new one.
    handle.subscribe_more(ENDPOINT, names(&["c31"]));
    let u = next_of(&mut rx, ENDPOINT).await;
    let expect = match protocol {
        Protocol::StateOfTheWorld => names(&["c07", "c31"]),
        Protocol::Delta => names(&["c31"]),
    };
    assert_eq!(received(&u), expect);
    assert!(
        cache
            .wait_for(NODE, WAIT, |s| s.subscribed.get(ENDPOINT)
                == Some(&names(&["c07", "c31"])))
            .await
    );
    assert_eq!(handle.subscribed(ENDPOINT), names(&["c07", "c31"]));

    // Asking again for a name already subscribed sends nothing new.
    handle.subscribe_more(ENDPOINT, names(&["c07"]));
    assert!(tokio::time::timeout(Duration::from_millis(300), rx.recv())
        .await
        .is_err());

    // An update of a used cluster's endpoints still arrives; an update of
    // an unused one does not.
    let mut snap = Snapshot::new("v2")
        .with_resources(CLUSTER, all.iter().map(|c| cluster(c)))
        .unwrap();
    snap = snap
        .with_resources(
            ENDPOINT,
            all.iter()
                .map(|c| cla(c, if c == "c31" || c == "c40" { 9001 } else { 9000 })),
        )
        .unwrap();
    cache.set_snapshot(NODE, snap);
    let u = next_of(&mut rx, ENDPOINT).await;
    match protocol {
        Protocol::StateOfTheWorld => assert_eq!(received(&u), names(&["c07", "c31"])),
        Protocol::Delta => assert_eq!(received(&u), names(&["c31"])),
    }

    // Unsubscribing shrinks the server's view.
    handle.unsubscribe(ENDPOINT, names(&["c07"]));
    assert!(
        cache
            .wait_for(NODE, WAIT, |s| s.subscribed.get(ENDPOINT)
                == Some(&names(&["c31"])))
            .await
    );
    assert_eq!(handle.subscribed(ENDPOINT), names(&["c31"]));
}

#[tokio::test]
async fn sotw_subscription_grows_on_demand() {
    grows_on_demand(Protocol::StateOfTheWorld).await;
}

#[tokio::test]
async fn delta_subscription_grows_on_demand() {
    grows_on_demand(Protocol::Delta).await;
}
