//! Configuration: one serde tree read from TOML, overridden by
//! `SWITCHBOARD_*` environment variables, validated once at start.
//!
//! An override names a key path with `__` between levels:
//! `SWITCHBOARD_LIMITS__MAX_MESSAGE_SIZE=131072` sets `[limits]
//! max_message_size`. The value is read as a TOML value when it parses as
//! one (numbers, booleans, arrays) and as a string otherwise.
//! `deploy/switchboard.example.toml` documents every key and default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use switchboard_protocols::port::SlowPolicy;

use crate::core::engine::disk::{DiskOptions, SyncPolicy};
use crate::core::engine::nats::NatsOptions;
use crate::core::engine::{ChannelPolicy, ChannelRule, EngineConfig};
use crate::core::router::RouterLimits;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Not valid TOML, or a key has the wrong type or is unknown.
    #[error("invalid configuration: {0}")]
    Parse(String),
    /// A value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

pub use switchboard_proto::duration::parse_duration;

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

/// A string or a list of strings (`audience = "a"` or `["a", "b"]`).
fn de_one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// `[node]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Node name stamped on envelopes and connection ids.
    pub name: String,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig { name: "node-1".into() }
    }
}

/// `[listen]`: listener addresses; an empty string disables a listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenConfig {
    /// HTTP: WebSocket, REST, demo page.
    pub http: String,
    /// Admin: metrics, health, admin API.
    pub admin: String,
    /// HTTPS: everything the HTTP listener serves, over TLS (HTTP/1.1 and
    /// HTTP/2 by ALPN). Needs `[tls]` certificates.
    pub https: String,
    /// MQTT 3.1.1 and 5 over TCP.
    pub mqtt: String,
    /// MQTT over TLS, optionally with client certificates (`[tls]`).
    pub mqtts: String,
    /// QUIC (UDP): WebTransport at `/v1/wt`. Needs `[tls]` certificates.
    pub quic: String,
}

impl ListenConfig {
    /// Every listener by its configuration key.
    pub fn all(&self) -> [(&'static str, &String); 6] {
        [
            ("listen.http", &self.http),
            ("listen.admin", &self.admin),
            ("listen.https", &self.https),
            ("listen.mqtt", &self.mqtt),
            ("listen.mqtts", &self.mqtts),
            ("listen.quic", &self.quic),
        ]
    }
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            http: "127.0.0.1:8080".into(),
            admin: "127.0.0.1:9090".into(),
            https: String::new(),
            mqtt: "127.0.0.1:1883".into(),
            mqtts: String::new(),
            quic: String::new(),
        }
    }
}

/// `[limits]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest publish payload in bytes.
    pub max_message_size: usize,
    /// Largest WebSocket frame/message in bytes.
    pub max_frame_size: usize,
    /// Subscriptions per connection.
    pub max_subscriptions: usize,
    /// Sustained publishes per second per connection (0 = unlimited); over
    /// it: `rate_limited` (WebSocket error frame, MQTT 5 PUBACK 0x97).
    pub publish_rate: f64,
    /// Publishes a connection may send in a burst before the rate applies.
    pub publish_burst: f64,
    /// Open connections per client IP on the HTTP and MQTT listeners
    /// (0 = unlimited). Over it: HTTP 429 / MQTT close at accept.
    pub max_connections_per_ip: usize,
    /// New connections per second over the HTTP and MQTT listeners
    /// (0 = unlimited), with `new_connections_burst`.
    pub new_connections_per_sec: f64,
    /// New connections accepted at once before the rate applies.
    pub new_connections_burst: f64,
    /// New connections per second from one IP (0 = unlimited), with
    /// `new_connections_per_ip_burst`; counted before the node-wide rate,
    /// so one IP over it does not use up the others' admissions.
    pub new_connections_per_ip_per_sec: f64,
    /// New connections one IP may open at once before its rate applies.
    pub new_connections_per_ip_burst: f64,
    /// Bytes a session's outbound queue may hold.
    pub outbox_bytes: usize,
    /// Write coalescing: after a delivery is queued, a connection waits this
    /// long before writing, so everything queued meanwhile goes out in one
    /// write (fewer syscalls and packets for that much added latency; at
    /// most 1 s). 0 writes at once.
    #[serde(deserialize_with = "de_duration")]
    pub write_delay: Duration,
    /// Largest REST request body in bytes.
    pub max_body_size: usize,
    /// Most `channel=` filters in one SSE stream or long poll.
    pub max_stream_channels: usize,
    /// Most MQTT 5 shared subscription groups on the node (a connection's
    /// own are bounded by `max_subscriptions`).
    pub max_shared_groups: usize,
    /// Most channels on the node (each channel's `$presence/` companion
    /// comes with it); a publish, subscribe or presence enter that would
    /// create one more is refused.
    pub max_channels: usize,
    /// Most `positions` in one subscribe (each names a channel, which the
    /// subscribe creates if missing).
    pub max_positions: usize,
    /// Sustained subscribe and presence requests per second per connection
    /// (0 = unlimited), with `request_burst`.
    pub request_rate: f64,
    /// Subscribe and presence requests a connection may send at once.
    pub request_burst: f64,
    /// Channels one connection may be present on at once.
    pub max_presence_per_connection: usize,
    /// Most bytes of history on the node (every channel's together); a
    /// publish that would grow it further is refused (`unavailable`).
    pub max_history_bytes: u64,
    /// Most bytes of retained values on the node; a retained publish that
    /// would grow them further is refused (`unavailable`).
    pub max_retained_bytes: u64,
    /// Most presence members on the node (every channel's together).
    pub max_presence_members: u64,
    /// Longest SSE / long-poll query string (or POST /v1/poll body) in bytes.
    pub max_query_len: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_message_size: 64 * 1024,
            max_frame_size: 1024 * 1024,
            max_subscriptions: 256,
            publish_rate: 1000.0,
            publish_burst: 10_000.0,
            max_connections_per_ip: 10_000,
            new_connections_per_sec: 5_000.0,
            new_connections_burst: 10_000.0,
            new_connections_per_ip_per_sec: 1_000.0,
            new_connections_per_ip_burst: 2_000.0,
            outbox_bytes: 1024 * 1024,
            write_delay: Duration::ZERO,
            max_body_size: 1024 * 1024,
            max_stream_channels: 64,
            max_shared_groups: 10_000,
            max_channels: 1_000_000,
            max_positions: 1000,
            request_rate: 100.0,
            request_burst: 1000.0,
            max_presence_per_connection: 64,
            max_history_bytes: 2 << 30,
            max_retained_bytes: 256 << 20,
            max_presence_members: 1_000_000,
            max_query_len: 8192,
        }
    }
}

/// `[websocket]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebSocketConfig {
    /// Time allowed for the connect frame.
    #[serde(deserialize_with = "de_duration")]
    pub handshake_timeout: Duration,
    /// A flush slower than this drops the connection.
    #[serde(deserialize_with = "de_duration")]
    pub write_timeout: Duration,
    /// Ping an idle connection this often.
    #[serde(deserialize_with = "de_duration")]
    pub ping_interval: Duration,
    /// Read buffer per connection in bytes.
    pub read_buffer: usize,
    /// Write buffer per connection in bytes.
    pub write_buffer: usize,
    /// Accept permessage-deflate when a client offers it (RFC 7692).
    pub deflate: bool,
    /// Keep the server's compression context between messages (about
    /// 300 KiB per connection that received a compressed message).
    pub deflate_context_takeover: bool,
    /// Outbound messages smaller than this many bytes go uncompressed.
    pub deflate_min_size: usize,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        WebSocketConfig {
            handshake_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(25),
            read_buffer: 1024,
            write_buffer: 64 * 1024,
            deflate: true,
            deflate_context_takeover: false,
            deflate_min_size: 256,
        }
    }
}

/// `[sse]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SseSection {
    /// A `: keep-alive` comment after this much silence.
    #[serde(deserialize_with = "de_duration")]
    pub keepalive: Duration,
    /// The `retry:` browsers wait before reconnecting.
    #[serde(deserialize_with = "de_duration")]
    pub retry: Duration,
}

impl Default for SseSection {
    fn default() -> Self {
        SseSection { keepalive: Duration::from_secs(15), retry: Duration::from_secs(1) }
    }
}

/// `[poll]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PollSection {
    /// How long a poll waits when it gives no `timeout=`.
    #[serde(deserialize_with = "de_duration")]
    pub default_timeout: Duration,
    /// The largest `timeout=` honoured.
    #[serde(deserialize_with = "de_duration")]
    pub max_timeout: Duration,
    /// Most messages in one response.
    pub batch_max: usize,
}

impl Default for PollSection {
    fn default() -> Self {
        PollSection { default_timeout: Duration::from_secs(25), max_timeout: Duration::from_secs(60), batch_max: 100 }
    }
}

/// `[mqtt]`: the MQTT 3.1.1 / 5 front end (TCP listener and `/mqtt` over
/// WebSocket).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttSection {
    /// The CONNECT must arrive within this long.
    #[serde(deserialize_with = "de_duration")]
    pub connect_timeout: Duration,
    /// Largest packet accepted, fixed header included (MQTT 5: announced
    /// as Maximum Packet Size).
    pub max_packet_size: usize,
    /// Outbound QoS 1/2 messages in flight per client (and the Receive
    /// Maximum announced for inbound QoS 2).
    pub receive_maximum: u16,
    /// Topic aliases a client may use towards the gateway.
    pub max_topic_aliases: u16,
    /// Longest a persistent session is kept after its connection ends.
    #[serde(deserialize_with = "de_duration")]
    pub session_expiry_max: Duration,
    /// Largest keep alive accepted, seconds (0 = the client's).
    pub keepalive_max: u16,
    /// A write slower than this drops the connection.
    #[serde(deserialize_with = "de_duration")]
    pub write_timeout: Duration,
    /// Read buffer per connection, bytes.
    pub read_buffer: usize,
    /// Bytes of deliveries waiting for an inflight slot per connection.
    pub max_queued_bytes: usize,
    /// Most persistent sessions stored at once.
    pub max_sessions: usize,
    /// Most MQTT 5 delayed wills waiting on the node (one per client id at
    /// most); over it a will is published at once, as if its delay were 0.
    pub max_delayed_wills: usize,
}

impl Default for MqttSection {
    fn default() -> Self {
        let d = switchboard_protocols::mqtt::MqttConfig::default();
        MqttSection {
            connect_timeout: d.connect_timeout,
            max_packet_size: d.max_packet_size,
            receive_maximum: d.receive_maximum,
            max_topic_aliases: d.max_topic_aliases,
            session_expiry_max: d.session_expiry_max,
            keepalive_max: d.keepalive_max,
            write_timeout: d.write_timeout,
            read_buffer: d.read_buffer_size,
            max_queued_bytes: d.max_queued_bytes,
            max_sessions: d.max_sessions,
            max_delayed_wills: 100_000,
        }
    }
}

impl MqttSection {
    /// The front end's configuration.
    pub fn front_end(&self) -> switchboard_protocols::mqtt::MqttConfig {
        switchboard_protocols::mqtt::MqttConfig {
            connect_timeout: self.connect_timeout,
            max_packet_size: self.max_packet_size,
            receive_maximum: self.receive_maximum,
            max_topic_aliases: self.max_topic_aliases,
            session_expiry_max: self.session_expiry_max,
            keepalive_max: self.keepalive_max,
            write_timeout: self.write_timeout,
            read_buffer_size: self.read_buffer,
            max_queued_bytes: self.max_queued_bytes,
            max_sessions: self.max_sessions,
            ..Default::default()
        }
    }
}

/// Slow-consumer policy names in config.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SlowConsumer {
    /// Close with code 4000.
    #[default]
    Disconnect,
    /// Drop the oldest queued messages.
    DropOldest,
    /// Keep only the latest message per channel.
    Conflate,
}

impl From<SlowConsumer> for SlowPolicy {
    fn from(s: SlowConsumer) -> Self {
        match s {
            SlowConsumer::Disconnect => SlowPolicy::Disconnect,
            SlowConsumer::DropOldest => SlowPolicy::DropOldest,
            SlowConsumer::Conflate => SlowPolicy::Conflate,
        }
    }
}

/// `[channels]` defaults and `[[channels.rules]]` per pattern.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChannelsConfig {
    /// Messages kept per channel.
    pub history_size: usize,
    /// Oldest message age kept.
    #[serde(deserialize_with = "de_duration")]
    pub history_ttl: Duration,
    /// Default slow-consumer policy.
    pub slow_consumer: SlowConsumer,
    /// How long a publish id is remembered.
    #[serde(deserialize_with = "de_duration")]
    pub dedupe_window: Duration,
    /// How long an abruptly disconnected presence member stays.
    #[serde(deserialize_with = "de_duration")]
    pub presence_grace: Duration,
    /// Most presence members per channel.
    pub presence_max_members: usize,
    /// Largest history page.
    pub history_page_max: usize,
    /// Largest history page in bytes (envelopes as stored; a page holds one
    /// message at least).
    pub history_page_bytes: usize,
    /// How far back a client whose token lacks the `history` capability
    /// may recover from a position or resume by time; older messages are a
    /// `not_granted` gap for it.
    #[serde(deserialize_with = "de_duration")]
    pub recovery_window: Duration,
    /// How long a retained value lives after its publish ("0s": until
    /// replaced or cleared).
    #[serde(deserialize_with = "de_duration")]
    pub retained_ttl: Duration,
    /// Per-pattern overrides, first match wins.
    pub rules: Vec<ChannelRuleConfig>,
}

impl Default for ChannelsConfig {
    fn default() -> Self {
        ChannelsConfig {
            history_size: 1000,
            history_ttl: Duration::from_secs(600),
            slow_consumer: SlowConsumer::Disconnect,
            dedupe_window: Duration::from_secs(120),
            presence_grace: Duration::from_secs(5),
            presence_max_members: 10_000,
            history_page_max: 1000,
            history_page_bytes: 1024 * 1024,
            retained_ttl: Duration::ZERO,
            recovery_window: Duration::from_secs(120),
            rules: Vec::new(),
        }
    }
}

/// One `[[channels.rules]]` entry; unset fields take the defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelRuleConfig {
    /// MQTT filter the rule applies to.
    pub pattern: String,
    /// Messages kept.
    pub history_size: Option<usize>,
    /// Oldest age kept.
    pub history_ttl: Option<String>,
    /// Slow-consumer policy.
    pub slow_consumer: Option<SlowConsumer>,
}

/// Authentication mode.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Anyone may connect with any client id and do everything (dev).
    #[default]
    Open,
    /// A connection token (JWT) is required; its claims decide.
    Token,
}

/// `[auth]`: connection tokens.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSection {
    /// `open` or `token`.
    pub mode: AuthMode,
    /// Clock skew tolerated on `exp` / `nbf`.
    #[serde(deserialize_with = "de_duration")]
    pub leeway: Duration,
    /// A JWKS file with more verification keys (empty: none).
    pub jwks_file: String,
    /// Verification keys (`[[auth.keys]]`).
    pub keys: Vec<crate::core::auth::KeyConfig>,
    /// Caps of MQTT devices that authenticate by a client certificate
    /// (mTLS) and send no token; `{client_id}` in a pattern stands for the
    /// certificate's id. Empty: a certificate identifies, a token authorizes.
    pub cert_caps: std::collections::BTreeMap<String, crate::core::auth::OpsSpec>,
    /// The audiences this gateway answers to (one string or a list): a
    /// token with an `aud` claim is accepted only when one of its values is
    /// here. Empty: tokens with an `aud` are refused. Tokens without `aud`
    /// are accepted either way.
    #[serde(deserialize_with = "de_one_or_many")]
    pub audience: Vec<String>,
    /// Caps of clients that present no credentials at all (no token on
    /// WebSocket, WebTransport, SSE, long polling or REST; no password and
    /// no client certificate on MQTT), in a `caps` claim's shape: `{
    /// "public/#" = "subscribe" }`. Token mode only. Empty: such clients
    /// are refused. A token that fails verification is refused either way.
    pub anonymous_caps: std::collections::BTreeMap<String, crate::core::auth::OpsSpec>,
}

impl Default for AuthSection {
    fn default() -> Self {
        AuthSection {
            mode: AuthMode::Open,
            leeway: Duration::from_secs(5),
            jwks_file: String::new(),
            keys: Vec::new(),
            cert_caps: Default::default(),
            audience: Vec::new(),
            anonymous_caps: Default::default(),
        }
    }
}

impl AuthSection {
    /// The token verifier, or `None` in open mode.
    pub fn verifier(&self) -> Result<Option<crate::core::auth::Verifier>, ConfigError> {
        if self.mode == AuthMode::Open {
            return Ok(None);
        }
        let jwks = (!self.jwks_file.is_empty()).then(|| Path::new(&self.jwks_file));
        crate::core::auth::Verifier::new(&self.keys, jwks, self.leeway.as_secs())
            .and_then(|v| v.with_cert_caps(self.cert_caps.clone()))
            .and_then(|v| v.with_audience(self.audience.clone()))
            .and_then(|v| v.with_anonymous_caps(&self.anonymous_caps))
            .map(Some)
            .map_err(|e| ConfigError::Invalid(format!("auth: {e}")))
    }
}

/// `[rest]`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct RestConfig {
    /// Keys accepted in `X-Api-Key` for the REST API. Empty: open (dev).
    pub api_keys: Vec<String>,
}

/// `[http]`: what the browser-facing routes of the HTTP, HTTPS and QUIC
/// listeners accept, and how long HTTP connections may take (the HTTP,
/// HTTPS and admin listeners; see [`crate::edge::timeouts`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSection {
    /// Pages (`Origin` values) allowed to use the WebSocket, MQTT over
    /// WebSocket, SSE, long-poll, REST and WebTransport routes; see
    /// `switchboard_protocols::origin` for the syntax (`https://app.example.com`,
    /// `https://*.example.com`, `*`). Empty: any origin. Requests without
    /// an `Origin` (clients that are not browsers) are not affected.
    pub allowed_origins: Vec<String>,
    /// An HTTP/1.1 request head must be whole within this of its first
    /// byte (a connection's first request: of the accept or TLS handshake).
    #[serde(deserialize_with = "de_duration")]
    pub header_read_timeout: Duration,
    /// A request body (REST, `POST /v1/poll`, `POST /v1/refresh`) must be
    /// whole within this of its head.
    #[serde(deserialize_with = "de_duration")]
    pub body_read_timeout: Duration,
    /// A keep-alive connection without a request in flight is closed after
    /// this (HTTP/2: GOAWAY).
    #[serde(deserialize_with = "de_duration")]
    pub idle_timeout: Duration,
    /// A response write the client does not take within this drops the
    /// connection (SSE streams too; WebSocket has its own).
    #[serde(deserialize_with = "de_duration")]
    pub write_timeout: Duration,
}

impl Default for HttpSection {
    fn default() -> Self {
        HttpSection {
            allowed_origins: Vec::new(),
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(30),
        }
    }
}

impl HttpSection {
    /// The timeouts, as the listeners take them.
    pub fn timeouts(&self) -> crate::edge::timeouts::HttpTimeouts {
        crate::edge::timeouts::HttpTimeouts {
            header_read: self.header_read_timeout,
            body_read: self.body_read_timeout,
            idle: self.idle_timeout,
            write: self.write_timeout,
        }
    }
}

/// `[admin]`: the admin API on the admin listener (`/v1/sessions`,
/// `/v1/sessions/{id}/close`, `/v1/stats`; `/healthz`, `/readyz` and
/// `/metrics` are always open).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSection {
    /// Bearer token the admin API requires (`Authorization: Bearer
    /// TOKEN`), at least 16 bytes. Empty: the admin API is open, which
    /// `serve` and `check` allow on a loopback admin address only.
    pub token: String,
}

/// Shortest admin token accepted.
pub const ADMIN_TOKEN_MIN_LEN: usize = 16;

/// `[echo]`: the RFC 6455 conformance echo route `/v1/ws-echo`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EchoConfig {
    /// Serve the route (always on in `dev`).
    pub enabled: bool,
    /// Largest frame and message in bytes (up to 16 MiB).
    pub max_message_size: usize,
}

impl Default for EchoConfig {
    fn default() -> Self {
        EchoConfig { enabled: false, max_message_size: 16 * 1024 * 1024 }
    }
}

/// Where channel state lives.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    /// A durable embedded store in `[storage] dir` (the default).
    #[default]
    Disk,
    /// This process's memory: nothing survives a restart (`dev`'s default).
    Memory,
}

/// `[storage]`: where history, channel positions, retained values and
/// idempotency keys are kept (docs/storage.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSection {
    /// `disk` or `memory`.
    pub kind: StorageKind,
    /// The store's directory (created if missing; relative paths are from
    /// the working directory).
    pub dir: PathBuf,
    /// When an acknowledged publish is on disk: `always`, `interval`, `never`.
    pub sync: SyncPolicy,
    /// fsync period under `sync = "interval"`.
    #[serde(deserialize_with = "de_duration")]
    pub sync_interval: Duration,
    /// The store's block cache, bytes.
    pub cache_bytes: u64,
    /// Where the machine's boot id is read (an unclean stop on another boot
    /// means the machine went down; see docs/storage.md).
    pub boot_id_file: PathBuf,
}

impl Default for StorageSection {
    fn default() -> Self {
        StorageSection {
            kind: StorageKind::Disk,
            dir: PathBuf::from("switchboard-data"),
            sync: SyncPolicy::Interval,
            sync_interval: Duration::from_millis(100),
            cache_bytes: 16 * 1024 * 1024,
            boot_id_file: PathBuf::from("/proc/sys/kernel/random/boot_id"),
        }
    }
}

impl StorageSection {
    /// The store's options, when the kind is `disk`.
    pub fn disk(&self) -> Option<DiskOptions> {
        (self.kind == StorageKind::Disk).then(|| DiskOptions {
            dir: self.dir.clone(),
            sync: self.sync,
            sync_interval: self.sync_interval,
            cache_bytes: self.cache_bytes,
            boot_id_file: self.boot_id_file.clone(),
        })
    }
}

/// Which engine holds channel state.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// This process, in memory or in `[storage]` (the default).
    #[default]
    Embedded,
    /// A NATS JetStream cluster shared by several gateway nodes (`[nats]`).
    Nats,
}

/// `[engine]`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct EngineSection {
    /// `embedded` or `nats`.
    pub kind: EngineKind,
}

/// `[nats]`: the JetStream cluster of `[engine] kind = "nats"`
/// (docs/cluster.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsSection {
    /// Server URLs, e.g. `["nats://10.0.0.1:4222", "nats://10.0.0.2:4222"]`.
    pub servers: Vec<String>,
    /// User (with `password`).
    pub user: String,
    /// Password of `user`.
    pub password: String,
    /// Token authentication.
    pub token: String,
    /// File holding an NKey seed.
    pub nkey_seed_file: String,
    /// A `.creds` file (user JWT and seed).
    pub creds_file: String,
    /// CA bundle the servers' certificates chain to (enables TLS).
    pub tls_ca: String,
    /// Client certificate (mutual TLS), with `tls_key`.
    pub tls_cert: String,
    /// Client key of `tls_cert`.
    pub tls_key: String,
    /// Refuse a connection without TLS.
    pub tls_required: bool,
    /// Prefix of the stream and bucket names.
    pub stream: String,
    /// Root subject of the message streams.
    pub subject: String,
    /// Replicas of every stream and bucket.
    pub replicas: usize,
    /// Longest wait for the first connection.
    #[serde(deserialize_with = "de_duration")]
    pub connect_timeout: Duration,
    /// Longest wait for a JetStream reply.
    #[serde(deserialize_with = "de_duration")]
    pub request_timeout: Duration,
    /// Most channels a wildcard subscription replays from.
    pub max_wildcard_channels: usize,
}

impl Default for NatsSection {
    fn default() -> Self {
        let d = NatsOptions::default();
        NatsSection {
            servers: d.servers,
            user: String::new(),
            password: String::new(),
            token: String::new(),
            nkey_seed_file: String::new(),
            creds_file: String::new(),
            tls_ca: String::new(),
            tls_cert: String::new(),
            tls_key: String::new(),
            tls_required: false,
            stream: d.stream,
            subject: d.subject,
            replicas: d.replicas,
            connect_timeout: d.connect_timeout,
            request_timeout: d.request_timeout,
            max_wildcard_channels: d.max_wildcard_channels,
        }
    }
}

impl NatsSection {
    /// The engine's options.
    pub fn options(&self) -> NatsOptions {
        let path = |s: &str| (!s.is_empty()).then(|| PathBuf::from(s));
        NatsOptions {
            servers: self.servers.clone(),
            user: self.user.clone(),
            password: self.password.clone(),
            token: self.token.clone(),
            nkey_seed_file: path(&self.nkey_seed_file),
            creds_file: path(&self.creds_file),
            tls_ca: path(&self.tls_ca),
            tls_cert: path(&self.tls_cert).zip(path(&self.tls_key)),
            tls_required: self.tls_required,
            stream: self.stream.clone(),
            subject: self.subject.clone(),
            replicas: self.replicas,
            connect_timeout: self.connect_timeout,
            request_timeout: self.request_timeout,
            max_wildcard_channels: self.max_wildcard_channels,
        }
    }

    fn validate(&self) -> Result<(), String> {
        if self.servers.is_empty() {
            return Err("nats.servers must name at least one server".into());
        }
        for s in &self.servers {
            if s.parse::<async_nats::ServerAddr>().is_err() {
                return Err(format!("nats.servers: {s:?} is not a NATS URL (nats://host:port)"));
            }
        }
        if self.user.is_empty() != self.password.is_empty() {
            return Err("nats.user and nats.password go together".into());
        }
        let ways = [
            !self.user.is_empty(),
            !self.token.is_empty(),
            !self.nkey_seed_file.is_empty(),
            !self.creds_file.is_empty(),
        ];
        if ways.iter().filter(|w| **w).count() > 1 {
            return Err("nats: give one of user/password, token, nkey_seed_file or creds_file".into());
        }
        if self.tls_cert.is_empty() != self.tls_key.is_empty() {
            return Err("nats.tls_cert and nats.tls_key go together".into());
        }
        for (name, file) in [
            ("nkey_seed_file", &self.nkey_seed_file),
            ("creds_file", &self.creds_file),
            ("tls_ca", &self.tls_ca),
            ("tls_cert", &self.tls_cert),
            ("tls_key", &self.tls_key),
        ] {
            if !file.is_empty() && !Path::new(file).is_file() {
                return Err(format!("nats.{name}: {file:?} is not a readable file"));
            }
        }
        let name_ok = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !name_ok(&self.stream) {
            return Err("nats.stream must be letters, digits, '_' or '-'".into());
        }
        if !self.subject.split('.').all(name_ok) {
            return Err("nats.subject must be dot-separated tokens of letters, digits, '_' or '-'".into());
        }
        if !(1..=5).contains(&self.replicas) {
            return Err("nats.replicas must be 1..=5".into());
        }
        if self.max_wildcard_channels == 0 {
            return Err("nats.max_wildcard_channels must be at least 1".into());
        }
        if self.connect_timeout.is_zero() || self.request_timeout.is_zero() {
            return Err("nats.connect_timeout and nats.request_timeout must be above zero".into());
        }
        Ok(())
    }
}

/// `[shutdown]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// Longest wait for connections to close after SIGTERM/SIGINT.
    #[serde(deserialize_with = "de_duration")]
    pub grace: Duration,
    /// How long a drain keeps serving with `/readyz` false before it tells
    /// clients to go (time for a load balancer to notice).
    #[serde(deserialize_with = "de_duration")]
    pub drain_delay: Duration,
    /// How long a shutdown waits, after the sessions ended, for pending
    /// webhook deliveries (with durable storage they persist anyway).
    #[serde(deserialize_with = "de_duration")]
    pub webhook_flush: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            grace: Duration::from_secs(10),
            drain_delay: Duration::ZERO,
            webhook_flush: Duration::from_secs(2),
        }
    }
}

/// One `[[webhooks]]` endpoint: lifecycle events POSTed as signed JSON
/// (docs/webhooks.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// Where events are POSTed: an `http://` or `https://` URL.
    pub url: String,
    /// The HMAC-SHA256 key of the `Switchboard-Signature` header, at least
    /// 16 bytes.
    pub secret: String,
    /// Event types sent (`connect`, `disconnect`, `subscribe`,
    /// `unsubscribe`, `presence.enter`, `presence.update`,
    /// `presence.leave`, `publish`). Default: all but `publish`.
    pub events: Vec<String>,
    /// MQTT filters selecting the channels whose events are sent
    /// (connect and disconnect have none and are always sent).
    pub channels: Vec<String>,
    /// The endpoint's name in metrics and logs, and the key of its pending
    /// events on disk. Default: the URL without credentials and query.
    pub name: String,
    /// Longest wait for one delivery's answer.
    #[serde(deserialize_with = "de_duration")]
    pub timeout: Duration,
    /// Most events waiting for delivery; more are dropped (counted, logged).
    pub queue_size: usize,
    /// Most bytes of events waiting for delivery (their JSON bodies, about).
    pub queue_bytes: usize,
    /// Back-off before the first retry (full jitter: a random wait up to
    /// this, doubling per failed attempt).
    #[serde(deserialize_with = "de_duration")]
    pub backoff_min: Duration,
    /// Longest back-off between two attempts.
    #[serde(deserialize_with = "de_duration")]
    pub backoff_max: Duration,
    /// An event not delivered this long after it happened is dropped.
    #[serde(deserialize_with = "de_duration")]
    pub max_age: Duration,
}

/// The events a webhook gets when its `events` is not set.
pub const DEFAULT_WEBHOOK_EVENTS: [&str; 7] =
    ["connect", "disconnect", "subscribe", "unsubscribe", "presence.enter", "presence.update", "presence.leave"];

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            url: String::new(),
            secret: String::new(),
            events: DEFAULT_WEBHOOK_EVENTS.iter().map(|e| e.to_string()).collect(),
            channels: vec!["#".into()],
            name: String::new(),
            timeout: Duration::from_secs(10),
            queue_size: 10_000,
            queue_bytes: 64 * 1024 * 1024,
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            max_age: Duration::from_secs(24 * 3600),
        }
    }
}

/// Shortest webhook secret.
pub const WEBHOOK_SECRET_MIN_LEN: usize = 16;

impl WebhookConfig {
    /// The parsed URL, or why it is refused.
    pub fn parsed_url(&self) -> Result<url::Url, String> {
        let u = url::Url::parse(&self.url).map_err(|e| format!("url {:?} is not a URL: {e}", self.url))?;
        if !matches!(u.scheme(), "http" | "https") {
            return Err(format!("url {:?} must be http:// or https://", self.url));
        }
        if u.host_str().is_none_or(str::is_empty) {
            return Err(format!("url {:?} names no host", self.url));
        }
        if u.fragment().is_some() {
            return Err(format!("url {:?} must not have a #fragment", self.url));
        }
        Ok(u)
    }

    /// The name in metrics, logs and on disk: `name`, or the URL without
    /// credentials, query and fragment.
    pub fn display_name(&self) -> String {
        if !self.name.is_empty() {
            return self.name.clone();
        }
        match self.parsed_url() {
            Ok(mut u) => {
                let _ = u.set_username("");
                let _ = u.set_password(None);
                u.set_query(None);
                u.to_string()
            }
            Err(_) => self.url.clone(),
        }
    }

    /// The event kinds listed in `events`.
    pub fn event_kinds(&self) -> Result<Vec<crate::core::lifecycle::EventKind>, String> {
        use crate::core::lifecycle::EventKind;
        if self.events.is_empty() {
            return Err("events is empty: list the events to send, or leave it out for all but publish".into());
        }
        self.events
            .iter()
            .map(|e| {
                EventKind::from_name(e).ok_or_else(|| {
                    let known: Vec<_> = EventKind::ALL.iter().map(|k| k.name()).collect();
                    format!("events: unknown event {e:?} (known: {})", known.join(", "))
                })
            })
            .collect()
    }

    /// Checks one endpoint (the message says what to fix, not where).
    fn validate(&self) -> Result<(), String> {
        self.parsed_url()?;
        if self.secret.len() < WEBHOOK_SECRET_MIN_LEN {
            return Err(format!(
                "secret must be at least {WEBHOOK_SECRET_MIN_LEN} bytes (receivers check the signature with it)"
            ));
        }
        self.event_kinds()?;
        if self.channels.is_empty() {
            return Err("channels is empty: give MQTT filters, or leave it out for every channel (\"#\")".into());
        }
        for f in &self.channels {
            crate::core::channel::validate_filter(f).map_err(|e| format!("channels filter {f:?}: {e}"))?;
        }
        if self.name.len() > 128 || self.name.contains('\0') {
            return Err("name must be at most 128 bytes without NUL".into());
        }
        // The name keys the endpoint's pending events on disk.
        if self.display_name().len() > 1024 {
            return Err(
                "the URL is over 1 024 bytes: give the endpoint a shorter name (it keys its events on disk)".into()
            );
        }
        if self.timeout < Duration::from_millis(100) || self.timeout > Duration::from_secs(300) {
            return Err("timeout must be 100ms..=5m".into());
        }
        if !(1..=1_000_000).contains(&self.queue_size) {
            return Err("queue_size must be 1..=1000000".into());
        }
        if !(64 * 1024..=1 << 34).contains(&self.queue_bytes) {
            return Err("queue_bytes must be 65536..=17179869184".into());
        }
        if self.backoff_min < Duration::from_millis(10) || self.backoff_max < self.backoff_min {
            return Err("backoff_min must be at least 10ms and backoff_max at least backoff_min".into());
        }
        if self.backoff_max > Duration::from_secs(24 * 3600) {
            return Err("backoff_max must be at most 24h".into());
        }
        if self.max_age.is_zero() {
            return Err("max_age must be above zero".into());
        }
        Ok(())
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Allow open auth (`[auth] mode = "open"`) on non-loopback addresses.
    /// Off by default: `serve` refuses to expose an open gateway.
    pub insecure: bool,
    /// `[node]`.
    pub node: NodeConfig,
    /// `[listen]`.
    pub listen: ListenConfig,
    /// `[limits]`.
    pub limits: LimitsConfig,
    /// `[websocket]`.
    pub websocket: WebSocketConfig,
    /// `[channels]`.
    pub channels: ChannelsConfig,
    /// `[sse]`.
    pub sse: SseSection,
    /// `[poll]`.
    pub poll: PollSection,
    /// `[mqtt]`.
    pub mqtt: MqttSection,
    /// `[auth]`.
    pub auth: AuthSection,
    /// `[rest]`.
    pub rest: RestConfig,
    /// `[http]`.
    pub http: HttpSection,
    /// `[admin]`.
    pub admin: AdminSection,
    /// `[echo]`.
    pub echo: EchoConfig,
    /// `[shutdown]`.
    pub shutdown: ShutdownConfig,
    /// `[tls]`.
    pub tls: TlsSection,
    /// `[storage]`.
    pub storage: StorageSection,
    /// `[engine]`.
    pub engine: EngineSection,
    /// `[nats]`.
    pub nats: NatsSection,
    /// `[[webhooks]]`: lifecycle events POSTed to HTTP endpoints.
    pub webhooks: Vec<WebhookConfig>,
    /// Set by `dev` (never from a file): TLS listeners without a configured
    /// certificate get a generated self-signed one.
    #[serde(skip)]
    pub dev: bool,
}

/// One certificate chain and its key (`[[tls.certificates]]`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CertPair {
    /// PEM file: the leaf certificate, then intermediates.
    pub cert: String,
    /// PEM file: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: String,
}

/// Whether MQTTS asks devices for a client certificate.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// No client certificates.
    #[default]
    None,
    /// Verified when presented; devices without one authenticate by token.
    Optional,
    /// Every MQTTS connection must present a certificate from `client_ca`.
    Required,
}

/// `[tls]`: certificates shared by the HTTPS, MQTTS and QUIC listeners.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSection {
    /// Certificate chains; the first is the default, the others are chosen
    /// by SNI against their DNS names. Empty in `dev`: a self-signed
    /// certificate is generated at start.
    pub certificates: Vec<CertPair>,
    /// PEM bundle of the CAs whose client certificates MQTTS accepts.
    pub client_ca: String,
    /// `none`, `optional` or `required` (MQTTS only).
    pub mqtt_client_auth: ClientAuth,
    /// How often the files are checked for changes (`0s`: only on SIGHUP).
    #[serde(deserialize_with = "de_duration")]
    pub reload_interval: Duration,
    /// A TLS handshake not finished within this is dropped.
    #[serde(deserialize_with = "de_duration")]
    pub handshake_timeout: Duration,
}

impl Default for TlsSection {
    fn default() -> Self {
        TlsSection {
            certificates: Vec::new(),
            client_ca: String::new(),
            mqtt_client_auth: ClientAuth::None,
            reload_interval: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

impl Config {
    /// Outside `dev`, TLS listeners need configured certificates (checked
    /// by [`Config::load`]; `dev` generates one).
    pub fn check_tls(&self) -> Result<(), ConfigError> {
        if self.tls_needed() && self.tls.certificates.is_empty() && !self.dev {
            return Err(ConfigError::Invalid(
                "listen.https, listen.mqtts and listen.quic need [tls] certificates (see certs/README.md)".into(),
            ));
        }
        Ok(())
    }

    /// Whether any TLS listener (HTTPS, MQTTS, QUIC) is configured.
    pub fn tls_needed(&self) -> bool {
        !(self.listen.https.is_empty() && self.listen.mqtts.is_empty() && self.listen.quic.is_empty())
    }
}

const ENV_PREFIX: &str = "SWITCHBOARD_";

/// `dev`'s HTTPS listener.
pub const DEV_HTTPS: &str = "127.0.0.1:8443";
/// `dev`'s MQTTS listener.
pub const DEV_MQTTS: &str = "127.0.0.1:8883";
/// `dev`'s QUIC (WebTransport) listener: UDP, the same number as HTTPS.
pub const DEV_QUIC: &str = "127.0.0.1:8443";

/// Applies `SWITCHBOARD_A__B=value` overrides to a TOML tree.
pub fn apply_env_overrides(
    root: &mut toml::Table,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    for (key, value) in vars {
        let Some(path) = key.strip_prefix(ENV_PREFIX) else { continue };
        let parts: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
        if parts.iter().any(String::is_empty) {
            return Err(ConfigError::Invalid(format!("bad override variable {key}")));
        }
        let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or(toml::Value::String(value));
        let (last, dirs) = parts.split_last().expect("at least one part");
        let mut table = &mut *root;
        for d in dirs {
            let entry = table.entry(d.clone()).or_insert_with(|| toml::Value::Table(Default::default()));
            table = entry.as_table_mut().ok_or_else(|| ConfigError::Invalid(format!("{key}: {d} is not a table")))?;
        }
        table.insert(last.clone(), parsed);
    }
    Ok(())
}

impl Config {
    /// Parses TOML text, applies overrides from `vars`, validates.
    pub fn from_toml(text: &str, vars: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        apply_env_overrides(&mut table, vars)?;
        let cfg: Config =
            toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a file, applies the process environment's overrides, validates
    /// (including [`Config::check_exposure`] and
    /// [`Config::check_admin_exposure`]).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        let cfg = Self::from_toml(&text, std::env::vars())?;
        cfg.check_exposure()?;
        cfg.check_admin_exposure()?;
        cfg.check_tls()?;
        Ok(cfg)
    }

    /// The embedded defaults plus environment overrides (for `dev`).
    pub fn dev_defaults() -> Result<Self, ConfigError> {
        let mut cfg = Self::from_toml("", std::env::vars())?;
        cfg.echo.enabled = true;
        cfg.dev = true;
        // Dev keeps everything in memory unless `--data DIR` says otherwise.
        cfg.storage.kind = StorageKind::Memory;
        // Dev serves TLS beside the plain listeners, with a generated
        // certificate unless [tls] names one.
        let l = &mut cfg.listen;
        for (slot, default) in [(&mut l.https, DEV_HTTPS), (&mut l.mqtts, DEV_MQTTS), (&mut l.quic, DEV_QUIC)] {
            if slot.is_empty() {
                *slot = default.into();
            }
        }
        Ok(cfg)
    }

    /// Checks ranges and consistency.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        for (name, addr) in self.listen.all() {
            if !addr.is_empty() && addr.parse::<SocketAddr>().is_err() {
                return bad(format!("{name} = {addr:?} is not IP:PORT"));
            }
        }
        let t = &self.tls;
        if t.mqtt_client_auth != ClientAuth::None && t.client_ca.is_empty() {
            return bad(
                "tls.mqtt_client_auth needs tls.client_ca (the CA bundle client certificates must chain to)".into()
            );
        }
        if t.handshake_timeout.is_zero() {
            return bad("tls.handshake_timeout must be above zero".into());
        }
        let h = &self.http;
        for (name, d) in [
            ("header_read_timeout", h.header_read_timeout),
            ("body_read_timeout", h.body_read_timeout),
            ("idle_timeout", h.idle_timeout),
            ("write_timeout", h.write_timeout),
        ] {
            if d.is_zero() {
                return bad(format!("http.{name} must be above zero"));
            }
        }
        let l = &self.limits;
        if l.max_message_size == 0 || l.max_message_size > 16 * 1024 * 1024 {
            return bad("limits.max_message_size must be 1..=16777216".into());
        }
        if l.max_frame_size < l.max_message_size {
            return bad("limits.max_frame_size must be at least limits.max_message_size".into());
        }
        if l.outbox_bytes < 2 * l.max_message_size {
            return bad("limits.outbox_bytes must be at least twice limits.max_message_size".into());
        }
        if l.write_delay > Duration::from_secs(1) {
            return bad("limits.write_delay must be at most 1s (it adds that much latency to every delivery)".into());
        }
        if !(l.publish_rate >= 0.0 && l.publish_rate.is_finite()) || (l.publish_rate > 0.0 && l.publish_burst < 1.0) {
            return bad("limits.publish_rate must be >= 0 and limits.publish_burst >= 1".into());
        }
        if !(l.new_connections_per_sec >= 0.0 && l.new_connections_per_sec.is_finite())
            || (l.new_connections_per_sec > 0.0 && l.new_connections_burst < 1.0)
        {
            return bad("limits.new_connections_per_sec must be >= 0 and limits.new_connections_burst >= 1".into());
        }
        if !(l.request_rate >= 0.0 && l.request_rate.is_finite()) || (l.request_rate > 0.0 && l.request_burst < 1.0) {
            return bad("limits.request_rate must be >= 0 and limits.request_burst >= 1".into());
        }
        if l.max_channels == 0 || l.max_positions == 0 || l.max_presence_per_connection == 0 {
            return bad("limits.max_channels, max_positions and max_presence_per_connection must be at least 1".into());
        }
        if !(l.new_connections_per_ip_per_sec >= 0.0 && l.new_connections_per_ip_per_sec.is_finite())
            || (l.new_connections_per_ip_per_sec > 0.0 && l.new_connections_per_ip_burst < 1.0)
        {
            return bad(
                "limits.new_connections_per_ip_per_sec must be >= 0 and limits.new_connections_per_ip_burst >= 1"
                    .into(),
            );
        }
        if l.max_subscriptions == 0 {
            return bad("limits.max_subscriptions must be at least 1".into());
        }
        if self.echo.max_message_size == 0 || self.echo.max_message_size > 16 * 1024 * 1024 {
            return bad("echo.max_message_size must be 1..=16777216".into());
        }
        if self.websocket.read_buffer < 512 || self.websocket.read_buffer > 1024 * 1024 {
            return bad("websocket.read_buffer must be 512..=1048576".into());
        }
        if l.max_stream_channels == 0 || l.max_stream_channels > 1024 {
            return bad("limits.max_stream_channels must be 1..=1024".into());
        }
        if l.max_query_len < 256 {
            return bad("limits.max_query_len must be at least 256".into());
        }
        if self.poll.batch_max == 0 || self.poll.batch_max > 10_000 {
            return bad("poll.batch_max must be 1..=10000".into());
        }
        if self.poll.default_timeout > self.poll.max_timeout {
            return bad("poll.default_timeout must not exceed poll.max_timeout".into());
        }
        if self.engine.kind == EngineKind::Nats {
            self.nats.validate().map_err(ConfigError::Invalid)?;
        }
        let st = &self.storage;
        if self.engine.kind == EngineKind::Embedded && st.kind == StorageKind::Disk && st.dir.as_os_str().is_empty() {
            return bad("storage.dir must name a directory (or set storage.kind = \"memory\")".into());
        }
        if st.sync == SyncPolicy::Interval && (st.sync_interval.is_zero() || st.sync_interval > Duration::from_secs(60))
        {
            return bad("storage.sync_interval must be above zero and at most 60s".into());
        }
        if self.sse.keepalive < Duration::from_millis(100) {
            return bad("sse.keepalive must be at least 100ms".into());
        }
        let m = &self.mqtt;
        if m.max_packet_size < 64 || m.max_packet_size > 256 * 1024 * 1024 {
            return bad("mqtt.max_packet_size must be 64..=268435456".into());
        }
        if m.receive_maximum == 0 {
            return bad("mqtt.receive_maximum must be at least 1".into());
        }
        if m.read_buffer < 512 {
            return bad("mqtt.read_buffer must be at least 512".into());
        }
        if m.max_queued_bytes < m.max_packet_size {
            return bad("mqtt.max_queued_bytes must be at least mqtt.max_packet_size".into());
        }
        self.auth.verifier()?;
        if self.auth.mode == AuthMode::Open && !self.auth.anonymous_caps.is_empty() {
            return bad(
                "auth.anonymous_caps applies in token mode only (open mode lets every client do everything)".into()
            );
        }
        if self.auth.audience.iter().any(|a| a.trim().is_empty()) {
            return bad("auth.audience must not hold an empty string".into());
        }
        self.origin_policy()?;
        let token = &self.admin.token;
        if !token.is_empty() && (token.len() < ADMIN_TOKEN_MIN_LEN || token.trim() != token) {
            return bad(format!(
                "admin.token must be at least {ADMIN_TOKEN_MIN_LEN} bytes without surrounding spaces (or empty: no \
                 admin API authentication, loopback only)"
            ));
        }
        if self.node.name.is_empty() || self.node.name.len() > 64 {
            return bad("node.name must be 1..=64 bytes".into());
        }
        if self.shutdown.webhook_flush > Duration::from_secs(300) {
            return bad("shutdown.webhook_flush must be at most 5m".into());
        }
        let mut names = std::collections::HashSet::new();
        for (i, w) in self.webhooks.iter().enumerate() {
            w.validate().map_err(|e| ConfigError::Invalid(format!("webhooks[{i}] ({}): {e}", w.display_name())))?;
            if !names.insert(w.display_name()) {
                return bad(format!(
                    "webhooks[{i}]: another webhook has the name {:?}; give each a distinct name",
                    w.display_name()
                ));
            }
        }
        for r in &self.channels.rules {
            crate::core::channel::validate_filter(&r.pattern)
                .map_err(|e| ConfigError::Invalid(format!("channels.rules pattern {:?}: {e}", r.pattern)))?;
            if let Some(t) = &r.history_ttl {
                parse_duration(t).map_err(|e| ConfigError::Invalid(format!("channels.rules {:?}: {e}", r.pattern)))?;
            }
        }
        Ok(())
    }

    /// Refuses open auth on a non-loopback listener unless `insecure = true`:
    /// anyone who can reach it could read and write every channel.
    pub fn check_exposure(&self) -> Result<(), ConfigError> {
        if self.auth.mode != AuthMode::Open || self.insecure {
            return Ok(());
        }
        for (name, addr) in self.listen.all().into_iter().filter(|(n, _)| *n != "listen.admin") {
            let Ok(a) = addr.parse::<SocketAddr>() else { continue };
            if !a.ip().is_loopback() {
                return Err(ConfigError::Invalid(format!(
                    "{name} = {addr:?} is not a loopback address and [auth] mode is \"open\": anyone could read and \
                     write every channel. Set [auth] mode = \"token\" (with [[auth.keys]]), bind loopback, or set \
                     insecure = true to accept the risk"
                )));
            }
        }
        Ok(())
    }

    /// Refuses a non-loopback admin listener without `[admin] token`: the
    /// admin API lists every session and closes any, so whoever can reach
    /// the address could. `insecure` does not lift this; a token is one
    /// line of configuration.
    pub fn check_admin_exposure(&self) -> Result<(), ConfigError> {
        let addr = &self.listen.admin;
        let Ok(a) = addr.parse::<SocketAddr>() else { return Ok(()) };
        if self.admin.token.is_empty() && !a.ip().is_loopback() {
            return Err(ConfigError::Invalid(format!(
                "listen.admin = {addr:?} is not a loopback address and [admin] token is not set: anyone who can \
                 reach it could list and close every session. Set [admin] token (or SWITCHBOARD_ADMIN__TOKEN) to a \
                 secret of at least {ADMIN_TOKEN_MIN_LEN} bytes, or bind the admin listener to loopback"
            )));
        }
        Ok(())
    }

    /// The `Origin` allow-list of the browser-facing routes (`[http]
    /// allowed_origins`).
    pub fn origin_policy(&self) -> Result<switchboard_protocols::origin::OriginPolicy, ConfigError> {
        switchboard_protocols::origin::OriginPolicy::new(&self.http.allowed_origins)
            .map_err(|e| ConfigError::Invalid(format!("http.allowed_origins: {e}")))
    }

    /// The engine's configuration.
    pub fn engine(&self) -> EngineConfig {
        let c = &self.channels;
        let default_policy = ChannelPolicy {
            history_size: c.history_size,
            history_ttl: c.history_ttl,
            slow_policy: c.slow_consumer.into(),
        };
        let rules = c
            .rules
            .iter()
            .map(|r| ChannelRule {
                pattern: r.pattern.clone(),
                policy: ChannelPolicy {
                    history_size: r.history_size.unwrap_or(c.history_size),
                    history_ttl: r.history_ttl.as_deref().and_then(|t| parse_duration(t).ok()).unwrap_or(c.history_ttl),
                    slow_policy: r.slow_consumer.unwrap_or(c.slow_consumer).into(),
                },
            })
            .collect();
        EngineConfig {
            node: self.node.name.clone(),
            rules,
            default_policy,
            dedupe_window: c.dedupe_window,
            presence_grace: c.presence_grace,
            presence_max_members: c.presence_max_members,
            history_page_max: c.history_page_max,
            history_page_bytes: c.history_page_bytes,
            max_shared_groups: self.limits.max_shared_groups,
            max_channels: self.limits.max_channels,
            max_history_bytes: self.limits.max_history_bytes,
            max_retained_bytes: self.limits.max_retained_bytes,
            retained_ttl: c.retained_ttl,
            max_presence_members: self.limits.max_presence_members,
            ..EngineConfig::default()
        }
    }

    /// The router's limits.
    pub fn router_limits(&self) -> RouterLimits {
        RouterLimits {
            max_message_size: self.limits.max_message_size,
            max_subscriptions: self.limits.max_subscriptions,
            outbox_capacity: self.limits.outbox_bytes,
            write_delay: self.limits.write_delay,
            publish_rate: self.limits.publish_rate,
            publish_burst: self.limits.publish_burst,
            recovery_window: self.channels.recovery_window,
            max_positions: self.limits.max_positions,
            request_rate: self.limits.request_rate,
            request_burst: self.limits.request_burst,
            max_presence_per_connection: self.limits.max_presence_per_connection,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("x").is_err());
    }

    #[test]
    fn defaults_and_overrides() {
        let vars = vec![
            ("SWITCHBOARD_LIMITS__MAX_MESSAGE_SIZE".to_string(), "1000".to_string()),
            ("SWITCHBOARD_LISTEN__HTTP".to_string(), "127.0.0.1:1".to_string()),
            ("SWITCHBOARD_CHANNELS__DEDUPE_WINDOW".to_string(), "30s".to_string()),
            ("OTHER".to_string(), "x".to_string()),
        ];
        let cfg = Config::from_toml("[node]\nname = \"n\"\n", vars).unwrap();
        assert_eq!(cfg.limits.max_message_size, 1000);
        assert_eq!(cfg.listen.http, "127.0.0.1:1");
        assert_eq!(cfg.channels.dedupe_window, Duration::from_secs(30));
        assert_eq!(cfg.node.name, "n");
        assert_eq!(cfg.limits.outbox_bytes, 1024 * 1024);
    }

    #[test]
    fn rules_and_errors() {
        let cfg = Config::from_toml(
            "[[channels.rules]]\npattern = \"sensors/#\"\nslow_consumer = \"conflate\"\nhistory_ttl = \"1m\"\n",
            Vec::new(),
        )
        .unwrap();
        let e = cfg.engine();
        assert_eq!(e.policy_for("sensors/1").slow_policy, SlowPolicy::Conflate);
        assert_eq!(e.policy_for("sensors/1").history_ttl, Duration::from_secs(60));
        assert_eq!(e.policy_for("chat").slow_policy, SlowPolicy::Disconnect);
        assert!(Config::from_toml("[nope]\n", Vec::new()).is_err());
        assert!(Config::from_toml("[limits]\nmax_message_size = 0\n", Vec::new()).is_err());
        assert!(Config::from_toml("[listen]\nhttp = \"nowhere\"\n", Vec::new()).is_err());
        assert!(Config::from_toml("[[channels.rules]]\npattern = \"a/#/b\"\n", Vec::new()).is_err());
        assert!(Config::from_toml("[channels]\nhistory_ttl = \"ten\"\n", Vec::new()).is_err());
        let delayed = Config::from_toml("[limits]\nwrite_delay = \"2ms\"\n", Vec::new()).unwrap();
        assert_eq!(delayed.router_limits().write_delay, Duration::from_millis(2));
        let e = Config::from_toml("[limits]\nwrite_delay = \"2s\"\n", Vec::new()).unwrap_err().to_string();
        assert!(e.contains("limits.write_delay"), "{e}");
    }

    #[test]
    fn tls_listeners_need_certificates_outside_dev() {
        let text = "[listen]\nhttps = \"127.0.0.1:8443\"\n";
        let e = Config::from_toml(text, Vec::new()).unwrap().check_tls().unwrap_err().to_string();
        assert!(e.contains("[tls] certificates"), "{e}");
        let with = format!("{text}[tls]\ncertificates = [{{ cert = \"a.pem\", key = \"a.key\" }}]\n");
        let cfg = Config::from_toml(&with, Vec::new()).unwrap();
        assert_eq!(cfg.tls.certificates[0].cert, "a.pem");
        assert!(cfg.check_tls().is_ok());
        let e = Config::from_toml(&format!("{with}mqtt_client_auth = \"required\"\n"), Vec::new()).unwrap_err();
        assert!(e.to_string().contains("client_ca"), "{e}");
        let e = Config::from_toml("[tls]\nmqtt_client_auth = \"sometimes\"\n", Vec::new()).unwrap_err();
        assert!(e.to_string().contains("sometimes"), "{e}");
        // dev fills in the TLS listeners and generates the certificate.
        let dev = Config::dev_defaults().unwrap();
        assert_eq!((dev.listen.https.as_str(), dev.listen.mqtts.as_str()), (DEV_HTTPS, DEV_MQTTS));
        assert!(dev.validate().is_ok() && dev.check_tls().is_ok());
        // Exposing a TLS listener with open auth is refused like a plain one.
        let exposed = "[listen]\nmqtts = \"0.0.0.0:8883\"\n[tls]\ncertificates = [{ cert = \"a\", key = \"b\" }]\n";
        let cfg = Config::from_toml(exposed, Vec::new()).unwrap();
        assert!(cfg.check_exposure().unwrap_err().to_string().contains("listen.mqtts"));
    }

    #[test]
    fn open_auth_is_not_exposed_without_insecure() {
        let exposed = "[listen]\nhttp = \"0.0.0.0:8080\"\n";
        let cfg = Config::from_toml(exposed, Vec::new()).unwrap();
        let e = cfg.check_exposure().unwrap_err().to_string();
        assert!(e.contains("insecure = true"), "{e}");
        let cfg = Config::from_toml(&format!("insecure = true\n{exposed}"), Vec::new()).unwrap();
        assert!(cfg.check_exposure().is_ok());
        let cfg = Config::from_toml("[listen]\nmqtt = \"0.0.0.0:1883\"\n", Vec::new()).unwrap();
        assert!(cfg.check_exposure().is_err());
        let token =
            "[auth]\nmode = \"token\"\n[[auth.keys]]\nalg = \"HS256\"\nsecret = \"0123456789abcdef0123456789abcdef\"\n";
        let cfg = Config::from_toml(&format!("{exposed}{token}"), Vec::new()).unwrap();
        assert!(cfg.check_exposure().is_ok());
        assert!(Config::from_toml("", Vec::new()).unwrap().check_exposure().is_ok(), "loopback defaults are fine");
    }

    #[test]
    fn a_non_loopback_admin_listener_needs_a_token() {
        let exposed = "[listen]\nadmin = \"0.0.0.0:9090\"\n";
        let e = Config::from_toml(exposed, Vec::new()).unwrap().check_admin_exposure().unwrap_err().to_string();
        assert!(e.contains("listen.admin") && e.contains("[admin] token"), "{e}");
        let cfg = Config::from_toml(&format!("insecure = true\n{exposed}"), Vec::new()).unwrap();
        assert!(cfg.check_admin_exposure().is_err(), "insecure does not open the admin API");
        let token = "[admin]\ntoken = \"0123456789abcdef\"\n";
        assert!(Config::from_toml(&format!("{exposed}{token}"), Vec::new()).unwrap().check_admin_exposure().is_ok());
        let env = vec![("SWITCHBOARD_ADMIN__TOKEN".to_string(), "an-admin-token-from-env".to_string())];
        let cfg = Config::from_toml(exposed, env).unwrap();
        assert_eq!(cfg.admin.token, "an-admin-token-from-env");
        assert!(cfg.check_admin_exposure().is_ok());
        assert!(Config::from_toml("", Vec::new()).unwrap().check_admin_exposure().is_ok(), "loopback is fine");
        assert!(Config::from_toml("[listen]\nadmin = \"\"\n", Vec::new()).unwrap().check_admin_exposure().is_ok());
        let e = Config::from_toml("[admin]\ntoken = \"short\"\n", Vec::new()).unwrap_err().to_string();
        assert!(e.contains("admin.token"), "{e}");
    }

    #[test]
    fn origins_and_audiences_parse_and_are_checked() {
        let cfg = Config::from_toml(
            "[http]\nallowed_origins = [\"https://app.example.com\", \"https://*.example.org\"]\n",
            Vec::new(),
        )
        .unwrap();
        let p = cfg.origin_policy().unwrap();
        assert!(p.allows(Some("https://a.example.org")) && !p.allows(Some("https://evil.example")));
        assert!(Config::from_toml("", Vec::new()).unwrap().origin_policy().unwrap().allows_any(), "default: any");
        let e = Config::from_toml("[http]\nallowed_origins = [\"app.example.com\"]\n", Vec::new()).unwrap_err();
        assert!(e.to_string().contains("http.allowed_origins"), "{e}");

        let token =
            "[auth]\nmode = \"token\"\n[[auth.keys]]\nalg = \"HS256\"\nsecret = \"0123456789abcdef0123456789abcdef\"\n";
        let one = Config::from_toml(&token.replace("[[auth.keys]]", "audience = \"rt\"\n[[auth.keys]]"), Vec::new());
        assert_eq!(one.unwrap().auth.audience, ["rt"]);
        let many = token.replace("[[auth.keys]]", "audience = [\"rt\", \"api\"]\n[[auth.keys]]");
        assert_eq!(Config::from_toml(&many, Vec::new()).unwrap().auth.audience, ["rt", "api"]);
        let env = vec![("SWITCHBOARD_AUTH__AUDIENCE".to_string(), "from-env".to_string())];
        assert_eq!(Config::from_toml(token, env).unwrap().auth.audience, ["from-env"]);
        let empty = token.replace("[[auth.keys]]", "audience = [\"\"]\n[[auth.keys]]");
        assert!(Config::from_toml(&empty, Vec::new()).is_err());
    }

    #[test]
    fn anonymous_caps_parse_in_token_mode_only() {
        let token =
            "[auth]\nmode = \"token\"\n[[auth.keys]]\nalg = \"HS256\"\nsecret = \"0123456789abcdef0123456789abcdef\"\n";
        let anon = "[auth.anonymous_caps]\n\"public/#\" = \"subscribe\"\n\"news/+\" = [\"subscribe\", \"history\"]\n";
        let cfg = Config::from_toml(&format!("{token}{anon}"), Vec::new()).unwrap();
        assert_eq!(cfg.auth.anonymous_caps.len(), 2);
        let caps = cfg.auth.verifier().unwrap().expect("token mode").anonymous_caps().expect("set");
        assert!(caps.allows(crate::core::auth::Op::History, "news/today"));
        assert!(
            Config::from_toml(token, Vec::new()).unwrap().auth.verifier().unwrap().unwrap().anonymous_caps().is_none()
        );
        let e = Config::from_toml(&format!("{token}[auth.anonymous_caps]\n\"a/#/b\" = \"subscribe\"\n"), Vec::new());
        assert!(e.unwrap_err().to_string().contains("anonymous_caps"));
        let e = Config::from_toml(anon, Vec::new()).unwrap_err().to_string();
        assert!(e.contains("token mode only"), "{e}");
        let env =
            vec![("SWITCHBOARD_AUTH__ANONYMOUS_CAPS".to_string(), "{ \"public/#\" = \"subscribe\" }".to_string())];
        assert_eq!(Config::from_toml(token, env).unwrap().auth.anonymous_caps.len(), 1);
    }

    #[test]
    fn http_timeouts_parse_and_must_be_above_zero() {
        let d = Config::from_toml("", Vec::new()).unwrap().http.timeouts();
        let secs = Duration::from_secs;
        assert_eq!((d.header_read, d.body_read, d.idle, d.write), (secs(10), secs(30), secs(60), secs(30)));
        let text = "[http]\nheader_read_timeout = \"300ms\"\nidle_timeout = \"2m\"\n";
        let env = vec![("SWITCHBOARD_HTTP__WRITE_TIMEOUT".to_string(), "5s".to_string())];
        let t = Config::from_toml(text, env).unwrap().http.timeouts();
        assert_eq!(
            (t.header_read, t.body_read, t.idle, t.write),
            (Duration::from_millis(300), secs(30), secs(120), secs(5))
        );
        let e = Config::from_toml("[http]\nbody_read_timeout = \"0s\"\n", Vec::new()).unwrap_err().to_string();
        assert!(e.contains("http.body_read_timeout"), "{e}");
        assert!(Config::from_toml("[http]\nidle_timeout = \"soon\"\n", Vec::new()).is_err());
    }

    /// `serve` keeps channel state on disk unless told otherwise; `dev`
    /// keeps it in memory; bad storage settings are refused at load.
    #[test]
    fn storage_defaults_and_errors() {
        let serve = Config::from_toml("", Vec::new()).unwrap();
        let disk = serve.storage.disk().expect("disk by default");
        assert_eq!((disk.dir, disk.sync), (PathBuf::from("switchboard-data"), SyncPolicy::Interval));
        assert!(Config::dev_defaults().unwrap().storage.disk().is_none(), "dev is in memory");
        let always = Config::from_toml("[storage]\nsync = \"always\"\ndir = \"/x\"", Vec::new()).unwrap();
        assert_eq!(always.storage.sync, SyncPolicy::Always);
        let env = vec![("SWITCHBOARD_STORAGE__KIND".to_string(), "memory".to_string())];
        assert!(Config::from_toml("", env).unwrap().storage.disk().is_none());
        for bad in ["[storage]\nsync = \"sometimes\"", "[storage]\ndir = \"\"", "[storage]\nsync_interval = \"0s\""] {
            assert!(Config::from_toml(bad, Vec::new()).is_err(), "{bad} is refused");
        }
    }

    /// `[engine] kind = "nats"` checks `[nats]` at load: one way to
    /// authenticate, files that exist, names NATS accepts.
    #[test]
    fn nats_settings_are_checked_at_load() {
        let ok = Config::from_toml(
            "[engine]\nkind = \"nats\"\n[nats]\nservers = [\"nats://10.0.0.1:4222\"]\nreplicas = 3",
            Vec::new(),
        )
        .unwrap();
        let o = ok.nats.options();
        assert_eq!((o.servers.len(), o.replicas, o.stream.as_str()), (1, 3, "SWITCHBOARD"));
        let env = vec![("SWITCHBOARD_ENGINE__KIND".to_string(), "nats".to_string())];
        assert_eq!(Config::from_toml("", env).unwrap().engine.kind, EngineKind::Nats);
        for bad in [
            "servers = []",
            "servers = [\"http://[::1\"]",
            "user = \"u\"",
            "user = \"u\"\npassword = \"p\"\ntoken = \"t\"",
            "creds_file = \"/nonexistent/x.creds\"",
            "tls_cert = \"/etc/hostname\"",
            "stream = \"a.b\"",
            "subject = \"a..b\"",
            "replicas = 0",
            "request_timeout = \"0s\"",
        ] {
            let text = format!("[engine]\nkind = \"nats\"\n[nats]\n{bad}");
            assert!(Config::from_toml(&text, Vec::new()).is_err(), "{bad} is refused");
            // The embedded engine ignores [nats].
            assert!(Config::from_toml(&format!("[nats]\n{bad}"), Vec::new()).is_ok(), "{bad} is ignored when unused");
        }
    }

    #[test]
    fn webhooks_are_checked_at_load() {
        let hook = |fields: &str| format!("[[webhooks]]\nurl = \"https://hooks.example.com/sb\"\n{fields}\n");
        let secret = "secret = \"0123456789abcdef\"";
        let cfg = Config::from_toml(&hook(secret), Vec::new()).unwrap();
        let w = &cfg.webhooks[0];
        assert_eq!(w.event_kinds().unwrap().len(), 7, "every event but publish by default");
        assert!(!w.events.iter().any(|e| e == "publish"));
        assert_eq!((w.channels.as_slice(), w.queue_size), (["#".to_string()].as_slice(), 10_000));
        assert_eq!(w.display_name(), "https://hooks.example.com/sb");
        let with_creds = WebhookConfig { url: "https://u:p@h.example/x?token=t".into(), ..w.clone() };
        assert_eq!(with_creds.display_name(), "https://h.example/x", "no credentials in metrics and logs");
        // The env override takes a whole list of inline tables.
        let env = vec![(
            "SWITCHBOARD_WEBHOOKS".to_string(),
            format!("[{{ url = \"http://127.0.0.1:9/h\", {secret}, events = [\"publish\"] }}]"),
        )];
        let cfg = Config::from_toml("", env).unwrap();
        assert_eq!(cfg.webhooks[0].events, ["publish"]);
        for (fields, says) in [
            ("", "secret must be at least 16 bytes"),
            ("secret = \"short\"", "secret must be at least 16 bytes"),
            (&format!("{secret}\nevents = [\"connect\", \"presence.join\"]"), "unknown event \"presence.join\""),
            (&format!("{secret}\nevents = []"), "events is empty"),
            (&format!("{secret}\nchannels = [\"a/#/b\"]"), "channels filter \"a/#/b\""),
            (&format!("{secret}\ntimeout = \"0s\""), "timeout must be 100ms..=5m"),
            (&format!("{secret}\ntimeout = \"1ms\""), "timeout must be 100ms..=5m"),
            (&format!("{secret}\nbackoff_min = \"1ns\""), "backoff_min must be at least 10ms"),
            (&format!("{secret}\nbackoff_max = \"30d\""), "backoff_max must be at most 24h"),
            (&format!("{secret}\nqueue_size = 0"), "queue_size must be 1..=1000000"),
            (&format!("{secret}\nbackoff_min = \"2s\"\nbackoff_max = \"1s\""), "backoff_max at least backoff_min"),
            (&format!("{secret}\nurl2 = 1"), "unknown field `url2`"),
        ] {
            let e = Config::from_toml(&hook(fields), Vec::new()).unwrap_err().to_string();
            assert!(e.contains(says), "{fields:?}: {e}");
        }
        for url in ["ftp://h/x", "not a url", "http://h/x#frag", "file:///etc/passwd"] {
            let text = format!("[[webhooks]]\nurl = {url:?}\n{secret}\n");
            let e = Config::from_toml(&text, Vec::new()).unwrap_err().to_string();
            assert!(e.contains("webhooks[0]") && e.contains("url"), "{url}: {e}");
        }
        let twice = format!("{}{}", hook(secret), hook(secret));
        let e = Config::from_toml(&twice, Vec::new()).unwrap_err().to_string();
        assert!(e.contains("webhooks[1]") && e.contains("distinct name"), "{e}");
    }

    /// The example config in deploy/ must parse and match the defaults it documents.
    #[test]
    fn example_config_parses() {
        let text = include_str!("../../../deploy/switchboard.example.toml");
        Config::from_toml(text, Vec::new()).unwrap();
    }
}
