//! Limits (docs/protocol.md, "Limits"): each triggers exactly its
//! documented reaction on every protocol it applies to, counts in its
//! metric, and leaves the connection (where the reaction says so) and every
//! other client working. Small configured limits keep the tests fast.
//!
//! WebTransport (`/v1/wt` on QUIC) has the same limits, tested at the end
//! with a well-behaved WebTransport session next to the WebSocket and MQTT
//! bystanders: message size, control frame size (close 1009), subscriptions,
//! publish rate (on the control stream and for datagram publishes), the
//! handshake timeout (4002), QUIC keep-alives and the idle timeout, and
//! admission at the QUIC accept (connections per IP, new connections per
//! second), which QUIC shares with the TCP listeners.
//!
//! Covered elsewhere, with bystanders: the WebSocket frame size (close 1009)
//! and WebSocket payload size (`bad_input.rs`); MQTT packet size (0x95),
//! connect timeout and keep alive on both versions (`mqtt_bad_input.rs`,
//! `mqtt.rs`); SSE / long-poll `max_stream_channels` and `max_query_len`
//! (`sse.rs`, `poll.rs`); REST body size 413 (`bad_input.rs`); slow
//! consumers (`slow_consumer.rs`).

#[allow(dead_code)] // each test binary uses part of it
mod common_mqtt;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::{Bytes, BytesMut};
use common_mqtt::{Mqtt, Raw, Ver, connect_packet, publish_packet, subscribe_packet};
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use serde_json::json;
use switchboard::tooling::client_wt::{CertCheck, FrameReader, WtClient, WtOptions, open_session};
use switchboard_proto::{self as proto, DeliveryMode, ErrorCode, Publish, client_frame, server_frame};
use switchboard_protocols::wt::codec;
use switchboard_tests::*;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// Clients minding their own business on `by/...`: a WebSocket and an MQTT
/// 5 subscriber.
struct Bystanders {
    ws: WsClient,
    mqtt: Mqtt,
    round: usize,
}

impl Bystanders {
    async fn join(gw: &TestGateway) -> anyhow::Result<Self> {
        let mut ws = WsClient::connect(&gw.ws, Codec::Proto, "bystander-ws").await?;
        ws.subscribe_to("by/#").await?;
        let mut mqtt = Mqtt::connect(gw.mqtt, Ver::V5, "bystander-mqtt").await?;
        mqtt.sub("by/#", 1).await?;
        Ok(Bystanders { ws, mqtt, round: 0 })
    }

    /// Each publishes and both receive, in order, nothing else.
    async fn still_served(&mut self, case: &str) -> anyhow::Result<()> {
        self.round += 1;
        let n = self.round;
        self.ws.publish("by/w", format!("w{n}").as_bytes(), "").await?;
        self.mqtt.publish_ok("by/m", 1, format!("m{n}")).await?;
        let got: Vec<_> = self.ws.messages(2).await?.into_iter().map(|e| (e.channel, e.payload)).collect();
        let want =
            vec![("by/w".to_string(), Bytes::from(format!("w{n}"))), ("by/m".into(), Bytes::from(format!("m{n}")))];
        assert_eq!(got, want, "WebSocket bystander after {case}");
        let got: Vec<_> = self.mqtt.msgs(2).await?.into_iter().map(|m| (m.topic, m.payload)).collect();
        assert_eq!(got, want, "MQTT bystander after {case}");
        Ok(())
    }
}

/// The sum of the samples of `name` whose labels include all of `labels`.
async fn metric(gw: &TestGateway, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
    let text = reqwest::get(format!("{}/metrics", gw.admin)).await?.text().await?;
    let mut sum = 0.0;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else { continue };
        let (label_text, value) = match rest.strip_prefix('{') {
            Some(r) => r.split_once("} ").unwrap_or(("", "")),
            None => ("", rest.trim_start()),
        };
        if !rest.starts_with(['{', ' ']) {
            continue;
        }
        if labels.iter().all(|(k, v)| label_text.split(',').any(|l| l == format!("{k}=\"{v}\""))) {
            sum += value.trim().parse::<f64>().unwrap_or(0.0);
        }
    }
    Ok(sum)
}

/// The WebSocket error code of a reply, if it is an error.
fn error_of(f: &proto::ServerFrame) -> Option<ErrorCode> {
    match &f.frame {
        Some(server_frame::Frame::Error(e)) => Some(e.code()),
        _ => None,
    }
}

/// A raw MQTT connection (clean, keep alive `keep_alive`) with a CONNACK
/// success.
async fn raw_mqtt(gw: &TestGateway, ver: Ver, id: &str, keep_alive: u16) -> anyhow::Result<Raw> {
    Raw::handshake(gw.mqtt, ver, id, keep_alive).await
}

/// The next packet that is not a PUBLISH.
async fn next_reply(r: &mut Raw) -> anyhow::Result<common_mqtt::RawPacket> {
    loop {
        let p = r.packet().await?.ok_or_else(|| anyhow::anyhow!("MQTT connection closed"))?;
        if p.kind() != 3 {
            return Ok(p);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_rate_is_a_token_bucket_per_connection() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|cfg| {
        cfg.limits.publish_rate = 0.5;
        cfg.limits.publish_burst = 5.0;
    })
    .await?;
    let mut by = Bystanders::join(&gw).await?;
    let before = metric(&gw, "switchboard_limit_exceeded_total", &[("limit", "publish_rate")]).await?;
    let mut ws = WsClient::connect(&gw.ws, Codec::Json, "fast").await?;
    let mut other = WsClient::connect(&gw.ws, Codec::Json, "calm").await?;
    for i in 0..5 {
        ws.publish("rl/a", format!("{i}").as_bytes(), "").await?;
    }
    let f = ws.publish_frame(Publish { channel: "rl/a".into(), ..Default::default() }).await?;
    assert_eq!(error_of(&f), Some(ErrorCode::RateLimited), "{f:?}");
    // The connection stays usable, and the bucket is per connection.
    assert!(ws.subscribe_to("rl/a").await.is_ok());
    other.publish("rl/a", b"from another connection", "").await?;
    assert_eq!(&ws.next_message().await?.payload[..], b"from another connection");

    // MQTT 5: the sixth QoS 1 publish is acknowledged with 0x97 (quota
    // exceeded) and the connection stays; a refused QoS 0 publish is dropped.
    let mut m = Mqtt::connect(gw.mqtt, Ver::V5, "mqtt-fast").await?;
    for _ in 0..5 {
        assert_eq!(m.publish("rl/m", 1, false, "x").await?, 0);
    }
    assert_eq!(m.publish("rl/m", 1, false, "x").await?, 0x97);
    m.sub("rl/m", 1).await?;
    // SSE: the stream's REST uplink spends the stream's bucket (HTTP 429).
    let resp = reqwest::get(format!("{}/v1/sse?channel=rl/none", gw.http)).await?;
    let mut events = eventsource_stream::Eventsource::eventsource(resp.bytes_stream());
    let connected = tokio::time::timeout(WAIT, events.next()).await?.ok_or_else(|| anyhow::anyhow!("no event"))??;
    let conn =
        serde_json::from_str::<serde_json::Value>(&connected.data)?["connection_id"].as_str().unwrap_or("").to_string();
    for _ in 0..5 {
        assert_eq!(rest_publish(&gw.http, "rl/sse", "x", &[("x-connection-id", &conn)]).await?.0, 200);
    }
    let (status, body) = rest_publish(&gw.http, "rl/sse", "x", &[("x-connection-id", &conn)]).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (429, Some("rate_limited")));
    assert_eq!(rest_publish(&gw.http, "rl/sse", "x", &[]).await?.0, 200, "REST itself has no connection, no bucket");
    // MQTT 3.1.1 has no negative PUBACK: the sixth publish closes.
    let mut r = raw_mqtt(&gw, Ver::V4, "mqtt311-fast", 60).await?;
    for pkid in 1..=5 {
        r.send(&publish_packet(Ver::V4, b"rl/v4", 1, pkid, b"x", &[])).await?;
        assert_eq!(next_reply(&mut r).await?.kind(), 4, "PUBACK");
    }
    r.send(&publish_packet(Ver::V4, b"rl/v4", 1, 6, b"x", &[])).await?;
    assert_eq!(r.closed().await?.packets, []);
    let after = metric(&gw, "switchboard_limit_exceeded_total", &[("limit", "publish_rate")]).await?;
    assert!(after - before >= 4.0, "metric counted the refusals: {before} -> {after}");
    by.still_served("publish rate").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_size_is_refused_per_protocol_and_the_connection_stays() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|cfg| cfg.limits.max_message_size = 1024).await?;
    let mut by = Bystanders::join(&gw).await?;
    let mut sub = WsClient::connect(&gw.ws, Codec::Json, "sizes").await?;
    sub.subscribe_to("ms/#").await?;
    // The limit bounds the whole message (payload, channel, id, headers...),
    // so a payload of the limit itself does not fit; 900 bytes do.
    let big = vec![b'x'; 1025];
    let fits = vec![b'y'; 900];

    // WebSocket: error `message_too_large`, the connection stays.
    let mut ws = WsClient::connect(&gw.ws, Codec::Proto, "ws-big").await?;
    let f = ws
        .publish_frame(Publish { channel: "ms/ws".into(), payload: big.clone().into(), ..Default::default() })
        .await?;
    assert_eq!(error_of(&f), Some(ErrorCode::MessageTooLarge));
    ws.publish("ms/ws", &fits, "").await?;
    // REST: 413.
    let (status, body) = rest_publish(&gw.http, "ms/rest", big.clone(), &[]).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (413, Some("message_too_large")));
    let (status, _) = rest_publish(&gw.http, "ms/rest", fits.clone(), &[]).await?;
    assert_eq!(status, 200);
    // SSE uplink (REST acting as the stream): 413.
    let resp = reqwest::get(format!("{}/v1/sse?channel=ms/none", gw.http)).await?;
    let mut events = eventsource_stream::Eventsource::eventsource(resp.bytes_stream());
    let connected = tokio::time::timeout(WAIT, events.next()).await?.ok_or_else(|| anyhow::anyhow!("no event"))??;
    let conn =
        serde_json::from_str::<serde_json::Value>(&connected.data)?["connection_id"].as_str().unwrap_or("").to_string();
    let (status, _) = rest_publish(&gw.http, "ms/sse", big.clone(), &[("x-connection-id", &conn)]).await?;
    assert_eq!(status, 413);
    let (status, _) = rest_publish(&gw.http, "ms/sse", fits.clone(), &[("x-connection-id", &conn)]).await?;
    assert_eq!(status, 200);
    // MQTT 5: PUBACK 0x97 for QoS 1, a QoS 0 publish is dropped; the
    // connection stays.
    let mut m = raw_mqtt(&gw, Ver::V5, "mqtt-big", 60).await?;
    m.send(&publish_packet(Ver::V5, b"ms/mqtt", 1, 1, &big, &[])).await?;
    let p = next_reply(&mut m).await?;
    assert_eq!((p.kind(), p.body.get(2).copied()), (4, Some(0x97)), "PUBACK 0x97: {p:?}");
    m.send(&publish_packet(Ver::V5, b"ms/mqtt", 0, 0, &big, &[])).await?;
    m.send(&publish_packet(Ver::V5, b"ms/mqtt", 1, 2, &fits, &[])).await?;
    assert_eq!(next_reply(&mut m).await?.body.len(), 2, "PUBACK success (short form)");
    // MQTT 3.1.1: no negative ack, so a close.
    let mut m4 = raw_mqtt(&gw, Ver::V4, "mqtt311-big", 60).await?;
    m4.send(&publish_packet(Ver::V4, b"ms/mqtt", 1, 1, &big, &[])).await?;
    assert_eq!(m4.closed().await?.packets, []);

    // Exactly the messages that fit arrived.
    let got: Vec<String> = sub.messages(4).await?.into_iter().map(|e| e.channel).collect();
    assert_eq!(got, ["ms/ws", "ms/rest", "ms/sse", "ms/mqtt"]);
    for protocol in ["ws", "rest", "sse", "mqtt"] {
        let n = metric(&gw, "switchboard_limit_exceeded_total", &[("limit", "message_size"), ("protocol", protocol)])
            .await?;
        assert!(n >= 1.0, "metric for {protocol}: {n}");
    }
    by.still_served("message size").await
}

/// MQTT 5 user properties (property 0x26, a UTF-8 pair each).
fn user_props(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut b = Vec::new();
    for (k, v) in pairs {
        b.push(0x26);
        for s in [k, v] {
            b.extend_from_slice(&(s.len() as u16).to_be_bytes());
            b.extend_from_slice(s.as_bytes());
        }
    }
    b
}

/// The size limit bounds the whole message, not only its payload: a tiny
/// payload under hundreds of KiB of headers or an oversize header is
/// refused on WebSocket, REST and MQTT 5 (PUBACK 0x97); an id over 256
/// bytes is a bad request on every protocol (MQTT 5 PUBACK 0x80); nothing
/// of it is stored or delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_headers_and_properties_count_against_the_message_size() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let mut by = Bystanders::join(&gw).await?;
    let mut sub = WsClient::connect(&gw.ws, Codec::Json, "fields").await?;
    sub.subscribe_to("mf/#").await?;
    let value = "v".repeat(8 * 1024);
    let bulky: std::collections::BTreeMap<String, String> = (0..60).map(|i| (format!("h{i}"), value.clone())).collect();
    let long_id = "i".repeat(257);
    let long_value: std::collections::BTreeMap<String, String> = [("k".to_string(), "v".repeat(8 * 1024 + 1))].into();
    let too_many: std::collections::BTreeMap<String, String> = (0..65).map(|i| (format!("h{i}"), "v".into())).collect();

    // WebSocket: each refused with `message_too_large`, the connection stays.
    let mut ws = WsClient::connect(&gw.ws, Codec::Proto, "ws-fields").await?;
    let p = |headers: std::collections::BTreeMap<String, String>, id: &str| Publish {
        channel: "mf/ws".into(),
        payload: Bytes::from_static(b"tiny"),
        headers,
        id: id.into(),
        ..Default::default()
    };
    for (what, publish, code) in [
        ("480 KiB of headers", p(bulky.clone(), ""), ErrorCode::MessageTooLarge),
        ("a 257-byte id", p(Default::default(), &long_id), ErrorCode::BadRequest),
        ("an 8 KiB + 1 header value", p(long_value.clone(), ""), ErrorCode::MessageTooLarge),
        ("65 headers", p(too_many.clone(), ""), ErrorCode::MessageTooLarge),
    ] {
        let f = ws.publish_frame(publish).await?;
        assert_eq!(error_of(&f), Some(code), "{what}: {f:?}");
    }
    ws.publish("mf/ws", b"ok", "").await?;

    // REST: a long Idempotency-Key or JSON `id` is 400; bulky JSON headers
    // are 413.
    let (status, body) = rest_publish(&gw.http, "mf/rest", "tiny", &[("idempotency-key", &long_id)]).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("bad_request")));
    let long_json_id = json!({"text": "tiny", "id": long_id});
    let (status, body) =
        rest_publish(&gw.http, "mf/rest", long_json_id.to_string(), &[("content-type", "application/json")]).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("bad_request")), "a 257-byte JSON id");
    let json_body =
        json!({"text": "tiny", "headers": bulky.iter().take(10).collect::<std::collections::BTreeMap<_, _>>()});
    let (status, body) =
        rest_publish(&gw.http, "mf/rest", json_body.to_string(), &[("content-type", "application/json")]).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (413, Some("message_too_large")), "80 KiB of headers");
    let (status, _) = rest_publish(&gw.http, "mf/rest", "ok", &[]).await?;
    assert_eq!(status, 200);

    // MQTT 5: user properties count; PUBACK 0x97, the connection stays.
    let mut m = raw_mqtt(&gw, Ver::V5, "mqtt-fields", 60).await?;
    let keys: Vec<String> = (0..30).map(|i| format!("h{i}")).collect();
    let bulky_props: Vec<(&str, &str)> = keys.iter().map(|k| (k.as_str(), value.as_str())).collect();
    for (pkid, props, code) in [(1u16, user_props(&bulky_props), 0x97), (2, user_props(&[("id", &long_id)]), 0x80)] {
        m.send(&publish_packet(Ver::V5, b"mf/mqtt", 1, pkid, b"tiny", &props)).await?;
        let r = next_reply(&mut m).await?;
        assert_eq!((r.kind(), r.body.get(2).copied()), (4, Some(code)), "PUBACK for pkid {pkid}: {r:?}");
    }
    m.send(&publish_packet(Ver::V5, b"mf/mqtt", 1, 3, b"ok", &[])).await?;
    assert_eq!(next_reply(&mut m).await?.body.len(), 2, "PUBACK success (short form)");

    // Only the messages that fit were stored and delivered.
    let got: Vec<String> = sub.messages(3).await?.into_iter().map(|e| e.channel).collect();
    assert_eq!(got, ["mf/ws", "mf/rest", "mf/mqtt"]);
    for ch in ["mf/ws", "mf/rest", "mf/mqtt"] {
        let (_, h) = get_json(&format!("{}/v1/channels/{ch}/history", gw.http)).await?;
        assert_eq!(h["messages"].as_array().map(Vec::len), Some(1), "{ch}: only the small message is stored");
    }
    by.still_served("message fields").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_per_connection_are_capped_and_resubscribing_is_not_counted() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|cfg| cfg.limits.max_subscriptions = 3).await?;
    let mut by = Bystanders::join(&gw).await?;

    // WebSocket: the fourth filter is `too_many_subscriptions`; the same
    // filter again replaces (not counted); unsubscribing frees a slot.
    let mut ws = WsClient::connect(&gw.ws, Codec::Json, "many").await?;
    for f in ["s/a", "s/b", "s/c"] {
        ws.subscribe_to(f).await?;
    }
    let sub = |f: &str| client_frame::Frame::Subscribe(proto::Subscribe { filter: f.into(), ..Default::default() });
    assert_eq!(error_of(&ws.request(sub("s/d")).await?), Some(ErrorCode::TooManySubscriptions));
    for _ in 0..5 {
        ws.subscribe_to("s/a").await?;
    }
    ws.request(client_frame::Frame::Unsubscribe(proto::Unsubscribe { filter: "s/a".into() })).await?;
    ws.subscribe_to("s/d").await?;
    assert_eq!(error_of(&ws.request(sub("s/e")).await?), Some(ErrorCode::TooManySubscriptions));
    ws.publish("s/d", b"live", "").await?;
    assert_eq!(&ws.next_message().await?.payload[..], b"live", "the connection goes on");

    // MQTT 5: SUBACK 0x97; re-subscribing a held filter is granted (MQTT
    // 5 §3.8.4: it replaces the subscription). MQTT 3.1.1: 0x80.
    for (ver, refused) in [(Ver::V5, 0x97), (Ver::V4, 0x80)] {
        let mut r = raw_mqtt(&gw, ver, &format!("many-{ver:?}"), 60).await?;
        let mut suback = async |pkid: u16, filter: &str| -> anyhow::Result<u8> {
            r.send(&subscribe_packet(ver, pkid, filter, 1)).await?;
            let p = next_reply(&mut r).await?;
            anyhow::ensure!(p.kind() == 9, "expected SUBACK, got {p:?}");
            Ok(*p.body.last().unwrap_or(&0xFF))
        };
        for (i, f) in ["s/a", "s/b", "s/c"].into_iter().enumerate() {
            assert_eq!(suback(i as u16 + 1, f).await?, 1, "{ver:?} {f}");
        }
        assert_eq!(suback(4, "s/d").await?, refused, "{ver:?}: fourth");
        for pkid in 5..10 {
            assert_eq!(suback(pkid, "s/b").await?, 1, "{ver:?}: the same filter again");
        }
        assert_eq!(suback(10, "s/e").await?, refused, "{ver:?}: still three");
    }

    // SSE and long polling: four channels over a limit of three is a 400
    // before the stream starts.
    let q = "channel=s/a&channel=s/b&channel=s/c&channel=s/d";
    for path in ["sse", "poll"] {
        let resp = reqwest::get(format!("{}/v1/{path}?{q}&timeout=0", gw.http)).await?;
        let status = resp.status().as_u16();
        let body: serde_json::Value = resp.json().await?;
        assert_eq!((status, body["error"]["code"].as_str()), (400, Some("too_many_subscriptions")), "{path}");
    }
    for protocol in ["ws", "mqtt", "sse", "poll"] {
        let n = metric(&gw, "switchboard_limit_exceeded_total", &[("limit", "subscriptions"), ("protocol", protocol)])
            .await?;
        assert!(n >= 1.0, "metric for {protocol}: {n}");
    }
    by.still_served("subscriptions").await
}

/// #13 item 6: per-connection bounds on the state a client creates —
/// positions in one subscribe, the rate of subscribe and presence requests,
/// and presence entries — each with a clear error and a metric, while the
/// connection and everyone else go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_request_rate_and_presence_entries_are_capped_per_connection() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|cfg| {
        cfg.limits.max_positions = 3;
        cfg.limits.max_presence_per_connection = 2;
        cfg.limits.request_rate = 0.5;
        cfg.limits.request_burst = 8.0;
    })
    .await?;
    let mut by = Bystanders::join(&gw).await?;
    let mut ws = WsClient::connect(&gw.ws, Codec::Proto, "hoarder").await?;
    // Positions: four in one subscribe (each would create a channel).
    let positions = (0..4).map(|i| (format!("pos/{i}"), proto::Position { epoch: "E".into(), serial: 0 })).collect();
    let many =
        client_frame::Frame::Subscribe(proto::Subscribe { filter: "pos/#".into(), positions, ..Default::default() });
    assert_eq!(error_of(&ws.request(many).await?), Some(ErrorCode::TooManySubscriptions), "four positions");
    // Presence: two channels, not a third; leaving one frees its slot.
    let enter = |ch: &str| {
        client_frame::Frame::PresenceEnter(proto::PresenceEnter { channel: ch.into(), data: Bytes::from("m") })
    };
    let leave = |ch: &str| client_frame::Frame::PresenceLeave(proto::PresenceLeave { channel: ch.into() });
    for ch in ["room/1", "room/2"] {
        assert_eq!(error_of(&ws.request(enter(ch)).await?), None, "{ch}");
    }
    assert_eq!(error_of(&ws.request(enter("room/3")).await?), Some(ErrorCode::TooManySubscriptions));
    assert_eq!(error_of(&ws.request(enter("room/1")).await?), None, "an update of a held entry is not counted");
    assert_eq!(error_of(&ws.request(leave("room/2")).await?), None);
    assert_eq!(error_of(&ws.request(enter("room/3")).await?), None, "a left entry frees its slot");
    // Rate: that was 7 requests of the burst of 8; the ninth is refused.
    ws.subscribe_to("rate/a").await?;
    assert_eq!(error_of(&ws.request(enter("room/1")).await?), Some(ErrorCode::RateLimited));
    let sub = client_frame::Frame::Subscribe(proto::Subscribe { filter: "rate/b".into(), ..Default::default() });
    assert_eq!(error_of(&ws.request(sub).await?), Some(ErrorCode::RateLimited));
    // The connection goes on: publishing is another bucket.
    ws.publish("rate/a", b"still", "").await?;
    assert_eq!(&ws.next_message().await?.payload[..], b"still");
    for (limit, at_least) in [("positions", 1.0), ("presence", 1.0), ("request_rate", 2.0)] {
        let n = metric(&gw, "switchboard_limit_exceeded_total", &[("limit", limit), ("protocol", "ws")]).await?;
        assert!(n >= at_least, "{limit}: {n}");
    }
    by.still_served("per-connection state caps").await
}

/// An MQTT 5 UNSUBSCRIBE of one filter (short: one-byte remaining length).
fn unsubscribe_packet_v5(pkid: u16, filter: &str) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    body.push(0); // no properties
    body.extend_from_slice(&(filter.len() as u16).to_be_bytes());
    body.extend_from_slice(filter.as_bytes());
    assert!(body.len() < 128, "one-byte remaining length");
    let mut p = vec![0xA2, body.len() as u8];
    p.extend_from_slice(&body);
    p
}

/// #13 item 1: shared groups are capped node-wide (a connection's own are
/// capped by `max_subscriptions`): a new group over the cap is refused —
/// MQTT 5 SUBACK 0x97, WebSocket `too_many_subscriptions` — joining an
/// existing group is not, and a group whose members all left frees its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_groups_are_capped_per_node() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|cfg| cfg.limits.max_shared_groups = 2).await?;
    let mut by = Bystanders::join(&gw).await?;
    let mut a = raw_mqtt(&gw, Ver::V5, "share-a", 60).await?;
    let suback = async |r: &mut Raw, pkid: u16, filter: &str| -> anyhow::Result<u8> {
        r.send(&subscribe_packet(Ver::V5, pkid, filter, 1)).await?;
        let p = next_reply(r).await?;
        anyhow::ensure!(p.kind() == 9, "expected SUBACK, got {p:?}");
        Ok(*p.body.last().unwrap_or(&0xFF))
    };
    assert_eq!(suback(&mut a, 1, "$share/g1/jobs/#").await?, 1);
    assert_eq!(suback(&mut a, 2, "$share/g2/jobs/#").await?, 1);
    assert_eq!(suback(&mut a, 3, "$share/g3/jobs/#").await?, 0x97, "a third group on the node");
    // Another connection may join an existing group, not create one.
    let mut b = raw_mqtt(&gw, Ver::V5, "share-b", 60).await?;
    assert_eq!(suback(&mut b, 1, "$share/g1/jobs/#").await?, 1);
    assert_eq!(suback(&mut b, 2, "$share/g4/other").await?, 0x97);
    let mut ws = WsClient::connect(&gw.ws, Codec::Json, "share-ws").await?;
    let sub = |f: &str| client_frame::Frame::Subscribe(proto::Subscribe { filter: f.into(), ..Default::default() });
    assert_eq!(error_of(&ws.request(sub("$share/g5/jobs/#")).await?), Some(ErrorCode::TooManySubscriptions));
    // g2's only member leaves: its slot frees.
    a.send(&unsubscribe_packet_v5(4, "$share/g2/jobs/#")).await?;
    let p = next_reply(&mut a).await?;
    anyhow::ensure!(p.kind() == 11, "expected UNSUBACK, got {p:?}");
    ws.subscribe_to("$share/g5/jobs/#").await?;
    let n =
        metric(&gw, "switchboard_limit_exceeded_total", &[("limit", "shared_groups"), ("protocol", "mqtt")]).await?;
    assert!(n >= 2.0, "refusals counted: {n}");
    by.still_served("shared groups").await
}

/// #13 item 2: a long poll or SSE stream whose replay spans more channels
/// than one cursor holds (a forged `since` over `q/#`) is refused with 400
/// at once, before any cursor is encoded per event; a stream over the
/// channels that fit works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_over_more_channels_than_a_cursor_holds_is_refused_at_once() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let http = reqwest::Client::new();
    for i in 0..600 {
        let url = format!("{}/v1/channels/q/{i}/messages", gw.http);
        assert_eq!(http.post(url).body("x").send().await?.status(), 200);
    }
    // A cursor whose `since` is the beginning of time, naming no channel.
    let since1 = switchboard_protocols::cursor::Cursor::new(1).encode();
    for path in ["poll", "sse"] {
        let started = Instant::now();
        let resp = http.get(format!("{}/v1/{path}?channel=q/%23&cursor={since1}&timeout=0", gw.http)).send().await?;
        let status = resp.status().as_u16();
        let body: serde_json::Value = resp.json().await?;
        assert_eq!((status, body["error"]["code"].as_str()), (400, Some("too_many_subscriptions")), "{path}: {body}");
        assert!(body["error"]["message"].as_str().unwrap_or("").contains("cursor"), "{body}");
        assert!(started.elapsed() < Duration::from_secs(2), "{path} took {:?}", started.elapsed());
    }
    // Fewer channels: the poll answers with every message and one cursor.
    let q = format!("channel=q/1&channel=q/2&channel=q/3&cursor={since1}&timeout=0");
    let resp = http.get(format!("{}/v1/poll?{q}", gw.http)).send().await?;
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await?;
    assert_eq!(body["messages"].as_array().map(Vec::len), Some(3), "{body}");
    assert!(body["cursor"].as_str().is_some_and(|c| !c.is_empty()), "{body}");
    Ok(())
}

/// A TCP connection from `local` (another loopback address is another
/// client IP) to `addr`.
async fn tcp_from(local: IpAddr, addr: SocketAddr) -> anyhow::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(local, 0))?;
    Ok(socket.connect(addr).await?)
}

/// A WebSocket session from `local`: connect frame, `connected` reply.
async fn ws_from(local: IpAddr, gw: &TestGateway, client_id: &str) -> anyhow::Result<RawWs> {
    let addr: SocketAddr = gw.ws.trim_start_matches("ws://").parse()?;
    let stream = tcp_from(local, addr).await?;
    let mut request = format!("{}/v1/ws", gw.ws).into_client_request()?;
    request.headers_mut().insert("sec-websocket-protocol", "switchboard.v1.json".parse()?);
    let (ws, _) = tokio_tungstenite::client_async(request, tokio_tungstenite::MaybeTlsStream::Plain(stream)).await?;
    let mut ws = ws;
    ws.send(Message::text(json!({"type": "connect", "req": 1, "client_id": client_id}).to_string())).await?;
    match tokio::time::timeout(WAIT, ws.next()).await? {
        Some(Ok(Message::Text(t))) if t.contains("\"connected\"") => Ok(ws),
        other => anyhow::bail!("expected connected, got {other:?}"),
    }
}

/// An HTTP client whose connections come from `local` and are not pooled
/// (each request is one connection, as the per-IP count sees it).
fn http_from(local: IpAddr) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder().local_address(local).pool_max_idle_per_host(0).build()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_ip_are_refused_at_accept_for_that_ip_only() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|cfg| cfg.limits.max_connections_per_ip = 3).await?;
    let here: IpAddr = "127.0.0.1".parse()?;
    let there: IpAddr = "127.0.0.2".parse()?;
    let before = metric(&gw, "switchboard_connections_refused_total", &[("reason", "per_ip")]).await?;
    // 127.0.0.1 takes its three slots: two WebSockets and an MQTT client.
    let mut a = WsClient::connect(&gw.ws, Codec::Json, "a").await?;
    let mut b = WsClient::connect(&gw.ws, Codec::Json, "b").await?;
    b.subscribe_to("ip/#").await?;
    let mut m = Mqtt::connect(gw.mqtt, Ver::V5, "m").await?;
    // The fourth from 127.0.0.1: refused at accept, before any routing:
    // the request head is read (within a second) and answered with HTTP
    // 429 and Retry-After (so the same for WebSocket, SSE, long polling and
    // REST); MQTT closed before CONNACK.
    let err = raw_ws(&gw.ws, Some("switchboard.v1.json")).await.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("429"), "WebSocket: expected a 429 refusal, got {err:?}");
    let resp = http_from(here)?.get(format!("{}/v1/channels/ip/history", gw.http)).send().await?;
    assert_eq!(resp.status().as_u16(), 429, "REST over reqwest sees the refusal");
    assert_eq!(resp.headers().get("retry-after").map(|v| v.as_bytes()), Some(&b"1"[..]));
    let http_addr: SocketAddr = gw.ws.trim_start_matches("ws://").parse()?;
    let mut refused = tcp_from(here, http_addr).await?;
    tokio::io::AsyncWriteExt::write_all(&mut refused, b"GET /v1/sse?channel=ip HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    let mut answer = String::new();
    tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read_to_string(&mut refused, &mut answer)).await??;
    assert!(answer.starts_with("HTTP/1.1 429 Too Many Requests\r\n"), "{answer:?}");
    assert!(answer.contains("\r\nRetry-After: 1\r\n"), "{answer:?}");
    let mut r = Raw::connect(gw.mqtt).await?;
    r.send(&connect_packet(5, "m2", 60, None, &[])).await?;
    assert_eq!(r.closed().await?.packets, [], "MQTT: closed without a CONNACK");

    // Another IP is not affected, on any listener.
    let _ws_there = ws_from(there, &gw, "there").await?;
    let mut mqtt_there = Raw::over(tcp_from(there, gw.mqtt).await?);
    mqtt_there.send(&connect_packet(5, "m-there", 60, None, &[])).await?;
    assert_eq!(mqtt_there.packet().await?.and_then(|p| p.connack_code()), Some(0));
    let resp =
        http_from(there)?.post(format!("{}/v1/channels/ip/there/messages", gw.http)).body("from there").send().await?;
    assert_eq!(resp.status(), 200);
    // Nor are the connections 127.0.0.1 holds.
    a.publish("ip/here", b"still", "").await?;
    m.publish_ok("ip/mqtt", 1, "still").await?;
    let got: Vec<String> = b.messages(3).await?.into_iter().map(|e| e.channel).collect();
    assert_eq!(got, ["ip/there", "ip/here", "ip/mqtt"]);
    let after = metric(&gw, "switchboard_connections_refused_total", &[("reason", "per_ip")]).await?;
    assert!(after - before >= 3.0, "refusals counted: {before} -> {after}");
    // A slot frees when a connection ends.
    a.close().await?;
    eventually(WAIT, "a slot to free", || async { WsClient::connect(&gw.ws, Codec::Json, "c").await.map(drop).is_ok() })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_per_second_are_refused_and_established_ones_go_on() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|cfg| {
        cfg.limits.new_connections_per_sec = 0.5;
        cfg.limits.new_connections_burst = 3.0;
    })
    .await?;
    let mut first = WsClient::connect(&gw.ws, Codec::Json, "first").await?;
    first.subscribe_to("rate/#").await?;
    let mut ok = 1;
    let mut refused = 0;
    let mut kept = Vec::new();
    for i in 0..4 {
        match WsClient::connect(&gw.ws, Codec::Json, &format!("r{i}")).await {
            Ok(c) => {
                ok += 1;
                kept.push(c);
            }
            Err(e) => {
                assert!(e.to_string().contains("429"), "{e}");
                refused += 1;
            }
        }
    }
    assert_eq!((ok, refused), (3, 2), "the burst, then the rate");
    // MQTT shares the bucket: refused before CONNACK.
    assert!(Mqtt::connect(gw.mqtt, Ver::V5, "mq").await.is_err());
    // The established connections are not affected.
    for c in &mut kept {
        c.publish("rate/x", b"fine", "").await?;
    }
    assert_eq!(first.messages(kept.len()).await?.len(), kept.len());
    let n = metric(&gw, "switchboard_connections_refused_total", &[("reason", "rate")]).await?;
    assert!(n >= 3.0, "refusals counted: {n}");
    Ok(())
}

/// #13 item 8: one IP churning connections spends its own rate, not the
/// node's, so another IP still gets in (before the fix the churner drained
/// the node-wide bucket and every other IP got 429 / an MQTT close).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_ip_churning_connections_does_not_lock_out_another() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|cfg| {
        cfg.limits.new_connections_per_sec = 0.5;
        cfg.limits.new_connections_burst = 8.0;
        cfg.limits.new_connections_per_ip_per_sec = 0.5;
        cfg.limits.new_connections_per_ip_burst = 3.0;
    })
    .await?;
    let churner: IpAddr = "127.0.0.2".parse()?;
    let here: IpAddr = "127.0.0.1".parse()?;
    let before = metric(&gw, "switchboard_connections_refused_total", &[("reason", "ip_rate")]).await?;
    let (mut ok, mut refused) = (0, 0);
    for i in 0..20 {
        match ws_from(churner, &gw, &format!("churn{i}")).await {
            Ok(ws) => {
                ok += 1;
                drop(ws); // and away again
            }
            Err(e) => {
                assert!(e.to_string().contains("429"), "{e}");
                refused += 1;
            }
        }
    }
    assert_eq!((ok, refused), (3, 17), "the churner gets its own burst, then its own rate");
    // 127.0.0.1 still connects, on WebSocket, MQTT and REST.
    let mut a = WsClient::connect(&gw.ws, Codec::Json, "a").await?;
    a.subscribe_to("churn/#").await?;
    let mut m = Mqtt::connect(gw.mqtt, Ver::V5, "m").await?;
    m.publish_ok("churn/mqtt", 1, "in").await?;
    let resp = http_from(here)?.post(format!("{}/v1/channels/churn/rest/messages", gw.http)).body("in").send().await?;
    assert_eq!(resp.status(), 200);
    let got: Vec<String> = a.messages(2).await?.into_iter().map(|e| e.channel).collect();
    assert_eq!(got, ["churn/mqtt", "churn/rest"]);
    let after = metric(&gw, "switchboard_connections_refused_total", &[("reason", "ip_rate")]).await?;
    assert_eq!(after - before, 17.0, "per-IP refusals counted as ip_rate");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_timeouts_close_only_the_silent_connections() -> anyhow::Result<()> {
    let timeout = Duration::from_millis(300);
    let gw = TestGateway::start_with(|cfg| {
        cfg.websocket.handshake_timeout = timeout;
        cfg.mqtt.connect_timeout = timeout;
    })
    .await?;
    let mut by = Bystanders::join(&gw).await?;
    let started = Instant::now();
    // WebSocket: upgraded, no `connect` frame: `disconnect` 4002, close 4002.
    let mut ws = raw_ws(&gw.ws, Some("switchboard.v1.json")).await?;
    // MQTT: TCP open, no CONNECT: closed without a word.
    let mut mqtt = Raw::connect(gw.mqtt).await?;
    let (ws_close, mqtt_closed) = tokio::join!(
        async {
            let mut frames = Vec::new();
            loop {
                match tokio::time::timeout(WAIT, ws.next()).await? {
                    Some(Ok(Message::Text(t))) => frames.push(proto::json::decode_server_frame(t.as_str())?),
                    Some(Ok(Message::Close(Some(c)))) => return anyhow::Ok((frames, u16::from(c.code))),
                    other => anyhow::bail!("WebSocket: {other:?}"),
                }
            }
        },
        mqtt.closed()
    );
    let (frames, code) = ws_close?;
    assert_eq!(code, 4002);
    assert!(
        matches!(frames.as_slice(), [proto::ServerFrame { frame: Some(server_frame::Frame::Disconnect(d)), .. }] if d.code == 4002),
        "{frames:?}"
    );
    assert_eq!(mqtt_closed?.packets, []);
    let waited = started.elapsed();
    assert!(waited >= timeout - Duration::from_millis(50) && waited < WAIT, "closed after {waited:?}");
    assert!(
        metric(&gw, "switchboard_protocol_errors_total", &[("protocol", "mqtt"), ("code", "connect_timeout")]).await?
            >= 1.0
    );
    let ws = [("limit", "handshake_timeout"), ("protocol", "ws")];
    assert!(metric(&gw, "switchboard_limit_exceeded_total", &ws).await? >= 1.0, "WebSocket handshake timeout counted");
    by.still_served("handshake timeouts").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeouts_close_only_the_silent_peers() -> anyhow::Result<()> {
    // No bystanders: with pings every 200 ms a client that does not read
    // is silent. The active twins below are the clients that must go on.
    let gw = TestGateway::start_with(|cfg| cfg.websocket.ping_interval = Duration::from_millis(200)).await?;
    // A WebSocket that stops reading (so it answers no ping) and an MQTT 5
    // client with keep alive 1 s that sends nothing.
    let mut silent_ws = raw_ws(&gw.ws, Some("switchboard.v1.json")).await?;
    silent_ws.send(Message::text(json!({"type": "connect", "req": 1, "client_id": "quiet"}).to_string())).await?;
    match tokio::time::timeout(WAIT, silent_ws.next()).await? {
        Some(Ok(Message::Text(t))) if t.contains("\"connected\"") => {}
        other => anyhow::bail!("expected connected, got {other:?}"),
    }
    let mut silent_mqtt = raw_mqtt(&gw, Ver::V5, "quiet-mqtt", 1).await?;
    // Their active twins: a WebSocket that pings (and so also answers the
    // server's pings), an MQTT client with keep alive 1 s sending PINGREQ.
    let mut busy_ws = WsClient::connect(&gw.ws, Codec::Json, "busy").await?;
    let mut busy_mqtt = raw_mqtt(&gw, Ver::V5, "busy-mqtt", 1).await?;
    let until = Instant::now() + Duration::from_millis(2200);
    while Instant::now() < until {
        busy_ws.request(client_frame::Frame::Ping(proto::Ping {})).await?;
        busy_mqtt.send(&common_mqtt::PINGREQ).await?;
        assert_eq!(next_reply(&mut busy_mqtt).await?.kind(), 13, "PINGRESP");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // The silent ones were closed: WebSocket `disconnect` 4004 then close
    // 4004 (after the server's unanswered ping), MQTT 5 DISCONNECT 0x8D.
    let mut frames = Vec::new();
    let code = loop {
        match tokio::time::timeout(WAIT, silent_ws.next()).await? {
            Some(Ok(Message::Text(t))) => frames.push(proto::json::decode_server_frame(t.as_str())?),
            Some(Ok(Message::Ping(_))) => {}
            Some(Ok(Message::Close(Some(c)))) => break u16::from(c.code),
            other => anyhow::bail!("silent WebSocket: {other:?}"),
        }
    };
    assert_eq!(code, 4004);
    assert!(
        matches!(frames.as_slice(), [proto::ServerFrame { frame: Some(server_frame::Frame::Disconnect(d)), .. }] if d.code == 4004 && d.reconnect),
        "{frames:?}"
    );
    assert_eq!(silent_mqtt.closed().await?.only_disconnect(), Some(0x8D));
    let ws = [("limit", "idle_timeout"), ("protocol", "ws")];
    assert!(metric(&gw, "switchboard_limit_exceeded_total", &ws).await? >= 1.0, "WebSocket idle timeout counted");
    // The active ones go on, and still talk to each other.
    busy_ws.subscribe_to("idle/x").await?;
    busy_mqtt.send(&publish_packet(Ver::V5, b"idle/x", 1, 1, b"awake", &[])).await?;
    assert_eq!(next_reply(&mut busy_mqtt).await?.kind(), 4, "PUBACK");
    assert_eq!(&busy_ws.next_message().await?.payload[..], b"awake");
    Ok(())
}

// ---------------------------------------------------------------------------
// WebTransport: the same limits on `/v1/wt`, each next to the WebSocket and
// MQTT bystanders and a well-behaved WebTransport session.

/// A WebTransport session minding its own business: it publishes on its own
/// channel and receives that on the channel's stream.
struct WtBystander {
    c: WtClient,
    stream: Option<FrameReader>,
    round: usize,
}

impl WtBystander {
    async fn join(gw: &TestGateway) -> anyhow::Result<Self> {
        let mut c = gw.wt_client("bystander-wt").await?;
        c.subscribe(proto::Subscribe { filter: "wtby/#".into(), ..Default::default() }).await?;
        Ok(WtBystander { c, stream: None, round: 0 })
    }

    /// A round trip through the gateway, in order.
    async fn still_served(&mut self, case: &str) -> anyhow::Result<()> {
        self.round += 1;
        let payload = Bytes::from(format!("wt{}", self.round));
        let p = Publish { channel: "wtby/x".into(), payload: payload.clone(), ..Default::default() };
        self.c.publish(p).await.with_context(|| format!("WebTransport bystander after {case}"))?;
        let stream = match &mut self.stream {
            Some(s) => s,
            None => self.stream.insert(wt_accept(&self.c).await?),
        };
        let m = wt_message(stream).await?;
        assert_eq!((m.payload, m.prev_serial + 1), (payload, m.serial), "WebTransport bystander after {case}");
        Ok(())
    }
}

/// The WebSocket, MQTT and WebTransport bystanders.
async fn wt_bystanders(gw: &TestGateway) -> anyhow::Result<(Bystanders, WtBystander)> {
    Ok((Bystanders::join(gw).await?, WtBystander::join(gw).await?))
}

async fn all_still_served(by: &mut (Bystanders, WtBystander), case: &str) -> anyhow::Result<()> {
    by.0.still_served(case).await?;
    by.1.still_served(case).await
}

fn wt_sub(filter: &str) -> proto::Subscribe {
    proto::Subscribe { filter: filter.into(), ..Default::default() }
}

fn wt_publish(channel: &str, payload: impl Into<Bytes>) -> Publish {
    Publish { channel: channel.into(), payload: payload.into(), ..Default::default() }
}

/// `frame` as one length-delimited control frame.
fn wt_framed(frame: &proto::ClientFrame) -> Vec<u8> {
    let mut out = BytesMut::new();
    codec::put_frame(&mut out, &frame.encode_to_vec());
    out.to_vec()
}

/// Publishes `p` as datagrams (request ids `first_req` and up, a few times:
/// datagrams may be lost) until the error for one of them comes on the
/// control stream; returns its code.
async fn wt_datagram_refusal(c: &mut WtClient, first_req: u64, p: Publish) -> anyhow::Result<ErrorCode> {
    for req in first_req..first_req + 5 {
        c.publish_datagram(req, p.clone())?;
        if let Ok(f) = tokio::time::timeout(Duration::from_secs(1), c.next_pushed()).await {
            let f = f?;
            anyhow::ensure!((first_req..=req).contains(&f.req), "unexpected frame {f:?}");
            return error_of(&f).with_context(|| format!("not an error: {f:?}"));
        }
    }
    bail!("no error for the refused datagram publish")
}

/// Whether a session of `client_id` is open.
fn has_session(gw: &TestGateway, client_id: &str) -> bool {
    gw.gateway.router.sessions().iter().any(|s| s.client_id == client_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wt_message_size_is_refused_and_the_session_stays() -> anyhow::Result<()> {
    // Small enough that an oversize publish still fits in one datagram.
    let gw = TestGateway::start_with(|cfg| {
        with_quic(cfg);
        cfg.limits.max_message_size = 512;
    })
    .await?;
    let mut by = wt_bystanders(&gw).await?;
    let mut watcher = WsClient::connect(&gw.ws, Codec::Proto, "watcher").await?;
    watcher.subscribe_to("ms/#").await?;
    let mut c = gw.wt_client("wt-big").await?;
    // The whole message counts (channel, fields), so 400 payload bytes fit.
    let (big, fits) = (vec![b'x'; 513], vec![b'y'; 400]);

    // On the control stream: error `message_too_large`, the session stays.
    let f = c.request(client_frame::Frame::Publish(wt_publish("ms/wt", big.clone()))).await?;
    assert_eq!(error_of(&f), Some(ErrorCode::MessageTooLarge), "{f:?}");
    c.publish(wt_publish("ms/wt", fits.clone())).await?;
    // Presence data counts too.
    let enter = proto::PresenceEnter { channel: "ms/wt".into(), data: big.clone().into() };
    let f = c.request(client_frame::Frame::PresenceEnter(enter)).await?;
    assert_eq!(error_of(&f), Some(ErrorCode::MessageTooLarge), "{f:?}");
    // A datagram publish with a request id: the error on the control stream.
    assert_eq!(wt_datagram_refusal(&mut c, 1000, wt_publish("ms/dg", big.clone())).await?, ErrorCode::MessageTooLarge);
    c.publish(wt_publish("ms/end", "end")).await?;

    // Exactly the messages that fit arrived.
    let got: Vec<(String, usize)> =
        watcher.messages(2).await?.into_iter().map(|e| (e.channel, e.payload.len())).collect();
    assert_eq!(got, [("ms/wt".to_string(), 400), ("ms/end".to_string(), 3)]);
    let n = metric(&gw, "switchboard_limit_exceeded_total", &[("limit", "message_size"), ("protocol", "wt")]).await?;
    assert!(n >= 3.0, "metric for wt: {n}");
    all_still_served(&mut by, "WebTransport message size").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wt_control_frames_over_the_frame_size_close_1009() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|cfg| {
        with_quic(cfg);
        cfg.limits.max_frame_size = 4096;
        cfg.limits.max_message_size = 4000;
    })
    .await?;
    let mut by = wt_bystanders(&gw).await?;
    let mut c = gw.wt_client("wt-frames").await?;
    // Under the limit: acknowledged.
    c.publish(wt_publish("fs/x", vec![b'a'; 3000])).await?;
    // A whole frame above it: `disconnect` 1009, then the close 1009.
    let publish = client_frame::Frame::Publish(wt_publish("fs/x", vec![b'b'; 5000]));
    c.send_raw(&wt_framed(&proto::ClientFrame { req: 99, frame: Some(publish) })).await?;
    let f = tokio::time::timeout(WAIT, c.next_pushed()).await.context("no disconnect")??;
    let Some(server_frame::Frame::Disconnect(d)) = f.frame else { bail!("expected disconnect, got {f:?}") };
    assert_eq!((d.code, d.reason.as_str(), d.reconnect), (1009, "message too large", false));
    assert_eq!(wt_closed(c.connection()).await?, (1009, "message too large".to_string()));
    let n =
        metric(&gw, "switchboard_protocol_errors_total", &[("protocol", "wt"), ("code", "message_too_large")]).await?;
    assert!(n >= 1.0, "metric: {n}");
    eventually(WAIT, "the session to end", || async { !has_session(&gw, "wt-frames") }).await?;
    all_still_served(&mut by, "WebTransport frame size").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wt_subscriptions_per_session_are_capped_and_resubscribing_is_not_counted() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|cfg| {
        with_quic(cfg);
        cfg.limits.max_subscriptions = 3;
    })
    .await?;
    let mut by = wt_bystanders(&gw).await?;
    let mut c = gw.wt_client("wt-many").await?;
    let sub = |f: &str| client_frame::Frame::Subscribe(wt_sub(f));
    for f in ["s/a", "s/b", "s/c"] {
        c.subscribe(wt_sub(f)).await?;
    }
    assert_eq!(error_of(&c.request(sub("s/d")).await?), Some(ErrorCode::TooManySubscriptions));
    // The same filter again replaces it, in either delivery mode.
    for _ in 0..5 {
        c.subscribe(wt_sub("s/a")).await?;
    }
    c.subscribe(proto::Subscribe { delivery: DeliveryMode::Datagram as i32, ..wt_sub("s/b") }).await?;
    c.subscribe(wt_sub("s/b")).await?;
    assert_eq!(error_of(&c.request(sub("s/d")).await?), Some(ErrorCode::TooManySubscriptions), "still three");
    // Unsubscribing frees a slot.
    let f = c.request(client_frame::Frame::Unsubscribe(proto::Unsubscribe { filter: "s/a".into() })).await?;
    assert!(matches!(f.frame, Some(server_frame::Frame::Unsubscribed(_))), "{f:?}");
    c.subscribe(wt_sub("s/d")).await?;
    assert_eq!(error_of(&c.request(sub("s/e")).await?), Some(ErrorCode::TooManySubscriptions));
    // The session goes on.
    c.publish(wt_publish("s/d", "live")).await?;
    let mut stream = wt_accept(&c).await?;
    assert_eq!(&wt_message(&mut stream).await?.payload[..], b"live");
    let n = metric(&gw, "switchboard_limit_exceeded_total", &[("limit", "subscriptions"), ("protocol", "wt")]).await?;
    assert!(n >= 3.0, "metric for wt: {n}");
    all_still_served(&mut by, "WebTransport subscriptions").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wt_publish_rate_is_a_token_bucket_per_session() -> anyhow::Result<()> {
    // One token every ten seconds: none comes back during the test.
    let gw = TestGateway::start_with(|cfg| {
        with_quic(cfg);
        cfg.limits.publish_rate = 0.1;
        cfg.limits.publish_burst = 5.0;
    })
    .await?;
    let mut by = wt_bystanders(&gw).await?;
    let mut fast = gw.wt_client("wt-fast").await?;
    let mut calm = gw.wt_client("wt-calm").await?;
    for i in 0..5 {
        fast.publish(wt_publish("rl/wt", format!("{i}"))).await?;
    }
    let f = fast.request(client_frame::Frame::Publish(wt_publish("rl/wt", "sixth"))).await?;
    assert_eq!(error_of(&f), Some(ErrorCode::RateLimited), "{f:?}");
    // Datagram publishes spend the same bucket.
    assert_eq!(wt_datagram_refusal(&mut fast, 1000, wt_publish("rl/wt", "dg")).await?, ErrorCode::RateLimited);
    // The session stays usable, and the bucket is the session's own.
    fast.subscribe(wt_sub("rl/wt")).await?;
    calm.publish(wt_publish("rl/wt", "from another session")).await?;
    let mut stream = wt_accept(&fast).await?;
    assert_eq!(&wt_message(&mut stream).await?.payload[..], b"from another session");
    let n = metric(&gw, "switchboard_limit_exceeded_total", &[("limit", "publish_rate"), ("protocol", "wt")]).await?;
    assert!(n >= 2.0, "metric for wt: {n}");
    all_still_served(&mut by, "WebTransport publish rate").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wt_handshake_timeout_closes_silent_sessions_4002() -> anyhow::Result<()> {
    let timeout = Duration::from_millis(300);
    let gw = TestGateway::start_with(|cfg| {
        with_quic(cfg);
        cfg.websocket.handshake_timeout = timeout;
    })
    .await?;
    let mut by = wt_bystanders(&gw).await?;
    let opts = gw.wt_options()?;
    let started = Instant::now();
    // No control stream at all: nowhere for a `disconnect`, the close only.
    let (_e1, bare) = open_session(&opts).await?;
    // A control stream (made visible by half a frame) but no `connect`.
    let (_e2, half) = open_session(&opts).await?;
    let (mut send, recv) = half.open_bi().await?.await?;
    send.write_all(&[5, 0]).await?;
    let mut control = FrameReader::new(recv);
    // Credentials in the request open the session before the accept; its
    // control stream must still come in time.
    let creds = WtOptions { url: format!("{}/v1/wt?client_id=no-control", opts.url), ..opts.clone() };
    let (_e3, opened) = open_session(&creds).await?;
    assert!(has_session(&gw, "no-control"));

    let (bare_closed, half_frames, opened_closed) = tokio::join!(
        wt_closed(&bare),
        async {
            let f = wt_next(&mut control).await?;
            anyhow::Ok((f, wt_closed(&half).await?))
        },
        wt_closed(&opened)
    );
    let connect_expected = (4002, "connect expected".to_string());
    assert_eq!(bare_closed?, connect_expected);
    let (f, half_closed) = half_frames?;
    let Some(server_frame::Frame::Disconnect(d)) = f.frame else { bail!("expected disconnect, got {f:?}") };
    assert_eq!((d.code, d.reconnect), (4002, false));
    assert_eq!(half_closed, connect_expected);
    assert_eq!(opened_closed?, connect_expected);
    let waited = started.elapsed();
    assert!(waited >= timeout - Duration::from_millis(50) && waited < WAIT, "closed after {waited:?}");
    eventually(WAIT, "the opened session to end", || async { !has_session(&gw, "no-control") }).await?;
    all_still_served(&mut by, "WebTransport handshake timeouts").await
}

/// A UDP relay between one QUIC client and the gateway that can fall silent
/// both ways at once: a peer that vanished without a word (unplugged, or
/// its NAT binding gone).
struct Relay {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(to: SocketAddr) -> anyhow::Result<Relay> {
        let front = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
        let back = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
        back.connect(to).await?;
        let addr = front.local_addr()?;
        let cut = Arc::new(AtomicBool::new(false));
        let silent = cut.clone();
        let task = tokio::spawn(async move {
            let (mut up, mut down) = (vec![0u8; 65_536], vec![0u8; 65_536]);
            let mut client = None;
            loop {
                tokio::select! {
                    r = front.recv_from(&mut up) => {
                        let Ok((n, from)) = r else { break };
                        client = Some(from);
                        if !silent.load(Ordering::Relaxed) {
                            let _ = back.send(&up[..n]).await;
                        }
                    }
                    r = back.recv(&mut down) => {
                        let Ok(n) = r else { break };
                        if let (false, Some(c)) = (silent.load(Ordering::Relaxed), client) {
                            let _ = front.send_to(&down[..n], c).await;
                        }
                    }
                }
            }
        });
        Ok(Relay { addr, cut, task })
    }

    /// From now on nothing passes, either way.
    fn cut(&self) {
        self.cut.store(true, Ordering::Relaxed);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Options for a client of `url` (the gateway's certificate) that sends no
/// keep-alives of its own and has `idle` as its QUIC idle timeout (`None`:
/// none; the gateway's then applies).
fn quiet_client(gw: &TestGateway, url: String, client_id: &str, idle: Option<Duration>) -> anyhow::Result<WtOptions> {
    let mut transport = wtransport::config::QuicTransportConfig::default();
    transport.keep_alive_interval(None);
    transport.max_idle_timeout(idle.map(wtransport::quinn::IdleTimeout::try_from).transpose()?);
    Ok(WtOptions { url, client_id: client_id.into(), transport: Some(Arc::new(transport)), ..gw.wt_options()? })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wt_keep_alives_hold_quiet_sessions_and_vanished_peers_are_dropped() -> anyhow::Result<()> {
    // Keep-alives every 200 ms; the idle timeout is twice that but never
    // under 30 s (docs/protocol.md, WebTransport). No WebSocket bystanders:
    // with pings every 200 ms one that does not read would be closed.
    let gw = TestGateway::start_with(|cfg| {
        with_quic(cfg);
        cfg.websocket.ping_interval = Duration::from_millis(200);
    })
    .await?;
    let quic = gw.gateway.quic_addr.context("no QUIC listener")?;
    let (short_relay, long_relay) = (Relay::start(quic).await?, Relay::start(quic).await?);
    // Three sessions that say nothing. QUIC's idle timeout is the lower of
    // both sides': "short" asks for 1 s, "long" for none (the gateway's 30 s
    // applies), "direct" asks for 1 s and stays reachable.
    let one_second = Some(Duration::from_secs(1));
    let mut short =
        WtClient::connect(&quiet_client(&gw, format!("https://{}", short_relay.addr), "short", one_second)?).await?;
    let mut long = WtClient::connect(&quiet_client(&gw, format!("https://{}", long_relay.addr), "long", None)?).await?;
    let mut direct = WtClient::connect(&quiet_client(&gw, gw.wt_options()?.url, "direct", one_second)?).await?;
    direct.subscribe(wt_sub("idle/x")).await?;

    // Three times the shortest idle timeout of silence: the gateway's
    // keep-alives hold every session.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (name, c) in [("short", &mut short), ("long", &mut long), ("direct", &mut direct)] {
        let pong = c.request(client_frame::Frame::Ping(proto::Ping {})).await.with_context(|| name.to_string())?;
        assert_eq!(pong.frame, Some(server_frame::Frame::Pong(proto::Pong {})), "{name}");
    }

    // Both relayed peers vanish. The gateway drops each after the idle
    // timeout, without a close (nothing could reach the peer).
    let cut_at = Instant::now();
    short_relay.cut();
    long_relay.cut();
    eventually(WAIT, "the short session to be dropped", || async { !has_session(&gw, "short") }).await?;
    let short_gone = cut_at.elapsed();
    assert!(short_gone < Duration::from_secs(5), "short dropped after {short_gone:?}");
    assert!(has_session(&gw, "long"), "long dropped before the gateway's idle timeout");
    eventually(Duration::from_secs(45), "the long session to be dropped", || async { !has_session(&gw, "long") })
        .await?;
    let long_gone = cut_at.elapsed();
    assert!(long_gone >= Duration::from_secs(29), "long dropped after {long_gone:?}, under the 30 s floor");
    let short_end = tokio::time::timeout(WAIT, short.connection().closed()).await?;
    assert!(matches!(short_end, wtransport::error::ConnectionError::TimedOut), "short ended with {short_end:?}");

    // The quiet session that stayed reachable never noticed.
    let mut mate = gw.wt_client("mate").await?;
    mate.publish(wt_publish("idle/x", "still here")).await?;
    let mut stream = wt_accept(&direct).await?;
    assert_eq!(&wt_message(&mut stream).await?.payload[..], b"still here");
    Ok(())
}

/// A WebTransport session from `local` (another loopback address is
/// another client IP) as `client_id`, connected; returns its endpoint,
/// session and control stream.
async fn wt_from(
    local: IpAddr,
    gw: &TestGateway,
    client_id: &str,
) -> anyhow::Result<(
    wtransport::Endpoint<wtransport::endpoint::endpoint_side::Client>,
    wtransport::Connection,
    wtransport::SendStream,
    FrameReader,
)> {
    let opts = gw.wt_options()?;
    let CertCheck::Hash(hash) = opts.cert else { bail!("the test gateway's certificate has no hash") };
    let config = wtransport::ClientConfig::builder()
        .with_bind_address(SocketAddr::new(local, 0))
        .with_server_certificate_hashes([wtransport::tls::Sha256Digest::new(hash)])
        .build();
    let endpoint = wtransport::Endpoint::client(config)?;
    let conn = tokio::time::timeout(WAIT, endpoint.connect(opts.session_url())).await??;
    let (mut send, recv) = conn.open_bi().await?.await?;
    let mut control = FrameReader::new(recv);
    let connect = proto::Connect { client_id: client_id.into(), token: String::new() };
    send.write_all(&wt_framed(&proto::ClientFrame { req: 1, frame: Some(client_frame::Frame::Connect(connect)) }))
        .await?;
    let f = wt_next(&mut control).await?;
    anyhow::ensure!(matches!(f.frame, Some(server_frame::Frame::Connected(_))), "expected connected, got {f:?}");
    Ok((endpoint, conn, send, control))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wt_connections_per_ip_are_refused_at_the_quic_accept_for_that_ip_only() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|cfg| {
        with_quic(cfg);
        cfg.limits.max_connections_per_ip = 3;
    })
    .await?;
    let there: IpAddr = "127.0.0.2".parse()?;
    // 127.0.0.1 takes its three slots: two WebTransport sessions and a
    // WebSocket (the listeners share the count).
    let mut a = gw.wt_client("a").await?;
    let mut b = gw.wt_client("b").await?;
    b.subscribe(wt_sub("ip/#")).await?;
    let mut ws = WsClient::connect(&gw.ws, Codec::Json, "ws").await?;
    // A fourth from 127.0.0.1, on either listener: refused at accept.
    let err = open_session(&gw.wt_options()?).await.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("refused"), "WebTransport: expected the QUIC connection refused, got {err:?}");
    let err = raw_ws(&gw.ws, Some("switchboard.v1.json")).await.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("429"), "WebSocket: expected a 429 refusal, got {err:?}");
    let refused =
        metric(&gw, "switchboard_connections_refused_total", &[("listener", "quic"), ("reason", "per_ip")]).await?;
    assert!(refused >= 1.0, "QUIC refusals counted: {refused}");

    // Another IP is not affected.
    let (_endpoint, there_conn, mut there_send, mut there_control) = wt_from(there, &gw, "there").await?;
    let publish = client_frame::Frame::Publish(wt_publish("ip/there", "from there"));
    there_send.write_all(&wt_framed(&proto::ClientFrame { req: 2, frame: Some(publish) })).await?;
    let ack = wt_next(&mut there_control).await?;
    assert!(matches!(ack.frame, Some(server_frame::Frame::PublishAck(_))), "{ack:?}");
    // Nor are the sessions 127.0.0.1 holds.
    a.publish(wt_publish("ip/here", "still")).await?;
    ws.publish("ip/ws", b"still", "").await?;
    let mut got = Vec::new();
    while got.len() < 3 {
        let mut stream = wt_accept(&b).await?;
        got.push(wt_message(&mut stream).await?.channel);
    }
    got.sort();
    assert_eq!(got, ["ip/here", "ip/there", "ip/ws"]);
    there_conn.close(wtransport::VarInt::from_u32(0), b"bye");

    // A slot frees when a session ends.
    a.close();
    eventually(WAIT, "a slot to free", || async { gw.wt_client("c").await.map(drop).is_ok() }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wt_new_connections_per_second_are_refused_and_established_sessions_go_on() -> anyhow::Result<()> {
    // A burst of three, then one every ten seconds: none comes back during
    // the test.
    let gw = TestGateway::start_with(|cfg| {
        with_quic(cfg);
        cfg.limits.new_connections_per_sec = 0.1;
        cfg.limits.new_connections_burst = 3.0;
    })
    .await?;
    let mut first = gw.wt_client("first").await?;
    first.subscribe(wt_sub("rate/#")).await?;
    let (mut ok, mut refused, mut kept) = (1, 0, Vec::new());
    for i in 0..3 {
        match gw.wt_client(&format!("r{i}")).await {
            Ok(c) => {
                ok += 1;
                kept.push(c);
            }
            Err(e) => {
                assert!(e.to_string().contains("refused"), "{e}");
                refused += 1;
            }
        }
    }
    assert_eq!((ok, refused), (3, 1), "the burst, then the rate");
    // The TCP listeners share the bucket: HTTP 429.
    let err = raw_ws(&gw.ws, Some("switchboard.v1.json")).await.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("429"), "WebSocket: {err:?}");
    // The established sessions are not affected.
    for (i, c) in kept.iter_mut().enumerate() {
        c.publish(wt_publish(&format!("rate/{i}"), "fine")).await?;
    }
    for _ in 0..kept.len() {
        let mut stream = wt_accept(&first).await?;
        assert_eq!(&wt_message(&mut stream).await?.payload[..], b"fine");
    }
    let n = metric(&gw, "switchboard_connections_refused_total", &[("listener", "quic"), ("reason", "rate")]).await?;
    assert!(n >= 1.0, "refusals counted: {n}");
    Ok(())
}

/// #13 item 6: the node's history and retained values are bounded in bytes
/// (`limits.max_history_bytes`, `max_retained_bytes`): a publish that would
/// grow them further is refused — REST 503 `unavailable`, an MQTT 5
/// PUBACK failure — counted in `switchboard_limit_exceeded_total{limit}`,
/// while what the node holds shows in `switchboard_history_bytes` and
/// everyone else is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_and_retained_bytes_are_capped_per_node() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|cfg| {
        cfg.limits.max_history_bytes = 64 * 1024;
        cfg.limits.max_retained_bytes = 8 * 1024;
        // The bystanders' channels and the retained values' keep no
        // history, so they never hit its limit.
        let no_history = |pattern: &str| switchboard::edge::config::ChannelRuleConfig {
            pattern: pattern.into(),
            history_size: Some(0),
            history_ttl: None,
            slow_consumer: None,
        };
        cfg.channels.rules = vec![no_history("by/#"), no_history("keep/#")];
    })
    .await?;
    let mut by = Bystanders::join(&gw).await?;
    let body = "h".repeat(4000);
    let mut refused = None;
    for i in 0..40 {
        let (status, json) = rest_publish(&gw.http, &format!("fill/{i}"), body.clone(), &[]).await?;
        if status != 200 {
            refused = Some((status, json));
            break;
        }
    }
    let (status, json) = refused.context("no publish was refused")?;
    assert_eq!((status, json["error"]["code"].as_str()), (503, Some("unavailable")), "{json}");
    assert!(json["error"]["message"].as_str().unwrap_or_default().contains("bytes of history"), "{json}");
    let held = metric(&gw, "switchboard_limit_exceeded_total", &[("limit", "history_bytes")]).await?;
    assert!(held >= 1.0, "refusal counted: {held}");
    // Retained values: an MQTT 5 retained publish past the limit fails.
    let mut m = raw_mqtt(&gw, Ver::V5, "retainer", 60).await?;
    let mut reasons = Vec::new();
    for pkid in 1..=4u16 {
        let topic = format!("keep/retained/{pkid}");
        let mut retained = publish_packet(Ver::V5, topic.as_bytes(), 1, pkid, &[b'r'; 3000], &[]);
        retained[0] |= 1;
        m.send(&retained).await?;
        let p = next_reply(&mut m).await?;
        anyhow::ensure!(p.kind() == 4, "expected PUBACK, got {p:?}");
        reasons.push(p.body.get(2).copied().unwrap_or(0));
    }
    assert_eq!(&reasons[..2], &[0, 0], "two fit: {reasons:?}");
    assert!(reasons[2..].iter().all(|r| *r >= 0x80), "the rest are refused: {reasons:?}");
    let n = metric(&gw, "switchboard_limit_exceeded_total", &[("limit", "retained_bytes")]).await?;
    assert!(n >= 1.0, "refusal counted: {n}");
    by.still_served("history and retained bytes").await
}
