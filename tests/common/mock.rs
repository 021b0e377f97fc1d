//! A scriptable HTTP/1.1 upstream for forwarding tests: a std listener on 127.0.0.1 whose
//! handler gets each parsed request and writes whatever raw response the test wants, over plain
//! TCP or, from [`Mock::start_tls`], over TLS.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Req {
    pub method: String,
    pub target: String,
    /// Lowercase names; every field kept in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Req {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn body_str(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap_or("")
    }
    pub fn header_map(&self) -> HashMap<String, String> {
        self.headers.iter().cloned().collect()
    }
}

pub type Handler<S = TcpStream> = dyn Fn(&Req, &mut S) + Send + Sync;

/// A connection of a TLS mock, as its handler writes to it.
pub type TlsConn = rustls::StreamOwned<rustls::ServerConnection, TcpStream>;

/// A running mock upstream; stops accepting (and closes its connections) on drop.
pub struct Mock {
    pub addr: SocketAddr,
    pub requests: Arc<AtomicUsize>,
    /// Connections accepted and not yet closed by the gateway (nor by the handler).
    open: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    conns: Arc<std::sync::Mutex<Vec<TcpStream>>>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

impl Mock {
    pub fn start(handler: impl Fn(&Req, &mut TcpStream) + Send + Sync + 'static) -> Mock {
        Mock::start_on("127.0.0.1:0", Arc::new(handler))
    }

    /// Starts on `addr` (e.g. the address of a mock that was stopped, to restart it).
    pub fn start_on(addr: &str, handler: Arc<Handler>) -> Mock {
        Mock::launch(addr, Some, handler)
    }

    /// A mock that speaks TLS with `config` (see [`super::tls`]); its URL is still
    /// [`Mock::url`]'s with `https`.
    pub fn start_tls(
        config: Arc<rustls::ServerConfig>,
        handler: impl Fn(&Req, &mut TlsConn) + Send + Sync + 'static,
    ) -> Mock {
        let wrap = move |s| {
            Some(TlsConn::new(
                rustls::ServerConnection::new(config.clone()).ok()?,
                s,
            ))
        };
        Mock::launch("127.0.0.1:0", wrap, Arc::new(handler))
    }

    fn launch<S: Read + Write + Send + 'static>(
        addr: &str,
        wrap: impl Fn(TcpStream) -> Option<S> + Send + 'static,
        handler: Arc<Handler<S>>,
    ) -> Mock {
        let listener = bind_retrying(addr);
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let conns = Arc::new(std::sync::Mutex::new(Vec::new()));
        let acceptor = {
            let (stop, requests, conns, open) =
                (stop.clone(), requests.clone(), conns.clone(), open.clone());
            std::thread::spawn(move || {
                for s in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(s) = s else { continue };
                    conns.lock().unwrap().push(s.try_clone().unwrap());
                    let Some(s) = wrap(s) else { continue };
                    let (handler, requests, open) =
                        (handler.clone(), requests.clone(), open.clone());
                    open.fetch_add(1, Ordering::SeqCst);
                    std::thread::spawn(move || {
                        serve(s, &*handler, &requests);
                        open.fetch_sub(1, Ordering::SeqCst);
                    });
                }
            })
        };
        Mock {
            addr,
            requests,
            open,
            stop,
            conns,
            acceptor: Some(acceptor),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/mcp", self.addr)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.conns.lock().unwrap().len()
    }

    /// Connections open now: accepted, and neither side has closed.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// The URL of a TLS mock.
    pub fn https_url(&self) -> String {
        format!("https://{}/mcp", self.addr)
    }
}

fn bind_retrying(addr: &str) -> TcpListener {
    for _ in 0..100 {
        if let Ok(l) = TcpListener::bind(addr) {
            return l;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("cannot bind {addr}");
}

impl Drop for Mock {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr); // wakes the accept loop, which then exits
                                               // Once joined, the listener is closed: new connections are refused from here on.
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn serve<S: Read + Write>(mut s: S, handler: &Handler<S>, requests: &AtomicUsize) {
    let mut buf = Vec::new();
    loop {
        let Some(req) = read_request(&mut s, &mut buf) else {
            return;
        };
        requests.fetch_add(1, Ordering::SeqCst);
        handler(&req, &mut s);
    }
}

fn read_request(s: &mut impl Read, buf: &mut Vec<u8>) -> Option<Req> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut r = httparse::Request::new(&mut headers);
        if let Ok(httparse::Status::Complete(n)) = r.parse(buf) {
            let headers: Vec<(String, String)> = r
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_ascii_lowercase(),
                        String::from_utf8_lossy(h.value).to_string(),
                    )
                })
                .collect();
            let len: usize = headers
                .iter()
                .find(|(k, _)| k == "content-length")
                .map_or(0, |(_, v)| v.parse().unwrap());
            let chunked = headers
                .iter()
                .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
            let req = Req {
                method: r.method.unwrap().to_string(),
                target: r.path.unwrap().to_string(),
                headers,
                body: Vec::new(),
            };
            buf.drain(..n);
            if chunked {
                let body = read_chunked(s, buf)?;
                return Some(Req { body, ..req });
            }
            while buf.len() < len {
                fill(s, buf)?;
            }
            let body = buf[..len].to_vec();
            buf.drain(..len);
            return Some(Req { body, ..req });
        }
        fill(s, buf)?;
    }
}

/// Decodes a chunked body from the front of `buf` (reading more as needed); trailers ignored.
fn read_chunked(s: &mut impl Read, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line = loop {
            if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                break i;
            }
            fill(s, buf)?;
        };
        let size_text = String::from_utf8_lossy(&buf[..line]).to_string();
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        buf.drain(..line + 2);
        while buf.len() < size + 2 {
            fill(s, buf)?;
        }
        body.extend_from_slice(&buf[..size]);
        buf.drain(..size + 2);
        if size == 0 {
            return Some(body);
        }
    }
}

fn fill(s: &mut impl Read, buf: &mut Vec<u8>) -> Option<()> {
    let mut chunk = [0u8; 8192];
    match s.read(&mut chunk) {
        Ok(0) | Err(_) => None,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Some(())
        }
    }
}

/// Writes a complete response with a Content-Length body.
pub fn respond(s: &mut impl Write, status: u16, headers: &[(&str, &str)], body: &str) {
    let mut out = format!("HTTP/1.1 {status} X\r\n");
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    let _ = s.write_all(out.as_bytes());
    let _ = s.flush();
}

/// A JSON-RPC result for the request `req` (its id echoed) carrying `result` (raw JSON).
pub fn json_reply(s: &mut impl Write, req: &Req, result: &str, extra: &[(&str, &str)]) {
    let id = serde_json::from_slice::<serde_json::Value>(&req.body)
        .ok()
        .and_then(|v| v.get("id").cloned())
        .unwrap_or(serde_json::Value::Null);
    let body = format!(r#"{{"jsonrpc":"2.0","id":{id},"result":{result}}}"#);
    let mut headers = vec![("Content-Type", "application/json")];
    headers.extend_from_slice(extra);
    respond(s, 200, &headers, &body);
}

/// The head of a `200` event-stream response with a chunked body: each event then goes as a
/// [`chunk`], and `0\r\n\r\n` ends the stream.
pub const SSE_HEAD: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";

/// One chunk of a chunked body.
pub fn chunk(s: &mut impl Write, data: &str) {
    let _ = write!(s, "{:x}\r\n{data}\r\n", data.len());
    let _ = s.flush();
}

/// A handler that opens an event stream (one comment event) and holds it until the gateway
/// closes its side, then sends on `closed`: a FIN, or a reset when the end of the chunk was
/// still unread as it closed (the stream is abandoned either way). A read timeout (15 s) is the
/// failure: nothing is sent.
pub fn stream_until_closed(
    closed: std::sync::mpsc::Sender<()>,
) -> impl Fn(&Req, &mut TcpStream) + Send + Sync + 'static {
    let closed = std::sync::Mutex::new(closed);
    move |_, s| {
        let _ = s.write_all(SSE_HEAD);
        chunk(s, ": open\n\n");
        let mut b = [0u8; 16];
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let ended = match s.read(&mut b) {
            Ok(n) => n == 0,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        };
        if ended {
            let _ = closed.lock().unwrap().send(());
        }
    }
}

/// A Unix-socket front for a mock: connections to `path` are relayed to the mock's TCP port,
/// byte for byte as they come, so any mock serves as an `http://unix:` upstream. On drop it
/// stops accepting, removes the socket file and closes the connections it relays, as a
/// dropped [`Mock`] closes its own.
pub struct UnixFront {
    pub path: std::path::PathBuf,
    stop: Arc<AtomicBool>,
    conns: Arc<std::sync::Mutex<Vec<std::os::unix::net::UnixStream>>>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

impl UnixFront {
    pub fn start(path: &std::path::Path, to: SocketAddr) -> UnixFront {
        let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(std::sync::Mutex::new(Vec::new()));
        let acceptor = {
            let (stop, conns) = (stop.clone(), conns.clone());
            std::thread::spawn(move || {
                for s in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let (Ok(s), Ok(t)) = (s, TcpStream::connect(to)) else {
                        continue;
                    };
                    conns.lock().unwrap().push(s.try_clone().unwrap());
                    let (s2, t2) = (s.try_clone().unwrap(), t.try_clone().unwrap());
                    std::thread::spawn(move || pipe(s, t));
                    std::thread::spawn(move || pipe(t2, s2));
                }
            })
        };
        UnixFront {
            path: path.to_path_buf(),
            stop,
            conns,
            acceptor: Some(acceptor),
        }
    }

    /// The upstream URL of this socket, with request path `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://unix:{}:{path}", self.path.display())
    }
}

/// Copies `from` to `to` until `from` ends, then ends `to`'s writing side.
fn pipe(mut from: impl Read + AsShutdown, mut to: impl Write + AsShutdown) {
    let mut buf = [0u8; 16 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buf) {
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    to.shut(std::net::Shutdown::Write);
    from.shut(std::net::Shutdown::Read);
}

/// `shutdown` for both kinds of socket the front relays between.
pub trait AsShutdown {
    fn shut(&self, how: std::net::Shutdown);
}

impl AsShutdown for TcpStream {
    fn shut(&self, how: std::net::Shutdown) {
        let _ = self.shutdown(how);
    }
}

impl AsShutdown for std::os::unix::net::UnixStream {
    fn shut(&self, how: std::net::Shutdown) {
        let _ = self.shutdown(how);
    }
}

impl Drop for UnixFront {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::os::unix::net::UnixStream::connect(&self.path); // wakes the accept loop
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}
