//! One worker: a pinned monoio runtime that accepts on its own `SO_REUSEPORT` listeners, admits
//! connections through the limiter, serves them to completion, and drains on shutdown.
//!
//! Owns the per-core state: the registry of open connections (used to wake idle ones when the
//! worker drains, and event streams whose upstream a reload removed), the idle sweeper (which
//! expires idle connections and asks idle plain ones to park in the core's [`crate::park::Lot`]),
//! the count of rejection replies in flight, and the core's session-id generator.
//!
//! Invariants:
//! - A connection lives and dies on the worker that accepted it; nothing crosses cores.
//! - An admitted connection's [`Permit`] is moved into its task and dropped when the task ends,
//!   however it ends: return, error, panic (caught here, logged) or the runtime being dropped at
//!   the end of the drain.
//! - A failed `accept()` backs off (doubling, capped at one second) instead of spinning.
//! - A connection from `server.proxy_protocol_networks` holds a global place while its PROXY
//!   header is read, then the per-IP place of the client the header names; that client is its
//!   address for `X-Forwarded-For`: its task says so while it runs (`WithClient`).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use monoio::net::{TcpListener, TcpStream};
use slab::Slab;

use crate::limiter::{Limiter, Permit, Rejection};
use crate::metrics::{AcceptError, CoreMetrics, Frontend, Metrics, ProtocolError};
use crate::park::{Held, Hold, Lot};
use crate::proxy_protocol::{self, HeaderError, Trusted};
use crate::stream::Stream;
use crate::upstream::balance::Balancer;
use crate::upstream::registry::Registry;
use crate::upstream::rpc::MsgSession;
use crate::upstream::{client, Namespace, Upstreams};
use crate::{conn, http, mcpb, websocket};

/// Process-wide, read-only settings the connection tasks need, resolved from the configuration.
pub struct Settings {
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    pub idle_timeout: Duration,
    /// `server.park_idle_connections` (see [`crate::park`]).
    pub park_idle: bool,
    pub shutdown_timeout: Duration,
    pub max_message_size: usize,
    /// `server.proxy_protocol_networks`.
    pub proxy_protocol: Trusted,
    /// `server.allowed_origins`.
    pub allowed_origins: crate::http::origin::Origins,
    /// `server.tls_cert_file` and `server.tls_key_file` made into a server configuration
    /// (replaced on SIGHUP): the doors speak TLS when set. Each worker serves TLS with its own
    /// copy (see [`Worker::tls`]).
    pub tls: Option<crate::tls::DoorTls>,
}

/// What every worker shares (all `&'static`, created once at startup).
pub struct Shared {
    pub settings: Settings,
    pub limiter: &'static Limiter,
    pub metrics: &'static Metrics,
    /// The upstreams in force (replaced by a reload): read through [`Worker::upstreams`].
    pub upstreams: &'static Registry,
}

/// Rejection replies in flight per worker; past this a rejected HTTP client is closed without a
/// reply, so a flood cannot make the gateway hold more sockets for refusals than for clients.
const MAX_REJECTING: usize = 4096;

/// Per-core state. Lives on its worker thread only (`!Sync`).
pub struct Worker {
    pub index: usize,
    pub shared: &'static Shared,
    pub metrics: &'static CoreMetrics,
    /// This core's choice of upstreams (its own counters; nothing shared).
    pub balancer: Balancer,
    draining: Cell<bool>,
    /// Open connections: fd and idle state (see [`Idle`]).
    conns: RefCell<Slab<Entry>>,
    /// The generation of the upstream view the sweeper last caught up with (see
    /// [`Worker::leave_removed_upstreams`]).
    view_seen: Cell<u64>,
    /// The standalone streams of this core's WebSocket and MCPB sessions: each one's upstream
    /// socket and the upstream's index (see [`Worker::watch_session_stream`]).
    session_streams: RefCell<Slab<(RawFd, u32)>>,
    /// Origin of the millisecond clock of idle deadlines.
    epoch: Instant,
    rejecting: Cell<usize>,
    rng: Cell<u64>,
    /// This core's copy of the doors' TLS configuration and the generation it was made from
    /// (see [`crate::tls::DoorTls::refresh`]).
    tls: RefCell<Option<(u64, Arc<rustls::ServerConfig>)>>,
    /// Where idle connections park (`None`: `server.park_idle_connections` is off, or the
    /// lot could not be made).
    lot: Option<Lot>,
}

impl Worker {
    pub fn new(index: usize, shared: &'static Shared) -> &'static Worker {
        let seed = std::hash::BuildHasher::hash_one(
            &std::collections::hash_map::RandomState::new(),
            index,
        );
        let lot = shared.settings.park_idle.then(make_lot).flatten();
        Box::leak(Box::new(Worker {
            index,
            shared,
            metrics: shared.metrics.core(index),
            balancer: Balancer::new(index, shared.metrics.core(index)),
            draining: Cell::new(false),
            conns: RefCell::new(Slab::new()),
            view_seen: Cell::new(shared.upstreams.current().generation),
            session_streams: RefCell::new(Slab::new()),
            epoch: Instant::now(),
            rejecting: Cell::new(0),
            rng: Cell::new(seed | 1),
            tls: RefCell::new(None),
            lot,
        }))
    }

    /// The upstreams in force: what a request forwards by from its start to its end (take it
    /// once per request).
    pub fn upstreams(&self) -> &'static Upstreams {
        self.shared.upstreams.current()
    }

    /// The doors speak TLS.
    pub fn speaks_tls(&self) -> bool {
        self.shared.settings.tls.is_some()
    }

    /// The TLS configuration for a handshake on a door now (`None`: the doors speak plain TCP).
    pub fn tls(&self) -> Option<Arc<rustls::ServerConfig>> {
        let door = self.shared.settings.tls.as_ref()?;
        Some(door.refresh(&self.tls))
    }

    pub fn settings(&self) -> &'static Settings {
        &self.shared.settings
    }

    /// True once shutdown began: finish the current request, then close.
    pub fn draining(&self) -> bool {
        self.draining.get()
    }

    /// Admits one request or message of the connection holding `permit` against
    /// `server.max_requests_per_ip`, counting a refusal on `door`. `Err`: whole seconds until
    /// one would be admitted (at least 1), for `Retry-After`.
    pub fn admit_request(&self, permit: &Permit, door: Frontend) -> Result<(), u64> {
        permit.admit_request().map_err(|wait| {
            self.metrics.rate_limited(door);
            let retry_after = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
            tracing::debug!(
                door = door.label(),
                retry_after,
                "request over max_requests_per_ip refused"
            );
            retry_after
        })
    }

    /// The address to name in `X-Forwarded-For` for the client on `stream` (whose task is the
    /// one running) when its requests go to namespace `ns` of `all`, `routing.forwarded_for` is
    /// on and the namespace forwards to HTTP: the client its PROXY header named, else its peer.
    pub fn forwarded_for(&self, all: &Upstreams, ns: usize, stream: &Stream) -> Option<IpAddr> {
        if !all.forwards_client(ns) {
            return None;
        }
        self.client_addr(stream)
    }

    /// The address of the client on `stream`: the one a trusted load balancer relayed, else its
    /// peer's.
    pub fn client_addr(&self, stream: &Stream) -> Option<IpAddr> {
        // monoio asks the kernel once per connection, then keeps the address.
        RELAYED
            .get()
            .or_else(|| stream.tcp().peer_addr().ok().map(|a| a.ip().to_canonical()))
    }

    /// 64 random bits (splitmix64, seeded per process and core): session ids.
    pub fn random(&self) -> u64 {
        let s = self.rng.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
        self.rng.set(s);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Tracks a connection on `door` (registry and active gauge) until the guard drops.
    pub fn register(&'static self, stream: &TcpStream, door: Frontend) -> Registration {
        let key = self.conns.borrow_mut().insert(Entry {
            fd: stream.as_raw_fd(),
            stream_of: NO_STREAM,
            idle: Idle::Busy,
            waker: None,
        });
        self.metrics.opened(door);
        Registration {
            worker: self,
            key,
            door: Cell::new(door),
            may_park: Cell::new(door == Frontend::Http),
            served: Cell::new(false),
        }
    }

    /// Idle connections on this worker park (see [`crate::park`]): it has a lot that works,
    /// and it is not draining.
    pub fn parks(&self) -> bool {
        self.lot.as_ref().is_some_and(Lot::works) && !self.draining()
    }

    /// This core's parking lot, if it has one.
    pub fn lot(&self) -> Option<&Lot> {
        self.lot.as_ref()
    }

    /// Parks the idle connection whose task runs now (its wait said [`conn::Wait::Park`],
    /// which it says only while [`Worker::parks`], so there is a lot), with its upstream
    /// session if it is a message door's; its task then ends. `Err` gives the connection back
    /// when it cannot park now (no descriptor or memory to spare, or a reply just came for
    /// it): it waits on in its task, its deadline unchanged.
    #[allow(clippy::result_large_err)] // a connection given back whole: rare, moved once
    pub fn park(
        &self,
        stream: Stream,
        permit: Permit,
        reg: Registration,
        held: Held,
    ) -> Result<(), Unparked> {
        let Some(lot) = &self.lot else {
            return Err((stream, permit, reg, held));
        };
        let back = lot.park(self, stream, permit, reg, RELAYED.get(), held);
        if let Err((_, _, reg, _)) = &back {
            self.not_parked(reg);
        }
        back
    }

    /// [`Worker::park`] for a connection holding `what` (a message door's session, an open
    /// event stream); `Err` gives it back as it came.
    #[allow(clippy::result_large_err)] // as above
    pub fn park_holding<T: Hold>(
        &self,
        stream: Stream,
        permit: Permit,
        reg: Registration,
        what: T,
    ) -> Result<(), (Stream, Permit, Registration, T)> {
        self.park(stream, permit, reg, what.held())
            .map_err(|(stream, permit, reg, held)| {
                let what = T::back(held).expect("the lot gives back what it was given");
                (stream, permit, reg, what)
            })
    }

    /// The connection of `reg`, asked to park, could not: it waits again with its deadline.
    fn not_parked(&self, reg: &Registration) {
        if let Some(e) = self.conns.borrow_mut().get_mut(reg.key) {
            if let Idle::Park(d) = e.idle {
                e.idle = Idle::Until(d);
            }
        }
    }

    /// The parked connection of `reg` is watched on descriptor `fd` now (the sweeper shuts
    /// that one to expire it).
    pub fn parked_on(&self, reg: &Registration, fd: RawFd) {
        if let Some(e) = self.conns.borrow_mut().get_mut(reg.key) {
            e.fd = fd;
        }
    }

    /// Serves a connection that left the parking lot, in a task of its own: the HTTP door
    /// reads its next request at once (it left readable); a message door waits for the
    /// client's next message and writes what its session queued meanwhile. `expired` (only a
    /// WebSocket connection comes back expired; the lot closes others itself): the door
    /// closes it as its idle timeout or the drain would have.
    pub fn serve_parked(
        &'static self,
        stream: Stream,
        permit: Permit,
        reg: Registration,
        client: Option<IpAddr>,
        held: Held,
        expired: bool,
    ) {
        match held {
            Held::Nothing => {
                let resumed = Some(conn::take_buf());
                spawn_connection(http::serve(self, stream, permit, reg, resumed), client);
            }
            Held::Events(e) => {
                spawn_connection(http::serve_relay(self, stream, permit, reg, e), client)
            }
            Held::Session(s) if reg.door() == Frontend::Tcp => {
                spawn_connection(mcpb::serve(self, stream, permit, reg, Some(s)), client)
            }
            Held::Session(s) => spawn_connection(
                websocket::serve(self, stream, reg, permit, None, s, expired),
                client,
            ),
        }
    }

    /// See [`Registration::idle_pending`].
    fn idle_pending(&self, reg: &Registration, waker: &Waker) -> bool {
        if !reg.may_park.get() || self.speaks_tls() || !self.parks() {
            return false;
        }
        let mut conns = self.conns.borrow_mut();
        let Some(e) = conns.get_mut(reg.key) else {
            return false;
        };
        if let Idle::Park(_) = e.idle {
            e.waker = None;
            return true;
        }
        if !e.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
            e.waker = Some(waker.clone());
        }
        false
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The connection starts waiting for its next request; the sweeper expires it after `limit`.
    /// One that could not park waits again with the deadline it had (see [`Worker::park`]).
    pub fn idle_begin(&self, reg: &Registration, limit: Duration) {
        let deadline = self.now_ms() + limit.as_millis() as u64;
        let state = if self.draining() {
            Idle::Expired
        } else {
            Idle::Until(deadline)
        };
        if let Some(e) = self.conns.borrow_mut().get_mut(reg.key) {
            if e.idle.deadline().is_none() {
                e.idle = state;
            }
        }
    }

    /// The connection waits for the next event of an event stream from upstream `upstream`
    /// (by index): no deadline, but a drain, or a reload that removes that upstream, expires it.
    pub fn stream_begin(&self, reg: &Registration, upstream: usize) {
        self.idle_begin(reg, STREAM_IDLE);
        if let Some(e) = self.conns.borrow_mut().get_mut(reg.key) {
            e.stream_of = u32::try_from(upstream).unwrap_or(NO_STREAM);
            // Removed before the sweeper could see this stream: expired now.
            if e.idle.deadline().is_some() && !self.serves(upstream) {
                e.expire();
            }
        }
    }

    /// The upstream of this index is in the view in force. Checked by a stream as it starts to
    /// wait, after registering: the sweeper checks each new view once, so a stream registered
    /// after that check would otherwise never learn its upstream was removed.
    fn serves(&self, upstream: usize) -> bool {
        let view = self.shared.upstreams.current();
        view.all.iter().any(|u| u.index == upstream)
    }

    /// The wait ended; true when it ended because the connection expired (timeout, drain, or
    /// its event stream's upstream removed).
    pub fn idle_end(&self, reg: &Registration) -> bool {
        let mut conns = self.conns.borrow_mut();
        let Some(e) = conns.get_mut(reg.key) else {
            return true;
        };
        e.stream_of = NO_STREAM;
        e.waker = None;
        std::mem::replace(&mut e.idle, Idle::Busy) == Idle::Expired
    }

    /// Once per new upstream view (a reload), leaves the upstreams it no longer has: closes this
    /// core's pooled connections to them and expires the event streams waiting on them, whose
    /// clients get the stream's end (MCP clients then find their session gone and start anew)
    /// instead of a stream from a server the operator took out.
    fn leave_removed_upstreams(&self) {
        let view = self.shared.upstreams.current();
        if self.view_seen.replace(view.generation) == view.generation {
            return;
        }
        client::keep_pooled(|i| view.all.iter().any(|u| u.index == i));
        let kept = |i: u32| view.all.iter().any(|u| u.index == i as usize);
        for (_, e) in self.conns.borrow_mut().iter_mut() {
            if e.stream_of != NO_STREAM && e.idle.deadline().is_some() && !kept(e.stream_of) {
                e.expire();
            }
        }
        for (_, (fd, upstream)) in self.session_streams.borrow().iter() {
            if !kept(*upstream) {
                // SAFETY: a watched fd belongs to a live upstream socket (the watch is dropped
                // before it); shutting its read side only ends the listener's wait with EOF.
                unsafe { libc::shutdown(*fd, libc::SHUT_RD) };
            }
        }
    }

    /// Watches the standalone stream of a WebSocket or MCPB session, read on the upstream socket
    /// `fd` from upstream `upstream` (by index), until the guard drops: a reload removing that
    /// upstream ends the stream (its socket's read side is shut, and the listener ends at EOF)
    /// while the client's connection stays.
    pub fn watch_session_stream(&'static self, fd: RawFd, upstream: usize) -> SessionStreamWatch {
        let watch = SessionStreamWatch {
            worker: self,
            key: self
                .session_streams
                .borrow_mut()
                .insert((fd, u32::try_from(upstream).unwrap_or(NO_STREAM))),
        };
        if !self.serves(upstream) {
            // SAFETY: as in `leave_removed_upstreams`: the caller's socket is live.
            unsafe { libc::shutdown(fd, libc::SHUT_RD) };
        }
        watch
    }

    fn open_connections(&self) -> usize {
        self.conns.borrow().len()
    }

    /// Expires idle connections whose deadline passed (all idle ones when `all`): marks them and
    /// shuts their read side, which ends their readiness wait (or parking) with EOF. Asks the
    /// parkable ones that were already waiting at the last sweep to park (at most `PARK_BATCH`
    /// a sweep: each holds a second descriptor until monoio closes its first).
    fn sweep(&self, all: bool) {
        let now = self.now_ms();
        let mut asked = 0;
        let may_ask = self.lot.as_ref().is_some_and(|lot| lot.may_ask());
        for (_, e) in self.conns.borrow_mut().iter_mut() {
            match e.idle {
                Idle::Until(d) | Idle::Seen(d) | Idle::Park(d) if all || d <= now => e.expire(),
                Idle::Until(d) => e.idle = Idle::Seen(d),
                Idle::Seen(d) if asked < PARK_BATCH && may_ask => {
                    if let Some(waker) = e.waker.take() {
                        e.idle = Idle::Park(d);
                        waker.wake(); // queues the task; nothing runs inside this borrow
                        asked += 1;
                    }
                }
                _ => {}
            }
        }
        if let Some(lot) = &self.lot {
            lot.settle(asked > 0);
        }
    }

    /// Stops taking new requests: idle connections are expired now (parked ones closed) and busy
    /// ones close after their current request.
    fn begin_drain(&'static self) {
        self.draining.set(true);
        self.sweep(true);
        if let Some(lot) = &self.lot {
            lot.close_all(self);
        }
    }
}

/// See [`Worker::watch_session_stream`].
pub struct SessionStreamWatch {
    worker: &'static Worker,
    key: usize,
}

impl Drop for SessionStreamWatch {
    fn drop(&mut self) {
        self.worker.session_streams.borrow_mut().remove(self.key);
    }
}

/// A connection in its worker's registry.
struct Entry {
    fd: RawFd,
    /// While it waits on an event stream: the upstream's index ([`NO_STREAM`] otherwise). Fits
    /// in what would be padding: an entry is no larger for it.
    stream_of: u32,
    idle: Idle,
    /// While a connection that may park waits in its task: the task's waker, for the sweeper to
    /// ask it to park.
    waker: Option<Waker>,
}

/// Connections one sweep asks to park at most.
const PARK_BATCH: usize = 1024;

/// A connection that could not park, given back to its task with what it held.
pub type Unparked = (Stream, Permit, Registration, Held);

/// This worker's parking lot, or `None` (logged) when the system gives no epoll set.
fn make_lot() -> Option<Lot> {
    Lot::new()
        .inspect_err(
            |e| tracing::warn!(error = %e, "no parking lot: idle connections wait in their tasks"),
        )
        .ok()
}

const NO_STREAM: u32 = u32::MAX;

/// How long an event stream may wait for its next event before the idle sweeper would end it:
/// in effect never (streams end when the client, the upstream, a drain or a reload ends them).
const STREAM_IDLE: Duration = Duration::from_secs(365 * 86_400);

impl Entry {
    /// Marks an idle connection expired and wakes its wait.
    fn expire(&mut self) {
        self.idle = Idle::Expired;
        // SAFETY: an idle entry's fd belongs to a live socket: the connection is suspended in
        // its wait (`wait_idle`, or an event stream's watch), holding its stream, or parked, its
        // lot holding the descriptor the entry names (`parked_on`). Shutting the read side only
        // wakes that wait (or the lot).
        unsafe { libc::shutdown(self.fd, libc::SHUT_RD) };
    }
}

/// Where a connection stands between requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Idle {
    /// Reading or answering a request.
    Busy,
    /// Waiting for the next request until this many ms after the worker's epoch.
    Until(u64),
    /// As `Until`, and already waiting at the last sweep: it parks at the next, if it may.
    Seen(u64),
    /// As `Until`; asked to park (its task was woken), or parked.
    Park(u64),
    /// Expired by the sweeper or the drain; its wait has been woken.
    Expired,
}

impl Idle {
    /// The deadline of a connection waiting (in its task or parked).
    fn deadline(self) -> Option<u64> {
        match self {
            Idle::Until(d) | Idle::Seen(d) | Idle::Park(d) => Some(d),
            Idle::Busy | Idle::Expired => None,
        }
    }
}

/// A connection's entry in its worker's registry and its place in its door's active gauge;
/// both are given back on drop.
pub struct Registration {
    worker: &'static Worker,
    key: usize,
    door: Cell<Frontend>,
    /// Its idle waits may park (see [`Registration::idle_pending`]): always on the HTTP door; a
    /// message door's session says so before each wait (none while its forwards are in
    /// flight or replies wait to be written). Fits in the padding after `door`.
    may_park: Cell<bool>,
    /// It has served a request (the HTTP door: its next one may take `idle_timeout` to come,
    /// not `read_timeout`). In the padding too.
    served: Cell<bool>,
}

impl Registration {
    /// The door the connection counts on.
    pub fn door(&self) -> Frontend {
        self.door.get()
    }

    /// The connection's idle wait is still pending. One that may park (a plain connection
    /// whose registration says so) keeps its task's `waker` for the sweeper; true when the
    /// sweeper asked it to park.
    pub fn idle_pending(&self, waker: &Waker) -> bool {
        self.worker.idle_pending(self, waker)
    }

    /// The connection has served a request (see the field `served`).
    pub fn served(&self) -> bool {
        self.served.get()
    }

    /// The connection served a request.
    pub fn set_served(&self) {
        self.served.set(true);
    }

    /// Whether the connection's next idle waits may park (see the field `may_park`).
    pub fn set_may_park(&self, may: bool) {
        self.may_park.set(may);
    }

    /// The connection now counts on `door` (an HTTP upgrade to WebSocket).
    pub fn switch(&self, door: Frontend) {
        self.worker.metrics.closed(self.door.replace(door));
        self.worker.metrics.opened(door);
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.worker.conns.borrow_mut().remove(self.key);
        self.worker.metrics.closed(self.door.get());
    }
}

/// The listeners one worker accepts on.
pub struct Listeners {
    pub http: std::net::TcpListener,
    pub tcp: Option<std::net::TcpListener>,
}

/// Runs worker `worker` on the current thread until `stop` fires, then drains.
pub async fn run(
    worker: &'static Worker,
    listeners: Listeners,
    stop: futures_channel::oneshot::Receiver<()>,
) -> std::io::Result<()> {
    let http = TcpListener::from_std(listeners.http)?;
    let tcp = listeners.tcp.map(TcpListener::from_std).transpose()?;
    {
        let http_loop = accept_loop(worker, http, Frontend::Http);
        let lot = async move {
            match &worker.lot {
                Some(lot) => lot.run(worker).await,
                None => std::future::pending().await,
            }
        };
        let tcp_loop = async move {
            match tcp {
                Some(l) => accept_loop(worker, l, Frontend::Tcp).await,
                None => std::future::pending().await,
            }
        };
        monoio::select! {
            _ = http_loop => {}
            _ = tcp_loop => {}
            _ = sweep_idle(worker) => {}
            _ = lot => {}
            _ = stop => {}
        }
        // The listeners are dropped here: this worker accepts nothing more.
    }
    worker.begin_drain();
    let deadline = Instant::now() + worker.settings().shutdown_timeout;
    while worker.open_connections() > 0 && Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(10)).await;
    }
    let left = worker.open_connections();
    if left > 0 {
        tracing::warn!(
            worker = worker.index,
            connections = left,
            "shutdown_timeout reached; closing"
        );
    }
    Ok(())
}

/// One coarse timer per core instead of one per connection: every tick, expire the idle
/// connections past their deadline, and leave the upstreams a reload removed (their pooled
/// connections and event streams).
/// Deadlines are honoured within one tick.
async fn sweep_idle(worker: &'static Worker) {
    let s = worker.settings();
    let tick = (s.idle_timeout.min(s.read_timeout) / 8)
        .clamp(Duration::from_millis(10), Duration::from_millis(500));
    loop {
        monoio::time::sleep(tick).await;
        worker.sweep(false);
        worker.leave_removed_upstreams();
    }
}

async fn accept_loop(worker: &'static Worker, listener: TcpListener, door: Frontend) {
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
    let relayed = worker.settings().proxy_protocol.trusts(ip);
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
    first: Vec<u8>,
    namespace: &'static Namespace,
) {
    let pending = if first.is_empty() {
        conn::give_buf(first);
        None
    } else {
        Some(first)
    };
    let session = MsgSession::new(worker, Some(namespace), Frontend::WebSocket, &stream);
    let ws = websocket::serve(
        worker,
        stream,
        reg,
        permit,
        pending,
        Box::new(session),
        false,
    );
    spawn_connection(ws, RELAYED.get());
}

/// Spawns a connection's task: panics caught, and the relayed client, if any, named to its code.
fn spawn_connection(door: impl Future<Output = ()> + 'static, client: Option<IpAddr>) {
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
    if door == Frontend::Http && worker.rejecting.get() < MAX_REJECTING {
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
    let deadline = Instant::now() + worker.settings().read_timeout;
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

#[cfg(all(test, not(loom)))]
impl Worker {
    /// A worker of one core on the default configuration with 1 s timeouts, a 10-connection
    /// limit and parking on, for unit tests (on a monoio runtime of the test's own).
    pub(crate) fn for_test() -> &'static Worker {
        let limiter = Limiter::new(10, 0).leak();
        let upstreams = Registry::new(&crate::config::Config::default())
            .unwrap()
            .leak();
        let metrics = Metrics::new(1, limiter, upstreams).leak();
        let t = Duration::from_secs(1);
        let shared = Box::leak(Box::new(Shared {
            settings: Settings {
                read_timeout: t,
                write_timeout: t,
                idle_timeout: t,
                park_idle: true,
                shutdown_timeout: t,
                max_message_size: 1024,
                proxy_protocol: Default::default(),
                allowed_origins: Default::default(),
                tls: None,
            },
            limiter,
            metrics,
            upstreams,
        }));
        Worker::new(0, shared)
    }

    /// A loopback connection to `listener` admitted by this worker's limiter, for unit tests:
    /// the server side (for the test's monoio runtime) and its permit; the client side goes
    /// into `clients`, which keeps it open.
    pub(crate) fn test_connection(
        &self,
        listener: &std::net::TcpListener,
        clients: &mut Vec<std::net::TcpStream>,
    ) -> (TcpStream, Permit) {
        clients.push(std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap());
        let (server, peer) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        let permit = self.shared.limiter.try_acquire(peer.ip()).unwrap();
        (TcpStream::from_std(server).unwrap(), permit)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// A connection that could not park (no descriptor to spare) waits on in its task with the
    /// deadline it had: were it to start afresh, one that can never park would never expire.
    #[test]
    fn a_connection_that_could_not_park_keeps_its_deadline() {
        let worker = Worker::for_test();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .build()
            .unwrap();
        rt.block_on(async move {
            let tcp = TcpStream::from_std(server).unwrap();
            let reg = worker.register(&tcp, Frontend::Http);
            let idle = |w: &Worker| w.conns.borrow()[reg.key].idle;
            worker.idle_begin(&reg, Duration::from_secs(1));
            let Idle::Until(deadline) = idle(worker) else {
                panic!("waiting: {:?}", idle(worker));
            };
            worker.conns.borrow_mut()[reg.key].idle = Idle::Park(deadline); // asked to park
            worker.not_parked(&reg);
            worker.idle_begin(&reg, Duration::from_secs(100)); // it waits again
            assert_eq!(idle(worker), Idle::Until(deadline));
            // A connection whose wait ended starts its next one afresh.
            worker.idle_end(&reg);
            worker.idle_begin(&reg, Duration::from_secs(100));
            assert!(matches!(idle(worker), Idle::Until(d) if d > deadline));
        });
    }

    /// Every open connection has an entry: the event stream's upstream rides in what would be
    /// padding.
    #[test]
    fn an_entry_is_no_larger_for_the_stream_it_may_wait_on() {
        assert_eq!(
            std::mem::size_of::<Entry>(),
            std::mem::size_of::<(RawFd, Idle, Option<Waker>)>()
        );
    }
}
