//! `mcp-gateway check`, configuration errors, and graceful shutdown.

mod common;

use std::io::{BufRead, Write};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn check_prints_the_effective_configuration() {
    let (code, out, _) = check("server:\n  max_connections: 1234\n", "g.yaml");
    assert_eq!(code, 0);
    assert!(out.contains("max_connections: 1234"));
    assert!(
        out.contains("max_connections_per_ip: 1000"),
        "defaults are filled in:\n{out}"
    );
    assert!(out.contains("url: builtin:echo"));
    let (code, out, _) = check("[server]\nmax_connections_per_ip = 0\n", "g.toml");
    assert_eq!(code, 0);
    assert!(out.contains("max_connections_per_ip: 0"));
}

#[test]
fn bad_configuration_names_the_key_and_exits_64() {
    let err = refused("server:\n  max_connectionz: 5\n");
    assert!(
        err.contains("server.max_connectionz: unknown field"),
        "{err}"
    );
    // Every problem at once: keys that cannot be read and bad values alike.
    let err = refused(
        "server:\n  max_connections: 0\n  read_timeout: 0\n  bogus: 1\n  port: http\n\
         routing:\n  strategy: random\n",
    );
    for key in [
        "server.max_connections: must be at least 1",
        "server.read_timeout: 0 is not",
        "server.bogus: unknown field",
        "server.port: invalid type",
        "routing.strategy: unknown variant `random`",
    ] {
        assert!(err.contains(key), "all at once, {key:?} too: {err}");
    }
    let (code, _, err) = check("[server]\nport = \"http\"\n", "g.toml");
    assert_eq!(code, 64);
    assert!(err.contains("server.port"), "{err}");
}

#[test]
fn bundled_configs_check_clean() {
    for f in [
        "gateway.yaml",
        "development.yaml",
        "enterprise.yaml",
        "public.yaml",
    ] {
        let path = format!("{}/config/{f}", env!("CARGO_MANIFEST_DIR"));
        let out = Command::new(BIN)
            .args(["check", "-c", &path])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{f}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn a_second_gateway_on_the_same_port_is_warned_that_it_shares_the_connections() {
    let first = start("");
    let shared = first.tcp.unwrap().port();
    let second = start(&format!("tcp_port: {shared}"));
    let warned = |gw: &Gateway| {
        gw.log
            .lock()
            .unwrap()
            .contains("another socket already listens")
    };
    assert!(warned(&second), "{}", second.log.lock().unwrap());
    assert!(!warned(&first), "{}", first.log.lock().unwrap());
}

#[test]
fn sigterm_lets_a_request_in_flight_finish_then_exits_zero() {
    let mut gw = start("shutdown_timeout: 5");
    let mut idle = connect_from("127.0.0.2", gw.http);
    assert_eq!(roundtrip(&mut idle, &post_mcp(TOOLS_LIST)).status, 200);
    let mut busy = connect_from("127.0.0.3", gw.http);
    let req = post_mcp(TOOLS_LIST);
    let (a, b) = req.split_at(req.len() - 5);
    busy.write_all(a.as_bytes()).unwrap();
    gw.wait_metric("mcp_gateway_connections_active", 2.0);

    unsafe { libc::kill(gw.pid(), libc::SIGTERM) };
    // The idle keep-alive connection is closed promptly.
    assert!(closed_by_peer(&mut idle));
    // Every worker has stopped accepting (and so is draining) once connecting is refused.
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(gw.http).is_ok() {
        assert!(
            Instant::now() < deadline,
            "listeners still open after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // The request in flight is answered, with Connection: close.
    busy.write_all(b.as_bytes()).unwrap();
    let r = read_response(&mut busy, &mut Vec::new()).expect("the in-flight request is answered");
    assert_eq!((r.status, r.header("connection")), (200, Some("close")));
    let t = Instant::now();
    let status = gw.stop(0, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "exits once drained, not at shutdown_timeout"
    );
    assert!(gw.log.lock().unwrap().contains("shutting down"));
}

#[test]
fn sigint_with_a_stuck_client_exits_zero_after_shutdown_timeout() {
    let mut gw = start("shutdown_timeout: 0.5\nread_timeout: 30");
    let took = drain_with_a_stuck_client(&mut gw, libc::SIGINT);
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

/// A reloaded `shutdown_timeout` is the one the next drain waits for.
#[test]
fn a_reloaded_shutdown_timeout_is_the_one_a_drain_waits_for() {
    let mut gw = start("shutdown_timeout: 30\nread_timeout: 60");
    gw.reload("shutdown_timeout: 30", "shutdown_timeout: 0.5");
    assert!(gw.log.lock().unwrap().contains("shutdown_timeout changed"));
    let took = drain_with_a_stuck_client(&mut gw, libc::SIGTERM);
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(10),
        "{took:?}: the drain waited for the startup value"
    );
}

/// Stops `gw` with `signal` while a client is stuck in the middle of a request body: the
/// gateway exits 0 and closes that client. Returns how long the exit took.
fn drain_with_a_stuck_client(gw: &mut Gateway, signal: i32) -> Duration {
    let mut stuck = connect_from("127.0.0.2", gw.http);
    stuck
        .write_all(b"POST /mcp HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{")
        .unwrap();
    gw.wait_metric("mcp_gateway_connections_active", 1.0);
    let t = Instant::now();
    let status = gw.stop(signal, Duration::from_secs(20));
    let took = t.elapsed();
    assert_eq!(status.code(), Some(0));
    assert!(closed_by_peer(&mut stuck));
    took
}

/// Every YAML example in the README is a configuration `check` accepts, so the documentation
/// cannot drift from the keys the gateway takes.
#[test]
fn readme_yaml_examples_check_clean() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let mut examples = 0;
    let mut rest = readme.as_str();
    while let Some(start) = rest.find("```yaml\n") {
        let body = &rest[start + 8..];
        let end = body.find("```").expect("a closed yaml block");
        let (code, _, err) = check(&body[..end], "example.yaml");
        assert_eq!(code, 0, "README example:\n{}\n{err}", &body[..end]);
        examples += 1;
        rest = &body[end + 3..];
    }
    assert!(examples >= 2, "found {examples} yaml examples");
}

#[test]
fn json_logs_are_one_object_per_line_with_the_fields_as_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.yaml");
    std::fs::write(
        &path,
        "server: {host: 127.0.0.1, port: 0, tcp_port: 0, metrics_port: 0, workers: 1, max_connections_per_ip: 1}\n",
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["-c", path.to_str().unwrap(), "--log-format", "json"])
        .env("RUST_LOG", "debug")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut next = || -> serde_json::Value {
        let line = lines.next().expect("a log line").unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    };
    let starting = next();
    assert_eq!(starting["level"], "INFO");
    assert_eq!(starting["fields"]["message"], "mcp-gateway starting");
    assert_eq!(starting["fields"]["workers"], 1);
    assert_eq!(starting["fields"]["park_idle"], true);
    let listening = loop {
        let l = next();
        if l["fields"]["message"] == "listening" {
            break l;
        }
    };
    let http: std::net::SocketAddr = listening["fields"]["http"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    // A rejection's debug line names the client and the reason as fields.
    let _held = connect_from("127.0.0.2", http);
    let mut refused = connect_from("127.0.0.2", http);
    assert_eq!(roundtrip(&mut refused, &post_mcp(TOOLS_LIST)).status, 429);
    let rejected = loop {
        let l = next();
        if l["fields"]["message"] == "connection rejected" {
            break l;
        }
    };
    assert_eq!(rejected["fields"]["ip"], "127.0.0.2");
    assert_eq!(rejected["fields"]["reason"], "per_ip");
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}
