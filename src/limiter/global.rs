//! The global connection count (`server.max_connections`): the contract's one cache-padded
//! `AtomicUsize` (a [`Cap`]), and beside it one reserve of free places per thread.
//!
//! Owns the reserves. A connection closed on a core gives its place to that core's reserve
//! instead of back to the global count, and the core's next connection takes it from there: a
//! core that closes and opens connections writes only its own cache line, not the global one
//! that every core shares (two cores admitting through the global count alone spent 56-61 ns a
//! pair moving its line between them; `cargo bench --bench limiter`). A place in a reserve is
//! still counted in the global count, so the limit holds as before; and a core that finds the
//! global count full takes a place from another core's reserve, so no place is lost to one.
//!
//! Invariants:
//! - Connections never exceed the limit, not even transiently: connections plus the places in
//!   reserves equal the global count, which never exceeds the limit (see [`cap`]).
//! - Exact: a take is refused only when the global count is full and every reserve it looked at
//!   was empty. A place enters a reserve only when a connection closes (one read-modify-write moves
//!   it from the connection to the reserve: no place is ever in flight between the two), so a
//!   take that races no close is refused only when every place is held by a connection; one
//!   that races a close may miss that place, as it would miss it in the global count. Places
//!   also leave the reserves for the count: each worker gives its own back on every tick of its
//!   sweeper ([`GlobalCount::give_back_own_reserve`]), and a reload gives all of them back. A
//!   take racing that move may miss the places on their way (swapped out of the reserve, not yet
//!   off the count: nanoseconds), never take one twice.
//! - A reserve holds at most `RESERVE` (64) places (a few more where threads share a lane), and a
//!   place goes to a reserve only while the count is within the limit: after a reload lowers
//!   the limit, closing connections bring the count down to it as before ([`GlobalCount::set_limit`]
//!   also empties the reserves). A close that read the old limit just before the reload may
//!   reserve its place after it: one admission above the new limit per such close, as a take
//!   racing the reload may take a place under the old limit.
//! - The count of connections, [`GlobalCount::count`], is the global count less the reserves:
//!   exact when nothing changes while it is read (a scrape or a test), within the changes made
//!   meanwhile otherwise.
//!
//! Orderings: Relaxed, as in [`cap`]. Every take from a reserve is a compare-and-swap that reads the
//! latest value of that reserve, so two takers never take one place; what a look at a reserve
//! misses is a close that happened at the same time, never one that happened before the take
//! (a load sees every write that happens before it). The racy paths are model-checked with
//! `loom` (see `loom_tests`).
//!
//! [`cap`]: super::cap

use crossbeam_utils::CachePadded;

use super::cap::Cap;
use super::lane::{self, LANES};

#[cfg(loom)]
use loom::sync::atomic::{AtomicUsize, Ordering::Relaxed};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// The most places one reserve keeps (a core that closes more at once gives the rest back).
const RESERVE: usize = if cfg!(loom) { 2 } else { 64 };

/// See the module documentation.
pub struct GlobalCount {
    cap: Cap,
    /// Free places taken from `cap`, each on its own cache line, written by its thread (and by a
    /// thread that finds the global count full).
    lanes: Box<[CachePadded<AtomicUsize>]>,
}

impl GlobalCount {
    pub fn new(limit: usize) -> GlobalCount {
        GlobalCount {
            cap: Cap::new(limit),
            lanes: (0..LANES)
                .map(|_| CachePadded::new(AtomicUsize::new(0)))
                .collect(),
        }
    }

    /// Takes one place for a connection unless `limit` connections hold them all; pair a
    /// `true` with [`GlobalCount::give_back`].
    pub fn try_take(&self) -> bool {
        let own = lane::index();
        take_one(&self.lanes[own]) || self.cap.try_take() || self.take_from_others(own)
    }

    /// The global count is full: a place may sit in another thread's reserve.
    #[cold]
    fn take_from_others(&self, own: usize) -> bool {
        (0..lane::in_use())
            .filter(|&i| i != own)
            .any(|i| take_one(&self.lanes[i]))
    }

    /// Gives back a place [`GlobalCount::try_take`] took (on any thread).
    pub fn give_back(&self) {
        let own = &self.lanes[lane::index()];
        // Neither load moves a line between cores in the common case: the reserve's line is
        // this thread's own, and the count's is written only when a reserve is empty or full.
        if own.load(Relaxed) < RESERVE && self.cap.count() <= self.cap.limit() {
            own.fetch_add(1, Relaxed);
        } else {
            self.cap.give_back();
        }
    }

    /// Gives the places in this thread's reserve back to the global count (each worker's
    /// sweeper, every tick, so that the count is back to its connections within a tick).
    pub fn give_back_own_reserve(&self) {
        self.give_back_reserve(&self.lanes[lane::index()]);
    }

    /// Gives the places in `reserve` back to the global count.
    fn give_back_reserve(&self, reserve: &AtomicUsize) {
        let places = reserve.swap(0, Relaxed);
        if places > 0 {
            self.cap.give_back_many(places);
        }
    }

    /// Places held by connections now (a snapshot, for metrics and tests).
    pub fn count(&self) -> usize {
        let reserved: usize = self.lanes.iter().map(|l| l.load(Relaxed)).sum();
        self.cap.count().saturating_sub(reserved)
    }

    pub fn limit(&self) -> usize {
        self.cap.limit()
    }

    /// Sets a new limit for takes from now on (a configuration reload), and gives every reserved
    /// place back to the global count: places reserved under a higher limit would otherwise admit
    /// connections above the new one. A close racing the reload may still reserve its place
    /// under the old limit, as a take racing it may take one.
    pub fn set_limit(&self, limit: usize) {
        self.cap.set_limit(limit);
        for reserve in self.lanes.iter() {
            self.give_back_reserve(reserve);
        }
    }
}

/// Takes one place from a reserve, if it has one.
fn take_one(lane: &AtomicUsize) -> bool {
    lane.fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
        .is_ok()
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_thread_gives_its_reserved_places_back_to_the_count() {
        let g = GlobalCount::new(3);
        assert!(g.try_take() && g.try_take());
        g.give_back();
        g.give_back();
        assert_eq!(
            (g.count(), g.cap.count()),
            (0, 2),
            "two places wait in the reserve"
        );
        g.give_back_own_reserve();
        assert_eq!((g.count(), g.cap.count()), (0, 0));
        assert!(g.try_take() && g.try_take() && g.try_take() && !g.try_take());
    }

    #[test]
    fn a_place_closed_on_one_thread_admits_on_another() {
        let g = GlobalCount::new(2);
        assert!(g.try_take() && g.try_take() && !g.try_take());
        g.give_back();
        assert_eq!(g.count(), 1);
        // The place sits in this thread's reserve; another thread finds the count full and
        // takes it from there.
        let g = std::sync::Arc::new(g);
        let other = g.clone();
        assert!(std::thread::spawn(move || other.try_take()).join().unwrap());
        assert_eq!(g.count(), 2);
        assert!(!g.try_take());
    }

    /// Opens `n` connections, then closes them all.
    fn open_then_close(g: &GlobalCount, n: usize) {
        for _ in 0..n {
            assert!(g.try_take());
        }
        for _ in 0..n {
            g.give_back();
        }
        assert_eq!(g.count(), 0);
    }

    #[test]
    fn a_lowered_limit_takes_back_the_reserves() {
        let g = GlobalCount::new(10);
        open_then_close(&g, 10);
        g.set_limit(3);
        assert_eq!(g.cap.count(), 0, "nothing left reserved");
        for _ in 0..3 {
            assert!(g.try_take());
        }
        assert!(!g.try_take());
    }

    #[test]
    fn above_a_lowered_limit_closes_bring_the_count_down() {
        let g = GlobalCount::new(4);
        for _ in 0..4 {
            assert!(g.try_take());
        }
        g.set_limit(2);
        // Two closes bring four connections to two, still the limit: no admission.
        g.give_back();
        g.give_back();
        assert_eq!(g.count(), 2);
        assert!(!g.try_take());
        g.give_back();
        assert!(g.try_take());
        assert!(!g.try_take());
    }

    #[test]
    fn a_reserve_holds_at_most_its_bound() {
        let g = GlobalCount::new(1000);
        open_then_close(&g, 200);
        assert_eq!(g.cap.count(), RESERVE);
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    //! Run with `RUSTFLAGS="--cfg loom" cargo test --release --lib loom`. Under loom there are
    //! two lanes for three threads, so some executions share one.
    use super::*;
    use loom::sync::atomic::{
        AtomicBool,
        Ordering::{Acquire, Release},
    };
    use loom::sync::Arc;
    use loom::thread;

    /// On another thread, a take at once and, if refused, once more after `done` is set: a
    /// place freed before that must then be found.
    fn take_now_and_after(
        g: &Arc<GlobalCount>,
        done: &Arc<AtomicBool>,
    ) -> thread::JoinHandle<bool> {
        let (g, done) = (g.clone(), done.clone());
        thread::spawn(move || {
            let early = g.try_take();
            while !done.load(Acquire) {
                thread::yield_now();
            }
            early || g.try_take()
        })
    }

    #[test]
    fn loom_a_close_racing_a_take_of_the_last_place() {
        loom::model(|| {
            let g = Arc::new(GlobalCount::new(1));
            assert!(g.try_take());
            // One thread closes its connection while another asks for a place: before the
            // close the count is full, after it the place is free, in the closer's reserve.
            let closed = Arc::new(AtomicBool::new(false));
            let taker = take_now_and_after(&g, &closed);
            g.give_back();
            closed.store(true, Release);
            assert!(
                taker.join().unwrap(),
                "the freed place reaches the other thread"
            );
            assert_eq!((g.count(), g.cap.count()), (1, 1));
            assert!(!g.try_take());
        });
    }

    #[test]
    fn loom_two_takers_of_a_reserved_place_get_it_once() {
        loom::model(|| {
            let g = Arc::new(GlobalCount::new(1));
            assert!(g.try_take());
            g.give_back(); // the one place is now in the main thread's reserve
            let (g2, g3) = (g.clone(), g.clone());
            let a = thread::spawn(move || g2.try_take());
            let b = thread::spawn(move || g3.try_take());
            let (a, b) = (a.join().unwrap(), b.join().unwrap());
            assert!(a ^ b, "exactly one of two gets the only place");
            assert_eq!(g.count(), 1);
        });
    }

    #[test]
    fn loom_a_lowered_limit_racing_a_close() {
        loom::model(|| {
            let g = Arc::new(GlobalCount::new(2));
            assert!(g.try_take() && g.try_take());
            let g2 = g.clone();
            let closer = thread::spawn(move || g2.give_back());
            g.set_limit(1);
            closer.join().unwrap();
            // One connection is left, at the new limit. A close that came first had its place
            // taken back by the reload; one after it saw the count above the new limit and gave
            // it back; only one that read the old limit just before the reload can reserve its
            // place after the reload emptied the reserves: one admission more, at most.
            assert_eq!(g.count(), 1);
            let extra = g.try_take();
            assert!(!g.try_take());
            // Once those close, the new limit holds exactly.
            for _ in 0..1 + usize::from(extra) {
                g.give_back();
            }
            assert_eq!(g.count(), 0);
            assert!(g.try_take());
            assert!(!g.try_take());
        });
    }

    #[test]
    fn loom_churn_on_two_threads_never_passes_the_limit() {
        loom::model(|| {
            let g = Arc::new(GlobalCount::new(1));
            let held = Arc::new(AtomicUsize::new(0));
            let churn = |g: Arc<GlobalCount>, held: Arc<AtomicUsize>| {
                move || {
                    for _ in 0..2 {
                        if g.try_take() {
                            assert_eq!(held.fetch_add(1, Relaxed), 0, "two connections at once");
                            held.fetch_sub(1, Relaxed);
                            g.give_back();
                        }
                    }
                }
            };
            let t = thread::spawn(churn(g.clone(), held.clone()));
            churn(g.clone(), held)();
            t.join().unwrap();
            assert_eq!(g.count(), 0);
            assert!(g.try_take() && !g.try_take(), "the place is not lost");
        });
    }

    #[test]
    fn loom_a_thread_giving_its_reserve_back_races_a_take() {
        loom::model(|| {
            // The one place waits in this thread's reserve; its sweeper gives it back to the
            // count while another thread asks for a place. A try racing the give-back may miss
            // the place in transit, as one racing a close misses the place that close frees;
            // once the give-back is done, the place is there, and taken once.
            let g = Arc::new(GlobalCount::new(1));
            assert!(g.try_take());
            g.give_back();
            let done = Arc::new(AtomicBool::new(false));
            let taker = take_now_and_after(&g, &done);
            g.give_back_own_reserve();
            done.store(true, Release);
            assert!(taker.join().unwrap(), "the place is free once given back");
            assert_eq!((g.count(), g.cap.count()), (1, 1));
            assert!(!g.try_take());
        });
    }
}
