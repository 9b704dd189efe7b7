//! The engine seam: where channel state lives.
//!
//! The [`crate::core::router::Router`] validates, authorises, counts and
//! keeps sessions; an [`Engine`] sequences publications, keeps history,
//! dedupe windows, retained values and presence, and hands each message to
//! the node's fan-out. The router sees only this trait, so which engine runs
//! is configuration. What must be shared or durable is apart from what is
//! node-local:
//!
//! | part | what | here |
//! |---|---|---|
//! | log and channel state | append with idempotency → position; reads by position, last N or time; heads and epochs; retained values; the dedupe window | [`local::LocalEngine`], in memory or over a [`disk::DiskStore`] (`[storage]`) |
//! | presence | members, enter/update/leave, leave after the grace period | [`local::LocalEngine`] (per channel, under the channel's lock, so events follow the changes in order) |
//! | MQTT session store | claim and takeover, subscriptions, positions, inbound QoS 2 ids, delayed wills | [`mqtt_sessions::MqttSessions`], behind the front end's `SessionStore` port; on disk with the store |
//! | node-local fan-out | sessions, the filter trie, shared groups, outboxes and their slow-consumer policies | [`hub::Hub`], always in process |
//!
//! The shared engine, [`nats::NatsEngine`] (`[engine] kind = "nats"`),
//! implements [`Engine`] with its log in JetStream streams, retained values
//! and presence in KV buckets, and the same hub; its MQTT session store,
//! [`nats::mqtt::NatsSessions`], keeps sessions in a KV bucket. The front
//! ends and the router do not change (docs/cluster.md).

pub mod disk;
pub mod hub;
pub mod local;
pub mod mqtt_sessions;
pub mod nats;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use switchboard_proto as proto;
use switchboard_protocols::port::{CloseKind, CoreError, Outbox, SessionId, SlowPolicy, SubscribeOutcome};

/// Who is acting: the session and its identity.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Session id (0 for requests without a session, e.g. REST).
    pub session: SessionId,
    /// Client identity; empty when anonymous.
    pub client_id: Arc<str>,
    /// Connection id (unique per session).
    pub connection_id: Arc<str>,
    /// Front end.
    pub protocol: proto::Protocol,
}

/// Per-channel policy, chosen by the first matching rule in config.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelPolicy {
    /// Messages kept in history (0 disables history and recovery).
    pub history_size: usize,
    /// Oldest age kept in history.
    pub history_ttl: Duration,
    /// What a full outbox does with this channel's messages.
    pub slow_policy: SlowPolicy,
}

impl Default for ChannelPolicy {
    fn default() -> Self {
        ChannelPolicy { history_size: 1000, history_ttl: Duration::from_secs(600), slow_policy: SlowPolicy::Disconnect }
    }
}

/// A channel policy applied to channels matching `pattern` (an MQTT filter).
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelRule {
    /// Validated MQTT filter.
    pub pattern: String,
    /// Policy for matching channels.
    pub policy: ChannelPolicy,
}

/// What every engine needs to know.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// This node's name (stamped on envelopes).
    pub node: String,
    /// Rules, first match wins; `default_policy` otherwise.
    pub rules: Vec<ChannelRule>,
    /// Policy of channels no rule matches.
    pub default_policy: ChannelPolicy,
    /// How long a publish id is remembered.
    pub dedupe_window: Duration,
    /// Most ids remembered per channel (oldest forgotten first).
    pub dedupe_max_per_channel: usize,
    /// How long an abruptly disconnected member stays present.
    pub presence_grace: Duration,
    /// Most members per channel.
    pub presence_max_members: usize,
    /// How long an empty, inactive channel keeps its position (so a caught-up
    /// client still recovers without a false gap).
    pub idle_channel_ttl: Duration,
    /// Largest history page, in messages.
    pub history_page_max: usize,
    /// Largest history page, in bytes of envelopes (one message at least).
    pub history_page_bytes: usize,
    /// Most MQTT 5 shared subscription groups on the node (each distinct
    /// `$share/{group}/{filter}`; joining an existing group is not limited).
    pub max_shared_groups: usize,
    /// Most channels on the node (`$presence/` companions not counted: one
    /// comes with each channel).
    pub max_channels: usize,
    /// Most bytes of history the node holds (every channel's, as queued
    /// deliveries count them): a publish that would grow it past this is
    /// refused.
    pub max_history_bytes: u64,
    /// Most bytes of retained values the node holds.
    pub max_retained_bytes: u64,
    /// How long a retained value lives (zero: until replaced or cleared).
    pub retained_ttl: Duration,
    /// Most presence members on the node, every channel's together.
    pub max_presence_members: u64,
    /// Where presence enter, update and leave events go as lifecycle
    /// events (webhooks); off by default.
    pub lifecycle: crate::core::lifecycle::Lifecycle,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            node: "node-1".into(),
            rules: Vec::new(),
            default_policy: ChannelPolicy::default(),
            dedupe_window: Duration::from_secs(120),
            dedupe_max_per_channel: 10_000,
            presence_grace: Duration::from_secs(5),
            presence_max_members: 10_000,
            idle_channel_ttl: Duration::from_secs(3600),
            history_page_max: 1000,
            history_page_bytes: 1024 * 1024,
            max_shared_groups: 10_000,
            max_channels: 1_000_000,
            max_history_bytes: 2 << 30,
            max_retained_bytes: 256 << 20,
            retained_ttl: Duration::ZERO,
            max_presence_members: 1_000_000,
            lifecycle: crate::core::lifecycle::Lifecycle::default(),
        }
    }
}

impl EngineConfig {
    /// The policy of `channel` (presence channels follow their base channel).
    pub fn policy_for(&self, channel: &str) -> &ChannelPolicy {
        let base = channel.strip_prefix(crate::core::channel::PRESENCE_PREFIX).unwrap_or(channel);
        self.rules
            .iter()
            .find(|r| crate::core::channel::filter_matches(&r.pattern, base))
            .map(|r| &r.policy)
            .unwrap_or(&self.default_policy)
    }
}

/// Counts for metrics and the admin API.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Channels with state.
    pub channels: usize,
    /// (filter, session) subscriptions.
    pub subscriptions: usize,
    /// Presence members over all channels.
    pub presence_members: usize,
    /// Bytes of history over all channels (`limits.max_history_bytes`).
    pub history_bytes: u64,
    /// Bytes of retained values over all channels (`limits.max_retained_bytes`).
    pub retained_bytes: u64,
}

/// Channel state and fan-out. Methods take `now_ms` (Unix milliseconds) so
/// engines are testable without clocks.
#[async_trait::async_trait]
pub trait Engine: Send + Sync + 'static {
    /// Registers a local session's outbox.
    fn attach(&self, caller: &Caller, outbox: Arc<Outbox>);
    /// Removes a session: its subscriptions now, its presence now (clean) or
    /// after the grace period (abrupt).
    fn detach(&self, session: SessionId, kind: CloseKind, now_ms: i64);
    /// Sequences, dedupes, stores and fans out one publication.
    async fn publish(&self, caller: &Caller, req: proto::Publish, now_ms: i64) -> Result<proto::PublishAck, CoreError>;
    /// Registers a subscription and computes what to replay first. With a
    /// `history_floor_ms` (the caller may not read history), recovery from
    /// a position and resume by time replay nothing older than it: what
    /// they would have replayed before it becomes a gap with reason
    /// `not_granted`. With `arrived_ns` (when the request reached the
    /// gateway, [`mono_ns`](switchboard_protocols::port::mono_ns)), a channel the request names
    /// no position, time or rewind for replays what history holds that was
    /// accepted after that instant
    /// ([`Core::subscribe_arrived`](switchboard_protocols::port::Core::subscribe_arrived)).
    async fn subscribe(
        &self,
        session: SessionId,
        req: &proto::Subscribe,
        history_floor_ms: Option<i64>,
        arrived_ns: Option<u64>,
        now_ms: i64,
    ) -> Result<SubscribeOutcome, CoreError>;
    /// Removes a subscription (and its presence companion).
    async fn unsubscribe(&self, session: SessionId, filter: &str) -> Result<(), CoreError>;
    /// Enters or updates presence.
    async fn presence_enter(
        &self,
        caller: &Caller,
        channel: &str,
        data: Bytes,
        update: bool,
        now_ms: i64,
    ) -> Result<(), CoreError>;
    /// Leaves presence.
    async fn presence_leave(&self, caller: &Caller, channel: &str, now_ms: i64) -> Result<(), CoreError>;
    /// Lists members.
    async fn presence_members(&self, channel: &str) -> Result<proto::PresenceMembers, CoreError>;
    /// Reads history.
    async fn history(&self, req: &proto::History, now_ms: i64) -> Result<proto::HistoryResult, CoreError>;
    /// Periodic housekeeping: trims history by age, forgets old ids, ends
    /// presence whose grace ran out, drops idle empty channels.
    fn sweep(&self, now_ms: i64);
    /// Current counts.
    fn stats(&self) -> EngineStats;
    /// `Err` with the reason while the engine cannot accept publishes
    /// (a failed store): `/readyz` reports it.
    fn health(&self) -> Result<(), String> {
        Ok(())
    }
    /// The node is stopping: members still within their presence grace
    /// (sessions that ended abruptly, or were closed by the drain) leave
    /// now, so their leave is announced (and reaches webhooks) before the
    /// node goes. An engine whose presence outlives the node (NATS: the
    /// survivors announce a dead node's leaves) does nothing.
    fn leave_pending_presence(&self, _now_ms: i64) {}
    /// Flushes and releases what the engine holds (clean shutdown).
    fn close(&self) {}
}
