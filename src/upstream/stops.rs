//! Stopping a WebSocket or MCPB session's forwards when the session ends, without a channel per
//! forward.
//!
//! Owns one slot per forward task in flight: the waker to wake when the session ends. A forward
//! takes a slot ([`Stops::take`]), waits on [`Stops::stopped`] beside its work, and frees the slot
//! however its task ends ([`Stops::free`]).
//!
//! Invariants:
//! - A slot is busy from [`Stops::take`] until [`Stops::free`], and is handed to the next forward
//!   once free: a session forwarding message after message reuses one slot and allocates nothing.
//! - After [`Stops::end`] every [`Stops::stopped`] resolves at its next poll, and each waiting
//!   one has been woken (so its task runs, sees it, and ends).
//! - The slots keep their room between messages; [`Stops::trim`] gives it back when none is busy
//!   (a session parking holds none).
//!
//! One core only: the session and its forwards are tasks of one runtime (`Cell`, `RefCell`).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// See the module documentation.
#[derive(Default)]
pub struct Stops {
    ended: Cell<bool>,
    slots: RefCell<Vec<Slot>>,
}

enum Slot {
    Free,
    /// A forward in flight, with the waker of its latest wait (none before its first).
    Busy(Option<Waker>),
}

impl Stops {
    /// A slot for a new forward, to be given back with [`Stops::free`].
    pub fn take(&self) -> usize {
        let mut slots = self.slots.borrow_mut();
        match slots.iter().position(|s| matches!(s, Slot::Free)) {
            Some(i) => {
                slots[i] = Slot::Busy(None);
                i
            }
            None => {
                slots.push(Slot::Busy(None));
                slots.len() - 1
            }
        }
    }

    /// The forward of `slot` ended (or was dropped): the slot serves the next one.
    pub fn free(&self, slot: usize) {
        self.slots.borrow_mut()[slot] = Slot::Free;
    }

    /// Resolves once the session has ended ([`Stops::end`]).
    pub fn stopped(&self, slot: usize) -> Stopped<'_> {
        Stopped { stops: self, slot }
    }

    /// The session ended: every forward's [`Stops::stopped`] resolves, the waiting ones woken.
    pub fn end(&self) {
        self.ended.set(true);
        // Taken out before any is woken: no borrow of the slots is held while a waker runs.
        let wakers: Vec<Waker> = self
            .slots
            .borrow_mut()
            .iter_mut()
            .filter_map(|s| match s {
                Slot::Busy(w) => w.take(),
                Slot::Free => None,
            })
            .collect();
        wakers.into_iter().for_each(Waker::wake);
    }

    /// Gives the slots' room back if none is busy (an idle session about to park).
    pub fn trim(&self) {
        let mut slots = self.slots.borrow_mut();
        if slots.iter().all(|s| matches!(s, Slot::Free)) {
            *slots = Vec::new();
        }
    }

    /// Forwards holding a slot.
    pub fn busy(&self) -> usize {
        let slots = self.slots.borrow();
        slots.iter().filter(|s| matches!(s, Slot::Busy(_))).count()
    }
}

/// See [`Stops::stopped`].
pub struct Stopped<'a> {
    stops: &'a Stops,
    slot: usize,
}

impl Future for Stopped<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.stops.ended.get() {
            return Poll::Ready(());
        }
        if let Slot::Busy(w) = &mut self.stops.slots.borrow_mut()[self.slot] {
            match w {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => *w = Some(cx.waker().clone()),
            }
        }
        Poll::Pending
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn ending_wakes_and_resolves_every_forward_in_flight() {
        let stops = Stops::default();
        let (a, b) = (stops.take(), stops.take());
        assert_ne!(a, b);
        let woken = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(woken.clone());
        let mut cx = Context::from_waker(&waker);
        let mut wait_a = std::pin::pin!(stops.stopped(a));
        assert!(wait_a.as_mut().poll(&mut cx).is_pending());
        // b never waited yet: it sees the end at its first poll.
        stops.end();
        assert_eq!(woken.0.load(Ordering::Relaxed), 1, "a's waker, once");
        assert!(wait_a.poll(&mut cx).is_ready());
        assert!(std::pin::pin!(stops.stopped(b)).poll(&mut cx).is_ready());
    }

    #[test]
    fn a_freed_slot_serves_the_next_forward_and_an_idle_session_keeps_none() {
        let stops = Stops::default();
        for _ in 0..100 {
            let s = stops.take();
            assert_eq!(s, 0, "one message at a time: one slot");
            stops.free(s);
        }
        let (a, b) = (stops.take(), stops.take());
        stops.free(a);
        assert_eq!(stops.busy(), 1);
        stops.trim();
        assert_eq!(stops.slots.borrow().len(), 2, "b is in flight: kept");
        stops.free(b);
        stops.trim();
        assert_eq!((stops.busy(), stops.slots.borrow().capacity()), (0, 0));
    }
}
