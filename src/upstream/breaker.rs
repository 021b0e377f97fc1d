//! A circuit breaker per upstream, shared by every core.
//!
//! Closed: requests flow; `failure_threshold` consecutive failures open it. Open: requests fail
//! fast (nothing is sent) for `timeout_seconds`. Then half-open: one probe request at a time is let
//! through; `success_threshold` consecutive successful probes close it, a failed probe opens it
//! again for another `timeout_seconds`.
//!
//! Shared rather than per core so that every core sees the upstream fail after the same number of
//! failures. It stays off the hot path's write set: a success while closed only reads (the
//! failure count is written only when it is not already zero), so healthy traffic keeps these cache
//! lines shared between cores.
//!
//! Orderings: the state word is the only thing decided by compare-and-swap; the counts and the
//! opening time are advisory statistics read next to it. Relaxed is enough for all of them:
//! nothing else is published through the breaker, and a race costs at most one extra probe or one
//! extra failure counted before the state word changes, never a stuck state (every transition is a
//! CAS from the state it read, and the half-open probe flag is released on every probe result).
//! The racy paths (two admissions competing for the probe, failures racing to open it, a probe's
//! result racing a new admission) are model-checked with loom (`loom_tests` below).
//!
//! The thresholds and the cool-down are `Settings`, which a configuration reload changes in
//! place ([`Breaker::configure`]): the breaker keeps its state and counts across the change.

#[cfg(loom)]
use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::atomic::{AtomicU32 as SettingU32, AtomicU64 as SettingU64};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

/// The breaker's state, as the `mcp_gateway_upstream_circuit_state` gauge (0, 1, 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

#[derive(Debug)]
pub struct Breaker {
    state: AtomicU8,
    /// Consecutive failures while closed.
    failures: AtomicU32,
    /// Consecutive successful probes while half-open.
    successes: AtomicU32,
    /// A half-open probe is in flight.
    probing: AtomicBool,
    /// When it last opened, ms since [`epoch`].
    opened_ms: AtomicU64,
    settings: Settings,
}

/// `routing.circuit_breaker`: written by a reload only. Relaxed (and not modelled by loom: they
/// take no part in the state machine's races): a request that reads a threshold just before or
/// just after a reload changes it acts on either, both of which the operator asked for.
#[derive(Debug)]
struct Settings {
    failure_threshold: SettingU32,
    success_threshold: SettingU32,
    open_for_ms: SettingU64,
}

/// Whether a request may go to the upstream now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Yes,
    /// Yes, as the half-open probe: report its result with `probe = true`.
    Probe,
    No,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

impl Breaker {
    /// A closed breaker with these settings.
    pub fn new(failure_threshold: u32, success_threshold: u32, open_for: Duration) -> Breaker {
        epoch();
        let b = Breaker {
            state: AtomicU8::new(CLOSED),
            failures: AtomicU32::new(0),
            successes: AtomicU32::new(0),
            probing: AtomicBool::new(false),
            opened_ms: AtomicU64::new(0),
            settings: Settings {
                failure_threshold: SettingU32::new(0),
                success_threshold: SettingU32::new(0),
                open_for_ms: SettingU64::new(0),
            },
        };
        b.configure(failure_threshold, success_threshold, open_for);
        b
    }

    /// New thresholds and cool-down (a reload): the state and counts carry on under them.
    pub fn configure(&self, failure_threshold: u32, success_threshold: u32, open_for: Duration) {
        let s = &self.settings;
        s.failure_threshold.store(failure_threshold, Relaxed);
        s.success_threshold.store(success_threshold, Relaxed);
        s.open_for_ms.store(open_for.as_millis() as u64, Relaxed);
    }

    /// Closed, as new: an upstream configured again after a reload had removed it. A request
    /// still in flight from before may record its result after this; it counts as any other.
    pub fn reset(&self) {
        self.failures.store(0, Relaxed);
        self.successes.store(0, Relaxed);
        self.probing.store(false, Relaxed);
        self.state.store(CLOSED, Relaxed);
    }

    pub fn state(&self) -> State {
        match self.state.load(Relaxed) {
            CLOSED => State::Closed,
            OPEN if self.cooled() => State::HalfOpen,
            OPEN => State::Open,
            _ => State::HalfOpen,
        }
    }

    /// Open and still cooling down: callers should not even try it.
    pub fn is_open(&self) -> bool {
        self.state() == State::Open
    }

    fn cooled(&self) -> bool {
        now_ms().saturating_sub(self.opened_ms.load(Relaxed))
            >= self.settings.open_for_ms.load(Relaxed)
    }

    /// Asks to send one request.
    pub fn admit(&self) -> Admit {
        match self.state.load(Relaxed) {
            CLOSED => Admit::Yes,
            OPEN if !self.cooled() => Admit::No,
            OPEN => {
                // Cooled down: move to half-open (one winner) and try to be the probe.
                let _ = self
                    .state
                    .compare_exchange(OPEN, HALF_OPEN, Relaxed, Relaxed);
                self.try_probe()
            }
            _ => self.try_probe(),
        }
    }

    fn try_probe(&self) -> Admit {
        if self
            .probing
            .compare_exchange(false, true, Relaxed, Relaxed)
            .is_ok()
        {
            Admit::Probe
        } else {
            Admit::No
        }
    }

    /// Reports the result of a request admitted with `admitted`.
    pub fn record(&self, admitted: Admit, ok: bool) {
        if admitted == Admit::Probe {
            if ok {
                if self.successes.fetch_add(1, Relaxed) + 1
                    >= self.settings.success_threshold.load(Relaxed)
                {
                    self.successes.store(0, Relaxed);
                    self.failures.store(0, Relaxed);
                    if self
                        .state
                        .compare_exchange(HALF_OPEN, CLOSED, Relaxed, Relaxed)
                        .is_ok()
                    {
                        tracing::info!("circuit closed: upstream recovered");
                    }
                }
            } else {
                self.successes.store(0, Relaxed);
                self.open_from(HALF_OPEN);
            }
            self.probing.store(false, Relaxed);
            return;
        }
        if ok {
            if self.failures.load(Relaxed) != 0 {
                self.failures.store(0, Relaxed);
            }
        } else if self.failures.fetch_add(1, Relaxed) + 1
            >= self.settings.failure_threshold.load(Relaxed)
        {
            self.open_from(CLOSED);
        }
    }

    /// Frees the half-open probe without a verdict (its request ended with no answer to judge,
    /// e.g. the client left): the next admission probes again.
    pub fn release_probe(&self) {
        self.probing.store(false, Relaxed);
    }

    fn open_from(&self, from: u8) {
        self.opened_ms.store(now_ms(), Relaxed);
        if self
            .state
            .compare_exchange(from, OPEN, Relaxed, Relaxed)
            .is_ok()
            && from == CLOSED
        {
            tracing::warn!(
                failures = self.settings.failure_threshold.load(Relaxed),
                "circuit opened: upstream failing; failing fast"
            );
        }
        self.failures.store(0, Relaxed);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_and_recovers_through_probes() {
        let b = Breaker::new(3, 2, Duration::from_millis(30));
        for _ in 0..2 {
            assert_eq!(b.admit(), Admit::Yes);
            b.record(Admit::Yes, false);
        }
        b.record(Admit::Yes, true); // a success resets the consecutive count
        for _ in 0..3 {
            b.record(Admit::Yes, false);
        }
        assert_eq!(b.state(), State::Open);
        assert_eq!(b.admit(), Admit::No, "fails fast while open");
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(b.state(), State::HalfOpen);
        assert_eq!(b.admit(), Admit::Probe);
        assert_eq!(b.admit(), Admit::No, "one probe at a time");
        b.record(Admit::Probe, true);
        assert_eq!(b.state(), State::HalfOpen, "needs success_threshold probes");
        assert_eq!(b.admit(), Admit::Probe);
        b.record(Admit::Probe, true);
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.admit(), Admit::Yes);
    }

    #[test]
    fn a_probe_released_without_a_verdict_counts_for_nothing() {
        let b = Breaker::new(1, 1, Duration::from_millis(20));
        b.record(Admit::Yes, false);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(b.admit(), Admit::Probe);
        b.release_probe();
        assert_eq!(
            b.state(),
            State::HalfOpen,
            "not closed by a request nobody judged"
        );
        assert_eq!(b.admit(), Admit::Probe, "the next admission probes");
    }

    #[test]
    fn a_failed_probe_opens_again() {
        let b = Breaker::new(1, 1, Duration::from_millis(20));
        b.record(Admit::Yes, false);
        assert_eq!(b.state(), State::Open);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(b.admit(), Admit::Probe);
        b.record(Admit::Probe, false);
        assert_eq!(b.state(), State::Open);
        assert_eq!(b.admit(), Admit::No);
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    //! Run with `RUSTFLAGS="--cfg loom" cargo test --release --lib loom`.
    use super::*;
    use loom::sync::Arc;
    use loom::thread;

    /// Open, and already past its cool-down (`open_for` 0): the next admissions compete.
    fn open_and_cooled(success_threshold: u32) -> Breaker {
        let b = Breaker::new(1, success_threshold, Duration::ZERO);
        b.record(Admit::Yes, false);
        b
    }

    #[test]
    fn loom_two_admissions_get_one_probe() {
        loom::model(|| {
            let b = Arc::new(open_and_cooled(1));
            let b2 = b.clone();
            let h = thread::spawn(move || b2.admit());
            let mine = b.admit();
            let theirs = h.join().unwrap();
            let probes = [mine, theirs]
                .iter()
                .filter(|a| **a == Admit::Probe)
                .count();
            assert_eq!(probes, 1, "{mine:?} {theirs:?}");
            assert!([mine, theirs].contains(&Admit::No));
            b.record(Admit::Probe, true);
            assert_eq!(b.state(), State::Closed);
        });
    }

    #[test]
    fn loom_racing_failures_open_it() {
        loom::model(|| {
            let b = Arc::new(Breaker::new(2, 1, Duration::from_secs(60)));
            let b2 = b.clone();
            let h = thread::spawn(move || b2.record(Admit::Yes, false));
            b.record(Admit::Yes, false);
            h.join().unwrap();
            assert_eq!(b.state(), State::Open);
            assert_eq!(b.admit(), Admit::No);
        });
    }

    #[test]
    fn loom_probe_result_racing_an_admission_leaves_no_stuck_state() {
        loom::model(|| {
            let b = Arc::new(open_and_cooled(1));
            assert_eq!(b.admit(), Admit::Probe);
            let b2 = b.clone();
            let h = thread::spawn(move || b2.admit());
            b.record(Admit::Probe, true);
            let theirs = h.join().unwrap();
            if theirs != Admit::No {
                b.record(theirs, true); // admitted (even as a late probe): its result comes back
            }
            // Closed, and nothing holds the probe: the next admission goes through.
            assert_eq!(b.state(), State::Closed);
            assert_eq!(b.admit(), Admit::Yes);
        });
    }
}
