//! Churn: 100,000 connections opened and closed across both workers from 32 source addresses,
//! on both doors, closed every way a client can (graceful, RST, mid-request, without reading the
//! answer). Afterwards every connection gauge and the tracked-IP count must be exactly zero and
//! every connection must have been counted as accepted exactly once. A second churn goes through
//! the forwarding path on all three doors, clients leaving while their request, body or stream is
//! still with the upstream; it ends with the upstream's in-flight gauge at zero too. A third
//! keeps WebSocket and MCPB sessions and HTTP event streams parking and coming back while their
//! upstreams' streams send to them, until their clients leave every way: no message lost or out
//! of order, and every count back at zero.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::mock::{self, chunk, json_reply, Mock};
use common::*;
use mcp_gateway::upstream::Outcome;

const CONNECTIONS: usize = 100_000;
const THREADS: usize = 4;
const SOURCES: usize = 32;

fn reset(s: TcpStream) {
    socket2::SockRef::from(&s)
        .set_linger(Some(std::time::Duration::ZERO))
        .unwrap();
    drop(s);
}

#[test]
fn hundred_thousand_connections_leave_every_count_at_zero() {
    let gw = start("");
    let (http, tcp) = (gw.http, gw.tcp.unwrap());
    let request = post_mcp(TOOLS_LIST);
    let health = [b'M', b'C', b'P', b'B', 0, 1, 0, 4, 0, 0, 0, 0];
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let request = request.clone();
            std::thread::spawn(move || {
                let mut tcp_conns = 0usize;
                for i in (t..CONNECTIONS).step_by(THREADS) {
                    let src = format!("127.0.2.{}", 1 + i % SOURCES);
                    match (i / SOURCES) % 6 {
                        // A full exchange, graceful close.
                        0 => {
                            let mut s = connect_from(&src, http);
                            assert_eq!(roundtrip(&mut s, &request).status, 200);
                        }
                        // Connect and reset at once.
                        1 => reset(connect_from(&src, http)),
                        // Half a request head, then reset.
                        2 => {
                            let mut s = connect_from(&src, http);
                            s.write_all(&request.as_bytes()[..20]).unwrap();
                            reset(s);
                        }
                        // A whole head, half the body, then a graceful close.
                        3 => {
                            let mut s = connect_from(&src, http);
                            s.write_all(&request.as_bytes()[..request.len() - 10])
                                .unwrap();
                        }
                        // A full request, closed without reading the answer.
                        4 => {
                            let mut s = connect_from(&src, http);
                            s.write_all(request.as_bytes()).unwrap();
                            reset(s);
                        }
                        // MCPB: a health check, then a reset.
                        _ => {
                            let mut s = connect_from(&src, tcp);
                            s.write_all(&health).unwrap();
                            reset(s);
                            tcp_conns += 1;
                        }
                    }
                }
                tcp_conns
            })
        })
        .collect();
    let tcp_total: usize = threads.into_iter().map(|h| h.join().unwrap()).sum();

    gw.wait_accepted(CONNECTIONS);
    gw.wait_all_closed();
    let text = gw.scrape();
    let accepted_http = sample_value(
        &text,
        "mcp_gateway_frontend_connections_accepted_total{frontend=\"http\"}",
    );
    let accepted_tcp = sample_value(&text, "mcp_gateway_tcp_connections_total");
    assert_eq!(accepted_tcp as usize, tcp_total);
    assert_eq!(
        accepted_http as usize + tcp_total,
        CONNECTIONS,
        "each connection accepted exactly once"
    );
    for worker in 0..2 {
        let s = format!("mcp_gateway_worker_connections_accepted_total{{worker=\"{worker}\"}}");
        assert!(
            sample_value(&text, &s) > 1_000.0,
            "both workers took connections: {s}"
        );
    }
    for reason in ["global", "per_ip", "ip_table_full"] {
        for door in ["http", "tcp"] {
            let s = format!(
                "mcp_gateway_connections_rejected_total{{frontend=\"{door}\",reason=\"{reason}\"}}"
            );
            assert_eq!(sample_value(&text, &s), 0.0, "{s}");
        }
    }
}

/// Connections of the forwarding churn (each one proxied, some to a slow upstream answer).
const FORWARDED: usize = 7_000;

const STREAM: &str = "GET /mcp HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n";

/// Reads from `s` until `needle` has arrived (the test's read timeout bounds the wait).
fn read_until(s: &mut TcpStream, needle: &[u8]) {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    while !got.windows(needle.len()).any(|w| w == needle) {
        match s.read(&mut chunk) {
            Ok(n) if n > 0 => got.extend_from_slice(&chunk[..n]),
            other => panic!(
                "{other:?} before {:?}: {:?}",
                String::from_utf8_lossy(needle),
                String::from_utf8_lossy(&got)
            ),
        }
    }
}

#[test]
fn forwarded_connections_that_leave_midway_leave_every_count_at_zero() {
    let up = Mock::start(|req, s| match (req.method.as_str(), req.body_str()) {
        // The standalone stream: a comment every 10 ms until the gateway closes it.
        ("GET", _) => {
            let _ = s.write_all(mock::SSE_HEAD);
            let until = Instant::now() + Duration::from_secs(5);
            while Instant::now() < until && s.write_all(b"3\r\n:\n\n\r\n").is_ok() {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        ("DELETE", _) => mock::respond(s, 200, &[], ""),
        (_, body) if body.contains("tools/call") => {
            std::thread::sleep(Duration::from_millis(5)); // the client is gone by now
            json_reply(s, req, "{}", &[]);
        }
        (_, body) if body.contains("stream") => {
            let _ = s.write_all(mock::SSE_HEAD);
            chunk(s, "event: message\ndata: {\"first\":1}\n\n");
            std::thread::sleep(Duration::from_millis(5));
            chunk(s, "event: message\ndata: {\"second\":2}\n\n");
            let _ = s.write_all(b"0\r\n\r\n");
        }
        _ => json_reply(s, req, "{\"tools\":[]}", &[]),
    });
    let url = up.url();
    let gw = start_with(
        "",
        &format!(
            "routing:\n  health_check_interval: 3600\n  circuit_breaker:\n    failure_threshold: 1\nservice_discovery:\n  static:\n    endpoints:\n      default:\n        - url: {url}\n"
        ),
    );
    let (http, tcp) = (gw.http, gw.tcp.unwrap());
    let call = r#"{"jsonrpc":"2.0","id":2,"method":"tools/call"}"#;
    let stream = r#"{"jsonrpc":"2.0","id":3,"method":"stream"}"#;
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            std::thread::spawn(move || {
                for i in (t..FORWARDED).step_by(THREADS) {
                    let src = format!("127.0.3.{}", 1 + i % SOURCES);
                    match (i / SOURCES) % 7 {
                        // A whole exchange.
                        0 => {
                            let mut s = connect_from(&src, http);
                            assert_eq!(roundtrip(&mut s, &post_mcp(TOOLS_LIST)).status, 200);
                        }
                        // Gone while the upstream works on the answer.
                        1 => {
                            let mut s = connect_from(&src, http);
                            s.write_all(post_mcp(call).as_bytes()).unwrap();
                            reset(s);
                        }
                        // Gone between two events of a streamed answer.
                        2 => {
                            let mut s = connect_from(&src, http);
                            s.write_all(post_mcp(stream).as_bytes()).unwrap();
                            read_until(&mut s, b"{\"first\":1}");
                            reset(s);
                        }
                        // Gone from an open standalone stream.
                        3 => {
                            let mut s = connect_from(&src, http);
                            s.write_all(b"GET /mcp HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n").unwrap();
                            read_until(&mut s, b":\n\n");
                            reset(s);
                        }
                        // Gone halfway through a body that was already streaming upstream.
                        4 => {
                            let mut s = connect_from(&src, http);
                            s.write_all(b"POST /mcp HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"jsonrpc\":\"2.0\",").unwrap();
                            reset(s);
                        }
                        // A WebSocket message whose answer is still upstream.
                        5 => {
                            let mut s = connect_from(&src, http);
                            assert_eq!(roundtrip(&mut s, WS_UPGRADE).status, 101);
                            s.write_all(&ws_frame(true, 1, call.as_bytes())).unwrap();
                            reset(s);
                        }
                        // The same on the MCPB door.
                        _ => {
                            let mut s = connect_from(&src, tcp);
                            s.write_all(&mcpb_frame(1, call.as_bytes())).unwrap();
                            reset(s);
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }

    gw.wait_accepted(FORWARDED);
    gw.wait_all_closed();
    let in_flight =
        format!("mcp_gateway_upstream_in_flight{{namespace=\"default\",upstream=\"{url}\"}}");
    gw.wait_metric(&in_flight, 0.0);
    // Clients leaving are not the upstream's failures: with failure_threshold 1, a single one
    // counted would have opened its breaker.
    let text = gw.scrape();
    for outcome in Outcome::LABELS.iter().filter(|l| **l != "ok") {
        let s = format!("mcp_gateway_upstream_requests_total{{namespace=\"default\",upstream=\"{url}\",outcome=\"{outcome}\"}}");
        assert_eq!(sample_value(&text, &s), 0.0, "{s}");
    }
    let ok = format!("mcp_gateway_upstream_requests_total{{namespace=\"default\",upstream=\"{url}\",outcome=\"ok\"}}");
    assert!(sample_value(&text, &ok) >= (FORWARDED / 7) as f64, "{ok}");
    // And the gateway still forwards.
    let mut s = connect_from("127.0.0.2", http);
    assert_eq!(roundtrip(&mut s, &post_mcp(TOOLS_LIST)).status, 200);
}

const SESSIONS: usize = 600;

/// A client of the parking churn: a WebSocket or MCPB session, or an HTTP client's event stream.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Ws,
    Mcpb,
    Events,
}

/// The next JSON-RPC message `s` gets: a WebSocket text frame, an MCPB Response, or the data of
/// the next event of an event stream (`buf` keeps what came of the one after).
fn next_message(s: &mut TcpStream, kind: Kind, buf: &mut Vec<u8>) -> serde_json::Value {
    match kind {
        Kind::Ws => {
            let (opcode, payload) = read_ws_frame(s);
            assert_eq!(
                opcode,
                1,
                "a text frame: {:?}",
                String::from_utf8_lossy(&payload)
            );
            serde_json::from_slice(&payload).unwrap()
        }
        Kind::Mcpb => {
            let (kind, m) = read_mcpb(s);
            assert_eq!(kind, 2, "a Response frame: {m}");
            m
        }
        Kind::Events => loop {
            let data = buf.windows(6).position(|w| w == b"data: ");
            if let Some(start) = data {
                if let Some(len) = buf[start..].iter().position(|&b| b == b'\n') {
                    let m = serde_json::from_slice(&buf[start + 6..start + len]).unwrap();
                    buf.drain(..start + len);
                    return m;
                }
            }
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).expect("the next event");
            assert!(
                n > 0,
                "the stream ended: {:?}",
                String::from_utf8_lossy(buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        },
    }
}

#[test]
fn sessions_and_streams_that_park_while_their_upstreams_send_leave_every_count_at_zero() {
    // Each stream (a session's, or an HTTP client's): numbered notifications every 100 ms until
    // the gateway drops it (6 s at most); those that ended are counted.
    let ended = Arc::new(AtomicUsize::new(0));
    let ended_up = ended.clone();
    let up = Mock::start(move |req, s| match req.method.as_str() {
        "GET" => {
            let _ = s.write_all(mock::SSE_HEAD);
            let until = Instant::now() + Duration::from_secs(6);
            let mut n = 0;
            while Instant::now() < until {
                let event = format!("data: {{\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\",\"params\":{{\"n\":{n}}}}}\n\n");
                let framed = format!("{:x}\r\n{event}\r\n", event.len());
                if s.write_all(framed.as_bytes()).is_err() {
                    ended_up.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                n += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        "DELETE" => mock::respond(s, 200, &[], ""),
        _ => json_reply(s, req, "{}", &[("Mcp-Session-Id", "C1")]),
    });
    let url = up.url();
    // A sweeper tick every 50 ms: an idle session or stream parks between most notifications.
    // (read_timeout bounds a new connection's first request too: 400 ms is ample for a client
    // thread between its connect and its write.)
    let gw = start_with(
        "read_timeout: 0.4",
        &format!(
            "routing:\n  health_check_interval: 3600\nservice_discovery:\n  static:\n    endpoints:\n      default:\n        - url: {url}\n"
        ),
    );
    let (http, tcp) = (gw.http, gw.tcp.unwrap());
    let init = r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{}}"#;
    let ping = r#"{"jsonrpc":"2.0","id":7,"method":"ping"}"#;
    let clients: Vec<_> = (0..SESSIONS)
        .map(|i| {
            std::thread::spawn(move || {
                let kind = [Kind::Ws, Kind::Mcpb, Kind::Events][i % 3];
                let src = format!("127.0.4.{}", 1 + i % 16);
                let mut s = connect_from(&src, if kind == Kind::Mcpb { tcp } else { http });
                // A lost wake-up would leave the client waiting for good: 3 s is ample.
                s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                let frame = |m: &str| match kind {
                    Kind::Ws => ws_frame(true, 1, m.as_bytes()),
                    Kind::Mcpb => mcpb_frame(1, m.as_bytes()),
                    Kind::Events => post_mcp(m).into_bytes(),
                };
                let mut buf = Vec::new();
                match kind {
                    Kind::Events => s.write_all(STREAM.as_bytes()).unwrap(),
                    _ => {
                        if kind == Kind::Ws {
                            assert_eq!(roundtrip(&mut s, WS_UPGRADE).status, 101);
                        }
                        s.write_all(&frame(init)).unwrap();
                        assert_eq!(next_message(&mut s, kind, &mut buf)["id"], 0);
                    }
                }
                // Notifications for 0.6-1.4 s, every one in order; a ping in the middle
                // brings some sessions back from the client's side too.
                let until = Instant::now() + Duration::from_millis(600 + (i as u64 * 37) % 800);
                let (mut expect, mut pinged, mut answered) = (0, false, false);
                while Instant::now() < until || (pinged && !answered) {
                    let m = next_message(&mut s, kind, &mut buf);
                    if m["id"] == 7 {
                        answered = true;
                        continue;
                    }
                    assert_eq!(m["params"]["n"], expect, "client {i}: {m}");
                    expect += 1;
                    if expect == 5 && i % 4 == 0 && kind != Kind::Events {
                        s.write_all(&frame(ping)).unwrap();
                        pinged = true;
                    }
                }
                // Leave: a reset, a close, or half a message and a reset.
                match i % 5 {
                    0 | 1 => reset(s),
                    2 | 3 => drop(s),
                    _ => {
                        let half = frame(ping);
                        s.write_all(&half[..half.len() / 2]).unwrap();
                        reset(s);
                    }
                }
                expect
            })
        })
        .collect();
    let received: usize = clients.into_iter().map(|c| c.join().unwrap()).sum();
    gw.wait_all_closed();
    gw.wait_metric("mcp_gateway_connections_parked", 0.0);
    let in_flight =
        format!("mcp_gateway_upstream_in_flight{{namespace=\"default\",upstream=\"{url}\"}}");
    gw.wait_metric(&in_flight, 0.0);
    // They did park, again and again, and came back for every message.
    let parks = gw.metric("mcp_gateway_connection_parks_total");
    eprintln!("{SESSIONS} sessions and streams: {received} notifications, {parks} parks");
    assert!(
        parks >= SESSIONS as f64,
        "{parks} parks for {received} notifications"
    );
    // Every stream was closed upstream when its client left.
    eventually(
        || ended.load(Ordering::Relaxed) >= SESSIONS,
        || {
            format!(
                "{} of {SESSIONS} streams ended",
                ended.load(Ordering::Relaxed)
            )
        },
    );
    assert_eq!(ended.load(Ordering::Relaxed), SESSIONS);
}
