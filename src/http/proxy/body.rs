//! A request body forwarded as it arrives from the client (not whole in the client buffer yet,
//! or chunked): the upstream gets it after the request head, a `Content-Length` body as it is
//! and a chunked one re-chunked, within `max_message_size` (413 beyond) and before the request's
//! `read_timeout` deadline (408 beyond).
//!
//! Invariants: the body's bytes are drained from the client buffer as they go out, so what
//! stays there is the next pipelined request; every pooled buffer it takes is given back on
//! every path.

use std::time::Instant;

use super::Proxied;
use crate::conn::{give_buf, read_more, take_buf, ReadError};
use crate::http::request::{self, BodyKind, ChunkStep, Chunked, Head};
use crate::stream::Stream;
use crate::upstream::{client, Failure, Upstreams};
use crate::worker::Worker;

/// Why a streamed request body did not reach the upstream whole.
pub(super) enum Sent {
    Upstream(Failure),
    Client(Proxied),
}

/// Sends `req` (the request head) over `up` followed by the body as it arrives from the
/// client: `Content-Length` bytes or a chunked body (decoded, sent chunked), within
/// `max_message_size` and before `deadline`. The body's bytes are drained from `buf`.
#[allow(clippy::too_many_arguments)]
pub(super) async fn stream_body(
    worker: &'static Worker,
    client: &mut Stream,
    buf: &mut Vec<u8>,
    head: &Head,
    kind: BodyKind,
    deadline: Instant,
    (all, mut up): (&Upstreams, Stream),
    mut req: Vec<u8>,
) -> Result<Stream, Sent> {
    let max = worker.settings().max_message_size();
    let mut remaining = match kind {
        BodyKind::Length(n) => n,
        _ => 0,
    };
    let mut chunked = Chunked::new(0);
    let mut data = take_buf();
    let mut total = 0usize;
    let mut asked = false;
    loop {
        let done = match kind {
            BodyKind::Chunked => {
                let step = chunked.decode(buf, &mut data, max - total);
                buf.drain(..chunked.pos);
                chunked.pos = 0;
                if !data.is_empty() {
                    total += data.len();
                    frame_chunk(&mut req, &data);
                    data.clear();
                }
                match step {
                    Ok(ChunkStep::Done(_)) => {
                        req.extend_from_slice(b"0\r\n\r\n");
                        true
                    }
                    Ok(ChunkStep::More) => false,
                    Err(r) => {
                        give_buf(data);
                        return Err(Sent::Client(Proxied::Refused(r)));
                    }
                }
            }
            _ => {
                let take = buf.len().min(remaining);
                req.extend_from_slice(&buf[..take]);
                buf.drain(..take);
                remaining -= take;
                remaining == 0
            }
        };
        if !req.is_empty() {
            let until = Instant::now() + all.request_timeout;
            req = match client::write(&mut up, req, until).await {
                Ok(mut sent) => {
                    sent.clear();
                    sent
                }
                Err((f, r)) => {
                    give_buf(r);
                    give_buf(data);
                    return Err(Sent::Upstream(f));
                }
            };
        }
        if done {
            give_buf(req);
            give_buf(data);
            return Ok(up);
        }
        if !asked {
            asked = true;
            if crate::http::continue_if_expected(worker, client, head)
                .await
                .is_err()
            {
                give_buf(data);
                return Err(Sent::Client(Proxied::Close));
            }
        }
        match read_more(client, buf, deadline).await {
            Ok(_) => {}
            Err(ReadError::TimedOut) => {
                give_buf(data);
                return Err(Sent::Client(Proxied::Refused(request::TIMEOUT)));
            }
            Err(_) => {
                give_buf(data);
                return Err(Sent::Client(Proxied::Close));
            }
        }
    }
}

/// Appends `data` as one chunk of a chunked body.
pub(super) fn frame_chunk(out: &mut Vec<u8>, data: &[u8]) {
    use std::io::Write as _;
    let _ = write!(out, "{:x}\r\n", data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}
