//! Cross-protocol fan-out: whatever the publisher's protocol, every
//! subscriber — JSON or protobuf WebSocket — gets the same channel, the same
//! payload bytes and the same (epoch, serial); wildcard filters get exactly
//! the channels they match.

use super::common_a;

use common_a::*;
use switchboard_proto::{self as proto, payload};
use switchboard_tests::*;

/// Every byte value once, then a run of invalid UTF-8 (a lone continuation
/// byte, a truncated sequence, an overlong encoding, a surrogate, 0xFF).
fn binary_payloads() -> Vec<Vec<u8>> {
    let all: Vec<u8> = (0..=255u8).collect();
    let invalid = b"ok \x80 \xc3\x28 \xe2\x82 \xc0\xaf \xed\xa0\x80 \xff\xfe end".to_vec();
    assert!(std::str::from_utf8(&invalid).is_err());
    vec![all, invalid]
}

fn publisher_protocol(e: &proto::Envelope) -> proto::Protocol {
    e.publisher.as_ref().map_or(proto::Protocol::Unspecified, |p| p.protocol())
}

#[tokio::test]
async fn rest_and_ws_publishes_reach_both_codecs_identically() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let rest = Rest::new(&gw.http);
    let (mut json_sub, mut proto_sub) = both_codecs(&gw.ws, "fan/out", "sub").await?;
    let mut ws_pub = WsClient::connect(&gw.ws, Codec::Proto, "ws-pub").await?;
    let mut json_pub = WsClient::connect(&gw.ws, Codec::Json, "json-pub").await?;

    let (status, body) = rest.publish("fan/out", "from rest", &[("content-type", "text/plain")]).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["channel"], "fan/out");
    assert_eq!(body["duplicate"], false);
    let (epoch, rest_serial) = ack_position(&body);
    let ws_ack = ws_pub.publish("fan/out", b"from ws proto", "").await?;
    let json_ack = json_pub.publish("fan/out", b"from ws json", "").await?;
    assert_eq!((rest_serial, ws_ack.serial, json_ack.serial), (1, 2, 3));
    assert_eq!((ws_ack.epoch.as_str(), json_ack.epoch.as_str()), (epoch.as_str(), epoch.as_str()));
    assert_eq!((ws_ack.channel.as_str(), json_ack.channel.as_str()), ("fan/out", "fan/out"));

    let want = [
        ("from rest", 1, proto::Protocol::Rest, "text/plain"),
        ("from ws proto", 2, proto::Protocol::Ws, ""),
        ("from ws json", 3, proto::Protocol::Ws, ""),
    ];
    let from_json = json_sub.messages(3).await?;
    let from_proto = proto_sub.messages(3).await?;
    for (i, (payload, serial, protocol, content_type)) in want.into_iter().enumerate() {
        for m in [&from_json[i], &from_proto[i]] {
            assert_eq!(key(m), ("fan/out".to_string(), payload.as_bytes().to_vec(), epoch.clone(), serial));
            assert_eq!(m.prev_serial, serial - 1);
            assert_eq!(m.kind(), proto::Kind::Message);
            assert_eq!(publisher_protocol(m), protocol, "publisher of {payload:?}");
            assert_eq!(m.content_type, content_type, "content type of {payload:?}");
        }
        // Same timestamp and publisher on both encodings, not just the same payload.
        assert_eq!(from_json[i], from_proto[i], "message {i} differs between the encodings");
    }
    let ws_publisher = from_proto[1].publisher.clone().unwrap_or_default();
    assert_eq!(
        (ws_publisher.client_id.as_str(), ws_publisher.connection_id.as_str()),
        ("ws-pub", ws_pub.connected.connection_id.as_str())
    );
    Ok(())
}

#[tokio::test]
async fn binary_payloads_arrive_byte_identical_on_both_codecs() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let rest = Rest::new(&gw.http);
    let (mut json_sub, mut proto_sub) = both_codecs(&gw.ws, "bin", "sub").await?;
    let mut wire = RawJsonSub::subscribe(&gw.ws, "bin").await?;
    let mut proto_pub = WsClient::connect(&gw.ws, Codec::Proto, "proto-pub").await?;
    let mut json_pub = WsClient::connect(&gw.ws, Codec::Json, "json-pub").await?;

    let mut sent = Vec::new();
    for p in binary_payloads() {
        let (status, body) = rest.publish("bin", p.clone(), &[("content-type", "application/octet-stream")]).await?;
        assert_eq!(status, 200, "{body}");
        sent.push((p.clone(), ack_position(&body).1, "application/octet-stream"));

        let ack = proto_pub.publish("bin", &p, "").await?;
        sent.push((p.clone(), ack.serial, ""));

        // Hand-written JSON, so the payload really travels as data_b64.
        let frame = serde_json::json!({"type": "publish", "channel": "bin", "data_b64": payload::encode_b64(&p)});
        let ack = expect_ack(raw_json_request(&mut json_pub, frame).await?)?;
        sent.push((p, ack.serial, ""));
    }
    assert_eq!(sent.iter().map(|s| s.1).collect::<Vec<_>>(), (1..=6).collect::<Vec<_>>());

    let from_json = json_sub.messages(sent.len()).await?;
    let from_proto = proto_sub.messages(sent.len()).await?;
    for (i, (p, serial, content_type)) in sent.iter().enumerate() {
        for m in [&from_json[i], &from_proto[i]] {
            assert_eq!(m.serial, *serial);
            assert_eq!(&m.payload[..], &p[..], "payload of serial {serial}");
            assert_eq!(m.content_type, *content_type, "content type of serial {serial}");
        }
        assert_eq!(from_json[i], from_proto[i]);

        // On the JSON wire a binary payload is base64, never lossy text.
        let text = wire.next_text().await?;
        let v: serde_json::Value = serde_json::from_str(&text)?;
        assert_eq!((v["type"].as_str(), v["serial"].as_u64()), (Some("message"), Some(*serial)), "{text}");
        assert!(v.get("text").is_none() && v.get("data").is_none(), "binary payload not as data_b64: {text}");
        let b64 = v["data_b64"].as_str().unwrap_or_default();
        assert_eq!(payload::decode_b64(b64)?, *p, "data_b64 of serial {serial}");
    }
    Ok(())
}

#[tokio::test]
async fn json_payload_with_whitespace_arrives_verbatim() -> anyhow::Result<()> {
    const PAYLOAD: &str = r#"{"a": [1, 2]}"#;
    let gw = TestGateway::start().await?;
    let rest = Rest::new(&gw.http);
    let (mut json_sub, mut proto_sub) = both_codecs(&gw.ws, "verbatim", "sub").await?;
    let mut wire = RawJsonSub::subscribe(&gw.ws, "verbatim").await?;
    let mut proto_pub = WsClient::connect(&gw.ws, Codec::Proto, "proto-pub").await?;
    let mut json_pub = WsClient::connect(&gw.ws, Codec::Json, "json-pub").await?;

    // REST with a JSON body: `data` is taken verbatim, spaces included.
    let (status, body) =
        rest.publish("verbatim", format!(r#"{{"data": {PAYLOAD}}}"#), &[("content-type", "application/json")]).await?;
    assert_eq!((status, body["serial"].as_u64()), (200, Some(1)), "{body}");
    // REST with a raw body.
    let (status, body) = rest.publish("verbatim", PAYLOAD, &[("content-type", "text/plain")]).await?;
    assert_eq!((status, body["serial"].as_u64()), (200, Some(2)), "{body}");
    assert_eq!(proto_pub.publish("verbatim", PAYLOAD.as_bytes(), "").await?.serial, 3);
    let frame = format!(r#"{{"type":"publish","req":{RAW_REQ},"channel":"verbatim","data": {PAYLOAD}}}"#);
    assert_eq!(expect_ack(raw_text_request(&mut json_pub, frame).await?)?.serial, 4);

    let from_json = json_sub.messages(4).await?;
    let from_proto = proto_sub.messages(4).await?;
    for serial in 1..=4u64 {
        let i = serial as usize - 1;
        for m in [&from_json[i], &from_proto[i]] {
            assert_eq!((m.serial, &m.payload[..]), (serial, PAYLOAD.as_bytes()));
        }
        let text = wire.next_text().await?;
        assert!(text.contains(&format!(r#""data":{PAYLOAD}"#)), "payload not inlined verbatim: {text}");
        assert!(text.contains(&format!(r#""serial":{serial},"#)), "serial {serial} expected: {text}");
    }
    Ok(())
}

/// Channels published in the wildcard test, and whether `a/+/c` and `a/#`
/// match each.
const WILDCARD_CHANNELS: [(&str, bool, bool); 10] = [
    ("a/b/c", true, true),
    ("a/x/c", true, true),
    ("a/b", false, true),
    ("a", false, true),
    ("a/b/c/d", false, true),
    ("b/b/c", false, false),
    ("a/c", false, true),
    ("a//c", true, true),
    ("ab/b/c", false, false),
    ("b/a/c", false, false),
];

#[tokio::test]
async fn wildcard_subscribers_get_exactly_the_matching_channels() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let rest = Rest::new(&gw.http);
    let (mut plus_json, mut plus_proto) = both_codecs(&gw.ws, "a/+/c", "plus").await?;
    let (mut hash_json, mut hash_proto) = both_codecs(&gw.ws, "a/#", "hash").await?;
    let mut ws_pub = WsClient::connect(&gw.ws, Codec::Json, "pub").await?;

    for (i, (channel, _, _)) in WILDCARD_CHANNELS.iter().enumerate() {
        // Every other channel over REST; "a//c" (index 7) over WebSocket,
        // as a URL path with an empty segment is fragile.
        if i % 2 == 0 {
            rest.publish_ok(channel, channel.as_bytes()).await?;
        } else {
            ws_pub.publish(channel, channel.as_bytes(), "").await?;
        }
    }
    // Published last, after every other ack: it must be the next thing each
    // subscriber sees once it has its matching set.
    let sentinel = "a/end/c";
    ws_pub.publish(sentinel, b"sentinel", "").await?;

    let subs = [
        ("a/+/c json", &mut plus_json, true),
        ("a/+/c proto", &mut plus_proto, true),
        ("a/# json", &mut hash_json, false),
        ("a/# proto", &mut hash_proto, false),
    ];
    for (name, sub, plus) in subs {
        let mut want: Vec<&str> =
            WILDCARD_CHANNELS.iter().filter(|(_, p, h)| if plus { *p } else { *h }).map(|(c, _, _)| *c).collect();
        want.sort_unstable();
        let got = sub.messages(want.len()).await?;
        for m in &got {
            assert_eq!(&m.payload[..], m.channel.as_bytes(), "{name}: payload of {}", m.channel);
            assert_eq!((m.serial, m.prev_serial), (1, 0), "{name}: {} is a fresh channel", m.channel);
        }
        let mut channels: Vec<&str> = got.iter().map(|m| m.channel.as_str()).collect();
        channels.sort_unstable();
        assert_eq!(channels, want, "{name}");
        let next = sub.next_message().await?;
        assert_eq!((next.channel.as_str(), &next.payload[..]), (sentinel, &b"sentinel"[..]), "{name}: extra message");
    }
    Ok(())
}
