//! Connection admission: the global limit and the per-client-IP limit, enforced together across
//! all cores and front doors without locks.
//!
//! Owns the global count (a [`Cap`]: one cache-padded `AtomicUsize`) and the per-IP [`IpTable`]. Every admitted
//! connection holds a [`Permit`] from accept to close; dropping it releases both counts, so a count
//! cannot leak whatever path ends the connection (error, timeout, panic unwinding a task, shutdown
//! dropping the runtime). When a request rate per address is set, the permit also admits each
//! request against it ([`RequestRate`], state kept beside the address's table slot).
//!
//! Invariants:
//! - `active() <= max_connections` at every instant (see [`cap`]).
//! - A key's count never exceeds `max_connections_per_ip` (see [`ip_table`]).
//! - The global place is taken first, so the number of live keys never exceeds `max_connections`
//!   and the table (twice that many slots) cannot fill in normal operation.
//! - IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) count as the IPv4 address; other IPv6 addresses
//!   count per `server.ipv6_prefix_len` network (each address by default).
//!
//! The limiter is created once and leaked (`&'static`): a permit then needs no reference count,
//! which would be one more shared cache line written per connection.

pub mod cap;
pub mod ip_table;
pub mod rate;

use std::net::IpAddr;
use std::time::Duration;

pub use cap::Cap;
pub use ip_table::{IpTable, TableReject};
pub use rate::RequestRate;

/// Why a connection was not admitted; the `reason` label of `mcp_gateway_connections_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// `max_connections` reached.
    Global,
    /// `max_connections_per_ip` reached for this client address.
    PerIp,
    /// No slot in the per-IP table for a new address (attack or misconfiguration).
    IpTableFull,
}

impl Rejection {
    pub const ALL: [Rejection; 3] = [Rejection::Global, Rejection::PerIp, Rejection::IpTableFull];

    /// Metric label value.
    pub fn label(self) -> &'static str {
        match self {
            Rejection::Global => "global",
            Rejection::PerIp => "per_ip",
            Rejection::IpTableFull => "ip_table_full",
        }
    }

    /// HTTP status owed to a rejected client: 429 when it is this client's own fault, 503 otherwise.
    pub fn http_status(self) -> u16 {
        match self {
            Rejection::PerIp => 429,
            Rejection::Global | Rejection::IpTableFull => 503,
        }
    }
}

/// Global and per-IP admission. See the module documentation.
pub struct Limiter {
    /// Connections admitted and not yet closed, against `max_connections`.
    global: Cap,
    /// `None` when the per-IP limit is disabled (`max_connections_per_ip: 0`).
    per_ip: Option<(IpTable, u64)>,
    /// The request rate per address, `None` when off (it needs the per-IP table).
    rate: Option<RequestRate>,
    /// Mask applied to an IPv6 client's address before counting it (all ones: each address;
    /// `/64`: its network), see [`Limiter::with_ipv6_prefix`].
    v6_mask: u128,
    /// Networks with a per-IP limit of their own: (first address, mask, limit), both in the
    /// IPv6 form of [`mapped`]; the first that holds an address applies. Scanned once per new
    /// connection, never per request.
    overrides: Vec<(u128, u128, u64)>,
}

impl Limiter {
    /// `max_per_ip == 0` disables the per-IP limit. The table gets `2 * max_connections` slots
    /// (`max_connections` at most 2^30, so a slot index fits 32 bits).
    pub fn new(max_connections: usize, max_per_ip: u64) -> Self {
        assert!(max_connections <= 1 << 30);
        let per_ip = (max_per_ip > 0).then(|| {
            let slots = max_connections.saturating_mul(2).max(ip_table::WINDOW);
            (
                IpTable::with_min_slots(slots),
                max_per_ip.min(ip_table::MAX_COUNT),
            )
        });
        Limiter {
            global: Cap::new(max_connections),
            per_ip,
            rate: None,
            v6_mask: u128::MAX,
            overrides: Vec::new(),
        }
    }

    /// Gives the addresses of each `(network, prefix length)` their own per-IP limit (0: none),
    /// the first matching entry winning. Needs the per-IP table (`max_per_ip > 0`).
    pub fn with_per_ip_overrides(mut self, list: &[(IpAddr, u8, u64)]) -> Self {
        assert!(list.is_empty() || self.per_ip.is_some());
        self.overrides = list
            .iter()
            .map(|&(net, len, limit)| {
                let len = u32::from(len) + if net.is_ipv4() { 96 } else { 0 };
                let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
                let limit = if limit == 0 {
                    ip_table::MAX_COUNT
                } else {
                    limit
                };
                (mapped(net) & mask, mask, limit.min(ip_table::MAX_COUNT))
            })
            .collect();
        self
    }

    /// Counts IPv6 clients (not IPv4-mapped ones) per `/prefix_len` network instead of per
    /// address, for the per-IP limit and the request rate: one holder of a /64 has 2^64 addresses.
    /// `prefix_len` in `1..=128`; 128 (the default) counts each address.
    pub fn with_ipv6_prefix(mut self, prefix_len: u8) -> Self {
        assert!((1..=128).contains(&prefix_len));
        self.v6_mask = u128::MAX << (128 - u32::from(prefix_len));
        self
    }

    /// The per-IP table's key of address `a` (in [`mapped`] form, so IPv4 and IPv4-mapped IPv6
    /// are one key): IPv6 addresses are cut to the configured prefix.
    fn key_of(&self, a: u128) -> u128 {
        const V4_MAPPED: u128 = 0xffff; // `::ffff:0:0/96`, shifted down by 32
        if a >> 32 == V4_MAPPED {
            a
        } else {
            a & self.v6_mask
        }
    }

    /// The per-IP limit for address `a` (in [`mapped`] form): its network's override, else
    /// `default`.
    fn per_ip_limit(&self, a: u128, default: u64) -> u64 {
        self.overrides
            .iter()
            .find(|(net, mask, _)| a & mask == *net)
            .map_or(default, |(_, _, limit)| *limit)
    }

    /// How many networks have a per-IP limit of their own.
    pub fn per_ip_overrides(&self) -> usize {
        self.overrides.len()
    }

    /// The configured IPv6 prefix length (128: per address).
    pub fn ipv6_prefix(&self) -> u32 {
        self.v6_mask.count_ones()
    }

    /// Also limits each address to `per_second` requests a second with bursts of `burst` (0: one
    /// second's worth); `per_second == 0`: no limit. Needs the per-IP table (`max_per_ip > 0`).
    pub fn with_request_rate(mut self, per_second: u64, burst: u64) -> Self {
        if per_second > 0 {
            let (table, _) = self
                .per_ip
                .as_ref()
                .expect("a request rate needs the per-IP table");
            let burst = if burst == 0 { per_second } else { burst };
            self.rate = Some(RequestRate::new(table.capacity(), per_second, burst));
        }
        self
    }

    /// A limiter that lives as long as the process (permits borrow it without a reference count).
    pub fn leak(self) -> &'static Limiter {
        Box::leak(Box::new(self))
    }

    /// Admits one connection from `ip`, or says why not.
    pub fn try_acquire(&'static self, ip: IpAddr) -> Result<Permit, Rejection> {
        if !self.global.try_take() {
            return Err(Rejection::Global);
        }
        let mut permit = Permit {
            limiter: self,
            place: NO_SLOT,
        };
        if let Some((table, limit)) = &self.per_ip {
            let a = mapped(ip);
            match table.acquire(self.key_of(a), self.per_ip_limit(a, *limit)) {
                Ok(slot) => {
                    let fp = match self.rate {
                        Some(_) => table.fingerprint(slot) & 0xffff,
                        None => 0,
                    };
                    permit.place = fp << 32 | slot as u64;
                }
                // Dropping the half-made permit gives the global place back.
                Err(TableReject::LimitReached) => return Err(Rejection::PerIp),
                Err(TableReject::Full) => return Err(Rejection::IpTableFull),
            }
        }
        Ok(permit)
    }

    /// Connections admitted and not yet closed.
    pub fn active(&self) -> usize {
        self.global.count()
    }

    /// Client addresses with at least one open connection (0 when per-IP limiting is off).
    pub fn tracked_ips(&self) -> usize {
        self.per_ip.as_ref().map_or(0, |(t, _)| t.live_keys())
    }

    pub fn max_connections(&self) -> usize {
        self.global.limit()
    }

    /// The per-IP limit in force, 0 when disabled.
    pub fn max_per_ip(&self) -> u64 {
        self.per_ip.as_ref().map_or(0, |(_, l)| *l)
    }

    /// The request rate per address and its burst, `None` when off.
    pub fn request_rate(&self) -> Option<(u64, u64)> {
        self.rate.as_ref().map(|r| (r.per_second(), r.burst()))
    }

    /// Slots in the per-IP table (0 when per-IP limiting is off).
    pub fn ip_table_slots(&self) -> usize {
        self.per_ip.as_ref().map_or(0, |(t, _)| t.capacity())
    }
}

/// An address in IPv6 form: IPv4 as `::ffff:a.b.c.d`, so both families share one key space.
fn mapped(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// A permit's `place` when the per-IP table is off.
const NO_SLOT: u64 = u32::MAX as u64;

/// One admitted connection's place in both counts; released on drop.
pub struct Permit {
    limiter: &'static Limiter,
    /// Its address's slot in the per-IP table (low 32 bits; `NO_SLOT` when the table is off) and
    /// 16 bits of the address's fingerprint for the request rate (bits 32..48, 0 when it is off).
    /// One word, written at once: two narrower fields cost the benchmark's acquire+release pair
    /// 9 ns (a store-forwarding stall when the permit is read back whole).
    place: u64,
}

impl Permit {
    fn slot(&self) -> Option<usize> {
        let slot = self.place & NO_SLOT;
        (slot != NO_SLOT).then_some(slot as usize)
    }

    /// Admits one request (HTTP request, WebSocket message, MCPB frame) of this connection's
    /// address against the request rate, or says how long until one would be admitted. Always
    /// admits when no rate is set.
    pub fn admit_request(&self) -> Result<(), Duration> {
        match (&self.limiter.rate, self.slot()) {
            (Some(rate), Some(slot)) => rate.admit(slot, self.place >> 32, rate::now_us()),
            _ => Ok(()),
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let (Some(slot), Some((table, _))) = (self.slot(), &self.limiter.per_ip) {
            table.release(slot);
        }
        self.limiter.global.give_back();
    }
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("slot", &self.slot())
            .finish()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
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
    fn networks_can_have_a_per_ip_limit_of_their_own() {
        let nat: IpAddr = "10.1.2.3".parse().unwrap();
        let v6: IpAddr = "2001:db8::7".parse().unwrap();
        let l = Limiter::new(100, 1)
            .with_per_ip_overrides(&[
                ("10.0.0.0".parse().unwrap(), 8, 3),
                ("2001:db8::".parse().unwrap(), 32, 0),
                ("0.0.0.0".parse().unwrap(), 0, 2), // never reached for 10/8: the first wins
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
    fn ipv4_mapped_ipv6_is_the_ipv4_address() {
        let l = Limiter::new(10, 1).leak();
        let _a = l.try_acquire(v4(9)).unwrap();
        let mapped = IpAddr::V6(Ipv4Addr::new(127, 0, 0, 9).to_ipv6_mapped());
        assert_eq!(l.try_acquire(mapped).unwrap_err(), Rejection::PerIp);
        assert!(l.try_acquire(IpAddr::V6(Ipv6Addr::LOCALHOST)).is_ok());
    }
}
