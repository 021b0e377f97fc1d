//! The HTTP door's reverse proxy: one request to a namespace served by HTTP upstreams, forwarded
//! and its response streamed back.
//!
//! Owns one proxied exchange, from choosing the upstream to the last byte of the response (a
//! request body still arriving is sent by `body.rs`, the response and event streams relayed by
//! `relay.rs`):
//! - A request with an `Mcp-Session-Id` goes to the upstream named by the id's tag (see
//!   [`crate::upstream`]), with the tag removed; a tag no upstream of the namespace has, or whose
//!   upstream is gone (out of service, refusing connections), gets 404, which tells an MCP
//!   client to start a new session. Other requests go where the balancer says, and, when no
//!   connection to that upstream could be made (nothing was sent: a body still arriving is read
//!   only once its connection is made), to another upstream of the namespace, each tried once.
//! - Bodies stream both ways. A request body already whole in the client buffer (the usual small
//!   JSON-RPC message) goes out with the head in one write, and may be retried once on a new
//!   connection when a pooled one turns out closed. A body still arriving (or chunked) is sent as
//!   it arrives, after the head, on a connection checked to be open: `Content-Length` bodies as
//!   they are, chunked ones re-chunked, within `max_message_size` (413 beyond) and `read_timeout`
//!   (408 beyond). The response: each piece the upstream sends is written to the client as it
//!   arrives (a `text/event-stream` event by event), never buffered whole. Chunked or
//!   close-delimited upstream bodies reach the client chunked.
//! - An event stream may stay silent for as long as it likes, but the client's side is watched
//!   meanwhile: a client that closes ends the stream and the upstream connection at once, and
//!   a drain (shutdown) ends it cleanly (last chunk, then close) instead of waiting for
//!   `shutdown_timeout`: MCP clients keep a standalone `GET` stream open all the time. So does a
//!   reload that removes the stream's upstream.
//! - Failures become a JSON-RPC error with 502 (refused, reset, bad response, no upstream) or 504
//!   (timeout) before any byte of the response went out; after that, the client connection is
//!   closed (a response cannot be taken back).

mod body;
mod relay;

use body::{stream_body, Sent};
pub use relay::{events, Events, Relayed};

use std::ops::Range;
use std::time::Instant;

use crate::boxed;
use crate::stream::Stream;

use super::request::{self, BodyKind, Head, Method, Refusal};
use super::response;
use crate::access::By;
use crate::conn::{give_buf, take_buf, write_all};
use crate::upstream::balance::Lease;
use crate::upstream::client;
use crate::upstream::wire::{self, ClientHead};
use crate::upstream::{Failure, Upstream, Upstreams};
use crate::worker::Worker;

/// How the exchange left the client connection.
pub enum Proxied {
    KeepAlive,
    Close,
    /// An error answer went out while the client may still be sending: close without a reset.
    Linger,
    /// The client's request was bad (or too slow): the door answers with this refusal.
    Refused(Refusal),
    /// The response is an event stream: its head and what came with it went out, and the door
    /// relays the rest with [`events`], after this exchange's state is gone (a stream may stay
    /// open for as long as the session; what it holds meanwhile is only [`Events`]).
    Events(Box<Events>),
}

/// What the client got, for the access log: the status of its answer (0: none went out) and who
/// gave it.
pub type Answered = (u16, By);

/// The request body, as the door has it.
pub enum ReqBody {
    /// Complete in the client buffer, at this range (empty for no body).
    InBuf(Range<usize>),
    /// Not all here yet (or chunked): forwarded as it arrives, the whole of it before `deadline`.
    Stream { kind: BodyKind, deadline: Instant },
}

/// Forwards the request whose head is `buf[..head.len]` to namespace `ns` and streams the answer
/// to `client`. The request's bytes are drained from `buf` (what follows, a pipelined request,
/// stays). `out` holds nothing yet; it is given back or dropped.
#[allow(clippy::too_many_arguments)]
pub async fn forward(
    worker: &'static Worker,
    client: &mut Stream,
    buf: &mut Vec<u8>,
    head: &Head,
    body: ReqBody,
    (all, ns): (&'static Upstreams, usize),
    keep_alive: bool,
    mut out: Vec<u8>,
    answered: &mut Answered,
) -> Proxied {
    let method = match head.method {
        Method::Get => "GET",
        Method::Post => "POST",
        Method::Delete => "DELETE",
        Method::Options => "OPTIONS",
        Method::Other => unreachable!("the door answers other methods itself"),
    };
    let raw_head = &buf[..head.len];
    // A standalone `GET` stream is not capped by `routing.max_in_flight`: every MCP client
    // holds one open, idle, all the time.
    let capped = head.method != Method::Get;
    // With a session id: its upstream, and the id without the tag, as that upstream issued it.
    let mut upstream_session = None;
    // The namespace's upstreams this request went to (see `pick_untried`).
    let mut tried = 0;
    let lease = match head.session.map(|(a, b)| &raw_head[a..b]) {
        Some(id) => match all.session(ns, id) {
            Some((u, own)) => {
                upstream_session = Some(own);
                worker.balancer.pinned(u, capped).map_err(|f| (f, true))
            }
            None => Err((Failure::NoUpstream, true)),
        },
        None => worker
            .balancer
            .pick_untried(all, ns, capped, &mut tried)
            .map_err(|f| (f, false)),
    };
    let pinned = head.session.is_some();
    let mut lease = match lease {
        Ok(l) => l,
        Err((f, pinned)) => {
            let ended = fail(worker, client, out, f, (pinned, keep_alive), answered).await;
            return drained(buf, head, &body, ended);
        }
    };
    answered.1 = By::Upstream(lease.upstream);
    let body_len = match &body {
        ReqBody::InBuf(r) => Some(r.len()),
        ReqBody::Stream {
            kind: BodyKind::Length(n),
            ..
        } => Some(*n),
        ReqBody::Stream { .. } => None, // chunked: forwarded chunked
    };
    let query = request::query(raw_head);
    // Protected-resource metadata is asked for at the client's path, which names the resource
    // as the client sees it, as a properly configured upstream names itself (RFC 8707).
    let path = match head.route {
        request::Route::Metadata(_) => Some(request::path(raw_head)),
        _ => None,
    };
    let (forwarded_for, identity) = (worker.forwarded_for(all, ns, client), client.identity());
    let request_to = |u: &Upstream| {
        let mut req = take_buf();
        let fields = wire::Fields::Client {
            head: raw_head,
            path,
            query,
            client: forwarded_for,
            identity,
        };
        wire::write_request(&mut req, method, u, fields, upstream_session, body_len);
        req
    };
    let mut req = request_to(lease.upstream);
    let mut c = ClientHead {
        out: &mut out,
        start: 0,
        tag: &lease.upstream.tag,
        keep_alive,
        http11: head.http11,
    };
    // Not reached (refused, no TLS with it, not connected in time): nothing was sent, so a
    // request no session pins goes to another upstream of the namespace, each tried once, and
    // only the last failure reaches the client. True when the lease moved (the answer's
    // upstream and session tag with it), false when the failure stands.
    let mut move_on =
        |lease: &mut Lease<'static>, failed, c: &mut ClientHead<'_>, answered: &mut Answered| {
            let balancer = &worker.balancer;
            let moved = !pinned && balancer.another(lease, failed, (all, ns), capped, &mut tried);
            if moved {
                answered.1 = By::Upstream(lease.upstream);
                c.tag = &lease.upstream.tag;
            }
            moved
        };
    let (sent, started) = match body {
        ReqBody::InBuf(range) => {
            req.extend_from_slice(&buf[range.clone()]);
            let sent = loop {
                let started = Instant::now();
                let f = match client::send(all, lease.upstream, req, Some(&mut c)).await {
                    Err(f) => f,
                    sent => break (sent, started),
                };
                if !move_on(&mut lease, (f, started), &mut c, answered) {
                    break (Err(f), started);
                }
                req = request_to(lease.upstream);
                req.extend_from_slice(&buf[range.clone()]);
            };
            buf.drain(..range.end.max(head.len));
            sent
        }
        ReqBody::Stream { kind, deadline } => {
            // The connection first: the body is read from the client only once it has
            // somewhere to go.
            let opened = loop {
                let started = Instant::now();
                let f = match client::open(all, lease.upstream, false).await {
                    Ok((up, _)) => break Ok(up),
                    Err(f) => f,
                };
                if !move_on(&mut lease, (f, started), &mut c, answered) {
                    break Err(f);
                }
                give_buf(std::mem::replace(&mut req, request_to(lease.upstream)));
            };
            buf.drain(..head.len);
            let streamed = match opened {
                // Boxed: a body still arriving is the rarer path; the exchange's future does
                // not grow by its state.
                Ok(up) => {
                    let body =
                        stream_body(worker, client, buf, head, kind, deadline, (all, up), req);
                    boxed::pin(body).await
                }
                Err(f) => {
                    give_buf(req);
                    Err(Sent::Upstream(f))
                }
            };
            match streamed {
                Ok(mut up) => {
                    let started = Instant::now();
                    let until = started + all.request_timeout;
                    let got = match client::read_head(&mut up, Some(&mut c), until).await {
                        Ok((ubuf, rh)) => Ok((up, ubuf, rh)),
                        Err(client::HeadError::Stale) => Err(Failure::Reset),
                        Err(client::HeadError::Failed(f)) => Err(f),
                    };
                    (got, started)
                }
                Err(Sent::Upstream(f)) => {
                    lease.record(worker.metrics, Err(f), Instant::now());
                    out.clear();
                    let gone = pinned && f.unreachable();
                    return fail(worker, client, out, f, (gone, false), answered).await;
                }
                Err(Sent::Client(ended)) => return ended,
            }
        }
    };
    let keep_alive = c.keep_alive;
    let (up, ubuf, rh) = match sent {
        Ok(r) => r,
        Err(f) => {
            lease.record(worker.metrics, Err(f), started);
            out.clear();
            let gone = pinned && f.unreachable();
            return fail(worker, client, out, f, (gone, keep_alive), answered).await;
        }
    };
    lease.record(worker.metrics, Ok(rh.status), started);
    answered.0 = rh.status;
    if rh.event_stream && buf.is_empty() {
        // A stream may stay open for as long as the session: the client's read buffer goes
        // back meanwhile (the door takes another for the next request).
        give_buf(std::mem::take(buf));
    }
    relay::response(
        worker,
        client,
        up,
        ubuf,
        &rh,
        head.http11,
        keep_alive,
        out,
        (all, lease),
    )
    .await
}

/// Drains the request from `buf` when it was answered without being forwarded.
fn drained(buf: &mut Vec<u8>, head: &Head, body: &ReqBody, ended: Proxied) -> Proxied {
    match body {
        ReqBody::InBuf(r) => {
            buf.drain(..r.end.max(head.len));
            ended
        }
        // The rest of the body is still coming: it cannot be skipped, only lingered away.
        ReqBody::Stream { .. } => match ended {
            Proxied::KeepAlive | Proxied::Linger => Proxied::Linger,
            other => other,
        },
    }
}

fn end(keep_alive: bool) -> Proxied {
    if keep_alive {
        Proxied::KeepAlive
    } else {
        Proxied::Close
    }
}

/// Answers a request that could not be forwarded. `pinned`: it named a session whose upstream
/// is gone, which MCP answers with 404 (start a new session).
async fn fail(
    worker: &'static Worker,
    client: &mut Stream,
    mut out: Vec<u8>,
    f: Failure,
    (pinned, keep_alive): (bool, bool),
    answered: &mut Answered,
) -> Proxied {
    let (status, message) = if pinned
        && !matches!(
            f,
            Failure::Timeout | Failure::ConnectTimeout | Failure::Busy
        ) {
        (
            404,
            "session not found: its upstream is gone; start a new session",
        )
    } else {
        (f.status(), f.message())
    };
    answered.0 = status;
    tracing::debug!(status, reason = f.message(), "upstream request failed");
    // Busy is the one failure worth retrying soon: say when, as the connection limits do.
    let retry: &[(&str, &str)] = if f == Failure::Busy {
        &[("Retry-After", "1")]
    } else {
        &[]
    };
    response::error(&mut out, status, -32000, message, retry, keep_alive);
    match write_all(client, out, worker.settings().timeouts.write()).await {
        Ok(o) => {
            give_buf(o);
            // Closing right after an error answer could reset it away: linger instead.
            if keep_alive {
                Proxied::KeepAlive
            } else {
                Proxied::Linger
            }
        }
        Err(_) => Proxied::Close,
    }
}
