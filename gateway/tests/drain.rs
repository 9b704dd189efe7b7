//! Graceful drain (#14 item 4), end to end against the binary on a real
//! store: `POST /v1/drain` (or SIGTERM) turns `/readyz` false while the
//! node still serves for `[shutdown] drain_delay`; then every client is told
//! to go in its protocol's words — WebSocket `disconnect` and close 1012,
//! MQTT 5 DISCONNECT 0x8B, MQTT 3.1.1 a close, SSE a `disconnect` event and
//! the end of the stream, a waiting long poll answered at once — and the
//! process exits within the delay and the grace. A second node on the same
//! directory and ports takes the clients back: `switchboard sub` over
//! WebSocket, SSE and long polling, and MQTT 3.1.1 and 5 persistent
//! sessions, each get every message once, in order.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{DataDir, Node, Proc, WAIT, until};
use futures_util::{SinkExt, StreamExt};
use switchboard::tooling::client;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const DELAY: Duration = Duration::from_secs(1);
const GRACE: Duration = Duration::from_secs(5);
/// What the exit may take beyond the delay and the grace (closing the
/// store, a loaded machine).
const SLACK: Duration = Duration::from_secs(3);

async fn publish(base: &str, text: &str) {
    client::publish_rest(base, "drain/a", Bytes::from(text.to_owned()), Some(text), None).await.expect("REST publish");
}

async fn readyz(admin: &str) -> (u16, serde_json::Value) {
    let r = reqwest::get(format!("http://{admin}/readyz")).await.expect("readyz");
    (r.status().as_u16(), r.json().await.unwrap_or_default())
}

/// A `switchboard sub --json` child's message texts so far.
fn sub_texts(p: &Proc, into: &mut Vec<String>) {
    while let Ok(line) = p.lines.try_recv() {
        let v: serde_json::Value = serde_json::from_str(&line).expect("sub --json prints JSON lines");
        if v["type"] == "message" {
            into.push(v["text"].as_str().unwrap_or_default().to_string());
        }
    }
}

fn mqtt5(addr: &str) -> (rumqttc::v5::AsyncClient, rumqttc::v5::EventLoop) {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let mut o = rumqttc::v5::MqttOptions::new("drain-mqtt5", host, port.parse().unwrap());
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(3600));
    rumqttc::v5::AsyncClient::new(o, 100)
}

fn mqtt4(addr: &str) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let mut o = rumqttc::MqttOptions::new("drain-mqtt4", host, port.parse().unwrap());
    o.set_clean_session(false);
    rumqttc::AsyncClient::new(o, 100)
}

/// One MQTT delivery into `got`. A QoS 1 message whose PUBACK the server
/// never read (the client read it only beside the DISCONNECT, and its
/// PUBACK met a closed socket) is sent again after the reconnect with DUP
/// set, as MQTT requires of a persistent session: that copy is the
/// protocol's, not a duplicate. Any other repeat stays in `got` and fails
/// the order check.
fn take(got: &mut Vec<String>, payload: &[u8], dup: bool) {
    let text = String::from_utf8_lossy(payload).into_owned();
    if !(dup && got.contains(&text)) {
        got.push(text);
    }
}

/// MQTT 5: payloads until the server's DISCONNECT, whose reason it returns.
async fn mqtt5_until_disconnect(ev: &mut rumqttc::v5::EventLoop, got: &mut Vec<String>) -> u8 {
    use rumqttc::v5::{ConnectionError, Event, Incoming, StateError};
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, ev.poll()).await.expect("DISCONNECT in time") {
            Ok(Event::Incoming(Incoming::Publish(p))) => take(got, &p.payload, p.dup),
            Ok(Event::Incoming(Incoming::Disconnect(d))) => return d.reason_code as u8,
            Ok(_) => {}
            // rumqttc reports the server's DISCONNECT as the end of the connection.
            Err(ConnectionError::MqttState(StateError::ServerDisconnect { reason_code, .. })) => {
                return reason_code as u8;
            }
            Err(e) => panic!("MQTT 5: the connection ended without a DISCONNECT: {e}"),
        }
    }
}

/// MQTT 3.1.1: payloads until the connection closes.
async fn mqtt4_until_closed(ev: &mut rumqttc::EventLoop, got: &mut Vec<String>) {
    use rumqttc::{Event, Packet};
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, ev.poll()).await.expect("a close in time") {
            Ok(Event::Incoming(Packet::Publish(p))) => take(got, &p.payload, p.dup),
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

/// MQTT 5 after the restart: the session is present and its payloads
/// arrive until `want` is held.
async fn mqtt5_resume(ev: &mut rumqttc::v5::EventLoop, got: &mut Vec<String>, want: &BTreeSet<String>) {
    use rumqttc::v5::{Event, Incoming};
    let deadline = tokio::time::Instant::now() + WAIT;
    while !want.iter().all(|w| got.contains(w)) {
        match tokio::time::timeout_at(deadline, ev.poll()).await.expect("MQTT 5 messages after the restart") {
            Ok(Event::Incoming(Incoming::ConnAck(a))) => assert!(a.session_present, "MQTT 5: the session was lost"),
            Ok(Event::Incoming(Incoming::Publish(p))) => take(got, &p.payload, p.dup),
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn mqtt4_resume(ev: &mut rumqttc::EventLoop, got: &mut Vec<String>, want: &BTreeSet<String>) {
    use rumqttc::{Event, Packet};
    let deadline = tokio::time::Instant::now() + WAIT;
    while !want.iter().all(|w| got.contains(w)) {
        match tokio::time::timeout_at(deadline, ev.poll()).await.expect("MQTT 3.1.1 messages after the restart") {
            Ok(Event::Incoming(Packet::ConnAck(a))) => assert!(a.session_present, "MQTT 3.1.1: the session was lost"),
            Ok(Event::Incoming(Packet::Publish(p))) => take(got, &p.payload, p.dup),
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_tells_every_client_to_go_and_a_second_node_takes_them_back() {
    let dir = DataDir::new("drain");
    let env = [("SWITCHBOARD_SHUTDOWN__DRAIN_DELAY", "1s"), ("SWITCHBOARD_SHUTDOWN__GRACE", "5s")];
    let mut node = Node::start(&dir.0, None, &env);
    let (http, admin, mqtt) = (node.http.clone(), node.admin.clone(), node.mqtt.clone());
    let base = node.base();

    // Clients that reconnect by themselves...
    let subs: Vec<(&str, Proc)> = ["ws", "sse", "poll"]
        .into_iter()
        .map(|via| (via, Proc::spawn(&["sub", "drain/a", "--via", via, "--url", &base, "--json"])))
        .collect();
    let (m5, mut ev5) = mqtt5(&mqtt);
    m5.subscribe("drain/a", rumqttc::v5::mqttbytes::QoS::AtLeastOnce).await.unwrap();
    let (m4, mut ev4) = mqtt4(&mqtt);
    m4.subscribe("drain/a", rumqttc::QoS::AtLeastOnce).await.unwrap();
    // ...and raw ones that show each protocol's goodbye.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{http}/v1/ws?client_id=drain-raw")).await.unwrap();
    ws.send(Message::text(r#"{"type":"subscribe","req":1,"filter":"drain/a"}"#)).await.unwrap();
    let sse = reqwest::get(format!("{base}/v1/sse?channel=drain/a")).await.unwrap();
    assert_eq!(sse.status(), 200);
    let mut sse = sse.bytes_stream();

    // Everyone is subscribed once each has seen a warm-up message.
    let mut seen: Vec<Vec<String>> = vec![Vec::new(); subs.len()];
    let (mut got5, mut got4) = (Vec::new(), Vec::new());
    let mut n = 0;
    let deadline = Instant::now() + WAIT;
    loop {
        publish(&base, &format!("m{n}")).await;
        n += 1;
        for (i, (_, p)) in subs.iter().enumerate() {
            sub_texts(p, &mut seen[i]);
        }
        let _ = tokio::time::timeout(Duration::from_millis(50), async {
            loop {
                if let Ok(rumqttc::v5::Event::Incoming(rumqttc::v5::Incoming::Publish(p))) = ev5.poll().await {
                    take(&mut got5, &p.payload, p.dup);
                }
            }
        })
        .await;
        let _ = tokio::time::timeout(Duration::from_millis(50), async {
            loop {
                if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) = ev4.poll().await {
                    take(&mut got4, &p.payload, p.dup);
                }
            }
        })
        .await;
        if seen.iter().all(|s| !s.is_empty()) && !got5.is_empty() && !got4.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "every subscriber sees a warm-up message");
    }
    // A long poll on a quiet channel, waiting when the drain starts.
    let poll = tokio::spawn({
        let base = base.clone();
        async move {
            let r = reqwest::get(format!("{base}/v1/poll?channel=drain/quiet&timeout=30&client_id=drain-poll"))
                .await
                .unwrap();
            (Instant::now(), r.status().as_u16())
        }
    });
    let deadline = Instant::now() + WAIT;
    loop {
        let sessions: serde_json::Value =
            reqwest::get(format!("http://{admin}/v1/sessions")).await.unwrap().json().await.unwrap();
        if sessions["sessions"].as_array().is_some_and(|a| a.iter().any(|s| s["client_id"] == "drain-poll")) {
            break;
        }
        assert!(Instant::now() < deadline, "the long poll waits in the gateway");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The drain: not ready at once, still serving through the delay.
    let asked = Instant::now();
    let r = reqwest::Client::new().post(format!("http://{admin}/v1/drain")).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let (status, body) = readyz(&admin).await;
    assert_eq!((status, body["status"].as_str()), (503, Some("draining")), "readyz during the delay");
    publish(&base, &format!("m{n}")).await;
    n += 1;
    assert!(asked.elapsed() < DELAY, "the publish during the delay was answered in time");

    // Each protocol's goodbye.
    let mut ws_texts = Vec::new();
    let close = loop {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("the WebSocket is told in time") {
            Some(Ok(Message::Text(t))) => ws_texts.push(t.to_string()),
            Some(Ok(Message::Close(c))) => break c,
            Some(Ok(_)) => {}
            other => panic!("the WebSocket ended without a close frame: {other:?}"),
        }
    };
    assert!(asked.elapsed() >= DELAY, "clients were told to go before the delay was over");
    let close = close.expect("a close code");
    assert_eq!(close.code, CloseCode::Restart, "WebSocket close code");
    let disconnect: serde_json::Value = serde_json::from_str(ws_texts.last().unwrap()).unwrap();
    assert_eq!(
        (disconnect["type"].as_str(), disconnect["code"].as_u64(), disconnect["reconnect"].as_bool()),
        (Some("disconnect"), Some(1012), Some(true)),
        "the frame before the close"
    );
    let mut sse_text = String::new();
    while let Some(chunk) = tokio::time::timeout(WAIT, sse.next()).await.expect("the SSE stream ends in time") {
        match chunk {
            Ok(c) => sse_text.push_str(&String::from_utf8_lossy(&c)),
            Err(_) => break,
        }
    }
    assert!(sse_text.contains("event: disconnect"), "SSE: a disconnect event before the end: {sse_text}");
    assert!(sse_text.contains("\"code\":1012"), "SSE: the disconnect says 1012: {sse_text}");
    assert_eq!(mqtt5_until_disconnect(&mut ev5, &mut got5).await, 0x8B, "MQTT 5 DISCONNECT reason");
    mqtt4_until_closed(&mut ev4, &mut got4).await;
    let (answered, status) = poll.await.unwrap();
    assert_eq!(status, 200, "the waiting long poll is answered");
    assert!(answered.duration_since(asked) < DELAY + SLACK, "the waiting long poll is answered at once");

    // The process exits within the delay and the grace.
    common::wait_child(&mut node.proc.child, DELAY + GRACE + SLACK, "the draining node");
    let exited = asked.elapsed();
    assert!(exited < DELAY + GRACE + SLACK, "exit took {exited:?}");

    // A second node on the same store and ports: every client comes back.
    let node2 = Node::start(&dir.0, Some((&http, &admin, &mqtt)), &[]);
    for _ in 0..3 {
        publish(&node2.base(), &format!("m{n}")).await;
        n += 1;
    }
    // Each client holds every message from the first it got (the warm-up
    // published some before it had subscribed), once, in order.
    let want: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
    let from_first = |got: &[String]| -> Vec<String> {
        let first = got.first().and_then(|g| want.iter().position(|w| w == g)).expect("a known first message");
        want[first..].to_vec()
    };
    until("every `switchboard sub` recovers every message", || {
        for (i, (_, p)) in subs.iter().enumerate() {
            sub_texts(p, &mut seen[i]);
        }
        seen.iter().all(|s| s.len() >= from_first(s).len())
    })
    .await;
    for ((via, _), texts) in subs.iter().zip(&seen) {
        assert_eq!(texts, &from_first(texts), "{via}: every message once, in order, across the drain");
    }
    let (m5b, mut ev5b) = mqtt5(&mqtt);
    let (m4b, mut ev4b) = mqtt4(&mqtt);
    let after: BTreeSet<String> = want[want.len() - 3..].iter().cloned().collect();
    mqtt5_resume(&mut ev5b, &mut got5, &after).await;
    mqtt4_resume(&mut ev4b, &mut got4, &after).await;
    for (what, got) in [("MQTT 5", &got5), ("MQTT 3.1.1", &got4)] {
        assert_eq!(got, &from_first(got), "{what}: every message once, in order, across the drain");
    }
    let _ = (m5.disconnect().await, m4.disconnect().await, m5b.disconnect().await, m4b.disconnect().await);
    drop(node2);
}

/// SIGTERM drains the same way: `/readyz` false during the delay, then
/// the exit within the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_too() {
    let dir = DataDir::new("drain-term");
    let env = [("SWITCHBOARD_SHUTDOWN__DRAIN_DELAY", "1s"), ("SWITCHBOARD_SHUTDOWN__GRACE", "5s")];
    let mut node = Node::start(&dir.0, None, &env);
    let asked = Instant::now();
    let status = Command::new("kill").args(["-TERM", &node.proc.child.id().to_string()]).status().unwrap();
    assert!(status.success());
    // The signal is handled asynchronously: readiness turns within the delay.
    while readyz(&node.admin).await.0 != 503 {
        assert!(asked.elapsed() < DELAY, "readyz still 200 when the delay was over");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    publish(&node.base(), "during the delay").await;
    assert!(asked.elapsed() < DELAY, "the publish during the delay was answered in time");
    common::wait_child(&mut node.proc.child, DELAY + GRACE + SLACK, "the draining node");
    assert!(asked.elapsed() >= DELAY, "exited before the delay was over");
}
