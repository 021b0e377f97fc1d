//! The HTTP front door: MCP Streamable HTTP on `/mcp` and `/mcp/{namespace}`, and the WebSocket
//! upgrade on the same paths.
//!
//! Owns an admitted HTTP connection from its first byte to its close (or to its hand-over to
//! [`crate::websocket`] after an upgrade); its refusals, and the replies owed to connections the
//! limiter refused, are in `refuse`.
//! Requests for a namespace of `builtin:echo` are answered here; those for HTTP upstreams are
//! forwarded by [`proxy`], once their head is read (the body streams on from there).
//!
//! Invariants:
//! - Between requests a connection holds no buffer: it waits for readiness, then the request is
//!   handled in a separately allocated future with pooled buffers, so an idle connection costs
//!   only its small waiting state.
//! - Keep-alive and pipelining: requests on one connection are answered in order; answers to
//!   pipelined requests already in the buffer go out in one write.
//! - Every refusal (400, 408, 413, 415, 431, 501) is a complete response with a JSON-RPC error
//!   body and `Connection: close`, followed by a lingering close, so the client reads it instead
//!   of a reset.
//! - A request over its address's request rate (`server.max_requests_per_ip`) is read whole, its
//!   body discarded, and answered 429 with `Retry-After`; it keeps the connection and never
//!   reaches an upstream.
//! - A request (or WebSocket handshake) whose `Origin` is not allowed ([`origin`]) is refused
//!   403 before anything else is done with it.
//! - A request must arrive whole within `read_timeout` of its first byte (a forwarded body too);
//!   an idle keep-alive connection is closed after `idle_timeout`.

pub mod origin;
pub mod proxy;
mod refuse;
pub mod request;
pub mod response;

use refuse::refuse;
pub use refuse::{refuse_connection, reject};

use std::future::Future;
use std::rc::Rc;
use std::time::Instant;

use crate::boxed;
use crate::stream::Stream;

use crate::access::{self, By};
use crate::conn::{
    give_buf, linger_close, read_more, take_buf, wait_idle, write_all, ReadError, Wait,
};
use crate::echo;
use crate::limiter::{rate, Permit};
use crate::metrics::Frontend;
use crate::park::Held;
use crate::upstream::wire::Carried;
use crate::upstream::{Namespace, Outcome, Upstreams};
use crate::websocket;
use crate::worker::{Registration, Worker};
use proxy::{Proxied, ReqBody};
use request::{parse_head, BodyKind, ChunkStep, Chunked, Head, Method, Refusal, Route};

/// A connection switched to WebSocket: what the WebSocket door goes on with.
pub struct Upgraded {
    /// What the client sent after the upgrade request.
    pub rest: Vec<u8>,
    /// The namespace its messages go to (of the view in force at the upgrade).
    pub namespace: &'static Namespace,
    /// What the upgrade request says that the session's upstream requests say too.
    pub carried: Option<Rc<Carried>>,
}

/// How one exchange (one or more requests) left the connection.
enum Step {
    /// Wait for the next request; holds the bytes of a partial pipelined request, if any.
    KeepAlive(Option<Vec<u8>>),
    /// Close now.
    Close,
    /// An error reply was sent: close without resetting it away.
    Linger(Vec<u8>),
    /// Switched protocols: hand the connection to the WebSocket door (boxed: a step is held in
    /// every HTTP connection's future).
    Upgrade(Box<Upgraded>),
    /// A proxied response is an event stream: relay it ([`proxy::events`]), then go on with the
    /// bytes of a pipelined request, if any.
    Events(Box<proxy::Events>),
    /// The sweeper asks the connection to park with its event stream ([`crate::park`]).
    Park(Box<proxy::Events>),
}

/// Serves an admitted connection on the HTTP port until it closes, parks ([`crate::park`]), or
/// is upgraded to WebSocket, which goes on in a task of its own; `permit` is held until then.
/// `pending`: bytes of its next request already read (an empty buffer: it left the parking lot
/// readable, so read at once).
///
/// An `async` block rather than an `async fn`: an `async fn` keeps a second copy of its arguments
/// in its state (rustc issue 62958), which cost 88 bytes per idle connection here.
#[allow(clippy::manual_async_fn)] // on purpose: see above
pub fn serve(
    worker: &'static Worker,
    mut stream: Stream,
    mut permit: Permit,
    mut reg: Registration,
    mut pending: Option<Vec<u8>>,
) -> impl Future<Output = ()> {
    async move {
        let upgraded = 'serve: loop {
            if pending.is_none() {
                if worker.draining() {
                    return;
                }
                let s = worker.settings();
                let limit = if reg.served() {
                    s.timeouts.idle()
                } else {
                    s.timeouts.read()
                };
                match wait_idle(worker, &reg, &stream, limit).await {
                    Wait::Ready => {}
                    // Idle past the limit, draining, or a socket error: close quietly.
                    Wait::Expired => return,
                    Wait::Park => match worker.park(stream, permit, reg, Held::Nothing) {
                        Ok(()) => return,
                        Err(back) => {
                            (stream, permit, reg, _) = back;
                            continue; // it waits on in this task
                        }
                    },
                }
            }
            reg.set_served();
            let exchanged = exchange(worker, &permit, &mut stream, pending.take());
            let mut step = boxed::pin(exchanged).await;
            pending = loop {
                match step {
                    Step::KeepAlive(rest) => break rest,
                    Step::Close => return,
                    Step::Linger(buf) => return boxed::pin(linger_close(stream, Some(buf))).await,
                    Step::Events(events) => {
                        step = boxed::pin(relay_events(worker, &reg, &mut stream, events)).await
                    }
                    Step::Park(events) => match worker.park_holding(stream, permit, reg, events) {
                        Ok(()) => return,
                        Err(back) => {
                            let events;
                            (stream, permit, reg, events) = back;
                            step = Step::Events(events); // it waits on in this task
                        }
                    },
                    Step::Upgrade(upgraded) => break 'serve upgraded,
                }
            };
        };
        // The WebSocket door goes on in a task of its own: what this one held is freed.
        reg.switch(Frontend::WebSocket);
        crate::worker::serve_upgraded(worker, stream, permit, reg, *upgraded);
    }
}

/// Serves a connection that left the parking lot with its event stream (see [`crate::park`]):
/// relays the stream on (parking again as the sweeper asks), then serves the connection's next
/// requests as [`serve`] does, if it stays open.
#[allow(clippy::manual_async_fn)] // as `serve`
pub fn serve_relay(
    worker: &'static Worker,
    mut stream: Stream,
    mut permit: Permit,
    mut reg: Registration,
    mut events: Box<proxy::Events>,
) -> impl Future<Output = ()> {
    async move {
        loop {
            match boxed::pin(relay_events(worker, &reg, &mut stream, events)).await {
                Step::Park(e) => match worker.park_holding(stream, permit, reg, e) {
                    Ok(()) => return,
                    Err(back) => (stream, permit, reg, events) = back,
                },
                Step::KeepAlive(rest) => return serve(worker, stream, permit, reg, rest).await,
                Step::Linger(buf) => return boxed::pin(linger_close(stream, Some(buf))).await,
                _ => return, // closed: a relay ends in nothing else
            }
        }
    }
}

/// Relays an event stream (see [`Step::Events`]) and counts its request once it ends; then the
/// connection goes on with the pipelined request that came after it, if any, or closes.
async fn relay_events(
    worker: &'static Worker,
    reg: &Registration,
    stream: &mut Stream,
    mut events: Box<proxy::Events>,
) -> Step {
    let (rest, started) = (events.rest.take(), events.started);
    let ended = match proxy::events(worker, reg, stream, events, rest.is_none()).await {
        proxy::Relayed::Ended(e) => e,
        proxy::Relayed::Park(events) => return Step::Park(events),
    };
    worker.metrics.request(Frontend::Http, started.elapsed());
    match (ended, rest) {
        (Proxied::KeepAlive, rest) => Step::KeepAlive(rest),
        (_, None) => Step::Close,
        (_, Some(rest)) => Step::Linger(rest),
    }
}

/// Reads and answers requests while bytes are available.
async fn exchange(
    worker: &'static Worker,
    permit: &Permit,
    stream: &mut Stream,
    pending: Option<Vec<u8>>,
) -> Step {
    let s = worker.settings();
    let mut buf = pending.unwrap_or_else(take_buf);
    let mut out = take_buf();
    loop {
        let deadline = Instant::now() + s.timeouts.read();
        // The upstreams this request goes by, whatever a reload publishes meanwhile.
        let all = worker.upstreams();
        let head = loop {
            match parse_head(&buf, |n| all.namespace(n)) {
                Ok(Some(head)) => break head,
                Ok(None) => {}
                Err(refusal) => {
                    // Refused for its fields (`Host`, framing), not its syntax: its request line
                    // was read, so the access log has a line for it.
                    if let Some(a) = access::begin(&buf).filter(|_| request::is_http(&buf)) {
                        access::end(Some(a), worker, stream, refusal.status, By::Gateway, false);
                    }
                    return refuse(worker, stream, buf, out, refusal).await;
                }
            }
            // Answers already made go out before we wait on the client again.
            if !out.is_empty() {
                match write_all(stream, out, s.timeouts.write()).await {
                    Ok(o) => out = o,
                    Err(_) => return Step::Close,
                }
            }
            let started_head = !buf.is_empty();
            match read_more(stream, &mut buf, deadline).await {
                Ok(_) => {}
                Err(ReadError::TimedOut) if started_head => {
                    return refuse(worker, stream, buf, out, request::TIMEOUT).await
                }
                Err(_) => {
                    give_buf(out);
                    return Step::Close;
                }
            }
        };
        let access = access::begin(&buf[..head.len]);
        // A browser page of an origin not allowed (DNS rebinding, cross-site WebSocket): 403.
        if let (Route::Mcp(_), Some((from, to))) = (&head.route, head.origin) {
            if !s.allowed_origins.get().allows(&buf[from..to]) {
                let r = request::FORBIDDEN_ORIGIN;
                access::end(access, worker, stream, r.status, By::Gateway, false);
                return refuse(worker, stream, buf, out, r).await;
            }
        }
        // Over the address's request rate: the request is read (its body discarded) and answered
        // 429, and the connection stays open.
        let limited = match head.route {
            Route::Mcp(_) | Route::Metadata(_) => {
                worker.admit_request(permit, Frontend::Http).err()
            }
            _ => None,
        };
        if let Some(ns) = proxied(all, &head).filter(|_| limited.is_none()) {
            // Answers queued for earlier pipelined requests go first, in order.
            if !out.is_empty() {
                match write_all(stream, out, s.timeouts.write()).await {
                    Ok(o) => out = o,
                    Err(_) => return Step::Close,
                }
            }
            let body = match head.body {
                BodyKind::None => ReqBody::InBuf(head.len..head.len),
                BodyKind::Length(n) if n > s.max_message_size() => {
                    let r = request::BODY_TOO_LARGE;
                    access::end(access, worker, stream, r.status, By::Gateway, false);
                    return refuse(worker, stream, buf, out, r).await;
                }
                BodyKind::Length(n) if buf.len() >= head.len + n => {
                    ReqBody::InBuf(head.len..head.len + n)
                }
                kind => ReqBody::Stream { kind, deadline },
            };
            let started = Instant::now();
            let keep_alive = head.keep_alive && !worker.draining();
            let mut answered = (0, By::Gateway);
            let forwarded = proxy::forward(
                worker,
                stream,
                &mut buf,
                &head,
                body,
                (all, ns),
                keep_alive,
                out,
                &mut answered,
            );
            let ended = boxed::pin(forwarded).await;
            let (status, by) = match ended {
                Proxied::Refused(r) => (r.status, By::Gateway),
                _ => answered,
            };
            let streaming = matches!(ended, Proxied::Events(_));
            access::end(access, worker, stream, status, by, streaming);
            if !streaming {
                // (An event stream's request counts when the stream ends.)
                worker.metrics.request(Frontend::Http, started.elapsed());
            }
            match ended {
                Proxied::Events(mut events) => {
                    // Relayed by `serve`, once this exchange's state is gone.
                    events.rest = if buf.is_empty() {
                        give_buf(buf);
                        None
                    } else {
                        Some(buf)
                    };
                    events.started = started;
                    return Step::Events(events);
                }
                Proxied::KeepAlive if buf.is_empty() => {
                    give_buf(buf);
                    return Step::KeepAlive(None);
                }
                Proxied::KeepAlive => {
                    out = take_buf();
                    continue; // more pipelined requests are already here
                }
                Proxied::Close if buf.is_empty() => return Step::Close,
                Proxied::Close | Proxied::Linger => return Step::Linger(buf),
                Proxied::Refused(r) => return refuse(worker, stream, buf, take_buf(), r).await,
            }
        }
        let (consumed, body) = match read_body(worker, stream, &mut buf, &head, deadline).await {
            Ok(b) => b,
            Err(Some(refusal)) => {
                access::end(access, worker, stream, refusal.status, By::Gateway, false);
                return refuse(worker, stream, buf, out, refusal).await;
            }
            Err(None) => return Step::Close,
        };
        let start = out.len();
        let started = Instant::now();
        let keep_alive = head.keep_alive && !worker.draining();
        if let Some(wait) = limited {
            let retry = wait.to_string();
            let retry = [("Retry-After", retry.as_str())];
            response::error(&mut out, 429, -32000, rate::REFUSAL, &retry, keep_alive);
            access::end(access, worker, stream, 429, By::Gateway, false);
        } else if let (Some(upgrade), Route::Mcp(ns)) = (&head.upgrade, head.route) {
            let status = websocket::handshake(upgrade, &mut out);
            access::end(access, worker, stream, status, By::Gateway, false);
            if status != 101 {
                worker
                    .metrics
                    .protocol_error(Frontend::Http, crate::metrics::ProtocolError::Malformed);
                buf.drain(..consumed);
                let _ = write_all(stream, out, s.timeouts.write()).await;
                return Step::Linger(buf);
            }
            match write_all(stream, out, s.timeouts.write()).await {
                Ok(o) => give_buf(o),
                Err(_) => return Step::Close,
            }
            let carried = Carried::of_upgrade(&buf[..head.len]);
            buf.drain(..consumed);
            return Step::Upgrade(Box::new(Upgraded {
                rest: buf,
                namespace: &all.namespaces[ns],
                carried,
            }));
        } else {
            let body_bytes = match &body {
                Some(decoded) => decoded.as_slice(),
                None => &buf[head.len..consumed],
            };
            let raw = &buf[..head.len];
            answer(worker, all, (&head, raw), body_bytes, keep_alive, &mut out);
            worker.metrics.request(Frontend::Http, started.elapsed());
            let by = match head.route {
                Route::Mcp(ns) | Route::Metadata(ns) => {
                    By::Upstream(all.namespaces[ns].upstreams[0])
                }
                _ => By::Gateway,
            };
            access::end(
                access,
                worker,
                stream,
                access::status_at(&out, start),
                by,
                false,
            );
        }
        if let Some(b) = body {
            give_buf(b);
        }
        buf.drain(..consumed);
        if !keep_alive || buf.is_empty() {
            match write_all(stream, out, s.timeouts.write()).await {
                Ok(o) => give_buf(o),
                Err(_) => return Step::Close,
            }
            if !keep_alive {
                return if buf.is_empty() {
                    Step::Close
                } else {
                    Step::Linger(buf)
                };
            }
            give_buf(buf);
            return Step::KeepAlive(None);
        }
        // More pipelined bytes are already here: go round without waiting.
    }
}

/// The namespace when `head` is a request for HTTP upstreams (not `builtin:echo`, not an
/// upgrade; for the protected-resource metadata, a `GET`).
fn proxied(all: &Upstreams, head: &Head) -> Option<usize> {
    match head.route {
        Route::Mcp(ns)
            if !all.namespaces[ns].builtin
                && head.method != Method::Other
                && head.upgrade.is_none() =>
        {
            Some(ns)
        }
        Route::Metadata(ns)
            if !all.namespaces[ns].builtin
                && head.method == Method::Get
                && head.upgrade.is_none() =>
        {
            Some(ns)
        }
        _ => None,
    }
}

/// Reads the body of `head`. Returns the offset where the request ends in `buf` and, for a
/// chunked body, the decoded bytes (a `Content-Length` body is `buf[head.len..end]`; a chunked
/// one's framing is dropped from `buf` as it is decoded, so its request ends at `head.len`).
/// `Err(None)`: the client went away.
async fn read_body(
    worker: &'static Worker,
    stream: &mut Stream,
    buf: &mut Vec<u8>,
    head: &Head,
    deadline: Instant,
) -> Result<(usize, Option<Vec<u8>>), Option<Refusal>> {
    let s = worker.settings();
    let more = |e: ReadError| match e {
        ReadError::TimedOut => Some(request::TIMEOUT),
        _ => None,
    };
    match head.body {
        BodyKind::None => Ok((head.len, None)),
        BodyKind::Length(n) => {
            if n > s.max_message_size() {
                return Err(Some(request::BODY_TOO_LARGE));
            }
            let end = head.len + n;
            if buf.len() < end {
                continue_if_expected(worker, stream, head).await?;
                buf.reserve(end - buf.len());
            }
            while buf.len() < end {
                read_more(stream, buf, deadline).await.map_err(more)?;
            }
            Ok((end, None))
        }
        BodyKind::Chunked => {
            let mut decoder = Chunked::new(head.len);
            let mut body = take_buf();
            let mut asked = false;
            let max = s.max_message_size();
            loop {
                let step = decoder.decode(buf, &mut body, max);
                // What was decoded is in `body`: its framing goes, so the buffer holds no more
                // than one read of it, whatever the framing costs. The head stays (its fields
                // are read from it), and so does the rest (a pipelined request).
                buf.drain(head.len..decoder.pos);
                decoder.pos = head.len;
                match step {
                    Ok(ChunkStep::Done(_)) => return Ok((head.len, Some(body))),
                    Ok(ChunkStep::More) => {}
                    Err(r) => return Err(Some(r)),
                }
                if !asked {
                    asked = true;
                    continue_if_expected(worker, stream, head).await?;
                }
                read_more(stream, buf, deadline).await.map_err(more)?;
            }
        }
    }
}

/// Sends `100 Continue` when the client waits for it before sending its body.
pub(crate) async fn continue_if_expected(
    worker: &'static Worker,
    stream: &mut Stream,
    head: &Head,
) -> Result<(), Option<Refusal>> {
    if !head.expect_continue {
        return Ok(());
    }
    let msg = b"HTTP/1.1 100 Continue\r\n\r\n".to_vec();
    write_all(stream, msg, worker.settings().timeouts.write())
        .await
        .map(drop)
        .map_err(|_| None)
}

/// Appends the answer to one complete request, its head parsed and as it came, to `out`.
fn answer(
    worker: &'static Worker,
    all: &Upstreams,
    (head, raw): (&Head, &[u8]),
    body: &[u8],
    keep_alive: bool,
    out: &mut Vec<u8>,
) {
    use response::{error, write};
    let upstream = match head.route {
        Route::Mcp(ns) => all.namespaces[ns].upstreams[0].index,
        Route::Metadata(_) if head.method != Method::Get => {
            let allow = [("Allow", "GET")];
            return error(out, 405, -32000, "method not allowed", &allow, keep_alive);
        }
        // `builtin:echo` asks for no authorization.
        Route::Metadata(_) => {
            return error(
                out,
                404,
                -32000,
                "no protected-resource metadata",
                &[],
                keep_alive,
            )
        }
        Route::UnknownNamespace => {
            return error(out, 404, -32000, "unknown MCP namespace", &[], keep_alive)
        }
        Route::NotFound => {
            return error(
                out,
                404,
                -32000,
                "not found: MCP is served on /mcp and /mcp/{namespace}",
                &[],
                keep_alive,
            )
        }
    };
    // A revision it does not speak, named by a client after `initialize` (MCP: 400).
    // (Checked to be UTF-8 when the head was parsed.)
    let revision = head
        .protocol_version
        .and_then(|(a, b)| std::str::from_utf8(&raw[a..b]).ok());
    if let Some(v) = revision.filter(|v| !echo::speaks(v)) {
        if matches!(head.method, Method::Post | Method::Get | Method::Delete) {
            let message = format!("unsupported MCP-Protocol-Version: {v}");
            return error(out, 400, -32600, &message, &[], keep_alive);
        }
    }
    match head.method {
        Method::Post if head.bad_content_type => error(
            out,
            415,
            -32700,
            "Content-Type must be application/json",
            &[],
            keep_alive,
        ),
        Method::Post => {
            let mut reply = take_buf();
            let ans = echo::handle(body, &mut reply);
            worker.metrics.upstream(upstream, Outcome::Ok, None);
            let session;
            // The session id, if any, then the reply's own fields (on the stack: no
            // allocation per request).
            let mut headers = [("", ""); 3];
            let mut n = 0;
            if ans.initialize {
                session = format!("{:016x}{:016x}", worker.random(), worker.random());
                headers[0] = ("Mcp-Session-Id", &session);
                n = 1;
            }
            const JSON: (&str, &str) = ("Content-Type", "application/json");
            if ans.parse_error {
                headers[n] = JSON;
                write(out, 400, &headers[..n + 1], &reply, keep_alive);
            } else if !ans.replied {
                write(out, 202, &headers[..n], b"", keep_alive);
            } else if head.sse_only {
                let mut event = take_buf();
                event.extend_from_slice(b"event: message\ndata: ");
                event.extend_from_slice(&reply);
                event.extend_from_slice(b"\n\n");
                headers[n] = ("Content-Type", "text/event-stream");
                headers[n + 1] = ("Cache-Control", "no-cache");
                write(out, 200, &headers[..n + 2], &event, keep_alive);
                give_buf(event);
            } else {
                headers[n] = JSON;
                write(out, 200, &headers[..n + 1], &reply, keep_alive);
            }
            give_buf(reply);
        }
        // builtin:echo sends nothing unprompted, so it offers no GET stream (MCP: 405).
        Method::Get => error(
            out,
            405,
            -32000,
            "this server offers no server-sent event stream",
            &[("Allow", "POST, DELETE")],
            keep_alive,
        ),
        Method::Delete if head.session.is_some() => write(out, 200, &[], b"", keep_alive),
        Method::Delete => error(
            out,
            400,
            -32000,
            "DELETE needs an Mcp-Session-Id header",
            &[],
            keep_alive,
        ),
        // builtin:echo allows no browser origin (no CORS): a preflight gets what any other
        // method it does not serve gets.
        Method::Options | Method::Other => error(
            out,
            405,
            -32000,
            "method not allowed",
            &[("Allow", "GET, POST, DELETE")],
            keep_alive,
        ),
    }
}

#[cfg(all(test, not(loom)))]
mod tests;
