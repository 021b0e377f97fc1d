//! Connection I/O shared by the front doors: the per-core buffer pool, the idle wait, deadline
//! reads and timed writes, and the graceful close.
//!
//! Invariants:
//! - A connection waiting for its next request or message holds no buffer and no timer: it
//!   waits for readiness ([`wait_idle`]), and only then takes a buffer from this core's pool. Buffers go
//!   back to the pool as soon as no unconsumed bytes are left in them. An open event stream
//!   waiting for its next event holds none either ([`until_readable`]): MCP clients keep one
//!   open all the time.
//! - The pool is per thread (so per core), bounded in count and in the capacity of what it keeps.
//! - Every read and write runs under a deadline; nothing waits on a client forever.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use crate::boxed;
use crate::metrics::{Frontend, ProtocolError};
use crate::stream::Stream;
use crate::tls::TlsStream;
use crate::worker::{Registration, Worker};

/// The connection a door serves: the socket as it is, or, when the doors speak TLS, the session
/// a handshake within `read_timeout` opens on it. A failed or late handshake is counted
/// (`protocol_errors{kind="tls"}`) and closed (`None`); a peer that leaves before sending a byte
/// (a TCP health check) is closed quietly.
pub async fn open(worker: &'static Worker, tcp: TcpStream, door: Frontend) -> Option<Stream> {
    let Some(config) = worker.tls() else {
        return Some(Stream::Plain(tcp));
    };
    let deadline = Instant::now() + worker.settings().timeouts.read();
    match until(deadline, TlsStream::accept(tcp, &config)).await {
        Ok(Ok(s)) => return Some(Stream::tls(s)),
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionAborted => return None,
        Ok(Err(e)) => tracing::debug!(frontend = door.label(), error = %e, "TLS handshake failed"),
        Err(_) => tracing::debug!(
            frontend = door.label(),
            "TLS handshake not done within read_timeout"
        ),
    }
    worker.metrics.protocol_error(door, ProtocolError::Tls);
    None
}

/// Capacity of a pooled buffer; requests that need more grow their buffer, which is then dropped
/// instead of pooled when it is larger than `MAX_POOLED` (64 KiB).
pub const BUF_SIZE: usize = 16 * 1024;
const MAX_POOLED: usize = 64 * 1024;
/// Buffers kept per core. Beyond this, returned buffers are freed.
const POOL_LEN: usize = 256;

thread_local! {
    static POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// A cleared buffer from this core's pool (or a new one).
pub fn take_buf() -> Vec<u8> {
    POOL.with(|p| p.borrow_mut().pop())
        .unwrap_or_else(|| Vec::with_capacity(BUF_SIZE))
}

/// Returns a buffer to this core's pool.
pub fn give_buf(mut buf: Vec<u8>) {
    if buf.capacity() < BUF_SIZE || buf.capacity() > MAX_POOLED {
        return;
    }
    buf.clear();
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL_LEN {
            p.push(buf);
        }
    });
}

/// How waiting for a client ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Wait {
    /// Bytes (or EOF) arrived.
    Ready,
    /// `limit` passed, or the worker is draining: close.
    Expired,
    /// The sweeper asks this idle connection to park ([`Worker::park`]): hand it over and end.
    Park,
}

/// Waits until the socket is readable, holding no buffer and no timer meanwhile: the worker's
/// idle sweeper enforces `limit` (see [`Worker::idle_begin`]), so a waiting connection costs only
/// its readiness wait. (A monoio timer is 640 bytes: more than the rest of the idle state.)
/// A plain connection whose registration allows it may end its wait with [`Wait::Park`] (see
/// [`crate::park`]): its task keeps the waker where the sweeper finds it.
///
/// Written as a plain future over monoio's readiness future, so it adds two pointers to it,
/// where an `async fn` would also keep its arguments.
pub fn wait_idle<'a>(
    worker: &'a Worker,
    reg: &'a Registration,
    stream: &'a Stream,
    limit: Duration,
) -> impl Future<Output = Wait> + 'a {
    if stream.buffered() {
        return IdleWait::Now; // a TLS connection's next request is already decrypted
    }
    worker.idle_begin(reg, limit);
    let Some(tcp) = stream.tcp() else {
        return IdleWait::Now; // a Unix socket (an upstream's, never waited on here): read it
    };
    IdleWait::Wait {
        ready: tcp.readable(false),
        worker,
        reg,
    }
}

/// No bigger than the wait itself: `Now` takes the niche of the references.
enum IdleWait<'a, F> {
    Now,
    Wait {
        ready: F,
        worker: &'a Worker,
        reg: &'a Registration,
    },
}

impl<F: Future<Output = io::Result<()>>> Future for IdleWait<'_, F> {
    type Output = Wait;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Wait> {
        // SAFETY: `ready` is structurally pinned and never moved; the other fields are `Copy`.
        let IdleWait::Wait { ready, worker, reg } = (unsafe { self.get_unchecked_mut() }) else {
            return Poll::Ready(Wait::Ready);
        };
        // SAFETY: as above.
        let Poll::Ready(result) = unsafe { Pin::new_unchecked(ready) }.poll(cx) else {
            return match reg.idle_pending(cx.waker()) {
                true => Poll::Ready(Wait::Park),
                false => Poll::Pending,
            };
        };
        let expired = worker.idle_end(reg);
        Poll::Ready(if expired || result.is_err() {
            Wait::Expired
        } else {
            Wait::Ready
        })
    }
}

/// What a socket holds, looked at without taking anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peek {
    /// The peer closed (EOF), or an error is pending.
    Closed,
    /// Bytes wait to be read.
    Data,
    /// Nothing yet.
    Nothing,
}

/// Looks at `socket` without blocking and without consuming a byte.
pub fn peek(socket: &impl std::os::fd::AsRawFd) -> Peek {
    let mut byte = 0u8;
    // SAFETY: a one-byte peek into a local on a socket the caller holds; nothing is consumed.
    let n = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => Peek::Closed,
        1.. => Peek::Data,
        _ => match io::Error::last_os_error().kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Peek::Nothing,
            _ => Peek::Closed,
        },
    }
}

/// `future`, cut off at `deadline`. Takes the deadline as it is: `timeout(deadline - now)` would
/// read the clock twice (once here, once in monoio), and reads are the hot path.
pub fn until<F: std::future::Future>(deadline: Instant, future: F) -> monoio::time::Timeout<F> {
    monoio::time::timeout_at(monoio::time::Instant::from_std(deadline), future)
}

/// Why a read under a deadline gave no bytes.
#[derive(Debug)]
pub enum ReadError {
    /// The peer closed its side.
    Eof,
    TimedOut,
    Io(io::Error),
}

/// The bytes a message door's exchange starts from: those already `pending`, or, for a
/// connection woken by readiness, what has arrived by `deadline` (`None`: the client closed, or
/// the read failed; the connection ends).
pub async fn first_bytes<S: AsyncReadRent>(
    stream: &mut S,
    pending: Option<Vec<u8>>,
    deadline: Instant,
) -> Option<Vec<u8>> {
    let mut buf = pending.unwrap_or_else(take_buf);
    if buf.is_empty() && read_more(stream, &mut buf, deadline).await.is_err() {
        give_buf(buf);
        return None;
    }
    Some(buf)
}

/// Appends at least one byte to `buf` (growing it by up to `BUF_SIZE` when full) before
/// `deadline`. For a client's socket and an upstream's connection alike.
pub async fn read_more<S: AsyncReadRent>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    deadline: Instant,
) -> Result<usize, ReadError> {
    if buf.capacity() - buf.len() < 512 {
        buf.reserve(BUF_SIZE);
    }
    let len = buf.len();
    let cap = buf.capacity();
    let owned = std::mem::take(buf);
    match until(deadline, stream.read(owned.slice_mut(len..cap))).await {
        Ok((res, slice)) => {
            *buf = slice.into_inner();
            match res {
                Ok(0) => Err(ReadError::Eof),
                Ok(n) => Ok(n),
                Err(e) => Err(ReadError::Io(e)),
            }
        }
        // The buffer went with the cancelled read; the caller is closing the connection.
        Err(_) => Err(ReadError::TimedOut),
    }
}

/// How [`read_watching`] ended.
pub enum Watched {
    Data,
    Eof,
    Failed,
    ClientGone,
    /// The idle sweeper asks the stream to park ([`crate::park`]); only where the caller said it
    /// may, and only while the client is watched (its socket says nothing until it speaks).
    Park,
}

/// Where an event stream waiting for its next event may be asked to park: the connection's
/// registration (see [`read_watching`]).
pub type Parking<'a> = Option<&'a Registration>;

/// Reads more of an event stream from `up` into `buf`, with no deadline (an event stream may be
/// silent for long), holding no buffer and no timer while it waits. While `watch`, the client's
/// socket is watched too: EOF from it ends the wait (`ClientGone`), so a client that leaves does
/// not leave its upstream stream behind; bytes from it (its next request) end the watching, and
/// are left for its door to read later. With `parking`, a wait with nothing of an event in `buf`
/// and the client watched may end in [`Watched::Park`].
pub async fn read_watching(
    up: &mut Stream,
    buf: &mut Vec<u8>,
    client: &mut Stream,
    watch: &mut bool,
    parking: Parking<'_>,
) -> Watched {
    if buf.is_empty() {
        give_buf(std::mem::take(buf));
        let ended = until_readable(up, Some(client), watch, parking).await;
        if let Some(Watched::Park) = ended {
            return Watched::Park; // it leaves with an empty buffer, as it waited
        }
        *buf = take_buf();
        if let Some(ended) = ended {
            return ended;
        }
    }
    // Boxed: the read (and the client's watch beside it) is held only while it lasts, not by a
    // stream waiting for its next event.
    boxed::pin(read_now(up, buf, client, watch)).await
}

/// The read of [`read_watching`], once `up` is readable (or part of an event is in `buf`).
async fn read_now(
    up: &mut Stream,
    buf: &mut Vec<u8>,
    client: &mut Stream,
    watch: &mut bool,
) -> Watched {
    use monoio::buf::IoBufMut;
    if buf.capacity() - buf.len() < 512 {
        buf.reserve(BUF_SIZE);
    }
    let (len, cap) = (buf.len(), buf.capacity());
    let read = up.read(std::mem::take(buf).slice_mut(len..cap));
    let mut read = std::pin::pin!(read);
    loop {
        if *watch {
            let readable = client.readable();
            monoio::select! {
                done = &mut read => return finish(done, buf),
                _ = readable => {}
            }
            if let Some(gone) = client_spoke(client, watch) {
                return gone;
            }
        } else {
            let done = (&mut read).await;
            return finish(done, buf);
        }
    }
}

/// Waits without a buffer until `up` has something to read (bytes, EOF or an error: `None`, read
/// now), watching `client` meanwhile as [`read_watching`] does while `*watch`, and, with
/// `parking`, until the sweeper asks the stream to park.
pub async fn until_readable(
    up: &Stream,
    mut client: Option<&mut Stream>,
    watch: &mut bool,
    parking: Parking<'_>,
) -> Option<Watched> {
    loop {
        let up_ready = up.readable();
        let Some(client) = client.as_deref_mut().filter(|_| *watch) else {
            return up_ready.await.err().map(|_| Watched::Failed);
        };
        monoio::select! {
            r = up_ready => return r.err().map(|_| Watched::Failed),
            _ = client.readable() => {}
            _ = ParkAsked(parking) => return Some(Watched::Park),
        }
        if let Some(gone) = client_spoke(client, watch) {
            return Some(gone);
        }
    }
}

/// Resolves once the sweeper asks the connection of the registration to park (keeping the
/// task's waker for it meanwhile, see [`Registration::idle_pending`]); never without one.
struct ParkAsked<'a>(Parking<'a>);

impl Future for ParkAsked<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match self.0 {
            Some(reg) if reg.idle_pending(cx.waker()) => Poll::Ready(()),
            _ => Poll::Pending,
        }
    }
}

/// What a watched client's readable socket carried: its departure (`ClientGone`), or its next
/// request (the watching stops; the bytes stay for its door to read later).
fn client_spoke(client: &mut Stream, watch: &mut bool) -> Option<Watched> {
    match client.peek() {
        Peek::Closed => Some(Watched::ClientGone),
        Peek::Data => {
            *watch = false;
            None
        }
        Peek::Nothing => None,
    }
}

fn finish(
    (res, slice): (std::io::Result<usize>, monoio::buf::SliceMut<Vec<u8>>),
    buf: &mut Vec<u8>,
) -> Watched {
    *buf = slice.into_inner();
    match res {
        Ok(0) => Watched::Eof,
        Ok(_) => Watched::Data,
        Err(_) => Watched::Failed,
    }
}

/// Writes all of `data` within `limit`. Returns the buffer (cleared) for reuse on success.
pub async fn write_all<S: AsyncWriteRent>(
    stream: &mut S,
    data: Vec<u8>,
    limit: Duration,
) -> io::Result<Vec<u8>> {
    match monoio::time::timeout(limit, stream.write_all(data)).await {
        Ok((Ok(_), mut buf)) => {
            buf.clear();
            Ok(buf)
        }
        Ok((Err(e), _)) => Err(e),
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "write timed out")),
    }
}

/// Closes after an error reply without turning it into a reset: shuts our write side, then reads
/// and discards what the client still sends (bounded in bytes and time) until it closes too.
/// Closing a socket with unread bytes makes the kernel send RST, which can destroy the reply
/// before the client reads it.
pub async fn linger_close(mut stream: Stream, scrap: Option<Vec<u8>>) {
    let _ = stream.shutdown().await;
    let mut buf = scrap.unwrap_or_else(take_buf);
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut drained = 0usize;
    while drained < 256 * 1024 {
        buf.clear();
        match read_more(&mut stream, &mut buf, deadline).await {
            Ok(n) => drained += n,
            Err(ReadError::TimedOut) => return,
            Err(_) => break,
        }
    }
    give_buf(buf);
}
