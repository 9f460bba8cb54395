//! Request mirroring on RPC routes (`request_mirror_policies` of Envoy's
//! Thrift routes and of `rpc_proxy` routes): a sampled share of a route's
//! requests is copied, fire-and-forget, to a mirror cluster.
//!
//! The shadow is a copy of the decoded [`Message`] (the payload is shared
//! `Bytes`, never re-read); it goes through the mirror cluster's own
//! balancer, `max_requests` circuit breaker and this worker's connections
//! to its endpoints, and is counted in that cluster's stats (and its
//! outlier detection) as an ordinary request. Its response is read and
//! dropped. The primary request never waits for its shadow: the endpoint
//! pick and the circuit-breaker check are synchronous and cheap, the send
//! runs on its own task. A oneway request is mirrored as a oneway.
//!
//! A shadow that cannot be submitted (no healthy endpoint in the mirror
//! cluster) is counted in Envoy's Thrift router stat
//! `shadow_request_submit_failure` (see [`RpcStats`](super::RpcStats));
//! one over the mirror cluster's `max_requests` in its
//! `upstream_rq_active_overflow`.

use std::sync::Arc;
use std::time::Duration;

use mesh_codec::rpc::Message;
use mesh_core::policy::RoutingPriority;
use mesh_core::stats::{Counter, GaugeGuard};

use super::{RpcCluster, RpcWorker};

/// Submits a shadow copy of `msg` to `cluster`. `timeout` (the route's)
/// bounds the shadow's wait for its response.
pub(super) fn submit(
    cluster: &Arc<RpcCluster>,
    msg: Message,
    priority: RoutingPriority,
    timeout: Option<Duration>,
    submit_failure: &Counter,
) {
    let entry = &cluster.entry;
    let Some(endpoint) = entry.balancer.pick_with(&mesh_lb::PickContext::new()) else {
        entry.stats.cx_none_healthy.inc();
        submit_failure.inc();
        return;
    };
    let resources = entry.policy.resources(priority);
    if !resources.requests.can_create() {
        entry.policy.rq_active_overflow.inc();
        return;
    }
    let permit = resources.requests.acquire();
    entry.stats.rq_total.inc();
    endpoint.stats.rq_total.inc();
    let cluster = cluster.clone();
    tokio::spawn(async move {
        let _permit = permit;
        let _active = GaugeGuard::new(&endpoint.stats.rq_active);
        let client = cluster.client(&endpoint);
        let call = client.call(msg);
        let result = match timeout {
            Some(t) => tokio::time::timeout(t, call).await.ok(),
            None => Some(call.await),
        };
        match result {
            // Counted as any try is: status, endpoint errors, outlier
            // detection. The answer itself is dropped.
            Some(r) => {
                if let Err((_, flag, detail)) = RpcWorker::outcome(&cluster, &endpoint, r) {
                    tracing::debug!(cluster = %cluster.entry.config.name, endpoint = %endpoint.addr, flag = flag.as_str(), %detail, "shadow request failed");
                }
            }
            None => {
                let stats = &cluster.entry.stats;
                stats.rq_timeout.inc();
                stats.record_status(504);
                endpoint.stats.rq_error.inc();
                cluster.entry.outlier_failure(
                    &endpoint,
                    mesh_core::flags::ResponseFlag::UpstreamRequestTimeout,
                );
            }
        }
    });
}
