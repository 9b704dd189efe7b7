//! Unit tests of [`LocalEngine`] in memory: the state machine is driven directly, with
//! explicit times, and what reaches each session is read from its [`Outbox`].

use super::*;

use std::time::Duration;

use switchboard_protocols::port::{CloseReason, SlowPolicy};

use crate::core::engine::ChannelRule;

/// An arbitrary "now" in Unix milliseconds.
const T0: i64 = 1_700_000_000_000;

/// Big enough that nothing in these tests overflows it.
const BIG: usize = 1 << 20;

fn caller(session: SessionId, client: &str) -> Caller {
    Caller {
        session,
        client_id: client.into(),
        connection_id: format!("conn-{session}").into(),
        protocol: proto::Protocol::Ws,
    }
}

fn policy(history_size: usize, history_ttl_secs: u64, slow_policy: SlowPolicy) -> ChannelPolicy {
    ChannelPolicy { history_size, history_ttl: Duration::from_secs(history_ttl_secs), slow_policy }
}

fn rule(pattern: &str, policy: ChannelPolicy) -> ChannelRule {
    ChannelRule { pattern: pattern.into(), policy }
}

fn state() -> LocalEngine {
    LocalEngine::new(EngineConfig::default())
}

fn state_with_rules(rules: Vec<ChannelRule>) -> LocalEngine {
    LocalEngine::new(EngineConfig { rules, ..EngineConfig::default() })
}

/// Attaches session `id` (client `client`) with an outbox of `cap` bytes.
fn attach(st: &LocalEngine, id: SessionId, client: &str, cap: usize) -> Arc<Outbox> {
    let outbox = Outbox::new(cap);
    st.attach(&caller(id, client), outbox.clone());
    outbox
}

fn publish_req(channel: &str, payload: &str) -> proto::Publish {
    proto::Publish { channel: channel.into(), payload: Bytes::from(payload.to_owned()), ..Default::default() }
}

/// Publishes `payload` on `channel` as session 99.
fn publish(st: &LocalEngine, channel: &str, payload: &str, now: i64) -> proto::PublishAck {
    st.publish(&caller(99, "publisher"), publish_req(channel, payload), now)
}

fn publish_with_id(st: &LocalEngine, channel: &str, payload: &str, id: &str, now: i64) -> proto::PublishAck {
    let req = proto::Publish { id: id.into(), ..publish_req(channel, payload) };
    st.publish(&caller(99, "publisher"), req, now)
}

fn publish_retained(st: &LocalEngine, channel: &str, payload: &str, now: i64) -> proto::PublishAck {
    let req = proto::Publish { retain: true, ..publish_req(channel, payload) };
    st.publish(&caller(99, "publisher"), req, now)
}

fn sub(filter: &str) -> proto::Subscribe {
    proto::Subscribe { filter: filter.into(), ..Default::default() }
}

fn sub_from(filter: &str, positions: &[(&str, proto::Position)]) -> proto::Subscribe {
    proto::Subscribe {
        filter: filter.into(),
        positions: positions.iter().map(|(c, p)| (c.to_string(), p.clone())).collect(),
        ..Default::default()
    }
}

fn sub_rewind(filter: &str, count: u32, duration_ms: u64) -> proto::Subscribe {
    proto::Subscribe { filter: filter.into(), rewind: Some(proto::Rewind { count, duration_ms }), ..Default::default() }
}

fn subscribe(st: &LocalEngine, session: SessionId, req: &proto::Subscribe, now: i64) -> SubscribeOutcome {
    st.subscribe(session, req, now).expect("subscribe succeeds")
}

fn pos(epoch: &str, serial: u64) -> proto::Position {
    proto::Position { epoch: epoch.into(), serial }
}

/// Everything queued in `ob` (which must be open).
fn drain(ob: &Outbox) -> Vec<Outbound> {
    let mut out = Vec::new();
    ob.drain(&mut out).expect("outbox is open");
    out
}

/// The envelopes of `items`; a gap is a test failure.
fn envelopes(items: &[Outbound]) -> Vec<proto::Envelope> {
    items
        .iter()
        .map(|o| match o {
            Outbound::Message(d) => d.envelope.clone(),
            Outbound::Gap(g) => panic!("unexpected gap {g:?}"),
        })
        .collect()
}

fn serials(items: &[Outbound]) -> Vec<u64> {
    envelopes(items).iter().map(|e| e.serial).collect()
}

fn channel_serials(items: &[Outbound]) -> Vec<(String, u64)> {
    envelopes(items).into_iter().map(|e| (e.channel, e.serial)).collect()
}

fn payloads(items: &[Outbound]) -> Vec<String> {
    envelopes(items).iter().map(|e| String::from_utf8(e.payload.to_vec()).expect("utf-8")).collect()
}

fn history(st: &LocalEngine, channel: &str, now: i64) -> proto::HistoryResult {
    let req = proto::History { channel: channel.into(), ..Default::default() };
    st.history(&req, now).expect("history succeeds")
}

fn history_serials(st: &LocalEngine, channel: &str, now: i64) -> Vec<u64> {
    history(st, channel, now).messages.iter().map(|e| e.serial).collect()
}

fn member_ids(st: &LocalEngine, channel: &str) -> Vec<(String, String, String)> {
    st.presence_members(channel)
        .members
        .into_iter()
        .map(|m| (m.client_id, m.connection_id, String::from_utf8(m.data.to_vec()).expect("utf-8")))
        .collect()
}

/// (kind, client id, connection id, data) of presence events.
fn presence_events(items: &[Outbound]) -> Vec<(proto::Kind, String, String, String)> {
    envelopes(items)
        .into_iter()
        .map(|e| {
            let p = e.publisher.clone().expect("presence events carry a publisher");
            (e.kind(), p.client_id, p.connection_id, String::from_utf8(e.payload.to_vec()).expect("utf-8"))
        })
        .collect()
}

fn ev(kind: proto::Kind, client: &str, conn: &str, data: &str) -> (proto::Kind, String, String, String) {
    (kind, client.into(), conn.into(), data.into())
}

// ---------------------------------------------------------------- order

#[test]
fn serials_increase_by_one_with_unbroken_prev_serial_chain() {
    let st = state();
    let ob = attach(&st, 1, "sub", BIG);
    subscribe(&st, 1, &sub("orders"), T0);

    let mut epoch = String::new();
    for i in 1..=50u64 {
        let ack = publish(&st, "orders", &format!("m{i}"), T0 + i as i64);
        assert_eq!(ack.channel, "orders");
        assert_eq!(ack.serial, i);
        assert!(!ack.duplicate);
        if i == 1 {
            epoch = ack.epoch.clone();
        }
        assert_eq!(ack.epoch, epoch, "the epoch never changes within a channel's life");
    }
    assert_eq!(epoch.len(), 10);
    assert!(epoch.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_lowercase()), "{epoch}");

    let got = envelopes(&drain(&ob));
    assert_eq!(got.len(), 50);
    for (i, e) in got.iter().enumerate() {
        let serial = i as u64 + 1;
        assert_eq!(e.channel, "orders");
        assert_eq!(e.serial, serial);
        assert_eq!(e.prev_serial, serial - 1);
        assert_eq!(e.epoch, epoch);
        assert_eq!(e.timestamp, T0 + serial as i64);
        assert_eq!(e.payload, Bytes::from(format!("m{serial}")));
        assert_eq!(e.kind(), proto::Kind::Message);
    }
}

#[test]
fn envelope_carries_publisher_and_request_fields() {
    let st = state();
    let ob = attach(&st, 1, "sub", BIG);
    subscribe(&st, 1, &sub("a"), T0);
    let req = proto::Publish {
        content_type: "text/plain".into(),
        headers: [("k".to_string(), "v".to_string())].into_iter().collect(),
        ..publish_req("a", "hello")
    };
    let publisher = Caller { protocol: proto::Protocol::Mqtt, ..caller(7, "alice") };
    st.publish(&publisher, req, T0);

    let got = envelopes(&drain(&ob));
    assert_eq!(got.len(), 1);
    let e = &got[0];
    assert_eq!(e.content_type, "text/plain");
    assert_eq!(e.headers.get("k").map(String::as_str), Some("v"));
    assert!(!e.retain);
    let p = e.publisher.as_ref().expect("publisher set");
    assert_eq!(p.client_id, "alice");
    assert_eq!(p.connection_id, "conn-7");
    assert_eq!(p.node, "node-1");
    assert_eq!(p.protocol(), proto::Protocol::Mqtt);
}

#[test]
fn channels_have_independent_serials_and_epochs() {
    let st = state();
    let ob = attach(&st, 1, "sub", BIG);
    subscribe(&st, 1, &sub("#"), T0);

    let mut acks = Vec::new();
    for i in 0..6 {
        let channel = if i % 3 == 0 { "b" } else { "a" };
        acks.push(publish(&st, channel, "x", T0 + i));
    }
    let a: Vec<u64> = acks.iter().filter(|k| k.channel == "a").map(|k| k.serial).collect();
    let b: Vec<u64> = acks.iter().filter(|k| k.channel == "b").map(|k| k.serial).collect();
    assert_eq!(a, vec![1, 2, 3, 4]);
    assert_eq!(b, vec![1, 2]);
    assert_ne!(acks[0].epoch, acks[1].epoch, "each channel has its own epoch");

    let got = envelopes(&drain(&ob));
    let chain = |ch: &str| -> Vec<(u64, u64)> {
        got.iter().filter(|e| e.channel == ch).map(|e| (e.prev_serial, e.serial)).collect()
    };
    assert_eq!(chain("a"), vec![(0, 1), (1, 2), (2, 3), (3, 4)]);
    assert_eq!(chain("b"), vec![(0, 1), (1, 2)]);
}

// ---------------------------------------------------------------- fan-out

#[test]
fn fanout_matches_exact_plus_and_hash_filters() {
    let st = state();
    let filters = ["a/b", "a/+", "a/#", "#", "+/b"];
    let outboxes: Vec<Arc<Outbox>> = filters
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let id = i as SessionId + 1;
            let ob = attach(&st, id, "sub", BIG);
            subscribe(&st, id, &sub(f), T0);
            ob
        })
        .collect();

    for channel in ["a/b", "a/c", "a", "a/b/c", "x/b", "b"] {
        publish(&st, channel, channel, T0);
    }

    let expected: [&[&str]; 5] = [
        &["a/b"],
        &["a/b", "a/c"],
        &["a/b", "a/c", "a", "a/b/c"],
        &["a/b", "a/c", "a", "a/b/c", "x/b", "b"],
        &["a/b", "x/b"],
    ];
    for ((filter, ob), want) in filters.iter().zip(&outboxes).zip(expected) {
        let got: Vec<String> = envelopes(&drain(ob)).into_iter().map(|e| e.channel).collect();
        assert_eq!(got, want, "filter {filter}");
    }
}

#[test]
fn overlapping_filters_deliver_once() {
    let st = state();
    let ob = attach(&st, 1, "sub", BIG);
    for f in ["a/b", "a/+", "a/#", "#", "+/b"] {
        subscribe(&st, 1, &sub(f), T0);
    }
    let other = attach(&st, 2, "sub", BIG);
    subscribe(&st, 2, &sub("a/b"), T0);
    assert_eq!(st.stats().subscriptions, 6);

    publish(&st, "a/b", "one", T0);
    publish(&st, "a/b", "two", T0);
    assert_eq!(serials(&drain(&ob)), vec![1, 2]);
    assert_eq!(serials(&drain(&other)), vec![1, 2]);
}

#[test]
fn unsubscribe_stops_delivery() {
    let st = state();
    let ob = attach(&st, 1, "sub", BIG);
    subscribe(&st, 1, &sub("a/+"), T0);
    subscribe(&st, 1, &sub("b"), T0);

    publish(&st, "a/x", "1", T0);
    st.unsubscribe(1, "a/+").expect("subscribed");
    publish(&st, "a/x", "2", T0);
    publish(&st, "b", "3", T0);

    assert_eq!(payloads(&drain(&ob)), vec!["1", "3"]);
    assert_eq!(st.stats().subscriptions, 1);
}

#[test]
fn unsubscribe_errors() {
    let st = state();
    attach(&st, 1, "sub", BIG);
    subscribe(&st, 1, &sub("a"), T0);

    let e = st.unsubscribe(1, "never").unwrap_err();
    assert_eq!(e.code, ErrorCode::NotSubscribed);
    st.unsubscribe(1, "a").expect("subscribed");
    assert_eq!(st.unsubscribe(1, "a").unwrap_err().code, ErrorCode::NotSubscribed, "twice");
    assert_eq!(st.unsubscribe(42, "a").unwrap_err().code, ErrorCode::NotConnected);
    assert_eq!(st.subscribe(42, &sub("a"), T0).unwrap_err().code, ErrorCode::NotConnected);
    assert_eq!(st.stats().subscriptions, 0);
}

#[test]
fn detach_removes_subscriptions() {
    let st = state();
    let ob = attach(&st, 1, "sub", BIG);
    subscribe(&st, 1, &sub("a"), T0);
    subscribe(&st, 1, &proto::Subscribe { presence: true, ..sub("b/#") }, T0);
    assert_eq!(st.stats().subscriptions, 3, "b/# and its presence companion");

    st.detach(1, CloseKind::Clean, T0);
    assert_eq!(st.stats().subscriptions, 0);
    publish(&st, "a", "x", T0);
    assert!(drain(&ob).is_empty());
}

/// MQTT clients subscribe to `$presence/<channel>` themselves (the router
/// allows it), independently of `<channel>`; the two must not be one.
#[test]
fn unsubscribing_a_channel_keeps_an_explicit_presence_subscription() {
    let st = state();
    let ob = attach(&st, 1, "mqtt", BIG);
    subscribe(&st, 1, &sub("$presence/chat"), T0);
    subscribe(&st, 1, &sub("chat"), T0);
    st.unsubscribe(1, "chat").expect("subscribed");
    assert_eq!(st.stats().subscriptions, 1, "$presence/chat is still subscribed");

    attach(&st, 2, "alice", BIG);
    st.presence_enter(&caller(2, "alice"), "chat", Bytes::from("d"), false, T0).expect("enter");
    assert_eq!(presence_events(&drain(&ob)), vec![ev(proto::Kind::PresenceEnter, "alice", "conn-2", "d")]);

    // And "chat" itself was never subscribed by this session.
    attach(&st, 3, "mqtt", BIG);
    subscribe(&st, 3, &sub("$presence/chat"), T0);
    assert_eq!(st.unsubscribe(3, "chat").unwrap_err().code, ErrorCode::NotSubscribed);
}

// ---------------------------------------------------------------- history

#[test]
fn history_is_bounded_by_count() {
    let st = state_with_rules(vec![rule("capped/#", policy(3, 600, SlowPolicy::Disconnect))]);
    for i in 1..=5 {
        publish(&st, "capped/x", &format!("m{i}"), T0);
        publish(&st, "free", &format!("m{i}"), T0);
    }
    let h = history(&st, "capped/x", T0);
    assert_eq!(h.serial, 5);
    assert_eq!(h.messages.iter().map(|e| e.serial).collect::<Vec<_>>(), vec![3, 4, 5]);
    assert_eq!(
        h.messages.iter().map(|e| e.payload.clone()).collect::<Vec<_>>(),
        vec![Bytes::from("m3"), Bytes::from("m4"), Bytes::from("m5")]
    );
    assert_eq!(history_serials(&st, "free", T0), vec![1, 2, 3, 4, 5], "the default policy keeps 1000");
}

#[test]
fn history_is_bounded_by_age() {
    let st = state_with_rules(vec![rule("short", policy(100, 10, SlowPolicy::Disconnect))]);
    publish(&st, "short", "1", T0);
    publish(&st, "short", "2", T0 + 4_000);
    publish(&st, "short", "3", T0 + 8_000);

    assert_eq!(history_serials(&st, "short", T0 + 9_999), vec![1, 2, 3]);
    assert_eq!(history_serials(&st, "short", T0 + 12_000), vec![2, 3]);
    assert_eq!(history_serials(&st, "short", T0 + 17_999), vec![3]);
    let h = history(&st, "short", T0 + 18_001);
    assert!(h.messages.is_empty());
    assert_eq!(h.serial, 3, "the position survives its history");
}

#[test]
fn history_since_limit_and_reverse() {
    let st = LocalEngine::new(EngineConfig { history_page_max: 4, ..EngineConfig::default() });
    let mut epoch = String::new();
    for i in 1..=10 {
        epoch = publish(&st, "h", &i.to_string(), T0).epoch;
    }
    let query = |st: &LocalEngine, since: Option<u64>, limit: u32, reverse: bool| -> Vec<u64> {
        let req = proto::History { channel: "h".into(), since: since.map(|s| pos(&epoch, s)), limit, reverse };
        let res = st.history(&req, T0).expect("history");
        assert_eq!(res.channel, "h");
        assert_eq!(res.epoch, epoch);
        assert_eq!(res.serial, 10);
        res.messages.iter().map(|e| e.serial).collect()
    };

    assert_eq!(query(&st, None, 0, false), vec![1, 2, 3, 4], "page max applies");
    assert_eq!(query(&st, None, 100, false), vec![1, 2, 3, 4], "limit is capped by the page max");
    assert_eq!(query(&st, None, 2, false), vec![1, 2]);
    assert_eq!(query(&st, Some(4), 3, false), vec![5, 6, 7]);
    assert_eq!(query(&st, Some(7), 0, false), vec![8, 9, 10]);
    assert_eq!(query(&st, Some(0), 0, true), vec![10, 9, 8, 7]);
    assert_eq!(query(&st, Some(4), 3, true), vec![10, 9, 8]);
    assert_eq!(query(&st, Some(8), 0, true), vec![10, 9]);
    assert_eq!(query(&st, Some(10), 0, false), Vec::<u64>::new(), "at the top");
}

#[test]
fn history_rejects_bad_positions() {
    let st = state();
    let epoch = publish(&st, "h", "1", T0).epoch;
    publish(&st, "h", "2", T0);

    let bad = |st: &LocalEngine, channel: &str, since: proto::Position| -> ErrorCode {
        let req = proto::History { channel: channel.into(), since: Some(since), ..Default::default() };
        st.history(&req, T0).unwrap_err().code
    };
    assert_eq!(bad(&st, "h", pos("otherepoch", 1)), ErrorCode::BadPosition, "wrong epoch");
    assert_eq!(bad(&st, "h", pos(&epoch, 3)), ErrorCode::BadPosition, "serial ahead");
    assert_eq!(bad(&st, "nothing", pos("e", 3)), ErrorCode::BadPosition, "unknown channel, serial ahead");

    let ok = proto::History { channel: "h".into(), since: Some(pos(&epoch, 2)), ..Default::default() };
    assert!(st.history(&ok, T0).expect("top is fine").messages.is_empty());
    let unknown = history(&st, "nothing", T0);
    assert_eq!(unknown.channel, "nothing");
    assert_eq!(unknown.serial, 0);
    assert!(unknown.messages.is_empty());
}

#[test]
fn history_disabled_keeps_serials() {
    let st = state_with_rules(vec![rule("live/#", policy(0, 600, SlowPolicy::Disconnect))]);
    let ob = attach(&st, 1, "sub", BIG);
    subscribe(&st, 1, &sub("live/x"), T0);
    publish(&st, "live/x", "1", T0);
    let ack = publish(&st, "live/x", "2", T0);
    assert_eq!(ack.serial, 2);
    assert_eq!(serials(&drain(&ob)), vec![1, 2], "still delivered live");
    let h = history(&st, "live/x", T0);
    assert_eq!(h.serial, 2);
    assert!(h.messages.is_empty());

    // Behind the top without history: an explicit gap, never a silent skip.
    attach(&st, 2, "sub", BIG);
    let out = subscribe(&st, 2, &sub_from("live/x", &[("live/x", pos(&ack.epoch, 1))]), T0);
    assert!(!out.subscribed.channels[0].recovered);
    assert!(matches!(&out.replay[..], [Outbound::Gap(g)] if g.reason == "trimmed"));
    // At the top: recovered, nothing to send.
    attach(&st, 3, "sub", BIG);
    let out = subscribe(&st, 3, &sub_from("live/x", &[("live/x", pos(&ack.epoch, 2))]), T0);
    assert!(out.subscribed.channels[0].recovered);
    assert!(out.replay.is_empty());
}

// ---------------------------------------------------------------- recovery

#[test]
fn recovery_replays_exactly_the_missed_messages_then_live() {
    let st = state();
    let mut epoch = String::new();
    for i in 1..=5 {
        epoch = publish(&st, "r", &format!("m{i}"), T0 + i).epoch;
    }
    let ob = attach(&st, 1, "sub", BIG);
    let out = subscribe(&st, 1, &sub_from("r", &[("r", pos(&epoch, 2))]), T0 + 10);

    assert_eq!(out.subscribed.filter, "r");
    assert_eq!(
        out.subscribed.channels,
        vec![proto::ChannelState { channel: "r".into(), epoch: epoch.clone(), serial: 5, recovered: true }]
    );
    assert_eq!(serials(&out.replay), vec![3, 4, 5]);
    assert_eq!(payloads(&out.replay), vec!["m3", "m4", "m5"]);
    assert!(drain(&ob).is_empty(), "replay is returned, not queued");

    publish(&st, "r", "m6", T0 + 11);
    let live = envelopes(&drain(&ob));
    assert_eq!(live.iter().map(|e| (e.prev_serial, e.serial)).collect::<Vec<_>>(), vec![(5, 6)]);
}

#[test]
fn recovery_at_the_top_is_recovered_and_empty() {
    let st = state();
    publish(&st, "r", "1", T0);
    let epoch = publish(&st, "r", "2", T0).epoch;
    attach(&st, 1, "sub", BIG);
    let out = subscribe(&st, 1, &sub_from("r", &[("r", pos(&epoch, 2))]), T0);
    assert!(out.replay.is_empty());
    assert_eq!(out.subscribed.channels.len(), 1);
    assert!(out.subscribed.channels[0].recovered);
    assert_eq!(out.subscribed.channels[0].serial, 2);
}

#[test]
fn recovery_from_trimmed_history_is_one_gap() {
    let st = state_with_rules(vec![rule("t", policy(3, 600, SlowPolicy::Disconnect))]);
    let mut epoch = String::new();
    for i in 1..=6 {
        epoch = publish(&st, "t", &i.to_string(), T0).epoch;
    }
    // History holds 4..=6.
    for from in [0, 1, 2] {
        attach(&st, from + 1, "sub", BIG);
        let out = subscribe(&st, from + 1, &sub_from("t", &[("t", pos(&epoch, from))]), T0);
        assert_eq!(out.replay.len(), 1, "from {from}: {:?}", out.replay);
        let Outbound::Gap(gap) = &out.replay[0] else { panic!("from {from}: expected a gap") };
        assert_eq!(
            gap,
            &proto::Gap {
                channel: "t".into(),
                from: Some(pos(&epoch, from)),
                to: Some(pos(&epoch, 6)),
                reason: "trimmed".into(),
            }
        );
        assert!(!out.subscribed.channels[0].recovered);
    }
    // From 3 the next message (4) is still there: a full recovery.
    attach(&st, 10, "sub", BIG);
    let out = subscribe(&st, 10, &sub_from("t", &[("t", pos(&epoch, 3))]), T0);
    assert!(out.subscribed.channels[0].recovered);
    assert_eq!(serials(&out.replay), vec![4, 5, 6]);
}

#[test]
fn recovery_after_age_trim_is_a_gap() {
    let st = state_with_rules(vec![rule("t", policy(100, 10, SlowPolicy::Disconnect))]);
    let epoch = publish(&st, "t", "1", T0).epoch;
    publish(&st, "t", "2", T0 + 5_000);
    attach(&st, 1, "sub", BIG);
    // At T0 + 12s message 1 has aged out, 2 has not.
    let out = subscribe(&st, 1, &sub_from("t", &[("t", pos(&epoch, 1))]), T0 + 12_000);
    assert_eq!(serials(&out.replay), vec![2]);
    let out = subscribe(&st, 1, &sub_from("t", &[("t", pos(&epoch, 0))]), T0 + 12_000);
    assert!(matches!(&out.replay[..], [Outbound::Gap(g)] if g.reason == "trimmed" && g.to == Some(pos(&epoch, 2))));
}

/// A position from another epoch: a gap that ends just before the new
/// epoch's oldest message, then everything the new epoch holds, then live.
#[test]
fn recovery_with_another_epoch_is_an_epoch_changed_gap_then_the_new_epoch() {
    let st = state();
    publish(&st, "e", "1", T0);
    let epoch = publish(&st, "e", "2", T0).epoch;
    let ob = attach(&st, 1, "sub", BIG);
    // An old epoch, even with a serial beyond the current one, is not "ahead".
    let out = subscribe(&st, 1, &sub_from("e", &[("e", pos("oldepoch00", 7))]), T0);
    assert_eq!(out.replay.len(), 3, "{:?}", out.replay);
    let Outbound::Gap(gap) = &out.replay[0] else { panic!("expected a gap first") };
    assert_eq!(gap.channel, "e");
    assert_eq!(gap.from, Some(pos("oldepoch00", 7)));
    assert_eq!(gap.to, Some(pos(&epoch, 0)));
    assert_eq!(gap.reason, "epoch_changed");
    assert_eq!(serials(&out.replay[1..]), vec![1, 2]);
    assert_eq!(payloads(&out.replay[1..]), vec!["1", "2"]);
    assert!(!out.subscribed.channels[0].recovered);
    assert_eq!(st.stats().subscriptions, 1);
    publish(&st, "e", "3", T0);
    assert_eq!(serials(&drain(&ob)), vec![3], "live after the replay");
}

/// Without `history` (a history floor: the recovery window), the new
/// epoch's messages older than the floor are held back behind a
/// `not_granted` gap, as in any other recovery.
#[test]
fn recovery_with_another_epoch_keeps_to_the_history_floor() {
    let st = state();
    publish(&st, "e", "old", T0);
    let epoch = publish(&st, "e", "old2", T0 + 1).epoch;
    publish(&st, "e", "new", T0 + 10_000);
    attach(&st, 1, "sub", BIG);
    let out =
        st.subscribe_with(1, &sub_from("e", &[("e", pos("oldepoch00", 7))]), (Some(T0 + 5_000), None), T0 + 10_000);
    let out = out.expect("subscribe succeeds");
    let gaps: Vec<(String, Option<proto::Position>)> = out
        .replay
        .iter()
        .filter_map(|o| match o {
            Outbound::Gap(g) => Some((g.reason.clone(), g.to.clone())),
            Outbound::Message(_) => None,
        })
        .collect();
    assert_eq!(
        gaps,
        [("epoch_changed".to_string(), Some(pos(&epoch, 0))), ("not_granted".to_string(), Some(pos(&epoch, 2)))]
    );
    assert_eq!(serials(&out.replay[2..]), vec![3]);
}

/// When the new epoch's history is trimmed too, the gap ends before the
/// oldest message it still holds.
#[test]
fn recovery_with_another_epoch_replays_what_trimmed_history_holds() {
    let st = state_with_rules(vec![rule("t", policy(2, 600, SlowPolicy::Disconnect))]);
    let mut epoch = String::new();
    for i in 1..=5 {
        epoch = publish(&st, "t", &i.to_string(), T0).epoch;
    }
    attach(&st, 1, "sub", BIG);
    let out = subscribe(&st, 1, &sub_from("t", &[("t", pos("oldepoch00", 2))]), T0);
    let Outbound::Gap(gap) = &out.replay[0] else { panic!("expected a gap first: {:?}", out.replay) };
    assert_eq!((gap.reason.as_str(), gap.to.clone()), ("epoch_changed", Some(pos(&epoch, 3))));
    assert_eq!(serials(&out.replay[1..]), vec![4, 5]);
}

#[test]
fn recovery_of_an_unknown_channel_is_an_epoch_changed_gap() {
    let st = state();
    attach(&st, 1, "sub", BIG);
    let out = subscribe(&st, 1, &sub_from("gone", &[("gone", pos("oldepoch00", 3))]), T0);
    let [Outbound::Gap(gap)] = &out.replay[..] else { panic!("expected one gap: {:?}", out.replay) };
    assert_eq!(gap.reason, "epoch_changed");
    let state = &out.subscribed.channels[0];
    assert_eq!(gap.to, Some(pos(&state.epoch, 0)));
    assert_ne!(state.epoch, "oldepoch00");
}

#[test]
fn position_ahead_of_the_channel_is_rejected_without_subscribing() {
    let st = state();
    let epoch = publish(&st, "a", "1", T0).epoch;
    let ob = attach(&st, 1, "sub", BIG);

    let e = st.subscribe(1, &sub_from("a", &[("a", pos(&epoch, 2))]), T0).unwrap_err();
    assert_eq!(e.code, ErrorCode::BadPosition);
    assert_eq!(st.stats().subscriptions, 0);

    // One bad position among good ones rejects the whole subscribe.
    publish(&st, "w/1", "1", T0);
    let w2 = publish(&st, "w/2", "1", T0).epoch;
    let req = sub_from("w/+", &[("w/1", pos("whatever00", 0)), ("w/2", pos(&w2, 9))]);
    assert_eq!(st.subscribe(1, &req, T0).unwrap_err().code, ErrorCode::BadPosition);
    assert_eq!(st.stats().subscriptions, 0);

    publish(&st, "a", "2", T0);
    publish(&st, "w/1", "2", T0);
    assert!(drain(&ob).is_empty(), "nothing was registered");
}

#[test]
fn position_outside_the_filter_or_without_epoch_is_rejected() {
    let st = state();
    let epoch = publish(&st, "b", "1", T0).epoch;
    publish(&st, "a", "1", T0);
    attach(&st, 1, "sub", BIG);

    let out_of_scope = sub_from("a", &[("b", pos(&epoch, 1))]);
    assert_eq!(st.subscribe(1, &out_of_scope, T0).unwrap_err().code, ErrorCode::BadPosition);
    let out_of_scope = sub_from("x/+", &[("x/y/z", pos(&epoch, 1))]);
    assert_eq!(st.subscribe(1, &out_of_scope, T0).unwrap_err().code, ErrorCode::BadPosition);
    let no_epoch = sub_from("a", &[("a", pos("", 0))]);
    assert_eq!(st.subscribe(1, &no_epoch, T0).unwrap_err().code, ErrorCode::BadPosition);
    // A presence position needs presence=true.
    let presence = sub_from("a", &[("$presence/a", pos("e", 0))]);
    assert_eq!(st.subscribe(1, &presence, T0).unwrap_err().code, ErrorCode::BadPosition);
    let invalid = sub_from("#", &[("", pos("e", 0))]);
    assert_eq!(st.subscribe(1, &invalid, T0).unwrap_err().code, ErrorCode::InvalidChannel);
    assert_eq!(st.stats().subscriptions, 0);
}

#[test]
fn wildcard_recovery_covers_each_channel_with_a_position() {
    let st = state();
    let mut e1 = String::new();
    let mut e2 = String::new();
    for i in 1..=3 {
        e1 = publish(&st, "room/1", &format!("r1-{i}"), T0).epoch;
    }
    for i in 1..=4 {
        e2 = publish(&st, "room/2", &format!("r2-{i}"), T0).epoch;
    }
    publish(&st, "room/3", "r3-1", T0);
    publish(&st, "other", "o-1", T0);

    let ob = attach(&st, 1, "sub", BIG);
    let req = sub_from("room/+", &[("room/1", pos(&e1, 1)), ("room/2", pos(&e2, 4))]);
    let out = subscribe(&st, 1, &req, T0);
    assert_eq!(channel_serials(&out.replay), vec![("room/1".into(), 2), ("room/1".into(), 3)]);
    let states: Vec<(String, u64, bool)> =
        out.subscribed.channels.iter().map(|c| (c.channel.clone(), c.serial, c.recovered)).collect();
    assert_eq!(states, vec![("room/1".into(), 3, true), ("room/2".into(), 4, true)]);
    assert_eq!(out.subscribed.channels[0].epoch, e1);
    assert_eq!(out.subscribed.channels[1].epoch, e2);

    for ch in ["room/1", "room/2", "room/3", "other"] {
        publish(&st, ch, "live", T0);
    }
    assert_eq!(channel_serials(&drain(&ob)), vec![("room/1".into(), 4), ("room/2".into(), 5), ("room/3".into(), 2)]);
}

#[test]
fn wildcard_recovery_mixes_recovered_and_gapped_channels() {
    let st = state_with_rules(vec![rule("room/2", policy(1, 600, SlowPolicy::Disconnect))]);
    let e1 = publish(&st, "room/1", "1", T0).epoch;
    publish(&st, "room/1", "2", T0);
    let e2 = publish(&st, "room/2", "1", T0).epoch;
    publish(&st, "room/2", "2", T0);
    publish(&st, "room/2", "3", T0);

    attach(&st, 1, "sub", BIG);
    let req = sub_from("room/#", &[("room/1", pos(&e1, 0)), ("room/2", pos(&e2, 1))]);
    let out = subscribe(&st, 1, &req, T0);
    let mut msgs = Vec::new();
    let mut gaps = Vec::new();
    for item in &out.replay {
        match item {
            Outbound::Message(d) => msgs.push((d.channel().to_string(), d.envelope.serial)),
            Outbound::Gap(g) => gaps.push(g.clone()),
        }
    }
    assert_eq!(msgs, vec![("room/1".into(), 1), ("room/1".into(), 2)]);
    assert_eq!(
        gaps,
        vec![proto::Gap {
            channel: "room/2".into(),
            from: Some(pos(&e2, 1)),
            to: Some(pos(&e2, 3)),
            reason: "trimmed".into()
        }]
    );
    let recovered: Vec<bool> = out.subscribed.channels.iter().map(|c| c.recovered).collect();
    assert_eq!(recovered, vec![true, false]);
}

// ---------------------------------------------------------------- rewind

#[test]
fn rewind_by_count_returns_the_last_n() {
    let st = state();
    for i in 1..=10 {
        publish(&st, "rw", &i.to_string(), T0);
    }
    attach(&st, 1, "sub", BIG);
    let out = subscribe(&st, 1, &sub_rewind("rw", 3, 0), T0);
    assert_eq!(serials(&out.replay), vec![8, 9, 10]);
    assert_eq!(out.subscribed.channels[0].serial, 10);
    assert!(!out.subscribed.channels[0].recovered);

    let out = subscribe(&st, 1, &sub_rewind("rw", 50, 0), T0);
    assert_eq!(serials(&out.replay), (1..=10).collect::<Vec<_>>());

    let out = subscribe(&st, 1, &sub_rewind("rw", 0, 0), T0);
    assert!(out.replay.is_empty(), "an empty rewind is no rewind");
}

#[test]
fn rewind_by_duration_returns_only_recent_messages() {
    let st = state();
    for i in 0..10 {
        publish(&st, "rw", &i.to_string(), T0 + i * 1_000);
    }
    attach(&st, 1, "sub", BIG);
    let now = T0 + 10_000;
    // Newer than now - 3.5 s: timestamps T0+7s, +8s, +9s (serials 8..=10).
    let out = subscribe(&st, 1, &sub_rewind("rw", 0, 3_500), now);
    assert_eq!(serials(&out.replay), vec![8, 9, 10]);
    // Both limits: the stricter wins.
    let out = subscribe(&st, 1, &sub_rewind("rw", 2, 3_500), now);
    assert_eq!(serials(&out.replay), vec![9, 10]);
    let out = subscribe(&st, 1, &sub_rewind("rw", 5, 1_500), now);
    assert_eq!(serials(&out.replay), vec![10]);
    let out = subscribe(&st, 1, &sub_rewind("rw", 0, 500), now);
    assert!(out.replay.is_empty());
}

#[test]
fn rewind_on_a_wildcard_returns_each_matching_channel() {
    let st = state();
    for i in 1..=3 {
        publish(&st, "w/b", &format!("b{i}"), T0);
        publish(&st, "w/a", &format!("a{i}"), T0);
        publish(&st, "x/c", &format!("c{i}"), T0);
    }
    attach(&st, 1, "sub", BIG);
    let out = subscribe(&st, 1, &sub_rewind("w/+", 2, 0), T0);
    assert_eq!(
        channel_serials(&out.replay),
        vec![("w/a".into(), 2), ("w/a".into(), 3), ("w/b".into(), 2), ("w/b".into(), 3)]
    );
    let names: Vec<&str> = out.subscribed.channels.iter().map(|c| c.channel.as_str()).collect();
    assert_eq!(names, vec!["w/a", "w/b"]);
}

#[test]
fn a_position_wins_over_rewind() {
    let st = state();
    let mut epoch = String::new();
    for i in 1..=5 {
        epoch = publish(&st, "p", &i.to_string(), T0).epoch;
    }
    attach(&st, 1, "sub", BIG);
    let req = proto::Subscribe {
        rewind: Some(proto::Rewind { count: 5, duration_ms: 0 }),
        ..sub_from("p", &[("p", pos(&epoch, 4))])
    };
    let out = subscribe(&st, 1, &req, T0);
    assert_eq!(serials(&out.replay), vec![5]);
    assert!(out.subscribed.channels[0].recovered);
}

// ---------------------------------------------------------------- idempotency

#[test]
fn repeated_publish_id_is_acknowledged_once() {
    let st = state();
    let ob = attach(&st, 1, "sub", BIG);
    subscribe(&st, 1, &sub("#"), T0);

    let first = publish_with_id(&st, "a", "x", "k1", T0);
    assert_eq!((first.serial, first.duplicate), (1, false));
    let again = publish_with_id(&st, "a", "x again", "k1", T0 + 1_000);
    assert_eq!(
        again,
        proto::PublishAck { channel: "a".into(), epoch: first.epoch.clone(), serial: 1, duplicate: true }
    );
    let next = publish(&st, "a", "no id", T0 + 2_000);
    assert_eq!((next.serial, next.duplicate), (2, false));
    // Ids are per channel.
    let other = publish_with_id(&st, "b", "x", "k1", T0 + 3_000);
    assert_eq!((other.serial, other.duplicate), (1, false));

    let got = envelopes(&drain(&ob));
    let summary: Vec<(&str, u64, &str)> = got.iter().map(|e| (e.channel.as_str(), e.serial, e.id.as_str())).collect();
    assert_eq!(summary, vec![("a", 1, "k1"), ("a", 2, ""), ("b", 1, "k1")]);
    assert_eq!(history_serials(&st, "a", T0 + 3_000), vec![1, 2]);
}

#[test]
fn publish_id_is_new_again_after_the_dedupe_window() {
    let window = 120_000;
    let st = state();
    let ob = attach(&st, 1, "sub", BIG);
    subscribe(&st, 1, &sub("a"), T0);

    publish_with_id(&st, "a", "x", "k1", T0);
    let dup = publish_with_id(&st, "a", "x", "k1", T0 + window - 1);
    assert!(dup.duplicate, "still within the window");
    assert_eq!(dup.serial, 1);

    st.sweep(T0 + window + 1);
    let fresh = publish_with_id(&st, "a", "x", "k1", T0 + window + 1);
    assert_eq!((fresh.serial, fresh.duplicate), (2, false));
    // The new acceptance opens a new window.
    let dup = publish_with_id(&st, "a", "x", "k1", T0 + window + 2);
    assert_eq!((dup.serial, dup.duplicate), (2, true));

    // Without a sweep in between, publish itself forgets expired ids.
    let later = T0 + 3 * window;
    let fresh = publish_with_id(&st, "a", "x", "k1", later);
    assert_eq!((fresh.serial, fresh.duplicate), (3, false));

    assert_eq!(serials(&drain(&ob)), vec![1, 2, 3]);
}

#[test]
fn dedupe_forgets_the_oldest_ids_beyond_the_per_channel_bound() {
    let st = LocalEngine::new(EngineConfig { dedupe_max_per_channel: 2, ..EngineConfig::default() });
    publish_with_id(&st, "a", "x", "k1", T0);
    publish_with_id(&st, "a", "x", "k2", T0);
    publish_with_id(&st, "a", "x", "k3", T0);
    assert!(publish_with_id(&st, "a", "x", "k3", T0).duplicate);
    assert!(publish_with_id(&st, "a", "x", "k2", T0).duplicate);
    let k1 = publish_with_id(&st, "a", "x", "k1", T0);
    assert_eq!((k1.serial, k1.duplicate), (4, false), "k1 was forgotten first");
}

// ---------------------------------------------------------------- retained

#[test]
fn retained_value_is_replayed_on_subscribe() {
    let st = state();
    publish_retained(&st, "r", "v1", T0);
    publish(&st, "r", "not retained", T0);

    attach(&st, 1, "sub", BIG);
    let out = subscribe(&st, 1, &proto::Subscribe { retained: true, ..sub("r") }, T0);
    let got = envelopes(&out.replay);
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].serial, got[0].payload.clone(), got[0].retain), (1, Bytes::from("v1"), true));

    let out = subscribe(&st, 1, &sub("r"), T0);
    assert!(out.replay.is_empty(), "only when asked for");

    publish_retained(&st, "r", "v2", T0);
    let out = subscribe(&st, 1, &proto::Subscribe { retained: true, ..sub("r") }, T0);
    assert_eq!(serials(&out.replay), vec![3]);
    assert_eq!(payloads(&out.replay), vec!["v2"]);
}

#[test]
fn empty_retained_publish_clears_the_value() {
    let st = state();
    let ob = attach(&st, 1, "sub", BIG);
    subscribe(&st, 1, &sub("r"), T0);
    publish_retained(&st, "r", "v1", T0);
    publish_retained(&st, "r", "", T0);
    assert_eq!(serials(&drain(&ob)), vec![1, 2], "the clearing publish is still delivered live");

    attach(&st, 2, "sub", BIG);
    let out = subscribe(&st, 2, &proto::Subscribe { retained: true, ..sub("r") }, T0);
    assert!(out.replay.is_empty(), "{:?}", out.replay);
}

#[test]
fn retained_value_outlives_history_and_wildcards_get_each() {
    let st = state_with_rules(vec![rule("r/#", policy(1, 600, SlowPolicy::Disconnect))]);
    publish_retained(&st, "r/a", "a-retained", T0);
    publish(&st, "r/a", "a-2", T0);
    publish_retained(&st, "r/b", "b-retained", T0);
    publish(&st, "r/c", "c-plain", T0);
    publish_retained(&st, "elsewhere", "x", T0);
    assert_eq!(history_serials(&st, "r/a", T0), vec![2]);

    attach(&st, 1, "sub", BIG);
    let out = subscribe(&st, 1, &proto::Subscribe { retained: true, ..sub("r/+") }, T0);
    assert_eq!(payloads(&out.replay), vec!["a-retained", "b-retained"]);
    assert_eq!(channel_serials(&out.replay), vec![("r/a".into(), 1), ("r/b".into(), 1)]);
}

#[test]
fn retained_value_is_not_duplicated_by_recovery_or_rewind() {
    let st = state();
    publish(&st, "r", "1", T0);
    let epoch = publish_retained(&st, "r", "retained-2", T0).epoch;
    publish(&st, "r", "3", T0);
    attach(&st, 1, "sub", BIG);
    let with = |req: proto::Subscribe| proto::Subscribe { retained: true, ..req };

    // Recovery that covers the retained message sends it once, in order.
    let out = subscribe(&st, 1, &with(sub_from("r", &[("r", pos(&epoch, 1))])), T0);
    assert_eq!(serials(&out.replay), vec![2, 3]);
    // The client already has it: nothing.
    let out = subscribe(&st, 1, &with(sub_from("r", &[("r", pos(&epoch, 2))])), T0);
    assert_eq!(serials(&out.replay), vec![3]);
    let out = subscribe(&st, 1, &with(sub_from("r", &[("r", pos(&epoch, 3))])), T0);
    assert!(out.replay.is_empty());

    // Rewind covering it: once. Rewind not reaching it: first, then the rewind.
    let out = subscribe(&st, 1, &with(sub_rewind("r", 3, 0)), T0);
    assert_eq!(serials(&out.replay), vec![1, 2, 3]);
    let out = subscribe(&st, 1, &with(sub_rewind("r", 2, 0)), T0);
    assert_eq!(serials(&out.replay), vec![2, 3], "the rewind starts at the retained message");
    let out = subscribe(&st, 1, &with(sub_rewind("r", 1, 0)), T0);
    assert_eq!(serials(&out.replay), vec![2, 3]);

    // After an epoch change the replay is the new epoch from its first,
    // which covers the retained value: once, in order.
    let out = subscribe(&st, 1, &with(sub_from("r", &[("r", pos("oldepoch00", 1))])), T0);
    assert!(matches!(&out.replay[0], Outbound::Gap(g) if g.reason == "epoch_changed"));
    assert_eq!(serials(&out.replay[1..]), vec![1, 2, 3]);
}

#[test]
fn a_trimmed_gap_still_tells_the_client_the_last_value() {
    let st = state_with_rules(vec![rule("r", policy(1, 600, SlowPolicy::Disconnect))]);
    let epoch = publish(&st, "r", "1", T0).epoch;
    publish_retained(&st, "r", "retained-2", T0);
    publish(&st, "r", "3", T0);
    attach(&st, 1, "sub", BIG);
    let req = proto::Subscribe { retained: true, ..sub_from("r", &[("r", pos(&epoch, 0))]) };
    let out = subscribe(&st, 1, &req, T0);
    assert!(matches!(&out.replay[0], Outbound::Gap(g) if g.reason == "trimmed"), "{:?}", out.replay);
    assert_eq!(serials(&out.replay[1..]), vec![2]);
}

// ---------------------------------------------------------------- presence

#[test]
fn presence_events_reach_only_presence_subscribers() {
    let st = state();
    let with_presence = attach(&st, 1, "watcher", BIG);
    subscribe(&st, 1, &proto::Subscribe { presence: true, ..sub("chat") }, T0);
    let without = attach(&st, 2, "plain", BIG);
    subscribe(&st, 2, &sub("chat"), T0);
    let everything = attach(&st, 3, "all", BIG);
    subscribe(&st, 3, &sub("#"), T0);
    attach(&st, 4, "bob", BIG);
    let bob = caller(4, "bob");

    st.presence_enter(&bob, "chat", Bytes::from("hi"), false, T0).expect("enter");
    let items = drain(&with_presence);
    let got = envelopes(&items);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].channel, "$presence/chat");
    assert_eq!((got[0].serial, got[0].prev_serial), (1, 0));
    assert_eq!(presence_events(&items), vec![ev(proto::Kind::PresenceEnter, "bob", "conn-4", "hi")]);
    assert_eq!(member_ids(&st, "chat"), vec![("bob".into(), "conn-4".into(), "hi".into())]);
    assert_eq!(st.presence_members("chat").members[0].protocol(), proto::Protocol::Ws);

    st.presence_enter(&bob, "chat", Bytes::from("busy"), true, T0 + 1).expect("update");
    st.presence_enter(&bob, "chat", Bytes::from("busy"), true, T0 + 2).expect("same data");
    st.presence_enter(&bob, "chat", Bytes::from("busy"), false, T0 + 2).expect("re-enter, same data");
    assert_eq!(member_ids(&st, "chat"), vec![("bob".into(), "conn-4".into(), "busy".into())]);
    st.presence_leave(&bob, "chat", T0 + 3).expect("leave");
    assert!(member_ids(&st, "chat").is_empty());

    let items = drain(&with_presence);
    assert_eq!(
        presence_events(&items),
        vec![
            ev(proto::Kind::PresenceUpdate, "bob", "conn-4", "busy"),
            ev(proto::Kind::PresenceLeave, "bob", "conn-4", "busy"),
        ]
    );
    assert_eq!(serials(&items), vec![2, 3]);

    assert!(drain(&without).is_empty());
    assert!(drain(&everything).is_empty(), "'#' never matches $presence channels");

    // Unsubscribing removes the presence companion too.
    st.unsubscribe(1, "chat").expect("subscribed");
    st.presence_enter(&bob, "chat", Bytes::new(), false, T0 + 4).expect("enter");
    assert!(drain(&with_presence).is_empty());
}

#[test]
fn presence_of_wildcard_subscriptions_and_recovery() {
    let st = state();
    let ob = attach(&st, 1, "watcher", BIG);
    subscribe(&st, 1, &proto::Subscribe { presence: true, ..sub("rooms/+") }, T0);
    let alice = caller(2, "alice");
    attach(&st, 2, "alice", BIG);
    st.presence_enter(&alice, "rooms/1", Bytes::from("a"), false, T0).expect("enter");
    st.presence_enter(&alice, "rooms/2", Bytes::from("a"), false, T0).expect("enter");
    st.presence_enter(&alice, "elsewhere", Bytes::from("a"), false, T0).expect("enter");
    let got: Vec<String> = envelopes(&drain(&ob)).into_iter().map(|e| e.channel).collect();
    assert_eq!(got, vec!["$presence/rooms/1", "$presence/rooms/2"]);

    // Presence events have positions and recover like messages.
    let epoch = history(&st, "$presence/rooms/1", T0).epoch;
    st.presence_leave(&alice, "rooms/1", T0 + 1).expect("leave");
    attach(&st, 3, "late", BIG);
    let req = proto::Subscribe { presence: true, ..sub_from("rooms/+", &[("$presence/rooms/1", pos(&epoch, 1))]) };
    let out = subscribe(&st, 3, &req, T0 + 2);
    assert_eq!(presence_events(&out.replay), vec![ev(proto::Kind::PresenceLeave, "alice", "conn-2", "a")]);
    assert!(out.subscribed.channels[0].recovered);
}

#[test]
fn presence_errors() {
    let st = LocalEngine::new(EngineConfig { presence_max_members: 1, ..EngineConfig::default() });
    attach(&st, 1, "", BIG);
    let anonymous = caller(1, "");
    let e = st.presence_enter(&anonymous, "chat", Bytes::new(), false, T0).unwrap_err();
    assert_eq!(e.code, ErrorCode::NoIdentity);

    let alice = caller(2, "alice");
    attach(&st, 2, "alice", BIG);
    let e = st.presence_enter(&alice, "chat", Bytes::from("x"), true, T0).unwrap_err();
    assert_eq!(e.code, ErrorCode::BadRequest, "update before enter");
    assert_eq!(st.presence_leave(&alice, "chat", T0).unwrap_err().code, ErrorCode::BadRequest);

    st.presence_enter(&alice, "chat", Bytes::new(), false, T0).expect("enter");
    let bob = caller(3, "bob");
    attach(&st, 3, "bob", BIG);
    assert_eq!(st.presence_enter(&bob, "chat", Bytes::new(), false, T0).unwrap_err().code, ErrorCode::Unavailable);
    assert_eq!(member_ids(&st, "chat").len(), 1);
    assert_eq!(st.stats().presence_members, 1);
}

#[test]
fn clean_detach_leaves_at_once() {
    let st = state();
    let ob = attach(&st, 1, "watcher", BIG);
    subscribe(&st, 1, &proto::Subscribe { presence: true, ..sub("chat") }, T0);
    attach(&st, 2, "alice", BIG);
    st.presence_enter(&caller(2, "alice"), "chat", Bytes::from("d"), false, T0).expect("enter");
    st.presence_enter(&caller(2, "alice"), "lobby", Bytes::from("d"), false, T0).expect("enter");

    st.detach(2, CloseKind::Clean, T0 + 10);
    assert!(member_ids(&st, "chat").is_empty());
    assert!(member_ids(&st, "lobby").is_empty());
    let items = drain(&ob);
    assert_eq!(
        presence_events(&items),
        vec![
            ev(proto::Kind::PresenceEnter, "alice", "conn-2", "d"),
            ev(proto::Kind::PresenceLeave, "alice", "conn-2", "d"),
        ]
    );
    assert_eq!(envelopes(&items)[1].timestamp, T0 + 10);
    st.sweep(T0 + 60_000);
    assert!(drain(&ob).is_empty(), "no second leave");
}

#[test]
fn abrupt_detach_leaves_after_the_grace_period() {
    let grace = 5_000;
    let st = state();
    let ob = attach(&st, 1, "watcher", BIG);
    subscribe(&st, 1, &proto::Subscribe { presence: true, ..sub("chat") }, T0);
    attach(&st, 2, "alice", BIG);
    st.presence_enter(&caller(2, "alice"), "chat", Bytes::from("d"), false, T0).expect("enter");
    drain(&ob);

    let at = T0 + 1_000;
    st.detach(2, CloseKind::Abrupt, at);
    assert_eq!(member_ids(&st, "chat"), vec![("alice".into(), "conn-2".into(), "d".into())]);
    st.sweep(at + grace - 1);
    assert!(drain(&ob).is_empty(), "still within the grace period");
    assert_eq!(st.stats().presence_members, 1);

    st.sweep(at + grace);
    assert_eq!(presence_events(&drain(&ob)), vec![ev(proto::Kind::PresenceLeave, "alice", "conn-2", "d")]);
    assert!(member_ids(&st, "chat").is_empty());
    st.sweep(at + 2 * grace);
    assert!(drain(&ob).is_empty(), "one leave only");
}

#[test]
fn resuming_within_the_grace_period_keeps_presence() {
    let grace = 5_000;
    let st = state();
    let ob = attach(&st, 1, "watcher", BIG);
    subscribe(&st, 1, &proto::Subscribe { presence: true, ..sub("chat") }, T0);
    attach(&st, 2, "alice", BIG);
    st.presence_enter(&caller(2, "alice"), "chat", Bytes::from("d"), false, T0).expect("enter");
    drain(&ob);

    st.detach(2, CloseKind::Abrupt, T0);
    attach(&st, 3, "alice", BIG);
    st.presence_enter(&caller(3, "alice"), "chat", Bytes::from("d"), false, T0 + 2_000).expect("resume");
    assert!(drain(&ob).is_empty(), "no leave, no second enter");
    assert_eq!(member_ids(&st, "chat"), vec![("alice".into(), "conn-3".into(), "d".into())]);

    st.sweep(T0 + grace + 1);
    assert!(drain(&ob).is_empty(), "the pending leave was cancelled");
    assert_eq!(st.stats().presence_members, 1);

    // The resumed membership ends with its own session.
    st.detach(3, CloseKind::Clean, T0 + 10_000);
    assert_eq!(presence_events(&drain(&ob)), vec![ev(proto::Kind::PresenceLeave, "alice", "conn-3", "d")]);
}

#[test]
fn resuming_with_new_data_is_an_update() {
    let st = state();
    let ob = attach(&st, 1, "watcher", BIG);
    subscribe(&st, 1, &proto::Subscribe { presence: true, ..sub("chat") }, T0);
    attach(&st, 2, "alice", BIG);
    st.presence_enter(&caller(2, "alice"), "chat", Bytes::from("old"), false, T0).expect("enter");
    drain(&ob);

    st.detach(2, CloseKind::Abrupt, T0);
    attach(&st, 3, "alice", BIG);
    st.presence_enter(&caller(3, "alice"), "chat", Bytes::from("new"), false, T0 + 1).expect("resume");
    assert_eq!(presence_events(&drain(&ob)), vec![ev(proto::Kind::PresenceUpdate, "alice", "conn-3", "new")]);
    assert_eq!(member_ids(&st, "chat").len(), 1);
    st.sweep(T0 + 60_000);
    assert!(drain(&ob).is_empty());
}

#[test]
fn one_client_may_be_present_from_several_connections() {
    let st = state();
    let ob = attach(&st, 1, "watcher", BIG);
    subscribe(&st, 1, &proto::Subscribe { presence: true, ..sub("chat") }, T0);
    attach(&st, 2, "alice", BIG);
    attach(&st, 3, "alice", BIG);
    st.presence_enter(&caller(2, "alice"), "chat", Bytes::from("phone"), false, T0).expect("enter");
    st.presence_enter(&caller(3, "alice"), "chat", Bytes::from("laptop"), false, T0).expect("enter");
    assert_eq!(
        member_ids(&st, "chat"),
        vec![("alice".into(), "conn-2".into(), "phone".into()), ("alice".into(), "conn-3".into(), "laptop".into())]
    );
    st.detach(2, CloseKind::Clean, T0 + 1);
    assert_eq!(
        presence_events(&drain(&ob)),
        vec![
            ev(proto::Kind::PresenceEnter, "alice", "conn-2", "phone"),
            ev(proto::Kind::PresenceEnter, "alice", "conn-3", "laptop"),
            ev(proto::Kind::PresenceLeave, "alice", "conn-2", "phone"),
        ]
    );
    assert_eq!(member_ids(&st, "chat"), vec![("alice".into(), "conn-3".into(), "laptop".into())]);
}

#[test]
fn another_client_does_not_resume_a_pending_member() {
    let grace = 5_000;
    let st = state();
    let ob = attach(&st, 1, "watcher", BIG);
    subscribe(&st, 1, &proto::Subscribe { presence: true, ..sub("chat") }, T0);
    attach(&st, 2, "alice", BIG);
    st.presence_enter(&caller(2, "alice"), "chat", Bytes::from("d"), false, T0).expect("enter");
    st.detach(2, CloseKind::Abrupt, T0);
    attach(&st, 3, "bob", BIG);
    st.presence_enter(&caller(3, "bob"), "chat", Bytes::from("d"), false, T0 + 1).expect("enter");
    st.sweep(T0 + grace);
    assert_eq!(
        presence_events(&drain(&ob)),
        vec![
            ev(proto::Kind::PresenceEnter, "alice", "conn-2", "d"),
            ev(proto::Kind::PresenceEnter, "bob", "conn-3", "d"),
            ev(proto::Kind::PresenceLeave, "alice", "conn-2", "d"),
        ]
    );
    assert_eq!(member_ids(&st, "chat"), vec![("bob".into(), "conn-3".into(), "d".into())]);
}

// ---------------------------------------------------------------- slow consumers

/// The outbox size of one message like those the slow-consumer tests publish,
/// measured on a probe channel whose name has the same length. Later messages
/// are a few bytes bigger (a non-zero `prev_serial` is encoded), never smaller.
fn message_size(st: &LocalEngine, channel: &str, payload: &str) -> usize {
    let probe = attach(st, 1000, "probe", BIG);
    subscribe(st, 1000, &sub(channel), T0);
    publish(st, channel, payload, T0);
    let items = drain(&probe);
    st.detach(1000, CloseKind::Clean, T0);
    match &items[..] {
        [Outbound::Message(d)] => d.size,
        other => panic!("probe got {other:?}"),
    }
}

#[test]
fn slow_consumer_is_disconnected_others_keep_everything() {
    let st = state();
    let payload = "p".repeat(100);
    let one = message_size(&st, "sloe", &payload);
    let slow = attach(&st, 1, "slow", one * 3 + one / 2);
    let fast = attach(&st, 2, "fast", BIG);
    subscribe(&st, 1, &sub("slow"), T0);
    subscribe(&st, 2, &sub("slow"), T0);

    for _ in 0..10 {
        publish(&st, "slow", &payload, T0);
        assert!(slow.peak_bytes() <= slow.capacity());
    }
    assert_eq!(slow.closed(), Some(CloseReason::SLOW));
    assert_eq!(slow.drain(&mut Vec::new()), Err(CloseReason::SLOW));
    assert_eq!(slow.queued_bytes(), 0, "a closed outbox holds nothing");
    assert_eq!(serials(&drain(&fast)), (1..=10).collect::<Vec<_>>());
    assert!(fast.closed().is_none());
}

#[test]
fn drop_oldest_policy_keeps_the_newest() {
    let st = state_with_rules(vec![rule("lossy/#", policy(1000, 600, SlowPolicy::DropOldest))]);
    let payload = "p".repeat(100);
    let one = message_size(&st, "lossy/p", &payload);
    let ob = attach(&st, 1, "sub", one * 3 + one / 2);
    subscribe(&st, 1, &sub("lossy/a"), T0);

    for _ in 0..10 {
        publish(&st, "lossy/a", &payload, T0);
        assert!(ob.peak_bytes() <= ob.capacity());
    }
    assert!(ob.closed().is_none());
    let got = envelopes(&drain(&ob));
    assert_eq!(got.iter().map(|e| e.serial).collect::<Vec<_>>(), vec![8, 9, 10]);
    assert_eq!(ob.dropped(), 7);
    // The client can see the hole: the first one kept does not follow 0.
    assert_eq!(got[0].prev_serial, 7);
    assert!(ob.peak_bytes() <= ob.capacity());
}

#[test]
fn conflate_policy_keeps_the_latest_per_channel() {
    let st = state_with_rules(vec![rule("ticker/#", policy(1000, 600, SlowPolicy::Conflate))]);
    let payload = "p".repeat(100);
    let one = message_size(&st, "ticker/p", &payload);
    let ob = attach(&st, 1, "sub", one * 3 + one / 2);
    subscribe(&st, 1, &sub("ticker/+"), T0);

    let mut last = BTreeMap::new();
    for i in 0..20 {
        let channel = if i % 2 == 0 { "ticker/a" } else { "ticker/b" };
        let ack = publish(&st, channel, &payload, T0);
        last.insert(channel.to_string(), ack.serial);
        assert!(ob.peak_bytes() <= ob.capacity());
    }
    assert!(ob.closed().is_none());
    assert!(ob.dropped() > 0);
    let got = channel_serials(&drain(&ob));
    // Each channel's latest value is there, and each channel stays in order.
    for (channel, serial) in &last {
        let mine: Vec<u64> = got.iter().filter(|(c, _)| c == channel).map(|(_, s)| *s).collect();
        assert_eq!(mine.last(), Some(serial), "{channel}: {got:?}");
        assert!(mine.windows(2).all(|w| w[0] < w[1]), "{channel}: {got:?}");
    }
    assert!(got.len() <= 3);
    assert!(ob.peak_bytes() <= ob.capacity());
}

#[test]
fn presence_events_follow_the_base_channel_policy() {
    let st = state_with_rules(vec![rule("quiet/#", policy(1000, 600, SlowPolicy::DropOldest))]);
    // About two presence events fit, four do not.
    let ob = attach(&st, 1, "watcher", 300);
    subscribe(&st, 1, &proto::Subscribe { presence: true, ..sub("quiet/x") }, T0);
    for i in 0..4 {
        let id = 10 + i;
        attach(&st, id, &format!("m{i}"), BIG);
        st.presence_enter(&caller(id, &format!("m{i}")), "quiet/x", Bytes::from("d"), false, T0).expect("enter");
    }
    assert!(ob.closed().is_none(), "drop-oldest, not disconnect");
    assert!(ob.dropped() > 0);
    assert_eq!(serials(&drain(&ob)).last(), Some(&4));
}

// ---------------------------------------------------------------- sweep and stats

#[test]
fn sweep_drops_idle_empty_channels_after_the_ttl() {
    let ttl = 60_000;
    let st = LocalEngine::new(EngineConfig {
        idle_channel_ttl: Duration::from_millis(ttl as u64),
        rules: vec![
            rule("nohist", policy(0, 600, SlowPolicy::Disconnect)),
            rule("short", policy(10, 100, SlowPolicy::Disconnect)),
            rule("retained", policy(0, 600, SlowPolicy::Disconnect)),
        ],
        ..EngineConfig::default()
    });
    attach(&st, 1, "sub", BIG);
    subscribe(&st, 1, &sub("empty"), T0);
    let kept = publish(&st, "kept", "x", T0);
    let nohist = publish(&st, "nohist", "x", T0);
    publish(&st, "short", "x", T0);
    publish_retained(&st, "retained", "x", T0);
    assert_eq!(st.stats().channels, 5);

    st.sweep(T0 + ttl);
    assert_eq!(st.stats().channels, 5, "not idle for longer than the ttl yet");

    // "empty" and "nohist" hold nothing and go; "short" keeps its history
    // for 100 s, "retained" its value, "kept" its history.
    st.sweep(T0 + ttl + 1);
    assert_eq!(st.stats().channels, 3);
    assert_eq!(history(&st, "kept", T0 + ttl + 1).epoch, kept.epoch, "a channel with history is kept");
    assert_eq!(history(&st, "kept", T0 + ttl + 1).serial, 1);

    // A dropped channel starts a new incarnation.
    let again = publish(&st, "nohist", "x", T0 + ttl + 2);
    assert_eq!(again.serial, 1);
    assert_ne!(again.epoch, nohist.epoch);

    // Once its history ages out (100 s), "short" is idle and long inactive.
    // "nohist" is idle but was active 38 s ago: kept.
    st.sweep(T0 + 100_001);
    assert_eq!(st.stats().channels, 3, "kept, nohist, retained");
    assert_eq!(history(&st, "retained", T0 + 100_001).serial, 1, "a retained value keeps its channel");
}

#[test]
fn sweep_keeps_channels_with_members_or_recent_ids() {
    let ttl = 60_000;
    let st = LocalEngine::new(EngineConfig {
        idle_channel_ttl: Duration::from_millis(ttl as u64),
        dedupe_window: Duration::from_secs(300),
        rules: vec![rule("#", policy(0, 600, SlowPolicy::Disconnect))],
        ..EngineConfig::default()
    });
    attach(&st, 1, "alice", BIG);
    st.presence_enter(&caller(1, "alice"), "room", Bytes::new(), false, T0).expect("enter");
    let first = publish_with_id(&st, "ids", "x", "k", T0);

    st.sweep(T0 + 2 * ttl);
    assert_eq!(member_ids(&st, "room").len(), 1);
    // Still the same incarnation: the id is still known.
    let dup = publish_with_id(&st, "ids", "x", "k", T0 + 2 * ttl);
    assert_eq!((dup.epoch.as_str(), dup.serial, dup.duplicate), (first.epoch.as_str(), 1, true));

    // After the dedupe window the channel has nothing left and goes.
    st.sweep(T0 + 300_001);
    let fresh = publish(&st, "ids", "x", T0 + 300_002);
    assert_ne!(fresh.epoch, first.epoch);
}

/// The last member leaving is activity: the channel's position must survive
/// `idle_channel_ttl` from then, as it would after a publish.
#[test]
fn last_member_leaving_restarts_the_idle_ttl() {
    let ttl = 60_000;
    let st = LocalEngine::new(EngineConfig {
        idle_channel_ttl: Duration::from_millis(ttl as u64),
        rules: vec![rule("room", policy(10, 10, SlowPolicy::Disconnect))],
        ..EngineConfig::default()
    });
    publish(&st, "room", "1", T0);
    let epoch = publish(&st, "room", "2", T0).epoch;
    attach(&st, 1, "alice", BIG);
    st.presence_enter(&caller(1, "alice"), "room", Bytes::new(), false, T0).expect("enter");

    let left = T0 + 5 * ttl;
    st.sweep(left);
    assert_eq!(history(&st, "room", left).epoch, epoch, "a member keeps the channel");
    st.presence_leave(&caller(1, "alice"), "room", left).expect("leave");
    st.sweep(left + 1);

    // A client caught up at (epoch, 2) reconnects a moment later.
    attach(&st, 2, "bob", BIG);
    let out = subscribe(&st, 2, &sub_from("room", &[("room", pos(&epoch, 2))]), left + 2);
    assert!(out.replay.is_empty(), "false gap: {:?}", out.replay);
    assert!(out.subscribed.channels[0].recovered);
}

#[test]
fn stats_count_channels_subscriptions_and_members() {
    let st = state();
    assert_eq!(st.stats(), EngineStats::default());
    attach(&st, 1, "alice", BIG);
    attach(&st, 2, "bob", BIG);
    subscribe(&st, 1, &sub("a"), T0);
    subscribe(&st, 1, &sub("a"), T0);
    subscribe(&st, 1, &proto::Subscribe { presence: true, ..sub("b/#") }, T0);
    subscribe(&st, 2, &sub("a"), T0);
    publish(&st, "c", "x", T0);
    st.presence_enter(&caller(1, "alice"), "a", Bytes::new(), false, T0).expect("enter");
    st.presence_enter(&caller(2, "bob"), "a", Bytes::new(), false, T0).expect("enter");

    // Channels: a, c, $presence/a (two enter events). Subscriptions: a (x2
    // sessions; resubscribing replaces), b/# and $presence/b/#.
    let s = st.stats();
    assert_eq!((s.channels, s.subscriptions, s.presence_members), (3, 4, 2));

    st.unsubscribe(1, "b/#").expect("subscribed");
    st.detach(2, CloseKind::Clean, T0);
    let s = st.stats();
    assert_eq!((s.channels, s.subscriptions, s.presence_members), (3, 1, 1));
}

// ---- resume by time (`since_ms`), used by stream cursors ----

fn sub_since(filter: &str, since: i64, positions: &[(&str, proto::Position)]) -> proto::Subscribe {
    proto::Subscribe { since_ms: since as u64, ..sub_from(filter, positions) }
}

#[test]
fn since_replays_channels_without_a_position_from_that_time() {
    let st = state();
    publish(&st, "s/a", "old", T0);
    publish(&st, "s/b", "old", T0);
    publish(&st, "s/a", "a1", T0 + 100);
    let b2 = publish(&st, "s/b", "b2", T0 + 100);
    publish(&st, "s/c", "c1", T0 + 150);
    publish(&st, "s/b", "b3", T0 + 200);
    publish(&st, "other", "x", T0 + 200);
    attach(&st, 1, "u", BIG);
    // s/b has a position (serial 2): only 3 follows; s/a and s/c resume by time.
    let out = subscribe(&st, 1, &sub_since("s/+", T0 + 100, &[("s/b", pos(&b2.epoch, 2))]), T0 + 300);
    let mut got = channel_serials(&out.replay);
    got.sort();
    assert_eq!(got, vec![("s/a".into(), 2), ("s/b".into(), 3), ("s/c".into(), 1)]);
    assert!(out.replay.iter().all(|o| matches!(o, Outbound::Message(_))));
}

#[test]
fn since_before_trimmed_history_is_a_gap_without_from() {
    let st = state_with_rules(vec![rule("t/#", policy(2, 600, SlowPolicy::Disconnect))]);
    for i in 0..5 {
        publish(&st, "t/a", &format!("m{i}"), T0 + i);
    }
    attach(&st, 1, "u", BIG);
    // Messages at T0+0..T0+2 were trimmed: resuming from T0+1 cannot be complete.
    let out = subscribe(&st, 1, &sub_since("t/a", T0 + 1, &[]), T0 + 10);
    assert_eq!(out.replay.len(), 1, "{:?}", out.replay);
    let Outbound::Gap(g) = &out.replay[0] else { panic!("expected a gap: {:?}", out.replay) };
    assert_eq!((g.channel.as_str(), g.from.is_none(), g.reason.as_str()), ("t/a", true, "trimmed"));
    assert_eq!(g.to.as_ref().map(|p| p.serial), Some(5));
    // From T0+3 on, history is complete: exactly 4 and 5.
    let out = subscribe(&st, 1, &sub_since("t/a", T0 + 3, &[]), T0 + 10);
    assert_eq!(serials(&out.replay), vec![4, 5]);
}

#[test]
fn since_covers_presence_companions() {
    let st = state();
    attach(&st, 7, "member", BIG);
    st.presence_enter(&caller(7, "member"), "room", Bytes::from_static(b"hi"), false, T0 + 50).unwrap();
    attach(&st, 1, "u", BIG);
    let req = proto::Subscribe { presence: true, ..sub_since("room", T0, &[]) };
    let out = subscribe(&st, 1, &req, T0 + 100);
    let got = channel_serials(&out.replay);
    assert_eq!(got, vec![("$presence/room".into(), 1)]);
}

// ---- MQTT 5 support: no-local and shared subscriptions ----

#[test]
fn no_local_skips_own_publishes_only() {
    let st = state();
    let own = attach(&st, 1, "a", BIG);
    let other = attach(&st, 2, "b", BIG);
    subscribe(&st, 1, &proto::Subscribe { no_local: true, ..sub("n/#") }, T0);
    subscribe(&st, 2, &proto::Subscribe { no_local: true, ..sub("n/#") }, T0);
    st.publish(&caller(1, "a"), publish_req("n/x", "from-1"), T0);
    st.publish(&caller(2, "b"), publish_req("n/x", "from-2"), T0);
    assert_eq!(payloads(&drain(&own)), vec!["from-2".to_string()]);
    assert_eq!(payloads(&drain(&other)), vec!["from-1".to_string()]);
    // A second, local-allowing filter of the same session still delivers once.
    subscribe(&st, 1, &sub("n/x"), T0);
    st.publish(&caller(1, "a"), publish_req("n/x", "again"), T0);
    assert_eq!(payloads(&drain(&own)), vec!["again".to_string()]);
}

#[test]
fn shared_group_gives_each_message_to_one_member() {
    let st = state();
    let m1 = attach(&st, 1, "a", BIG);
    let m2 = attach(&st, 2, "b", BIG);
    let plain = attach(&st, 3, "c", BIG);
    for s in [1, 2] {
        let out = subscribe(&st, s, &sub("$share/workers/jobs/+"), T0);
        assert!(out.replay.is_empty());
    }
    subscribe(&st, 3, &sub("jobs/+"), T0);
    for i in 0..10 {
        publish(&st, "jobs/q", &format!("{i}"), T0);
    }
    let (a, b) = (serials(&drain(&m1)), serials(&drain(&m2)));
    assert_eq!(a.len() + b.len(), 10, "every message to exactly one member: {a:?} {b:?}");
    assert_eq!((a.len(), b.len()), (5, 5), "round robin");
    let mut all: Vec<u64> = a.into_iter().chain(b).collect();
    all.sort();
    assert_eq!(all, (1..=10).collect::<Vec<_>>());
    assert_eq!(serials(&drain(&plain)).len(), 10, "plain subscribers still get everything");
    // A member leaving: the rest get everything.
    st.unsubscribe(2, "$share/workers/jobs/+").unwrap();
    publish(&st, "jobs/q", "x", T0);
    publish(&st, "jobs/q", "y", T0);
    assert_eq!(serials(&drain(&m1)).len(), 2);
    assert!(drain(&m2).is_empty());
    // Detach removes the last member and the group.
    st.detach(1, CloseKind::Clean, T0);
    publish(&st, "jobs/q", "z", T0);
    assert!(st.hub.read().shared_groups() == 0);
}

/// Publishes to different channels are not serialised: while one channel
/// is held (a long replay, a publish waiting on its channel), a publish to
/// another channel completes and is delivered.
#[test]
fn a_held_channel_does_not_hold_up_another() {
    let st = Arc::new(state());
    let ob = attach(&st, 1, "sub", BIG);
    subscribe(&st, 1, &sub("b"), T0);
    publish(&st, "a", "first", T0);
    let cell = st.channels.read().get("a").cloned().expect("channel a exists");
    let held = cell.lock();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let other = {
        let st = st.clone();
        std::thread::spawn(move || {
            let ack = publish(&st, "b", "meanwhile", T0 + 1);
            done_tx.send(ack).unwrap();
        })
    };
    let ack = done_rx.recv_timeout(Duration::from_secs(10)).expect("a publish to b completes while a is held");
    assert_eq!(ack.serial, 1);
    assert_eq!(payloads(&drain(&ob)), vec!["meanwhile"]);
    drop(held);
    other.join().unwrap();
}

/// #13 item 4: a history page is bounded in bytes as well as in count
/// (one message at least, so paging with `since` always moves on).
#[test]
fn history_pages_are_bounded_in_bytes() {
    let st = state();
    let big = "x".repeat(300 * 1024);
    for _ in 0..10 {
        publish(&st, "big", &big, T0);
    }
    let page = |since: u64| {
        let req = proto::History {
            channel: "big".into(),
            since: (since > 0).then(|| pos(&history(&st, "big", T0).epoch, since)),
            ..Default::default()
        };
        st.history(&req, T0).expect("history").messages.iter().map(|m| m.serial).collect::<Vec<_>>()
    };
    assert_eq!(page(0), [1, 2, 3], "1 MiB holds three 300 KiB messages");
    assert_eq!(page(3), [4, 5, 6]);
    assert_eq!(page(9), [10]);
    // A single message over the byte bound still comes, alone.
    let huge = "y".repeat(1_200 * 1024);
    publish(&st, "huge", &huge, T0);
    publish(&st, "huge", &huge, T0);
    let req = proto::History { channel: "huge".into(), ..Default::default() };
    assert_eq!(st.history(&req, T0).expect("history").messages.len(), 1);
}

/// #13 item 6: the node holds at most `max_channels` channels; one more is
/// refused to a publish, a subscribe and a presence enter alike, while
/// existing channels go on. Presence companions come with their channel
/// and are not counted.
#[test]
fn channels_are_capped_per_node() {
    let st = LocalEngine::new(EngineConfig { max_channels: 3, ..EngineConfig::default() });
    attach(&st, 1, "c", BIG);
    st.presence_enter(&caller(1, "c"), "a", Bytes::from("m"), false, T0).expect("a and its companion");
    publish(&st, "b", "x", T0);
    subscribe(&st, 1, &sub("c"), T0);
    assert_eq!(st.stats().channels, 4, "three channels and a presence companion");
    let full = |e: CoreError| (e.code, e.message.contains("maximum of 3 channels"));
    let refused = futures_util::FutureExt::now_or_never(st.publish_at(&caller(1, "c"), publish_req("d", "x"), T0))
        .expect("a memory engine never waits")
        .map(drop)
        .unwrap_err();
    assert_eq!(full(refused), (ErrorCode::Unavailable, true));
    assert_eq!(full(st.subscribe(1, &sub("d"), T0).map(drop).unwrap_err()), (ErrorCode::Unavailable, true));
    let at = sub_from("x/#", &[("x/1", pos("E", 0))]);
    assert_eq!(st.subscribe(1, &at, T0).map(drop).unwrap_err().code, ErrorCode::Unavailable, "positions too");
    let entered = st.presence_enter(&caller(1, "c"), "d", Bytes::from("m"), false, T0);
    assert_eq!(entered.unwrap_err().code, ErrorCode::Unavailable);
    // Existing channels go on.
    assert_eq!(publish(&st, "b", "y", T0).serial, 2);
}

/// #13 item 6: the sweep visits at most a slice of the channels per tick,
/// so a node of very many channels never holds a tick for long; every
/// channel is still visited, over several ticks.
#[test]
fn the_sweep_works_through_many_channels_in_slices() {
    let ttl = 1_000;
    let st = LocalEngine::new(EngineConfig {
        idle_channel_ttl: Duration::from_millis(ttl),
        rules: vec![rule("idle/#", policy(0, 600, SlowPolicy::Disconnect))],
        ..EngineConfig::default()
    });
    let n = SWEEP_SLICE + SWEEP_SLICE / 2;
    for i in 0..n {
        publish(&st, &format!("idle/{i}"), "x", T0);
    }
    st.sweep(T0 + 2 * ttl as i64);
    assert_eq!(st.stats().channels, n - SWEEP_SLICE, "one slice per tick");
    st.sweep(T0 + 2 * ttl as i64);
    assert_eq!(st.stats().channels, 0, "the rest on the next");
}

/// #13 item 18: a subscribe that names when it arrived replays what was
/// accepted after that instant (a publish that raced it, handled first) and
/// nothing accepted before, on a concrete channel and through a wildcard.
#[test]
fn a_subscribe_replays_what_was_accepted_after_it_arrived() {
    let st = state();
    publish(&st, "race/a", "before", T0);
    let arrived = switchboard_protocols::port::mono_ns();
    publish(&st, "race/a", "raced", T0);
    for (session, filter) in [(1, "race/a"), (2, "race/+")] {
        attach(&st, session, "sub", 1 << 20);
        let out = st.subscribe_with(session, &sub(filter), (None, Some(arrived)), T0).expect("subscribe");
        assert_eq!(payloads(&out.replay), ["raced"], "{filter}");
    }
    // Without the arrival: nothing from before.
    attach(&st, 3, "sub", 1 << 20);
    assert!(subscribe(&st, 3, &sub("race/a"), T0).replay.is_empty());
}

/// #13 item 6: what the node's channels hold together is counted as it
/// comes and goes (history, retained values, presence members) and bounded
/// node-wide: a publish that would grow history or retained values past
/// the limit is refused with `unavailable`, a full channel's publish (which
/// replaces its oldest message) is not, and a presence enter past the
/// node's members is refused.
#[test]
fn the_node_bounds_history_retained_values_and_presence_members() {
    let st = LocalEngine::new(EngineConfig {
        default_policy: policy(4, 600, SlowPolicy::Disconnect),
        // Retained values here, without history.
        rules: vec![rule("held/r/#", policy(0, 600, SlowPolicy::Disconnect))],
        max_history_bytes: 2_000,
        max_retained_bytes: 500,
        max_presence_members: 2,
        ..EngineConfig::default()
    });
    let who = caller(99, "publisher");
    let big = "x".repeat(200);
    // Four 200-byte messages fill channel a; a fifth replaces the oldest.
    for _ in 0..5 {
        publish(&st, "held/a", &big, T0);
    }
    let after_a = st.stats().history_bytes;
    assert!(after_a > 4 * 200 && after_a < 4 * 400, "{after_a}");
    // Channel b grows history until the node's limit refuses it.
    let mut refused = None;
    for i in 0..20 {
        if let Err(e) = st.try_publish(&who, publish_req(&format!("held/b{i}"), &big), T0) {
            refused = Some(e);
            break;
        }
    }
    let e = refused.expect("the node's history limit refused a publish");
    assert_eq!(e.code, ErrorCode::Unavailable, "{e}");
    assert!(e.message.contains("bytes of history"), "{e}");
    assert!(st.stats().history_bytes <= 2_000);
    // A full channel still takes publishes: it replaces its oldest.
    publish(&st, "held/a", &big, T0);

    // Retained values: bounded; replacing one's value does not grow them.
    let retained = |ch: &str, payload: &str| {
        let req = proto::Publish { retain: true, ..publish_req(ch, payload) };
        st.try_publish(&who, req, T0)
    };
    let small = "r".repeat(150);
    retained("held/r/a", &small).expect("first retained value");
    retained("held/r/a", &small).expect("a replacement does not grow them");
    retained("held/r/a", &small).expect("a replacement does not grow them");
    let e = retained("held/r/c", &"r".repeat(400)).expect_err("past the retained limit");
    assert!(e.message.contains("retained"), "{e}");
    let held = st.stats().retained_bytes;
    assert!(held > 150 && held <= 500, "{held}");

    // Presence: two members on the node, whichever channels.
    st.presence_enter(&caller(1, "m1"), "held/a", Bytes::new(), false, T0).expect("enter");
    st.presence_enter(&caller(2, "m2"), "held/x", Bytes::new(), false, T0).expect("enter");
    let e = st.presence_enter(&caller(3, "m3"), "held/y", Bytes::new(), false, T0).expect_err("a third");
    assert!(e.message.contains("presence members"), "{e}");
    st.presence_leave(&caller(2, "m2"), "held/x", T0).expect("leave");
    st.presence_enter(&caller(3, "m3"), "held/y", Bytes::new(), false, T0).expect("room again");
    assert_eq!(st.stats().presence_members, 2);

    // What leaves history by age leaves the total; forgotten channels take
    // theirs with them.
    let later = T0 + 601_000;
    st.sweep(later);
    st.sweep(later + 3_700_000);
    assert_eq!(st.stats().history_bytes, 0);
}

/// `channels.retained_ttl`: a retained value older than it is not replayed
/// and is dropped by the sweep (and leaves the node's total).
#[test]
fn retained_values_expire_after_their_ttl() {
    let st = LocalEngine::new(EngineConfig { retained_ttl: Duration::from_secs(60), ..EngineConfig::default() });
    publish_retained(&st, "ttl/a", "old", T0);
    publish_retained(&st, "ttl/b", "old", T0);
    attach(&st, 1, "sub", BIG);
    let fresh = subscribe(&st, 1, &proto::Subscribe { retained: true, ..sub("ttl/a") }, T0 + 59_000);
    assert_eq!(payloads(&fresh.replay), ["old"], "within its ttl");
    let stale = subscribe(&st, 1, &proto::Subscribe { retained: true, ..sub("ttl/a") }, T0 + 60_000);
    assert!(stale.replay.is_empty(), "expired: {:?}", payloads(&stale.replay));
    assert!(st.stats().retained_bytes > 0, "ttl/b's is still held");
    st.sweep(T0 + 61_000);
    assert_eq!(st.stats().retained_bytes, 0, "the sweep dropped ttl/b's");
}
