//! Resuming an upstream's event stream where it left off (MCP 2025-11-25, "Resumability and
//! Redelivery"): a server may end a stream before it is done, its events carrying ids, to have
//! its client poll it; the client asks for the rest with a `GET` naming the last event it got
//! (`Last-Event-ID`), within the session, after the `retry` the stream asked for.
//!
//! Owns [`Resume`], what a WebSocket or MCPB session's reader of a stream (a request's reply,
//! the session's standalone stream) keeps of it. The session's standalone stream is opened
//! again when it ends even without an id to resume from (afresh, as the SDK's client does). The gateway does this for those clients, which
//! see messages, not streams; an HTTP client's streams are its own to resume (its `GET` goes to
//! the session's upstream like any other request).
//!
//! Invariants: a stream is resumed only from an id a header field can carry as it came, for as
//! long as the upstream resumes it (a server polled at its own `retry` is polled for as long as
//! it likes, never more often than every [`MIN_RETRY_MS`]); it is given up after
//! [`MAX_FAILED_RESUMES`] resumptions in a row the upstream refused or did not answer; no
//! stream of an upstream a reload removed is resumed; nothing is allocated per event (the last
//! id is kept in one buffer).

use std::time::Duration;

use super::events::Event;
use super::listen;
use super::wire::{BodyKind, SessionFields};
use super::Upstream;
use crate::stream::Stream;
use crate::worker::Worker;

/// Resumptions in a row the upstream refuses (or does not answer) before a stream is given up.
pub const MAX_FAILED_RESUMES: u32 = 3;

/// The wait before resuming when a stream asked for none (the MCP Python SDK's client waits as
/// long), and the bounds on the `retry` heeded, in milliseconds: never sooner than 50 ms (a
/// server ending its stream at once with `retry: 0` would have the gateway reconnect in a busy
/// loop), never later than a minute.
const DEFAULT_RETRY_MS: u32 = 1_000;
pub const MIN_RETRY_MS: u32 = 50;
const MAX_RETRY_MS: u32 = 60_000;

/// Where an event stream left off: what resuming it needs.
#[derive(Default)]
pub struct Resume {
    /// The last event id the stream gave (`None`: none, an empty one, which forgets the one
    /// before, or one no header field can carry as it is), kept in one buffer.
    last_id: Option<Vec<u8>>,
    /// The last `retry` it asked for, in milliseconds.
    retry: Option<u32>,
}

impl Resume {
    /// Keeps what `event` says about resuming its stream.
    pub fn saw(&mut self, event: &Event<'_>) {
        if let Some(id) = event.id {
            // Visible ASCII and spaces only: it goes into a header field as it is.
            let fits = !id.is_empty() && id.iter().all(|b| matches!(b, b' ' | b'\t' | 0x21..=0x7e));
            match (&mut self.last_id, fits) {
                (Some(kept), true) => {
                    kept.clear();
                    kept.extend_from_slice(id);
                }
                (kept, true) => *kept = Some(id.to_vec()),
                (kept, false) => *kept = None,
            }
        }
        if let Some(ms) = event.retry {
            self.retry = Some(u32::try_from(ms).unwrap_or(u32::MAX));
        }
    }

    /// A request's stream of `u` opened again after its last event, `retry` after it ended,
    /// within session `id` (its requests carry `fields`): `None` when it gave no id to resume
    /// from (only a resumption brings a request's stream back), when a reload removed `u`, or
    /// when `u` refused (or did not answer) [`MAX_FAILED_RESUMES`] resumptions in a row.
    pub async fn reopen(
        &self,
        worker: &'static Worker,
        u: &'static Upstream,
        id: &[u8],
        fields: &SessionFields,
    ) -> Option<(Stream, Vec<u8>, BodyKind)> {
        let last = self.last_id.as_deref()?;
        reopen(self.retry, Some(last), worker, u, (id, fields)).await
    }

    /// The session's own stream of `u` opened again after it ended: resumed after its last
    /// event when it gave one (`resume`), else afresh (what the server sent in between is lost,
    /// as it is for any client), `retry` after it ended; `None` as for [`Resume::reopen`].
    pub async fn reopen_session_stream(
        resume: Option<&Resume>,
        worker: &'static Worker,
        u: &'static Upstream,
        id: &[u8],
        fields: &SessionFields,
    ) -> Option<(Stream, Vec<u8>, BodyKind)> {
        let retry = resume.and_then(|r| r.retry);
        let last = resume.and_then(|r| r.last_id.as_deref());
        reopen(retry, last, worker, u, (id, fields)).await
    }
}

/// Opens session `id`'s stream of `u` again, after event `last` if any, `retry` (or the default)
/// from now; counted.
async fn reopen(
    retry: Option<u32>,
    last: Option<&[u8]>,
    worker: &'static Worker,
    u: &'static Upstream,
    (id, fields): (&[u8], &SessionFields),
) -> Option<(Stream, Vec<u8>, BodyKind)> {
    let wait = retry.unwrap_or(DEFAULT_RETRY_MS);
    let wait = Duration::from_millis(wait.clamp(MIN_RETRY_MS, MAX_RETRY_MS).into());
    for _ in 0..MAX_FAILED_RESUMES {
        monoio::time::sleep(wait).await;
        if u.is_retired() {
            return None;
        }
        if let Some(opened) = listen::open(worker, u, id, fields, last).await {
            worker.metrics.upstream_resumed(u.index);
            return Some(opened);
        }
    }
    None
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn event<'a>(data: &'a [u8], id: Option<&'a [u8]>, retry: Option<u64>) -> Event<'a> {
        Event { data, id, retry }
    }

    #[test]
    fn the_last_id_a_header_can_carry_is_kept() {
        let mut r = Resume::default();
        r.saw(&event(b"", Some(b"1"), Some(250)));
        assert_eq!(
            (r.last_id.as_deref(), r.retry),
            (Some(&b"1"[..]), Some(250))
        );
        r.saw(&event(b"x", None, None));
        assert_eq!(
            (r.last_id.as_deref(), r.retry),
            (Some(&b"1"[..]), Some(250))
        );
        r.saw(&event(b"x", Some(b"two 2"), None));
        assert_eq!(r.last_id.as_deref(), Some(&b"two 2"[..]));
        // Not for a header field: forgotten, as an empty id forgets it.
        r.saw(&event(b"x", Some("é".as_bytes()), None));
        assert_eq!(r.last_id, None);
        r.saw(&event(b"x", Some(b"3"), None));
        r.saw(&event(b"x", Some(b""), None));
        assert_eq!(r.last_id, None);
        // A retry too large for the wait is the longest.
        r.saw(&event(b"", None, Some(u64::MAX)));
        assert_eq!(r.retry, Some(u32::MAX));
    }
}
