//! `$` topics are channels (devices moving from cloud IoT brokers publish to
//! `$aws/things/...`): MQTT 3.1.1, MQTT 5, WebSocket, REST and SSE publish
//! and subscribe them like any other channel, except that, as in MQTT
//! (§4.7.2), a filter starting with a wildcard does not match them. Only
//! the gateway's first levels `$SYS`, `$share` and `$presence` stay refused.

use super::common_mqtt::*;
use super::common_sse::{SseClient, channels_query};

use switchboard_proto::{self as proto, ErrorCode, server_frame};
use switchboard_tests::*;

const CH: &str = "$TopicA/B";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dollar_topics_are_channels_on_every_protocol() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let mut m5_sub = Mqtt::connect(gw.mqtt, Ver::V5, "dollar-sub5").await?;
    m5_sub.sub("$TopicA/#", 1).await?;
    let mut m4_sub = Mqtt::connect(gw.mqtt, Ver::V4, "dollar-sub4").await?;
    m4_sub.sub(CH, 1).await?;
    // Wildcards at the first level never reach a `$` channel.
    let mut m4_wild = Mqtt::connect(gw.mqtt, Ver::V4, "dollar-wild4").await?;
    m4_wild.sub("#", 1).await?;
    m4_wild.sub("+/B", 1).await?;
    let mut ws_sub = WsClient::connect(&gw.ws, Codec::Proto, "dollar-ws").await?;
    ws_sub.subscribe_to(CH).await?;
    let mut ws_wild = WsClient::connect(&gw.ws, Codec::Json, "dollar-ws-wild").await?;
    ws_wild.subscribe_to("#").await?;
    let mut sse = SseClient::connect(&gw.http, &channels_query(&["$TopicA/+"], &[]), None).await?;

    // One publish per protocol, each acknowledged (3.1.1 with a PUBACK on a
    // connection that stays open, MQTT 5 with reason 0x00).
    let mut m4 = Mqtt::connect(gw.mqtt, Ver::V4, "dollar-pub4").await?;
    m4.publish_ok(CH, 1, "from-311").await?;
    let mut m5 = Mqtt::connect(gw.mqtt, Ver::V5, "dollar-pub5").await?;
    m5.publish_ok(CH, 1, "from-5").await?;
    let mut ws = WsClient::connect(&gw.ws, Codec::Json, "dollar-ws-pub").await?;
    let ack = ws.publish(CH, b"from-ws", "").await?;
    assert_eq!((ack.channel.as_str(), ack.serial), (CH, 3));
    let (status, body) = rest_publish(&gw.http, CH, "from-rest", &[]).await?;
    assert_eq!((status, body["channel"].as_str(), body["serial"].as_u64()), (200, Some(CH), Some(4)), "{body}");

    let want = ["from-311", "from-5", "from-ws", "from-rest"];
    let got = m5_sub.msgs(4).await?;
    assert!(got.iter().all(|m| m.topic == CH), "{got:?}");
    assert_eq!(texts(&got), want, "MQTT 5 on $TopicA/#");
    assert_eq!(texts(&m4_sub.msgs(4).await?), want, "MQTT 3.1.1 on {CH}");
    let envs = ws_sub.messages(4).await?;
    assert_eq!(
        envs.iter().map(|e| (e.channel.as_str(), e.serial)).collect::<Vec<_>>(),
        [(CH, 1), (CH, 2), (CH, 3), (CH, 4)]
    );
    assert_eq!(envs.iter().map(|e| e.payload.as_ref()).collect::<Vec<_>>(), want.map(str::as_bytes));
    let events = sse.messages(4).await?;
    assert_eq!(events.iter().map(|e| e.payload.as_ref()).collect::<Vec<_>>(), want.map(str::as_bytes), "SSE");

    // A plain channel behind them: the wildcard subscribers' first message.
    ws.publish("plain/B", b"marker", "").await?;
    let first = m4_wild.next_msg().await?;
    assert_eq!((first.topic.as_str(), first.text().as_str()), ("plain/B", "marker"), "# and +/B skip {CH}");
    let first = ws_wild.next_message().await?;
    assert_eq!(first.channel, "plain/B", "# skips {CH}");

    // The client library's view: a `$` subscription on MQTT 5 also works
    // with a `+` below the first level.
    let mut m5_plus = Mqtt::connect(gw.mqtt, Ver::V5, "dollar-plus5").await?;
    m5_plus.sub("$TopicA/+", 0).await?;
    m5.publish_ok(CH, 0, "after").await?;
    assert_eq!(m5_plus.next_msg().await?.text(), "after");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_dollar_prefixes_keep_their_refusal() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    for topic in ["$SYS/broker/uptime", "$share/g/x", "$presence"] {
        // MQTT 5: DISCONNECT 0x90; MQTT 3.1.1: a plain close.
        for ver in VERSIONS {
            let mut r = Raw::handshake(gw.mqtt, ver, &format!("reserved-{ver:?}"), 30).await?;
            r.send(&publish_packet(ver, topic.as_bytes(), 1, 1, b"x", &[])).await?;
            let closed = r.closed().await?;
            match ver {
                Ver::V5 => assert_eq!(closed.only_disconnect(), Some(0x90), "{topic}: {closed:?}"),
                Ver::V4 => assert_eq!(closed.packets, [], "{topic}: 3.1.1 just closes"),
            }
        }
        let mut ws = WsClient::connect(&gw.ws, Codec::Json, "reserved-ws").await?;
        let p = proto::Publish { channel: topic.into(), payload: "x".into(), ..Default::default() };
        match ws.publish_frame(p).await?.frame {
            Some(server_frame::Frame::Error(e)) => assert_eq!(e.code(), ErrorCode::ReservedChannel, "{topic}"),
            other => panic!("{topic}: expected reserved_channel, got {other:?}"),
        }
        let (status, body) = rest_publish(&gw.http, topic, "x", &[]).await?;
        assert_eq!((status, body["error"]["code"].as_str()), (403, Some("reserved_channel")), "{topic}: {body}");
    }
    let mut m5 = Mqtt::connect(gw.mqtt, Ver::V5, "reserved-sub").await?;
    assert_eq!(m5.subscribe("$SYS/#", 1).await?, [0x87]);
    assert_eq!(m5.subscribe("$share/g/$SYS/#", 1).await?, [0x87]);
    // Shared subscriptions of `$` channels are fine.
    assert_eq!(m5.subscribe("$share/g/$TopicA/#", 1).await?, [1]);
    Ok(())
}
