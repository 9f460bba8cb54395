//! SOFA Bolt protocol v1 (the transport of SOFA RPC).
//!
//! ```text
//! request  (22-byte header): proto=1 | type | cmdcode(2) | ver2 | request id(4) | codec | timeout(4)
//!                            | class len(2) | header len(2) | content len(4) | class | header | content
//! response (20-byte header): proto=1 | type=0 | cmdcode(2) | ver2 | request id(4) | codec | status(2)
//!                            | class len(2) | header len(2) | content len(4) | class | header | content
//! ```
//!
//! `type` is 1 (request), 2 (oneway) or 0 (response); `cmdcode` is 0
//! (heartbeat), 1 (RPC request) or 2 (RPC response). The header is a
//! simple map (`i32 length | bytes` for each key and value). The target
//! service comes from the `service` header (`interface:version`), the
//! method from `sofa_head_method_name`, or, for Hessian2 content, from the
//! `methodName` field of the `SofaRequest` object. The content is forwarded
//! untouched.

use bytes::{BufMut, Bytes, BytesMut};

use super::hessian::{self, Reader};
use super::{Codec, DecodeError, Message, MessageKind, ProxyError};

/// The Bolt v1 codec.
#[derive(Debug, Clone, Copy, Default)]
pub struct Bolt;

/// Request header length.
pub const REQUEST_HEADER_LEN: usize = 22;
/// Response header length.
pub const RESPONSE_HEADER_LEN: usize = 20;
const PROTOCOL_V1: u8 = 1;
const TYPE_RESPONSE: u8 = 0;
const TYPE_REQUEST: u8 = 1;
const TYPE_ONEWAY: u8 = 2;
const CMD_HEARTBEAT: u16 = 0;
const CMD_REQUEST: u16 = 1;
const CMD_RESPONSE: u16 = 2;
const HESSIAN2: u8 = 1;

/// Bolt response statuses.
pub mod status {
    /// `SUCCESS`.
    pub const SUCCESS: u16 = 0x0000;
    /// `SERVER_EXCEPTION`.
    pub const SERVER_EXCEPTION: u16 = 0x0002;
    /// `SERVER_THREADPOOL_BUSY`.
    pub const SERVER_THREADPOOL_BUSY: u16 = 0x0004;
    /// `ERROR_COMM`.
    pub const ERROR_COMM: u16 = 0x0005;
    /// `NO_PROCESSOR`.
    pub const NO_PROCESSOR: u16 = 0x0006;
    /// `TIMEOUT`.
    pub const TIMEOUT: u16 = 0x0007;
    /// `CODEC_EXCEPTION`.
    pub const CODEC_EXCEPTION: u16 = 0x0009;
    /// `CONNECTION_CLOSED`.
    pub const CONNECTION_CLOSED: u16 = 0x0010;
}

const ERROR_CLASS: &str = "com.alipay.remoting.rpc.exception.RpcServerException";

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// Parses a Bolt header map. Returns `None` when malformed.
pub fn parse_header_map(mut b: &[u8]) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let field = |b: &mut &[u8]| -> Option<String> {
        if b.len() < 4 {
            return None;
        }
        let n = i32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        *b = &b[4..];
        let n = usize::try_from(n.max(0)).ok()?;
        if b.len() < n {
            return None;
        }
        let s = String::from_utf8_lossy(&b[..n]).into_owned();
        *b = &b[n..];
        Some(s)
    };
    while !b.is_empty() {
        let k = field(&mut b)?;
        let v = field(&mut b)?;
        out.push((k, v));
    }
    Some(out)
}

/// Writes a Bolt header map.
pub fn write_header_map(dst: &mut BytesMut, entries: &[(String, String)]) {
    for (k, v) in entries {
        dst.put_u32(k.len() as u32);
        dst.put_slice(k.as_bytes());
        dst.put_u32(v.len() as u32);
        dst.put_slice(v.as_bytes());
    }
}

/// Reads `methodName` from a Hessian `SofaRequest` object: Hessian 2.0
/// (`C` class definition, `O`/`0x60` instance, as Java SOFA RPC writes it)
/// or the Hessian 3.x draft (`O` definition, `o` instance, as sofa-rpc-node
/// writes it).
fn sofa_method(content: &[u8]) -> Option<String> {
    let mut r = Reader::new(content);
    let legacy = match r.next_byte().ok()? {
        b'C' => false,
        b'O' => true,
        _ => return None,
    };
    let class = if legacy {
        let n = usize::try_from(r.read_int().ok()?).ok()?;
        String::from_utf8_lossy(r.read_raw(n).ok()?).into_owned()
    } else {
        r.read_string().ok()??
    };
    if !class.ends_with("SofaRequest") {
        return None;
    }
    let n = usize::try_from(r.read_int().ok()?).ok()?;
    let mut names = Vec::new();
    for _ in 0..n.min(64) {
        names.push(r.read_string().ok()??);
    }
    match (legacy, r.next_byte().ok()?) {
        (false, 0x60) => {}
        (false, b'O') | (true, b'o') => {
            r.read_int().ok()?;
        }
        _ => return None,
    }
    // The fields before methodName are strings or null.
    for name in &names {
        let v = r.read_string().ok()?;
        if name == "methodName" {
            return v;
        }
    }
    None
}

/// [`Message::wire`] bit: the request's content uses the Hessian 3.x draft
/// object encoding, so error replies use it too.
const WIRE_LEGACY_HESSIAN: u32 = 0x100;

impl Codec for Bolt {
    fn name(&self) -> &'static str {
        "bolt"
    }

    fn decode(&self, src: &mut BytesMut, max_frame: usize) -> Result<Option<Message>, DecodeError> {
        if src.is_empty() {
            return Ok(None);
        }
        if src[0] != PROTOCOL_V1 {
            return Err(DecodeError::new(format!(
                "bolt: unknown protocol code {}",
                src[0]
            )));
        }
        if src.len() < 2 {
            return Ok(None);
        }
        let typ = src[1];
        let hlen = match typ {
            TYPE_REQUEST | TYPE_ONEWAY => REQUEST_HEADER_LEN,
            TYPE_RESPONSE => RESPONSE_HEADER_LEN,
            t => return Err(DecodeError::new(format!("bolt: unknown command type {t}"))),
        };
        if src.len() < hlen {
            return Ok(None);
        }
        let cmd = u16_at(src, 2);
        let id = u64::from(u32_at(src, 5));
        let codec = src[9];
        let class_len = usize::from(u16_at(src, hlen - 8));
        let header_len = usize::from(u16_at(src, hlen - 6));
        let content_len = u32_at(src, hlen - 4) as usize;
        let total = hlen + class_len + header_len + content_len;
        let fail = |reason: String| -> DecodeError {
            let e = DecodeError::new(reason);
            if typ != TYPE_REQUEST {
                return e;
            }
            let mut req = Message::new(id, MessageKind::Request);
            req.wire = u32::from(codec);
            let reply = error_frame(&req, status::CODEC_EXCEPTION, &e.reason);
            let mut out = BytesMut::new();
            Bolt.encode(&reply, id, &mut out);
            e.with_reply(out.freeze())
        };
        match (typ, cmd) {
            (TYPE_REQUEST | TYPE_ONEWAY, CMD_REQUEST | CMD_HEARTBEAT) => {}
            (TYPE_RESPONSE, CMD_RESPONSE | CMD_HEARTBEAT) => {}
            _ => {
                return Err(fail(format!(
                    "bolt: unknown command code {cmd} for type {typ}"
                )))
            }
        }
        if total > max_frame {
            return Err(fail(
                DecodeError::too_large(total, max_frame).reason.into_owned(),
            ));
        }
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        let frame = src.split_to(total).freeze();
        let kind = match (typ, cmd) {
            (TYPE_RESPONSE, CMD_HEARTBEAT) => MessageKind::HeartbeatReply,
            (_, CMD_HEARTBEAT) => MessageKind::Heartbeat,
            (TYPE_ONEWAY, _) => MessageKind::Oneway,
            (TYPE_REQUEST, _) => MessageKind::Request,
            _ if u16_at(&frame, 10) == status::SUCCESS => MessageKind::Response,
            _ => MessageKind::Error,
        };
        let mut msg = Message::new(id, kind);
        msg.wire = u32::from(codec);
        let content_at = hlen + class_len + header_len;
        if frame.get(content_at) == Some(&b'O') {
            msg.wire |= WIRE_LEGACY_HESSIAN;
        }
        if typ == TYPE_RESPONSE {
            msg.status = u32::from(u16_at(&frame, 10));
        }
        let header_at = hlen + class_len;
        if matches!(kind, MessageKind::Request | MessageKind::Oneway) {
            let Some(headers) = parse_header_map(&frame[header_at..header_at + header_len]) else {
                return Err(fail("bolt: malformed header map".into()));
            };
            msg.meta.headers = headers;
            let svc = msg
                .meta
                .get("service")
                .or(msg.meta.get("sofa_head_target_service"))
                .map(str::to_owned);
            if let Some(svc) = svc {
                match svc.rsplit_once(':') {
                    Some((s, v)) => {
                        msg.meta.service = s.to_owned();
                        msg.meta.version = v.to_owned();
                    }
                    None => msg.meta.service = svc.to_owned(),
                }
            }
            if let Some(m) = msg.meta.get("sofa_head_method_name") {
                msg.meta.method = m.to_owned();
            } else if codec == HESSIAN2 {
                if let Some(m) = sofa_method(&frame[header_at + header_len..]) {
                    msg.meta.method = m;
                }
            }
        }
        msg.header = frame.slice(..hlen);
        msg.body = frame.slice(hlen..);
        Ok(Some(msg))
    }

    /// Replaces a request's header map (between its class name and its
    /// content) and the header length in its fixed header.
    fn write_headers(&self, msg: &mut Message) -> bool {
        let hlen = REQUEST_HEADER_LEN;
        if !matches!(msg.kind, MessageKind::Request | MessageKind::Oneway)
            || msg.header.len() != hlen
        {
            return false;
        }
        let class_len = usize::from(u16_at(&msg.header, hlen - 8));
        let header_len = usize::from(u16_at(&msg.header, hlen - 6));
        if msg.body.len() < class_len + header_len {
            return false;
        }
        let mut map = BytesMut::new();
        write_header_map(&mut map, &msg.meta.headers);
        let Ok(new_len) = u16::try_from(map.len()) else {
            return false;
        };
        let mut header = BytesMut::from(&msg.header[..]);
        header[hlen - 6..hlen - 4].copy_from_slice(&new_len.to_be_bytes());
        let mut body = BytesMut::with_capacity(msg.body.len() + map.len());
        body.put_slice(&msg.body[..class_len]);
        body.put_slice(&map);
        body.put_slice(&msg.body[class_len + header_len..]);
        msg.header = header.freeze();
        msg.body = body.freeze();
        true
    }

    fn encode(&self, msg: &Message, id: u64, dst: &mut BytesMut) {
        dst.reserve(REQUEST_HEADER_LEN + msg.body.len());
        if msg.header.len() >= 10 {
            dst.put_slice(&msg.header[..5]);
            dst.put_u32(id as u32);
            dst.put_slice(&msg.header[9..]);
        } else {
            // Built locally: heartbeats have no class, header or content.
            let (typ, cmd) = match msg.kind {
                MessageKind::Heartbeat => (TYPE_REQUEST, CMD_HEARTBEAT),
                MessageKind::HeartbeatReply => (TYPE_RESPONSE, CMD_HEARTBEAT),
                MessageKind::Request => (TYPE_REQUEST, CMD_REQUEST),
                MessageKind::Oneway => (TYPE_ONEWAY, CMD_REQUEST),
                MessageKind::Response | MessageKind::Error => (TYPE_RESPONSE, CMD_RESPONSE),
            };
            dst.put_u8(PROTOCOL_V1);
            dst.put_u8(typ);
            dst.put_u16(cmd);
            dst.put_u8(1);
            dst.put_u32(id as u32);
            dst.put_u8(if msg.wire == 0 {
                HESSIAN2
            } else {
                msg.wire as u8
            });
            if typ == TYPE_RESPONSE {
                dst.put_u16(msg.status as u16);
            } else {
                dst.put_u32(0);
            }
            dst.put_u16(0);
            dst.put_u16(0);
            dst.put_u32(0);
        }
        dst.put_slice(&msg.body);
    }

    fn error_reply(&self, req: &Message, err: ProxyError, detail: &str) -> Option<Message> {
        if req.kind != MessageKind::Request {
            return None;
        }
        let status = match err {
            ProxyError::NoRoute => status::NO_PROCESSOR,
            ProxyError::Timeout => status::TIMEOUT,
            ProxyError::Overloaded => status::SERVER_THREADPOOL_BUSY,
            ProxyError::BadRequest | ProxyError::UpstreamProtocol => status::CODEC_EXCEPTION,
            ProxyError::UpstreamReset => status::CONNECTION_CLOSED,
            ProxyError::NoHealthyUpstream | ProxyError::UpstreamUnavailable => status::ERROR_COMM,
        };
        Some(error_frame(req, status, detail))
    }

    fn heartbeat_reply(&self, req: &Message) -> Option<Message> {
        let mut m = Message::new(req.id, MessageKind::HeartbeatReply);
        m.wire = req.wire;
        Some(m)
    }

    fn heartbeat(&self, id: u64) -> Option<Message> {
        Some(Message::new(id, MessageKind::Heartbeat))
    }

    fn max_request_id(&self) -> u64 {
        u64::from(u32::MAX)
    }
}

/// An error response: status, the error class, and an
/// `RpcServerException` whose `detailMessage` is the text (what SOFA
/// clients show as the error), in the request's Hessian dialect.
fn error_frame(req: &Message, status: u16, text: &str) -> Message {
    let codec = if req.wire & 0xff == 0 {
        HESSIAN2
    } else {
        req.wire as u8
    };
    let mut content = BytesMut::new();
    if codec == HESSIAN2 {
        if req.wire & WIRE_LEGACY_HESSIAN != 0 {
            content.put_u8(b'O');
            hessian::write_int(&mut content, ERROR_CLASS.len() as i32);
            content.put_slice(ERROR_CLASS.as_bytes());
        } else {
            content.put_u8(b'C');
            hessian::write_string(&mut content, ERROR_CLASS);
        }
        hessian::write_int(&mut content, 3);
        for f in ["detailMessage", "stackTrace", "cause"] {
            hessian::write_string(&mut content, f);
        }
        if req.wire & WIRE_LEGACY_HESSIAN != 0 {
            content.put_u8(b'o');
            hessian::write_int(&mut content, 0);
            hessian::write_string_v1(&mut content, text);
        } else {
            content.put_u8(0x60);
            hessian::write_string(&mut content, text);
        }
        hessian::write_null(&mut content);
        hessian::write_null(&mut content);
    }
    let mut header = BytesMut::with_capacity(RESPONSE_HEADER_LEN);
    header.put_u8(PROTOCOL_V1);
    header.put_u8(TYPE_RESPONSE);
    header.put_u16(CMD_RESPONSE);
    header.put_u8(1);
    header.put_u32(req.id as u32);
    header.put_u8(codec);
    header.put_u16(status);
    header.put_u16(ERROR_CLASS.len() as u16);
    header.put_u16(0);
    header.put_u32(content.len() as u32);
    let mut body = BytesMut::with_capacity(ERROR_CLASS.len() + content.len());
    body.put_slice(ERROR_CLASS.as_bytes());
    body.put_slice(&content);
    let mut m = Message::new(req.id, MessageKind::Error);
    m.status = u32::from(status);
    m.wire = req.wire;
    m.header = header.freeze();
    m.body = body.freeze();
    m
}

/// Builds a request frame (for tests, benchmarks and examples).
pub fn request(id: u32, service: &str, method: &str, content: &[u8]) -> BytesMut {
    let class = "com.alipay.sofa.rpc.core.request.SofaRequest";
    let mut header = BytesMut::new();
    write_header_map(
        &mut header,
        &[
            ("service".into(), service.into()),
            ("sofa_head_method_name".into(), method.into()),
        ],
    );
    let mut out = BytesMut::new();
    out.put_u8(PROTOCOL_V1);
    out.put_u8(TYPE_REQUEST);
    out.put_u16(CMD_REQUEST);
    out.put_u8(1);
    out.put_u32(id);
    out.put_u8(HESSIAN2);
    out.put_u32(3000);
    out.put_u16(class.len() as u16);
    out.put_u16(header.len() as u16);
    out.put_u32(content.len() as u32);
    out.put_slice(class.as_bytes());
    out.put_slice(&header);
    out.put_slice(content);
    out
}

/// Reads the error text (`detailMessage`) of an error response made by
/// [`Codec::error_reply`].
pub fn error_text(msg: &Message) -> Option<String> {
    let c = content(msg);
    let mut r = Reader::new(&c);
    match r.next_byte().ok()? {
        b'C' => {
            r.read_string().ok()??;
        }
        b'O' => {
            let n = usize::try_from(r.read_int().ok()?).ok()?;
            r.read_raw(n).ok()?;
        }
        _ => return None,
    }
    let n = r.read_int().ok()?;
    for _ in 0..n {
        r.read_string().ok()?;
    }
    match r.next_byte().ok()? {
        0x60 => {}
        _ => {
            r.read_int().ok()?;
        }
    }
    r.read_string().ok().flatten()
}

/// The content bytes of a message (after class name and header map).
pub fn content(msg: &Message) -> Bytes {
    let hlen = msg.header.len();
    if hlen < 8 {
        return Bytes::new();
    }
    let class_len = usize::from(u16_at(&msg.header, hlen - 8));
    let header_len = usize::from(u16_at(&msg.header, hlen - 6));
    msg.body
        .get(class_len + header_len..)
        .map(|_| msg.body.slice(class_len + header_len..))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_read_and_written_back() {
        let wire = request(42, "com.example.Hello:1.0", "sayHello", b"payload");
        assert_eq!(&wire[..5], &[1, 1, 0, 1, 1]);
        let mut buf = wire.clone();
        let m = Bolt.decode(&mut buf, 1 << 20).unwrap().unwrap();
        assert_eq!(m.kind, MessageKind::Request);
        assert_eq!(m.id, 42);
        assert_eq!(m.meta.service, "com.example.Hello");
        assert_eq!(m.meta.version, "1.0");
        assert_eq!(m.meta.method, "sayHello");
        assert_eq!(content(&m), Bytes::from_static(b"payload"));
        let mut out = BytesMut::new();
        Bolt.encode(&m, 42, &mut out);
        assert_eq!(out, wire);
    }

    #[test]
    fn a_changed_header_map_is_written_back_with_its_length() {
        let mut wire = request(42, "com.example.Hello:1.0", "sayHello", b"payload");
        let mut req = Bolt.decode(&mut wire, 1 << 20).unwrap().unwrap();
        req.meta
            .headers
            .retain(|(k, _)| k != "sofa_head_method_name");
        req.meta
            .headers
            .push(("x-env".into(), "canary-with-a-long-value".into()));
        assert!(Bolt.write_headers(&mut req));
        let mut out = BytesMut::new();
        Bolt.encode(&req, 9, &mut out);
        let back = Bolt.decode(&mut out, 1 << 20).unwrap().unwrap();
        assert!(out.is_empty());
        assert_eq!(back.id, 9);
        assert_eq!(back.meta.headers, req.meta.headers);
        assert_eq!(back.meta.get("x-env"), Some("canary-with-a-long-value"));
        assert!(back.body.ends_with(b"payload"));
    }

    #[test]
    fn method_comes_from_a_hessian_sofa_request() {
        let mut c = BytesMut::new();
        c.put_u8(b'C');
        hessian::write_string(&mut c, "com.alipay.sofa.rpc.core.request.SofaRequest");
        hessian::write_int(&mut c, 2);
        hessian::write_string(&mut c, "targetAppName");
        hessian::write_string(&mut c, "methodName");
        c.put_u8(0x60);
        c.put_u8(b'N');
        hessian::write_string(&mut c, "plus");
        // The Hessian 3.x draft form sofa-rpc-node writes.
        let legacy = b"O\xbccom.alipay.sofa.rpc.core.request.SofaRequest\x95\nmethodName\rmethodArgSigs\x17targetServiceUniqueName\rtargetAppName\x0crequestPropso\x90\x06whoamiN";
        assert_eq!(sofa_method(legacy).as_deref(), Some("whoami"));
        let class = "com.alipay.sofa.rpc.core.request.SofaRequest";
        let mut header = BytesMut::new();
        write_header_map(&mut header, &[("service".into(), "Calc:1.0".into())]);
        let mut wire = BytesMut::new();
        wire.put_slice(&[1, 1, 0, 1, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0]);
        wire.put_u16(class.len() as u16);
        wire.put_u16(header.len() as u16);
        wire.put_u32(c.len() as u32);
        wire.put_slice(class.as_bytes());
        wire.put_slice(&header);
        wire.put_slice(&c);
        let m = Bolt.decode(&mut wire, 1 << 20).unwrap().unwrap();
        assert_eq!(m.meta.method, "plus");
        assert_eq!(m.meta.service, "Calc");
    }

    #[test]
    fn errors_and_heartbeats() {
        let mut wire = request(7, "svc:1.0", "m", b"");
        let req = Bolt.decode(&mut wire, 1 << 20).unwrap().unwrap();
        let e = Bolt
            .error_reply(&req, ProxyError::NoRoute, "no route")
            .unwrap();
        let mut out = BytesMut::new();
        Bolt.encode(&e, 7, &mut out);
        let back = Bolt.decode(&mut out, 1 << 20).unwrap().unwrap();
        assert_eq!(back.kind, MessageKind::Error);
        assert_eq!(back.status, u32::from(status::NO_PROCESSOR));
        assert_eq!(error_text(&back).as_deref(), Some("no route"));

        let mut hb = BytesMut::new();
        Bolt.encode(&Bolt.heartbeat(5).unwrap(), 5, &mut hb);
        let m = Bolt.decode(&mut hb, 1 << 20).unwrap().unwrap();
        assert_eq!((m.kind, m.id), (MessageKind::Heartbeat, 5));
        let mut ack = BytesMut::new();
        Bolt.encode(&Bolt.heartbeat_reply(&m).unwrap(), 5, &mut ack);
        let a = Bolt.decode(&mut ack, 1 << 20).unwrap().unwrap();
        assert_eq!(a.kind, MessageKind::HeartbeatReply);
    }

    #[test]
    fn lying_lengths_are_refused_with_a_codec_error() {
        let mut b = BytesMut::from(
            &[
                1, 1, 0, 1, 1, 0, 0, 0, 9, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff,
            ][..],
        );
        let e = Bolt.decode(&mut b, 1 << 20).unwrap_err();
        assert!(e.reason.contains("larger than"), "{e}");
        assert!(e.reply.is_some());
    }
}
