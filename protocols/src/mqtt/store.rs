//! The port to the persistent-session store: what the MQTT front end asks
//! of the core about sessions that outlive a connection.
//!
//! The front end translates; it does not store. It claims its client id
//! when a connection opens (and learns whether a stored session resumes, or
//! another connection of the same client must hand its session over),
//! checkpoints a persistent session's state as it changes, releases it when
//! the connection ends, and asks whether a delayed will is still due. The
//! gateway implements [`SessionStore`] in its core, in memory or on disk
//! (`[storage]`); front-end tests use a fake.
//!
//! A session at rest is its [`SessionState`] as the front end left it. What
//! is written to disk is the state's [`SessionRecord`](super::session::SessionRecord): subscriptions, the
//! position delivered per channel (lowered below any message still queued
//! or unacknowledged, so a restart replays those from history instead of
//! losing them) and the inbound QoS 2 ids awaiting PUBREL.

use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

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
    /// A store shared by several nodes is looking the session up (and, if
    /// another node's connection holds it, taking it over from there): the
    /// stored session (`None`: nothing stored), or why the store cannot
    /// answer (the connection is then refused as server unavailable).
    Lookup(oneshot::Receiver<Result<Option<Box<StoredSession>>, String>>),
}

/// A connection's hold on its client id.
#[derive(Debug)]
pub struct Ticket {
    /// Unique per claim.
    pub conn: u64,
    /// Fires with a handover channel when another connection takes over.
    pub kick: oneshot::Receiver<Handover>,
}

/// The persistent-session store, as the front end sees it.
pub trait SessionStore: Send + Sync + std::fmt::Debug + 'static {
    /// Takes the client id for a new connection. Cancels a delayed will of
    /// the same client (MQTT 5 §3.1.3.2.2: a reconnect before the delay
    /// ends means the will is not sent).
    fn claim(&self, client_id: &str, now: Instant) -> (Ticket, Claim);
    /// A connection ends. Stores `session` for `expiry` (capped) if the
    /// client id is still this connection's; after a takeover the state
    /// went through the handover instead and this is a no-op.
    fn release(&self, client_id: &str, conn: u64, session: Option<Box<StoredSession>>, expiry: Duration, now: Instant);
    /// The state of a live persistent session changed (a subscription, a
    /// delivery, an acknowledgement): a store that outlives the process
    /// records it, so a crash resumes from here. Called before the
    /// acknowledgement of the change is written to the client.
    fn checkpoint(&self, client_id: &str, conn: u64, state: &SessionState, expiry: Duration) {
        let _ = (client_id, conn, state, expiry);
    }
    /// QoS 1/2 messages are about to be written to the client (`state`
    /// records them as sent): a store that outlives the node and writes
    /// asynchronously returns when it has the record, and the connection
    /// waits for that before writing, so a resume after a crash sends
    /// those messages again with DUP rather than as new ones. Stores that
    /// record synchronously checkpoint and return `None`.
    fn before_send(
        &self,
        client_id: &str,
        conn: u64,
        state: &SessionState,
        expiry: Duration,
    ) -> Option<oneshot::Receiver<()>> {
        self.checkpoint(client_id, conn, state, expiry);
        None
    }
    /// The longest a session may be kept.
    fn expiry_max(&self) -> Duration;
    /// Registers a delayed will, replacing (and cancelling) any other of
    /// the same client. `None` when the node already holds its maximum of
    /// delayed wills: the caller publishes the will at once instead.
    fn delay_will(&self, client_id: &str) -> Option<DelayedWill>;
    /// True (once) if the delayed will `token` is still due: the client did
    /// not reconnect in the meantime.
    fn take_will(&self, client_id: &str, token: u64) -> bool;
}

/// A delayed will as registered: its token for [`SessionStore::take_will`],
/// and the signal that it was cancelled (by a reconnect of its client, or a
/// newer will of the same client), so whoever waits for the delay stops
/// waiting, and lets go of what it holds, at once.
#[derive(Debug, Clone)]
pub struct DelayedWill {
    /// For [`SessionStore::take_will`].
    pub token: u64,
    /// Notified when the will is cancelled.
    pub cancelled: std::sync::Arc<tokio::sync::Notify>,
}
