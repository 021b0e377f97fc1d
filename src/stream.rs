//! A connection, plain TCP or TLS: a client's on a door (`server.tls_cert_file` set), or the
//! gateway's to an upstream (`http://` or `https://`; `http://unix:`, a Unix socket). One type
//! for every door, the upstream pool and every forwarding path, so none of them is written
//! twice.
//!
//! Invariants:
//! - The plain variant adds nothing to a `TcpStream` (80 bytes); the others (TLS, a Unix
//!   socket), and their I/O futures, are boxed, so plain connections' state (what an idle one
//!   costs) does not grow by rustls'. The two boxes are one variant holding an enum of them:
//!   as two variants beside the plain one they would add a tag word (88 bytes), where one fits
//!   in a niche of the `TcpStream`.
//! - A client's connection is TCP (plain or TLS); only an upstream's is a Unix socket.
//! - A readiness wait is ready while decrypted bytes wait in the TLS session ([`Stream::buffered`]),
//!   not only when the socket is.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use monoio::buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent};
use monoio::net::{TcpStream, UnixStream};
use monoio::BufResult;
use std::os::fd::{AsRawFd, RawFd};

use crate::boxed::{self, Boxed};
use crate::conn::{peek, Peek};
use crate::tls::TlsStream;

pub enum Stream {
    Plain(TcpStream),
    /// TLS over TCP, or a Unix socket (see the module's invariants for why one variant).
    Other(Other),
}

/// The connections that are not plain TCP, each boxed.
pub enum Other {
    Tls(Box<TlsStream>),
    /// An `http://unix:` upstream's connection.
    Unix(Box<UnixStream>),
}

impl Stream {
    pub fn tls(s: TlsStream) -> Stream {
        Stream::Other(Other::Tls(Box::new(s)))
    }

    pub fn unix(s: UnixStream) -> Stream {
        Stream::Other(Other::Unix(Box::new(s)))
    }

    /// The TLS session, if the connection has one.
    fn tls_session(&self) -> Option<&TlsStream> {
        match self {
            Stream::Other(o) => match o {
                Other::Tls(s) => Some(s),
                Other::Unix(_) => None,
            },
            Stream::Plain(_) => None,
        }
    }

    pub fn is_tls(&self) -> bool {
        self.tls_session().is_some()
    }

    /// A door's client that presented a verified certificate: it, as `X-Forwarded-Client-Cert`
    /// says it (plain TCP, or TLS without client certificates: `None`).
    pub fn identity(&self) -> Option<&str> {
        self.tls_session()?.identity()
    }

    /// The TCP socket (under the TLS session, if any); `None` for a Unix socket (an
    /// upstream's: a client's connection is always TCP).
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Stream::Plain(s) => Some(s),
            Stream::Other(o) => match o {
                Other::Tls(s) => Some(s.tcp()),
                Other::Unix(_) => None,
            },
        }
    }

    /// A read would return at once without the socket: decrypted bytes wait (TLS only).
    pub fn buffered(&self) -> bool {
        self.tls_session().is_some_and(TlsStream::buffered)
    }

    /// Waits until a read would make progress: decrypted bytes wait, or the socket has
    /// something (bytes, EOF or an error).
    pub async fn readable(&self) -> io::Result<()> {
        if self.buffered() {
            return Ok(());
        }
        match self {
            Stream::Plain(s) => s.readable(false).await,
            // Boxed, as the I/O futures are: what a plain connection waits in does not grow.
            Stream::Other(o) => match o {
                Other::Tls(s) => s.tcp().readable(false).await,
                Other::Unix(s) => boxed::pin(s.readable(false)).await,
            },
        }
    }

    /// What the peer has sent, without waiting and without taking any of its data: decrypted
    /// bytes waiting count as data, TLS records that carry none (a session ticket, a key
    /// update) are taken and count as nothing, and the end of a TLS session counts as closed.
    pub fn peek(&mut self) -> Peek {
        match self {
            Stream::Plain(s) => peek(s),
            Stream::Other(o) => match o {
                Other::Tls(s) => s.pull(),
                Other::Unix(s) => peek(s),
            },
        }
    }

    /// Whether an idle pooled connection can carry a request: the upstream has sent nothing
    /// since its last response (no EOF, no stray bytes).
    pub fn idle_usable(&mut self) -> bool {
        self.peek() == Peek::Nothing
    }
}

impl AsRawFd for Stream {
    /// The socket's descriptor (under the TLS session, if any): what an epoll set or the
    /// idle sweeper watches.
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Plain(s) => s.as_raw_fd(),
            Stream::Other(o) => match o {
                Other::Tls(s) => s.tcp().as_raw_fd(),
                Other::Unix(s) => s.as_raw_fd(),
            },
        }
    }
}

/// The I/O call `$call` on any variant, as an [`Either`].
macro_rules! either {
    ($stream:expr, $s:ident => $call:expr) => {
        match $stream {
            Stream::Plain($s) => Either::Plain($call),
            Stream::Other(o) => match o {
                Other::Tls($s) => Either::Other(boxed::pin(Io::Tls($call))),
                Other::Unix($s) => Either::Other(boxed::pin(Io::Unix($call))),
            },
        }
    };
}

impl AsyncReadRent for Stream {
    fn read<T: IoBufMut>(&mut self, buf: T) -> impl Future<Output = BufResult<usize, T>> {
        either!(self, s => s.read(buf))
    }

    fn readv<T: IoVecBufMut>(&mut self, buf: T) -> impl Future<Output = BufResult<usize, T>> {
        either!(self, s => s.readv(buf))
    }
}

impl AsyncWriteRent for Stream {
    fn write<T: IoBuf>(&mut self, buf: T) -> impl Future<Output = BufResult<usize, T>> {
        either!(self, s => s.write(buf))
    }

    fn writev<T: IoVecBuf>(&mut self, buf: T) -> impl Future<Output = BufResult<usize, T>> {
        either!(self, s => s.writev(buf))
    }

    fn flush(&mut self) -> impl Future<Output = io::Result<()>> {
        either!(self, s => s.flush())
    }

    fn shutdown(&mut self) -> impl Future<Output = io::Result<()>> {
        either!(self, s => s.shutdown())
    }
}

/// The future of an I/O call on any variant: a plain socket's future as it is (an `async fn`
/// would also keep a copy of the buffer and of `self` in every reader's state), the others'
/// boxed.
enum Either<A, B, U> {
    Plain(A),
    Other(Boxed<Io<B, U>>),
}

/// The future of an I/O call on a TLS session or a Unix socket.
enum Io<B, U> {
    Tls(B),
    Unix(U),
}

impl<A: Future, B: Future<Output = A::Output>, U: Future<Output = A::Output>> Future
    for Either<A, B, U>
{
    type Output = A::Output;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<A::Output> {
        // SAFETY: the plain future is structurally pinned: it is never moved out of the pinned
        // enum; the boxed one is pinned in its block (see `crate::boxed`).
        match unsafe { self.get_unchecked_mut() } {
            Either::Plain(f) => unsafe { Pin::new_unchecked(f) }.poll(cx),
            Either::Other(f) => Pin::new(f).poll(cx),
        }
    }
}

impl<O, B: Future<Output = O>, U: Future<Output = O>> Future for Io<B, U> {
    type Output = O;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<O> {
        // SAFETY: both futures are structurally pinned: never moved out of the pinned enum.
        match unsafe { self.get_unchecked_mut() } {
            Io::Tls(f) => unsafe { Pin::new_unchecked(f) }.poll(cx),
            Io::Unix(f) => unsafe { Pin::new_unchecked(f) }.poll(cx),
        }
    }
}
