//! TLS on the client doors (`server.tls_cert_file`, `server.tls_key_file`) through the real
//! binary: HTTPS requests (keep-alive, and requests in separate TLS records that arrive
//! together), WSS, MCPB over TLS, the limits answering inside TLS, a client that does not speak
//! TLS, a connect-and-close probe, and configuration errors. Certificates come from a throwaway CA
//! (`common::tls`); `mcp_sdk.rs` runs the SDK's clients over HTTPS and WSS too.

mod common;

use std::io::{Read, Write};

use common::tls::Ca;
use common::*;

fn tls_gateway(ca: &Ca, dir: &std::path::Path, extra: &str) -> Gateway {
    start(&format!("{}{extra}", ca.door_keys(dir)))
}

fn tls_errors(gw: &Gateway, frontend: &str) -> f64 {
    gw.metric(&format!(
        "mcp_gateway_protocol_errors_total{{frontend=\"{frontend}\",kind=\"tls\"}}"
    ))
}

#[test]
fn https_requests_are_answered_on_one_kept_alive_connection() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let gw = tls_gateway(&ca, dir.path(), "");
    let log = gw.log.lock().unwrap().clone();
    assert!(
        log.contains("server.pem"),
        "the start names the certificate: {log}"
    );
    let mut c = ca.connect("127.0.0.2", gw.http);
    for _ in 0..3 {
        let r = roundtrip(&mut c, &post_mcp(TOOLS_LIST));
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["result"]["tools"][0]["name"], "echo");
    }
    assert_eq!(c.conn.alpn_protocol(), None, "the client offered no ALPN");
    // The gateway's order of suites wins over the client's (rustls clients list AES-256 first):
    // a SHA-256 suite, whose key schedule the CPU's SHA extensions speed up.
    assert_eq!(
        c.conn.negotiated_cipher_suite().map(|s| s.suite()),
        Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
    );
    assert_eq!(
        gw.metric("mcp_gateway_frontend_connections_accepted_total{frontend=\"http\"}"),
        1.0
    );
    drop(c);
    gw.wait_all_closed();
    assert_eq!(tls_errors(&gw, "http"), 0.0);
}

/// Two requests in two TLS records written at once: the second may be decrypted together with
/// the first and wait inside the gateway's TLS state, where a wait on the socket would never
/// see it.
#[test]
fn requests_in_records_that_arrive_together_are_all_answered() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let gw = tls_gateway(&ca, dir.path(), "");
    let mut c = ca.connect("127.0.0.2", gw.http);
    let _ = roundtrip(&mut c, &post_mcp(TOOLS_LIST)); // handshake done
    for id in [7, 8] {
        let body = format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"ping"}}"#);
        c.conn
            .writer()
            .write_all(post_mcp(&body).as_bytes())
            .unwrap();
    }
    c.flush().unwrap();
    let mut buf = Vec::new();
    for id in [7, 8] {
        let r = read_response(&mut c, &mut buf).expect("answered");
        assert_eq!((r.status, r.json()["id"].as_i64()), (200, Some(id)));
    }
}

#[test]
fn wss_and_mcpb_over_tls_work() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let gw = tls_gateway(&ca, dir.path(), "");
    let mut ws = ca.connect("127.0.0.2", gw.http);
    ws.write_all(WS_UPGRADE.as_bytes()).unwrap();
    let mut buf = Vec::new();
    read_until(&mut ws, &mut buf, "\r\n\r\n");
    assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 101"));
    ws.write_all(&ws_frame(true, 1, TOOLS_LIST.as_bytes()))
        .unwrap();
    let (op, payload) = read_ws_frame(&mut ws);
    let reply: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(
        (op, &reply["result"]["tools"][0]["name"]),
        (1, &serde_json::json!("echo"))
    );

    let mut tcp = ca.connect("127.0.0.3", gw.tcp.unwrap());
    tcp.write_all(&mcpb_frame(1, TOOLS_LIST.as_bytes()))
        .unwrap();
    let (kind, reply) = read_mcpb(&mut tcp);
    assert_eq!(
        (kind, &reply["result"]["tools"][0]["name"]),
        (2, &serde_json::json!("echo"))
    );
    assert_eq!(
        gw.metric("mcp_gateway_frontend_connections_active{frontend=\"tcp\"}"),
        1.0
    );
}

#[test]
fn a_client_over_the_per_ip_limit_gets_429_inside_tls() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let gw = tls_gateway(&ca, dir.path(), "max_connections_per_ip: 1\n");
    let mut first = ca.connect("127.0.0.2", gw.http);
    assert_eq!(roundtrip(&mut first, &post_mcp(TOOLS_LIST)).status, 200);
    let mut second = ca.connect("127.0.0.2", gw.http);
    let r = roundtrip(&mut second, &post_mcp(TOOLS_LIST));
    assert_eq!((r.status, r.header("retry-after")), (429, Some("1")));
    assert_eq!(r.json()["error"]["code"], -32000);
    // Another address is still admitted.
    let mut other = ca.connect("127.0.0.3", gw.http);
    assert_eq!(roundtrip(&mut other, &post_mcp(TOOLS_LIST)).status, 200);
}

#[test]
fn a_client_without_tls_is_closed_and_counted_and_a_probe_is_not() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let gw = tls_gateway(&ca, dir.path(), "");
    // Plain HTTP on the TLS port: no answer the client could read, a close, one error.
    let mut plain = connect_from("127.0.0.2", gw.http);
    plain.write_all(post_mcp(TOOLS_LIST).as_bytes()).unwrap();
    let mut rest = Vec::new();
    let _ = plain.read_to_end(&mut rest);
    assert!(!String::from_utf8_lossy(&rest).contains("HTTP/1.1 200"));
    gw.wait_metric(
        "mcp_gateway_protocol_errors_total{frontend=\"http\",kind=\"tls\"}",
        1.0,
    );
    // A connect-and-close (a load balancer's TCP check) is not an error.
    drop(connect_from("127.0.0.3", gw.http));
    drop(connect_from("127.0.0.3", gw.tcp.unwrap()));
    gw.wait_accepted(3);
    gw.wait_all_closed();
    assert_eq!(tls_errors(&gw, "http"), 1.0);
    assert_eq!(tls_errors(&gw, "tcp"), 0.0);
    // The gateway serves TLS clients as before.
    let mut c = ca.connect("127.0.0.4", gw.http);
    assert_eq!(roundtrip(&mut c, &post_mcp(TOOLS_LIST)).status, 200);
}

#[test]
fn tls_keys_are_checked_before_start() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = ca.pem_files(&["127.0.0.1"], dir.path());
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "junk").unwrap();
    let refused = |server: String| refused(&format!("server:\n{server}"));
    let e = refused(format!("  tls_cert_file: {}\n", cert.display()));
    assert!(
        e.contains("server.tls_key_file: needed with server.tls_cert_file"),
        "{e}"
    );
    let e = refused(format!(
        "  tls_cert_file: {}\n  tls_key_file: {}\n",
        junk.display(),
        key.display()
    ));
    assert!(
        e.contains("server.tls_cert_file, server.tls_key_file: "),
        "{e}"
    );
    assert!(e.contains("junk.pem: no certificate in the file"), "{e}");
    // A key that is not the certificate's.
    let other = tempfile::tempdir().unwrap();
    let (_, other_key) = ca.pem_files(&["127.0.0.1"], other.path());
    let e = refused(format!(
        "  tls_cert_file: {}\n  tls_key_file: {}\n",
        cert.display(),
        other_key.display()
    ));
    assert!(
        e.contains("server.tls_cert_file, server.tls_key_file: "),
        "{e}"
    );
}

#[test]
fn a_renewed_certificate_is_used_after_sighup_and_open_sessions_stay() {
    let (old_ca, new_ca) = (Ca::new(), Ca::new());
    let dir = tempfile::tempdir().unwrap();
    let gw = tls_gateway(&old_ca, dir.path(), "");
    let mut open = old_ca.connect("127.0.0.2", gw.http);
    assert_eq!(roundtrip(&mut open, &post_mcp(TOOLS_LIST)).status, 200);
    // The renewal writes new files at the same paths; SIGHUP with the configuration unchanged.
    new_ca.door_keys(dir.path());
    gw.reload("port: 0", "port: 0");
    gw.wait_log("TLS certificates reloaded");
    let mut renewed = new_ca.connect("127.0.0.3", gw.http);
    assert_eq!(roundtrip(&mut renewed, &post_mcp(TOOLS_LIST)).status, 200);
    let mut stale = old_ca.connect("127.0.0.4", gw.http);
    let e = stale
        .write_all(post_mcp(TOOLS_LIST).as_bytes())
        .unwrap_err();
    assert!(e.to_string().contains("invalid peer certificate"), "{e}");
    assert_eq!(
        roundtrip(&mut open, &post_mcp(TOOLS_LIST)).status,
        200,
        "a session opened before the reload goes on"
    );
    assert_eq!(
        gw.metric("mcp_gateway_config_reloads_total{result=\"applied\"}"),
        1.0
    );
    // A broken certificate file: nothing changes.
    std::fs::write(dir.path().join("server.pem"), "junk").unwrap();
    gw.reload("port: 0", "port: 0");
    assert_eq!(
        gw.metric("mcp_gateway_config_reloads_total{result=\"failed\"}"),
        1.0
    );
    let mut still = new_ca.connect("127.0.0.5", gw.http);
    assert_eq!(roundtrip(&mut still, &post_mcp(TOOLS_LIST)).status, 200);
}

/// A TLS client that leaves an open event stream ends the session first (close_notify), then the
/// connection: the gateway takes that as its departure, not as its next request, and closes the
/// upstream stream at once.
#[test]
fn a_tls_client_that_leaves_ends_its_event_stream_upstream() {
    use common::mock::{self, Mock};
    use std::time::Duration;
    let (closed_tx, closed_rx) = std::sync::mpsc::channel::<()>();
    let up = Mock::start(mock::stream_until_closed(closed_tx));
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let rest = format!(
        "routing:\n  health_check_interval: 3600\nservice_discovery:\n  static:\n    endpoints:\n      default:\n        - url: {}\n",
        up.url()
    );
    let gw = start_with(&ca.door_keys(dir.path()), &rest);
    let mut c = ca.connect("127.0.0.2", gw.http);
    c.write_all(b"GET /mcp HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n")
        .unwrap();
    read_until(&mut c, &mut Vec::new(), ": open");
    c.conn.send_close_notify();
    c.flush().unwrap();
    closed_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the upstream connection is closed when the client ends its session");
    drop(c);
    gw.wait_all_closed();
}

/// A TLS connection from `from` to the HTTP door, its handshake done (or why not).
fn handshake(ca: &Ca, gw: &Gateway, from: &str) -> std::io::Result<common::tls::TlsClient> {
    let mut c = ca.connect(from, gw.http);
    c.conn.complete_io(&mut c.sock).map(|_| c)
}

/// With a request rate set, each TLS handshake counts as a request of its client: a burst of new
/// connections from one address past the rate is closed before its handshake costs anything.
#[test]
fn handshakes_over_the_request_rate_are_refused_before_they_cost() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let gw = tls_gateway(
        &ca,
        dir.path(),
        "max_requests_per_ip: 1\nrequest_burst_per_ip: 2\n",
    );
    let handshake = |from: &str| handshake(&ca, &gw, from);
    let _first = handshake("127.0.0.2").expect("within the burst");
    let _second = handshake("127.0.0.2").expect("within the burst");
    assert!(handshake("127.0.0.2").is_err(), "past the burst: closed");
    assert!(
        handshake("127.0.0.3").is_ok(),
        "another address has its own rate"
    );
    assert_eq!(
        gw.metric("mcp_gateway_requests_rate_limited_total{frontend=\"http\"}"),
        1.0
    );
    assert_eq!(tls_errors(&gw, "http"), 0.0, "not a TLS error");
}

/// Over `max_new_connections_per_ip`, a connection to a TLS door is closed at once, with no
/// handshake: answering its `429` inside TLS would cost the handshake the rate is there to spare.
#[test]
fn connections_over_the_connection_rate_are_closed_before_the_handshake() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let gw = tls_gateway(
        &ca,
        dir.path(),
        "max_new_connections_per_ip: 1\nnew_connection_burst_per_ip: 2\n",
    );
    let handshake = |from: &str| handshake(&ca, &gw, from);
    let first = handshake("127.0.0.2").expect("within the burst");
    drop(first);
    let _second = handshake("127.0.0.2").expect("within the burst");
    assert!(handshake("127.0.0.2").is_err(), "past the burst: closed");
    assert!(
        handshake("127.0.0.3").is_ok(),
        "another address has its own"
    );
    let sample =
        "mcp_gateway_connections_rejected_total{frontend=\"http\",reason=\"connection_rate\"}";
    assert_eq!(gw.metric(sample), 1.0);
    assert_eq!(tls_errors(&gw, "http"), 0.0, "not a TLS error");
}

/// Behind a trusted balancer, the PROXY header comes before the handshake; a bad one is counted
/// as such and the connection closed (what follows it is no handshake to answer in).
#[test]
fn a_proxy_header_comes_before_the_handshake() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let gw = tls_gateway(&ca, dir.path(), "proxy_protocol_networks: [127.0.0.0/8]\n");
    let mut relayed = ca.connect("127.0.0.2", gw.http);
    relayed
        .sock
        .write_all(b"PROXY TCP4 10.1.2.3 127.0.0.1 40000 443\r\n")
        .unwrap();
    assert_eq!(roundtrip(&mut relayed, &post_mcp(TOOLS_LIST)).status, 200);
    let mut bad = connect_from("127.0.0.3", gw.http);
    bad.write_all(b"GARBAGE\r\n\r\n").unwrap();
    let mut rest = Vec::new();
    let _ = bad.read_to_end(&mut rest);
    assert!(rest.is_empty(), "nothing answered outside TLS");
    gw.wait_metric(
        "mcp_gateway_protocol_errors_total{frontend=\"http\",kind=\"proxy_header\"}",
        1.0,
    );
    assert_eq!(tls_errors(&gw, "http"), 0.0);
}

#[test]
fn with_a_client_ca_only_clients_with_its_certificates_get_in() {
    let (ca, clients, strangers) = (Ca::new(), Ca::new(), Ca::new());
    let dir = tempfile::tempdir().unwrap();
    let extra = format!("tls_client_ca_file: {}\n", clients.ca_file.display());
    let gw = tls_gateway(&ca, dir.path(), &extra);
    // A certificate from the authority: served, on both doors.
    let mut c = common::tls::connect_with(
        ca.client_config_presenting(&clients),
        "127.0.0.1",
        "127.0.0.2",
        gw.http,
    );
    assert_eq!(roundtrip(&mut c, &post_mcp(TOOLS_LIST)).status, 200);
    let peer = c.conn.peer_certificates().map(<[_]>::len);
    assert_eq!(peer, Some(2), "the gateway's chain");
    let mut m = common::tls::connect_with(
        ca.client_config_presenting(&clients),
        "127.0.0.1",
        "127.0.0.2",
        gw.tcp.unwrap(),
    );
    m.write_all(&mcpb_frame(4, b"")).unwrap();
    assert_eq!(read_mcpb_raw(&mut m).0, 4, "MCPB HealthCheck answered");
    // No certificate, or one from another authority: the handshake fails, nothing is served.
    for config in [ca.client_config(), ca.client_config_presenting(&strangers)] {
        let mut c = common::tls::connect_with(config, "127.0.0.1", "127.0.0.3", gw.http);
        let sent = c.write_all(post_mcp(TOOLS_LIST).as_bytes());
        let mut buf = [0u8; 64];
        let read = c.read(&mut buf);
        assert!(
            sent.is_err() || read.is_err() || read.is_ok_and(|n| n == 0),
            "no answer without a good certificate"
        );
    }
    gw.wait_metric(
        "mcp_gateway_protocol_errors_total{frontend=\"http\",kind=\"tls\"}",
        2.0,
    );
    drop((c, m));
    gw.wait_all_closed();
}

#[test]
fn the_certificate_is_chosen_by_the_name_the_client_asks_for() {
    let (main, hosted, wild) = (Ca::new(), Ca::new(), Ca::new());
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (h_cert, h_key) = hosted.pem_files(&["mcp.example.com"], dirs[1].path());
    let (w_cert, w_key) = wild.pem_files(&["*.tools.example"], dirs[2].path());
    let more = format!(
        "tls_certificates: [{{cert_file: {}, key_file: {}}}, {{cert_file: {}, key_file: {}}}]\n",
        h_cert.display(),
        h_key.display(),
        w_cert.display(),
        w_key.display()
    );
    let gw = tls_gateway(&main, dirs[0].path(), &more);
    // Each client trusts one authority only: its handshake passes only with that certificate.
    for (ca, name) in [
        (&hosted, "mcp.example.com"),
        (&hosted, "MCP.Example.com"),
        (&wild, "a.tools.example"),
        (&main, "localhost"),
        (&main, "127.0.0.1"), // no SNI: the first certificate
    ] {
        let mut c = common::tls::connect_with(ca.client_config(), name, "127.0.0.2", gw.http);
        let r = roundtrip(&mut c, &post_mcp(TOOLS_LIST));
        assert_eq!(r.status, 200, "{name}");
    }
    // A name no certificate covers gets the first one, which is not for it: the client refuses.
    let mut c = common::tls::connect_with(
        wild.client_config(),
        "b.a.tools.example",
        "127.0.0.2",
        gw.http,
    );
    assert!(c.write_all(post_mcp(TOOLS_LIST).as_bytes()).is_err());
}

#[test]
fn door_tls_keys_need_tls_on_and_readable_files() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let err = refused(&format!(
        "server:\n  tls_client_ca_file: {}\n  tls_certificates:\n    - cert_file: a.pem\n      key_file: a.key\n",
        ca.ca_file.display()
    ));
    for key in ["tls_client_ca_file", "tls_certificates"] {
        assert!(
            err.contains(&format!("server.{key}: needs server.tls_cert_file")),
            "{err}"
        );
    }
    let keys = ca.door_keys(dir.path());
    let err = refused(&format!(
        "server:\n{}  tls_client_ca_file: /nonexistent/ca.pem\n",
        indent(&keys)
    ));
    assert!(
        err.contains("server.tls_client_ca_file: /nonexistent/ca.pem"),
        "{err}"
    );
    // A certificate for an address only: no client could ask for it by name.
    let other = tempfile::tempdir().unwrap();
    let (cert, key) = ca.pem_files(&["10.0.0.1"], other.path());
    let err = refused(&format!(
        "server:\n{}  tls_certificates:\n    - cert_file: {}\n      key_file: {}\n",
        indent(&keys),
        cert.display(),
        key.display()
    ));
    assert!(
        err.contains("server.tls_certificates[0]: ") && err.contains("names no DNS host"),
        "{err}"
    );
}

/// `lines` indented under a section.
fn indent(lines: &str) -> String {
    lines.lines().map(|l| format!("  {l}\n")).collect()
}

#[test]
fn upstreams_learn_which_certificate_a_client_showed_and_no_client_can_claim_one() {
    use common::mock::{json_reply, Mock};
    // An upstream answering with the X-Forwarded-Client-Cert it got ("" without one).
    let up = Mock::start(|req, s| {
        let xfcc = req.header("x-forwarded-client-cert").unwrap_or("");
        json_reply(
            s,
            req,
            &format!(r#"{{"xfcc":"{xfcc}"}}"#),
            &[("Mcp-Session-Id", "S")],
        );
    });
    let endpoints = format!(
        "service_discovery:\n  static:\n    endpoints:\n      default:\n        - url: {}\n",
        up.url()
    );
    let spoofed = post_mcp(TOOLS_LIST).replacen(
        "\r\n\r\n",
        "\r\nX-Forwarded-Client-Cert: Hash=00;DNS=admin.example\r\n\r\n",
        1,
    );
    let (ca, clients) = (Ca::new(), Ca::new());
    let dir = tempfile::tempdir().unwrap();
    let server = format!(
        "{}tls_client_ca_file: {}\n",
        ca.door_keys(dir.path()),
        clients.ca_file.display()
    );
    let gw = start_with(&server, &endpoints);
    let (config, cert) = ca.client_presenting(&clients);
    let hash: String = ring::digest::digest(&ring::digest::SHA256, &cert)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let expected = format!("Hash={hash};DNS=client.example");
    // HTTPS: the certificate the client showed, not the one it claims.
    let mut c = common::tls::connect_with(config.clone(), "127.0.0.1", "127.0.0.2", gw.http);
    let r = roundtrip(&mut c, &spoofed);
    assert_eq!(r.json()["result"]["xfcc"], expected.as_str());
    // MCPB over TLS: the session's requests say it too.
    let mut m = common::tls::connect_with(config, "127.0.0.1", "127.0.0.2", gw.tcp.unwrap());
    m.write_all(&mcpb_frame(
        1,
        br#"{"jsonrpc":"2.0","id":1,"method":"initialize"}"#,
    ))
    .unwrap();
    let (kind, reply) = read_mcpb(&mut m);
    assert_eq!(kind, 2, "{reply}");
    assert_eq!(reply["result"]["xfcc"], expected.as_str());

    // A gateway without client certificates: a client's claim never reaches the upstream.
    let plain = start_with("", &endpoints);
    let mut c = connect_from("127.0.0.2", plain.http);
    assert_eq!(roundtrip(&mut c, &spoofed).json()["result"]["xfcc"], "");
}
