//! The client against the snapshot server over real sockets:
//! state-of-the-world and delta, ACK/NACK as seen by the server, named
//! subscriptions, server restarts and the message size bound.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use mesh_xds::client::{self, ClientConfig, Delivery, XdsHandle};
use mesh_xds::convert::json_to_any;
use mesh_xds::server::{AdsServer, ServerHandle, Snapshot, SnapshotCache};
use mesh_xds::types::{self, Protocol, CLUSTER, ENDPOINT};
use serde_json::json;
use tokio::sync::mpsc::Receiver;

const NODE: &str = "node-1";
const WAIT: Duration = Duration::from_secs(5);

fn cluster(name: &str) -> envoy_types_any::Any {
    json_to_any(
        CLUSTER,
        &json!({"name": name, "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}}}),
    )
    .unwrap()
}

mod envoy_types_any {
    pub use mesh_xds::pb::google::protobuf::Any;
}

fn cla(name: &str, port: u16) -> envoy_types_any::Any {
    json_to_any(
        ENDPOINT,
        &json!({"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}),
    )
    .unwrap()
}

fn snapshot(version: &str, clusters: &[&str], port: u16) -> Snapshot {
    Snapshot::new(version)
        .with_resources(CLUSTER, clusters.iter().map(|c| cluster(c)))
        .unwrap()
        .with_resources(ENDPOINT, clusters.iter().map(|c| cla(c, port)))
        .unwrap()
}

async fn server(
    cache: &std::sync::Arc<SnapshotCache>,
    addr: SocketAddr,
) -> (SocketAddr, ServerHandle) {
    AdsServer::new(cache.clone()).spawn(addr).await.unwrap()
}

fn config(addr: SocketAddr, protocol: Protocol) -> ClientConfig {
    let mut c = ClientConfig::new(format!("http://{addr}"), client::node(NODE, "test"));
    c.protocol = protocol;
    c.backoff_base = Duration::from_millis(50);
    c.backoff_max = Duration::from_millis(200);
    c
}

async fn next(rx: &mut Receiver<Delivery>) -> Delivery {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("an update in time")
        .expect("client running")
}

fn names(d: &Delivery) -> Vec<String> {
    let mut n: Vec<String> = d.update.resources.iter().map(|r| r.name.clone()).collect();
    n.sort();
    n
}

/// Whether the server records an ACK of `version` for `type_url` in time.
async fn acked_version(cache: &SnapshotCache, type_url: &str, version: &str) -> bool {
    cache
        .wait_for(NODE, WAIT, |s| {
            s.acked.get(type_url).map(String::as_str) == Some(version)
        })
        .await
}

/// Receives the next update, checks its type and resource names, ACKs it
/// and waits for the server to record an ACK of that type.
async fn receive_and_ack(
    cache: &SnapshotCache,
    rx: &mut Receiver<Delivery>,
    type_url: &str,
    expected: &[&str],
) {
    let d = next(rx).await;
    assert_eq!(d.update.type_url, type_url);
    assert_eq!(names(&d), expected);
    d.reply(Ok(()));
    assert!(
        cache
            .wait_for(NODE, WAIT, |s| s.acked.contains_key(type_url))
            .await
    );
}

/// A client on the per-type discovery service of `type_url` (not ADS),
/// subscribed to the one resource `name`.
fn per_type_client(
    addr: SocketAddr,
    protocol: Protocol,
    type_url: &'static str,
    name: &str,
) -> (XdsHandle, Receiver<Delivery>) {
    let mut cfg = config(addr, protocol);
    cfg.service = types::Service::PerType(type_url);
    let (handle, rx) = client::start(cfg);
    handle.subscribe(type_url, [name.to_string()].into());
    (handle, rx)
}

async fn lifecycle(protocol: Protocol) {
    let cache = SnapshotCache::new();
    cache.set_snapshot(NODE, snapshot("v1", &["a", "b"], 1001));
    let (addr, srv) = server(&cache, "127.0.0.1:0".parse().unwrap()).await;
    let (handle, mut rx) = client::start(config(addr, protocol));
    handle.subscribe(CLUSTER, BTreeSet::new());

    // CDS arrives; ACK is recorded by the server with the version.
    let d = next(&mut rx).await;
    assert_eq!(d.update.type_url, CLUSTER);
    assert_eq!(names(&d), ["a", "b"]);
    assert_eq!(d.update.version, "v1");
    d.reply(Ok(()));
    assert!(acked_version(&cache, CLUSTER, "v1").await);
    let st = cache.status(NODE).unwrap();
    let node = st.node.unwrap();
    assert_eq!(node.user_agent_name, "mesh");
    assert_eq!(node.cluster, "test");

    // EDS by name: only the named assignment comes.
    handle.subscribe(ENDPOINT, ["a".to_string()].into());
    receive_and_ack(&cache, &mut rx, ENDPOINT, &["a"]).await;

    // A new snapshot without "b": NACK it; the server records the detail
    // and does not resend it.
    cache.set_snapshot(NODE, snapshot("v2", &["a"], 1002));
    let mut got_cds = false;
    for _ in 0..2 {
        let d = next(&mut rx).await;
        if d.update.type_url == CLUSTER {
            got_cds = true;
            match protocol {
                Protocol::StateOfTheWorld => assert_eq!(names(&d), ["a"]),
                Protocol::Delta => assert_eq!(d.update.removed, ["b"]),
            }
            d.reply(Err("clusters[0].connect_timeout: bad".into()));
        } else {
            d.reply(Ok(()));
        }
    }
    assert!(got_cds);
    assert!(
        cache
            .wait_for(NODE, WAIT, |s| s
                .nacked
                .get(CLUSTER)
                .is_some_and(|(_, e)| e.contains("connect_timeout")))
            .await
    );
    let status = handle.status();
    assert_eq!(
        status[CLUSTER].version, "v1",
        "a NACK keeps the applied version"
    );
    assert!(status[CLUSTER]
        .last_nack
        .as_ref()
        .unwrap()
        .detail
        .contains("connect_timeout"));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err(),
        "a NACKed snapshot is not resent"
    );

    // v3 fixes it and is ACKed.
    cache.set_snapshot(NODE, snapshot("v3", &["a", "c"], 1002));
    let d = next(&mut rx).await;
    assert_eq!(d.update.type_url, CLUSTER);
    d.reply(Ok(()));
    assert!(acked_version(&cache, CLUSTER, "v3").await);

    // The server goes away and comes back on the same port with the same
    // snapshot: the client reconnects and, having v3, gets nothing new.
    drop(srv);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!handle.connected());
    let (_addr2, _srv2) = server(&cache, addr).await;
    assert!(cache.wait_for(NODE, WAIT, |s| s.streams == 1).await);
    // Drain anything in flight (EDS for "a" may be resent in SotW since the
    // new stream restarts; it must carry the same content).
    while let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
        if d.update.type_url == CLUSTER {
            // Delta: the client still holds "b" (its removal was NACKed), and
            // its initial_resource_versions tell the server so: only the
            // removal comes, nothing is resent.
            assert_eq!(
                protocol,
                Protocol::Delta,
                "clusters up to date after reconnect"
            );
            assert!(d.update.resources.is_empty());
            assert_eq!(d.update.removed, ["b"]);
        }
        d.reply(Ok(()));
    }
    assert!(handle.connected());
}

#[tokio::test]
async fn sotw_lifecycle() {
    lifecycle(Protocol::StateOfTheWorld).await;
}

#[tokio::test]
async fn delta_lifecycle() {
    lifecycle(Protocol::Delta).await;
}

#[tokio::test]
async fn oversized_response_is_a_clear_error() {
    let cache = SnapshotCache::new();
    let many: Vec<String> = (0..2000)
        .map(|i| format!("cluster-with-a-long-name-{i:05}"))
        .collect();
    let refs: Vec<&str> = many.iter().map(String::as_str).collect();
    cache.set_snapshot(NODE, snapshot("big", &refs, 1));
    let (addr, _srv) = server(&cache, "127.0.0.1:0".parse().unwrap()).await;
    let mut cfg = config(addr, Protocol::StateOfTheWorld);
    cfg.max_message_size = 16 * 1024;
    let (handle, mut rx) = client::start(cfg);
    handle.subscribe(types::CLUSTER, BTreeSet::new());
    assert!(tokio::time::timeout(Duration::from_secs(1), rx.recv())
        .await
        .is_err());
    let err = handle.last_stream_error().expect("the stream failed");
    assert!(err.contains("maximum xDS message size of 16384"), "{err}");
}

#[tokio::test]
async fn per_type_streams_use_the_type_services() {
    let cache = SnapshotCache::new();
    cache.set_snapshot(NODE, snapshot("v1", &["a", "b"], 1001));
    let (addr, _srv) = server(&cache, "127.0.0.1:0".parse().unwrap()).await;
    let mut clients = Vec::new();
    for protocol in [Protocol::StateOfTheWorld, Protocol::Delta] {
        let (handle, mut rx) = per_type_client(addr, protocol, ENDPOINT, "b");
        receive_and_ack(&cache, &mut rx, ENDPOINT, &["b"]).await;
        clients.push((handle, rx));
    }
}

/// SDS on its own stream (`SecretDiscoveryService`), as Istio's sidecars
/// use it: secrets are served by name, and a refused one is recorded as a
/// NACK with the client's detail.
#[tokio::test]
async fn secrets_over_the_secret_discovery_service() {
    use types::SECRET;
    let secret = |name: &str, ca: &str| {
        json_to_any(
            SECRET,
            &json!({"name": name, "validation_context": {"trusted_ca": {"inline_string": ca}}}),
        )
        .unwrap()
    };
    let cache = SnapshotCache::new();
    let snap = |v: &str, ca: &str| {
        Snapshot::new(v)
            .with_resources(SECRET, [secret("default", ca), secret("ROOTCA", ca)])
            .unwrap()
    };
    cache.set_snapshot(NODE, snap("v1", "one"));
    let (addr, _srv) = server(&cache, "127.0.0.1:0".parse().unwrap()).await;
    for protocol in [Protocol::StateOfTheWorld, Protocol::Delta] {
        let (handle, mut rx) = per_type_client(addr, protocol, SECRET, "ROOTCA");
        receive_and_ack(&cache, &mut rx, SECRET, &["ROOTCA"]).await;
        drop(handle);
    }
    // A new version: the client refuses it.
    let (_handle, mut rx) = per_type_client(addr, Protocol::StateOfTheWorld, SECRET, "ROOTCA");
    next(&mut rx).await.reply(Ok(()));
    cache.set_snapshot(NODE, snap("v2", "two"));
    let d = next(&mut rx).await;
    assert_eq!(d.update.version, "v2");
    d.reply(Err(
        "secret \"ROOTCA\": validation_context.trusted_ca: bad".into()
    ));
    assert!(
        cache
            .wait_for(NODE, WAIT, |s| s
                .nacked
                .get(SECRET)
                .is_some_and(|(v, e)| v == "v2" && e.contains("trusted_ca")))
            .await
    );
}

/// Istio's agent serves xDS and SDS on Unix sockets: the client reaches a
/// snapshot server on one (`unix:<path>`), gets CDS and ACKs it, and finds
/// the server again after it restarts on the same path.
#[tokio::test]
async fn over_a_unix_socket() {
    let dir = std::env::temp_dir().join(format!("mesh-xds-uds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("XDS");
    let _ = std::fs::remove_file(&path);
    let cache = SnapshotCache::new();
    cache.set_snapshot(NODE, snapshot("v1", &["a"], 1001));
    let srv = AdsServer::new(cache.clone()).spawn_unix(&path).unwrap();
    // The usual test client, pointed at the socket.
    let mut c = config("127.0.0.1:9".parse().unwrap(), Protocol::StateOfTheWorld);
    c.server_uri = format!("unix:{}", path.display());
    let (handle, mut rx) = client::start(c);
    handle.subscribe(CLUSTER, BTreeSet::new());
    let d = next(&mut rx).await;
    assert_eq!(names(&d), ["a"]);
    d.reply(Ok(()));
    assert!(acked_version(&cache, CLUSTER, "v1").await);

    // The server goes away and comes back on the same path with a new
    // snapshot: the client reconnects and receives it.
    drop(srv);
    tokio::time::sleep(Duration::from_millis(100)).await;
    std::fs::remove_file(&path).unwrap();
    cache.set_snapshot(NODE, snapshot("v2", &["a", "b"], 1001));
    let _srv = AdsServer::new(cache.clone()).spawn_unix(&path).unwrap();
    let d = loop {
        let d = next(&mut rx).await;
        if d.update.version == "v2" {
            break d;
        }
        d.reply(Ok(()));
    };
    assert_eq!(names(&d), ["a", "b"]);
    d.reply(Ok(()));
    assert!(handle.connected());
    let _ = std::fs::remove_dir_all(&dir);
}
