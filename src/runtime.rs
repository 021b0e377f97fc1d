//! Process start and stop: the open-file limit, the listeners, one pinned worker thread per core,
//! the admin thread, and the signal-driven shutdown.
//!
//! Owns the process lifecycle:
//! 1. raise the open-file soft limit to the hard limit, warn when `max_connections` cannot be
//!    reached with it;
//! 2. pick the driver (`auto`: io_uring when the kernel offers it, else epoll, said once);
//! 3. bind every listener before any worker starts: one `SO_REUSEPORT` socket per worker for the
//!    HTTP port and for the TCP port (port 0 is resolved by the first and reused by the rest), so
//!    a bad address fails startup instead of one worker; warn when another process's socket
//!    already listens there (`SO_REUSEPORT` then silently shares the connections with it);
//! 4. start the workers and wait until each has built its runtime, then report ready;
//! 5. on SIGTERM or SIGINT: tell every worker to stop accepting and drain for up to
//!    `shutdown_timeout`, join them, exit 0.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::mpsc;

use nix::sys::signal::{SigSet, Signal};
use socket2::{Domain, Protocol, Socket, Type};

use crate::admin;
use crate::config::{Config, Driver};
use crate::limiter::Limiter;
use crate::metrics::{describe_limits, Metrics};
use crate::upstream::{self, registry::Registry};
use crate::worker::{self, Listeners, Settings, Shared, Worker};

/// Runs the gateway until SIGTERM/SIGINT. Errors are startup failures.
/// `file`: where `config` came from, re-read on SIGHUP (`None`: built-in defaults, nothing to
/// re-read).
pub fn run(config: Config, file: Option<&std::path::Path>) -> io::Result<()> {
    let s = &config.server;
    let nofile = raise_nofile_limit();
    let workers = match s.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let driver = choose_driver(s.driver)?;
    crate::logging::set_access_log(s.access_log);

    let host: IpAddr = s.host.parse().map_err(|_| invalid("server.host"))?;
    let http = bind_group(SocketAddr::new(host, s.port), workers)?;
    let tcp = match s.tcp_port {
        0 => None,
        port => Some(bind_group(SocketAddr::new(host, port), workers)?),
    };
    let metrics_host: IpAddr = s
        .metrics_host
        .parse()
        .map_err(|_| invalid("server.metrics_host"))?;
    let admin_listener = std::net::TcpListener::bind(SocketAddr::new(metrics_host, s.metrics_port))
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("admin listener {metrics_host}:{}: {e}", s.metrics_port),
            )
        })?;

    let overrides: Vec<_> = s.per_ip_overrides.iter().map(|o| o.limits()).collect();
    let limiter = Limiter::new(s.max_connections, s.max_connections_per_ip)
        .with_request_rate(s.max_requests_per_ip, s.request_burst_per_ip)
        .with_connection_rate(s.max_new_connections_per_ip, s.new_connection_burst_per_ip)
        .with_ipv6_prefix(s.ipv6_prefix_len)
        .with_per_ip_overrides(&overrides)
        .leak();
    let upstreams = Registry::new(&config)?.leak();
    let metrics = Metrics::new(workers, limiter, upstreams).leak();
    let shared: &'static Shared = Box::leak(Box::new(Shared {
        settings: Settings::new(s).map_err(std::io::Error::other)?,
        limiter,
        metrics,
        upstreams,
    }));

    let descriptors = Descriptors {
        limit: nofile,
        workers,
    };
    tracing::info!(
        workers,
        driver = driver.label(),
        pinned = s.pin_workers,
        park_idle = s.park_idle_connections,
        limits = %describe_limits(limiter),
        open_file_limit = nofile,
        "mcp-gateway starting"
    );
    if !s.proxy_protocol_networks.is_empty() {
        tracing::info!(
            networks = %s.proxy_protocol_networks.join(", "),
            "connections from these networks must start with a PROXY protocol header; the client it names is the one limited"
        );
    }
    descriptors.check(limiter.max_connections(), upstreams.current());

    // Workers inherit this mask, so the signals reach only the main thread's sigwait.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGHUP);
    signals.thread_block().map_err(io::Error::from)?;

    let http_addr = http[0].local_addr()?;
    let tcp_addr = tcp.as_ref().map(|t| t[0].local_addr()).transpose()?;
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let (started_tx, started_rx) = mpsc::channel::<io::Result<()>>();
    let mut stops = Vec::with_capacity(workers);
    let mut threads = Vec::with_capacity(workers);
    let mut tcp_listeners = tcp.map(|v| v.into_iter());
    for (index, http) in http.into_iter().enumerate() {
        let listeners = Listeners {
            http,
            tcp: tcp_listeners.as_mut().and_then(|t| t.next()),
        };
        let (stop_tx, stop_rx) = futures_channel::oneshot::channel();
        stops.push(stop_tx);
        let core = (s.pin_workers && !cores.is_empty()).then(|| cores[index % cores.len()]);
        let started = started_tx.clone();
        let thread = std::thread::Builder::new()
            .name(format!("mcp-worker-{index}"))
            .spawn(move || {
                if let Some(core) = core {
                    if !core_affinity::set_for_current(core) {
                        tracing::warn!(worker = index, core = core.id, "could not pin worker");
                    }
                }
                let worker = Worker::new(index, shared);
                let result = run_worker(driver, worker, listeners, stop_rx, &started);
                if let Err(e) = &result {
                    tracing::error!(worker = index, error = %e, "worker failed");
                }
                result
            })?;
        threads.push(thread);
    }
    drop(started_tx);
    for _ in 0..workers {
        match started_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(io::Error::other("a worker exited during startup")),
        }
    }
    let admin_addr = admin_listener.local_addr()?;
    admin::spawn(admin_listener, metrics)?;
    upstream::health::spawn(upstreams)?;
    admin::READY.store(true, Ordering::Relaxed);
    tracing::info!(
        http = %http_addr,
        tcp = %tcp_addr.map_or("disabled".to_string(), |a| a.to_string()),
        admin = %admin_addr,
        tls = %s.tls_cert_file.as_ref().map_or("off".to_string(), |c| c.display().to_string()),
        "listening"
    );

    let mut running = config.clone();
    let signal = loop {
        match signals.wait().map_err(io::Error::from)? {
            Signal::SIGHUP => match file {
                Some(path) => crate::reload::reload(
                    path,
                    &mut running,
                    &crate::reload::Live {
                        limiter,
                        settings: &shared.settings,
                        upstreams,
                        metrics,
                        descriptors: &descriptors,
                    },
                ),
                None => tracing::warn!(
                    "SIGHUP: no configuration file to re-read (started on built-in defaults)"
                ),
            },
            stop => break stop,
        }
    };
    admin::READY.store(false, Ordering::Relaxed);
    tracing::info!(
        %signal,
        shutdown_timeout = ?shared.settings.shutdown_timeout(),
        open_connections = limiter.active(),
        "shutting down: no new connections, draining open ones"
    );
    for stop in stops {
        let _ = stop.send(());
    }
    let mut failed = false;
    for t in threads {
        failed |= !matches!(t.join(), Ok(Ok(())));
    }
    tracing::info!(open_connections = limiter.active(), "stopped");
    if failed {
        return Err(io::Error::other("a worker failed"));
    }
    Ok(())
}

/// The driver in use, for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chosen {
    IoUring,
    Epoll,
}

impl Chosen {
    fn label(self) -> &'static str {
        match self {
            Chosen::IoUring => "io_uring",
            Chosen::Epoll => "epoll",
        }
    }
}

fn choose_driver(wanted: Driver) -> io::Result<Chosen> {
    let uring = monoio::utils::detect_uring();
    match (wanted, uring) {
        (Driver::Epoll, _) => Ok(Chosen::Epoll),
        (_, true) => Ok(Chosen::IoUring),
        (Driver::IoUring, false) => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "server.driver is io_uring but io_uring is unavailable here (old kernel or seccomp); use auto or epoll",
        )),
        (Driver::Auto, false) => {
            tracing::warn!("io_uring is unavailable (old kernel or seccomp profile); falling back to epoll");
            Ok(Chosen::Epoll)
        }
    }
}

fn run_worker(
    driver: Chosen,
    worker: &'static Worker,
    listeners: Listeners,
    stop: futures_channel::oneshot::Receiver<()>,
    started: &mpsc::Sender<io::Result<()>>,
) -> io::Result<()> {
    macro_rules! run_on {
        ($driver:ty, $built:expr) => {{
            match $built {
                Ok(mut rt) => {
                    let _ = started.send(Ok(()));
                    rt.block_on(worker::run(worker, listeners, stop))
                }
                Err(e) => {
                    let e = io::Error::new(
                        e.kind(),
                        format!("building the {} runtime: {e}", driver.label()),
                    );
                    let _ = started.send(Err(io::Error::new(e.kind(), e.to_string())));
                    Err(e)
                }
            }
        }};
    }
    match driver {
        Chosen::IoUring => {
            // Cooperative task running (kernel 5.19+): completions are delivered when the worker
            // next enters the kernel instead of by interrupting it; the worker enters the kernel
            // on every turn of its loop anyway. Without it, every completion raised by another
            // core costs an inter-processor interrupt. Older kernels refuse the flag: build plain.
            let mut urb = io_uring::IoUring::builder();
            urb.setup_coop_taskrun();
            let built = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                .uring_builder(urb)
                .enable_timer()
                .build()
                .or_else(|_| {
                    monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                        .enable_timer()
                        .build()
                });
            run_on!(monoio::IoUringDriver, built)
        }
        Chosen::Epoll => run_on!(
            monoio::LegacyDriver,
            monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                .enable_timer()
                .build()
        ),
    }
}

/// `n` listeners sharing `addr` through `SO_REUSEPORT`; port 0 is resolved by the first.
fn bind_group(addr: SocketAddr, n: usize) -> io::Result<Vec<std::net::TcpListener>> {
    if addr.port() != 0 && listened_elsewhere(addr) {
        // Binding still works when the other socket has SO_REUSEPORT too (same user): the kernel
        // then splits new connections between the two processes. That is how a zero-downtime
        // restart works, and a mistake otherwise: say so.
        tracing::warn!(
            %addr,
            "another socket already listens on this port; new connections will be shared with it \
             (SO_REUSEPORT): right for a zero-downtime restart, a mistake otherwise"
        );
    }
    let first = bind_one(addr)?;
    let addr = first.local_addr()?;
    let mut all = vec![first];
    for _ in 1..n {
        all.push(bind_one(addr)?);
    }
    Ok(all)
}

fn bind_one(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let wrap = |e: io::Error| io::Error::new(e.kind(), format!("listener {addr}: {e}"));
    let socket =
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(wrap)?;
    if addr.is_ipv6() {
        // `::` takes IPv4 clients too, as `::ffff:a.b.c.d` (counted as the IPv4 address).
        socket.set_only_v6(false).map_err(wrap)?;
    }
    socket.set_reuse_address(true).map_err(wrap)?;
    socket.set_reuse_port(true).map_err(wrap)?;
    socket.set_nonblocking(true).map_err(wrap)?;
    // Accepted connections inherit TCP_NODELAY from the listener: one setsockopt here instead of
    // one per connection (answers are written whole, so Nagle would only delay them).
    socket.set_nodelay(true).map_err(wrap)?;
    socket.bind(&addr.into()).map_err(wrap)?;
    socket.listen(4096).map_err(wrap)?;
    Ok(socket.into())
}

/// Whether a socket in this network namespace already listens on `addr`'s port, on that address
/// or a wildcard (either side). Read from `/proc/net/tcp` and `tcp6` before our own listeners
/// exist, so anything found is someone else's.
fn listened_elsewhere(addr: SocketAddr) -> bool {
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|path| {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        text.lines()
            .skip(1)
            .filter_map(proc_net_listener)
            .any(|other| {
                other.port() == addr.port()
                    && (other.ip().is_unspecified()
                        || addr.ip().is_unspecified()
                        || other.ip().to_canonical() == addr.ip().to_canonical())
            })
    })
}

/// The local address of a `/proc/net/tcp{,6}` line whose socket is listening (state `0A`).
/// Addresses are hex words in host byte order, the port is hex.
fn proc_net_listener(line: &str) -> Option<SocketAddr> {
    let mut fields = line.split_whitespace();
    let local = fields.nth(1)?;
    if fields.nth(1)? != "0A" {
        return None;
    }
    let (ip, port) = local.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| {
        ip.get(i * 8..i * 8 + 8)
            .and_then(|w| u32::from_str_radix(w, 16).ok())
            .map(|w| w.to_ne_bytes())
    };
    let ip: IpAddr = match ip.len() {
        8 => std::net::Ipv4Addr::from(word(0)?).into(),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            std::net::Ipv6Addr::from(bytes).into()
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The open-file limit the process got, and what it has to serve.
pub struct Descriptors {
    pub limit: u64,
    pub workers: usize,
}

impl Descriptors {
    /// Warns when `max_connections` clients cannot all be served within the limit with the
    /// upstreams `all`: each client connection is a descriptor, and with HTTP upstreams one in
    /// flight (or holding its session's stream) may hold an upstream one too, besides the idle
    /// upstream pools. Checked at startup and after each reload (a raised limit, HTTP upstreams
    /// where there were none).
    pub fn check(&self, max_connections: usize, all: &crate::upstream::Upstreams) {
        let forwarding = all.all.iter().any(|u| u.http().is_some());
        let per_client = if forwarding { 2 } else { 1 };
        let needed = per_client * max_connections as u64 + 2 * self.workers as u64 + 64;
        if self.limit < needed {
            tracing::warn!(
                open_file_limit = self.limit,
                needed,
                "server.max_connections cannot be reached with this open-file limit (with HTTP upstreams, a client connection may hold an upstream one too); raise the hard limit (ulimit -Hn, LimitNOFILE=)"
            );
        }
    }
}

/// Raises the open-file soft limit to the hard limit; returns the limit in force.
fn raise_nofile_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                return hard;
            }
            soft
        }
        Err(_) => 1024,
    }
}

fn invalid(key: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{key} is not an IP address"),
    )
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn accepted_connections_inherit_no_delay_from_the_listener() {
        let listener = bind_one("127.0.0.1:0".parse().unwrap()).unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let accepted = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        };
        assert!(accepted.nodelay().unwrap());
    }

    #[test]
    fn proc_net_lines_give_listening_addresses_only() {
        let at = |s: &str| Some(s.parse::<SocketAddr>().unwrap());
        let v4 = "   1: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 36023787 1";
        assert_eq!(proc_net_listener(v4), at("127.0.0.1:8080"));
        let any4 =
            "   0: 00000000:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0";
        assert_eq!(proc_net_listener(any4), at("0.0.0.0:2024"));
        let v6 = "   2: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 0";
        assert_eq!(proc_net_listener(v6), at("[::1]:8080"));
        let established = "   3: 0000000000000000FFFF00000100007F:A3D8 0000000000000000FFFF00000200007F:A23B 06 0";
        assert_eq!(proc_net_listener(established), None);
        assert_eq!(
            proc_net_listener("  sl  local_address rem_address   st"),
            None
        );
    }

    #[test]
    fn a_listener_of_another_socket_is_seen_before_binding() {
        // Bound first (the port is ours throughout), listening only later.
        let other = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        other
            .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        let addr = other.local_addr().unwrap().as_socket().unwrap();
        let wildcard = SocketAddr::new("::".parse().unwrap(), addr.port());
        assert!(!listened_elsewhere(addr), "bound is not listening");
        other.listen(8).unwrap();
        assert!(listened_elsewhere(addr));
        assert!(listened_elsewhere(wildcard));
    }
}
