//! The admin listener: `/metrics` (Prometheus text), `/healthz` (alive) and `/ready` (taking
//! traffic; 503 while starting or draining).
//!
//! Owns its own plain thread with a blocking listener, away from the workers: a scrape never
//! competes with client traffic on a worker core, and the admin port is never limited by the
//! client limits. Each connection gets a thread of its own and one request, within 2 seconds in
//! all (a deadline, not a timeout per read: a client trickling its request a byte at a time is
//! cut off too), so a silent or slow client delays nobody else's probe or scrape.
//!
//! Invariant: at most [`MAX_OPEN`] admin connections are served at once (a connection beyond
//! them is closed at once, and logged); each one's place is given back when its
//! thread ends, whatever ended it.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::metrics::Metrics;

/// Whether the gateway takes traffic. Relaxed is enough: it only changes what `/ready` says.
pub static READY: AtomicBool = AtomicBool::new(false);

/// Admin connections served at once, at most.
pub const MAX_OPEN: usize = 64;

/// How long one admin connection may take, from accept to its answer's last byte.
pub const DEADLINE: Duration = Duration::from_secs(2);

/// Admin connections being served. Relaxed: a count that guards nothing but itself.
static OPEN: AtomicUsize = AtomicUsize::new(0);

/// One place among [`MAX_OPEN`], given back on drop.
struct Place;

impl Place {
    fn take() -> Option<Place> {
        let taken = OPEN.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            (n < MAX_OPEN).then_some(n + 1)
        });
        // `then`, not `then_some`: a `Place` made and dropped on refusal would give back a
        // place it never took.
        taken.is_ok().then(|| Place)
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        OPEN.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves the admin endpoints on `listener` from a new thread.
pub fn spawn(
    listener: TcpListener,
    metrics: &'static Metrics,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("mcp-admin".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => {
                        let Some(place) = Place::take() else {
                            refused_one();
                            continue;
                        };
                        let served = std::thread::Builder::new()
                            .name("mcp-admin-conn".into())
                            .spawn(move || {
                                let _place = place;
                                if let Err(e) = serve(stream, metrics, Instant::now() + DEADLINE) {
                                    tracing::debug!(error = %e, "admin request failed");
                                }
                            });
                        if let Err(e) = served {
                            tracing::warn!(error = %e, "admin connection closed: no thread for it");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "admin accept failed");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        })
}

/// Logs an admin connection closed for want of a place: the first as a warning (the admin port
/// is busier than it should be: a client holding connections open), later ones at debug level
/// so that a flood of them cannot flood the log.
fn refused_one() {
    static WARNED: AtomicBool = AtomicBool::new(false);
    // Relaxed: only which level the line gets depends on it.
    if WARNED.swap(true, Ordering::Relaxed) {
        tracing::debug!(open = MAX_OPEN, "admin connection closed: too many open");
    } else {
        tracing::warn!(
            open = MAX_OPEN,
            "admin connection closed: too many open (each may take 2 s; later ones are logged \
             at debug level)"
        );
    }
}

/// What is left of `deadline`, or a timeout error once it has passed.
fn left(deadline: Instant) -> io::Result<Option<Duration>> {
    match deadline.checked_duration_since(Instant::now()) {
        Some(d) if !d.is_zero() => Ok(Some(d)),
        _ => Err(io::ErrorKind::TimedOut.into()),
    }
}

fn serve(mut stream: TcpStream, metrics: &'static Metrics, deadline: Instant) -> io::Result<()> {
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    let path = loop {
        stream.set_read_timeout(left(deadline)?)?;
        let n = stream.read(&mut buf[len..])?;
        if n == 0 {
            return Ok(());
        }
        len += n;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[..len]) {
            Ok(httparse::Status::Complete(_)) => {
                let method = req.method.unwrap_or("");
                let path = req
                    .path
                    .unwrap_or("")
                    .split('?')
                    .next()
                    .unwrap_or("")
                    .to_string();
                break if method == "GET" || method == "HEAD" {
                    path
                } else {
                    String::new()
                };
            }
            Ok(httparse::Status::Partial) if len < buf.len() => continue,
            _ => break String::new(),
        }
    };
    let (status, content_type, body) = match path.as_str() {
        "/metrics" => (
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        "/healthz" => (200, "text/plain", "ok\n".to_string()),
        "/ready" if READY.load(Ordering::Relaxed) => (200, "text/plain", "ready\n".to_string()),
        "/ready" => (503, "text/plain", "not ready\n".to_string()),
        "" => (400, "text/plain", "bad request\n".to_string()),
        _ => (
            404,
            "text/plain",
            "not found: /metrics, /healthz, /ready\n".to_string(),
        ),
    };
    let reason = crate::http::response::reason(status);
    let mut answer = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    answer.extend_from_slice(body.as_bytes());
    let mut rest = &answer[..];
    while !rest.is_empty() {
        stream.set_write_timeout(left(deadline)?)?;
        match stream.write(rest)? {
            0 => return Err(io::ErrorKind::WriteZero.into()),
            n => rest = &rest[n..],
        }
    }
    Ok(())
}
