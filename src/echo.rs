//! `builtin:echo`: a small MCP server inside the gateway.
//!
//! Answers `initialize`, `ping`, `tools/list` and `tools/call` of one tool, `echo`, which returns
//! its `message` argument as text. It is the default upstream, so a fresh gateway answers real MCP
//! requests, and it is what demos and benchmarks talk to. It is stateless: a session id it hands
//! out on `initialize` is accepted but not required later.
//!
//! Input is one JSON-RPC message or a batch (array). Notifications and client responses get no
//! reply. Malformed JSON gets a `-32700` parse error with `id: null`.

use serde_json::{json, Value};

/// The protocol version offered when the client asks for one we do not know.
pub const PROTOCOL_VERSION: &str = "2025-06-18";
const KNOWN_VERSIONS: [&str; 3] = ["2024-11-05", "2025-03-26", "2025-06-18"];

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

/// Handles one JSON-RPC message (or batch) and appends the reply, if any, to `out`.
pub fn handle(input: &[u8], out: &mut Vec<u8>) -> Answer {
    let mut answer = Answer {
        replied: false,
        parse_error: false,
        initialize: false,
    };
    let msg: Value = match serde_json::from_slice(input) {
        Ok(v) => v,
        Err(e) => {
            answer.replied = true;
            answer.parse_error = true;
            write_error(out, &Value::Null, -32700, &format!("parse error: {e}"));
            return answer;
        }
    };
    match msg {
        Value::Array(batch) if !batch.is_empty() => {
            let replies: Vec<Value> = batch
                .iter()
                .filter_map(|m| reply_to(m, &mut answer.initialize))
                .collect();
            if !replies.is_empty() {
                serde_json::to_writer(&mut *out, &replies).expect("Vec<u8> write");
                answer.replied = true;
            }
        }
        other => {
            if let Some(reply) = reply_to(&other, &mut answer.initialize) {
                serde_json::to_writer(&mut *out, &reply).expect("Vec<u8> write");
                answer.replied = true;
            }
        }
    }
    answer
}

/// Appends `{"jsonrpc":"2.0","id":ID,"error":{"code":C,"message":M}}` to `out`.
/// Written by hand so the members come in the order of the contract (serde_json sorts them).
pub fn write_error(out: &mut Vec<u8>, id: &Value, code: i64, message: &str) {
    use std::io::Write as _;
    out.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"id\":");
    serde_json::to_writer(&mut *out, id).expect("Vec<u8> write");
    let _ = write!(out, ",\"error\":{{\"code\":{code},\"message\":");
    serde_json::to_writer(&mut *out, message).expect("Vec<u8> write");
    out.extend_from_slice(b"}}");
}

fn reply_to(msg: &Value, initialize: &mut bool) -> Option<Value> {
    let Some(obj) = msg.as_object() else {
        return Some(error(
            &Value::Null,
            -32600,
            "invalid request: not an object",
        ));
    };
    if !obj.contains_key("method") && (obj.contains_key("result") || obj.contains_key("error")) {
        return None; // a client's response to a server request
    }
    let well_formed = obj.get("jsonrpc").and_then(Value::as_str) == Some("2.0");
    let Some(method) = obj
        .get("method")
        .and_then(Value::as_str)
        .filter(|_| well_formed)
    else {
        let id = obj.get("id").cloned().unwrap_or(Value::Null);
        return Some(error(
            &id,
            -32600,
            "invalid request: expected jsonrpc \"2.0\" and a method",
        ));
    };
    let Some(id) = obj.get("id") else {
        return None; // a notification
    };
    let params = obj.get("params");
    let result = match method {
        "initialize" => {
            *initialize = true;
            let asked = params
                .and_then(|p| p.get("protocolVersion"))
                .and_then(Value::as_str)
                .filter(|v| KNOWN_VERSIONS.contains(v))
                .unwrap_or(PROTOCOL_VERSION);
            json!({
                "protocolVersion": asked,
                "capabilities": {"tools": {"listChanged": false}},
                "serverInfo": {"name": "mcp-gateway-echo", "version": env!("CARGO_PKG_VERSION")},
            })
        }
        "ping" => json!({}),
        "tools/list" => json!({"tools": [{
            "name": "echo",
            "description": "Returns its message argument unchanged.",
            "inputSchema": {
                "type": "object",
                "properties": {"message": {"type": "string", "description": "Text to echo back."}},
                "required": ["message"],
            },
        }]}),
        "tools/call" => {
            let name = params.and_then(|p| p.get("name")).and_then(Value::as_str);
            if name != Some("echo") {
                return Some(error(
                    id,
                    -32602,
                    &format!("unknown tool: {}", name.unwrap_or("(none)")),
                ));
            }
            let message = params
                .and_then(|p| p.get("arguments"))
                .and_then(|a| a.get("message"))
                .and_then(Value::as_str);
            match message {
                Some(text) => {
                    json!({"content": [{"type": "text", "text": text}], "isError": false})
                }
                None => {
                    return Some(error(
                        id,
                        -32602,
                        "echo needs a string argument \"message\"",
                    ))
                }
            }
        }
        other => return Some(error(id, -32601, &format!("method not found: {other}"))),
    };
    Some(json!({"jsonrpc": "2.0", "id": id, "result": result}))
}

fn error(id: &Value, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

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
    fn batch_replies_in_order() {
        let (_, v) = ask(
            r#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","method":"x"},{"jsonrpc":"2.0","id":2,"method":"ping"}]"#,
        );
        assert_eq!(v.as_array().unwrap().len(), 2);
        assert_eq!(v[1]["id"], 2);
    }
}
