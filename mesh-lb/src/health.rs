//! Per-endpoint health state shared by the balancers (readers) and the
//! health checker / outlier detector (writers).
//!
//! Flags are bits in one atomic so a pick reads them with a single relaxed
//! load. Writers flip a flag and then call [`crate::Balancer::health_changed`]
//! so the balancer recomputes its healthy set (priority spill-over, panic
//! threshold) off the request path.

use std::sync::atomic::{AtomicU8, Ordering};

/// Health flags of one endpoint, as Envoy's `health_flags` on `/clusters`.
#[derive(Debug, Default)]
pub struct HealthFlags(AtomicU8);

impl HealthFlags {
    /// Failed active health checking (`/failed_active_hc`).
    pub const FAILED_ACTIVE_HC: u8 = 1 << 0;
    /// Ejected by outlier detection (`/failed_outlier_check`).
    pub const FAILED_OUTLIER_CHECK: u8 = 1 << 1;
    /// Not yet checked since it was added (`/pending_active_hc`); counts as
    /// unhealthy only when the cluster asks for it.
    pub const PENDING_ACTIVE_HC: u8 = 1 << 2;
    /// Marked unhealthy by discovery (EDS `health_status`) (`/failed_eds_health`).
    pub const FAILED_EDS_HEALTH: u8 = 1 << 3;
    /// Degraded (EDS `DEGRADED` or active check `x-envoy-degraded`).
    pub const DEGRADED: u8 = 1 << 4;
    /// The last active health check timed out (`/active_hc_timeout`);
    /// informational, cleared by the next passing check.
    pub const ACTIVE_HC_TIMEOUT: u8 = 1 << 5;

    /// The flags that make an endpoint unhealthy.
    pub const UNHEALTHY_MASK: u8 =
        Self::FAILED_ACTIVE_HC | Self::FAILED_OUTLIER_CHECK | Self::FAILED_EDS_HEALTH;

    /// Flags with `bits` set.
    pub fn new(bits: u8) -> Self {
        HealthFlags(AtomicU8::new(bits))
    }

    /// Sets `flag`; returns whether it was newly set.
    pub fn set(&self, flag: u8) -> bool {
        self.0.fetch_or(flag, Ordering::AcqRel) & flag == 0
    }

    /// Clears `flag`; returns whether it was set before.
    pub fn clear(&self, flag: u8) -> bool {
        self.0.fetch_and(!flag, Ordering::AcqRel) & flag != 0
    }

    /// All flags.
    pub fn bits(&self) -> u8 {
        self.0.load(Ordering::Relaxed)
    }

    /// Whether `flag` is set.
    pub fn has(&self, flag: u8) -> bool {
        self.bits() & flag != 0
    }

    /// True when no unhealthy flag is set.
    pub fn is_healthy(&self) -> bool {
        self.bits() & Self::UNHEALTHY_MASK == 0
    }

    /// Envoy's `/clusters` rendering (in Envoy's order), e.g. `healthy` or
    /// `/failed_active_hc/failed_outlier_check`.
    pub fn render(&self) -> String {
        let bits = self.bits();
        if bits == 0 {
            return "healthy".into();
        }
        let mut s = String::new();
        for (flag, name) in [
            (Self::FAILED_ACTIVE_HC, "/failed_active_hc"),
            (Self::FAILED_OUTLIER_CHECK, "/failed_outlier_check"),
            (Self::FAILED_EDS_HEALTH, "/failed_eds_health"),
            (Self::DEGRADED, "/degraded_eds_health"),
            (Self::PENDING_ACTIVE_HC, "/pending_active_hc"),
            (Self::ACTIVE_HC_TIMEOUT, "/active_hc_timeout"),
        ] {
            if bits & flag != 0 {
                s.push_str(name);
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_set_clear_and_render() {
        let h = HealthFlags::default();
        assert!(h.is_healthy());
        assert_eq!(h.render(), "healthy");
        assert!(h.set(HealthFlags::FAILED_ACTIVE_HC));
        assert!(!h.set(HealthFlags::FAILED_ACTIVE_HC));
        h.set(HealthFlags::FAILED_OUTLIER_CHECK);
        assert!(!h.is_healthy());
        assert_eq!(h.render(), "/failed_active_hc/failed_outlier_check");
        assert!(h.clear(HealthFlags::FAILED_ACTIVE_HC));
        assert!(h.clear(HealthFlags::FAILED_OUTLIER_CHECK));
        assert!(h.is_healthy());
        h.set(HealthFlags::PENDING_ACTIVE_HC);
        assert!(h.is_healthy());
    }
}
