//! Protocol detection from the first bytes of a connection.
//!
//! A listener that serves several protocols on one port (HTTP/1.x, h2c and
//! the RPC protocols Dubbo, SOFA Bolt and Thrift) has to tell them apart
//! before it knows which filter chain to run. [`detect`] looks at the bytes
//! received so far and answers one of three things:
//!
//! - [`Detection::Found`]: the bytes can only be that protocol;
//! - [`Detection::NeedMore`]: the bytes are a prefix of some protocol in the
//!   set, so the caller should wait for more (up to [`MAX_INSPECT`] bytes);
//! - [`Detection::NotFound`]: no protocol of the set starts this way (the
//!   caller then takes its fallback, typically a `tcp_proxy` chain).
//!
//! The rules are those of Envoy's `http_inspector` for HTTP (the full h2
//! connection preface gives `h2c`; otherwise a request line up to its line
//! feed whose version decides between `http/1.1` and `http/1.0`), and the
//! frame headers of the RPC codecs for the others:
//!
//! | protocol | first bytes |
//! |---|---|
//! | Dubbo | magic `da bb` |
//! | SOFA Bolt v1 | protocol `01`, type `00`..`02` (response, request, oneway), command code `00 00`..`00 02` (heartbeat, request, response) |
//! | Thrift | strict binary `80 01`, compact `82` then a byte whose low five bits are version 1, or either after a 4-byte frame length under 16 MiB (framed transport) |
//!
//! The protocols never share a first byte (an HTTP method is a token of
//! visible ASCII characters), so at most one of them is ever found. Nothing
//! here reads from a socket: the listener peeks and calls [`detect`] again
//! as bytes arrive, so whichever chain runs sees the stream from byte 0.

/// The most bytes worth waiting for: a request line longer than this is
/// not told apart (Envoy's http_inspector gives up at the same size).
pub const MAX_INSPECT: usize = 64 * 1024;

/// The HTTP/2 connection preface a prior-knowledge (h2c) client sends.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A protocol [`detect`] can recognise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// An HTTP/1.0 request line (or any HTTP/1 version other than 1.1).
    Http10,
    /// An HTTP/1.1 request line.
    Http11,
    /// The HTTP/2 connection preface (h2 over clear text).
    H2c,
    /// Dubbo (dubbo2 protocol).
    Dubbo,
    /// SOFA Bolt v1.
    Bolt,
    /// Apache Thrift (binary or compact protocol, framed or not).
    Thrift,
}

impl Protocol {
    /// Every protocol, in a fixed order.
    pub const ALL: [Protocol; 6] = [
        Protocol::Http10,
        Protocol::Http11,
        Protocol::H2c,
        Protocol::Dubbo,
        Protocol::Bolt,
        Protocol::Thrift,
    ];

    /// The application protocol a filter chain matches on
    /// (`filter_chain_match.application_protocols`): `http/1.0`,
    /// `http/1.1` and `h2c` as Envoy's http_inspector sets them, and
    /// `dubbo`, `bolt` and `thrift`.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Http10 => "http/1.0",
            Protocol::Http11 => "http/1.1",
            Protocol::H2c => "h2c",
            Protocol::Dubbo => "dubbo",
            Protocol::Bolt => "bolt",
            Protocol::Thrift => "thrift",
        }
    }

    /// Whether this is one of the HTTP protocols.
    pub fn is_http(self) -> bool {
        matches!(self, Protocol::Http10 | Protocol::Http11 | Protocol::H2c)
    }
}

/// Which protocols to look for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProtocolSet {
    /// HTTP/1.x and h2c.
    pub http: bool,
    /// Dubbo, SOFA Bolt and Thrift.
    pub rpc: bool,
}

impl ProtocolSet {
    /// HTTP only (Envoy's http_inspector).
    pub const HTTP: ProtocolSet = ProtocolSet {
        http: true,
        rpc: false,
    };
    /// The RPC protocols only.
    pub const RPC: ProtocolSet = ProtocolSet {
        http: false,
        rpc: true,
    };
    /// Everything [`detect`] knows.
    pub const ALL: ProtocolSet = ProtocolSet {
        http: true,
        rpc: true,
    };
}

/// What the bytes received so far say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detection {
    /// Only this protocol starts this way.
    Found(Protocol),
    /// A protocol of the set may still start this way: wait for more bytes.
    NeedMore,
    /// No protocol of the set starts this way.
    NotFound,
}

/// Tells the protocol of a connection from its first bytes (see the
/// module documentation for the rules). `buf` is everything received so
/// far; empty input needs more.
///
/// ```
/// use mesh_codec::sniff::{detect, Detection, Protocol, ProtocolSet};
///
/// assert_eq!(detect(b"GET / HTTP/1.1\r\n", ProtocolSet::ALL), Detection::Found(Protocol::Http11));
/// assert_eq!(detect(b"GET / HT", ProtocolSet::ALL), Detection::NeedMore);
/// assert_eq!(detect(&[0xda, 0xbb, 0xc2], ProtocolSet::ALL), Detection::Found(Protocol::Dubbo));
/// assert_eq!(detect(&[0xda, 0xbb], ProtocolSet::HTTP), Detection::NotFound);
/// ```
pub fn detect(buf: &[u8], set: ProtocolSet) -> Detection {
    if buf.is_empty() {
        return Detection::NeedMore;
    }
    let http = set.http.then(|| http(buf));
    let rpc = set.rpc.then(|| rpc(buf));
    combine(http.into_iter().chain(rpc))
}

/// The protocol one of the answers found, else whether any needs more.
fn combine(answers: impl IntoIterator<Item = Detection>) -> Detection {
    let mut need_more = false;
    for a in answers {
        match a {
            Detection::Found(p) => return Detection::Found(p),
            Detection::NeedMore => need_more = true,
            Detection::NotFound => {}
        }
    }
    if need_more {
        Detection::NeedMore
    } else {
        Detection::NotFound
    }
}

/// HTTP only: the h2 preface, else an HTTP/1 request line.
pub fn http(buf: &[u8]) -> Detection {
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if buf.len() >= H2_PREFACE.len() {
            Detection::Found(Protocol::H2c)
        } else {
            Detection::NeedMore
        };
    }
    request_line(buf)
}

/// Whether `b` may appear in an HTTP token (RFC 9110 `tchar`).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// An HTTP/1 request line: `method SP target SP HTTP/x.y CR? LF`. Every
/// version other than 1.1 counts as `http/1.0`, as in Envoy.
fn request_line(buf: &[u8]) -> Detection {
    let (line, complete) = match buf.iter().position(|&b| b == b'\n') {
        Some(end) => (&buf[..end], true),
        None => (buf, false),
    };
    // A trailing CR ends the line, or may be followed by its LF.
    let s = line.strip_suffix(b"\r").unwrap_or(line);
    // Method: one or more token characters, then a space.
    let method = s.iter().take_while(|&&b| is_tchar(b)).count();
    if method == 0 {
        return Detection::NotFound;
    }
    match s.get(method) {
        Some(b' ') => {}
        Some(_) => return Detection::NotFound,
        None if complete => return Detection::NotFound,
        None => return Detection::NeedMore,
    }
    // Target: visible characters, then a space.
    let rest = &s[method + 1..];
    let target = rest.iter().take_while(|&&b| b.is_ascii_graphic()).count();
    match rest.get(target) {
        Some(b' ') if target > 0 => {}
        Some(_) => return Detection::NotFound,
        None if complete => return Detection::NotFound,
        None => return Detection::NeedMore,
    }
    // Version: `HTTP/` digit `.` digit, and nothing after it on the line.
    let version = &rest[target + 1..];
    const SHAPE: &[u8] = b"HTTP/0.0";
    for (i, &b) in version.iter().enumerate() {
        let ok = match SHAPE.get(i) {
            Some(b'0') => b.is_ascii_digit(),
            Some(&c) => b == c,
            None => false,
        };
        if !ok {
            return Detection::NotFound;
        }
    }
    match version {
        _ if !complete => Detection::NeedMore,
        b"HTTP/1.1" => Detection::Found(Protocol::Http11),
        v if v.len() == SHAPE.len() => Detection::Found(Protocol::Http10),
        _ => Detection::NotFound,
    }
}

/// The RPC protocols only: Dubbo, SOFA Bolt or Thrift.
pub fn rpc(buf: &[u8]) -> Detection {
    combine([dubbo(buf), bolt(buf), thrift(buf)])
}

/// Matches `buf` against a pattern of per-byte tests: `Found(p)` when
/// every test passes, `NeedMore` when the input ends before the pattern.
fn pattern(buf: &[u8], tests: &[fn(u8) -> bool], p: Protocol) -> Detection {
    for (i, test) in tests.iter().enumerate() {
        match buf.get(i) {
            None => return Detection::NeedMore,
            Some(&b) if !test(b) => return Detection::NotFound,
            Some(_) => {}
        }
    }
    Detection::Found(p)
}

fn dubbo(buf: &[u8]) -> Detection {
    pattern(buf, &[|b| b == 0xda, |b| b == 0xbb], Protocol::Dubbo)
}

fn bolt(buf: &[u8]) -> Detection {
    pattern(
        buf,
        &[|b| b == 0x01, |b| b <= 0x02, |b| b == 0x00, |b| b <= 0x02],
        Protocol::Bolt,
    )
}

/// A Thrift message header at the start of `buf`: strict binary (`80 01`)
/// or compact (`82`, then version 1 in the low five bits).
fn thrift_message(buf: &[u8]) -> Detection {
    match buf.first() {
        Some(0x80) => pattern(buf, &[|b| b == 0x80, |b| b == 0x01], Protocol::Thrift),
        Some(0x82) => pattern(buf, &[|b| b == 0x82, |b| b & 0x1f == 1], Protocol::Thrift),
        Some(_) => Detection::NotFound,
        None => Detection::NeedMore,
    }
}

fn thrift(buf: &[u8]) -> Detection {
    match thrift_message(buf) {
        Detection::NotFound => {}
        other => return other,
    }
    // Framed: a 4-byte length (positive, under 16 MiB), then the message
    // header.
    match buf.get(..4) {
        _ if buf.first() != Some(&0) => Detection::NotFound,
        None => Detection::NeedMore,
        Some([0, 0, 0, 0]) => Detection::NotFound,
        Some(_) => thrift_message(&buf[4..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Detection::*;
    use Protocol::*;

    fn all(b: &[u8]) -> Detection {
        detect(b, ProtocolSet::ALL)
    }

    /// Every proper prefix of `b` needs more; `b` itself gives `want`.
    fn prefixes_need_more(b: &[u8], want: Detection) {
        for i in 0..b.len() {
            assert_eq!(all(&b[..i]), NeedMore, "prefix {:?}", &b[..i]);
        }
        assert_eq!(all(b), want, "{b:?}");
    }

    #[test]
    fn http_request_lines() {
        prefixes_need_more(b"GET /index.html HTTP/1.1\r\n", Found(Http11));
        prefixes_need_more(b"POST /x HTTP/1.0\n", Found(Http10));
        assert_eq!(all(b"GET / HTTP/2.0\r\n"), Found(Http10));
        assert_eq!(all(b"GET / HTTP/1.1\r"), NeedMore);
        assert_eq!(
            all(b"CUSTOM-METHOD * HTTP/1.1\r\nhost: x\r\n"),
            Found(Http11)
        );
    }

    #[test]
    fn h2_preface() {
        prefixes_need_more(H2_PREFACE, Found(H2c));
        let mut b = H2_PREFACE.to_vec();
        b.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        assert_eq!(all(&b), Found(H2c));
        // `PRI` as an HTTP/1 method still reads as HTTP/1.
        assert_eq!(all(b"PRI /x HTTP/1.1\r\n"), Found(Http11));
    }

    #[test]
    fn not_http() {
        for b in [
            &b"\r\nGET / HTTP/1.1\r\n"[..],
            b" GET",
            b"GET  / HTTP/1.1\r\n",
            b"GET / HTTP/1.1 \r\n",
            b"GET / HTTX",
            b"GET / HTTP/1.1x\r\n",
            b"GET\r\n",
            b"hello world\n",
            b"GET /\x01",
            b"GET /\r\n",
            b"GET / HTTP/1.1\rx",
            b"SSH-2.0-OpenSSH_9.2\r\n",
        ] {
            assert_eq!(detect(b, ProtocolSet::HTTP), NotFound, "{b:?}");
        }
        // TLS records are not HTTP either.
        assert_eq!(all(&[0x16, 0x03, 0x01, 0x02, 0x00]), NotFound);
    }

    #[test]
    fn rpc_headers() {
        prefixes_need_more(&[0xda, 0xbb], Found(Dubbo));
        prefixes_need_more(&[0x01, 0x01, 0x00, 0x01], Found(Bolt));
        assert_eq!(all(&[0x01, 0x00, 0x00, 0x02, 0x01]), Found(Bolt));
        assert_eq!(all(&[0x80, 0x01, 0x00, 0x01]), Found(Thrift));
        assert_eq!(all(&[0x82, 0x21]), Found(Thrift));
        prefixes_need_more(&[0x00, 0x00, 0x00, 0x20, 0x80, 0x01], Found(Thrift));
        prefixes_need_more(&[0x00, 0x00, 0x01, 0x00, 0x82, 0x41], Found(Thrift));
    }

    #[test]
    fn not_rpc() {
        for b in [
            &[0xda, 0xbc][..],
            &[0x01, 0x03],
            &[0x01, 0x01, 0x01],
            &[0x01, 0x01, 0x00, 0x03],
            &[0x80, 0x02],
            &[0x82, 0x22],
            &[0x00, 0x00, 0x00, 0x00, 0x80, 0x01],
            &[0xff, 0x00, 0x00, 0x10, 0x80, 0x01],
            &[0x00, 0x00, 0x00, 0x10, 0x41],
        ] {
            assert_eq!(all(b), NotFound, "{b:02x?}");
        }
        assert_eq!(
            detect(b"GET / HTTP/1.1\r\n", ProtocolSet::RPC),
            NotFound,
            "RPC only"
        );
        assert_eq!(detect(&[0xda, 0xbb], ProtocolSet::HTTP), NotFound);
    }

    #[test]
    fn the_set_limits_what_is_waited_for() {
        // Four bytes may start a framed Thrift message, but not for HTTP.
        assert_eq!(detect(&[0, 0, 0, 9], ProtocolSet::ALL), NeedMore);
        assert_eq!(detect(&[0, 0, 0, 9], ProtocolSet::HTTP), NotFound);
        assert_eq!(detect(b"GET", ProtocolSet::RPC), NotFound);
        assert_eq!(detect(b"GET", ProtocolSet::HTTP), NeedMore);
    }

    #[test]
    fn names_are_envoys() {
        let names: Vec<_> = Protocol::ALL.iter().map(|p| p.name()).collect();
        assert_eq!(
            names,
            ["http/1.0", "http/1.1", "h2c", "dubbo", "bolt", "thrift"]
        );
    }
}
