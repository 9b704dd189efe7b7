//! MQTT session and link state, without I/O and without a clock.
//!
//! [`SessionState`] is what survives a reconnect when the session is
//! persistent (MQTT 3.1.1 §3.1.2.4, MQTT 5 §4.1): subscriptions, the last
//! delivered position of every channel, outbound QoS 1/2 messages in flight,
//! inbound QoS 2 packet ids awaiting PUBREL, and the gaps the client has not
//! been told of yet (each travels on the next message of its channel).
//! [`Keepalive`], [`InboundAliases`], [`OutboundAliases`] and
//! [`will_action`] are per network connection. Inputs are `handle_*`/`on_*` methods that take time
//! (`now`, `now_ms`) as arguments; outputs are return values the connection
//! turns into packets. Everything here is unit-tested without sockets or
//! sleeps.
//!
//! It deliberately does not encode packets, talk to the core, or decide
//! reason codes for the wire: the connection does.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use switchboard_proto as proto;
use switchboard_proto::topic::filter_matches;
use tokio::time::Instant;

use crate::port::Delivery;

/// One subscription of the session, with its MQTT options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// The filter as the client sent it (`$share/g/f` kept whole).
    pub filter: String,
    /// Maximum QoS granted.
    pub qos: u8,
    /// MQTT 5 no local (§3.8.3.1).
    pub no_local: bool,
    /// MQTT 5 retain as published.
    pub retain_as_published: bool,
    /// MQTT 5 subscription identifier (§3.8.2.1.2).
    pub id: Option<u32>,
}

impl Subscription {
    /// The filter that channels are matched against: shared subscriptions
    /// `$share/{group}/{filter}` match on their inner filter (MQTT 5 §4.8.2).
    pub fn match_filter(&self) -> &str {
        shared_inner(&self.filter).unwrap_or(&self.filter)
    }
}

/// The inner filter of `$share/{group}/{filter}`, if `filter` is shared.
pub fn shared_inner(filter: &str) -> Option<&str> {
    switchboard_proto::topic::parse_shared(filter).map(|(_group, inner)| inner)
}

/// How a delivery goes out, decided from every subscription that matches
/// its channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The highest QoS among the matching subscriptions (MQTT 5 §3.3.4: a
    /// server may deliver once with the maximum QoS of overlapping ones).
    pub qos: u8,
    /// Any match asked for retain-as-published.
    pub retain_as_published: bool,
    /// Every matching subscription identifier (MQTT 5 §3.3.4).
    pub ids: Vec<u32>,
}

/// Matches `channel` against the session's own filters.
pub fn route(subs: &[Subscription], channel: &str) -> Option<Route> {
    let mut out: Option<Route> = None;
    for s in subs.iter().filter(|s| filter_matches(s.match_filter(), channel)) {
        let r = out.get_or_insert(Route { qos: 0, retain_as_published: false, ids: Vec::new() });
        r.qos = r.qos.max(s.qos);
        r.retain_as_published |= s.retain_as_published;
        if let Some(id) = s.id {
            r.ids.push(id);
        }
    }
    out
}

/// The QoS a delivery goes out at: the publisher's (unset = 2, for
/// publishes the gateway acknowledged itself) capped by the subscription's
/// (MQTT 3.1.1 §3.8.4, MQTT 5 §3.8.4).
pub fn effective_qos(publisher: Option<u32>, subscription: u8) -> u8 {
    let p = publisher.map_or(2, |q| q.min(2) as u8);
    p.min(subscription)
}

/// Where an outbound QoS 1/2 message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowState {
    /// PUBLISH sent; waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Published,
    /// PUBREL sent; waiting for PUBCOMP (QoS 2).
    Released,
}

/// A message waiting to be sent or in flight.
#[derive(Debug, Clone)]
pub struct Queued {
    /// The shared delivery.
    pub delivery: Arc<Delivery>,
    /// QoS it goes out at.
    pub qos: u8,
    /// The RETAIN flag it goes out with.
    pub retain: bool,
    /// Subscription identifiers to attach.
    pub sub_ids: Vec<u32>,
    /// Why messages of this channel were missed just before this one (a
    /// gap's reason: `trimmed`, `epoch_changed`, `too_large`); set when the
    /// message is moved out to be sent, so that a resend carries it too.
    pub gap: Option<String>,
}

/// What the connection decided about a waiting message before sending it
/// (see [`SessionState::poll_transmit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send it.
    Send,
    /// Drop it; the client misses nothing it should hear of (its message
    /// expiry passed: the publisher asked for that).
    Skip,
    /// Drop it and tell the client: the channel's next message sent carries
    /// a gap with this reason (e.g. `too_large`: over the client's Maximum
    /// Packet Size, which MQTT 5 §3.1.2.11.4 requires us to discard).
    Discard(&'static str),
}

/// An outbound QoS 1/2 message in flight.
#[derive(Debug, Clone)]
pub struct Inflight {
    /// Packet id.
    pub pkid: u16,
    /// The message.
    pub msg: Queued,
    /// Protocol state.
    pub state: FlowState,
}

/// What to write for a message.
#[derive(Debug, Clone)]
pub enum Transmit {
    /// A PUBLISH (pkid 0 for QoS 0).
    Publish {
        /// Packet id.
        pkid: u16,
        /// Redelivery (session resume).
        dup: bool,
        /// The message.
        msg: Queued,
    },
    /// A PUBREL to resend on resume (QoS 2 past PUBREC: MQTT 5 §4.4).
    PubRel(u16),
}

/// The per-connection queue overflowed its byte bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("outbound queue over {0} bytes")]
pub struct Overflow(pub usize);

/// State that outlives a network connection when the session persists.
#[derive(Debug, Default)]
pub struct SessionState {
    /// Subscriptions in the order they were made.
    pub subs: Vec<Subscription>,
    /// High-water mark per channel: the newest message queued to this
    /// client. Anything at or below it is a duplicate (overlapping filters,
    /// a replay overlapping live messages, a resume).
    pub delivered: HashMap<String, proto::Position>,
    /// Last packet id handed out; ids cycle 1..=65535.
    last_pkid: u16,
    /// Outbound QoS 1/2 messages in flight, oldest first.
    inflight: VecDeque<Inflight>,
    /// Inbound QoS 2 packet ids between PUBREC and PUBREL: a PUBLISH with
    /// one of these ids is a retransmission and is not published again.
    inbound_qos2: HashSet<u16>,
    /// Deliveries waiting for an inflight slot (not persisted: they are
    /// replayed from history after a resume).
    pending: VecDeque<Queued>,
    /// Channels with a gap not yet told to the client → the gap's reason.
    /// The channel's next message sent takes it ([`Queued::gap`]).
    gaps: HashMap<String, String>,
    pending_bytes: usize,
    /// Per channel, the newest QoS 1/2 message handed to the network, so a
    /// stored session knows what the client may already hold.
    sent: HashMap<String, proto::Position>,
    /// Per channel, what the connection before a crash may have sent: a
    /// resumed session sends these again with DUP (MQTT's redelivery of an
    /// unacknowledged message), not as new messages.
    redeliver: HashMap<String, proto::Position>,
    /// Something a checkpoint records changed since the last
    /// [`SessionState::take_changed`].
    changed: bool,
}

/// A subscription as stored.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SubscriptionRecord {
    /// The filter.
    #[prost(string, tag = "1")]
    pub filter: String,
    /// Maximum QoS granted.
    #[prost(uint32, tag = "2")]
    pub qos: u32,
    /// MQTT 5 no local.
    #[prost(bool, tag = "3")]
    pub no_local: bool,
    /// MQTT 5 retain as published.
    #[prost(bool, tag = "4")]
    pub retain_as_published: bool,
    /// MQTT 5 subscription identifier.
    #[prost(uint32, optional, tag = "5")]
    pub id: Option<u32>,
}

/// What of a session is written to disk (see [`super::store`]): enough to
/// resume after a restart with nothing lost. Messages queued or in flight
/// are not stored; the positions stop short of them, so the resume replays
/// them from history (QoS 1/2 messages unacknowledged at a crash come again
/// as new publishes).
#[derive(Clone, PartialEq, prost::Message)]
pub struct SessionRecord {
    /// Subscriptions in the order they were made.
    #[prost(message, repeated, tag = "1")]
    pub subs: Vec<SubscriptionRecord>,
    /// Per channel, the newest position the client has acknowledged (or
    /// was sent at QoS 0).
    #[prost(btree_map = "string, message", tag = "2")]
    pub delivered: BTreeMap<String, proto::Position>,
    /// Inbound QoS 2 packet ids awaiting PUBREL.
    #[prost(uint32, repeated, tag = "3")]
    pub inbound_qos2: Vec<u32>,
    /// Gaps not yet told to the client: channel → reason (also those of
    /// messages in flight, which a resume replays as new publishes).
    #[prost(btree_map = "string, string", tag = "4")]
    pub gaps: BTreeMap<String, String>,
    /// Per channel, the newest QoS 1/2 message that may have reached the
    /// client: replayed after a resume, those up to it go out with DUP.
    #[prost(btree_map = "string, message", tag = "5")]
    pub sent: BTreeMap<String, proto::Position>,
}

impl SessionState {
    /// Whether anything a checkpoint records changed since the last call;
    /// clears the mark.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// The state as stored (see [`SessionRecord`]).
    pub fn to_record(&self) -> SessionRecord {
        let mut delivered: BTreeMap<String, proto::Position> =
            self.delivered.iter().map(|(c, p)| (c.clone(), p.clone())).collect();
        // Stop short of the first message of each channel not yet done with.
        let unfinished = self.inflight.iter().map(|f| &f.msg).chain(self.pending.iter());
        let mut seen = HashSet::new();
        let mut gaps: BTreeMap<String, String> = self.gaps.iter().map(|(c, r)| (c.clone(), r.clone())).collect();
        for q in unfinished {
            let env = &q.delivery.envelope;
            if seen.insert(env.channel.as_str())
                && let Some(p) = delivered.get_mut(&env.channel)
                && p.epoch == env.epoch
            {
                p.serial = p.serial.min(env.prev_serial);
            }
            if let Some(reason) = &q.gap {
                gaps.entry(env.channel.clone()).or_insert_with(|| reason.clone());
            }
        }
        let mut sent: BTreeMap<String, proto::Position> =
            self.redeliver.iter().map(|(c, p)| (c.clone(), p.clone())).collect();
        for (c, p) in &self.sent {
            match sent.get_mut(c) {
                Some(old) if old.epoch == p.epoch && old.serial >= p.serial => {}
                _ => {
                    sent.insert(c.clone(), p.clone());
                }
            }
        }
        SessionRecord {
            sent,
            subs: self
                .subs
                .iter()
                .map(|s| SubscriptionRecord {
                    filter: s.filter.clone(),
                    qos: s.qos.into(),
                    no_local: s.no_local,
                    retain_as_published: s.retain_as_published,
                    id: s.id,
                })
                .collect(),
            delivered,
            inbound_qos2: self.inbound_qos2.iter().map(|&id| id.into()).collect(),
            gaps,
        }
    }

    /// A session resumed from its record (nothing in flight).
    pub fn from_record(r: SessionRecord) -> SessionState {
        SessionState {
            subs: r
                .subs
                .into_iter()
                .map(|s| Subscription {
                    filter: s.filter,
                    qos: s.qos.min(2) as u8,
                    no_local: s.no_local,
                    retain_as_published: s.retain_as_published,
                    id: s.id,
                })
                .collect(),
            delivered: r.delivered.into_iter().collect(),
            inbound_qos2: r.inbound_qos2.into_iter().filter_map(|id| u16::try_from(id).ok()).collect(),
            gaps: r.gaps.into_iter().collect(),
            redeliver: r.sent.into_iter().collect(),
            ..SessionState::default()
        }
    }

    /// Adds or replaces (same filter: MQTT 3.1.1 §3.8.4) a subscription.
    /// Returns true if it is new (for retain handling 1).
    pub fn subscribe(&mut self, sub: Subscription) -> bool {
        self.changed = true;
        match self.subs.iter_mut().find(|s| s.filter == sub.filter) {
            Some(s) => {
                *s = sub;
                false
            }
            None => {
                self.subs.push(sub);
                true
            }
        }
    }

    /// Removes a subscription; false if there was none.
    pub fn unsubscribe(&mut self, filter: &str) -> bool {
        self.changed = true;
        let before = self.subs.len();
        self.subs.retain(|s| s.filter != filter);
        self.subs.len() != before
    }

    /// Positions of the delivered channels a filter matches, for
    /// `Subscribe.positions` on resume.
    pub fn positions_for(&self, filter: &str) -> BTreeMap<String, proto::Position> {
        let inner = shared_inner(filter).unwrap_or(filter);
        self.delivered.iter().filter(|(ch, _)| filter_matches(inner, ch)).map(|(c, p)| (c.clone(), p.clone())).collect()
    }

    /// Whether `env` is at or below this channel's high-water mark.
    pub fn is_duplicate(&self, env: &proto::Envelope) -> bool {
        self.delivered.get(&env.channel).is_some_and(|p| p.epoch == env.epoch && env.serial <= p.serial)
    }

    /// Raises the channel's high-water mark (never lowers it within an
    /// epoch).
    pub fn advance(&mut self, channel: &str, epoch: &str, serial: u64) {
        self.changed = true;
        match self.delivered.get_mut(channel) {
            Some(p) if p.epoch == epoch => p.serial = p.serial.max(serial),
            Some(p) => {
                p.epoch = epoch.to_string();
                p.serial = serial;
            }
            None => {
                self.delivered.insert(channel.to_string(), proto::Position { epoch: epoch.into(), serial });
            }
        }
    }

    /// A gap on `channel` (history could not fill a resume; `to` is where
    /// delivery continues after): the high-water mark moves to `to`, and
    /// the channel's next message sent tells the client (the first reason
    /// stands until then).
    pub fn handle_gap(&mut self, channel: &str, reason: &str, to: Option<&proto::Position>) {
        self.changed = true;
        if let Some(to) = to {
            self.advance(channel, &to.epoch, to.serial);
        }
        self.gaps.entry(channel.to_string()).or_insert_with(|| reason.to_string());
    }

    /// Gaps not yet told to the client, by channel.
    pub fn pending_gaps(&self) -> &HashMap<String, String> {
        &self.gaps
    }

    /// Queues a delivery behind what is already waiting. `max_bytes` bounds
    /// the queue: overflow is the slow-consumer path, never growth.
    pub fn handle_delivery(&mut self, msg: Queued, max_bytes: usize) -> Result<(), Overflow> {
        let size = msg.delivery.size;
        if self.pending_bytes + size > max_bytes {
            return Err(Overflow(max_bytes));
        }
        let env = &msg.delivery.envelope;
        self.advance(&env.channel, &env.epoch, env.serial);
        self.pending_bytes += size;
        self.pending.push_back(msg);
        Ok(())
    }

    /// Messages waiting for a slot.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Outbound messages in flight.
    pub fn inflight_len(&self) -> usize {
        self.inflight.len()
    }

    /// The next free packet id (skipping ids still in flight; MQTT 3.1.1
    /// §2.3.1: an id is reusable only after its flow completed).
    fn next_pkid(&mut self) -> u16 {
        loop {
            self.last_pkid = if self.last_pkid == u16::MAX { 1 } else { self.last_pkid + 1 };
            let id = self.last_pkid;
            if !self.inflight.iter().any(|f| f.pkid == id) {
                return id;
            }
        }
    }

    /// Moves waiting messages out, in order, while fewer than `window`
    /// QoS 1/2 messages are in flight. `keep` is asked about each message
    /// first (expired, or larger than the client accepts), with the gap it
    /// would carry already in [`Queued::gap`]: see [`Verdict`].
    pub fn poll_transmit(&mut self, window: usize, mut keep: impl FnMut(&Queued) -> Verdict) -> Vec<Transmit> {
        // At most 65535 ids exist.
        let window = window.clamp(1, usize::from(u16::MAX));
        let mut out = Vec::new();
        while let Some(front) = self.pending.front() {
            if front.qos > 0 && self.inflight.len() >= window {
                break;
            }
            let mut msg = self.pending.pop_front().expect("front exists");
            self.pending_bytes -= msg.delivery.size;
            if !self.gaps.is_empty() {
                msg.gap = self.gaps.get(&msg.delivery.envelope.channel).cloned();
            }
            match keep(&msg) {
                Verdict::Send => {
                    if msg.gap.is_some() {
                        self.gaps.remove(&msg.delivery.envelope.channel);
                        self.changed = true;
                    }
                }
                Verdict::Skip => continue,
                Verdict::Discard(reason) => {
                    self.handle_gap(&msg.delivery.envelope.channel, reason, None);
                    continue;
                }
            }
            if msg.qos == 0 {
                out.push(Transmit::Publish { pkid: 0, dup: false, msg });
                continue;
            }
            let pkid = self.next_pkid();
            let env = &msg.delivery.envelope;
            let dup = self.redeliver.get(&env.channel).is_some_and(|p| p.epoch == env.epoch && env.serial <= p.serial);
            let newer = self.sent.get(&env.channel).is_none_or(|p| p.epoch != env.epoch || p.serial < env.serial);
            if newer {
                let pos = proto::Position { epoch: env.epoch.clone(), serial: env.serial };
                self.sent.insert(env.channel.clone(), pos);
                self.changed = true;
            }
            self.inflight.push_back(Inflight { pkid, msg: msg.clone(), state: FlowState::Published });
            out.push(Transmit::Publish { pkid, dup, msg });
        }
        out
    }

    /// PUBACK: completes a QoS 1 flow. False if the id is unknown (a
    /// protocol error that is logged and ignored, as most brokers do).
    pub fn handle_puback(&mut self, pkid: u16) -> bool {
        self.changed = true;
        let pos =
            self.inflight.iter().position(|f| f.pkid == pkid && f.msg.qos == 1 && f.state == FlowState::Published);
        pos.map(|i| self.inflight.remove(i)).is_some()
    }

    /// PUBREC: a QoS 2 flow moves to PUBREL (MQTT 5 §4.3.3). Returns whether
    /// to send PUBREL. A PUBREC with a failure reason ends the flow.
    pub fn handle_pubrec(&mut self, pkid: u16, failed: bool) -> bool {
        let Some(i) = self.inflight.iter().position(|f| f.pkid == pkid && f.msg.qos == 2) else {
            // Unknown id: MQTT 5 §4.3.3 still expects a PUBREL (reason 0x92);
            // answering keeps a confused client's flow moving.
            return !failed;
        };
        if failed {
            self.inflight.remove(i);
            return false;
        }
        self.inflight[i].state = FlowState::Released;
        true
    }

    /// PUBCOMP: completes a QoS 2 flow.
    pub fn handle_pubcomp(&mut self, pkid: u16) -> bool {
        self.changed = true;
        let pos = self.inflight.iter().position(|f| f.pkid == pkid && f.state == FlowState::Released);
        pos.map(|i| self.inflight.remove(i)).is_some()
    }

    /// An inbound QoS 2 PUBLISH: true if it is new and must be published;
    /// false for a retransmission before PUBREL (MQTT 3.1.1 §4.3.3 method B:
    /// the id is kept until PUBREL, so the message goes out exactly once).
    pub fn handle_inbound_qos2(&mut self, pkid: u16) -> bool {
        self.changed = true;
        self.inbound_qos2.insert(pkid)
    }

    /// Forgets an inbound QoS 2 id whose publish failed (the PUBREC carried
    /// a failure, so no PUBREL follows).
    pub fn forget_inbound_qos2(&mut self, pkid: u16) {
        self.inbound_qos2.remove(&pkid);
    }

    /// PUBREL: releases an inbound QoS 2 id. PUBCOMP is sent either way
    /// (MQTT 5 §4.3.3: reason 0x92 for an unknown id; 3.1.1 has no reason).
    pub fn handle_pubrel(&mut self, pkid: u16) -> bool {
        self.changed = true;
        self.inbound_qos2.remove(&pkid)
    }

    /// Inbound QoS 2 ids awaiting PUBREL.
    pub fn inbound_qos2_len(&self) -> usize {
        self.inbound_qos2.len()
    }

    /// On resume: every inflight message again, oldest first, as PUBLISH
    /// with DUP=1 or as PUBREL when past PUBREC (MQTT 3.1.1 §4.4, MQTT 5
    /// §4.4).
    pub fn resend(&self) -> Vec<Transmit> {
        self.inflight
            .iter()
            .map(|f| match f.state {
                FlowState::Published => Transmit::Publish { pkid: f.pkid, dup: true, msg: f.msg.clone() },
                FlowState::Released => Transmit::PubRel(f.pkid),
            })
            .collect()
    }

    /// Prepares the state for storage when the connection ends: waiting
    /// messages are dropped and each channel's high-water mark is lowered
    /// to just before its first dropped message, so the resume replays them
    /// from history instead of losing them.
    pub fn detach(&mut self) {
        let mut seen = HashSet::new();
        for q in self.pending.drain(..) {
            let env = &q.delivery.envelope;
            if seen.insert(env.channel.clone())
                && let Some(p) = self.delivered.get_mut(&env.channel)
                && p.epoch == env.epoch
            {
                p.serial = env.prev_serial;
            }
        }
        self.pending_bytes = 0;
    }
}

/// The keepalive rule: a client silent for 1.5 × its keep alive is gone
/// (MQTT 3.1.1 §3.1.2.10, MQTT 5 §3.1.2.10). Zero disables it.
#[derive(Debug, Clone, Copy)]
pub struct Keepalive {
    interval: Duration,
    last: Instant,
}

impl Keepalive {
    /// Starts at `now` with `secs` seconds (0 = never expires).
    pub fn new(secs: u16, now: Instant) -> Self {
        Keepalive { interval: Duration::from_secs(secs.into()), last: now }
    }

    /// Any packet from the client resets the clock.
    pub fn handle_packet(&mut self, now: Instant) {
        self.last = now;
    }

    /// When the client is overdue, if ever.
    pub fn deadline(&self) -> Option<Instant> {
        (!self.interval.is_zero()).then(|| self.last + self.interval * 3 / 2)
    }

    /// Whether the client is overdue at `now`.
    pub fn expired(&self, now: Instant) -> bool {
        self.deadline().is_some_and(|d| now >= d)
    }
}

/// Why a topic alias was refused (MQTT 5 §3.3.2.3.4: DISCONNECT 0x94).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AliasError {
    /// Alias 0 or above the maximum we announced.
    #[error("topic alias {0} out of range")]
    OutOfRange(u16),
    /// An empty topic with an alias never set on this connection.
    #[error("topic alias {0} is not set")]
    Unknown(u16),
}

/// Inbound topic aliases: the client's alias → topic map, per connection.
/// The map is boxed and made on first use: most connections never use
/// aliases, and every connection holds this.
#[derive(Debug, Default)]
pub struct InboundAliases {
    max: u16,
    #[allow(clippy::box_collection)] // 8 bytes inline instead of 48, on purpose
    map: Option<Box<HashMap<u16, String>>>,
}

impl InboundAliases {
    /// Accepts aliases 1..=max (the Topic Alias Maximum we announced).
    pub fn new(max: u16) -> Self {
        InboundAliases { max, map: None }
    }

    /// The topic of a PUBLISH: sets the alias when both are given, looks it
    /// up when the topic is empty.
    pub fn resolve(&mut self, topic: &str, alias: Option<u16>) -> Result<String, AliasError> {
        let Some(a) = alias else { return Ok(topic.to_string()) };
        if a == 0 || a > self.max {
            return Err(AliasError::OutOfRange(a));
        }
        if topic.is_empty() {
            return self.map.as_ref().and_then(|m| m.get(&a)).cloned().ok_or(AliasError::Unknown(a));
        }
        self.map.get_or_insert_default().insert(a, topic.to_string());
        Ok(topic.to_string())
    }
}

/// How an outbound PUBLISH names its topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AliasUse {
    /// Topic only (no aliases, or the table is full).
    None,
    /// Topic and a newly assigned alias.
    New(u16),
    /// Alias only, with an empty topic.
    Existing(u16),
}

/// Outbound topic aliases, up to the client's Topic Alias Maximum. First
/// come first served; once full, further topics go without an alias (a
/// replacement policy would save bytes for hot topics, but most traffic is
/// on few topics).
/// Boxed and made on first use, as [`InboundAliases`].
#[derive(Debug, Default)]
pub struct OutboundAliases {
    max: u16,
    #[allow(clippy::box_collection)] // as above
    map: Option<Box<HashMap<String, u16>>>,
}

impl OutboundAliases {
    /// At most `max` aliases (0 = none).
    pub fn new(max: u16) -> Self {
        OutboundAliases { max, map: None }
    }

    /// The alias [`OutboundAliases::assign`] would use for `topic`, without
    /// recording it: a PUBLISH is sized before it is known to be sent.
    pub fn peek(&self, topic: &str) -> AliasUse {
        if self.max == 0 {
            return AliasUse::None;
        }
        let len = match &self.map {
            Some(map) => match map.get(topic) {
                Some(&a) => return AliasUse::Existing(a),
                None => map.len(),
            },
            None => 0,
        };
        if len >= usize::from(self.max) {
            return AliasUse::None;
        }
        AliasUse::New(len as u16 + 1)
    }

    /// The alias to use for `topic`; a new one is recorded (the PUBLISH that
    /// carries it must then be sent).
    pub fn assign(&mut self, topic: &str) -> AliasUse {
        let alias = self.peek(topic);
        if let AliasUse::New(a) = alias {
            self.map.get_or_insert_default().insert(topic.to_string(), a);
        }
        alias
    }
}

/// How a connection ended, for the will.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// DISCONNECT with reason 0x00 (or any 3.1.1 DISCONNECT).
    CleanDisconnect,
    /// MQTT 5 DISCONNECT 0x04 "disconnect with will message".
    DisconnectWithWill,
    /// Network failure, keepalive timeout, protocol error, server close.
    Abrupt,
    /// Another connection took the session over.
    TakenOver,
}

/// What to do with the will at the end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WillAction {
    /// Discard it (MQTT 3.1.1 §3.14.4, MQTT 5 §3.1.2.5).
    Discard,
    /// Publish it now.
    Publish,
    /// Publish it after this delay unless the client reconnects first
    /// (MQTT 5 §3.1.3.2.2 will delay interval; the delay is capped by the
    /// session expiry, since the will goes at the latest when the session
    /// ends).
    After(Duration),
}

/// The will rule (MQTT 3.1.1 §3.1.2.5, MQTT 5 §3.1.2.5 and §3.1.3.2.2).
/// `session_expiry` is the interval in force at the end (seconds).
pub fn will_action(end: End, delay_secs: u32, session_expiry: u32) -> WillAction {
    match end {
        End::CleanDisconnect => WillAction::Discard,
        // A takeover resumes the session at once: a delayed will is never
        // due (§3.1.3.2.2), an immediate one is.
        End::TakenOver if delay_secs > 0 => WillAction::Discard,
        End::TakenOver => WillAction::Publish,
        End::Abrupt | End::DisconnectWithWill => {
            let delay = delay_secs.min(session_expiry);
            if delay == 0 { WillAction::Publish } else { WillAction::After(Duration::from_secs(delay.into())) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(channel: &str, serial: u64) -> Arc<Delivery> {
        Delivery::new(proto::Envelope {
            channel: channel.into(),
            epoch: "e".into(),
            serial,
            prev_serial: serial.saturating_sub(1),
            ..Default::default()
        })
    }

    fn queued(channel: &str, serial: u64, qos: u8) -> Queued {
        Queued { delivery: delivery(channel, serial), qos, retain: false, sub_ids: Vec::new(), gap: None }
    }

    fn pkids(t: &[Transmit]) -> Vec<u16> {
        t.iter()
            .map(|t| match t {
                Transmit::Publish { pkid, .. } | Transmit::PubRel(pkid) => *pkid,
            })
            .collect()
    }

    #[test]
    fn pkids_wrap_and_skip_inflight() {
        let mut s = SessionState { last_pkid: u16::MAX - 1, ..Default::default() };
        for i in 0..3 {
            s.handle_delivery(queued("a", i + 1, 1), 1 << 20).unwrap();
        }
        let t = s.poll_transmit(10, |_| Verdict::Send);
        assert_eq!(pkids(&t), vec![u16::MAX, 1, 2]);
        // Complete 65535 and 2; the next ids skip 1, still in flight.
        assert!(s.handle_puback(u16::MAX));
        assert!(s.handle_puback(2));
        assert!(!s.handle_puback(2), "already completed");
        s.last_pkid = u16::MAX;
        s.handle_delivery(queued("a", 4, 1), 1 << 20).unwrap();
        assert_eq!(pkids(&s.poll_transmit(10, |_| Verdict::Send)), vec![2]);
    }

    /// What was handed to the network at QoS 1/2 is in the record; after
    /// a resume from it, those messages go out again with DUP, newer ones
    /// without.
    #[test]
    fn a_resume_from_a_record_sends_what_may_have_arrived_with_dup() {
        let mut s = SessionState::default();
        for i in 1..=2 {
            s.handle_delivery(queued("a", i, 1), 1 << 20).unwrap();
        }
        assert_eq!(pkids(&s.poll_transmit(10, |_| Verdict::Send)), vec![1, 2]);
        assert!(s.take_changed(), "sending at QoS 1 is a change to record");
        let rec = s.to_record();
        assert_eq!(rec.sent.get("a").map(|p| p.serial), Some(2));
        let mut resumed = SessionState::from_record(rec);
        for i in 1..=3 {
            resumed.handle_delivery(queued("a", i, 1), 1 << 20).unwrap();
        }
        let dups: Vec<bool> = resumed
            .poll_transmit(10, |_| Verdict::Send)
            .iter()
            .map(|t| matches!(t, Transmit::Publish { dup: true, .. }))
            .collect();
        assert_eq!(dups, [true, true, false]);
    }

    #[test]
    fn inflight_window_holds_back_and_keeps_order() {
        let mut s = SessionState::default();
        s.handle_delivery(queued("a", 1, 1), 1 << 20).unwrap();
        s.handle_delivery(queued("a", 2, 0), 1 << 20).unwrap();
        s.handle_delivery(queued("a", 3, 1), 1 << 20).unwrap();
        let t = s.poll_transmit(1, |_| Verdict::Send);
        // The QoS 0 message waits behind the held QoS 1 one: order matters.
        assert_eq!(pkids(&t), vec![1, 0]);
        assert_eq!((s.inflight_len(), s.pending_len()), (1, 1));
        assert!(s.poll_transmit(1, |_| Verdict::Send).is_empty());
        assert!(s.handle_puback(1));
        assert_eq!(pkids(&s.poll_transmit(1, |_| Verdict::Send)), vec![2]);
    }

    #[test]
    fn pending_is_byte_bounded() {
        let mut s = SessionState::default();
        let max = delivery("a", 1).size + delivery("a", 2).size;
        s.handle_delivery(queued("a", 1, 1), max).unwrap();
        s.handle_delivery(queued("a", 2, 1), max).unwrap();
        assert_eq!(s.handle_delivery(queued("a", 3, 1), max), Err(Overflow(max)));
        // Sending frees room.
        s.poll_transmit(10, |_| Verdict::Send);
        s.handle_delivery(queued("a", 3, 1), max).unwrap();
    }

    #[test]
    fn qos2_outbound_flow_and_resend() {
        let mut s = SessionState::default();
        s.handle_delivery(queued("a", 1, 2), 1 << 20).unwrap();
        s.handle_delivery(queued("a", 2, 2), 1 << 20).unwrap();
        assert_eq!(pkids(&s.poll_transmit(10, |_| Verdict::Send)), vec![1, 2]);
        assert!(!s.handle_pubcomp(1), "PUBCOMP before PUBREC is ignored");
        assert!(s.handle_pubrec(1, false));
        let resend = s.resend();
        assert!(matches!(resend[0], Transmit::PubRel(1)), "{resend:?}");
        assert!(matches!(resend[1], Transmit::Publish { pkid: 2, dup: true, .. }), "{resend:?}");
        assert!(s.handle_pubcomp(1));
        assert!(!s.handle_pubrec(2, true), "a failed PUBREC ends the flow");
        assert_eq!(s.inflight_len(), 0);
    }

    #[test]
    fn qos2_inbound_duplicate_before_pubrel() {
        let mut s = SessionState::default();
        assert!(s.handle_inbound_qos2(5));
        assert!(!s.handle_inbound_qos2(5), "retransmission is not published again");
        assert!(s.handle_pubrel(5));
        assert!(!s.handle_pubrel(5));
        assert!(s.handle_inbound_qos2(5), "after PUBREL the id is a new message");
        s.forget_inbound_qos2(5);
        assert_eq!(s.inbound_qos2_len(), 0);
    }

    #[test]
    fn dedupe_and_detach_rewinds_positions() {
        let mut s = SessionState::default();
        s.handle_delivery(queued("a", 1, 1), 1 << 20).unwrap();
        assert!(s.is_duplicate(&delivery("a", 1).envelope));
        assert!(!s.is_duplicate(&delivery("a", 2).envelope));
        s.poll_transmit(10, |_| Verdict::Send);
        s.handle_delivery(queued("a", 2, 1), 1 << 20).unwrap();
        s.handle_delivery(queued("a", 3, 1), 1 << 20).unwrap();
        s.poll_transmit(1, |_| Verdict::Send);
        s.detach();
        // 1 is in flight (resent), 2 and 3 were never sent: replay after 1.
        assert_eq!(s.delivered["a"].serial, 1);
        assert_eq!(s.pending_len(), 0);
        assert_eq!(s.resend().len(), 1);
    }

    #[test]
    fn expired_messages_are_dropped_on_transmit() {
        let mut s = SessionState::default();
        s.handle_delivery(queued("a", 1, 1), 1 << 20).unwrap();
        s.handle_delivery(queued("a", 2, 1), 1 << 20).unwrap();
        let t = s.poll_transmit(10, |q| if q.delivery.envelope.serial == 1 { Verdict::Skip } else { Verdict::Send });
        assert_eq!(pkids(&t), vec![1]);
        assert_eq!(s.inflight_len(), 1);
    }

    /// A gap travels on the channel's next message sent (and its resend),
    /// once; a discarded message leaves its gap for the next one; the store
    /// record keeps gaps not yet told.
    #[test]
    fn gaps_ride_on_the_next_message_of_their_channel() {
        let mut s = SessionState::default();
        s.handle_gap("a", "epoch_changed", Some(&proto::Position { epoch: "f".into(), serial: 0 }));
        assert_eq!(s.delivered["a"], proto::Position { epoch: "f".into(), serial: 0 });
        assert_eq!(SessionState::from_record(s.to_record()).pending_gaps()["a"], "epoch_changed");
        s.handle_delivery(queued("b", 1, 0), 1 << 20).unwrap();
        s.handle_delivery(queued("a", 1, 1), 1 << 20).unwrap();
        s.handle_delivery(queued("a", 2, 1), 1 << 20).unwrap();
        let t = s.poll_transmit(10, |_| Verdict::Send);
        let gaps: Vec<Option<&str>> = t
            .iter()
            .map(|t| match t {
                Transmit::Publish { msg, .. } => msg.gap.as_deref(),
                Transmit::PubRel(_) => None,
            })
            .collect();
        assert_eq!(gaps, [None, Some("epoch_changed"), None]);
        assert!(s.pending_gaps().is_empty());
        // In flight, the gap is in the record (a resume replays the message)
        // and in the resend.
        assert_eq!(s.to_record().gaps.get("a").map(String::as_str), Some("epoch_changed"));
        assert!(matches!(&s.resend()[0], Transmit::Publish { msg, .. } if msg.gap.as_deref() == Some("epoch_changed")));

        s.handle_delivery(queued("c", 1, 0), 1 << 20).unwrap();
        s.handle_delivery(queued("c", 2, 0), 1 << 20).unwrap();
        let t = s.poll_transmit(10, |q| {
            if q.delivery.envelope.serial == 1 { Verdict::Discard("too_large") } else { Verdict::Send }
        });
        assert!(matches!(&t[..], [Transmit::Publish { msg, .. }] if msg.gap.as_deref() == Some("too_large")), "{t:?}");
    }

    #[test]
    fn routing_takes_max_qos_and_all_ids() {
        let subs = vec![
            Subscription { filter: "a/+".into(), qos: 1, no_local: false, retain_as_published: false, id: Some(1) },
            Subscription {
                filter: "$share/g/a/#".into(),
                qos: 2,
                no_local: false,
                retain_as_published: true,
                id: Some(7),
            },
            Subscription { filter: "b".into(), qos: 0, no_local: false, retain_as_published: false, id: None },
        ];
        assert_eq!(route(&subs, "a/x"), Some(Route { qos: 2, retain_as_published: true, ids: vec![1, 7] }));
        assert_eq!(route(&subs, "b"), Some(Route { qos: 0, retain_as_published: false, ids: vec![] }));
        assert_eq!(route(&subs, "c"), None);
        assert_eq!(effective_qos(None, 1), 1);
        assert_eq!(effective_qos(Some(0), 2), 0);
        assert_eq!(effective_qos(Some(2), 2), 2);
        let mut s = SessionState::default();
        assert!(s.subscribe(subs[0].clone()));
        assert!(!s.subscribe(Subscription { qos: 2, ..subs[0].clone() }), "same filter replaces");
        assert_eq!(s.subs.len(), 1);
        s.advance("a/x", "e", 4);
        s.advance("b", "e", 4);
        assert_eq!(s.positions_for("$share/g/a/+").keys().collect::<Vec<_>>(), vec!["a/x"]);
        assert!(s.unsubscribe("a/+"));
        assert!(!s.unsubscribe("a/+"));
    }

    #[test]
    fn keepalive_deadline_is_one_and_a_half() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(10, t0);
        assert_eq!(k.deadline(), Some(t0 + Duration::from_secs(15)));
        assert!(!k.expired(t0 + Duration::from_secs(14)));
        assert!(k.expired(t0 + Duration::from_secs(15)));
        k.handle_packet(t0 + Duration::from_secs(14));
        assert!(!k.expired(t0 + Duration::from_secs(28)));
        let never = Keepalive::new(0, t0);
        assert_eq!(never.deadline(), None);
        assert!(!never.expired(t0 + Duration::from_secs(1 << 20)));
    }

    #[test]
    fn topic_aliases_both_ways() {
        let mut inb = InboundAliases::new(2);
        assert_eq!(inb.resolve("a", Some(1)), Ok("a".into()));
        assert_eq!(inb.resolve("", Some(1)), Ok("a".into()));
        assert_eq!(inb.resolve("", Some(2)), Err(AliasError::Unknown(2)));
        assert_eq!(inb.resolve("b", Some(3)), Err(AliasError::OutOfRange(3)));
        assert_eq!(inb.resolve("b", Some(0)), Err(AliasError::OutOfRange(0)));
        assert_eq!(inb.resolve("b", None), Ok("b".into()));
        let mut out = OutboundAliases::new(1);
        assert_eq!(out.peek("x"), AliasUse::New(1));
        assert_eq!(out.peek("x"), AliasUse::New(1), "peeking records nothing");
        assert_eq!(out.assign("x"), AliasUse::New(1));
        assert_eq!(out.peek("x"), AliasUse::Existing(1));
        assert_eq!(out.peek("y"), AliasUse::None);
        assert_eq!(out.assign("x"), AliasUse::Existing(1));
        assert_eq!(out.assign("y"), AliasUse::None);
        assert_eq!(OutboundAliases::new(0).assign("x"), AliasUse::None);
    }

    #[test]
    fn will_decisions() {
        assert_eq!(will_action(End::CleanDisconnect, 0, 0), WillAction::Discard);
        assert_eq!(will_action(End::Abrupt, 0, 0), WillAction::Publish);
        assert_eq!(will_action(End::DisconnectWithWill, 0, 100), WillAction::Publish);
        assert_eq!(will_action(End::Abrupt, 30, 100), WillAction::After(Duration::from_secs(30)));
        assert_eq!(will_action(End::Abrupt, 30, 10), WillAction::After(Duration::from_secs(10)));
        assert_eq!(will_action(End::Abrupt, 30, 0), WillAction::Publish, "session ends now: will goes now");
        assert_eq!(will_action(End::TakenOver, 0, 0), WillAction::Publish);
        assert_eq!(will_action(End::TakenOver, 5, 60), WillAction::Discard);
    }
}
