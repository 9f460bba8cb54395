//! Apache Thrift: framed, unframed and header (`THeaderTransport`)
//! transports, binary (strict and lax) and compact protocols, multiplexed
//! service names.
//!
//! A message is `message-begin (name, type, seqid) | struct`. The proxy
//! reads the method name, type and sequence id; the argument or result
//! struct stays untouched in [`Message::body`]. On an unframed transport
//! the only way to find where a message ends is to walk its struct, which
//! [`skip_struct`] does without allocating and with a nesting limit. A
//! framed transport's length is checked against the maximum frame size
//! before any byte of the frame is buffered.
//!
//! The transport and protocol are detected per frame (like Envoy's
//! `AUTO_TRANSPORT` / `AUTO_PROTOCOL`) unless configured, and written back
//! in the form they came in ([`Message::wire`]). Proxy errors go out as a
//! `TApplicationException` (message type `EXCEPTION`).

use bytes::{BufMut, Bytes, BytesMut};

use super::{Codec, DecodeError, Message, MessageKind, ProxyError};

pub mod header;

/// A Thrift transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// A 4-byte big-endian length before each message.
    Framed,
    /// Messages back to back.
    Unframed,
    /// `THeaderTransport`: a framed transport whose frames carry a sequence
    /// id, the protocol id and key/value info headers (see [`header`]).
    Header,
}

/// A Thrift protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `TBinaryProtocol`, strict (versioned) message headers.
    Binary,
    /// `TBinaryProtocol` with old, unversioned message headers.
    LaxBinary,
    /// `TCompactProtocol`.
    Compact,
}

/// The Thrift codec. `None` fields are detected from each frame.
#[derive(Debug, Clone, Copy, Default)]
pub struct Thrift {
    /// The transport, or `None` to detect it.
    pub transport: Option<Transport>,
    /// The protocol, or `None` to detect it.
    pub protocol: Option<Protocol>,
    /// Header transport info header keys are lower-cased when read (Envoy's
    /// default, unless `header_keys_preserve_case`); `false` keeps them.
    pub lowercase_header_keys: bool,
}

// Message types.
const CALL: u8 = 1;
const REPLY: u8 = 2;
const EXCEPTION: u8 = 3;
const ONEWAY: u8 = 4;

const STRICT_VERSION: u32 = 0x8001_0000;
/// The `wire` bit of the header transport (its 16 flag bits sit above,
/// from bit 8).
const HEADER_WIRE: u32 = 8;
const COMPACT_ID: u8 = 0x82;
const COMPACT_VERSION: u8 = 1;

/// The deepest nesting of structs, lists and maps accepted.
pub const MAX_DEPTH: usize = 64;

/// `TApplicationException` types.
pub mod app_exception {
    /// `UNKNOWN`.
    pub const UNKNOWN: i32 = 0;
    /// `UNKNOWN_METHOD`.
    pub const UNKNOWN_METHOD: i32 = 1;
    /// `INTERNAL_ERROR`.
    pub const INTERNAL_ERROR: i32 = 6;
    /// `PROTOCOL_ERROR`.
    pub const PROTOCOL_ERROR: i32 = 7;
}

fn wire_of(t: Transport, p: Protocol) -> u32 {
    let t = match t {
        Transport::Framed => 1,
        Transport::Unframed => 0,
        Transport::Header => HEADER_WIRE,
    };
    let p = match p {
        Protocol::Binary => 0,
        Protocol::LaxBinary => 2,
        Protocol::Compact => 4,
    };
    t | p
}

/// The transport and protocol a message was received with.
pub fn wire_format(wire: u32) -> (Transport, Protocol) {
    let t = if wire & HEADER_WIRE != 0 {
        Transport::Header
    } else if wire & 1 == 1 {
        Transport::Framed
    } else {
        Transport::Unframed
    };
    let p = match wire & 6 {
        2 => Protocol::LaxBinary,
        4 => Protocol::Compact,
        _ => Protocol::Binary,
    };
    (t, p)
}

/// A cursor over a frame that reports running out of bytes as `Short`.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

#[derive(Debug)]
enum ParseError {
    /// More bytes are needed.
    Short,
    /// The bytes are not Thrift.
    Bad(String),
}

type PResult<T> = Result<T, ParseError>;

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn take(&mut self, n: usize) -> PResult<&'a [u8]> {
        if self.remaining() < n {
            return Err(ParseError::Short);
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> PResult<u8> {
        Ok(self.take(1)?[0])
    }
    fn i16(&mut self) -> PResult<i16> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }
    fn i32(&mut self) -> PResult<i32> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn varint(&mut self) -> PResult<u64> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let b = self.u8()?;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(ParseError::Bad("varint longer than 10 bytes".into()))
    }
    /// A length or count, checked to fit in what a frame of `max` bytes can
    /// hold (each element takes at least one byte).
    fn count(&mut self, v: i64, max: usize) -> PResult<usize> {
        if v < 0 {
            return Err(ParseError::Bad(format!("negative length {v}")));
        }
        let v = v as u64;
        if v > max as u64 {
            return Err(ParseError::Bad(format!(
                "length {v} is larger than the maximum frame of {max}"
            )));
        }
        Ok(v as usize)
    }
}

struct Header {
    name: String,
    msg_type: u8,
    seqid: i32,
    protocol: Protocol,
}

fn read_header(r: &mut Reader<'_>, protocol: Option<Protocol>, max: usize) -> PResult<Header> {
    let first = *r.buf.get(r.pos).ok_or(ParseError::Short)?;
    let protocol = match protocol {
        Some(p) => p,
        None if first == 0x80 => Protocol::Binary,
        None if first == COMPACT_ID => Protocol::Compact,
        None => Protocol::LaxBinary,
    };
    let (name, msg_type, seqid) = match protocol {
        Protocol::Binary => {
            let v = r.i32()? as u32;
            if v & 0xffff_0000 != STRICT_VERSION {
                return Err(ParseError::Bad(format!(
                    "not a strict binary message header (version word {v:#010x})"
                )));
            }
            let t = check_type((v & 0xff) as u8)?;
            let n = r.i32()?;
            let n = r.count(i64::from(n), max)?;
            let name = r.take(n)?;
            let seqid = r.i32()?;
            (name, t, seqid)
        }
        Protocol::LaxBinary => {
            let n = r.i32()?;
            let n = r.count(i64::from(n), max)?;
            let name = r.take(n)?;
            let t = check_type(r.u8()?)?;
            let seqid = r.i32()?;
            (name, t, seqid)
        }
        Protocol::Compact => {
            if r.u8()? != COMPACT_ID {
                return Err(ParseError::Bad("not a compact protocol message".into()));
            }
            let vt = r.u8()?;
            if vt & 0x1f != COMPACT_VERSION {
                return Err(ParseError::Bad(format!(
                    "compact protocol version {} is not 1",
                    vt & 0x1f
                )));
            }
            let t = check_type(vt >> 5)?;
            let seqid = r.varint()? as u32 as i32;
            let n = r.varint()?;
            let n = r.count(n.min(i64::MAX as u64) as i64, max)?;
            let name = r.take(n)?;
            (name, t, seqid)
        }
    };
    let name = std::str::from_utf8(name)
        .map_err(|_| ParseError::Bad("method name is not UTF-8".into()))?
        .to_owned();
    Ok(Header {
        name,
        msg_type,
        seqid,
        protocol,
    })
}

fn check_type(t: u8) -> PResult<u8> {
    if (CALL..=ONEWAY).contains(&t) {
        Ok(t)
    } else {
        Err(ParseError::Bad(format!("unknown message type {t}")))
    }
}

/// Skips one struct (up to and including its STOP field) in `protocol`.
fn skip_struct(r: &mut Reader<'_>, protocol: Protocol, max: usize, depth: usize) -> PResult<()> {
    if depth > MAX_DEPTH {
        return Err(ParseError::Bad("structs nested too deeply".into()));
    }
    if protocol == Protocol::Compact {
        loop {
            let b = r.u8()?;
            if b == 0 {
                return Ok(());
            }
            let t = b & 0x0f;
            if b >> 4 == 0 {
                r.varint()?;
            }
            match t {
                1 | 2 => {}
                _ => skip_compact(r, t, max, depth + 1)?,
            }
        }
    }
    loop {
        let t = r.u8()?;
        if t == 0 {
            return Ok(());
        }
        r.i16()?;
        skip_binary(r, t, max, depth + 1)?;
    }
}

fn skip_binary(r: &mut Reader<'_>, t: u8, max: usize, depth: usize) -> PResult<()> {
    if depth > MAX_DEPTH {
        return Err(ParseError::Bad("values nested too deeply".into()));
    }
    match t {
        2 | 3 => {
            r.take(1)?;
        }
        4 | 10 => {
            r.take(8)?;
        }
        6 => {
            r.take(2)?;
        }
        8 => {
            r.take(4)?;
        }
        16 => {
            r.take(16)?;
        }
        11 => {
            let n = r.i32()?;
            let n = r.count(i64::from(n), max)?;
            r.take(n)?;
        }
        12 => skip_struct(r, Protocol::Binary, max, depth + 1)?,
        13 => {
            let k = r.u8()?;
            let v = r.u8()?;
            let n = r.i32()?;
            let n = r.count(i64::from(n), max)?;
            for _ in 0..n {
                skip_binary(r, k, max, depth + 1)?;
                skip_binary(r, v, max, depth + 1)?;
            }
        }
        14 | 15 => {
            let e = r.u8()?;
            let n = r.i32()?;
            let n = r.count(i64::from(n), max)?;
            for _ in 0..n {
                skip_binary(r, e, max, depth + 1)?;
            }
        }
        _ => return Err(ParseError::Bad(format!("unknown field type {t}"))),
    }
    Ok(())
}

fn skip_compact(r: &mut Reader<'_>, t: u8, max: usize, depth: usize) -> PResult<()> {
    if depth > MAX_DEPTH {
        return Err(ParseError::Bad("values nested too deeply".into()));
    }
    match t {
        // A boolean as a list/set/map element takes one byte.
        1..=3 => {
            r.take(1)?;
        }
        4..=6 => {
            r.varint()?;
        }
        7 => {
            r.take(8)?;
        }
        13 => {
            r.take(16)?;
        }
        8 => {
            let n = r.varint()?;
            let n = r.count(n.min(i64::MAX as u64) as i64, max)?;
            r.take(n)?;
        }
        12 => skip_struct(r, Protocol::Compact, max, depth + 1)?,
        9 | 10 => {
            let h = r.u8()?;
            let mut n = u64::from(h >> 4);
            if n == 15 {
                n = r.varint()?;
            }
            let n = r.count(n.min(i64::MAX as u64) as i64, max)?;
            let e = h & 0x0f;
            for _ in 0..n {
                skip_compact(r, e, max, depth + 1)?;
            }
        }
        11 => {
            let n = r.varint()?;
            let n = r.count(n.min(i64::MAX as u64) as i64, max)?;
            if n > 0 {
                let kv = r.u8()?;
                for _ in 0..n {
                    skip_compact(r, kv >> 4, max, depth + 1)?;
                    skip_compact(r, kv & 0x0f, max, depth + 1)?;
                }
            }
        }
        _ => return Err(ParseError::Bad(format!("unknown compact type {t}"))),
    }
    Ok(())
}

/// The id of the first field of a struct (0 for a reply's success field),
/// or `None` for an empty struct.
fn first_field_id(body: &[u8], protocol: Protocol) -> Option<i16> {
    let mut r = Reader::new(body);
    match protocol {
        Protocol::Compact => {
            let b = r.u8().ok()?;
            if b == 0 {
                return None;
            }
            let delta = b >> 4;
            if delta != 0 {
                return Some(i16::from(delta));
            }
            let z = r.varint().ok()? as u32;
            Some(((z >> 1) as i32 ^ -((z & 1) as i32)) as i16)
        }
        _ => {
            let t = r.u8().ok()?;
            if t == 0 {
                return None;
            }
            r.i16().ok()
        }
    }
}

impl Thrift {
    fn message(&self, h: Header, transport: Transport, frame: Bytes, body_at: usize) -> Message {
        let kind = match h.msg_type {
            CALL => MessageKind::Request,
            ONEWAY => MessageKind::Oneway,
            EXCEPTION => MessageKind::Error,
            _ => MessageKind::Response,
        };
        let mut msg = Message::new(u64::from(h.seqid as u32), kind);
        msg.wire = wire_of(transport, h.protocol);
        msg.body = frame.slice(body_at..);
        msg.header = frame.slice(..body_at);
        if kind == MessageKind::Response {
            // A reply whose first field is not 0 carries a declared
            // exception.
            if first_field_id(&msg.body, h.protocol).is_some_and(|id| id != 0) {
                msg.status = 1;
            }
        }
        // As in Envoy, the method is the whole name ("Service:method" with
        // the multiplexed protocol) and the service is its prefix.
        if let Some((svc, _)) = h.name.split_once(':') {
            msg.meta.service = svc.to_owned();
        }
        msg.meta.method = h.name;
        msg
    }

    fn bad(&self, e: String, header: Option<&Header>, transport: Transport) -> DecodeError {
        let err = DecodeError::new(format!("thrift: {e}"));
        let Some(h) = header else {
            return err;
        };
        if h.msg_type != CALL {
            return err;
        }
        // The header parsed: answer the call with a protocol error.
        let mut req = Message::new(u64::from(h.seqid as u32), MessageKind::Request);
        req.meta.method = h.name.clone();
        req.wire = wire_of(transport, h.protocol);
        let reply = exception(&req, app_exception::PROTOCOL_ERROR, &e);
        let mut out = BytesMut::new();
        self.encode(&reply, reply.id, &mut out);
        err.with_reply(out.freeze())
    }
}

fn exception(req: &Message, kind: i32, text: &str) -> Message {
    let (_, protocol) = wire_format(req.wire);
    let mut body = BytesMut::with_capacity(text.len() + 16);
    match protocol {
        Protocol::Compact => {
            // field 1, binary (8), delta 1
            body.put_u8(0x18);
            put_varint(&mut body, text.len() as u64);
            body.put_slice(text.as_bytes());
            // field 2, i32 (5), delta 1
            body.put_u8(0x15);
            put_varint(&mut body, zigzag32(kind));
            body.put_u8(0);
        }
        _ => {
            body.put_u8(11);
            body.put_i16(1);
            body.put_i32(text.len() as i32);
            body.put_slice(text.as_bytes());
            body.put_u8(8);
            body.put_i16(2);
            body.put_i32(kind);
            body.put_u8(0);
        }
    }
    let mut m = Message::new(req.id, MessageKind::Error);
    m.meta.method = req.meta.method.clone();
    m.meta.service = req.meta.service.clone();
    m.wire = req.wire;
    m.status = kind as u32;
    m.body = body.freeze();
    m
}

fn zigzag32(v: i32) -> u64 {
    u64::from(((v << 1) ^ (v >> 31)) as u32)
}

fn put_varint(dst: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        dst.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    dst.put_u8(v as u8);
}

impl Codec for Thrift {
    fn name(&self) -> &'static str {
        "thrift"
    }

    fn decode(&self, src: &mut BytesMut, max_frame: usize) -> Result<Option<Message>, DecodeError> {
        let Some(&first) = src.first() else {
            return Ok(None);
        };
        let transport = match self.transport {
            Some(t) => t,
            None if first == 0x80 || first == COMPACT_ID => Transport::Unframed,
            None => {
                // After a frame length comes a strict or compact message
                // (`80`, `82`), a header transport magic (`0f ff`) or a lax
                // binary name length (`00`); after an unframed lax binary
                // message's name length comes the name itself.
                let (Some(&b4), Some(&b5)) = (src.get(4), src.get(5)) else {
                    return Ok(None);
                };
                match [b4, b5] {
                    header::MAGIC => Transport::Header,
                    _ if b4.is_ascii_graphic() => Transport::Unframed,
                    _ => Transport::Framed,
                }
            }
        };
        match transport {
            Transport::Header => header::decode(self, src, max_frame),
            Transport::Framed => {
                if src.len() < 4 {
                    return Ok(None);
                }
                let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
                if len > max_frame {
                    return Err(DecodeError::too_large(len, max_frame));
                }
                // Parse the header as soon as it is there, so garbage is
                // refused without waiting for a whole frame.
                let avail = &src[4..src.len().min(4 + len)];
                let mut r = Reader::new(avail);
                let header = match read_header(&mut r, self.protocol, len) {
                    Ok(h) => h,
                    Err(ParseError::Short) if avail.len() < len => return Ok(None),
                    Err(ParseError::Short) => {
                        return Err(DecodeError::new(
                            "thrift: message header longer than its frame",
                        ))
                    }
                    Err(ParseError::Bad(e)) => return Err(self.bad(e, None, transport)),
                };
                if src.len() < 4 + len {
                    src.reserve(4 + len - src.len());
                    return Ok(None);
                }
                let body_at = 4 + r.pos;
                let frame = src.split_to(4 + len).freeze();
                Ok(Some(self.message(header, transport, frame, body_at)))
            }
            Transport::Unframed => {
                let mut r = Reader::new(&src[..src.len().min(max_frame)]);
                let header = match read_header(&mut r, self.protocol, max_frame) {
                    Ok(h) => h,
                    Err(ParseError::Short) if src.len() < max_frame => return Ok(None),
                    Err(ParseError::Short) => {
                        return Err(DecodeError::too_large(src.len(), max_frame))
                    }
                    Err(ParseError::Bad(e)) => return Err(self.bad(e, None, transport)),
                };
                let body_at = r.pos;
                match skip_struct(&mut r, header.protocol, max_frame, 0) {
                    Ok(()) => {}
                    Err(ParseError::Short) if src.len() < max_frame => return Ok(None),
                    Err(ParseError::Short) => {
                        return Err(DecodeError::too_large(src.len(), max_frame))
                    }
                    Err(ParseError::Bad(e)) => {
                        return Err(self.bad(e, Some(&header), transport));
                    }
                }
                let end = r.pos;
                let frame = src.split_to(end).freeze();
                Ok(Some(self.message(header, transport, frame, body_at)))
            }
        }
    }

    fn encode(&self, msg: &Message, id: u64, dst: &mut BytesMut) {
        let (transport, protocol) = wire_format(msg.wire);
        let t = match msg.kind {
            MessageKind::Request | MessageKind::Heartbeat => CALL,
            MessageKind::Oneway => ONEWAY,
            MessageKind::Error => EXCEPTION,
            MessageKind::Response | MessageKind::HeartbeatReply => REPLY,
        };
        let seqid = id as u32;
        let name_len = msg.meta.method.len();
        let start = dst.len();
        if transport != Transport::Unframed {
            dst.put_u32(0);
        }
        if transport == Transport::Header {
            header::put_header(msg, seqid, protocol, dst);
        }
        let put_name = |dst: &mut BytesMut| dst.put_slice(msg.meta.method.as_bytes());
        match protocol {
            Protocol::Binary => {
                dst.put_u32(STRICT_VERSION | u32::from(t));
                dst.put_u32(name_len as u32);
                put_name(dst);
                dst.put_u32(seqid);
            }
            Protocol::LaxBinary => {
                dst.put_u32(name_len as u32);
                put_name(dst);
                dst.put_u8(t);
                dst.put_u32(seqid);
            }
            Protocol::Compact => {
                dst.put_u8(COMPACT_ID);
                dst.put_u8((t << 5) | COMPACT_VERSION);
                put_varint(dst, u64::from(seqid));
                put_varint(dst, name_len as u64);
                put_name(dst);
            }
        }
        dst.put_slice(&msg.body);
        if transport != Transport::Unframed {
            let len = (dst.len() - start - 4) as u32;
            dst[start..start + 4].copy_from_slice(&len.to_be_bytes());
        }
    }

    fn error_reply(&self, req: &Message, err: ProxyError, detail: &str) -> Option<Message> {
        if req.kind != MessageKind::Request {
            return None;
        }
        let kind = match err {
            ProxyError::NoRoute => app_exception::UNKNOWN_METHOD,
            ProxyError::BadRequest => app_exception::PROTOCOL_ERROR,
            _ => app_exception::INTERNAL_ERROR,
        };
        Some(exception(req, kind, detail))
    }

    fn max_request_id(&self) -> u64 {
        i32::MAX as u64
    }

    /// The header transport's info headers are written from
    /// `msg.meta.headers` by every [`Codec::encode`].
    fn write_headers(&self, msg: &mut Message) -> bool {
        wire_format(msg.wire).0 == Transport::Header
    }

    /// Thrift servers answer in order, one call at a time per connection.
    fn multiplexes(&self) -> bool {
        false
    }
}

/// Reads a `TApplicationException`'s message and type from an exception
/// message's body (for tests and logs).
pub fn read_exception(msg: &Message) -> Option<(String, i32)> {
    let (_, protocol) = wire_format(msg.wire);
    let mut r = Reader::new(&msg.body);
    let mut text = None;
    let mut kind = 0;
    let mut last_id: i16 = 0;
    loop {
        let (t, id) = match protocol {
            Protocol::Compact => {
                let b = r.u8().ok()?;
                if b == 0 {
                    break;
                }
                let id = if b >> 4 == 0 {
                    let z = r.varint().ok()? as u32;
                    ((z >> 1) as i32 ^ -((z & 1) as i32)) as i16
                } else {
                    last_id + i16::from(b >> 4)
                };
                last_id = id;
                let t = match b & 0x0f {
                    8 => 11,
                    5 => 8,
                    other => other + 100,
                };
                (t, id)
            }
            _ => {
                let t = r.u8().ok()?;
                if t == 0 {
                    break;
                }
                (t, r.i16().ok()?)
            }
        };
        match (t, id) {
            (11, 1) => {
                let n = match protocol {
                    Protocol::Compact => r.varint().ok()? as usize,
                    _ => r.i32().ok()? as usize,
                };
                text = Some(String::from_utf8_lossy(r.take(n).ok()?).into_owned());
            }
            (8, 2) => {
                kind = match protocol {
                    Protocol::Compact => {
                        let z = r.varint().ok()? as u32;
                        (z >> 1) as i32 ^ -((z & 1) as i32)
                    }
                    _ => r.i32().ok()?,
                };
            }
            _ => return None,
        }
    }
    Some((text.unwrap_or_default(), kind))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(protocol: Protocol, transport: Transport, name: &str, seqid: u32) -> BytesMut {
        let mut m = Message::new(u64::from(seqid), MessageKind::Request);
        m.meta.method = name.into();
        m.wire = wire_of(transport, protocol);
        // args struct: field 1 string "hello", STOP
        let mut body = BytesMut::new();
        match protocol {
            Protocol::Compact => {
                body.put_u8(0x18);
                body.put_u8(5);
                body.put_slice(b"hello");
                // a list<i32> of 3
                body.put_u8(0x19);
                body.put_u8(0x35);
                body.put_slice(&[2, 4, 6]);
                body.put_u8(0);
            }
            _ => {
                body.put_u8(11);
                body.put_i16(1);
                body.put_i32(5);
                body.put_slice(b"hello");
                body.put_u8(15);
                body.put_i16(2);
                body.put_u8(8);
                body.put_i32(2);
                body.put_i32(7);
                body.put_i32(8);
                body.put_u8(0);
            }
        }
        m.body = body.freeze();
        let mut out = BytesMut::new();
        Thrift::default().encode(&m, u64::from(seqid), &mut out);
        out
    }

    #[test]
    fn every_transport_and_protocol_round_trips_byte_for_byte() {
        for p in [Protocol::Binary, Protocol::LaxBinary, Protocol::Compact] {
            for t in [Transport::Framed, Transport::Unframed, Transport::Header] {
                if p == Protocol::LaxBinary && t == Transport::Header {
                    // The header transport carries binary or compact only.
                    continue;
                }
                let wire = call(p, t, "Calc:add", 300);
                let mut buf = wire.clone();
                buf.extend_from_slice(&call(p, t, "ping", 301));
                let codec = Thrift::default();
                let m = codec.decode(&mut buf, 1 << 20).unwrap().unwrap();
                assert_eq!(m.id, 300, "{p:?} {t:?}");
                assert_eq!(m.meta.service, "Calc");
                assert_eq!(m.meta.method, "Calc:add");
                assert_eq!(m.kind, MessageKind::Request);
                let mut out = BytesMut::new();
                codec.encode(&m, 300, &mut out);
                assert_eq!(out, wire, "{p:?} {t:?}");
                let m2 = codec.decode(&mut buf, 1 << 20).unwrap().unwrap();
                assert_eq!((m2.id, m2.meta.method.as_str()), (301, "ping"));
                assert!(buf.is_empty());
            }
        }
    }

    #[test]
    fn partial_frames_wait_for_more_bytes() {
        let wire = call(Protocol::Compact, Transport::Unframed, "add", 1);
        let codec = Thrift::default();
        for cut in 0..wire.len() {
            let mut b = BytesMut::from(&wire[..cut]);
            assert!(
                codec.decode(&mut b, 1 << 20).unwrap().is_none(),
                "cut {cut}"
            );
            assert_eq!(b.len(), cut);
        }
    }

    #[test]
    fn a_lying_frame_length_is_refused_before_buffering() {
        let mut b = BytesMut::from(&[0x7f, 0xff, 0xff, 0xff, 0x80, 0x01, 0, 1][..]);
        let e = Thrift::default().decode(&mut b, 1 << 20).unwrap_err();
        assert!(e.reason.contains("larger than the maximum"), "{e}");
    }

    #[test]
    fn exceptions_carry_message_and_type() {
        let wire = call(Protocol::Binary, Transport::Framed, "add", 9);
        let codec = Thrift::default();
        let req = codec.decode(&mut wire.clone(), 1 << 20).unwrap().unwrap();
        let e = codec
            .error_reply(&req, ProxyError::NoRoute, "no route for method add")
            .unwrap();
        let mut out = BytesMut::new();
        codec.encode(&e, e.id, &mut out);
        let back = codec.decode(&mut out, 1 << 20).unwrap().unwrap();
        assert_eq!(back.kind, MessageKind::Error);
        assert_eq!(back.id, 9);
        assert_eq!(
            read_exception(&back),
            Some((
                "no route for method add".into(),
                app_exception::UNKNOWN_METHOD
            ))
        );
    }

    #[test]
    fn unknown_message_types_are_refused() {
        let mut b = BytesMut::from(&[0x80, 0x01, 0x00, 0x09, 0, 0, 0, 0][..]);
        let e = Thrift::default().decode(&mut b, 1 << 20).unwrap_err();
        assert!(e.reason.contains("unknown message type 9"), "{e}");
    }
}
