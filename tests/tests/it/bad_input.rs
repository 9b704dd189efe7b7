//! Bad input gets its documented reaction (error frame, close code or HTTP
//! status), never a panic, and other clients stay unaffected: every test
//! keeps a bystander subscriber that must still receive a message published
//! at the end, and `/healthz` must still answer.

use super::common_b;

use std::collections::BTreeMap;

use anyhow::{anyhow, bail};
use bytes::Bytes;
use common_b::{Bystander, disconnect_of, error_of};
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use switchboard_proto::{self as proto, ErrorCode, client_frame, server_frame};
use switchboard_tests::*;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::{self, Message};

/// The next data frame of a raw connection, decoded for `codec`.
async fn raw_frame(ws: &mut RawWs, codec: Codec) -> anyhow::Result<proto::ServerFrame> {
    loop {
        let m = tokio::time::timeout(WAIT, ws.next()).await.map_err(|_| anyhow!("no frame within {WAIT:?}"))?;
        match (m, codec) {
            (Some(Ok(Message::Text(t))), Codec::Json) => return Ok(proto::json::decode_server_frame(t.as_str())?),
            (Some(Ok(Message::Binary(b))), Codec::Proto) => return Ok(proto::ServerFrame::decode(b)?),
            (Some(Ok(Message::Ping(_) | Message::Pong(_))), _) => continue,
            (other, _) => bail!("expected a {codec:?} frame, got {other:?}"),
        }
    }
}

/// Reads a raw connection until its close frame; returns the code. Data
/// frames before it are an error.
async fn raw_close(ws: &mut RawWs) -> anyhow::Result<u16> {
    loop {
        let m = tokio::time::timeout(WAIT, ws.next()).await.map_err(|_| anyhow!("not closed within {WAIT:?}"))?;
        match m {
            Some(Ok(Message::Close(Some(c)))) => return Ok(u16::from(c.code)),
            Some(Ok(Message::Close(None))) => return Ok(1005),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => bail!("expected a close frame, got {other:?}"),
        }
    }
}

/// Sends raw bytes/text and expects an error frame with `code` and `req` 0.
async fn expect_bad(c: &mut WsClient, m: Message, code: ErrorCode) -> anyhow::Result<()> {
    c.send_raw(m).await?;
    let f = c.next_push().await?;
    assert_eq!(error_of(&f)?, (code, 0), "{f:?}");
    Ok(())
}

/// Sends a request and expects an error frame with `code` echoing its `req`.
async fn expect_refused(c: &mut WsClient, frame: client_frame::Frame, code: ErrorCode) -> anyhow::Result<()> {
    let what = format!("{frame:?}");
    let req = c.send(frame).await?;
    let f = c.next_push().await?;
    assert_eq!(error_of(&f)?, (code, req), "reply to {what}");
    Ok(())
}

fn publish(channel: &str, payload: Bytes) -> client_frame::Frame {
    client_frame::Frame::Publish(proto::Publish { channel: channel.into(), payload, ..Default::default() })
}

fn subscribe(filter: &str) -> client_frame::Frame {
    client_frame::Frame::Subscribe(proto::Subscribe { filter: filter.into(), ..Default::default() })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_frames_are_answered_and_the_connection_survives() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let bystander = Bystander::join(&gw).await?;
    let mut c = WsClient::connect(&gw.ws, Codec::Json, "j").await?;
    expect_bad(&mut c, Message::text(r#"{"type":"publish","#), ErrorCode::BadFrame).await?;
    expect_bad(&mut c, Message::text("not json at all"), ErrorCode::BadFrame).await?;
    expect_bad(&mut c, Message::text(r#"{"type":"publish","req":5,"channel":7}"#), ErrorCode::BadFrame).await?;
    expect_bad(&mut c, Message::text(r#"{"type":"publish","req":6}"#), ErrorCode::BadFrame).await?;
    expect_bad(
        &mut c,
        Message::text(r#"{"type":"publish","req":7,"channel":"a","text":"x","data_b64":"eA=="}"#),
        ErrorCode::BadFrame,
    )
    .await?;
    expect_bad(&mut c, Message::text(r#"{"type":"frobnicate","req":3}"#), ErrorCode::UnknownFrame).await?;
    expect_bad(&mut c, Message::text(r#"{"req":4}"#), ErrorCode::UnknownFrame).await?;
    let ack = c.publish("after/bad", b"fine", "").await?;
    assert_eq!((ack.channel.as_str(), ack.serial, ack.duplicate), ("after/bad", 1, false));
    bystander.still_served(&gw).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_protobuf_frames_are_answered_and_the_connection_survives() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let bystander = Bystander::join(&gw).await?;
    let mut c = WsClient::connect(&gw.ws, Codec::Proto, "p").await?;
    // A truncated varint, and field 1 (req, a varint) sent length-delimited.
    expect_bad(&mut c, Message::binary(vec![0xff, 0xff, 0xff]), ErrorCode::BadFrame).await?;
    expect_bad(&mut c, Message::binary(vec![0x0a, 0x05, 0x01]), ErrorCode::BadFrame).await?;
    // A well-formed ClientFrame with no frame set.
    let empty = proto::ClientFrame { req: 9, frame: None }.encode_to_vec();
    expect_bad(&mut c, Message::binary(empty), ErrorCode::UnknownFrame).await?;
    let ack = c.publish("after/bad", b"fine", "").await?;
    assert_eq!((ack.serial, ack.duplicate), (1, false));
    bystander.still_served(&gw).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_message_kind_for_the_codec_closes_1003() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let bystander = Bystander::join(&gw).await?;
    let mut json = WsClient::connect(&gw.ws, Codec::Json, "j").await?;
    json.send_raw(Message::binary(b"\x08\x01".to_vec())).await?;
    assert_eq!(json.closed_with().await?, 1003);
    let mut bin = WsClient::connect(&gw.ws, Codec::Proto, "p").await?;
    bin.send_raw(Message::text(r#"{"type":"ping","req":1}"#)).await?;
    assert_eq!(bin.closed_with().await?, 1003);
    eventually(WAIT, "both sessions to end", || async { gw.sessions() == 1 }).await?;
    bystander.still_served(&gw).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_before_connect_close_4002() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let bystander = Bystander::join(&gw).await?;

    let mut ws = raw_ws(&gw.ws, Some("switchboard.v1.json")).await?;
    ws.send(Message::text(r#"{"type":"ping","req":7}"#)).await?;
    assert_eq!(error_of(&raw_frame(&mut ws, Codec::Json).await?)?, (ErrorCode::NotConnected, 7));
    assert_eq!(disconnect_of(&raw_frame(&mut ws, Codec::Json).await?)?, (4002, "connect expected".into(), false));
    assert_eq!(raw_close(&mut ws).await?, 4002);

    let mut ws = raw_ws(&gw.ws, Some("switchboard.v1.proto")).await?;
    let sub = proto::ClientFrame { req: 8, frame: Some(subscribe("a")) };
    ws.send(Message::binary(sub.encode_to_vec())).await?;
    assert_eq!(error_of(&raw_frame(&mut ws, Codec::Proto).await?)?, (ErrorCode::NotConnected, 8));
    assert_eq!(disconnect_of(&raw_frame(&mut ws, Codec::Proto).await?)?, (4002, "connect expected".into(), false));
    assert_eq!(raw_close(&mut ws).await?, 4002);

    // An undecodable first frame ends the connection the same way.
    let mut ws = raw_ws(&gw.ws, Some("switchboard.v1.json")).await?;
    ws.send(Message::text("{")).await?;
    assert_eq!(error_of(&raw_frame(&mut ws, Codec::Json).await?)?, (ErrorCode::BadFrame, 0));
    assert_eq!(disconnect_of(&raw_frame(&mut ws, Codec::Json).await?)?.0, 4002);
    assert_eq!(raw_close(&mut ws).await?, 4002);

    assert_eq!(gw.sessions(), 1, "no session was opened");
    bystander.still_served(&gw).await
}

async fn invalid_names(codec: Codec) -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let bystander = Bystander::join(&gw).await?;
    let mut c = WsClient::connect(&gw.ws, codec, "names").await?;
    let long = "a".repeat(257);
    for bad in ["", long.as_str(), "a/+", "a/#", "+", "a\0b"] {
        expect_refused(&mut c, publish(bad, Bytes::from_static(b"x")), ErrorCode::InvalidChannel).await?;
        let enter = proto::PresenceEnter { channel: bad.into(), data: Bytes::new() };
        expect_refused(&mut c, client_frame::Frame::PresenceEnter(enter), ErrorCode::InvalidChannel).await?;
    }
    expect_refused(&mut c, publish("$SYS/x", Bytes::from_static(b"x")), ErrorCode::ReservedChannel).await?;
    expect_refused(&mut c, publish("$presence/a", Bytes::from_static(b"x")), ErrorCode::ReservedChannel).await?;
    for bad in ["a/#/b", "a+", "#a", "a/b#", "", long.as_str(), "a\0"] {
        expect_refused(&mut c, subscribe(bad), ErrorCode::InvalidFilter).await?;
    }
    expect_refused(&mut c, subscribe("$SYS/#"), ErrorCode::ReservedChannel).await?;
    // The limits are inclusive: 256 bytes is a valid name.
    let longest = "b".repeat(256);
    c.subscribe_to(&longest).await?;
    let ack = c.publish(&longest, b"edge", "").await?;
    let m = c.next_message().await?;
    assert_eq!((m.channel.as_str(), m.serial), (longest.as_str(), ack.serial));
    bystander.still_served(&gw).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_channels_and_filters_json() -> anyhow::Result<()> {
    invalid_names(Codec::Json).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_channels_and_filters_proto() -> anyhow::Result<()> {
    invalid_names(Codec::Proto).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_payload_is_refused_and_the_connection_stays() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|cfg| cfg.limits.max_message_size = 4096).await?;
    let bystander = Bystander::join(&gw).await?;
    for codec in [Codec::Json, Codec::Proto] {
        let mut c = WsClient::connect(&gw.ws, codec, "big").await?;
        expect_refused(&mut c, publish("big", Bytes::from(vec![b'x'; 4097])), ErrorCode::MessageTooLarge).await?;
        let enter = proto::PresenceEnter { channel: "big".into(), data: Bytes::from(vec![b'x'; 4097]) };
        expect_refused(&mut c, client_frame::Frame::PresenceEnter(enter), ErrorCode::MessageTooLarge).await?;
        // The limit bounds the whole message (channel and fields too).
        let ack = c.publish("big", &[b'y'; 4000], "").await?;
        assert!(!ack.duplicate);
    }
    bystander.still_served(&gw).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_frame_closes_1009() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|cfg| {
        cfg.limits.max_message_size = 16 * 1024;
        cfg.limits.max_frame_size = 64 * 1024;
    })
    .await?;
    let bystander = Bystander::join(&gw).await?;
    let mut json = WsClient::connect(&gw.ws, Codec::Json, "j").await?;
    // Just under the frame limit passes (and is refused by the payload limit).
    let under = format!(r#"{{"type":"publish","req":1,"channel":"a","text":"{}"}}"#, "x".repeat(60 * 1024));
    expect_too_large_reply(&mut json, under).await?;
    json.send_raw(Message::text("x".repeat(64 * 1024 + 1))).await?;
    assert_eq!(json.closed_with().await?, 1009);
    let mut bin = WsClient::connect(&gw.ws, Codec::Proto, "p").await?;
    bin.send_raw(Message::binary(vec![0u8; 200 * 1024])).await?;
    assert_eq!(bin.closed_with().await?, 1009);
    eventually(WAIT, "both sessions to end", || async { gw.sessions() == 1 }).await?;
    bystander.still_served(&gw).await
}

/// A frame under the frame limit with a payload over the message limit gets
/// `message_too_large` for its `req`.
async fn expect_too_large_reply(c: &mut WsClient, text: String) -> anyhow::Result<()> {
    c.send_raw(Message::text(text)).await?;
    let f = c.next_push().await?;
    assert_eq!(error_of(&f)?, (ErrorCode::MessageTooLarge, 1));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_subprotocol_is_refused_with_http_400() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let bystander = Bystander::join(&gw).await?;
    for offer in ["foo", "mqtt, bar"] {
        let err = match raw_ws(&gw.ws, Some(offer)).await {
            Ok(_) => bail!("upgrade with {offer:?} succeeded"),
            Err(e) => e,
        };
        match err.downcast_ref::<tungstenite::Error>() {
            Some(tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status().as_u16(), 400, "{offer:?}");
                let body: serde_json::Value = serde_json::from_slice(resp.body().as_deref().unwrap_or_default())?;
                assert_eq!(body["error"]["code"], "unsupported_subprotocol", "{body}");
            }
            other => bail!("expected an HTTP error for {offer:?}, got {other:?} ({err})"),
        }
    }
    // A supported offer among unknown ones is accepted.
    let mut ok = raw_ws(&gw.ws, Some("foo, switchboard.v1.proto")).await?;
    let connect = proto::ClientFrame { req: 1, frame: Some(client_frame::Frame::Connect(proto::Connect::default())) };
    ok.send(Message::binary(connect.encode_to_vec())).await?;
    assert!(matches!(raw_frame(&mut ok, Codec::Proto).await?.frame, Some(server_frame::Frame::Connected(_))));
    bystander.still_served(&gw).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_positions_are_refused() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let bystander = Bystander::join(&gw).await?;
    let mut c = WsClient::connect(&gw.ws, Codec::Json, "pos").await?;
    let ack = c.publish("pos", b"one", "").await?;
    let at = |epoch: &str, serial: u64| proto::Position { epoch: epoch.into(), serial };
    let with_positions = |filter: &str, positions: BTreeMap<String, proto::Position>| {
        client_frame::Frame::Subscribe(proto::Subscribe { filter: filter.into(), positions, ..Default::default() })
    };
    let cases = [
        ("pos", "pos", at("", 1), ErrorCode::BadPosition),
        ("pos", "pos", at(&ack.epoch, 2), ErrorCode::BadPosition),
        ("pos", "other", at(&ack.epoch, 1), ErrorCode::BadPosition),
        ("pos/#", "pos/a+", at(&ack.epoch, 1), ErrorCode::InvalidChannel),
    ];
    for (filter, channel, position, code) in cases {
        let frame = with_positions(filter, BTreeMap::from([(channel.to_string(), position)]));
        expect_refused(&mut c, frame, code).await?;
    }
    let history = |since: proto::Position| {
        client_frame::Frame::History(proto::History { channel: "pos".into(), since: Some(since), ..Default::default() })
    };
    expect_refused(&mut c, history(at(&ack.epoch, 5)), ErrorCode::BadPosition).await?;
    expect_refused(&mut c, history(at("not-the-epoch", 1)), ErrorCode::BadPosition).await?;
    // The session still works: a valid position recovers.
    let s = c
        .subscribe(proto::Subscribe {
            filter: "pos".into(),
            positions: BTreeMap::from([("pos".into(), at(&ack.epoch, 0))]),
            ..Default::default()
        })
        .await?;
    assert_eq!(
        s.channels,
        vec![proto::ChannelState { channel: "pos".into(), epoch: ack.epoch.clone(), serial: 1, recovered: true }]
    );
    let m = c.next_message().await?;
    assert_eq!((&m.payload[..], m.serial), (&b"one"[..], 1));
    bystander.still_served(&gw).await
}

/// A REST publish case: channel, body, headers, expected status and code.
type RestCase<'a> = (&'a str, Vec<u8>, &'a [(&'a str, &'a str)], u16, &'a str);

async fn rest_status(resp: reqwest::Response) -> anyhow::Result<(u16, serde_json::Value)> {
    let status = resp.status().as_u16();
    let body = resp.json().await.unwrap_or(serde_json::Value::Null);
    Ok((status, body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_errors_have_documented_statuses_and_bodies() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let bystander = Bystander::join(&gw).await?;
    let code = |v: &serde_json::Value| v["error"]["code"].as_str().map(str::to_string);
    let h = &gw.http;
    let json_ct = [("content-type", "application/json")];

    let cases: Vec<RestCase<'_>> = vec![
        ("a/+", b"x".to_vec(), &[], 400, "invalid_channel"),
        ("", b"x".to_vec(), &[], 400, "invalid_channel"),
        ("a%00b", b"x".to_vec(), &[], 400, "invalid_channel"),
        ("$SYS/x", b"x".to_vec(), &[], 403, "reserved_channel"),
        ("big", vec![b'x'; 64 * 1024 + 1], &[], 413, "message_too_large"),
        ("big", vec![b'x'; 1024 * 1024 + 1], &[], 413, "message_too_large"),
        ("j", b"{not json".to_vec(), &json_ct, 400, "bad_frame"),
        ("j", br#"{"text":"a","unknown":1}"#.to_vec(), &json_ct, 400, "bad_frame"),
        ("j", br#"{"text":"a","data_b64":"YQ=="}"#.to_vec(), &json_ct, 400, "bad_frame"),
    ];
    for (channel, body, headers, status, want) in cases {
        let (got, resp) = rest_publish(h, channel, body, headers).await?;
        assert_eq!((got, code(&resp)), (status, Some(want.to_string())), "POST to {channel:?}: {resp}");
        assert!(resp["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{resp}");
    }
    let client = reqwest::Client::new();
    let gets = [
        (format!("{h}/nope"), 404, "not_found"),
        (format!("{h}/v1/channels/a/nope"), 404, "not_found"),
        (format!("{h}/v1/channels/a/history?since=garbage"), 400, "bad_position"),
        (format!("{h}/v1/channels/a/history?since=e:notanumber"), 400, "bad_position"),
        (format!("{h}/v1/channels/a/history?limit=many"), 400, "bad_request"),
        (format!("{h}/v1/channels/a/history?bogus=1"), 400, "bad_request"),
        (format!("{h}/v1/channels/a/messages"), 405, "method_not_allowed"),
        (format!("{h}/v1/ws"), 426, "upgrade_required"),
    ];
    for (url, status, want) in gets {
        let (got, body) = rest_status(client.get(&url).send().await?).await?;
        assert_eq!((got, code(&body)), (status, Some(want.to_string())), "GET {url}: {body}");
    }
    // A position ahead of the channel is a conflict.
    let (status, ack) = rest_publish(h, "hist", "one", &[]).await?;
    assert_eq!(status, 200);
    let epoch = ack["epoch"].as_str().unwrap_or_default();
    let (got, body) = get_json(&format!("{h}/v1/channels/hist/history?since={epoch}:9")).await?;
    assert_eq!((got, code(&body)), (409, Some("bad_position".to_string())), "{body}");
    bystander.still_served(&gw).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_is_byte_identical_and_invalid_utf8_closes_1007() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let bystander = Bystander::join(&gw).await?;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{}/v1/ws-echo", gw.ws)).await?;
    let sent = [
        Message::text("héllo ✓ \u{1F600}"),
        Message::text(""),
        Message::binary(vec![0u8, 1, 2, 0xfe, 0xff]),
        Message::binary(Vec::new()),
        Message::binary((0..200_000u32).map(|i| (i % 251) as u8).collect::<Vec<u8>>()),
        Message::text("x".repeat(100_000)),
    ];
    for m in sent {
        ws.send(m.clone()).await?;
        let got = tokio::time::timeout(WAIT, ws.next()).await?.ok_or_else(|| anyhow!("echo ended"))??;
        assert_eq!(got, m);
    }
    // A text frame that is not UTF-8, sent as a raw frame so the client
    // library does not refuse it.
    let frame = Frame::message(Bytes::from_static(&[0xff, 0xfe]), OpCode::Data(Data::Text), true);
    ws.send(Message::Frame(frame)).await?;
    assert_eq!(raw_close(&mut ws).await?, 1007);
    bystander.still_served(&gw).await
}

/// JSON that parsers refuse or change (`1e999`, a lone surrogate, nesting
/// deeper than 128) is a payload like any other: published over REST and
/// WebSocket, it comes back byte for byte from REST history and from a JSON
/// WebSocket client's history and presence requests (carried as `text`),
/// and nothing panics (before, the history and presence encoders did).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_json_payloads_round_trip_through_history_and_presence() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
    let payloads: Vec<&[u8]> = vec![b"1e999", br#""\ud800""#, deep.as_bytes(), br#"{"a":[1e400]}"#];
    let http = reqwest::Client::new();
    for p in &payloads {
        let r = http.post(format!("{}/v1/channels/hostile/rest/messages", gw.http)).body(p.to_vec()).send().await?;
        assert_eq!(r.status(), 200);
    }
    let r = http.get(format!("{}/v1/channels/hostile/rest/history", gw.http)).send().await?;
    assert_eq!(r.status(), 200, "REST history answers");
    let body: serde_json::Value = r.json().await?;
    let texts: Vec<&str> = body["messages"].as_array().unwrap().iter().map(|m| m["text"].as_str().unwrap()).collect();
    let want: Vec<&str> = payloads.iter().map(|p| std::str::from_utf8(p).unwrap()).collect();
    assert_eq!(texts, want, "each payload back, verbatim, as text");

    let mut c = WsClient::connect(&gw.ws, Codec::Json, "hostile").await?;
    for p in &payloads {
        let f = client_frame::Frame::Publish(proto::Publish {
            channel: "hostile/ws".into(),
            payload: Bytes::copy_from_slice(p),
            ..Default::default()
        });
        assert!(matches!(c.request(f).await?.frame, Some(server_frame::Frame::PublishAck(_))));
    }
    let h = c
        .request(client_frame::Frame::History(proto::History { channel: "hostile/ws".into(), ..Default::default() }))
        .await?;
    let Some(server_frame::Frame::History(h)) = h.frame else { bail!("no history: {h:?}") };
    let got: Vec<&[u8]> = h.messages.iter().map(|m| m.payload.as_ref()).collect();
    assert_eq!(got, payloads);
    for p in &payloads {
        let enter = client_frame::Frame::PresenceEnter(proto::PresenceEnter {
            channel: "hostile/room".into(),
            data: Bytes::copy_from_slice(p),
        });
        c.request(enter).await?;
        let get =
            c.request(client_frame::Frame::PresenceGet(proto::PresenceGet { channel: "hostile/room".into() })).await?;
        let Some(server_frame::Frame::Presence(m)) = get.frame else { bail!("no presence: {get:?}") };
        assert_eq!(m.members[0].data.as_ref(), *p, "presence data back, verbatim");
    }
    Ok(())
}
