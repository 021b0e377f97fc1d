//! `https://` upstreams through the real binary: requests and event streams over TLS, pooled TLS
//! connections, certificate verification (an untrusted certificate, a certificate for another
//! name, `tls_server_name`), the health check over TLS, and the TLS stream's own readiness rule.
//! The upstreams are TLS mocks (`common::mock`) with certificates from a throwaway CA
//! (`common::tls`); `mcp_sdk.rs` runs the SDK's servers over TLS too.

mod common;

use std::io::Write;
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::Duration;

use common::mock::{self, chunk, json_reply, Mock};
use common::tls::Ca;
use common::*;

const ROUTING: &str =
    "routing:\n  health_check_interval: 3600\n  request_timeout: 2\n  connect_timeout: 1\n";

/// The configuration of one `https` upstream at `url` with the endpoint keys `extra`.
fn endpoint(url: &str, extra: &str) -> String {
    format!("{ROUTING}service_discovery:\n  static:\n    endpoints:\n      default:\n        - url: {url}\n{extra}")
}

fn ca_key(ca: &Ca) -> String {
    format!("          tls_ca_file: {}\n", ca.ca_file.display())
}

fn requests(gw: &Gateway, url: &str, outcome: &str) -> f64 {
    gw.metric(&format!(
        "mcp_gateway_upstream_requests_total{{namespace=\"default\",upstream=\"{url}\",outcome=\"{outcome}\"}}"
    ))
}

/// A TLS upstream with a certificate for `name` answering every request with `result`.
fn answering(ca: &Ca, name: &str, result: &'static str) -> Mock {
    Mock::start_tls(ca.server_config(&[name]), move |req, s| {
        json_reply(s, req, result, &[]);
    })
}

#[test]
fn requests_reach_an_https_upstream_over_one_pooled_tls_connection() {
    let ca = Ca::new();
    let up = Mock::start_tls(ca.server_config(&["127.0.0.1"]), |req, s| {
        let host = req.header("host").unwrap_or("").to_string();
        json_reply(s, req, &format!(r#"{{"host":"{host}"}}"#), &[]);
    });
    let url = up.https_url();
    let gw = start_with("", &endpoint(&url, &ca_key(&ca)));
    let mut c = connect_from("127.0.0.2", gw.http);
    for _ in 0..3 {
        let r = roundtrip(&mut c, &post_mcp(TOOLS_LIST));
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["result"]["host"], up.addr.to_string());
    }
    assert_eq!(up.requests.load(std::sync::atomic::Ordering::SeqCst), 3);
    assert_eq!(
        up.connections(),
        1,
        "one TLS connection, pooled between requests"
    );
    assert_eq!(requests(&gw, &url, "ok"), 3.0);
}

#[test]
fn an_upstream_closing_its_idle_tls_connection_costs_the_client_nothing() {
    let ca = Ca::new();
    let up = Mock::start_tls(ca.server_config(&["127.0.0.1"]), |req, s| {
        json_reply(s, req, r#"{"ok":true}"#, &[]);
        // Then the server ends the TLS session (close_notify) while the connection idles in
        // the gateway's pool.
        s.conn.send_close_notify();
        let _ = s.flush();
    });
    let url = up.https_url();
    let gw = start_with("", &endpoint(&url, &ca_key(&ca)));
    let mut c = connect_from("127.0.0.2", gw.http);
    for _ in 0..3 {
        let r = roundtrip(&mut c, &post_mcp(TOOLS_LIST));
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }
    assert_eq!(up.connections(), 3, "a closed TLS session is not reused");
    assert_eq!(requests(&gw, &url, "ok"), 3.0);
    assert_eq!(requests(&gw, &url, "reset"), 0.0);
}

#[test]
fn an_event_stream_over_tls_arrives_event_by_event() {
    let ca = Ca::new();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let go_rx = Mutex::new(go_rx);
    let up = Mock::start_tls(ca.server_config(&["127.0.0.1"]), move |_, s| {
        let _ = s.write_all(mock::SSE_HEAD);
        // Two events in two TLS records, back to back: the second may arrive in the same read
        // as the first and wait, decrypted, inside the gateway's TLS state.
        chunk(s, "event: message\ndata: {\"first\":1}\n\n");
        chunk(s, "event: message\ndata: {\"second\":2}\n\n");
        // The third waits until the client has seen the first two.
        let _ = go_rx.lock().unwrap().recv_timeout(Duration::from_secs(10));
        chunk(s, "event: message\ndata: {\"third\":3}\n\n");
        let _ = s.write_all(b"0\r\n\r\n");
        let _ = s.flush();
    });
    let gw = start_with("", &endpoint(&up.https_url(), &ca_key(&ca)));
    let mut c = connect_from("127.0.0.2", gw.http);
    c.write_all(post_mcp(TOOLS_LIST).as_bytes()).unwrap();
    let mut buf = Vec::new();
    read_until(&mut c, &mut buf, "{\"second\":2}");
    assert!(!String::from_utf8_lossy(&buf).contains("third"));
    go_tx.send(()).unwrap();
    read_until(&mut c, &mut buf, "0\r\n\r\n");
    assert!(String::from_utf8_lossy(&buf).contains("{\"third\":3}"));
}

#[test]
fn an_untrusted_certificate_fails_fast_and_is_counted() {
    let ca = Ca::new();
    let up = answering(&ca, "127.0.0.1", "{}");
    let url = up.https_url();
    // No tls_ca_file: the bundled public roots, which do not include this CA.
    let gw = start_with("", &endpoint(&url, ""));
    let mut c = connect_from("127.0.0.2", gw.http);
    let r = roundtrip(&mut c, &post_mcp(TOOLS_LIST));
    assert_eq!(r.status, 502);
    assert_eq!(
        r.json()["error"]["message"],
        "TLS handshake with the upstream MCP server failed"
    );
    assert_eq!(requests(&gw, &url, "tls_error"), 1.0);
    assert_eq!(up.requests.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[test]
fn a_certificate_for_another_name_passes_only_with_that_tls_server_name() {
    let ca = Ca::new();
    let up = answering(&ca, "mcp.internal", r#"{"ok":true}"#);
    let url = up.https_url();
    let gw = start_with("", &endpoint(&url, &ca_key(&ca)));
    let r = roundtrip(
        &mut connect_from("127.0.0.2", gw.http),
        &post_mcp(TOOLS_LIST),
    );
    assert_eq!(
        r.status, 502,
        "a certificate for mcp.internal, not 127.0.0.1"
    );
    assert_eq!(requests(&gw, &url, "tls_error"), 1.0);
    drop(gw);

    let named = format!("{}          tls_server_name: mcp.internal\n", ca_key(&ca));
    let gw = start_with("", &endpoint(&url, &named));
    let r = roundtrip(
        &mut connect_from("127.0.0.2", gw.http),
        &post_mcp(TOOLS_LIST),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["result"]["ok"], true);
}

#[test]
fn the_health_check_speaks_tls_and_says_why_it_failed() {
    let ca = Ca::new();
    let up = answering(&ca, "127.0.0.1", "{}");
    let url = up.https_url();
    let healthy =
        format!("mcp_gateway_upstream_healthy{{namespace=\"default\",upstream=\"{url}\"}}");
    let often = |extra: &str| {
        endpoint(&url, extra).replace("health_check_interval: 3600", "health_check_interval: 0.2")
    };
    // Trusted: probes (POSTs of a ping) arrive over TLS and the upstream stays in.
    let gw = start_with("", &often(&ca_key(&ca)));
    eventually(
        || up.requests.load(std::sync::atomic::Ordering::SeqCst) >= 2,
        || "no probe reached the upstream over TLS".into(),
    );
    assert_eq!(gw.metric(&healthy), 1.0);
    drop(gw);
    // Untrusted: taken out, and the log names the certificate problem.
    let gw = start_with("", &often(""));
    gw.wait_metric(&healthy, 0.0);
    gw.wait_log("upstream failed its health check");
    let log = gw.log.lock().unwrap().clone();
    assert!(log.contains("UnknownIssuer"), "{log}");
}

/// A one-connection TLS server on loopback (a certificate from a throwaway CA) that reads the
/// client's 5-byte greeting and then runs `serve`, and the gateway's own TLS client stream,
/// connected to it with the greeting ("hello") sent, handed to `client` on a monoio runtime.
fn tls_session<F: std::future::Future<Output = ()>>(
    serve: impl FnOnce(mock::TlsConn) + Send + 'static,
    client: impl FnOnce(mcp_gateway::stream::Stream) -> F,
) {
    use mcp_gateway::stream::Stream;
    use mcp_gateway::tls::{client_config, server_name, Tls, TlsStream};
    use monoio::io::AsyncWriteRentExt;

    let ca = Ca::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let config = ca.server_config(&["127.0.0.1"]);
    let server = std::thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        let mut s = rustls::StreamOwned::new(rustls::ServerConnection::new(config).unwrap(), tcp);
        let mut greeting = [0u8; 5];
        std::io::Read::read_exact(&mut s, &mut greeting).unwrap();
        serve(s);
    });
    let tls = Tls {
        config: client_config(Some(&ca.ca_file), None).unwrap(),
        name: server_name("127.0.0.1").unwrap(),
    };
    let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build()
        .unwrap();
    rt.block_on(async move {
        let tcp = monoio::net::TcpStream::connect_addr(addr).await.unwrap();
        let mut s = Stream::tls(TlsStream::connect(tcp, &tls).await.unwrap());
        let (r, _) = s.write_all(b"hello".to_vec()).await;
        r.unwrap();
        client(s).await;
    });
    server.join().unwrap();
}

/// The TLS stream's readiness rule, below the gateway: decrypted bytes that a read left inside
/// rustls make the stream readable at once, although the socket has nothing more.
#[test]
fn a_tls_stream_is_readable_while_decrypted_bytes_wait() {
    use monoio::io::AsyncReadRent;
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let serve = move |mut s: mock::TlsConn| {
        s.write_all(b"hello, world").unwrap();
        s.flush().unwrap();
        // Nothing more until the client is done: the socket stays open and silent.
        let _ = done_rx.recv_timeout(Duration::from_secs(10));
    };
    tls_session(serve, |mut s| async move {
        let (r, first) = s.read(Vec::with_capacity(5)).await;
        assert_eq!((r.unwrap(), &first[..]), (5, &b"hello"[..]));
        // The rest (", world") is decrypted and waiting; the socket has nothing.
        let ready = monoio::time::timeout(Duration::from_secs(5), s.readable()).await;
        assert!(
            matches!(ready, Ok(Ok(()))),
            "readable with decrypted bytes waiting"
        );
        let (r, rest) = s.read(Vec::with_capacity(64)).await;
        assert_eq!((r.unwrap(), &rest[..]), (7, &b", world"[..]));
        // Now nothing waits anywhere: readable must wait for the socket.
        let idle = monoio::time::timeout(Duration::from_millis(200), s.readable()).await;
        assert!(idle.is_err(), "not readable with nothing to read");
        done_tx.send(()).unwrap();
    });
}

/// What the pool asks of an idle TLS connection before reusing it: a post-handshake message
/// (here a key update) leaves it usable, the server's close_notify retires it.
#[test]
fn an_idle_tls_stream_survives_a_key_update_but_not_a_close() {
    use monoio::io::AsyncReadRent;
    let (step_tx, step_rx) = mpsc::channel::<&str>();
    let (ack_tx, ack_rx) = mpsc::channel::<()>();
    let serve = move |mut s: mock::TlsConn| {
        s.write_all(b"ok").unwrap();
        while let Ok(step) = step_rx.recv_timeout(Duration::from_secs(10)) {
            match step {
                "key update" => s.conn.refresh_traffic_keys().unwrap(),
                "close" => s.conn.send_close_notify(),
                _ => break,
            }
            s.flush().unwrap();
            ack_tx.send(()).unwrap();
        }
    };
    tls_session(serve, |mut s| async move {
        let (r, got) = s.read(Vec::with_capacity(64)).await;
        assert_eq!((r.unwrap(), &got[..]), (2, &b"ok"[..]));
        assert!(s.idle_usable(), "nothing arrived");
        for (step, usable) in [("key update", true), ("close", false)] {
            step_tx.send(step).unwrap();
            ack_rx.recv_timeout(Duration::from_secs(10)).unwrap();
            let arrived = monoio::time::timeout(Duration::from_secs(5), s.readable()).await;
            assert!(matches!(arrived, Ok(Ok(()))), "the {step} arrived");
            assert_eq!(s.idle_usable(), usable, "after a {step}");
        }
        step_tx.send("done").unwrap();
    });
}

#[test]
fn tls_keys_are_checked_with_their_key_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    let (code, _, err) = check(
        &format!(
            "service_discovery:\n  static:\n    endpoints:\n      default:\n        - url: http://127.0.0.1:9/mcp\n          tls_server_name: a.example\n        - url: https://127.0.0.1:9/mcp\n          tls_ca_file: {}\n        - url: https://127.0.0.1:10/mcp\n          tls_ca_file: {}\n          tls_server_name: \"not a name\"\n",
            missing.display(),
            junk.display()
        ),
        "g.yaml",
    );
    assert_ne!(code, 0);
    for want in [
        "service_discovery.static.endpoints.default[0].tls_server_name: only for https:// upstreams",
        "service_discovery.static.endpoints.default[1].tls_ca_file: ",
        "service_discovery.static.endpoints.default[2].tls_ca_file: ",
        "no certificate in the file",
        "service_discovery.static.endpoints.default[2].tls_server_name: \"not a name\" is not a DNS name or an IP address",
    ] {
        assert!(err.contains(want), "{want:?} missing from:\n{err}");
    }
}

#[test]
fn an_upstream_asking_for_a_client_certificate_gets_the_configured_one() {
    let (ca, clients) = (Ca::new(), Ca::new());
    let up = Mock::start_tls(
        ca.server_config_asking(&["127.0.0.1"], Some(&clients)),
        |req, s| json_reply(s, req, r#"{"ok":true}"#, &[]),
    );
    let url = up.https_url();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = clients.client_pem_files("mcp-gateway", dir.path());
    // Two namespaces on the same upstream: one presents the certificate, one has none.
    let keys = format!(
        "{}          tls_cert_file: {}\n          tls_key_file: {}\n",
        ca_key(&ca),
        cert.display(),
        key.display()
    );
    let yaml = format!(
        "{ROUTING}service_discovery:\n  static:\n    endpoints:\n      default:\n        - url: {url}\n{keys}      bare:\n        - url: {url}\n{}",
        ca_key(&ca)
    );
    let gw = start_with("", &yaml);
    let mut c = connect_from("127.0.0.2", gw.http);
    let r = roundtrip(&mut c, &post_mcp(TOOLS_LIST));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["result"]["ok"], true);
    let bare = post_mcp(TOOLS_LIST).replacen("/mcp", "/mcp/bare", 1);
    let r = roundtrip(&mut c, &bare);
    assert_eq!(r.status, 502, "no certificate, no session");
    assert_eq!(up.requests.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[test]
fn client_certificate_keys_are_checked() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let (cert, _) = ca.client_pem_files("x", dir.path());
    let e = |keys: String, url: &str| refused(&endpoint(url, &keys));
    let only_cert = format!("          tls_cert_file: {}\n", cert.display());
    let err = e(only_cert.clone(), "https://h/mcp");
    assert!(
        err.contains("default[0].tls_key_file: needed with tls_cert_file"),
        "{err}"
    );
    let err = e(only_cert, "http://h/mcp");
    assert!(
        err.contains("default[0].tls_cert_file: only for https:// upstreams"),
        "{err}"
    );
    let junk = format!(
        "          tls_cert_file: {}\n          tls_key_file: {}\n",
        cert.display(),
        cert.display()
    );
    let err = e(junk, "https://h/mcp");
    assert!(
        err.contains("default[0].tls_cert_file, tls_key_file: "),
        "{err}"
    );
}
