//! The gateway's configuration: a documented struct, every key with a default, unknown keys
//! rejected, and every problem reported at once with its key path.
//!
//! Files ending in `.toml` are read as TOML, everything else as YAML. A syntax error stops the
//! reading; otherwise every key that cannot be read (unknown, or of the wrong type: `read`) and
//! every bad value ([`Config::validate`], in `validate`) is reported together, each with its
//! path (`server.max_connections: invalid type ...`). Upstream URLs are split by `url`. Times
//! are seconds (fractions allowed); sizes are bytes.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod read;
mod url;
mod validate;

pub use read::MAX_PROBLEMS;
pub use url::UpstreamUrl;

/// The whole file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub service_discovery: ServiceDiscovery,
    pub routing: RoutingConfig,
}

/// One entry of `server.per_ip_overrides`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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

impl PerIpOverride {
    /// The entry as the limiter takes it; the entry was validated ([`Config::validate`]).
    pub fn limits(&self) -> crate::limiter::PerIpLimits {
        let (network, prefix_len) = parse_network(&self.network).expect("a validated network");
        crate::limiter::PerIpLimits {
            network,
            prefix_len,
            max_connections: self.max_connections_per_ip,
            max_requests: self.max_requests_per_ip,
        }
    }
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
    /// New connections per second from one client address, all doors together (addresses of
    /// `per_ip_overrides` networks excepted); 0 disables the connection rate limit.
    pub max_new_connections_per_ip: u64,
    /// Connections one address may open at once before that rate applies; 0 = one second's
    /// worth.
    pub new_connection_burst_per_ip: u64,
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
            max_new_connections_per_ip: 0,
            new_connection_burst_per_ip: 0,
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
                host_header: None,
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
    /// The `Host` its requests (and health checks) name instead of the URL's `host[:port]`
    /// (`localhost` for a Unix socket): an upstream reached by address behind something that
    /// routes by host name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_header: Option<String>,
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
    /// Seconds an idle upstream connection is kept in a core's pool for reuse; one the upstream
    /// closed (at its own keep-alive timeout) is let go within a sweeper tick whatever this says.
    pub pool_idle_timeout: f64,
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
            pool_idle_timeout: 60.0,
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

    /// The effective configuration as YAML (for `mcp-gateway check`).
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("a Config always serializes")
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
    fn the_connection_rate_needs_the_per_ip_table_and_a_sane_value() {
        let e = Config::parse(
            "server:\n  max_connections_per_ip: 0\n  max_new_connections_per_ip: 5\n  new_connection_burst_per_ip: 9\n",
            false,
        )
        .unwrap_err();
        assert!(
            e[0].starts_with(
                "server.max_new_connections_per_ip: needs server.max_connections_per_ip"
            ),
            "{e:?}"
        );
        let e =
            Config::parse("server:\n  max_new_connections_per_ip: 2000000\n", false).unwrap_err();
        assert!(
            e[0].starts_with("server.max_new_connections_per_ip:"),
            "{e:?}"
        );
        let e = Config::parse("server:\n  new_connection_burst_per_ip: 5\n", false).unwrap_err();
        assert!(
            e[0].starts_with("server.new_connection_burst_per_ip: set without"),
            "{e:?}"
        );
        let c = Config::parse("server:\n  max_new_connections_per_ip: 20\n", false).unwrap();
        assert_eq!(c.server.max_new_connections_per_ip, 20);
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
