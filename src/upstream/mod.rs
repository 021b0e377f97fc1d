//! Upstream MCP servers: the configured namespaces and their upstreams, and everything the doors
//! need to forward to them.
//!
//! Owns the process-wide [`registry`] of upstreams (what is configured now, replaced whole by a
//! reload) and the rest of what forwarding needs:
//! - [`balance`]: per-core choice of an upstream (`round_robin`, `least_connections`, `weighted`),
//!   skipping upstreams that health checks or their breaker took out;
//! - [`breaker`]: one circuit breaker per upstream;
//! - [`client`]: the per-core keep-alive pool of upstream connections, and one exchange on them;
//! - [`wire`]: the HTTP/1.1 wire format on the upstream side (heads written and parsed, bodies
//!   decoded);
//! - [`health`]: the active health checks (a scheduler thread handing probes to probe threads);
//! - [`rpc`]: the upstream MCP session of a WebSocket or MCPB connection, and [`forward`]:
//!   one JSON-RPC message forwarded within it, and [`message`]: what they read of a client's
//!   message (its id, a batch's requests, which a reply answers, the error answering it);
//! - [`listen`]: that session's standalone `GET` stream, for what the server sends unprompted;
//! - [`events`]: the server-sent events of both, taken whole out of what has come, and
//!   [`resume`]: either stream resumed after its last event when the server ends it early;
//! - [`outbox`]: what goes back to such a client, queued for its connection to write.
//!
//! Sessions stick without a shared session map: the `Mcp-Session-Id` a client sees is the
//! upstream's own id behind an 8-character tag naming the upstream ([`Upstream::tag`], a hash of
//! its namespace and URL, so it is the same on every core and every restart). A request carrying a
//! session id goes to the upstream its tag names, with the tag removed.
//!
//! Invariants: a view ([`Upstreams`]) never changes once made, and a request keeps the one it
//! started with; the only shared state written at run time is each upstream's health flag (by
//! the checker), its breaker (on failures and state changes only, never on a plain success while
//! closed) and, only when `routing.max_in_flight` is set, its in-flight count (exact across
//! cores, as a limit must be), so without that limit the hot path reads shared lines but does not
//! bounce them.

pub mod balance;
pub mod breaker;
pub mod client;
pub mod events;
pub mod forward;
pub mod health;
pub mod listen;
pub mod message;
pub mod outbox;
pub mod registry;
pub mod resume;
pub mod rpc;
pub mod wire;

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use crossbeam_utils::atomic::AtomicCell;
use std::time::Duration;

use crate::config::{secs, Endpoint, RoutingConfig, Strategy, UpstreamUrl, BUILTIN_ECHO};
use crate::limiter::Cap;
use breaker::Breaker;

/// Length of the upstream tag in front of a client-visible session id.
pub const TAG_LEN: usize = 8;

/// Where an upstream is.
#[derive(Debug)]
pub enum Target {
    /// `builtin:echo`, answered inside the gateway.
    Builtin,
    /// An MCP server speaking Streamable HTTP.
    Http(Http),
}

/// An `http://` or `https://` upstream, over TCP or (`http://unix:`) a Unix socket.
#[derive(Debug)]
pub struct Http {
    /// The URL's `host[:port]` as written (or the endpoint's `host_header`), sent as `Host`.
    pub authority: String,
    /// Request path (`/mcp` unless configured).
    pub path: String,
    /// `https://`: how to open TLS to it.
    pub tls: Option<crate::tls::Tls>,
    /// Where its connections go.
    pub dest: Dest,
}

/// Where an [`Http`] upstream's connections go.
#[derive(Debug)]
pub enum Dest {
    /// A TCP address, written as one or resolved from a host name.
    Tcp(TcpDest),
    /// `http://unix:`: a Unix socket of this host (plain HTTP only).
    Unix(std::path::PathBuf),
}

/// A TCP destination: its address, and the name it was resolved from, if any.
#[derive(Debug)]
pub struct TcpDest {
    /// The host to resolve (`None` for an address: nothing to resolve) and the port.
    name: Option<String>,
    port: u16,
    /// Where connections go: resolved at startup, and again by the health checker before each
    /// probe (see [`Http::re_resolve`]). Read once per new connection: a seqlock read (no shared
    /// write), and written only when the address changes.
    addr: AtomicCell<SocketAddr>,
}

impl TcpDest {
    /// The address new connections go to.
    pub fn addr(&self) -> SocketAddr {
        self.addr.load()
    }
}

impl Http {
    /// Resolves the host name again with `resolve`: the address in use stays while the name
    /// still resolves to it (pooled connections and the breaker's view stay meaningful), else
    /// the first address resolved replaces it. A failed or empty resolution keeps it. Returns
    /// the change, if any. An upstream configured by address, or on a Unix socket, is never
    /// resolved.
    pub fn re_resolve(
        &self,
        resolve: impl FnOnce(&str, u16) -> std::io::Result<Vec<SocketAddr>>,
    ) -> Result<Option<(SocketAddr, SocketAddr)>, String> {
        let Dest::Tcp(
            tcp @ TcpDest {
                name: Some(name), ..
            },
        ) = &self.dest
        else {
            return Ok(None);
        };
        let found = resolve(name, tcp.port).map_err(|e| format!("cannot resolve {name}: {e}"))?;
        let now = tcp.addr();
        match found.first() {
            None => Err(format!("{name} resolved to no address")),
            Some(_) if found.contains(&now) => Ok(None),
            Some(&new) => {
                tcp.addr.store(new);
                Ok(Some((now, new)))
            }
        }
    }
}

/// The addresses `host` resolves to (the system resolver: `/etc/hosts`, DNS), for `port`.
pub fn resolve(host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
    Ok((host, port).to_socket_addrs()?.collect())
}

/// One configured upstream.
#[derive(Debug)]
pub struct Upstream {
    /// Position in [`Upstreams::all`]; also its metrics index.
    pub index: usize,
    pub namespace: String,
    pub url: String,
    pub target: Target,
    /// Session-id prefix naming this upstream (lowercase hex).
    pub tag: [u8; TAG_LEN],
    /// Set by the health checker; true until a check fails. Relaxed: an advisory flag read on
    /// each pick; a pick that sees a stale value for a moment is what any health check allows.
    healthy: AtomicBool,
    /// Health checks passed and failed since start (they go on if a reload removes it and a
    /// later one configures it again). Relaxed: counters read at scrape, written by the one
    /// probe of this upstream in flight.
    checks: [AtomicU64; 2],
    /// Set by a reload that removed it (before the view without it is published), cleared when
    /// one configures it again. Relaxed: read when a connection would go back to the pool; a
    /// worker that saw the new view (Acquire) sees it set.
    retired: AtomicBool,
    pub breaker: Breaker,
    /// Requests in flight against `routing.max_in_flight`, all cores, counted only while the
    /// limit is on; its limit is 0 while it is off.
    in_flight: Cap,
}

/// A request [`Upstream::try_begin`] admitted: whether it holds one of the upstream's
/// `routing.max_in_flight` places, to give back through [`Upstream::end`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct Begun {
    counted: bool,
}

impl Upstream {
    /// Upstream number `index`: endpoint `e` of namespace `ns`, its host name resolved now.
    fn new(index: usize, ns: &str, e: &Endpoint, r: &RoutingConfig) -> Result<Upstream, String> {
        let fail =
            |why: String| format!("service_discovery.static.endpoints.{ns}: {}: {why}", e.url);
        let target = if e.url == BUILTIN_ECHO {
            Target::Builtin
        } else {
            let u = UpstreamUrl::parse(&e.url).map_err(fail)?;
            let dest = match u.unix {
                Some(path) => Dest::Unix(path),
                None => Dest::Tcp(TcpDest {
                    addr: AtomicCell::new(
                        resolve(&u.host, u.port)
                            .ok()
                            .and_then(|a| a.first().copied())
                            .ok_or_else(|| fail(format!("cannot resolve {}", u.host)))?,
                    ),
                    // Nothing to resolve for an address.
                    name: u
                        .host
                        .parse::<std::net::IpAddr>()
                        .is_err()
                        .then_some(u.host.clone()),
                    port: u.port,
                }),
            };
            let tls = match u.tls {
                false => None,
                true => {
                    let name = e.tls_server_name.as_deref().unwrap_or(&u.host);
                    Some(crate::tls::Tls {
                        config: crate::tls::client_config(e.tls_ca_file.as_deref(), e.identity())
                            .map_err(fail)?,
                        name: crate::tls::server_name(name).map_err(fail)?,
                    })
                }
            };
            Target::Http(Http {
                authority: e.host_header.clone().unwrap_or(u.authority),
                path: u.path,
                tls,
                dest,
            })
        };
        let s = Settings::of(r);
        Ok(Upstream {
            index,
            namespace: ns.to_string(),
            url: e.url.clone(),
            target,
            tag: tag(ns, &e.url),
            healthy: AtomicBool::new(true),
            checks: Default::default(),
            retired: AtomicBool::new(false),
            breaker: Breaker::new(s.failure_threshold, s.success_threshold, s.open_for),
            in_flight: Cap::new(s.max_in_flight),
        })
    }

    /// Takes the settings of the upstream itself (its breaker's and `max_in_flight`), in place:
    /// a reload that changes only these keeps the upstream, with its state and the requests it
    /// has in flight (counted against the new limit).
    fn configure(&self, s: &Settings) {
        self.breaker
            .configure(s.failure_threshold, s.success_threshold, s.open_for);
        self.in_flight.set_limit(s.max_in_flight);
    }

    /// Starts afresh, as if just configured (healthy, its breaker closed): an upstream
    /// configured again after a reload had removed it.
    fn reset(&self) {
        self.healthy.store(true, Relaxed);
        self.retired.store(false, Relaxed);
        self.breaker.reset();
    }

    /// A reload removed it: its connections are not kept for reuse.
    pub fn is_retired(&self) -> bool {
        self.retired.load(Relaxed)
    }

    /// Health checks passed and failed since start.
    pub fn checks(&self) -> (u64, u64) {
        (self.checks[0].load(Relaxed), self.checks[1].load(Relaxed))
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Relaxed)
    }

    /// Records a health check's result; a change is logged (a failure with its reason).
    pub fn set_health(&self, result: Result<(), String>) {
        self.checks[usize::from(result.is_err())].fetch_add(1, Relaxed);
        if self.healthy.swap(result.is_ok(), Relaxed) != result.is_ok() {
            match result {
                Ok(()) => {
                    tracing::info!(namespace = %self.namespace, upstream = %self.url, "upstream healthy again")
                }
                Err(why) => {
                    tracing::warn!(namespace = %self.namespace, upstream = %self.url, reason = %why, "upstream failed its health check; taken out")
                }
            }
        }
    }

    /// Admits one more request in flight unless `routing.max_in_flight` are already; pair with
    /// [`Upstream::end`]. `capped: false` is a request the limit does not apply to (a client's
    /// standalone `GET` stream): always admitted. Without the limit it writes nothing shared
    /// (it reads the limit); a request admitted while the limit is off holds no place, so
    /// turning the limit on counts only the requests after it.
    pub fn try_begin(&self, capped: bool) -> Option<Begun> {
        match self.in_flight.limit() {
            limit if capped && limit > 0 => self
                .in_flight
                .try_take_under(limit)
                .then_some(Begun { counted: true }),
            _ => Some(Begun { counted: false }),
        }
    }

    /// Ends a request that [`Upstream::try_begin`] admitted.
    pub fn end(&self, begun: Begun) {
        if begun.counted {
            self.in_flight.give_back();
        }
    }

    /// Takes traffic now: healthy and its breaker not open.
    pub fn in_service(&self) -> bool {
        self.is_healthy() && !self.breaker.is_open()
    }

    pub fn http(&self) -> Option<&Http> {
        match &self.target {
            Target::Http(h) => Some(h),
            Target::Builtin => None,
        }
    }
}

/// A namespace: `/mcp` is `default`, `/mcp/{name}` is `name`.
#[derive(Debug)]
pub struct Namespace {
    pub name: String,
    pub upstreams: Vec<&'static Upstream>,
    /// `weight` of each of `upstreams` (in order): a setting of the view, not of the upstream,
    /// so a reload that changes a weight keeps the upstream.
    pub weights: Vec<u32>,
    /// Served by `builtin:echo` (never mixed with HTTP upstreams).
    pub builtin: bool,
}

impl Namespace {
    fn new(name: String, upstreams: Vec<&'static Upstream>, weights: Vec<u32>) -> Namespace {
        Namespace {
            weights,
            builtin: upstreams
                .iter()
                .all(|u| matches!(u.target, Target::Builtin)),
            name,
            upstreams,
        }
    }
}

/// One view of the namespaces and upstreams, with the `routing` settings: what a request
/// forwards by, from its start to its end. Made at startup and by each reload that changes
/// something (see [`registry`]); never changed.
#[derive(Debug)]
pub struct Upstreams {
    /// Counts the views: 0 at startup, one more per reload that changed something.
    pub generation: u64,
    /// Every upstream of the view, namespace by namespace.
    pub all: Vec<&'static Upstream>,
    pub namespaces: Vec<Namespace>,
    pub strategy: Strategy,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// `routing.pool_idle_timeout`: how long an idle connection stays in a core's pool.
    pub pool_idle_timeout: Duration,
    pub health_check_interval: Duration,
    /// `routing.forwarded_for`: requests carry the client's address in `X-Forwarded-For`.
    pub forwarded_for: bool,
    /// What each upstream of the view is set to when the view is published
    /// ([`Upstream::configure`]); kept here so that a reload changing only these is a change.
    settings: Settings,
}

/// The `routing` settings each upstream holds itself, changed in place by a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Settings {
    /// `circuit_breaker.failure_threshold`, `.success_threshold`, `.timeout_seconds`.
    failure_threshold: u32,
    success_threshold: u32,
    open_for: Duration,
    max_in_flight: usize,
}

impl Settings {
    fn of(r: &RoutingConfig) -> Settings {
        let cb = &r.circuit_breaker;
        Settings {
            failure_threshold: cb.failure_threshold,
            success_threshold: cb.success_threshold,
            open_for: secs(cb.timeout_seconds),
            max_in_flight: r.max_in_flight,
        }
    }
}

impl Upstreams {
    fn new(
        generation: u64,
        all: Vec<&'static Upstream>,
        namespaces: Vec<Namespace>,
        r: &RoutingConfig,
    ) -> Upstreams {
        Upstreams {
            generation,
            all,
            namespaces,
            strategy: r.strategy,
            connect_timeout: secs(r.connect_timeout),
            request_timeout: secs(r.request_timeout),
            pool_idle_timeout: secs(r.pool_idle_timeout),
            forwarded_for: r.forwarded_for,
            health_check_interval: secs(r.health_check_interval),
            settings: Settings::of(r),
        }
    }

    /// The same namespaces of the same upstreams with the same weights, and the same settings.
    fn same_as(&self, other: &Upstreams) -> bool {
        fn members(v: &Upstreams) -> Vec<(&str, Vec<usize>, &[u32])> {
            v.namespaces
                .iter()
                .map(|n| {
                    (
                        n.name.as_str(),
                        n.upstreams.iter().map(|u| u.index).collect(),
                        &n.weights[..],
                    )
                })
                .collect()
        }
        let settings = |v: &Upstreams| {
            (
                v.strategy,
                v.connect_timeout,
                v.request_timeout,
                v.pool_idle_timeout,
                v.health_check_interval,
                v.forwarded_for,
            )
        };
        members(self) == members(other)
            && settings(self) == settings(other)
            && self.settings == other.settings
    }

    /// True when requests to namespace `ns` name their client in `X-Forwarded-For`:
    /// `routing.forwarded_for` is on and the namespace has HTTP upstreams.
    pub fn forwards_client(&self, ns: usize) -> bool {
        self.forwarded_for && self.namespaces.get(ns).is_some_and(|n| !n.builtin)
    }

    /// The namespace index serving `name`.
    pub fn namespace(&self, name: &str) -> Option<usize> {
        self.namespaces.iter().position(|n| n.name == name)
    }

    /// The upstream of namespace `ns` that issued client-visible session id `id`, and the
    /// upstream's own id; `None` when no upstream of `ns` has the tag `id` starts with.
    pub fn session<'a>(&self, ns: usize, id: &'a [u8]) -> Option<(&'static Upstream, &'a [u8])> {
        if id.len() <= TAG_LEN {
            return None;
        }
        let (t, rest) = id.split_at(TAG_LEN);
        self.namespaces[ns]
            .upstreams
            .iter()
            .find(|u| u.tag == t)
            .map(|u| (*u, rest))
    }

    /// The upstream of namespace `ns` that now serves the sessions of `u` (an upstream of this
    /// view or an older one): `u` itself when a reload kept it, the one with its URL when a
    /// reload made it anew (a renewed CA file: the same server, so its sessions are still
    /// there), `None` when a reload removed it.
    pub fn successor(&self, ns: usize, u: &Upstream) -> Option<&'static Upstream> {
        self.namespaces
            .get(ns)?
            .upstreams
            .iter()
            .find(|m| m.tag == u.tag)
            .copied()
    }
}

/// FNV-1a over `namespace \0 url`, as 8 lowercase hex digits: stable across cores and restarts.
fn tag(namespace: &str, url: &str) -> [u8; TAG_LEN] {
    let mut h: u32 = 0x811c_9dc5;
    for b in namespace.bytes().chain([0]).chain(url.bytes()) {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    let mut out = [0u8; TAG_LEN];
    for (i, o) in out.iter_mut().enumerate() {
        *o = b"0123456789abcdef"[((h >> (28 - 4 * i)) & 0xf) as usize];
    }
    out
}

/// Why forwarding failed, as the client and the metrics see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The TCP connection to the upstream could not be opened (refused, unreachable).
    Connect,
    /// The TLS handshake with an `https://` upstream failed (its certificate not trusted or not
    /// for its name, no common protocol version, ...).
    Tls,
    /// Waiting for the response (or its next bytes, or room to send the request) took too long.
    Timeout,
    /// Connecting (the TLS handshake included) took longer than `connect_timeout`: nothing was
    /// sent (a host gone from the network, an upstream whose accept queue is full).
    ConnectTimeout,
    /// The upstream closed or reset the connection before its response was complete.
    Reset,
    /// The upstream's response was not valid HTTP/1.1.
    BadResponse,
    /// The upstream's breaker is open: failed fast, nothing sent.
    CircuitOpen,
    /// No upstream of the namespace is in service.
    NoUpstream,
    /// Every upstream that could take it is at `routing.max_in_flight`: nothing sent.
    Busy,
}

impl Failure {
    /// The upstream cannot be reached at all (refused, unreachable, or no TLS with it): a
    /// session pinned to it is gone.
    pub fn unreachable(self) -> bool {
        matches!(self, Failure::Connect | Failure::Tls)
    }

    /// The request did not reach the upstream (no connection to it was made): it may go to
    /// another one, whatever it is.
    pub fn nothing_sent(self) -> bool {
        self.unreachable() || self == Failure::ConnectTimeout
    }

    pub fn status(self) -> u16 {
        match self {
            Failure::Timeout | Failure::ConnectTimeout => 504,
            Failure::Busy => 503,
            _ => 502,
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Failure::Connect => "upstream MCP server refused or could not be reached",
            Failure::Tls => "TLS handshake with the upstream MCP server failed",
            Failure::Timeout => "upstream MCP server timed out",
            Failure::ConnectTimeout => "upstream MCP server could not be connected in time",
            Failure::Reset => "upstream MCP server closed the connection",
            Failure::BadResponse => "upstream MCP server sent an invalid response",
            Failure::CircuitOpen => "upstream MCP server is failing (circuit open)",
            Failure::NoUpstream => "no upstream MCP server is available",
            Failure::Busy => "upstream MCP server busy (routing.max_in_flight); retry shortly",
        }
    }
}

/// Outcome of one forwarded request, as the `outcome` label of the upstream metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok = 0,
    /// A response with a 5xx status (counts as a failure for the breaker).
    Http5xx = 1,
    ConnectError = 2,
    Timeout = 3,
    Reset = 4,
    BadResponse = 5,
    CircuitOpen = 6,
    /// Refused at `routing.max_in_flight`, nothing sent.
    Busy = 7,
    /// The TLS handshake failed.
    TlsError = 8,
}

impl Outcome {
    pub const COUNT: usize = 9;
    pub const LABELS: [&'static str; Outcome::COUNT] = [
        "ok",
        "http_5xx",
        "connect_error",
        "timeout",
        "reset",
        "bad_response",
        "circuit_open",
        "busy",
        "tls_error",
    ];

    pub fn of(f: Failure) -> Outcome {
        match f {
            Failure::Connect | Failure::NoUpstream => Outcome::ConnectError,
            Failure::Timeout | Failure::ConnectTimeout => Outcome::Timeout,
            Failure::Reset => Outcome::Reset,
            Failure::BadResponse => Outcome::BadResponse,
            Failure::CircuitOpen => Outcome::CircuitOpen,
            Failure::Busy => Outcome::Busy,
            Failure::Tls => Outcome::TlsError,
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::registry::Registry;
    use super::*;
    use crate::config::Config;

    #[test]
    fn tags_are_stable_hex_and_distinct() {
        let a = tag("default", "http://127.0.0.1:9001/mcp");
        assert_eq!(a, tag("default", "http://127.0.0.1:9001/mcp"));
        assert_ne!(a, tag("default", "http://127.0.0.1:9002/mcp"));
        assert_ne!(a, tag("other", "http://127.0.0.1:9001/mcp"));
        assert!(a.iter().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn a_host_name_is_resolved_again_and_followed_when_it_moves() {
        let yaml = "service_discovery:\n  static:\n    endpoints:\n      default:\n        - url: http://localhost:9001/mcp\n        - url: http://127.0.0.1:9002\n";
        let u = Registry::new(&Config::parse(yaml, false).unwrap())
            .unwrap()
            .leak()
            .current();
        let (named, literal) = (u.all[0].http().unwrap(), u.all[1].http().unwrap());
        let addr = |h: &Http| match &h.dest {
            Dest::Tcp(tcp) => tcp.addr(),
            Dest::Unix(_) => unreachable!("both upstreams are TCP"),
        };
        let start = addr(named);
        assert_eq!(start.port(), 9001);
        let other: SocketAddr = "10.9.9.9:9001".parse().unwrap();
        let moved: SocketAddr = "10.1.1.1:9001".parse().unwrap();
        // Still among the answers: kept (its pooled connections stay meaningful).
        let r = named.re_resolve(|host, port| {
            assert_eq!((host, port), ("localhost", 9001));
            Ok(vec![other, start])
        });
        assert_eq!((r, addr(named)), (Ok(None), start));
        // Gone from the answers: the first one is taken.
        let r = named.re_resolve(|_, _| Ok(vec![moved, other]));
        assert_eq!((r, addr(named)), (Ok(Some((start, moved))), moved));
        // A failed or empty answer keeps what is in use.
        let r = named.re_resolve(|_, _| Err(std::io::Error::other("no DNS")));
        assert_eq!(r, Err("cannot resolve localhost: no DNS".to_string()));
        let r = named.re_resolve(|_, _| Ok(vec![]));
        assert!(r.is_err());
        assert_eq!(addr(named), moved);
        // An address is not resolved at all.
        let r = literal.re_resolve(|_, _| panic!("an address needs no resolving"));
        assert_eq!(
            (r, addr(literal)),
            (Ok(None), "127.0.0.1:9002".parse().unwrap())
        );
    }

    #[test]
    fn session_ids_name_their_upstream() {
        let yaml = "service_discovery:\n  static:\n    endpoints:\n      default:\n        - url: http://127.0.0.1:9001/mcp\n        - url: http://127.0.0.1:9002\n";
        let config = Config::parse(yaml, false).unwrap();
        let u = Registry::new(&config).unwrap().leak().current();
        let second = &u.all[1];
        assert_eq!(second.http().unwrap().path, "/mcp");
        let mut id = second.tag.to_vec();
        id.extend_from_slice(b"abc-123");
        let (found, rest) = u.session(0, &id).unwrap();
        assert_eq!((found.index, rest), (1, &b"abc-123"[..]));
        assert!(u.session(0, b"deadbeefabc").is_none());
        assert!(
            u.session(0, &second.tag).is_none(),
            "a bare tag names no session"
        );
    }
}
