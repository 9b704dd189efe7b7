//! Bad MQTT input on a raw TCP socket: each case gets the answer of the
//! close table in `protocols/src/mqtt/mod.rs` (MQTT 5: the DISCONNECT
//! reason, 3.1.1: a bare close) and nothing else is affected — after every
//! case a bystander MQTT client and a WebSocket client still exchange
//! messages, no session is left behind, and `/healthz` answers 200.

use super::common_mqtt;

use std::time::Duration;

use common_mqtt::*;
use switchboard::edge::config::Config;
use switchboard_tests::*;
use tokio::time::Instant;

/// Clients minding their own business on other channels.
struct Bystanders {
    mqtt: Mqtt,
    ws: WsClient,
    round: usize,
}

impl Bystanders {
    async fn join(gw: &TestGateway) -> anyhow::Result<Self> {
        let mut mqtt = Mqtt::connect(gw.mqtt, Ver::V5, "bystander-mqtt").await?;
        mqtt.sub("by/m", 1).await?;
        let mut ws = WsClient::connect(&gw.ws, Codec::Proto, "bystander-ws").await?;
        ws.subscribe_to("by/w").await?;
        Ok(Bystanders { mqtt, ws, round: 0 })
    }

    /// Both directions still work, the bad connection's session is gone,
    /// and the gateway is healthy.
    async fn still_served(&mut self, gw: &TestGateway, case: &str) -> anyhow::Result<()> {
        self.round += 1;
        let n = self.round;
        self.mqtt.publish_ok("by/w", 1, format!("m{n}")).await?;
        let e = self.ws.next_message().await?;
        assert_eq!((e.channel.as_str(), &e.payload[..]), ("by/w", format!("m{n}").as_bytes()), "after {case}");
        self.ws.publish("by/m", format!("w{n}").as_bytes(), "").await?;
        let m = self.mqtt.next_msg().await?;
        assert_eq!((m.topic.as_str(), m.text()), ("by/m", format!("w{n}")), "after {case}");
        eventually(WAIT, "only the bystanders' sessions", || async { gw.sessions() == 2 }).await?;
        assert_eq!(healthz(&gw.admin).await?, 200, "after {case}");
        Ok(())
    }
}

async fn setup(tweak: impl FnOnce(&mut Config)) -> anyhow::Result<(TestGateway, Bystanders)> {
    let gw = TestGateway::start_with(tweak).await?;
    let by = Bystanders::join(&gw).await?;
    Ok((gw, by))
}

/// Sends `bytes` on a fresh connection (no CONNECT) and expects a bare close.
async fn closed_before_connect(gw: &TestGateway, bytes: &[u8], case: &str) -> anyhow::Result<()> {
    let mut r = Raw::connect(gw.mqtt).await?;
    r.send(bytes).await?;
    assert_eq!(r.closed().await?.packets, [], "{case}: closed without a word");
    Ok(())
}

/// After a successful CONNECT of `ver`, sends `bytes`; expects DISCONNECT
/// `reason` then a close (MQTT 5) or a bare close (3.1.1).
async fn closed_after_connect(gw: &TestGateway, ver: Ver, bytes: &[u8], reason: u8, case: &str) -> anyhow::Result<()> {
    let mut r = Raw::handshake(gw.mqtt, ver, &format!("bad-{ver:?}"), 60).await?;
    r.send(bytes).await?;
    let closed = r.closed().await?;
    match ver {
        Ver::V5 => assert_eq!(closed.only_disconnect(), Some(reason), "{case} (v5): {closed:?}"),
        Ver::V4 => assert_eq!(closed.packets, [], "{case} (3.1.1): closed without a word"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_before_connect_is_closed() -> anyhow::Result<()> {
    // Garbage that announces a long packet (an HTTP request reads as a
    // PUBACK of 69 bytes) is closed at the latest by the connect timeout.
    let (gw, mut by) = setup(|cfg| cfg.mqtt.connect_timeout = Duration::from_secs(1)).await?;
    let cases: [(&str, &[u8]); 4] = [
        ("remaining length over four bytes", &[0x10, 0xff, 0xff, 0xff, 0xff, 0x01]),
        ("HTTP request", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("protocol name not MQTT", &packet(0x10, b"\x00\x04HTTP\x04\x02\x00\x3c\x00\x01x")),
        ("truncated CONNECT body", &packet(0x10, b"\x00")),
    ];
    for (case, bytes) in cases {
        closed_before_connect(&gw, bytes, case).await?;
        by.still_served(&gw, case).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_packet_after_connect() -> anyhow::Result<()> {
    let (gw, mut by) = setup(|_| {}).await?;
    let qos3 = {
        let mut p = publish_packet(Ver::V5, b"m/a", 1, 1, b"x", &[]);
        p[0] |= 0x06;
        p
    };
    let cases: [(&str, Vec<u8>); 3] = [
        ("remaining length over four bytes", vec![0x30, 0xff, 0xff, 0xff, 0xff, 0x01]),
        ("reserved packet type 0", vec![0x00, 0x00]),
        ("PUBLISH with QoS 3", qos3),
    ];
    for ver in VERSIONS {
        for (case, bytes) in &cases {
            closed_after_connect(&gw, ver, bytes, 0x81, case).await?;
            by.still_served(&gw, case).await?;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_protocol_level_gets_connack_0x01() -> anyhow::Result<()> {
    let (gw, mut by) = setup(|_| {}).await?;
    // MQTT 3.1 as its clients really send it, and unknown levels.
    let mqisdp = {
        let mut b = Vec::new();
        mqtt_str(b"MQIsdp", &mut b);
        b.extend_from_slice(&[3, 0x02, 0x00, 0x3c]);
        mqtt_str(b"old", &mut b);
        packet(0x10, &b)
    };
    let cases = [
        ("MQIsdp level 3", mqisdp),
        ("MQTT level 3", connect_packet(3, "l3", 60, None, &[])),
        ("MQTT level 6", connect_packet(6, "l6", 60, None, &[])),
        ("MQTT level 0", connect_packet(0, "l0", 60, None, &[])),
    ];
    for (case, bytes) in cases {
        let mut r = Raw::connect(gw.mqtt).await?;
        r.send(&bytes).await?;
        let closed = r.closed().await?;
        // The 3.1.1 form: 0x20 0x02, no session present, return code 1.
        let want = RawPacket { byte1: 0x20, body: bytes::Bytes::from_static(&[0x00, 0x01]) };
        assert_eq!(closed.packets, [want], "{case}");
        by.still_served(&gw, case).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_before_connect_are_closed() -> anyhow::Result<()> {
    let (gw, mut by) = setup(|_| {}).await?;
    let cases = [
        ("PUBLISH", publish_packet(Ver::V4, b"pre/a", 0, 0, b"x", &[])),
        ("SUBSCRIBE", subscribe_packet(Ver::V4, 1, "pre/#", 0)),
        ("PINGREQ", PINGREQ.to_vec()),
        ("DISCONNECT", disconnect_packet(Ver::V4, 0)),
    ];
    for (case, bytes) in cases {
        closed_before_connect(&gw, &bytes, case).await?;
        by.still_served(&gw, case).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_connect_and_server_only_packets_are_protocol_errors() -> anyhow::Result<()> {
    let (gw, mut by) = setup(|_| {}).await?;
    for ver in VERSIONS {
        let connect = connect_packet(ver.level(), "again", 60, None, &[]);
        closed_after_connect(&gw, ver, &connect, 0x82, "second CONNECT").await?;
        by.still_served(&gw, "second CONNECT").await?;
    }
    // A packet only a server sends: a protocol error (0x82) whatever its
    // body, also one the parser could not read (issue #13, item 13: a
    // 3.1.1-form CONNACK on MQTT 5 used to get 0x81).
    let server_only = [
        ("CONNACK", packet(0x20, &[0x00, 0x00, 0x00])),
        ("CONNACK, 3.1.1 form", packet(0x20, &[0x00, 0x00])),
        ("CONNACK, unknown code", packet(0x20, &[0x00, 0xFF, 0x00])),
        ("SUBACK without codes", packet(0x90, &[0x00, 0x01])),
        ("UNSUBACK", packet(0xB0, &[0x00, 0x01])),
        ("PINGRESP", packet(0xD0, &[])),
    ];
    for (case, bytes) in &server_only {
        for ver in VERSIONS {
            closed_after_connect(&gw, ver, bytes, 0x82, case).await?;
            by.still_served(&gw, case).await?;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_packet_is_a_protocol_error() -> anyhow::Result<()> {
    let (gw, mut by) = setup(|_| {}).await?;
    // MQTT 5 §3.15: AUTH with reason 0x18 and no properties, and the short
    // form (remaining length 0 = reason 0x00). No enhanced auth here: both
    // are protocol errors (close table: AUTH -> DISCONNECT 0x82).
    for (case, auth) in [("AUTH 0x18", packet(0xF0, &[0x18, 0x00])), ("AUTH, short form", vec![0xF0, 0x00])] {
        closed_after_connect(&gw, Ver::V5, &auth, 0x82, case).await?;
        by.still_served(&gw, case).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_publish_topics_are_refused() -> anyhow::Result<()> {
    let (gw, mut by) = setup(|_| {}).await?;
    let topics: [(&str, &[u8]); 7] = [
        ("single-level wildcard", b"t/+"),
        ("multi-level wildcard", b"t/#"),
        ("reserved $ topic", b"$SYS/x"),
        ("reserved $presence without a channel", b"$presence/"),
        ("invalid UTF-8", b"t/\xff\xfe"),
        ("NUL", b"t/a\0b"),
        ("empty, no alias", b""),
    ];
    for ver in VERSIONS {
        for (case, topic) in topics {
            for qos in [0, 1] {
                let p = publish_packet(ver, topic, qos, 1, b"x", &[]);
                closed_after_connect(&gw, ver, &p, 0x90, case).await?;
                by.still_served(&gw, case).await?;
            }
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_remaining_length_is_refused_without_reading_the_body() -> anyhow::Result<()> {
    let (gw, mut by) = setup(|cfg| cfg.mqtt.max_packet_size = 1024).await?;
    // Only the fixed header: the body never comes, so only the declared
    // size can close the connection (keep alive 60 s, connect timeout 10 s,
    // both far beyond the bound below).
    let mut header = vec![0x30];
    varint(100_000, &mut header);
    for ver in VERSIONS {
        let mut r = Raw::handshake(gw.mqtt, ver, &format!("huge-{ver:?}"), 60).await?;
        r.send(&header).await?;
        let closed = r.closed_within(Duration::from_secs(3)).await?;
        match ver {
            Ver::V5 => assert_eq!(closed.only_disconnect(), Some(0x95), "{closed:?}"),
            Ver::V4 => assert_eq!(closed.packets, [], "3.1.1 just closes"),
        }
        by.still_served(&gw, "oversize PUBLISH header").await?;
    }
    let mut connect = vec![0x10];
    varint(100_000, &mut connect);
    let mut r = Raw::connect(gw.mqtt).await?;
    r.send(&connect).await?;
    assert_eq!(r.closed_within(Duration::from_secs(3)).await?.packets, [], "oversize CONNECT header");
    by.still_served(&gw, "oversize CONNECT header").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silence_before_connect_ends_at_the_connect_timeout() -> anyhow::Result<()> {
    let timeout = Duration::from_millis(500);
    let (gw, mut by) = setup(|cfg| cfg.mqtt.connect_timeout = timeout).await?;
    let connect = connect_packet(4, "slow", 60, None, &[]);
    let cases: [(&str, &[u8]); 3] =
        [("nothing", &[]), ("half a CONNECT", &connect[..connect.len() / 2]), ("only the first byte", &[0x10])];
    for (case, bytes) in cases {
        let started = Instant::now();
        let mut r = Raw::connect(gw.mqtt).await?;
        r.send(bytes).await?;
        assert_eq!(r.closed_within(Duration::from_secs(5)).await?.packets, [], "{case}");
        let waited = started.elapsed();
        assert!(waited >= timeout - Duration::from_millis(50), "{case}: closed after {waited:?}, before the timeout");
        by.still_served(&gw, case).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silence_after_connect_ends_at_one_and_a_half_keep_alive() -> anyhow::Result<()> {
    let (gw, mut by) = setup(|_| {}).await?;
    let half_publish = publish_packet(Ver::V5, b"ka/t", 1, 1, b"payload", &[]);
    for ver in VERSIONS {
        for (case, bytes) in [("nothing", &[][..]), ("half a PUBLISH", &half_publish[..5])] {
            let mut r = Raw::handshake(gw.mqtt, ver, &format!("ka-{ver:?}"), 1).await?;
            let started = Instant::now();
            r.send(bytes).await?;
            let closed = r.closed_within(Duration::from_secs(5)).await?;
            let waited = started.elapsed();
            match ver {
                Ver::V5 => assert_eq!(closed.only_disconnect(), Some(0x8D), "{case}: {closed:?}"),
                Ver::V4 => assert_eq!(closed.packets, [], "{case}: 3.1.1 just closes"),
            }
            assert!(waited >= Duration::from_millis(1400), "{case} ({ver:?}): closed after {waited:?}");
            by.still_served(&gw, case).await?;
        }
    }
    Ok(())
}
