//! Per-thread reserves of per-address places, in front of the per-IP table ([`super::ip_table`]).
//!
//! Owns, per lane ([`super::lane`]: one per worker thread), one cache line of `ENTRIES` (8)
//! entries, each holding up to [`PER_ADDRESS`] free places of one table slot. A connection that
//! came while its address held other places leaves its place, when it closes, in its core's
//! entry for the slot instead of taking it off the slot's count, and the core's next connection
//! from that address takes it back from there. A client whose connections open and close on
//! several cores (many users behind one NAT address) then writes only each core's own line, not
//! the slot's line that the cores share: two threads of one address took 32-72 ns a pair moving
//! that line between them on the 2-core VM, and take 15-16 with the reserves (`cargo bench
//! --bench limiter`, see the README's "Limiter micro-benchmarks").
//!
//! # Entry word
//!
//! `[slot index: 32 bits][places: 32 bits]`; no places is an empty entry, whatever the index.
//! An entry serves the slots whose index is its own modulo `ENTRIES`; a close whose entry
//! holds another slot's places takes those out (the caller gives them back to their slot) and
//! leaves its own, so an address that stops coming keeps no place for long on a busy core.
//!
//! # Invariants
//!
//! - A reserved place is still counted in its slot: a slot's count is its connections plus the
//!   places reserved for it, and never exceeds the limit (a place enters a reserve only from a
//!   connection that held it). So the places of a slot keep it live for the same address from
//!   the moment they are reserved until they leave the reserve; `(slot, n)` with `n > 0` names
//!   the places of the address now live in that slot.
//! - Every move of a place is one read-modify-write of the entry: closing into it, taking one
//!   for a connection, taking them all back for the table ([`Reserves::take_all`], and
//!   [`Reserves::take_own_lane`] on a sweeper's tick). Two takers never take one place; the
//!   table takes what it took back off the slot's count right after.
//! - Only the holder of a lane puts places into it (and a thread that shares it, or one that
//!   drops a permit while its thread-locals are torn down, see [`super::lane::index`]); other
//!   threads only take them. So a take from a thread's own lane checks the slot's key after
//!   ([`super::ip_table`]), in case a sharer reserved a place of a key new to a reused slot.
//!
//! Orderings: AcqRel on every change of an entry (Relaxed on a failed compare-and-swap, which
//! changes nothing). A place moves from the thread that counted it in its slot (or last held
//! it) to the one that will some day take it off the slot's count; Release on the way in and
//! Acquire on the way out order that increment before that decrement, so the slot's count never
//! goes below its connections. On x86 every read-modify-write is a full barrier: this costs
//! nothing there. The racy paths are model-checked with `loom` in [`super::ip_table`].

use crossbeam_utils::CachePadded;

use super::lane::{self, LANES};

#[cfg(loom)]
use loom::sync::atomic::{
    AtomicU64,
    Ordering::{AcqRel, Acquire, Relaxed},
};
#[cfg(not(loom))]
use std::sync::atomic::{
    AtomicU64,
    Ordering::{AcqRel, Acquire, Relaxed},
};

/// Entries per lane: one cache line (8 x 8 bytes). Under loom 2, to keep the model small.
const ENTRIES: usize = if cfg!(loom) { 2 } else { 8 };

/// The most places one entry keeps for its slot; a core that closes more of one address's
/// connections at once gives the rest back to the slot. Small, because a place in one core's
/// reserve costs another core that needs it a look at every lane (when the address is at its
/// limit): it is there for an address whose connections come and go, not for a burst.
pub const PER_ADDRESS: u64 = if cfg!(loom) { 1 } else { 4 };

const PLACES: u64 = u32::MAX as u64;

type Lane = CachePadded<[AtomicU64; ENTRIES]>;

/// What became of a closed connection's place offered to this thread's reserve.
#[derive(Debug, PartialEq, Eq)]
pub enum Put {
    /// The reserve keeps it.
    Kept,
    /// The reserve keeps it, in place of these places of another slot, which the caller gives
    /// back to that slot: `(slot, places)`.
    Displaced(usize, u64),
    /// The entry already holds [`PER_ADDRESS`] places of the slot: give this one back to it.
    Full,
}

/// See the module documentation.
pub struct Reserves {
    lanes: Box<[Lane]>,
}

impl Default for Reserves {
    /// Empty reserves, one per lane.
    fn default() -> Reserves {
        Reserves {
            lanes: (0..LANES)
                .map(|_| CachePadded::new(std::array::from_fn(|_| AtomicU64::new(0))))
                .collect(),
        }
    }
}

impl Reserves {
    fn entry(&self, lane: usize, slot: usize) -> &AtomicU64 {
        &self.lanes[lane][slot % ENTRIES]
    }

    /// Takes one place of `slot` from this thread's reserve, if it holds one.
    #[inline]
    pub fn take_own(&self, slot: usize) -> bool {
        self.entry(lane::index(), slot)
            .fetch_update(AcqRel, Relaxed, |word| holds(word, slot).then(|| word - 1))
            .is_ok()
    }

    /// Offers a closed connection's place of `slot` to this thread's reserve.
    #[inline]
    pub fn put(&self, slot: usize) -> Put {
        let entry = self.entry(lane::index(), slot);
        let mine = (slot as u64) << 32;
        let mut word = entry.load(Relaxed);
        loop {
            let places = word & PLACES;
            let (new, put) = if places == 0 {
                (mine | 1, Put::Kept)
            } else if holds(word, slot) {
                if places >= PER_ADDRESS {
                    return Put::Full;
                }
                (word + 1, Put::Kept)
            } else {
                (mine | 1, Put::Displaced((word >> 32) as usize, places))
            };
            match entry.compare_exchange_weak(word, new, AcqRel, Relaxed) {
                Ok(_) => return put,
                Err(now) => word = now,
            }
        }
    }

    /// Takes every place of `slot` out of every reserve (for the table to take off the slot's
    /// count): how many. A close racing this may reserve one after its look, as a connection
    /// closing just after a look at the count would free its place after it.
    pub fn take_all(&self, slot: usize) -> u64 {
        (0..lane::in_use())
            .map(|lane| {
                self.entry(lane, slot)
                    .fetch_update(AcqRel, Relaxed, |word| holds(word, slot).then_some(0))
                    .map_or(0, |word| word & PLACES)
            })
            .sum()
    }

    /// Takes every place out of this thread's reserve (for the table to take off their slots'
    /// counts): `(slot, places)` per entry that held some. Each entry is emptied by one swap,
    /// AcqRel as every change of an entry.
    pub fn take_own_lane(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.lanes[lane::index()]
            .iter()
            .filter_map(|entry| places_of(entry.swap(0, AcqRel)))
    }

    /// Every reserved place as `(slot, places)`, a slot once per lane that holds some (a
    /// snapshot, for metrics and tests). Acquire, as for a take: a caller that then reads the
    /// slot reads a count that includes these places.
    pub fn reserved(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.lanes.iter().flat_map(|lane| {
            lane.iter()
                .filter_map(|entry| places_of(entry.load(Acquire)))
        })
    }
}

/// Whether entry word `word` holds places of `slot`.
fn holds(word: u64, slot: usize) -> bool {
    word >> 32 == slot as u64 && word & PLACES > 0
}

/// The places entry word `word` holds, as `(slot, places)`; `None` when it holds none.
fn places_of(word: u64) -> Option<(usize, u64)> {
    (word & PLACES > 0).then_some(((word >> 32) as usize, word & PLACES))
}
