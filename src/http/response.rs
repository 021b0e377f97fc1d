//! HTTP/1.1 response serialization into a reusable output buffer.
//!
//! One way to write a response: [`write()`] (status line, headers, `Content-Length`, body), with
//! [`error`] for the JSON-RPC error bodies every refusal carries:
//! `{"jsonrpc":"2.0","id":null,"error":{"code":-32000,"message":"..."}}`.

use std::io::Write as _;

/// Writes a complete response. `Connection: close` is added when `keep_alive` is false.
pub fn write(
    out: &mut Vec<u8>,
    status: u16,
    headers: &[(&str, &str)],
    body: &[u8],
    keep_alive: bool,
) {
    let _ = write!(out, "HTTP/1.1 {status} {}\r\n", reason(status));
    for (k, v) in headers {
        let _ = write!(out, "{k}: {v}\r\n");
    }
    if status != 101 && status != 204 && !(100..200).contains(&status) {
        let _ = write!(out, "Content-Length: {}\r\n", body.len());
    }
    if !keep_alive {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

/// A JSON-RPC error response: `code` -32000 unless given, `Content-Type: application/json`.
pub fn error(
    out: &mut Vec<u8>,
    status: u16,
    code: i64,
    message: &str,
    extra: &[(&str, &str)],
    keep_alive: bool,
) {
    let mut body = Vec::with_capacity(96 + message.len());
    crate::echo::write_error(&mut body, "null", code, message);
    let mut headers = Vec::with_capacity(extra.len() + 1);
    headers.push(("Content-Type", "application/json"));
    headers.extend_from_slice(extra);
    write(out, status, &headers, &body, keep_alive);
}

pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn error_response_bytes() {
        let mut out = Vec::new();
        error(
            &mut out,
            429,
            -32000,
            "too many",
            &[("Retry-After", "1")],
            false,
        );
        let text = String::from_utf8(out).unwrap();
        let body = r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32000,"message":"too many"}}"#;
        let want = format!(
            "HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nRetry-After: 1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        assert_eq!(text, want);
    }
}
