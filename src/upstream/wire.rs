//! The HTTP/1.1 wire format of the upstream side: the request head sent upstream, the response
//! head parsed (and rewritten for the client), and the response body decoded piece by piece.
//!
//! Invariants:
//! - Hop-by-hop fields (RFC 9110 7.6.1: `Connection`, the fields it names, `Keep-Alive`,
//!   `Proxy-Connection`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`, `Proxy-Authenticate`,
//!   and `Proxy-Authorization` meant for the gateway) never cross; framing is re-done on each side.
//! - Response heads are bounded (32 KiB, 96 fields);
//!   ambiguous framing (two different lengths) is a bad response, never guessed at.

use std::io::Write as _;
use std::net::IpAddr;
use std::rc::Rc;

use super::{Failure, Upstream, TAG_LEN};
use crate::http::request::{ChunkStep, Chunked};

/// Largest upstream response head.
const MAX_RESPONSE_HEAD: usize = 32 * 1024;
const MAX_RESPONSE_HEADERS: usize = 96;

/// How the response body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    None,
    Length(u64),
    Chunked,
    /// Until the upstream closes (no length, not chunked).
    UntilClose,
}

/// What the gateway needs from an upstream response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub body: BodyKind,
    /// The upstream keeps the connection open after this response.
    pub keep_alive: bool,
    /// `Content-Type: text/event-stream`.
    pub event_stream: bool,
    /// The upstream's `Mcp-Session-Id`, if it sent one (only read when no client head is
    /// written: the HTTP door passes it through, tagged, without looking).
    pub session: Option<Vec<u8>>,
}

/// Where and how to write the response head the client gets.
pub struct ClientHead<'a> {
    pub out: &'a mut Vec<u8>,
    /// Where this head starts in `out` (earlier bytes are answers already queued).
    pub start: usize,
    /// Tag to put in front of the upstream's session id.
    pub tag: &'a [u8; TAG_LEN],
    pub keep_alive: bool,
    /// The client speaks HTTP/1.1 (can take a chunked body).
    pub http11: bool,
}

/// True for a hop-by-hop field: one of RFC 9110's list, or one named by a `Connection` field of
/// `headers` when `named` (see [`names_fields`]). No allocation: `Connection` values are scanned
/// in place (they are short).
fn is_hop_by_hop(name: &str, headers: &[httparse::Header<'_>], named: bool) -> bool {
    const HOP: [&str; 8] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
    ];
    HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
        || (named && connection_tokens(headers).any(|t| name.eq_ignore_ascii_case(t)))
}

/// Whether a `Connection` field names other fields than its usual `keep-alive` and `close`
/// (checked once per head, so the common head costs no per-field scan of `Connection`).
fn names_fields(headers: &[httparse::Header<'_>]) -> bool {
    connection_tokens(headers)
        .any(|t| !t.eq_ignore_ascii_case("keep-alive") && !t.eq_ignore_ascii_case("close"))
}

/// The tokens of every `Connection` field.
fn connection_tokens<'h>(headers: &'h [httparse::Header<'_>]) -> impl Iterator<Item = &'h str> {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .filter_map(|h| std::str::from_utf8(h.value).ok())
        .flat_map(|v| v.split(',').map(str::trim))
        .filter(|t| !t.is_empty())
}

/// Parses a response head; `Ok(None)`: incomplete. With `client`, writes the client's head.
pub fn parse_response(
    buf: &[u8],
    client: Option<&mut ClientHead<'_>>,
) -> Result<Option<(usize, ResponseHead)>, Failure> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut res = httparse::Response::new(&mut headers);
    let len = match res.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_RESPONSE_HEAD => return Ok(None),
        _ => return Err(Failure::BadResponse),
    };
    // A status is three digits from 100 to 599 (RFC 9110, section 15): any other would reach the
    // client as a status line it cannot read (`HTTP/1.1 0 OK` for an upstream's `000`).
    let status = res
        .code
        .filter(|c| (100..600).contains(c))
        .ok_or(Failure::BadResponse)?;
    let mut keep_alive = res.version == Some(1);
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut transfer_coded = false;
    let mut event_stream = false;
    let mut session = None;
    if connection_tokens(res.headers).any(|t| t.eq_ignore_ascii_case("close")) {
        keep_alive = false;
    }
    for h in res.headers.iter() {
        // Only the fields read here must be text: any other may carry obs-text (RFC 9110,
        // section 5.5) and reaches the client as it came.
        let value = || {
            std::str::from_utf8(h.value)
                .map(str::trim)
                .map_err(|_| Failure::BadResponse)
        };
        if h.name.eq_ignore_ascii_case("content-length") {
            let value = value()?;
            let n = crate::http::request::content_length(value).ok_or(Failure::BadResponse)?;
            if length.is_some_and(|m| m != n) {
                return Err(Failure::BadResponse);
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            let value = value()?;
            transfer_coded = true;
            chunked = value
                .rsplit(',')
                .next()
                .is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"));
        } else if h.name.eq_ignore_ascii_case("content-type") {
            let value = value()?;
            event_stream = value
                .split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("text/event-stream"));
        } else if h.name.eq_ignore_ascii_case("mcp-session-id") && client.is_none() {
            let value = value()?;
            if !value.is_empty() {
                session = Some(value.as_bytes().to_vec());
            }
        }
    }
    let no_body = status == 204 || status == 304 || (100..200).contains(&status);
    let body = if no_body {
        BodyKind::None
    } else if chunked {
        BodyKind::Chunked
    } else if transfer_coded {
        // Coded, but not chunked last: the body runs to the close, whatever a `Content-Length`
        // says (RFC 9112, section 6.3).
        keep_alive = false;
        BodyKind::UntilClose
    } else if let Some(n) = length {
        if n == 0 {
            BodyKind::None
        } else {
            BodyKind::Length(n)
        }
    } else {
        keep_alive = false;
        BodyKind::UntilClose
    };
    if let Some(c) = client {
        let named = names_fields(res.headers);
        let out = &mut *c.out;
        let reason = res.reason.unwrap_or("");
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(itoa::Buffer::new().format(status).as_bytes());
        out.push(b' ');
        out.extend_from_slice(reason.as_bytes());
        out.extend_from_slice(b"\r\n");
        for h in res.headers.iter() {
            if is_hop_by_hop(h.name, res.headers, named)
                || h.name.eq_ignore_ascii_case("content-length")
            {
                continue;
            }
            out.extend_from_slice(h.name.as_bytes());
            out.extend_from_slice(b": ");
            if h.name.eq_ignore_ascii_case("mcp-session-id") {
                out.extend_from_slice(c.tag);
            }
            out.extend_from_slice(h.value);
            out.extend_from_slice(b"\r\n");
        }
        match body {
            BodyKind::Length(n) => push_length(out, n),
            BodyKind::Chunked | BodyKind::UntilClose if c.http11 => {
                out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
            }
            // An HTTP/1.0 client: the body ends where the connection does.
            BodyKind::Chunked | BodyKind::UntilClose => c.keep_alive = false,
            BodyKind::None if !no_body => out.extend_from_slice(b"Content-Length: 0\r\n"),
            BodyKind::None => {}
        }
        if !c.keep_alive {
            out.extend_from_slice(b"Connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }
    Ok(Some((
        len,
        ResponseHead {
            status,
            body,
            keep_alive,
            event_stream,
            session,
        },
    )))
}

/// Whose request goes upstream, which decides its end-to-end fields. `client`, when set, is
/// the client's address for `X-Forwarded-For` (`routing.forwarded_for`); `identity`, its
/// verified certificate for `X-Forwarded-Client-Cert` (see [`crate::tls::client_identity`]).
pub enum Fields<'a> {
    /// An HTTP client's (its raw request head, and the query of its target): its end-to-end
    /// fields are copied, except those the gateway re-does (framing, `Host`, the session id,
    /// `Expect`) and any `X-Forwarded-Client-Cert` (only the gateway may say which certificate
    /// a client showed); `client` is appended to the `X-Forwarded-For` it sent, if any.
    Client {
        head: &'a [u8],
        /// The path to ask for instead of the upstream's own (the client's, for what is not
        /// the MCP endpoint: its protected-resource metadata).
        path: Option<&'a str>,
        query: &'a str,
        client: Option<IpAddr>,
        identity: Option<&'a str>,
    },
    /// The gateway's own, for a WebSocket or MCPB session: JSON in, JSON or an event stream
    /// out, and the session's protocol version once `initialize` negotiated one (the MCP
    /// specification asks for it on every later request).
    Gateway {
        protocol: Option<&'a [u8]>,
        client: Option<IpAddr>,
        identity: Option<&'a str>,
        /// A stream resumed after this event (`Last-Event-ID`; visible ASCII only).
        last_event_id: Option<&'a [u8]>,
        /// What the client's WebSocket upgrade said that every request of its session says too.
        carried: Option<&'a Carried>,
    },
}

/// What a WebSocket client's upgrade request says that every request of its upstream session
/// says too, as an HTTP client's requests would (MCP asks a client to send its credentials,
/// `Authorization`, with every request): the query of its target, and its end-to-end fields
/// except those the gateway writes itself for the session (`Accept`, `Content-Type`,
/// `MCP-Protocol-Version`, `Last-Event-ID`, `X-Forwarded-For`; `Accept-Encoding` too, since
/// the gateway reads the replies) and the upgrade's own (`Sec-WebSocket-*`). Made once per
/// session, and only when there is something to carry.
#[derive(Debug)]
pub struct Carried {
    /// The query (`?...`, or nothing), then the field lines (`Name: value\r\n` each).
    bytes: Box<[u8]>,
    query_len: usize,
}

impl Carried {
    /// What the upgrade request `raw_head` (a whole, parsed head) has to carry; `None` when
    /// nothing.
    pub fn of_upgrade(raw_head: &[u8]) -> Option<Rc<Carried>> {
        const OWN: [&str; 6] = [
            "accept",
            "accept-encoding",
            "content-type",
            "mcp-protocol-version",
            "last-event-id",
            "x-forwarded-for",
        ];
        let mut headers = [httparse::EMPTY_HEADER; crate::http::request::MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let Ok(httparse::Status::Complete(_)) = req.parse(raw_head) else {
            return None;
        };
        let query = crate::http::request::query(raw_head);
        let mut bytes = query.as_bytes().to_vec();
        let named = names_fields(req.headers);
        for h in req.headers.iter() {
            let websocket = (h.name.as_bytes().get(..14))
                .is_some_and(|p| p.eq_ignore_ascii_case(b"sec-websocket-"));
            if crosses(h.name, req.headers, named)
                && !websocket
                && !OWN.iter().any(|n| h.name.eq_ignore_ascii_case(n))
            {
                write_field(&mut bytes, h.name, h.value);
            }
        }
        (!bytes.is_empty()).then(|| {
            Rc::new(Carried {
                bytes: bytes.into_boxed_slice(),
                query_len: query.len(),
            })
        })
    }

    /// The query to send (`?...`), or "".
    pub fn query(&self) -> &str {
        // The query came from a `&str` and ends at a character boundary.
        std::str::from_utf8(&self.bytes[..self.query_len]).unwrap_or("")
    }

    /// The field lines to send.
    pub fn fields(&self) -> &[u8] {
        &self.bytes[self.query_len..]
    }
}

/// Whether a field of a client's head crosses to the upstream: end to end, and not one the
/// gateway re-does (framing, `Host`, the session id, `Expect`), one meant for the gateway
/// (`Proxy-Authorization`), or an `X-Forwarded-Client-Cert` (only the gateway may say which
/// certificate a client showed).
fn crosses(name: &str, headers: &[httparse::Header<'_>], named: bool) -> bool {
    const REDONE: [&str; 6] = [
        "host",
        "content-length",
        "mcp-session-id",
        "expect",
        "proxy-authorization",
        "x-forwarded-client-cert",
    ];
    !is_hop_by_hop(name, headers, named) && !REDONE.iter().any(|n| name.eq_ignore_ascii_case(n))
}

/// Appends the field line `name: value`.
fn write_field(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// What the gateway's own requests for a WebSocket or MCPB session say besides the session id.
#[derive(Debug, Clone, Default)]
pub struct SessionFields {
    /// What the client's WebSocket upgrade said for every request, if anything.
    pub carried: Option<Rc<Carried>>,
    /// The protocol version `initialize` negotiated, once it has.
    pub protocol: Option<Vec<u8>>,
    /// The client's address, when `routing.forwarded_for` is on.
    pub client: Option<IpAddr>,
    /// The client's verified certificate, for `X-Forwarded-Client-Cert`.
    pub identity: Option<Box<str>>,
}

impl SessionFields {
    pub fn fields(&self) -> Fields<'_> {
        self.resuming(None)
    }

    /// The fields, for a `GET` that resumes a stream after event `last_event_id`, if any.
    pub fn resuming<'a>(&'a self, last_event_id: Option<&'a [u8]>) -> Fields<'a> {
        Fields::Gateway {
            protocol: self.protocol.as_deref(),
            client: self.client,
            identity: self.identity.as_deref(),
            last_event_id,
            carried: self.carried.as_deref(),
        }
    }
}

/// Writes the request line and fields for `upstream`: `method`, the upstream's path plus the
/// query of `fields`, `Host` set to the upstream, the end-to-end `fields`, then `session` and
/// the framing:
/// a `Content-Length` of `body_len`, or `Transfer-Encoding: chunked` when it is `None` (a body
/// forwarded as it arrives).
pub fn write_request(
    out: &mut Vec<u8>,
    method: &str,
    upstream: &Upstream,
    fields: Fields<'_>,
    session: Option<&[u8]>,
    body_len: Option<usize>,
) {
    let http = upstream.http().expect("an HTTP upstream");
    let (authority, path) = (&http.authority, &http.path);
    let (path, query) = match &fields {
        Fields::Client { path: p, query, .. } => (p.unwrap_or(path), *query),
        Fields::Gateway { carried, .. } => (path.as_str(), carried.map_or("", |c| c.query())),
    };
    // Appended piece by piece, here and below: `write!`'s formatting machinery was about 1% of
    // the gateway's CPU per proxied request (`perf`), a tenth of its user-space time.
    for piece in [
        method,
        " ",
        path,
        query,
        " HTTP/1.1\r\nHost: ",
        authority,
        "\r\n",
    ] {
        out.extend_from_slice(piece.as_bytes());
    }
    match fields {
        Fields::Client {
            head: raw,
            path: _,
            query: _,
            client,
            identity,
        } => {
            let mut headers = [httparse::EMPTY_HEADER; crate::http::request::MAX_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            if let Ok(httparse::Status::Complete(_)) = req.parse(raw) {
                let named = names_fields(req.headers);
                let xff = |h: &&httparse::Header| h.name.eq_ignore_ascii_case("x-forwarded-for");
                for h in req.headers.iter() {
                    if crosses(h.name, req.headers, named) && !(client.is_some() && xff(&h)) {
                        write_field(out, h.name, h.value);
                    }
                }
                if let Some(ip) = client {
                    out.extend_from_slice(b"X-Forwarded-For: ");
                    for h in req.headers.iter().filter(xff) {
                        out.extend_from_slice(h.value);
                        out.extend_from_slice(b", ");
                    }
                    push_ip(out, ip);
                    out.extend_from_slice(b"\r\n");
                }
            }
            write_identity(out, identity);
        }
        Fields::Gateway {
            protocol,
            client,
            identity,
            last_event_id,
            carried,
        } => {
            if let Some(ip) = client {
                out.extend_from_slice(b"X-Forwarded-For: ");
                push_ip(out, ip);
                out.extend_from_slice(b"\r\n");
            }
            write_identity(out, identity);
            if let Some(c) = carried {
                out.extend_from_slice(c.fields());
            }
            out.extend_from_slice(
                b"Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n",
            );
            if let Some(v) = protocol {
                out.extend_from_slice(b"MCP-Protocol-Version: ");
                out.extend_from_slice(v);
                out.extend_from_slice(b"\r\n");
            }
            if let Some(id) = last_event_id {
                out.extend_from_slice(b"Last-Event-ID: ");
                out.extend_from_slice(id);
                out.extend_from_slice(b"\r\n");
            }
        }
    }
    if let Some(id) = session {
        out.extend_from_slice(b"Mcp-Session-Id: ");
        out.extend_from_slice(id);
        out.extend_from_slice(b"\r\n");
    }
    match body_len {
        None => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
        Some(n) if n > 0 || method == "POST" => push_length(out, n as u64),
        Some(_) => {}
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends a `Content-Length` field of `n`.
fn push_length(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(b"Content-Length: ");
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends `ip` as text: an IPv4 address octet by octet (most clients), others by `Display`.
fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                out.extend_from_slice(itoa::Buffer::new().format(octet).as_bytes());
            }
        }
        IpAddr::V6(_) => {
            let _ = write!(out, "{ip}");
        }
    }
}

/// `X-Forwarded-Client-Cert` naming the client's verified certificate, when it showed one.
fn write_identity(out: &mut Vec<u8>, identity: Option<&str>) {
    if let Some(id) = identity {
        out.extend_from_slice(b"X-Forwarded-Client-Cert: ");
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// Decodes a response body from the bytes read so far, piece by piece.
pub struct Body {
    kind: BodyKind,
    remaining: u64,
    chunked: Chunked,
    done: bool,
}

/// What [`Body::feed`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Feed {
    /// Some decoded bytes were appended (or none were there yet): read more, unless `done`.
    More,
    /// The body is complete.
    Done,
}

impl Body {
    pub fn new(kind: BodyKind) -> Body {
        Body {
            kind,
            remaining: match kind {
                BodyKind::Length(n) => n,
                _ => 0,
            },
            chunked: Chunked::new(0),
            done: kind == BodyKind::None,
        }
    }

    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The connection carries nothing more of this response once done (so it may be pooled).
    pub fn until_close(&self) -> bool {
        self.kind == BodyKind::UntilClose
    }

    /// Moves the decoded body bytes in `buf` to `data`, leaving any undecoded rest in `buf`.
    pub fn feed(&mut self, buf: &mut Vec<u8>, data: &mut Vec<u8>) -> Result<Feed, Failure> {
        if self.done {
            return Ok(Feed::Done);
        }
        match self.kind {
            BodyKind::None => {}
            BodyKind::Length(_) => {
                let take = (buf.len() as u64).min(self.remaining) as usize;
                data.extend_from_slice(&buf[..take]);
                buf.drain(..take);
                self.remaining -= take as u64;
                self.done = self.remaining == 0;
            }
            BodyKind::Chunked => {
                let step = self
                    .chunked
                    .decode(buf, data, usize::MAX)
                    .map_err(|_| Failure::BadResponse)?;
                buf.drain(..self.chunked.pos);
                self.chunked.pos = 0;
                self.done = step != ChunkStep::More;
            }
            BodyKind::UntilClose => {
                data.extend_from_slice(buf);
                buf.clear();
            }
        }
        Ok(if self.done { Feed::Done } else { Feed::More })
    }

    /// The upstream closed: the end of an until-close body, else a cut response.
    pub fn eof(&mut self) -> Result<(), Failure> {
        if self.kind == BodyKind::UntilClose {
            self.done = true;
            Ok(())
        } else {
            Err(Failure::Reset)
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn an_upgrade_carries_its_query_and_end_to_end_fields_only() {
        let upgrade = b"GET /mcp/tools?token=t1&x=2 HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\n\
            Connection: Upgrade, X-Hop\r\nX-Hop: 1\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
            Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mcp\r\n\
            Authorization: Bearer abc\r\nAccept-Encoding: gzip\r\nAccept: */*\r\n\
            X-Forwarded-For: 10.9.9.9\r\nProxy-Authorization: Basic eA==\r\n\
            MCP-Protocol-Version: 1999-01-01\r\nUser-Agent: tester/1 (\xe9)\r\nX-Tenant: acme\r\n\r\n";
        let c = Carried::of_upgrade(upgrade).unwrap();
        assert_eq!(c.query(), "?token=t1&x=2");
        assert_eq!(
            c.fields(),
            b"Authorization: Bearer abc\r\nUser-Agent: tester/1 (\xe9)\r\nX-Tenant: acme\r\n"
        );
        let bare =
            b"GET /mcp HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
            Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
        assert!(
            Carried::of_upgrade(bare).is_none(),
            "nothing to carry: nothing kept"
        );
        let query_only = b"GET /mcp?k=v HTTP/1.1\r\nHost: gw\r\n\r\n";
        let c = Carried::of_upgrade(query_only).unwrap();
        assert_eq!((c.query(), c.fields()), ("?k=v", &b""[..]));
    }

    #[test]
    fn addresses_read_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "255.255.255.255",
            "10.0.7.199",
            "127.0.0.1",
            "::1",
            "2001:db8::8:800:200c:417a",
            "::ffff:10.0.0.1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut out = b"x".to_vec();
            push_ip(&mut out, ip);
            assert_eq!(out, format!("x{ip}").into_bytes());
        }
    }

    #[test]
    fn response_head_rewrite() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nMcp-Session-Id: abc\r\nTransfer-Encoding: chunked\r\nCache-Control: no-cache\r\n\r\nrest";
        let mut out = Vec::new();
        let tag = *b"0123abcd";
        let c = ClientHead {
            out: &mut out,
            start: 0,
            tag: &tag,
            keep_alive: true,
            http11: true,
        };
        let (len, head) = parse_response(raw, Some(&mut { c })).unwrap().unwrap();
        assert_eq!(len, raw.len() - 4);
        assert_eq!(head.body, BodyKind::Chunked);
        assert!(head.event_stream && head.keep_alive);
        assert_eq!(head.session, None, "passed through, not copied");
        let (_, plain) = parse_response(raw, None).unwrap().unwrap();
        assert_eq!(plain.session.as_deref(), Some(&b"abc"[..]));
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nMcp-Session-Id: 0123abcdabc\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
    }

    #[test]
    fn a_status_outside_100_to_599_is_a_bad_response() {
        for status in ["000", "099", "600", "999"] {
            let raw = format!("HTTP/1.1 {status} OK\r\nContent-Length: 0\r\n\r\n");
            assert_eq!(
                parse_response(raw.as_bytes(), None).err(),
                Some(Failure::BadResponse),
                "{status}"
            );
        }
        for status in [100, 200, 599] {
            let raw = format!("HTTP/1.1 {status} OK\r\nContent-Length: 0\r\n\r\n");
            let head = parse_response(raw.as_bytes(), None).unwrap().unwrap().1;
            assert_eq!(head.status, status);
        }
    }

    #[test]
    fn response_framing() {
        let p = |raw: &[u8]| parse_response(raw, None).unwrap().unwrap().1;
        assert_eq!(
            p(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n").body,
            BodyKind::None
        );
        let close = p(b"HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(
            (close.body, close.keep_alive),
            (BodyKind::UntilClose, false)
        );
        assert!(
            !p(b"HTTP/1.0 200 OK
Content-Length: 3

")
            .keep_alive
        );
        assert!(parse_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            None
        )
        .is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: +3\r\n\r\nabc", None).is_err());
        let coded = p(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 3\r\n\r\n");
        assert_eq!(
            (coded.body, coded.keep_alive),
            (BodyKind::UntilClose, false)
        );
        let chunked =
            p(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
        assert_eq!(chunked.body, BodyKind::Chunked);
        assert!(parse_response(b"garbage\r\n\r\n", None).is_err());
        assert_eq!(parse_response(b"HTTP/1.1 200 OK\r\n", None), Ok(None));
    }

    #[test]
    fn bodies_decode_in_pieces() {
        let mut b = Body::new(BodyKind::Chunked);
        let (mut buf, mut data) = (b"5\r\nhel".to_vec(), Vec::new());
        assert_eq!(b.feed(&mut buf, &mut data), Ok(Feed::More));
        buf.extend_from_slice(b"lo\r\n0\r\n\r\n");
        assert_eq!(b.feed(&mut buf, &mut data), Ok(Feed::Done));
        assert_eq!(data, b"hello");
        let mut b = Body::new(BodyKind::Length(3));
        let (mut buf, mut data) = (b"abcdef".to_vec(), Vec::new());
        assert_eq!(b.feed(&mut buf, &mut data), Ok(Feed::Done));
        assert_eq!(
            (data.as_slice(), buf.as_slice()),
            (&b"abc"[..], &b"def"[..])
        );
        assert_eq!(Body::new(BodyKind::Length(3)).eof(), Err(Failure::Reset));
    }
}
