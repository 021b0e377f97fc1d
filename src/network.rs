//! IP networks (CIDR) and the one form client addresses are compared in.
//!
//! Owns [`mapped`], the IPv6 form of an address (IPv4 as `::ffff:a.b.c.d`), and [`Network`], a
//! network matched against addresses in that form. Used by the per-IP overrides of the limiter and
//! by the PROXY protocol's trusted networks.
//!
//! Invariants:
//! - An IPv4 network also holds the IPv4-mapped IPv6 form of its addresses: a dual-stack listener
//!   sees IPv4 clients that way, and they are the same clients.
//! - A network's address bits below its prefix are ignored (`10.1.2.3/8` is `10.0.0.0/8`).

use std::net::IpAddr;

/// An address in IPv6 form: IPv4 as `::ffff:a.b.c.d`, so both families share one space.
pub fn mapped(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// A network: the addresses whose first `prefix_len` bits are its address's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    /// The network's address in [`mapped`] form, bits below the prefix cleared.
    net: u128,
    mask: u128,
}

impl Network {
    /// `prefix_len` counts the bits of `addr`'s own family (at most 32 for IPv4, 128 for IPv6).
    pub fn new(addr: IpAddr, prefix_len: u8) -> Network {
        let len = u32::from(prefix_len) + if addr.is_ipv4() { 96 } else { 0 };
        assert!(len <= 128, "prefix length {prefix_len} too long for {addr}");
        let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
        Network {
            net: mapped(addr) & mask,
            mask,
        }
    }

    /// True when the address `a`, in [`mapped`] form, is in this network.
    pub fn holds(&self, a: u128) -> bool {
        a & self.mask == self.net
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.holds(mapped(ip))
    }

    /// True when every address of `other` is in this network (this one is `other` or wider).
    pub fn covers(&self, other: &Network) -> bool {
        self.mask & other.mask == self.mask && self.holds(other.net)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv4_networks_hold_their_addresses_in_both_forms() {
        let n = Network::new(ip("10.1.2.3"), 8);
        assert!(n.contains(ip("10.200.0.1")));
        assert!(n.contains(ip("::ffff:10.0.0.9")), "IPv4-mapped IPv6");
        assert!(!n.contains(ip("11.0.0.1")));
        assert!(
            !n.contains(ip("::a00:1")),
            "IPv4-compatible IPv6 is another address"
        );
        let host = Network::new(ip("127.0.0.2"), 32);
        assert!(host.contains(ip("127.0.0.2")) && !host.contains(ip("127.0.0.3")));
        assert!(Network::new(ip("0.0.0.0"), 0).contains(ip("192.0.2.1")));
        assert!(!Network::new(ip("0.0.0.0"), 0).contains(ip("2001:db8::1")));
    }

    #[test]
    fn a_network_covers_itself_and_narrower_ones_of_it() {
        let n = |s: &str, len| Network::new(ip(s), len);
        assert!(n("10.0.0.0", 8).covers(&n("10.1.0.0", 16)));
        assert!(n("10.0.0.0", 8).covers(&n("10.9.9.9", 8)), "itself");
        assert!(!n("10.1.0.0", 16).covers(&n("10.0.0.0", 8)), "wider");
        assert!(!n("10.0.0.0", 8).covers(&n("11.0.0.0", 16)), "elsewhere");
        assert!(n("0.0.0.0", 0).covers(&n("192.0.2.0", 24)));
        assert!(!n("0.0.0.0", 0).covers(&n("2001:db8::", 32)), "IPv4 only");
        assert!(n("2001:db8::", 32).covers(&n("2001:db8:1::", 48)));
    }

    #[test]
    fn ipv6_networks() {
        let n = Network::new(ip("2001:db8:1:2::"), 64);
        assert!(n.contains(ip("2001:db8:1:2:ffff::1")));
        assert!(!n.contains(ip("2001:db8:1:3::1")));
        assert!(
            Network::new(ip("::"), 0).contains(ip("10.0.0.1")),
            "::/0 holds everything"
        );
        assert!(Network::new(ip("::1"), 128).contains(ip("::1")));
    }
}
