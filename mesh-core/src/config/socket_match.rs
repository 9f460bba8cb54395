//! Per-endpoint transport sockets: Envoy's cluster
//! `transport_socket_matches`.
//!
//! A cluster can talk TLS to some endpoints and plain text to others. This
//! is how Istio's auto-mTLS works: every outbound cluster carries a
//! `tlsMode-istio` match (mTLS with the workload certificate) and a
//! catch-all `tlsMode-disabled` match (plain text), and the control plane
//! labels each endpoint that runs a sidecar with
//! `metadata.filter_metadata["envoy.transport_socket_match"].tlsMode: istio`.
//!
//! Resolution follows Envoy's `TransportSocketMatcherImpl`: the first match
//! whose every key is present with an equal value in the endpoint's
//! `envoy.transport_socket_match` metadata wins; when none does, the same
//! search runs over the endpoint's locality metadata; when that finds none
//! either, the cluster's own `transport_socket` is used. An empty `match`
//! matches every endpoint.

use super::tls::UpstreamTlsContext;
use super::{Cluster, LbMetadata};

/// The metadata namespace endpoints are matched on.
pub const TRANSPORT_SOCKET_MATCH_NAMESPACE: &str = "envoy.transport_socket_match";

/// One entry of a cluster's `transport_socket_matches`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportSocketMatch {
    /// `name`: shown in stats (`transport_socket_match` label).
    pub name: String,
    /// `match`: every key must be in the endpoint's
    /// `envoy.transport_socket_match` metadata with an equal value.
    pub labels: LbMetadata,
    /// `transport_socket`: TLS (`envoy.transport_sockets.tls`) or plain
    /// text (`envoy.transport_sockets.raw_buffer`, `None`).
    pub tls: Option<UpstreamTlsContext>,
}

impl TransportSocketMatch {
    /// Whether an endpoint (or locality) with this
    /// `envoy.transport_socket_match` metadata matches.
    pub fn matches(&self, metadata: &LbMetadata) -> bool {
        self.labels
            .iter()
            .all(|(k, v)| metadata.get(k).is_some_and(|m| m == v))
    }
}

/// Which of `matches` an endpoint uses, given its own and its locality's
/// `envoy.transport_socket_match` metadata: the index of the winning match,
/// or `None` for the cluster's `transport_socket`.
pub fn resolve_transport_socket(
    matches: &[TransportSocketMatch],
    endpoint: &LbMetadata,
    locality: &LbMetadata,
) -> Option<u32> {
    let first = |md: &LbMetadata| matches.iter().position(|m| m.matches(md));
    first(endpoint)
        .or_else(|| first(locality))
        .and_then(|i| u32::try_from(i).ok())
}

impl Cluster {
    /// Every upstream TLS context of the cluster: its `transport_socket`
    /// and those of its `transport_socket_matches`, so that SDS secrets,
    /// certificate files and warming cover them all.
    pub fn tls_contexts(&self) -> impl Iterator<Item = &UpstreamTlsContext> {
        self.tls.iter().chain(
            self.transport_socket_matches
                .iter()
                .filter_map(|m| m.tls.as_ref()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MetadataValue;

    fn md(pairs: &[(&str, &str)]) -> LbMetadata {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), MetadataValue::from(*v)))
            .collect()
    }

    fn m(name: &str, labels: &[(&str, &str)]) -> TransportSocketMatch {
        TransportSocketMatch {
            name: name.into(),
            labels: md(labels),
            tls: None,
        }
    }

    #[test]
    fn first_matching_entry_wins_and_empty_match_catches_all() {
        let ms = [m("istio", &[("tlsMode", "istio")]), m("disabled", &[])];
        let none = LbMetadata::new();
        assert_eq!(
            resolve_transport_socket(&ms, &md(&[("tlsMode", "istio")]), &none),
            Some(0)
        );
        assert_eq!(resolve_transport_socket(&ms, &none, &none), Some(1));
        assert_eq!(
            resolve_transport_socket(&ms, &md(&[("tlsMode", "disabled")]), &none),
            Some(1)
        );
    }

    #[test]
    fn every_key_must_match_then_locality_then_default() {
        let ms = [m("both", &[("a", "1"), ("b", "2")])];
        let none = LbMetadata::new();
        assert_eq!(
            resolve_transport_socket(&ms, &md(&[("a", "1")]), &none),
            None
        );
        assert_eq!(
            resolve_transport_socket(&ms, &md(&[("a", "1"), ("b", "2"), ("c", "3")]), &none),
            Some(0)
        );
        assert_eq!(
            resolve_transport_socket(&ms, &md(&[("a", "1")]), &md(&[("a", "1"), ("b", "2")])),
            Some(0)
        );
        assert_eq!(resolve_transport_socket(&[], &none, &none), None);
    }
}
