//! Slow consumers: a subscriber that stops reading overflows its bounded
//! outbox, and the channel's policy decides what happens — `disconnect`
//! (close 4000 after a contiguous prefix), `drop-oldest` (a visible hole in
//! the `prev_serial` chain) or `conflate` (the latest message per channel) —
//! while a subscriber that keeps reading receives everything, and no outbox
//! ever holds more bytes than its bound.
//!
//! The slow client's socket has a 4 KiB receive buffer so the server's
//! writes back up quickly; the server's write timeout is long so it does not
//! drop the blocked socket before the test reads.

#[allow(dead_code)] // each test binary uses part of it
mod common_b;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use common_b::{SmallBufClient, admin_session, admin_sessions, disconnect_of, field, metric, metrics_text};
use switchboard::edge::config::{ChannelRuleConfig, Config, SlowConsumer};
use switchboard_proto::{self as proto, client_frame, server_frame};
use switchboard_tests::*;
use tokio::task::JoinHandle;

const OUTBOX: usize = 256 * 1024;
const PAYLOAD: usize = 8 * 1024;
const COUNT: usize = 2000;

fn tweak(cfg: &mut Config, rule: Option<(&str, SlowConsumer)>) {
    cfg.limits.outbox_bytes = OUTBOX;
    cfg.limits.max_message_size = 64 * 1024;
    cfg.websocket.write_timeout = Duration::from_secs(30);
    if let Some((pattern, policy)) = rule {
        cfg.channels.rules.push(ChannelRuleConfig {
            pattern: pattern.into(),
            history_size: None,
            history_ttl: None,
            slow_consumer: Some(policy),
        });
    }
}

/// An 8 KiB text payload naming its index.
fn payload(i: usize) -> Bytes {
    let mut p = format!("m{i:06}-").into_bytes();
    p.resize(PAYLOAD, b'x');
    Bytes::from(p)
}

/// A subscriber that reads `n` messages as fast as it can, in a task; the
/// client comes back too, so its session stays open for the admin checks.
fn read_all(mut c: WsClient, n: usize) -> JoinHandle<anyhow::Result<(WsClient, Vec<proto::Envelope>)>> {
    tokio::spawn(async move {
        let msgs = c.messages(n).await?;
        Ok((c, msgs))
    })
}

/// Publishes `COUNT` messages round-robin over `channels`, each acknowledged;
/// returns the (still connected) publisher.
async fn publish_all(gw: &TestGateway, channels: &[&str]) -> anyhow::Result<WsClient> {
    let mut publisher = WsClient::connect(&gw.ws, Codec::Proto, "publisher").await?;
    for i in 0..COUNT {
        let ch = channels[i % channels.len()];
        let p = proto::Publish { channel: ch.into(), payload: payload(i), ..Default::default() };
        match publisher.publish_frame(p).await?.frame {
            Some(server_frame::Frame::PublishAck(a)) => assert_eq!(a.serial as usize, i / channels.len() + 1),
            other => anyhow::bail!("publish {i} failed: {other:?}"),
        }
    }
    Ok(publisher)
}

/// Every session's queue stayed within its bound; returns the slow one.
async fn check_byte_bounds(gw: &TestGateway) -> anyhow::Result<serde_json::Value> {
    let sessions = admin_sessions(gw).await?;
    assert_eq!(sessions.len(), 3, "sessions: {sessions:?}");
    for s in &sessions {
        assert_eq!(field(s, "queue_capacity"), OUTBOX as u64, "{s}");
        assert!(field(s, "peak_queued_bytes") <= field(s, "queue_capacity"), "queue over its bound: {s}");
        assert!(field(s, "queued_bytes") <= field(s, "queue_capacity"), "queue over its bound: {s}");
    }
    let slow = admin_session(gw, "slow").await?;
    // It really filled up: within one message of the bound.
    assert!(field(&slow, "peak_queued_bytes") > (OUTBOX - 2 * PAYLOAD) as u64, "slow queue never filled: {slow}");
    Ok(slow)
}

/// The fast subscriber got every message of each channel, in serial order.
fn assert_complete(msgs: &[proto::Envelope], channels: &[&str]) {
    assert_eq!(msgs.len(), COUNT);
    let mut last: BTreeMap<&str, u64> = channels.iter().map(|c| (*c, 0)).collect();
    for (i, m) in msgs.iter().enumerate() {
        assert_eq!(m.channel, channels[i % channels.len()]);
        let prev = last.get_mut(m.channel.as_str()).expect("known channel");
        assert_eq!((m.prev_serial, m.serial), (*prev, *prev + 1), "fast subscriber, message {i}");
        assert_eq!(m.payload, payload(i));
        *prev = m.serial;
    }
}

/// Reads messages until every channel reached `last_serial`; checks the
/// order and returns how many holes (`prev_serial` != last seen) appeared.
async fn read_until_latest(
    slow: &mut SmallBufClient,
    channels: &[&str],
    last_serial: u64,
) -> anyhow::Result<(usize, usize)> {
    let mut seen: BTreeMap<String, u64> = channels.iter().map(|c| (c.to_string(), 0)).collect();
    let (mut holes, mut received) = (0, 0);
    while seen.values().any(|s| *s < last_serial) {
        let m = match slow.recv().await?.frame {
            Some(server_frame::Frame::Message(m)) => m,
            other => anyhow::bail!("expected a message, got {other:?}"),
        };
        received += 1;
        let prev = seen.get_mut(&m.channel).expect("known channel");
        assert!(m.serial > *prev, "serials must increase: {} after {prev}", m.serial);
        assert_eq!(m.prev_serial, m.serial - 1);
        if m.prev_serial != *prev {
            holes += 1;
        }
        *prev = m.serial;
    }
    Ok((holes, received))
}

/// The slow session is still open and answers.
async fn still_open(slow: &mut SmallBufClient) -> anyhow::Result<()> {
    let pong = slow.request(client_frame::Frame::Ping(proto::Ping {})).await?;
    assert_eq!(pong.frame, Some(server_frame::Frame::Pong(proto::Pong {})));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_policy_closes_the_slow_subscriber_with_4000() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|cfg| tweak(cfg, None)).await?;
    let addr = gw.gateway.http_addr.expect("http");
    let mut slow = SmallBufClient::connect(addr, "slow").await?;
    slow.subscribe_to("feed").await?;
    let mut fast = WsClient::connect(&gw.ws, Codec::Proto, "fast").await?;
    fast.subscribe_to("feed").await?;
    let fast = read_all(fast, COUNT);
    let before =
        metric(&metrics_text(&gw).await?, "switchboard_slow_consumer_closes_total", r#"protocol="ws""#).unwrap_or(0.0);

    let _publisher = publish_all(&gw, &["feed"]).await?;
    let (_fast, fast_msgs) = tokio::time::timeout(Duration::from_secs(30), fast).await???;
    assert_complete(&fast_msgs, &["feed"]);
    let slow_info = check_byte_bounds(&gw).await?;
    assert_eq!(field(&slow_info, "dropped"), 0);

    // The slow client gets a contiguous prefix, then disconnect, then 4000.
    let mut next = 1u64;
    let disconnect = loop {
        let f = slow.recv().await?;
        match f.frame {
            Some(server_frame::Frame::Message(m)) => {
                assert_eq!((m.serial, m.prev_serial), (next, next - 1), "slow prefix must be contiguous");
                next += 1;
            }
            _ => break f,
        }
    };
    let prefix = next - 1;
    assert!(prefix >= 1 && prefix < COUNT as u64, "slow client got {prefix} of {COUNT}");
    assert_eq!(disconnect_of(&disconnect)?, (4000, "slow consumer".into(), true));
    assert_eq!(slow.closed_with().await?, 4000);

    eventually(WAIT, "the slow session to end", || async { gw.sessions() == 2 }).await?;
    for s in admin_sessions(&gw).await? {
        assert!(field(&s, "peak_queued_bytes") <= field(&s, "queue_capacity"), "{s}");
        assert_ne!(s["client_id"], "slow");
    }
    // Counted once (no other test in this binary closes a slow consumer).
    let closes = || async {
        let text = metrics_text(&gw).await.unwrap_or_default();
        metric(&text, "switchboard_slow_consumer_closes_total", r#"protocol="ws""#).unwrap_or(0.0)
    };
    eventually(WAIT, "the slow close to be counted", || async { closes().await > before }).await?;
    let after = closes().await;
    assert_eq!(after, before + 1.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_oldest_leaves_a_visible_hole_and_keeps_the_newest() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|cfg| tweak(cfg, Some(("lossy/#", SlowConsumer::DropOldest)))).await?;
    let addr = gw.gateway.http_addr.expect("http");
    let mut slow = SmallBufClient::connect(addr, "slow").await?;
    slow.subscribe_to("lossy/feed").await?;
    let mut fast = WsClient::connect(&gw.ws, Codec::Proto, "fast").await?;
    fast.subscribe_to("lossy/feed").await?;
    let fast = read_all(fast, COUNT);

    let _publisher = publish_all(&gw, &["lossy/feed"]).await?;
    let (_fast, fast_msgs) = tokio::time::timeout(Duration::from_secs(30), fast).await???;
    assert_complete(&fast_msgs, &["lossy/feed"]);
    let slow_info = check_byte_bounds(&gw).await?;
    let dropped = field(&slow_info, "dropped");
    assert!(dropped > 0, "nothing dropped: {slow_info}");

    let (holes, received) = read_until_latest(&mut slow, &["lossy/feed"], COUNT as u64).await?;
    assert!(holes >= 1, "no hole in the prev_serial chain");
    assert_eq!(received as u64 + dropped, COUNT as u64, "every message was either delivered or counted as dropped");
    still_open(&mut slow).await?;
    assert_eq!(gw.sessions(), 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflate_ends_with_the_latest_message_per_channel() -> anyhow::Result<()> {
    let channels = ["multi/0", "multi/1", "multi/2", "multi/3"];
    let gw = TestGateway::start_with(|cfg| tweak(cfg, Some(("multi/+", SlowConsumer::Conflate)))).await?;
    let addr = gw.gateway.http_addr.expect("http");
    let mut slow = SmallBufClient::connect(addr, "slow").await?;
    slow.subscribe_to("multi/#").await?;
    let mut fast = WsClient::connect(&gw.ws, Codec::Proto, "fast").await?;
    fast.subscribe_to("multi/+").await?;
    let fast = read_all(fast, COUNT);

    let _publisher = publish_all(&gw, &channels).await?;
    let (_fast, fast_msgs) = tokio::time::timeout(Duration::from_secs(30), fast).await???;
    assert_complete(&fast_msgs, &channels);
    let slow_info = check_byte_bounds(&gw).await?;
    let dropped = field(&slow_info, "dropped");
    assert!(dropped > 0, "nothing conflated: {slow_info}");

    let per_channel = (COUNT / channels.len()) as u64;
    let (holes, received) = read_until_latest(&mut slow, &channels, per_channel).await?;
    assert!(holes >= 1, "no hole in any prev_serial chain");
    assert_eq!(received as u64 + dropped, COUNT as u64, "every message was either delivered or counted as conflated");
    still_open(&mut slow).await?;
    assert_eq!(gw.sessions(), 3);
    Ok(())
}
