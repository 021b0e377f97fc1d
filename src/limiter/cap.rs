//! A count with a hard limit, shared by every core: the global connection count's
//! (`server.max_connections`, with per-core reserves on top: [`super::global`]) and each
//! upstream's requests in flight (`routing.max_in_flight`).
//!
//! Owns one cache-padded `AtomicUsize` (its own cache line, so the cores that write it bounce
//! nothing else).
//!
//! Invariant: the count never exceeds the limit, not even transiently. Taking a place is a
//! compare-and-swap against the limit, never an increment undone afterwards: that would let a
//! racing taker see a full count while a place is free, and refuse it wrongly.
//!
//! Orderings: Relaxed everywhere. The count guards nothing but itself; every compare-and-swap
//! sees every other take and give-back of this one variable in its modification order, which is
//! all an exact limit needs. The limit may change while the count is in use (a configuration
//! reload): a take compares against whichever limit it read, and nothing else depends on it, so
//! Relaxed is enough there too; places taken under a higher limit stay taken until given back.
//! The racy paths are model-checked with `loom` (see `loom_tests`).

use crossbeam_utils::CachePadded;

#[cfg(loom)]
use loom::sync::atomic::{AtomicUsize, Ordering::Relaxed};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// See the module documentation.
#[derive(Debug)]
pub struct Cap {
    count: CachePadded<AtomicUsize>,
    /// Read by every take, written only by a reload: not on the count's line.
    limit: AtomicUsize,
}

impl Cap {
    pub fn new(limit: usize) -> Cap {
        Cap {
            count: CachePadded::new(AtomicUsize::new(0)),
            limit: AtomicUsize::new(limit),
        }
    }

    /// Takes one place unless all `limit` are taken; pair a `true` with [`Cap::give_back`].
    pub fn try_take(&self) -> bool {
        self.try_take_under(self.limit())
    }

    /// [`Cap::try_take`] against `limit`, the caller's read of [`Cap::limit`] (one that acts on
    /// the limit itself, such as a limit of 0 meaning none, so it decides on one read).
    pub fn try_take_under(&self, limit: usize) -> bool {
        self.count
            .fetch_update(Relaxed, Relaxed, |n| (n < limit).then_some(n + 1))
            .is_ok()
    }

    /// Gives back a place [`Cap::try_take`] took.
    pub fn give_back(&self) {
        self.give_back_many(1);
    }

    /// Gives back `n` places taken before.
    pub fn give_back_many(&self, n: usize) {
        self.count.fetch_sub(n, Relaxed);
    }

    /// Places taken now (a snapshot, for metrics and tests).
    pub fn count(&self) -> usize {
        self.count.load(Relaxed)
    }

    pub fn limit(&self) -> usize {
        self.limit.load(Relaxed)
    }

    /// Sets a new limit for takes from now on (a configuration reload).
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Relaxed);
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    //! Run with `RUSTFLAGS="--cfg loom" cargo test --release --lib loom`.
    use super::*;
    use loom::sync::Arc;
    use loom::thread;

    #[test]
    fn loom_two_takers_of_the_last_place_get_it_once() {
        loom::model(|| {
            let cap = Arc::new(Cap::new(1));
            let (c2, c3) = (cap.clone(), cap.clone());
            let h = thread::spawn(move || c2.try_take());
            // Not even transiently over the limit (an increment undone afterwards would be).
            let watcher = thread::spawn(move || assert!(c3.count() <= 1));
            let mine = cap.try_take();
            let theirs = h.join().unwrap();
            watcher.join().unwrap();
            assert!(mine ^ theirs, "exactly one of two gets the only place");
            assert_eq!(cap.count(), 1);
        });
    }

    #[test]
    fn loom_a_lowered_limit_racing_a_take() {
        loom::model(|| {
            let cap = Arc::new(Cap::new(2));
            assert!(cap.try_take());
            let c2 = cap.clone();
            let h = thread::spawn(move || c2.set_limit(1));
            // Under the old limit the second place is free, under the new one it is not: either
            // answer is right, and the count is what was taken, never past the old limit.
            let took = cap.try_take();
            h.join().unwrap();
            assert_eq!(cap.count(), 1 + usize::from(took));
            // After the join the new limit is seen: nothing more until places are given back,
            // then exactly one.
            assert!(!cap.try_take());
            for _ in 0..1 + usize::from(took) {
                cap.give_back();
            }
            assert!(cap.try_take(), "one place under the new limit");
            assert!(!cap.try_take());
        });
    }

    #[test]
    fn loom_a_give_back_racing_a_take_never_overshoots() {
        loom::model(|| {
            let cap = Arc::new(Cap::new(1));
            assert!(cap.try_take());
            let c2 = cap.clone();
            let h = thread::spawn(move || c2.give_back());
            let took = cap.try_take();
            h.join().unwrap();
            // Before the give-back the place was taken, after it free: either is right, but
            // the count matches what was taken and never passes the limit.
            assert_eq!(cap.count(), usize::from(took));
            if took {
                cap.give_back();
            }
            assert_eq!(cap.count(), 0);
        });
    }
}
