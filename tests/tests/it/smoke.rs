//! The harness itself works: connect, subscribe, publish, receive.

use switchboard_tests::*;

#[tokio::test]
async fn ws_round_trip() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let mut sub = WsClient::connect(&gw.ws, Codec::Json, "s").await?;
    sub.subscribe_to("hello").await?;
    let mut p = WsClient::connect(&gw.ws, Codec::Proto, "p").await?;
    let ack = p.publish("hello", b"world", "").await?;
    let m = sub.next_message().await?;
    assert_eq!(
        (m.channel.as_str(), &m.payload[..], m.serial, m.epoch.as_str()),
        ("hello", &b"world"[..], ack.serial, ack.epoch.as_str())
    );
    Ok(())
}
