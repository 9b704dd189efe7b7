//! One endpoint's pending events, oldest first: in memory, and with
//! durable storage also in the store's `webhooks` keyspace, so they
//! survive a restart and SIGKILL.
//!
//! An event is written to the store when the endpoint's worker takes it
//! from the hot path's queue (within milliseconds of the event), and
//! removed once delivered or given up. The in-memory copy is what the
//! worker sends from; the store is read only at start. What this module
//! does not do: bound anything (the endpoint's counters do, before an
//! event gets here) or send anything.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use prost::Message as _;

use crate::core::engine::disk::DiskStore;

/// A pending event as stored: everything a delivery needs.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredEvent {
    /// The delivery id.
    #[prost(string, tag = "1")]
    pub id: String,
    /// The event type (`Switchboard-Event`).
    #[prost(string, tag = "2")]
    pub kind: String,
    /// Unix ms when the event happened (for `max_age`).
    #[prost(int64, tag = "3")]
    pub time_ms: i64,
    /// The JSON body, signed and sent as is.
    #[prost(bytes = "bytes", tag = "4")]
    pub body: Bytes,
}

/// One pending event.
#[derive(Debug, Clone)]
pub struct Pending {
    /// Its place in the endpoint's order (the store key's suffix).
    pub seq: u64,
    /// What is sent.
    pub event: StoredEvent,
    /// What it counts against the endpoint's byte bound.
    pub cost: usize,
}

/// The pending events of one endpoint (see the module docs).
pub struct Outbox {
    endpoint: String,
    queue: VecDeque<Pending>,
    store: Option<Arc<DiskStore>>,
    next_seq: u64,
}

impl Outbox {
    /// The outbox of `endpoint`, holding what the store kept for it
    /// (`stored`: (sequence, record), in order).
    pub fn new(endpoint: &str, store: Option<Arc<DiskStore>>, stored: Vec<(u64, Vec<u8>)>) -> Outbox {
        let mut queue = VecDeque::with_capacity(stored.len());
        for (seq, bytes) in stored {
            match StoredEvent::decode(bytes.as_slice()) {
                Ok(event) => {
                    let cost = event.body.len();
                    queue.push_back(Pending { seq, event, cost });
                }
                Err(e) => {
                    tracing::error!(endpoint, seq, error = %e, "a stored webhook event does not decode; dropped");
                    if let Some(store) = &store {
                        store.remove_webhook_event(endpoint, seq);
                    }
                }
            }
        }
        let next_seq = queue.back().map_or(1, |p| p.seq + 1);
        Outbox { endpoint: endpoint.to_string(), queue, store, next_seq }
    }

    /// Appends an event (written to the store first, when there is one: a
    /// failed store keeps it in memory only, and the store has logged why).
    pub fn push(&mut self, event: StoredEvent, cost: usize) {
        let seq = self.next_seq;
        self.next_seq += 1;
        if let Some(store) = &self.store {
            let _ = store.put_webhook_event(&self.endpoint, seq, &event.encode_to_vec());
        }
        self.queue.push_back(Pending { seq, event, cost });
    }

    /// The oldest pending event.
    pub fn front(&self) -> Option<&Pending> {
        self.queue.front()
    }

    /// Removes the oldest event (delivered or given up), from the store too.
    pub fn pop_front(&mut self) -> Option<Pending> {
        let p = self.queue.pop_front()?;
        if let Some(store) = &self.store {
            store.remove_webhook_event(&self.endpoint, p.seq);
        }
        Some(p)
    }

    /// Events pending.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Bytes the pending events count.
    pub fn cost(&self) -> usize {
        self.queue.iter().map(|p| p.cost).sum()
    }

    /// Whether the events are kept on disk.
    pub fn durable(&self) -> bool {
        self.store.is_some()
    }
}
