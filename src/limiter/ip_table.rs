//! The per-client-IP connection table: sharded, fixed-size, open-addressed, lock-free.
//!
//! Owns one count per live client IP. Sized once at startup (twice `max_connections` slots, rounded
//! up to a power of two of cache lines); it never grows, never allocates after construction and
//! never takes a lock.
//!
//! # Slot word
//!
//! A slot is one `AtomicU64`: `[fingerprint: 40 bits][claiming: 1 bit][count: 23 bits]`.
//! `0` is an empty slot. `fp|CLAIMING` is a slot being claimed for a new key (count 0). `fp|n` with
//! `n >= 1` is a live key with `n` connections; `fp|0` is a live key whose last connection has
//! just been released, for the instant before that release empties the slot. The fingerprint
//! and the home line come from one keyed hash of the address (`foldhash`, seeded with a
//! per-process random key: a few ns where SipHash took about 15, measured with `cargo bench
//! --bench limiter`), so nobody can aim collisions at a window; two addresses are confused only
//! when 40 fingerprint bits *and* the home line agree.
//!
//! # Probing
//!
//! A key lives in a window of [`WINDOW`] slots: its home cache line and the next one (the lines are
//! the shards: a core touches only the one or two lines of the keys it serves). No tombstones: a
//! slot whose count drops to 0 is emptied by that release and any key may take it.
//!
//! # Invariants
//!
//! - **Exact:** at any moment a key has at most one live slot in its window, and a live count never
//!   exceeds the limit, not even transiently (increments are compare-and-swap against the limit).
//! - **Claim rule:** a claimer first stores `fp|CLAIMING` into an empty slot, then rescans its
//!   window. Live beats claiming (it backs off and increments the live slot); between two claims the
//!   lower window position wins; the lower one waits until the higher one has backed off. Because a
//!   claim is a store followed by a scan of the other slots (SeqCst, a Dekker pair), of two claimers
//!   at least one sees the other, so two live slots for one key cannot both be published.
//! - **Cleanup:** the release that takes a count from 1 to 0 then writes 0 (empty) unless an
//!   acquirer of the key revived the slot first (`fp|0` counts as live for acquirers and
//!   claimers alike), so after any churn the table is empty again.
//! - A claimer that finds a pending claim for its key waits for it to resolve instead of claiming a
//!   second slot, so contention on one new key costs one claim, not a storm of them.
//!
//! The racy paths are model-checked with `loom` (`RUSTFLAGS="--cfg loom"`, see `tests` below).

use std::hash::BuildHasher;

use crossbeam_utils::CachePadded;

#[cfg(loom)]
use loom::sync::atomic::{AtomicU64, Ordering};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicU64, Ordering};

/// The keyed hash: a per-process random key, except under loom, which replays a model's
/// executions and needs each to place its keys in the same slots (a random key there made the
/// replays diverge and loom report nonsense).
#[cfg(not(loom))]
type KeyedHash = foldhash::quality::RandomState;
#[cfg(loom)]
type KeyedHash = foldhash::quality::FixedState;

/// Slots per cache line (8 x 8 bytes). Under loom a line is 2 slots to keep the model small.
const SLOTS_PER_LINE: usize = if cfg!(loom) { 2 } else { 8 };
/// A key's window: its home line and the next one.
pub const WINDOW: usize = 2 * SLOTS_PER_LINE;

const COUNT_BITS: u32 = 23;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;
const CLAIMING: u64 = 1 << COUNT_BITS;
const FP_SHIFT: u32 = COUNT_BITS + 1;
const FP_MASK: u64 = !((1u64 << FP_SHIFT) - 1);

/// The largest per-key count a slot can hold (the per-IP limit is validated against it).
pub const MAX_COUNT: u64 = COUNT_MASK;

/// Why a key could not be counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableReject {
    /// The key already holds `limit` connections.
    LimitReached,
    /// Every slot of the key's window holds another live key (attack or misconfiguration).
    Full,
}

type Line = CachePadded<[AtomicU64; SLOTS_PER_LINE]>;

/// See the module documentation.
pub struct IpTable {
    lines: Box<[Line]>,
    /// `lines.len() - 1`; `lines.len()` is a power of two, at least 2.
    line_mask: usize,
    hasher: KeyedHash,
}

impl IpTable {
    /// A table with at least `min_slots` slots.
    pub fn with_min_slots(min_slots: usize) -> Self {
        let lines = min_slots
            .div_ceil(SLOTS_PER_LINE)
            .next_power_of_two()
            .max(2);
        let lines: Box<[Line]> = (0..lines)
            .map(|_| CachePadded::new(std::array::from_fn(|_| AtomicU64::new(0))))
            .collect();
        IpTable {
            line_mask: lines.len() - 1,
            lines,
            #[cfg(not(loom))]
            hasher: KeyedHash::default(),
            #[cfg(loom)]
            hasher: KeyedHash::with_seed(0x9e37_79b9_7f4a_7c15),
        }
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.lines.len() * SLOTS_PER_LINE
    }

    fn locate(&self, key: u128) -> (usize, u64) {
        let h = self.hasher.hash_one(key);
        let home = (h as usize) & self.line_mask;
        let mut fp = h >> FP_SHIFT;
        if fp == 0 {
            fp = 1; // a fingerprint is never 0, so a live or claiming word is never 0
        }
        (home, fp << FP_SHIFT)
    }

    /// Global slot index of window position `pos` for a key whose home line is `home`.
    fn index(&self, home: usize, pos: usize) -> usize {
        let line = (home + pos / SLOTS_PER_LINE) & self.line_mask;
        line * SLOTS_PER_LINE + pos % SLOTS_PER_LINE
    }

    fn slot(&self, index: usize) -> &AtomicU64 {
        &self.lines[index / SLOTS_PER_LINE][index % SLOTS_PER_LINE]
    }

    /// Counts one more connection for `key` unless it already has `limit` (`1..=MAX_COUNT`).
    /// Returns the slot index to hand back to [`IpTable::release`].
    ///
    /// Orderings: every access here is SeqCst. The claim protocol is a store-then-scan across
    /// different slots (Dekker), which needs a single total order of the claim stores and the scan
    /// loads; weaker orderings would let two claimers miss each other. On x86 a SeqCst load is a
    /// plain load and every read-modify-write is already a full barrier, so this costs nothing.
    pub fn acquire(&self, key: u128, limit: u64) -> Result<usize, TableReject> {
        debug_assert!((1..=MAX_COUNT).contains(&limit));
        let (home, tag) = self.locate(key);
        let mut spins = 0u32;
        'retry: loop {
            let mut empty = None;
            let mut pending_claim = false;
            for pos in 0..WINDOW {
                let index = self.index(home, pos);
                let slot = self.slot(index);
                let mut word = slot.load(Ordering::SeqCst);
                if word == 0 {
                    empty.get_or_insert(index);
                    continue;
                }
                if word & FP_MASK != tag {
                    continue;
                }
                if word & CLAIMING != 0 {
                    pending_claim = true;
                    continue;
                }
                // The key is live here: one compare-and-swap against the limit.
                loop {
                    if word & COUNT_MASK >= limit {
                        return Err(TableReject::LimitReached);
                    }
                    match slot.compare_exchange_weak(
                        word,
                        word + 1,
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                    ) {
                        Ok(_) => return Ok(index),
                        // Still live for this key (count 0 too: a last release not yet
                        // emptied, which the increment revives): retry with the fresh count.
                        Err(now) if now & (FP_MASK | CLAIMING) == tag => word = now,
                        // Freed (or reused) under us: start over.
                        Err(_) => continue 'retry,
                    }
                }
            }
            if pending_claim {
                // Someone is claiming a slot for this very key: let it finish, then join it.
                snooze(&mut spins);
                continue 'retry;
            }
            let Some(claimed) = empty else {
                return Err(TableReject::Full);
            };
            let slot = self.slot(claimed);
            if slot
                .compare_exchange(0, tag | CLAIMING, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
            {
                continue 'retry;
            }
            // Our claim is published; look for competitors for the same key.
            loop {
                match self.competitor(home, tag, claimed) {
                    Competitor::None => {
                        // Only we write a slot while it is in our claiming state. Release is
                        // enough: a competitor's scan counts claiming and live alike, so what it
                        // must see (our claim) was already published by the SeqCst claim.
                        slot.store(tag | 1, Ordering::Release);
                        return Ok(claimed);
                    }
                    Competitor::Wins => {
                        // Backing off: a waiter only needs to see this eventually (coherence).
                        slot.store(0, Ordering::Release);
                        continue 'retry;
                    }
                    Competitor::Yields => snooze(&mut spins),
                }
            }
        }
    }

    /// Scans the window of `tag` for another slot of the same key than our claim at `claimed`.
    fn competitor(&self, home: usize, tag: u64, claimed: usize) -> Competitor {
        let mut mine_seen = false;
        let mut wait = false;
        for pos in 0..WINDOW {
            let index = self.index(home, pos);
            if index == claimed {
                mine_seen = true;
                continue;
            }
            let word = self.slot(index).load(Ordering::SeqCst);
            if word == 0 || word & FP_MASK != tag {
                continue;
            }
            if word & CLAIMING == 0 || !mine_seen {
                // Live beats claiming; a claim at a lower window position beats ours.
                return Competitor::Wins;
            }
            wait = true; // a claim at a higher position: it will back off when it sees ours
        }
        if wait {
            Competitor::Yields
        } else {
            Competitor::None
        }
    }

    /// The fingerprint of the key in live slot `index`, for a caller that holds a count on it.
    /// Relaxed is enough: that caller's own `acquire` wrote a word of this key to the slot, so it
    /// reads that word or a later one, and every word of a slot with a count held on it carries
    /// the same fingerprint.
    pub fn fingerprint(&self, index: usize) -> u64 {
        self.slot(index).load(Ordering::Relaxed) >> FP_SHIFT
    }

    /// Releases one count taken by [`IpTable::acquire`] at `index`. The last release empties the
    /// slot.
    ///
    /// One `fetch_sub`, never a retry: two threads releasing and acquiring on one address (a
    /// client's connections spread over the cores) no longer fail each other's
    /// compare-and-swap. The release that takes the count to 0 leaves `fp|0`, a live slot with
    /// no connection, and then empties it, unless an acquirer of the same key has revived it
    /// first (its count then goes 0 -> 1 in place, and its own last release empties it). Every
    /// `fp|0` is so followed by an emptying attempt, and the attempt fails only when the word
    /// has moved on (revived, or emptied by another last release), so churn still ends empty.
    ///
    /// SeqCst for the same reason as in `acquire`: emptying a slot is part of what a concurrent
    /// claimer's scan must see in the one total order, and a claimer counts `fp|0` as live.
    pub fn release(&self, index: usize) {
        let slot = self.slot(index);
        let before = slot.fetch_sub(1, Ordering::SeqCst);
        debug_assert!(
            before & COUNT_MASK >= 1 && before & CLAIMING == 0,
            "release of {before:#x}"
        );
        if before & COUNT_MASK == 1 {
            let _ = slot.compare_exchange(before - 1, 0, Ordering::SeqCst, Ordering::SeqCst);
        }
    }

    /// Number of keys with live connections (a scan; for scrapes and tests, not the hot path).
    /// Relaxed: a statistic of independent slots, not used to synchronize anything.
    pub fn live_keys(&self) -> usize {
        self.lines
            .iter()
            .flat_map(|line| line.iter())
            .filter(|slot| {
                let word = slot.load(Ordering::Relaxed);
                word & CLAIMING == 0 && word & COUNT_MASK != 0
            })
            .count()
    }

    /// The count held at `index` (tests and diagnostics).
    pub fn count_at(&self, index: usize) -> u64 {
        self.slot(index).load(Ordering::SeqCst) & COUNT_MASK
    }
}

enum Competitor {
    None,
    Wins,
    Yields,
}

/// Waits a little for another claimer; claims last nanoseconds, so spin first, then yield.
fn snooze(spins: &mut u32) {
    *spins += 1;
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    if *spins < 64 {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn same_key_shares_one_slot_and_empties() {
        let t = IpTable::with_min_slots(64);
        let a = t.acquire(7, 3).unwrap();
        let b = t.acquire(7, 3).unwrap();
        let c = t.acquire(7, 3).unwrap();
        assert_eq!((a, b), (b, c));
        assert_eq!(t.acquire(7, 3), Err(TableReject::LimitReached));
        assert_eq!(t.count_at(a), 3);
        assert_eq!(t.live_keys(), 1);
        for _ in 0..3 {
            t.release(a);
        }
        assert_eq!(t.live_keys(), 0);
        assert_eq!(t.count_at(a), 0);
    }

    #[test]
    fn distinct_keys_fill_the_window_then_full() {
        // A 2-line table: every key's window is the whole table.
        let t = IpTable::with_min_slots(1);
        assert_eq!(t.capacity(), WINDOW);
        let held: Vec<usize> = (0..WINDOW as u128)
            .map(|k| t.acquire(k, 1).unwrap())
            .collect();
        assert_eq!(t.live_keys(), WINDOW);
        assert_eq!(t.acquire(1000, 1), Err(TableReject::Full));
        t.release(held[3]);
        assert!(
            t.acquire(1000, 1).is_ok(),
            "a freed slot is reused by another key"
        );
    }

    #[test]
    fn racing_first_connections_of_many_threads_share_one_slot() {
        // Loom proves the two-thread interleavings; this runs four real threads through the
        // claim race many times (three or more threads blow up loom's state space).
        let t = Arc::new(IpTable::with_min_slots(64));
        let barrier = Arc::new(std::sync::Barrier::new(4));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (t, barrier) = (t.clone(), barrier.clone());
                std::thread::spawn(move || {
                    (0..2_000u128)
                        .map(|round| {
                            barrier.wait();
                            let slot = t.acquire(round, 100).unwrap();
                            barrier.wait();
                            t.release(slot);
                            slot
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let slots: Vec<Vec<usize>> = threads.into_iter().map(|h| h.join().unwrap()).collect();
        for round in 0..2_000 {
            assert!(
                slots.iter().all(|s| s[round] == slots[0][round]),
                "round {round}: two slots"
            );
        }
        assert_eq!(t.live_keys(), 0);
    }

    #[test]
    fn threads_churn_to_empty_and_never_exceed_limit() {
        let t = Arc::new(IpTable::with_min_slots(256));
        let over = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads: Vec<_> = (0..4)
            .map(|n| {
                let t = t.clone();
                let over = over.clone();
                std::thread::spawn(move || {
                    let mut held = Vec::new();
                    for i in 0..50_000u128 {
                        let key = (i * 7 + n) % 13;
                        if let Ok(idx) = t.acquire(key, 5) {
                            if t.count_at(idx) > 5 {
                                over.store(true, std::sync::atomic::Ordering::Relaxed);
                            }
                            held.push(idx);
                        }
                        if held.len() > 3 || i % 3 == 0 {
                            if let Some(idx) = held.pop() {
                                t.release(idx);
                            }
                        }
                    }
                    for idx in held {
                        t.release(idx);
                    }
                })
            })
            .collect();
        for th in threads {
            th.join().unwrap();
        }
        assert!(!over.load(std::sync::atomic::Ordering::Relaxed));
        assert_eq!(t.live_keys(), 0);
        assert!((0..t.capacity()).all(|i| t.slot(i).load(Ordering::SeqCst) == 0));
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    //! Run with `RUSTFLAGS="--cfg loom" cargo test --release --lib loom`.
    use super::*;
    use loom::sync::Arc;
    use loom::thread;

    fn all_empty(t: &IpTable) -> bool {
        (0..t.capacity()).all(|i| t.slot(i).load(Ordering::SeqCst) == 0)
    }

    #[test]
    fn loom_concurrent_first_connections_share_one_slot() {
        loom::model(|| {
            let t = Arc::new(IpTable::with_min_slots(1));
            let t2 = t.clone();
            let h = thread::spawn(move || t2.acquire(42, 10).unwrap());
            let a = t.acquire(42, 10).unwrap();
            let b = h.join().unwrap();
            assert_eq!(a, b, "one key, one slot");
            assert_eq!(t.count_at(a), 2);
            t.release(a);
            t.release(b);
            assert!(all_empty(&t));
        });
    }

    #[test]
    fn loom_limit_is_never_exceeded_by_racing_first_connections() {
        loom::model(|| {
            let t = Arc::new(IpTable::with_min_slots(1));
            let t2 = t.clone();
            let h = thread::spawn(move || t2.acquire(5, 1));
            let a = t.acquire(5, 1);
            let b = h.join().unwrap();
            assert!(
                a.is_ok() ^ b.is_ok(),
                "exactly one of two gets the only place"
            );
            let idx = a.or(b).unwrap();
            assert_eq!(t.count_at(idx), 1);
            t.release(idx);
            assert!(all_empty(&t));
        });
    }

    #[test]
    fn loom_release_racing_a_claim() {
        loom::model(|| {
            let t = Arc::new(IpTable::with_min_slots(1));
            let first = t.acquire(9, 10).unwrap();
            let t2 = t.clone();
            let h = thread::spawn(move || t2.release(first));
            let second = t.acquire(9, 10).unwrap();
            h.join().unwrap();
            assert_eq!(t.live_keys(), 1);
            assert_eq!(t.count_at(second), 1);
            t.release(second);
            assert!(all_empty(&t));
        });
    }

    #[test]
    fn loom_slot_reuse_after_zero() {
        loom::model(|| {
            // A full table: the only way in for a new key is the slot another key frees.
            let t = Arc::new(IpTable::with_min_slots(1));
            let held: Vec<usize> = (10..10 + WINDOW as u128)
                .map(|k| t.acquire(k, 10).unwrap())
                .collect();
            let freed = held[0];
            let t2 = t.clone();
            let h = thread::spawn(move || t2.release(freed));
            let got = t.acquire(99, 10);
            h.join().unwrap();
            match got {
                Ok(slot) => assert_eq!(slot, freed, "the new key took the freed slot"),
                Err(e) => assert_eq!(
                    e,
                    TableReject::Full,
                    "before the release the table was full"
                ),
            }
            for slot in got.into_iter().chain(held.into_iter().skip(1)) {
                t.release(slot);
            }
            assert!(all_empty(&t));
        });
    }
}
