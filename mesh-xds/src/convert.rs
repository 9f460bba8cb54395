//! Protobuf <-> proto3 JSON for xDS resources.
//!
//! mesh reads Envoy configuration through one loader that walks proto3 JSON
//! (the YAML/JSON bootstrap form) and names every field it refuses. To give
//! resources received over xDS exactly the same treatment, a received
//! resource is decoded with the Envoy descriptors (`proto/envoy.pb`, compiled
//! by `scripts/gen-xds-descriptors` from the `.proto` files of the
//! `envoy-types` crate, so they match its generated types) and written out
//! as proto3 JSON with the original field names (`connect_timeout`, not
//! `connectTimeout`). Fields left at their proto3 default are omitted, as a
//! hand-written YAML file would omit them; `google.protobuf.Any` values
//! become objects with an `@type` key; durations become `"5s"` strings.
//!
//! The reverse direction ([`json_to_any`]) lets a control plane written in
//! Rust keep its resources as YAML or JSON files (the example control plane
//! and the tests do).

use std::sync::OnceLock;

use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage, SerializeOptions};
use serde_json::Value;

static DESCRIPTORS: &[u8] = include_bytes!("../proto/envoy.pb");

/// Istio's own extensions istiod puts in sidecar LDS/CDS (`istio.alpn`,
/// `istio.stats`, `istio.metadata_exchange`), compiled by
/// `scripts/gen-istio-descriptors` from `proto/istio/`: with them Istio's
/// typed configs decode (and their unknown fields are refused) like Envoy's.
static ISTIO_DESCRIPTORS: &[u8] = include_bytes!("../proto/istio.pb");

/// Why a resource could not be converted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// The type URL names no message known to the Envoy v3 API.
    #[error("unknown resource type {0:?}")]
    UnknownType(String),
    /// The bytes are not a valid encoding of the message.
    #[error("malformed {type_name}: {reason}")]
    Malformed {
        /// The message type.
        type_name: String,
        /// What the decoder said.
        reason: String,
    },
    /// The JSON does not describe the message (for [`json_to_any`]).
    #[error("{type_name}: {reason}")]
    Json {
        /// The message type.
        type_name: String,
        /// What the parser said.
        reason: String,
    },
}

/// The descriptor pool of the whole Envoy v3 API and Istio's extensions,
/// decoded on first use (a process that never speaks xDS never pays for it).
pub fn descriptors() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| match DescriptorPool::decode(DESCRIPTORS) {
        Ok(mut p) => {
            if let Err(e) = p.decode_file_descriptor_set(ISTIO_DESCRIPTORS) {
                // Part of the build, as the Envoy set.
                tracing::error!(error = %e, "the embedded Istio descriptors do not decode");
            }
            p
        }
        Err(e) => {
            // The file is part of the build; failing here is a build defect.
            tracing::error!(error = %e, "the embedded Envoy descriptors do not decode");
            DescriptorPool::new()
        }
    })
}

/// The full message name in a type URL
/// (`type.googleapis.com/envoy.config.cluster.v3.Cluster` ->
/// `envoy.config.cluster.v3.Cluster`).
pub fn type_name(type_url: &str) -> &str {
    type_url.rsplit('/').next().unwrap_or(type_url)
}

/// Decodes `bytes` as the message named by `type_url` and returns its proto3
/// JSON form with the `.proto` field names.
pub fn to_json(type_url: &str, bytes: &[u8]) -> Result<Value, ConvertError> {
    let name = type_name(type_url);
    let desc = descriptors()
        .get_message_by_name(name)
        .ok_or_else(|| ConvertError::UnknownType(type_url.to_string()))?;
    let msg = DynamicMessage::decode(desc, bytes).map_err(|e| ConvertError::Malformed {
        type_name: name.to_string(),
        reason: e.to_string(),
    })?;
    let options = SerializeOptions::new()
        .use_proto_field_name(true)
        .skip_default_fields(true);
    msg.serialize_with_options(serde_json::value::Serializer, &options)
        .map_err(|e| ConvertError::Malformed {
            type_name: name.to_string(),
            reason: e.to_string(),
        })
}

/// [`to_json`] for an `Any`.
pub fn any_to_json(any: &Any) -> Result<Value, ConvertError> {
    to_json(&any.type_url, &any.value)
}

/// Encodes the proto3 JSON (or YAML-derived) `value` as the message named by
/// `type_url`, in an `Any`. Unknown fields are errors.
pub fn json_to_any(type_url: &str, value: &Value) -> Result<Any, ConvertError> {
    let name = type_name(type_url);
    let desc = descriptors()
        .get_message_by_name(name)
        .ok_or_else(|| ConvertError::UnknownType(type_url.to_string()))?;
    let json = |e: &dyn std::fmt::Display| ConvertError::Json {
        type_name: name.to_string(),
        reason: e.to_string(),
    };
    let text = serde_json::to_string(value).map_err(|e| json(&e))?;
    let mut de = serde_json::Deserializer::from_str(&text);
    let msg = DynamicMessage::deserialize_with_options(desc, &mut de, &DeserializeOptions::new())
        .map_err(|e| json(&e))?;
    de.end().map_err(|e| json(&e))?;
    Ok(Any {
        type_url: format!("type.googleapis.com/{name}"),
        value: msg.encode_to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::CLUSTER;
    use serde_json::json;

    #[test]
    fn round_trip_keeps_field_names_and_any() {
        let cluster = json!({
            "name": "web",
            "type": "EDS",
            "connect_timeout": "0.250s",
            "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"}},
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}}
                }
            }
        });
        let any = json_to_any(CLUSTER, &cluster).unwrap();
        let back = any_to_json(&any).unwrap();
        assert_eq!(back, cluster);
    }

    /// Istio's extensions decode as they arrive from istiod: `istio.alpn`
    /// and `istio.stats` as their own Any, the metadata exchange inside a
    /// `TypedStruct`; an unknown field of theirs is still refused.
    #[test]
    fn istio_extensions_round_trip() {
        let alpn = json!({
            "@type": "type.googleapis.com/istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig",
            "alpn_override": [
                {"alpn_override": ["istio-http/1.0", "istio", "http/1.0"]},
                {"upstream_protocol": "HTTP11", "alpn_override": ["istio-http/1.1", "istio", "http/1.1"]},
                {"upstream_protocol": "HTTP2", "alpn_override": ["istio-h2", "istio", "h2"]}
            ]
        });
        let stats = json!({
            "@type": "type.googleapis.com/stats.PluginConfig",
            "disable_host_header_fallback": true,
            "tcp_reporting_duration": "15s",
            "metrics": [{"name": "requests_total", "dimensions": {"x": "y"}, "tags_to_remove": ["a"]}]
        });
        let mx = json!({
            "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
            "type_url": "type.googleapis.com/io.istio.http.peer_metadata.Config",
            "value": {"upstream_discovery": [{"istio_headers": {}}, {"workload_discovery": {}}]}
        });
        let tcp_mx = json!({
            "@type": "type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange",
            "protocol": "istio-peer-exchange",
            "enable_discovery": true
        });
        for v in [alpn, stats, mx, tcp_mx] {
            let ty = v["@type"].as_str().unwrap().to_string();
            let mut body = v.clone();
            body.as_object_mut().unwrap().remove("@type");
            let any = json_to_any(&ty, &body).unwrap();
            assert_eq!(any_to_json(&any).unwrap(), body, "{ty}");
        }
        // The stats config Istio's inbound chains carry: `MAE=` is
        // `disable_host_header_fallback: true`.
        assert_eq!(
            to_json("type.googleapis.com/stats.PluginConfig", &[0x30, 0x01]).unwrap(),
            json!({"disable_host_header_fallback": true})
        );
        let err = json_to_any(
            "type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange",
            &json!({"protocol": "istio-peer-exchange", "no_such_field": 1}),
        )
        .unwrap_err();
        assert!(err.to_string().contains("no_such_field"), "{err}");
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        let err = to_json(CLUSTER, &[0xff, 0xff, 0xff]).unwrap_err();
        assert!(matches!(err, ConvertError::Malformed { .. }), "{err}");
        let err = to_json("type.googleapis.com/no.such.Type", b"").unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown resource type \"type.googleapis.com/no.such.Type\""
        );
    }
}
