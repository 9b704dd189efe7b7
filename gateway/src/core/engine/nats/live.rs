//! Live fan-out from JetStream, by interest: each stream's one ordered
//! consumer on a node reads only the subjects the node's subscriptions need
//! (its [`Cover`]), and none at all while nothing local needs the stream.
//!
//! A subscription the consumer does not cover yet widens it: under the
//! stream's live lock the cover grows, the consumer's generation moves on
//! (what the old consumer still delivers is dropped), and a new consumer
//! starts right after the last message the node handed to its hub. Channels
//! the old cover did not reach get a *floor*, the stream's last sequence
//! when they were added: their messages up to it are the new subscriber's
//! replay, not live, so the new consumer hands them to the hub's bookkeeping
//! but not to subscribers. When subscriptions go, the cover narrows a little
//! later ([`NARROW_AFTER`]), and the channels it no longer reaches forget
//! what the consumer told about them.
//!
//! One consumer per stream takes every filter at once on NATS 2.10 and
//! newer (`filter_subjects`); NATS 2.9 takes one, so a node that needs more
//! than one subject filter of a stream there reads all of it, as it does
//! past [`MAX_FILTERS`] filters or with filters NATS would find overlapping.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use switchboard_protocols::port::Delivery;

use super::{Head, NatsEngine, Slot, UNSEEN, decode, subjects};
use crate::core::channel;

/// Most subject filters one consumer takes; a node that needs more reads
/// the whole stream.
const MAX_FILTERS: usize = 1000;

/// How long a cover stays wider than the node's subscriptions need before
/// it narrows (so a client that resubscribes at once does not cost two new
/// consumers).
pub const NARROW_AFTER: Duration = Duration::from_secs(2);

/// How often the consumer's task looks for a reconnect and a due narrowing.
const TICK: Duration = Duration::from_millis(250);

/// What a stream's consumer on this node reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cover {
    /// Nothing: no consumer runs.
    Nothing,
    /// The whole stream.
    All,
    /// These subject filters.
    Subjects(Filters),
}

/// A consumer's subject filters (sorted, none covering or overlapping
/// another), the literal ones also in a set: a message's subject is
/// checked against every message's cover.
#[derive(Debug, Clone)]
pub struct Filters {
    list: Vec<String>,
    literal: std::collections::HashSet<String>,
    wildcards: Vec<String>,
}

impl PartialEq for Filters {
    fn eq(&self, other: &Self) -> bool {
        self.list == other.list
    }
}

impl Eq for Filters {}

impl Filters {
    fn new(list: Vec<String>) -> Self {
        let literal = list.iter().filter(|f| !subjects::is_wildcard(f)).cloned().collect();
        let wildcards = list.iter().filter(|f| subjects::is_wildcard(f)).cloned().collect();
        Filters { list, literal, wildcards }
    }
}

impl Cover {
    /// Whether the consumer reads everything `filter` (a subject or subject
    /// filter) matches.
    pub fn covers(&self, filter: &str) -> bool {
        match self {
            Cover::Nothing => false,
            Cover::All => true,
            Cover::Subjects(s) => s.literal.contains(filter) || s.wildcards.iter().any(|f| subjects::covers(f, filter)),
        }
    }

    /// The filters, for a cover that is some.
    fn filters(&self) -> &[String] {
        match self {
            Cover::Subjects(s) => &s.list,
            _ => &[],
        }
    }
}

/// Channels a widening added, and up to where their messages are replay.
#[derive(Debug)]
struct Floor {
    /// The cover before: what it reached is live from the start.
    before: Cover,
    /// The stream's last sequence when the cover grew.
    at: u64,
}

/// A stream's live state on this node, under the stream's live lock: held
/// while the consumer hands a message to the hub and while a subscription
/// registers, so the two are ordered.
#[derive(Debug)]
pub struct Live {
    /// The last stream sequence this node's consumer read (of its cover).
    pub applied: u64,
    /// Bumped whenever the cover changes: a consumer of an older generation
    /// stops, and its messages are dropped.
    generation: u64,
    cover: Cover,
    floors: Vec<Floor>,
}

impl Live {
    /// The state of a stream whose last sequence is `last`, read by no one.
    pub fn new(last: u64) -> Self {
        Live { applied: last, generation: 0, cover: Cover::Nothing, floors: Vec::new() }
    }

    /// Up to where a subscriber of `subject` replays: later messages reach
    /// it live.
    pub fn bound(&self, subject: &str) -> u64 {
        self.floors.iter().filter(|f| !f.before.covers(subject)).fold(self.applied, |b, f| b.max(f.at))
    }

    /// Whether what the consumer told about `subject`'s channel is its head
    /// at [`Self::bound`].
    pub fn told(&self, subject: &str) -> bool {
        self.cover.covers(subject) && self.bound(subject) == self.applied
    }

    /// Moves to `cover`; `last` is the stream's last sequence now, up to
    /// which what the cover adds is replay.
    fn switch(&mut self, cover: Cover, last: u64) {
        self.generation += 1;
        let before = std::mem::replace(&mut self.cover, cover);
        match before {
            // Nothing was read and nothing is in flight: start from now.
            Cover::Nothing => self.applied = self.applied.max(last),
            before if last > self.applied => self.floors.push(Floor { before, at: last }),
            _ => {}
        }
    }
}

impl NatsEngine {
    /// The subject filters `filter` (a channel filter) needs of `slot`.
    fn subjects_of(&self, slot: &Arc<Slot>, filter: &str) -> Vec<String> {
        if channel::is_concrete(filter) {
            if Arc::ptr_eq(self.slot(filter), slot) { vec![slot.subject(filter)] } else { Vec::new() }
        } else {
            subjects::filter_subjects(&slot.root, filter)
        }
    }

    /// The cover `slot`'s consumer needs for the node's subscriptions now.
    fn wanted(&self, slot: &Arc<Slot>) -> Cover {
        let interest = self.hub.read().interest();
        let wanted: Vec<String> = interest.iter().flat_map(|f| self.subjects_of(slot, f)).collect();
        self.cover_of(slot, wanted)
    }

    /// The cover that reads `wanted` (subject filters).
    fn cover_of(&self, slot: &Arc<Slot>, wanted: Vec<String>) -> Cover {
        if wanted.is_empty() {
            return Cover::Nothing;
        }
        let all = format!("{}.>", slot.root);
        match subjects::disjoint(wanted) {
            Some(s) if s.contains(&all) => Cover::All,
            Some(s) if s.len() == 1 || (s.len() <= MAX_FILTERS && self.many_filters()) => {
                Cover::Subjects(Filters::new(s))
            }
            _ => Cover::All,
        }
    }

    /// Whether the NATS server takes several filters per consumer (2.10+).
    fn many_filters(&self) -> bool {
        let info = self.client.server_info();
        let mut v = info.version.split('.').map(|n| n.parse::<u32>().unwrap_or(0));
        (v.next().unwrap_or(0), v.next().unwrap_or(0)) >= (2, 10)
    }

    /// For each stream, its last sequence when its consumer does not cover
    /// all that `filters` need yet (the floor a widening will take).
    pub(super) async fn lasts(
        &self,
        filters: &[&str],
    ) -> Result<Vec<Option<u64>>, switchboard_protocols::port::CoreError> {
        let mut out = Vec::with_capacity(self.slots.len());
        for slot in &self.slots {
            let need: Vec<String> = filters.iter().flat_map(|f| self.subjects_of(slot, f)).collect();
            let covered = {
                let live = slot.live.lock();
                need.iter().all(|s| live.cover.covers(s))
            };
            out.push(if covered {
                None
            } else {
                let mut stream = slot.stream.clone();
                Some(stream.info().await.map_err(super::unavailable)?.state.last_sequence)
            });
        }
        Ok(out)
    }

    /// Widens the consumers of the streams (whose live locks the caller
    /// holds, one guard per slot) to cover `filters`; `lasts` from
    /// [`Self::lasts`].
    pub(super) fn widen(
        &self,
        lives: &mut [parking_lot::MutexGuard<'_, Live>],
        filters: &[&str],
        lasts: &[Option<u64>],
    ) {
        for (i, slot) in self.slots.iter().enumerate() {
            let live = &mut lives[i];
            let need: Vec<String> = filters.iter().flat_map(|f| self.subjects_of(slot, f)).collect();
            if need.iter().all(|s| live.cover.covers(s)) {
                continue;
            }
            // Widening adds to what the cover reads (the node's other
            // subscriptions are in it already); only narrowing drops
            // subjects, and forgets what the consumer told of them. So a
            // subscribe costs no walk over every subscription.
            let mut wanted = live.cover.filters().to_vec();
            wanted.extend(need);
            let cover = self.cover_of(slot, wanted);
            // Without a fresh last sequence (the cover shrank meanwhile),
            // the consumer's own position is the floor: still exact, only
            // older.
            let last = lasts[i].unwrap_or(live.applied);
            tracing::debug!(stream = %slot.root, ?cover, last, "live consumer widens");
            live.switch(cover, last);
            slot.wake.notify_one();
        }
    }

    /// Narrows `slot`'s consumer to what the node's subscriptions need now;
    /// the channels it no longer reads forget what it told about them.
    fn narrow(&self, slot: &Arc<Slot>) {
        let mut live = slot.live.lock();
        let cover = self.wanted(slot);
        if cover == live.cover {
            return;
        }
        tracing::debug!(stream = %slot.root, ?cover, "live consumer narrows");
        let applied = live.applied;
        live.switch(cover, applied);
        for (name, head) in self.heads.lock().iter() {
            if Arc::ptr_eq(self.slot(name), slot) && !live.cover.covers(&slot.subject(name)) {
                head.seen.store(UNSEEN, Ordering::Release);
                // Its last serial is no longer kept up to date either.
                head.known.store(false, Ordering::Release);
                let freed: u64 = head.recent.lock().drain(..).map(|d| d.size as u64).sum();
                self.recent_bytes.fetch_sub(freed, Ordering::AcqRel);
            }
        }
        drop(live);
        slot.wake.notify_one();
    }

    /// Notes that subscriptions went: every stream's cover may narrow.
    pub(super) fn interest_dropped(&self) {
        for slot in &self.slots {
            slot.narrow.store(true, Ordering::Release);
        }
    }

    /// Reads one stream's cover from where this node stopped and hands each
    /// message to the hub, for as long as the engine lives; a new consumer
    /// whenever the cover changes, and after errors.
    pub(super) async fn run_live(engine: std::sync::Weak<Self>, slot: Arc<Slot>) {
        use async_nats::jetstream::consumer::{DeliverPolicy, push};
        let mut backoff = Duration::from_millis(100);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut narrow_at: Option<tokio::time::Instant> = None;
        loop {
            let Some(e) = engine.upgrade() else { return };
            let (generation, cover, start) = {
                let live = slot.live.lock();
                (live.generation, live.cover.clone(), live.applied + 1)
            };
            let (filter_subject, filter_subjects) = match &cover {
                Cover::Nothing => {
                    *e.live_failure.lock() = None;
                    drop(e);
                    slot.wake.notified().await;
                    continue;
                }
                Cover::All => (format!("{}.>", slot.root), Vec::new()),
                Cover::Subjects(s) if s.list.len() == 1 => (s.list[0].clone(), Vec::new()),
                Cover::Subjects(s) => (String::new(), s.list.clone()),
            };
            metrics::counter!("switchboard_nats_consumers_started_total", "stream" => slot.root.clone()).increment(1);
            let connects = e.connects.load(Ordering::Acquire);
            let consumer = slot
                .stream
                .create_consumer(push::OrderedConfig {
                    deliver_subject: e.client.new_inbox(),
                    filter_subject,
                    filter_subjects,
                    deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: start },
                    ..Default::default()
                })
                .await
                .map_err(|x| x.to_string());
            let messages = match consumer {
                Ok(c) => c.messages().await.map_err(|x| x.to_string()),
                Err(x) => Err(x),
            };
            let mut messages = match messages {
                Ok(m) => m,
                Err(x) => {
                    tracing::warn!(stream = %slot.root, error = %x, "live consumer: cannot start; retrying");
                    *e.live_failure.lock() = Some(format!("live consumer of {}: {x}", slot.root));
                    drop(e);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            *e.live_failure.lock() = None;
            backoff = Duration::from_millis(100);
            drop(e);
            loop {
                tokio::select! {
                    m = messages.next() => {
                        let Some(e) = engine.upgrade() else { return };
                        match m {
                            Some(Ok(m)) => match m.info() {
                                Ok(info) => {
                                    if !e.apply(&slot, generation, info.stream_sequence, &m.subject, &m.payload) {
                                        break;
                                    }
                                }
                                Err(x) => tracing::warn!(error = %x, "live consumer: a message without its info"),
                            },
                            Some(Err(x)) => {
                                tracing::warn!(stream = %slot.root, error = %x, "live consumer interrupted; resuming");
                                tokio::time::sleep(backoff).await;
                                break;
                            }
                            None => break,
                        }
                    }
                    _ = slot.wake.notified() => {
                        if slot.live.lock().generation != generation {
                            break;
                        }
                    }
                    now = tick.tick() => {
                        let Some(e) = engine.upgrade() else { return };
                        // After a reconnect the client would remake the
                        // consumer itself, backing off up to 10 s a try.
                        if e.connects.load(Ordering::Acquire) != connects {
                            tracing::info!(stream = %slot.root, "NATS reconnected: a new live consumer");
                            break;
                        }
                        if slot.narrow.swap(false, Ordering::AcqRel) {
                            narrow_at.get_or_insert(now + NARROW_AFTER);
                        }
                        if narrow_at.is_some_and(|at| at <= now) {
                            narrow_at = None;
                            e.narrow(&slot);
                        }
                    }
                }
            }
        }
    }

    /// Hands one message the consumer of `generation` read to the hub,
    /// once, in stream order; false once that consumer is outdated.
    fn apply(&self, slot: &Slot, generation: u64, sequence: u64, subject: &str, payload: &[u8]) -> bool {
        let mut live = slot.live.lock();
        if live.generation != generation {
            return false;
        }
        if sequence <= live.applied {
            return true;
        }
        live.applied = sequence;
        // A server that ignores `filter_subjects` (2.9, in a cluster being
        // upgraded) sends the whole stream: what the cover does not name is
        // not this node's, and must not leave a `seen` that goes stale.
        if !live.cover.covers(subject) {
            return true;
        }
        let replayed = live.floors.iter().any(|f| sequence <= f.at && !f.before.covers(subject));
        if !live.floors.is_empty() {
            live.floors.retain(|f| f.at > sequence);
        }
        metrics::counter!("switchboard_nats_live_messages_total").increment(1);
        let Some(mut env) = decode(slot, sequence, payload) else {
            tracing::warn!(stream = %slot.root, sequence, "live consumer: not an envelope; skipped");
            return true;
        };
        let head: Arc<Head> = self.head(&env.channel);
        // The previous message is the one this consumer read before on the
        // channel, whatever the publisher expected.
        let seen = head.seen.swap(sequence, Ordering::AcqRel);
        if seen != UNSEEN {
            env.prev_serial = seen;
        }
        head.last.fetch_max(sequence, Ordering::AcqRel);
        head.known.store(true, Ordering::Release);
        let from = env
            .publisher
            .as_ref()
            .filter(|p| p.node == self.cfg.node)
            .and_then(|p| self.conns.lock().get(p.connection_id.as_str()).copied())
            .unwrap_or(0);
        let policy = self.cfg.policy_for(&env.channel).slow_policy;
        let delivery = Delivery::new(env);
        self.remember(slot, &head, &delivery);
        if !replayed {
            self.hub.read().fanout(&delivery, policy, from);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floors_bound_what_a_widening_added() {
        let mut live = Live::new(10);
        assert_eq!(live.bound("r.a"), 10);
        // From nothing: starts at the stream's last sequence.
        let subjects = |s: &[&str]| Cover::Subjects(Filters::new(s.iter().map(|x| x.to_string()).collect()));
        live.switch(subjects(&["r.a"]), 15);
        assert_eq!((live.applied, live.bound("r.a")), (15, 15));
        assert!(live.told("r.a") && !live.told("r.b"));
        // r.b is added while the consumer is behind: its messages up to 20
        // are replay; r.a's stay live.
        live.switch(subjects(&["r.a", "r.b"]), 20);
        assert_eq!((live.bound("r.a"), live.bound("r.b")), (15, 20));
        assert!(live.told("r.a") && !live.told("r.b"));
        // Narrowing adds no floor.
        live.switch(subjects(&["r.b"]), 15);
        assert_eq!(live.floors.len(), 1);
    }
}
