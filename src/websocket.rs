//! The WebSocket front door (RFC 6455): the upgrade handshake and the message loop of an upgraded
//! connection. Each text message is one JSON-RPC message (or batch) for the namespace's upstream;
//! each reply goes back as one text message.
//!
//! Owns the frame codec (server side: client frames must be masked, ours are not) and the
//! connection after the `101 Switching Protocols`.
//!
//! Invariants:
//! - A message (all fragments together) never exceeds `max_message_size`: the frame header is
//!   checked before its payload is read, and the connection is closed with 1009.
//! - Protocol violations close with the RFC's code (1002 protocol error, 1003 binary data,
//!   1007 invalid UTF-8), then a lingering close.
//! - Pings are answered with pongs carrying the same payload; a close frame is answered with a
//!   close frame echoing its code, then the gateway closes the TCP connection.
//! - Like HTTP, an idle WebSocket holds no buffer; it is closed with 1001 after `idle_timeout`
//!   or when the gateway drains.

use std::future::Future;
use std::time::Instant;

use crate::boxed;
use crate::stream::Stream;
use base64::Engine as _;
use sha1::{Digest, Sha1};

use crate::conn::{give_buf, linger_close, read_more, take_buf, write_all, ReadError};
use crate::echo;
use crate::http::request::Upgrade;
use crate::http::response;
use crate::limiter::{rate, Permit};
use crate::metrics::{Frontend, ProtocolError};
use crate::upstream::rpc::{self, Dest, Framing, MsgSession, Next};
use crate::upstream::Outcome;
use crate::worker::{Registration, Worker};

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

const OP_CONT: u8 = 0;
const OP_TEXT: u8 = 1;
const OP_BINARY: u8 = 2;
const OP_CLOSE: u8 = 8;
const OP_PING: u8 = 9;
const OP_PONG: u8 = 10;

/// Writes the handshake answer to `out` and returns its status (101 on success).
pub fn handshake(up: &Upgrade, out: &mut Vec<u8>) -> u16 {
    if !up.version_13 {
        response::error(
            out,
            426,
            -32600,
            "WebSocket version 13 required",
            &[("Sec-WebSocket-Version", "13")],
            false,
        );
        return 426;
    }
    let key = up.key.as_deref().unwrap_or("");
    let valid = base64::engine::general_purpose::STANDARD
        .decode(key)
        .is_ok_and(|k| k.len() == 16);
    if !valid {
        response::error(
            out,
            400,
            -32600,
            "missing or invalid Sec-WebSocket-Key",
            &[],
            false,
        );
        return 400;
    }
    let accept = accept_key(key);
    let mut headers = vec![
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Accept", accept.as_str()),
    ];
    if up.mcp_protocol {
        headers.push(("Sec-WebSocket-Protocol", "mcp"));
    }
    response::write(out, 101, &headers, b"", true);
    101
}

/// `Sec-WebSocket-Accept` for a client key.
pub fn accept_key(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// A close with its code and reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseWith(pub u16, pub &'static str);

const PROTOCOL: CloseWith = CloseWith(1002, "protocol error");

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHead {
    pub fin: bool,
    pub opcode: u8,
    pub mask: [u8; 4],
    pub header_len: usize,
    pub payload_len: usize,
}

/// Parses a client frame header. `Ok(None)`: incomplete.
pub fn parse_frame_head(buf: &[u8], max: usize) -> Result<Option<FrameHead>, CloseWith> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0f;
    if b0 & 0x70 != 0
        || !matches!(
            opcode,
            OP_CONT | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG
        )
    {
        return Err(PROTOCOL);
    }
    if b1 & 0x80 == 0 {
        return Err(CloseWith(1002, "client frames must be masked"));
    }
    let (len, mut at) = match b1 & 0x7f {
        126 if buf.len() < 4 => return Ok(None),
        126 => (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4),
        127 if buf.len() < 10 => return Ok(None),
        127 => (
            u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes")),
            10,
        ),
        n => (n as u64, 2),
    };
    if opcode >= OP_CLOSE && (!fin || len > 125) {
        return Err(CloseWith(1002, "invalid control frame"));
    }
    if len > max as u64 {
        return Err(CloseWith(1009, "message too big"));
    }
    if buf.len() < at + 4 {
        return Ok(None);
    }
    let mask = buf[at..at + 4].try_into().expect("4 bytes");
    at += 4;
    Ok(Some(FrameHead {
        fin,
        opcode,
        mask,
        header_len: at,
        payload_len: len as usize,
    }))
}

/// Appends an unmasked server frame.
pub fn write_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n <= u16::MAX as usize => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}

fn write_close(out: &mut Vec<u8>, CloseWith(code, reason): CloseWith) {
    let mut payload = [0u8; 125];
    payload[..2].copy_from_slice(&code.to_be_bytes());
    let n = reason.len().min(123);
    payload[2..2 + n].copy_from_slice(&reason.as_bytes()[..n]);
    write_frame(out, OP_CLOSE, &payload[..2 + n]);
}

/// The code to echo for a client's close frame `payload` (RFC 6455, section 5.5.1: none means
/// 1000), or why the frame is refused: a one-byte payload or a code no endpoint may send (1002;
/// 1005, 1006 and 1015 only report what happened locally, section 7.4), or a reason that is not
/// UTF-8 (1007).
fn close_code(payload: &[u8]) -> Result<u16, CloseWith> {
    let [a, b, reason @ ..] = payload else {
        return match payload {
            [] => Ok(1000),
            _ => Err(CloseWith(1002, "close frame of one byte")),
        };
    };
    let code = u16::from_be_bytes([*a, *b]);
    // Defined by RFC 6455 (1000-1003, 1007-1011) or registered with IANA since (1012-1014), or
    // left to libraries and applications (3000-4999).
    if !matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999) {
        return Err(CloseWith(1002, "invalid close code"));
    }
    if std::str::from_utf8(reason).is_err() {
        return Err(CloseWith(1007, "close reason is not UTF-8"));
    }
    Ok(code)
}

/// A fragmented message being assembled across frames.
#[derive(Default)]
struct Assembly {
    message: Option<Vec<u8>>,
}

enum WsStep {
    Continue(Option<Vec<u8>>),
    Close,
    Linger(Vec<u8>),
}

/// Upstream replies as text messages, upstream failures as JSON-RPC errors in text messages.
const FRAMING: Framing = Framing {
    reply: text_frame,
    fail: text_frame,
};

fn text_frame(out: &mut Vec<u8>, payload: &[u8]) {
    write_frame(out, OP_TEXT, payload);
}

/// Serves an upgraded connection, as the task of its own it runs in (see
/// [`crate::worker::serve_upgraded`]), holding its permit and registration until it closes or
/// parks with its session ([`crate::park`]); `pending` holds bytes that came after the
/// handshake. `expired`: it comes back from the parking lot only to be closed.
/// An `async` block rather than an `async fn`, for the reason given at [`crate::http::serve`].
#[allow(clippy::manual_async_fn)] // on purpose: see above
pub fn serve(
    worker: &'static Worker,
    mut stream: Stream,
    mut reg: Registration,
    mut permit: Permit,
    mut pending: Option<Vec<u8>>,
    mut session: Box<MsgSession>,
    mut expired: bool,
) -> impl Future<Output = ()> {
    async move {
        let s = worker.settings();
        let mut assembly = Assembly::default();
        loop {
            if !expired && pending.is_none() {
                let may_park = assembly.message.is_none();
                match session
                    .next(
                        worker,
                        &reg,
                        &mut stream,
                        s.timeouts.idle(),
                        &FRAMING,
                        may_park,
                    )
                    .await
                {
                    Next::Message => {}
                    Next::Expired => expired = true,
                    Next::Gone => return,
                    Next::Park => match worker.park_holding(stream, permit, reg, session) {
                        Ok(()) => return,
                        Err(back) => {
                            (stream, permit, reg, session) = back;
                            continue; // it waits on in this task
                        }
                    },
                }
            }
            if expired {
                let why = if worker.draining() {
                    CloseWith(1001, "gateway shutting down")
                } else {
                    CloseWith(1001, "idle timeout")
                };
                return boxed::pin(close_idle(worker, stream, why)).await;
            }
            let step = boxed::pin(exchange(
                worker,
                &permit,
                &mut stream,
                pending.take(),
                &mut assembly,
                &mut session,
            ))
            .await;
            match step {
                WsStep::Continue(rest) => pending = rest,
                WsStep::Close => return,
                WsStep::Linger(buf) => return boxed::pin(linger_close(stream, Some(buf))).await,
            }
        }
    }
}

async fn exchange(
    worker: &'static Worker,
    permit: &Permit,
    stream: &mut Stream,
    pending: Option<Vec<u8>>,
    assembly: &mut Assembly,
    session: &mut MsgSession,
) -> WsStep {
    let s = worker.settings();
    let max = s.max_message_size();
    let mut buf = pending.unwrap_or_else(take_buf);
    let mut out = take_buf();
    let deadline = Instant::now() + s.timeouts.read();
    if buf.is_empty() {
        // Woken by readiness: read what arrived (EOF or an error ends the connection).
        if read_more(stream, &mut buf, deadline).await.is_err() {
            give_buf(out);
            return WsStep::Close;
        }
    }
    loop {
        let head = match parse_frame_head(&buf, max) {
            Ok(Some(h)) if buf.len() >= h.header_len + h.payload_len => h,
            Ok(found) => {
                if buf.is_empty() {
                    // Nothing pending: flush (with what forwarded messages already got back) and
                    // go back to waiting without a buffer.
                    give_buf(buf);
                    session.drain(&mut out, &FRAMING);
                    return flush(stream, out, s.timeouts.write())
                        .await
                        .map_or(WsStep::Close, |_| WsStep::Continue(None));
                }
                if let Some(h) = found {
                    buf.reserve(h.header_len + h.payload_len - buf.len());
                }
                if !out.is_empty() {
                    match write_all(stream, out, s.timeouts.write()).await {
                        Ok(o) => out = o,
                        Err(_) => return WsStep::Close,
                    }
                }
                // The rest of a message: the forwards in flight go on meanwhile.
                match session.read_more(stream, &mut buf, deadline).await {
                    Ok(_) => continue,
                    Err(ReadError::TimedOut) => {
                        worker
                            .metrics
                            .protocol_error(Frontend::WebSocket, ProtocolError::Timeout);
                        return close_with(
                            worker,
                            stream,
                            out,
                            CloseWith(1008, "frame not received within read_timeout"),
                        )
                        .await;
                    }
                    Err(_) => return WsStep::Close,
                }
            }
            Err(why) => {
                let kind = if why.0 == 1009 {
                    ProtocolError::TooLarge
                } else {
                    ProtocolError::Malformed
                };
                worker.metrics.protocol_error(Frontend::WebSocket, kind);
                return close_with(worker, stream, out, why).await;
            }
        };
        let start = head.header_len;
        let end = start + head.payload_len;
        for (i, b) in buf[start..end].iter_mut().enumerate() {
            *b ^= head.mask[i % 4];
        }
        let payload = &buf[start..end];
        let complete: Option<Vec<u8>> = match head.opcode {
            OP_PING => {
                write_frame(&mut out, OP_PONG, payload);
                None
            }
            OP_PONG => None,
            OP_CLOSE => {
                let code = match close_code(payload) {
                    Ok(code) => code,
                    Err(why) => {
                        worker.metrics.protocol_error(Frontend::WebSocket, ProtocolError::Malformed);
                        return close_with(worker, stream, out, why).await;
                    }
                };
                write_close(&mut out, CloseWith(code, ""));
                let _ = write_all(stream, out, s.timeouts.write()).await;
                buf.drain(..end);
                return WsStep::Linger(buf);
            }
            OP_BINARY if assembly.message.is_none() => {
                worker.metrics.protocol_error(Frontend::WebSocket, ProtocolError::Malformed);
                return close_with(worker, stream, out, CloseWith(1003, "send JSON-RPC as text messages")).await;
            }
            OP_TEXT | OP_BINARY if assembly.message.is_some() => {
                worker.metrics.protocol_error(Frontend::WebSocket, ProtocolError::Malformed);
                return close_with(worker, stream, out, CloseWith(1002, "new message inside a fragmented one")).await;
            }
            OP_TEXT => {
                let mut m = take_buf();
                m.extend_from_slice(payload);
                if head.fin {
                    Some(m)
                } else {
                    assembly.message = Some(m);
                    None
                }
            }
            _ /* OP_CONT */ => match assembly.message.as_mut() {
                None => return close_with(worker, stream, out, CloseWith(1002, "continuation without a message")).await,
                Some(m) if m.len() + payload.len() > max => {
                    worker.metrics.protocol_error(Frontend::WebSocket, ProtocolError::TooLarge);
                    return close_with(worker, stream, out, CloseWith(1009, "message too big")).await;
                }
                Some(m) => {
                    m.extend_from_slice(payload);
                    if head.fin { assembly.message.take() } else { None }
                }
            },
        };
        buf.drain(..end);
        if let Some(message) = complete {
            if std::str::from_utf8(&message).is_err() {
                worker
                    .metrics
                    .protocol_error(Frontend::WebSocket, ProtocolError::Malformed);
                return close_with(
                    worker,
                    stream,
                    out,
                    CloseWith(1007, "text message is not UTF-8"),
                )
                .await;
            }
            if worker.admit_request(permit, Frontend::WebSocket).is_err() {
                // Over the address's request rate: an error for this message, the session kept.
                (FRAMING.fail)(&mut out, &rpc::error_for(&message, rate::REFUSAL));
                give_buf(message);
                continue;
            }
            let builtin = match session.dest(worker) {
                Dest::Forward => {
                    let sent = session.submit(worker, message, stream, &mut out, &FRAMING);
                    if boxed::pin(sent).await.is_err() {
                        return WsStep::Close;
                    }
                    continue;
                }
                Dest::Echo(u) => u,
                Dest::Gone => {
                    (FRAMING.fail)(&mut out, &rpc::error_for(&message, rpc::NAMESPACE_GONE));
                    give_buf(message);
                    continue;
                }
            };
            let started = Instant::now();
            let access = crate::access::message_begin(worker, stream);
            let mut reply = take_buf();
            if echo::handle(&message, &mut reply).replied {
                write_frame(&mut out, OP_TEXT, &reply);
            }
            crate::access::message_end(access, Frontend::WebSocket, Some(builtin), 200);
            worker.metrics.upstream(builtin.index, Outcome::Ok, None);
            worker
                .metrics
                .request(Frontend::WebSocket, started.elapsed());
            give_buf(reply);
            give_buf(message);
        }
    }
}

/// Closes a connection that has no exchange in progress (idle timeout, drain).
async fn close_idle(worker: &'static Worker, mut stream: Stream, why: CloseWith) {
    let mut out = take_buf();
    write_close(&mut out, why);
    if write_all(&mut stream, out, worker.settings().timeouts.write())
        .await
        .is_ok()
    {
        linger_close(stream, None).await;
    }
}

async fn flush(
    stream: &mut Stream,
    out: Vec<u8>,
    limit: std::time::Duration,
) -> std::io::Result<()> {
    if out.is_empty() {
        give_buf(out);
        return Ok(());
    }
    write_all(stream, out, limit).await.map(give_buf)
}

async fn close_with(
    worker: &'static Worker,
    stream: &mut Stream,
    mut out: Vec<u8>,
    why: CloseWith,
) -> WsStep {
    tracing::debug!(code = why.0, reason = why.1, "closing WebSocket");
    write_close(&mut out, why);
    let _ = write_all(stream, out, worker.settings().timeouts.write()).await;
    WsStep::Linger(take_buf())
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn accept_key_matches_rfc_example() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn frame_heads() {
        // Masked text "Hello" from RFC 6455 section 5.7.
        let f = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        let h = parse_frame_head(&f, 100).unwrap().unwrap();
        assert_eq!(
            (h.fin, h.opcode, h.header_len, h.payload_len),
            (true, OP_TEXT, 6, 5)
        );
        assert_eq!(parse_frame_head(&f[..3], 100), Ok(None));
        assert_eq!(
            parse_frame_head(&[0x81, 0x05], 100).unwrap_err().0,
            1002,
            "unmasked"
        );
        assert_eq!(
            parse_frame_head(&[0x81, 0xfe, 0x01, 0x00], 100)
                .unwrap_err()
                .0,
            1009
        );
        assert_eq!(
            parse_frame_head(&[0x09, 0x80, 0, 0, 0, 0], 100)
                .unwrap_err()
                .0,
            1002,
            "fragmented ping"
        );
    }

    #[test]
    fn server_frames_use_the_shortest_length() {
        let mut out = Vec::new();
        write_frame(&mut out, OP_TEXT, &[b'x'; 200]);
        assert_eq!(&out[..4], &[0x81, 126, 0, 200]);
    }
}
