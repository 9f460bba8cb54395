//! The RPC codec framework: one [`Codec`] per L7 RPC protocol, everything
//! else shared.
//!
//! Large meshes carry much of their traffic over RPC protocols (Apache
//! Dubbo, Apache Thrift, SOFA Bolt) rather than HTTP. This module lets a new
//! protocol be added as one codec of a few hundred lines: the codec turns a
//! frame into a [`Message`] (request id, [`MessageKind`], protocol-neutral
//! [`Metadata`], and the payload as untouched [`Bytes`]) and back, and
//! builds the protocol's own error reply from a [`ProxyError`]. The rest —
//! partial frames, pipelining, many requests in flight per downstream
//! connection ([`server`]), upstream connections multiplexed by rewritten
//! request ids ([`client`]), routing through
//! [`RequestView`](mesh_core::view::RequestView) — is written once here and
//! in the proxy.
//!
//! Codecs: [`thrift`] (framed/unframed, binary/compact), [`dubbo`] (dubbo2
//! with Hessian2 header fields and attachments, see [`hessian`]) and
//! [`bolt`] (SOFA Bolt v1); [`auto`] tells them apart per frame.
//!
//! # Writing a codec
//!
//! A codec implements four functions. `decode` looks at the start of the
//! buffer: if a whole frame is there it splits it off and returns the
//! message; if not, it returns `Ok(None)` and the framework reads more.
//! Before waiting for a frame's body, a codec checks the length the header
//! announces against `max_frame` and fails if it is larger, so a header
//! that lies about its length never makes the proxy buffer more than
//! `max_frame` bytes. `encode` writes a message with a (possibly
//! rewritten) request id. `error_reply` and `heartbeat_reply` build local
//! answers.
//!
//! ```
//! use bytes::{Buf, BufMut, Bytes, BytesMut};
//! use mesh_codec::rpc::{Codec, DecodeError, Message, MessageKind, ProxyError};
//!
//! /// `u32 length | u32 id | u8 kind | method\n | payload`
//! struct Tiny;
//!
//! impl Codec for Tiny {
//!     fn name(&self) -> &'static str { "tiny" }
//!     fn decode(&self, src: &mut BytesMut, max_frame: usize) -> Result<Option<Message>, DecodeError> {
//!         if src.len() < 4 { return Ok(None); }
//!         let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
//!         if len > max_frame { return Err(DecodeError::too_large(len, max_frame)); }
//!         if len < 5 { return Err(DecodeError::new("frame shorter than its header")); }
//!         if src.len() < 4 + len { return Ok(None); }
//!         let mut frame = src.split_to(4 + len).freeze();
//!         frame.advance(4);
//!         let id = u64::from(frame.get_u32());
//!         let kind = if frame.get_u8() == 0 { MessageKind::Request } else { MessageKind::Response };
//!         let nl = frame.iter().position(|&b| b == b'\n').unwrap_or(frame.len());
//!         let mut msg = Message::new(id, kind);
//!         msg.meta.method = String::from_utf8_lossy(&frame[..nl]).into_owned();
//!         msg.body = frame;
//!         Ok(Some(msg))
//!     }
//!     fn encode(&self, msg: &Message, id: u64, dst: &mut BytesMut) {
//!         dst.put_u32(5 + msg.body.len() as u32);
//!         dst.put_u32(id as u32);
//!         dst.put_u8(u8::from(msg.kind != MessageKind::Request));
//!         dst.put_slice(&msg.body);
//!     }
//!     fn error_reply(&self, req: &Message, err: ProxyError, detail: &str) -> Option<Message> {
//!         let mut m = Message::new(req.id, MessageKind::Error);
//!         m.body = Bytes::from(format!("{}: {detail}\n", err.as_str()));
//!         Some(m)
//!     }
//!     fn max_request_id(&self) -> u64 { u64::from(u32::MAX) }
//! }
//!
//! let mut buf = BytesMut::from(&b"\x00\x00\x00\x08\x00\x00\x00\x07\x00hi\n"[..]);
//! let msg = Tiny.decode(&mut buf, 1024).unwrap().unwrap();
//! assert_eq!((msg.id, msg.meta.method.as_str()), (7, "hi"));
//! ```

pub mod auto;
pub mod bolt;
pub mod client;
pub mod dubbo;
pub mod hessian;
pub mod server;
pub mod thrift;

use std::borrow::Cow;

use bytes::{Bytes, BytesMut};

/// The default largest frame a codec accepts (8 MiB).
pub const DEFAULT_MAX_FRAME: usize = 8 * 1024 * 1024;

/// What a message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageKind {
    /// A request that expects a response.
    Request,
    /// A request with no response (Thrift `oneway`, Dubbo one-way, Bolt
    /// oneway).
    Oneway,
    /// A successful response.
    Response,
    /// An error response (Thrift exception, Dubbo status other than OK,
    /// Bolt status other than SUCCESS, an application exception).
    Error,
    /// A keep-alive probe that expects an answer.
    Heartbeat,
    /// The answer to a [`MessageKind::Heartbeat`].
    HeartbeatReply,
}

impl MessageKind {
    /// True for requests (with or without a response) and heartbeats: the
    /// messages a client sends.
    pub fn is_request(self) -> bool {
        matches!(
            self,
            MessageKind::Request | MessageKind::Oneway | MessageKind::Heartbeat
        )
    }
}

/// The protocol-neutral description of a request: what routing, hashing,
/// filters and stats read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    /// The service or interface (Dubbo service path, Thrift multiplexed
    /// service name, Bolt target service).
    pub service: String,
    /// The method name.
    pub method: String,
    /// The service version (Dubbo `version`, Bolt's service unique name
    /// suffix), empty when the protocol has none.
    pub version: String,
    /// The service group (Dubbo `group`), empty when none.
    pub group: String,
    /// Attachments / headers, in wire order. Keys keep their case; lookups
    /// through [`Metadata::get`] ignore ASCII case.
    pub headers: Vec<(String, String)>,
}

impl Metadata {
    /// The first header / attachment named `name`, ignoring ASCII case.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The value of a metadata key as a hash policy or filter sees it: the
    /// reserved keys `:service`, `:method`, `:version`, `:group`, or any
    /// header.
    pub fn value(&self, key: &str) -> Option<&str> {
        match key {
            ":service" => Some(&self.service),
            ":method" => Some(&self.method),
            ":version" => Some(&self.version),
            ":group" => Some(&self.group),
            _ => self.get(key),
        }
    }
}

/// One decoded frame.
///
/// `header` and `body` are slices of the received frame: a codec keeps
/// what it needs to write the frame back (`encode`) without re-serialising
/// the payload. The payload is never parsed unless a codec needs a field
/// from it (Dubbo reads the service, method and attachments; the arguments
/// stay untouched).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The request id (Thrift sequence id, Dubbo/Bolt request id).
    pub id: u64,
    /// Request, response, heartbeat, ...
    pub kind: MessageKind,
    /// Service, method, version, group, attachments (requests; responses
    /// carry what their protocol has).
    pub meta: Metadata,
    /// A protocol status for responses (Dubbo status, Bolt response status,
    /// Thrift exception type); 0 when not applicable.
    pub status: u32,
    /// The frame's header as received (codec-specific).
    pub header: Bytes,
    /// The frame's payload after the header, untouched.
    pub body: Bytes,
    /// Codec-specific wire details (transport/protocol variant, flags),
    /// so a message is written back in the form it came in.
    pub wire: u32,
}

impl Message {
    /// An empty message of this kind.
    pub fn new(id: u64, kind: MessageKind) -> Self {
        Message {
            id,
            kind,
            meta: Metadata::default(),
            status: 0,
            header: Bytes::new(),
            body: Bytes::new(),
            wire: 0,
        }
    }

    /// Bytes on the wire (header plus body), for stats and access logs.
    pub fn wire_len(&self) -> usize {
        self.header.len() + self.body.len()
    }
}

/// Why the proxy, rather than the upstream, answers a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProxyError {
    /// No route matched the request.
    NoRoute,
    /// The route's cluster has no healthy endpoint.
    NoHealthyUpstream,
    /// The upstream could not be reached.
    UpstreamUnavailable,
    /// The upstream connection closed before the response.
    UpstreamReset,
    /// The route's timeout passed before the response.
    Timeout,
    /// A limit (circuit breaker, rate limit, pending requests) refused it.
    Overloaded,
    /// The upstream's answer could not be decoded.
    UpstreamProtocol,
    /// The request itself was malformed.
    BadRequest,
}

impl ProxyError {
    /// A short name, used in logs and error texts.
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyError::NoRoute => "no route",
            ProxyError::NoHealthyUpstream => "no healthy upstream",
            ProxyError::UpstreamUnavailable => "upstream unavailable",
            ProxyError::UpstreamReset => "upstream connection reset",
            ProxyError::Timeout => "upstream request timeout",
            ProxyError::Overloaded => "overloaded",
            ProxyError::UpstreamProtocol => "upstream protocol error",
            ProxyError::BadRequest => "bad request",
        }
    }
}

impl std::fmt::Display for ProxyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A frame that cannot be decoded. The byte stream cannot be trusted after
/// it, so the connection is closed, after `reply` (the protocol's error
/// answer, when the codec could build one) is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    /// Why, for the log.
    pub reason: Cow<'static, str>,
    /// An encoded error frame to send before closing, if any.
    pub reply: Option<Bytes>,
}

impl DecodeError {
    /// An error with a reason and no reply.
    pub fn new(reason: impl Into<Cow<'static, str>>) -> Self {
        DecodeError {
            reason: reason.into(),
            reply: None,
        }
    }

    /// A frame whose announced length is over `max`.
    pub fn too_large(len: usize, max: usize) -> Self {
        DecodeError::new(format!(
            "frame of {len} bytes is larger than the maximum of {max}"
        ))
    }

    /// Adds the error frame to send before closing.
    pub fn with_reply(mut self, reply: Bytes) -> Self {
        self.reply = Some(reply);
        self
    }
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::error::Error for DecodeError {}

/// One L7 RPC protocol: frames to [`Message`]s and back.
///
/// A codec is stateless and shared by every connection (wire variants that
/// are detected per connection, such as Thrift's transport and protocol,
/// are detected per frame and remembered in [`Message::wire`]). Decoders
/// must never panic on any input and never reserve more than `max_frame`
/// bytes because of a length read from the wire.
pub trait Codec: Send + Sync + 'static {
    /// The protocol's name (`dubbo`, `thrift`, `bolt`), for stats and logs.
    fn name(&self) -> &'static str;

    /// Splits one whole frame off the front of `src`. `Ok(None)`: not
    /// enough bytes yet (nothing consumed). An error means the stream is
    /// unusable and will be closed.
    fn decode(&self, src: &mut BytesMut, max_frame: usize) -> Result<Option<Message>, DecodeError>;

    /// Writes `msg` with request id `id` (the proxy rewrites ids on
    /// multiplexed upstream connections).
    fn encode(&self, msg: &Message, id: u64, dst: &mut BytesMut);

    /// The protocol's own error answer to `req` (`None` when the protocol
    /// has no way to answer, e.g. a oneway request).
    fn error_reply(&self, req: &Message, err: ProxyError, detail: &str) -> Option<Message>;

    /// The answer to a heartbeat, when the protocol has one. The default
    /// answers nothing.
    fn heartbeat_reply(&self, _req: &Message) -> Option<Message> {
        None
    }

    /// A heartbeat to probe an idle upstream connection with, if the
    /// protocol has one.
    fn heartbeat(&self, _id: u64) -> Option<Message> {
        None
    }

    /// The largest request id the protocol can carry (ids on multiplexed
    /// upstream connections wrap below it).
    fn max_request_id(&self) -> u64;

    /// Writes `msg.meta.headers` (attachments, header map) back into the
    /// frame after a route changed them, so [`Codec::encode`] sends the new
    /// ones. `false`: the protocol (or this message) has no place for
    /// them, and the frame is left as it was. The default has none.
    fn write_headers(&self, _msg: &mut Message) -> bool {
        false
    }

    /// Whether servers of this protocol answer many requests on one
    /// connection in any order (true: one upstream connection carries
    /// every request). When false, the proxy sends one request at a time
    /// per upstream connection.
    fn multiplexes(&self) -> bool {
        true
    }
}

impl std::fmt::Debug for dyn Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Codec({})", self.name())
    }
}

/// Routing reads a request as it reads an HTTP request: the method is the
/// RPC method, the path and authority are the service, headers are the
/// attachments, plus the pseudo keys `:service`, `:version` and `:group`.
impl mesh_core::view::RequestView for Message {
    fn method(&self) -> &str {
        &self.meta.method
    }
    fn path(&self) -> &str {
        &self.meta.service
    }
    fn query(&self) -> Option<&str> {
        None
    }
    fn authority(&self) -> Option<&str> {
        Some(&self.meta.service)
    }
    /// The protocol the `auto` codec detected (`dubbo`, `bolt`, `thrift`),
    /// so one listener can route each protocol to its own cluster with a
    /// `:scheme` header matcher.
    fn scheme(&self) -> Option<&str> {
        auto::detected(self)
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.meta.value(name)
    }
    fn header_count(&self, name: &str) -> usize {
        match name {
            ":service" | ":method" | ":version" | ":group" => 1,
            _ => self
                .meta
                .headers
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                .count(),
        }
    }
    fn pseudo_or_header(&self, name: &str) -> Option<Cow<'_, str>> {
        match name {
            ":path" => Some(Cow::Borrowed(&self.meta.service)),
            ":authority" => Some(Cow::Borrowed(&self.meta.service)),
            ":method" => Some(Cow::Borrowed(&self.meta.method)),
            ":scheme" => self.scheme().map(Cow::Borrowed),
            _ => self.meta.value(name).map(Cow::Borrowed),
        }
    }
}

/// Builds a codec by its configuration name (`dubbo`, `thrift`, `bolt`,
/// `auto`).
pub fn codec_by_name(name: &str) -> Option<std::sync::Arc<dyn Codec>> {
    match name {
        "dubbo" => Some(std::sync::Arc::new(dubbo::Dubbo)),
        "thrift" => Some(std::sync::Arc::new(thrift::Thrift::default())),
        "bolt" => Some(std::sync::Arc::new(bolt::Bolt)),
        "auto" => Some(std::sync::Arc::new(auto::Auto::default())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::view::RequestView;

    #[test]
    fn message_is_viewed_as_a_request() {
        let mut m = Message::new(1, MessageKind::Request);
        m.meta.service = "com.example.Greeter".into();
        m.meta.method = "sayHello".into();
        m.meta.version = "1.0".into();
        m.meta.headers.push(("X-Canary".into(), "1".into()));
        assert_eq!(RequestView::method(&m), "sayHello");
        assert_eq!(RequestView::path(&m), "com.example.Greeter");
        assert_eq!(m.header("x-canary"), Some("1"));
        assert_eq!(m.header(":version"), Some("1.0"));
        assert_eq!(m.pseudo_or_header(":method").as_deref(), Some("sayHello"));
    }
}
