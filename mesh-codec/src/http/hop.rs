//! Hop-by-hop headers (RFC 9110 section 7.6.1): a proxy removes
//! `Connection`, every header `Connection` names, and the fixed set below
//! before forwarding a message in either direction. `TE: trailers` is kept,
//! since gRPC needs it end to end. Upgrade requests keep `Connection:
//! upgrade` and `Upgrade` when the listener allows the upgrade.

use http::header::{
    HeaderMap, HeaderName, HeaderValue, CONNECTION, TE, TRANSFER_ENCODING, UPGRADE,
};

static FIXED: [&str; 4] = [
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
];

/// Removes hop-by-hop headers. When `keep_upgrade` is true, `Upgrade` and a
/// `Connection: upgrade` are kept (an upgrade being forwarded).
pub fn strip(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Common case: nothing to do.
    if !headers.contains_key(CONNECTION)
        && !headers.contains_key(TE)
        && !headers.contains_key(TRANSFER_ENCODING)
        && !headers.contains_key(UPGRADE)
        && !headers.contains_key("keep-alive")
        && !headers.contains_key("proxy-connection")
    {
        return;
    }
    let mut named: Vec<HeaderName> = Vec::new();
    for v in headers.get_all(CONNECTION) {
        if let Ok(s) = v.to_str() {
            for token in s.split(',') {
                let token = token.trim();
                if token.is_empty() || (keep_upgrade && token.eq_ignore_ascii_case("upgrade")) {
                    continue;
                }
                if let Ok(n) = HeaderName::from_bytes(token.to_ascii_lowercase().as_bytes()) {
                    named.push(n);
                }
            }
        }
    }
    for n in named {
        if n != TE {
            headers.remove(&n);
        }
    }
    headers.remove(CONNECTION);
    for name in FIXED {
        if keep_upgrade && name == "upgrade" {
            continue;
        }
        headers.remove(name);
    }
    // TE may only carry "trailers" past a proxy.
    let keep_te = headers.get_all(TE).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
    });
    headers.remove(TE);
    if keep_te {
        headers.insert(TE, HeaderValue::from_static("trailers"));
    }
    if keep_upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// The upgrade protocol a request asks for (`Connection: upgrade` plus
/// `Upgrade: X`), lower-cased.
pub fn upgrade_type(headers: &HeaderMap) -> Option<String> {
    let asks = headers.get_all(CONNECTION).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        })
    });
    if !asks {
        return None;
    }
    headers
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_named_and_fixed_headers_but_keeps_te_trailers() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, "keep-alive, x-private".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(TE, "trailers, deflate".parse().unwrap());
        h.insert("x-end-to-end", "1".parse().unwrap());
        strip(&mut h, false);
        assert!(!h.contains_key("x-private"));
        assert!(!h.contains_key(CONNECTION));
        assert!(!h.contains_key("keep-alive"));
        assert_eq!(h[TE], "trailers");
        assert!(h.contains_key("x-end-to-end"));
    }

    #[test]
    fn upgrade_is_kept_when_forwarded() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, "Upgrade".parse().unwrap());
        h.insert(UPGRADE, "websocket".parse().unwrap());
        assert_eq!(upgrade_type(&h).as_deref(), Some("websocket"));
        strip(&mut h, true);
        assert_eq!(h[CONNECTION], "upgrade");
        assert_eq!(h[UPGRADE], "websocket");
        strip(&mut h, false);
        assert!(!h.contains_key(UPGRADE));
    }
}
