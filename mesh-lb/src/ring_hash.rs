//! Ring hash (ketama) as Envoy builds it: every endpoint gets
//! `scale * normalized weight` points on a 64-bit ring, each the xxHash64 of
//! `"<ip:port>_<i>"` (or the host name with `use_hostname_for_hashing`);
//! `scale` makes the lightest endpoint get a whole number of points and at
//! least `minimum_ring_size` points in all, capped at `maximum_ring_size`.
//! A request hash maps to the first point at or after it (wrapping), found
//! by binary search: O(log ring size).
//!
//! Because the keys and the hash function are Envoy's, mesh and Envoy send
//! the same request hash to the same endpoint.

use std::sync::Arc;

use xxhash_rust::xxh64::xxh64;

use crate::Endpoint;

/// A built ring: sorted `(point, endpoint index)`.
#[derive(Debug)]
pub(crate) struct Ring {
    points: Vec<(u64, u32)>,
}

/// The text an endpoint is hashed by.
pub(crate) fn hash_key(e: &Endpoint, use_hostname: bool) -> String {
    if use_hostname {
        e.hostname.clone()
    } else {
        e.addr.to_string()
    }
}

impl Ring {
    pub(crate) fn build(
        hosts: &[Arc<Endpoint>],
        min_size: u64,
        max_size: u64,
        use_hostname: bool,
    ) -> Ring {
        if hosts.is_empty() {
            return Ring { points: Vec::new() };
        }
        let total: f64 = hosts.iter().map(|h| f64::from(h.weight.max(1))).sum();
        let min_norm = hosts
            .iter()
            .map(|h| f64::from(h.weight.max(1)) / total)
            .fold(f64::INFINITY, f64::min);
        let scale = ((min_norm * min_size as f64).ceil() / min_norm).min(max_size.max(1) as f64);
        let mut points = Vec::with_capacity(scale.ceil() as usize);
        let mut current = 0.0f64;
        let mut target = 0.0f64;
        let mut key = String::new();
        for (idx, h) in hosts.iter().enumerate() {
            let base = hash_key(h, use_hostname);
            target += scale * f64::from(h.weight.max(1)) / total;
            let mut i = 0u64;
            while current < target {
                key.clear();
                key.push_str(&base);
                key.push('_');
                key.push_str(&i.to_string());
                points.push((xxh64(key.as_bytes(), 0), idx as u32));
                i += 1;
                current += 1.0;
            }
        }
        points.sort_unstable_by_key(|p| p.0);
        Ring { points }
    }

    /// The endpoint index for `hash`.
    #[inline]
    pub(crate) fn pick(&self, hash: u64) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let i = self.points.partition_point(|p| p.0 < hash);
        let i = if i == self.points.len() { 0 } else { i };
        Some(self.points[i].1 as usize)
    }
}
