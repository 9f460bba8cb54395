//! On-demand (lazy) EDS: a cluster's endpoints are subscribed only once a
//! request uses the cluster.
//!
//! An Istio sidecar is sent every cluster of the mesh (thousands, with
//! their endpoints) while its application talks to a handful. With
//! `--lazy-eds`, an EDS cluster that arrives over CDS is built and counts
//! as warm at once, without subscribing to its `ClusterLoadAssignment`:
//! a cluster no request ever uses never holds endpoints, and the proxy is
//! ready as soon as its clusters and listeners are.
//!
//! Each such cluster carries an [`OnDemandEndpoints`]. Its state machine:
//!
//! ```text
//!  Unused --first request--> Requested --endpoints arrive--------> Ready
//!                               |     --initial_fetch_timeout-->   (no endpoints: 503 UH)
//! ```
//!
//! - **Unused**: the first request that picks the cluster sends its name
//!   to the xDS manager (once, however many requests race) and waits.
//! - **Requested**: the manager adds the cluster's service name to the EDS
//!   subscription (state-of-the-world: the grown name list; delta:
//!   `resource_names_subscribe`). Every request arriving meanwhile waits on
//!   the same signal, bounded by the cluster's `initial_fetch_timeout`
//!   (15 s when it is `0s`, so a request never waits forever).
//! - **Ready**: the endpoints arrived, or the timeout passed and the
//!   cluster goes live without them (as a warming cluster does in Envoy),
//!   after which requests answer 503 `UH` at once. The check on the request
//!   path is then one atomic load.
//!
//! A cluster removed over CDS leaves the subscription; a reconnected xDS
//! stream resubscribes the names in use (the client keeps them).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

/// How long a first request waits for endpoints when the cluster's
/// `initial_fetch_timeout` is `0s` (wait forever): Envoy's default.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(15);

/// The on-demand endpoint state of one cluster, shared by every worker.
#[derive(Debug)]
pub struct OnDemandEndpoints {
    cluster: Arc<str>,
    ready: AtomicBool,
    requested: AtomicBool,
    signal: watch::Sender<bool>,
    wait: Duration,
    requests: mpsc::UnboundedSender<Arc<str>>,
}

impl OnDemandEndpoints {
    /// The state of `cluster`, whose first request asks for its endpoints
    /// on `requests` and waits at most `wait`.
    pub fn new(
        cluster: &str,
        wait: Option<Duration>,
        requests: mpsc::UnboundedSender<Arc<str>>,
    ) -> Arc<Self> {
        Arc::new(OnDemandEndpoints {
            cluster: Arc::from(cluster),
            ready: AtomicBool::new(false),
            requested: AtomicBool::new(false),
            signal: watch::channel(false).0,
            wait: wait.unwrap_or(DEFAULT_WAIT),
            requests,
        })
    }

    /// Waits until the cluster's endpoints are loaded (or given up on),
    /// asking for them if no request did yet. Returns at once when they
    /// are.
    #[inline]
    pub async fn ready(&self) {
        if self.ready.load(Ordering::Acquire) {
            return;
        }
        self.wait_ready().await;
    }

    async fn wait_ready(&self) {
        let mut rx = self.signal.subscribe();
        if !self.requested.swap(true, Ordering::AcqRel) {
            tracing::debug!(cluster = %self.cluster, "lazy EDS: first use, subscribing to the endpoints");
            if self.requests.send(self.cluster.clone()).is_err() {
                // No xDS manager any more: nothing will arrive.
                self.mark_ready();
                return;
            }
        }
        if tokio::time::timeout(self.wait, rx.wait_for(|r| *r))
            .await
            .is_err()
        {
            tracing::debug!(cluster = %self.cluster, "lazy EDS: endpoints did not arrive in time");
        }
    }

    /// Whether a request asked for the endpoints.
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// Whether the endpoints arrived (or the wait for them ended).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Records a subscription made without a request (a cluster rebuilt
    /// while in use keeps its subscription).
    pub(crate) fn mark_requested(&self) {
        self.requested.store(true, Ordering::Release);
    }

    /// The endpoints arrived, or the wait for them ended: waiting requests
    /// proceed, later ones do not wait.
    pub(crate) fn mark_ready(&self) {
        self.requested.store(true, Ordering::Release);
        self.ready.store(true, Ordering::Release);
        self.signal.send_replace(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn concurrent_first_requests_ask_once_and_share_the_wait() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let od = OnDemandEndpoints::new("c1", Some(Duration::from_secs(5)), tx);
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let od = od.clone();
                tokio::spawn(async move { od.ready().await })
            })
            .collect();
        tokio::task::yield_now().await;
        assert_eq!(rx.recv().await.as_deref(), Some("c1"));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(rx.try_recv().is_err(), "one subscription for all");
        assert!(waiters.iter().all(|w| !w.is_finished()));
        od.mark_ready();
        for w in waiters {
            w.await.unwrap();
        }
        // Ready: no wait, no new request.
        od.ready().await;
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_is_bounded() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let od = OnDemandEndpoints::new("c1", None, tx);
        let start = tokio::time::Instant::now();
        od.ready().await;
        assert_eq!(start.elapsed(), DEFAULT_WAIT);
        assert!(od.requested());
    }
}
