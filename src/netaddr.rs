//! CIDR ranges for IP allowlists, and the client address behind trusted proxies.

use std::net::IpAddr;

/// An address range such as `10.0.0.0/8`, `2001:db8::/32` or a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for IpNet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not an IP address or CIDR range"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{s}` has a bad prefix length"))?,
            None => max,
        };
        Ok(Self { addr, prefix })
    }
}

impl IpNet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match (self.addr, ip) {
            // An IPv4 client may show up as an IPv4-mapped IPv6 address.
            (IpAddr::V4(_), IpAddr::V6(v6)) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            _ => ip,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                mask(u32::from(net).into(), u32::from(ip).into(), self.prefix, 32)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                mask(u128::from(net), u128::from(ip), self.prefix, 128)
            }
            _ => false,
        }
    }
}

fn mask(net: u128, ip: u128, prefix: u8, bits: u32) -> bool {
    if prefix == 0 {
        return true;
    }
    let shift = bits - u32::from(prefix);
    (net >> shift) == (ip >> shift)
}

/// Parse a list of ranges, naming the bad entry.
pub fn parse_list(items: &[String]) -> Result<Vec<IpNet>, (usize, String)> {
    items
        .iter()
        .enumerate()
        .map(|(i, s)| s.parse().map_err(|e| (i, e)))
        .collect()
}

/// The client's address: the peer, unless the peer is a trusted proxy, in which case the
/// right-most `X-Forwarded-For` entry that is not itself a trusted proxy.
pub fn client_ip(
    peer: Option<IpAddr>,
    forwarded_for: Option<&str>,
    trusted: &[IpNet],
) -> Option<IpAddr> {
    let peer = peer?;
    if !trusted.iter().any(|t| t.contains(peer)) {
        return Some(peer);
    }
    let Some(header) = forwarded_for else {
        return Some(peer);
    };
    let mut last = peer;
    for hop in header.rsplit(',') {
        let Ok(ip) = hop.trim().parse::<IpAddr>() else {
            return None; // a garbled header from a trusted proxy: refuse rather than guess
        };
        last = ip;
        if !trusted.iter().any(|t| t.contains(ip)) {
            return Some(ip);
        }
    }
    Some(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn cidr_ranges_match() {
        assert!(net("10.0.0.0/8").contains("10.200.1.1".parse().unwrap()));
        assert!(!net("10.0.0.0/8").contains("11.0.0.1".parse().unwrap()));
        assert!(net("127.0.0.1").contains("127.0.0.1".parse().unwrap()));
        assert!(net("127.0.0.1/32").contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(net("2001:db8::/32").contains("2001:db8:1::5".parse().unwrap()));
        assert!(net("0.0.0.0/0").contains("8.8.8.8".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<IpNet>().is_err());
        assert!("nope".parse::<IpNet>().is_err());
    }

    #[test]
    fn forwarded_for_is_trusted_only_from_proxies() {
        let proxies = [net("10.0.0.0/8")];
        let peer = Some("10.0.0.5".parse().unwrap());
        assert_eq!(
            client_ip(peer, Some("203.0.113.9, 10.0.0.7"), &proxies),
            Some("203.0.113.9".parse().unwrap())
        );
        let stranger = Some("198.51.100.1".parse().unwrap());
        assert_eq!(client_ip(stranger, Some("203.0.113.9"), &proxies), stranger);
        assert_eq!(client_ip(peer, Some("garbage"), &proxies), None);
    }
}
