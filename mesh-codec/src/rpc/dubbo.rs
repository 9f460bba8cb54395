//! Apache Dubbo's dubbo2 protocol with Hessian2 serialization.
//!
//! ```text
//! 0      2      3       4                12          16
//! | magic | flags | status | request id (i64) | body length (i32) | body
//!   0xdabb  0x80 request, 0x40 two-way, 0x20 event, low 5 bits: serialization (2 = Hessian2)
//! ```
//!
//! A request body is a Hessian2 stream: dubbo version, service path,
//! service version, method name, parameter type descriptor, the arguments
//! (one value per parameter), then the attachments map. The codec reads the
//! strings and the attachments (`group` and the rest) and skips the
//! arguments without copying them; the body is forwarded as received. A
//! response carries a status (20 = OK) and, when not OK, an error string.
//! A heartbeat is an event request with a null body, answered locally.

use bytes::{BufMut, Bytes, BytesMut};

use super::hessian::{self, Reader};
use super::{Codec, DecodeError, Message, MessageKind, ProxyError};

/// The Dubbo codec.
#[derive(Debug, Clone, Copy, Default)]
pub struct Dubbo;

/// The frame header length.
pub const HEADER_LEN: usize = 16;
const MAGIC: [u8; 2] = [0xda, 0xbb];
const FLAG_REQUEST: u8 = 0x80;
const FLAG_TWO_WAY: u8 = 0x40;
const FLAG_EVENT: u8 = 0x20;
const HESSIAN2: u8 = 2;

/// Dubbo response statuses.
pub mod status {
    /// `OK`.
    pub const OK: u8 = 20;
    /// `CLIENT_TIMEOUT`.
    pub const CLIENT_TIMEOUT: u8 = 30;
    /// `SERVER_TIMEOUT`.
    pub const SERVER_TIMEOUT: u8 = 31;
    /// `BAD_REQUEST`.
    pub const BAD_REQUEST: u8 = 40;
    /// `BAD_RESPONSE`.
    pub const BAD_RESPONSE: u8 = 50;
    /// `SERVICE_NOT_FOUND`.
    pub const SERVICE_NOT_FOUND: u8 = 60;
    /// `SERVICE_ERROR`.
    pub const SERVICE_ERROR: u8 = 70;
    /// `SERVER_ERROR`.
    pub const SERVER_ERROR: u8 = 80;
    /// `CLIENT_ERROR`.
    pub const CLIENT_ERROR: u8 = 90;
    /// `SERVER_THREADPOOL_EXHAUSTED_ERROR`.
    pub const SERVER_THREADPOOL_EXHAUSTED: u8 = 100;
}

/// How many parameters a JVM method descriptor such as
/// `Ljava/lang/String;I[B` lists.
pub fn parameter_count(desc: &str) -> Result<usize, String> {
    let b = desc.as_bytes();
    let mut i = 0;
    let mut n = 0;
    while i < b.len() {
        match b[i] {
            b'[' => {
                i += 1;
                continue;
            }
            b'Z' | b'B' | b'C' | b'D' | b'F' | b'I' | b'J' | b'S' | b'V' => i += 1,
            b'L' => match b[i..].iter().position(|&c| c == b';') {
                Some(end) => i += end + 1,
                None => return Err(format!("unterminated class in descriptor {desc:?}")),
            },
            c => return Err(format!("bad character {:?} in descriptor", c as char)),
        }
        n += 1;
    }
    Ok(n)
}

/// The error frame a proxy sends for a request id.
fn error_frame(id: u64, status: u8, text: &str) -> Message {
    let mut body = BytesMut::with_capacity(text.len() + 4);
    hessian::write_string(&mut body, text);
    let mut m = Message::new(id, MessageKind::Error);
    m.status = u32::from(status);
    let mut header = BytesMut::with_capacity(HEADER_LEN);
    header.put_slice(&MAGIC);
    header.put_u8(HESSIAN2);
    header.put_u8(status);
    header.put_u64(id);
    header.put_u32(0);
    m.header = header.freeze();
    m.body = body.freeze();
    m
}

/// Reads a request body up to its attachments: the header strings into
/// `meta`, the arguments skipped.
fn read_head(r: &mut Reader<'_>, meta: &mut super::Metadata) -> Result<(), String> {
    let e = |e: hessian::HessianError| e.to_string();
    let _dubbo_version = r.read_string().map_err(e)?;
    meta.service = r.read_string().map_err(e)?.unwrap_or_default();
    meta.version = r.read_string().map_err(e)?.unwrap_or_default();
    meta.method = r.read_string().map_err(e)?.unwrap_or_default();
    let desc = r.read_string().map_err(e)?.unwrap_or_default();
    let n = parameter_count(&desc)?;
    for _ in 0..n {
        r.skip_value(0).map_err(e)?;
    }
    Ok(())
}

fn parse_request(msg: &mut Message) -> Result<(), String> {
    let mut r = Reader::new(&msg.body);
    let e = |e: hessian::HessianError| e.to_string();
    read_head(&mut r, &mut msg.meta)?;
    if !r.is_empty() {
        msg.meta.headers = r.read_string_map().map_err(e)?;
    }
    if let Some(g) = msg.meta.get("group") {
        msg.meta.group = g.to_owned();
    }
    if msg.meta.version.is_empty() {
        if let Some(v) = msg.meta.get("version") {
            msg.meta.version = v.to_owned();
        }
    }
    Ok(())
}

impl Dubbo {
    /// `e` for a request that cannot be decoded, carrying a
    /// `BAD_REQUEST` reply to `id` when the client waits for one.
    fn refuse(&self, e: DecodeError, id: u64, two_way: bool) -> DecodeError {
        if !two_way {
            return e;
        }
        let mut out = BytesMut::new();
        self.encode(
            &error_frame(id, status::BAD_REQUEST, &e.reason),
            id,
            &mut out,
        );
        e.with_reply(out.freeze())
    }
}

impl Codec for Dubbo {
    fn name(&self) -> &'static str {
        "dubbo"
    }

    fn decode(&self, src: &mut BytesMut, max_frame: usize) -> Result<Option<Message>, DecodeError> {
        if src.len() >= 2 && src[..2] != MAGIC {
            return Err(DecodeError::new(format!(
                "dubbo: bad magic {:#04x}{:02x}",
                src[0], src[1]
            )));
        }
        if src.len() < HEADER_LEN {
            return Ok(None);
        }
        let flags = src[2];
        let status = src[3];
        let id = u64::from_be_bytes([
            src[4], src[5], src[6], src[7], src[8], src[9], src[10], src[11],
        ]);
        let len = i32::from_be_bytes([src[12], src[13], src[14], src[15]]);
        if len < 0 {
            return Err(DecodeError::new(format!(
                "dubbo: negative body length {len}"
            )));
        }
        let len = len as usize;
        if len > max_frame.saturating_sub(HEADER_LEN) {
            let e = DecodeError::too_large(len + HEADER_LEN, max_frame);
            let two_way = flags & FLAG_REQUEST != 0 && flags & FLAG_TWO_WAY != 0;
            return Err(self.refuse(e, id, two_way));
        }
        if src.len() < HEADER_LEN + len {
            src.reserve(HEADER_LEN + len - src.len());
            return Ok(None);
        }
        let frame = src.split_to(HEADER_LEN + len).freeze();
        let header = frame.slice(..HEADER_LEN);
        let body = frame.slice(HEADER_LEN..);
        let is_request = flags & FLAG_REQUEST != 0;
        let event = flags & FLAG_EVENT != 0;
        let kind = match (is_request, event, flags & FLAG_TWO_WAY != 0) {
            (true, true, _) => MessageKind::Heartbeat,
            (true, false, true) => MessageKind::Request,
            (true, false, false) => MessageKind::Oneway,
            (false, true, _) => MessageKind::HeartbeatReply,
            (false, false, _) if status == status::OK => MessageKind::Response,
            (false, false, _) => MessageKind::Error,
        };
        let mut msg = Message::new(id, kind);
        msg.header = header;
        msg.body = body;
        msg.wire = u32::from(flags);
        msg.status = u32::from(status);
        if matches!(kind, MessageKind::Request | MessageKind::Oneway) {
            let serialization = flags & 0x1f;
            let failure = if serialization != HESSIAN2 {
                Some(format!(
                    "dubbo: serialization {serialization} is not supported (only Hessian2)"
                ))
            } else {
                parse_request(&mut msg)
                    .err()
                    .map(|e| format!("dubbo: request body: {e}"))
            };
            if let Some(reason) = failure {
                let e = DecodeError::new(reason);
                return Err(self.refuse(e, id, kind == MessageKind::Request));
            }
        }
        Ok(Some(msg))
    }

    fn encode(&self, msg: &Message, id: u64, dst: &mut BytesMut) {
        dst.reserve(HEADER_LEN + msg.body.len());
        if msg.header.len() == HEADER_LEN {
            dst.put_slice(&msg.header[..4]);
        } else {
            let flags = match msg.kind {
                MessageKind::Request => FLAG_REQUEST | FLAG_TWO_WAY | HESSIAN2,
                MessageKind::Oneway => FLAG_REQUEST | HESSIAN2,
                MessageKind::Heartbeat => FLAG_REQUEST | FLAG_TWO_WAY | FLAG_EVENT | HESSIAN2,
                MessageKind::HeartbeatReply => FLAG_EVENT | HESSIAN2,
                MessageKind::Response | MessageKind::Error => HESSIAN2,
            };
            dst.put_slice(&MAGIC);
            dst.put_u8(flags);
            dst.put_u8(if msg.status == 0 {
                status::OK
            } else {
                msg.status as u8
            });
        }
        dst.put_u64(id);
        dst.put_u32(msg.body.len() as u32);
        dst.put_slice(&msg.body);
    }

    fn error_reply(&self, req: &Message, err: ProxyError, detail: &str) -> Option<Message> {
        if req.kind != MessageKind::Request {
            return None;
        }
        let status = match err {
            ProxyError::NoRoute => status::SERVICE_NOT_FOUND,
            ProxyError::Timeout => status::SERVER_TIMEOUT,
            ProxyError::Overloaded => status::SERVER_THREADPOOL_EXHAUSTED,
            ProxyError::BadRequest => status::BAD_REQUEST,
            ProxyError::UpstreamProtocol => status::BAD_RESPONSE,
            ProxyError::NoHealthyUpstream
            | ProxyError::UpstreamUnavailable
            | ProxyError::UpstreamReset => status::SERVER_ERROR,
        };
        Some(error_frame(req.id, status, detail))
    }

    /// Replaces the attachments map at the end of a request body; the
    /// header fields and arguments before it are kept byte for byte.
    fn write_headers(&self, msg: &mut Message) -> bool {
        if !matches!(msg.kind, MessageKind::Request | MessageKind::Oneway) {
            return false;
        }
        let mut r = Reader::new(&msg.body);
        if read_head(&mut r, &mut super::Metadata::default()).is_err() {
            return false;
        }
        let at = r.position();
        let mut body = BytesMut::with_capacity(msg.body.len() + 64);
        body.put_slice(&msg.body[..at]);
        hessian::write_string_map(&mut body, &msg.meta.headers);
        msg.body = body.freeze();
        true
    }

    fn heartbeat_reply(&self, req: &Message) -> Option<Message> {
        if req.wire & u32::from(FLAG_TWO_WAY) == 0 {
            return None;
        }
        let mut m = Message::new(req.id, MessageKind::HeartbeatReply);
        m.body = Bytes::from_static(b"N");
        Some(m)
    }

    fn heartbeat(&self, id: u64) -> Option<Message> {
        let mut m = Message::new(id, MessageKind::Heartbeat);
        m.body = Bytes::from_static(b"N");
        Some(m)
    }

    fn max_request_id(&self) -> u64 {
        i64::MAX as u64
    }
}

/// Reads the error text of a non-OK response (for tests and logs).
pub fn error_text(msg: &Message) -> Option<String> {
    Reader::new(&msg.body).read_string().ok().flatten()
}

/// Builds a request frame (for tests, benchmarks and examples): the
/// arguments are Hessian2 strings.
pub fn request(
    id: u64,
    service: &str,
    version: &str,
    method: &str,
    args: &[&str],
    attachments: &[(String, String)],
) -> BytesMut {
    let mut body = BytesMut::new();
    hessian::write_string(&mut body, "2.0.2");
    hessian::write_string(&mut body, service);
    hessian::write_string(&mut body, version);
    hessian::write_string(&mut body, method);
    hessian::write_string(&mut body, &"Ljava/lang/String;".repeat(args.len()));
    for a in args {
        hessian::write_string(&mut body, a);
    }
    let mut att = attachments.to_vec();
    att.push(("path".into(), service.into()));
    hessian::write_string_map(&mut body, &att);
    let mut out = BytesMut::with_capacity(HEADER_LEN + body.len());
    out.put_slice(&MAGIC);
    out.put_u8(FLAG_REQUEST | FLAG_TWO_WAY | HESSIAN2);
    out.put_u8(0);
    out.put_u64(id);
    out.put_u32(body.len() as u32);
    out.put_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_attachments_are_written_back_after_the_arguments() {
        let att = vec![("traceId".to_owned(), "t-1".to_owned())];
        let mut wire = request(
            5,
            "com.example.Greeter",
            "1.0.0",
            "sayHello",
            &["a", "b"],
            &att,
        );
        let mut req = Dubbo.decode(&mut wire, 1 << 20).unwrap().unwrap();
        let args_end = req.body.len() - {
            let mut m = BytesMut::new();
            hessian::write_string_map(&mut m, &req.meta.headers);
            m.len()
        };
        req.meta.headers.retain(|(k, _)| k != "traceId");
        req.meta.headers.push(("x-Env".into(), "canary".into()));
        assert!(Dubbo.write_headers(&mut req));
        let mut out = BytesMut::new();
        Dubbo.encode(&req, 6, &mut out);
        let back = Dubbo.decode(&mut out, 1 << 20).unwrap().unwrap();
        assert_eq!(back.id, 6);
        assert_eq!(
            (back.meta.service.as_str(), back.meta.method.as_str()),
            ("com.example.Greeter", "sayHello")
        );
        assert_eq!(back.meta.headers, req.meta.headers);
        assert_eq!(back.meta.get("traceid"), None);
        // The arguments are the same bytes.
        assert_eq!(back.body[..args_end], req.body[..args_end]);
    }

    #[test]
    fn request_header_fields_and_attachments_are_read() {
        let wire = request(
            77,
            "com.example.Greeter",
            "1.0.0",
            "sayHello",
            &["world", "again"],
            &[
                ("group".into(), "blue".into()),
                ("x-canary".into(), "1".into()),
            ],
        );
        // The first bytes are those a Dubbo client sends.
        assert_eq!(&wire[..4], &[0xda, 0xbb, 0xc2, 0x00]);
        let mut buf = wire.clone();
        let m = Dubbo.decode(&mut buf, 1 << 20).unwrap().unwrap();
        assert!(buf.is_empty());
        assert_eq!(m.kind, MessageKind::Request);
        assert_eq!(m.id, 77);
        assert_eq!(m.meta.service, "com.example.Greeter");
        assert_eq!(m.meta.version, "1.0.0");
        assert_eq!(m.meta.method, "sayHello");
        assert_eq!(m.meta.group, "blue");
        assert_eq!(m.meta.get("X-Canary"), Some("1"));
        let mut out = BytesMut::new();
        Dubbo.encode(&m, 5, &mut out);
        assert_eq!(&out[..4], &wire[..4]);
        assert_eq!(&out[4..12], &5u64.to_be_bytes());
        assert_eq!(&out[12..], &wire[12..]);
    }

    #[test]
    fn parameter_descriptors_are_counted() {
        assert_eq!(parameter_count("").unwrap(), 0);
        assert_eq!(
            parameter_count("Ljava/lang/String;I[B[[Ljava/util/Map;J").unwrap(),
            5
        );
        assert!(parameter_count("Ljava/lang").is_err());
    }

    #[test]
    fn errors_are_dubbo_responses_with_a_status() {
        let mut wire = request(3, "svc", "", "m", &[], &[]);
        let req = Dubbo.decode(&mut wire, 1 << 20).unwrap().unwrap();
        let e = Dubbo
            .error_reply(&req, ProxyError::NoRoute, "no route")
            .unwrap();
        let mut out = BytesMut::new();
        Dubbo.encode(&e, e.id, &mut out);
        assert_eq!(&out[..4], &[0xda, 0xbb, 0x02, status::SERVICE_NOT_FOUND]);
        let back = Dubbo.decode(&mut out, 1 << 20).unwrap().unwrap();
        assert_eq!(back.kind, MessageKind::Error);
        assert_eq!(back.id, 3);
        assert_eq!(error_text(&back).as_deref(), Some("no route"));
    }

    #[test]
    fn heartbeats_are_answered() {
        let mut hb = BytesMut::new();
        Dubbo.encode(&Dubbo.heartbeat(9).unwrap(), 9, &mut hb);
        let m = Dubbo.decode(&mut hb, 1 << 20).unwrap().unwrap();
        assert_eq!(m.kind, MessageKind::Heartbeat);
        let r = Dubbo.heartbeat_reply(&m).unwrap();
        let mut out = BytesMut::new();
        Dubbo.encode(&r, 9, &mut out);
        assert_eq!(&out[..4], &[0xda, 0xbb, 0x22, 20]);
    }

    #[test]
    fn oversized_and_garbage_frames_are_refused() {
        let mut b = BytesMut::from(
            &[
                0xda, 0xbb, 0xc2, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0x7f, 0xff, 0xff, 0xff,
            ][..],
        );
        let e = Dubbo.decode(&mut b, 1 << 20).unwrap_err();
        assert!(e.reply.is_some());
        let mut g = BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]);
        assert!(Dubbo.decode(&mut g, 1 << 20).is_err());
    }
}
