//! WebTransport against the real gateway with the wtransport client: round
//! trips on the control stream and channel streams, the same positions and
//! payload bytes as WebSocket, SSE and MQTT, recovery after the session is
//! killed (by hand and by `sub`'s own reconnect), datagram delivery with
//! gaps a client can see, datagram publishes, and head-of-line independence
//! between channels.

use super::common_mqtt;
use super::common_sse;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common_mqtt::{Mqtt, Ver};
use common_sse::{SseClient, channels_query};
use switchboard::tooling::client::SubEvent;
use switchboard::tooling::client_wt::{FrameReader, Seen, SerialTracker, WtClient, subscribe_wt};
use switchboard_proto::{self as proto, DeliveryMode, ErrorCode, Protocol, client_frame, server_frame};
use switchboard_tests::*;

fn publish(channel: &str, payload: impl Into<Bytes>) -> proto::Publish {
    proto::Publish { channel: channel.into(), payload: payload.into(), ..Default::default() }
}

fn sub(filter: &str) -> proto::Subscribe {
    proto::Subscribe { filter: filter.into(), ..Default::default() }
}

async fn rest_ok(gw: &TestGateway, channel: &str, body: impl Into<reqwest::Body>) -> anyhow::Result<(String, u64)> {
    let (status, ack) = rest_publish(&gw.http, channel, body, &[]).await?;
    anyhow::ensure!(status == 200, "REST publish: {status} {ack}");
    Ok((ack["epoch"].as_str().unwrap_or_default().to_string(), ack["serial"].as_u64().unwrap_or_default()))
}

/// Accepts streams until one whose first message is on `channel`; returns
/// it with that message.
async fn stream_of(c: &WtClient, channel: &str) -> anyhow::Result<(FrameReader, proto::Envelope)> {
    loop {
        let mut r = wt_accept(c).await?;
        let first = wt_message(&mut r).await?;
        if first.channel == channel {
            return Ok((r, first));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_and_publish_round_trip() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(with_quic).await?;
    let mut alice = gw.wt_client("alice").await?;
    assert_eq!(alice.connected.client_id, "alice");
    assert!(!alice.connected.connection_id.is_empty());
    let subscribed = alice.subscribe(sub("wt/rt")).await?;
    assert_eq!(subscribed.filter, "wt/rt");

    let mut bob = gw.wt_client("bob").await?;
    let payload = Bytes::from_static(&[0x00, 0xff, b'h', b'i', 0x80]);
    let ack = bob.publish(proto::Publish { id: "m-1".into(), ..publish("wt/rt", payload.clone()) }).await?;
    assert_eq!((ack.channel.as_str(), ack.serial, ack.duplicate), ("wt/rt", 1, false));

    let mut stream = wt_accept(&alice).await?;
    let m = wt_message(&mut stream).await?;
    assert_eq!((m.channel.as_str(), m.epoch.as_str(), m.serial, m.prev_serial), ("wt/rt", ack.epoch.as_str(), 1, 0));
    assert_eq!(m.payload, payload, "payload bytes survive");
    assert_eq!(m.id, "m-1");
    let publisher = m.publisher.clone().unwrap_or_default();
    assert_eq!((publisher.client_id.as_str(), publisher.protocol()), ("bob", Protocol::Wt));

    // The same id again is acknowledged as a duplicate and not delivered.
    let dup = bob.publish(proto::Publish { id: "m-1".into(), ..publish("wt/rt", payload.clone()) }).await?;
    assert!(dup.duplicate && dup.serial == 1, "{dup:?}");
    // The channel keeps its stream.
    let (_, serial) = rest_ok(&gw, "wt/rt", "via REST").await?;
    let m2 = wt_message(&mut stream).await?;
    assert_eq!((m2.serial, m2.prev_serial, &m2.payload[..]), (serial, 1, &b"via REST"[..]));

    // Every request has its reply on the control stream.
    let pong = alice.request(client_frame::Frame::Ping(proto::Ping {})).await?;
    assert_eq!(pong.frame, Some(server_frame::Frame::Pong(proto::Pong {})));
    let history = alice
        .request(client_frame::Frame::History(proto::History { channel: "wt/rt".into(), ..Default::default() }))
        .await?;
    let Some(server_frame::Frame::History(h)) = history.frame else { anyhow::bail!("{history:?}") };
    assert_eq!(h.messages.len(), 2);
    let enter = alice
        .request(client_frame::Frame::PresenceEnter(proto::PresenceEnter {
            channel: "wt/rt".into(),
            data: Bytes::from_static(b"here"),
        }))
        .await?;
    assert!(matches!(enter.frame, Some(server_frame::Frame::PublishAck(_))), "{enter:?}");
    let members =
        alice.request(client_frame::Frame::PresenceGet(proto::PresenceGet { channel: "wt/rt".into() })).await?;
    let Some(server_frame::Frame::Presence(p)) = members.frame else { anyhow::bail!("{members:?}") };
    assert_eq!(p.members.len(), 1);
    assert_eq!(p.members[0].protocol(), Protocol::Wt);
    let unsub = alice.request(client_frame::Frame::Unsubscribe(proto::Unsubscribe { filter: "wt/rt".into() })).await?;
    assert!(matches!(unsub.frame, Some(server_frame::Frame::Unsubscribed(_))), "{unsub:?}");
    let again = alice.request(client_frame::Frame::Connect(proto::Connect::default())).await?;
    assert!(
        matches!(&again.frame, Some(server_frame::Frame::Error(e)) if e.code() == ErrorCode::AlreadyConnected),
        "{again:?}"
    );

    // Credentials in the URL open the session before the accept.
    let mut opts = gw.wt_options()?;
    opts.url = format!("{}/v1/wt?client_id=carol", opts.url);
    opts.query_auth = true;
    let carol = WtClient::connect(&opts).await?;
    assert_eq!(carol.connected.client_id, "carol");

    assert_eq!(gw.sessions(), 3);
    let wt_sessions = gw.gateway.router.sessions().into_iter().filter(|s| s.protocol == "wt").count();
    assert_eq!(wt_sessions, 3);
    for c in [&alice, &bob, &carol] {
        c.close();
    }
    eventually(WAIT, "every session to end", || async { gw.sessions() == 0 }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_positions_and_bytes_as_ws_sse_and_mqtt() -> anyhow::Result<()> {
    const CH: &str = "cross/wt";
    let gw = TestGateway::start_with(with_quic).await?;
    let mut wt = gw.wt_client("wt-sub").await?;
    wt.subscribe(sub(CH)).await?;
    let mut ws = WsClient::connect(&gw.ws, Codec::Proto, "ws-sub").await?;
    ws.subscribe_to(CH).await?;
    let mut sse = SseClient::connect(&gw.http, &channels_query(&[CH], &[]), None).await?;
    let mut mqtt = Mqtt::connect(gw.mqtt, Ver::V5, "mqtt-sub").await?;
    mqtt.sub(CH, 1).await?;

    // One publish from each protocol, each payload awkward in its own way.
    let payloads: [Bytes; 4] = [
        Bytes::from_static(&[0x00, 0xff, 0xfe, 0x80]),
        Bytes::from_static("grüße über WebTransport".as_bytes()),
        Bytes::from_static(br#"{"t": 21.50, "n":null}"#),
        Bytes::from_static(&[0xc0, 0xc1, 0x0a]),
    ];
    let mut wt_pub = gw.wt_client("wt-pub").await?;
    wt_pub.publish(publish(CH, payloads[0].clone())).await?;
    let mut ws_pub = WsClient::connect(&gw.ws, Codec::Proto, "ws-pub").await?;
    ws_pub.publish(CH, &payloads[1], "").await?;
    rest_ok(&gw, CH, payloads[2].clone()).await?;
    let mut mqtt_pub = Mqtt::connect(gw.mqtt, Ver::V5, "mqtt-pub").await?;
    mqtt_pub.publish_ok(CH, 1, payloads[3].clone()).await?;

    let mut stream = wt_accept(&wt).await?;
    let mut from_wt = Vec::new();
    for _ in 0..4 {
        from_wt.push(wt_message(&mut stream).await?);
    }
    let from_ws = ws.messages(4).await?;
    let from_sse = sse.messages(4).await?;
    let from_mqtt = mqtt.msgs(4).await?;
    let key = |e: &proto::Envelope| (e.epoch.clone(), e.serial, e.prev_serial, e.payload.clone());
    let want: Vec<_> = from_wt.iter().map(key).collect();
    assert_eq!(from_ws.iter().map(key).collect::<Vec<_>>(), want, "WebSocket");
    assert_eq!(from_sse.iter().map(key).collect::<Vec<_>>(), want, "SSE");
    assert_eq!(from_wt.iter().map(|e| e.payload.clone()).collect::<Vec<_>>(), payloads.to_vec());
    assert_eq!(from_mqtt.iter().map(|m| m.payload.clone()).collect::<Vec<_>>(), payloads.to_vec(), "MQTT");
    let protocols: Vec<Protocol> = from_wt.iter().map(|e| e.publisher.clone().unwrap_or_default().protocol()).collect();
    assert_eq!(protocols, [Protocol::Wt, Protocol::Ws, Protocol::Rest, Protocol::Mqtt]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubscribing_with_positions_recovers_after_the_session_is_killed() -> anyhow::Result<()> {
    const CH: &str = "wt/recover";
    let gw = TestGateway::start_with(with_quic).await?;
    let mut c = gw.wt_client("rec").await?;
    c.subscribe(sub(CH)).await?;
    for n in 1..=3 {
        rest_ok(&gw, CH, format!("m{n}")).await?;
    }
    let mut stream = wt_accept(&c).await?;
    let mut last = None;
    for n in 1..=3u64 {
        let m = wt_message(&mut stream).await?;
        assert_eq!(m.serial, n);
        last = Some(proto::Position { epoch: m.epoch.clone(), serial: m.serial });
    }

    // The server kills the session (admin close): disconnect 4003.
    let id = gw.gateway.router.sessions().into_iter().find(|s| s.client_id == "rec").map(|s| s.id);
    assert!(gw.gateway.router.kick(id.unwrap_or_default()));
    let (code, reason) = wt_closed(c.connection()).await?;
    assert_eq!((code, reason.as_str()), (4003, "disconnected by server"));

    // Published while the client is away.
    for n in 4..=6 {
        rest_ok(&gw, CH, format!("m{n}")).await?;
    }
    let mut c = gw.wt_client("rec").await?;
    let positions = [(CH.to_string(), last.clone().unwrap_or_default())].into_iter().collect();
    let s = c.subscribe(proto::Subscribe { positions, ..sub(CH) }).await?;
    assert!(s.channels.iter().any(|ch| ch.channel == CH && ch.recovered), "{s:?}");
    rest_ok(&gw, CH, "m7").await?;
    let mut stream = wt_accept(&c).await?;
    let got: Vec<(u64, Bytes)> = {
        let mut v = Vec::new();
        for _ in 4..=7 {
            let m = wt_message(&mut stream).await?;
            v.push((m.serial, m.payload));
        }
        v
    };
    let want: Vec<(u64, Bytes)> = (4..=7).map(|n| (n, Bytes::from(format!("m{n}")))).collect();
    assert_eq!(got, want, "exactly the missed messages, then live");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_reconnects_and_recovers_by_itself() -> anyhow::Result<()> {
    const CH: &str = "wt/sub";
    let gw = TestGateway::start_with(with_quic).await?;
    let opts = gw.wt_options()?;
    let events: Arc<Mutex<Vec<SubEvent>>> = Arc::default();
    let seen = events.clone();
    let task = tokio::spawn(async move {
        subscribe_wt(&opts, CH, None, |ev| {
            let mut seen = seen.lock().expect("events");
            seen.push(ev);
            seen.iter().filter(|e| matches!(e, SubEvent::Message(_))).count() < 6
        })
        .await
    });
    let count = |f: fn(&SubEvent) -> bool| events.lock().expect("events").iter().filter(|e| f(e)).count();
    eventually(WAIT, "the subscription", || async { count(|e| matches!(e, SubEvent::Subscribed(_))) == 1 }).await?;
    for n in 1..=3 {
        rest_ok(&gw, CH, format!("m{n}")).await?;
    }
    eventually(WAIT, "three messages", || async { count(|e| matches!(e, SubEvent::Message(_))) == 3 }).await?;
    let id = gw.gateway.router.sessions().into_iter().find(|s| s.protocol == "wt").map(|s| s.id);
    assert!(gw.gateway.router.kick(id.unwrap_or_default()));
    eventually(WAIT, "the reconnect", || async { count(|e| matches!(e, SubEvent::Reconnecting(_))) >= 1 }).await?;
    for n in 4..=6 {
        rest_ok(&gw, CH, format!("m{n}")).await?;
    }
    tokio::time::timeout(WAIT, task).await???;
    let serials: Vec<(u64, Bytes)> = events
        .lock()
        .expect("events")
        .iter()
        .filter_map(|e| match e {
            SubEvent::Message(m) => Some((m.serial, m.payload.clone())),
            _ => None,
        })
        .collect();
    let want: Vec<(u64, Bytes)> = (1..=6).map(|n| (n, Bytes::from(format!("m{n}")))).collect();
    assert_eq!(serials, want, "every message exactly once, in order");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagram_subscriptions_carry_serials_and_show_what_was_missed() -> anyhow::Result<()> {
    const CH: &str = "dg/temp";
    const N: u64 = 30;
    let gw = TestGateway::start_with(with_quic).await?;
    let mut c = gw.wt_client("dg").await?;
    c.subscribe(proto::Subscribe { delivery: DeliveryMode::Datagram as i32, ..sub(CH) }).await?;
    for n in 1..=N {
        rest_ok(&gw, CH, format!("t={n}")).await?;
    }
    // Receive every datagram; "lose" every third on purpose.
    let mut tracker = SerialTracker::default();
    let mut kept = Vec::new();
    let mut missed = Vec::new();
    while kept.last().copied().unwrap_or(0) < N {
        let f = tokio::time::timeout(WAIT, c.recv_datagram()).await??;
        let Some(server_frame::Frame::Message(m)) = f.frame else { anyhow::bail!("{f:?}") };
        assert_eq!(m.channel, CH);
        assert_eq!(m.payload, Bytes::from(format!("t={}", m.serial)));
        if m.serial % 3 == 0 && m.serial != N {
            continue;
        }
        match tracker.observe(&m) {
            Seen::Missed { after, through } => missed.extend(after + 1..=through),
            Seen::Stale => anyhow::bail!("stale datagram {}", m.serial),
            Seen::First | Seen::Next => {}
        }
        kept.push(m.serial);
    }
    let first = kept[0];
    let want: Vec<u64> = (first..=N).filter(|s| !kept.contains(s)).collect();
    assert_eq!(missed, want, "every discarded (or lost) serial is reported, nothing else");
    assert!(missed.len() >= 9, "{missed:?}");

    // Too big for one datagram: the message takes the channel's stream.
    let big = vec![b'x'; 8 * 1024];
    let (_, serial) = rest_ok(&gw, CH, big.clone()).await?;
    let mut stream = wt_accept(&c).await?;
    let m = wt_message(&mut stream).await?;
    assert_eq!((m.serial, m.payload.len()), (serial, big.len()));

    // Client datagrams publish (QoS 0): a WebSocket subscriber gets one.
    let mut ws = WsClient::connect(&gw.ws, Codec::Proto, "ws").await?;
    ws.subscribe_to("dg/up").await?;
    let mut delivered = None;
    for attempt in 0..5 {
        c.publish_datagram(0, publish("dg/up", format!("up {attempt}")))?;
        if let Ok(Ok(f)) = tokio::time::timeout(Duration::from_secs(1), ws.next_push()).await {
            delivered = Some(f);
            break;
        }
    }
    let Some(server_frame::Frame::Message(up)) = delivered.and_then(|f| f.frame) else {
        anyhow::bail!("no datagram publish arrived")
    };
    assert!(up.payload.starts_with(b"up "));
    assert_eq!(up.publisher.unwrap_or_default().protocol(), Protocol::Wt);
    // A refused datagram publish with a request id is answered on the
    // control stream.
    let mut refused = None;
    for _ in 0..5 {
        c.publish_datagram(42, publish("bad/+", "x"))?;
        if let Ok(Ok(f)) = tokio::time::timeout(Duration::from_secs(1), c.next_pushed()).await {
            refused = Some(f);
            break;
        }
    }
    let refused = refused.ok_or_else(|| anyhow::anyhow!("no error for the refused datagram"))?;
    assert_eq!(refused.req, 42);
    assert!(
        matches!(&refused.frame, Some(server_frame::Frame::Error(e)) if e.code() == ErrorCode::InvalidChannel),
        "{refused:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_channel_does_not_hold_up_another() -> anyhow::Result<()> {
    const SLOW: &str = "hol/slow";
    const FAST: &str = "hol/fast";
    const BULK: usize = 60;
    let gw = TestGateway::start_with(with_quic).await?;
    // Small per-stream windows, so an unread stream blocks quickly.
    let mut transport = wtransport::config::QuicTransportConfig::default();
    transport.stream_receive_window(wtransport::quinn::VarInt::from_u32(16 * 1024));
    let mut opts = gw.wt_options()?;
    opts.client_id = "hol".into();
    opts.transport = Some(Arc::new(transport));
    let mut c = WtClient::connect(&opts).await?;
    c.subscribe(sub(SLOW)).await?;
    c.subscribe(sub(FAST)).await?;
    rest_ok(&gw, SLOW, "first").await?;
    let (mut slow, _) = stream_of(&c, SLOW).await?;
    rest_ok(&gw, FAST, "first").await?;
    let (mut fast, _) = stream_of(&c, FAST).await?;

    // The slow channel's reader stops; its stream backs up far past the
    // client's window (120 KiB against 16 KiB).
    let chunk = vec![b's'; 2 * 1024];
    for _ in 0..BULK {
        rest_ok(&gw, SLOW, chunk.clone()).await?;
    }
    // The fast channel keeps flowing meanwhile.
    for n in 1..=20u64 {
        let (_, serial) = rest_ok(&gw, FAST, format!("f{n}")).await?;
        let m = tokio::time::timeout(Duration::from_secs(5), wt_message(&mut fast)).await??;
        assert_eq!((m.serial, m.payload), (serial, Bytes::from(format!("f{n}"))));
    }
    // Reading again, the slow channel has everything, in order.
    let mut prev = 1;
    for _ in 0..BULK {
        let m = wt_message(&mut slow).await?;
        assert_eq!(m.prev_serial, prev);
        assert_eq!(m.payload.len(), chunk.len());
        prev = m.serial;
    }
    Ok(())
}
