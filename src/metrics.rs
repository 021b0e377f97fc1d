//! Metrics: per-core counters written on the hot path, summed into Prometheus text at scrape time.
//!
//! Owns every counter, gauge and histogram the gateway exports. Each worker writes only its own
//! cache-padded [`CoreMetrics`], so recording a request never bounces a cache line shared with
//! another core; the admin thread reads all cores and adds them up when `/metrics` is scraped.
//! The connection gauges that must be exact come from the [`Limiter`] itself, not from a second
//! count that could drift from it. The exposition (names, help texts, labels) is in
//! `metrics/render.rs`.
//!
//! Orderings: every access is Relaxed. Each value is an independent statistic; a scrape wants a
//! recent value of each, not a consistent cut across them, and nothing is published through them.

mod render;

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crossbeam_utils::CachePadded;

use crate::limiter::{Limiter, Rejection};
use crate::upstream::registry::{PerUpstream, Registry, MAX_UPSTREAMS};
use crate::upstream::{Outcome, Upstream, Upstreams};

/// The front doors, as the `frontend` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frontend {
    Http = 0,
    WebSocket = 1,
    Tcp = 2,
}

impl Frontend {
    pub const ALL: [Frontend; 3] = [Frontend::Http, Frontend::WebSocket, Frontend::Tcp];
    pub fn label(self) -> &'static str {
        ["http", "websocket", "tcp"][self as usize]
    }
}

/// Kinds of failed `accept()` calls.
#[derive(Debug, Clone, Copy)]
pub enum AcceptError {
    /// EMFILE/ENFILE: out of file descriptors.
    FdLimit = 0,
    /// ENOBUFS/ENOMEM.
    NoMemory = 1,
    Other = 2,
}

impl AcceptError {
    const LABELS: [&'static str; 3] = ["fd_limit", "no_memory", "other"];
    pub fn of(e: &std::io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::EMFILE | libc::ENFILE) => AcceptError::FdLimit,
            Some(libc::ENOBUFS | libc::ENOMEM) => AcceptError::NoMemory,
            _ => AcceptError::Other,
        }
    }
}

/// Client protocol errors that ended a connection, as the `kind` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolError {
    /// Unparsable request, frame or handshake (HTTP 400, WebSocket 1002, MCPB Error frame).
    Malformed = 0,
    /// Request head, body, message or payload over its limit (431, 413, 1009).
    TooLarge = 1,
    /// Request not received within `read_timeout` (408), or a PROXY header not within it.
    Timeout = 2,
    /// A peer in `server.proxy_protocol_networks` began without a valid PROXY protocol header.
    ProxyHeader = 3,
    /// A request from a browser page of an origin `server.allowed_origins` does not allow (403).
    Origin = 4,
    /// A TLS handshake on a door that failed (not TLS, no common version, a bad record) or did
    /// not finish within `read_timeout`.
    Tls = 5,
}

impl ProtocolError {
    const LABELS: [&'static str; 6] = [
        "malformed",
        "too_large",
        "timeout",
        "proxy_header",
        "origin",
        "tls",
    ];
}

/// Request latency bucket bounds, seconds.
const BUCKETS: [f64; 14] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
    5.0,
];

#[derive(Default)]
struct Histo {
    /// Per-bucket (not cumulative) counts; the last one is +Inf.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Histo {
    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_nanos.fetch_add(d.as_nanos() as u64, Relaxed);
    }
}

/// One worker's counters. Written only by that worker's thread.
pub struct CoreMetrics {
    accepted: [AtomicU64; 3],
    active: [AtomicI64; 3],
    rejected: [[AtomicU64; Rejection::ALL.len()]; 3],
    accept_errors: [[AtomicU64; 3]; 3],
    protocol_errors: [[AtomicU64; ProtocolError::LABELS.len()]; 3],
    /// Connections whose PROXY protocol header was read.
    proxy_headers: [AtomicU64; 3],
    requests: [AtomicU64; 3],
    rate_limited: [AtomicU64; 3],
    latency: [Histo; 3],
    /// Idle connections parked now, and parks since start (see [`crate::park`]).
    parked: AtomicI64,
    parks: AtomicU64,
    /// Per upstream, by its index (room made by the registry before an upstream is in force).
    /// Padded: the cores' boxes are separate heap allocations that would otherwise share cache
    /// lines with each other.
    upstreams: PerUpstream<CachePadded<UpstreamCounters>>,
}

/// One core's counters for one upstream.
#[derive(Default)]
struct UpstreamCounters {
    /// Requests by [`Outcome`].
    outcomes: [AtomicU64; Outcome::COUNT],
    /// Time to the response head.
    latency: Histo,
    /// Requests (and event streams) in flight from this core: what `least_connections` compares.
    in_flight: AtomicI64,
    /// Idle connections in this core's pool, as the sweeper last counted them (the pool is the
    /// core's own: counting it per request would write this line twice a request).
    pooled: AtomicU64,
    /// Event streams resumed after the upstream ended them early (see `upstream::resume`).
    resumed: AtomicU64,
}

impl CoreMetrics {
    fn new(upstreams: usize) -> Self {
        CoreMetrics {
            accepted: Default::default(),
            active: Default::default(),
            rejected: Default::default(),
            accept_errors: Default::default(),
            protocol_errors: Default::default(),
            proxy_headers: Default::default(),
            requests: Default::default(),
            rate_limited: Default::default(),
            latency: Default::default(),
            parked: Default::default(),
            parks: Default::default(),
            upstreams: PerUpstream::new(MAX_UPSTREAMS, upstreams),
        }
    }

    /// A request to upstream `i` ended with `outcome`; `took`: time to its response head.
    pub fn upstream(&self, i: usize, outcome: Outcome, took: Option<Duration>) {
        let u = self.upstreams.get(i);
        u.outcomes[outcome as usize].fetch_add(1, Relaxed);
        if let Some(d) = took {
            u.latency.observe(d);
        }
    }

    /// A request to upstream `i` began: in flight until [`CoreMetrics::upstream_ended`].
    pub fn upstream_started(&self, i: usize) {
        self.upstreams.get(i).in_flight.fetch_add(1, Relaxed);
    }

    /// A request to upstream `i` ended (its lease dropped), however it ended.
    pub fn upstream_ended(&self, i: usize) {
        self.upstreams.get(i).in_flight.fetch_sub(1, Relaxed);
    }

    /// Requests in flight to upstream `i` from this core.
    pub fn upstream_in_flight(&self, i: usize) -> i64 {
        self.upstreams.get(i).in_flight.load(Relaxed)
    }

    /// This core's pool holds `n` idle connections to upstream `i` (the sweeper's count).
    pub fn set_upstream_pooled(&self, i: usize, n: usize) {
        self.upstreams.get(i).pooled.store(n as u64, Relaxed);
    }

    /// An event stream of upstream `i` was resumed after it ended early.
    pub fn upstream_resumed(&self, i: usize) {
        self.upstreams.get(i).resumed.fetch_add(1, Relaxed);
    }

    /// Event streams of upstream `i` this core resumed.
    pub fn upstream_resumptions(&self, i: usize) -> u64 {
        self.upstreams.get(i).resumed.load(Relaxed)
    }

    /// Idle connections to upstream `i` in this core's pool at the last sweep.
    pub fn upstream_pooled(&self, i: usize) -> u64 {
        self.upstreams.get(i).pooled.load(Relaxed)
    }

    /// A connection was admitted on `door`.
    pub fn opened(&self, door: Frontend) {
        self.accepted[door as usize].fetch_add(1, Relaxed);
        self.active[door as usize].fetch_add(1, Relaxed);
    }

    /// A connection of `door` closed (or moved to another door: see [`crate::worker::Registration::switch`]).
    pub fn closed(&self, door: Frontend) {
        self.active[door as usize].fetch_sub(1, Relaxed);
    }

    /// An idle connection was parked.
    pub fn parked(&self) {
        self.parks.fetch_add(1, Relaxed);
        self.parked.fetch_add(1, Relaxed);
    }

    /// A parked connection left the parking lot (resumed or closed).
    pub fn unparked(&self) {
        self.parked.fetch_sub(1, Relaxed);
    }

    pub fn rejected(&self, door: Frontend, why: Rejection) {
        let r = Rejection::ALL.iter().position(|x| *x == why).unwrap_or(0);
        self.rejected[door as usize][r].fetch_add(1, Relaxed);
    }

    pub fn accept_error(&self, door: Frontend, kind: AcceptError) {
        self.accept_errors[door as usize][kind as usize].fetch_add(1, Relaxed);
    }

    pub fn protocol_error(&self, door: Frontend, kind: ProtocolError) {
        self.protocol_errors[door as usize][kind as usize].fetch_add(1, Relaxed);
    }

    /// A connection's PROXY protocol header was read: it counts as the client it named.
    pub fn proxy_header(&self, door: Frontend) {
        self.proxy_headers[door as usize].fetch_add(1, Relaxed);
    }

    /// A request or message was refused by `server.max_requests_per_ip`.
    pub fn rate_limited(&self, door: Frontend) {
        self.rate_limited[door as usize].fetch_add(1, Relaxed);
    }

    /// A request or message was answered after `took`.
    pub fn request(&self, door: Frontend, took: Duration) {
        self.requests[door as usize].fetch_add(1, Relaxed);
        self.latency[door as usize].observe(took);
    }
}

/// Everything `/metrics` reports.
pub struct Metrics {
    cores: Box<[CachePadded<CoreMetrics>]>,
    limiter: &'static Limiter,
    upstreams: &'static Registry,
    /// Configuration reloads (SIGHUP) by [`Reload`] outcome; written by the main thread only.
    reloads: [AtomicU64; 3],
    /// 1 when the last reload applied the whole file (or there was none yet), else 0.
    last_reload_whole: AtomicU64,
    /// Unix time (seconds) of the last reload that applied anything, 0 before any.
    last_reload_at: AtomicU64,
}

/// How a configuration reload ended: the `result` label of `mcp_gateway_config_reloads_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// Every change applied.
    Applied = 0,
    /// Some changes wait for a restart (named in the log).
    Partial = 1,
    /// The file did not load or validate: nothing changed.
    Failed = 2,
}

impl Reload {
    const LABELS: [&'static str; 3] = ["applied", "partial", "failed"];
}

impl Metrics {
    pub fn new(workers: usize, limiter: &'static Limiter, upstreams: &'static Registry) -> Self {
        let made = upstreams.current().all.iter().map(|u| u.index + 1).max();
        Metrics {
            cores: (0..workers)
                .map(|_| CachePadded::new(CoreMetrics::new(made.unwrap_or(0))))
                .collect(),
            limiter,
            upstreams,
            reloads: Default::default(),
            last_reload_whole: AtomicU64::new(1),
            last_reload_at: AtomicU64::new(0),
        }
    }

    /// A configuration reload ended with `how`.
    pub fn reloaded(&self, how: Reload) {
        self.reloads[how as usize].fetch_add(1, Relaxed);
        self.last_reload_whole
            .store(u64::from(how == Reload::Applied), Relaxed);
        if how != Reload::Failed {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            self.last_reload_at.store(now, Relaxed);
        }
    }

    pub fn leak(self) -> &'static Metrics {
        Box::leak(Box::new(self))
    }

    /// Makes room in every core's per-upstream counters for upstream indices below `len` (a
    /// reload, before its view is in force).
    pub fn make_room(&self, len: usize) {
        for c in self.cores.iter() {
            c.upstreams.make_room(len);
        }
    }

    /// Worker `i`'s counters.
    pub fn core(&'static self, i: usize) -> &'static CoreMetrics {
        &self.cores[i]
    }

    fn sum<F: Fn(&CoreMetrics) -> u64>(&self, f: F) -> u64 {
        self.cores.iter().map(|c| f(c)).sum()
    }

    /// Active connections on `door`, summed over cores.
    pub fn active(&self, door: Frontend) -> i64 {
        self.gauge_sum(|c| &c.active[door as usize])
    }

    /// A per-core gauge, summed over the cores.
    fn gauge_sum(&self, of: impl Fn(&CoreMetrics) -> &AtomicI64) -> i64 {
        self.cores.iter().map(|c| of(c).load(Relaxed)).sum()
    }
}

/// A one-line summary for logs.
pub fn describe_limits(l: &Limiter) -> String {
    let mut s = String::new();
    let _ = write!(s, "max_connections={}", l.max_connections());
    match l.max_per_ip() {
        0 => s.push_str(" max_connections_per_ip=disabled"),
        n => {
            let _ = write!(
                s,
                " max_connections_per_ip={n} ip_table_slots={}",
                l.ip_table_slots()
            );
        }
    }
    if l.per_ip_overrides() > 0 {
        let _ = write!(s, " per_ip_overrides={}", l.per_ip_overrides());
    }
    if l.max_per_ip() > 0 && l.ipv6_prefix() < 128 {
        let _ = write!(s, " ipv6_prefix_len={}", l.ipv6_prefix());
    }
    if let Some((rate, burst)) = l.request_rate() {
        let _ = write!(s, " max_requests_per_ip={rate}/s burst={burst}");
    }
    if let Some((rate, burst)) = l.connection_rate() {
        let _ = write!(s, " max_new_connections_per_ip={rate}/s burst={burst}");
    }
    s
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn per_core_counters_are_summed_at_scrape() {
        let limiter = Limiter::new(10, 5).leak();
        let upstreams = Registry::new(&crate::config::Config::default())
            .unwrap()
            .leak();
        let m = Metrics::new(2, limiter, upstreams).leak();
        m.core(0).request(Frontend::Http, Duration::from_micros(30));
        m.core(1).request(Frontend::Http, Duration::from_millis(2));
        m.core(1).rejected(Frontend::Tcp, Rejection::PerIp);
        let _p = limiter.try_acquire("127.0.0.2".parse().unwrap()).unwrap();
        let text = m.render();
        assert!(
            text.contains("mcp_gateway_requests_total{frontend=\"http\"} 2\n"),
            "{text}"
        );
        assert!(text.contains(
            "mcp_gateway_connections_rejected_total{frontend=\"tcp\",reason=\"per_ip\"} 1\n"
        ));
        assert!(text.contains("mcp_gateway_connections_active 1\n"));
        assert!(
            text.contains(
                "mcp_gateway_request_duration_seconds_bucket{frontend=\"http\",le=\"0.00005\"} 1\n"
            ),
            "{text}"
        );
        assert!(text.contains("mcp_gateway_request_duration_seconds_count{frontend=\"http\"} 2\n"));
    }
}
