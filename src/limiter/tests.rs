//! Unit tests of the limiter: admission, the per-IP limit and its overrides, the request rate,
//! reloaded limits.

use super::*;
use std::net::{Ipv4Addr, Ipv6Addr};

fn v4(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

#[test]
fn per_ip_limit_rejects_only_that_ip() {
    let l = Limiter::new(100, 2).leak();
    let a = [l.try_acquire(v4(2)).unwrap(), l.try_acquire(v4(2)).unwrap()];
    assert_eq!(l.try_acquire(v4(2)).unwrap_err(), Rejection::PerIp);
    let b = l.try_acquire(v4(3)).unwrap();
    assert_eq!(l.active(), 3);
    assert_eq!(l.tracked_ips(), 2);
    drop(a);
    drop(b);
    assert_eq!((l.active(), l.tracked_ips()), (0, 0));
}

#[test]
fn global_limit_rejects_everyone_and_frees_on_drop() {
    let l = Limiter::new(2, 0).leak();
    let a = l.try_acquire(v4(2)).unwrap();
    let _b = l.try_acquire(v4(3)).unwrap();
    assert_eq!(l.try_acquire(v4(4)).unwrap_err(), Rejection::Global);
    drop(a);
    assert!(l.try_acquire(v4(4)).is_ok());
}

#[test]
fn a_global_place_first_then_the_address() {
    let l = Limiter::new(3, 1).leak();
    let pending = l.try_acquire_global().unwrap();
    assert_eq!((l.active(), l.tracked_ips()), (1, 0));
    let a = pending.for_address(v4(2)).unwrap();
    assert_eq!((l.active(), l.tracked_ips()), (1, 1));
    let b = l.try_acquire_global().unwrap();
    assert_eq!(b.for_address(v4(2)).unwrap_err(), Rejection::PerIp);
    assert_eq!(
        l.active(),
        1,
        "the refused permit gave its global place back"
    );
    let c = [
        l.try_acquire_global().unwrap(),
        l.try_acquire_global().unwrap(),
    ];
    assert_eq!(l.try_acquire_global().unwrap_err(), Rejection::Global);
    drop((a, c));
    assert_eq!((l.active(), l.tracked_ips()), (0, 0));
}

#[test]
fn reloaded_limits_apply_to_new_connections_only() {
    let l = Limiter::new(10, 3).leak();
    let held: Vec<_> = (0..3).map(|_| l.try_acquire(v4(2)).unwrap()).collect();
    l.set_max_per_ip(1).unwrap();
    assert_eq!(l.try_acquire(v4(2)).unwrap_err(), Rejection::PerIp);
    assert!(l.try_acquire(v4(3)).is_ok(), "one for another address");
    drop(held);
    let _one = l.try_acquire(v4(2)).unwrap();
    assert_eq!(l.try_acquire(v4(2)).unwrap_err(), Rejection::PerIp);
    l.set_max_connections(2).unwrap();
    let _two = l.try_acquire(v4(4)).unwrap();
    assert_eq!(l.try_acquire(v4(5)).unwrap_err(), Rejection::Global);
    // The table has at least twice 10 slots (a power of two): half of it is the ceiling.
    let ceiling = l.ip_table_slots() / 2;
    assert!(ceiling >= 10);
    assert!(l.set_max_connections(ceiling).is_ok());
    assert!(l.set_max_connections(ceiling + 1).is_err());
    assert!(
        l.set_max_per_ip(0).is_err(),
        "turning it off needs a restart"
    );
    assert!(
        l.set_request_rate(5, 0).is_err(),
        "no rate state was made at startup"
    );
    assert!(l.set_request_rate(0, 0).is_ok());
}

#[test]
fn per_ip_rejection_gives_back_the_global_place() {
    let l = Limiter::new(10, 1).leak();
    let _a = l.try_acquire(v4(2)).unwrap();
    assert_eq!(l.try_acquire(v4(2)).unwrap_err(), Rejection::PerIp);
    assert_eq!(l.active(), 1);
}

#[test]
fn the_request_rate_is_per_address_over_all_its_connections() {
    let l = Limiter::new(10, 5).with_request_rate(1, 3).leak();
    let (a1, a2, b) = (
        l.try_acquire(v4(2)).unwrap(),
        l.try_acquire(v4(2)).unwrap(),
        l.try_acquire(v4(3)).unwrap(),
    );
    assert!(a1.admit_request().is_ok() && a2.admit_request().is_ok());
    assert!(a1.admit_request().is_ok());
    let wait = a2.admit_request().unwrap_err();
    assert!(wait > Duration::from_millis(900) && wait <= Duration::from_secs(1));
    assert!(
        b.admit_request().is_ok(),
        "another address has its own allowance"
    );
    // Reconnecting does not buy a new burst.
    drop((a1, a2));
    let again = l.try_acquire(v4(2)).unwrap();
    assert!(again.admit_request().is_err());
    assert_eq!(l.request_rate(), Some((1, 3)));
    assert!(Limiter::new(10, 5)
        .leak()
        .try_acquire(v4(2))
        .unwrap()
        .admit_request()
        .is_ok());
}

#[test]
fn the_connection_rate_refuses_an_address_opening_connections_too_fast() {
    let overrides = [limits("127.0.9.0", 24, 50, None)];
    let l = Limiter::new(100, 50)
        .with_connection_rate(1, 3)
        .with_per_ip_overrides(&overrides)
        .leak();
    // A burst of three, whether they stay open or close at once: closing buys nothing back.
    let kept = l.try_acquire(v4(2)).unwrap();
    drop(l.try_acquire(v4(2)).unwrap());
    drop(l.try_acquire(v4(2)).unwrap());
    assert_eq!(l.try_acquire(v4(2)).unwrap_err(), Rejection::ConnectionRate);
    assert_eq!(l.active(), 1, "the refused one holds no place");
    assert_eq!(l.tracked_ips(), 1);
    drop(kept);
    assert_eq!(
        l.try_acquire(v4(2)).unwrap_err(),
        Rejection::ConnectionRate,
        "its state outlives its last connection"
    );
    assert_eq!((l.active(), l.tracked_ips()), (0, 0));
    // Another address has its own allowance; an override network's addresses are not charged.
    let _b: Vec<_> = (0..3).map(|_| l.try_acquire(v4(3)).unwrap()).collect();
    let nat: IpAddr = "127.0.9.1".parse().unwrap();
    let _nat: Vec<_> = (0..10).map(|_| l.try_acquire(nat).unwrap()).collect();
    // A reload lifts it; one where none was set at startup is refused.
    assert_eq!(l.connection_rate(), Some((1, 3)));
    l.set_connection_rate(0, 0).unwrap();
    assert!(l.try_acquire(v4(2)).is_ok());
    assert!(Limiter::new(10, 5)
        .leak()
        .set_connection_rate(5, 0)
        .is_err());
}

#[test]
fn ipv6_clients_can_be_counted_per_network() {
    let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
    let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
    let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
    // Default: each address its own.
    let l = Limiter::new(10, 1).leak();
    let _a = l.try_acquire(a).unwrap();
    assert!(l.try_acquire(b).is_ok());
    // Per /64: a and b are one client, the next /64 another; IPv4 is untouched.
    let l = Limiter::new(10, 1).with_ipv6_prefix(64).leak();
    assert_eq!(l.ipv6_prefix(), 64);
    let _a = l.try_acquire(a).unwrap();
    assert_eq!(l.try_acquire(b).unwrap_err(), Rejection::PerIp);
    let _o = l.try_acquire(other).unwrap();
    let _v4 = l.try_acquire(v4(2)).unwrap();
    assert!(l.try_acquire(v4(3)).is_ok());
    let mapped = IpAddr::V6(Ipv4Addr::new(127, 0, 0, 2).to_ipv6_mapped());
    assert_eq!(l.try_acquire(mapped).unwrap_err(), Rejection::PerIp);
    assert_eq!(l.tracked_ips(), 3);
}

#[test]
fn a_reloaded_ipv6_prefix_keys_new_connections_and_open_ones_release_where_they_were_counted() {
    let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
    let b: IpAddr = "2001:db8:1:2::2".parse().unwrap();
    let c: IpAddr = "2001:db8:1:2::3".parse().unwrap();
    let l = Limiter::new(10, 1).leak();
    let per_address = [l.try_acquire(a).unwrap(), l.try_acquire(b).unwrap()];
    // Per /64 from now on: the network's first connection is admitted under its new key, the
    // next refused, though the two open ones stay counted under their addresses.
    assert_eq!(l.set_per_ip_keys(64, &[]), Ok(true));
    assert_eq!(l.ipv6_prefix(), 64);
    let network = l.try_acquire(c).unwrap();
    assert_eq!(l.try_acquire(a).unwrap_err(), Rejection::PerIp);
    assert_eq!(l.tracked_ips(), 3);
    // Each releases its own count: the table ends empty.
    drop(per_address);
    assert_eq!(l.tracked_ips(), 1);
    assert_eq!(l.try_acquire(b).unwrap_err(), Rejection::PerIp);
    drop(network);
    assert_eq!(l.tracked_ips(), 0);
    assert_eq!(l.set_per_ip_keys(64, &[]), Ok(false), "in force already");
    // An IPv6 override narrower than the prefix is refused with it, and nothing changes; with a
    // prefix that allows it, both apply.
    let narrow = limits("2001:db8:1:2::", 96, 2, None);
    assert!(l.set_per_ip_keys(64, &[narrow]).is_err());
    assert_eq!((l.ipv6_prefix(), l.per_ip_overrides()), (64, 0));
    assert_eq!(l.set_per_ip_keys(96, &[narrow]), Ok(true));
    assert_eq!((l.ipv6_prefix(), l.per_ip_overrides()), (96, 1));
    let two = [l.try_acquire(a).unwrap(), l.try_acquire(b).unwrap()];
    assert_eq!(l.try_acquire(c).unwrap_err(), Rejection::PerIp);
    drop(two);
    assert_eq!(l.tracked_ips(), 0);
}

/// One entry of `per_ip_overrides`.
pub(crate) fn limits(net: &str, len: u8, conns: u64, reqs: Option<u64>) -> PerIpLimits {
    PerIpLimits {
        network: net.parse().unwrap(),
        prefix_len: len,
        max_connections: conns,
        max_requests: reqs,
    }
}

#[test]
fn networks_can_have_a_request_rate_of_their_own() {
    let nat: IpAddr = "10.1.2.3".parse().unwrap();
    let office: IpAddr = "10.9.0.1".parse().unwrap();
    let trusted: IpAddr = "192.168.1.1".parse().unwrap();
    let l = Limiter::new(100, 10)
        .with_request_rate(1, 1)
        .with_per_ip_overrides(&[
            limits("10.1.0.0", 16, 10, Some(1000)),
            limits("10.9.0.0", 16, 10, None),
            limits("192.168.0.0", 16, 10, Some(0)),
        ])
        .leak();
    let (n, o, t, d) = (
        l.try_acquire(nat).unwrap(),
        l.try_acquire(office).unwrap(),
        l.try_acquire(trusted).unwrap(),
        l.try_acquire(v4(2)).unwrap(),
    );
    // Bursts of one second's worth (1000) for the NAT, the default (1) for the office
    // network, no rate for the trusted one, the default for everyone else.
    assert_eq!(
        (0..1000).filter(|_| n.admit_request().is_ok()).count(),
        1000
    );
    assert!(n.admit_request().is_err());
    assert!(o.admit_request().is_ok() && o.admit_request().is_err());
    assert!((0..5000).all(|_| t.admit_request().is_ok()));
    assert!(d.admit_request().is_ok() && d.admit_request().is_err());
    // An override's rate with no default rate works too.
    let l = Limiter::new(100, 10)
        .with_per_ip_overrides(&[limits("10.0.0.0", 8, 10, Some(1))])
        .leak();
    let (n, d) = (l.try_acquire(nat).unwrap(), l.try_acquire(v4(2)).unwrap());
    assert!(n.admit_request().is_ok() && n.admit_request().is_err());
    assert!((0..100).all(|_| d.admit_request().is_ok()));
}

#[test]
fn networks_can_have_a_per_ip_limit_of_their_own() {
    let nat: IpAddr = "10.1.2.3".parse().unwrap();
    let v6: IpAddr = "2001:db8::7".parse().unwrap();
    let l = Limiter::new(100, 1)
        .with_per_ip_overrides(&[
            limits("10.0.0.0", 8, 3, None),
            limits("2001:db8::", 32, 0, None),
            limits("0.0.0.0", 0, 2, None), // never reached for 10/8: the first wins
        ])
        .leak();
    let held: Vec<_> = (0..3).map(|_| l.try_acquire(nat).unwrap()).collect();
    assert_eq!(l.try_acquire(nat).unwrap_err(), Rejection::PerIp);
    // The same address written IPv4-mapped is in the same network.
    let mapped = IpAddr::V6(Ipv4Addr::new(10, 1, 2, 3).to_ipv6_mapped());
    assert_eq!(l.try_acquire(mapped).unwrap_err(), Rejection::PerIp);
    // 0: no per-IP limit for the network.
    let many: Vec<_> = (0..10).map(|_| l.try_acquire(v6).unwrap()).collect();
    // Any other IPv4 address: the catch-all /0 entry, 2.
    let other = [l.try_acquire(v4(2)).unwrap(), l.try_acquire(v4(2)).unwrap()];
    assert_eq!(l.try_acquire(v4(2)).unwrap_err(), Rejection::PerIp);
    // Other IPv6 addresses: the default, 1.
    let _one = l.try_acquire(IpAddr::V6(Ipv6Addr::LOCALHOST)).unwrap();
    assert_eq!(
        l.try_acquire(IpAddr::V6(Ipv6Addr::LOCALHOST)).unwrap_err(),
        Rejection::PerIp
    );
    drop((held, many, other));
}

#[test]
fn reloaded_overrides_admit_new_connections_and_rate_open_ones() {
    let nat: IpAddr = "10.1.2.3".parse().unwrap();
    let before: IpAddr = "10.2.0.1".parse().unwrap();
    let l = Limiter::new(100, 1)
        .with_request_rate(1000, 5000)
        .with_ipv6_prefix(64)
        .leak();
    let open = l.try_acquire(before).unwrap();
    let first = l.try_acquire(nat).unwrap();
    assert_eq!(l.try_acquire(nat).unwrap_err(), Rejection::PerIp);
    assert_eq!(
        l.set_per_ip_keys(64, &[limits("10.0.0.0", 8, 3, Some(1))]),
        Ok(true)
    );
    assert_eq!(l.per_ip_overrides(), 1);
    // Admitted under the new entry: 3 for the address, the one open before included.
    let more = [l.try_acquire(nat).unwrap(), l.try_acquire(nat).unwrap()];
    assert_eq!(l.try_acquire(nat).unwrap_err(), Rejection::PerIp);
    // The new connections get the network's rate, 1 a second; one admitted under the
    // defaults keeps the default rate (1000).
    assert!(more[0].admit_request().is_ok() && more[1].admit_request().is_err());
    assert!((0..100).all(|_| open.admit_request().is_ok()));
    // Its rate changed by a reload: the network's open connections follow.
    l.set_per_ip_keys(64, &[limits("10.0.0.0", 8, 3, Some(0))])
        .unwrap();
    assert!(
        (0..100).all(|_| more[1].admit_request().is_ok()),
        "no rate now"
    );
    l.set_per_ip_keys(64, &[limits("10.0.0.0", 8, 3, Some(1))])
        .unwrap();
    assert!(more[1].admit_request().is_err(), "1 a second again");
    // Taken off the list: back to the defaults, for new and open connections alike (a
    // burst of 5 000 over the address's state: the 1 a second had used a second's worth).
    l.set_per_ip_keys(64, &[]).unwrap();
    assert_eq!(l.try_acquire(nat).unwrap_err(), Rejection::PerIp);
    drop((first, open));
    assert!((0..2000).all(|_| more[0].admit_request().is_ok()));
    drop(more);

    // What cannot apply changes nothing.
    let narrow = limits("2001:db8::", 96, 5, None);
    assert!(
        l.set_per_ip_keys(64, &[narrow]).is_err(),
        "narrower than /64"
    );
    let off = Limiter::new(100, 0).leak();
    assert!(off
        .set_per_ip_keys(128, &[limits("10.0.0.0", 8, 3, None)])
        .is_err());
    let no_rate = Limiter::new(100, 1).leak();
    assert!(no_rate
        .set_per_ip_keys(128, &[limits("10.0.0.0", 8, 3, Some(5))])
        .is_err());
    assert_eq!(no_rate.per_ip_overrides(), 0);
    assert_eq!(
        no_rate.set_per_ip_keys(128, &[limits("10.0.0.0", 8, 3, None)]),
        Ok(true),
        "a list without rates needs none"
    );
    assert_eq!(no_rate.try_acquire(nat).map(|_| ()), Ok(()));
}

#[test]
fn ipv4_mapped_ipv6_is_the_ipv4_address() {
    let l = Limiter::new(10, 1).leak();
    let _a = l.try_acquire(v4(9)).unwrap();
    let mapped = IpAddr::V6(Ipv4Addr::new(127, 0, 0, 9).to_ipv6_mapped());
    assert_eq!(l.try_acquire(mapped).unwrap_err(), Rejection::PerIp);
    assert!(l.try_acquire(IpAddr::V6(Ipv6Addr::LOCALHOST)).is_ok());
}
