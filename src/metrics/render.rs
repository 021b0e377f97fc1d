//! The scrape: every core's counters summed, with the limiter's exact gauges, into the
//! Prometheus text exposition (`prometheus`'s text encoder over families built here).
//!
//! Owns the metric names, their help texts and labels (the contract's names and the README's
//! metrics reference). Reads only: Relaxed loads of statistics, as the parent module says.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use prometheus::proto::{
    Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType,
};
use prometheus::{Encoder, TextEncoder};

use super::*;

impl Metrics {
    /// One sample per door of `doors`: a per-door counter of the cores (`of`), summed.
    fn per_door<'a>(
        &self,
        doors: &[Frontend],
        of: impl Fn(&CoreMetrics) -> &[AtomicU64; 3],
    ) -> Vec<Sample<'a>> {
        doors
            .iter()
            .map(|d| {
                let v = self.sum(|c| of(c)[*d as usize].load(Relaxed));
                (vec![("frontend", d.label())], v as f64)
            })
            .collect()
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut fams = Vec::new();
        let doors = Frontend::ALL;
        let active = self.limiter.active() as f64;
        fams.push(gauge(
            "mcp_gateway_connections_total",
            "Active connections over all front doors (original name; same value as mcp_gateway_connections_active).",
            vec![(vec![], active)],
        ));
        fams.push(gauge(
            "mcp_gateway_connections_active",
            "Active connections over all front doors.",
            vec![(vec![], active)],
        ));
        let mut rejected = Vec::new();
        for d in doors {
            for (ri, r) in Rejection::ALL.iter().enumerate() {
                let v = self.sum(|c| c.rejected[d as usize][ri].load(Relaxed));
                rejected.push((
                    vec![("frontend", d.label()), ("reason", r.label())],
                    v as f64,
                ));
            }
        }
        fams.push(counter(
            "mcp_gateway_connections_rejected_total",
            "Connections rejected by a limit, by front door and reason.",
            rejected,
        ));
        let tcp = Frontend::Tcp as usize;
        fams.push(counter(
            "mcp_gateway_tcp_connections_total",
            "TCP (MCPB) front-door connections accepted since start.",
            vec![(vec![], self.sum(|c| c.accepted[tcp].load(Relaxed)) as f64)],
        ));
        fams.push(gauge(
            "mcp_gateway_tcp_connections_active",
            "TCP (MCPB) front-door connections open now.",
            vec![(vec![], self.active(Frontend::Tcp) as f64)],
        ));
        fams.push(gauge(
            "mcp_gateway_frontend_connections_active",
            "Open connections by front door (an upgraded WebSocket counts as websocket).",
            doors
                .iter()
                .map(|d| (vec![("frontend", d.label())], self.active(*d) as f64))
                .collect(),
        ));
        fams.push(counter(
            "mcp_gateway_frontend_connections_accepted_total",
            "Connections admitted by front door since start (upgrades count under websocket too).",
            self.per_door(&doors, |c| &c.accepted),
        ));
        let workers: Vec<String> = (0..self.cores.len()).map(|i| i.to_string()).collect();
        fams.push(counter(
            "mcp_gateway_worker_connections_accepted_total",
            "Connections admitted by each worker (core) since start: how SO_REUSEPORT spreads them.",
            self.cores
                .iter()
                .zip(&workers)
                .map(|(c, w)| {
                    let v: u64 = c.accepted.iter().map(|a| a.load(Relaxed)).sum::<u64>()
                        - c.accepted[Frontend::WebSocket as usize].load(Relaxed);
                    (vec![("worker", w.as_str())], v as f64)
                })
                .collect(),
        ));
        fams.push(gauge(
            "mcp_gateway_connections_parked",
            "Idle connections (HTTP, WebSocket, MCPB, event streams between events) parked outside any task now (they count as active too).",
            vec![(vec![], self.gauge_sum(|c| &c.parked) as f64)],
        ));
        fams.push(counter(
            "mcp_gateway_connection_parks_total",
            "Times an idle connection was parked since start.",
            vec![(vec![], self.sum(|c| c.parks.load(Relaxed)) as f64)],
        ));
        fams.push(gauge(
            "mcp_gateway_connection_limit",
            "Configured connection limits (per_ip 0 = disabled).",
            vec![
                (
                    vec![("scope", "global")],
                    self.limiter.max_connections() as f64,
                ),
                (vec![("scope", "per_ip")], self.limiter.max_per_ip() as f64),
            ],
        ));
        fams.push(gauge(
            "mcp_gateway_per_ip_overrides",
            "Networks with per-IP limits of their own (server.per_ip_overrides) in force.",
            vec![(vec![], self.limiter.per_ip_overrides() as f64)],
        ));
        fams.push(gauge(
            "mcp_gateway_tracked_ips",
            "Client addresses with at least one open connection.",
            vec![(vec![], self.limiter.tracked_ips() as f64)],
        ));
        fams.push(gauge(
            "mcp_gateway_ip_table_slots",
            "Slots in the per-IP table (fixed at startup).",
            vec![(vec![], self.limiter.ip_table_slots() as f64)],
        ));
        fams.push(gauge(
            "mcp_gateway_ip_table_slots_used",
            "Slots of the per-IP table in use: addresses with connections, and for at most one \
             sweeper tick those whose closed connections' places wait in a core's reserve.",
            vec![(vec![], self.limiter.ip_table_slots_used() as f64)],
        ));
        let mut accept_errors = Vec::new();
        let mut protocol_errors = Vec::new();
        for d in doors {
            for (k, label) in AcceptError::LABELS.iter().enumerate() {
                if d != Frontend::WebSocket {
                    let v = self.sum(|c| c.accept_errors[d as usize][k].load(Relaxed));
                    accept_errors.push((vec![("frontend", d.label()), ("kind", *label)], v as f64));
                }
            }
            for (k, label) in ProtocolError::LABELS.iter().enumerate() {
                let v = self.sum(|c| c.protocol_errors[d as usize][k].load(Relaxed));
                protocol_errors.push((vec![("frontend", d.label()), ("kind", *label)], v as f64));
            }
        }
        fams.push(counter(
            "mcp_gateway_accept_errors_total",
            "Failed accept() calls by listener and kind.",
            accept_errors,
        ));
        fams.push(counter(
            "mcp_gateway_protocol_errors_total",
            "Connections ended by a client protocol error, by front door and kind.",
            protocol_errors,
        ));
        fams.push(counter(
            "mcp_gateway_requests_total",
            "Requests (HTTP) and messages (WebSocket, MCPB) answered, by front door.",
            self.per_door(&doors, |c| &c.requests),
        ));
        fams.push(counter(
            "mcp_gateway_requests_rate_limited_total",
            "Requests and messages refused by the per-IP request rate (server.max_requests_per_ip), by front door.",
            self.per_door(&doors, |c| &c.rate_limited),
        ));
        fams.push(counter(
            "mcp_gateway_proxy_headers_total",
            "Connections from server.proxy_protocol_networks whose PROXY protocol header was read, by the listener they came to.",
            self.per_door(&[Frontend::Http, Frontend::Tcp], |c| &c.proxy_headers),
        ));
        fams.push(counter(
            "mcp_gateway_config_reloads_total",
            "Configuration reloads (SIGHUP) by result: applied, partial (some changes wait for a restart), failed (nothing changed).",
            Reload::LABELS
                .iter()
                .enumerate()
                .map(|(i, r)| (vec![("result", *r)], self.reloads[i].load(Relaxed) as f64))
                .collect(),
        ));
        fams.push(counter(
            "mcp_gateway_log_lines_dropped_total",
            "Log lines dropped because stderr did not take them fast enough (the gateway never waits for its log).",
            vec![(vec![], crate::logging::dropped_lines() as f64)],
        ));
        fams.push(gauge(
            "mcp_gateway_config_last_reload_successful",
            "1 when the last reload (SIGHUP) applied the whole file, or none happened yet; 0 when it failed or left changes waiting for a restart.",
            vec![(vec![], self.last_reload_whole.load(Relaxed) as f64)],
        ));
        fams.push(gauge(
            "mcp_gateway_config_last_reload_success_timestamp_seconds",
            "Unix time of the last reload that applied anything (0: none yet).",
            vec![(vec![], self.last_reload_at.load(Relaxed) as f64)],
        ));
        fams.push(self.latency_family());
        // One view for every upstream family of a scrape (a reload may publish another).
        let view = self.upstreams.current();
        let up = |u: &'static Upstream| {
            vec![
                ("namespace", u.namespace.as_str()),
                ("upstream", u.url.as_str()),
            ]
        };
        fams.push(gauge(
            "mcp_gateway_upstream_healthy",
            "1 when the upstream is taking traffic, 0 when health checks or its breaker took it out.",
            view.all
                .iter()
                .map(|u| (up(u), if u.in_service() { 1.0 } else { 0.0 }))
                .collect(),
        ));
        let checks: Vec<_> = view
            .all
            .iter()
            .filter(|u| u.http().is_some())
            .flat_map(|u| {
                let (ok, failed) = u.checks();
                let with = |result| {
                    let mut l = up(u);
                    l.push(("result", result));
                    l
                };
                [(with("ok"), ok as f64), (with("failed"), failed as f64)]
            })
            .collect();
        // Only HTTP upstreams are checked; an empty family does not encode.
        if !checks.is_empty() {
            fams.push(counter(
                "mcp_gateway_upstream_health_checks_total",
                "Active health checks of each HTTP upstream since start, by result (ok, failed).",
                checks,
            ));
        }
        fams.push(gauge(
            "mcp_gateway_upstream_circuit_state",
            "Circuit breaker of each upstream: 0 closed, 1 open (failing fast), 2 half-open (probing).",
            view.all
                .iter()
                .map(|u| (up(u), u.breaker.state() as i64 as f64))
                .collect(),
        ));
        fams.push(gauge(
            "mcp_gateway_upstream_in_flight",
            "Requests and event streams in flight to each upstream, all cores.",
            view.all
                .iter()
                .map(|u| {
                    let n: i64 = self
                        .cores
                        .iter()
                        .map(|c| c.upstream_in_flight(u.index))
                        .sum();
                    (up(u), n as f64)
                })
                .collect(),
        ));
        fams.push(gauge(
            "mcp_gateway_upstream_pooled_connections",
            "Idle connections to each upstream kept for reuse, all cores, as of each core's last sweep.",
            view.all
                .iter()
                .map(|u| (up(u), self.sum(|c| c.upstream_pooled(u.index)) as f64))
                .collect(),
        ));
        fams.push(counter(
            "mcp_gateway_upstream_stream_resumptions_total",
            "Event streams of WebSocket and MCPB sessions opened again after the upstream ended them early (with Last-Event-ID when they gave an event id).",
            view.all
                .iter()
                .map(|u| (up(u), self.sum(|c| c.upstream_resumptions(u.index)) as f64))
                .collect(),
        ));
        let mut outcomes = Vec::new();
        for u in &view.all {
            for (k, label) in Outcome::LABELS.iter().enumerate() {
                let v = self.sum(|c| c.upstreams.get(u.index).outcomes[k].load(Relaxed));
                let mut l = up(u);
                l.push(("outcome", label));
                outcomes.push((l, v as f64));
            }
        }
        fams.push(counter(
            "mcp_gateway_upstream_requests_total",
            "Requests forwarded to each upstream, by outcome (builtin:echo counts its answers as ok).",
            outcomes,
        ));
        fams.push(self.upstream_latency_family(view));
        let mut out = Vec::with_capacity(8 * 1024);
        TextEncoder::new()
            .encode(&fams, &mut out)
            .expect("text encoding of well-formed families");
        String::from_utf8(out).expect("text encoder writes UTF-8")
    }

    fn latency_family(&self) -> MetricFamily {
        let mut fam = family(
            "mcp_gateway_request_duration_seconds",
            "Time from a complete request or message to its answer being written, by front door.",
            MetricType::HISTOGRAM,
        );
        for d in Frontend::ALL {
            let h = self.histogram(|c| &c.latency[d as usize]);
            fam.mut_metric()
                .push(with_labels(h, &[("frontend", d.label())]));
        }
        fam
    }

    fn upstream_latency_family(&self, view: &Upstreams) -> MetricFamily {
        let mut fam = family(
            "mcp_gateway_upstream_request_duration_seconds",
            "Time from sending a request to an upstream to its response head, per upstream.",
            MetricType::HISTOGRAM,
        );
        for u in &view.all {
            let h = self.histogram(|c| &c.upstreams.get(u.index).latency);
            let l = [
                ("namespace", u.namespace.as_str()),
                ("upstream", u.url.as_str()),
            ];
            fam.mut_metric().push(with_labels(h, &l));
        }
        fam
    }

    /// One histogram summed over cores.
    fn histogram(&self, of: impl Fn(&CoreMetrics) -> &Histo) -> Histogram {
        let mut h = Histogram::default();
        let mut cumulative = 0;
        let mut buckets = Vec::new();
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.sum(|c| of(c).buckets[i].load(Relaxed));
            let mut b = Bucket::default();
            b.set_upper_bound(*bound);
            b.set_cumulative_count(cumulative);
            buckets.push(b);
        }
        cumulative += self.sum(|c| of(c).buckets[BUCKETS.len()].load(Relaxed));
        h.set_bucket(buckets);
        h.set_sample_count(cumulative);
        let nanos = self.sum(|c| of(c).sum_nanos.load(Relaxed));
        h.set_sample_sum(nanos as f64 / 1e9);
        h
    }
}

fn with_labels(h: Histogram, l: &[(&str, &str)]) -> Metric {
    let mut m = Metric::default();
    m.set_label(labels(l));
    m.set_histogram(h);
    m
}

type Sample<'a> = (Vec<(&'a str, &'a str)>, f64);

fn family(name: &str, help: &str, kind: MetricType) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.into());
    f.set_help(help.into());
    f.set_field_type(kind);
    f
}

fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
    pairs
        .iter()
        .map(|(k, v)| {
            let mut l = LabelPair::default();
            l.set_name((*k).into());
            l.set_value((*v).into());
            l
        })
        .collect()
}

fn gauge(name: &str, help: &str, samples: Vec<Sample>) -> MetricFamily {
    with_values(name, help, MetricType::GAUGE, samples, |m, v| {
        let mut g = Gauge::default();
        g.set_value(v);
        m.set_gauge(g);
    })
}

fn counter(name: &str, help: &str, samples: Vec<Sample>) -> MetricFamily {
    with_values(name, help, MetricType::COUNTER, samples, |m, v| {
        let mut c = Counter::default();
        c.set_value(v);
        m.set_counter(c);
    })
}

/// A family of `kind` with one metric per sample, its value put in by `set`.
fn with_values(
    name: &str,
    help: &str,
    kind: MetricType,
    samples: Vec<Sample>,
    set: impl Fn(&mut Metric, f64),
) -> MetricFamily {
    let mut f = family(name, help, kind);
    for (l, v) in samples {
        let mut m = Metric::default();
        m.set_label(labels(&l));
        set(&mut m, v);
        f.mut_metric().push(m);
    }
    f
}
