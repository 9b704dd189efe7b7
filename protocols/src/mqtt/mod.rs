//! MQTT 3.1.1 and 5.0 front end (TCP, TLS and WebSocket `/mqtt`).
//!
//! The gateway accepts a connection and hands the byte stream to [`serve`]
//! (or a WebSocket to [`serve_ws`]). From there this module owns it: it
//! reads the CONNECT, detects the protocol level from it (4 = 3.1.1, 5 =
//! 5.0), opens a core session, and translates packets to and from the
//! [`Core`]. An MQTT topic is the channel name verbatim; a subscription
//! filter is passed to the core as is (wildcards, `$share/{group}/{filter}`,
//! `$presence/<channel>`).
//!
//! One task per connection runs one `select!` over the socket read, the
//! session's [`Outbox`](crate::port::Outbox), the keepalive timer, the shutdown signal and the
//! takeover signal. Every raced future is cancel-safe (`read_buf` into a
//! buffer owned by the connection; deadlines live in the struct). After
//! every event it drains the outbox into the session's queue, moves what the
//! inflight window allows into packets, encodes everything (acks first, then
//! publications) into one buffer and writes it once under
//! [`MqttConfig::write_timeout`]: one write per batch, not per message.
//!
//! The protocol state (packet ids, inflight QoS 1/2, inbound QoS 2 ids,
//! topic aliases, keepalive, will decisions) is the pure [`session`] module;
//! persistent sessions live in the core, behind the [`SessionStore`] port
//! ([`store`]); the wire codec is [`codec`].
//!
//! # Why rumqttc's `mqttbytes` and not rumqttd
//!
//! rumqttd is a complete broker: its codec keeps `Publish.qos` and `pkid`
//! private (built for its own router), and embedding it would put a second
//! router, with its own retained store and subscriptions, next to the
//! gateway's. The gateway's core is the only router; this module needs a
//! codec and nothing else, which is exactly what rumqttc's `mqttbytes` v4/v5
//! are (with `default-features = false`, so no TLS stack comes with it).
//!
//! # What it deliberately does not do
//!
//! Route, authorise, store retained values or history (the core does);
//! enhanced authentication other than re-authentication with the `jwt`
//! method (below); MQTT 3.1 (protocol level 3 is refused); request/response
//! information; a server reference; store sessions (the core does, behind
//! [`SessionStore`]).
//!
//! A `Gap` from the core (history could not fill a resume) cannot be
//! expressed in MQTT: it is logged at `info` and delivery continues after
//! it.
//!
//! Publications are encoded per connection (pkid, topic alias and
//! subscription identifiers differ per client); within a connection each
//! is encoded once into the batch buffer. Caching a QoS 0 encoding across
//! subscribers would need a slot in [`Delivery`].
//!
//! # Authentication and re-authentication
//!
//! The connection token (a JWT) is the CONNECT password; the user name is
//! free. The client id is the one the core names (with token auth, the
//! token's `sub`): a CONNECT asking for another non-empty id is refused
//! (CONNACK 0x85, 3.1.1: 0x02), since the id keys the persistent session and
//! the takeover of another client; an empty id becomes the core's (MQTT 5:
//! Assigned Client Identifier).
//!
//! An MQTT 5 client that wants to re-authenticate in-session sends CONNECT
//! with Authentication Method `jwt` (property 0x15) and the token as
//! Authentication Data (0x16; the password is used when there is none). The
//! CONNACK then names the method too. Later, an AUTH with reason 0x19
//! (re-authenticate), method `jwt` and the new token as data hands the
//! token to [`Core::refresh`]: the session continues with the new token's
//! caps and expiry, and the server answers AUTH 0x00 (success, method
//! `jwt`). MQTT 5 §4.12.1 asks a failed re-authentication to end the
//! connection, so it does:
//!
//! | client sends | answer |
//! |---|---|
//! | CONNECT with an Authentication Method other than `jwt` | CONNACK 0x8C, close |
//! | CONNECT with Authentication Data but no method | CONNACK 0x82, close |
//! | AUTH 0x19, method `jwt`, a valid token for the same client | AUTH 0x00 (method `jwt`) |
//! | AUTH 0x19 with a token the core refuses (invalid, expired, another client, no token auth configured) | DISCONNECT 0x87 |
//! | AUTH 0x19 with a method other than the CONNECT's | DISCONNECT 0x8C |
//! | AUTH without a method, AUTH with reason 0x00 or 0x18, or any AUTH after a CONNECT without a method (§4.12.0-2) | DISCONNECT 0x82 |
//!
//! Without a refresh, an expired token ends the session (the core closes
//! it): MQTT 5 DISCONNECT 0xA0 (maximum connect time), MQTT 3.1.1 a plain
//! close — 3.1.1 has neither reason codes nor AUTH, so its clients reconnect
//! with a fresh token (a persistent session resumes where it stopped).
//!
//! # Closes
//!
//! `core.close` is called exactly once per opened session: `clean` after a
//! client DISCONNECT, `abrupt` for every other end. MQTT 3.1.1 has no server
//! DISCONNECT, so there every row below is a plain close of the connection.
//!
//! | when | MQTT 5 | MQTT 3.1.1 | will |
//! |---|---|---|---|
//! | first packet not CONNECT, bad protocol name, malformed CONNECT | close | close | — |
//! | CONNECT with protocol level other than 4 or 5 (3 = MQTT 3.1 included) | CONNACK 0x01 (3.1.1 form), close | CONNACK 0x01, close | — |
//! | no CONNECT within [`MqttConfig::connect_timeout`] | close | close | — |
//! | empty client id with clean session 0 | (an id is assigned) | CONNACK 0x02, close | — |
//! | a client id other than the one the core names (the token's `sub`) | CONNACK 0x85, close | CONNACK 0x02, close | — |
//! | will topic invalid | CONNACK 0x90, close | close | — |
//! | core refused the session: `unauthorized` / `permission_denied` / `rate_limited` / `unavailable` / other | CONNACK 0x86 / 0x87 / 0x9F / 0x88 / 0x80 | CONNACK 0x04 / 0x05 / 0x03 / 0x03 / 0x03 | — |
//! | client DISCONNECT 0x00 (any 3.1.1 DISCONNECT) | close | close | discarded |
//! | client DISCONNECT 0x04 | close | — | published |
//! | a packet above [`MqttConfig::max_packet_size`] | DISCONNECT 0x95 | close | published |
//! | malformed packet | DISCONNECT 0x81 | close | published |
//! | CONNECT with an unknown Authentication Method / with Authentication Data and no method | CONNACK 0x8C / 0x82, close | — | — |
//! | second CONNECT, a server-only packet, an AUTH the table above refuses with 0x82, DISCONNECT raising a zero session expiry | DISCONNECT 0x82 | close | published |
//! | re-authentication refused / with another method | DISCONNECT 0x87 / 0x8C | — | published |
//! | PUBLISH topic with a wildcard, a NUL, invalid UTF-8, empty, or reserved `$` (other than `$presence/`) | DISCONNECT 0x90 | close | published |
//! | topic alias 0, above our maximum, or unknown | DISCONNECT 0x94 | — | published |
//! | more inbound QoS 2 awaiting PUBREL than [`MqttConfig::receive_maximum`] | DISCONNECT 0x93 | close | published |
//! | the core refused a QoS 0 publish | (logged, dropped) | close | published |
//! | the core refused a QoS 1/2 publish | PUBACK / PUBREC with the reason (stays open) | close | published |
//! | silent for 1.5 × keep alive | DISCONNECT 0x8D | close | published |
//! | another connection with the same client id | DISCONNECT 0x8E | close | published unless delayed |
//! | outbound queue over [`MqttConfig::max_queued_bytes`], or the core's slow-consumer close | DISCONNECT 0x97 | close | published |
//! | gateway shutting down | DISCONNECT 0x8B | close | published |
//! | kicked by an administrator / token no longer valid / other core close | DISCONNECT 0x98 / 0x87 / 0x80 | close | published |
//! | EOF, I/O error, write slower than [`MqttConfig::write_timeout`] | — | — | published |
//!
//! # Ack reason codes (MQTT 5; 3.1.1 acks carry none)
//!
//! | ack | code | when |
//! |---|---|---|
//! | SUBACK | 0x00-0x02 | granted QoS |
//! | SUBACK | 0x8F (3.1.1: 0x80) | invalid filter, or the core said `invalid_filter` / `invalid_channel` |
//! | SUBACK | 0x87 (3.1.1: 0x80) | `permission_denied` / `unauthorized` / `reserved_channel` (a `$` filter other than `$presence/...`, `$share/...`) |
//! | SUBACK | 0x97 (3.1.1: 0x80) | `too_many_subscriptions` / `rate_limited` |
//! | SUBACK | 0x80 | any other core error |
//! | PUBACK / PUBREC | 0x00 | accepted (also a duplicate idempotency id) |
//! | PUBACK / PUBREC | 0x90 | `invalid_channel` / `reserved_channel` |
//! | PUBACK / PUBREC | 0x87 | `permission_denied` / `unauthorized` / `no_identity` |
//! | PUBACK / PUBREC | 0x97 | `rate_limited` / `message_too_large` |
//! | PUBACK / PUBREC | 0x99 | payload format indicator 1 with a payload that is not UTF-8 |
//! | PUBACK / PUBREC | 0x80 | any other core error |
//! | UNSUBACK | 0x00 / 0x11 | removed / no such subscription |
//!
//! # MQTT 5 mapping
//!
//! | MQTT 5 | envelope |
//! |---|---|
//! | user properties | `headers` (a repeated key: the last value wins) |
//! | user property `id` | `Publish.id` (idempotency key) |
//! | content type, payload format indicator, message expiry, response topic, correlation data | the same-named envelope fields |
//! | subscription user property `rewind` (`10`, `30s`) | `Subscribe.rewind` |
//! | PUBLISH to `$presence/<channel>` | presence enter (or update) with the payload as data; an empty payload leaves |
//! | delivery on `$presence/...` | JSON `{"action":"enter|update|leave","client_id","connection_id","timestamp", data/text/data_b64}` |
//!
//! Outbound messages whose expiry passed are not sent; others carry the
//! remaining interval. Messages larger than the client's Maximum Packet Size
//! are skipped (MQTT 5 §3.1.2.11.4), with a debug log.
//!
//! # Metrics (label `protocol="mqtt"`)
//!
//! `switchboard_messages_out_total`, `switchboard_bytes_in_total`,
//! `switchboard_bytes_out_total`, and `switchboard_protocol_errors_total`
//! with `code` = `not_connect`, `unsupported_version`, `connect_timeout`,
//! `malformed`, `too_large`, `protocol_error`, `topic_invalid`,
//! `alias_invalid`, `receive_maximum`, `keepalive_timeout`,
//! `bad_auth_method`. Refused tokens count in the core's
//! `switchboard_auth_failures_total`.

pub mod codec;
pub mod session;
pub mod store;
pub mod ws;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt as _;
use metrics::Counter;
use switchboard_proto::{self as proto, ErrorCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{oneshot, watch};
use tokio::time::{Instant, Sleep};
use tracing::{Instrument, Span, debug, info, warn};

use crate::port::{CloseKind, CloseReason, Core, CoreError, Delivery, OpenSession, Outbound, SessionHandle};
use codec::{CodecError, Outgoing, Packet, Version, reason};
use session::{
    AliasUse, End, InboundAliases, Keepalive, OutboundAliases, Queued, SessionState, Subscription, Transmit,
};
pub use store::{Claim, Handover, SessionStore, StoredSession, Ticket};
pub use ws::serve_ws;

/// Tunables of the MQTT front end.
#[derive(Debug, Clone)]
pub struct MqttConfig {
    /// The CONNECT must arrive within this long (default 10 s), so a silent
    /// socket cannot hold a slot.
    pub connect_timeout: Duration,
    /// Largest packet accepted, fixed header included (default 256 KiB);
    /// announced as Maximum Packet Size to MQTT 5 clients.
    pub max_packet_size: usize,
    /// Outbound QoS 1/2 messages in flight per client (default 100; an MQTT
    /// 5 client's smaller Receive Maximum wins). Also the Receive Maximum we
    /// announce for inbound QoS 2.
    pub receive_maximum: u16,
    /// Topic aliases a client may use towards us (default 32).
    pub max_topic_aliases: u16,
    /// Longest a persistent session is kept after its connection ends
    /// (default 1 day): the expiry of every 3.1.1 persistent session and the
    /// cap of an MQTT 5 Session Expiry Interval.
    pub session_expiry_max: Duration,
    /// Largest keep alive accepted in seconds (default 0 = the client's);
    /// MQTT 5 clients above it (or with 0) get a Server Keep Alive.
    pub keepalive_max: u16,
    /// A write slower than this drops the connection (default 10 s).
    pub write_timeout: Duration,
    /// Read buffer per connection (default 4 KiB); grows only for a packet
    /// that needs it, up to `max_packet_size`.
    pub read_buffer_size: usize,
    /// Bytes of deliveries waiting for an inflight slot per connection
    /// (default 1 MiB); more is the slow-consumer path (DISCONNECT 0x97).
    pub max_queued_bytes: usize,
    /// Most persistent sessions stored at once (default 10 000).
    pub max_sessions: usize,
    /// How long a taking-over connection waits for the old one to hand its
    /// session over (default 5 s).
    pub takeover_timeout: Duration,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            connect_timeout: Duration::from_secs(10),
            max_packet_size: 256 * 1024,
            receive_maximum: 100,
            max_topic_aliases: 32,
            session_expiry_max: Duration::from_secs(24 * 3600),
            keepalive_max: 0,
            write_timeout: Duration::from_secs(10),
            read_buffer_size: 4 * 1024,
            max_queued_bytes: 1024 * 1024,
            max_sessions: 10_000,
            takeover_timeout: Duration::from_secs(5),
        }
    }
}

/// The one Authentication Method (MQTT 5 §4.12) the gateway offers: the
/// Authentication Data is a connection token (a JWT).
pub const AUTH_METHOD_JWT: &str = "jwt";

/// Buffers above this are released after a batch, so that one burst does
/// not pin memory for the connection's life.
const KEEP_BUFFER: usize = 64 * 1024;

/// Bytes an idle connection reads inline before it takes a read buffer
/// again (enough for a PINGREQ or a small PUBLISH).
const IDLE_READ: usize = 64;

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A client id for a client that sent none (MQTT 3.1.1 §3.1.3.1, MQTT 5
/// §3.1.3.1.1): unique within this process, and unlikely to collide across
/// restarts.
fn generated_client_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("auto-{:x}-{n:x}", now_ms())
}

fn protocol_error(code: &'static str) {
    metrics::counter!("switchboard_protocol_errors_total", "protocol" => "mqtt", "code" => code).increment(1);
}

/// Validates a topic name for PUBLISH (MQTT 3.1.1 §4.7.3, MQTT 5 §4.7.3,
/// and the gateway's reserved `$` prefix). `$presence/<channel>` is allowed:
/// it is how MQTT clients enter presence.
fn topic_error(topic: &str) -> Option<&'static str> {
    if topic.is_empty() {
        return Some("empty topic");
    }
    if topic.contains(['+', '#']) {
        return Some("wildcard in a topic name");
    }
    if topic.contains('\0') {
        return Some("NUL in a topic name");
    }
    if topic.starts_with('$') && presence_target(topic).is_none() {
        return Some("topics starting with $ are reserved");
    }
    None
}

/// The channel of a `$presence/<channel>` topic.
fn presence_target(topic: &str) -> Option<&str> {
    topic.strip_prefix("$presence/").filter(|c| !c.is_empty() && !c.starts_with('$'))
}

/// Validates a subscription filter (MQTT 3.1.1 §4.7.1, MQTT 5 §4.7.1 and
/// §4.8.2 for `$share/{group}/{filter}`).
fn valid_filter(filter: &str) -> bool {
    let inner = match filter.strip_prefix("$share/") {
        Some(rest) => match rest.split_once('/') {
            Some((group, inner)) if !group.is_empty() && !group.contains(['+', '#']) => inner,
            _ => return false,
        },
        None => filter,
    };
    if inner.is_empty() || inner.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = inner.split('/').collect();
    levels.iter().enumerate().all(|(i, l)| match *l {
        "#" => i == levels.len() - 1,
        "+" => true,
        l => !l.contains(['+', '#']),
    })
}

/// SUBACK code for a core refusal.
fn suback_code(version: Version, code: ErrorCode) -> u8 {
    let r = match code {
        ErrorCode::InvalidFilter | ErrorCode::InvalidChannel => reason::TOPIC_FILTER_INVALID,
        // A reserved `$` filter is refused to everyone: not authorized.
        ErrorCode::PermissionDenied | ErrorCode::Unauthorized | ErrorCode::ReservedChannel => reason::NOT_AUTHORIZED,
        ErrorCode::TooManySubscriptions | ErrorCode::RateLimited => reason::QUOTA_EXCEEDED,
        _ => reason::UNSPECIFIED,
    };
    // 3.1.1 has one failure code (§3.9.3).
    if version == Version::V4 { 0x80 } else { r }
}

/// PUBACK/PUBREC reason for a core refusal.
fn publish_reason(code: ErrorCode) -> u8 {
    match code {
        ErrorCode::InvalidChannel | ErrorCode::ReservedChannel => reason::TOPIC_NAME_INVALID,
        ErrorCode::PermissionDenied | ErrorCode::Unauthorized | ErrorCode::NoIdentity => reason::NOT_AUTHORIZED,
        ErrorCode::RateLimited | ErrorCode::MessageTooLarge => reason::QUOTA_EXCEEDED,
        _ => reason::UNSPECIFIED,
    }
}

/// CONNACK code for a refused `open`: (3.1.1 return code, MQTT 5 reason).
fn connack_refusal(code: ErrorCode) -> (u8, u8) {
    match code {
        ErrorCode::Unauthorized => (4, 0x86),
        ErrorCode::PermissionDenied => (5, reason::NOT_AUTHORIZED),
        ErrorCode::RateLimited => (3, 0x9F),
        ErrorCode::Unavailable => (3, reason::SERVER_UNAVAILABLE),
        _ => (3, reason::UNSPECIFIED),
    }
}

/// DISCONNECT reason for a close decided by the core.
fn close_reason(r: CloseReason) -> u8 {
    if r == CloseReason::SLOW {
        reason::QUOTA_EXCEEDED
    } else if r == CloseReason::SHUTDOWN {
        reason::SHUTTING_DOWN
    } else if r == CloseReason::KICKED {
        reason::ADMINISTRATIVE_ACTION
    } else if r == CloseReason::UNAUTHORIZED {
        reason::NOT_AUTHORIZED
    } else if r == CloseReason::TOKEN_EXPIRED {
        // MQTT 5 §3.14.2.1: 0xA0 Maximum connect time — the connection
        // outlived what the server allows (its token's expiry).
        reason::MAXIMUM_CONNECT_TIME
    } else {
        reason::UNSPECIFIED
    }
}

/// User properties as headers: a repeated key keeps its last value (the
/// envelope's headers are a map).
fn headers_of(props: &[(String, String)]) -> BTreeMap<String, String> {
    props.iter().cloned().collect()
}

/// Counter handles, looked up once per connection.
struct Counters {
    messages_out: Counter,
    bytes_out: Counter,
    bytes_in: Counter,
}

impl Counters {
    fn new() -> Self {
        Counters {
            messages_out: metrics::counter!("switchboard_messages_out_total", "protocol" => "mqtt"),
            bytes_out: metrics::counter!("switchboard_bytes_out_total", "protocol" => "mqtt"),
            bytes_in: metrics::counter!("switchboard_bytes_in_total", "protocol" => "mqtt"),
        }
    }
}

/// An open core session. Dropping it tells the core, so `core.close` runs
/// exactly once however the connection ends.
struct CoreSession {
    handle: SessionHandle,
    core: Arc<dyn Core>,
    end: CloseKind,
}

impl Drop for CoreSession {
    fn drop(&mut self) {
        self.core.close(self.handle.id, self.end);
    }
}

/// Why the session loop stopped, decided once; [`Conn::finish`] acts on it.
#[derive(Debug)]
enum Stop {
    /// The client sent DISCONNECT with this reason.
    ClientDisconnect(u8),
    /// We close: MQTT 5 DISCONNECT with this reason first.
    Disconnect(u8),
    /// Another connection took the session over.
    TakenOver(Handover),
    /// The transport is gone or stuck.
    Gone,
}

/// The byte stream and its buffers.
struct Io<S> {
    stream: S,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// PUBLISHes in `wbuf`, counted in `messages_out` once per write (a
    /// counter update per delivery showed in profiles).
    delivered: u64,
    read_size: usize,
    write_timeout: Duration,
    counters: Counters,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Io<S> {
    /// Reads more bytes; Ok(0) is EOF. Cancel-safe (`read_buf`, `read`).
    ///
    /// An idle connection holds no read buffer: between packets, with
    /// nothing waiting on the socket, the buffer is released and the wait
    /// for the next bytes reads into a few bytes inline in the task. A busy
    /// connection, whose next bytes are already there, keeps its buffer.
    async fn read_more(&mut self) -> std::io::Result<usize> {
        let n = if !self.rbuf.is_empty() || self.rbuf.capacity() > 0 {
            if self.rbuf.capacity() - self.rbuf.len() < self.read_size {
                self.rbuf.reserve(self.read_size);
            }
            match self.stream.read_buf(&mut self.rbuf).now_or_never() {
                Some(r) => Some(r?),
                // Mid-packet: wait with the buffer.
                None if !self.rbuf.is_empty() => Some(self.stream.read_buf(&mut self.rbuf).await?),
                None => {
                    self.rbuf = BytesMut::new();
                    None
                }
            }
        } else {
            None
        };
        let n = match n {
            Some(n) => n,
            None => {
                let mut first = [0u8; IDLE_READ];
                let n = self.stream.read(&mut first).await?;
                self.rbuf.reserve(self.read_size);
                self.rbuf.extend_from_slice(&first[..n]);
                n
            }
        };
        self.counters.bytes_in.increment(n as u64);
        Ok(n)
    }

    /// Writes and flushes the batch buffer once, within the write timeout.
    async fn flush(&mut self) -> Result<(), Stop> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let len = self.wbuf.len();
        if self.delivered > 0 {
            self.counters.messages_out.increment(std::mem::take(&mut self.delivered));
        }
        let write = std::pin::pin!(async {
            self.stream.write_all(&self.wbuf).await?;
            self.stream.flush().await
        });
        let res = crate::deadline::within(self.write_timeout, write).await;
        self.wbuf.clear();
        if self.wbuf.capacity() > KEEP_BUFFER {
            self.wbuf = BytesMut::new();
        }
        match res {
            Ok(Ok(())) => {
                self.counters.bytes_out.increment(len as u64);
                Ok(())
            }
            Ok(Err(e)) => {
                debug!(error = %e, "write failed; dropping connection");
                Err(Stop::Gone)
            }
            Err(_) => {
                debug!(timeout = ?self.write_timeout, "write timed out; dropping connection");
                Err(Stop::Gone)
            }
        }
    }

    async fn shutdown(&mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.stream.shutdown()).await;
    }
}

/// Who is on the other end of an MQTT connection.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    /// Remote address (logs, per-IP limits).
    pub addr: Option<SocketAddr>,
    /// The client id a verified TLS client certificate proves (MQTTS with
    /// mTLS): the connection's client id must be empty or equal to it.
    pub cert_identity: Option<String>,
}

impl Peer {
    /// A peer known by its address only.
    pub fn addr(addr: Option<SocketAddr>) -> Peer {
        Peer { addr, cert_identity: None }
    }
}

/// Runs one MQTT connection to the end. `shutdown` flips to true when the
/// gateway stops (a dropped sender counts as stopping).
///
/// Never panics on network input; every way it ends is in the module's
/// close table.
///
/// Memory: a task is as large as its largest state, so everything before
/// the session runs (the CONNECT, authentication, the session claim) is a
/// boxed future of its own, freed once the session is open. An open, idle
/// connection's task then holds its `Conn` and the wait in the session loop.
pub fn serve<S: AsyncRead + AsyncWrite + Unpin + Send>(
    io: S,
    core: Arc<dyn Core>,
    sessions: Arc<dyn SessionStore>,
    cfg: Arc<MqttConfig>,
    peer: Peer,
    shutdown: watch::Receiver<bool>,
) -> impl Future<Output = ()> + Send {
    let span = tracing::info_span!(
        "mqtt",
        peer = tracing::field::Empty,
        protocol = "mqtt",
        version = tracing::field::Empty,
        client_id = tracing::field::Empty,
    );
    if let Some(addr) = peer.addr {
        span.record("peer", tracing::field::display(addr));
    }
    let io = Io {
        stream: io,
        rbuf: BytesMut::with_capacity(cfg.read_buffer_size),
        wbuf: BytesMut::new(),
        delivered: 0,
        read_size: cfg.read_buffer_size.max(64),
        write_timeout: cfg.write_timeout,
        counters: Counters::new(),
    };
    let opening = Box::pin(open(io, core, sessions, cfg, peer, shutdown, span.clone()));
    async move {
        let Some(mut conn) = opening.await else { return };
        let opened = async {
            conn.resume_and_flush().await?;
            conn.pipelined().await
        };
        let stop = match Box::pin(opened).await {
            Ok(()) => conn.run().await,
            Err(stop) => stop,
        };
        Box::pin(conn.finish(stop)).await;
    }
    .instrument(span)
}

/// Reads the CONNECT and opens the session; `None` when the connection
/// ended instead.
async fn open<S: AsyncRead + AsyncWrite + Unpin + Send>(
    mut io: Io<S>,
    core: Arc<dyn Core>,
    sessions: Arc<dyn SessionStore>,
    cfg: Arc<MqttConfig>,
    peer: Peer,
    mut shutdown: watch::Receiver<bool>,
    span: Span,
) -> Option<Conn<S>> {
    let Some(connect) = read_connect(&mut io, &cfg, &mut shutdown).await else {
        io.shutdown().await;
        return None;
    };
    span.record("version", if connect.version == Version::V5 { "5" } else { "3.1.1" });
    accept(io, *connect, core, sessions, cfg, peer, shutdown, &span).await
}

/// Reads until a CONNECT, within the connect timeout. `None` ends the
/// connection (after writing a refusal where the spec asks for one).
async fn read_connect<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut Io<S>,
    cfg: &MqttConfig,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<Box<codec::Connect>> {
    let deadline = tokio::time::sleep(cfg.connect_timeout);
    tokio::pin!(deadline);
    loop {
        match codec::decode(&mut io.rbuf, None, cfg.max_packet_size) {
            Ok(Some(Packet::Connect(c))) => return Some(c),
            Ok(Some(other)) => {
                // `decode` only yields a CONNECT here; be defensive anyway.
                info!(packet = ?other, "refused: the first packet must be CONNECT");
                protocol_error("not_connect");
                return None;
            }
            Ok(None) => {}
            Err(CodecError::UnsupportedVersion(level)) => {
                info!(level, "refused: unsupported MQTT protocol level");
                protocol_error("unsupported_version");
                codec::refuse_version(&mut io.wbuf);
                let _ = io.flush().await;
                return None;
            }
            Err(e) => {
                info!(error = %e, "refused before CONNECT");
                protocol_error(match e {
                    CodecError::TooLarge { .. } => "too_large",
                    CodecError::NotConnect(_) => "not_connect",
                    _ => "malformed",
                });
                return None;
            }
        }
        tokio::select! {
            biased;
            _ = shutdown.changed() => {
                debug!("shutdown before CONNECT");
                return None;
            }
            () = &mut deadline => {
                info!(timeout = ?cfg.connect_timeout, "refused: no CONNECT in time");
                protocol_error("connect_timeout");
                return None;
            }
            n = io.read_more() => match n {
                Ok(0) | Err(_) => {
                    debug!("peer closed before CONNECT");
                    return None;
                }
                Ok(_) => {}
            },
        }
    }
}

/// Writes a refusing CONNACK and closes.
async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(io: &mut Io<S>, version: Version, code: u8) {
    let _ = codec::encode(version, &Outgoing::ConnAck { session_present: false, code, props: None }, &mut io.wbuf);
    let _ = io.flush().await;
    io.shutdown().await;
}

/// The will, validated and ready to publish.
#[derive(Debug, Clone)]
struct WillMsg {
    publish: proto::Publish,
    delay: u32,
}

/// The decode-and-translate step of an inbound PUBLISH, as one pure
/// function (also the fuzz target's entry point): the topic (already
/// resolved from a topic alias) must be valid UTF-8 and a valid topic name,
/// and the packet becomes the core's publish request.
pub fn translate_publish(topic: &[u8], p: &codec::Publish) -> Result<proto::Publish, &'static str> {
    let topic = std::str::from_utf8(topic).map_err(|_| "topic is not UTF-8")?;
    if let Some(why) = topic_error(topic) {
        return Err(why);
    }
    if p.props.payload_utf8 && std::str::from_utf8(&p.payload).is_err() {
        return Err("payload format indicator says UTF-8, payload is not");
    }
    Ok(publish_request(topic.to_string(), p))
}

fn publish_request(topic: String, p: &codec::Publish) -> proto::Publish {
    let props = &p.props;
    proto::Publish {
        channel: topic,
        payload: p.payload.clone(),
        id: props.user_properties.iter().rev().find(|(k, _)| k == "id").map(|(_, v)| v.clone()).unwrap_or_default(),
        content_type: props.content_type.clone().unwrap_or_default(),
        headers: headers_of(&props.user_properties),
        retain: p.retain,
        qos: Some(u32::from(p.qos)),
        message_expiry: props.message_expiry.unwrap_or(0),
        response_topic: props.response_topic.clone().unwrap_or_default(),
        correlation_data: props.correlation_data.clone().unwrap_or_default(),
        payload_utf8: props.payload_utf8,
    }
}

/// Handles the CONNECT: client id rules, the core session, the session
/// store, CONNACK. `None` when the connection was refused (and closed).
#[allow(clippy::too_many_arguments)]
async fn accept<S: AsyncRead + AsyncWrite + Unpin + Send>(
    mut io: Io<S>,
    c: codec::Connect,
    core: Arc<dyn Core>,
    sessions: Arc<dyn SessionStore>,
    cfg: Arc<MqttConfig>,
    peer: Peer,
    shutdown: watch::Receiver<bool>,
    span: &Span,
) -> Option<Conn<S>> {
    let version = c.version;
    let v5 = version == Version::V5;
    // MQTT 3.1.1 §3.1.3.1: an empty id needs clean session 1 (else 0x02);
    // MQTT 5 §3.1.3.1.1: the server assigns one and says so in CONNACK.
    // A device authenticated by its certificate is that certificate's id.
    let mut assigned = None;
    let client_id = if let Some(id) = &peer.cert_identity {
        if !c.client_id.is_empty() && c.client_id != *id {
            info!(certificate = %id, asked = %c.client_id, "refused: client id differs from the certificate's");
            refuse(&mut io, version, if v5 { reason::CLIENT_ID_INVALID } else { 2 }).await;
            return None;
        }
        if c.client_id.is_empty() && v5 {
            assigned = Some(id.clone());
        }
        id.clone()
    } else if c.client_id.is_empty() {
        if !v5 && !c.clean {
            info!("refused: empty client id with clean session 0");
            refuse(&mut io, version, 2).await;
            return None;
        }
        let id = generated_client_id();
        assigned = Some(id.clone());
        id
    } else {
        c.client_id.clone()
    };
    span.record("client_id", client_id.as_str());

    let will = match &c.will {
        None => None,
        Some(w) => {
            let topic = std::str::from_utf8(&w.topic).ok().filter(|t| topic_error(t).is_none());
            let Some(topic) = topic else {
                info!("refused: invalid will topic");
                protocol_error("topic_invalid");
                refuse(&mut io, version, reason::TOPIC_NAME_INVALID).await;
                return None;
            };
            let p = codec::Publish {
                qos: w.qos,
                retain: w.retain,
                payload: w.payload.clone(),
                props: w.props.clone(),
                ..Default::default()
            };
            Some(Box::new(WillMsg { publish: publish_request(topic.to_string(), &p), delay: w.delay }))
        }
    };

    // The password is the connection token; with the `jwt` Authentication
    // Method (MQTT 5 §4.12, for re-authentication) the Authentication Data
    // is, when present.
    let mut token = c.password.clone().unwrap_or_default();
    let auth_method = match (&c.auth_method, &c.auth_data) {
        (None, None) => None,
        (None, Some(_)) => {
            // MQTT 5 §3.1.2.11.10.
            info!("refused: Authentication Data without an Authentication Method");
            protocol_error("protocol_error");
            refuse(&mut io, version, reason::PROTOCOL_ERROR).await;
            return None;
        }
        (Some(m), data) if m == AUTH_METHOD_JWT => {
            if let Some(d) = data {
                token = String::from_utf8_lossy(d).into_owned();
            }
            Some(m.clone())
        }
        (Some(m), _) => {
            info!(method = %m, "refused: unknown authentication method");
            protocol_error("bad_auth_method");
            refuse(&mut io, version, reason::BAD_AUTHENTICATION_METHOD).await;
            return None;
        }
    };

    let open = OpenSession {
        protocol: proto::Protocol::Mqtt,
        client_id: client_id.clone(),
        token,
        peer: peer.addr,
        cert_identity: peer.cert_identity.clone(),
    };
    let handle = match core.open(open).await {
        Ok(h) => h,
        Err(e) => {
            info!(code = e.code.slug(), error = %e, "refused: the core did not open the session");
            let (v4code, v5code) = connack_refusal(e.code);
            refuse(&mut io, version, if v5 { v5code } else { v4code }).await;
            return None;
        }
    };
    let session = CoreSession { handle, core: Arc::clone(&core), end: CloseKind::Abrupt };
    // The core names the client (with token auth, the token's `sub`). A
    // CONNECT asking for another id is refused: its id keys the persistent
    // session and the takeover below, which belong to that other client.
    let client_id = if session.handle.client_id == client_id {
        client_id
    } else if c.client_id.is_empty() {
        let id = session.handle.client_id.clone();
        if v5 {
            assigned = Some(id.clone());
        }
        span.record("client_id", id.as_str());
        id
    } else {
        info!(asked = %client_id, token = %session.handle.client_id, "refused: the client id is not the token's");
        drop(session);
        refuse(&mut io, version, if v5 { reason::CLIENT_ID_INVALID } else { 2 }).await;
        return None;
    };

    // Authorised: now the client id may displace another connection.
    let now = Instant::now();
    let (ticket, claim) = sessions.claim(&client_id, now);
    let stored = match claim {
        Claim::Fresh => None,
        Claim::Resumed(s) => Some(s),
        Claim::Takeover(rx) => {
            info!("session takeover: closing the previous connection");
            match tokio::time::timeout(cfg.takeover_timeout, rx).await {
                Ok(Ok(s)) => s,
                _ => {
                    warn!("previous connection did not hand its session over in time");
                    None
                }
            }
        }
    };
    // Clean session / clean start discards what was stored (§3.1.2.4).
    let stored = if c.clean { None } else { stored };
    let session_present = stored.is_some();
    let expiry_cap = sessions.expiry_max();
    let session_expiry = if v5 {
        let asked = Duration::from_secs(c.session_expiry.into());
        asked.min(expiry_cap)
    } else if c.clean {
        Duration::ZERO
    } else {
        expiry_cap
    };
    let mut keep_alive = c.keep_alive;
    let mut server_keep_alive = None;
    if v5 && cfg.keepalive_max > 0 && (keep_alive == 0 || keep_alive > cfg.keepalive_max) {
        keep_alive = cfg.keepalive_max;
        server_keep_alive = Some(keep_alive);
    }
    let props = v5.then(|| {
        Box::new(rumqttc::v5::mqttbytes::v5::ConnAckProperties {
            session_expiry_interval: (Duration::from_secs(c.session_expiry.into()) > session_expiry)
                .then_some(session_expiry.as_secs() as u32),
            receive_max: Some(cfg.receive_maximum),
            max_qos: None,
            retain_available: Some(1),
            max_packet_size: Some(u32::try_from(cfg.max_packet_size).unwrap_or(u32::MAX)),
            assigned_client_identifier: assigned.clone(),
            topic_alias_max: Some(cfg.max_topic_aliases),
            reason_string: None,
            user_properties: Vec::new(),
            wildcard_subscription_available: Some(1),
            subscription_identifiers_available: Some(1),
            shared_subscription_available: Some(1),
            server_keep_alive,
            response_information: None,
            server_reference: None,
            // MQTT 5 §4.12: named back only when the client used it.
            authentication_method: auth_method.clone(),
            authentication_data: None,
        })
    });
    let _ = codec::encode(version, &Outgoing::ConnAck { session_present, code: reason::SUCCESS, props }, &mut io.wbuf);
    debug!(session_present, ?session_expiry, keep_alive, "session opened");
    let window = usize::from(c.receive_maximum.unwrap_or(u16::MAX).min(cfg.receive_maximum).max(1));
    let client_max_packet = c.max_packet_size.map_or(usize::MAX, |m| m as usize);
    let (state, disconnected_ms) = match stored {
        Some(s) => (s.state, Some(s.disconnected_ms)),
        None => (SessionState::default(), None),
    };
    Some(Conn {
        io,
        version,
        client_id,
        core,
        sessions,
        session: Some(session),
        ticket,
        state,
        resume_since: disconnected_ms,
        keepalive: Keepalive::new(keep_alive, now),
        timer: Box::pin(tokio::time::sleep_until(now + Duration::from_secs(keep_alive.into()) * 3 / 2)),
        in_aliases: InboundAliases::new(if v5 { cfg.max_topic_aliases } else { 0 }),
        out_aliases: OutboundAliases::new(if v5 { c.topic_alias_max } else { 0 }),
        window,
        client_max_packet,
        will,
        session_expiry,
        v5_expiry_was_zero: v5 && c.session_expiry == 0,
        auth_method,
        entered: HashSet::new(),
        drained: Vec::new(),
        cfg,
        shutdown,
    })
}

/// One accepted connection. Deadlines and buffers live here, not in
/// futures that the `select!` could drop.
struct Conn<S> {
    io: Io<S>,
    version: Version,
    client_id: String,
    core: Arc<dyn Core>,
    sessions: Arc<dyn SessionStore>,
    /// Taken when a delayed will needs the core session to outlive us.
    session: Option<CoreSession>,
    ticket: Ticket,
    state: SessionState,
    /// Set when resuming a stored session: its disconnect time.
    resume_since: Option<u64>,
    keepalive: Keepalive,
    timer: Pin<Box<Sleep>>,
    in_aliases: InboundAliases,
    out_aliases: OutboundAliases,
    /// Outbound QoS 1/2 in flight at most.
    window: usize,
    /// The client's Maximum Packet Size (MQTT 5), else unlimited.
    client_max_packet: usize,
    /// Boxed: most connections have none, and every connection holds this.
    will: Option<Box<WillMsg>>,
    /// Zero: the session ends with the connection.
    session_expiry: Duration,
    /// MQTT 5 §3.14.2.2.2: a DISCONNECT may not raise a zero expiry.
    v5_expiry_was_zero: bool,
    /// The CONNECT's Authentication Method (`jwt`): re-authentication is
    /// allowed only with it (MQTT 5 §4.12).
    auth_method: Option<String>,
    /// Channels whose presence this client entered via `$presence/...`.
    entered: HashSet<String>,
    drained: Vec<Outbound>,
    cfg: Arc<MqttConfig>,
    shutdown: watch::Receiver<bool>,
}

/// What woke the connection task.
enum Event {
    Shutdown,
    Kick(Result<Handover, oneshot::error::RecvError>),
    Timer,
    Read(std::io::Result<usize>),
    Outbox,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Conn<S> {
    fn v5(&self) -> bool {
        self.version == Version::V5
    }

    fn handle_id(&self) -> u64 {
        self.session.as_ref().map_or(0, |s| s.handle.id)
    }

    fn push(&mut self, p: Outgoing) {
        if let Err(e) = codec::encode(self.version, &p, &mut self.io.wbuf) {
            warn!(error = %e, packet = ?p, "could not encode a packet");
        }
    }

    /// Tells the store what changed in a persistent session, before the
    /// packets that acknowledge the change are written.
    fn checkpoint(&mut self) {
        if !self.session_expiry.is_zero() && self.state.take_changed() {
            self.sessions.checkpoint(&self.client_id, self.ticket.conn, &self.state, self.session_expiry);
        }
    }

    /// After CONNACK: resend inflight (DUP), re-subscribe a resumed session
    /// from its positions, then flush.
    async fn resume_and_flush(&mut self) -> Result<(), Stop> {
        if let Some(since) = self.resume_since {
            for t in self.state.resend() {
                self.write_transmit(t);
            }
            let subs = self.state.subs.clone();
            for sub in subs {
                let req = proto::Subscribe {
                    filter: sub.filter.clone(),
                    positions: self.state.positions_for(&sub.filter),
                    rewind: None,
                    presence: false,
                    retained: false,
                    no_local: sub.no_local,
                    // Channels first published while the client was away.
                    since_ms: since.max(1),
                    ..Default::default()
                };
                match self.core.subscribe(self.handle_id(), req).await {
                    Ok(outcome) => {
                        for item in outcome.replay {
                            self.queue(item, false)?;
                        }
                    }
                    Err(e) => warn!(filter = %sub.filter, error = %e, "could not restore a subscription"),
                }
            }
        }
        self.checkpoint();
        self.write_batch().await
    }

    async fn run(&mut self) -> Stop {
        loop {
            let outbox = self.session.as_ref().map(|s| Arc::clone(&s.handle.outbox));
            let event = tokio::select! {
                biased;
                changed = self.shutdown.changed() => match changed {
                    Ok(()) if !*self.shutdown.borrow_and_update() => continue,
                    _ => Event::Shutdown,
                },
                kick = &mut self.ticket.kick => Event::Kick(kick),
                () = &mut self.timer, if self.keepalive.deadline().is_some() => Event::Timer,
                n = self.io.read_more() => Event::Read(n),
                () = async { match &outbox { Some(o) => o.ready().await, None => std::future::pending().await } } => Event::Outbox,
            };
            let handled = match event {
                Event::Shutdown => {
                    debug!("gateway shutting down");
                    Err(Stop::Disconnect(reason::SHUTTING_DOWN))
                }
                Event::Kick(Ok(handover)) => {
                    info!("session taken over by a new connection");
                    Err(Stop::TakenOver(handover))
                }
                Event::Kick(Err(_)) => {
                    // The store dropped our slot without a handover: only a
                    // takeover does that, so the session is someone else's.
                    Err(Stop::Disconnect(reason::SESSION_TAKEN_OVER))
                }
                Event::Timer => self.on_timer(),
                Event::Read(Ok(0)) => {
                    debug!("peer closed the connection");
                    Err(Stop::Gone)
                }
                Event::Read(Err(e)) => {
                    debug!(error = %e, "read failed");
                    Err(Stop::Gone)
                }
                // Boxed: packet handling is the loop's largest state, and an
                // idle connection waits in the select above, not here.
                Event::Read(Ok(_)) => Box::pin(self.on_bytes()).await,
                Event::Outbox => Ok(()),
            };
            if let Err(stop) = handled {
                return stop;
            }
            self.checkpoint();
            if let Err(stop) = self.write_batch().await {
                return stop;
            }
        }
    }

    /// Packets the client sent right behind its CONNECT (a SUBSCRIBE
    /// pipelined without waiting for the CONNACK) arrived with it: handle
    /// them now rather than at the next read.
    async fn pipelined(&mut self) -> Result<(), Stop> {
        if self.io.rbuf.is_empty() {
            return Ok(());
        }
        self.on_bytes().await?;
        self.checkpoint();
        self.write_batch().await
    }

    fn on_timer(&mut self) -> Result<(), Stop> {
        let now = Instant::now();
        if self.keepalive.expired(now) {
            info!("keep alive timeout");
            protocol_error("keepalive_timeout");
            return Err(Stop::Disconnect(reason::KEEP_ALIVE_TIMEOUT));
        }
        // Re-armed from the last packet only when it fires, so a busy
        // connection costs no timer resets.
        if let Some(d) = self.keepalive.deadline() {
            self.timer.as_mut().reset(d);
        }
        Ok(())
    }

    /// Decodes and handles every complete packet in the read buffer.
    async fn on_bytes(&mut self) -> Result<(), Stop> {
        self.keepalive.handle_packet(Instant::now());
        loop {
            let packet = match codec::decode(&mut self.io.rbuf, Some(self.version), self.cfg.max_packet_size) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(CodecError::TooLarge { size, max }) => {
                    info!(size, max, "packet too large");
                    protocol_error("too_large");
                    return Err(Stop::Disconnect(reason::PACKET_TOO_LARGE));
                }
                Err(e) => {
                    info!(error = %e, "malformed packet");
                    protocol_error("malformed");
                    return Err(Stop::Disconnect(reason::MALFORMED));
                }
            };
            self.on_packet(packet).await?;
        }
        if self.io.rbuf.is_empty() && self.io.rbuf.capacity() > KEEP_BUFFER {
            self.io.rbuf = BytesMut::with_capacity(self.cfg.read_buffer_size);
        }
        Ok(())
    }

    async fn on_packet(&mut self, packet: Packet) -> Result<(), Stop> {
        match packet {
            Packet::Publish(p) => self.on_publish(p).await,
            Packet::PubAck { pkid } => {
                if !self.state.handle_puback(pkid) {
                    debug!(pkid, "PUBACK for an unknown packet id");
                }
                Ok(())
            }
            Packet::PubRec { pkid, failed } => {
                if self.state.handle_pubrec(pkid, failed) {
                    self.push(Outgoing::PubRel(pkid));
                }
                Ok(())
            }
            Packet::PubRel { pkid } => {
                if !self.state.handle_pubrel(pkid) {
                    debug!(pkid, "PUBREL for an unknown packet id");
                }
                self.push(Outgoing::PubComp(pkid));
                Ok(())
            }
            Packet::PubComp { pkid } => {
                if !self.state.handle_pubcomp(pkid) {
                    debug!(pkid, "PUBCOMP for an unknown packet id");
                }
                Ok(())
            }
            Packet::Subscribe(s) => self.on_subscribe(s).await,
            Packet::Unsubscribe { pkid, filters } => {
                let mut reasons = Vec::with_capacity(filters.len());
                for f in filters {
                    let had = self.state.unsubscribe(&f);
                    if let Err(e) = self.core.unsubscribe(self.handle_id(), &f).await {
                        debug!(filter = %f, error = %e, "core unsubscribe refused");
                    }
                    reasons.push(if had { reason::SUCCESS } else { reason::NO_SUBSCRIPTION_EXISTED });
                }
                self.push(Outgoing::UnsubAck(pkid, reasons));
                Ok(())
            }
            Packet::PingReq => {
                self.push(Outgoing::PingResp);
                Ok(())
            }
            Packet::Disconnect { reason: r, session_expiry } => {
                if let Some(secs) = session_expiry {
                    if self.v5_expiry_was_zero && secs > 0 {
                        info!("DISCONNECT raised a zero session expiry");
                        protocol_error("protocol_error");
                        return Err(Stop::Disconnect(reason::PROTOCOL_ERROR));
                    }
                    self.session_expiry = Duration::from_secs(secs.into()).min(self.sessions.expiry_max());
                }
                debug!(reason = r, "client DISCONNECT");
                Err(Stop::ClientDisconnect(r))
            }
            Packet::Auth(a) => self.on_auth(a).await,
            Packet::Connect(_) | Packet::Unexpected(_) => {
                info!(packet = ?packet, "protocol error: unexpected packet");
                protocol_error("protocol_error");
                Err(Stop::Disconnect(reason::PROTOCOL_ERROR))
            }
        }
    }

    /// AUTH: re-authentication with a new token (see the module docs).
    async fn on_auth(&mut self, a: codec::Auth) -> Result<(), Stop> {
        let protocol_violation = |why: &str| {
            info!(why, "protocol error in AUTH");
            protocol_error("protocol_error");
            Err(Stop::Disconnect(reason::PROTOCOL_ERROR))
        };
        let Some(method) = self.auth_method.clone() else {
            return protocol_violation("AUTH after a CONNECT without an Authentication Method");
        };
        if a.reason != reason::REAUTHENTICATE {
            // 0x00 is the server's answer; 0x18 continues an exchange the
            // server started, and this server never starts one.
            return protocol_violation("AUTH reason other than re-authenticate");
        }
        let Some(asked) = a.method else {
            return protocol_violation("AUTH without an Authentication Method");
        };
        if asked != method {
            // MQTT 5 §4.12.1-1: the same method as at CONNECT.
            info!(method = %asked, "re-authentication with another method");
            protocol_error("bad_auth_method");
            return Err(Stop::Disconnect(reason::BAD_AUTHENTICATION_METHOD));
        }
        let token = a.data.map(|d| String::from_utf8_lossy(&d).into_owned()).unwrap_or_default();
        match self.core.refresh(self.handle_id(), &token).await {
            Ok(()) => {
                debug!("re-authenticated");
                self.push(Outgoing::Auth { reason: reason::SUCCESS, method });
                Ok(())
            }
            Err(e) => {
                // MQTT 5 §4.12.1-2: a failed re-authentication ends the
                // connection.
                info!(code = e.code.slug(), error = %e, "re-authentication refused");
                Err(Stop::Disconnect(reason::NOT_AUTHORIZED))
            }
        }
    }

    /// Refuses a bad PUBLISH topic: DISCONNECT 0x90 (3.1.1: close).
    fn bad_topic(&self, why: &str) -> Stop {
        info!(why, "invalid PUBLISH topic");
        protocol_error("topic_invalid");
        Stop::Disconnect(reason::TOPIC_NAME_INVALID)
    }

    fn ack(&mut self, qos: u8, pkid: u16, code: u8) {
        match qos {
            1 => self.push(Outgoing::PubAck(pkid, code)),
            2 => self.push(Outgoing::PubRec(pkid, code)),
            _ => {}
        }
    }

    async fn on_publish(&mut self, p: codec::Publish) -> Result<(), Stop> {
        let Ok(topic) = std::str::from_utf8(&p.topic) else {
            return Err(self.bad_topic("topic is not UTF-8"));
        };
        let topic = match self.in_aliases.resolve(topic, p.props.topic_alias) {
            Ok(t) => t,
            Err(e) => {
                info!(error = %e, "invalid topic alias");
                protocol_error("alias_invalid");
                return Err(Stop::Disconnect(reason::TOPIC_ALIAS_INVALID));
            }
        };
        if let Some(why) = topic_error(&topic) {
            return Err(self.bad_topic(why));
        }
        if p.qos == 2 {
            if !self.state.handle_inbound_qos2(p.pkid) {
                // A retransmission before PUBREL: acknowledge, do not publish.
                debug!(pkid = p.pkid, "duplicate QoS 2 PUBLISH");
                self.push(Outgoing::PubRec(p.pkid, reason::SUCCESS));
                return Ok(());
            }
            if self.state.inbound_qos2_len() > usize::from(self.cfg.receive_maximum) {
                info!(max = self.cfg.receive_maximum, "receive maximum exceeded");
                protocol_error("receive_maximum");
                return Err(Stop::Disconnect(reason::RECEIVE_MAXIMUM_EXCEEDED));
            }
        }
        let result = if p.props.payload_utf8 && std::str::from_utf8(&p.payload).is_err() {
            // MQTT 5 §3.3.2.3.2: the indicator promises UTF-8.
            Err(reason::PAYLOAD_FORMAT_INVALID)
        } else if let Some(channel) = presence_target(&topic) {
            self.presence(channel.to_string(), p.payload.clone()).await.map_err(|e| publish_reason(e.code))
        } else {
            let req = publish_request(topic, &p);
            match self.core.publish(self.handle_id(), req).await {
                Ok(_) => Ok(()),
                Err(e) => {
                    debug!(code = e.code.slug(), error = %e, "publish refused");
                    Err(publish_reason(e.code))
                }
            }
        };
        match result {
            Ok(()) => self.ack(p.qos, p.pkid, reason::SUCCESS),
            Err(code) => {
                if p.qos == 2 {
                    self.state.forget_inbound_qos2(p.pkid);
                }
                if !self.v5() {
                    // MQTT 3.1.1 has no negative ack: closing is the only
                    // way to tell the client (§3.3.5).
                    info!(code, "publish refused; closing (3.1.1 has no negative ack)");
                    return Err(Stop::Disconnect(code));
                }
                if p.qos == 0 {
                    info!(code, "QoS 0 publish refused; dropped");
                }
                self.ack(p.qos, p.pkid, code);
            }
        }
        Ok(())
    }

    /// `$presence/<channel>`: a payload enters (or updates), empty leaves.
    async fn presence(&mut self, channel: String, data: Bytes) -> Result<(), CoreError> {
        let id = self.handle_id();
        if data.is_empty() {
            self.entered.remove(&channel);
            return self.core.presence_leave(id, &channel).await;
        }
        let update = self.entered.contains(&channel);
        self.core.presence_enter(id, &channel, data, update).await?;
        self.entered.insert(channel);
        Ok(())
    }

    async fn on_subscribe(&mut self, s: codec::Subscribe) -> Result<(), Stop> {
        let rewind = s.user_properties.iter().rev().find(|(k, _)| k == "rewind").map(|(_, v)| v.clone());
        let rewind = match rewind.map(|v| crate::stream::parse_rewind(&v)) {
            Some(Ok(r)) => Some(r),
            Some(Err(e)) => {
                debug!(error = %e, "ignoring an invalid rewind property");
                None
            }
            None => None,
        };
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut replays = Vec::new();
        for f in s.filters {
            if !valid_filter(&f.filter) || (f.no_local && f.filter.starts_with("$share/")) {
                // MQTT 5 §3.8.3.1: no local on a shared subscription is a
                // protocol error; answering 0x8F is kinder and still clear.
                info!(filter = %f.filter, "invalid topic filter");
                protocol_error("topic_invalid");
                codes.push(if self.v5() { reason::TOPIC_FILTER_INVALID } else { 0x80 });
                continue;
            }
            let shared = f.filter.starts_with("$share/");
            let is_new = !self.state.subs.iter().any(|x| x.filter == f.filter);
            let retained = !shared
                && match f.retain_handling {
                    0 => true,
                    1 => is_new,
                    _ => false,
                };
            let req = proto::Subscribe {
                filter: f.filter.clone(),
                positions: Default::default(),
                rewind,
                presence: false,
                retained,
                no_local: f.no_local,
                since_ms: 0,
                ..Default::default()
            };
            match self.core.subscribe(self.handle_id(), req).await {
                Ok(outcome) => {
                    let qos = f.qos.min(2);
                    self.state.subscribe(Subscription {
                        filter: f.filter,
                        qos,
                        no_local: f.no_local,
                        retain_as_published: f.retain_as_published,
                        id: s.id,
                    });
                    codes.push(qos);
                    replays.push((outcome.replay, retained));
                }
                Err(e) => {
                    info!(filter = %f.filter, code = e.code.slug(), error = %e, "subscribe refused");
                    codes.push(suback_code(self.version, e.code));
                }
            }
        }
        // SUBACK first, then the replay (retained values, rewind), then live.
        self.push(Outgoing::SubAck(s.pkid, codes));
        for (items, retained) in replays {
            for item in items {
                self.queue(item, retained)?;
            }
        }
        Ok(())
    }

    /// Queues one outbox or replay item for this client. `retained_replay`
    /// marks a subscribe replay that asked for retained values: its retained
    /// envelope goes out with RETAIN=1 (MQTT 3.1.1 §3.3.1.3).
    fn queue(&mut self, item: Outbound, retained_replay: bool) -> Result<(), Stop> {
        let d = match item {
            Outbound::Gap(g) => {
                // MQTT has no way to say "you missed messages": log it and
                // carry on from where the channel is now.
                info!(channel = %g.channel, reason = %g.reason, "history gap; MQTT cannot signal it to the client");
                if let Some(to) = g.to {
                    self.state.advance(&g.channel, &to.epoch, to.serial);
                }
                return Ok(());
            }
            Outbound::Message(d) => d,
        };
        let env = &d.envelope;
        let Some(route) = session::route(&self.state.subs, &env.channel) else {
            debug!(channel = %env.channel, "delivery matches no subscription (unsubscribed)");
            return Ok(());
        };
        let is_retained_value = retained_replay && env.retain;
        if !is_retained_value && self.state.is_duplicate(env) {
            return Ok(());
        }
        let qos = session::effective_qos(env.qos, route.qos);
        let retain = is_retained_value || (route.retain_as_published && env.retain);
        let delivery = if env.kind != proto::Kind::Message as i32 { presence_delivery(&d) } else { d };
        let msg = Queued { delivery, qos, retain, sub_ids: route.ids };
        if let Err(e) = self.state.handle_delivery(msg, self.cfg.max_queued_bytes) {
            info!(error = %e, "slow consumer: outbound queue full");
            return Err(Stop::Disconnect(reason::QUOTA_EXCEEDED));
        }
        Ok(())
    }

    /// Builds the PUBLISH for a queued message.
    fn build_publish(&mut self, pkid: u16, dup: bool, msg: &Queued, now_ms: u64, assign_alias: bool) -> codec::Publish {
        let env = &msg.delivery.envelope;
        let mut props = codec::PublishProps::default();
        let mut topic = msg.delivery.channel_bytes().clone();
        if self.v5() {
            props.payload_utf8 = env.payload_utf8;
            if env.message_expiry > 0 {
                let elapsed = now_ms.saturating_sub(env.timestamp.max(0) as u64) / 1000;
                props.message_expiry = Some(env.message_expiry.saturating_sub(elapsed as u32).max(1));
            }
            props.response_topic = (!env.response_topic.is_empty()).then(|| env.response_topic.clone());
            props.correlation_data = (!env.correlation_data.is_empty()).then(|| env.correlation_data.clone());
            props.content_type = (!env.content_type.is_empty()).then(|| env.content_type.clone());
            props.user_properties = env.headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            props.subscription_ids = msg.sub_ids.clone();
            if assign_alias {
                match self.out_aliases.assign(&env.channel) {
                    AliasUse::None => {}
                    AliasUse::New(a) => props.topic_alias = Some(a),
                    AliasUse::Existing(a) => {
                        props.topic_alias = Some(a);
                        topic = Bytes::new();
                    }
                }
            }
        }
        codec::Publish { dup, qos: msg.qos, retain: msg.retain, topic, pkid, payload: env.payload.clone(), props }
    }

    fn write_transmit(&mut self, t: Transmit) {
        match t {
            Transmit::PubRel(pkid) => self.push(Outgoing::PubRel(pkid)),
            Transmit::Publish { pkid, dup, msg } => {
                let p = self.build_publish(pkid, dup, &msg, now_ms(), true);
                self.push(Outgoing::Publish(p));
                self.io.delivered += 1;
            }
        }
    }

    /// Drains the outbox, moves what the window allows into PUBLISH packets
    /// after the pending acks, and writes everything once.
    async fn write_batch(&mut self) -> Result<(), Stop> {
        let closed = match &self.session {
            Some(s) => s.handle.outbox.drain(&mut self.drained).err(),
            None => None,
        };
        let drained = std::mem::take(&mut self.drained);
        let mut result = Ok(());
        let mut items = drained.into_iter();
        for item in items.by_ref() {
            if let Err(stop) = self.queue(item, false) {
                result = Err(stop);
                break;
            }
        }
        let mut reuse: Vec<Outbound> = items.collect();
        reuse.clear();
        self.drained = reuse;
        if self.drained.capacity() > 64 {
            self.drained.shrink_to(64);
        }
        result?;
        let now = now_ms();
        let version = self.version;
        let max = self.client_max_packet;
        let transmits = self.state.poll_transmit(self.window, |q| {
            let env = &q.delivery.envelope;
            if env.message_expiry > 0 && now >= (env.timestamp.max(0) as u64) + u64::from(env.message_expiry) * 1000 {
                debug!(channel = %env.channel, serial = env.serial, "message expired before delivery");
                return false;
            }
            if max != usize::MAX {
                let probe = codec::Publish {
                    qos: q.qos,
                    retain: q.retain,
                    topic: q.delivery.channel_bytes().clone(),
                    pkid: 1,
                    payload: env.payload.clone(),
                    ..Default::default()
                };
                // Properties add a little; headers are counted generously.
                let extra: usize = env.headers.iter().map(|(k, v)| k.len() + v.len() + 5).sum::<usize>()
                    + env.content_type.len()
                    + env.response_topic.len()
                    + env.correlation_data.len()
                    + 32;
                if codec::publish_size(version, &probe) + extra > max {
                    debug!(channel = %env.channel, max, "message larger than the client's maximum packet size; skipped");
                    return false;
                }
            }
            true
        });
        for t in transmits {
            self.write_transmit(t);
        }
        self.io.flush().await?;
        match closed {
            Some(r) => {
                info!(code = r.code, reason = r.reason, "the core closed the session");
                Err(Stop::Disconnect(close_reason(r)))
            }
            None => Ok(()),
        }
    }

    /// Ends the connection: DISCONNECT (MQTT 5), the will, the session store.
    async fn finish(mut self, stop: Stop) {
        let (end, handover) = match stop {
            Stop::ClientDisconnect(r) => {
                if let Some(s) = &mut self.session {
                    s.end = CloseKind::Clean;
                }
                let end =
                    if r == reason::DISCONNECT_WITH_WILL { End::DisconnectWithWill } else { End::CleanDisconnect };
                (end, None)
            }
            Stop::Disconnect(r) => {
                if self.v5() {
                    self.push(Outgoing::Disconnect(r));
                }
                let _ = self.io.flush().await;
                (End::Abrupt, None)
            }
            Stop::TakenOver(h) => {
                if self.v5() {
                    self.push(Outgoing::Disconnect(reason::SESSION_TAKEN_OVER));
                }
                let _ = self.io.flush().await;
                (End::TakenOver, Some(h))
            }
            Stop::Gone => (End::Abrupt, None),
        };
        self.io.shutdown().await;
        self.publish_will(end).await;

        let now = Instant::now();
        let persistent = !self.session_expiry.is_zero();
        let stored = persistent.then(|| {
            let mut state = std::mem::take(&mut self.state);
            state.detach();
            Box::new(StoredSession { state, disconnected_ms: now_ms() })
        });
        match handover {
            Some(h) => {
                let _ = h.send(stored);
            }
            None => self.sessions.release(&self.client_id, self.ticket.conn, stored, self.session_expiry, now),
        }
        debug!(?end, persistent, "connection ended");
        // `self.session` (if still here) drops: core.close(.., clean or abrupt).
    }

    async fn publish_will(&mut self, end: End) {
        let Some(will) = self.will.take().map(|w| *w) else { return };
        let expiry = self.session_expiry.as_secs().min(u64::from(u32::MAX)) as u32;
        match session::will_action(end, will.delay, expiry) {
            session::WillAction::Discard => debug!("will discarded"),
            session::WillAction::Publish => {
                let id = self.handle_id();
                match self.core.publish(id, will.publish).await {
                    Ok(_) => debug!("will published"),
                    Err(e) => info!(error = %e, "will refused by the core"),
                }
            }
            session::WillAction::After(delay) => {
                // The core session stays open until the will is decided: it
                // is the publisher.
                let Some(session) = self.session.take() else { return };
                let token = self.sessions.delay_will(&self.client_id);
                let sessions = Arc::clone(&self.sessions);
                let client_id = self.client_id.clone();
                debug!(?delay, "will delayed");
                tokio::spawn(
                    async move {
                        tokio::time::sleep(delay).await;
                        if sessions.take_will(&client_id, token) {
                            match session.core.publish(session.handle.id, will.publish).await {
                                Ok(_) => debug!("delayed will published"),
                                Err(e) => info!(error = %e, "delayed will refused by the core"),
                            }
                        } else {
                            debug!("delayed will cancelled by a reconnect");
                        }
                        drop(session);
                    }
                    .in_current_span(),
                );
            }
        }
    }
}

/// Presence events on `$presence/...` as JSON for MQTT subscribers.
#[derive(serde::Serialize)]
struct PresenceJson<'a> {
    action: &'static str,
    client_id: &'a str,
    connection_id: &'a str,
    timestamp: i64,
    #[serde(flatten)]
    payload: proto::json::JsonPayload<'a>,
}

/// A presence envelope re-encoded with a JSON payload (the data itself is
/// inlined as `data`, `text` or `data_b64`).
fn presence_delivery(d: &Arc<Delivery>) -> Arc<Delivery> {
    let env = &d.envelope;
    let action = match proto::Kind::try_from(env.kind) {
        Ok(proto::Kind::PresenceEnter) => "enter",
        Ok(proto::Kind::PresenceLeave) => "leave",
        Ok(proto::Kind::PresenceUpdate) => "update",
        _ => return Arc::clone(d),
    };
    let publisher = env.publisher.clone().unwrap_or_default();
    let json = PresenceJson {
        action,
        client_id: &publisher.client_id,
        connection_id: &publisher.connection_id,
        timestamp: env.timestamp,
        payload: proto::json::JsonPayload::new(&env.payload),
    };
    let payload = serde_json::to_vec(&json).unwrap_or_default();
    Delivery::new(proto::Envelope {
        payload: Bytes::from(payload),
        content_type: "application/json".into(),
        payload_utf8: true,
        ..env.clone()
    })
}

#[cfg(test)]
mod tests;
