//! The request hash of a route's `hash_policy`, as Envoy computes it, for
//! the ring hash and Maglev balancers.
//!
//! Each policy hashes its input with xxHash64 (seed 0): a header's value
//! (several values sorted and hashed as one), a cookie's value, the
//! downstream IP as text, or a query parameter's first value. Policies that
//! produce a hash are combined as Envoy does (`rotl(old, 1) ^ new`), and a
//! `terminal` policy that produced one ends the list. A cookie policy with a
//! `ttl` whose cookie is missing makes one up from the connection's
//! addresses and returns the `Set-Cookie` value to send back, so the client
//! sticks to the endpoint from its next request on.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};

use mesh_core::config::{HashPolicy, HashPolicyKind};
use mesh_core::view::RequestView;
use xxhash_rust::xxh64::{xxh64, Xxh64};

/// xxHash64 with seed 0, Envoy's `HashUtil::xxHash64`.
#[inline]
pub fn xxhash64(bytes: &[u8]) -> u64 {
    xxh64(bytes, 0)
}

/// The hash of a downstream IP (`connection_properties.source_ip`).
pub fn source_ip_hash(ip: IpAddr) -> u64 {
    xxhash64(ip.to_string().as_bytes())
}

/// The result of applying a route's hash policies to one request.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RequestHash {
    /// The hash, when some policy produced one.
    pub hash: Option<u64>,
    /// A `Set-Cookie` value to add to the response (a generated cookie).
    pub set_cookie: Option<String>,
}

/// Applies `policies` to a request that came over a connection from
/// `remote` to `local`.
pub fn request_hash<R: RequestView + ?Sized>(
    policies: &[HashPolicy],
    req: &R,
    remote: SocketAddr,
    local: SocketAddr,
) -> RequestHash {
    let mut out = RequestHash::default();
    for p in policies {
        let new = match &p.kind {
            HashPolicyKind::Header(name) => header_hash(req, name),
            HashPolicyKind::SourceIp => Some(source_ip_hash(remote.ip())),
            HashPolicyKind::QueryParameter(name) => {
                query_value(req.query(), name).map(|v| xxhash64(v.as_bytes()))
            }
            HashPolicyKind::Cookie { name, ttl, path } => match cookie_value(req, name) {
                Some(v) => Some(xxhash64(v.as_bytes())),
                None => match ttl {
                    Some(ttl) => {
                        let value =
                            format!("{:016x}", xxhash64(format!("{remote}{local}").as_bytes()));
                        let mut c = format!("{name}=\"{value}\"");
                        if !ttl.is_zero() {
                            c.push_str(&format!("; Max-Age={}", ttl.as_secs()));
                        }
                        if let Some(path) = path.as_deref().filter(|p| !p.is_empty()) {
                            c.push_str(&format!("; Path={path}"));
                        }
                        c.push_str("; HttpOnly");
                        out.set_cookie = Some(c);
                        Some(xxhash64(value.as_bytes()))
                    }
                    None => None,
                },
            },
        };
        if let Some(n) = new {
            out.hash = Some(match out.hash {
                Some(h) => h.rotate_left(1) ^ n,
                None => n,
            });
        }
        if p.terminal && out.hash.is_some() {
            break;
        }
    }
    out
}

fn header_hash<R: RequestView + ?Sized>(req: &R, name: &str) -> Option<u64> {
    if name.starts_with(':') {
        return req.pseudo_or_header(name).map(|v| xxhash64(v.as_bytes()));
    }
    match req.header_count(name) {
        0 => None,
        1 => req.header(name).map(|v| xxhash64(v.as_bytes())),
        _ => {
            let joined = req.header_joined(name)?;
            let mut values: Vec<&str> = joined.split(',').map(str::trim).collect();
            values.sort_unstable();
            let mut h = Xxh64::new(0);
            for v in values {
                h.update(v.as_bytes());
            }
            Some(h.digest())
        }
    }
}

/// The first value of query parameter `name` (not percent-decoded, as Envoy).
fn query_value<'q>(query: Option<&'q str>, name: &str) -> Option<&'q str> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then_some(v)
    })
}

/// The value of cookie `name`, without surrounding quotes.
fn cookie_value<R: RequestView + ?Sized>(req: &R, name: &str) -> Option<String> {
    let joined: Cow<'_, str> = req.header_joined("cookie")?;
    let multi = req.header_count("cookie") > 1;
    joined
        .split(|c| c == ';' || (multi && c == ','))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name).then(|| {
                let v = v.trim();
                v.strip_prefix('"')
                    .and_then(|x| x.strip_suffix('"'))
                    .unwrap_or(v)
                    .to_owned()
            })
        })
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn req(headers: &[(&str, &str)], uri: &str) -> http::Request<()> {
        let mut b = http::Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    fn policy(kind: HashPolicyKind, terminal: bool) -> HashPolicy {
        HashPolicy { kind, terminal }
    }

    const REMOTE: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 5555);
    const LOCAL: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 10000);

    #[test]
    fn header_query_and_source_ip() {
        let r = req(&[("x-user", "alice")], "/p?a=1&user=bob");
        let h = |k| request_hash(&[policy(k, false)], &r, REMOTE, LOCAL).hash;
        assert_eq!(
            h(HashPolicyKind::Header("x-user".into())),
            Some(xxhash64(b"alice"))
        );
        assert_eq!(h(HashPolicyKind::Header("x-none".into())), None);
        assert_eq!(
            h(HashPolicyKind::QueryParameter("user".into())),
            Some(xxhash64(b"bob"))
        );
        assert_eq!(h(HashPolicyKind::SourceIp), Some(xxhash64(b"127.0.0.1")));
    }

    #[test]
    fn combined_and_terminal() {
        let r = req(&[("x-a", "1"), ("x-b", "2")], "/");
        let a = policy(HashPolicyKind::Header("x-a".into()), false);
        let b = policy(HashPolicyKind::Header("x-b".into()), false);
        let both = request_hash(&[a.clone(), b.clone()], &r, REMOTE, LOCAL).hash;
        assert_eq!(both, Some(xxhash64(b"1").rotate_left(1) ^ xxhash64(b"2")));
        let term = policy(HashPolicyKind::Header("x-a".into()), true);
        let h = request_hash(&[term, b], &r, REMOTE, LOCAL).hash;
        assert_eq!(h, Some(xxhash64(b"1")));
    }

    #[test]
    fn cookie_read_and_generated() {
        let kind = HashPolicyKind::Cookie {
            name: "sticky".into(),
            ttl: Some(Duration::from_secs(60)),
            path: Some("/".into()),
        };
        let r = req(&[("cookie", "a=b; sticky=\"v1\"")], "/");
        let got = request_hash(&[policy(kind.clone(), false)], &r, REMOTE, LOCAL);
        assert_eq!(got.hash, Some(xxhash64(b"v1")));
        assert_eq!(got.set_cookie, None);
        let r = req(&[], "/");
        let got = request_hash(&[policy(kind, false)], &r, REMOTE, LOCAL);
        let cookie = got.set_cookie.unwrap();
        let value = format!("{:016x}", xxhash64(b"127.0.0.1:5555127.0.0.1:10000"));
        assert_eq!(
            cookie,
            format!("sticky=\"{value}\"; Max-Age=60; Path=/; HttpOnly")
        );
        assert_eq!(got.hash, Some(xxhash64(value.as_bytes())));
    }
}
