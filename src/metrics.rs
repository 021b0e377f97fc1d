//! Metrics: per-core counters written on the hot path, summed into Prometheus text at scrape time.
//!
//! Owns every counter, gauge and histogram the gateway exports. Each worker writes only its own
//! cache-padded [`CoreMetrics`], so recording a request never bounces a cache line shared with
//! another core; the admin thread reads all cores and adds them up when `/metrics` is scraped.
//! The connection gauges that must be exact come from the [`Limiter`] itself, not from a second
//! count that could drift from it.
//!
//! Orderings: every access is Relaxed. Each value is an independent statistic; a scrape wants a
//! recent value of each, not a consistent cut across them, and nothing is published through them.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crossbeam_utils::CachePadded;
use prometheus::proto::{
    Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType,
};
use prometheus::{Encoder, TextEncoder};

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
    rejected: [[AtomicU64; 3]; 3],
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

    /// One sample per door of `doors`: a per-door counter of the cores (`of`), summed.
    fn per_door<'a>(
        &self,
        doors: &[Frontend],
        of: impl Fn(&CoreMetrics) -> &[AtomicU64; 3],
    ) -> Vec<Sample<'a>> {
        doors
            .iter()
            .map(|d| {
                let v = self.sum(|c| of(c)[*d as usize].load(Relaxed));
                (vec![("frontend", d.label())], v as f64)
            })
            .collect()
    }

    /// Active connections on `door`, summed over cores.
    pub fn active(&self, door: Frontend) -> i64 {
        self.gauge_sum(|c| &c.active[door as usize])
    }

    /// A per-core gauge, summed over the cores.
    fn gauge_sum(&self, of: impl Fn(&CoreMetrics) -> &AtomicI64) -> i64 {
        self.cores.iter().map(|c| of(c).load(Relaxed)).sum()
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut fams = Vec::new();
        let doors = Frontend::ALL;
        let active = self.limiter.active() as f64;
        fams.push(gauge(
            "mcp_gateway_connections_total",
            "Active connections over all front doors (original name; same value as mcp_gateway_connections_active).",
            vec![(vec![], active)],
        ));
        fams.push(gauge(
            "mcp_gateway_connections_active",
            "Active connections over all front doors.",
            vec![(vec![], active)],
        ));
        let mut rejected = Vec::new();
        for d in doors {
            for (ri, r) in Rejection::ALL.iter().enumerate() {
                let v = self.sum(|c| c.rejected[d as usize][ri].load(Relaxed));
                rejected.push((
                    vec![("frontend", d.label()), ("reason", r.label())],
                    v as f64,
                ));
            }
        }
        fams.push(counter(
            "mcp_gateway_connections_rejected_total",
            "Connections rejected by a limit, by front door and reason.",
            rejected,
        ));
        let tcp = Frontend::Tcp as usize;
        fams.push(counter(
            "mcp_gateway_tcp_connections_total",
            "TCP (MCPB) front-door connections accepted since start.",
            vec![(vec![], self.sum(|c| c.accepted[tcp].load(Relaxed)) as f64)],
        ));
        fams.push(gauge(
            "mcp_gateway_tcp_connections_active",
            "TCP (MCPB) front-door connections open now.",
            vec![(vec![], self.active(Frontend::Tcp) as f64)],
        ));
        fams.push(gauge(
            "mcp_gateway_frontend_connections_active",
            "Open connections by front door (an upgraded WebSocket counts as websocket).",
            doors
                .iter()
                .map(|d| (vec![("frontend", d.label())], self.active(*d) as f64))
                .collect(),
        ));
        fams.push(counter(
            "mcp_gateway_frontend_connections_accepted_total",
            "Connections admitted by front door since start (upgrades count under websocket too).",
            self.per_door(&doors, |c| &c.accepted),
        ));
        let workers: Vec<String> = (0..self.cores.len()).map(|i| i.to_string()).collect();
        fams.push(counter(
            "mcp_gateway_worker_connections_accepted_total",
            "Connections admitted by each worker (core) since start: how SO_REUSEPORT spreads them.",
            self.cores
                .iter()
                .zip(&workers)
                .map(|(c, w)| {
                    let v: u64 = c.accepted.iter().map(|a| a.load(Relaxed)).sum::<u64>()
                        - c.accepted[Frontend::WebSocket as usize].load(Relaxed);
                    (vec![("worker", w.as_str())], v as f64)
                })
                .collect(),
        ));
        fams.push(gauge(
            "mcp_gateway_connections_parked",
            "Idle connections (HTTP, WebSocket, MCPB, event streams between events) parked outside any task now (they count as active too).",
            vec![(vec![], self.gauge_sum(|c| &c.parked) as f64)],
        ));
        fams.push(counter(
            "mcp_gateway_connection_parks_total",
            "Times an idle connection was parked since start.",
            vec![(vec![], self.sum(|c| c.parks.load(Relaxed)) as f64)],
        ));
        fams.push(gauge(
            "mcp_gateway_connection_limit",
            "Configured connection limits (per_ip 0 = disabled).",
            vec![
                (
                    vec![("scope", "global")],
                    self.limiter.max_connections() as f64,
                ),
                (vec![("scope", "per_ip")], self.limiter.max_per_ip() as f64),
            ],
        ));
        fams.push(gauge(
            "mcp_gateway_tracked_ips",
            "Client addresses with at least one open connection.",
            vec![(vec![], self.limiter.tracked_ips() as f64)],
        ));
        fams.push(gauge(
            "mcp_gateway_ip_table_slots",
            "Slots in the per-IP table (fixed at startup).",
            vec![(vec![], self.limiter.ip_table_slots() as f64)],
        ));
        let mut accept_errors = Vec::new();
        let mut protocol_errors = Vec::new();
        for d in doors {
            for (k, label) in AcceptError::LABELS.iter().enumerate() {
                if d != Frontend::WebSocket {
                    let v = self.sum(|c| c.accept_errors[d as usize][k].load(Relaxed));
                    accept_errors.push((vec![("frontend", d.label()), ("kind", *label)], v as f64));
                }
            }
            for (k, label) in ProtocolError::LABELS.iter().enumerate() {
                let v = self.sum(|c| c.protocol_errors[d as usize][k].load(Relaxed));
                protocol_errors.push((vec![("frontend", d.label()), ("kind", *label)], v as f64));
            }
        }
        fams.push(counter(
            "mcp_gateway_accept_errors_total",
            "Failed accept() calls by listener and kind.",
            accept_errors,
        ));
        fams.push(counter(
            "mcp_gateway_protocol_errors_total",
            "Connections ended by a client protocol error, by front door and kind.",
            protocol_errors,
        ));
        fams.push(counter(
            "mcp_gateway_requests_total",
            "Requests (HTTP) and messages (WebSocket, MCPB) answered, by front door.",
            self.per_door(&doors, |c| &c.requests),
        ));
        fams.push(counter(
            "mcp_gateway_requests_rate_limited_total",
            "Requests and messages refused by the per-IP request rate (server.max_requests_per_ip), by front door.",
            self.per_door(&doors, |c| &c.rate_limited),
        ));
        fams.push(counter(
            "mcp_gateway_proxy_headers_total",
            "Connections from server.proxy_protocol_networks whose PROXY protocol header was read, by the listener they came to.",
            self.per_door(&[Frontend::Http, Frontend::Tcp], |c| &c.proxy_headers),
        ));
        fams.push(counter(
            "mcp_gateway_config_reloads_total",
            "Configuration reloads (SIGHUP) by result: applied, partial (some changes wait for a restart), failed (nothing changed).",
            Reload::LABELS
                .iter()
                .enumerate()
                .map(|(i, r)| (vec![("result", *r)], self.reloads[i].load(Relaxed) as f64))
                .collect(),
        ));
        fams.push(counter(
            "mcp_gateway_log_lines_dropped_total",
            "Log lines dropped because stderr did not take them fast enough (the gateway never waits for its log).",
            vec![(vec![], crate::logging::dropped_lines() as f64)],
        ));
        fams.push(gauge(
            "mcp_gateway_config_last_reload_successful",
            "1 when the last reload (SIGHUP) applied the whole file, or none happened yet; 0 when it failed or left changes waiting for a restart.",
            vec![(vec![], self.last_reload_whole.load(Relaxed) as f64)],
        ));
        fams.push(gauge(
            "mcp_gateway_config_last_reload_success_timestamp_seconds",
            "Unix time of the last reload that applied anything (0: none yet).",
            vec![(vec![], self.last_reload_at.load(Relaxed) as f64)],
        ));
        fams.push(self.latency_family());
        // One view for every upstream family of a scrape (a reload may publish another).
        let view = self.upstreams.current();
        let up = |u: &'static Upstream| {
            vec![
                ("namespace", u.namespace.as_str()),
                ("upstream", u.url.as_str()),
            ]
        };
        fams.push(gauge(
            "mcp_gateway_upstream_healthy",
            "1 when the upstream is taking traffic, 0 when health checks or its breaker took it out.",
            view.all
                .iter()
                .map(|u| (up(u), if u.in_service() { 1.0 } else { 0.0 }))
                .collect(),
        ));
        let checks: Vec<_> = view
            .all
            .iter()
            .filter(|u| u.http().is_some())
            .flat_map(|u| {
                let (ok, failed) = u.checks();
                let with = |result| {
                    let mut l = up(u);
                    l.push(("result", result));
                    l
                };
                [(with("ok"), ok as f64), (with("failed"), failed as f64)]
            })
            .collect();
        // Only HTTP upstreams are checked; an empty family does not encode.
        if !checks.is_empty() {
            fams.push(counter(
                "mcp_gateway_upstream_health_checks_total",
                "Active health checks of each HTTP upstream since start, by result (ok, failed).",
                checks,
            ));
        }
        fams.push(gauge(
            "mcp_gateway_upstream_circuit_state",
            "Circuit breaker of each upstream: 0 closed, 1 open (failing fast), 2 half-open (probing).",
            view.all
                .iter()
                .map(|u| (up(u), u.breaker.state() as i64 as f64))
                .collect(),
        ));
        fams.push(gauge(
            "mcp_gateway_upstream_in_flight",
            "Requests and event streams in flight to each upstream, all cores.",
            view.all
                .iter()
                .map(|u| {
                    let n: i64 = self
                        .cores
                        .iter()
                        .map(|c| c.upstream_in_flight(u.index))
                        .sum();
                    (up(u), n as f64)
                })
                .collect(),
        ));
        let mut outcomes = Vec::new();
        for u in &view.all {
            for (k, label) in Outcome::LABELS.iter().enumerate() {
                let v = self.sum(|c| c.upstreams.get(u.index).outcomes[k].load(Relaxed));
                let mut l = up(u);
                l.push(("outcome", label));
                outcomes.push((l, v as f64));
            }
        }
        fams.push(counter(
            "mcp_gateway_upstream_requests_total",
            "Requests forwarded to each upstream, by outcome (builtin:echo counts its answers as ok).",
            outcomes,
        ));
        fams.push(self.upstream_latency_family(view));
        let mut out = Vec::with_capacity(8 * 1024);
        TextEncoder::new()
            .encode(&fams, &mut out)
            .expect("text encoding of well-formed families");
        String::from_utf8(out).expect("text encoder writes UTF-8")
    }

    fn latency_family(&self) -> MetricFamily {
        let mut fam = family(
            "mcp_gateway_request_duration_seconds",
            "Time from a complete request or message to its answer being written, by front door.",
            MetricType::HISTOGRAM,
        );
        for d in Frontend::ALL {
            let h = self.histogram(|c| &c.latency[d as usize]);
            fam.mut_metric()
                .push(with_labels(h, &[("frontend", d.label())]));
        }
        fam
    }

    fn upstream_latency_family(&self, view: &Upstreams) -> MetricFamily {
        let mut fam = family(
            "mcp_gateway_upstream_request_duration_seconds",
            "Time from sending a request to an upstream to its response head, per upstream.",
            MetricType::HISTOGRAM,
        );
        for u in &view.all {
            let h = self.histogram(|c| &c.upstreams.get(u.index).latency);
            let l = [
                ("namespace", u.namespace.as_str()),
                ("upstream", u.url.as_str()),
            ];
            fam.mut_metric().push(with_labels(h, &l));
        }
        fam
    }

    /// One histogram summed over cores.
    fn histogram(&self, of: impl Fn(&CoreMetrics) -> &Histo) -> Histogram {
        let mut h = Histogram::default();
        let mut cumulative = 0;
        let mut buckets = Vec::new();
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.sum(|c| of(c).buckets[i].load(Relaxed));
            let mut b = Bucket::default();
            b.set_upper_bound(*bound);
            b.set_cumulative_count(cumulative);
            buckets.push(b);
        }
        cumulative += self.sum(|c| of(c).buckets[BUCKETS.len()].load(Relaxed));
        h.set_bucket(buckets);
        h.set_sample_count(cumulative);
        let nanos = self.sum(|c| of(c).sum_nanos.load(Relaxed));
        h.set_sample_sum(nanos as f64 / 1e9);
        h
    }
}

fn with_labels(h: Histogram, l: &[(&str, &str)]) -> Metric {
    let mut m = Metric::default();
    m.set_label(labels(l));
    m.set_histogram(h);
    m
}

type Sample<'a> = (Vec<(&'a str, &'a str)>, f64);

fn family(name: &str, help: &str, kind: MetricType) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.into());
    f.set_help(help.into());
    f.set_field_type(kind);
    f
}

fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
    pairs
        .iter()
        .map(|(k, v)| {
            let mut l = LabelPair::default();
            l.set_name((*k).into());
            l.set_value((*v).into());
            l
        })
        .collect()
}

fn gauge(name: &str, help: &str, samples: Vec<Sample>) -> MetricFamily {
    let mut f = family(name, help, MetricType::GAUGE);
    for (l, v) in samples {
        let mut g = Gauge::default();
        g.set_value(v);
        let mut m = Metric::default();
        m.set_label(labels(&l));
        m.set_gauge(g);
        f.mut_metric().push(m);
    }
    f
}

fn counter(name: &str, help: &str, samples: Vec<Sample>) -> MetricFamily {
    let mut f = family(name, help, MetricType::COUNTER);
    for (l, v) in samples {
        let mut c = Counter::default();
        c.set_value(v);
        let mut m = Metric::default();
        m.set_label(labels(&l));
        m.set_counter(c);
        f.mut_metric().push(m);
    }
    f
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
