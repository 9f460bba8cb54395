//! The listener filters that tell a plain-text connection's application
//! protocol from its first bytes, for `filter_chain_match.application_protocols`:
//!
//! - `envoy.filters.listener.http_inspector` (Envoy's): `http/1.0`,
//!   `http/1.1` or `h2c`, counted in Envoy's `http_inspector.*` stats;
//! - `mesh.filters.listener.protocol_inspector` (mesh's): the same, and
//!   `dubbo`, `bolt` or `thrift`, counted in `mesh_protocol_inspector_*`.
//!
//! Detection itself is [`mesh_codec::sniff::detect`]; this module peeks at
//! the socket ([`mesh_core::peek::peek_until`], so the chosen chain still
//! reads from byte 0) and keeps the stats. TLS connections are not
//! inspected (Envoy's http_inspector skips any transport but
//! `raw_buffer`): the TLS inspector has already given them
//! `transport_protocol: tls` and their ALPN.

use mesh_codec::sniff::{detect, Detection, Protocol, ProtocolSet, MAX_INSPECT};
use mesh_core::peek::{peek_until, PeekError};
use mesh_core::stats::{Counter, Store};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// One inspector's counters: one per protocol it finds, `not_found` and
/// `read_error`.
#[derive(Debug)]
struct InspectorStats {
    found: Vec<(Protocol, Counter)>,
    not_found: Counter,
    read_error: Counter,
}

/// The stat word of a protocol (`http11` in `http_inspector.http11_found`).
fn stat_word(p: Protocol) -> &'static str {
    match p {
        Protocol::Http10 => "http10",
        Protocol::Http11 => "http11",
        Protocol::H2c => "http2",
        Protocol::Dubbo => "dubbo",
        Protocol::Bolt => "bolt",
        Protocol::Thrift => "thrift",
    }
}

impl InspectorStats {
    /// Envoy's `http_inspector.*` (no scope label, as in Envoy).
    fn http(store: &Store) -> Self {
        Self::new(store, "envoy_http_inspector", "http_not_found", true)
    }

    /// mesh's `mesh_protocol_inspector_*`, in the same shape.
    fn mesh(store: &Store) -> Self {
        Self::new(store, "mesh_protocol_inspector", "not_found", false)
    }

    fn new(store: &Store, prefix: &str, not_found: &str, http_only: bool) -> Self {
        let found = Protocol::ALL
            .into_iter()
            .filter(|p| p.is_http() || !http_only)
            .map(|p| {
                let name = format!("{prefix}_{}_found", stat_word(p));
                (p, store.counter(&name, &[]))
            })
            .collect();
        InspectorStats {
            found,
            not_found: store.counter(&format!("{prefix}_{not_found}"), &[]),
            read_error: store.counter(&format!("{prefix}_read_error"), &[]),
        }
    }

    fn record(&self, d: Option<Protocol>) {
        match d.and_then(|d| self.found.iter().find(|(p, _)| *p == d)) {
            Some((_, c)) => c.inc(),
            None => self.not_found.inc(),
        }
    }
}

/// What inspecting a connection gave.
#[derive(Debug)]
pub(crate) enum Inspected {
    /// The application protocol, or `None` when the bytes are none of the
    /// protocols looked for.
    Decided(Option<Protocol>),
    /// `listener_filters_timeout` passed first.
    TimedOut,
    /// The peer closed, the request line was too long, or the socket
    /// failed: the connection is to be closed for this reason.
    Failed(PeekError),
}

/// The HTTP and/or protocol inspector of a listener.
#[derive(Debug)]
pub(crate) struct ProtocolInspector {
    set: ProtocolSet,
    http: Option<InspectorStats>,
    mesh: Option<InspectorStats>,
}

impl ProtocolInspector {
    /// The inspector for a listener with `http_inspector` and/or
    /// `protocol_inspector`; `None` when it has neither.
    pub(crate) fn new(
        http_inspector: bool,
        protocol_inspector: bool,
        store: &Store,
    ) -> Option<Self> {
        if !http_inspector && !protocol_inspector {
            return None;
        }
        Some(ProtocolInspector {
            set: ProtocolSet {
                http: true,
                rpc: protocol_inspector,
            },
            http: http_inspector.then(|| InspectorStats::http(store)),
            mesh: protocol_inspector.then(|| InspectorStats::mesh(store)),
        })
    }

    fn each(&self) -> impl Iterator<Item = &InspectorStats> {
        self.http.iter().chain(self.mesh.iter())
    }

    /// Peeks at `stream` until its protocol is known, the bytes are none
    /// of those looked for, or `deadline` passes.
    pub(crate) async fn inspect(&self, stream: &TcpStream, deadline: Option<Instant>) -> Inspected {
        let decide = |b: &[u8]| match detect(b, self.set) {
            Detection::Found(p) => Some(Some(p)),
            Detection::NotFound => Some(None),
            Detection::NeedMore => None,
        };
        match peek_until(stream, deadline, MAX_INSPECT, decide).await {
            Ok(d) => {
                for s in self.each() {
                    s.record(d);
                }
                Inspected::Decided(d)
            }
            Err(PeekError::TimedOut { .. }) => Inspected::TimedOut,
            Err(e) => {
                if matches!(e, PeekError::TooLarge | PeekError::Io(_)) {
                    for s in self.each() {
                        s.read_error.inc();
                    }
                }
                Inspected::Failed(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    async fn inspect(pi: &ProtocolInspector, bytes: &[u8]) -> Inspected {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut c = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (s, _) = l.accept().await.unwrap();
        c.write_all(bytes).await.unwrap();
        let deadline = Instant::now() + Duration::from_millis(300);
        pi.inspect(&s, Some(deadline)).await
    }

    #[tokio::test]
    async fn counts_what_each_inspector_sees() {
        let store = Store::new();
        let both = ProtocolInspector::new(true, true, &store).unwrap();
        let r = inspect(&both, &[0xda, 0xbb, 0xc2, 0x00]).await;
        assert!(
            matches!(r, Inspected::Decided(Some(Protocol::Dubbo))),
            "{r:?}"
        );
        let r = inspect(&both, b"GET / HTTP/1.1\r\n").await;
        assert!(
            matches!(r, Inspected::Decided(Some(Protocol::Http11))),
            "{r:?}"
        );
        let r = inspect(&both, b"GET / HTTP/1.1").await;
        assert!(matches!(r, Inspected::TimedOut), "{r:?}");
        let v = |n: &str| store.value(n, &[]).unwrap();
        assert_eq!(v("mesh_protocol_inspector_dubbo_found"), 1);
        assert_eq!(v("mesh_protocol_inspector_http11_found"), 1);
        // The HTTP inspector did not find HTTP in the Dubbo connection.
        assert_eq!(v("envoy_http_inspector_http_not_found"), 1);
        assert_eq!(v("envoy_http_inspector_http11_found"), 1);

        let http = ProtocolInspector::new(true, false, &store).unwrap();
        let r = inspect(&http, &[0xda, 0xbb, 0xc2, 0x00]).await;
        assert!(matches!(r, Inspected::Decided(None)), "{r:?}");
        assert_eq!(v("envoy_http_inspector_http_not_found"), 2);
        assert!(ProtocolInspector::new(false, false, &store).is_none());
    }
}
