//! Forwarding to HTTP upstreams through the real binary: streaming, header hygiene, sticky
//! sessions, failures, balancing, health checks and breakers, and the MCPB door's forwarding.
//! The upstreams are scripted mocks (`common::mock`); `mcp_sdk.rs` does the same with real MCP
//! servers and clients.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::mock::{self, chunk, json_reply, respond, Mock, Req};
use common::*;

fn endpoints(namespaces: &[(&str, &[&str])], routing: &str) -> String {
    let mut y = format!("routing:\n{routing}service_discovery:\n  static:\n    endpoints:\n");
    for (ns, urls) in namespaces {
        y += &format!("      {ns}:\n");
        for u in *urls {
            y += &format!("        - url: {u}\n");
        }
    }
    y
}

const ROUTING: &str = "  health_check_interval: 3600\n  request_timeout: 2\n  connect_timeout: 1\n";

#[test]
fn event_stream_reaches_the_client_event_by_event() {
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let go_rx = Mutex::new(go_rx);
    let up = Mock::start(move |req, s| {
        if req.body_str().contains("\"ping\"") {
            json_reply(s, req, "{}", &[]);
            return;
        }
        if req.method == "GET" {
            // A standalone stream: silent longer than request_timeout, then one event.
            let _ = s.write_all(mock::SSE_HEAD);
            std::thread::sleep(Duration::from_millis(2500));
            chunk(s, "event: message\ndata: {\"late\":true}\n\n");
            return;
        }
        let _ = s.write_all(mock::SSE_HEAD);
        chunk(s, "event: message\ndata: {\"first\":1}\n\n");
        // The second event waits until the client has seen the first.
        let _ = go_rx.lock().unwrap().recv_timeout(Duration::from_secs(10));
        chunk(s, "event: message\ndata: {\"second\":2}\n\n");
        let _ = s.write_all(b"0\r\n\r\n");
    });
    let url = up.url();
    let gw = start_with("", &endpoints(&[("default", &[&url])], ROUTING));
    let mut c = connect_from("127.0.0.2", gw.http);
    // A second request pipelined behind the one answered with a stream: it is answered after
    // the stream ends, on the same connection.
    let ping = post_mcp(r#"{"jsonrpc":"2.0","id":5,"method":"ping"}"#);
    c.write_all((post_mcp(TOOLS_LIST) + &ping).as_bytes())
        .unwrap();
    let mut buf = Vec::new();
    read_until(&mut c, &mut buf, "{\"first\":1}");
    // While its stream is open, the request is in flight to its upstream, and not yet counted
    // as answered.
    let in_flight =
        format!("mcp_gateway_upstream_in_flight{{namespace=\"default\",upstream=\"{url}\"}}");
    let answered = "mcp_gateway_requests_total{frontend=\"http\"}";
    assert_eq!(gw.metric(&in_flight), 1.0);
    assert_eq!(gw.metric(answered), 0.0);
    let text = String::from_utf8_lossy(&buf).to_string();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{text}"
    );
    assert!(
        !text.contains("second"),
        "the second event cannot exist yet"
    );
    go_tx.send(()).unwrap();
    read_until(&mut c, &mut buf, "0\r\n\r\n");
    assert!(String::from_utf8_lossy(&buf).contains("{\"second\":2}"));
    let end = String::from_utf8_lossy(&buf).find("0\r\n\r\n").unwrap() + 5;
    let mut after = buf[end..].to_vec();
    let pinged = read_response(&mut c, &mut after).expect("the pipelined request's answer");
    assert_eq!(pinged.status, 200);
    gw.wait_metric(&in_flight, 0.0);
    assert_eq!(gw.metric(answered), 2.0);

    // The connection is still good, and a GET stream outlives request_timeout (2 s).
    buf.clear();
    c.write_all(b"GET /mcp HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n")
        .unwrap();
    read_until(&mut c, &mut buf, "{\"late\":true}");
}

#[test]
fn a_client_that_leaves_ends_its_event_stream_upstream() {
    let (closed_tx, closed_rx) = mpsc::channel::<()>();
    let up = Mock::start(mock::stream_until_closed(closed_tx));
    let gw = start_with("", &endpoints(&[("default", &[&up.url()])], ROUTING));
    let mut c = connect_from("127.0.0.2", gw.http);
    c.write_all(b"GET /mcp HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n")
        .unwrap();
    read_until(&mut c, &mut Vec::new(), ": open");
    drop(c);
    closed_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the upstream connection is closed when the client leaves");
    gw.wait_all_closed();
}

/// The keep-alive race: the upstream drops an idle connection just as a request is sent on it
/// (here: it reads the request and closes without a byte of answer). The gateway sends the same
/// request, whole, on a new connection, and the client never notices.
#[test]
fn a_request_an_upstream_drops_on_a_pooled_connection_is_sent_again_whole() {
    let seen: Arc<Mutex<Vec<(std::net::SocketAddr, String)>>> = Arc::default();
    let log = seen.clone();
    let up = Mock::start(move |req, s| {
        let peer = s.peer_addr().unwrap();
        let mut seen = log.lock().unwrap();
        seen.push((peer, req.body_str().to_string()));
        if seen.iter().filter(|(p, _)| *p == peer).count() == 2 {
            let _ = s.shutdown(std::net::Shutdown::Both);
            return;
        }
        let id = req.body_str().to_string();
        json_reply(s, req, &serde_json::json!({ "got": id }).to_string(), &[]);
    });
    let gw = start_with("", &endpoints(&[("default", &[&up.url()])], ROUTING));
    let mut c = connect_from("127.0.0.2", gw.http);
    for n in 1..=2 {
        let body = format!(r#"{{"jsonrpc":"2.0","id":{n},"method":"tools/list"}}"#);
        let r = roundtrip(&mut c, &post_mcp(&body));
        assert_eq!(
            r.status,
            200,
            "request {n}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.json()["result"]["got"], body);
    }
    let seen = seen.lock().unwrap();
    let bodies: Vec<&str> = seen.iter().map(|(_, b)| b.as_str()).collect();
    assert_eq!(
        bodies.len(),
        3,
        "the dropped request was sent again: {bodies:?}"
    );
    assert_eq!(bodies[1], bodies[2], "whole, as it was");
    assert_ne!(seen[1].0, seen[2].0, "on a new connection");
    let url = up.url();
    let reset = format!("mcp_gateway_upstream_requests_total{{namespace=\"default\",upstream=\"{url}\",outcome=\"reset\"}}");
    assert_eq!(gw.metric(&reset), 0.0);
}

#[test]
fn hop_by_hop_fields_do_not_cross_and_the_rest_does() {
    let seen = Arc::new(Mutex::new(None::<Req>));
    let seen2 = seen.clone();
    let up = Mock::start(move |req, s| {
        *seen2.lock().unwrap() = Some(req.clone());
        respond(
            s,
            200,
            &[
                ("Content-Type", "application/json"),
                ("Connection", "X-Up"),
                ("X-Up", "hop"),
                ("Keep-Alive", "timeout=1"),
                ("X-Kept", "yes"),
            ],
            "{}",
        );
    });
    let gw = start_with("", &endpoints(&[("tools", &[&up.url()])], ROUTING));
    let mut c = connect_from("127.0.0.2", gw.http);
    let body = TOOLS_LIST;
    let req = format!(
        "POST /mcp/tools?x=1 HTTP/1.1\r\nHost: gateway\r\nConnection: keep-alive, X-Secret\r\nX-Secret: s\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nX-End: yes\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    );
    let r = roundtrip(&mut c, &req);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-kept"), Some("yes"));
    assert_eq!(r.header("x-up"), None);
    assert_eq!(r.header("keep-alive"), None);
    let got = seen.lock().unwrap().clone().unwrap();
    let h = got.header_map();
    assert_eq!(got.target, "/mcp?x=1");
    assert_eq!(
        h.get("host").map(String::as_str),
        Some(up.addr.to_string().as_str())
    );
    assert_eq!(h.get("x-end").map(String::as_str), Some("yes"));
    // The client's chunked body is forwarded as it arrives: chunked again, by the gateway.
    assert_eq!(
        h.get("transfer-encoding").map(String::as_str),
        Some("chunked")
    );
    assert!(!h.contains_key("content-length"));
    for hop in ["x-secret", "keep-alive", "te", "connection"] {
        assert!(!h.contains_key(hop), "{hop} crossed: {h:?}");
    }
    assert_eq!(got.body_str(), body, "the chunked body arrives whole");
    // Keep-alive on the client side survived.
    assert_eq!(
        roundtrip(&mut c, &post_mcp(TOOLS_LIST)).status,
        404,
        "/mcp is not configured here"
    );
}

/// A WebSocket client's credentials reach its upstream session: every request the gateway sends
/// for it (`initialize`, later messages, the session's stream, the `DELETE` at the end) carries
/// the upgrade's query and end-to-end fields (`Authorization`, custom ones), as an HTTP
/// client's requests would, but not the upgrade's own fields or those the gateway writes itself.
#[test]
fn a_websocket_upgrades_credentials_go_with_every_request_of_its_session() {
    let (tx, rx) = mpsc::channel::<Req>();
    let tx = Mutex::new(tx);
    let up = Mock::start(move |req, s| {
        let _ = tx.lock().unwrap().send(req.clone());
        match req.method.as_str() {
            "POST" if req.body_str().contains("\"initialize\"") => {
                json_reply(s, req, "{}", &[("Mcp-Session-Id", "SC")])
            }
            "POST" => json_reply(s, req, "{}", &[]),
            "GET" => respond(s, 405, &[], ""), // no session stream
            _ => respond(s, 200, &[], ""),
        }
    });
    let gw = start_with("", &endpoints(&[("default", &[&up.url()])], ROUTING));
    let mut c = connect_from("127.0.0.2", gw.http);
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let upgrade = WS_UPGRADE
        .replacen("GET /mcp ", "GET /mcp?token=t1 ", 1)
        .replacen(
            "\r\n\r\n",
            "\r\nAuthorization: Bearer abc\r\nX-Tenant: acme\r\nAccept-Encoding: gzip\r\nAccept: */*\r\n\r\n",
            1,
        );
    assert_eq!(roundtrip(&mut c, &upgrade).status, 101);
    for message in [INIT, TOOLS_LIST] {
        c.write_all(&ws_frame(true, 1, message.as_bytes())).unwrap();
        assert_eq!(read_ws_frame(&mut c).0, 1);
    }
    // Idle, the session parks (outside any task) with what it carries, and comes back with it.
    gw.wait_metric("mcp_gateway_connections_parked", 1.0);
    c.write_all(&ws_frame(true, 1, TOOLS_LIST.as_bytes()))
        .unwrap();
    assert_eq!(read_ws_frame(&mut c).0, 1);
    // The session's stream is opened once `initialize` is answered; the client leaves after it.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = Vec::new();
    let until = |method: &str, seen: &mut Vec<Req>| {
        while !seen.iter().any(|r: &Req| r.method == method) {
            let left = deadline.saturating_duration_since(Instant::now());
            seen.push(rx.recv_timeout(left).expect(method));
        }
    };
    until("GET", &mut seen);
    drop(c);
    until("DELETE", &mut seen);
    gw.wait_all_closed();
    let methods: Vec<&str> = seen.iter().map(|r| r.method.as_str()).collect();
    assert!(
        methods.contains(&"GET"),
        "the session's stream: {methods:?}"
    );
    assert_eq!(methods.iter().filter(|m| **m == "POST").count(), 3);
    for r in &seen {
        let m = &r.method;
        assert_eq!(r.target, "/mcp?token=t1", "{m}");
        assert_eq!(r.header("authorization"), Some("Bearer abc"), "{m}");
        assert_eq!(r.header("x-tenant"), Some("acme"), "{m}");
        assert_eq!(
            r.header("accept"),
            Some("application/json, text/event-stream"),
            "{m}"
        );
        assert_eq!(
            r.headers.iter().filter(|(k, _)| k == "accept").count(),
            1,
            "{m}"
        );
        for own in [
            "accept-encoding",
            "sec-websocket-key",
            "sec-websocket-protocol",
            "upgrade",
        ] {
            assert_eq!(r.header(own), None, "{own} crossed on {m}");
        }
    }
}

/// OAuth discovery through the gateway (RFC 9728, as MCP's authorization asks): the metadata
/// of `/mcp[/{ns}]` is asked for at `/.well-known/oauth-protected-resource/mcp[/{ns}]` (or at
/// the bare prefix, for `/mcp`), and the gateway asks an upstream of the namespace at that
/// same path (which names the resource as clients see it, whatever the upstream's own path),
/// the answer coming back as it is. Only `GET` goes; a namespace served by `builtin:echo` has
/// none.
#[test]
fn protected_resource_metadata_comes_from_the_namespaces_upstream() {
    let (tx, rx) = mpsc::channel::<String>();
    let tx = Mutex::new(tx);
    let up = Mock::start(move |req, s| {
        let _ = tx
            .lock()
            .unwrap()
            .send(format!("{} {}", req.method, req.target));
        let body = r#"{"resource":"https://gw.example/mcp/tools","authorization_servers":["https://auth.example"]}"#;
        respond(s, 200, &[("Content-Type", "application/json")], body);
    });
    let url = format!("{}/v1/mcp", up.url().trim_end_matches("/mcp"));
    let rest = endpoints(
        &[
            ("tools", &[&url]),
            ("default", &[&url]),
            ("local", &["builtin:echo"]),
        ],
        ROUTING,
    );
    let gw = start_with("", &rest);
    let mut c = connect_from("127.0.0.2", gw.http);
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: gw.example\r\n\r\n");
    let metadata = "/.well-known/oauth-protected-resource";
    for (path, asked) in [
        (
            format!("{metadata}/mcp/tools?x=1"),
            "GET /.well-known/oauth-protected-resource/mcp/tools?x=1",
        ),
        (
            format!("http://gw.example{metadata}/mcp"),
            "GET /.well-known/oauth-protected-resource/mcp",
        ),
        (
            metadata.to_string(),
            "GET /.well-known/oauth-protected-resource",
        ),
    ] {
        let r = roundtrip(&mut c, &get(&path));
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(
            r.json()["authorization_servers"][0],
            "https://auth.example",
            "{path}"
        );
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), asked);
    }
    // Answered by the gateway, the upstream asked nothing.
    let post = format!("POST {metadata}/mcp HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{{}}");
    let r = roundtrip(&mut c, &post);
    assert_eq!((r.status, r.header("allow")), (405, Some("GET")));
    for (path, status) in [
        (format!("{metadata}/mcp/local"), 404),
        (format!("{metadata}/mcp/nope"), 404),
        (format!("{metadata}/elsewhere"), 404),
    ] {
        assert_eq!(roundtrip(&mut c, &get(&path)).status, status, "{path}");
    }
    assert!(
        rx.try_recv().is_err(),
        "the upstream was asked for nothing else"
    );
    drop(c);
    gw.wait_all_closed();
}

/// An upstream that names itself in every reply and issues `sess-{name}` on initialize.
fn named(name: &'static str) -> Arc<mock::Handler> {
    Arc::new(move |req: &Req, s: &mut TcpStream| {
        let session = req.header("mcp-session-id").unwrap_or("").to_string();
        let result = format!(r#"{{"server":"{name}","session":"{session}"}}"#);
        if req.body_str().contains("\"initialize\"") {
            let id = format!("sess-{name}");
            json_reply(s, req, &result, &[("Mcp-Session-Id", &id)]);
        } else if req.method == "DELETE" {
            respond(s, 200, &[], "");
        } else {
            json_reply(s, req, &result, &[]);
        }
    })
}

/// An MCPB connection to `gw`'s TCP door (reads bounded to 10 s).
fn mcpb_client(gw: &Gateway) -> TcpStream {
    let c = TcpStream::connect(gw.tcp.unwrap()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c
}

/// An MCPB connection whose `initialize` was answered with a Response frame.
fn mcpb_initialized(gw: &Gateway) -> TcpStream {
    let mut c = mcpb_client(gw);
    c.write_all(&mcpb_frame(1, INIT.as_bytes())).unwrap();
    assert_eq!(read_mcpb(&mut c).0, 2);
    c
}

#[test]
fn sessions_stick_to_their_upstream_and_a_gone_one_gives_404() {
    let a = Mock::start_on("127.0.0.1:0", named("a"));
    let b = Mock::start_on("127.0.0.1:0", named("b"));
    let urls = [a.url(), b.url()];
    sessions_stick(&urls, move || drop(a));
    drop(b);
}

/// The same with both upstreams on Unix sockets (`http://unix:`): upstream a is gone when its
/// socket is.
#[test]
fn sessions_stick_to_their_unix_socket_upstream_and_a_gone_one_gives_404() {
    let a = Mock::start_on("127.0.0.1:0", named("a"));
    let b = Mock::start_on("127.0.0.1:0", named("b"));
    let dir = tempfile::tempdir().unwrap();
    let front_a = mock::UnixFront::start(&dir.path().join("a.sock"), a.addr);
    let front_b = mock::UnixFront::start(&dir.path().join("b.sock"), b.addr);
    let urls = [front_a.url("/mcp"), front_b.url("/mcp")];
    sessions_stick(&urls, move || drop(front_a));
    drop((front_b, a, b));
}

/// Sessions opened through a gateway on upstreams `urls` (answering as [`named`] `a` and `b`)
/// stay on theirs, on any connection; once `gone` takes `a` away, its sessions get 404.
fn sessions_stick(urls: &[String; 2], gone: impl FnOnce()) {
    let gw = start_with(
        "",
        &endpoints(&[("default", &[&urls[0], &urls[1]])], ROUTING),
    );
    let mut sessions = Vec::new();
    for i in 0..6 {
        let mut c = connect_from(&format!("127.0.0.{}", 2 + i), gw.http);
        let r = roundtrip(&mut c, &post_mcp(INIT));
        assert_eq!(r.status, 200);
        let id = r
            .header("mcp-session-id")
            .expect("a session id")
            .to_string();
        let server = r.json()["result"]["server"].as_str().unwrap().to_string();
        assert!(
            id.ends_with(&format!("sess-{server}")) && id.len() > "sess-a".len(),
            "{id}"
        );
        sessions.push((id, server));
    }
    let servers: std::collections::HashSet<_> = sessions.iter().map(|s| s.1.clone()).collect();
    assert_eq!(servers.len(), 2, "new sessions spread over both upstreams");
    // Every request of a session, on new connections (so on either worker), reaches its upstream
    // with the upstream's own id.
    for (id, server) in &sessions {
        for i in 0..4 {
            let mut c = connect_from(&format!("127.0.1.{}", 2 + i), gw.http);
            let req = in_session(&post_mcp(TOOLS_LIST), id);
            let r = roundtrip(&mut c, &req);
            assert_eq!(r.json()["result"]["server"], server.as_str());
            assert_eq!(r.json()["result"]["session"], format!("sess-{server}"));
        }
    }
    let mut c = connect_from("127.0.0.2", gw.http);
    let unknown = in_session(&post_mcp(TOOLS_LIST), "00000000sess-a");
    assert_eq!(roundtrip(&mut c, &unknown).status, 404);
    // Upstream a goes away: its sessions get 404 (start a new session); b's carry on.
    gone();
    for (id, server) in &sessions {
        let req = in_session(&post_mcp(TOOLS_LIST), id);
        let mut c = connect_from("127.0.0.3", gw.http);
        let r = roundtrip(&mut c, &req);
        if server == "a" {
            assert_eq!(r.status, 404, "{:?}", String::from_utf8_lossy(&r.body));
            assert_eq!(r.json()["error"]["code"], -32000);
        } else {
            assert_eq!(r.status, 200);
        }
    }
}

#[test]
fn a_request_an_upstream_cannot_take_goes_to_another() {
    // `refused` refuses connections; `full` accepts none in time (its accept queue, of one, is
    // filled by the test: the kernel drops further connection attempts); `a` answers. Neither
    // health checks nor the breaker take the first two out here, so every request without a
    // session is offered to them in turn.
    let (_refusing, port) = refusing_port();
    let refused = format!("http://127.0.0.1:{port}/mcp");
    let full = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    full.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    full.listen(0).unwrap();
    let full_addr = full.local_addr().unwrap().as_socket().unwrap();
    let _filling = TcpStream::connect(full_addr).unwrap();
    let full_url = format!("http://{full_addr}/mcp");
    let a = Mock::start_on("127.0.0.1:0", named("a"));
    let routing = "  health_check_interval: 3600\n  request_timeout: 2\n  connect_timeout: 0.3\n  circuit_breaker:\n    failure_threshold: 1000\n";
    let gw = start_with(
        "",
        &endpoints(
            &[
                ("default", &[&refused, &full_url, &a.url()]),
                ("down", &[&refused, &full_url]),
            ],
            routing,
        ),
    );
    let failures = |ns: &str, url: &str, outcome: &str| {
        gw.metric(&format!(
            "mcp_gateway_upstream_requests_total{{namespace=\"{ns}\",upstream=\"{url}\",outcome=\"{outcome}\"}}"
        ))
    };
    // HTTP: every request without a session is answered, by a.
    let mut c = connect_from("127.0.0.2", gw.http);
    for _ in 0..6 {
        let r = roundtrip(&mut c, &post_mcp(INIT));
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["result"]["server"], "a");
    }
    // A body still arriving (chunked: forwarded as it comes) waits for a connection that is made.
    let chunked = format!(
        "POST /mcp HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{INIT}\r\n0\r\n\r\n",
        INIT.len()
    );
    for _ in 0..6 {
        let r = roundtrip(&mut c, &chunked);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["result"]["server"], "a");
    }
    // MCPB: each connection's first message (no session yet) too.
    for _ in 0..6 {
        let mut m = mcpb_client(&gw);
        m.write_all(&mcpb_frame(1, INIT.as_bytes())).unwrap();
        let (kind, reply) = read_mcpb(&mut m);
        assert_eq!(
            (kind, reply["result"]["server"].as_str()),
            (2, Some("a")),
            "{reply}"
        );
    }
    // Both were offered requests, and their failures counted.
    let (refusals, timeouts) = (
        failures("default", &refused, "connect_error"),
        failures("default", &full_url, "timeout"),
    );
    assert!(refusals >= 1.0 && timeouts >= 1.0, "{}", gw.scrape());
    // Where no upstream can take it: each is tried once, then the client gets the last failure.
    let r = roundtrip(
        &mut c,
        &post_mcp(TOOLS_LIST).replacen("/mcp", "/mcp/down", 1),
    );
    let message = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(
        (r.status == 502 && message.contains("refused"))
            || (r.status == 504 && message.contains("connected in time")),
        "{} {message}",
        r.status
    );
    assert_eq!(
        (
            failures("down", &refused, "connect_error"),
            failures("down", &full_url, "timeout")
        ),
        (1.0, 1.0)
    );
    // Every request moved on left nothing counted in flight behind it.
    for (ns, url) in [
        ("default", &refused),
        ("default", &full_url),
        ("default", &a.url()),
        ("down", &refused),
        ("down", &full_url),
    ] {
        gw.wait_metric(
            &format!("mcp_gateway_upstream_in_flight{{namespace=\"{ns}\",upstream=\"{url}\"}}"),
            0.0,
        );
    }
}

#[test]
fn upstream_failures_are_502_or_504_never_a_hang() {
    let (_refusing, port) = refusing_port();
    let refused = format!("http://127.0.0.1:{port}/mcp");
    let stalled = Mock::start(|_, _| std::thread::sleep(Duration::from_secs(20)));
    let reset = Mock::start(|_, s| {
        let _ = s.shutdown(std::net::Shutdown::Both);
    });
    let bad = Mock::start(|_, s| {
        let _ = s.write_all(b"NOT HTTP AT ALL\r\n\r\n");
    });
    let routing = "  health_check_interval: 3600\n  request_timeout: 0.5\n  connect_timeout: 0.5\n  circuit_breaker:\n    failure_threshold: 100\n";
    let gw = start_with(
        "",
        &endpoints(
            &[
                ("refused", &[&refused]),
                ("stalled", &[&stalled.url()]),
                ("reset", &[&reset.url()]),
                ("bad", &[&bad.url()]),
            ],
            routing,
        ),
    );
    let mut c = connect_from("127.0.0.2", gw.http);
    for (ns, status) in [
        ("refused", 502),
        ("stalled", 504),
        ("reset", 502),
        ("bad", 502),
    ] {
        let started = Instant::now();
        let req = post_mcp(TOOLS_LIST).replacen("/mcp", &format!("/mcp/{ns}"), 1);
        let r = roundtrip(&mut c, &req);
        assert_eq!(r.status, status, "{ns}");
        assert_eq!(r.json()["error"]["code"], -32000, "{ns}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{ns} took {:?}",
            started.elapsed()
        );
    }
    for (ns, url, outcome) in [
        ("refused", refused.as_str(), "connect_error"),
        ("stalled", &stalled.url(), "timeout"),
        ("reset", &reset.url(), "reset"),
        ("bad", &bad.url(), "bad_response"),
    ] {
        let sample = format!("mcp_gateway_upstream_requests_total{{namespace=\"{ns}\",upstream=\"{url}\",outcome=\"{outcome}\"}}");
        assert_eq!(gw.metric(&sample), 1.0, "{sample}");
    }
    drop(c);
    gw.wait_all_closed();
}

#[test]
fn breaker_fails_fast_while_open_and_closes_after_a_good_probe() {
    let failing = Arc::new(AtomicBool::new(true));
    let f = failing.clone();
    let up = Mock::start(move |req, s| {
        if f.load(Ordering::SeqCst) {
            respond(s, 503, &[("Content-Type", "application/json")], "{}");
        } else {
            json_reply(s, req, "{}", &[]);
        }
    });
    let routing = "  health_check_interval: 3600\n  circuit_breaker:\n    failure_threshold: 2\n    success_threshold: 1\n    timeout_seconds: 0.5\n";
    let gw = start_with("", &endpoints(&[("default", &[&up.url()])], routing));
    let state = format!(
        "mcp_gateway_upstream_circuit_state{{namespace=\"default\",upstream=\"{}\"}}",
        up.url()
    );
    let mut c = connect_from("127.0.0.2", gw.http);
    for _ in 0..2 {
        assert_eq!(
            roundtrip(&mut c, &post_mcp(TOOLS_LIST)).status,
            503,
            "the upstream's own answer"
        );
    }
    assert_eq!(
        gw.metric(&state),
        1.0,
        "open after failure_threshold failures"
    );
    let before = up.requests.load(Ordering::SeqCst);
    let r = roundtrip(&mut c, &post_mcp(TOOLS_LIST));
    assert_eq!(r.status, 502);
    assert_eq!(
        up.requests.load(Ordering::SeqCst),
        before,
        "failed fast: nothing was sent"
    );
    failing.store(false, Ordering::SeqCst);
    // After timeout_seconds the breaker lets a probe through; it succeeds and closes it.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = roundtrip(&mut c, &post_mcp(TOOLS_LIST));
        if r.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "never recovered");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(gw.metric(&state), 0.0);
}

#[test]
fn an_upstream_that_never_answers_delays_no_other_upstreams_health_check() {
    // `stalled` accepts connections and reads nothing, answers nothing: each probe of it waits
    // out its timeout (5 s: request_timeout, at most 5). It comes first in the namespace.
    let stalled = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let stalled_url = format!("http://{}/mcp", stalled.local_addr().unwrap());
    let (accepted_tx, accepted) = mpsc::channel();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in stalled.incoming() {
            held.push(c);
            let _ = accepted_tx.send(());
        }
    });
    let b = Mock::start_on("127.0.0.1:0", named("b"));
    let b_url = b.url();
    let routing = "  health_check_interval: 0.5
  request_timeout: 10
  connect_timeout: 1
";
    let gw = start_with(
        "",
        &endpoints(&[("default", &[&stalled_url, &b_url])], routing),
    );
    let healthy = |url: &str| {
        gw.metric(&format!(
            "mcp_gateway_upstream_healthy{{namespace=\"default\",upstream=\"{url}\"}}"
        ))
    };
    // The first probe of `stalled` is under way (and will be for 5 s); `b` goes down now.
    accepted
        .recv_timeout(Duration::from_secs(5))
        .expect("stalled is probed");
    drop(b);
    let down = Instant::now();
    while healthy(&b_url) != 0.0 {
        assert!(
            down.elapsed() < Duration::from_secs(4),
            "b's failure waited for stalled's probe"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(healthy(&stalled_url), 1.0, "stalled's probe still waits");
    gw.wait_log(&format!(
        "taken out namespace=default upstream={b_url} reason="
    ));
    // Then stalled's own probe times out and takes it out too.
    gw.wait_metric(
        &format!(
            "mcp_gateway_upstream_healthy{{namespace=\"default\",upstream=\"{stalled_url}\"}}"
        ),
        0.0,
    );
    gw.wait_log(&format!(
        "taken out namespace=default upstream={stalled_url} reason=no answer"
    ));
}

#[test]
fn health_probes_run_side_by_side_up_to_their_bound() {
    // 70 upstreams whose listeners never accept: each probe connects (the kernel completes the
    // handshake into the backlog), sends, and waits out its 5 s for an answer.
    let silent: Vec<std::net::TcpListener> = (0..70)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let urls: Vec<String> = silent
        .iter()
        .map(|l| format!("http://{}/mcp", l.local_addr().unwrap()))
        .collect();
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let routing = "  health_check_interval: 0.2\n  request_timeout: 10\n  connect_timeout: 1\n";
    let gw = start_with("", &endpoints(&[("default", &urls)], routing));
    let probes = || {
        std::fs::read_dir(format!("/proc/{}/task", gw.pid()))
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|name| name.starts_with("mcp-health-pro"))
            .count()
    };
    // All at once, not one after another: 64 of them, the bound, within a second or so.
    let start = Instant::now();
    while probes() < 64 {
        assert!(
            start.elapsed() < Duration::from_secs(4),
            "{} probes at once",
            probes()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Never more, while they wait out their timeouts.
    while start.elapsed() < Duration::from_secs(3) {
        assert_eq!(probes(), 64);
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(silent);
}

/// `n` upstreams of the default namespace, health-checked every `interval` seconds, and the
/// gateway in front of them.
fn probed_upstreams(n: usize, interval: f64) -> (Vec<Mock>, Gateway) {
    let mocks: Vec<Mock> = (0..n)
        .map(|_| Mock::start_on("127.0.0.1:0", named("any")))
        .collect();
    let urls: Vec<String> = mocks.iter().map(Mock::url).collect();
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let routing = format!("  health_check_interval: {interval}\n");
    let gw = start_with("", &endpoints(&[("default", &urls)], &routing));
    (mocks, gw)
}

/// Probe threads are kept for the next probes, not started one per probe: three upstreams
/// probed every 50 ms for 1.5 s (some 90 probes) are probed by at most three threads in all
/// (with a thread per probe, each probe's would be another).
#[test]
fn health_probes_reuse_their_threads() {
    let (mocks, gw) = probed_upstreams(3, 0.05);
    // The ids of every probe thread seen.
    let mut seen = std::collections::BTreeSet::new();
    let mut look = || {
        for t in std::fs::read_dir(format!("/proc/{}/task", gw.pid())).unwrap() {
            let Ok(t) = t else { continue };
            let name = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if name.starts_with("mcp-health-pro") {
                seen.insert(t.file_name().to_string_lossy().into_owned());
            }
        }
    };
    // Each probe is a connection of its own (`Connection: close`).
    let probed = || mocks.iter().map(Mock::connections).sum::<usize>();
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(1500) || probed() < 30 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{} probes",
            probed()
        );
        look();
        std::thread::sleep(Duration::from_millis(2));
    }
    look();
    assert!(
        !seen.is_empty() && seen.len() <= 3,
        "{} probes: {seen:?}",
        probed()
    );
}

/// Upstreams configured together are first probed at points of the interval of their own, not
/// all at one moment (which 500 paths of one server would feel as 500 connections at once).
#[test]
fn health_probes_of_upstreams_that_came_together_spread_over_the_interval() {
    let (mocks, gw) = probed_upstreams(8, 1.0);
    // When each upstream saw its first probe (the gateway sends nothing else).
    let start = Instant::now();
    let mut first: Vec<Option<Duration>> = vec![None; mocks.len()];
    while first.iter().any(Option::is_none) {
        for (m, f) in mocks.iter().zip(&mut first) {
            if f.is_none() && m.connections() > 0 {
                *f = Some(start.elapsed());
            }
        }
        assert!(start.elapsed() < Duration::from_secs(3), "{first:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    let first: Vec<Duration> = first.into_iter().flatten().collect();
    let (early, late) = (first.iter().min().unwrap(), first.iter().max().unwrap());
    assert!(*late - *early >= Duration::from_millis(500), "{first:?}");
    drop(gw);
}

#[test]
fn health_checks_take_an_upstream_out_and_put_it_back_while_others_never_notice() {
    let a = Mock::start_on("127.0.0.1:0", named("a"));
    let b = Mock::start_on("127.0.0.1:0", named("b"));
    let (a_url, b_url, b_addr) = (a.url(), b.url(), b.addr.to_string());
    let routing = "  health_check_interval: 0.1\n  request_timeout: 2\n";
    let gw = start_with("", &endpoints(&[("default", &[&a_url, &b_url])], routing));
    let healthy_b =
        format!("mcp_gateway_upstream_healthy{{namespace=\"default\",upstream=\"{b_url}\"}}");
    // A session on `a`, used throughout by a client thread that must never see an error.
    let session = loop {
        let mut c = connect_from("127.0.0.2", gw.http);
        let r = roundtrip(&mut c, &post_mcp(INIT));
        if r.json()["result"]["server"] == "a" {
            break r.header("mcp-session-id").unwrap().to_string();
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (stop, http, session) = (stop.clone(), gw.http, session.clone());
        std::thread::spawn(move || {
            let mut c = connect_from("127.0.0.5", http);
            let req = in_session(&post_mcp(TOOLS_LIST), &session);
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                let r = roundtrip(&mut c, &req);
                assert_eq!(r.status, 200, "a client of the healthy upstream noticed");
                assert_eq!(r.json()["result"]["server"], "a");
                n += 1;
            }
            n
        })
    };
    drop(b);
    gw.wait_metric(&healthy_b, 0.0);
    // The checks are counted per upstream and result.
    let checks = |url: &str, result: &str| {
        gw.metric(&format!(
            "mcp_gateway_upstream_health_checks_total{{namespace=\"default\",upstream=\"{url}\",result=\"{result}\"}}"
        ))
    };
    assert!(checks(&b_url, "failed") >= 1.0);
    let start = Instant::now();
    while checks(&a_url, "ok") < 1.0 {
        assert!(start.elapsed() < Duration::from_secs(5), "{}", gw.scrape());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(checks(&a_url, "failed"), 0.0);
    let b_passed = checks(&b_url, "ok");
    // Out of service: every new request goes to a, without errors.
    let mut c = connect_from("127.0.0.3", gw.http);
    for _ in 0..10 {
        let r = roundtrip(&mut c, &post_mcp(TOOLS_LIST));
        assert_eq!(
            (r.status, r.json()["result"]["server"].clone()),
            (200, "a".into())
        );
    }
    let b = Mock::start_on(&b_addr, named("b"));
    gw.wait_metric(&healthy_b, 1.0);
    assert!(checks(&b_url, "ok") > b_passed);
    let served: Vec<_> = (0..10)
        .map(|_| roundtrip(&mut c, &post_mcp(TOOLS_LIST)).json()["result"]["server"].clone())
        .collect();
    assert!(
        served.contains(&"b".into()),
        "b takes traffic again: {served:?}"
    );
    stop.store(true, Ordering::SeqCst);
    assert!(traffic.join().unwrap() > 0);
    drop(b);
}

#[test]
fn least_connections_sends_new_requests_to_the_less_busy_upstream() {
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let release_rx = Arc::new(Mutex::new(release_rx));
    let holding = |name: &'static str| -> Arc<mock::Handler> {
        let release_rx = release_rx.clone();
        Arc::new(move |req: &Req, s: &mut TcpStream| {
            if req.body_str().contains("hold") {
                let _ = release_rx
                    .lock()
                    .unwrap()
                    .recv_timeout(Duration::from_secs(10));
            }
            json_reply(s, req, &format!(r#"{{"server":"{name}"}}"#), &[]);
        })
    };
    let a = Mock::start_on("127.0.0.1:0", holding("a"));
    let b = Mock::start_on("127.0.0.1:0", holding("b"));
    let routing =
        "  strategy: least_connections\n  health_check_interval: 3600\n  request_timeout: 15\n";
    // One worker: its balancer sees every request in flight.
    let gw = start_with(
        "workers: 1",
        &endpoints(&[("default", &[&a.url(), &b.url()])], routing),
    );
    let mut held = connect_from("127.0.0.2", gw.http);
    let hold = r#"{"jsonrpc":"2.0","id":9,"method":"hold"}"#;
    held.write_all(post_mcp(hold).as_bytes()).unwrap();
    // Wait until the held request reached an upstream.
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.requests.load(Ordering::SeqCst) + b.requests.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    let busy = if a.requests.load(Ordering::SeqCst) == 1 {
        "a"
    } else {
        "b"
    };
    let mut c = connect_from("127.0.0.3", gw.http);
    for _ in 0..6 {
        let r = roundtrip(&mut c, &post_mcp(TOOLS_LIST));
        assert_ne!(
            r.json()["result"]["server"],
            busy,
            "went to the busy upstream"
        );
    }
    release_tx.send(()).unwrap();
    let r = read_response(&mut held, &mut Vec::new()).unwrap();
    assert_eq!(r.json()["result"]["server"], busy);
    // Its count went down again: both take new requests.
    let served: std::collections::HashSet<String> = (0..4)
        .map(|_| {
            roundtrip(&mut c, &post_mcp(TOOLS_LIST)).json()["result"]["server"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(served.len(), 2, "{served:?}");
}

#[test]
fn weighted_follows_the_weights() {
    let a = Mock::start_on("127.0.0.1:0", named("a"));
    let b = Mock::start_on("127.0.0.1:0", named("b"));
    let mut y = String::from("routing:\n  strategy: weighted\n  health_check_interval: 3600\nservice_discovery:\n  static:\n    endpoints:\n      default:\n");
    y += &format!(
        "        - url: {}\n          weight: 3\n        - url: {}\n          weight: 1\n",
        a.url(),
        b.url()
    );
    let gw = start_with("workers: 1", &y);
    let mut c = connect_from("127.0.0.2", gw.http);
    let to_a = (0..40)
        .filter(|_| roundtrip(&mut c, &post_mcp(TOOLS_LIST)).json()["result"]["server"] == "a")
        .count();
    assert_eq!(to_a, 30);
}

#[test]
fn mcpb_requests_are_forwarded_with_notifications_and_failures_keep_the_connection() {
    let up = Mock::start(|req, s| {
        if req.method != "POST" {
            return respond(s, 405, &[], ""); // no session stream here; DELETE at the end
        }
        if req.body_str().contains("\"initialize\"") {
            json_reply(s, req, "{}", &[("Mcp-Session-Id", "S1")]);
            return;
        }
        assert_eq!(
            req.header("mcp-session-id"),
            Some("S1"),
            "later requests carry the session"
        );
        let id = serde_json::from_slice::<serde_json::Value>(&req.body).unwrap()["id"].clone();
        let _ = s.write_all(mock::SSE_HEAD);
        chunk(s, "event: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{\"progress\":1}}\n\n");
        chunk(s, &format!("event: message\ndata: {{\"jsonrpc\":\"2.0\",\"id\":{id},\"result\":{{\"ok\":true}}}}\n\n"));
        let _ = s.write_all(b"0\r\n\r\n");
    });
    let url = up.url();
    let gw = start_with("", &endpoints(&[("default", &[&url])], ROUTING));
    let mut c = mcpb_initialized(&gw);
    c.write_all(&mcpb_frame(
        1,
        br#"{"jsonrpc":"2.0","id":7,"method":"tools/call"}"#,
    ))
    .unwrap();
    let (k1, n) = read_mcpb(&mut c);
    let (k2, r) = read_mcpb(&mut c);
    assert_eq!((k1, k2), (2, 2));
    assert_eq!(n["method"], "notifications/progress");
    assert_eq!(
        (r["id"].clone(), r["result"]["ok"].clone()),
        (7.into(), true.into())
    );
    drop(up);
    c.write_all(&mcpb_frame(
        1,
        br#"{"jsonrpc":"2.0","id":8,"method":"ping"}"#,
    ))
    .unwrap();
    let (kind, e) = read_mcpb(&mut c);
    assert_eq!(kind, 5, "an upstream failure is an Error frame: {e}");
    assert_eq!(
        (e["id"].clone(), e["error"]["code"].clone()),
        (8.into(), (-32000).into()),
        "{e}"
    );
    c.write_all(&mcpb_frame(4, b"")).unwrap();
    assert_eq!(read_mcpb(&mut c).0, 4, "the connection stays usable");
}

/// A reply to a message door is one message, so it may be no larger than `max_message_size`
/// either: a larger one (a JSON body, or one event of a stream) costs that message an Error frame
/// instead of the gateway holding whatever the upstream sends, and the connection goes on.
#[test]
fn replies_larger_than_max_message_size_become_errors() {
    let big = format!(r#""{}""#, "x".repeat(2000));
    let up = Mock::start(move |req, s| {
        if req.method != "POST" {
            return respond(s, 405, &[], "");
        }
        let body = req.body_str();
        let id = serde_json::from_str::<serde_json::Value>(body).unwrap()["id"].clone();
        let result = if body.contains("big") {
            big.as_str()
        } else {
            "{}"
        };
        let reply = format!(r#"{{"jsonrpc":"2.0","id":{id},"result":{result}}}"#);
        if body.contains("\"stream\"") {
            let _ = s.write_all(mock::SSE_HEAD);
            chunk(s, &format!("event: message\ndata: {reply}\n\n"));
            let _ = s.write_all(b"0\r\n\r\n");
        } else {
            json_reply(s, req, result, &[]);
        }
    });
    let gw = start_with(
        "max_message_size: 1024",
        &endpoints(&[("default", &[&up.url()])], ROUTING),
    );
    let mut c = mcpb_client(&gw);
    for (id, method) in [(1, "big"), (2, "big/stream"), (3, "small")] {
        let m = format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"{method}"}}"#);
        c.write_all(&mcpb_frame(1, m.as_bytes())).unwrap();
        let (kind, reply) = read_mcpb(&mut c);
        assert_eq!(reply["id"], id, "{reply}");
        if method == "small" {
            assert_eq!(kind, 2, "the connection goes on: {reply}");
        } else {
            assert_eq!(kind, 5, "{reply}");
            let why = reply["error"]["message"].as_str().unwrap();
            assert!(why.contains("max_message_size"), "{why}");
        }
    }
}

/// For a mock's session stream: holds the connection open until the gateway drops it, then
/// says so on `gone`.
fn held_until_dropped(s: &mut TcpStream, gone: &Mutex<mpsc::Sender<()>>) {
    let mut b = [0u8; 16];
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    if let Ok(0) = s.read(&mut b) {
        let _ = gone.lock().unwrap().send(());
    }
}

/// An event of the session's own stream larger than `max_message_size` ends that stream (the
/// gateway does not hold it for the client), while the client's connection and its requests go on.
#[test]
fn a_session_stream_event_larger_than_max_message_size_ends_the_stream() {
    let (gone_tx, gone_rx) = mpsc::channel::<()>();
    let gone_tx = Mutex::new(gone_tx);
    let up = Mock::start(move |req, s| {
        if req.method == "GET" {
            let _ = s.write_all(mock::SSE_HEAD);
            let big = format!(
                "data: {{\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\",\"params\":{{\"data\":\"{}\"}}}}\n\n",
                "x".repeat(2000)
            );
            chunk(s, &big);
            held_until_dropped(s, &gone_tx);
        } else if req.method == "DELETE" {
            respond(s, 200, &[], "");
        } else {
            json_reply(s, req, r#"{"n":1}"#, &[("Mcp-Session-Id", "S4")]);
        }
    });
    let gw = start_with(
        "max_message_size: 1024",
        &endpoints(&[("default", &[&up.url()])], ROUTING),
    );
    let mut c = mcpb_initialized(&gw);
    gone_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the session stream is dropped at its oversized event");
    c.write_all(&mcpb_frame(
        1,
        br#"{"jsonrpc":"2.0","id":3,"method":"ping"}"#,
    ))
    .unwrap();
    let (kind, r) = read_mcpb(&mut c);
    assert_eq!(
        (kind, r["id"].clone()),
        (2, 3.into()),
        "the event never came: {r}"
    );
}

#[test]
fn a_closed_mcpb_connection_ends_its_upstream_session() {
    let (deleted_tx, deleted_rx) = mpsc::channel::<String>();
    let deleted_tx = Mutex::new(deleted_tx);
    let up = Mock::start(move |req, s| {
        if req.method == "DELETE" {
            let id = req.header("mcp-session-id").unwrap_or("").to_string();
            let _ = deleted_tx.lock().unwrap().send(id);
            respond(s, 200, &[], "");
        } else {
            json_reply(s, req, "{}", &[("Mcp-Session-Id", "S2")]);
        }
    });
    let gw = start_with("", &endpoints(&[("default", &[&up.url()])], ROUTING));
    let c = mcpb_initialized(&gw);
    drop(c);
    let id = deleted_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("DELETE sent upstream when the client left");
    assert_eq!(id, "S2");
    gw.wait_all_closed();
}

/// An upstream issuing session `id` at `initialize`, answering the session's other messages with
/// `message`, with no session stream (`GET` 405); `DELETE` is answered.
fn session_upstream(
    id: &'static str,
    message: impl Fn(&Req, &mut TcpStream) + Send + Sync + 'static,
) -> Mock {
    Mock::start(move |req, s| {
        if req.body_str().contains("\"initialize\"") {
            json_reply(s, req, "{}", &[("Mcp-Session-Id", id)]);
        } else if req.method == "POST" {
            message(req, s);
        } else {
            respond(s, 405, &[], "");
        }
    })
}

/// A session whose last message had no reply (a notification, answered `202` upstream: every MCP
/// client sends `notifications/initialized`) is idle once it was forwarded: `idle_timeout`
/// closes it, parked or not, as any other idle connection.
#[test]
fn a_session_idle_after_a_notification_is_closed_at_idle_timeout() {
    for park in [true, false] {
        let up = session_upstream("S6", |_, s| respond(s, 202, &[], ""));
        let gw = start_with(
            &format!("idle_timeout: 1\npark_idle_connections: {park}"),
            &endpoints(&[("default", &[&up.url()])], ROUTING),
        );
        let mut c = mcpb_initialized(&gw);
        let note = br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;
        c.write_all(&mcpb_frame(1, note)).unwrap();
        let sent = Instant::now();
        // Nothing comes back for a notification; then the close (reads are bounded to 10 s).
        let mut rest = Vec::new();
        let read = c.read_to_end(&mut rest);
        assert!(
            read.is_ok() && sent.elapsed() < Duration::from_secs(5),
            "closed at idle_timeout (park {park}): {read:?} after {:?}",
            sent.elapsed()
        );
        gw.wait_all_closed();
    }
}

/// A client that leaves while its calls are still being answered stops their forwards: the
/// upstream sees each held request's connection closed at once, not at `request_timeout`.
#[test]
fn a_closed_mcpb_connection_stops_its_forwards_in_flight() {
    let (held_tx, held_rx) = mpsc::channel::<()>();
    let (gone_tx, gone_rx) = mpsc::channel::<()>();
    let (held_tx, gone_tx) = (Mutex::new(held_tx), Mutex::new(gone_tx));
    let up = session_upstream("S5", move |_, s| {
        let _ = held_tx.lock().unwrap().send(());
        held_until_dropped(s, &gone_tx);
    });
    // Held calls would end at request_timeout: far beyond the waits below.
    let routing = "  health_check_interval: 3600\n  request_timeout: 60\n";
    let gw = start_with("", &endpoints(&[("default", &[&up.url()])], routing));
    let mut c = mcpb_initialized(&gw);
    for id in [1, 2] {
        let call = format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call"}}"#);
        c.write_all(&mcpb_frame(1, call.as_bytes())).unwrap();
    }
    for _ in 0..2 {
        held_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("both calls reach the upstream");
    }
    drop(c);
    for _ in 0..2 {
        gone_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("each call's upstream connection closed when the client left");
    }
    gw.wait_all_closed();
}

/// A message goes upstream while the client is still sending the next one: the connection
/// forwards it while it reads the rest of that frame, not only once the frame is whole (within
/// `read_timeout`, 30 s here). Its reply comes once the client's frame is complete.
#[test]
fn an_mcpb_message_is_forwarded_while_the_client_sends_the_next() {
    let (got_tx, got_rx) = mpsc::channel::<()>();
    let got_tx = Mutex::new(got_tx);
    let up = session_upstream("S7", move |req, s| {
        if req.body_str().contains("tools/call") {
            let _ = got_tx.lock().unwrap().send(());
        }
        json_reply(s, req, "{}", &[]);
    });
    let gw = start_with(
        "read_timeout: 30",
        &endpoints(&[("default", &[&up.url()])], ROUTING),
    );
    let mut c = mcpb_initialized(&gw);
    let call = mcpb_frame(1, br#"{"jsonrpc":"2.0","id":1,"method":"tools/call"}"#);
    let ping = mcpb_frame(1, br#"{"jsonrpc":"2.0","id":2,"method":"ping"}"#);
    // The call whole and the next frame's first half, in one write.
    let half = ping.len() / 2;
    c.write_all(&[&call[..], &ping[..half]].concat()).unwrap();
    got_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the call reaches the upstream while the next frame is incomplete");
    c.write_all(&ping[half..]).unwrap();
    let mut ids: Vec<i64> = (0..2)
        .map(|_| read_mcpb(&mut c).1["id"].as_i64().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, [1, 2], "both answered once the frame is whole");
}

#[test]
fn what_the_upstream_sends_on_its_own_reaches_an_mcpb_client_between_messages() {
    let (notify_tx, notify_rx) = mpsc::channel::<()>();
    let notify_rx = Mutex::new(notify_rx);
    let (gone_tx, gone_rx) = mpsc::channel::<()>();
    let gone_tx = Mutex::new(gone_tx);
    let up = Mock::start(move |req, s| {
        if req.method == "GET" {
            assert_eq!(req.header("mcp-session-id"), Some("S3"));
            let _ = s.write_all(mock::SSE_HEAD);
            let _ = notify_rx
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(10));
            chunk(
                s,
                "data: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/tools/list_changed\"}\n\n",
            );
            held_until_dropped(s, &gone_tx);
        } else if req.method == "DELETE" {
            respond(s, 200, &[], "");
        } else {
            json_reply(s, req, r#"{"n":1}"#, &[("Mcp-Session-Id", "S3")]);
        }
    });
    let gw = start_with("", &endpoints(&[("default", &[&up.url()])], ROUTING));
    let mut c = mcpb_initialized(&gw);
    notify_tx.send(()).unwrap();
    let (kind, n) = read_mcpb(&mut c);
    assert_eq!(
        (kind, n["method"].clone()),
        (2, "notifications/tools/list_changed".into())
    );
    c.write_all(&mcpb_frame(
        1,
        br#"{"jsonrpc":"2.0","id":3,"method":"ping"}"#,
    ))
    .unwrap();
    let (kind, r) = read_mcpb(&mut c);
    assert_eq!((kind, r["id"].clone()), (2, 3.into()));
    drop(c);
    gone_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the session stream is closed when the client leaves");
    gw.wait_all_closed();
}

#[test]
fn session_requests_name_the_protocol_version_that_initialize_negotiated() {
    // (method, the request's MCP-Protocol-Version) of every request the upstream gets.
    let (seen_tx, seen_rx) = mpsc::channel::<(String, Option<String>)>();
    let seen_tx = Mutex::new(seen_tx);
    let up = Mock::start(move |req, s| {
        let version = req.header("mcp-protocol-version").map(str::to_string);
        let _ = seen_tx.lock().unwrap().send((req.method.clone(), version));
        match req.method.as_str() {
            "GET" => respond(s, 405, &[], ""),
            "DELETE" => respond(s, 200, &[], ""),
            _ if req.body_str().contains("initialize") => json_reply(
                s,
                req,
                r#"{"protocolVersion":"2025-06-18","capabilities":{}}"#,
                &[("Mcp-Session-Id", "S4")],
            ),
            _ => json_reply(s, req, "{}", &[]),
        }
    });
    let gw = start_with("", &endpoints(&[("default", &[&up.url()])], ROUTING));
    let mut c = mcpb_client(&gw);
    c.write_all(&mcpb_frame(1, INIT.as_bytes())).unwrap();
    let (kind, r) = read_mcpb(&mut c);
    assert_eq!(
        (kind, r["result"]["protocolVersion"].clone()),
        (2, "2025-06-18".into())
    );
    c.write_all(&mcpb_frame(
        1,
        br#"{"jsonrpc":"2.0","id":5,"method":"ping"}"#,
    ))
    .unwrap();
    assert_eq!(read_mcpb(&mut c).0, 2);
    let mut seen = Vec::new();
    let until = |method: &str, seen: &mut Vec<(String, Option<String>)>| {
        while !seen.iter().any(|(m, _)| m == method) {
            seen.push(
                seen_rx
                    .recv_timeout(Duration::from_secs(5))
                    .unwrap_or_else(|_| panic!("no {method} after {seen:?}")),
            );
        }
    };
    // The session's stream is opened in the background once `initialize` is answered: the
    // client stays until it is (leaving earlier would cancel it, rightly).
    until("GET", &mut seen);
    drop(c);
    until("DELETE", &mut seen);
    let v = Some("2025-06-18".to_string());
    assert_eq!(seen[0], ("POST".into(), None), "nothing negotiated yet");
    for method in ["GET", "POST", "DELETE"] {
        let later: Vec<_> = seen[1..].iter().filter(|(m, _)| m == method).collect();
        assert!(!later.is_empty(), "a later {method} in {seen:?}");
        assert!(later.iter().all(|(_, got)| *got == v), "{method}: {seen:?}");
    }
}

#[test]
fn upstreams_learn_the_client_address_from_x_forwarded_for() {
    // Every request's X-Forwarded-For values, joined, as the upstream got them.
    let (seen_tx, seen_rx) = mpsc::channel::<Option<String>>();
    let seen_tx = Mutex::new(seen_tx);
    let up = Mock::start(move |req, s| {
        let xff: Vec<&str> = req
            .headers
            .iter()
            .filter(|(k, _)| k == "x-forwarded-for")
            .map(|(_, v)| v.as_str())
            .collect();
        let _ = seen_tx
            .lock()
            .unwrap()
            .send((!xff.is_empty()).then(|| xff.join(", ")));
        json_reply(s, req, "{}", &[]);
    });
    let next = || seen_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    // A client behind a proxy of its own.
    let with_xff = format!("POST /mcp HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: 10.9.8.7\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{TOOLS_LIST}", TOOLS_LIST.len());
    let gw = start_with("", &endpoints(&[("default", &[&up.url()])], ROUTING));
    for (from, request, want) in [
        ("127.0.0.2", post_mcp(TOOLS_LIST), "127.0.0.2"),
        ("127.0.0.3", with_xff.clone(), "10.9.8.7, 127.0.0.3"),
        ("::1", post_mcp(TOOLS_LIST), "::1"),
    ] {
        let mut c = connect_from(from, gw.http);
        assert_eq!(roundtrip(&mut c, &request).status, 200);
        assert_eq!(next().as_deref(), Some(want), "HTTP from {from}");
    }
    let mut ws = connect_from("127.0.0.4", gw.http);
    assert_eq!(roundtrip(&mut ws, WS_UPGRADE).status, 101);
    ws.write_all(&ws_frame(true, 1, TOOLS_LIST.as_bytes()))
        .unwrap();
    assert_eq!(next().as_deref(), Some("127.0.0.4"), "WebSocket");
    let mut tcp = connect_from("127.0.0.5", gw.tcp.unwrap());
    tcp.write_all(&mcpb_frame(1, TOOLS_LIST.as_bytes()))
        .unwrap();
    assert_eq!(next().as_deref(), Some("127.0.0.5"), "MCPB");

    // Off: nothing added, and what the client sent passes as it is.
    let routing = format!("{ROUTING}  forwarded_for: false\n");
    let gw = start_with("", &endpoints(&[("default", &[&up.url()])], &routing));
    let mut c = connect_from("127.0.0.2", gw.http);
    assert_eq!(roundtrip(&mut c, &post_mcp(TOOLS_LIST)).status, 200);
    assert_eq!(next(), None);
    assert_eq!(roundtrip(&mut c, &with_xff).status, 200);
    assert_eq!(next().as_deref(), Some("10.9.8.7"));
}

#[test]
fn max_in_flight_refuses_beyond_the_limit_with_503_and_frees_places_as_requests_end() {
    // Every tools/call waits until the test lets it go; other requests are answered at once.
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let go_rx = Mutex::new(go_rx);
    let up = Mock::start(move |req, s| {
        if req.body_str().contains("tools/call") {
            let _ = go_rx.lock().unwrap().recv_timeout(Duration::from_secs(10));
        }
        json_reply(s, req, "{}", &[]);
    });
    let url = up.url();
    let routing = format!("{ROUTING}  max_in_flight: 2\n");
    let gw = start_with("", &endpoints(&[("default", &[&url])], &routing));
    let call = post_mcp(r#"{"jsonrpc":"2.0","id":2,"method":"tools/call"}"#);
    let in_flight =
        format!("mcp_gateway_upstream_in_flight{{namespace=\"default\",upstream=\"{url}\"}}");
    // Two calls in flight, from different connections (and so, likely, both workers).
    let mut held: Vec<TcpStream> = ["127.0.0.2", "127.0.0.3"]
        .iter()
        .map(|from| {
            let mut c = connect_from(from, gw.http);
            c.write_all(call.as_bytes()).unwrap();
            c
        })
        .collect();
    gw.wait_metric(&in_flight, 2.0);
    // A third is refused at once, with the connection limits' shape: 503, Retry-After, JSON-RPC.
    let mut third = connect_from("127.0.0.4", gw.http);
    let started = Instant::now();
    let r = roundtrip(&mut third, &post_mcp(TOOLS_LIST));
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!((r.status, r.header("retry-after")), (503, Some("1")));
    assert_eq!(r.json()["error"]["code"], -32000);
    let busy = format!("mcp_gateway_upstream_requests_total{{namespace=\"default\",upstream=\"{url}\",outcome=\"busy\"}}");
    assert_eq!(gw.metric(&busy), 1.0);
    // A standalone GET stream is not capped: every MCP client holds one open all the time.
    let get = "GET /mcp HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n";
    assert_eq!(roundtrip(&mut third, get).status, 200);
    // So is a message on the MCPB door, as a JSON-RPC error with its id; the connection stays.
    let mut m = mcpb_client(&gw);
    m.write_all(&mcpb_frame(
        1,
        br#"{"jsonrpc":"2.0","id":9,"method":"ping"}"#,
    ))
    .unwrap();
    let (kind, e) = read_mcpb(&mut m);
    assert_eq!((kind, e["id"].clone()), (5, 9.into()), "{e}");
    // Places come back as requests end: both held calls are answered, then others get through.
    go_tx.send(()).unwrap();
    go_tx.send(()).unwrap();
    for c in &mut held {
        let mut buf = Vec::new();
        assert_eq!(read_response(c, &mut buf).unwrap().status, 200);
    }
    gw.wait_metric(&in_flight, 0.0);
    assert_eq!(roundtrip(&mut third, &post_mcp(TOOLS_LIST)).status, 200);
    m.write_all(&mcpb_frame(
        1,
        br#"{"jsonrpc":"2.0","id":10,"method":"ping"}"#,
    ))
    .unwrap();
    assert_eq!(read_mcpb(&mut m).0, 2);
}

#[test]
fn request_bodies_stream_to_the_upstream_as_they_arrive() {
    let (got_tx, got_rx) = mpsc::channel::<(String, Option<String>, String)>();
    let got_tx = Mutex::new(got_tx);
    // The upstream reads the head and the first part of the body, reports it, then the rest.
    let up = Mock::start(move |req, s| {
        let _ = got_tx.lock().unwrap().send((
            req.body_str().to_string(),
            req.header("transfer-encoding").map(str::to_string),
            req.header("content-length").unwrap_or("").to_string(),
        ));
        json_reply(s, req, &format!(r#"{{"len":{}}}"#, req.body.len()), &[]);
    });
    let routing = "  health_check_interval: 3600\n  request_timeout: 5\n";
    let gw = start_with(
        "read_timeout: 1\nmax_message_size: 4096",
        &endpoints(&[("default", &[&up.url()])], routing),
    );
    let body = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"ping","params":{{"pad":"{}"}}}}"#,
        "x".repeat(2000)
    );

    // Content-Length, sent in two parts, arrives whole and with its length (that the first part
    // goes out before the second exists is what the next test checks).
    let mut c = connect_from("127.0.0.2", gw.http);
    let head = post_mcp_head(body.len());
    c.write_all(head.as_bytes()).unwrap();
    c.write_all(&body.as_bytes()[..100]).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    c.write_all(&body.as_bytes()[100..]).unwrap();
    let r = read_response(&mut c, &mut Vec::new()).unwrap();
    assert_eq!(r.json()["result"]["len"], body.len(), "{r:?}");
    let (seen, te, cl) = got_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(
        (seen.as_str(), te, cl),
        (body.as_str(), None, body.len().to_string())
    );

    // Chunked, in pieces: forwarded chunked, decoded by the upstream to the same body.
    let mut chunked = String::new();
    for piece in body.as_bytes().chunks(700) {
        chunked += &format!(
            "{:x}\r\n{}\r\n",
            piece.len(),
            std::str::from_utf8(piece).unwrap()
        );
    }
    chunked += "0\r\n\r\n";
    c.write_all(b"POST /mcp HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
    for part in chunked.as_bytes().chunks(900) {
        c.write_all(part).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = read_response(&mut c, &mut Vec::new()).unwrap();
    assert_eq!(
        r.json()["result"]["len"],
        body.len(),
        "the connection stays usable"
    );
    let (seen, te, _) = got_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(
        (seen.as_str(), te.as_deref()),
        (body.as_str(), Some("chunked"))
    );

    drop(c);

    // Over max_message_size while streaming: 413, nothing answered by the upstream.
    let mut c = connect_from("127.0.0.3", gw.http);
    c.write_all(b"POST /mcp HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
    let big = "y".repeat(3000);
    c.write_all(format!("{:x}\r\n{big}\r\n{:x}\r\n{big}\r\n", big.len(), big.len()).as_bytes())
        .unwrap();
    assert_eq!(read_response(&mut c, &mut Vec::new()).unwrap().status, 413);
    drop(c);

    // A body that stops arriving: 408 after read_timeout.
    let mut c = connect_from("127.0.0.4", gw.http);
    c.write_all(head.as_bytes()).unwrap();
    c.write_all(&body.as_bytes()[..10]).unwrap();
    let started = Instant::now();
    assert_eq!(read_response(&mut c, &mut Vec::new()).unwrap().status, 408);
    assert!(started.elapsed() < Duration::from_secs(4));
    drop(c);
    gw.wait_all_closed();
    assert_eq!(
        up.requests.load(Ordering::SeqCst),
        2,
        "the refused bodies never made a whole request upstream"
    );
}

#[test]
fn shutdown_ends_open_event_streams_cleanly_instead_of_waiting_for_them() {
    let up = Mock::start(|_, s| {
        let _ = s.write_all(mock::SSE_HEAD);
        chunk(s, ": open\n\n");
        std::thread::sleep(Duration::from_secs(30)); // a standalone stream with nothing to say
    });
    let mut gw = start_with(
        "shutdown_timeout: 20",
        &endpoints(&[("default", &[&up.url()])], ROUTING),
    );
    let mut c = connect_from("127.0.0.2", gw.http);
    c.write_all(b"GET /mcp HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n")
        .unwrap();
    let mut buf = Vec::new();
    read_until(&mut c, &mut buf, ": open");
    let t = Instant::now();
    unsafe { libc::kill(gw.pid(), libc::SIGTERM) };
    read_until(&mut c, &mut buf, "0\r\n\r\n");
    assert!(closed_by_peer(&mut c), "then the connection closes");
    let status = gw.stop(0, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "exited after {:?}, not at shutdown_timeout",
        t.elapsed()
    );
}

#[test]
fn a_client_answers_a_request_the_server_sends_in_the_middle_of_a_call() {
    // The upstream's tools/call asks the client something (elicitation) on the call's own stream
    // and finishes only once the client's answer has come back in a POST of its own.
    let (answer_tx, answer_rx) = mpsc::channel::<String>();
    let (answer_tx, answer_rx) = (Mutex::new(answer_tx), Mutex::new(answer_rx));
    let up = Mock::start(move |req, s| {
        if req.method != "POST" {
            return respond(s, 405, &[], ""); // no standalone stream; DELETE at the end
        }
        let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
        if body["method"] == "initialize" {
            return json_reply(s, req, "{}", &[("Mcp-Session-Id", "S4")]);
        }
        if body.get("method").is_none() {
            // The client's answer: 202, and tell the waiting call.
            let _ = answer_tx
                .lock()
                .unwrap()
                .send(body["result"]["action"].to_string());
            return respond(s, 202, &[], "");
        }
        let _ = s.write_all(mock::SSE_HEAD);
        chunk(s, "data: {\"jsonrpc\":\"2.0\",\"id\":\"srv-1\",\"method\":\"elicitation/create\",\"params\":{}}\n\n");
        let got = answer_rx
            .lock()
            .unwrap()
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_default();
        let id = body["id"].clone();
        chunk(
            s,
            &format!(
                "data: {{\"jsonrpc\":\"2.0\",\"id\":{id},\"result\":{{\"answer\":{got}}}}}\n\n"
            ),
        );
        let _ = s.write_all(b"0\r\n\r\n");
    });
    let gw = start_with("", &endpoints(&[("default", &[&up.url()])], ROUTING));
    let mut c = mcpb_initialized(&gw);
    c.write_all(&mcpb_frame(
        1,
        br#"{"jsonrpc":"2.0","id":5,"method":"tools/call"}"#,
    ))
    .unwrap();
    let (kind, ask) = read_mcpb(&mut c);
    assert_eq!(
        (kind, ask["method"].clone()),
        (2, "elicitation/create".into())
    );
    // The answer goes out while the call is still open (a Response frame).
    let answer = br#"{"jsonrpc":"2.0","id":"srv-1","result":{"action":"accept"}}"#;
    c.write_all(&mcpb_frame(2, answer)).unwrap();
    let (kind, done) = read_mcpb(&mut c);
    assert_eq!(kind, 2);
    assert_eq!(
        (done["id"].clone(), done["result"]["answer"].clone()),
        (5.into(), "accept".into())
    );
}

/// For a raw upstream: reads from `s` into `got` until it holds a request head and `body_bytes`
/// bytes of body.
fn read_request_until(s: &mut TcpStream, got: &mut Vec<u8>, body_bytes: usize) {
    let mut chunk = [0u8; 4096];
    let body_at = |g: &[u8]| g.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    while body_at(got).is_none_or(|at| got.len() < at + body_bytes) {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "the gateway closed early");
        got.extend_from_slice(&chunk[..n]);
    }
}

/// The body length of the raw-upstream tests of bodies still arriving.
const STREAMED: usize = 2060;

/// For a raw upstream: reads a request with a [`STREAMED`]-byte body from `s`, calling
/// `partial` once it holds the head and the first 100 body bytes (before the client sends the
/// rest, in the tests of bodies still arriving); returns all it read.
fn read_streamed_request(s: &mut TcpStream, partial: impl FnOnce(&[u8])) -> Vec<u8> {
    let mut got = Vec::new();
    read_request_until(s, &mut got, 100);
    partial(&got);
    read_request_until(s, &mut got, STREAMED);
    got
}

/// For a raw upstream: a 200 answer with a JSON `body`.
fn respond_json(s: &mut TcpStream, body: &str) {
    respond(s, 200, &[("Content-Type", "application/json")], body);
}

#[test]
fn a_request_body_reaches_the_upstream_before_it_is_complete() {
    // A raw upstream that reports what it has received once it holds the head and 100 body bytes:
    // a gateway that waited for the whole body would never get there before the client sends the
    // rest, which the client only does after that report.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    let (seen_tx, seen_rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        read_streamed_request(&mut s, |got| {
            let _ = seen_tx.send(String::from_utf8_lossy(got).to_string());
        });
        respond_json(&mut s, r#"{"whole":true}"#);
    });
    let gw = start_with("", &endpoints(&[("default", &[&url])], ROUTING));
    let body = "x".repeat(STREAMED);
    let mut c = connect_from("127.0.0.2", gw.http);
    let head = post_mcp_head(body.len());
    c.write_all(head.as_bytes()).unwrap();
    c.write_all(&body.as_bytes()[..100]).unwrap();
    let seen = seen_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the upstream got the head and the first bytes before the rest was sent");
    assert!(
        seen.contains(&format!("Content-Length: {STREAMED}")),
        "{seen}"
    );
    c.write_all(&body.as_bytes()[100..]).unwrap();
    let r = read_response(&mut c, &mut Vec::new()).unwrap();
    assert_eq!((r.status, r.json()["whole"].clone()), (200, true.into()));
}

/// A browser page's CORS preflight (`OPTIONS`) reaches the upstream, so one that allows the
/// page's origin can say so, and its answer comes back whole; a page of an origin the gateway
/// does not allow gets 403 from the gateway and never reaches the upstream.
#[test]
fn cors_preflights_of_allowed_pages_reach_the_upstream() {
    let preflights = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = preflights.clone();
    let up = Mock::start(move |req, s| {
        if req.method == "OPTIONS" {
            seen.fetch_add(1, Ordering::SeqCst);
            let origin = req.header("origin").unwrap_or("").to_string();
            let asked = req
                .header("access-control-request-headers")
                .unwrap_or("")
                .to_string();
            respond(
                s,
                204,
                &[
                    ("Access-Control-Allow-Origin", &origin),
                    ("Access-Control-Allow-Methods", "GET, POST, DELETE"),
                    ("Access-Control-Allow-Headers", &asked),
                ],
                "",
            );
        } else {
            json_reply(s, req, "{}", &[]);
        }
    });
    let gw = start_with(
        "allowed_origins: [\"https://app.example.com\"]",
        &endpoints(&[("default", &[&up.url()])], ROUTING),
    );
    let preflight = |origin: &str| {
        format!(
            "OPTIONS /mcp HTTP/1.1\r\nHost: t\r\nOrigin: {origin}\r\nAccess-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: content-type, mcp-session-id\r\n\r\n"
        )
    };
    let mut c = connect_from("127.0.0.2", gw.http);
    let r = roundtrip(&mut c, &preflight("https://app.example.com"));
    assert_eq!(r.status, 204);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert_eq!(
        r.header("access-control-allow-headers"),
        Some("content-type, mcp-session-id")
    );
    // The connection goes on.
    assert_eq!(roundtrip(&mut c, &post_mcp(TOOLS_LIST)).status, 200);
    let mut c = connect_from("127.0.0.2", gw.http);
    assert_eq!(
        roundtrip(&mut c, &preflight("https://evil.example")).status,
        403
    );
    assert_eq!(
        preflights.load(Ordering::SeqCst),
        1,
        "only the allowed page's"
    );
}

/// Field values the gateway does not read may carry obs-text (RFC 9110, section 5.5: bytes
/// 0x80-0xFF, such as Latin-1 from older software): they cross both ways byte for byte, where
/// the gateway used to answer the client 400 and the upstream's response 502. A field it reads
/// must still be text.
#[test]
fn fields_with_obs_text_cross_as_they_came() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    let (seen_tx, seen_rx) = mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        read_request_until(&mut s, &mut got, TOOLS_LIST.len());
        let _ = seen_tx.send(got);
        let body = r#"{"jsonrpc":"2.0","id":1,"result":{}}"#;
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nX-Up-Note: na\u{ef}ve\r\n\r\n",
            body.len()
        );
        // The `ï` above is written as one Latin-1 byte, as such software sends it.
        let head: Vec<u8> = head.chars().map(|c| c as u32 as u8).collect();
        s.write_all(&head).unwrap();
        s.write_all(body.as_bytes()).unwrap();
        std::thread::sleep(Duration::from_secs(5)); // holds the connection while the test reads
    });
    let gw = start_with("", &endpoints(&[("default", &[&url])], ROUTING));
    let mut c = connect_from("127.0.0.2", gw.http);
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut req = post_mcp_head(TOOLS_LIST.len()).into_bytes();
    req.truncate(req.len() - 2);
    req.extend_from_slice(b"X-Note: caf\xe9\r\n\r\n");
    req.extend_from_slice(TOOLS_LIST.as_bytes());
    c.write_all(&req).unwrap();
    let seen = seen_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("forwarded, not refused");
    let has = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    assert!(
        has(&seen, b"\r\nX-Note: caf\xe9\r\n"),
        "{}",
        String::from_utf8_lossy(&seen)
    );
    let mut got = Vec::new();
    while !got.ends_with(b"\"result\":{}}") {
        let mut chunk = [0u8; 4096];
        let n = c.read(&mut chunk).unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&chunk[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200 "),
        "{}",
        String::from_utf8_lossy(&got)
    );
    assert!(
        has(&got, b"\r\nX-Up-Note: na\xefve\r\n"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    // A field the door reads is still refused when it is not text.
    let mut c = connect_from("127.0.0.2", gw.http);
    let bad = "POST /mcp HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\u{e9}\r\nContent-Length: 2\r\n\r\n{}";
    let bad: Vec<u8> = bad.chars().map(|c| c as u32 as u8).collect();
    c.write_all(&bad).unwrap();
    assert_eq!(read_response(&mut c, &mut Vec::new()).unwrap().status, 400);
}

/// A pooled connection that waited past `UNCHECKED_IDLE` is looked at before it is reused: one
/// the upstream closed meanwhile is skipped, so even a request whose body is still arriving (which
/// cannot be sent again) reaches the upstream, once, on a new connection.
#[test]
fn a_pooled_connection_the_upstream_closed_while_idle_is_not_reused() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    let (closed_tx, closed_rx) = mpsc::channel::<()>();
    let (partial_tx, partial_rx) = mpsc::channel::<()>();
    let (seen_tx, seen_rx) = mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        // First connection: one request answered keep-alive, then closed by the upstream.
        let (mut a, _) = listener.accept().unwrap();
        a.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        read_request_until(&mut a, &mut Vec::new(), 2);
        respond_json(&mut a, r#"{"n":1}"#);
        drop(a);
        let _ = closed_tx.send(());
        // Every later request: on a new connection.
        while let Ok((mut b, _)) = listener.accept() {
            b.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let got = read_streamed_request(&mut b, |_| {
                let _ = partial_tx.send(());
            });
            let _ = seen_tx.send(got);
            respond_json(&mut b, r#"{"n":2}"#);
        }
    });
    let gw = start_with("", &endpoints(&[("default", &[&url])], ROUTING));
    let mut c = connect_from("127.0.0.2", gw.http);
    let r = roundtrip(&mut c, &post_mcp("{}"));
    assert_eq!((r.status, r.json()["n"].clone()), (200, 1.into()));
    closed_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    // Past the window (the connection went back to the pool as the answer went out).
    std::thread::sleep(mcp_gateway::upstream::client::UNCHECKED_IDLE * 5);
    let body = "x".repeat(STREAMED);
    let head = post_mcp_head(body.len());
    c.write_all(head.as_bytes()).unwrap();
    c.write_all(&body.as_bytes()[..100]).unwrap();
    // The rest only once the upstream holds the start: a body that cannot be sent again.
    partial_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the request reached the upstream on a new connection");
    c.write_all(&body.as_bytes()[100..]).unwrap();
    let r = read_response(&mut c, &mut Vec::new()).unwrap();
    assert_eq!(
        (r.status, r.json()["n"].clone()),
        (200, 2.into()),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let seen = seen_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(
        seen.ends_with(body.as_bytes()),
        "the whole body, on the new connection"
    );
    assert!(seen_rx.try_recv().is_err(), "sent once");
}

/// `server.max_requests_per_ip` in front of an HTTP upstream: a refused request never reaches it,
/// its body is read and discarded so the next request on the connection is understood, and the
/// upstream sees exactly the admitted ones.
#[test]
fn requests_over_the_rate_never_reach_the_upstream() {
    let up = Mock::start(|req, s| json_reply(s, req, "{}", &[]));
    let gw = start_with(
        "max_requests_per_ip: 1\n  request_burst_per_ip: 2",
        &endpoints(&[("default", &[&up.url()])], ROUTING),
    );
    let started = Instant::now();
    let mut c = connect_from("127.0.0.2", gw.http);
    let statuses: Vec<u16> = (0..6)
        .map(|_| roundtrip(&mut c, &post_mcp(TOOLS_LIST)).status)
        .collect();
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(
        admitted + statuses.iter().filter(|s| **s == 429).count(),
        6,
        "{statuses:?}"
    );
    let allowed = 2 + started.elapsed().as_secs_f64().ceil() as usize;
    assert!((2..=allowed).contains(&admitted), "{statuses:?}");
    assert_eq!(up.requests.load(Ordering::SeqCst), admitted);
    assert_eq!(
        gw.metric("mcp_gateway_requests_rate_limited_total{frontend=\"http\"}"),
        (6 - admitted) as f64
    );
}

/// The fields of the access log's lines of `kind` (`request`, `message`), in order, as
/// `key=value` maps.
fn access_lines(log: &str, kind: &str) -> Vec<std::collections::HashMap<String, String>> {
    let marker = format!(" access: {kind} ");
    log.lines()
        .filter(|l| l.contains(&marker))
        .map(|l| {
            l.split(&marker)
                .nth(1)
                .unwrap()
                .split(' ')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

#[test]
fn the_access_log_names_each_request_its_answer_and_upstream_and_turns_off_on_reload() {
    let up = Mock::start(|req, s| json_reply(s, req, "{}", &[]));
    let url = up.url();
    let rest = format!(
        "{}      local:\n        - url: builtin:echo\n",
        endpoints(&[("default", &[&url])], ROUTING)
    );
    let gw = start_with("access_log: true\nmax_message_size: 1024", &rest);
    let mut c = connect_from("127.0.0.2", gw.http);
    // Proxied, with a query (which the line leaves out), then builtin, an unknown namespace,
    // and a body over max_message_size (refused by the gateway).
    let proxied = post_mcp(TOOLS_LIST).replacen("POST /mcp ", "POST /mcp?token=secret ", 1);
    assert_eq!(roundtrip(&mut c, &proxied).status, 200);
    let local = post_mcp(TOOLS_LIST).replacen("POST /mcp ", "POST /mcp/local ", 1);
    assert_eq!(roundtrip(&mut c, &local).status, 200);
    let unknown = post_mcp(TOOLS_LIST).replacen("POST /mcp ", "POST /mcp/nope ", 1);
    assert_eq!(roundtrip(&mut c, &unknown).status, 404);
    let big = post_mcp(&format!(r#"{{"x":"{}"}}"#, "a".repeat(2000)));
    assert_eq!(roundtrip(&mut c, &big).status, 413);
    // Refused for its fields (no Host): a line too; garbage gets none.
    let mut c = connect_from("127.0.0.2", gw.http);
    let no_host = "POST /mcp/x HTTP/1.1\r\nContent-Length: 0\r\n\r\n";
    assert_eq!(roundtrip(&mut c, no_host).status, 400);
    let mut c = connect_from("127.0.0.2", gw.http);
    assert_eq!(roundtrip(&mut c, "not http at all\r\n\r\n").status, 400);
    gw.wait_log("path=/mcp/x");
    let lines = access_lines(&gw.log.lock().unwrap(), "request");
    let seen: Vec<(&str, &str, &str, &str)> = lines
        .iter()
        .map(|l| {
            (
                l["client"].as_str(),
                l["path"].as_str(),
                l["status"].as_str(),
                l["upstream"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("127.0.0.2", "/mcp", "200", url.as_str()),
            ("127.0.0.2", "/mcp/local", "200", "builtin:echo"),
            ("127.0.0.2", "/mcp/nope", "404", "-"),
            ("127.0.0.2", "/mcp", "413", "-"),
            ("127.0.0.2", "/mcp/x", "400", "-"),
        ],
        "{}",
        gw.log.lock().unwrap()
    );
    assert!(lines.iter().all(|l| l["method"] == "POST"));
    assert!(lines.iter().all(|l| l["ms"].parse::<f64>().unwrap() >= 0.0));
    assert!(!gw.log.lock().unwrap().contains("secret"));
    // WebSocket and MCPB messages: one line each, forwarded or answered by builtin:echo.
    let mut ws = connect_from("127.0.0.4", gw.http);
    assert_eq!(roundtrip(&mut ws, WS_UPGRADE).status, 101);
    ws.write_all(&ws_frame(true, 1, TOOLS_LIST.as_bytes()))
        .unwrap();
    assert_eq!(read_ws_frame(&mut ws).0, 1);
    let mut local_ws = connect_from("127.0.0.4", gw.http);
    let upgrade = WS_UPGRADE.replacen("GET /mcp ", "GET /mcp/local ", 1);
    assert_eq!(roundtrip(&mut local_ws, &upgrade).status, 101);
    local_ws
        .write_all(&ws_frame(true, 1, TOOLS_LIST.as_bytes()))
        .unwrap();
    assert_eq!(read_ws_frame(&mut local_ws).0, 1);
    let mut m = mcpb_client(&gw);
    m.write_all(&mcpb_frame(1, TOOLS_LIST.as_bytes())).unwrap();
    assert_eq!(read_mcpb(&mut m).0, 2);
    gw.wait_log("door=tcp");
    let messages: Vec<(String, String, String)> = access_lines(&gw.log.lock().unwrap(), "message")
        .iter()
        .map(|l| {
            (
                l["door"].clone(),
                l["upstream"].clone(),
                l["status"].clone(),
            )
        })
        .collect();
    let want =
        |door: &str, upstream: &str| (door.to_string(), upstream.to_string(), "200".to_string());
    assert_eq!(
        messages,
        [
            want("websocket", &url),
            want("websocket", "builtin:echo"),
            want("tcp", &url)
        ]
    );
    // Off on SIGHUP: later requests and messages leave no line.
    gw.reload("access_log: true", "access_log: false");
    let mut c = connect_from("127.0.0.3", gw.http);
    assert_eq!(roundtrip(&mut c, &local).status, 200);
    assert_eq!(roundtrip(&mut c, &proxied).status, 200);
    m.write_all(&mcpb_frame(1, TOOLS_LIST.as_bytes())).unwrap();
    assert_eq!(read_mcpb(&mut m).0, 2);
    gw.wait_log("access log switched on=false");
    // (The two upgrades were requests too: 101.)
    assert_eq!(access_lines(&gw.log.lock().unwrap(), "request").len(), 7);
    assert_eq!(access_lines(&gw.log.lock().unwrap(), "message").len(), 3);
}

/// Replies a WebSocket client's socket does not take at once (a client that reads slowly: a
/// small receive buffer, not read for a while) are written by the connection's timed write
/// after the part the socket took, so each arrives whole and in its place: 16 replies of 400 KB
/// that come back while the connection waits for its client, more than the most a loopback
/// socket's send buffer grows to (4 MiB).
#[test]
fn replies_to_a_slow_websocket_reader_arrive_whole_and_in_order() {
    let up = Mock::start(|req: &Req, s: &mut TcpStream| {
        std::thread::sleep(Duration::from_millis(200));
        let v: serde_json::Value = serde_json::from_slice(&req.body).unwrap_or_default();
        let text = v["params"]["arguments"]["message"].to_string();
        // A session id: the calls then go on side by side, not one after another as while a
        // session is being set up.
        json_reply(
            s,
            req,
            &format!(r#"{{"text":{text}}}"#),
            &[("Mcp-Session-Id", "s1")],
        );
    });
    let gw = start_with("", &endpoints(&[("default", &[&up.url()])], ROUTING));
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let from: std::net::SocketAddr = "127.0.0.2:0".parse().unwrap();
    socket.bind(&from.into()).unwrap();
    socket.connect(&gw.http.into()).unwrap();
    let mut s: TcpStream = socket.into();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(roundtrip(&mut s, WS_UPGRADE).status, 101);
    let text = |i: usize| format!("{i:03}").repeat(400_000 / 3);
    let mut calls = Vec::new();
    for i in 1..=16 {
        let call = format!(
            r#"{{"jsonrpc":"2.0","id":{i},"method":"tools/call","params":{{"name":"echo","arguments":{{"message":"{}"}}}}}}"#,
            text(i)
        );
        calls.extend(ws_frame(true, 1, call.as_bytes()));
    }
    s.write_all(&calls).unwrap();
    // The replies come back and pile up while nobody reads; then the client reads apace.
    std::thread::sleep(Duration::from_millis(600));
    socket2::SockRef::from(&s)
        .set_recv_buffer_size(4 << 20)
        .unwrap();
    let mut ids = Vec::new();
    for _ in 1..=16 {
        let (op, reply) = read_ws_frame(&mut s);
        assert_eq!(op, 1);
        let v: serde_json::Value = serde_json::from_slice(&reply).unwrap();
        let i = v["id"].as_u64().unwrap() as usize;
        assert_eq!(v["result"]["text"], text(i).as_str());
        ids.push(i);
    }
    ids.sort_unstable();
    assert_eq!(ids, (1..=16).collect::<Vec<_>>());
}

/// `n` requests to `/mcp{path}` at once, from `n` addresses, each answered 200.
fn burst(gw: &Gateway, path: &str, n: usize) {
    let http = gw.http;
    let clients: Vec<_> = (0..n)
        .map(|i| {
            let req = post_mcp(TOOLS_LIST).replacen("/mcp", &format!("/mcp{path}"), 1);
            std::thread::spawn(move || {
                let mut c = connect_from(&format!("127.0.0.{}", 2 + i), http);
                roundtrip(&mut c, &req).status
            })
        })
        .collect();
    for c in clients {
        assert_eq!(c.join().unwrap(), 200);
    }
}

/// Pooled upstream connections are kept for reuse, closed once they have waited
/// `routing.pool_idle_timeout`, and let go within a sweeper tick once the upstream closes them
/// (as servers do at their own keep-alive timeout), instead of staying open on the gateway's
/// side until a later burst finds them.
#[test]
fn pooled_connections_go_after_pool_idle_timeout_or_once_their_upstream_closed_them() {
    const N: usize = 6;
    // Each upstream answers once all N requests have arrived, so N connections are open at once.
    let keeps = {
        let all_in = Arc::new(std::sync::Barrier::new(N));
        Mock::start(move |req, s| {
            all_in.wait();
            json_reply(s, req, "{}", &[]);
        })
    };
    let closes = {
        let all_in = Arc::new(std::sync::Barrier::new(N));
        Mock::start(move |req, s| {
            all_in.wait();
            json_reply(s, req, "{}", &[]);
            let _ = s.shutdown(std::net::Shutdown::Both);
        })
    };
    let routing = "  health_check_interval: 3600\n  request_timeout: 5\n  connect_timeout: 1\n  pool_idle_timeout: 1\n";
    let gw = start_with(
        "",
        &endpoints(
            &[("default", &[&keeps.url()]), ("closes", &[&closes.url()])],
            routing,
        ),
    );
    let gauge = |u: &Mock, ns: &str| {
        format!(
            "mcp_gateway_upstream_pooled_connections{{namespace=\"{ns}\",upstream=\"{}\"}}",
            u.url()
        )
    };
    burst(&gw, "", N);
    let pooled = Instant::now();
    assert_eq!(keeps.open_connections(), N, "kept in the pools for reuse");
    gw.wait_metric(&gauge(&keeps, "default"), N as f64);
    eventually(
        || keeps.open_connections() == 0,
        || "not closed after pool_idle_timeout".into(),
    );
    gw.wait_metric(&gauge(&keeps, "default"), 0.0);
    assert!(
        pooled.elapsed() >= Duration::from_millis(900),
        "closed after {:?}, before pool_idle_timeout (1 s)",
        pooled.elapsed()
    );
    gw.wait_all_closed();

    // With an hour's pool_idle_timeout, connections the upstream closed still go at once: the
    // gateway's descriptors come back to what they were.
    gw.reload("pool_idle_timeout: 1", "pool_idle_timeout: 3600");
    let descriptors = || {
        std::fs::read_dir(format!("/proc/{}/fd", gw.pid()))
            .unwrap()
            .count()
    };
    let before = descriptors();
    burst(&gw, "/closes", N);
    gw.wait_all_closed();
    eventually(
        || descriptors() == before,
        || format!("{} descriptors, {before} before", descriptors()),
    );
    assert_eq!(gw.metric(&gauge(&closes, "closes")), 0.0);
}

/// An endpoint's `host_header` is the `Host` its requests and its health checks name, instead
/// of the URL's authority (an upstream reached by address behind something that routes by
/// name); the other endpoint keeps its URL's.
#[test]
fn an_endpoints_host_header_replaces_the_urls_authority_in_requests_and_health_checks() {
    let hosts = |seen: Arc<Mutex<Vec<(bool, String)>>>| {
        Mock::start(move |req, s| {
            let probe = req.body_str().contains("mcp-gateway-health");
            let host = req.header("host").unwrap_or("").to_string();
            seen.lock().unwrap().push((probe, host));
            json_reply(s, req, "{}", &[]);
        })
    };
    let (named_seen, plain_seen) = (Arc::default(), Arc::default());
    let (named, plain) = (
        hosts(Arc::clone(&named_seen)),
        hosts(Arc::clone(&plain_seen)),
    );
    let rest = format!(
        "routing:\n  health_check_interval: 0.2\nservice_discovery:\n  static:\n    endpoints:\n      default:\n        - url: {}\n          host_header: mcp.internal:8443\n      plain:\n        - url: {}\n",
        named.url(),
        plain.url()
    );
    let gw = start_with("", &rest);
    let mut c = connect_from("127.0.0.2", gw.http);
    assert_eq!(roundtrip(&mut c, &post_mcp(TOOLS_LIST)).status, 200);
    let to_plain = post_mcp(TOOLS_LIST).replacen("/mcp", "/mcp/plain", 1);
    assert_eq!(roundtrip(&mut c, &to_plain).status, 200);
    let probed = |seen: &Mutex<Vec<(bool, String)>>| seen.lock().unwrap().iter().any(|s| s.0);
    eventually(
        || probed(&named_seen) && probed(&plain_seen),
        || "not both upstreams probed".into(),
    );
    let all = |seen: &Mutex<Vec<(bool, String)>>| {
        let hosts: std::collections::BTreeSet<String> =
            seen.lock().unwrap().iter().map(|s| s.1.clone()).collect();
        hosts.into_iter().collect::<Vec<_>>()
    };
    assert_eq!(all(&named_seen), ["mcp.internal:8443"]);
    assert_eq!(all(&plain_seen), [plain.addr.to_string()]);
    drop(c);
    gw.wait_all_closed();
}

/// An event-stream reply that ends without the response to the message's request (a server
/// that closed it early, or crashed mid-call after an event) costs the client a JSON-RPC error
/// for that request, after the events that did come: never a wait for a reply that will not
/// come. One that brings the response (its id written another way) costs nothing more.
#[test]
fn an_event_stream_that_ends_without_the_reply_costs_a_json_rpc_error() {
    let up = session_upstream("S8", |req, s| {
        let _ = s.write_all(mock::SSE_HEAD);
        chunk(s, "data: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{\"progress\":1}}\n\n");
        let body: serde_json::Value = serde_json::from_str(req.body_str()).unwrap();
        if body["method"] != "slow" {
            // The reply, its id escaped: the same id to JSON.
            let id = body["id"].as_str().unwrap().replace('c', "\\u0063");
            let reply = format!("{{\"jsonrpc\":\"2.0\",\"id\":\"{id}\",\"result\":{{}}}}");
            chunk(s, &format!("data: {reply}\n\n"));
        }
        let _ = s.write_all(b"0\r\n\r\n");
    });
    let gw = start_with("", &endpoints(&[("default", &[&up.url()])], ROUTING));
    let mut c = mcpb_initialized(&gw);
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let call = |id: &str, method: &str| {
        let m = format!(r#"{{"jsonrpc":"2.0","id":"{id}","method":"{method}","params":{{}}}}"#);
        mcpb_frame(1, m.as_bytes())
    };
    for round in 0..2 {
        c.write_all(&call("call-1", "slow")).unwrap();
        let (_, event) = read_mcpb(&mut c);
        assert_eq!(event["method"], "notifications/progress", "{event}");
        let (kind, r) = read_mcpb(&mut c);
        assert_eq!(
            (kind, &r["id"]),
            (5, &"call-1".into()),
            "an Error frame: {r}"
        );
        let why = r["error"]["message"].as_str().unwrap();
        assert!(why.contains("without a reply"), "{why}");
        // The connection and session go on; a stream that brings the reply costs no error,
        // so the next frame after it is the next message's.
        c.write_all(&call(&format!("call-{round}"), "tools/call"))
            .unwrap();
        assert_eq!(read_mcpb(&mut c).1["method"], "notifications/progress");
        let (kind, r) = read_mcpb(&mut c);
        assert_eq!(
            (kind, r["result"].clone()),
            (2, serde_json::json!({})),
            "{r}"
        );
    }
    drop(c);
    gw.wait_all_closed();
}

/// A batch (MCP revisions before 2025-06-18 allow them) waits for the responses to each of its
/// requests: an event stream that ends with some unanswered costs an error for each of those
/// (one array), after what did come; one that ends early is resumed until all are answered; and
/// an upstream that cannot be reached costs an error for each request, with its own id.
#[test]
fn a_batch_gets_a_response_or_an_error_for_each_of_its_requests() {
    let up = Mock::start(|req, s| {
        let body = req.body_str();
        if body.contains("\"initialize\"") {
            return json_reply(s, req, "{}", &[("Mcp-Session-Id", "SB")]);
        }
        if req.method != "POST" && req.header("last-event-id").is_none() {
            return respond(s, 405, &[], ""); // no session stream; DELETE at the end
        }
        if req.method == "GET" {
            // The resumption of the "resumed" batch's stream: the last response.
            assert_eq!(req.header("last-event-id"), Some("r1"));
            let _ = s.write_all(mock::SSE_HEAD);
            chunk(
                s,
                "id: r2\ndata: {\"jsonrpc\":\"2.0\",\"id\":\"r-2\",\"result\":{}}\n\n",
            );
        } else if body.contains("\"partly\"") {
            // The first request's response (itself a batch of one), progress, and the end.
            let _ = s.write_all(mock::SSE_HEAD);
            chunk(
                s,
                "data: [{\"jsonrpc\":\"2.0\",\"id\":\"b-1\",\"result\":{}}]\n\n",
            );
            chunk(s, "data: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{\"progress\":1}}\n\n");
        } else if body.contains("\"resumed\"") {
            let _ = s.write_all(mock::SSE_HEAD);
            chunk(
                s,
                "id: r1\nretry: 20\ndata: {\"jsonrpc\":\"2.0\",\"id\":\"r-1\",\"result\":{}}\n\n",
            );
        } else if body.contains("\"late\"") {
            // Both responses, then an event over max_message_size (1 MiB): dropped, with no
            // second answer for ids already answered.
            let _ = s.write_all(mock::SSE_HEAD);
            chunk(s, "data: [{\"jsonrpc\":\"2.0\",\"id\":\"l-1\",\"result\":{}},{\"jsonrpc\":\"2.0\",\"id\":\"l-2\",\"result\":{}}]\n\n");
            chunk(s, &format!("data: \"{}\"\n\n", "x".repeat(1_100_000)));
        } else {
            let id = serde_json::from_slice::<serde_json::Value>(&req.body).unwrap()["id"].clone();
            return json_reply(
                s,
                req,
                &format!("{{\"jsonrpc\":\"2.0\",\"id\":{id},\"result\":{{}}}}"),
                &[],
            );
        }
        let _ = s.write_all(b"0\r\n\r\n");
    });
    let (_refusing, port) = refusing_port();
    let refused = format!("http://127.0.0.1:{port}/mcp");
    let gw = start_with(
        "",
        &endpoints(
            &[("default", &[&up.url()]), ("refused", &[&refused])],
            ROUTING,
        ),
    );
    let mut c = mcpb_initialized(&gw);
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let ids = |errors: &serde_json::Value| -> Vec<serde_json::Value> {
        let all = errors
            .as_array()
            .unwrap_or_else(|| panic!("an array: {errors}"));
        assert!(all.iter().all(|e| e["error"]["code"] == -32000), "{errors}");
        all.iter().map(|e| e["id"].clone()).collect()
    };
    let request = |id: &str, method: &str| {
        format!(r#"{{"jsonrpc":"2.0","id":"{id}","method":"{method}","params":{{}}}}"#)
    };
    let note = r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{}}"#;
    let batch = |parts: &[String]| mcpb_frame(1, format!("[{}]", parts.join(",")).as_bytes());

    let partly = batch(&[
        request("b-1", "partly"),
        note.into(),
        request("b-2", "partly"),
    ]);
    c.write_all(&partly).unwrap();
    let (kind, r) = read_mcpb(&mut c);
    assert_eq!((kind, &r[0]["id"]), (2, &"b-1".into()), "{r}");
    assert_eq!(read_mcpb(&mut c).1["method"], "notifications/progress");
    let (kind, errors) = read_mcpb(&mut c);
    assert_eq!(kind, 5, "{errors}");
    assert_eq!(ids(&errors), ["b-2"], "only the request not answered");
    assert!(errors[0]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("without a reply"));

    // Resumed until both are answered: no error, so the next frame is the next message's.
    c.write_all(&batch(&[
        request("r-1", "resumed"),
        request("r-2", "resumed"),
    ]))
    .unwrap();
    assert_eq!(read_mcpb(&mut c).1["id"], "r-1");
    assert_eq!(read_mcpb(&mut c).1["id"], "r-2");
    c.write_all(&mcpb_frame(1, request("after", "ping").as_bytes()))
        .unwrap();
    let (kind, r) = read_mcpb(&mut c);
    assert_eq!((kind, &r["id"]), (2, &"after".into()), "{r}");
    assert_eq!(resumptions(&gw, &up), 1.0);

    // Whatever fails after every response came costs no error (a second answer for their ids).
    c.write_all(&batch(&[request("l-1", "late"), request("l-2", "late")]))
        .unwrap();
    let (kind, r) = read_mcpb(&mut c);
    assert_eq!((kind, r.as_array().map(Vec::len)), (2, Some(2)), "{r}");
    gw.wait_log("reply larger than max_message_size");
    c.write_all(&mcpb_frame(1, request("after-late", "ping").as_bytes()))
        .unwrap();
    let (kind, r) = read_mcpb(&mut c);
    assert_eq!((kind, &r["id"]), (2, &"after-late".into()), "{r}");
    drop(c);

    // An upstream that cannot be reached (over WebSocket: MCPB serves `default` only): an error
    // for each request, none for the notification.
    let mut c = connect_from("127.0.0.2", gw.http);
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let upgrade = WS_UPGRADE.replacen("/mcp", "/mcp/refused", 1);
    assert_eq!(roundtrip(&mut c, &upgrade).status, 101);
    let batch = format!("[{},{note},{}]", request("x-1", "a"), request("x-2", "b"));
    c.write_all(&ws_frame(true, 1, batch.as_bytes())).unwrap();
    let (op, errors) = read_ws_frame(&mut c);
    let errors = serde_json::from_slice(&errors).unwrap();
    assert_eq!((op, ids(&errors)), (1, vec!["x-1".into(), "x-2".into()]));
    drop(c);
    gw.wait_all_closed();
}

/// The event streams of `up` the gateway opened again after `up` ended them early.
fn resumptions(gw: &Gateway, up: &Mock) -> f64 {
    gw.metric(&format!(
        "mcp_gateway_upstream_stream_resumptions_total{{namespace=\"default\",upstream=\"{}\"}}",
        up.url()
    ))
}

/// MCP 2025-11-25: a server may end a request's event stream before the response, its events
/// carrying ids, to have the client poll. The gateway resumes it for a WebSocket or MCPB client
/// (`GET` with `Last-Event-ID` within the session, after the `retry` the stream asked for),
/// relaying what comes until the response, however many times the server ends it; a stream
/// whose resumption the server refuses is given up after three tries, with an error for the
/// request.
#[test]
fn an_event_stream_closed_before_its_reply_is_resumed_after_its_last_event() {
    let (get_tx, get_rx) = mpsc::channel::<(Option<String>, Option<String>)>();
    let get_tx = Mutex::new(get_tx);
    let progress = |n: u32| {
        format!("data: {{\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{{\"progress\":{n}}}}}\n\n")
    };
    let up = Mock::start(move |req, s| {
        if req.body_str().contains("\"initialize\"") {
            return json_reply(s, req, "{}", &[("Mcp-Session-Id", "S9")]);
        }
        if req.method == "DELETE" {
            return respond(s, 200, &[], "");
        }
        let last = req.header("last-event-id").map(str::to_string);
        if req.method == "GET" {
            let session = req.header("mcp-session-id").map(str::to_string);
            let _ = get_tx.lock().unwrap().send((last.clone(), session));
        }
        let body = req.body_str();
        match (req.method.as_str(), last.as_deref()) {
            // The session's own stream: none.
            ("GET", None) => return respond(s, 405, &[], ""),
            // A priming event, progress, then the stream ends.
            ("POST", _) if body.contains("\"call\"") => {
                let _ = s.write_all(mock::SSE_HEAD);
                chunk(s, "id: c1\nretry: 20\ndata:\n\n");
                chunk(s, &format!("id: c2\n{}", progress(1)));
            }
            // Resumed after the progress: nothing yet (a priming event), and ended again, three
            // times (a quiet server polled)...
            ("GET", Some(n @ ("c2" | "c3" | "c4"))) => {
                let _ = s.write_all(mock::SSE_HEAD);
                let next = n[1..].parse::<u32>().unwrap() + 1;
                chunk(s, &format!("id: c{next}\ndata:\n\n"));
            }
            // ...then the response.
            ("GET", Some("c5")) => {
                let _ = s.write_all(mock::SSE_HEAD);
                chunk(s, "id: c6\ndata: {\"jsonrpc\":\"2.0\",\"id\":\"call-1\",\"result\":{\"done\":true}}\n\n");
            }
            // Progress whose last id no header field can carry: nothing to resume from.
            ("POST", _) if body.contains("\"other\"") => {
                let _ = s.write_all(mock::SSE_HEAD);
                chunk(s, &format!("id: o1\n{}", progress(1)));
                chunk(s, &format!("id: bad\u{1}id\n{}", progress(2)));
            }
            // A stream the server will not resume (it forgot the event, say).
            ("POST", _) => {
                let _ = s.write_all(mock::SSE_HEAD);
                chunk(s, "id: s1\nretry: 20\ndata:\n\n");
            }
            _ => return respond(s, 400, &[], ""),
        }
        let _ = s.write_all(b"0\r\n\r\n");
    });
    let gw = start_with("", &endpoints(&[("default", &[&up.url()])], ROUTING));
    let mut c = mcpb_initialized(&gw);
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(
        get_rx.recv_timeout(Duration::from_secs(5)).unwrap(),
        (None, Some("S9".into()))
    );
    let call = br#"{"jsonrpc":"2.0","id":"call-1","method":"call","params":{}}"#;
    c.write_all(&mcpb_frame(1, call)).unwrap();
    assert_eq!(read_mcpb(&mut c).1["method"], "notifications/progress");
    let (kind, r) = read_mcpb(&mut c);
    assert_eq!(
        (kind, &r["id"], &r["result"]["done"]),
        (2, &"call-1".into(), &true.into()),
        "{r}"
    );
    // Each resumption named the last event, within the session.
    let gets: Vec<_> = get_rx.try_iter().collect();
    let within = |id: &str| (Some(id.to_string()), Some("S9".to_string()));
    let ids = ["c2", "c3", "c4", "c5"];
    assert_eq!(gets, ids.map(within));
    assert_eq!(resumptions(&gw, &up), 4.0);

    // A stream whose last id cannot be sent: no resumption, an error after its events.
    let other = br#"{"jsonrpc":"2.0","id":8,"method":"other","params":{}}"#;
    c.write_all(&mcpb_frame(1, other)).unwrap();
    assert_eq!(read_mcpb(&mut c).1["params"]["progress"], 1);
    assert_eq!(read_mcpb(&mut c).1["params"]["progress"], 2);
    let (kind, r) = read_mcpb(&mut c);
    assert_eq!((kind, &r["id"]), (5, &8.into()), "{r}");
    assert!(
        get_rx.try_recv().is_err(),
        "no resumption without an id to resume from"
    );

    // A stream the server refuses to resume: three tries, then an error.
    let refused = br#"{"jsonrpc":"2.0","id":9,"method":"refused","params":{}}"#;
    c.write_all(&mcpb_frame(1, refused)).unwrap();
    let (kind, r) = read_mcpb(&mut c);
    assert_eq!((kind, &r["id"]), (5, &9.into()), "{r}");
    let tries: Vec<_> = get_rx.try_iter().collect();
    assert_eq!(tries, vec![within("s1"); 3]);
    assert_eq!(
        resumptions(&gw, &up),
        4.0,
        "a refused resumption is not counted"
    );
    drop(c);
    gw.wait_all_closed();
}

/// The session's standalone stream too: ended by the server after an event with an id, it is
/// opened again after that event (`Last-Event-ID`), and what the server sends there reaches the
/// client.
#[test]
fn a_session_stream_the_server_ends_is_resumed_after_its_last_event() {
    let (get_tx, get_rx) = mpsc::channel::<Option<String>>();
    let get_tx = Mutex::new(get_tx);
    let note = |n: u32| {
        format!("data: {{\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\",\"params\":{{\"n\":{n}}}}}\n\n")
    };
    let up = Mock::start(move |req, s| {
        if req.method == "DELETE" {
            return respond(s, 200, &[], "");
        }
        if req.method == "POST" {
            return json_reply(s, req, "{}", &[("Mcp-Session-Id", "S10")]);
        }
        let last = req.header("last-event-id").map(str::to_string);
        let _ = get_tx.lock().unwrap().send(last.clone());
        let _ = s.write_all(mock::SSE_HEAD);
        match last.as_deref() {
            None => {
                chunk(s, &format!("id: g1\nretry: 20\n{}", note(1)));
                let _ = s.write_all(b"0\r\n\r\n");
            }
            Some("g1") => {
                chunk(s, &format!("id: g2\n{}", note(2)));
                let mut b = [0u8; 16];
                let _ = s.read(&mut b); // open until the gateway leaves
            }
            Some(_) => {
                let _ = s.write_all(b"0\r\n\r\n");
            }
        }
    });
    let gw = start_with("", &endpoints(&[("default", &[&up.url()])], ROUTING));
    let mut c = mcpb_initialized(&gw);
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(read_mcpb(&mut c).1["params"]["n"], 1);
    assert_eq!(read_mcpb(&mut c).1["params"]["n"], 2);
    let gets: Vec<_> = get_rx.try_iter().collect();
    assert_eq!(gets, [None, Some("g1".to_string())]);
    assert_eq!(resumptions(&gw, &up), 1.0);
    drop(c);
    gw.wait_all_closed();
}

/// A request's event stream that stays open after its response (MCP: the server should end it
/// then) is closed `routing.request_timeout` after the response, though the server goes on
/// sending on it, with no error for the client: the forward is done, not left in flight for as
/// long as the server keeps the stream.
#[test]
fn an_event_stream_left_open_after_its_reply_is_closed_after_request_timeout() {
    let (gone_tx, gone_rx) = mpsc::channel::<()>();
    let gone_tx = Mutex::new(gone_tx);
    let up = session_upstream("S11", move |req, s| {
        let _ = s.write_all(mock::SSE_HEAD);
        let body: serde_json::Value = serde_json::from_str(req.body_str()).unwrap();
        let id = &body["id"];
        chunk(
            s,
            &format!("data: {{\"jsonrpc\":\"2.0\",\"id\":{id},\"result\":{{}}}}\n\n"),
        );
        // A comment every 200 ms, until the gateway has closed the stream.
        for _ in 0..50 {
            std::thread::sleep(Duration::from_millis(200));
            if s.write_all(b"9\r\n: ping\n\n\n\r\n").is_err() {
                let _ = gone_tx.lock().unwrap().send(());
                return;
            }
        }
    });
    let gw = start_with(
        "",
        &endpoints(
            &[("default", &[&up.url()])],
            "  health_check_interval: 3600\n  request_timeout: 1\n",
        ),
    );
    let mut c = mcpb_initialized(&gw);
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(&mcpb_frame(
        1,
        br#"{"jsonrpc":"2.0","id":3,"method":"tools/call"}"#,
    ))
    .unwrap();
    let started = std::time::Instant::now();
    let (kind, r) = read_mcpb(&mut c);
    assert_eq!((kind, &r["id"]), (2, &3.into()), "{r}");
    gone_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the stream closed after request_timeout");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "not before it"
    );
    let in_flight = format!(
        "mcp_gateway_upstream_in_flight{{namespace=\"default\",upstream=\"{}\"}}",
        up.url()
    );
    gw.wait_metric(&in_flight, 0.0);
    // Nothing more for the client: its next message is answered next.
    c.write_all(&mcpb_frame(
        1,
        br#"{"jsonrpc":"2.0","id":4,"method":"tools/call"}"#,
    ))
    .unwrap();
    assert_eq!(read_mcpb(&mut c).1["id"], 4);
}

/// A session stream the server ends without having given an event id is opened again afresh
/// (as the SDK's own client does), after the stream's `retry`: what the server sends on the new
/// stream reaches the client.
#[test]
fn a_session_stream_ended_without_ids_is_opened_again() {
    let (get_tx, get_rx) = mpsc::channel::<Option<String>>();
    let get_tx = Mutex::new(get_tx);
    let opened = std::sync::atomic::AtomicUsize::new(0);
    let up = Mock::start(move |req, s| {
        if req.method == "DELETE" {
            return respond(s, 200, &[], "");
        }
        if req.method == "POST" {
            return json_reply(s, req, "{}", &[("Mcp-Session-Id", "S12")]);
        }
        let _ = get_tx
            .lock()
            .unwrap()
            .send(req.header("last-event-id").map(str::to_string));
        let n = opened.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        let _ = s.write_all(mock::SSE_HEAD);
        chunk(s, &format!("retry: 20\ndata: {{\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\",\"params\":{{\"n\":{n}}}}}\n\n"));
        if n == 1 {
            let _ = s.write_all(b"0\r\n\r\n");
        } else {
            let mut b = [0u8; 16];
            let _ = s.read(&mut b); // open until the gateway leaves
        }
    });
    let gw = start_with("", &endpoints(&[("default", &[&up.url()])], ROUTING));
    let mut c = mcpb_initialized(&gw);
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(read_mcpb(&mut c).1["params"]["n"], 1);
    assert_eq!(read_mcpb(&mut c).1["params"]["n"], 2);
    assert_eq!(get_rx.try_iter().collect::<Vec<_>>(), [None, None]);
    drop(c);
    gw.wait_all_closed();
}
