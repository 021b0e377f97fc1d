//! The per-IP overrides (`server.per_ip_overrides`): networks whose addresses get a per-IP
//! connection limit and a request rate of their own, replaced whole by a configuration reload.
//!
//! Owns the list in force and a *class* per network any list has named since startup. A new
//! connection is admitted under the first entry whose network holds its address, and its permit
//! keeps that entry's class (a 16-bit number): each of its requests reads the class's rate, so a
//! reload that changes a network's rate applies to the requests of its open connections too, as
//! a reloaded default rate does. A changed per-IP connection limit applies to connections
//! admitted after the reload.
//!
//! Invariants:
//! - A class belongs to one network for the life of the process and is never freed (a permit
//!   holds it for as long as its connection lives): at most [`MAX_NETWORKS`] networks since
//!   startup, a reload naming more is refused.
//! - After a reload, the class of every network ever named takes the rate of the first entry in
//!   force that covers that whole network (for a listed network, its own entry, unless an earlier
//!   wider one shadows it, as it does for admissions), else the default rate. So connections of
//!   a network taken off the list follow what its addresses would be admitted under now.
//! - A class's rate is written before any list naming it is published, and a list is
//!   [`Published`] whole: an admission sees one list or the next, never half of one.
//! - A reload that changes the list keeps the old one in memory (48 bytes an entry); one that
//!   changes nothing keeps the list in force and makes nothing.

use std::sync::Mutex;

#[cfg(loom)]
use loom::sync::atomic::{AtomicBool, Ordering};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicBool, Ordering};

use super::ip_table;
use super::rate::{LiveRate, Rate};
use super::PerIpLimits;
use crate::indexed::Indexed;
use crate::network::Network;
use crate::published::Published;

/// Networks the overrides may name, all reloads together (a permit's class has 16 bits).
pub const MAX_NETWORKS: usize = 4096;

/// The request rate of an entry: `None` the default rate, `Some(None)` no rate.
pub type RatePolicy = Option<Option<Rate>>;

/// One entry of a list in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    network: Network,
    /// Connections per address.
    max_connections: u64,
    rate: RatePolicy,
    /// Its network's class, below [`MAX_NETWORKS`].
    class: u16,
}

/// A class's rate. The rate's fields are Relaxed, as for the default [`LiveRate`]: a request
/// that reads them while a reload changes them is judged by a mix of the two rates, once.
#[derive(Default)]
struct ClassRate {
    /// False: the default rate applies. Release when set, Acquire when read: a request that sees
    /// the class's own rate switched on sees that rate written, not the fields of a class that
    /// never had one (which would read as no rate at all).
    own: AtomicBool,
    rate: LiveRate,
}

/// See the module documentation.
pub struct Overrides {
    /// The list in force: an admission that sees a list sees the room and rates made for its
    /// classes.
    current: Published<Vec<Entry>>,
    /// The rate of each class, by class.
    classes: Indexed<ClassRate>,
    /// The network of each class, by class; written by reloads only, one at a time.
    named: Mutex<Vec<Network>>,
}

impl Default for Overrides {
    fn default() -> Self {
        Overrides {
            current: Published::default(),
            classes: Indexed::new(MAX_NETWORKS, 0),
            named: Mutex::default(),
        }
    }
}

impl Overrides {
    fn in_force(&self) -> &'static [Entry] {
        self.current.get()
    }

    /// The per-IP limit and class of address `a` (in [`crate::network::mapped`] form): the first
    /// entry in force that holds it, if any.
    pub fn find(&self, a: u128) -> Option<(u64, u16)> {
        self.in_force()
            .iter()
            .find(|e| e.network.holds(a))
            .map(|e| (e.max_connections, e.class))
    }

    /// The request rate of `class` now: `None` the default rate, `Some(None)` no rate.
    pub fn rate(&self, class: u16) -> RatePolicy {
        let c = self.classes.get(usize::from(class));
        c.own.load(Ordering::Acquire).then(|| c.rate.get())
    }

    /// Entries in force.
    pub fn len(&self) -> usize {
        self.in_force().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether an entry of `list` has a request rate of its own.
    pub fn own_rate(list: &[PerIpLimits]) -> bool {
        list.iter()
            .any(|o| matches!(o.max_requests, Some(r) if r > 0))
    }

    /// Puts `list` in force (first match wins). `Ok(false)`: it is the list in force, nothing
    /// changed. `Err`: nothing changed, and why.
    pub fn replace(&self, list: &[PerIpLimits]) -> Result<bool, &'static str> {
        let mut named = self
            .named
            .lock()
            .expect("only reloads take it; none panics");
        let mut added = Vec::new();
        let mut entries = Vec::with_capacity(list.len());
        for o in list {
            let network = Network::new(o.network, o.prefix_len);
            let class = match named.iter().chain(&added).position(|n| *n == network) {
                Some(c) => c,
                None => {
                    added.push(network);
                    named.len() + added.len() - 1
                }
            };
            if class >= MAX_NETWORKS {
                return Err("more networks than 4096 named since the gateway started");
            }
            entries.push(Entry {
                network,
                max_connections: match o.max_connections {
                    0 => ip_table::MAX_COUNT,
                    n => n.min(ip_table::MAX_COUNT),
                },
                rate: o.max_requests.map(|r| (r > 0).then(|| Rate::new(r, 0))),
                class: class as u16,
            });
        }
        if entries == self.in_force() {
            return Ok(false);
        }
        named.extend(added);
        self.classes.make_room(named.len());
        for (class, network) in named.iter().enumerate() {
            let policy = entries
                .iter()
                .find(|e| e.network.covers(network))
                .and_then(|e| e.rate);
            let c = self.classes.get(class);
            match policy {
                Some(rate) => {
                    c.rate.set(rate);
                    c.own.store(true, Ordering::Release);
                }
                // Relaxed: the default rate needs nothing of the class's own fields.
                None => c.own.store(false, Ordering::Relaxed),
            }
        }
        self.current.replace(entries);
        Ok(true)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::limiter::tests::limits;
    use crate::network::mapped;

    fn at(o: &Overrides, ip: &str) -> Option<(u64, u16)> {
        o.find(mapped(ip.parse().unwrap()))
    }

    #[test]
    fn a_network_keeps_its_class_across_lists_and_its_rate_follows_the_list() {
        let o = Overrides::default();
        assert!(o.is_empty() && at(&o, "10.1.2.3").is_none());
        assert!(o
            .replace(&[
                limits("10.1.0.0", 16, 5, Some(10)),
                limits("10.0.0.0", 8, 7, Some(0))
            ])
            .unwrap());
        assert_eq!(at(&o, "10.1.2.3"), Some((5, 0)));
        assert_eq!(at(&o, "10.9.2.3"), Some((7, 1)));
        assert_eq!(o.rate(0).unwrap().unwrap().per_second, 10);
        assert_eq!(o.rate(1), Some(None), "0: no rate");
        // The same list: nothing made.
        let before = o.in_force().as_ptr();
        assert!(!o
            .replace(&[
                limits("10.1.0.0", 16, 5, Some(10)),
                limits("10.0.0.0", 8, 7, Some(0))
            ])
            .unwrap());
        assert_eq!(o.in_force().as_ptr(), before);

        // Reordered, a new network, a new rate: each network keeps its class.
        o.replace(&[
            limits("192.168.0.0", 16, 2, None),
            limits("10.0.0.0", 8, 9, Some(3)),
        ])
        .unwrap();
        assert_eq!(at(&o, "192.168.1.1"), Some((2, 2)));
        assert_eq!(at(&o, "10.1.2.3"), Some((9, 1)), "10.1/16 is gone");
        assert_eq!(o.rate(2), None, "the default rate");
        assert_eq!(o.rate(1).unwrap().unwrap().per_second, 3);
        // The open connections of 10.1/16 take the rate of 10/8, which covers it now.
        assert_eq!(o.rate(0).unwrap().unwrap().per_second, 3);

        // Empty: every class follows the default rate.
        o.replace(&[]).unwrap();
        assert!(o.is_empty() && at(&o, "10.1.2.3").is_none());
        assert!((0..3).all(|c| o.rate(c).is_none()));
    }

    #[test]
    fn a_shadowed_entry_is_never_a_class_in_use_and_networks_are_bounded() {
        let o = Overrides::default();
        o.replace(&[
            limits("10.0.0.0", 8, 1, Some(4)),
            limits("10.1.0.0", 16, 9, Some(50)),
        ])
        .unwrap();
        assert_eq!(at(&o, "10.1.2.3"), Some((1, 0)), "the first match wins");
        assert_eq!(
            o.rate(1).unwrap().unwrap().per_second,
            4,
            "as its addresses"
        );

        let many = |from: u32| -> Vec<PerIpLimits> {
            (from..from + 1000)
                .map(|i| PerIpLimits {
                    network: std::net::IpAddr::V4(i.to_be_bytes().into()),
                    prefix_len: 32,
                    max_connections: 1,
                    max_requests: None,
                })
                .collect()
        };
        for round in 0..4 {
            o.replace(&many(round * 1000)).unwrap();
        }
        assert_eq!(
            o.replace(&many(4000)),
            Err("more networks than 4096 named since the gateway started")
        );
        assert_eq!(o.len(), 1000, "the list in force stays");
        assert!(o.replace(&many(0)).is_ok(), "networks already named");
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    //! Run with `RUSTFLAGS="--cfg loom" cargo test --release --lib loom`.
    use super::*;
    use loom::sync::Arc;
    use loom::thread;

    fn ten_slash_8(max_connections: u64, rate: Option<u64>) -> PerIpLimits {
        PerIpLimits {
            network: "10.0.0.0".parse().unwrap(),
            prefix_len: 8,
            max_connections,
            max_requests: rate,
        }
    }

    /// A request racing the reload that gives its network a rate sees the default rate or the
    /// new one, whole; an admission that sees the new list sees its rate.
    #[test]
    fn loom_a_reloaded_rate_is_seen_whole() {
        loom::model(|| {
            let o = Arc::new(Overrides::default());
            o.replace(&[ten_slash_8(5, None)]).unwrap();
            let o2 = o.clone();
            let reload = thread::spawn(move || o2.replace(&[ten_slash_8(6, Some(7))]).unwrap());
            let new = Some(Some(Rate::new(7, 0)));
            let now = o.rate(0);
            assert!(now.is_none() || now == new, "{now:?}");
            let a = crate::network::mapped("10.1.2.3".parse().unwrap());
            let (max, class) = o.find(a).unwrap();
            if max == 6 {
                assert_eq!(o.rate(class), new, "admitted under the new list");
            }
            assert!(reload.join().unwrap());
            assert_eq!(o.rate(0), new);
        });
    }
}
