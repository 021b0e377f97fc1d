//! The official MCP Python SDK through the gateway: two real MCP servers built with the SDK
//! (Streamable HTTP, over plain HTTP and over TLS) as upstreams, and the SDK's own clients
//! (Streamable HTTP, with its standalone GET stream, and WebSocket) talking to them through the
//! gateway: tools, progress notifications on a request's stream, and a notification sent outside
//! any request (the standalone stream).
//!
//! Needs `python3` with the PyPI packages `mcp` (1.x), `uvicorn` and `websockets`; `.ci/run`
//! installs them. Outside CI the test is skipped, saying so, when they are missing.

mod common;

use std::io::Write as _;
use std::process::{Child, Command, Stdio};

use common::*;

fn sdk_available() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import mcp, uvicorn, websockets"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have the MCP Python SDK (pip install 'mcp<2' uvicorn websockets)"
        );
        eprintln!("SKIPPED: python3 with the MCP SDK is not installed (pip install 'mcp<2' uvicorn websockets)");
    }
    ok
}

struct Py(Child);

impl Drop for Py {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn py(dir: &str) -> String {
    format!("{}/tests/py/{dir}", env!("CARGO_MANIFEST_DIR"))
}

/// Where the SDK servers listen, and how the gateway reaches them.
#[derive(Clone, Copy)]
enum Up<'a> {
    /// A TCP port of 127.0.0.1, over TLS with a certificate from the CA when given.
    Tcp(Option<&'a tls::Ca>),
    /// A Unix socket (`http://unix:`).
    Unix,
}

impl<'a> Up<'a> {
    fn ca(self) -> Option<&'a tls::Ca> {
        match self {
            Up::Tcp(ca) => ca,
            Up::Unix => None,
        }
    }
}

/// What the SDK servers of a test do besides serving their tools.
#[derive(Clone, Copy, Default)]
struct Servers {
    /// Close each call's stream early, for the client to resume it.
    resumable: bool,
    /// Take only requests with `Authorization: Bearer` this token (OAuth resource servers).
    token: Option<&'static str>,
}

/// Starts an SDK server named `name`, listening as `up` says and behaving as `servers` says; it
/// prints the port (or socket) it listens on once it does.
fn upstream(name: &str, (up, servers): (Up, Servers), dir: &std::path::Path) -> (Py, String) {
    use std::io::BufRead;
    let mut cmd = Command::new("python3");
    cmd.args([&py("upstream.py"), "--name", name]);
    if servers.resumable {
        cmd.arg("--resumable");
    }
    if let Some(token) = servers.token {
        cmd.args(["--token", token]);
    }
    let ca = up.ca();
    if let Up::Unix = up {
        cmd.arg("--uds").arg(dir.join(format!("{name}.sock")));
    }
    if let Some(ca) = ca {
        let own = dir.join(name);
        std::fs::create_dir_all(&own).unwrap();
        let (cert, key) = ca.pem_files(&["127.0.0.1"], &own);
        cmd.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    if let Up::Unix = up {
        assert!(
            line.ends_with(".sock\n"),
            "SDK server {name} did not start: {line:?}"
        );
        return (Py(child), format!("http://unix:{}:/mcp", line.trim()));
    }
    let port: u16 = line
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("SDK server {name} did not start: {line:?}"));
    // It listens already (connections wait in its backlog until it serves them).
    let scheme = if ca.is_some() { "https" } else { "http" };
    (Py(child), format!("{scheme}://127.0.0.1:{port}/mcp"))
}

/// Runs the SDK's client against `url`, sending `token` with every request when given; over
/// TLS it trusts `ca` (`SSL_CERT_FILE`, which both httpx and Python's `ssl` read).
fn client(
    url: &str,
    transport: &str,
    sessions: usize,
    (ca, token): (Option<&tls::Ca>, Option<&str>),
) -> serde_json::Value {
    let mut cmd = Command::new("python3");
    if let Some(ca) = ca {
        cmd.env("SSL_CERT_FILE", &ca.ca_file);
    }
    cmd.args([&py("client.py"), "--url", url, "--transport", transport]);
    if let Some(token) = token {
        cmd.args(["--token", token]);
    }
    let out = cmd
        .args(["--sessions", &sessions.to_string(), "--calls", "4"])
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "SDK client ({transport}) failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Each session stays on one upstream, sessions spread over both, tools and progress work.
fn check(report: &serde_json::Value, sessions: usize) {
    let list = report["sessions"].as_array().unwrap();
    assert_eq!(list.len(), sessions);
    let mut used = std::collections::HashSet::new();
    for s in list {
        assert_eq!(
            s["tools"],
            serde_json::json!(["announce", "echo", "progress", "whoami"])
        );
        assert_eq!(
            s["list_changed_received"], true,
            "a notification sent outside any request reached the client"
        );
        let served = s["served_by"].as_array().unwrap();
        assert!(
            served.iter().all(|x| *x == served[0]),
            "a session moved: {s}"
        );
        assert_eq!(
            s["progress_result"],
            format!("{} done", served[0].as_str().unwrap())
        );
        assert_eq!(s["progress_events"], 3, "progress notifications came back");
        assert_eq!(s["echo"], "héllo");
        used.insert(served[0].as_str().unwrap().to_string());
    }
    assert_eq!(
        used.len(),
        2,
        "sessions spread over both upstreams: {report}"
    );
}

#[test]
fn sdk_clients_work_through_the_gateway_and_sessions_stick() {
    through_the_gateway(Up::Tcp(None), false, Servers::default());
}

#[test]
fn sdk_clients_work_through_the_gateway_with_https_upstreams() {
    through_the_gateway(Up::Tcp(Some(&tls::Ca::new())), false, Servers::default());
}

#[test]
fn sdk_clients_work_over_https_and_wss_through_the_gateway_to_https_upstreams() {
    through_the_gateway(Up::Tcp(Some(&tls::Ca::new())), true, Servers::default());
}

#[test]
fn sdk_clients_work_through_the_gateway_to_upstreams_on_unix_sockets() {
    through_the_gateway(Up::Unix, false, Servers::default());
}

/// MCP 2025-11-25's polling: the SDK servers close each `progress` call's stream after its first
/// notification. The SDK's HTTP client resumes it through the gateway (its `GET` with
/// `Last-Event-ID` goes to the session's upstream), and the gateway resumes it for the
/// WebSocket client; every call still gets all of its notifications and its result.
#[test]
fn sdk_servers_closing_streams_early_are_resumed_through_the_gateway() {
    let servers = Servers {
        resumable: true,
        ..Servers::default()
    };
    through_the_gateway(Up::Tcp(None), false, servers);
}

/// OAuth resource servers (the SDK's `auth`, taking one bearer token): the SDK's HTTP client
/// sends the token with each request, and the WebSocket client in its upgrade request, which
/// the gateway sends on with every request of the session. Without it, the HTTP client gets the
/// server's `401` as it came (with `WWW-Authenticate`, which tells an MCP client where to
/// authorize) and the server's protected-resource metadata where MCP clients look for it, and a
/// WebSocket client an error for its message naming the status, not the server's OAuth error
/// body (no JSON-RPC response, it would leave the client waiting).
#[test]
fn sdk_servers_that_require_a_bearer_token_get_it_from_both_doors() {
    let servers = Servers {
        token: Some("t0k3n"),
        ..Servers::default()
    };
    through_the_gateway(Up::Tcp(None), false, servers);
}

/// A client without the token the servers ask for, through the gateway's plain doors, and
/// where such a client learns how to get one.
fn without_the_token(gw: &Gateway) {
    let mut c = connect_from("127.0.0.2", gw.http);
    let r = roundtrip(&mut c, &post_mcp(INIT));
    assert_eq!(r.status, 401, "the server's answer, as it came");
    assert!(r
        .header("www-authenticate")
        .is_some_and(|v| v.starts_with("Bearer ")));
    // The server's protected-resource metadata (RFC 9728), where MCP clients look for it.
    let get = "GET /.well-known/oauth-protected-resource/mcp HTTP/1.1\r\nHost: t\r\n\r\n";
    let r = roundtrip(&mut c, get);
    assert_eq!(r.status, 200);
    let metadata = r.json();
    assert_eq!(metadata["resource"], "http://127.0.0.1/mcp", "{metadata}");
    assert_eq!(
        metadata["authorization_servers"][0], "https://auth.example.com/",
        "{metadata}"
    );
    let mut c = connect_from("127.0.0.2", gw.http);
    c.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    assert_eq!(roundtrip(&mut c, WS_UPGRADE).status, 101);
    c.write_all(&ws_frame(true, 1, INIT.as_bytes())).unwrap();
    let (op, reply) = read_ws_frame(&mut c);
    let reply: serde_json::Value = serde_json::from_slice(&reply).unwrap();
    assert_eq!((op, &reply["id"]), (1, &0.into()), "{reply}");
    let why = reply["error"]["message"].as_str().unwrap();
    assert!(why.contains("HTTP 401"), "{why}");
}

/// Two SDK servers listening as `up` says (over TLS with certificates from its CA, which the
/// gateway is told to trust; behaving as `servers` says), the SDK's clients through
/// the gateway on both its doors (over TLS too with `tls_doors`), and no upstream request
/// failed.
fn through_the_gateway(up: Up, tls_doors: bool, servers: Servers) {
    if !sdk_available() {
        return;
    }
    let ca = up.ca();
    let dir = tempfile::tempdir().unwrap();
    let (_a, a) = upstream("up-a", (up, servers), dir.path());
    let (_b, b) = upstream("up-b", (up, servers), dir.path());
    let trust = ca.map_or(String::new(), |ca| {
        format!("          tls_ca_file: {}\n", ca.ca_file.display())
    });
    let rest = format!(
        "routing:\n  health_check_interval: 1\nservice_discovery:\n  static:\n    endpoints:\n      default:\n        - url: {a}\n{trust}        - url: {b}\n{trust}"
    );
    let doors = match (ca, tls_doors) {
        (Some(ca), true) => ca.door_keys(dir.path()),
        _ => String::new(),
    };
    let gw = start_with(&doors, &rest);
    let port = gw.http.port();
    let (http, ws, trust) = match tls_doors {
        true => ("https", "wss", ca),
        false => ("http", "ws", None),
    };
    let as_client = (trust, servers.token);
    check(
        &client(
            &format!("{http}://127.0.0.1:{port}/mcp"),
            "http",
            4,
            as_client,
        ),
        4,
    );
    check(
        &client(&format!("{ws}://127.0.0.1:{port}/mcp"), "ws", 2, as_client),
        2,
    );
    if servers.token.is_some() {
        without_the_token(&gw);
    }
    gw.wait_all_closed();
    for u in [&a, &b] {
        let bad = [
            "connect_error",
            "timeout",
            "reset",
            "bad_response",
            "http_5xx",
            "tls_error",
        ];
        for outcome in bad {
            let s = format!("mcp_gateway_upstream_requests_total{{namespace=\"default\",upstream=\"{u}\",outcome=\"{outcome}\"}}");
            assert_eq!(gw.metric(&s), 0.0, "{s}");
        }
        let healthy =
            format!("mcp_gateway_upstream_healthy{{namespace=\"default\",upstream=\"{u}\"}}");
        assert_eq!(
            gw.metric(&healthy),
            1.0,
            "{healthy}: the health checks pass"
        );
    }
}
