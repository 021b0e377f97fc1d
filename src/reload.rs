//! Configuration reload on SIGHUP: the limits an operator tunes during an incident, and the
//! upstreams, take effect at once, without a restart that would cut every open session and event
//! stream.
//!
//! Owns the rule of what reloads:
//! - the limits: `server.max_connections` (up to half the per-IP table, at least the value the
//!   gateway started with), `server.max_connections_per_ip` (while on),
//!   `server.max_requests_per_ip` and `server.request_burst_per_ip` (when a rate's state was
//!   made at startup), `server.max_new_connections_per_ip` and
//!   `server.new_connection_burst_per_ip` (likewise), `server.per_ip_overrides` (while the per-IP limit is on; see
//!   [`crate::limiter::overrides`]) and `server.ipv6_prefix_len` (checked together with the
//!   overrides; open connections stay counted where they were admitted);
//! - the timeouts `server.read_timeout`, `write_timeout`, `idle_timeout` (for the waits that
//!   start after the reload) and `shutdown_timeout` (for a drain that starts after it);
//! - `server.max_message_size` (for bodies and messages read after the reload; one being read
//!   as it comes may be held to either value), `server.allowed_origins` (for requests read
//!   after it), `server.proxy_protocol_networks` (for connections accepted after it);
//! - `server.access_log`, and `server.park_idle_connections` (for connections that go idle
//!   after the reload, or are waiting when it turns parking on; parked ones stay parked);
//! - the doors' certificate (`server.tls_cert_file`, `server.tls_key_file`, and the client
//!   authorities `server.tls_client_ca_file`: the files are read again on every reload while
//!   the doors speak TLS, since a renewal keeps their paths);
//! - all of `routing` and `service_discovery` (the upstreams, their CA files read again: see
//!   [`crate::upstream::registry`]).
//!
//! Everything else, and a change of these that cannot apply, is named in a warning and waits
//! for a restart.
//!
//! Invariants:
//! - A file that does not load or validate changes nothing (the error is logged whole).
//! - New limits apply to what is admitted from then on; open connections are never closed by a
//!   reload, even when they are now over a lowered limit.
//! - The running configuration (what `reload` compares against next time) holds only what was
//!   applied.

use std::path::Path;
use std::sync::atomic::Ordering;

use serde_yaml::Value;

use crate::config::{secs, Config, ServerConfig};
use crate::http::origin::Origins;
use crate::limiter::Limiter;
use crate::metrics::{describe_limits, Metrics, Reload};
use crate::proxy_protocol::Trusted;
use crate::runtime::Descriptors;
use crate::upstream::registry::Registry;
use crate::worker::Settings;

/// The `server` keys a reload applies; beside them, every key of `routing` and
/// `service_discovery` (see [`crate::upstream::registry`]).
const LIVE: [&str; 21] = [
    "server.access_log",
    "server.park_idle_connections",
    "server.ipv6_prefix_len",
    "server.read_timeout",
    "server.write_timeout",
    "server.idle_timeout",
    "server.shutdown_timeout",
    "server.max_connections",
    "server.max_connections_per_ip",
    "server.max_requests_per_ip",
    "server.request_burst_per_ip",
    "server.max_new_connections_per_ip",
    "server.new_connection_burst_per_ip",
    "server.per_ip_overrides",
    "server.max_message_size",
    "server.allowed_origins",
    "server.proxy_protocol_networks",
    "server.tls_cert_file",
    "server.tls_key_file",
    "server.tls_certificates",
    "server.tls_client_ca_file",
];

/// The sections a reload applies whole.
const LIVE_SECTIONS: [&str; 2] = ["routing.", "service_discovery."];

/// What a reload changes in the running gateway.
pub struct Live<'a> {
    pub limiter: &'a Limiter,
    /// What the connections read: timeouts, message size, trusted networks, allowed origins,
    /// the doors' TLS.
    pub settings: &'a Settings,
    pub upstreams: &'a Registry,
    pub metrics: &'a Metrics,
    /// What the open-file limit allows, checked again after the reload.
    pub descriptors: &'a Descriptors,
}

/// Re-reads `path` and applies what can be applied to `live`, updating `running`; counts the
/// outcome in the metrics.
pub fn reload(path: &Path, running: &mut Config, live: &Live) {
    live.metrics.reloaded(apply(path, running, live));
}

fn apply(path: &Path, running: &mut Config, live: &Live) -> Reload {
    let new = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(file = %path.display(), error = %e, "configuration not reloaded: nothing changed");
            return Reload::Failed;
        }
    };
    let (limiter, settings) = (live.limiter, live.settings);
    let tls = settings.tls.as_ref();
    let mut refused: Vec<String> = Vec::new();
    // The upstreams first: the files they name (CA bundles) are read again on every reload.
    match live.upstreams.reload(&new, |n| live.metrics.make_room(n)) {
        Ok(change) => {
            if let Some(change) = change {
                let changed: Vec<String> = changed_keys(running, &new)
                    .into_iter()
                    .filter(|k| LIVE_SECTIONS.iter().any(|s| k.starts_with(s)))
                    .collect();
                tracing::info!(
                    added = %change.added.join(", "),
                    removed = %change.removed.join(", "),
                    changed = %changed.join(", "),
                    "upstreams reloaded: new requests and sessions use the new set; sessions on a removed upstream start anew"
                );
            }
            running.routing = new.routing.clone();
            running.service_discovery = new.service_discovery.clone();
        }
        Err(why) => refused.push(format!("service_discovery ({why})")),
    }
    let (was, now) = (&mut running.server, &new.server);
    if now.max_connections != was.max_connections {
        match limiter.set_max_connections(now.max_connections) {
            Ok(()) => was.max_connections = now.max_connections,
            Err(why) => refused.push(format!("server.max_connections ({why})")),
        }
    }
    if now.max_connections_per_ip != was.max_connections_per_ip {
        match limiter.set_max_per_ip(now.max_connections_per_ip) {
            Ok(()) => was.max_connections_per_ip = now.max_connections_per_ip,
            Err(why) => refused.push(format!("server.max_connections_per_ip ({why})")),
        }
    }
    per_ip_keys(limiter, was, now, &mut refused);
    let timeouts = |s: &ServerConfig| (s.read_timeout, s.write_timeout, s.idle_timeout);
    if timeouts(now) != timeouts(was) {
        let (read, write, idle) = timeouts(now);
        settings.timeouts.set(secs(read), secs(write), secs(idle));
        (was.read_timeout, was.write_timeout, was.idle_timeout) = (read, write, idle);
        tracing::info!(
            read,
            write,
            idle,
            "timeouts changed: waits that start from now use them"
        );
    }
    if now.shutdown_timeout != was.shutdown_timeout {
        settings.set_shutdown_timeout(secs(now.shutdown_timeout));
        was.shutdown_timeout = now.shutdown_timeout;
        tracing::info!(
            seconds = now.shutdown_timeout,
            "shutdown_timeout changed: a drain that starts from now waits for it"
        );
    }
    if now.max_message_size != was.max_message_size {
        settings
            .max_message_size
            .store(now.max_message_size, Ordering::Relaxed);
        was.max_message_size = now.max_message_size;
        tracing::info!(
            bytes = now.max_message_size,
            "max_message_size changed: bodies and messages read from now are held to it"
        );
    }
    if now.allowed_origins != was.allowed_origins {
        settings
            .allowed_origins
            .replace(Origins::new(&now.allowed_origins));
        was.allowed_origins.clone_from(&now.allowed_origins);
        tracing::info!(origins = %now.allowed_origins.join(" "), "allowed origins replaced: requests read from now are checked against them");
    }
    if now.proxy_protocol_networks != was.proxy_protocol_networks {
        settings
            .proxy_protocol
            .replace(Trusted::of(&now.proxy_protocol_networks));
        was.proxy_protocol_networks
            .clone_from(&now.proxy_protocol_networks);
        tracing::info!(networks = %now.proxy_protocol_networks.join(" "), "PROXY protocol networks replaced: connections accepted from now are read by them");
    }
    if now.park_idle_connections != was.park_idle_connections {
        settings
            .park_idle
            .store(now.park_idle_connections, Ordering::Relaxed);
        was.park_idle_connections = now.park_idle_connections;
        if now.park_idle_connections {
            tracing::info!("idle connections park from the next sweep on");
        } else {
            tracing::info!("idle connections park no more; parked ones stay until their next request, their close or their deadline");
        }
    }
    if now.access_log != was.access_log {
        crate::logging::set_access_log(now.access_log);
        was.access_log = now.access_log;
        tracing::info!(on = now.access_log, "access log switched");
    }
    let rate = (now.max_requests_per_ip, now.request_burst_per_ip);
    if rate != (was.max_requests_per_ip, was.request_burst_per_ip) {
        match limiter.set_request_rate(rate.0, rate.1) {
            Ok(()) => (was.max_requests_per_ip, was.request_burst_per_ip) = rate,
            Err(why) => refused.push(format!("server.max_requests_per_ip ({why})")),
        }
    }
    let rate = (
        now.max_new_connections_per_ip,
        now.new_connection_burst_per_ip,
    );
    if rate
        != (
            was.max_new_connections_per_ip,
            was.new_connection_burst_per_ip,
        )
    {
        match limiter.set_connection_rate(rate.0, rate.1) {
            Ok(()) => {
                (
                    was.max_new_connections_per_ip,
                    was.new_connection_burst_per_ip,
                ) = rate;
            }
            Err(why) => refused.push(format!("server.max_new_connections_per_ip ({why})")),
        }
    }
    match (tls, crate::tls::door_config(now)) {
        (Some(door), Ok(Some(config))) => {
            door.replace(config);
            was.tls_cert_file.clone_from(&now.tls_cert_file);
            was.tls_key_file.clone_from(&now.tls_key_file);
            was.tls_certificates.clone_from(&now.tls_certificates);
            was.tls_client_ca_file.clone_from(&now.tls_client_ca_file);
            tracing::info!(
                cert = %now.tls_cert_file.as_ref().map_or(String::new(), |f| f.display().to_string()),
                more = now.tls_certificates.len(),
                client_ca = %now.tls_client_ca_file.as_ref().map_or("none".into(), |f| f.display().to_string()),
                "TLS certificates reloaded: new handshakes use them"
            );
        }
        (Some(_), Ok(None)) => {
            refused.push("server.tls_cert_file (turning TLS off needs a restart)".into())
        }
        (None, Ok(Some(_))) => {
            refused.push("server.tls_cert_file (turning TLS on needs a restart)".into())
        }
        (None, Ok(None)) => {}
        (_, Err(why)) => refused.push(format!("server.tls_cert_file ({why})")),
    }
    let restart: Vec<String> = changed_keys(running, &new)
        .into_iter()
        .filter(|k| !LIVE.contains(&k.as_str()))
        .filter(|k| !LIVE_SECTIONS.iter().any(|s| k.starts_with(s)))
        .collect();
    let partial = !refused.is_empty() || !restart.is_empty();
    if partial {
        tracing::warn!(
            not_applied = %refused.join(", "),
            after_restart = %restart.join(", "),
            "configuration reloaded in part: these changes wait for a restart"
        );
    }
    tracing::info!(file = %path.display(), limits = %describe_limits(limiter), "configuration reloaded");
    live.descriptors
        .check(limiter.max_connections(), live.upstreams.current());
    if partial {
        Reload::Partial
    } else {
        Reload::Applied
    }
}

/// Applies `server.ipv6_prefix_len` and `server.per_ip_overrides`, which are checked together
/// (no IPv6 override network narrower than the prefix). When the list cannot apply, a changed
/// prefix still does if the list in force allows it.
fn per_ip_keys(
    limiter: &Limiter,
    was: &mut ServerConfig,
    now: &ServerConfig,
    refused: &mut Vec<String>,
) {
    let limits =
        |s: &ServerConfig| -> Vec<_> { s.per_ip_overrides.iter().map(|o| o.limits()).collect() };
    let new_prefix = now.ipv6_prefix_len != was.ipv6_prefix_len;
    let new_list = now.per_ip_overrides != was.per_ip_overrides;
    if !new_prefix && !new_list {
        return;
    }
    let (prefix_applied, list_applied) =
        match limiter.set_per_ip_keys(now.ipv6_prefix_len, &limits(now)) {
            Ok(_) => (new_prefix, new_list),
            Err(why) => {
                if new_list {
                    refused.push(format!("server.per_ip_overrides ({why})"));
                }
                // The prefix alone, with the list in force.
                let prefix = new_prefix
                    && limiter
                        .set_per_ip_keys(now.ipv6_prefix_len, &limits(was))
                        .map_err(|why| refused.push(format!("server.ipv6_prefix_len ({why})")))
                        .is_ok();
                (prefix, false)
            }
        };
    if prefix_applied {
        was.ipv6_prefix_len = now.ipv6_prefix_len;
        tracing::info!(
            ipv6_prefix_len = now.ipv6_prefix_len,
            "IPv6 prefix changed: new IPv6 connections count per network of this length; open ones stay counted where they were admitted"
        );
    }
    if list_applied {
        was.per_ip_overrides.clone_from(&now.per_ip_overrides);
        tracing::info!(
            networks = now.per_ip_overrides.len(),
            "per-IP overrides replaced: new connections are admitted under them, and the open ones' requests follow their network's rate"
        );
    }
}

/// The key paths whose values differ between `a` and `b` (`server.workers`,
/// `service_discovery.static.endpoints.default`, ...).
pub fn changed_keys(a: &Config, b: &Config) -> Vec<String> {
    let value = |c: &Config| serde_yaml::to_value(c).expect("a configuration serializes");
    let mut out = Vec::new();
    diff(&value(a), &value(b), "", &mut out);
    out
}

fn diff(a: &Value, b: &Value, path: &str, out: &mut Vec<String>) {
    let join = |k: &Value| {
        let name = k.as_str().map_or_else(|| format!("{k:?}"), str::to_string);
        if path.is_empty() {
            name
        } else {
            format!("{path}.{name}")
        }
    };
    match (a, b) {
        (Value::Mapping(x), Value::Mapping(y)) => {
            for (k, p) in x {
                match y.get(k) {
                    Some(q) => diff(p, q, &join(k), out),
                    None => out.push(join(k)),
                }
            }
            out.extend(y.keys().filter(|k| !x.contains_key(*k)).map(join));
        }
        _ if a != b => out.push(path.to_string()),
        _ => {}
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// What a reload changes, for a gateway started on `running` with the default upstreams.
    fn live(limiter: &'static Limiter, running: &Config) -> Live<'static> {
        let upstreams = Registry::new(&Config::default()).unwrap().leak();
        Live {
            limiter,
            settings: Box::leak(Box::new(Settings::new(&running.server).unwrap())),
            upstreams,
            metrics: Metrics::new(1, Limiter::new(1, 0).leak(), upstreams).leak(),
            descriptors: Box::leak(Box::new(Descriptors {
                limit: 1 << 20,
                workers: 1,
            })),
        }
    }

    #[test]
    fn changed_keys_are_named_by_path() {
        let a = Config::default();
        let b = Config::parse(
            "server:\n  workers: 3\n  max_connections_per_ip: 7\nrouting:\n  circuit_breaker:\n    failure_threshold: 9\n",
            false,
        )
        .unwrap();
        assert_eq!(
            changed_keys(&a, &b),
            [
                "server.workers",
                "server.max_connections_per_ip",
                "routing.circuit_breaker.failure_threshold"
            ]
        );
        assert!(changed_keys(&a, &a).is_empty());
        let c = Config::parse(
            "service_discovery:\n  static:\n    endpoints:\n      tools:\n        - url: builtin:echo\n",
            false,
        )
        .unwrap();
        assert_eq!(
            changed_keys(&a, &c),
            [
                "service_discovery.static.endpoints.default",
                "service_discovery.static.endpoints.tools"
            ]
        );
    }

    #[test]
    fn reload_applies_the_live_limits_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.yaml");
        let start = "server:\n  max_connections: 100\n  max_connections_per_ip: 10\n  max_requests_per_ip: 5\n  max_new_connections_per_ip: 4\n";
        let mut running = Config::parse(start, false).unwrap();
        let limiter = Limiter::new(100, 10)
            .with_request_rate(5, 0)
            .with_connection_rate(4, 0)
            .leak();
        let live = live(limiter, &running);
        std::fs::write(
            &path,
            "server:\n  max_connections: 50\n  max_connections_per_ip: 2\n  max_requests_per_ip: 7\n  request_burst_per_ip: 9\n  max_new_connections_per_ip: 3\n  new_connection_burst_per_ip: 6\n  workers: 3\n  read_timeout: 2.5\n  idle_timeout: 7\n",
        )
        .unwrap();
        assert_eq!(apply(&path, &mut running, &live), Reload::Partial);
        assert_eq!(limiter.max_connections(), 50);
        let t = &live.settings.timeouts;
        assert_eq!(
            (
                t.read().as_millis(),
                t.write().as_millis(),
                t.idle().as_millis()
            ),
            (2500, 30_000, 7000)
        );
        assert_eq!(running.server.read_timeout, 2.5);
        assert_eq!(limiter.max_per_ip(), 2);
        assert_eq!(limiter.request_rate(), Some((7, 9)));
        assert_eq!(limiter.connection_rate(), Some((3, 6)));
        assert_eq!(running.server.max_connections, 50);
        assert_eq!(running.server.workers, 0, "workers waits for a restart");

        // Above the startup value, per-IP off, a bad file: nothing of it applies.
        std::fs::write(
            &path,
            "server:\n  max_connections: 200\n  max_connections_per_ip: 0\n",
        )
        .unwrap();
        assert_eq!(apply(&path, &mut running, &live), Reload::Partial);
        assert_eq!((limiter.max_connections(), limiter.max_per_ip()), (50, 2));
        assert_eq!(limiter.request_rate(), None, "the rate did apply (off)");
        std::fs::write(&path, "server:\n  max_connections_per_ip: many\n").unwrap();
        assert_eq!(apply(&path, &mut running, &live), Reload::Failed);
        assert_eq!(limiter.max_per_ip(), 2);
        // What is running now, written back: nothing to do.
        std::fs::write(&path, running.to_yaml()).unwrap();
        assert_eq!(apply(&path, &mut running, &live), Reload::Applied);
    }

    #[test]
    fn the_ipv6_prefix_reloads_with_the_overrides_or_alone_when_they_cannot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.yaml");
        let start = "server:\n  max_connections: 100\n  max_connections_per_ip: 10\n";
        let mut running = Config::parse(start, false).unwrap();
        let limiter = Limiter::new(100, 10).leak();
        let live = live(limiter, &running);
        let narrow =
            "  per_ip_overrides:\n    - network: 2001:db8::/96\n      max_connections_per_ip: 20\n";
        let file = |prefix: u8, overrides: &str| {
            let text = format!(
                "{start}  ipv6_prefix_len: {prefix}\n  park_idle_connections: false\n{overrides}"
            );
            std::fs::write(&path, text).unwrap();
        };
        // Both at once: the /96 network needs a prefix of 96 or more.
        file(96, narrow);
        assert_eq!(apply(&path, &mut running, &live), Reload::Applied);
        assert_eq!((limiter.ipv6_prefix(), limiter.per_ip_overrides()), (96, 1));
        assert!(!live.settings.parks_idle());
        // A list that cannot apply (a rate where none was on at startup) leaves the prefix to
        // apply alone, while the list in force allows it...
        let rated = "  per_ip_overrides:\n    - network: 10.0.0.0/8\n      max_connections_per_ip: 20\n      max_requests_per_ip: 5\n";
        file(112, rated);
        assert_eq!(apply(&path, &mut running, &live), Reload::Partial);
        assert_eq!(
            (limiter.ipv6_prefix(), limiter.per_ip_overrides()),
            (112, 1)
        );
        assert_eq!(running.server.ipv6_prefix_len, 112);
        // ...and not when the /96 network in force would be narrower than it.
        file(64, rated);
        assert_eq!(apply(&path, &mut running, &live), Reload::Partial);
        assert_eq!(
            (limiter.ipv6_prefix(), running.server.ipv6_prefix_len),
            (112, 112)
        );
        assert_eq!(running.server.per_ip_overrides.len(), 1);
        file(64, "");
        assert_eq!(apply(&path, &mut running, &live), Reload::Applied);
        assert_eq!((limiter.ipv6_prefix(), limiter.per_ip_overrides()), (64, 0));
    }

    #[test]
    fn the_doors_certificate_is_read_again_but_tls_is_not_turned_on_or_off() {
        let dir = tempfile::tempdir().unwrap();
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let (cert_file, key_file) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cert_file, cert.cert.pem()).unwrap();
        std::fs::write(&key_file, cert.signing_key.serialize_pem()).unwrap();
        let with_tls = format!(
            "server:\n  tls_cert_file: {}\n  tls_key_file: {}\n",
            cert_file.display(),
            key_file.display()
        );
        let path = dir.path().join("g.yaml");
        std::fs::write(&path, &with_tls).unwrap();
        let limiter = Limiter::new(100, 10).leak();
        // Started without TLS: it is not turned on.
        let mut running = Config::default();
        let plain = live(limiter, &running);
        assert_eq!(apply(&path, &mut running, &plain), Reload::Partial);
        assert_eq!(running.server.tls_cert_file, None);
        // Started with TLS: the files are read again even when their paths did not change.
        let mut running = Config::parse(&with_tls, false).unwrap();
        let live = live(limiter, &running);
        let door = live.settings.tls.as_ref().unwrap();
        let own = std::cell::RefCell::new(None);
        let before = door.refresh(&own);
        assert!(
            Arc::ptr_eq(&before, &door.refresh(&own)),
            "settled: the same copy"
        );
        assert_eq!(apply(&path, &mut running, &live), Reload::Applied);
        assert!(
            !Arc::ptr_eq(&before, &door.refresh(&own)),
            "a new configuration"
        );
        // Client certificates required from now on (mutual TLS): applied with the rest.
        let ca = dir.path().join("clients.pem");
        std::fs::write(&ca, cert.cert.pem()).unwrap();
        std::fs::write(
            &path,
            format!("{with_tls}  tls_client_ca_file: {}\n", ca.display()),
        )
        .unwrap();
        assert_eq!(apply(&path, &mut running, &live), Reload::Applied);
        assert_eq!(running.server.tls_client_ca_file, Some(ca));
        // Turning it off: refused, the doors keep theirs.
        std::fs::write(&path, "server:\n  max_connections: 100\n").unwrap();
        assert_eq!(apply(&path, &mut running, &live), Reload::Partial);
        assert!(running.server.tls_cert_file.is_some());
    }
}
