//! The `Origin` check of the HTTP door (`server.allowed_origins`): protection against DNS
//! rebinding and cross-site WebSocket hijacking, which the MCP specification asks of every
//! Streamable HTTP server ("If the Origin header is present and invalid, servers MUST respond
//! with HTTP 403 Forbidden").
//!
//! Owns the policy ([`Origins`]) and what an origin is ([`parse`]).
//!
//! Invariants:
//! - A request without `Origin` passes: only browsers send one, and other MCP clients do not.
//! - With no list, an `Origin` passes only when its host is loopback (`localhost`, 127.0.0.0/8,
//!   `[::1]`): a page of another site that rebinds its name to this gateway cannot call it.
//! - Origins compare as `scheme://host[:port]`, scheme and host case-insensitively, a default
//!   port (80 for http, 443 for https) the same as none. A request's `Origin` is compared where
//!   it lies in the request head: nothing is allocated for it.

/// Which `Origin` values the HTTP door accepts.
#[derive(Debug, Clone)]
pub struct Origins {
    /// `server.allowed_origins` parsed (scheme and host in lower case); `None` for `["*"]`
    /// (every origin).
    listed: Option<Vec<(String, String, u16)>>,
    /// `null` is listed.
    null: bool,
}

/// No list: loopback pages only.
impl Default for Origins {
    fn default() -> Self {
        Origins::new(&[])
    }
}

impl Origins {
    /// The policy for `server.allowed_origins` (validated: each entry is `*`, `null` or parses).
    pub fn new(allowed: &[String]) -> Origins {
        let listed = (!allowed.iter().any(|o| o == "*")).then(|| {
            allowed
                .iter()
                .filter_map(|o| parse(o))
                .map(|o| {
                    (
                        o.scheme.to_ascii_lowercase(),
                        o.host.to_ascii_lowercase(),
                        o.port,
                    )
                })
                .collect()
        });
        Origins {
            listed,
            null: allowed.iter().any(|o| o == "null"),
        }
    }

    /// True when a request whose `Origin` field is `value` may be served.
    pub fn allows(&self, value: &[u8]) -> bool {
        let Some(listed) = &self.listed else {
            return true;
        };
        let Ok(value) = std::str::from_utf8(value) else {
            return false;
        };
        if value == "null" {
            return self.null;
        }
        let Some(o) = parse(value) else {
            return false;
        };
        o.is_loopback()
            || listed.iter().any(|(scheme, host, port)| {
                o.scheme.eq_ignore_ascii_case(scheme)
                    && o.host.eq_ignore_ascii_case(host)
                    && o.port == *port
            })
    }
}

/// True when `s` may be listed in `server.allowed_origins`: an origin, `null` or `*`.
pub fn valid(s: &str) -> bool {
    s == "*" || s == "null" || parse(s).is_some()
}

/// An origin's parts, borrowed from where it was written.
#[derive(Debug, PartialEq, Eq)]
pub struct Origin<'a> {
    pub scheme: &'a str,
    /// A name, an IPv4 address or a bracketed IPv6 one.
    pub host: &'a str,
    /// As written, or the scheme's default.
    pub port: u16,
}

impl Origin<'_> {
    /// Its host is `localhost`, in 127.0.0.0/8 or `[::1]`.
    fn is_loopback(&self) -> bool {
        self.host.eq_ignore_ascii_case("localhost")
            || self.host == "[::1]"
            || self
                .host
                .parse::<std::net::Ipv4Addr>()
                .is_ok_and(|a| a.is_loopback())
    }
}

/// `scheme://host[:port]` (http or https, no path); `None` when `s` is not such an origin.
pub fn parse(s: &str) -> Option<Origin<'_>> {
    let (scheme, rest) = s.split_once("://")?;
    let default_port = if scheme.eq_ignore_ascii_case("http") {
        80
    } else if scheme.eq_ignore_ascii_case("https") {
        443
    } else {
        return None;
    };
    // A port follows the last ':' unless that ':' is inside an IPv6 address's brackets.
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(':') && !port.contains(']') => {
            (host, port.parse::<u16>().ok()?)
        }
        _ => (rest, default_port),
    };
    let host_ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.[]:_".contains(&b))
        && (host.starts_with('[') == host.ends_with(']'))
        && (!host.contains(':') || host.starts_with('['));
    host_ok.then_some(Origin { scheme, host, port })
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn origins_parse() {
        let o = |scheme, host, port| Some(Origin { scheme, host, port });
        assert_eq!(
            parse("HTTPS://App.Example.com:443"),
            o("HTTPS", "App.Example.com", 443)
        );
        assert_eq!(
            parse("https://app.example.com"),
            o("https", "app.example.com", 443)
        );
        assert_eq!(parse("http://localhost:6274"), o("http", "localhost", 6274));
        assert_eq!(parse("http://[::1]:80"), o("http", "[::1]", 80));
        assert_eq!(parse("http://[::1]"), o("http", "[::1]", 80));
        for bad in [
            "app.example.com",
            "ftp://x",
            "https://",
            "https://a.com/",
            "https://a.com/path",
            "https://a.com:99999",
            "https://a.com:",
            "https://a b.com",
            "https://[::1",
            "http://::1",
            "null",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
        assert!(valid("null") && valid("*") && valid("http://localhost:1") && !valid("x"));
    }

    #[test]
    fn without_a_list_only_loopback_pages_pass() {
        let o = Origins::new(&[]);
        for ok in [
            "http://localhost:6274",
            "http://127.0.0.1:8080",
            "http://[::1]:3000",
            "https://LOCALHOST",
        ] {
            assert!(o.allows(ok.as_bytes()), "{ok}");
        }
        for no in [
            "https://evil.example",
            "http://localhost.evil.example",
            "http://10.0.0.1",
            "null",
            "garbage",
            "\u{ff}",
        ] {
            assert!(!o.allows(no.as_bytes()), "{no}");
        }
    }

    #[test]
    fn a_list_adds_its_origins_and_a_star_lets_all_through() {
        let o = Origins::new(&["https://app.example.com".into(), "null".into()]);
        assert!(o.allows(b"https://app.example.com:443"));
        assert!(o.allows(b"https://APP.example.com"));
        assert!(o.allows(b"null"));
        assert!(o.allows(b"http://localhost:6274"), "loopback still passes");
        assert!(!o.allows(b"http://app.example.com"), "another scheme");
        assert!(!o.allows(b"https://app.example.com:8443"), "another port");
        let all = Origins::new(&["*".into()]);
        assert!(all.allows(b"https://anything.example") && all.allows(b"garbage"));
    }
}
