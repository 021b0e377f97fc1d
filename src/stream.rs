//! A connection, plain TCP or TLS: a client's on a door (`server.tls_cert_file` set), or the
//! gateway's to an upstream (`http://` or `https://`). One type for every door, the upstream pool
//! and every forwarding path, so none of them is written twice.
//!
//! Invariants:
//! - The plain variant adds nothing to a `TcpStream` but the variant's tag; the TLS one, and
//!   its I/O futures, are boxed, so plain connections' state (what an idle one costs) does not
//!   grow by rustls'.
//! - A readiness wait is ready while decrypted bytes wait inside rustls ([`Stream::buffered`]),
//!   not only when the socket is.

use std::io;

use monoio::buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent};
use monoio::net::TcpStream;
use monoio::BufResult;

use crate::conn::{peek, Peek};
use crate::tls::TlsStream;

pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
}

impl Stream {
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

    /// What the peer has sent, looked at without taking anything: decrypted bytes waiting
    /// count as data.
    pub fn peek(&self) -> Peek {
        match self.buffered() {
            true => Peek::Data,
            false => peek(self.tcp()),
        }
    }

    /// Whether an idle pooled connection can carry a request: the upstream has sent nothing
    /// since its last response (no EOF, no stray bytes).
    pub fn idle_usable(&mut self) -> bool {
        match self {
            Stream::Plain(s) => peek(s) == Peek::Nothing,
            Stream::Tls(s) => s.idle_usable(),
        }
    }
}

impl AsyncReadRent for Stream {
    async fn read<T: IoBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Stream::Plain(s) => s.read(buf).await,
            Stream::Tls(s) => Box::pin(s.read(buf)).await,
        }
    }

    async fn readv<T: IoVecBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Stream::Plain(s) => s.readv(buf).await,
            Stream::Tls(s) => Box::pin(s.readv(buf)).await,
        }
    }
}

impl AsyncWriteRent for Stream {
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Stream::Plain(s) => s.write(buf).await,
            Stream::Tls(s) => Box::pin(s.write(buf)).await,
        }
    }

    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Stream::Plain(s) => s.writev(buf).await,
            Stream::Tls(s) => Box::pin(s.writev(buf)).await,
        }
    }

    async fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush().await,
            Stream::Tls(s) => Box::pin(s.flush()).await,
        }
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.shutdown().await,
            Stream::Tls(s) => Box::pin(s.shutdown()).await,
        }
    }
}
