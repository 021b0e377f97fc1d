//! Which per-thread reserve a thread uses: the global count's reserve of free places
//! ([`super::global`]) and its reserve of per-address places ([`super::ip_reserve`]).
//!
//! Owns the process-wide lane numbering. The first [`LANES`] threads that admit or close a
//! connection get a lane each, in the order they first do; further threads share them (round
//! robin). Any lane is right for any thread, since every reserve is written with
//! read-modify-writes; only a thread's own is cheaper (its cache line stays on its core).

/// Lanes, one per thread up to this many. Under loom two, so that threads also share one.
pub const LANES: usize = if cfg!(loom) { 2 } else { 64 };

#[cfg(not(loom))]
mod next {
    use std::sync::atomic::AtomicUsize;
    /// Threads that have asked for a lane so far (process-wide).
    pub static NEXT: AtomicUsize = AtomicUsize::new(0);
    std::thread_local!(pub static LANE: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) });
}
#[cfg(loom)]
mod next {
    loom::lazy_static! {
        pub static ref NEXT: loom::sync::atomic::AtomicUsize = loom::sync::atomic::AtomicUsize::new(0);
    }
    loom::thread_local!(pub static LANE: std::cell::Cell<usize> = std::cell::Cell::new(usize::MAX));
}
#[cfg(loom)]
use loom::sync::atomic::Ordering::Relaxed;
#[cfg(not(loom))]
use std::sync::atomic::Ordering::Relaxed;

/// This thread's lane. Relaxed: the counter only hands out distinct numbers. A permit
/// dropped while its thread's locals are torn down uses lane 0: any lane is right, only
/// a thread's own is cheaper.
#[inline]
pub fn index() -> usize {
    next::LANE
        .try_with(|lane| match lane.get() {
            usize::MAX => {
                let i = next::NEXT.fetch_add(1, Relaxed) % LANES;
                lane.set(i);
                i
            }
            i => i,
        })
        .unwrap_or(0)
}

/// Lanes handed out so far: the others are empty. Relaxed: a lane handed out after this
/// read belongs to a thread whose reserve filled after it, a close racing the take. At least
/// one: lane 0 is also that of a thread whose locals are torn down (see [`index`]).
pub fn in_use() -> usize {
    next::NEXT.load(Relaxed).clamp(1, LANES)
}
