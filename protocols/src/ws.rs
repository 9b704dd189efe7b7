//! WebSocket front end: `/v1/ws` and the conformance echo route.
//!
//! The gateway's HTTP layer does the upgrade (with hyper), picks the codec
//! with [`negotiate`] from `Sec-WebSocket-Protocol`, wraps the upgraded I/O
//! in a [`WebSocketStream`] configured by [`websocket_config`], and hands it
//! to [`serve`]. From there this module owns the connection: it decodes
//! client frames, asks the [`Core`] for everything that needs a decision, and
//! writes the replies and the session's [`Outbox`] deliveries back.
//!
//! One task per connection runs one `select!` over the next WebSocket
//! message, the outbox, the shutdown signal and a timer (handshake deadline,
//! then idle pings). After every event it drains the outbox, feeds every
//! reply and delivery into the sink and flushes once, under
//! [`WsConfig::write_timeout`]: one write per batch, not one per message.
//! Deliveries use the encodings cached in [`Delivery`](crate::port::Delivery),
//! so a publication is encoded once per wire format, not once per subscriber.
//!
//! It deliberately does not: perform the HTTP upgrade or write the
//! `Sec-WebSocket-Protocol` response header (the gateway does, echoing
//! [`Codec::subprotocol`] when [`negotiate`] returned `Some`); authorise,
//! route, validate channel names or store anything (the core does); read
//! WebSocket frames off the socket (the gateway puts the upgraded I/O in a
//! [`FrameLayer`](crate::ws_frames::FrameLayer) first: permessage-deflate
//! when negotiated, and UTF-8 checked as text arrives, so that an invalid
//! byte ends the connection without waiting for the rest of its message);
//! or check tokens (the core verifies them, on connect and refresh).
//!
//! # Extensions
//!
//! permessage-deflate (RFC 7692) when the client offers it and
//! [`WsConfig::deflate`] allows, negotiated by
//! [`ws_frames::negotiate`](crate::ws_frames::negotiate): the server answers
//! `server_no_context_takeover` unless context takeover is configured, and
//! compresses replies and deliveries of at least
//! [`DeflateConfig::min_size`] bytes. Whether a message travelled
//! compressed is invisible here.
//!
//! # Codecs
//!
//! | subprotocol | codec | one WebSocket message carries |
//! |---|---|---|
//! | `switchboard.v1.json` (or none offered) | [`Codec::Json`] | one JSON frame, as a text message |
//! | `switchboard.v1.proto` | [`Codec::Proto`] | one protobuf `ClientFrame` / `ServerFrame`, as a binary message |
//!
//! # Session start
//!
//! The first client frame must be `connect`; the reply is `connected` with
//! the same `req`. If the upgrade request carried `?token=` or `?client_id=`,
//! the session opens at once from those and `connected` is pushed with
//! `req` 0 (a later `connect` then gets `already_connected`).
//!
//! # Close codes
//!
//! Server-initiated closes for a session reason are preceded by a
//! `disconnect` frame (`code`, `reason`, `reconnect`) in the connection's
//! codec; WebSocket-level violations get only the close frame. `core.close`
//! is called exactly once per opened session: `clean` when the client sent a
//! close frame, `abrupt` for every other end.
//!
//! | code | reason | when | frames before the close | reconnect | `core.close` |
//! |---|---|---|---|---|---|
//! | client's code | client's reason | the client sent a close frame (echoed back) | — | — | `clean` |
//! | 1012 | `server shutting down` | the node is draining (shutdown signal, or its sender dropped) | `disconnect` | yes | `abrupt` |
//! | 1002 | `protocol error` | WebSocket framing violation (bad opcode, reserved bits, RSV1 without permessage-deflate or on a continuation or control frame, unmasked or fragmented control frame, ...) | — | — | `abrupt` |
//! | 1003 | `binary messages need switchboard.v1.proto` / `text messages need switchboard.v1.json` | a data message of the wrong kind for the negotiated codec | — | — | `abrupt` |
//! | 1007 | `invalid UTF-8` | a text message that is not valid UTF-8, as soon as the first invalid byte arrives (compressed or not, in any fragment, before the rest of its frame) | — | — | `abrupt` |
//! | 1007 | `invalid compressed data` | a compressed message that does not inflate | — | — | `abrupt` |
//! | 1008 | the error code's name, e.g. `permission_denied` | the core refused to open the session with any code but `unauthorized` | `error` (with `req`), `disconnect` | yes for `unavailable`, `rate_limited`, `internal`; else no | — |
//! | 1009 | `message too large` | a message or frame above [`WsConfig::max_frame_size`]; for a compressed message, its inflated size, counted while inflating | — | — | `abrupt` |
//! | 4000 | `slow consumer` | the session's outbox overflowed (`disconnect` policy) | `disconnect` | yes | `abrupt` |
//! | 4001 | `unauthorized` | the core refused to open the session with `unauthorized` | `error` (with `req`), `disconnect` | no | — |
//! | 4002 | `connect expected` | the first frame was not a valid `connect` (`error` `not_connected`, `bad_frame` or `unknown_frame`), or none arrived within [`WsConfig::handshake_timeout`] | `error` (if a frame came), `disconnect` | no | — |
//! | 4003 | `disconnected by server` | an administrator kicked the session | `disconnect` | no | `abrupt` |
//! | 4004 | `ping timeout` | nothing arrived from the peer for 2 × [`WsConfig::ping_interval`] | `disconnect` | yes | `abrupt` |
//! | 4006 | `token expired` | the core closed the session: its token expired without a refresh | `disconnect` | yes (with a fresh token) | `abrupt` |
//! | other | as given | the core closed the outbox with another [`CloseReason`] | `disconnect` | as given | `abrupt` |
//! | none | — | EOF without a close frame, I/O error, or a write that took longer than [`WsConfig::write_timeout`]: the connection is dropped | — | — | `abrupt` |
//!
//! After sending a close frame the server closes lingering
//! ([`crate::linger`]): it shuts the transport's write side down, then reads
//! and discards what the client still sends (its close reply, the rest of an
//! oversize message) until the client closes, for at most one second and
//! 256 KiB, so that the close frame reaches a client that is still sending
//! instead of being lost to a TCP reset.
//!
//! # Error frames (the connection stays open unless noted)
//!
//! | code | when |
//! |---|---|
//! | `bad_frame` | undecodable frame: malformed JSON, wrong field type, missing field, bad payload, bad protobuf. `req` is 0 because the request id could not be read. Before `connect`: closes with 4002. |
//! | `unknown_frame` | JSON `type` missing or unknown, or a protobuf `ClientFrame` with no frame set. Before `connect`: closes with 4002. |
//! | `not_connected` | the first frame was not `connect`; closes with 4002 |
//! | `already_connected` | `connect` on an open session |
//! | `bad_request` | `refresh` in open mode (no token auth configured) |
//! | any core code | the core rejected a request; the frame echoes its `req` |
//!
//! # Replies
//!
//! | request | reply (echoing `req`) |
//! |---|---|
//! | `subscribe` | `subscribed`, then the replay (retained, recovered or rewound messages, gaps) in order, before any live message |
//! | `unsubscribe` | `unsubscribed` |
//! | `publish` | `publish_ack` |
//! | `presence.enter` / `presence.update` / `presence.leave` | `publish_ack` with only `channel` set: "acknowledged" |
//! | `presence.get` | `presence` |
//! | `history` | `history` |
//! | `ping` | `pong` |
//!
//! # Metrics (label `protocol="ws"`)
//!
//! `switchboard_messages_out_total` (deliveries written),
//! `switchboard_bytes_out_total`, `switchboard_bytes_in_total` (data message
//! bytes), `switchboard_frames_in_total` (data messages received), and
//! `switchboard_protocol_errors_total` with `code` = `bad_frame`,
//! `unknown_frame`, `unsupported_data` (1003), `invalid_utf8` (1007),
//! `invalid_deflate` (1007),
//! `message_too_large` (1009) or `protocol_error` (1002).
//! `switchboard_ws_compressed_messages_total{direction}` (`in`, `out`)
//! counts messages that travelled compressed, on every WebSocket route (its
//! only label is `direction`).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{FutureExt, SinkExt, StreamExt};
use switchboard_proto as proto;
use switchboard_proto::server_frame::Frame as Reply;
use switchboard_proto::{ErrorCode, client_frame};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tracing::{Instrument, Span, debug, error};

use crate::arrival::ArrivalClock;
use crate::frames::{Answer, Counters, Session, answer, connected, refusal};
use crate::port::{CloseKind, CloseReason, Core, OpenSession, Outbound, Outbox};
use crate::ws_frames::{DeflateConfig, FrameError};

/// Subprotocol of the JSON codec (text messages).
pub const SUBPROTOCOL_JSON: &str = "switchboard.v1.json";
/// Subprotocol of the protobuf codec (binary messages).
pub const SUBPROTOCOL_PROTO: &str = "switchboard.v1.proto";

/// How frames travel on one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// One JSON frame per text message (`switchboard.v1.json`).
    Json,
    /// One protobuf frame per binary message (`switchboard.v1.proto`).
    Proto,
}

impl Codec {
    /// The subprotocol name the server echoes in `Sec-WebSocket-Protocol`.
    pub fn subprotocol(self) -> &'static str {
        match self {
            Codec::Json => SUBPROTOCOL_JSON,
            Codec::Proto => SUBPROTOCOL_PROTO,
        }
    }

    /// The codec of a subprotocol name (exact, case-sensitive match).
    pub fn from_subprotocol(name: &str) -> Option<Codec> {
        match name {
            SUBPROTOCOL_JSON => Some(Codec::Json),
            SUBPROTOCOL_PROTO => Some(Codec::Proto),
            _ => None,
        }
    }

    /// Short name for logs.
    fn name(self) -> &'static str {
        match self {
            Codec::Json => "json",
            Codec::Proto => "proto",
        }
    }
}

/// The client offered subprotocols, none of which this server speaks. The
/// gateway answers the upgrade with an HTTP error naming them.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unsupported WebSocket subprotocol(s) {offered:?}; supported: {}, {}", SUBPROTOCOL_JSON, SUBPROTOCOL_PROTO)]
pub struct NegotiateError {
    /// The offers, trimmed, in the client's order.
    pub offered: Vec<String>,
}

/// Picks the codec from a `Sec-WebSocket-Protocol` header value
/// (comma-separated offers; join repeated header lines with commas first).
///
/// | offered | result |
/// |---|---|
/// | header absent, empty, or only commas/spaces | `Ok(None)`: JSON, echo no subprotocol |
/// | `switchboard.v1.proto` | `Ok(Some(Codec::Proto))` |
/// | `foo, switchboard.v1.json, switchboard.v1.proto` | `Ok(Some(Codec::Json))`: the client's first supported offer wins |
/// | `mqtt` | `Err(NegotiateError { offered: ["mqtt"] })` |
pub fn negotiate(offered: Option<&str>) -> Result<Option<Codec>, NegotiateError> {
    let Some(header) = offered else {
        return Ok(None);
    };
    let offers: Vec<&str> = header.split(',').map(str::trim).filter(|o| !o.is_empty()).collect();
    if offers.is_empty() {
        return Ok(None);
    }
    match offers.iter().find_map(|o| Codec::from_subprotocol(o)) {
        Some(codec) => Ok(Some(codec)),
        None => Err(NegotiateError { offered: offers.into_iter().map(String::from).collect() }),
    }
}

/// Tunables of the WebSocket front end.
#[derive(Clone, Debug)]
pub struct WsConfig {
    /// The `connect` frame must arrive within this long (default 10 s), so a
    /// silent socket cannot hold a slot forever.
    pub handshake_timeout: Duration,
    /// A flush that takes longer drops the connection (default 10 s): a peer
    /// that stops reading must not pin the writer.
    pub write_timeout: Duration,
    /// Send a WebSocket ping after this long without hearing from the peer
    /// (default 25 s, under common 30 s proxy idle timeouts); a peer silent
    /// for twice this is dropped with 4004. Zero disables pings and the idle
    /// check.
    pub ping_interval: Duration,
    /// Largest WebSocket message or frame accepted (default 1 MiB); larger
    /// ones close the connection with 1009.
    pub max_frame_size: usize,
    /// Read buffer per connection (default 4 KiB): most frames are small and
    /// memory per idle connection matters more than bulk read speed.
    pub read_buffer_size: usize,
    /// tungstenite writes to the socket once this many bytes are buffered,
    /// even before the flush (default 64 KiB).
    pub write_buffer_size: usize,
    /// permessage-deflate ([`crate::ws_frames`]): on by default, without
    /// server context takeover.
    pub deflate: DeflateConfig,
}

impl Default for WsConfig {
    fn default() -> Self {
        WsConfig {
            handshake_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(25),
            max_frame_size: 1024 * 1024,
            read_buffer_size: 4 * 1024,
            write_buffer_size: 64 * 1024,
            deflate: DeflateConfig::default(),
        }
    }
}

/// The tungstenite configuration matching `cfg`, for
/// `WebSocketStream::from_raw_socket(io, Role::Server, Some(..))`.
pub fn websocket_config(cfg: &WsConfig) -> WebSocketConfig {
    // tungstenite panics unless max_write_buffer_size > write_buffer_size;
    // keep its unbounded default and cap the target so that always holds.
    let write_buffer_size = cfg.write_buffer_size.min(usize::MAX - 1);
    WebSocketConfig::default()
        .read_buffer_size(cfg.read_buffer_size)
        .write_buffer_size(write_buffer_size)
        .max_message_size(Some(cfg.max_frame_size))
        .max_frame_size(Some(cfg.max_frame_size))
}

/// What the upgrade request told us about the client.
#[derive(Clone, Default)]
pub struct ConnInfo {
    /// Remote address, for logs and per-IP limits.
    pub peer: Option<SocketAddr>,
    /// `?token=` of the upgrade request; empty if absent.
    pub token: String,
    /// `?client_id=` of the upgrade request; empty if absent.
    pub client_id: String,
}

impl std::fmt::Debug for ConnInfo {
    // Hand-written so that a token never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnInfo")
            .field("peer", &self.peer)
            .field("token", &if self.token.is_empty() { "" } else { "<redacted>" })
            .field("client_id", &self.client_id)
            .finish()
    }
}

/// Sent when the peer has been silent for two ping intervals.
// Proposed for `port::CloseReason` (owned elsewhere); local until then.
/// Counts a connection a WebSocket timeout ended, in the metric the router
/// uses for the limits it enforces.
fn limit_exceeded(limit: &'static str) {
    metrics::counter!("switchboard_limit_exceeded_total", "limit" => limit, "protocol" => "ws").increment(1);
}

const PING_TIMEOUT: CloseReason = CloseReason { code: 4004, reason: "ping timeout", reconnect: true };

/// Longest wait for the transport's shutdown when no close frame of ours
/// needs to linger.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// Slots the per-connection batch buffers keep between batches.
const KEEP_BUFFERED_ITEMS: usize = 64;

/// Write timeout of the echo route, which has no [`WsConfig`].
const ECHO_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a connection ends, decided once; [`Conn::finish`] acts on it.
#[derive(Debug)]
enum Stop {
    /// A session-level close: `disconnect` frame, then the close frame.
    Disconnect(CloseReason),
    /// A WebSocket-level violation: only the close frame.
    Violation(CloseCode, &'static str),
    /// The peer sent a close frame; tungstenite has queued the echo.
    PeerClosed,
    /// The transport is gone or stuck: nothing more can be written.
    Gone,
}

/// Maps a read error to how the connection ends, counting violations.
fn read_error(e: WsError) -> Stop {
    if let WsError::Io(io) = &e
        && let Some(f) = FrameError::of(io)
    {
        let (code, reason, label) = match f {
            FrameError::Protocol(_) => (CloseCode::Protocol, "protocol error", "protocol_error"),
            FrameError::InvalidUtf8 => (CloseCode::Invalid, "invalid UTF-8", "invalid_utf8"),
            FrameError::BadDeflate => (CloseCode::Invalid, "invalid compressed data", "invalid_deflate"),
            FrameError::TooLarge => (CloseCode::Size, "message too large", "message_too_large"),
        };
        debug!(error = %f, close = reason, "WebSocket violation (frame layer)");
        protocol_error(label);
        return Stop::Violation(code, reason);
    }
    let (code, reason, label) = match &e {
        WsError::Capacity(_) => (CloseCode::Size, "message too large", "message_too_large"),
        WsError::Utf8(_) => (CloseCode::Invalid, "invalid UTF-8", "invalid_utf8"),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            debug!("peer hung up without a close frame");
            return Stop::Gone;
        }
        WsError::Io(e) => {
            debug!(error = %e, "read failed");
            return Stop::Gone;
        }
        WsError::ConnectionClosed | WsError::AlreadyClosed => return Stop::Gone,
        WsError::Protocol(_) => (CloseCode::Protocol, "protocol error", "protocol_error"),
        _ => (CloseCode::Protocol, "protocol error", "protocol_error"),
    };
    debug!(error = %e, close = reason, "WebSocket violation");
    protocol_error(label);
    Stop::Violation(code, reason)
}

fn protocol_error(code: &'static str) {
    // Rare, so looking the handle up here is fine.
    metrics::counter!("switchboard_protocol_errors_total", "protocol" => "ws", "code" => code).increment(1);
}

fn close_message(code: CloseCode, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame { code, reason: Utf8Bytes::from_static(reason) }))
}

/// Feeds `msgs` and flushes once, all within `limit` (without a timer when
/// the socket takes the batch at once: [`crate::deadline`]).
///
/// `msgs` is iterated in place and the write is pinned once: every binding
/// of a future or of `msgs` would be one more copy in the connection's task.
async fn send_batch<S, I>(ws: &mut WebSocketStream<S>, mut msgs: I, limit: Duration) -> Result<(), Stop>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    I: Iterator<Item = Message> + Send,
{
    let write = std::pin::pin!(async {
        for m in msgs.by_ref() {
            ws.feed(m).await?;
        }
        ws.flush().await
    });
    match crate::deadline::within(limit, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e @ (WsError::AlreadyClosed | WsError::Protocol(ProtocolError::SendAfterClosing)))) => {
            // Writing after a close is a bug here, not the peer's doing.
            error!(error = %e, "write on a closed WebSocket");
            Err(Stop::Gone)
        }
        Ok(Err(e)) => {
            debug!(error = %e, "write failed; dropping connection");
            Err(Stop::Gone)
        }
        Err(_) => {
            debug!(timeout = ?limit, "write timed out; dropping connection");
            Err(Stop::Gone)
        }
    }
}

/// After our close frame: a lingering close of the transport
/// ([`crate::linger`]): shut its write side down (the server closes the TCP
/// connection first, RFC 6455 §7.1.1), then read and discard what the peer
/// still sends — its close reply, or the rest of a message it was sending —
/// until it closes, for at most one second and 256 KiB. Read below
/// tungstenite: after a framing violation its reader cannot be trusted to
/// skip the bytes, and a reset would discard the close frame on its way.
async fn linger_and_shutdown<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>) {
    crate::linger::close(ws.get_mut()).await;
}

/// Best effort: the server closes the TCP connection first (RFC 6455 §7.1.1).
async fn shutdown_transport<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>) {
    let _ = tokio::time::timeout(CLOSE_LINGER, ws.get_mut().shutdown()).await;
}

/// Inbound frames handled before one flush of their replies.
const MAX_FRAMES_PER_BATCH: usize = 64;

/// Reply bytes after which a batch stops reading requests and writes what
/// it has: a client pipelining history reads it never reads holds at most
/// this (plus one page) in the gateway, then the write timeout drops it.
const MAX_REPLY_BYTES_PER_BATCH: usize = 1024 * 1024;

/// What woke the connection task.
enum Event {
    Shutdown,
    Timer,
    Inbound(Option<Result<Message, WsError>>),
    Outbox,
}

/// Waits for the outbox, or forever before the session opens.
async fn outbox_ready(outbox: Option<&Outbox>) {
    match outbox {
        Some(o) => o.ready().await,
        None => std::future::pending().await,
    }
}

/// Runs one connection to the end. `shutdown` flips to true when the gateway
/// stops (a dropped sender counts as stopping).
///
/// Never panics on network input; every way it ends is in the module's
/// close-code table.
///
/// Not an `async fn`: its arguments would stay in the future beside the
/// [`Conn`] built from them. The future holds the `Conn` and the wait in
/// its loop; the session's opening, request handling and ending are boxed
/// futures of their own, so an idle connection's task stays small.
pub fn serve<S: AsyncRead + AsyncWrite + Unpin + Send>(
    ws: WebSocketStream<S>,
    codec: Codec,
    core: Arc<dyn Core>,
    info: ConnInfo,
    cfg: WsConfig,
    shutdown: watch::Receiver<bool>,
) -> impl Future<Output = ()> + Send {
    let span = tracing::info_span!(
        "ws",
        peer = tracing::field::Empty,
        protocol = "ws",
        codec = codec.name(),
        client_id = tracing::field::Empty,
    );
    if let Some(peer) = info.peer {
        span.record("peer", tracing::field::display(peer));
    }
    let conn = Conn {
        ws,
        codec,
        core,
        info,
        timer: Box::pin(tokio::time::sleep(cfg.handshake_timeout)),
        timer_armed: true,
        cfg,
        shutdown,
        span: span.clone(),
        session: None,
        replies: Vec::new(),
        replayed: 0,
        drained: Vec::new(),
        flush_pending: false,
        last_seen: Instant::now(),
        counters: Counters::new("ws"),
        arrival: ArrivalClock::default(),
    };
    conn.run_to_end().instrument(span)
}

/// One connection's state. Deadlines and buffers live here, not in futures
/// that the `select!` could drop.
struct Conn<S> {
    ws: WebSocketStream<S>,
    codec: Codec,
    core: Arc<dyn Core>,
    /// Query credentials; taken when the session opens.
    info: ConnInfo,
    cfg: WsConfig,
    shutdown: watch::Receiver<bool>,
    span: Span,
    session: Option<Session>,
    /// Frames for the next flush, in write order (replies, then replay).
    replies: Vec<Message>,
    /// Deliveries among `replies`, for `messages_out`.
    replayed: u64,
    /// Reused buffer for outbox drains.
    drained: Vec<Outbound>,
    /// A ping arrived: flush so tungstenite's automatic pong goes out now.
    flush_pending: bool,
    /// When anything last arrived from the peer (for the idle check).
    last_seen: Instant,
    /// Handshake deadline before the session opens; ping/idle check after.
    timer: Pin<Box<Sleep>>,
    /// False when pings are disabled (`ping_interval` zero).
    timer_armed: bool,
    counters: Counters,
    /// When the frames being handled arrived ([`crate::arrival`]): a
    /// `subscribe` is in effect from then.
    arrival: ArrivalClock,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Conn<S> {
    /// Not an `async fn`: an `async fn`'s `mut self` would keep the
    /// connection twice in the future (the argument and its binding).
    #[allow(clippy::manual_async_fn)] // on purpose: see above
    fn run_to_end(mut self) -> impl Future<Output = ()> + Send {
        async move {
            let stop = self.run().await;
            Box::pin(self.finish(stop)).await;
            // `self.session` drops here: core.close(.., clean or abrupt).
        }
    }

    /// Handles `first` and every frame already readable after it: a client
    /// pipelining requests gets its replies in one write (bounded in frames
    /// and in reply bytes, so a flood cannot starve the rest or pin memory).
    async fn on_inbound_batch(&mut self, first: Option<Result<Message, WsError>>) -> Result<(), Stop> {
        let mut handled = self.on_inbound(first).await;
        for _ in 0..MAX_FRAMES_PER_BATCH {
            if handled.is_err() || self.replies.iter().map(Message::len).sum::<usize>() >= MAX_REPLY_BYTES_PER_BATCH {
                break;
            }
            let Some(next) = self.ws.next().now_or_never() else { break };
            handled = self.on_inbound(next).await;
        }
        handled
    }

    async fn run(&mut self) -> Stop {
        if *self.shutdown.borrow_and_update() {
            return Stop::Disconnect(CloseReason::SHUTDOWN);
        }
        if !self.info.token.is_empty() || !self.info.client_id.is_empty() {
            let client_id = std::mem::take(&mut self.info.client_id);
            let token = std::mem::take(&mut self.info.token);
            if let Err(stop) = Box::pin(self.open(0, client_id, token)).await {
                return stop;
            }
            if let Err(stop) = self.write_batch().await {
                return stop;
            }
        }
        loop {
            let event = tokio::select! {
                // Biased so shutdown and deadlines win over a busy peer.
                biased;
                changed = self.shutdown.changed() => match changed {
                    Ok(()) if !*self.shutdown.borrow_and_update() => continue,
                    _ => Event::Shutdown,
                },
                () = &mut self.timer, if self.timer_armed => Event::Timer,
                msg = self.arrival.stamped(self.ws.next()) => Event::Inbound(msg),
                () = outbox_ready(self.session.as_ref().map(|s| &*s.handle.outbox)) => Event::Outbox,
            };
            let handled = match event {
                Event::Shutdown => Err(Stop::Disconnect(CloseReason::SHUTDOWN)),
                Event::Timer => self.on_timer(),
                // Boxed: request handling is the loop's largest state, and
                // an idle connection waits in the select above, not there.
                Event::Inbound(msg) => {
                    self.arrival.read_done();
                    Box::pin(self.on_inbound_batch(msg)).await
                }
                // Draining below is all an outbox wake-up needs.
                Event::Outbox => Ok(()),
            };
            if let Err(stop) = handled {
                return stop;
            }
            if let Err(stop) = self.write_batch().await {
                return stop;
            }
        }
    }

    /// Drains the outbox and writes it after the pending replies, with one
    /// flush.
    async fn write_batch(&mut self) -> Result<(), Stop> {
        let closed = match &self.session {
            Some(s) => s.handle.outbox.drain(&mut self.drained).err(),
            None => None,
        };
        if closed.is_none() && self.replies.is_empty() && self.drained.is_empty() && !self.flush_pending {
            return Ok(());
        }
        self.flush_pending = false;
        let codec = self.codec;
        let mut deliveries = std::mem::take(&mut self.replayed);
        let mut bytes = 0u64;
        // The frames are built as they are written (and not bound first:
        // see `send_batch`).
        let sent = send_batch(
            &mut self.ws,
            self.replies
                .drain(..)
                .chain(self.drained.drain(..).map(|item| {
                    if matches!(item, Outbound::Message(_)) {
                        deliveries += 1;
                    }
                    outbound_message(codec, item)
                }))
                .inspect(|m| bytes += data_len(m)),
            self.cfg.write_timeout,
        )
        .await;
        self.counters.messages_out.increment(deliveries);
        self.counters.bytes_out.increment(bytes);
        // A big replay or burst must not pin its buffers for the connection's
        // whole life.
        if self.replies.capacity() > KEEP_BUFFERED_ITEMS {
            self.replies.shrink_to(KEEP_BUFFERED_ITEMS);
        }
        if self.drained.capacity() > KEEP_BUFFERED_ITEMS {
            self.drained.shrink_to(KEEP_BUFFERED_ITEMS);
        }
        sent?;
        match closed {
            Some(reason) => Err(Stop::Disconnect(reason)),
            None => Ok(()),
        }
    }

    fn on_timer(&mut self) -> Result<(), Stop> {
        if self.session.is_none() {
            limit_exceeded("handshake_timeout");
            tracing::info!(timeout = ?self.cfg.handshake_timeout, "no connect frame in time");
            return Err(Stop::Disconnect(CloseReason::CONNECT_EXPECTED));
        }
        let interval = self.cfg.ping_interval;
        let silent = self.last_seen.elapsed();
        if silent >= interval * 2 {
            limit_exceeded("idle_timeout");
            tracing::info!(?silent, "peer silent for two ping intervals");
            return Err(Stop::Disconnect(PING_TIMEOUT));
        }
        // The deadline is recomputed from `last_seen` only when it fires, so
        // a busy connection costs no timer resets.
        let next = if silent >= interval {
            self.replies.push(Message::Ping(Bytes::new()));
            self.last_seen + interval * 2
        } else {
            self.last_seen + interval
        };
        self.timer.as_mut().reset(next);
        Ok(())
    }

    async fn on_inbound(&mut self, msg: Option<Result<Message, WsError>>) -> Result<(), Stop> {
        let msg = match msg {
            None => {
                debug!("peer closed the transport");
                return Err(Stop::Gone);
            }
            Some(Err(e)) => return Err(read_error(e)),
            Some(Ok(m)) => m,
        };
        self.last_seen = Instant::now();
        match msg {
            Message::Text(text) => {
                self.count_in(text.len());
                if self.codec != Codec::Json {
                    protocol_error("unsupported_data");
                    return Err(Stop::Violation(CloseCode::Unsupported, "text messages need switchboard.v1.json"));
                }
                match proto::json::decode_client_frame(text.as_str()) {
                    Ok(frame) => self.on_frame(frame).await,
                    Err(e) => {
                        let code = match e {
                            proto::json::JsonError::UnknownType(_) => ErrorCode::UnknownFrame,
                            _ => ErrorCode::BadFrame,
                        };
                        self.bad_frame(code, e.to_string())
                    }
                }
            }
            Message::Binary(data) => {
                self.count_in(data.len());
                if self.codec != Codec::Proto {
                    protocol_error("unsupported_data");
                    return Err(Stop::Violation(CloseCode::Unsupported, "binary messages need switchboard.v1.proto"));
                }
                match proto::decode_client_frame(&data) {
                    Ok(frame) => self.on_frame(frame).await,
                    Err(e) => self.bad_frame(ErrorCode::BadFrame, format!("malformed protobuf frame: {e}")),
                }
            }
            Message::Ping(_) => {
                self.flush_pending = true;
                Ok(())
            }
            Message::Close(frame) => {
                debug!(?frame, "peer sent a close frame");
                Err(Stop::PeerClosed)
            }
            // Pongs only refresh `last_seen`; raw frames are never read.
            Message::Pong(_) | Message::Frame(_) => Ok(()),
        }
    }

    fn count_in(&self, len: usize) {
        self.counters.count_in(len);
    }

    /// Answers an undecodable frame. Before `connect` that ends the
    /// connection: the client is not speaking our protocol.
    fn bad_frame(&mut self, code: ErrorCode, message: String) -> Result<(), Stop> {
        debug!(code = code.slug(), %message, "bad frame");
        protocol_error(code.slug());
        // The request id is lost with the frame.
        self.push_error(0, code, message);
        match self.session {
            Some(_) => Ok(()),
            None => Err(Stop::Disconnect(CloseReason::CONNECT_EXPECTED)),
        }
    }

    async fn on_frame(&mut self, frame: proto::ClientFrame) -> Result<(), Stop> {
        let req = frame.req;
        let Some(frame) = frame.frame else {
            return self.bad_frame(ErrorCode::UnknownFrame, "frame has no known body".into());
        };
        let Some(session) = &self.session else {
            if let client_frame::Frame::Connect(c) = frame {
                return self.open(req, c.client_id, c.token).await;
            }
            self.push_error(req, ErrorCode::NotConnected, "the first frame must be connect".into());
            return Err(Stop::Disconnect(CloseReason::CONNECT_EXPECTED));
        };
        // A history page is built and encoded in its turn (crate::heavy).
        let _turn = match &frame {
            client_frame::Frame::History(_) => crate::heavy::turn().await,
            _ => None,
        };
        match answer(self.core.as_ref(), session.handle.id, frame, self.arrival.arrived()).await {
            Ok(Answer::Reply(body)) => self.push_reply(req, *body),
            Ok(Answer::Subscribed(outcome)) => {
                // Reply, then replay, both ahead of the outbox drain that
                // follows: the core queued live messages after these.
                self.push_reply(req, Reply::Subscribed(outcome.subscribed));
                for item in outcome.replay {
                    if matches!(item, Outbound::Message(_)) {
                        self.replayed += 1;
                    }
                    self.replies.push(outbound_message(self.codec, item));
                }
            }
            Err(e) => {
                debug!(req, code = e.code.slug(), error = %e, "request refused");
                self.push_error(req, e.code, e.message);
            }
        }
        Ok(())
    }

    /// Asks the core for a session; a refusal ends the connection.
    async fn open(&mut self, req: u64, client_id: String, token: String) -> Result<(), Stop> {
        let request =
            OpenSession { protocol: proto::Protocol::Ws, client_id, token, peer: self.info.peer, cert_identity: None };
        match self.core.open(request).await {
            Ok(handle) => {
                self.span.record("client_id", handle.client_id.as_str());
                debug!(connection_id = %handle.connection_id, "session opened");
                self.push_reply(req, connected(&handle));
                self.session = Some(Session { handle, core: Arc::clone(&self.core), end: CloseKind::Abrupt });
                // The timer switches from the handshake deadline to pings.
                self.last_seen = Instant::now();
                self.timer_armed = !self.cfg.ping_interval.is_zero();
                if self.timer_armed {
                    self.timer.as_mut().reset(self.last_seen + self.cfg.ping_interval);
                }
                Ok(())
            }
            Err(e) => {
                debug!(code = e.code.slug(), error = %e, "session refused");
                let reason = refusal(e.code);
                self.push_error(req, e.code, e.message);
                Err(Stop::Disconnect(reason))
            }
        }
    }

    fn push_reply(&mut self, req: u64, body: Reply) {
        let frame = proto::ServerFrame { req, frame: Some(body) };
        self.replies.push(encode(self.codec, &frame));
    }

    fn push_error(&mut self, req: u64, code: ErrorCode, message: String) {
        self.push_reply(req, Reply::Error(proto::Error { code: code as i32, message }));
    }

    /// Writes whatever ends the connection, then shuts the transport down.
    async fn finish(&mut self, stop: Stop) {
        match stop {
            Stop::Disconnect(reason) => {
                debug!(code = reason.code, reason = reason.reason, "closing connection");
                let disconnect = proto::ServerFrame {
                    req: 0,
                    frame: Some(Reply::Disconnect(proto::Disconnect {
                        code: reason.code.into(),
                        reason: reason.reason.into(),
                        reconnect: reason.reconnect,
                    })),
                };
                let tail = [encode(self.codec, &disconnect), close_message(reason.code.into(), reason.reason)];
                let msgs = self.replies.drain(..).chain(tail);
                if send_batch(&mut self.ws, msgs, self.cfg.write_timeout).await.is_ok() {
                    linger_and_shutdown(&mut self.ws).await;
                } else {
                    shutdown_transport(&mut self.ws).await;
                }
            }
            Stop::Violation(code, reason) => {
                let msgs = self.replies.drain(..).chain([close_message(code, reason)]);
                if send_batch(&mut self.ws, msgs, self.cfg.write_timeout).await.is_ok() {
                    linger_and_shutdown(&mut self.ws).await;
                } else {
                    shutdown_transport(&mut self.ws).await;
                }
            }
            Stop::PeerClosed => {
                if let Some(s) = &mut self.session {
                    s.end = CloseKind::Clean;
                }
                // Sends tungstenite's queued echo of the client's close.
                let _ = send_batch(&mut self.ws, std::iter::empty(), self.cfg.write_timeout).await;
                shutdown_transport(&mut self.ws).await;
            }
            Stop::Gone => shutdown_transport(&mut self.ws).await,
        }
    }
}

/// Bytes of a data message, for `bytes_out`.
fn data_len(m: &Message) -> u64 {
    match m {
        Message::Text(t) => t.len() as u64,
        Message::Binary(b) => b.len() as u64,
        _ => 0,
    }
}

/// A server frame as one WebSocket message of the codec.
fn encode(codec: Codec, frame: &proto::ServerFrame) -> Message {
    match codec {
        Codec::Json => Message::Text(Utf8Bytes::from(proto::json::encode_server_frame(frame))),
        Codec::Proto => Message::Binary(proto::encode_server_frame(frame)),
    }
}

/// An outbox item as a WebSocket message. Messages reuse the encoding
/// cached in the shared [`Delivery`](crate::port::Delivery).
fn outbound_message(codec: Codec, item: Outbound) -> Message {
    match (item, codec) {
        (Outbound::Message(d), Codec::Json) => Message::Text(d.ws_text().clone()),
        (Outbound::Message(d), Codec::Proto) => Message::Binary(d.proto_frame().clone()),
        (Outbound::Gap(g), codec) => encode(codec, &proto::ServerFrame { req: 0, frame: Some(Reply::Gap(g)) }),
    }
}

/// The conformance echo route: echoes every data message with the same
/// bytes and opcode (text stays text, binary stays binary), answers pings,
/// and closes cleanly. Invalid UTF-8 in a text message closes with 1007, an
/// oversize message with 1009, other violations with 1002, and shutdown
/// with 1012.
pub async fn serve_echo<S: AsyncRead + AsyncWrite + Unpin + Send>(
    mut ws: WebSocketStream<S>,
    mut shutdown: watch::Receiver<bool>,
) {
    let span = tracing::debug_span!("ws_echo");
    async move {
        let mut stop = None;
        if *shutdown.borrow_and_update() {
            stop = Some(Stop::Violation(CloseCode::Restart, CloseReason::SHUTDOWN.reason));
        }
        while stop.is_none() {
            let msg = tokio::select! {
                biased;
                changed = shutdown.changed() => match changed {
                    Ok(()) if !*shutdown.borrow_and_update() => continue,
                    _ => {
                        stop = Some(Stop::Violation(CloseCode::Restart, CloseReason::SHUTDOWN.reason));
                        continue;
                    }
                },
                msg = ws.next() => msg,
            };
            let reply = match msg {
                None => Err(Stop::Gone),
                Some(Err(e)) => Err(read_error(e)),
                Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => Ok(Some(m)),
                // Flushing sends tungstenite's automatic pong.
                Some(Ok(Message::Ping(_))) => Ok(None),
                Some(Ok(Message::Close(_))) => Err(Stop::PeerClosed),
                Some(Ok(Message::Pong(_) | Message::Frame(_))) => continue,
            };
            match reply {
                Ok(m) => {
                    if let Err(s) = send_batch(&mut ws, m.into_iter(), ECHO_WRITE_TIMEOUT).await {
                        stop = Some(s);
                    }
                }
                Err(s) => stop = Some(s),
            }
        }
        let last = match stop {
            Some(Stop::Violation(code, reason)) => Some(close_message(code, reason)),
            _ => None,
        };
        // With no close of ours to send, this flushes tungstenite's echo of
        // the client's close (if any).
        let sent = send_batch(&mut ws, last.into_iter(), ECHO_WRITE_TIMEOUT).await;
        if sent.is_ok() && matches!(stop, Some(Stop::Violation(..))) {
            linger_and_shutdown(&mut ws).await;
        } else {
            shutdown_transport(&mut ws).await;
        }
    }
    .instrument(span)
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    use parking_lot::Mutex;
    use prost::Message as _;
    use tokio::io::{AsyncReadExt, DuplexStream};
    use tokio::task::JoinHandle;
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data as OpData, OpCode};

    use crate::port::{CoreError, Delivery, SessionHandle, SessionId, SlowPolicy, SubscribeOutcome};

    /// Upper bound on any single wait; a hang fails the test instead.
    const WAIT: Duration = Duration::from_secs(5);

    /// A core that records calls and answers from canned data.
    struct FakeCore {
        calls: Mutex<Vec<String>>,
        outbox: Arc<Outbox>,
        open_error: Option<CoreError>,
        /// Returned as `SubscribeOutcome::replay`.
        replay: Mutex<Vec<Outbound>>,
        /// Pushed into the outbox during `subscribe`, as the core queues live
        /// messages right after taking the replay snapshot.
        live_on_subscribe: Mutex<Vec<Outbound>>,
    }

    impl FakeCore {
        fn new() -> Arc<Self> {
            Self::with(Outbox::new(1 << 20), None)
        }

        fn with(outbox: Arc<Outbox>, open_error: Option<CoreError>) -> Arc<Self> {
            Arc::new(FakeCore {
                calls: Mutex::new(Vec::new()),
                outbox,
                open_error,
                replay: Mutex::new(Vec::new()),
                live_on_subscribe: Mutex::new(Vec::new()),
            })
        }

        fn record(&self, call: String) {
            self.calls.lock().push(call);
        }

        fn calls(&self) -> Vec<String> {
            self.calls.lock().clone()
        }

        fn closes(&self) -> Vec<String> {
            self.calls().into_iter().filter(|c| c.starts_with("close")).collect()
        }
    }

    #[async_trait::async_trait]
    impl Core for FakeCore {
        async fn open(&self, req: OpenSession) -> Result<SessionHandle, CoreError> {
            self.record(format!("open {:?} {} {}", req.protocol, req.client_id, req.token));
            if let Some(e) = &self.open_error {
                return Err(e.clone());
            }
            Ok(SessionHandle {
                id: 7,
                client_id: if req.client_id.is_empty() { "anon".into() } else { req.client_id },
                connection_id: "c1".into(),
                node: "n1".into(),
                outbox: Arc::clone(&self.outbox),
            })
        }

        async fn subscribe(&self, session: SessionId, req: proto::Subscribe) -> Result<SubscribeOutcome, CoreError> {
            self.record(format!("subscribe {session} {}", req.filter));
            for item in self.live_on_subscribe.lock().drain(..) {
                self.outbox.push(item, SlowPolicy::Disconnect);
            }
            Ok(SubscribeOutcome {
                subscribed: proto::Subscribed { filter: req.filter, channels: vec![] },
                replay: std::mem::take(&mut *self.replay.lock()),
            })
        }

        async fn unsubscribe(&self, session: SessionId, filter: &str) -> Result<(), CoreError> {
            self.record(format!("unsubscribe {session} {filter}"));
            Ok(())
        }

        async fn publish(&self, session: SessionId, req: proto::Publish) -> Result<proto::PublishAck, CoreError> {
            self.record(format!("publish {session} {} {:?}", req.channel, req.payload));
            if req.channel == "bad" {
                return Err(CoreError::new(ErrorCode::InvalidChannel, "bad channel"));
            }
            Ok(proto::PublishAck { channel: req.channel, epoch: "E".into(), serial: 1, duplicate: false })
        }

        async fn presence_enter(
            &self,
            session: SessionId,
            channel: &str,
            data: Bytes,
            update: bool,
        ) -> Result<(), CoreError> {
            self.record(format!("presence_enter {session} {channel} {data:?} {update}"));
            Ok(())
        }

        async fn presence_leave(&self, session: SessionId, channel: &str) -> Result<(), CoreError> {
            self.record(format!("presence_leave {session} {channel}"));
            Ok(())
        }

        async fn presence_members(
            &self,
            session: SessionId,
            channel: &str,
        ) -> Result<proto::PresenceMembers, CoreError> {
            self.record(format!("presence_members {session} {channel}"));
            Ok(proto::PresenceMembers {
                channel: channel.into(),
                members: vec![proto::Member { client_id: "u".into(), ..Default::default() }],
            })
        }

        async fn history(&self, session: SessionId, req: proto::History) -> Result<proto::HistoryResult, CoreError> {
            self.record(format!("history {session} {}", req.channel));
            Ok(proto::HistoryResult { channel: req.channel, epoch: "E".into(), serial: 3, messages: vec![] })
        }

        fn close(&self, session: SessionId, kind: CloseKind) {
            self.record(format!("close {session} {kind:?}"));
        }
    }

    fn delivery(channel: &str, serial: u64) -> Arc<Delivery> {
        Delivery::new(proto::Envelope {
            channel: channel.into(),
            serial,
            prev_serial: serial.saturating_sub(1),
            epoch: "E".into(),
            payload: Bytes::from(format!("m{serial}")),
            ..Default::default()
        })
    }

    /// A server task on one end of an in-memory pipe, a client on the other.
    struct Harness {
        client: WebSocketStream<DuplexStream>,
        task: JoinHandle<()>,
        shutdown: watch::Sender<bool>,
        core: Arc<FakeCore>,
    }

    async fn pipe(cfg: &WsConfig) -> (WebSocketStream<DuplexStream>, WebSocketStream<DuplexStream>) {
        let (server_io, client_io) = tokio::io::duplex(64 * 1024);
        let server = WebSocketStream::from_raw_socket(server_io, Role::Server, Some(websocket_config(cfg))).await;
        let client = WebSocketStream::from_raw_socket(client_io, Role::Client, None).await;
        (server, client)
    }

    async fn start_with(codec: Codec, core: Arc<FakeCore>, info: ConnInfo, cfg: WsConfig) -> Harness {
        let (server, client) = pipe(&cfg).await;
        let (shutdown, rx) = watch::channel(false);
        let dyn_core: Arc<dyn Core> = core.clone();
        let task = tokio::spawn(serve(server, codec, dyn_core, info, cfg, rx));
        Harness { client, task, shutdown, core }
    }

    async fn start(codec: Codec, core: Arc<FakeCore>) -> Harness {
        start_with(codec, core, ConnInfo::default(), WsConfig::default()).await
    }

    impl Harness {
        async fn send(&mut self, m: Message) {
            tokio::time::timeout(WAIT, self.client.send(m)).await.expect("send timed out").expect("send failed");
        }

        async fn send_json(&mut self, text: &str) {
            self.send(Message::text(text)).await;
        }

        async fn send_proto(&mut self, req: u64, frame: client_frame::Frame) {
            let bytes = proto::ClientFrame { req, frame: Some(frame) }.encode_to_vec();
            self.send(Message::binary(bytes)).await;
        }

        /// The next message that is not a ping or pong; `None` at the end.
        async fn recv(&mut self) -> Option<Message> {
            loop {
                let next = tokio::time::timeout(WAIT, self.client.next()).await.expect("receive timed out");
                match next {
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(m)) => return Some(m),
                    Some(Err(_)) | None => return None,
                }
            }
        }

        async fn recv_json(&mut self) -> proto::ServerFrame {
            match self.recv().await {
                Some(Message::Text(t)) => proto::json::decode_server_frame(t.as_str()).expect("server sent bad JSON"),
                other => panic!("expected a text message, got {other:?}"),
            }
        }

        async fn recv_proto(&mut self) -> proto::ServerFrame {
            match self.recv().await {
                Some(Message::Binary(b)) => proto::ServerFrame::decode(b).expect("server sent bad protobuf"),
                other => panic!("expected a binary message, got {other:?}"),
            }
        }

        /// Expects the close frame next; returns its code.
        async fn recv_close(&mut self) -> u16 {
            match self.recv().await {
                Some(Message::Close(Some(f))) => f.code.into(),
                other => panic!("expected a close frame, got {other:?}"),
            }
        }

        async fn connect(&mut self) {
            self.send_json(r#"{"type":"connect","req":1,"client_id":"alice"}"#).await;
            let f = self.recv_json().await;
            assert!(matches!(f.frame, Some(Reply::Connected(_))), "{f:?}");
        }

        /// Waits for the server task to end; returns the core's calls.
        async fn end(mut self) -> Vec<String> {
            // Keep reading so the close handshake can finish.
            let drain = async { while let Some(Ok(_)) = self.client.next().await {} };
            let _ = tokio::time::timeout(WAIT, drain).await;
            tokio::time::timeout(WAIT, self.task).await.expect("server task hung").expect("server task panicked");
            self.core.calls()
        }
    }

    fn error_of(f: &proto::ServerFrame) -> (u64, ErrorCode) {
        match &f.frame {
            Some(Reply::Error(e)) => (f.req, e.code()),
            other => panic!("expected an error frame, got {other:?}"),
        }
    }

    fn disconnect_of(f: &proto::ServerFrame) -> (u32, bool) {
        match &f.frame {
            Some(Reply::Disconnect(d)) => (d.code, d.reconnect),
            other => panic!("expected a disconnect frame, got {other:?}"),
        }
    }

    fn serial_of(f: &proto::ServerFrame) -> u64 {
        match &f.frame {
            Some(Reply::Message(e)) => e.serial,
            other => panic!("expected a message frame, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn connect_then_publish_acks_with_req() {
        let mut h = start(Codec::Json, FakeCore::new()).await;
        h.send_json(r#"{"type":"connect","req":5,"client_id":"alice","token":"t"}"#).await;
        let f = h.recv_json().await;
        assert_eq!(f.req, 5);
        let Some(Reply::Connected(c)) = f.frame else { panic!("{f:?}") };
        assert_eq!((c.client_id.as_str(), c.connection_id.as_str(), c.node.as_str()), ("alice", "c1", "n1"));
        assert_eq!(c.version, env!("CARGO_PKG_VERSION"));

        h.send_json(r#"{"type":"publish","req":6,"channel":"a/b","text":"hi"}"#).await;
        let f = h.recv_json().await;
        assert_eq!(f.req, 6);
        let Some(Reply::PublishAck(ack)) = f.frame else { panic!("{f:?}") };
        assert_eq!((ack.channel.as_str(), ack.serial), ("a/b", 1));

        // A core error is answered and the connection stays.
        h.send_json(r#"{"type":"publish","req":7,"channel":"bad"}"#).await;
        assert_eq!(error_of(&h.recv_json().await), (7, ErrorCode::InvalidChannel));
        h.send_json(r#"{"type":"ping","req":8}"#).await;
        let f = h.recv_json().await;
        assert_eq!((f.req, f.frame), (8, Some(Reply::Pong(proto::Pong {}))));

        let calls = h.core.calls();
        assert_eq!(calls[0], "open Ws alice t");
        assert_eq!(calls[1], "publish 7 a/b b\"hi\"");
        h.shutdown.send(true).expect("server holds the receiver");
        let calls = h.end().await;
        assert_eq!(calls.last().map(String::as_str), Some("close 7 Abrupt"));
    }

    #[tokio::test]
    async fn every_request_maps_to_its_reply() {
        let mut h = start(Codec::Json, FakeCore::new()).await;
        h.connect().await;
        h.send_json(r#"{"type":"presence.enter","req":2,"channel":"room","text":"x"}"#).await;
        h.send_json(r#"{"type":"presence.update","req":3,"channel":"room","text":"y"}"#).await;
        h.send_json(r#"{"type":"presence.leave","req":4,"channel":"room"}"#).await;
        for req in 2..=4 {
            let f = h.recv_json().await;
            assert_eq!(f.req, req);
            let Some(Reply::PublishAck(ack)) = f.frame else { panic!("{f:?}") };
            assert_eq!(ack, proto::PublishAck { channel: "room".into(), ..Default::default() });
        }
        h.send_json(r#"{"type":"presence.get","req":5,"channel":"room"}"#).await;
        let f = h.recv_json().await;
        assert!(matches!(&f.frame, Some(Reply::Presence(p)) if p.members.len() == 1), "{f:?}");
        h.send_json(r#"{"type":"history","req":6,"channel":"room"}"#).await;
        let f = h.recv_json().await;
        assert!(matches!(&f.frame, Some(Reply::History(r)) if r.serial == 3), "{f:?}");
        h.send_json(r#"{"type":"unsubscribe","req":7,"filter":"a/#"}"#).await;
        let f = h.recv_json().await;
        assert_eq!(f.frame, Some(Reply::Unsubscribed(proto::Unsubscribed { filter: "a/#".into() })));
        h.send_json(r#"{"type":"refresh","req":8,"token":"t2"}"#).await;
        assert_eq!(error_of(&h.recv_json().await), (8, ErrorCode::BadRequest));
        h.send_json(r#"{"type":"connect","req":9}"#).await;
        assert_eq!(error_of(&h.recv_json().await), (9, ErrorCode::AlreadyConnected));

        let calls = h.core.calls();
        assert!(calls.contains(&"presence_enter 7 room b\"x\" false".to_string()), "{calls:?}");
        assert!(calls.contains(&"presence_enter 7 room b\"y\" true".to_string()), "{calls:?}");
        assert!(calls.contains(&"presence_leave 7 room".to_string()), "{calls:?}");
        assert_eq!(calls.iter().filter(|c| c.starts_with("open")).count(), 1);
        h.send(Message::Close(None)).await;
        h.end().await;
    }

    #[tokio::test]
    async fn frame_before_connect_closes_4002() {
        let mut h = start(Codec::Json, FakeCore::new()).await;
        h.send_json(r#"{"type":"publish","req":3,"channel":"a"}"#).await;
        assert_eq!(error_of(&h.recv_json().await), (3, ErrorCode::NotConnected));
        assert_eq!(disconnect_of(&h.recv_json().await), (4002, false));
        assert_eq!(h.recv_close().await, 4002);
        let calls = h.end().await;
        assert!(calls.is_empty(), "no session may be opened or closed: {calls:?}");
    }

    #[tokio::test]
    async fn garbage_before_connect_closes_4002() {
        let mut h = start(Codec::Json, FakeCore::new()).await;
        h.send_json("not json").await;
        assert_eq!(error_of(&h.recv_json().await), (0, ErrorCode::BadFrame));
        assert_eq!(disconnect_of(&h.recv_json().await).0, 4002);
        assert_eq!(h.recv_close().await, 4002);
        assert!(h.end().await.is_empty());
    }

    #[tokio::test]
    async fn no_connect_in_time_closes_4002() {
        let cfg = WsConfig { handshake_timeout: Duration::from_millis(100), ..WsConfig::default() };
        let mut h = start_with(Codec::Json, FakeCore::new(), ConnInfo::default(), cfg).await;
        assert_eq!(disconnect_of(&h.recv_json().await), (4002, false));
        assert_eq!(h.recv_close().await, 4002);
        assert!(h.end().await.is_empty());
    }

    #[tokio::test]
    async fn malformed_frames_are_answered_and_connection_stays() {
        let mut h = start(Codec::Json, FakeCore::new()).await;
        h.connect().await;
        h.send_json("{").await;
        assert_eq!(error_of(&h.recv_json().await), (0, ErrorCode::BadFrame));
        h.send_json(r#"{"type":"publish","req":2}"#).await;
        assert_eq!(error_of(&h.recv_json().await), (0, ErrorCode::BadFrame));
        h.send_json(r#"{"type":"nope","req":3}"#).await;
        assert_eq!(error_of(&h.recv_json().await), (0, ErrorCode::UnknownFrame));
        h.send_json(r#"{"type":"publish","req":4,"channel":"a"}"#).await;
        let f = h.recv_json().await;
        assert!(matches!(f.frame, Some(Reply::PublishAck(_))) && f.req == 4, "{f:?}");
        h.send(Message::Close(None)).await;
        assert_eq!(h.end().await.last().map(String::as_str), Some("close 7 Clean"));
    }

    #[tokio::test]
    async fn binary_on_json_codec_closes_1003() {
        let mut h = start(Codec::Json, FakeCore::new()).await;
        h.connect().await;
        h.send(Message::binary(vec![1, 2, 3])).await;
        assert_eq!(h.recv_close().await, 1003);
        assert_eq!(h.end().await.last().map(String::as_str), Some("close 7 Abrupt"));
    }

    #[tokio::test]
    async fn oversize_message_closes_1009() {
        let cfg = WsConfig { max_frame_size: 1024, ..WsConfig::default() };
        let mut h = start_with(Codec::Json, FakeCore::new(), ConnInfo::default(), cfg).await;
        h.connect().await;
        let big = format!(r#"{{"type":"publish","channel":"a","text":"{}"}}"#, "x".repeat(2000));
        h.send_json(&big).await;
        assert_eq!(h.recv_close().await, 1009);
        assert_eq!(h.end().await.last().map(String::as_str), Some("close 7 Abrupt"));
    }

    #[tokio::test]
    async fn subscribe_replay_precedes_live_messages() {
        let core = FakeCore::new();
        *core.replay.lock() = vec![
            Outbound::Message(delivery("a", 1)),
            Outbound::Gap(proto::Gap { channel: "a".into(), reason: "trimmed".into(), ..Default::default() }),
            Outbound::Message(delivery("a", 2)),
        ];
        *core.live_on_subscribe.lock() = vec![Outbound::Message(delivery("a", 3))];
        let mut h = start(Codec::Json, core).await;
        h.connect().await;
        h.send_json(r#"{"type":"subscribe","req":2,"filter":"a"}"#).await;
        let f = h.recv_json().await;
        assert_eq!(f.req, 2);
        assert!(matches!(f.frame, Some(Reply::Subscribed(ref s)) if s.filter == "a"), "{f:?}");
        assert_eq!(serial_of(&h.recv_json().await), 1);
        let f = h.recv_json().await;
        assert!(matches!(f.frame, Some(Reply::Gap(ref g)) if g.reason == "trimmed"), "{f:?}");
        assert_eq!(serial_of(&h.recv_json().await), 2);
        assert_eq!(serial_of(&h.recv_json().await), 3);
        h.send(Message::Close(None)).await;
        h.end().await;
    }

    #[tokio::test]
    async fn deliveries_use_the_shared_encoding() {
        let core = FakeCore::new();
        let mut h = start(Codec::Json, core.clone()).await;
        h.connect().await;
        let d = delivery("a", 9);
        core.outbox.push(Outbound::Message(d.clone()), SlowPolicy::Disconnect);
        match h.recv().await {
            Some(Message::Text(t)) => assert_eq!(t, *d.ws_text()),
            other => panic!("{other:?}"),
        }
        h.send(Message::Close(None)).await;
        h.end().await;
    }

    #[tokio::test]
    async fn slow_consumer_gets_disconnect_then_4000() {
        let core = FakeCore::with(Outbox::new(200), None);
        let mut h = start(Codec::Json, core.clone()).await;
        h.connect().await;
        let big = Delivery::new(proto::Envelope {
            channel: "a".into(),
            payload: Bytes::from(vec![b'x'; 1000]),
            ..Default::default()
        });
        assert_eq!(core.outbox.push(Outbound::Message(big), SlowPolicy::Disconnect), crate::port::PushOutcome::Closed);
        let f = h.recv_json().await;
        let Some(Reply::Disconnect(d)) = f.frame else { panic!("{f:?}") };
        assert_eq!((d.code, d.reason.as_str(), d.reconnect), (4000, "slow consumer", true));
        assert_eq!(h.recv_close().await, 4000);
        let closes = {
            let calls = h.end().await;
            calls.into_iter().filter(|c| c.starts_with("close")).collect::<Vec<_>>()
        };
        assert_eq!(closes, vec!["close 7 Abrupt"]);
    }

    #[tokio::test]
    async fn shutdown_closes_1012() {
        let mut h = start(Codec::Json, FakeCore::new()).await;
        h.connect().await;
        h.shutdown.send(true).expect("server holds the receiver");
        assert_eq!(disconnect_of(&h.recv_json().await), (1012, true));
        assert_eq!(h.recv_close().await, 1012);
        let core = h.core.clone();
        h.end().await;
        assert_eq!(core.closes(), vec!["close 7 Abrupt"]);
    }

    #[tokio::test]
    async fn dropped_shutdown_sender_counts_as_shutdown() {
        let mut h = start(Codec::Json, FakeCore::new()).await;
        h.connect().await;
        let (tx, _) = watch::channel(false);
        drop(std::mem::replace(&mut h.shutdown, tx));
        assert_eq!(disconnect_of(&h.recv_json().await), (1012, true));
        assert_eq!(h.recv_close().await, 1012);
    }

    #[tokio::test]
    async fn clean_client_close_is_clean_exactly_once() {
        let mut h = start(Codec::Json, FakeCore::new()).await;
        h.connect().await;
        h.client
            .send(Message::Close(Some(CloseFrame { code: CloseCode::Normal, reason: "bye".into() })))
            .await
            .expect("send close");
        // The server echoes the close.
        assert_eq!(h.recv_close().await, 1000);
        let core = h.core.clone();
        h.end().await;
        assert_eq!(core.closes(), vec!["close 7 Clean"]);
    }

    #[tokio::test]
    async fn eof_without_close_is_abrupt() {
        let mut h = start(Codec::Json, FakeCore::new()).await;
        h.connect().await;
        let core = h.core.clone();
        drop(h.client);
        tokio::time::timeout(WAIT, h.task).await.expect("server task hung").expect("panicked");
        assert_eq!(core.closes(), vec!["close 7 Abrupt"]);
    }

    #[tokio::test]
    async fn refused_open_closes_4001_or_1008() {
        for (code, close) in [(ErrorCode::Unauthorized, 4001), (ErrorCode::PermissionDenied, 1008)] {
            let core = FakeCore::with(Outbox::new(1024), Some(CoreError::new(code, "no")));
            let mut h = start(Codec::Json, core).await;
            h.send_json(r#"{"type":"connect","req":1,"token":"bad"}"#).await;
            assert_eq!(error_of(&h.recv_json().await), (1, code));
            assert_eq!(disconnect_of(&h.recv_json().await), (close, false));
            assert_eq!(h.recv_close().await, close as u16);
            let calls = h.end().await;
            assert_eq!(calls, vec!["open Ws  bad"], "a refused session is never closed");
        }
    }

    #[tokio::test]
    async fn query_credentials_open_without_connect() {
        let info = ConnInfo { peer: None, token: String::new(), client_id: "q".into() };
        let mut h = start_with(Codec::Json, FakeCore::new(), info, WsConfig::default()).await;
        let f = h.recv_json().await;
        assert_eq!(f.req, 0);
        assert!(matches!(f.frame, Some(Reply::Connected(ref c)) if c.client_id == "q"), "{f:?}");
        h.send_json(r#"{"type":"publish","req":2,"channel":"a"}"#).await;
        assert!(matches!(h.recv_json().await.frame, Some(Reply::PublishAck(_))));
        h.send(Message::Close(None)).await;
        assert_eq!(h.end().await[0], "open Ws q ");
    }

    #[tokio::test]
    async fn idle_peer_is_pinged_then_dropped_4004() {
        let cfg = WsConfig { ping_interval: Duration::from_millis(100), ..WsConfig::default() };
        let mut h = start_with(Codec::Json, FakeCore::new(), ConnInfo::default(), cfg).await;
        h.connect().await;
        // Read the ping, then stay silent (the automatic pong is only sent
        // on the next read, which comes after the server gave up).
        let ping = tokio::time::timeout(WAIT, h.client.next()).await.expect("no ping");
        assert!(matches!(ping, Some(Ok(Message::Ping(_)))), "{ping:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(disconnect_of(&h.recv_json().await), (4004, true));
        assert_eq!(h.recv_close().await, 4004);
        assert_eq!(h.end().await.last().map(String::as_str), Some("close 7 Abrupt"));
    }

    #[tokio::test]
    async fn proto_codec_round_trip() {
        let core = FakeCore::new();
        let mut h = start(Codec::Proto, core.clone()).await;
        h.send_proto(1, client_frame::Frame::Connect(proto::Connect { token: String::new(), client_id: "bob".into() }))
            .await;
        let f = h.recv_proto().await;
        assert_eq!(f.req, 1);
        assert!(matches!(f.frame, Some(Reply::Connected(ref c)) if c.client_id == "bob"), "{f:?}");
        h.send_proto(
            2,
            client_frame::Frame::Publish(proto::Publish {
                channel: "a".into(),
                payload: Bytes::from_static(b"\x00\xff"),
                ..Default::default()
            }),
        )
        .await;
        let f = h.recv_proto().await;
        assert_eq!(f.req, 2);
        assert!(matches!(f.frame, Some(Reply::PublishAck(ref a)) if a.channel == "a"), "{f:?}");
        assert!(core.calls().contains(&"publish 7 a b\"\\0\\xff\"".to_string()), "{:?}", core.calls());

        let d = delivery("a", 4);
        core.outbox.push(Outbound::Message(d.clone()), SlowPolicy::Disconnect);
        match h.recv().await {
            Some(Message::Binary(b)) => {
                assert_eq!(b, *d.proto_frame());
                assert_eq!(
                    proto::ServerFrame::decode(b).map(|f| f.frame),
                    Ok(Some(Reply::Message(d.envelope.clone())))
                );
            }
            other => panic!("{other:?}"),
        }

        // Garbage and an empty frame are answered; the connection stays.
        h.send(Message::binary(vec![0xff, 0xff, 0xff])).await;
        assert_eq!(error_of(&h.recv_proto().await), (0, ErrorCode::BadFrame));
        h.send(Message::binary(proto::ClientFrame { req: 3, frame: None }.encode_to_vec())).await;
        assert_eq!(error_of(&h.recv_proto().await).1, ErrorCode::UnknownFrame);

        // Text on the proto codec is the wrong kind of data.
        h.send_json(r#"{"type":"ping"}"#).await;
        assert_eq!(h.recv_close().await, 1003);
        assert_eq!(h.end().await.last().map(String::as_str), Some("close 7 Abrupt"));
    }

    #[tokio::test]
    async fn serve_is_send() {
        fn is_send<T: Send>(_: &T) {}
        let cfg = WsConfig::default();
        let (server, _client) = pipe(&cfg).await;
        let core: Arc<dyn Core> = FakeCore::new();
        let fut = serve(server, Codec::Json, core, ConnInfo::default(), cfg, watch::channel(false).1);
        is_send(&fut);
        let (server, _client) = pipe(&WsConfig::default()).await;
        let echo = serve_echo(server, watch::channel(false).1);
        is_send(&echo);
    }

    async fn start_echo() -> (WebSocketStream<DuplexStream>, JoinHandle<()>, watch::Sender<bool>) {
        let cfg = WsConfig { max_frame_size: 4096, ..WsConfig::default() };
        let (server, client) = pipe(&cfg).await;
        let (tx, rx) = watch::channel(false);
        (client, tokio::spawn(serve_echo(server, rx)), tx)
    }

    async fn next(client: &mut WebSocketStream<DuplexStream>) -> Option<Message> {
        match tokio::time::timeout(WAIT, client.next()).await.expect("receive timed out") {
            Some(Ok(m)) => Some(m),
            _ => None,
        }
    }

    fn close_code(m: Option<Message>) -> u16 {
        match m {
            Some(Message::Close(Some(f))) => f.code.into(),
            other => panic!("expected a close frame, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn echo_is_byte_identical_and_answers_pings() {
        let (mut client, task, _tx) = start_echo().await;
        client.send(Message::text("héllo")).await.expect("send");
        assert_eq!(next(&mut client).await, Some(Message::text("héllo")));
        let binary = vec![0u8, 0xff, 0x80, b'a'];
        client.send(Message::binary(binary.clone())).await.expect("send");
        assert_eq!(next(&mut client).await, Some(Message::binary(binary)));
        client.send(Message::Ping(Bytes::from_static(b"p1"))).await.expect("send");
        assert_eq!(next(&mut client).await, Some(Message::Pong(Bytes::from_static(b"p1"))));
        client.send(Message::Close(None)).await.expect("send");
        assert!(matches!(next(&mut client).await, Some(Message::Close(_))));
        tokio::time::timeout(WAIT, task).await.expect("echo task hung").expect("panicked");
    }

    #[tokio::test]
    async fn echo_invalid_utf8_closes_1007() {
        let (mut client, task, _tx) = start_echo().await;
        // tungstenite will not build an invalid text message, so send a raw
        // (masked by the client) text frame.
        let frame = Frame::message(Bytes::from_static(b"ok\xff\xfe"), OpCode::Data(OpData::Text), true);
        client.send(Message::Frame(frame)).await.expect("send");
        assert_eq!(close_code(next(&mut client).await), 1007);
        tokio::time::timeout(WAIT, task).await.expect("echo task hung").expect("panicked");
    }

    #[tokio::test]
    async fn echo_hand_written_invalid_frame_closes_1007() {
        // The same with bytes written by hand: FIN+text, masked, length 2.
        let cfg = WsConfig::default();
        let (server_io, mut client_io) = tokio::io::duplex(64 * 1024);
        let server = WebSocketStream::from_raw_socket(server_io, Role::Server, Some(websocket_config(&cfg))).await;
        // Keep the sender: a dropped one means the gateway is stopping.
        let (_tx, rx) = watch::channel(false);
        let task = tokio::spawn(serve_echo(server, rx));
        let mask = [1u8, 2, 3, 4];
        let payload = [0xc3u8, 0x28]; // a broken two-byte sequence
        let mut raw = vec![0x81, 0x80 | payload.len() as u8];
        raw.extend_from_slice(&mask);
        raw.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        client_io.write_all(&raw).await.expect("write");
        let mut head = [0u8; 4];
        tokio::time::timeout(WAIT, client_io.read_exact(&mut head)).await.expect("timed out").expect("read");
        assert_eq!(head[0], 0x88, "an unmasked, final close frame");
        assert_eq!(u16::from_be_bytes([head[2], head[3]]), 1007);
        drop(client_io);
        tokio::time::timeout(WAIT, task).await.expect("echo task hung").expect("panicked");
    }

    #[tokio::test]
    async fn echo_oversize_closes_1009_and_shutdown_1012() {
        let (mut client, task, _tx) = start_echo().await;
        client.send(Message::binary(vec![0u8; 5000])).await.expect("send");
        assert_eq!(close_code(next(&mut client).await), 1009);
        tokio::time::timeout(WAIT, task).await.expect("echo task hung").expect("panicked");

        let (mut client, task, tx) = start_echo().await;
        tx.send(true).expect("echo holds the receiver");
        assert_eq!(close_code(next(&mut client).await), 1012);
        tokio::time::timeout(WAIT, task).await.expect("echo task hung").expect("panicked");
    }

    #[test]
    fn negotiate_picks_the_first_supported_offer() {
        assert_eq!(negotiate(None), Ok(None));
        assert_eq!(negotiate(Some("")), Ok(None));
        assert_eq!(negotiate(Some(" , ")), Ok(None));
        assert_eq!(negotiate(Some("switchboard.v1.json")), Ok(Some(Codec::Json)));
        assert_eq!(negotiate(Some("switchboard.v1.proto")), Ok(Some(Codec::Proto)));
        assert_eq!(negotiate(Some("foo, switchboard.v1.proto ,switchboard.v1.json")), Ok(Some(Codec::Proto)));
        assert_eq!(negotiate(Some("switchboard.v1.json, switchboard.v1.proto")), Ok(Some(Codec::Json)));
        let err = negotiate(Some("mqtt, Switchboard.v1.JSON")).unwrap_err();
        assert_eq!(err.offered, vec!["mqtt", "Switchboard.v1.JSON"]);
        assert!(err.to_string().contains("switchboard.v1.proto"), "{err}");
        for codec in [Codec::Json, Codec::Proto] {
            assert_eq!(negotiate(Some(codec.subprotocol())), Ok(Some(codec)));
        }
    }

    #[test]
    fn websocket_config_applies_limits() {
        let cfg = WsConfig::default();
        let ws = websocket_config(&cfg);
        assert_eq!(ws.read_buffer_size, 4 * 1024);
        assert_eq!(ws.write_buffer_size, 64 * 1024);
        assert_eq!(ws.max_message_size, Some(1024 * 1024));
        assert_eq!(ws.max_frame_size, Some(1024 * 1024));
        assert!(ws.max_write_buffer_size > ws.write_buffer_size);
        let dbg = format!("{:?}", ConnInfo { token: "secret".into(), ..ConnInfo::default() });
        assert!(!dbg.contains("secret"), "{dbg}");
    }

    /// Size of the future `f` returns for a `Conn` (without running it).
    fn future_size<C, Fut>(_f: impl FnOnce(C) -> Fut) -> usize {
        std::mem::size_of::<Fut>()
    }

    /// An idle connection's memory is mostly its task, and a task is as
    /// large as its future's largest state. The connection is held once
    /// (`run_to_end` is not an `async fn`, whose `mut self` would hold it
    /// twice), and the write path binds neither its frames nor its future
    /// (2 328 bytes for the whole future before, with a 784-byte `Conn`).
    #[test]
    fn an_idle_connection_task_holds_its_connection_once() {
        let conn = std::mem::size_of::<Conn<DuplexStream>>();
        let run = future_size(|c: &'static mut Conn<DuplexStream>| c.run());
        let whole = future_size(|c: Conn<DuplexStream>| c.run_to_end());
        assert!(run <= 640, "the session loop's future is {run} bytes");
        assert!(whole <= conn + run + 128, "the task's future is {whole} bytes (Conn {conn}, loop {run})");
    }
}
