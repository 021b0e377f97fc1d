//! The HTTP door's refusals: a request it will not serve (400, 408, 413, 415, 431, 501: see
//! [`super::request`]), a connection refused before its first request (a bad PROXY header), and
//! a connection the limiter refused (429 or 503).
//!
//! Invariants: every refusal is a whole response with a JSON-RPC error body and `Connection:
//! close`, counted and logged; the connection then closes without a reset: it lingers, reading
//! what the client still sends, unless the whole request was read (plain TCP only; TLS lingers
//! to end its session properly). A limiter refusal reads at most 8 KiB of the request head, for
//! at most 2 s (or `read_timeout`, if shorter).

use std::time::{Duration, Instant};

use monoio::net::TcpStream;

use super::request::{parse_head, BodyKind, Refusal};
use super::{response, Step};
use crate::conn::{give_buf, linger_close, open, read_more, take_buf, write_all};
use crate::limiter::Rejection;
use crate::metrics::Frontend;
use crate::stream::Stream;
use crate::worker::Worker;

/// Sends a refusal and tells the caller to linger-close.
pub(super) async fn refuse(
    worker: &'static Worker,
    stream: &mut Stream,
    buf: Vec<u8>,
    mut out: Vec<u8>,
    r: Refusal,
) -> Step {
    worker.metrics.protocol_error(Frontend::Http, r.kind);
    tracing::debug!(
        status = r.status,
        reason = r.message,
        "refusing HTTP request"
    );
    let code = if r.status == 408 { -32000 } else { -32600 };
    response::error(&mut out, r.status, code, r.message, &[], false);
    if let Ok(o) = write_all(stream, out, worker.settings().timeouts.write()).await {
        give_buf(o);
    }
    Step::Linger(buf)
}

/// Answers a connection refused before its first request (a bad PROXY header) with `r`, counted
/// and logged like any refusal, then closes without a reset.
pub async fn refuse_connection(worker: &'static Worker, tcp: TcpStream, r: Refusal) {
    let mut stream = Stream::Plain(tcp);
    if let Step::Linger(buf) = refuse(worker, &mut stream, take_buf(), take_buf(), r).await {
        linger_close(stream, Some(buf)).await;
    }
}

/// Answers a connection the limiter refused: reads its request head (bounded in size and time),
/// sends 429 or 503 with `Retry-After: 1`, and closes without a reset. When the doors speak TLS,
/// the handshake comes first (a browser or SDK client reads the status only inside TLS).
pub async fn reject(worker: &'static Worker, tcp: TcpStream, why: Rejection) {
    let Some(mut stream) = open(worker, tcp, Frontend::Http).await else {
        return;
    };
    let mut buf = take_buf();
    let deadline = Instant::now()
        + worker
            .settings()
            .timeouts
            .read()
            .min(Duration::from_secs(2));
    while buf.len() < 8 * 1024 && !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        if read_more(&mut stream, &mut buf, deadline).await.is_err() {
            if buf.is_empty() {
                return; // the client left (or sent nothing): nothing to answer
            }
            break;
        }
    }
    let message = match why {
        Rejection::PerIp => "too many connections from your address (max_connections_per_ip)",
        Rejection::ConnectionRate => {
            "your address opens connections too fast (max_new_connections_per_ip)"
        }
        Rejection::Global => "gateway at its connection limit (max_connections)",
        Rejection::IpTableFull => "gateway cannot track more client addresses",
    };
    let mut out = take_buf();
    response::error(
        &mut out,
        why.http_status(),
        -32000,
        message,
        &[("Retry-After", "1")],
        false,
    );
    if let Ok(o) = write_all(&mut stream, out, worker.settings().timeouts.write()).await {
        give_buf(o);
    }
    if matches!(stream, Stream::Plain(_)) && read_whole(&buf) {
        // Nothing of the request is left unread: closing now cannot reset the answer away, and
        // saves the lingering read (about a fifth of what a refusal costs). TLS lingers to
        // end its session properly.
        give_buf(buf);
        return;
    }
    buf.clear();
    linger_close(stream, Some(buf)).await;
}

/// Whether `buf` holds a whole request (a head, and all of the body its `Content-Length` gives),
/// so that a refused client has nothing more to send.
fn read_whole(buf: &[u8]) -> bool {
    match parse_head(buf, |_| None) {
        Ok(Some(head)) => match head.body {
            BodyKind::None => true,
            BodyKind::Length(n) => buf.len() >= head.len + n,
            BodyKind::Chunked => false,
        },
        _ => false,
    }
}
