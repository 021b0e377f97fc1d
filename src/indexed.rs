//! Append-only storage indexed by a number that is never reused: one `T` per upstream (a core's
//! counters for it), one per per-IP override network (its live request rate).
//!
//! Owns chunks of `T` that one writer at a time (a reload) adds, and that any thread reads
//! without a lock.
//!
//! Invariants:
//! - What is there never moves: a reference to an index's `T` stays valid for the storage's life.
//! - An index has room only once [`Indexed::make_room`] covered it; it must be made before the
//!   index is published to readers (the chunk's `OnceLock` publishes its contents with its
//!   Release store, and the index's publication, a later Release, carries that along).

use std::sync::OnceLock;

/// Indices grow by this many slots at a time (2 under loom, to keep its models small).
const CHUNK: usize = if cfg!(loom) { 2 } else { 16 };

/// See the module documentation.
pub struct Indexed<T> {
    chunks: Box<[OnceLock<Box<[T]>>]>,
}

impl<T: Default> Indexed<T> {
    /// Room for indices below `len`, and at most `capacity` ever.
    pub fn new(capacity: usize, len: usize) -> Self {
        let s = Indexed {
            chunks: (0..capacity.div_ceil(CHUNK))
                .map(|_| OnceLock::new())
                .collect(),
        };
        s.make_room(len);
        s
    }

    /// Makes room for indices below `len` (at most the capacity).
    pub fn make_room(&self, len: usize) {
        for c in &self.chunks[..len.div_ceil(CHUNK)] {
            c.get_or_init(|| (0..CHUNK).map(|_| T::default()).collect());
        }
    }

    /// The `T` of `index`; room for it was made before the index was published.
    pub fn get(&self, index: usize) -> &T {
        let chunk = self.chunks[index / CHUNK]
            .get()
            .expect("room is made before an index is published");
        &chunk[index % CHUNK]
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn storage_grows_without_moving() {
        let s: Indexed<AtomicU64> = Indexed::new(4096, 1);
        s.get(0).store(7, Ordering::Relaxed);
        let at = s.get(0) as *const _;
        s.make_room(CHUNK * 3 + 1);
        assert_eq!(s.get(0).load(Ordering::Relaxed), 7);
        assert!(std::ptr::eq(at, s.get(0)));
        s.get(CHUNK * 3).store(1, Ordering::Relaxed);
    }
}
