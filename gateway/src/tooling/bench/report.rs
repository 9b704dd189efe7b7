//! The bench report: INVALID detection, the text table and the JSON object.
//!
//! Every scenario fills one [`Report`]; fields that do not apply stay `None`
//! and print as `null` in JSON (so consumers see a stable set of keys) and
//! are left out of the table. Pure formatting: no I/O besides the caller's
//! `print`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::accounting::Tally;
use super::histogram::Summary;
use super::procfs::ProcDelta;

/// The generator's own CPU budget per worker thread (fraction of one core).
pub const MAX_BENCH_CPU_PER_THREAD: f64 = 0.85;
/// Largest tolerated p99 schedule lag, µs.
pub const MAX_LAG_P99_US: u64 = 1_000;

/// Decides whether the generator itself was the bottleneck.
///
/// `bench_cpu_us` is this process's user+system CPU over a window of
/// `wall_us`; `threads` is the number of runtime worker threads. The run is
/// INVALID when the CPU used exceeds 85 % of one core per worker thread, or
/// when publishers sent late (schedule lag p99 over 1 ms): either way the
/// numbers describe the bench, not the gateway.
pub fn invalid_reason(
    bench_cpu_us: Option<u64>,
    wall_us: u64,
    threads: usize,
    lag_p99_us: Option<u64>,
) -> Option<String> {
    let mut reasons = Vec::new();
    if let Some(cpu) = bench_cpu_us
        && wall_us > 0
    {
        let cores = cpu as f64 / wall_us as f64;
        let budget = MAX_BENCH_CPU_PER_THREAD * threads.max(1) as f64;
        if cores > budget {
            reasons.push(format!(
                "bench CPU {:.0}% of one core > {:.0}% ({} worker threads × 85%)",
                cores * 100.0,
                budget * 100.0,
                threads
            ));
        }
    }
    if let Some(lag) = lag_p99_us
        && lag > MAX_LAG_P99_US
    {
        reasons.push(format!("schedule lag p99 {lag} µs > {MAX_LAG_P99_US} µs"));
    }
    (!reasons.is_empty()).then(|| reasons.join("; "))
}

/// Everything a run reports. Rates are per second of the measured window.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Subscriber protocol.
    pub sub_proto: String,
    /// Publisher protocol (REST for SSE/poll subscribers unless `cross` says otherwise).
    pub pub_proto: String,
    /// Measured window, seconds.
    pub window_secs: f64,
    /// Connections the bench held at the peak.
    pub connections: u64,
    /// Subscribers.
    pub subscribers: u64,
    /// Publishers.
    pub publishers: u64,
    /// Messages published.
    pub published: u64,
    /// Target publish rate.
    pub target_publishes_per_sec: f64,
    /// Achieved publish rate.
    pub publishes_per_sec: f64,
    /// Deliveries expected (published × subscribers of each channel).
    pub expected_deliveries: u64,
    /// Deliveries received (duplicates included).
    pub deliveries: u64,
    /// Delivery rate.
    pub deliveries_per_sec: f64,
    /// Messages sent but not delivered (after the drain).
    pub lost: u64,
    /// Extra copies delivered.
    pub duplicated: u64,
    /// Messages delivered after a later one of the same publisher.
    pub reordered: u64,
    /// Deliveries with a sequence the publisher never sent, or an undecodable payload.
    pub unexpected: u64,
    /// Connection or protocol errors the clients hit.
    pub client_errors: u64,
    /// `publish`: the run's channels are `<prefix>/0` to `<prefix>/<C-1>`
    /// (to read their history afterwards).
    pub channel_prefix: Option<String>,
    /// `publish`: publishes each publisher kept outstanding at most.
    pub window: Option<u64>,
    /// `publish`: publishes acknowledged as accepted.
    pub acked: Option<u64>,
    /// `publish`: acknowledged publishes per second of the window.
    pub acked_per_sec: Option<f64>,
    /// `publish`: publishes the server answered with a refusal (an `error`
    /// frame, a non-2xx status, a PUBACK reason ≥ 0x80, a JetStream error).
    pub refused: Option<u64>,
    /// `publish`: publishes sent and never answered (their connection failed,
    /// or the ack did not come in time).
    pub unacked: Option<u64>,
    /// Latency p50 (receive − scheduled send; `publish`: ack − send), µs.
    pub p50_us: Option<u64>,
    /// Latency p90, µs.
    pub p90_us: Option<u64>,
    /// Latency p99, µs.
    pub p99_us: Option<u64>,
    /// Latency p99.9, µs.
    pub p999_us: Option<u64>,
    /// Latency max, µs.
    pub max_us: Option<u64>,
    /// Schedule lag (actual − scheduled send) p50, µs.
    pub lag_p50_us: Option<u64>,
    /// Schedule lag p99, µs.
    pub lag_p99_us: Option<u64>,
    /// Schedule lag max, µs.
    pub lag_max_us: Option<u64>,
    /// Connection setup rate (idle, churn), per second.
    pub connects_per_sec: Option<f64>,
    /// Handshake (connect + subscribe) latency p50, µs.
    pub handshake_p50_us: Option<u64>,
    /// Handshake p99, µs.
    pub handshake_p99_us: Option<u64>,
    /// Handshake p99.9, µs.
    pub handshake_p999_us: Option<u64>,
    /// Handshake max, µs.
    pub handshake_max_us: Option<u64>,
    /// Recovery: time from the reconnect until every subscriber had every missed message, ms.
    pub catch_up_ms: Option<f64>,
    /// Recovery: every subscriber got every missed message exactly once.
    pub exactly_once: Option<bool>,
    /// Bench CPU over the window, % of one core.
    pub bench_cpu_pct: Option<f64>,
    /// Runtime worker threads the bench counts for its CPU budget.
    pub bench_threads: u64,
    /// Server CPU µs per delivery.
    pub server_cpu_us_per_delivery: Option<f64>,
    /// Deliveries per server CPU second.
    pub deliveries_per_server_cpu_sec: Option<f64>,
    /// Server write syscalls per delivery, counted as `writes_source` says.
    pub writes_per_delivery: Option<f64>,
    /// `publish`: server CPU µs per acknowledged publish.
    pub server_cpu_us_per_publish: Option<f64>,
    /// `publish`: server write syscalls per acknowledged publish.
    pub writes_per_publish: Option<f64>,
    /// Where `writes_per_delivery` comes from: `perf` (write, writev, sendto,
    /// sendmsg, sendmmsg, exact) or `syscw` (`/proc/PID/io`: the write/writev
    /// family only; the kernel does not count send/sendto/sendmsg there).
    pub writes_source: Option<String>,
    /// With `--syscalls perf`: the server's write syscalls in the window, by name.
    pub write_syscalls: Option<BTreeMap<String, u64>>,
    /// Server CPU over the window, % of one core.
    pub server_cpu_pct: Option<f64>,
    /// Server RSS at the end of the window, bytes.
    pub rss_bytes: Option<u64>,
    /// Server RSS growth over the window per connection held, bytes (idle).
    pub rss_per_conn_bytes: Option<f64>,
    /// True when the generator saturated; the numbers then describe the bench.
    pub invalid: bool,
    /// Why the run is INVALID.
    pub invalid_reason: Option<String>,
    /// Loud problems (loss, duplicates, reordering, errors), one line each.
    pub problems: Vec<String>,
    /// TLS handshakes, when the run spoke TLS (`https://`, `mqtts://`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<super::tls::Figures>,
}

impl Report {
    /// Fills the accounting fields and the `problems` lines from `tally`.
    pub fn set_tally(&mut self, t: Tally) {
        self.deliveries = t.delivered;
        self.lost = t.lost;
        self.duplicated = t.duplicated;
        self.reordered = t.reordered;
        self.unexpected = t.unexpected;
        for (n, what) in
            [(t.lost, "LOST"), (t.duplicated, "DUPLICATED"), (t.reordered, "REORDERED"), (t.unexpected, "UNEXPECTED")]
        {
            if n > 0 {
                self.problems.push(format!("{n} messages {what}"));
            }
        }
    }

    /// Fills the latency fields.
    pub fn set_latency(&mut self, s: Summary) {
        if s.count > 0 {
            (self.p50_us, self.p90_us, self.p99_us, self.p999_us, self.max_us) =
                (Some(s.p50), Some(s.p90), Some(s.p99), Some(s.p999), Some(s.max));
        }
    }

    /// Fills the schedule lag fields.
    pub fn set_lag(&mut self, s: Summary) {
        if s.count > 0 {
            (self.lag_p50_us, self.lag_p99_us, self.lag_max_us) = (Some(s.p50), Some(s.p99), Some(s.max));
        }
    }

    /// Fills the handshake fields.
    pub fn set_handshake(&mut self, s: Summary) {
        if s.count > 0 {
            (self.handshake_p50_us, self.handshake_p99_us, self.handshake_p999_us, self.handshake_max_us) =
                (Some(s.p50), Some(s.p99), Some(s.p999), Some(s.max));
        }
    }

    /// Fills the server figures from a `/proc` delta over `window_secs`:
    /// per delivery, and per acknowledged publish when `acked` is set.
    pub fn set_server(&mut self, d: ProcDelta) {
        let deliveries = self.deliveries as f64;
        let acked = self.acked.unwrap_or(0) as f64;
        if let Some(cpu) = d.cpu_us
            && acked > 0.0
        {
            self.server_cpu_us_per_publish = Some(cpu as f64 / acked);
        }
        if let Some(cpu) = d.cpu_us {
            if deliveries > 0.0 {
                self.server_cpu_us_per_delivery = Some(cpu as f64 / deliveries);
            }
            if cpu > 0 && deliveries > 0.0 {
                self.deliveries_per_server_cpu_sec = Some(deliveries / (cpu as f64 / 1e6));
            }
            if self.window_secs > 0.0 {
                self.server_cpu_pct = Some(cpu as f64 / 1e4 / self.window_secs);
            }
        }
        let (writes, source) = match &d.write_syscalls {
            Some(by_name) => (Some(by_name.values().sum::<u64>()), "perf"),
            None => (d.syscw, "syscw"),
        };
        if let Some(w) = writes {
            self.writes_source = Some(source.into());
            if deliveries > 0.0 {
                self.writes_per_delivery = Some(w as f64 / deliveries);
            }
            if acked > 0.0 {
                self.writes_per_publish = Some(w as f64 / acked);
            }
        }
        self.write_syscalls = d.write_syscalls;
        self.rss_bytes = d.rss_bytes;
        if let (Some(end), Some(start)) = (d.rss_bytes, d.rss_start_bytes)
            && self.connections > 0
        {
            self.rss_per_conn_bytes = Some((end as f64 - start as f64) / self.connections as f64);
        }
    }

    /// Fills the server figures from a [`super::procfs::ServerProbe`]
    /// result; a probe that failed is a loud problem, not a failed run.
    pub fn set_server_figures(&mut self, d: Result<Option<ProcDelta>, super::BenchError>) {
        match d {
            Ok(Some(d)) => self.set_server(d),
            Ok(None) => {}
            Err(e) => self.problems.push(format!("server figures unavailable: {e}")),
        }
    }

    /// Fills the INVALID fields from the bench's own CPU and schedule lag.
    ///
    /// `threads` is capped at the CPUs this process may run on (its affinity
    /// mask, e.g. one core under `taskset -c 1`): threads cannot use more
    /// cores than they are allowed, so the budget is 85 % of each core the
    /// bench can actually use.
    pub fn set_validity(&mut self, bench_cpu_us: Option<u64>, wall_us: u64, threads: usize) {
        self.bench_threads = threads as u64;
        if let Some(cpu) = bench_cpu_us
            && wall_us > 0
        {
            self.bench_cpu_pct = Some(cpu as f64 * 100.0 / wall_us as f64);
        }
        let cores = std::thread::available_parallelism().map_or(threads, |n| n.get());
        self.invalid_reason = invalid_reason(bench_cpu_us, wall_us, threads.min(cores), self.lag_p99_us);
        self.invalid = self.invalid_reason.is_some();
    }

    /// The report as one JSON object on one line.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// The report as a text table; problems and INVALID come first, loudly.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        for p in &self.problems {
            let _ = writeln!(out, "!! {p}");
        }
        if let Some(r) = &self.invalid_reason {
            let _ = writeln!(out, "!! INVALID: {r}");
        }
        let _ = writeln!(
            out,
            "bench {}  sub={} pub={}  window {:.2} s  {} connections ({} subscribers, {} publishers)",
            self.scenario,
            self.sub_proto,
            self.pub_proto,
            self.window_secs,
            self.connections,
            self.subscribers,
            self.publishers
        );
        let row = |out: &mut String, k: &str, v: String| {
            let _ = writeln!(out, "  {k:<28} {v}");
        };
        if let Some(acked) = self.acked {
            row(
                &mut out,
                "acked publishes",
                format!(
                    "{acked} of {} sent  ({:.0}/s; window {} × {} publishers)",
                    self.published,
                    self.acked_per_sec.unwrap_or(0.0),
                    self.window.unwrap_or(0),
                    self.publishers
                ),
            );
            row(
                &mut out,
                "refused / unacked",
                format!(
                    "{} / {}  (unexpected acks {})",
                    self.refused.unwrap_or(0),
                    self.unacked.unwrap_or(0),
                    self.unexpected
                ),
            );
        } else if self.published > 0 || self.target_publishes_per_sec > 0.0 {
            let rates = if self.target_publishes_per_sec > 0.0 {
                format!("  ({:.0}/s, target {:.0}/s)", self.publishes_per_sec, self.target_publishes_per_sec)
            } else {
                String::new()
            };
            row(&mut out, "publishes", format!("{}{rates}", self.published));
            row(
                &mut out,
                "deliveries",
                format!(
                    "{} of {} expected  ({:.0}/s)",
                    self.deliveries, self.expected_deliveries, self.deliveries_per_sec
                ),
            );
            row(
                &mut out,
                "lost / dup / reordered",
                format!("{} / {} / {}  (unexpected {})", self.lost, self.duplicated, self.reordered, self.unexpected),
            );
        }
        let us = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
        if self.p50_us.is_some() {
            row(
                &mut out,
                if self.acked.is_some() {
                    "ack latency µs p50/p90/p99/p99.9/max"
                } else {
                    "latency µs p50/p90/p99/p99.9/max"
                },
                format!(
                    "{} / {} / {} / {} / {}",
                    us(self.p50_us),
                    us(self.p90_us),
                    us(self.p99_us),
                    us(self.p999_us),
                    us(self.max_us)
                ),
            );
        }
        if self.lag_p50_us.is_some() {
            row(
                &mut out,
                "schedule lag µs p50/p99/max",
                format!("{} / {} / {}", us(self.lag_p50_us), us(self.lag_p99_us), us(self.lag_max_us)),
            );
        }
        if let Some(r) = self.connects_per_sec {
            row(&mut out, "connects/s", format!("{r:.0}"));
        }
        if self.handshake_p50_us.is_some() {
            row(
                &mut out,
                "handshake µs p50/p99/p99.9/max",
                format!(
                    "{} / {} / {} / {}",
                    us(self.handshake_p50_us),
                    us(self.handshake_p99_us),
                    us(self.handshake_p999_us),
                    us(self.handshake_max_us)
                ),
            );
        }
        if let Some(c) = self.catch_up_ms {
            row(&mut out, "catch-up", format!("{c:.1} ms  exactly-once {}", self.exactly_once.unwrap_or(false)));
        }
        if self.client_errors > 0 {
            row(&mut out, "client errors", self.client_errors.to_string());
        }
        if let Some(c) = self.bench_cpu_pct {
            row(&mut out, "bench CPU", format!("{c:.0}% of one core ({} worker threads)", self.bench_threads));
        }
        if let Some(c) = self.server_cpu_pct {
            row(&mut out, "server CPU", format!("{c:.0}% of one core"));
        }
        if let Some(v) = self.server_cpu_us_per_delivery {
            row(&mut out, "server CPU µs/delivery", format!("{v:.2}"));
        }
        if let Some(v) = self.deliveries_per_server_cpu_sec {
            row(&mut out, "deliveries/server CPU s", format!("{v:.0}"));
        }
        if let Some(v) = self.server_cpu_us_per_publish {
            row(&mut out, "server CPU µs/publish", format!("{v:.2}"));
        }
        if let Some(v) = self.writes_per_publish {
            row(
                &mut out,
                "server writes/publish",
                format!("{v:.3}  ({})", self.writes_source.as_deref().unwrap_or("-")),
            );
        }
        if let Some(v) = self.writes_per_delivery {
            let how = match &self.write_syscalls {
                Some(by_name) => {
                    let parts: Vec<String> =
                        by_name.iter().filter(|(_, n)| **n > 0).map(|(k, n)| format!("{k} {n}")).collect();
                    format!("perf: {}", parts.join(", "))
                }
                None => "syscw: write/writev, not send".into(),
            };
            row(&mut out, "server writes/delivery", format!("{v:.4}  ({how})"));
        }
        if let Some(v) = self.rss_bytes {
            row(&mut out, "server RSS", format!("{:.1} MiB", v as f64 / 1048576.0));
        }
        if let Some(v) = self.rss_per_conn_bytes {
            row(&mut out, "server RSS/connection", format!("{:.1} KiB", v / 1024.0));
        }
        if let Some(t) = &self.tls {
            row(
                &mut out,
                "TLS handshakes",
                format!(
                    "{} ({} full, {} resumed, {} failed, {} h2)  p50 {} µs  p99 {} µs  max {} µs  {:.0}/s",
                    t.handshakes, t.full, t.resumed, t.failed, t.h2, t.p50_us, t.p99_us, t.max_us, t.per_sec
                ),
            );
        }
        let _ = writeln!(out, "  {:<28} {}", "valid", if self.invalid { "NO (see INVALID above)" } else { "yes" });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_detection() {
        // 1 s window: 0.5 core on 1 thread is fine, 0.9 is not, 1.6 on 2 threads is fine.
        assert_eq!(invalid_reason(Some(500_000), 1_000_000, 1, Some(100)), None);
        let r = invalid_reason(Some(900_000), 1_000_000, 1, Some(100)).unwrap();
        assert!(r.contains("CPU"), "{r}");
        assert_eq!(invalid_reason(Some(1_600_000), 1_000_000, 2, None), None);
        let r = invalid_reason(Some(0), 1_000_000, 2, Some(1_001)).unwrap();
        assert!(r.contains("lag") && !r.contains("CPU"), "{r}");
        let r = invalid_reason(Some(2_000_000), 1_000_000, 2, Some(5_000)).unwrap();
        assert!(r.contains("lag") && r.contains("CPU"), "{r}");
        // No readings: nothing to judge.
        assert_eq!(invalid_reason(None, 0, 4, None), None);
    }

    #[test]
    fn report_json_has_the_documented_keys_and_problems_are_loud() {
        let mut r = Report { scenario: "fanout".into(), window_secs: 1.0, connections: 2, ..Default::default() };
        r.set_tally(Tally { delivered: 9, lost: 1, duplicated: 0, reordered: 2, unexpected: 0 });
        r.set_latency(Summary { count: 9, p50: 10, p90: 20, p99: 30, p999: 40, max: 50 });
        r.set_server(ProcDelta {
            cpu_us: Some(900),
            syscw: Some(9),
            rss_bytes: Some(4096),
            rss_start_bytes: Some(2048),
            write_syscalls: None,
        });
        r.set_validity(Some(10), 1_000_000, 2);
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        for k in [
            "deliveries_per_sec",
            "publishes_per_sec",
            "lost",
            "duplicated",
            "reordered",
            "p50_us",
            "p99_us",
            "p999_us",
            "max_us",
            "server_cpu_us_per_delivery",
            "deliveries_per_server_cpu_sec",
            "writes_per_delivery",
            "rss_bytes",
            "invalid",
            "invalid_reason",
        ] {
            assert!(v.get(k).is_some(), "missing {k}");
        }
        assert_eq!(v["server_cpu_us_per_delivery"], 100.0);
        assert_eq!(v["writes_per_delivery"], 1.0);
        assert_eq!(v["writes_source"], "syscw");
        assert!(v["write_syscalls"].is_null());
        assert_eq!(v["rss_per_conn_bytes"], 1024.0);
        assert_eq!(v["invalid"], false);
        let table = r.to_table();
        assert!(table.starts_with("!! 1 messages LOST\n!! 2 messages REORDERED\n"), "{table}");
    }

    #[test]
    fn publish_figures_are_per_acknowledged_publish() {
        let mut r = Report {
            scenario: "publish".into(),
            window_secs: 2.0,
            publishers: 4,
            published: 1010,
            window: Some(16),
            acked: Some(1000),
            acked_per_sec: Some(500.0),
            refused: Some(10),
            unacked: Some(0),
            ..Default::default()
        };
        r.set_latency(Summary { count: 1000, p50: 100, p90: 150, p99: 300, p999: 900, max: 1200 });
        r.set_server(ProcDelta { cpu_us: Some(25_000), syscw: Some(2_000), ..Default::default() });
        assert_eq!(r.server_cpu_us_per_publish, Some(25.0));
        assert_eq!(r.writes_per_publish, Some(2.0));
        // No deliveries in this scenario: no per-delivery figures.
        assert_eq!((r.server_cpu_us_per_delivery, r.writes_per_delivery), (None, None));
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        for (k, want) in
            [("acked", 1000.0), ("acked_per_sec", 500.0), ("refused", 10.0), ("window", 16.0), ("p99_us", 300.0)]
        {
            assert_eq!(v[k].as_f64(), Some(want), "{k}");
        }
        let table = r.to_table();
        for line in ["1000 of 1010 sent  (500/s; window 16 × 4 publishers)", "ack latency µs", "server CPU µs/publish"]
        {
            assert!(table.contains(line), "{line:?} in {table}");
        }
        assert!(!table.contains("deliveries"), "{table}");
        // Other scenarios keep the keys, as null.
        let v: serde_json::Value = serde_json::from_str(&Report::default().to_json()).unwrap();
        assert!(v["acked"].is_null() && v["server_cpu_us_per_publish"].is_null());
    }

    #[test]
    fn perf_counts_replace_syscw() {
        let mut r = Report { deliveries: 1000, window_secs: 1.0, ..Default::default() };
        let by_name: BTreeMap<String, u64> =
            [("write".to_string(), 5), ("sendto".to_string(), 40), ("writev".to_string(), 5)].into();
        r.set_server(ProcDelta {
            cpu_us: Some(1000),
            syscw: Some(10),
            write_syscalls: Some(by_name),
            ..Default::default()
        });
        assert_eq!(r.writes_per_delivery, Some(0.05));
        assert_eq!(r.writes_source.as_deref(), Some("perf"));
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["write_syscalls"]["sendto"], 40);
        assert!(r.to_table().contains("perf: sendto 40, write 5, writev 5"), "{}", r.to_table());
    }
}
