//! Latency histograms: HDR histograms in microseconds, sharded so that many
//! subscriber tasks can record without one hot lock, merged at the end.
//!
//! Subscribers buffer a few samples locally and flush them into a shard, so
//! the lock is taken once per batch, not once per delivery. A per-task
//! histogram would be simpler but costs ~10 KB per task, too much at
//! 20 000 connections. This module does not read clocks.

use hdrhistogram::Histogram;
use parking_lot::Mutex;

/// Largest recordable value: one hour in µs (larger samples are clamped).
const MAX_US: u64 = 3_600_000_000;
/// Samples a [`LocalBuffer`] holds before it flushes.
const BATCH: usize = 256;

/// Creates an empty histogram (µs, 3 significant digits).
pub fn new_histogram() -> Histogram<u64> {
    // 1 µs .. 1 h with 3 significant digits is a valid configuration.
    Histogram::new_with_bounds(1, MAX_US, 3).expect("static histogram bounds are valid")
}

/// Percentiles of one histogram, in µs.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Summary {
    /// Number of samples.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest sample.
    pub max: u64,
}

/// Summarises `h`.
pub fn summarize(h: &Histogram<u64>) -> Summary {
    if h.is_empty() {
        return Summary::default();
    }
    Summary {
        count: h.len(),
        p50: h.value_at_quantile(0.50),
        p90: h.value_at_quantile(0.90),
        p99: h.value_at_quantile(0.99),
        p999: h.value_at_quantile(0.999),
        max: h.max(),
    }
}

/// A histogram shared by many tasks.
#[derive(Debug)]
pub struct ShardedHistogram {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl ShardedHistogram {
    /// `n` shards (at least one).
    pub fn new(n: usize) -> Self {
        ShardedHistogram { shards: (0..n.max(1)).map(|_| Mutex::new(new_histogram())).collect() }
    }

    /// Records a batch of samples (µs) into shard `key % shards`.
    pub fn record_batch(&self, key: usize, samples: &[u64]) {
        let mut h = self.shards[key % self.shards.len()].lock();
        for &s in samples {
            h.saturating_record(s.clamp(1, MAX_US));
        }
    }

    /// All shards merged into one histogram.
    pub fn merged(&self) -> Histogram<u64> {
        let mut out = new_histogram();
        for s in &self.shards {
            merge_into(&mut out, &s.lock());
        }
        out
    }
}

/// Adds every sample of `from` to `into`.
pub fn merge_into(into: &mut Histogram<u64>, from: &Histogram<u64>) {
    // Both have the same bounds, so `add` cannot fail for range reasons;
    // fall back to per-value copying should it ever do so.
    if into.add(from).is_err() {
        for v in from.iter_recorded() {
            into.saturating_record_n(v.value_iterated_to(), v.count_at_value());
        }
    }
}

/// A task-local buffer in front of a [`ShardedHistogram`].
#[derive(Debug)]
pub struct LocalBuffer {
    key: usize,
    samples: Vec<u64>,
}

impl LocalBuffer {
    /// A buffer flushing into shard `key`.
    pub fn new(key: usize) -> Self {
        LocalBuffer { key, samples: Vec::with_capacity(BATCH) }
    }

    /// Records one sample (µs), flushing when the batch is full.
    pub fn record(&mut self, target: &ShardedHistogram, us: u64) {
        self.samples.push(us);
        if self.samples.len() >= BATCH {
            self.flush(target);
        }
    }

    /// Moves buffered samples into `target`.
    pub fn flush(&mut self, target: &ShardedHistogram) {
        if !self.samples.is_empty() {
            target.record_batch(self.key, &self.samples);
            self.samples.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_merge_into_one_distribution() {
        let sh = ShardedHistogram::new(4);
        // 1..=1000 µs spread over four shards by four "tasks".
        for task in 0..4usize {
            let mut buf = LocalBuffer::new(task);
            for v in (1..=1000u64).filter(|v| (*v as usize) % 4 == task) {
                buf.record(&sh, v);
            }
            buf.flush(&sh);
        }
        let s = summarize(&sh.merged());
        assert_eq!(s.count, 1000);
        assert!((499..=501).contains(&s.p50), "{s:?}");
        assert!((989..=991).contains(&s.p99), "{s:?}");
        assert_eq!(s.max, 1000);
    }

    #[test]
    fn merge_adds_counts_and_keeps_max() {
        let mut a = new_histogram();
        let mut b = new_histogram();
        a.record(10).unwrap();
        b.record(20).unwrap();
        b.record(5_000_000).unwrap();
        merge_into(&mut a, &b);
        assert_eq!(a.len(), 3);
        assert!(a.max() >= 4_995_000);
        assert_eq!(summarize(&new_histogram()), Summary::default());
    }

    #[test]
    fn zero_and_huge_samples_are_clamped_not_lost() {
        let sh = ShardedHistogram::new(1);
        sh.record_batch(0, &[0, u64::MAX]);
        assert_eq!(sh.merged().len(), 2);
    }
}
