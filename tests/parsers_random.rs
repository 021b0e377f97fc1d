//! Randomized robustness checks of every parser that reads client bytes, and of those that read
//! what upstream MCP servers send: random inputs and mutations of valid ones must never panic,
//! and whatever is accepted must respect its caps.
//! (cargo-fuzz needs a nightly toolchain, which this project's machines do not have; this is the
//! stable-toolchain stand-in, deterministic so a failure reproduces.)

mod common;

use mcp_gateway::http::origin::{self, Origins};
use mcp_gateway::http::request::{parse_head, ChunkStep, Chunked, MAX_HEAD};
use mcp_gateway::proxy_protocol::{self, Parsed, MAX_HEADER};
use mcp_gateway::{echo, mcpb, websocket};

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const SEEDS: [&[u8]; 8] = [
    b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5\r\n\r\nhello",
    b"GET /mcp/ns HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nT: v\r\n\r\n",
    &[0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58],
    b"MCPB\x00\x01\x00\x01\x00\x00\x00\x2a{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"}",
    b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 8080\r\nPOST /mcp HTTP/1.1\r\n",
    b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c\xcb\x00\x71\x07\x0a\x00\x00\x01\xc8\x22\x1f\x90MCPB",
    br#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"message":"\u00e9"}}},{"jsonrpc":"2.0","method":"n"}]"#,
];

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(5) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            1 if !v.is_empty() => v.truncate(rng.below(v.len())),
            2 => {
                let i = rng.below(v.len() + 1);
                let bytes: Vec<u8> = (0..rng.below(16)).map(|_| rng.next() as u8).collect();
                v.splice(i..i, bytes);
            }
            3 => {
                let i = rng.below(v.len() + 1);
                let token: &[u8] = [
                    &b"\r\n"[..],
                    b"\r\n\r\n",
                    b":",
                    b",",
                    b"\"",
                    b"{",
                    b"]",
                    b"ffffffffffff",
                ][rng.below(8)];
                v.splice(i..i, token.iter().copied());
            }
            _ => v.extend((0..rng.below(32)).map(|_| rng.next() as u8)),
        }
    }
    v
}

/// How many inputs each parser accepted, to show the run reached past the error paths.
#[derive(Default, Debug)]
struct Accepted {
    heads: usize,
    chunked: usize,
    frames: usize,
    mcpb: usize,
    echo: usize,
    proxy: usize,
}

fn check(input: &[u8], seen: &mut Accepted) {
    let ns = |n: &str| (n == "default" || n == "ns").then_some(0);
    if let Ok(Some(h)) = parse_head(input, ns) {
        assert!(h.len <= input.len() && h.len <= MAX_HEAD);
        seen.heads += 1;
    }
    let mut body = Vec::new();
    if let Ok(ChunkStep::Done(end)) = Chunked::new(0).decode(input, &mut body, 64) {
        assert!(end <= input.len() && body.len() <= 64);
        seen.chunked += 1;
    }
    if let Ok(Some(f)) = websocket::parse_frame_head(input, 1000) {
        assert!(f.header_len <= 14 && f.payload_len <= 1000);
        seen.frames += 1;
    }
    if let Ok(Some((_, len))) = mcpb::parse_header(input, 1000) {
        assert!(len <= 1000);
        seen.mcpb += 1;
    }
    if let Ok(Parsed::Header { len, .. }) = proxy_protocol::parse(input) {
        assert!(len <= input.len() && len <= MAX_HEADER);
        seen.proxy += 1;
    }
    // The Origin check takes any bytes a client sends: what is not an origin is refused.
    if std::str::from_utf8(input).map_or(true, |v| origin::parse(v).is_none()) {
        assert!(!Origins::default().allows(input));
    }
    let mut out = Vec::new();
    if echo::handle(input, &mut out).replied {
        serde_json::from_slice::<serde_json::Value>(&out)
            .unwrap_or_else(|e| panic!("echo wrote invalid JSON ({e}) for {input:?}"));
        seen.echo += 1;
    }
}

#[test]
fn random_and_mutated_inputs_never_panic_and_respect_caps() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut seen = Accepted::default();
    for seed in SEEDS {
        check(seed, &mut seen);
    }
    for _ in 0..60_000 {
        let seed = SEEDS[rng.below(SEEDS.len())];
        check(&mutate(&mut rng, seed), &mut seen);
    }
    for _ in 0..20_000 {
        let len = rng.below(64);
        let random: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        check(&random, &mut seen);
    }
    let Accepted {
        heads,
        chunked,
        frames,
        mcpb,
        echo,
        proxy,
    } = seen;
    eprintln!("accepted: {seen:?}");
    assert!(
        heads > 1000 && chunked > 100 && frames > 1000 && mcpb > 100 && echo > 1000 && proxy > 100,
        "{seen:?}"
    );
}

/// The TLS stream after the handshake, over mutated records: a client (plain rustls, blocking,
/// in a thread) completes a handshake, makes one application-data record, changes it as
/// `mutate` does, sends it and closes its half. The gateway's stream must end in data, the end
/// (a record cut short) or an error, never a panic (debug assertions on) or a hang, and an
/// error must stay: the session is failed for good.
#[test]
fn mutated_tls_records_end_in_data_the_end_or_an_error() {
    use monoio::io::AsyncReadRent;
    use std::io::{Read, Write};
    use std::time::Duration;

    let ca = common::tls::Ca::new();
    let server = ca.server_config(&["localhost"]);
    let client = ca.client_config();
    let payload = b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/list\"}";
    let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build()
        .unwrap();
    let (mut data, mut ends, mut errors) = (0, 0, 0);
    rt.block_on(async {
        let listener = monoio::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut rng = Rng(0x7153_0bad_5eed_0001);
        for _ in 0..200 {
            let seed = rng.next();
            let client = client.clone();
            let sender = std::thread::spawn(move || {
                let mut rng = Rng(seed | 1);
                let mut sock = std::net::TcpStream::connect(addr).unwrap();
                let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                let mut tls = rustls::ClientConnection::new(client, name).unwrap();
                while tls.is_handshaking() {
                    tls.complete_io(&mut sock).unwrap();
                }
                tls.writer().write_all(payload).unwrap();
                let mut record = Vec::new();
                tls.write_tls(&mut record).unwrap();
                let bad = mutate(&mut rng, &record);
                let _ = sock.write_all(&bad);
                let _ = sock.shutdown(std::net::Shutdown::Write);
                let _ = sock.read_to_end(&mut Vec::new()); // its alert, or nothing
                bad == record
            });
            let (tcp, _) = listener.accept().await.unwrap();
            // The record may arrive with the client's last handshake message and fail the
            // handshake's last read: an error all the same.
            let mut stream = match mcp_gateway::tls::TlsStream::accept(tcp, &server).await {
                Ok(s) => s,
                Err(_) => {
                    assert!(!sender.join().unwrap(), "an unchanged record fails nothing");
                    errors += 1;
                    continue;
                }
            };
            let mut got = Vec::new();
            let end = loop {
                let read = stream.read(Vec::with_capacity(64));
                let (r, buf) = monoio::time::timeout(Duration::from_secs(10), read)
                    .await
                    .expect("the stream ends: the client closed its half");
                match r {
                    Ok(0) => break Ok(()),
                    Ok(_) => got.extend_from_slice(&buf),
                    Err(e) => break Err(e),
                }
            };
            if end.is_err() {
                assert!(stream.buffered(), "a failed session is ready (to fail)");
                let (again, _) = stream.read(Vec::with_capacity(64)).await;
                assert!(again.is_err(), "a failed session stays failed");
            }
            drop(stream); // the client reads until the connection closes
            let unchanged = sender.join().unwrap();
            match end {
                Ok(()) if got.is_empty() => ends += 1,
                Ok(()) => {
                    assert_eq!(got, payload, "what is read is what was sent");
                    data += 1;
                }
                Err(_) => {
                    assert!(!unchanged, "an unchanged record fails nothing");
                    errors += 1;
                }
            }
        }
    });
    eprintln!("mutated TLS records: {data} read, {ends} cut short, {errors} failed");
    assert!(
        errors > 100 && ends > 0,
        "the run reached past the error paths"
    );
}

/// Configuration documents changed at random, line by line and byte by byte, from the shipped
/// files (and a TOML one): reading never panics, a document is either a configuration whose
/// checks pass or a list of problems, each naming what it is about, never more than the bound.
#[test]
fn mutated_configuration_documents_are_read_or_refused_with_their_problems() {
    use mcp_gateway::config::{Config, MAX_PROBLEMS};

    const YAML: [&str; 4] = [
        include_str!("../config/gateway.yaml"),
        include_str!("../config/development.yaml"),
        include_str!("../config/enterprise.yaml"),
        include_str!("../config/public.yaml"),
    ];
    const TOML: &str = "[server]\nport = 8080\nmax_connections = 100\nper_ip_overrides = \
        [{network = \"10.0.0.0/8\", max_connections_per_ip = 5}]\n[routing]\nstrategy = \
        \"weighted\"\n[service_discovery.static.endpoints]\ndefault = [{url = \
        \"http://127.0.0.1:9000/mcp\", weight = 2}, {url = \"http://127.0.0.1:9001/mcp\"}]\n";
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let (mut read, mut refused, mut several) = (0, 0, 0);
    for round in 0..3_000 {
        let toml = round % 4 == 0;
        let seed = if toml {
            TOML
        } else {
            YAML[rng.below(YAML.len())]
        };
        let mut lines: Vec<String> = seed.lines().map(str::to_string).collect();
        for _ in 0..1 + rng.below(4) {
            let i = rng.below(lines.len());
            match rng.below(4) {
                0 => {
                    lines.remove(i);
                }
                1 => lines.insert(i, lines[i].clone()),
                2 => {
                    // A value replaced: a word, a number out of range, a list, nothing.
                    if let Some((key, _)) = lines[i].split_once([':', '=']) {
                        let value = ["bogus", "-1", "99999999999", "[1, 2]", "", "\"x\""];
                        let sep = if toml { " = " } else { ": " };
                        lines[i] = format!("{key}{sep}{}", value[rng.below(value.len())]);
                    }
                }
                _ => {
                    let bytes = mutate(&mut rng, lines[i].as_bytes());
                    lines[i] = String::from_utf8_lossy(&bytes).into_owned();
                }
            }
            if lines.is_empty() {
                break;
            }
        }
        let text = lines.join("\n");
        match Config::parse(&text, toml) {
            Ok(config) => {
                assert!(config.validate().is_ok(), "read but not valid:\n{text}");
                read += 1;
            }
            Err(problems) => {
                assert!(
                    !problems.is_empty() && problems.len() <= MAX_PROBLEMS,
                    "{problems:?}"
                );
                assert!(
                    problems.iter().all(|p| !p.trim().is_empty()),
                    "{problems:?}"
                );
                refused += 1;
                several += usize::from(problems.len() > 1);
            }
        }
    }
    eprintln!("read {read}, refused {refused} ({several} with several problems)");
    assert!(read > 100 && refused > 1000 && several > 50);
}

/// Upstream responses as MCP servers send them, for `mutated_upstream_responses...`: a JSON
/// reply, an event stream (chunked, with fields the `Connection` field names), an empty 202, an
/// HTTP/1.0 event stream to the close, a coded body with every hop-by-hop field, a 204 with a
/// length.
fn upstream_responses() -> Vec<Vec<u8>> {
    let chunk = |s: &str| format!("{:x}\r\n{s}\r\n", s.len());
    let events = "event: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}\n\n: keep\n\ndata: a\r\ndata: b\r\n\r\n";
    vec![
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 36\r\nMcp-Session-Id: s-1\r\n\r\n{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}".to_vec(),
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive, X-Private\r\nX-Private: 1\r\nKeep-Alive: timeout=5\r\n\r\n{}{}0\r\n\r\n",
            chunk(&events[..40]),
            chunk(&events[40..])
        )
        .into_bytes(),
        b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n".to_vec(),
        format!("HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\n{events}").into_bytes(),
        format!(
            "HTTP/1.1 404 Not Found\r\nTransfer-Encoding: gzip, chunked\r\nTrailer: X-T\r\nUpgrade: h2c\r\nTE: trailers\r\nProxy-Connection: keep-alive\r\nProxy-Authenticate: Basic\r\n\r\n{}0\r\nX-T: 1\r\n\r\n",
            chunk("hello")
        )
        .into_bytes(),
        b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n".to_vec(),
    ]
}

/// A body of kind `kind` fed to the decoder in pieces of the given sizes, then the upstream's
/// close: the decoded bytes, and `Ok(true)` for a body complete before the close, `Ok(false)` for
/// one the close ended, `Err` for a bad or cut one.
fn decode_body(
    kind: mcp_gateway::upstream::wire::BodyKind,
    bytes: &[u8],
    pieces: &[usize],
) -> (Vec<u8>, Result<bool, mcp_gateway::upstream::Failure>) {
    use mcp_gateway::upstream::wire::{Body, Feed};
    let mut body = Body::new(kind);
    let (mut buf, mut data, mut at) = (Vec::new(), Vec::new(), 0);
    if body.is_done() {
        return (data, Ok(true)); // no body: nothing is read
    }
    for &n in pieces {
        buf.extend_from_slice(&bytes[at..at + n]);
        at += n;
        match body.feed(&mut buf, &mut data) {
            Ok(Feed::Done) => return (data, Ok(true)),
            Ok(Feed::More) => {}
            Err(e) => return (data, Err(e)),
        }
    }
    (data, body.eof().map(|()| false))
}

/// Whether a response head has an `Mcp-Session-Id` that is not UTF-8 text.
fn session_id_not_text(response: &[u8]) -> bool {
    let mut fields = [httparse::EMPTY_HEADER; 128];
    let mut res = httparse::Response::new(&mut fields);
    res.parse(response).is_ok()
        && res.headers.iter().any(|f| {
            f.name.eq_ignore_ascii_case("mcp-session-id") && std::str::from_utf8(f.value).is_err()
        })
}

/// Sizes that add up to `len`, at random.
fn random_pieces(rng: &mut Rng, len: usize) -> Vec<usize> {
    let mut pieces = Vec::new();
    let mut left = len;
    while left > 0 {
        let n = 1 + rng.below(left.min(24));
        pieces.push(n);
        left -= n;
    }
    pieces
}

/// What the client gets of upstream head `upstream`: a complete head of the same status, none of
/// the hop-by-hop fields (those of RFC 9110 and those its `Connection` fields name), framing re-done (one length, or chunked, or neither), and `Connection:
/// close` exactly when the connection will close.
fn check_client_head(upstream: &[u8], head: &[u8], status: u16, keep_alive: bool) {
    // The fields the upstream's own `Connection` fields name are hop-by-hop too.
    let mut theirs = [httparse::EMPTY_HEADER; 128];
    let mut up = httparse::Response::new(&mut theirs);
    up.parse(upstream).unwrap();
    let connection_named: Vec<String> = up
        .headers
        .iter()
        .filter(|f| f.name.eq_ignore_ascii_case("connection"))
        .filter_map(|f| std::str::from_utf8(f.value).ok())
        .flat_map(|v| v.split(',').map(|t| t.trim().to_ascii_lowercase()))
        .filter(|t| !t.is_empty() && t != "close" && t != "keep-alive")
        .collect();
    let mut fields = [httparse::EMPTY_HEADER; 128];
    let mut res = httparse::Response::new(&mut fields);
    assert_eq!(
        res.parse(head),
        Ok(httparse::Status::Complete(head.len())),
        "{}",
        String::from_utf8_lossy(head)
    );
    assert_eq!(res.code, Some(status));
    let named = |name: &str| {
        res.headers
            .iter()
            .filter(|f| f.name.eq_ignore_ascii_case(name))
            .map(|f| f.value)
            .collect::<Vec<_>>()
    };
    for hop in [
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "proxy-authenticate",
    ]
    .into_iter()
    .chain(connection_named.iter().map(String::as_str))
    {
        assert!(named(hop).is_empty(), "{hop} crossed: {head:?}");
    }
    let framing = named("content-length").len() + named("transfer-encoding").len();
    assert!(framing <= 1, "{}", String::from_utf8_lossy(head));
    if let [te] = named("transfer-encoding")[..] {
        assert_eq!(te, b"chunked");
    }
    let close: &[&[u8]] = if keep_alive { &[] } else { &[b"close"] };
    assert_eq!(named("connection"), close);
}

/// The upstream side's parsers read bytes an upstream sends, which a broken or hostile MCP server
/// chooses: mutated responses never panic; a head is read alike with and without the client's
/// head written, and whatever prefix of it has come is incomplete, never an error; the client's
/// head is well formed; a body decodes to the same bytes and the same end whether it comes whole
/// or in random pieces.
#[test]
fn mutated_upstream_responses_are_read_alike_however_they_arrive() {
    use mcp_gateway::upstream::wire::{parse_response, ClientHead};
    use mcp_gateway::upstream::Failure;
    let seeds = upstream_responses();
    let mut rng = Rng(0xD1B5_4A32_D192_ED03);
    let (mut heads, mut bodies) = (0, 0);
    for i in 0..30_000 {
        let input = match i < seeds.len() {
            true => seeds[i].clone(),
            false => {
                let seed = &seeds[rng.below(seeds.len())];
                mutate(&mut rng, seed)
            }
        };
        let plain = parse_response(&input, None);
        let mut out = b"queued".to_vec();
        let (keep, http11) = (rng.below(2) == 0, rng.below(4) != 0);
        let mut client = ClientHead {
            out: &mut out,
            start: 6,
            tag: b"t0000000",
            keep_alive: keep,
            http11,
        };
        let rewritten = parse_response(&input, Some(&mut client));
        let client_keeps = client.keep_alive;
        let (n, head) = match (plain, rewritten) {
            (Err(a), Err(b)) => {
                assert_eq!(a, b);
                continue;
            }
            (Ok(None), Ok(None)) => {
                assert_eq!(out, b"queued", "nothing written for an incomplete head");
                continue;
            }
            (Ok(Some((n, a))), Ok(Some((m, b)))) => {
                assert_eq!(n, m);
                let same = |h: &mcp_gateway::upstream::wire::ResponseHead| {
                    (h.status, h.body, h.keep_alive, h.event_stream)
                };
                assert_eq!(same(&a), same(&b));
                (n, a)
            }
            // The one field read only without the client's head: the session id a WebSocket or
            // MCPB session keeps, which must be text (the HTTP door passes it on unread).
            (Err(Failure::BadResponse), Ok(Some(_))) if session_id_not_text(&input) => continue,
            (a, b) => panic!("{input:?}: {a:?} without the client's head, {b:?} with it"),
        };
        heads += 1;
        assert!(n <= input.len());
        let cut = rng.below(n);
        assert!(
            matches!(parse_response(&input[..cut], None), Ok(None)),
            "the first {cut} bytes of {input:?}"
        );
        check_client_head(&input[..n], &out[6..], head.status, client_keeps && keep);
        let body = &input[n..];
        let (data, end) = decode_body(head.body, body, &[body.len()]);
        let pieces = random_pieces(&mut rng, body.len());
        let (data2, end2) = decode_body(head.body, body, &pieces);
        assert_eq!(end, end2, "{input:?} in pieces {pieces:?}");
        if end.is_ok() {
            assert_eq!(data, data2, "{input:?} in pieces {pieces:?}");
            bodies += 1;
        }
    }
    eprintln!("heads read: {heads}, bodies decoded: {bodies}");
    assert!(heads > 5_000 && bodies > 3_000, "{heads} {bodies}");
}

/// Server-sent events (an event stream reply relayed to a WebSocket or MCPB client) are taken
/// whole, the same whether the stream comes at once or in random pieces, and none larger than
/// the message size is handed over, whatever bytes the upstream sends.
#[test]
fn mutated_event_streams_give_the_same_events_however_they_arrive() {
    use mcp_gateway::upstream::events::take_events;
    let seeds: [&[u8]; 3] = [
        b"event: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":1}\n\n",
        b": comment\n\ndata: a\r\ndata: b\r\n\r\nid: 7\nretry: 10\ndata:c\n\n",
        b"data: \n\ndata:  two spaces\n\n\n\ndata: x",
    ];
    let mut rng = Rng(0xA076_1D64_78BD_642F);
    let mut events_seen = 0;
    for _ in 0..20_000 {
        let mut stream = Vec::new();
        for _ in 0..1 + rng.below(3) {
            let seed = seeds[rng.below(seeds.len())];
            stream.extend(mutate(&mut rng, seed));
        }
        // With room for anything: the same events, whole or in pieces.
        let take_all = |data: &mut Vec<u8>, got: &mut Vec<Vec<u8>>| {
            take_events(data, usize::MAX, |e| {
                got.push(e.to_vec());
                true
            })
            .is_ok_and(|all| all)
        };
        let (mut whole, mut at_once) = (stream.clone(), Vec::new());
        assert!(take_all(&mut whole, &mut at_once));
        let (mut data, mut in_pieces, mut at) = (Vec::new(), Vec::new(), 0);
        for n in random_pieces(&mut rng, stream.len()) {
            data.extend_from_slice(&stream[at..at + n]);
            at += n;
            assert!(take_all(&mut data, &mut in_pieces));
        }
        assert_eq!(at_once, in_pieces, "{stream:?}");
        assert_eq!(whole, data, "the same rest is left");
        events_seen += at_once.len();
        // With a small message size: nothing larger is handed over, and a refusal leaves the
        // stream as it was from the event that was too large.
        let max = rng.below(24);
        let mut data = stream.clone();
        let mut sizes = Vec::new();
        let _ = take_events(&mut data, max, |e| {
            sizes.push(e.len());
            true
        });
        assert!(sizes.iter().all(|&s| s <= max), "{sizes:?} over {max}");
    }
    assert!(events_seen > 20_000, "{events_seen}");
}
