//! The NATS JetStream engine (`[engine] kind = "nats"`): several gateway
//! nodes share one set of channels through a JetStream cluster.
//!
//! | part | where |
//! |---|---|
//! | messages, positions, history, the dedupe window | one stream per distinct history policy (`{stream}_H{size}_T{secs}`, subjects `{subject}.h{size}t{secs}.{channel tokens}`): the serial is the stream sequence, `prev_serial` is written by the publisher and checked by JetStream (`Nats-Expected-Last-Subject-Sequence`), the idempotency key is the `Nats-Msg-Id` |
//! | retained values | KV bucket `{stream}_retained`, one key per channel |
//! | presence | KV bucket `{stream}_presence`, one key per member; events are messages on `$presence/…` like any other |
//! | node liveness | KV bucket `{stream}_nodes` (a heartbeat per node; a node's members leave after the grace once its key expires) |
//! | live fan-out | one ordered consumer per stream per node, reading only the subjects the node's subscriptions need ([`live`]), feeds the node's [`Hub`] |
//!
//! The epoch of every channel of a stream is derived from the stream's
//! creation time: it changes only when the stream is deleted (its history
//! really lost), never when a node restarts. Every node reads the same
//! message with the same serial, `prev_serial` and epoch, so a position
//! taken on one node resumes on any other.
//!
//! Subscribing registers the subscription with the hub first, under the
//! stream's live lock (widening the consumer if it does not read the
//! subscription's channels yet), and notes up to where each channel is
//! replay: what the consumer delivers after that goes live to the
//! subscriber, and the replay is read from JetStream up to exactly that
//! point. Replay and live neither overlap nor leave a hole.

mod live;
pub mod mqtt;
mod presence;
pub mod subjects;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use async_nats::{HeaderMap, header};
use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use prost::Message as _;
use rand::Rng as _;
use switchboard_proto::{self as proto, ErrorCode};
use switchboard_protocols::port::{CloseKind, CoreError, Delivery, Outbound, Outbox, SessionId, SubscribeOutcome};

use super::hub::Hub;
use super::{Caller, ChannelPolicy, Engine, EngineConfig, EngineStats};
use crate::core::channel;

/// How to reach NATS and what to call things there (`[nats]`).
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// Server URLs (`nats://host:port`, `tls://host:port`).
    pub servers: Vec<String>,
    /// User and password (both or neither).
    pub user: String,
    /// Password for `user`.
    pub password: String,
    /// Token authentication.
    pub token: String,
    /// File holding an NKey seed (`SU…`).
    pub nkey_seed_file: Option<PathBuf>,
    /// A `.creds` file (user JWT and NKey seed).
    pub creds_file: Option<PathBuf>,
    /// CA bundle that the NATS servers' certificates chain to.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key for mutual TLS.
    pub tls_cert: Option<(PathBuf, PathBuf)>,
    /// Refuse a connection without TLS.
    pub tls_required: bool,
    /// Prefix of stream and bucket names.
    pub stream: String,
    /// Root subject of the message streams.
    pub subject: String,
    /// Replicas of every stream and bucket (1 or 3 on a 3-node cluster).
    pub replicas: usize,
    /// Longest wait for the first connection.
    pub connect_timeout: Duration,
    /// Longest wait for a JetStream reply (a publish's ack, a read).
    pub request_timeout: Duration,
    /// Most channels a wildcard subscription replays from (rewind,
    /// retained values, resume by time): each is read from JetStream.
    pub max_wildcard_channels: usize,
}

impl Default for NatsOptions {
    fn default() -> Self {
        NatsOptions {
            servers: vec!["nats://127.0.0.1:4222".into()],
            user: String::new(),
            password: String::new(),
            token: String::new(),
            nkey_seed_file: None,
            creds_file: None,
            tls_ca: None,
            tls_cert: None,
            tls_required: false,
            stream: "SWITCHBOARD".into(),
            subject: "switchboard".into(),
            replicas: 1,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(3),
            max_wildcard_channels: 10_000,
        }
    }
}

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// No connection.
    #[error("cannot connect to NATS at {servers}: {reason}")]
    Connect {
        /// The configured servers.
        servers: String,
        /// What the client said.
        reason: String,
    },
    /// A stream or bucket could not be created or read.
    #[error("JetStream {what}: {reason}")]
    JetStream {
        /// Which stream or bucket.
        what: String,
        /// What the server said.
        reason: String,
    },
    /// Configuration the servers cannot honour.
    #[error("{0}")]
    Config(String),
}

fn js_error(what: impl Into<String>) -> impl FnOnce(String) -> NatsError {
    let what = what.into();
    move |reason| NatsError::JetStream { what, reason }
}

fn err(code: ErrorCode, msg: impl Into<String>) -> CoreError {
    CoreError::new(code, msg)
}

fn unavailable(what: impl std::fmt::Display) -> CoreError {
    err(ErrorCode::Unavailable, format!("NATS unavailable: {what}"))
}

/// How often a publish retries when another node moved the channel on
/// between reading its head and appending.
const MAX_APPEND_TRIES: usize = 16;

/// How often a read that ends before the message the leader named asks
/// again (2 ms apart) before it takes the answer.
const READ_LAG_TRIES: usize = 5;

/// Bytes an envelope adds around the payload, at most (channel, ids,
/// publisher, headers are bounded by the gateway's own limits).
const ENVELOPE_OVERHEAD: usize = 8 * 1024;

/// One history policy's stream.
struct Slot {
    history_size: usize,
    history_ttl: Duration,
    /// `{subject}.h{size}t{secs}`.
    root: String,
    stream: stream::Stream,
    epoch: Arc<str>,
    /// What this node's consumer reads and how far it got (see [`live`]).
    live: Mutex<live::Live>,
    /// Wakes the consumer's task when the cover changes.
    wake: tokio::sync::Notify,
    /// Set when subscriptions went: the cover may narrow.
    narrow: AtomicBool,
}

impl Slot {
    fn subject(&self, channel: &str) -> String {
        format!("{}.{}", self.root, subjects::tokens(channel))
    }

    fn position(&self, serial: u64) -> proto::Position {
        proto::Position { epoch: self.epoch.to_string(), serial }
    }
}

/// A channel's last serial as this node knows it, and the turn its local
/// publishers take (one append in flight per channel per node).
struct Head {
    turn: tokio::sync::Mutex<()>,
    /// Whether `last` is worth sending as the expected last serial.
    known: AtomicBool,
    /// The newest serial this node knows (from its acks or its consumer).
    last: AtomicU64,
    /// The serial of the channel's last message this node's consumer
    /// handed to the hub ([`UNSEEN`] before the first): the previous
    /// message of the next one the consumer reads.
    seen: AtomicU64,
    /// The channel's newest messages as the consumer read them, oldest
    /// first, consecutive: recoveries read them here instead of one
    /// JetStream request per message ([`RECENT_MAX`], [`RECENT_BYTES`]).
    recent: Mutex<VecDeque<Arc<Delivery>>>,
}

/// Most messages a node keeps of one channel in [`Head::recent`] (and never
/// more than the channel's history).
const RECENT_MAX: usize = 1000;

/// Most bytes a node keeps in [`Head::recent`] over all channels: past it,
/// a channel that needs more starts over empty.
const RECENT_BYTES: u64 = 128 << 20;

/// [`Head::seen`] of a channel the consumer has not read yet.
const UNSEEN: u64 = u64::MAX;

impl Default for Head {
    fn default() -> Self {
        Head {
            turn: tokio::sync::Mutex::new(()),
            known: AtomicBool::new(false),
            last: AtomicU64::new(0),
            seen: AtomicU64::new(UNSEEN),
            recent: Mutex::new(VecDeque::new()),
        }
    }
}

/// The stream epoch: the stream's creation time, in base 36.
fn epoch_of(created: time::OffsetDateTime) -> Arc<str> {
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut n = created.unix_timestamp_nanos().max(1) as u128;
    let mut out = Vec::new();
    while n > 0 {
        out.push(ALPHABET[(n % 36) as usize]);
        n /= 36;
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default().into()
}

/// The dedupe id of `id` on `channel` (JetStream dedupes per stream).
fn msg_id(channel: &str, id: &str) -> String {
    use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
    format!("{} {}", utf8_percent_encode(channel, NON_ALPHANUMERIC), utf8_percent_encode(id, NON_ALPHANUMERIC))
}

/// The channel's last serial as JetStream's refusal of an append names it
/// (`wrong last sequence: N`).
fn refused_last(e: &(dyn std::error::Error + 'static)) -> Option<u64> {
    const SAYS: &str = "wrong last sequence: ";
    let mut cur = Some(e);
    while let Some(x) = cur {
        let text = x.to_string();
        if let Some(i) = text.find(SAYS) {
            return text[i + SAYS.len()..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok();
        }
        cur = x.source();
    }
    None
}

/// Decodes a stored message into the envelope every node delivers.
fn decode(slot: &Slot, sequence: u64, payload: &[u8]) -> Option<proto::Envelope> {
    let mut env = proto::Envelope::decode(payload).ok()?;
    env.serial = sequence;
    env.epoch = slot.epoch.to_string();
    Some(env)
}

/// The NATS JetStream engine (see the module docs).
pub struct NatsEngine {
    cfg: EngineConfig,
    opts: NatsOptions,
    client: async_nats::Client,
    js: jetstream::Context,
    slots: Vec<Arc<Slot>>,
    retained: kv::Store,
    retained_stream: stream::Stream,
    presence: presence::Presence,
    hub: RwLock<Hub>,
    heads: Mutex<HashMap<String, Arc<Head>>>,
    /// Connection id → session, for no-local across the consumer.
    conns: Mutex<HashMap<Arc<str>, SessionId>>,
    /// Why a live consumer is not running, if one is not.
    live_failure: Mutex<Option<String>>,
    /// Connections made to NATS: a live consumer started before the last
    /// reconnect starts again at once.
    connects: Arc<AtomicU64>,
    /// Bytes in every channel's [`Head::recent`].
    recent_bytes: AtomicU64,
    sweeping: AtomicBool,
    this: OnceLock<Weak<NatsEngine>>,
}

impl std::fmt::Debug for NatsEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsEngine").field("servers", &self.opts.servers).finish_non_exhaustive()
    }
}

/// Connects with the configured credentials and TLS.
/// `connects` counts the connections made (the first and every reconnect).
async fn connect(opts: &NatsOptions, node: &str, connects: Arc<AtomicU64>) -> Result<async_nats::Client, NatsError> {
    let servers = opts.servers.join(",");
    let fail = |reason: String| NatsError::Connect { servers: servers.clone(), reason };
    let mut o = async_nats::ConnectOptions::new()
        .name(format!("switchboard {node}"))
        .connection_timeout(opts.connect_timeout)
        .request_timeout(Some(opts.request_timeout))
        .max_reconnects(None)
        .event_callback(move |event| {
            let connects = connects.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        connects.fetch_add(1, Ordering::AcqRel);
                        tracing::info!("NATS connected")
                    }
                    async_nats::Event::Disconnected => tracing::warn!("NATS disconnected; reconnecting"),
                    other => tracing::info!(event = %other, "NATS event"),
                }
            }
        });
    if !opts.user.is_empty() {
        o = o.user_and_password(opts.user.clone(), opts.password.clone());
    }
    if !opts.token.is_empty() {
        o = o.token(opts.token.clone());
    }
    if let Some(path) = &opts.nkey_seed_file {
        let seed = std::fs::read_to_string(path).map_err(|e| fail(format!("reading {}: {e}", path.display())))?;
        o = o.nkey(seed.trim().to_string());
    }
    if let Some(path) = &opts.creds_file {
        o = o.credentials_file(path).await.map_err(|e| fail(format!("reading {}: {e}", path.display())))?;
    }
    if let Some(ca) = &opts.tls_ca {
        o = o.add_root_certificates(ca.clone());
    }
    if let Some((cert, key)) = &opts.tls_cert {
        o = o.add_client_certificate(cert.clone(), key.clone());
    }
    if opts.tls_required {
        o = o.require_tls(true);
    }
    let addrs: Vec<async_nats::ServerAddr> =
        opts.servers.iter().map(|s| s.parse().map_err(|e| fail(format!("{s:?}: {e}")))).collect::<Result<_, _>>()?;
    o.connect(addrs).await.map_err(|e| fail(e.to_string()))
}

impl NatsEngine {
    /// Connects, creates (or adopts) the streams and buckets, and starts
    /// one live consumer per stream.
    pub async fn start(cfg: EngineConfig, opts: NatsOptions, max_message_size: usize) -> Result<Arc<Self>, NatsError> {
        let connects = Arc::new(AtomicU64::new(0));
        let client = connect(&opts, &cfg.node, connects.clone()).await?;
        let max_payload = client.server_info().max_payload;
        if max_message_size + ENVELOPE_OVERHEAD > max_payload {
            return Err(NatsError::Config(format!(
                "limits.max_message_size ({max_message_size}) plus {ENVELOPE_OVERHEAD} bytes of envelope is over the \
                 NATS servers' max_payload ({max_payload}): raise max_payload or lower limits.max_message_size"
            )));
        }
        let js = jetstream::new(client.clone());
        // Nodes starting together with a cluster that is itself starting may
        // find streams without a leader yet: setting up is tried again for
        // a while before the start fails.
        let deadline = tokio::time::Instant::now() + opts.connect_timeout.max(Duration::from_secs(30));
        let (slots, retained, retained_stream, presence) = loop {
            match Self::set_up(&js, &opts, &cfg).await {
                Ok(parts) => break parts,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::warn!(error = %e, "JetStream set-up failed; trying again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        };
        let engine = Arc::new(NatsEngine {
            cfg,
            opts,
            client,
            js,
            slots,
            retained,
            retained_stream,
            presence,
            hub: RwLock::new(Hub::default()),
            heads: Mutex::new(HashMap::new()),
            conns: Mutex::new(HashMap::new()),
            live_failure: Mutex::new(None),
            connects,
            recent_bytes: AtomicU64::new(0),
            sweeping: AtomicBool::new(false),
            this: OnceLock::new(),
        });
        let _ = engine.this.set(Arc::downgrade(&engine));
        for slot in &engine.slots {
            let mut stream = slot.stream.clone();
            let start = stream.info().await.map_err(|e| js_error(slot.root.clone())(e.to_string()))?;
            *slot.live.lock() = live::Live::new(start.state.last_sequence);
            tokio::spawn(Self::run_live(Arc::downgrade(&engine), slot.clone()));
        }
        presence::Presence::spawn_watch(Arc::downgrade(&engine));
        Ok(engine)
    }

    /// The streams (one per history policy) and buckets, made if missing.
    async fn set_up(
        js: &jetstream::Context,
        opts: &NatsOptions,
        cfg: &EngineConfig,
    ) -> Result<(Vec<Arc<Slot>>, kv::Store, stream::Stream, presence::Presence), NatsError> {
        let mut policies: Vec<(usize, Duration)> = Vec::new();
        for p in std::iter::once(&cfg.default_policy).chain(cfg.rules.iter().map(|r| &r.policy)) {
            if !policies.contains(&(p.history_size, p.history_ttl)) {
                policies.push((p.history_size, p.history_ttl));
            }
        }
        let mut slots = Vec::new();
        for (size, ttl) in policies {
            slots.push(Arc::new(Self::open_slot(js, opts, cfg, size, ttl).await?));
        }
        let retained_bucket = format!("{}_retained", opts.stream);
        let retained = Self::bucket(js, opts, &retained_bucket, cfg.retained_ttl, 1).await?;
        let retained_stream = js
            .get_stream(format!("KV_{retained_bucket}"))
            .await
            .map_err(|e| js_error(&retained_bucket)(e.to_string()))?;
        let presence = presence::Presence::open(js, opts, cfg).await?;
        Ok((slots, retained, retained_stream, presence))
    }

    /// A KV bucket, created if missing. The bucket's stream is made here
    /// the way the KV protocol lays it out (`KV_{name}` over
    /// `$KV.{name}.>`), because the client's own create asks the account's
    /// API level first, which NATS 2.9 does not report.
    async fn bucket(
        js: &jetstream::Context,
        opts: &NatsOptions,
        name: &str,
        max_age: Duration,
        history: i64,
    ) -> Result<kv::Store, NatsError> {
        if let Ok(kv) = js.get_key_value(name).await {
            return Ok(kv);
        }
        // Nodes starting together may race to make it: the same config is
        // accepted twice.
        js.get_or_create_stream(stream::Config {
            name: format!("KV_{name}"),
            subjects: vec![format!("$KV.{name}.>")],
            max_messages_per_subject: history,
            max_age,
            storage: stream::StorageType::File,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            num_replicas: opts.replicas,
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        })
        .await
        .map_err(|e| js_error(name)(e.to_string()))?;
        js.get_key_value(name).await.map_err(|e| js_error(name)(e.to_string()))
    }

    async fn open_slot(
        js: &jetstream::Context,
        opts: &NatsOptions,
        cfg: &EngineConfig,
        size: usize,
        ttl: Duration,
    ) -> Result<Slot, NatsError> {
        let secs = ttl.as_secs();
        let name = format!("{}_H{size}_T{secs}", opts.stream);
        let root = format!("{}.h{size}t{secs}", opts.subject);
        // JetStream wants the dedupe window within the age limit.
        let dedupe = if ttl.is_zero() { cfg.dedupe_window } else { cfg.dedupe_window.min(ttl) };
        let config = stream::Config {
            name: name.clone(),
            subjects: vec![format!("{root}.>")],
            // History 0 still keeps each channel's last message: its
            // position (and prev_serial chain) lives on.
            max_messages_per_subject: size.max(1) as i64,
            max_age: ttl,
            duplicate_window: dedupe,
            allow_direct: true,
            num_replicas: opts.replicas,
            storage: stream::StorageType::File,
            discard: stream::DiscardPolicy::Old,
            ..Default::default()
        };
        let mut stream = match js.get_stream(&name).await {
            Ok(s) => s,
            Err(_) => js.create_stream(config.clone()).await.map_err(|e| js_error(&name)(e.to_string()))?,
        };
        let info = stream.info().await.map_err(|e| js_error(&name)(e.to_string()))?;
        let have = &info.config;
        if have.max_messages_per_subject != config.max_messages_per_subject
            || have.max_age != config.max_age
            || have.duplicate_window != config.duplicate_window
            || !have.allow_direct
        {
            js.update_stream(config).await.map_err(|e| js_error(&name)(e.to_string()))?;
        }
        let epoch = epoch_of(info.created);
        tracing::info!(stream = %name, %epoch, "JetStream stream ready");
        Ok(Slot {
            history_size: size,
            history_ttl: ttl,
            root,
            stream,
            epoch,
            live: Mutex::new(live::Live::new(0)),
            wake: tokio::sync::Notify::new(),
            narrow: AtomicBool::new(false),
        })
    }

    fn slot(&self, channel: &str) -> &Arc<Slot> {
        let p: &ChannelPolicy = self.cfg.policy_for(channel);
        self.slots
            .iter()
            .find(|s| s.history_size == p.history_size && s.history_ttl == p.history_ttl)
            .unwrap_or(&self.slots[0])
    }

    fn head(&self, channel: &str) -> Arc<Head> {
        self.heads.lock().entry(channel.to_string()).or_default().clone()
    }

    /// Fails fast while NATS is not connected.
    fn connected(&self) -> Result<(), CoreError> {
        match self.client.connection_state() {
            async_nats::connection::State::Connected => Ok(()),
            state => Err(unavailable(format!("not connected ({state})"))),
        }
    }

    /// The newest message of `channel`, if JetStream holds one.
    async fn last(&self, slot: &Slot, channel: &str) -> Result<Option<proto::Envelope>, CoreError> {
        match slot.stream.direct_get_last_for_subject(slot.subject(channel)).await {
            Ok(m) => Ok(decode(slot, m.sequence, &m.payload)),
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// The newest message of `channel` as the stream's leader has it: the
    /// head a replay must reach (a replica may not hold it yet).
    async fn last_at_leader(&self, slot: &Slot, channel: &str) -> Result<Option<proto::Envelope>, CoreError> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        match slot.stream.get_last_raw_message_by_subject(slot.subject(channel).as_str()).await {
            Ok(m) => Ok(decode(slot, m.sequence, &m.payload)),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// [`Self::at`], as the stream's leader has it.
    async fn at_leader(&self, slot: &Slot, channel: &str, sequence: u64) -> Result<Option<proto::Envelope>, CoreError> {
        use async_nats::jetstream::stream::RawMessageErrorKind;
        match slot.stream.get_raw_message(sequence).await {
            Ok(m) => Ok(decode(slot, m.sequence, &m.payload).filter(|e| e.channel == channel)),
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// The message at `sequence`, if it is still held and is `channel`'s.
    async fn at(&self, slot: &Slot, channel: &str, sequence: u64) -> Result<Option<proto::Envelope>, CoreError> {
        match slot.stream.direct_get(sequence).await {
            Ok(m) => Ok(decode(slot, m.sequence, &m.payload).filter(|e| e.channel == channel)),
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// The channel's last serial at or below `bound` (a stream position):
    /// the newest message's, or, when that came later, the one before it
    /// along the `prev_serial` chain.
    async fn head_at(&self, slot: &Slot, channel: &str, bound: u64) -> Result<u64, CoreError> {
        let Some(mut m) = self.last_at_leader(slot, channel).await? else { return Ok(0) };
        while m.serial > bound {
            if m.prev_serial <= bound {
                return Ok(m.prev_serial);
            }
            match self.at_leader(slot, channel, m.prev_serial).await? {
                Some(prev) => m = prev,
                // Trimmed meanwhile: nothing at or below the bound is held,
                // and the chain says where the channel stood.
                None => return Ok(m.prev_serial.min(bound)),
            }
        }
        Ok(m.serial)
    }

    /// `channel`'s messages after `after` up to `upto`, oldest first, at
    /// most `max`: deliveries, so that every subscriber replaying one shares
    /// its encoded frames (those from [`Head::recent`] are the very ones
    /// live subscribers got).
    async fn read(
        &self,
        slot: &Slot,
        channel: &str,
        after: u64,
        upto: u64,
        max: usize,
    ) -> Result<Vec<Arc<Delivery>>, CoreError> {
        if let Some(cached) = self.read_recent(slot, channel, (after, upto), max) {
            return Ok(cached);
        }
        let subject = slot.subject(channel);
        let mut out: Vec<Arc<Delivery>> = Vec::new();
        let mut from = after + 1;
        let mut lagging = 0;
        while out.len() < max && from <= upto {
            match slot.stream.direct_get_next_for_subject(subject.as_str(), Some(from)).await {
                Ok(m) if m.sequence <= upto => {
                    from = m.sequence + 1;
                    let Some(mut env) = decode(slot, m.sequence, &m.payload) else { continue };
                    // The chain is the stream's order: each message follows
                    // the one read before it, and the first follows `after`
                    // when that is still held (the publisher's word, in the
                    // envelope, can lose a race on NATS 2.9).
                    match out.last() {
                        Some(prev) => env.prev_serial = prev.envelope.serial,
                        None if after > 0
                            && env.prev_serial != after
                            && self.at(slot, channel, after).await?.is_some() =>
                        {
                            env.prev_serial = after;
                        }
                        None => {}
                    }
                    out.push(Delivery::new(env));
                }
                Ok(_) => break,
                // `upto` is a message of the channel the leader holds: the
                // replica that answered may not hold it yet.
                Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound && lagging < READ_LAG_TRIES => {
                    lagging += 1;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => break,
                Err(e) => return Err(unavailable(e)),
            }
        }
        Ok(out)
    }

    /// [`Self::read`] from the node's recent messages of the channel, when
    /// they hold everything after `after` up to `upto`.
    fn read_recent(
        &self,
        slot: &Slot,
        channel: &str,
        (after, upto): (u64, u64),
        max: usize,
    ) -> Option<Vec<Arc<Delivery>>> {
        let head = self.heads.lock().get(channel).cloned()?;
        let recent = head.recent.lock();
        let (first, last) = (recent.front()?, recent.back()?);
        let covers = first.envelope.prev_serial <= after || (after == 0 && recent.len() >= slot.history_size);
        if !covers || last.envelope.serial < upto {
            return None;
        }
        let wanted = recent.iter().filter(|d| d.envelope.serial > after && d.envelope.serial <= upto);
        Some(wanted.take(max).cloned().collect())
    }

    /// Keeps `delivery` among its channel's recent messages.
    fn remember(&self, slot: &Slot, head: &Head, delivery: &Arc<Delivery>) {
        let cap = slot.history_size.min(RECENT_MAX);
        if cap == 0 {
            return;
        }
        let size = delivery.size as u64;
        let mut recent = head.recent.lock();
        recent.push_back(delivery.clone());
        let mut freed = 0;
        while recent.len() > cap {
            freed += recent.pop_front().map_or(0, |d| d.size as u64);
        }
        let total = self.recent_bytes.fetch_add(size, Ordering::AcqRel) + size - freed;
        self.recent_bytes.fetch_sub(freed, Ordering::AcqRel);
        if total > RECENT_BYTES {
            let all: u64 = recent.drain(..).map(|d| d.size as u64).sum();
            self.recent_bytes.fetch_sub(all, Ordering::AcqRel);
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

    /// Appends an envelope to its channel: `prev_serial` is the channel's
    /// last serial, which JetStream checks, so a publish on another node
    /// meanwhile makes this one read the new head and try again.
    async fn append(&self, mut env: proto::Envelope, id: Option<&str>) -> Result<proto::PublishAck, CoreError> {
        use async_nats::jetstream::context::PublishErrorKind;
        self.connected()?;
        let channel = env.channel.clone();
        let slot = self.slot(&channel).clone();
        let subject = slot.subject(&channel);
        let head = self.head(&channel);
        let _turn = head.turn.lock().await;
        let mut expected = if head.known.load(Ordering::Acquire) {
            head.last.load(Ordering::Acquire)
        } else {
            self.last(&slot, &channel).await?.map_or(0, |e| e.serial)
        };
        for tries in 0..MAX_APPEND_TRIES {
            env.prev_serial = expected;
            let mut headers = HeaderMap::new();
            headers.insert(header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, expected.to_string().as_str());
            if let Some(id) = id {
                headers.insert(header::NATS_MESSAGE_ID, msg_id(&channel, id).as_str());
            }
            let sent = self
                .js
                .publish_with_headers(subject.clone(), headers, Bytes::from(env.encode_to_vec()))
                .await
                .map_err(unavailable)?;
            match sent.await {
                Ok(ack) => {
                    if !ack.duplicate {
                        head.last.fetch_max(ack.sequence, Ordering::AcqRel);
                        head.known.store(true, Ordering::Release);
                    }
                    return Ok(proto::PublishAck {
                        channel,
                        epoch: slot.epoch.to_string(),
                        serial: ack.sequence,
                        duplicate: ack.duplicate,
                    });
                }
                // Another node appended first (10071 names the channel's
                // last serial; 10164, from servers that also refuse while
                // another append to the subject is in flight, does not).
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence || e.to_string().contains("wrong last") => {
                    expected = match refused_last(&e) {
                        Some(last) => last,
                        None => {
                            let pause = rand::rng().random_range(0..=2 * tries as u64);
                            tokio::time::sleep(Duration::from_millis(pause)).await;
                            self.last_at_leader(&slot, &channel).await?.map_or(0, |e| e.serial)
                        }
                    };
                    head.last.store(expected, Ordering::Release);
                    head.known.store(true, Ordering::Release);
                }
                Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                    return Err(err(
                        ErrorCode::MessageTooLarge,
                        format!("message over the NATS servers' max_payload: {e}"),
                    ));
                }
                Err(e) => return Err(unavailable(e)),
            }
        }
        Err(err(
            ErrorCode::Unavailable,
            format!("channel {channel:?}: {MAX_APPEND_TRIES} tries lost the race to publishers on other nodes"),
        ))
    }

    /// The retained value's key.
    fn retained_key(channel: &str) -> String {
        subjects::tokens(channel)
    }

    /// Keeps `env` (sequenced) as the channel's retained value unless a
    /// newer one is there already; an empty payload clears it.
    async fn retain(&self, env: &proto::Envelope) -> Result<(), CoreError> {
        let key = Self::retained_key(&env.channel);
        for _ in 0..MAX_APPEND_TRIES {
            let entry = self.retained.entry(key.as_str()).await.map_err(unavailable)?;
            let current = entry.as_ref().filter(|e| e.operation == kv::Operation::Put);
            if current
                .and_then(|e| proto::Envelope::decode(e.value.as_ref()).ok())
                .is_some_and(|c| c.serial > env.serial)
            {
                return Ok(());
            }
            let done = match (&entry, env.payload.is_empty()) {
                (None, true) => return Ok(()),
                (Some(e), true) if e.operation != kv::Operation::Put => return Ok(()),
                (Some(e), true) => {
                    self.retained.purge_expect_revision(key.as_str(), Some(e.revision)).await.map_err(|x| x.to_string())
                }
                (None, false) => self
                    .retained
                    .create(key.as_str(), env.encode_to_vec().into())
                    .await
                    .map(|_| ())
                    .map_err(|x| x.to_string()),
                (Some(e), false) => self
                    .retained
                    .update(key.as_str(), env.encode_to_vec().into(), e.revision)
                    .await
                    .map(|_| ())
                    .map_err(|x| x.to_string()),
            };
            if done.is_ok() {
                return Ok(());
            }
        }
        Err(unavailable(format!("the retained value of {:?} kept changing", env.channel)))
    }

    /// The channel's retained value, if any.
    async fn retained_value(&self, channel: &str) -> Result<Option<proto::Envelope>, CoreError> {
        let value = self.retained.get(Self::retained_key(channel)).await.map_err(unavailable)?;
        Ok(value.and_then(|v| proto::Envelope::decode(v.as_ref()).ok()).filter(|e| !e.payload.is_empty()))
    }

    async fn publish_at(&self, caller: &Caller, req: proto::Publish, now: i64) -> Result<proto::PublishAck, CoreError> {
        let id = (!req.id.is_empty()).then(|| req.id.clone());
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
            timestamp: now,
            ..Default::default()
        };
        let retain = env.retain;
        let mut stored = env.clone();
        let ack = self.append(env, id.as_deref()).await?;
        if retain && !ack.duplicate {
            stored.serial = ack.serial;
            stored.epoch = ack.epoch.clone();
            self.retain(&stored).await?;
        }
        Ok(ack)
    }

    /// Every channel that matches `filter` and has messages or a retained
    /// value in JetStream, by name.
    async fn matching(&self, filter: &str) -> Result<Vec<String>, CoreError> {
        use futures_util::TryStreamExt;
        let mut found = std::collections::BTreeSet::new();
        let kv_root = format!("$KV.{}_retained", self.opts.stream);
        let mut sources: Vec<(&stream::Stream, &str)> =
            self.slots.iter().map(|s| (&s.stream, s.root.as_str())).collect();
        sources.push((&self.retained_stream, kv_root.as_str()));
        for (stream, root) in sources {
            for subject in subjects::filter_subjects(root, filter) {
                let mut info = stream.info_with_subjects(subject).await.map_err(unavailable)?;
                while let Some((subject, _)) = info.try_next().await.map_err(unavailable)? {
                    if let Some(name) =
                        subject.strip_prefix(root).and_then(|t| t.strip_prefix('.')).and_then(subjects::channel)
                        && channel::filter_matches(filter, &name)
                    {
                        found.insert(name);
                        let max = self.opts.max_wildcard_channels;
                        if found.len() > max {
                            return Err(err(
                                ErrorCode::BadRequest,
                                format!(
                                    "{filter:?} matches more than {max} channels with history or a retained value \
                                     (nats.max_wildcard_channels): narrow the filter, or subscribe without \
                                     rewind, retained or since"
                                ),
                            ));
                        }
                    }
                }
            }
        }
        Ok(found.into_iter().collect())
    }

    async fn subscribe_at(
        &self,
        session: SessionId,
        req: &proto::Subscribe,
        history_floor: Option<i64>,
        now: i64,
    ) -> Result<SubscribeOutcome, CoreError> {
        if let Some((_, inner)) = channel::parse_shared(&req.filter) {
            // A shared group replays nothing: its filter is read from now.
            let lasts = self.lasts(&[inner]).await?;
            let mut lives: Vec<_> = self.slots.iter().map(|s| s.live.lock()).collect();
            self.widen(&mut lives, &[inner], &lasts);
            let joined = super::hub::begin_subscribe(&self.hub, session, req, self.cfg.max_shared_groups);
            if joined.is_err() {
                self.interest_dropped();
            }
            return joined.map(Option::unwrap_or_default);
        }
        if let Some(done) = super::hub::begin_subscribe(&self.hub, session, req, self.cfg.max_shared_groups)? {
            return Ok(done);
        }
        self.connected()?;
        let filter = req.filter.as_str();
        let companion = req.presence.then(|| channel::presence_channel(filter));
        super::local::check_positions(req, filter, companion.as_deref())?;
        let rewind = req.rewind.filter(|r| r.count > 0 || r.duration_ms > 0);
        let since = (req.since_ms > 0).then_some(req.since_ms as i64);
        let concrete = channel::is_concrete(filter);
        let mut names: Vec<String> = Vec::new();
        if concrete {
            names.push(filter.to_string());
        }
        names.extend(req.positions.keys().filter(|k| k.as_str() != filter).cloned());
        if let (true, Some(c), Some(_)) = (concrete, companion.as_ref(), since)
            && !req.positions.contains_key(c)
        {
            names.push(c.clone());
        }
        if !concrete && (rewind.is_some() || req.retained || since.is_some()) {
            let mut found = self.matching(filter).await?;
            if let (Some(c), Some(_)) = (companion.as_deref(), since) {
                found.extend(self.matching(c).await?);
            }
            names.extend(found.into_iter().filter(|n| !req.positions.contains_key(n)));
        }
        // Register, noting up to where each channel is replay: later
        // messages go live. The consumers widen first if they do not read
        // what the subscription needs yet.
        let wants: Vec<&str> = std::iter::once(filter).chain(companion.as_deref()).collect();
        let lasts = self.lasts(&wants).await?;
        let heads: Vec<Arc<Head>> = names.iter().map(|n| self.head(n)).collect();
        let (bounds, seen): (Vec<u64>, Vec<u64>) = {
            let mut lives: Vec<_> = self.slots.iter().map(|s| s.live.lock()).collect();
            self.widen(&mut lives, &wants, &lasts);
            if let Err(e) = self.hub.write().subscribe(session, filter, companion.as_deref(), req.no_local) {
                self.interest_dropped();
                return Err(e);
            }
            names
                .iter()
                .zip(&heads)
                .map(|(name, head)| {
                    let slot = self.slot(name);
                    let i = self.slots.iter().position(|s| Arc::ptr_eq(s, slot)).unwrap_or(0);
                    let subject = slot.subject(name);
                    let told = lives[i].told(&subject);
                    (lives[i].bound(&subject), if told { head.seen.load(Ordering::Acquire) } else { UNSEEN })
                })
                .unzip()
        };
        let scope = Replay { req, history_floor, since, rewind, now };
        let mut out = SubscribeOutcome {
            subscribed: proto::Subscribed { filter: filter.to_string(), channels: Vec::new() },
            replay: Vec::new(),
        };
        for ((name, seen), bound) in names.iter().zip(seen).zip(bounds) {
            // What the consumer read last of the channel is its head at the
            // bound; a channel it has not read (since it started reading it)
            // is looked up.
            let head = (seen != UNSEEN).then_some(seen);
            if let Err(e) = self.replay(name, (bound, head), &scope, &mut out).await {
                let _ = self.hub.write().unsubscribe(session, filter);
                self.interest_dropped();
                return Err(e);
            }
        }
        Ok(out)
    }

    /// Everything history holds of `channel` up to `head`.
    async fn all(&self, slot: &Slot, channel: &str, head: u64) -> Result<Vec<Arc<Delivery>>, CoreError> {
        if slot.history_size == 0 {
            return Ok(Vec::new());
        }
        self.read(slot, channel, 0, head, usize::MAX).await
    }

    /// One channel's state and replay for a subscribe, read up to `bound`.
    async fn replay(
        &self,
        name: &str,
        (bound, head): (u64, Option<u64>),
        r: &Replay<'_>,
        out: &mut SubscribeOutcome,
    ) -> Result<(), CoreError> {
        let slot = self.slot(name).clone();
        let head = match head {
            Some(h) => h,
            None => self.head_at(&slot, name, bound).await?,
        };
        let keeps = slot.history_size > 0;
        let mut state = proto::ChannelState {
            channel: name.to_string(),
            epoch: slot.epoch.to_string(),
            serial: head,
            recovered: false,
        };
        let mut want_retained = r.req.retained;
        let gap = |from: Option<proto::Position>, to: u64, reason: &str| {
            Outbound::Gap(proto::Gap {
                channel: name.to_string(),
                from,
                to: Some(slot.position(to)),
                reason: reason.into(),
            })
        };
        let floor = |replay: Vec<Arc<Delivery>>, from: Option<proto::Position>, out: &mut SubscribeOutcome| match r
            .history_floor
        {
            Some(f) => super::local::not_granted_before(f, name, from, &slot.epoch, replay, out),
            None => replay,
        };
        let mut deliveries: Vec<Arc<Delivery>> = Vec::new();
        if let Some(pos) = r.req.positions.get(name) {
            if pos.epoch == slot.epoch.as_ref() {
                if pos.serial > head {
                    return Err(err(
                        ErrorCode::BadPosition,
                        format!("position {}:{} of {name:?} is ahead of the channel ({head})", pos.epoch, pos.serial),
                    ));
                }
                let msgs = if keeps { self.read(&slot, name, pos.serial, head, usize::MAX).await? } else { Vec::new() };
                let intact = match msgs.first() {
                    Some(m) => m.envelope.prev_serial == pos.serial,
                    None => pos.serial == head,
                };
                if intact {
                    state.recovered = true;
                    want_retained = false;
                    deliveries = floor(msgs, Some(pos.clone()), out);
                } else {
                    out.replay.push(gap(Some(pos.clone()), head, "trimmed"));
                }
            } else {
                // Another epoch: what the new one holds is replayed, after a
                // gap that ends just before its oldest message.
                let replay = self.all(&slot, name, head).await?;
                let first = replay.first().map_or(head + 1, |m| m.envelope.serial);
                out.replay.push(gap(Some(pos.clone()), first - 1, "epoch_changed"));
                deliveries = floor(replay, Some(slot.position(first - 1)), out);
            }
        } else if let Some(since) = r.since {
            let mut replay = self.all(&slot, name, head).await?;
            // Something older than the oldest held message was trimmed; if
            // that oldest is at or after `since`, some of what was asked for
            // may be gone.
            let lost = match replay.first() {
                Some(f) => f.envelope.prev_serial != 0 && f.envelope.timestamp >= since,
                None => head > 0 && self.last(&slot, name).await?.is_some_and(|l| l.timestamp >= since),
            };
            if lost {
                out.replay.push(gap(None, head, "trimmed"));
            } else {
                replay.retain(|m| m.envelope.timestamp >= since);
                deliveries = match r.history_floor.filter(|f| *f > since) {
                    Some(_) => floor(replay, None, out),
                    None => replay,
                };
            }
        } else if let Some(rw) = r.rewind {
            let min_ts = if rw.duration_ms > 0 { r.now.saturating_sub(rw.duration_ms as i64) } else { i64::MIN };
            let count = if rw.count > 0 { rw.count as usize } else { usize::MAX };
            let mut replay = self.all(&slot, name, head).await?;
            let keep = replay.iter().rev().take_while(|m| m.envelope.timestamp > min_ts).take(count).count();
            deliveries = replay.split_off(replay.len() - keep);
        }
        if want_retained
            && let Some(v) = self.retained_value(name).await?
            && v.serial <= head
            && deliveries.first().is_none_or(|f| v.serial < f.envelope.serial)
        {
            out.replay.push(Outbound::Message(Delivery::new(v)));
        }
        out.replay.extend(deliveries.into_iter().map(Outbound::Message));
        out.subscribed.channels.push(state);
        Ok(())
    }

    async fn history_at(&self, req: &proto::History) -> Result<proto::HistoryResult, CoreError> {
        self.connected()?;
        let slot = self.slot(&req.channel).clone();
        let head = self.last(&slot, &req.channel).await?.map_or(0, |e| e.serial);
        let since = match &req.since {
            None => 0,
            Some(p) if p.epoch != slot.epoch.as_ref() => {
                return Err(err(
                    ErrorCode::BadPosition,
                    format!("epoch {:?} is not the channel's epoch {:?}", p.epoch, slot.epoch),
                ));
            }
            Some(p) if p.serial > head => {
                return Err(err(
                    ErrorCode::BadPosition,
                    format!("serial {} is ahead of the channel ({head})", p.serial),
                ));
            }
            Some(p) => p.serial,
        };
        let page_max = self.cfg.history_page_max;
        let limit = if req.limit == 0 { page_max } else { (req.limit as usize).min(page_max) };
        let read = if slot.history_size == 0 {
            Vec::new()
        } else {
            self.read(&slot, &req.channel, since, head, if req.reverse { usize::MAX } else { limit }).await?
        };
        let mut bytes = 0;
        let fits = |m: &proto::Envelope| {
            let first = bytes == 0;
            bytes += m.encoded_len();
            first || bytes <= self.cfg.history_page_bytes
        };
        let read = read.iter().map(|d| d.envelope.clone());
        let messages: Vec<proto::Envelope> = if req.reverse {
            read.rev().take(limit).take_while(fits).collect()
        } else {
            read.take(limit).take_while(fits).collect()
        };
        Ok(proto::HistoryResult { channel: req.channel.clone(), epoch: slot.epoch.to_string(), serial: head, messages })
    }
}

/// What a subscribe asks every channel to replay.
struct Replay<'a> {
    req: &'a proto::Subscribe,
    history_floor: Option<i64>,
    since: Option<i64>,
    rewind: Option<proto::Rewind>,
    now: i64,
}

#[async_trait::async_trait]
impl Engine for NatsEngine {
    fn attach(&self, caller: &Caller, outbox: Arc<Outbox>) {
        self.conns.lock().insert(caller.connection_id.clone(), caller.session);
        self.hub.write().attach(caller, outbox);
    }

    fn detach(&self, session: SessionId, kind: CloseKind, now_ms: i64) {
        let Some(gone) = self.hub.write().detach(session) else { return };
        self.interest_dropped();
        self.conns.lock().remove(&gone.caller.connection_id);
        if gone.presence.is_empty() {
            return;
        }
        let Some(this) = self.this.get().and_then(Weak::upgrade) else { return };
        tokio::spawn(async move {
            for ch in &gone.presence {
                let done = match kind {
                    CloseKind::Clean => this.presence_leave_at(&gone.caller, ch, now_ms).await,
                    CloseKind::Abrupt => this.presence_leaving(&gone.caller, ch, now_ms).await,
                };
                if let Err(e) = done {
                    tracing::warn!(channel = %ch, error = %e, "presence: could not record the leave; the grace sweep will");
                }
            }
        });
    }

    async fn publish(&self, caller: &Caller, req: proto::Publish, now_ms: i64) -> Result<proto::PublishAck, CoreError> {
        self.publish_at(caller, req, now_ms).await
    }

    async fn subscribe(
        &self,
        session: SessionId,
        req: &proto::Subscribe,
        history_floor_ms: Option<i64>,
        _arrived_ns: Option<u64>,
        now_ms: i64,
    ) -> Result<SubscribeOutcome, CoreError> {
        self.subscribe_at(session, req, history_floor_ms, now_ms).await
    }

    async fn unsubscribe(&self, session: SessionId, filter: &str) -> Result<(), CoreError> {
        self.hub.write().unsubscribe(session, filter)?;
        self.interest_dropped();
        Ok(())
    }

    async fn presence_enter(
        &self,
        caller: &Caller,
        channel: &str,
        data: Bytes,
        update: bool,
        now_ms: i64,
    ) -> Result<(), CoreError> {
        self.presence_enter_at(caller, channel, data, update, now_ms).await
    }

    async fn presence_leave(&self, caller: &Caller, channel: &str, now_ms: i64) -> Result<(), CoreError> {
        if !self.presence.is_member(caller, channel) {
            return Err(err(ErrorCode::BadRequest, format!("not present on {channel:?}")));
        }
        self.hub.write().note_presence(caller.session, channel, false);
        self.presence_leave_at(caller, channel, now_ms).await
    }

    async fn presence_members(&self, channel: &str) -> Result<proto::PresenceMembers, CoreError> {
        Ok(self.presence.members(channel))
    }

    async fn history(&self, req: &proto::History, _now_ms: i64) -> Result<proto::HistoryResult, CoreError> {
        self.history_at(req).await
    }

    fn sweep(&self, now_ms: i64) {
        {
            let mut heads = self.heads.lock();
            if heads.len() > 100_000 {
                heads.retain(|_, h| {
                    let keep = Arc::strong_count(h) > 1;
                    if !keep {
                        let bytes: u64 = h.recent.lock().iter().map(|d| d.size as u64).sum();
                        self.recent_bytes.fetch_sub(bytes, Ordering::AcqRel);
                    }
                    keep
                });
            }
        }
        if self.sweeping.swap(true, Ordering::AcqRel) {
            return;
        }
        let Some(this) = self.this.get().and_then(Weak::upgrade) else { return };
        tokio::spawn(async move {
            this.presence_sweep(now_ms).await;
            this.sweeping.store(false, Ordering::Release);
        });
    }

    fn stats(&self) -> EngineStats {
        let hub = self.hub.read();
        EngineStats {
            channels: self.heads.lock().len(),
            subscriptions: hub.subscriptions(),
            presence_members: self.presence.count(),
            history_bytes: 0,
            retained_bytes: 0,
        }
    }

    fn health(&self) -> Result<(), String> {
        self.connected().map_err(|e| e.message)?;
        match self.live_failure.lock().clone() {
            Some(f) => Err(f),
            None => Ok(()),
        }
    }
}
