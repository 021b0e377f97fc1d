//! Upstreams on a Unix socket of the same host (`http://unix:/path[:/request/path]`) through the
//! real binary: requests and their pooled connections (one the upstream closed replaced), an
//! event stream event by event (parked between two events), a socket nobody listens on (502, the
//! health check taking it out, and back once it listens). (Sessions sticking to one of two are
//! in `forwarding.rs`, beside the same test over TCP.) The upstreams are the scripted mocks of
//! `common::mock` behind a `UnixFront`, which relays a Unix socket's connections to a mock's TCP
//! port.

mod common;

use std::io::Write;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::mock::{self, chunk, json_reply, Mock, UnixFront};
use common::*;

/// The gateway's configuration with `urls` as the `default` namespace's upstreams.
fn upstreams(urls: &[&str], routing: &str) -> String {
    let mut y = format!(
        "routing:\n{routing}service_discovery:\n  static:\n    endpoints:\n      default:\n"
    );
    for u in urls {
        y += &format!("        - url: {u}\n");
    }
    y
}

const ROUTING: &str = "  health_check_interval: 3600\n  request_timeout: 2\n  connect_timeout: 1\n";

fn healthy(url: &str) -> String {
    format!("mcp_gateway_upstream_healthy{{namespace=\"default\",upstream=\"{url}\"}}")
}

#[test]
fn requests_reach_an_upstream_on_a_unix_socket_over_pooled_connections() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let up = {
        let seen = seen.clone();
        Mock::start(move |req, s| {
            seen.lock().unwrap().push((
                req.target.clone(),
                req.header("host").unwrap_or("").to_string(),
            ));
            json_reply(s, req, r#"{"tools":[]}"#, &[]);
        })
    };
    let dir = tempfile::tempdir().unwrap();
    let front = UnixFront::start(&dir.path().join("up.sock"), up.addr);
    let url = front.url("/v1/mcp");
    let gw = start_with("", &upstreams(&[&url], ROUTING));
    let mut c = connect_from("127.0.0.2", gw.http);
    for id in 1..=3 {
        let body = format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/list"}}"#);
        let r = roundtrip(&mut c, &post_mcp(&body));
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["id"], id);
    }
    // The request path the URL names, `Host: localhost`, and one connection for all three.
    assert_eq!(
        *seen.lock().unwrap(),
        vec![("/v1/mcp".to_string(), "localhost".to_string()); 3]
    );
    assert_eq!(up.connections(), 1, "the pooled connection is reused");
    let ok = format!(
        "mcp_gateway_upstream_requests_total{{namespace=\"default\",upstream=\"{url}\",outcome=\"ok\"}}"
    );
    assert_eq!(gw.metric(&ok), 3.0);
    drop(c);
    gw.wait_all_closed();
}

/// An upstream that closes its connection after each answer (as servers do at their keep-alive
/// timeout): the pooled connection is replaced (found closed by the look before reuse, or by
/// the one retry of a request that got no byte back), and no request fails.
#[test]
fn a_pooled_unix_socket_connection_the_upstream_closed_is_replaced() {
    let up = Mock::start(|req, s| {
        json_reply(s, req, "{}", &[]);
        let _ = s.shutdown(std::net::Shutdown::Both);
    });
    let dir = tempfile::tempdir().unwrap();
    let front = UnixFront::start(&dir.path().join("up.sock"), up.addr);
    let url = front.url("/mcp");
    let gw = start_with("", &upstreams(&[&url], ROUTING));
    let mut c = connect_from("127.0.0.2", gw.http);
    for _ in 0..3 {
        assert_eq!(roundtrip(&mut c, &post_mcp(TOOLS_LIST)).status, 200);
        // Longer than a pooled connection is taken without a look at its socket (100 ms).
        std::thread::sleep(Duration::from_millis(150));
    }
    assert_eq!(up.connections(), 3, "a new connection for each");
    let outcome = |o: &str| {
        gw.metric(&format!(
            "mcp_gateway_upstream_requests_total{{namespace=\"default\",upstream=\"{url}\",outcome=\"{o}\"}}"
        ))
    };
    assert_eq!((outcome("ok"), outcome("reset")), (3.0, 0.0));
    drop(c);
    gw.wait_all_closed();
}

#[test]
fn an_event_stream_from_a_unix_socket_upstream_arrives_event_by_event() {
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let go_rx = Mutex::new(go_rx);
    let up = Mock::start(move |req, s| {
        let _ = s.write_all(mock::SSE_HEAD);
        chunk(s, "event: message\ndata: {\"first\":1}\n\n");
        // The second event waits until the client has seen the first.
        let _ = go_rx.lock().unwrap().recv_timeout(Duration::from_secs(10));
        chunk(
            s,
            &format!(
                "event: message\ndata: {{\"second\":{}}}\n\n",
                req.body.len()
            ),
        );
        let _ = s.write_all(b"0\r\n\r\n");
    });
    let dir = tempfile::tempdir().unwrap();
    let front = UnixFront::start(&dir.path().join("up.sock"), up.addr);
    // read_timeout 0.8 s: the sweeper runs every 100 ms, so the stream parks soon.
    let gw = start_with(
        "read_timeout: 0.8",
        &upstreams(&[&front.url("/mcp")], ROUTING),
    );
    let mut c = connect_from("127.0.0.2", gw.http);
    c.write_all(post_mcp(TOOLS_LIST).as_bytes()).unwrap();
    let mut buf = Vec::new();
    read_until(&mut c, &mut buf, "{\"first\":1}");
    assert!(!String::from_utf8_lossy(&buf).contains("second"));
    // Between two events the stream parks, the lot watching the Unix socket for the next.
    gw.wait_metric("mcp_gateway_connections_parked", 1.0);
    go_tx.send(()).unwrap();
    read_until(&mut c, &mut buf, "0\r\n\r\n");
    assert!(String::from_utf8_lossy(&buf).contains("{\"second\":"));
    drop(c);
    gw.wait_all_closed();
}

#[test]
fn a_unix_socket_nobody_listens_on_costs_a_502_and_its_health_check_until_it_listens() {
    let up = Mock::start(|req, s| json_reply(s, req, "{}", &[]));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("later.sock");
    let url = format!("http://unix:{}", path.display());
    // Its first health check is an interval after the start: an hour.
    let routing = "  health_check_interval: 3600\n  request_timeout: 1\n  connect_timeout: 0.5\n  circuit_breaker:\n    failure_threshold: 100\n";
    let gw = start_with("", &upstreams(&[&url], routing));
    let mut c = connect_from("127.0.0.2", gw.http);
    let started = Instant::now();
    let r = roundtrip(&mut c, &post_mcp(TOOLS_LIST));
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["error"]["code"], -32000);
    assert!(started.elapsed() < Duration::from_secs(2));
    let refused = format!(
        "mcp_gateway_upstream_requests_total{{namespace=\"default\",upstream=\"{url}\",outcome=\"connect_error\"}}"
    );
    gw.wait_metric(&refused, 1.0);
    // Checked every 0.2 s from now on: it fails its check, and is taken out (the log line is
    // read from the gateway's output a moment after the gauge changed: waited for too).
    gw.reload("health_check_interval: 3600", "health_check_interval: 0.2");
    gw.wait_metric(&healthy(&url), 0.0);
    gw.wait_log("upstream failed its health check");
    // Once something listens there, the health check puts it back and requests go through.
    let _front = UnixFront::start(&path, up.addr);
    gw.wait_metric(&healthy(&url), 1.0);
    assert_eq!(roundtrip(&mut c, &post_mcp(TOOLS_LIST)).status, 200);
    drop(c);
    gw.wait_all_closed();
}
