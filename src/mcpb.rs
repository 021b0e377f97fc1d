//! The framed-TCP front door: MCPB frames carrying JSON-RPC.
//!
//! Frame (big-endian, 12-byte header): magic `0x4D435042` ("MCPB"), version u16 = 1, type u16,
//! payload length u32, then the payload. Types: 1 Request, 2 Response, 3 Control,
//! 4 HealthCheck, 5 Error, 6 VersionNegotiation, 7 VersionAck.
//!
//! Owns the codec and an admitted TCP connection's message loop:
//! - Request: its JSON-RPC payload goes to the upstream; a reply comes back as a Response frame
//!   (a notification gets none).
//! - HealthCheck: answered with a HealthCheck frame, payload `{"status":"ok"}`.
//! - VersionNegotiation: answered with VersionAck, payload `{"version":1}`.
//! - Response: a client's answer to a request the server sent it, handled like a Request
//!   (forwarded upstream; `builtin:echo` has nothing to answer).
//! - Control, Error and VersionAck from a client are accepted and ignored.
//! - A bad magic, version, type or length gets an Error frame whose payload is a JSON-RPC error
//!   object, then a lingering close. The length is checked before any payload byte is read, so a
//!   frame can never make the gateway buffer more than `max_message_size` (at most 10 MiB).

use std::future::Future;
use std::time::Instant;

use monoio::net::TcpStream;

use crate::boxed;
use crate::stream::Stream;

use crate::conn::{first_bytes, give_buf, linger_close, take_buf, write_all, ReadError};
use crate::echo;
use crate::limiter::Permit;
use crate::metrics::{Frontend, ProtocolError};
use crate::upstream::rpc::{Framing, Message, MsgSession, Next};
use crate::worker::{Registration, Worker};

/// Upstream replies as Response frames, upstream failures as Error frames (the connection stays).
const FRAMING: Framing = Framing {
    reply: |out, p| write_frame(out, FrameType::Response, p),
    fail: |out, p| write_frame(out, FrameType::Error, p),
};

pub const MAGIC: u32 = 0x4D43_5042;
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 12;
/// The protocol's own cap on a payload.
pub const MAX_PAYLOAD: usize = 10 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum FrameType {
    Request = 1,
    Response = 2,
    Control = 3,
    HealthCheck = 4,
    Error = 5,
    VersionNegotiation = 6,
    VersionAck = 7,
}

impl FrameType {
    fn from_u16(v: u16) -> Option<Self> {
        use FrameType::*;
        [
            Request,
            Response,
            Control,
            HealthCheck,
            Error,
            VersionNegotiation,
            VersionAck,
        ]
        .into_iter()
        .find(|t| *t as u16 == v)
    }
}

/// Why a frame header is refused: JSON-RPC error code and message for the Error frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadFrame(pub i64, pub &'static str);

/// A payload over `max_message_size` (or the protocol's 10 MiB).
pub const TOO_LARGE: BadFrame = BadFrame(-32600, "frame payload larger than max_message_size");

/// Parses a frame header. `Ok(None)`: fewer than 12 bytes so far.
pub fn parse_header(buf: &[u8], max: usize) -> Result<Option<(FrameType, usize)>, BadFrame> {
    if buf.len() < HEADER_LEN {
        // A wrong magic is refused as soon as its bytes are here.
        let n = buf.len().min(4);
        if buf[..n] != MAGIC.to_be_bytes()[..n] {
            return Err(BadFrame(-32600, "bad frame magic (expected MCPB)"));
        }
        return Ok(None);
    }
    let word = |i: usize| u32::from_be_bytes(buf[i..i + 4].try_into().expect("4 bytes"));
    let half = |i: usize| u16::from_be_bytes(buf[i..i + 2].try_into().expect("2 bytes"));
    if word(0) != MAGIC {
        return Err(BadFrame(-32600, "bad frame magic (expected MCPB)"));
    }
    if half(4) != VERSION {
        return Err(BadFrame(-32600, "unsupported frame version (expected 1)"));
    }
    let Some(kind) = FrameType::from_u16(half(6)) else {
        return Err(BadFrame(-32600, "unknown frame type"));
    };
    let len = word(8) as usize;
    if len > max.min(MAX_PAYLOAD) {
        return Err(TOO_LARGE);
    }
    Ok(Some((kind, len)))
}

/// Appends a frame.
pub fn write_frame(out: &mut Vec<u8>, kind: FrameType, payload: &[u8]) {
    out.extend_from_slice(&MAGIC.to_be_bytes());
    out.extend_from_slice(&VERSION.to_be_bytes());
    out.extend_from_slice(&(kind as u16).to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

enum Step {
    Continue,
    Close,
    Linger(Vec<u8>),
}

/// Serves an admitted TCP connection until it closes or parks with its session
/// ([`crate::park`]); `permit` is held until then. `session`: the one it parked with, when it
/// comes back from the parking lot. An `async` block rather than an `async fn`, for the reason
/// given at [`crate::http::serve`].
#[allow(clippy::manual_async_fn)] // on purpose: see above
pub fn serve(
    worker: &'static Worker,
    mut stream: Stream,
    mut permit: Permit,
    mut reg: Registration,
    session: Option<Box<MsgSession>>,
) -> impl Future<Output = ()> {
    async move {
        let s = worker.settings();
        // Made here, in the connection's task, which knows the client a PROXY header named.
        let mut session = session.unwrap_or_else(|| {
            // MCPB has no namespace in its frames: it serves the `default` namespace.
            let all = worker.upstreams();
            let namespace = all.namespace("default").map(|ns| &all.namespaces[ns]);
            Box::new(MsgSession::new(worker, namespace, Frontend::Tcp, &stream))
        });
        let mut pending: Option<Vec<u8>> = None;
        loop {
            if pending.is_none() {
                match session
                    .next(worker, &reg, &mut stream, s.timeouts.idle(), &FRAMING, true)
                    .await
                {
                    Next::Message => {}
                    Next::Expired | Next::Gone => return,
                    Next::Park => match worker.park_holding(stream, permit, reg, session) {
                        Ok(()) => return,
                        Err(back) => {
                            (stream, permit, reg, session) = back;
                            continue; // it waits on in this task
                        }
                    },
                }
            }
            match boxed::pin(exchange(
                worker,
                &permit,
                &mut stream,
                &mut pending,
                &mut session,
            ))
            .await
            {
                Step::Continue => {}
                Step::Close => return,
                Step::Linger(buf) => return boxed::pin(linger_close(stream, Some(buf))).await,
            }
        }
    }
}

async fn exchange(
    worker: &'static Worker,
    permit: &Permit,
    stream: &mut Stream,
    pending: &mut Option<Vec<u8>>,
    session: &mut MsgSession,
) -> Step {
    let s = worker.settings();
    let deadline = Instant::now() + s.timeouts.read();
    let Some(mut buf) = first_bytes(stream, pending.take(), deadline).await else {
        return Step::Close;
    };
    let mut out = take_buf();
    loop {
        let (kind, len) = match parse_header(&buf, s.max_message_size()) {
            Ok(Some((kind, len))) if buf.len() >= HEADER_LEN + len => (kind, len),
            Ok(found) => {
                session.drain(&mut out, &FRAMING); // what forwarded requests already got back
                if !out.is_empty() {
                    match write_all(stream, out, s.timeouts.write()).await {
                        Ok(o) => out = o,
                        Err(_) => return Step::Close,
                    }
                }
                if buf.is_empty() {
                    give_buf(buf);
                    give_buf(out);
                    return Step::Continue;
                }
                if let Some((_, len)) = found {
                    buf.reserve(HEADER_LEN + len - buf.len());
                }
                // The rest of a message: the forwards in flight go on meanwhile.
                match session.read_more(stream, &mut buf, deadline).await {
                    Ok(_) => continue,
                    Err(ReadError::TimedOut) => {
                        worker
                            .metrics
                            .protocol_error(Frontend::Tcp, ProtocolError::Timeout);
                        return refuse(
                            worker,
                            stream,
                            out,
                            BadFrame(-32000, "frame not received within read_timeout"),
                        )
                        .await;
                    }
                    Err(_) => return Step::Close,
                }
            }
            Err(bad) => {
                let kind = if bad == TOO_LARGE {
                    ProtocolError::TooLarge
                } else {
                    ProtocolError::Malformed
                };
                worker.metrics.protocol_error(Frontend::Tcp, kind);
                return refuse(worker, stream, out, bad).await;
            }
        };
        let payload = &buf[HEADER_LEN..HEADER_LEN + len];
        match kind {
            // A client's Response frame answers a request the server sent it (sampling,
            // elicitation): it goes upstream like a request.
            FrameType::Request | FrameType::Response => {
                let message = Message::Borrowed(payload);
                let handled = session.handle(worker, permit, message, stream, &mut out, &FRAMING);
                if handled.await.is_err() {
                    return Step::Close;
                }
            }
            FrameType::HealthCheck => {
                write_frame(&mut out, FrameType::HealthCheck, br#"{"status":"ok"}"#)
            }
            FrameType::VersionNegotiation => {
                write_frame(&mut out, FrameType::VersionAck, br#"{"version":1}"#)
            }
            FrameType::Control | FrameType::Error | FrameType::VersionAck => {}
        }
        // Round again: the next frame if it is here, else flush and wait.
        buf.drain(..HEADER_LEN + len);
    }
}

async fn refuse(
    worker: &'static Worker,
    stream: &mut Stream,
    mut out: Vec<u8>,
    bad: BadFrame,
) -> Step {
    tracing::debug!(reason = bad.1, "refusing MCPB frame");
    let mut payload = take_buf();
    echo::write_error(&mut payload, "null", bad.0, bad.1);
    write_frame(&mut out, FrameType::Error, &payload);
    give_buf(payload);
    let _ = write_all(stream, out, worker.settings().timeouts.write()).await;
    Step::Linger(take_buf())
}

/// Answers a connection refused before its first frame (a bad PROXY header) with an Error frame
/// carrying `message`, counted as `kind`, then closes without a reset.
pub async fn refuse_connection(
    worker: &'static Worker,
    tcp: TcpStream,
    kind: ProtocolError,
    message: &'static str,
) {
    worker.metrics.protocol_error(Frontend::Tcp, kind);
    let mut stream = Stream::Plain(tcp);
    let bad = BadFrame(-32600, message);
    if let Step::Linger(buf) = refuse(worker, &mut stream, take_buf(), bad).await {
        linger_close(stream, Some(buf)).await;
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrip_and_refusals() {
        let mut f = Vec::new();
        write_frame(&mut f, FrameType::HealthCheck, b"{}");
        assert_eq!(&f[..4], b"MCPB");
        assert_eq!(parse_header(&f, 100), Ok(Some((FrameType::HealthCheck, 2))));
        assert_eq!(parse_header(&f[..7], 100), Ok(None));
        assert!(
            parse_header(b"GET ", 100).is_err(),
            "wrong magic is refused early"
        );
        let mut v2 = f.clone();
        v2[5] = 2;
        assert!(parse_header(&v2, 100).unwrap_err().1.contains("version"));
        let mut t9 = f.clone();
        t9[7] = 9;
        assert!(parse_header(&t9, 100).unwrap_err().1.contains("type"));
        assert_eq!(parse_header(&f, 1), Err(TOO_LARGE));
    }
}
