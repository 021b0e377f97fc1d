//! The standalone `GET` stream of a WebSocket or MCPB connection's upstream session: what an MCP
//! server sends on its own (notifications, requests to the client) outside any request of the
//! client's, delivered to that client as messages.
//!
//! Owns the listener task and the queue between it and the connection. The task is spawned on
//! the connection's core once the session has an id; it `GET`s the session's stream and queues
//! every event's data, waking the connection, which frames and writes them (so all writes to a
//! client stay in its own task and frames never interleave). Dropping the [`Listener`] (the
//! connection ended) cancels the task at once, whatever it is waiting on. An upstream that offers
//! no stream (405) or drops it simply ends the task: requests and their replies go on.
//!
//! Bounded: at most [`MAX_QUEUED`] messages wait for a slow client; beyond that the stream is
//! dropped, like a server would drop a subscriber that does not read.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures_channel::oneshot;

use super::client;
use super::rpc::next_event;
use super::wire::{self, Body};
use super::Upstream;
use crate::conn::{give_buf, read_more, take_buf, ReadError};
use crate::worker::Worker;

/// Messages waiting for the client beyond which the stream is dropped.
const MAX_QUEUED: usize = 1024;

/// Messages from the upstream's stream, waiting for the connection to write them.
#[derive(Default)]
pub struct Notices {
    queue: RefCell<VecDeque<Vec<u8>>>,
    waker: Cell<Option<Waker>>,
}

impl Notices {
    fn push(&self, message: Vec<u8>) -> bool {
        let mut q = self.queue.borrow_mut();
        if q.len() >= MAX_QUEUED {
            return false;
        }
        q.push_back(message);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
        true
    }

    /// Frames every queued message into `out` with `frame`.
    pub fn drain(&self, out: &mut Vec<u8>, frame: fn(&mut Vec<u8>, &[u8])) {
        for m in self.queue.borrow_mut().drain(..) {
            frame(out, &m);
        }
    }

    /// Resolves once a message is queued.
    pub fn ready(&self) -> impl Future<Output = ()> + '_ {
        Ready(self)
    }
}

struct Ready<'a>(&'a Notices);

impl Future for Ready<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0.queue.borrow().is_empty() {
            self.0.waker.set(Some(cx.waker().clone()));
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }
}

/// A running listener; dropping it stops the task.
pub struct Listener {
    pub notices: Rc<Notices>,
    _stop: oneshot::Sender<()>,
}

/// Starts listening on session `id` of `u`.
pub fn start(worker: &'static Worker, u: &'static Upstream, id: Vec<u8>) -> Listener {
    let notices = Rc::new(Notices::default());
    let (stop_tx, mut stop_rx) = oneshot::channel();
    let queue = notices.clone();
    monoio::spawn(async move {
        monoio::select! {
            _ = listen(worker, u, id, &queue) => {}
            _ = &mut stop_rx => {}
        }
    });
    Listener {
        notices,
        _stop: stop_tx,
    }
}

async fn listen(worker: &'static Worker, u: &'static Upstream, id: Vec<u8>, queue: &Notices) {
    let mut req = take_buf();
    wire::write_request(&mut req, "GET", u, "", None, Some(&id), Some(0));
    let Ok((mut up, mut buf, head)) = client::send(worker.shared.upstreams, u, req, None).await
    else {
        return;
    };
    if head.status != 200 || !head.event_stream {
        tracing::debug!(upstream = %u.url, status = head.status, "upstream offers no session stream");
        give_buf(buf);
        return;
    }
    let mut body = Body::new(head.body);
    let mut data = take_buf();
    loop {
        if body.feed(&mut buf, &mut data).is_err() {
            break;
        }
        let mut at = 0;
        while let Some((used, event)) = next_event(&data[at..]) {
            at += used;
            if !event.is_empty() && !queue.push(event) {
                tracing::warn!(upstream = %u.url, "client too slow for its session stream; dropping the stream");
                give_buf(data);
                give_buf(buf);
                return;
            }
        }
        data.drain(..at);
        if body.is_done() {
            break;
        }
        // A session stream may be silent for as long as the session lives.
        let far = Instant::now() + Duration::from_secs(365 * 86_400);
        match read_more(&mut up, &mut buf, far).await {
            Ok(_) => {}
            Err(ReadError::Eof) if body.eof().is_ok() => {}
            Err(_) => break,
        }
    }
    give_buf(data);
    give_buf(buf);
}
