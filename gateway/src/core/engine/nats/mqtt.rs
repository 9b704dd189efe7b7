//! MQTT persistent sessions on the NATS engine: one key per client id in
//! the KV bucket `{stream}_mqtt`, so a device resumes its session on
//! whichever node it reconnects to.
//!
//! The record is the one the disk store writes ([`StoredMqttSession`]):
//! subscriptions, the position delivered per channel (lowered below any
//! message still unacknowledged), inbound QoS 2 ids, when it expires and
//! when the client went away, plus `owner`: the node incarnation whose
//! connection holds the session, or empty while the client is away.
//!
//! A connection claims its client id on its own node first (a second
//! connection on the same node takes over as on one node), then looks the
//! record up:
//! - no record, or an expired one: a fresh session;
//! - a record at rest, or owned by a node whose heartbeat is gone: resumed;
//! - owned by a live node: that node is asked (NATS request on
//!   `{subject}.mqtt.kick.{incarnation}`) to take the session from its
//!   connection, which closes with MQTT 5 reason 0x8E and hands its state
//!   over; the node writes it back at rest and answers, and the lookup reads
//!   it again.
//!
//! Taking the record writes `owner` with the revision just read, so two
//! nodes claiming at once cannot both win. Checkpoints of a live session
//! (a subscription, an acknowledged delivery, an inbound QoS 2 id) and the
//! release at disconnect go through one writer per node, which keeps each
//! client's writes in order and folds a client's queued writes into the
//! newest. Delayed wills stay on the node that holds the connection.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;
use prost::Message as _;
use switchboard_protocols::mqtt::session::SessionState;
use switchboard_protocols::mqtt::{Claim, DelayedWill, SessionStore, StoredSession, Ticket};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::{NatsEngine, NatsError, subjects};
use crate::core::engine::mqtt_sessions::{MqttSessions, StoreLimits, StoredMqttSession};
use crate::core::router::now_ms;

/// How often a lookup rereads a record another node changed meanwhile.
const LOOKUP_TRIES: usize = 8;

/// Most client ids a node remembers as taken by other nodes, and for how
/// long at least (a connection of this node that ends later than that
/// after another node took its client has long been told).
const ELSEWHERE_MAX: usize = 65_536;
const ELSEWHERE_KEEP: Duration = Duration::from_secs(60);

/// How long a lookup waits for the node that holds a session to let go.
const KICK_WAIT: Duration = Duration::from_secs(3);

/// One write of the writer: a record, or `None` to delete it.
struct Write {
    client_id: String,
    value: Option<Bytes>,
    done: Option<oneshot::Sender<()>>,
}

/// A client's newest record waiting for the writer, and how many writes
/// it stands for.
struct Pending {
    value: Option<Bytes>,
    done: Vec<oneshot::Sender<()>>,
    folded: usize,
}

/// The MQTT session store of a node on the NATS engine (see the module
/// docs).
#[derive(Debug)]
pub struct NatsSessions {
    /// This node's live connections, takeovers between them, delayed wills.
    local: MqttSessions,
    kv: kv::Store,
    nodes: kv::Store,
    client: async_nats::Client,
    incarnation: String,
    kick_root: String,
    /// `{subject}.mqtt.connected`: `.{incarnation}` carries the client ids
    /// that connected on that node.
    resumed_root: String,
    /// Client id → (connection, when) this node last took it.
    claimed: Mutex<HashMap<String, (u64, Instant)>>,
    /// Client id → when another node said it took it (at most
    /// [`ELSEWHERE_MAX`], older than [`ELSEWHERE_KEEP`] dropped first).
    elsewhere: Mutex<HashMap<String, Instant>>,
    writes: mpsc::UnboundedSender<Write>,
    /// Writes asked for and not yet done (folded ones included).
    queued: Arc<AtomicUsize>,
    /// Writes NATS refused or did not answer, since the start.
    failed: Arc<AtomicUsize>,
    /// The expiry each live session asked for, for a handover written back.
    expiries: Mutex<HashMap<String, Duration>>,
    this: std::sync::Weak<NatsSessions>,
}

fn key(client_id: &str) -> String {
    subjects::token(client_id)
}

impl NatsSessions {
    /// The store of `engine`'s node: its bucket, its writer and the
    /// handler of other nodes' takeovers.
    pub async fn start(engine: &NatsEngine, limits: StoreLimits) -> Result<Arc<Self>, NatsError> {
        let bucket = format!("{}_mqtt", engine.opts.stream);
        let max_age = limits.expiry_max.max(Duration::from_secs(1));
        let kv = NatsEngine::bucket(&engine.js, &engine.opts, &bucket, max_age, 1).await?;
        let (writes, queue) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let kick_root = format!("{}.mqtt.kick", engine.opts.subject);
        let resumed_root = format!("{}.mqtt.connected", engine.opts.subject);
        let store = Arc::new_cyclic(|this| NatsSessions {
            this: this.clone(),
            local: MqttSessions::with_limits(limits),
            kv,
            nodes: engine.presence.nodes.clone(),
            client: engine.client.clone(),
            incarnation: engine.presence.incarnation.clone(),
            kick_root,
            resumed_root,
            claimed: Mutex::new(HashMap::new()),
            elsewhere: Mutex::new(HashMap::new()),
            writes,
            queued: queued.clone(),
            failed: failed.clone(),
            expiries: Mutex::new(HashMap::new()),
        });
        tokio::spawn(Self::run_writer(store.kv.clone(), queue, queued, failed));
        let kicks = format!("{}.{}", store.kick_root, store.incarnation);
        Self::listen(&store, kicks, |store, msg| {
            tokio::spawn(async move { store.handle_kick(msg).await });
        })
        .await?;
        // A device that connects again on another node cancels the delayed
        // will this node holds for it (MQTT 5 §3.1.3.2.2).
        Self::listen(&store, format!("{}.*", store.resumed_root), |store, msg| store.handle_connected(&msg)).await?;
        Ok(store)
    }

    /// Writes each client's newest record, clients in the order they
    /// first asked. Before every write the queue is drained into the
    /// pending set, a client's newer write replacing its older one, so what
    /// waits is at most one record per client however slow NATS is.
    async fn run_writer(
        kv: kv::Store,
        mut queue: mpsc::UnboundedReceiver<Write>,
        queued: Arc<AtomicUsize>,
        failed: Arc<AtomicUsize>,
    ) {
        let mut order: VecDeque<String> = VecDeque::new();
        let mut pending: HashMap<String, Pending> = HashMap::new();
        loop {
            if pending.is_empty() {
                let Some(w) = queue.recv().await else { return };
                Self::fold(&mut order, &mut pending, w);
            }
            while let Ok(w) = queue.try_recv() {
                Self::fold(&mut order, &mut pending, w);
            }
            let Some(client_id) = order.pop_front() else { continue };
            let Some(Pending { value, done, folded }) = pending.remove(&client_id) else { continue };
            let k = key(&client_id);
            let result = match value {
                Some(v) => kv.put(k.as_str(), v).await.map(|_| ()).map_err(|e| e.to_string()),
                None => kv.purge(k.as_str()).await.map_err(|e| e.to_string()),
            };
            if let Err(e) = result {
                failed.fetch_add(1, Ordering::AcqRel);
                tracing::warn!(client_id, error = %e, "MQTT session: write to NATS failed");
            }
            for d in done {
                let _ = d.send(());
            }
            queued.fetch_sub(folded, Ordering::AcqRel);
        }
    }

    fn fold(order: &mut VecDeque<String>, pending: &mut HashMap<String, Pending>, w: Write) {
        match pending.get_mut(&w.client_id) {
            Some(p) => {
                p.value = w.value;
                p.done.extend(w.done);
                p.folded += 1;
            }
            None => {
                order.push_back(w.client_id.clone());
                pending.insert(w.client_id, Pending { value: w.value, done: w.done.into_iter().collect(), folded: 1 });
            }
        }
    }

    /// Notes that `client_id` connected on another node now.
    fn note_elsewhere(&self, client_id: &str) {
        let mut elsewhere = self.elsewhere.lock();
        if elsewhere.len() >= ELSEWHERE_MAX {
            let now = Instant::now();
            elsewhere.retain(|_, at| now.duration_since(*at) < ELSEWHERE_KEEP);
        }
        if elsewhere.len() < ELSEWHERE_MAX {
            elsewhere.insert(client_id.to_string(), Instant::now());
        }
    }

    /// Session writes NATS refused or did not answer, since the start.
    pub fn failed(&self) -> usize {
        self.failed.load(Ordering::Acquire)
    }

    /// Session writes asked for and not yet done.
    pub fn pending(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Waits until every queued session write is done, at most `within`;
    /// false if some are still queued then.
    pub async fn flush(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while self.pending() > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    fn record(&self, state: &SessionState, expiry: Duration, disconnected_ms: u64, owner: &str) -> Bytes {
        let now = now_ms().max(0) as u64;
        StoredMqttSession {
            record: Some(state.to_record()),
            expires_ms: now.saturating_add(expiry.as_millis() as u64),
            disconnected_ms,
            owner: owner.to_string(),
        }
        .encode_to_vec()
        .into()
    }

    fn write(&self, client_id: &str, value: Option<Bytes>, done: Option<oneshot::Sender<()>>) {
        self.queued.fetch_add(1, Ordering::AcqRel);
        if self.writes.send(Write { client_id: client_id.to_string(), value, done }).is_err() {
            self.queued.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Subscribes to `subject` and hands each message to `on` for as long
    /// as the store lives.
    async fn listen(
        store: &Arc<Self>,
        subject: String,
        on: fn(Arc<Self>, async_nats::Message),
    ) -> Result<(), NatsError> {
        let mut messages = store
            .client
            .subscribe(subject.clone())
            .await
            .map_err(|e| NatsError::JetStream { what: subject, reason: e.to_string() })?;
        let handler = Arc::downgrade(store);
        tokio::spawn(async move {
            while let Some(msg) = messages.next().await {
                let Some(store) = handler.upgrade() else { return };
                on(store, msg);
            }
        });
        Ok(())
    }

    /// Another node announced that a client connected there: a delayed will
    /// this node holds for it is not sent.
    fn handle_connected(&self, msg: &async_nats::Message) {
        let from = msg.subject.rsplit('.').next().unwrap_or_default();
        if from == self.incarnation {
            return;
        }
        let client_id = String::from_utf8_lossy(&msg.payload);
        self.note_elsewhere(&client_id);
        if self.local.cancel_will(&client_id) {
            tracing::info!(client_id = %client_id, "MQTT: delayed will cancelled; the client connected to another node");
        }
    }

    /// Another node takes one of this node's sessions: the connection hands
    /// its state over, it is written back at rest, then the asker is told.
    async fn handle_kick(&self, msg: async_nats::Message) {
        let client_id = String::from_utf8_lossy(&msg.payload).into_owned();
        if let Some(handover) = self.local.kick(&client_id) {
            tracing::info!(client_id, "MQTT session taken over by another node");
            let expiry = self.expiries.lock().remove(&client_id).unwrap_or(self.local.expiry_max());
            if let Ok(Some(session)) = tokio::time::timeout(Duration::from_secs(5), handover).await.unwrap_or(Ok(None))
            {
                let (done, written) = oneshot::channel();
                let value = self.record(&session.state, expiry, now_ms().max(0) as u64, "");
                self.write(&client_id, Some(value), Some(done));
                let _ = written.await;
            }
        }
        if let Some(reply) = msg.reply {
            let _ = self.client.publish(reply, Bytes::new()).await;
        }
    }

    /// Whether the node incarnation `owner` still beats.
    async fn alive(&self, owner: &str) -> bool {
        matches!(self.nodes.entry(owner).await, Ok(Some(e)) if e.operation == kv::Operation::Put)
    }

    /// Finds the stored session of `client_id` and takes it for this node.
    async fn lookup(&self, client_id: &str) -> Result<Option<Box<StoredSession>>, String> {
        let k = key(client_id);
        let mine = |rec: Option<&StoredMqttSession>| -> Bytes {
            let mut r = rec.cloned().unwrap_or_default();
            r.owner = self.incarnation.clone();
            r.encode_to_vec().into()
        };
        for _ in 0..LOOKUP_TRIES {
            let entry = self.kv.entry(k.as_str()).await.map_err(|e| format!("NATS: {e}"))?;
            let held = entry.filter(|e| e.operation == kv::Operation::Put);
            let Some(entry) = held else {
                // Nothing stored: mark it ours, unless another node just did.
                match self.kv.create(k.as_str(), mine(None)).await {
                    Ok(_) => return Ok(None),
                    Err(_) => continue,
                }
            };
            let rec = StoredMqttSession::decode(entry.value.as_ref()).unwrap_or_default();
            let now = now_ms().max(0) as u64;
            let owner = rec.owner.clone();
            if !owner.is_empty() && owner != self.incarnation && self.alive(&owner).await {
                // Live on another node: ask it to let go, then read again.
                let subject = format!("{}.{owner}", self.kick_root);
                let asked = self.client.request(subject, Bytes::from(client_id.to_string()));
                match tokio::time::timeout(KICK_WAIT, asked).await {
                    Ok(Ok(_)) => continue,
                    Ok(Err(e)) => {
                        tracing::info!(client_id, owner, error = %e, "MQTT session: its node did not answer; taking it");
                    }
                    Err(_) => {
                        tracing::info!(client_id, owner, "MQTT session: its node did not answer in time; taking it")
                    }
                }
            }
            let expired = rec.expires_ms <= now;
            let keep = (!expired).then_some(&rec);
            if self.kv.update(k.as_str(), mine(keep), entry.revision).await.is_err() {
                continue;
            }
            if expired || rec.record.is_none() {
                return Ok(None);
            }
            let state = SessionState::from_record(rec.record.unwrap_or_default());
            return Ok(Some(Box::new(StoredSession { state, disconnected_ms: rec.disconnected_ms })));
        }
        Err("the session kept changing on other nodes".into())
    }
}

impl SessionStore for NatsSessions {
    fn claim(&self, client_id: &str, now: Instant) -> (Ticket, Claim) {
        let (ticket, claim) = self.local.claim(client_id, now);
        self.claimed.lock().insert(client_id.to_string(), (ticket.conn, Instant::now()));
        match claim {
            // Another connection on this node: the takeover stays local.
            Claim::Takeover(rx) => (ticket, Claim::Takeover(rx)),
            _ => {
                let (tx, rx) = oneshot::channel();
                let Some(store) = self.this.upgrade() else { return (ticket, Claim::Fresh) };
                let client_id = client_id.to_string();
                tokio::spawn(async move {
                    let found = store.lookup(&client_id).await;
                    let taken = found.is_ok();
                    // Announced only if the connection still waits for the
                    // session (it gives up after its takeover timeout).
                    if tx.send(found).is_ok() && taken {
                        let subject = format!("{}.{}", store.resumed_root, store.incarnation);
                        if let Err(e) = store.client.publish(subject, Bytes::from(client_id.clone())).await {
                            tracing::warn!(client_id, error = %e, "MQTT: could not tell other nodes to cancel a delayed will");
                        }
                    }
                });
                (ticket, Claim::Lookup(rx))
            }
        }
    }

    fn release(&self, client_id: &str, conn: u64, session: Option<Box<StoredSession>>, expiry: Duration, now: Instant) {
        {
            let mut claimed = self.claimed.lock();
            if claimed.get(client_id).is_some_and(|(c, _)| *c == conn) {
                claimed.remove(client_id);
            }
        }
        if !self.local.is_live(client_id, conn) {
            return; // taken over: the state went with the handover
        }
        self.local.release(client_id, conn, None, Duration::ZERO, now);
        self.expiries.lock().remove(client_id);
        let expiry = expiry.min(self.local.expiry_max());
        let value = session.filter(|_| !expiry.is_zero()).map(|s| self.record(&s.state, expiry, s.disconnected_ms, ""));
        self.write(client_id, value, None);
    }

    fn checkpoint(&self, client_id: &str, conn: u64, state: &SessionState, expiry: Duration) {
        if !self.local.is_live(client_id, conn) {
            return;
        }
        let expiry = expiry.min(self.local.expiry_max());
        self.expiries.lock().insert(client_id.to_string(), expiry);
        let value = self.record(state, expiry, now_ms().max(0) as u64, &self.incarnation);
        self.write(client_id, Some(value), None);
    }

    /// The record with what is about to be sent, written before it goes
    /// out (see [`SessionStore::before_send`]).
    fn before_send(
        &self,
        client_id: &str,
        conn: u64,
        state: &SessionState,
        expiry: Duration,
    ) -> Option<oneshot::Receiver<()>> {
        if !self.local.is_live(client_id, conn) {
            return None;
        }
        let expiry = expiry.min(self.local.expiry_max());
        self.expiries.lock().insert(client_id.to_string(), expiry);
        let value = self.record(state, expiry, now_ms().max(0) as u64, &self.incarnation);
        let (done, recorded) = oneshot::channel();
        self.write(client_id, Some(value), Some(done));
        Some(recorded)
    }

    fn expiry_max(&self) -> Duration {
        self.local.expiry_max()
    }

    fn delay_will(&self, client_id: &str) -> Option<DelayedWill> {
        let will = self.local.delay_will(client_id)?;
        // The announcement that the client connected on another node came
        // before this connection ended (its old socket was still closing):
        // the will waits for nothing.
        let since = self.claimed.lock().get(client_id).map(|(_, at)| *at);
        let elsewhere = self.elsewhere.lock().get(client_id).copied();
        if let (Some(since), Some(elsewhere)) = (since, elsewhere)
            && elsewhere > since
            && self.local.cancel_will(client_id)
        {
            tracing::info!(client_id, "MQTT: delayed will not kept; the client connected to another node meanwhile");
        }
        Some(will)
    }

    fn take_will(&self, client_id: &str, token: u64) -> bool {
        self.local.take_will(client_id, token)
    }
}
