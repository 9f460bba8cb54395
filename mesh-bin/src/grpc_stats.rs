//! `envoy.filters.http.grpc_stats` at run time: per upstream cluster, the
//! gRPC calls by status (`success`, `failure`, `total`, `<grpc-status>`)
//! and their messages (`request_message_count`, `response_message_count`),
//! under Envoy's `cluster.<name>.grpc.[<service>.<method>.]` names, shown in
//! `/stats/prometheus` with the same names and labels as Envoy's.
//!
//! Only gRPC requests of an HCM with the filter are touched: the request
//! and response bodies are wrapped in a frame counter, and the call is
//! charged when its `grpc-status` arrives (trailers, or the headers of a
//! trailers-only response). A call without `grpc-status` is not charged,
//! as in Envoy.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, Response};
use http_body::{Body, Frame, SizeHint};
use mesh_codec::http::body::BodyError;
use mesh_codec::http::ProxyBody;
use mesh_core::config::grpc_stats::{GrpcStats as Config, MethodStats};
use mesh_core::config::HttpFilter;
use mesh_core::stats::{Counter, Labels, Store};

/// gRPC statuses with a cached counter (`OK` .. `UNAUTHENTICATED`).
const KNOWN_STATUSES: usize = 17;

/// The compiled filter of one HCM.
#[derive(Debug)]
pub struct GrpcStats {
    all: bool,
    allow: HashMap<String, HashSet<String>>,
    replace_dots: bool,
    store: Store,
    /// Counters by cluster, then by `service/method` (`""`: generic).
    counters: Mutex<HashMap<String, HashMap<String, Arc<Counters>>>>,
}

impl GrpcStats {
    /// The filter of an HCM's `http_filters`, if it has one.
    pub fn from_filters(filters: &[HttpFilter], store: &Store) -> Option<Arc<Self>> {
        filters.iter().find_map(|f| match f {
            HttpFilter::GrpcStats(c) => Some(Arc::new(Self::new(c, store))),
            _ => None,
        })
    }

    fn new(c: &Config, store: &Store) -> Self {
        let mut allow: HashMap<String, HashSet<String>> = HashMap::new();
        if let MethodStats::Allowlist(list) = &c.methods {
            for (s, m) in list {
                allow.entry(s.clone()).or_default().insert(m.clone());
            }
        }
        GrpcStats {
            all: c.methods == MethodStats::All,
            allow,
            replace_dots: c.replace_dots_in_grpc_service_name,
            store: store.clone(),
            counters: Mutex::new(HashMap::new()),
        }
    }

    /// A gRPC call to `path` (`/<service>/<method>`): its stats are by
    /// method when the method is allowlisted (or all are), else generic.
    pub fn begin(self: &Arc<Self>, path: &str) -> Call {
        let key = self.method_key(path).unwrap_or_default();
        Call(Arc::new(CallInner {
            filter: self.clone(),
            key,
            counters: OnceLock::new(),
        }))
    }

    fn method_key(&self, path: &str) -> Option<String> {
        let (service, method) = path.strip_prefix('/')?.split_once('/')?;
        if service.is_empty() || method.is_empty() || method.contains('/') {
            return None;
        }
        if !self.all && !self.allow.get(service).is_some_and(|m| m.contains(method)) {
            return None;
        }
        let service = if self.replace_dots {
            service.replace('.', "_")
        } else {
            service.to_owned()
        };
        Some(format!("{service}/{method}"))
    }

    fn counters(&self, cluster: &str, key: &str) -> Arc<Counters> {
        let mut map = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get(cluster).and_then(|m| m.get(key)) {
            return c.clone();
        }
        let c = Arc::new(Counters::new(&self.store, cluster, key));
        map.entry(cluster.to_owned())
            .or_default()
            .insert(key.to_owned(), c.clone());
        c
    }
}

/// `_` for every character a Prometheus name may not have.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// The counters of one method (or the generic ones) of one cluster, each
/// created when first charged, as Envoy's are.
#[derive(Debug)]
struct Counters {
    store: Store,
    /// `envoy_cluster_grpc_` and what of the method's name Envoy's tag
    /// extraction leaves in the stat name.
    prefix: String,
    labels: Labels,
    success: OnceLock<Counter>,
    failure: OnceLock<Counter>,
    total: OnceLock<Counter>,
    request_messages: OnceLock<Counter>,
    response_messages: OnceLock<Counter>,
    statuses: [OnceLock<Counter>; KNOWN_STATUSES],
}

impl Counters {
    /// Envoy's `cluster.<c>.grpc.<service>.<method>.<stat>`: the tag
    /// extractors take the cluster name, then the first dot-separated
    /// element after `grpc.` as `envoy_grpc_bridge_service` and the next
    /// as `envoy_grpc_bridge_method`; the rest stays in the name.
    fn new(store: &Store, cluster: &str, key: &str) -> Self {
        let mut labels: Labels = vec![("envoy_cluster_name", cluster.to_owned())];
        let mut prefix = String::from("envoy_cluster_grpc_");
        if let Some((service, method)) = key.split_once('/') {
            let dotted = format!("{service}.{method}");
            let (svc_tag, rest) = dotted.split_once('.').unwrap_or((&dotted, ""));
            let (method_tag, rest) = rest.split_once('.').unwrap_or((rest, ""));
            labels.push(("envoy_grpc_bridge_service", svc_tag.to_owned()));
            labels.push(("envoy_grpc_bridge_method", method_tag.to_owned()));
            if !rest.is_empty() {
                prefix.push_str(&sanitize(rest));
                prefix.push('_');
            }
        }
        Counters {
            store: store.clone(),
            prefix,
            labels,
            success: OnceLock::new(),
            failure: OnceLock::new(),
            total: OnceLock::new(),
            request_messages: OnceLock::new(),
            response_messages: OnceLock::new(),
            statuses: Default::default(),
        }
    }

    fn get<'a>(&self, cell: &'a OnceLock<Counter>, stat: &str) -> &'a Counter {
        cell.get_or_init(|| {
            self.store
                .counter(&format!("{}{stat}", self.prefix), &self.labels)
        })
    }

    fn charge(&self, status: &[u8]) {
        let known = std::str::from_utf8(status)
            .ok()
            .filter(|s| !s.is_empty() && s.len() <= 2 && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse::<usize>().ok().map(|n| (n, s)))
            .filter(|(n, s)| *n < KNOWN_STATUSES && (s.len() == 1 || !s.starts_with('0')));
        match known {
            Some((n, s)) => self.get(&self.statuses[n], s).inc(),
            // Envoy names a stat after any other value; mesh keeps the
            // number of series bounded, and counts digits only.
            None => {
                if !status.is_empty()
                    && status.len() <= 10
                    && status.iter().all(|b| b.is_ascii_digit())
                {
                    let s = String::from_utf8_lossy(status);
                    self.store
                        .counter(&format!("{}{s}", self.prefix), &self.labels)
                        .inc();
                }
            }
        }
        if status == b"0" {
            self.get(&self.success, "success").inc();
        } else {
            self.get(&self.failure, "failure").inc();
        }
        self.get(&self.total, "total").inc();
    }
}

/// One gRPC call through the filter.
#[derive(Debug, Clone)]
pub struct Call(Arc<CallInner>);

#[derive(Debug)]
struct CallInner {
    filter: Arc<GrpcStats>,
    key: String,
    /// Set when the route picked a cluster: calls with none are not counted.
    counters: OnceLock<Arc<Counters>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Request,
    Response,
}

impl Call {
    /// The request was routed to `cluster`.
    pub fn routed(&self, cluster: &str) {
        let c = self.0.filter.counters(cluster, &self.0.key);
        let _ = self.0.counters.set(c);
    }

    /// The request body, counting its messages.
    pub fn request_body(&self, body: ProxyBody) -> ProxyBody {
        if self.0.counters.get().is_none() {
            return body;
        }
        ProxyBody::Boxed(Box::pin(Counted::new(
            body,
            self.clone(),
            Direction::Request,
        )))
    }

    /// The response sent downstream: charged now when it is trailers-only,
    /// else when its trailers arrive; its messages are counted.
    pub fn response(&self, mut resp: Response<ProxyBody>) -> Response<ProxyBody> {
        let Some(c) = self.0.counters.get() else {
            return resp;
        };
        if let Some(status) = resp.headers().get("grpc-status") {
            c.charge(status.as_bytes());
            return resp;
        }
        let body = std::mem::take(resp.body_mut());
        *resp.body_mut() = ProxyBody::Boxed(Box::pin(Counted::new(
            body,
            self.clone(),
            Direction::Response,
        )));
        resp
    }

    fn messages(&self, dir: Direction, n: u64) {
        if let Some(c) = self.0.counters.get() {
            match dir {
                Direction::Request => c.get(&c.request_messages, "request_message_count"),
                Direction::Response => c.get(&c.response_messages, "response_message_count"),
            }
            .add(n);
        }
    }

    fn trailers(&self, t: &HeaderMap) {
        if let (Some(c), Some(s)) = (self.0.counters.get(), t.get("grpc-status")) {
            c.charge(s.as_bytes());
        }
    }
}

/// Finds gRPC message boundaries: each message is a 1-byte flag, a 4-byte
/// big-endian length and the payload.
#[derive(Debug, Default)]
struct Frames {
    /// Header bytes read of the current message (0: at a boundary).
    header: u8,
    len: u32,
    payload_left: u64,
}

impl Frames {
    /// The messages starting in `data`.
    fn feed(&mut self, mut data: &[u8]) -> u64 {
        let mut started = 0;
        while !data.is_empty() {
            if self.payload_left > 0 {
                let n = (self.payload_left.min(data.len() as u64)) as usize;
                self.payload_left -= n as u64;
                data = &data[n..];
                continue;
            }
            if self.header == 0 {
                started += 1;
            } else {
                self.len = (self.len << 8) | u32::from(data[0]);
            }
            self.header += 1;
            data = &data[1..];
            if self.header == 5 {
                self.payload_left = u64::from(self.len);
                self.header = 0;
                self.len = 0;
            }
        }
        started
    }
}

/// A body whose gRPC messages (and, for a response, trailers) are counted.
struct Counted {
    inner: ProxyBody,
    call: Call,
    dir: Direction,
    frames: Frames,
}

impl Counted {
    fn new(inner: ProxyBody, call: Call, dir: Direction) -> Self {
        Counted {
            inner,
            call,
            dir,
            frames: Frames::default(),
        }
    }
}

impl Body for Counted {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                let n = this.frames.feed(data);
                if n > 0 {
                    this.call.messages(this.dir, n);
                }
            } else if let Some(t) = frame.trailers_ref() {
                if this.dir == Direction::Response {
                    this.call.trailers(t);
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: u32) -> Vec<u8> {
        let mut v = vec![0];
        v.extend_from_slice(&len.to_be_bytes());
        v.extend(std::iter::repeat_n(7u8, len as usize));
        v
    }

    /// Messages are found whatever the chunking, including empty ones and
    /// headers split across chunks.
    #[test]
    fn frames_across_chunks() {
        let mut all = frame(3);
        all.extend(frame(0));
        all.extend(frame(300));
        all.extend(frame(1));
        for size in [1, 2, 4, 5, 6, 7, 64, 1000] {
            let mut f = Frames::default();
            let n: u64 = all.chunks(size).map(|c| f.feed(c)).sum();
            assert_eq!(n, 4, "chunks of {size}");
        }
    }

    fn names(cluster: &str, key: &str) -> (String, Labels) {
        let c = Counters::new(&Store::new(), cluster, key);
        (c.prefix, c.labels)
    }

    /// Envoy's tag extraction of `cluster.<c>.grpc.<service>.<method>.*`.
    #[test]
    fn prometheus_names_follow_envoys_tags() {
        let (p, l) = names("web", "pkg.Svc/Get");
        assert_eq!(p, "envoy_cluster_grpc_Get_");
        assert_eq!(l[1], ("envoy_grpc_bridge_service", "pkg".to_owned()));
        assert_eq!(l[2], ("envoy_grpc_bridge_method", "Svc".to_owned()));
        let (p, l) = names("web", "pkg_Svc/Get");
        assert_eq!(p, "envoy_cluster_grpc_");
        assert_eq!(l[1].1, "pkg_Svc");
        assert_eq!(l[2].1, "Get");
        let (p, l) = names("web", "");
        assert_eq!(p, "envoy_cluster_grpc_");
        assert_eq!(l, vec![("envoy_cluster_name", "web".to_owned())]);
    }

    #[test]
    fn method_keys() {
        let c = Config {
            methods: MethodStats::Allowlist(vec![("a.S".into(), "M".into())]),
            replace_dots_in_grpc_service_name: true,
            ..Config::default()
        };
        let f = GrpcStats::new(&c, &Store::new());
        assert_eq!(f.method_key("/a.S/M").as_deref(), Some("a_S/M"));
        assert_eq!(f.method_key("/a.S/N"), None);
        assert_eq!(f.method_key("/a.S/M/x"), None);
        assert_eq!(f.method_key("nope"), None);
    }
}
