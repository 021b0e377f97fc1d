//! Limiter micro-benchmarks: acquire + release of one connection, for one thread, for two threads
//! on the same IP and on different IPs, against a `Mutex<HashMap>` baseline in the same run.
//!
//! `cargo bench --bench limiter`. Two-thread cases use `iter_custom`: both threads run the same
//! number of acquire+release pairs and the reported time is wall time per pair per thread, so a
//! design that scales shows the same time as with one thread and a contended one shows more.

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

/// Wall time for `iters` pairs on each of `ips.len()` threads.
fn threaded(design: Arc<dyn Design>, ips: &[IpAddr], iters: u64) -> Duration {
    let barrier = Arc::new(Barrier::new(ips.len() + 1));
    let handles: Vec<_> = ips
        .iter()
        .map(|&ip| {
            let (design, barrier) = (design.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                for _ in 0..iters {
                    design.pair(ip);
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
    // Some other live keys, as in a running gateway.
    for n in 100..200 {
        std::mem::forget(held.try_acquire(ip(n)).unwrap());
    }
    let mut map = HashMap::new();
    for n in 100..200 {
        map.insert(ip(n), 1);
    }
    let mutex = MutexLimiter {
        inner: Mutex::new((100, map)),
        max: 50_000,
        per_ip: 1_000,
    };
    vec![
        ("lock-free", Arc::new(Ours(held))),
        ("mutex-hashmap", Arc::new(mutex)),
    ]
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("acquire_release");
    g.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500));
    for (name, design) in designs() {
        let d = design.clone();
        g.bench_function(BenchmarkId::new("1-thread", name), |b| {
            b.iter(|| d.pair(ip(1)))
        });
        let d = design.clone();
        g.bench_function(BenchmarkId::new("2-threads-same-ip", name), |b| {
            b.iter_custom(|iters| threaded(d.clone(), &[ip(1), ip(1)], iters))
        });
        let d = design.clone();
        g.bench_function(BenchmarkId::new("2-threads-different-ips", name), |b| {
            b.iter_custom(|iters| threaded(d.clone(), &[ip(1), ip(2)], iters))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
