//! A connection, plain TCP or TLS: a client's on a door (`server.tls_cert_file` set), or the
//! gateway's to an upstream (`http://` or `https://`). One type for every door, the upstream pool
//! and every forwarding path, so none of them is written twice.
//!
//! Invariants:
//! - The plain variant adds nothing to a `TcpStream` but the variant's tag; the TLS one, and
//!   its I/O futures, are boxed, so plain connections' state (what an idle one costs) does not
//!   grow by rustls'.
//! - A readiness wait is ready while decrypted bytes wait in the TLS session ([`Stream::buffered`]),
//!   not only when the socket is.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use monoio::buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent};
use monoio::net::TcpStream;
use monoio::BufResult;

use crate::boxed::{self, Boxed};
use crate::conn::{peek, Peek};
use crate::tls::TlsStream;

pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
}

impl Stream {
    /// A door's client that presented a verified certificate: it, as `X-Forwarded-Client-Cert`
    /// says it (plain TCP, or TLS without client certificates: `None`).
    pub fn identity(&self) -> Option<&str> {
        match self {
            Stream::Plain(_) => None,
            Stream::Tls(s) => s.identity(),
        }
    }

    /// The socket (under the TLS session, if any).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.tcp(),
        }
    }

    /// A read would return at once without the socket: decrypted bytes wait (TLS only).
    pub fn buffered(&self) -> bool {
        match self {
            Stream::Plain(_) => false,
            Stream::Tls(s) => s.buffered(),
        }
    }

    /// Waits until a read would make progress: decrypted bytes wait, or the socket has
    /// something (bytes, EOF or an error).
    pub async fn readable(&self) -> io::Result<()> {
        if self.buffered() {
            return Ok(());
        }
        self.tcp().readable(false).await
    }

    /// What the peer has sent, without waiting and without taking any of its data: decrypted
    /// bytes waiting count as data, TLS records that carry none (a session ticket, a key
    /// update) are taken and count as nothing, and the end of a TLS session counts as closed.
    pub fn peek(&mut self) -> Peek {
        match self {
            Stream::Plain(s) => peek(s),
            Stream::Tls(s) => s.pull(),
        }
    }

    /// Whether an idle pooled connection can carry a request: the upstream has sent nothing
    /// since its last response (no EOF, no stray bytes).
    pub fn idle_usable(&mut self) -> bool {
        self.peek() == Peek::Nothing
    }
}

impl AsyncReadRent for Stream {
    fn read<T: IoBufMut>(&mut self, buf: T) -> impl Future<Output = BufResult<usize, T>> {
        match self {
            Stream::Plain(s) => Either::Plain(s.read(buf)),
            Stream::Tls(s) => Either::Tls(boxed::pin(s.read(buf))),
        }
    }

    fn readv<T: IoVecBufMut>(&mut self, buf: T) -> impl Future<Output = BufResult<usize, T>> {
        match self {
            Stream::Plain(s) => Either::Plain(s.readv(buf)),
            Stream::Tls(s) => Either::Tls(boxed::pin(s.readv(buf))),
        }
    }
}

impl AsyncWriteRent for Stream {
    fn write<T: IoBuf>(&mut self, buf: T) -> impl Future<Output = BufResult<usize, T>> {
        match self {
            Stream::Plain(s) => Either::Plain(s.write(buf)),
            Stream::Tls(s) => Either::Tls(boxed::pin(s.write(buf))),
        }
    }

    fn writev<T: IoVecBuf>(&mut self, buf: T) -> impl Future<Output = BufResult<usize, T>> {
        match self {
            Stream::Plain(s) => Either::Plain(s.writev(buf)),
            Stream::Tls(s) => Either::Tls(boxed::pin(s.writev(buf))),
        }
    }

    async fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush().await,
            Stream::Tls(s) => boxed::pin(s.flush()).await,
        }
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.shutdown().await,
            Stream::Tls(s) => boxed::pin(s.shutdown()).await,
        }
    }
}

/// The future of an I/O call on either variant: the plain one's future as it is (an `async fn`
/// would also keep a copy of the buffer and of `self` in every reader's state), the TLS one's
/// boxed.
enum Either<A, B> {
    Plain(A),
    Tls(Boxed<B>),
}

impl<A: Future, B: Future<Output = A::Output>> Future for Either<A, B> {
    type Output = A::Output;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<A::Output> {
        // SAFETY: the plain future is structurally pinned: it is never moved out of the pinned
        // enum; the boxed one is pinned in its block (see `crate::boxed`).
        match unsafe { self.get_unchecked_mut() } {
            Either::Plain(f) => unsafe { Pin::new_unchecked(f) }.poll(cx),
            Either::Tls(f) => Pin::new(f).poll(cx),
        }
    }
}
