//! Anonymous clients in token mode (`[auth] anonymous_caps`, #13 item 16),
//! like a broker's anonymous ACL: a client that presents no credentials at
//! all — no token on WebSocket, WebTransport, SSE, long polling or REST, no
//! password on MQTT — is admitted with the anonymous caps under a generated
//! client id; an MQTT SUBSCRIBE outside them is refused filter by filter
//! (0x80 on 3.1.1, 0x87 on 5) while the others are granted. A bad token is
//! still refused, and without anonymous caps (the default) a client without
//! credentials is refused as before.

use super::common_auth;
use super::common_mqtt;
use super::common_sse;

use anyhow::{Context, bail};
use common_auth::*;
use common_mqtt::{Raw, RawPacket, Ver, connect_packet, disconnect_packet, mqtt_str, packet, varint};
use common_sse::{SseClient, poll_raw, sse_request};
use serde_json::json;
use switchboard::edge::config::Config;
use switchboard_proto::{self as proto, ErrorCode, client_frame, server_frame};
use switchboard_tests::*;
use tokio_tungstenite::tungstenite::Message;

/// Anyone may subscribe to `public/...` and read its history, and publish
/// to `inbox/anyone`; nothing else.
fn anonymous_caps(c: &mut Config) {
    c.auth.anonymous_caps =
        serde_json::from_value(json!({"public/#": "subscribe,history", "inbox/anyone": ["publish"]})).expect("caps");
}

/// A SUBSCRIBE of several `(filter, qos)` at once.
fn subscribe_many(ver: Ver, pkid: u16, filters: &[(&str, u8)]) -> Vec<u8> {
    let mut b = pkid.to_be_bytes().to_vec();
    if ver == Ver::V5 {
        varint(0, &mut b);
    }
    for (filter, qos) in filters {
        mqtt_str(filter.as_bytes(), &mut b);
        b.push(*qos);
    }
    packet(0x82, &b)
}

/// An MQTT connection without a password, asking for `client_id`; returns
/// the connection and its CONNACK.
async fn mqtt_anonymous(
    gw: &TestGateway,
    ver: Ver,
    client_id: &str,
    clean: bool,
    props: &[u8],
) -> anyhow::Result<(Raw, RawPacket)> {
    let mut r = Raw::connect(gw.mqtt).await?;
    let connect = connect_packet(ver.level(), client_id, 30, None, props);
    r.send(&if clean { connect } else { unclean(connect) }).await?;
    let connack = r.packet().await?.context("no CONNACK")?;
    Ok((r, connack))
}

/// The next PUBLISH on a raw connection (answering none).
async fn next_publish(r: &mut Raw) -> anyhow::Result<RawPacket> {
    loop {
        let p = r.packet().await?.context("closed")?;
        if p.kind() == 3 {
            return Ok(p);
        }
    }
}

fn error_of(f: &proto::ServerFrame) -> Option<ErrorCode> {
    match &f.frame {
        Some(server_frame::Frame::Error(e)) => Some(e.code()),
        _ => None,
    }
}

fn subscribe(filter: &str) -> client_frame::Frame {
    client_frame::Frame::Subscribe(proto::Subscribe { filter: filter.into(), ..Default::default() })
}

#[tokio::test]
async fn clients_without_credentials_get_the_anonymous_caps_on_every_protocol() -> anyhow::Result<()> {
    let gw = gateway_with(|c| {
        anonymous_caps(c);
        with_quic(c);
    })
    .await?;
    let mut publisher =
        WsClient::connect_with_token(&gw.ws, Codec::Json, &token("pub", 60, json!({"#": "publish"}))).await?;

    // WebSocket: a `connect` without a token; the requested id is ignored.
    let mut ws = WsClient::connect(&gw.ws, Codec::Json, "wanted").await?;
    let id = ws.connected.client_id.clone();
    assert!(id.starts_with("anon-") && id.len() == 21, "a generated id: {id}");
    let other = WsClient::connect(&gw.ws, Codec::Proto, "wanted").await?;
    assert_ne!(other.connected.client_id, id, "each anonymous client has an id of its own");
    ws.subscribe_to("public/a").await?;
    let refused = ws.request(subscribe("private/a")).await?;
    assert_eq!(error_of(&refused), Some(ErrorCode::PermissionDenied), "{refused:?}");
    let refused = ws.publish_frame(proto::Publish { channel: "public/a".into(), ..Default::default() }).await?;
    assert_eq!(error_of(&refused), Some(ErrorCode::PermissionDenied), "no publish cap: {refused:?}");

    // WebTransport: a session request without a token, then `connect`.
    let mut wt = gw.wt_client("").await?;
    assert!(wt.connected.client_id.starts_with("anon-"), "{:?}", wt.connected);
    wt.subscribe(proto::Subscribe { filter: "public/a".into(), ..Default::default() }).await?;

    // SSE and long polling without a token.
    let mut sse = SseClient::connect(&gw.http, "channel=public%2Fa", None).await?;
    assert!(sse.connected.client_id.starts_with("anon-"));
    let denied = sse_request(&gw.http, "channel=private%2Fa", None).await?;
    assert_eq!(denied.status(), 403);
    let (status, body) = poll_raw(&gw.http, "channel=public%2Fb&timeout=0").await?;
    assert_eq!(status, 200, "{body}");
    let (status, body) = poll_raw(&gw.http, "channel=private%2Fb&timeout=0").await?;
    assert_eq!(status, 403, "{body}");

    // REST without credentials: what the caps allow, 403 for the rest.
    let (status, body) = get_json(&format!("{}/v1/channels/public/a/history", gw.http)).await?;
    assert_eq!(status, 200, "{body}");
    let (status, body) = get_json(&format!("{}/v1/channels/private/a/history", gw.http)).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("permission_denied")), "{body}");
    let (status, body) = rest_publish(&gw.http, "public/a", "no", &[]).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("permission_denied")), "{body}");
    let (status, body) = rest_publish(&gw.http, "inbox/anyone", "a note", &[]).await?;
    assert_eq!(status, 200, "{body}");

    // MQTT without a password: admitted; SUBACK per filter.
    let mut mqtt = Vec::new();
    for (ver, refused) in [(Ver::V4, 0x80), (Ver::V5, 0x87)] {
        let (mut r, connack) = mqtt_anonymous(&gw, ver, "device-1", true, &[]).await?;
        assert_eq!(connack.connack_code(), Some(0), "{ver:?}: {connack:?}");
        r.send(&subscribe_many(ver, 1, &[("public/a", 1), ("private/b", 0), ("public/#", 2), ("#", 0)])).await?;
        let suback = r.packet().await?.context("no SUBACK")?;
        assert_eq!(suback_codes(&suback, ver.level()), Some(vec![1, refused, 2, refused]), "{ver:?}");
        mqtt.push(r);
    }

    // One publish reaches every anonymous subscriber.
    publisher.publish("public/a", b"hello", "").await?;
    assert_eq!(ws.next_message().await?.payload, "hello");
    assert_eq!(wt_message(&mut wt_accept(&wt).await?).await?.payload, "hello");
    assert_eq!(sse.next_message().await?.payload, "hello");
    for r in &mut mqtt {
        let p = next_publish(r).await?;
        assert!(p.body.ends_with(b"hello"), "{p:?}");
    }
    Ok(())
}

/// An anonymous MQTT client asking for another client's id gets an id of
/// its own: the token client is not taken over. And anonymous sessions are
/// never kept, whatever clean session / session expiry they ask: with room
/// for one stored session, anonymous clients coming and going do not push
/// out the token client's.
#[tokio::test]
async fn anonymous_mqtt_clients_take_no_ones_session_and_keep_none() -> anyhow::Result<()> {
    let gw = gateway_with(|c| {
        anonymous_caps(c);
        c.mqtt.max_sessions = 1;
    })
    .await?;
    let alice_token = token("alice", 60, json!({"public/#": "subscribe"}));
    let alice_connect = unclean(connect_with(4, "alice", 30, Some(&alice_token), None, None));
    let mut alice = Raw::connect(gw.mqtt).await?;
    alice.send(&alice_connect).await?;
    assert_eq!(alice.packet().await?.context("CONNACK")?.connack_code(), Some(0));
    alice.send(&subscribe_with(4, 1, "public/news", 0, &[])).await?;
    assert_eq!(suback_codes(&alice.packet().await?.context("SUBACK")?, 4), Some(vec![0]));

    let (mut anon, connack) = mqtt_anonymous(&gw, Ver::V4, "alice", false, &[]).await?;
    assert_eq!(connack.connack_code(), Some(0), "admitted under an id of its own");
    let mut publisher =
        WsClient::connect_with_token(&gw.ws, Codec::Json, &token("pub", 60, json!({"#": "publish"}))).await?;
    publisher.publish("public/news", b"still alice's", "").await?;
    let p = next_publish(&mut alice).await?;
    assert!(p.body.ends_with(b"still alice's"), "alice was not taken over: {p:?}");
    publisher.close().await?;
    alice.send(&disconnect_packet(Ver::V4, 0)).await?;
    alice.closed().await?;
    anon.send(&disconnect_packet(Ver::V4, 0)).await?;
    anon.closed().await?;

    // Clean session 0 (3.1.1) and a session expiry of an hour (5).
    let hour = [0x11, 0, 0, 0x0e, 0x10];
    for (ver, props) in [(Ver::V4, &[][..]), (Ver::V5, &hour[..])] {
        let (mut r, connack) = mqtt_anonymous(&gw, ver, "device-9", false, props).await?;
        assert_eq!(connack.connack_code(), Some(0), "{ver:?}");
        assert_eq!(connack.body[0] & 1, 0, "{ver:?}: no session present");
        r.send(&disconnect_packet(ver, 0)).await?;
        r.closed().await?;
    }
    // A session is released before its core session closes.
    eventually(WAIT, "every session to end", || async { gw.sessions() == 0 }).await?;

    let mut alice = Raw::connect(gw.mqtt).await?;
    alice.send(&alice_connect).await?;
    let connack = alice.packet().await?.context("CONNACK")?;
    assert_eq!((connack.connack_code(), connack.body[0] & 1), (Some(0), 1), "alice's session is still stored");
    Ok(())
}

/// A CONNECT with the clean session / clean start flag cleared.
fn unclean(mut connect: Vec<u8>) -> Vec<u8> {
    let at = connect.windows(4).position(|w| w == b"MQTT").expect("a CONNECT") + 5;
    connect[at] &= !0x02;
    connect
}

/// Anonymous is for clients without credentials: a bad token is refused
/// as always, on every protocol.
#[tokio::test]
async fn a_bad_token_is_refused_even_with_anonymous_caps() -> anyhow::Result<()> {
    let gw = gateway_with(anonymous_caps).await?;
    let bad = "not-a-token";

    let mut ws = raw_ws(&gw.ws, Some("switchboard.v1.json")).await?;
    let connect = json!({"type": "connect", "req": 1, "token": bad});
    futures_util::SinkExt::send(&mut ws, Message::text(connect.to_string())).await?;
    match tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut ws)).await? {
        Some(Ok(Message::Text(t))) => {
            let reply = proto::json::decode_server_frame(t.as_str())?;
            assert_eq!(error_of(&reply), Some(ErrorCode::Unauthorized), "{reply:?}");
        }
        other => bail!("WebSocket: {other:?}"),
    }
    for (level, code) in [(4, 0x04), (5, 0x86)] {
        let mut r = Raw::connect(gw.mqtt).await?;
        r.send(&connect_with(level, "x", 30, Some(bad), None, None)).await?;
        assert_eq!(r.closed().await?.only_connack(), Some(code), "MQTT level {level}");
    }
    assert_eq!(sse_request(&gw.http, &format!("channel=public%2Fa&token={bad}"), None).await?.status(), 401);
    let (status, _) = poll_raw(&gw.http, &format!("channel=public%2Fa&timeout=0&token={bad}")).await?;
    assert_eq!(status, 401);
    let resp = reqwest::Client::new()
        .get(format!("{}/v1/channels/public/a/history", gw.http))
        .header("authorization", format!("Bearer {bad}"))
        .send()
        .await?;
    assert_eq!(resp.status(), 401);
    Ok(())
}

/// Without `anonymous_caps` (the default) no credentials means no entry.
#[tokio::test]
async fn without_anonymous_caps_clients_without_credentials_are_refused() -> anyhow::Result<()> {
    let gw = gateway().await?;
    assert!(WsClient::connect(&gw.ws, Codec::Json, "wanted").await.is_err());
    for (ver, code) in [(Ver::V4, 0x04), (Ver::V5, 0x86)] {
        let (_r, connack) = mqtt_anonymous(&gw, ver, "device-1", true, &[]).await?;
        assert_eq!(connack.connack_code(), Some(code), "{ver:?}");
    }
    assert_eq!(sse_request(&gw.http, "channel=public%2Fa", None).await?.status(), 401);
    assert_eq!(poll_raw(&gw.http, "channel=public%2Fa&timeout=0").await?.0, 401);
    let (status, _) = get_json(&format!("{}/v1/channels/public/a/history", gw.http)).await?;
    assert_eq!(status, 401);
    Ok(())
}
