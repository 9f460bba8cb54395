//! Envoy's `envoy.filters.listener.tls_inspector`: reads the SNI and ALPN
//! list of a TLS ClientHello by peeking at the socket, without consuming a
//! byte, so that a filter chain can be chosen before the handshake (or the
//! bytes passed through untouched to a `tcp_proxy`).

use std::time::Duration;

use mesh_core::peek::{peek_until, PeekError};
use tokio::net::TcpStream;

/// What the first bytes of a connection say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inspection {
    /// Not a TLS ClientHello (`transport_protocol` `raw_buffer`).
    NotTls,
    /// A TLS ClientHello (`transport_protocol` `tls`).
    Tls(ClientHelloInfo),
}

/// SNI and ALPN of a ClientHello.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientHelloInfo {
    /// `server_name`, lower-cased.
    pub sni: Option<String>,
    /// `application_layer_protocol_negotiation`, in the client's order.
    pub alpn: Vec<String>,
}

/// The result of parsing a prefix of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parse {
    /// More bytes are needed to decide.
    NeedMore,
    /// Decided.
    Done(Inspection),
}

/// Largest ClientHello looked at (Envoy's tls_inspector reads at most 64 KiB).
pub const MAX_CLIENT_HELLO: usize = 64 * 1024;

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| b[0] as usize)
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2).map(|b| (b[0] as usize) << 8 | b[1] as usize)
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| (b[0] as usize) << 16 | (b[1] as usize) << 8 | b[2] as usize)
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(n)
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(n)
    }
}

/// Parses the start of a connection. Handshake records are reassembled
/// across TLS records, as a ClientHello may span several.
pub fn parse(buf: &[u8]) -> Parse {
    // Reassemble the handshake message from consecutive handshake records.
    let mut hs = Vec::new();
    let mut rest = buf;
    loop {
        if rest.is_empty() {
            return Parse::NeedMore;
        }
        if rest[0] != 0x16 {
            return Parse::Done(Inspection::NotTls);
        }
        if rest.len() < 5 {
            // Check what we can of the version before asking for more.
            if rest.len() >= 2 && rest[1] != 0x03 {
                return Parse::Done(Inspection::NotTls);
            }
            return Parse::NeedMore;
        }
        if rest[1] != 0x03 {
            return Parse::Done(Inspection::NotTls);
        }
        let len = (rest[3] as usize) << 8 | rest[4] as usize;
        if len == 0 || len > 16384 + 2048 {
            return Parse::Done(Inspection::NotTls);
        }
        if rest.len() < 5 + len {
            if buf.len() >= MAX_CLIENT_HELLO {
                return Parse::Done(Inspection::NotTls);
            }
            // Use what is there: the extensions may already be complete.
            hs.extend_from_slice(&rest[5..]);
            return match parse_handshake(&hs) {
                Some(p) => p,
                None => Parse::Done(Inspection::NotTls),
            };
        }
        hs.extend_from_slice(&rest[5..5 + len]);
        rest = &rest[5 + len..];
        match parse_handshake(&hs) {
            Some(Parse::NeedMore) => continue,
            Some(done) => return done,
            None => return Parse::Done(Inspection::NotTls),
        }
    }
}

/// `None`: not a ClientHello.
fn parse_handshake(hs: &[u8]) -> Option<Parse> {
    let mut r = Reader(hs);
    let Some(kind) = r.u8() else {
        return Some(Parse::NeedMore);
    };
    if kind != 1 {
        return None;
    }
    let Some(len) = r.u24() else {
        return Some(Parse::NeedMore);
    };
    if len > MAX_CLIENT_HELLO {
        return None;
    }
    let Some(body) = r.take(len) else {
        return Some(Parse::NeedMore);
    };
    let mut r = Reader(body);
    let info = (|| {
        r.take(2)?; // legacy_version
        r.take(32)?; // random
        r.vec8()?; // session id
        r.vec16()?; // cipher suites
        r.vec8()?; // compression methods
        let mut info = ClientHelloInfo::default();
        let Some(exts) = r.vec16() else {
            return Some(info); // no extensions
        };
        let mut e = Reader(exts);
        while !e.0.is_empty() {
            let ty = e.u16()?;
            let data = e.vec16()?;
            let mut d = Reader(data);
            match ty {
                0 => {
                    let list = d.vec16()?;
                    let mut l = Reader(list);
                    while !l.0.is_empty() {
                        let name_type = l.u8()?;
                        let name = l.vec16()?;
                        if name_type == 0 {
                            info.sni = std::str::from_utf8(name)
                                .ok()
                                .map(|s| s.to_ascii_lowercase());
                        }
                    }
                }
                16 => {
                    let list = d.vec16()?;
                    let mut l = Reader(list);
                    while !l.0.is_empty() {
                        let p = l.vec8()?;
                        info.alpn.push(String::from_utf8_lossy(p).into_owned());
                    }
                }
                _ => {}
            }
        }
        Some(info)
    })();
    Some(match info {
        Some(i) => Parse::Done(Inspection::Tls(i)),
        None => Parse::Done(Inspection::NotTls),
    })
}

/// Peeks at `stream` until the ClientHello is parsed, the bytes are
/// clearly not TLS, the peer closes, or `timeout` passes (`Err(TimedOut)`).
/// A peer that closes before sending anything is `NotTls`; one that closes
/// in the middle of a ClientHello is `Err(UnexpectedEof)`.
pub async fn peek_client_hello(
    stream: &TcpStream,
    timeout: Duration,
) -> std::io::Result<Inspection> {
    let deadline = tokio::time::Instant::now().checked_add(timeout);
    let decide = |b: &[u8]| match parse(b) {
        Parse::Done(i) => Some(i),
        Parse::NeedMore => None,
    };
    match peek_until(stream, deadline, MAX_CLIENT_HELLO, decide).await {
        Ok(i) => Ok(i),
        Err(PeekError::Closed { seen: 0 }) => Ok(Inspection::NotTls),
        Err(PeekError::Closed { .. }) => Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed in the middle of the ClientHello",
        )),
        Err(PeekError::TimedOut { seen: 0 }) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "no ClientHello in time",
        )),
        Err(PeekError::TimedOut { .. }) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "incomplete ClientHello",
        )),
        Err(PeekError::TooLarge) => Ok(Inspection::NotTls),
        Err(PeekError::Io(e)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_hello(sni: Option<&str>, alpn: &[&str]) -> Vec<u8> {
        let mut exts = Vec::new();
        if let Some(s) = sni {
            let mut list = vec![0u8];
            list.extend_from_slice(&(s.len() as u16).to_be_bytes());
            list.extend_from_slice(s.as_bytes());
            let mut data = (list.len() as u16).to_be_bytes().to_vec();
            data.extend(list);
            exts.extend_from_slice(&0u16.to_be_bytes());
            exts.extend_from_slice(&(data.len() as u16).to_be_bytes());
            exts.extend(data);
        }
        if !alpn.is_empty() {
            let mut list = Vec::new();
            for p in alpn {
                list.push(p.len() as u8);
                list.extend_from_slice(p.as_bytes());
            }
            let mut data = (list.len() as u16).to_be_bytes().to_vec();
            data.extend(list);
            exts.extend_from_slice(&16u16.to_be_bytes());
            exts.extend_from_slice(&(data.len() as u16).to_be_bytes());
            exts.extend(data);
        }
        let mut body = vec![3, 3];
        body.extend([0u8; 32]);
        body.push(0); // session id
        body.extend([0, 2, 0x13, 0x01]); // one suite
        body.extend([1, 0]); // null compression
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend(exts);
        let mut hs = vec![1];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend(body);
        let mut rec = vec![0x16, 3, 1];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend(hs);
        rec
    }

    #[test]
    fn reads_sni_and_alpn() {
        let hello = client_hello(Some("API.example.com"), &["h2", "http/1.1"]);
        assert_eq!(
            parse(&hello),
            Parse::Done(Inspection::Tls(ClientHelloInfo {
                sni: Some("api.example.com".into()),
                alpn: vec!["h2".into(), "http/1.1".into()],
            }))
        );
        // Every strict prefix asks for more (or already decides) without panicking.
        for i in 0..hello.len() {
            let p = parse(&hello[..i]);
            assert!(matches!(p, Parse::NeedMore | Parse::Done(_)), "{i}");
        }
        assert_eq!(parse(&hello[..3]), Parse::NeedMore);
    }

    #[test]
    fn plain_text_is_not_tls() {
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\n"),
            Parse::Done(Inspection::NotTls)
        );
        assert_eq!(parse(&[0x16, 0x01]), Parse::Done(Inspection::NotTls));
    }

    #[test]
    fn split_across_records() {
        let hello = client_hello(Some("a.b"), &[]);
        let hs = &hello[5..];
        let (a, b) = hs.split_at(10);
        let mut two = vec![0x16, 3, 1];
        two.extend_from_slice(&(a.len() as u16).to_be_bytes());
        two.extend_from_slice(a);
        two.extend([0x16, 3, 1]);
        two.extend_from_slice(&(b.len() as u16).to_be_bytes());
        two.extend_from_slice(b);
        assert_eq!(
            parse(&two),
            Parse::Done(Inspection::Tls(ClientHelloInfo {
                sni: Some("a.b".into()),
                alpn: vec![],
            }))
        );
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 7u64;
        for _ in 0..2000 {
            let len = (seed % 300) as usize;
            let mut v = vec![0x16, 3, 1];
            for _ in 0..len {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                v.push((seed >> 33) as u8);
            }
            let _ = parse(&v);
        }
    }
}
