//! The connection side of forwarding: a per-core keep-alive pool of upstream connections, and
//! sending a request and reading its response head over one of them.
//!
//! Invariants:
//! - Pools are per thread (so per core) and bounded per upstream; a connection goes back to the
//!   pool only after its response was read to the end and the upstream did not ask to close, and
//!   one taken from the pool after more than [`UNCHECKED_IDLE`] there is checked to be still open
//!   first (a look at the socket, one system call).
//! - A pooled connection is closed by the core's sweeper once it has waited
//!   `routing.pool_idle_timeout`, or sooner, within a tick, once the upstream has closed it
//!   ([`prune_pool`]): the pool holds no socket the upstream is done with for longer than that.
//! - A request that failed on a pooled connection before any response byte arrived (the upstream
//!   had closed it while idle) is retried once on a new connection; nothing else is retried
//!   here (whether a request an upstream refused goes to another is the caller's choice:
//!   `Balancer::pick_untried`).
//! - Every wait on an upstream is bounded: `connect_timeout` to connect (the TLS handshake of an
//!   `https://` upstream included), `request_timeout` for the request's write and the response
//!   head.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use monoio::io::AsyncWriteRentExt;
use monoio::net::{TcpStream, UnixStream};

use super::wire::{parse_response, ClientHead, ResponseHead};
use super::{Dest, Failure, Upstream, Upstreams};
use crate::boxed;
use crate::conn::{give_buf, read_more, take_buf, until, ReadError};
use crate::stream::Stream;
use crate::tls::TlsStream;

/// Idle upstream connections kept per upstream per core.
const POOL_MAX: usize = 256;

/// How long a connection may have waited in the pool and still be taken without a look at its
/// socket. Under load a connection comes back to the pool and leaves it again within
/// microseconds, and looking cost a system call per proxied request (3% of the gateway's CPU
/// proxying keep-alive requests). No upstream closes an idle connection this soon after a
/// response (idle timeouts are seconds); one that crashed or restarted meanwhile is caught as
/// the check would have caught it, by the request failing before any response byte (retried
/// once on a new connection), the same race the check leaves for a close right after it.
pub const UNCHECKED_IDLE: Duration = Duration::from_millis(100);

/// An idle connection and when it went back to the pool.
type Idle = (Stream, Instant);

thread_local! {
    static POOL: RefCell<Vec<Vec<Idle>>> = const { RefCell::new(Vec::new()) };
}

/// Returns a connection whose response was read to its end to this core's pool (or closes it,
/// when a reload removed its upstream meanwhile).
pub fn give_back(upstream: &Upstream, stream: Stream) {
    if upstream.is_retired() {
        return;
    }
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() <= upstream.index {
            p.resize_with(upstream.index + 1, Vec::new);
        }
        let idle = &mut p[upstream.index];
        if idle.len() < POOL_MAX {
            idle.push((stream, Instant::now()));
        }
    });
}

/// Closes this core's pooled connections to the upstreams `keep` says no to (by index): those
/// a reload removed.
pub fn keep_pooled(keep: impl Fn(usize) -> bool) {
    POOL.with(|p| {
        for (index, idle) in p.borrow_mut().iter_mut().enumerate() {
            if !keep(index) {
                *idle = Vec::new();
            }
        }
    });
}

/// Closes this core's pooled connections that waited longer than `limit`, and those that
/// waited longer than [`UNCHECKED_IDLE`] and that the upstream closed meanwhile (or sent stray
/// bytes on): the sweeper's job, each tick, so that an upstream's keep-alive timeout does not
/// leave the gateway holding closed sockets until the next burst reuses them. The pool is a
/// stack: a burst's extra connections sink to the bottom and go first. Tells `kept` how many
/// stay, upstream by upstream (by index).
pub fn prune_pool(limit: Duration, mut kept: impl FnMut(usize, usize)) {
    let now = Instant::now();
    POOL.with(|p| {
        for (index, idle) in p.borrow_mut().iter_mut().enumerate() {
            idle.retain_mut(|(stream, since)| {
                let waited = now.saturating_duration_since(*since);
                waited < limit && (waited < UNCHECKED_IDLE || stream.idle_usable())
            });
            kept(index, idle.len());
        }
    });
}

fn pooled(upstream: &Upstream) -> Option<Idle> {
    POOL.with(|p| p.borrow_mut().get_mut(upstream.index).and_then(Vec::pop))
}

/// A new connection to `upstream` (TCP, or its Unix socket), its TLS handshake done for an
/// `https://` one, within `connect_timeout`.
async fn connect(all: &Upstreams, upstream: &Upstream) -> Result<Stream, Failure> {
    let http = upstream.http().ok_or(Failure::Connect)?;
    let deadline = std::time::Instant::now() + all.connect_timeout;
    let tcp = match &http.dest {
        Dest::Unix(path) => {
            return match until(deadline, UnixStream::connect(path)).await {
                Ok(Ok(s)) => Ok(Stream::unix(s)),
                Ok(Err(_)) => Err(Failure::Connect),
                Err(_) => Err(Failure::ConnectTimeout),
            };
        }
        Dest::Tcp(tcp) => match until(deadline, TcpStream::connect_addr(tcp.addr())).await {
            Ok(Ok(s)) => s,
            Ok(Err(_)) => return Err(Failure::Connect),
            Err(_) => return Err(Failure::ConnectTimeout),
        },
    };
    let _ = tcp.set_nodelay(true);
    let Some(tls) = &http.tls else {
        return Ok(Stream::Plain(tcp));
    };
    // Boxed: plain upstreams' exchanges do not grow by the handshake's state.
    match until(deadline, boxed::pin(TlsStream::connect(tcp, tls))).await {
        Ok(Ok(s)) => Ok(Stream::tls(s)),
        Ok(Err(e)) => {
            tracing::debug!(upstream = %upstream.url, error = %e, "TLS handshake failed");
            Err(Failure::Tls)
        }
        Err(_) => Err(Failure::ConnectTimeout),
    }
}

/// Sends `req` (a complete request) to `upstream` and reads the response head. Returns the
/// connection, the bytes read past the head (the start of the body, in a pooled buffer) and the
/// head. With `client_head`, also writes the head the client gets into it (see [`ClientHead`]).
/// A pooled connection that turns out closed before any response byte is replaced once.
pub async fn send(
    all: &Upstreams,
    upstream: &Upstream,
    mut req: Vec<u8>,
    mut client_head: Option<&mut ClientHead<'_>>,
) -> Result<(Stream, Vec<u8>, ResponseHead), Failure> {
    let deadline = Instant::now() + all.request_timeout;
    let mut fresh = false;
    loop {
        let (mut stream, reused) = open(all, upstream, fresh).await?;
        let sent = write(&mut stream, req, deadline).await;
        req = match sent {
            Ok(r) => r,
            Err((f, r)) if reused && f == Failure::Reset => {
                fresh = true;
                req = r;
                continue;
            }
            Err((f, r)) => {
                give_buf(r);
                return Err(f);
            }
        };
        match read_head(&mut stream, client_head.as_deref_mut(), deadline).await {
            Ok((buf, head)) => {
                give_buf(req);
                return Ok((stream, buf, head));
            }
            Err(Stale) if reused => fresh = true,
            Err(Failed(f)) => {
                give_buf(req);
                return Err(f);
            }
            Err(Stale) => {
                give_buf(req);
                return Err(Failure::Reset);
            }
        }
    }
}

/// A connection to `upstream`: one from this core's pool (`true`: reused; one that waited there
/// past [`UNCHECKED_IDLE`] and that the upstream has visibly closed is skipped) unless `fresh`,
/// else a new one.
pub async fn open(
    all: &Upstreams,
    upstream: &Upstream,
    fresh: bool,
) -> Result<(Stream, bool), Failure> {
    if !fresh {
        // An idle upstream connection has nothing to read: anything else (EOF, an error, or
        // stray bytes) means it cannot carry a request.
        while let Some((mut s, since)) = pooled(upstream) {
            if since.elapsed() < UNCHECKED_IDLE || s.idle_usable() {
                return Ok((s, true));
            }
        }
    }
    Ok((connect(all, upstream).await?, false))
}

/// Writes all of `data` upstream before `deadline`; gives the buffer back either way, its bytes
/// as they were (a request sent on a pooled connection that turns out stale is sent again from
/// it; on a timeout it went with the cancelled write: a new, empty one is returned).
pub async fn write(
    stream: &mut Stream,
    data: Vec<u8>,
    deadline: Instant,
) -> Result<Vec<u8>, (Failure, Vec<u8>)> {
    match until(deadline, stream.write_all(data)).await {
        Ok((Ok(_), back)) => Ok(back),
        Ok((Err(_), back)) => Err((Failure::Reset, back)),
        Err(_) => Err((Failure::Timeout, take_buf())),
    }
}

/// Why no response head came.
pub enum HeadError {
    /// The connection closed before any byte of a response: a stale pooled connection, if it
    /// was one.
    Stale,
    Failed(Failure),
}
use HeadError::{Failed, Stale};

/// Reads the response head (skipping informational ones) before `deadline`. Returns the bytes
/// read past it and the head; with `client_head`, also writes the client's head.
pub async fn read_head(
    stream: &mut Stream,
    mut client_head: Option<&mut ClientHead<'_>>,
    deadline: Instant,
) -> Result<(Vec<u8>, ResponseHead), HeadError> {
    let mut buf = take_buf();
    let mut any = false;
    loop {
        match parse_response(&buf, client_head.as_deref_mut()) {
            Ok(Some((len, head))) if (100..200).contains(&head.status) => {
                buf.drain(..len); // informational (100, 103): skip to the final response
                if let Some(c) = client_head.as_deref_mut() {
                    c.out.truncate(c.start);
                }
            }
            Ok(Some((len, head))) => {
                buf.drain(..len);
                return Ok((buf, head));
            }
            Ok(None) => {}
            Err(f) => {
                give_buf(buf);
                return Err(Failed(f));
            }
        }
        match read_more(stream, &mut buf, deadline).await {
            Ok(_) => any = true,
            Err(ReadError::TimedOut) => return Err(Failed(Failure::Timeout)),
            Err(_) => {
                give_buf(buf);
                return Err(if any { Failed(Failure::Reset) } else { Stale });
            }
        }
    }
}
