//! Upstream URLs (`http://host[:port][/path]`, `https://...`), split into what a request needs.

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
}

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
        // One server listed twice in a namespace would be two upstreams with the same labels.
        let twice = "service_discovery:\n  static:\n    endpoints:\n      default:\n        - url: http://h/mcp\n        - url: http://h/mcp\n";
        assert_eq!(
            Config::parse(twice, false).unwrap_err(),
            ["service_discovery.static.endpoints.default[1].url: \"http://h/mcp\" is listed twice"]
        );
    }
}
