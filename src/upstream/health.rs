//! Active health checks: every HTTP upstream is probed each `routing.health_check_interval` and
//! its health flag set, which every core's balancer reads.
//!
//! A probe is what an MCP client's first request looks like: a `POST` of a JSON-RPC `ping` to the
//! upstream's path, with `Connection: close`. Any HTTP answer below 500 within the timeouts counts
//! as healthy (an MCP server may well refuse a ping outside a session with 400: it is up); a
//! refused or timed-out connection, a failed TLS handshake, a 5xx or garbage counts as a
//! failure. One failure takes the upstream out, logged with its reason; one success puts it
//! back. An `https://` upstream is probed over TLS with its own settings, so a certificate it
//! would fail every request on takes it out too.
//!
//! Before each probe, an upstream configured by host name is resolved again (`Http::re_resolve`):
//! hosted servers move (cloud load balancers change addresses), and a gateway that resolved
//! once at startup would go on connecting to an address that is gone.
//!
//! Blocking sockets (and the blocking resolver), off the workers' rings entirely: one thread
//! keeps each upstream's schedule and hands each probe due to a probe thread that has none
//! (at most `MAX_PROBING` probes at once). So every upstream is probed on its own schedule: one
//! that does not answer (a stalled server, a host gone from the network, a resolver that hangs)
//! holds up its own next probe until its timeouts end it, never another upstream's. Probe
//! threads are started as probes need them, up to `MAX_PROBING`, and kept for the next probes:
//! 4 096 upstreams probed every 10 s would otherwise start some 400 threads a second.
//!
//! Invariants:
//! - At most one probe per upstream at a time.
//! - An upstream's first probe starts within one `health_check_interval` of its coming (the
//!   upstreams of one configuration spread over it, so they are not all probed at once), and
//!   its next one `health_check_interval` (of the view in force) after its last one started,
//!   or when that one ends if it took longer; within a twentieth of the interval (at most
//!   `LOOK`), as the probes due that close together are started together.
//! - There are always at least as many probe threads as probes in flight, so a probe handed
//!   over never waits for another to end.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use super::registry::Registry;
use super::{Dest, Upstream, Upstreams};

/// The longest the scheduler goes without looking whether a probe is due (it looks sooner
/// when one is due sooner, or when a probe ends while another waits for a place): a reload
/// that shortens `routing.health_check_interval` (or adds upstreams) takes effect within this,
/// not after the old interval.
const LOOK: Duration = Duration::from_millis(250);

/// Probes running at once, at most (each on a thread); a due upstream beyond them waits for one
/// to end.
const MAX_PROBING: usize = 64;

/// What a probe thread reports when a probe ends: its upstream and what re-resolving its name
/// did.
type Ended = (
    &'static Upstream,
    Result<Option<(SocketAddr, SocketAddr)>, String>,
);

/// A probe to run: the upstream, under the view in force when it was due (its timeouts).
type Probe = (&'static Upstreams, &'static Upstream);

/// The probe threads: each takes the next probe from the queue, runs it and reports its end.
struct Probers {
    queue: mpsc::Sender<Probe>,
    next: Arc<Mutex<mpsc::Receiver<Probe>>>,
    ended: mpsc::Sender<Ended>,
    threads: usize,
}

impl Probers {
    fn new(ended: mpsc::Sender<Ended>) -> Probers {
        let (queue, next) = mpsc::channel();
        Probers {
            queue,
            next: Arc::new(Mutex::new(next)),
            ended,
            threads: 0,
        }
    }

    /// Hands `probe` to a probe thread with nothing to do (`probing`: the probes in flight,
    /// this one not counted), starting one when every thread has a probe.
    fn start(&mut self, probe: Probe, probing: usize) -> std::io::Result<()> {
        if self.threads <= probing {
            let (next, ended) = (self.next.clone(), self.ended.clone());
            std::thread::Builder::new()
                .name("mcp-health-probe".into())
                .spawn(move || run_probes(&next, &ended))?;
            self.threads += 1;
        }
        self.queue
            .send(probe)
            .expect("probe threads live as long as the scheduler");
        Ok(())
    }
}

/// A probe thread: runs the probes it is handed, for good.
fn run_probes(next: &Mutex<mpsc::Receiver<Probe>>, ended: &mpsc::Sender<Ended>) {
    loop {
        // The lock is held while waiting: the idle threads queue on it, one waits on the
        // channel. A poisoned lock cannot be: nothing panics while holding it.
        let got = next.lock().map(|rx| rx.recv());
        let Ok(Ok((all, u))) = got else {
            return;
        };
        // A probe that panicked (a bug) fails: its upstream is still probed next time, and the
        // thread lives on for the next probe.
        let run = || {
            let dns = u.http().map_or(Ok(None), |h| h.re_resolve(super::resolve));
            (probe(all, u), dns)
        };
        let (health, dns) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
            .unwrap_or_else(|_| (Err("the probe panicked".into()), Ok(None)));
        u.set_health(health);
        let _ = ended.send((u, dns));
    }
}

/// Starts the scheduler thread. It runs until the process exits, probing the upstreams in force
/// each `routing.health_check_interval` of the view in force (a reload may add HTTP upstreams
/// where there were none, or change the interval).
pub fn spawn(registry: &'static Registry) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("mcp-health".into())
        .spawn(move || schedule(registry))?;
    Ok(())
}

fn schedule(registry: &'static Registry) {
    let (ended_tx, ended) = mpsc::channel::<Ended>();
    let mut probers = Probers::new(ended_tx);
    // When each upstream's last probe started (before its first: a point of the interval before
    // it was first seen).
    let mut started: HashMap<usize, Instant> = HashMap::new();
    let mut probing: HashSet<usize> = HashSet::new();
    // Upstream indices whose name failed to resolve last time (logged once per spell).
    let mut unresolved = HashSet::new();
    let mut refused_spawn = false;
    loop {
        let all = registry.current();
        let now = Instant::now();
        // The next look: at the earliest probe due, within LOOK, and not sooner than a
        // twentieth of the interval: each look goes over every upstream, so the probes due
        // within that go together (the upstreams spread over the interval would otherwise
        // make one look per probe).
        let mut wake = now + LOOK;
        let least = now + (all.health_check_interval / 20).min(LOOK);
        // A probe is due that the bound on probes in flight holds back: the next end frees it.
        let mut held_back = false;
        for u in all.all.iter().filter(|u| u.http().is_some()) {
            // An upstream first seen is first probed within one interval, at a point of it of
            // its own: upstreams that came together are not all probed at the same moment.
            let first = || {
                let spread = (u.index as f64 * 0.618_033_988_75).fract();
                now.checked_sub(all.health_check_interval.mul_f64(spread))
                    .unwrap_or(now)
            };
            let due = *started.entry(u.index).or_insert_with(first) + all.health_check_interval;
            if probing.contains(&u.index) {
                continue;
            }
            if now < due {
                wake = wake.min(due);
                continue;
            }
            if probing.len() >= MAX_PROBING {
                held_back = true;
                continue;
            }
            match probers.start((all, u), probing.len()) {
                Ok(_) => {
                    started.insert(u.index, now);
                    probing.insert(u.index);
                    refused_spawn = false;
                }
                Err(e) => {
                    // Out of threads or memory: tried again at the next look, logged once.
                    if !refused_spawn {
                        tracing::warn!(error = %e, "cannot start a health probe thread; retrying");
                        refused_spawn = true;
                    }
                    break;
                }
            }
        }
        // Until the next look, taking the probes' ends as they come; one that frees a place
        // for a probe held back brings the look forward.
        let wake = wake.max(least);
        while let Ok((u, dns)) = ended.recv_timeout(wake.saturating_duration_since(Instant::now()))
        {
            probing.remove(&u.index);
            follow_dns(u, dns, &mut unresolved);
            if held_back {
                break;
            }
        }
    }
}

/// Logs what a re-resolution of `u`'s host name changed, or why it failed (the address in use
/// stays then; logged when a spell of failures starts, `failing` holding the upstreams in one).
fn follow_dns(
    u: &Upstream,
    result: Result<Option<(SocketAddr, SocketAddr)>, String>,
    failing: &mut HashSet<usize>,
) {
    match result {
        Ok(change) => {
            failing.remove(&u.index);
            if let Some((was, now)) = change {
                tracing::info!(namespace = %u.namespace, upstream = %u.url, %was, %now, "upstream address changed (DNS): new connections go to the new one");
            }
        }
        Err(why) => {
            if failing.insert(u.index) {
                tracing::warn!(namespace = %u.namespace, upstream = %u.url, reason = %why, "upstream name not resolved; keeping its address");
            }
        }
    }
}

/// One probe of `u`: `Ok` when it answered HTTP below 500, else what went wrong (for the log).
pub fn probe(all: &Upstreams, u: &Upstream) -> Result<(), String> {
    let Some(http) = u.http() else {
        return Ok(());
    };
    let (authority, path) = (&http.authority, &http.path);
    let wait = all.request_timeout.min(Duration::from_secs(5));
    let s = match &http.dest {
        Dest::Unix(socket) => {
            let s = connect_unix(socket, all.connect_timeout)
                .map_err(|e| format!("cannot connect: {e}"))?;
            let _ = s.set_read_timeout(Some(wait));
            let _ = s.set_write_timeout(Some(wait));
            return exchange(s, authority, path);
        }
        Dest::Tcp(tcp) => TcpStream::connect_timeout(&tcp.addr(), all.connect_timeout)
            .map_err(|e| format!("cannot connect: {e}"))?,
    };
    let _ = s.set_read_timeout(Some(wait));
    let _ = s.set_write_timeout(Some(wait));
    match &http.tls {
        None => exchange(s, authority, path),
        Some(tls) => {
            let conn = rustls::ClientConnection::new(tls.config.clone(), tls.name.clone())
                .map_err(|e| e.to_string())?;
            exchange(rustls::StreamOwned::new(conn, s), authority, path)
        }
    }
}

/// A connection to the Unix socket at `path`, within `timeout` (a server whose backlog is full
/// fails it at once).
fn connect_unix(path: &std::path::Path, timeout: Duration) -> std::io::Result<UnixStream> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let s = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    s.connect_timeout(&SockAddr::unix(path)?, timeout)?;
    Ok(UnixStream::from(std::os::fd::OwnedFd::from(s)))
}

/// Sends the probe over `s` and judges the status line.
fn exchange(mut s: impl Read + Write, authority: &str, path: &str) -> Result<(), String> {
    let body = r#"{"jsonrpc":"2.0","id":"mcp-gateway-health","method":"ping"}"#;
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nContent-Length: {}\r\nConnection: close\r\nUser-Agent: mcp-gateway-health\r\n\r\n{body}",
        body.len()
    );
    // Over TLS, the handshake happens here: its error (an untrusted certificate, ...) is the
    // reason logged.
    s.write_all(req.as_bytes())
        .and_then(|()| s.flush())
        .map_err(|e| format!("cannot send the probe: {e}"))?;
    let mut buf = [0u8; 64];
    let mut got = 0;
    while got < 12 {
        match s.read(&mut buf[got..]) {
            Ok(0) => return Err("closed without an answer".into()),
            Err(e) => return Err(format!("no answer: {e}")),
            Ok(n) => got += n,
        }
    }
    // "HTTP/1.x NNN"
    let status = std::str::from_utf8(&buf[9..12])
        .ok()
        .and_then(|s| s.parse::<u16>().ok());
    match status {
        Some(s) if buf.starts_with(b"HTTP/1.") && s < 500 => Ok(()),
        Some(s) if buf.starts_with(b"HTTP/1.") => Err(format!("answered {s}")),
        _ => Err("the answer is not HTTP/1.x".into()),
    }
}
