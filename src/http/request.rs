//! HTTP/1.1 request heads and bodies: parsing with hard size caps.
//!
//! Owns the translation of raw bytes into a small owned [`Head`] (only what the gateway acts on,
//! so no borrowed header array outlives the parse) and the decoding of `Content-Length` and
//! `chunked` bodies. Every input is bounded: [`MAX_HEAD`] bytes and [`MAX_HEADERS`] headers for a
//! head, `max_message_size` for a body. Ambiguous framing (both `Content-Length` and
//! `Transfer-Encoding`, or two different lengths) is refused, as RFC 9112 asks, so no request can
//! be smuggled past the gateway.

use crate::metrics::ProtocolError;

/// Largest request head, bytes (status 431 beyond).
pub const MAX_HEAD: usize = 16 * 1024;
/// Most header fields in a head (status 431 beyond).
pub const MAX_HEADERS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    Delete,
    /// A browser's CORS preflight: forwarded, so that an upstream that allows the page's origin
    /// can say so (the gateway's own `server.allowed_origins` check comes first).
    Options,
    Other,
}

/// Where a request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `/mcp` (the `default` namespace) or `/mcp/{ns}`: the namespace's upstream index.
    Mcp(usize),
    /// `/.well-known/oauth-protected-resource/mcp[/{ns}]` (RFC 9728's place for the metadata of
    /// the resource `/mcp[/{ns}]`), or `/.well-known/oauth-protected-resource` for `/mcp`: the
    /// namespace's upstream index, whose upstreams say where their clients get tokens.
    Metadata(usize),
    /// `/mcp/{ns}` for a namespace that is not configured.
    UnknownNamespace,
    NotFound,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    None,
    Length(usize),
    Chunked,
}

/// A WebSocket upgrade request's handshake fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    /// `Sec-WebSocket-Key` (base64 of 16 bytes).
    pub key: Option<String>,
    pub version_13: bool,
    /// The client offered the `mcp` subprotocol.
    pub mcp_protocol: bool,
}

/// What the gateway needs from a request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: Method,
    pub route: Route,
    pub keep_alive: bool,
    pub body: BodyKind,
    pub expect_continue: bool,
    /// The client accepts `text/event-stream` but not `application/json`.
    pub sse_only: bool,
    /// A `Content-Type` other than JSON was sent.
    pub bad_content_type: bool,
    /// Where the `Mcp-Session-Id` value is in the head, if one was sent.
    pub session: Option<(usize, usize)>,
    /// Where the `Origin` value is in the head, if one was sent (browsers do).
    pub origin: Option<(usize, usize)>,
    /// Where the `MCP-Protocol-Version` value is in the head, if one was sent (MCP clients
    /// send the negotiated revision with every request after `initialize`).
    pub protocol_version: Option<(usize, usize)>,
    /// HTTP/1.1 (not 1.0): can take a chunked response.
    pub http11: bool,
    pub upgrade: Option<Upgrade>,
    /// Bytes of the head, terminating blank line included.
    pub len: usize,
}

/// A request the gateway refuses, with the status it is owed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub message: &'static str,
    pub kind: ProtocolError,
}

const fn refuse(status: u16, message: &'static str, kind: ProtocolError) -> Refusal {
    Refusal {
        status,
        message,
        kind,
    }
}

pub const MALFORMED: Refusal = refuse(400, "malformed HTTP request", ProtocolError::Malformed);
pub const HEAD_TOO_LARGE: Refusal = refuse(
    431,
    "request header fields too large",
    ProtocolError::TooLarge,
);
pub const BODY_TOO_LARGE: Refusal = refuse(
    413,
    "request body larger than max_message_size",
    ProtocolError::TooLarge,
);
pub const TIMEOUT: Refusal = refuse(
    408,
    "request not received within read_timeout",
    ProtocolError::Timeout,
);
pub const FORBIDDEN_ORIGIN: Refusal = refuse(
    403,
    "Origin not allowed (server.allowed_origins)",
    ProtocolError::Origin,
);
/// RFC 9112, section 3.2: an HTTP/1.1 request names exactly one `Host` (HTTP/1.0: at most
/// one). Two could be read differently by the gateway's logs and whatever is in front of it.
const BAD_HOST: Refusal = refuse(
    400,
    "exactly one Host field required",
    ProtocolError::Malformed,
);
const BAD_FRAMING: Refusal = refuse(
    400,
    "ambiguous or invalid message framing",
    ProtocolError::Malformed,
);
const BAD_CHUNK: Refusal = refuse(400, "malformed chunked body", ProtocolError::Malformed);
const UNSUPPORTED_TE: Refusal = refuse(
    501,
    "unsupported transfer-encoding",
    ProtocolError::Malformed,
);

/// The method and the target (path and query) of the request line of `raw_head`, a head
/// [`parse_head`] accepted.
pub fn request_line(raw_head: &[u8]) -> (&[u8], &[u8]) {
    let line = raw_head.split(|b| *b == b'\r').next().unwrap_or(b"");
    let mut parts = line.split(|b| *b == b' ');
    (parts.next().unwrap_or(b""), parts.next().unwrap_or(b""))
}

/// The query part (with its `?`) of the request target in `raw_head`, or "".
pub fn query(raw_head: &[u8]) -> &str {
    let target = std::str::from_utf8(request_line(raw_head).1).unwrap_or("");
    target.find('?').map_or("", |i| &target[i..])
}

/// The path of the request target in `raw_head` (in origin form: `/mcp` of
/// `http://host/mcp?x`).
pub fn path(raw_head: &[u8]) -> &str {
    let target = std::str::from_utf8(request_line(raw_head).1).unwrap_or("");
    origin_form(target).split(['?', '#']).next().unwrap_or("")
}

/// Whether `buf` starts with a whole head that is HTTP/1.x by its syntax, whatever its fields
/// say (for the access log of a refused request; off the path of admitted ones).
pub fn is_http(buf: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    matches!(
        httparse::Request::new(&mut headers).parse(buf),
        Ok(httparse::Status::Complete(_))
    )
}

/// A `Content-Length` value: digits only (RFC 9110, section 8.6). Rust's integer parsing also
/// takes a leading `+`, which a proxy in front may read otherwise (or not at all), framing the
/// message differently: a way to smuggle a request past it.
pub fn content_length(value: &str) -> Option<u64> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

/// The request fields the door reads; every other field is passed on as it came.
#[derive(Clone, Copy)]
enum Field {
    Host,
    ContentLength,
    TransferEncoding,
    Connection,
    Expect,
    Accept,
    ContentType,
    SessionId,
    ProtocolVersion,
    Origin,
    Upgrade,
    WebSocketKey,
    WebSocketVersion,
    WebSocketProtocol,
}

impl Field {
    /// The field named `name` (any case), if the door reads it.
    fn of(name: &str) -> Option<Field> {
        const NAMES: [(&str, Field); 14] = [
            ("host", Field::Host),
            ("content-type", Field::ContentType),
            ("content-length", Field::ContentLength),
            ("accept", Field::Accept),
            ("mcp-session-id", Field::SessionId),
            ("mcp-protocol-version", Field::ProtocolVersion),
            ("connection", Field::Connection),
            ("transfer-encoding", Field::TransferEncoding),
            ("expect", Field::Expect),
            ("origin", Field::Origin),
            ("upgrade", Field::Upgrade),
            ("sec-websocket-key", Field::WebSocketKey),
            ("sec-websocket-version", Field::WebSocketVersion),
            ("sec-websocket-protocol", Field::WebSocketProtocol),
        ];
        NAMES
            .iter()
            .find(|(n, _)| name.eq_ignore_ascii_case(n))
            .map(|&(_, field)| field)
    }
}

/// Parses a head from the start of `buf`. `Ok(None)`: incomplete, read more.
/// `namespace` maps a namespace name to its upstream index.
pub fn parse_head(
    buf: &[u8],
    namespace: impl Fn(&str) -> Option<usize>,
) -> Result<Option<Head>, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => return Err(HEAD_TOO_LARGE),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HEAD_TOO_LARGE),
        Err(_) => return Err(MALFORMED),
    };
    if len > MAX_HEAD {
        return Err(HEAD_TOO_LARGE);
    }
    let http11 = req.version == Some(1);
    let method = match req.method.unwrap_or("") {
        "GET" => Method::Get,
        "POST" => Method::Post,
        "DELETE" => Method::Delete,
        "OPTIONS" => Method::Options,
        _ => Method::Other,
    };
    let route = route(req.path.unwrap_or(""), namespace);

    let mut keep_alive = http11;
    let mut hosts = 0u32;
    let mut length: Option<usize> = None;
    let mut chunked = false;
    let mut other_te = false;
    let mut expect_continue = false;
    let mut accept_json = false;
    let mut accept_sse = false;
    let mut accept_seen = false;
    let mut bad_content_type = false;
    let mut session = None;
    let mut origin = None;
    let mut protocol_version = None;
    let mut upgrade_ws = false;
    let mut connection_upgrade = false;
    let mut ws = Upgrade {
        key: None,
        version_13: false,
        mcp_protocol: false,
    };
    for h in req.headers.iter() {
        // Only the fields read here must be text: any other may carry obs-text (RFC 9110,
        // section 5.5: bytes 0x80-0xFF, Latin-1 from older clients) and goes upstream as it came.
        let Some(field) = Field::of(h.name) else {
            continue;
        };
        let value = std::str::from_utf8(h.value).map_err(|_| MALFORMED)?.trim();
        match field {
            Field::Host => hosts += 1,
            Field::ContentLength => {
                let n = content_length(value)
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or(BAD_FRAMING)?;
                if length.is_some_and(|m| m != n) {
                    return Err(BAD_FRAMING);
                }
                length = Some(n);
            }
            Field::TransferEncoding => {
                for coding in value.split(',').map(str::trim) {
                    if coding.eq_ignore_ascii_case("chunked") {
                        // Chunked twice (RFC 9112, section 6.1: never more than once) is a
                        // framing another server could read otherwise.
                        if chunked {
                            return Err(BAD_FRAMING);
                        }
                        chunked = true;
                    } else if !coding.is_empty() {
                        other_te = true;
                    }
                }
            }
            Field::Connection => {
                for token in value.split(',').map(str::trim) {
                    if token.eq_ignore_ascii_case("close") {
                        keep_alive = false;
                    } else if token.eq_ignore_ascii_case("keep-alive") {
                        keep_alive = true;
                    } else if token.eq_ignore_ascii_case("upgrade") {
                        connection_upgrade = true;
                    }
                }
            }
            Field::Expect => {
                expect_continue = value.eq_ignore_ascii_case("100-continue");
            }
            Field::Accept => {
                accept_seen = true;
                for item in value.split(',') {
                    let media = item.split(';').next().unwrap_or("").trim();
                    if media.eq_ignore_ascii_case("application/json")
                        || media == "*/*"
                        || media.eq_ignore_ascii_case("application/*")
                    {
                        accept_json = true;
                    } else if media.eq_ignore_ascii_case("text/event-stream") {
                        accept_sse = true;
                    }
                }
            }
            Field::ContentType => {
                let media = value.split(';').next().unwrap_or("").trim();
                bad_content_type = !media.eq_ignore_ascii_case("application/json");
            }
            Field::SessionId => {
                if !value.is_empty() {
                    session = Some(span(buf, value));
                }
            }
            Field::Origin => origin = Some(span(buf, value)),
            Field::ProtocolVersion => protocol_version = Some(span(buf, value)),
            Field::Upgrade => {
                upgrade_ws = value
                    .split(',')
                    .any(|p| p.trim().eq_ignore_ascii_case("websocket"));
            }
            Field::WebSocketKey => {
                ws.key = Some(value.to_string());
            }
            Field::WebSocketVersion => {
                ws.version_13 = value == "13";
            }
            Field::WebSocketProtocol => {
                ws.mcp_protocol |= value.split(',').any(|p| p.trim() == "mcp");
            }
        }
    }
    if hosts > 1 || (http11 && hosts == 0) {
        return Err(BAD_HOST);
    }
    let body = match (chunked, other_te, length) {
        (_, true, _) => return Err(UNSUPPORTED_TE),
        (true, _, Some(_)) => return Err(BAD_FRAMING),
        (true, _, None) if http11 => BodyKind::Chunked,
        (true, _, None) => return Err(BAD_FRAMING),
        (false, _, Some(0) | None) => BodyKind::None,
        (false, _, Some(n)) => BodyKind::Length(n),
    };
    let upgrade = (upgrade_ws && connection_upgrade && method == Method::Get).then_some(ws);
    Ok(Some(Head {
        method,
        route,
        keep_alive,
        body,
        expect_continue,
        sse_only: accept_seen && accept_sse && !accept_json,
        bad_content_type,
        session,
        origin,
        protocol_version,
        http11,
        upgrade,
        len,
    }))
}

/// Where `value`, a slice of `buf`, lies in it.
fn span(buf: &[u8], value: &str) -> (usize, usize) {
    let at = value.as_ptr() as usize - buf.as_ptr() as usize;
    (at, at + value.len())
}

/// Where the protected-resource metadata of an MCP endpoint is: this, then the endpoint's path
/// (RFC 9728, section 3.1).
pub const METADATA_PREFIX: &str = "/.well-known/oauth-protected-resource";

fn route(target: &str, namespace: impl Fn(&str) -> Option<usize>) -> Route {
    let path = origin_form(target).split(['?', '#']).next().unwrap_or("");
    let (endpoint, route): (_, fn(usize) -> Route) = match path.strip_prefix(METADATA_PREFIX) {
        Some("" | "/") => ("/mcp", Route::Metadata),
        Some(endpoint) => (endpoint, Route::Metadata),
        None => (path, Route::Mcp),
    };
    let ns = match endpoint.strip_prefix("/mcp") {
        Some("") | Some("/") => "default",
        Some(rest) => match rest.strip_prefix('/') {
            Some(ns) if !ns.contains('/') => ns.strip_suffix('/').unwrap_or(ns),
            _ => return Route::NotFound,
        },
        None => return Route::NotFound,
    };
    namespace(ns).map_or(Route::UnknownNamespace, route)
}

/// The path and query of a request target. A server must accept the absolute form too
/// (`http://host/mcp`, RFC 9112 section 3.2.2), which clients send to proxies: its scheme and
/// authority are dropped (the request still names its `Host`, which the gateway replaces).
fn origin_form(target: &str) -> &str {
    let scheme = |s: &str| {
        target
            .get(..s.len())
            .is_some_and(|t| t.eq_ignore_ascii_case(s))
    };
    let Some(rest) = ["http://", "https://"]
        .into_iter()
        .find(|s| scheme(s))
        .map(|s| &target[s.len()..])
    else {
        return target;
    };
    rest.find(['/', '?']).map_or("", |at| &rest[at..])
}

/// Progress of a chunked body decode over a buffer that grows as bytes arrive.
#[derive(Debug, Default)]
pub struct Chunked {
    /// Offset in the buffer of the next unparsed byte.
    pub pos: usize,
    /// Data bytes still expected in the current chunk (plus its CRLF once `in_data`).
    remaining: usize,
    in_data: bool,
    in_trailers: bool,
    /// Framing bytes read beyond what the data earns (see [`MAX_EXCESS`]).
    excess: usize,
}

/// How far the framing of a chunked body (size lines with their extensions, line ends, trailer
/// fields) may run ahead of its data: each chunk earns 16 bytes plus twice its size, and what is
/// not earned may add up to 16 KiB. Streaming a byte per chunk (5 bytes of framing each) is
/// fine; a body whose bytes are mostly extensions or trailers is refused, where it would
/// otherwise carry any amount past `max_message_size` (the rule of Go's `net/http` since
/// CVE-2023-39326).
const MAX_EXCESS: usize = 16 * 1024;

/// The longest chunk size line, extensions and line end included (Go's `net/http` allows 4 KiB
/// too). The same whether the line comes whole or in pieces: a body is read alike however its
/// bytes arrive.
const MAX_SIZE_LINE: usize = 4096;

/// Result of feeding [`Chunked::decode`].
#[derive(Debug, PartialEq, Eq)]
pub enum ChunkStep {
    /// Need more bytes.
    More,
    /// Body complete; the request ends at this offset.
    Done(usize),
}

impl Chunked {
    pub fn new(start: usize) -> Self {
        Chunked {
            pos: start,
            ..Default::default()
        }
    }

    /// Decodes from `buf[self.pos..]`, appending data to `body` (at most `max` bytes in all).
    pub fn decode(
        &mut self,
        buf: &[u8],
        body: &mut Vec<u8>,
        max: usize,
    ) -> Result<ChunkStep, Refusal> {
        loop {
            if self.in_trailers {
                // Trailer fields are ignored; the body ends at an empty line.
                let rest = &buf[self.pos..];
                let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
                    if rest.len() > MAX_HEAD {
                        return Err(HEAD_TOO_LARGE);
                    }
                    return Ok(ChunkStep::More);
                };
                self.pos += eol + 2;
                if eol == 0 {
                    return Ok(ChunkStep::Done(self.pos));
                }
                self.framing(eol + 2, 0)?; // a trailer field earns nothing
                continue;
            }
            if self.in_data {
                let avail = buf.len() - self.pos;
                if self.remaining > 0 {
                    let take = avail.min(self.remaining);
                    body.extend_from_slice(&buf[self.pos..self.pos + take]);
                    self.pos += take;
                    self.remaining -= take;
                    if self.remaining > 0 {
                        return Ok(ChunkStep::More);
                    }
                }
                if buf.len() - self.pos < 2 {
                    return Ok(ChunkStep::More);
                }
                if &buf[self.pos..self.pos + 2] != b"\r\n" {
                    return Err(BAD_CHUNK);
                }
                self.pos += 2;
                self.in_data = false;
                continue;
            }
            match httparse::parse_chunk_size(&buf[self.pos..]) {
                Ok(httparse::Status::Complete((used, size))) => {
                    if used > MAX_SIZE_LINE {
                        return Err(BAD_CHUNK); // as if it had come in pieces (below)
                    }
                    self.pos += used;
                    // The size line and the line end after the data, against what the chunk earns.
                    self.framing(used + 2, size.saturating_mul(2).saturating_add(16))?;
                    if size == 0 {
                        self.in_trailers = true;
                        continue;
                    }
                    let size = usize::try_from(size).map_err(|_| BODY_TOO_LARGE)?;
                    if body.len().saturating_add(size) > max {
                        return Err(BODY_TOO_LARGE);
                    }
                    self.remaining = size;
                    self.in_data = true;
                }
                Ok(httparse::Status::Partial) => {
                    if buf.len() - self.pos >= MAX_SIZE_LINE {
                        return Err(BAD_CHUNK); // it will be longer than the bound
                    }
                    return Ok(ChunkStep::More);
                }
                Err(_) => return Err(BAD_CHUNK),
            }
        }
    }

    /// Counts `bytes` of framing, of which `earned` are allowed for free.
    fn framing(&mut self, bytes: usize, earned: u64) -> Result<(), Refusal> {
        let earned = usize::try_from(earned).unwrap_or(usize::MAX);
        self.excess = (self.excess + bytes).saturating_sub(earned);
        if self.excess > MAX_EXCESS {
            return Err(BAD_CHUNK);
        }
        Ok(())
    }
}

#[cfg(all(test, not(loom)))]
mod tests;
