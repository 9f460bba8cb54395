//! `istio.metadata_exchange` over HTTP (Istio's `peer_metadata` filter with
//! `istio_headers`): each side of a request learns which workload is on the
//! other side.
//!
//! - Outbound (`upstream_propagation` / `upstream_discovery`): every request
//!   leaves with `x-envoy-peer-metadata-id` (this proxy's node id) and
//!   `x-envoy-peer-metadata` (base64 of a deterministically serialized
//!   `google.protobuf.Struct` of this workload's metadata); the upstream
//!   sidecar's answer carries its own, which are read and removed before the
//!   response reaches the application.
//! - Inbound (`downstream_discovery` / `downstream_propagation`): the peer's
//!   headers are read and removed from the request before it reaches the
//!   application; the response carries this proxy's, each only if the
//!   request carried the same header (as Istio's filter does).
//!
//! The metadata comes from `node.metadata` as istio-agent writes it (`NAME`,
//! `NAMESPACE`, `WORKLOAD_NAME`, `CLUSTER_ID`, `OWNER`, `LABELS`) and is
//! sent as Istio's `convertWorkloadMetadataToStruct` does: the labels
//! restricted to `app`, `version`, `service.istio.io/canonical-name`,
//! `-revision` and the configured `additional_labels`. A peer header that
//! does not decode is ignored with a debug log (the peer stays unknown); it
//! never fails the request.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
use http::{HeaderMap, HeaderName, HeaderValue};
use mesh_core::config::istio::{PeerDiscovery, PeerMetadata};
use mesh_core::config::Node;
use prost::Message;

/// The header carrying the peer's metadata.
pub static PEER_METADATA: HeaderName = HeaderName::from_static("x-envoy-peer-metadata");
/// The header carrying the peer's node id.
pub static PEER_METADATA_ID: HeaderName = HeaderName::from_static("x-envoy-peer-metadata-id");

const CANONICAL_LABELS: [&str; 4] = [
    "app",
    "version",
    "service.istio.io/canonical-name",
    "service.istio.io/canonical-revision",
];
const OWNER_PREFIX: &str = "kubernetes://apis/apps/v1/namespaces/";
const WORKLOAD_TYPES: [&str; 4] = ["deployment", "pod", "job", "cronjob"];

/// Accepts base64 with or without padding (Istio decodes without).
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A workload's Istio metadata (Istio's `WorkloadMetadataObject`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct PeerInfo {
    /// `NAME`: the pod (instance) name.
    pub name: String,
    /// `NAMESPACE`.
    pub namespace: String,
    /// `WORKLOAD_NAME`.
    pub workload_name: String,
    /// `CLUSTER_ID`.
    pub cluster_id: String,
    /// `OWNER`, when it names a known workload type for `workload_name`.
    pub owner: Option<String>,
    /// `LABELS` kept by Istio (canonical ones and additional labels).
    pub labels: BTreeMap<String, String>,
}

impl PeerInfo {
    /// The metadata in a node's `metadata` (JSON, as in the bootstrap).
    pub fn from_node_json(metadata: &serde_json::Value, additional: &[String]) -> Self {
        let s = |k: &str| {
            metadata
                .get(k)
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_owned()
        };
        let labels = metadata
            .get("LABELS")
            .and_then(|l| l.as_object())
            .map(|l| {
                l.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        PeerInfo::build(
            s("NAME"),
            s("NAMESPACE"),
            s("WORKLOAD_NAME"),
            s("CLUSTER_ID"),
            &s("OWNER"),
            labels,
            additional,
        )
    }

    fn build(
        name: String,
        namespace: String,
        workload_name: String,
        cluster_id: String,
        owner: &str,
        labels: Vec<(String, String)>,
        additional: &[String],
    ) -> Self {
        let labels = labels
            .into_iter()
            .filter(|(k, _)| CANONICAL_LABELS.contains(&k.as_str()) || additional.contains(k))
            .collect();
        // Istio keeps the owner's workload type and writes the owner again
        // from it: `.../namespaces/<ns>/<type>s/<workload>`.
        let owner = owner
            .strip_suffix(workload_name.as_str())
            .and_then(|o| o.strip_suffix("s/"))
            .and_then(|o| o.rsplit('/').next())
            .filter(|t| !workload_name.is_empty() && WORKLOAD_TYPES.contains(t))
            .map(|t| format!("{OWNER_PREFIX}{namespace}/{t}s/{workload_name}"));
        PeerInfo {
            name,
            namespace,
            workload_name,
            cluster_id,
            owner,
            labels,
        }
    }

    /// Decodes a peer's `x-envoy-peer-metadata` value.
    pub fn from_header(value: &[u8], additional: &[String]) -> Result<Self, String> {
        let bytes = LENIENT
            .decode(value)
            .map_err(|e| format!("not base64: {e}"))?;
        let s = Struct::decode(bytes.as_slice()).map_err(|e| format!("not a Struct: {e}"))?;
        Ok(PeerInfo::from_struct(&s, additional))
    }

    /// The workload in a peer's metadata `Struct`.
    pub fn from_struct(s: &Struct, additional: &[String]) -> Self {
        let text = |k: &str| match s.fields.get(k).and_then(|v| v.kind.as_ref()) {
            Some(Kind::StringValue(v)) => v.clone(),
            _ => String::new(),
        };
        let labels = match s.fields.get("LABELS").and_then(|v| v.kind.as_ref()) {
            Some(Kind::StructValue(l)) => l
                .fields
                .iter()
                .filter_map(|(k, v)| match &v.kind {
                    Some(Kind::StringValue(v)) => Some((k.clone(), v.clone())),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        PeerInfo::build(
            text("NAME"),
            text("NAMESPACE"),
            text("WORKLOAD_NAME"),
            text("CLUSTER_ID"),
            &text("OWNER"),
            labels,
            additional,
        )
    }

    /// The `Struct` Istio sends (`convertWorkloadMetadataToStruct`).
    pub fn to_struct(&self) -> Struct {
        let string = |v: &str| Value {
            kind: Some(Kind::StringValue(v.to_owned())),
        };
        let mut fields = BTreeMap::new();
        for (k, v) in [
            ("NAME", &self.name),
            ("NAMESPACE", &self.namespace),
            ("WORKLOAD_NAME", &self.workload_name),
            ("CLUSTER_ID", &self.cluster_id),
        ] {
            if !v.is_empty() {
                fields.insert(k.to_owned(), string(v));
            }
        }
        let labels = self
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), string(v)))
            .collect();
        fields.insert(
            "LABELS".to_owned(),
            Value {
                kind: Some(Kind::StructValue(Struct { fields: labels })),
            },
        );
        if let Some(o) = &self.owner {
            fields.insert("OWNER".to_owned(), string(o));
        }
        Struct {
            fields: fields.into_iter().collect(),
        }
    }

    /// The `x-envoy-peer-metadata` value for this metadata.
    pub fn header_value(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.to_struct().encode_to_vec())
    }

    /// A label's value.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).map(String::as_str)
    }
}

/// This proxy's node (id and metadata), set once when the proxy starts:
/// the metadata exchange sends it.
static LOCAL_NODE: OnceLock<(String, serde_json::Value)> = OnceLock::new();

/// Records this proxy's node for the metadata exchange (the first call
/// wins: one node per process).
pub fn set_local_node(node: &Node) {
    let metadata = serde_json::from_str(&node.metadata_json).unwrap_or(serde_json::Value::Null);
    let _ = LOCAL_NODE.set((node.id.clone(), metadata));
}

/// This proxy's node id and metadata (empty before [`set_local_node`]).
pub(crate) fn local_node_json() -> (&'static str, &'static serde_json::Value) {
    static NONE: serde_json::Value = serde_json::Value::Null;
    match LOCAL_NODE.get() {
        Some((id, m)) => (id, m),
        None => ("", &NONE),
    }
}

/// This proxy's own workload metadata (from the node).
pub fn local_peer() -> PeerInfo {
    PeerInfo::from_node_json(local_node_json().1, &[])
}

/// One HCM's compiled `istio.metadata_exchange`.
#[derive(Debug)]
pub struct PeerExchange {
    downstream_headers: bool,
    upstream_headers: bool,
    propagate_downstream: bool,
    propagate_upstream: bool,
    additional_labels: Vec<String>,
    id: HeaderValue,
    value: HeaderValue,
}

/// What one request's exchange learned.
#[derive(Debug, Clone, Default)]
pub struct Exchange {
    /// The downstream workload (inbound), from the request's headers.
    pub downstream_peer: Option<Arc<PeerInfo>>,
    /// The upstream workload (outbound), from the response's headers.
    pub upstream_peer: Option<Arc<PeerInfo>>,
    request_had_id: bool,
    request_had_value: bool,
}

impl PeerExchange {
    /// Compiles the filter's configuration with this proxy's node.
    pub fn new(config: &PeerMetadata) -> Result<Self, String> {
        let (id, metadata) = local_node_json();
        let local = PeerInfo::from_node_json(metadata, &config.additional_labels);
        let headers = |d: &[PeerDiscovery]| d.contains(&PeerDiscovery::IstioHeaders);
        Ok(PeerExchange {
            downstream_headers: headers(&config.downstream_discovery),
            upstream_headers: headers(&config.upstream_discovery),
            propagate_downstream: config.downstream_propagation.is_some(),
            propagate_upstream: config.upstream_propagation.is_some(),
            additional_labels: config.additional_labels.clone(),
            id: HeaderValue::from_str(id).map_err(|_| "node.id is not a valid header value")?,
            value: HeaderValue::from_str(&local.header_value())
                .map_err(|_| "node metadata does not make a header value")?,
        })
    }

    fn discover(&self, headers: &mut HeaderMap) -> Option<Arc<PeerInfo>> {
        headers.remove(&PEER_METADATA_ID);
        let value = headers.remove(&PEER_METADATA)?;
        match PeerInfo::from_header(value.as_bytes(), &self.additional_labels) {
            Ok(p) => Some(Arc::new(p)),
            Err(e) => {
                tracing::debug!(error = %e, "ignoring a malformed x-envoy-peer-metadata header");
                None
            }
        }
    }

    /// Reads (and removes) the downstream peer's headers; adds this proxy's
    /// for the upstream.
    pub fn on_request(&self, headers: &mut HeaderMap) -> Exchange {
        let mut ex = Exchange {
            request_had_id: headers.contains_key(&PEER_METADATA_ID),
            request_had_value: headers.contains_key(&PEER_METADATA),
            ..Exchange::default()
        };
        if self.downstream_headers {
            ex.downstream_peer = self.discover(headers);
        }
        if self.propagate_upstream {
            headers.insert(PEER_METADATA_ID.clone(), self.id.clone());
            headers.insert(PEER_METADATA.clone(), self.value.clone());
        }
        ex
    }

    /// Reads (and removes) the upstream peer's headers from the response;
    /// adds this proxy's for the downstream peer that sent its own.
    pub fn on_response(&self, ex: &mut Exchange, headers: &mut HeaderMap) {
        if self.upstream_headers {
            ex.upstream_peer = self.discover(headers);
        }
        if self.propagate_downstream {
            if ex.request_had_id {
                headers.insert(PEER_METADATA_ID.clone(), self.id.clone());
            }
            if ex.request_had_value {
                headers.insert(PEER_METADATA.clone(), self.value.clone());
            }
        }
    }
}

/// The compiled `istio.metadata_exchange` of an HCM's filters, if any.
pub fn from_filters(
    filters: &[mesh_core::config::HttpFilter],
) -> Result<Option<PeerExchange>, String> {
    filters
        .iter()
        .find_map(|f| match f {
            mesh_core::config::HttpFilter::IstioPeerMetadata(c) => Some(PeerExchange::new(c)),
            _ => None,
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node() -> serde_json::Value {
        json!({
            "NAME": "reviews-v1-5f8d7b9c4-abcde",
            "NAMESPACE": "default",
            "WORKLOAD_NAME": "reviews-v1",
            "CLUSTER_ID": "Kubernetes",
            "OWNER": "kubernetes://apis/apps/v1/namespaces/default/deployments/reviews-v1",
            "LABELS": {"app": "reviews", "version": "v1", "pod-template-hash": "5f8d7b9c4",
                "service.istio.io/canonical-name": "reviews", "role": "backend"},
            "ISTIO_VERSION": "1.28.0"
        })
    }

    /// The header carries what Istio sends and decodes back to the same
    /// workload; labels outside Istio's set are dropped unless asked for.
    #[test]
    fn header_round_trip() {
        let local = PeerInfo::from_node_json(&node(), &[]);
        assert_eq!(local.label("app"), Some("reviews"));
        assert_eq!(local.label("pod-template-hash"), None);
        assert_eq!(
            local.owner.as_deref(),
            Some("kubernetes://apis/apps/v1/namespaces/default/deployments/reviews-v1")
        );
        let back = PeerInfo::from_header(local.header_value().as_bytes(), &[]).unwrap();
        assert_eq!(back, local);
        let with_role = PeerInfo::from_node_json(&node(), &["role".to_owned()]);
        assert_eq!(with_role.label("role"), Some("backend"));
        // Without padding too, as Istio decodes.
        let v = local.header_value();
        let unpadded = v.trim_end_matches('=');
        assert_eq!(
            PeerInfo::from_header(unpadded.as_bytes(), &[]).unwrap(),
            local
        );
    }

    /// Garbage is an error for the caller to log, never a panic.
    #[test]
    fn malformed_headers_are_errors() {
        for bad in [&b"%%%"[..], b"AAAA", b"////", b""] {
            let _ = PeerInfo::from_header(bad, &[]);
        }
        assert!(PeerInfo::from_header(b"!!not base64", &[]).is_err());
        assert!(PeerInfo::from_header(b"/w==", &[]).is_err());
    }
}
