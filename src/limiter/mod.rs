//! Connection admission: the global limit and the per-client-IP limit, enforced together across
//! all cores and front doors without locks.
//!
//! Owns the global count (a [`GlobalCount`]: one cache-padded `AtomicUsize`, with a reserve of
//! free places per core) and the per-IP [`IpTable`] (with a reserve of per-address places per
//! core). Every admitted
//! connection holds a [`Permit`] from accept to close; dropping it releases both counts, so a count
//! cannot leak whatever path ends the connection (error, timeout, panic unwinding a task, shutdown
//! dropping the runtime). When a request rate per address is set, the permit also admits each
//! request against it ([`RequestRate`], state kept beside the address's table slot). When a
//! new-connection rate per address is set, admission charges each connection against it too
//! (the same algorithm, in words of its own), before any byte of the connection is read: a
//! client opening and closing connections faster (each a TLS handshake, say) is refused at
//! once. The addresses of override networks are not charged: they are listed because they are
//! many clients behind one address.
//!
//! Invariants:
//! - `active() <= max_connections` at every instant (see [`global`]).
//! - A key's count never exceeds `max_connections_per_ip` (see [`ip_table`]).
//! - The global place is taken first, so the number of live keys never exceeds `max_connections`
//!   and the table (twice that many slots) cannot fill in normal operation.
//! - IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) count as the IPv4 address; other IPv6 addresses
//!   count per `server.ipv6_prefix_len` network (each address by default).
//!
//! The default limits (`max_connections`, `max_connections_per_ip`, the default request rate),
//! the overrides and the IPv6 prefix may change while it runs ([`crate::reload`]): each is
//! read by every admission, and a change applies to what is admitted after it; permits already
//! held stay valid, and release where they were counted (a permit keeps its slot, not its key).
//!
//! The limiter is created once and leaked (`&'static`): a permit then needs no reference count,
//! which would be one more shared cache line written per connection.

pub mod cap;
pub mod global;
pub mod ip_reserve;
pub mod ip_table;
pub mod lane;
pub mod overrides;
pub mod rate;

use std::net::IpAddr;
use std::time::Duration;

use crate::network::mapped;

pub use cap::Cap;
pub use global::GlobalCount;
pub use ip_table::{IpTable, Place, TableReject};
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
    /// This client address opens connections faster than `max_new_connections_per_ip`.
    ConnectionRate,
    /// No slot in the per-IP table for a new address (attack or misconfiguration).
    IpTableFull,
}

impl Rejection {
    pub const ALL: [Rejection; 4] = [
        Rejection::Global,
        Rejection::PerIp,
        Rejection::ConnectionRate,
        Rejection::IpTableFull,
    ];

    /// Metric label value.
    pub fn label(self) -> &'static str {
        match self {
            Rejection::Global => "global",
            Rejection::PerIp => "per_ip",
            Rejection::ConnectionRate => "connection_rate",
            Rejection::IpTableFull => "ip_table_full",
        }
    }

    /// HTTP status owed to a rejected client: 429 when it is this client's own fault, 503 otherwise.
    pub fn http_status(self) -> u16 {
        match self {
            Rejection::PerIp | Rejection::ConnectionRate => 429,
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
    /// The words of the new-connection rate, one per table slot; `None` when it was not set at
    /// startup.
    connection_words: Option<RequestRate>,
    /// The new-connection rate of addresses no override names (none when unset).
    connection_rate: LiveRate,
    /// Prefix length an IPv6 client's address is cut to before counting it (128: each
    /// address; 64: its /64 network), see [`Limiter::with_ipv6_prefix`]; changed by a reload.
    /// Relaxed: it guards nothing else; a connection admitted while a reload changes it is
    /// keyed by the old or the new length, and either is right (a permit releases by its slot,
    /// never by its key).
    v6_prefix: AtomicU64,
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
            connection_words: None,
            connection_rate: LiveRate::default(),
            v6_prefix: AtomicU64::new(128),
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
        let prefix = u8::try_from(self.ipv6_prefix()).expect("at most 128");
        self.set_per_ip_keys(prefix, list).expect("a valid list");
        self
    }

    /// Puts a reloaded IPv6 prefix length (see [`Limiter::with_ipv6_prefix`]) and list of
    /// per-IP overrides in force together, since no IPv6 network of the list may be narrower
    /// than the prefix (addresses that share a count must share its limit). For connections
    /// admitted from now on: an open one stays counted where it was admitted (its address's old
    /// key or entry), though a network's request rate applies to the requests of its open
    /// connections too (see [`overrides`]). `Ok(false)`: both in force already. `Err`: nothing
    /// changed.
    pub fn set_per_ip_keys(
        &self,
        ipv6_prefix: u8,
        list: &[PerIpLimits],
    ) -> Result<bool, &'static str> {
        assert!((1..=128).contains(&ipv6_prefix));
        if !list.is_empty() && self.per_ip.is_none() {
            return Err("overrides need the per-IP limit on, which needs a restart");
        }
        if Overrides::own_rate(list) && self.rate_words.is_none() {
            return Err("a request rate where none was set at startup needs a restart");
        }
        if list
            .iter()
            .any(|o| o.network.is_ipv6() && o.prefix_len > ipv6_prefix)
        {
            return Err("an IPv6 override network narrower than server.ipv6_prefix_len");
        }
        let replaced = self.overrides.replace(list)?;
        let was = self.v6_prefix.swap(u64::from(ipv6_prefix), Relaxed);
        Ok(replaced || was != u64::from(ipv6_prefix))
    }

    /// Counts IPv6 clients (not IPv4-mapped ones) per `/prefix_len` network instead of per
    /// address, for the per-IP limit and the request rate: one holder of a /64 has 2^64 addresses.
    /// `prefix_len` in `1..=128`; 128 (the default) counts each address.
    pub fn with_ipv6_prefix(self, prefix_len: u8) -> Self {
        assert!((1..=128).contains(&prefix_len));
        self.v6_prefix.store(u64::from(prefix_len), Relaxed);
        self
    }

    /// The per-IP table's key of address `a` (in [`mapped`] form, so IPv4 and IPv4-mapped IPv6
    /// are one key): IPv6 addresses are cut to the configured prefix.
    fn key_of(&self, a: u128) -> u128 {
        const V4_MAPPED: u128 = 0xffff; // `::ffff:0:0/96`, shifted down by 32
        if a >> 32 == V4_MAPPED {
            a
        } else {
            a & (u128::MAX << (128 - self.v6_prefix.load(Relaxed)))
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
        self.v6_prefix.load(Relaxed) as u32
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

    /// Also limits how fast each address may open connections: `per_second` a second, with
    /// bursts of `burst` (0: one second's worth); `per_second == 0`: no limit. Addresses of
    /// override networks are not limited. Needs the per-IP table (`max_per_ip > 0`).
    pub fn with_connection_rate(mut self, per_second: u64, burst: u64) -> Self {
        if per_second > 0 {
            let (table, _) = self
                .per_ip
                .as_ref()
                .expect("a connection rate needs the per-IP table");
            self.connection_words = Some(RequestRate::new(table.capacity()));
            self.connection_rate.set(Some(Rate::new(per_second, burst)));
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
        let why = "a request rate where none was set at startup needs a restart";
        reload_rate((&self.rate, &self.rate_words), per_second, burst, why)
    }

    /// A reloaded new-connection rate (`per_second == 0`: none); turning it on where it was off
    /// at startup needs a restart (its per-address state is made then).
    pub fn set_connection_rate(&self, per_second: u64, burst: u64) -> Result<(), &'static str> {
        let why = "a connection rate where none was set at startup needs a restart";
        let rate = (&self.connection_rate, &self.connection_words);
        reload_rate(rate, per_second, burst, why)
    }

    /// Gives the places waiting in this thread's reserves back: the global ones to the global
    /// count, the per-address ones to their table slots. Each worker calls it on every tick of
    /// its sweeper, so no place outlives its connection by more than a tick, and after any
    /// amount of churn the table is empty again within one tick.
    pub fn give_back_own_reserves(&self) {
        self.global.give_back_own_reserve();
        if let Some((table, _)) = &self.per_ip {
            table.give_back_own_reserve();
        }
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

    /// The new-connection rate per address and its burst, `None` when off.
    pub fn connection_rate(&self) -> Option<(u64, u64)> {
        self.connection_rate.get().map(|r| (r.per_second, r.burst))
    }

    /// Slots in the per-IP table (0 when per-IP limiting is off).
    pub fn ip_table_slots(&self) -> usize {
        self.per_ip.as_ref().map_or(0, |(t, _)| t.capacity())
    }

    /// Slots of the per-IP table in use (0 when per-IP limiting is off).
    pub fn ip_table_slots_used(&self) -> usize {
        self.per_ip.as_ref().map_or(0, |(t, _)| t.used_slots())
    }
}

/// Puts a reloaded rate in force in `live` (`per_second == 0`: none), or refuses (`why`) one
/// that would need per-address `words` not made at startup.
fn reload_rate(
    (live, words): (&LiveRate, &Option<RequestRate>),
    per_second: u64,
    burst: u64,
    why: &'static str,
) -> Result<(), &'static str> {
    if per_second > 0 && words.is_none() {
        return Err(why);
    }
    live.set((per_second > 0).then(|| Rate::new(per_second, burst)));
    Ok(())
}

/// A permit's `place` when the per-IP table is off.
const NO_SLOT: u64 = u32::MAX as u64;
/// The bit of a permit's `place` that keeps [`Place::shared`].
const SHARED_BIT: u32 = 63;
/// A permit's class, bits 48..63 (below `overrides::MAX_NETWORKS + 1`, far below 2^15).
const CLASS_MASK: u64 = 0x7fff;

/// One admitted connection's place in both counts; released on drop.
pub struct Permit {
    limiter: &'static Limiter,
    /// Its address's slot in the per-IP table (low 32 bits; `NO_SLOT` when the table is off),
    /// 16 bits of the address's fingerprint for the request rate (bits 32..48, 0 when it is off),
    /// its class (bits 48..63: 0, or `i + 1` when override `i` applies) and whether its
    /// address held other places when it was admitted (bit 63, see [`IpTable::release`]).
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
                Ok(place) => {
                    let fp = match l.rate_words {
                        Some(_) => table.fingerprint(place.slot) & 0xffff,
                        None => 0,
                    };
                    self.place = u64::from(place.shared) << SHARED_BIT
                        | (class as u64) << 48
                        | fp << 32
                        | place.slot as u64;
                    // Charged once the place is held (the words of a slot are its address's;
                    // on refusal, dropping the permit gives the place back). Nothing is read
                    // when the rate was off at startup.
                    if let Some(words) = l.connection_words.as_ref().filter(|_| class == 0) {
                        if let Some(rate) = l.connection_rate.get() {
                            let fp = table.fingerprint(place.slot) & 0xffff;
                            if words.admit(place.slot, fp, &rate, rate::now_us()).is_err() {
                                return Err(Rejection::ConnectionRate);
                            }
                        }
                    }
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
        match l.rate_of((self.place >> 48 & CLASS_MASK) as usize) {
            Some(rate) => words.admit(slot, (self.place >> 32) & 0xffff, &rate, rate::now_us()),
            None => Ok(()),
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let (Some(slot), Some((table, _))) = (self.slot(), &self.limiter.per_ip) {
            table.release(Place {
                slot,
                shared: self.place >> SHARED_BIT != 0,
            });
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
mod tests;
