//! #13 item 7: MQTT 5 wills with a delay. A client reconnecting in a loop
//! with a one-day will delay held one live core session per connection
//! (15 000 in 4.2 s from one client id), and a delayed will was published
//! after its connection's token had expired. Now a reconnect cancels the
//! waiting will at once, and a will whose token expired is not published.

use super::common_auth::*;
use super::common_mqtt::{Raw, mqtt_str, packet, varint};

use std::time::Duration;

use serde_json::json;
use switchboard_tests::*;

/// An MQTT 5 CONNECT with `token` as password, a session expiry and a
/// QoS 0 will on `will_topic` delayed by `delay_secs`.
fn connect_with_will(client_id: &str, token: &str, will_topic: &str, delay_secs: u32) -> Vec<u8> {
    let mut b = Vec::new();
    mqtt_str(b"MQTT", &mut b);
    b.push(5);
    b.push(0xC0 | 0x04 | 0x02); // username, password, will (QoS 0), clean start
    b.extend_from_slice(&60u16.to_be_bytes());
    let props = [&[0x11][..], &86_400u32.to_be_bytes()].concat(); // session expiry
    varint(props.len(), &mut b);
    b.extend_from_slice(&props);
    mqtt_str(client_id.as_bytes(), &mut b);
    let will_props = [&[0x18][..], &delay_secs.to_be_bytes()].concat(); // will delay
    varint(will_props.len(), &mut b);
    b.extend_from_slice(&will_props);
    mqtt_str(will_topic.as_bytes(), &mut b);
    mqtt_str(b"gone", &mut b);
    mqtt_str(b"user", &mut b);
    mqtt_str(token.as_bytes(), &mut b);
    packet(0x10, &b)
}

/// Connects, then leaves with DISCONNECT 0x04 (disconnect with will).
async fn connect_and_leave_with_will(gw: &TestGateway, packet: &[u8]) -> anyhow::Result<()> {
    let mut r = Raw::connect(gw.mqtt).await?;
    r.send(packet).await?;
    let connack = r.packet().await?.and_then(|p| p.connack_code());
    anyhow::ensure!(connack == Some(0), "CONNACK {connack:?}");
    r.send(&[0xE0, 0x01, 0x04]).await?;
    r.closed().await?;
    Ok(())
}

#[tokio::test]
async fn a_reconnect_loop_holds_one_waiting_will_not_one_per_connection() -> anyhow::Result<()> {
    let gw = gateway().await?;
    let t = token("looper", 60, json!({"wills/#": "publish"}));
    let packet = connect_with_will("looper", &t, "wills/looper", 86_400);
    for _ in 0..30 {
        connect_and_leave_with_will(&gw, &packet).await?;
    }
    let held = || gw.gateway.router.sessions().into_iter().filter(|s| s.client_id == "looper").count();
    eventually(WAIT, "the cancelled wills to let their sessions go", || async { held() <= 1 }).await?;
    Ok(())
}

#[tokio::test]
async fn a_delayed_will_is_not_published_once_its_token_expired() -> anyhow::Result<()> {
    let gw = gateway_with(|cfg| cfg.auth.leeway = Duration::ZERO).await?;
    let reader = token("reader", 60, json!({"wills/#": "subscribe"}));
    let mut sub = WsClient::connect_with_token(&gw.ws, Codec::Proto, &reader).await?;
    sub.subscribe_to("wills/#").await?;
    // Valid for a second; the will waits two.
    let short = token("brief", 1, json!({"wills/#": "publish"}));
    connect_and_leave_with_will(&gw, &connect_with_will("brief", &short, "wills/brief", 2)).await?;
    // Valid for a minute; the will waits one second: published.
    let long = token("lasting", 60, json!({"wills/#": "publish"}));
    connect_and_leave_with_will(&gw, &connect_with_will("lasting", &long, "wills/lasting", 1)).await?;
    let first = sub.next_message().await?;
    assert_eq!(first.channel, "wills/lasting");
    // Nothing else within four seconds (the expired one was due at two).
    let more = tokio::time::timeout(Duration::from_secs(4), sub.next_message()).await;
    assert!(more.is_err() || more.as_ref().is_ok_and(|m| m.is_err()), "a will after its token expired: {more:?}");
    Ok(())
}
