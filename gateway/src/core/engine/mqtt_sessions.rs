//! [`MqttSessions`]: the core's store of MQTT persistent sessions, shared
//! by every MQTT connection of this node (TCP, TLS, WebSocket); the front
//! end reaches it through the [`SessionStore`] port.
//!
//! One slot per client id. A slot is either `Live` (a connection owns the
//! session) or `Stored` (the client is away; the session waits until it
//! expires). Claiming a live slot is a session takeover (MQTT 3.1.1 §3.1.4
//! step 2, MQTT 5 §3.1.4): the store kicks the old connection with a
//! handover channel, and the old connection sends its session state through
//! it as it closes, so the state moves to the new connection without going
//! through storage. The store also tracks delayed wills (MQTT 5 will delay
//! interval) so that a reconnect cancels them.
//!
//! It is bounded: at most `max_sessions` stored sessions (storing one more
//! evicts the one closest to expiry, with a log line), each kept at most
//! its expiry. [`MqttSessions::sweep`] drops expired ones; the gateway
//! calls it periodically.
//!
//! With a [`DiskStore`], every stored session and every checkpoint of a
//! live persistent session is also written to disk as a
//! [`SessionRecord`]; at start the sessions on disk come back as stored
//! sessions (a session that was live at a crash resumes from its last
//! checkpoint, with the expiry it had then). Delayed wills are not kept
//! across a restart.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use prost::Message as _;
use switchboard_protocols::mqtt::session::{SessionRecord, SessionState};
use switchboard_protocols::mqtt::{Claim, DelayedWill, Handover, SessionStore, StoredSession, Ticket};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::info;

use super::disk::DiskStore;
use crate::core::router::now_ms;

/// A session as written to disk.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredMqttSession {
    /// What resumes.
    #[prost(message, optional, tag = "1")]
    pub record: Option<SessionRecord>,
    /// Unix ms when the session expires.
    #[prost(uint64, tag = "2")]
    pub expires_ms: u64,
    /// Unix ms when the client went away (or of the checkpoint).
    #[prost(uint64, tag = "3")]
    pub disconnected_ms: u64,
    /// On a store shared by nodes (NATS): the node incarnation whose
    /// connection holds the session; empty while the client is away.
    #[prost(string, tag = "4")]
    pub owner: String,
}

#[derive(Debug)]
enum Slot {
    Live { conn: u64, kick: Option<oneshot::Sender<Handover>> },
    Stored { session: Box<StoredSession>, expires_at: Instant },
}

/// Limits of the store.
#[derive(Debug, Clone, Copy)]
pub struct StoreLimits {
    /// Most sessions stored at once.
    pub max_sessions: usize,
    /// Longest a stored session is kept.
    pub expiry_max: Duration,
    /// Most delayed wills waiting on the node (one per client id at most).
    pub max_delayed_wills: usize,
}

/// The persistent-session store (see the module docs).
#[derive(Debug)]
pub struct MqttSessions {
    limits: StoreLimits,
    slots: Mutex<HashMap<String, Slot>>,
    /// Client id → the delayed will waiting for it.
    wills: Mutex<HashMap<String, DelayedWill>>,
    next: AtomicU64,
    disk: Option<Arc<DiskStore>>,
}

impl MqttSessions {
    /// An empty store in memory.
    pub fn with_limits(limits: StoreLimits) -> Self {
        MqttSessions {
            limits,
            slots: Mutex::new(HashMap::new()),
            wills: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            disk: None,
        }
    }

    /// A store over `disk`, with the sessions it holds that have not
    /// expired at `now` (`now_unix_ms` in Unix time). A record that does
    /// not decode is dropped with an error line (the client starts a fresh
    /// session) rather than refusing to start.
    pub fn on_disk(limits: StoreLimits, disk: Arc<DiskStore>, now: Instant, now_unix_ms: u64) -> Self {
        let mut slots = HashMap::new();
        for (client_id, bytes) in disk.load_mqtt_sessions() {
            let rec = match StoredMqttSession::decode(bytes.as_slice()) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(client_id, error = %e, "an MQTT session on disk does not decode; dropped");
                    disk.remove_mqtt_session(&client_id);
                    continue;
                }
            };
            if rec.expires_ms <= now_unix_ms {
                disk.remove_mqtt_session(&client_id);
                continue;
            }
            let state = SessionState::from_record(rec.record.unwrap_or_default());
            let session = Box::new(StoredSession { state, disconnected_ms: rec.disconnected_ms });
            let expires_at = now + Duration::from_millis(rec.expires_ms - now_unix_ms);
            slots.insert(client_id, Slot::Stored { session, expires_at });
        }
        info!(sessions = slots.len(), "MQTT sessions loaded");
        MqttSessions { disk: Some(disk), slots: Mutex::new(slots), ..Self::with_limits(limits) }
    }

    /// Sessions stored (not live) now.
    pub fn stored(&self) -> usize {
        self.slots.lock().values().filter(|s| matches!(s, Slot::Stored { .. })).count()
    }

    fn write(&self, client_id: &str, state: &SessionState, expiry: Duration, disconnected_ms: u64) {
        let Some(disk) = &self.disk else { return };
        let now = now_ms().max(0) as u64;
        let rec = StoredMqttSession {
            record: Some(state.to_record()),
            expires_ms: now.saturating_add(expiry.as_millis() as u64),
            disconnected_ms,
            owner: String::new(),
        };
        disk.put_mqtt_session(client_id, &rec.encode_to_vec());
    }

    fn forget(&self, client_id: &str) {
        if let Some(disk) = &self.disk {
            disk.remove_mqtt_session(client_id);
        }
    }

    /// Drops expired sessions. Returns how many.
    pub fn sweep(&self, now: Instant) -> usize {
        let mut slots = self.slots.lock();
        let mut gone = Vec::new();
        slots.retain(|k, s| {
            let expired = matches!(s, Slot::Stored { expires_at, .. } if *expires_at <= now);
            if expired {
                gone.push(k.clone());
            }
            !expired
        });
        drop(slots);
        for k in &gone {
            self.forget(k);
        }
        gone.len()
    }
}

impl MqttSessions {
    /// Whether connection `conn` still holds `client_id`.
    pub fn is_live(&self, client_id: &str, conn: u64) -> bool {
        matches!(self.slots.lock().get(client_id), Some(Slot::Live { conn: c, .. }) if *c == conn)
    }

    /// Takes the session away from the connection of `client_id` on this
    /// node, if one holds it: the connection closes (MQTT 5: DISCONNECT
    /// 0x8E) and sends its session through the returned channel.
    pub fn kick(&self, client_id: &str) -> Option<oneshot::Receiver<Option<Box<StoredSession>>>> {
        let mut slots = self.slots.lock();
        let Some(Slot::Live { kick, .. }) = slots.get_mut(client_id) else { return None };
        let kick = kick.take()?;
        slots.remove(client_id);
        let (tx, rx) = oneshot::channel();
        kick.send(tx).ok()?;
        Some(rx)
    }

    /// Cancels `client_id`'s delayed will, if one waits here (its client
    /// connected again, on another node).
    pub fn cancel_will(&self, client_id: &str) -> bool {
        match self.wills.lock().remove(client_id) {
            Some(w) => {
                w.cancelled.notify_one();
                true
            }
            None => false,
        }
    }

    /// Delayed wills waiting now.
    pub fn delayed_wills(&self) -> usize {
        self.wills.lock().len()
    }
}

impl SessionStore for MqttSessions {
    fn expiry_max(&self) -> Duration {
        self.limits.expiry_max
    }

    /// Takes the client id for a new connection. Cancels a delayed will of
    /// the same client (MQTT 5 §3.1.3.2.2: a reconnect before the delay
    /// ends means the will is not sent).
    fn claim(&self, client_id: &str, now: Instant) -> (Ticket, Claim) {
        if let Some(w) = self.wills.lock().remove(client_id) {
            w.cancelled.notify_one();
        }
        let conn = self.next.fetch_add(1, Ordering::Relaxed);
        let (kick_tx, kick) = oneshot::channel();
        let new = Slot::Live { conn, kick: Some(kick_tx) };
        let old = self.slots.lock().insert(client_id.to_string(), new);
        let claim = match old {
            None => Claim::Fresh,
            Some(Slot::Stored { expires_at, .. }) if expires_at <= now => Claim::Fresh,
            Some(Slot::Stored { session, .. }) => Claim::Resumed(session),
            Some(Slot::Live { kick, .. }) => {
                let (tx, rx) = oneshot::channel();
                match kick.map(|k| k.send(tx)) {
                    Some(Ok(())) => Claim::Takeover(rx),
                    // The old connection is already gone and released
                    // nothing: nothing to take over.
                    _ => Claim::Fresh,
                }
            }
        };
        (Ticket { conn, kick }, claim)
    }

    /// A connection ends. Stores `session` for `expiry` (capped) if the
    /// client id is still this connection's; after a takeover the state
    /// went through the handover instead and this is a no-op.
    fn release(&self, client_id: &str, conn: u64, session: Option<Box<StoredSession>>, expiry: Duration, now: Instant) {
        let mut slots = self.slots.lock();
        if !matches!(slots.get(client_id), Some(Slot::Live { conn: c, .. }) if *c == conn) {
            return;
        }
        let expiry = expiry.min(self.limits.expiry_max);
        let Some(session) = session.filter(|_| !expiry.is_zero()) else {
            slots.remove(client_id);
            drop(slots);
            self.forget(client_id);
            return;
        };
        let stored = slots.values().filter(|s| matches!(s, Slot::Stored { .. })).count();
        if stored >= self.limits.max_sessions {
            let oldest = slots
                .iter()
                .filter_map(|(k, s)| match s {
                    Slot::Stored { expires_at, .. } => Some((*expires_at, k.clone())),
                    Slot::Live { .. } => None,
                })
                .min();
            match oldest {
                Some((_, victim)) => {
                    info!(client_id = %victim, max = self.limits.max_sessions, "session store full; evicting the session closest to expiry");
                    slots.remove(&victim);
                    self.forget(&victim);
                }
                None => {
                    info!(client_id, max = self.limits.max_sessions, "session store full; session not stored");
                    slots.remove(client_id);
                    drop(slots);
                    self.forget(client_id);
                    return;
                }
            }
        }
        // Written under the lock, so a claim that follows cannot be
        // overtaken by this write.
        self.write(client_id, &session.state, expiry, session.disconnected_ms);
        slots.insert(client_id.to_string(), Slot::Stored { session, expires_at: now + expiry });
    }

    fn checkpoint(&self, client_id: &str, conn: u64, state: &SessionState, expiry: Duration) {
        if self.disk.is_none() {
            return;
        }
        let slots = self.slots.lock();
        if matches!(slots.get(client_id), Some(Slot::Live { conn: c, .. }) if *c == conn) {
            self.write(client_id, state, expiry.min(self.limits.expiry_max), now_ms().max(0) as u64);
        }
    }

    /// Registers a delayed will (see [`SessionStore::delay_will`]).
    fn delay_will(&self, client_id: &str) -> Option<DelayedWill> {
        let mut wills = self.wills.lock();
        if !wills.contains_key(client_id) && wills.len() >= self.limits.max_delayed_wills {
            return None;
        }
        let will = DelayedWill {
            token: self.next.fetch_add(1, Ordering::Relaxed),
            cancelled: Arc::new(tokio::sync::Notify::new()),
        };
        if let Some(old) = wills.insert(client_id.to_string(), will.clone()) {
            old.cancelled.notify_one();
        }
        Some(will)
    }

    /// True (once) if the delayed will `token` is still due: the client did
    /// not reconnect in the meantime.
    fn take_will(&self, client_id: &str, token: u64) -> bool {
        let mut wills = self.wills.lock();
        if wills.get(client_id).is_some_and(|w| w.token == token) {
            wills.remove(client_id);
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_protocols::mqtt::session::Subscription;

    fn store(max: usize) -> MqttSessions {
        MqttSessions::with_limits(StoreLimits {
            max_sessions: max,
            expiry_max: Duration::from_secs(100),
            max_delayed_wills: 2,
        })
    }

    fn session(filter: &str) -> Box<StoredSession> {
        let mut s = StoredSession::default();
        s.state.subscribe(Subscription {
            filter: filter.into(),
            qos: 1,
            no_local: false,
            retain_as_published: false,
            id: None,
        });
        Box::new(s)
    }

    #[test]
    fn resume_after_release_then_expiry() {
        let st = store(10);
        let t0 = Instant::now();
        let (t, c) = st.claim("a", t0);
        assert!(matches!(c, Claim::Fresh));
        st.release("a", t.conn, Some(session("x")), Duration::from_secs(10), t0);
        assert_eq!(st.stored(), 1);
        let (t2, c) = st.claim("a", t0 + Duration::from_secs(5));
        let Claim::Resumed(s) = c else { panic!("{c:?}") };
        assert_eq!(s.state.subs[0].filter, "x");
        // Expiry is capped by the store's maximum.
        st.release("a", t2.conn, Some(s), Duration::from_secs(1000), t0);
        assert_eq!(st.sweep(t0 + Duration::from_secs(99)), 0);
        assert_eq!(st.sweep(t0 + Duration::from_secs(100)), 1);
        assert!(matches!(st.claim("a", t0 + Duration::from_secs(101)).1, Claim::Fresh));
    }

    #[test]
    fn expired_but_unswept_is_fresh_and_zero_expiry_is_not_stored() {
        let st = store(10);
        let t0 = Instant::now();
        let (t, _) = st.claim("a", t0);
        st.release("a", t.conn, Some(session("x")), Duration::from_secs(1), t0);
        assert!(matches!(st.claim("a", t0 + Duration::from_secs(2)).1, Claim::Fresh));
        let (t, _) = st.claim("b", t0);
        st.release("b", t.conn, Some(session("x")), Duration::ZERO, t0);
        assert!(matches!(st.claim("b", t0).1, Claim::Fresh));
    }

    #[tokio::test]
    async fn takeover_hands_the_session_over() {
        let st = store(10);
        let t0 = Instant::now();
        let (old, _) = st.claim("a", t0);
        let (new, c) = st.claim("a", t0);
        let Claim::Takeover(rx) = c else { panic!("{c:?}") };
        // The old connection is kicked and hands its state over.
        let handover = old.kick.await.expect("kicked");
        handover.send(Some(session("y"))).expect("new side waits");
        let s = rx.await.expect("handover").expect("persistent");
        assert_eq!(s.state.subs[0].filter, "y");
        // The old connection's release is ignored: the slot is the new one's.
        st.release("a", old.conn, Some(session("stale")), Duration::from_secs(10), t0);
        assert_eq!(st.stored(), 0);
        st.release("a", new.conn, Some(session("z")), Duration::from_secs(10), t0);
        let Claim::Resumed(s) = st.claim("a", t0).1 else { panic!() };
        assert_eq!(s.state.subs[0].filter, "z");
    }

    #[test]
    fn bounded_evicts_closest_to_expiry() {
        let st = store(2);
        let t0 = Instant::now();
        for (id, secs) in [("a", 50), ("b", 10), ("c", 30)] {
            let (t, _) = st.claim(id, t0);
            st.release(id, t.conn, Some(session(id)), Duration::from_secs(secs), t0);
        }
        assert_eq!(st.stored(), 2);
        assert!(matches!(st.claim("b", t0).1, Claim::Fresh), "b was closest to expiry");
        assert!(matches!(st.claim("a", t0).1, Claim::Resumed(_)));
    }

    /// A reconnect cancels a delayed will and wakes its waiter at once; a
    /// newer will of the same client replaces the older one (#13 item 7: a
    /// client reconnecting in a loop held one waiting will per connection).
    #[tokio::test]
    async fn reconnect_cancels_a_delayed_will_at_once() {
        let st = store(2);
        let w = st.delay_will("a").expect("room");
        assert!(st.take_will("a", w.token));
        assert!(!st.take_will("a", w.token), "only once");
        let w = st.delay_will("a").expect("room");
        let _ = st.claim("a", Instant::now());
        tokio::time::timeout(Duration::from_secs(1), w.cancelled.notified()).await.expect("the waiter is woken");
        assert!(!st.take_will("a", w.token));
        let first = st.delay_will("b").expect("room");
        let second = st.delay_will("b").expect("a newer will replaces the first");
        tokio::time::timeout(Duration::from_secs(1), first.cancelled.notified()).await.expect("the first is cancelled");
        assert!(!st.take_will("b", first.token) && st.take_will("b", second.token));
    }

    /// The node holds at most `max_delayed_wills` (here 2): one more is
    /// refused, and the caller publishes it at once.
    #[test]
    fn delayed_wills_are_capped_per_node() {
        let st = store(2);
        assert!(st.delay_will("a").is_some() && st.delay_will("b").is_some());
        assert!(st.delay_will("c").is_none(), "a third client's will");
        assert!(st.delay_will("a").is_some(), "replacing a held one is not one more");
        assert_eq!(st.delayed_wills(), 2);
    }
}
