//! `builtin:echo`: a small MCP server inside the gateway.
//!
//! Answers `initialize`, `ping`, `tools/list` and `tools/call` of one tool, `echo`, which returns
//! its `message` argument as text. It is the default upstream, so a fresh gateway answers real MCP
//! requests, and it is what demos and benchmarks talk to. It is stateless: a session id it hands
//! out on `initialize` is accepted but not required later.
//!
//! Input is one JSON-RPC message or a batch (array). Notifications and client responses get no
//! reply. Malformed JSON gets a `-32700` parse error with `id: null`.

use std::borrow::Cow;
use std::io::Write as _;

use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

/// The protocol version offered when the client asks for one we do not know: the latest.
const PROTOCOL_VERSION: &str = "2025-11-25";
/// The MCP revisions it speaks. What it serves is the same in each; from 2025-11-25 on, a tool
/// call's bad arguments are the tool's error (`isError`), which earlier revisions allow too.
const KNOWN_VERSIONS: [&str; 4] = ["2024-11-05", "2025-03-26", "2025-06-18", PROTOCOL_VERSION];

/// Whether `version` (an `MCP-Protocol-Version` header's value) is a revision it speaks.
pub fn speaks(version: &str) -> bool {
    KNOWN_VERSIONS.contains(&version)
}

/// What [`handle`] produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// A reply was appended to `out` (false: only notifications or responses came in).
    pub replied: bool,
    /// The input was not JSON (the reply is a parse error).
    pub parse_error: bool,
    /// The input held an `initialize` request (the HTTP door then issues a session id).
    pub initialize: bool,
}

/// One message, borrowed from the input: nothing is copied but escaped strings.
#[derive(Deserialize)]
struct Message<'a> {
    #[serde(default, borrow)]
    jsonrpc: Option<Str<'a>>,
    #[serde(default, borrow)]
    id: Id<'a>,
    #[serde(default, borrow)]
    method: Option<Str<'a>>,
    #[serde(default, borrow)]
    params: Option<&'a RawValue>,
    #[serde(default, borrow)]
    result: Option<&'a RawValue>,
    #[serde(default, borrow)]
    error: Option<&'a RawValue>,
}

/// A JSON string, borrowed from the input when it has no escapes. (Serde's own `Cow<str>`
/// inside an `Option` always copies, `borrow` or not: four allocations per echoed call.)
struct Str<'a>(Cow<'a, str>);

impl std::ops::Deref for Str<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Text;
        impl<'de> serde::de::Visitor<'de> for Text {
            type Value = Cow<'de, str>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Cow::Borrowed(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Cow::Owned(v.to_owned()))
            }
        }
        d.deserialize_str(Text).map(Str)
    }
}

/// A present `id` (`null` included), kept as raw JSON to be echoed back byte for byte.
#[derive(Default)]
struct Id<'a>(Option<&'a RawValue>);

impl<'de: 'a, 'a> Deserialize<'de> for Id<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <&RawValue>::deserialize(d).map(|raw| Id(Some(raw)))
    }
}

#[derive(Deserialize)]
struct CallParams<'a> {
    #[serde(default, borrow)]
    name: Option<Str<'a>>,
    /// Read apart from the name, so that arguments of the wrong shape are the tool's error,
    /// not an unknown tool.
    #[serde(default, borrow)]
    arguments: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct EchoArguments<'a> {
    #[serde(default, borrow)]
    message: Option<Str<'a>>,
}

#[derive(Deserialize)]
struct InitializeParams<'a> {
    #[serde(default, rename = "protocolVersion", borrow)]
    protocol_version: Option<Str<'a>>,
}

const TOOLS: &str = r#"{"tools":[{"name":"echo","description":"Returns its message argument unchanged.","inputSchema":{"type":"object","properties":{"message":{"type":"string","description":"Text to echo back."}},"required":["message"]}}]}"#;

/// Whether `json` is an object. A JSON-RPC message is one, and serde's derived structs read
/// arrays too, by position (`["2.0", 1, "ping"]` would pass for a ping).
pub fn is_object(json: &[u8]) -> bool {
    json.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
}

/// Whether the raw JSON `id` is a string or a number, the ids JSON-RPC 2.0 allows besides null.
pub fn is_string_or_number(id: &str) -> bool {
    id.starts_with(|c: char| c == '"' || c == '-' || c.is_ascii_digit())
}

/// Whether two raw JSON-RPC ids (strings or numbers, as [`is_string_or_number`] takes them)
/// name the same request: strings by their text, escapes read (`"\u0061"` is `"a"`), numbers
/// as written (a server answers with the id it was sent).
pub fn same_id(a: &str, b: &str) -> bool {
    a == b
        || (a.starts_with('"')
            && b.starts_with('"')
            && matches!(
                (serde_json::from_str::<Str>(a), serde_json::from_str::<Str>(b)),
                (Ok(a), Ok(b)) if *a == *b
            ))
}

/// Handles one JSON-RPC message (or batch) and appends the reply, if any, to `out`.
pub fn handle(input: &[u8], out: &mut Vec<u8>) -> Answer {
    let mut answer = Answer {
        replied: false,
        parse_error: false,
        initialize: false,
    };
    let first = input.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'[') {
        let batch: Vec<&RawValue> = match serde_json::from_slice(input) {
            Ok(b) => b,
            Err(e) => return parse_error(out, &e, answer),
        };
        if batch.is_empty() {
            write_error(out, "null", -32600, "invalid request: empty batch");
            answer.replied = true;
            return answer;
        }
        let start = out.len();
        out.push(b'[');
        for item in batch {
            let before = out.len();
            if before > start + 1 {
                out.push(b',');
            }
            let message = match is_object(item.get().as_bytes()) {
                true => serde_json::from_str::<Message>(item.get()),
                false => Err(serde::de::Error::custom("not an object")),
            };
            if !reply_to(message, out, &mut answer.initialize) && out.len() == before + 1 {
                out.pop(); // no reply for this one: drop the comma
            }
        }
        if out.len() == start + 1 {
            out.truncate(start); // only notifications and responses
        } else {
            out.push(b']');
            answer.replied = true;
        }
        return answer;
    }
    match serde_json::from_slice::<Message>(input) {
        Err(e) if !e.is_data() => parse_error(out, &e, answer),
        message => {
            answer.replied = reply_to(message, out, &mut answer.initialize);
            answer
        }
    }
}

fn parse_error(out: &mut Vec<u8>, e: &serde_json::Error, mut answer: Answer) -> Answer {
    answer.replied = true;
    answer.parse_error = true;
    write_error(out, "null", -32700, &format!("parse error: {e}"));
    answer
}

/// Appends a `tools/call` result whose content is `text`, flagged as the tool's error or not.
fn write_tool_result(out: &mut Vec<u8>, id: &str, text: &str, is_error: bool) {
    write_result(out, id, |out| {
        out.extend_from_slice(br#"{"content":[{"type":"text","text":"#);
        serde_json::to_writer(&mut *out, text).expect("Vec<u8> write");
        out.extend_from_slice(if is_error {
            br#"}],"isError":true}"#
        } else {
            br#"}],"isError":false}"#
        });
    });
}

/// Appends `{"jsonrpc":"2.0","id":ID,"error":{"code":C,"message":M}}`; `id` is raw JSON.
pub fn write_error(out: &mut Vec<u8>, id: &str, code: i64, message: &str) {
    out.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"id\":");
    out.extend_from_slice(id.as_bytes());
    let _ = write!(out, ",\"error\":{{\"code\":{code},\"message\":");
    serde_json::to_writer(&mut *out, message).expect("Vec<u8> write");
    out.extend_from_slice(b"}}");
}

fn write_result(out: &mut Vec<u8>, id: &str, result: impl FnOnce(&mut Vec<u8>)) {
    out.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"id\":");
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(b",\"result\":");
    result(out);
    out.push(b'}');
}

/// Appends the reply to one message; false when it gets none (notification, response).
fn reply_to(
    message: serde_json::Result<Message>,
    out: &mut Vec<u8>,
    initialize: &mut bool,
) -> bool {
    let Ok(m) = message else {
        write_error(
            out,
            "null",
            -32600,
            "invalid request: not a JSON-RPC message object",
        );
        return true;
    };
    let id = m.id.0.map_or("null", RawValue::get);
    if m.method.is_none() && (m.result.is_some() || m.error.is_some()) {
        return false; // a client's response to a server request: never answered
    }
    if id != "null" && !is_string_or_number(id) {
        // An object, array or boolean id cannot be echoed as one: JSON-RPC 2.0 answers null.
        write_error(
            out,
            "null",
            -32600,
            "invalid request: id must be a string, a number or null",
        );
        return true;
    }
    let Some(method) = m.method.filter(|_| m.jsonrpc.as_deref() == Some("2.0")) else {
        write_error(
            out,
            id,
            -32600,
            "invalid request: expected jsonrpc \"2.0\" and a method",
        );
        return true;
    };
    if m.id.0.is_none() {
        return false; // a notification
    }
    let params = m.params.map_or("{}", RawValue::get);
    match &*method {
        "initialize" => {
            *initialize = true;
            let asked = serde_json::from_str::<InitializeParams>(params)
                .ok()
                .and_then(|p| p.protocol_version);
            let version = asked
                .as_deref()
                .filter(|v| speaks(v))
                .unwrap_or(PROTOCOL_VERSION);
            write_result(out, id, |out| {
                let _ = write!(
                    out,
                    r#"{{"protocolVersion":"{version}","capabilities":{{"tools":{{"listChanged":false}}}},"serverInfo":{{"name":"mcp-gateway-echo","version":"{}"}}}}"#,
                    env!("CARGO_PKG_VERSION")
                );
            });
        }
        "ping" => write_result(out, id, |out| out.extend_from_slice(b"{}")),
        "tools/list" => write_result(out, id, |out| out.extend_from_slice(TOOLS.as_bytes())),
        "tools/call" => {
            let call = serde_json::from_str::<CallParams>(params).ok();
            let (name, message) = match call {
                Some(c) => (
                    c.name,
                    c.arguments
                        .and_then(|a| serde_json::from_str::<EchoArguments>(a.get()).ok())
                        .and_then(|a| a.message),
                ),
                None => (None, None),
            };
            match (name.as_deref(), message) {
                (Some("echo"), Some(text)) => write_tool_result(out, id, &text, false),
                // Bad arguments are the tool's error, for the model to read and correct (MCP
                // 2025-11-25: input validation errors are tool execution errors).
                (Some("echo"), None) => {
                    write_tool_result(out, id, "echo needs a string argument \"message\"", true)
                }
                (other, _) => write_error(
                    out,
                    id,
                    -32602,
                    &format!("unknown tool: {}", other.unwrap_or("(none)")),
                ),
            }
        }
        other => write_error(out, id, -32601, &format!("method not found: {other}")),
    }
    true
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn strings_are_borrowed_from_the_input_unless_escaped() {
        let m: Message =
            serde_json::from_str(r#"{"jsonrpc":"2.0","method":"tools/call"}"#).unwrap();
        assert!(matches!(m.method.unwrap().0, Cow::Borrowed("tools/call")));
        assert!(matches!(m.jsonrpc.unwrap().0, Cow::Borrowed("2.0")));
        let m: Message = serde_json::from_str(r#"{"method":"tools\/call"}"#).unwrap();
        assert!(matches!(m.method.unwrap().0, Cow::Owned(s) if s == "tools/call"));
        let c: CallParams =
            serde_json::from_str(r#"{"name":"echo","arguments":{"message":"a\nb"}}"#).unwrap();
        assert!(matches!(c.name.unwrap().0, Cow::Borrowed("echo")));
        let a: EchoArguments = serde_json::from_str(c.arguments.unwrap().get()).unwrap();
        assert_eq!(&*a.message.unwrap(), "a\nb");
        assert!(serde_json::from_str::<Message>(r#"{"method":7}"#).is_err());
    }

    fn ask(req: &str) -> (Answer, Value) {
        let mut out = Vec::new();
        let a = handle(req.as_bytes(), &mut out);
        let v = if out.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&out).unwrap()
        };
        (a, v)
    }

    #[test]
    fn tools_list_and_call() {
        let (_, v) = ask(r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#);
        assert_eq!(v["result"]["tools"][0]["name"], "echo");
        let (_, v) = ask(
            r#"{"jsonrpc":"2.0","id":"a","method":"tools/call","params":{"name":"echo","arguments":{"message":"hi"}}}"#,
        );
        assert_eq!(v["id"], "a");
        assert_eq!(v["result"]["content"][0]["text"], "hi");
        assert_eq!(v["result"]["isError"], false);
        // Bad arguments: the tool's error, in a result. An unknown tool: a protocol error.
        let (_, v) = ask(
            r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"echo","arguments":{"message":3}}}"#,
        );
        assert_eq!(v["result"]["isError"], true, "{v}");
        let (_, v) =
            ask(r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"nope"}}"#);
        assert_eq!(v["error"]["code"], -32602, "{v}");
    }

    #[test]
    fn initialize_is_flagged_and_negotiates_version() {
        let (a, v) = ask(
            r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-03-26","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#,
        );
        assert!(a.initialize);
        assert_eq!(v["result"]["protocolVersion"], "2025-03-26");
    }

    #[test]
    fn ids_are_the_same_by_their_text() {
        assert!(same_id("7", "7"));
        assert!(same_id(r#""a""#, r#""\u0061""#));
        assert!(!same_id(r#""7""#, "7"));
        assert!(!same_id(r#""a""#, r#""b""#));
        assert!(!same_id("1", "2"));
    }

    #[test]
    fn notifications_and_responses_get_no_reply() {
        assert!(
            !ask(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#)
                .0
                .replied
        );
        assert!(!ask(r#"{"jsonrpc":"2.0","id":4,"result":{}}"#).0.replied);
    }

    #[test]
    fn errors_have_their_codes() {
        let (a, v) = ask("{nope");
        assert!(a.parse_error);
        assert_eq!(v["error"]["code"], -32700);
        assert_eq!(v["id"], Value::Null);
        assert_eq!(
            ask(r#"{"jsonrpc":"2.0","id":1,"method":"nope"}"#).1["error"]["code"],
            -32601
        );
        assert_eq!(ask(r#"[1]"#).1[0]["error"]["code"], -32600);
    }

    #[test]
    fn ids_are_echoed_byte_for_byte() {
        let mut out = Vec::new();
        handle(
            br#"{"jsonrpc":"2.0","id":"a\u0062","method":"ping"}"#,
            &mut out,
        );
        assert_eq!(out, br#"{"jsonrpc":"2.0","id":"a\u0062","result":{}}"#);
        out.clear();
        handle(br#"{"jsonrpc":"2.0","id":null,"method":"ping"}"#, &mut out);
        assert_eq!(out, br#"{"jsonrpc":"2.0","id":null,"result":{}}"#);
        out.clear();
        let a = handle(
            br#"[{"jsonrpc":"2.0","method":"a"},{"jsonrpc":"2.0","method":"b"}]"#,
            &mut out,
        );
        assert!(
            !a.replied && out.is_empty(),
            "a batch of notifications gets nothing"
        );
        assert_eq!(ask("[]").1["error"]["code"], -32600);
        assert_eq!(
            ask(r#"{"jsonrpc":"2.0","id":1,"method":7}"#).1["error"]["code"],
            -32600
        );
    }

    #[test]
    fn an_id_that_is_not_a_string_a_number_or_null_is_an_invalid_request() {
        for id in [r#"{"a":1}"#, "[1]", "true", "false"] {
            let (_, v) = ask(&format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"ping"}}"#));
            assert_eq!(v["error"]["code"], -32600, "{id}");
            assert_eq!(v["id"], Value::Null, "{id}");
        }
        // A client's response is never answered, whatever its id.
        let response = r#"{"jsonrpc":"2.0","id":{"a":1},"result":{}}"#;
        assert!(!ask(response).0.replied);
        for id in ["-1.5e3", r#""x""#] {
            let (_, v) = ask(&format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"ping"}}"#));
            assert_eq!(v["result"], serde_json::json!({}), "{id}");
        }
    }

    #[test]
    fn batch_replies_in_order() {
        let (_, v) = ask(
            r#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","method":"x"},{"jsonrpc":"2.0","id":2,"method":"ping"}]"#,
        );
        assert_eq!(v.as_array().unwrap().len(), 2);
        assert_eq!(v[1]["id"], 2);
    }

    #[test]
    fn a_batch_member_that_is_not_an_object_is_an_invalid_request() {
        // Read by position, this array would be a ping with id 1.
        let (_, v) = ask(r#"[["2.0",1,"ping"],{"jsonrpc":"2.0","id":2,"method":"ping"}]"#);
        assert_eq!(v[0]["id"], Value::Null);
        assert_eq!(v[0]["error"]["code"], -32600);
        assert_eq!(v[1]["result"], serde_json::json!({}));
    }
}
