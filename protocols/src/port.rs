//! The port between the front ends and the core.
//!
//! A front end holds an `Arc<dyn Core>` and calls it for everything that
//! needs a decision: opening a session, subscribing, publishing, presence,
//! history. The core answers each call and pushes live deliveries into the
//! session's [`Outbox`], a queue bounded in bytes that the front end's writer
//! drains. The gateway implements [`Core`]; front ends never route, authorise
//! or store.
//!
//! Nothing here does I/O. [`Delivery`] caches each wire encoding of a
//! publication so that fan-out encodes a message once per format, not once
//! per subscriber.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use prost::Message as _;
use switchboard_proto as proto;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// The core's id for a session (one client connection).
pub type SessionId = u64;

/// A published envelope with its encodings, shared by every subscriber and
/// by history.
#[derive(Debug)]
pub struct Delivery {
    /// The sequenced envelope.
    pub envelope: proto::Envelope,
    /// Bytes this delivery counts against an outbox.
    pub size: usize,
    /// When the core accepted it, in [`mono_ns`]; 0 for a message read
    /// back from storage (older than any request of this process).
    pub accepted_ns: u64,
    proto_frame: OnceLock<Bytes>,
    json_frame: OnceLock<Utf8Bytes>,
    channel_bytes: OnceLock<Bytes>,
}

/// Fixed cost added to every queued item, for the envelope's fields and the
/// queue slot itself, so that tiny messages cannot fill memory for free.
const ITEM_OVERHEAD: usize = 64;

/// Nanoseconds on this process's monotonic clock, from its first reading
/// (never 0): when a request arrived or a message was accepted, comparable
/// across connections and threads.
pub fn mono_ns() -> u64 {
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    let start = *START.get_or_init(std::time::Instant::now);
    (start.elapsed().as_nanos() as u64).max(1)
}

impl Delivery {
    /// Wraps a sequenced envelope.
    pub fn new(envelope: proto::Envelope) -> Arc<Self> {
        Self::accepted_at(envelope, 0)
    }

    /// Wraps an envelope the core accepted at `accepted_ns` ([`mono_ns`]).
    pub fn accepted_at(envelope: proto::Envelope, accepted_ns: u64) -> Arc<Self> {
        let size = envelope.encoded_len() + ITEM_OVERHEAD;
        Arc::new(Delivery {
            envelope,
            size,
            accepted_ns,
            proto_frame: OnceLock::new(),
            json_frame: OnceLock::new(),
            channel_bytes: OnceLock::new(),
        })
    }

    /// `ServerFrame{message}` as protobuf, encoded on first use.
    pub fn proto_frame(&self) -> &Bytes {
        self.proto_frame.get_or_init(|| proto::encode_message_frame(&self.envelope))
    }

    /// `{"type":"message",...}` as JSON text, encoded on first use.
    pub fn json_frame(&self) -> &str {
        self.ws_text().as_str()
    }

    /// The same JSON as a WebSocket text payload, shared without a copy or
    /// a UTF-8 check per subscriber. Crate-private: the port's public types
    /// carry no WebSocket-library type; this is the WebSocket front end's
    /// cache.
    pub(crate) fn ws_text(&self) -> &Utf8Bytes {
        self.json_frame.get_or_init(|| Utf8Bytes::from(proto::json::encode_message_frame(&self.envelope)))
    }

    /// The channel this delivery belongs to.
    pub fn channel(&self) -> &str {
        &self.envelope.channel
    }

    /// The channel name as shared bytes (an MQTT topic), copied on first use.
    pub fn channel_bytes(&self) -> &Bytes {
        self.channel_bytes.get_or_init(|| Bytes::copy_from_slice(self.envelope.channel.as_bytes()))
    }
}

/// One item of a session's outbound queue.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// A message or presence event.
    Message(Arc<Delivery>),
    /// History could not fill a gap (recovery), or messages were dropped.
    Gap(proto::Gap),
}

impl Outbound {
    fn size(&self) -> usize {
        match self {
            Outbound::Message(d) => d.size,
            Outbound::Gap(g) => g.encoded_len() + ITEM_OVERHEAD,
        }
    }

    pub(crate) fn channel(&self) -> &str {
        match self {
            Outbound::Message(d) => d.channel(),
            Outbound::Gap(g) => &g.channel,
        }
    }
}

/// What happens when a session's outbound queue is full (per channel pattern).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SlowPolicy {
    /// Close the session with [`CloseReason::SLOW`]; the client reconnects
    /// and recovers from history. The default.
    #[default]
    Disconnect,
    /// Drop the oldest queued items until the new one fits. Subscribers see
    /// the hole in the `prev_serial` chain.
    DropOldest,
    /// Drop queued items of the same channel (keep only the latest); if that
    /// is not enough, drop the oldest items as `DropOldest` does.
    Conflate,
}

/// Why the core closed a session; front ends map it to their close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseReason {
    /// WebSocket close code (documented in docs/protocol.md).
    pub code: u16,
    /// Short machine-readable reason.
    pub reason: &'static str,
    /// Whether the client should reconnect and recover.
    pub reconnect: bool,
}

impl CloseReason {
    /// Outbound queue overflowed under the `disconnect` policy.
    pub const SLOW: CloseReason = CloseReason { code: 4000, reason: "slow consumer", reconnect: true };
    /// The node is draining (shutting down or restarting): reconnect, to
    /// another node or to this one once it is back, and recover. 1012 is
    /// WebSocket's "service restart".
    pub const SHUTDOWN: CloseReason = CloseReason { code: 1012, reason: "server shutting down", reconnect: true };
    /// Token invalid or expired.
    pub const UNAUTHORIZED: CloseReason = CloseReason { code: 4001, reason: "unauthorized", reconnect: false };
    /// No connect frame in time, or another frame came first.
    pub const CONNECT_EXPECTED: CloseReason = CloseReason { code: 4002, reason: "connect expected", reconnect: false };
    /// Disconnected by an administrator.
    pub const KICKED: CloseReason = CloseReason { code: 4003, reason: "disconnected by server", reconnect: false };
    /// The connection token expired without a refresh; reconnect with a
    /// fresh token (and recover).
    pub const TOKEN_EXPIRED: CloseReason = CloseReason { code: 4006, reason: "token expired", reconnect: true };
}

/// Result of [`Outbox::push`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    /// Queued without loss.
    Queued,
    /// Queued after dropping this many older items.
    Dropped(usize),
    /// The session is (now) closed; the item was discarded.
    Closed,
}

#[derive(Debug, Default)]
struct OutboxState {
    items: VecDeque<Outbound>,
    bytes: usize,
    peak_bytes: usize,
    dropped: u64,
    closed: Option<CloseReason>,
}

/// A session's outbound queue, bounded in bytes.
///
/// Producers (the core) never wait: [`Outbox::push`] applies the channel's
/// [`SlowPolicy`] when the queue is full. The single consumer (the
/// connection's writer) waits with [`Outbox::ready`] and takes everything at
/// once with [`Outbox::drain`], so one flush carries many messages. With a
/// write delay, [`Outbox::ready`] returns that long after the first push, so
/// everything pushed meanwhile goes out in the same write.
#[derive(Debug)]
pub struct Outbox {
    state: Mutex<OutboxState>,
    notify: Notify,
    capacity: usize,
    write_delay: Duration,
}

impl Outbox {
    /// A queue holding at most `capacity` bytes, ready as soon as anything
    /// is pushed.
    pub fn new(capacity: usize) -> Arc<Self> {
        Outbox::with_write_delay(capacity, Duration::ZERO)
    }

    /// A queue holding at most `capacity` bytes whose consumer waits
    /// `write_delay` after a push before taking what is queued (write
    /// coalescing: fewer, larger writes for that much latency).
    pub fn with_write_delay(capacity: usize, write_delay: Duration) -> Arc<Self> {
        Arc::new(Outbox { state: Mutex::new(OutboxState::default()), notify: Notify::new(), capacity, write_delay })
    }

    /// The byte bound.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes queued now.
    pub fn queued_bytes(&self) -> usize {
        self.state.lock().bytes
    }

    /// The most bytes ever queued at once (never above the capacity).
    pub fn peak_bytes(&self) -> usize {
        self.state.lock().peak_bytes
    }

    /// Items dropped by `drop-oldest` / `conflate` so far.
    pub fn dropped(&self) -> u64 {
        self.state.lock().dropped
    }

    /// Why the outbox was closed, if it was.
    pub fn closed(&self) -> Option<CloseReason> {
        self.state.lock().closed
    }

    /// Queues an item, applying `policy` if it does not fit. Never blocks.
    pub fn push(&self, item: Outbound, policy: SlowPolicy) -> PushOutcome {
        let size = item.size();
        let mut st = self.state.lock();
        if st.closed.is_some() {
            return PushOutcome::Closed;
        }
        let mut dropped = 0;
        if st.bytes + size > self.capacity {
            if policy == SlowPolicy::Conflate {
                let channel = item.channel();
                let before = st.items.len();
                let mut freed = 0;
                st.items.retain(|queued| {
                    let same = matches!(queued, Outbound::Message(_)) && queued.channel() == channel;
                    if same {
                        freed += queued.size();
                    }
                    !same
                });
                st.bytes -= freed;
                dropped += before - st.items.len();
            }
            if policy == SlowPolicy::Disconnect || size > self.capacity {
                st.items.clear();
                st.bytes = 0;
                st.closed = Some(CloseReason::SLOW);
                drop(st);
                self.notify.notify_one();
                return PushOutcome::Closed;
            }
            while st.bytes + size > self.capacity {
                let Some(old) = st.items.pop_front() else { break };
                st.bytes -= old.size();
                dropped += 1;
            }
        }
        st.bytes += size;
        st.peak_bytes = st.peak_bytes.max(st.bytes);
        st.dropped += dropped as u64;
        st.items.push_back(item);
        let was_empty = st.items.len() == 1;
        drop(st);
        if was_empty {
            self.notify.notify_one();
        }
        if dropped > 0 { PushOutcome::Dropped(dropped) } else { PushOutcome::Queued }
    }

    /// Closes the outbox: queued items are discarded, later pushes refused,
    /// and the consumer wakes to close the connection with `reason`.
    pub fn close(&self, reason: CloseReason) {
        let mut st = self.state.lock();
        if st.closed.is_none() {
            st.closed = Some(reason);
        }
        st.items.clear();
        st.bytes = 0;
        drop(st);
        self.notify.notify_one();
    }

    /// Moves every queued item into `out`. Returns the close reason instead
    /// once the outbox is closed.
    pub fn drain(&self, out: &mut Vec<Outbound>) -> Result<(), CloseReason> {
        let mut st = self.state.lock();
        if let Some(reason) = st.closed {
            return Err(reason);
        }
        out.extend(st.items.drain(..));
        st.bytes = 0;
        Ok(())
    }

    /// Waits until something was pushed or the outbox closed, then the
    /// write delay (if any). Cancel-safe: a wake-up lost to a dropped future
    /// is harmless because callers drain after every event anyway.
    pub async fn ready(&self) {
        self.notify.notified().await;
        if !self.write_delay.is_zero() {
            tokio::time::sleep(self.write_delay).await;
        }
    }
}

/// A request to open a session.
#[derive(Debug, Clone)]
pub struct OpenSession {
    /// The front end.
    pub protocol: proto::Protocol,
    /// Requested client id (open mode); empty for anonymous.
    pub client_id: String,
    /// Connection token; empty in open mode.
    pub token: String,
    /// Remote address, for logs and per-IP limits.
    pub peer: Option<SocketAddr>,
    /// The client id proven by a verified TLS client certificate (mTLS);
    /// `client_id` equals it when set.
    pub cert_identity: Option<String>,
}

/// An open session, as the front end sees it.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    /// Core id.
    pub id: SessionId,
    /// Client identity (may be empty: anonymous).
    pub client_id: String,
    /// Connection id, unique per session.
    pub connection_id: String,
    /// This gateway node's name.
    pub node: String,
    /// Where live deliveries arrive.
    pub outbox: Arc<Outbox>,
}

/// Result of a subscribe: the reply, then items to send before anything the
/// outbox holds (retained values, recovered or rewound messages, gaps).
#[derive(Debug, Default)]
pub struct SubscribeOutcome {
    /// The reply frame body.
    pub subscribed: proto::Subscribed,
    /// Sent after the reply and before live messages.
    pub replay: Vec<Outbound>,
}

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseKind {
    /// The client said goodbye: presence leaves at once.
    Clean,
    /// The connection dropped: presence leaves after the grace period
    /// unless the client comes back.
    Abrupt,
}

/// An error the core returns to a front end.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct CoreError {
    /// Protocol-level code.
    pub code: proto::ErrorCode,
    /// Human-readable detail.
    pub message: String,
}

impl CoreError {
    /// An error with a code and message.
    pub fn new(code: proto::ErrorCode, message: impl Into<String>) -> Self {
        CoreError { code, message: message.into() }
    }
}

/// Everything a front end may ask of the core.
#[async_trait::async_trait]
pub trait Core: Send + Sync + 'static {
    /// Opens a session (authenticates, assigns ids, creates the outbox).
    async fn open(&self, req: OpenSession) -> Result<SessionHandle, CoreError>;
    /// Subscribes a session to a channel or filter.
    async fn subscribe(&self, session: SessionId, req: proto::Subscribe) -> Result<SubscribeOutcome, CoreError>;
    /// Subscribes like [`Core::subscribe`], for a request that reached the
    /// gateway at `arrived_ns` ([`mono_ns`]): a channel the request names no
    /// position, time or rewind for also replays what history holds that
    /// was accepted after that instant, so a publish on another connection
    /// that the gateway happened to handle first is not lost.
    async fn subscribe_arrived(
        &self,
        session: SessionId,
        req: proto::Subscribe,
        arrived_ns: u64,
    ) -> Result<SubscribeOutcome, CoreError> {
        let _ = arrived_ns;
        self.subscribe(session, req).await
    }
    /// Removes a subscription.
    async fn unsubscribe(&self, session: SessionId, filter: &str) -> Result<(), CoreError>;
    /// Publishes; the ack carries the assigned position.
    async fn publish(&self, session: SessionId, req: proto::Publish) -> Result<proto::PublishAck, CoreError>;
    /// Enters (or updates, when `update`) the session's presence on a channel.
    async fn presence_enter(
        &self,
        session: SessionId,
        channel: &str,
        data: Bytes,
        update: bool,
    ) -> Result<(), CoreError>;
    /// Leaves presence on a channel.
    async fn presence_leave(&self, session: SessionId, channel: &str) -> Result<(), CoreError>;
    /// Lists a channel's presence members.
    async fn presence_members(&self, session: SessionId, channel: &str) -> Result<proto::PresenceMembers, CoreError>;
    /// Reads a channel's history.
    async fn history(&self, session: SessionId, req: proto::History) -> Result<proto::HistoryResult, CoreError>;
    /// Replaces the session's token in place: the session continues with
    /// the new token's capabilities and expiry. The client id cannot change.
    async fn refresh(&self, session: SessionId, token: &str) -> Result<(), CoreError> {
        let _ = (session, token);
        Err(CoreError::new(proto::ErrorCode::BadRequest, "token refresh needs token auth configured"))
    }
    /// Ends a session. Idempotent.
    fn close(&self, session: SessionId, kind: CloseKind);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(channel: &str, serial: u64, len: usize) -> Outbound {
        Outbound::Message(Delivery::new(proto::Envelope {
            channel: channel.into(),
            serial,
            payload: Bytes::from(vec![b'x'; len]),
            ..Default::default()
        }))
    }

    fn serials(ob: &Outbox) -> Vec<u64> {
        let mut out = Vec::new();
        ob.drain(&mut out).unwrap();
        out.iter()
            .map(|o| match o {
                Outbound::Message(d) => d.envelope.serial,
                Outbound::Gap(_) => 0,
            })
            .collect()
    }

    #[test]
    fn disconnect_policy_closes_and_never_exceeds_bound() {
        let one = msg("a", 1, 100).size();
        let ob = Outbox::new(one * 3);
        for s in 1..=3 {
            assert_eq!(ob.push(msg("a", s, 100), SlowPolicy::Disconnect), PushOutcome::Queued);
        }
        assert_eq!(ob.queued_bytes(), one * 3);
        assert_eq!(ob.push(msg("a", 4, 100), SlowPolicy::Disconnect), PushOutcome::Closed);
        assert_eq!(ob.closed(), Some(CloseReason::SLOW));
        assert_eq!(ob.queued_bytes(), 0);
        assert!(ob.peak_bytes() <= ob.capacity());
        assert_eq!(ob.push(msg("a", 5, 1), SlowPolicy::Disconnect), PushOutcome::Closed);
        assert_eq!(ob.drain(&mut Vec::new()), Err(CloseReason::SLOW));
    }

    #[test]
    fn drop_oldest_keeps_newest() {
        let one = msg("a", 1, 100).size();
        let ob = Outbox::new(one * 3);
        for s in 1..=5 {
            ob.push(msg("a", s, 100), SlowPolicy::DropOldest);
            assert!(ob.queued_bytes() <= ob.capacity());
        }
        assert_eq!(ob.dropped(), 2);
        assert_eq!(serials(&ob), vec![3, 4, 5]);
        assert!(ob.peak_bytes() <= ob.capacity());
    }

    #[test]
    fn conflate_keeps_latest_per_channel() {
        let one = msg("a", 1, 100).size();
        let ob = Outbox::new(one * 3);
        ob.push(msg("a", 1, 100), SlowPolicy::Conflate);
        ob.push(msg("b", 1, 100), SlowPolicy::Conflate);
        ob.push(msg("a", 2, 100), SlowPolicy::Conflate);
        // Full: the next "a" replaces both queued "a" items, "b" stays.
        assert_eq!(ob.push(msg("a", 3, 100), SlowPolicy::Conflate), PushOutcome::Dropped(2));
        let mut out = Vec::new();
        ob.drain(&mut out).unwrap();
        let got: Vec<_> = out
            .iter()
            .map(|o| match o {
                Outbound::Message(d) => (d.channel().to_string(), d.envelope.serial),
                Outbound::Gap(_) => unreachable!(),
            })
            .collect();
        assert_eq!(got, vec![("b".into(), 1), ("a".into(), 3)]);
    }

    #[test]
    fn oversize_item_closes_even_under_drop_oldest() {
        let ob = Outbox::new(200);
        assert_eq!(ob.push(msg("a", 1, 1000), SlowPolicy::DropOldest), PushOutcome::Closed);
    }

    /// With a write delay, `ready` returns that long after the first push
    /// (not before), and what was pushed meanwhile is drained with it.
    #[tokio::test(start_paused = true)]
    async fn write_delay_holds_the_wake_up_and_gathers_the_burst() {
        let delay = Duration::from_millis(5);
        let ob = Outbox::with_write_delay(10_000, delay);
        let started = tokio::time::Instant::now();
        let waiter = {
            let ob = ob.clone();
            tokio::spawn(async move {
                ob.ready().await;
                tokio::time::Instant::now()
            })
        };
        tokio::task::yield_now().await;
        ob.push(msg("a", 1, 10), SlowPolicy::Disconnect);
        tokio::time::advance(Duration::from_millis(2)).await;
        ob.push(msg("a", 2, 10), SlowPolicy::Disconnect);
        ob.push(msg("a", 3, 10), SlowPolicy::Disconnect);
        let woke = waiter.await.unwrap();
        assert!(woke - started >= delay, "woke after {:?}", woke - started);
        assert_eq!(serials(&ob), vec![1, 2, 3]);

        // Without one, `ready` returns with the push.
        let ob = Outbox::new(10_000);
        ob.push(msg("a", 1, 10), SlowPolicy::Disconnect);
        let before = tokio::time::Instant::now();
        ob.ready().await;
        assert_eq!(tokio::time::Instant::now(), before);
    }

    #[test]
    fn close_discards_and_reports_reason() {
        let ob = Outbox::new(10_000);
        ob.push(msg("a", 1, 10), SlowPolicy::Disconnect);
        ob.close(CloseReason::SHUTDOWN);
        assert_eq!(ob.drain(&mut Vec::new()), Err(CloseReason::SHUTDOWN));
        assert_eq!(ob.queued_bytes(), 0);
    }

    #[test]
    fn encodings_are_cached_and_shared() {
        let d = Delivery::new(proto::Envelope { channel: "a".into(), serial: 1, ..Default::default() });
        let p1 = d.proto_frame().clone();
        let p2 = d.proto_frame().clone();
        assert_eq!(p1.as_ptr(), p2.as_ptr());
        assert!(d.json_frame().starts_with("{\"type\":\"message\""));
    }
}
