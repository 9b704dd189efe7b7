//! Tests of the disk store under the engine: a real store on a real
//! directory, reopened in the same process (a drop without
//! [`DiskStore::close`] is an unclean stop).

use super::*;

use std::sync::atomic::AtomicUsize;

use bytes::Bytes;
use switchboard_protocols::mqtt::session::{SessionState, Subscription};
use switchboard_protocols::mqtt::{Claim, SessionStore, StoredSession};
use switchboard_protocols::port::{Outbound, Outbox};

use crate::core::engine::local::LocalEngine;
use crate::core::engine::mqtt_sessions::{MqttSessions, StoreLimits};
use crate::core::engine::{Caller, EngineConfig};

const T0: i64 = 1_700_000_000_000;

/// A fresh directory under the system's temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("sb-disk-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn opts(dir: &Path, sync: SyncPolicy) -> DiskOptions {
    let boot = dir.with_extension("boot");
    if !boot.exists() {
        std::fs::write(&boot, "boot-1").unwrap();
    }
    DiskOptions {
        dir: dir.to_path_buf(),
        sync,
        sync_interval: Duration::from_millis(50),
        cache_bytes: 1 << 20,
        boot_id_file: boot,
    }
}

/// Opens the store; a store just dropped may still be held for the length
/// of a sync its thread had started, so `Locked` is retried for a moment.
fn open(o: &DiskOptions) -> (Arc<DiskStore>, Recovery) {
    for _ in 0..200 {
        match DiskStore::open(o) {
            Err(DiskError::Open { detail, .. }) if detail.contains("Locked") => {
                std::thread::sleep(Duration::from_millis(5));
            }
            other => return other.expect("opens"),
        }
    }
    panic!("{} stayed locked", o.dir.display())
}

fn engine(o: &DiskOptions, now: i64) -> (LocalEngine, Arc<DiskStore>, bool) {
    let (store, recovery) = open(o);
    let unclean = recovery.unclean;
    (LocalEngine::with_store(EngineConfig::default(), store.clone(), recovery, now).expect("loads"), store, unclean)
}

fn caller() -> Caller {
    Caller { session: 0, client_id: "p".into(), connection_id: "".into(), protocol: proto::Protocol::Rest }
}

fn publish(e: &LocalEngine, ch: &str, payload: &str, id: &str, retain: bool, now: i64) -> proto::PublishAck {
    let req = proto::Publish {
        channel: ch.into(),
        payload: Bytes::from(payload.to_owned()),
        id: id.into(),
        retain,
        ..Default::default()
    };
    futures_util::FutureExt::now_or_never(e.publish_at(&caller(), req, now))
        .expect("interval sync never waits")
        .expect("publish")
}

fn history(e: &LocalEngine, ch: &str, now: i64) -> proto::HistoryResult {
    e.history(&proto::History { channel: ch.into(), ..Default::default() }, now).expect("history")
}

#[test]
fn everything_survives_a_clean_restart() {
    let dir = TempDir::new("clean");
    let o = opts(&dir.0, SyncPolicy::Interval);
    let (e, store, unclean) = engine(&o, T0);
    assert!(!unclean, "a new directory is not an unclean stop");
    let a1 = publish(&e, "a", "one", "k1", false, T0);
    publish(&e, "a", "two", "", true, T0 + 1);
    publish(&e, "b", "bee", "", false, T0 + 2);
    store.close();
    drop((e, store));

    let (e, store, unclean) = engine(&o, T0 + 10);
    assert!(!unclean);
    let h = history(&e, "a", T0 + 10);
    assert_eq!((h.epoch.as_str(), h.serial), (a1.epoch.as_str(), 2));
    let texts: Vec<_> =
        h.messages.iter().map(|m| (m.serial, m.prev_serial, m.epoch.clone(), m.payload.clone())).collect();
    assert_eq!(texts, vec![(1, 0, a1.epoch.clone(), Bytes::from("one")), (2, 1, a1.epoch.clone(), Bytes::from("two"))]);
    // The id is still in its window: a repeat is a duplicate of serial 1.
    let dup = publish(&e, "a", "one", "k1", false, T0 + 11);
    assert!(dup.duplicate);
    assert_eq!(dup.serial, 1);
    // Serials continue; the retained value is back.
    assert_eq!(publish(&e, "a", "three", "", false, T0 + 12).serial, 3);
    let ob = Outbox::new(1 << 20);
    e.attach(
        &Caller { session: 7, client_id: "s".into(), connection_id: "c7".into(), protocol: proto::Protocol::Ws },
        ob,
    );
    let out = e
        .subscribe(7, &proto::Subscribe { filter: "a".into(), retained: true, ..Default::default() }, T0 + 13)
        .unwrap();
    let retained: Vec<_> = out
        .replay
        .iter()
        .map(|o| match o {
            Outbound::Message(d) => d.envelope.payload.clone(),
            Outbound::Gap(g) => panic!("{g:?}"),
        })
        .collect();
    assert_eq!(retained, vec![Bytes::from("two")]);
    assert_eq!(history(&e, "b", T0 + 13).serial, 1);
    store.close();
}

#[test]
fn an_unclean_stop_keeps_positions_on_the_same_boot_and_changes_epochs_on_another() {
    let dir = TempDir::new("unclean");
    let o = opts(&dir.0, SyncPolicy::Interval);
    let (e, store, _) = engine(&o, T0);
    let first = publish(&e, "a", "one", "", false, T0);
    drop((e, store)); // no close: a crash of the process

    let (e, store, unclean) = engine(&o, T0 + 5);
    assert!(unclean);
    let h = history(&e, "a", T0 + 5);
    assert_eq!((h.epoch.as_str(), h.serial, h.messages.len()), (first.epoch.as_str(), 1, 1), "same boot: exact");
    drop((e, store));

    // The machine restarted meanwhile: what `interval` had not synced may
    // be gone, so the channel starts a new epoch (its history stays).
    std::fs::write(&o.boot_id_file, "boot-2").unwrap();
    let (e, store, unclean) = engine(&o, T0 + 6);
    assert!(unclean);
    let h = history(&e, "a", T0 + 6);
    assert_ne!(h.epoch, first.epoch);
    assert_eq!(h.messages.len(), 1);
    assert_eq!(h.messages[0].epoch, h.epoch);
    store.close();
    drop((e, store));

    // Under `always` every acknowledged publish was synced: a new boot
    // changes nothing.
    let o = DiskOptions { sync: SyncPolicy::Always, ..o };
    let (e, store, _) = engine(&o, T0 + 7);
    let before = history(&e, "a", T0 + 7).epoch;
    drop((e, store));
    std::fs::write(&o.boot_id_file, "boot-3").unwrap();
    let (e, store, unclean) = engine(&o, T0 + 8);
    assert!(unclean);
    assert_eq!(history(&e, "a", T0 + 8).epoch, before);
    store.close();
}

#[tokio::test]
async fn always_acknowledges_and_delivers_after_the_sync() {
    let dir = TempDir::new("always");
    let o = opts(&dir.0, SyncPolicy::Always);
    let (e, store, _) = engine(&o, T0);
    let e = Arc::new(e);
    let ob = Outbox::new(1 << 20);
    e.attach(
        &Caller { session: 1, client_id: "s".into(), connection_id: "c1".into(), protocol: proto::Protocol::Ws },
        ob.clone(),
    );
    e.subscribe(1, &proto::Subscribe { filter: "a".into(), ..Default::default() }, T0).unwrap();
    // Concurrent publishes on two channels share syncs and keep each
    // channel's order.
    let mut tasks = Vec::new();
    for i in 0..50u64 {
        let e = e.clone();
        let ch = if i % 2 == 0 { "a" } else { "b" };
        tasks.push(tokio::spawn(async move {
            let req = proto::Publish { channel: ch.into(), payload: Bytes::from(format!("{i}")), ..Default::default() };
            let ack = e.publish_at(&caller(), req, T0).await.expect("publish");
            // Delivered (so readable) only once synced, and acknowledged
            // only after that.
            let h = history(&e, ch, T0);
            assert!(h.messages.iter().any(|m| m.serial == ack.serial), "acknowledged before delivery: {ack:?}");
            ack
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut got = Vec::new();
    ob.drain(&mut got).unwrap();
    let serials: Vec<u64> = got
        .iter()
        .map(|o| match o {
            Outbound::Message(d) => d.envelope.serial,
            Outbound::Gap(g) => panic!("{g:?}"),
        })
        .collect();
    assert_eq!(serials, (1..=25).collect::<Vec<_>>(), "every message of a, once, in order");
    assert_eq!(history(&e, "a", T0).messages.len(), 25);
    store.close();
}

#[test]
fn a_damaged_store_is_a_clear_error_naming_the_directory() {
    let dir = TempDir::new("corrupt");
    let o = opts(&dir.0, SyncPolicy::Interval);
    let (e, store, _) = engine(&o, T0);
    for i in 0..20 {
        publish(&e, "a", &format!("m{i}"), "", false, T0 + i);
    }
    store.close();
    drop((e, store));
    // Overwrite every table and journal file with garbage.
    let mut damaged = 0;
    let mut stack = vec![dir.0.clone()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if std::fs::metadata(&p).unwrap().len() > 0 && !p.ends_with("lock") {
                std::fs::write(&p, vec![0xA5u8; 64]).unwrap();
                damaged += 1;
            }
        }
    }
    assert!(damaged > 0);
    let err = DiskStore::open(&o)
        .and_then(|(store, recovery)| LocalEngine::with_store(EngineConfig::default(), store, recovery, T0))
        .map(|_| ())
        .expect_err("a damaged store must not open");
    let text = err.to_string();
    assert!(text.contains(&dir.0.display().to_string()), "{text}");
    assert!(text.contains("backup") || text.contains("move it away"), "{text}");
}

#[test]
fn mqtt_sessions_come_back_from_their_last_checkpoint() {
    let dir = TempDir::new("mqtt");
    let o = opts(&dir.0, SyncPolicy::Interval);
    let limits = StoreLimits { max_sessions: 10, expiry_max: Duration::from_secs(3600), max_delayed_wills: 10 };
    let (store, _) = open(&o);
    let now = tokio::time::Instant::now();
    let sessions = MqttSessions::on_disk(limits, store.clone(), now, T0 as u64);
    let (ticket, _) = sessions.claim("dev-1", now);
    let mut state = SessionState::default();
    state.subscribe(Subscription {
        filter: "s/#".into(),
        qos: 1,
        no_local: false,
        retain_as_published: false,
        id: None,
    });
    state.advance("s/1", "E", 7);
    sessions.checkpoint("dev-1", ticket.conn, &state, Duration::from_secs(600));
    // Another client stored cleanly, one whose session ends with it.
    let (t2, _) = sessions.claim("dev-2", now);
    sessions.release(
        "dev-2",
        t2.conn,
        Some(Box::new(StoredSession { state: SessionState::default(), disconnected_ms: 5 })),
        Duration::from_secs(600),
        now,
    );
    let (t3, _) = sessions.claim("dev-3", now);
    sessions.checkpoint("dev-3", t3.conn, &state, Duration::from_secs(600));
    sessions.release("dev-3", t3.conn, None, Duration::ZERO, now);
    drop((sessions, store)); // crash: dev-1 was live

    let (store, _) = open(&o);
    let sessions = MqttSessions::on_disk(limits, store.clone(), now, crate::core::router::now_ms() as u64);
    assert_eq!(sessions.stored(), 2);
    let Claim::Resumed(s) = sessions.claim("dev-1", now).1 else { panic!("dev-1 resumes") };
    assert_eq!(s.state.subs[0].filter, "s/#");
    assert_eq!(s.state.delivered["s/1"], proto::Position { epoch: "E".into(), serial: 7 });
    assert!(matches!(sessions.claim("dev-2", now).1, Claim::Resumed(_)));
    assert!(matches!(sessions.claim("dev-3", now).1, Claim::Fresh));
    store.close();
}

/// History is trimmed on disk as in memory: a restart reads back what
/// history held (by count: each message records the oldest serial kept
/// with it; by age: the head records it), and compaction drops from the
/// files what left history, and every message of a forgotten channel.
#[test]
fn trimming_by_count_and_age_happens_on_disk() {
    let dir = TempDir::new("trim");
    let o = opts(&dir.0, SyncPolicy::Interval);
    let rules = vec![
        crate::core::engine::ChannelRule {
            pattern: "count/#".into(),
            policy: crate::core::engine::ChannelPolicy { history_size: 3, ..Default::default() },
        },
        crate::core::engine::ChannelRule {
            pattern: "age/#".into(),
            policy: crate::core::engine::ChannelPolicy { history_ttl: Duration::from_secs(1), ..Default::default() },
        },
        crate::core::engine::ChannelRule {
            pattern: "gone/#".into(),
            policy: crate::core::engine::ChannelPolicy { history_ttl: Duration::from_secs(1), ..Default::default() },
        },
    ];
    let cfg = EngineConfig { rules, idle_channel_ttl: Duration::from_secs(60), ..EngineConfig::default() };
    let (store, recovery) = open(&o);
    let e = LocalEngine::with_store(cfg.clone(), store.clone(), recovery, T0).unwrap();
    for i in 0..10 {
        publish(&e, "count/a", &format!("c{i}"), "", false, T0 + i);
        publish(&e, "age/a", &format!("a{i}"), "", false, T0 + i);
        publish(&e, "gone/a", &format!("g{i}"), "", false, T0 + i);
    }
    publish(&e, "age/a", "late", "", false, T0 + 1_500);
    e.sweep(T0 + 2_000);
    store.close();
    drop((e, store));

    let (store, recovery) = open(&o);
    let e = LocalEngine::with_store(cfg.clone(), store.clone(), recovery, T0 + 2_001).unwrap();
    let serials =
        |ch: &str| -> Vec<u64> { history(&e, ch, T0 + 2_001).messages.iter().map(|m| m.serial).collect::<Vec<_>>() };
    assert_eq!(serials("count/a"), vec![8, 9, 10], "count: the last three come back");
    assert_eq!(serials("age/a"), vec![11], "age: only the message younger than a second comes back");
    assert_eq!(history(&e, "count/a", T0 + 2_001).serial, 10, "the position is kept");
    assert_eq!(store.stored_serials("count/a").len(), 10, "nothing was deleted per publish");
    let gone_key = store.channels.get("gone/a").unwrap().map(|h| StoredChannel::decode(&*h).unwrap().key).unwrap();
    store.compact_messages();
    assert_eq!(store.stored_serials("count/a"), vec![8, 9, 10], "compaction drops what left by count");
    assert_eq!(store.stored_serials("age/a"), vec![11], "and what left by age");
    assert_eq!(store.messages_of(gone_key).len(), 10, "a history not read yet is kept whole");
    // gone/a: read (all of it aged out), then forgotten as idle.
    assert_eq!(serials_of(&e, "gone/a", T0 + 2_001), Vec::<u64>::new());
    let later = T0 + 2_001 + 3_600_000;
    e.sweep(later);
    assert!(store.channels.get("gone/a").unwrap().is_none(), "an idle channel is forgotten");
    store.close();
    drop((e, store));
    // After a restart its key is unknown: compaction drops its messages,
    // and the next channel of that name gets a new key.
    let (store, recovery) = open(&o);
    let e = LocalEngine::with_store(cfg, store.clone(), recovery, later).unwrap();
    store.compact_messages();
    assert_eq!(store.messages_of(gone_key), Vec::<u64>::new(), "a forgotten channel's messages are dropped");
    publish(&e, "gone/a", "again", "", false, later);
    let key = store.channels.get("gone/a").unwrap().map(|h| StoredChannel::decode(&*h).unwrap().key).unwrap();
    assert!(key > gone_key, "store keys are never reused ({key} after {gone_key})");
    assert_eq!(serials_of(&e, "gone/a", later), vec![1]);
    store.close();
}

fn serials_of(e: &LocalEngine, ch: &str, now: i64) -> Vec<u64> {
    history(e, ch, now).messages.iter().map(|m| m.serial).collect()
}

/// A resume by time after a restart knows exactly what history lost: the
/// newest trimmed timestamp comes back from the messages (the head is not
/// rewritten per publish), so a resume from before it is a gap and one from
/// after it replays everything since.
#[test]
fn resume_by_time_after_a_restart_knows_what_was_trimmed() {
    let dir = TempDir::new("since");
    let o = opts(&dir.0, SyncPolicy::Interval);
    let rules = vec![crate::core::engine::ChannelRule {
        pattern: "s/#".into(),
        policy: crate::core::engine::ChannelPolicy { history_size: 3, ..Default::default() },
    }];
    let cfg = EngineConfig { rules, ..EngineConfig::default() };
    let (store, recovery) = open(&o);
    let e = LocalEngine::with_store(cfg.clone(), store.clone(), recovery, T0).unwrap();
    for i in 0..5 {
        publish(&e, "s/a", &format!("m{i}"), "", false, T0 + i);
    }
    drop((e, store)); // unclean: the head was written once, at the first publish

    let (store, recovery) = open(&o);
    let e = LocalEngine::with_store(cfg, store.clone(), recovery, T0 + 10).unwrap();
    let ob = Outbox::new(1 << 20);
    e.attach(
        &Caller { session: 1, client_id: "c".into(), connection_id: "c1".into(), protocol: proto::Protocol::Sse },
        ob,
    );
    let since = |ms: i64| proto::Subscribe { filter: "s/a".into(), since_ms: ms as u64, ..Default::default() };
    let gap = e.subscribe(1, &since(T0 + 1), T0 + 10).unwrap();
    assert!(matches!(gap.replay.as_slice(), [Outbound::Gap(g)] if g.reason == "trimmed"), "{:?}", gap.replay);
    let full = e.subscribe(1, &since(T0 + 2), T0 + 10).unwrap();
    let serials: Vec<u64> = full
        .replay
        .iter()
        .map(|o| match o {
            Outbound::Message(d) => d.envelope.serial,
            Outbound::Gap(g) => panic!("{g:?}"),
        })
        .collect();
    assert_eq!(serials, vec![3, 4, 5]);
    assert_eq!(full.subscribed.channels[0].serial, 5);
    store.close();
}

/// A start reads heads only: a channel's history is read when it is first
/// used, or by the background loader, whichever comes first, and either
/// way it is the whole history.
#[test]
fn histories_load_on_first_use_or_in_the_background() {
    // The loader trims by the wall clock: publish at the real time.
    let t0 = crate::core::router::now_ms();
    let dir = TempDir::new("lazy");
    let o = opts(&dir.0, SyncPolicy::Interval);
    let (e, store, _) = engine(&o, t0);
    for ch in ["l/a", "l/b", "l/c"] {
        for i in 0..20 {
            publish(&e, ch, &format!("{ch}-{i}"), "", false, t0 + i);
        }
    }
    store.close();
    drop((e, store));

    let (e, store, _) = engine(&o, t0 + 100);
    let loaded = |e: &LocalEngine, ch: &str| e.history_loaded(ch);
    assert!(!loaded(&e, "l/a") && !loaded(&e, "l/b"), "a start reads heads only");
    // First use: a history read, and a publish that must continue serials.
    assert_eq!(history(&e, "l/a", t0 + 100).messages.len(), 20);
    assert_eq!(publish(&e, "l/b", "next", "", false, t0 + 101).serial, 21);
    assert_eq!(history(&e, "l/b", t0 + 101).messages.len(), 21);
    // The loader reaches the rest.
    let e = Arc::new(e);
    e.spawn_loader();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !loaded(&e, "l/c") {
        assert!(std::time::Instant::now() < deadline, "the loader reaches every channel");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(history(&e, "l/c", t0 + 102).messages.len(), 20);
    store.close();
}

#[test]
fn pending_webhook_events_come_back_in_order_per_endpoint_after_a_crash() {
    let dir = TempDir::new("webhooks");
    let o = opts(&dir.0, SyncPolicy::Interval);
    let (store, _) = open(&o);
    // Names that are prefixes of each other stay apart (the NUL ends one).
    for (name, seq) in [("http://h/a", 2), ("http://h/a", 1), ("http://h/ab", 1), ("http://h/a", 300)] {
        store.put_webhook_event(name, seq, format!("{name}#{seq}").as_bytes()).unwrap();
    }
    store.remove_webhook_event("http://h/a", 2);
    drop(store); // a crash: no close
    let (store, recovery) = open(&o);
    assert!(recovery.unclean);
    let got: Vec<(String, u64, String)> =
        store.load_webhook_events().into_iter().map(|(n, s, v)| (n, s, String::from_utf8(v).unwrap())).collect();
    assert_eq!(
        got,
        [
            ("http://h/a".to_string(), 1, "http://h/a#1".to_string()),
            ("http://h/a".to_string(), 300, "http://h/a#300".to_string()),
            ("http://h/ab".to_string(), 1, "http://h/ab#1".to_string()),
        ]
    );
    store.close();
}
