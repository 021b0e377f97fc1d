//! Connection admission: the global limit and the per-client-IP limit, enforced together across
//! all cores and front doors without locks.
//!
//! Owns the global count (a [`GlobalCount`]: one cache-padded `AtomicUsize`, with a reserve of
//! free places per core) and the per-IP [`IpTable`]. Every admitted
//! connection holds a [`Permit`] from accept to close; dropping it releases both counts, so a count
//! cannot leak whatever path ends the connection (error, timeout, panic unwinding a task, shutdown
//! dropping the runtime). When a request rate per address is set, the permit also admits each
//! request against it ([`RequestRate`], state kept beside the address's table slot).
//!
//! Invariants:
//! - `active() <= max_connections` at every instant (see [`global`]).
//! - A key's count never exceeds `max_connections_per_ip` (see [`ip_table`]).
//! - The global place is taken first, so the number of live keys never exceeds `max_connections`
//!   and the table (twice that many slots) cannot fill in normal operation.
//! - IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) count as the IPv4 address; other IPv6 addresses
//!   count per `server.ipv6_prefix_len` network (each address by default).
//!
//! The default limits (`max_connections`, `max_connections_per_ip`, the default request rate)
//! may change while it runs ([`crate::reload`]): each is an atomic read by every admission, and a
//! change applies to what is admitted after it; permits already held stay valid.
//!
//! The limiter is created once and leaked (`&'static`): a permit then needs no reference count,
//! which would be one more shared cache line written per connection.

pub mod cap;
pub mod global;
pub mod ip_table;
pub mod overrides;
pub mod rate;

use std::net::IpAddr;
use std::time::Duration;

use crate::network::mapped;

pub use cap::Cap;
pub use global::GlobalCount;
pub use ip_table::{IpTable, TableReject};
pub use overrides::Overrides;
use rate::{LiveRate, Rate, RequestRate};

#[cfg(loom)]
use loom::sync::atomic::{AtomicU64, Ordering::Relaxed};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

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
    global: GlobalCount,
    /// `None` when the per-IP limit is disabled (`max_connections_per_ip: 0`); else the table
    /// and the default limit (changed by a reload; Relaxed: see [`Cap`]'s orderings).
    per_ip: Option<(IpTable, AtomicU64)>,
    /// The words of the request rate, one per table slot; `None` when no rate is set anywhere
    /// (it needs the per-IP table).
    rate_words: Option<RequestRate>,
    /// The request rate of addresses no override names (none when unset).
    rate: LiveRate,
    /// Mask applied to an IPv6 client's address before counting it (all ones: each address;
    /// `/64`: its network), see [`Limiter::with_ipv6_prefix`].
    v6_mask: u128,
    /// Networks with per-IP limits of their own; the first that holds an address applies.
    /// Scanned once per new connection, never per request; replaced by a reload.
    overrides: Overrides,
}

/// One network's own per-IP limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerIpLimits {
    pub network: IpAddr,
    pub prefix_len: u8,
    /// Connections per address (0: none).
    pub max_connections: u64,
    /// Requests per second per address: `None` the default rate, `Some(0)` none.
    pub max_requests: Option<u64>,
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
                AtomicU64::new(max_per_ip.min(ip_table::MAX_COUNT)),
            )
        });
        Limiter {
            global: GlobalCount::new(max_connections),
            per_ip,
            rate_words: None,
            rate: LiveRate::default(),
            v6_mask: u128::MAX,
            overrides: Overrides::default(),
        }
    }

    /// Gives the addresses of each network their own per-IP limits, the first matching entry
    /// winning. Needs the per-IP table (`max_per_ip > 0`); IPv6 networks no narrower than the
    /// IPv6 prefix (set it first).
    pub fn with_per_ip_overrides(mut self, list: &[PerIpLimits]) -> Self {
        if Overrides::own_rate(list) {
            self.make_rate_words();
        }
        self.set_per_ip_overrides(list).expect("a valid list");
        self
    }

    /// Puts a reloaded list of per-IP overrides in force, for connections admitted from now on;
    /// a network's request rate applies to the requests of its open connections too (see
    /// [`overrides`]). `Ok(false)`: the list in force already. `Err`: nothing changed.
    pub fn set_per_ip_overrides(&self, list: &[PerIpLimits]) -> Result<bool, &'static str> {
        if !list.is_empty() && self.per_ip.is_none() {
            return Err("overrides need the per-IP limit on, which needs a restart");
        }
        if Overrides::own_rate(list) && self.rate_words.is_none() {
            return Err("a request rate where none was set at startup needs a restart");
        }
        let prefix = u8::try_from(self.ipv6_prefix()).expect("at most 128");
        if list
            .iter()
            .any(|o| o.network.is_ipv6() && o.prefix_len > prefix)
        {
            return Err("an IPv6 network narrower than the server.ipv6_prefix_len in force");
        }
        self.overrides.replace(list)
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

    /// The per-IP limit for address `a` (in [`mapped`] form) and its class: its network's
    /// override (class `i + 1`), else `default` (class 0).
    fn per_ip_limit(&self, a: u128, default: u64) -> (u64, usize) {
        self.overrides
            .find(a)
            .map_or((default, 0), |(max, class)| (max, usize::from(class) + 1))
    }

    /// The request rate of addresses of class `class` (see [`Limiter::per_ip_limit`]).
    fn rate_of(&self, class: usize) -> Option<Rate> {
        match class
            .checked_sub(1)
            .and_then(|i| self.overrides.rate(i as u16))
        {
            Some(own) => own,
            None => self.rate.get(),
        }
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
            self.rate.set(Some(Rate::new(per_second, burst)));
            self.make_rate_words();
        }
        self
    }

    /// The rate words, made at startup once a rate is set (the default's or an override's).
    fn make_rate_words(&mut self) {
        if self.rate_words.is_none() {
            let (table, _) = self
                .per_ip
                .as_ref()
                .expect("a request rate needs the per-IP table");
            self.rate_words = Some(RequestRate::new(table.capacity()));
        }
    }

    /// A limiter that lives as long as the process (permits borrow it without a reference count).
    pub fn leak(self) -> &'static Limiter {
        Box::leak(Box::new(self))
    }

    /// Admits one connection from `ip`, or says why not.
    pub fn try_acquire(&'static self, ip: IpAddr) -> Result<Permit, Rejection> {
        self.try_acquire_global()?.for_address(ip)
    }

    /// Takes a place under `max_connections` only, for a connection whose client address is not
    /// known yet (it comes in a PROXY protocol header); [`Permit::for_address`] completes it.
    pub fn try_acquire_global(&'static self) -> Result<Permit, Rejection> {
        if !self.global.try_take() {
            return Err(Rejection::Global);
        }
        Ok(Permit {
            limiter: self,
            place: NO_SLOT,
        })
    }

    /// A reloaded `max_connections`, for connections admitted from now on: at most half the
    /// per-IP table (sized at startup for twice the `max_connections` of then), which keeps it
    /// from filling.
    pub fn set_max_connections(&self, n: usize) -> Result<(), &'static str> {
        if self
            .per_ip
            .as_ref()
            .is_some_and(|(t, _)| n > t.capacity() / 2)
        {
            return Err("above what the per-IP table was sized for at startup");
        }
        self.global.set_limit(n);
        Ok(())
    }

    /// A reloaded default `max_connections_per_ip`, for connections admitted from now on (those
    /// already open stay, even above it). Turning the per-IP limit on or off needs a restart.
    pub fn set_max_per_ip(&self, n: u64) -> Result<(), &'static str> {
        match &self.per_ip {
            Some((_, limit)) if n > 0 => {
                limit.store(n.min(ip_table::MAX_COUNT), Relaxed);
                Ok(())
            }
            _ => Err("turning the per-IP limit on or off needs a restart"),
        }
    }

    /// A reloaded default request rate (`per_second == 0`: none). A rate where none was set at
    /// startup (and no override had one) needs a restart: its per-address state is made then.
    pub fn set_request_rate(&self, per_second: u64, burst: u64) -> Result<(), &'static str> {
        if per_second > 0 && self.rate_words.is_none() {
            return Err("a request rate where none was set at startup needs a restart");
        }
        self.rate
            .set((per_second > 0).then(|| Rate::new(per_second, burst)));
        Ok(())
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
        self.per_ip.as_ref().map_or(0, |(_, l)| l.load(Relaxed))
    }

    /// The request rate per address and its burst, `None` when off.
    pub fn request_rate(&self) -> Option<(u64, u64)> {
        self.rate.get().map(|r| (r.per_second, r.burst))
    }

    /// Slots in the per-IP table (0 when per-IP limiting is off).
    pub fn ip_table_slots(&self) -> usize {
        self.per_ip.as_ref().map_or(0, |(t, _)| t.capacity())
    }
}

/// A permit's `place` when the per-IP table is off.
const NO_SLOT: u64 = u32::MAX as u64;

/// One admitted connection's place in both counts; released on drop.
pub struct Permit {
    limiter: &'static Limiter,
    /// Its address's slot in the per-IP table (low 32 bits; `NO_SLOT` when the table is off),
    /// 16 bits of the address's fingerprint for the request rate (bits 32..48, 0 when it is off)
    /// and its class (bits 48..64: 0, or `i + 1` when override `i` applies).
    /// One word, written at once: two narrower fields cost the benchmark's acquire+release pair
    /// 9 ns (a store-forwarding stall when the permit is read back whole).
    place: u64,
}

impl Permit {
    fn slot(&self) -> Option<usize> {
        let slot = self.place & NO_SLOT;
        (slot != NO_SLOT).then_some(slot as usize)
    }

    /// Completes a permit that holds only its global place (from
    /// [`Limiter::try_acquire_global`]) with a place under the per-IP limit of `ip`. On `Err`
    /// the permit is dropped, which gives its global place back.
    pub fn for_address(mut self, ip: IpAddr) -> Result<Permit, Rejection> {
        debug_assert_eq!(self.place, NO_SLOT, "a permit gets one address");
        let l = self.limiter;
        if let Some((table, limit)) = &l.per_ip {
            let a = mapped(ip);
            let (limit, class) = l.per_ip_limit(a, limit.load(Relaxed));
            match table.acquire(l.key_of(a), limit) {
                Ok(slot) => {
                    let fp = match l.rate_words {
                        Some(_) => table.fingerprint(slot) & 0xffff,
                        None => 0,
                    };
                    self.place = (class as u64) << 48 | fp << 32 | slot as u64;
                }
                Err(TableReject::LimitReached) => return Err(Rejection::PerIp),
                Err(TableReject::Full) => return Err(Rejection::IpTableFull),
            }
        }
        Ok(self)
    }

    /// Admits one request (HTTP request, WebSocket message, MCPB frame) of this connection's
    /// address against the request rate, or says how long until one would be admitted. Always
    /// admits when no rate is set.
    pub fn admit_request(&self) -> Result<(), Duration> {
        let l = self.limiter;
        let (Some(words), Some(slot)) = (&l.rate_words, self.slot()) else {
            return Ok(()); // no rate set anywhere
        };
        match l.rate_of((self.place >> 48) as usize) {
            Some(rate) => words.admit(slot, (self.place >> 32) & 0xffff, &rate, rate::now_us()),
            None => Ok(()),
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
            l.set_per_ip_overrides(&[limits("10.0.0.0", 8, 3, Some(1))]),
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
        l.set_per_ip_overrides(&[limits("10.0.0.0", 8, 3, Some(0))])
            .unwrap();
        assert!(
            (0..100).all(|_| more[1].admit_request().is_ok()),
            "no rate now"
        );
        l.set_per_ip_overrides(&[limits("10.0.0.0", 8, 3, Some(1))])
            .unwrap();
        assert!(more[1].admit_request().is_err(), "1 a second again");
        // Taken off the list: back to the defaults, for new and open connections alike (a
        // burst of 5 000 over the address's state: the 1 a second had used a second's worth).
        l.set_per_ip_overrides(&[]).unwrap();
        assert_eq!(l.try_acquire(nat).unwrap_err(), Rejection::PerIp);
        drop((first, open));
        assert!((0..2000).all(|_| more[0].admit_request().is_ok()));
        drop(more);

        // What cannot apply changes nothing.
        let narrow = limits("2001:db8::", 96, 5, None);
        assert!(
            l.set_per_ip_overrides(&[narrow]).is_err(),
            "narrower than /64"
        );
        let off = Limiter::new(100, 0).leak();
        assert!(off
            .set_per_ip_overrides(&[limits("10.0.0.0", 8, 3, None)])
            .is_err());
        let no_rate = Limiter::new(100, 1).leak();
        assert!(no_rate
            .set_per_ip_overrides(&[limits("10.0.0.0", 8, 3, Some(5))])
            .is_err());
        assert_eq!(no_rate.per_ip_overrides(), 0);
        assert_eq!(
            no_rate.set_per_ip_overrides(&[limits("10.0.0.0", 8, 3, None)]),
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
}
