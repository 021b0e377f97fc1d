//! The `Origin` check of the HTTP door (`server.allowed_origins`): protection against DNS
//! rebinding and cross-site WebSocket hijacking, which the MCP specification asks of every
//! Streamable HTTP server ("If the Origin header is present and invalid, servers MUST respond
//! with HTTP 403 Forbidden").
//!
//! Owns the policy ([`Origins`]) and the normalised form of an origin ([`normalize`]).
//!
//! Invariants:
//! - A request without `Origin` passes: only browsers send one, and other MCP clients do not.
//! - With no list, an `Origin` passes only when its host is loopback (`localhost`, 127.0.0.0/8,
//!   `[::1]`): a page of another site that rebinds its name to this gateway cannot call it.
//! - Origins compare as `scheme://host[:port]`, scheme and host case-insensitively, a default
//!   port (80 for http, 443 for https) the same as none.

/// Which `Origin` values the HTTP door accepts.
#[derive(Debug, Clone)]
pub struct Origins {
    /// `server.allowed_origins`, normalised; `None` for `["*"]` (every origin).
    listed: Option<Vec<String>>,
}

/// No list: loopback pages only.
impl Default for Origins {
    fn default() -> Self {
        Origins::new(&[])
    }
}

impl Origins {
    /// The policy for `server.allowed_origins` (validated: each entry normalises).
    pub fn new(allowed: &[String]) -> Origins {
        if allowed.iter().any(|o| o == "*") {
            return Origins { listed: None };
        }
        let listed = allowed
            .iter()
            .map(|o| normalize(o).expect("checked by Config::validate"))
            .collect();
        Origins {
            listed: Some(listed),
        }
    }

    /// True when a request whose `Origin` field is `value` may be served.
    pub fn allows(&self, value: &[u8]) -> bool {
        let Some(listed) = &self.listed else {
            return true;
        };
        let Some(origin) = std::str::from_utf8(value).ok().and_then(normalize) else {
            return false;
        };
        is_loopback(&origin) || listed.contains(&origin)
    }
}

/// `scheme://host[:port]` in lower case without a default port, or `null` (what a browser sends
/// from a sandboxed or file page); `None` when `s` is not an origin.
pub fn normalize(s: &str) -> Option<String> {
    if s == "null" {
        return Some(s.into());
    }
    let (scheme, rest) = s.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => ":80",
        "https" => ":443",
        _ => return None,
    };
    let host = rest.to_ascii_lowercase();
    let host = host.strip_suffix(default_port).unwrap_or(&host);
    let (name, port) = match host.rsplit_once(':') {
        Some((name, port)) if !name.ends_with(':') && !port.contains(']') => (name, Some(port)),
        _ => (host, None),
    };
    let name_ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.[]:_".contains(&b))
        && (name.starts_with('[') == name.ends_with(']'))
        && (!name.contains(':') || name.starts_with('['));
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.parse::<u16>().is_ok());
    (name_ok && port_ok).then(|| format!("{scheme}://{host}"))
}

/// True for an origin (normalised) whose host is `localhost`, in 127.0.0.0/8 or `[::1]`.
fn is_loopback(origin: &str) -> bool {
    let Some((_, host)) = origin.split_once("://") else {
        return false; // `null`
    };
    let name = match host.rsplit_once(':') {
        Some((name, port)) if !port.contains(']') => name,
        _ => host,
    };
    name == "localhost"
        || name == "[::1]"
        || name
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|a| a.is_loopback())
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn origins_normalise() {
        assert_eq!(
            normalize("HTTPS://App.Example.com:443").as_deref(),
            Some("https://app.example.com")
        );
        assert_eq!(
            normalize("http://localhost:6274").as_deref(),
            Some("http://localhost:6274")
        );
        assert_eq!(
            normalize("http://[::1]:80").as_deref(),
            Some("http://[::1]")
        );
        assert_eq!(normalize("null").as_deref(), Some("null"));
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
        ] {
            assert_eq!(normalize(bad), None, "{bad}");
        }
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
