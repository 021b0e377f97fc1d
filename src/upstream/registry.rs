//! The upstreams in force, and their replacement by a configuration reload (SIGHUP): adding or
//! removing an MCP server, changing a weight, a strategy or a timeout, renewing an upstream's CA
//! file, without a restart that would cut every open session and event stream.
//!
//! Owns every [`Upstream`] the process has made and the [`Upstreams`] view in force (the
//! namespaces, their upstreams and the `routing` settings). A reload builds a whole new view and
//! publishes it with one pointer store; a request takes the view in force when it starts and
//! keeps it to its end, so none sees half of one configuration and half of the next.
//!
//! Invariants:
//! - An upstream whose identity did not change (its namespace, URL and TLS keys, and the contents
//!   of its CA, certificate and key files) is the same object in the new view: its pooled
//!   connections, health, breaker, in-flight counts and metrics carry on, and sessions on it
//!   stay where they are (a session's tag is a hash of namespace and URL). What else is set per
//!   upstream changes in place or with the view: its breaker settings and `max_in_flight` are
//!   given to it when the view is published; its weight is the view's.
//! - An upstream's index never changes and is never given to another upstream: per-core metrics,
//!   pools and balancing state are indexed by it. An upstream removed and later configured again
//!   gets its old object back, with its health and breaker reset.
//! - Views and upstreams are never freed: a request may hold either for as long as it runs, and
//!   counting holders would be a shared write per request. A reload that changes nothing keeps
//!   the view in force; one that changes the upstreams keeps the old view (a few hundred bytes).
//! - Per-upstream storage ([`PerUpstream`]) has room for an index before any view naming it is
//!   published.
//! - A reload that cannot build its view (a host that does not resolve, an unreadable CA file)
//!   changes nothing.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use super::Upstream;
use super::Upstreams;
use crate::config::Config;
use crate::published::Published;

/// Upstreams the process may make, all reloads together (per-upstream storage is sized by it).
pub const MAX_UPSTREAMS: usize = 4096;
/// One `T` per upstream index (a core's counters for it), room made by the registry before an
/// upstream is in force.
pub type PerUpstream<T> = crate::indexed::Indexed<T>;

/// See the module documentation.
pub struct Registry {
    /// The view in force: a reader that sees it sees every upstream it names built, and the
    /// room made for them.
    current: Published<Upstreams>,
    /// Every upstream made, by its identity; written by reloads only (one thread at a time).
    made: Mutex<HashMap<String, &'static Upstream>>,
}

/// What a reload that put a new view in force changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Change {
    /// `namespace url` of each upstream that came in (one whose identity changed, a renewed CA
    /// file say, goes out and comes in).
    pub added: Vec<String>,
    /// `namespace url` of each upstream that went out.
    pub removed: Vec<String>,
}

impl Registry {
    /// The registry of `config`'s upstreams; host names are resolved now.
    pub fn new(config: &Config) -> std::io::Result<Registry> {
        let made = Mutex::new(HashMap::new());
        let view = build(
            config,
            &mut made.lock().expect("not poisoned"),
            0,
            &HashSet::new(),
        )
        .map_err(std::io::Error::other)?;
        Ok(Registry {
            current: Published::new(view),
            made,
        })
    }

    pub fn leak(self) -> &'static Registry {
        Box::leak(Box::new(self))
    }

    /// The view in force.
    pub fn current(&self) -> &'static Upstreams {
        self.current.get()
    }

    /// Builds the view of `config` (CA files read again, new host names resolved), makes room
    /// for its upstreams with `make_room` (every core's per-upstream storage) and puts it in
    /// force, unless it is the view already in force (`Ok(None)`). `Err`: nothing changed, and
    /// why.
    pub fn reload(
        &self,
        config: &Config,
        make_room: impl FnOnce(usize),
    ) -> Result<Option<Change>, String> {
        let mut made = self.made.lock().expect("only reloads take it; none panics");
        let now = self.current();
        let in_force: HashSet<usize> = now.all.iter().map(|u| u.index).collect();
        let view = build(config, &mut made, now.generation + 1, &in_force)?;
        if view.same_as(now) {
            return Ok(None);
        }
        let names = |v: &Upstreams, keep: &dyn Fn(&Upstream) -> bool| -> Vec<String> {
            v.all
                .iter()
                .filter(|u| keep(u))
                .map(|u| format!("{} {}", u.namespace, u.url))
                .collect()
        };
        let next: HashSet<usize> = view.all.iter().map(|u| u.index).collect();
        let change = Change {
            added: names(&view, &|u| !in_force.contains(&u.index)),
            removed: names(now, &|u| !next.contains(&u.index)),
        };
        make_room(made.len());
        for u in now.all.iter().filter(|u| !next.contains(&u.index)) {
            u.retired.store(true, Ordering::Relaxed);
        }
        for u in &view.all {
            u.configure(&view.settings);
        }
        self.current.replace(view);
        Ok(Some(change))
    }
}

/// The view of `config`, numbered `generation`: upstreams already made are taken again by
/// identity (those not in force, `in_force` being the indices of the view in force, are reset
/// first), new ones made and recorded in `made`.
fn build(
    config: &Config,
    made: &mut HashMap<String, &'static Upstream>,
    generation: u64,
    in_force: &HashSet<usize>,
) -> Result<Upstreams, String> {
    let mut all: Vec<&'static Upstream> = Vec::new();
    let mut namespaces = Vec::new();
    for (ns, endpoints) in &config.service_discovery.static_.endpoints {
        let mut members = Vec::new();
        let weights = endpoints.iter().map(|e| e.weight).collect();
        for e in endpoints {
            let key = identity(ns, e)?;
            let u = match made.get(&key) {
                Some(u) => {
                    if !in_force.contains(&u.index) {
                        u.reset();
                    }
                    *u
                }
                None => {
                    if made.len() >= MAX_UPSTREAMS {
                        return Err(format!(
                            "more than {MAX_UPSTREAMS} different upstreams configured since the gateway started: restart it to load this configuration"
                        ));
                    }
                    let u: &'static Upstream =
                        Box::leak(Box::new(Upstream::new(made.len(), ns, e, &config.routing)?));
                    made.insert(key, u);
                    u
                }
            };
            members.push(u);
            all.push(u);
        }
        namespaces.push(super::Namespace::new(ns.clone(), members, weights));
    }
    Ok(Upstreams::new(generation, all, namespaces, &config.routing))
}

/// What makes an upstream the same one across reloads: everything its object is built from and
/// cannot change in place, the contents of the files it reads included (a renewed CA bundle or
/// client certificate makes it a new one).
fn identity(ns: &str, e: &crate::config::Endpoint) -> Result<String, String> {
    let contents = |key: &str, file: &Option<std::path::PathBuf>| -> Result<u64, String> {
        let Some(f) = file else { return Ok(0) };
        let bytes = std::fs::read(f).map_err(|why| {
            format!(
                "service_discovery.static.endpoints.{ns}: {}: {key} {}: {why}",
                e.url,
                f.display()
            )
        })?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        bytes.hash(&mut h);
        Ok(h.finish())
    };
    let files = [
        contents("tls_ca_file", &e.tls_ca_file)?,
        contents("tls_cert_file", &e.tls_cert_file)?,
        contents("tls_key_file", &e.tls_key_file)?,
    ];
    Ok(format!(
        "{ns}\n{}\n{:?} {:?} {:?} {files:x?}\n{:?} {:?}",
        e.url, e.tls_ca_file, e.tls_cert_file, e.tls_key_file, e.tls_server_name, e.host_header,
    ))
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn config(yaml: &str) -> Config {
        Config::parse(yaml, false).unwrap()
    }

    fn endpoints(spec: &str) -> String {
        // "ns=url,url;ns2=url"
        let mut y = "service_discovery:\n  static:\n    endpoints:\n".to_string();
        for ns in spec.split(';') {
            let (name, urls) = ns.split_once('=').unwrap();
            y += &format!("      {name}:\n");
            for u in urls.split(',') {
                y += &format!("        - url: {u}\n");
            }
        }
        y
    }

    #[test]
    fn a_reload_keeps_what_did_not_change_and_numbers_the_rest_anew() {
        let a = "http://127.0.0.1:9001/mcp";
        let b = "http://127.0.0.1:9002/mcp";
        let c = "http://127.0.0.1:9003/mcp";
        let r = Registry::new(&config(&endpoints(&format!("default={a},{b}")))).unwrap();
        let first = r.current();
        let (ua, ub) = (first.all[0], first.all[1]);
        assert_eq!((ua.index, ub.index, first.generation), (0, 1, 0));

        // The same configuration again: nothing changes, not even the view.
        let same = config(&endpoints(&format!("default={a},{b}")));
        assert_eq!(r.reload(&same, |_| panic!("no room needed")), Ok(None));
        assert!(std::ptr::eq(r.current(), first));

        // b out, c in, a new namespace of a: a stays the same object.
        let mut room = 0;
        let change = r
            .reload(
                &config(&endpoints(&format!("default={a},{c};tools={a}"))),
                |n| room = n,
            )
            .unwrap();
        assert_eq!(
            change,
            Some(Change {
                added: vec![format!("default {c}"), format!("tools {a}")],
                removed: vec![format!("default {b}")],
            })
        );
        let second = r.current();
        assert_eq!(second.generation, 1);
        assert!(std::ptr::eq(second.all[0], ua), "a kept");
        assert_eq!(second.all[1].index, 2);
        assert_eq!(
            second.all[2].index, 3,
            "another namespace: another upstream"
        );
        assert_eq!(room, 4);
        assert_eq!(second.namespace("tools"), Some(1));
        assert!(
            ub.is_retired() && !ua.is_retired(),
            "b's connections are not pooled any more"
        );

        // b again: its old object, reset.
        ub.breaker.record(super::super::breaker::Admit::Yes, false);
        ub.set_health(Err("down".into()));
        r.reload(&config(&endpoints(&format!("default={a},{b}"))), |_| {})
            .unwrap();
        let third = r.current();
        assert!(std::ptr::eq(third.all[1], ub));
        assert!(ub.is_healthy() && !ub.is_retired());
    }

    #[test]
    fn a_changed_host_header_makes_the_upstream_anew_and_requests_name_it() {
        let yaml = |host: &str| {
            config(&endpoints("default=http://127.0.0.1:9001/mcp").replacen(
                "/mcp\n",
                &format!("/mcp\n{host}"),
                1,
            ))
        };
        let authority = |r: &Registry| r.current().all[0].http().unwrap().authority.clone();
        let r = Registry::new(&yaml("")).unwrap();
        assert_eq!(authority(&r), "127.0.0.1:9001");
        let first = r.current().all[0];
        r.reload(&yaml("          host_header: mcp.internal\n"), |_| {})
            .unwrap();
        assert_eq!(authority(&r), "mcp.internal");
        assert!(!std::ptr::eq(r.current().all[0], first), "made anew");
    }

    #[test]
    fn weights_breaker_settings_and_max_in_flight_change_in_place() {
        let yaml = |weight: u32, failures: u32, cap: usize| {
            config(&format!(
                "routing:\n  max_in_flight: {cap}\n  circuit_breaker:\n    failure_threshold: {failures}\n{}",
                endpoints("default=http://127.0.0.1:9001/mcp,http://127.0.0.1:9002/mcp")
                    .replacen("/mcp\n", &format!("/mcp\n          weight: {weight}\n"), 1)
            ))
        };
        let r = Registry::new(&yaml(1, 3, 2)).unwrap();
        let first = r.current();
        let (a, b) = (first.all[0], first.all[1]);
        // a holds a place of two and its breaker is open; b has one failure of three.
        let held = a.try_begin(true).unwrap();
        for _ in 0..3 {
            a.breaker.record(super::super::breaker::Admit::Yes, false);
        }
        b.breaker.record(super::super::breaker::Admit::Yes, false);
        assert!(a.breaker.is_open() && !b.breaker.is_open());

        let change = r.reload(&yaml(5, 2, 1), |_| {}).unwrap();
        assert_eq!(
            change,
            Some(Change::default()),
            "a new view, no upstream in or out"
        );
        let second = r.current();
        assert!(std::ptr::eq(second.all[0], a) && std::ptr::eq(second.all[1], b));
        assert_eq!(second.namespaces[0].weights, [5, 1]);
        assert_eq!(
            first.namespaces[0].weights,
            [1, 1],
            "the old view keeps its own"
        );
        assert!(!a.is_retired() && !b.is_retired());
        // State carried on: a's breaker still open, b's failure counted against the new
        // threshold of two, a's place counted against the new limit of one.
        assert!(a.breaker.is_open());
        b.breaker.record(super::super::breaker::Admit::Yes, false);
        assert!(b.breaker.is_open(), "2 failures of 2");
        assert_eq!(
            a.try_begin(true),
            None,
            "the held place fills the new limit"
        );
        a.end(held);
        let next = a.try_begin(true).expect("a place again");
        assert_eq!(a.try_begin(true), None);
        a.end(next);
        // The limit off: nothing is counted, and a place taken before is still given back.
        let before = a.try_begin(true).unwrap();
        r.reload(&yaml(5, 2, 0), |_| {}).unwrap();
        let free = a.try_begin(true).unwrap();
        let also = a.try_begin(true).unwrap();
        a.end(before);
        a.end(free);
        a.end(also);
        r.reload(&yaml(5, 2, 1), |_| {}).unwrap();
        let one = a.try_begin(true).expect("the count is back to zero");
        assert_eq!(a.try_begin(true), None);
        a.end(one);
        assert!(
            a.try_begin(false).is_some(),
            "an uncapped request is always admitted"
        );
        // A weight alone is a change too: a new view with it, the same upstreams.
        let change = r.reload(&yaml(7, 2, 1), |_| {}).unwrap();
        assert_eq!(change, Some(Change::default()));
        assert_eq!(r.current().namespaces[0].weights, [7, 1]);
        assert!(std::ptr::eq(r.current().all[0], a));
    }

    #[test]
    fn a_view_that_cannot_be_built_changes_nothing() {
        let r = Registry::new(&config(&endpoints("default=http://127.0.0.1:9001/mcp"))).unwrap();
        let before = r.current();
        // Valid when read, gone when the view is built.
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        std::fs::write(&ca, cert.cert.pem()).unwrap();
        let bad = config(&format!(
            "{}          tls_ca_file: {}\n",
            endpoints("default=https://127.0.0.1:9001/mcp"),
            ca.display()
        ));
        std::fs::remove_file(&ca).unwrap();
        let err = r
            .reload(&bad, |_| panic!("nothing to make room for"))
            .unwrap_err();
        assert!(err.contains("tls_ca_file"), "{err}");
        assert!(std::ptr::eq(r.current(), before));
    }
}
