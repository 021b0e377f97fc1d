//! The standalone `GET` stream of a WebSocket or MCPB connection's upstream session: what an MCP
//! server sends on its own (notifications, requests to the client) outside any request of the
//! client's, delivered to that client as messages.
//!
//! Owns the listener task. It is spawned on the connection's core once the session has an id; it
//! `GET`s the session's stream and queues every event's data in the connection's
//! [`Outbox`], which the connection writes. Dropping the [`Listener`] (the connection ended)
//! cancels the task at once, whatever it is waiting on. A stream the upstream ends is opened
//! again (MCP 2025-11-25: a server may end it to have its client poll), after its last event
//! when it gave an id (see [`super::resume`]). An upstream that offers no stream (405), or will
//! not open it again, simply ends the task: requests and their replies go on; so does a reload
//! that removes the upstream (see [`Worker::watch_session_stream`]). A client too slow to take
//! what the stream brings (the outbox full) loses the stream, like a server would drop a
//! subscriber that does not read.

use std::future::Future;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_channel::oneshot;

use super::client;
use super::events::{take_events, TooLarge};
use super::outbox::{Kind, Outbox};
use super::resume::Resume;
use super::wire::{self, Body, BodyKind, SessionFields};
use super::Upstream;
use crate::boxed;
use crate::conn::{give_buf, read_more, take_buf, ReadError};
use crate::stream::Stream;
use crate::worker::Worker;

/// A running listener; dropping it stops the task.
pub struct Listener {
    _stop: oneshot::Sender<()>,
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
    let (stop_tx, stop_rx) = oneshot::channel();
    monoio::spawn(task(worker, u, id, fields, outbox, stop_rx));
    Listener { _stop: stop_tx }
}

/// The listener task: what a session holds for as long as it lives (a unit test keeps its size
/// in check). The session's id and fields are boxed (opening the stream needs them, and
/// resuming it again), and so is opening the stream: once it is open, the task holds only the
/// wait for its next event.
pub(crate) fn task(
    worker: &'static Worker,
    u: &'static Upstream,
    id: Vec<u8>,
    fields: SessionFields,
    outbox: Rc<Outbox>,
    mut stop_rx: oneshot::Receiver<()>,
) -> impl Future<Output = ()> {
    let session = Box::new((id, fields));
    async move {
        monoio::select! {
            _ = listen(worker, u, &session, &outbox) => {}
            _ = &mut stop_rx => {}
        }
    }
}

async fn listen(
    worker: &'static Worker,
    u: &'static Upstream,
    (id, fields): &(Vec<u8>, SessionFields),
    queue: &Outbox,
) {
    let Some((mut up, mut buf, mut kind)) = boxed::pin(open(worker, u, id, fields, None)).await
    else {
        return;
    };
    let max = worker.settings().max_message_size();
    // Where the stream left off, once one of its events had an id or a `retry` (boxed: most
    // servers give neither, and the task lives as long as the session).
    let mut resume: Option<Box<Resume>> = None;
    loop {
        // A reload removing the upstream ends the stream (the session's next message then
        // finds the session gone; a removed upstream's stream is not resumed).
        let watch = worker.watch_session_stream(up.as_raw_fd(), u.index);
        let mut body = Body::new(kind);
        let mut data = take_buf();
        // True when the stream goes for good (else: resumed, if it can be).
        let dropped = loop {
            if body.feed(&mut buf, &mut data).is_err() {
                break false;
            }
            match take_events(&mut data, max, |event| {
                if event.id.is_some() || event.retry.is_some() || resume.is_some() {
                    resume.get_or_insert_with(Box::default).saw(event);
                }
                event.data.is_empty() || queue.push(Kind::Reply, event.data)
            }) {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(upstream = %u.url, "client too slow for its session stream; dropping the stream");
                    break true;
                }
                // Past what a message may be: the stream goes (the session's requests still
                // get their own replies).
                Err(TooLarge) => {
                    tracing::warn!(upstream = %u.url, "session stream event larger than max_message_size; dropping the stream");
                    break true;
                }
            }
            if body.is_done() {
                break false;
            }
            // A session stream may be silent for as long as the session lives; meanwhile it
            // holds no buffer (unless part of an event is in one).
            if buf.is_empty() && data.is_empty() {
                give_buf(std::mem::take(&mut buf));
                give_buf(std::mem::take(&mut data));
                if up.readable().await.is_err() {
                    break false;
                }
                buf = take_buf();
                data = take_buf();
            }
            // Boxed: a read's deadline is a monoio timer, held only while the read lasts.
            let far = Instant::now() + Duration::from_secs(365 * 86_400);
            match boxed::pin(read_more(&mut up, &mut buf, far)).await {
                Ok(_) => {}
                Err(ReadError::Eof) if body.eof().is_ok() => {}
                Err(_) => break false,
            }
        };
        give_buf(data);
        drop(watch);
        // A server may end the stream to have its client poll it (MCP 2025-11-25): open it
        // again, after its last event if it gave one.
        let again = match dropped {
            false => {
                let r = resume.as_deref();
                boxed::pin(Resume::reopen_session_stream(r, worker, u, id, fields)).await
            }
            true => None,
        };
        let Some(again) = again else {
            break;
        };
        tracing::debug!(upstream = %u.url, "session stream resumed after its last event");
        give_buf(std::mem::take(&mut buf));
        (up, buf, kind) = again;
    }
    give_buf(buf);
}

/// Sends the `GET` of session `id`'s stream to `u`, or of the stream that gave event
/// `last_event_id` from after that event (`Last-Event-ID`): the connection, what it read past
/// the response head, and how the body is framed, if the upstream offers the stream.
pub(super) async fn open(
    worker: &'static Worker,
    u: &'static Upstream,
    id: &[u8],
    fields: &SessionFields,
    last_event_id: Option<&[u8]>,
) -> Option<(Stream, Vec<u8>, BodyKind)> {
    let mut req = take_buf();
    let f = fields.resuming(last_event_id);
    wire::write_request(&mut req, "GET", u, f, Some(id), Some(0));
    let (up, buf, head) = client::send(worker.upstreams(), u, req, None).await.ok()?;
    if head.status != 200 || !head.event_stream {
        tracing::debug!(upstream = %u.url, status = head.status, "upstream offers no session stream");
        give_buf(buf);
        return None;
    }
    Some((up, buf, head.body))
}
