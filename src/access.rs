//! The access log: when `server.access_log` is on, one line per request the HTTP door answers
//! and one per message a WebSocket or MCPB connection forwards or has answered by
//! `builtin:echo`.
//!
//! Owns what a line says. A request: the client's address (the one a trusted load balancer
//! relayed, if any), the method, the path (never the query, which may carry secrets), the
//! status, the upstream that answered (`builtin:echo` for the gateway's own, `-` when the gateway
//! refused it), whether the answer is an event stream, and the time from the request's head to
//! the end of its answer (for an event stream, to the end of what came with its head: the line is
//! written when the stream starts). A message: its door, the client, the upstream, the
//! upstream's HTTP status (0 when none came: the client got a JSON-RPC error), and the time
//! until its answer was queued for the client.
//!
//! Invariants:
//! - Off (the default), a request or message costs one relaxed load of a flag and nothing else.
//! - Lines go through the process's log (target `access`, level info): formatted by the
//!   worker, written by the log's own thread, dropped and counted when stderr does not take
//!   them, never waited for ([`crate::logging`]).
//! - A request the door could not read far enough to have a request line (malformed, too
//!   large, too slow) gets no line, nor does a message refused before it was sent anywhere
//!   (over the rate, its namespace gone): the metrics count those. A request refused for its
//!   fields (no `Host`, ambiguous framing) does get one.

use std::net::IpAddr;
use std::time::Instant;

use crate::metrics::Frontend;
use crate::stream::Stream;
use crate::upstream::Upstream;
use crate::worker::Worker;

/// Longest path a line shows; a longer one is cut (and says so with a trailing `...`).
const MAX_PATH: usize = 256;

/// A request being answered, noted when the access log is on.
pub struct Request {
    method: Box<str>,
    path: Box<str>,
    started: Instant,
}

/// Who answered a request, for its line.
#[derive(Clone, Copy)]
pub enum By {
    /// The gateway itself, refusing it (the line says `-`).
    Gateway,
    /// An upstream (`builtin:echo` included).
    Upstream(&'static Upstream),
}

/// Notes the request whose head is `raw_head`, if the access log is on.
pub fn begin(raw_head: &[u8]) -> Option<Request> {
    if !crate::logging::access_log() {
        return None;
    }
    let (method, target) = crate::http::request::request_line(raw_head);
    let method = String::from_utf8_lossy(method);
    let target = target.split(|b| *b == b'?').next().unwrap_or(b"");
    let mut path = String::from_utf8_lossy(&target[..target.len().min(MAX_PATH)]).into_owned();
    if target.len() > MAX_PATH {
        path.push_str("...");
    }
    Some(Request {
        method: method.into(),
        path: path.into(),
        started: Instant::now(),
    })
}

/// Writes the line of `request` (nothing when the access log was off for it, or when no answer
/// went out: `status` 0).
pub fn end(
    request: Option<Request>,
    worker: &Worker,
    stream: &Stream,
    status: u16,
    by: By,
    event_stream: bool,
) {
    let Some(r) = request.filter(|_| status != 0) else {
        return;
    };
    let upstream = match by {
        By::Gateway => "-",
        By::Upstream(u) => u.url.as_str(),
    };
    let client = worker.client_addr(stream);
    tracing::info!(
        target: "access",
        client = %Client(client),
        method = %r.method,
        path = %r.path,
        status,
        upstream = %upstream,
        event_stream,
        ms = millis(r.started),
        "request"
    );
}

/// What a message's line needs from its connection, taken when the message is sent on (`None`
/// when the access log is off): the client, and when the message started.
pub type MessageStart = Option<(Option<IpAddr>, Instant)>;

/// Notes a message of the connection on `stream`, if the access log is on.
pub fn message_begin(worker: &Worker, stream: &Stream) -> MessageStart {
    crate::logging::access_log().then(|| (worker.client_addr(stream), Instant::now()))
}

/// Writes the line of a message on `door` that `upstream` answered with HTTP `status`.
pub fn message_end(begun: MessageStart, door: Frontend, upstream: Option<&Upstream>, status: u16) {
    let Some((client, started)) = begun else {
        return;
    };
    tracing::info!(
        target: "access",
        door = %door.label(),
        client = %Client(client),
        upstream = %upstream.map_or("-", |u| u.url.as_str()),
        status,
        ms = millis(started),
        "message"
    );
}

/// A client's address as a line shows it: `-` when unknown.
struct Client(Option<IpAddr>);

impl std::fmt::Display for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => a.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// Milliseconds since `started`, to the microsecond.
fn millis(started: Instant) -> f64 {
    started.elapsed().as_micros() as f64 / 1e3
}

/// The status of the response that starts at `out[start..]` (written by the gateway itself).
pub fn status_at(out: &[u8], start: usize) -> u16 {
    out.get(start + 9..start + 12)
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_line_gives_method_and_path_without_the_query() {
        crate::logging::set_access_log(true);
        let r = begin(b"POST /mcp/tools?token=secret HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!((&*r.method, &*r.path), ("POST", "/mcp/tools"));
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(1000));
        let r = begin(long.as_bytes()).unwrap();
        assert_eq!(r.path.len(), MAX_PATH + 3);
        assert!(r.path.ends_with("..."));
        crate::logging::set_access_log(false);
        assert!(begin(b"GET /mcp HTTP/1.1\r\n\r\n").is_none());
    }

    #[test]
    fn the_status_is_read_from_the_written_response() {
        let out = b"HTTP/1.1 200 OK\r\n\r\nHTTP/1.1 429 Too Many Requests\r\n";
        assert_eq!(status_at(out, 0), 200);
        assert_eq!(status_at(out, 19), 429);
        assert_eq!(status_at(out, 60), 0);
    }
}
