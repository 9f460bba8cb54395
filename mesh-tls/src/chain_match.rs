//! Envoy's filter chain selection (`filter_chain_match`).
//!
//! The criteria are applied one after another in Envoy's order:
//! `destination_port`, `prefix_ranges` (destination IP), `server_names`,
//! `transport_protocol`, `application_protocols`,
//! `direct_source_prefix_ranges`, `source_prefix_ranges`, `source_ports`.
//! At each step, if some remaining chains name a value that matches the
//! connection, only the *most specific* of them stay (an exact server name
//! beats a wildcard, a longer wildcard beats a shorter one, a longer prefix
//! beats a shorter one); otherwise only the chains that leave the criterion
//! empty stay. A connection that leaves no chain goes to the listener's
//! default filter chain, or is closed. There is no backtracking: a chain
//! that wins on an earlier criterion and fails a later one does not let a
//! less specific chain win instead (Envoy's behaviour).

use std::net::SocketAddr;

use mesh_core::config::tls::{CidrRange, FilterChainMatch};

/// What is known about a connection when its filter chain is chosen.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionInfo<'a> {
    /// The local address it arrived on.
    pub local: SocketAddr,
    /// The peer's address.
    pub peer: SocketAddr,
    /// `tls` or `raw_buffer`.
    pub transport_protocol: &'a str,
    /// The SNI from the ClientHello, lower-cased.
    pub sni: Option<&'a str>,
    /// The ALPN protocols the client offered.
    pub alpn: &'a [String],
}

/// Chooses among a listener's filter chains.
#[derive(Debug, Clone, Default)]
pub struct FilterChainSelector {
    matches: Vec<FilterChainMatch>,
}

type Score = Option<u32>;

fn cidr_score(ranges: &[CidrRange], ip: std::net::IpAddr) -> Score {
    if ranges.is_empty() {
        return Some(0);
    }
    ranges
        .iter()
        .filter(|r| r.contains(ip))
        .map(|r| u32::from(r.prefix_len) + 1)
        .max()
}

fn server_name_score(names: &[String], sni: Option<&str>) -> Score {
    if names.is_empty() {
        return Some(0);
    }
    let sni = sni?;
    names
        .iter()
        .filter_map(|n| {
            if n == sni {
                Some(1 << 20)
            } else if let Some(suffix) = n.strip_prefix('*') {
                // `*.example.com` covers every name under example.com.
                (suffix.starts_with('.') && sni.len() > suffix.len() && sni.ends_with(suffix))
                    .then_some(suffix.len() as u32)
            } else {
                None
            }
        })
        .max()
}

impl FilterChainSelector {
    /// A selector over chains with these matches (in chain order).
    pub fn new(matches: Vec<FilterChainMatch>) -> Self {
        FilterChainSelector { matches }
    }

    /// Whether any chain needs the ClientHello (SNI, ALPN or transport
    /// protocol) to be chosen: Envoy then adds the TLS inspector itself.
    pub fn needs_inspection(&self) -> bool {
        self.matches.iter().any(|m| {
            !m.server_names.is_empty()
                || !m.transport_protocol.is_empty()
                || !m.application_protocols.is_empty()
        })
    }

    /// The index of the chain for `conn`, or `None` when no chain matches.
    pub fn select(&self, conn: &ConnectionInfo<'_>) -> Option<usize> {
        let mut cands: Vec<usize> = (0..self.matches.len()).collect();
        let criteria: [&dyn Fn(&FilterChainMatch) -> Score; 8] = [
            &|m| match m.destination_port {
                None => Some(0),
                Some(p) => (p == conn.local.port()).then_some(1),
            },
            &|m| cidr_score(&m.prefix_ranges, conn.local.ip()),
            &|m| server_name_score(&m.server_names, conn.sni),
            &|m| {
                if m.transport_protocol.is_empty() {
                    Some(0)
                } else {
                    (m.transport_protocol == conn.transport_protocol).then_some(1)
                }
            },
            &|m| {
                if m.application_protocols.is_empty() {
                    Some(0)
                } else {
                    m.application_protocols
                        .iter()
                        .any(|p| conn.alpn.contains(p))
                        .then_some(1)
                }
            },
            &|m| cidr_score(&m.direct_source_prefix_ranges, conn.peer.ip()),
            &|m| cidr_score(&m.source_prefix_ranges, conn.peer.ip()),
            &|m| {
                if m.source_ports.is_empty() {
                    Some(0)
                } else {
                    m.source_ports.contains(&conn.peer.port()).then_some(1)
                }
            },
        ];
        for score in criteria {
            let scored: Vec<(usize, u32)> = cands
                .iter()
                .filter_map(|&i| score(&self.matches[i]).map(|s| (i, s)))
                .collect();
            let best = scored.iter().map(|(_, s)| *s).max()?;
            cands = scored
                .into_iter()
                .filter(|(_, s)| *s == best)
                .map(|(i, _)| i)
                .collect();
        }
        cands.first().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn<'a>(sni: Option<&'a str>, tp: &'a str, alpn: &'a [String]) -> ConnectionInfo<'a> {
        ConnectionInfo {
            local: "10.0.0.1:443".parse().unwrap(),
            peer: "192.168.1.5:5555".parse().unwrap(),
            transport_protocol: tp,
            sni,
            alpn,
        }
    }

    fn names(n: &[&str]) -> FilterChainMatch {
        FilterChainMatch {
            server_names: n.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn exact_then_longest_wildcard_then_catch_all() {
        let s = FilterChainSelector::new(vec![
            names(&["*.example.com"]),
            names(&["api.example.com"]),
            names(&["*.b.example.com"]),
            names(&[]),
        ]);
        assert_eq!(
            s.select(&conn(Some("api.example.com"), "tls", &[])),
            Some(1)
        );
        assert_eq!(
            s.select(&conn(Some("x.b.example.com"), "tls", &[])),
            Some(2)
        );
        assert_eq!(
            s.select(&conn(Some("www.example.com"), "tls", &[])),
            Some(0)
        );
        assert_eq!(s.select(&conn(Some("example.com"), "tls", &[])), Some(3));
        assert_eq!(s.select(&conn(None, "raw_buffer", &[])), Some(3));
    }

    #[test]
    fn no_backtracking_after_a_more_specific_match() {
        // The server name picks chain 0, whose transport protocol then fails:
        // Envoy does not fall back to chain 1.
        let s = FilterChainSelector::new(vec![
            FilterChainMatch {
                server_names: vec!["a.com".into()],
                transport_protocol: "raw_buffer".into(),
                ..Default::default()
            },
            FilterChainMatch {
                transport_protocol: "tls".into(),
                ..Default::default()
            },
        ]);
        assert_eq!(s.select(&conn(Some("a.com"), "tls", &[])), None);
        assert_eq!(s.select(&conn(Some("b.com"), "tls", &[])), Some(1));
    }

    #[test]
    fn ports_prefixes_alpn_and_sources() {
        let h2 = vec!["h2".to_string()];
        let s = FilterChainSelector::new(vec![
            FilterChainMatch {
                destination_port: Some(8443),
                ..Default::default()
            },
            FilterChainMatch {
                application_protocols: vec!["h2".into()],
                source_prefix_ranges: vec![CidrRange {
                    address: "192.168.0.0".parse().unwrap(),
                    prefix_len: 16,
                }],
                ..Default::default()
            },
            FilterChainMatch {
                application_protocols: vec!["h2".into()],
                source_prefix_ranges: vec![CidrRange {
                    address: "192.168.1.0".parse().unwrap(),
                    prefix_len: 24,
                }],
                ..Default::default()
            },
            FilterChainMatch::default(),
        ]);
        assert_eq!(s.select(&conn(None, "tls", &h2)), Some(2));
        assert_eq!(s.select(&conn(None, "tls", &[])), Some(3));
        let mut c = conn(None, "tls", &[]);
        c.local = "10.0.0.1:8443".parse().unwrap();
        assert_eq!(s.select(&c), Some(0));
    }
}
