//! What the WebSocket and MCPB doors read of a client's JSON-RPC message: its id and kind, the
//! requests a batch holds, which of them a reply answers, and the error that answers the message
//! when the upstream cannot.
//!
//! Owns `Awaited`, the requests of one message that still wait for their responses, and
//! [`error_for`], the error answering a message.
//!
//! Invariants: every request (a message with a method and a string or number id) that is not
//! answered gets an error with its own id, a batch's requests included, so that no client
//! waits for an id nobody will answer; an id is matched as JSON (`"\u0061"` is `"a"`); a
//! single message costs no allocation (only a batch's ids are kept in a `Vec`).

use serde::Deserialize;
use serde_json::value::RawValue;

/// What tells a JSON-RPC message's kind and whose it is: its id, when it is a string or a
/// number (the ids JSON-RPC 2.0 allows besides null), and whether it names a method (a request
/// or a notification, not a response). Nothing for what is not a JSON object.
pub(super) struct MessageFields<'a> {
    pub id: Option<&'a RawValue>,
    pub method: bool,
}

/// The members of a JSON-RPC message that tell its kind, each as it came.
#[derive(Deserialize)]
struct Parts<'a> {
    #[serde(borrow)]
    jsonrpc: Option<&'a RawValue>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    method: Option<&'a RawValue>,
    #[serde(borrow)]
    result: Option<&'a RawValue>,
    #[serde(borrow)]
    error: Option<&'a RawValue>,
}

/// The parts of `message` when it is a JSON object.
fn parts(message: &[u8]) -> Option<Parts<'_>> {
    crate::echo::is_object(message)
        .then(|| serde_json::from_slice(message).ok())
        .flatten()
}

pub(super) fn fields_of(message: &[u8]) -> MessageFields<'_> {
    let read = parts(message);
    MessageFields {
        id: read
            .as_ref()
            .and_then(|m| m.id)
            .filter(|id| crate::echo::is_string_or_number(id.get())),
        method: read.is_some_and(|m| m.method.is_some()),
    }
}

/// Whether `reply` is a JSON-RPC response (an object with `jsonrpc` and a `result` or an
/// `error`), or a batch of them: what an upstream's error status may carry for the client. An
/// OAuth error (`{"error": "invalid_token"}`) or an error page is none, and would leave a
/// client waiting for its response.
pub(super) fn is_response(reply: &[u8]) -> bool {
    let one = |m: &[u8]| {
        parts(m).is_some_and(|r| r.jsonrpc.is_some() && (r.result.is_some() || r.error.is_some()))
    };
    match batch_of(reply) {
        Some(members) => !members.is_empty() && members.iter().all(|m| one(m.get().as_bytes())),
        None => one(reply),
    }
}

/// The members of `message` when it is a batch (a JSON array), read; `None` for anything else.
fn batch_of(message: &[u8]) -> Option<Vec<&RawValue>> {
    let array = message.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
    array
        .then(|| serde_json::from_slice(message).ok())
        .flatten()
}

/// The ids of the requests in `message` (itself, or the members of a batch) that wait for a
/// response, crossed off as replies bring their responses.
#[derive(Default)]
pub(super) struct Awaited<'a> {
    /// Whether the message is a batch: the errors for its requests are one array.
    batch: bool,
    /// Whether the message held a request at all (so a reply must bring responses).
    awaits: bool,
    /// A single request's id (no allocation for the common case).
    one: Option<&'a RawValue>,
    /// A batch's requests' ids.
    many: Vec<&'a RawValue>,
}

impl<'a> Awaited<'a> {
    /// The requests of `message`: none for a notification, a response, a request whose id is
    /// no string or number, or what is not JSON-RPC.
    pub(super) fn of(message: &'a [u8]) -> Self {
        let request = |m: MessageFields<'a>| m.id.filter(|_| m.method);
        let mut awaited = match batch_of(message) {
            Some(members) => Awaited {
                batch: true,
                many: members
                    .iter()
                    .filter_map(|m| request(fields_of(m.get().as_bytes())))
                    .collect(),
                ..Awaited::default()
            },
            None => Awaited {
                one: request(fields_of(message)),
                ..Awaited::default()
            },
        };
        awaited.awaits = !awaited.is_empty();
        awaited
    }

    /// Whether no request waits (any more).
    pub(super) fn is_empty(&self) -> bool {
        self.one.is_none() && self.many.is_empty()
    }

    /// Whether the message held requests.
    pub(super) fn awaits(&self) -> bool {
        self.awaits
    }

    /// Whether the message held requests and every one of them has its response.
    pub(super) fn all_answered(&self) -> bool {
        self.awaits && self.is_empty()
    }

    /// Crosses off the requests that `reply` (one message from the upstream, or a batch of
    /// them) answers.
    pub(super) fn answered_by(&mut self, reply: &[u8]) {
        if self.is_empty() {
            return;
        }
        match batch_of(reply) {
            Some(members) => members
                .iter()
                .for_each(|m| self.cross_off(m.get().as_bytes())),
            None => self.cross_off(reply),
        }
    }

    fn cross_off(&mut self, reply: &[u8]) {
        let r = fields_of(reply);
        let Some(id) = r.id.filter(|_| !r.method) else {
            return; // a notification or a request of the server's
        };
        let same = |awaited: &&RawValue| crate::echo::same_id(awaited.get(), id.get());
        if self.one.as_ref().is_some_and(same) {
            self.one = None;
        } else if let Some(at) = self.many.iter().position(same) {
            self.many.swap_remove(at);
        }
    }

    /// Appends the errors for the requests still waiting to `out`: one error, or an array of
    /// them for a batch. Nothing when none waits.
    pub(super) fn write_errors(&self, out: &mut Vec<u8>, why: &str) {
        if !self.batch {
            if let Some(id) = self.one {
                crate::echo::write_error(out, id.get(), -32000, why);
            }
            return;
        }
        if self.many.is_empty() {
            return;
        }
        out.push(b'[');
        for (i, id) in self.many.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            crate::echo::write_error(out, id.get(), -32000, why);
        }
        out.push(b']');
    }
}

/// A JSON-RPC error answering `message`: with its id, or null when it has none, is not a string
/// or a number (JSON-RPC 2.0: an id that cannot be read is answered with null) or the message is
/// not a JSON object; for a batch, an array of errors, one for each of its requests (null when
/// it holds none).
pub fn error_for(message: &[u8], why: &str) -> Vec<u8> {
    let mut payload = Vec::with_capacity(96 + why.len());
    write_error_for(&mut payload, message, why);
    payload
}

/// Appends the JSON-RPC error answering `message` (see [`error_for`]) to `out`.
pub(super) fn write_error_for(out: &mut Vec<u8>, message: &[u8], why: &str) {
    let requests = match batch_of(message) {
        Some(_) => Awaited::of(message),
        None => Awaited::default(),
    };
    if requests.is_empty() {
        let id = fields_of(message).id.map_or("null", RawValue::get);
        crate::echo::write_error(out, id, -32000, why);
    } else {
        requests.write_errors(out, why);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn an_error_names_the_message_id_only_when_it_is_a_string_or_a_number() {
        let id = |message: &str| {
            let error = error_for(message.as_bytes(), "failed");
            let reply: serde_json::Value = match serde_json::from_slice(&error) {
                Ok(v) => v,
                // A number beyond a double's range: check the text instead.
                Err(_) => return String::from_utf8(error).unwrap(),
            };
            assert_eq!(reply["error"]["code"], -32000);
            reply["id"].to_string()
        };
        assert_eq!(id(r#"{"jsonrpc":"2.0","id":7,"method":"x"}"#), "7");
        assert_eq!(id(r#"{"id":"a-1"}"#), r#""a-1""#);
        assert_eq!(id(r#"{"id":{"a":1}}"#), "null", "an object is no id");
        assert_eq!(id(r#"{"id":true}"#), "null");
        assert_eq!(
            id(r#"[{"jsonrpc":"2.0","method":"n"}]"#),
            "null",
            "no request"
        );
        assert_eq!(id("[]"), "null");
        assert_eq!(id("[1,"), "null", "no batch");
        assert_eq!(id("not json"), "null");
        assert!(
            id(r#"{"id":-3e0544}"#).contains(r#""id":-3e0544,"#),
            "as it came"
        );
    }

    #[test]
    fn only_json_rpc_responses_are_responses() {
        let error = r#"{"jsonrpc":"2.0","id":1,"error":{"code":-32600,"message":"x"}}"#;
        assert!(is_response(error.as_bytes()));
        assert!(is_response(br#"{"jsonrpc":"2.0","id":null,"result":{}}"#));
        assert!(is_response(format!(" [{error},{error}]").as_bytes()));
        for not in [
            &br#"{"error": "invalid_token", "error_description": "Authentication required"}"#[..],
            br#"{"jsonrpc":"2.0","id":1,"method":"a"}"#,
            br#"[]"#,
            br#"[{"jsonrpc":"2.0","id":1,"result":{}},{"error":"x"}]"#,
            b"<html>502 Bad Gateway</html>",
            b"",
        ] {
            assert!(!is_response(not), "{}", String::from_utf8_lossy(not));
        }
    }

    #[test]
    fn a_batch_is_answered_with_an_error_for_each_of_its_requests() {
        let batch = r#" [{"jsonrpc":"2.0","id":1,"method":"a"},
            {"jsonrpc":"2.0","method":"notifications/n"},
            {"jsonrpc":"2.0","id":"two","method":"b"},
            {"jsonrpc":"2.0","id":9,"result":{}},
            {"jsonrpc":"2.0","id":null,"method":"c"}, 5]"#;
        let errors: Vec<serde_json::Value> =
            serde_json::from_slice(&error_for(batch.as_bytes(), "failed")).unwrap();
        let ids: Vec<String> = errors.iter().map(|e| e["id"].to_string()).collect();
        assert_eq!(ids, ["1", r#""two""#]);
        assert!(errors.iter().all(|e| e["error"]["code"] == -32000));
    }

    #[test]
    fn replies_cross_off_the_requests_they_answer() {
        let batch = br#"[{"jsonrpc":"2.0","id":1,"method":"a"},{"jsonrpc":"2.0","id":"b","method":"b"},{"jsonrpc":"2.0","id":3,"method":"c"}]"#;
        let mut awaited = Awaited::of(batch);
        assert!(awaited.awaits() && !awaited.all_answered());
        // A server's request with an awaited id, and a notification, answer nothing.
        awaited.answered_by(br#"{"jsonrpc":"2.0","id":1,"method":"sampling/createMessage"}"#);
        awaited.answered_by(br#"{"jsonrpc":"2.0","method":"notifications/progress"}"#);
        // A response, the id written another way, and a batch of responses.
        awaited.answered_by(br#"{"jsonrpc":"2.0","id":"\u0062","result":{}}"#);
        let errors = |a: &Awaited| {
            let mut out = Vec::new();
            a.write_errors(&mut out, "lost");
            String::from_utf8(out).unwrap()
        };
        assert!(errors(&awaited).starts_with(r#"[{"jsonrpc":"2.0","id":1,"#));
        awaited.answered_by(
            br#"[{"jsonrpc":"2.0","id":3,"result":{}},{"jsonrpc":"2.0","id":7,"error":{}}]"#,
        );
        assert!(!awaited.is_empty());
        let left: Vec<serde_json::Value> = serde_json::from_str(&errors(&awaited)).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0]["id"], 1);
        awaited.answered_by(br#"{"jsonrpc":"2.0","id":1,"error":{"code":1,"message":"x"}}"#);
        assert!(awaited.is_empty() && awaited.all_answered());
        assert_eq!(errors(&awaited), "");

        let mut one = Awaited::of(br#"{"jsonrpc":"2.0","id":"x","method":"a"}"#);
        assert_eq!(
            errors(&one),
            r#"{"jsonrpc":"2.0","id":"x","error":{"code":-32000,"message":"lost"}}"#
        );
        one.answered_by(br#"{"jsonrpc":"2.0","id":"x","result":{}}"#);
        assert!(one.is_empty());
        for nothing in [
            &br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#[..],
            br#"{"jsonrpc":"2.0","id":4,"result":{}}"#,
            br#"{"jsonrpc":"2.0","id":[1],"method":"a"}"#,
            b"[]",
            b"garbage",
        ] {
            let none = Awaited::of(nothing);
            assert!(
                none.is_empty() && !none.awaits() && !none.all_answered(),
                "{nothing:?}"
            );
        }
    }
}
