//! Idle connections park outside their tasks (`server.park_idle_connections`) and come back
//! for their next request as if they had never left: answers, pipelining, limits, counts, idle
//! expiry and the drain, on both drivers; WebSocket and MCPB sessions with their upstream
//! session, which also brings them back to deliver what the upstream sends on its own.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{mpsc, Mutex};
use std::time::Duration;

use common::mock::*;
use common::*;

const PARKED: &str = "mcp_gateway_connections_parked";
const PARKS: &str = "mcp_gateway_connection_parks_total";

/// A request whose JSON-RPC id is `id`.
fn call(id: u32) -> String {
    post_mcp(&format!(
        r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/list"}}"#
    ))
}

/// Reads one response and checks it answers request `id`.
fn answered(s: &mut TcpStream, buf: &mut Vec<u8>, id: u32) {
    let r = read_response(s, buf).expect("a response");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["id"], id, "answers in order");
}

fn park_and_resume(driver: &str) {
    // read_timeout 0.8 s: the sweeper runs every 100 ms, so a connection parks within 300 ms.
    let gw = start(&format!(
        "driver: {driver}\nread_timeout: 0.8\nidle_timeout: 30\nmax_connections_per_ip: 5"
    ));
    assert!(gw
        .log
        .lock()
        .unwrap()
        .contains(&format!("driver=\"{driver}\"")));
    let mut clients: Vec<TcpStream> = Vec::new();
    for i in 0..40 {
        let from = format!("127.0.0.{}", 2 + i / 5);
        clients.push(connect_from(&from, gw.http));
    }
    clients.push(connect_from("::1", gw.http));
    clients.push(connect_from("::1", gw.http));
    let n = clients.len();
    let mut id = 0;
    for c in &mut clients {
        id += 1;
        c.write_all(call(id).as_bytes()).unwrap();
        answered(c, &mut Vec::new(), id);
    }
    gw.wait_metric(PARKED, n as f64);
    // Parked, they still count: the limiter holds their places.
    assert_eq!(gw.metric("mcp_gateway_connections_active"), n as f64);
    assert_eq!(
        gw.metric("mcp_gateway_frontend_connections_active{frontend=\"http\"}"),
        n as f64
    );
    assert_eq!(gw.metric("mcp_gateway_tracked_ips"), 9.0);
    let mut late = connect_from("127.0.0.2", gw.http);
    assert_eq!(
        roundtrip(&mut late, &call(1)).status,
        429,
        "the per-IP limit counts parked connections"
    );
    drop(late);
    // Each comes back for its next requests: one, two pipelined in one write, or one whose
    // head arrives in two writes.
    for (i, c) in clients.iter_mut().enumerate() {
        let mut buf = Vec::new();
        match i % 3 {
            0 => {
                c.write_all(call(100).as_bytes()).unwrap();
                answered(c, &mut buf, 100);
            }
            1 => {
                c.write_all((call(200) + &call(201)).as_bytes()).unwrap();
                answered(c, &mut buf, 200);
                answered(c, &mut buf, 201);
            }
            _ => {
                let req = call(300);
                let (a, b) = req.split_at(9);
                c.write_all(a.as_bytes()).unwrap();
                c.flush().unwrap();
                std::thread::sleep(Duration::from_millis(20));
                c.write_all(b.as_bytes()).unwrap();
                answered(c, &mut buf, 300);
            }
        }
    }
    // They park again, and parks were counted each time.
    gw.wait_metric(PARKED, n as f64);
    assert!(gw.metric(PARKS) >= 2.0 * n as f64);
    // Clients leave while parked (some with a reset), or after the first bytes of a request
    // brought them back (some with a reset): every place is given back.
    for (i, mut c) in clients.drain(..20).enumerate() {
        if i % 4 >= 2 {
            c.write_all(b"POST /mcp HTTP/1.1\r\nHost: t\r\n").unwrap();
        }
        if i % 2 == 0 {
            socket2::SockRef::from(&c)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
        }
    }
    gw.wait_metric("mcp_gateway_connections_active", (n - 20) as f64);
    gw.wait_metric(PARKED, (n - 20) as f64);
    drop(clients);
    gw.wait_all_closed();
    gw.wait_metric(PARKED, 0.0);
}

#[test]
fn idle_connections_park_and_come_back_for_their_next_requests() {
    park_and_resume("io_uring");
}

#[test]
fn idle_connections_park_on_the_epoll_driver_too() {
    park_and_resume("epoll");
}

#[test]
fn parked_connections_expire_after_idle_timeout_and_close_at_shutdown() {
    let mut gw = start("read_timeout: 0.8\nidle_timeout: 1.5\nshutdown_timeout: 30");
    let mut early: Vec<TcpStream> = (0..5).map(|_| connect_from("127.0.0.2", gw.http)).collect();
    for c in &mut early {
        assert_eq!(roundtrip(c, &call(1)).status, 200);
    }
    gw.wait_metric(PARKED, 5.0);
    for c in &mut early {
        assert!(closed_by_peer(c), "a parked connection expires when idle");
    }
    gw.wait_all_closed();
    gw.wait_metric(PARKED, 0.0);
    // The drain closes parked connections at once, not after shutdown_timeout.
    let mut late: Vec<TcpStream> = (0..5).map(|_| connect_from("127.0.0.3", gw.http)).collect();
    for c in &mut late {
        assert_eq!(roundtrip(c, &call(1)).status, 200);
    }
    gw.wait_metric(PARKED, 5.0);
    unsafe { libc::kill(gw.pid(), libc::SIGTERM) };
    for c in &mut late {
        assert!(closed_by_peer(c), "the drain closes a parked connection");
    }
    assert_eq!(gw.stop(0, Duration::from_secs(5)).code(), Some(0));
}

#[test]
fn connections_wait_in_their_tasks_when_parking_is_off() {
    let gw = start("read_timeout: 0.8\nidle_timeout: 0.6\npark_idle_connections: false");
    let mut c = connect_from("127.0.0.2", gw.http);
    assert_eq!(roundtrip(&mut c, &call(1)).status, 200);
    // Expired by the sweeper after several sweeps: none of them parked it.
    assert!(closed_by_peer(&mut c));
    assert_eq!(gw.metric(PARKS), 0.0);
    gw.wait_all_closed();
}

/// `server.park_idle_connections` reloads: turned off, no connection parks from then on (a
/// parked one stays, and comes back as ever); turned on, connections already waiting park too.
#[test]
fn a_reload_turns_parking_off_and_on() {
    let gw = start("read_timeout: 0.8\nidle_timeout: 30\npark_idle_connections: true");
    let mut parked = connect_from("127.0.0.2", gw.http);
    assert_eq!(roundtrip(&mut parked, &call(1)).status, 200);
    gw.wait_metric(PARKS, 1.0);
    gw.wait_metric(PARKED, 1.0);

    gw.reload(
        "park_idle_connections: true",
        "park_idle_connections: false",
    );
    assert!(gw
        .log
        .lock()
        .unwrap()
        .contains("idle connections park no more"));
    // Idle for 1 s from now on: a connection that goes idle is expired by the sweeper after
    // many sweeps, none of which parked it.
    gw.reload("idle_timeout: 30", "idle_timeout: 1");
    let mut waits = connect_from("127.0.0.3", gw.http);
    assert_eq!(roundtrip(&mut waits, &call(2)).status, 200);
    assert!(closed_by_peer(&mut waits));
    assert_eq!(gw.metric(PARKS), 1.0);
    // The one parked before the reload is still parked (its deadline is 30 s), and comes back.
    assert_eq!(gw.metric(PARKED), 1.0);
    assert_eq!(roundtrip(&mut parked, &call(3)).status, 200);
    gw.wait_metric(PARKED, 0.0);
    // Back in its task, it is expired there too, unparked.
    assert!(closed_by_peer(&mut parked));
    assert_eq!(gw.metric(PARKS), 1.0);

    // A connection that went idle while parking was off parks once a reload turns it on.
    gw.reload("idle_timeout: 1", "idle_timeout: 30");
    let mut later = connect_from("127.0.0.4", gw.http);
    assert_eq!(roundtrip(&mut later, &call(4)).status, 200);
    gw.reload(
        "park_idle_connections: false",
        "park_idle_connections: true",
    );
    gw.wait_metric(PARKS, 2.0);
    gw.wait_metric(PARKED, 1.0);
    assert_eq!(roundtrip(&mut later, &call(5)).status, 200);
    assert!(!gw.log.lock().unwrap().contains("after_restart"));
    drop(later);
    gw.wait_all_closed();
}

/// Sets the open-file limit (soft and hard) of the running process `pid`.
fn set_nofile(pid: i32, n: usize) {
    let limit = libc::rlimit {
        rlim_cur: n as u64,
        rlim_max: n as u64,
    };
    // SAFETY: a plain system call on our own child; `limit` is read during the call only.
    let r = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &limit, std::ptr::null_mut()) };
    assert_eq!(r, 0, "prlimit: {}", std::io::Error::last_os_error());
}

#[test]
fn at_its_descriptor_limit_the_gateway_keeps_idle_connections_it_cannot_park() {
    let gw = start("read_timeout: 0.8\nidle_timeout: 30");
    // The descriptors the gateway holds at rest (listeners, rings, epoll sets, admin, stdio),
    // once a request went through; then room for the clients and 6 more, so that the
    // duplicates parking needs run out while the sweeper asks them all.
    let mut probe = connect_from("127.0.0.3", gw.http);
    assert_eq!(roundtrip(&mut probe, &call(1)).status, 200);
    drop(probe);
    gw.wait_all_closed();
    let at_rest = std::fs::read_dir(format!("/proc/{}/fd", gw.pid()))
        .unwrap()
        .count();
    let clients = 20;
    set_nofile(gw.pid(), at_rest + clients + 6);
    let mut conns: Vec<TcpStream> = (0..clients)
        .map(|_| connect_from("127.0.0.2", gw.http))
        .collect();
    for (i, c) in conns.iter_mut().enumerate() {
        c.write_all(call(i as u32).as_bytes()).unwrap();
        answered(c, &mut Vec::new(), i as u32);
    }
    gw.wait_log("idle connections cannot park now");
    // None was closed for it: each answers its next request, parked or not.
    for (i, c) in conns.iter_mut().enumerate() {
        let id = 100 + i as u32;
        c.write_all(call(id).as_bytes()).unwrap();
        answered(c, &mut Vec::new(), id);
    }
    assert!(gw.metric(PARKS) > 0.0, "some parked within the descriptors");
    drop(conns);
    gw.wait_all_closed();
    gw.wait_metric(PARKED, 0.0);
}

const PING: &str = r#"{"jsonrpc":"2.0","id":7,"method":"ping"}"#;

/// An upstream MCP server: every `POST` answered (in session `id`); each standalone stream
/// (`GET`) sends a numbered notification naming `id` each time `events` is told `true`, ends
/// (its last chunk) when told `false`, and reports on `gone` when the gateway drops it (it looks
/// every 20 ms, for 30 s at most).
fn upstream(id: &'static str, events: mpsc::Receiver<bool>, gone: mpsc::Sender<()>) -> Mock {
    let (events, gone) = (Mutex::new(events), Mutex::new(gone));
    Mock::start(move |req, s| match req.method.as_str() {
        "GET" => {
            let _ = s.write_all(SSE_HEAD);
            s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
            let (mut n, mut b) = (0, [0u8; 16]);
            for _ in 0..1500 {
                match events.lock().unwrap().try_recv() {
                    Ok(true) => {
                        chunk(s, &format!("data: {{\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\",\"params\":{{\"data\":\"{id}\",\"n\":{n}}}}}\n\n"));
                        n += 1;
                    }
                    Ok(false) => {
                        let _ = s.write_all(b"0\r\n\r\n");
                        // The connection may serve the gateway's next request: the mock's
                        // loop reads it without a deadline.
                        s.set_read_timeout(None).unwrap();
                        return;
                    }
                    Err(_) => {}
                }
                match s.read(&mut b) {
                    Ok(0) => {
                        let _ = gone.lock().unwrap().send(());
                        return;
                    }
                    Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => return,
                    _ => {}
                }
            }
        }
        "DELETE" => respond(s, 200, &[], ""),
        _ => json_reply(s, req, "{}", &[("Mcp-Session-Id", id)]),
    })
}

/// MCPB's namespace (`default`) on `default`, namespace `ws` on `other`, and `echo` answered
/// by `builtin:echo`.
fn routed(default: &Mock, other: &Mock) -> String {
    format!(
        "routing:\n  health_check_interval: 3600\n  request_timeout: 2\nservice_discovery:\n  static:\n    endpoints:\n      default:\n        - url: {}\n      ws:\n        - url: {}\n      echo:\n        - url: builtin:echo\n",
        default.url(),
        other.url()
    )
}

/// A WebSocket connection upgraded on `path`.
fn ws_client(gw: &Gateway, from: &str, path: &str) -> TcpStream {
    let mut ws = connect_from(from, gw.http);
    ws.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let r = roundtrip(&mut ws, &WS_UPGRADE.replacen("/mcp", path, 1));
    assert_eq!(r.status, 101);
    ws
}

/// The JSON-RPC message of the next text frame.
fn ws_message(ws: &mut TcpStream) -> serde_json::Value {
    let (opcode, payload) = read_ws_frame(ws);
    assert_eq!(opcode, 1, "a text frame");
    serde_json::from_slice(&payload).unwrap()
}

#[test]
fn idle_message_sessions_park_and_come_back_for_either_side() {
    sessions_park_and_resume("io_uring");
}

#[test]
fn idle_message_sessions_park_on_the_epoll_driver_too() {
    sessions_park_and_resume("epoll");
}

fn sessions_park_and_resume(driver: &str) {
    let (mcpb_notify, mcpb_notified) = mpsc::channel();
    let (ws_notify, ws_notified) = mpsc::channel();
    let (gone_tx, gone) = mpsc::channel();
    let mcpb_up = upstream("M1", mcpb_notified, gone_tx.clone());
    let ws_up = upstream("W1", ws_notified, gone_tx);
    let gw = start_with(
        &format!("driver: {driver}\nread_timeout: 0.8\nidle_timeout: 30"),
        &routed(&mcpb_up, &ws_up),
    );
    assert!(gw
        .log
        .lock()
        .unwrap()
        .contains(&format!("driver=\"{driver}\"")));
    // A WebSocket client in the middle of a fragmented message never parks: it became idle
    // first, so any sweep that parks the others would have parked it too.
    let mut fragmented = ws_client(&gw, "127.0.0.4", "/mcp/echo");
    let (first, rest) = PING.split_at(10);
    fragmented
        .write_all(&ws_frame(false, 1, first.as_bytes()))
        .unwrap();
    let mut mcpb = TcpStream::connect(gw.tcp.unwrap()).unwrap();
    mcpb.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    mcpb.write_all(&mcpb_frame(1, INIT.as_bytes())).unwrap();
    assert_eq!(read_mcpb(&mut mcpb).0, 2);
    let mut ws = ws_client(&gw, "127.0.0.2", "/mcp/ws");
    ws.write_all(&ws_frame(true, 1, INIT.as_bytes())).unwrap();
    assert_eq!(ws_message(&mut ws)["id"], 0);
    gw.wait_metric(PARKED, 2.0);
    let parks = gw.metric(PARKS);
    // Parked, they still count on their doors.
    assert_eq!(
        gw.metric("mcp_gateway_frontend_connections_active{frontend=\"websocket\"}"),
        2.0
    );
    assert_eq!(gw.metric("mcp_gateway_tcp_connections_active"), 1.0);
    assert_eq!(
        gw.metric(PARKED),
        2.0,
        "the fragmented message's connection waits in its task"
    );
    fragmented
        .write_all(&ws_frame(true, 0, rest.as_bytes()))
        .unwrap();
    assert_eq!(ws_message(&mut fragmented)["id"], 7);
    // What the upstream sends on its own brings a parked session back to its client, twice
    // (it parks again in between).
    for round in 0..2 {
        mcpb_notify.send(true).unwrap();
        let (kind, n) = read_mcpb(&mut mcpb);
        assert_eq!((kind, n["params"]["data"].clone()), (2, "M1".into()));
        ws_notify.send(true).unwrap();
        assert_eq!(ws_message(&mut ws)["params"]["data"], "W1");
        gw.wait_metric(PARKED, 3.0);
        assert!(gw.metric(PARKS) >= parks + 2.0 * (round + 1) as f64);
    }
    // So does the client's next message: answered within the session.
    mcpb.write_all(&mcpb_frame(1, PING.as_bytes())).unwrap();
    assert_eq!(read_mcpb(&mut mcpb).1["id"], 7);
    ws.write_all(&ws_frame(true, 1, PING.as_bytes())).unwrap();
    assert_eq!(ws_message(&mut ws)["id"], 7);
    gw.wait_metric(PARKED, 3.0);
    // Clients that leave while parked end their sessions' streams, and every place is given
    // back (one with a reset).
    socket2::SockRef::from(&ws)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop((ws, mcpb, fragmented));
    for _ in 0..2 {
        gone.recv_timeout(Duration::from_secs(10))
            .expect("a session stream closed when its client left");
    }
    gw.wait_all_closed();
    gw.wait_metric(PARKED, 0.0);
}

#[test]
fn parked_message_sessions_expire_and_drain_with_the_close_they_are_owed() {
    let mut gw = start("read_timeout: 0.8\nidle_timeout: 1.5\nshutdown_timeout: 30");
    let mut ws = ws_client(&gw, "127.0.0.2", "/mcp");
    ws.write_all(&ws_frame(true, 1, PING.as_bytes())).unwrap();
    assert_eq!(ws_message(&mut ws)["id"], 7);
    let mut mcpb = TcpStream::connect(gw.tcp.unwrap()).unwrap();
    mcpb.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    mcpb.write_all(&mcpb_frame(1, PING.as_bytes())).unwrap();
    assert_eq!(read_mcpb(&mut mcpb).1["id"], 7);
    gw.wait_metric(PARKED, 2.0);
    // Idle past idle_timeout: the WebSocket client gets its close frame, as in its task.
    let (opcode, payload) = read_ws_frame(&mut ws);
    assert_eq!((opcode, &payload[..2]), (8, &1001u16.to_be_bytes()[..]));
    assert_eq!(&payload[2..], b"idle timeout");
    assert!(
        closed_by_peer(&mut mcpb),
        "a parked MCPB connection expires"
    );
    gw.wait_all_closed();
    gw.wait_metric(PARKED, 0.0);
    // The drain closes a parked WebSocket connection at once, with its close frame.
    let mut late = ws_client(&gw, "127.0.0.3", "/mcp");
    late.write_all(&ws_frame(true, 1, PING.as_bytes())).unwrap();
    assert_eq!(ws_message(&mut late)["id"], 7);
    gw.wait_metric(PARKED, 1.0);
    unsafe { libc::kill(gw.pid(), libc::SIGTERM) };
    let (opcode, payload) = read_ws_frame(&mut late);
    assert_eq!((opcode, &payload[2..]), (8, &b"gateway shutting down"[..]));
    late.write_all(&ws_frame(true, 8, &payload[..2])).unwrap();
    assert_eq!(gw.stop(0, Duration::from_secs(5)).code(), Some(0));
}

const STREAM: &str = "GET /mcp HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n";

/// Reads from `s` until `needle` has arrived (the read timeout bounds the wait).
fn read_until(s: &mut TcpStream, needle: &str) {
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    while !String::from_utf8_lossy(&got).contains(needle) {
        match s.read(&mut chunk) {
            Ok(n) if n > 0 => got.extend_from_slice(&chunk[..n]),
            other => panic!(
                "{other:?} before {needle:?}: {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
}

#[test]
fn open_event_streams_park_between_events_and_come_back_for_each() {
    streams_park_and_resume("io_uring");
}

#[test]
fn open_event_streams_park_on_the_epoll_driver_too() {
    streams_park_and_resume("epoll");
}

fn streams_park_and_resume(driver: &str) {
    let (events, events_rx) = mpsc::channel();
    let (gone_tx, gone) = mpsc::channel();
    let up = upstream("S1", events_rx, gone_tx);
    let mut gw = start_with(
        &format!("driver: {driver}\nread_timeout: 0.8\nidle_timeout: 30\nshutdown_timeout: 30"),
        &format!(
            "routing:\n  health_check_interval: 3600\nservice_discovery:\n  static:\n    endpoints:\n      default:\n        - url: {}\n",
            up.url()
        ),
    );
    let open = |from: &str| {
        let mut c = connect_from(from, gw.http);
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(STREAM.as_bytes()).unwrap();
        read_until(&mut c, "text/event-stream");
        c
    };
    let mut c = open("127.0.0.2");
    gw.wait_metric(PARKED, 1.0);
    let parks = gw.metric(PARKS);
    // Still in flight to its upstream while parked.
    let in_flight = format!(
        "mcp_gateway_upstream_in_flight{{namespace=\"default\",upstream=\"{}\"}}",
        up.url()
    );
    assert_eq!(gw.metric(&in_flight), 1.0);
    // Each event brings it back to be relayed, and it parks again after.
    for n in 0..3 {
        events.send(true).unwrap();
        read_until(&mut c, &format!("\"n\":{n}}}"));
        gw.wait_metric(PARKED, 1.0);
        assert!(gw.metric(PARKS) >= parks + (n + 1) as f64);
    }
    // The upstream ends the stream while it is parked: the client gets the end, and its
    // connection serves its next request.
    events.send(false).unwrap();
    read_until(&mut c, "0\r\n\r\n");
    // Its next request may take idle_timeout (30 s) to come, not read_timeout (0.8 s, which
    // the sweeper enforces within a 100 ms tick): it has served one.
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(roundtrip(&mut c, &post_mcp(TOOLS_LIST)).status, 200);
    gw.wait_metric(&in_flight, 0.0);
    // A client that leaves while its stream is parked ends the stream upstream.
    let second = open("127.0.0.3");
    gw.wait_metric(PARKED, 2.0); // the first connection, idle, parked too
    socket2::SockRef::from(&second)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(second);
    gone.recv_timeout(Duration::from_secs(10))
        .expect("the stream closed upstream when its client left");
    gw.wait_metric(&in_flight, 0.0);
    gw.wait_metric(PARKED, 1.0);
    // The drain ends a parked stream with its last chunk.
    let mut third = open("127.0.0.4");
    gw.wait_metric(PARKED, 2.0);
    drop(c);
    unsafe { libc::kill(gw.pid(), libc::SIGTERM) };
    read_until(&mut third, "0\r\n\r\n");
    assert_eq!(gw.stop(0, Duration::from_secs(5)).code(), Some(0));
}
