//! Rendering compiled access-log formats into one line.
//!
//! A format is compiled once (header operators resolved to capture slots);
//! a line is written straight into one `String`: each operator yields a
//! [`Val`] borrowing from the record, written as text, typed JSON or `-`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use mesh_core::access_log::{
    GrpcStatusFormat, HeaderRef, JsonNode, LogFormat, LogFormatKind, Operator, Piece, TimeFormat,
    TimePiece,
};

use super::LogRecord;

/// Envoy's default format (a format string).
pub const DEFAULT_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\"\n";

/// Where a request-header operator reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReqSlot {
    /// `:method`.
    Method,
    /// `:path` (with query).
    Path,
    /// `:authority` (or `Host`).
    Authority,
    /// `:scheme`.
    Scheme,
    /// A pseudo-header mesh does not keep: always absent.
    Absent,
    /// The i-th captured request header.
    Captured(usize),
}

/// A header operator resolved to capture slots.
#[derive(Debug, Clone, Copy)]
pub struct Slots<S> {
    main: S,
    alt: Option<S>,
    max_len: Option<usize>,
}

/// A compiled operator.
#[derive(Debug, Clone)]
pub enum Op {
    /// `%REQ(...)%`.
    Req(Slots<ReqSlot>),
    /// `%RESP(...)%`: indexes into the captured response headers.
    Resp(Slots<usize>),
    /// `%TRAILER(...)%`: indexes into the captured response trailers.
    Trailer(Slots<usize>),
    /// `%GRPC_STATUS%`, with the request's captured `content-type` slot.
    Grpc(GrpcStatusFormat, usize),
    /// Any other operator.
    Other(Operator),
}

/// Literal text or a compiled operator.
#[derive(Debug, Clone)]
pub enum Part {
    /// Text.
    Lit(String),
    /// An operator.
    Op(Op),
}

#[derive(Debug, Clone)]
enum Node {
    Object(Vec<(String, Node)>),
    Template(Vec<Part>),
    Literal(String),
}

/// A compiled `log_format`.
#[derive(Debug, Clone)]
pub struct Compiled {
    kind: Kind,
    omit_empty: bool,
}

#[derive(Debug, Clone)]
enum Kind {
    Text(Vec<Part>),
    Json(Vec<(String, Node)>),
}

/// The header names formats and filters read, gathered while compiling.
#[derive(Debug, Default)]
pub struct Needs {
    /// Request headers to capture (lower case).
    pub req: Vec<http::HeaderName>,
    /// Response headers to capture.
    pub resp: Vec<http::HeaderName>,
    /// Response trailers to capture.
    pub trailers: Vec<http::HeaderName>,
    /// Whether `%ROUTE_NAME%` is used.
    pub route_name: bool,
    /// Whether `%REQUEST_DURATION%` is used.
    pub request_duration: bool,
    /// Whether `%BYTES_RECEIVED%` is used.
    pub bytes_received: bool,
    /// Whether the upstream connection's local address is used.
    pub upstream_local: bool,
}

fn slot_of(list: &mut Vec<http::HeaderName>, name: &str) -> Result<usize, String> {
    let h = http::HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("{name:?} is not a header name"))?;
    Ok(match list.iter().position(|x| *x == h) {
        Some(i) => i,
        None => {
            list.push(h);
            list.len() - 1
        }
    })
}

impl Needs {
    /// Captures `grpc-status` from response headers and trailers (for
    /// `grpc_status_filter`).
    pub fn grpc_status(&mut self) {
        let _ = slot_of(&mut self.resp, "grpc-status");
        let _ = slot_of(&mut self.trailers, "grpc-status");
    }

    /// Where `grpc-status` is among the captured response headers.
    pub fn grpc_status_slot(&self) -> Option<usize> {
        self.resp.iter().position(|h| h == "grpc-status")
    }

    /// Where `grpc-status` is among the captured response trailers.
    pub fn grpc_trailer_slot(&self) -> Option<usize> {
        self.trailers.iter().position(|h| h == "grpc-status")
    }

    fn req_slot(&mut self, name: &str) -> Result<ReqSlot, String> {
        Ok(match name {
            ":method" => ReqSlot::Method,
            ":path" => ReqSlot::Path,
            ":authority" | "host" => ReqSlot::Authority,
            ":scheme" => ReqSlot::Scheme,
            n if n.starts_with(':') => ReqSlot::Absent,
            n => ReqSlot::Captured(slot_of(&mut self.req, n)?),
        })
    }

    fn compile_op(&mut self, op: &Operator) -> Result<Op, String> {
        let other =
            |list: &mut Vec<http::HeaderName>, h: &HeaderRef| -> Result<Slots<usize>, String> {
                // Response pseudo-headers: `:status` is the status code.
                Ok(Slots {
                    main: slot_of(list, h.name.trim_start_matches(':'))?,
                    alt: h
                        .alt
                        .as_deref()
                        .map(|a| slot_of(list, a.trim_start_matches(':')))
                        .transpose()?,
                    max_len: h.max_len,
                })
            };
        Ok(match op {
            Operator::Req(h) => Op::Req(Slots {
                main: self.req_slot(&h.name)?,
                alt: h.alt.as_deref().map(|a| self.req_slot(a)).transpose()?,
                max_len: h.max_len,
            }),
            Operator::Resp(h) => Op::Resp(other(&mut self.resp, h)?),
            Operator::Trailer(h) => Op::Trailer(other(&mut self.trailers, h)?),
            Operator::RouteName => {
                self.route_name = true;
                Op::Other(op.clone())
            }
            Operator::RequestDuration => {
                self.request_duration = true;
                Op::Other(op.clone())
            }
            Operator::BytesReceived => {
                self.bytes_received = true;
                Op::Other(op.clone())
            }
            Operator::UpstreamLocalAddress
            | Operator::UpstreamLocalAddressWithoutPort
            | Operator::UpstreamLocalPort => {
                self.upstream_local = true;
                Op::Other(op.clone())
            }
            Operator::GrpcStatus(f) => {
                self.grpc_status();
                Op::Grpc(*f, slot_of(&mut self.req, "content-type")?)
            }
            _ => Op::Other(op.clone()),
        })
    }

    fn compile_parts(&mut self, pieces: &[Piece]) -> Result<Vec<Part>, String> {
        pieces
            .iter()
            .map(|p| {
                Ok(match p {
                    Piece::Lit(s) => Part::Lit(s.clone()),
                    Piece::Op(op) => Part::Op(self.compile_op(op)?),
                })
            })
            .collect()
    }

    fn compile_node(&mut self, n: &JsonNode) -> Result<Node, String> {
        Ok(match n {
            JsonNode::Object(o) => Node::Object(
                o.iter()
                    .map(|(k, v)| Ok((k.clone(), self.compile_node(v)?)))
                    .collect::<Result<_, String>>()?,
            ),
            JsonNode::Template(t) => Node::Template(self.compile_parts(&t.0)?),
            JsonNode::Literal(l) => Node::Literal(l.clone()),
        })
    }

    /// Compiles `format` (Envoy's default when `None`).
    pub fn compile(&mut self, format: Option<&LogFormat>) -> Result<Compiled, String> {
        match format {
            None => {
                let t = mesh_core::access_log::parse_format(DEFAULT_FORMAT)?;
                Ok(Compiled {
                    kind: Kind::Text(self.compile_parts(&t.0)?),
                    omit_empty: false,
                })
            }
            Some(f) => Ok(Compiled {
                kind: match &f.kind {
                    LogFormatKind::Text(t) => Kind::Text(self.compile_parts(&t.0)?),
                    LogFormatKind::Json(o) => Kind::Json(
                        o.iter()
                            .map(|(k, v)| Ok((k.clone(), self.compile_node(v)?)))
                            .collect::<Result<_, String>>()?,
                    ),
                },
                omit_empty: f.omit_empty_values,
            }),
        }
    }
}

/// One operator's value.
enum Val<'a> {
    Missing,
    Str(&'a str),
    Num(u64),
    Addr(SocketAddr),
    Ip(std::net::IpAddr),
    Ms(Duration),
    Time(SystemTime, Option<&'a TimeFormat>),
    List(&'a [String]),
    /// Several response flags, written in Envoy's order.
    Flags(super::flags::FlagSet),
}

impl Val<'_> {
    fn is_num(&self) -> bool {
        matches!(self, Val::Num(_) | Val::Ms(_))
    }

    fn write(&self, w: &mut impl std::fmt::Write) {
        let _ = match self {
            Val::Missing => Ok(()),
            Val::Str(s) => w.write_str(s),
            Val::Num(n) => write!(w, "{n}"),
            Val::Addr(a) => write!(w, "{a}"),
            Val::Ip(a) => write!(w, "{a}"),
            Val::Ms(d) => write!(w, "{}", d.as_millis()),
            Val::Time(t, f) => write_time(w, *t, *f),
            Val::Flags(set) => set.write(w),
            Val::List(l) => {
                for (i, s) in l.iter().enumerate() {
                    if i > 0 {
                        let _ = w.write_char(',');
                    }
                    let _ = w.write_str(s);
                }
                Ok(())
            }
        };
    }
}

fn header_str(v: &http::HeaderValue, max_len: Option<usize>) -> &str {
    truncate(std::str::from_utf8(v.as_bytes()).unwrap_or(""), max_len)
}

fn pick<'a>(
    slots: &Slots<usize>,
    captured: &'a [Option<http::HeaderValue>],
) -> Option<&'a http::HeaderValue> {
    let get = |i: usize| captured.get(i).and_then(Option::as_ref);
    get(slots.main).or_else(|| slots.alt.and_then(get))
}

fn rpc_val<'a>(slot: ReqSlot, r: &'a super::RpcRequest<'a>) -> Option<&'a str> {
    let non_empty = |s: &'a str| (!s.is_empty()).then_some(s);
    match slot {
        ReqSlot::Method => non_empty(r.method),
        ReqSlot::Path | ReqSlot::Authority => non_empty(r.service),
        ReqSlot::Scheme | ReqSlot::Absent => None,
        ReqSlot::Captured(i) => r.capture.headers.get(i).and_then(|v| v.as_deref()),
    }
}

fn req_val<'a>(slot: ReqSlot, rec: &'a LogRecord<'a>) -> Option<&'a str> {
    let Some(r) = rec.request else {
        return rec.rpc.and_then(|r| rpc_val(slot, r));
    };
    match slot {
        ReqSlot::Method => Some(r.method.as_str()),
        ReqSlot::Path => Some(r.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")),
        ReqSlot::Authority => r.authority.as_deref(),
        ReqSlot::Scheme => Some(if rec.tls.is_some() { "https" } else { "http" }),
        ReqSlot::Absent => None,
        ReqSlot::Captured(i) => r
            .headers
            .get(i)
            .and_then(Option::as_ref)
            .map(|v| header_str(v, None)),
    }
}

/// `s` cut to at most `max_len` bytes (at a character boundary).
fn truncate(s: &str, max_len: Option<usize>) -> &str {
    match max_len {
        Some(n) if s.len() > n => {
            let mut end = n;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            &s[..end]
        }
        _ => s,
    }
}

fn opt<'a, T>(v: Option<T>, f: impl FnOnce(T) -> Val<'a>) -> Val<'a> {
    v.map(f).unwrap_or(Val::Missing)
}

fn non_empty(s: &str) -> Val<'_> {
    if s.is_empty() {
        Val::Missing
    } else {
        Val::Str(s)
    }
}

fn value<'a>(op: &'a Op, rec: &'a LogRecord<'a>) -> Val<'a> {
    let o = match op {
        Op::Req(s) => {
            return req_val(s.main, rec)
                .or_else(|| s.alt.and_then(|a| req_val(a, rec)))
                .map(|v| Val::Str(truncate(v, s.max_len)))
                .unwrap_or(Val::Missing)
        }
        Op::Resp(s) => {
            return pick(s, rec.resp_headers)
                .map(|v| Val::Str(header_str(v, s.max_len)))
                .unwrap_or(Val::Missing)
        }
        Op::Trailer(s) => {
            return pick(s, rec.trailers)
                .map(|v| Val::Str(header_str(v, s.max_len)))
                .unwrap_or(Val::Missing)
        }
        Op::Grpc(f, ct) => return grpc_val(*f, *ct, rec),
        Op::Other(o) => o,
    };
    let tls = rec.tls;
    match o {
        Operator::StartTime(f) => Val::Time(rec.start, f.as_ref()),
        Operator::Protocol => match rec.request.map(|r| r.version).or(rec.protocol) {
            Some(http::Version::HTTP_10) => Val::Str("HTTP/1.0"),
            Some(http::Version::HTTP_2) => Val::Str("HTTP/2"),
            Some(http::Version::HTTP_3) => Val::Str("HTTP/3"),
            Some(_) => Val::Str("HTTP/1.1"),
            None => rec
                .rpc
                .map(|r| Val::Str(r.protocol))
                .unwrap_or(Val::Missing),
        },
        Operator::ResponseCode => Val::Num(u64::from(rec.status)),
        Operator::ResponseCodeDetails => opt(rec.details, Val::Str),
        // Envoy writes `-` for no flags, also in JSON (a string, not null).
        Operator::ResponseFlags => match (rec.flag, rec.extra_flags.is_empty()) {
            (None, true) => Val::Str("-"),
            (Some(f), true) => Val::Str(f.as_str()),
            _ => Val::Flags(rec.flags()),
        },
        Operator::BytesReceived => Val::Num(rec.bytes_received),
        Operator::BytesSent => Val::Num(rec.bytes_sent),
        Operator::Duration => Val::Ms(rec.duration),
        Operator::RequestDuration => opt(rec.request_duration, Val::Ms),
        Operator::ResponseDuration => opt(rec.response_duration, Val::Ms),
        Operator::ResponseTxDuration => opt(
            rec.response_duration
                .map(|r| rec.duration.saturating_sub(r)),
            Val::Ms,
        ),
        Operator::UpstreamHost => opt(rec.upstream_host, Val::Addr),
        Operator::UpstreamCluster => rec.upstream_cluster.map(Val::Str).unwrap_or(Val::Missing),
        Operator::UpstreamLocalAddress => opt(rec.upstream_local, Val::Addr),
        Operator::UpstreamLocalAddressWithoutPort => {
            opt(rec.upstream_local.map(|a| a.ip()), Val::Ip)
        }
        Operator::UpstreamLocalPort => opt(rec.upstream_local, |a| Val::Num(u64::from(a.port()))),
        Operator::UpstreamRemoteAddress => opt(rec.upstream_remote(), Val::Addr),
        Operator::UpstreamRemoteAddressWithoutPort => {
            opt(rec.upstream_remote().map(|a| a.ip()), Val::Ip)
        }
        Operator::UpstreamRemotePort => {
            opt(rec.upstream_remote(), |a| Val::Num(u64::from(a.port())))
        }
        Operator::UpstreamTransportFailureReason => {
            rec.upstream_failure.map(Val::Str).unwrap_or(Val::Missing)
        }
        Operator::DownstreamRemoteAddress => opt(rec.downstream_remote, Val::Addr),
        Operator::DownstreamDirectRemoteAddress => opt(rec.downstream_direct_remote, Val::Addr),
        Operator::DownstreamRemoteAddressWithoutPort => {
            opt(rec.downstream_remote.map(|a| a.ip()), Val::Ip)
        }
        Operator::DownstreamDirectRemoteAddressWithoutPort => {
            opt(rec.downstream_direct_remote.map(|a| a.ip()), Val::Ip)
        }
        Operator::DownstreamRemotePort => {
            opt(rec.downstream_remote, |a| Val::Num(u64::from(a.port())))
        }
        Operator::DownstreamLocalAddress => opt(rec.downstream_local, Val::Addr),
        Operator::DownstreamLocalAddressWithoutPort => {
            opt(rec.downstream_local.map(|a| a.ip()), Val::Ip)
        }
        Operator::DownstreamLocalPort => {
            opt(rec.downstream_local, |a| Val::Num(u64::from(a.port())))
        }
        Operator::RequestedServerName => tls
            .and_then(|t| t.sni.as_deref())
            .or(rec.sni)
            .map(Val::Str)
            .unwrap_or(Val::Missing),
        Operator::RouteName => rec.route_name.map(non_empty).unwrap_or(Val::Missing),
        Operator::Hostname => non_empty(rec.hostname),
        Operator::ConnectionId => opt(rec.connection_id, Val::Num),
        // Envoy: 0 when no upstream request was made.
        Operator::UpstreamRequestAttemptCount => Val::Num(u64::from(rec.attempts.unwrap_or(0))),
        Operator::DownstreamPeerUriSan => match tls {
            Some(t) if !t.uri_sans.is_empty() => Val::List(&t.uri_sans),
            _ => Val::Missing,
        },
        Operator::DownstreamPeerDnsSan => match tls {
            Some(t) if !t.dns_sans.is_empty() => Val::List(&t.dns_sans),
            _ => Val::Missing,
        },
        Operator::DownstreamPeerSubject => {
            tls.map(|t| non_empty(&t.subject)).unwrap_or(Val::Missing)
        }
        Operator::DownstreamPeerIssuer => tls.map(|t| non_empty(&t.issuer)).unwrap_or(Val::Missing),
        Operator::DownstreamPeerSerial => tls.map(|t| non_empty(&t.serial)).unwrap_or(Val::Missing),
        Operator::DownstreamPeerFingerprint256 => tls
            .map(|t| non_empty(&t.fingerprint_256))
            .unwrap_or(Val::Missing),
        Operator::DownstreamTlsVersion => tls
            .map(|t| non_empty(t.tls_version))
            .unwrap_or(Val::Missing),
        Operator::DownstreamTlsCipher => tls
            .map(|t| non_empty(openssl_cipher_name(&t.cipher)))
            .unwrap_or(Val::Missing),
        Operator::DownstreamTransportFailureReason => {
            rec.downstream_failure.map(Val::Str).unwrap_or(Val::Missing)
        }
        Operator::ConnectionTerminationDetails => rec
            .termination_details
            .map(Val::Str)
            .unwrap_or(Val::Missing),
        Operator::GrpcStatus(_) | Operator::Req(_) | Operator::Resp(_) | Operator::Trailer(_) => {
            Val::Missing
        }
    }
}

/// gRPC status names as Envoy's `CAMEL_STRING` writes them.
const GRPC_CAMEL: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// `%GRPC_STATUS%`: only for gRPC requests (`content-type:
/// application/grpc...`), and only once there is a status.
fn grpc_val<'a>(f: GrpcStatusFormat, content_type: usize, rec: &LogRecord<'a>) -> Val<'a> {
    let grpc = rec
        .request
        .and_then(|r| r.headers.get(content_type))
        .and_then(Option::as_ref)
        .is_some_and(|v| {
            let b = v.as_bytes();
            b.starts_with(b"application/grpc") && matches!(b.get(16), None | Some(b'+' | b';'))
        });
    let known =
        rec.status != 0 || rec.grpc_status_header.is_some() || rec.grpc_status_trailer.is_some();
    if !grpc || !known {
        return Val::Missing;
    }
    let n = super::filter::grpc_status(rec);
    let name = match f {
        GrpcStatusFormat::Number => return Val::Num(u64::from(n)),
        GrpcStatusFormat::Camel => GRPC_CAMEL.get(n as usize),
        // `SNAKE_STRING` is absl's names: the filter's, but `CANCELLED`.
        GrpcStatusFormat::Snake if n == 1 => Some(&"CANCELLED"),
        GrpcStatusFormat::Snake => mesh_core::access_log::GRPC_STATUS_NAMES.get(n as usize),
    };
    match name {
        Some(name) => Val::Str(name),
        None => Val::Num(u64::from(n)),
    }
}

/// The OpenSSL/BoringSSL name Envoy prints for an IANA cipher-suite name.
fn openssl_cipher_name(iana: &str) -> &str {
    match iana {
        "TLS13_AES_128_GCM_SHA256" => "TLS_AES_128_GCM_SHA256",
        "TLS13_AES_256_GCM_SHA384" => "TLS_AES_256_GCM_SHA384",
        "TLS13_CHACHA20_POLY1305_SHA256" => "TLS_CHACHA20_POLY1305_SHA256",
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256" => "ECDHE-ECDSA-AES128-GCM-SHA256",
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384" => "ECDHE-ECDSA-AES256-GCM-SHA384",
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256" => "ECDHE-ECDSA-CHACHA20-POLY1305",
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256" => "ECDHE-RSA-AES128-GCM-SHA256",
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384" => "ECDHE-RSA-AES256-GCM-SHA384",
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256" => "ECDHE-RSA-CHACHA20-POLY1305",
        other => other,
    }
}

/// Escapes JSON string content while writing.
struct JsonEscape<'a>(&'a mut String);

impl std::fmt::Write for JsonEscape<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        for c in s.chars() {
            match c {
                '"' => self.0.push_str("\\\""),
                '\\' => self.0.push_str("\\\\"),
                '\n' => self.0.push_str("\\n"),
                '\r' => self.0.push_str("\\r"),
                '\t' => self.0.push_str("\\t"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(self.0, "\\u{:04x}", c as u32);
                }
                c => self.0.push(c),
            }
        }
        Ok(())
    }
}

impl Compiled {
    /// Appends the line for `rec` to `out` (with its newline for JSON).
    pub fn render(&self, rec: &LogRecord<'_>, out: &mut String) {
        match &self.kind {
            Kind::Text(parts) => {
                for p in parts {
                    match p {
                        Part::Lit(s) => out.push_str(s),
                        Part::Op(op) => match value(op, rec) {
                            Val::Missing if !self.omit_empty => out.push('-'),
                            v => v.write(out),
                        },
                    }
                }
            }
            Kind::Json(fields) => {
                self.json_object(fields, rec, out);
                out.push('\n');
            }
        }
    }

    fn json_object(&self, fields: &[(String, Node)], rec: &LogRecord<'_>, out: &mut String) {
        out.push('{');
        let mut first = true;
        for (k, node) in fields {
            let mark = out.len();
            if !first {
                out.push(',');
            }
            out.push('"');
            let _ = JsonEscape(out).write_str(k);
            out.push_str("\":");
            if self.json_value(node, rec, out) {
                first = false;
            } else {
                out.truncate(mark);
            }
        }
        out.push('}');
    }

    /// Writes one JSON value; false when it is to be omitted
    /// (`omit_empty_values` and empty).
    fn json_value(&self, node: &Node, rec: &LogRecord<'_>, out: &mut String) -> bool {
        match node {
            Node::Literal(l) => out.push_str(l),
            Node::Object(o) => self.json_object(o, rec, out),
            Node::Template(parts) => match parts.as_slice() {
                // One operator alone keeps its type: a number, or null.
                [Part::Op(op)] => match value(op, rec) {
                    Val::Missing if self.omit_empty => return false,
                    Val::Missing => out.push_str("null"),
                    v if v.is_num() => v.write(out),
                    v => {
                        out.push('"');
                        v.write(&mut JsonEscape(out));
                        out.push('"');
                    }
                },
                parts => {
                    let start = out.len();
                    out.push('"');
                    for p in parts {
                        match p {
                            Part::Lit(s) => {
                                let _ = JsonEscape(out).write_str(s);
                            }
                            Part::Op(op) => match value(op, rec) {
                                Val::Missing if !self.omit_empty => out.push('-'),
                                v => v.write(&mut JsonEscape(out)),
                            },
                        }
                    }
                    out.push('"');
                    if self.omit_empty && out.len() == start + 2 {
                        return false;
                    }
                }
            },
        }
        true
    }
}

const WEEKDAYS: [&str; 7] = [
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// Writes `t` in `f` (Envoy's default `2026-11-22T06:26:22.566Z` without one).
pub fn write_time(
    w: &mut impl std::fmt::Write,
    t: SystemTime,
    f: Option<&TimeFormat>,
) -> std::fmt::Result {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    let (year, month, day) = mesh_core::time::civil_from_days(days);
    let Some(f) = f else {
        return write!(
            w,
            "{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{:03}Z",
            d.subsec_millis()
        );
    };
    for p in &f.0 {
        match p {
            TimePiece::Lit(l) => w.write_str(l)?,
            TimePiece::Year => write!(w, "{year:04}")?,
            TimePiece::Year2 => write!(w, "{:02}", year.rem_euclid(100))?,
            TimePiece::Month => write!(w, "{month:02}")?,
            TimePiece::Day => write!(w, "{day:02}")?,
            TimePiece::DaySpace => write!(w, "{day:2}")?,
            TimePiece::Hour => write!(w, "{h:02}")?,
            TimePiece::Minute => write!(w, "{m:02}")?,
            TimePiece::Second => write!(w, "{s:02}")?,
            TimePiece::DayOfYear => write!(
                w,
                "{:03}",
                days - mesh_core::time::days_from_civil(year, 1, 1) + 1
            )?,
            TimePiece::WeekdayShort => w.write_str(&WEEKDAYS[days.rem_euclid(7) as usize][..3])?,
            TimePiece::WeekdayLong => w.write_str(WEEKDAYS[days.rem_euclid(7) as usize])?,
            TimePiece::MonthShort => w.write_str(&MONTHS[month as usize - 1][..3])?,
            TimePiece::MonthLong => w.write_str(MONTHS[month as usize - 1])?,
            TimePiece::Offset => w.write_str("+0000")?,
            TimePiece::Zone => w.write_str("UTC")?,
            TimePiece::EpochSeconds => write!(w, "{secs}")?,
            TimePiece::Fraction(n) => {
                let nanos = d.subsec_nanos();
                let n = u32::from(*n).clamp(1, 9);
                write!(
                    w,
                    "{:0width$}",
                    nanos / 10u32.pow(9 - n),
                    width = n as usize
                )?
            }
        }
    }
    Ok(())
}
