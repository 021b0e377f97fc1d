//! The Streamable HTTP front door as a real server: keep-alive, pipelining, chunked bodies, the
//! MCP reply shapes, and careful answers to bad input, each followed by a close.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;

#[test]
fn keep_alive_and_pipelining_answer_in_order() {
    let gw = start("");
    let mut s = connect_from("127.0.0.2", gw.http);
    for id in 1..=3 {
        let r = roundtrip(
            &mut s,
            &post_mcp(&format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"ping"}}"#)),
        );
        assert_eq!((r.status, r.json()["id"].as_i64()), (200, Some(id)));
    }
    // Three requests in one write, the last split across two writes.
    let reqs: String = (10..13)
        .map(|id| post_mcp(&format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"ping"}}"#)))
        .collect();
    let (a, b) = reqs.split_at(reqs.len() - 7);
    s.write_all(a.as_bytes()).unwrap();
    s.write_all(b.as_bytes()).unwrap();
    let mut buf = Vec::new();
    for id in 10..13 {
        let r = read_response(&mut s, &mut buf).unwrap();
        assert_eq!(r.json()["id"].as_i64(), Some(id));
    }
    assert_eq!(
        gw.metric("mcp_gateway_requests_total{frontend=\"http\"}"),
        6.0
    );
}

#[test]
fn mcp_shapes_json_sse_session_and_notifications() {
    let gw = start("");
    let mut s = connect_from("127.0.0.2", gw.http);
    let init = r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    let r = roundtrip(&mut s, &post_mcp(init));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let session = r
        .header("mcp-session-id")
        .expect("a session id")
        .to_string();
    assert!(session.len() >= 16);
    assert_eq!(r.json()["result"]["serverInfo"]["name"], "mcp-gateway-echo");

    let note = r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;
    let r = roundtrip(&mut s, &post_mcp(note));
    assert_eq!((r.status, r.body.len()), (202, 0));

    let call = r#"{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"echo","arguments":{"message":"héllo"}}}"#;
    let req = format!(
        "POST /mcp HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nAccept: text/event-stream\r\nMcp-Session-Id: {session}\r\nContent-Length: {}\r\n\r\n{call}",
        call.len()
    );
    let r = roundtrip(&mut s, &req);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let text = String::from_utf8(r.body).unwrap();
    let data = text
        .strip_prefix("event: message\ndata: ")
        .unwrap()
        .strip_suffix("\n\n")
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(data).unwrap();
    assert_eq!(v["result"]["content"][0]["text"], "héllo");

    let del = format!("DELETE /mcp HTTP/1.1\r\nHost: t\r\nMcp-Session-Id: {session}\r\n\r\n");
    assert_eq!(roundtrip(&mut s, &del).status, 200);
    let get = roundtrip(
        &mut s,
        "GET /mcp HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n",
    );
    assert_eq!(get.status, 405);
    assert_eq!(
        roundtrip(&mut s, "GET /other HTTP/1.1\r\nHost: t\r\n\r\n").status,
        404
    );
    let unknown = post_mcp(TOOLS_LIST).replace("POST /mcp ", "POST /mcp/nosuch ");
    assert_eq!(roundtrip(&mut s, &unknown).status, 404);
}

#[test]
fn builtin_echo_negotiates_and_checks_the_protocol_revision() {
    let gw = start("");
    let mut s = connect_from("127.0.0.2", gw.http);
    let init = |v: &str| {
        format!(
            r#"{{"jsonrpc":"2.0","id":0,"method":"initialize","params":{{"protocolVersion":"{v}","capabilities":{{}},"clientInfo":{{"name":"t","version":"1"}}}}}}"#
        )
    };
    // The latest revision, and an older one, are answered in kind; an unknown one gets the
    // latest.
    for (asked, got) in [
        ("2025-11-25", "2025-11-25"),
        ("2025-03-26", "2025-03-26"),
        ("2099-01-01", "2025-11-25"),
    ] {
        let r = roundtrip(&mut s, &post_mcp(&init(asked)));
        assert_eq!(r.json()["result"]["protocolVersion"], got, "{asked}");
    }
    let with_revision = |v: &str, body: &str| {
        post_mcp(body).replacen("\r\n", &format!("\r\nMCP-Protocol-Version: {v}\r\n"), 1)
    };
    // Later requests name the revision: one it speaks is served...
    let r = roundtrip(&mut s, &with_revision("2025-11-25", TOOLS_LIST));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["result"]["tools"][0]["name"], "echo");
    // ...one it does not gets 400 (MCP: "invalid or unsupported"), and the connection stays.
    let r = roundtrip(&mut s, &with_revision("1999-01-01", TOOLS_LIST));
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], -32600);
    let message = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(message.contains("1999-01-01"), "{message}");
    let del = "DELETE /mcp HTTP/1.1\r\nHost: t\r\nMcp-Session-Id: x\r\nMCP-Protocol-Version: nope\r\n\r\n";
    assert_eq!(roundtrip(&mut s, del).status, 400);
    // A tool call's bad arguments are the tool's error, in a result (MCP 2025-11-25).
    let call =
        r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"echo","arguments":{}}}"#;
    let r = roundtrip(&mut s, &with_revision("2025-11-25", call));
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["result"]["isError"], true, "{v}");
    let text = v["result"]["content"][0]["text"].as_str().unwrap();
    assert!(text.contains("message"), "{text}");
}

#[test]
fn namespaces_route_by_path() {
    let gw = start_with(
        "",
        "service_discovery:\n  static:\n    endpoints:\n      default:\n        - url: builtin:echo\n      tools:\n        - url: builtin:echo\n",
    );
    let mut s = connect_from("127.0.0.2", gw.http);
    let r = roundtrip(
        &mut s,
        &post_mcp(TOOLS_LIST).replace("POST /mcp ", "POST /mcp/tools "),
    );
    assert_eq!(r.status, 200);
    // The absolute form of the target (what clients send to a proxy) routes the same.
    let absolute = format!("POST http://{}/mcp/tools?x=1 ", gw.http);
    let r = roundtrip(
        &mut s,
        &post_mcp(TOOLS_LIST).replace("POST /mcp ", &absolute),
    );
    assert_eq!(r.status, 200);
    gw.wait_metric(
        "mcp_gateway_upstream_requests_total{namespace=\"tools\",upstream=\"builtin:echo\",outcome=\"ok\"}",
        2.0,
    );
}

#[test]
fn chunked_body_and_expect_continue() {
    let gw = start("");
    let mut s = connect_from("127.0.0.2", gw.http);
    let body = TOOLS_LIST.as_bytes();
    let (a, b) = body.split_at(10);
    let req = format!(
        "POST /mcp HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{}\r\n{:x}\r\n{}\r\n0\r\n\r\n",
        a.len(),
        std::str::from_utf8(a).unwrap(),
        b.len(),
        std::str::from_utf8(b).unwrap()
    );
    let r = roundtrip(&mut s, &req);
    assert_eq!(r.json()["result"]["tools"][0]["name"], "echo");
    // With a request pipelined behind it, in small chunks with extensions and a trailer field:
    // both are answered, in order.
    let chunks: String = TOOLS_LIST
        .chars()
        .map(|c| format!("1;n=v\r\n{c}\r\n"))
        .collect();
    let both = format!(
        "POST /mcp HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{chunks}0\r\nX-Sum: 1\r\n\r\n{}",
        post_mcp(r#"{"jsonrpc":"2.0","id":2,"method":"ping"}"#)
    );
    s.write_all(both.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let first = read_response(&mut s, &mut buf).unwrap();
    assert_eq!(first.json()["result"]["tools"][0]["name"], "echo");
    assert_eq!(read_response(&mut s, &mut buf).unwrap().json()["id"], 2);

    let head = format!(
        "POST /mcp HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let cont = read_response(&mut s, &mut buf).unwrap();
    assert_eq!(cont.status, 100);
    s.write_all(body).unwrap();
    assert_eq!(read_response(&mut s, &mut buf).unwrap().status, 200);
}

/// Sends raw bytes and expects `status` with a JSON-RPC error body, then the close.
fn expect_refusal(gw: &Gateway, raw: &[u8], status: u16) {
    let mut s = connect_from("127.0.0.3", gw.http);
    s.write_all(raw).unwrap();
    let r =
        read_response(&mut s, &mut Vec::new()).unwrap_or_else(|| panic!("no {status} response"));
    assert_eq!(r.status, status, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(r.json()["jsonrpc"], "2.0");
    assert!(closed_by_peer(&mut s));
}

#[test]
fn bad_input_gets_the_right_status_then_a_close() {
    let gw = start("max_message_size: 1024");
    expect_refusal(&gw, b"this is not http\r\n\r\n", 400);
    expect_refusal(
        &gw,
        b"POST /mcp HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
        400,
    );
    expect_refusal(
        &gw,
        b"POST /mcp HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        400,
    );
    let big_header = format!("GET /mcp HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(20_000));
    expect_refusal(&gw, big_header.as_bytes(), 431);
    expect_refusal(
        &gw,
        b"POST /mcp HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n{",
        413,
    );
    let chunked_big = format!(
        "POST /mcp HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n800\r\n{}\r\n",
        "a".repeat(2048)
    );
    expect_refusal(&gw, chunked_big.as_bytes(), 413);
    // A length that is not all digits.
    expect_refusal(
        &gw,
        b"POST /mcp HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: +2\r\n\r\n{}",
        400,
    );
    // HTTP/1.1 without a Host field, or with two.
    expect_refusal(
        &gw,
        b"POST /mcp HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
        400,
    );
    expect_refusal(
        &gw,
        b"POST /mcp HTTP/1.1\r\nHost: a\r\nHost: b\r\nContent-Length: 2\r\n\r\n{}",
        400,
    );
    // A chunked body that is mostly extensions: refused after about 16 KiB of them, though its
    // data would stay far under max_message_size.
    let padded = format!(
        "POST /mcp HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n{}",
        format!("1;{}\r\na\r\n", "e".repeat(500)).repeat(40)
    );
    expect_refusal(&gw, padded.as_bytes(), 400);
    // Errors in the JSON, not in the HTTP, keep the connection usable.
    let mut s = connect_from("127.0.0.3", gw.http);
    let r = roundtrip(&mut s, &post_mcp("{not json"));
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_i64()),
        (400, Some(-32700))
    );
    let r = roundtrip(
        &mut s,
        "POST /mcp HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\n{}",
    );
    assert_eq!(r.status, 415);
    assert_eq!(roundtrip(&mut s, &post_mcp(TOOLS_LIST)).status, 200);
    drop(s);
    assert!(
        gw.metric("mcp_gateway_protocol_errors_total{frontend=\"http\",kind=\"malformed\"}") >= 3.0
    );
    assert_eq!(
        gw.metric("mcp_gateway_protocol_errors_total{frontend=\"http\",kind=\"too_large\"}"),
        3.0
    );
    gw.wait_all_closed();
}

/// A gateway whose `read_timeout` is 0.3 s and `idle_timeout` 0.5 s answers a request head
/// that stops coming 408, and closes a keep-alive connection idle that long.
fn assert_slow_gets_408_and_idle_is_closed(gw: &Gateway) {
    let mut slow = connect_from("127.0.0.2", gw.http);
    slow.write_all(b"POST /mcp HTTP/1.1\r\nHost: t\r\n")
        .unwrap();
    let t = Instant::now();
    let r = read_response(&mut slow, &mut Vec::new()).expect("a 408");
    assert_eq!(r.status, 408);
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(closed_by_peer(&mut slow));

    let mut idle = connect_from("127.0.0.2", gw.http);
    assert_eq!(roundtrip(&mut idle, &post_mcp(TOOLS_LIST)).status, 200);
    let t = Instant::now();
    assert!(
        closed_by_peer(&mut idle),
        "idle keep-alive connection closed"
    );
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

#[test]
fn slow_request_gets_408_and_idle_keep_alive_is_closed() {
    let gw = start("read_timeout: 0.3\nidle_timeout: 0.5");
    assert_slow_gets_408_and_idle_is_closed(&gw);

    // A connection that never sends anything is closed after read_timeout.
    let mut silent = connect_from("127.0.0.2", gw.http);
    let mut b = [0u8; 1];
    assert_eq!(silent.read(&mut b).unwrap_or(0), 0);
    gw.wait_metric(
        "mcp_gateway_protocol_errors_total{frontend=\"http\",kind=\"timeout\"}",
        1.0,
    );
    gw.wait_all_closed();
}

#[test]
fn sighup_changes_the_timeouts_of_the_waits_that_start_after_it() {
    let gw = start("read_timeout: 60\nidle_timeout: 60");
    let mut before = connect_from("127.0.0.3", gw.http);
    assert_eq!(roundtrip(&mut before, &post_mcp(TOOLS_LIST)).status, 200);
    // Its wait for the next request has begun (with the 60 s idle timeout) once it is parked:
    // the client has its answer before the gateway's task gets there.
    gw.wait_metric("mcp_gateway_connections_parked", 1.0);
    gw.reload(
        "read_timeout: 60\n  idle_timeout: 60",
        "read_timeout: 0.3\n  idle_timeout: 0.5",
    );
    assert!(gw.log.lock().unwrap().contains("timeouts changed"));
    assert_slow_gets_408_and_idle_is_closed(&gw);
    // The connection that was waiting before the reload kept its deadline (60 s): it is still
    // served, and its next wait has the new idle timeout.
    assert_eq!(roundtrip(&mut before, &post_mcp(TOOLS_LIST)).status, 200);
    let t = Instant::now();
    assert!(closed_by_peer(&mut before));
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    gw.wait_all_closed();
}

/// SIGHUP replaces `max_message_size` (for bodies that start after it), `allowed_origins` (for
/// requests read after it) and `proxy_protocol_networks` (for connections accepted after it).
#[test]
fn sighup_replaces_the_message_size_the_origins_and_the_proxy_networks() {
    let gw = start("max_message_size: 1048576\nallowed_origins: []\nproxy_protocol_networks: []");
    let padded = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{{"pad":"{}"}}}}"#,
        "x".repeat(2000)
    );
    let status = |from: &str, raw: &[u8]| {
        let mut c = connect_from(from, gw.http);
        c.write_all(raw).unwrap();
        read_response(&mut c, &mut Vec::new()).map(|r| r.status)
    };
    let proxied = [
        &b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 8080\r\n"[..],
        post_mcp(TOOLS_LIST).as_bytes(),
    ]
    .concat();
    let page = from_page("https://app.example.com", false);
    assert_eq!(status("127.0.0.3", post_mcp(&padded).as_bytes()), Some(200));
    assert_eq!(status("127.0.0.3", page.as_bytes()), Some(403));
    assert_ne!(status("127.0.0.2", &proxied), Some(200), "not trusted yet");

    gw.reload(
        "max_message_size: 1048576\n  allowed_origins: []\n  proxy_protocol_networks: []",
        "max_message_size: 1000\n  allowed_origins: [\"https://app.example.com\"]\n  proxy_protocol_networks: [127.0.0.2/32]",
    );
    let log = gw.log.lock().unwrap().clone();
    for line in [
        "max_message_size changed",
        "allowed origins replaced",
        "PROXY protocol networks replaced",
    ] {
        assert!(log.contains(line), "{line}: {log}");
    }
    assert_eq!(status("127.0.0.3", post_mcp(&padded).as_bytes()), Some(413));
    assert_eq!(
        status("127.0.0.3", post_mcp(TOOLS_LIST).as_bytes()),
        Some(200)
    );
    assert_eq!(status("127.0.0.3", page.as_bytes()), Some(200));
    assert_eq!(status("127.0.0.2", &proxied), Some(200));
    assert_eq!(
        gw.metric("mcp_gateway_proxy_headers_total{frontend=\"http\"}"),
        1.0
    );
    gw.wait_all_closed();
}

#[test]
fn connection_close_is_honoured() {
    let gw = start("");
    let mut s = connect_from("127.0.0.2", gw.http);
    let req = post_mcp(TOOLS_LIST).replace("Host: t\r\n", "Host: t\r\nConnection: close\r\n");
    let r = roundtrip(&mut s, &req);
    assert_eq!((r.status, r.header("connection")), (200, Some("close")));
    assert!(closed_by_peer(&mut s));
    gw.wait_all_closed();
}

/// A request of `origin`'s page: a POST, or (`upgrade`) a WebSocket handshake.
fn from_page(origin: &str, upgrade: bool) -> String {
    let request = if upgrade {
        WS_UPGRADE.to_string()
    } else {
        post_mcp(TOOLS_LIST)
    };
    request.replacen(
        "Host: t\r\n",
        &format!("Host: t\r\nOrigin: {origin}\r\n"),
        1,
    )
}

#[test]
fn pages_of_origins_not_allowed_get_403_and_other_clients_pass() {
    let gw = start("");
    // By default only loopback pages (a local MCP inspector, say) may call: a page of another
    // site whose name was rebound to this address may not, by POST or by WebSocket.
    for upgrade in [false, true] {
        expect_refusal(
            &gw,
            from_page("https://evil.example", upgrade).as_bytes(),
            403,
        );
    }
    let mut c = connect_from("127.0.0.2", gw.http);
    for ok in [
        "http://localhost:6274",
        "http://127.0.0.1:8080",
        "http://[::1]:3000",
    ] {
        assert_eq!(roundtrip(&mut c, &from_page(ok, false)).status, 200, "{ok}");
    }
    assert_eq!(
        roundtrip(&mut c, &post_mcp(TOOLS_LIST)).status,
        200,
        "no Origin: not a browser"
    );
    let r = roundtrip(
        &mut connect_from("127.0.0.2", gw.http),
        &from_page("http://localhost", true),
    );
    assert_eq!(r.status, 101);
    assert_eq!(
        gw.metric("mcp_gateway_protocol_errors_total{frontend=\"http\",kind=\"origin\"}"),
        2.0
    );

    // Listed origins pass too, compared as origins (case, default port); others still do not.
    let gw = start("allowed_origins: [\"https://app.example.com\"]");
    let mut c = connect_from("127.0.0.2", gw.http);
    for ok in ["https://app.example.com", "https://APP.example.com:443"] {
        assert_eq!(roundtrip(&mut c, &from_page(ok, false)).status, 200, "{ok}");
    }
    let r = roundtrip(
        &mut connect_from("127.0.0.2", gw.http),
        &from_page("https://app.example.com", true),
    );
    assert_eq!(r.status, 101);
    for no in [
        "http://app.example.com",
        "https://app.example.com:8443",
        "null",
    ] {
        expect_refusal(&gw, from_page(no, false).as_bytes(), 403);
    }

    // "*": every origin.
    let gw = start("allowed_origins: [\"*\"]");
    let mut c = connect_from("127.0.0.2", gw.http);
    assert_eq!(
        roundtrip(&mut c, &from_page("https://evil.example", false)).status,
        200
    );
}
