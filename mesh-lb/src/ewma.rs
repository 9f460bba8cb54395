//! Peak EWMA latency estimate per endpoint (linkerd's balancer, after
//! `tower::load::PeakEwma`).
//!
//! A sample above the estimate replaces it at once (the *peak*), so an
//! endpoint that slows down is avoided from its first slow response; a
//! sample below it is averaged in with a weight that grows with the time
//! since the last sample (`1 - e^(-elapsed/decay)`), so recovery is gradual.
//! Between samples the estimate read by the balancer decays toward zero at
//! the same rate, so an endpoint that stopped receiving traffic is tried
//! again after a few decay periods. The balancer's cost is
//! `estimate * (active requests + 1)`.
//!
//! Time comes from `tokio::time::Instant`, so tests can drive it with a
//! paused clock.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The peak-EWMA round-trip estimate of one endpoint.
#[derive(Debug)]
pub struct RttEstimate {
    state: Mutex<(f64, Instant)>,
    decay_ns: f64,
}

impl RttEstimate {
    /// A new estimate starting at `default_rtt`, decaying with time
    /// constant `decay`.
    pub fn new(default_rtt: Duration, decay: Duration) -> Self {
        RttEstimate {
            state: Mutex::new((default_rtt.as_nanos() as f64, Instant::now())),
            decay_ns: (decay.as_nanos() as f64).max(1.0),
        }
    }

    /// Records one round trip (request sent to response headers) observed
    /// at `now`.
    pub fn observe_at(&self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if rtt > s.0 {
            s.0 = rtt;
        } else {
            let elapsed = now.saturating_duration_since(s.1).as_nanos() as f64;
            let decay = (-elapsed / self.decay_ns).exp();
            s.0 = s.0 * decay + rtt * (1.0 - decay);
        }
        s.1 = now;
    }

    /// The estimate in nanoseconds at `now` (decayed since the last sample).
    pub fn estimate_at(&self, now: Instant) -> f64 {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let elapsed = now.saturating_duration_since(s.1).as_nanos() as f64;
        s.0 * (-elapsed / self.decay_ns).exp()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn peak_then_decay() {
        let e = RttEstimate::new(Duration::from_millis(30), Duration::from_secs(10));
        let now = Instant::now();
        e.observe_at(Duration::from_millis(50), now);
        assert_eq!(e.estimate_at(now), 50e6);
        // A fast sample right away barely moves it; one after a long quiet
        // period mostly replaces it.
        e.observe_at(Duration::from_millis(1), now);
        assert!(e.estimate_at(now) > 49e6);
        tokio::time::advance(Duration::from_secs(30)).await;
        e.observe_at(Duration::from_millis(1), Instant::now());
        let v = e.estimate_at(Instant::now());
        assert!(v < 4e6, "{v}");
    }
}
