//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), weighted as
//! Envoy does it: each endpoint has a permutation of the table slots given
//! by `offset = xxh64(key, 0) % M` and `skip = xxh64(key, 1) % (M - 1) + 1`;
//! endpoints take turns claiming their next free slot, an endpoint of
//! weight `w` taking a turn in `w / max weight` of the rounds. `M` (the
//! table size) must be prime so every permutation visits every slot. A pick
//! is one modulo and one load: `table[hash % M]`.

use std::sync::Arc;

use xxhash_rust::xxh64::xxh64;

use crate::ring_hash::hash_key;
use crate::Endpoint;

/// A built lookup table of endpoint indices.
#[derive(Debug)]
pub(crate) struct Maglev {
    table: Vec<u32>,
}

/// Whether `n` is prime (trial division; `n` is at most a few million).
pub fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    if n % 2 == 0 {
        return n == 2;
    }
    let mut d = 3;
    while d * d <= n {
        if n % d == 0 {
            return false;
        }
        d += 2;
    }
    true
}

impl Maglev {
    pub(crate) fn build(hosts: &[Arc<Endpoint>], table_size: u64, use_hostname: bool) -> Maglev {
        let m = table_size;
        if hosts.is_empty() || m < 2 {
            return Maglev { table: Vec::new() };
        }
        // Build in key order so the table does not depend on the order the
        // endpoints were listed in.
        let mut entries: Vec<(String, u32)> = hosts
            .iter()
            .enumerate()
            .map(|(i, h)| (hash_key(h, use_hostname), i as u32))
            .collect();
        entries.sort();
        struct Build {
            idx: u32,
            offset: u64,
            skip: u64,
            next: u64,
            weight: f64,
            target: f64,
        }
        let max_w = hosts.iter().map(|h| h.weight.max(1)).max().unwrap_or(1) as f64;
        let mut b: Vec<Build> = entries
            .iter()
            .map(|(k, i)| Build {
                idx: *i,
                offset: xxh64(k.as_bytes(), 0) % m,
                skip: xxh64(k.as_bytes(), 1) % (m - 1) + 1,
                next: 0,
                weight: f64::from(hosts[*i as usize].weight.max(1)) / max_w,
                target: 0.0,
            })
            .collect();
        const EMPTY: u32 = u32::MAX;
        let mut table = vec![EMPTY; m as usize];
        let mut filled = 0u64;
        let mut iteration = 1u64;
        while filled < m {
            for e in b.iter_mut() {
                if filled == m {
                    break;
                }
                if (iteration as f64) * e.weight < e.target {
                    continue;
                }
                e.target += 1.0;
                let mut c = (e.offset + e.skip * (e.next % m)) % m;
                while table[c as usize] != EMPTY {
                    e.next += 1;
                    c = (e.offset + e.skip.wrapping_mul(e.next % m) % m) % m;
                }
                table[c as usize] = e.idx;
                e.next += 1;
                filled += 1;
            }
            iteration += 1;
        }
        Maglev { table }
    }

    /// The endpoint index for `hash`.
    #[inline]
    pub(crate) fn pick(&self, hash: u64) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        Some(self.table[(hash % self.table.len() as u64) as usize] as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primes() {
        assert!(is_prime(65537));
        assert!(is_prime(2));
        assert!(!is_prime(65536));
        assert!(!is_prime(1));
        assert!(!is_prime(65539 * 3));
    }
}
