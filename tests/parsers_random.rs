//! Randomized robustness checks of every parser that reads client bytes: random inputs and
//! mutations of valid ones must never panic, and whatever is accepted must respect its caps.
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
