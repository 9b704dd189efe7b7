//! The embedded single-node engine: all channel state in memory, behind one
//! lock.
//!
//! One lock makes the two orderings that matter trivially true: a publish
//! assigns its serial, appends to history and pushes to every outbox before
//! the next publish of any channel starts, so subscribers see serial order;
//! and a subscribe registers in the trie and computes its replay in the same
//! critical section, so recovered messages and live ones neither overlap nor
//! leave a hole. The lock is never held across an await, and fan-out only
//! `try`-pushes into bounded outboxes, so it stays short.
//!
//! [`MemoryState`] is the plain state machine (time passed in, no I/O), unit
//! tested below; [`MemoryEngine`] puts it behind the [`Engine`] trait.
//! Nothing survives a restart: a new process starts new epochs, and clients
//! that recover from an old position get an explicit `epoch_changed` gap.

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::str_set::StrSet;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use rand::Rng as _;
use switchboard_proto::{self as proto, ErrorCode};
use switchboard_protocols::port::{
    CloseKind, CoreError, Delivery, Outbound, Outbox, SessionId, SlowPolicy, SubscribeOutcome,
};

use super::{Caller, ChannelPolicy, Engine, EngineConfig, EngineStats};
use crate::channel::{self, TopicTrie};

/// A fresh random channel epoch: 10 characters of `[0-9a-z]` (~51 bits).
fn new_epoch() -> Arc<str> {
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::rng();
    (0..10).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect::<String>().into()
}

#[derive(Debug)]
struct Member {
    data: Bytes,
    protocol: proto::Protocol,
    /// Set when the session dropped abruptly: the member leaves at this time
    /// unless the same client enters again first.
    leave_at: Option<i64>,
}

/// Presence members are keyed by (client id, connection id).
type MemberKey = (Arc<str>, Arc<str>);

#[derive(Debug)]
struct Channel {
    epoch: Arc<str>,
    serial: u64,
    policy: ChannelPolicy,
    history: VecDeque<Arc<Delivery>>,
    retained: Option<Arc<Delivery>>,
    /// Timestamp of the newest message trimmed from history: a resume by
    /// time from before it cannot be complete.
    trimmed_ts: Option<i64>,
    /// Publish ids seen recently → (serial, expiry).
    dedupe: HashMap<String, (u64, i64)>,
    /// Ids in expiry order, to forget them without scanning.
    dedupe_order: VecDeque<(i64, String)>,
    members: BTreeMap<MemberKey, Member>,
    last_active: i64,
}

impl Channel {
    fn new(policy: ChannelPolicy, now: i64) -> Self {
        Channel {
            epoch: new_epoch(),
            serial: 0,
            policy,
            history: VecDeque::new(),
            retained: None,
            trimmed_ts: None,
            dedupe: HashMap::new(),
            dedupe_order: VecDeque::new(),
            members: BTreeMap::new(),
            last_active: now,
        }
    }

    fn position(&self) -> proto::Position {
        proto::Position { epoch: self.epoch.to_string(), serial: self.serial }
    }

    fn trim(&mut self, now: i64) {
        let min_ts = now.saturating_sub(self.policy.history_ttl.as_millis() as i64);
        while self.history.len() > self.policy.history_size
            || self.history.front().is_some_and(|d| d.envelope.timestamp < min_ts)
        {
            if let Some(d) = self.history.pop_front() {
                self.trimmed_ts = Some(d.envelope.timestamp);
            }
        }
    }

    fn forget_ids(&mut self, now: i64, max: usize) {
        while let Some((exp, _)) = self.dedupe_order.front() {
            if *exp > now && self.dedupe_order.len() <= max {
                break;
            }
            if let Some((_, id)) = self.dedupe_order.pop_front() {
                self.dedupe.remove(&id);
            }
        }
    }

    /// Messages after `serial`, if history still holds all of them.
    fn after(&self, serial: u64) -> Option<Vec<Arc<Delivery>>> {
        if serial >= self.serial {
            return Some(Vec::new());
        }
        let first = self.history.front()?.envelope.serial;
        if first > serial + 1 {
            return None;
        }
        Some(self.history.iter().filter(|d| d.envelope.serial > serial).cloned().collect())
    }

    fn is_idle(&self) -> bool {
        self.history.is_empty() && self.retained.is_none() && self.members.is_empty() && self.dedupe.is_empty()
    }
}

#[derive(Debug)]
struct Session {
    caller: Caller,
    outbox: Arc<Outbox>,
    /// Filters the client subscribed to.
    filters: StrSet,
    /// Filters whose `$presence/<filter>` companion this session holds
    /// because it subscribed with `presence: true`. Kept apart from
    /// `filters` so that an explicit `$presence/...` subscription survives
    /// unsubscribing the base filter.
    companions: StrSet,
    /// Channels whose presence this session entered.
    presence: StrSet,
}

/// A subscription's target in the trie.
#[derive(Debug, Clone)]
struct Sub {
    outbox: Arc<Outbox>,
    /// Skip messages this session published itself (MQTT 5 no-local).
    no_local: bool,
}

/// An MQTT 5 shared subscription `$share/{group}/{filter}`: each message
/// goes to one member, round robin.
#[derive(Debug, Default)]
struct SharedGroup {
    members: Vec<(SessionId, Sub)>,
    next: usize,
}

/// The memory engine's state machine.
#[derive(Debug)]
pub struct MemoryState {
    cfg: EngineConfig,
    channels: HashMap<String, Channel>,
    trie: TopicTrie<SessionId, Sub>,
    /// Shared subscriptions by (group, filter). Few in practice, so fan-out
    /// checks each filter directly instead of keeping a second trie.
    shared: BTreeMap<(String, String), SharedGroup>,
    sessions: HashMap<SessionId, Session>,
    /// Abrupt leaves waiting for their grace to end: (time, channel, member).
    /// Grace is constant, so pushing at the back keeps it sorted.
    pending_leaves: VecDeque<(i64, String, MemberKey)>,
}

fn err(code: ErrorCode, msg: impl Into<String>) -> CoreError {
    CoreError::new(code, msg)
}

impl MemoryState {
    /// Empty state.
    pub fn new(cfg: EngineConfig) -> Self {
        MemoryState {
            cfg,
            channels: HashMap::new(),
            trie: TopicTrie::new(),
            shared: BTreeMap::new(),
            sessions: HashMap::new(),
            pending_leaves: VecDeque::new(),
        }
    }

    fn channel_mut(&mut self, name: &str, now: i64) -> &mut Channel {
        if !self.channels.contains_key(name) {
            let policy = self.cfg.policy_for(name).clone();
            self.channels.insert(name.to_string(), Channel::new(policy, now));
        }
        // Inserted just above if it was missing.
        self.channels.get_mut(name).expect("channel exists")
    }

    /// Registers a session.
    pub fn attach(&mut self, caller: &Caller, outbox: Arc<Outbox>) {
        self.sessions.insert(
            caller.session,
            Session {
                caller: caller.clone(),
                outbox,
                filters: StrSet::new(),
                companions: StrSet::new(),
                presence: StrSet::new(),
            },
        );
    }

    /// Removes a session (see [`Engine::detach`]).
    pub fn detach(&mut self, session: SessionId, kind: CloseKind, now: i64) {
        let Some(s) = self.sessions.remove(&session) else { return };
        for f in &s.filters {
            match channel::parse_shared(f) {
                Some((group, inner)) => self.leave_group(group, inner, session),
                None => {
                    self.trie.remove(f, session);
                }
            }
        }
        for f in &s.companions {
            self.trie.remove(&channel::presence_channel(f), session);
        }
        for ch in s.presence {
            let key: MemberKey = (s.caller.client_id.clone(), s.caller.connection_id.clone());
            match kind {
                CloseKind::Clean => self.remove_member(&ch, &key, now),
                CloseKind::Abrupt => {
                    let at = now + self.cfg.presence_grace.as_millis() as i64;
                    if let Some(m) = self.channels.get_mut(&ch).and_then(|c| c.members.get_mut(&key)) {
                        m.leave_at = Some(at);
                        self.pending_leaves.push_back((at, ch, key));
                    }
                }
            }
        }
    }

    /// Appends an envelope to a channel and fans it out. The caller has
    /// validated the channel name.
    fn append(&mut self, mut env: proto::Envelope, from: SessionId, now: i64) -> (proto::Position, Arc<Delivery>) {
        let name = env.channel.clone();
        let ch = self.channel_mut(&name, now);
        ch.serial += 1;
        ch.last_active = now;
        env.epoch = ch.epoch.to_string();
        env.serial = ch.serial;
        env.prev_serial = ch.serial - 1;
        env.timestamp = now;
        let delivery = Delivery::new(env);
        if ch.policy.history_size > 0 {
            ch.history.push_back(delivery.clone());
        }
        ch.trim(now);
        if delivery.envelope.retain {
            ch.retained = if delivery.envelope.payload.is_empty() { None } else { Some(delivery.clone()) };
        }
        let pos = ch.position();
        let policy = ch.policy.slow_policy;
        self.fanout(&delivery, policy, from);
        (pos, delivery)
    }

    /// Pushes a delivery to every matching subscriber, once per session,
    /// and to one member of every matching shared group. `from` is the
    /// publishing session (0 for none), skipped where it asked for no-local.
    fn fanout(&mut self, delivery: &Arc<Delivery>, policy: SlowPolicy, from: SessionId) {
        let channel = delivery.channel();
        let mut targets: Vec<(SessionId, &Sub)> = Vec::new();
        self.trie.for_each_match(channel, |sid, sub| {
            if !(sub.no_local && *sid == from) {
                targets.push((*sid, sub));
            }
        });
        if targets.len() > 1 {
            // A session subscribed through several matching filters gets
            // the message once.
            targets.sort_unstable_by_key(|(sid, _)| *sid);
            targets.dedup_by_key(|(sid, _)| *sid);
        }
        for (_, sub) in targets {
            sub.outbox.push(Outbound::Message(delivery.clone()), policy);
        }
        for ((_, filter), group) in self.shared.iter_mut() {
            if !channel::filter_matches(filter, channel) {
                continue;
            }
            // Round robin over members that can take it: not closed, and not
            // the publisher when it asked for no-local.
            let n = group.members.len();
            for step in 0..n {
                let i = (group.next + step) % n;
                let (sid, sub) = &group.members[i];
                if (sub.no_local && *sid == from) || sub.outbox.closed().is_some() {
                    continue;
                }
                sub.outbox.push(Outbound::Message(delivery.clone()), policy);
                group.next = (i + 1) % n;
                break;
            }
        }
    }

    fn leave_group(&mut self, group: &str, filter: &str, session: SessionId) {
        let key = (group.to_string(), filter.to_string());
        if let Some(g) = self.shared.get_mut(&key) {
            g.members.retain(|(sid, _)| *sid != session);
            if g.members.is_empty() {
                self.shared.remove(&key);
            } else {
                g.next %= g.members.len();
            }
        }
    }

    fn publisher(&self, caller: &Caller) -> proto::Publisher {
        proto::Publisher {
            client_id: caller.client_id.to_string(),
            protocol: caller.protocol as i32,
            node: self.cfg.node.clone(),
            connection_id: caller.connection_id.to_string(),
        }
    }

    /// Publishes (see [`Engine::publish`]). The router validated the name.
    pub fn publish(&mut self, caller: &Caller, req: proto::Publish, now: i64) -> proto::PublishAck {
        let max_ids = self.cfg.dedupe_max_per_channel;
        if !req.id.is_empty() {
            let ch = self.channel_mut(&req.channel, now);
            ch.forget_ids(now, max_ids);
            if let Some((serial, _)) = ch.dedupe.get(&req.id) {
                return proto::PublishAck {
                    channel: req.channel,
                    epoch: ch.epoch.to_string(),
                    serial: *serial,
                    duplicate: true,
                };
            }
        }
        let id = req.id.clone();
        let env = proto::Envelope {
            channel: req.channel,
            payload: req.payload,
            id: req.id,
            publisher: Some(self.publisher(caller)),
            content_type: req.content_type,
            headers: req.headers,
            kind: proto::Kind::Message as i32,
            retain: req.retain,
            qos: req.qos,
            message_expiry: req.message_expiry,
            response_topic: req.response_topic,
            correlation_data: req.correlation_data,
            payload_utf8: req.payload_utf8,
            ..Default::default()
        };
        let (pos, delivery) = self.append(env, caller.session, now);
        if !id.is_empty() {
            let exp = now + self.cfg.dedupe_window.as_millis() as i64;
            let ch = self.channel_mut(delivery.channel(), now);
            ch.dedupe.insert(id.clone(), (pos.serial, exp));
            ch.dedupe_order.push_back((exp, id));
            ch.forget_ids(now, max_ids);
        }
        proto::PublishAck {
            channel: delivery.envelope.channel.clone(),
            epoch: pos.epoch,
            serial: pos.serial,
            duplicate: false,
        }
    }

    /// Subscribes (see [`Engine::subscribe`]). The router validated the filter.
    pub fn subscribe(
        &mut self,
        session: SessionId,
        req: &proto::Subscribe,
        now: i64,
    ) -> Result<SubscribeOutcome, CoreError> {
        if !self.sessions.contains_key(&session) {
            return Err(err(ErrorCode::NotConnected, "no such session"));
        }
        if let Some((group, inner)) = channel::parse_shared(&req.filter) {
            // Shared subscriptions get no replay (MQTT 5 sends no retained
            // messages to them; recovery belongs to one member, not a group).
            let s = self.sessions.get_mut(&session).expect("checked above");
            let sub = Sub { outbox: s.outbox.clone(), no_local: req.no_local };
            s.filters.insert(req.filter.clone());
            let g = self.shared.entry((group.to_string(), inner.to_string())).or_default();
            match g.members.iter_mut().find(|(sid, _)| *sid == session) {
                Some(m) => m.1 = sub,
                None => g.members.push((session, sub)),
            }
            return Ok(SubscribeOutcome {
                subscribed: proto::Subscribed { filter: req.filter.clone(), channels: Vec::new() },
                replay: Vec::new(),
            });
        }
        let filter = req.filter.as_str();
        let companion = req.presence.then(|| channel::presence_channel(filter));
        // Validate every position before changing anything.
        for (name, pos) in &req.positions {
            channel::validate_channel(name).map_err(|e| channel::channel_error(name, e))?;
            let in_scope = channel::filter_matches(filter, name)
                || companion.as_deref().is_some_and(|c| channel::filter_matches(c, name));
            if !in_scope {
                return Err(err(
                    ErrorCode::BadPosition,
                    format!("position for {name:?} does not match filter {filter:?}"),
                ));
            }
            if pos.epoch.is_empty() {
                return Err(err(ErrorCode::BadPosition, format!("position for {name:?} has an empty epoch")));
            }
            if let Some(ch) = self.channels.get(name)
                && ch.epoch.as_ref() == pos.epoch
                && pos.serial > ch.serial
            {
                return Err(err(
                    ErrorCode::BadPosition,
                    format!(
                        "position {}:{} of {name:?} is ahead of the channel ({})",
                        pos.epoch, pos.serial, ch.serial
                    ),
                ));
            }
        }
        let rewind = req.rewind.filter(|r| r.count > 0 || r.duration_ms > 0);

        // Which channels get a state line and possibly a replay.
        let mut targets: Vec<String> = Vec::new();
        if channel::is_concrete(filter) {
            targets.push(filter.to_string());
        }
        targets.extend(req.positions.keys().filter(|k| k.as_str() != filter).cloned());
        let since = (req.since_ms > 0).then_some(req.since_ms as i64);
        if let (true, Some(since_companion), Some(_)) = (channel::is_concrete(filter), companion.as_ref(), since)
            && self.channels.contains_key(since_companion)
            && !req.positions.contains_key(since_companion)
        {
            targets.push(since_companion.clone());
        }
        if !channel::is_concrete(filter) && (rewind.is_some() || req.retained || since.is_some()) {
            let mut matching: Vec<String> = self
                .channels
                .keys()
                .filter(|k| {
                    let in_scope = channel::filter_matches(filter, k)
                        || companion.as_deref().is_some_and(|c| since.is_some() && channel::filter_matches(c, k));
                    in_scope && !req.positions.contains_key(*k)
                })
                .cloned()
                .collect();
            matching.sort();
            targets.extend(matching);
        }

        let mut out = SubscribeOutcome {
            subscribed: proto::Subscribed { filter: filter.to_string(), channels: Vec::new() },
            replay: Vec::new(),
        };
        for name in targets {
            let ch = self.channel_mut(&name, now);
            ch.trim(now);
            let mut state = proto::ChannelState {
                channel: name.clone(),
                epoch: ch.epoch.to_string(),
                serial: ch.serial,
                recovered: false,
            };
            let mut replay: Vec<Arc<Delivery>> = Vec::new();
            let mut want_retained = req.retained;
            if let Some(pos) = req.positions.get(&name) {
                let recovered = if pos.epoch == ch.epoch.as_ref() { ch.after(pos.serial) } else { None };
                match recovered {
                    Some(msgs) => {
                        state.recovered = true;
                        want_retained = false;
                        replay = msgs;
                    }
                    None => {
                        let reason = if pos.epoch == ch.epoch.as_ref() { "trimmed" } else { "epoch_changed" };
                        out.replay.push(Outbound::Gap(proto::Gap {
                            channel: name.clone(),
                            from: Some(pos.clone()),
                            to: Some(ch.position()),
                            reason: reason.into(),
                        }));
                    }
                }
            } else if let Some(since) = since {
                // Resume by time: everything accepted at or after `since`,
                // or a gap when history already dropped some of it.
                let lost = ch.trimmed_ts.is_some_and(|t| t >= since)
                    || (ch.policy.history_size == 0 && ch.last_active >= since && ch.serial > 0);
                if lost {
                    out.replay.push(Outbound::Gap(proto::Gap {
                        channel: name.clone(),
                        from: None,
                        to: Some(ch.position()),
                        reason: "trimmed".into(),
                    }));
                } else {
                    replay = ch.history.iter().filter(|d| d.envelope.timestamp >= since).cloned().collect();
                }
            } else if let Some(rw) = rewind {
                let min_ts = if rw.duration_ms > 0 { now.saturating_sub(rw.duration_ms as i64) } else { i64::MIN };
                let count = if rw.count > 0 { rw.count as usize } else { usize::MAX };
                let recent: Vec<_> = ch
                    .history
                    .iter()
                    .rev()
                    .take_while(|d| d.envelope.timestamp > min_ts)
                    .take(count)
                    .cloned()
                    .collect();
                replay = recent.into_iter().rev().collect();
            }
            if want_retained
                && let Some(r) = &ch.retained
                && replay.first().is_none_or(|f| r.envelope.serial < f.envelope.serial)
            {
                out.replay.push(Outbound::Message(r.clone()));
            }
            out.replay.extend(replay.into_iter().map(Outbound::Message));
            out.subscribed.channels.push(state);
        }

        // Register last: nothing above can fail after this point. A repeated
        // subscribe to the same filter replaces its options (MQTT semantics),
        // so `presence: false` drops an earlier companion.
        let s = self.sessions.get_mut(&session).expect("checked above");
        let sub = Sub { outbox: s.outbox.clone(), no_local: req.no_local };
        self.trie.insert(filter, session, sub.clone());
        s.filters.insert(filter.to_string());
        match companion {
            Some(c) => {
                self.trie.insert(&c, session, sub);
                s.companions.insert(filter.to_string());
            }
            None => {
                if s.companions.remove(filter) {
                    let c = channel::presence_channel(filter);
                    if !s.filters.contains(&c) {
                        self.trie.remove(&c, session);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Unsubscribes a filter and its presence companion (an explicit
    /// `$presence/...` subscription of the same session stays).
    pub fn unsubscribe(&mut self, session: SessionId, filter: &str) -> Result<(), CoreError> {
        let s = self.sessions.get_mut(&session).ok_or_else(|| err(ErrorCode::NotConnected, "no such session"))?;
        if !s.filters.remove(filter) {
            return Err(err(ErrorCode::NotSubscribed, format!("not subscribed to {filter:?}")));
        }
        if let Some((group, inner)) = channel::parse_shared(filter) {
            self.leave_group(group, inner, session);
            return Ok(());
        }
        // The trie holds one entry per (filter, session): keep it while the
        // same filter is still held as someone's presence companion.
        let held_as_companion =
            filter.strip_prefix(channel::PRESENCE_PREFIX).is_some_and(|base| s.companions.contains(base));
        if !held_as_companion {
            self.trie.remove(filter, session);
        }
        if s.companions.remove(filter) {
            let c = channel::presence_channel(filter);
            if !s.filters.contains(&c) {
                self.trie.remove(&c, session);
            }
        }
        Ok(())
    }

    fn presence_event(
        &mut self,
        channel: &str,
        kind: proto::Kind,
        key: &MemberKey,
        protocol: proto::Protocol,
        data: Bytes,
        now: i64,
    ) {
        let env = proto::Envelope {
            channel: channel::presence_channel(channel),
            payload: data,
            publisher: Some(proto::Publisher {
                client_id: key.0.to_string(),
                protocol: protocol as i32,
                node: self.cfg.node.clone(),
                connection_id: key.1.to_string(),
            }),
            kind: kind as i32,
            ..Default::default()
        };
        self.append(env, 0, now);
    }

    fn remove_member(&mut self, channel: &str, key: &MemberKey, now: i64) {
        let Some(c) = self.channels.get_mut(channel) else { return };
        let Some(m) = c.members.remove(key) else { return };
        // A leave is activity: the channel keeps its position for another
        // idle period, so a caught-up client recovers without a false gap.
        c.last_active = now;
        self.presence_event(channel, proto::Kind::PresenceLeave, key, m.protocol, m.data, now);
    }

    /// Enters or updates presence (see [`Engine::presence_enter`]).
    pub fn presence_enter(
        &mut self,
        caller: &Caller,
        name: &str,
        data: Bytes,
        update: bool,
        now: i64,
    ) -> Result<(), CoreError> {
        if caller.client_id.is_empty() {
            return Err(err(ErrorCode::NoIdentity, "presence needs a client id"));
        }
        let max = self.cfg.presence_max_members;
        let key: MemberKey = (caller.client_id.clone(), caller.connection_id.clone());
        let ch = self.channel_mut(name, now);
        ch.last_active = now;
        let kind = if let Some(m) = ch.members.get_mut(&key) {
            if m.data == data {
                None
            } else {
                m.data = data.clone();
                Some(proto::Kind::PresenceUpdate)
            }
        } else {
            if update {
                return Err(err(ErrorCode::BadRequest, format!("not present on {name:?}; enter first")));
            }
            // The same client coming back within the grace period takes
            // over its old membership: no leave, no second enter.
            let resumed = ch
                .members
                .iter()
                .find(|(k, m)| k.0 == key.0 && m.leave_at.is_some())
                .map(|(k, m)| (k.clone(), m.data.clone()));
            if resumed.is_none() && ch.members.len() >= max {
                return Err(err(ErrorCode::Unavailable, format!("presence of {name:?} is full ({max} members)")));
            }
            if let Some((old, _)) = &resumed {
                ch.members.remove(old);
            }
            ch.members.insert(key.clone(), Member { data: data.clone(), protocol: caller.protocol, leave_at: None });
            match resumed {
                Some((_, old_data)) if old_data == data => None,
                Some(_) => Some(proto::Kind::PresenceUpdate),
                None => Some(proto::Kind::PresenceEnter),
            }
        };
        if let Some(s) = self.sessions.get_mut(&caller.session) {
            s.presence.insert(name.to_string());
        }
        if let Some(kind) = kind {
            self.presence_event(name, kind, &key, caller.protocol, data, now);
        }
        Ok(())
    }

    /// Leaves presence.
    pub fn presence_leave(&mut self, caller: &Caller, name: &str, now: i64) -> Result<(), CoreError> {
        let key: MemberKey = (caller.client_id.clone(), caller.connection_id.clone());
        let present = self.channels.get(name).is_some_and(|c| c.members.contains_key(&key));
        if !present {
            return Err(err(ErrorCode::BadRequest, format!("not present on {name:?}")));
        }
        if let Some(s) = self.sessions.get_mut(&caller.session) {
            s.presence.remove(name);
        }
        self.remove_member(name, &key, now);
        Ok(())
    }

    /// Lists a channel's members (those within their grace included).
    pub fn presence_members(&self, name: &str) -> proto::PresenceMembers {
        let members = self
            .channels
            .get(name)
            .map(|c| {
                c.members
                    .iter()
                    .map(|((client, conn), m)| proto::Member {
                        client_id: client.to_string(),
                        connection_id: conn.to_string(),
                        data: m.data.clone(),
                        protocol: m.protocol as i32,
                    })
                    .collect()
            })
            .unwrap_or_default();
        proto::PresenceMembers { channel: name.to_string(), members }
    }

    /// Reads history (see [`Engine::history`]).
    pub fn history(&mut self, req: &proto::History, now: i64) -> Result<proto::HistoryResult, CoreError> {
        let page_max = self.cfg.history_page_max;
        let Some(ch) = self.channels.get_mut(&req.channel) else {
            if let Some(p) = &req.since
                && p.serial > 0
            {
                return Err(err(
                    ErrorCode::BadPosition,
                    format!("channel {:?} has no epoch {:?}", req.channel, p.epoch),
                ));
            }
            return Ok(proto::HistoryResult { channel: req.channel.clone(), ..Default::default() });
        };
        ch.trim(now);
        let since = match &req.since {
            None => 0,
            Some(p) if p.epoch != ch.epoch.as_ref() => {
                return Err(err(
                    ErrorCode::BadPosition,
                    format!("epoch {:?} is not the channel's epoch {:?}", p.epoch, ch.epoch),
                ));
            }
            Some(p) if p.serial > ch.serial => {
                return Err(err(
                    ErrorCode::BadPosition,
                    format!("serial {} is ahead of the channel ({})", p.serial, ch.serial),
                ));
            }
            Some(p) => p.serial,
        };
        let limit = if req.limit == 0 { page_max } else { (req.limit as usize).min(page_max) };
        let range = ch.history.iter().filter(|d| d.envelope.serial > since);
        let messages: Vec<proto::Envelope> = if req.reverse {
            range.rev().take(limit).map(|d| d.envelope.clone()).collect()
        } else {
            range.take(limit).map(|d| d.envelope.clone()).collect()
        };
        Ok(proto::HistoryResult {
            channel: req.channel.clone(),
            epoch: ch.epoch.to_string(),
            serial: ch.serial,
            messages,
        })
    }

    /// Housekeeping (see [`Engine::sweep`]).
    pub fn sweep(&mut self, now: i64) {
        while let Some((at, _, _)) = self.pending_leaves.front() {
            if *at > now {
                break;
            }
            let Some((at, ch, key)) = self.pending_leaves.pop_front() else { break };
            // Only if the member is still the one that was left pending.
            let due = self.channels.get(&ch).and_then(|c| c.members.get(&key)).is_some_and(|m| m.leave_at == Some(at));
            if due {
                self.remove_member(&ch, &key, now);
            }
        }
        let idle_ttl = self.cfg.idle_channel_ttl.as_millis() as i64;
        let max_ids = self.cfg.dedupe_max_per_channel;
        self.channels.retain(|_, ch| {
            ch.trim(now);
            ch.forget_ids(now, max_ids);
            !(ch.is_idle() && now - ch.last_active > idle_ttl)
        });
    }

    /// Current counts.
    pub fn stats(&self) -> EngineStats {
        EngineStats {
            channels: self.channels.len(),
            subscriptions: self.trie.len(),
            presence_members: self.channels.values().map(|c| c.members.len()).sum(),
        }
    }
}

/// [`MemoryState`] behind a lock, as an [`Engine`].
#[derive(Debug)]
pub struct MemoryEngine {
    state: Mutex<MemoryState>,
}

impl MemoryEngine {
    /// A new empty engine.
    pub fn new(cfg: EngineConfig) -> Self {
        MemoryEngine { state: Mutex::new(MemoryState::new(cfg)) }
    }
}

#[async_trait::async_trait]
impl Engine for MemoryEngine {
    fn attach(&self, caller: &Caller, outbox: Arc<Outbox>) {
        self.state.lock().attach(caller, outbox);
    }

    fn detach(&self, session: SessionId, kind: CloseKind, now_ms: i64) {
        self.state.lock().detach(session, kind, now_ms);
    }

    async fn publish(&self, caller: &Caller, req: proto::Publish, now_ms: i64) -> Result<proto::PublishAck, CoreError> {
        Ok(self.state.lock().publish(caller, req, now_ms))
    }

    async fn subscribe(
        &self,
        session: SessionId,
        req: &proto::Subscribe,
        now_ms: i64,
    ) -> Result<SubscribeOutcome, CoreError> {
        self.state.lock().subscribe(session, req, now_ms)
    }

    async fn unsubscribe(&self, session: SessionId, filter: &str) -> Result<(), CoreError> {
        self.state.lock().unsubscribe(session, filter)
    }

    async fn presence_enter(
        &self,
        caller: &Caller,
        channel: &str,
        data: Bytes,
        update: bool,
        now_ms: i64,
    ) -> Result<(), CoreError> {
        self.state.lock().presence_enter(caller, channel, data, update, now_ms)
    }

    async fn presence_leave(&self, caller: &Caller, channel: &str, now_ms: i64) -> Result<(), CoreError> {
        self.state.lock().presence_leave(caller, channel, now_ms)
    }

    async fn presence_members(&self, channel: &str) -> Result<proto::PresenceMembers, CoreError> {
        Ok(self.state.lock().presence_members(channel))
    }

    async fn history(&self, req: &proto::History, now_ms: i64) -> Result<proto::HistoryResult, CoreError> {
        self.state.lock().history(req, now_ms)
    }

    fn sweep(&self, now_ms: i64) {
        self.state.lock().sweep(now_ms);
    }

    fn stats(&self) -> EngineStats {
        self.state.lock().stats()
    }
}

#[cfg(test)]
#[path = "memory_tests.rs"]
mod tests;
