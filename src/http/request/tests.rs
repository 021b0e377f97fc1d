//! Unit tests of the request head parser and the chunked body decoder.

use super::*;

fn ns(n: &str) -> Option<usize> {
    match n {
        "default" => Some(0),
        "tools" => Some(1),
        _ => None,
    }
}

#[test]
fn routes() {
    let h = |t: &str| route(t, ns);
    assert_eq!(h("/mcp"), Route::Mcp(0));
    assert_eq!(h("/mcp?x=1"), Route::Mcp(0));
    assert_eq!(h("/mcp/tools"), Route::Mcp(1));
    assert_eq!(h("/mcp/nope"), Route::UnknownNamespace);
    assert_eq!(h("/mcpx"), Route::NotFound);
    assert_eq!(h("/"), Route::NotFound);
    assert_eq!(h("/mcp/a/b"), Route::NotFound);
    let metadata = "/.well-known/oauth-protected-resource";
    assert_eq!(h(metadata), Route::Metadata(0));
    assert_eq!(h(&format!("{metadata}/")), Route::Metadata(0));
    assert_eq!(h(&format!("{metadata}/mcp")), Route::Metadata(0));
    assert_eq!(h(&format!("{metadata}/mcp/tools?x=1")), Route::Metadata(1));
    assert_eq!(h(&format!("{metadata}/mcp/nope")), Route::UnknownNamespace);
    assert_eq!(h(&format!("{metadata}/other")), Route::NotFound);
    assert_eq!(h(&format!("{metadata}x/mcp")), Route::NotFound);
    assert_eq!(
        h("/.well-known/oauth-authorization-server/mcp"),
        Route::NotFound
    );
    // The absolute form, as sent to a proxy.
    assert_eq!(h("http://gw.example:8080/mcp/tools?x=1"), Route::Mcp(1));
    assert_eq!(h("HTTPS://gw.example/mcp"), Route::Mcp(0));
    assert_eq!(h("http://gw.example"), Route::NotFound);
    assert_eq!(h("ftp://gw.example/mcp"), Route::NotFound);
}

#[test]
fn head_fields() {
    let raw = b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nAccept: text/event-stream\r\nMcp-Session-Id: abc\r\n\r\nhello";
    let h = parse_head(raw, ns).unwrap().unwrap();
    assert_eq!(h.method, Method::Post);
    assert_eq!(h.body, BodyKind::Length(5));
    assert!(h.keep_alive && h.sse_only && h.http11);
    let (a, b) = h.session.unwrap();
    assert_eq!(&raw[a..b], b"abc");
    assert_eq!(h.len, raw.len() - 5);
    assert_eq!(parse_head(&raw[..20], ns), Ok(None));
}

#[test]
fn refusals() {
    assert_eq!(parse_head(b"BAD\r\n\r\n", ns), Err(MALFORMED));
    let both =
        b"POST /mcp HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
    assert_eq!(parse_head(both, ns).unwrap_err().status, 400);
    let two = b"POST /mcp HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n";
    assert_eq!(parse_head(two, ns).unwrap_err().status, 400);
    for length in ["+3", "-3", "3 3", "0x3", "", "99999999999999999999999"] {
        let head = format!("POST /mcp HTTP/1.1\r\nContent-Length: {length}\r\n\r\nabc");
        assert_eq!(
            parse_head(head.as_bytes(), ns),
            Err(BAD_FRAMING),
            "{length:?}"
        );
    }
    for twice in [
        "Transfer-Encoding: chunked, chunked\r\n",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    ] {
        let head = format!("POST /mcp HTTP/1.1\r\nHost: h\r\n{twice}\r\n");
        assert_eq!(parse_head(head.as_bytes(), ns), Err(BAD_FRAMING), "{twice}");
    }
    let gzip = b"POST /mcp HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n";
    assert_eq!(parse_head(gzip, ns).unwrap_err().status, 501);
    let big = [b"GET /mcp HTTP/1.1\r\nX: ".as_slice(), &[b'a'; MAX_HEAD]].concat();
    assert_eq!(parse_head(&big, ns), Err(HEAD_TOO_LARGE));
    let many: String = (0..100).map(|i| format!("X{i}: y\r\n")).collect();
    let many = format!("GET /mcp HTTP/1.1\r\n{many}\r\n");
    assert_eq!(parse_head(many.as_bytes(), ns), Err(HEAD_TOO_LARGE));
    // Exactly one Host in HTTP/1.1, at most one in HTTP/1.0.
    let head = |raw: &[u8]| parse_head(raw, ns).map(|h| h.is_some());
    assert_eq!(head(b"GET /mcp HTTP/1.1\r\n\r\n"), Err(BAD_HOST));
    assert_eq!(
        head(b"GET /mcp HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n"),
        Err(BAD_HOST)
    );
    assert_eq!(
        head(b"GET /mcp HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n"),
        Err(BAD_HOST)
    );
    assert_eq!(head(b"GET /mcp HTTP/1.0\r\n\r\n"), Ok(true));
}

/// Decodes `raw` whole with a 1 MiB limit.
fn decode_all(raw: &[u8]) -> Result<(ChunkStep, usize), Refusal> {
    let mut body = Vec::new();
    let step = Chunked::new(0).decode(raw, &mut body, 1 << 20)?;
    Ok((step, body.len()))
}

#[test]
fn chunk_framing_may_not_outrun_the_data() {
    // A byte per chunk (5 bytes of framing each) streams fine, and so does some framing.
    let bytes: String = "1\r\na\r\n".repeat(20_000) + "0\r\n\r\n";
    assert_eq!(
        decode_all(bytes.as_bytes()),
        Ok((ChunkStep::Done(bytes.len()), 20_000))
    );
    let ext = format!(
        "4;name={}\r\nabcd\r\n0\r\nX: {}\r\n\r\n",
        "v".repeat(4000),
        "t".repeat(7000)
    );
    assert_eq!(
        decode_all(ext.as_bytes()),
        Ok((ChunkStep::Done(ext.len()), 4))
    );
    // Mostly extensions: refused after about 16 KiB of them, long before 1 MiB of data.
    let padded = format!("1;{}\r\na\r\n", "e".repeat(100)).repeat(1000);
    assert_eq!(decode_all(padded.as_bytes()), Err(BAD_CHUNK));
    // Trailer fields without end: refused too.
    let trailers = format!("1\r\na\r\n0\r\n{}", "X: y\r\n".repeat(5000));
    assert_eq!(decode_all(trailers.as_bytes()), Err(BAD_CHUNK));
}

/// What senders really write passes the framing rule: 2 000 random bodies, each of random
/// chunks (1 byte to 8 KiB, a third of them 1 to 16 bytes), some with short extensions,
/// some with trailer fields, fed in random pieces, decode whole.
#[test]
fn ordinary_chunked_bodies_are_never_refused() {
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    for _ in 0..2000 {
        let (mut raw, mut want) = (Vec::new(), Vec::new());
        for _ in 0..1 + next(40) {
            let size = if next(3) == 0 {
                1 + next(16)
            } else {
                1 + next(8192)
            };
            let data: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
            raw.extend_from_slice(format!("{size:x}").as_bytes());
            if next(4) == 0 {
                raw.extend_from_slice(format!(";ext{}=v", next(100)).as_bytes());
            }
            raw.extend_from_slice(b"\r\n");
            raw.extend_from_slice(&data);
            raw.extend_from_slice(b"\r\n");
            want.extend_from_slice(&data);
        }
        raw.extend_from_slice(b"0\r\n");
        for _ in 0..next(4) {
            raw.extend_from_slice(
                format!("X-T{}: {}\r\n", next(9), "v".repeat(next(200))).as_bytes(),
            );
        }
        raw.extend_from_slice(b"\r\n");
        let (mut c, mut body, mut end) = (Chunked::new(0), Vec::new(), 0);
        let step = loop {
            end = (end + 1 + next(3000)).min(raw.len());
            match c.decode(&raw[..end], &mut body, 1 << 20) {
                Ok(ChunkStep::More) if end < raw.len() => {}
                other => break other,
            }
        };
        assert_eq!(step, Ok(ChunkStep::Done(raw.len())));
        assert_eq!(body, want);
    }
}

#[test]
fn chunked_in_pieces() {
    let raw = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nTrailer: x\r\n\r\nNEXT";
    let mut body = Vec::new();
    let mut c = Chunked::new(0);
    let mut step = ChunkStep::More;
    for end in 1..=raw.len() {
        step = c.decode(&raw[..end], &mut body, 100).unwrap();
        if step != ChunkStep::More {
            break;
        }
    }
    assert_eq!(step, ChunkStep::Done(raw.len() - 4));
    assert_eq!(body, b"hello world");
    let mut c = Chunked::new(0);
    assert_eq!(
        c.decode(b"ff\r\n", &mut Vec::new(), 100),
        Err(BODY_TOO_LARGE)
    );
    let mut c = Chunked::new(0);
    assert_eq!(
        c.decode(b"zz\r\n", &mut Vec::new(), 100)
            .unwrap_err()
            .status,
        400
    );
}

/// A size line over the bound is refused whether it comes whole or a byte at a time (the fuzz
/// target `upstream_response` found it read whole and refused in pieces), and one at the bound
/// is read either way.
#[test]
fn a_long_size_line_is_judged_alike_whole_and_in_pieces() {
    let line = |len: usize| {
        let mut v = b"5;x=".to_vec();
        v.resize(len - 2, b'a');
        v.extend_from_slice(b"\r\nhello\r\n0\r\n\r\n");
        v
    };
    for (len, ok) in [(4096, true), (4097, false)] {
        let raw = line(len);
        let whole = Chunked::new(0).decode(&raw, &mut Vec::new(), usize::MAX);
        let mut c = Chunked::new(0);
        let mut body = Vec::new();
        let mut pieces = Ok(ChunkStep::More);
        for end in 1..=raw.len() {
            pieces = c.decode(&raw[..end], &mut body, usize::MAX);
            if pieces != Ok(ChunkStep::More) {
                break;
            }
        }
        assert_eq!(whole.is_ok(), ok, "{len} whole: {whole:?}");
        assert_eq!(pieces.is_ok(), ok, "{len} in pieces: {pieces:?}");
    }
    // A size line that never ends is refused once the bound is buffered, not read forever.
    let endless = [&b"5;x="[..], &[b'a'; 5000]].concat();
    let mut c = Chunked::new(0);
    let refused_at = (1..=endless.len()).find(|&end| {
        c.decode(&endless[..end], &mut Vec::new(), usize::MAX)
            .is_err()
    });
    assert_eq!(refused_at, Some(4096));
}

#[test]
fn query_and_path() {
    assert_eq!(
        query(b"GET /mcp/x?a=1&b=2 HTTP/1.1\r\nHost: h\r\n\r\n"),
        "?a=1&b=2"
    );
    assert_eq!(query(b"POST /mcp HTTP/1.1\r\n\r\n"), "");
    assert_eq!(
        path(b"GET /mcp/x?a=1 HTTP/1.1\r\nHost: h\r\n\r\n"),
        "/mcp/x"
    );
    assert_eq!(path(b"GET http://h:80/mcp#f HTTP/1.1\r\n\r\n"), "/mcp");
}
