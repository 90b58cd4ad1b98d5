//! Who the client is behind reverse proxies (`api.trusted_proxies`).
//!
//! Only a peer inside a trusted network may say who it forwards for; from
//! anyone else `Forwarded` and `X-Forwarded-For` are ignored, since any
//! client can send them. Behind a chain of proxies the client is the
//! rightmost address that is not itself a trusted proxy: everything left
//! of it was written by the client and proves nothing.

use std::net::{IpAddr, SocketAddr};

use axum::http::HeaderMap;
use axum::http::header::FORWARDED;

use crate::config::ProxyNet;

/// The configured proxy networks.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<ProxyNet>);

impl TrustedProxies {
    pub fn new(nets: &[ProxyNet]) -> TrustedProxies {
        TrustedProxies(nets.to_vec())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn trusts(&self, addr: IpAddr) -> bool {
        let addr = canonical(addr);
        self.0.iter().any(|net| net.contains(addr))
    }

    /// The client's address for a request from `peer` with `headers`.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        if !self.trusts(peer) {
            return peer;
        }
        // `Forwarded` (RFC 7239) wins where a proxy sends it.
        let hops = if headers.contains_key(FORWARDED) {
            forwarded_for(headers)
        } else {
            x_forwarded_for(headers)
        };
        let mut client = peer;
        for hop in hops.iter().rev() {
            match hop {
                // An address we cannot read ("unknown", an obfuscated
                // name): the proxy that wrote it is as far as we know.
                None => return client,
                Some(addr) => {
                    client = canonical(*addr);
                    if !self.trusts(client) {
                        return client;
                    }
                }
            }
        }
        client
    }
}

/// IPv4-mapped IPv6 (`::ffff:192.0.2.1`) as the IPv4 address it is.
/// How addresses are grouped into clients for every per-client limit
/// (`api.client_prefix_v4`, `api.client_prefix_v6`): an IPv6 subscriber
/// holds a whole /64 (2^64 addresses), so counting each address on its
/// own would give it that many allowances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientPrefixes {
    v4: u8,
    v6: u8,
}

impl ClientPrefixes {
    /// Prefix lengths as validated by the configuration (larger ones are
    /// taken as the full length).
    pub fn new(v4: u8, v6: u8) -> ClientPrefixes {
        ClientPrefixes {
            v4: v4.min(32),
            v6: v6.min(128),
        }
    }

    /// The client `addr` belongs to: its network under the prefix, as an
    /// address (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn client(&self, addr: IpAddr) -> IpAddr {
        match canonical(addr) {
            IpAddr::V4(v4) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.v4)).unwrap_or(0);
                IpAddr::V4((u32::from(v4) & mask).into())
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.v6)).unwrap_or(0);
                IpAddr::V6((u128::from(v6) & mask).into())
            }
        }
    }
}

impl Default for ClientPrefixes {
    fn default() -> Self {
        ClientPrefixes::new(32, 64)
    }
}

fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

/// Every `X-Forwarded-For` value, in order, one element per hop.
fn x_forwarded_for(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    headers
        .get_all("x-forwarded-for")
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("").split(','))
        .map(|hop| parse_node(hop.trim()))
        .collect()
}

/// The `for=` of every `Forwarded` element, in order.
fn forwarded_for(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    headers
        .get_all(FORWARDED)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("").split(','))
        .map(|element| {
            element
                .split(';')
                .filter_map(|pair| pair.trim().split_once('='))
                .find(|(name, _)| name.eq_ignore_ascii_case("for"))
                .and_then(|(_, value)| parse_node(value.trim().trim_matches('"')))
        })
        .collect()
}

/// `192.0.2.1`, `192.0.2.1:4711`, `[2001:db8::1]`, `[2001:db8::1]:4711`
/// or a bare IPv6 address.
fn parse_node(text: &str) -> Option<IpAddr> {
    if let Ok(addr) = text.parse::<IpAddr>() {
        return Some(addr);
    }
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Some(addr.ip());
    }
    text.strip_prefix('[')
        .and_then(|rest| rest.split_once(']'))
        .and_then(|(inner, _)| inner.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxies(nets: &[&str]) -> TrustedProxies {
        TrustedProxies(nets.iter().map(|n| n.parse().unwrap()).collect())
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, value.parse().unwrap());
        }
        map
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn clients_are_grouped_by_prefix() {
        let prefixes = ClientPrefixes::default();
        assert_eq!(prefixes.client(ip("192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(
            prefixes.client(ip("2001:db8:1:2:aaaa::1")),
            prefixes.client(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")),
            "one /64, one client"
        );
        assert_eq!(prefixes.client(ip("2001:db8:1:2::9")), ip("2001:db8:1:2::"));
        assert_ne!(
            prefixes.client(ip("2001:db8:1:2::1")),
            prefixes.client(ip("2001:db8:1:3::1"))
        );
        assert_eq!(prefixes.client(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        let wide = ClientPrefixes::new(24, 48);
        assert_eq!(wide.client(ip("192.0.2.7")), ip("192.0.2.0"));
        assert_eq!(wide.client(ip("2001:db8:1:2::9")), ip("2001:db8:1::"));
        assert_eq!(
            ClientPrefixes::new(32, 128).client(ip("2001:db8::9")),
            ip("2001:db8::9")
        );
    }

    #[test]
    fn headers_from_an_untrusted_peer_are_ignored() {
        let p = proxies(&["10.0.0.0/8"]);
        let h = headers(&[("x-forwarded-for", "203.0.113.9")]);
        assert_eq!(p.client(ip("198.51.100.1"), &h), ip("198.51.100.1"));
        let none = TrustedProxies::default();
        assert_eq!(none.client(ip("10.0.0.1"), &h), ip("10.0.0.1"));
    }

    #[test]
    fn the_rightmost_untrusted_hop_is_the_client() {
        let p = proxies(&["10.0.0.0/8"]);
        // The client forged the first entry; the proxy appended the truth.
        let h = headers(&[("x-forwarded-for", "1.2.3.4, 203.0.113.9, 10.0.0.2")]);
        assert_eq!(p.client(ip("10.0.0.1"), &h), ip("203.0.113.9"));
        let split = headers(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-for", "203.0.113.9"),
        ]);
        assert_eq!(p.client(ip("10.0.0.1"), &split), ip("203.0.113.9"));
    }

    #[test]
    fn forwarded_is_read_and_wins() {
        let p = proxies(&["10.0.0.0/8", "::1/128"]);
        let h = headers(&[
            (
                "forwarded",
                "for=1.2.3.4, for=\"[2001:db8::7]:4711\";proto=https",
            ),
            ("x-forwarded-for", "198.51.100.50"),
        ]);
        assert_eq!(p.client(ip("::1"), &h), ip("2001:db8::7"));
        let h = headers(&[("forwarded", "for=192.0.2.60;proto=http;by=203.0.113.43")]);
        assert_eq!(p.client(ip("10.1.1.1"), &h), ip("192.0.2.60"));
    }

    #[test]
    fn unreadable_hops_and_all_trusted_chains() {
        let p = proxies(&["10.0.0.0/8"]);
        let h = headers(&[("forwarded", "for=unknown, for=10.0.0.5")]);
        assert_eq!(p.client(ip("10.0.0.1"), &h), ip("10.0.0.5"));
        let h = headers(&[("x-forwarded-for", "10.0.0.9, 10.0.0.5")]);
        assert_eq!(p.client(ip("10.0.0.1"), &h), ip("10.0.0.9"));
        assert_eq!(p.client(ip("10.0.0.1"), &HeaderMap::new()), ip("10.0.0.1"));
        let mapped = ip("::ffff:10.0.0.1");
        let h = headers(&[("x-forwarded-for", "203.0.113.9")]);
        assert_eq!(p.client(mapped, &h), ip("203.0.113.9"));
    }
}
