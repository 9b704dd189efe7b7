//! Durable channel state on local disk: the `[storage] kind = "disk"`
//! store behind the [`super::local::LocalEngine`].
//!
//! The store is [fjall](https://docs.rs/fjall), an embedded LSM tree with a
//! write-ahead journal. Each publish is one atomic write batch (the message,
//! the retained value, the idempotency key; the channel's head only on its
//! first write, as every message carries what the head would change).
//! Messages that leave history are not deleted one by one: each message
//! records the oldest serial history still holds with it, a start reads
//! from there, and a compaction filter drops what lies below a channel's
//! floor when fjall compacts (see [`Floors`]). fjall hands every batch to the operating system before `commit`
//! returns, so an acknowledged message survives a crash of the process
//! (SIGKILL) with no fsync. Durability against a crash of the machine is the
//! sync policy's business:
//!
//! - `always`: a publish is acknowledged and delivered only after an fsync
//!   that covers it. One committer thread fsyncs for every publish that
//!   arrived meanwhile (group commit), so concurrent publishes share a sync.
//! - `interval` (default): acknowledged once in the OS; a background thread
//!   fsyncs every `sync_interval`.
//! - `never`: acknowledged once in the OS; fsync is left to the OS (and to a
//!   clean shutdown).
//!
//! Why fjall and not redb: redb keeps nothing of a non-durable commit after a
//! crash, so surviving SIGKILL would need an fsync per acknowledgement;
//! fjall's journal survives a process crash at the cost of one `write`
//! (measurements in docs/storage.md).
//!
//! Layout: keyspaces `channels` (name → [`StoredChannel`], which holds the
//! channel's numeric store key), `messages` (store key, 8 bytes
//! little-endian, then serial big-endian → [`StoredMessage`]: the envelope
//! without its epoch, which the channel's record holds), `retained` (name →
//! the same), `ids` (name, NUL, id → [`StoredId`]), `mqtt` (client id → MQTT
//! session record, written by [`super::mqtt_sessions`]), `webhooks`
//! (endpoint name, NUL, sequence big-endian → a pending webhook event,
//! written by the edge's webhook outbox) and `node` (the
//! clean-shutdown marker, the layout's version, the next store key). Values
//! are protobuf (prost) messages; there is no hand-written file format.
//!
//! Why numeric store keys: a message key is 16 bytes, so fjall keeps it
//! inline (no pointer to chase per comparison while inserting into the
//! memtable), and the key's first 4 bytes (the store key's low bytes, as
//! fjall compares a 4-byte prefix first) tell channels apart. A store key
//! is never reused, so leftovers of a forgotten channel cannot be read as
//! a new channel's messages.
//!
//! What this module does not do: decide anything. Sequencing, trimming
//! rules and fan-out belong to the engine, which tells the store what to
//! write. Presence channels (`$presence/...`) are not stored: members come
//! back when clients reconnect, so their event history is node-local.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fjall::compaction::filter::{CompactionFilter, Context, Factory, ItemAccessor, Verdict};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use parking_lot::{Condvar, Mutex, RwLock};
use prost::Message as _;
use switchboard_proto as proto;
use tokio::sync::watch;

/// When an acknowledged publish is on disk (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncPolicy {
    /// fsync before every acknowledgement (grouped).
    Always,
    /// fsync every `sync_interval`; acknowledged once in the OS.
    #[default]
    Interval,
    /// Never fsync (the OS writes back); acknowledged once in the OS.
    Never,
}

impl SyncPolicy {
    /// The policy's name in config and docs.
    pub fn name(self) -> &'static str {
        match self {
            SyncPolicy::Always => "always",
            SyncPolicy::Interval => "interval",
            SyncPolicy::Never => "never",
        }
    }
}

/// What the store needs to open.
#[derive(Debug, Clone)]
pub struct DiskOptions {
    /// The directory (created if missing).
    pub dir: PathBuf,
    /// When acknowledged publishes reach the disk.
    pub sync: SyncPolicy,
    /// fsync period under [`SyncPolicy::Interval`].
    pub sync_interval: Duration,
    /// Block cache of the store, bytes.
    pub cache_bytes: u64,
    /// Where the machine's boot id is read from (Linux:
    /// `/proc/sys/kernel/random/boot_id`). A different boot id after an
    /// unclean stop means the machine itself went down, not just the process.
    pub boot_id_file: PathBuf,
}

/// Why the store cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// Opening or recovering the directory failed.
    #[error("cannot open storage at {path}: {detail}. {hint}")]
    Open {
        /// The directory.
        path: String,
        /// What went wrong.
        detail: String,
        /// What to do about it.
        hint: &'static str,
    },
    /// A stored record does not decode.
    #[error(
        "storage at {path} holds a record that does not decode ({what}): the files are damaged. Restore the directory \
         from a backup, or move it away to start empty (every channel then starts a new epoch)"
    )]
    Corrupt {
        /// The directory.
        path: String,
        /// Which record.
        what: String,
    },
    /// A write failed (full or read-only disk, I/O error). The store refuses
    /// writes from then on; the gateway must be restarted once the disk is
    /// fixed (a failed write or fsync leaves the file's state unknown).
    #[error("storage write failed: {0}")]
    Write(String),
}

/// A channel's head as stored.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredChannel {
    /// The channel's epoch.
    #[prost(string, tag = "1")]
    pub epoch: String,
    /// Its newest serial.
    #[prost(uint64, tag = "2")]
    pub serial: u64,
    /// Timestamp of the newest message trimmed from history (0: none).
    #[prost(int64, tag = "3")]
    pub trimmed_ts: i64,
    /// Unix ms of the last activity (idle channels are forgotten).
    #[prost(int64, tag = "4")]
    pub last_active: i64,
    /// The channel's store key: its messages' key prefix (never reused).
    #[prost(uint64, tag = "5")]
    pub key: u64,
    /// The oldest serial history holds, as of the last trim by age (0:
    /// none known; the messages carry the floor set by count).
    #[prost(uint64, tag = "6")]
    pub first_serial: u64,
}

/// A message as stored: the envelope (without its epoch) and the
/// channel's newest trimmed timestamp when it was written, so the head need
/// not be rewritten by every publish (see [`LoadedChannel::head`]).
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredMessage {
    /// The envelope, epoch left empty.
    #[prost(message, optional, tag = "1")]
    pub envelope: Option<proto::Envelope>,
    /// `trimmed_ts` of the channel as of this message (0: none).
    #[prost(int64, tag = "2")]
    pub trimmed_ts: i64,
    /// The oldest serial history holds once this message is in: a start
    /// reads nothing older (older messages wait for compaction to drop
    /// them).
    #[prost(uint64, tag = "3")]
    pub first_serial: u64,
}

impl StoredMessage {
    /// Encodes an envelope as a [`StoredMessage`] without copying it into
    /// one first.
    pub fn encode(envelope: &proto::Envelope, trimmed_ts: i64, first_serial: u64) -> Vec<u8> {
        let mut buf = Vec::with_capacity(envelope.encoded_len() + 24);
        prost::encoding::message::encode(1, envelope, &mut buf);
        if trimmed_ts != 0 {
            prost::encoding::int64::encode(2, &trimmed_ts, &mut buf);
        }
        if first_serial != 0 {
            prost::encoding::uint64::encode(3, &first_serial, &mut buf);
        }
        buf
    }
}

/// A remembered idempotency key.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredId {
    /// The serial the first publish got.
    #[prost(uint64, tag = "1")]
    pub serial: u64,
    /// Unix ms when the key is forgotten.
    #[prost(int64, tag = "2")]
    pub expires_ms: i64,
}

/// The node's record: was the last stop clean, and on which boot; the
/// layout the files follow.
#[derive(Clone, PartialEq, prost::Message)]
struct StoredNode {
    #[prost(bool, tag = "1")]
    clean: bool,
    #[prost(string, tag = "2")]
    boot_id: String,
    #[prost(uint32, tag = "3")]
    layout: u32,
}

/// The layout this build reads and writes (1: the first release's, keyed
/// by channel name; never read by this build).
const LAYOUT: u32 = 2;

/// Each channel's floor, shared with the compaction filter of the
/// `messages` keyspace: messages below it left history and are dropped
/// when fjall compacts the tables holding them. A channel the map does not
/// know was forgotten (its messages go too), once [`Floors::ready`] says
/// start-up has registered every stored channel; before that nothing is
/// dropped.
#[derive(Debug, Default)]
pub struct Floors {
    ready: AtomicBool,
    map: RwLock<HashMap<u64, Arc<AtomicU64>>>,
}

impl Floors {
    /// A channel's floor cell (0: keep everything, until its history is
    /// loaded and the engine knows better).
    fn register(&self, key: u64) -> Arc<AtomicU64> {
        self.map.write().entry(key).or_default().clone()
    }

    fn forget(&self, key: u64) {
        self.map.write().remove(&key);
    }

    /// Whether a message may go: its channel is forgotten or it lies below
    /// the channel's floor.
    fn drops(&self, key: &[u8]) -> bool {
        if !self.ready.load(Ordering::Acquire) {
            return false;
        }
        let Some((channel, serial)) = split_message_key(key) else { return false };
        match self.map.read().get(&channel) {
            Some(floor) => serial < floor.load(Ordering::Relaxed),
            None => true,
        }
    }
}

/// The compaction filter of the `messages` keyspace (see [`Floors`]).
/// Unwind-safe: it only reads the floors, and their lock does not poison.
struct FloorFilter(std::panic::AssertUnwindSafe<Arc<Floors>>);

impl Factory for FloorFilter {
    fn name(&self) -> &str {
        "switchboard-history-floor"
    }

    fn make_filter(&self, _: &Context) -> Box<dyn CompactionFilter> {
        Box::new(FloorFilter(std::panic::AssertUnwindSafe(self.0.0.clone())))
    }
}

impl CompactionFilter for FloorFilter {
    fn filter_item(
        &mut self,
        item: ItemAccessor<'_>,
        _: &Context,
    ) -> fjall::compaction::filter::CompactionFilterResult {
        // A message key is written once and never deleted, so dropping it
        // needs no tombstone.
        Ok(if self.0.drops(item.key()) { Verdict::Destroy } else { Verdict::Keep })
    }
}

/// A channel as found on disk at start.
#[derive(Debug)]
pub struct LoadedChannel {
    /// The name.
    pub name: String,
    /// Its head: the record merged with its newest message (whose serial,
    /// timestamp, trimmed timestamp and first serial are newer than the
    /// record's unless the channel keeps no history or trimmed by age
    /// since).
    pub head: StoredChannel,
    /// The channel's floor for the compaction filter (see [`Floors`]).
    pub floor: Arc<AtomicU64>,
    /// The retained value.
    pub retained: Option<proto::Envelope>,
    /// Idempotency keys still in their window: (id, serial, expiry).
    pub ids: Vec<(String, u64, i64)>,
}

/// What start-up found; the channels are read by
/// [`DiskStore::load_channels`].
#[derive(Debug)]
pub struct Recovery {
    /// The last stop was not clean (crash, SIGKILL, power loss).
    pub unclean: bool,
    /// The machine restarted since the unclean stop and the sync policy
    /// does not fsync every acknowledgement: the newest acknowledged
    /// messages may be gone, so every channel must start a new epoch.
    pub tail_may_be_lost: bool,
}

/// One publish's writes, applied atomically.
#[derive(Debug)]
pub struct AppendBatch<'a> {
    /// Channel name.
    pub channel: &'a str,
    /// Its store key.
    pub key: u64,
    /// The new head, when it must be written: the channel's first write,
    /// or every write of a channel without history (its messages carry the
    /// head otherwise).
    pub head: Option<&'a StoredChannel>,
    /// The message for history, (serial, a [`StoredMessage`]); `None` when
    /// the channel keeps no history.
    pub message: Option<(u64, &'a [u8])>,
    /// `Some(Some(_))` sets the retained value (encoded as `message`),
    /// `Some(None)` clears it.
    pub retained: Option<Option<&'a [u8]>>,
    /// A new idempotency key: (id, record).
    pub id: Option<(&'a str, StoredId)>,
}

/// The store's half shared with its sync thread.
#[derive(Debug)]
struct Signals {
    /// Batches written, and the committer's wake-up.
    queue: Mutex<CommitQueue>,
    wake: Condvar,
    /// The newest ticket an fsync covered; `u64::MAX` once syncing failed.
    synced: watch::Sender<u64>,
}

/// Group-commit state under [`SyncPolicy::Always`].
#[derive(Debug, Default)]
struct CommitQueue {
    /// Batches written so far (a ticket is the count after one's write).
    written: u64,
    /// The committer is stopping.
    stop: bool,
}

/// The store (see the module docs).
pub struct DiskStore {
    path: String,
    db: Database,
    channels: Keyspace,
    messages: Keyspace,
    retained: Keyspace,
    ids: Keyspace,
    node: Keyspace,
    mqtt: Keyspace,
    webhooks: Keyspace,
    sync: SyncPolicy,
    /// What the store shares with its sync thread (which must not keep the
    /// store, and so the directory's lock, alive).
    signals: Arc<Signals>,
    /// Set after the first failed write or sync: `/readyz` reports it.
    failed: Mutex<Option<String>>,
    /// Something was written since the last interval fsync.
    dirty: AtomicBool,
    /// Channels' floors, shared with the compaction filter.
    floors: Arc<Floors>,
    /// The next channel store key.
    next_key: AtomicU64,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Drop for DiskStore {
    /// Without [`DiskStore::close`] (a crash, or a test dropping it): the
    /// sync thread stops; the stop is recorded as unclean.
    fn drop(&mut self) {
        self.stop_syncer();
    }
}

impl std::fmt::Debug for DiskStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskStore").field("path", &self.path).field("sync", &self.sync).finish_non_exhaustive()
    }
}

const NODE_KEY: &str = "node";
const NEXT_KEY: &str = "next_key";

/// A message's key: the channel's store key little-endian (its varying
/// low bytes first), then the serial big-endian (messages in order).
fn message_key(channel: u64, serial: u64) -> [u8; 16] {
    let mut k = [0; 16];
    k[..8].copy_from_slice(&channel.to_le_bytes());
    k[8..].copy_from_slice(&serial.to_be_bytes());
    k
}

fn split_message_key(k: &[u8]) -> Option<(u64, u64)> {
    let channel = u64::from_le_bytes(k.get(..8)?.try_into().ok()?);
    let serial = u64::from_be_bytes(k.get(8..16)?.try_into().ok()?);
    Some((channel, serial))
}

fn id_key(name: &str, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(name.len() + 1 + id.len());
    k.extend_from_slice(name.as_bytes());
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

fn prefix(name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(name.len() + 1);
    k.extend_from_slice(name.as_bytes());
    k.push(0);
    k
}

/// A pending webhook event's key: the endpoint's name, NUL, the sequence
/// big-endian (so an endpoint's events read back in order).
fn webhook_key(endpoint: &str, seq: u64) -> Vec<u8> {
    let mut k = prefix(endpoint);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn read_boot_id(file: &Path) -> String {
    std::fs::read_to_string(file).map(|s| s.trim().to_string()).unwrap_or_default()
}

impl DiskStore {
    /// Opens (or creates) the store and reads everything back. Fails with a
    /// clear error naming the directory; never starts empty over data it
    /// cannot read.
    pub fn open(opts: &DiskOptions) -> Result<(Arc<DiskStore>, Recovery), DiskError> {
        let path = opts.dir.display().to_string();
        let open_err = |detail: String, hint: &'static str| DiskError::Open { path: path.clone(), detail, hint };
        std::fs::create_dir_all(&opts.dir).map_err(|e| {
            open_err(e.to_string(), "Create the directory and give the gateway's user write access to it")
        })?;
        // fjall wants to write into the directory; say so plainly rather than
        // through an error deep inside its recovery.
        let probe = opts.dir.join(".switchboard-write-test");
        std::fs::write(&probe, b"ok")
            .and_then(|()| std::fs::remove_file(&probe))
            .map_err(|e| open_err(e.to_string(), "Give the gateway's user write access to the directory"))?;
        let floors = Arc::new(Floors::default());
        let filter: Arc<dyn Factory> = Arc::new(FloorFilter(std::panic::AssertUnwindSafe(floors.clone())));
        let db = Database::builder(&opts.dir)
            .cache_size(opts.cache_bytes)
            .max_journaling_size(64 * 1024 * 1024)
            .worker_threads(2)
            .with_compaction_filter_factories(Arc::new(move |ks: &str| (ks == "messages").then(|| filter.clone())))
            .open()
            .map_err(|e| {
                let hint = match e {
                    fjall::Error::Locked => "Another process (a second gateway?) holds this directory",
                    _ => {
                        "The files are damaged or from an incompatible version: restore the directory from a backup, \
                          or move it away to start empty"
                    }
                };
                open_err(e.to_string(), hint)
            })?;
        let ks = |name: &str| {
            db.keyspace(name, KeyspaceCreateOptions::default)
                .map_err(|e| open_err(e.to_string(), "The files are damaged: restore from a backup or move it away"))
        };
        let store = DiskStore {
            channels: ks("channels")?,
            messages: ks("messages")?,
            retained: ks("retained")?,
            ids: ks("ids")?,
            node: ks("node")?,
            mqtt: ks("mqtt")?,
            webhooks: ks("webhooks")?,
            db,
            path: path.clone(),
            sync: opts.sync,
            signals: Arc::new(Signals {
                queue: Mutex::new(CommitQueue::default()),
                wake: Condvar::new(),
                synced: watch::channel(0).0,
            }),
            failed: Mutex::new(None),
            dirty: AtomicBool::new(false),
            floors,
            next_key: AtomicU64::new(1),
            threads: Mutex::new(Vec::new()),
        };
        let boot_id = read_boot_id(&opts.boot_id_file);
        let previous = store.read_node()?;
        if let Some(p) = &previous
            && p.layout != LAYOUT
        {
            return Err(open_err(
                format!("the files follow layout {} and this build reads layout {LAYOUT}", p.layout),
                "Move the directory away to start empty (every channel then starts a new epoch), or run the \
                 Switchboard version that wrote it",
            ));
        }
        let next_key = match store.node.get(NEXT_KEY) {
            Ok(Some(v)) => {
                v.as_ref().try_into().map(u64::from_le_bytes).map_err(|_| store.corrupt("next store key"))?
            }
            Ok(None) => 1,
            Err(e) => return Err(store.corrupt(format!("next store key: {e}"))),
        };
        store.next_key.store(next_key.max(1), Ordering::Relaxed);
        let unclean = previous.as_ref().is_some_and(|n| !n.clean);
        let machine_restarted = previous.as_ref().is_some_and(|n| n.boot_id.is_empty() || n.boot_id != boot_id);
        let tail_may_be_lost = unclean && machine_restarted && opts.sync != SyncPolicy::Always;
        // From here until a clean close, a crash is an unclean stop.
        let node = StoredNode { clean: false, boot_id, layout: LAYOUT };
        store.node.insert(NODE_KEY, node.encode_to_vec()).map_err(|e| open_err(e.to_string(), "Check the disk"))?;
        store.db.persist(PersistMode::SyncAll).map_err(|e| open_err(e.to_string(), "Check the disk"))?;
        let store = Arc::new(store);
        store.refresh_size();
        store.spawn_syncer(opts.sync_interval);
        Ok((store, Recovery { unclean, tail_may_be_lost }))
    }

    fn corrupt(&self, what: impl Into<String>) -> DiskError {
        DiskError::Corrupt { path: self.path.clone(), what: what.into() }
    }

    fn read_node(&self) -> Result<Option<StoredNode>, DiskError> {
        let Some(v) = self.node.get(NODE_KEY).map_err(|e| self.corrupt(format!("node record: {e}")))? else {
            return Ok(None);
        };
        StoredNode::decode(&*v).map(Some).map_err(|e| self.corrupt(format!("node record: {e}")))
    }

    /// Reads every stored channel (its head, newest message, retained value
    /// and ids; histories are read by [`DiskStore::load_history`]) and hands each to
    /// `build`, on as many threads as the machine has cores.
    pub fn load_channels<T: Send>(&self, build: impl Fn(LoadedChannel) -> T + Sync) -> Result<Vec<T>, DiskError> {
        let mut heads = Vec::new();
        for kv in self.channels.iter() {
            let (k, v) = kv.into_inner().map_err(|e| self.corrupt(format!("channel list: {e}")))?;
            let name = String::from_utf8(k.to_vec()).map_err(|_| self.corrupt("a channel name is not UTF-8"))?;
            let head = StoredChannel::decode(&*v).map_err(|e| self.corrupt(format!("head of {name:?}: {e}")))?;
            heads.push((name, head));
        }
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 8);
        let chunk = heads.len().div_ceil(threads).max(1);
        let build = &build;
        std::thread::scope(|scope| {
            let workers: Vec<_> = heads
                .chunks(chunk)
                .map(|part| {
                    scope.spawn(move || {
                        part.iter()
                            .map(|(name, head)| self.load_channel(name, head.clone()).map(build))
                            .collect::<Result<Vec<T>, DiskError>>()
                    })
                })
                .collect();
            let mut out = Vec::with_capacity(heads.len());
            for w in workers {
                out.extend(w.join().map_err(|_| self.corrupt("a loader thread failed"))??);
            }
            // Every stored channel has its floor: from here a key the
            // filter does not know belongs to a forgotten channel.
            self.floors.ready.store(true, Ordering::Release);
            Ok(out)
        })
    }

    fn decode_message(
        &self,
        name: &str,
        epoch: &str,
        v: &[u8],
        what: &str,
    ) -> Result<(proto::Envelope, i64, u64), DiskError> {
        let m = StoredMessage::decode(v).map_err(|e| self.corrupt(format!("{what} of {name:?}: {e}")))?;
        let mut env = m.envelope.ok_or_else(|| self.corrupt(format!("{what} of {name:?} is empty")))?;
        env.epoch = epoch.to_string();
        Ok((env, m.trimmed_ts, m.first_serial))
    }

    /// A channel's stored history, oldest first, stamped with `epoch`:
    /// its newest `limit` messages from `first_serial` on (what the head
    /// or the newest message says history held; older ones are waiting
    /// for compaction to drop them).
    pub fn load_history(
        &self,
        name: &str,
        key: u64,
        first_serial: u64,
        limit: usize,
        epoch: &str,
    ) -> Result<Vec<proto::Envelope>, DiskError> {
        let mut history = Vec::new();
        for kv in self.messages.prefix(key.to_le_bytes()).rev() {
            if history.len() >= limit {
                break;
            }
            let (k, v) = kv.into_inner().map_err(|e| self.corrupt(format!("messages of {name:?}: {e}")))?;
            if split_message_key(&k).is_none_or(|(_, serial)| serial < first_serial) {
                break;
            }
            history.push(self.decode_message(name, epoch, &v, "a message")?);
        }
        history.reverse();
        Ok(history.into_iter().map(|(env, _, _)| env).collect())
    }

    /// A channel's head merged with its newest message, its retained value
    /// and ids.
    fn load_channel(&self, name: &str, mut head: StoredChannel) -> Result<LoadedChannel, DiskError> {
        if head.key == 0 {
            return Err(self.corrupt(format!("head of {name:?} has no store key")));
        }
        self.next_key.fetch_max(head.key + 1, Ordering::Relaxed);
        let newest = match self.messages.prefix(head.key.to_le_bytes()).next_back() {
            Some(kv) => {
                let (_, v) = kv.into_inner().map_err(|e| self.corrupt(format!("messages of {name:?}: {e}")))?;
                Some(self.decode_message(name, &head.epoch, &v, "a message")?)
            }
            None => None,
        };
        if let Some((last, trimmed_ts, first_serial)) = &newest {
            head.serial = head.serial.max(last.serial);
            head.last_active = head.last_active.max(last.timestamp);
            head.trimmed_ts = head.trimmed_ts.max(*trimmed_ts);
            head.first_serial = head.first_serial.max(*first_serial);
        }
        let retained = match self.retained.get(name).map_err(|e| self.corrupt(format!("retained {name:?}: {e}")))? {
            Some(v) => Some(self.decode_message(name, &head.epoch, &v, "the retained value")?.0),
            None => None,
        };
        let mut ids = Vec::new();
        let p = prefix(name);
        for kv in self.ids.prefix(&p) {
            let (k, v) = kv.into_inner().map_err(|e| self.corrupt(format!("ids of {name:?}: {e}")))?;
            let id = String::from_utf8(k[p.len()..].to_vec())
                .map_err(|_| self.corrupt(format!("an id of {name:?} is not UTF-8")))?;
            let rec = StoredId::decode(&*v).map_err(|e| self.corrupt(format!("id of {name:?}: {e}")))?;
            ids.push((id, rec.serial, rec.expires_ms));
        }
        let floor = self.floors.register(head.key);
        Ok(LoadedChannel { name: name.to_string(), head, floor, retained, ids })
    }

    /// The sync policy.
    pub fn sync_policy(&self) -> SyncPolicy {
        self.sync
    }

    /// Writes one publish atomically (handed to the OS when this returns)
    /// and returns its ticket: under [`SyncPolicy::Always`], wait for
    /// [`DiskStore::synced`] to reach it before acknowledging or delivering
    /// (other policies return 0 and never wait).
    pub fn append(&self, b: &AppendBatch<'_>) -> Result<u64, DiskError> {
        self.check()?;
        let started = Instant::now();
        let mut batch = self.db.batch();
        if let Some(head) = b.head {
            batch.insert(&self.channels, b.channel, head.encode_to_vec());
        }
        if let Some((serial, bytes)) = b.message {
            batch.insert(&self.messages, message_key(b.key, serial), bytes);
        }
        match b.retained {
            Some(Some(bytes)) => batch.insert(&self.retained, b.channel, bytes),
            Some(None) => batch.remove(&self.retained, b.channel),
            None => {}
        }
        if let Some((id, rec)) = &b.id {
            batch.insert(&self.ids, id_key(b.channel, id), rec.encode_to_vec());
        }
        if self.sync != SyncPolicy::Always {
            // Nothing waits for a sync: no ticket, and no lock of ours
            // around the journal's own.
            batch.commit().map_err(|e| self.fail("write", e))?;
            self.dirty.store(true, Ordering::Relaxed);
            metrics::histogram!("switchboard_storage_write_seconds").record(started.elapsed().as_secs_f64());
            return Ok(0);
        }
        // The queue lock orders tickets as the journal orders batches: a
        // sync that reads `written` covers every batch counted in it.
        let mut q = self.signals.queue.lock();
        batch.commit().map_err(|e| self.fail("write", e))?;
        q.written += 1;
        let ticket = q.written;
        drop(q);
        metrics::histogram!("switchboard_storage_write_seconds").record(started.elapsed().as_secs_f64());
        self.signals.wake.notify_one();
        Ok(ticket)
    }

    /// Waits until an fsync covered `ticket` (only meaningful under
    /// [`SyncPolicy::Always`]; returns at once otherwise).
    pub async fn synced(&self, ticket: u64) -> Result<(), DiskError> {
        if self.sync != SyncPolicy::Always {
            return Ok(());
        }
        let mut rx = self.signals.synced.subscribe();
        let got = rx.wait_for(|s| *s >= ticket).await.map(|s| *s).unwrap_or(u64::MAX);
        if got == u64::MAX {
            return Err(DiskError::Write(self.failure().unwrap_or_else(|| "sync failed".into())));
        }
        Ok(())
    }

    /// Whether `ticket` is already covered by an fsync (or needs none).
    pub fn is_synced(&self, ticket: u64) -> bool {
        self.sync != SyncPolicy::Always || *self.signals.synced.borrow() >= ticket
    }

    /// A new channel's store key and floor, its head written with the
    /// next key (so a key is never handed out twice, even for a channel
    /// forgotten since). Journaled before any of its messages, so a sync
    /// that covers a message covers its channel's head.
    pub fn new_channel(&self, channel: &str, head: &mut StoredChannel) -> Arc<AtomicU64> {
        head.key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let floor = self.floors.register(head.key);
        let mut batch = self.db.batch();
        batch.insert(&self.channels, channel, head.encode_to_vec());
        batch.insert(&self.node, NEXT_KEY, (head.key + 1).to_le_bytes());
        if self.check().is_ok()
            && let Err(e) = batch.commit()
        {
            self.fail("write", e);
        }
        floor
    }

    /// Writes a channel's head alone (a new epoch, trimming by age). Not
    /// waited for: a lost head write is redone by the next one.
    pub fn put_head(&self, channel: &str, head: &StoredChannel) {
        if self.check().is_ok()
            && let Err(e) = self.channels.insert(channel, head.encode_to_vec())
        {
            self.fail("write", e);
        }
    }

    /// Forgets idempotency keys whose window ended.
    pub fn remove_ids<'a>(&self, channel: &str, ids: impl IntoIterator<Item = &'a str>) {
        let mut batch = self.db.batch();
        for id in ids {
            batch.remove(&self.ids, id_key(channel, id));
        }
        if !batch.is_empty()
            && self.check().is_ok()
            && let Err(e) = batch.commit()
        {
            self.fail("write", e);
        }
    }

    /// Forgets a channel's retained value (it expired). Not waited for: a
    /// lost removal is redone when the value is found expired again.
    pub fn remove_retained(&self, channel: &str) {
        if self.check().is_ok()
            && let Err(e) = self.retained.remove(channel)
        {
            self.fail("write", e);
        }
    }

    /// Forgets a channel entirely (idle, nothing left to keep); compaction
    /// drops whatever of its messages the tables still hold.
    pub fn remove_channel(&self, channel: &str, key: u64) {
        self.floors.forget(key);
        let mut batch = self.db.batch();
        batch.remove(&self.channels, channel);
        batch.remove(&self.retained, channel);
        if self.check().is_ok()
            && let Err(e) = batch.commit()
        {
            self.fail("write", e);
        }
    }

    /// Writes an MQTT session record (client id → record). Not waited for:
    /// a lost checkpoint means the resume replays a little more.
    pub fn put_mqtt_session(&self, client_id: &str, record: &[u8]) {
        if self.check().is_ok()
            && let Err(e) = self.mqtt.insert(client_id, record)
        {
            self.fail("write", e);
        }
    }

    /// Forgets an MQTT session.
    pub fn remove_mqtt_session(&self, client_id: &str) {
        if self.check().is_ok()
            && let Err(e) = self.mqtt.remove(client_id)
        {
            self.fail("write", e);
        }
    }

    /// Every MQTT session record, for start-up. An unreadable entry is
    /// logged and skipped (its client starts afresh).
    pub fn load_mqtt_sessions(&self) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        for kv in self.mqtt.iter() {
            match kv.into_inner() {
                Ok((k, v)) => match String::from_utf8(k.to_vec()) {
                    Ok(id) => out.push((id, v.to_vec())),
                    Err(_) => tracing::error!(path = %self.path, "an MQTT session key is not UTF-8; skipped"),
                },
                Err(e) => tracing::error!(path = %self.path, error = %e, "cannot read an MQTT session; skipped"),
            }
        }
        out
    }

    /// Writes a pending webhook event (endpoint, sequence → record), handed
    /// to the OS when this returns (it survives SIGKILL; the sync policy's
    /// fsyncs cover it against a machine crash). `Err` once the store
    /// failed.
    pub fn put_webhook_event(&self, endpoint: &str, seq: u64, record: &[u8]) -> Result<(), DiskError> {
        self.check()?;
        self.webhooks.insert(webhook_key(endpoint, seq), record).map_err(|e| self.fail("write", e))?;
        self.dirty.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Forgets a webhook event (delivered, or given up).
    pub fn remove_webhook_event(&self, endpoint: &str, seq: u64) {
        if self.check().is_ok() {
            match self.webhooks.remove(webhook_key(endpoint, seq)) {
                Ok(()) => self.dirty.store(true, Ordering::Relaxed),
                Err(e) => {
                    self.fail("write", e);
                }
            }
        }
    }

    /// Every pending webhook event, in order per endpoint: (endpoint,
    /// sequence, record). An unreadable entry is logged and skipped.
    pub fn load_webhook_events(&self) -> Vec<(String, u64, Vec<u8>)> {
        let mut out = Vec::new();
        for kv in self.webhooks.iter() {
            let parsed = kv.into_inner().map_err(|e| e.to_string()).and_then(|(k, v)| {
                let split = k.len().checked_sub(9).filter(|&at| k[at] == 0).ok_or("a malformed key")?;
                let name = std::str::from_utf8(&k[..split]).map_err(|_| "an endpoint name that is not UTF-8")?;
                let seq = u64::from_be_bytes(k[split + 1..].try_into().map_err(|_| "a malformed key")?);
                Ok((name.to_string(), seq, v.to_vec()))
            });
            match parsed {
                Ok(e) => out.push(e),
                Err(e) => {
                    tracing::error!(path = %self.path, error = %e, "cannot read a pending webhook event; skipped")
                }
            }
        }
        out
    }

    /// The first failure, if the store stopped accepting writes.
    pub fn failure(&self) -> Option<String> {
        self.failed.lock().clone()
    }

    fn check(&self) -> Result<(), DiskError> {
        match self.failure() {
            Some(f) => Err(DiskError::Write(f)),
            None => Ok(()),
        }
    }

    /// Records a failed write or sync (first one wins), counts and logs it.
    fn fail(&self, op: &'static str, e: fjall::Error) -> DiskError {
        let msg = format!("{op} to {} failed: {e}", self.path);
        metrics::counter!("switchboard_storage_errors_total", "op" => op).increment(1);
        let mut f = self.failed.lock();
        if f.is_none() {
            tracing::error!(path = %self.path, op, error = %e, "storage failed; publishes are refused until restart");
            *f = Some(msg.clone());
        }
        drop(f);
        DiskError::Write(msg)
    }

    /// fsyncs the journal now, timing it.
    fn sync_now(&self) -> Result<(), DiskError> {
        let started = Instant::now();
        self.db.persist(PersistMode::SyncAll).map_err(|e| self.fail("sync", e))?;
        metrics::histogram!("switchboard_storage_sync_seconds").record(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Starts the thread that fsyncs: the group committer under `always`,
    /// the periodic syncer under `interval`, none under `never`.
    fn spawn_syncer(self: &Arc<Self>, interval: Duration) {
        let weak = Arc::downgrade(self);
        let sig = self.signals.clone();
        let handle = match self.sync {
            SyncPolicy::Never => return,
            SyncPolicy::Always => std::thread::Builder::new().name("storage-commit".into()).spawn(move || {
                loop {
                    let mut q = sig.queue.lock();
                    let covered = *sig.synced.borrow();
                    while q.written == covered && !q.stop {
                        sig.wake.wait(&mut q);
                    }
                    if q.stop {
                        return;
                    }
                    let upto = q.written;
                    drop(q);
                    let Some(store) = weak.upgrade() else { return };
                    let result = store.sync_now();
                    drop(store);
                    sig.synced.send_replace(if result.is_ok() { upto } else { u64::MAX });
                    if result.is_err() {
                        return;
                    }
                }
            }),
            SyncPolicy::Interval => std::thread::Builder::new().name("storage-sync".into()).spawn(move || {
                loop {
                    let mut q = sig.queue.lock();
                    if !q.stop {
                        sig.wake.wait_for(&mut q, interval);
                    }
                    if q.stop {
                        return;
                    }
                    drop(q);
                    let Some(store) = weak.upgrade() else { return };
                    if store.dirty.swap(false, Ordering::Relaxed) && store.sync_now().is_err() {
                        return;
                    }
                }
            }),
        };
        match handle {
            Ok(h) => self.threads.lock().push(h),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the storage sync thread");
            }
        }
    }

    fn stop_syncer(&self) {
        self.signals.queue.lock().stop = true;
        self.signals.wake.notify_all();
    }

    /// Sets the `switchboard_storage_bytes` gauge to the bytes the store
    /// takes on disk now.
    pub fn refresh_size(&self) {
        metrics::gauge!("switchboard_storage_bytes").set(self.db.disk_space().unwrap_or(0) as f64);
    }

    /// Stops the sync thread, fsyncs and marks the stop clean. Idempotent.
    pub fn close(&self) {
        self.stop_syncer();
        let threads: Vec<_> = self.threads.lock().drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
        if self.check().is_err() {
            return;
        }
        // The clean marker first, then every memtable into tables — the
        // node's too: a keyspace with unflushed writes pins every journal
        // since them — so the journals go and the next start reads tables
        // instead of replaying journals (docs/storage.md).
        let node = StoredNode { clean: true, boot_id: String::new(), layout: LAYOUT };
        let done = self.node.insert(NODE_KEY, node.encode_to_vec()).map_err(|e| self.fail("write", e));
        for ks in [&self.channels, &self.messages, &self.retained, &self.ids, &self.mqtt, &self.webhooks, &self.node] {
            if let Err(e) = ks.rotate_memtable_and_wait() {
                tracing::warn!(path = %self.path, error = %e, "cannot flush a memtable at close");
            }
        }
        // fjall retires journals when a rotation finds them flushed, and the
        // rotations above ran before their own flushes finished: one more
        // (the marker again) lets the flushed journals go.
        let done = done
            .and_then(|()| self.node.insert(NODE_KEY, node.encode_to_vec()).map_err(|e| self.fail("write", e)))
            .and_then(|()| self.node.rotate_memtable_and_wait().map_err(|e| self.fail("write", e)))
            .and_then(|()| self.sync_now());
        match done {
            Ok(()) => tracing::info!(path = %self.path, "storage closed cleanly"),
            Err(e) => tracing::error!(path = %self.path, error = %e, "storage did not close cleanly"),
        }
    }
}

#[cfg(test)]
impl DiskStore {
    /// The serials of a channel's messages the store's files hold now
    /// (whether or not history still does).
    fn stored_serials(&self, name: &str) -> Vec<u64> {
        let Some(head) = self.channels.get(name).unwrap() else { return Vec::new() };
        let key = StoredChannel::decode(&*head).unwrap().key;
        self.messages_of(key)
    }

    fn messages_of(&self, key: u64) -> Vec<u64> {
        self.messages.prefix(key.to_le_bytes()).map(|kv| split_message_key(&kv.key().unwrap()).unwrap().1).collect()
    }

    /// Flushes the messages and compacts them into one run, as fjall
    /// eventually does by itself.
    fn compact_messages(&self) {
        self.messages.rotate_memtable_and_wait().unwrap();
        self.messages.major_compact().unwrap();
    }
}

#[cfg(test)]
#[path = "disk_tests.rs"]
mod tests;
