//! The Thrift header transport (Apache Thrift's `THeaderTransport`,
//! Envoy's `transport: HEADER`).
//!
//! ```text
//! u32 frame length (not counting itself)
//! u16 magic 0x0fff | u16 flags | i32 sequence id | u16 header length / 4
//! header: varint protocol id (0 binary, 2 compact)
//!         varint transform count, varint transform ids
//!         info blocks: varint 1 (key/value), varint count,
//!                      count x (varint length, key, varint length, value)
//!         zero padding to the header length
//! payload: one binary or compact message
//! ```
//!
//! The key/value info headers become [`Metadata::headers`](super::super::Metadata)
//! (routes match them with `headers`) and are written back from there, so a
//! route's header changes reach the upstream. The sequence id in the frame
//! header follows the message's, so rewriting the message id rewrites both.
//! Transforms (zlib, hmac, snappy) are refused: a call that uses one is
//! answered with a `TApplicationException` and the connection closed, as
//! Envoy does. Unknown info blocks end the info headers (Apache Thrift and
//! Envoy ignore them too).

use bytes::{BufMut, BytesMut};

use super::{
    app_exception, exception, put_varint, read_header, wire_of, Codec, DecodeError, Message,
    MessageKind, PResult, ParseError, Protocol, Reader, Thrift, Transport, HEADER_WIRE,
};

/// The header transport's magic, the two bytes after the frame length.
pub const MAGIC: [u8; 2] = [0x0f, 0xff];

/// Frame length, magic, flags, sequence id and header length.
const FIXED: usize = 14;

/// The most header bytes the 16-bit length (in words of 4) can announce.
const MAX_HEADER: usize = 0xffff * 4;

const PROTOCOL_BINARY: u64 = 0;
const PROTOCOL_COMPACT: u64 = 2;
const INFO_KEY_VALUE: u64 = 1;

/// The frame header fields after the magic.
struct Fixed {
    flags: u16,
    seqid: i32,
}

/// Decodes one header transport frame from `src`.
pub(super) fn decode(
    codec: &Thrift,
    src: &mut BytesMut,
    max_frame: usize,
) -> Result<Option<Message>, DecodeError> {
    if src.len() < FIXED {
        return Ok(None);
    }
    let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
    if len > max_frame {
        return Err(DecodeError::too_large(len, max_frame));
    }
    if src[4..6] != MAGIC {
        return Err(DecodeError::new(format!(
            "thrift: header transport magic is {:02x}{:02x}, not 0fff",
            src[4], src[5]
        )));
    }
    let fixed = Fixed {
        flags: u16::from_be_bytes([src[6], src[7]]),
        seqid: i32::from_be_bytes([src[8], src[9], src[10], src[11]]),
    };
    let header_len = usize::from(u16::from_be_bytes([src[12], src[13]])) * 4;
    if header_len == 0 {
        return Err(DecodeError::new(
            "thrift: header transport frame has no header data",
        ));
    }
    if FIXED - 4 + header_len > len {
        return Err(DecodeError::new(format!(
            "thrift: header transport header of {header_len} bytes is longer than its frame of {len}"
        )));
    }
    if src.len() < 4 + len {
        src.reserve(4 + len - src.len());
        return Ok(None);
    }
    let payload_at = FIXED + header_len;
    let info = match read_info(&src[FIXED..payload_at], len) {
        Ok(mut info) => {
            if codec.lowercase_header_keys {
                for (k, _) in &mut info.headers {
                    k.make_ascii_lowercase();
                }
            }
            info
        }
        Err(Refusal::Bad(e)) => return Err(DecodeError::new(format!("thrift: {e}"))),
        Err(Refusal::Transform(id, protocol)) => {
            let reason = format!("thrift: header transport transform {id} is not supported");
            return Err(refuse_call(codec, &fixed, protocol, reason));
        }
    };
    let mut r = Reader::new(&src[payload_at..4 + len]);
    let msg_header = match read_header(&mut r, Some(info.protocol), len) {
        Ok(h) => h,
        Err(ParseError::Short) => {
            return Err(DecodeError::new(
                "thrift: message header longer than its frame",
            ))
        }
        Err(ParseError::Bad(e)) => return Err(codec.bad(e, None, Transport::Header)),
    };
    let body_at = payload_at + r.pos;
    let frame = src.split_to(4 + len).freeze();
    let mut msg = codec.message(msg_header, Transport::Header, frame, body_at);
    msg.wire |= u32::from(fixed.flags) << 8;
    msg.meta.headers = info.headers;
    Ok(Some(msg))
}

/// What the variable header says.
struct Info {
    protocol: Protocol,
    headers: Vec<(String, String)>,
}

enum Refusal {
    /// Malformed header data.
    Bad(String),
    /// A transform: its id, and the protocol to answer in.
    Transform(u64, Protocol),
}

fn short(what: &str) -> impl Fn(ParseError) -> Refusal + '_ {
    move |e| match e {
        ParseError::Short => {
            Refusal::Bad(format!("header transport header ends inside the {what}"))
        }
        ParseError::Bad(e) => Refusal::Bad(format!("header transport {what}: {e}")),
    }
}

fn read_info(data: &[u8], max: usize) -> Result<Info, Refusal> {
    let mut r = Reader::new(data);
    let protocol = match r.varint().map_err(short("protocol id"))? {
        PROTOCOL_BINARY => Protocol::Binary,
        PROTOCOL_COMPACT => Protocol::Compact,
        other => {
            return Err(Refusal::Bad(format!(
                "header transport protocol id {other} is not binary (0) or compact (2)"
            )))
        }
    };
    let transforms = r.varint().map_err(short("transform count"))?;
    if transforms > 0 {
        let id = r.varint().map_err(short("transform id"))?;
        return Err(Refusal::Transform(id, protocol));
    }
    let mut headers = Vec::new();
    while r.remaining() > 0 {
        // 0 is padding; other info block types are skipped by ending here.
        if r.varint().map_err(short("info block type"))? != INFO_KEY_VALUE {
            break;
        }
        let n = r.varint().map_err(short("info header count"))?;
        let n = count(&mut r, n, max).map_err(short("info header count"))?;
        for _ in 0..n {
            let k = string(&mut r, max).map_err(short("info header key"))?;
            let v = string(&mut r, max).map_err(short("info header value"))?;
            headers.push((k, v));
        }
    }
    Ok(Info { protocol, headers })
}

fn count(r: &mut Reader<'_>, n: u64, max: usize) -> PResult<usize> {
    r.count(n.min(i64::MAX as u64) as i64, max)
}

fn string(r: &mut Reader<'_>, max: usize) -> PResult<String> {
    let n = r.varint()?;
    let n = count(r, n, max)?;
    let b = r.take(n)?;
    String::from_utf8(b.to_vec()).map_err(|_| ParseError::Bad("not UTF-8".into()))
}

/// The error for a frame that cannot be read, answered with an exception
/// when the frame is a call (the sequence id is in the frame header; the
/// method name is not known).
fn refuse_call(codec: &Thrift, fixed: &Fixed, protocol: Protocol, reason: String) -> DecodeError {
    let mut req = Message::new(u64::from(fixed.seqid as u32), MessageKind::Request);
    req.wire = wire_of(Transport::Header, protocol);
    let reply = exception(&req, app_exception::UNKNOWN, &reason);
    let mut out = BytesMut::new();
    codec.encode(&reply, reply.id, &mut out);
    DecodeError::new(reason).with_reply(out.freeze())
}

/// Writes the frame header after the frame length: magic, flags, sequence
/// id, and the variable header with `msg.meta.headers` as info headers.
pub(super) fn put_header(msg: &Message, seqid: u32, protocol: Protocol, dst: &mut BytesMut) {
    dst.put_slice(&MAGIC);
    dst.put_u16(((msg.wire & !HEADER_WIRE) >> 8) as u16);
    dst.put_u32(seqid);
    let len_at = dst.len();
    dst.put_u16(0);
    let start = dst.len();
    put_varint(
        dst,
        match protocol {
            Protocol::Compact => PROTOCOL_COMPACT,
            _ => PROTOCOL_BINARY,
        },
    );
    // No transforms.
    dst.put_u8(0);
    // Headers that would not fit the 16-bit header length are left out
    // (decoded frames always fit; only a route adding huge ones could).
    let fits: Vec<_> = {
        let mut total = 2 + 10;
        msg.meta
            .headers
            .iter()
            .take_while(|(k, v)| {
                total += k.len() + v.len() + 20;
                total <= MAX_HEADER
            })
            .collect()
    };
    if !fits.is_empty() {
        put_varint(dst, INFO_KEY_VALUE);
        put_varint(dst, fits.len() as u64);
        for (k, v) in fits {
            put_varint(dst, k.len() as u64);
            dst.put_slice(k.as_bytes());
            put_varint(dst, v.len() as u64);
            dst.put_slice(v.as_bytes());
        }
    }
    let pad = (4 - (dst.len() - start) % 4) % 4;
    dst.put_bytes(0, pad);
    let words = ((dst.len() - start) / 4) as u16;
    dst[len_at..len_at + 2].copy_from_slice(&words.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::ProxyError;

    /// A header transport call as Apache Thrift's Python `THeaderTransport`
    /// writes it.
    fn frame(protocol_id: u8, transforms: &[u8], headers: &[(&str, &str)], msg: &[u8]) -> Vec<u8> {
        let mut h = vec![protocol_id, transforms.len() as u8];
        h.extend_from_slice(transforms);
        if !headers.is_empty() {
            h.push(1);
            h.push(headers.len() as u8);
            for (k, v) in headers {
                h.push(k.len() as u8);
                h.extend_from_slice(k.as_bytes());
                h.push(v.len() as u8);
                h.extend_from_slice(v.as_bytes());
            }
        }
        while h.len() % 4 != 0 {
            h.push(0);
        }
        let mut out = Vec::new();
        out.extend_from_slice(&((10 + h.len() + msg.len()) as u32).to_be_bytes());
        out.extend_from_slice(&[0x0f, 0xff, 0, 0, 0, 0, 0, 42]);
        out.extend_from_slice(&((h.len() / 4) as u16).to_be_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(msg);
        out
    }

    /// A strict binary call `add` with sequence id 42 and an empty struct.
    const BINARY_CALL: &[u8] = &[0x80, 1, 0, 1, 0, 0, 0, 3, b'a', b'd', b'd', 0, 0, 0, 42, 0];
    /// The same in the compact protocol.
    const COMPACT_CALL: &[u8] = &[0x82, 0x21, 42, 3, b'a', b'd', b'd', 0];

    #[test]
    fn info_headers_are_metadata_and_round_trip_with_a_new_id() {
        let codec = Thrift::default();
        for (id, call) in [(0, BINARY_CALL), (2, COMPACT_CALL)] {
            let wire = frame(id, &[], &[("x-route", "blue"), ("Trace", "")], call);
            let mut buf = BytesMut::from(&wire[..]);
            let m = codec.decode(&mut buf, 1 << 20).unwrap().unwrap();
            assert!(buf.is_empty());
            assert_eq!((m.id, m.kind), (42, MessageKind::Request));
            assert_eq!(m.meta.method, "add");
            assert_eq!(m.meta.get("X-Route"), Some("blue"));
            assert_eq!(m.meta.headers.len(), 2);
            let mut out = BytesMut::new();
            codec.encode(&m, 42, &mut out);
            assert_eq!(&out[..], &wire[..], "protocol {id}");
            // A rewritten id changes the frame header and the message.
            let mut out = BytesMut::new();
            codec.encode(&m, 7, &mut out);
            let back = codec.decode(&mut out, 1 << 20).unwrap().unwrap();
            assert_eq!(back.id, 7);
            assert_eq!(back.meta, m.meta);
            let mut again = BytesMut::new();
            codec.encode(&back, 7, &mut again);
            assert_eq!(&again[8..12], &7u32.to_be_bytes());
        }
    }

    #[test]
    fn partial_frames_wait_and_lying_lengths_are_refused() {
        let codec = Thrift::default();
        let wire = frame(0, &[], &[("k", "v")], BINARY_CALL);
        for cut in 0..wire.len() {
            let mut b = BytesMut::from(&wire[..cut]);
            assert!(
                codec.decode(&mut b, 1 << 20).unwrap().is_none(),
                "cut {cut}"
            );
        }
        let mut big = wire.clone();
        big[..4].copy_from_slice(&0x7fff_ffffu32.to_be_bytes());
        let e = codec
            .decode(&mut BytesMut::from(&big[..]), 1 << 20)
            .unwrap_err();
        assert!(e.reason.contains("larger than the maximum"), "{e}");
        // A header length past the frame.
        let mut long = wire.clone();
        long[12..14].copy_from_slice(&0x4000u16.to_be_bytes());
        let e = codec
            .decode(&mut BytesMut::from(&long[..]), 1 << 20)
            .unwrap_err();
        assert!(e.reason.contains("longer than its frame"), "{e}");
        // A header count larger than the frame.
        let mut lying = frame(0, &[], &[("k", "v")], BINARY_CALL);
        lying[17] = 0x7f;
        let e = codec
            .decode(&mut BytesMut::from(&lying[..]), 1 << 20)
            .unwrap_err();
        assert!(e.reason.contains("header transport"), "{e}");
        // Configured header transport refuses other framings.
        let header_only = Thrift {
            transport: Some(Transport::Header),
            ..Thrift::default()
        };
        let mut framed = BytesMut::from(&[0, 0, 0, 16][..]);
        framed.extend_from_slice(BINARY_CALL);
        let e = header_only.decode(&mut framed, 1 << 20).unwrap_err();
        assert!(e.reason.contains("magic"), "{e}");
    }

    #[test]
    fn transforms_and_unknown_protocols_get_a_clear_error() {
        let codec = Thrift::default();
        let zlib = frame(0, &[1], &[], BINARY_CALL);
        let e = codec
            .decode(&mut BytesMut::from(&zlib[..]), 1 << 20)
            .unwrap_err();
        assert!(e.reason.contains("transform 1 is not supported"), "{e}");
        let mut reply = BytesMut::from(&e.reply.expect("an exception reply")[..]);
        let r = codec.decode(&mut reply, 1 << 20).unwrap().unwrap();
        assert_eq!((r.id, r.kind), (42, MessageKind::Error));
        let (text, _) = super::super::read_exception(&r).unwrap();
        assert!(text.contains("transform 1"), "{text}");
        let json = frame(1, &[], &[], BINARY_CALL);
        let e = codec
            .decode(&mut BytesMut::from(&json[..]), 1 << 20)
            .unwrap_err();
        assert!(e.reason.contains("protocol id 1"), "{e}");
    }

    #[test]
    fn proxy_errors_go_back_in_the_header_transport() {
        let codec = Thrift::default();
        let wire = frame(2, &[], &[("k", "v")], COMPACT_CALL);
        let req = codec
            .decode(&mut BytesMut::from(&wire[..]), 1 << 20)
            .unwrap()
            .unwrap();
        let e = codec
            .error_reply(&req, ProxyError::NoRoute, "no route")
            .unwrap();
        let mut out = BytesMut::new();
        codec.encode(&e, e.id, &mut out);
        assert_eq!(&out[4..6], &MAGIC);
        let back = codec.decode(&mut out, 1 << 20).unwrap().unwrap();
        assert_eq!((back.id, back.kind), (42, MessageKind::Error));
        assert_eq!(
            wire_format_of(&back),
            (Transport::Header, Protocol::Compact)
        );
    }

    #[test]
    fn keys_keep_their_case_unless_lower_casing_is_asked() {
        let wire = frame(0, &[], &[("X-Trace", "T")], BINARY_CALL);
        let keep = Thrift::default();
        let m = keep
            .decode(&mut BytesMut::from(&wire[..]), 1 << 20)
            .unwrap()
            .unwrap();
        assert_eq!(m.meta.headers, vec![("X-Trace".into(), "T".into())]);
        let lower = Thrift {
            lowercase_header_keys: true,
            ..Thrift::default()
        };
        let m = lower
            .decode(&mut BytesMut::from(&wire[..]), 1 << 20)
            .unwrap()
            .unwrap();
        assert_eq!(m.meta.headers, vec![("x-trace".into(), "T".into())]);
    }

    #[test]
    fn changed_headers_are_written_and_the_payload_kept() {
        let codec = Thrift::default();
        let wire = frame(0, &[], &[("a", "1")], BINARY_CALL);
        let mut m = codec
            .decode(&mut BytesMut::from(&wire[..]), 1 << 20)
            .unwrap()
            .unwrap();
        m.meta.headers = vec![("x-canary".into(), "yes".into())];
        assert!(codec.write_headers(&mut m));
        let mut out = BytesMut::new();
        codec.encode(&m, 42, &mut out);
        assert_eq!(
            &out[..],
            &frame(0, &[], &[("x-canary", "yes")], BINARY_CALL)[..]
        );
        // Binary and compact messages have nowhere to put them.
        let mut framed = BytesMut::from(&[0, 0, 0, 16][..]);
        framed.extend_from_slice(BINARY_CALL);
        let mut plain = codec.decode(&mut framed, 1 << 20).unwrap().unwrap();
        assert!(!codec.write_headers(&mut plain));
    }

    fn wire_format_of(m: &Message) -> (Transport, Protocol) {
        super::super::wire_format(m.wire)
    }
}
