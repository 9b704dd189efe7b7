//! [`MqttSessions`]: the persistent-session store shared by every MQTT
//! connection of this gateway node.
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
//! It deliberately does not survive a restart or span a cluster: sessions
//! live in this process's memory. Positions in a stored session stay valid
//! on another node (they are channel positions), so a client that lands
//! elsewhere gets a fresh session and at worst re-subscribes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::info;

use super::session::SessionState;

/// A session at rest.
#[derive(Debug, Default)]
pub struct StoredSession {
    /// Subscriptions, positions, inflight messages, inbound QoS 2 ids.
    pub state: SessionState,
    /// When the client went away (Unix ms): the resume's `since_ms`, so that
    /// channels first published while it was offline are delivered too.
    pub disconnected_ms: u64,
}

/// Sent to a connection that is being taken over: it replies with its
/// session (or `None` if the session does not persist) as it closes.
pub type Handover = oneshot::Sender<Option<Box<StoredSession>>>;

/// What a new connection finds for its client id.
#[derive(Debug)]
pub enum Claim {
    /// Nothing stored (or it expired).
    Fresh,
    /// A stored session, now owned by the caller.
    Resumed(Box<StoredSession>),
    /// Another connection held the session; it has been told to close and
    /// will send its state here (`Err` if it vanished without doing so).
    Takeover(oneshot::Receiver<Option<Box<StoredSession>>>),
}

/// A connection's hold on its client id.
#[derive(Debug)]
pub struct Ticket {
    /// Unique per claim.
    pub conn: u64,
    /// Fires with a handover channel when another connection takes over.
    pub kick: oneshot::Receiver<Handover>,
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
}

/// The persistent-session store (see the module docs).
#[derive(Debug)]
pub struct MqttSessions {
    limits: StoreLimits,
    slots: Mutex<HashMap<String, Slot>>,
    /// Client id → token of the delayed will waiting for it.
    wills: Mutex<HashMap<String, u64>>,
    next: AtomicU64,
}

impl MqttSessions {
    /// An empty store with the limits of `cfg`.
    pub fn new(cfg: &super::MqttConfig) -> Self {
        Self::with_limits(StoreLimits { max_sessions: cfg.max_sessions, expiry_max: cfg.session_expiry_max })
    }

    /// An empty store.
    pub fn with_limits(limits: StoreLimits) -> Self {
        MqttSessions {
            limits,
            slots: Mutex::new(HashMap::new()),
            wills: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
        }
    }

    /// The longest a session may be kept.
    pub fn expiry_max(&self) -> Duration {
        self.limits.expiry_max
    }

    /// Sessions stored (not live) now.
    pub fn stored(&self) -> usize {
        self.slots.lock().values().filter(|s| matches!(s, Slot::Stored { .. })).count()
    }

    /// Takes the client id for a new connection. Cancels a delayed will of
    /// the same client (MQTT 5 §3.1.3.2.2: a reconnect before the delay
    /// ends means the will is not sent).
    pub fn claim(&self, client_id: &str, now: Instant) -> (Ticket, Claim) {
        self.wills.lock().remove(client_id);
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
    pub fn release(
        &self,
        client_id: &str,
        conn: u64,
        session: Option<Box<StoredSession>>,
        expiry: Duration,
        now: Instant,
    ) {
        let mut slots = self.slots.lock();
        if !matches!(slots.get(client_id), Some(Slot::Live { conn: c, .. }) if *c == conn) {
            return;
        }
        let expiry = expiry.min(self.limits.expiry_max);
        let Some(session) = session.filter(|_| !expiry.is_zero()) else {
            slots.remove(client_id);
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
                }
                None => {
                    info!(client_id, max = self.limits.max_sessions, "session store full; session not stored");
                    slots.remove(client_id);
                    return;
                }
            }
        }
        slots.insert(client_id.to_string(), Slot::Stored { session, expires_at: now + expiry });
    }

    /// Drops expired sessions. Returns how many.
    pub fn sweep(&self, now: Instant) -> usize {
        let mut slots = self.slots.lock();
        let before = slots.len();
        slots.retain(|_, s| !matches!(s, Slot::Stored { expires_at, .. } if *expires_at <= now));
        before - slots.len()
    }

    /// Registers a delayed will; returns its token for [`Self::take_will`].
    pub fn delay_will(&self, client_id: &str) -> u64 {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        self.wills.lock().insert(client_id.to_string(), token);
        token
    }

    /// True (once) if the delayed will `token` is still due: the client did
    /// not reconnect in the meantime.
    pub fn take_will(&self, client_id: &str, token: u64) -> bool {
        let mut wills = self.wills.lock();
        if wills.get(client_id) == Some(&token) {
            wills.remove(client_id);
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::session::Subscription;

    fn store(max: usize) -> MqttSessions {
        MqttSessions::with_limits(StoreLimits { max_sessions: max, expiry_max: Duration::from_secs(100) })
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

    #[test]
    fn reconnect_cancels_a_delayed_will() {
        let st = store(2);
        let token = st.delay_will("a");
        assert!(st.take_will("a", token));
        assert!(!st.take_will("a", token), "only once");
        let token = st.delay_will("a");
        let _ = st.claim("a", Instant::now());
        assert!(!st.take_will("a", token));
    }
}
