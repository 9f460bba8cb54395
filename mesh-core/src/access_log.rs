//! Access-log formats and filters (Envoy `config.core.v3.SubstitutionFormatString`
//! and `config.accesslog.v3.AccessLogFilter`), parsed once at configuration
//! load into command operators, so a request never parses a format.
//!
//! [`parse_format`] turns a format string such as
//! `[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"` into
//! literal text and [`Operator`]s; an unknown or malformed operator is an
//! error naming it, which the loader reports with the field path.

use crate::config::HeaderMatcher;

/// One command operator of an access-log format (Envoy's names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operator {
    /// `%START_TIME%` or `%START_TIME(FORMAT)%`.
    StartTime(Option<TimeFormat>),
    /// `%REQ(H?ALT):N%` (also `%REQUEST_HEADER(...)%`).
    Req(HeaderRef),
    /// `%RESP(H?ALT):N%` (also `%RESPONSE_HEADER(...)%`).
    Resp(HeaderRef),
    /// `%TRAILER(H?ALT):N%` (also `%RESPONSE_TRAILER(...)%`).
    Trailer(HeaderRef),
    /// `%PROTOCOL%`: `HTTP/1.1`, `HTTP/2`; `-` for TCP.
    Protocol,
    /// `%RESPONSE_CODE%`: the status; `0` without a response (TCP).
    ResponseCode,
    /// `%RESPONSE_CODE_DETAILS%`.
    ResponseCodeDetails,
    /// `%RESPONSE_FLAGS%`: `UF`, `NR`, ... or `-`.
    ResponseFlags,
    /// `%BYTES_RECEIVED%`: downstream body (or stream) bytes received.
    BytesReceived,
    /// `%BYTES_SENT%`: downstream body (or stream) bytes sent.
    BytesSent,
    /// `%DURATION%`: start to end, in milliseconds.
    Duration,
    /// `%REQUEST_DURATION%`: start to the request's last byte, in ms.
    RequestDuration,
    /// `%RESPONSE_DURATION%`: start to the upstream response's first byte, in ms.
    ResponseDuration,
    /// `%RESPONSE_TX_DURATION%`: the upstream response's first byte to the
    /// last byte sent downstream, in ms (`-` for a proxy-made response).
    ResponseTxDuration,
    /// `%UPSTREAM_HOST%`: `ip:port` of the upstream endpoint.
    UpstreamHost,
    /// `%UPSTREAM_CLUSTER%` and `%UPSTREAM_CLUSTER_RAW%` (mesh has no
    /// `alt_stat_name`, so both are the cluster's name).
    UpstreamCluster,
    /// `%CONNECTION_TERMINATION_DETAILS%`: why mesh closed the connection
    /// (`-` while mesh records no such reason).
    ConnectionTerminationDetails,
    /// `%UPSTREAM_LOCAL_ADDRESS%`.
    UpstreamLocalAddress,
    /// `%UPSTREAM_LOCAL_ADDRESS_WITHOUT_PORT%`.
    UpstreamLocalAddressWithoutPort,
    /// `%UPSTREAM_LOCAL_PORT%`.
    UpstreamLocalPort,
    /// `%UPSTREAM_REMOTE_ADDRESS%`: the upstream host once connected to
    /// (`-` when the connect failed, where `%UPSTREAM_HOST%` names it).
    UpstreamRemoteAddress,
    /// `%UPSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%`.
    UpstreamRemoteAddressWithoutPort,
    /// `%UPSTREAM_REMOTE_PORT%`.
    UpstreamRemotePort,
    /// `%UPSTREAM_TRANSPORT_FAILURE_REASON%`.
    UpstreamTransportFailureReason,
    /// `%DOWNSTREAM_TRANSPORT_FAILURE_REASON%`: why the downstream TLS
    /// handshake failed.
    DownstreamTransportFailureReason,
    /// `%DOWNSTREAM_REMOTE_ADDRESS%`.
    DownstreamRemoteAddress,
    /// `%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%`.
    DownstreamRemoteAddressWithoutPort,
    /// `%DOWNSTREAM_REMOTE_PORT%`.
    DownstreamRemotePort,
    /// `%DOWNSTREAM_DIRECT_REMOTE_ADDRESS%`: the socket peer (the remote
    /// address may come from `x-forwarded-for`).
    DownstreamDirectRemoteAddress,
    /// `%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT%`.
    DownstreamDirectRemoteAddressWithoutPort,
    /// `%DOWNSTREAM_LOCAL_ADDRESS%`.
    DownstreamLocalAddress,
    /// `%DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT%`.
    DownstreamLocalAddressWithoutPort,
    /// `%DOWNSTREAM_LOCAL_PORT%`.
    DownstreamLocalPort,
    /// `%REQUESTED_SERVER_NAME%`: the SNI of a TLS connection.
    RequestedServerName,
    /// `%ROUTE_NAME%`.
    RouteName,
    /// `%HOSTNAME%`: the machine's host name.
    Hostname,
    /// `%CONNECTION_ID%`: the downstream connection's id.
    ConnectionId,
    /// `%UPSTREAM_REQUEST_ATTEMPT_COUNT%`.
    UpstreamRequestAttemptCount,
    /// `%DOWNSTREAM_PEER_URI_SAN%`: the verified peer's URI SANs, comma-separated.
    DownstreamPeerUriSan,
    /// `%DOWNSTREAM_PEER_DNS_SAN%`.
    DownstreamPeerDnsSan,
    /// `%DOWNSTREAM_PEER_SUBJECT%`.
    DownstreamPeerSubject,
    /// `%DOWNSTREAM_PEER_ISSUER%`.
    DownstreamPeerIssuer,
    /// `%DOWNSTREAM_PEER_SERIAL%`.
    DownstreamPeerSerial,
    /// `%DOWNSTREAM_PEER_FINGERPRINT_256%`: hex SHA-256 of the peer certificate.
    DownstreamPeerFingerprint256,
    /// `%DOWNSTREAM_TLS_VERSION%`: `TLSv1.2`, `TLSv1.3`.
    DownstreamTlsVersion,
    /// `%DOWNSTREAM_TLS_CIPHER%` (OpenSSL names, as Envoy prints them).
    DownstreamTlsCipher,
    /// `%GRPC_STATUS(FORMAT)%` and `%GRPC_STATUS_NUMBER%`: the gRPC status of
    /// a gRPC request (`grpc-status` of the trailers, else the headers, else
    /// mapped from the HTTP status); `-` for other requests.
    GrpcStatus(GrpcStatusFormat),
}

/// How `%GRPC_STATUS%` is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrpcStatusFormat {
    /// `CAMEL_STRING` (the default): `OK`, `NotFound`, ...
    Camel,
    /// `SNAKE_STRING`: `OK`, `NOT_FOUND`, ...
    Snake,
    /// `NUMBER` (also `%GRPC_STATUS_NUMBER%`): `0`, `5`, ...
    Number,
}

impl Operator {
    /// Whether Envoy's typed JSON renders the value as a number.
    pub fn is_numeric(&self) -> bool {
        matches!(
            self,
            Operator::ResponseCode
                | Operator::BytesReceived
                | Operator::BytesSent
                | Operator::Duration
                | Operator::RequestDuration
                | Operator::ResponseDuration
                | Operator::ResponseTxDuration
                | Operator::ConnectionId
                | Operator::UpstreamRequestAttemptCount
                | Operator::DownstreamLocalPort
                | Operator::DownstreamRemotePort
                | Operator::UpstreamLocalPort
                | Operator::UpstreamRemotePort
                | Operator::GrpcStatus(GrpcStatusFormat::Number)
        )
    }
}

/// A header named by `%REQ(...)%`, `%RESP(...)%` or `%TRAILER(...)%`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderRef {
    /// The header (lower-cased; pseudo-headers keep their `:`).
    pub name: String,
    /// The `?ALT` fallback, used when `name` is absent.
    pub alt: Option<String>,
    /// The `:N` length limit, in bytes.
    pub max_len: Option<usize>,
}

/// A `%START_TIME(...)%` format, compiled to pieces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimeFormat(pub Vec<TimePiece>);

/// One piece of a [`TimeFormat`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimePiece {
    /// Literal text.
    Lit(String),
    /// `%Y`.
    Year,
    /// `%y`.
    Year2,
    /// `%m`.
    Month,
    /// `%d`.
    Day,
    /// `%e` (space padded).
    DaySpace,
    /// `%H`.
    Hour,
    /// `%M`.
    Minute,
    /// `%S`.
    Second,
    /// `%j`.
    DayOfYear,
    /// `%a`.
    WeekdayShort,
    /// `%A`.
    WeekdayLong,
    /// `%b` / `%h`.
    MonthShort,
    /// `%B`.
    MonthLong,
    /// `%z`: always `+0000` (UTC).
    Offset,
    /// `%Z`: always `UTC`.
    Zone,
    /// `%s`: seconds since the epoch.
    EpochSeconds,
    /// `%f` (9 digits) or `%Nf` / `%ENS` fraction digits (1-9).
    Fraction(u8),
}

/// Literal text or an operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Text copied as it is.
    Lit(String),
    /// A command operator.
    Op(Operator),
}

/// A parsed format string.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Template(pub Vec<Piece>);

/// A value of a `json_format` dictionary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonNode {
    /// A nested dictionary.
    Object(Vec<(String, JsonNode)>),
    /// A string value: a format string.
    Template(Template),
    /// A number, boolean or null, written as this JSON text.
    Literal(String),
}

/// Envoy `SubstitutionFormatString`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFormat {
    /// `text_format` / `text_format_source`, or `json_format`.
    pub kind: LogFormatKind,
    /// `omit_empty_values`.
    pub omit_empty_values: bool,
}

/// The shape of a [`LogFormat`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogFormatKind {
    /// A format string (the line's newline is part of it).
    Text(Template),
    /// A JSON dictionary, one object per line.
    Json(Vec<(String, JsonNode)>),
}

/// How a comparison filter compares (`ComparisonFilter.op`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    /// `EQ`.
    Eq,
    /// `GE`.
    Ge,
    /// `LE`.
    Le,
}

impl Comparison {
    /// `value OP threshold`.
    pub fn test(self, value: u64, threshold: u64) -> bool {
        match self {
            Comparison::Eq => value == threshold,
            Comparison::Ge => value >= threshold,
            Comparison::Le => value <= threshold,
        }
    }
}

/// Envoy `config.accesslog.v3.AccessLogFilter`.
#[derive(Debug, Clone, PartialEq)]
pub enum AccessLogFilter {
    /// `status_code_filter`.
    StatusCode(Comparison, u64),
    /// `duration_filter` (milliseconds).
    Duration(Comparison, u64),
    /// `not_health_check_filter`.
    NotHealthCheck,
    /// `response_flag_filter`: any of these flags, by Envoy's short name
    /// (any flag when empty).
    ResponseFlag(Vec<String>),
    /// `header_filter` (on request headers).
    Header(HeaderMatcher),
    /// `grpc_status_filter`: the status codes (numbers) and `exclude`.
    GrpcStatus(Vec<u32>, bool),
    /// `and_filter`.
    And(Vec<AccessLogFilter>),
    /// `or_filter`.
    Or(Vec<AccessLogFilter>),
}

/// gRPC status names as Envoy's `grpc_status_filter` spells them, by code.
pub const GRPC_STATUS_NAMES: [&str; 17] = [
    "OK",
    "CANCELED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// Every response flag name Envoy accepts in a `response_flag_filter`.
pub const RESPONSE_FLAG_NAMES: [&str; 29] = [
    "LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX", "RLSE", "DC",
    "URX", "SI", "IH", "DPE", "UMSDR", "RFCF", "NFCF", "DT", "UPE", "NC", "OM", "DF", "DO", "DR",
];

/// Parses a format string. `%%` is not special in Envoy formats outside
/// an operator; a `%` that starts no known operator is an error.
pub fn parse_format(text: &str) -> Result<Template, String> {
    let mut pieces = Vec::new();
    let mut lit = String::new();
    let mut rest = text;
    while let Some(i) = rest.find('%') {
        lit.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        let (name, arg, after) = split_operator(rest)?;
        let (op, after) = operator(name, arg, after)?;
        rest = after;
        if !lit.is_empty() {
            pieces.push(Piece::Lit(std::mem::take(&mut lit)));
        }
        pieces.push(Piece::Op(op));
    }
    lit.push_str(rest);
    if !lit.is_empty() {
        pieces.push(Piece::Lit(lit));
    }
    Ok(Template(pieces))
}

/// Splits `NAME(ARG)...` or `NAME%...` after an opening `%`: the name, the
/// parenthesised argument and the text after the name and argument.
fn split_operator(s: &str) -> Result<(&str, Option<&str>, &str), String> {
    let end = s
        .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
        .unwrap_or(s.len());
    let name = &s[..end];
    if name.is_empty() {
        return Err(format!(
            "a % that starts no command operator at {:?}",
            preview(s)
        ));
    }
    let rest = &s[end..];
    if let Some(r) = rest.strip_prefix('(') {
        // The argument ends at the first `)` followed by `%` or `:`
        // (START_TIME formats may contain parentheses).
        let close = r
            .match_indices(')')
            .map(|(i, _)| i)
            .find(|&i| matches!(r.as_bytes().get(i + 1), Some(b'%') | Some(b':')))
            .ok_or_else(|| format!("%{name}(...) is not closed with )%"))?;
        Ok((name, Some(&r[..close]), &r[close + 1..]))
    } else {
        Ok((name, None, rest))
    }
}

fn preview(s: &str) -> String {
    s.chars().take(20).collect()
}

/// Reads the operator `name(arg)`; `after` starts after it, at `:N%` or `%`.
fn operator<'a>(
    name: &str,
    arg: Option<&str>,
    after: &'a str,
) -> Result<(Operator, &'a str), String> {
    // `:N` only after header operators.
    let (max_len, after) = match after.strip_prefix(':') {
        Some(r) => {
            let end = r
                .find('%')
                .ok_or_else(|| format!("%{name}%: missing closing %"))?;
            let n: usize = r[..end]
                .parse()
                .map_err(|_| format!("%{name}(...):{}%: the length is not a number", &r[..end]))?;
            (Some(n), &r[end..])
        }
        None => (None, after),
    };
    let after = after
        .strip_prefix('%')
        .ok_or_else(|| format!("%{name}: missing closing %"))?;
    let header = |arg: Option<&str>| -> Result<HeaderRef, String> {
        let arg = arg.ok_or_else(|| format!("%{name}% needs a header name: %{name}(NAME)%"))?;
        let (main, alt) = match arg.split_once('?') {
            Some((m, a)) => (m, Some(a)),
            None => (arg, None),
        };
        let check = |h: &str| -> Result<String, String> {
            let bare = h.strip_prefix(':').unwrap_or(h);
            if bare.is_empty() || http::HeaderName::from_bytes(bare.as_bytes()).is_err() {
                return Err(format!("%{name}({arg})%: {h:?} is not a header name"));
            }
            Ok(h.to_ascii_lowercase())
        };
        Ok(HeaderRef {
            name: check(main)?,
            alt: alt.map(check).transpose()?,
            max_len,
        })
    };
    let op = match name {
        "REQ" | "REQUEST_HEADER" => Operator::Req(header(arg)?),
        "RESP" | "RESPONSE_HEADER" => Operator::Resp(header(arg)?),
        "TRAILER" | "RESPONSE_TRAILER" => Operator::Trailer(header(arg)?),
        _ if max_len.is_some() => {
            return Err(format!("%{name}% does not take a :length"));
        }
        "START_TIME" => Operator::StartTime(match arg {
            None | Some("") => None,
            Some(f) => Some(parse_time_format(f)?),
        }),
        "GRPC_STATUS" => Operator::GrpcStatus(match arg {
            None | Some("") | Some("CAMEL_STRING") => GrpcStatusFormat::Camel,
            Some("SNAKE_STRING") => GrpcStatusFormat::Snake,
            Some("NUMBER") => GrpcStatusFormat::Number,
            Some(other) => {
                return Err(format!(
                    "%GRPC_STATUS({other})%: the format is CAMEL_STRING, SNAKE_STRING or NUMBER"
                ))
            }
        }),
        _ if arg.is_some() => {
            return Err(format!("%{name}% takes no argument"));
        }
        "GRPC_STATUS_NUMBER" => Operator::GrpcStatus(GrpcStatusFormat::Number),
        "PROTOCOL" => Operator::Protocol,
        "RESPONSE_CODE" => Operator::ResponseCode,
        "RESPONSE_CODE_DETAILS" => Operator::ResponseCodeDetails,
        "RESPONSE_FLAGS" => Operator::ResponseFlags,
        "BYTES_RECEIVED" => Operator::BytesReceived,
        "BYTES_SENT" => Operator::BytesSent,
        "DURATION" => Operator::Duration,
        "REQUEST_DURATION" => Operator::RequestDuration,
        "RESPONSE_DURATION" => Operator::ResponseDuration,
        "RESPONSE_TX_DURATION" => Operator::ResponseTxDuration,
        "UPSTREAM_HOST" => Operator::UpstreamHost,
        "UPSTREAM_REMOTE_ADDRESS" => Operator::UpstreamRemoteAddress,
        "UPSTREAM_CLUSTER" | "UPSTREAM_CLUSTER_RAW" => Operator::UpstreamCluster,
        "CONNECTION_TERMINATION_DETAILS" => Operator::ConnectionTerminationDetails,
        "UPSTREAM_LOCAL_ADDRESS" => Operator::UpstreamLocalAddress,
        "UPSTREAM_LOCAL_ADDRESS_WITHOUT_PORT" => Operator::UpstreamLocalAddressWithoutPort,
        "UPSTREAM_LOCAL_PORT" => Operator::UpstreamLocalPort,
        "UPSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => Operator::UpstreamRemoteAddressWithoutPort,
        "UPSTREAM_REMOTE_PORT" => Operator::UpstreamRemotePort,
        "UPSTREAM_TRANSPORT_FAILURE_REASON" => Operator::UpstreamTransportFailureReason,
        "DOWNSTREAM_TRANSPORT_FAILURE_REASON" => Operator::DownstreamTransportFailureReason,
        "DOWNSTREAM_REMOTE_ADDRESS" => Operator::DownstreamRemoteAddress,
        "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => Operator::DownstreamRemoteAddressWithoutPort,
        "DOWNSTREAM_REMOTE_PORT" => Operator::DownstreamRemotePort,
        "DOWNSTREAM_DIRECT_REMOTE_ADDRESS" => Operator::DownstreamDirectRemoteAddress,
        "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT" => {
            Operator::DownstreamDirectRemoteAddressWithoutPort
        }
        "DOWNSTREAM_LOCAL_ADDRESS" => Operator::DownstreamLocalAddress,
        "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT" => Operator::DownstreamLocalAddressWithoutPort,
        "DOWNSTREAM_LOCAL_PORT" => Operator::DownstreamLocalPort,
        "REQUESTED_SERVER_NAME" => Operator::RequestedServerName,
        "ROUTE_NAME" => Operator::RouteName,
        "HOSTNAME" => Operator::Hostname,
        "CONNECTION_ID" => Operator::ConnectionId,
        "UPSTREAM_REQUEST_ATTEMPT_COUNT" => Operator::UpstreamRequestAttemptCount,
        "DOWNSTREAM_PEER_URI_SAN" => Operator::DownstreamPeerUriSan,
        "DOWNSTREAM_PEER_DNS_SAN" => Operator::DownstreamPeerDnsSan,
        "DOWNSTREAM_PEER_SUBJECT" => Operator::DownstreamPeerSubject,
        "DOWNSTREAM_PEER_ISSUER" => Operator::DownstreamPeerIssuer,
        "DOWNSTREAM_PEER_SERIAL" => Operator::DownstreamPeerSerial,
        "DOWNSTREAM_PEER_FINGERPRINT_256" => Operator::DownstreamPeerFingerprint256,
        "DOWNSTREAM_TLS_VERSION" => Operator::DownstreamTlsVersion,
        "DOWNSTREAM_TLS_CIPHER" => Operator::DownstreamTlsCipher,
        other => return Err(format!("unsupported command operator %{other}%")),
    };
    Ok((op, after))
}

/// Compiles a `%START_TIME(...)%` strftime format (Envoy's extensions
/// `%f`, `%1f`..`%9f`, `%E3S`, `%s` included).
pub fn parse_time_format(f: &str) -> Result<TimeFormat, String> {
    let mut out = Vec::new();
    let mut lit = String::new();
    let mut chars = f.chars().peekable();
    let push = |out: &mut Vec<TimePiece>, lit: &mut String, p: TimePiece| {
        if !lit.is_empty() {
            out.push(TimePiece::Lit(std::mem::take(lit)));
        }
        out.push(p);
    };
    while let Some(c) = chars.next() {
        if c != '%' {
            lit.push(c);
            continue;
        }
        let Some(spec) = chars.next() else {
            return Err(format!("START_TIME format {f:?} ends with %"));
        };
        let p = match spec {
            '%' => {
                lit.push('%');
                continue;
            }
            'Y' => TimePiece::Year,
            'y' => TimePiece::Year2,
            'm' => TimePiece::Month,
            'd' => TimePiece::Day,
            'e' => TimePiece::DaySpace,
            'H' => TimePiece::Hour,
            'M' => TimePiece::Minute,
            'S' => TimePiece::Second,
            'j' => TimePiece::DayOfYear,
            'a' => TimePiece::WeekdayShort,
            'A' => TimePiece::WeekdayLong,
            'b' | 'h' => TimePiece::MonthShort,
            'B' => TimePiece::MonthLong,
            'z' => TimePiece::Offset,
            'Z' => TimePiece::Zone,
            's' => TimePiece::EpochSeconds,
            'f' => TimePiece::Fraction(9),
            'T' => {
                push(&mut out, &mut lit, TimePiece::Hour);
                lit.push(':');
                push(&mut out, &mut lit, TimePiece::Minute);
                lit.push(':');
                push(&mut out, &mut lit, TimePiece::Second);
                continue;
            }
            'F' => {
                push(&mut out, &mut lit, TimePiece::Year);
                lit.push('-');
                push(&mut out, &mut lit, TimePiece::Month);
                lit.push('-');
                push(&mut out, &mut lit, TimePiece::Day);
                continue;
            }
            'E' => {
                // %E3S: seconds with 3 fraction digits.
                let n = chars.next().and_then(|d| d.to_digit(10));
                match (n, chars.next()) {
                    (Some(n @ 1..=9), Some('S')) => {
                        push(&mut out, &mut lit, TimePiece::Second);
                        lit.push('.');
                        TimePiece::Fraction(n as u8)
                    }
                    _ => {
                        return Err(format!(
                            "START_TIME format {f:?}: only %E1S..%E9S are supported"
                        ))
                    }
                }
            }
            d @ '1'..='9' => {
                if chars.next() != Some('f') {
                    return Err(format!(
                        "START_TIME format {f:?}: %{d} must be followed by f"
                    ));
                }
                TimePiece::Fraction(d as u8 - b'0')
            }
            other => {
                return Err(format!(
                    "START_TIME format {f:?}: unsupported specifier %{other}"
                ))
            }
        };
        push(&mut out, &mut lit, p);
    }
    if !lit.is_empty() {
        out.push(TimePiece::Lit(lit));
    }
    Ok(TimeFormat(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lit(s: &str) -> Piece {
        Piece::Lit(s.into())
    }

    #[test]
    fn parses_envoys_default_format() {
        let t = parse_format(
            "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE%\n",
        )
        .unwrap();
        assert_eq!(
            t.0,
            vec![
                lit("["),
                Piece::Op(Operator::StartTime(None)),
                lit("] \""),
                Piece::Op(Operator::Req(HeaderRef {
                    name: ":method".into(),
                    alt: None,
                    max_len: None
                })),
                lit(" "),
                Piece::Op(Operator::Req(HeaderRef {
                    name: "x-envoy-original-path".into(),
                    alt: Some(":path".into()),
                    max_len: None
                })),
                lit(" "),
                Piece::Op(Operator::Protocol),
                lit("\" "),
                Piece::Op(Operator::ResponseCode),
                lit("\n"),
            ]
        );
    }

    #[test]
    fn header_length_limit_and_aliases() {
        let t = parse_format("%REQUEST_HEADER(User-Agent):10%%RESP(x-a)%").unwrap();
        assert_eq!(
            t.0,
            vec![
                Piece::Op(Operator::Req(HeaderRef {
                    name: "user-agent".into(),
                    alt: None,
                    max_len: Some(10)
                })),
                Piece::Op(Operator::Resp(HeaderRef {
                    name: "x-a".into(),
                    alt: None,
                    max_len: None
                })),
            ]
        );
    }

    #[test]
    fn bad_operators_are_errors_naming_them() {
        for (f, want) in [
            ("%NOPE%", "unsupported command operator %NOPE%"),
            ("%REQ%", "needs a header name"),
            ("%REQ(a b)%", "is not a header name"),
            ("%REQ(x", "not closed"),
            ("%DURATION", "missing closing %"),
            ("%DURATION(x)%", "takes no argument"),
            ("%DURATION:3%", "does not take a :length"),
            ("% x", "starts no command operator"),
            ("%REQ(x):a%", "not a number"),
            ("%START_TIME(%Q)%", "unsupported specifier %Q"),
            ("%GRPC_STATUS(FOO)%", "CAMEL_STRING, SNAKE_STRING or NUMBER"),
            ("%GRPC_STATUS_NUMBER(X)%", "takes no argument"),
        ] {
            let e = parse_format(f).unwrap_err();
            assert!(e.contains(want), "{f}: {e}");
        }
    }

    #[test]
    fn start_time_formats() {
        let t = parse_format("%START_TIME(%Y/%m/%dT%H:%M:%S.%3f%z)%").unwrap();
        let Piece::Op(Operator::StartTime(Some(TimeFormat(p)))) = &t.0[0] else {
            panic!("{t:?}")
        };
        assert_eq!(p[0], TimePiece::Year);
        assert_eq!(p[p.len() - 2], TimePiece::Fraction(3));
        assert_eq!(p[p.len() - 1], TimePiece::Offset);
        // Parentheses inside a START_TIME format.
        let t = parse_format("%START_TIME((%s))% x").unwrap();
        assert_eq!(t.0.len(), 2);
    }
}
