//! Token auth (`[auth] mode = "token"`): one decision for every protocol.
//! A connection token's `sub` is the client id and its `caps` are checked by
//! the router for WebSocket, SSE, long polling, REST and MQTT alike; refresh
//! changes them in place; expiry closes the session with 4006.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use switchboard::auth::KeyConfig;
use switchboard::config::AuthMode;
use switchboard_proto::{ErrorCode, client_frame, server_frame};
use switchboard_tests::*;
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "test-secret-test-secret-test-secret!";

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn token(sub: &str, ttl: i64, caps: Value) -> String {
    token_with(SECRET, "k1", json!({"sub": sub, "exp": (now() as i64 + ttl), "caps": caps}))
}

fn token_with(secret: &str, kid: &str, claims: Value) -> String {
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some(kid.into());
    jsonwebtoken::encode(&h, &claims, &EncodingKey::from_secret(secret.as_bytes()).expect("key")).expect("encode")
}

async fn gateway() -> anyhow::Result<TestGateway> {
    TestGateway::start_with(|cfg| {
        cfg.auth.mode = AuthMode::Token;
        cfg.auth.leeway = Duration::ZERO;
        cfg.auth.keys = vec![KeyConfig {
            kid: Some("k1".into()),
            alg: "HS256".into(),
            secret: Some(SECRET.into()),
            ..Default::default()
        }];
        cfg.rest.api_keys = vec!["server-key".into()];
    })
    .await
}

/// Opens `/v1/ws` and sends `connect` with `token`; returns the first reply.
async fn ws_connect(gw: &TestGateway, token: &str) -> anyhow::Result<(RawWs, switchboard_proto::ServerFrame)> {
    let mut ws = raw_ws(&gw.ws, Some("switchboard.v1.json")).await?;
    let frame = json!({"type": "connect", "req": 1, "token": token, "client_id": "ignored"});
    futures_util::SinkExt::send(&mut ws, Message::text(frame.to_string())).await?;
    let reply = tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut ws)).await?;
    let Some(Ok(Message::Text(t))) = reply else { anyhow::bail!("no reply: {reply:?}") };
    Ok((ws, switchboard_proto::json::decode_server_frame(t.as_str())?))
}

async fn close_code(ws: &mut RawWs) -> anyhow::Result<u16> {
    loop {
        match tokio::time::timeout(WAIT, futures_util::StreamExt::next(ws)).await? {
            Some(Ok(Message::Close(Some(c)))) => return Ok(u16::from(c.code)),
            Some(Ok(_)) => continue,
            other => anyhow::bail!("no close frame: {other:?}"),
        }
    }
}

fn error_code(f: &switchboard_proto::ServerFrame) -> Option<ErrorCode> {
    match &f.frame {
        Some(server_frame::Frame::Error(e)) => Some(e.code()),
        _ => None,
    }
}

#[tokio::test]
async fn websocket_sessions_need_a_valid_token() -> anyhow::Result<()> {
    let gw = gateway().await?;
    let bad = [
        String::new(),
        token("u", -120, json!({})),
        token_with(SECRET, "k1", json!({"sub": "u", "exp": now() + 60, "nbf": now() + 600})),
        token_with("another-secret-another-secret-another", "k1", json!({"sub": "u", "exp": now() + 60})),
        token_with(SECRET, "k9", json!({"sub": "u", "exp": now() + 60})),
    ];
    for t in &bad {
        let (mut ws, reply) = ws_connect(&gw, t).await?;
        assert_eq!(error_code(&reply), Some(ErrorCode::Unauthorized), "token {t:?}: {reply:?}");
        assert_eq!(close_code(&mut ws).await?, 4001);
    }
    let (_ws, reply) = ws_connect(&gw, &token("alice", 60, json!({"chat/+": "subscribe"}))).await?;
    let Some(server_frame::Frame::Connected(c)) = reply.frame else { anyhow::bail!("{reply:?}") };
    assert_eq!(c.client_id, "alice", "the token's sub is the client id, not the requested one");
    Ok(())
}

#[tokio::test]
async fn caps_are_enforced_and_refresh_changes_them_live() -> anyhow::Result<()> {
    let gw = gateway().await?;
    let caps = json!({"chat/+": ["subscribe", "publish"], "rooms/#": "presence,history"});
    let mut c = WsClient::connect_with_token(&gw.ws, Codec::Json, &token("bob", 60, caps)).await?;
    let deny = |f: switchboard_proto::ServerFrame| error_code(&f) == Some(ErrorCode::PermissionDenied);

    assert!(c.subscribe_to("chat/a").await.is_ok());
    for filter in ["chat/a/b", "chat/#", "#", "$presence/chat/a"] {
        let f = c
            .request(client_frame::Frame::Subscribe(switchboard_proto::Subscribe {
                filter: filter.into(),
                ..Default::default()
            }))
            .await?;
        assert!(deny(f.clone()), "subscribe {filter}: {f:?}");
    }
    assert!(c.publish("chat/a", b"hi", "").await.is_ok());
    let f = c.publish_frame(switchboard_proto::Publish { channel: "other".into(), ..Default::default() }).await?;
    assert!(deny(f));
    let f = c
        .request(client_frame::Frame::PresenceEnter(switchboard_proto::PresenceEnter {
            channel: "chat/a".into(),
            data: Default::default(),
        }))
        .await?;
    assert!(deny(f));
    let f = c
        .request(client_frame::Frame::PresenceEnter(switchboard_proto::PresenceEnter {
            channel: "rooms/1".into(),
            data: Default::default(),
        }))
        .await?;
    assert!(error_code(&f).is_none(), "presence allowed on rooms/#: {f:?}");
    let f = c
        .request(client_frame::Frame::History(switchboard_proto::History {
            channel: "chat/a".into(),
            ..Default::default()
        }))
        .await?;
    assert!(deny(f));

    // Refresh narrows: publishing to chat/a is refused from now on.
    let narrower = token("bob", 60, json!({"chat/+": "subscribe"}));
    let f = c.request(client_frame::Frame::Refresh(switchboard_proto::Refresh { token: narrower })).await?;
    assert!(matches!(f.frame, Some(server_frame::Frame::Refreshed(_))), "{f:?}");
    let f = c.publish_frame(switchboard_proto::Publish { channel: "chat/a".into(), ..Default::default() }).await?;
    assert!(deny(f));
    // ... and widens.
    let wider = token("bob", 60, json!({"chat/#": ["subscribe", "publish"]}));
    c.request(client_frame::Frame::Refresh(switchboard_proto::Refresh { token: wider })).await?;
    assert!(c.publish("chat/a", b"again", "").await.is_ok());
    assert!(c.subscribe_to("chat/#").await.is_ok());
    // A token for someone else is refused; the session keeps its rights.
    let other = token("mallory", 60, json!({"#": "publish"}));
    let f = c.request(client_frame::Frame::Refresh(switchboard_proto::Refresh { token: other })).await?;
    assert_eq!(error_code(&f), Some(ErrorCode::Unauthorized));
    assert!(c.publish("chat/b", b"still", "").await.is_ok());
    Ok(())
}

#[tokio::test]
async fn expiry_without_refresh_closes_with_4006() -> anyhow::Result<()> {
    let gw = gateway().await?;
    let mut c = WsClient::connect_with_token(&gw.ws, Codec::Json, &token("eve", 2, json!({"x": "subscribe"}))).await?;
    assert_eq!(c.closed_with().await?, 4006);
    eventually(WAIT, "the expired session to end", || async { gw.sessions() == 0 }).await?;
    Ok(())
}

#[tokio::test]
async fn sse_poll_and_rest_use_the_same_tokens() -> anyhow::Result<()> {
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
    let r = http.get(format!("{}/v1/poll?channel=news/a&timeout=0", gw.http)).send().await?;
    assert_eq!(r.status(), 401);

    // REST: API key, or a bearer token with the right caps.
    let (status, _) = rest_publish(&gw.http, "news/a", "x", &[]).await?;
    assert_eq!(status, 401);
    let (status, _) = rest_publish(&gw.http, "news/a", "x", &[("x-api-key", "server-key")]).await?;
    assert_eq!(status, 200);
    let bearer = format!("Bearer {t}");
    let (status, body) = rest_publish(&gw.http, "news/a", "x", &[("authorization", &bearer)]).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("permission_denied")));
    let (status, _) = rest_publish(&gw.http, "inbox/carol", "x", &[("authorization", &bearer)]).await?;
    assert_eq!(status, 200);
    let r = http.get(format!("{}/v1/channels/news/a/history", gw.http)).bearer_auth(&t).send().await?;
    assert_eq!(r.status(), 200);
    let r = http.get(format!("{}/v1/channels/inbox/carol/history", gw.http)).bearer_auth(&t).send().await?;
    assert_eq!(r.status(), 403);
    Ok(())
}

#[tokio::test]
async fn mqtt_takes_the_token_as_password() -> anyhow::Result<()> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet};
    let gw = gateway().await?;
    let attempt = |password: String| {
        let mut opts = MqttOptions::new("device", gw.mqtt.ip().to_string(), gw.mqtt.port());
        opts.set_credentials("device", password);
        async move {
            let (_client, mut events) = AsyncClient::new(opts, 10);
            tokio::time::timeout(WAIT, events.poll()).await
        }
    };
    match attempt(token("dev-9", 60, json!({"sensors/9/#": "publish"}))).await? {
        Ok(Event::Incoming(Packet::ConnAck(ack))) => assert_eq!(ack.code, rumqttc::ConnectReturnCode::Success),
        other => anyhow::bail!("expected CONNACK success, got {other:?}"),
    }
    match attempt("not-a-token".into()).await? {
        Err(e) => assert!(format!("{e:?}").contains("BadUserNamePassword"), "{e:?}"),
        other => anyhow::bail!("expected a refusal, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn sse_streams_refresh_by_connection_id_or_expire_with_4006() -> anyhow::Result<()> {
    use eventsource_stream::Eventsource;
    use futures_util::StreamExt;
    let gw = gateway().await?;
    let caps = json!({"live/#": "subscribe", "live/x": "publish"});
    let open = |t: String| {
        let url = format!("{}/v1/sse?channel=live/x&token={t}", gw.http);
        async move { anyhow::Ok(reqwest::get(url).await?.bytes_stream().eventsource()) }
    };
    // Stream A is refreshed in time and survives its first token's expiry.
    let mut a = open(token("dana", 2, caps.clone())).await?;
    let connected = tokio::time::timeout(WAIT, a.next()).await?.expect("connected")?;
    let conn =
        serde_json::from_str::<Value>(&connected.data)?["connection_id"].as_str().unwrap_or_default().to_string();
    let http = reqwest::Client::new();
    let other = http
        .post(format!("{}/v1/refresh", gw.http))
        .header("x-connection-id", &conn)
        .bearer_auth(token("mallory", 60, caps.clone()))
        .send()
        .await?;
    assert_eq!(other.status(), 401, "a token for another client cannot refresh the stream");
    let ok = http
        .post(format!("{}/v1/refresh", gw.http))
        .json(&json!({"connection_id": conn, "token": token("dana", 60, caps.clone())}))
        .send()
        .await?;
    assert_eq!(ok.status(), 200);
    // Stream B is not refreshed: it ends with disconnect 4006.
    let mut b = open(token("erin", 2, caps.clone())).await?;
    tokio::time::timeout(WAIT, b.next()).await?.expect("connected")?;
    let ended = loop {
        let ev = tokio::time::timeout(WAIT, b.next()).await?.expect("an event")?;
        if ev.event == "disconnect" {
            break ev;
        }
    };
    assert_eq!(serde_json::from_str::<Value>(&ended.data)?["code"], 4006);
    // A is still live after its first token's expiry.
    let bearer = format!("Bearer {}", token("dana", 60, caps));
    let (status, _) = rest_publish(&gw.http, "live/x", "still here", &[("authorization", &bearer)]).await?;
    assert_eq!(status, 200);
    let msg = loop {
        let ev = tokio::time::timeout(WAIT, a.next()).await?.expect("an event")?;
        if ev.event != "connected" {
            break ev;
        }
    };
    assert_eq!(msg.event, "message", "{msg:?}");
    assert!(msg.data.contains("still here"));
    Ok(())
}
