//! Histograms: a count per bucket, a sum and a count, rendered as
//! Prometheus' `_bucket{le="..."}`, `_sum` and `_count` series.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Envoy's default histogram buckets (milliseconds for durations), which
/// Istio's `istio_request_duration_milliseconds` uses.
pub const DURATION_BUCKETS: &[f64] = &[
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Powers of ten from 1 to 10^9, Istio's buckets for request and response
/// sizes in bytes.
pub const BYTES_BUCKETS: &[f64] = &[1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9];

#[derive(Debug)]
struct Inner {
    bounds: &'static [f64],
    /// One count per bound, plus one for `+Inf` (not cumulative).
    buckets: Box<[AtomicU64]>,
    /// The sum as `f64` bits.
    sum: AtomicU64,
    count: AtomicU64,
}

/// A distribution of observed values over fixed buckets.
#[derive(Debug, Clone)]
pub struct Histogram(Arc<Inner>);

impl Histogram {
    /// An empty histogram over `bounds` (ascending upper bounds).
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram(Arc::new(Inner {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0f64.to_bits()),
            count: AtomicU64::new(0),
        }))
    }

    /// Records one value.
    pub fn record(&self, v: f64) {
        let i = self.0.bounds.partition_point(|b| *b < v);
        if let Some(b) = self.0.buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        let _ = self
            .0
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                Some((f64::from_bits(s) + v).to_bits())
            });
        self.0.count.fetch_add(1, Ordering::Relaxed);
    }

    /// How many values were recorded.
    pub fn count(&self) -> u64 {
        self.0.count.load(Ordering::Relaxed)
    }

    /// The sum of the recorded values.
    pub fn sum(&self) -> f64 {
        f64::from_bits(self.0.sum.load(Ordering::Relaxed))
    }

    /// Appends the `_bucket`, `_sum` and `_count` lines of `name{labels}`.
    pub(super) fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0u64;
        for (i, b) in self.0.buckets.iter().enumerate() {
            cumulative += b.load(Ordering::Relaxed);
            let le = match self.0.bounds.get(i) {
                Some(bound) => format_bound(*bound),
                None => "+Inf".to_owned(),
            };
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
            );
        }
        let braces = |s: &str| {
            if s.is_empty() {
                String::new()
            } else {
                format!("{{{s}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {}", braces(labels), self.sum());
        let _ = writeln!(out, "{name}_count{} {}", braces(labels), self.count());
    }
}

/// A bound as Prometheus clients write it: `0.5`, `10`, `1e+06`.
fn format_bound(b: f64) -> String {
    if b >= 1e6 {
        let exp = b.log10().floor() as i32;
        let mantissa = b / 10f64.powi(exp);
        format!("{mantissa}e+{exp:02}")
    } else {
        format!("{b}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_with_sum_and_count() {
        let h = Histogram::new(DURATION_BUCKETS);
        for v in [0.2, 3.0, 3.0, 7_000_000.0] {
            h.record(v);
        }
        let mut out = String::new();
        h.render(&mut out, "d", "a=\"b\"");
        assert!(out.contains("d_bucket{a=\"b\",le=\"0.5\"} 1\n"), "{out}");
        assert!(out.contains("d_bucket{a=\"b\",le=\"5\"} 3\n"), "{out}");
        assert!(
            out.contains("d_bucket{a=\"b\",le=\"3.6e+06\"} 3\n"),
            "{out}"
        );
        assert!(out.contains("d_bucket{a=\"b\",le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("d_sum{a=\"b\"} 7000006.2\n"), "{out}");
        assert!(out.contains("d_count{a=\"b\"} 4\n"), "{out}");
        assert_eq!(format_bound(1e9), "1e+09");
    }
}
