//! The router: the one place that decides.
//!
//! Every front end reaches the gateway through [`Router`], which implements
//! the [`Core`] port: it opens sessions, validates channel names and
//! filters once for every protocol, enforces limits, counts metrics, and
//! hands the work to the [`Engine`] behind it (sequencing, history, dedupe,
//! retained values, presence, fan-out). It never awaits a subscriber: the
//! engine only pushes into bounded outboxes.
//!
//! Authentication is open (dev mode) in this version: any client id is
//! accepted. The auth layer slots in at [`Router::open`] and the per-call
//! checks without the front ends changing.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::Mutex;
use switchboard_proto::{self as proto, ErrorCode};
use switchboard_protocols::port::{
    CloseKind, CloseReason, Core, CoreError, OpenSession, Outbox, SessionHandle, SessionId, SubscribeOutcome,
};

use crate::channel;
use crate::engine::{Caller, Engine, EngineStats};

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
}

impl Default for RouterLimits {
    fn default() -> Self {
        RouterLimits { max_message_size: 64 * 1024, max_subscriptions: 256, outbox_capacity: 1024 * 1024 }
    }
}

/// One open session, as the router tracks it.
#[derive(Debug)]
struct SessionEntry {
    caller: Caller,
    outbox: Arc<Outbox>,
    subscriptions: usize,
    opened_ms: i64,
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
    limits: RouterLimits,
    node: String,
    next_id: AtomicU64,
    sessions: Mutex<HashMap<SessionId, SessionEntry>>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router").field("node", &self.node).field("limits", &self.limits).finish_non_exhaustive()
    }
}

fn protocol_label(p: proto::Protocol) -> &'static str {
    p.slug()
}

impl Router {
    /// A router over `engine`.
    pub fn new(engine: Arc<dyn Engine>, limits: RouterLimits, node: String) -> Arc<Self> {
        Arc::new(Router { engine, limits, node, next_id: AtomicU64::new(1), sessions: Mutex::new(HashMap::new()) })
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

    /// Number of open sessions.
    pub fn session_count(&self) -> usize {
        self.sessions.lock().len()
    }

    /// Open sessions, for the admin API.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        let mut out: Vec<SessionInfo> = self
            .sessions
            .lock()
            .iter()
            .map(|(id, s)| SessionInfo {
                id: *id,
                client_id: s.caller.client_id.to_string(),
                connection_id: s.caller.connection_id.to_string(),
                protocol: s.caller.protocol.slug(),
                subscriptions: s.subscriptions,
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
        match self.sessions.lock().get(&id) {
            Some(s) => {
                s.outbox.close(CloseReason::KICKED);
                true
            }
            None => false,
        }
    }

    /// Closes every session's outbox with `reason` (graceful shutdown).
    pub fn close_all(&self, reason: CloseReason) {
        for s in self.sessions.lock().values() {
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
                let stats = router.engine.stats();
                metrics::gauge!("switchboard_channels").set(stats.channels as f64);
                metrics::gauge!("switchboard_subscriptions").set(stats.subscriptions as f64);
                metrics::gauge!("switchboard_presence_members").set(stats.presence_members as f64);
            }
        })
    }

    fn caller(&self, session: SessionId) -> Result<Caller, CoreError> {
        self.sessions
            .lock()
            .get(&session)
            .map(|s| s.caller.clone())
            .ok_or_else(|| CoreError::new(ErrorCode::NotConnected, "session is closed"))
    }

    /// The caller of an open session, found by its connection id (REST
    /// uplink for SSE and long-poll streams, which cannot send frames).
    pub fn caller_for_connection(&self, connection_id: &str) -> Option<Caller> {
        let id: SessionId = connection_id.strip_prefix(self.node.as_str())?.strip_prefix('-')?.parse().ok()?;
        let sessions = self.sessions.lock();
        let s = sessions.get(&id)?;
        (s.caller.connection_id.as_ref() == connection_id).then(|| s.caller.clone())
    }

    /// Leaves presence as a caller.
    pub async fn presence_leave_as(&self, caller: &Caller, channel_name: &str) -> Result<(), CoreError> {
        Self::check_presence_channel(channel_name)?;
        self.engine.presence_leave(caller, channel_name, now_ms()).await
    }

    /// A caller for requests without a session (REST).
    pub fn rest_caller(client_id: &str) -> Caller {
        Caller { session: 0, client_id: client_id.into(), connection_id: "".into(), protocol: proto::Protocol::Rest }
    }

    fn check_publish(&self, req: &proto::Publish) -> Result<(), CoreError> {
        channel::validate_channel(&req.channel).map_err(|e| channel::channel_error(&req.channel, e))?;
        if channel::is_reserved(&req.channel) {
            return Err(CoreError::new(
                ErrorCode::ReservedChannel,
                format!("channel {:?} is reserved for the gateway ('$' prefix)", req.channel),
            ));
        }
        if req.payload.len() > self.limits.max_message_size {
            return Err(CoreError::new(
                ErrorCode::MessageTooLarge,
                format!(
                    "payload of {} bytes exceeds the limit of {} bytes",
                    req.payload.len(),
                    self.limits.max_message_size
                ),
            ));
        }
        Ok(())
    }

    /// Publishes as `caller` (any front end, REST included).
    pub async fn publish_as(&self, caller: &Caller, req: proto::Publish) -> Result<proto::PublishAck, CoreError> {
        self.check_publish(&req)?;
        let ack = self.engine.publish(caller, req, now_ms()).await?;
        let label = protocol_label(caller.protocol);
        if ack.duplicate {
            metrics::counter!("switchboard_publish_duplicates_total", "protocol" => label).increment(1);
        } else {
            metrics::counter!("switchboard_messages_in_total", "protocol" => label).increment(1);
        }
        Ok(ack)
    }

    fn check_presence_channel(name: &str) -> Result<(), CoreError> {
        channel::validate_channel(name).map_err(|e| channel::channel_error(name, e))?;
        if channel::is_reserved(name) {
            return Err(CoreError::new(ErrorCode::ReservedChannel, format!("channel {name:?} is reserved")));
        }
        Ok(())
    }

    /// Reads a channel's history (any front end, REST included).
    pub async fn history_of(&self, req: proto::History) -> Result<proto::HistoryResult, CoreError> {
        channel::validate_channel(&req.channel).map_err(|e| channel::channel_error(&req.channel, e))?;
        self.engine.history(&req, now_ms()).await
    }

    /// Lists a channel's presence (any front end, REST included).
    pub async fn members_of(&self, channel_name: &str) -> Result<proto::PresenceMembers, CoreError> {
        Self::check_presence_channel(channel_name)?;
        self.engine.presence_members(channel_name).await
    }

    /// Enters/updates presence as a caller (REST uplink for SSE/poll later).
    pub async fn presence_enter_as(
        &self,
        caller: &Caller,
        channel_name: &str,
        data: Bytes,
        update: bool,
    ) -> Result<(), CoreError> {
        Self::check_presence_channel(channel_name)?;
        if data.len() > self.limits.max_message_size {
            return Err(CoreError::new(ErrorCode::MessageTooLarge, "presence data exceeds the message size limit"));
        }
        self.engine.presence_enter(caller, channel_name, data, update, now_ms()).await
    }
}

#[async_trait::async_trait]
impl Core for Router {
    async fn open(&self, req: OpenSession) -> Result<SessionHandle, CoreError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let connection_id = format!("{}-{id}", self.node);
        if req.client_id.len() > channel::MAX_NAME_LEN || req.client_id.contains('\0') {
            return Err(CoreError::new(ErrorCode::BadRequest, "client id must be at most 256 bytes without NUL"));
        }
        let caller = Caller {
            session: id,
            client_id: req.client_id.as_str().into(),
            connection_id: connection_id.as_str().into(),
            protocol: req.protocol,
        };
        let outbox = Outbox::new(self.limits.outbox_capacity);
        self.engine.attach(&caller, outbox.clone());
        self.sessions
            .lock()
            .insert(id, SessionEntry { caller, outbox: outbox.clone(), subscriptions: 0, opened_ms: now_ms() });
        metrics::gauge!("switchboard_connections", "protocol" => protocol_label(req.protocol)).increment(1.0);
        metrics::counter!("switchboard_connections_opened_total", "protocol" => protocol_label(req.protocol))
            .increment(1);
        Ok(SessionHandle { id, client_id: req.client_id, connection_id, node: self.node.clone(), outbox })
    }

    async fn subscribe(&self, session: SessionId, req: proto::Subscribe) -> Result<SubscribeOutcome, CoreError> {
        channel::validate_subscription(&req.filter).map_err(|e| channel::filter_error(&req.filter, e))?;
        let inner = channel::parse_shared(&req.filter).map_or(req.filter.as_str(), |(_, f)| f);
        if channel::is_reserved(inner) && !inner.starts_with(channel::PRESENCE_PREFIX) {
            return Err(CoreError::new(
                ErrorCode::ReservedChannel,
                format!("filter {:?} is reserved; only $presence/... and $share/... may be subscribed", req.filter),
            ));
        }
        {
            let sessions = self.sessions.lock();
            let s =
                sessions.get(&session).ok_or_else(|| CoreError::new(ErrorCode::NotConnected, "session is closed"))?;
            if s.subscriptions >= self.limits.max_subscriptions {
                return Err(CoreError::new(
                    ErrorCode::TooManySubscriptions,
                    format!("at most {} subscriptions per connection", self.limits.max_subscriptions),
                ));
            }
        }
        let outcome = self.engine.subscribe(session, &req, now_ms()).await?;
        if let Some(s) = self.sessions.lock().get_mut(&session) {
            s.subscriptions += 1;
        }
        Ok(outcome)
    }

    async fn unsubscribe(&self, session: SessionId, filter: &str) -> Result<(), CoreError> {
        channel::validate_subscription(filter).map_err(|e| channel::filter_error(filter, e))?;
        self.engine.unsubscribe(session, filter).await?;
        if let Some(s) = self.sessions.lock().get_mut(&session) {
            s.subscriptions = s.subscriptions.saturating_sub(1);
        }
        Ok(())
    }

    async fn publish(&self, session: SessionId, req: proto::Publish) -> Result<proto::PublishAck, CoreError> {
        let caller = self.caller(session)?;
        self.publish_as(&caller, req).await
    }

    async fn presence_enter(
        &self,
        session: SessionId,
        channel_name: &str,
        data: Bytes,
        update: bool,
    ) -> Result<(), CoreError> {
        let caller = self.caller(session)?;
        self.presence_enter_as(&caller, channel_name, data, update).await
    }

    async fn presence_leave(&self, session: SessionId, channel_name: &str) -> Result<(), CoreError> {
        let caller = self.caller(session)?;
        self.presence_leave_as(&caller, channel_name).await
    }

    async fn presence_members(
        &self,
        session: SessionId,
        channel_name: &str,
    ) -> Result<proto::PresenceMembers, CoreError> {
        self.caller(session)?;
        self.members_of(channel_name).await
    }

    async fn history(&self, session: SessionId, req: proto::History) -> Result<proto::HistoryResult, CoreError> {
        self.caller(session)?;
        self.history_of(req).await
    }

    fn close(&self, session: SessionId, kind: CloseKind) {
        let Some(entry) = self.sessions.lock().remove(&session) else { return };
        self.engine.detach(session, kind, now_ms());
        let label = protocol_label(entry.caller.protocol);
        metrics::gauge!("switchboard_connections", "protocol" => label).decrement(1.0);
        if entry.outbox.closed() == Some(CloseReason::SLOW) {
            metrics::counter!("switchboard_slow_consumer_closes_total", "protocol" => label).increment(1);
            tracing::info!(session, client_id = %entry.caller.client_id, protocol = label, "closed a slow consumer");
        }
    }
}
