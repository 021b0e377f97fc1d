//! The upstream's response relayed to the client, piece by piece as it arrives (never buffered
//! whole; a chunked or close-delimited body reaches the client chunked). An event stream is
//! handed back to the door once its head and what came with it went out ([`Events`]), and the
//! door relays the rest with [`events`] for as long as it lasts: the client's side watched
//! meanwhile, the stream ended cleanly by a drain or by a reload that removes its upstream,
//! and parked when idle.
//!
//! Invariants: an upstream connection goes back to the pool only after a response that ended
//! cleanly with nothing after it; a stream holds its lease on the upstream (it counts as in
//! flight) until it ends.

use std::time::Instant;

use super::body::frame_chunk;
use super::{end, Proxied};
use crate::boxed;
use crate::conn::{give_buf, read_more, read_watching, take_buf, write_all, ReadError, Watched};
use crate::stream::Stream;
use crate::upstream::balance::Lease;
use crate::upstream::wire::{self, Body};
use crate::upstream::{client, Upstreams};
use crate::worker::{Registration, Worker};

/// An event stream being relayed to the client: the upstream connection, the body's decoding
/// state, and the lease on the upstream (a stream counts as in flight until it ends).
pub struct Events {
    up: Stream,
    buf: Vec<u8>,
    decoded: Body,
    /// The client gets the body chunked.
    chunk: bool,
    /// The client's connection stays open after the stream.
    keep_alive: bool,
    /// The upstream's connection may be pooled after the stream.
    upstream_keep_alive: bool,
    lease: Lease<'static>,
    /// The door's: the bytes of a pipelined request that followed, and when the request
    /// started (set by the door when it takes the stream over).
    pub rest: Option<Vec<u8>>,
    pub started: Instant,
}

impl Events {
    /// A stream from `up` under `lease`, as a relay would hand it over (for size checks).
    #[cfg(all(test, not(loom)))]
    pub(crate) fn for_test(up: Stream, lease: Lease<'static>) -> Box<Events> {
        Box::new(Events {
            up,
            buf: Vec::new(),
            decoded: Body::new(wire::BodyKind::Chunked),
            chunk: true,
            keep_alive: true,
            upstream_keep_alive: true,
            lease,
            rest: None,
            started: Instant::now(),
        })
    }
}

/// Streams the upstream's response (its head is already in `out`) to the client, piece by
/// piece; pools the upstream connection when the response ended cleanly. An event stream is
/// handed back to the door once what came with its head went out ([`Proxied::Events`]).
#[allow(clippy::too_many_arguments)]
pub(super) async fn response(
    worker: &'static Worker,
    client: &mut Stream,
    mut up: Stream,
    mut buf: Vec<u8>,
    rh: &wire::ResponseHead,
    http11: bool,
    keep_alive: bool,
    mut out: Vec<u8>,
    (all, lease): (&Upstreams, Lease<'static>),
) -> Proxied {
    let s = worker.settings();
    let chunk = !matches!(rh.body, wire::BodyKind::Length(_)) && http11;
    let mut decoded = Body::new(rh.body);
    let mut data = take_buf();
    let mut ended = Proxied::Close;
    let mut reusable = false;
    loop {
        let done = frame_body(&mut decoded, &mut buf, &mut data, &mut out, chunk);
        let Ok(done) = done else {
            break; // the head went out: all we can do is close
        };
        if !out.is_empty() {
            match write_all(client, out, s.timeouts.write()).await {
                Ok(o) => out = o,
                Err(_) => {
                    out = take_buf();
                    break;
                }
            }
        }
        if done {
            reusable = rh.keep_alive && !decoded.until_close() && buf.is_empty();
            ended = end(keep_alive);
            break;
        }
        if rh.event_stream {
            give_buf(data);
            give_buf(out);
            return Proxied::Events(boxed::new(Events {
                up,
                buf,
                decoded,
                chunk,
                keep_alive,
                upstream_keep_alive: rh.keep_alive,
                lease,
                rest: None,
                started: Instant::now(),
            }));
        }
        match read_more(&mut up, &mut buf, Instant::now() + all.request_timeout).await {
            Ok(_) => {}
            Err(ReadError::Eof) if decoded.eof().is_ok() => {}
            Err(_) => break,
        }
    }
    if reusable {
        client::give_back(lease.upstream, up);
    }
    give_buf(data);
    give_buf(buf);
    give_buf(out);
    ended
}

/// Relays an event stream to the client until it ends. It may be silent for long: no deadline,
/// but a client that leaves ends it, and so do a drain and a reload removing the upstream:
/// meanwhile the connection counts as idle, so the worker shuts its read side, which the watch
/// sees. Between events it holds no buffer and no timer (its writes are boxed). With `parks`
/// (nothing of a next request came with it), a plain stream waiting for its next event with
/// nothing of one in hand and the client silent may be asked to park ([`crate::park`]):
/// [`Relayed::Park`] gives the stream back for that.
pub async fn events(
    worker: &'static Worker,
    reg: &Registration,
    client: &mut Stream,
    mut e: Box<Events>,
    parks: bool,
) -> Relayed {
    let s = worker.settings();
    let u = e.lease.upstream;
    let mut watch = true;
    let mut ended = Proxied::Close;
    let mut reusable = false;
    loop {
        if worker.draining() {
            boxed::pin(end_stream(worker, client, e.chunk)).await;
            break;
        }
        worker.stream_begin(reg, u.index);
        // A TLS upstream's session state lives in the stream, not in its socket: it waits here.
        let parking = (parks && !e.up.is_tls()).then_some(reg);
        let got = read_watching(&mut e.up, &mut e.buf, client, &mut watch, parking).await;
        if let Watched::Park = got {
            return Relayed::Park(e); // its registry entry stays as it is: asked to park
        }
        // Expired: the gateway drains, or a reload removed the stream's upstream.
        let expired = worker.idle_end(reg);
        match got {
            Watched::Data => {}
            Watched::Eof if e.decoded.eof().is_ok() => {}
            Watched::ClientGone if expired => {
                boxed::pin(end_stream(worker, client, e.chunk)).await;
                break;
            }
            Watched::Eof | Watched::Failed | Watched::ClientGone | Watched::Park => break,
        }
        let (mut data, mut out) = (take_buf(), take_buf());
        let done = frame_body(&mut e.decoded, &mut e.buf, &mut data, &mut out, e.chunk);
        give_buf(data);
        let Ok(done) = done else {
            give_buf(out);
            break; // the upstream's framing broke: all we can do is close
        };
        if out.is_empty() {
            give_buf(out); // part of an event: nothing to write yet
        } else {
            match boxed::pin(write_all(client, out, s.timeouts.write())).await {
                Ok(o) => give_buf(o),
                Err(_) => break,
            }
        }
        if done {
            reusable = e.upstream_keep_alive && !e.decoded.until_close() && e.buf.is_empty();
            ended = end(e.keep_alive);
            break;
        }
    }
    let Events { up, buf, .. } = boxed::unbox(e);
    if reusable {
        client::give_back(u, up);
    }
    give_buf(buf);
    Relayed::Ended(ended)
}

/// How [`events`] ended.
pub enum Relayed {
    /// The stream ended: what the connection does next.
    Ended(Proxied),
    /// The sweeper asks the connection to park with its stream.
    Park(Box<Events>),
}

impl Events {
    /// The upstream socket the parking lot watches while the stream is parked: readable when
    /// the next event (or the stream's end) comes.
    pub fn upstream_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.up.as_raw_fd()
    }
}

/// Decodes what `buf` holds of the response body and frames it into `out` for the client
/// (chunked when `chunk`, with the last chunk once the body is complete). `Ok(true)`: the body is
/// complete; `Err`: the upstream's framing is broken.
fn frame_body(
    decoded: &mut Body,
    buf: &mut Vec<u8>,
    data: &mut Vec<u8>,
    out: &mut Vec<u8>,
    chunk: bool,
) -> Result<bool, ()> {
    decoded.feed(buf, data).map_err(|_| ())?;
    if !data.is_empty() {
        if chunk {
            frame_chunk(out, data);
        } else {
            out.extend_from_slice(data);
        }
        data.clear();
    }
    let done = decoded.is_done();
    if done && chunk {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    Ok(done)
}

/// Ends a chunked event stream cleanly (the gateway is draining, or a reload removed its
/// upstream); the connection then closes.
async fn end_stream(worker: &Worker, client: &mut Stream, chunked: bool) {
    if chunked {
        let mut out = take_buf();
        out.extend_from_slice(b"0\r\n\r\n");
        if let Ok(o) = write_all(client, out, worker.settings().timeouts.write()).await {
            give_buf(o);
        }
    }
}
