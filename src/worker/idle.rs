//! One core's registry of open connections and their idle state: what the idle sweeper expires
//! and asks to park, and what a reload that removes an upstream ends.
//!
//! Invariants:
//! - Every open connection has an entry from accept to close ([`Registration`], given back on
//!   drop with its place in its door's active gauge).
//! - A waiting connection holds no timer: its deadline is a number in its entry, enforced by the
//!   sweeper within one tick; an event stream's entry names its upstream, so a reload that
//!   removes that upstream ends the stream.
//! - A connection asked to park that cannot (no descriptor to spare) keeps its deadline.

use std::cell::Cell;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::task::Waker;
use std::time::Duration;

use monoio::net::TcpStream;

use crate::limiter::Permit;
use crate::metrics::Frontend;
use crate::park::{Held, Hold, Lot};
use crate::stream::Stream;
use crate::upstream::client;
use crate::{conn, http, mcpb, websocket};

use super::accept::spawn_connection;
use super::Worker;

impl Worker {
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

    /// Idle connections on this worker park (see [`crate::park`]): parking is on
    /// (`server.park_idle_connections`, which a reload may change), the worker has a lot that
    /// works, and it is not draining.
    pub fn parks(&self) -> bool {
        self.shared.settings.parks_idle()
            && self.lot.as_ref().is_some_and(Lot::works)
            && !self.draining()
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
        let back = lot.park(self, stream, permit, reg, super::accept::relayed(), held);
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
    pub(super) fn not_parked(&self, reg: &Registration) {
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
    pub(super) fn idle_pending(&self, reg: &Registration, waker: &Waker) -> bool {
        if !reg.may_park.get() || self.speaks_tls() {
            return false;
        }
        let parks = self.parks();
        let mut conns = self.conns.borrow_mut();
        let Some(e) = conns.get_mut(reg.key) else {
            return false;
        };
        if let Idle::Park(d) = e.idle {
            if parks {
                e.waker = None;
                return true;
            }
            // Asked before a reload turned parking off (or a drain began): it waits on, and is
            // asked again if parking comes back on.
            e.idle = Idle::Until(d);
        }
        // The waker is kept while parking is off too, so that a reload turning it on reaches
        // connections already waiting.
        if !e.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
            e.waker = Some(waker.clone());
        }
        false
    }

    pub(super) fn now_ms(&self) -> u64 {
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

    /// The connection's wait goes on with a new deadline, `limit` from now (a message
    /// session's last forward ended: idleness counts from there); one asked to park or
    /// expired stays so.
    pub fn idle_restart(&self, reg: &Registration, limit: Duration) {
        let deadline = self.now_ms() + limit.as_millis() as u64;
        if let Some(e) = self.conns.borrow_mut().get_mut(reg.key) {
            if let Idle::Until(_) | Idle::Seen(_) = e.idle {
                e.idle = Idle::Until(deadline);
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
    pub(super) fn serves(&self, upstream: usize) -> bool {
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
    pub(super) fn leave_removed_upstreams(&self) {
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

    pub(super) fn open_connections(&self) -> usize {
        self.conns.borrow().len()
    }

    /// Expires idle connections whose deadline passed (all idle ones when `all`): marks them and
    /// shuts their read side, which ends their readiness wait (or parking) with EOF. Asks the
    /// parkable ones that were already waiting at the last sweep to park (at most `PARK_BATCH`
    /// a sweep: each holds a second descriptor until monoio closes its first).
    pub(super) fn sweep(&self, all: bool) {
        let now = self.now_ms();
        let mut asked = 0;
        let may_ask = self.parks() && self.lot.as_ref().is_some_and(Lot::may_ask);
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
pub(super) struct Entry {
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
pub(super) fn make_lot() -> Option<Lot> {
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
