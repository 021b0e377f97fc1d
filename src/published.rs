//! A value that a configuration reload replaces whole and every core reads without a lock: the
//! upstreams in force, the per-IP overrides, the allowed origins, the PROXY protocol's trusted
//! networks.
//!
//! Owns the value in force, behind one pointer.
//!
//! Invariants:
//! - A reader gets the value in force when it looks, whole: a reload builds the next value
//!   before it publishes it with one pointer store, so no reader sees half of one and half of
//!   the next.
//! - Values are never freed: a reader may hold one for as long as it likes (a request keeps its
//!   upstreams to its end), and counting holders would be a shared write per read. So each
//!   replacement keeps the value before it in memory; replace only what changed.

#[cfg(loom)]
use loom::sync::atomic::{AtomicPtr, Ordering};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicPtr, Ordering};

/// See the module documentation.
pub struct Published<T: 'static> {
    /// A leaked `Box<T>`. Release on store, Acquire on load: a reader that sees the pointer sees
    /// the value built, and what was written before it was published.
    current: AtomicPtr<T>,
}

impl<T: 'static> Published<T> {
    pub fn new(value: T) -> Self {
        Published {
            current: AtomicPtr::new(Box::into_raw(Box::new(value))),
        }
    }

    /// The value in force.
    pub fn get(&self) -> &'static T {
        // SAFETY: every pointer stored is a leaked `Box` (never freed), published whole: Acquire
        // pairs with the Release store of `replace` (or `new`'s, which happens before any read
        // that reaches this value through a shared reference).
        unsafe { &*self.current.load(Ordering::Acquire) }
    }

    /// Puts `value` in force; the value before it stays in memory for whoever still reads it.
    pub fn replace(&self, value: T) {
        self.current
            .store(Box::into_raw(Box::new(value)), Ordering::Release);
    }
}

impl<T: Default + 'static> Default for Published<T> {
    fn default() -> Self {
        Published::new(T::default())
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_reader_keeps_what_it_took_and_the_next_reader_gets_the_new_value() {
        let p = Published::new(vec![1, 2]);
        let held = p.get();
        p.replace(vec![3]);
        assert_eq!(held, &[1, 2]);
        assert_eq!(p.get(), &[3]);
    }
}
