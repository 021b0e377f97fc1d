//! The per-client-IP connection table: sharded, fixed-size, open-addressed, lock-free.
//!
//! Owns one count per live client IP, and the per-thread reserves of places in front of it
//! ([`super::ip_reserve`]). Sized once at startup (twice `max_connections` slots, rounded up to a
//! power of two of cache lines); it never grows, never allocates after construction and never
//! takes a lock.
//!
//! # Slot word
//!
//! A slot is one `AtomicU64`: `[fingerprint: 40 bits][claiming: 1 bit][count: 23 bits]`.
//! `0` is an empty slot. `fp|CLAIMING` is a slot being claimed for a new key (count 0). `fp|n` with
//! `n >= 1` is a live key with `n` places: its connections, and the places of its closed
//! connections kept in threads' reserves; `fp|0` is a live key whose last place has just been
//! released, for the instant before that release empties the slot. The fingerprint
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
//! # Reserves
//!
//! A connection admitted while its address held other places (a client with several
//! connections, spread over the cores) leaves its place, when it closes, in its thread's reserve
//! rather than taking it off the count ([`IpTable::release`]); the address's next connection on
//! that thread takes it back without writing the slot, whose line the cores then only read. A
//! thread that finds the address at its limit first takes the places out of every thread's
//! reserve and off the slot's count, then counts itself if that made room; so does one that
//! finds its window full, for the window's slots. So a reserved place is free for whoever
//! needs it. Each worker also gives its reserve back to the slots on every tick of its sweeper
//! ([`IpTable::give_back_own_reserve`]), so a place outlives its connection by at most one
//! tick. A key is counted among the live ones ([`IpTable::live_keys`], the tracked-address
//! gauge) only while it has connections.
//!
//! # Invariants
//!
//! - **Exact:** at any moment a key has at most one live slot in its window, and a live count
//!   (connections and reserved places) never exceeds the limit, not even transiently (increments
//!   are compare-and-swap against the limit; a reserved place was counted when its connection
//!   came). A connection takes a reserved place only while the count is within the limit (a
//!   reload may have lowered it), and is refused only when the count is at the limit after the
//!   reserves gave theirs back: as in [`super::global`], a close racing that look may be missed,
//!   as it would be at the count, and so may places on their way from a reserve to the count
//!   (taken out of it and not yet off the count, by another refusal's take-back or a sweeper's
//!   give-back racing the look: nanoseconds, never a place counted twice or lost).
//! - **Claim rule:** a claimer first stores `fp|CLAIMING` into an empty slot, then rescans its
//!   window. Live beats claiming (it backs off and increments the live slot); between two claims the
//!   lower window position wins; the lower one waits until the higher one has backed off. Because a
//!   claim is a store followed by a scan of the other slots (SeqCst, a Dekker pair), of two claimers
//!   at least one sees the other, so two live slots for one key cannot both be published.
//! - **Cleanup:** the release that takes a count from 1 to 0 then writes 0 (empty) unless an
//!   acquirer of the key revived the slot first (`fp|0` counts as live for acquirers and
//!   claimers alike), so after any churn the table is empty again but for the slots of
//!   reserved places, which go back when the reserves give them back: within one sweeper tick,
//!   or sooner when another slot's places displace them from their reserve entry.
//! - A claimer that finds a pending claim for its key waits for it to resolve instead of claiming a
//!   second slot, so contention on one new key costs one claim, not a storm of them.
//!
//! The racy paths are model-checked with `loom` (`RUSTFLAGS="--cfg loom"`, see `loom_tests.rs`).

use std::hash::BuildHasher;

use crossbeam_utils::CachePadded;

use super::ip_reserve::{Put, Reserves};

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

/// A place taken by [`IpTable::acquire`], to hand back to [`IpTable::release`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    /// The address's slot.
    pub slot: usize,
    /// The address held other places when this one was taken: its release goes to the
    /// thread's reserve (see [`IpTable::release`]).
    pub shared: bool,
}

/// See the module documentation.
pub struct IpTable {
    lines: Box<[Line]>,
    /// `lines.len() - 1`; `lines.len()` is a power of two, at least 2.
    line_mask: usize,
    hasher: KeyedHash,
    /// Places of closed connections kept per thread for their addresses' next connections.
    reserves: Reserves,
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
            reserves: Reserves::default(),
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
    /// Returns the place to hand back to [`IpTable::release`].
    ///
    /// Orderings: every access here is SeqCst. The claim protocol is a store-then-scan across
    /// different slots (Dekker), which needs a single total order of the claim stores and the scan
    /// loads; weaker orderings would let two claimers miss each other. On x86 a SeqCst load is a
    /// plain load and every read-modify-write is already a full barrier, so this costs nothing.
    pub fn acquire(&self, key: u128, limit: u64) -> Result<Place, TableReject> {
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
                // The key is live here. A place this thread reserved when one of the key's
                // connections closed is already counted (within the limit, unless a reload
                // lowered it: then the compare-and-swap below decides).
                if word & COUNT_MASK <= limit && self.reserves.take_own(index) {
                    // The place is of whichever key lives in the slot while it is reserved:
                    // ours, unless the slot changed hands since the scan (and another thread
                    // sharing this lane reserved a place of its new key).
                    if slot.load(Ordering::SeqCst) & (FP_MASK | CLAIMING) == tag {
                        return Ok(Place {
                            slot: index,
                            shared: word & COUNT_MASK >= 2,
                        });
                    }
                    self.release_n(index, 1);
                    continue 'retry;
                }
                // One compare-and-swap against the limit.
                loop {
                    if word & COUNT_MASK >= limit {
                        // Free places of the key may sit in other threads' reserves.
                        if self.reclaim(index) > 0 {
                            continue 'retry;
                        }
                        return Err(TableReject::LimitReached);
                    }
                    match slot.compare_exchange_weak(
                        word,
                        word + 1,
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                    ) {
                        Ok(_) => {
                            return Ok(Place {
                                slot: index,
                                shared: word & COUNT_MASK >= 1,
                            })
                        }
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
                // Some slots of the window may be live only for places in reserves.
                let reclaimed: u64 = (0..WINDOW)
                    .map(|pos| self.reclaim(self.index(home, pos)))
                    .sum();
                if reclaimed > 0 {
                    continue 'retry;
                }
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
                        return Ok(Place {
                            slot: claimed,
                            shared: false,
                        });
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

    /// Releases a place taken by [`IpTable::acquire`]. The place of an address that held
    /// others when it was taken (other connections, or places reserved) goes to this thread's
    /// reserve, for the address's next connection on this thread, unless the reserve has enough
    /// of them; any other goes back to its slot (and empties it when it was the last), so a
    /// client of one connection at a time costs no reserve and holds no slot once it has gone.
    /// (Deciding from the count at the release instead, one more load, cost the benchmark's
    /// new address 3 ns a pair.)
    pub fn release(&self, place: Place) {
        let index = place.slot;
        if !place.shared {
            return self.release_n(index, 1);
        }
        match self.reserves.put(index) {
            Put::Kept => {}
            Put::Displaced(other, places) => self.release_n(other, places),
            Put::Full => self.release_n(index, 1),
        }
    }

    /// Gives the places in this thread's reserve back to their slots, emptying a slot that holds
    /// nothing else. Each worker does so on every tick of its sweeper, so a slot kept only by
    /// reserved places (its address's connections all closed) is free again within one tick,
    /// and a table whose connections have all closed is empty again.
    pub fn give_back_own_reserve(&self) {
        for (index, places) in self.reserves.take_own_lane() {
            self.release_n(index, places);
        }
    }

    /// Takes the places of slot `index` out of every reserve and off its count (emptying it when
    /// that leaves none): how many.
    #[cold]
    #[inline(never)]
    fn reclaim(&self, index: usize) -> u64 {
        let places = self.reserves.take_all(index);
        if places > 0 {
            self.release_n(index, places);
        }
        places
    }

    /// Takes `n` places off the count of live slot `index`; the last release empties the slot.
    ///
    /// One `fetch_sub`, never a retry: two threads releasing and acquiring on one address (a
    /// client's connections spread over the cores) never fail each other's compare-and-swap.
    /// The release that takes the count to 0 leaves `fp|0`, a live slot with no connection, and
    /// then empties it, unless an acquirer of the same key has revived it first (its count then
    /// goes 0 -> 1 in place, and its own last release empties it). Every `fp|0` is so followed
    /// by an emptying attempt, and the attempt fails only when the word has moved on (revived,
    /// or emptied by another last release), so churn still ends empty.
    ///
    /// SeqCst for the same reason as in `acquire`: emptying a slot is part of what a concurrent
    /// claimer's scan must see in the one total order, and a claimer counts `fp|0` as live.
    fn release_n(&self, index: usize, n: u64) {
        let slot = self.slot(index);
        let before = slot.fetch_sub(n, Ordering::SeqCst);
        debug_assert!(
            before & COUNT_MASK >= n && before & CLAIMING == 0,
            "release of {n} from {before:#x}"
        );
        if before & COUNT_MASK == n {
            let _ = slot.compare_exchange(before - n, 0, Ordering::SeqCst, Ordering::SeqCst);
        }
    }

    /// Places reserved per slot, summed over the threads (a snapshot).
    fn reserved(&self) -> Vec<(usize, u64)> {
        let mut reserved: Vec<(usize, u64)> = self.reserves.reserved().collect();
        reserved.sort_unstable();
        reserved.dedup_by(|later, first| {
            let same = later.0 == first.0;
            if same {
                first.1 += later.1;
            }
            same
        });
        reserved
    }

    /// Number of keys with live connections (a scan; for scrapes and tests, not the hot path):
    /// slots live only for places in reserves do not count. Exact when nothing changes while it
    /// runs. Relaxed: a statistic of independent slots, not used to synchronize anything (the
    /// reserves are read first, so a slot's count read after includes its reserved places).
    pub fn live_keys(&self) -> usize {
        let reserved = self.reserved();
        let live = self
            .words()
            .filter(|word| word & CLAIMING == 0 && word & COUNT_MASK != 0)
            .count();
        let reserves_only = reserved
            .iter()
            .filter(|&&(index, places)| {
                let word = self.slot(index).load(Ordering::Relaxed);
                word & CLAIMING == 0 && word & COUNT_MASK <= places
            })
            .count();
        live.saturating_sub(reserves_only)
    }

    /// Slots in use (a scan; for scrapes and tests): live keys, slots being claimed, and slots
    /// live only for places in reserves, until their cores' sweepers give them back.
    pub fn used_slots(&self) -> usize {
        self.words().filter(|&word| word != 0).count()
    }

    /// Every slot's word, in order (a scan for scrapes and tests). Relaxed: a statistic of
    /// independent slots, not used to synchronize anything.
    fn words(&self) -> impl Iterator<Item = u64> + '_ {
        self.lines
            .iter()
            .flat_map(|line| line.iter())
            .map(|slot| slot.load(Ordering::Relaxed))
    }

    /// The connections counted at `index`, its places less those in reserves (tests).
    #[cfg(test)]
    pub fn connections_at(&self, index: usize) -> u64 {
        let reserved = self
            .reserved()
            .into_iter()
            .find(|&(slot, _)| slot == index)
            .map_or(0, |(_, places)| places);
        self.places_at(index).saturating_sub(reserved)
    }

    /// The places counted at `index`: its connections and the places reserved for them (tests).
    #[cfg(test)]
    pub fn places_at(&self, index: usize) -> u64 {
        self.slot(index).load(Ordering::SeqCst) & COUNT_MASK
    }

    /// Gives every reserved place back to its slot (tests: after it, a table whose connections
    /// have all closed is empty again, every slot 0).
    #[cfg(test)]
    pub fn give_back_reserves(&self) {
        for (index, _) in self.reserved() {
            self.reclaim(index);
        }
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
mod tests;

#[cfg(all(test, loom))]
mod loom_tests;
