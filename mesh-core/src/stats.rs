//! Counters and gauges, and their Prometheus text rendering.
//!
//! Stats are created once, when a listener or cluster is built, and the
//! request path only touches the returned handles (one relaxed atomic add).
//! Names and labels follow Envoy's Prometheus output
//! (`envoy_cluster_upstream_rq_xx{envoy_response_code_class="2",envoy_cluster_name="web"}`)
//! so that dashboards built for Envoy work unchanged; stats Envoy does not
//! have use the `mesh_` prefix.
//!
//! This is a small store of our own rather than `prometheus-client`: that
//! crate's text encoder appends `_total` to every counter name (OpenMetrics),
//! which would break the Envoy names.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A monotonically increasing count.
#[derive(Debug, Clone, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    /// Adds one.
    #[inline]
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    /// Adds `n`.
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Clone, Default)]
pub struct Gauge(Arc<AtomicI64>);

impl Gauge {
    /// Adds one.
    #[inline]
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    /// Subtracts one.
    #[inline]
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    /// Sets the value.
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    /// The current value.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
    /// Adds `d` and returns the new value.
    #[inline]
    pub fn add_get(&self, d: i64) -> i64 {
        self.0.fetch_add(d, Ordering::Relaxed) + d
    }
}

/// A gauge that counts one while alive: `inc` on creation, `dec` on drop.
#[derive(Debug)]
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    /// Increments `gauge` until the guard is dropped.
    pub fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        GaugeGuard(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[derive(Debug, Clone)]
enum Metric {
    Counter(Counter),
    Gauge(Gauge),
}

/// Labels of one series, in order.
pub type Labels = Vec<(&'static str, String)>;

/// Every series by name, then by rendered labels, with its metric and
/// labels. Nested rather than keyed by `(name, labels)`: a lookup borrows
/// the name instead of copying it, the name is stored once rather than per
/// series, and the comparisons while inserting one of 10,000 clusters'
/// series only see the label strings.
type Series = BTreeMap<String, BTreeMap<Arc<str>, (Metric, Arc<Labels>)>>;

/// The series, and the label set used last: a cluster or listener
/// registers its few dozen stats with the same labels one after the other,
/// and they share one rendered string and one copy of the labels (at
/// 10,000 clusters that is about 300,000 series).
#[derive(Debug, Default)]
struct Registry {
    series: Series,
    last: Option<(Arc<Labels>, Arc<str>)>,
}

/// The registry of every stat of a proxy.
#[derive(Debug, Clone, Default)]
pub struct Store {
    inner: Arc<Mutex<Registry>>,
}

fn render_labels(labels: &[(&'static str, String)]) -> String {
    let len: usize = labels.iter().map(|(k, v)| k.len() + v.len() + 4).sum();
    let mut s = String::with_capacity(len);
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(k);
        s.push_str("=\"");
        for c in v.chars() {
            match c {
                '\\' => s.push_str("\\\\"),
                '"' => s.push_str("\\\""),
                '\n' => s.push_str("\\n"),
                c => s.push(c),
            }
        }
        s.push('"');
    }
    s
}

impl Registry {
    /// The shared labels and rendered label string for `labels`.
    fn labels(&mut self, labels: &[(&'static str, String)]) -> (Arc<Labels>, Arc<str>) {
        match &self.last {
            Some((l, key)) if l.as_slice() == labels => (l.clone(), key.clone()),
            _ => {
                let shared: (Arc<Labels>, Arc<str>) =
                    (Arc::new(labels.to_vec()), Arc::from(render_labels(labels)));
                self.last = Some(shared.clone());
                shared
            }
        }
    }

    /// The metric `name{labels}`: the existing one when `existing` takes
    /// it, else a new one made by `new` (replacing a series of the other
    /// kind).
    fn get_or_insert<T>(
        &mut self,
        name: &str,
        labels: &[(&'static str, String)],
        existing: impl FnOnce(&Metric) -> Option<T>,
        new: impl FnOnce() -> (T, Metric),
    ) -> T {
        let (labels, key) = self.labels(labels);
        // The name is copied only for a new name.
        if !self.series.contains_key(name) {
            self.series.insert(name.to_owned(), BTreeMap::new());
        }
        let Some(series) = self.series.get_mut(name) else {
            return new().0;
        };
        if let Some(t) = series.get(&key).and_then(|(m, _)| existing(m)) {
            return t;
        }
        let (t, m) = new();
        series.insert(key, (m, labels));
        t
    }
}

impl Store {
    /// A new, empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        // A poisoned lock only means another thread panicked while inserting;
        // the map itself is still consistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The counter `name{labels}`, created at zero if new. Asking twice for
    /// the same series returns the same counter.
    pub fn counter(&self, name: &str, labels: &[(&'static str, String)]) -> Counter {
        self.lock().get_or_insert(
            name,
            labels,
            |m| match m {
                Metric::Counter(c) => Some(c.clone()),
                Metric::Gauge(_) => None,
            },
            || {
                let c = Counter::default();
                (c.clone(), Metric::Counter(c))
            },
        )
    }

    /// The gauge `name{labels}`, created at zero if new.
    pub fn gauge(&self, name: &str, labels: &[(&'static str, String)]) -> Gauge {
        self.lock().get_or_insert(
            name,
            labels,
            |m| match m {
                Metric::Gauge(g) => Some(g.clone()),
                Metric::Counter(_) => None,
            },
            || {
                let g = Gauge::default();
                (g.clone(), Metric::Gauge(g))
            },
        )
    }

    /// The value of a counter or gauge, if it exists (for tests and admin).
    pub fn value(&self, name: &str, labels: &[(&'static str, String)]) -> Option<i64> {
        let key = render_labels(labels);
        self.lock()
            .series
            .get(name)
            .and_then(|s| s.get(key.as_str()))
            .map(|(m, _)| m.value())
    }

    /// Prometheus text exposition format (version 0.0.4).
    pub fn render_prometheus(&self) -> String {
        let registry = self.lock();
        let map = &registry.series;
        let count: usize = map.values().map(BTreeMap::len).sum();
        let mut out = String::with_capacity(count * 64);
        let mut last_name = "";
        let all = map
            .iter()
            .flat_map(|(name, series)| series.iter().map(move |(l, m)| ((name, l), m)));
        for ((name, labels), (metric, _)) in all {
            if name != last_name {
                let ty = match metric {
                    Metric::Counter(_) => "counter",
                    Metric::Gauge(_) => "gauge",
                };
                let _ = writeln!(out, "# TYPE {name} {ty}");
                last_name = name;
            }
            let value = metric.value();
            if labels.is_empty() {
                let _ = writeln!(out, "{name} {value}");
            } else {
                let _ = writeln!(out, "{name}{{{labels}}} {value}");
            }
        }
        out
    }
}

impl Metric {
    fn value(&self) -> i64 {
        match self {
            Metric::Counter(c) => c.get() as i64,
            Metric::Gauge(g) => g.get(),
        }
    }
}

/// The label that names a stat's scope in Envoy's dotted names, and the
/// scope word that starts both names (`envoy_cluster_upstream_rq_total` with
/// `envoy_cluster_name="web"` is `cluster.web.upstream_rq_total`).
const SCOPES: [(&str, &str); 6] = [
    ("envoy_cluster_name", "cluster"),
    ("envoy_http_conn_manager_prefix", "http"),
    ("envoy_listener_address", "listener"),
    ("envoy_tcp_prefix", "tcp"),
    ("envoy_connection_limit_prefix", "connection_limit"),
    ("envoy_local_network_ratelimit_prefix", "local_rate_limit"),
];

/// A stat's name as Envoy's `/stats` text shows it.
fn envoy_name(name: &str, labels: &[(&'static str, String)]) -> String {
    let (root, rest) = match name.strip_prefix("envoy_") {
        Some(rest) => ("", rest),
        None => match name.strip_prefix("mesh_") {
            Some(rest) => ("mesh.", rest),
            None => ("", name),
        },
    };
    let mut out = String::from(root);
    let mut stat = rest.to_owned();
    for (label, word) in SCOPES {
        if let Some((_, v)) = labels.iter().find(|(k, _)| *k == label) {
            if let Some(tail) = stat.strip_prefix(word).and_then(|t| t.strip_prefix('_')) {
                let _ = write!(out, "{word}.{v}.");
                stat = tail.to_owned();
            }
        }
    }
    // Sub-scopes Envoy writes with a dot: `cluster.web.health_check.attempt`.
    for sub in [
        "health_check_",
        "outlier_detection_",
        "http_inspector_",
        "protocol_inspector_",
    ] {
        if let Some(tail) = stat.strip_prefix(sub) {
            stat = format!("{}.{tail}", &sub[..sub.len() - 1]);
        }
    }
    for (k, v) in labels {
        match *k {
            "envoy_response_code_class" => {
                if let Some(base) = stat.strip_suffix("_xx") {
                    stat = format!("{base}_{v}xx");
                }
            }
            "envoy_response_code" => stat = format!("{stat}_{v}"),
            k if SCOPES.iter().any(|(l, _)| *l == k) => {}
            _ => stat = format!("{stat}.{v}"),
        }
    }
    out.push_str(&stat);
    out
}

impl Store {
    /// Envoy's `/stats` text format: `cluster.web.upstream_rq_2xx: 3`, one
    /// stat a line, sorted by name, so scripts written against Envoy's admin
    /// page read mesh's too.
    pub fn render_envoy_text(&self) -> String {
        let registry = self.lock();
        let mut lines: Vec<String> = registry
            .series
            .iter()
            .flat_map(|(name, series)| series.values().map(move |m| (name, m)))
            .map(|(name, (metric, labels))| {
                format!("{}: {}", envoy_name(name, labels), metric.value())
            })
            .collect();
        lines.sort();
        let mut out = lines.join("\n");
        out.push('\n');
        out
    }
}

/// Counters by HTTP status class (1xx .. 5xx).
#[derive(Debug, Clone)]
pub struct StatusClassCounters([Counter; 5]);

impl StatusClassCounters {
    /// Creates `name{envoy_response_code_class="N", labels...}` for N in 1..=5.
    pub fn new(store: &Store, name: &str, labels: &[(&'static str, String)]) -> Self {
        let mk = |class: u8| {
            let mut l: Labels = vec![("envoy_response_code_class", class.to_string())];
            l.extend(labels.iter().cloned());
            store.counter(name, &l)
        };
        StatusClassCounters([mk(1), mk(2), mk(3), mk(4), mk(5)])
    }

    /// Counts one response with this status.
    #[inline]
    pub fn record(&self, status: u16) {
        let class = (status / 100).clamp(1, 5) as usize;
        self.0[class - 1].inc();
    }
}

/// Counters by exact status code (`name{envoy_response_code="503",...}`),
/// each series created the first time its code is seen.
#[derive(Debug, Clone)]
pub struct StatusCodeCounters {
    store: Store,
    name: Arc<str>,
    labels: Arc<Labels>,
    /// One slot per code in 100..=599, allocated on the first response
    /// (8 KB): a cluster that never sees traffic costs a pointer, which
    /// matters with thousands of clusters from xDS.
    slots: Arc<std::sync::OnceLock<Box<[std::sync::OnceLock<Counter>]>>>,
}

impl StatusCodeCounters {
    /// Counters named `name` with `labels` plus `envoy_response_code`.
    pub fn new(store: &Store, name: &str, labels: &[(&'static str, String)]) -> Self {
        StatusCodeCounters {
            store: store.clone(),
            name: Arc::from(name),
            labels: Arc::new(labels.to_vec()),
            slots: Arc::default(),
        }
    }

    /// Counts one response with this status (codes outside 100..=599 are
    /// not counted).
    #[inline]
    pub fn record(&self, status: u16) {
        let Some(slot) = status.checked_sub(100).filter(|i| *i < 500).and_then(|i| {
            self.slots
                .get_or_init(|| (100..600).map(|_| std::sync::OnceLock::new()).collect())
                .get(i as usize)
        }) else {
            return;
        };
        slot.get_or_init(|| {
            let mut l: Labels = self.labels.as_ref().clone();
            l.push(("envoy_response_code", status.to_string()));
            self.store.counter(&self.name, &l)
        })
        .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_envoy_style_names() {
        let store = Store::new();
        let c = StatusClassCounters::new(
            &store,
            "envoy_cluster_upstream_rq_xx",
            &[("envoy_cluster_name", "web".into())],
        );
        c.record(200);
        c.record(204);
        c.record(503);
        store
            .gauge(
                "envoy_cluster_upstream_rq_active",
                &[("envoy_cluster_name", "web".into())],
            )
            .inc();
        let text = store.render_prometheus();
        assert!(text.contains(
            "envoy_cluster_upstream_rq_xx{envoy_response_code_class=\"2\",envoy_cluster_name=\"web\"} 2"
        ));
        assert!(text.contains(
            "envoy_cluster_upstream_rq_xx{envoy_response_code_class=\"5\",envoy_cluster_name=\"web\"} 1"
        ));
        assert!(text.contains("# TYPE envoy_cluster_upstream_rq_active gauge"));
        assert_eq!(
            text.matches("# TYPE envoy_cluster_upstream_rq_xx counter")
                .count(),
            1
        );
    }

    #[test]
    fn status_codes_get_their_own_series() {
        let store = Store::new();
        let c = StatusCodeCounters::new(
            &store,
            "envoy_cluster_upstream_rq",
            &[("envoy_cluster_name", "a".into())],
        );
        c.record(503);
        c.record(503);
        c.record(200);
        c.record(42);
        let text = store.render_prometheus();
        assert!(
            text.contains(
                "envoy_cluster_upstream_rq{envoy_cluster_name=\"a\",envoy_response_code=\"503\"} 2"
            ),
            "{text}"
        );
        assert!(text.contains(
            "envoy_cluster_upstream_rq{envoy_cluster_name=\"a\",envoy_response_code=\"200\"} 1"
        ));
        assert!(!text.contains("\"42\""));
    }

    #[test]
    fn envoy_text_names() {
        let store = Store::new();
        let web = vec![("envoy_cluster_name", "web".to_owned())];
        StatusClassCounters::new(&store, "envoy_cluster_upstream_rq_xx", &web).record(204);
        StatusCodeCounters::new(&store, "envoy_cluster_upstream_rq", &web).record(204);
        store.counter("envoy_cluster_upstream_rq_total", &web).inc();
        store
            .counter("envoy_cluster_health_check_attempt", &web)
            .inc();
        store
            .gauge("envoy_cluster_outlier_detection_ejections_active", &web)
            .inc();
        store
            .counter(
                "envoy_listener_downstream_cx_total",
                &[("envoy_listener_address", "127.0.0.1_80".into())],
            )
            .inc();
        store
            .counter(
                "mesh_http_downstream_rq_response_flag",
                &[
                    ("envoy_http_conn_manager_prefix", "in".into()),
                    ("flag", "UF".into()),
                ],
            )
            .inc();
        let text = store.render_envoy_text();
        for line in [
            "cluster.web.upstream_rq_2xx: 1",
            "cluster.web.upstream_rq_204: 1",
            "cluster.web.upstream_rq_total: 1",
            "cluster.web.health_check.attempt: 1",
            "cluster.web.outlier_detection.ejections_active: 1",
            "listener.127.0.0.1_80.downstream_cx_total: 1",
            "mesh.http.in.downstream_rq_response_flag.UF: 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
    }

    #[test]
    fn same_series_is_shared() {
        let store = Store::new();
        store.counter("x", &[]).inc();
        store.counter("x", &[]).inc();
        assert_eq!(store.value("x", &[]), Some(2));
    }
}
