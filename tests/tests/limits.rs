//! Limits (docs/protocol.md, "Limits"): each triggers exactly its
//! documented reaction on every protocol it applies to, counts in its
//! metric, and leaves the connection (where the reaction says so) and every
//! other client working. Small configured limits keep the tests fast.
//!
//! Covered elsewhere, with bystanders: the WebSocket frame size (close 1009)
//! and WebSocket payload size (`bad_input.rs`); MQTT packet size (0x95),
//! connect timeout and keep alive on both versions (`mqtt_bad_input.rs`,
//! `mqtt.rs`); SSE / long-poll `max_stream_channels` and `max_query_len`
//! (`sse.rs`, `poll.rs`); REST body size 413 (`bad_input.rs`); slow
//! consumers (`slow_consumer.rs`).

mod common_mqtt;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use common_mqtt::{Mqtt, Raw, Ver, connect_packet, publish_packet, subscribe_packet};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use switchboard_proto::{self as proto, ErrorCode, Publish, client_frame, server_frame};
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
    let big = vec![b'x'; 1025];
    let fits = vec![b'y'; 1024];

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
    // The active ones go on, and still talk to each other.
    busy_ws.subscribe_to("idle/x").await?;
    busy_mqtt.send(&publish_packet(Ver::V5, b"idle/x", 1, 1, b"awake", &[])).await?;
    assert_eq!(next_reply(&mut busy_mqtt).await?.kind(), 4, "PUBACK");
    assert_eq!(&busy_ws.next_message().await?.payload[..], b"awake");
    Ok(())
}
