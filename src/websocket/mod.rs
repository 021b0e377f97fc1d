//! The WebSocket front door (RFC 6455): the upgrade handshake and the message loop of an upgraded
//! connection. Each text message is one JSON-RPC message (or batch) for the namespace's upstream;
//! each reply goes back as one text message.
//!
//! Owns the handshake and the connection after the `101 Switching Protocols`; the frame codec
//! and message assembly are [`frames`], which keeps a message under `max_message_size`.
//!
//! Invariants:
//! - A protocol violation [`frames`] reports is answered with a close frame of its code (1002,
//!   1003, 1007, 1009), counted in `mcp_gateway_protocol_errors_total`, then a lingering close.
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

use crate::conn::{first_bytes, give_buf, linger_close, take_buf, write_all, ReadError};
use crate::http::request::Upgrade;
use crate::http::response;
use crate::limiter::Permit;
use crate::metrics::{Frontend, ProtocolError};
use crate::upstream::rpc::{Framing, Message, MsgSession, Next};
use crate::worker::{Registration, Worker};

pub mod frames;

use frames::{write_close, write_frame, CloseWith, Frame, Messages, OP_TEXT};

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

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
        let mut messages = Messages::default();
        loop {
            if !expired && pending.is_none() {
                let may_park = !messages.in_message();
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
                &mut messages,
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
    messages: &mut Messages,
    session: &mut MsgSession,
) -> WsStep {
    let s = worker.settings();
    let max = s.max_message_size();
    let deadline = Instant::now() + s.timeouts.read();
    let Some(mut buf) = first_bytes(stream, pending, deadline).await else {
        return WsStep::Close;
    };
    let mut out = take_buf();
    loop {
        let message = match messages.read(&mut buf, max, &mut out) {
            Ok(Frame::Message(m)) => m,
            Ok(Frame::Handled) => continue,
            Ok(Frame::Incomplete(whole)) => {
                if buf.is_empty() {
                    // Nothing pending: flush (with what forwarded messages already got back) and
                    // go back to waiting without a buffer.
                    give_buf(buf);
                    session.drain(&mut out, &FRAMING);
                    return flush(stream, out, s.timeouts.write())
                        .await
                        .map_or(WsStep::Close, |_| WsStep::Continue(None));
                }
                if let Some(n) = whole {
                    buf.reserve(n - buf.len());
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
            Ok(Frame::Close(code)) => {
                write_close(&mut out, CloseWith(code, ""));
                let _ = write_all(stream, out, s.timeouts.write()).await;
                return WsStep::Linger(buf);
            }
            Err(why) => {
                let kind = if why.0 == 1009 {
                    ProtocolError::TooLarge
                } else {
                    ProtocolError::Malformed
                };
                worker.metrics.protocol_error(Frontend::WebSocket, kind);
                give_buf(buf);
                return close_with(worker, stream, out, why).await;
            }
        };
        let handled = session.handle(
            worker,
            permit,
            Message::Owned(message),
            stream,
            &mut out,
            &FRAMING,
        );
        if handled.await.is_err() {
            return WsStep::Close;
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
}
