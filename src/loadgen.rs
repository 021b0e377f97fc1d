//! The bench kit's load generator (`mcp-loadgen`), standing in for tcpkali: opens connections at
//! a given rate from a range of loopback source addresses, speaks HTTP, WebSocket or MCPB to the
//! gateway, sends one JSON-RPC message per interval on each, holds them, and reports connects,
//! rejections by kind, errors and latency percentiles.
//!
//! Owns nothing of the gateway: it is a client. One monoio runtime per thread, one task per
//! connection, so holding many idle connections costs it little (and it stays off the gateway's
//! hot path when run beside it). Rejections are classified as the gateway reports them: HTTP 429
//! `per_ip`, HTTP 503 `global`, a TCP connection closed before any answer `closed`.

use std::cell::RefCell;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

/// Which front door to speak to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http,
    WebSocket,
    Mcpb,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub target: SocketAddr,
    pub protocol: Protocol,
    pub connections: usize,
    /// New connections per second over all threads (0 = as fast as possible).
    pub rate: f64,
    /// How long each connection stays open after its first answer.
    pub hold: Duration,
    /// One message per interval on each held connection (None: only the first one).
    pub interval: Option<Duration>,
    /// Source addresses, used round-robin.
    pub sources: Vec<IpAddr>,
    pub threads: usize,
}

/// Counts and latencies of a run (summed over threads).
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub connected: u64,
    pub connect_errors: u64,
    pub rejected_per_ip: u64,
    pub rejected_global: u64,
    pub rejected_closed: u64,
    pub errors: u64,
    pub messages: u64,
    /// Message round trips, microseconds.
    pub latencies_us: Vec<u32>,
    pub elapsed: Duration,
}

impl Report {
    fn merge(&mut self, o: Report) {
        self.connected += o.connected;
        self.connect_errors += o.connect_errors;
        self.rejected_per_ip += o.rejected_per_ip;
        self.rejected_global += o.rejected_global;
        self.rejected_closed += o.rejected_closed;
        self.errors += o.errors;
        self.messages += o.messages;
        self.latencies_us.extend(o.latencies_us);
    }

    /// Latency percentile in milliseconds (0 when nothing was measured).
    pub fn percentile_ms(&self, p: f64) -> f64 {
        let mut v = self.latencies_us.clone();
        if v.is_empty() {
            return 0.0;
        }
        v.sort_unstable();
        let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
        v[i] as f64 / 1000.0
    }

    /// The report as `key value` lines (stable, for scripts).
    pub fn render(&self) -> String {
        format!(
            "connected {}\nconnect_errors {}\nrejected_per_ip {}\nrejected_global {}\nrejected_closed {}\nerrors {}\nmessages {}\nmessages_per_second {:.0}\nlatency_p50_ms {:.3}\nlatency_p90_ms {:.3}\nlatency_p99_ms {:.3}\nelapsed_seconds {:.3}\n",
            self.connected,
            self.connect_errors,
            self.rejected_per_ip,
            self.rejected_global,
            self.rejected_closed,
            self.errors,
            self.messages,
            self.messages as f64 / self.elapsed.as_secs_f64().max(1e-9),
            self.percentile_ms(50.0),
            self.percentile_ms(90.0),
            self.percentile_ms(99.0),
            self.elapsed.as_secs_f64(),
        )
    }
}

/// Parses `127.0.0.2-127.0.0.33` (or a single address) into the addresses of the range.
pub fn parse_sources(s: &str) -> Result<Vec<IpAddr>, String> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let a: Ipv4Addr = a
        .trim()
        .parse()
        .map_err(|_| format!("bad source address {a:?}"))?;
    let b: Ipv4Addr = b
        .trim()
        .parse()
        .map_err(|_| format!("bad source address {b:?}"))?;
    let (a, b) = (u32::from(a), u32::from(b));
    if b < a || b - a > 65_535 {
        return Err(format!("bad source range {s:?}"));
    }
    Ok((a..=b).map(|n| IpAddr::V4(Ipv4Addr::from(n))).collect())
}

/// Runs the plan to completion.
pub fn run(plan: &Plan) -> io::Result<Report> {
    let start = Instant::now();
    let threads: Vec<_> = (0..plan.threads.max(1))
        .map(|t| {
            let plan = plan.clone();
            std::thread::spawn(move || -> io::Result<Report> {
                let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
                    .enable_timer()
                    .build()?;
                Ok(rt.block_on(thread_main(plan, t)))
            })
        })
        .collect();
    let mut report = Report::default();
    for t in threads {
        report.merge(
            t.join()
                .map_err(|_| io::Error::other("loadgen thread panicked"))??,
        );
    }
    report.elapsed = start.elapsed();
    Ok(report)
}

async fn thread_main(plan: Plan, t: usize) -> Report {
    let threads = plan.threads.max(1);
    let mine: Vec<usize> = (t..plan.connections).step_by(threads).collect();
    let gap = if plan.rate > 0.0 {
        Duration::from_secs_f64(threads as f64 / plan.rate)
    } else {
        Duration::ZERO
    };
    let report = Rc::new(RefCell::new(Report::default()));
    let plan = Rc::new(plan);
    let mut handles = Vec::with_capacity(mine.len());
    let start = Instant::now();
    for (k, i) in mine.into_iter().enumerate() {
        let due = start + gap * k as u32;
        let now = Instant::now();
        if due > now {
            monoio::time::sleep(due - now).await;
        }
        let (plan, report) = (plan.clone(), report.clone());
        handles.push(monoio::spawn(async move {
            let src = plan.sources[i % plan.sources.len()];
            let outcome = connection(&plan, src, &report).await;
            let mut r = report.borrow_mut();
            match outcome {
                Outcome::Done => {}
                Outcome::ConnectError => r.connect_errors += 1,
                Outcome::PerIp => r.rejected_per_ip += 1,
                Outcome::Global => r.rejected_global += 1,
                Outcome::Closed => r.rejected_closed += 1,
                Outcome::Error => r.errors += 1,
            }
        }));
    }
    for h in handles {
        h.await;
    }
    Rc::try_unwrap(report)
        .map(RefCell::into_inner)
        .unwrap_or_default()
}

enum Outcome {
    Done,
    ConnectError,
    PerIp,
    Global,
    Closed,
    Error,
}

async fn connect(src: IpAddr, to: SocketAddr) -> io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(to), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.bind(&SocketAddr::new(src, 0).into())?;
    s.set_nonblocking(true)?;
    match s.connect(&to.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(s.into())?;
    stream.writable(false).await?;
    stream.peer_addr()?; // ENOTCONN when the connect failed
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

const MESSAGE: &[u8] = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"message":"hello"}}}"#;

fn request_bytes(p: Protocol) -> Vec<u8> {
    match p {
        Protocol::Http => {
            let mut r = format!(
                "POST /mcp HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nContent-Length: {}\r\n\r\n",
                MESSAGE.len()
            )
            .into_bytes();
            r.extend_from_slice(MESSAGE);
            r
        }
        Protocol::WebSocket => {
            let mask = [1u8, 2, 3, 4];
            let mut f = vec![0x81, 0x80 | MESSAGE.len() as u8];
            f.extend_from_slice(&mask);
            f.extend(MESSAGE.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
            f
        }
        Protocol::Mcpb => {
            let mut f = b"MCPB".to_vec();
            f.extend_from_slice(&1u16.to_be_bytes());
            f.extend_from_slice(&1u16.to_be_bytes());
            f.extend_from_slice(&(MESSAGE.len() as u32).to_be_bytes());
            f.extend_from_slice(MESSAGE);
            f
        }
    }
}

/// Reads until `complete(buf)` returns the length of one whole answer; returns it and keeps the
/// rest in `buf`. `Ok(None)`: EOF before any byte.
async fn read_answer(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    complete: impl Fn(&[u8]) -> Option<usize>,
) -> io::Result<Option<Vec<u8>>> {
    loop {
        if let Some(n) = complete(buf) {
            let answer = buf[..n].to_vec();
            buf.drain(..n);
            return Ok(Some(answer));
        }
        let mut chunk = Vec::with_capacity(8192);
        let (res, c) = s.read(chunk).await;
        chunk = c;
        match res? {
            0 if buf.is_empty() => return Ok(None),
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            _ => buf.extend_from_slice(&chunk),
        }
    }
}

fn http_len(b: &[u8]) -> Option<usize> {
    let mut h = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Response::new(&mut h);
    let head = match r.parse(b) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return None,
    };
    let len: usize = r
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
        .unwrap_or(0);
    (b.len() >= head + len).then_some(head + len)
}

fn ws_len(b: &[u8]) -> Option<usize> {
    if b.len() < 2 {
        return None;
    }
    let (len, at) = match b[1] & 0x7f {
        126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
        127 if b.len() >= 10 => (u64::from_be_bytes(b[2..10].try_into().ok()?) as usize, 10),
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    (b.len() >= at + len).then_some(at + len)
}

fn mcpb_len(b: &[u8]) -> Option<usize> {
    if b.len() < 12 {
        return None;
    }
    let len = u32::from_be_bytes(b[8..12].try_into().ok()?) as usize;
    (b.len() >= 12 + len).then_some(12 + len)
}

fn status(answer: &[u8]) -> u16 {
    let mut h = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Response::new(&mut h);
    let _ = r.parse(answer);
    r.code.unwrap_or(0)
}

async fn connection(plan: &Plan, src: IpAddr, report: &RefCell<Report>) -> Outcome {
    let Ok(mut s) = connect(src, plan.target).await else {
        return Outcome::ConnectError;
    };
    let mut buf = Vec::new();
    let frame_len: fn(&[u8]) -> Option<usize> = match plan.protocol {
        Protocol::Http => http_len,
        Protocol::WebSocket => ws_len,
        Protocol::Mcpb => mcpb_len,
    };
    if plan.protocol == Protocol::WebSocket {
        let hs = b"GET /mcp HTTP/1.1\r\nHost: gateway\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".to_vec();
        if s.write_all(hs).await.0.is_err() {
            return Outcome::Error;
        }
        match read_answer(&mut s, &mut buf, http_len).await {
            Ok(Some(a)) => match status(&a) {
                101 => {}
                429 => return Outcome::PerIp,
                503 => return Outcome::Global,
                _ => return Outcome::Error,
            },
            Ok(None) => return Outcome::Closed,
            Err(_) => return Outcome::Error,
        }
    }
    let request = request_bytes(plan.protocol);
    let held_until = Instant::now() + plan.hold;
    let mut first = true;
    loop {
        let sent = Instant::now();
        if s.write_all(request.clone()).await.0.is_err() {
            return if first {
                Outcome::Closed
            } else {
                Outcome::Error
            };
        }
        let answer = match read_answer(&mut s, &mut buf, frame_len).await {
            Ok(Some(a)) => a,
            Ok(None) => {
                return if first {
                    Outcome::Closed
                } else {
                    Outcome::Error
                }
            }
            Err(_) => {
                return if first {
                    Outcome::Closed
                } else {
                    Outcome::Error
                }
            }
        };
        if plan.protocol == Protocol::Http {
            match status(&answer) {
                200 => {}
                429 => return Outcome::PerIp,
                503 => return Outcome::Global,
                _ => return Outcome::Error,
            }
        }
        {
            let mut r = report.borrow_mut();
            if first {
                r.connected += 1;
            }
            r.messages += 1;
            r.latencies_us
                .push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
        }
        first = false;
        let Some(interval) = plan.interval else { break };
        let next = sent + interval;
        if next >= held_until {
            break;
        }
        let wait = next.saturating_duration_since(Instant::now());
        if !wait.is_zero() {
            monoio::time::sleep(wait).await;
        }
    }
    let left = held_until.saturating_duration_since(Instant::now());
    if !left.is_zero() {
        monoio::time::sleep(left).await;
    }
    Outcome::Done
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn source_ranges() {
        assert_eq!(parse_sources("127.0.0.2-127.0.0.4").unwrap().len(), 3);
        assert_eq!(parse_sources("127.0.0.9").unwrap().len(), 1);
        assert!(parse_sources("127.0.0.9-127.0.0.2").is_err());
    }

    #[test]
    fn answer_framing() {
        assert_eq!(
            http_len(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}x"),
            Some(40)
        );
        assert_eq!(
            http_len(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{"),
            None
        );
        assert_eq!(ws_len(&[0x81, 2, b'h', b'i']), Some(4));
        assert_eq!(mcpb_len(b"MCPB\0\x01\0\x02\0\0\0\x01x"), Some(13));
    }
}
