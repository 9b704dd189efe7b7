//! One endpoint's hot-path half: which events it takes, and the bounded
//! queue the core's calls push onto without waiting.
//!
//! The bound counts every event accepted and not yet delivered or given
//! up — in the queue to the worker, in the worker's outbox, on disk — both
//! in events (`queue_size`) and in bytes (`queue_bytes`, each event by an
//! estimate of its body). An event over either bound is dropped at once:
//! counted in `switchboard_webhook_dropped_total{endpoint,reason="queue_full"}`
//! and logged at `warn` (at most every ten seconds per endpoint, with how
//! many were dropped since the last line). A dead receiver therefore costs
//! the gateway at most the bound, and never a wait.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};

use tokio::sync::mpsc;

use crate::core::channel;
use crate::core::lifecycle::{Event, EventKind};
use crate::edge::config::WebhookConfig;

/// An event on its way to the worker, with what it counts.
#[derive(Debug)]
pub struct Queued {
    /// The event (shared by every endpoint that takes it).
    pub event: Arc<Event>,
    /// Its estimated body size.
    pub cost: usize,
}

/// How often a dropping endpoint logs, at most.
const DROP_LOG_EVERY_MS: i64 = 10_000;

/// The metric handles of one endpoint (registered once, so the hot path
/// does no label lookups).
pub struct Metrics {
    /// `switchboard_webhook_queue_depth`.
    pub depth: metrics::Gauge,
    /// `switchboard_webhook_events_total`: accepted into the queue.
    pub queued: metrics::Counter,
    /// `switchboard_webhook_deliveries_total`: answered 2xx.
    pub delivered: metrics::Counter,
    /// `switchboard_webhook_retries_total`: failed attempts, tried again.
    pub retried: metrics::Counter,
    /// `switchboard_webhook_dropped_total{reason="queue_full"}`.
    pub dropped_full: metrics::Counter,
    /// `switchboard_webhook_dropped_total{reason="expired"}`.
    pub dropped_expired: metrics::Counter,
    /// `switchboard_webhook_dropped_total{reason="stopped"}`: emitted after
    /// the worker stopped (shutdown).
    pub dropped_stopped: metrics::Counter,
    /// `switchboard_webhook_delivery_seconds`: time of each attempt.
    pub attempt_seconds: metrics::Histogram,
}

impl Metrics {
    fn new(name: &str) -> Metrics {
        let ep = || ("endpoint", name.to_string());
        let dropped = |reason: &'static str| metrics::counter!("switchboard_webhook_dropped_total", "endpoint" => name.to_string(), "reason" => reason);
        Metrics {
            depth: metrics::gauge!("switchboard_webhook_queue_depth", &[ep()]),
            queued: metrics::counter!("switchboard_webhook_events_total", &[ep()]),
            delivered: metrics::counter!("switchboard_webhook_deliveries_total", &[ep()]),
            retried: metrics::counter!("switchboard_webhook_retries_total", &[ep()]),
            dropped_full: dropped("queue_full"),
            dropped_expired: dropped("expired"),
            dropped_stopped: dropped("stopped"),
            attempt_seconds: metrics::histogram!("switchboard_webhook_delivery_seconds", &[ep()]),
        }
    }
}

/// One endpoint, as the hot path sees it.
pub struct Endpoint {
    /// Its name (metrics, logs, the store's key).
    pub name: String,
    /// Bit `k as u8` set: takes events of kind `k`.
    kinds: u16,
    /// MQTT filters selecting channels.
    channels: Vec<String>,
    tx: mpsc::Sender<Queued>,
    /// Events accepted and not yet delivered or given up.
    depth: AtomicUsize,
    /// Their estimated bytes.
    bytes: AtomicUsize,
    max_events: usize,
    max_bytes: usize,
    /// Unix ms of the last drop log line, and drops since.
    last_drop_log: AtomicI64,
    drops_unlogged: AtomicU64,
    /// Its metric handles.
    pub metrics: Metrics,
}

impl Endpoint {
    /// The endpoint of `cfg` (validated), and the receiving end of its
    /// queue for the worker.
    pub fn new(cfg: &WebhookConfig) -> Result<(Arc<Endpoint>, mpsc::Receiver<Queued>), String> {
        let name = cfg.display_name();
        let kinds = cfg.event_kinds()?.into_iter().fold(0u16, |m, k| m | 1 << k as u8);
        // The channel between the hot path and the worker is bounded like
        // the whole queue; the counters are what refuse first.
        let (tx, rx) = mpsc::channel(cfg.queue_size.max(1));
        let ep = Endpoint {
            metrics: Metrics::new(&name),
            name,
            kinds,
            channels: cfg.channels.clone(),
            tx,
            depth: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            max_events: cfg.queue_size,
            max_bytes: cfg.queue_bytes,
            last_drop_log: AtomicI64::new(i64::MIN),
            drops_unlogged: AtomicU64::new(0),
        };
        Ok((Arc::new(ep), rx))
    }

    /// Whether this endpoint takes `kind` on `channel` (a subscription's
    /// filter for subscribe and unsubscribe, read level by level as a
    /// name; a shared subscription by its filter).
    pub fn takes(&self, kind: EventKind, channel: &str) -> bool {
        if self.kinds & (1 << kind as u8) == 0 {
            return false;
        }
        if !kind.has_channel() {
            return true;
        }
        let channel = channel::parse_shared(channel).map_or(channel, |(_, f)| f);
        self.channels.iter().any(|f| channel::filter_matches(f, channel))
    }

    /// Queues `event` if it fits the bounds; drops it (counted, logged)
    /// otherwise. Never waits.
    pub fn offer(&self, event: Arc<Event>, cost: usize) {
        let depth = self.depth.fetch_add(1, Ordering::Relaxed);
        let bytes = self.bytes.fetch_add(cost, Ordering::Relaxed);
        if depth >= self.max_events || bytes.saturating_add(cost) > self.max_bytes {
            self.uncount(cost);
            return self.dropped(event.kind, "queue_full");
        }
        match self.tx.try_send(Queued { event, cost }) {
            Ok(()) => {
                self.metrics.queued.increment(1);
                self.metrics.depth.increment(1.0);
            }
            Err(e) => {
                self.uncount(cost);
                let full = matches!(e, mpsc::error::TrySendError::Full(_));
                self.dropped(e.into_inner().event.kind, if full { "queue_full" } else { "stopped" });
            }
        }
    }

    /// Counts `n` loaded events of `cost` bytes (pending from the store).
    pub fn count_loaded(&self, n: usize, cost: usize) {
        self.depth.fetch_add(n, Ordering::Relaxed);
        self.bytes.fetch_add(cost, Ordering::Relaxed);
        self.metrics.depth.increment(n as f64);
    }

    /// An event's body, now encoded, takes `actual` bytes where `estimate`
    /// was counted: the count is corrected, and `false` says the event no
    /// longer fits the byte bound (the caller drops it with
    /// [`Endpoint::overflowed`]). Heavily escaped payloads are where the
    /// estimate falls short.
    pub fn recount(&self, estimate: usize, actual: usize) -> bool {
        if actual <= estimate {
            self.bytes.fetch_sub(estimate - actual, Ordering::Relaxed);
            return true;
        }
        let before = self.bytes.fetch_add(actual - estimate, Ordering::Relaxed);
        before + (actual - estimate) <= self.max_bytes
    }

    /// An admitted event (counted at `cost`) did not fit the byte bound
    /// once encoded: dropped, counted and logged as a full queue.
    pub fn overflowed(&self, kind: EventKind, cost: usize) {
        self.done(cost);
        self.dropped(kind, "queue_full");
    }

    /// An event left the queue (delivered or given up).
    pub fn done(&self, cost: usize) {
        self.uncount(cost);
        self.metrics.depth.decrement(1.0);
    }

    fn uncount(&self, cost: usize) {
        self.depth.fetch_sub(1, Ordering::Relaxed);
        self.bytes.fetch_sub(cost, Ordering::Relaxed);
    }

    /// Events accepted and not yet delivered or given up.
    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }

    fn dropped(&self, kind: EventKind, reason: &'static str) {
        match reason {
            "stopped" => self.metrics.dropped_stopped.increment(1),
            _ => self.metrics.dropped_full.increment(1),
        }
        let dropped = self.drops_unlogged.fetch_add(1, Ordering::Relaxed) + 1;
        let now = crate::core::router::now_ms();
        let last = self.last_drop_log.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= DROP_LOG_EVERY_MS
            && self.last_drop_log.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            self.drops_unlogged.fetch_sub(dropped, Ordering::Relaxed);
            tracing::warn!(
                endpoint = %self.name,
                reason,
                dropped,
                last_type = kind.name(),
                queued = self.depth(),
                "webhook events dropped (queue_full: raise queue_size / queue_bytes or fix the receiver; stopped: \
                 emitted during shutdown)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The byte count follows the encoded body's real size, and an event
    /// whose body outgrew the estimate past the bound is refused.
    #[test]
    fn recount_corrects_the_estimate_and_refuses_what_no_longer_fits() {
        let cfg = WebhookConfig {
            url: "http://127.0.0.1:9/h".into(),
            secret: "0123456789abcdef".into(),
            queue_bytes: 1000,
            ..Default::default()
        };
        let (e, _rx) = Endpoint::new(&cfg).expect("endpoint");
        e.count_loaded(1, 100);
        assert!(e.recount(100, 60), "a smaller body fits");
        assert_eq!(e.bytes.load(Ordering::Relaxed), 60);
        assert!(e.recount(60, 1000), "exactly the bound fits");
        assert_eq!(e.bytes.load(Ordering::Relaxed), 1000);
        assert!(!e.recount(1000, 1001), "one byte over does not");
        e.overflowed(EventKind::Publish, 1001);
        assert_eq!((e.bytes.load(Ordering::Relaxed), e.depth()), (0, 0), "dropped: nothing counted any more");
    }
}
