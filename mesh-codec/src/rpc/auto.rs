//! Protocol sniffing between the RPC codecs: each frame's first bytes tell
//! Dubbo, SOFA Bolt and Thrift apart ([`crate::sniff::rpc`] has the rules). The codec that decoded a
//! message is remembered in the top byte of [`Message::wire`], so the
//! message goes upstream, and errors come back, in the same protocol.

use bytes::BytesMut;

use crate::sniff::{self, Detection, Protocol};

use super::bolt::Bolt;
use super::dubbo::Dubbo;
use super::thrift::Thrift;
use super::{Codec, DecodeError, Message, ProxyError};

/// Detects Dubbo, Bolt or Thrift per frame.
#[derive(Debug, Default, Clone, Copy)]
pub struct Auto {
    thrift: Thrift,
}

const SHIFT: u32 = 24;
const DUBBO: u32 = 1;
const BOLT: u32 = 2;
const THRIFT: u32 = 3;

/// The protocol [`Auto`] detected for a message, if it decoded it.
pub fn detected(msg: &Message) -> Option<&'static str> {
    match msg.wire >> SHIFT {
        DUBBO => Some("dubbo"),
        BOLT => Some("bolt"),
        THRIFT => Some("thrift"),
        _ => None,
    }
}

impl Auto {
    fn inner(&self, which: u32) -> Option<&dyn Codec> {
        match which {
            DUBBO => Some(&Dubbo),
            BOLT => Some(&Bolt),
            THRIFT => Some(&self.thrift),
            _ => None,
        }
    }

    fn of(&self, msg: &Message) -> Option<&dyn Codec> {
        self.inner(msg.wire >> SHIFT)
    }
}

impl Codec for Auto {
    fn name(&self) -> &'static str {
        "auto"
    }

    fn decode(&self, src: &mut BytesMut, max_frame: usize) -> Result<Option<Message>, DecodeError> {
        let which = match sniff::rpc(src) {
            Detection::Found(Protocol::Dubbo) => DUBBO,
            Detection::Found(Protocol::Bolt) => BOLT,
            Detection::Found(_) => THRIFT,
            Detection::NeedMore => return Ok(None),
            Detection::NotFound => {
                return Err(DecodeError::new(format!(
                    "auto: the first bytes {:02x?} are not Dubbo, SOFA Bolt or Thrift",
                    &src[..src.len().min(6)]
                )))
            }
        };
        let Some(codec) = self.inner(which) else {
            return Ok(None);
        };
        let m = codec.decode(src, max_frame)?;
        Ok(m.map(|mut m| {
            m.wire |= which << SHIFT;
            m
        }))
    }

    fn encode(&self, msg: &Message, id: u64, dst: &mut BytesMut) {
        if let Some(c) = self.of(msg) {
            c.encode(msg, id, dst);
        }
    }

    fn write_headers(&self, msg: &mut Message) -> bool {
        match self.of(msg) {
            Some(c) => c.write_headers(msg),
            None => false,
        }
    }

    fn error_reply(&self, req: &Message, err: ProxyError, detail: &str) -> Option<Message> {
        let mut m = self.of(req)?.error_reply(req, err, detail)?;
        m.wire |= req.wire & (0xff << SHIFT);
        Some(m)
    }

    fn heartbeat_reply(&self, req: &Message) -> Option<Message> {
        let mut m = self.of(req)?.heartbeat_reply(req)?;
        m.wire |= req.wire & (0xff << SHIFT);
        Some(m)
    }

    fn max_request_id(&self) -> u64 {
        // The smallest of the three (Thrift's i32).
        i32::MAX as u64
    }

    fn multiplexes(&self) -> bool {
        // Thrift may come through: one call at a time per connection.
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::{bolt, dubbo, MessageKind};

    #[test]
    fn each_protocol_is_recognised_and_answered_in_kind() {
        let a = Auto::default();
        let mut b = dubbo::request(1, "svc", "", "m", &[], &[]);
        b.extend_from_slice(&bolt::request(2, "svc:1.0", "m", b"x"));
        let d = a.decode(&mut b, 1 << 20).unwrap().unwrap();
        assert_eq!(
            (d.meta.service.as_str(), d.kind),
            ("svc", MessageKind::Request)
        );
        let e = a.error_reply(&d, ProxyError::NoRoute, "x").unwrap();
        let mut out = BytesMut::new();
        a.encode(&e, 1, &mut out);
        assert_eq!(&out[..2], &[0xda, 0xbb]);
        let s = a.decode(&mut b, 1 << 20).unwrap().unwrap();
        assert_eq!(s.meta.version, "1.0");
        let e = a.error_reply(&s, ProxyError::NoRoute, "x").unwrap();
        let mut out = BytesMut::new();
        a.encode(&e, 2, &mut out);
        assert_eq!(&out[..2], &[1, 0]);
        let mut g = BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]);
        assert!(a.decode(&mut g, 1 << 20).is_err());
    }
}
