//! The HTTP door's reverse proxy: one request to a namespace served by HTTP upstreams, forwarded
//! and its response streamed back.
//!
//! Owns one proxied exchange, from choosing the upstream to the last byte of the response:
//! - A request with an `Mcp-Session-Id` goes to the upstream named by the id's tag (see
//!   [`crate::upstream`]), with the tag removed; a tag no upstream of the namespace has, or whose
//!   upstream is gone (out of service, refusing connections), gets 404, which tells an MCP
//!   client to start a new session. Other requests go where the balancer says.
//! - The request body (already read whole, within `max_message_size`) is sent with the head in
//!   one write; the response streams: each piece the upstream sends is written to the client as
//!   it arrives (a `text/event-stream` event by event), never buffered whole. Chunked or
//!   close-delimited upstream bodies reach the client chunked.
//! - An event stream may stay silent for as long as it likes, but the client's side is watched
//!   meanwhile: a client that closes ends the stream and the upstream connection at once.
//! - Failures become a JSON-RPC error with 502 (refused, reset, bad response, no upstream) or 504
//!   (timeout) before any byte of the response went out; after that, the client connection is
//!   closed (a response cannot be taken back).

use std::time::Instant;

use monoio::io::AsyncReadRent;
use monoio::net::TcpStream;

use super::request::{Head, Method};
use super::response;
use crate::conn::{give_buf, take_buf, write_all};
use crate::upstream::client::{self, Body, ClientHead};
use crate::upstream::Failure;
use crate::worker::Worker;

/// How the exchange left the client connection.
pub enum Proxied {
    KeepAlive,
    Close,
}

/// Forwards one request (`raw_head` with `body`) to namespace `ns` and streams the answer to
/// `client`. `out` holds nothing yet; it is given back (cleared) or dropped.
#[allow(clippy::too_many_arguments)]
pub async fn forward(
    worker: &'static Worker,
    client: &mut TcpStream,
    raw_head: &[u8],
    head: &Head,
    body: &[u8],
    ns: usize,
    keep_alive: bool,
    mut out: Vec<u8>,
) -> Proxied {
    let all = worker.shared.upstreams;
    let s = worker.settings();
    let method = match head.method {
        Method::Get => "GET",
        Method::Post => "POST",
        Method::Delete => "DELETE",
        Method::Other => unreachable!("the door answers other methods itself"),
    };
    let session = head.session.map(|(a, b)| &raw_head[a..b]);
    let lease = match session {
        Some(id) => match all.session(ns, id) {
            Some((u, _)) => worker.balancer.pinned(u).map_err(|f| (f, true)),
            None => Err((Failure::NoUpstream, true)),
        },
        None => worker.balancer.pick(all, ns).map_err(|f| (f, false)),
    };
    let mut lease = match lease {
        Ok(l) => l,
        Err((f, pinned)) => return fail(worker, client, out, f, pinned, keep_alive).await,
    };
    let u = lease.upstream;
    let upstream_session = session.map(|id| &id[crate::upstream::TAG_LEN..]);
    let mut req = take_buf();
    client::write_request(
        &mut req,
        method,
        u,
        query(raw_head),
        Some(raw_head),
        upstream_session,
        body.len(),
    );
    req.extend_from_slice(body);
    let started = Instant::now();
    let mut c = ClientHead {
        out: &mut out,
        start: 0,
        tag: &u.tag,
        keep_alive,
        http11: head.http11,
    };
    let sent = client::send(all, u, req, false, Some(&mut c)).await;
    let keep_alive = c.keep_alive;
    let (mut up, mut buf, rh) = match sent {
        Ok(r) => r,
        Err(f) => {
            lease.record(worker.metrics, Err(f), started);
            out.clear();
            let gone = session.is_some() && f == Failure::Connect;
            return fail(worker, client, out, f, gone, keep_alive).await;
        }
    };
    lease.record(worker.metrics, Ok(rh.status), started);
    let chunk = !matches!(rh.body, client::BodyKind::Length(_)) && head.http11;
    let mut decoded = Body::new(rh.body);
    let mut data = take_buf();
    let mut watch = rh.event_stream;
    let mut ended = Proxied::Close;
    let mut reusable = false;
    loop {
        if decoded.feed(&mut buf, &mut data).is_err() {
            break; // the head went out: all we can do is close
        }
        if !data.is_empty() {
            if chunk {
                frame_chunk(&mut out, &data);
            } else {
                out.extend_from_slice(&data);
            }
            data.clear();
        }
        if decoded.is_done() && chunk {
            out.extend_from_slice(b"0\r\n\r\n");
        }
        if !out.is_empty() {
            match write_all(client, out, s.write_timeout).await {
                Ok(o) => out = o,
                Err(_) => {
                    out = take_buf();
                    break;
                }
            }
        }
        if decoded.is_done() {
            reusable = rh.keep_alive && !decoded.until_close() && buf.is_empty();
            ended = end(keep_alive);
            break;
        }
        // Event streams may be silent for long: no deadline, but a client that leaves ends it.
        let deadline = (!rh.event_stream).then(|| Instant::now() + all.request_timeout);
        match read_upstream(&mut up, &mut buf, deadline, client, &mut watch).await {
            Read::Data => {}
            Read::Eof if decoded.eof().is_ok() => {}
            Read::Eof | Read::Failed | Read::ClientGone => break,
        }
    }
    if reusable {
        client::give_back(u, up);
    }
    give_buf(data);
    give_buf(buf);
    give_buf(out);
    ended
}

fn end(keep_alive: bool) -> Proxied {
    if keep_alive {
        Proxied::KeepAlive
    } else {
        Proxied::Close
    }
}

/// The query part (with its `?`) of the request target in `raw_head`, or "".
fn query(raw_head: &[u8]) -> &str {
    let line = raw_head.split(|b| *b == b'\r').next().unwrap_or(b"");
    let target = line.split(|b| *b == b' ').nth(1).unwrap_or(b"");
    let target = std::str::from_utf8(target).unwrap_or("");
    target.find('?').map_or("", |i| &target[i..])
}

fn frame_chunk(out: &mut Vec<u8>, data: &[u8]) {
    use std::io::Write as _;
    let _ = write!(out, "{:x}\r\n", data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// Answers a request that could not be forwarded. `pinned`: it named a session whose upstream
/// is gone, which MCP answers with 404 (start a new session).
async fn fail(
    worker: &'static Worker,
    client: &mut TcpStream,
    mut out: Vec<u8>,
    f: Failure,
    pinned: bool,
    keep_alive: bool,
) -> Proxied {
    let (status, message) = if pinned && f != Failure::Timeout {
        (
            404,
            "session not found: its upstream is gone; start a new session",
        )
    } else {
        (f.status(), f.message())
    };
    tracing::debug!(status, reason = f.message(), "upstream request failed");
    response::error(&mut out, status, -32000, message, &[], keep_alive);
    match write_all(client, out, worker.settings().write_timeout).await {
        Ok(o) => {
            give_buf(o);
            end(keep_alive)
        }
        Err(_) => Proxied::Close,
    }
}

enum Read {
    Data,
    Eof,
    Failed,
    ClientGone,
}

/// Reads more of the upstream's response into `buf`, within `deadline` when there is one. While
/// `watch`, the client's socket is watched too: EOF from it ends the wait (`ClientGone`); bytes
/// from it (a pipelined request) end the watching, and are left for the door to read later.
async fn read_upstream(
    up: &mut TcpStream,
    buf: &mut Vec<u8>,
    deadline: Option<Instant>,
    client: &TcpStream,
    watch: &mut bool,
) -> Read {
    use monoio::buf::IoBufMut;
    if let Some(d) = deadline {
        return match crate::conn::read_more(up, buf, d).await {
            Ok(_) => Read::Data,
            Err(crate::conn::ReadError::Eof) => Read::Eof,
            Err(_) => Read::Failed,
        };
    }
    if buf.capacity() - buf.len() < 512 {
        buf.reserve(crate::conn::BUF_SIZE);
    }
    let (len, cap) = (buf.len(), buf.capacity());
    let read = up.read(std::mem::take(buf).slice_mut(len..cap));
    let mut read = std::pin::pin!(read);
    loop {
        if *watch {
            let readable = client.readable(false);
            monoio::select! {
                done = &mut read => return finish(done, buf),
                _ = readable => {
                    match peek(client) {
                        Peek::Closed => return Read::ClientGone,
                        Peek::Data => *watch = false,
                        Peek::Nothing => {}
                    }
                }
            }
        } else {
            let done = (&mut read).await;
            return finish(done, buf);
        }
    }
}

fn finish(
    (res, slice): (std::io::Result<usize>, monoio::buf::SliceMut<Vec<u8>>),
    buf: &mut Vec<u8>,
) -> Read {
    *buf = slice.into_inner();
    match res {
        Ok(0) => Read::Eof,
        Ok(_) => Read::Data,
        Err(_) => Read::Failed,
    }
}

enum Peek {
    Closed,
    Data,
    Nothing,
}

/// Looks at the client's socket without taking anything from it.
fn peek(client: &TcpStream) -> Peek {
    use std::os::fd::AsRawFd;
    let mut byte = 0u8;
    // SAFETY: a one-byte peek into a local on a socket this task holds; nothing is consumed.
    let n = unsafe {
        libc::recv(
            client.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => Peek::Closed,
        1.. => Peek::Data,
        _ => match std::io::Error::last_os_error().kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => Peek::Nothing,
            _ => Peek::Closed,
        },
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn query_is_kept() {
        assert_eq!(
            query(b"GET /mcp/x?a=1&b=2 HTTP/1.1\r\nHost: h\r\n\r\n"),
            "?a=1&b=2"
        );
        assert_eq!(query(b"POST /mcp HTTP/1.1\r\n\r\n"), "");
    }
}
