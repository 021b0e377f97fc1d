//! Churn: 100,000 connections opened and closed across both workers from 32 source addresses,
//! on both doors, closed every way a client can (graceful, RST, mid-request, without reading the
//! answer). Afterwards every connection gauge and the tracked-IP count must be exactly zero and
//! every connection must have been counted as accepted exactly once.

mod common;

use std::io::Write;
use std::net::TcpStream;

use common::*;

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
