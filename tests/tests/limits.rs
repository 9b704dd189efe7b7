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
