//! The forwarding path allocates nothing per request: keep-alive requests proxied to an HTTP
//! upstream reuse the core's buffers, boxed futures and pooled upstream connections. The
//! allocations other paths make are counted and bounded too: monoio's for a relayed event
//! stream, serde_json's for builtin:echo, those of a WebSocket or MCPB message's forward.
//!
//! The one test here that does not run the binary: allocations are counted by this process's
//! global allocator, so the gateway runs in it (the library's `runtime::run`, on a thread of
//! its own), with an upstream and a client that allocate nothing once started (fixed buffers
//! over `std::net`). Every allocation made while the client's requests are measured is the
//! gateway's, or a stray one of a timer tick (the sweeper, say): the bound leaves room for
//! those, not for one per request.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The system allocator, counting.
struct Counting;

/// Allocations made by the process (`alloc`, `alloc_zeroed`, `realloc`). Relaxed: a count read
/// after the requests it covers were answered (their replies read by this thread), which orders
/// the worker's increments before it.
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is passed on to `System` unchanged; the count has no effect on memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const REPLY: &[u8] =
    br#"{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"hello"}]}}"#;

/// The last chunk of a chunked body.
const END: &[u8] = b"0\r\n\r\n";

/// Event-stream replies whose event the client has read. The upstream ends each stream only
/// once its event reached the client, so the gateway relays it as a stream (not as a reply
/// that came whole). Release on the client's increment, Acquire on the upstream's read: only
/// the count itself is shared.
static EVENTS_SEEN: AtomicU64 = AtomicU64::new(0);

/// Event-stream replies the upstream has begun, over all its connections (the gateway may open
/// more than one): the number each stream waits for in `EVENTS_SEEN`. Relaxed: only the
/// upstream's threads count it.
static EVENTS_SENT: AtomicU64 = AtomicU64::new(0);

/// Reads from `s` into `buf` after its first `have` bytes until `whole` says the bytes are
/// complete; the new length, or 0 when the peer closed. Allocates nothing.
fn read_until(
    s: &mut TcpStream,
    buf: &mut [u8],
    mut have: usize,
    whole: fn(&[u8]) -> bool,
) -> usize {
    while !whole(&buf[..have]) {
        match s.read(&mut buf[have..]) {
            Ok(0) | Err(_) => return 0,
            Ok(n) => have += n,
        }
    }
    have
}

/// One whole HTTP message: its head, then a `Content-Length` or chunked body.
fn whole_message(b: &[u8]) -> bool {
    let Some(head) = b.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    match field(&b[..head], b"content-length") {
        Some(len) => {
            let len = len
                .iter()
                .filter(|b| b.is_ascii_digit())
                .fold(0, |n, d| n * 10 + usize::from(d - b'0'));
            b.len() >= head + 4 + len
        }
        // Chunked: whole at its last chunk (one message at a time: nothing follows).
        None => b[head + 4..].ends_with(END),
    }
}

/// `REPLY` (or builtin:echo's answer to the test's call, alike but for `isError`) is in the
/// bytes.
fn has_reply(b: &[u8]) -> bool {
    let echoed = &REPLY[..REPLY.len() - 2];
    b.windows(echoed.len()).any(|w| w == echoed)
}

/// The value of field `name` in `head`.
fn field<'h>(head: &'h [u8], name: &[u8]) -> Option<&'h [u8]> {
    head.split(|&b| b == b'\n').find_map(|line| {
        let colon = line.iter().position(|&b| b == b':')?;
        line[..colon]
            .eq_ignore_ascii_case(name)
            .then(|| &line[colon + 1..])
    })
}

/// An MCP server answering every request, keep-alive, a thread per connection: with `REPLY` as
/// JSON on `/json`; as one event of a chunked `text/event-stream` elsewhere, written at once
/// on `/whole`, and on `/events` ended only once the client has read the event (so the
/// gateway relays it as a stream).
fn upstream() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let r = String::from_utf8_lossy(REPLY);
    let json: &'static [u8] = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{r}",
        REPLY.len()
    )
    .leak()
    .as_bytes();
    let event = format!("event: message\ndata: {r}\n\n");
    let events: &'static [u8] = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{event}\r\n",
        event.len()
    )
    .leak()
    .as_bytes();
    let whole: &'static [u8] = [events, END].concat().leak();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            // The end of an event stream is a second small write: not held back for an ACK.
            conn.set_nodelay(true).unwrap();
            std::thread::spawn(move || {
                let mut buf = [0u8; 16 * 1024];
                loop {
                    let n = read_until(&mut conn, &mut buf, 0, whole_message);
                    if n == 0 {
                        return;
                    }
                    if buf.starts_with(b"POST /json ") {
                        if conn.write_all(json).is_err() {
                            return;
                        }
                        continue;
                    }
                    if buf.starts_with(b"POST /whole ") {
                        if conn.write_all(whole).is_err() {
                            return;
                        }
                        continue;
                    }
                    if conn.write_all(events).is_err() {
                        return;
                    }
                    let sent = EVENTS_SENT.fetch_add(1, Ordering::Relaxed) + 1;
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while EVENTS_SEEN.load(Ordering::Acquire) < sent && Instant::now() < deadline {
                        std::thread::yield_now();
                    }
                    if conn.write_all(END).is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// The test's call, as JSON.
const CALL: &[u8] =
    br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"message":"hello"}}}"#;

/// Allocations made while `exchange` runs `requests` times, after as many runs to warm up
/// (the gateway's pools fill: buffers, boxes, upstream connections).
fn counted(requests: u64, mut exchange: impl FnMut()) -> u64 {
    for _ in 0..requests {
        exchange();
    }
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for _ in 0..requests {
        exchange();
    }
    ALLOCATIONS.load(Ordering::Relaxed) - before
}

/// A connection to the gateway on `port`, once it listens (the listeners are bound before the
/// workers start, so the first connections may wait for them).
fn connect(port: u16) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(20);
    let s = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("the gateway did not listen: {e}"),
        }
    };
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// One keep-alive `POST` of the call to `path` on `client`, and its answer.
fn http<'c>(client: &'c mut TcpStream, path: &str) -> impl FnMut() + 'c {
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nContent-Length: {}\r\n\r\n",
        CALL.len()
    )
    .into_bytes();
    request.extend_from_slice(CALL);
    let events = path.ends_with("/events");
    let mut buf = vec![0u8; 16 * 1024];
    move || {
        client.write_all(&request).unwrap();
        let mut n = 0;
        if events {
            n = read_until(client, &mut buf, 0, has_reply);
            assert!(n > 0, "the gateway closed the connection");
            EVENTS_SEEN.fetch_add(1, Ordering::Release);
        }
        let n = read_until(client, &mut buf, n, whole_message);
        assert!(n > 0, "the gateway closed the connection");
        assert!(buf.starts_with(b"HTTP/1.1 200 "), "a 200");
        assert!(has_reply(&buf[..n]), "the reply");
    }
}

/// One WebSocket text message with the call on a connection upgraded on `path`, and its
/// reply message.
fn websocket(port: u16, path: &str) -> impl FnMut() {
    let mut ws = connect(port);
    let upgrade = format!(
        "GET {path} HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    ws.write_all(upgrade.as_bytes()).unwrap();
    let mut buf = vec![0u8; 16 * 1024];
    let n = read_until(&mut ws, &mut buf, 0, |b| b.ends_with(b"\r\n\r\n"));
    assert!(buf[..n].starts_with(b"HTTP/1.1 101 "), "upgraded");
    // Masked with a zero key: the payload as it is.
    assert!(CALL.len() < 126);
    let mut frame = vec![0x81, 0x80 | CALL.len() as u8, 0, 0, 0, 0];
    frame.extend_from_slice(CALL);
    move || {
        ws.write_all(&frame).unwrap();
        let n = read_until(&mut ws, &mut buf, 0, |b| match b {
            [_, len @ 0..=125, rest @ ..] => rest.len() >= usize::from(*len),
            [_, 126, a, c, rest @ ..] => rest.len() >= usize::from(u16::from_be_bytes([*a, *c])),
            _ => false,
        });
        assert!(n > 0, "the gateway closed the connection");
        assert_eq!(buf[0], 0x81, "a text message");
        assert!(has_reply(&buf[..n]), "the reply");
    }
}

/// One MCPB Request frame with the call, and its Response frame.
fn mcpb(port: u16) -> impl FnMut() {
    let mut s = connect(port);
    let mut frame = b"MCPB\0\x01\0\x01".to_vec();
    frame.extend_from_slice(&(CALL.len() as u32).to_be_bytes());
    frame.extend_from_slice(CALL);
    let mut buf = vec![0u8; 16 * 1024];
    move || {
        s.write_all(&frame).unwrap();
        let n = read_until(&mut s, &mut buf, 0, |b| {
            b.len() >= 12 && b.len() - 12 >= u32::from_be_bytes([b[8], b[9], b[10], b[11]]) as usize
        });
        assert!(n > 0, "the gateway closed the connection");
        assert_eq!(&buf[4..8], b"\0\x01\0\x02", "a Response frame");
        assert!(has_reply(&buf[..n]), "the reply");
    }
}

#[test]
fn allocations_per_keep_alive_request() {
    let up = upstream();
    let free = || {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (port, tcp_port) = (free(), free());
    let yaml = format!(
        "server:\n  host: 127.0.0.1\n  port: {port}\n  tcp_port: {tcp_port}\n  metrics_port: 0\n  workers: 1\n  pin_workers: false\n\
         service_discovery:\n  static:\n    endpoints:\n      \
         default:\n        - url: http://127.0.0.1:{up}/json\n      \
         json:\n        - url: http://127.0.0.1:{up}/json\n      \
         whole:\n        - url: http://127.0.0.1:{up}/whole\n      \
         events:\n        - url: http://127.0.0.1:{up}/events\n      \
         builtin:\n        - url: builtin:echo\n\
         routing:\n  health_check_interval: 3600\n"
    );
    // (Health checks, whose allocations would count, only at startup: an hour apart.)
    let config = mcp_gateway::config::Config::parse(&yaml, false).unwrap();
    std::thread::spawn(move || mcp_gateway::runtime::run(config, None));
    let mut client = connect(port);

    const REQUESTS: u64 = 2000;
    let check = |what: &str, each: u64, made: u64| {
        eprintln!("{made} allocations for {REQUESTS} {what}");
        assert!(
            made < REQUESTS * each + REQUESTS / 20,
            "{made} allocations for {REQUESTS} {what}"
        );
    };
    // (path, what, allocations allowed per request)
    for (path, what, each) in [
        ("/mcp/json", "keep-alive requests with JSON replies", 0),
        (
            "/mcp/whole",
            "requests with event-stream replies read whole",
            0,
        ),
        // A stream relayed while it lasts watches its client meanwhile; monoio records each
        // readiness wait it cancels (the watch, when the upstream speaks first) in a box of its
        // own: two per stream, none of the gateway's.
        ("/mcp/events", "requests with relayed event streams", 2),
        // Answered inside the gateway: serde_json's stack for the nested `params` it skips.
        ("/mcp/builtin", "requests answered by builtin:echo", 1),
    ] {
        check(what, each, counted(REQUESTS, http(&mut client, path)));
    }
    // A message forwarded from a WebSocket or MCPB session: the forward is polled by the
    // connection's own task in a reused block, its reply queued in a pooled buffer and sent
    // while the wait on the client goes on (a wait cancelled for the reply would be a box of
    // monoio's each time).
    check(
        "WebSocket messages forwarded",
        0,
        counted(REQUESTS, websocket(port, "/mcp/json")),
    );
    check(
        "MCPB frames forwarded",
        0,
        counted(REQUESTS, mcpb(tcp_port)),
    );
}
