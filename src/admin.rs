//! The admin listener: `/metrics` (Prometheus text), `/healthz` (alive) and `/ready` (taking
//! traffic; 503 while starting or draining).
//!
//! Owns its own plain thread with a blocking listener, away from the workers: a scrape never
//! competes with client traffic on a worker core, and the admin port is never limited. It serves
//! one request per connection, each bounded to 2 seconds, so a stuck scraper delays the next
//! scrape at most that long.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::metrics::Metrics;

/// Whether the gateway takes traffic. Relaxed is enough: it only changes what `/ready` says.
pub static READY: AtomicBool = AtomicBool::new(false);

/// Serves the admin endpoints on `listener` from a new thread.
pub fn spawn(
    listener: TcpListener,
    metrics: &'static Metrics,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("mcp-admin".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => {
                        if let Err(e) = serve(stream, metrics) {
                            tracing::debug!(error = %e, "admin request failed");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "admin accept failed");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        })
}

fn serve(mut stream: TcpStream, metrics: &'static Metrics) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    let path = loop {
        let n = stream.read(&mut buf[len..])?;
        if n == 0 {
            return Ok(());
        }
        len += n;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[..len]) {
            Ok(httparse::Status::Complete(_)) => {
                let method = req.method.unwrap_or("");
                let path = req
                    .path
                    .unwrap_or("")
                    .split('?')
                    .next()
                    .unwrap_or("")
                    .to_string();
                break if method == "GET" || method == "HEAD" {
                    path
                } else {
                    String::new()
                };
            }
            Ok(httparse::Status::Partial) if len < buf.len() => continue,
            _ => break String::new(),
        }
    };
    let (status, content_type, body) = match path.as_str() {
        "/metrics" => (
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        "/healthz" => (200, "text/plain", "ok\n".to_string()),
        "/ready" if READY.load(Ordering::Relaxed) => (200, "text/plain", "ready\n".to_string()),
        "/ready" => (503, "text/plain", "not ready\n".to_string()),
        "" => (400, "text/plain", "bad request\n".to_string()),
        _ => (
            404,
            "text/plain",
            "not found: /metrics, /healthz, /ready\n".to_string(),
        ),
    };
    let reason = crate::http::response::reason(status);
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    stream.flush()
}
