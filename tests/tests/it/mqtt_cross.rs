//! MQTT meets the other front ends on one set of channels: an MQTT publish
//! reaches WebSocket (JSON and proto), SSE and long-poll subscribers at one
//! (epoch, serial) with a byte-identical payload; WebSocket and REST
//! publishes reach MQTT subscribers at their subscription's QoS; MQTT
//! wildcard filters work both ways; MQTT over WebSocket (`/mqtt`) and MQTT
//! over TCP share a channel.

use super::common_mqtt;
use super::common_sse;

use bytes::{Bytes, BytesMut};
use common_mqtt::*;
use common_sse::{Sent, SseClient, channels_query, poll};
use futures_util::{SinkExt, StreamExt};
use rumqttc::mqttbytes::v4;
use switchboard_proto::Protocol;
use switchboard_tests::*;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_publish_reaches_ws_sse_and_poll_identically() -> anyhow::Result<()> {
    const CH: &str = "x/fan";
    let gw = TestGateway::start().await?;
    let mut ws_proto = WsClient::connect(&gw.ws, Codec::Proto, "ws-proto").await?;
    ws_proto.subscribe_to(CH).await?;
    let mut ws_json = WsClient::connect(&gw.ws, Codec::Json, "ws-json").await?;
    ws_json.subscribe_to(CH).await?;
    let mut sse = SseClient::connect(&gw.http, &channels_query(&[CH], &[]), None).await?;
    let start = poll(&gw.http, &channels_query(&[CH], &[("timeout", "0")])).await?;
    assert!(start.messages.is_empty(), "{start:?}");

    let mut m5 = Mqtt::connect(gw.mqtt, Ver::V5, "mq5").await?;
    let mut m4 = Mqtt::connect(gw.mqtt, Ver::V4, "mq4").await?;
    let sent: [(&str, Bytes); 4] = [
        ("mq5", Bytes::from_static(&[0x00, 0xff, 0xfe, 0x80, 0x0a, 0xc3])),
        ("mq5", Bytes::from_static("grüße, text".as_bytes())),
        ("mq5", Bytes::from_static(br#"{"a": [1, 2.50], "b":null}"#)),
        ("mq4", Bytes::from_static(&[0xc0, 0xc1, 0xf5, 0x01])),
    ];
    m5.publish_ok(CH, 1, sent[0].1.clone()).await?;
    m5.publish_ok(CH, 0, sent[1].1.clone()).await?;
    m5.publish_ok(CH, 2, sent[2].1.clone()).await?;
    m4.publish_ok(CH, 1, sent[3].1.clone()).await?;

    // The proto WebSocket subscriber is the reference.
    let reference = ws_proto.messages(4).await?;
    let epoch = reference[0].epoch.clone();
    assert!(!epoch.is_empty());
    for (i, (e, (who, payload))) in reference.iter().zip(&sent).enumerate() {
        assert_eq!((e.channel.as_str(), &e.payload, &e.epoch, e.serial), (CH, payload, &epoch, i as u64 + 1));
        let p = e.publisher.as_ref().expect("publisher");
        assert_eq!((p.client_id.as_str(), p.protocol()), (*who, Protocol::Mqtt));
    }
    let want: Vec<Sent> = reference.iter().map(Sent::of).collect();

    let json: Vec<Sent> = ws_json.messages(4).await?.iter().map(Sent::of).collect();
    assert_eq!(json, want, "WebSocket JSON");
    let events: Vec<Sent> = sse.messages(4).await?.iter().map(Sent::of).collect();
    assert_eq!(events, want, "SSE");
    let mut polled = Vec::new();
    let mut cursor = start.cursor;
    while polled.len() < 4 {
        let b = poll(&gw.http, &channels_query(&[CH], &[("cursor", &cursor), ("timeout", "5")])).await?;
        assert!(b.gaps.is_empty() && !b.messages.is_empty(), "{b:?}");
        polled.extend(b.messages.iter().map(Sent::of));
        cursor = b.cursor;
    }
    assert_eq!(polled, want, "long poll");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_and_rest_publishes_reach_mqtt_at_the_subscription_qos() -> anyhow::Result<()> {
    const CH: &str = "x/q";
    let gw = TestGateway::start().await?;
    let mut subs = Vec::new();
    for ver in VERSIONS {
        for q in 0..=2u8 {
            let mut s = Mqtt::connect(gw.mqtt, ver, &format!("sub-{ver:?}-{q}")).await?;
            s.sub(CH, q).await?;
            subs.push((q, s));
        }
    }
    let mut ws = WsClient::connect(&gw.ws, Codec::Proto, "ws-pub").await?;
    let binary = Bytes::from_static(&[0xff, 0x00, 0x80, 0x7f]);
    ws.publish(CH, &binary, "").await?;
    let (status, body) = rest_publish(&gw.http, CH, "from rest", &[("content-type", "text/plain")]).await?;
    assert_eq!(status, 200, "{body}");
    for (q, s) in &mut subs {
        let got: Vec<(String, Bytes, u8, bool)> =
            s.msgs(2).await?.into_iter().map(|m| (m.topic, m.payload, m.qos, m.retain)).collect();
        let want =
            [(CH.to_string(), binary.clone(), *q, false), (CH.into(), Bytes::from_static(b"from rest"), *q, false)];
        assert_eq!(got, want, "subscriber {}", s.id);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_filters_both_ways() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    // MQTT filters, REST publishes.
    let mut plus = Mqtt::connect(gw.mqtt, Ver::V4, "plus").await?;
    plus.sub("a/+/c", 1).await?;
    let mut hash = Mqtt::connect(gw.mqtt, Ver::V5, "hash").await?;
    hash.sub("a/#", 1).await?;
    for ch in ["a/b/c", "a/c", "a/b", "a", "a/x/c", "a/b/c/d", "b/a/c", "ab/x/c", "a/end/c"] {
        let (status, body) = rest_publish(&gw.http, ch, ch.to_string(), &[]).await?;
        assert_eq!(status, 200, "{ch}: {body}");
    }
    let topics =
        |msgs: Vec<Msg>| -> Vec<(String, String)> { msgs.into_iter().map(|m| (m.topic.clone(), m.text())).collect() };
    let pairs =
        |chs: &[&str]| -> Vec<(String, String)> { chs.iter().map(|c| (c.to_string(), c.to_string())).collect() };
    // `a/end/c` matches both and comes last: nothing else arrived before it.
    assert_eq!(topics(plus.msgs(3).await?), pairs(&["a/b/c", "a/x/c", "a/end/c"]));
    assert_eq!(topics(hash.msgs(7).await?), pairs(&["a/b/c", "a/c", "a/b", "a", "a/x/c", "a/b/c/d", "a/end/c"]));

    // A WebSocket filter, MQTT publishes.
    let mut ws = WsClient::connect(&gw.ws, Codec::Proto, "ws-sub").await?;
    ws.subscribe_to("s/#").await?;
    let mut p = Mqtt::connect(gw.mqtt, Ver::V5, "mq-pub").await?;
    for ch in ["s/1", "t/1", "s/2/x", "ss/1", "s", "s/end"] {
        p.publish_ok(ch, 1, ch.to_string()).await?;
    }
    let got: Vec<(String, Bytes)> = ws.messages(4).await?.into_iter().map(|e| (e.channel, e.payload)).collect();
    let want = ["s/1", "s/2/x", "s", "s/end"].map(|c| (c.to_string(), Bytes::from(c.to_string())));
    assert_eq!(got, want);
    Ok(())
}

/// An MQTT 3.1.1 client over `/mqtt`, with rumqttc's codec over
/// tokio-tungstenite binary messages.
struct MqttWs {
    ws: RawWs,
    buf: BytesMut,
}

impl MqttWs {
    async fn open(base: &str, subprotocol: Option<&str>) -> anyhow::Result<(RawWs, Option<String>)> {
        let mut req = format!("{base}/mqtt").into_client_request()?;
        if let Some(p) = subprotocol {
            req.headers_mut().insert("sec-websocket-protocol", p.parse()?);
        }
        let (ws, resp) = tokio_tungstenite::connect_async(req).await?;
        let proto = resp.headers().get("sec-websocket-protocol").and_then(|v| v.to_str().ok()).map(str::to_string);
        Ok((ws, proto))
    }

    /// Connects; the CONNECT is split over two WebSocket messages (MQTT
    /// §6: WebSocket is only framing).
    async fn connect(base: &str, id: &str) -> anyhow::Result<Self> {
        let (ws, proto) = Self::open(base, Some("mqtt")).await?;
        assert_eq!(proto.as_deref(), Some("mqtt"), "the server echoes the subprotocol");
        let mut c = MqttWs { ws, buf: BytesMut::new() };
        let mut connect = v4::Connect::new(id);
        connect.keep_alive = 30;
        let mut bytes = BytesMut::new();
        connect.write(&mut bytes)?;
        let tail = bytes.split_off(5);
        c.ws.send(Message::binary(bytes.freeze())).await?;
        c.ws.send(Message::binary(tail.freeze())).await?;
        match c.recv().await? {
            v4::Packet::ConnAck(a) => assert_eq!(a.code, v4::ConnectReturnCode::Success),
            other => anyhow::bail!("expected CONNACK, got {other:?}"),
        }
        Ok(c)
    }

    async fn send(
        &mut self,
        write: impl FnOnce(&mut BytesMut) -> Result<usize, rumqttc::mqttbytes::Error>,
    ) -> anyhow::Result<()> {
        let mut bytes = BytesMut::new();
        write(&mut bytes)?;
        self.ws.send(Message::binary(bytes.freeze())).await?;
        Ok(())
    }

    async fn recv(&mut self) -> anyhow::Result<v4::Packet> {
        loop {
            match v4::Packet::read(&mut self.buf, 1 << 20) {
                Ok(p) => return Ok(p),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => anyhow::bail!("bad packet from the server: {e}"),
            }
            let m = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .map_err(|_| anyhow::anyhow!("nothing from /mqtt within {WAIT:?}"))?;
            match m {
                Some(Ok(Message::Binary(b))) => self.buf.extend_from_slice(&b),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => anyhow::bail!("expected a binary message, got {other:?}"),
            }
        }
    }

    /// The next PUBLISH, acknowledged if QoS 1.
    async fn next_publish(&mut self) -> anyhow::Result<v4::Publish> {
        match self.recv().await? {
            v4::Packet::Publish(p) => {
                if p.qos == rumqttc::QoS::AtLeastOnce {
                    self.send(|b| v4::PubAck::new(p.pkid).write(b)).await?;
                }
                Ok(p)
            }
            other => anyhow::bail!("expected PUBLISH, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_websocket_and_tcp_share_a_channel() -> anyhow::Result<()> {
    const CH: &str = "mw/ch";
    let gw = TestGateway::start().await?;
    // The subprotocol is required.
    match MqttWs::open(&gw.ws, None).await {
        Err(e) => assert!(e.to_string().contains("400"), "{e}"),
        Ok(_) => panic!("/mqtt accepted a WebSocket without Sec-WebSocket-Protocol: mqtt"),
    }

    let mut over_ws = MqttWs::connect(&gw.ws, "over-ws").await?;
    over_ws.send(|b| v4::Subscribe::new(CH, rumqttc::QoS::AtLeastOnce).write(b)).await?;
    match over_ws.recv().await? {
        v4::Packet::SubAck(a) => {
            assert_eq!(a.return_codes, [v4::SubscribeReasonCode::Success(rumqttc::QoS::AtLeastOnce)])
        }
        other => anyhow::bail!("expected SUBACK, got {other:?}"),
    }
    let mut tcp = Mqtt::connect(gw.mqtt, Ver::V5, "over-tcp").await?;
    tcp.sub(CH, 1).await?;

    // WebSocket -> TCP (and back to itself: no no-local on 3.1.1).
    let mut p = v4::Publish::new(CH, rumqttc::QoS::AtLeastOnce, &[0x00, 0xff, b'w'][..]);
    p.pkid = 7;
    over_ws.send(|b| p.write(b)).await?;
    match over_ws.recv().await? {
        v4::Packet::PubAck(a) => assert_eq!(a.pkid, 7),
        other => anyhow::bail!("expected PUBACK, got {other:?}"),
    }
    let m = tcp.next_msg().await?;
    assert_eq!((m.topic.as_str(), &m.payload[..], m.qos), (CH, &[0x00, 0xff, b'w'][..], 1));
    let own = over_ws.next_publish().await?;
    assert_eq!((own.topic.as_str(), &own.payload[..]), (CH, &[0x00, 0xff, b'w'][..]));

    // TCP -> WebSocket.
    tcp.publish_ok(CH, 1, &b"from tcp"[..]).await?;
    let got = over_ws.next_publish().await?;
    assert_eq!((got.topic.as_str(), &got.payload[..], got.qos), (CH, &b"from tcp"[..], rumqttc::QoS::AtLeastOnce));
    assert_eq!(tcp.next_msg().await?.text(), "from tcp");

    Ok(())
}

/// `limits.write_delay` (write coalescing) changes when connections write,
/// never what they get: a burst published from MQTT reaches MQTT (QoS 0 and
/// 1), WebSocket, SSE and long-poll subscribers complete and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_delay_delivers_every_message_in_order_on_every_protocol() -> anyhow::Result<()> {
    const CH: &str = "x/coalesced";
    const N: usize = 40;
    let gw = TestGateway::start_with(|c| c.limits.write_delay = std::time::Duration::from_millis(20)).await?;
    let mut ws = WsClient::connect(&gw.ws, Codec::Proto, "ws-sub").await?;
    ws.subscribe_to(CH).await?;
    let mut sse = SseClient::connect(&gw.http, &channels_query(&[CH], &[]), None).await?;
    let start = poll(&gw.http, &channels_query(&[CH], &[("timeout", "0")])).await?;
    let mut q0 = Mqtt::connect(gw.mqtt, Ver::V4, "sub-q0").await?;
    q0.sub(CH, 0).await?;
    let mut q1 = Mqtt::connect(gw.mqtt, Ver::V5, "sub-q1").await?;
    q1.sub(CH, 1).await?;

    let sent = numbered("burst", N);
    let mut publisher = Mqtt::connect(gw.mqtt, Ver::V5, "pub").await?;
    publisher.publish_many(CH, 1, sent.clone()).await?;

    let want: Vec<String> = sent.iter().map(|p| String::from_utf8_lossy(p).into_owned()).collect();
    let text = |e: &switchboard_proto::Envelope| String::from_utf8_lossy(&e.payload).into_owned();
    assert_eq!(ws.messages(N).await?.iter().map(text).collect::<Vec<_>>(), want, "WebSocket");
    assert_eq!(sse.messages(N).await?.iter().map(text).collect::<Vec<_>>(), want, "SSE");
    assert_eq!(texts(&q0.msgs(N).await?), want, "MQTT QoS 0");
    assert_eq!(texts(&q1.msgs(N).await?), want, "MQTT QoS 1");
    let mut polled = Vec::new();
    let mut cursor = start.cursor;
    while polled.len() < N {
        let batch = poll(&gw.http, &channels_query(&[CH], &[("cursor", &cursor), ("timeout", "5")])).await?;
        polled.extend(batch.messages.iter().map(text));
        cursor = batch.cursor;
    }
    assert_eq!(polled, want, "long poll");
    Ok(())
}
