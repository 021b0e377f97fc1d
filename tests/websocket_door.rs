//! The WebSocket front door: handshake, messages, ping/pong, fragments, limits, close.

mod common;

use std::io::Write;
use std::net::TcpStream;

use common::*;

fn upgrade(gw: &Gateway) -> TcpStream {
    let mut s = connect_from("127.0.0.2", gw.http);
    let r = roundtrip(&mut s, WS_UPGRADE);
    assert_eq!(r.status, 101);
    assert_eq!(
        r.header("sec-websocket-accept"),
        Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    );
    assert_eq!(r.header("sec-websocket-protocol"), Some("mcp"));
    s
}

#[test]
fn messages_ping_fragments_and_close() {
    let gw = start("");
    let mut s = upgrade(&gw);
    gw.wait_metric(
        "mcp_gateway_frontend_connections_active{frontend=\"websocket\"}",
        1.0,
    );
    assert_eq!(
        gw.metric("mcp_gateway_frontend_connections_active{frontend=\"http\"}"),
        0.0
    );

    s.write_all(&ws_frame(true, 1, TOOLS_LIST.as_bytes()))
        .unwrap();
    let (op, reply) = read_ws_frame(&mut s);
    assert_eq!(op, 1);
    let v: serde_json::Value = serde_json::from_slice(&reply).unwrap();
    assert_eq!(v["result"]["tools"][0]["name"], "echo");

    s.write_all(&ws_frame(true, 9, b"are you there")).unwrap();
    assert_eq!(read_ws_frame(&mut s), (10, b"are you there".to_vec()));

    // A message in three fragments with a ping between them.
    let msg = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"echo","arguments":{"message":"in pieces"}}}"#;
    let (a, rest) = msg.as_bytes().split_at(20);
    let (b, c) = rest.split_at(30);
    let mut bytes = ws_frame(false, 1, a);
    bytes.extend(ws_frame(false, 0, b));
    bytes.extend(ws_frame(true, 9, b"p"));
    bytes.extend(ws_frame(true, 0, c));
    s.write_all(&bytes).unwrap();
    assert_eq!(read_ws_frame(&mut s), (10, b"p".to_vec()));
    let (_, reply) = read_ws_frame(&mut s);
    let v: serde_json::Value = serde_json::from_slice(&reply).unwrap();
    assert_eq!(v["result"]["content"][0]["text"], "in pieces");

    // Notifications get no message back; the close handshake echoes the code.
    s.write_all(&ws_frame(
        true,
        1,
        br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
    ))
    .unwrap();
    s.write_all(&ws_frame(true, 8, &1000u16.to_be_bytes()))
        .unwrap();
    let (op, payload) = read_ws_frame(&mut s);
    assert_eq!((op, &payload[..2]), (8, &1000u16.to_be_bytes()[..]));
    assert!(closed_by_peer(&mut s));
    assert_eq!(
        gw.metric("mcp_gateway_requests_total{frontend=\"websocket\"}"),
        3.0
    );
    gw.wait_all_closed();
}

fn expect_close(s: &mut TcpStream, code: u16) {
    let (op, payload) = read_ws_frame(s);
    assert_eq!(op, 8);
    assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), code);
    assert!(closed_by_peer(s));
}

#[test]
fn protocol_violations_close_with_the_rfc_code() {
    let gw = start("max_message_size: 1024");
    let mut s = upgrade(&gw);
    s.write_all(&ws_frame(true, 1, &vec![b'a'; 2000])).unwrap();
    expect_close(&mut s, 1009);

    let mut s = upgrade(&gw);
    let mut bytes = ws_frame(false, 1, &[b'['; 600]);
    bytes.extend(ws_frame(true, 0, &[b' '; 600]));
    s.write_all(&bytes).unwrap();
    expect_close(&mut s, 1009);

    let mut s = upgrade(&gw);
    s.write_all(&[0x81, 0x02, b'h', b'i']).unwrap(); // unmasked
    expect_close(&mut s, 1002);

    let mut s = upgrade(&gw);
    s.write_all(&ws_frame(true, 1, &[0xff, 0xfe])).unwrap();
    expect_close(&mut s, 1007);

    let mut s = upgrade(&gw);
    s.write_all(&ws_frame(true, 2, b"{}")).unwrap();
    expect_close(&mut s, 1003);

    let mut s = upgrade(&gw);
    s.write_all(&ws_frame(true, 0, b"{}")).unwrap(); // a continuation of nothing
    expect_close(&mut s, 1002);

    // A close frame: an application's code is echoed; one no endpoint may send (1005, 1006 and
    // 1015 only report what happened locally; others are undefined) is a protocol error, and so
    // is a one-byte payload; a reason that is not UTF-8 is 1007.
    for (payload, answer) in [
        (&[0x0f, 0xa0, b'b', b'y', b'e'][..], 4000),
        (&[0x03, 0xed], 1002),       // 1005
        (&[0x03, 0xee], 1002),       // 1006
        (&[0x03, 0xe7], 1002),       // 999
        (&[0x0b, 0xb7], 1002),       // 2999
        (&[0x03], 1002),             // one byte
        (&[0x03, 0xe8, 0xff], 1007), // 1000 with a reason that is not UTF-8
    ] {
        let mut s = upgrade(&gw);
        s.write_all(&ws_frame(true, 8, payload)).unwrap();
        expect_close(&mut s, answer);
    }
    assert_eq!(
        gw.metric("mcp_gateway_protocol_errors_total{frontend=\"websocket\",kind=\"too_large\"}"),
        2.0
    );
    // Every other close above: unmasked, 1007, 1003, the continuation and six close frames.
    assert_eq!(
        gw.metric("mcp_gateway_protocol_errors_total{frontend=\"websocket\",kind=\"malformed\"}"),
        10.0
    );
    gw.wait_all_closed();
}

#[test]
fn bad_handshakes_are_refused() {
    let gw = start("");
    let mut s = connect_from("127.0.0.2", gw.http);
    let r = roundtrip(
        &mut s,
        "GET /mcp HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n",
    );
    assert_eq!(
        (r.status, r.header("sec-websocket-version")),
        (426, Some("13"))
    );
    let mut s = connect_from("127.0.0.2", gw.http);
    let r = roundtrip(
        &mut s,
        "GET /mcp HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n\r\n",
    );
    assert_eq!(r.status, 400);
}

#[test]
fn idle_websocket_is_closed_with_1001() {
    let gw = start("idle_timeout: 0.3");
    let mut s = upgrade(&gw);
    expect_close(&mut s, 1001);
    gw.wait_all_closed();
}
