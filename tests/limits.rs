//! Connection limits, end to end: the real binary, clients bound to 127.0.0.x and ::1.

mod common;

use common::*;
use std::io::{Read, Write};

fn assert_rejected(r: &Response, status: u16) {
    assert_eq!(r.status, status);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    assert_eq!(v["jsonrpc"], "2.0");
    assert_eq!(v["id"], serde_json::Value::Null);
    assert_eq!(v["error"]["code"], -32000);
}

#[test]
fn per_ip_limit_rejects_that_ip_only_and_frees_on_close() {
    let gw = start("max_connections_per_ip: 3");
    let mut held: Vec<_> = (0..3).map(|_| connect_from("127.0.0.2", gw.http)).collect();
    for s in &mut held {
        assert_eq!(roundtrip(s, &post_mcp(TOOLS_LIST)).status, 200);
    }
    let mut fourth = connect_from("127.0.0.2", gw.http);
    assert_rejected(&roundtrip(&mut fourth, &post_mcp(TOOLS_LIST)), 429);
    assert!(closed_by_peer(&mut fourth));

    let mut other = connect_from("127.0.0.3", gw.http);
    assert_eq!(roundtrip(&mut other, &post_mcp(TOOLS_LIST)).status, 200);
    assert_eq!(
        gw.metric("mcp_gateway_connections_rejected_total{frontend=\"http\",reason=\"per_ip\"}"),
        1.0
    );
    assert_eq!(gw.metric("mcp_gateway_tracked_ips"), 2.0);

    // Closing one of the three frees its place.
    drop(held.pop());
    gw.wait_metric("mcp_gateway_connections_active", 3.0);
    let mut again = connect_from("127.0.0.2", gw.http);
    assert_eq!(roundtrip(&mut again, &post_mcp(TOOLS_LIST)).status, 200);

    drop((held, again, other, fourth));
    gw.wait_all_closed();
}

#[test]
fn global_limit_rejects_everyone_on_every_door() {
    let gw = start("max_connections: 4\nmax_connections_per_ip: 0");
    let mut held = Vec::new();
    for ip in ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"] {
        let mut s = connect_from(ip, gw.http);
        assert_eq!(roundtrip(&mut s, &post_mcp(TOOLS_LIST)).status, 200);
        held.push(s);
    }
    let mut late = connect_from("127.0.0.9", gw.http);
    assert_rejected(&roundtrip(&mut late, &post_mcp(TOOLS_LIST)), 503);

    // The TCP door at the limit closes at once: nothing written.
    let mut tcp = connect_from("127.0.0.9", gw.tcp.unwrap());
    let mut b = [0u8; 16];
    let n = tcp.read(&mut b).unwrap_or(0);
    assert_eq!(n, 0, "a rejected TCP client reads nothing");
    gw.wait_metric(
        "mcp_gateway_connections_rejected_total{frontend=\"tcp\",reason=\"global\"}",
        1.0,
    );
    assert_eq!(
        gw.metric("mcp_gateway_connections_rejected_total{frontend=\"http\",reason=\"global\"}"),
        1.0
    );
    assert_eq!(gw.metric("mcp_gateway_connections_active"), 4.0);

    drop(held.pop());
    gw.wait_metric("mcp_gateway_connections_active", 3.0);
    let mut s = connect_from("127.0.0.9", gw.http);
    assert_eq!(roundtrip(&mut s, &post_mcp(TOOLS_LIST)).status, 200);
    drop((held, s));
    gw.wait_all_closed();
}

/// Opens `n` connections, connection `i` from address `from(i)`, each admitted with its first
/// request answered 200; then one more, from `from(n)`, must be refused with `refused`.
fn fill_to_the_limit(
    gw: &Gateway,
    n: usize,
    from: impl Fn(usize) -> String,
    refused: u16,
    what: &str,
) -> Vec<std::net::TcpStream> {
    let open = |i: usize| {
        let mut c = connect_from(&from(i), gw.http);
        let status = roundtrip(&mut c, &post_mcp(TOOLS_LIST)).status;
        (c, status)
    };
    let held = (0..n)
        .map(|i| {
            let (c, status) = open(i);
            assert_eq!(status, 200, "{what}: connection {i}");
            c
        })
        .collect();
    assert_eq!(open(n).1, refused, "{what}: the one over the limit");
    held
}

#[test]
fn the_global_limit_stays_exact_while_closed_places_wait_on_the_workers() {
    // A closed connection's place waits in its worker's reserve for that worker's next one;
    // whichever of the two workers accepts the next connections must still find every free
    // place, and a lowered limit must take the reserved places back.
    let gw = start("max_connections: 8\nmax_connections_per_ip: 0");
    let from = |i: usize| format!("127.0.1.{}", 2 + i);
    for round in 0..5 {
        drop(fill_to_the_limit(
            &gw,
            8,
            from,
            503,
            &format!("round {round}"),
        ));
        gw.wait_metric("mcp_gateway_connections_active", 0.0);
    }
    gw.reload("max_connections: 8", "max_connections: 3");
    drop(fill_to_the_limit(&gw, 3, from, 503, "the lowered limit"));
    gw.wait_all_closed();
}

#[test]
fn the_per_ip_limit_stays_exact_while_closed_places_wait_on_the_workers() {
    // A closed connection of an address with others open leaves its place in its worker's
    // reserve for the address's next connection there; whichever worker accepts the next
    // connections must still find every free place (taking them back from the other's
    // reserve at the limit), the gauge of tracked addresses must not count reserved places,
    // and a lowered limit must hold whatever the reserves keep.
    let gw = start("max_connections_per_ip: 8");
    let from = |_| "127.0.0.2".to_string();
    for round in 0..6 {
        let held = fill_to_the_limit(&gw, 8, from, 429, &format!("round {round}"));
        assert_eq!(gw.metric("mcp_gateway_tracked_ips"), 1.0);
        drop(held);
        gw.wait_metric("mcp_gateway_connections_active", 0.0);
        assert_eq!(gw.metric("mcp_gateway_tracked_ips"), 0.0, "round {round}");
    }
    gw.reload("max_connections_per_ip: 8", "max_connections_per_ip: 3");
    drop(fill_to_the_limit(&gw, 3, from, 429, "the lowered limit"));
    // With the places the reserves kept given back on the sweepers' next tick, the table is
    // empty again.
    gw.wait_all_closed();
}

/// `max_new_connections_per_ip`: an address that opens connections faster than its rate (here
/// a burst of three, then one a second) is refused at accept, on every door, whether its
/// earlier connections are still open or closed at once; its open connections go on, and other
/// addresses, and those of an override network, are not refused. Nothing of the refused ones
/// stays counted. Admissions are checked against what the rate allows for the time the test
/// took, so a slow machine cannot make it flaky.
#[test]
fn an_address_opening_connections_too_fast_is_refused_on_every_door() {
    let gw = start(
        "max_new_connections_per_ip: 1\n  new_connection_burst_per_ip: 3\n  per_ip_overrides:\n    - {network: 127.0.0.9, max_connections_per_ip: 100}",
    );
    let started = std::time::Instant::now();
    let (mut kept, mut refused) = (Vec::new(), [0.0, 0.0]);
    for i in 0..10 {
        if i % 5 == 4 {
            // MCPB: a ping frame is answered, or the connection is closed at once.
            let mut tcp = connect_from("127.0.0.2", gw.tcp.unwrap());
            tcp.write_all(&[b'M', b'C', b'P', b'B', 0, 1, 0, 4, 0, 0, 0, 0])
                .unwrap();
            let mut hdr = [0u8; 12];
            match tcp.read_exact(&mut hdr) {
                Ok(()) => kept.push(tcp),
                Err(_) => refused[1] += 1.0,
            }
            continue;
        }
        let mut c = connect_from("127.0.0.2", gw.http);
        let r = roundtrip(&mut c, &post_mcp(TOOLS_LIST));
        if r.status == 200 {
            if i % 2 == 0 {
                kept.push(c); // open or closed at once: either takes from the allowance
            }
            continue;
        }
        assert_rejected(&r, 429);
        let why = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(why.contains("max_new_connections_per_ip"), "{why}");
        refused[0] += 1.0;
    }
    let allowed = 3.0 + started.elapsed().as_secs_f64().ceil();
    let admitted = 10.0 - refused[0] - refused[1];
    assert!(
        (3.0..=allowed).contains(&admitted),
        "{admitted} admitted, {allowed} allowed"
    );
    for (frontend, n) in [("http", refused[0]), ("tcp", refused[1])] {
        let sample = format!("mcp_gateway_connections_rejected_total{{frontend=\"{frontend}\",reason=\"connection_rate\"}}");
        assert_eq!(gw.metric(&sample), n, "{sample}");
    }
    // Its open connections go on; other addresses, and an override network's, are not refused.
    let mut http_kept = kept.swap_remove(0);
    assert_eq!(roundtrip(&mut http_kept, &post_mcp(TOOLS_LIST)).status, 200);
    for ip in [
        "127.0.0.3",
        "127.0.0.3",
        "127.0.0.3",
        "127.0.0.9",
        "127.0.0.9",
    ]
    .into_iter()
    .chain(["127.0.0.9"; 6])
    {
        let mut c = connect_from(ip, gw.http);
        assert_eq!(roundtrip(&mut c, &post_mcp(TOOLS_LIST)).status, 200, "{ip}");
    }
    drop((kept, http_kept));
    gw.wait_all_closed();
    assert_eq!(gw.metric("mcp_gateway_tracked_ips"), 0.0);
}

#[test]
fn doors_share_one_per_ip_count() {
    let gw = start("max_connections_per_ip: 3");
    // One HTTP, one WebSocket (upgraded), one MCPB connection from the same address.
    let mut http = connect_from("127.0.0.7", gw.http);
    assert_eq!(roundtrip(&mut http, &post_mcp(TOOLS_LIST)).status, 200);
    let mut ws = connect_from("127.0.0.7", gw.http);
    let up = roundtrip(&mut ws, WS_UPGRADE);
    assert_eq!(up.status, 101);
    let mut tcp = connect_from("127.0.0.7", gw.tcp.unwrap());
    tcp.write_all(&[b'M', b'C', b'P', b'B', 0, 1, 0, 4, 0, 0, 0, 0])
        .unwrap();
    let mut hdr = [0u8; 12];
    tcp.read_exact(&mut hdr).unwrap();
    assert_eq!(&hdr[..4], b"MCPB");
    gw.wait_metric(
        "mcp_gateway_frontend_connections_active{frontend=\"websocket\"}",
        1.0,
    );
    assert_eq!(
        gw.metric("mcp_gateway_frontend_connections_active{frontend=\"http\"}"),
        1.0
    );
    assert_eq!(gw.metric("mcp_gateway_tcp_connections_active"), 1.0);

    // A fourth on either door is refused.
    let mut tcp2 = connect_from("127.0.0.7", gw.tcp.unwrap());
    assert!(closed_by_peer(&mut tcp2));
    let mut http2 = connect_from("127.0.0.7", gw.http);
    assert_rejected(&roundtrip(&mut http2, &post_mcp(TOOLS_LIST)), 429);

    drop((http, ws, tcp, tcp2, http2));
    gw.wait_all_closed();
}

#[test]
fn ipv6_clients_and_ipv4_mapped_addresses() {
    let gw = start("max_connections_per_ip: 1");
    let mut v6 = connect_from("::1", gw.http);
    assert_eq!(roundtrip(&mut v6, &post_mcp(TOOLS_LIST)).status, 200);
    let mut v6b = connect_from("::1", gw.http);
    assert_rejected(&roundtrip(&mut v6b, &post_mcp(TOOLS_LIST)), 429);

    // The listener is dual-stack: an IPv4 client arrives as ::ffff:127.0.0.8 and is counted
    // as 127.0.0.8 (one key, limit 1), separately from ::1.
    let mut v4 = connect_from("127.0.0.8", gw.http);
    assert_eq!(roundtrip(&mut v4, &post_mcp(TOOLS_LIST)).status, 200);
    let mut v4b = connect_from("127.0.0.8", gw.http);
    assert_rejected(&roundtrip(&mut v4b, &post_mcp(TOOLS_LIST)), 429);
    assert_eq!(gw.metric("mcp_gateway_tracked_ips"), 2.0);
    drop((v6, v6b, v4, v4b));
    gw.wait_all_closed();
}

#[test]
fn rejected_client_gets_its_status_even_when_it_writes_late() {
    // The gateway waits (bounded) for the head before answering, so a client that connects and
    // only then writes still reads a 429 rather than a reset.
    let gw = start("max_connections_per_ip: 1");
    let mut first = connect_from("127.0.0.4", gw.http);
    assert_eq!(roundtrip(&mut first, &post_mcp(TOOLS_LIST)).status, 200);
    let mut second = connect_from("127.0.0.4", gw.http);
    gw.wait_metric(
        "mcp_gateway_connections_rejected_total{frontend=\"http\",reason=\"per_ip\"}",
        1.0,
    );
    assert_rejected(&roundtrip(&mut second, &post_mcp(TOOLS_LIST)), 429);
}

/// A refused client whose request came whole is closed right after its answer; one whose body
/// is still coming is read to the end (its late bytes are taken, not answered with a reset that
/// could destroy the answer before it is read).
#[test]
fn a_refused_client_still_sending_its_body_is_read_not_reset() {
    let gw = start("max_connections_per_ip: 1");
    let mut first = connect_from("127.0.0.4", gw.http);
    assert_eq!(roundtrip(&mut first, &post_mcp(TOOLS_LIST)).status, 200);
    let body = "x".repeat(3000);
    let head = post_mcp_head(body.len());
    for whole in [false, true] {
        let mut s = connect_from("127.0.0.4", gw.http);
        let sent = if whole { body.len() } else { 100 };
        s.write_all(format!("{head}{}", &body[..sent]).as_bytes())
            .unwrap();
        let r = read_response(&mut s, &mut Vec::new()).expect("an answer");
        assert_rejected(&r, 429);
        // Late bytes: the rest of the body, or (for the whole one) a request it should not send.
        let late = if whole { TOOLS_LIST } else { &body[sent..] };
        let mut refused = false;
        for piece in late.as_bytes().chunks(late.len() / 2 + 1) {
            std::thread::sleep(std::time::Duration::from_millis(50));
            refused |= s.write_all(piece).is_err();
        }
        assert_eq!(
            refused,
            whole,
            "late bytes are {} (whole request: {whole})",
            if refused { "refused" } else { "taken" }
        );
    }
}

/// `server.per_ip_overrides`: a network gets its own per-IP limit (first match wins), everyone
/// else keeps the default, and the log names how many overrides are in force.
#[test]
fn a_network_can_have_a_per_ip_limit_of_its_own() {
    let gw = start(
        "max_connections_per_ip: 1\n  per_ip_overrides:\n    - {network: 127.0.0.2/32, max_connections_per_ip: 3}\n    - {network: 127.0.0.0/8, max_connections_per_ip: 2}",
    );
    assert!(gw.log.lock().unwrap().contains("per_ip_overrides=2"));
    let mut held = Vec::new();
    for (ip, admitted) in [("127.0.0.2", 3), ("127.0.0.3", 2), ("::1", 1)] {
        for _ in 0..admitted {
            let mut c = connect_from(ip, gw.http);
            assert_eq!(roundtrip(&mut c, &post_mcp(TOOLS_LIST)).status, 200, "{ip}");
            held.push(c);
        }
        let mut over = connect_from(ip, gw.http);
        assert_rejected(&roundtrip(&mut over, &post_mcp(TOOLS_LIST)), 429);
    }
    drop(held);
    gw.wait_all_closed();
}

/// A `per_ip_overrides` entry can set its network's request rate (0: none) apart from the
/// default `server.max_requests_per_ip`.
#[test]
fn a_network_can_have_a_request_rate_of_its_own() {
    let gw = start(
        "max_connections_per_ip: 10\n  max_requests_per_ip: 1\n  request_burst_per_ip: 1\n  per_ip_overrides:\n    - {network: 127.0.0.2, max_connections_per_ip: 10, max_requests_per_ip: 0}",
    );
    let started = std::time::Instant::now();
    let mut free = connect_from("127.0.0.2", gw.http);
    for _ in 0..20 {
        assert_eq!(roundtrip(&mut free, &post_mcp(TOOLS_LIST)).status, 200);
    }
    let mut limited = connect_from("127.0.0.3", gw.http);
    let ok = (0..20)
        .filter(|_| roundtrip(&mut limited, &post_mcp(TOOLS_LIST)).status == 200)
        .count() as f64;
    assert!(
        ok >= 1.0 && ok <= 1.0 + started.elapsed().as_secs_f64().ceil(),
        "{ok}"
    );
    drop((free, limited));
    gw.wait_all_closed();
}

/// `server.max_requests_per_ip`: requests over the rate get 429 (HTTP) or a JSON-RPC error for
/// their id (WebSocket, MCPB) and the connection stays usable; the rate is per address over all
/// its connections and doors, a new connection buys no new burst, and other addresses are not
/// touched. Admitted counts are checked against what GCRA allows for the time the test took
/// (`burst + elapsed * rate`), so a slow machine cannot make the test flaky.
#[test]
fn request_rate_per_ip_refuses_the_excess_on_every_door() {
    let (rate, burst) = (1.0, 3.0);
    let gw =
        start("max_connections_per_ip: 10\n  max_requests_per_ip: 1\n  request_burst_per_ip: 3");
    let started = std::time::Instant::now();
    let allowed = || burst + (started.elapsed().as_secs_f64() * rate).ceil();

    // HTTP: ten on one keep-alive connection, then on a second connection of the same address.
    let mut conns = [
        connect_from("127.0.0.2", gw.http),
        connect_from("127.0.0.2", gw.http),
    ];
    let (mut ok, mut refused) = (0.0, 0.0);
    for i in 0..8 {
        let r = roundtrip(&mut conns[i / 5], &post_mcp(TOOLS_LIST));
        match r.status {
            200 => ok += 1.0,
            429 => {
                refused += 1.0;
                assert_eq!(r.header("retry-after"), Some("1"));
                assert_eq!(r.header("connection"), None, "the connection is kept");
                assert_eq!(r.json()["error"]["code"], -32000);
                let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
                assert!(msg.contains("max_requests_per_ip"), "{msg}");
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(ok >= burst && ok <= allowed(), "{ok} admitted");
    assert!(refused >= 1.0);
    // Another address has its own allowance.
    let mut other = connect_from("127.0.0.3", gw.http);
    assert_eq!(roundtrip(&mut other, &post_mcp(TOOLS_LIST)).status, 200);

    // WebSocket: a refused message gets an error with its id; the connection goes on.
    let mut ws = connect_from("127.0.0.4", gw.http);
    assert_eq!(roundtrip(&mut ws, WS_UPGRADE).status, 101);
    let (mut ws_ok, mut ws_refused) = (0.0, 0.0);
    for id in 1..=6 {
        let msg = format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/list"}}"#);
        ws.write_all(&ws_frame(true, 1, msg.as_bytes())).unwrap();
        let (op, payload) = read_ws_frame(&mut ws);
        assert_eq!(op, 1);
        let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(v["id"], id);
        if v.get("result").is_some() {
            ws_ok += 1.0;
        } else {
            assert_eq!(v["error"]["code"], -32000);
            ws_refused += 1.0;
        }
    }
    // The upgrade request was the address's first request.
    assert!(ws_ok + 1.0 >= burst && ws_ok + 1.0 <= allowed() && ws_refused >= 1.0);

    // MCPB: a refused Request frame gets an Error frame with the JSON-RPC error for its id.
    let mut tcp = connect_from("127.0.0.5", gw.tcp.unwrap());
    let (mut tcp_ok, mut tcp_refused) = (0.0, 0.0);
    for id in 1..=6 {
        let msg = format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/list"}}"#);
        tcp.write_all(&mcpb_frame(1, msg.as_bytes())).unwrap();
        let (kind, v) = read_mcpb(&mut tcp);
        assert_eq!(v["id"], id);
        match kind {
            2 => tcp_ok += 1.0,
            5 => {
                assert_eq!(v["error"]["code"], -32000);
                tcp_refused += 1.0;
            }
            other => panic!("frame type {other}"),
        }
    }
    // A HealthCheck frame is not a message: always answered.
    tcp.write_all(&mcpb_frame(4, b"")).unwrap();
    assert_eq!(read_mcpb(&mut tcp).0, 4);
    assert!(tcp_ok >= burst && tcp_ok <= allowed() && tcp_refused >= 1.0);

    let counted = |door: &str| {
        gw.metric(&format!(
            "mcp_gateway_requests_rate_limited_total{{frontend=\"{door}\"}}"
        ))
    };
    assert_eq!(
        (counted("http"), counted("websocket"), counted("tcp")),
        (refused, ws_refused, tcp_refused)
    );
    drop((conns, other, ws, tcp));
    gw.wait_all_closed();
}

/// `server.ipv6_prefix_len: 64`: two IPv6 addresses of one /64 share the per-IP count, an address
/// of the next /64 does not, IPv4 is untouched; a reload changes it for new connections, and
/// open ones stay counted under the key they were admitted with. Loopback has one IPv6 address, so the gateway and
/// a client run in a network namespace of their own (`unshare -rn`) whose loopback carries three
/// addresses of two /64 networks; skipped where namespaces cannot be made.
#[test]
fn ipv6_clients_count_per_prefix_and_a_reload_changes_it_in_a_network_namespace() {
    let can = std::process::Command::new("unshare")
        .args(["-rn", "ip", "link", "set", "lo", "up"])
        .status()
        .is_ok_and(|s| s.success());
    if !can {
        eprintln!("SKIPPED: no network namespace (unshare -rn with iproute2)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    std::fs::write(
        path("gw.yaml"),
        "server:\n  host: \"::\"\n  port: 18080\n  tcp_port: 0\n  metrics_port: 0\n  workers: 2\n  max_connections_per_ip: 1\n  ipv6_prefix_len: 64\n",
    )
    .unwrap();
    std::fs::write(
        path("client.py"),
        r#"
import os, re, signal, socket, sys, time
def post(src, dst):
    for _ in range(200):  # until the gateway listens
        s = socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET)
        s.bind((src, 0))
        try:
            s.connect((dst, 18080))
            break
        except ConnectionRefusedError:
            s.close()
            time.sleep(0.05)
    body = b'{"jsonrpc":"2.0","id":1,"method":"ping"}'
    s.sendall(b"POST /mcp HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    head = b""
    while b"\r\n" not in head:
        got = s.recv(4096)
        if not got:
            break
        head += got
    return s, head.split(b" ")[1].decode()
def reload(gw, cfg, log, prefix):
    """Sets ipv6_prefix_len in the file, sends SIGHUP, waits for the reload's log line."""
    done = lambda: open(log).read().count("configuration reloaded")
    before = done()
    text = open(cfg).read()
    open(cfg, "w").write(re.sub(r"ipv6_prefix_len: \d+", "ipv6_prefix_len: %d" % prefix, text))
    os.kill(gw, signal.SIGHUP)
    while done() == before:
        time.sleep(0.02)
    print("reloaded", prefix)
held = []
def connect(src, dst="2001:db8:1:2::1"):
    s, status = post(src, dst)
    held.append(s)
    print(src, status)
gw, cfg, log = int(sys.argv[1]), sys.argv[2], sys.argv[3]
for src in ["2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:3::1"]:
    connect(src)
for src in ["127.0.0.2", "127.0.0.3"]:
    connect(src, "127.0.0.1")
# Per address from now on: ::2 is a client of its own (the open connections stay counted
# under their /64), limited to 1.
reload(gw, cfg, log, 128)
connect("2001:db8:1:2::2")
connect("2001:db8:1:2::2")
# Per /64 again: the connections held since the start still count for their networks.
reload(gw, cfg, log, 64)
connect("2001:db8:1:2::1")
connect("2001:db8:1:3::1")
"#,
    )
    .unwrap();
    let script = format!(
        r#"set -e
ip link set lo up
for a in 2001:db8:1:2::1 2001:db8:1:2::2 2001:db8:1:3::1; do ip -6 addr add $a/64 dev lo nodad; done
"{bin}" -c "{cfg}" 2> "{log}" &
gw=$!
trap 'kill $gw; wait $gw || true; cat "{log}" >&2' EXIT
timeout 20 python3 "{client}" $gw "{cfg}" "{log}"
"#,
        bin = env!("CARGO_BIN_EXE_mcp-gateway"),
        cfg = path("gw.yaml"),
        log = path("gw.log"),
        client = path("client.py"),
    );
    let out = std::process::Command::new("unshare")
        .args(["-rn", "bash", "-c", &script])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let all = format!("{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{all}");
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        [
            "2001:db8:1:2::1 200",
            "2001:db8:1:2::2 429",
            "2001:db8:1:3::1 200",
            "127.0.0.2 200",
            "127.0.0.3 200",
            "reloaded 128",
            "2001:db8:1:2::2 200",
            "2001:db8:1:2::2 429",
            "reloaded 64",
            "2001:db8:1:2::1 429",
            "2001:db8:1:3::1 429",
        ],
        "{all}"
    );
    assert!(
        all.contains("ipv6_prefix_len=64"),
        "the startup line names it: {all}"
    );
    assert!(
        all.contains("IPv6 prefix changed") && !all.contains("after_restart"),
        "each reload applies it: {all}"
    );
}

#[test]
fn sighup_applies_new_limits_to_new_connections_and_keeps_open_ones() {
    let gw = start("max_connections_per_ip: 2\nmax_requests_per_ip: 1000");
    let open = |gw: &Gateway| open_from(gw, "127.0.0.2");
    let mut held: Vec<std::net::TcpStream> = (0..2)
        .map(|_| {
            let (c, status) = open(&gw);
            assert_eq!(status, 200);
            c
        })
        .collect();
    assert_eq!(open(&gw).1, 429);
    let per_ip = "mcp_gateway_connection_limit{scope=\"per_ip\"}";

    // Raised: the next connection of that address is admitted.
    gw.reload("max_connections_per_ip: 2", "max_connections_per_ip: 3");
    assert_eq!(gw.metric(per_ip), 3.0);
    let (c, status) = open(&gw);
    assert_eq!(status, 200);
    held.push(c);

    // Lowered below what is open: the open connections stay and are served; new ones are not.
    gw.reload("max_connections_per_ip: 3", "max_connections_per_ip: 1");
    assert_eq!(gw.metric(per_ip), 1.0);
    for c in &mut held {
        assert_eq!(roundtrip(c, &post_mcp(TOOLS_LIST)).status, 200);
    }
    assert_eq!(open(&gw).1, 429);

    // The request rate too: at 1 a second with a burst of 1, the second request is refused.
    gw.reload("max_requests_per_ip: 1000", "max_requests_per_ip: 1");
    let c = &mut held[0];
    let got = statuses(c, 3);
    assert!(got.contains(&429), "{got:?}");

    // A change that needs a restart is named, the rest applies; a bad file changes nothing.
    gw.reload(
        "max_connections_per_ip: 1",
        "max_connections_per_ip: 2\n  driver: epoll",
    );
    assert_eq!(gw.metric(per_ip), 2.0);
    assert!(gw
        .log
        .lock()
        .unwrap()
        .contains("after_restart=server.driver"));
    gw.reload("max_connections_per_ip: 2", "max_connections_per_ip: lots");
    assert!(gw
        .log
        .lock()
        .unwrap()
        .contains("configuration not reloaded"));
    assert_eq!(gw.metric(per_ip), 2.0);
    let reloads = |r: &str| {
        gw.metric(&format!(
            "mcp_gateway_config_reloads_total{{result=\"{r}\"}}"
        ))
    };
    assert_eq!(
        (reloads("applied"), reloads("partial"), reloads("failed")),
        (3.0, 1.0, 1.0)
    );
    drop(held);
    gw.wait_all_closed();
}

/// A connection from `ip` and the status of its first request.
fn open_from(gw: &Gateway, ip: &str) -> (std::net::TcpStream, u16) {
    let mut c = connect_from(ip, gw.http);
    let status = roundtrip(&mut c, &post_mcp(TOOLS_LIST)).status;
    (c, status)
}

/// The statuses of `n` requests on `c`, one after the other.
fn statuses(c: &mut std::net::TcpStream, n: usize) -> Vec<u16> {
    (0..n)
        .map(|_| roundtrip(c, &post_mcp(TOOLS_LIST)).status)
        .collect()
}

/// SIGHUP replaces `server.per_ip_overrides`: a network added gets its limit for new
/// connections, a changed rate applies to the requests of the connections admitted under it,
/// and a network taken off the list goes back to the defaults.
#[test]
fn sighup_replaces_the_per_ip_overrides() {
    let gw = start(
        "max_connections_per_ip: 1
max_requests_per_ip: 1000
request_burst_per_ip: 5000
per_ip_overrides: []",
    );
    // `n` more connections from `ip` are admitted, and the next is refused.
    let fill = |ip: &str, n: usize| -> Vec<std::net::TcpStream> {
        let admitted = (0..n)
            .map(|_| open_from(&gw, ip))
            .map(|(c, status)| (status == 200).then_some(c).expect("admitted"))
            .collect();
        assert_eq!(open_from(&gw, ip).1, 429, "{ip} after {n} more");
        admitted
    };
    let first = fill("127.0.0.2", 1);

    // Added: 127.0.0.2 may have 3 connections from now on; another address still 1.
    gw.reload(
        "per_ip_overrides: []",
        "per_ip_overrides: [{network: 127.0.0.2/32, max_connections_per_ip: 3}]",
    );
    assert_eq!(gw.metric("mcp_gateway_per_ip_overrides"), 1.0);
    let log = gw.log.lock().unwrap().clone();
    assert!(log.contains("per-IP overrides replaced"), "{log}");
    assert!(log.contains("per_ip_overrides=1"), "the limits line: {log}");
    let mut admitted = fill("127.0.0.2", 2);
    let other = fill("127.0.0.3", 1);

    // Its rate set to 1 a second: a connection admitted under the entry is held to it.
    gw.reload(
        "max_connections_per_ip: 3}",
        "max_connections_per_ip: 3, max_requests_per_ip: 1}",
    );
    let c = &mut admitted[0];
    let got = statuses(c, 3);
    assert!(got.contains(&429), "{got:?}");

    // Taken off: new connections get the default limit again (3 are open, over it), and the
    // open ones the default rate (its burst of 5 000 covers the second the address owes from
    // its request at 1 a second).
    gw.reload(
        "per_ip_overrides: [{network: 127.0.0.2/32, max_connections_per_ip: 3, max_requests_per_ip: 1}]",
        "per_ip_overrides: []",
    );
    assert_eq!(gw.metric("mcp_gateway_per_ip_overrides"), 0.0);
    assert_eq!(open_from(&gw, "127.0.0.2").1, 429);
    let ok = statuses(c, 20).iter().filter(|s| **s == 200).count();
    assert_eq!(ok, 20, "at the default rate");
    drop((first, admitted, other));
    gw.wait_all_closed();
}

/// Overrides replaced, and the IPv6 prefix switched between 128 and 64, 20 times while clients
/// of four IPv4 addresses and `::1` open, use and close connections (some over the limit in
/// force, some admitted under an entry that is then taken away, `::1`'s admitted under one key
/// and closed under the other): every answer is 200 or 429, and every count is back at zero at
/// the end.
#[test]
fn overrides_and_the_ipv6_prefix_reloaded_under_churn_leave_the_counts_exact() {
    let gw = start(
        "max_connections_per_ip: 2\nmax_requests_per_ip: 100000\nper_ip_overrides: []\nipv6_prefix_len: 128",
    );
    let (none, some) = (
        "per_ip_overrides: []\n  ipv6_prefix_len: 128",
        "per_ip_overrides: [{network: 127.0.3.0/24, max_connections_per_ip: 4, max_requests_per_ip: 50000}]\n  ipv6_prefix_len: 64",
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let http = gw.http;
    let clients: Vec<_> = (0..5)
        .map(|i| {
            let (stop, done) = (stop.clone(), done.clone());
            std::thread::spawn(move || {
                let ip = match i {
                    4 => "::1".to_string(),
                    _ => format!("127.0.3.{}", 2 + i),
                };
                let mut held = std::collections::VecDeque::new();
                let mut answers = std::collections::BTreeMap::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let mut c = connect_from(&ip, http);
                    let status = roundtrip(&mut c, &post_mcp(TOOLS_LIST)).status;
                    *answers.entry(status).or_insert(0) += 1;
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if status == 200 {
                        held.push_back(c);
                    }
                    if held.len() > 3 {
                        held.pop_front();
                    }
                }
                answers
            })
        })
        .collect();
    // Each list stays in force while the clients make at least 40 connections.
    let progress = || {
        let from = done.load(std::sync::atomic::Ordering::Relaxed);
        while done.load(std::sync::atomic::Ordering::Relaxed) < from + 40 {
            std::thread::yield_now();
        }
    };
    for _ in 0..10 {
        gw.reload(none, some);
        progress();
        gw.reload(some, none);
        progress();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut all = std::collections::BTreeMap::new();
    for c in clients {
        for (status, n) in c.join().unwrap() {
            *all.entry(status).or_insert(0) += n;
        }
    }
    assert_eq!(all.keys().collect::<Vec<_>>(), [&200, &429], "{all:?}");
    assert_eq!(
        gw.metric("mcp_gateway_config_reloads_total{result=\"applied\"}"),
        20.0
    );
    gw.wait_all_closed();
}

/// A log reader that stops reading (a full pipe) must not stop the gateway: under a flood of
/// refusals with `RUST_LOG=debug`, each refusal a log line, every client still gets its answer.
#[test]
fn a_stalled_log_reader_does_not_stall_the_gateway() {
    // The held connection sends nothing: its first request's `read_timeout` must outlast the
    // 18 000 refusals, which took 30 s on a slower machine (the default is 30).
    let gw = start_logging(
        "max_connections_per_ip: 1\nread_timeout: 3600",
        "",
        Log::StallAfterStart("debug"),
    );
    let _held = connect_from("127.0.0.2", gw.http);
    gw.wait_metric("mcp_gateway_connections_active", 1.0);
    // Far more lines than the pipe holds (64 KiB: a few hundred lines; a gateway writing its log
    // itself stalled at the 544th here), and than the gateway's queue holds (16 384 lines).
    for i in 0..18_000 {
        let mut c = connect_from("127.0.0.2", gw.http);
        c.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let r = roundtrip(&mut c, &post_mcp(TOOLS_LIST));
        assert_eq!(r.status, 429, "refusal {i}");
    }
    let mut c = connect_from("127.0.0.3", gw.http);
    assert_eq!(roundtrip(&mut c, &post_mcp(TOOLS_LIST)).status, 200);
    // What did not fit was dropped, and counted.
    assert!(gw.metric("mcp_gateway_log_lines_dropped_total") > 0.0);
}
