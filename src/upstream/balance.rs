//! Choosing an upstream, per core: `round_robin`, `least_connections` and `weighted` (smooth
//! weighted round robin, as nginx does it), over the namespace's upstreams that are in service.
//!
//! Owns each core's balancing state ([`Balancer`], kept by the worker): round-robin positions and
//! weighted-round-robin credits. The count of requests in flight per upstream is the core's own
//! metric (`mcp_gateway_upstream_in_flight`), one count for both uses. Nothing here is shared
//! between cores; each core balances its own traffic, which over many connections spreads the
//! same way.
//!
//! Invariant: every [`Lease`] counts one request in flight on its upstream from the pick until it
//! drops, whatever ends the request, so `least_connections` counts go down as well as up, and,
//! when `capped`, holds one of its `routing.max_in_flight` places (taken before the breaker is
//! asked; given back if the breaker refuses).

use std::cell::RefCell;
use std::time::Instant;

use super::breaker::Admit;
use super::{Begun, Failure, Outcome, Upstream, Upstreams};
use crate::config::Strategy;
use crate::metrics::CoreMetrics;

/// One core's balancing state.
pub struct Balancer {
    core: usize,
    /// The generation of the view the positions are for, and the next round-robin start per
    /// namespace of that view (started again when a reload brings a new one).
    next: RefCell<(u64, Vec<usize>)>,
    /// Smooth-weighted credits, per upstream index (growing as reloads bring upstreams).
    credit: RefCell<Vec<i64>>,
    /// This core's metrics, which hold its requests (and streams) in flight per upstream.
    metrics: &'static CoreMetrics,
}

impl Balancer {
    /// Core `core`'s state. Its round-robin positions start at `core`, so the first requests on
    /// different cores go to different upstreams.
    pub fn new(core: usize, metrics: &'static CoreMetrics) -> Balancer {
        Balancer {
            core,
            next: RefCell::new((0, Vec::new())),
            credit: RefCell::new(Vec::new()),
            metrics,
        }
    }

    /// The round-robin start for a pick in namespace `ns` of view `all`, moved on by one.
    fn start(&self, all: &Upstreams, ns: usize) -> usize {
        let mut next = self.next.borrow_mut();
        let (generation, starts) = &mut *next;
        if *generation < all.generation || starts.is_empty() {
            *generation = all.generation;
            *starts = vec![self.core; all.namespaces.len()];
        }
        match starts.get_mut(ns) {
            Some(at) if *generation == all.generation => {
                let start = *at;
                *at = start.wrapping_add(1);
                start
            }
            // A request of an older view, picking just after a reload: any start will do.
            _ => self.core,
        }
    }

    /// Requests in flight on upstream `i` from this core.
    pub fn in_flight(&self, i: usize) -> i64 {
        self.metrics.upstream_in_flight(i)
    }

    /// Picks an in-service upstream of namespace `ns` and admits a request to it. `capped`: the
    /// request takes one of the upstream's `routing.max_in_flight` places (all but a client's
    /// standalone `GET` stream, which every MCP client holds open, idle, all the time).
    pub fn pick<'a>(
        &'a self,
        all: &'static Upstreams,
        ns: usize,
        capped: bool,
    ) -> Result<Lease<'a>, Failure> {
        self.pick_untried(all, ns, capped, &mut 0)
    }

    /// [`Self::pick`] among the members not in `tried` (bit i: the namespace's upstream i, for
    /// a request that could not reach those), adding the one picked to it.
    pub fn pick_untried<'a>(
        &'a self,
        all: &'static Upstreams,
        ns: usize,
        capped: bool,
        tried: &mut u64,
    ) -> Result<Lease<'a>, Failure> {
        let namespace = &all.namespaces[ns];
        let members = &namespace.upstreams;
        let n = members.len();
        let start = self.start(all, ns);
        // Tried in preference order; one at `max_in_flight`, or whose breaker refuses at the last
        // moment, is skipped.
        let mut skip = *tried; // bit i: members[i] refused (namespaces have at most 64 tried)
        let mut busy = None; // the first one found at max_in_flight
        for _ in 0..n {
            let candidate = |i: usize| (skip >> (i % 64)) & 1 == 0 && members[i].in_service();
            let chosen = match all.strategy {
                Strategy::RoundRobin => (0..n).map(|k| (start + k) % n).find(|i| candidate(*i)),
                Strategy::LeastConnections => (0..n)
                    .map(|k| (start + k) % n)
                    .filter(|i| candidate(*i))
                    .min_by_key(|i| self.in_flight(members[*i].index)),
                Strategy::Weighted => self.smooth_weighted(members, &namespace.weights, candidate),
            };
            let Some(i) = chosen else { break };
            let u = members[i];
            let Some(begun) = u.try_begin(capped) else {
                skip |= 1 << (i % 64);
                busy.get_or_insert(u.index);
                continue;
            };
            match u.breaker.admit() {
                Admit::No => {
                    u.end(begun);
                    skip |= 1 << (i % 64);
                }
                admit => {
                    *tried |= 1 << (i % 64);
                    return Ok(self.lease(u, admit, begun));
                }
            }
        }
        match busy {
            Some(i) => {
                self.metrics.upstream(i, Outcome::Busy, None);
                Err(Failure::Busy)
            }
            None => Err(Failure::NoUpstream),
        }
    }

    /// After `lease`'s request failed with `f` at `started`: when nothing was sent
    /// ([`Failure::nothing_sent`]) and another upstream of namespace `ns` not in `tried` takes it,
    /// records the failure on `lease` and moves it there (`true`). Else leaves both as they are
    /// (`false`): the failure stands. For a request no session pins (a pinned one has nowhere
    /// else to go); `capped` as for [`Self::pick`].
    pub fn another<'a>(
        &'a self,
        lease: &mut Lease<'a>,
        (f, started): (Failure, Instant),
        (all, ns): (&'static Upstreams, usize),
        capped: bool,
        tried: &mut u64,
    ) -> bool {
        if !f.nothing_sent() {
            return false;
        }
        let Ok(next) = self.pick_untried(all, ns, capped, tried) else {
            return false;
        };
        lease.record(self.metrics, Err(f), started);
        *lease = next;
        true
    }

    /// Admits a request to `u` itself (a session pinned to it); `capped` as for [`Self::pick`].
    pub fn pinned<'a>(&'a self, u: &'static Upstream, capped: bool) -> Result<Lease<'a>, Failure> {
        if !u.is_healthy() {
            return Err(Failure::NoUpstream);
        }
        let Some(begun) = u.try_begin(capped) else {
            self.metrics.upstream(u.index, Outcome::Busy, None);
            return Err(Failure::Busy);
        };
        match u.breaker.admit() {
            Admit::No => {
                u.end(begun);
                Err(Failure::CircuitOpen)
            }
            admit => Ok(self.lease(u, admit, begun)),
        }
    }

    /// A lease for a request `u` admitted (its `max_in_flight` place, if any, in `begun`).
    fn lease<'a>(&'a self, u: &'static Upstream, admit: Admit, begun: Begun) -> Lease<'a> {
        self.metrics.upstream_started(u.index);
        Lease {
            balancer: self,
            upstream: u,
            admit,
            begun,
        }
    }

    fn smooth_weighted(
        &self,
        members: &[&'static Upstream],
        weights: &[u32],
        candidate: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let mut credit = self.credit.borrow_mut();
        if let Some(top) = members.iter().map(|m| m.index).max() {
            if credit.len() <= top {
                credit.resize(top + 1, 0);
            }
        }
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for (i, m) in members.iter().enumerate() {
            if !candidate(i) {
                continue;
            }
            let w = i64::from(weights[i]);
            total += w;
            credit[m.index] += w;
            if best.is_none_or(|b| credit[m.index] > credit[members[b].index]) {
                best = Some(i);
            }
        }
        let b = best?;
        credit[members[b].index] -= total;
        Some(b)
    }
}

/// A request admitted to an upstream: counted in flight until dropped; its result goes to the
/// upstream's breaker through [`Lease::done`].
pub struct Lease<'a> {
    balancer: &'a Balancer,
    pub upstream: &'static Upstream,
    admit: Admit,
    /// Its `routing.max_in_flight` place, if it holds one.
    begun: Begun,
}

impl Lease<'_> {
    /// Reports the result to the breaker (`ok`: the upstream answered, below 500).
    pub fn done(&mut self, ok: bool) {
        self.upstream.breaker.record(self.admit, ok);
        self.admit = Admit::Yes;
    }

    /// Reports a request sent at `started`: its response status (a 5xx counts as a failure) or
    /// why it got none, to the breaker and to this core's upstream metrics.
    pub fn record(
        &mut self,
        metrics: &CoreMetrics,
        result: Result<u16, Failure>,
        started: Instant,
    ) {
        let i = self.upstream.index;
        match result {
            Ok(status) => {
                self.done(status < 500);
                let outcome = if status < 500 {
                    Outcome::Ok
                } else {
                    Outcome::Http5xx
                };
                metrics.upstream(i, outcome, Some(started.elapsed()));
            }
            Err(f) => {
                self.done(false);
                metrics.upstream(i, Outcome::of(f), None);
                tracing::debug!(upstream = %self.upstream.url, failure = f.message(), "upstream request failed");
            }
        }
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if self.admit == Admit::Probe {
            // Dropped before a result (the client left): free the probe without judging.
            self.upstream.breaker.release_probe();
        }
        self.balancer.metrics.upstream_ended(self.upstream.index);
        self.upstream.end(self.begun);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::limiter::Limiter;
    use crate::metrics::Metrics;
    use crate::upstream::registry::Registry;

    /// A balancer of core 0 over `r`'s upstreams, and their view.
    fn balancer(r: &'static Registry) -> (Balancer, &'static Upstreams) {
        let limiter = Limiter::new(10, 0).leak();
        let b = Balancer::new(0, Metrics::new(1, limiter, r).leak().core(0));
        (b, r.current())
    }

    fn upstreams(strategy: &str, weights: &[u32]) -> &'static Registry {
        limited(strategy, weights, 0)
    }

    fn limited(strategy: &str, weights: &[u32], max_in_flight: usize) -> &'static Registry {
        let mut yaml = format!(
            "routing:\n  strategy: {strategy}\n  max_in_flight: {max_in_flight}\n  circuit_breaker:\n    failure_threshold: 1\n    timeout_seconds: 60\nservice_discovery:\n  static:\n    endpoints:\n      default:\n"
        );
        for (i, w) in weights.iter().enumerate() {
            yaml += &format!(
                "        - url: http://127.0.0.1:{}/mcp\n          weight: {w}\n",
                9001 + i
            );
        }
        Registry::new(&Config::parse(&yaml, false).unwrap())
            .unwrap()
            .leak()
    }

    fn picks(b: &Balancer, u: &'static Upstreams, n: usize) -> Vec<usize> {
        (0..n)
            .map(|_| b.pick(u, 0, true).unwrap().upstream.index)
            .collect()
    }

    #[test]
    fn a_request_is_offered_each_upstream_once() {
        for strategy in ["round_robin", "least_connections", "weighted"] {
            let (b, u) = balancer(upstreams(strategy, &[3, 1, 1]));
            let mut tried = 0;
            let mut seen: Vec<usize> = (0..3)
                .map(|_| {
                    let lease = b.pick_untried(u, 0, true, &mut tried).unwrap();
                    lease.upstream.index
                })
                .collect();
            seen.sort();
            assert_eq!((seen, tried), (vec![0, 1, 2], 0b111), "{strategy}");
            assert_eq!(
                b.pick_untried(u, 0, true, &mut tried).err(),
                Some(Failure::NoUpstream)
            );
        }
    }

    #[test]
    fn max_in_flight_skips_a_full_upstream_and_refuses_when_all_are() {
        let (b, u) = balancer(limited("round_robin", &[1, 1], 1));
        let first = b.pick(u, 0, true).unwrap();
        let second = b.pick(u, 0, true).unwrap();
        assert_ne!(first.upstream.index, second.upstream.index);
        assert_eq!(b.pick(u, 0, true).err(), Some(Failure::Busy));
        assert_eq!(b.pinned(u.all[0], true).err(), Some(Failure::Busy));
        // A standalone stream is not capped, and takes no place.
        drop(b.pick(u, 0, false).expect("uncapped"));
        assert_eq!(b.pick(u, 0, true).err(), Some(Failure::Busy));
        let freed = first.upstream.index;
        drop(first);
        assert_eq!(b.pick(u, 0, true).unwrap().upstream.index, freed);
        // A place taken while the breaker refuses is given back.
        let mut lease = b.pick(u, 0, true).unwrap();
        let failing = lease.upstream.index;
        lease.done(false); // threshold 1: its breaker opens
        drop(lease);
        assert_eq!(
            b.pinned(u.all[failing], true).err(),
            Some(Failure::CircuitOpen)
        );
        drop(second);
        // The other upstream is the only one in service, and its one place is free again.
        let last = b.pick(u, 0, true).expect("no place leaked");
        assert_eq!(b.pick(u, 0, true).err(), Some(Failure::Busy));
        drop(last);
    }

    #[test]
    fn a_reload_renumbering_the_namespaces_is_followed_and_old_picks_still_work() {
        let r = upstreams("round_robin", &[1, 1]);
        let (b, old) = balancer(r);
        assert_eq!(picks(&b, old, 2), [0, 1]);
        // A namespace before `default` moves it to position 1.
        let yaml = "routing:\n  strategy: round_robin\n  circuit_breaker:\n    failure_threshold: 1\n    timeout_seconds: 60\nservice_discovery:\n  static:\n    endpoints:\n      aaa:\n        - url: http://127.0.0.1:9009/mcp\n      default:\n        - url: http://127.0.0.1:9001/mcp\n          weight: 1\n        - url: http://127.0.0.1:9002/mcp\n          weight: 1\n";
        r.reload(&Config::parse(yaml, false).unwrap(), |_| {})
            .unwrap();
        let new = r.current();
        assert_eq!(new.namespace("default"), Some(1));
        let new_default: Vec<usize> = (0..4)
            .map(|_| b.pick(new, 1, true).unwrap().upstream.index)
            .collect();
        assert_eq!(new_default, [0, 1, 0, 1], "the same upstreams, kept");
        assert_eq!(
            b.pick(new, 0, true).unwrap().upstream.url,
            "http://127.0.0.1:9009/mcp"
        );
        // A request that took the old view before the reload still gets an upstream.
        assert!(b.pick(old, 0, true).is_ok());
    }

    #[test]
    fn round_robin_rotates_and_skips_what_is_out() {
        let (b, u) = balancer(upstreams("round_robin", &[1, 1, 1]));
        assert_eq!(picks(&b, u, 6), [0, 1, 2, 0, 1, 2]);
        u.all[1].set_health(Err("test".into()));
        assert!(!picks(&b, u, 6).contains(&1));
        u.all[1].set_health(Ok(()));
        let mut lease = b.pick(u, 0, true).unwrap();
        let failed = lease.upstream.index;
        lease.done(false); // threshold 1: its breaker opens
        drop(lease);
        assert!(!picks(&b, u, 6).contains(&failed));
    }

    #[test]
    fn least_connections_counts_go_down_as_well_as_up() {
        let (b, u) = balancer(upstreams("least_connections", &[1, 1]));
        let first = b.pick(u, 0, true).unwrap();
        let a = first.upstream.index;
        // While `first` is in flight, every new pick goes to the other one.
        for _ in 0..3 {
            assert_ne!(b.pick(u, 0, true).unwrap().upstream.index, a);
        }
        assert_eq!(b.in_flight(a), 1);
        drop(first);
        assert_eq!((b.in_flight(0), b.in_flight(1)), (0, 0));
        let (x, y) = (b.pick(u, 0, true).unwrap(), b.pick(u, 0, true).unwrap());
        assert_ne!(x.upstream.index, y.upstream.index, "ties spread");
    }

    #[test]
    fn weighted_follows_the_weights_smoothly() {
        let (b, u) = balancer(upstreams("weighted", &[5, 1, 1]));
        let got = picks(&b, u, 7);
        assert_eq!(got.iter().filter(|i| **i == 0).count(), 5);
        assert_eq!(got.iter().filter(|i| **i == 1).count(), 1);
        // Smooth: the heavy one never takes more than 3 in a row (nginx: a a b a c a a).
        assert_eq!(got, [0, 0, 1, 0, 2, 0, 0]);
        let (b, none) = balancer(upstreams("weighted", &[1]));
        none.all[0].set_health(Err("test".into()));
        assert_eq!(b.pick(none, 0, true).err(), Some(Failure::NoUpstream));
    }
}
