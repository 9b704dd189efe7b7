//! The router: the one place that decides.
//!
//! Every front end reaches the gateway through [`Router`], which implements
//! the [`Core`] port: it opens sessions, validates channel names and
//! filters once for every protocol, enforces limits, counts metrics, and
//! hands the work to the [`Engine`] behind it (sequencing, history, dedupe,
//! retained values, presence, fan-out). It never awaits a subscriber: the
//! engine only pushes into bounded outboxes.
//!
//! Authentication: in open mode (dev) any client id is accepted and every
//! operation allowed; with a token [`Verifier`] configured, [`Core::open`]
//! requires a valid connection token, whose `sub` becomes the client id and
//! whose `caps` are checked here for every subscribe, publish, presence and
//! history call — the same check for every protocol (`rewind` on a
//! subscribe reads history, so it needs `history` too). A session whose
//! token expires (past `exp` plus the verifier's leeway) without a refresh
//! is closed with [`CloseReason::TOKEN_EXPIRED`]. A client with no
//! credentials at all is refused, or, with `[auth] anonymous_caps`, opened
//! as `anon-` and 16 random hex digits with those caps and no expiry
//! ([`Router::anonymous_caps`]).
//!
//! Limits: the size of a whole message (payload, id, headers and the rest,
//! with small bounds of their own on ids and headers), subscriptions per
//! session (distinct filters)
//! and the publish rate (a token bucket per session) are checked here; each
//! refusal counts in `switchboard_limit_exceeded_total{limit,protocol}`.

use std::collections::HashMap;

use crate::core::str_set::StrSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use prost::Message as _;
use switchboard_proto::{self as proto, ErrorCode};
use switchboard_protocols::port::{
    CloseKind, CloseReason, Core, CoreError, OpenSession, Outbox, SessionHandle, SessionId, SubscribeOutcome,
};

use crate::core::auth::{Caps, Op, Verifier};
use crate::core::channel;
use crate::core::engine::{Caller, Engine, EngineStats};
use crate::core::lifecycle::{Detail, Event, EventKind, Lifecycle};

/// How the client ids of anonymous clients start (`anon-` and 16 hex
/// digits).
pub const ANONYMOUS_PREFIX: &str = "anon-";

/// Longest idempotency key (`id`, `Idempotency-Key`, MQTT 5 user
/// property `id`).
pub const MAX_ID_LEN: usize = 256;
/// Most headers (MQTT 5 user properties) on one message.
pub const MAX_HEADERS: usize = 64;
/// Longest header name.
pub const MAX_HEADER_NAME_LEN: usize = 256;
/// Longest header value.
pub const MAX_HEADER_VALUE_LEN: usize = 8 * 1024;

/// Current Unix time in milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Limits the router enforces for every protocol.
#[derive(Debug, Clone)]
pub struct RouterLimits {
    /// Largest payload a publish may carry.
    pub max_message_size: usize,
    /// Most subscriptions one session may hold.
    pub max_subscriptions: usize,
    /// Bytes a session's outbound queue may hold.
    pub outbox_capacity: usize,
    /// How long a session's writer waits after a delivery before writing,
    /// to send what else arrives meanwhile in the same write (0 = at once).
    pub write_delay: std::time::Duration,
    /// Sustained publishes per second per session (0 = unlimited).
    pub publish_rate: f64,
    /// Publishes a session may send at once before the rate applies.
    pub publish_burst: f64,
    /// How far back a caller without the `history` capability may recover
    /// (from a position) or resume (by time): older messages need
    /// `history` (see [`Engine::subscribe`]).
    pub recovery_window: std::time::Duration,
    /// Most `positions` in one subscribe.
    pub max_positions: usize,
    /// Sustained subscribe and presence requests per second per session
    /// (0 = unlimited).
    pub request_rate: f64,
    /// Such requests a session may send at once before the rate applies.
    pub request_burst: f64,
    /// Channels one session may be present on at once.
    pub max_presence_per_connection: usize,
}

/// A token bucket: `rate` tokens a second, at most `burst` saved up. Time is
/// passed in, so it is tested without clocks.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: std::time::Instant,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn new(rate: f64, burst: f64, now: std::time::Instant) -> Self {
        TokenBucket { rate, burst, tokens: burst, last: now }
    }

    /// How long since the bucket was last used.
    pub fn idle_for(&self, now: std::time::Instant) -> std::time::Duration {
        now.saturating_duration_since(self.last)
    }

    /// Takes one token if there is one (always, when `rate` is 0).
    pub fn take(&mut self, now: std::time::Instant) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl Default for RouterLimits {
    fn default() -> Self {
        RouterLimits {
            max_message_size: 64 * 1024,
            max_subscriptions: 256,
            outbox_capacity: 1024 * 1024,
            write_delay: std::time::Duration::ZERO,
            publish_rate: 1000.0,
            publish_burst: 10_000.0,
            recovery_window: std::time::Duration::from_secs(120),
            max_positions: 1000,
            request_rate: 100.0,
            request_burst: 1000.0,
            max_presence_per_connection: 64,
        }
    }
}

/// One open session, as the router tracks it. The map of sessions is only
/// read on the hot path; what changes per session has its own lock, so
/// publishes of different sessions never wait for each other here.
#[derive(Debug)]
struct SessionEntry {
    caller: Caller,
    outbox: Arc<Outbox>,
    opened_ms: i64,
    rights: Mutex<Rights>,
}

/// What changes during a session's life.
#[derive(Debug)]
struct Rights {
    /// Filters held, for `max_subscriptions`: subscribing a held filter
    /// again replaces it (as the engine and MQTT §3.8.4 do), it does not
    /// count twice.
    filters: StrSet,
    /// What the session's token allows (everything in open mode).
    caps: Arc<Caps>,
    /// When the token expires, Unix seconds (never in open mode).
    expires_at: Option<u64>,
    /// Publish rate limit of this session.
    bucket: TokenBucket,
    /// Subscribe and presence request rate limit of this session.
    requests: TokenBucket,
    /// Channels the session is present on, for `max_presence_per_connection`.
    presence: StrSet,
}

/// A session as the admin API reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SessionInfo {
    /// Router id.
    pub id: SessionId,
    /// Client id.
    pub client_id: String,
    /// Connection id.
    pub connection_id: String,
    /// Front end.
    pub protocol: &'static str,
    /// Subscriptions held.
    pub subscriptions: usize,
    /// Bytes queued now.
    pub queued_bytes: usize,
    /// Most bytes ever queued.
    pub peak_queued_bytes: usize,
    /// Queue bound.
    pub queue_capacity: usize,
    /// Items dropped by drop-oldest / conflate.
    pub dropped: u64,
    /// Unix ms when opened.
    pub opened_ms: i64,
}

/// The router (see the module docs).
pub struct Router {
    engine: Arc<dyn Engine>,
    /// Token verification; `None` is open mode.
    auth: Option<Verifier>,
    limits: RouterLimits,
    node: String,
    next_id: AtomicU64,
    sessions: RwLock<HashMap<SessionId, Arc<SessionEntry>>>,
    /// Where connect, disconnect, subscribe, unsubscribe and publish
    /// events go (webhooks); presence events come from the engine.
    lifecycle: Lifecycle,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router").field("node", &self.node).field("limits", &self.limits).finish_non_exhaustive()
    }
}

fn protocol_label(p: proto::Protocol) -> &'static str {
    p.slug()
}

/// Counts and logs a limit a client ran into: one metric,
/// `switchboard_limit_exceeded_total{limit, protocol}`, for the limits the
/// router enforces (`message_size`, `subscriptions`, `publish_rate`). The
/// log is `debug` for the publish rate (a burst hits it many times) and
/// `info` otherwise.
fn limit_exceeded(limit: &'static str, protocol: proto::Protocol, client_id: &str) {
    let label = protocol_label(protocol);
    metrics::counter!("switchboard_limit_exceeded_total", "limit" => limit, "protocol" => label).increment(1);
    if limit == "publish_rate" {
        tracing::debug!(limit, protocol = label, client_id, "limit exceeded");
    } else {
        tracing::info!(limit, protocol = label, client_id, "limit exceeded");
    }
}

impl Router {
    /// A router over `engine`, handing lifecycle events to `lifecycle`.
    pub fn new(
        engine: Arc<dyn Engine>,
        limits: RouterLimits,
        node: String,
        auth: Option<Verifier>,
        lifecycle: Lifecycle,
    ) -> Arc<Self> {
        Arc::new(Router {
            engine,
            auth,
            limits,
            node,
            next_id: AtomicU64::new(1),
            sessions: RwLock::new(HashMap::new()),
            lifecycle,
        })
    }

    /// Hands a connect, disconnect, subscribe or unsubscribe of `caller`
    /// to the lifecycle sink, if it wants it.
    fn emit(&self, kind: EventKind, caller: &Caller, channel: &str, detail: impl FnOnce() -> Detail) {
        self.lifecycle
            .emit_with(kind, channel, || Event { detail: detail(), ..Event::of(kind, caller, channel, now_ms()) });
    }

    /// True in open (dev) mode: no token needed, everything allowed.
    pub fn is_open(&self) -> bool {
        self.auth.is_none()
    }

    /// The caps of a client that presents no credentials, when such clients
    /// are admitted (token mode with `[auth] anonymous_caps`).
    pub fn anonymous_caps(&self) -> Option<Arc<Caps>> {
        self.auth.as_ref().and_then(Verifier::anonymous_caps)
    }

    /// A fresh client id for an anonymous client: random, so that it never
    /// names another client's MQTT session or presence, nor a session of a
    /// previous run.
    pub fn anonymous_client_id() -> String {
        format!("{ANONYMOUS_PREFIX}{:016x}", rand::random::<u64>())
    }

    /// Verifies a connection token (REST bearer tokens): the client id and
    /// what it may do. Open mode has no tokens to verify.
    pub fn verify_token(&self, token: &str) -> Result<(String, Arc<Caps>, u64), CoreError> {
        let v =
            self.auth.as_ref().ok_or_else(|| CoreError::new(ErrorCode::BadRequest, "token auth is not configured"))?;
        let p = v.verify(token).map_err(|e| {
            metrics::counter!("switchboard_auth_failures_total").increment(1);
            CoreError::new(ErrorCode::Unauthorized, e.to_string())
        })?;
        Ok((p.client_id, Arc::new(p.caps), p.expires_at))
    }

    /// Who opens a session and with which rights. Open mode takes the
    /// requested id and allows everything. With token auth the token names
    /// the client; a verified client certificate (mTLS) names it instead,
    /// and then a token must name the same client, or `auth.cert_caps`
    /// authorizes the certificate alone. A client with neither token nor
    /// certificate gets `auth.anonymous_caps` and a generated id, or is
    /// refused as before when those are not configured.
    fn authenticate(&self, req: &OpenSession) -> Result<(String, Arc<Caps>, Option<u64>), CoreError> {
        let Some(verifier) = &self.auth else {
            let id = req.cert_identity.clone().unwrap_or_else(|| req.client_id.clone());
            return Ok((id, Arc::new(Caps::all()), None));
        };
        match &req.cert_identity {
            Some(id) if req.token.is_empty() => match verifier.cert_caps(id) {
                Some(Ok(caps)) => Ok((id.clone(), Arc::new(caps), None)),
                Some(Err(e)) => Err(CoreError::new(ErrorCode::Unauthorized, e.to_string())),
                None => Err(CoreError::new(
                    ErrorCode::Unauthorized,
                    "a client certificate identifies but does not authorize: send a token or configure auth.cert_caps",
                )),
            },
            Some(id) => {
                let (sub, caps, exp) = self.verify_token(&req.token)?;
                if sub != *id {
                    return Err(CoreError::new(
                        ErrorCode::Unauthorized,
                        format!("the token's sub {sub:?} is not the certificate's client id {id:?}"),
                    ));
                }
                Ok((sub, caps, Some(exp)))
            }
            None if req.token.is_empty()
                && let Some(caps) = verifier.anonymous_caps() =>
            {
                let id = Self::anonymous_client_id();
                metrics::counter!("switchboard_anonymous_sessions_total", "protocol" => protocol_label(req.protocol))
                    .increment(1);
                tracing::debug!(protocol = protocol_label(req.protocol), peer = ?req.peer, client_id = %id, "anonymous session");
                Ok((id, caps, None))
            }
            None => self.verify_token(&req.token).map(|(sub, caps, exp)| (sub, caps, Some(exp))),
        }
    }

    /// Closes every session whose token expired by `now_secs`: past `exp`
    /// plus the verifier's leeway, the same instant from which the token
    /// itself is refused (so a client is never closed for a token it could
    /// still connect with).
    pub fn expire_tokens(&self, now_secs: u64) -> usize {
        let leeway = self.auth.as_ref().map_or(0, Verifier::leeway_secs);
        let mut n = 0;
        for s in self.sessions.read().values() {
            let expired = s.rights.lock().expires_at.is_some_and(|t| t.saturating_add(leeway) < now_secs);
            if expired && s.outbox.closed().is_none() {
                s.outbox.close(CloseReason::TOKEN_EXPIRED);
                n += 1;
            }
        }
        n
    }

    /// The limits in force.
    pub fn limits(&self) -> &RouterLimits {
        &self.limits
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Engine counts.
    pub fn stats(&self) -> EngineStats {
        self.engine.stats()
    }

    /// `Err` with the reason while the engine cannot accept publishes.
    pub fn health(&self) -> Result<(), String> {
        self.engine.health()
    }

    /// The node is stopping and every session closed: members still within
    /// their presence grace leave now (see [`Engine::leave_pending_presence`]).
    pub fn leave_pending_presence(&self) {
        self.engine.leave_pending_presence(now_ms());
    }

    /// Flushes and closes the engine (after every session closed).
    pub fn close_engine(&self) {
        self.engine.close();
    }

    /// Number of open sessions.
    pub fn session_count(&self) -> usize {
        self.sessions.read().len()
    }

    /// Open sessions, for the admin API.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        let mut out: Vec<SessionInfo> = self
            .sessions
            .read()
            .iter()
            .map(|(id, s)| SessionInfo {
                id: *id,
                client_id: s.caller.client_id.to_string(),
                connection_id: s.caller.connection_id.to_string(),
                protocol: s.caller.protocol.slug(),
                subscriptions: s.rights.lock().filters.len(),
                queued_bytes: s.outbox.queued_bytes(),
                peak_queued_bytes: s.outbox.peak_bytes(),
                queue_capacity: s.outbox.capacity(),
                dropped: s.outbox.dropped(),
                opened_ms: s.opened_ms,
            })
            .collect();
        out.sort_by_key(|s| s.id);
        out
    }

    /// Closes one session with [`CloseReason::KICKED`] (admin API); false if
    /// no such session is open. Its front end sends the close to the client.
    pub fn kick(&self, id: SessionId) -> bool {
        match self.sessions.read().get(&id) {
            Some(s) => {
                s.outbox.close(CloseReason::KICKED);
                true
            }
            None => false,
        }
    }

    /// Closes every session's outbox with `reason` (graceful shutdown).
    pub fn close_all(&self, reason: CloseReason) {
        for s in self.sessions.read().values() {
            s.outbox.close(reason);
        }
    }

    /// Runs housekeeping every `every` until the router is dropped.
    pub fn spawn_sweeper(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(router) = weak.upgrade() else { break };
                router.engine.sweep(now_ms());
                let expired = router.expire_tokens((now_ms() / 1000) as u64);
                if expired > 0 {
                    tracing::info!(sessions = expired, "closed sessions whose token expired");
                }
                let stats = router.engine.stats();
                metrics::gauge!("switchboard_channels").set(stats.channels as f64);
                metrics::gauge!("switchboard_subscriptions").set(stats.subscriptions as f64);
                metrics::gauge!("switchboard_presence_members").set(stats.presence_members as f64);
                metrics::gauge!("switchboard_history_bytes").set(stats.history_bytes as f64);
                metrics::gauge!("switchboard_retained_bytes").set(stats.retained_bytes as f64);
            }
        })
    }

    fn entry(&self, session: SessionId) -> Result<Arc<SessionEntry>, CoreError> {
        self.sessions
            .read()
            .get(&session)
            .cloned()
            .ok_or_else(|| CoreError::new(ErrorCode::NotConnected, "session is closed"))
    }

    fn rights(&self, session: SessionId) -> Result<(Caller, Arc<Caps>), CoreError> {
        self.sessions
            .read()
            .get(&session)
            .map(|s| (s.caller.clone(), s.rights.lock().caps.clone()))
            .ok_or_else(|| CoreError::new(ErrorCode::NotConnected, "session is closed"))
    }

    /// The oldest message a subscribe may replay by position or by time:
    /// none for a caller with `history` on the filter, and for MQTT (its
    /// positions come from the server's own session store, never from the
    /// client); `recovery_window` back from `now` for everyone else.
    fn history_floor(&self, session: SessionId, req: &proto::Subscribe, now: i64) -> Result<Option<i64>, CoreError> {
        if req.positions.is_empty() && req.since_ms == 0 {
            return Ok(None);
        }
        let entry = self.entry(session)?;
        if entry.caller.protocol == proto::Protocol::Mqtt || entry.rights.lock().caps.allows(Op::History, &req.filter) {
            return Ok(None);
        }
        Ok(Some(now.saturating_sub(self.limits.recovery_window.as_millis() as i64)))
    }

    /// Refuses `op` on `what` unless `caps` grant it.
    pub fn require(caps: &Caps, op: Op, what: &str) -> Result<(), CoreError> {
        if caps.allows(op, what) {
            Ok(())
        } else {
            Err(CoreError::new(ErrorCode::PermissionDenied, format!("not allowed to {} {what:?}", op.name())))
        }
    }

    /// The caller of an open session, found by its connection id (REST
    /// uplink for SSE and long-poll streams, which cannot send frames).
    pub fn caller_for_connection(&self, connection_id: &str) -> Option<(Caller, Arc<Caps>)> {
        let id = self.session_for_connection(connection_id)?;
        self.rights(id).ok()
    }

    /// The session id behind a connection id, if it is open.
    pub fn session_for_connection(&self, connection_id: &str) -> Option<SessionId> {
        // Connection ids are "{node}-{session id}" (see `open`).
        let id: SessionId = connection_id.strip_prefix(self.node.as_str())?.strip_prefix('-')?.parse().ok()?;
        let sessions = self.sessions.read();
        let s = sessions.get(&id)?;
        (s.caller.connection_id.as_ref() == connection_id).then_some(id)
    }

    /// Leaves presence as a caller.
    pub async fn presence_leave_as(&self, caller: &Caller, caps: &Caps, channel_name: &str) -> Result<(), CoreError> {
        Self::check_presence_channel(channel_name)?;
        Self::require(caps, Op::Presence, channel_name)?;
        let entry = self.sessions.read().get(&caller.session).cloned();
        if let Some(entry) = &entry
            && !entry.rights.lock().requests.take(std::time::Instant::now())
        {
            return Err(self.request_rate_limited(caller));
        }
        self.engine.presence_leave(caller, channel_name, now_ms()).await?;
        if let Some(entry) = entry {
            entry.rights.lock().presence.remove(channel_name);
        }
        Ok(())
    }

    /// A caller for requests without a session (REST).
    pub fn rest_caller(client_id: &str) -> Caller {
        Caller { session: 0, client_id: client_id.into(), connection_id: "".into(), protocol: proto::Protocol::Rest }
    }

    fn check_publish(&self, req: &proto::Publish) -> Result<(), CoreError> {
        channel::validate_channel(&req.channel).map_err(|e| channel::channel_error(&req.channel, e))?;
        if channel::is_reserved(&req.channel) {
            return Err(channel::reserved_error(&req.channel));
        }
        let too_large = |what: String| CoreError::new(ErrorCode::MessageTooLarge, what);
        if req.id.len() > MAX_ID_LEN {
            return Err(CoreError::new(
                ErrorCode::BadRequest,
                format!("idempotency key of {} bytes is over {MAX_ID_LEN} bytes", req.id.len()),
            ));
        }
        if req.headers.len() > MAX_HEADERS {
            return Err(too_large(format!("{} headers exceed the limit of {MAX_HEADERS}", req.headers.len())));
        }
        if let Some((k, v)) =
            req.headers.iter().find(|(k, v)| k.len() > MAX_HEADER_NAME_LEN || v.len() > MAX_HEADER_VALUE_LEN)
        {
            return Err(too_large(format!(
                "header {:?} ({} bytes, value {} bytes) exceeds the limits of {MAX_HEADER_NAME_LEN} bytes per name and \
                 {MAX_HEADER_VALUE_LEN} per value",
                k.chars().take(64).collect::<String>(),
                k.len(),
                v.len()
            )));
        }
        // The whole message as stored and sent, not only its payload: ids,
        // headers, content type, response topic and correlation data count.
        let size = req.encoded_len();
        if size > self.limits.max_message_size {
            return Err(too_large(format!(
                "message of {size} bytes (payload {} bytes) exceeds the limit of {} bytes",
                req.payload.len(),
                self.limits.max_message_size
            )));
        }
        Ok(())
    }

    /// Publishes as `caller`: REST, and the REST uplink of SSE / long-poll
    /// streams. A caller with a session (a stream's) spends that session's
    /// publish-rate token, as a publish from its own front end would.
    pub async fn publish_as(
        &self,
        caller: &Caller,
        caps: &Caps,
        req: proto::Publish,
    ) -> Result<proto::PublishAck, CoreError> {
        if caller.session != 0 {
            let now = std::time::Instant::now();
            let entry = self.sessions.read().get(&caller.session).cloned();
            let allowed = entry.is_none_or(|s| s.rights.lock().bucket.take(now));
            if !allowed {
                return Err(self.rate_limited(caller));
            }
        }
        self.publish_checked(caller, caps, req).await
    }

    /// The `rate_limited` refusal of a subscribe or presence request.
    fn request_rate_limited(&self, caller: &Caller) -> CoreError {
        limit_exceeded("request_rate", caller.protocol, &caller.client_id);
        CoreError::new(
            ErrorCode::RateLimited,
            format!(
                "subscribe and presence requests over {}/s (burst {})",
                self.limits.request_rate, self.limits.request_burst
            ),
        )
    }

    /// The `rate_limited` refusal, counted and logged.
    fn rate_limited(&self, caller: &Caller) -> CoreError {
        metrics::counter!("switchboard_rate_limited_total", "protocol" => protocol_label(caller.protocol)).increment(1);
        limit_exceeded("publish_rate", caller.protocol, &caller.client_id);
        CoreError::new(
            ErrorCode::RateLimited,
            format!("publish rate over {}/s (burst {})", self.limits.publish_rate, self.limits.publish_burst),
        )
    }

    /// Publishes once the rate is settled: payload, name and caps checks,
    /// then the engine.
    async fn publish_checked(
        &self,
        caller: &Caller,
        caps: &Caps,
        req: proto::Publish,
    ) -> Result<proto::PublishAck, CoreError> {
        self.check_publish(&req).inspect_err(|e| {
            if e.code == ErrorCode::MessageTooLarge {
                limit_exceeded("message_size", caller.protocol, &caller.client_id);
            }
        })?;
        Self::require(caps, Op::Publish, &req.channel)?;
        // The message is kept for the event only when someone wants it
        // (publish events are opt-in).
        let for_event = self.lifecycle.wants(EventKind::Publish, &req.channel).then(|| req.clone());
        let ack = self.engine.publish(caller, req, now_ms()).await?;
        let label = protocol_label(caller.protocol);
        if ack.duplicate {
            metrics::counter!("switchboard_publish_duplicates_total", "protocol" => label).increment(1);
        } else {
            metrics::counter!("switchboard_messages_in_total", "protocol" => label).increment(1);
            if let Some(message) = for_event {
                let (channel, ack) = (message.channel.clone(), ack.clone());
                self.emit(EventKind::Publish, caller, &channel, || Detail::Publish { ack, message: Box::new(message) });
            }
        }
        Ok(ack)
    }

    fn check_presence_channel(name: &str) -> Result<(), CoreError> {
        channel::validate_channel(name).map_err(|e| channel::channel_error(name, e))?;
        if channel::is_reserved(name) {
            return Err(channel::reserved_error(name));
        }
        Ok(())
    }

    /// Reads a channel's history (any front end, REST included).
    pub async fn history_of(&self, caps: &Caps, req: proto::History) -> Result<proto::HistoryResult, CoreError> {
        channel::validate_channel(&req.channel).map_err(|e| channel::channel_error(&req.channel, e))?;
        Self::require(caps, Op::History, &req.channel)?;
        self.engine.history(&req, now_ms()).await
    }

    /// Lists a channel's presence (any front end, REST included).
    pub async fn members_of(&self, caps: &Caps, channel_name: &str) -> Result<proto::PresenceMembers, CoreError> {
        Self::check_presence_channel(channel_name)?;
        Self::require(caps, Op::Presence, channel_name)?;
        self.engine.presence_members(channel_name).await
    }

    /// Enters/updates presence as a caller (also the REST uplink of SSE and
    /// long-poll streams).
    pub async fn presence_enter_as(
        &self,
        caller: &Caller,
        caps: &Caps,
        channel_name: &str,
        data: Bytes,
        update: bool,
    ) -> Result<(), CoreError> {
        Self::check_presence_channel(channel_name)?;
        Self::require(caps, Op::Presence, channel_name)?;
        if data.len() > self.limits.max_message_size {
            limit_exceeded("message_size", caller.protocol, &caller.client_id);
            return Err(CoreError::new(ErrorCode::MessageTooLarge, "presence data exceeds the message size limit"));
        }
        // A session's presence: rate and count (REST without a stream has
        // no session, and its members leave with nothing to bound).
        let entry = self.sessions.read().get(&caller.session).cloned();
        if let Some(entry) = &entry {
            let mut r = entry.rights.lock();
            if !r.requests.take(std::time::Instant::now()) {
                return Err(self.request_rate_limited(caller));
            }
            let max = self.limits.max_presence_per_connection;
            if !r.presence.contains(channel_name) && r.presence.len() >= max {
                limit_exceeded("presence", caller.protocol, &caller.client_id);
                return Err(CoreError::new(
                    ErrorCode::TooManySubscriptions,
                    format!("at most {max} presence channels per connection"),
                ));
            }
        }
        self.engine.presence_enter(caller, channel_name, data, update, now_ms()).await?;
        if let Some(entry) = entry {
            entry.rights.lock().presence.insert(channel_name.to_string());
        }
        Ok(())
    }
}

impl Router {
    /// [`Core::subscribe`], with when the request arrived for
    /// [`Core::subscribe_arrived`].
    async fn subscribe_from(
        &self,
        session: SessionId,
        req: proto::Subscribe,
        arrived_ns: Option<u64>,
    ) -> Result<SubscribeOutcome, CoreError> {
        channel::validate_subscription(&req.filter).map_err(|e| channel::filter_error(&req.filter, e))?;
        let inner = channel::parse_shared(&req.filter).map_or(req.filter.as_str(), |(_, f)| f);
        if channel::is_reserved(inner) && !inner.starts_with(channel::PRESENCE_PREFIX) {
            return Err(CoreError::new(
                ErrorCode::ReservedChannel,
                format!(
                    "filter {:?} is reserved for the gateway ($SYS, $share and $presence; only $presence/... and \
                     $share/{{group}}/... may be subscribed)",
                    req.filter
                ),
            ));
        }
        {
            let entry = self.entry(session)?;
            let mut s = entry.rights.lock();
            if !s.requests.take(std::time::Instant::now()) {
                return Err(self.request_rate_limited(&entry.caller));
            }
            if req.positions.len() > self.limits.max_positions {
                limit_exceeded("positions", entry.caller.protocol, &entry.caller.client_id);
                return Err(CoreError::new(
                    ErrorCode::TooManySubscriptions,
                    format!("at most {} positions in one subscribe", self.limits.max_positions),
                ));
            }
            Self::require(&s.caps, Op::Subscribe, &req.filter)?;
            if req.presence {
                Self::require(&s.caps, Op::Presence, inner)?;
            }
            // Rewind reads what was published before the client came: that
            // is history. Recovery from a position or by time (what this
            // client missed) and retained values are part of subscribing,
            // within the recovery window; older messages are history.
            if req.rewind.is_some_and(|r| r.count > 0 || r.duration_ms > 0) {
                Self::require(&s.caps, Op::History, &req.filter)?;
            }
            if s.filters.len() >= self.limits.max_subscriptions && !s.filters.contains(&req.filter) {
                limit_exceeded("subscriptions", entry.caller.protocol, &entry.caller.client_id);
                return Err(CoreError::new(
                    ErrorCode::TooManySubscriptions,
                    format!("at most {} subscriptions per connection", self.limits.max_subscriptions),
                ));
            }
        }
        let now = now_ms();
        let history_floor = self.history_floor(session, &req, now)?;
        let outcome = self.engine.subscribe(session, &req, history_floor, arrived_ns, now).await.inspect_err(|e| {
            // Only the node-wide cap on shared groups says this here.
            if e.code == ErrorCode::TooManySubscriptions
                && let Ok(s) = self.entry(session)
            {
                limit_exceeded("shared_groups", s.caller.protocol, &s.caller.client_id);
            }
        })?;
        if let Ok(s) = self.entry(session) {
            self.emit(EventKind::Subscribe, &s.caller, &req.filter, || Detail::None);
            s.rights.lock().filters.insert(req.filter);
        }
        Ok(outcome)
    }
}

#[async_trait::async_trait]
impl Core for Router {
    async fn open(&self, req: OpenSession) -> Result<SessionHandle, CoreError> {
        // With token auth the token names the client; open mode takes the
        // requested id and allows everything.
        let (client_id, caps, expires_at) = self.authenticate(&req).inspect_err(|e| {
            tracing::info!(protocol = protocol_label(req.protocol), peer = ?req.peer, error = %e, "refused a session");
        })?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let connection_id = format!("{}-{id}", self.node);
        if client_id.len() > channel::MAX_NAME_LEN || client_id.contains('\0') {
            return Err(CoreError::new(ErrorCode::BadRequest, "client id must be at most 256 bytes without NUL"));
        }
        let caller = Caller {
            session: id,
            client_id: client_id.as_str().into(),
            connection_id: connection_id.as_str().into(),
            protocol: req.protocol,
        };
        let outbox = Outbox::with_write_delay(self.limits.outbox_capacity, self.limits.write_delay);
        self.engine.attach(&caller, outbox.clone());
        let rights = Rights {
            filters: StrSet::new(),
            caps,
            expires_at,
            bucket: TokenBucket::new(self.limits.publish_rate, self.limits.publish_burst, std::time::Instant::now()),
            requests: TokenBucket::new(self.limits.request_rate, self.limits.request_burst, std::time::Instant::now()),
            presence: StrSet::new(),
        };
        self.emit(EventKind::Connect, &caller, "", || Detail::None);
        let entry = SessionEntry { caller, outbox: outbox.clone(), opened_ms: now_ms(), rights: Mutex::new(rights) };
        self.sessions.write().insert(id, Arc::new(entry));
        metrics::gauge!("switchboard_connections", "protocol" => protocol_label(req.protocol)).increment(1.0);
        metrics::counter!("switchboard_connections_opened_total", "protocol" => protocol_label(req.protocol))
            .increment(1);
        Ok(SessionHandle { id, client_id, connection_id, node: self.node.clone(), outbox })
    }

    async fn subscribe(&self, session: SessionId, req: proto::Subscribe) -> Result<SubscribeOutcome, CoreError> {
        self.subscribe_from(session, req, None).await
    }

    async fn subscribe_arrived(
        &self,
        session: SessionId,
        req: proto::Subscribe,
        arrived_ns: u64,
    ) -> Result<SubscribeOutcome, CoreError> {
        self.subscribe_from(session, req, Some(arrived_ns)).await
    }

    async fn unsubscribe(&self, session: SessionId, filter: &str) -> Result<(), CoreError> {
        channel::validate_subscription(filter).map_err(|e| channel::filter_error(filter, e))?;
        self.engine.unsubscribe(session, filter).await?;
        if let Ok(s) = self.entry(session) {
            self.emit(EventKind::Unsubscribe, &s.caller, filter, || Detail::None);
            s.rights.lock().filters.remove(filter);
        }
        Ok(())
    }

    async fn publish(&self, session: SessionId, req: proto::Publish) -> Result<proto::PublishAck, CoreError> {
        // The session's own lock on the hot path: the rate check and the
        // caller's rights.
        let entry = self.entry(session)?;
        let (caps, allowed, expires_at) = {
            let mut r = entry.rights.lock();
            let allowed = r.bucket.take(std::time::Instant::now());
            (r.caps.clone(), allowed, r.expires_at)
        };
        let caller = entry.caller.clone();
        // A session whose token expired publishes nothing more, even before
        // the sweep closes it — a delayed MQTT will among others.
        if let Some(exp) = expires_at {
            let leeway = self.auth.as_ref().map_or(0, Verifier::leeway_secs);
            if exp.saturating_add(leeway) < (now_ms() / 1000) as u64 {
                return Err(CoreError::new(ErrorCode::Unauthorized, "the connection's token has expired"));
            }
        }
        if !allowed {
            return Err(self.rate_limited(&caller));
        }
        self.publish_checked(&caller, &caps, req).await
    }

    async fn presence_enter(
        &self,
        session: SessionId,
        channel_name: &str,
        data: Bytes,
        update: bool,
    ) -> Result<(), CoreError> {
        let (caller, caps) = self.rights(session)?;
        self.presence_enter_as(&caller, &caps, channel_name, data, update).await
    }

    async fn presence_leave(&self, session: SessionId, channel_name: &str) -> Result<(), CoreError> {
        let (caller, caps) = self.rights(session)?;
        self.presence_leave_as(&caller, &caps, channel_name).await
    }

    async fn presence_members(
        &self,
        session: SessionId,
        channel_name: &str,
    ) -> Result<proto::PresenceMembers, CoreError> {
        let (_, caps) = self.rights(session)?;
        self.members_of(&caps, channel_name).await
    }

    async fn history(&self, session: SessionId, req: proto::History) -> Result<proto::HistoryResult, CoreError> {
        let (_, caps) = self.rights(session)?;
        self.history_of(&caps, req).await
    }

    async fn refresh(&self, session: SessionId, token: &str) -> Result<(), CoreError> {
        let (sub, caps, exp) = self.verify_token(token)?;
        let entry = self.entry(session)?;
        if entry.caller.client_id.as_ref() != sub {
            return Err(CoreError::new(ErrorCode::Unauthorized, "the new token names another client"));
        }
        let mut s = entry.rights.lock();
        // Live from here on: the next subscribe/publish is checked against
        // the new caps; existing subscriptions stay (they were allowed).
        s.caps = caps;
        s.expires_at = Some(exp);
        Ok(())
    }

    fn close(&self, session: SessionId, kind: CloseKind) {
        let Some(entry) = self.sessions.write().remove(&session) else { return };
        self.engine.detach(session, kind, now_ms());
        // After the detach: a clean close's presence leaves come first.
        let clean = kind == CloseKind::Clean;
        self.emit(EventKind::Disconnect, &entry.caller, "", || Detail::Disconnect { clean });
        let label = protocol_label(entry.caller.protocol);
        metrics::gauge!("switchboard_connections", "protocol" => label).decrement(1.0);
        if entry.outbox.closed() == Some(CloseReason::SLOW) {
            metrics::counter!("switchboard_slow_consumer_closes_total", "protocol" => label).increment(1);
            tracing::info!(session, client_id = %entry.caller.client_id, protocol = label, "closed a slow consumer");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn token_bucket_allows_burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 3.0, t0);
        assert!(b.take(t0) && b.take(t0) && b.take(t0));
        assert!(!b.take(t0), "burst spent");
        assert!(!b.take(t0 + Duration::from_millis(50)), "half a token");
        assert!(b.take(t0 + Duration::from_millis(100)), "one token after 100 ms at 10/s");
        assert!(!b.take(t0 + Duration::from_millis(100)));
        // Saving up never exceeds the burst.
        let later = t0 + Duration::from_secs(60);
        assert!(b.take(later) && b.take(later) && b.take(later));
        assert!(!b.take(later));
        let mut unlimited = TokenBucket::new(0.0, 0.0, t0);
        assert!((0..1000).all(|_| unlimited.take(t0)));
    }
}
