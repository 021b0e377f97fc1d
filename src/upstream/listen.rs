//! The standalone `GET` stream of a WebSocket or MCPB connection's upstream session: what an MCP
//! server sends on its own (notifications, requests to the client) outside any request of the
//! client's, delivered to that client as messages.
//!
//! Owns the listener task. It is spawned on the connection's core once the session has an id; it
//! `GET`s the session's stream and queues every event's data in the connection's
//! [`Outbox`], which the connection writes. Dropping the [`Listener`] (the connection ended)
//! cancels the task at once, whatever it is waiting on. An upstream that offers no stream (405)
//! or drops it simply ends the task: requests and their replies go on; so does a reload that
//! removes the upstream (see [`Worker::watch_session_stream`]). A client too slow to take
//! what the stream brings (the outbox full) loses the stream, like a server would drop a
//! subscriber that does not read.
//!
//! When the connection parks ([`crate::park`]), a listener waiting for its next event with
//! nothing else in hand (its idle point) hands the stream over ([`Listener::hand_over`]): its
//! task ends, and the lot watches the upstream socket beside the client's; once the connection
//! is back in a task, [`Listener::resume`] spawns the task again on the stream, which reads on
//! where it stopped. Only a stream from a plain upstream (a TLS session's buffered bytes are not
//! seen by a socket's readiness).
//!
//! Invariants: the stream is in exactly one place at a time, the task or the handed-over box;
//! the task hands it over only while asked, and the asking ends, whatever the task did, once
//! the task is no longer at its idle point, so a stream is never handed over to nobody.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures_channel::oneshot;

use super::client;
use super::outbox::{Kind, Outbox};
use super::rpc::{take_events, TooLarge};
use super::wire::{self, Body, SessionFields};
use super::Upstream;
use crate::conn::{give_buf, read_more, take_buf, ReadError};
use crate::stream::Stream;
use crate::worker::{SessionStreamWatch, Worker};

/// A session's standalone stream, running in its task or handed over; dropping it stops the
/// task, or closes the handed-over stream.
pub struct Listener {
    stop: oneshot::Sender<()>,
    shared: Rc<Shared>,
    outbox: Rc<Outbox>,
}

/// What the listener's task and its session share.
#[derive(Default)]
pub struct Shared {
    /// The task waits at its idle point (see the module documentation).
    idle: Cell<bool>,
    /// The session asks the task to hand the stream over at its idle point.
    asked: Cell<bool>,
    /// The stream, handed over.
    handed: RefCell<Option<Box<Open>>>,
    /// The task's waker while at its idle point, the asker's while it asks.
    task: Cell<Option<Waker>>,
    asker: Cell<Option<Waker>>,
}

/// An open session stream between two events: what the task needs to go on reading it.
pub struct Open {
    up: Stream,
    body: Body,
    u: &'static Upstream,
    /// A reload removing the upstream ends the stream (the session's next message then finds
    /// the session gone).
    _watch: SessionStreamWatch,
}

/// Starts listening on session `id` of `u` (its requests carry `fields`), queueing what comes
/// into `outbox`.
pub fn start(
    worker: &'static Worker,
    u: &'static Upstream,
    id: Vec<u8>,
    fields: SessionFields,
    outbox: Rc<Outbox>,
) -> Listener {
    let (stop, stop_rx) = oneshot::channel();
    let shared = Rc::<Shared>::default();
    monoio::spawn(task(
        worker,
        u,
        id,
        fields,
        outbox.clone(),
        shared.clone(),
        stop_rx,
    ));
    Listener {
        stop,
        shared,
        outbox,
    }
}

impl Listener {
    /// Asks the task to hand the stream over if it waits at its idle point; resolves once it
    /// did, or it is not there (busy with an event, opening, ended): then it runs on.
    pub fn hand_over(&self) -> impl Future<Output = ()> {
        let shared = self.shared.clone();
        if shared.idle.get() {
            shared.asked.set(true);
            if let Some(w) = shared.task.take() {
                w.wake();
            }
        }
        HandOver(shared)
    }

    /// The upstream socket of the handed-over stream, for the parking lot to watch.
    pub fn handed_fd(&self) -> Option<RawFd> {
        let handed = self.shared.handed.borrow();
        handed.as_ref().map(|open| open.up.tcp().as_raw_fd())
    }

    /// Spawns the task again on the handed-over stream, if there is one.
    pub fn resume(&mut self, worker: &'static Worker) {
        let Some(open) = self.shared.handed.borrow_mut().take() else {
            return;
        };
        let (stop, stop_rx) = oneshot::channel();
        self.stop = stop; // the old one's task has ended
        let (outbox, shared) = (self.outbox.clone(), self.shared.clone());
        monoio::spawn(async move {
            monoio::select! {
                _ = relay(worker, open, Vec::new(), &outbox, &shared) => {}
                _ = stop_rx => {}
            }
        });
    }
}

/// Resolves once the asked task handed the stream over or left its idle point; asks no more.
struct HandOver(Rc<Shared>);

impl Future for HandOver {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let shared = &self.0;
        if !shared.asked.get() || !shared.idle.get() || shared.handed.borrow().is_some() {
            return Poll::Ready(());
        }
        shared.asker.set(Some(cx.waker().clone()));
        Poll::Pending
    }
}

impl Drop for HandOver {
    fn drop(&mut self) {
        self.0.asked.set(false); // also when the asker goes first: never hand over to nobody
    }
}

/// Marks the task at its idle point while it lives; leaving it (or the task's end) wakes an
/// asker.
struct AtIdlePoint<'a>(&'a Shared);

impl<'a> AtIdlePoint<'a> {
    fn new(shared: &'a Shared) -> Self {
        shared.idle.set(true);
        AtIdlePoint(shared)
    }
}

impl Drop for AtIdlePoint<'_> {
    fn drop(&mut self) {
        self.0.idle.set(false);
        self.0.task.take();
        if let Some(w) = self.0.asker.take() {
            w.wake();
        }
    }
}

/// Resolves when the task is asked to hand its stream over.
struct Asked<'a>(&'a Shared);

impl Future for Asked<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0.asked.get() {
            return Poll::Ready(());
        }
        self.0.task.set(Some(cx.waker().clone()));
        Poll::Pending
    }
}

/// The listener task: what a session holds for as long as it lives and its connection is not
/// parked (a unit test keeps its size in check). Opening the stream is boxed, and the session's
/// id and fields go into that box: once the stream is open, the task holds only the wait for
/// its next event.
pub(crate) fn task(
    worker: &'static Worker,
    u: &'static Upstream,
    id: Vec<u8>,
    fields: SessionFields,
    outbox: Rc<Outbox>,
    shared: Rc<Shared>,
    mut stop_rx: oneshot::Receiver<()>,
) -> impl Future<Output = ()> {
    let mut opening = Box::pin(open(worker, u, id, fields));
    async move {
        monoio::select! {
            _ = async {
                if let Some((open, buf)) = (&mut opening).await {
                    drop(opening);
                    relay(worker, open, buf, &outbox, &shared).await;
                }
            } => {}
            _ = &mut stop_rx => {}
        }
    }
}

/// Reads the stream's events into `queue`, starting with what `buf` holds, until it ends or
/// is handed over.
async fn relay(
    worker: &'static Worker,
    mut open: Box<Open>,
    mut buf: Vec<u8>,
    queue: &Outbox,
    shared: &Shared,
) {
    let mut data = take_buf();
    let max = worker.settings().max_message_size;
    loop {
        if open.body.feed(&mut buf, &mut data).is_err() {
            break;
        }
        match take_events(&mut data, max, |event| {
            event.is_empty() || queue.push(Kind::Reply, event)
        }) {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(upstream = %open.u.url, "client too slow for its session stream; dropping the stream");
                break;
            }
            // Past what a message may be: the stream goes (the session's requests still get
            // their own replies).
            Err(TooLarge) => {
                tracing::warn!(upstream = %open.u.url, "session stream event larger than max_message_size; dropping the stream");
                break;
            }
        }
        if open.body.is_done() {
            break;
        }
        // A session stream may be silent for as long as the session lives; meanwhile it holds
        // no buffer (unless part of an event is in one), and it can be handed over.
        if buf.is_empty() && data.is_empty() {
            give_buf(std::mem::take(&mut buf));
            give_buf(std::mem::take(&mut data));
            match idle(&open.up, shared).await {
                Some(Ok(())) => {}
                Some(Err(_)) => return,
                None => {
                    *shared.handed.borrow_mut() = Some(open);
                    return;
                }
            }
            buf = take_buf();
            data = take_buf();
        }
        // Boxed: a read's deadline is a monoio timer, held only while the read lasts.
        let far = Instant::now() + Duration::from_secs(365 * 86_400);
        match Box::pin(read_more(&mut open.up, &mut buf, far)).await {
            Ok(_) => {}
            Err(ReadError::Eof) if open.body.eof().is_ok() => {}
            Err(_) => break,
        }
    }
    give_buf(data);
    give_buf(buf);
}

/// The idle point: waits until `up` is readable (`Some`), or, asked to, hands over (`None`:
/// only a plain stream).
async fn idle(up: &Stream, shared: &Shared) -> Option<std::io::Result<()>> {
    if !matches!(up, Stream::Plain(_)) {
        return Some(up.readable().await);
    }
    let _at = AtIdlePoint::new(shared);
    monoio::select! {
        r = up.readable() => Some(r),
        _ = Asked(shared) => None,
    }
}

/// Sends the `GET` of session `id`'s stream to `u`: the open stream and what was read past
/// the response head, if the upstream offers the stream.
async fn open(
    worker: &'static Worker,
    u: &'static Upstream,
    id: Vec<u8>,
    fields: SessionFields,
) -> Option<(Box<Open>, Vec<u8>)> {
    let mut req = take_buf();
    wire::write_request(&mut req, "GET", u, "", fields.fields(), Some(&id), Some(0));
    let (up, buf, head) = client::send(worker.upstreams(), u, req, None).await.ok()?;
    if head.status != 200 || !head.event_stream {
        tracing::debug!(upstream = %u.url, status = head.status, "upstream offers no session stream");
        give_buf(buf);
        return None;
    }
    let watch = worker.watch_session_stream(up.tcp().as_raw_fd(), u.index);
    let open = Open {
        up,
        body: Body::new(head.body),
        u,
        _watch: watch,
    };
    Some((Box::new(open), buf))
}
