//! Churn: 100,000 connections opened and closed across both workers from 32 source addresses,
//! on both doors, closed every way a client can (graceful, RST, mid-request, without reading the
//! answer). Afterwards every connection gauge and the tracked-IP count must be exactly zero and
//! every connection must have been counted as accepted exactly once. A second churn goes through
//! the forwarding path on all three doors, clients leaving while their request, body or stream is
//! still with the upstream; it ends with the upstream's in-flight gauge at zero too.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
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

const SSE_HEAD: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";

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
            let _ = s.write_all(SSE_HEAD);
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
            let _ = s.write_all(SSE_HEAD);
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
