//! Who is on the other end of a request. Behind a load balancer every
//! connection comes from the balancer, so the per-client rate limit, the
//! per-client connection cap and the settings endpoint's idea of its own
//! address would all describe the balancer. `--trusted-proxies` names the
//! peers whose `X-Forwarded-*` headers are believed; everyone else's are
//! ignored, since any client can write them.

use axum::http::HeaderMap;
use std::net::IpAddr;
use std::str::FromStr;

/// One network in CIDR form (`10.0.0.0/8`, `fd00::/8`), or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Cidr, String> {
        let text = text.trim();
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let network: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{text}` is not an IP address or CIDR network"))?;
        let network = canonical(network);
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{text}`: the prefix length must be 0 to {max}"))?,
        };
        Ok(Cidr { network, prefix })
    }
}

/// IPv4 peers of a dual-stack socket arrive as `::ffff:a.b.c.d`; they are
/// compared as the IPv4 addresses they are.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

impl Cidr {
    /// Whether `ip` lies in this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// The peers whose forwarding headers are believed. Empty by default: the
/// socket peer is the client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<Cidr>);

impl TrustedProxies {
    /// Parses the `--trusted-proxies` list (CIDRs or single addresses).
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<TrustedProxies, String> {
        items
            .iter()
            .map(AsRef::as_ref)
            .filter(|s| !s.trim().is_empty())
            .map(Cidr::from_str)
            .collect::<Result<Vec<_>, _>>()
            .map(TrustedProxies)
    }

    /// Whether `ip` is a trusted proxy. The per-client connection cap uses
    /// it to exempt them: a proxy carries many clients on its connections.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The client's address: the socket peer, unless the peer is trusted;
    /// then `X-Forwarded-For` read from the right, skipping trusted hops,
    /// and the first untrusted hop is the client (the hops to its left were
    /// written by the client itself and prove nothing). When every hop is
    /// trusted the leftmost is taken; when a hop is not an address, the
    /// trusted hop that reported it is.
    pub fn client_addr(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        if !self.contains(peer) {
            return peer;
        }
        let hops: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .collect();
        let mut client = peer;
        for hop in hops.iter().rev() {
            match parse_hop(hop) {
                Some(ip) => {
                    client = ip;
                    if !self.contains(ip) {
                        return ip;
                    }
                }
                None => return client,
            }
        }
        client
    }

    /// The `X-Forwarded-Host` and `X-Forwarded-Proto` a trusted peer sent
    /// (the first value of each), for building the address clients use.
    pub fn forwarded<'a>(
        &self,
        peer: IpAddr,
        headers: &'a HeaderMap,
    ) -> (Option<&'a str>, Option<&'a str>) {
        if !self.contains(peer) {
            return (None, None);
        }
        let first = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(',').next())
                .map(str::trim)
                .filter(|v| !v.is_empty())
        };
        (first("x-forwarded-host"), first("x-forwarded-proto"))
    }
}

/// One `X-Forwarded-For` entry: an address, maybe with a port
/// (`203.0.113.7:4711`, `[2001:db8::1]:443`).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Ok(sa) = hop.parse::<std::net::SocketAddr>() {
        return Some(canonical(sa.ip()));
    }
    let inner = hop.strip_prefix('[')?.strip_suffix(']')?;
    inner.parse::<IpAddr>().ok().map(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn cidrs_parse_and_match() {
        let t = TrustedProxies::parse(&["10.0.0.0/8", " 192.168.1.5 ", "fd00::/8", ""]).unwrap();
        assert!(t.contains(ip("10.200.3.4")));
        assert!(!t.contains(ip("11.0.0.1")));
        assert!(t.contains(ip("192.168.1.5")));
        assert!(!t.contains(ip("192.168.1.6")));
        assert!(t.contains(ip("fd12::1")));
        assert!(!t.contains(ip("fe80::1")));
        // A v4 peer seen through a dual-stack socket.
        assert!(t.contains(ip("::ffff:10.1.2.3")));
        let all = TrustedProxies::parse(&["0.0.0.0/0"]).unwrap();
        assert!(all.contains(ip("8.8.8.8")));
        assert!(!all.contains(ip("::1")));
        for bad in ["10.0.0.0/33", "nope", "::/129", "10.0.0.0/x"] {
            assert!(TrustedProxies::parse(&[bad]).is_err(), "{bad}");
        }
        assert!(TrustedProxies::parse::<&str>(&[]).unwrap().is_empty());
    }

    #[test]
    fn untrusted_peer_is_the_client_whatever_it_claims() {
        let t = TrustedProxies::parse(&["127.0.0.1"]).unwrap();
        let h = xff(&["1.2.3.4"]);
        assert_eq!(t.client_addr(ip("203.0.113.9"), &h), ip("203.0.113.9"));
        assert_eq!(
            TrustedProxies::default().client_addr(ip("127.0.0.1"), &h),
            ip("127.0.0.1")
        );
    }

    #[test]
    fn rightmost_untrusted_hop_is_the_client() {
        let t = TrustedProxies::parse(&["127.0.0.1", "10.0.0.0/8"]).unwrap();
        // The client wrote a fake first hop; the trusted proxies appended
        // the real one, then themselves.
        let h = xff(&["6.6.6.6, 198.51.100.7", "10.0.0.2"]);
        assert_eq!(t.client_addr(ip("127.0.0.1"), &h), ip("198.51.100.7"));
        // Ports and brackets are tolerated.
        let h = xff(&["198.51.100.7:5555"]);
        assert_eq!(t.client_addr(ip("127.0.0.1"), &h), ip("198.51.100.7"));
        let h = xff(&["[2001:db8::7]:443"]);
        assert_eq!(t.client_addr(ip("127.0.0.1"), &h), ip("2001:db8::7"));
        // Every hop trusted: the leftmost.
        let h = xff(&["10.0.0.9, 10.0.0.2"]);
        assert_eq!(t.client_addr(ip("127.0.0.1"), &h), ip("10.0.0.9"));
        // Garbage stops the walk at the trusted hop that reported it.
        let h = xff(&["198.51.100.7, garbage, 10.0.0.2"]);
        assert_eq!(t.client_addr(ip("127.0.0.1"), &h), ip("10.0.0.2"));
        // No header at all: the proxy itself.
        assert_eq!(
            t.client_addr(ip("127.0.0.1"), &HeaderMap::new()),
            ip("127.0.0.1")
        );
    }

    #[test]
    fn forwarded_host_and_proto_only_from_trusted_peers() {
        let t = TrustedProxies::parse(&["127.0.0.1"]).unwrap();
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-host",
            HeaderValue::from_static("events.example.com"),
        );
        h.insert("x-forwarded-proto", HeaderValue::from_static("https, http"));
        assert_eq!(
            t.forwarded(ip("127.0.0.1"), &h),
            (Some("events.example.com"), Some("https"))
        );
        assert_eq!(t.forwarded(ip("203.0.113.1"), &h), (None, None));
    }
}
