//! Header mutation: `request_headers_to_add/remove` and
//! `response_headers_to_add/remove`, compiled once per configuration version.
//!
//! Names and values are parsed into `http` types when the configuration is
//! built, so applying a mutation on the request path allocates only for
//! values with substitutions (`%DOWNSTREAM_REMOTE_ADDRESS%` and friends,
//! the subset of Envoy's header formatters listed on [`Substitution`]).

use std::fmt::Write as _;
use std::net::SocketAddr;

use http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::config::{AppendAction, HeaderMutations, HeaderValueOption};

/// What a substituted header value may refer to: the stream's addresses and
/// protocol.
#[derive(Debug, Clone, Copy)]
pub struct StreamInfo {
    /// The downstream peer.
    pub downstream_remote: SocketAddr,
    /// The local address the downstream connection arrived on.
    pub downstream_local: SocketAddr,
    /// The downstream HTTP version.
    pub protocol: http::Version,
    /// The downstream connection's id (`%CONNECTION_ID%`).
    pub connection_id: u64,
}

/// One piece of a header value template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Substitution {
    /// Literal text.
    Literal(String),
    /// `%DOWNSTREAM_REMOTE_ADDRESS%`: `ip:port` of the peer.
    DownstreamRemoteAddress,
    /// `%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%`.
    DownstreamRemoteAddressWithoutPort,
    /// `%DOWNSTREAM_LOCAL_ADDRESS%`.
    DownstreamLocalAddress,
    /// `%DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT%`.
    DownstreamLocalAddressWithoutPort,
    /// `%DOWNSTREAM_LOCAL_PORT%`.
    DownstreamLocalPort,
    /// `%PROTOCOL%`: `HTTP/1.1`, `HTTP/2`.
    Protocol,
}

/// Splits an Envoy header value into literal text and substitutions.
/// `%%` is a literal `%`. An unknown `%NAME%` is an error naming it.
pub fn parse_template(value: &str) -> Result<Vec<Substitution>, String> {
    let mut parts = Vec::new();
    let mut lit = String::new();
    let mut rest = value;
    while let Some(i) = rest.find('%') {
        lit.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(r) = rest.strip_prefix('%') {
            lit.push('%');
            rest = r;
            continue;
        }
        let end = rest.find('%').ok_or_else(|| {
            format!("unterminated %-substitution in {value:?} (write %% for a literal %)")
        })?;
        let name = &rest[..end];
        rest = &rest[end + 1..];
        let sub = match name {
            "DOWNSTREAM_REMOTE_ADDRESS" => Substitution::DownstreamRemoteAddress,
            "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => {
                Substitution::DownstreamRemoteAddressWithoutPort
            }
            "DOWNSTREAM_LOCAL_ADDRESS" => Substitution::DownstreamLocalAddress,
            "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT" => {
                Substitution::DownstreamLocalAddressWithoutPort
            }
            "DOWNSTREAM_LOCAL_PORT" => Substitution::DownstreamLocalPort,
            "PROTOCOL" => Substitution::Protocol,
            other => return Err(format!("unsupported header substitution %{other}%")),
        };
        if !lit.is_empty() {
            parts.push(Substitution::Literal(std::mem::take(&mut lit)));
        }
        parts.push(sub);
    }
    lit.push_str(rest);
    if !lit.is_empty() || parts.is_empty() {
        parts.push(Substitution::Literal(lit));
    }
    Ok(parts)
}

fn protocol_str(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

#[derive(Debug, Clone)]
enum Value {
    Static(HeaderValue),
    Template(Vec<Substitution>),
}

impl Value {
    fn render(&self, info: &StreamInfo) -> Option<HeaderValue> {
        match self {
            Value::Static(v) => Some(v.clone()),
            Value::Template(parts) => {
                let mut s = String::new();
                for p in parts {
                    // Writing to a String cannot fail.
                    let _ = match p {
                        Substitution::Literal(l) => s.write_str(l),
                        Substitution::DownstreamRemoteAddress => {
                            write!(s, "{}", info.downstream_remote)
                        }
                        Substitution::DownstreamRemoteAddressWithoutPort => {
                            write!(s, "{}", info.downstream_remote.ip())
                        }
                        Substitution::DownstreamLocalAddress => {
                            write!(s, "{}", info.downstream_local)
                        }
                        Substitution::DownstreamLocalAddressWithoutPort => {
                            write!(s, "{}", info.downstream_local.ip())
                        }
                        Substitution::DownstreamLocalPort => {
                            write!(s, "{}", info.downstream_local.port())
                        }
                        Substitution::Protocol => s.write_str(protocol_str(info.protocol)),
                    };
                }
                HeaderValue::from_str(&s).ok()
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Add {
    name: HeaderName,
    value: Value,
    action: AppendAction,
    keep_empty: bool,
}

/// One direction's compiled mutations (what to remove, then what to add).
#[derive(Debug, Clone, Default)]
pub struct HeaderOps {
    remove: Vec<HeaderName>,
    add: Vec<Add>,
}

impl HeaderOps {
    fn compile(
        add: &[HeaderValueOption],
        remove: &[String],
        add_field: &str,
        remove_field: &str,
    ) -> Result<Self, String> {
        let mut ops = HeaderOps::default();
        for (i, r) in remove.iter().enumerate() {
            ops.remove.push(
                HeaderName::from_bytes(r.as_bytes())
                    .map_err(|_| format!("{remove_field}[{i}]: invalid header name {r:?}"))?,
            );
        }
        for (i, a) in add.iter().enumerate() {
            let name = HeaderName::from_bytes(a.key.as_bytes()).map_err(|_| {
                format!(
                    "{add_field}[{i}].header.key: invalid header name {:?}",
                    a.key
                )
            })?;
            let parts = parse_template(&a.value)
                .map_err(|e| format!("{add_field}[{i}].header.value: {e}"))?;
            let value = match parts.as_slice() {
                [Substitution::Literal(l)] => {
                    Value::Static(HeaderValue::from_str(l).map_err(|_| {
                        format!(
                            "{add_field}[{i}].header.value: invalid header value {:?}",
                            a.value
                        )
                    })?)
                }
                _ => Value::Template(parts),
            };
            ops.add.push(Add {
                name,
                value,
                action: a.append_action,
                keep_empty: a.keep_empty_value,
            });
        }
        Ok(ops)
    }

    /// True when there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.add.is_empty()
    }

    /// Applies the removals, then the additions, to `headers`.
    pub fn apply(&self, headers: &mut HeaderMap, info: &StreamInfo) {
        for name in &self.remove {
            headers.remove(name);
        }
        for add in &self.add {
            let Some(value) = add.value.render(info) else {
                continue;
            };
            if value.is_empty() && !add.keep_empty {
                continue;
            }
            match add.action {
                AppendAction::AppendIfExistsOrAdd => {
                    headers.append(add.name.clone(), value);
                }
                AppendAction::AddIfAbsent => {
                    if !headers.contains_key(&add.name) {
                        headers.insert(add.name.clone(), value);
                    }
                }
                AppendAction::OverwriteIfExistsOrAdd => {
                    headers.insert(add.name.clone(), value);
                }
                AppendAction::OverwriteIfExists => {
                    if headers.contains_key(&add.name) {
                        headers.insert(add.name.clone(), value);
                    }
                }
            }
        }
    }
}

/// Compiled [`HeaderMutations`] of one configuration level.
#[derive(Debug, Clone, Default)]
pub struct CompiledMutations {
    /// Applied to the request sent upstream.
    pub request: HeaderOps,
    /// Applied to the response sent downstream.
    pub response: HeaderOps,
}

impl CompiledMutations {
    /// Compiles one level; errors start with the field path relative to the
    /// level (`request_headers_to_add[0].header.value: ...`).
    pub fn compile(m: &HeaderMutations) -> Result<Self, String> {
        Ok(CompiledMutations {
            request: HeaderOps::compile(
                &m.request_add,
                &m.request_remove,
                "request_headers_to_add",
                "request_headers_to_remove",
            )?,
            response: HeaderOps::compile(
                &m.response_add,
                &m.response_remove,
                "response_headers_to_add",
                "response_headers_to_remove",
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> StreamInfo {
        StreamInfo {
            downstream_remote: "10.0.0.1:5555".parse().unwrap(),
            downstream_local: "127.0.0.1:80".parse().unwrap(),
            protocol: http::Version::HTTP_11,
            connection_id: 1,
        }
    }

    fn opt(key: &str, value: &str, action: AppendAction) -> HeaderValueOption {
        HeaderValueOption {
            key: key.into(),
            value: value.into(),
            append_action: action,
            keep_empty_value: false,
        }
    }

    #[test]
    fn append_actions_follow_envoy() {
        let m = HeaderMutations {
            request_add: vec![
                opt("x-a", "1", AppendAction::AppendIfExistsOrAdd),
                opt("x-b", "2", AppendAction::AddIfAbsent),
                opt("x-c", "3", AppendAction::OverwriteIfExistsOrAdd),
                opt("x-d", "4", AppendAction::OverwriteIfExists),
                opt("x-e", "5", AppendAction::OverwriteIfExists),
            ],
            request_remove: vec!["x-gone".into()],
            ..Default::default()
        };
        let c = CompiledMutations::compile(&m).unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("0"));
        h.insert("x-b", HeaderValue::from_static("0"));
        h.insert("x-c", HeaderValue::from_static("0"));
        h.insert("x-gone", HeaderValue::from_static("0"));
        h.insert("x-d", HeaderValue::from_static("0"));
        c.request.apply(&mut h, &info());
        assert_eq!(h.get_all("x-a").iter().count(), 2);
        assert_eq!(h["x-b"], "0");
        assert_eq!(h["x-c"], "3");
        assert_eq!(h["x-d"], "4");
        assert!(!h.contains_key("x-e"));
        assert!(!h.contains_key("x-gone"));
    }

    #[test]
    fn substitutions_render() {
        let parts = parse_template("ip=%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% 100%%").unwrap();
        let m = HeaderMutations {
            request_add: vec![opt(
                "x-ip",
                "ip=%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% 100%%",
                AppendAction::OverwriteIfExistsOrAdd,
            )],
            ..Default::default()
        };
        assert_eq!(parts.len(), 3);
        let c = CompiledMutations::compile(&m).unwrap();
        let mut h = HeaderMap::new();
        c.request.apply(&mut h, &info());
        assert_eq!(h["x-ip"], "ip=10.0.0.1 100%");
        assert!(parse_template("%NOPE%").is_err());
        assert!(parse_template("50%").is_err());
    }
}
