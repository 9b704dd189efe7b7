//! Idempotent publish and retained values across front ends: an id repeated
//! over WebSocket or REST (`Idempotency-Key`) is acknowledged as a duplicate
//! with the original serial and delivered once; a retained value is handed
//! to new subscribers first, on both codecs, until an empty retained publish
//! clears it.

use super::common_a;

use bytes::Bytes;
use common_a::*;
use switchboard_proto as proto;
use switchboard_tests::*;

fn ack(channel: &str, epoch: &str, serial: u64, duplicate: bool) -> proto::PublishAck {
    proto::PublishAck { channel: channel.into(), epoch: epoch.into(), serial, duplicate }
}

fn rest_ack(body: &serde_json::Value) -> proto::PublishAck {
    let (epoch, serial) = ack_position(body);
    let channel = body["channel"].as_str().unwrap_or_default();
    ack(channel, &epoch, serial, body["duplicate"].as_bool().unwrap_or_default())
}

async fn publish_retained(c: &mut WsClient, channel: &str, payload: &[u8]) -> anyhow::Result<proto::PublishAck> {
    let p = proto::Publish {
        channel: channel.into(),
        payload: Bytes::copy_from_slice(payload),
        retain: true,
        ..Default::default()
    };
    expect_ack(c.publish_frame(p).await?)
}

fn retained_sub(filter: &str) -> proto::Subscribe {
    proto::Subscribe { filter: filter.into(), retained: true, ..Default::default() }
}

#[tokio::test]
async fn a_repeated_id_is_acknowledged_and_delivered_once() -> anyhow::Result<()> {
    const CH: &str = "idem/orders";
    const OTHER: &str = "idem/other";
    let gw = TestGateway::start().await?;
    let rest = Rest::new(&gw.http);
    let (mut json_sub, mut proto_sub) = both_codecs(&gw.ws, CH, "sub").await?;
    let (mut other_json, mut other_proto) = both_codecs(&gw.ws, OTHER, "other").await?;
    let mut json_pub = WsClient::connect(&gw.ws, Codec::Json, "json-pub").await?;
    let mut proto_pub = WsClient::connect(&gw.ws, Codec::Proto, "proto-pub").await?;

    // WebSocket first, then REST and WebSocket again with the same id.
    let first = json_pub.publish(CH, b"first", "order-1").await?;
    let epoch = first.epoch.clone();
    assert_eq!(first, ack(CH, &epoch, 1, false));
    let (status, body) = rest.publish(CH, "again", &[("idempotency-key", "order-1")]).await?;
    assert_eq!((status, rest_ack(&body)), (200, ack(CH, &epoch, 1, true)), "{body}");
    assert_eq!(proto_pub.publish(CH, b"third time", "order-1").await?, ack(CH, &epoch, 1, true));

    // A different id is a different message.
    let (status, body) = rest.publish_json(CH, &serde_json::json!({"text": "second", "id": "order-2"}), &[]).await?;
    assert_eq!((status, rest_ack(&body)), (200, ack(CH, &epoch, 2, false)), "{body}");

    // REST first, then WebSocket.
    let (status, body) = rest.publish(CH, "third", &[("idempotency-key", "order-3")]).await?;
    assert_eq!((status, rest_ack(&body)), (200, ack(CH, &epoch, 3, false)), "{body}");
    assert_eq!(proto_pub.publish(CH, b"third again", "order-3").await?, ack(CH, &epoch, 3, true));
    let (status, body) = rest.publish_json(CH, &serde_json::json!({"text": "x", "id": "order-2"}), &[]).await?;
    assert_eq!((status, rest_ack(&body)), (200, ack(CH, &epoch, 2, true)), "{body}");

    // The same id on another channel is independent.
    let other = json_pub.publish(OTHER, b"elsewhere", "order-1").await?;
    assert_eq!((other.channel.as_str(), other.serial, other.duplicate), (OTHER, 1, false));
    assert_ne!(other.epoch, epoch);
    for sub in [&mut other_json, &mut other_proto] {
        let m = sub.next_message().await?;
        assert_eq!(
            (m.channel.as_str(), m.serial, &m.payload[..], m.id.as_str()),
            (OTHER, 1, &b"elsewhere"[..], "order-1")
        );
    }

    // Without an id nothing is deduplicated; published last as a sentinel.
    assert_eq!(json_pub.publish(CH, b"no id", "").await?, ack(CH, &epoch, 4, false));
    assert_eq!(json_pub.publish(CH, b"no id", "").await?, ack(CH, &epoch, 5, false));

    let want: [(u64, &[u8], &str); 5] = [
        (1, b"first", "order-1"),
        (2, b"second", "order-2"),
        (3, b"third", "order-3"),
        (4, b"no id", ""),
        (5, b"no id", ""),
    ];
    for (name, sub) in [("json", &mut json_sub), ("proto", &mut proto_sub)] {
        let got = sub.messages(want.len()).await?;
        let got: Vec<(u64, &[u8], &str)> = got.iter().map(|m| (m.serial, &m.payload[..], m.id.as_str())).collect();
        assert_eq!(got, want, "{name}");
    }
    Ok(())
}

#[tokio::test]
async fn retained_value_comes_first_on_both_codecs_until_cleared() -> anyhow::Result<()> {
    const CH: &str = "ret/temp";
    let gw = TestGateway::start().await?;
    let rest = Rest::new(&gw.http);
    let mut publisher = WsClient::connect(&gw.ws, Codec::Proto, "pub").await?;

    let v1 = publish_retained(&mut publisher, CH, b"21.5").await?;
    assert_eq!((v1.serial, v1.duplicate), (1, false));
    // A later retained publish over REST replaces it; plain publishes do not.
    let (status, body) = rest.publish_json(CH, &serde_json::json!({"text": "22.0", "retain": true}), &[]).await?;
    assert_eq!((status, body["serial"].as_u64()), (200, Some(2)), "{body}");
    assert_eq!(publisher.publish(CH, b"not retained", "").await?.serial, 3);

    let mut subs = Vec::new();
    for codec in [Codec::Json, Codec::Proto] {
        let mut sub = WsClient::connect(&gw.ws, codec, "late").await?;
        let subscribed = sub.subscribe(retained_sub(CH)).await?;
        assert_eq!(subscribed.channels.len(), 1);
        assert_eq!((subscribed.channels[0].serial, subscribed.channels[0].recovered), (3, false));
        let m = sub.next_message().await?;
        assert_eq!((m.serial, &m.payload[..], m.retain), (2, &b"22.0"[..], true), "{codec:?}");
        assert_eq!((m.channel.as_str(), m.epoch.as_str()), (CH, v1.epoch.as_str()), "{codec:?}");
        subs.push((codec, sub));
    }
    // Not asked for, not given.
    let mut plain = WsClient::connect(&gw.ws, Codec::Json, "plain").await?;
    plain.subscribe_to(CH).await?;

    // An empty retained publish clears the value (and is itself delivered).
    let cleared = publish_retained(&mut publisher, CH, b"").await?;
    assert_eq!(cleared.serial, 4);
    for (codec, sub) in &mut subs {
        let m = sub.next_message().await?;
        assert_eq!((m.serial, &m.payload[..], m.retain), (4, &b""[..], true), "{codec:?}");
    }
    let m = plain.next_message().await?;
    assert_eq!((m.serial, m.retain), (4, true), "a subscriber without retained gets no old value");

    let mut after = Vec::new();
    for codec in [Codec::Json, Codec::Proto] {
        let mut sub = WsClient::connect(&gw.ws, codec, "after-clear").await?;
        sub.subscribe(retained_sub(CH)).await?;
        after.push((codec, sub));
    }
    publisher.publish(CH, b"sentinel", "").await?;
    for (codec, sub) in &mut after {
        let m = sub.next_message().await?;
        assert_eq!((m.serial, &m.payload[..]), (5, &b"sentinel"[..]), "{codec:?}: retained value not cleared");
    }
    Ok(())
}

#[tokio::test]
async fn retained_values_of_every_matching_channel_through_a_wildcard() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let rest = Rest::new(&gw.http);
    let mut publisher = WsClient::connect(&gw.ws, Codec::Json, "pub").await?;
    publish_retained(&mut publisher, "rw/b", b"b-value").await?;
    let (status, body) =
        rest.publish_json("rw/a", &serde_json::json!({"text": "a-value", "retain": true}), &[]).await?;
    assert_eq!(status, 200, "{body}");
    publisher.publish("rw/c", b"no retained value", "").await?;
    publish_retained(&mut publisher, "other/d", b"not matching").await?;

    for codec in [Codec::Json, Codec::Proto] {
        let mut sub = WsClient::connect(&gw.ws, codec, "sub").await?;
        sub.subscribe(retained_sub("rw/+")).await?;
        let mut got: Vec<(String, Vec<u8>, bool)> =
            sub.messages(2).await?.into_iter().map(|m| (m.channel, m.payload.to_vec(), m.retain)).collect();
        got.sort();
        let want =
            vec![("rw/a".to_string(), b"a-value".to_vec(), true), ("rw/b".to_string(), b"b-value".to_vec(), true)];
        assert_eq!(got, want, "{codec:?}");
        publisher.publish("rw/c", b"sentinel", "").await?;
        let m = sub.next_message().await?;
        assert_eq!((m.channel.as_str(), &m.payload[..]), ("rw/c", &b"sentinel"[..]), "{codec:?}");
    }
    Ok(())
}

#[tokio::test]
async fn retained_and_rewind_together_never_deliver_a_message_twice() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let mut publisher = WsClient::connect(&gw.ws, Codec::Proto, "pub").await?;
    // (rewind count, serials expected): the retained serial 2 comes first
    // only when the rewind does not already include it.
    let cases: [(u32, &[u64]); 3] = [(3, &[1, 2, 3]), (2, &[2, 3]), (1, &[2, 3])];
    for codec in [Codec::Json, Codec::Proto] {
        for (count, want) in cases {
            let ch = format!("ret/rewind/{codec:?}/{count}");
            publisher.publish(&ch, b"one", "").await?;
            publish_retained(&mut publisher, &ch, b"two").await?;
            publisher.publish(&ch, b"three", "").await?;
            let mut sub = WsClient::connect(&gw.ws, codec, "sub").await?;
            let s = proto::Subscribe {
                filter: ch.clone(),
                retained: true,
                rewind: Some(proto::Rewind { count, duration_ms: 0 }),
                ..Default::default()
            };
            sub.subscribe(s).await?;
            let got: Vec<u64> = sub.messages(want.len()).await?.iter().map(|m| m.serial).collect();
            assert_eq!(got, want, "{codec:?} rewind {count}");
            publisher.publish(&ch, b"live", "").await?;
            let m = sub.next_message().await?;
            assert_eq!((m.serial, &m.payload[..]), (4, &b"live"[..]), "{codec:?} rewind {count}: extra message");
        }
    }
    Ok(())
}

#[tokio::test]
async fn an_overlong_idempotency_key_is_refused() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let rest = Rest::new(&gw.http);
    let long = "k".repeat(257);
    let (status, body) = rest.publish("idem/long", "x", &[("idempotency-key", &long)]).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("bad_request")), "{body}");
    // Nothing was published.
    let (status, h) = rest.get("/v1/channels/idem/long/history").await?;
    assert_eq!((status, h["serial"].as_u64().unwrap_or_default()), (200, 0), "{h}");
    let (status, body) = rest.publish("idem/long", "x", &[("idempotency-key", &long[..256])]).await?;
    assert_eq!((status, body["serial"].as_u64()), (200, Some(1)), "{body}");
    Ok(())
}
