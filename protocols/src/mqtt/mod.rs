//! MQTT 3.1.1 and 5.0 front end (TCP, TLS and WebSocket `/mqtt`).
//!
//! The gateway accepts a connection and hands the byte stream to [`serve`]
//! (or a WebSocket to [`serve_ws`]). From there this module owns it: it
//! reads the CONNECT, detects the protocol level from it (4 = 3.1.1, 5 =
//! 5.0), opens a core session, and translates packets to and from the
//! [`Core`]. An MQTT topic is the channel name verbatim (`$` topics such as
//! `$aws/things/1` included; only the first levels `$SYS`, `$share` and
//! `$presence` are the gateway's); a subscription filter is passed to the
//! core as is (wildcards, `$share/{group}/{filter}`, `$presence/<channel>`).
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
//! Where things are:
//!
//! | module | holds |
//! |---|---|
//! | this one | configuration, the entry points [`serve`] / [`serve_ws`] |
//! | `connect` | the CONNECT: timeout, protocol level, auth through the core, client id rules, session claim, CONNACK |
//! | `conn` | an open connection's state and its one `select!` loop; how it ends (session stored or handed over, wills) |
//! | `conn::inbound` | packets from the client, each a core call or a session-state change |
//! | `conn::outbound` | deliveries: queue, inflight window, PUBLISH encoding, one write per batch |
//! | `io` | the byte stream: idle read buffers released, bounded writes |
//! | `rules` | pure rules: topic and filter checks, PUBLISH → publish request, reason-code tables |
//! | [`session`] | the pure protocol state: packet ids, inflight QoS 1/2, inbound QoS 2 ids, topic aliases, keepalive, will decisions |
//! | [`store`] | the port to the core's persistent-session store ([`SessionStore`]) |
//! | [`codec`] | the wire codec (rumqttc's `mqttbytes` v4/v5) |
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
//! A `Gap` from the core (history could not fill a resume) reaches an MQTT
//! 5 client as the user property [`GAP_PROPERTY`] (`switchboard-gap`, value
//! the reason) on the first message of that channel sent after it — for an
//! `epoch_changed` gap that is the new epoch's oldest message history holds,
//! since the replay continues from there. A gap not yet told survives a
//! reconnect of a persistent session. MQTT 3.1.1 cannot express it: it is
//! logged at `info` and delivery continues after it.
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
//! | PUBLISH topic with a wildcard, a NUL, invalid UTF-8, empty, or under a reserved first level (`$SYS`, `$share`, `$presence` other than `$presence/<channel>`) | DISCONNECT 0x90 | close | published |
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
//! | SUBACK | 0x87 (3.1.1: 0x80) | `permission_denied` / `unauthorized` / `reserved_channel` (a `$SYS` filter, or `$share`/`$presence` not as `$share/{group}/...`, `$presence/...`) |
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
//! remaining interval. A message whose PUBLISH — exactly as it would be
//! encoded, properties, topic alias and packet id included — is larger than
//! the client's Maximum Packet Size is discarded (MQTT 5 §3.1.2.11.4; when
//! only a new topic alias makes it too large, it goes without the alias),
//! with a debug log; the channel's next message sent carries
//! [`GAP_PROPERTY`] `too_large`. A packet of exactly the maximum is sent.
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
mod conn;
mod connect;
mod io;
mod rules;
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

use crate::arrival::ArrivalClock;
use crate::port::{CloseKind, CloseReason, Core, CoreError, Delivery, OpenSession, Outbound, SessionHandle};
use codec::{CodecError, Outgoing, Packet, Version, reason};
use session::{
    AliasUse, End, InboundAliases, Keepalive, OutboundAliases, Queued, SessionState, Subscription, Transmit,
};
pub use store::{Claim, DelayedWill, Handover, SessionStore, StoredSession, Ticket};
pub use ws::serve_ws;

use conn::*;
use connect::*;
use io::*;
pub use rules::translate_publish;
use rules::*;

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

/// MQTT 5 user property on the first message a client receives on a channel
/// after a gap: history could not fill a resume (`trimmed`, `epoch_changed`),
/// or a message was discarded as larger than the client's Maximum Packet
/// Size (`too_large`). Its value is that reason. A publisher's header of this
/// name is not passed on to MQTT clients, so the property is always the
/// gateway's.
pub const GAP_PROPERTY: &str = "switchboard-gap";

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

#[cfg(test)]
mod tests;
