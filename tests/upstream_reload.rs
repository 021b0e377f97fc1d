//! Upstreams reloaded on SIGHUP through the real binary: MCP servers added and removed while
//! clients keep their connections and sessions, and a configuration whose upstreams cannot be
//! built changing nothing.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use common::mock::{self, json_reply, respond, Mock, Req};
use common::*;

/// An upstream that names itself in every reply and issues `sess-{name}` on initialize.
fn named(name: &'static str) -> Arc<mock::Handler> {
    Arc::new(move |req: &Req, s: &mut TcpStream| {
        let session = req.header("mcp-session-id").unwrap_or("").to_string();
        let result = format!(r#"{{"server":"{name}","session":"{session}"}}"#);
        if req.body_str().contains("\"initialize\"") {
            json_reply(
                s,
                req,
                &result,
                &[("Mcp-Session-Id", &format!("sess-{name}"))],
            );
        } else if req.method == "DELETE" {
            respond(s, 200, &[], "");
        } else {
            json_reply(s, req, &result, &[]);
        }
    })
}

/// The `service_discovery` section for `namespaces`, between markers the tests replace.
fn endpoints(namespaces: &[(&str, &[&str])]) -> String {
    let mut y = String::from("#upstreams\nservice_discovery:\n  static:\n    endpoints:\n");
    for (ns, urls) in namespaces {
        y += &format!("      {ns}:\n");
        for u in *urls {
            y += &format!("        - url: {u}\n");
        }
    }
    y + "#end\n"
}

const ROUTING: &str =
    "routing:\n  health_check_interval: 3600\n  request_timeout: 2\n  connect_timeout: 1\n";

/// A `POST` of `body` to `path`, in session `id` when given.
fn post(path: &str, body: &str, id: Option<&str>) -> String {
    let session = id.map_or(String::new(), |id| format!("Mcp-Session-Id: {id}\r\n"));
    format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\n{session}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// The server that answered, and the session id the client got (if any).
fn exchange(c: &mut TcpStream, path: &str, body: &str, id: Option<&str>) -> (u16, String, String) {
    let r = roundtrip(c, &post(path, body, id));
    let server = match r.status {
        200 => r.json()["result"]["server"].as_str().unwrap().to_string(),
        _ => String::new(),
    };
    let sid = r.header("mcp-session-id").unwrap_or("").to_string();
    (r.status, server, sid)
}

/// A WebSocket client from `from` of namespace `ns`, its `initialize` answered: the connection
/// and the server that answered.
fn ws_initialized(gw: &Gateway, from: &str, ns: &str) -> (TcpStream, String) {
    let mut ws = connect_from(from, gw.http);
    let r = roundtrip(
        &mut ws,
        &WS_UPGRADE.replacen("/mcp", &format!("/mcp/{ns}"), 1),
    );
    assert_eq!(r.status, 101);
    ws.write_all(&ws_frame(true, 1, INIT.as_bytes())).unwrap();
    let reply: serde_json::Value = serde_json::from_slice(&read_ws_frame(&mut ws).1).unwrap();
    let server = reply["result"]["server"].as_str().unwrap_or("").to_string();
    (ws, server)
}

#[test]
fn upstreams_come_and_go_on_sighup_while_clients_keep_their_connections() {
    let a = Mock::start_on("127.0.0.1:0", named("a"));
    let b = Mock::start_on("127.0.0.1:0", named("b"));
    let (ua, ub) = (a.url(), b.url());
    let first = endpoints(&[("default", &[&ua])]);
    let gw = start_with("", &format!("{ROUTING}{first}"));

    // A keep-alive HTTP client in a session on a, and an MCPB client in one too.
    let mut http = connect_from("127.0.0.2", gw.http);
    let (status, server, on_a) = exchange(&mut http, "/mcp", INIT, None);
    assert_eq!((status, server.as_str()), (200, "a"));
    let mut mcpb = TcpStream::connect(gw.tcp.unwrap()).unwrap();
    mcpb.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    mcpb.write_all(&mcpb_frame(1, INIT.as_bytes())).unwrap();
    assert_eq!(read_mcpb(&mut mcpb).1["result"]["server"], "a");

    // b joins the default namespace, and a new namespace `tools` is served by b.
    let second = endpoints(&[("default", &[&ua, &ub]), ("tools", &[&ub])]);
    gw.reload(&first, &second);
    gw.wait_log("upstreams reloaded");
    assert!(gw
        .log
        .lock()
        .unwrap()
        .contains(&format!("added=default {ub}, tools {ub} ")));
    // The same connection, the same session: still a.
    let (status, server, _) = exchange(&mut http, "/mcp", TOOLS_LIST, Some(&on_a));
    assert_eq!((status, server.as_str()), (200, "a"));
    mcpb.write_all(&mcpb_frame(1, TOOLS_LIST.as_bytes()))
        .unwrap();
    assert_eq!(read_mcpb(&mut mcpb).1["result"]["server"], "a");
    // New sessions spread over both; `tools` answers from b.
    let mut seen = std::collections::HashSet::new();
    for i in 0..6 {
        let mut c = connect_from(&format!("127.0.1.{}", 2 + i), gw.http);
        seen.insert(exchange(&mut c, "/mcp", INIT, None).1);
    }
    assert_eq!(seen.len(), 2, "new sessions go to both upstreams: {seen:?}");
    let (status, server, _) = exchange(&mut http, "/mcp/tools", TOOLS_LIST, None);
    assert_eq!((status, server.as_str()), (200, "b"));
    // A WebSocket client of the new namespace.
    let (mut ws, server) = ws_initialized(&gw, "127.0.0.3", "tools");
    assert_eq!(server, "b");
    // One request over HTTP, one over WebSocket.
    let text = gw.scrape();
    assert!(
        text.contains(&format!(
            "mcp_gateway_upstream_requests_total{{namespace=\"tools\",upstream=\"{ub}\",outcome=\"ok\"}} 2\n"
        )),
        "{text}"
    );

    // a's weight changes: the same upstream, so sessions on it go on, on the HTTP door and on
    // the MCPB connection alike.
    let weighted = second.replacen(
        &format!("- url: {ua}\n"),
        &format!("- url: {ua}\n          weight: 3\n"),
        1,
    );
    gw.reload(&second, &weighted);
    let (status, server, _) = exchange(&mut http, "/mcp", TOOLS_LIST, Some(&on_a));
    assert_eq!((status, server.as_str()), (200, "a"));
    mcpb.write_all(&mcpb_frame(1, TOOLS_LIST.as_bytes()))
        .unwrap();
    let r = read_mcpb(&mut mcpb).1;
    assert_eq!(
        (
            r["result"]["server"].as_str(),
            r["result"]["session"].as_str()
        ),
        (Some("a"), Some("sess-a")),
        "{r}"
    );

    // a leaves, and so does `tools`: a's sessions start anew, on b.
    let third = endpoints(&[("default", &[&ub])]);
    gw.reload(&weighted, &third);
    let (status, _, _) = exchange(&mut http, "/mcp", TOOLS_LIST, Some(&on_a));
    assert_eq!(status, 404, "a session on a removed upstream is gone");
    let (status, _, _) = exchange(&mut http, "/mcp/tools", TOOLS_LIST, None);
    assert_eq!(status, 404, "a removed namespace is unknown");
    let (status, server, on_b) = exchange(&mut http, "/mcp", INIT, None);
    assert_eq!((status, server.as_str()), (200, "b"));
    assert!(on_b.ends_with("sess-b"), "{on_b}");
    // The MCPB client's session was on a: its next message says so, the next initialize is on b.
    mcpb.write_all(&mcpb_frame(1, TOOLS_LIST.as_bytes()))
        .unwrap();
    let (kind, e) = read_mcpb(&mut mcpb);
    assert_eq!(kind, 5, "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("removed"),
        "{e}"
    );
    mcpb.write_all(&mcpb_frame(1, INIT.as_bytes())).unwrap();
    assert_eq!(read_mcpb(&mut mcpb).1["result"]["server"], "b");
    // The WebSocket client's namespace is gone: an error per message, the connection kept.
    ws.write_all(&ws_frame(true, 1, TOOLS_LIST.as_bytes()))
        .unwrap();
    let e: serde_json::Value = serde_json::from_slice(&read_ws_frame(&mut ws).1).unwrap();
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("namespace is not configured"),
        "{e}"
    );
    ws.write_all(&ws_frame(true, 9, b"still there?")).unwrap();
    assert_eq!(
        read_ws_frame(&mut ws),
        (10, b"still there?".to_vec()),
        "pong"
    );
    // a is no longer reported; every reload applied whole.
    let text = gw.scrape();
    assert!(!text.contains(&format!("upstream=\"{ua}\"")), "{text}");
    assert_eq!(
        sample_value(
            &text,
            "mcp_gateway_config_reloads_total{result=\"applied\"}"
        ),
        3.0
    );
    drop((http, mcpb, ws));
    gw.wait_all_closed();
}

#[test]
fn upstreams_that_cannot_be_built_leave_the_ones_in_force() {
    let a = Mock::start_on("127.0.0.1:0", named("a"));
    let first = endpoints(&[("default", &[&a.url()])]);
    let gw = start_with("", &format!("{ROUTING}{first}"));
    let (whole, at) = (
        "mcp_gateway_config_last_reload_successful",
        "mcp_gateway_config_last_reload_success_timestamp_seconds",
    );
    assert_eq!(
        (gw.metric(whole), gw.metric(at)),
        (1.0, 0.0),
        "no reload yet"
    );
    let unresolvable = endpoints(&[("default", &["http://no-such-host.invalid:9/mcp"])]);
    gw.reload(&first, &unresolvable);
    gw.wait_log("cannot resolve no-such-host.invalid");
    assert_eq!(
        gw.metric("mcp_gateway_config_reloads_total{result=\"partial\"}"),
        1.0
    );
    // What operators alert on: the file in force is not the file on disk.
    assert_eq!(gw.metric(whole), 0.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - gw.metric(at)).abs() < 60.0, "{}", gw.metric(at));
    let mut c = connect_from("127.0.0.2", gw.http);
    assert_eq!(exchange(&mut c, "/mcp", INIT, None).1, "a");
}

#[test]
fn reloads_under_traffic_cost_the_clients_nothing() {
    let a = Mock::start_on("127.0.0.1:0", named("a"));
    let b = Mock::start_on("127.0.0.1:0", named("b"));
    let one = endpoints(&[("default", &[&a.url()])]);
    let two = endpoints(&[("default", &[&a.url(), &b.url()]), ("x", &[&b.url()])]);
    let gw = start_with("", &format!("{ROUTING}{one}"));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let http = gw.http;
    // Keep-alive clients from several addresses (so on both workers), each request checked.
    let clients: Vec<_> = (0..4)
        .map(|i| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut c = connect_from(&format!("127.0.2.{}", 2 + i), http);
                let mut served = std::collections::HashSet::new();
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let (status, server, _) = exchange(&mut c, "/mcp", TOOLS_LIST, None);
                    assert_eq!(status, 200, "request {n} of client {i}");
                    served.insert(server);
                    n += 1;
                }
                (n, served)
            })
        })
        .collect();
    // b and namespace x come and go 20 times while the requests flow.
    for _ in 0..10 {
        gw.reload(&one, &two);
        gw.reload(&two, &one);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut seen = std::collections::HashSet::new();
    for c in clients {
        let (n, served) = c.join().expect("every request answered 200");
        assert!(n > 0);
        seen.extend(served);
    }
    assert!(seen.contains("a"), "{seen:?}");
    assert_eq!(
        gw.metric("mcp_gateway_config_reloads_total{result=\"applied\"}"),
        20.0
    );
    gw.wait_all_closed();
    let in_flight = format!(
        "mcp_gateway_upstream_in_flight{{namespace=\"default\",upstream=\"{}\"}}",
        a.url()
    );
    assert_eq!(gw.metric(&in_flight), 0.0, "every lease ended");
}

/// The open-file hard limit of this process (and so of the gateways it starts); `None`:
/// unlimited.
fn open_file_hard_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace().nth(4).unwrap().parse().ok()
}

#[test]
fn a_reload_bringing_http_upstreams_checks_the_open_file_limit_again() {
    let a = Mock::start_on("127.0.0.1:0", named("a"));
    // Enough descriptors for every client alone, not for every client and an upstream each.
    let Some(hard) = open_file_hard_limit() else {
        return; // nothing to warn about
    };
    let max = hard / 2 + 100;
    let echo = endpoints(&[("default", &["builtin:echo"])]);
    let gw = start_with(
        &format!("max_connections: {max}"),
        &format!("{ROUTING}{echo}"),
    );
    let warning = "server.max_connections cannot be reached with this open-file limit";
    assert!(!gw.log.lock().unwrap().contains(warning));
    gw.reload(&echo, &endpoints(&[("default", &[&a.url()])]));
    gw.wait_log(warning);
}

#[test]
fn an_event_stream_from_a_removed_upstream_ends_and_the_others_stay_open() {
    removed_upstreams_stream_ends(false);
}

#[test]
fn a_parked_event_stream_from_a_removed_upstream_ends_too() {
    removed_upstreams_stream_ends(true);
}

/// `parked`: both streams park (see tests/parking.rs) before the reload.
fn removed_upstreams_stream_ends(parked: bool) {
    let (gone_tx, gone_rx) = std::sync::mpsc::channel();
    let (kept_tx, kept_rx) = std::sync::mpsc::channel();
    let gone = Mock::start(mock::stream_until_closed(gone_tx));
    let kept = Mock::start(mock::stream_until_closed(kept_tx));
    let both = endpoints(&[("gone", &[&gone.url()]), ("kept", &[&kept.url()])]);
    // One worker: one sweeper, so the end of one stream shows the other was looked at too.
    let server = if parked {
        "workers: 1\nread_timeout: 0.8"
    } else {
        "workers: 1"
    };
    let gw = start_with(server, &format!("{ROUTING}{both}"));
    let stream = |ns: &str| {
        let mut c = connect_from("127.0.0.2", gw.http);
        let get = format!("GET /mcp/{ns} HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n");
        c.write_all(get.as_bytes()).unwrap();
        let mut buf = Vec::new();
        read_until(&mut c, &mut buf, ": open");
        c
    };
    let (mut from_gone, mut from_kept) = (stream("gone"), stream("kept"));
    if parked {
        gw.wait_metric("mcp_gateway_connections_parked", 2.0);
    }
    gw.reload(&both, &endpoints(&[("kept", &[&kept.url()])]));
    // The removed upstream's stream ends cleanly (its last chunk), and so does its upstream
    // connection.
    let mut buf = Vec::new();
    read_until(&mut from_gone, &mut buf, "0\r\n\r\n");
    gone_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the upstream connection of the removed upstream is closed");
    // The other one is still open: nothing to read, no end.
    from_kept
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut b = [0u8; 1];
    let e = std::io::Read::read(&mut from_kept, &mut b).expect_err("nothing, and no end");
    assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
    assert!(kept_rx.try_recv().is_err());
    drop((from_gone, from_kept));
    gw.wait_all_closed();
}

#[test]
fn a_shorter_health_check_interval_applies_at_once() {
    let (probed_tx, probed_rx) = std::sync::mpsc::channel();
    let probed_tx = std::sync::Mutex::new(probed_tx);
    let up = Mock::start(move |req, s| {
        if req.header("user-agent") == Some("mcp-gateway-health") {
            let _ = probed_tx.lock().unwrap().send(());
        }
        json_reply(s, req, "{}", &[]);
    });
    let one = endpoints(&[("default", &[&up.url()])]);
    let gw = start_with("", &format!("{ROUTING}{one}"));
    // Started with an hour between checks: the reload's half second applies now, not in an hour.
    gw.reload("health_check_interval: 3600", "health_check_interval: 0.5");
    probed_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("a health check soon after the reload");
}

#[test]
fn a_websocket_session_stream_from_a_removed_upstream_ends_and_the_client_stays() {
    removed_upstreams_session_stream_ends(false);
}

#[test]
fn a_parked_websocket_session_stream_from_a_removed_upstream_ends_too() {
    removed_upstreams_session_stream_ends(true);
}

/// `parked`: the session parks (see tests/parking.rs) before the reload, its stream's listener
/// going on in its task; the client comes back from the lot for its next message.
fn removed_upstreams_session_stream_ends(parked: bool) {
    let (closed_tx, closed_rx) = std::sync::mpsc::channel();
    let (opened_tx, opened_rx) = std::sync::mpsc::channel();
    let opened_tx = std::sync::Mutex::new(opened_tx);
    let streaming = mock::stream_until_closed(closed_tx);
    let up = Mock::start(move |req, s| match req.method.as_str() {
        // The session's standalone stream: open until the gateway closes it.
        "GET" => {
            let _ = opened_tx.lock().unwrap().send(());
            streaming(req, s)
        }
        "DELETE" => respond(s, 200, &[], ""),
        _ => json_reply(s, req, r#"{"server":"gone"}"#, &[("Mcp-Session-Id", "S")]),
    });
    let both = endpoints(&[("default", &["builtin:echo"]), ("gone", &[&up.url()])]);
    let server = if parked { "read_timeout: 0.8" } else { "" };
    let gw = start_with(server, &format!("{ROUTING}{both}"));
    let (mut ws, server) = ws_initialized(&gw, "127.0.0.2", "gone");
    assert_eq!(server, "gone");
    // The session has an id: its standalone stream opens upstream (the mock's GET).
    opened_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the session's stream opened");
    if parked {
        gw.wait_metric("mcp_gateway_connections_parked", 1.0);
    }
    gw.reload(&both, &endpoints(&[("default", &["builtin:echo"])]));
    closed_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the removed upstream's session stream is closed at the reload");
    // The client's connection stays (still parked: its ping is answered from the lot).
    if parked {
        assert_eq!(gw.metric("mcp_gateway_connections_parked"), 1.0);
    }
    ws.write_all(&ws_frame(true, 9, b"here")).unwrap();
    assert_eq!(read_ws_frame(&mut ws), (10, b"here".to_vec()));
}

#[test]
fn a_removed_upstreams_pooled_connections_are_closed() {
    use std::io::{BufRead, BufReader, Read};
    // An upstream on one keep-alive connection at a time, which says when the gateway closes it.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    let (closed_tx, closed_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let mut r = BufReader::new(conn.try_clone().unwrap());
            let mut w = conn;
            loop {
                let mut len = 0;
                let mut line = String::new();
                while r.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                    line.clear();
                }
                if line != "\r\n" {
                    let _ = closed_tx.send(()); // EOF: the gateway closed it
                    break;
                }
                let mut body = vec![0; len];
                r.read_exact(&mut body).unwrap();
                let reply = r#"{"jsonrpc":"2.0","id":1,"result":{"server":"raw"}}"#;
                let _ = write!(
                    w,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{reply}",
                    reply.len()
                );
            }
        }
    });
    let one = endpoints(&[("default", &["builtin:echo"]), ("gone", &[&url])]);
    let gw = start_with("workers: 1", &format!("{ROUTING}{one}"));
    let mut c = connect_from("127.0.0.2", gw.http);
    let (status, _, _) = exchange(&mut c, "/mcp/gone", TOOLS_LIST, None);
    assert_eq!(status, 200);
    // The gateway keeps that upstream connection in its pool; the reload closes it.
    assert!(closed_rx.try_recv().is_err());
    gw.reload(&one, &endpoints(&[("default", &["builtin:echo"])]));
    closed_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the pooled connection to the removed upstream is closed");
}

#[test]
fn a_reload_of_weights_breaker_settings_and_max_in_flight_keeps_the_upstream() {
    // Every tools/call waits until the test lets it go; other requests are answered at once.
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let go_rx = std::sync::Mutex::new(go_rx);
    let up = Mock::start(move |req, s| {
        if req.body_str().contains("tools/call") {
            let _ = go_rx.lock().unwrap().recv_timeout(Duration::from_secs(10));
        }
        json_reply(s, req, "{}", &[]);
    });
    let url = up.url();
    let config = |cap: usize, failures: u32, weight: u32| {
        format!(
            "{ROUTING}  max_in_flight: {cap}\n  circuit_breaker:\n    failure_threshold: {failures}\n{}",
            endpoints(&[("default", &[&url])]).replacen(
                &format!("- url: {url}\n"),
                &format!("- url: {url}\n          weight: {weight}\n"),
                1
            )
        )
    };
    let before = config(2, 5, 1);
    let gw = start_with("workers: 1", &before);
    let series = |outcome: &str| {
        format!("mcp_gateway_upstream_requests_total{{namespace=\"default\",upstream=\"{url}\",outcome=\"{outcome}\"}}")
    };
    let in_flight =
        format!("mcp_gateway_upstream_in_flight{{namespace=\"default\",upstream=\"{url}\"}}");
    // A keep-alive client, and a call held by the upstream.
    let mut c = connect_from("127.0.0.2", gw.http);
    assert_eq!(roundtrip(&mut c, &post_mcp(INIT)).status, 200);
    let mut held = connect_from("127.0.0.3", gw.http);
    held.write_all(post_mcp(r#"{"jsonrpc":"2.0","id":2,"method":"tools/call"}"#).as_bytes())
        .unwrap();
    gw.wait_metric(&in_flight, 1.0);
    let pooled = up.connections();

    // One place of two taken; the limit goes down to one, the breaker's threshold and the
    // weight change too.
    gw.reload(&before, &config(1, 2, 4));
    gw.wait_log("upstreams reloaded");
    let log = gw.log.lock().unwrap().clone();
    assert!(
        log.contains("added= removed= changed=service_discovery.static.endpoints.default, routing.max_in_flight, routing.circuit_breaker.failure_threshold"),
        "{log}"
    );
    // The held call counts against the new limit: the next request is refused.
    let list = post_mcp(TOOLS_LIST);
    let r = roundtrip(&mut c, &list);
    assert_eq!(r.status, 503, "one in flight of one");
    go_tx.send(()).unwrap();
    let mut buf = Vec::new();
    assert_eq!(read_response(&mut held, &mut buf).unwrap().status, 200);
    gw.wait_metric(&in_flight, 0.0);
    // The same upstream: its pooled connection is used again, its counts go on.
    assert_eq!(roundtrip(&mut c, &list).status, 200);
    assert_eq!(up.connections(), pooled, "no new upstream connection");
    assert_eq!(
        gw.metric(&series("ok")),
        3.0,
        "initialize, the call, the list"
    );
    assert_eq!(gw.metric(&series("busy")), 1.0);
    drop((c, held));
    gw.wait_all_closed();
}

#[test]
fn a_renewed_ca_file_makes_a_new_upstream_and_its_sessions_stay_on_the_server() {
    // An https upstream that issues session `s1` and says which session each request was in.
    let ca = common::tls::Ca::new();
    let up = Mock::start_tls(ca.server_config(&["127.0.0.1"]), |req, s| {
        if req.body_str().contains("\"initialize\"") {
            json_reply(s, req, r#"{"session":"new"}"#, &[("Mcp-Session-Id", "s1")]);
        } else {
            let session = req.header("mcp-session-id").unwrap_or("none");
            json_reply(s, req, &format!(r#"{{"session":"{session}"}}"#), &[]);
        }
    });
    let url = up.https_url();
    let config = format!(
        "{ROUTING}{}          tls_ca_file: {}\n",
        endpoints(&[("default", &[&url])]).replace("#end\n", ""),
        ca.ca_file.display()
    );
    let gw = start_with("", &config);
    // A session on the HTTP door and one on an MCPB connection.
    let mut http = connect_from("127.0.0.2", gw.http);
    let r = roundtrip(&mut http, &post("/mcp", INIT, None));
    assert_eq!(r.status, 200);
    let id = r.header("mcp-session-id").unwrap().to_string();
    let mut mcpb = TcpStream::connect(gw.tcp.unwrap()).unwrap();
    mcpb.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    mcpb.write_all(&mcpb_frame(1, INIT.as_bytes())).unwrap();
    assert_eq!(read_mcpb(&mut mcpb).1["result"]["session"], "new");

    // The CA file renewed (now a bundle of the old CA and the next one): the upstream is made
    // anew, to trust what the file now says, and it is still the same server.
    let next = common::tls::Ca::new();
    let bundle = std::fs::read_to_string(&ca.ca_file).unwrap()
        + &std::fs::read_to_string(&next.ca_file).unwrap();
    std::fs::write(&ca.ca_file, bundle).unwrap();
    gw.reload(&config, &config);
    gw.wait_log(&format!("added=default {url} removed=default {url}"));
    // Both sessions go on there, through the new upstream's own TLS connections.
    let connections = up.connections();
    let r = roundtrip(&mut http, &post("/mcp", TOOLS_LIST, Some(&id)));
    assert_eq!(
        (r.status, r.json()["result"]["session"].as_str()),
        (200, Some("s1"))
    );
    mcpb.write_all(&mcpb_frame(1, TOOLS_LIST.as_bytes()))
        .unwrap();
    let (kind, reply) = read_mcpb(&mut mcpb);
    assert_eq!(
        (kind, reply["result"]["session"].as_str()),
        (2, Some("s1")),
        "{reply}"
    );
    assert!(
        up.connections() > connections,
        "the old upstream's pool is not used"
    );
    drop((http, mcpb));
    gw.wait_all_closed();
}
