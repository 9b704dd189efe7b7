//! MQTT 3.1.1 and 5 with rumqttc (and a raw socket where rumqttc cannot
//! misbehave on purpose) against the real gateway: QoS 0/1/2 round trips,
//! retained values, wills, persistent sessions that resume exactly once,
//! shared subscriptions, topic aliases both ways, the packet size limit,
//! and the MQTT 5 mappings onto the envelope — user properties as headers,
//! the `id` property as idempotency key, the `rewind` subscription property
//! and `$presence/<channel>`.

use super::common_mqtt;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use common_mqtt::*;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use serde_json::json;
use switchboard_proto::{self as proto, Kind, Protocol, client_frame, server_frame};
use switchboard_tests::*;

/// A binary, non-UTF-8 payload tagged with `tag`.
fn binary(tag: u8) -> Bytes {
    Bytes::from(vec![0x00, 0xff, 0xfe, 0x80, tag, b'\n', 0xc3])
}

/// (topic, payload, qos, retain) of a message.
fn summary(m: &Msg) -> (String, Bytes, u8, bool) {
    (m.topic.clone(), m.payload.clone(), m.qos, m.retain)
}

/// A publisher of `ver` sends one message at each QoS; subscribers of both
/// versions at each QoS get all three, byte-identical, at min(pub, sub).
async fn qos_round_trips(ver: Ver) -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let topic = format!("rt/{ver:?}");
    let mut subs = Vec::new();
    for sub_ver in VERSIONS {
        for q in 0..=2u8 {
            let mut s = Mqtt::connect(gw.mqtt, sub_ver, &format!("sub-{sub_ver:?}-{q}")).await?;
            s.sub(&topic, q).await?;
            subs.push((q, s));
        }
    }
    let mut publisher = Mqtt::connect(gw.mqtt, ver, "pub").await?;
    for q in 0..=2u8 {
        assert_eq!(publisher.publish(&topic, q, false, binary(q)).await?, 0, "ack of the QoS {q} publish");
    }
    for (sub_q, s) in &mut subs {
        let got: Vec<_> = s.msgs(3).await?.iter().map(summary).collect();
        let want: Vec<_> = (0..=2u8).map(|q| (topic.clone(), binary(q), q.min(*sub_q), false)).collect();
        assert_eq!(got, want, "subscriber {}", s.id);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_round_trips_v311() -> anyhow::Result<()> {
    qos_round_trips(Ver::V4).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_round_trips_v5() -> anyhow::Result<()> {
    qos_round_trips(Ver::V5).await
}

/// A retained publish reaches live subscribers with RETAIN 0 and new ones
/// with RETAIN 1; the latest replaces it; an empty retained publish clears
/// it, so a later subscriber's first message is the next live one.
async fn retained_set_and_clear(ver: Ver) -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let topic = format!("ret/{ver:?}");
    let mut live = Mqtt::connect(gw.mqtt, ver, "live").await?;
    live.sub(&topic, 1).await?;
    let mut publisher = Mqtt::connect(gw.mqtt, ver, "pub").await?;
    for v in ["r1", "r2"] {
        assert_eq!(publisher.publish(&topic, 1, true, v).await?, 0);
    }
    let got: Vec<_> = live.msgs(2).await?.iter().map(summary).collect();
    let live_msg = |p: &'static str| (topic.clone(), Bytes::from_static(p.as_bytes()), 1, false);
    assert_eq!(got, [live_msg("r1"), live_msg("r2")], "live subscribers get RETAIN 0");

    let mut early = Mqtt::connect(gw.mqtt, ver, "early").await?;
    early.sub(&topic, 2).await?;
    let m = early.next_msg().await?;
    assert_eq!(summary(&m), (topic.clone(), Bytes::from_static(b"r2"), 1, true), "the retained value, RETAIN 1");

    // Clear: an empty retained publish, delivered to current subscribers as
    // a normal (empty) message.
    assert_eq!(publisher.publish(&topic, 1, true, Bytes::new()).await?, 0);
    assert_eq!(summary(&live.next_msg().await?), live_msg(""));
    assert_eq!(summary(&early.next_msg().await?), live_msg(""));

    let mut late = Mqtt::connect(gw.mqtt, ver, "late").await?;
    late.sub(&topic, 1).await?;
    publisher.publish_ok(&topic, 1, "after").await?;
    assert_eq!(summary(&late.next_msg().await?), live_msg("after"), "no retained value after the clear");
    assert_eq!(summary(&live.next_msg().await?), live_msg("after"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_set_and_clear_v311() -> anyhow::Result<()> {
    retained_set_and_clear(Ver::V4).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_set_and_clear_v5() -> anyhow::Result<()> {
    retained_set_and_clear(Ver::V5).await
}

/// The will is published when the TCP connection drops without DISCONNECT
/// and discarded on a clean DISCONNECT (MQTT 5: published on DISCONNECT
/// 0x04).
async fn will(ver: Ver) -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let base = format!("will/{ver:?}");
    let mut watcher = Mqtt::connect(gw.mqtt, Ver::V5, "watcher").await?;
    watcher.sub(&format!("{base}/#"), 1).await?;
    let with_will = async |id: &str, topic: &str, payload: &[u8]| {
        let mut r = Raw::connect(gw.mqtt).await?;
        let w = Will { topic, payload, qos: 1 };
        r.send(&connect_packet(ver.level(), id, 30, Some(w), &[])).await?;
        let p = r.packet().await?.ok_or_else(|| anyhow::anyhow!("closed instead of CONNACK"))?;
        assert_eq!(p.connack_code(), Some(0), "{p:?}");
        anyhow::Ok(r)
    };

    let abrupt = with_will("dropper", &format!("{base}/abrupt"), b"gone").await?;
    abrupt.drop_abruptly();
    let m = watcher.next_msg().await?;
    assert_eq!(summary(&m), (format!("{base}/abrupt"), Bytes::from_static(b"gone"), 1, false));

    let mut clean = with_will("leaver", &format!("{base}/clean"), b"must not appear").await?;
    clean.send(&disconnect_packet(ver, 0x00)).await?;
    assert_eq!(clean.closed().await?.packets, [], "nothing but a close after DISCONNECT");
    // The will (if any) is published before the core session closes.
    eventually(WAIT, "the DISCONNECTed session to end", || async { gw.sessions() == 1 }).await?;

    if ver == Ver::V5 {
        let mut with = with_will("asker", &format!("{base}/asked"), b"asked for").await?;
        with.send(&disconnect_packet(ver, 0x04)).await?;
        assert_eq!(with.closed().await?.packets, []);
        let m = watcher.next_msg().await?;
        assert_eq!(summary(&m), (format!("{base}/asked"), Bytes::from_static(b"asked for"), 1, false));
    }
    let (status, _) = rest_publish(&gw.http, &format!("{base}/sentinel"), "end", &[]).await?;
    assert_eq!(status, 200);
    let m = watcher.next_msg().await?;
    assert_eq!((m.topic.as_str(), m.text().as_str()), (format!("{base}/sentinel").as_str(), "end"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_on_abrupt_drop_not_on_disconnect_v311() -> anyhow::Result<()> {
    will(Ver::V4).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_on_abrupt_drop_not_on_disconnect_v5() -> anyhow::Result<()> {
    will(Ver::V5).await
}

/// A persistent session subscribed at `qos` goes away (clean DISCONNECT),
/// misses 500 messages, and comes back: session present, all 500 exactly
/// once and in order at `qos`, then live messages.
async fn persistent_session(ver: Ver, qos: u8) -> anyhow::Result<()> {
    const N: usize = 500;
    let gw = TestGateway::start().await?;
    let ch = format!("ps/{ver:?}/{qos}");
    let opts = Opts {
        clean: ver == Ver::V5,
        session_expiry: (ver == Ver::V5).then_some(300),
        ..Opts::new(ver, &format!("persist-{ver:?}-{qos}"))
    };
    let mut s = Mqtt::connect_with(gw.mqtt, opts.clone()).await?;
    assert!(!s.session_present);
    s.sub(&ch, qos).await?;
    // The publisher's QoS caps delivery: publish at the subscription's.
    let mut publisher = Mqtt::connect(gw.mqtt, Ver::V5, "publisher").await?;
    publisher.publish_many(&ch, qos, numbered("before", 2)).await?;
    assert_eq!(texts(&s.msgs(2).await?), ["before0", "before1"]);
    if qos == 2 {
        // Else the gateway rightly resends PUBREL on resume, which a new
        // rumqttc client refuses (it lost the packet ids).
        s.wait_pubcomps(2).await?;
    }
    s.disconnect().await?;
    eventually(WAIT, "the subscriber's connection to end", || async { gw.sessions() == 1 }).await?;

    publisher.publish_many(&ch, qos, numbered("m", N)).await?;
    let mut s = Mqtt::connect_with(gw.mqtt, Opts { clean: false, ..opts }).await?;
    assert!(s.session_present, "CONNACK session present");
    let got = s.msgs(N).await?;
    let want: Vec<String> = (0..N).map(|i| format!("m{i}")).collect();
    assert_eq!(texts(&got), want);
    assert!(got.iter().all(|m| m.topic == ch && m.qos == qos && !m.retain), "{:?}", &got[0]);

    publisher.publish_ok(&ch, qos, "live").await?;
    let m = s.next_msg().await?;
    assert_eq!((m.text().as_str(), m.qos), ("live", qos), "the next message is live: nothing twice");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_session_qos1_v311() -> anyhow::Result<()> {
    persistent_session(Ver::V4, 1).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_session_qos2_v311() -> anyhow::Result<()> {
    persistent_session(Ver::V4, 2).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_session_qos1_v5() -> anyhow::Result<()> {
    persistent_session(Ver::V5, 1).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_session_qos2_v5() -> anyhow::Result<()> {
    persistent_session(Ver::V5, 2).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscription_spreads_without_loss_or_duplicates() -> anyhow::Result<()> {
    const N: usize = 30;
    let gw = TestGateway::start().await?;
    let mut members = Vec::new();
    for (i, ver) in [Ver::V5, Ver::V5, Ver::V4].into_iter().enumerate() {
        let mut m = Mqtt::connect(gw.mqtt, ver, &format!("member{i}")).await?;
        m.sub("$share/g/sh/topic", 1).await?;
        members.push(m);
    }
    let mut plain = Mqtt::connect(gw.mqtt, Ver::V5, "plain").await?;
    plain.sub("sh/topic", 1).await?;
    let mut publisher = Mqtt::connect(gw.mqtt, Ver::V5, "publisher").await?;
    publisher.publish_many("sh/topic", 1, numbered("s", N)).await?;

    // A plain subscriber gets everything; the group shares one copy.
    let want: Vec<String> = (0..N).map(|i| format!("s{i}")).collect();
    assert_eq!(texts(&plain.msgs(N).await?), want);
    let mut got: Vec<Vec<Msg>> = vec![Vec::new(); members.len()];
    let deadline = tokio::time::Instant::now() + WAIT;
    while got.iter().map(Vec::len).sum::<usize>() < N {
        assert!(tokio::time::Instant::now() < deadline, "only {:?} of {N} messages", got.iter().map(Vec::len));
        for (m, g) in members.iter_mut().zip(&mut got) {
            g.extend(m.take_ready()?);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let index = |m: &Msg| m.text()[1..].parse::<usize>().expect("numbered payload");
    let mut all: Vec<usize> = got.iter().flatten().map(index).collect();
    all.sort_unstable();
    assert_eq!(all, (0..N).collect::<Vec<_>>(), "each message exactly once across the group");
    for g in &got {
        let idx: Vec<usize> = g.iter().map(index).collect();
        assert!(idx.windows(2).all(|w| w[0] < w[1]), "a member gets its share in order: {idx:?}");
        assert!(g.iter().all(|m| m.topic == "sh/topic" && m.qos == 1));
    }
    // Round robin over three members.
    assert_eq!(got.iter().map(Vec::len).collect::<Vec<_>>(), [N / 3; 3]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_alias_from_the_client() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let mut ws = WsClient::connect(&gw.ws, Codec::Proto, "watch").await?;
    ws.subscribe_to("ta/#").await?;
    let mut p = Mqtt::connect(gw.mqtt, Ver::V5, "aliaser").await?;
    assert_eq!(p.connack.as_ref().and_then(|c| c.topic_alias_max), Some(32), "announced Topic Alias Maximum");
    let alias = |a: u16| PublishProperties { topic_alias: Some(a), ..Default::default() };
    assert_eq!(p.publish_props("ta/in", 1, "a1", alias(1)).await?, 0);
    assert_eq!(p.publish_props("", 1, "a2", alias(1)).await?, 0);
    // Re-mapping an alias to another topic.
    assert_eq!(p.publish_props("ta/other", 1, "a3", alias(1)).await?, 0);
    assert_eq!(p.publish_props("", 2, "a4", alias(1)).await?, 0);
    let got: Vec<(String, Bytes)> = ws.messages(4).await?.into_iter().map(|e| (e.channel, e.payload)).collect();
    let want = [("ta/in", "a1"), ("ta/in", "a2"), ("ta/other", "a3"), ("ta/other", "a4")]
        .map(|(c, p)| (c.to_string(), Bytes::from_static(p.as_bytes())));
    assert_eq!(got, want);

    // An alias never set: DISCONNECT 0x94.
    p.publish_props("", 0, "x", alias(7)).await?;
    assert_eq!(p.closed_by_server().await?, Some(0x94));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_alias_to_the_client() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let opts = Opts { topic_alias_max: Some(4), ..Opts::new(Ver::V5, "alias-taker") };
    let mut aliased = Mqtt::connect_with(gw.mqtt, opts).await?;
    aliased.sub("tb/#", 1).await?;
    let mut plain = Mqtt::connect(gw.mqtt, Ver::V5, "no-alias").await?;
    plain.sub("tb/#", 1).await?;
    for ch in ["tb/x", "tb/x", "tb/y", "tb/x", "tb/y"] {
        let (status, body) = rest_publish(&gw.http, ch, "p", &[]).await?;
        assert_eq!(status, 200, "{body}");
    }
    let got = aliased.msgs(5).await?;
    let wire: Vec<(String, Bytes)> = got.iter().map(|m| (m.topic.clone(), m.wire_topic.clone())).collect();
    let full = |t: &'static str| (t.to_string(), Bytes::from_static(t.as_bytes()));
    let short = |t: &str| (t.to_string(), Bytes::new());
    assert_eq!(wire, [full("tb/x"), short("tb/x"), full("tb/y"), short("tb/x"), short("tb/y")]);
    let (x, y) = (got[0].alias(), got[2].alias());
    assert!(
        x.is_some_and(|a| (1..=4).contains(&a)) && y.is_some_and(|a| (1..=4).contains(&a)) && x != y,
        "{x:?} {y:?}"
    );
    assert_eq!(got.iter().map(Msg::alias).collect::<Vec<_>>(), [x, x, y, x, y]);

    // A client that announced no Topic Alias Maximum gets full topics only.
    let got = plain.msgs(5).await?;
    assert!(got.iter().all(|m| m.alias().is_none() && m.wire_topic == m.topic.as_bytes()), "{got:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_packet_is_refused() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|cfg| cfg.mqtt.max_packet_size = 1024).await?;
    let mut sub = Mqtt::connect(gw.mqtt, Ver::V5, "sub").await?;
    assert_eq!(sub.connack.as_ref().and_then(|c| c.max_packet_size), Some(1024), "announced Maximum Packet Size");
    sub.sub("big/#", 1).await?;
    // Just under the limit passes.
    let mut p = Mqtt::connect(gw.mqtt, Ver::V5, "pub").await?;
    let fits = Bytes::from(vec![b'f'; 900]);
    p.publish_ok("big/ok", 1, fits.clone()).await?;
    assert_eq!(sub.next_msg().await?.payload, fits);

    let big = vec![b'x'; 2000];
    for ver in VERSIONS {
        let mut r = Raw::handshake(gw.mqtt, ver, &format!("big-{ver:?}"), 30).await?;
        r.send(&publish_packet(ver, b"big/no", 1, 1, &big, &[])).await?;
        let closed = r.closed().await?;
        match ver {
            Ver::V5 => assert_eq!(closed.only_disconnect(), Some(0x95), "{closed:?}"),
            Ver::V4 => assert_eq!(closed.packets, [], "3.1.1 just closes"),
        }
    }
    // Nothing of it was published.
    p.publish_ok("big/end", 1, "end").await?;
    assert_eq!(sub.next_msg().await?.topic, "big/end");
    Ok(())
}

/// The whole size of a raw packet on the wire.
fn wire_size(p: &RawPacket) -> usize {
    let mut len = Vec::new();
    varint(p.body.len(), &mut len);
    1 + len.len() + p.body.len()
}

/// The MQTT 5 PUBLISH a raw packet holds, decoded by rumqttc.
fn decode_publish5(p: &RawPacket) -> anyhow::Result<rumqttc::v5::mqttbytes::v5::Publish> {
    let mut raw = bytes::BytesMut::from(&[p.byte1][..]);
    let mut len = Vec::new();
    varint(p.body.len(), &mut len);
    raw.extend_from_slice(&len);
    raw.extend_from_slice(&p.body);
    match rumqttc::v5::mqttbytes::v5::Packet::read(&mut raw, None)? {
        rumqttc::v5::mqttbytes::v5::Packet::Publish(p) => Ok(p),
        other => anyhow::bail!("expected a PUBLISH, got {other:?}"),
    }
}

/// A raw MQTT 5 subscriber to `filter` at QoS 0 that announced `max` as its
/// Maximum Packet Size (MQTT 5 §3.1.2.11.4; none when `None`).
async fn raw_subscriber(gw: &TestGateway, id: &str, max: Option<u32>, filter: &str) -> anyhow::Result<Raw> {
    let props: Vec<u8> = max.map(|m| [&[0x27][..], &m.to_be_bytes()].concat()).unwrap_or_default();
    let mut r = Raw::connect(gw.mqtt).await?;
    r.send(&connect_packet(5, id, 30, None, &props)).await?;
    let p = r.packet().await?.ok_or_else(|| anyhow::anyhow!("{id}: closed instead of CONNACK"))?;
    anyhow::ensure!(p.connack_code() == Some(0), "{id}: {p:?}");
    r.send(&subscribe_packet(Ver::V5, 1, filter, 0)).await?;
    let p = r.packet().await?.ok_or_else(|| anyhow::anyhow!("{id}: closed instead of SUBACK"))?;
    anyhow::ensure!(p.kind() == 9 && p.body.last() == Some(&0), "{id}: SUBACK {p:?}");
    Ok(r)
}

/// MQTT 5 §3.1.2.11.4 at the exact boundary: a client whose Maximum Packet
/// Size equals the PUBLISH's size gets it; one byte less, and that message
/// (only) is discarded — the next one arrives, telling of the gap with the
/// `switchboard-gap` user property, and the connection stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maximum_packet_size_is_honoured_to_the_byte() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let mut probe = raw_subscriber(&gw, "mps-probe", None, "mps/#").await?;
    let mut publisher = Mqtt::connect(gw.mqtt, Ver::V5, "mps-pub").await?;
    // With the issue's numbers: a 43-byte PUBLISH.
    let payload = "x".repeat(33);
    publisher.publish_ok("mps/t", 0, payload.clone()).await?;
    let sized = probe.packet().await?.ok_or_else(|| anyhow::anyhow!("probe closed"))?;
    let size = wire_size(&sized);
    assert_eq!(size, 43, "{sized:?}");
    assert_eq!(decode_publish5(&sized)?.payload, payload.as_bytes());

    let mut exact = raw_subscriber(&gw, "mps-exact", Some(size as u32), "mps/#").await?;
    let mut under = raw_subscriber(&gw, "mps-under", Some(size as u32 - 1), "mps/#").await?;
    let mut roomy = raw_subscriber(&gw, "mps-64", Some(64), "mps/#").await?;
    publisher.publish_ok("mps/t", 0, payload.clone()).await?;
    publisher.publish_ok("mps/t", 0, "end").await?;
    for (who, r) in [("exact", &mut exact), ("64", &mut roomy)] {
        let got = r.packet().await?.ok_or_else(|| anyhow::anyhow!("{who}: closed"))?;
        assert_eq!(wire_size(&got), size, "{who}: {got:?}");
        assert_eq!(decode_publish5(&got)?.payload, payload.as_bytes(), "{who}");
        let end = decode_publish5(&r.packet().await?.ok_or_else(|| anyhow::anyhow!("{who}: closed"))?)?;
        assert_eq!(end.payload, "end".as_bytes(), "{who}");
    }
    let got = decode_publish5(&under.packet().await?.ok_or_else(|| anyhow::anyhow!("under: closed"))?)?;
    assert_eq!(got.payload, "end".as_bytes(), "the oversize message was discarded, not the connection");
    let props = got.properties.unwrap_or_default();
    assert_eq!(props.user_properties, [("switchboard-gap".to_string(), "too_large".to_string())]);
    // Still connected.
    under.send(&PINGREQ).await?;
    let pong = under.packet().await?.ok_or_else(|| anyhow::anyhow!("under: closed instead of PINGRESP"))?;
    assert_eq!(pong.kind(), 13, "{pong:?}");
    Ok(())
}

/// An MQTT 5 persistent session that missed more than history holds learns
/// of it: the first message after the gap carries the `switchboard-gap`
/// user property with the reason (`trimmed`); later ones do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_learns_of_a_gap_on_the_next_message() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|cfg| cfg.channels.history_size = 2).await?;
    let opts = Opts { session_expiry: Some(300), ..Opts::new(Ver::V5, "gap-sub") };
    let mut s = Mqtt::connect_with(gw.mqtt, opts.clone()).await?;
    s.sub("gp/a", 1).await?;
    let mut publisher = Mqtt::connect(gw.mqtt, Ver::V5, "gap-pub").await?;
    publisher.publish_ok("gp/a", 1, "m0").await?;
    let m = s.next_msg().await?;
    assert_eq!((m.text().as_str(), m.user_properties()), ("m0", vec![]));
    s.disconnect().await?;
    eventually(WAIT, "the subscriber's connection to end", || async { gw.sessions() == 1 }).await?;

    // Five while away: history keeps the last two, so m1 and m2 are lost.
    publisher.publish_many("gp/a", 1, numbered("m", 5)).await?;
    let mut s = Mqtt::connect_with(gw.mqtt, Opts { clean: false, ..opts }).await?;
    assert!(s.session_present);
    publisher.publish_ok("gp/a", 1, "live1").await?;
    publisher.publish_ok("gp/a", 1, "live2").await?;
    let first = s.next_msg().await?;
    assert_eq!(first.text(), "live1");
    assert_eq!(first.user_properties(), [("switchboard-gap".to_string(), "trimmed".to_string())]);
    let second = s.next_msg().await?;
    assert_eq!((second.text().as_str(), second.user_properties()), ("live2", vec![]));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_properties_and_headers() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    // MQTT 5 -> WebSocket.
    let mut ws = WsClient::connect(&gw.ws, Codec::Proto, "ws").await?;
    ws.subscribe_to("hd/a").await?;
    let mut m5 = Mqtt::connect(gw.mqtt, Ver::V5, "hd-pub").await?;
    let props = PublishProperties {
        user_properties: vec![("trace".into(), "t-1".into()), ("k".into(), "v".into())],
        content_type: Some("text/plain".into()),
        ..Default::default()
    };
    assert_eq!(m5.publish_props("hd/a", 1, "with headers", props).await?, 0);
    let e = ws.next_message().await?;
    let headers: BTreeMap<String, String> = [("k", "v"), ("trace", "t-1")].map(|(k, v)| (k.into(), v.into())).into();
    assert_eq!((e.channel.as_str(), &e.payload[..], &e.headers), ("hd/a", &b"with headers"[..], &headers));
    assert_eq!(e.content_type, "text/plain");
    let p = e.publisher.as_ref().expect("publisher");
    assert_eq!((p.client_id.as_str(), p.protocol()), ("hd-pub", Protocol::Mqtt));

    // WebSocket -> MQTT 5 (and 3.1.1, which has no properties).
    let mut sub5 = Mqtt::connect(gw.mqtt, Ver::V5, "sub5").await?;
    sub5.sub("hd/b", 1).await?;
    let mut sub4 = Mqtt::connect(gw.mqtt, Ver::V4, "sub4").await?;
    sub4.sub("hd/b", 1).await?;
    let headers: BTreeMap<String, String> =
        [("x-one", "1"), ("x-two", "zwei")].map(|(k, v)| (k.into(), v.into())).into();
    let publish = proto::Publish {
        channel: "hd/b".into(),
        payload: Bytes::from_static(b"from ws"),
        headers: headers.clone(),
        content_type: "application/x-test".into(),
        ..Default::default()
    };
    let reply = ws.publish_frame(publish).await?;
    assert!(matches!(reply.frame, Some(server_frame::Frame::PublishAck(_))), "{reply:?}");
    let m = sub5.next_msg().await?;
    let mut props = m.user_properties();
    props.sort();
    assert_eq!(props, [("x-one".to_string(), "1".to_string()), ("x-two".into(), "zwei".into())]);
    assert_eq!(
        (m.text().as_str(), m.props.as_ref().and_then(|p| p.content_type.clone())),
        ("from ws", Some("application/x-test".into()))
    );
    let m = sub4.next_msg().await?;
    assert_eq!((m.topic.as_str(), m.text().as_str(), m.props), ("hd/b", "from ws", None));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_publish_with_the_id_property() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let mut watcher = WsClient::connect(&gw.ws, Codec::Proto, "watch").await?;
    watcher.subscribe_to("idem/a").await?;
    let mut p = Mqtt::connect(gw.mqtt, Ver::V5, "idem-pub").await?;
    let id = |k: &str| PublishProperties { user_properties: vec![("id".into(), k.into())], ..Default::default() };

    // MQTT twice, then REST with the same key: acknowledged, delivered once.
    assert_eq!(p.publish_props("idem/a", 1, "first", id("k-1")).await?, 0);
    assert_eq!(p.publish_props("idem/a", 2, "second", id("k-1")).await?, 0, "a duplicate is acknowledged");
    let (status, body) = rest_publish(&gw.http, "idem/a", "third", &[("idempotency-key", "k-1")]).await?;
    assert_eq!((status, body["serial"].as_u64(), body["duplicate"].as_bool()), (200, Some(1), Some(true)), "{body}");
    // REST first, then MQTT.
    let (status, body) = rest_publish(&gw.http, "idem/a", "rest", &[("idempotency-key", "k-2")]).await?;
    assert_eq!((status, body["serial"].as_u64(), body["duplicate"].as_bool()), (200, Some(2), Some(false)), "{body}");
    assert_eq!(p.publish_props("idem/a", 1, "rest again", id("k-2")).await?, 0);
    p.publish_ok("idem/a", 1, "end").await?;

    let got: Vec<(Bytes, u64, String)> =
        watcher.messages(3).await?.into_iter().map(|e| (e.payload, e.serial, e.id)).collect();
    let want = [("first", 1, "k-1"), ("rest", 2, "k-2"), ("end", 3, "")]
        .map(|(p, s, id)| (Bytes::from_static(p.as_bytes()), s, id.to_string()));
    assert_eq!(got, want);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewind_subscription_property() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    for i in 0..5 {
        let (status, _) = rest_publish(&gw.http, "rw/a", format!("h{i}"), &[]).await?;
        assert_eq!(status, 200);
    }
    let mut rewinder = Mqtt::connect(gw.mqtt, Ver::V5, "rewinder").await?;
    assert_eq!(rewinder.subscribe_props("rw/a", 1, &[("rewind", "3")]).await?, [1]);
    let mut plain = Mqtt::connect(gw.mqtt, Ver::V5, "plain").await?;
    plain.sub("rw/a", 1).await?;
    let (status, _) = rest_publish(&gw.http, "rw/a", "live", &[]).await?;
    assert_eq!(status, 200);
    assert_eq!(texts(&rewinder.msgs(4).await?), ["h2", "h3", "h4", "live"]);
    assert_eq!(plain.next_msg().await?.text(), "live", "no rewind without the property");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_from_and_to_mqtt() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let room = "pr/room";
    let mut watcher = WsClient::connect(&gw.ws, Codec::Json, "watcher").await?;
    watcher.subscribe(proto::Subscribe { filter: room.into(), presence: true, ..Default::default() }).await?;

    // An MQTT client enters by publishing to $presence/<channel>.
    let mut alice = Mqtt::connect(gw.mqtt, Ver::V4, "mq-alice").await?;
    assert_eq!(alice.publish("$presence/pr/room", 1, false, "hi").await?, 0);
    let e = watcher.next_message().await?;
    assert_eq!((e.channel.as_str(), e.kind(), &e.payload[..]), ("$presence/pr/room", Kind::PresenceEnter, &b"hi"[..]));
    let who = e.publisher.clone().expect("publisher");
    assert_eq!((who.client_id.as_str(), who.protocol()), ("mq-alice", Protocol::Mqtt));
    let members = async || {
        let (status, body) = get_json(&format!("{}/v1/channels/{room}/presence", gw.http)).await?;
        assert_eq!(status, 200, "{body}");
        anyhow::Ok(body["members"].clone())
    };
    assert_eq!(
        members().await?,
        json!([{"client_id": "mq-alice", "connection_id": who.connection_id, "protocol": "mqtt", "text": "hi"}])
    );
    // An empty payload leaves.
    assert_eq!(alice.publish("$presence/pr/room", 1, false, Bytes::new()).await?, 0);
    let e = watcher.next_message().await?;
    assert_eq!((e.kind(), e.publisher.map(|p| p.client_id)), (Kind::PresenceLeave, Some("mq-alice".into())));
    assert_eq!(members().await?, json!([]));

    // An MQTT subscriber of $presence/<channel> gets JSON events.
    let mut listener = Mqtt::connect(gw.mqtt, Ver::V5, "mq-listener").await?;
    listener.sub("$presence/pr/room2", 1).await?;
    let mut bob = WsClient::connect(&gw.ws, Codec::Proto, "ws-bob").await?;
    let enter = proto::PresenceEnter { channel: "pr/room2".into(), data: Bytes::from_static(br#"{"status":"on"}"#) };
    let reply = bob.request(client_frame::Frame::PresenceEnter(enter)).await?;
    assert!(matches!(reply.frame, Some(server_frame::Frame::PublishAck(_))), "{reply:?}");
    let m = listener.next_msg().await?;
    assert_eq!(m.topic, "$presence/pr/room2");
    let v: serde_json::Value = serde_json::from_slice(&m.payload)?;
    assert!(v["timestamp"].as_i64().is_some_and(|t| t > 0), "{v}");
    assert_eq!(
        v,
        json!({
            "action": "enter",
            "client_id": "ws-bob",
            "connection_id": bob.connected.connection_id,
            "timestamp": v["timestamp"],
            "data": {"status": "on"},
        })
    );
    let leave = proto::PresenceLeave { channel: "pr/room2".into() };
    bob.request(client_frame::Frame::PresenceLeave(leave)).await?;
    let v: serde_json::Value = serde_json::from_slice(&listener.next_msg().await?.payload)?;
    assert_eq!((v["action"].as_str(), v["client_id"].as_str()), (Some("leave"), Some("ws-bob")), "{v}");
    Ok(())
}

/// #13 item 18: a subscription is in effect for every PUBLISH that reaches
/// the gateway after its SUBSCRIBE did. A subscriber writes its SUBSCRIBE
/// and, without waiting for the SUBACK, another connection publishes at
/// once: every round's message arrives, as with mosquitto (the gateway
/// handled the two connections' packets in the other order in 19 of 60
/// rounds before). Each round uses a fresh channel, so a lost message
/// cannot hide behind a later one.
async fn subscribed_at_once(ver: Ver) -> anyhow::Result<()> {
    const ROUNDS: usize = 60;
    let gw = TestGateway::start().await?;
    let mut publisher = Raw::handshake(gw.mqtt, ver, &format!("at-once-pub-{ver:?}"), 60).await?;
    let mut lost = Vec::new();
    for round in 0..ROUNDS {
        let topic = format!("at-once/{ver:?}/{round}");
        let mut sub = Raw::handshake(gw.mqtt, ver, &format!("at-once-sub-{ver:?}-{round}"), 60).await?;
        sub.send(&subscribe_packet(ver, 1, &topic, 0)).await?;
        publisher.send(&publish_packet(ver, topic.as_bytes(), 0, 0, b"now", &[])).await?;
        let mut got = false;
        while let Some(p) = sub.packet_within(Duration::from_millis(500)).await.ok().flatten() {
            if p.kind() == 3 {
                got = true;
                break;
            }
        }
        if !got {
            lost.push(round);
        }
    }
    assert!(lost.is_empty(), "{} of {ROUNDS} rounds lost their message: {lost:?}", lost.len());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribed_at_once_v311() -> anyhow::Result<()> {
    subscribed_at_once(Ver::V4).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribed_at_once_v5() -> anyhow::Result<()> {
    subscribed_at_once(Ver::V5).await
}

/// The other side of item 18: what was published (and acknowledged) before
/// the SUBSCRIBE reached the gateway is not delivered to it, on a new
/// connection as on one that has been idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_before_subscribing_is_not_delivered() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let mut publisher = Mqtt::connect(gw.mqtt, Ver::V5, "before-pub").await?;
    for (i, idle) in [Duration::ZERO, Duration::from_millis(50)].into_iter().enumerate() {
        let topic = format!("before/{i}");
        let mut sub = Raw::handshake(gw.mqtt, Ver::V5, &format!("before-sub-{i}"), 60).await?;
        publisher.publish_ok(&topic, 1, "earlier").await?;
        tokio::time::sleep(idle).await;
        sub.send(&subscribe_packet(Ver::V5, 1, &topic, 1)).await?;
        let suback = sub.packet().await?.context("closed instead of SUBACK")?;
        assert_eq!(suback.kind(), 9, "SUBACK first");
        let next = sub.packet_within(Duration::from_millis(300)).await;
        assert!(next.is_err(), "idle {idle:?}: a message published before the SUBSCRIBE arrived: {next:?}");
    }
    Ok(())
}
