//! The parking lot: idle plain connections (and open event streams between events) held
//! outside any task, with what their doors need to go on.
//!
//! A connection waiting for its next request in its task costs about 500 bytes of heap: the
//! task's header, the door's future (monoio's stream and readiness wait inside it) and monoio's
//! shared descriptor, which no trimming of the door's future can bring much lower. Once it has
//! waited through a sweep of the idle sweeper, the sweeper asks it to park
//! ([`crate::worker::Worker`]'s sweep wakes its task): the task hands this core's lot the
//! socket, its permit, its registration and the client a PROXY header named, then ends. Here it
//! costs a slab entry of about 80 bytes, and the kernel watches it in the lot's epoll set. When
//! it becomes readable (its next request, its close, or the sweeper's shutdown that expires it),
//! the lot's task takes it out of the set and spawns the door again on it, which reads the
//! request as if it had never left.
//!
//! A WebSocket or MCPB connection parks with its upstream session ([`MsgSession`], boxed), whose
//! standalone stream goes on listening in its own task: what the upstream sends on its own is
//! queued in the session's outbox as ever, and the outbox wakes the lot instead of a task
//! (`session_waker`), which serves the connection again to write it. Such a connection parks
//! only while nothing is in flight or queued for it, and a WebSocket one not in the middle of a
//! fragmented message (the door's assembly is not carried).
//!
//! An HTTP connection relaying an event stream parks between two events with the stream's state
//! ([`Events`], boxed, its upstream connection inside): the lot watches the upstream socket as
//! well as the client's, under the same key, and either becoming readable (the next event, the
//! stream's end, the client's departure) serves the connection again in its relay. Only a
//! stream from a plain upstream, with nothing of an event in hand and the client silent.
//!
//! The price is paid by a connection that comes back: a new task, the epoll calls and the
//! duplicated descriptor, about 8 µs of CPU on the development VM (README, "Resident memory
//! per idle connection"). Busy keep-alive connections never pay it: only one still waiting at
//! a second sweep is asked. After a wave of parking the lot also has the allocator give back
//! what the wave's tasks freed ([`Lot::settle`]), or the resident size would stay at the peak.
//!
//! Invariants:
//! - A parked connection keeps its permit and its registration: the limiter, the gauges, the
//!   sweeper's deadlines and the drain count it as open exactly as before. Only its task is gone.
//! - A connection is in the epoll set exactly while it is in the slab, keyed by its slab key
//!   (a parked event stream's upstream socket too).
//! - Expiry needs nothing new: the sweeper marks the registry entry expired and shuts the read
//!   side, the lot sees the socket readable and closes it. The drain closes every parked
//!   connection at once (they are idle). A WebSocket connection is closed by its door, served
//!   again for that, so that its client gets the close frame (1001) it would have got in its
//!   task; an event stream is served again to its relay, which ends it as it would have.
//! - Only plain connections park: a TLS session keeps state in its task that a socket alone
//!   cannot carry.
//! - A parked session's outbox holds the lot's waker for that stay and nothing else: leaving the
//!   lot drops it, and a waker woken late (its spawned resumption ran after the connection
//!   left) names a token that no longer matches.
//! - The lot holds a duplicate of the socket's descriptor: the task's readiness wait, cancelled
//!   to park, keeps monoio's descriptor until the ring answers the cancel, and monoio then
//!   closes it. A connection that cannot get a duplicate or a place in the set (a gateway at its
//!   descriptor limit) stays in its task, waiting as before with the same deadline; none is
//!   asked to park for a few sweeps after that. Parking never closes a connection.

use std::cell::{Cell, RefCell};
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::task::{RawWaker, RawWakerVTable, Waker};

use slab::Slab;

use crate::http::proxy::Events;
use crate::limiter::Permit;
use crate::metrics::Frontend;
use crate::stream::Stream;
use crate::upstream::rpc::MsgSession;
use crate::worker::{Registration, Unparked, Worker};

/// One core's parked connections and the epoll set that watches them.
pub struct Lot {
    epoll: OwnedFd,
    parked: RefCell<Slab<Parked>>,
    /// Connections that came into the lot or left it since the allocator last gave free memory
    /// back (see [`Lot::settle`]).
    since_trim: Cell<usize>,
    /// One came or left since the last sweep.
    moved: Cell<bool>,
    /// Sweeps left before connections are asked to park again, after one could not.
    pause: Cell<u32>,
    /// The lot could not wait on its set (see [`Lot::give_up`]): nothing parks any more.
    broken: Cell<bool>,
    /// Tells apart the sessions parked under one slab key in turn (see [`session_waker`]).
    tokens: Cell<u32>,
}

/// What a parked connection is: what its door needs to go on.
struct Parked {
    socket: OwnedFd,
    permit: Permit,
    reg: Registration,
    /// The client its PROXY header named, if one did.
    client: Option<IpAddr>,
    /// What its door needs besides the socket.
    held: Held,
}

/// What a parked connection's door needs besides its socket to go on.
pub enum Held {
    /// An HTTP connection between requests.
    Nothing,
    /// A WebSocket or MCPB connection's upstream session.
    Session(Box<MsgSession>),
    /// An HTTP connection's open event stream between two events: the lot watches its
    /// upstream socket too.
    Events(Box<Events>),
}

/// What a door hands the lot with its connection, and takes back if it cannot park (see
/// [`Worker::park_holding`]).
pub trait Hold: Sized {
    fn held(self) -> Held;
    fn back(held: Held) -> Option<Self>;
}

impl Hold for Box<MsgSession> {
    fn held(self) -> Held {
        Held::Session(self)
    }
    fn back(held: Held) -> Option<Self> {
        match held {
            Held::Session(s) => Some(s),
            _ => None,
        }
    }
}

impl Hold for Box<Events> {
    fn held(self) -> Held {
        Held::Events(self)
    }
    fn back(held: Held) -> Option<Self> {
        match held {
            Held::Events(e) => Some(e),
            _ => None,
        }
    }
}

/// Sweeps without asking connections to park after one could not.
const PAUSE_SWEEPS: u32 = 16;

/// Events the lot takes from the set per system call.
const BATCH: usize = 64;

/// Connections parked or leaving after which the end of a wave gives memory back (see
/// [`Lot::settle`]).
const TRIM_AFTER: usize = 256;

impl Lot {
    pub fn new() -> io::Result<Lot> {
        // SAFETY: a plain system call; a descriptor it returns is ours alone.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Lot {
            // SAFETY: just created, owned by nothing else.
            epoll: unsafe { OwnedFd::from_raw_fd(fd) },
            parked: RefCell::new(Slab::new()),
            since_trim: Cell::new(0),
            moved: Cell::new(false),
            pause: Cell::new(0),
            broken: Cell::new(false),
            tokens: Cell::new(0),
        })
    }

    /// Parks an idle connection (its task then ends), or gives it back when it cannot be
    /// watched now (see the module's invariants). `client`: the one its PROXY header named;
    /// `held`: what its door needs to go on (a message door's session must be idle, nothing in
    /// flight or queued: else the connection is given back too).
    #[allow(clippy::result_large_err)] // a connection given back whole: rare, moved once
    pub fn park(
        &self,
        worker: &Worker,
        stream: Stream,
        permit: Permit,
        reg: Registration,
        client: Option<IpAddr>,
        held: Held,
    ) -> Result<(), Unparked> {
        let Stream::Plain(tcp) = &stream else {
            // A TLS session never parks (`Registration::idle_pending`).
            return Err((stream, permit, reg, held));
        };
        if let Held::Session(s) = &held {
            if !s.is_idle() {
                return Err((stream, permit, reg, held)); // a reply came as it was asked
            }
        }
        // SAFETY: the stream is live and outlives the borrow.
        let socket = match unsafe { BorrowedFd::borrow_raw(tcp.as_raw_fd()) }.try_clone_to_owned() {
            Ok(s) => s,
            Err(e) => {
                self.cannot_park(worker, &e);
                return Err((stream, permit, reg, held));
            }
        };
        let mut parked = self.parked.borrow_mut();
        let slot = parked.vacant_entry();
        let Ok(key) = u32::try_from(slot.key()) else {
            return Err((stream, permit, reg, held)); // never: as many as descriptors
        };
        if let Err(e) = self.watch(socket.as_raw_fd(), key) {
            self.cannot_park(worker, &e);
            return Err((stream, permit, reg, held));
        }
        if let Held::Events(events) = &held {
            if let Err(e) = self.watch(events.upstream_fd(), key) {
                self.unwatch(socket.as_raw_fd());
                self.cannot_park(worker, &e);
                return Err((stream, permit, reg, held));
            }
        }
        worker.parked_on(&reg, socket.as_raw_fd());
        let mut held = held;
        if let Held::Session(s) = &mut held {
            let token = self.tokens.get().wrapping_add(1);
            self.tokens.set(token);
            s.park(token, session_waker(key, token));
        }
        slot.insert(Parked {
            socket,
            permit,
            reg,
            client,
            held,
        });
        worker.metrics.parked();
        self.moved();
        // `stream` drops on return: monoio closes its descriptor once its cancelled wait is
        // answered.
        Ok(())
    }

    /// Adds `fd` to the set, readable ending the stay of connection `key`.
    fn watch(&self, fd: RawFd, key: u32) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
            u64: u64::from(key),
        };
        // SAFETY: both descriptors are live; `event` is read during the call only.
        let added =
            unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut event) };
        if added < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Takes `fd` out of the set.
    fn unwatch(&self, fd: RawFd) {
        // SAFETY: both descriptors are live; a null event is allowed for a removal.
        unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd,
                std::ptr::null_mut(),
            )
        };
    }

    /// A connection could not park (out of descriptors, or of kernel memory for the set): it
    /// waits on in its task, and no connection is asked to park for `PAUSE_SWEEPS` sweeps, so
    /// that a gateway at its descriptor limit does not wake its idle connections in vain.
    fn cannot_park(&self, worker: &Worker, e: &io::Error) {
        if self.pause.replace(PAUSE_SWEEPS) == 0 {
            tracing::warn!(worker = worker.index, error = %e, "idle connections cannot park now; they wait in their tasks for a while");
        }
    }

    /// The lot takes connections (it has not given up).
    pub fn works(&self) -> bool {
        !self.broken.get()
    }

    /// The sweeper may ask connections to park (none failed to lately).
    pub fn may_ask(&self) -> bool {
        self.works() && self.pause.get() == 0
    }

    /// This core's lot at work: takes the connections that became readable out of the set and
    /// serves them again. Runs until the worker stops accepting.
    pub async fn run(&self, worker: &'static Worker) {
        OWNER.set(Some(worker));
        // monoio has no readiness wait for a bare descriptor; a Unix stream's is a plain poll of
        // its descriptor, which is what an epoll set's readiness needs (nothing is ever read).
        let watch = self
            .epoll
            .try_clone()
            .map(std::os::unix::net::UnixStream::from)
            .and_then(monoio::net::UnixStream::from_std);
        let watch = match watch {
            Ok(w) => w,
            Err(e) => return self.give_up(worker, e).await,
        };
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; BATCH];
        loop {
            if let Err(e) = watch.readable(false).await {
                return self.give_up(worker, e).await;
            }
            loop {
                // SAFETY: `events` has room for `BATCH` entries; a zero timeout never blocks.
                let n = unsafe {
                    libc::epoll_wait(self.epoll.as_raw_fd(), events.as_mut_ptr(), BATCH as i32, 0)
                };
                let Ok(n) = usize::try_from(n) else {
                    break; // EINTR: the outer wait comes back at once if events are left
                };
                for e in &events[..n] {
                    self.resume(worker, e.u64 as usize);
                }
                if n < BATCH {
                    break;
                }
            }
        }
    }

    /// The lot cannot wait on its set (never seen): its connections are closed (their clients
    /// open others), and idle connections wait in their tasks from now on.
    async fn give_up(&self, worker: &'static Worker, e: io::Error) {
        tracing::error!(worker = worker.index, error = %e, "parking lot cannot wait; idle connections park no more");
        self.broken.set(true);
        self.close_all(worker);
        std::future::pending().await
    }

    /// Takes connection `key` out of the lot (it became readable) and serves it again.
    fn resume(&self, worker: &'static Worker, key: usize) {
        let Some(p) = self.parked.borrow_mut().try_remove(key) else {
            return;
        };
        self.serve_again(worker, p);
    }

    /// Takes the session parked under `key` for stay `token` out of the lot, if it is still
    /// there: replies for its client are queued (see [`session_waker`]).
    fn resume_session(&self, worker: &'static Worker, key: usize, token: u32) {
        let p = {
            let mut parked = self.parked.borrow_mut();
            match parked.get(key).map(|p| &p.held) {
                Some(Held::Session(s)) if s.stay() == token => parked.remove(key),
                _ => return, // it left already (readable, or closed by the drain)
            }
        };
        self.serve_again(worker, p);
    }

    /// A connection that left the lot: closed if the sweeper expired it or the gateway drains,
    /// else served again by its door, in a task of its own. A WebSocket connection and an event
    /// stream are served again either way, for what they are owed.
    fn serve_again(&self, worker: &'static Worker, p: Parked) {
        worker.metrics.unparked();
        self.moved();
        self.unwatch(p.socket.as_raw_fd());
        match &p.held {
            Held::Nothing => {}
            Held::Session(s) => s.wake_task(), // its waker named this stay, over now
            Held::Events(events) => self.unwatch(events.upstream_fd()),
        }
        let expired = worker.idle_end(&p.reg) || worker.draining();
        // A WebSocket client is owed a close frame, an event stream its end: their doors send
        // them (a relay sees the drain, or its upstream removed, for itself).
        let owed = matches!(p.held, Held::Events(_)) || p.reg.door() == Frontend::WebSocket;
        if expired && !owed {
            return; // dropping it closes it and gives its places back
        }
        let tcp = std::net::TcpStream::from(p.socket);
        match monoio::net::TcpStream::from_std(tcp) {
            Ok(tcp) => {
                let stream = Stream::Plain(tcp);
                worker.serve_parked(stream, p.permit, p.reg, p.client, p.held, expired)
            }
            Err(e) => tracing::debug!(error = %e, "cannot serve a parked connection; closed"),
        }
    }

    fn moved(&self) {
        self.since_trim.set(self.since_trim.get() + 1);
        self.moved.set(true);
    }

    /// Called by each sweep (`asked`: whether it asked connections to park). Once a wave of at
    /// least `TRIM_AFTER` connections parking or leaving the lot has ended (a sweep with none
    /// asked, and none parked or left since the last), gives the memory their tasks and buffers
    /// freed back to the system: the allocator keeps freed memory for reuse, and a wave of idle
    /// clients would otherwise leave the gateway's resident memory at its peak, as if they had
    /// never parked. Once per wave, never while connections keep coming and going; glibc only.
    pub fn settle(&self, asked: bool) {
        self.pause.set(self.pause.get().saturating_sub(1));
        let moved = self.moved.replace(false);
        if asked || moved || self.since_trim.get() < TRIM_AFTER {
            return;
        }
        let wave = self.since_trim.replace(0);
        #[cfg(target_env = "gnu")]
        {
            let started = std::time::Instant::now();
            // SAFETY: a plain call into the allocator, which takes its own locks.
            unsafe { libc::malloc_trim(0) };
            tracing::debug!(
                wave,
                took_us = started.elapsed().as_micros() as u64,
                "freed memory given back after a wave of parked connections"
            );
        }
    }

    /// Closes every parked connection (the worker drains: they are idle); WebSocket ones
    /// through their door, which sends the close frame they are owed.
    pub fn close_all(&self, worker: &'static Worker) {
        let all: Vec<Parked> = self.parked.borrow_mut().drain().collect();
        // Outside the borrow: each registration's drop reaches the worker.
        for p in all {
            self.serve_again(worker, p);
        }
    }
}

thread_local! {
    /// The worker whose lot runs on this thread, for the wakers of its parked sessions.
    static OWNER: Cell<Option<&'static Worker>> = const { Cell::new(None) };
}

/// The waker a parked session's outbox holds (see [`MsgSession::park`]): woken when a
/// reply or a message of the session's stream is queued for the client, it has the lot serve
/// the connection again, from a task of its own so that nothing runs inside the producer's
/// push. It carries the session's slab key and its stay's token in its data word: a stale
/// one (the connection left and another parked under that key) finds the token changed.
/// Woken only on this thread, as everything of a session is (`Rc`).
fn session_waker(key: u32, token: u32) -> Waker {
    const _: () = assert!(usize::BITS >= 64, "the data word carries two 32-bit halves");
    let data = (u64::from(key) << 32 | u64::from(token)) as usize as *const ();
    // SAFETY: the data word is an integer, never dereferenced; the functions of the table
    // below keep no state and honour the contract of each entry (clone copies the word).
    unsafe { Waker::from_raw(RawWaker::new(data, &SESSION_WAKER)) }
}

static SESSION_WAKER: RawWakerVTable =
    RawWakerVTable::new(clone_session, wake_session, wake_session, drop_session);

fn clone_session(data: *const ()) -> RawWaker {
    RawWaker::new(data, &SESSION_WAKER)
}

fn wake_session(data: *const ()) {
    let word = data as usize as u64;
    let (key, token) = ((word >> 32) as usize, word as u32);
    if let Some(worker) = OWNER.get() {
        monoio::spawn(async move {
            if let Some(lot) = worker.lot() {
                lot.resume_session(worker, key, token);
            }
        });
    }
}

fn drop_session(_: *const ()) {}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// What a parked connection costs the lot, beside its registry entry and the slab's tag:
    /// 64 bytes before message sessions and event streams parked; what they hold is boxed (a
    /// session's stay's token inside it), and the entry says which (two words).
    #[test]
    fn parked_entries_stay_small() {
        let size = std::mem::size_of::<Parked>();
        eprintln!("parked entry: {size} bytes");
        assert!(size <= 80, "a parked entry is {size} bytes");
    }

    /// A parked session's waker brings it back only for the stay it was made for: one woken
    /// late, after the connection left and another parked under its key, names a token that
    /// no longer matches and leaves the other parked.
    #[test]
    fn a_session_waker_serves_only_its_own_stay() {
        let worker = Worker::for_test();
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        rt.block_on(async move {
            OWNER.set(Some(worker));
            let lot = worker.lot().expect("parking is on");
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let mut clients = Vec::new();
            // Parks a fresh MCPB connection with its session: its key and its stay's token.
            let mut park = || {
                let (tcp, permit) = worker.test_connection(&listener, &mut clients);
                let reg = worker.register(&tcp, Frontend::Tcp);
                let stream = Stream::Plain(tcp);
                let session = Box::new(MsgSession::new(worker, None, Frontend::Tcp, &stream));
                let held = Held::Session(session);
                assert!(lot.park(worker, stream, permit, reg, None, held).is_ok());
                let parked = lot.parked.borrow();
                let (key, p) = parked.iter().last().unwrap();
                let Held::Session(s) = &p.held else {
                    unreachable!("parked with its session")
                };
                (key as u32, s.stay())
            };
            let wake = |key: u32, token: u32| async move {
                session_waker(key, token).wake();
                monoio::time::sleep(std::time::Duration::from_millis(5)).await; // its task runs
            };
            let (key, first) = park();
            wake(key, first.wrapping_add(1)).await;
            assert_eq!(
                lot.parked.borrow().len(),
                1,
                "a token of no stay wakes nothing"
            );
            wake(key, first).await;
            assert!(
                lot.parked.borrow().is_empty(),
                "its own token serves it again"
            );
            // Another connection parks under the same key: the first stay's waker, woken late,
            // leaves it parked.
            let (again, second) = park();
            assert_eq!((again, second == first), (key, false));
            wake(key, first).await;
            assert_eq!(
                lot.parked.borrow().len(),
                1,
                "a late waker of the stay before"
            );
            wake(key, second).await;
            assert!(lot.parked.borrow().is_empty());
        });
    }
}
