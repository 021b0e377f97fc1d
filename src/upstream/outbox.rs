//! What goes to one WebSocket or MCPB client from its upstream session: the replies of its
//! forwarded messages and what the session's standalone stream brings, queued by the forwards
//! (futures the connection's task polls) and the stream's task as they receive them, and written
//! by the connection's own task in one place (so frames never interleave).
//!
//! Owns the queue and the wake-up of the connection's task when a message is queued. Bounded: at most [`MAX_QUEUED`] messages and [`MAX_QUEUED_BYTES`] bytes wait;
//! a producer that finds the queue full gives up (a session stream is dropped; a reply becomes an
//! error for its message).
//!
//! The queue is one byte buffer from the core's pool (each message a kind byte, a 4-byte length
//! and its bytes), taken at the first push and given back when the connection drains it: a
//! message queued costs a copy into it and no allocation, and an idle session holds none.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use crate::conn::{give_buf, take_buf};

/// Messages waiting for the client beyond which producers give up.
pub const MAX_QUEUED: usize = 1024;

/// Bytes waiting for the client beyond which producers give up: a client that does not read
/// while its tool calls return large results would otherwise have up to [`MAX_QUEUED`] of them
/// held for it, each up to `server.max_message_size`. Room for one message of the largest size
/// any configuration allows (10 MiB) and more.
pub const MAX_QUEUED_BYTES: usize = 16 << 20;

/// How a message is framed for the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Something the upstream sent (a reply, a notification, a request to the client).
    Reply = 0,
    /// A JSON-RPC error the gateway made for a message it could not forward.
    Fail = 1,
}

/// Bytes before each message in the queue: its kind and its length.
const ENTRY_HEAD: usize = 5;

#[derive(Default)]
pub struct Outbox {
    /// The queued messages, one after another: a [`Kind`] byte (0 reply, 1 fail), the length as
    /// a little-endian `u32`, the bytes. A pooled buffer while not empty, none while empty.
    queue: RefCell<Vec<u8>>,
    /// Messages in `queue`.
    messages: Cell<usize>,
    /// The bytes of the messages in `queue` (without their entry heads).
    bytes: Cell<usize>,
    /// Woken by the next push: the connection's task waiting in [`Outbox::ready`], or the
    /// parking lot's for a parked session.
    waker: Cell<Option<Waker>>,
}

impl Outbox {
    /// Queues a copy of `message`; false when the queue is full.
    pub fn push(&self, kind: Kind, message: &[u8]) -> bool {
        let bytes = self.bytes.get() + message.len();
        if self.messages.get() >= MAX_QUEUED || bytes > MAX_QUEUED_BYTES {
            return false;
        }
        {
            let mut q = self.queue.borrow_mut();
            if q.capacity() == 0 {
                *q = take_buf();
            }
            q.push(kind as u8);
            // At most MAX_QUEUED_BYTES (16 MiB): fits in a u32.
            q.extend_from_slice(&(message.len() as u32).to_le_bytes());
            q.extend_from_slice(message);
        }
        self.bytes.set(bytes);
        self.messages.set(self.messages.get() + 1);
        // After the queue's borrow ends: the waker is never woken with it held.
        if let Some(w) = self.waker.take() {
            w.wake();
        }
        true
    }

    pub fn has_messages(&self) -> bool {
        self.messages.get() > 0
    }

    /// Frames every queued message into `out`.
    pub fn drain(
        &self,
        out: &mut Vec<u8>,
        reply: fn(&mut Vec<u8>, &[u8]),
        fail: fn(&mut Vec<u8>, &[u8]),
    ) {
        let q = std::mem::take(&mut *self.queue.borrow_mut());
        let mut at = 0;
        while at < q.len() {
            let len = u32::from_le_bytes(q[at + 1..at + ENTRY_HEAD].try_into().expect("4 bytes"));
            let m = &q[at + ENTRY_HEAD..at + ENTRY_HEAD + len as usize];
            match q[at] {
                0 => reply(out, m),
                _ => fail(out, m),
            }
            at += ENTRY_HEAD + m.len();
        }
        // An idle session holds no queue: the buffer goes back to the core's pool.
        give_buf(q);
        self.messages.set(0);
        self.bytes.set(0);
    }

    /// Resolves once a message is queued (at once if one is).
    pub fn ready(&self) -> impl Future<Output = ()> + '_ {
        Ready(self)
    }

    /// Has `waker` woken at the next push, in place of a task's: a parked connection's (see
    /// [`crate::park`]).
    pub fn wake(&self, waker: Waker) {
        self.waker.set(Some(waker));
    }

    /// Drops the waker set by [`Outbox::wake`] (or a task's), so that it is never woken.
    pub fn forget_waker(&self) {
        self.waker.take();
    }
}

struct Ready<'a>(&'a Outbox);

impl Future for Ready<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0.has_messages() {
            return Poll::Ready(());
        }
        self.0.waker.set(Some(cx.waker().clone()));
        Poll::Pending
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn queue_is_bounded_and_drained_in_order_with_its_framing() {
        let o = Outbox::default();
        assert!(o.push(Kind::Reply, b"a"));
        assert!(o.push(Kind::Fail, b"b"));
        let mut out = Vec::new();
        o.drain(
            &mut out,
            |o, m| o.extend([b"R".as_slice(), m].concat()),
            |o, m| o.extend([b"F".as_slice(), m].concat()),
        );
        assert_eq!(out, b"RaFb");
        assert!(!o.has_messages());
        // What an idle WebSocket or MCPB session keeps of its replies: nothing.
        assert_eq!(o.queue.borrow().capacity(), 0);
        for _ in 0..MAX_QUEUED {
            assert!(o.push(Kind::Reply, b""));
        }
        assert!(!o.push(Kind::Reply, b""), "full");
        let mut out = Vec::new();
        o.drain(&mut out, |o, m| o.extend(m), |_, _| {});
        assert!(out.is_empty() && !o.has_messages());
        assert!(o.push(Kind::Reply, b"again"), "drained: room again");
    }

    #[test]
    fn queue_is_bounded_in_bytes_too() {
        let o = Outbox::default();
        let mib = vec![b'x'; 1 << 20];
        for _ in 0..16 {
            assert!(o.push(Kind::Reply, &mib));
        }
        assert!(!o.push(Kind::Reply, &mib), "16 MiB wait already");
        assert!(!o.push(Kind::Fail, b"x"), "not a byte more");
        let mut out = Vec::new();
        o.drain(&mut out, |o, m| o.extend(m), |_, _| {});
        assert_eq!(out.len(), 16 << 20, "every byte, none twice");
        assert!(o.push(Kind::Reply, &mib), "taken by the client: room again");
    }
}
