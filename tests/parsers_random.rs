//! Randomized robustness checks of every parser that reads client bytes: random inputs and
//! mutations of valid ones must never panic, and whatever is accepted must respect its caps.
//! (cargo-fuzz needs a nightly toolchain, which this project's machines do not have; this is the
//! stable-toolchain stand-in, deterministic so a failure reproduces.)

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
