//! Upstream URLs (`http://host[:port][/path]`, `https://...`, and `http://unix:/socket[:/path]`
//! for a server on a Unix socket of this host, as nginx writes it), split into what a request
//! needs.

use super::BUILTIN_ECHO;

/// An `http://host[:port][/path]` or `https://...` upstream URL, split into what a request
/// needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    /// `host[:port]` as written, for the `Host` header (a default port is left out, as
    /// clients do).
    pub authority: String,
    /// The host alone (brackets of an IPv6 address removed): what is resolved, and the TLS
    /// server name by default.
    pub host: String,
    /// The port (80 or 443 unless written).
    pub port: u16,
    /// Request target prefix; `/mcp` when the URL has no path.
    pub path: String,
    /// `https`: the connection is TLS.
    pub tls: bool,
    /// `http://unix:/run/mcp.sock[:/path]`: the server listens on this Unix socket of the same
    /// host (`host` and `authority` are then `localhost`, `port` 0).
    pub unix: Option<std::path::PathBuf>,
}

/// What a Unix-socket upstream's requests name as their `Host`.
const UNIX_HOST: &str = "localhost";

impl UpstreamUrl {
    pub fn parse(url: &str) -> Result<UpstreamUrl, String> {
        let (rest, tls) = match url.split_once("://") {
            Some(("http", rest)) => (rest, false),
            Some(("https", rest)) => (rest, true),
            _ => {
                return Err(format!(
                    "expected http://host:port/path, https://host:port/path or {BUILTIN_ECHO}"
                ))
            }
        };
        if let Some(socket) = rest.strip_prefix("unix:") {
            return UpstreamUrl::unix(socket, tls);
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/mcp"),
        };
        if authority.is_empty()
            || authority.contains(['@', '?', '#', ' '])
            || path.contains(['?', '#', ' '])
        {
            return Err("expected http://host:port/path (no user info, query or fragment)".into());
        }
        // An IPv6 address in brackets, or a name or IPv4 address; then `:port`, if any.
        let (host, port) = match authority.strip_prefix('[') {
            Some(inner) => {
                let Some((ip, after)) = inner.split_once(']') else {
                    return Err("an IPv6 address needs its closing `]`".into());
                };
                if ip.parse::<std::net::Ipv6Addr>().is_err() {
                    return Err(format!("{ip:?} between `[` and `]` is not an IPv6 address"));
                }
                match after {
                    "" => (ip, None),
                    _ => match after.strip_prefix(':') {
                        Some(p) => (ip, Some(p)),
                        None => return Err("expected `:port` after the `]`".into()),
                    },
                }
            }
            None => match authority.split_once(':') {
                Some((host, p)) => (host, Some(p)),
                None => (authority, None),
            },
        };
        let port = match port {
            None => {
                if tls {
                    443
                } else {
                    80
                }
            }
            Some(p) if p.bytes().all(|b| b.is_ascii_digit()) => match p.parse::<u16>() {
                Ok(n) if n > 0 => n,
                _ => return Err("the port is not a number from 1 to 65535".into()),
            },
            // `h::1`, `::1`: more than one colon outside brackets.
            Some(p) if p.contains(':') && !authority.starts_with('[') => {
                return Err("an IPv6 address is written in brackets: [::1]".into())
            }
            Some(_) => return Err("the port is not a number from 1 to 65535".into()),
        };
        if host.is_empty() {
            return Err("expected a host before the port".into());
        }
        if !authority.starts_with('[')
            && !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        {
            return Err(format!("{host:?} is not a host name or IPv4 address"));
        }
        Ok(UpstreamUrl {
            authority: authority.to_string(),
            host: host.to_string(),
            port,
            path: path.to_string(),
            tls,
            unix: None,
        })
    }

    /// `http://unix:` and what follows it: an absolute socket path, then `:` and the request
    /// path, if any (the first `:/` after the socket path separates them, as in nginx).
    fn unix(rest: &str, tls: bool) -> Result<UpstreamUrl, String> {
        if tls {
            return Err("TLS to a Unix socket is not supported: use http://unix:".into());
        }
        let (socket, path) = match rest.find(":/") {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, "/mcp"),
        };
        if !socket.starts_with('/') || socket.len() < 2 {
            return Err("expected http://unix:/absolute/socket/path[:/request/path]".into());
        }
        if path.contains(['?', '#', ' ']) || socket.contains('\0') {
            return Err("expected http://unix:/socket[:/path] (no query or fragment)".into());
        }
        // The kernel's limit on a socket path (`sun_path`, 108 bytes with its terminating 0).
        if socket.len() > 107 {
            return Err(format!(
                "the socket path is {} bytes, over the 107 a Unix socket address holds",
                socket.len()
            ));
        }
        Ok(UpstreamUrl {
            authority: UNIX_HOST.to_string(),
            host: UNIX_HOST.to_string(),
            port: 0,
            path: path.to_string(),
            tls: false,
            unix: Some(socket.into()),
        })
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn upstream_urls_are_checked_with_their_key() {
        let u = UpstreamUrl::parse("http://127.0.0.1:9000/mcp/x").unwrap();
        assert_eq!(
            (u.authority.as_str(), u.path.as_str()),
            ("127.0.0.1:9000", "/mcp/x")
        );
        // `Host` is the authority as written: a default port is not added.
        let u = UpstreamUrl::parse("http://mcp.internal").unwrap();
        assert_eq!(
            (u.authority.as_str(), u.port, u.path.as_str()),
            ("mcp.internal", 80, "/mcp")
        );
        let u = UpstreamUrl::parse("http://[::1]").unwrap();
        assert_eq!(
            (u.authority.as_str(), u.host.as_str(), u.port),
            ("[::1]", "::1", 80)
        );
        let u = UpstreamUrl::parse("http://[::1]:81/").unwrap();
        assert_eq!((u.authority.as_str(), u.port), ("[::1]:81", 81));
        let u = UpstreamUrl::parse("https://mcp.example.com/v1/mcp").unwrap();
        assert_eq!(
            (
                u.authority.as_str(),
                u.host.as_str(),
                u.port,
                u.path.as_str(),
                u.tls
            ),
            ("mcp.example.com", "mcp.example.com", 443, "/v1/mcp", true)
        );
        let u = UpstreamUrl::parse("https://[::1]:8443").unwrap();
        assert_eq!(
            (u.authority.as_str(), u.host.as_str(), u.port),
            ("[::1]:8443", "::1", 8443)
        );
        assert!(!UpstreamUrl::parse("http://h").unwrap().tls);
        // A Unix socket, with the default request path or its own.
        let u = UpstreamUrl::parse("http://unix:/run/mcp/server.sock").unwrap();
        assert_eq!(
            (u.unix.as_deref(), u.path.as_str(), u.authority.as_str()),
            (
                Some(std::path::Path::new("/run/mcp/server.sock")),
                "/mcp",
                "localhost"
            )
        );
        let u = UpstreamUrl::parse("http://unix:/tmp/a.sock:/v1/mcp").unwrap();
        assert_eq!(
            (u.unix.as_deref(), u.path.as_str()),
            (Some(std::path::Path::new("/tmp/a.sock")), "/v1/mcp")
        );
        assert_eq!(UpstreamUrl::parse("http://h/mcp").unwrap().unix, None);
        let long = format!("http://unix:/{}", "s".repeat(107));
        for bad in [
            "ftp://x",
            "https://:443/",
            "http://",
            "http://x:0/",
            "http://x:99999/",
            "http://u@x/",
            "http://x/?q",
            "http://[::1",
            "http://[::1]x/",
            "http://[::1]:/",
            "http://[nope]:80/",
            "http://::1/",
            "http://h::80/",
            "http://x:+80/",
            "http://ex%61mple/",
            "http://[]/",
            "https://unix:/run/mcp.sock",
            "http://unix:",
            "http://unix:relative.sock",
            "http://unix:/",
            "http://unix:/s.sock:/mcp?x",
            &long,
        ] {
            assert!(UpstreamUrl::parse(bad).is_err(), "{bad}");
        }
        let yaml = "service_discovery:\n  static:\n    endpoints:\n      default:\n        - url: builtin:echo\n        - url: http://127.0.0.1:1/mcp\n      x:\n        - url: ftp://h/mcp\n";
        let e = Config::parse(yaml, false).unwrap_err();
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(
            e[0].starts_with(
                "service_discovery.static.endpoints.default: builtin:echo cannot share"
            ),
            "{e:?}"
        );
        assert!(
            e[1].starts_with(
                "service_discovery.static.endpoints.x[0].url: \"ftp://h/mcp\": expected http://"
            ),
            "{e:?}"
        );
        // `host_header`: a host[:port], nothing that could end the header field.
        let host = |h: &str| {
            Config::parse(&format!("service_discovery:\n  static:\n    endpoints:\n      default:\n        - url: http://10.0.0.5/mcp\n          host_header: {h:?}\n"), false)
        };
        assert!(host("mcp.internal:8080").is_ok());
        assert!(host("[::1]:80").is_ok());
        for bad in ["", "a b", "a\r\nX-Injected: 1", "a/b"] {
            let e = host(bad).unwrap_err();
            assert!(
                e[0].starts_with("service_discovery.static.endpoints.default[0].host_header:"),
                "{bad:?}: {e:?}"
            );
        }
        // One server listed twice in a namespace would be two upstreams with the same labels.
        let twice = "service_discovery:\n  static:\n    endpoints:\n      default:\n        - url: http://h/mcp\n        - url: http://h/mcp\n";
        assert_eq!(
            Config::parse(twice, false).unwrap_err(),
            ["service_discovery.static.endpoints.default[1].url: \"http://h/mcp\" is listed twice"]
        );
    }
}
