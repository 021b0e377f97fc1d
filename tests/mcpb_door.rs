//! The MCPB framed-TCP front door.

mod common;

use std::io::Write;

use common::*;

#[test]
fn health_version_and_requests() {
    let gw = start("");
    let mut s = connect_from("127.0.0.2", gw.tcp.unwrap());
    s.write_all(&mcpb_frame(4, b"")).unwrap();
    assert_eq!(read_mcpb_raw(&mut s), (4, br#"{"status":"ok"}"#.to_vec()));
    s.write_all(&mcpb_frame(6, br#"{"versions":[1]}"#)).unwrap();
    assert_eq!(read_mcpb_raw(&mut s), (7, br#"{"version":1}"#.to_vec()));

    // Two requests and a notification in one write, the second split across writes.
    let mut bytes = mcpb_frame(1, TOOLS_LIST.as_bytes());
    bytes.extend(mcpb_frame(
        1,
        br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
    ));
    bytes.extend(mcpb_frame(
        1,
        br#"{"jsonrpc":"2.0","id":2,"method":"ping"}"#,
    ));
    let (a, b) = bytes.split_at(bytes.len() - 5);
    s.write_all(a).unwrap();
    s.write_all(b).unwrap();
    let (kind, p) = read_mcpb_raw(&mut s);
    let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
    assert_eq!(
        (kind, v["result"]["tools"][0]["name"].as_str()),
        (2, Some("echo"))
    );
    let (kind, p) = read_mcpb_raw(&mut s);
    let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
    assert_eq!((kind, v["id"].as_i64()), (2, Some(2)));

    // A JSON error stays an answer; the connection stays usable.
    s.write_all(&mcpb_frame(1, b"{oops")).unwrap();
    let (kind, p) = read_mcpb_raw(&mut s);
    let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
    assert_eq!((kind, v["error"]["code"].as_i64()), (2, Some(-32700)));
    gw.wait_metric("mcp_gateway_tcp_connections_active", 1.0);
    assert_eq!(gw.metric("mcp_gateway_tcp_connections_total"), 1.0);
    drop(s);
    gw.wait_all_closed();
}

fn expect_error_then_close(gw: &Gateway, bytes: &[u8], says: &str) {
    let mut s = connect_from("127.0.0.3", gw.tcp.unwrap());
    s.write_all(bytes).unwrap();
    let (kind, p) = read_mcpb_raw(&mut s);
    assert_eq!(kind, 5);
    let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
    assert!(
        v["error"]["message"].as_str().unwrap().contains(says),
        "{v}"
    );
    assert!(closed_by_peer(&mut s));
}

#[test]
fn bad_frames_get_an_error_frame_then_close() {
    let gw = start("max_message_size: 1024");
    expect_error_then_close(&gw, b"GET / HTTP/1.1\r\n\r\n", "magic");
    let mut v2 = mcpb_frame(4, b"");
    v2[5] = 2;
    expect_error_then_close(&gw, &v2, "version");
    expect_error_then_close(&gw, &mcpb_frame(42, b""), "type");
    // Only the header of a too-large frame is sent: the gateway refuses before the payload.
    expect_error_then_close(&gw, &mcpb_frame(1, &[b' '; 2000])[..12], "larger");
    assert_eq!(
        gw.metric("mcp_gateway_protocol_errors_total{frontend=\"tcp\",kind=\"malformed\"}"),
        3.0
    );
    assert_eq!(
        gw.metric("mcp_gateway_protocol_errors_total{frontend=\"tcp\",kind=\"too_large\"}"),
        1.0
    );
    gw.wait_all_closed();
}
