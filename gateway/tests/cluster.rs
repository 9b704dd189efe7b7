//! The NATS JetStream engine across nodes (#12): a 3-server JetStream
//! cluster (real `nats-server` processes, R3 streams) and three
//! `switchboard` nodes on it, on loopback, driven by real clients —
//! rumqttc, tokio-tungstenite, reqwest with eventsource-stream, plain HTTP
//! long polls. Failures are SIGKILLs by PID.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::{ClusterNode, NatsCluster};
use common::until;
use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(20);

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// `(payload, epoch, serial, prev_serial)` of a JSON message frame.
fn pos(m: &Value) -> (String, String, u64, u64) {
    (
        m["text"].as_str().unwrap_or_default().to_string(),
        m["epoch"].as_str().unwrap_or_default().to_string(),
        m["serial"].as_u64().unwrap_or_default(),
        m["prev_serial"].as_u64().unwrap_or_default(),
    )
}

async fn rest_publish(base: &str, channel: &str, text: &str, id: Option<&str>, retain: bool) -> (u16, Value) {
    let mut body = json!({ "text": text, "retain": retain });
    if let Some(id) = id {
        body["id"] = json!(id);
    }
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/channels/{channel}/messages"))
        .json(&body)
        .send()
        .await
        .expect("REST publish");
    (r.status().as_u16(), r.json().await.unwrap_or_default())
}

async fn ws_connect(http: &str, client_id: &str) -> Ws {
    let (ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{http}/v1/ws?client_id={client_id}")).await.expect("WebSocket");
    ws
}

async fn ws_send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.expect("WebSocket send");
}

/// The next frame of `type` (others are skipped).
async fn ws_next(ws: &mut Ws, ty: &str) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next()).await.unwrap_or_else(|_| panic!("no {ty} frame"));
        if let Some(Ok(Message::Text(t))) = msg {
            let v: Value = serde_json::from_str(&t).expect("JSON frame");
            if v["type"] == ty {
                return v;
            }
        } else {
            panic!("the WebSocket ended waiting for {ty}: {msg:?}");
        }
    }
}

/// Collects the `message` frames an SSE stream delivers; the flag turns
/// true with its `connected` event (the stream is subscribed).
fn sse_collect(url: String) -> (Arc<Mutex<Vec<Value>>>, Ready) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let ready = Ready::default();
    let (into, connected) = (got.clone(), ready.clone());
    tokio::spawn(async move {
        use eventsource_stream::Eventsource;
        let r = reqwest::get(url).await.expect("SSE");
        assert_eq!(r.status(), 200);
        let mut events = r.bytes_stream().eventsource();
        while let Some(Ok(e)) = events.next().await {
            match e.event.as_str() {
                "connected" => connected.mark(),
                "message" => into.lock().push(serde_json::from_str(&e.data).expect("JSON data")),
                _ => {}
            }
        }
    });
    (got, ready)
}

/// How many clients have subscribed (each counts once).
#[derive(Clone, Default)]
struct Ready(Arc<std::sync::atomic::AtomicUsize>);

impl Ready {
    fn mark(&self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn count(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// One cluster at a time: each is six processes, and the machine has two
/// cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A fresh NATS cluster and three gateway nodes `a`, `b`, `c` on it, held
/// while the guard lives.
async fn cluster(
    tag: &str,
    env: &[(&str, &str)],
) -> (tokio::sync::MutexGuard<'static, ()>, NatsCluster, Vec<ClusterNode>) {
    let turn = ONE_AT_A_TIME.lock().await;
    let nats = NatsCluster::start(tag);
    let urls = nats.urls();
    let nodes = ["a", "b", "c"].iter().map(|n| ClusterNode::start(n, &urls, None, env)).collect();
    (turn, nats, nodes)
}

/// An MQTT device publishing on node A reaches an SSE subscriber on B, a
/// wildcard WebSocket subscriber on C and a long poller hopping between
/// the nodes — the same payloads with the same positions everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_message_has_one_position_on_every_node_and_protocol() {
    let (_turn, _nats, nodes) = cluster("xproto", &[]).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let ch = "plant/line1/temp";

    let (sse, sse_ready) = sse_collect(format!("{}/v1/sse?channel={ch}", b.base()));
    let mut ws = ws_connect(&c.http, "wild").await;
    ws_send(&mut ws, json!({"type":"subscribe","req":1,"filter":"plant/+/temp"})).await;
    ws_next(&mut ws, "subscribed").await;
    // The poller's starting cursor: an empty poll on node C.
    let first: Value = reqwest::get(format!("{}/v1/poll?channel={ch}&timeout=1", c.base()))
        .await
        .expect("poll")
        .json()
        .await
        .expect("poll JSON");
    let mut cursor = first["cursor"].as_str().expect("a cursor").to_string();
    // Wait for the SSE stream to be live: a warm-up on another channel of
    // no interest would not tell, so publish on the channel itself.
    let (host, port) = a.mqtt.rsplit_once(':').unwrap();
    let mut o = rumqttc::MqttOptions::new("device-1", host, port.parse().unwrap());
    o.set_keep_alive(Duration::from_secs(5));
    let (device, mut ev) = rumqttc::AsyncClient::new(o, 100);
    let acks = Arc::new(Mutex::new(0usize));
    let counted = acks.clone();
    tokio::spawn(async move {
        while let Ok(e) = ev.poll().await {
            if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) = e {
                *counted.lock() += 1;
            }
        }
    });
    until("the SSE stream on node B is subscribed", || sse_ready.count() == 1).await;
    let n = 30;
    for i in 0..n {
        device.publish(ch, rumqttc::QoS::AtLeastOnce, false, format!("t{i}")).await.unwrap();
    }
    until("every PUBACK", || *acks.lock() == n).await;

    // WebSocket, wildcard, node C.
    let mut over_ws = Vec::new();
    while over_ws.len() < n {
        over_ws.push(pos(&ws_next(&mut ws, "message").await));
    }
    // Long polls, each on the next node, from the last cursor.
    let mut polled = Vec::new();
    let bases = [a.base(), b.base(), c.base()];
    let deadline = Instant::now() + WAIT;
    let mut i = 0;
    while polled.len() < n {
        assert!(Instant::now() < deadline, "long polls gathered {} of {n}", polled.len());
        let r: Value = reqwest::get(format!("{}/v1/poll?channel={ch}&cursor={cursor}&timeout=5", bases[i % 3]))
            .await
            .expect("poll")
            .json()
            .await
            .expect("poll JSON");
        assert_eq!(r["gaps"].as_array().map(Vec::len), Some(0), "no gap: {r}");
        polled.extend(r["messages"].as_array().expect("messages").iter().map(pos));
        cursor = r["cursor"].as_str().expect("cursor").to_string();
        i += 1;
    }
    until("the SSE stream on node B has every message", || sse.lock().len() >= n).await;
    let over_sse: Vec<_> = sse.lock().iter().map(pos).collect();

    let texts: Vec<String> = over_ws.iter().map(|p| p.0.clone()).collect();
    assert_eq!(texts, (0..n).map(|i| format!("t{i}")).collect::<Vec<_>>(), "every message once, in order");
    for w in over_ws.windows(2) {
        assert_eq!(w[1].3, w[0].2, "prev_serial chains the channel's messages: {w:?}");
        assert_eq!(w[1].1, w[0].1, "one epoch");
    }
    assert_eq!(over_sse, over_ws, "SSE on B and WebSocket on C see the same positions");
    assert_eq!(polled, over_ws, "long polls across A, B and C see the same positions");
    let _ = device.disconnect().await;
}

/// The same idempotency key on two nodes is stored once; both publishers
/// are told the same position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_is_one_message_across_nodes() {
    let (_turn, _nats, nodes) = cluster("idem", &[]).await;
    let (s1, first) = rest_publish(&nodes[0].base(), "orders/1", "pay", Some("order-1"), false).await;
    let (s2, second) = rest_publish(&nodes[1].base(), "orders/1", "pay", Some("order-1"), false).await;
    let (s3, third) = rest_publish(&nodes[2].base(), "orders/1", "pay", Some("order-1"), false).await;
    assert_eq!((s1, s2, s3), (200, 200, 200));
    assert_eq!(first["duplicate"], false);
    for again in [&second, &third] {
        assert_eq!(again["duplicate"], true, "{again}");
        assert_eq!((&again["epoch"], &again["serial"]), (&first["epoch"], &first["serial"]), "the same position");
    }
    let h: Value =
        reqwest::get(format!("{}/v1/channels/orders/1/history", nodes[2].base())).await.unwrap().json().await.unwrap();
    assert_eq!(h["messages"].as_array().map(Vec::len), Some(1), "stored once: {h}");
}

/// Publishers on every node at once, on one channel: one chain, no hole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_on_three_nodes_make_one_chain() {
    let (_turn, _nats, nodes) = cluster("race", &[]).await;
    let mut ws = ws_connect(&nodes[2].http, "watcher").await;
    ws_send(&mut ws, json!({"type":"subscribe","req":1,"filter":"race/one"})).await;
    ws_next(&mut ws, "subscribed").await;
    let mut tasks = Vec::new();
    for (k, node) in nodes.iter().enumerate() {
        let base = node.base();
        tasks.push(tokio::spawn(async move {
            for i in 0..20 {
                let (s, body) = rest_publish(&base, "race/one", &format!("n{k}-{i}"), None, false).await;
                assert_eq!(s, 200, "{body}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let h: Value =
        reqwest::get(format!("{}/v1/channels/race/one/history", nodes[0].base())).await.unwrap().json().await.unwrap();
    let msgs = h["messages"].as_array().expect("messages");
    assert_eq!(msgs.len(), 60, "every publish stored");
    assert_eq!(msgs[0]["prev_serial"], 0);
    for w in msgs.windows(2) {
        assert_eq!(w[1]["prev_serial"], w[0]["serial"], "one chain: {} then {}", w[0], w[1]);
    }
    // Live, on a third node: the same chain.
    let mut live = Vec::new();
    while live.len() < msgs.len() {
        live.push(pos(&ws_next(&mut ws, "message").await));
    }
    assert_eq!(live, msgs.iter().map(pos).collect::<Vec<_>>(), "live deliveries carry the history's positions");
}

/// A retained value set on one node is what a subscriber on another gets
/// first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_value_is_read_on_every_node() {
    let (_turn, _nats, nodes) = cluster("retained", &[]).await;
    let (s, ack) = rest_publish(&nodes[0].base(), "lamp/1/state", "on", None, true).await;
    assert_eq!(s, 200);
    for node in &nodes[1..] {
        let mut ws = ws_connect(&node.http, "reader").await;
        ws_send(&mut ws, json!({"type":"subscribe","req":1,"filter":"lamp/+/state","retained":true})).await;
        ws_next(&mut ws, "subscribed").await;
        let m = ws_next(&mut ws, "message").await;
        assert_eq!((m["text"].as_str(), &m["serial"]), (Some("on"), &ack["serial"]), "on node {}", node.name);
        assert_eq!(m["retain"], true);
    }
}

/// Killing every gateway node loses no channel's epoch or serials:
/// clients resume on the new processes with no `epoch_changed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_of_every_node_keeps_every_epoch() {
    let (_turn, nats, mut nodes) = cluster("restart", &[]).await;
    let mut last = Value::Null;
    for i in 0..5 {
        last = rest_publish(&nodes[i % 3].base(), "keep/me", &format!("k{i}"), None, false).await.1;
    }
    for n in &mut nodes {
        n.kill();
    }
    drop(nodes);
    let urls = nats.urls();
    let node = ClusterNode::start("a", &urls, None, &[]);
    let (_, after) = rest_publish(&node.base(), "keep/me", "k5", None, false).await;
    assert_eq!(after["epoch"], last["epoch"], "the epoch survives");
    let mut ws = ws_connect(&node.http, "resumer").await;
    let from = last["serial"].as_u64().unwrap();
    ws_send(
        &mut ws,
        json!({"type":"subscribe","req":1,"filter":"keep/me","positions":{"keep/me":{"epoch":last["epoch"],"serial":from}}}),
    )
    .await;
    let sub = ws_next(&mut ws, "subscribed").await;
    assert_eq!(sub["channels"][0]["recovered"], true, "{sub}");
    let m = ws_next(&mut ws, "message").await;
    assert_eq!((m["text"].as_str(), m["prev_serial"].as_u64()), (Some("k5"), Some(from)));
}

async fn members(base: &str, channel: &str) -> Vec<String> {
    let v: Value =
        reqwest::get(format!("{base}/v1/channels/{channel}/presence")).await.unwrap().json().await.unwrap_or_default();
    let mut ids: Vec<String> = v["members"]
        .as_array()
        .map(|m| m.iter().map(|m| m["client_id"].as_str().unwrap_or_default().to_string()).collect())
        .unwrap_or_default();
    ids.sort();
    ids
}

/// The next presence event's `(kind, client_id)` on a WebSocket.
async fn presence_event(ws: &mut Ws) -> (String, String) {
    loop {
        let m = ws_next(ws, "message").await;
        if let Some(kind) = m["kind"].as_str().filter(|k| k.starts_with("presence.")) {
            return (kind.to_string(), m["publisher"]["client_id"].as_str().unwrap_or_default().to_string());
        }
    }
}

/// Members entered on one node are listed on the others and their events
/// reach subscribers everywhere; when the node holding a member dies, a
/// survivor announces its leave after the grace period, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_spans_nodes_and_a_dead_nodes_members_leave() {
    let (_turn, _nats, mut nodes) = cluster("presence", &[("SWITCHBOARD_CHANNELS__PRESENCE_GRACE", "1s")]).await;
    let mut watcher = ws_connect(&nodes[2].http, "watcher").await;
    ws_send(&mut watcher, json!({"type":"subscribe","req":1,"filter":"room/1","presence":true})).await;
    ws_next(&mut watcher, "subscribed").await;

    let mut alice = ws_connect(&nodes[0].http, "alice").await;
    ws_send(&mut alice, json!({"type":"presence.enter","req":1,"channel":"room/1","text":"hi"})).await;
    ws_next(&mut alice, "publish_ack").await;
    let mut bob = ws_connect(&nodes[1].http, "bob").await;
    ws_send(&mut bob, json!({"type":"presence.enter","req":1,"channel":"room/1","text":"yo"})).await;
    ws_next(&mut bob, "publish_ack").await;
    assert_eq!(presence_event(&mut watcher).await, ("presence.enter".into(), "alice".into()));
    assert_eq!(presence_event(&mut watcher).await, ("presence.enter".into(), "bob".into()));
    for node in &nodes {
        let base = node.base();
        let deadline = Instant::now() + WAIT;
        while members(&base, "room/1").await != ["alice", "bob"] {
            assert!(Instant::now() < deadline, "node {} lists both members", node.name);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // A clean leave on node B is announced at once.
    ws_send(&mut bob, json!({"type":"presence.leave","req":2,"channel":"room/1"})).await;
    ws_next(&mut bob, "publish_ack").await;
    assert_eq!(presence_event(&mut watcher).await, ("presence.leave".into(), "bob".into()));

    // Node A dies with alice present: a survivor says she left.
    let killed = Instant::now();
    nodes[0].kill();
    let event = tokio::time::timeout(Duration::from_secs(20), presence_event(&mut watcher)).await;
    assert_eq!(event.expect("a leave within 20 s"), ("presence.leave".into(), "alice".into()));
    let took = killed.elapsed();
    assert!(took >= Duration::from_secs(1), "not before the grace period ({took:?})");
    assert_eq!(members(&nodes[1].base(), "room/1").await, Vec::<String>::new());
    // Announced once: nothing more within another sweep or two.
    let more = tokio::time::timeout(Duration::from_secs(3), presence_event(&mut watcher)).await;
    assert!(more.is_err(), "a second presence event: {more:?}");
}

/// With every NATS server down, publishes fail fast with each protocol's
/// documented error, `/readyz` says why, and subscribers stay connected;
/// once NATS is back, publishing resumes and subscribers get every message
/// with no hole in the chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_down_fails_publishes_fast_and_subscribers_resume_when_it_returns() {
    let (_turn, mut nats, nodes) = cluster("down", &[]).await;
    let mut ws = ws_connect(&nodes[1].http, "sub").await;
    ws_send(&mut ws, json!({"type":"subscribe","req":1,"filter":"down/ch"})).await;
    ws_next(&mut ws, "subscribed").await;
    let mut got = Vec::new();
    for i in 0..3 {
        assert_eq!(rest_publish(&nodes[0].base(), "down/ch", &format!("before{i}"), None, false).await.0, 200);
        got.push(pos(&ws_next(&mut ws, "message").await));
    }
    // MQTT clients connected before NATS goes.
    let (host, port) = nodes[2].mqtt.rsplit_once(':').unwrap();
    let port: u16 = port.parse().unwrap();
    let (m5, mut ev5) = rumqttc::v5::AsyncClient::new(rumqttc::v5::MqttOptions::new("down-5", host, port), 10);
    mqtt5_until(&mut ev5, |e| matches!(e, rumqttc::v5::Event::Incoming(rumqttc::v5::Incoming::ConnAck(_))))
        .await
        .unwrap();
    let mut o4 = rumqttc::MqttOptions::new("down-4", host, port);
    o4.set_keep_alive(Duration::from_secs(30));
    let (m4, mut ev4) = rumqttc::AsyncClient::new(o4, 10);
    loop {
        let e = tokio::time::timeout(WAIT, ev4.poll()).await.expect("MQTT 3.1.1 CONNACK").expect("MQTT 3.1.1 connects");
        if let rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)) = e {
            break;
        }
    }

    for s in &mut nats.servers {
        s.kill();
    }
    let readyz = |admin: String| async move {
        let r = reqwest::get(format!("http://{admin}/readyz")).await.expect("readyz");
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    };
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = readyz(nodes[0].admin.clone()).await;
        if status == 503 {
            assert!(body.contains("NATS"), "readyz names NATS: {body}");
            break;
        }
        assert!(Instant::now() < deadline, "readyz turns 503 with NATS down");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t = Instant::now();
    let (status, body) = rest_publish(&nodes[0].base(), "down/ch", "lost", None, false).await;
    assert_eq!((status, body["error"]["code"].as_str()), (503, Some("unavailable")), "REST: {body}");
    assert!(t.elapsed() < Duration::from_secs(2), "REST failed fast ({:?})", t.elapsed());
    let mut pubber = ws_connect(&nodes[1].http, "pubber").await;
    ws_send(&mut pubber, json!({"type":"publish","req":7,"channel":"down/ch","text":"lost"})).await;
    let e = ws_next(&mut pubber, "error").await;
    assert_eq!((e["req"].as_u64(), e["code"].as_str()), (Some(7), Some("unavailable")), "WebSocket: {e}");
    // MQTT 5: PUBACK 0x80 (unspecified error).
    m5.publish("down/ch", rumqttc::v5::mqttbytes::QoS::AtLeastOnce, false, "lost").await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    let reason = loop {
        match tokio::time::timeout_at(deadline, ev5.poll()).await.expect("a PUBACK") {
            Ok(rumqttc::v5::Event::Incoming(rumqttc::v5::Incoming::PubAck(a))) => break a.reason,
            Ok(_) => {}
            Err(e) => panic!("MQTT 5: {e}"),
        }
    };
    assert_eq!(reason, rumqttc::v5::mqttbytes::v5::PubAckReason::UnspecifiedError, "MQTT 5 PUBACK reason");
    // MQTT 3.1.1 has no failure PUBACK: the connection closes.
    m4.publish("down/ch", rumqttc::QoS::AtLeastOnce, false, "lost").await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, ev4.poll()).await.expect("MQTT 3.1.1: the connection closes") {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                panic!("MQTT 3.1.1: a PUBACK for a lost publish")
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    // A new MQTT connection cannot reach its session: CONNACK 0x88.
    let (_m, mut ev) = rumqttc::v5::AsyncClient::new(rumqttc::v5::MqttOptions::new("down-new", host, port), 10);
    let refused =
        mqtt5_until(&mut ev, |e| matches!(e, rumqttc::v5::Event::Incoming(rumqttc::v5::Incoming::ConnAck(_)))).await;
    assert!(
        matches!(
            refused,
            Err(rumqttc::v5::ConnectionError::ConnectionRefused(
                rumqttc::v5::mqttbytes::v5::ConnectReturnCode::ServerUnavailable
            ))
        ),
        "a new MQTT 5 connection while NATS is down: {refused:?}"
    );

    for i in 0..3 {
        nats.restart(i);
    }
    nats.wait_ready();
    // Publishing resumes (once the gateway has reconnected).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut i = 0;
    while i < 3 {
        let (status, _) = rest_publish(&nodes[0].base(), "down/ch", &format!("after{i}"), None, false).await;
        if status == 200 {
            i += 1;
        } else {
            assert!(Instant::now() < deadline, "publishes resume after NATS returns");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    while got.len() < 6 {
        got.push(pos(&ws_next(&mut ws, "message").await));
    }
    let texts: Vec<&str> = got.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(texts, ["before0", "before1", "before2", "after0", "after1", "after2"]);
    for w in got.windows(2) {
        assert_eq!(w[1].3, w[0].2, "no hole in the chain: {w:?}");
    }
    let (status, _) = readyz(nodes[0].admin.clone()).await;
    assert_eq!(status, 200, "ready again");
}

/// SIGKILL one of the three NATS servers while publishing: every
/// acknowledged publish is delivered, and publishing goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_one_nats_server_loses_no_acknowledged_publish() {
    let (_turn, mut nats, nodes) = cluster("nats-kill", &[]).await;
    let mut ws = ws_connect(&nodes[2].http, "sub").await;
    ws_send(&mut ws, json!({"type":"subscribe","req":1,"filter":"steady/ch"})).await;
    ws_next(&mut ws, "subscribed").await;
    let mut acked = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    for i in 0..200 {
        if i == 50 {
            nats.servers[0].kill();
        }
        loop {
            let (status, _) = rest_publish(&nodes[i % 2].base(), "steady/ch", &format!("s{i}"), None, false).await;
            if status == 200 {
                acked.push(format!("s{i}"));
                break;
            }
            assert!(Instant::now() < deadline, "publishing goes on with two of three NATS servers");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut got: Vec<(String, String, u64, u64)> = Vec::new();
    while got.len() < acked.len() {
        got.push(pos(&ws_next(&mut ws, "message").await));
    }
    let texts: Vec<String> = got.iter().map(|p| p.0.clone()).collect();
    assert_eq!(texts, acked, "every acknowledged publish, once, in order");
    for w in got.windows(2) {
        assert_eq!(w[1].3, w[0].2, "no hole in the chain: {w:?}");
    }
}

/// Per channel, the texts a client got, in order.
type Got = Arc<Mutex<Vec<Value>>>;

/// A WebSocket client that follows `steady/+` and, when its node goes,
/// resubscribes on the next with the position it holds of each channel.
fn ws_follower(https: Vec<String>, got: Got, ready: Ready) {
    tokio::spawn(async move {
        for (i, http) in https.into_iter().enumerate() {
            let url = format!("ws://{http}/v1/ws?client_id=follower");
            let Ok((mut ws, _)) = tokio_tungstenite::connect_async(url).await else { continue };
            let mut positions = serde_json::Map::new();
            for m in got.lock().iter() {
                positions
                    .insert(m["channel"].as_str().unwrap().into(), json!({"epoch":m["epoch"],"serial":m["serial"]}));
            }
            let sub = json!({"type":"subscribe","req":1,"filter":"steady/+","positions":positions});
            if ws.send(Message::text(sub.to_string())).await.is_err() {
                continue;
            }
            while let Some(Ok(frame)) = ws.next().await {
                let Message::Text(t) = frame else { continue };
                let v: Value = serde_json::from_str(&t).unwrap();
                assert!(v["type"] != "gap" && v["type"] != "error", "WebSocket: {v}");
                if v["type"] == "message" {
                    got.lock().push(v);
                } else if v["type"] == "subscribed" && i == 0 {
                    ready.mark();
                }
            }
        }
    });
}

/// An SSE client of the three channels that reconnects to the next node
/// with `Last-Event-ID`, as a browser's `EventSource` does.
fn sse_follower(bases: Vec<String>, got: Got, ready: Ready) {
    tokio::spawn(async move {
        use eventsource_stream::Eventsource;
        let mut last_id = String::new();
        for (i, base) in bases.into_iter().enumerate() {
            let mut req =
                reqwest::Client::new().get(format!("{base}/v1/sse?channel=steady/0&channel=steady/1&channel=steady/2"));
            if !last_id.is_empty() {
                req = req.header("Last-Event-ID", last_id.clone());
            }
            let Ok(r) = req.send().await else { continue };
            let mut events = r.bytes_stream().eventsource();
            while let Some(Ok(e)) = events.next().await {
                assert_ne!(e.event, "gap", "SSE: a gap: {}", e.data);
                if e.event == "message" {
                    got.lock().push(serde_json::from_str(&e.data).unwrap());
                } else if e.event == "connected" && i == 0 {
                    ready.mark();
                }
                if !e.id.is_empty() {
                    last_id = e.id;
                }
            }
        }
    });
}

/// A long poller of the three channels that takes its cursor to the next
/// node when a poll fails. Its first poll answers after a second with the
/// starting cursor: from then on it is subscribed.
fn poll_follower(bases: Vec<String>, got: Got, stop: Arc<std::sync::atomic::AtomicBool>, ready: Ready) {
    tokio::spawn(async move {
        let mut cursor = String::new();
        let mut i = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let wait = if cursor.is_empty() { 1 } else { 2 };
            let url = format!(
                "{}/v1/poll?channel=steady/0&channel=steady/1&channel=steady/2&timeout={wait}&cursor={cursor}",
                bases[i]
            );
            let r = match reqwest::get(url).await {
                Ok(r) => r.json::<Value>().await,
                Err(e) => Err(e),
            };
            match r {
                Ok(v) => {
                    assert_eq!(v["gaps"].as_array().map(Vec::len), Some(0), "poll: a gap: {v}");
                    got.lock().extend(v["messages"].as_array().unwrap().iter().cloned());
                    if cursor.is_empty() {
                        ready.mark();
                    }
                    cursor = v["cursor"].as_str().unwrap().to_string();
                }
                Err(_) => i = (i + 1).min(bases.len() - 1),
            }
        }
    });
}

/// An MQTT 5 device with a persistent session and QoS 1 on `steady/+`
/// that reconnects to the next node when its node goes. A QoS 1 message
/// sent again with DUP (its PUBACK never reached the server) is MQTT's
/// redelivery, not a duplicate; any other repeat stays and fails the test.
fn mqtt_follower(mqtts: Vec<String>, got: Got, ready: Ready) {
    tokio::spawn(async move {
        use rumqttc::v5::mqttbytes::QoS;
        use rumqttc::v5::{Event, Incoming};
        for (i, addr) in mqtts.iter().enumerate() {
            let (c, mut ev) = mqtt5(addr, "steady-device");
            if i == 0 {
                let _ = c.subscribe("steady/+", QoS::AtLeastOnce).await;
            }
            while let Ok(e) = ev.poll().await {
                if let (Event::Incoming(Incoming::SubAck(_)), 0) = (&e, i) {
                    ready.mark();
                }
                if let Event::Incoming(Incoming::Publish(p)) = e {
                    let m = json!({
                        "channel": String::from_utf8_lossy(&p.topic),
                        "text": String::from_utf8_lossy(&p.payload),
                    });
                    let mut got = got.lock();
                    if !(p.dup && got.contains(&m)) {
                        got.push(m);
                    }
                }
            }
        }
    });
}

/// Under steady publishing on three channels, SIGKILL the node that
/// WebSocket, SSE, long-poll and MQTT clients are on: each reconnects to
/// another node and ends with every message of every channel from the
/// first it got, once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_killed_node_resume_on_another_with_nothing_lost_or_repeated() {
    let (_turn, _nats, mut nodes) = cluster("node-kill", &[]).await;
    let https = vec![nodes[0].http.clone(), nodes[1].http.clone()];
    let bases = vec![nodes[0].base(), nodes[1].base()];
    let mqtts = vec![nodes[0].mqtt.clone(), nodes[1].mqtt.clone()];
    let (ws, sse, poll, mqtt): (Got, Got, Got, Got) = Default::default();
    let ready = Ready::default();
    mqtt_follower(mqtts, mqtt.clone(), ready.clone());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    ws_follower(https, ws.clone(), ready.clone());
    sse_follower(bases.clone(), sse.clone(), ready.clone());
    poll_follower(bases, poll.clone(), stop.clone(), ready.clone());
    until("every client is subscribed", || ready.count() == 4).await;

    let publisher = nodes[2].base();
    let mut sent: Vec<Vec<String>> = vec![Vec::new(); 3];
    for i in 0..240 {
        let ch = i % 3;
        let text = format!("c{ch}-{i}");
        let (status, _) = rest_publish(&publisher, &format!("steady/{ch}"), &text, None, false).await;
        assert_eq!(status, 200);
        sent[ch].push(text);
        if i == 100 {
            nodes[0].kill();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for (what, got) in [("WebSocket", &ws), ("SSE", &sse), ("long poll", &poll), ("MQTT 5", &mqtt)] {
        let deadline = Instant::now() + WAIT;
        loop {
            let done = (0..3).all(|ch| {
                let last = sent[ch].last().unwrap();
                got.lock().iter().any(|m| m["text"].as_str() == Some(last.as_str()))
            });
            if done {
                break;
            }
            if Instant::now() >= deadline {
                let got = got.lock();
                let tail: Vec<_> = got.iter().rev().take(3).collect();
                panic!("{what}: the last message of every channel arrives; got {} ending {tail:?}", got.len());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for (ch, sent) in sent.iter().enumerate() {
            let texts: Vec<String> = got
                .lock()
                .iter()
                .filter(|m| m["channel"] == format!("steady/{ch}"))
                .map(|m| m["text"].as_str().unwrap().to_string())
                .collect();
            let first = sent.iter().position(|t| *t == texts[0]).expect("a known first message");
            assert!(first < 30, "{what}: steady/{ch} started late, at {first}");
            assert_eq!(texts, sent[first..], "{what}: steady/{ch}: every message once, in order");
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
}

fn mqtt5(addr: &str, id: &str) -> (rumqttc::v5::AsyncClient, rumqttc::v5::EventLoop) {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let mut o = rumqttc::v5::MqttOptions::new(id, host, port.parse().unwrap());
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(3600));
    o.set_keep_alive(Duration::from_secs(5));
    rumqttc::v5::AsyncClient::new(o, 100)
}

/// MQTT 5 events until `until` says stop (bounded by [`WAIT`]).
async fn mqtt5_until(
    ev: &mut rumqttc::v5::EventLoop,
    mut until: impl FnMut(&rumqttc::v5::Event) -> bool,
) -> Result<(), rumqttc::v5::ConnectionError> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let e = tokio::time::timeout_at(deadline, ev.poll()).await.expect("MQTT 5 in time")?;
        if until(&e) {
            return Ok(());
        }
    }
}

/// A device's persistent session follows it to another node: it resumes
/// there with its subscription and gets what it missed, once; a second
/// connection with its client id on a third node takes the session over
/// and the first is told so (MQTT 5 reason 0x8E).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_session_resumes_and_is_taken_over_across_nodes() {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{Event, Incoming};
    let (_turn, _nats, nodes) = cluster("mqtt", &[]).await;
    let texts = Arc::new(Mutex::new(Vec::<String>::new()));
    let record = |texts: &Arc<Mutex<Vec<String>>>| {
        let texts = texts.clone();
        move |e: &Event| {
            if let Event::Incoming(Incoming::Publish(p)) = e {
                texts.lock().push(String::from_utf8_lossy(&p.payload).into_owned());
            }
            false
        }
    };

    // On node A: subscribe, get one message, go away cleanly.
    let (c, mut ev) = mqtt5(&nodes[0].mqtt, "device-7");
    c.subscribe("dev/7/cmd", QoS::AtLeastOnce).await.unwrap();
    mqtt5_until(&mut ev, |e| matches!(e, Event::Incoming(Incoming::SubAck(_)))).await.unwrap();
    rest_publish(&nodes[1].base(), "dev/7/cmd", "c0", None, false).await;
    let rec = record(&texts);
    mqtt5_until(&mut ev, |e| {
        rec(e);
        texts.lock().len() == 1
    })
    .await
    .unwrap();
    c.disconnect().await.unwrap();
    let _ = mqtt5_until(&mut ev, |e| matches!(e, Event::Outgoing(rumqttc::Outgoing::Disconnect))).await;
    drop(ev);

    // Missed while away, published on node B.
    for i in 1..=3 {
        assert_eq!(rest_publish(&nodes[1].base(), "dev/7/cmd", &format!("c{i}"), None, false).await.0, 200);
    }
    // Back on node C: the session is there, with what it missed.
    let (c2, mut ev2) = mqtt5(&nodes[2].mqtt, "device-7");
    let mut present = None;
    let rec = record(&texts);
    mqtt5_until(&mut ev2, |e| {
        if let Event::Incoming(Incoming::ConnAck(a)) = e {
            present = Some(a.session_present);
        }
        rec(e);
        texts.lock().len() == 4
    })
    .await
    .unwrap();
    assert_eq!(present, Some(true), "session present on another node");
    assert_eq!(*texts.lock(), ["c0", "c1", "c2", "c3"], "what it missed, once, in order");

    // A second connection with the same client id, on node A, takes over.
    let (c3, mut ev3) = mqtt5(&nodes[0].mqtt, "device-7");
    let mut present = None;
    mqtt5_until(&mut ev3, |e| {
        if let Event::Incoming(Incoming::ConnAck(a)) = e {
            present = Some(a.session_present);
        }
        present.is_some()
    })
    .await
    .unwrap();
    assert_eq!(present, Some(true), "the taken-over session is present");
    let kicked = mqtt5_until(&mut ev2, |e| matches!(e, Event::Incoming(Incoming::Disconnect(_)))).await;
    let reason = match kicked {
        Ok(()) => None,
        Err(rumqttc::v5::ConnectionError::MqttState(rumqttc::v5::StateError::ServerDisconnect {
            reason_code, ..
        })) => Some(reason_code as u8),
        Err(e) => panic!("the first connection ended without a DISCONNECT: {e}"),
    };
    assert_eq!(reason, Some(0x8E), "the first connection: session taken over");
    // The new holder still has the subscription: a message reaches it.
    rest_publish(&nodes[1].base(), "dev/7/cmd", "c4", None, false).await;
    let rec = record(&texts);
    mqtt5_until(&mut ev3, |e| {
        rec(e);
        texts.lock().len() == 5
    })
    .await
    .unwrap();
    assert_eq!(texts.lock().last().map(String::as_str), Some("c4"));
    let _ = c3.disconnect().await;
    let _ = c2;
}

/// History across nodes follows the channel rules (each distinct policy is
/// its own stream): rewind by count and by duration on another node, and
/// a recovery from a position history no longer holds gets the `trimmed`
/// gap, then live messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_rules_rewind_and_the_trimmed_gap_hold_across_nodes() {
    let rules = r#"[{pattern = "short/#", history_size = 3}]"#;
    let env = [("SWITCHBOARD_CHANNELS__RULES", rules), ("SWITCHBOARD_NATS__MAX_WILDCARD_CHANNELS", "2")];
    let (_turn, _nats, nodes) = cluster("history", &env).await;
    let mut acks = Vec::new();
    for i in 0..8 {
        acks.push(rest_publish(&nodes[i % 3].base(), "short/a", &format!("s{i}"), None, false).await.1);
        rest_publish(&nodes[i % 3].base(), "long/a", &format!("l{i}"), None, false).await;
    }
    let history = |base: String, ch: &'static str| async move {
        let h: Value = reqwest::get(format!("{base}/v1/channels/{ch}/history")).await.unwrap().json().await.unwrap();
        h["messages"].as_array().unwrap().iter().map(|m| m["text"].as_str().unwrap().to_string()).collect::<Vec<_>>()
    };
    assert_eq!(history(nodes[1].base(), "short/a").await, ["s5", "s6", "s7"], "the rule's history of 3");
    assert_eq!(history(nodes[2].base(), "long/a").await.len(), 8, "the default history keeps all 8");

    // Rewind by count and by duration, on another node than the publisher's.
    let mut ws = ws_connect(&nodes[2].http, "rewinder").await;
    ws_send(&mut ws, json!({"type":"subscribe","req":1,"filter":"long/a","rewind":{"count":2}})).await;
    ws_next(&mut ws, "subscribed").await;
    let got = [ws_next(&mut ws, "message").await, ws_next(&mut ws, "message").await];
    assert_eq!(got.map(|m| m["text"].as_str().unwrap().to_string()), ["l6", "l7"]);
    ws_send(&mut ws, json!({"type":"subscribe","req":2,"filter":"long/+","rewind":{"duration_ms":60000}})).await;
    ws_next(&mut ws, "subscribed").await;
    let mut texts = Vec::new();
    while texts.len() < 8 {
        texts.push(ws_next(&mut ws, "message").await["text"].as_str().unwrap().to_string());
    }
    assert_eq!(texts, (0..8).map(|i| format!("l{i}")).collect::<Vec<_>>(), "a minute's rewind over a wildcard");

    // A wildcard replay over more channels than nats.max_wildcard_channels
    // is refused, and says why.
    rest_publish(&nodes[0].base(), "long/b", "b", None, false).await;
    rest_publish(&nodes[0].base(), "long/c", "c", None, false).await;
    ws_send(&mut ws, json!({"type":"subscribe","req":3,"filter":"long/+","rewind":{"count":1}})).await;
    let e = ws_next(&mut ws, "error").await;
    assert_eq!((e["req"].as_u64(), e["code"].as_str()), (Some(3), Some("bad_request")), "{e}");
    assert!(e["message"].as_str().unwrap().contains("max_wildcard_channels"), "{e}");

    // A position history no longer holds: the gap, then live.
    let old = &acks[1];
    let mut late = ws_connect(&nodes[0].http, "late").await;
    let positions = json!({"short/a": {"epoch": old["epoch"], "serial": old["serial"]}});
    ws_send(&mut late, json!({"type":"subscribe","req":1,"filter":"short/a","positions":positions})).await;
    let sub = ws_next(&mut late, "subscribed").await;
    assert_eq!(sub["channels"][0]["recovered"], false, "{sub}");
    let gap = ws_next(&mut late, "gap").await;
    assert_eq!(gap["reason"], "trimmed");
    assert_eq!(gap["to"]["serial"], acks[7]["serial"], "delivery continues after the channel's position: {gap}");
    rest_publish(&nodes[1].base(), "short/a", "s8", None, false).await;
    let m = ws_next(&mut late, "message").await;
    assert_eq!((m["text"].as_str(), &m["prev_serial"]), (Some("s8"), &acks[7]["serial"]));
}

/// `switchboard_nats_live_messages_total` of a node: the messages its live
/// consumers read from JetStream.
async fn live_reads(node: &ClusterNode) -> u64 {
    let text = reqwest::get(format!("http://{}/metrics", node.admin)).await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with("switchboard_nats_live_messages_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Publishes messages `{channel}-{i}` for each `i` in `range` on each
/// channel, interleaved, through `base`.
async fn publish_round(base: &str, channels: &[&str], range: std::ops::Range<usize>) {
    for i in range {
        for ch in channels {
            let (s, body) = rest_publish(base, ch, &format!("{ch}-{i}"), None, false).await;
            assert_eq!(s, 200, "{body}");
        }
    }
}

/// Live fan-out is interest-based: a node reads from JetStream only the
/// channels its own subscribers need — not another node's channels, and
/// nothing once its last subscriber has gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_node_reads_only_what_its_subscribers_need() {
    let (_turn, nats, nodes) = cluster("interest", &[]).await;
    let version = common::cluster::http_get_json(nats.servers[0].ports.monitor, "/varz")
        .and_then(|v| v["version"].as_str().map(str::to_string))
        .expect("the server's version");
    let many_filters = {
        let mut v = version.split('.').map(|n| n.parse::<u32>().unwrap_or(0));
        (v.next().unwrap_or(0), v.next().unwrap_or(0)) >= (2, 10)
    };
    let mut on_a = ws_connect(&nodes[0].http, "reader-a").await;
    ws_send(&mut on_a, json!({"type":"subscribe","req":1,"filter":"interest/a"})).await;
    ws_next(&mut on_a, "subscribed").await;
    let mut on_b = ws_connect(&nodes[1].http, "reader-b").await;
    ws_send(&mut on_b, json!({"type":"subscribe","req":1,"filter":"interest/b"})).await;
    ws_next(&mut on_b, "subscribed").await;
    let before = [live_reads(&nodes[0]).await, live_reads(&nodes[1]).await, live_reads(&nodes[2]).await];

    // 20 on each channel, then a last one on each: once a subscriber has
    // its last, its node has read everything before it.
    publish_round(&nodes[2].base(), &["interest/a", "interest/b", "interest/c"], 0..20).await;
    publish_round(&nodes[2].base(), &["interest/a", "interest/b"], 20..21).await;
    for ws in [&mut on_a, &mut on_b] {
        for i in 0..21 {
            let m = ws_next(ws, "message").await;
            assert!(m["text"].as_str().unwrap().ends_with(&format!("-{i}")), "in order: {m}");
        }
    }
    let after = [live_reads(&nodes[0]).await, live_reads(&nodes[1]).await, live_reads(&nodes[2]).await];
    assert_eq!(after[0] - before[0], 21, "node a reads interest/a only");
    assert_eq!(after[1] - before[1], 21, "node b reads interest/b only");
    assert_eq!(after[2], before[2], "node c, with no subscriber, reads nothing");

    // Node b takes a second channel, on a wildcard: on NATS 2.10+ one
    // consumer reads both filters; NATS 2.9 takes one filter per consumer,
    // so node b reads the whole stream there. Either way its subscriber
    // gets exactly its messages, live from the subscribe on.
    ws_send(&mut on_b, json!({"type":"subscribe","req":2,"filter":"interest/+/x"})).await;
    ws_next(&mut on_b, "subscribed").await;
    let before_b = live_reads(&nodes[1]).await;
    publish_round(&nodes[0].base(), &["interest/a", "interest/q/x", "interest/b"], 21..31).await;
    let mut got = Vec::new();
    while got.len() < 20 {
        got.push(ws_next(&mut on_b, "message").await["text"].as_str().unwrap().to_string());
    }
    let wanted: Vec<String> = (21..31).flat_map(|i| [format!("interest/q/x-{i}"), format!("interest/b-{i}")]).collect();
    assert_eq!(got, wanted);
    let read = live_reads(&nodes[1]).await - before_b;
    if many_filters {
        assert_eq!(read, 20, "NATS {version}: node b reads its two filters only");
    } else {
        assert!(read >= 20, "NATS {version}: node b reads its stream");
    }

    // Node a's last subscriber goes: a little later, it reads nothing more.
    drop(on_a);
    let deadline = Instant::now() + WAIT;
    loop {
        let was = live_reads(&nodes[0]).await;
        let (s, _) = rest_publish(&nodes[2].base(), "interest/a", "unread", None, false).await;
        assert_eq!(s, 200);
        tokio::time::sleep(Duration::from_millis(300)).await;
        if live_reads(&nodes[0]).await == was {
            break;
        }
        assert!(Instant::now() < deadline, "node a goes on reading interest/a with no subscriber");
    }
}

/// A node drained by SIGTERM (a rolling restart) tells its MQTT devices to
/// go, and writes their sessions to NATS before it exits: a device resumes
/// on another node with its subscription and exactly what it missed, and
/// nothing it had acknowledged comes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_nodes_mqtt_sessions_resume_on_another_node() {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{Event, Incoming};
    let env = [("SWITCHBOARD_SHUTDOWN__DRAIN_DELAY", "0s"), ("SWITCHBOARD_SHUTDOWN__GRACE", "5s")];
    let (_turn, _nats, mut nodes) = cluster("drain", &env).await;
    let record = |texts: &Arc<Mutex<Vec<(String, bool)>>>| {
        let texts = texts.clone();
        move |e: &Event| {
            if let Event::Incoming(Incoming::Publish(p)) = e {
                texts.lock().push((String::from_utf8_lossy(&p.payload).into_owned(), p.dup));
            }
        }
    };
    // Three devices on node A, each with a QoS 1 subscription and five
    // messages received and acknowledged.
    let mut devices = Vec::new();
    for d in 0..3 {
        let (c, mut ev) = mqtt5(&nodes[0].mqtt, &format!("rolling-{d}"));
        c.subscribe(format!("rolling/{d}"), QoS::AtLeastOnce).await.unwrap();
        mqtt5_until(&mut ev, |e| matches!(e, Event::Incoming(Incoming::SubAck(_)))).await.unwrap();
        devices.push((c, ev, Arc::new(Mutex::new(Vec::<(String, bool)>::new()))));
    }
    for i in 0..5 {
        for d in 0..3 {
            let (s, _) = rest_publish(&nodes[1].base(), &format!("rolling/{d}"), &format!("r{i}"), None, false).await;
            assert_eq!(s, 200);
        }
    }
    for (c, ev, got) in &mut devices {
        let rec = record(got);
        mqtt5_until(ev, |e| {
            rec(e);
            got.lock().len() == 5
        })
        .await
        .unwrap();
        // A round trip behind the PUBACKs (node A handles a connection's
        // packets in order): an UNSUBSCRIBE of a filter never held, which
        // changes nothing.
        c.unsubscribe("rolling/none").await.unwrap();
        mqtt5_until(ev, |e| matches!(e, Event::Incoming(Incoming::UnsubAck(_)))).await.unwrap();
    }
    // Then drain node A: every device is told to go (server shutting down).
    let mut a = nodes.remove(0);
    let term = tokio::task::spawn_blocking(move || {
        a.proc.signal("-TERM");
        a
    });
    for (_, ev, _) in &mut devices {
        let told = mqtt5_until(ev, |e| matches!(e, Event::Incoming(Incoming::Disconnect(_)))).await;
        match told {
            Ok(()) => {}
            Err(rumqttc::v5::ConnectionError::MqttState(rumqttc::v5::StateError::ServerDisconnect {
                reason_code,
                ..
            })) => assert_eq!(reason_code as u8, 0x8B, "server shutting down"),
            Err(e) => panic!("a device's connection ended without a DISCONNECT: {e}"),
        }
    }
    let _exited = term.await.unwrap();
    // Missed while away, then back on node C.
    for i in 5..8 {
        for d in 0..3 {
            let (s, _) = rest_publish(&nodes[0].base(), &format!("rolling/{d}"), &format!("r{i}"), None, false).await;
            assert_eq!(s, 200);
        }
    }
    for d in 0..3 {
        let got = Arc::new(Mutex::new(Vec::new()));
        let (_c, mut ev) = mqtt5(&nodes[1].mqtt, &format!("rolling-{d}"));
        let mut present = None;
        let rec = record(&got);
        mqtt5_until(&mut ev, |e| {
            if let Event::Incoming(Incoming::ConnAck(a)) = e {
                present = Some(a.session_present);
            }
            rec(e);
            got.lock().len() == 3
        })
        .await
        .unwrap();
        assert_eq!(present, Some(true), "device {d}: the session is present on node C");
        let texts: Vec<String> = got.lock().iter().map(|(t, _)| t.clone()).collect();
        assert_eq!(texts, ["r5", "r6", "r7"], "device {d}: what it missed, once, in order; nothing acknowledged again");
        // Nothing more arrives (no late repeat).
        let more = tokio::time::timeout(Duration::from_millis(500), async {
            loop {
                if let Ok(Event::Incoming(Incoming::Publish(p))) = ev.poll().await {
                    return p;
                }
            }
        })
        .await;
        assert!(more.is_err(), "device {d}: a message after what it missed: {more:?}");
    }
}

/// While a node's consumer changes what it reads — a subscription goes, and
/// another comes before the consumer narrows — a recovery on that node of
/// the channel that went still gets exactly what it missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovery_after_the_node_stopped_reading_the_channel_is_exact() {
    let (_turn, _nats, nodes) = cluster("reread", &[]).await;
    let mut keeper = ws_connect(&nodes[0].http, "keeper").await;
    ws_send(&mut keeper, json!({"type":"subscribe","req":1,"filter":"reread/a"})).await;
    ws_next(&mut keeper, "subscribed").await;
    let mut leaver = ws_connect(&nodes[0].http, "leaver").await;
    ws_send(&mut leaver, json!({"type":"subscribe","req":1,"filter":"reread/b"})).await;
    ws_next(&mut leaver, "subscribed").await;
    rest_publish(&nodes[1].base(), "reread/b", "b0", None, false).await;
    let held = ws_next(&mut leaver, "message").await;
    // The leaver goes; at once another channel is subscribed on the node.
    drop(leaver);
    ws_send(&mut keeper, json!({"type":"subscribe","req":2,"filter":"reread/c"})).await;
    ws_next(&mut keeper, "subscribed").await;
    for i in 1..=3 {
        rest_publish(&nodes[1].base(), "reread/b", &format!("b{i}"), None, false).await;
    }
    rest_publish(&nodes[1].base(), "reread/a", "a0", None, false).await;
    assert_eq!(ws_next(&mut keeper, "message").await["text"], "a0");
    // Back on the node, from the position it held: b1..b3, then live.
    let mut back = ws_connect(&nodes[0].http, "leaver").await;
    let position = json!({"epoch": held["epoch"], "serial": held["serial"]});
    ws_send(&mut back, json!({"type":"subscribe","req":1,"filter":"reread/b","positions":{"reread/b": position}}))
        .await;
    let subscribed = ws_next(&mut back, "subscribed").await;
    assert_eq!(subscribed["channels"][0]["recovered"], true, "{subscribed}");
    rest_publish(&nodes[2].base(), "reread/b", "b4", None, false).await;
    let mut got = vec![pos(&held)];
    while got.len() < 5 {
        got.push(pos(&ws_next(&mut back, "message").await));
    }
    let texts: Vec<&str> = got.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(texts, ["b0", "b1", "b2", "b3", "b4"]);
    for w in got.windows(2) {
        assert_eq!(w[1].3, w[0].2, "one chain: {w:?}");
    }
}

/// MQTT 5 delayed wills across nodes: a device that drops off node A and
/// connects again on node B within the will delay has no will sent (node
/// A's waiting will is cancelled); one that does not come back has its
/// will sent when the delay ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_will_is_cancelled_by_a_reconnect_on_another_node() {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::{LastWill, LastWillProperties};
    use rumqttc::v5::{Event, Incoming};
    let (_turn, _nats, nodes) = cluster("wills", &[]).await;
    let mut watcher = ws_connect(&nodes[2].http, "will-watcher").await;
    ws_send(&mut watcher, json!({"type":"subscribe","req":1,"filter":"wills/+"})).await;
    ws_next(&mut watcher, "subscribed").await;
    let with_will = |addr: &str, id: &str| {
        let (host, port) = addr.rsplit_once(':').unwrap();
        let mut o = rumqttc::v5::MqttOptions::new(id, host, port.parse().unwrap());
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(300));
        o.set_keep_alive(Duration::from_secs(5));
        let props = LastWillProperties {
            delay_interval: Some(2),
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user_properties: Vec::new(),
        };
        o.set_last_will(LastWill::new(
            format!("wills/{id}"),
            format!("{id} is gone"),
            QoS::AtLeastOnce,
            false,
            Some(props),
        ));
        rumqttc::v5::AsyncClient::new(o, 10)
    };
    // Both devices on node A; both drop off without a DISCONNECT.
    let mut gone = Vec::new();
    for id in ["stays-away", "comes-back"] {
        let (c, mut ev) = with_will(&nodes[0].mqtt, id);
        mqtt5_until(&mut ev, |e| matches!(e, Event::Incoming(Incoming::ConnAck(_)))).await.unwrap();
        gone.push((c, ev));
    }
    drop(gone);
    // One connects again at once, on node B.
    let (_back, mut ev) = with_will(&nodes[1].mqtt, "comes-back");
    let mut present = None;
    mqtt5_until(&mut ev, |e| {
        if let Event::Incoming(Incoming::ConnAck(a)) = e {
            present = Some(a.session_present);
        }
        present.is_some()
    })
    .await
    .unwrap();
    assert_eq!(present, Some(true));
    let polling = tokio::spawn(async move {
        loop {
            if ev.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    // The other's will comes after its delay; then nothing more.
    let will = ws_next(&mut watcher, "message").await;
    assert_eq!(
        (will["channel"].as_str(), will["text"].as_str()),
        (Some("wills/stays-away"), Some("stays-away is gone"))
    );
    let more = tokio::time::timeout(Duration::from_secs(4), ws_next(&mut watcher, "message")).await;
    assert!(more.is_err(), "a will for the device that came back: {more:?}");
    polling.abort();
}

/// Webhooks on the NATS engine: each node posts the events of its own
/// clients (signed, naming the node), and when a node dies with a member
/// present, the survivor that removes the member after the grace period
/// posts its `presence.leave` — once across the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_come_from_each_clients_node_and_a_dead_nodes_leave_from_a_survivor() {
    const SECRET: &str = "whsec-cluster-0123456789";
    let receiver = common::webhooks::Receiver::start(None, &[("/hook", SECRET)]).await;
    let hooks = format!(
        "[{{ url = \"http://{}/hook\", secret = \"{SECRET}\", events = [\"connect\", \"subscribe\", \"presence.enter\", \"presence.leave\"], channels = [\"hook/#\"] }}]",
        receiver.addr
    );
    let env = [("SWITCHBOARD_CHANNELS__PRESENCE_GRACE", "1s"), ("SWITCHBOARD_WEBHOOKS", hooks.as_str())];
    let (_turn, _nats, mut nodes) = cluster("webhooks", &env).await;

    let mut alice = ws_connect(&nodes[0].http, "alice").await;
    ws_send(&mut alice, json!({"type":"subscribe","req":1,"filter":"hook/room"})).await;
    ws_next(&mut alice, "subscribed").await;
    ws_send(&mut alice, json!({"type":"presence.enter","req":2,"channel":"hook/room","text":"hi"})).await;
    ws_next(&mut alice, "publish_ack").await;
    // (type, node) of alice's events, each delivery once.
    let events = || {
        let mut seen = std::collections::BTreeMap::new();
        for g in receiver.got.lock().iter().filter(|g| g.status < 300) {
            assert!(g.signed, "a valid signature: {}", g.body);
            if g.body["client_id"] == "alice" {
                seen.insert(
                    g.delivery.clone(),
                    (g.event.clone(), g.body["node"].as_str().unwrap_or_default().to_string()),
                );
            }
        }
        let mut v: Vec<(String, String)> = seen.into_values().collect();
        v.sort();
        v
    };
    let a = |e: &str| (e.to_string(), "a".to_string());
    let deadline = Instant::now() + WAIT;
    while events() != [a("connect"), a("presence.enter"), a("subscribe")] {
        assert!(Instant::now() < deadline, "node a's events: {:?}", events());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    nodes[0].kill();
    let deadline = Instant::now() + WAIT;
    let leaves = || events().into_iter().filter(|(e, _)| e == "presence.leave").collect::<Vec<_>>();
    while leaves().is_empty() {
        assert!(Instant::now() < deadline, "a survivor posts alice's leave: {:?}", events());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Once, from a survivor; nothing more within another sweep or two.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let leaves = leaves();
    assert_eq!(leaves.len(), 1, "{leaves:?}");
    assert!(leaves[0].1 == "b" || leaves[0].1 == "c", "{leaves:?}");
    receiver.stop();
}
