//! Limits: each triggers exactly its documented reaction and leaves the
//! connection (and every other client) working.

#[path = "common_mqtt/mod.rs"]
mod common_mqtt;

use common_mqtt::{Mqtt, Ver};
use switchboard_proto::{ErrorCode, Publish, server_frame};
use switchboard_tests::*;

#[tokio::test]
async fn publish_rate_is_a_token_bucket_per_connection() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|cfg| {
        cfg.limits.publish_rate = 0.5;
        cfg.limits.publish_burst = 5.0;
    })
    .await?;
    let mut ws = WsClient::connect(&gw.ws, Codec::Json, "fast").await?;
    let mut other = WsClient::connect(&gw.ws, Codec::Json, "calm").await?;
    for i in 0..5 {
        ws.publish("rl/a", format!("{i}").as_bytes(), "").await?;
    }
    let f = ws.publish_frame(Publish { channel: "rl/a".into(), ..Default::default() }).await?;
    let Some(server_frame::Frame::Error(e)) = f.frame else { anyhow::bail!("expected rate_limited, got {f:?}") };
    assert_eq!(e.code(), ErrorCode::RateLimited);
    // The connection stays usable, and the bucket is per connection.
    assert!(ws.subscribe_to("rl/a").await.is_ok());
    other.publish("rl/a", b"from another connection", "").await?;
    assert_eq!(&ws.next_message().await?.payload[..], b"from another connection");

    // MQTT 5: the sixth QoS 1 publish is acknowledged with 0x97 (quota exceeded).
    let mut m = Mqtt::connect(gw.mqtt, Ver::V5, "mqtt-fast").await?;
    for _ in 0..5 {
        assert_eq!(m.publish("rl/m", 1, false, "x").await?, 0);
    }
    assert_eq!(m.publish("rl/m", 1, false, "x").await?, 0x97);
    Ok(())
}

#[tokio::test]
async fn connections_per_ip_and_per_second_are_refused_at_accept() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|cfg| {
        cfg.limits.max_connections_per_ip = 2;
    })
    .await?;
    let a = WsClient::connect(&gw.ws, Codec::Json, "a").await?;
    let _b = WsClient::connect(&gw.ws, Codec::Json, "b").await?;
    // The third from the same IP: HTTP 429 before any WebSocket handshake.
    let refused = raw_ws(&gw.ws, Some("switchboard.v1.json")).await;
    let err = refused.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("429"), "expected a 429 refusal, got {err:?}");
    // MQTT shares the budget: refused (closed before CONNACK).
    assert!(Mqtt::connect(gw.mqtt, Ver::V5, "m").await.is_err());
    // A slot frees when a connection ends.
    a.close().await?;
    eventually(WAIT, "a slot to free", || async {
        WsClient::connect(&gw.ws, Codec::Json, "c").await.map(drop).is_ok()
    })
    .await?;

    let gw = TestGateway::start_with(|cfg| {
        cfg.limits.new_connections_per_sec = 0.5;
        cfg.limits.new_connections_burst = 3.0;
    })
    .await?;
    let mut ok = 0;
    let mut refused = 0;
    for i in 0..5 {
        match WsClient::connect(&gw.ws, Codec::Json, &format!("r{i}")).await {
            Ok(c) => {
                ok += 1;
                drop(c);
            }
            Err(e) => {
                assert!(e.to_string().contains("429"), "{e}");
                refused += 1;
            }
        }
    }
    assert_eq!((ok, refused), (3, 2), "the burst, then the rate");
    Ok(())
}
