//! The stream that runs rustls over a monoio `TcpStream`, on either side: a client's connection
//! to a door, or the gateway's to an `https://` upstream.
//!
//! Written here rather than taken from `monoio-rustls` because both sides need two things that
//! crate does not give: a readiness wait that knows about bytes rustls already decrypted, and no
//! buffer held by an idle connection. The stream runs rustls' unbuffered API for the second: the
//! buffered one keeps a 4 KiB receive buffer per connection for good, half of what an idle TLS
//! connection cost (7.9 KB against 4.1 KB now, "Resident memory per idle connection").
//!
//! Invariants:
//! - [`TlsStream::buffered`] says when decrypted bytes (or the session's end) wait, and every
//!   readiness wait asks it first (`Stream::readable`, the doors' idle wait): a wait on the
//!   socket alone could sleep on a request or event that already arrived. Every read leaves the
//!   next complete record decrypted, so a record that arrived with the last one is seen too.
//! - An idle stream holds no buffer: ciphertext waiting for the rest of its record, records
//!   waiting for the socket and plaintext a short read left over each live in a buffer of the
//!   core's pool, taken when there is something to hold and given back when it is gone.
//! - The socket is read only when no plaintext waits, and a read takes at most what its buffer
//!   has room for (16 KiB, more only to complete a record): what is held per connection stays
//!   within about two records.
//! - Once rustls reports the session failed it is not driven again (it must not see the input
//!   it failed on twice), but for the alert it made for the peer, sent on a best-effort basis.

use std::io;
use std::sync::Arc;

use monoio::buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use monoio::BufResult;
use rustls::client::UnbufferedClientConnection;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, UnbufferedStatus};
use rustls::ServerConfig;

use super::config::{client_identity, Tls};
use crate::conn::{give_buf, peek, take_buf, Peek, BUF_SIZE};

/// A TLS connection over a monoio `TcpStream`: a client's to a door, or the gateway's to an
/// upstream.
///
/// Runs rustls' unbuffered API: the ciphertext waiting to be decrypted (`incoming`), the
/// records waiting to be sent (`out`) and plaintext a short read left over (`plain`) are buffers
/// of ours, taken from the core's pool while they hold something and given back once empty, so
/// an idle connection holds none (rustls' buffered API keeps a 4 KiB receive buffer for good).
pub struct TlsStream {
    tcp: TcpStream,
    tls: Side,
    /// Ciphertext read from the socket and not yet taken by rustls (a partial record, or records
    /// after one whose plaintext waits).
    incoming: Vec<u8>,
    /// Records rustls made that the socket has not taken yet.
    out: Vec<u8>,
    /// Decrypted bytes that did not fit the reader's buffer (or were decrypted while writing),
    /// from `plain_at` on.
    plain: Vec<u8>,
    plain_at: usize,
    /// The peer's close_notify arrived (rustls says so once).
    peer_closed: bool,
    /// The session failed (a bad record, a failed handshake): rustls is not asked again.
    failed: bool,
    /// A door's client that presented a verified certificate (`server.tls_client_ca_file`): it,
    /// as `X-Forwarded-Client-Cert` says it to upstreams (see [`client_identity`]). Made once,
    /// at the end of the handshake.
    identity: Option<Box<str>>,
}

enum Side {
    Client(UnbufferedClientConnection),
    Server(UnbufferedServerConnection),
}

impl Side {
    fn state(&self) -> &rustls::CommonState {
        match self {
            Side::Client(c) => c,
            Side::Server(s) => s,
        }
    }
}

/// What a caller wants of one [`TlsStream::advance`].
enum Want {
    /// Everything that needs no socket done (records decrypted up to the first plaintext,
    /// handshake messages made), nothing taken.
    Settle,
    /// Plaintext, copied to `ptr` (room for `cap` bytes).
    Read { ptr: *mut u8, cap: usize },
    /// This plaintext encrypted into `out` (a prefix of it: see [`MAX_WRITE`]).
    Write(*const u8, usize),
    /// A close_notify alert into `out`.
    CloseNotify,
    /// The fatal alert rustls made when the session failed, into `out`, and nothing else:
    /// rustls must not see the input it failed on again.
    Alert,
}

/// How one [`TlsStream::advance`] ended.
#[derive(Debug)]
enum Got {
    /// `n` bytes of plaintext were read, or encrypted (0: the close_notify).
    Done(usize),
    /// Decrypted bytes wait (`Want::Settle`).
    Data,
    /// Nothing more without more bytes from the socket (or, settling, nothing to do).
    Input,
    /// The peer's close_notify has arrived: no more plaintext will.
    PeerClosed,
}

/// The most plaintext one write encrypts (callers write the rest in the next): its records,
/// with their headers and tags, still fit a buffer the pool keeps (at most 64 KiB).
const MAX_WRITE: usize = 60 * 1024;

fn invalid(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Appends what `make` writes into `out` (a buffer of the pool when it was empty), with room for
/// `guess` bytes first and as much as `make` asks for (`Err(Some(n))`) after.
fn append(
    out: &mut Vec<u8>,
    guess: usize,
    mut make: impl FnMut(&mut [u8]) -> Result<usize, Option<usize>>,
) -> io::Result<()> {
    if out.capacity() == 0 {
        *out = take_buf();
    }
    let len = out.len();
    let mut room = guess;
    loop {
        out.resize(len + room, 0);
        match make(&mut out[len..]) {
            Ok(n) => {
                out.truncate(len + n);
                return Ok(());
            }
            Err(Some(need)) if need > room => room = need,
            Err(_) => {
                out.truncate(len);
                return Err(invalid("TLS record could not be made"));
            }
        }
    }
}

/// Keeps decrypted bytes no reader took (yet) in `plain`, a buffer of the pool once it holds any.
fn set_aside(plain: &mut Vec<u8>, bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    if plain.capacity() == 0 {
        *plain = take_buf();
    }
    plain.extend_from_slice(bytes);
}

/// One status of the connection, handled as `want` asks: what came of it (`Ok(None)`: call
/// again) and the bytes of the input rustls is done with. Generic over the side, as rustls'
/// states are.
fn step<D>(
    status: UnbufferedStatus<'_, '_, D>,
    want: &Want,
    out: &mut Vec<u8>,
    plain: &mut Vec<u8>,
) -> (io::Result<Option<Got>>, usize) {
    let mut discard = status.discard;
    let got = on_state(status.state, want, out, plain, &mut discard);
    (got, discard)
}

fn on_state<D>(
    state: Result<ConnectionState<'_, '_, D>, rustls::Error>,
    want: &Want,
    out: &mut Vec<u8>,
    plain: &mut Vec<u8>,
    discard: &mut usize,
) -> io::Result<Option<Got>> {
    use rustls::unbuffered::{EncodeError, EncryptError};
    let size = |e: EncryptError| match e {
        EncryptError::InsufficientSize(s) => Some(s.required_size),
        _ => None,
    };
    let encoded_size = |e: EncodeError| match e {
        EncodeError::InsufficientSize(s) => Some(s.required_size),
        _ => None,
    };
    let state = state.map_err(invalid)?;
    if let Want::Alert = want {
        if let ConnectionState::EncodeTlsData(mut encode) = state {
            append(out, 64, |room| encode.encode(room).map_err(encoded_size))?;
        }
        return Ok(Some(Got::Input));
    }
    Ok(match state {
        ConnectionState::ReadTraffic(mut traffic) => {
            let Want::Read { ptr, cap } = *want else {
                if let Want::Settle = want {
                    return Ok(Some(Got::Data));
                }
                // Writing: the plaintext moves aside, for the next read.
                while let Some(record) = traffic.next_record() {
                    let record = record.map_err(invalid)?;
                    set_aside(plain, record.payload);
                    *discard += record.discard;
                }
                return Ok(None);
            };
            let Some(record) = traffic.next_record() else {
                return Ok(None);
            };
            let record = record.map_err(invalid)?;
            let n = record.payload.len().min(cap);
            // SAFETY: the caller's buffer has room for `cap` bytes at `ptr`, and does not
            // overlap rustls' record.
            unsafe { std::ptr::copy_nonoverlapping(record.payload.as_ptr(), ptr, n) };
            set_aside(plain, &record.payload[n..]);
            *discard += record.discard;
            Some(Got::Done(n))
        }
        ConnectionState::EncodeTlsData(mut encode) => {
            append(out, 4096, |room| encode.encode(room).map_err(encoded_size))?;
            None
        }
        // What was encoded is sent before anything encoded after it (`out` is sent whole,
        // in order), which is all "transmitted" has to mean.
        ConnectionState::TransmitTlsData(transmit) => {
            transmit.done();
            None
        }
        ConnectionState::BlockedHandshake => Some(Got::Input),
        ConnectionState::WriteTraffic(mut traffic) => match *want {
            Want::Write(ptr, len) => {
                // SAFETY: the caller's plaintext, `len` initialised bytes at `ptr`.
                let data = unsafe { std::slice::from_raw_parts(ptr, len.min(MAX_WRITE)) };
                // Each record adds at most 5 bytes of header and a tag and padding under 64.
                let guess = data.len() + (data.len() / 16384 + 1) * 64;
                append(out, guess, |room| traffic.encrypt(data, room).map_err(size))?;
                Some(Got::Done(data.len()))
            }
            Want::CloseNotify => {
                append(out, 64, |room| {
                    traffic.queue_close_notify(room).map_err(size)
                })?;
                Some(Got::Done(0))
            }
            Want::Read { .. } | Want::Settle | Want::Alert => Some(Got::Input),
        },
        // Said once; writing goes on after it (the peer closed its half).
        ConnectionState::PeerClosed => Some(Got::PeerClosed),
        ConnectionState::Closed => match want {
            Want::Write(..) | Want::CloseNotify => {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the TLS session is closed",
                ))
            }
            Want::Read { .. } | Want::Settle | Want::Alert => Some(Got::PeerClosed),
        },
        // Early data is never accepted (`max_early_data_size` is 0).
        _ => return Err(invalid("unexpected TLS early data")),
    })
}

impl TlsStream {
    /// Runs the client side of the handshake over `tcp` (the caller bounds it in time). The
    /// error says why it failed (`invalid peer certificate: UnknownIssuer`, ...).
    pub async fn connect(tcp: TcpStream, tls: &Tls) -> io::Result<TlsStream> {
        let conn = UnbufferedClientConnection::new(tls.config.clone(), tls.name.clone())
            .map_err(invalid)?;
        TlsStream::handshake(tcp, Side::Client(conn)).await
    }

    /// Runs the server side of the handshake over `tcp` (the caller bounds it in time).
    pub async fn accept(tcp: TcpStream, config: &Arc<ServerConfig>) -> io::Result<TlsStream> {
        let conn = UnbufferedServerConnection::new(config.clone()).map_err(invalid)?;
        let mut s = TlsStream::handshake(tcp, Side::Server(conn)).await?;
        // Verified by the handshake, when the doors ask for certificates; else there is none.
        s.identity = s
            .tls
            .state()
            .peer_certificates()
            .and_then(<[_]>::first)
            .map(|cert| client_identity(cert).into());
        Ok(s)
    }

    /// The verified certificate of a door's client, as `X-Forwarded-Client-Cert` gives it.
    pub fn identity(&self) -> Option<&str> {
        self.identity.as_deref()
    }

    async fn handshake(tcp: TcpStream, tls: Side) -> io::Result<TlsStream> {
        let mut s = TlsStream {
            tcp,
            tls,
            incoming: Vec::new(),
            out: Vec::new(),
            plain: Vec::new(),
            plain_at: 0,
            peer_closed: false,
            failed: false,
            identity: None,
        };
        let mut received = 0;
        loop {
            let settled = s.advance(Want::Settle);
            if settled.is_err() {
                s.send_alert().await;
            }
            settled?;
            s.send_out().await?;
            if !s.tls.state().is_handshaking() {
                return Ok(s);
            }
            match s.receive().await? {
                // A peer that sent nothing at all (a TCP health check): not a failure.
                0 if received == 0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "the peer closed the connection before the TLS handshake",
                    ))
                }
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed the connection during the TLS handshake",
                    ))
                }
                n => received += n,
            }
        }
    }

    /// Drives rustls over what has arrived until `want` is done or needs the socket. Never
    /// waits: records made go to `out`, for [`TlsStream::send_out`].
    fn advance(&mut self, want: Want) -> io::Result<Got> {
        if self.failed {
            return Err(invalid("the TLS session failed"));
        }
        loop {
            let (got, discard) = match &mut self.tls {
                Side::Client(c) => step(
                    c.process_tls_records(&mut self.incoming),
                    &want,
                    &mut self.out,
                    &mut self.plain,
                ),
                Side::Server(s) => step(
                    s.process_tls_records(&mut self.incoming),
                    &want,
                    &mut self.out,
                    &mut self.plain,
                ),
            };
            if discard > 0 {
                self.incoming.drain(..discard);
                self.give_back_incoming_if_empty();
            }
            let got = got.inspect_err(|_| self.failed = true)?;
            match got {
                None if matches!(want, Want::Alert) => return Ok(Got::Input),
                None => continue,
                Some(Got::PeerClosed) => {
                    self.peer_closed = true;
                    if let Want::Write(..) | Want::CloseNotify = want {
                        continue;
                    }
                    return Ok(Got::PeerClosed);
                }
                Some(got) => return Ok(got),
            }
        }
    }

    /// After a failure, the fatal alert rustls made for the peer, if any: best effort, the
    /// connection is over.
    async fn send_alert(&mut self) {
        // Only while rustls holds records to send: asked with none, it would read the input it
        // failed on again.
        for _ in 0..4 {
            if !self.tls.state().wants_write() {
                break;
            }
            self.failed = false;
            let _ = self.advance(Want::Alert);
            self.failed = true;
        }
        let _ = self.send_out().await;
    }

    /// Sends the records `out` holds (handshake messages, alerts, application data).
    async fn send_out(&mut self) -> io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let (r, mut out) = self.tcp.write_all(std::mem::take(&mut self.out)).await;
        out.clear();
        give_buf(out);
        r.map(|_| ())
    }

    /// Makes room in `incoming` for a read of the socket: a buffer of the pool, or 16 KiB more
    /// once less than 4 KiB is left (a record is at most 16 KiB and a little, so a partial one
    /// is completed by the reads after).
    fn room_to_read(&mut self) {
        if self.incoming.capacity() == 0 {
            self.incoming = take_buf();
        } else if self.incoming.capacity() - self.incoming.len() < 4096 {
            self.incoming.reserve(BUF_SIZE);
        }
    }

    /// An idle stream holds no buffer: `incoming`, once rustls took all of it, goes back to the
    /// pool.
    fn give_back_incoming_if_empty(&mut self) {
        if self.incoming.is_empty() {
            give_buf(std::mem::take(&mut self.incoming));
        }
    }

    /// Reads ciphertext from the socket onto `incoming`. `Ok(0)`: the socket is at EOF.
    async fn receive(&mut self) -> io::Result<usize> {
        self.room_to_read();
        let (len, cap) = (self.incoming.len(), self.incoming.capacity());
        let (r, slice) = self
            .tcp
            .read(std::mem::take(&mut self.incoming).slice_mut(len..cap))
            .await;
        self.incoming = slice.into_inner();
        self.give_back_incoming_if_empty();
        r
    }

    /// Plaintext set aside, copied into `ptr` (room for `cap`).
    fn take_plain(&mut self, ptr: *mut u8, cap: usize) -> usize {
        let rest = &self.plain[self.plain_at..];
        let n = rest.len().min(cap);
        // SAFETY: the caller's buffer has room for `cap` bytes at `ptr`; `plain` is ours.
        unsafe { std::ptr::copy_nonoverlapping(rest.as_ptr(), ptr, n) };
        self.plain_at += n;
        if self.plain_at == self.plain.len() {
            give_buf(std::mem::take(&mut self.plain));
            self.plain_at = 0;
        }
        n
    }

    /// Reads plaintext into `cap` bytes at `ptr`, waiting for the socket when none is there.
    /// `Ok(0)`: the session's or the connection's end.
    async fn read_into(&mut self, ptr: *mut u8, cap: usize) -> io::Result<usize> {
        loop {
            if self.plain.len() > self.plain_at {
                return Ok(self.take_plain(ptr, cap));
            }
            if self.peer_closed {
                return Ok(0);
            }
            let got = self.advance(Want::Read { ptr, cap });
            match got {
                Ok(Got::Done(n)) => {
                    // The next record decrypted now, so that `buffered` sees it (or sees the
                    // session failed, which the next read reports: these bytes were good).
                    if self.advance(Want::Settle).is_err() {
                        self.send_alert().await;
                    }
                    self.send_out().await?;
                    return Ok(n);
                }
                Ok(Got::PeerClosed) => return Ok(0),
                Ok(_) => {}
                Err(e) => {
                    self.send_alert().await;
                    return Err(e);
                }
            }
            // A key update's answer (or a handshake's last message) goes before we wait.
            self.send_out().await?;
            // The peer closed TCP without close_notify: many servers do; an HTTP body has its
            // own framing to tell a cut-off response.
            if self.receive().await? == 0 {
                return Ok(0);
            }
        }
    }

    /// The socket under the TLS session.
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Decrypted bytes (or the session's end) wait: a read returns at once, so a wait for
    /// readiness must not wait on the socket. Every read leaves the next complete record
    /// decrypted (or none complete), so this is all there is to know.
    pub fn buffered(&self) -> bool {
        let state = self.tls.state();
        self.plain.len() > self.plain_at
            || self.peer_closed
            || self.failed
            || (!state.is_handshaking() && !state.wants_read())
    }

    /// What the peer has sent, without waiting: bytes waiting on the socket are read (without
    /// blocking) and handed to rustls first, so a post-handshake message (a TLS 1.3 session
    /// ticket, a key update) counts as nothing, decrypted bytes as `Data`, and the session's or
    /// the connection's end (close_notify, an alert, EOF, a bad record) as `Closed`.
    pub fn pull(&mut self) -> Peek {
        use std::os::fd::AsRawFd;
        loop {
            if self.plain.len() > self.plain_at {
                return Peek::Data;
            }
            if self.peer_closed {
                return Peek::Closed;
            }
            match self.advance(Want::Settle) {
                Ok(Got::Data) => return Peek::Data,
                Ok(Got::PeerClosed) | Err(_) => return Peek::Closed,
                Ok(_) => {}
            }
            match peek(&self.tcp) {
                Peek::Data => {}
                other => return other,
            }
            self.room_to_read();
            let len = self.incoming.len();
            let room = self.incoming.capacity() - len;
            // SAFETY: a non-blocking read into the spare capacity of a buffer we own; the
            // length grows by what the kernel wrote.
            let n = unsafe {
                libc::recv(
                    self.tcp.as_raw_fd(),
                    self.incoming.as_mut_ptr().add(len).cast(),
                    room,
                    libc::MSG_DONTWAIT,
                )
            };
            if n <= 0 {
                self.give_back_incoming_if_empty();
                return Peek::Closed;
            }
            // SAFETY: the kernel initialised the `n` bytes after `len`.
            unsafe { self.incoming.set_len(len + n as usize) };
        }
    }
}

impl AsyncReadRent for TlsStream {
    async fn read<T: IoBufMut>(&mut self, mut buf: T) -> BufResult<usize, T> {
        match self.read_into(buf.write_ptr(), buf.bytes_total()).await {
            Ok(n) => {
                // SAFETY: `n` bytes were written at the buffer's start.
                unsafe { buf.set_init(n) };
                (Ok(n), buf)
            }
            Err(e) => (Err(e), buf),
        }
    }

    async fn readv<T: IoVecBufMut>(&mut self, mut buf: T) -> BufResult<usize, T> {
        // SAFETY: the raw buffer views the first iovec of `buf`, which outlives this call.
        let n = match unsafe { monoio::buf::RawBuf::new_from_iovec_mut(&mut buf) } {
            Some(raw) => self.read(raw).await.0,
            None => Ok(0),
        };
        if let Ok(n) = n {
            // SAFETY: `n` bytes were written into the first iovec.
            unsafe { buf.set_init(n) };
        }
        (n, buf)
    }
}

impl AsyncWriteRent for TlsStream {
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        let got = self.advance(Want::Write(buf.read_ptr(), buf.bytes_init()));
        let n = match got {
            Ok(Got::Done(n)) => n,
            Ok(other) => {
                return (
                    Err(io::Error::other(format!("TLS cannot write yet: {other:?}"))),
                    buf,
                )
            }
            Err(e) => {
                self.send_alert().await;
                return (Err(e), buf);
            }
        };
        match self.send_out().await {
            Ok(()) => (Ok(n), buf),
            Err(e) => (Err(e), buf),
        }
    }

    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        // SAFETY: the raw buffer views the first iovec of `buf`, which outlives this call.
        let n = match unsafe { monoio::buf::RawBuf::new_from_iovec(&buf) } {
            Some(raw) => self.write(raw).await.0,
            None => Ok(0),
        };
        (n, buf)
    }

    async fn flush(&mut self) -> io::Result<()> {
        self.send_out().await
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        // Best effort: a second shutdown finds the session closed already.
        let _ = self.advance(Want::CloseNotify);
        self.send_out().await?;
        self.tcp.shutdown().await
    }
}

impl Drop for TlsStream {
    fn drop(&mut self) {
        for buf in [&mut self.incoming, &mut self.out, &mut self.plain] {
            give_buf(std::mem::take(buf));
        }
    }
}

#[cfg(test)]
mod tests;
