//! Lifecycle webhooks end to end: the real binary POSTs to a real HTTP
//! receiver in this test (hyper on 127.0.0.1:0), which checks every
//! request's HMAC signature with its own code.
//!
//! - Every event type arrives, signed, from WebSocket, MQTT, SSE and REST
//!   clients; the channel filter and the opt-in `publish` hold.
//! - A receiver that is down (port closed, then answering 503) and then
//!   comes back gets every event at least once, with the same delivery id
//!   on every retry.
//! - A receiver that accepts connections and never answers does not hold
//!   up a 1 000-message fan-out: the hot path drops what its queue cannot
//!   hold instead of waiting.
//! - With durable storage, events queued while the receiver is down
//!   survive a SIGKILL of the gateway, and a start without the webhook
//!   configured, and arrive after the restart that configures it again.
//! - A drain (SIGTERM) delivers the sessions' disconnects, even one that
//!   needs a retry, before the process exits.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::webhooks::{Got, Receiver};
use common::{DataDir, Node, WAIT, plain_dev, until};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const SECRET_ALL: &str = "whsec-all-0123456789abcdef";
const SECRET_LIFECYCLE: &str = "whsec-life-0123456789abcdef";

/// A loopback port nobody listens on (for a receiver that is down).
fn closed_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// The `SWITCHBOARD_WEBHOOKS` value for these endpoints (TOML inline
/// tables).
fn webhooks_env(endpoints: &[String]) -> String {
    format!("[{}]", endpoints.join(", "))
}

/// The sum of a metric's samples whose labels contain `label`.
async fn metric(admin: &str, name: &str, label: &str) -> f64 {
    let text = reqwest::get(format!("http://{admin}/metrics")).await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_connect(http: &str, client_id: &str) -> Ws {
    let (ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{http}/v1/ws?client_id={client_id}")).await.expect("WebSocket");
    ws
}

/// Sends a request frame and waits for the reply with its `req`.
async fn ws_call(ws: &mut Ws, mut frame: Value, req: u64) -> Value {
    frame["req"] = json!(req);
    ws.send(Message::text(frame.to_string())).await.expect("WebSocket send");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next()).await.unwrap_or_else(|_| panic!("no reply to {frame}"));
        let Some(Ok(Message::Text(t))) = msg else { panic!("the WebSocket ended waiting for a reply to {frame}") };
        let v: Value = serde_json::from_str(&t).unwrap();
        if v["req"] == req {
            assert_ne!(v["type"], "error", "{frame} → {v}");
            return v;
        }
    }
}

async fn rest_publish(http: &str, channel: &str, text: &str) {
    let r = reqwest::Client::new()
        .post(format!("http://{http}/v1/channels/{channel}/messages"))
        .body(text.to_string())
        .send()
        .await
        .expect("REST publish");
    assert!(r.status().is_success(), "REST publish: {}", r.status());
}

/// (type, protocol, client_id, filter or channel) of a body: what one
/// test event is known by.
fn key(b: &Value) -> (String, String, String, String) {
    let s = |k: &str| b[k].as_str().unwrap_or_default().to_string();
    let target = if b["filter"].is_string() { s("filter") } else { s("channel") };
    (s("type"), s("protocol"), s("client_id"), target)
}

fn k(ty: &str, protocol: &str, client: &str, target: &str) -> (String, String, String, String) {
    (ty.into(), protocol.into(), client.into(), target.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_lifecycle_event_arrives_signed_from_every_protocol() {
    let receiver = Receiver::start(None, &[("/all", SECRET_ALL), ("/lifecycle", SECRET_LIFECYCLE)]).await;
    let addr = receiver.addr;
    let hooks = webhooks_env(&[
        format!(
            r#"{{ url = "http://{addr}/all", secret = "{SECRET_ALL}", channels = ["chat/#", "sensors/#"], events = ["connect", "disconnect", "subscribe", "unsubscribe", "presence.enter", "presence.update", "presence.leave", "publish"] }}"#
        ),
        format!(r#"{{ url = "http://{addr}/lifecycle", secret = "{SECRET_LIFECYCLE}" }}"#),
    ]);
    let env = [("SWITCHBOARD_WEBHOOKS", hooks.as_str()), ("SWITCHBOARD_CHANNELS__PRESENCE_GRACE", "1s")];
    let (_gw, banner) = plain_dev(&[], None, &env, WAIT);
    let http = banner.http.clone();

    // WebSocket: the whole life of a session, ending with a clean close.
    let mut ws = ws_connect(&http, "alice").await;
    ws_call(&mut ws, json!({"type": "subscribe", "filter": "chat/room"}), 1).await;
    ws_call(&mut ws, json!({"type": "subscribe", "filter": "other/x"}), 2).await;
    ws_call(&mut ws, json!({"type": "presence.enter", "channel": "chat/room", "data": {"mood": "ok"}}), 3).await;
    ws_call(&mut ws, json!({"type": "presence.update", "channel": "chat/room", "text": "busy"}), 4).await;
    ws_call(&mut ws, json!({"type": "presence.leave", "channel": "chat/room"}), 5).await;
    ws_call(&mut ws, json!({"type": "publish", "channel": "chat/room", "text": "hi"}), 6).await;
    ws_call(&mut ws, json!({"type": "publish", "channel": "other/x", "text": "not for /all"}), 7).await;
    ws_call(&mut ws, json!({"type": "unsubscribe", "filter": "chat/room"}), 8).await;
    ws.close(None).await.unwrap();
    while ws.next().await.is_some() {}

    // WebSocket, dropped without a close: an abrupt disconnect, and the
    // presence leave after the grace period.
    let mut bob = ws_connect(&http, "bob").await;
    ws_call(&mut bob, json!({"type": "presence.enter", "channel": "chat/room"}), 1).await;
    drop(bob);

    // MQTT 5: connect, subscribe, publish (acknowledged), disconnect.
    let (host, port) = banner.mqtt.rsplit_once(':').unwrap();
    let opts = rumqttc::v5::MqttOptions::new("meter-1", host, port.parse().unwrap());
    let (mqtt, mut events) = rumqttc::v5::AsyncClient::new(opts, 10);
    mqtt.subscribe("sensors/+", rumqttc::v5::mqttbytes::QoS::AtLeastOnce).await.unwrap();
    mqtt.publish("sensors/1", rumqttc::v5::mqttbytes::QoS::AtLeastOnce, false, "21.5 C").await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let e = tokio::time::timeout_at(deadline, events.poll()).await.expect("a PUBACK").expect("MQTT");
        if let rumqttc::v5::Event::Incoming(rumqttc::v5::Incoming::PubAck(_)) = e {
            break;
        }
    }
    mqtt.disconnect().await.unwrap();
    while tokio::time::timeout_at(deadline, events.poll()).await.expect("MQTT closes").is_ok() {}

    // SSE: a stream opens a session subscribed to its channels.
    let sse = reqwest::get(format!("http://{http}/v1/sse?channel=chat/sse&client_id=carol")).await.unwrap();
    assert_eq!(sse.status(), 200);
    let mut stream = sse.bytes_stream();
    tokio::time::timeout(WAIT, stream.next()).await.expect("the SSE stream's first event");
    drop(stream);

    // REST: a publish without a session.
    rest_publish(&http, "chat/rest", "from REST").await;

    let want_all = [
        k("connect", "ws", "alice", ""),
        k("subscribe", "ws", "alice", "chat/room"),
        k("presence.enter", "ws", "alice", "chat/room"),
        k("presence.update", "ws", "alice", "chat/room"),
        k("presence.leave", "ws", "alice", "chat/room"),
        k("publish", "ws", "alice", "chat/room"),
        k("unsubscribe", "ws", "alice", "chat/room"),
        k("disconnect", "ws", "alice", ""),
        k("connect", "ws", "bob", ""),
        k("presence.enter", "ws", "bob", "chat/room"),
        k("disconnect", "ws", "bob", ""),
        k("presence.leave", "ws", "bob", "chat/room"),
        k("connect", "mqtt", "meter-1", ""),
        k("subscribe", "mqtt", "meter-1", "sensors/+"),
        k("publish", "mqtt", "meter-1", "sensors/1"),
        k("disconnect", "mqtt", "meter-1", ""),
        k("connect", "sse", "carol", ""),
        k("subscribe", "sse", "carol", "chat/sse"),
        k("disconnect", "sse", "carol", ""),
        k("publish", "rest", "", "chat/rest"),
    ];
    let keys = |path: &str| receiver.delivered(path).iter().map(|g| key(&g.body)).collect::<BTreeSet<_>>();
    until("every event reaches /all", || want_all.iter().all(|w| keys("/all").contains(w))).await;
    until("the lifecycle endpoint hears of carol's goodbye", || {
        keys("/lifecycle").contains(&k("disconnect", "sse", "carol", ""))
    })
    .await;

    for g in receiver.got.lock().iter() {
        assert!(g.signed, "a valid signature on {} {}", g.path, String::from_utf8_lossy(&g.raw));
        assert_eq!(g.event, g.body["type"], "Switchboard-Event names the type");
        assert_eq!(g.delivery, g.body["id"], "Switchboard-Delivery is the body's id");
        assert_eq!(g.body["node"], "node-1");
        assert!(g.body["time"].as_i64().is_some_and(|t| t > 1_700_000_000_000));
    }
    let all = receiver.delivered("/all");
    // The channel filter: nothing of other/x; connect and disconnect have
    // no channel and always come.
    assert_eq!(
        all.len(),
        want_all.len(),
        "every event once, nothing else: {:#?}",
        all.iter().map(|g| key(&g.body)).collect::<Vec<_>>()
    );
    let ids: BTreeSet<&str> = all.iter().map(|g| g.delivery.as_str()).collect();
    assert_eq!(ids.len(), all.len(), "a delivery id per event");
    let body_of = |ty: &str, client: &str| {
        all.iter().find(|g| g.body["type"] == ty && g.body["client_id"] == client).expect(ty).body.clone()
    };
    assert_eq!(body_of("presence.enter", "alice")["data"], json!({"mood": "ok"}));
    assert_eq!(body_of("presence.update", "alice")["text"], "busy");
    assert_eq!(body_of("disconnect", "alice")["clean"], true);
    assert_eq!(body_of("disconnect", "bob")["clean"], false);
    let published = body_of("publish", "meter-1");
    assert_eq!(
        (published["channel"].as_str(), published["message"]["text"].as_str()),
        (Some("sensors/1"), Some("21.5 C"))
    );
    assert_eq!(published["message"]["serial"], 1);
    assert!(published["message"]["epoch"].as_str().is_some_and(|e| !e.is_empty()));
    // In the order they happened (one request at a time per endpoint).
    let alice: Vec<String> = all
        .iter()
        .filter(|g| g.body["client_id"] == "alice")
        .map(|g| g.body["type"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        alice,
        [
            "connect",
            "subscribe",
            "presence.enter",
            "presence.update",
            "presence.leave",
            "publish",
            "unsubscribe",
            "disconnect"
        ]
    );

    // The second endpoint: its defaults are every channel and every event
    // but publish.
    let life = keys("/lifecycle");
    assert!(life.contains(&k("subscribe", "ws", "alice", "other/x")), "channels default to #");
    assert!(life.iter().all(|(ty, ..)| ty != "publish"), "publish is opt-in: {life:?}");
    receiver.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_down_then_up_gets_every_event_at_least_once() {
    let addr = closed_port();
    let hook = format!(
        r#"{{ url = "http://{addr}/hook", secret = "{SECRET_ALL}", channels = ["down/#"], backoff_min = "50ms", backoff_max = "300ms", events = ["connect", "subscribe", "publish", "disconnect"] }}"#
    );
    let env = [("SWITCHBOARD_WEBHOOKS", webhooks_env(&[hook]))];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (_gw, banner) = plain_dev(&[], None, &env, WAIT);
    let (http, admin) = (banner.http.clone(), banner.admin.clone());

    // Everything happens while nobody listens.
    let mut ws = ws_connect(&http, "dora").await;
    ws_call(&mut ws, json!({"type": "subscribe", "filter": "down/a"}), 1).await;
    for i in 0..20 {
        ws_call(&mut ws, json!({"type": "publish", "channel": "down/a", "text": format!("ws-{i}")}), 10 + i).await;
    }
    for i in 0..20 {
        rest_publish(&http, "down/a", &format!("rest-{i}")).await;
    }
    ws.close(None).await.unwrap();
    while ws.next().await.is_some() {}
    let retries = || metric(&admin, "switchboard_webhook_retries_total", "/hook");
    let deadline = tokio::time::Instant::now() + WAIT;
    while retries().await < 3.0 {
        assert!(tokio::time::Instant::now() < deadline, "the gateway retries while the port is closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Up, but failing: 503 for a while.
    let receiver = Receiver::start(Some(addr), &[("/hook", SECRET_ALL)]).await;
    receiver.status.store(503, Ordering::SeqCst);
    until("three 503s", || receiver.got.lock().len() >= 3).await;
    let refused: BTreeSet<String> = receiver.got.lock().iter().map(|g| g.delivery.clone()).collect();
    receiver.status.store(200, Ordering::SeqCst);

    // Every event at least once: the publishes by text, the rest by type.
    let mut want: BTreeSet<String> = (0..20).flat_map(|i| [format!("ws-{i}"), format!("rest-{i}")]).collect();
    want.extend(["connect".to_string(), "subscribe".into(), "disconnect".into()]);
    let seen = |r: &Receiver| -> BTreeSet<String> {
        r.delivered("/hook")
            .iter()
            .map(|g| match g.body["type"].as_str() {
                Some("publish") => g.body["message"]["text"].as_str().unwrap_or_default().to_string(),
                t => t.unwrap_or_default().to_string(),
            })
            .collect()
    };
    until("every event after the receiver came back", || seen(&receiver) == want).await;

    let got = receiver.got.lock().clone();
    assert!(got.iter().all(|g| g.signed), "every attempt is signed (and signed anew: the 503s' too)");
    // Dedupe by delivery id gives each distinct event once: one id per
    // event, the same bytes on every retry.
    let mut by_id: BTreeMap<&str, Vec<&Got>> = BTreeMap::new();
    for g in &got {
        by_id.entry(&g.delivery).or_default().push(g);
    }
    assert_eq!(by_id.len(), want.len(), "one delivery id per distinct event");
    for (id, copies) in &by_id {
        assert!(copies.windows(2).all(|w| w[0].raw == w[1].raw), "retries of {id} send the same body");
        assert!(copies.iter().any(|g| g.status == 200), "{id} was delivered");
    }
    assert!(refused.iter().all(|id| by_id[id.as_str()].iter().any(|g| g.status == 200)), "a refused event comes again");
    // The receiver saw them in the order they happened.
    let order: Vec<String> = receiver
        .delivered("/hook")
        .iter()
        .filter(|g| {
            g.body["type"] == "publish" && g.body["message"]["text"].as_str().is_some_and(|t| t.starts_with("ws-"))
        })
        .map(|g| g.body["message"]["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(order, (0..20).map(|i| format!("ws-{i}")).collect::<Vec<_>>());
    assert!(metric(&admin, "switchboard_webhook_deliveries_total", "/hook").await >= want.len() as f64);
    receiver.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_never_answers_does_not_delay_a_fan_out() {
    // It accepts connections and reads nothing, answers nothing.
    let stuck = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = stuck.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let held = tokio::spawn({
        let accepted = accepted.clone();
        async move {
            let mut sockets = Vec::new();
            while let Ok((s, _)) = stuck.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                sockets.push(s);
            }
        }
    });
    let hook = format!(
        r#"{{ url = "http://{addr}/stuck", secret = "{SECRET_ALL}", timeout = "5m", queue_size = 100, events = ["connect", "disconnect", "subscribe", "publish"] }}"#
    );
    let hooks = webhooks_env(&[hook]);
    let (_gw, banner) = plain_dev(&[], None, &[("SWITCHBOARD_WEBHOOKS", hooks.as_str())], WAIT);
    let (http, admin) = (banner.http.clone(), banner.admin.clone());

    let mut sub = ws_connect(&http, "fan-sub").await;
    ws_call(&mut sub, json!({"type": "subscribe", "filter": "fan/out"}), 1).await;
    until("the webhook is stuck on its first request", || accepted.load(Ordering::SeqCst) >= 1).await;

    // 1 000 publishes, pipelined on one connection, each with a publish
    // event the queue (100) cannot all hold.
    let mut publisher = ws_connect(&http, "fan-pub").await;
    let started = tokio::time::Instant::now();
    for i in 0..1000 {
        let frame = json!({"type": "publish", "req": i + 1, "channel": "fan/out", "text": format!("m{i}")});
        publisher.feed(Message::text(frame.to_string())).await.unwrap();
    }
    publisher.flush().await.unwrap();
    let mut serials = Vec::new();
    let deadline = started + WAIT;
    while serials.len() < 1000 {
        let msg = tokio::time::timeout_at(deadline, sub.next())
            .await
            .unwrap_or_else(|_| panic!("the fan-out stalled after {} messages", serials.len()));
        let Some(Ok(Message::Text(t))) = msg else { panic!("the subscriber's WebSocket ended") };
        let v: Value = serde_json::from_str(&t).unwrap();
        if v["type"] == "message" {
            serials.push(v["serial"].as_u64().unwrap());
        }
    }
    assert_eq!(serials, (1..=1000).collect::<Vec<_>>(), "every message, in order");

    // ...all while the webhook was still waiting for its first answer:
    // the events past its queue were dropped, counted, not waited for.
    assert_eq!(metric(&admin, "switchboard_webhook_deliveries_total", "/stuck").await, 0.0);
    assert!(metric(&admin, "switchboard_webhook_dropped_total", "queue_full").await >= 800.0);
    assert!(metric(&admin, "switchboard_webhook_queue_depth", "/stuck").await <= 100.0);
    held.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_events_survive_a_sigkill_with_durable_storage() {
    let dir = DataDir::new("webhooks");
    let addr = closed_port();
    let hook = format!(
        r#"{{ url = "http://{addr}/durable", secret = "{SECRET_ALL}", backoff_min = "50ms", backoff_max = "200ms", events = ["publish"] }}"#
    );
    let hooks = webhooks_env(&[hook]);
    let env = [("SWITCHBOARD_WEBHOOKS", hooks.as_str())];
    let mut node = Node::start(&dir.0, None, &env);
    for i in 0..30 {
        rest_publish(&node.http, "durable/a", &format!("d{i}")).await;
    }
    // Each publish queued its event before its acknowledgement; two more
    // failed attempts mean the worker began one after taking them all
    // into its (durable) outbox.
    let retries = || metric(&node.admin, "switchboard_webhook_retries_total", "/durable");
    let before = retries().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while retries().await < before + 2.0 {
        assert!(tokio::time::Instant::now() < deadline, "the gateway retries while the receiver is down");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.proc.child.kill().unwrap(); // SIGKILL, by PID
    node.proc.child.wait().unwrap();
    // A start without the webhook configured (the variable left out) keeps
    // its pending events on disk for when it is configured again.
    let mut bare = Node::start(&dir.0, None, &[]);
    bare.signal("-TERM");

    let receiver = Receiver::start(Some(addr), &[("/durable", SECRET_ALL)]).await;
    let _node = Node::start(&dir.0, None, &env);
    let want: BTreeSet<String> = (0..30).map(|i| format!("d{i}")).collect();
    let seen = || -> BTreeSet<String> {
        receiver
            .delivered("/durable")
            .iter()
            .filter_map(|g| g.body["message"]["text"].as_str().map(str::to_string))
            .collect()
    };
    until("every event queued before the SIGKILL, after the restart", || seen() == want).await;
    assert!(receiver.got.lock().iter().all(|g| g.signed));
    let serials: BTreeSet<u64> =
        receiver.delivered("/durable").iter().filter_map(|g| g.body["message"]["serial"].as_u64()).collect();
    assert_eq!(serials, (1..=30).collect(), "the events name the messages' positions");
    receiver.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_delivers_the_disconnects_before_the_process_exits() {
    let receiver = Receiver::start(None, &[("/drain", SECRET_ALL)]).await;
    let hook = format!(
        r#"{{ url = "http://{}/drain", secret = "{SECRET_ALL}", backoff_min = "50ms", backoff_max = "100ms" }}"#,
        receiver.addr
    );
    let hooks = webhooks_env(&[hook]);
    let (mut gw, banner) = plain_dev(&[], None, &[("SWITCHBOARD_WEBHOOKS", hooks.as_str())], WAIT);
    let mut ws = ws_connect(&banner.http, "erin").await;
    ws_call(&mut ws, json!({"type": "subscribe", "filter": "drain/x"}), 1).await;
    ws_call(&mut ws, json!({"type": "presence.enter", "channel": "drain/x", "text": "here"}), 2).await;
    let reader = tokio::spawn(async move { while ws.next().await.is_some() {} });
    let types = || -> Vec<String> {
        receiver.delivered("/drain").iter().map(|g| g.body["type"].as_str().unwrap_or_default().to_string()).collect()
    };
    until("connect, subscribe and enter delivered", || types() == ["connect", "subscribe", "presence.enter"]).await;

    // SIGTERM: the server closes the session, and its disconnect — refused
    // once (503), so it waits in the queue — is delivered within
    // [shutdown] webhook_flush, before the exit; so is the leave of its
    // member, which was within its presence grace when the node stopped.
    receiver.status.store(503, Ordering::SeqCst);
    let (got, status) = (receiver.got.clone(), receiver.status.clone());
    let heal = tokio::spawn(async move {
        until("the disconnect refused once", || got.lock().iter().any(|g| g.status == 503)).await;
        status.store(200, Ordering::SeqCst);
    });
    tokio::task::spawn_blocking(move || gw.signal("-TERM")).await.unwrap();
    heal.await.unwrap();
    assert_eq!(types(), ["connect", "subscribe", "presence.enter", "disconnect", "presence.leave"]);
    let delivered = receiver.delivered("/drain");
    let disconnect = &delivered[3];
    assert_eq!(
        (disconnect.body["client_id"].as_str(), disconnect.body["clean"].as_bool()),
        (Some("erin"), Some(false))
    );
    assert_eq!(
        (delivered[4].body["client_id"].as_str(), delivered[4].body["channel"].as_str()),
        (Some("erin"), Some("drain/x"))
    );
    reader.abort();
    receiver.stop();
}
