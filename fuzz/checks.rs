//! What every parser that reads bytes from outside must hold, whatever the bytes.
//!
//! One home for these properties, used two ways:
//! - `tests/parsers_random.rs` (in the test suite, stable, deterministic): mutations of seed
//!   inputs from a fixed-seed generator, so a failure reproduces;
//! - the coverage-guided fuzz targets in `fuzz/fuzz_targets/` (`cargo fuzz run TARGET -s none`,
//!   stable too), which search for the inputs that reach new code.
//!
//! Each function panics when a property fails, naming the input, and returns what the input
//! reached, so a test can show that its run got past the error paths. A function that makes
//! choices besides its input (where to cut a stream into pieces) takes them from an [`Rng`]:
//! under the fuzzer that one is seeded from the input itself, so a finding reproduces from its
//! file alone.

use mcp_gateway::http::origin::{self, Origins};
use mcp_gateway::http::request::{parse_head, ChunkStep, Chunked, MAX_HEAD};
use mcp_gateway::proxy_protocol::{self, Parsed, MAX_HEADER};
use mcp_gateway::upstream::wire::{parse_response, BodyKind, Carried, ClientHead, ResponseHead};
use mcp_gateway::upstream::Failure;
use mcp_gateway::websocket::frames::parse_frame_head;
use mcp_gateway::{echo, mcpb};
use serde_json::value::RawValue;

/// xorshift64*: deterministic, no dependency.
pub struct Rng(pub u64);

impl Rng {
    /// A generator seeded from `bytes` (FNV-1a), for choices that must follow from an input.
    pub fn from_bytes(bytes: &[u8]) -> Rng {
        let h = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        Rng(h | 1) // never 0: xorshift would stay there
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// Sizes that add up to `len`, at random.
    pub fn pieces(&mut self, len: usize) -> Vec<usize> {
        let mut pieces = Vec::new();
        let mut left = len;
        while left > 0 {
            let n = 1 + self.below(left.min(24));
            pieces.push(n);
            left -= n;
        }
        pieces
    }
}

/// How many inputs each client-side parser accepted.
#[derive(Default, Debug)]
pub struct Accepted {
    pub heads: usize,
    pub chunked: usize,
    pub frames: usize,
    pub mcpb: usize,
    pub echo: usize,
    pub proxy: usize,
}

/// Bytes a client sends, given to every parser of the front doors: none panics, and whatever is
/// accepted respects its caps (the request head, a chunked body, a WebSocket frame head, an
/// MCPB header, a PROXY protocol header, the `Origin` check, the JSON-RPC error a failed forward
/// answers with, the built-in echo server's reply).
pub fn client_bytes(input: &[u8], seen: &mut Accepted) {
    let ns = |n: &str| (n == "default" || n == "ns").then_some(0);
    if let Ok(Some(h)) = parse_head(input, ns) {
        assert!(h.len <= input.len() && h.len <= MAX_HEAD);
        seen.heads += 1;
        // What a WebSocket session carries of its upgrade: its query, and whole field lines,
        // none of them one the gateway writes itself or the upgrade's own.
        if let Some(c) = Carried::of_upgrade(&input[..h.len]) {
            assert!(c.query().is_empty() || c.query().starts_with('?'));
            for line in c.fields().split_inclusive(|b| *b == b'\n') {
                assert!(line.ends_with(b"\r\n"), "{line:?} of {input:?}");
                let name =
                    String::from_utf8_lossy(&line[..line.iter().position(|b| *b == b':').unwrap()])
                        .to_ascii_lowercase();
                assert!(
                    !name.starts_with("sec-websocket-")
                        && ![
                            "host",
                            "accept",
                            "accept-encoding",
                            "connection",
                            "upgrade",
                            "content-length",
                            "x-forwarded-for"
                        ]
                        .contains(&name.as_str()),
                    "{name} carried from {input:?}"
                );
            }
        }
    }
    let mut body = Vec::new();
    if let Ok(ChunkStep::Done(end)) = Chunked::new(0).decode(input, &mut body, 64) {
        assert!(end <= input.len() && body.len() <= 64);
        seen.chunked += 1;
    }
    if let Ok(Some(f)) = parse_frame_head(input, 1000) {
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
    // The error a failed forward answers any message with: JSON, an error code, and an id that
    // is the message's own string or number, or null; for a batch of requests, an array of
    // such errors, one per request.
    let error = mcp_gateway::upstream::message::error_for(input, "upstream failed");
    let replies: Vec<ErrorReply> = match error.first() {
        Some(b'[') => serde_json::from_slice(&error),
        _ => serde_json::from_slice(&error).map(|one| vec![one]),
    }
    .unwrap_or_else(|e| panic!("{e} in the error {error:?} for {input:?}"));
    assert!(!replies.is_empty(), "no error for {input:?}");
    for reply in replies {
        let id = reply.id.get();
        assert!(
            id == "null" || echo::is_string_or_number(id),
            "id {id} for {input:?}"
        );
    }
    let mut out = Vec::new();
    if echo::handle(input, &mut out).replied {
        // JSON as RFC 8259 has it: an id is echoed as it came, a number beyond what a double
        // holds included; each reply's id a string, a number or null.
        let replies = match out.first() {
            Some(b'[') => serde_json::from_slice::<Vec<IdOf>>(&out),
            _ => serde_json::from_slice::<IdOf>(&out).map(|r| vec![r]),
        }
        .unwrap_or_else(|e| panic!("echo wrote invalid JSON ({e}) for {input:?}"));
        for IdOf { id } in replies {
            let id = id.get();
            assert!(
                id == "null" || echo::is_string_or_number(id),
                "id {id} for {input:?}"
            );
        }
        seen.echo += 1;
    }
}

/// A JSON-RPC reply's id.
#[derive(serde::Deserialize)]
struct IdOf<'a> {
    #[serde(borrow)]
    id: &'a RawValue,
}

/// The parts of a JSON-RPC error reply checked.
#[derive(serde::Deserialize)]
struct ErrorReply<'a> {
    #[serde(borrow)]
    id: &'a RawValue,
    #[allow(dead_code)] // read to check that it is there, and an integer
    error: ErrorObject,
}

#[derive(serde::Deserialize)]
struct ErrorObject {
    #[allow(dead_code)]
    code: i64,
}

/// What [`upstream_response`] got to.
#[derive(Debug, PartialEq, Eq)]
pub enum Response {
    /// Refused, or incomplete, alike with and without the client's head.
    NoHead,
    /// A head read; its body bad or cut short.
    Head,
    /// A head read and its body decoded alike whole and in pieces.
    Body,
}

/// Bytes an upstream sends (a broken or hostile MCP server chooses them): never a panic; a head
/// is read alike with and without the client's head written, and whatever prefix of it has come
/// is incomplete, never an error; the client's head is well formed; a body decodes to the same
/// bytes and the same end whether it comes whole or in pieces.
pub fn upstream_response(input: &[u8], rng: &mut Rng) -> Response {
    let plain = parse_response(input, None);
    let mut out = b"queued".to_vec();
    let (keep, http11) = (rng.below(2) == 0, rng.below(4) != 0);
    let mut client = ClientHead {
        out: &mut out,
        start: 6,
        tag: b"t0000000",
        keep_alive: keep,
        http11,
    };
    let rewritten = parse_response(input, Some(&mut client));
    let client_keeps = client.keep_alive;
    let (n, head) = match (plain, rewritten) {
        (Err(a), Err(b)) => {
            assert_eq!(a, b);
            return Response::NoHead;
        }
        (Ok(None), Ok(None)) => {
            assert_eq!(out, b"queued", "nothing written for an incomplete head");
            return Response::NoHead;
        }
        (Ok(Some((n, a))), Ok(Some((m, b)))) => {
            assert_eq!(n, m);
            let same = |h: &ResponseHead| (h.status, h.body, h.keep_alive, h.event_stream);
            assert_eq!(same(&a), same(&b));
            (n, a)
        }
        // The one field read only without the client's head: the session id a WebSocket or
        // MCPB session keeps, which must be text (the HTTP door passes it on unread).
        (Err(Failure::BadResponse), Ok(Some(_))) if session_id_not_text(input) => {
            return Response::NoHead
        }
        (a, b) => panic!("{input:?}: {a:?} without the client's head, {b:?} with it"),
    };
    assert!(n <= input.len());
    let cut = rng.below(n);
    assert!(
        matches!(parse_response(&input[..cut], None), Ok(None)),
        "the first {cut} bytes of {input:?}"
    );
    check_client_head(&input[..n], &out[6..], head.status, client_keeps && keep);
    let body = &input[n..];
    let (data, end) = decode_body(head.body, body, &[body.len()]);
    let pieces = rng.pieces(body.len());
    let (data2, end2) = decode_body(head.body, body, &pieces);
    assert_eq!(end, end2, "{input:?} in pieces {pieces:?}");
    if end.is_err() {
        return Response::Head;
    }
    assert_eq!(data, data2, "{input:?} in pieces {pieces:?}");
    Response::Body
}

/// A body of kind `kind` fed to the decoder in pieces of the given sizes, then the upstream's
/// close: the decoded bytes, and `Ok(true)` for a body complete before the close, `Ok(false)` for
/// one the close ended, `Err` for a bad or cut one.
fn decode_body(kind: BodyKind, bytes: &[u8], pieces: &[usize]) -> (Vec<u8>, Result<bool, Failure>) {
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

/// What the client gets of upstream head `upstream`: a complete head of the same status, none of
/// the hop-by-hop fields (those of RFC 9110 and those its `Connection` fields name), framing
/// re-done (one length, or chunked, or neither), and `Connection: close` exactly when the
/// connection will close.
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
        // A `Connection` field naming itself (`Connection: Connection`) says nothing more: the
        // client's own `Connection` field is checked below.
        .filter(|t| !t.is_empty() && !["close", "keep-alive", "connection"].contains(&t.as_str()))
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

/// An event stream an upstream sends (relayed to a WebSocket or MCPB client): events are taken
/// whole, the same whether the stream comes at once or in pieces, and none larger than the
/// message size is handed over. Returns how many events the stream held.
pub fn event_stream(stream: &[u8], rng: &mut Rng) -> usize {
    use mcp_gateway::upstream::events::take_events;
    // With room for anything: the same events (data, id and retry), whole or in pieces.
    type Got = Vec<(Vec<u8>, Option<Vec<u8>>, Option<u64>)>;
    let take_all = |data: &mut Vec<u8>, got: &mut Got| {
        take_events(data, usize::MAX, |e| {
            got.push((e.data.to_vec(), e.id.map(<[u8]>::to_vec), e.retry));
            true
        })
        .is_ok_and(|all| all)
    };
    let (mut whole, mut at_once) = (stream.to_vec(), Vec::new());
    assert!(take_all(&mut whole, &mut at_once));
    let (mut data, mut in_pieces, mut at) = (Vec::new(), Vec::new(), 0);
    for n in rng.pieces(stream.len()) {
        data.extend_from_slice(&stream[at..at + n]);
        at += n;
        assert!(take_all(&mut data, &mut in_pieces));
    }
    assert_eq!(at_once, in_pieces, "{stream:?}");
    assert_eq!(whole, data, "the same rest is left");
    // With a small message size: nothing larger is handed over.
    let max = rng.below(24);
    let mut data = stream.to_vec();
    let mut sizes = Vec::new();
    let _ = take_events(&mut data, max, |e| {
        sizes.push(e.data.len());
        true
    });
    assert!(sizes.iter().all(|&s| s <= max), "{sizes:?} over {max}");
    at_once.len()
}

/// The frames a WebSocket client sends: the same messages, pongs and verdict (a close frame's
/// code, or the violation the connection is closed with) whether the bytes come at once or in
/// pieces; every message UTF-8 and within the message size (chosen from the input, so the
/// 16- and 64-bit lengths are reached too); a wait for more only ever holds part of one frame;
/// what the gateway writes back is unmasked pongs. Returns how many messages were read.
pub fn websocket_frames(input: &[u8], rng: &mut Rng) -> usize {
    use mcp_gateway::websocket::frames::{CloseWith, Frame, Messages, MAX_HEAD};
    type Log = Vec<Result<Frame, CloseWith>>;
    let max = [16, 125, 300, 70_000][rng.below(4)];
    // Reads every whole frame in `buf`; true when the connection ends.
    let read = |m: &mut Messages, buf: &mut Vec<u8>, out: &mut Vec<u8>, log: &mut Log| loop {
        let frame = m.read(buf, max, out);
        match &frame {
            Ok(Frame::Handled) => {}
            Ok(Frame::Message(message)) => {
                assert!(
                    message.len() <= max,
                    "{} over {max}: {input:?}",
                    message.len()
                );
                assert!(std::str::from_utf8(message).is_ok(), "{input:?}");
            }
            Ok(Frame::Incomplete(None)) => {
                assert!(buf.len() < MAX_HEAD, "{input:?}");
                return false;
            }
            Ok(Frame::Incomplete(Some(n))) => {
                assert!(buf.len() < *n && *n <= MAX_HEAD + max, "{n}: {input:?}");
                return false;
            }
            Ok(Frame::Close(_)) | Err(_) => {
                log.push(frame);
                return true;
            }
        }
        log.push(frame);
    };
    let (mut whole, mut whole_out, mut at_once) = (Messages::default(), Vec::new(), Vec::new());
    let mut buf = input.to_vec();
    let ended = read(&mut whole, &mut buf, &mut whole_out, &mut at_once);
    let (mut pieces, mut out, mut in_pieces) = (Messages::default(), Vec::new(), Vec::new());
    let (mut data, mut at) = (Vec::new(), 0);
    for n in rng.pieces(input.len()) {
        data.extend_from_slice(&input[at..at + n]);
        at += n;
        if read(&mut pieces, &mut data, &mut out, &mut in_pieces) {
            break;
        }
    }
    assert_eq!(at_once, in_pieces, "{input:?}");
    assert_eq!(whole_out, out, "{input:?}");
    if !ended {
        assert_eq!(buf, data, "the same rest is left: {input:?}");
    }
    // Only pongs go back, each an unmasked final frame of at most 125 bytes.
    let mut rest = &out[..];
    while let [0x8a, len @ 0..=125, tail @ ..] = rest {
        let Some(after) = tail.get(*len as usize..) else {
            break;
        };
        rest = after;
    }
    assert!(rest.is_empty(), "{out:?} for {input:?}");
    at_once
        .iter()
        .filter(|f| matches!(f, Ok(Frame::Message(_))))
        .count()
}

/// A configuration document (`toml`: read as TOML, else YAML): reading never panics, and a
/// document is either a configuration whose checks pass or a list of problems, each saying
/// something, never more than the bound. `Ok(())` when read, `Err(n)` for `n` problems.
pub fn configuration(text: &str, toml: bool) -> Result<(), usize> {
    use mcp_gateway::config::{Config, MAX_PROBLEMS};
    match Config::parse(text, toml) {
        Ok(config) => {
            assert!(config.validate().is_ok(), "read but not valid:\n{text}");
            Ok(())
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
            Err(problems.len())
        }
    }
}
