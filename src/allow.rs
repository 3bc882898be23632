//! The client allow-list of an export: addresses and networks (CIDR) whose connections are
//! served; every other peer is disconnected before it can send a call.

use std::net::IpAddr;
use std::str::FromStr;

/// One allowed address or network, e.g. `10.0.0.0/8`, `192.168.1.20`, `::1`, `fd00::/8`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Net {
    addr: IpAddr,
    prefix: u8,
}

impl FromStr for Net {
    type Err = String;

    fn from_str(s: &str) -> Result<Net, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or network (e.g. 10.0.0.0/8)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|&p| p <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0 to {max}"))?,
        };
        Ok(Net { addr, prefix })
    }
}

impl Net {
    pub fn contains(&self, ip: IpAddr) -> bool {
        // IPv4 clients reaching an IPv6 socket show up as ::ffff:a.b.c.d
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// The allow-list: empty means every peer that can reach the bound address.
#[derive(Clone, Debug, Default)]
pub struct AllowList(pub Vec<Net>);

impl AllowList {
    pub fn allows(&self, ip: IpAddr) -> bool {
        self.0.is_empty() || self.0.iter().any(|n| n.contains(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Protects: only listed clients reach the export.
    #[test]
    fn networks_and_addresses_match_exactly() {
        let l = AllowList(vec![
            "10.1.0.0/16".parse().unwrap(),
            "127.0.0.2".parse().unwrap(),
        ]);
        assert!(l.allows(ip("10.1.200.3")));
        assert!(!l.allows(ip("10.2.0.1")));
        assert!(l.allows(ip("127.0.0.2")));
        assert!(!l.allows(ip("127.0.0.1")));
        assert!(l.allows(ip("::ffff:10.1.0.9")));
        assert!(!l.allows(ip("::1")));
        let all: Net = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("8.8.8.8")));
        let v6: Net = "fd00::/8".parse().unwrap();
        assert!(v6.contains(ip("fd12::1")) && !v6.contains(ip("fe80::1")));
        assert!(AllowList::default().allows(ip("1.2.3.4")));
    }

    #[test]
    fn bad_entries_are_refused_with_a_reason() {
        for bad in ["10.0.0.0/33", "host.example", "10.0.0.0/x", "", "::1/129"] {
            assert!(bad.parse::<Net>().is_err(), "{bad}");
        }
    }
}
