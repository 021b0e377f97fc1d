//! Hot parsing paths: an HTTP request head, a chunked body, a WebSocket frame header and a whole
//! WebSocket message, an MCPB frame header, and the builtin:echo JSON-RPC handler. `cargo bench --bench parsers`.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use mcp_gateway::conn::give_buf;
use mcp_gateway::http::request::{parse_head, Chunked};
use mcp_gateway::websocket::frames;
use mcp_gateway::{echo, mcpb, proxy_protocol};

const HEAD: &[u8] = b"POST /mcp HTTP/1.1\r\nHost: gateway.example\r\nUser-Agent: bench\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nMcp-Session-Id: 0123456789abcdef0123456789abcdef\r\nContent-Length: 103\r\n\r\n";
const CALL: &[u8] = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"message":"hello"}}}"#;

fn bench(c: &mut Criterion) {
    let ns = |n: &str| (n == "default").then_some(0);
    c.bench_function("http_parse_head", |b| {
        b.iter(|| parse_head(black_box(HEAD), ns).unwrap())
    });
    let chunked = b"40\r\n0123456789012345678901234567890123456789012345678901234567890123\r\n27\r\n012345678901234567890123456789012345678\r\n0\r\n\r\n";
    c.bench_function("http_chunked_decode", |b| {
        let mut body = Vec::with_capacity(256);
        b.iter(|| {
            body.clear();
            Chunked::new(0)
                .decode(black_box(chunked), &mut body, 1 << 20)
                .unwrap()
        })
    });
    let frame = [0x81u8, 0xfe, 0x01, 0x00, 1, 2, 3, 4];
    c.bench_function("websocket_frame_head", |b| {
        b.iter(|| frames::parse_frame_head(black_box(&frame), 1 << 20).unwrap())
    });
    // A whole 4 KiB text message read from its masked frame: head, unmasking, UTF-8 check.
    let text: Vec<u8> = CALL.iter().copied().cycle().take(4096).collect();
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut masked = vec![0x81, 0xfe, 0x10, 0x00];
    masked.extend(mask);
    masked.extend(text.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    c.bench_function("websocket_message_4k", |b| {
        let (mut buf, mut out) = (Vec::with_capacity(8192), Vec::new());
        let mut messages = frames::Messages::default();
        b.iter(|| {
            buf.clear();
            buf.extend_from_slice(&masked);
            match messages.read(&mut buf, 1 << 20, &mut out) {
                Ok(frames::Frame::Message(m)) => give_buf(black_box(m)),
                other => panic!("{other:?}"),
            }
        })
    });
    let mut f = Vec::new();
    mcpb::write_frame(&mut f, mcpb::FrameType::Request, CALL);
    c.bench_function("mcpb_header", |b| {
        b.iter(|| mcpb::parse_header(black_box(&f), 1 << 20).unwrap())
    });
    let v1 = b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 8080\r\n";
    c.bench_function("proxy_protocol_v1", |b| {
        b.iter(|| proxy_protocol::parse(black_box(v1)).unwrap())
    });
    let v2 =
        b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c\xcb\x00\x71\x07\x0a\x00\x00\x01\xc8\x22\x1f\x90";
    c.bench_function("proxy_protocol_v2", |b| {
        b.iter(|| proxy_protocol::parse(black_box(v2)).unwrap())
    });
    c.bench_function("echo_tools_call", |b| {
        let mut out = Vec::with_capacity(256);
        b.iter(|| {
            out.clear();
            echo::handle(black_box(CALL), &mut out)
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
