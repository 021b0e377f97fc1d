//! One worker: a pinned monoio runtime that accepts on its own `SO_REUSEPORT` listeners, admits
//! connections through the limiter, serves them to completion, and drains on shutdown.
//!
//! Owns the per-core state: the registry of open connections (used to wake idle ones when the
//! worker drains, and event streams whose upstream a reload removed), the idle sweeper (which
//! expires idle connections and asks idle plain ones to park in the core's [`crate::park::Lot`]),
//! the count of rejection replies in flight, and the core's session-id generator. The accept
//! path (admission, refusals, PROXY headers, the guarded connection tasks) is in `accept`; the
//! registry of open connections and their idle state in `idle`.
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
use std::net::IpAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use monoio::net::TcpListener;
use slab::Slab;

use crate::config::{secs, ServerConfig};
use crate::http::origin::Origins;
use crate::limiter::{Limiter, Permit};
use crate::metrics::{CoreMetrics, Frontend, Metrics};
use crate::park::Lot;
use crate::proxy_protocol::Trusted;
use crate::published::Published;
use crate::stream::Stream;
use crate::upstream::balance::Balancer;
use crate::upstream::registry::Registry;
use crate::upstream::Upstreams;

mod accept;
mod idle;

pub use accept::serve_upgraded;
#[cfg(all(test, not(loom)))]
pub(crate) use accept::WithClient;
use accept::{accept_loop, relayed};
use idle::{make_lot, Entry};
pub use idle::{Registration, SessionStreamWatch, Unparked};

/// Process-wide settings the connection tasks need, resolved from the configuration; read-only
/// but for what a reload may change ([`crate::reload`]): the timeouts, whether idle
/// connections park, the message size, the trusted and allowed networks and origins, and the
/// doors' certificate.
pub struct Settings {
    pub timeouts: Timeouts,
    /// `server.park_idle_connections` (see [`crate::park`]), read by each sweep and each idle
    /// wait: see [`Settings::parks_idle`].
    pub park_idle: AtomicBool,
    /// `server.shutdown_timeout` in microseconds, read when a drain starts: see
    /// [`Settings::shutdown_timeout`].
    pub shutdown_timeout_us: AtomicU64,
    /// `server.max_message_size`, read where a body or message starts: see
    /// [`Settings::max_message_size`].
    pub max_message_size: AtomicUsize,
    /// `server.proxy_protocol_networks`, read as a connection is accepted.
    pub proxy_protocol: Published<Trusted>,
    /// `server.allowed_origins`, read for each request that has an `Origin`.
    pub allowed_origins: Published<Origins>,
    /// `server.tls_cert_file` and `server.tls_key_file` made into a server configuration
    /// (replaced on SIGHUP): the doors speak TLS when set. Each worker serves TLS with its own
    /// copy (see [`Worker::tls`]).
    pub tls: Option<crate::tls::DoorTls>,
}

impl Settings {
    /// The settings of `s` (validated); `Err` when the doors' certificate does not load.
    pub fn new(s: &ServerConfig) -> Result<Settings, String> {
        Ok(Settings {
            timeouts: Timeouts::new(
                secs(s.read_timeout),
                secs(s.write_timeout),
                secs(s.idle_timeout),
            ),
            park_idle: s.park_idle_connections.into(),
            shutdown_timeout_us: AtomicU64::new(micros(secs(s.shutdown_timeout))),
            max_message_size: s.max_message_size.into(),
            proxy_protocol: Published::new(Trusted::of(&s.proxy_protocol_networks)),
            allowed_origins: Published::new(Origins::new(&s.allowed_origins)),
            tls: crate::tls::door_config(s)?.map(crate::tls::DoorTls::new),
        })
    }

    /// How long a drain waits for open connections. Relaxed: it guards nothing else, and a
    /// drain that starts while a reload stores a new value waits for the old or the new one.
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_micros(self.shutdown_timeout_us.load(Relaxed))
    }

    /// A reloaded `shutdown_timeout`, for drains that start from now.
    pub fn set_shutdown_timeout(&self, d: Duration) {
        self.shutdown_timeout_us.store(micros(d), Relaxed);
    }

    /// Whether idle connections park. Relaxed: it guards nothing else; a sweep or a wait that
    /// runs while a reload stores a new value follows the old or the new one, and either is
    /// right (a connection asked to park under the old one parks; parked ones stay until they
    /// come back).
    pub fn parks_idle(&self) -> bool {
        self.park_idle.load(Relaxed)
    }

    /// The largest request body, WebSocket message, MCPB payload, upstream reply or event, in
    /// bytes. Relaxed: it guards nothing else; what starts while a reload stores a new value is
    /// held to the old or the new one, and either is right.
    pub fn max_message_size(&self) -> usize {
        self.max_message_size.load(Relaxed)
    }
}

/// A duration in whole microseconds, as the settings' atomics hold it.
fn micros(d: Duration) -> u64 {
    d.as_micros().min(u128::from(u64::MAX)) as u64
}

/// `server.read_timeout`, `write_timeout` and `idle_timeout`, which a reload may change: each
/// in an atomic (microseconds), read where a wait starts, so a change applies to the waits that
/// start after it (a connection already waiting keeps the deadline it has).
///
/// Orderings: Relaxed. Each value guards nothing else; a wait that starts while a reload stores
/// new values gets the old or the new one of each, and either is right.
#[derive(Debug)]
pub struct Timeouts {
    read_us: AtomicU64,
    write_us: AtomicU64,
    idle_us: AtomicU64,
}

impl Timeouts {
    pub fn new(read: Duration, write: Duration, idle: Duration) -> Timeouts {
        let t = Timeouts {
            read_us: AtomicU64::new(0),
            write_us: AtomicU64::new(0),
            idle_us: AtomicU64::new(0),
        };
        t.set(read, write, idle);
        t
    }

    /// Sets all three (a reload).
    pub fn set(&self, read: Duration, write: Duration, idle: Duration) {
        self.read_us.store(micros(read), Relaxed);
        self.write_us.store(micros(write), Relaxed);
        self.idle_us.store(micros(idle), Relaxed);
    }

    /// For a request (head and body) to arrive, from its first byte, and for a TLS handshake.
    pub fn read(&self) -> Duration {
        Duration::from_micros(self.read_us.load(Relaxed))
    }

    /// For a write to make progress.
    pub fn write(&self) -> Duration {
        Duration::from_micros(self.write_us.load(Relaxed))
    }

    /// For a keep-alive connection's next request or a session's next message.
    pub fn idle(&self) -> Duration {
        Duration::from_micros(self.idle_us.load(Relaxed))
    }
}

/// What every worker shares (all `&'static`, created once at startup).
pub struct Shared {
    pub settings: Settings,
    pub limiter: &'static Limiter,
    pub metrics: &'static Metrics,
    /// The upstreams in force (replaced by a reload): read through [`Worker::upstreams`].
    pub upstreams: &'static Registry,
}

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
    /// Where idle connections park (`None`: the lot could not be made). Made whatever
    /// `server.park_idle_connections` says, since a reload may turn it on: an empty lot costs
    /// one epoll set and one readiness wait that nothing wakes.
    lot: Option<Lot>,
}

impl Worker {
    pub fn new(index: usize, shared: &'static Shared) -> &'static Worker {
        let seed = std::hash::BuildHasher::hash_one(
            &std::collections::hash_map::RandomState::new(),
            index,
        );
        let lot = make_lot();
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
        relayed().or_else(|| {
            let peer = stream.tcp()?.peer_addr().ok()?;
            Some(peer.ip().to_canonical())
        })
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
    let deadline = Instant::now() + worker.settings().shutdown_timeout();
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
/// connections past their deadline, leave the upstreams a reload removed (their pooled
/// connections and event streams), and give the core's reserved places back to the limiter
/// ([`Limiter::give_back_own_reserves`]). Deadlines are honoured within one tick.
async fn sweep_idle(worker: &'static Worker) {
    let s = worker.settings();
    loop {
        // Taken anew each time: a reload may shorten the timeouts.
        let tick = (s.timeouts.idle().min(s.timeouts.read()) / 8)
            .clamp(Duration::from_millis(10), Duration::from_millis(500));
        monoio::time::sleep(tick).await;
        worker.sweep(false);
        worker.leave_removed_upstreams();
        let limit = worker.shared.upstreams.current().pool_idle_timeout;
        crate::upstream::client::prune_pool(limit, |i, n| worker.metrics.set_upstream_pooled(i, n));
        worker.shared.limiter.give_back_own_reserves();
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
        let server = ServerConfig {
            read_timeout: 1.0,
            write_timeout: 1.0,
            idle_timeout: 1.0,
            shutdown_timeout: 1.0,
            park_idle_connections: true,
            max_message_size: 1024,
            ..Default::default()
        };
        let shared = Box::leak(Box::new(Shared {
            settings: Settings::new(&server).unwrap(),
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
    ) -> (monoio::net::TcpStream, Permit) {
        clients.push(std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap());
        let (server, peer) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        let permit = self.shared.limiter.try_acquire(peer.ip()).unwrap();
        (monoio::net::TcpStream::from_std(server).unwrap(), permit)
    }
}
