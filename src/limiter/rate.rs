//! The per-client-IP request rate: requests (HTTP requests, WebSocket messages, MCPB frames) per
//! second per address, over all its connections, doors and cores, with a burst allowance.
//!
//! Owns one word per slot of the [`IpTable`](super::IpTable): an address's rate state lives at
//! the index of its table slot, which its connections hold while they are open, so a request
//! touches only the one cache line its own address already uses, and nothing is allocated or
//! locked after startup.
//!
//! # Algorithm
//!
//! GCRA (the generic cell rate algorithm, a token bucket kept as one timestamp): the word holds
//! the "theoretical arrival time" `tat` of the next request in microseconds since the process
//! started. A request at `now` is admitted when `max(tat, now) - now <= tolerance`, where
//! `interval = 1 s / rate` and `tolerance = (burst - 1) * interval`, and then moves `tat` on by one
//! interval. So `burst` requests may come at once, and after that one per interval.
//!
//! # Word
//!
//! `[tag: 16 bits][tat: 48 bits]` (48 bits of microseconds: 8.9 years). The tag is 16 bits of the
//! address's table fingerprint. A slot freed and taken by another address carries the old
//! address's `tat`; the new one sees a different tag and starts afresh. An address that closes
//! its last connection and comes back to the same slot keeps its state, so closing and reopening
//! a connection does not buy a new burst.
//!
//! # Invariants
//!
//! - Exact: every admitted request moves `tat` on by exactly one interval (a compare-and-swap on
//!   the one word), so over any stretch no more than `burst + elapsed * rate` requests of one
//!   address are admitted, however many cores serve it.
//! - Orderings: Relaxed. The word publishes nothing else; every change is a read-modify-write of
//!   that word alone, whose modification order is total, which is all the count needs.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

#[cfg(loom)]
use loom::sync::atomic::{AtomicU64, Ordering::Relaxed};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

const TAT_BITS: u32 = 48;
const TAT_MASK: u64 = (1 << TAT_BITS) - 1;

/// What a refused client is told (HTTP 429 body, WebSocket/MCPB JSON-RPC error).
pub const REFUSAL: &str = "too many requests from your address (max_requests_per_ip)";

/// The highest rate a limit may name (one request per microsecond).
pub const MAX_RATE: u64 = 1_000_000;

/// A rate: `per_second` requests a second, bursts of `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Microseconds between two requests at the steady rate.
    interval_us: u64,
    /// How far ahead of `now` the `tat` may be and still admit a request.
    tolerance_us: u64,
    pub per_second: u64,
    pub burst: u64,
}

impl Rate {
    /// `per_second` in `1..=MAX_RATE`; `burst` 0 means one second's worth.
    pub fn new(per_second: u64, burst: u64) -> Rate {
        assert!((1..=MAX_RATE).contains(&per_second));
        let burst = if burst == 0 { per_second } else { burst };
        let interval_us = 1_000_000 / per_second;
        Rate {
            interval_us,
            tolerance_us: (burst - 1).saturating_mul(interval_us),
            per_second,
            burst,
        }
    }
}

/// A rate that a configuration reload may change (the default one, `server.max_requests_per_ip`):
/// its fields in atomics, `interval_us == 0` meaning no rate. Read per request, written only by a
/// reload. Relaxed: a request that reads some fields before a reload and some after is judged by
/// a mix of the two rates, once; nothing else depends on them.
#[derive(Debug, Default)]
pub struct LiveRate {
    interval_us: AtomicU64,
    tolerance_us: AtomicU64,
    per_second: AtomicU64,
    burst: AtomicU64,
}

impl LiveRate {
    pub fn get(&self) -> Option<Rate> {
        let interval_us = self.interval_us.load(Relaxed);
        (interval_us > 0).then(|| Rate {
            interval_us,
            tolerance_us: self.tolerance_us.load(Relaxed),
            per_second: self.per_second.load(Relaxed),
            burst: self.burst.load(Relaxed),
        })
    }

    pub fn set(&self, rate: Option<Rate>) {
        let r = rate.unwrap_or(Rate {
            interval_us: 0,
            tolerance_us: 0,
            per_second: 0,
            burst: 0,
        });
        self.tolerance_us.store(r.tolerance_us, Relaxed);
        self.per_second.store(r.per_second, Relaxed);
        self.burst.store(r.burst, Relaxed);
        self.interval_us.store(r.interval_us, Relaxed);
    }
}

/// The words, one per per-IP table slot. See the module documentation.
pub struct RequestRate {
    words: Box<[AtomicU64]>,
}

impl RequestRate {
    pub fn new(slots: usize) -> RequestRate {
        epoch();
        RequestRate {
            words: (0..slots).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Admits one request of the address in table slot `slot` (fingerprint `fp`) at `now_us`
    /// against `rate`, or says how long until one would be admitted.
    pub fn admit(&self, slot: usize, fp: u64, rate: &Rate, now_us: u64) -> Result<(), Duration> {
        let tag = (fp & 0xffff) << TAT_BITS;
        let word = &self.words[slot];
        let mut current = word.load(Relaxed);
        loop {
            let tat = if current & !TAT_MASK == tag {
                current & TAT_MASK
            } else {
                0 // another address used this slot before: start afresh
            };
            let tat = tat.max(now_us);
            if tat - now_us > rate.tolerance_us {
                return Err(Duration::from_micros(tat - now_us - rate.tolerance_us));
            }
            let next = tag | ((tat + rate.interval_us) & TAT_MASK);
            match word.compare_exchange_weak(current, next, Relaxed, Relaxed) {
                Ok(_) => return Ok(()),
                Err(seen) => current = seen,
            }
        }
    }
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Microseconds since the first rate table was made (the clock [`RequestRate::admit`] takes).
pub fn now_us() -> u64 {
    epoch().elapsed().as_micros() as u64
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_one_per_interval() {
        let (r, rate) = (RequestRate::new(4), Rate::new(10, 3)); // one per 100 ms, three at once
        let t0 = 1_000_000;
        for _ in 0..3 {
            assert_eq!(r.admit(1, 7, &rate, t0), Ok(()));
        }
        // The fourth waits for the first interval to pass.
        assert_eq!(r.admit(1, 7, &rate, t0), Err(Duration::from_millis(100)));
        assert_eq!(
            r.admit(1, 7, &rate, t0 + 60_000),
            Err(Duration::from_millis(40))
        );
        assert_eq!(r.admit(1, 7, &rate, t0 + 100_000), Ok(()));
        assert!(r.admit(1, 7, &rate, t0 + 100_000).is_err());
        // Idle for long: the full burst again, not more.
        let later = t0 + 10_000_000;
        for _ in 0..3 {
            assert_eq!(r.admit(1, 7, &rate, later), Ok(()));
        }
        assert!(r.admit(1, 7, &rate, later).is_err());
        // Other slots are other addresses.
        assert_eq!(r.admit(2, 7, &rate, t0), Ok(()));
    }

    #[test]
    fn a_new_address_in_a_used_slot_starts_afresh_and_a_returning_one_does_not() {
        let (r, rate) = (RequestRate::new(1), Rate::new(1, 1));
        assert_eq!(r.admit(0, 0xaaaa, &rate, 5_000_000), Ok(()));
        assert!(r.admit(0, 0xaaaa, &rate, 5_000_000).is_err());
        // Same slot, another fingerprint: not charged for the first address's requests.
        assert_eq!(r.admit(0, 0xbbbb, &rate, 5_000_000), Ok(()));
        assert!(r.admit(0, 0xbbbb, &rate, 5_000_001).is_err());
    }

    #[test]
    fn many_threads_of_one_address_get_exactly_the_burst() {
        let r = std::sync::Arc::new(RequestRate::new(1));
        let rate = Rate::new(1, 1000);
        let now = now_us() + 1_000_000;
        let admitted: usize = (0..4)
            .map(|_| {
                let r = r.clone();
                std::thread::spawn(move || {
                    (0..1000)
                        .filter(|_| r.admit(0, 3, &rate, now).is_ok())
                        .count()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .sum();
        assert_eq!(admitted, 1000);
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    //! Run with `RUSTFLAGS="--cfg loom" cargo test --release --lib loom`.
    use super::*;
    use loom::sync::Arc;
    use loom::thread;

    #[test]
    fn loom_two_requests_racing_for_the_last_allowance_get_it_once() {
        loom::model(|| {
            let (r, rate) = (Arc::new(RequestRate::new(1)), Rate::new(1, 2));
            r.admit(0, 9, &rate, 1_000_000).unwrap();
            let r2 = r.clone();
            let h = thread::spawn(move || r2.admit(0, 9, &rate, 1_000_000).is_ok());
            let mine = r.admit(0, 9, &rate, 1_000_000).is_ok();
            let theirs = h.join().unwrap();
            assert!(
                mine ^ theirs,
                "exactly one of two gets the last place of the burst"
            );
        });
    }

    #[test]
    fn loom_a_new_address_racing_the_old_one_is_charged_once() {
        loom::model(|| {
            // Slot 0 last held fingerprint 1, far in debt; fingerprint 2 now holds it and two of
            // its requests race: with burst 1, one is admitted.
            let (r, rate) = (Arc::new(RequestRate::new(1)), Rate::new(1, 1));
            r.admit(0, 1, &rate, 0).unwrap();
            let r2 = r.clone();
            let h = thread::spawn(move || r2.admit(0, 2, &rate, 10).is_ok());
            let mine = r.admit(0, 2, &rate, 10).is_ok();
            assert!(mine ^ h.join().unwrap());
        });
    }
}
