//! Limiter micro-benchmarks: acquire + release of one connection, for one thread, for two threads
//! on the same IP and on different IPs, against a `Mutex<HashMap>` baseline in the same run.
//! "present" addresses already hold a connection (the slot exists); "new" ones do not: each
//! connection of a "new" case comes from another address, 4 096 in turn, so every acquire claims
//! a slot and every release frees one (an address with one connection at a time never goes
//! through a thread's reserve of per-address places).
//!
//! A third design, `global-count-only`, is the limiter with the per-IP limit off: only the global
//! count (the contract's one cache-padded `AtomicUsize`, with a reserve of free places per
//! thread in front of it), the floor under any per-IP table.
//!
//! A second group, `admit_request`, times the per-IP request rate check of one request.
//!
//! `cargo bench --bench limiter`. Multi-thread cases use `iter_custom`: every thread runs the same
//! number of acquire+release pairs and the reported time is wall time per pair per thread, so a
//! design that scales shows the same time as with one thread and a contended one shows more. The
//! eight-thread case (eight different present addresses) runs only where eight cores are.

use std::cell::Cell;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use mcp_gateway::limiter::Limiter;

/// The obvious design: one lock around the global count and a map of per-IP counts.
struct MutexLimiter {
    inner: Mutex<(usize, HashMap<IpAddr, u32>)>,
    max: usize,
    per_ip: u32,
}

impl MutexLimiter {
    fn acquire(&self, ip: IpAddr) -> bool {
        let mut g = self.inner.lock().unwrap();
        if g.0 >= self.max {
            return false;
        }
        let c = g.1.entry(ip).or_insert(0);
        if *c >= self.per_ip {
            return false;
        }
        *c += 1;
        g.0 += 1;
        true
    }
    fn release(&self, ip: IpAddr) {
        let mut g = self.inner.lock().unwrap();
        g.0 -= 1;
        let c = g.1.get_mut(&ip).unwrap();
        *c -= 1;
        if *c == 0 {
            g.1.remove(&ip);
        }
    }
}

fn ip(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, n))
}

/// Where one thread's connections come from.
#[derive(Clone, Copy)]
enum Source {
    /// Always this address.
    One(IpAddr),
    /// A new address each time: `10.net.x.y`, 4 096 in turn (none of them present).
    Many(u8),
}

/// One thread's client: its addresses, in turn.
struct Client {
    source: Source,
    next: Cell<u16>,
}

impl Client {
    fn new(source: Source) -> Client {
        Client {
            source,
            next: Cell::new(0),
        }
    }

    fn address(&self) -> IpAddr {
        match self.source {
            Source::One(a) => a,
            Source::Many(net) => {
                let n = self.next.get();
                self.next.set((n + 1) % 4096);
                IpAddr::V4(Ipv4Addr::new(10, net, (n >> 8) as u8, n as u8))
            }
        }
    }
}

trait Design: Sync + Send + 'static {
    fn pair(&self, ip: IpAddr);
}

struct Ours(&'static Limiter);
impl Design for Ours {
    fn pair(&self, ip: IpAddr) {
        let p = self.0.try_acquire(ip).expect("admitted");
        drop(std::hint::black_box(p));
    }
}

impl Design for MutexLimiter {
    fn pair(&self, ip: IpAddr) {
        assert!(self.acquire(ip));
        self.release(std::hint::black_box(ip));
    }
}

/// Wall time for `iters` calls of `op` on each of `each.len()` threads, thread `i` on `each[i]`,
/// all started together.
fn threaded<T: Send + 'static>(each: Vec<T>, iters: u64, op: fn(&T)) -> Duration {
    let barrier = Arc::new(Barrier::new(each.len() + 1));
    let handles: Vec<_> = each
        .into_iter()
        .map(|t| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                for _ in 0..iters {
                    op(&t);
                }
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    for h in handles {
        h.join().unwrap();
    }
    start.elapsed()
}

fn designs() -> Vec<(&'static str, Arc<dyn Design>)> {
    let held = Limiter::new(50_000, 1_000).leak();
    // The same with `server.max_new_connections_per_ip` on: one more compare-and-swap per
    // admission (the burst so large that every connection is admitted).
    let rated = Limiter::new(50_000, 1_000)
        .with_connection_rate(1_000_000, u64::MAX / 4)
        .leak();
    // Some other live keys, as in a running gateway.
    // Addresses 1..=3 keep one connection open ("present"); 11 and 12 have none ("new").
    let present = (100..200).chain(1..=3);
    for n in present.clone() {
        std::mem::forget(held.try_acquire(ip(n)).unwrap());
        std::mem::forget(rated.try_acquire(ip(n)).unwrap());
    }
    let map: HashMap<IpAddr, u32> = present.map(|n| (ip(n), 1)).collect();
    let mutex = MutexLimiter {
        inner: Mutex::new((map.len(), map)),
        max: 50_000,
        per_ip: 1_000,
    };
    vec![
        ("lock-free", Arc::new(Ours(held))),
        ("lock-free-connection-rate", Arc::new(Ours(rated))),
        ("mutex-hashmap", Arc::new(mutex)),
        // The floor of the contract's shape: the global count alone (per-IP limit off), which
        // every admission and release goes through whatever the per-IP table does.
        (
            "global-count-only",
            Arc::new(Ours(Limiter::new(50_000, 0).leak())),
        ),
    ]
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("acquire_release");
    g.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500));
    for (name, design) in designs() {
        let eight: Vec<Source> = (1..=3)
            .chain(100..105)
            .map(|n| Source::One(ip(n)))
            .collect();
        let (one, two) = (Source::One(ip(1)), Source::One(ip(2)));
        let cases: [(&str, &[Source]); 6] = [
            ("1-thread-new-ip", &[Source::Many(11)]),
            ("1-thread-present-ip", &[one]),
            ("2-threads-same-ip", &[one, one]),
            ("2-threads-different-present-ips", &[one, two]),
            (
                "2-threads-different-new-ips",
                &[Source::Many(11), Source::Many(12)],
            ),
            ("8-threads-different-present-ips", &eight),
        ];
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        for (case, sources) in cases
            .into_iter()
            .filter(|(_, sources)| sources.len() <= cores)
        {
            let d = design.clone();
            g.bench_function(BenchmarkId::new(case, name), |b| {
                if sources.len() == 1 {
                    let client = Client::new(sources[0]);
                    b.iter(|| d.pair(client.address()))
                } else {
                    b.iter_custom(|iters| {
                        let each = sources
                            .iter()
                            .map(|&f| (d.clone(), Client::new(f)))
                            .collect();
                        threaded(each, iters, |(d, client)| d.pair(client.address()))
                    })
                }
            });
        }
    }
    g.finish();

    // The request rate check (`server.max_requests_per_ip`) that every request of a connection
    // pays when the rate is set: one compare-and-swap on its address's word. The burst is so
    // large that every request is admitted (the refusing path does no write).
    let mut g = c.benchmark_group("admit_request");
    g.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500));
    let limiter = Limiter::new(50_000, 1_000)
        .with_request_rate(1_000_000, u64::MAX / 4)
        .leak();
    let permits: Vec<_> = [ip(1), ip(1), ip(2)]
        .iter()
        .map(|a| Arc::new(limiter.try_acquire(*a).unwrap()))
        .collect();
    g.bench_function("1-thread", |b| {
        b.iter(|| permits[0].admit_request().unwrap())
    });
    for (case, pair) in [
        ("2-threads-same-ip", [0, 1]),
        ("2-threads-different-ips", [0, 2]),
    ] {
        g.bench_function(case, |b| {
            b.iter_custom(|iters| {
                let each = pair.iter().map(|&i| permits[i].clone()).collect();
                threaded(each, iters, |p| p.admit_request().unwrap())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
