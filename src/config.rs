//! The gateway's configuration: a documented struct, every key with a default, unknown keys
//! rejected, and every semantic error reported at once with its key path.
//!
//! Files ending in `.toml` are read as TOML, everything else as YAML. A syntax error stops the
//! reading; otherwise every key that cannot be read (unknown, or of the wrong type: `read`) and
//! every bad value ([`Config::validate`]) is reported together, each with its path
//! (`server.max_connections: invalid type ...`). Times are seconds (fractions allowed); sizes
//! are bytes.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod read;
pub use read::MAX_PROBLEMS;

/// The whole file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub service_discovery: ServiceDiscovery,
    pub routing: RoutingConfig,
}

/// One entry of `server.per_ip_overrides`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerIpOverride {
    /// `a.b.c.d/len` or `v6::/len` (a bare address is a /32 or /128).
    pub network: String,
    /// The per-IP limit for addresses in `network`; 0: none.
    pub max_connections_per_ip: u64,
    /// Their request rate (bursts of one second's worth); absent: `server.max_requests_per_ip`;
    /// 0: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_ip: Option<u64>,
}

/// The error for a `key` whose value `v` is above `max`, if it is.
fn at_most(key: &str, v: u64, max: u64) -> Option<String> {
    (v > max).then(|| format!("{key}: {v} is above the largest supported value {max}"))
}

/// The error for a `key` whose value `v` is not an address or network.
fn not_a_network(key: &str, v: &str) -> String {
    format!("{key}: {v:?} is not an address or network (a.b.c.d/len, v6::/len)")
}

/// A parsed network: its first address and prefix length.
pub fn parse_network(s: &str) -> Option<(std::net::IpAddr, u8)> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (
            a.parse::<std::net::IpAddr>().ok()?,
            Some(l.parse::<u8>().ok()?),
        ),
        None => (s.parse::<std::net::IpAddr>().ok()?, None),
    };
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = len.unwrap_or(max);
    (len <= max).then_some((addr, len))
}

/// The `server` section: listeners, workers and limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address of the HTTP/WebSocket front door (and of the TCP door). `::` listens dual-stack.
    pub host: String,
    /// Port of the HTTP/WebSocket front door. 0 picks a free port (logged at startup).
    pub port: u16,
    /// Port of the MCPB framed-TCP front door; 0 disables it.
    pub tcp_port: u16,
    /// Address of the admin listener (`/metrics`, `/healthz`, `/ready`).
    pub metrics_host: String,
    /// Port of the admin listener; 0 picks a free port.
    pub metrics_port: u16,
    /// Worker runtimes, one per core when 0.
    pub workers: usize,
    /// Pin worker `i` to core `i` (modulo the number of cores).
    pub pin_workers: bool,
    /// I/O driver: `auto` (io_uring, else epoll), `io_uring` or `epoll`.
    pub driver: Driver,
    /// Concurrent connections over all front doors and cores.
    pub max_connections: usize,
    /// Concurrent connections from one client address; 0 disables the per-IP limit.
    pub max_connections_per_ip: u64,
    /// Requests (HTTP requests, WebSocket messages, MCPB frames) per second from one client
    /// address over all its connections; 0 disables the request rate limit.
    pub max_requests_per_ip: u64,
    /// Requests one address may send at once before the rate applies; 0 = one second's worth.
    pub request_burst_per_ip: u64,
    /// IPv6 clients count per network of this prefix length for the per-IP limits (128: per
    /// address; 64: per /64, what one subscriber usually holds).
    pub ipv6_prefix_len: u8,
    /// Networks whose addresses get their own `max_connections_per_ip` (a known corporate NAT,
    /// say); the first that holds the client's address applies.
    pub per_ip_overrides: Vec<PerIpOverride>,
    /// Networks of load balancers that start every connection with a PROXY protocol header (v1
    /// or v2) naming the client they relay; that client's address is then the one limited.
    /// Empty (the default): no header is read from anyone.
    pub proxy_protocol_networks: Vec<String>,
    /// Origins (`scheme://host[:port]`, `null`, or `*` for any) whose browser pages may call the
    /// HTTP door; a request with another `Origin` gets 403. Requests without one (clients that
    /// are not browsers) always pass, and so do loopback pages. Empty (the default): loopback
    /// pages only.
    pub allowed_origins: Vec<String>,
    /// PEM certificate chain (the server's certificate first): with `tls_key_file`, both client
    /// doors speak TLS (HTTPS and WSS on `port`, MCPB over TLS on `tcp_port`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file` (PKCS#8, PKCS#1 or SEC1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
    /// More certificates for the doors, each given to the clients that ask (SNI) for a name it
    /// covers; `tls_cert_file`'s is for every other client.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tls_certificates: Vec<DoorCertificate>,
    /// PEM file of certificate authorities: with it, every TLS client must present a
    /// certificate one of them issued (mutual TLS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_client_ca_file: Option<PathBuf>,
    /// Seconds a client may take to send a whole request once it has started one.
    pub read_timeout: f64,
    /// Seconds a response write may take.
    pub write_timeout: f64,
    /// Seconds a connection may sit idle between requests or messages.
    pub idle_timeout: f64,
    /// Park idle plain (not TLS) connections outside any task once they have waited a sweep or
    /// two, in the worker's epoll set: about 400 bytes of user-space memory fewer for an HTTP
    /// one, 600 for a WebSocket or MCPB session, 1 000 for an open event stream.
    pub park_idle_connections: bool,
    /// Seconds open connections get to finish after SIGTERM/SIGINT.
    pub shutdown_timeout: f64,
    /// Largest request body, WebSocket message or MCPB payload, in bytes.
    pub max_message_size: usize,
    /// One log line per request the HTTP door answers and per WebSocket/MCPB message forwarded
    /// (target `access`).
    pub access_log: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: "0.0.0.0".into(),
            port: 8080,
            tcp_port: 8444,
            metrics_host: "127.0.0.1".into(),
            metrics_port: 9090,
            workers: 0,
            pin_workers: true,
            driver: Driver::Auto,
            max_connections: 50_000,
            max_connections_per_ip: 1_000,
            max_requests_per_ip: 0,
            request_burst_per_ip: 0,
            ipv6_prefix_len: 128,
            per_ip_overrides: Vec::new(),
            proxy_protocol_networks: Vec::new(),
            allowed_origins: Vec::new(),
            tls_cert_file: None,
            tls_key_file: None,
            tls_certificates: Vec::new(),
            tls_client_ca_file: None,
            read_timeout: 30.0,
            write_timeout: 30.0,
            idle_timeout: 120.0,
            park_idle_connections: true,
            shutdown_timeout: 30.0,
            max_message_size: 1 << 20,
            access_log: false,
        }
    }
}

/// Which io driver the worker runtimes use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Driver {
    Auto,
    IoUring,
    Epoll,
}

/// `service_discovery`: where each namespace's upstream MCP servers are.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceDiscovery {
    #[serde(rename = "static")]
    pub static_: StaticDiscovery,
}

impl Default for ServiceDiscovery {
    fn default() -> Self {
        let mut endpoints = BTreeMap::new();
        endpoints.insert(
            "default".to_string(),
            vec![Endpoint {
                url: BUILTIN_ECHO.into(),
                weight: 1,
                tls_ca_file: None,
                tls_server_name: None,
                tls_cert_file: None,
                tls_key_file: None,
            }],
        );
        ServiceDiscovery {
            static_: StaticDiscovery { endpoints },
        }
    }
}

/// `service_discovery.static`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StaticDiscovery {
    /// Namespace name to its upstreams. `/mcp` is the `default` namespace, `/mcp/{ns}` is `ns`.
    pub endpoints: BTreeMap<String, Vec<Endpoint>>,
}

/// The URL of the MCP server built into the gateway.
pub const BUILTIN_ECHO: &str = "builtin:echo";

/// One upstream MCP server.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    pub url: String,
    #[serde(default = "one")]
    pub weight: u32,
    /// `https` upstreams: a PEM file of the certificate authorities to trust for this upstream
    /// instead of the bundled Mozilla roots (a private CA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
    /// `https` upstreams: the name sent in SNI and checked against the certificate instead of
    /// the URL's host (an upstream reached by address whose certificate names a host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_server_name: Option<String>,
    /// `https` upstreams that ask for a client certificate (mutual TLS): the PEM certificate
    /// chain the gateway presents, with `tls_key_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    /// The PEM private key of `tls_cert_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
}

impl Endpoint {
    /// The certificate and key it presents to its upstream, when both are set.
    pub fn identity(&self) -> Option<(&std::path::Path, &std::path::Path)> {
        Some((
            self.tls_cert_file.as_deref()?,
            self.tls_key_file.as_deref()?,
        ))
    }
}

fn one() -> u32 {
    1
}

/// `server.tls_certificates[i]`: a certificate of the doors (PEM chain and key).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DoorCertificate {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// `routing`: how a namespace's upstreams share the traffic, and how long they may take.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingConfig {
    pub strategy: Strategy,
    /// Seconds between active health checks of each upstream.
    pub health_check_interval: f64,
    /// Seconds to open a TCP connection to an upstream (504 beyond).
    pub connect_timeout: f64,
    /// Seconds an upstream may take to start its response, and to send each next piece of a
    /// non-streaming body (504 beyond). Event streams (`text/event-stream`) may be silent longer.
    pub request_timeout: f64,
    /// Tell upstreams the client's address in `X-Forwarded-For` (appended to the client's own).
    pub forwarded_for: bool,
    /// Requests in flight to one upstream, all cores together (a client's standalone `GET`
    /// stream not counted), beyond which it gets no more (`503` when no other upstream can take
    /// the request); 0: no limit.
    pub max_in_flight: usize,
    pub circuit_breaker: CircuitBreakerConfig,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            strategy: Strategy::RoundRobin,
            health_check_interval: 10.0,
            connect_timeout: 5.0,
            request_timeout: 30.0,
            forwarded_for: true,
            max_in_flight: 0,
            circuit_breaker: CircuitBreakerConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    RoundRobin,
    LeastConnections,
    Weighted,
}

/// `routing.circuit_breaker`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CircuitBreakerConfig {
    pub failure_threshold: u32,
    pub success_threshold: u32,
    pub timeout_seconds: f64,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        CircuitBreakerConfig {
            failure_threshold: 5,
            success_threshold: 2,
            timeout_seconds: 30.0,
        }
    }
}

/// A configuration that could not be used: every problem, each with its key path.
#[derive(Debug)]
pub struct ConfigError {
    pub source: String,
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration {}:", self.source)?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads and validates `path` (TOML when it ends in `.toml`, YAML otherwise).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let source = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source: source.clone(),
            problems: vec![format!("cannot read file: {e}")],
        })?;
        let toml = path.extension().is_some_and(|e| e == "toml");
        Config::parse(&text, toml).map_err(|problems| ConfigError { source, problems })
    }

    /// Parses and validates a document: every problem at once (see `read`).
    pub fn parse(text: &str, toml: bool) -> Result<Config, Vec<String>> {
        read::read(text, toml)
    }

    /// Every semantic problem at once, each naming its key.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut p = Vec::new();
        let s = &self.server;
        if s.max_connections == 0 {
            p.push("server.max_connections: must be at least 1".into());
        }
        p.extend(at_most(
            "server.max_connections",
            s.max_connections as u64,
            1 << 30,
        ));
        p.extend(at_most(
            "server.max_requests_per_ip",
            s.max_requests_per_ip,
            crate::limiter::rate::MAX_RATE,
        ));
        if s.max_requests_per_ip > 0 && s.max_connections_per_ip == 0 {
            p.push(
                "server.max_requests_per_ip: needs server.max_connections_per_ip above 0 \
                 (the per-IP table keeps each address's rate)"
                    .into(),
            );
        }
        if !(1..=128).contains(&s.ipv6_prefix_len) {
            p.push(format!(
                "server.ipv6_prefix_len: {} is not a prefix length (1 to 128)",
                s.ipv6_prefix_len
            ));
        }
        for (i, o) in s.per_ip_overrides.iter().enumerate() {
            let key = format!("server.per_ip_overrides[{i}]");
            match parse_network(&o.network) {
                None => p.push(not_a_network(&format!("{key}.network"), &o.network)),
                // IPv6 clients are counted per ipv6_prefix_len network: an override inside one
                // would give addresses that share a count different limits.
                Some((net, len)) if net.is_ipv6() && len > s.ipv6_prefix_len => p.push(format!(
                    "{key}.network: {:?} is narrower than server.ipv6_prefix_len ({}), \
                         the network IPv6 clients are counted by",
                    o.network, s.ipv6_prefix_len
                )),
                Some(_) => {}
            }
            p.extend(at_most(
                &format!("{key}.max_connections_per_ip"),
                o.max_connections_per_ip,
                crate::limiter::ip_table::MAX_COUNT,
            ));
            p.extend(at_most(
                &format!("{key}.max_requests_per_ip"),
                o.max_requests_per_ip.unwrap_or(0),
                crate::limiter::rate::MAX_RATE,
            ));
        }
        p.extend(at_most(
            "server.per_ip_overrides: entries",
            s.per_ip_overrides.len() as u64,
            1_000,
        ));
        for (i, n) in s.proxy_protocol_networks.iter().enumerate() {
            if parse_network(n).is_none() {
                p.push(not_a_network(
                    &format!("server.proxy_protocol_networks[{i}]"),
                    n,
                ));
            }
        }
        p.extend(at_most(
            "server.proxy_protocol_networks: entries",
            s.proxy_protocol_networks.len() as u64,
            1_000,
        ));
        for (i, o) in s.allowed_origins.iter().enumerate() {
            if !crate::http::origin::valid(o) {
                p.push(format!(
                    "server.allowed_origins[{i}]: {o:?} is not an origin \
                     (scheme://host[:port] without a path, \"null\" or \"*\")"
                ));
            }
        }
        for (key, set) in [
            ("tls_client_ca_file", s.tls_client_ca_file.is_some()),
            ("tls_certificates", !s.tls_certificates.is_empty()),
        ] {
            if set && s.tls_cert_file.is_none() {
                p.push(format!(
                    "server.{key}: needs server.tls_cert_file (TLS on the doors)"
                ));
            }
        }
        match (&s.tls_cert_file, &s.tls_key_file) {
            (Some(_), Some(_)) => {
                if let Err(why) = crate::tls::door_config(s) {
                    p.push(why);
                }
            }
            (Some(_), None) => {
                p.push("server.tls_key_file: needed with server.tls_cert_file".into())
            }
            (None, Some(_)) => {
                p.push("server.tls_cert_file: needed with server.tls_key_file".into())
            }
            (None, None) => {}
        }
        if !s.per_ip_overrides.is_empty() && s.max_connections_per_ip == 0 {
            p.push(
                "server.per_ip_overrides: needs server.max_connections_per_ip above 0 \
                 (without the per-IP table there is no per-IP limit to override)"
                    .into(),
            );
        }
        if s.request_burst_per_ip > 0 && s.max_requests_per_ip == 0 {
            p.push("server.request_burst_per_ip: set without server.max_requests_per_ip".into());
        }
        p.extend(at_most(
            "server.max_connections_per_ip",
            s.max_connections_per_ip,
            crate::limiter::ip_table::MAX_COUNT,
        ));
        for (key, v) in [
            ("server.read_timeout", s.read_timeout),
            ("server.write_timeout", s.write_timeout),
            ("server.idle_timeout", s.idle_timeout),
            ("server.shutdown_timeout", s.shutdown_timeout),
            (
                "routing.health_check_interval",
                self.routing.health_check_interval,
            ),
            ("routing.connect_timeout", self.routing.connect_timeout),
            ("routing.request_timeout", self.routing.request_timeout),
            (
                "routing.circuit_breaker.timeout_seconds",
                self.routing.circuit_breaker.timeout_seconds,
            ),
        ] {
            if !(v.is_finite() && v > 0.0 && v <= 86_400.0 * 365.0) {
                p.push(format!("{key}: {v} is not a positive number of seconds"));
            }
        }
        if !(64..=crate::mcpb::MAX_PAYLOAD).contains(&s.max_message_size) {
            p.push(format!(
                "server.max_message_size: {} must be between 64 and {} bytes",
                s.max_message_size,
                crate::mcpb::MAX_PAYLOAD
            ));
        }
        for (key, host) in [
            ("server.host", &s.host),
            ("server.metrics_host", &s.metrics_host),
        ] {
            if host.parse::<std::net::IpAddr>().is_err() {
                p.push(format!("{key}: {host:?} is not an IP address"));
            }
        }
        if s.tcp_port != 0 && s.tcp_port == s.port && s.port != 0 {
            p.push("server.tcp_port: must differ from server.port".into());
        }
        // The admin listener shares no port with a door whose address overlaps its own (the
        // same address, or either a wildcard): binding would fail at startup.
        let overlap = match (
            s.host.parse::<std::net::IpAddr>(),
            s.metrics_host.parse::<std::net::IpAddr>(),
        ) {
            (Ok(a), Ok(b)) => a.is_unspecified() || b.is_unspecified() || a == b,
            _ => false, // reported above
        };
        for (key, port) in [("server.port", s.port), ("server.tcp_port", s.tcp_port)] {
            if s.metrics_port != 0 && s.metrics_port == port && overlap {
                p.push(format!("server.metrics_port: must differ from {key}"));
            }
        }
        if s.workers > 4096 {
            p.push(format!("server.workers: {} is more than 4096", s.workers));
        }
        let cb = &self.routing.circuit_breaker;
        for (key, v) in [
            (
                "routing.circuit_breaker.failure_threshold",
                cb.failure_threshold,
            ),
            (
                "routing.circuit_breaker.success_threshold",
                cb.success_threshold,
            ),
        ] {
            if v == 0 {
                p.push(format!("{key}: must be at least 1"));
            }
        }
        let endpoints = &self.service_discovery.static_.endpoints;
        if endpoints.is_empty() {
            p.push("service_discovery.static.endpoints: at least one namespace is needed".into());
        }
        for (ns, list) in endpoints {
            let key = format!("service_discovery.static.endpoints.{ns}");
            if ns.is_empty()
                || !ns
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                p.push(format!(
                    "{key}: a namespace is letters, digits, '-', '_' or '.'"
                ));
            }
            if list.is_empty() {
                p.push(format!("{key}: needs at least one endpoint"));
            }
            let builtin = list.iter().filter(|e| e.url == BUILTIN_ECHO).count();
            if builtin > 0 && builtin < list.len() {
                p.push(format!(
                    "{key}: {BUILTIN_ECHO} cannot share a namespace with HTTP upstreams"
                ));
            }
            for (i, e) in list.iter().enumerate() {
                let tls = if e.url == BUILTIN_ECHO {
                    false
                } else {
                    match UpstreamUrl::parse(&e.url) {
                        Ok(u) => u.tls,
                        Err(why) => {
                            p.push(format!("{key}[{i}].url: {:?}: {why}", e.url));
                            true // its TLS keys are not the problem
                        }
                    }
                };
                for (name, set) in [
                    ("tls_ca_file", e.tls_ca_file.is_some()),
                    ("tls_server_name", e.tls_server_name.is_some()),
                    ("tls_cert_file", e.tls_cert_file.is_some()),
                    ("tls_key_file", e.tls_key_file.is_some()),
                ] {
                    if set && !tls {
                        p.push(format!("{key}[{i}].{name}: only for https:// upstreams"));
                    }
                }
                if let Some(f) = &e.tls_ca_file {
                    if let Err(why) = crate::tls::read_roots(f) {
                        p.push(format!("{key}[{i}].tls_ca_file: {why}"));
                    }
                }
                match (&e.tls_cert_file, &e.tls_key_file, e.identity()) {
                    (_, _, Some(identity)) if tls => {
                        if let Err(why) = crate::tls::client_config(None, Some(identity)) {
                            p.push(format!("{key}[{i}].tls_cert_file, tls_key_file: {why}"));
                        }
                    }
                    (Some(_), None, _) => p.push(format!(
                        "{key}[{i}].tls_key_file: needed with tls_cert_file"
                    )),
                    (None, Some(_), _) => p.push(format!(
                        "{key}[{i}].tls_cert_file: needed with tls_key_file"
                    )),
                    _ => {}
                }
                if let Some(n) = &e.tls_server_name {
                    if let Err(why) = crate::tls::server_name(n) {
                        p.push(format!("{key}[{i}].tls_server_name: {why}"));
                    }
                }
                if e.weight == 0 {
                    p.push(format!("{key}[{i}].weight: must be at least 1"));
                }
                if list[..i].iter().any(|earlier| earlier.url == e.url) {
                    p.push(format!("{key}[{i}].url: {:?} is listed twice", e.url));
                }
            }
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(p)
        }
    }

    /// The effective configuration as YAML (for `mcp-gateway check`).
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("a Config always serializes")
    }
}

/// An `http://host[:port][/path]` or `https://...` upstream URL, split into what a request
/// needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    /// `host[:port]` as written, for the `Host` header (a default port is left out, as
    /// clients do).
    pub authority: String,
    /// The host alone (brackets of an IPv6 address removed): what is resolved, and the TLS
    /// server name by default.
    pub host: String,
    /// The port (80 or 443 unless written).
    pub port: u16,
    /// Request target prefix; `/mcp` when the URL has no path.
    pub path: String,
    /// `https`: the connection is TLS.
    pub tls: bool,
}

impl UpstreamUrl {
    pub fn parse(url: &str) -> Result<UpstreamUrl, String> {
        let (rest, tls) = match url.split_once("://") {
            Some(("http", rest)) => (rest, false),
            Some(("https", rest)) => (rest, true),
            _ => {
                return Err(format!(
                    "expected http://host:port/path, https://host:port/path or {BUILTIN_ECHO}"
                ))
            }
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/mcp"),
        };
        if authority.is_empty()
            || authority.contains(['@', '?', '#', ' '])
            || path.contains(['?', '#', ' '])
        {
            return Err("expected http://host:port/path (no user info, query or fragment)".into());
        }
        // An IPv6 address in brackets, or a name or IPv4 address; then `:port`, if any.
        let (host, port) = match authority.strip_prefix('[') {
            Some(inner) => {
                let Some((ip, after)) = inner.split_once(']') else {
                    return Err("an IPv6 address needs its closing `]`".into());
                };
                if ip.parse::<std::net::Ipv6Addr>().is_err() {
                    return Err(format!("{ip:?} between `[` and `]` is not an IPv6 address"));
                }
                match after {
                    "" => (ip, None),
                    _ => match after.strip_prefix(':') {
                        Some(p) => (ip, Some(p)),
                        None => return Err("expected `:port` after the `]`".into()),
                    },
                }
            }
            None => match authority.split_once(':') {
                Some((host, p)) => (host, Some(p)),
                None => (authority, None),
            },
        };
        let port = match port {
            None => {
                if tls {
                    443
                } else {
                    80
                }
            }
            Some(p) if p.bytes().all(|b| b.is_ascii_digit()) => match p.parse::<u16>() {
                Ok(n) if n > 0 => n,
                _ => return Err("the port is not a number from 1 to 65535".into()),
            },
            // `h::1`, `::1`: more than one colon outside brackets.
            Some(p) if p.contains(':') && !authority.starts_with('[') => {
                return Err("an IPv6 address is written in brackets: [::1]".into())
            }
            Some(_) => return Err("the port is not a number from 1 to 65535".into()),
        };
        if host.is_empty() {
            return Err("expected a host before the port".into());
        }
        if !authority.starts_with('[')
            && !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        {
            return Err(format!("{host:?} is not a host name or IPv4 address"));
        }
        Ok(UpstreamUrl {
            authority: authority.to_string(),
            host: host.to_string(),
            port,
            path: path.to_string(),
            tls,
        })
    }
}

/// Seconds from the file as a `Duration`.
pub fn secs(v: f64) -> Duration {
    Duration::from_secs_f64(v)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn empty_document_is_all_defaults() {
        let c = Config::parse("", false).unwrap();
        assert_eq!(c.server.max_connections, 50_000);
        assert_eq!(c.server.max_connections_per_ip, 1_000);
        assert_eq!(c.server.port, 8080);
        assert_eq!(c.server.tcp_port, 8444);
        assert_eq!(c.server.metrics_port, 9090);
        assert_eq!(
            c.service_discovery.static_.endpoints["default"][0].url,
            BUILTIN_ECHO
        );
    }

    #[test]
    fn unknown_key_is_named_with_its_path() {
        let e = Config::parse("server:\n  max_conections: 5\n", false).unwrap_err();
        assert!(
            e[0].starts_with("server.max_conections: unknown field, expected one of `host`"),
            "{e:?}"
        );
    }

    #[test]
    fn bad_type_is_named_with_its_path() {
        let e = Config::parse("server:\n  max_connections: lots\n", false).unwrap_err();
        assert!(
            e[0].starts_with("server.max_connections: invalid type"),
            "{e:?}"
        );
    }

    #[test]
    fn the_request_rate_needs_the_per_ip_table_and_a_sane_value() {
        let e = Config::parse(
            "server:\n  max_connections_per_ip: 0\n  max_requests_per_ip: 5\n",
            false,
        )
        .unwrap_err();
        assert!(
            e[0].starts_with("server.max_requests_per_ip: needs"),
            "{e:?}"
        );
        let e = Config::parse("server:\n  max_requests_per_ip: 2000000\n", false).unwrap_err();
        assert!(e[0].contains("above the largest supported value"), "{e:?}");
        let e = Config::parse(
            "server:\n  per_ip_overrides:\n    - network: 10.0.0.0/40\n      max_connections_per_ip: 5\n",
            false,
        )
        .unwrap_err();
        assert!(
            e[0].starts_with("server.per_ip_overrides[0].network: \"10.0.0.0/40\" is not"),
            "{e:?}"
        );
        let e = Config::parse(
            "server:\n  ipv6_prefix_len: 64\n  per_ip_overrides:\n    - network: 2001:db8::5\n      max_connections_per_ip: 5\n    - network: 2001:db8::/48\n      max_connections_per_ip: 5\n",
            false,
        )
        .unwrap_err();
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("server.per_ip_overrides[0].network: \"2001:db8::5\" is narrower"),
            "{e:?}"
        );
        assert_eq!(
            parse_network("10.1.0.0/16"),
            Some(("10.1.0.0".parse().unwrap(), 16))
        );
        assert_eq!(
            parse_network("2001:db8::"),
            Some(("2001:db8::".parse().unwrap(), 128))
        );
        assert_eq!(parse_network("10.0.0.1/x"), None);
        let e = Config::parse(
            "server:\n  proxy_protocol_networks: [10.0.0.0/8, lb.example]\n",
            false,
        )
        .unwrap_err();
        assert_eq!(
            e,
            [
                "server.proxy_protocol_networks[1]: \"lb.example\" is not an address or network \
              (a.b.c.d/len, v6::/len)"
            ]
        );
        let c = Config::parse(
            "server:\n  proxy_protocol_networks: [10.0.0.0/8, \"fd00::/8\", 192.0.2.10]\n",
            false,
        )
        .unwrap();
        assert_eq!(c.server.proxy_protocol_networks.len(), 3);
        let e = Config::parse(
            "server:\n  allowed_origins: [\"https://a.example/\", \"*\", \"null\", \"http://localhost:6274\"]\n",
            false,
        )
        .unwrap_err();
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("server.allowed_origins[0]: \"https://a.example/\" is not an origin"),
            "{e:?}"
        );
        let e = Config::parse("server:\n  ipv6_prefix_len: 0\n", false).unwrap_err();
        assert!(
            e[0].starts_with("server.ipv6_prefix_len: 0 is not"),
            "{e:?}"
        );
        let e = Config::parse("server:\n  request_burst_per_ip: 5\n", false).unwrap_err();
        assert!(e[0].starts_with("server.request_burst_per_ip:"), "{e:?}");
        let c = Config::parse(
            "server:\n  max_requests_per_ip: 20\n  request_burst_per_ip: 50\n",
            false,
        )
        .unwrap();
        assert_eq!(
            (c.server.max_requests_per_ip, c.server.request_burst_per_ip),
            (20, 50)
        );
    }

    #[test]
    fn every_bad_value_is_reported_at_once() {
        let e = Config::parse(
            "server:\n  max_connections: 0\n  idle_timeout: -1\n  driver: auto\n",
            false,
        )
        .unwrap_err();
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[0].contains("server.max_connections"));
        assert!(e[1].contains("server.idle_timeout"));
    }

    #[test]
    fn the_admin_port_shares_no_door_port_on_an_overlapping_address() {
        let errors = |server: &str| {
            Config::parse(&format!("server:\n{server}"), false)
                .err()
                .unwrap_or_default()
        };
        // The defaults: doors on 0.0.0.0, the admin port on 127.0.0.1.
        assert_eq!(
            errors("  port: 9090\n"),
            ["server.metrics_port: must differ from server.port"]
        );
        assert_eq!(
            errors("  tcp_port: 9090\n"),
            ["server.metrics_port: must differ from server.tcp_port"]
        );
        // Different addresses, neither a wildcard: both bind.
        assert!(errors("  host: 10.0.0.5\n  port: 9090\n").is_empty());
    }

    #[test]
    fn toml_reads_the_same_keys() {
        let c = Config::parse(
            "[server]\nmax_connections = 10\nmax_connections_per_ip = 0\n",
            true,
        )
        .unwrap();
        assert_eq!(
            (c.server.max_connections, c.server.max_connections_per_ip),
            (10, 0)
        );
        let e = Config::parse("[server]\nbogus = 1\n", true).unwrap_err();
        assert!(e[0].starts_with("server.bogus: unknown field"), "{e:?}");
    }

    #[test]
    fn upstream_urls_are_checked_with_their_key() {
        let u = UpstreamUrl::parse("http://127.0.0.1:9000/mcp/x").unwrap();
        assert_eq!(
            (u.authority.as_str(), u.path.as_str()),
            ("127.0.0.1:9000", "/mcp/x")
        );
        // `Host` is the authority as written: a default port is not added.
        let u = UpstreamUrl::parse("http://mcp.internal").unwrap();
        assert_eq!(
            (u.authority.as_str(), u.port, u.path.as_str()),
            ("mcp.internal", 80, "/mcp")
        );
        let u = UpstreamUrl::parse("http://[::1]").unwrap();
        assert_eq!(
            (u.authority.as_str(), u.host.as_str(), u.port),
            ("[::1]", "::1", 80)
        );
        let u = UpstreamUrl::parse("http://[::1]:81/").unwrap();
        assert_eq!((u.authority.as_str(), u.port), ("[::1]:81", 81));
        let u = UpstreamUrl::parse("https://mcp.example.com/v1/mcp").unwrap();
        assert_eq!(
            (
                u.authority.as_str(),
                u.host.as_str(),
                u.port,
                u.path.as_str(),
                u.tls
            ),
            ("mcp.example.com", "mcp.example.com", 443, "/v1/mcp", true)
        );
        let u = UpstreamUrl::parse("https://[::1]:8443").unwrap();
        assert_eq!(
            (u.authority.as_str(), u.host.as_str(), u.port),
            ("[::1]:8443", "::1", 8443)
        );
        assert!(!UpstreamUrl::parse("http://h").unwrap().tls);
        for bad in [
            "ftp://x",
            "https://:443/",
            "http://",
            "http://x:0/",
            "http://x:99999/",
            "http://u@x/",
            "http://x/?q",
            "http://[::1",
            "http://[::1]x/",
            "http://[::1]:/",
            "http://[nope]:80/",
            "http://::1/",
            "http://h::80/",
            "http://x:+80/",
            "http://ex%61mple/",
            "http://[]/",
        ] {
            assert!(UpstreamUrl::parse(bad).is_err(), "{bad}");
        }
        let yaml = "service_discovery:\n  static:\n    endpoints:\n      default:\n        - url: builtin:echo\n        - url: http://127.0.0.1:1/mcp\n      x:\n        - url: ftp://h/mcp\n";
        let e = Config::parse(yaml, false).unwrap_err();
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(
            e[0].starts_with(
                "service_discovery.static.endpoints.default: builtin:echo cannot share"
            ),
            "{e:?}"
        );
        assert!(
            e[1].starts_with(
                "service_discovery.static.endpoints.x[0].url: \"ftp://h/mcp\": expected http://"
            ),
            "{e:?}"
        );
        // One server listed twice in a namespace would be two upstreams with the same labels.
        let twice = "service_discovery:\n  static:\n    endpoints:\n      default:\n        - url: http://h/mcp\n        - url: http://h/mcp\n";
        assert_eq!(
            Config::parse(twice, false).unwrap_err(),
            ["service_discovery.static.endpoints.default[1].url: \"http://h/mcp\" is listed twice"]
        );
    }

    #[test]
    fn bundled_configs_are_valid() {
        for (file, global, per_ip) in [
            ("gateway.yaml", 50_000, 1_000),
            ("development.yaml", 1_000, 100),
            ("enterprise.yaml", 50_000, 5_000),
            ("public.yaml", 10_000, 50),
        ] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("config")
                .join(file);
            let c = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(c.server.max_connections, global, "{file}");
            assert_eq!(c.server.max_connections_per_ip, per_ip, "{file}");
        }
    }
}
