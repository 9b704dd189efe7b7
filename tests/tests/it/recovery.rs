//! Recovery, rewind and history: a subscriber that comes back with its last
//! (epoch, serial) gets exactly what it missed — no loss, no duplicates — or
//! an explicit gap; rewind replays exactly the asked-for window; REST history
//! returns the right slices and refuses bad positions.

use super::common_a;

use std::collections::HashMap;
use std::time::Duration;

use common_a::*;
use switchboard_proto::{self as proto, ErrorCode, client_frame, server_frame};
use switchboard_tests::*;

fn state(channel: &str, epoch: &str, serial: u64, recovered: bool) -> proto::ChannelState {
    proto::ChannelState { channel: channel.into(), epoch: epoch.into(), serial, recovered }
}

fn resume(filter: &str, positions: &[(&str, &proto::Position)]) -> proto::Subscribe {
    proto::Subscribe {
        filter: filter.into(),
        positions: positions.iter().map(|(c, p)| (c.to_string(), (*p).clone())).collect(),
        ..Default::default()
    }
}

fn rewind(filter: &str, count: u32, duration_ms: u64) -> proto::Subscribe {
    proto::Subscribe { filter: filter.into(), rewind: Some(proto::Rewind { count, duration_ms }), ..Default::default() }
}

/// Publishes `n` messages `"{prefix}{i}"`; returns the last ack.
async fn publish_n(p: &mut WsClient, channel: &str, prefix: &str, n: usize) -> anyhow::Result<proto::PublishAck> {
    let payloads = (0..n).map(|i| format!("{prefix}{i}").into_bytes());
    let acks = publish_pipelined(p, channel, payloads, 16).await?;
    acks.into_iter().last().ok_or_else(|| anyhow::anyhow!("published nothing"))
}

/// A subscriber reads part of a stream, goes away (abruptly or with a clean
/// close), misses messages published meanwhile and while it reconnects, and
/// resumes from its last position: it gets every later serial exactly once.
async fn recover_mid_stream(codec: Codec, abrupt: bool) -> anyhow::Result<()> {
    const CH: &str = "rec/stream";
    let gw = TestGateway::start().await?;
    let mut publisher = WsClient::connect(&gw.ws, Codec::Proto, "pub").await?;
    let mut sub = WsClient::connect(&gw.ws, codec, "sub").await?;
    sub.subscribe_to(CH).await?;

    let ack = publish_n(&mut publisher, CH, "m", 20).await?;
    assert_eq!(ack.serial, 20);
    // Read only half: the rest is in flight when the subscriber goes away.
    let seen = sub.messages(10).await?;
    assert_contiguous(&seen, CH, &ack.epoch, 1, 10);
    let last = pos(&seen[9].epoch, seen[9].serial);
    if abrupt {
        sub.drop_abruptly();
    } else {
        sub.close().await?;
    }
    eventually(SHORT, "the old session to end", || async { gw.sessions() == 1 }).await?;

    // Missed while away...
    assert_eq!(publish_n(&mut publisher, CH, "away", 10).await?.serial, 30);
    // ...and still being published while it reconnects.
    let background = tokio::spawn(async move {
        let ack = publish_n(&mut publisher, CH, "during", 200).await?;
        anyhow::Ok((publisher, ack))
    });
    let mut sub = WsClient::connect(&gw.ws, codec, "sub").await?;
    let subscribed = sub.subscribe(resume(CH, &[(CH, &last)])).await?;
    assert_eq!(subscribed.filter, CH);
    assert_eq!(subscribed.channels.len(), 1);
    let st = &subscribed.channels[0];
    assert_eq!((st.channel.as_str(), st.epoch.as_str(), st.recovered), (CH, last.epoch.as_str(), true));
    assert!((30..=230).contains(&st.serial), "channel serial {} at resubscribe", st.serial);

    let (mut publisher, ack) = background.await??;
    assert_eq!(ack.serial, 230);
    let got = sub.messages(220).await?;
    assert_contiguous(&got, CH, &last.epoch, 11, 230);
    let payloads: Vec<String> = got.iter().map(|m| String::from_utf8_lossy(&m.payload).into_owned()).collect();
    assert_eq!(&payloads[..10], (10..20).map(|i| format!("m{i}")).collect::<Vec<_>>());
    assert_eq!(&payloads[10..20], (0..10).map(|i| format!("away{i}")).collect::<Vec<_>>());
    assert_eq!(&payloads[20..], (0..200).map(|i| format!("during{i}")).collect::<Vec<_>>());

    // Then live, and nothing twice.
    let live = publisher.publish(CH, b"live", "").await?;
    let m = sub.next_message().await?;
    assert_eq!((m.serial, m.prev_serial, &m.payload[..]), (231, 230, &b"live"[..]));
    assert_eq!(live.serial, 231);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovers_after_abrupt_drop_json() -> anyhow::Result<()> {
    recover_mid_stream(Codec::Json, true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovers_after_abrupt_drop_proto() -> anyhow::Result<()> {
    recover_mid_stream(Codec::Proto, true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovers_after_clean_close_json() -> anyhow::Result<()> {
    recover_mid_stream(Codec::Json, false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovers_after_clean_close_proto() -> anyhow::Result<()> {
    recover_mid_stream(Codec::Proto, false).await
}

#[tokio::test]
async fn trimmed_history_gives_a_gap_then_live_messages() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|cfg| cfg.channels.history_size = 10).await?;
    let rest = Rest::new(&gw.http);
    let mut publisher = WsClient::connect(&gw.ws, Codec::Proto, "pub").await?;
    for (codec, ch) in [(Codec::Json, "trim/json"), (Codec::Proto, "trim/proto")] {
        let mut sub = WsClient::connect(&gw.ws, codec, "sub").await?;
        sub.subscribe_to(ch).await?;
        let first = publish_n(&mut publisher, ch, "m", 5).await?;
        let seen = sub.messages(5).await?;
        assert_contiguous(&seen, ch, &first.epoch, 1, 5);
        sub.close().await?;

        assert_eq!(publish_n(&mut publisher, ch, "away", 50).await?.serial, 55);
        let (status, h) = rest.get(&format!("/v1/channels/{ch}/history")).await?;
        assert_eq!(status, 200, "{h}");
        let kept: Vec<u64> =
            h["messages"].as_array().into_iter().flatten().filter_map(|m| m["serial"].as_u64()).collect();
        assert_eq!(kept, (46..=55).collect::<Vec<_>>(), "history keeps the last 10");

        let from = pos(&first.epoch, 5);
        let to = pos(&first.epoch, 55);
        let mut sub = WsClient::connect(&gw.ws, codec, "sub").await?;
        let subscribed = sub.subscribe(resume(ch, &[(ch, &from)])).await?;
        assert_eq!(subscribed.channels, vec![state(ch, &first.epoch, 55, false)], "{codec:?}");
        let gap = next_gap(&mut sub).await?;
        let want = proto::Gap { channel: ch.into(), from: Some(from), to: Some(to), reason: "trimmed".into() };
        assert_eq!(gap, want, "{codec:?}");

        // No partial replay after the gap: the next message is live.
        publisher.publish(ch, b"live", "").await?;
        let m = sub.next_message().await?;
        assert_eq!((m.serial, m.prev_serial, &m.payload[..]), (56, 55, &b"live"[..]), "{codec:?}");
    }
    Ok(())
}

/// A position from another epoch (the channel's history was lost, e.g. a
/// new gateway process): a gap first, then every message the new epoch
/// holds from its first — not only what comes after the resume.
#[tokio::test]
async fn wrong_epoch_gives_an_epoch_changed_gap_then_the_new_epoch_from_its_first() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let mut publisher = WsClient::connect(&gw.ws, Codec::Json, "pub").await?;
    for (codec, ch) in [(Codec::Json, "epoch/json"), (Codec::Proto, "epoch/proto")] {
        let ack = publish_n(&mut publisher, ch, "m", 3).await?;
        let stale = pos("stale00000", 2);
        assert_ne!(stale.epoch, ack.epoch);
        let mut sub = WsClient::connect(&gw.ws, codec, "sub").await?;
        let subscribed = sub.subscribe(resume(ch, &[(ch, &stale)])).await?;
        assert_eq!(subscribed.channels, vec![state(ch, &ack.epoch, 3, false)], "{codec:?}");
        let gap = next_gap(&mut sub).await?;
        let want = proto::Gap {
            channel: ch.into(),
            from: Some(stale),
            to: Some(pos(&ack.epoch, 0)),
            reason: "epoch_changed".into(),
        };
        assert_eq!(gap, want, "{codec:?}");
        let replayed = sub.messages(3).await?;
        let got: Vec<(&str, u64, u64)> = replayed.iter().map(|m| (m.epoch.as_str(), m.serial, m.prev_serial)).collect();
        assert_eq!(got, [(ack.epoch.as_str(), 1, 0), (ack.epoch.as_str(), 2, 1), (ack.epoch.as_str(), 3, 2)]);
        publisher.publish(ch, b"live", "").await?;
        let m = sub.next_message().await?;
        assert_eq!((m.serial, &m.payload[..]), (4, &b"live"[..]), "{codec:?}");
    }
    Ok(())
}

#[tokio::test]
async fn recovering_at_the_current_position_replays_nothing() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let mut publisher = WsClient::connect(&gw.ws, Codec::Proto, "pub").await?;
    for (codec, ch) in [(Codec::Json, "current/json"), (Codec::Proto, "current/proto")] {
        let ack = publish_n(&mut publisher, ch, "m", 4).await?;
        let mut sub = WsClient::connect(&gw.ws, codec, "sub").await?;
        let subscribed = sub.subscribe(resume(ch, &[(ch, &pos(&ack.epoch, 4))])).await?;
        assert_eq!(subscribed.channels, vec![state(ch, &ack.epoch, 4, true)], "{codec:?}");
        publisher.publish(ch, b"live", "").await?;
        let m = sub.next_message().await?;
        assert_eq!((m.serial, &m.payload[..]), (5, &b"live"[..]), "{codec:?}");
    }
    Ok(())
}

#[tokio::test]
async fn position_ahead_of_the_channel_is_refused_and_the_connection_stays_usable() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let mut publisher = WsClient::connect(&gw.ws, Codec::Proto, "pub").await?;
    for (codec, ch) in [(Codec::Json, "ahead/json"), (Codec::Proto, "ahead/proto")] {
        let ack = publish_n(&mut publisher, ch, "m", 3).await?;
        let mut sub = WsClient::connect(&gw.ws, codec, "sub").await?;
        let ahead = pos(&ack.epoch, 10);
        let reply = sub.request(client_frame::Frame::Subscribe(resume(ch, &[(ch, &ahead)]))).await?;
        match reply.frame {
            Some(server_frame::Frame::Error(e)) => assert_eq!(e.code(), ErrorCode::BadPosition, "{codec:?}: {e:?}"),
            other => panic!("{codec:?}: expected an error frame, got {other:?}"),
        }
        // The refused subscribe registered nothing...
        publisher.publish(ch, b"not for you", "").await?;
        // ...and the connection still works.
        let subscribed = sub.subscribe_to(ch).await?;
        assert_eq!(subscribed.channels, vec![state(ch, &ack.epoch, 4, false)], "{codec:?}");
        publisher.publish(ch, b"for you", "").await?;
        let m = sub.next_message().await?;
        assert_eq!((m.serial, &m.payload[..]), (5, &b"for you"[..]), "{codec:?}");
    }
    Ok(())
}

#[tokio::test]
async fn rewind_count_replays_exactly_the_last_n() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let mut publisher = WsClient::connect(&gw.ws, Codec::Proto, "pub").await?;
    let cases = [(Codec::Json, 5, 16), (Codec::Proto, 5, 16), (Codec::Json, 50, 1), (Codec::Proto, 1, 20)];
    for (i, (codec, count, from)) in cases.into_iter().enumerate() {
        let ch = format!("rw/{i}");
        let ack = publish_n(&mut publisher, &ch, "m", 20).await?;
        let mut sub = WsClient::connect(&gw.ws, codec, "sub").await?;
        let subscribed = sub.subscribe(rewind(&ch, count, 0)).await?;
        assert_eq!(subscribed.channels, vec![state(&ch, &ack.epoch, 20, false)], "{codec:?} rewind {count}");
        let got = sub.messages(21 - from as usize).await?;
        assert_contiguous(&got, &ch, &ack.epoch, from, 20);
        assert_eq!(&got[0].payload[..], format!("m{}", from - 1).as_bytes());
        // Then live: the replay ended with the last message.
        publisher.publish(&ch, b"after", "").await?;
        let m = sub.next_message().await?;
        assert_eq!((m.serial, &m.payload[..]), (21, &b"after"[..]), "{codec:?} rewind {count}");
    }
    Ok(())
}

#[tokio::test]
async fn rewind_duration_replays_only_messages_inside_the_window() -> anyhow::Result<()> {
    const CH: &str = "rw/age";
    let gw = TestGateway::start().await?;
    let mut publisher = WsClient::connect(&gw.ws, Codec::Json, "pub").await?;
    let old = publish_n(&mut publisher, CH, "old", 5).await?;
    // About message age, not waiting for an effect: the first batch must be
    // older than the rewind window.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let new = publish_n(&mut publisher, CH, "new", 5).await?;
    assert_eq!((old.serial, new.serial), (5, 10));
    let mut subs = Vec::new();
    for codec in [Codec::Json, Codec::Proto] {
        let mut sub = WsClient::connect(&gw.ws, codec, "sub").await?;
        let subscribed = sub.subscribe(rewind(CH, 0, 1000)).await?;
        assert_eq!(subscribed.channels, vec![state(CH, &new.epoch, 10, false)]);
        subs.push((codec, sub));
    }
    publisher.publish(CH, b"live", "").await?;
    for (codec, sub) in &mut subs {
        let got = sub.messages(6).await?;
        assert_contiguous(&got, CH, &new.epoch, 6, 11);
        let payloads: Vec<&[u8]> = got.iter().map(|m| &m.payload[..]).collect();
        let want: Vec<&[u8]> = vec![b"new0", b"new1", b"new2", b"new3", b"new4", b"live"];
        assert_eq!(payloads, want, "{codec:?}");
    }
    Ok(())
}

/// Recovery through a wildcard filter with positions for two channels.
async fn recover_wildcard(codec: Codec) -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let rest = Rest::new(&gw.http);
    let (a, b) = ("w/a", "w/b");
    let mut sub = WsClient::connect(&gw.ws, codec, "sub").await?;
    sub.subscribe_to("w/+").await?;
    for i in 0..3 {
        rest.publish_ok(a, format!("a{i}").as_bytes()).await?;
        rest.publish_ok(b, format!("b{i}").as_bytes()).await?;
    }
    let seen = sub.messages(6).await?;
    let mut last: HashMap<String, proto::Position> = HashMap::new();
    for m in &seen {
        last.insert(m.channel.clone(), pos(&m.epoch, m.serial));
    }
    assert_eq!((last[a].serial, last[b].serial), (3, 3));
    sub.drop_abruptly();

    for i in 3..7 {
        rest.publish_ok(a, format!("a{i}").as_bytes()).await?;
        rest.publish_ok(b, format!("b{i}").as_bytes()).await?;
    }
    let mut sub = WsClient::connect(&gw.ws, codec, "sub").await?;
    let mut subscribed = sub.subscribe(resume("w/+", &[(a, &last[a]), (b, &last[b])])).await?;
    subscribed.channels.sort_by(|x, y| x.channel.cmp(&y.channel));
    assert_eq!(
        subscribed.channels,
        vec![state(a, &last[a].epoch, 7, true), state(b, &last[b].epoch, 7, true)],
        "{codec:?}"
    );
    let got = sub.messages(8).await?;
    for (ch, prefix) in [(a, "a"), (b, "b")] {
        let mine: Vec<proto::Envelope> = got.iter().filter(|m| m.channel == ch).cloned().collect();
        assert_contiguous(&mine, ch, &last[ch].epoch, 4, 7);
        let payloads: Vec<String> = mine.iter().map(|m| String::from_utf8_lossy(&m.payload).into_owned()).collect();
        assert_eq!(payloads, (3..7).map(|i| format!("{prefix}{i}")).collect::<Vec<_>>(), "{codec:?}");
    }
    // Live again on both, nothing replayed twice.
    rest.publish_ok(b, b"live-b").await?;
    rest.publish_ok(a, b"live-a").await?;
    let live = sub.messages(2).await?;
    let live: Vec<(&str, u64, &[u8])> = live.iter().map(|m| (m.channel.as_str(), m.serial, &m.payload[..])).collect();
    assert_eq!(live, vec![(b, 8, &b"live-b"[..]), (a, 8, &b"live-a"[..])], "{codec:?}");
    Ok(())
}

#[tokio::test]
async fn recovers_two_channels_through_a_wildcard_json() -> anyhow::Result<()> {
    recover_wildcard(Codec::Json).await
}

#[tokio::test]
async fn recovers_two_channels_through_a_wildcard_proto() -> anyhow::Result<()> {
    recover_wildcard(Codec::Proto).await
}

fn serials(h: &serde_json::Value) -> Vec<u64> {
    h["messages"].as_array().into_iter().flatten().filter_map(|m| m["serial"].as_u64()).collect()
}

#[tokio::test]
async fn rest_history_returns_the_right_slices() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let rest = Rest::new(&gw.http);
    let mut publisher = WsClient::connect(&gw.ws, Codec::Proto, "pub").await?;
    let mut epoch = String::new();
    for i in 1..=20u64 {
        // Both front ends feed the same history.
        let (e, serial) = if i % 2 == 0 {
            rest.publish_ok("h/x", format!("m{i}").as_bytes()).await?
        } else {
            let ack = publisher.publish("h/x", format!("m{i}").as_bytes(), "").await?;
            (ack.epoch, ack.serial)
        };
        assert_eq!(serial, i);
        epoch = e;
    }

    let (status, all) = rest.get("/v1/channels/h/x/history").await?;
    assert_eq!(status, 200, "{all}");
    assert_eq!((all["type"].as_str(), all["channel"].as_str()), (Some("history"), Some("h/x")));
    assert_eq!((all["epoch"].as_str(), all["serial"].as_u64()), (Some(epoch.as_str()), Some(20)));
    assert_eq!(serials(&all), (1..=20).collect::<Vec<_>>());
    for (i, m) in all["messages"].as_array().into_iter().flatten().enumerate() {
        assert_eq!(m["text"].as_str(), Some(format!("m{}", i + 1).as_str()), "{m}");
        assert_eq!((m["epoch"].as_str(), m["channel"].as_str()), (Some(epoch.as_str()), Some("h/x")));
    }

    let slices: [(String, Vec<u64>); 10] = [
        (format!("since={epoch}:15"), (16..=20).collect()),
        (format!("since={epoch}:0"), (1..=20).collect()),
        (format!("since={epoch}:20"), vec![]),
        ("limit=3".into(), vec![1, 2, 3]),
        (format!("since={epoch}:10&limit=3"), vec![11, 12, 13]),
        ("reverse=1&limit=3".into(), vec![20, 19, 18]),
        ("reverse=true".into(), (1..=20).rev().collect()),
        (format!("since={epoch}:15&reverse=1"), vec![20, 19, 18, 17, 16]),
        (format!("since={epoch}:10&limit=2&reverse=1"), vec![20, 19]),
        ("reverse=0&limit=1".into(), vec![1]),
    ];
    for (query, want) in slices {
        let (status, h) = rest.get(&format!("/v1/channels/h/x/history?{query}")).await?;
        assert_eq!(status, 200, "{query}: {h}");
        assert_eq!(serials(&h), want, "{query}");
        assert_eq!(h["serial"].as_u64(), Some(20), "{query}");
    }
    // The percent-encoded name is the same channel.
    let (status, h) = rest.get("/v1/channels/h%2Fx/history?limit=2").await?;
    assert_eq!((status, serials(&h)), (200, vec![1, 2]), "{h}");

    let refused: [(String, u16, &str); 7] = [
        ("since=garbage".into(), 400, "bad_position"),
        (format!("since={epoch}"), 400, "bad_position"),
        (format!("since={epoch}:x"), 400, "bad_position"),
        ("since=otherepoch:1".into(), 409, "bad_position"),
        (format!("since={epoch}:21"), 409, "bad_position"),
        ("limit=many".into(), 400, "bad_request"),
        ("page=2".into(), 400, "bad_request"),
    ];
    for (query, want_status, want_code) in refused {
        let (status, body) = rest.get(&format!("/v1/channels/h/x/history?{query}")).await?;
        assert_eq!((status, body["error"]["code"].as_str()), (want_status, Some(want_code)), "{query}: {body}");
        assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{query}: {body}");
    }
    Ok(())
}
