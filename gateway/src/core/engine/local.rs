//! The single-node engine: channel state in this process, optionally made
//! durable by a [`DiskStore`]; `[storage] kind = "memory"` runs it without
//! one.
//!
//! Locks, and why publishes to different channels never wait for each
//! other:
//!
//! - each channel has its own mutex. A publish takes only its channel's:
//!   it dedupes, assigns the serial, writes the store, appends to history
//!   and fans out under it, so every subscriber sees the channel's serial
//!   order;
//! - the channel map is an `RwLock` taken for reading to find a channel
//!   and for writing only to create or forget one;
//! - the [`Hub`] (sessions, the filter trie, shared groups) is an `RwLock`
//!   that fan-out takes for reading; subscribe, unsubscribe and detach take
//!   it for writing, briefly;
//! - fan-out only `try`-pushes into bounded outboxes, so no lock is held
//!   while waiting for a subscriber.
//!
//! A subscribe that replays (positions, rewind, resume by time, retained)
//! locks each channel it replays from, registers in the hub and computes
//! the replay before unlocking, so replayed and live messages neither
//! overlap nor leave a hole. For a wildcard it also holds the channel map
//! for reading meanwhile, so no channel can be created (and published to)
//! between listing the matching channels and registering. Lock order: the
//! map, then channels (a channel before its `$presence/` companion, else
//! by name), then the hub. Nothing takes the map while holding a channel.
//!
//! With a store under `sync = "always"`, a publish is written under its
//! channel's lock and then waits, unlocked, for the group fsync; whoever
//! sees the fsync first delivers the channel's synced publishes in serial
//! order. So nothing is delivered (or readable from history) before it is
//! on disk as the policy promises.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use bytes::Bytes;
use parking_lot::{ArcMutexGuard, Mutex, RawMutex, RwLock};
use rand::Rng as _;
use switchboard_proto::{self as proto, ErrorCode};
use switchboard_protocols::port::{
    CloseKind, CoreError, Delivery, Outbound, Outbox, SessionId, SubscribeOutcome, mono_ns,
};

use super::disk::{AppendBatch, DiskError, DiskStore, Recovery, StoredChannel, StoredId, StoredMessage, SyncPolicy};
use super::hub::Hub;
use super::{Caller, ChannelPolicy, Engine, EngineConfig, EngineStats};
use crate::core::channel;

/// A fresh random channel epoch: 10 characters of `[0-9a-z]` (~51 bits).
fn new_epoch() -> Arc<str> {
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::rng();
    (0..10).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect::<String>().into()
}

fn err(code: ErrorCode, msg: impl Into<String>) -> CoreError {
    CoreError::new(code, msg)
}

fn storage_error(e: DiskError) -> CoreError {
    err(ErrorCode::Unavailable, format!("storage unavailable: {e}"))
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

/// A publish written to the store, waiting for its fsync before delivery.
#[derive(Debug)]
struct Pending {
    ticket: u64,
    delivery: Arc<Delivery>,
    from: SessionId,
}

/// What the node's channels hold together, against the node-wide limits
/// (`max_history_bytes`, `max_retained_bytes`, `max_presence_members`):
/// bytes of history and of retained values (as deliveries count them),
/// presence members. Each channel adds and takes back its own, also when it
/// is dropped.
#[derive(Debug, Default)]
pub(crate) struct Held {
    history: AtomicU64,
    retained: AtomicU64,
    members: AtomicU64,
}

#[derive(Debug)]
struct Channel {
    /// The node's totals this channel counts in.
    held: Arc<Held>,
    epoch: Arc<str>,
    /// The newest serial delivered (what subscribers and history see).
    serial: u64,
    /// The newest serial assigned; above `serial` while publishes wait for
    /// their fsync.
    assigned: u64,
    policy: ChannelPolicy,
    history: VecDeque<Arc<Delivery>>,
    retained: Option<Arc<Delivery>>,
    /// Timestamp of the newest message trimmed from history: a resume by
    /// time from before it cannot be complete.
    trimmed_ts: Option<i64>,
    /// The oldest serial history holds (one past the newest trimmed).
    first_serial: u64,
    /// Publish ids seen recently → (serial, expiry).
    dedupe: HashMap<String, (u64, i64)>,
    /// Ids in expiry order, to forget them without scanning.
    dedupe_order: VecDeque<(i64, String)>,
    members: BTreeMap<MemberKey, Member>,
    last_active: i64,
    /// Written to the store (false for presence channels and without one).
    durable: bool,
    /// The channel's store key and its floor for the store's compaction
    /// filter (durable channels).
    stored: Option<(u64, Arc<AtomicU64>)>,
    /// The store holds this channel's head (its epoch): later writes need
    /// not repeat it, their messages carry what changes.
    head_stored: bool,
    /// `history` holds what the store does. False for a stored channel
    /// until it is first used (or the background loader reaches it): a
    /// start reads heads only, so it is ready at once.
    history_loaded: bool,
    /// Publishes waiting for their fsync, in serial order.
    pending: VecDeque<Pending>,
    /// Forgotten by the sweep: whoever still holds this cell looks again.
    removed: bool,
}

type Cell = Mutex<Channel>;

/// A locked channel that owns its cell (so it can be held across calls).
type Guard = ArcMutexGuard<RawMutex, Channel>;

impl Drop for Channel {
    fn drop(&mut self) {
        let history: u64 = self.history.iter().map(|d| d.size as u64).sum();
        self.held.history.fetch_sub(history, Ordering::Relaxed);
        self.set_retained(None);
        self.held.members.fetch_sub(self.members.len() as u64, Ordering::Relaxed);
    }
}

impl Channel {
    fn new(policy: ChannelPolicy, now: i64, durable: bool, held: &Arc<Held>) -> Self {
        Channel {
            held: held.clone(),
            epoch: new_epoch(),
            serial: 0,
            assigned: 0,
            policy,
            history: VecDeque::new(),
            retained: None,
            trimmed_ts: None,
            first_serial: 1,
            dedupe: HashMap::new(),
            dedupe_order: VecDeque::new(),
            members: BTreeMap::new(),
            last_active: now,
            durable,
            stored: None,
            head_stored: false,
            history_loaded: true,
            pending: VecDeque::new(),
            removed: false,
        }
    }

    fn position(&self) -> proto::Position {
        proto::Position { epoch: self.epoch.to_string(), serial: self.serial }
    }

    /// Appends to history, counting it in the node's total.
    fn push_history(&mut self, d: Arc<Delivery>) {
        self.held.history.fetch_add(d.size as u64, Ordering::Relaxed);
        self.history.push_back(d);
    }

    /// Replaces the retained value, counting it in the node's total.
    fn set_retained(&mut self, r: Option<Arc<Delivery>>) {
        if let Some(old) = &self.retained {
            self.held.retained.fetch_sub(old.size as u64, Ordering::Relaxed);
        }
        if let Some(new) = &r {
            self.held.retained.fetch_add(new.size as u64, Ordering::Relaxed);
        }
        self.retained = r;
    }

    /// Adds (or replaces) a presence member, counting it in the node's total.
    fn add_member(&mut self, key: MemberKey, m: Member) {
        if self.members.insert(key, m).is_none() {
            self.held.members.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Removes a presence member, counting it out of the node's total.
    fn remove_member(&mut self, key: &MemberKey) -> Option<Member> {
        let m = self.members.remove(key);
        if m.is_some() {
            self.held.members.fetch_sub(1, Ordering::Relaxed);
        }
        m
    }

    fn head(&self, serial: u64) -> StoredChannel {
        StoredChannel {
            epoch: self.epoch.to_string(),
            serial,
            trimmed_ts: self.trimmed_ts.unwrap_or(0),
            last_active: self.last_active,
            key: self.stored.as_ref().map_or(0, |(k, _)| *k),
            first_serial: self.first_serial,
        }
    }

    /// Trims history by count and age; returns whether anything left by
    /// age (what left by count, every message records).
    fn trim(&mut self, now: i64) -> bool {
        while self.history.len() > self.policy.history_size {
            if let Some(d) = self.history.pop_front() {
                self.held.history.fetch_sub(d.size as u64, Ordering::Relaxed);
                self.trimmed_ts = Some(d.envelope.timestamp);
                self.first_serial = d.envelope.serial + 1;
            }
        }
        let min_ts = now.saturating_sub(self.policy.history_ttl.as_millis() as i64);
        let mut aged = false;
        while self.history.front().is_some_and(|d| d.envelope.timestamp < min_ts) {
            if let Some(d) = self.history.pop_front() {
                self.held.history.fetch_sub(d.size as u64, Ordering::Relaxed);
                self.trimmed_ts = Some(d.envelope.timestamp);
                self.first_serial = d.envelope.serial + 1;
                aged = true;
            }
        }
        if self.history_loaded
            && let Some((_, floor)) = &self.stored
        {
            floor.store(self.first_serial, Ordering::Relaxed);
        }
        aged
    }

    /// Forgets expired ids and those beyond `max`; returns them.
    fn forget_ids(&mut self, now: i64, max: usize) -> Vec<String> {
        let mut gone = Vec::new();
        while let Some((exp, _)) = self.dedupe_order.front() {
            if *exp > now && self.dedupe_order.len() <= max {
                break;
            }
            if let Some((_, id)) = self.dedupe_order.pop_front() {
                self.dedupe.remove(&id);
                gone.push(id);
            }
        }
        gone
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
        self.history_loaded
            && self.history.is_empty()
            && self.retained.is_none()
            && self.members.is_empty()
            && self.dedupe.is_empty()
            && self.pending.is_empty()
    }
}

/// What a publish needs after its channel's lock is released.
enum Started {
    /// Acknowledged (and delivered, unless a duplicate).
    Done(proto::PublishAck),
    /// Written; acknowledge once the fsync covers `ticket`, after
    /// delivering what it covers.
    Syncing { cell: Arc<Cell>, ticket: u64, ack: proto::PublishAck },
}

/// The single-node engine (see the module docs).
#[derive(Debug)]
pub struct LocalEngine {
    cfg: EngineConfig,
    channels: RwLock<HashMap<String, Arc<Cell>>>,
    hub: RwLock<Hub>,
    /// Abrupt leaves waiting for their grace to end: (time, channel, member).
    /// Grace is constant, so pushing at the back keeps it sorted.
    pending_leaves: Mutex<VecDeque<(i64, String, MemberKey)>>,
    store: Option<Arc<DiskStore>>,
    /// `$presence/` companions in `channels` (not counted by `max_channels`).
    companions: AtomicUsize,
    /// Channels the sweep has yet to visit in its current pass.
    sweep_queue: Mutex<Vec<(String, Arc<Cell>)>>,
    /// What every channel holds together (node-wide limits).
    held: Arc<Held>,
}

/// Channels one sweep visits: a node of a million channels is swept in
/// slices, a pass every ~50 s, so no tick holds the CPU (or the channel
/// map, for the pass's snapshot) long enough to delay publishes. Reads and
/// subscribes trim what they touch by themselves.
const SWEEP_SLICE: usize = 20_000;

/// What one subscribe covers: its filter, its presence companion, and the
/// oldest message it may replay (see [`Engine::subscribe`]).
#[derive(Clone, Copy)]
struct Scope<'a> {
    filter: &'a str,
    companion: Option<&'a str>,
    history_floor: Option<i64>,
    arrived_ns: Option<u64>,
}

/// Validates every position's shape before a subscribe changes anything:
/// a valid channel, in the filter's (or its presence companion's) scope,
/// with an epoch.
pub(super) fn check_positions(req: &proto::Subscribe, filter: &str, companion: Option<&str>) -> Result<(), CoreError> {
    for (name, pos) in &req.positions {
        channel::validate_channel(name).map_err(|e| channel::channel_error(name, e))?;
        let in_scope =
            channel::filter_matches(filter, name) || companion.is_some_and(|c| channel::filter_matches(c, name));
        if !in_scope {
            return Err(err(ErrorCode::BadPosition, format!("position for {name:?} does not match filter {filter:?}")));
        }
        if pos.epoch.is_empty() {
            return Err(err(ErrorCode::BadPosition, format!("position for {name:?} has an empty epoch")));
        }
    }
    Ok(())
}

/// Splits a replay at `floor`: what is older is announced as a gap with
/// reason `not_granted` (from `from`, to the newest message held back) and
/// left out; the rest is returned.
pub(super) fn not_granted_before(
    floor: i64,
    channel: &str,
    from: Option<proto::Position>,
    epoch: &str,
    replay: Vec<Arc<Delivery>>,
    out: &mut SubscribeOutcome,
) -> Vec<Arc<Delivery>> {
    let held = replay.iter().take_while(|d| d.envelope.timestamp < floor).count();
    if held == 0 {
        return replay;
    }
    let last = replay[held - 1].envelope.serial;
    out.replay.push(Outbound::Gap(proto::Gap {
        channel: channel.to_string(),
        from,
        to: Some(proto::Position { epoch: epoch.to_string(), serial: last }),
        reason: "not_granted".into(),
    }));
    replay.into_iter().skip(held).collect()
}

/// The order in which a subscribe locks several channels: a channel
/// before its presence companion (presence changes lock them in that
/// order), otherwise by name.
fn lock_order(name: &str) -> (&str, bool) {
    match name.strip_prefix(channel::PRESENCE_PREFIX) {
        Some(base) => (base, true),
        None => (name, false),
    }
}

impl LocalEngine {
    /// An empty engine whose state lives in memory only.
    pub fn new(cfg: EngineConfig) -> Self {
        LocalEngine {
            cfg,
            channels: RwLock::new(HashMap::new()),
            hub: RwLock::new(Hub::default()),
            pending_leaves: Mutex::new(VecDeque::new()),
            companions: AtomicUsize::new(0),
            sweep_queue: Mutex::new(Vec::new()),
            store: None,
            held: Arc::new(Held::default()),
        }
    }

    /// An engine over a store, with what the store held at `now`: history
    /// trimmed by today's rules, ids still in their window. When the last
    /// stop may have lost acknowledged messages (see [`Recovery`]), every
    /// channel starts a new epoch, so no client can mistake a reissued
    /// serial for one it saw.
    pub fn with_store(
        cfg: EngineConfig,
        store: Arc<DiskStore>,
        recovery: Recovery,
        now: i64,
    ) -> Result<Self, DiskError> {
        let new_epochs = recovery.tail_may_be_lost;
        let held = Arc::new(Held::default());
        // Heads only (histories are read when first used, or by the
        // background loader); on every core.
        let loaded = store.load_channels(|loaded| {
            let policy = cfg.policy_for(&loaded.name).clone();
            let mut ch = Channel::new(policy, now, true, &held);
            ch.head_stored = true;
            ch.history_loaded = false;
            ch.epoch = if new_epochs { new_epoch() } else { loaded.head.epoch.as_str().into() };
            ch.serial = loaded.head.serial;
            ch.assigned = loaded.head.serial;
            ch.trimmed_ts = (loaded.head.trimmed_ts != 0).then_some(loaded.head.trimmed_ts);
            ch.first_serial = loaded.head.first_serial.max(1);
            ch.stored = Some((loaded.head.key, loaded.floor));
            ch.last_active = loaded.head.last_active;
            let epoch = ch.epoch.to_string();
            let stamp = |mut env: proto::Envelope| {
                env.epoch.clone_from(&epoch);
                Delivery::new(env)
            };
            ch.set_retained(loaded.retained.map(stamp));
            let mut ids: Vec<(String, u64, i64)> = loaded.ids.into_iter().filter(|(_, _, exp)| *exp > now).collect();
            ids.sort_by_key(|(_, _, exp)| *exp);
            for (id, serial, exp) in ids {
                ch.dedupe.insert(id.clone(), (serial, exp));
                ch.dedupe_order.push_back((exp, id));
            }
            (loaded.name, ch)
        })?;
        let mut channels = HashMap::with_capacity(loaded.len());
        for (name, ch) in loaded {
            if new_epochs {
                store.put_head(&name, &ch.head(ch.serial));
            }
            channels.insert(name, Arc::new(Mutex::new(ch)));
        }
        if recovery.tail_may_be_lost {
            tracing::warn!(
                channels = channels.len(),
                "the machine restarted after an unclean stop and sync is not \"always\": the newest acknowledged \
                 messages may be lost, so every channel starts a new epoch (clients get an epoch_changed gap)"
            );
        }
        tracing::info!(
            channels = channels.len(),
            unclean = recovery.unclean,
            "storage opened; histories load in the background"
        );
        Ok(LocalEngine {
            cfg,
            channels: RwLock::new(channels),
            hub: RwLock::new(Hub::default()),
            pending_leaves: Mutex::new(VecDeque::new()),
            companions: AtomicUsize::new(0),
            sweep_queue: Mutex::new(Vec::new()),
            store: Some(store),
            held,
        })
    }

    /// Reads a stored channel's history on its first use: trimmed by
    /// today's rules (what falls out is removed from the store too) before
    /// deliveries are built for it.
    fn ensure_loaded(&self, name: &str, ch: &mut Channel, now: i64) -> Result<(), CoreError> {
        if ch.history_loaded {
            return Ok(());
        }
        let Some(store) = &self.store else {
            ch.history_loaded = true;
            return Ok(());
        };
        let key = ch.stored.as_ref().map_or(0, |(k, _)| *k);
        let history =
            store.load_history(name, key, ch.first_serial, ch.policy.history_size, &ch.epoch).map_err(|e| {
                tracing::error!(channel = name, error = %e, "cannot read a channel's history");
                storage_error(e)
            })?;
        // Messages history held but the store no longer does (a head
        // write lost with the machine after compaction dropped what it
        // trimmed): a resume by time from before the oldest one left is
        // reported as a gap.
        if let Some(first) = history.first()
            && first.serial > ch.first_serial
        {
            ch.trimmed_ts = Some(ch.trimmed_ts.unwrap_or(0).max(first.timestamp));
            ch.first_serial = first.serial;
        }
        for env in history {
            ch.push_history(Delivery::new(env));
        }
        ch.history_loaded = true;
        let aged = ch.trim(now);
        self.forget_on_disk(name, ch, aged);
        Ok(())
    }

    /// Reads every stored channel's history in the background, one channel
    /// locked at a time, so memory and the sweep's trimming reach channels
    /// no client has used since the start.
    pub fn spawn_loader(self: &Arc<Self>) {
        if self.store.is_none() {
            return;
        }
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new().name("storage-load".into()).spawn(move || {
            let started = std::time::Instant::now();
            let cells: Vec<(String, Arc<Cell>)> = match weak.upgrade() {
                Some(e) => e.channels.read().iter().map(|(k, c)| (k.clone(), c.clone())).collect(),
                None => return,
            };
            let mut messages = 0;
            for (name, cell) in cells {
                let Some(engine) = weak.upgrade() else { return };
                let mut ch = cell.lock();
                if !ch.removed && engine.ensure_loaded(&name, &mut ch, crate::core::router::now_ms()).is_ok() {
                    messages += ch.history.len();
                }
            }
            tracing::info!(messages, took = ?started.elapsed(), "storage: every channel's history is loaded");
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the storage loader; histories load when first used");
        }
    }

    /// The channel's cell, created (with a new epoch) if missing — unless
    /// the node holds `max_channels` already (presence companions, which
    /// come one per channel, are not counted: a leave always has its
    /// companion to announce on).
    fn cell(&self, name: &str, now: i64) -> Result<Arc<Cell>, CoreError> {
        if let Some(c) = self.channels.read().get(name) {
            return Ok(c.clone());
        }
        let mut map = self.channels.write();
        if let Some(c) = map.get(name) {
            return Ok(c.clone());
        }
        let companion = name.starts_with(channel::PRESENCE_PREFIX);
        if !companion && map.len().saturating_sub(self.companions.load(Ordering::Relaxed)) >= self.cfg.max_channels {
            metrics::counter!("switchboard_limit_exceeded_total", "limit" => "channels", "protocol" => "any")
                .increment(1);
            tracing::info!(limit = "channels", max = self.cfg.max_channels, "limit exceeded");
            return Err(err(
                ErrorCode::Unavailable,
                format!("the node holds its maximum of {} channels", self.cfg.max_channels),
            ));
        }
        if companion {
            self.companions.fetch_add(1, Ordering::Relaxed);
        }
        let durable = self.store.is_some() && !name.starts_with(channel::PRESENCE_PREFIX);
        let mut ch = Channel::new(self.cfg.policy_for(name).clone(), now, durable, &self.held);
        if durable && let Some(store) = &self.store {
            // Journaled before any of its messages, so a sync that covers a
            // message covers its epoch; if this write is lost, so is every
            // later one, and the channel is new again.
            let mut head = ch.head(0);
            let floor = store.new_channel(name, &mut head);
            ch.stored = Some((head.key, floor));
            ch.head_stored = true;
        }
        let cell = Arc::new(Mutex::new(ch));
        map.insert(name.to_string(), cell.clone());
        Ok(cell)
    }

    /// The channel locked, created if missing. Never called with another
    /// channel locked (it may take the map).
    fn lock_channel(&self, name: &str, now: i64) -> Result<Guard, CoreError> {
        loop {
            let guard = Mutex::lock_arc(&self.cell(name, now)?);
            if !guard.removed {
                return Ok(guard);
            }
        }
    }

    /// Registers a session.
    pub fn attach(&self, caller: &Caller, outbox: Arc<Outbox>) {
        self.hub.write().attach(caller, outbox);
    }

    /// Removes a session (see [`Engine::detach`]).
    pub fn detach(&self, session: SessionId, kind: CloseKind, now: i64) {
        let Some(s) = self.hub.write().detach(session) else { return };
        let key: MemberKey = (s.caller.client_id.clone(), s.caller.connection_id.clone());
        for ch in &s.presence {
            match kind {
                CloseKind::Clean => self.remove_member(ch, &key, now),
                CloseKind::Abrupt => {
                    let at = now + self.cfg.presence_grace.as_millis() as i64;
                    let Some(cell) = self.channels.read().get(ch).cloned() else { continue };
                    let mut c = cell.lock();
                    if let Some(m) = c.members.get_mut(&key) {
                        m.leave_at = Some(at);
                        self.pending_leaves.lock().push_back((at, ch.to_string(), key.clone()));
                    }
                }
            }
        }
    }

    /// Delivers one sequenced message: history, retained value, fan-out.
    fn deliver(&self, name: &str, ch: &mut Channel, delivery: Arc<Delivery>, from: SessionId, now: i64) {
        ch.serial = delivery.envelope.serial;
        if ch.policy.history_size > 0 {
            ch.push_history(delivery.clone());
        }
        let aged = ch.trim(now);
        self.forget_on_disk(name, ch, aged);
        if delivery.envelope.retain {
            ch.set_retained((!delivery.envelope.payload.is_empty()).then(|| delivery.clone()));
        }
        self.hub.read().fanout(&delivery, ch.policy.slow_policy, from);
    }

    /// Delivers the channel's publishes whose fsync is done, in order.
    fn deliver_synced(&self, name: &str, ch: &mut Channel, now: i64) {
        let Some(store) = &self.store else { return };
        while ch.pending.front().is_some_and(|p| store.is_synced(p.ticket)) {
            if let Some(p) = ch.pending.pop_front() {
                self.deliver(name, ch, p.delivery, p.from, now);
            }
        }
    }

    /// Refuses what would take the node past one of its limits: counted in
    /// `switchboard_limit_exceeded_total{limit}` and logged.
    fn over_limit(limit: &'static str, max: u64, what: &str) -> CoreError {
        metrics::counter!("switchboard_limit_exceeded_total", "limit" => limit, "protocol" => "any").increment(1);
        tracing::info!(limit, max, "limit exceeded");
        err(ErrorCode::Unavailable, format!("the node holds its maximum of {max} {what}"))
    }

    /// Checks a publish against the node's history and retained-value
    /// limits, before anything is written: refused only when it would grow
    /// what the node holds (a full channel's publish replaces its oldest
    /// message; a retained value replaces the previous one).
    fn check_held(&self, name: &str, ch: &Channel, env: &proto::Envelope) -> Result<(), CoreError> {
        if name.starts_with(channel::PRESENCE_PREFIX) {
            return Ok(());
        }
        let size = prost::Message::encoded_len(env) as u64;
        if ch.policy.history_size > 0 {
            let full = ch.history.len() + ch.pending.len() >= ch.policy.history_size;
            let frees = if full { ch.history.front().map_or(0, |d| d.size as u64) } else { 0 };
            let held = self.held.history.load(Ordering::Relaxed);
            if size > frees && held + size - frees > self.cfg.max_history_bytes {
                return Err(Self::over_limit("history_bytes", self.cfg.max_history_bytes, "bytes of history"));
            }
        }
        if env.retain && !env.payload.is_empty() {
            let frees = ch.retained.as_ref().map_or(0, |r| r.size as u64);
            let held = self.held.retained.load(Ordering::Relaxed);
            if size > frees && held + size - frees > self.cfg.max_retained_bytes {
                return Err(Self::over_limit(
                    "retained_bytes",
                    self.cfg.max_retained_bytes,
                    "bytes of retained values",
                ));
            }
        }
        Ok(())
    }

    /// Clears a retained value older than `channels.retained_ttl`, in the
    /// store too.
    fn expire_retained(&self, name: &str, ch: &mut Channel, now: i64) {
        let ttl = self.cfg.retained_ttl.as_millis() as i64;
        if ttl > 0 && ch.retained.as_ref().is_some_and(|r| r.envelope.timestamp + ttl <= now) {
            ch.set_retained(None);
            if ch.durable
                && let Some(store) = &self.store
            {
                store.remove_retained(name);
            }
        }
    }

    /// Records in the store that history lost messages by age (the head's
    /// first serial; compaction drops them).
    fn forget_on_disk(&self, name: &str, ch: &Channel, aged: bool) {
        if ch.durable
            && aged
            && let Some(store) = &self.store
        {
            store.put_head(name, &ch.head(ch.assigned));
        }
    }

    /// Sequences an envelope on a locked channel: writes it to the store
    /// (durable channels) and delivers it, or queues it for its fsync.
    fn append(
        &self,
        name: &str,
        ch: &mut Channel,
        mut env: proto::Envelope,
        from: SessionId,
        id: Option<(&str, i64)>,
        now: i64,
    ) -> Result<(proto::Position, Option<u64>), CoreError> {
        self.check_held(name, ch, &env)?;
        let serial = ch.assigned + 1;
        env.serial = serial;
        env.prev_serial = serial - 1;
        env.timestamp = now;
        ch.last_active = now;
        let mut ticket = None;
        if ch.durable
            && let Some(store) = &self.store
        {
            let keep = ch.policy.history_size as u64;
            let trim = (keep > 0 && serial > keep).then(|| serial - keep);
            // The oldest serial history holds once this message is in.
            let first_serial = trim.map_or(ch.first_serial, |out| ch.first_serial.max(out + 1));
            // The channel's trimmed timestamp once this message is in: the
            // timestamp of the message it pushes out (the newest possible,
            // this one's, if that is not at hand).
            let trimmed_ts = match trim {
                Some(out) => ch
                    .history
                    .iter()
                    .chain(ch.pending.iter().map(|p| &p.delivery))
                    .find(|d| d.envelope.serial == out)
                    .map_or(now, |d| d.envelope.timestamp),
                None => ch.trimmed_ts.unwrap_or(0),
            };
            // Stored without the epoch (the channel's head holds it).
            let stored = StoredMessage::encode(&env, trimmed_ts, first_serial);
            let head = (!ch.head_stored || keep == 0).then(|| ch.head(serial));
            let retained = env.retain.then(|| (!env.payload.is_empty()).then_some(stored.as_slice()));
            let batch = AppendBatch {
                channel: name,
                key: ch.stored.as_ref().map_or(0, |(k, _)| *k),
                head: head.as_ref(),
                message: (keep > 0).then_some((serial, stored.as_slice())),
                retained,
                id: id.map(|(id, exp)| (id, StoredId { serial, expires_ms: exp })),
            };
            ticket = Some(store.append(&batch).map_err(storage_error)?);
            ch.head_stored = true;
        }
        ch.assigned = serial;
        env.epoch = ch.epoch.to_string();
        let delivery = Delivery::accepted_at(env, mono_ns());
        let pos = proto::Position { epoch: ch.epoch.to_string(), serial };
        match (ticket, &self.store) {
            (Some(t), Some(store)) if store.sync_policy() == SyncPolicy::Always => {
                ch.pending.push_back(Pending { ticket: t, delivery, from });
                self.deliver_synced(name, ch, now);
                let waiting = ch.pending.iter().any(|p| p.ticket == t);
                Ok((pos, waiting.then_some(t)))
            }
            _ => {
                self.deliver(name, ch, delivery, from, now);
                Ok((pos, None))
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

    /// Forgets ids beyond the window or the per-channel bound, on disk too.
    fn forget_ids(&self, name: &str, ch: &mut Channel, now: i64) {
        let gone = ch.forget_ids(now, self.cfg.dedupe_max_per_channel);
        if ch.durable
            && !gone.is_empty()
            && let Some(store) = &self.store
        {
            store.remove_ids(name, gone.iter().map(String::as_str));
        }
    }

    /// The first half of a publish, under the channel's lock.
    fn start_publish(&self, caller: &Caller, req: proto::Publish, now: i64) -> Result<Started, CoreError> {
        let name = req.channel.clone();
        let mut ch = self.lock_channel(&name, now)?;
        let cell = ArcMutexGuard::mutex(&ch).clone();
        self.ensure_loaded(&name, &mut ch, now)?;
        if !req.id.is_empty() {
            self.forget_ids(&name, &mut ch, now);
            if let Some((serial, _)) = ch.dedupe.get(&req.id) {
                let ack =
                    proto::PublishAck { channel: name, epoch: ch.epoch.to_string(), serial: *serial, duplicate: true };
                // The first publish may still wait for its fsync: so does
                // its repeat.
                return Ok(match ch.pending.iter().find(|p| p.delivery.envelope.serial == *serial) {
                    Some(p) => Started::Syncing { cell: cell.clone(), ticket: p.ticket, ack },
                    None => Started::Done(ack),
                });
            }
        }
        let exp = now + self.cfg.dedupe_window.as_millis() as i64;
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
        let id = (!env.id.is_empty()).then(|| env.id.clone());
        let (pos, ticket) = self.append(&name, &mut ch, env, caller.session, id.as_deref().map(|i| (i, exp)), now)?;
        if let Some(id) = id {
            ch.dedupe.insert(id.clone(), (pos.serial, exp));
            ch.dedupe_order.push_back((exp, id));
            self.forget_ids(&name, &mut ch, now);
        }
        let ack = proto::PublishAck { channel: name, epoch: pos.epoch, serial: pos.serial, duplicate: false };
        drop(ch);
        Ok(match ticket {
            Some(ticket) => Started::Syncing { cell, ticket, ack },
            None => Started::Done(ack),
        })
    }

    /// Publishes (see [`Engine::publish`]): acknowledged once the store's
    /// sync policy is met. The router validated the name.
    pub async fn publish_at(
        &self,
        caller: &Caller,
        req: proto::Publish,
        now: i64,
    ) -> Result<proto::PublishAck, CoreError> {
        match self.start_publish(caller, req, now)? {
            Started::Done(ack) => Ok(ack),
            Started::Syncing { cell, ticket, ack } => {
                if let Some(store) = &self.store {
                    store.synced(ticket).await.map_err(storage_error)?;
                }
                let mut ch = cell.lock();
                self.deliver_synced(&ack.channel, &mut ch, now);
                Ok(ack)
            }
        }
    }
}

impl LocalEngine {
    /// Subscribes with no history floor (see [`Engine::subscribe`]).
    pub fn subscribe(
        &self,
        session: SessionId,
        req: &proto::Subscribe,
        now: i64,
    ) -> Result<SubscribeOutcome, CoreError> {
        self.subscribe_with(session, req, (None, None), now)
    }

    /// Subscribes (see [`Engine::subscribe`]) with a history floor and when
    /// the request arrived. The router validated the filter.
    pub fn subscribe_with(
        &self,
        session: SessionId,
        req: &proto::Subscribe,
        (history_floor, arrived_ns): (Option<i64>, Option<u64>),
        now: i64,
    ) -> Result<SubscribeOutcome, CoreError> {
        if let Some(shared) = super::hub::begin_subscribe(&self.hub, session, req, self.cfg.max_shared_groups)? {
            return Ok(shared);
        }
        let filter = req.filter.as_str();
        let companion = req.presence.then(|| channel::presence_channel(filter));
        check_positions(req, filter, companion.as_deref())?;
        let rewind = req.rewind.filter(|r| r.count > 0 || r.duration_ms > 0);
        let since = (req.since_ms > 0).then_some(req.since_ms as i64);
        let concrete = channel::is_concrete(filter);
        let scan = !concrete && (rewind.is_some() || req.retained || since.is_some() || arrived_ns.is_some());

        // Channels named outright exist (with an epoch) before anything is
        // locked; then, with the map held for reading, the ones a wildcard
        // finds.
        let mut named: Vec<String> = Vec::new();
        if concrete {
            named.push(filter.to_string());
        }
        named.extend(req.positions.keys().filter(|k| k.as_str() != filter).cloned());
        loop {
            for n in &named {
                self.cell(n, now)?;
            }
            let map = self.channels.read();
            // (name, cell) in reply order.
            let mut targets: Vec<(String, Arc<Cell>)> = Vec::new();
            let mut missing = false;
            for n in &named {
                match map.get(n) {
                    Some(c) => targets.push((n.clone(), c.clone())),
                    None => missing = true,
                }
            }
            if missing {
                continue; // forgotten by the sweep meanwhile
            }
            if let (true, Some(c), Some(_)) = (concrete, companion.as_ref(), since)
                && !req.positions.contains_key(c)
                && let Some(cell) = map.get(c)
            {
                targets.push((c.clone(), cell.clone()));
            }
            if scan {
                let mut matching: Vec<(String, Arc<Cell>)> = map
                    .iter()
                    .filter(|(k, _)| {
                        let in_scope = channel::filter_matches(filter, k)
                            || companion.as_deref().is_some_and(|c| since.is_some() && channel::filter_matches(c, k));
                        in_scope && !req.positions.contains_key(*k)
                    })
                    .map(|(k, c)| (k.clone(), c.clone()))
                    .collect();
                matching.sort_by(|a, b| a.0.cmp(&b.0));
                targets.extend(matching);
            }
            // Lock in the one order, then keep the guards in reply order.
            let mut order: Vec<usize> = (0..targets.len()).collect();
            order.sort_by(|a, b| lock_order(&targets[*a].0).cmp(&lock_order(&targets[*b].0)));
            let mut guards: Vec<Option<Guard>> = (0..targets.len()).map(|_| None).collect();
            for i in order {
                guards[i] = Some(Mutex::lock_arc(&targets[i].1));
            }
            let mut guards: Vec<Guard> = guards.into_iter().flatten().collect();
            if guards.iter().any(|g| g.removed) {
                continue;
            }
            if !scan {
                drop(map);
            }
            let scope = Scope { filter, companion: companion.as_deref(), history_floor, arrived_ns };
            let out = self.subscribe_locked(session, req, &scope, &targets, &mut guards, now)?;
            return Ok(out);
        }
    }

    /// Validates positions against the locked channels, computes each
    /// channel's state and replay, and registers the subscription.
    fn subscribe_locked(
        &self,
        session: SessionId,
        req: &proto::Subscribe,
        scope: &Scope<'_>,
        targets: &[(String, Arc<Cell>)],
        guards: &mut [Guard],
        now: i64,
    ) -> Result<SubscribeOutcome, CoreError> {
        let Scope { filter, companion, history_floor, arrived_ns } = *scope;
        for ((name, _), ch) in targets.iter().zip(guards.iter()) {
            if let Some(pos) = req.positions.get(name)
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
        let since = (req.since_ms > 0).then_some(req.since_ms as i64);
        let mut out = SubscribeOutcome {
            subscribed: proto::Subscribed { filter: filter.to_string(), channels: Vec::new() },
            replay: Vec::new(),
        };
        for ((name, _), ch) in targets.iter().zip(guards.iter_mut()) {
            self.ensure_loaded(name, ch, now)?;
            let aged = ch.trim(now);
            self.forget_on_disk(name, ch, aged);
            let mut state = proto::ChannelState {
                channel: name.clone(),
                epoch: ch.epoch.to_string(),
                serial: ch.serial,
                recovered: false,
            };
            let mut replay: Vec<Arc<Delivery>> = Vec::new();
            self.expire_retained(name, ch, now);
            let mut want_retained = req.retained;
            if let Some(pos) = req.positions.get(name) {
                let recovered = if pos.epoch == ch.epoch.as_ref() { ch.after(pos.serial) } else { None };
                match recovered {
                    Some(msgs) => {
                        state.recovered = true;
                        want_retained = false;
                        replay = msgs;
                        if let Some(floor) = history_floor {
                            replay = not_granted_before(floor, name, Some(pos.clone()), &ch.epoch, replay, &mut out);
                        }
                    }
                    None if pos.epoch == ch.epoch.as_ref() => {
                        out.replay.push(Outbound::Gap(proto::Gap {
                            channel: name.clone(),
                            from: Some(pos.clone()),
                            to: Some(ch.position()),
                            reason: "trimmed".into(),
                        }));
                    }
                    None => {
                        // Another epoch: what the client saw went with it,
                        // but what the new epoch holds did not. The gap ends
                        // just before the oldest message history holds, and
                        // the replay is that history, from its first.
                        let first = ch.history.front().map_or(ch.serial + 1, |d| d.envelope.serial);
                        let to = proto::Position { epoch: ch.epoch.to_string(), serial: first - 1 };
                        out.replay.push(Outbound::Gap(proto::Gap {
                            channel: name.clone(),
                            from: Some(pos.clone()),
                            to: Some(to.clone()),
                            reason: "epoch_changed".into(),
                        }));
                        replay = ch.history.iter().cloned().collect();
                        // Without `history`, only the recovery window of it.
                        if let Some(floor) = history_floor {
                            replay = not_granted_before(floor, name, Some(to), &ch.epoch, replay, &mut out);
                        }
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
                    if let Some(floor) = history_floor.filter(|f| *f > since) {
                        // What was accepted between `since` and the floor,
                        // history holds but this caller may not read.
                        if replay.first().is_some_and(|d| d.envelope.timestamp < floor) {
                            replay = not_granted_before(floor, name, None, &ch.epoch, replay, &mut out);
                        }
                    }
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
            } else if let Some(arrived) = arrived_ns {
                // What was accepted after the request reached the gateway:
                // a publish that raced it on another connection, handled
                // first (#13 item 18). Read back from storage counts as older.
                let recent: Vec<_> = ch.history.iter().rev().take_while(|d| d.accepted_ns > arrived).cloned().collect();
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

        // Register last: nothing above can fail after this point.
        self.hub.write().subscribe(session, filter, companion, req.no_local)?;
        Ok(out)
    }

    /// Unsubscribes a filter and its presence companion (an explicit
    /// `$presence/...` subscription of the same session stays).
    pub fn unsubscribe(&self, session: SessionId, filter: &str) -> Result<(), CoreError> {
        self.hub.write().unsubscribe(session, filter)
    }

    /// Appends a presence event to `$presence/<channel>`, whose cell the
    /// caller fetched before locking `channel` (so no map lock is taken
    /// while a channel is held).
    fn presence_event(
        &self,
        presence: &Arc<Cell>,
        channel: &str,
        kind: proto::Kind,
        (key, protocol, data): (&MemberKey, proto::Protocol, Bytes),
        now: i64,
    ) {
        crate::core::lifecycle::emit_presence(&self.cfg.lifecycle, kind, channel, key, protocol, &data, now);
        let name = channel::presence_channel(channel);
        let env = proto::Envelope {
            channel: name.clone(),
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
        let mut pc = presence.lock();
        // Presence channels are never stored, so this cannot fail.
        let _ = self.append(&name, &mut pc, env, 0, None, now);
    }

    /// The `$presence/` companion's cell, for [`Self::presence_event`]
    /// (companions are not capped, so this always finds or makes one).
    fn presence_cell(&self, channel: &str, now: i64) -> Arc<Cell> {
        let name = channel::presence_channel(channel);
        loop {
            let Ok(cell) = self.cell(&name, now) else { continue };
            if !cell.lock().removed {
                return cell;
            }
        }
    }

    fn remove_member(&self, channel: &str, key: &MemberKey, now: i64) {
        let Some(cell) = self.channels.read().get(channel).cloned() else { return };
        let presence = self.presence_cell(channel, now);
        let mut c = cell.lock();
        let Some(m) = c.remove_member(key) else { return };
        // A leave is activity: the channel keeps its position for another
        // idle period, so a caught-up client recovers without a false gap.
        c.last_active = now;
        self.presence_event(&presence, channel, proto::Kind::PresenceLeave, (key, m.protocol, m.data), now);
    }

    /// Enters or updates presence (see [`Engine::presence_enter`]).
    pub fn presence_enter(
        &self,
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
        let presence = self.presence_cell(name, now);
        let mut ch = self.lock_channel(name, now)?;
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
            let node_max = self.cfg.max_presence_members;
            if resumed.is_none() && self.held.members.load(Ordering::Relaxed) >= node_max {
                return Err(Self::over_limit("presence_members", node_max, "presence members"));
            }
            if let Some((old, _)) = &resumed {
                ch.remove_member(old);
            }
            ch.add_member(key.clone(), Member { data: data.clone(), protocol: caller.protocol, leave_at: None });
            match resumed {
                Some((_, old_data)) if old_data == data => None,
                Some(_) => Some(proto::Kind::PresenceUpdate),
                None => Some(proto::Kind::PresenceEnter),
            }
        };
        self.hub.write().note_presence(caller.session, name, true);
        if let Some(kind) = kind {
            self.presence_event(&presence, name, kind, (&key, caller.protocol, data), now);
        }
        Ok(())
    }

    /// Leaves presence.
    pub fn presence_leave(&self, caller: &Caller, name: &str, now: i64) -> Result<(), CoreError> {
        let key: MemberKey = (caller.client_id.clone(), caller.connection_id.clone());
        let present = self.channels.read().get(name).cloned().is_some_and(|c| c.lock().members.contains_key(&key));
        if !present {
            return Err(err(ErrorCode::BadRequest, format!("not present on {name:?}")));
        }
        self.hub.write().note_presence(caller.session, name, false);
        self.remove_member(name, &key, now);
        Ok(())
    }

    /// Lists a channel's members (those within their grace included).
    pub fn presence_members(&self, name: &str) -> proto::PresenceMembers {
        let cell = self.channels.read().get(name).cloned();
        let members = cell
            .map(|c| {
                c.lock()
                    .members
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
    pub fn history(&self, req: &proto::History, now: i64) -> Result<proto::HistoryResult, CoreError> {
        let page_max = self.cfg.history_page_max;
        let Some(cell) = self.channels.read().get(&req.channel).cloned() else {
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
        let mut ch = cell.lock();
        self.ensure_loaded(&req.channel, &mut ch, now)?;
        let aged = ch.trim(now);
        self.forget_on_disk(&req.channel, &ch, aged);
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
        // At most `history_page_bytes` of envelopes, but never an empty page
        // while messages remain (so paging always moves on).
        let mut bytes = 0;
        let fits = |d: &&Arc<Delivery>| {
            let first = bytes == 0;
            bytes += prost::Message::encoded_len(&d.envelope);
            first || bytes <= self.cfg.history_page_bytes
        };
        let messages: Vec<proto::Envelope> = if req.reverse {
            range.rev().take(limit).take_while(fits).map(|d| d.envelope.clone()).collect()
        } else {
            range.take(limit).take_while(fits).map(|d| d.envelope.clone()).collect()
        };
        Ok(proto::HistoryResult {
            channel: req.channel.clone(),
            epoch: ch.epoch.to_string(),
            serial: ch.serial,
            messages,
        })
    }

    /// Housekeeping (see [`Engine::sweep`]): one channel locked at a time,
    /// so publishes elsewhere go on.
    pub fn sweep(&self, now: i64) {
        loop {
            let due = {
                let mut leaves = self.pending_leaves.lock();
                match leaves.front() {
                    Some((at, _, _)) if *at <= now => leaves.pop_front(),
                    _ => None,
                }
            };
            let Some((at, ch, key)) = due else { break };
            // Only if the member is still the one that was left pending.
            let cell = self.channels.read().get(&ch).cloned();
            let still = cell.is_some_and(|c| c.lock().members.get(&key).is_some_and(|m| m.leave_at == Some(at)));
            if still {
                self.remove_member(&ch, &key, now);
            }
        }
        let idle_ttl = self.cfg.idle_channel_ttl.as_millis() as i64;
        let cells: Vec<(String, Arc<Cell>)> = {
            let mut queue = self.sweep_queue.lock();
            if queue.is_empty() {
                *queue = self.channels.read().iter().map(|(k, c)| (k.clone(), c.clone())).collect();
            }
            let from = queue.len().saturating_sub(SWEEP_SLICE);
            queue.split_off(from)
        };
        let mut idle = Vec::new();
        for (name, cell) in &cells {
            let mut ch = cell.lock();
            if ch.removed || !ch.history_loaded {
                continue; // forgotten since the pass began; or the background loader trims it as it reads it
            }
            let aged = ch.trim(now);
            self.forget_on_disk(name, &ch, aged);
            self.forget_ids(name, &mut ch, now);
            self.expire_retained(name, &mut ch, now);
            if ch.is_idle() && now - ch.last_active > idle_ttl {
                idle.push(name.clone());
            }
        }
        if !idle.is_empty() {
            let mut map = self.channels.write();
            for name in idle {
                let Some(cell) = map.get(&name).cloned() else { continue };
                let mut ch = cell.lock();
                if ch.is_idle() && now - ch.last_active > idle_ttl {
                    ch.removed = true;
                    map.remove(&name);
                    if name.starts_with(channel::PRESENCE_PREFIX) {
                        self.companions.fetch_sub(1, Ordering::Relaxed);
                    }
                    if ch.durable
                        && let Some(store) = &self.store
                    {
                        store.remove_channel(&name, ch.stored.as_ref().map_or(0, |(k, _)| *k));
                    }
                }
            }
        }
        if let Some(store) = &self.store {
            store.refresh_size();
        }
    }

    /// Current counts.
    pub fn stats(&self) -> EngineStats {
        // The node's totals, not a walk over every channel's lock.
        EngineStats {
            channels: self.channels.read().len(),
            subscriptions: self.hub.read().subscriptions(),
            presence_members: self.held.members.load(Ordering::Relaxed) as usize,
            history_bytes: self.held.history.load(Ordering::Relaxed),
            retained_bytes: self.held.retained.load(Ordering::Relaxed),
        }
    }
}

#[async_trait::async_trait]
impl Engine for LocalEngine {
    fn attach(&self, caller: &Caller, outbox: Arc<Outbox>) {
        LocalEngine::attach(self, caller, outbox);
    }

    fn detach(&self, session: SessionId, kind: CloseKind, now_ms: i64) {
        LocalEngine::detach(self, session, kind, now_ms);
    }

    async fn publish(&self, caller: &Caller, req: proto::Publish, now_ms: i64) -> Result<proto::PublishAck, CoreError> {
        self.publish_at(caller, req, now_ms).await
    }

    async fn subscribe(
        &self,
        session: SessionId,
        req: &proto::Subscribe,
        history_floor_ms: Option<i64>,
        arrived_ns: Option<u64>,
        now_ms: i64,
    ) -> Result<SubscribeOutcome, CoreError> {
        LocalEngine::subscribe_with(self, session, req, (history_floor_ms, arrived_ns), now_ms)
    }

    async fn unsubscribe(&self, session: SessionId, filter: &str) -> Result<(), CoreError> {
        LocalEngine::unsubscribe(self, session, filter)
    }

    async fn presence_enter(
        &self,
        caller: &Caller,
        channel: &str,
        data: Bytes,
        update: bool,
        now_ms: i64,
    ) -> Result<(), CoreError> {
        LocalEngine::presence_enter(self, caller, channel, data, update, now_ms)
    }

    async fn presence_leave(&self, caller: &Caller, channel: &str, now_ms: i64) -> Result<(), CoreError> {
        LocalEngine::presence_leave(self, caller, channel, now_ms)
    }

    async fn presence_members(&self, channel: &str) -> Result<proto::PresenceMembers, CoreError> {
        Ok(LocalEngine::presence_members(self, channel))
    }

    async fn history(&self, req: &proto::History, now_ms: i64) -> Result<proto::HistoryResult, CoreError> {
        LocalEngine::history(self, req, now_ms)
    }

    fn sweep(&self, now_ms: i64) {
        LocalEngine::sweep(self, now_ms);
    }

    fn stats(&self) -> EngineStats {
        LocalEngine::stats(self)
    }

    fn health(&self) -> Result<(), String> {
        match self.store.as_ref().and_then(|s| s.failure()) {
            Some(f) => Err(f),
            None => Ok(()),
        }
    }

    fn leave_pending_presence(&self, now_ms: i64) {
        // Presence is not kept across a restart: whoever is still within
        // the grace period will not come back to this process.
        loop {
            let Some((at, ch, key)) = self.pending_leaves.lock().pop_front() else { break };
            let cell = self.channels.read().get(&ch).cloned();
            let still = cell.is_some_and(|c| c.lock().members.get(&key).is_some_and(|m| m.leave_at == Some(at)));
            if still {
                self.remove_member(&ch, &key, now_ms);
            }
        }
    }

    fn close(&self) {
        if let Some(store) = &self.store {
            store.close();
        }
    }
}

#[cfg(test)]
impl LocalEngine {
    /// Whether a channel's history is in memory yet.
    pub(crate) fn history_loaded(&self, channel: &str) -> bool {
        self.channels.read().get(channel).is_some_and(|c| c.lock().history_loaded)
    }

    /// A publish on an engine without a store, which never waits.
    pub(crate) fn publish(&self, caller: &Caller, req: proto::Publish, now: i64) -> proto::PublishAck {
        self.try_publish(caller, req, now).unwrap_or_else(|e| panic!("publish failed: {e}"))
    }

    /// A publish on an engine without a store: its ack or why it was refused.
    pub(crate) fn try_publish(
        &self,
        caller: &Caller,
        req: proto::Publish,
        now: i64,
    ) -> Result<proto::PublishAck, CoreError> {
        match self.start_publish(caller, req, now)? {
            Started::Done(ack) => Ok(ack),
            Started::Syncing { .. } => panic!("a memory engine never waits for a sync"),
        }
    }
}

#[cfg(test)]
#[path = "local_tests.rs"]
mod tests;
