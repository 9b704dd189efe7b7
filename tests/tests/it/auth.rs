//! Token auth (`[auth] mode = "token"`): one decision for every protocol.
//! A connection token's `sub` is the client id and its `caps` are checked by
//! the router for WebSocket, SSE, long polling, REST and MQTT alike; an
//! in-session refresh (WebSocket `refresh` frame, MQTT 5 AUTH, `POST
//! /v1/refresh` for SSE and long-poll streams) changes them in place and
//! extends the session; without one, expiry ends the session with each
//! protocol's documented code. The full refusal and caps tables are in
//! `auth_matrix.rs`.

use super::common_auth;
use super::common_mqtt;

use std::time::Duration;

use common_auth::*;
use common_mqtt::{Raw, RawPacket, Ver, publish_packet};
use serde_json::{Value, json};
use switchboard_proto::{ErrorCode, client_frame, server_frame};
use switchboard_tests::*;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// Opens `/v1/ws` and sends `connect` with `token`; returns the first reply.
async fn ws_connect(gw: &TestGateway, token: &str) -> anyhow::Result<(RawWs, switchboard_proto::ServerFrame)> {
    let mut ws = raw_ws(&gw.ws, Some("switchboard.v1.json")).await?;
    let frame = json!({"type": "connect", "req": 1, "token": token, "client_id": "ignored"});
    futures_util::SinkExt::send(&mut ws, Message::text(frame.to_string())).await?;
    let reply = tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut ws)).await?;
    let Some(Ok(Message::Text(t))) = reply else { anyhow::bail!("no reply: {reply:?}") };
    Ok((ws, switchboard_proto::json::decode_server_frame(t.as_str())?))
}

fn error_code(f: &switchboard_proto::ServerFrame) -> Option<ErrorCode> {
    match &f.frame {
        Some(server_frame::Frame::Error(e)) => Some(e.code()),
        _ => None,
    }
}

fn refresh(token: String) -> client_frame::Frame {
    client_frame::Frame::Refresh(switchboard_proto::Refresh { token })
}

#[tokio::test]
async fn the_tokens_sub_is_the_client_id() -> anyhow::Result<()> {
    let gw = gateway().await?;
    let (_ws, reply) = ws_connect(&gw, &token("alice", 60, json!({"chat/+": "subscribe"}))).await?;
    let Some(server_frame::Frame::Connected(c)) = reply.frame else { anyhow::bail!("{reply:?}") };
    assert_eq!(c.client_id, "alice", "the token's sub is the client id, not the requested one");
    Ok(())
}

#[tokio::test]
async fn websocket_refresh_changes_caps_live() -> anyhow::Result<()> {
    let gw = gateway().await?;
    let caps = json!({"chat/+": ["subscribe", "publish"], "rooms/#": "presence,history"});
    let mut c = WsClient::connect_with_token(&gw.ws, Codec::Json, &token("bob", 60, caps)).await?;
    let deny = |f: switchboard_proto::ServerFrame| error_code(&f) == Some(ErrorCode::PermissionDenied);
    assert!(c.publish("chat/a", b"hi", "").await.is_ok());

    // Refresh narrows: publishing to chat/a is refused from now on.
    let f = c.request(refresh(token("bob", 60, json!({"chat/+": "subscribe"})))).await?;
    assert!(matches!(f.frame, Some(server_frame::Frame::Refreshed(_))), "{f:?}");
    let f = c.publish_frame(switchboard_proto::Publish { channel: "chat/a".into(), ..Default::default() }).await?;
    assert!(deny(f));
    // ... and widens.
    c.request(refresh(token("bob", 60, json!({"chat/#": ["subscribe", "publish"]})))).await?;
    assert!(c.publish("chat/a", b"again", "").await.is_ok());
    assert!(c.subscribe_to("chat/#").await.is_ok());
    // A token for someone else, or an invalid one, is refused; the session
    // keeps its rights.
    let refusals = [
        ("another client", token("mallory", 60, json!({"#": "publish"}))),
        ("expired", token("bob", -120, json!({"#": "publish"}))),
        ("alg: none", alg_none(&claims("bob", 60, json!({"#": "publish"})))),
        ("HS/RS confusion", hs_rs_confusion(&claims("bob", 60, json!({"#": "publish"})))),
    ];
    for (case, t) in refusals {
        let f = c.request(refresh(t)).await?;
        assert_eq!(error_code(&f), Some(ErrorCode::Unauthorized), "{case}");
        assert!(c.publish("chat/b", b"still", "").await.is_ok(), "{case}: rights kept");
        let f = c.publish_frame(switchboard_proto::Publish { channel: "other".into(), ..Default::default() }).await?;
        assert!(deny(f), "{case}: not widened");
    }
    Ok(())
}

/// An MQTT 5 connection that authenticated with the `jwt` method.
async fn mqtt_jwt(gw: &TestGateway, sub: &str, token: &str) -> anyhow::Result<Raw> {
    let mut r = Raw::connect(gw.mqtt).await?;
    r.send(&connect_with(5, sub, 60, None, Some("jwt"), Some(token))).await?;
    let p = r.packet().await?.ok_or_else(|| anyhow::anyhow!("closed instead of CONNACK"))?;
    anyhow::ensure!(p.connack_code() == Some(0), "CONNACK {p:?}");
    Ok(r)
}

/// The next packet that is not a PUBLISH (QoS 0 deliveries need no ack).
async fn next_reply(r: &mut Raw) -> anyhow::Result<RawPacket> {
    loop {
        let p = r.packet().await?.ok_or_else(|| anyhow::anyhow!("MQTT connection closed"))?;
        if p.kind() != 3 {
            return Ok(p);
        }
    }
}

/// Re-authenticates with AUTH 0x19 / `jwt` / `token`; returns the answer.
async fn reauth(r: &mut Raw, token: &str) -> anyhow::Result<RawPacket> {
    r.send(&auth_packet(0x19, Some("jwt"), Some(token))).await?;
    next_reply(r).await
}

async fn mqtt_publish(r: &mut Raw, pkid: u16, topic: &str) -> anyhow::Result<u8> {
    r.send(&publish_packet(Ver::V5, topic.as_bytes(), 1, pkid, b"x", &[])).await?;
    let p = next_reply(r).await?;
    puback_reason(&p).ok_or_else(|| anyhow::anyhow!("expected PUBACK, got {p:?}"))
}

async fn mqtt_subscribe(r: &mut Raw, pkid: u16, filter: &str) -> anyhow::Result<Vec<u8>> {
    r.send(&subscribe_with(5, pkid, filter, 0, &[])).await?;
    let p = next_reply(r).await?;
    suback_codes(&p, 5).ok_or_else(|| anyhow::anyhow!("expected SUBACK, got {p:?}"))
}

#[tokio::test]
async fn mqtt5_auth_reauthenticates_and_changes_caps_live() -> anyhow::Result<()> {
    let gw = gateway().await?;
    let mut r = mqtt_jwt(&gw, "dev-1", &token("dev-1", 60, json!({"chat/+": ["subscribe", "publish"]}))).await?;
    assert_eq!(mqtt_publish(&mut r, 1, "chat/a").await?, 0);
    assert_eq!(mqtt_subscribe(&mut r, 2, "chat/#").await?, [0x87]);

    // Narrower: AUTH 0x00 (method jwt), then publishing is not authorized.
    let p = reauth(&mut r, &token("dev-1", 60, json!({"chat/+": "subscribe"}))).await?;
    assert_eq!(parse_auth(&p), Some((0x00, Some("jwt".into()))), "{p:?}");
    assert_eq!(mqtt_publish(&mut r, 3, "chat/a").await?, 0x87);
    // Wider: both allowed.
    let p = reauth(&mut r, &token("dev-1", 60, json!({"chat/#": ["subscribe", "publish"]}))).await?;
    assert_eq!(parse_auth(&p), Some((0x00, Some("jwt".into()))));
    assert_eq!(mqtt_publish(&mut r, 4, "chat/a").await?, 0);
    assert_eq!(mqtt_subscribe(&mut r, 5, "chat/#").await?, [0]);

    // MQTT 5 §4.12.1: a failed re-authentication ends the connection.
    let refusals: [(&str, Vec<u8>, u8); 5] = [
        ("another client's token", auth_packet(0x19, Some("jwt"), Some(&token("mallory", 60, json!({})))), 0x87),
        ("expired token", auth_packet(0x19, Some("jwt"), Some(&token("dev-1", -120, json!({})))), 0x87),
        ("no token", auth_packet(0x19, Some("jwt"), None), 0x87),
        ("another method", auth_packet(0x19, Some("SCRAM-SHA-1"), Some("x")), 0x8C),
        ("no method", auth_packet(0x19, None, Some(&token("dev-1", 60, json!({})))), 0x82),
    ];
    let mut bystander = mqtt_jwt(&gw, "bystander", &token("bystander", 60, json!({"chat/#": "publish"}))).await?;
    for (case, auth, reason) in refusals {
        r.send(&auth).await?;
        let closed = r.closed().await?;
        assert_eq!(closed.packets.last().and_then(RawPacket::disconnect_reason), Some(reason), "{case}: {closed:?}");
        r = mqtt_jwt(&gw, "dev-1", &token("dev-1", 60, json!({"chat/+": "publish"}))).await?;
    }
    // A client that named no method at CONNECT cannot re-authenticate.
    let mut plain = Raw::connect(gw.mqtt).await?;
    plain.send(&connect_with(5, "plain", 60, Some(&token("plain", 60, json!({}))), None, None)).await?;
    assert_eq!(plain.packet().await?.and_then(|p| p.connack_code()), Some(0));
    plain.send(&auth_packet(0x19, Some("jwt"), Some(&token("plain", 60, json!({}))))).await?;
    assert_eq!(plain.closed().await?.only_disconnect(), Some(0x82));
    // At CONNECT: an unknown method is CONNACK 0x8C.
    let mut scram = Raw::connect(gw.mqtt).await?;
    scram.send(&connect_with(5, "scram", 60, None, Some("SCRAM-SHA-1"), Some("x"))).await?;
    assert_eq!(scram.closed().await?.only_connack(), Some(0x8C));
    // The others went on.
    assert_eq!(mqtt_publish(&mut bystander, 1, "chat/z").await?, 0);
    Ok(())
}

#[tokio::test]
async fn sse_and_poll_refusals_and_rest_tokens() -> anyhow::Result<()> {
    let gw = gateway().await?;
    let http = reqwest::Client::new();
    let t = token("carol", 60, json!({"news/#": ["subscribe", "history"], "inbox/carol": "publish"}));

    // SSE and long polling: token by query or bearer header; none → 401.
    let r = http.get(format!("{}/v1/sse?channel=news/a", gw.http)).send().await?;
    assert_eq!(r.status(), 401);
    let r = http.get(format!("{}/v1/sse?channel=news/a&token={t}", gw.http)).send().await?;
    assert_eq!(r.status(), 200);
    drop(r);
    let r = http.get(format!("{}/v1/sse?channel=secret", gw.http)).bearer_auth(&t).send().await?;
    assert_eq!(r.status(), 403, "caps decide SSE subscriptions too");
    let r = http.get(format!("{}/v1/poll?channel=news/%2B&timeout=0", gw.http)).bearer_auth(&t).send().await?;
    assert_eq!(r.status(), 200);

    // REST: API key, or a bearer token with the right caps.
    let (status, _) = rest_publish(&gw.http, "news/a", "x", &[]).await?;
    assert_eq!(status, 401);
    let (status, _) = rest_publish(&gw.http, "news/a", "x", &[("x-api-key", "wrong-key")]).await?;
    assert_eq!(status, 401);
    let (status, _) = rest_publish(&gw.http, "news/a", "x", &[("x-api-key", API_KEY)]).await?;
    assert_eq!(status, 200);
    let bearer = format!("Bearer {t}");
    let (status, body) = rest_publish(&gw.http, "news/a", "x", &[("authorization", &bearer)]).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("permission_denied")));
    let (status, _) = rest_publish(&gw.http, "inbox/carol", "x", &[("authorization", &bearer)]).await?;
    assert_eq!(status, 200);
    Ok(())
}

/// Opens an SSE stream; returns its events and connection id.
async fn sse_open(gw: &TestGateway, query: &str) -> anyhow::Result<(SseEvents, String)> {
    use eventsource_stream::Eventsource;
    use futures_util::StreamExt;
    let resp = reqwest::get(format!("{}/v1/sse?{query}", gw.http)).await?;
    anyhow::ensure!(resp.status() == 200, "SSE {query}: {}", resp.status());
    let mut events: SseEvents = Box::pin(resp.bytes_stream().eventsource());
    let connected = tokio::time::timeout(WAIT, events.next()).await?.ok_or_else(|| anyhow::anyhow!("no event"))??;
    let v: Value = serde_json::from_str(&connected.data)?;
    Ok((events, v["connection_id"].as_str().unwrap_or_default().to_string()))
}

type SseEvents = std::pin::Pin<
    Box<
        dyn futures_util::Stream<
                Item = Result<eventsource_stream::Event, eventsource_stream::EventStreamError<reqwest::Error>>,
            > + Send,
    >,
>;

/// The next SSE event other than keep-alives.
async fn sse_next(events: &mut SseEvents) -> anyhow::Result<eventsource_stream::Event> {
    let ev = tokio::time::timeout(WAIT, futures_util::StreamExt::next(events)).await?;
    Ok(ev.ok_or_else(|| anyhow::anyhow!("stream ended"))??)
}

/// `POST /v1/refresh` for a stream, by header and bearer; returns the status.
async fn refresh_stream(gw: &TestGateway, conn: &str, token: &str) -> anyhow::Result<u16> {
    let r = reqwest::Client::new()
        .post(format!("{}/v1/refresh", gw.http))
        .header("x-connection-id", conn)
        .bearer_auth(token)
        .send()
        .await?;
    Ok(r.status().as_u16())
}

/// A REST publish acting as the stream `conn` (the stream's caps and the
/// bearer's must both allow it).
async fn uplink(gw: &TestGateway, conn: &str, bearer: &str, channel: &str, body: &str) -> anyhow::Result<u16> {
    let r = reqwest::Client::new()
        .post(format!("{}/v1/channels/{channel}/messages", gw.http))
        .header("x-connection-id", conn)
        .bearer_auth(bearer)
        .body(body.to_string())
        .send()
        .await?;
    Ok(r.status().as_u16())
}

#[tokio::test]
async fn sse_refresh_by_connection_id_changes_caps_live() -> anyhow::Result<()> {
    let gw = gateway().await?;
    let first = token("dana", 60, json!({"live/#": "subscribe", "live/x": "publish"}));
    let (mut events, conn) = sse_open(&gw, &format!("channel=live/x&token={first}")).await?;
    assert_eq!(uplink(&gw, &conn, &first, "live/x", "one").await?, 200);

    // A token for another client cannot refresh the stream; an unknown
    // connection id is 404; the JSON body form works like the headers.
    let mallory = token("mallory", 60, json!({"#": "publish"}));
    assert_eq!(refresh_stream(&gw, &conn, &mallory).await?, 401);
    assert_eq!(refresh_stream(&gw, "node-1-999999", &first).await?, 404);
    // Narrower: the stream may no longer publish.
    assert_eq!(refresh_stream(&gw, &conn, &token("dana", 60, json!({"live/#": "subscribe"}))).await?, 200);
    assert_eq!(uplink(&gw, &conn, &first, "live/x", "refused").await?, 403);
    // Wider, by the JSON body.
    let wider = token("dana", 60, json!({"live/#": ["subscribe", "publish"]}));
    let r = reqwest::Client::new()
        .post(format!("{}/v1/refresh", gw.http))
        .json(&json!({"connection_id": conn, "token": wider}))
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await?, json!({"connection_id": conn, "refreshed": true}));
    assert_eq!(uplink(&gw, &conn, &first, "live/x", "two").await?, 200);
    assert_eq!(uplink(&gw, &conn, &wider, "live/y", "three").await?, 200, "live/# now");
    // The stream saw exactly the accepted publishes of its channel.
    for want in ["one", "two"] {
        let ev = sse_next(&mut events).await?;
        assert_eq!(ev.event, "message");
        assert!(ev.data.contains(want), "{ev:?}");
    }
    Ok(())
}

/// A presence request (`method` POST enters, DELETE leaves) acting as the
/// stream `conn`; returns the status and the error code, if any.
async fn uplink_presence(
    gw: &TestGateway,
    method: reqwest::Method,
    conn: &str,
    bearer: &str,
    channel: &str,
) -> anyhow::Result<(u16, Option<String>)> {
    let r = reqwest::Client::new()
        .request(method, format!("{}/v1/channels/{channel}/presence", gw.http))
        .header("x-connection-id", conn)
        .bearer_auth(bearer)
        .body("here")
        .send()
        .await?;
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    Ok((status, body["error"]["code"].as_str().map(str::to_string)))
}

/// Issue #13, item 11: a REST request that acts for a stream
/// (`X-Connection-Id`) is checked against its own credentials as well as the
/// stream's caps. A narrow token of the stream's own client cannot borrow
/// the stream's wider rights to publish, enter or leave presence; a token
/// that allows the operation can, and so can an API key (which may do
/// everything). The stream receives exactly the publishes that were allowed.
#[tokio::test]
async fn acting_for_a_stream_needs_the_requests_own_caps_too() -> anyhow::Result<()> {
    use reqwest::Method;
    let gw = gateway().await?;
    let wide = token("erin", 60, json!({"up/#": ["subscribe", "publish", "presence"]}));
    let narrow = token("erin", 60, json!({"up/#": "subscribe"}));
    let (mut events, conn) = sse_open(&gw, &format!("channel=up/x&token={wide}")).await?;

    let r = reqwest::Client::new()
        .post(format!("{}/v1/channels/up/x/messages", gw.http))
        .header("x-connection-id", &conn)
        .bearer_auth(&narrow)
        .body("borrowed")
        .send()
        .await?;
    assert_eq!(r.status(), 403, "the narrow token may not publish, whatever the stream may");
    let body: Value = r.json().await?;
    assert_eq!(body["error"]["code"], "permission_denied", "{body}");
    let denied = (403, Some("permission_denied".to_string()));
    assert_eq!(uplink_presence(&gw, Method::POST, &conn, &narrow, "up/x").await?, denied);
    assert_eq!(uplink_presence(&gw, Method::POST, &conn, &wide, "up/x").await?, (200, None));
    assert_eq!(uplink_presence(&gw, Method::DELETE, &conn, &narrow, "up/x").await?, denied);
    assert_eq!(uplink_presence(&gw, Method::DELETE, &conn, &wide, "up/x").await?, (200, None));

    assert_eq!(uplink(&gw, &conn, &wide, "up/x", "own").await?, 200);
    let (status, _) =
        rest_publish(&gw.http, "up/x", "key", &[("x-api-key", API_KEY), ("x-connection-id", conn.as_str())]).await?;
    assert_eq!(status, 200, "an API key may act for any stream");
    for want in ["own", "key"] {
        let ev = sse_next(&mut events).await?;
        assert_eq!(ev.event, "message", "{ev:?}");
        assert!(ev.data.contains(want) && !ev.data.contains("borrowed"), "{ev:?}");
    }
    Ok(())
}

/// Issue #13, item 13: a token with an `aud` claim is refused unless
/// `[auth] audience` names one of its values; then it is accepted on every
/// protocol (here WebSocket, REST and MQTT). Tokens without `aud` are
/// accepted either way.
#[tokio::test]
async fn tokens_with_an_audience_are_accepted_only_for_a_configured_one() -> anyhow::Result<()> {
    let caps = json!({"aud/#": ["subscribe", "publish"]});
    let with_aud = |aud: Value| {
        let mut c = claims("frank", 60, caps.clone());
        c["aud"] = aud;
        hs(&c)
    };
    let bearer = |t: &str| format!("Bearer {t}");
    let mqtt_connack = |gw: &TestGateway, t: String| {
        let addr = gw.mqtt;
        async move {
            let mut r = Raw::connect(addr).await?;
            r.send(&connect_with(5, "frank", 60, Some(&t), None, None)).await?;
            anyhow::Ok(r.packet().await?.and_then(|p| p.connack_code()))
        }
    };

    // No audience configured: refused, and the error says what to configure.
    let gw = gateway().await?;
    let t = with_aud(json!("switchboard"));
    let (status, body) = rest_publish(&gw.http, "aud/x", "x", &[("authorization", &bearer(&t))]).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (401, Some("unauthorized")), "{body}");
    assert!(body["error"]["message"].as_str().unwrap_or_default().contains("[auth] audience"), "{body}");
    let (_ws, reply) = ws_connect(&gw, &t).await?;
    assert_eq!(error_code(&reply), Some(ErrorCode::Unauthorized), "{reply:?}");
    assert_eq!(mqtt_connack(&gw, t).await?, Some(0x86));
    let (status, _) =
        rest_publish(&gw.http, "aud/x", "x", &[("authorization", &bearer(&token("frank", 60, caps.clone())))]).await?;
    assert_eq!(status, 200, "a token without aud is accepted");

    // Configured: one matching value is enough; others are refused.
    let gw = gateway_with(|c| c.auth.audience = vec!["switchboard".into(), "rt".into()]).await?;
    for aud in [json!("switchboard"), json!(["other", "rt"])] {
        let t = with_aud(aud.clone());
        let (status, body) = rest_publish(&gw.http, "aud/x", "x", &[("authorization", &bearer(&t))]).await?;
        assert_eq!(status, 200, "{aud}: {body}");
        let (_ws, reply) = ws_connect(&gw, &t).await?;
        assert!(matches!(reply.frame, Some(server_frame::Frame::Connected(_))), "{aud}: {reply:?}");
        assert_eq!(mqtt_connack(&gw, t).await?, Some(0), "{aud}");
    }
    for aud in [json!("other"), json!(["a", "b"])] {
        let t = with_aud(aud.clone());
        let (status, body) = rest_publish(&gw.http, "aud/x", "x", &[("authorization", &bearer(&t))]).await?;
        assert_eq!((status, body["error"]["code"].as_str()), (401, Some("unauthorized")), "{aud}: {body}");
        let (_ws, reply) = ws_connect(&gw, &t).await?;
        assert_eq!(error_code(&reply), Some(ErrorCode::Unauthorized), "{aud}: {reply:?}");
        assert_eq!(mqtt_connack(&gw, t).await?, Some(0x86), "{aud}");
    }
    let (status, _) =
        rest_publish(&gw.http, "aud/x", "x", &[("authorization", &bearer(&token("frank", 60, caps.clone())))]).await?;
    assert_eq!(status, 200, "a token without aud is still accepted");
    Ok(())
}

/// The poll session's connection id, from the admin API, once it is open.
async fn poll_connection_id(gw: &TestGateway) -> anyhow::Result<String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, v) = get_json(&format!("{}/v1/sessions", gw.admin)).await?;
        let poll = v["sessions"].as_array().into_iter().flatten().find(|s| s["protocol"] == "poll");
        if let Some(id) = poll.and_then(|s| s["connection_id"].as_str()) {
            return Ok(id.to_string());
        }
        anyhow::ensure!(Instant::now() < deadline, "no poll session within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// When a session opened now with a token of `ttl` seconds is surely closed
/// if not refreshed: `exp` counts whole seconds, the session ends once
/// the clock is past it (no leeway here), and the sweeper runs every second.
fn past_expiry(ttl: u64) -> Instant {
    Instant::now() + Duration::from_secs(ttl) + Duration::from_millis(3000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_extends_the_session_on_every_protocol() -> anyhow::Result<()> {
    let gw = gateway().await?;
    let caps = json!({"ext/#": ["subscribe", "publish"]});
    let short = |sub: &str| token(sub, 2, caps.clone());
    let long = |sub: &str| token(sub, 120, caps.clone());
    let deadline = past_expiry(2);

    let mut ws = WsClient::connect_with_token(&gw.ws, Codec::Json, &short("w")).await?;
    ws.subscribe_to("ext/ws").await?;
    let f = ws.request(refresh(long("w"))).await?;
    assert!(matches!(f.frame, Some(server_frame::Frame::Refreshed(_))), "{f:?}");

    let (mut sse, sse_conn) = sse_open(&gw, &format!("channel=ext/sse&token={}", short("s"))).await?;
    assert_eq!(refresh_stream(&gw, &sse_conn, &long("s")).await?, 200);

    let poll_url = format!("{}/v1/poll?channel=ext/poll&timeout=30", gw.http);
    let poll_token = short("p");
    let poll = tokio::spawn(async move { reqwest::Client::new().get(poll_url).bearer_auth(poll_token).send().await });
    let poll_conn = poll_connection_id(&gw).await?;
    assert_eq!(refresh_stream(&gw, &poll_conn, &long("p")).await?, 200);

    let mut mqtt = mqtt_jwt(&gw, "m", &short("m")).await?;
    assert_eq!(parse_auth(&reauth(&mut mqtt, &long("m")).await?), Some((0, Some("jwt".into()))));

    // Past the first tokens' expiry (and a sweep), every session still works.
    tokio::time::sleep_until(deadline).await;
    let bearer = format!("Bearer {}", long("w"));
    for channel in ["ext/ws", "ext/sse", "ext/poll"] {
        let (status, _) =
            rest_publish(&gw.http, channel, format!("after {channel}"), &[("authorization", &bearer)]).await?;
        assert_eq!(status, 200);
    }
    assert_eq!(&ws.next_message().await?.payload[..], b"after ext/ws");
    let ev = sse_next(&mut sse).await?;
    assert_eq!(ev.event, "message", "{ev:?}");
    assert!(ev.data.contains("after ext/sse"));
    let resp = tokio::time::timeout(WAIT, poll).await???;
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await?.contains("after ext/poll"), "the poll waited past its first token's expiry");
    assert_eq!(mqtt_publish(&mut mqtt, 1, "ext/mqtt").await?, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_without_refresh_ends_every_protocol_with_its_code() -> anyhow::Result<()> {
    let gw = gateway().await?;
    let caps = json!({"exp/#": ["subscribe", "publish"]});
    let short = |sub: &str| token(sub, 2, caps.clone());
    let started = Instant::now();
    let rest_token = short("r");

    let mut ws = WsClient::connect_with_token(&gw.ws, Codec::Json, &short("w")).await?;
    let (mut sse, _) = sse_open(&gw, &format!("channel=exp/sse&token={}", short("s"))).await?;
    let poll_token = short("p");
    let poll_url = format!("{}/v1/poll?channel=exp/poll&timeout=30", gw.http);
    let poll = {
        let (url, t) = (poll_url.clone(), poll_token.clone());
        tokio::spawn(async move { reqwest::Client::new().get(url).bearer_auth(t).send().await })
    };
    let mut mqtt5 = mqtt_jwt(&gw, "m5", &short("m5")).await?;
    let mut mqtt311 = Raw::connect(gw.mqtt).await?;
    mqtt311.send(&connect_with(4, "m4", 60, Some(&short("m4")), None, None)).await?;
    assert_eq!(mqtt311.packet().await?.and_then(|p| p.connack_code()), Some(0));

    // WebSocket: disconnect frame + close 4006.
    assert_eq!(ws.closed_with().await?, 4006);
    // SSE: a `disconnect` event with code 4006.
    let ended = loop {
        let ev = sse_next(&mut sse).await?;
        if ev.event == "disconnect" {
            break ev;
        }
    };
    let d: Value = serde_json::from_str(&ended.data)?;
    assert_eq!((d["code"].as_u64(), d["reconnect"].as_bool()), (Some(4006), Some(true)), "{d}");
    // Long polling: the waiting poll answers at once (nothing new, the same
    // position); the next poll with that token is 401.
    let resp = tokio::time::timeout(WAIT, poll).await???;
    assert_eq!(resp.status(), 200);
    let batch: Value = resp.json().await?;
    assert_eq!(batch["messages"], json!([]));
    assert!(started.elapsed() < Duration::from_secs(10), "answered at the expiry, not at the 30 s timeout");
    let again = reqwest::Client::new().get(&poll_url).bearer_auth(&poll_token).send().await?;
    assert_eq!(again.status(), 401);
    // MQTT 5: DISCONNECT 0xA0 (maximum connect time); 3.1.1: a plain close.
    assert_eq!(mqtt5.closed().await?.only_disconnect(), Some(0xA0));
    assert_eq!(mqtt311.closed().await?.packets, []);
    // REST has no session: the expired token is refused like any invalid one.
    let (status, body) =
        rest_publish(&gw.http, "exp/x", "x", &[("authorization", &format!("Bearer {rest_token}"))]).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (401, Some("unauthorized")));
    eventually(WAIT, "every expired session to end", || async { gw.sessions() == 0 }).await?;
    Ok(())
}
