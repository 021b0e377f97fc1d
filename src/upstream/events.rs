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

/// Takes the complete server-sent events out of the start of `data` and hands each (its data, see
/// `next_event`) to `each`, in order, until `each` returns false (`Ok(false)`; what is left
/// stays in `data`). `Err(TooLarge)` when an event, or the part of the next one left in `data`,
/// is larger than `max`. The events' data are put together in one pooled buffer, one after
/// another: nothing is allocated per event.
pub fn take_events(
    data: &mut Vec<u8>,
    max: usize,
    mut each: impl FnMut(&[u8]) -> bool,
) -> Result<bool, TooLarge> {
    let mut at = 0;
    let mut taken = Ok(true);
    let mut event = take_buf();
    while let Some(used) = next_event(&data[at..], &mut event) {
        at += used;
        if event.len() > max {
            taken = Err(TooLarge);
            break;
        }
        if !each(&event) {
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

/// The next complete server-sent event at the start of `data`: the bytes it used, and its data
/// (the `data:` lines joined with `\n`; empty for events without data, such as comments) in
/// `payload`, cleared first.
fn next_event(data: &[u8], payload: &mut Vec<u8>) -> Option<usize> {
    payload.clear();
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
            return Some(at);
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
    fn events_are_taken_whole_and_never_past_the_size() {
        let mut got = Vec::new();
        let mut data = b"data: a\n\ndata: b\n\ndata: par".to_vec();
        assert!(matches!(
            take_events(&mut data, 16, |e| {
                got.push(e.to_vec());
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
        let n1 = next_event(s, &mut e).unwrap();
        assert_eq!(e, br#"{"a":1}"#);
        let n2 = next_event(&s[n1..], &mut e).unwrap();
        assert!(e.is_empty());
        let n3 = next_event(&s[n1 + n2..], &mut e).unwrap();
        assert_eq!(e, b"x\ny");
        assert!(next_event(&s[n1 + n2 + n3..], &mut e).is_none());
    }
}
