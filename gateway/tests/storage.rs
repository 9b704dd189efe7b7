//! Durable storage, end to end: the real binary on a real directory,
//! stopped with SIGTERM or killed with SIGKILL, started again, and checked
//! with real clients (REST, WebSocket, SSE and long polling through
//! `switchboard sub`, MQTT 3.1.1 and 5 through rumqttc).

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{DataDir, Node, Proc, WAIT, until};
use parking_lot::Mutex;
use switchboard::tooling::client;

async fn history(base: &str, channel: &str) -> serde_json::Value {
    let url = format!("{base}/v1/channels/{channel}/history?limit=1000");
    reqwest::get(url).await.expect("history").json().await.expect("history json")
}

/// (serial, text) of a history page.
fn serial_texts(h: &serde_json::Value) -> Vec<(u64, String)> {
    h["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| (m["serial"].as_u64().unwrap(), m["text"].as_str().unwrap_or_default().to_string()))
        .collect()
}

async fn rest_publish(base: &str, channel: &str, text: &str, id: Option<&str>) -> serde_json::Value {
    client::publish_rest(base, channel, Bytes::from(text.to_owned()), id, None).await.expect("REST publish")
}

/// An MQTT 5 client with a persistent session (clean start 0, expiry 1 h).
fn mqtt5(url: &str, id: &str) -> (rumqttc::v5::AsyncClient, rumqttc::v5::EventLoop) {
    let addr = url.trim_start_matches("mqtt://");
    let (host, port) = addr.rsplit_once(':').unwrap();
    let mut o = rumqttc::v5::MqttOptions::new(id, host, port.parse().unwrap());
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(3600));
    o.set_keep_alive(Duration::from_secs(30));
    o.set_outgoing_inflight_upper_limit(16);
    rumqttc::v5::AsyncClient::new(o, 100)
}

/// An MQTT 3.1.1 client with a persistent session (clean session 0).
fn mqtt4(url: &str, id: &str) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    let addr = url.trim_start_matches("mqtt://");
    let (host, port) = addr.rsplit_once(':').unwrap();
    let mut o = rumqttc::MqttOptions::new(id, host, port.parse().unwrap());
    o.set_clean_session(false);
    o.set_keep_alive(Duration::from_secs(30));
    rumqttc::AsyncClient::new(o, 100)
}

/// Connects an MQTT 5 session, subscribes `filter` at QoS 1 and returns
/// whether the session was present; then disconnects cleanly.
async fn mqtt5_subscribe_and_leave(url: &str, id: &str, filter: &str) {
    use rumqttc::v5::{Event, Incoming};
    let (c, mut ev) = mqtt5(url, id);
    c.subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, ev.poll()).await.expect("SUBACK in time").expect("MQTT 5") {
            Event::Incoming(Incoming::SubAck(_)) => break,
            _ => continue,
        }
    }
    c.disconnect().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(2), async { while ev.poll().await.is_ok() {} }).await;
}

async fn mqtt4_subscribe_and_leave(url: &str, id: &str, filter: &str) {
    use rumqttc::{Event, Packet};
    let (c, mut ev) = mqtt4(url, id);
    c.subscribe(filter, rumqttc::QoS::AtLeastOnce).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, ev.poll()).await.expect("SUBACK in time").expect("MQTT 3.1.1") {
            Event::Incoming(Packet::SubAck(_)) => break,
            _ => continue,
        }
    }
    c.disconnect().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(2), async { while ev.poll().await.is_ok() {} }).await;
}

/// Reconnects an MQTT 5 session and collects the payloads it is sent
/// until it holds `want`; returns (session present, payloads in order).
async fn mqtt5_collect(url: &str, id: &str, want: &BTreeSet<String>) -> (bool, Vec<String>) {
    use rumqttc::v5::{Event, Incoming};
    let (c, mut ev) = mqtt5(url, id);
    let mut present = None;
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !want.iter().all(|w| got.contains(w)) {
        match tokio::time::timeout_at(deadline, ev.poll()).await.expect("messages in time").expect("MQTT 5") {
            Event::Incoming(Incoming::ConnAck(a)) => present = Some(a.session_present),
            Event::Incoming(Incoming::Publish(p)) => got.push(String::from_utf8_lossy(&p.payload).into_owned()),
            _ => {}
        }
    }
    let _ = c.disconnect().await;
    (present.expect("CONNACK"), got)
}

async fn mqtt4_collect(url: &str, id: &str, want: &BTreeSet<String>) -> (bool, Vec<String>) {
    use rumqttc::{Event, Packet};
    let (c, mut ev) = mqtt4(url, id);
    let mut present = None;
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !want.iter().all(|w| got.contains(w)) {
        match tokio::time::timeout_at(deadline, ev.poll()).await.expect("messages in time").expect("MQTT 3.1.1") {
            Event::Incoming(Packet::ConnAck(a)) => present = Some(a.session_present),
            Event::Incoming(Packet::Publish(p)) => got.push(String::from_utf8_lossy(&p.payload).into_owned()),
            _ => {}
        }
    }
    let _ = c.disconnect().await;
    (present.expect("CONNACK"), got)
}

/// A clean stop and a start on the same directory keep every channel's
/// history, epoch and serials, rewind, retained values, idempotency keys
/// and MQTT persistent sessions (3.1.1 and 5), whose QoS 1 messages from
/// while they were away arrive after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_history_positions_retained_ids_and_mqtt_sessions() {
    let dir = DataDir::new("restart");
    let mut node = Node::start(&dir.0, None, &[]);
    let (base, mqtt) = (node.base(), node.mqtt_url());
    mqtt5_subscribe_and_leave(&mqtt, "keep-5", "r/#").await;
    mqtt4_subscribe_and_leave(&mqtt, "keep-4", "r/#").await;

    // REST (an idempotency key, a retained JSON publish), WebSocket (an id),
    // MQTT (QoS 1, retained).
    let a1 = rest_publish(&base, "r/a", "a1", Some("rest-1")).await;
    rest_publish(&base, "r/a", "a2", None).await;
    let retained = reqwest::Client::new()
        .post(format!("{base}/v1/channels/r/b/messages"))
        .header("content-type", "application/json")
        .body(r#"{"text": "b-last", "retain": true}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(retained.status(), 200);
    let ws = client::publish_ws(&format!("ws://{}", node.http), "r/b", Bytes::from("b2"), Some("ws-1")).await.unwrap();
    client::publish_mqtt(&mqtt, "r/c", Bytes::from("c1"), 1, true).await.unwrap();
    let mut before = BTreeMap::new();
    for ch in ["r/a", "r/b", "r/c"] {
        let h = history(&base, ch).await;
        before.insert(ch, (h["epoch"].as_str().unwrap().to_string(), h["serial"].as_u64().unwrap(), serial_texts(&h)));
    }
    assert_eq!(before["r/a"].2, vec![(1, "a1".into()), (2, "a2".into())]);

    node.signal("-TERM");
    let node = Node::start(&dir.0, None, &[]);
    let (base, mqtt) = (node.base(), node.mqtt_url());

    for ch in ["r/a", "r/b", "r/c"] {
        let h = history(&base, ch).await;
        let after = (h["epoch"].as_str().unwrap().to_string(), h["serial"].as_u64().unwrap(), serial_texts(&h));
        assert_eq!(after, before[ch], "{ch} after the restart");
    }
    // Idempotency keys: a repeat within the window is a duplicate of the
    // first position, on REST and WebSocket alike.
    let dup = rest_publish(&base, "r/a", "a1", Some("rest-1")).await;
    assert_eq!((dup["duplicate"].as_bool(), dup["serial"].as_u64()), (Some(true), a1["serial"].as_u64()));
    assert_eq!(dup["epoch"], a1["epoch"]);
    let ws_dup =
        client::publish_ws(&format!("ws://{}", node.http), "r/b", Bytes::from("b2"), Some("ws-1")).await.unwrap();
    assert!(ws_dup.duplicate);
    assert_eq!((ws_dup.epoch.as_str(), ws_dup.serial), (ws.epoch.as_str(), ws.serial));
    // Serials continue where they were.
    let a3 = rest_publish(&base, "r/a", "a3", None).await;
    assert_eq!(a3["serial"].as_u64(), Some(3));
    assert_eq!(a3["epoch"], a1["epoch"]);
    // Rewind reads the stored history.
    let mut rewound = Vec::new();
    client::subscribe_ws(&format!("ws://{}", node.http), "r/a", Some(2), |e| {
        if let client::SubEvent::Message(m) = e {
            rewound.push((m.serial, String::from_utf8_lossy(&m.payload).into_owned()));
        }
        rewound.len() < 2
    })
    .await
    .unwrap();
    assert_eq!(rewound, vec![(2, "a2".to_string()), (3, "a3".to_string())]);
    // Retained values: a new MQTT subscriber gets both channels' last values.
    let want: BTreeSet<String> = ["b-last", "c1"].into_iter().map(String::from).collect();
    let (_, got) = {
        use rumqttc::v5::{Event, Incoming};
        let (c, mut ev) = rumqttc::v5::AsyncClient::new(
            rumqttc::v5::MqttOptions::new(
                "fresh",
                node.mqtt.split(':').next().unwrap(),
                node.mqtt.rsplit(':').next().unwrap().parse().unwrap(),
            ),
            10,
        );
        c.subscribe("r/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce).await.unwrap();
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + WAIT;
        while !want.iter().all(|w| got.contains(w)) {
            if let Event::Incoming(Incoming::Publish(p)) =
                tokio::time::timeout_at(deadline, ev.poll()).await.expect("retained in time").unwrap()
            {
                assert!(p.retain, "a retained value arrives with RETAIN set");
                got.push(String::from_utf8_lossy(&p.payload).into_owned());
            }
        }
        let _ = c.disconnect().await;
        ((), got)
    };
    assert_eq!(got.iter().collect::<BTreeSet<_>>(), want.iter().collect::<BTreeSet<_>>());

    // The persistent sessions were away for all of it: everything published
    // since they left (before and after the restart) arrives, once.
    rest_publish(&base, "r/d", "d-after", None).await;
    let away: BTreeSet<String> =
        ["a1", "a2", "b-last", "b2", "c1", "a3", "d-after"].into_iter().map(String::from).collect();
    let (present5, got5) = mqtt5_collect(&mqtt, "keep-5", &away).await;
    assert!(present5, "the MQTT 5 session survived the restart");
    let (present4, got4) = mqtt4_collect(&mqtt, "keep-4", &away).await;
    assert!(present4, "the MQTT 3.1.1 session survived the restart");
    for (v, got) in [("5", &got5), ("3.1.1", &got4)] {
        let mut sorted = got.clone();
        sorted.sort();
        let mut want: Vec<String> = away.iter().cloned().collect();
        want.sort();
        assert_eq!(sorted, want, "MQTT {v}: each message from while away, once");
    }
}

/// Waits for the next MQTT 5 event `pick` accepts.
async fn mqtt5_until<T>(
    ev: &mut rumqttc::v5::EventLoop,
    what: &str,
    mut pick: impl FnMut(rumqttc::v5::Event) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let e = tokio::time::timeout_at(deadline, ev.poll()).await.unwrap_or_else(|_| panic!("{what} in time"));
        if let Some(t) = pick(e.unwrap_or_else(|e| panic!("MQTT 5 while waiting for {what}: {e}"))) {
            return t;
        }
    }
}

/// The machine restarted after an unclean stop under `sync = "interval"`
/// (another boot id): every channel starts a new epoch, its history kept
/// (docs/storage.md). A persistent MQTT 5 session whose position is in the
/// old epoch resumes with everything the new epoch holds, from its first
/// message — what it saw and what it missed alike, since positions of
/// another epoch say nothing — and the first of them tells it of the gap:
/// user property `switchboard-gap` = `epoch_changed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_epoch_change_replays_the_new_epoch_from_its_first_and_tells_mqtt5() {
    use rumqttc::v5::{Event, Incoming};
    let dir = DataDir::new("epoch");
    let boot = std::env::temp_dir().join(format!("sb-storage-epoch-boot-{}", std::process::id()));
    std::fs::write(&boot, "boot-1").unwrap();
    let env = [("SWITCHBOARD_STORAGE__BOOT_ID_FILE", boot.to_str().unwrap())];
    let mut node = Node::start(&dir.0, None, &env);
    let (base, mqtt) = (node.base(), node.mqtt_url());

    // The session receives e1, leaves cleanly, and misses e2.
    let (c, mut ev) = mqtt5(&mqtt, "epoch-5");
    c.subscribe("ep/a", rumqttc::v5::mqttbytes::QoS::AtLeastOnce).await.unwrap();
    mqtt5_until(&mut ev, "SUBACK", |e| matches!(e, Event::Incoming(Incoming::SubAck(_))).then_some(())).await;
    let e1 = rest_publish(&base, "ep/a", "e1", None).await;
    let got = mqtt5_until(&mut ev, "e1", |e| match e {
        Event::Incoming(Incoming::Publish(p)) => Some(p.payload),
        _ => None,
    })
    .await;
    assert_eq!(&got[..], b"e1");
    c.disconnect().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(2), async { while ev.poll().await.is_ok() {} }).await;
    rest_publish(&base, "ep/a", "e2", None).await;

    node.signal("-KILL");
    std::fs::write(&boot, "boot-2").unwrap();
    let node = Node::start(&dir.0, None, &env);
    let (base, mqtt) = (node.base(), node.mqtt_url());
    let h = history(&base, "ep/a").await;
    assert_ne!(h["epoch"], e1["epoch"], "a new epoch after a machine restart");
    assert_eq!(serial_texts(&h), vec![(1, "e1".to_string()), (2, "e2".to_string())]);

    let (c, mut ev) = mqtt5(&mqtt, "epoch-5");
    let mut got: Vec<(String, Vec<(String, String)>)> = Vec::new();
    while got.len() < 2 {
        let p = mqtt5_until(&mut ev, "the new epoch's messages", |e| match e {
            Event::Incoming(Incoming::Publish(p)) => Some(p),
            _ => None,
        })
        .await;
        let props = p.properties.map(|p| p.user_properties).unwrap_or_default();
        got.push((String::from_utf8_lossy(&p.payload).into_owned(), props));
    }
    let gap = vec![("switchboard-gap".to_string(), "epoch_changed".to_string())];
    assert_eq!(got, vec![("e1".to_string(), gap), ("e2".to_string(), vec![])]);
    let _ = c.disconnect().await;
    let _ = std::fs::remove_file(&boot);
}

/// One publisher's record: what was acknowledged, at which position.
#[derive(Debug, Default)]
struct Acks {
    /// payload → (channel, epoch, serial)
    acked: BTreeMap<String, (String, String, u64)>,
    /// Publishes that failed (the gateway was down) and were retried.
    retried: usize,
}

/// Publishes `{proto}-{i}` with id `{proto}-{i}` on `load/{proto}` until
/// `stop`, retrying a failed publish with the same id (so one that was
/// stored but not acknowledged before the kill is acknowledged as a
/// duplicate of its position, never stored twice).
async fn publisher(
    proto: &'static str,
    node: Arc<Mutex<(String, String)>>,
    stop: Arc<AtomicBool>,
    acks: Arc<Mutex<Acks>>,
) {
    let channel = format!("load/{proto}");
    let mut i = 0u32;
    let mut pace = tokio::time::interval(Duration::from_millis(4));
    while !stop.load(Ordering::Relaxed) {
        pace.tick().await;
        let text = format!("{proto}-{i}");
        let (http, mqtt) = node.lock().clone();
        let res: Result<(String, u64), String> = match proto {
            "rest" => {
                client::publish_rest(&format!("http://{http}"), &channel, Bytes::from(text.clone()), Some(&text), None)
                    .await
                    .map(|v| (v["epoch"].as_str().unwrap_or_default().to_string(), v["serial"].as_u64().unwrap_or(0)))
                    .map_err(|e| e.to_string())
            }
            "ws" => client::publish_ws(&format!("ws://{http}"), &channel, Bytes::from(text.clone()), Some(&text))
                .await
                .map(|a| (a.epoch, a.serial))
                .map_err(|e| e.to_string()),
            _ => mqtt_publish_once(&mqtt, &channel, &text).await.map(|()| (String::new(), 0)),
        };
        match res {
            Ok((epoch, serial)) => {
                acks.lock().acked.insert(text, (channel.clone(), epoch, serial));
                i += 1;
            }
            Err(_) => acks.lock().retried += 1,
        }
    }
}

/// One MQTT 5 QoS 1 publish carrying the idempotency id as the user
/// property `id`, acknowledged by PUBACK, on a connection of its own.
async fn mqtt_publish_once(addr: &str, channel: &str, text: &str) -> Result<(), String> {
    use rumqttc::v5::{Event, Incoming};
    let (host, port) = addr.rsplit_once(':').unwrap();
    let mut o = rumqttc::v5::MqttOptions::new(format!("pub-{text}"), host, port.parse().unwrap());
    o.set_outgoing_inflight_upper_limit(4);
    let (c, mut ev) = rumqttc::v5::AsyncClient::new(o, 4);
    let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
        user_properties: vec![("id".into(), text.into())],
        ..Default::default()
    };
    c.publish_with_properties(channel, rumqttc::v5::mqttbytes::QoS::AtLeastOnce, false, text.to_owned(), props)
        .await
        .map_err(|e| e.to_string())?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        match tokio::time::timeout_at(deadline, ev.poll()).await {
            Ok(Ok(Event::Incoming(Incoming::PubAck(a)))) => {
                let ok = a.reason == rumqttc::v5::mqttbytes::v5::PubAckReason::Success;
                let _ = c.disconnect().await;
                let _ = tokio::time::timeout(Duration::from_millis(200), ev.poll()).await;
                return if ok { Ok(()) } else { Err(format!("{:?}", a.reason)) };
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("no PUBACK".into()),
        }
    }
}

/// A `switchboard sub --json` child: its message lines, parsed.
fn sub_messages(p: &Proc, into: &mut Vec<serde_json::Value>) {
    while let Ok(line) = p.lines.try_recv() {
        let v: serde_json::Value = serde_json::from_str(&line).expect("sub --json prints JSON lines");
        if v["type"] == "message" {
            into.push(v);
        }
    }
}

/// The MQTT 5 persistent subscriber: reconnects by itself (rumqttc) and
/// records every payload.
fn mqtt_subscriber(addr: String, got: Arc<Mutex<Vec<String>>>, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        use rumqttc::v5::{Event, Incoming};
        let (c, mut ev) = mqtt5(&format!("mqtt://{addr}"), "crash-sub");
        c.subscribe("load/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce).await.unwrap();
        while !stop.load(Ordering::Relaxed) {
            match tokio::time::timeout(Duration::from_millis(200), ev.poll()).await {
                Ok(Ok(Event::Incoming(Incoming::Publish(p)))) => {
                    got.lock().push(String::from_utf8_lossy(&p.payload).into_owned());
                }
                Ok(Ok(Event::Incoming(Incoming::ConnAck(a)))) if !a.session_present => {
                    // The first connect has no session; a reconnect must.
                    let first = got.lock().is_empty();
                    assert!(first, "the session was lost across the restart");
                    c.subscribe("load/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce).await.unwrap();
                }
                Ok(Ok(_)) | Err(_) => {}
                Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let _ = c.disconnect().await;
    })
}

/// Publishers on REST, WebSocket and MQTT and subscribers on WebSocket,
/// SSE, long polling and MQTT; the gateway is killed with SIGKILL mid-way
/// and started again on the same directory and ports. Every acknowledged
/// message is in history at its acknowledged position; the subscribers
/// resume from what they held (a position, `Last-Event-ID`, a cursor, an
/// MQTT session) with nothing lost and nothing twice.
async fn sigkill_under_load(sync: &str) {
    let dir = DataDir::new(&format!("kill-{sync}"));
    let env = [("SWITCHBOARD_STORAGE__SYNC", sync), ("SWITCHBOARD_LIMITS__PUBLISH_RATE", "0")];
    let mut node = Node::start(&dir.0, None, &env);
    let (http, admin, mqtt) = (node.http.clone(), node.admin.clone(), node.mqtt.clone());
    let url = format!("http://{http}");
    let subs: Vec<(&str, Proc)> = ["ws", "sse", "poll"]
        .into_iter()
        .map(|via| (via, Proc::spawn(&["sub", "load/#", "--via", via, "--url", &url, "--json"])))
        .collect();
    let stop_subs = Arc::new(AtomicBool::new(false));
    let mqtt_got = Arc::new(Mutex::new(Vec::new()));
    let mqtt_task = mqtt_subscriber(mqtt.clone(), mqtt_got.clone(), stop_subs.clone());
    // Everyone is subscribed once each has seen a warm-up message.
    let mut seen: HashMap<&str, Vec<serde_json::Value>> = HashMap::new();
    let deadline = Instant::now() + WAIT;
    for n in 0.. {
        rest_publish(&url, "load/warm", &format!("warm-{n}"), None).await;
        for (via, p) in &subs {
            sub_messages(p, seen.entry(via).or_default());
        }
        if subs.iter().all(|(via, _)| !seen[via].is_empty()) && !mqtt_got.lock().is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "every subscriber sees a warm-up message");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let target = Arc::new(Mutex::new((http.clone(), mqtt.clone())));
    let stop = Arc::new(AtomicBool::new(false));
    let mut pubs = Vec::new();
    let mut all_acks = Vec::new();
    for proto in ["rest", "ws", "mqtt"] {
        let acks = Arc::new(Mutex::new(Acks::default()));
        all_acks.push((proto, acks.clone()));
        pubs.push(tokio::spawn(publisher(proto, target.clone(), stop.clone(), acks)));
    }
    until("publishes on every protocol", || all_acks.iter().all(|(_, a)| a.lock().acked.len() >= 40)).await;

    node.signal("-KILL");
    let killed_at: usize = all_acks.iter().map(|(_, a)| a.lock().acked.len()).sum();
    let node = Node::start(&dir.0, Some((&http, &admin, &mqtt)), &env);
    until("publishes after the restart", || {
        all_acks.iter().all(|(_, a)| a.lock().acked.len() >= 80)
            && all_acks.iter().map(|(_, a)| a.lock().acked.len()).sum::<usize>() > killed_at + 60
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for p in pubs {
        p.await.unwrap();
    }
    let acked: BTreeMap<String, (String, String, u64)> =
        all_acks.iter().flat_map(|(_, a)| a.lock().acked.clone().into_iter()).collect();
    let retried: usize = all_acks.iter().map(|(_, a)| a.lock().retried).sum();
    assert!(retried > 0, "some publishes met the dead gateway");

    // History: every acknowledged message at its acknowledged position,
    // each payload once, serials chained.
    let base = node.base();
    for proto in ["rest", "ws", "mqtt"] {
        let h = history(&base, &format!("load/{proto}")).await;
        let msgs = serial_texts(&h);
        let texts: Vec<&String> = msgs.iter().map(|(_, t)| t).collect();
        let unique: BTreeSet<&String> = texts.iter().copied().collect();
        assert_eq!(unique.len(), texts.len(), "{proto}: a payload stored twice");
        for w in msgs.windows(2) {
            assert_eq!(w[1].0, w[0].0 + 1, "{proto}: serials chain");
        }
        for (text, (ch, epoch, serial)) in acked.iter().filter(|(_, (ch, _, _))| ch == &format!("load/{proto}")) {
            assert!(texts.contains(&text), "{ch}: acknowledged {text} is missing from history");
            if proto != "mqtt" {
                assert_eq!(h["epoch"].as_str(), Some(epoch.as_str()), "{ch}: the epoch changed");
                assert!(
                    msgs.contains(&(*serial, text.clone())),
                    "{ch}: {text} is not at its acknowledged serial {serial}"
                );
            }
        }
    }

    // Subscribers: each acknowledged message once, in order per channel.
    let want: BTreeSet<&String> = acked.keys().collect();
    until("every subscriber holds every acknowledged message", || {
        for (via, p) in &subs {
            sub_messages(p, seen.entry(via).or_default());
        }
        let got_all = subs.iter().all(|(via, _)| {
            let have: BTreeSet<&str> = seen[via].iter().filter_map(|m| m["text"].as_str()).collect();
            want.iter().all(|w| have.contains(w.as_str()))
        });
        let mqtt_have: BTreeSet<String> = mqtt_got.lock().iter().cloned().collect();
        got_all && want.iter().all(|w| mqtt_have.contains(*w))
    })
    .await;
    for (via, _) in &subs {
        let mut last: HashMap<String, u64> = HashMap::new();
        for m in &seen[via] {
            let ch = m["channel"].as_str().unwrap().to_string();
            let serial = m["serial"].as_u64().unwrap();
            if let Some(prev) = last.insert(ch.clone(), serial) {
                assert!(serial > prev, "{via}: {ch} serial {serial} after {prev} (a duplicate or a reorder)");
            }
        }
    }
    stop_subs.store(true, Ordering::Relaxed);
    mqtt_task.await.unwrap();
    // MQTT carries no positions: at QoS 1 a message unacknowledged when the
    // gateway died comes again (MQTT's at-least-once), but nothing else does.
    let got = mqtt_got.lock().clone();
    let mut counts: BTreeMap<&String, usize> = BTreeMap::new();
    for g in got.iter().filter(|g| !g.starts_with("warm-")) {
        *counts.entry(g).or_default() += 1;
    }
    let repeated: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(repeated.len() <= 100, "MQTT: more repeats than one in-flight window: {repeated:?}");
    drop(node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_with_sync_always() {
    sigkill_under_load("always").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_with_sync_interval() {
    sigkill_under_load("interval").await;
}

/// Starts `dev --data DIR` expecting it to refuse: returns its stderr.
fn refused_start(dir: &Path) -> String {
    let data = dir.display().to_string();
    let args = [
        "dev",
        "--http",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--mqtt",
        "127.0.0.1:0",
        "--https",
        "",
        "--mqtts",
        "",
        "--quic",
        "",
        "--data",
        &data,
    ];
    let out = Command::new(common::BIN)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("run switchboard");
    assert!(!out.status.success(), "started on storage it cannot use");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Damaged files: the gateway refuses to start, naming the directory and
/// what to do; it never starts empty over data it cannot read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_storage_refuses_to_start_with_a_clear_error() {
    let dir = DataDir::new("damaged");
    let mut node = Node::start(&dir.0, None, &[]);
    for i in 0..20 {
        rest_publish(&node.base(), "d/a", &format!("m{i}"), None).await;
    }
    node.signal("-TERM");
    let mut stack = vec![dir.0.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if std::fs::metadata(&p).unwrap().len() > 0 && !p.ends_with("lock") {
                std::fs::write(&p, vec![0x5Au8; 100]).unwrap();
            }
        }
    }
    let err = refused_start(&dir.0);
    assert!(err.contains(&dir.0.display().to_string()), "names the directory: {err}");
    assert!(err.contains("backup") || err.contains("move it away"), "says what to do: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A tmpfs of `size` mounted on a new directory (root only; unmounted on
/// drop).
struct Tmpfs(DataDir);

impl Tmpfs {
    fn mount(tag: &str, options: &str) -> Tmpfs {
        assert!(is_root(), "this test mounts a tmpfs and needs root (CI runs as root)");
        let dir = DataDir::new(tag);
        std::fs::create_dir_all(&dir.0).unwrap();
        let ok = Command::new("mount").args(["-t", "tmpfs", "-o", options, "tmpfs"]).arg(&dir.0).status().unwrap();
        assert!(ok.success(), "mount -t tmpfs -o {options} failed");
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0.0).status();
    }
}

/// A directory the gateway cannot write to (a read-only mount): a clear
/// error at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_storage_refuses_to_start_with_a_clear_error() {
    let fs = Tmpfs::mount("readonly", "ro,size=1m");
    let err = refused_start(&fs.0.0);
    assert!(err.contains(&fs.0.0.display().to_string()), "names the directory: {err}");
    assert!(err.contains("write access") || err.contains("Read-only"), "says what is wrong: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// A full disk: publishes fail with a clear error (503), `/readyz` turns
/// false, nothing crashes, and reads and subscriptions go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_publishes_clearly_and_turns_readyz_false() {
    let fs = Tmpfs::mount("full", "size=4m");
    let node = Node::start(&fs.0.0, None, &[("SWITCHBOARD_LIMITS__PUBLISH_RATE", "0")]);
    let base = node.base();
    let http = reqwest::Client::new();
    // Incompressible (the store compresses): xorshift bytes.
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut noise = move |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    let mut stored = 0;
    let mut refusal = None;
    for _ in 0..400 {
        let r = http.post(format!("{base}/v1/channels/full/a/messages")).body(noise(60 * 1024)).send().await.unwrap();
        if r.status().is_success() {
            stored += 1;
        } else {
            refusal = Some((r.status().as_u16(), r.text().await.unwrap()));
            break;
        }
    }
    let (status, body) = refusal.expect("the disk filled up");
    assert!(stored > 0);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("storage"), "{body}");
    // Still alive: readyz says why it is not ready, reads work.
    let ready = reqwest::get(format!("http://{}/readyz", node.admin)).await.unwrap();
    assert_eq!(ready.status(), 503);
    assert!(ready.text().await.unwrap().contains("storage"));
    // Every acknowledged message is readable (pages are bounded in bytes:
    // page on with `since`).
    let mut read = 0;
    let mut since = String::new();
    loop {
        let url = format!("{base}/v1/channels/full/a/history?limit=1000{since}");
        let h: serde_json::Value = reqwest::get(url).await.unwrap().json().await.unwrap();
        assert_eq!(h["serial"].as_u64(), Some(stored as u64));
        let page = h["messages"].as_array().unwrap();
        let Some(last) = page.last() else { break };
        read += page.len();
        since = format!("&since={}:{}", h["epoch"].as_str().unwrap(), last["serial"].as_u64().unwrap());
    }
    assert_eq!(read, stored);
    let next = http.post(format!("{base}/v1/channels/full/b/messages")).body("small").send().await.unwrap();
    assert_eq!(next.status(), 503, "refused until restart, never half-written");
    let metrics = reqwest::get(format!("http://{}/metrics", node.admin)).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("switchboard_storage_errors_total"), "the failure is counted");
}
