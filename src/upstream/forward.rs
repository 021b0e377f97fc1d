//! One JSON-RPC message of a WebSocket or MCPB connection forwarded to its upstream: `POST`ed
//! within the connection's upstream MCP session, every message the upstream sends back (a JSON
//! reply, or each event of a `text/event-stream` reply) queued for the client as it arrives.
//!
//! Owns what the forwards of one connection share (`State`: the upstream the first message
//! picked, the session id it issued, the negotiated protocol version), and the forward itself,
//! a future that the connection's [`MsgSession`](super::rpc::MsgSession) keeps and polls.
//!
//! Invariants: an upstream failure costs the client a JSON-RPC error for that message (with its
//! id), never the connection; a session whose upstream is gone (refused, answering 404 for the
//! id, or removed by a reload) is forgotten, so the client's next `initialize` starts a new one;
//! no reply or event larger than `server.max_message_size` is held for the client.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Instant;

use serde::Deserialize;

use super::client;
use super::events::{take_events, TooLarge};
use super::listen::{self, Listener};
use super::message::{is_response, write_error_for, Awaited};
use super::outbox::{Kind, Outbox};
use super::resume::Resume;
use super::rpc::{FOREVER, NAMESPACE_GONE, UPSTREAM_REMOVED};
use super::wire::{self, Body, SessionFields};
use super::{Failure, Outcome, Upstream, Upstreams};
use crate::conn::{give_buf, read_more, take_buf, ReadError};
use crate::worker::Worker;

/// The error a message gets when its reply (or one event of it) is larger than
/// `server.max_message_size`: the largest message either way.
const REPLY_TOO_LARGE: &str = "upstream reply larger than max_message_size";

/// The error a request gets when its event-stream reply ended without its response.
const NO_REPLY: &str = "upstream ended the event stream without a reply";

/// What the forwards of one connection share.
#[derive(Default)]
pub(super) struct State {
    /// Picked by the first message; every later one goes there.
    pub(super) upstream: Cell<Option<&'static Upstream>>,
    /// The upstream's session id, once it issued one.
    pub(super) id: RefCell<Option<Vec<u8>>>,
    /// The negotiated protocol version (sent upstream as `MCP-Protocol-Version`) and the
    /// client's address.
    pub(super) fields: RefCell<SessionFields>,
    /// The session's standalone stream, once it has an id.
    pub(super) listener: RefCell<Option<Listener>>,
}

impl State {
    /// Drops the session without ending it upstream (it is gone there already).
    pub(super) fn forget(&self) {
        self.id.borrow_mut().take();
        self.fields.borrow_mut().protocol = None;
        self.upstream.set(None);
        self.listener.borrow_mut().take();
    }
}

/// Forwards `message` to namespace `ns` of `all` within the connection's session and queues
/// every message the upstream sends back, as it arrives. A session whose upstream a reload
/// removed is forgotten (the client's next `initialize` starts one elsewhere); one whose
/// upstream a reload changed goes on with the changed one (the same URL, the same server).
pub(super) async fn forward(
    worker: &'static Worker,
    (all, ns): (&'static Upstreams, Option<usize>),
    state: &Rc<State>,
    outbox: &Rc<Outbox>,
    message: &[u8],
) -> u16 {
    let Some(ns) = ns else {
        state.forget();
        fail(outbox, message, NAMESPACE_GONE);
        return 0;
    };
    if let Some(u) = state.upstream.get() {
        match all.successor(ns, u) {
            Some(now) => state.upstream.set(Some(now)),
            None => {
                state.forget();
                fail(outbox, message, UPSTREAM_REMOVED);
                return 0;
            }
        }
    }
    // The namespace's upstreams this message went to (see `pick_untried`).
    let mut tried = 0;
    let pinned = state.upstream.get().is_some();
    let lease = match state.upstream.get() {
        Some(u) => worker.balancer.pinned(u, true),
        None => worker.balancer.pick_untried(all, ns, true, &mut tried),
    };
    let mut lease = match lease {
        Ok(l) => l,
        // A busy upstream keeps its session (and the balancer counted the refusal).
        Err(Failure::Busy) => {
            fail(outbox, message, Failure::Busy.message());
            return 0;
        }
        Err(f) => {
            if let Some(u) = state.upstream.get() {
                worker.metrics.upstream(u.index, Outcome::of(f), None);
            }
            state.forget();
            fail(outbox, message, f.message());
            return 0;
        }
    };
    let had_id = state.id.borrow().is_some();
    // The replies to `initialize` carry the protocol version every later request must name.
    // Only a session not set up yet looks (a scan of the message): `initialize` opens one.
    let initializing =
        !had_id && state.fields.borrow().protocol.is_none() && is_initialize(message);
    let ((mut up, mut buf, head), started) = loop {
        let u = lease.upstream;
        state.upstream.set(Some(u));
        let mut req = take_buf();
        {
            let (id, fields) = (state.id.borrow(), state.fields.borrow());
            let len = Some(message.len());
            wire::write_request(&mut req, "POST", u, fields.fields(), id.as_deref(), len);
        }
        req.extend_from_slice(message);
        let started = Instant::now();
        let f = match client::send(all, u, req, None).await {
            Ok(r) => break (r, started),
            Err(f) => f,
        };
        // Not reached (refused, no TLS with it, not connected in time): nothing was sent, so a
        // message of no session yet goes to another upstream of the namespace, each tried once.
        let failed = (f, started);
        if !pinned
            && worker
                .balancer
                .another(&mut lease, failed, (all, ns), true, &mut tried)
        {
            continue;
        }
        lease.record(worker.metrics, Err(f), started);
        // A server that cannot be reached has no session for us any more; one not connected
        // yet holds none of this connection's either (its next message picks afresh).
        if f.unreachable() || (!had_id && f.nothing_sent()) {
            state.forget();
        }
        fail(outbox, message, f.message());
        return 0;
    };
    let u = lease.upstream;
    lease.record(worker.metrics, Ok(head.status), started);
    let new_session = !had_id && head.session.is_some();
    if new_session {
        *state.id.borrow_mut() = head.session.clone();
    } else if had_id && head.status == 404 {
        state.forget(); // the upstream no longer knows the session
    }
    let mut body = Body::new(head.body);
    let mut data = take_buf();
    let max = worker.settings().max_message_size();
    // A request answered with an event stream: its response must be among the events (a
    // batch's: the response to each of its requests). A stream that ends or breaks without
    // them is resumed after its last event, when its events had ids (MCP 2025-11-25: a server
    // may close the stream to have its client poll it); else the client gets an error for each
    // request not answered instead of waiting for it forever.
    let mut awaited = match head.event_stream {
        true => Awaited::of(message),
        false => Awaited::default(),
    };
    let mut resume = Resume::default();
    // An error for the message went to the client already.
    let mut failed = false;
    // Whether the connection may go back to the pool once the body is done.
    let mut reusable = head.keep_alive;
    // When an event stream must have ended, once the response came in it.
    let mut ends_by = None;
    loop {
        let ended = loop {
            if let Err(f) = body.feed(&mut buf, &mut data) {
                fail_awaited(outbox, &awaited, message, f.message());
                break Ended::Failed;
            }
            let sized = match head.event_stream {
                true => take_events(&mut data, max, |event| {
                    if initializing {
                        learn_protocol(state, event.data);
                    }
                    resume.saw(event);
                    // A response counts once it is on its way to the client: one that did not
                    // fit in the queue still costs its request an error.
                    if !event.data.is_empty() {
                        if outbox.push(Kind::Reply, event.data) {
                            awaited.answered_by(event.data);
                        } else if !failed {
                            // Once: the requests still waiting get one error each.
                            let why = "client too slow to take the replies";
                            fail_awaited(outbox, &awaited, message, why);
                            failed = true;
                        }
                    }
                    true
                }),
                // A JSON reply: all of it is one message.
                false if data.len() > max => Err(TooLarge),
                false => Ok(true),
            };
            if sized.is_err() {
                // One message for the client (a JSON reply, an event, or what has come of
                // either) beyond what a message may be: an upstream sending more without end
                // would have the gateway hold it all.
                tracing::warn!(upstream = %u.url, "reply larger than max_message_size; dropped");
                fail_awaited(outbox, &awaited, message, REPLY_TOO_LARGE);
                data.clear(); // nothing of it goes to the client
                break Ended::Failed;
            }
            if body.is_done() {
                break Ended::Done;
            }
            // An event stream (a long tool call reporting progress, say) may be silent for
            // long: no deadline until the response came; the connection ending cancels this
            // task. Once it came, the stream is to end (MCP: the server SHOULD end it then):
            // one still open `request_timeout` later is closed, its forward done, rather than
            // holding one of the session's forwards in flight.
            if awaited.all_answered() && ends_by.is_none() {
                ends_by = Some(Instant::now() + all.request_timeout);
            }
            let deadline = match (head.event_stream, ends_by) {
                (false, _) => Instant::now() + all.request_timeout,
                (true, Some(by)) => by,
                (true, None) => Instant::now() + FOREVER,
            };
            let got = read_more(&mut up, &mut buf, deadline).await;
            match got {
                Ok(_) => {}
                Err(ReadError::Eof) if body.eof().is_ok() => {}
                Err(ReadError::TimedOut) => break Ended::Lost(Failure::Timeout.message()),
                Err(_) => break Ended::Lost(Failure::Reset.message()),
            }
        };
        let why = match ended {
            Ended::Failed => break,
            // The response came (a stream that breaks after it costs nothing), or an error
            // went out already, or no response is awaited from a stream that ended.
            _ if awaited.all_answered() || failed => break,
            Ended::Done if !awaited.awaits() => break,
            Ended::Done => NO_REPLY,
            Ended::Lost(why) => why,
        };
        // Resumed within the session, if it still has one.
        let session = awaited
            .awaits()
            .then(|| state.id.borrow().clone())
            .flatten();
        if let Some(id) = session {
            let fields = state.fields.borrow().clone();
            if let Some((again, rest, kind)) = resume.reopen(worker, u, &id, &fields).await {
                tracing::debug!(upstream = %u.url, "event stream resumed after its last event");
                (up, body, reusable) = (again, Body::new(kind), false);
                give_buf(std::mem::replace(&mut buf, rest));
                data.clear(); // part of an event: it comes again after the last whole one
                continue;
            }
        }
        tracing::debug!(upstream = %u.url, why, "reply failed");
        fail_awaited(outbox, &awaited, message, why);
        break;
    }
    if !head.event_stream && body.is_done() {
        if head.status < 300 && !data.is_empty() {
            if initializing {
                learn_protocol(state, &data);
            }
            outbox.push(Kind::Reply, &data);
        } else if head.status >= 400 && is_response(&data) {
            outbox.push(Kind::Fail, &data);
        } else if head.status >= 300 {
            fail(
                outbox,
                message,
                &format!("upstream answered HTTP {}", head.status),
            );
        }
    }
    give_buf(data);
    if body.is_done() && reusable && !body.until_close() && buf.is_empty() {
        client::give_back(u, up);
    }
    give_buf(buf);
    // The session's standalone stream, once `initialize` has been answered (so that its `GET`
    // names the protocol version too).
    if new_session {
        if let Some(id) = state.id.borrow().clone() {
            let fields = state.fields.borrow().clone();
            let listener = listen::start(worker, u, id, fields, outbox.clone());
            *state.listener.borrow_mut() = Some(listener);
        }
    }
    head.status
}

/// How one event stream's relay ended.
enum Ended {
    /// The body is done.
    Done,
    /// An error for the message went to the client.
    Failed,
    /// Broken (reset, timed out) before its end, for this reason.
    Lost(&'static str),
}

/// Whether `message` is an `initialize` request (a substring test first: most messages are not).
fn is_initialize(message: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Method<'a> {
        #[serde(borrow)]
        method: Option<&'a str>,
    }
    message.windows(12).any(|w| w == b"\"initialize\"")
        && crate::echo::is_object(message)
        && serde_json::from_slice::<Method>(message).is_ok_and(|m| m.method == Some("initialize"))
}

/// Keeps the protocol version of an `initialize` result in `reply`, if it has one that can go
/// into a header field as it is (a short token: `2025-06-18`).
fn learn_protocol(state: &State, reply: &[u8]) {
    #[derive(Deserialize)]
    struct Reply<'a> {
        #[serde(borrow)]
        result: Option<Init<'a>>,
    }
    #[derive(Deserialize)]
    struct Init<'a> {
        #[serde(rename = "protocolVersion", borrow)]
        protocol_version: Option<&'a str>,
    }
    let Some(v) = crate::echo::is_object(reply)
        .then(|| serde_json::from_slice::<Reply>(reply).ok())
        .flatten()
        .and_then(|r| r.result?.protocol_version)
    else {
        return;
    };
    let token = (1..=32).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if token {
        state.fields.borrow_mut().protocol = Some(v.as_bytes().to_vec());
    }
}

/// Queues the JSON-RPC error for `message` (see [`write_error_for`]).
fn fail(outbox: &Outbox, message: &[u8], why: &str) {
    fail_awaited(outbox, &Awaited::default(), message, why);
}

/// Queues the JSON-RPC errors for the requests of `message` still `awaited` (some of a batch's
/// may have been answered), or, when it awaited none, the error for `message`. Nothing once
/// every request has its response: a second answer for an id would break JSON-RPC, and what
/// failed after them (an event the client does not get) is logged where it failed.
fn fail_awaited(outbox: &Outbox, awaited: &Awaited, message: &[u8], why: &str) {
    if awaited.all_answered() {
        return;
    }
    let mut error = take_buf();
    awaited.write_errors(&mut error, why);
    if error.is_empty() {
        write_error_for(&mut error, message, why);
    }
    outbox.push(Kind::Fail, &error);
    give_buf(error);
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn only_an_initialize_result_with_a_plain_version_is_kept() {
        assert!(is_initialize(
            br#"{"jsonrpc":"2.0","id":0,"method":"initialize"}"#
        ));
        assert!(!is_initialize(br#"["initialize"]"#), "read by position");
        assert!(!is_initialize(
            br#"{"jsonrpc":"2.0","id":0,"method":"tools/call","params":{"x":"initialize"}}"#
        ));
        let state = State::default();
        let learned = |reply: &str| {
            state.fields.borrow_mut().protocol = None;
            learn_protocol(&state, reply.as_bytes());
            state.fields.borrow().protocol.clone()
        };
        let ok = r#"{"jsonrpc":"2.0","id":0,"result":{"protocolVersion":"2025-06-18"}}"#;
        assert_eq!(learned(ok).as_deref(), Some(&b"2025-06-18"[..]));
        // It goes into a header field: anything but a short token is ignored.
        let injected = r#"{"jsonrpc":"2.0","id":0,"result":{"protocolVersion":"1\r\nX-Evil: 1"}}"#;
        assert_eq!(learned(injected), None);
        let spaced = r#"{"jsonrpc":"2.0","id":0,"result":{"protocolVersion":"2025 06 18"}}"#;
        assert_eq!(learned(spaced), None);
        assert_eq!(
            learned(r#"{"jsonrpc":"2.0","id":0,"result":{"tools":[]}}"#),
            None
        );
        assert_eq!(learned("not json"), None);
        assert_eq!(
            learned(r#"[{"protocolVersion":"2025-06-18"}]"#),
            None,
            "by position"
        );
    }
}
