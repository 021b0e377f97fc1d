//! Server-sent events (`text/event-stream`) as the upstreams send them: complete events taken
//! out of the bytes that have come, each one's data joined into a message for a WebSocket or
//! MCPB client (a reply of an event-stream reply, or of a session's standalone stream).
//!
//! Invariants: an event is handed over only whole; none larger than the message size is held
//! (nor the part of one that has come); nothing is allocated per event.

use crate::conn::{give_buf, take_buf};

/// An event, or the part of one that has come, larger than `server.max_message_size`: one
/// message for the client either way, which the gateway does not hold.
pub struct TooLarge;

/// One complete event: its data (see `next_event`), and the fields besides it that a client
/// keeps to resume the stream after it ends (MCP 2025-11-25, "Resumability and Redelivery").
pub struct Event<'a> {
    pub data: &'a [u8],
    /// Its `id` field, if it has one (the stream's last event id from then on).
    pub id: Option<&'a [u8]>,
    /// Its `retry` field in milliseconds, if it has a valid one (how long to wait before
    /// reconnecting).
    pub retry: Option<u64>,
}

/// Takes the complete server-sent events out of the start of `data` and hands each to `each`, in
/// order, until `each` returns false (`Ok(false)`; what is left stays in `data`).
/// `Err(TooLarge)` when an event, or the part of the next one left in `data`, is larger than
/// `max`. The events' data are put together in one pooled buffer, one after another: nothing is
/// allocated per event.
pub fn take_events(
    data: &mut Vec<u8>,
    max: usize,
    mut each: impl FnMut(&Event<'_>) -> bool,
) -> Result<bool, TooLarge> {
    let mut at = 0;
    let mut taken = Ok(true);
    let mut event = take_buf();
    while let Some((used, fields)) = next_event(&data[at..], &mut event) {
        if event.len() > max {
            taken = Err(TooLarge);
            break;
        }
        let e = Event {
            data: &event,
            id: fields.id.map(|r| &data[at + r.start..at + r.end]),
            retry: fields.retry,
        };
        at += used;
        if !each(&e) {
            taken = Ok(false);
            break;
        }
    }
    give_buf(event);
    data.drain(..at);
    match taken {
        Ok(true) if data.len() > max => Err(TooLarge),
        taken => taken,
    }
}

/// Where an event's `id` is (in the bytes it used) and its `retry`, as `next_event` found them.
#[derive(Default)]
struct Fields {
    id: Option<std::ops::Range<usize>>,
    retry: Option<u64>,
}

/// The next complete server-sent event at the start of `data`: the bytes it used, its `id` and
/// `retry` fields (the last of each; an `id` holding a NUL and a `retry` that is not all digits
/// are ignored, as the HTML standard's parser does), and its data (the `data:` lines joined
/// with `\n`; empty for events without data, such as comments) in `payload`, cleared first.
fn next_event(data: &[u8], payload: &mut Vec<u8>) -> Option<(usize, Fields)> {
    payload.clear();
    let mut fields = Fields::default();
    let mut lines = 0;
    let mut at = 0;
    loop {
        let start = at;
        let nl = data[at..].iter().position(|b| *b == b'\n')?;
        let mut line = &data[at..at + nl];
        at += nl + 1;
        if line.last() == Some(&b'\r') {
            line = &line[..line.len() - 1];
        }
        if line.is_empty() {
            return Some((at, fields));
        }
        // `name: value` (one space after the colon dropped), or a name alone: an empty value.
        let (name, from) = match line.iter().position(|b| *b == b':') {
            Some(colon) if line.get(colon + 1) == Some(&b' ') => (&line[..colon], colon + 2),
            Some(colon) => (&line[..colon], colon + 1),
            None => (line, line.len()),
        };
        let value = &line[from..];
        match name {
            b"data" => {
                if lines > 0 {
                    payload.push(b'\n');
                }
                payload.extend_from_slice(value);
                lines += 1;
            }
            b"id" if !value.contains(&0) => fields.id = Some(start + from..start + line.len()),
            b"retry" if !value.is_empty() && value.iter().all(u8::is_ascii_digit) => {
                fields.retry = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
            }
            _ => {}
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn events_are_taken_whole_and_never_past_the_size() {
        let mut got = Vec::new();
        let mut data = b"data: a\n\ndata: b\n\ndata: par".to_vec();
        assert!(matches!(
            take_events(&mut data, 16, |e| {
                got.push(e.data.to_vec());
                true
            }),
            Ok(true)
        ));
        assert_eq!(
            (got, data.as_slice()),
            (vec![b"a".to_vec(), b"b".to_vec()], &b"data: par"[..])
        );
        // Stopped by the taker: the rest stays.
        let mut data = b"data: a\n\ndata: b\n\n".to_vec();
        assert!(matches!(take_events(&mut data, 16, |_| false), Ok(false)));
        assert_eq!(data, b"data: b\n\n");
        // A whole event over the size, and a part of one already over it.
        let mut data = b"data: 12345678901234567\n\n".to_vec();
        assert!(take_events(&mut data, 16, |_| true).is_err());
        let mut data = b"data: a\n\ndata: 1234567890ab".to_vec();
        assert!(take_events(&mut data, 16, |_| true).is_err());
    }

    #[test]
    fn events_split_and_join() {
        let s = b"event: message\r\ndata: {\"a\":1}\r\n\r\n: comment\n\ndata: x\ndata:y\n\ndata: partial";
        let mut e = Vec::new();
        let (n1, _) = next_event(s, &mut e).unwrap();
        assert_eq!(e, br#"{"a":1}"#);
        let (n2, _) = next_event(&s[n1..], &mut e).unwrap();
        assert!(e.is_empty());
        let (n3, _) = next_event(&s[n1 + n2..], &mut e).unwrap();
        assert_eq!(e, b"x\ny");
        assert!(next_event(&s[n1 + n2 + n3..], &mut e).is_none());
    }

    #[test]
    fn ids_and_retries_are_read_as_the_html_standard_says() {
        let s = b"id: 7\nretry: 250\ndata:\n\nid\ndata: a\n\nid: x\0y\nretry: 1s\ndata: b\n\n";
        let mut data = s.to_vec();
        let mut got = Vec::new();
        let all = take_events(&mut data, 64, |e| {
            got.push((e.data.to_vec(), e.id.map(<[u8]>::to_vec), e.retry));
            true
        });
        assert!(matches!(all, Ok(true)));
        assert_eq!(
            got,
            [
                // A priming event: an id and a retry, empty data.
                (vec![], Some(b"7".to_vec()), Some(250)),
                // `id` with no value: an empty id (it resets the last one).
                (b"a".to_vec(), Some(vec![]), None),
                // An id with a NUL, and a retry not all digits: ignored.
                (b"b".to_vec(), None, None),
            ]
        );
    }
}
