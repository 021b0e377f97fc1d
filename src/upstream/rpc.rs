//! Message forwarding for the WebSocket and MCPB doors: each JSON-RPC message a client sends is
//! `POST`ed to the namespace's upstream over Streamable HTTP, within one upstream MCP session per
//! client connection, and every message the upstream sends back (a JSON reply, or each event of a
//! `text/event-stream` reply, notifications included) becomes a message or frame for the client
//! as soon as it arrives.
//!
//! Owns the per-connection [`MsgSession`]: the upstream picked by the first message and the
//! session id it issued. An upstream failure costs the client a JSON-RPC error for that message
//! (with the message's id), never the connection; a session whose upstream is gone (refused, or
//! answering 404 for the id) is forgotten, so the client's next `initialize` starts a new one.
//! What the upstream sends outside any request arrives through the session's standalone stream
//! ([`super::listen`]) and is written between messages ([`MsgSession::wait`]).

use std::time::Instant;

use monoio::net::TcpStream;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::client;
use super::listen::{self, Listener};
use super::wire::{self, Body};
use super::{Failure, Outcome, Upstream};
use crate::conn::{
    give_buf, read_more, read_watching, take_buf, wait_idle, write_all, Wait, Watched,
};
use crate::worker::Registration;
use crate::worker::Worker;

/// The upstream session of one WebSocket or MCPB connection. When the connection ends, the
/// session is ended upstream too (`DELETE` with its id, in the background), so upstreams do not
/// keep sessions nobody can reach.
#[derive(Default)]
pub struct MsgSession {
    upstream: Option<&'static Upstream>,
    id: Option<Vec<u8>>,
    worker: Option<&'static Worker>,
    /// The session's standalone stream, once it has an id.
    listener: Option<Listener>,
}

/// What ended a wait for the next client message.
pub enum Woke {
    /// The client's socket: bytes, or expiry (as [`wait_idle`] says).
    Client(Wait),
    /// The upstream sent something on its own: write it ([`MsgSession::drain_notices`]).
    Notice,
}

impl MsgSession {
    /// Drops the session without ending it upstream (it is gone there already).
    fn forget(&mut self) {
        self.id = None;
        self.upstream = None;
        self.listener = None;
    }

    /// Frames what the upstream sent on its own into `out`.
    pub fn drain_notices(&self, out: &mut Vec<u8>, framing: &Framing) {
        if let Some(l) = &self.listener {
            l.notices.drain(out, framing.reply);
        }
    }

    /// Writes what the upstream sent on its own to the client (after [`Woke::Notice`]).
    pub async fn write_notices(
        &self,
        client: &mut TcpStream,
        framing: &Framing,
        limit: std::time::Duration,
    ) -> Result<(), ClientGone> {
        let mut out = take_buf();
        self.drain_notices(&mut out, framing);
        match write_all(client, out, limit).await {
            Ok(o) => {
                give_buf(o);
                Ok(())
            }
            Err(_) => Err(ClientGone),
        }
    }

    /// Waits for the client's next message as [`wait_idle`] does, or for a notice.
    pub async fn wait(
        &self,
        worker: &Worker,
        reg: &Registration,
        stream: &TcpStream,
        limit: std::time::Duration,
    ) -> Woke {
        let Some(l) = &self.listener else {
            return Woke::Client(wait_idle(worker, reg, stream, limit).await);
        };
        let idle = wait_idle(worker, reg, stream, limit);
        monoio::select! {
            w = idle => Woke::Client(w),
            _ = l.notices.ready() => {
                worker.idle_end(reg); // the idle wait was dropped unfinished
                Woke::Notice
            }
        }
    }
}

impl Drop for MsgSession {
    fn drop(&mut self) {
        let (Some(u), Some(id), Some(worker)) = (self.upstream, self.id.take(), self.worker) else {
            return;
        };
        // While draining (and when the runtime itself is being dropped) nothing new is spawned.
        if !worker.draining() {
            monoio::spawn(end_session(worker, u, id));
        }
    }
}

/// Sends `DELETE` for session `id` to `u`; the answer is read and discarded.
async fn end_session(worker: &'static Worker, u: &'static Upstream, id: Vec<u8>) {
    let mut req = take_buf();
    wire::write_request(&mut req, "DELETE", u, "", None, Some(&id), Some(0));
    if let Ok((mut up, mut buf, head)) = client::send(worker.shared.upstreams, u, req, None).await {
        let mut body = Body::new(head.body);
        let mut data = take_buf();
        let deadline = Instant::now() + worker.shared.upstreams.request_timeout;
        while body.feed(&mut buf, &mut data).is_ok() && !body.is_done() {
            data.clear();
            if read_more(&mut up, &mut buf, deadline).await.is_err() {
                break;
            }
        }
        if body.is_done() && head.keep_alive && buf.is_empty() {
            client::give_back(u, up);
        }
        give_buf(data);
        give_buf(buf);
    }
}

/// How a door frames what comes back: a reply message, or an error for a message.
pub struct Framing {
    pub reply: fn(&mut Vec<u8>, &[u8]),
    pub fail: fn(&mut Vec<u8>, &[u8]),
}

/// The client went away while replies were being written.
#[derive(Debug)]
pub struct ClientGone;

/// Forwards `message` to namespace `ns`; frames every reply into `out` and writes `out` to
/// `client` as replies arrive (`out` is left empty, or holding what could not be written).
pub async fn forward(
    worker: &'static Worker,
    ns: usize,
    session: &mut MsgSession,
    message: &[u8],
    client: &mut TcpStream,
    out: &mut Vec<u8>,
    framing: &Framing,
) -> Result<(), ClientGone> {
    let all = worker.shared.upstreams;
    let lease = match session.upstream {
        Some(u) => worker.balancer.pinned(u),
        None => worker.balancer.pick(all, ns),
    };
    let mut lease = match lease {
        Ok(l) => l,
        Err(f) => {
            if let Some(u) = session.upstream {
                worker.metrics.upstream(u.index, Outcome::of(f), None);
            }
            session.forget();
            fail(framing, out, message, f.message());
            return Ok(());
        }
    };
    let u = lease.upstream;
    session.upstream = Some(u);
    session.worker = Some(worker);
    let mut req = take_buf();
    wire::write_request(
        &mut req,
        "POST",
        u,
        "",
        None,
        session.id.as_deref(),
        Some(message.len()),
    );
    req.extend_from_slice(message);
    let started = Instant::now();
    let (mut up, mut buf, head) = match client::send(all, u, req, None).await {
        Ok(r) => r,
        Err(f) => {
            lease.record(worker.metrics, Err(f), started);
            if f == Failure::Connect {
                session.forget();
            }
            fail(framing, out, message, f.message());
            return Ok(());
        }
    };
    lease.record(worker.metrics, Ok(head.status), started);
    if session.id.is_none() {
        session.id = head.session.clone();
        if let Some(id) = &session.id {
            session.listener = Some(listen::start(worker, u, id.clone()));
        }
    } else if head.status == 404 {
        session.forget(); // the upstream no longer knows the session
    }
    let mut body = Body::new(head.body);
    let mut data = take_buf();
    let mut result = Ok(());
    let deadline_after = all.request_timeout;
    let mut watch = head.event_stream;
    loop {
        if let Err(f) = body.feed(&mut buf, &mut data) {
            fail(framing, out, message, f.message());
            break;
        }
        if head.event_stream {
            let mut at = 0;
            while let Some((used, event)) = next_event(&data[at..]) {
                at += used;
                if !event.is_empty() {
                    (framing.reply)(out, &event);
                }
            }
            data.drain(..at);
        }
        session.drain_notices(out, framing);
        if !out.is_empty() {
            match write_all(client, std::mem::take(out), worker.settings().write_timeout).await {
                Ok(o) => *out = o,
                Err(_) => {
                    result = Err(ClientGone);
                    break;
                }
            }
        }
        if body.is_done() {
            break;
        }
        // An event stream (a long tool call reporting progress, say) may be silent for long: no
        // deadline, but the client is watched, so one that leaves ends the wait.
        let deadline = (!head.event_stream).then(|| Instant::now() + deadline_after);
        match read_watching(&mut up, &mut buf, deadline, client, &mut watch).await {
            Watched::Data => {}
            Watched::Eof if body.eof().is_ok() => {}
            Watched::TimedOut => {
                fail(framing, out, message, Failure::Timeout.message());
                break;
            }
            Watched::ClientGone => {
                result = Err(ClientGone);
                break;
            }
            Watched::Eof | Watched::Failed => {
                fail(framing, out, message, Failure::Reset.message());
                break;
            }
        }
    }
    if !head.event_stream && body.is_done() {
        let json = data
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|b| *b == b'{' || *b == b'[');
        if head.status < 300 && !data.is_empty() {
            (framing.reply)(out, &data);
        } else if head.status >= 400 && json {
            (framing.fail)(out, &data);
        } else if head.status >= 300 {
            fail(
                framing,
                out,
                message,
                &format!("upstream answered HTTP {}", head.status),
            );
        }
    }
    give_buf(data);
    if body.is_done() && head.keep_alive && !body.until_close() && buf.is_empty() {
        client::give_back(u, up);
    }
    give_buf(buf);
    result
}

/// Appends a JSON-RPC error for `message` (its id, or null) framed as a failure.
fn fail(framing: &Framing, out: &mut Vec<u8>, message: &[u8], why: &str) {
    #[derive(Deserialize)]
    struct IdOnly<'a> {
        #[serde(borrow)]
        id: Option<&'a RawValue>,
    }
    let id = serde_json::from_slice::<IdOnly>(message)
        .ok()
        .and_then(|m| m.id)
        .map_or("null", RawValue::get);
    let mut payload = take_buf();
    crate::echo::write_error(&mut payload, id, -32000, why);
    (framing.fail)(out, &payload);
    give_buf(payload);
}

/// The next complete server-sent event at the start of `data`: the bytes it used and its data
/// (the `data:` lines joined with `\n`; empty for events without data, such as comments).
pub fn next_event(data: &[u8]) -> Option<(usize, Vec<u8>)> {
    let mut payload = Vec::new();
    let mut lines = 0;
    let mut at = 0;
    loop {
        let nl = data[at..].iter().position(|b| *b == b'\n')?;
        let mut line = &data[at..at + nl];
        at += nl + 1;
        if line.last() == Some(&b'\r') {
            line = &line[..line.len() - 1];
        }
        if line.is_empty() {
            return Some((at, payload));
        }
        if let Some(v) = line.strip_prefix(b"data:") {
            if lines > 0 {
                payload.push(b'\n');
            }
            payload.extend_from_slice(v.strip_prefix(b" ").unwrap_or(v));
            lines += 1;
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn events_split_and_join() {
        let s = b"event: message\r\ndata: {\"a\":1}\r\n\r\n: comment\n\ndata: x\ndata:y\n\ndata: partial";
        let (n1, e1) = next_event(s).unwrap();
        assert_eq!(e1, br#"{"a":1}"#);
        let (n2, e2) = next_event(&s[n1..]).unwrap();
        assert!(e2.is_empty());
        let (n3, e3) = next_event(&s[n1 + n2..]).unwrap();
        assert_eq!(e3, b"x\ny");
        assert!(next_event(&s[n1 + n2 + n3..]).is_none());
    }
}
