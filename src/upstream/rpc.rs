//! Message forwarding for the WebSocket and MCPB doors: each JSON-RPC message a client sends is
//! `POST`ed to the namespace's upstream over Streamable HTTP, within one upstream MCP session per
//! client connection, and every message the upstream sends back (a JSON reply, or each event of a
//! `text/event-stream` reply, notifications included) becomes a message or frame for the client
//! as soon as it arrives.
//!
//! Owns the per-connection [`MsgSession`]: the upstream picked by the first message, the session
//! id it issued, and the forwards in flight. Both doors hand each message to
//! [`MsgSession::handle`], which applies the request rate and sends the message on (forwarded,
//! answered by `builtin:echo`, or an error when the namespace is gone). Each message's forward
//! is a future of its own, kept by the session (boxed in a reused block) and polled by the
//! connection's task whenever it waits (for the client's next message, the rest of one, or room
//! to forward one), so the client may go on sending while a message is being answered (the
//! response to a request the server sent it mid-call, a cancellation), with no task spawned per
//! message; what comes back is queued in the connection's [`Outbox`] and written by the
//! connection. An upstream failure costs the client a JSON-RPC error for that message (with the
//! message's id), never the connection; a session whose upstream is gone (refused, or answering
//! 404 for the id) is forgotten, so the client's next `initialize` starts a new one. What the
//! upstream sends outside any request arrives through the session's standalone stream
//! ([`super::listen`]) into the same outbox. Each message's forward, and the session state the
//! forwards share, are [`super::forward`]'s.
//!
//! Invariants: a forward is in flight exactly while it is in the session's list (the count the
//! limits and idleness go by); dropping the session drops its forwards (cancelled, their
//! upstream connections closed). When the last forward in flight finishes, the connection's
//! wait for its client takes its idle deadline from then on, so a session whose last message
//! got nothing back (a notification) is idle, expires and parks like any other. Replies go out
//! in the order they were queued, a part the socket did not take before anything after it.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use crate::boxed::{self, Task};
use crate::stream::Stream;

use super::client;
use super::forward::{forward, State};
use super::message::error_for;
use super::outbox::Outbox;
use super::wire::{self, Body, Carried, SessionFields};
use super::{Namespace, Outcome, Upstream, Upstreams};
use crate::access;
use crate::conn::{give_buf, read_more, take_buf, wait_idle, write_all, ReadError, Wait};
use crate::limiter::{rate, Permit};
use crate::metrics::Frontend;
use crate::worker::{Registration, Worker};

/// Forwards in flight per connection beyond which the connection stops reading its client.
const MAX_IN_FLIGHT: usize = 16;

/// The upstream session of one WebSocket or MCPB connection. When the connection ends, its
/// forwards in flight are cancelled and the session is ended upstream too (`DELETE` with its id,
/// in the background), so upstreams do not keep sessions nobody can reach.
pub struct MsgSession {
    /// The namespace the connection's messages go to, as a view named it (`None`: none was
    /// configured): each message finds it again by name in the upstreams in force, since a
    /// reload may renumber the namespaces or remove this one.
    namespace: Option<&'static Namespace>,
    /// The door, for the request metrics.
    door: Frontend,
    state: Rc<State>,
    outbox: Rc<Outbox>,
    /// The forwards in flight (at most `MAX_IN_FLIGHT`), polled by the connection's task; the
    /// list keeps its room for the next message until the session parks.
    forwards: Vec<Task>,
    worker: Option<&'static Worker>,
    /// The token of its latest stay in the parking lot (see [`MsgSession::park`]). Fits in the
    /// padding after `door`.
    stay: u32,
}

/// Polls the forwards in flight, dropping those that finished, beside a wait for something
/// else; resolves when one has finished (never while none is in flight), so that the session
/// looks again at what changed: room for a message, replies to send, idleness.
struct Drive<'a>(&'a mut Vec<Task>);

impl Future for Drive<'_> {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let before = self.0.len();
        self.0.retain_mut(|f| Pin::new(f).poll(cx).is_pending());
        if self.0.len() < before {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// What ended a wait for the next client message.
enum Woke {
    /// The client's socket: bytes, or expiry (as [`wait_idle`] says).
    Client(Wait),
    /// Messages for the client are queued that its socket did not take at once: these bytes
    /// first (framed already, possibly the rest of a frame), then the queue.
    Queued(Vec<u8>),
}

/// How [`MsgSession::next`] ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// The client sent something: read it.
    Message,
    /// Idle past the limit, or the gateway is draining (forwards in flight were answered first).
    Expired,
    /// The client went away.
    Gone,
    /// The idle sweeper asks the connection to park ([`Worker::park`]), with this session.
    Park,
}

impl MsgSession {
    /// The session of the connection on `stream` (a connection of `door`) whose messages go to
    /// `namespace`: its requests name the client (`X-Forwarded-For`) and
    /// the certificate it showed, if any (`X-Forwarded-Client-Cert`).
    pub fn new(
        worker: &Worker,
        namespace: Option<&'static Namespace>,
        door: Frontend,
        stream: &Stream,
    ) -> MsgSession {
        let state = State::default();
        {
            let mut fields = state.fields.borrow_mut();
            fields.client = MsgSession::client(worker, namespace, stream);
            fields.identity = stream.identity().map(Box::from);
        }
        MsgSession {
            namespace,
            door,
            state: Rc::new(state),
            outbox: Rc::default(),
            forwards: Vec::new(),
            worker: None,
            stay: 0,
        }
    }

    /// Has every upstream request of the session say what the client's WebSocket upgrade said
    /// for them (see [`Carried`]).
    pub fn carry(&mut self, carried: Option<Rc<Carried>>) {
        self.state.fields.borrow_mut().carried = carried;
    }

    /// The address to name in `X-Forwarded-For` for the client on `stream` whose messages go to
    /// `namespace` (see [`Worker::forwarded_for`]).
    fn client(worker: &Worker, namespace: Option<&Namespace>, stream: &Stream) -> Option<IpAddr> {
        let all = worker.upstreams();
        let ns = all.namespace(&namespace?.name)?;
        worker.forwarded_for(all, ns, stream)
    }

    /// The session's namespace in view `all`.
    fn find(&self, all: &Upstreams) -> Option<usize> {
        all.namespace(&self.namespace?.name)
    }

    /// Where the connection's next message goes, in the upstreams in force.
    pub fn dest(&self, worker: &Worker) -> Dest {
        let all = worker.upstreams();
        match self.find(all).map(|ns| &all.namespaces[ns]) {
            None => Dest::Gone,
            Some(n) if n.builtin => Dest::Echo(n.upstreams[0]),
            Some(_) => Dest::Forward,
        }
    }

    /// Handles one message the client sent: over its address's request rate, an error for it
    /// (the session goes on); else forwarded ([`MsgSession::submit`]), answered by
    /// `builtin:echo`, or, when the connection's namespace is gone, an error. What goes back to
    /// the client is framed by `framing` into `out`.
    pub async fn handle(
        &mut self,
        worker: &'static Worker,
        permit: &Permit,
        message: Message<'_>,
        client: &mut Stream,
        out: &mut Vec<u8>,
        framing: &Framing,
    ) -> Result<(), ClientGone> {
        let door = self.door;
        let text = message.bytes();
        if worker.admit_request(permit, door).is_err() {
            (framing.fail)(out, &error_for(text, rate::REFUSAL));
            message.done();
            return Ok(());
        }
        let builtin = match self.dest(worker) {
            Dest::Forward => {
                let sent = self.submit(worker, message.into_owned(), client, out, framing);
                return boxed::pin(sent).await;
            }
            Dest::Echo(builtin) => builtin,
            Dest::Gone => {
                (framing.fail)(out, &error_for(text, NAMESPACE_GONE));
                message.done();
                return Ok(());
            }
        };
        let started = Instant::now();
        let access = access::message_begin(worker, client);
        let mut reply = take_buf();
        if crate::echo::handle(text, &mut reply).replied {
            (framing.reply)(out, &reply);
        }
        access::message_end(access, door, Some(builtin), 200);
        worker.metrics.upstream(builtin.index, Outcome::Ok, None);
        worker.metrics.request(door, started.elapsed());
        give_buf(reply);
        message.done();
        Ok(())
    }

    /// Forwards `message` to the session's namespace beside whatever the connection does next, so
    /// the client can go on sending (a response to a request the server sent it in the middle of
    /// a tool call, say): replies are queued as they come and written by the connection, in
    /// whatever order they complete (JSON-RPC matches them by id). The forward starts at the
    /// connection's next wait ([`MsgSession::next`]). Waits first, forwarding and writing what
    /// arrives meanwhile, while the session is being set up (its first message in flight and no
    /// id yet) or while `MAX_IN_FLIGHT` (16) are in flight.
    pub async fn submit(
        &mut self,
        worker: &'static Worker,
        message: Vec<u8>,
        client: &mut Stream,
        out: &mut Vec<u8>,
        framing: &Framing,
    ) -> Result<(), ClientGone> {
        self.worker = Some(worker);
        loop {
            self.write_queued_with(client, out, framing, worker).await?;
            let in_flight = self.forwards.len();
            let setting_up = in_flight > 0 && self.state.id.borrow().is_none();
            if in_flight < MAX_IN_FLIGHT && !setting_up {
                break;
            }
            monoio::select! {
                _ = self.outbox.ready() => {}
                _ = Drive(&mut self.forwards) => {}
            }
        }
        let (state, outbox) = (self.state.clone(), self.outbox.clone());
        let door = self.door;
        let all = worker.upstreams();
        let ns = self.find(all);
        let access = access::message_begin(worker, client);
        let task = boxed::pin(async move {
            let started = Instant::now();
            let status = forward(worker, (all, ns), &state, &outbox, &message).await;
            worker.metrics.request(door, started.elapsed());
            access::message_end(access, door, state.upstream.get(), status);
            give_buf(message);
        });
        self.forwards.push(task.erase());
        Ok(())
    }

    /// Reads more of the client's next message into `buf` ([`read_more`]) while the forwards in
    /// flight go on.
    pub async fn read_more(
        &mut self,
        client: &mut Stream,
        buf: &mut Vec<u8>,
        deadline: Instant,
    ) -> Result<usize, ReadError> {
        let forwards = async {
            loop {
                Drive(&mut self.forwards).await;
            }
        };
        monoio::select! {
            got = read_more(client, buf, deadline) => got,
            _ = forwards => unreachable!("never resolves"),
        }
    }

    /// Nothing in flight and nothing queued: the session may park with its connection.
    pub fn is_idle(&self) -> bool {
        self.forwards.is_empty() && !self.outbox.has_messages()
    }

    /// The session parks for stay `token`: `waker` (the lot's, see [`crate::park`]) is woken
    /// when a message is queued for its client.
    pub fn park(&mut self, token: u32, waker: Waker) {
        // A parked session has nothing in flight (it parks only idle) and holds no list.
        if self.forwards.is_empty() {
            self.forwards = Vec::new();
        }
        self.stay = token;
        self.outbox.wake(waker);
    }

    /// The token of its latest stay in the parking lot.
    pub fn stay(&self) -> u32 {
        self.stay
    }

    /// The session left the lot: the lot's waker is dropped; its connection's task sets its
    /// own as it waits.
    pub fn wake_task(&self) {
        self.outbox.forget_waker();
    }

    /// Frames the queued messages into `out`.
    pub fn drain(&self, out: &mut Vec<u8>, framing: &Framing) {
        self.outbox.drain(out, framing.reply, framing.fail);
    }

    /// Writes `out` and the queued messages to the client.
    async fn write_queued_with(
        &self,
        client: &mut Stream,
        out: &mut Vec<u8>,
        framing: &Framing,
        worker: &Worker,
    ) -> Result<(), ClientGone> {
        self.drain(out, framing);
        if out.is_empty() {
            return Ok(());
        }
        match write_all(
            client,
            std::mem::take(out),
            worker.settings().timeouts.write(),
        )
        .await
        {
            Ok(o) => {
                *out = o;
                Ok(())
            }
            Err(_) => Err(ClientGone),
        }
    }

    /// Writes `out` (a pooled buffer), then the queued messages, to the client.
    async fn write_queued(
        &self,
        worker: &Worker,
        client: &mut Stream,
        framing: &Framing,
        mut out: Vec<u8>,
    ) -> Result<(), ClientGone> {
        let r = self
            .write_queued_with(client, &mut out, framing, worker)
            .await;
        give_buf(out);
        r
    }

    /// Writes the queued messages straight to the client's socket when it takes them all at
    /// once (a plain connection with room in its send buffer: nearly always), with no wait and
    /// no ring operation; `Err` gives back what it did not take, for [`MsgSession::write_queued`].
    fn send_now(&self, stream: &Stream, framing: &Framing) -> Result<(), Vec<u8>> {
        if !self.outbox.has_messages() {
            return Ok(());
        }
        let mut out = take_buf();
        self.drain(&mut out, framing);
        let Stream::Plain(tcp) = stream else {
            return Err(out); // TLS: the stream's own writes
        };
        // SAFETY: the descriptor is the live socket `stream` holds; the buffer is `out`'s.
        let sent = unsafe {
            libc::send(
                std::os::fd::AsRawFd::as_raw_fd(tcp),
                out.as_ptr().cast(),
                out.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        // Less than all (a full send buffer, or an error the timed write will meet again):
        // the rest goes the usual way, in order.
        out.drain(..usize::try_from(sent).unwrap_or(0));
        if out.is_empty() {
            give_buf(out);
            Ok(())
        } else {
            Err(out)
        }
    }

    /// Waits until every forward in flight has finished, writing what they send meanwhile
    /// (a connection closing while the gateway drains).
    async fn settle(
        &mut self,
        worker: &Worker,
        client: &mut Stream,
        framing: &Framing,
    ) -> Result<(), ClientGone> {
        while !self.forwards.is_empty() {
            monoio::select! {
                _ = self.outbox.ready() => {}
                _ = Drive(&mut self.forwards) => {}
            }
            self.write_queued(worker, client, framing, take_buf())
                .await?;
        }
        self.write_queued(worker, client, framing, take_buf()).await
    }

    /// Waits for the client's next message, holding no buffer (as [`wait_idle`] does), and writes
    /// what comes back from the upstream meanwhile. While forwards are in flight `limit` does not
    /// apply (a long tool call is not idleness); when the wait expires (idle, or the gateway
    /// draining) the forwards in flight are answered first. An idle session (see
    /// [`MsgSession::is_idle`]) whose door allows it (`may_park`: a WebSocket connection does
    /// not in the middle of a fragmented message) may be asked to park.
    ///
    /// The one wait on the client goes on while replies are sent (straight to the socket:
    /// `send_now`), so a message answered costs no second wait and no cancelled
    /// one (monoio boxes each wait it cancels); only replies the socket does not take at once
    /// end it, to be written with the connection's timed write. The wait is written here, not
    /// in a function of its own: its arguments would sit twice in every connection's future.
    pub async fn next(
        &mut self,
        worker: &Worker,
        reg: &Registration,
        client: &mut Stream,
        limit: std::time::Duration,
        framing: &Framing,
        may_park: bool,
    ) -> Next {
        loop {
            let woke = if worker.draining() {
                Woke::Client(Wait::Expired)
            } else {
                let stream = &*client;
                let mut busy = !self.forwards.is_empty();
                reg.set_may_park(may_park && self.is_idle());
                let idle = wait_idle(worker, reg, stream, if busy { FOREVER } else { limit });
                let mut idle = std::pin::pin!(idle);
                loop {
                    let client_woke = monoio::select! {
                        w = idle.as_mut() => Some(w),
                        _ = self.outbox.ready() => None,
                        _ = Drive(&mut self.forwards) => None,
                    };
                    if let Some(w) = client_woke {
                        break Woke::Client(w);
                    }
                    if let Err(out) = self.send_now(stream, framing) {
                        worker.idle_end(reg); // the idle wait is dropped unfinished
                        break Woke::Queued(out);
                    }
                    reg.set_may_park(may_park && self.is_idle());
                    if busy && self.forwards.is_empty() {
                        busy = false;
                        worker.idle_restart(reg, limit);
                    }
                }
            };
            // The writes are boxed: inline, their timers would sit in every idle connection's
            // future (a monoio timer alone is 640 bytes), though an idle wait holds none.
            let done = match woke {
                Woke::Client(Wait::Ready) => return Next::Message,
                Woke::Client(Wait::Park) => return Next::Park,
                Woke::Client(Wait::Expired) => {
                    boxed::pin(self.settle(worker, client, framing)).await
                }
                Woke::Queued(out) => {
                    match boxed::pin(self.write_queued(worker, client, framing, out)).await {
                        Ok(()) => continue,
                        Err(gone) => Err(gone),
                    }
                }
            };
            return match done {
                Ok(()) => Next::Expired,
                Err(ClientGone) => Next::Gone,
            };
        }
    }
}

impl Drop for MsgSession {
    fn drop(&mut self) {
        self.forwards.clear(); // cancels the forwards in flight
        let u = self.state.upstream.get();
        let id = self.state.id.borrow_mut().take();
        let fields = self.state.fields.borrow().clone();
        self.state.listener.borrow_mut().take();
        let (Some(u), Some(id), Some(worker)) = (u, id, self.worker) else {
            return;
        };
        // While draining (and when the runtime itself is being dropped) nothing new is spawned.
        if !worker.draining() {
            monoio::spawn(end_session(worker, u, id, fields));
        }
    }
}

/// Sends `DELETE` for session `id` to `u`; the answer is read and discarded.
async fn end_session(
    worker: &'static Worker,
    u: &'static Upstream,
    id: Vec<u8>,
    fields: SessionFields,
) {
    let mut req = take_buf();
    wire::write_request(&mut req, "DELETE", u, fields.fields(), Some(&id), Some(0));
    let all = worker.upstreams();
    if let Ok((mut up, mut buf, head)) = client::send(all, u, req, None).await {
        let mut body = Body::new(head.body);
        let mut data = take_buf();
        let deadline = Instant::now() + all.request_timeout;
        while body.feed(&mut buf, &mut data).is_ok() && !body.is_done() {
            data.clear();
            if read_more(&mut up, &mut buf, deadline).await.is_err() {
                break;
            }
        }
        if body.is_done() && head.keep_alive && buf.is_empty() {
            client::give_back(u, up);
        }
        give_buf(data);
        give_buf(buf);
    }
}

/// A message a client sent, as its door holds it: a buffer of its own (a WebSocket message,
/// assembled from frames) or a part of the connection's read buffer (an MCPB frame's payload),
/// copied into a pooled buffer only when it is forwarded.
pub enum Message<'a> {
    Owned(Vec<u8>),
    Borrowed(&'a [u8]),
}

impl Message<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Message::Owned(m) => m,
            Message::Borrowed(m) => m,
        }
    }

    fn into_owned(self) -> Vec<u8> {
        match self {
            Message::Owned(m) => m,
            Message::Borrowed(m) => {
                let mut owned = take_buf();
                owned.extend_from_slice(m);
                owned
            }
        }
    }

    /// Done with: an owned buffer goes back to the core's pool.
    fn done(self) {
        if let Message::Owned(m) = self {
            give_buf(m);
        }
    }
}

/// Where a connection's next message goes (see [`MsgSession::dest`]).
pub enum Dest {
    /// Answered inside the gateway by `builtin:echo`, this upstream.
    Echo(&'static Upstream),
    /// Forwarded to the namespace's HTTP upstreams.
    Forward,
    /// Nowhere: the namespace is not configured (any more).
    Gone,
}

/// The error for a message whose namespace is not configured (a reload removed it, or, on the
/// MCPB door, there is no `default` namespace).
pub const NAMESPACE_GONE: &str = "this connection's MCP namespace is not configured";
/// The error for a message of a session whose upstream a reload removed.
pub const UPSTREAM_REMOVED: &str =
    "the session's upstream MCP server was removed from the configuration; initialize a new session";

/// How a door frames what comes back: a reply message, or an error for a message.
pub struct Framing {
    pub reply: fn(&mut Vec<u8>, &[u8]),
    pub fail: fn(&mut Vec<u8>, &[u8]),
}

/// The client went away while replies were being written.
#[derive(Debug)]
pub struct ClientGone;

/// A wait with no end in sight (event streams): far enough to never fire.
pub(super) const FOREVER: std::time::Duration = std::time::Duration::from_secs(365 * 86_400);
