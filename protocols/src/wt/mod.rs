//! WebTransport front end: sessions at `/v1/wt` over QUIC (HTTP/3).
//!
//! The gateway binds the UDP socket, runs the QUIC and HTTP/3 handshakes
//! (wtransport on quinn, with the shared certificate resolver) and hands
//! each session request to [`serve_request`]. From there this module owns
//! the session: it inspects the request, opens the core session, accepts or
//! refuses, then translates frames to core calls and the session's
//! [`Outbox`] to streams and datagrams.
//!
//! It deliberately does not: bind sockets, terminate TLS or count
//! connections per IP (the gateway does); authorise, route, validate
//! channels or store anything (the core does); or speak JSON (WebTransport
//! carries the protobuf frames only).
//!
//! # Session request
//!
//! Inspected before the session is accepted; a refusal is an HTTP response
//! on the CONNECT stream, never a QUIC error:
//!
//! | request | answer |
//! |---|---|
//! | `:path` other than `/v1/wt` (query aside) | 404 |
//! | an `Origin` that [`WtConfig::allowed_origins`] does not allow (a request without one is not a browser's, and goes on) | 403 |
//! | a token (`?token=` or `Authorization: Bearer`) or `?client_id=` the core refuses | 403 (429 for `rate_limited` / `unavailable`) |
//! | token auth ([`WtConfig::require_token`]) and no token, without `?auth=connect` | 403 |
//! | otherwise | 200: the session starts |
//!
//! With a token or client id in the request the core session opens before
//! the accept, and `connected` (`req` 0) is the first frame on the control
//! stream; a later `connect` gets `already_connected`. Without them the
//! first control frame must be `connect` (in token mode the request must
//! then say `?auth=connect`, for clients that keep tokens out of URLs).
//!
//! # Streams and framing
//!
//! Every stream carries length-delimited protobuf frames: a varint length
//! (prost's `encode_length_delimited`), then one message (see [`codec`]).
//!
//! | stream | opened by | carries |
//! |---|---|---|
//! | control (bidirectional) | the client, once, first | client→server `ClientFrame`s; server→client replies (`req` echoed), `error`s, `connected` (`req` 0) and the closing `disconnect` |
//! | channel (unidirectional) | the server, on a channel's first delivery | `ServerFrame`s `message` and `gap` of one channel, in serial order: the replay of a subscribe, then live messages |
//!
//! A bidirectional stream reaches the server only once the client writes on
//! it, so the client opens the control stream by writing its first frame.
//! Each channel has a stream of its own (up to
//! [`WtConfig::max_channel_streams`], after which channels share streams,
//! see [`streams`]), so a lost packet or a stalled reader on one channel
//! never delays another. Every frame names its channel (the envelope's or
//! the gap's `channel`): a client reads all incoming unidirectional streams
//! with the same loop. Across streams there is no order: `subscribed` may
//! arrive before or after the replay it announces.
//!
//! # Datagrams
//!
//! A subscribe with `delivery: DELIVERY_MODE_DATAGRAM` gets its live
//! messages as QUIC datagrams, one `ServerFrame{message}` each (no length
//! prefix; the envelope carries `epoch`, `serial` and `prev_serial`, so the
//! client sees exactly what it missed). A channel goes by datagram only
//! while no stream subscription of the session also matches it. Replays,
//! gaps, presence events and messages above the session's current maximum
//! datagram size go on the channel's stream. The datagram send buffer drops
//! the oldest datagrams when full: latest-value semantics.
//!
//! A client may publish as a datagram: one `ClientFrame{publish}`, QoS 0
//! (no ack). A refusal is reported as an `error` on the control stream when
//! the frame's `req` is not 0; other datagram frames are counted and
//! dropped.
//!
//! # Close codes
//!
//! A session the server ends gets a `disconnect` frame (`code`, `reason`,
//! `reconnect`) on the control stream when one exists (the server waits up
//! to one second for it to be acknowledged), then the QUIC connection closes
//! with the same number as its application error code and the reason as
//! its reason phrase. `core.close` runs exactly once per opened session.
//!
//! | code | reason | when | reconnect | `core.close` |
//! |---|---|---|---|---|
//! | — | — | the client closed the session or the control stream | — | `clean` |
//! | 1012 | `server shutting down` | the node is draining | yes | `abrupt` |
//! | 1002 | `protocol error` | a control-stream length prefix that is not a varint, or the client reset the control stream | no | `abrupt` |
//! | 1008 | the error code's name | the core refused a `connect` with any code but `unauthorized` | for `unavailable`, `rate_limited`, `internal` | — |
//! | 1009 | `message too large` | a control frame above [`WtConfig::max_frame_size`] | no | `abrupt` |
//! | 4000 | `slow consumer` | the outbox overflowed (`disconnect` policy), or a stream write made no progress for [`WtConfig::write_timeout`] | yes | `abrupt` |
//! | 4001 | `unauthorized` | the core refused a `connect` with `unauthorized` | no | — |
//! | 4002 | `connect expected` | no control stream, or no `connect`, within [`WtConfig::handshake_timeout`]; or the first frame was not a valid `connect` | no | — |
//! | 4003 | `disconnected by server` | an administrator kicked the session | no | `abrupt` |
//! | 4006 | `token expired` | the token expired without a refresh | yes, with a fresh token | `abrupt` |
//! | 4007 | `too many streams` | the client opened more than [`WtConfig::max_refused_streams`] streams besides the control stream | no | `abrupt` |
//! | 4008 | `stream stopped by client` | the client stopped (STOP_SENDING) a channel stream or the control stream | no | `abrupt` |
//! | none | — | connection lost or idle timeout: nothing can be sent | — | `abrupt` |
//!
//! Streams the client opens besides the control stream are refused one by
//! one: stopped (and, if bidirectional, reset) with WebTransport
//! application error code 1, sent as HTTP/3 code
//! `0x52e4a40fa8db + 1 + 1/0x1e` ([`stream_error_code`]).
//!
//! # Error frames
//!
//! As on WebSocket (docs/protocol.md): `bad_frame` (undecodable protobuf,
//! `req` 0), `unknown_frame` (no body set), `not_connected`,
//! `already_connected`, and every core code with the request's `req`.
//! Before the session opens, `bad_frame`, `unknown_frame` and
//! `not_connected` close with 4002.
//!
//! # Metrics (label `protocol="wt"`)
//!
//! `switchboard_messages_out_total`, `switchboard_bytes_out_total`,
//! `switchboard_bytes_in_total`, `switchboard_frames_in_total`,
//! `switchboard_datagrams_out_total`, `switchboard_datagrams_in_total`,
//! `switchboard_datagram_fallbacks_total` (datagram deliveries sent on the
//! stream for size), and `switchboard_protocol_errors_total` with `code` =
//! `bad_frame`, `unknown_frame`, `message_too_large`, `protocol_error`,
//! `refused_stream` or `bad_datagram`. Refused session requests count in
//! `switchboard_connections_refused_total{listener="quic", reason}` with
//! `reason` = `not_found`, `forbidden_origin`, `missing_token` or the core's
//! error code; a `forbidden_origin` also counts in
//! `switchboard_origin_refused_total{route="wt"}` and logs (see
//! [`crate::origin`]).

pub mod codec;
pub mod streams;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use metrics::Counter;
use prost::Message as _;
use switchboard_proto as proto;
use switchboard_proto::server_frame::Frame as Reply;
use switchboard_proto::topic::filter_matches;
use switchboard_proto::{DeliveryMode, ErrorCode, client_frame};
use tokio::sync::watch;
use tokio::time::Sleep;
use tracing::{Instrument, Span, debug, error};
use wtransport::endpoint::SessionRequest;
use wtransport::error::{ConnectionError, SendDatagramError};
use wtransport::{Connection, RecvStream, SendStream, VarInt};

use self::codec::FrameError;
use self::streams::{Action, ChannelStreams};
use crate::arrival::ArrivalClock;
use crate::frames::{Answer, Counters, Session, answer, connected, refusal};
use crate::origin::OriginPolicy;
use crate::port::{CloseKind, CloseReason, Core, CoreError, OpenSession, Outbound, Outbox};

/// The path of Switchboard sessions.
pub const PATH: &str = "/v1/wt";

/// Tunables of the WebTransport front end.
#[derive(Clone, Debug)]
pub struct WtConfig {
    /// The control stream, and `connect` when the request carried no
    /// credentials, must arrive within this long (default 10 s).
    pub handshake_timeout: Duration,
    /// A stream write (or open) that makes no progress for this long ends the
    /// session as a slow consumer (default 10 s).
    pub write_timeout: Duration,
    /// Largest control frame accepted (default 1 MiB); larger closes 1009.
    pub max_frame_size: usize,
    /// Bytes the session may hold in its stream buffers (default 1 MiB).
    /// Past it the session stops draining its outbox, which then fills and
    /// applies the channel's slow-consumer policy.
    pub max_buffered: usize,
    /// Channels with a stream of their own (default 64, below the 100
    /// concurrent unidirectional streams browsers grant); further channels
    /// share them.
    pub max_channel_streams: usize,
    /// Extra client streams refused before the session is closed with 4007
    /// (default 16).
    pub max_refused_streams: u32,
    /// Token auth: a request without a token (and without `?auth=connect`)
    /// is refused with 403.
    pub require_token: bool,
    /// Pages allowed to open sessions ([`OriginPolicy`], the gateway's one
    /// allow-list); a request without an `Origin` is not a browser's and
    /// is not affected.
    pub allowed_origins: OriginPolicy,
}

impl Default for WtConfig {
    fn default() -> Self {
        WtConfig {
            handshake_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            max_frame_size: 1024 * 1024,
            max_buffered: 1024 * 1024,
            max_channel_streams: 64,
            max_refused_streams: 16,
            require_token: false,
            allowed_origins: OriginPolicy::any(),
        }
    }
}

/// Sent when the client opened too many streams of its own.
pub const TOO_MANY_STREAMS: CloseReason = CloseReason { code: 4007, reason: "too many streams", reconnect: false };
/// Sent when the client stopped a stream the server writes.
pub const STREAM_STOPPED: CloseReason =
    CloseReason { code: 4008, reason: "stream stopped by client", reconnect: false };
/// A control-stream framing violation.
pub const PROTOCOL_ERROR: CloseReason = CloseReason { code: 1002, reason: "protocol error", reconnect: false };
/// A control frame above the limit.
pub const MESSAGE_TOO_LARGE: CloseReason = CloseReason { code: 1009, reason: "message too large", reconnect: false };

/// WebTransport application error code for a refused client stream.
pub const REFUSED_STREAM: u32 = 1;

/// The HTTP/3 error code that carries WebTransport application error code
/// `code` on a stream reset or stop (draft-ietf-webtrans-http3, "Resetting
/// Data Streams"): `0x52e4a40fa8db + code + code / 0x1e`.
pub fn stream_error_code(code: u32) -> u64 {
    0x52e4_a40f_a8db + u64::from(code) + u64::from(code) / 0x1e
}

/// Who may open a session, as read from the request.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    /// `?token=` or `Authorization: Bearer`; empty if absent.
    pub token: String,
    /// `?client_id=`; empty if absent.
    pub client_id: String,
}

impl std::fmt::Debug for Credentials {
    // Hand-written so that a token never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("token", &if self.token.is_empty() { "" } else { "<redacted>" })
            .field("client_id", &self.client_id)
            .finish()
    }
}

impl Credentials {
    /// Whether the request carries anything to open the session with.
    pub fn present(&self) -> bool {
        !self.token.is_empty() || !self.client_id.is_empty()
    }
}

/// Why a session request is refused before the accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 404: not `/v1/wt`.
    NotFound,
    /// 403, with the label counted in metrics.
    Forbidden(&'static str),
    /// 429, with the label counted in metrics.
    TooManyRequests(&'static str),
}

impl Refusal {
    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::NotFound => "not_found",
            Refusal::Forbidden(l) | Refusal::TooManyRequests(l) => l,
        }
    }

    /// The refusal for a core error on open.
    fn of(e: &CoreError) -> Refusal {
        match e.code {
            ErrorCode::RateLimited | ErrorCode::Unavailable => Refusal::TooManyRequests(e.code.slug()),
            code => Refusal::Forbidden(code.slug()),
        }
    }
}

/// Longest `:path` (with its query) a request may have.
const MAX_PATH_LEN: usize = 8 * 1024;

/// Decides on a session request from its `:path` (with query), `Origin` and
/// headers (lowercase names). Pure.
///
/// | request | result |
/// |---|---|
/// | `/v1/wt?token=T` | `Ok` with token `T` |
/// | `/v1/wt` + `authorization: Bearer T` | `Ok` with token `T` (the query wins) |
/// | `/v1/wt?client_id=a` | `Ok` with client id `a` |
/// | `/v1/wt` in token mode | `Err(Forbidden("missing_token"))` |
/// | `/v1/wt?auth=connect` in token mode | `Ok`, no credentials: `connect` must follow |
/// | `/other`, `/v1/wt/x`, `/v1/ws` | `Err(NotFound)` |
pub fn inspect_request(
    path: &str,
    origin: Option<&str>,
    headers: &HashMap<String, String>,
    cfg: &WtConfig,
) -> Result<Credentials, Refusal> {
    let (route, query) = path.split_once('?').unwrap_or((path, ""));
    if route != PATH || path.len() > MAX_PATH_LEN {
        return Err(Refusal::NotFound);
    }
    if !cfg.allowed_origins.allows(origin) {
        return Err(Refusal::Forbidden("forbidden_origin"));
    }
    let mut creds = Credentials::default();
    let mut deferred = false;
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "token" => creds.token = v.into_owned(),
            "client_id" => creds.client_id = v.into_owned(),
            "auth" => deferred = v == "connect",
            // Unknown parameters (cache busters) are harmless.
            _ => {}
        }
    }
    if creds.token.is_empty()
        && let Some(bearer) = headers.get("authorization").and_then(|h| h.strip_prefix("Bearer "))
    {
        creds.token = bearer.trim().to_string();
    }
    if cfg.require_token && creds.token.is_empty() && !deferred {
        return Err(Refusal::Forbidden("missing_token"));
    }
    Ok(creds)
}

fn count_refusal(why: Refusal) {
    metrics::counter!("switchboard_connections_refused_total", "listener" => "quic", "reason" => why.label())
        .increment(1);
}

fn protocol_error(code: &'static str) {
    // Rare, so looking the handle up here is fine.
    metrics::counter!("switchboard_protocol_errors_total", "protocol" => "wt", "code" => code).increment(1);
}

/// Serves one session request to the end: inspects it, opens the core
/// session if it carries credentials, answers 404/403/429 or accepts, then
/// runs the session. `shutdown` flips to true when the gateway stops (a
/// dropped sender counts as stopping).
///
/// Never panics on network input; every way it ends is in the module's
/// tables.
pub async fn serve_request(
    request: SessionRequest,
    core: Arc<dyn Core>,
    cfg: WtConfig,
    shutdown: watch::Receiver<bool>,
) {
    let peer = request.remote_address();
    let span = tracing::info_span!("wt", %peer, protocol = "wt", client_id = tracing::field::Empty);
    let inner = span.clone();
    async move {
        let limit = cfg.write_timeout;
        let refuse = |why: Refusal, request: SessionRequest| async move {
            count_refusal(why);
            debug!(reason = why.label(), "session request refused");
            let answer = async {
                match why {
                    Refusal::NotFound => request.not_found().await,
                    Refusal::Forbidden(_) => request.forbidden().await,
                    Refusal::TooManyRequests(_) => request.too_many_requests().await,
                }
            };
            let _ = tokio::time::timeout(limit, answer).await;
        };
        let creds = match inspect_request(request.path(), request.origin(), request.headers(), &cfg) {
            Ok(c) => c,
            Err(why) => {
                if why == Refusal::Forbidden("forbidden_origin") {
                    crate::origin::refused("wt", request.origin().unwrap_or_default(), Some(peer));
                }
                return refuse(why, request).await;
            }
        };
        let mut session = None;
        if creds.present() {
            let open = OpenSession {
                protocol: proto::Protocol::Wt,
                client_id: creds.client_id,
                token: creds.token,
                peer: Some(peer),
                cert_identity: None,
            };
            match core.open(open).await {
                Ok(handle) => {
                    inner.record("client_id", handle.client_id.as_str());
                    session = Some(Session { handle, core: Arc::clone(&core), end: CloseKind::Abrupt });
                }
                Err(e) => {
                    debug!(code = e.code.slug(), error = %e, "session refused");
                    return refuse(Refusal::of(&e), request).await;
                }
            }
        }
        let conn = match tokio::time::timeout(limit, request.accept()).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return debug!(error = %e, "session accept failed"),
            Err(_) => return debug!("session accept timed out"),
        };
        debug!("session accepted");
        Conn::new(conn, core, cfg, shutdown, inner, peer, session).run_to_end().await;
    }
    .instrument(span)
    .await;
}

/// Why a session ends, decided once; [`Conn::finish`] acts on it.
#[derive(Debug)]
enum Stop {
    /// The server ends it: `disconnect` frame, then the close.
    Close(CloseReason),
    /// The client closed the session or its control stream.
    PeerClosed,
    /// The connection is gone: nothing more can be sent.
    Gone,
}

/// How a connection-level error ends the session.
fn connection_stop(e: &ConnectionError) -> Stop {
    match e {
        ConnectionError::ApplicationClosed(close) => {
            debug!(code = %close.code(), "client closed the session");
            Stop::PeerClosed
        }
        ConnectionError::TimedOut => {
            debug!("idle timeout");
            Stop::Gone
        }
        e => {
            debug!(error = %e, "connection ended");
            Stop::Gone
        }
    }
}

/// A failed stream open or write.
#[derive(Debug)]
enum IoFail {
    /// No progress within the write timeout.
    Timeout,
    /// The client stopped the stream (STOP_SENDING).
    Stopped(u64),
    /// The connection is gone.
    Lost,
}

impl From<wtransport::quinn::WriteError> for IoFail {
    fn from(e: wtransport::quinn::WriteError) -> Self {
        match e {
            wtransport::quinn::WriteError::Stopped(code) => IoFail::Stopped(code.into_inner()),
            _ => IoFail::Lost,
        }
    }
}

/// A finished stream operation, with the stream handed back.
enum IoDone {
    /// A channel stream opened (or not).
    Opened { slot: usize, result: Result<SendStream, IoFail> },
    /// A write finished on channel stream `slot`, or on the control stream
    /// when `slot` is `None`.
    Written { slot: Option<usize>, stream: SendStream, result: Result<(), IoFail> },
}

/// What woke the session task.
enum Event {
    Shutdown,
    Deadline,
    Io(IoDone),
    Control(Result<Option<Bytes>, wtransport::quinn::ReadError>),
    Outbox,
    Bidi(Result<(SendStream, RecvStream), ConnectionError>),
    Uni(Result<RecvStream, ConnectionError>),
    Datagram(Result<wtransport::datagram::Datagram, ConnectionError>),
}

/// How long the server waits for its closing frames to be acknowledged.
const CLOSE_LINGER: Duration = Duration::from_secs(1);
/// Bytes asked of the control stream per read.
const READ_CHUNK: usize = 64 * 1024;
/// Pending control output above which the control stream is not read: a
/// client that does not read its replies stops being served requests.
const CONTROL_HIGH_WATER: usize = 256 * 1024;
/// Capacity a drained buffer may keep between batches.
const KEEP_CAPACITY: usize = 4 * 1024;
/// Slots the drain buffer keeps between batches.
const KEEP_BUFFERED_ITEMS: usize = 64;
/// Datagrams handled per wake-up, so a flood cannot starve the rest.
const MAX_DATAGRAMS_PER_BATCH: usize = 64;
/// Priority of the control stream over channel streams (quinn sends
/// higher first): replies never queue behind bulk deliveries.
const CONTROL_PRIORITY: i32 = 1;

/// Waits for the outbox, or forever before the session opens.
async fn outbox_ready(outbox: Option<&Outbox>) {
    match outbox {
        Some(o) => o.ready().await,
        None => std::future::pending().await,
    }
}

/// The next chunk of the control stream, or forever without one.
async fn read_control(recv: Option<&mut RecvStream>) -> Result<Option<Bytes>, wtransport::quinn::ReadError> {
    match recv {
        Some(r) => r.quic_stream_mut().read_chunk(READ_CHUNK, true).await.map(|c| c.map(|c| c.bytes)),
        None => std::future::pending().await,
    }
}

/// Filters of the session by delivery mode, to route each live message.
#[derive(Debug, Default)]
struct Modes {
    stream: Vec<String>,
    datagram: Vec<String>,
}

/// The filter a (possibly shared) subscription matches channels with.
fn match_part(filter: &str) -> &str {
    match filter.strip_prefix("$share/") {
        Some(rest) => rest.split_once('/').map_or(rest, |(_, f)| f),
        None => filter,
    }
}

impl Modes {
    fn set(&mut self, filter: &str, mode: DeliveryMode) {
        self.remove(filter);
        match mode {
            DeliveryMode::Datagram => self.datagram.push(filter.to_string()),
            DeliveryMode::Stream => self.stream.push(filter.to_string()),
        }
    }

    fn remove(&mut self, filter: &str) {
        self.stream.retain(|f| f != filter);
        self.datagram.retain(|f| f != filter);
    }

    /// Whether live messages of `channel` go by datagram: a datagram
    /// subscription matches it and no stream subscription does.
    fn is_datagram(&self, channel: &str) -> bool {
        let matches = |f: &String| filter_matches(match_part(f), channel);
        !self.datagram.is_empty() && self.datagram.iter().any(matches) && !self.stream.iter().any(matches)
    }
}

/// Datagram counter handles, looked up once per session.
struct DatagramCounters {
    out: Counter,
    inbound: Counter,
    fallbacks: Counter,
}

impl DatagramCounters {
    fn new() -> Self {
        DatagramCounters {
            out: metrics::counter!("switchboard_datagrams_out_total", "protocol" => "wt"),
            inbound: metrics::counter!("switchboard_datagrams_in_total", "protocol" => "wt"),
            fallbacks: metrics::counter!("switchboard_datagram_fallbacks_total", "protocol" => "wt"),
        }
    }
}

/// One session's state. Deadlines and buffers live here, not in futures
/// that the `select!` could drop.
struct Conn {
    conn: Connection,
    core: Arc<dyn Core>,
    cfg: WtConfig,
    shutdown: watch::Receiver<bool>,
    span: Span,
    peer: SocketAddr,
    session: Option<Session>,
    /// Read side of the control stream, once the client opened it.
    ctl_recv: Option<RecvStream>,
    /// Write side of the control stream while no write is in flight.
    ctl_send: Option<SendStream>,
    /// A control write is in flight (it holds the send stream).
    ctl_writing: bool,
    /// Encoded control frames for the next write.
    ctl_out: BytesMut,
    /// Control bytes received and not yet a whole frame.
    ctl_in: BytesMut,
    streams: ChannelStreams,
    /// Channel send streams by slot, while no write is in flight on them.
    sends: Vec<Option<SendStream>>,
    /// Stream opens and writes in flight.
    io: FuturesUnordered<BoxFuture<'static, IoDone>>,
    modes: Modes,
    /// Reused buffers for outbox drains and stream actions.
    drained: Vec<Outbound>,
    actions: Vec<Action>,
    /// The handshake deadline (control stream, and the session).
    deadline: Pin<Box<Sleep>>,
    deadline_armed: bool,
    refused_streams: u32,
    counters: Counters,
    datagrams: DatagramCounters,
    /// When the control stream's bytes being handled arrived
    /// ([`crate::arrival`]): a `subscribe` is in effect from then.
    arrival: ArrivalClock,
}

impl Conn {
    fn new(
        conn: Connection,
        core: Arc<dyn Core>,
        cfg: WtConfig,
        shutdown: watch::Receiver<bool>,
        span: Span,
        peer: SocketAddr,
        session: Option<Session>,
    ) -> Conn {
        let mut c = Conn {
            conn,
            core,
            streams: ChannelStreams::new(cfg.max_channel_streams),
            deadline: Box::pin(tokio::time::sleep(cfg.handshake_timeout)),
            deadline_armed: true,
            arrival: ArrivalClock::default(),
            cfg,
            shutdown,
            span,
            peer,
            session: None,
            ctl_recv: None,
            ctl_send: None,
            ctl_writing: false,
            ctl_out: BytesMut::new(),
            ctl_in: BytesMut::new(),
            sends: Vec::new(),
            io: FuturesUnordered::new(),
            modes: Modes::default(),
            drained: Vec::new(),
            actions: Vec::new(),
            refused_streams: 0,
            counters: Counters::new("wt"),
            datagrams: DatagramCounters::new(),
        };
        if let Some(s) = session {
            // Opened from the request: `connected` is the first frame the
            // control stream carries.
            c.push_reply(0, connected(&s.handle));
            c.session = Some(s);
        }
        c
    }

    async fn run_to_end(mut self) {
        let stop = self.run().await;
        self.finish(stop).await;
        // `self.session` drops here: core.close(.., clean or abrupt).
    }

    async fn run(&mut self) -> Stop {
        if *self.shutdown.borrow_and_update() {
            return Stop::Close(CloseReason::SHUTDOWN);
        }
        loop {
            let can_read = self.ctl_recv.is_some() && self.ctl_out.len() < CONTROL_HIGH_WATER;
            let event = tokio::select! {
                // Biased so shutdown and deadlines win over a busy peer. The
                // control stream comes before finished writes so a busy fan-out
                // cannot starve requests; a client flooding requests is held
                // back by CONTROL_HIGH_WATER, which lets the writes through.
                biased;
                changed = self.shutdown.changed() => match changed {
                    Ok(()) if !*self.shutdown.borrow_and_update() => continue,
                    _ => Event::Shutdown,
                },
                () = &mut self.deadline, if self.deadline_armed => Event::Deadline,
                chunk = self.arrival.stamped(read_control(self.ctl_recv.as_mut())), if can_read => Event::Control(chunk),
                Some(done) = self.io.next(), if !self.io.is_empty() => Event::Io(done),
                // Also while over `max_buffered` (when pump does not drain):
                // the wake-up that matters then is the outbox closing.
                () = outbox_ready(self.session.as_ref().map(|s| &*s.handle.outbox)) => Event::Outbox,
                bi = self.conn.accept_bi() => Event::Bidi(bi),
                uni = self.conn.accept_uni() => Event::Uni(uni),
                dg = self.conn.receive_datagram() => Event::Datagram(dg),
            };
            let handled = match event {
                Event::Shutdown => Err(Stop::Close(CloseReason::SHUTDOWN)),
                Event::Deadline => {
                    debug!(timeout = ?self.cfg.handshake_timeout, "no control stream or connect in time");
                    Err(Stop::Close(CloseReason::CONNECT_EXPECTED))
                }
                Event::Io(done) => self.on_io(done),
                Event::Control(chunk) => {
                    self.arrival.read_done();
                    self.on_control(chunk).await
                }
                // Draining below is all an outbox wake-up needs.
                Event::Outbox => Ok(()),
                Event::Bidi(bi) => self.on_bidi(bi),
                Event::Uni(uni) => self.on_uni(uni),
                Event::Datagram(dg) => self.on_datagrams(dg).await,
            };
            if let Err(stop) = handled.and_then(|()| self.pump()) {
                return stop;
            }
            if self.deadline_armed && self.session.is_some() && self.ctl_recv.is_some() {
                self.deadline_armed = false;
            }
        }
    }

    /// Drains the outbox into streams and datagrams, then starts every
    /// stream open and write that can start. Never waits.
    fn pump(&mut self) -> Result<(), Stop> {
        if let Some(s) = &self.session {
            let outbox = &s.handle.outbox;
            if self.streams.queued_bytes() < self.cfg.max_buffered {
                outbox.drain(&mut self.drained).map_err(Stop::Close)?;
            } else if let Some(reason) = outbox.closed() {
                return Err(Stop::Close(reason));
            }
        }
        let mut drained = std::mem::take(&mut self.drained);
        let mut deliveries = 0u64;
        for item in drained.drain(..) {
            if matches!(item, Outbound::Message(_)) {
                deliveries += 1;
            }
            self.route(item, true);
        }
        if drained.capacity() > KEEP_BUFFERED_ITEMS {
            drained.shrink_to(KEEP_BUFFERED_ITEMS);
        }
        self.drained = drained;
        self.counters.messages_out.increment(deliveries);
        self.start_io()
    }

    /// Sends one outbox item: a live message of a datagram channel as a
    /// datagram (when `live` and it fits), everything else on the channel's
    /// stream.
    fn route(&mut self, item: Outbound, live: bool) {
        match item {
            Outbound::Message(d) => {
                let frame = d.proto_frame();
                if live && self.modes.is_datagram(d.channel()) {
                    if self.send_datagram(frame) {
                        return;
                    }
                    self.datagrams.fallbacks.increment(1);
                }
                self.counters.bytes_out.increment(frame.len() as u64);
                self.streams.queue(d.channel(), frame);
            }
            Outbound::Gap(g) => {
                let channel = g.channel.clone();
                let frame = proto::encode_server_frame(&proto::ServerFrame { req: 0, frame: Some(Reply::Gap(g)) });
                self.counters.bytes_out.increment(frame.len() as u64);
                self.streams.queue(&channel, &frame);
            }
        }
    }

    /// Sends a message frame as one datagram; false if it cannot go that
    /// way (too large for the path now, or datagrams unsupported).
    fn send_datagram(&mut self, frame: &Bytes) -> bool {
        if self.conn.max_datagram_size().is_none_or(|max| frame.len() > max) {
            return false;
        }
        match self.conn.send_datagram(frame) {
            Ok(()) => {
                self.datagrams.out.increment(1);
                self.counters.bytes_out.increment(frame.len() as u64);
                true
            }
            // The connection is going; the next read reports it.
            Err(SendDatagramError::NotConnected) => true,
            Err(SendDatagramError::TooLarge | SendDatagramError::UnsupportedByPeer) => false,
        }
    }

    /// Starts stream opens and writes (channel streams, then the control
    /// stream) without waiting for any.
    fn start_io(&mut self) -> Result<(), Stop> {
        let limit = self.cfg.write_timeout;
        self.streams.actions(&mut self.actions);
        for action in self.actions.drain(..) {
            match action {
                Action::Open(slot) => {
                    let conn = self.conn.clone();
                    self.io.push(
                        async move {
                            let open = async {
                                let opening = conn.open_uni().await.map_err(|_| IoFail::Lost)?;
                                opening.await.map_err(|e| match e {
                                    wtransport::error::StreamOpeningError::Refused => IoFail::Stopped(0),
                                    wtransport::error::StreamOpeningError::NotConnected => IoFail::Lost,
                                })
                            };
                            let result = tokio::time::timeout(limit, open).await.unwrap_or(Err(IoFail::Timeout));
                            IoDone::Opened { slot, result }
                        }
                        .boxed(),
                    );
                }
                Action::Write(slot, data) => {
                    let Some(stream) = self.sends.get_mut(slot).and_then(Option::take) else {
                        error!(slot, "write on a stream that is not idle");
                        return Err(Stop::Gone);
                    };
                    self.io.push(write(Some(slot), stream, data, limit));
                }
            }
        }
        if !self.ctl_out.is_empty()
            && !self.ctl_writing
            && let Some(stream) = self.ctl_send.take()
        {
            self.ctl_writing = true;
            let data = self.ctl_out.split().freeze();
            if self.ctl_out.capacity() > KEEP_CAPACITY {
                self.ctl_out = BytesMut::new();
            }
            self.io.push(write(None, stream, data, limit));
        }
        Ok(())
    }

    fn on_io(&mut self, done: IoDone) -> Result<(), Stop> {
        let fail = |f: IoFail, what: &'static str| match f {
            IoFail::Timeout => {
                debug!(stream = what, timeout = ?self.cfg.write_timeout, "no write progress; slow consumer");
                Stop::Close(CloseReason::SLOW)
            }
            IoFail::Stopped(code) => {
                debug!(stream = what, code, "client stopped a server stream");
                Stop::Close(STREAM_STOPPED)
            }
            IoFail::Lost => Stop::Gone,
        };
        match done {
            IoDone::Opened { slot, result } => {
                let stream = result.map_err(|f| fail(f, "channel"))?;
                if self.sends.len() <= slot {
                    self.sends.resize_with(slot + 1, || None);
                }
                self.sends[slot] = Some(stream);
                self.streams.opened(slot);
            }
            IoDone::Written { slot: Some(slot), stream, result } => {
                result.map_err(|f| fail(f, "channel"))?;
                self.sends[slot] = Some(stream);
                self.streams.written(slot);
            }
            IoDone::Written { slot: None, stream, result } => {
                result.map_err(|f| fail(f, "control"))?;
                self.ctl_send = Some(stream);
                self.ctl_writing = false;
            }
        }
        Ok(())
    }

    fn on_bidi(&mut self, bi: Result<(SendStream, RecvStream), ConnectionError>) -> Result<(), Stop> {
        let (send, recv) = bi.map_err(|e| connection_stop(&e))?;
        if self.ctl_recv.is_none() {
            if send.quic_stream().set_priority(CONTROL_PRIORITY).is_err() {
                debug!("control stream closed before use");
            }
            self.ctl_send = Some(send);
            self.ctl_recv = Some(recv);
            debug!("control stream open");
            return Ok(());
        }
        let mut send = send;
        let _ = send.reset(refused_code());
        self.refuse_stream(recv)
    }

    fn on_uni(&mut self, uni: Result<RecvStream, ConnectionError>) -> Result<(), Stop> {
        let recv = uni.map_err(|e| connection_stop(&e))?;
        self.refuse_stream(recv)
    }

    /// Refuses a stream the client opened besides the control stream; too
    /// many end the session.
    fn refuse_stream(&mut self, recv: RecvStream) -> Result<(), Stop> {
        recv.stop(refused_code());
        protocol_error("refused_stream");
        self.refused_streams += 1;
        if self.refused_streams > self.cfg.max_refused_streams {
            debug!(refused = self.refused_streams, "too many client streams");
            return Err(Stop::Close(TOO_MANY_STREAMS));
        }
        debug!("refused a client stream besides the control stream");
        Ok(())
    }

    async fn on_control(&mut self, chunk: Result<Option<Bytes>, wtransport::quinn::ReadError>) -> Result<(), Stop> {
        use wtransport::quinn::ReadError;
        let bytes = match chunk {
            Ok(Some(bytes)) => bytes,
            Ok(None) => {
                debug!("client finished the control stream");
                return Err(Stop::PeerClosed);
            }
            Err(ReadError::Reset(code)) => {
                debug!(%code, "client reset the control stream");
                protocol_error("protocol_error");
                return Err(Stop::Close(PROTOCOL_ERROR));
            }
            Err(ReadError::ConnectionLost(e)) => {
                return Err(match e {
                    wtransport::quinn::ConnectionError::ApplicationClosed(_) => Stop::PeerClosed,
                    e => {
                        debug!(error = %e, "connection lost");
                        Stop::Gone
                    }
                });
            }
            Err(e) => {
                debug!(error = %e, "control stream read failed");
                return Err(Stop::Gone);
            }
        };
        self.ctl_in.extend_from_slice(&bytes);
        loop {
            let body = match codec::split_frame(&mut self.ctl_in, self.cfg.max_frame_size) {
                Ok(Some(body)) => body,
                Ok(None) => break,
                Err(e @ FrameError::TooLarge { .. }) => {
                    debug!(error = %e, "control frame too large");
                    protocol_error("message_too_large");
                    return Err(Stop::Close(MESSAGE_TOO_LARGE));
                }
                Err(e @ FrameError::BadPrefix) => {
                    debug!(error = %e, "control stream framing broken");
                    protocol_error("protocol_error");
                    return Err(Stop::Close(PROTOCOL_ERROR));
                }
            };
            self.counters.count_in(body.len());
            match proto::ClientFrame::decode(body) {
                Ok(frame) => self.on_frame(frame).await?,
                Err(e) => self.bad_frame(ErrorCode::BadFrame, format!("malformed protobuf frame: {e}"))?,
            }
        }
        if self.ctl_in.is_empty() && self.ctl_in.capacity() > KEEP_CAPACITY {
            self.ctl_in = BytesMut::new();
        }
        Ok(())
    }

    /// Answers an undecodable frame. Before `connect` that ends the session:
    /// the client is not speaking our protocol.
    fn bad_frame(&mut self, code: ErrorCode, message: String) -> Result<(), Stop> {
        debug!(code = code.slug(), %message, "bad frame");
        protocol_error(code.slug());
        // The request id is lost with the frame.
        self.push_error(0, code, message);
        match self.session {
            Some(_) => Ok(()),
            None => Err(Stop::Close(CloseReason::CONNECT_EXPECTED)),
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
            return Err(Stop::Close(CloseReason::CONNECT_EXPECTED));
        };
        let id = session.handle.id;
        // Delivery modes are the front end's business: note them before the
        // core sees the subscribe, apply them once it agreed.
        let mode_change = match &frame {
            client_frame::Frame::Subscribe(s) => Some((s.filter.clone(), Some(s.delivery()))),
            client_frame::Frame::Unsubscribe(u) => Some((u.filter.clone(), None)),
            _ => None,
        };
        // A history page is built and encoded in its turn (crate::heavy).
        let _turn = match &frame {
            client_frame::Frame::History(_) => crate::heavy::turn().await,
            _ => None,
        };
        match answer(self.core.as_ref(), id, frame, self.arrival.arrived()).await {
            Ok(Answer::Reply(body)) => {
                if let Some((filter, None)) = mode_change {
                    self.modes.remove(&filter);
                }
                self.push_reply(req, *body);
            }
            Ok(Answer::Subscribed(outcome)) => {
                if let Some((filter, Some(mode))) = mode_change {
                    self.modes.set(&filter, mode);
                }
                self.push_reply(req, Reply::Subscribed(outcome.subscribed));
                // The replay goes on the channel streams ahead of the outbox
                // drain that follows: the core queued live messages after it.
                let mut replayed = 0u64;
                for item in outcome.replay {
                    if matches!(item, Outbound::Message(_)) {
                        replayed += 1;
                    }
                    self.route(item, false);
                }
                self.counters.messages_out.increment(replayed);
            }
            Err(e) => {
                debug!(req, code = e.code.slug(), error = %e, "request refused");
                self.push_error(req, e.code, e.message);
            }
        }
        Ok(())
    }

    /// Asks the core for a session on `connect`; a refusal ends the session.
    async fn open(&mut self, req: u64, client_id: String, token: String) -> Result<(), Stop> {
        let request =
            OpenSession { protocol: proto::Protocol::Wt, client_id, token, peer: Some(self.peer), cert_identity: None };
        match self.core.open(request).await {
            Ok(handle) => {
                self.span.record("client_id", handle.client_id.as_str());
                debug!(connection_id = %handle.connection_id, "session opened");
                self.push_reply(req, connected(&handle));
                self.session = Some(Session { handle, core: Arc::clone(&self.core), end: CloseKind::Abrupt });
                Ok(())
            }
            Err(e) => {
                debug!(code = e.code.slug(), error = %e, "session refused");
                let reason = refusal(e.code);
                self.push_error(req, e.code, e.message);
                Err(Stop::Close(reason))
            }
        }
    }

    /// Handles a datagram, then whatever others are already waiting (up to
    /// [`MAX_DATAGRAMS_PER_BATCH`]).
    async fn on_datagrams(
        &mut self,
        first: Result<wtransport::datagram::Datagram, ConnectionError>,
    ) -> Result<(), Stop> {
        let mut next = Some(first);
        for _ in 0..MAX_DATAGRAMS_PER_BATCH {
            let Some(dg) = next.take() else { break };
            let payload = dg.map_err(|e| connection_stop(&e))?.payload();
            self.on_datagram(payload).await;
            next = self.conn.receive_datagram().now_or_never();
        }
        Ok(())
    }

    /// A client datagram: one `ClientFrame{publish}`, QoS 0.
    async fn on_datagram(&mut self, payload: Bytes) {
        self.datagrams.inbound.increment(1);
        self.counters.bytes_in.increment(payload.len() as u64);
        let frame = match proto::ClientFrame::decode(payload) {
            Ok(proto::ClientFrame { req, frame: Some(client_frame::Frame::Publish(p)) }) => (req, p),
            Ok(_) => return self.bad_datagram("a datagram must carry a publish frame"),
            Err(_) => return self.bad_datagram("undecodable datagram"),
        };
        let Some(session) = &self.session else {
            return self.bad_datagram("datagram before the session opened");
        };
        let (req, publish) = frame;
        if let Err(e) = self.core.publish(session.handle.id, publish).await {
            debug!(req, code = e.code.slug(), error = %e, "datagram publish refused");
            if req != 0 {
                self.push_error(req, e.code, e.message);
            }
        }
    }

    fn bad_datagram(&self, why: &'static str) {
        debug!(why, "dropped a datagram");
        protocol_error("bad_datagram");
    }

    fn push_reply(&mut self, req: u64, body: Reply) {
        let frame = proto::ServerFrame { req, frame: Some(body) };
        if frame.encode_length_delimited(&mut self.ctl_out).is_err() {
            // A BytesMut grows on demand; this cannot happen.
            error!("encoding a control frame failed");
        }
    }

    fn push_error(&mut self, req: u64, code: ErrorCode, message: String) {
        self.push_reply(req, Reply::Error(proto::Error { code: code as i32, message }));
    }

    /// Says goodbye as `stop` demands, then closes the connection.
    async fn finish(&mut self, stop: Stop) {
        match stop {
            Stop::Close(reason) => {
                debug!(code = reason.code, reason = reason.reason, "closing session");
                self.push_reply(
                    0,
                    Reply::Disconnect(proto::Disconnect {
                        code: reason.code.into(),
                        reason: reason.reason.into(),
                        reconnect: reason.reconnect,
                    }),
                );
                let _ = tokio::time::timeout(CLOSE_LINGER, self.flush_control()).await;
                self.conn.close(VarInt::from_u32(reason.code.into()), reason.reason.as_bytes());
            }
            Stop::PeerClosed => {
                if let Some(s) = &mut self.session {
                    s.end = CloseKind::Clean;
                }
                self.conn.close(VarInt::from_u32(0), b"");
            }
            Stop::Gone => self.conn.close(VarInt::from_u32(0), b""),
        }
    }

    /// Writes the pending control frames and finishes the control stream,
    /// waiting for the client's acknowledgement (the caller bounds it).
    async fn flush_control(&mut self) {
        while self.ctl_writing {
            match self.io.next().await {
                Some(IoDone::Written { slot: None, stream, result }) => {
                    self.ctl_writing = false;
                    if result.is_ok() {
                        self.ctl_send = Some(stream);
                    }
                }
                Some(_) => {}
                None => break,
            }
        }
        let Some(mut stream) = self.ctl_send.take() else { return };
        let data = self.ctl_out.split().freeze();
        if stream.quic_stream_mut().write_chunk(data).await.is_ok() {
            let _ = stream.finish().await;
        }
    }
}

/// The code refused client streams are stopped and reset with.
fn refused_code() -> VarInt {
    VarInt::try_from_u64(stream_error_code(REFUSED_STREAM)).unwrap_or(VarInt::from_u32(REFUSED_STREAM))
}

/// Writes `data` on `stream` within `limit`, handing the stream back.
fn write(slot: Option<usize>, mut stream: SendStream, data: Bytes, limit: Duration) -> BoxFuture<'static, IoDone> {
    async move {
        let result = match tokio::time::timeout(limit, stream.quic_stream_mut().write_chunk(data)).await {
            Ok(r) => r.map_err(IoFail::from),
            Err(_) => Err(IoFail::Timeout),
        };
        IoDone::Written { slot, stream, result }
    }
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn request_inspection_follows_the_table() {
        let open = WtConfig::default();
        let token = WtConfig { require_token: true, ..WtConfig::default() };
        let none = headers(&[]);
        let ok = |c: Result<Credentials, Refusal>| c.expect("accepted");
        assert_eq!(ok(inspect_request("/v1/wt?token=T%2Bx", None, &none, &token)).token, "T+x");
        let bearer = headers(&[("authorization", "Bearer abc")]);
        assert_eq!(ok(inspect_request("/v1/wt", None, &bearer, &token)).token, "abc");
        assert_eq!(ok(inspect_request("/v1/wt?token=q", None, &bearer, &token)).token, "q", "the query wins");
        let c = ok(inspect_request("/v1/wt?client_id=a&_=1", None, &none, &open));
        assert_eq!((c.client_id.as_str(), c.present()), ("a", true));
        assert!(!ok(inspect_request("/v1/wt", None, &none, &open)).present());
        assert_eq!(inspect_request("/v1/wt", None, &none, &token), Err(Refusal::Forbidden("missing_token")));
        assert!(!ok(inspect_request("/v1/wt?auth=connect", None, &none, &token)).present());
        for path in ["/", "/v1/wt/", "/v1/wt/x", "/v1/ws", "/V1/WT", ""] {
            assert_eq!(inspect_request(path, None, &none, &open), Err(Refusal::NotFound), "{path}");
        }
        let long = format!("/v1/wt?token={}", "x".repeat(MAX_PATH_LEN));
        assert_eq!(inspect_request(&long, None, &none, &open), Err(Refusal::NotFound));
        let allowed = OriginPolicy::new(&["https://app.example"]).expect("policy");
        let origins = WtConfig { allowed_origins: allowed, ..WtConfig::default() };
        assert!(inspect_request("/v1/wt", Some("https://app.example"), &none, &origins).is_ok());
        assert!(inspect_request("/v1/wt", None, &none, &origins).is_ok(), "no Origin: not a browser");
        assert_eq!(
            inspect_request("/v1/wt", Some("https://evil.example"), &none, &origins),
            Err(Refusal::Forbidden("forbidden_origin"))
        );
        assert_eq!(Refusal::of(&CoreError::new(ErrorCode::Unauthorized, "")), Refusal::Forbidden("unauthorized"));
        assert_eq!(Refusal::of(&CoreError::new(ErrorCode::RateLimited, "")), Refusal::TooManyRequests("rate_limited"));
        let dbg = format!("{:?}", Credentials { token: "secret".into(), client_id: String::new() });
        assert!(!dbg.contains("secret"), "{dbg}");
    }

    #[test]
    fn datagram_delivery_needs_every_matching_subscription_to_ask() {
        let mut m = Modes::default();
        assert!(!m.is_datagram("a"));
        m.set("sensors/+", DeliveryMode::Datagram);
        assert!(m.is_datagram("sensors/1") && !m.is_datagram("other"));
        m.set("sensors/1", DeliveryMode::Stream);
        assert!(!m.is_datagram("sensors/1") && m.is_datagram("sensors/2"));
        m.remove("sensors/1");
        assert!(m.is_datagram("sensors/1"));
        // Re-subscribing the same filter replaces its mode.
        m.set("sensors/+", DeliveryMode::Stream);
        assert!(!m.is_datagram("sensors/2"));
        m.set("$share/g/x/#", DeliveryMode::Datagram);
        assert!(m.is_datagram("x/y"));
        assert!(!m.is_datagram("$presence/x"));
    }

    #[test]
    fn stream_error_codes_map_into_the_http3_range() {
        assert_eq!(stream_error_code(0), 0x52e4_a40f_a8db);
        assert_eq!(stream_error_code(1), 0x52e4_a40f_a8dc);
        // Every 0x1e codes skip one reserved (greased) value.
        assert_eq!(stream_error_code(0x1e), 0x52e4_a40f_a8db + 0x1e + 1);
        assert_eq!(refused_code().into_inner(), stream_error_code(REFUSED_STREAM));
        assert_eq!(u64::from(TOO_MANY_STREAMS.code), 4007);
    }
}
