//! Presence on the NATS engine.
//!
//! Each member is a key of the `{stream}_presence` bucket
//! (`{channel tokens}.{client}.{connection}`) holding who it is, its data,
//! the node incarnation that holds its connection, and — once that
//! connection dropped — when it leaves. Every node mirrors the bucket with
//! one watcher, so members are read locally. Enter, update and leave events
//! are messages on `$presence/<channel>`, sequenced like any other.
//!
//! Leaving after the grace period is everybody's job: each node's sweep
//! removes members whose time is up, and marks the members of a node
//! incarnation whose heartbeat (bucket `{stream}_nodes`, entries expire
//! after [`NODE_TTL`]) is gone as leaving after the grace. The removal is a
//! delete that expects the entry's revision, so exactly one node wins it
//! and announces the leave.

use std::collections::HashMap;
use std::sync::Weak;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use base64::Engine as _;
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use switchboard_proto::{self as proto, ErrorCode};
use switchboard_protocols::port::CoreError;

use super::{NatsEngine, NatsError, NatsOptions, err, subjects, unavailable};
use crate::core::channel;
use crate::core::engine::{Caller, EngineConfig};

/// How long a node's heartbeat lives without renewal: a node silent this
/// long is gone, and its members start their grace period.
pub const NODE_TTL: Duration = Duration::from_secs(5);

/// One member, as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Entry {
    channel: String,
    client_id: String,
    connection_id: String,
    /// Base64 of the member's data.
    data: String,
    protocol: i32,
    /// The node incarnation holding the connection.
    node: String,
    /// Unix ms at which the member leaves (its connection dropped).
    leave_at: Option<i64>,
}

impl Entry {
    fn data(&self) -> Bytes {
        base64::engine::general_purpose::STANDARD.decode(&self.data).unwrap_or_default().into()
    }
}

/// The presence buckets and this node's mirror of members.
pub(super) struct Presence {
    kv: kv::Store,
    pub(super) nodes: kv::Store,
    /// This process's incarnation: the node name and when it started.
    pub(super) incarnation: String,
    /// key → (revision, entry).
    mirror: Mutex<HashMap<String, (u64, Entry)>>,
}

fn key(channel: &str, client: &str, connection: &str) -> String {
    format!("{}.{}.{}", subjects::tokens(channel), subjects::token(client), subjects::token(connection))
}

impl Presence {
    pub(super) async fn open(
        js: &jetstream::Context,
        opts: &NatsOptions,
        cfg: &EngineConfig,
    ) -> Result<Self, NatsError> {
        let kv = NatsEngine::bucket(js, opts, &format!("{}_presence", opts.stream), Duration::ZERO, 1).await?;
        let nodes = NatsEngine::bucket(js, opts, &format!("{}_nodes", opts.stream), NODE_TTL, 1).await?;
        let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let incarnation = format!("{}_{}", subjects::token(&cfg.node), started.as_micros());
        let p = Presence { kv, nodes, incarnation, mirror: Mutex::new(HashMap::new()) };
        // A bucket another node has just made may need a moment for its
        // replicas to elect a leader.
        let deadline = tokio::time::Instant::now() + opts.connect_timeout.max(Duration::from_secs(10));
        loop {
            match p.heartbeat().await {
                Ok(()) => return Ok(p),
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(NatsError::JetStream { what: "node heartbeat".into(), reason: e.message });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    async fn heartbeat(&self) -> Result<(), CoreError> {
        self.nodes.put(self.incarnation.as_str(), Bytes::new()).await.map(|_| ()).map_err(unavailable)
    }

    /// Keeps the mirror in step with the bucket, for as long as the engine
    /// lives.
    pub(super) fn spawn_watch(engine: Weak<NatsEngine>) {
        tokio::spawn(async move {
            loop {
                let Some(e) = engine.upgrade() else { return };
                let watch = e.presence.kv.watch_all().await;
                let mut watch = match watch {
                    Ok(w) => w,
                    Err(x) => {
                        tracing::warn!(error = %x, "presence watch: cannot start; retrying");
                        drop(e);
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                };
                drop(e);
                let mut fresh: Option<HashMap<String, (u64, Entry)>> = Some(HashMap::new());
                while let Some(item) = watch.next().await {
                    let Some(e) = engine.upgrade() else { return };
                    let entry = match item {
                        Ok(entry) => entry,
                        Err(x) => {
                            tracing::warn!(error = %x, "presence watch interrupted; resuming");
                            break;
                        }
                    };
                    let value = (entry.operation == kv::Operation::Put)
                        .then(|| serde_json::from_slice::<Entry>(&entry.value).ok())
                        .flatten();
                    // Until the watch is current, fill a fresh map, so
                    // members removed while it was down go too.
                    match fresh.as_mut() {
                        Some(map) => {
                            match value {
                                Some(v) => map.insert(entry.key.clone(), (entry.revision, v)),
                                None => map.remove(&entry.key),
                            };
                            if entry.delta == 0 {
                                *e.presence.mirror.lock() = fresh.take().unwrap_or_default();
                            }
                        }
                        None => {
                            let mut mirror = e.presence.mirror.lock();
                            match value {
                                Some(v) => {
                                    let newer = mirror.get(&entry.key).is_none_or(|(rev, _)| *rev <= entry.revision);
                                    if newer {
                                        mirror.insert(entry.key.clone(), (entry.revision, v));
                                    }
                                }
                                None => {
                                    mirror.remove(&entry.key);
                                }
                            }
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }

    /// Whether `caller` is present on `channel` (and not leaving).
    pub(super) fn is_member(&self, caller: &Caller, channel: &str) -> bool {
        self.mirror.lock().contains_key(&key(channel, &caller.client_id, &caller.connection_id))
    }

    pub(super) fn members(&self, channel: &str) -> proto::PresenceMembers {
        let mut members: Vec<proto::Member> = self
            .mirror
            .lock()
            .values()
            .filter(|(_, e)| e.channel == channel)
            .map(|(_, e)| proto::Member {
                client_id: e.client_id.clone(),
                connection_id: e.connection_id.clone(),
                data: e.data(),
                protocol: e.protocol,
            })
            .collect();
        members.sort_by(|a, b| (&a.client_id, &a.connection_id).cmp(&(&b.client_id, &b.connection_id)));
        proto::PresenceMembers { channel: channel.to_string(), members }
    }

    /// The member stored at `k` with its revision, if there is one (at
    /// `revision`, when given: another's change meanwhile reads as none).
    async fn stored(&self, k: &str, revision: Option<u64>) -> Result<Option<(u64, Entry)>, CoreError> {
        let current = self.kv.entry(k).await.map_err(unavailable)?.filter(|e| e.operation == kv::Operation::Put);
        Ok(current
            .filter(|c| revision.is_none_or(|r| r == c.revision))
            .and_then(|c| Some((c.revision, serde_json::from_slice::<Entry>(&c.value).ok()?))))
    }

    pub(super) fn count(&self) -> usize {
        self.mirror.lock().len()
    }
}

impl NatsEngine {
    /// Appends a presence event to `$presence/<channel>`.
    async fn presence_event(&self, e: &Entry, kind: proto::Kind, now: i64) -> Result<(), CoreError> {
        let protocol = proto::Protocol::try_from(e.protocol).unwrap_or_default();
        if self.cfg.lifecycle.is_on() {
            // Built only for a webhook: the member's ids and decoded data.
            let member = (e.client_id.as_str().into(), e.connection_id.as_str().into());
            crate::core::lifecycle::emit_presence(
                &self.cfg.lifecycle,
                kind,
                &e.channel,
                &member,
                protocol,
                &e.data(),
                now,
            );
        }
        let env = proto::Envelope {
            channel: channel::presence_channel(&e.channel),
            payload: e.data(),
            publisher: Some(proto::Publisher {
                client_id: e.client_id.clone(),
                protocol: e.protocol,
                node: self.cfg.node.clone(),
                connection_id: e.connection_id.clone(),
            }),
            kind: kind as i32,
            timestamp: now,
            ..Default::default()
        };
        self.append(env, None).await.map(|_| ())
    }

    pub(super) async fn presence_enter_at(
        &self,
        caller: &Caller,
        name: &str,
        data: Bytes,
        update: bool,
        now: i64,
    ) -> Result<(), CoreError> {
        if caller.client_id.is_empty() {
            return Err(err(ErrorCode::NoIdentity, "presence needs a client id"));
        }
        self.connected()?;
        let p = &self.presence;
        let k = key(name, &caller.client_id, &caller.connection_id);
        let entry = Entry {
            channel: name.to_string(),
            client_id: caller.client_id.to_string(),
            connection_id: caller.connection_id.to_string(),
            data: base64::engine::general_purpose::STANDARD.encode(&data),
            protocol: caller.protocol as i32,
            node: p.incarnation.clone(),
            leave_at: None,
        };
        let kind = match p.stored(&k, None).await?.map(|(_, e)| e) {
            Some(c) if c.data == entry.data => None,
            Some(_) => Some(proto::Kind::PresenceUpdate),
            None if update => return Err(err(ErrorCode::BadRequest, format!("not present on {name:?}; enter first"))),
            None => {
                // The same client coming back within the grace period takes
                // over its old membership: no leave, no second enter.
                let resumed = p
                    .mirror
                    .lock()
                    .iter()
                    .find(|(_, (_, e))| e.channel == name && e.client_id == entry.client_id && e.leave_at.is_some())
                    .map(|(k, (rev, e))| (k.clone(), *rev, e.data.clone()));
                let max = self.cfg.presence_max_members;
                if resumed.is_none() && p.mirror.lock().values().filter(|(_, e)| e.channel == name).count() >= max {
                    return Err(err(ErrorCode::Unavailable, format!("presence of {name:?} is full ({max} members)")));
                }
                match resumed {
                    Some((old, rev, old_data)) => {
                        if p.kv.purge_expect_revision(old.as_str(), Some(rev)).await.is_ok() {
                            p.mirror.lock().remove(&old);
                        }
                        (old_data != entry.data).then_some(proto::Kind::PresenceUpdate)
                    }
                    None => Some(proto::Kind::PresenceEnter),
                }
            }
        };
        let value = serde_json::to_vec(&entry).map_err(|e| err(ErrorCode::Internal, e.to_string()))?;
        let rev = p.kv.put(k.as_str(), value.into()).await.map_err(unavailable)?;
        p.mirror.lock().insert(k, (rev, entry.clone()));
        self.hub.write().note_presence(caller.session, name, true);
        if let Some(kind) = kind {
            self.presence_event(&entry, kind, now).await?;
        }
        Ok(())
    }

    /// Removes `caller`'s membership of `name` and announces the leave.
    pub(super) async fn presence_leave_at(&self, caller: &Caller, name: &str, now: i64) -> Result<(), CoreError> {
        let k = key(name, &caller.client_id, &caller.connection_id);
        self.leave_key(&k, None, now).await
    }

    /// Removes one member (at `revision`, when given: a sweep that lost the
    /// race to another node's does nothing) and announces the leave.
    async fn leave_key(&self, k: &str, revision: Option<u64>, now: i64) -> Result<(), CoreError> {
        let p = &self.presence;
        let Some((rev, entry)) = p.stored(k, revision).await? else { return Ok(()) };
        if p.kv.purge_expect_revision(k, Some(rev)).await.is_err() {
            return Ok(()); // changed meanwhile: whoever changed it decides
        }
        p.mirror.lock().remove(k);
        self.presence_event(&entry, proto::Kind::PresenceLeave, now).await
    }

    /// Marks `caller`'s membership of `name` as leaving after the grace
    /// period (its connection dropped).
    pub(super) async fn presence_leaving(&self, caller: &Caller, name: &str, now: i64) -> Result<(), CoreError> {
        let k = key(name, &caller.client_id, &caller.connection_id);
        self.mark_leaving(&k, None, now).await
    }

    async fn mark_leaving(&self, k: &str, revision: Option<u64>, now: i64) -> Result<(), CoreError> {
        let p = &self.presence;
        let Some((current, mut entry)) = p.stored(k, revision).await? else { return Ok(()) };
        if entry.leave_at.is_some() {
            return Ok(());
        }
        entry.leave_at = Some(now + self.cfg.presence_grace.as_millis() as i64);
        let value = serde_json::to_vec(&entry).map_err(|e| err(ErrorCode::Internal, e.to_string()))?;
        if let Ok(rev) = p.kv.update(k, value.into(), current).await {
            p.mirror.lock().insert(k.to_string(), (rev, entry));
        }
        Ok(())
    }

    /// The heartbeat, then every member whose time is up leaves, and the
    /// members of nodes that stopped beating start their grace.
    pub(super) async fn presence_sweep(&self, now: i64) {
        if self.connected().is_err() {
            return;
        }
        let p = &self.presence;
        if let Err(e) = p.heartbeat().await {
            tracing::warn!(error = %e, "presence: heartbeat failed");
            return;
        }
        let snapshot: Vec<(String, u64, Entry)> =
            p.mirror.lock().iter().map(|(k, (rev, e))| (k.clone(), *rev, e.clone())).collect();
        if snapshot.is_empty() {
            return;
        }
        let alive: std::collections::HashSet<String> = match p.nodes.keys().await {
            Ok(keys) => match keys.try_collect().await {
                Ok(k) => k,
                Err(_) => return,
            },
            Err(_) => return,
        };
        for (k, rev, e) in snapshot {
            let done = match e.leave_at {
                Some(at) if at <= now => self.leave_key(&k, Some(rev), now).await,
                None if !alive.contains(&e.node) => self.mark_leaving(&k, Some(rev), now).await,
                _ => Ok(()),
            };
            if let Err(x) = done {
                tracing::warn!(error = %x, "presence sweep");
                return;
            }
        }
    }
}
