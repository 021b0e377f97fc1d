//! One core's accept path: the accept loops (backing off on errors), admission through the
//! limiter, refusals at a limit, PROXY headers from trusted load balancers, and the connection
//! tasks, each guarded so that a panic ends only its own connection.

use std::cell::Cell;
use std::future::Future;
use std::net::IpAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use monoio::net::{TcpListener, TcpStream};

use crate::http::Upgraded;
use crate::limiter::{Permit, Rejection};
use crate::metrics::{AcceptError, Frontend, ProtocolError};
use crate::proxy_protocol::{self, HeaderError};
use crate::stream::Stream;
use crate::upstream::rpc::MsgSession;
use crate::{conn, http, mcpb, websocket};

use super::{Registration, Worker};

/// Rejection replies in flight per worker; past this a rejected HTTP client is closed without a
/// reply, so a flood cannot make the gateway hold more sockets for refusals than for clients.
const MAX_REJECTING: usize = 4096;

pub(super) async fn accept_loop(worker: &'static Worker, listener: TcpListener, door: Frontend) {
    let mut backoff = Duration::ZERO;
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                backoff = Duration::ZERO;
                admit(worker, stream, peer.ip(), door);
            }
            Err(e) => {
                let kind = AcceptError::of(&e);
                worker.metrics.accept_error(door, kind);
                backoff = (backoff * 2).clamp(Duration::from_millis(5), Duration::from_secs(1));
                tracing::warn!(worker = worker.index, frontend = door.label(), error = %e, ?backoff, "accept failed; backing off");
                monoio::time::sleep(backoff).await;
            }
        }
    }
}

fn admit(worker: &'static Worker, stream: TcpStream, ip: IpAddr, door: Frontend) {
    let limiter = worker.shared.limiter;
    // A trusted load balancer's connection takes its per-IP place once its header names the
    // client (see `relay`).
    let relayed = worker.settings().proxy_protocol.get().trusts(ip);
    let admitted = match relayed {
        true => limiter.try_acquire_global(),
        false => limiter.try_acquire(ip),
    };
    let permit = match admitted {
        Ok(p) => p,
        Err(why) => return refuse(worker, stream, ip, why, door),
    };
    // TCP_NODELAY comes from the listener (see `runtime::bind_one`).
    if relayed {
        monoio::spawn(CatchUnwind(relay(worker, stream, ip, permit, door)));
    } else {
        open_door(worker, stream, permit, door, None);
    }
}

/// Serves an admitted connection on `door` (as `client`, named by a PROXY header, when given):
/// at once on plain doors; on TLS doors, once a task of its own has run the handshake
/// ([`conn::open`]), so that the served future never holds the handshake's state. The
/// connection counts as open on its door from here (a handshake too).
fn open_door(
    worker: &'static Worker,
    tcp: TcpStream,
    permit: Permit,
    door: Frontend,
    client: Option<IpAddr>,
) {
    let reg = worker.register(&tcp, door);
    if !worker.speaks_tls() {
        return serve_door(worker, Stream::Plain(tcp), permit, reg, client);
    }
    // A handshake costs the gateway about 125 us of CPU: with a request rate set, each counts
    // as a request of its client, so a flood of new connections from one address is refused
    // before it costs that.
    if permit.admit_request().is_err() {
        worker.metrics.rate_limited(door);
        tracing::debug!(
            frontend = door.label(),
            "TLS handshake over the request rate: closed"
        );
        return;
    }
    monoio::spawn(CatchUnwind(async move {
        if let Some(stream) = conn::open(worker, tcp, door).await {
            serve_door(worker, stream, permit, reg, client);
        }
    }));
}

/// Spawns the door's future as the task itself: no wrapper state on top of its idle wait, but
/// the client a PROXY header named (see [`WithClient`]).
fn serve_door(
    worker: &'static Worker,
    stream: Stream,
    permit: Permit,
    reg: Registration,
    client: Option<IpAddr>,
) {
    match reg.door() {
        Frontend::Tcp => spawn_connection(mcpb::serve(worker, stream, permit, reg, None), client),
        _ => spawn_connection(http::serve(worker, stream, permit, reg, None), client),
    }
}

/// Hands a connection upgraded to WebSocket to a task of its own (with the client a PROXY header
/// named, if one did), so that the HTTP door's task, and what it held, ends.
pub fn serve_upgraded(
    worker: &'static Worker,
    stream: Stream,
    permit: Permit,
    reg: Registration,
    upgraded: Upgraded,
) {
    let Upgraded {
        rest: first,
        namespace,
        carried,
    } = upgraded;
    let pending = if first.is_empty() {
        conn::give_buf(first);
        None
    } else {
        Some(first)
    };
    let mut session = MsgSession::new(worker, Some(namespace), Frontend::WebSocket, &stream);
    session.carry(carried);
    let ws = websocket::serve(
        worker,
        stream,
        reg,
        permit,
        pending,
        Box::new(session),
        false,
    );
    spawn_connection(ws, relayed());
}

/// Spawns a connection's task: panics caught, and the relayed client, if any, named to its code.
pub(super) fn spawn_connection(door: impl Future<Output = ()> + 'static, client: Option<IpAddr>) {
    match client {
        None => monoio::spawn(CatchUnwind(door)),
        Some(c) => monoio::spawn(CatchUnwind(WithClient::new(c, door))),
    };
}

/// Counts and logs a connection the limiter refused, and gives it what it is owed. TCP: closed
/// at once, nothing read or written. HTTP: the status it is owed, from a task of its own.
fn refuse(worker: &'static Worker, stream: TcpStream, ip: IpAddr, why: Rejection, door: Frontend) {
    worker.metrics.rejected(door, why);
    tracing::debug!(%ip, frontend = door.label(), reason = why.label(), "connection rejected");
    // Over the connection rate on a TLS door, the answer would cost the handshake that the rate
    // is there to spare: closed at once, as the request rate closes such a connection.
    let spared = why == Rejection::ConnectionRate && worker.tls().is_some();
    if door == Frontend::Http && !spared && worker.rejecting.get() < MAX_REJECTING {
        let slot = RejectSlot::take(worker);
        monoio::spawn(CatchUnwind(async move {
            let _slot = slot;
            http::reject(worker, stream, why).await;
        }));
    }
}

/// A connection from a trusted load balancer at `peer`, holding a global place: reads its PROXY
/// header, takes the per-IP place of the client it names, then serves it as that client in a
/// task of its own, so that it waits between requests in the same state as any connection.
async fn relay(
    worker: &'static Worker,
    stream: TcpStream,
    peer: IpAddr,
    permit: Permit,
    door: Frontend,
) {
    let deadline = Instant::now() + worker.settings().timeouts.read();
    let client = match proxy_protocol::read_header(&stream, deadline).await {
        Ok(named) => named.unwrap_or(peer),
        Err(e) => return bad_header(worker, stream, peer, door, e).await,
    };
    worker.metrics.proxy_header(door);
    let permit = match permit.for_address(client) {
        Ok(p) => p,
        Err(why) => return refuse(worker, stream, client, why, door),
    };
    // The balancer's own health check (client == peer) needs no wrapper.
    let named = (client != peer).then_some(client);
    open_door(worker, stream, permit, door, named);
}

/// The client a PROXY header named for the connection whose task runs now (see [`WithClient`]).
pub(super) fn relayed() -> Option<IpAddr> {
    RELAYED.get()
}

thread_local! {
    /// The client a PROXY header named for the connection whose task runs now on this worker
    /// thread (set by [`WithClient`] around each poll of that task), `None` for any other task.
    static RELAYED: Cell<Option<IpAddr>> = const { Cell::new(None) };
}

/// A relayed connection's door future with the client its PROXY header named, which
/// [`Worker::forwarded_for`] answers while (and only while) this future is being polled. A
/// connection's code runs only inside its own task's poll, so nothing else can see it, and no
/// table by socket is needed (nor cleaned when a descriptor is reused).
pub(crate) struct WithClient<F> {
    client: IpAddr,
    door: F,
}

impl<F: Future<Output = ()>> WithClient<F> {
    pub(crate) fn new(client: IpAddr, door: F) -> Self {
        WithClient { client, door }
    }
}

impl<F: Future<Output = ()>> Future for WithClient<F> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        /// Clears the client when the poll ends, a panicking one included.
        struct Clear;
        impl Drop for Clear {
            fn drop(&mut self) {
                RELAYED.set(None);
            }
        }
        // SAFETY: nothing is moved out of `self`: `client` is copied, `door` pinned again below.
        let this = unsafe { self.get_unchecked_mut() };
        RELAYED.set(Some(this.client));
        let _clear = Clear;
        // SAFETY: `door` is structurally pinned: it lives inside the pinned `WithClient`, is never
        // moved out of it (no `Drop` impl moves it), and `WithClient` is `Unpin` only if it is.
        unsafe { Pin::new_unchecked(&mut this.door) }.poll(cx)
    }
}

/// A trusted peer's connection that did not start with a valid PROXY header within
/// `read_timeout`: counted, and (malformed) answered with an error before the close.
async fn bad_header(
    worker: &'static Worker,
    stream: TcpStream,
    peer: IpAddr,
    door: Frontend,
    e: HeaderError,
) {
    let reason = match e {
        HeaderError::Closed => return,
        HeaderError::TimedOut => {
            worker.metrics.protocol_error(door, ProtocolError::Timeout);
            return;
        }
        HeaderError::Bad(reason) => reason,
    };
    tracing::debug!(%peer, frontend = door.label(), reason, "refusing connection: bad PROXY header");
    let kind = ProtocolError::ProxyHeader;
    if worker.speaks_tls() {
        // What follows a bad header is no TLS handshake to answer in: count it and close.
        return worker.metrics.protocol_error(door, kind);
    }
    match door {
        Frontend::Tcp => mcpb::refuse_connection(worker, stream, kind, reason).await,
        _ => {
            let r = http::request::Refusal {
                status: 400,
                message: reason,
                kind,
            };
            http::refuse_connection(worker, stream, r).await
        }
    }
}

/// One of the worker's `MAX_REJECTING` places for rejection replies, given back on drop.
struct RejectSlot(&'static Worker);

impl RejectSlot {
    fn take(worker: &'static Worker) -> Self {
        worker.rejecting.set(worker.rejecting.get() + 1);
        RejectSlot(worker)
    }
}

impl Drop for RejectSlot {
    fn drop(&mut self) {
        self.0.rejecting.set(self.0.rejecting.get() - 1);
    }
}

/// Runs a connection task, turning a panic into a log line instead of a dead worker. The task's
/// state (its permit included) is dropped either way.
struct CatchUnwind<F>(F);

impl<F: Future<Output = ()>> Future for CatchUnwind<F> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // SAFETY: structural pinning of the only field; it is never moved out.
        let inner = unsafe { self.map_unchecked_mut(|s| &mut s.0) };
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(p) => p,
            Err(_) => {
                tracing::error!("connection task panicked; connection closed");
                Poll::Ready(())
            }
        }
    }
}
