//! The semantic checks of a configuration that could be read: every bad value at once, each
//! named by its key path (`server.max_connections: must be at least 1`), including what only a
//! look outside the file shows (a CA file that does not load, a door certificate without its
//! key).

use super::{parse_network, Config, UpstreamUrl, BUILTIN_ECHO};

/// The error for a `key` whose value `v` is above `max`, if it is.
fn at_most(key: &str, v: u64, max: u64) -> Option<String> {
    (v > max).then(|| format!("{key}: {v} is above the largest supported value {max}"))
}

/// The error for a `key` whose value `v` is not an address or network.
/// A `Host` value the gateway may send as it is: a name, an IPv4 address or a bracketed IPv6
/// one, and a port; nothing that could end the field (no space, no control byte).
fn is_host_header(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 255
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:[]".contains(&b))
}

fn not_a_network(key: &str, v: &str) -> String {
    format!("{key}: {v:?} is not an address or network (a.b.c.d/len, v6::/len)")
}

impl Config {
    /// Every semantic problem at once, each naming its key.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut p = Vec::new();
        let s = &self.server;
        if s.max_connections == 0 {
            p.push("server.max_connections: must be at least 1".into());
        }
        p.extend(at_most(
            "server.max_connections",
            s.max_connections as u64,
            1 << 30,
        ));
        for (key, rate) in [
            ("server.max_requests_per_ip", s.max_requests_per_ip),
            (
                "server.max_new_connections_per_ip",
                s.max_new_connections_per_ip,
            ),
        ] {
            p.extend(at_most(key, rate, crate::limiter::rate::MAX_RATE));
            if rate > 0 && s.max_connections_per_ip == 0 {
                p.push(format!(
                    "{key}: needs server.max_connections_per_ip above 0 \
                     (the per-IP table keeps each address's rate)"
                ));
            }
        }
        if !(1..=128).contains(&s.ipv6_prefix_len) {
            p.push(format!(
                "server.ipv6_prefix_len: {} is not a prefix length (1 to 128)",
                s.ipv6_prefix_len
            ));
        }
        for (i, o) in s.per_ip_overrides.iter().enumerate() {
            let key = format!("server.per_ip_overrides[{i}]");
            match parse_network(&o.network) {
                None => p.push(not_a_network(&format!("{key}.network"), &o.network)),
                // IPv6 clients are counted per ipv6_prefix_len network: an override inside one
                // would give addresses that share a count different limits.
                Some((net, len)) if net.is_ipv6() && len > s.ipv6_prefix_len => p.push(format!(
                    "{key}.network: {:?} is narrower than server.ipv6_prefix_len ({}), \
                         the network IPv6 clients are counted by",
                    o.network, s.ipv6_prefix_len
                )),
                Some(_) => {}
            }
            p.extend(at_most(
                &format!("{key}.max_connections_per_ip"),
                o.max_connections_per_ip,
                crate::limiter::ip_table::MAX_COUNT,
            ));
            p.extend(at_most(
                &format!("{key}.max_requests_per_ip"),
                o.max_requests_per_ip.unwrap_or(0),
                crate::limiter::rate::MAX_RATE,
            ));
        }
        p.extend(at_most(
            "server.per_ip_overrides: entries",
            s.per_ip_overrides.len() as u64,
            1_000,
        ));
        for (i, n) in s.proxy_protocol_networks.iter().enumerate() {
            if parse_network(n).is_none() {
                p.push(not_a_network(
                    &format!("server.proxy_protocol_networks[{i}]"),
                    n,
                ));
            }
        }
        p.extend(at_most(
            "server.proxy_protocol_networks: entries",
            s.proxy_protocol_networks.len() as u64,
            1_000,
        ));
        for (i, o) in s.allowed_origins.iter().enumerate() {
            if !crate::http::origin::valid(o) {
                p.push(format!(
                    "server.allowed_origins[{i}]: {o:?} is not an origin \
                     (scheme://host[:port] without a path, \"null\" or \"*\")"
                ));
            }
        }
        for (key, set) in [
            ("tls_client_ca_file", s.tls_client_ca_file.is_some()),
            ("tls_certificates", !s.tls_certificates.is_empty()),
        ] {
            if set && s.tls_cert_file.is_none() {
                p.push(format!(
                    "server.{key}: needs server.tls_cert_file (TLS on the doors)"
                ));
            }
        }
        match (&s.tls_cert_file, &s.tls_key_file) {
            (Some(_), Some(_)) => {
                if let Err(why) = crate::tls::door_config(s) {
                    p.push(why);
                }
            }
            (Some(_), None) => {
                p.push("server.tls_key_file: needed with server.tls_cert_file".into())
            }
            (None, Some(_)) => {
                p.push("server.tls_cert_file: needed with server.tls_key_file".into())
            }
            (None, None) => {}
        }
        if !s.per_ip_overrides.is_empty() && s.max_connections_per_ip == 0 {
            p.push(
                "server.per_ip_overrides: needs server.max_connections_per_ip above 0 \
                 (without the per-IP table there is no per-IP limit to override)"
                    .into(),
            );
        }
        if s.request_burst_per_ip > 0 && s.max_requests_per_ip == 0 {
            p.push("server.request_burst_per_ip: set without server.max_requests_per_ip".into());
        }
        if s.new_connection_burst_per_ip > 0 && s.max_new_connections_per_ip == 0 {
            p.push(
                "server.new_connection_burst_per_ip: set without server.max_new_connections_per_ip"
                    .into(),
            );
        }
        p.extend(at_most(
            "server.max_connections_per_ip",
            s.max_connections_per_ip,
            crate::limiter::ip_table::MAX_COUNT,
        ));
        for (key, v) in [
            ("server.read_timeout", s.read_timeout),
            ("server.write_timeout", s.write_timeout),
            ("server.idle_timeout", s.idle_timeout),
            ("server.shutdown_timeout", s.shutdown_timeout),
            (
                "routing.health_check_interval",
                self.routing.health_check_interval,
            ),
            ("routing.connect_timeout", self.routing.connect_timeout),
            ("routing.request_timeout", self.routing.request_timeout),
            ("routing.pool_idle_timeout", self.routing.pool_idle_timeout),
            (
                "routing.circuit_breaker.timeout_seconds",
                self.routing.circuit_breaker.timeout_seconds,
            ),
        ] {
            if !(v.is_finite() && v > 0.0 && v <= 86_400.0 * 365.0) {
                p.push(format!("{key}: {v} is not a positive number of seconds"));
            }
        }
        if !(64..=crate::mcpb::MAX_PAYLOAD).contains(&s.max_message_size) {
            p.push(format!(
                "server.max_message_size: {} must be between 64 and {} bytes",
                s.max_message_size,
                crate::mcpb::MAX_PAYLOAD
            ));
        }
        for (key, host) in [
            ("server.host", &s.host),
            ("server.metrics_host", &s.metrics_host),
        ] {
            if host.parse::<std::net::IpAddr>().is_err() {
                p.push(format!("{key}: {host:?} is not an IP address"));
            }
        }
        if s.tcp_port != 0 && s.tcp_port == s.port && s.port != 0 {
            p.push("server.tcp_port: must differ from server.port".into());
        }
        // The admin listener shares no port with a door whose address overlaps its own (the
        // same address, or either a wildcard): binding would fail at startup.
        let overlap = match (
            s.host.parse::<std::net::IpAddr>(),
            s.metrics_host.parse::<std::net::IpAddr>(),
        ) {
            (Ok(a), Ok(b)) => a.is_unspecified() || b.is_unspecified() || a == b,
            _ => false, // reported above
        };
        for (key, port) in [("server.port", s.port), ("server.tcp_port", s.tcp_port)] {
            if s.metrics_port != 0 && s.metrics_port == port && overlap {
                p.push(format!("server.metrics_port: must differ from {key}"));
            }
        }
        if s.workers > 4096 {
            p.push(format!("server.workers: {} is more than 4096", s.workers));
        }
        let cb = &self.routing.circuit_breaker;
        for (key, v) in [
            (
                "routing.circuit_breaker.failure_threshold",
                cb.failure_threshold,
            ),
            (
                "routing.circuit_breaker.success_threshold",
                cb.success_threshold,
            ),
        ] {
            if v == 0 {
                p.push(format!("{key}: must be at least 1"));
            }
        }
        let endpoints = &self.service_discovery.static_.endpoints;
        if endpoints.is_empty() {
            p.push("service_discovery.static.endpoints: at least one namespace is needed".into());
        }
        for (ns, list) in endpoints {
            let key = format!("service_discovery.static.endpoints.{ns}");
            if ns.is_empty()
                || !ns
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                p.push(format!(
                    "{key}: a namespace is letters, digits, '-', '_' or '.'"
                ));
            }
            if list.is_empty() {
                p.push(format!("{key}: needs at least one endpoint"));
            }
            let builtin = list.iter().filter(|e| e.url == BUILTIN_ECHO).count();
            if builtin > 0 && builtin < list.len() {
                p.push(format!(
                    "{key}: {BUILTIN_ECHO} cannot share a namespace with HTTP upstreams"
                ));
            }
            for (i, e) in list.iter().enumerate() {
                let tls = if e.url == BUILTIN_ECHO {
                    false
                } else {
                    match UpstreamUrl::parse(&e.url) {
                        Ok(u) => u.tls,
                        Err(why) => {
                            p.push(format!("{key}[{i}].url: {:?}: {why}", e.url));
                            true // its TLS keys are not the problem
                        }
                    }
                };
                for (name, set) in [
                    ("tls_ca_file", e.tls_ca_file.is_some()),
                    ("tls_server_name", e.tls_server_name.is_some()),
                    ("tls_cert_file", e.tls_cert_file.is_some()),
                    ("tls_key_file", e.tls_key_file.is_some()),
                ] {
                    if set && !tls {
                        p.push(format!("{key}[{i}].{name}: only for https:// upstreams"));
                    }
                }
                if let Some(f) = &e.tls_ca_file {
                    if let Err(why) = crate::tls::read_roots(f) {
                        p.push(format!("{key}[{i}].tls_ca_file: {why}"));
                    }
                }
                match (&e.tls_cert_file, &e.tls_key_file, e.identity()) {
                    (_, _, Some(identity)) if tls => {
                        if let Err(why) = crate::tls::client_config(None, Some(identity)) {
                            p.push(format!("{key}[{i}].tls_cert_file, tls_key_file: {why}"));
                        }
                    }
                    (Some(_), None, _) => p.push(format!(
                        "{key}[{i}].tls_key_file: needed with tls_cert_file"
                    )),
                    (None, Some(_), _) => p.push(format!(
                        "{key}[{i}].tls_cert_file: needed with tls_key_file"
                    )),
                    _ => {}
                }
                if let Some(h) = &e.host_header {
                    if !is_host_header(h) {
                        p.push(format!(
                            "{key}[{i}].host_header: {h:?} is not a host[:port] (letters, digits, '-', '.', '_', ':', '[', ']')"
                        ));
                    }
                }
                if let Some(n) = &e.tls_server_name {
                    if let Err(why) = crate::tls::server_name(n) {
                        p.push(format!("{key}[{i}].tls_server_name: {why}"));
                    }
                }
                if e.weight == 0 {
                    p.push(format!("{key}[{i}].weight: must be at least 1"));
                }
                if list[..i].iter().any(|earlier| earlier.url == e.url) {
                    p.push(format!("{key}[{i}].url: {:?} is listed twice", e.url));
                }
            }
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(p)
        }
    }
}
