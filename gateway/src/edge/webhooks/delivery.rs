//! One endpoint's worker: takes events off the hot path's queue into the
//! outbox (on disk when the store is), and POSTs them to the endpoint
//! one at a time, oldest first, retrying with back-off.
//!
//! One request in flight per endpoint keeps the receiver's view in the
//! order events happened (a subscribe never arrives before its connect)
//! and a failing receiver costs one connection attempt per back-off, not a
//! storm. The price: an endpoint's throughput is one answer per round
//! trip, and an event the receiver keeps refusing holds the ones behind it
//! until it is `max_age` old. A receiver should answer 2xx to what it does
//! not care about.
//!
//! While a request is in flight or a back-off runs, the worker keeps
//! taking new events into the outbox, so they are persisted as they come.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use super::endpoint::{Endpoint, Queued};
use super::outbox::{Outbox, StoredEvent};
use super::retry::RetryPolicy;
use super::signature;

/// What a worker needs to send.
pub struct Target {
    /// The HTTP client (connection pool, timeouts, TLS).
    pub client: reqwest::Client,
    /// The endpoint's URL.
    pub url: url::Url,
    /// The HMAC key.
    pub secret: Arc<[u8]>,
    /// When to retry and when to give up.
    pub retry: RetryPolicy,
    /// This node's name (in every body).
    pub node: String,
}

/// One endpoint's worker (see the module docs).
pub struct Worker {
    /// The endpoint's shared half.
    pub endpoint: Arc<Endpoint>,
    /// Events from the hot path.
    pub rx: mpsc::Receiver<Queued>,
    /// Pending events.
    pub outbox: Outbox,
    /// Where and how to send (shared with the request in flight).
    pub target: Arc<Target>,
    /// Set at shutdown.
    pub stop: watch::Receiver<bool>,
}

/// The outcome of one attempt.
#[derive(Debug)]
enum Attempt {
    Delivered,
    /// Not delivered: the status or the error, for the log.
    Failed(String),
}

/// A fresh delivery id: 128 random bits, hex.
fn delivery_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// POSTs one event, signed now.
async fn post(target: Arc<Target>, event: StoredEvent) -> Attempt {
    let signature = signature::sign(&target.secret, unix_secs(), &event.body);
    let sent = target
        .client
        .post(target.url.clone())
        .header(http::header::CONTENT_TYPE, "application/json")
        .header("switchboard-delivery", &event.id)
        .header("switchboard-event", &event.kind)
        .header(signature::SIGNATURE_HEADER, signature)
        .body(event.body.clone())
        .send()
        .await;
    match sent {
        Ok(mut r) if r.status().is_success() => {
            // Read (and drop) the answer's body, at most 64 KiB, so the
            // connection goes back to the pool for the next event.
            let mut read = 0usize;
            while let Ok(Some(chunk)) = r.chunk().await {
                read += chunk.len();
                if read > 64 * 1024 {
                    break;
                }
            }
            Attempt::Delivered
        }
        Ok(r) => Attempt::Failed(format!("HTTP {}", r.status().as_u16())),
        Err(e) if e.is_timeout() => Attempt::Failed("no answer within the timeout".into()),
        Err(e) => Attempt::Failed(error_chain(&e)),
    }
}

/// An error with its causes (reqwest's own message alone says little).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

impl Worker {
    /// Runs until shutdown: then takes what the queue still holds into the
    /// outbox (so a durable outbox keeps it) and returns.
    pub async fn run(mut self) {
        let mut failures: u32 = 0;
        loop {
            self.take_ready();
            if *self.stop.borrow() {
                return self.stopping();
            }
            let Some(head) = self.outbox.front() else {
                tokio::select! {
                    q = self.rx.recv() => match q {
                        Some(q) => self.admit(q),
                        None => return self.stopping(),
                    },
                    // Set, or its sender gone: either way, stop.
                    _ = self.stop.changed() => return self.stopping(),
                }
                continue;
            };
            let now = crate::core::router::now_ms();
            if self.target.retry.expired(head.event.time_ms, now) {
                self.give_up_head(now);
                continue;
            }
            let event = head.event.clone();
            let started = Instant::now();
            let attempt = {
                let send = post(self.target.clone(), event);
                tokio::pin!(send);
                loop {
                    tokio::select! {
                        a = &mut send => break Some(a),
                        Some(q) = self.rx.recv() => self.admit(q),
                        _ = self.stop.changed() => break None,
                    }
                }
            };
            let Some(attempt) = attempt else { return self.stopping() };
            self.endpoint.metrics.attempt_seconds.record(started.elapsed().as_secs_f64());
            match attempt {
                Attempt::Delivered => {
                    failures = 0;
                    if let Some(p) = self.outbox.pop_front() {
                        self.endpoint.done(p.cost);
                        self.endpoint.metrics.delivered.increment(1);
                    }
                }
                Attempt::Failed(why) => {
                    failures = failures.saturating_add(1);
                    self.endpoint.metrics.retried.increment(1);
                    let wait = self.target.retry.backoff(failures, rand::random::<f64>());
                    // The first failure after a success is news; the rest
                    // of a run of failures is not.
                    if failures == 1 {
                        tracing::warn!(endpoint = %self.endpoint.name, error = %why, pending = self.outbox.len(),
                            "webhook delivery failed; retrying with back-off");
                    } else {
                        tracing::debug!(endpoint = %self.endpoint.name, error = %why, failures, ?wait,
                            "webhook delivery failed again");
                    }
                    if !self.back_off(wait).await {
                        return self.stopping();
                    }
                }
            }
        }
    }

    /// Waits `wait`, taking new events meanwhile; false at shutdown.
    async fn back_off(&mut self, wait: Duration) -> bool {
        let sleep = tokio::time::sleep(wait);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => return true,
                Some(q) = self.rx.recv() => self.admit(q),
                _ = self.stop.changed() => return false,
            }
        }
    }

    /// Encodes an event from the hot path into the outbox.
    fn admit(&mut self, q: Queued) {
        let id = delivery_id();
        match super::body::encode(&q.event, &id, &self.target.node) {
            Ok(body) => {
                // The bound counts what the body really takes from here on.
                let cost = body.len();
                if !self.endpoint.recount(q.cost, cost) {
                    self.endpoint.overflowed(q.event.kind, cost);
                    return;
                }
                let kind = q.event.kind.name().to_string();
                let stored = StoredEvent { id, kind, time_ms: q.event.time_ms, body: Bytes::from(body) };
                self.outbox.push(stored, cost);
            }
            Err(e) => {
                // Typed structs of strings: nothing serde_json refuses.
                tracing::error!(endpoint = %self.endpoint.name, error = %e, "cannot encode a webhook event; dropped");
                self.endpoint.done(q.cost);
            }
        }
    }

    /// Takes everything already queued, without waiting.
    fn take_ready(&mut self) {
        while let Ok(q) = self.rx.try_recv() {
            self.admit(q);
        }
    }

    fn give_up_head(&mut self, now: i64) {
        if let Some(p) = self.outbox.pop_front() {
            self.endpoint.done(p.cost);
            self.endpoint.metrics.dropped_expired.increment(1);
            tracing::warn!(
                endpoint = %self.endpoint.name,
                delivery = %p.event.id,
                r#type = %p.event.kind,
                age_ms = now.saturating_sub(p.event.time_ms),
                "webhook event dropped: not delivered within max_age"
            );
        }
    }

    /// At shutdown: the queue's events go into the outbox (and so to disk,
    /// when it is durable); what is left is reported.
    fn stopping(mut self) {
        self.rx.close();
        self.take_ready();
        if !self.outbox.is_empty() {
            let durable = self.outbox.durable();
            tracing::warn!(
                endpoint = %self.endpoint.name,
                pending = self.outbox.len(),
                durable,
                "webhook events not delivered at shutdown ({})",
                if durable { "kept on disk, sent after the restart" } else { "lost: the outbox is in memory" }
            );
        }
    }
}
