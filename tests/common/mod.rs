//! Test harness: runs the real `mcp-gateway` binary on loopback with a generated configuration,
//! and gives tests raw sockets bound to chosen client addresses.
#![allow(dead_code)]

pub mod mock;
pub mod tls;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_mcp-gateway");

/// A running gateway; killed on drop.
pub struct Gateway {
    child: Option<Child>,
    pub http: SocketAddr,
    pub tcp: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub log: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

/// Starts a gateway whose `server` section is `server_yaml` (indented by the caller or not: each
/// line is put under `server:`) on free ports, dual-stack on `::`.
pub fn start(server_yaml: &str) -> Gateway {
    start_with(server_yaml, "")
}

pub fn start_with(server_yaml: &str, rest_yaml: &str) -> Gateway {
    start_logging(server_yaml, rest_yaml, Log::Read("info"))
}

/// What the harness does with a gateway's log (stderr).
#[derive(Clone, Copy)]
pub enum Log {
    /// Reads it all into [`Gateway::log`], at this `RUST_LOG` level.
    Read(&'static str),
    /// Reads it up to the `listening` line, then never again (the pipe stays open and fills):
    /// a log consumer that stalls. At this `RUST_LOG` level.
    StallAfterStart(&'static str),
}

pub fn start_logging(server_yaml: &str, rest_yaml: &str, log_mode: Log) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    // `tcp_port: 0` disables the TCP door, so it gets a port that was free a moment ago.
    let mut yaml = String::from("server:\n  host: \"::\"\n  port: 0\n  metrics_port: 0\n");
    if !server_yaml.contains("workers") {
        yaml.push_str("  workers: 2\n");
    }
    // The TCP door needs a port of its own (0 disables it). It stays reserved until the gateway
    // listens on it: see `reserve_port`.
    let mut tcp_hold = None;
    if !server_yaml.contains("tcp_port") {
        let (hold, port) = reserve_port();
        tcp_hold = Some(hold);
        yaml.push_str(&format!("  tcp_port: {port}\n"));
    }
    for line in server_yaml.lines().filter(|l| !l.trim().is_empty()) {
        yaml.push_str("  ");
        yaml.push_str(line.trim());
        yaml.push('\n');
    }
    yaml.push_str(rest_yaml);
    let path = dir.path().join("gateway.yaml");
    std::fs::write(&path, &yaml).unwrap();
    let mut child = Command::new(BIN)
        .args(["-c", path.to_str().unwrap()])
        .env(
            "RUST_LOG",
            match log_mode {
                Log::Read(level) | Log::StallAfterStart(level) => level,
            },
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start mcp-gateway");
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let log = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            let mut lines = BufReader::new(stderr).lines();
            while let Some(line) = lines.next() {
                let Ok(line) = line else { break };
                {
                    let mut l = log.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
                // Only once the line is in the log: a test may read the log at once.
                if line.contains(" listening ") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(line);
                    }
                    if let Log::StallAfterStart(_) = log_mode {
                        // Keep the pipe open, unread, for the rest of the test process.
                        std::mem::forget(lines);
                        return;
                    }
                }
            }
        });
    }
    let line = rx.recv_timeout(Duration::from_secs(20));
    drop(tcp_hold);
    let line = line.unwrap_or_else(|_| {
        panic!(
            "gateway did not start; config:\n{yaml}\nlog:\n{}",
            log.lock().unwrap()
        )
    });
    let field = |name: &str| -> Option<SocketAddr> {
        let v = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))?;
        let addr: SocketAddr = v.parse().ok()?;
        // Connect to loopback of the listening family.
        Some(match addr.ip() {
            IpAddr::V6(ip) if ip.is_unspecified() => {
                SocketAddr::new("127.0.0.1".parse().unwrap(), addr.port())
            }
            IpAddr::V4(ip) if ip.is_unspecified() => {
                SocketAddr::new("127.0.0.1".parse().unwrap(), addr.port())
            }
            _ => addr,
        })
    };
    Gateway {
        http: field("http").expect("http address in log"),
        tcp: field("tcp"),
        admin: field("admin").expect("admin address in log"),
        child: Some(child),
        log,
        _dir: dir,
    }
}

/// A port on 127.0.0.1 that refuses connections for as long as the socket lives: bound but not
/// listening, so no other process can take it meanwhile (unlike a port that was free a moment ago).
pub fn refusing_port() -> (socket2::Socket, u16) {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let port = s.local_addr().unwrap().as_socket().unwrap().port();
    (s, port)
}

/// A port for a gateway's listener, held until the gateway binds it: a bound (not listening)
/// dual-stack socket with `SO_REUSEPORT`, which the gateway's own `SO_REUSEPORT` listeners may
/// join while no other process can take the port meanwhile. (With a port that was merely free a
/// moment ago, another test's gateway could take it as its HTTP port, and `SO_REUSEPORT` would
/// then silently split connections between the two processes.)
pub fn reserve_port() -> (socket2::Socket, u16) {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV6, Type::STREAM, None).unwrap();
    s.set_only_v6(false).unwrap();
    s.set_reuse_address(true).unwrap();
    s.set_reuse_port(true).unwrap();
    s.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)).into())
        .unwrap();
    let port = s.local_addr().unwrap().as_socket().unwrap().port();
    (s, port)
}

impl Gateway {
    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// Sends `signal` and waits (up to `limit`) for the exit status.
    pub fn stop(&mut self, signal: i32, limit: Duration) -> ExitStatus {
        unsafe { libc::kill(self.pid(), signal) };
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "gateway did not exit within {limit:?}; log:\n{}",
                    self.log.lock().unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn scrape(&self) -> String {
        let (status, _, body) = http_get(self.admin, "/metrics");
        assert_eq!(status, 200);
        String::from_utf8(body).unwrap()
    }

    /// The value of one sample, e.g. `metric("mcp_gateway_connections_active")` or
    /// `metric("mcp_gateway_connections_rejected_total{frontend=\"http\",reason=\"per_ip\"}")`.
    pub fn metric(&self, sample: &str) -> f64 {
        sample_value(&self.scrape(), sample)
    }

    /// Polls the metrics until `sample` equals `want` (a gauge settles as soon as the gateway
    /// has processed a close; the poll only absorbs that scheduling delay), or panics.
    pub fn wait_metric(&self, sample: &str, want: f64) {
        eventually(
            || self.metric(sample) == want,
            || {
                format!(
                    "{sample} is {}, expected {want}\n{}",
                    self.metric(sample),
                    self.scrape()
                )
            },
        );
    }

    /// Waits until the gateway's log contains `needle`, or panics after 10 s.
    pub fn wait_log(&self, needle: &str) {
        eventually(
            || self.log.lock().unwrap().contains(needle),
            || format!("no {needle:?} in the log:\n{}", self.log.lock().unwrap()),
        );
    }

    /// Waits until the gateway has accepted `n` connections in all (HTTP and MCPB doors). A
    /// client may have finished with a connection (closed or reset it) that still waits in the
    /// kernel's accept queue of a busy gateway: counts read before it is accepted miss it.
    pub fn wait_accepted(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = self.scrape();
            let http = sample_value(
                &text,
                "mcp_gateway_frontend_connections_accepted_total{frontend=\"http\"}",
            );
            let tcp = sample_value(&text, "mcp_gateway_tcp_connections_total");
            if http as usize + tcp as usize >= n {
                return;
            }
            if Instant::now() > deadline {
                panic!("accepted {http} + {tcp} of {n} connections\n{text}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Replaces `from` with `to` in the gateway's configuration file, sends SIGHUP and waits
    /// until the gateway says it reloaded (or refused to: the log tells which).
    pub fn reload(&self, from: &str, to: &str) {
        let path = self._dir.path().join("gateway.yaml");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(from), "{from:?} not in\n{text}");
        std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
        let done = |log: &str| {
            log.matches("configuration reloaded file=").count()
                + log.matches("configuration not reloaded").count()
        };
        let before = done(&self.log.lock().unwrap());
        unsafe { libc::kill(self.pid(), libc::SIGHUP) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while done(&self.log.lock().unwrap()) == before {
            assert!(
                Instant::now() < deadline,
                "no reload in\n{}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until every connection gauge and the tracked-IP count are zero, and the per-IP
    /// table is empty (the workers give the places their reserves keep back within a tick).
    pub fn wait_all_closed(&self) {
        for s in [
            "mcp_gateway_connections_active",
            "mcp_gateway_connections_total",
            "mcp_gateway_tcp_connections_active",
            "mcp_gateway_frontend_connections_active{frontend=\"http\"}",
            "mcp_gateway_frontend_connections_active{frontend=\"websocket\"}",
            "mcp_gateway_frontend_connections_active{frontend=\"tcp\"}",
            "mcp_gateway_tracked_ips",
            "mcp_gateway_ip_table_slots_used",
        ] {
            self.wait_metric(s, 0.0);
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Polls `done` every 10 ms until it holds, or panics after 10 s with what `why` says (asked
/// only then). For what settles as soon as another process or thread gets to it: the poll only
/// absorbs that scheduling delay.
pub fn eventually(mut done: impl FnMut() -> bool, why: impl FnOnce() -> String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        if Instant::now() > deadline {
            panic!("{}", why());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn sample_value(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(sample)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .unwrap_or_else(|| panic!("no sample {sample} in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// A TCP connection from `from` (port chosen by the kernel) to `to`.
pub fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let from: IpAddr = from.parse().unwrap();
    let to = match (from, to.ip()) {
        (IpAddr::V6(_), IpAddr::V4(_)) => SocketAddr::new("::1".parse().unwrap(), to.port()),
        _ => to,
    };
    let s = Socket::new(Domain::for_address(to), Type::STREAM, None).unwrap();
    s.set_reuse_address(true).unwrap();
    if from.is_ipv4() {
        // The port is chosen at `connect`, for this destination: tests that make tens of
        // thousands of connections from one address (and those beside them, from the same
        // address) would otherwise run out of the address's ports, which `bind` alone must
        // choose free for every destination.
        let on: libc::c_int = 1;
        // SAFETY: a live socket; the option reads one int for the duration of the call.
        let set = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&s),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(set, 0, "IP_BIND_ADDRESS_NO_PORT");
    }
    s.bind(&SocketAddr::new(from, 0).into()).unwrap();
    // Bounded, like every wait of a test: a full accept queue would otherwise retry for minutes.
    s.connect_timeout(&to.into(), Duration::from_secs(10))
        .unwrap();
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Reads from `s` into `buf` until `needle` appears; panics after 10 s.
pub fn read_until(s: &mut impl Read, buf: &mut Vec<u8>, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !String::from_utf8_lossy(buf).contains(needle) {
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in {:?}",
            String::from_utf8_lossy(buf)
        );
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk) {
            Ok(0) => panic!(
                "closed before {needle:?}: {:?}",
                String::from_utf8_lossy(buf)
            ),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("{e} before {needle:?}: {:?}", String::from_utf8_lossy(buf)),
        }
    }
}

/// `mcp-gateway check -c FILE` on `contents` written to a file named `file` (its extension picks
/// YAML or TOML): exit code, standard output, standard error.
pub fn check(contents: &str, file: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(file);
    std::fs::write(&path, contents).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["check", "-c", path.to_str().unwrap()])
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// Runs `mcp-gateway check` on `contents` (YAML) that must be refused (exit 64, a usage error);
/// returns what it said.
pub fn refused(contents: &str) -> String {
    let (code, _, err) = check(contents, "g.yaml");
    assert_eq!(code, 64, "{contents} was not refused: {err}");
    err
}

/// A JSON-RPC POST to `/mcp`.
pub fn post_mcp(body: &str) -> String {
    post_mcp_head(body.len()) + body
}

/// `request` (a head, and its body if any) with `Mcp-Session-Id: id` added to its head.
pub fn in_session(request: &str, id: &str) -> String {
    request.replacen("\r\n\r\n", &format!("\r\nMcp-Session-Id: {id}\r\n\r\n"), 1)
}

/// The head of a JSON-RPC POST to `/mcp` whose `body_len`-byte body the caller sends itself
/// (in pieces, late, or not at all).
pub fn post_mcp_head(body_len: usize) -> String {
    format!(
        "POST /mcp HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nContent-Length: {body_len}\r\n\r\n"
    )
}

pub const TOOLS_LIST: &str = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#;

/// An `initialize` request with id 0 (what mock upstreams look for; not a whole one).
pub const INIT: &str = r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{}}"#;

/// A WebSocket upgrade of `/mcp` (the RFC 6455 sample key; the answer's accept value is
/// `s3pPLMBiTxaQ9kYGzzhZRbK+xOo=`).
pub const WS_UPGRADE: &str = "GET /mcp HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mcp\r\n\r\n";

/// Reads one server WebSocket frame: (opcode, payload).
pub fn read_ws_frame(s: &mut (impl Read + Write)) -> (u8, Vec<u8>) {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).unwrap();
    assert_eq!(h[1] & 0x80, 0, "server frames are not masked");
    let len = match h[1] & 0x7f {
        126 => {
            let mut l = [0u8; 2];
            s.read_exact(&mut l).unwrap();
            u16::from_be_bytes(l) as usize
        }
        127 => {
            let mut l = [0u8; 8];
            s.read_exact(&mut l).unwrap();
            u64::from_be_bytes(l) as usize
        }
        n => n as usize,
    };
    let mut p = vec![0u8; len];
    s.read_exact(&mut p).unwrap();
    (h[0] & 0x0f, p)
}

/// A masked client WebSocket frame.
pub fn ws_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x12, 0x34, 0x56, 0x78];
    let mut f = vec![(if fin { 0x80 } else { 0 }) | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n < 65536 => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// One parsed HTTP response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&self.body)))
    }
}

/// Reads one response (Content-Length framed) from `s`, using `buf` for bytes read past it.
pub fn read_response(s: &mut (impl Read + Write), buf: &mut Vec<u8>) -> Option<Response> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(n)) = resp.parse(buf) {
            let status = resp.code.unwrap();
            let headers: Vec<(String, String)> = resp
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_string(),
                        String::from_utf8_lossy(h.value).to_string(),
                    )
                })
                .collect();
            let len: usize = headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .map_or(0, |(_, v)| v.parse().unwrap());
            while buf.len() < n + len {
                let mut chunk = [0u8; 8192];
                let r = s.read(&mut chunk).ok()?;
                if r == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..r]);
            }
            let body = buf[n..n + len].to_vec();
            buf.drain(..n + len);
            return Some(Response {
                status,
                headers,
                body,
            });
        }
        let mut chunk = [0u8; 8192];
        let r = s.read(&mut chunk).ok()?;
        if r == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..r]);
    }
}

/// Sends `req` and reads one response.
pub fn roundtrip(s: &mut (impl Read + Write), req: &str) -> Response {
    s.write_all(req.as_bytes()).unwrap();
    read_response(s, &mut Vec::new()).expect("a response")
}

/// True when the peer closed (EOF or reset) within the read timeout, with nothing more to read.
pub fn closed_by_peer(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
    }
}

/// A one-shot GET (admin port).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let r = read_response(&mut s, &mut Vec::new()).expect("admin response");
    let ct = r.header("content-type").unwrap_or("").to_string();
    (r.status, ct, r.body)
}

/// An MCPB frame: magic, version 1, `kind`, length, payload.
pub fn mcpb_frame(kind: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = b"MCPB".to_vec();
    f.extend_from_slice(&1u16.to_be_bytes());
    f.extend_from_slice(&kind.to_be_bytes());
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Reads one MCPB frame (checking magic and version): its type and payload.
pub fn read_mcpb_raw(s: &mut (impl Read + Write)) -> (u16, Vec<u8>) {
    let mut h = [0u8; 12];
    s.read_exact(&mut h).unwrap();
    assert_eq!(&h[..4], b"MCPB");
    assert_eq!(u16::from_be_bytes([h[4], h[5]]), 1);
    let kind = u16::from_be_bytes([h[6], h[7]]);
    let len = u32::from_be_bytes([h[8], h[9], h[10], h[11]]) as usize;
    let mut p = vec![0u8; len];
    s.read_exact(&mut p).unwrap();
    (kind, p)
}

/// Reads one MCPB frame whose payload is JSON.
pub fn read_mcpb(s: &mut (impl Read + Write)) -> (u16, serde_json::Value) {
    let (kind, p) = read_mcpb_raw(s);
    (kind, serde_json::from_slice(&p).unwrap())
}
