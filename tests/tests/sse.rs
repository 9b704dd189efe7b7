//! Server-Sent Events (`GET /v1/sse`) with a real SSE client (reqwest's
//! byte stream parsed by `eventsource-stream`): what WebSocket and REST
//! publishers send arrives byte-identical at the acked positions; the stream
//! opens with `retry:` and a `connected` event and keeps itself alive;
//! reconnecting with nothing but the last `id:` as `Last-Event-ID` resumes
//! every channel exactly (or says `gap`); presence works through the REST
//! uplink; bad requests are clear 400s; abandoned streams free their sessions.

#[allow(dead_code)] // each test binary uses part of it
mod common_sse;

use std::time::Duration;

use bytes::Bytes;
use common_sse::*;
use futures_util::{FutureExt, StreamExt};
use switchboard_proto::{self as proto, Kind, Protocol, client_frame, server_frame};
use switchboard_tests::*;

/// Publishes one message per channel and expects exactly those next, in
/// order: proves nothing else (no duplicate, no stray channel) was queued
/// before them.
async fn assert_live(sse: &mut SseClient, publisher: &mut WsClient, channels: &[&str]) -> anyhow::Result<()> {
    let live = publish_round_robin(publisher, channels, 1, "live").await?;
    let got = sse.messages(live.len()).await?;
    assert_eq!(got.iter().map(Sent::of).collect::<Vec<_>>(), live, "live messages after the replay");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_ws_and_rest_publishes_byte_identical() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let mut sse = SseClient::connect(&gw.http, &channels_query(&MIXED_FILTERS, &[]), None).await?;
    let mut ws = WsClient::connect(&gw.ws, Codec::Proto, "ws-pub").await?;
    let want = publish_mixed(&gw.http, &mut ws).await?;
    assert_eq!(want.len(), 7);

    let mut got = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..want.len() {
        let ev = sse.next_event().await?;
        let Some(server_frame::Frame::Message(e)) = ev.frame.frame else {
            anyhow::bail!("expected a message event, got {} {}", ev.name, ev.data);
        };
        assert_eq!(ev.name, "message");
        ids.push(ev.id.clone());
        got.push((ev.data, e));
    }
    assert_mixed(&got, &want);
    // Every event names a new position over all channels of the stream.
    ids.push(sse.start_id.clone());
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), want.len() + 1, "every event's id is a distinct cursor");

    // Nothing for c, a/b, s, s/1/deep was queued: a sentinel comes next.
    assert_live(&mut sse, &mut ws, &["s/3", "a"]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_retry_connected_and_keepalive_comments() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|cfg| {
        cfg.sse.keepalive = Duration::from_millis(150);
        cfg.sse.retry = Duration::from_millis(2500);
    })
    .await?;
    let resp = sse_request(&gw.http, &query(&[("channel", "k"), ("client_id", "keeper")]), None).await?;
    assert_eq!(resp.status().as_u16(), 200);
    let h = resp.headers();
    let header = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
    assert_eq!(header("content-type").as_deref(), Some("text/event-stream"));
    assert_eq!(header("cache-control").as_deref(), Some("no-cache"));
    assert_eq!(header("x-accel-buffering").as_deref(), Some("no"));

    let mut body = resp.bytes_stream();
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while text.matches(": keep-alive\n\n").count() < 2 {
        let chunk = tokio::time::timeout_at(deadline, body.next())
            .await
            .map_err(|_| anyhow::anyhow!("no two keep-alives within {WAIT:?}: {text:?}"))?
            .ok_or_else(|| anyhow::anyhow!("stream ended: {text:?}"))??;
        text.push_str(std::str::from_utf8(&chunk)?);
    }
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("retry: 2500"), "{text:?}");
    assert_eq!(lines.next(), Some(""));
    let id = lines.next().and_then(|l| l.strip_prefix("id: ")).expect("an id line");
    assert!(!id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "{id:?}");
    assert_eq!(lines.next(), Some("event: connected"));
    let data = lines.next().and_then(|l| l.strip_prefix("data: ")).expect("a data line");
    let Some(server_frame::Frame::Connected(c)) = proto::json::decode_server_frame(data)?.frame else {
        panic!("connected data: {data}");
    };
    assert_eq!(c.client_id, "keeper");
    assert!(c.connection_id.starts_with(&format!("{}-", c.node)), "{c:?}");
    assert!(!c.version.is_empty());
    assert_eq!(lines.next(), Some(""));
    // Nothing but keep-alive comments follow on an idle stream.
    let rest: Vec<&str> = lines.filter(|l| !l.is_empty()).collect();
    assert!(rest.len() >= 2 && rest.iter().all(|l| *l == ": keep-alive"), "{text:?}");
    Ok(())
}

/// With `heartbeat=1` the keep-alives are `ping` events a page can see
/// (and watch, to notice a connection that died in silence), with no `id:`:
/// what a browser would send as `Last-Event-ID` stays the last real event's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_sends_ping_events_instead_of_comments() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|cfg| cfg.sse.keepalive = Duration::from_millis(150)).await?;
    let resp = sse_request(&gw.http, &query(&[("channel", "hb"), ("heartbeat", "1")]), None).await?;
    assert_eq!(resp.status().as_u16(), 200);
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while text.matches("event: ping\n").count() < 2 {
        let chunk = tokio::time::timeout_at(deadline, body.next())
            .await
            .map_err(|_| anyhow::anyhow!("no two pings within {WAIT:?}: {text:?}"))?
            .ok_or_else(|| anyhow::anyhow!("stream ended: {text:?}"))??;
        text.push_str(std::str::from_utf8(&chunk)?);
    }
    assert!(!text.contains(": keep-alive"), "{text:?}");
    // After `connected`, only pings: each `event: ping` + `data: {"type":"ping"}`, no id.
    let after = text.split_once("event: connected\n").expect("connected first").1;
    let after = after.split_once("\n\n").expect("the connected event ends").1;
    for event in after.split("\n\n").filter(|e| !e.is_empty()) {
        assert_eq!(event, "event: ping\ndata: {\"type\":\"ping\"}", "{text:?}");
    }
    // Off by default, and refused when malformed.
    let bad = sse_request(&gw.http, &query(&[("channel", "hb"), ("heartbeat", "yes please")]), None).await?;
    assert_eq!(bad.status().as_u16(), 400);
    Ok(())
}

/// A keep-alive goes out only after a whole `sse.keepalive` of silence: a
/// stream busy with messages gets none, and one follows once they stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_comments_only_after_silence() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|cfg| cfg.sse.keepalive = Duration::from_millis(1000)).await?;
    let resp = sse_request(&gw.http, &query(&[("channel", "busy")]), None).await?;
    let mut body = resp.bytes_stream();
    let mut publisher = WsClient::connect(&gw.ws, Codec::Proto, "pub").await?;
    let mut text = String::new();
    // 25 messages 100 ms apart: 2.5 s of traffic, never 1 s of silence.
    for i in 0..25 {
        publisher.publish("busy", format!("m{i}").as_bytes(), &format!("p{i}")).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        while let Some(chunk) = body.next().now_or_never().flatten() {
            text.push_str(std::str::from_utf8(&chunk?)?);
        }
    }
    // (The last one may still be on its way.)
    assert!(text.matches("event: message").count() >= 24, "{text:?}");
    assert!(!text.contains(": keep-alive"), "a keep-alive while messages flowed: {text:?}");
    // Then silence: a keep-alive comes.
    let deadline = tokio::time::Instant::now() + WAIT;
    while !text.contains(": keep-alive\n\n") {
        let chunk = tokio::time::timeout_at(deadline, body.next())
            .await
            .map_err(|_| anyhow::anyhow!("no keep-alive within {WAIT:?} of silence: {text:?}"))?
            .ok_or_else(|| anyhow::anyhow!("stream ended: {text:?}"))??;
        text.push_str(std::str::from_utf8(&chunk)?);
    }
    Ok(())
}

const REC: [&str; 3] = ["rec/a", "rec/b", "rec/c"];

/// Closes the session with `connection_id` through the admin API.
async fn admin_close(gw: &TestGateway, connection_id: &str) -> anyhow::Result<()> {
    let (status, body) = get_json(&format!("{}/v1/sessions", gw.admin)).await?;
    assert_eq!(status, 200, "{body}");
    let session = body["sessions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["connection_id"] == connection_id)
        .ok_or_else(|| anyhow::anyhow!("no admin session {connection_id}: {body}"))?;
    assert_eq!(session["protocol"], "sse");
    let id = session["id"].as_u64().expect("session id");
    let resp = reqwest::Client::new().post(format!("{}/v1/sessions/{id}/close", gw.admin)).send().await?;
    assert_eq!(resp.status().as_u16(), 200);
    Ok(())
}

/// An SSE stream over three channels is cut mid-flow (by the client, or by
/// the server) while publishing goes on; reconnecting with only the last
/// `id:` as `Last-Event-ID` (what a browser's `EventSource` does) delivers
/// exactly the missed messages of every channel, once and in order, then
/// live ones.
async fn resume_after_cut(server_side: bool) -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let q = channels_query(&REC, &[]);
    let mut publisher = WsClient::connect(&gw.ws, Codec::Proto, "pub").await?;
    let mut sse = SseClient::connect(&gw.http, &q, None).await?;

    let mut sent = publish_round_robin(&mut publisher, &REC, 10, "m").await?;
    let mut got = sse.messages(16).await?;
    if server_side {
        admin_close(&gw, &sse.connected.connection_id).await?;
        // What was queued before the close is still written, then the
        // `disconnect` event, then the end of the stream.
        loop {
            let ev = sse.next_event().await?;
            match ev.frame.frame {
                Some(server_frame::Frame::Message(e)) if ev.name == "message" => got.push(e),
                Some(server_frame::Frame::Disconnect(d)) if ev.name == "disconnect" => {
                    assert_eq!((d.code, d.reason.as_str()), (4003, "disconnected by server"));
                    break;
                }
                other => anyhow::bail!("unexpected {} {other:?}", ev.name),
            }
        }
        assert!(sse.next_event_within(WAIT).await?.is_none(), "the stream ends after disconnect");
    }
    let last_id = sse.last_id.clone();
    let old_connection = sse.connected.connection_id.clone();
    sse.drop_connection();

    // Missed while away...
    sent.extend(publish_round_robin(&mut publisher, &REC, 10, "away").await?);
    // ...and still being published while the client reconnects.
    let background = tokio::spawn(async move {
        let sent = publish_round_robin(&mut publisher, &REC, 30, "during").await?;
        anyhow::Ok((publisher, sent))
    });
    let mut sse = SseClient::connect(&gw.http, &q, Some(&last_id)).await?;
    assert_ne!(sse.connected.connection_id, old_connection);
    let (mut publisher, during) = background.await??;
    sent.extend(during);
    assert_eq!(sent.len(), 150);

    let missed = sent.len() - got.len();
    got.extend(sse.messages(missed).await?);
    assert_same_per_channel(&got, &sent);
    assert_live(&mut sse, &mut publisher, &REC).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_event_id_resumes_every_channel_after_client_drop() -> anyhow::Result<()> {
    resume_after_cut(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_event_id_resumes_every_channel_after_server_close() -> anyhow::Result<()> {
    resume_after_cut(true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_first_seen_while_away_is_delivered_on_resume() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let q = channels_query(&["w/+"], &[]);
    let mut publisher = WsClient::connect(&gw.ws, Codec::Proto, "pub").await?;
    let mut sse = SseClient::connect(&gw.http, &q, None).await?;
    let before = publish_round_robin(&mut publisher, &["w/1"], 3, "m").await?;
    let got = sse.messages(3).await?;
    assert_eq!(got.iter().map(Sent::of).collect::<Vec<_>>(), before);
    let last_id = sse.last_id.clone();
    sse.drop_connection();

    let mut want = Vec::new();
    want.extend(publish_round_robin(&mut publisher, &["w/1", "w/2"], 2, "away").await?);
    ws_publish(&mut publisher, "w/2/deep", b"not matched").await?;
    ws_publish(&mut publisher, "x/1", b"not matched").await?;
    want.extend(publish_round_robin(&mut publisher, &["w/3"], 1, "away").await?);

    // The query form (`lastEventId=`, for clients that cannot set headers).
    let resume = channels_query(&["w/+"], &[("lastEventId", &last_id)]);
    let mut sse = SseClient::connect(&gw.http, &resume, None).await?;
    let got = sse.messages(want.len()).await?;
    assert_same_per_channel(&got, &want);
    assert_eq!(got.iter().filter(|e| e.channel == "w/2").map(|e| e.serial).collect::<Vec<_>>(), [1, 2]);
    assert_live(&mut sse, &mut publisher, &["w/2", "w/1", "w/3"]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_filters_deliver_each_message_once() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let q = channels_query(&["o/+", "o/1", "o/#"], &[]);
    let mut publisher = WsClient::connect(&gw.ws, Codec::Proto, "pub").await?;
    let mut sse = SseClient::connect(&gw.http, &q, None).await?;
    let sent = publish_round_robin(&mut publisher, &["o/1", "o/2", "o/1/x"], 3, "m").await?;
    assert_eq!(sse.messages(9).await?.iter().map(Sent::of).collect::<Vec<_>>(), sent);
    let last_id = sse.last_id.clone();
    sse.drop_connection();
    let away = publish_round_robin(&mut publisher, &["o/1", "o/2"], 3, "away").await?;
    let mut sse = SseClient::connect(&gw.http, &q, Some(&last_id)).await?;
    assert_same_per_channel(&sse.messages(6).await?, &away);
    assert_live(&mut sse, &mut publisher, &["o/1", "o/1/x", "o/2"]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trimmed_history_gives_a_gap_event_and_the_stream_continues() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|cfg| cfg.channels.history_size = 5).await?;
    let q = channels_query(&["g/1", "g/2"], &[]);
    let mut publisher = WsClient::connect(&gw.ws, Codec::Proto, "pub").await?;
    let mut sse = SseClient::connect(&gw.http, &q, None).await?;
    let first = publish_round_robin(&mut publisher, &["g/1", "g/2"], 3, "m").await?;
    assert_eq!(sse.messages(6).await?.iter().map(Sent::of).collect::<Vec<_>>(), first);
    let epoch = first[0].epoch.clone();
    let last_id = sse.last_id.clone();
    sse.drop_connection();

    // g/1 loses history meanwhile (20 > 5); g/2 does not (2 <= 5).
    publish_round_robin(&mut publisher, &["g/1"], 20, "away").await?;
    let kept = publish_round_robin(&mut publisher, &["g/2"], 2, "away").await?;

    let mut sse = SseClient::connect(&gw.http, &q, Some(&last_id)).await?;
    let ev = sse.next_event().await?;
    let Some(server_frame::Frame::Gap(gap)) = ev.frame.frame else { panic!("expected a gap, got {ev:?}") };
    assert_eq!(ev.name, "gap");
    let want = proto::Gap {
        channel: "g/1".into(),
        from: Some(proto::Position { epoch: epoch.clone(), serial: 3 }),
        to: Some(proto::Position { epoch: epoch.clone(), serial: 23 }),
        reason: "trimmed".into(),
    };
    assert_eq!(gap, want);
    assert!(!ev.id.is_empty() && ev.id != last_id, "a gap moves the cursor");
    let got = sse.messages(2).await?;
    assert_eq!(got.iter().map(Sent::of).collect::<Vec<_>>(), kept);
    // The stream goes on: live messages after the gap, g/1 from 24.
    assert_live(&mut sse, &mut publisher, &["g/1", "g/2"]).await?;

    // The gap's position holds: resuming from the latest id brings no gap
    // again, just what is new.
    let latest = sse.last_id.clone();
    sse.drop_connection();
    let more = publish_round_robin(&mut publisher, &["g/1"], 1, "again").await?;
    let mut sse = SseClient::connect(&gw.http, &q, Some(&latest)).await?;
    assert_eq!(sse.messages(1).await?.iter().map(Sent::of).collect::<Vec<_>>(), more);
    assert_eq!(more[0].serial, 25);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_events_and_the_rest_uplink() -> anyhow::Result<()> {
    const ROOM: &str = "rooms/sse";
    const EVENTS: &str = "$presence/rooms/sse";
    let gw = TestGateway::start_with(|cfg| cfg.channels.presence_grace = Duration::from_millis(300)).await?;
    let mut sse =
        SseClient::connect(&gw.http, &query(&[("channel", ROOM), ("presence", "1"), ("client_id", "carol")]), None)
            .await?;
    let conn = sse.connected.connection_id.clone();
    assert_eq!(sse.connected.client_id, "carol");

    // A WebSocket client's enter and leave reach the stream.
    let mut alice = WsClient::connect(&gw.ws, Codec::Json, "alice").await?;
    let enter = client_frame::Frame::PresenceEnter(proto::PresenceEnter {
        channel: ROOM.into(),
        data: Bytes::from_static(b"hi"),
    });
    alice.request(enter).await?;
    let e = sse.next_presence().await?;
    let who = |e: &proto::Envelope| {
        let p = e.publisher.clone().unwrap_or_default();
        let protocol = p.protocol();
        (p.client_id, p.connection_id, protocol)
    };
    let alice_id = ("alice".to_string(), alice.connected.connection_id.clone(), Protocol::Ws);
    assert_eq!((e.channel.as_str(), e.kind(), &e.payload[..]), (EVENTS, Kind::PresenceEnter, &b"hi"[..]));
    assert_eq!(who(&e), alice_id);
    alice.request(client_frame::Frame::PresenceLeave(proto::PresenceLeave { channel: ROOM.into() })).await?;
    let e = sse.next_presence().await?;
    assert_eq!((e.channel.as_str(), e.kind()), (EVENTS, Kind::PresenceLeave));
    assert_eq!(who(&e), alice_id);

    // REST uplink: enter presence as the stream.
    let http = reqwest::Client::new();
    let resp = http
        .post(format!("{}/v1/channels/{ROOM}/presence", gw.http))
        .header("x-connection-id", &conn)
        .header("content-type", "application/json")
        .body(r#"{"data":{"mood":"ok"}}"#)
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.json::<serde_json::Value>().await?, serde_json::json!({"channel": ROOM, "entered": true}));
    let carol = ("carol".to_string(), conn.clone(), Protocol::Sse);
    let e = sse.next_presence().await?;
    assert_eq!((e.kind(), &e.payload[..]), (Kind::PresenceEnter, &br#"{"mood":"ok"}"#[..]));
    assert_eq!(who(&e), carol);
    let (status, members) = get_json(&format!("{}/v1/channels/{ROOM}/presence", gw.http)).await?;
    assert_eq!(status, 200);
    assert_eq!(
        members["members"],
        serde_json::json!([{"client_id": "carol", "connection_id": conn, "protocol": "sse", "data": {"mood": "ok"}}])
    );

    // An unknown connection id is refused, not treated as anonymous.
    let (status, body) = rest_publish(&gw.http, ROOM, "x", &[("x-connection-id", "nope-1")]).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("not_connected")), "{body}");

    // REST publish as the stream carries its identity.
    let (status, ack) =
        rest_publish(&gw.http, ROOM, "from the stream", &[("x-connection-id", &conn), ("content-type", "text/plain")])
            .await?;
    assert_eq!(status, 200, "{ack}");
    let m = sse.next_message().await?;
    assert_eq!((&m.payload[..], m.serial), (&b"from the stream"[..], ack["serial"].as_u64().unwrap_or_default()));
    assert_eq!(who(&m), carol);
    let last_id = sse.last_id.clone();

    // Dropping the stream makes its member leave after the grace period.
    let mut watcher = WsClient::connect(&gw.ws, Codec::Json, "watcher").await?;
    watcher.subscribe(proto::Subscribe { filter: ROOM.into(), presence: true, ..Default::default() }).await?;
    sse.drop_connection();
    let leave = watcher.next_message().await?;
    assert_eq!((leave.channel.as_str(), leave.kind()), (EVENTS, Kind::PresenceLeave));
    assert_eq!(who(&leave), carol);
    let (_, members) = get_json(&format!("{}/v1/channels/{ROOM}/presence", gw.http)).await?;
    assert_eq!(members["members"], serde_json::json!([]));

    // The cursor covers presence events too: resuming replays the leave
    // that happened while away, once, then live traffic.
    let q = query(&[("channel", ROOM), ("presence", "1"), ("client_id", "carol")]);
    let mut sse = SseClient::connect(&gw.http, &q, Some(&last_id)).await?;
    let replayed = sse.next_presence().await?;
    assert_eq!(
        (replayed.channel.as_str(), replayed.kind(), replayed.serial),
        (EVENTS, Kind::PresenceLeave, leave.serial)
    );
    assert_eq!(who(&replayed), carol);
    let (status, _) = rest_publish(&gw.http, ROOM, "live", &[]).await?;
    assert_eq!(status, 200);
    let m = sse.next_message().await?;
    assert_eq!(&m.payload[..], b"live");
    Ok(())
}

/// A real cursor for `channel=a` (after one message).
async fn real_cursor(gw: &TestGateway) -> anyhow::Result<(SseClient, String)> {
    let mut sse = SseClient::connect(&gw.http, &query(&[("channel", "a")]), None).await?;
    let (status, _) = rest_publish(&gw.http, "a", "x", &[]).await?;
    assert_eq!(status, 200);
    sse.next_message().await?;
    let id = sse.last_id.clone();
    Ok((sse, id))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_clear_400s() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|cfg| {
        cfg.limits.max_stream_channels = 3;
        cfg.limits.max_query_len = 512;
    })
    .await?;
    let (live, cursor) = real_cursor(&gw).await?;
    let long = "x".repeat(600);
    let tampered = tamper(&cursor);
    let cases: Vec<(&str, String, Option<&str>, &str)> = vec![
        ("garbage cursor", query(&[("channel", "a"), ("cursor", "not a cursor!")]), None, "bad_cursor"),
        ("garbage lastEventId", query(&[("channel", "a"), ("lastEventId", "AAAA")]), None, "bad_cursor"),
        ("garbage Last-Event-ID", query(&[("channel", "a")]), Some("%%%"), "bad_cursor"),
        ("tampered cursor", query(&[("channel", "a"), ("cursor", &tampered)]), None, "bad_cursor"),
        ("tampered Last-Event-ID", query(&[("channel", "a")]), Some(&tampered), "bad_cursor"),
        ("cursor of another stream", query(&[("channel", "b")]), Some(&cursor), "bad_cursor"),
        ("invalid filter", query(&[("channel", "a/#/b")]), None, "invalid_filter"),
        ("no channel", query(&[("presence", "1")]), None, "bad_request"),
        ("empty query", String::new(), None, "bad_request"),
        ("too many channels", channels_query(&["a", "b", "c", "d"], &[]), None, "too_many_subscriptions"),
        ("oversized query", query(&[("channel", &long)]), None, "query_too_large"),
        ("unknown parameter", query(&[("channel", "a"), ("bogus", "1")]), None, "bad_request"),
        ("bad rewind", query(&[("channel", "a"), ("rewind", "ten")]), None, "bad_request"),
        ("bad timeout", query(&[("channel", "a"), ("timeout", "soon")]), None, "bad_request"),
        ("negative timeout", query(&[("channel", "a"), ("timeout", "-1")]), None, "bad_request"),
        ("bad flag", query(&[("channel", "a"), ("presence", "maybe")]), None, "bad_request"),
    ];
    for (what, q, last_event_id, code) in &cases {
        let resp = sse_request(&gw.http, q, *last_event_id).await?;
        let status = resp.status().as_u16();
        assert_eq!(
            resp.headers().get("content-type").and_then(|v| v.to_str().ok()),
            Some("application/json"),
            "{what}"
        );
        assert_error(status, &resp.text().await?, code, what);
    }
    // The two limits count as limits.
    let metrics = reqwest::get(format!("{}/metrics", gw.admin)).await?.text().await?;
    for limit in ["stream_channels", "query_len"] {
        let series = format!("switchboard_limit_exceeded_total{{limit=\"{limit}\",protocol=\"http\"}}");
        assert!(metrics.lines().any(|l| l.starts_with(&series)), "{series} missing");
    }
    // The real cursor itself is fine, and refusals leave no session behind.
    let resumed = SseClient::connect(&gw.http, &query(&[("channel", "a")]), Some(&cursor)).await?;
    assert_eq!(resumed.start_id, cursor);
    eventually(WAIT, "only the two good streams to hold sessions", || async { gw.sessions() == 2 }).await?;
    drop((live, resumed));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_streams_free_their_sessions() -> anyhow::Result<()> {
    // The default keep-alive (15 s): an idle abandoned stream must not
    // need a write to be noticed.
    let gw = TestGateway::start().await?;
    let mut streams = Vec::new();
    for i in 0..4 {
        let ch = format!("ab/{i}");
        streams.push(SseClient::connect(&gw.http, &channels_query(&[&ch, "ab/+"], &[]), None).await?);
    }
    assert_eq!(gw.sessions(), 4);
    // Two go away while idle...
    for s in streams.drain(..2) {
        s.drop_connection();
    }
    eventually(WAIT, "idle abandoned SSE sessions to close", || async { gw.sessions() == 2 }).await?;
    // ...two with messages in flight that nobody reads.
    for i in 0..4 {
        let (status, _) = rest_publish(&gw.http, &format!("ab/{i}"), "after", &[]).await?;
        assert_eq!(status, 200);
    }
    for s in streams.drain(..) {
        s.drop_connection();
    }
    eventually(WAIT, "abandoned SSE sessions to close", || async { gw.sessions() == 0 }).await?;
    // Their subscriptions went with them.
    let (status, stats) = get_json(&format!("{}/v1/stats", gw.admin)).await?;
    assert_eq!(status, 200);
    assert_eq!((stats["sessions"].as_u64(), stats["subscriptions"].as_u64()), (Some(0), Some(0)), "{stats}");
    Ok(())
}

/// The `connected` event's `id:` is documented as the starting cursor, but
/// it is written after the replay was applied: a client cut off after
/// `connected` but before the replayed events (one chunk, split by TCP for
/// any sizeable replay) resumes past them and silently loses them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connected_id_is_the_position_before_the_replay() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let q = channels_query(&["z"], &[]);
    let mut publisher = WsClient::connect(&gw.ws, Codec::Proto, "pub").await?;
    let mut sse = SseClient::connect(&gw.http, &q, None).await?;
    publish_round_robin(&mut publisher, &["z"], 3, "m").await?;
    sse.messages(3).await?;
    let last_id = sse.last_id.clone();
    sse.drop_connection();
    let missed = publish_round_robin(&mut publisher, &["z"], 2, "away").await?;

    // Cut right after `connected`, before reading the replay.
    let sse = SseClient::connect(&gw.http, &q, Some(&last_id)).await?;
    let start = sse.start_id.clone();
    sse.drop_connection();
    let mut sse = SseClient::connect(&gw.http, &q, Some(&start)).await?;
    let live = publish_round_robin(&mut publisher, &["z"], 1, "live").await?;
    let first = Sent::of(&sse.next_message().await?);
    assert_eq!(first, missed[0], "the replay was skipped: resumed at the connected id");
    let got = sse.messages(2).await?;
    assert_eq!(got.iter().map(Sent::of).collect::<Vec<_>>(), [missed[1].clone(), live[0].clone()]);
    assert_eq!(start, last_id, "a resumed stream starts at the position it was given");
    Ok(())
}

/// A new stream's first cursor names the exact position of each plain
/// channel it subscribed to, not only its start time: resuming from it never
/// replays a message accepted before the subscribe, even one stamped in the
/// same millisecond (a resume by time includes that millisecond). Checked
/// on the cursor itself, since "the same millisecond" cannot be forced;
/// wildcard filters and channels with nothing in them yet keep resuming by
/// time, and a rewind's replay still comes after the `connected` id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_cursor_names_the_position_at_subscribe() -> anyhow::Result<()> {
    use switchboard_protocols::cursor::Cursor;
    let gw = TestGateway::start().await?;
    let mut publisher = WsClient::connect(&gw.ws, Codec::Proto, "pub").await?;
    let old = publish_round_robin(&mut publisher, &["pos/a"], 2, "old").await?;
    let serial_of = |cursor: &str, channel: &str| -> anyhow::Result<Option<u64>> {
        Ok(Cursor::decode(cursor)?.channels.get(channel).map(|p| p.serial))
    };

    // SSE: `connected` carries pos/a at 2; pos/empty (no message yet) and
    // the wildcard's channels are absent.
    let q = channels_query(&["pos/a", "pos/empty", "pos/w/+"], &[]);
    let sse = SseClient::connect(&gw.http, &q, None).await?;
    let start = sse.start_id.clone();
    assert_eq!(serial_of(&start, "pos/a")?, Some(old[1].serial));
    assert_eq!(serial_of(&start, "pos/empty")?, None);
    sse.drop_connection();
    let new = publish_round_robin(&mut publisher, &["pos/a", "pos/empty"], 1, "new").await?;
    let mut sse = SseClient::connect(&gw.http, &q, Some(&start)).await?;
    let got = sse.messages(2).await?;
    assert_same_per_channel(&got, &new);

    // Long polling: the first (immediate) poll's cursor, likewise.
    let first = poll(&gw.http, &channels_query(&["pos/a"], &[("timeout", "0")])).await?;
    assert!(first.messages.is_empty(), "{:?}", first.messages);
    assert_eq!(serial_of(&first.cursor, "pos/a")?, Some(new[0].serial));

    // With a rewind the replay follows `connected`, so its id stays before it.
    let q = channels_query(&["pos/a"], &[("rewind", "2")]);
    let mut sse = SseClient::connect(&gw.http, &q, None).await?;
    assert_eq!(serial_of(&sse.start_id, "pos/a")?, None);
    let got = sse.messages(2).await?;
    assert_eq!(got.iter().map(|e| e.serial).collect::<Vec<_>>(), [old[1].serial, new[0].serial]);
    Ok(())
}
