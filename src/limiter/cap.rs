//! A count with a hard limit, shared by every core: the global connection count
//! (`server.max_connections`) and each upstream's requests in flight (`routing.max_in_flight`).
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
//! all an exact limit needs. The racy paths are model-checked with `loom` (see `loom_tests`).

use crossbeam_utils::CachePadded;

#[cfg(loom)]
use loom::sync::atomic::{AtomicUsize, Ordering::Relaxed};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// See the module documentation.
#[derive(Debug)]
pub struct Cap {
    count: CachePadded<AtomicUsize>,
    limit: usize,
}

impl Cap {
    pub fn new(limit: usize) -> Cap {
        Cap {
            count: CachePadded::new(AtomicUsize::new(0)),
            limit,
        }
    }

    /// Takes one place unless all `limit` are taken; pair a `true` with [`Cap::give_back`].
    pub fn try_take(&self) -> bool {
        self.count
            .fetch_update(Relaxed, Relaxed, |n| (n < self.limit).then_some(n + 1))
            .is_ok()
    }

    /// Gives back a place [`Cap::try_take`] took.
    pub fn give_back(&self) {
        self.count.fetch_sub(1, Relaxed);
    }

    /// Places taken now (a snapshot, for metrics and tests).
    pub fn count(&self) -> usize {
        self.count.load(Relaxed)
    }

    pub fn limit(&self) -> usize {
        self.limit
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
