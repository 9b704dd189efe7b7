//! Presence over WebSocket (both codecs) and REST: enter, update, leave,
//! member lists, identity, and what an abrupt drop, a clean close and a
//! reconnect within the grace period do.

use super::common_b;

use std::time::Duration;

use bytes::Bytes;
use common_b::{error_of, unix_ms};
use serde_json::json;
use switchboard_proto::{self as proto, ErrorCode, Kind, Protocol, client_frame, server_frame};
use switchboard_tests::*;

const ROOM: &str = "rooms/lobby";
const ROOM_EVENTS: &str = "$presence/rooms/lobby";

fn enter(channel: &str, data: &'static [u8]) -> client_frame::Frame {
    client_frame::Frame::PresenceEnter(proto::PresenceEnter { channel: channel.into(), data: Bytes::from_static(data) })
}

fn update(channel: &str, data: &'static [u8]) -> client_frame::Frame {
    client_frame::Frame::PresenceUpdate(proto::PresenceUpdate {
        channel: channel.into(),
        data: Bytes::from_static(data),
    })
}

fn leave(channel: &str) -> client_frame::Frame {
    client_frame::Frame::PresenceLeave(proto::PresenceLeave { channel: channel.into() })
}

fn get(channel: &str) -> client_frame::Frame {
    client_frame::Frame::PresenceGet(proto::PresenceGet { channel: channel.into() })
}

/// Presence requests are acknowledged with a `publish_ack` carrying only the
/// channel.
async fn expect_ack(c: &mut WsClient, frame: client_frame::Frame, channel: &str) -> anyhow::Result<()> {
    let reply = c.request(frame).await?;
    let want = server_frame::Frame::PublishAck(proto::PublishAck { channel: channel.into(), ..Default::default() });
    assert_eq!(reply.frame, Some(want), "presence ack");
    Ok(())
}

async fn members(c: &mut WsClient, channel: &str) -> anyhow::Result<Vec<proto::Member>> {
    match c.request(get(channel)).await?.frame {
        Some(server_frame::Frame::Presence(p)) => {
            assert_eq!(p.channel, channel);
            Ok(p.members)
        }
        other => anyhow::bail!("expected presence, got {other:?}"),
    }
}

async fn rest_members(gw: &TestGateway, channel: &str) -> anyhow::Result<serde_json::Value> {
    let (status, body) = get_json(&format!("{}/v1/channels/{channel}/presence", gw.http)).await?;
    assert_eq!(status, 200, "GET presence: {body}");
    assert_eq!((body["type"].as_str(), body["channel"].as_str()), (Some("presence"), Some(channel)));
    Ok(body["members"].clone())
}

fn member(client: &WsClient, data: &[u8]) -> proto::Member {
    proto::Member {
        client_id: client.connected.client_id.clone(),
        connection_id: client.connected.connection_id.clone(),
        data: Bytes::copy_from_slice(data),
        protocol: Protocol::Ws as i32,
    }
}

/// Checks a presence event envelope: kind, who, data, position.
fn assert_event(e: &proto::Envelope, kind: Kind, who: &WsClient, data: &[u8], serial: u64) {
    assert_eq!(e.channel, ROOM_EVENTS);
    assert_eq!(e.kind(), kind, "event kind of {e:?}");
    let p = e.publisher.as_ref().expect("presence event has a publisher");
    assert_eq!(
        (p.client_id.as_str(), p.connection_id.as_str(), p.protocol()),
        (who.connected.client_id.as_str(), who.connected.connection_id.as_str(), Protocol::Ws)
    );
    assert_eq!(&e.payload[..], data, "event data");
    assert_eq!((e.serial, e.prev_serial), (serial, serial - 1), "event position");
}

async fn enter_update_leave(codec: Codec) -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let mut watcher = WsClient::connect(&gw.ws, codec, "watcher").await?;
    watcher.subscribe(proto::Subscribe { filter: ROOM.into(), presence: true, ..Default::default() }).await?;
    let mut plain = WsClient::connect(&gw.ws, codec, "plain").await?;
    plain.subscribe_to(ROOM).await?;
    let mut alice = WsClient::connect(&gw.ws, codec, "alice").await?;
    let mut bob = WsClient::connect(&gw.ws, codec, "bob").await?;

    expect_ack(&mut alice, enter(ROOM, b"hello"), ROOM).await?;
    assert_event(&watcher.next_message().await?, Kind::PresenceEnter, &alice, b"hello", 1);
    // Entering again with the same data changes nothing and emits nothing:
    // the next event is bob's enter.
    expect_ack(&mut alice, enter(ROOM, b"hello"), ROOM).await?;
    expect_ack(&mut bob, enter(ROOM, b""), ROOM).await?;
    assert_event(&watcher.next_message().await?, Kind::PresenceEnter, &bob, b"", 2);

    expect_ack(&mut alice, update(ROOM, br#"{"status":"away"}"#), ROOM).await?;
    assert_event(&watcher.next_message().await?, Kind::PresenceUpdate, &alice, br#"{"status":"away"}"#, 3);

    // Members are listed with their current data, over WS and REST.
    let want = vec![member(&alice, br#"{"status":"away"}"#), member(&bob, b"")];
    assert_eq!(members(&mut watcher, ROOM).await?, want);
    assert_eq!(members(&mut plain, ROOM).await?, want, "presence.get needs no presence subscription");
    assert_eq!(
        rest_members(&gw, ROOM).await?,
        json!([
            {"client_id": "alice", "connection_id": alice.connected.connection_id, "protocol": "ws", "data": {"status": "away"}},
            {"client_id": "bob", "connection_id": bob.connected.connection_id, "protocol": "ws", "text": ""},
        ])
    );

    expect_ack(&mut alice, leave(ROOM), ROOM).await?;
    assert_event(&watcher.next_message().await?, Kind::PresenceLeave, &alice, br#"{"status":"away"}"#, 4);
    assert_eq!(members(&mut watcher, ROOM).await?, vec![member(&bob, b"")]);
    // Leaving or updating without being present is refused.
    let (code, _) = error_of(&alice.request(leave(ROOM)).await?)?;
    assert_eq!(code, ErrorCode::BadRequest);
    let (code, _) = error_of(&alice.request(update(ROOM, b"x")).await?)?;
    assert_eq!(code, ErrorCode::BadRequest);

    // A subscriber without `presence: true` saw none of the four events: its
    // next frame is this message. The watcher gets it right after the leave.
    let ack = bob.publish(ROOM, b"after", "").await?;
    let m = plain.next_message().await?;
    assert_eq!(
        (m.channel.as_str(), m.kind(), &m.payload[..], m.serial),
        (ROOM, Kind::Message, &b"after"[..], ack.serial)
    );
    let m = watcher.next_message().await?;
    assert_eq!((m.channel.as_str(), &m.payload[..]), (ROOM, &b"after"[..]));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enter_update_leave_json() -> anyhow::Result<()> {
    enter_update_leave(Codec::Json).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enter_update_leave_proto() -> anyhow::Result<()> {
    enter_update_leave(Codec::Proto).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_events_reach_every_codec_and_rest_lists_members() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let mut json_watch = WsClient::connect(&gw.ws, Codec::Json, "wj").await?;
    json_watch.subscribe(proto::Subscribe { filter: "rooms/+".into(), presence: true, ..Default::default() }).await?;
    let mut proto_watch = WsClient::connect(&gw.ws, Codec::Proto, "wp").await?;
    proto_watch.subscribe(proto::Subscribe { filter: ROOM.into(), presence: true, ..Default::default() }).await?;
    let mut carol = WsClient::connect(&gw.ws, Codec::Proto, "carol").await?;
    expect_ack(&mut carol, enter(ROOM, b"\x00\xffbin"), ROOM).await?;
    for w in [&mut json_watch, &mut proto_watch] {
        assert_event(&w.next_message().await?, Kind::PresenceEnter, &carol, b"\x00\xffbin", 1);
    }
    assert_eq!(
        rest_members(&gw, ROOM).await?,
        json!([{"client_id": "carol", "connection_id": carol.connected.connection_id, "protocol": "ws", "data_b64": "AP9iaW4="}])
    );
    // A channel nobody entered lists nobody; an invalid or reserved name is refused.
    assert_eq!(rest_members(&gw, "rooms/empty").await?, json!([]));
    let (status, body) = get_json(&format!("{}/v1/channels/a%2B/presence", gw.http)).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_channel")));
    let (status, body) = get_json(&format!("{}/v1/channels/$SYS/presence", gw.http)).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("reserved_channel")));
    Ok(())
}

#[tokio::test]
async fn enter_without_client_id_is_no_identity() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    for codec in [Codec::Json, Codec::Proto] {
        let mut anon = WsClient::connect(&gw.ws, codec, "").await?;
        assert_eq!(anon.connected.client_id, "");
        let req = anon.send(enter(ROOM, b"x")).await?;
        let reply = anon.next_push().await?;
        assert_eq!(error_of(&reply)?, (ErrorCode::NoIdentity, req), "{codec:?}");
        // The session is still usable.
        anon.publish("rooms/other", b"ok", "").await?;
    }
    assert_eq!(rest_members(&gw, ROOM).await?, json!([]));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abrupt_drop_leaves_after_the_grace() -> anyhow::Result<()> {
    let grace = Duration::from_millis(500);
    let gw = TestGateway::start_with(|cfg| cfg.channels.presence_grace = grace).await?;
    let mut watcher = WsClient::connect(&gw.ws, Codec::Json, "watcher").await?;
    watcher.subscribe(proto::Subscribe { filter: ROOM.into(), presence: true, ..Default::default() }).await?;
    let mut alice = WsClient::connect(&gw.ws, Codec::Json, "alice").await?;
    expect_ack(&mut alice, enter(ROOM, b"a1"), ROOM).await?;
    assert_event(&watcher.next_message().await?, Kind::PresenceEnter, &alice, b"a1", 1);
    let gone = member(&alice, b"a1");

    let dropped_at = unix_ms();
    alice.drop_abruptly();
    eventually(WAIT, "the dropped session to close", || async { gw.sessions() == 1 }).await?;
    // Within the grace the member is still listed.
    assert_eq!(members(&mut watcher, ROOM).await?, vec![gone.clone()]);
    assert_eq!(rest_members(&gw, ROOM).await?.as_array().map(Vec::len), Some(1));

    let e = watcher.next_message().await?;
    assert_eq!(e.kind(), Kind::PresenceLeave);
    assert_eq!(e.publisher.as_ref().map(|p| p.connection_id.as_str()), Some(gone.connection_id.as_str()));
    assert_eq!((&e.payload[..], e.serial), (&b"a1"[..], 2));
    let waited = e.timestamp - dropped_at;
    assert!(waited >= grace.as_millis() as i64, "left {waited} ms after the drop, before the {grace:?} grace");
    assert_eq!(members(&mut watcher, ROOM).await?, vec![]);
    assert_eq!(rest_members(&gw, ROOM).await?, json!([]));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_close_leaves_at_once() -> anyhow::Result<()> {
    // A grace far longer than the test's wait: only an immediate leave passes.
    let gw = TestGateway::start_with(|cfg| cfg.channels.presence_grace = Duration::from_secs(60)).await?;
    let mut watcher = WsClient::connect(&gw.ws, Codec::Proto, "watcher").await?;
    watcher.subscribe(proto::Subscribe { filter: ROOM.into(), presence: true, ..Default::default() }).await?;
    let mut alice = WsClient::connect(&gw.ws, Codec::Proto, "alice").await?;
    expect_ack(&mut alice, enter(ROOM, b"a1"), ROOM).await?;
    assert_event(&watcher.next_message().await?, Kind::PresenceEnter, &alice, b"a1", 1);
    let closing = member(&alice, b"a1");

    let closed_at = unix_ms();
    alice.close().await?;
    let e = watcher.next_message().await?;
    assert_eq!(e.kind(), Kind::PresenceLeave);
    assert_eq!(e.publisher.as_ref().map(|p| p.connection_id.as_str()), Some(closing.connection_id.as_str()));
    assert_eq!((&e.payload[..], e.serial), (&b"a1"[..], 2));
    assert!(e.timestamp - closed_at < 5_000, "clean close left after {} ms", e.timestamp - closed_at);
    assert_eq!(members(&mut watcher, ROOM).await?, vec![]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_within_the_grace_keeps_the_member() -> anyhow::Result<()> {
    let grace = Duration::from_millis(800);
    let gw = TestGateway::start_with(|cfg| cfg.channels.presence_grace = grace).await?;
    let mut watcher = WsClient::connect(&gw.ws, Codec::Json, "watcher").await?;
    watcher.subscribe(proto::Subscribe { filter: ROOM.into(), presence: true, ..Default::default() }).await?;
    let mut alice = WsClient::connect(&gw.ws, Codec::Json, "alice").await?;
    expect_ack(&mut alice, enter(ROOM, b"same"), ROOM).await?;
    assert_event(&watcher.next_message().await?, Kind::PresenceEnter, &alice, b"same", 1);

    alice.drop_abruptly();
    eventually(WAIT, "the dropped session to close", || async { gw.sessions() == 1 }).await?;
    let mut again = WsClient::connect(&gw.ws, Codec::Proto, "alice").await?;
    expect_ack(&mut again, enter(ROOM, b"same"), ROOM).await?;
    // The new connection took over the membership: one member, no events.
    assert_eq!(members(&mut watcher, ROOM).await?, vec![member(&again, b"same")]);

    // A marker member dropped now leaves one grace later, so its leave comes
    // after any leave alice's old connection could still produce. The
    // watcher's next two events must be the marker's enter and leave.
    let mut marker = WsClient::connect(&gw.ws, Codec::Json, "marker").await?;
    expect_ack(&mut marker, enter(ROOM, b"m"), ROOM).await?;
    assert_event(&watcher.next_message().await?, Kind::PresenceEnter, &marker, b"m", 2);
    let marker_conn = marker.connected.connection_id.clone();
    marker.drop_abruptly();
    let e = watcher.next_message().await?;
    assert_eq!(
        (e.kind(), e.publisher.as_ref().map(|p| p.connection_id.as_str()), e.serial),
        (Kind::PresenceLeave, Some(marker_conn.as_str()), 3),
        "unexpected event {e:?}"
    );
    assert_eq!(members(&mut watcher, ROOM).await?, vec![member(&again, b"same")]);
    Ok(())
}
