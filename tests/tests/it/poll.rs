//! HTTP long polling (`GET`/`POST /v1/poll`) with real HTTP clients: the
//! messages WebSocket and REST publishers send arrive byte-identical at the
//! acked positions; a chain of polls, each passing the returned cursor,
//! collects every message exactly once (also across `more: true` batches and
//! trimmed history, reported in `gaps`); the cursor is stateless (another
//! gateway process answers it with an explicit `epoch_changed` gap, any
//! connection may carry it); polls hold until a message or their (capped)
//! timeout; bad requests are clear 400s; abandoned polls free their sessions.

use super::common_sse;

use std::time::Duration;

use common_sse::*;
use switchboard_proto as proto;
use switchboard_tests::*;

/// A poll's query: `channel=` for each filter, then `extra`.
fn pq(channels: &[&str], extra: &[(&str, &str)]) -> String {
    channels_query(channels, extra)
}

/// The starting cursor of a fresh subscription (a poll that waits for
/// nothing): later polls resume from it.
async fn start_cursor(http: &str, channels: &[&str]) -> anyhow::Result<String> {
    let b = poll(http, &pq(channels, &[("timeout", "0")])).await?;
    assert!(b.messages.is_empty() && b.gaps.is_empty() && !b.more, "{b:?}");
    assert!(!b.cursor.is_empty());
    Ok(b.cursor)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_ws_and_rest_publishes_byte_identical() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let cursor = start_cursor(&gw.http, &MIXED_FILTERS).await?;
    let mut ws = WsClient::connect(&gw.ws, Codec::Proto, "ws-pub").await?;
    let want = publish_mixed(&gw.http, &mut ws).await?;

    let b = poll(&gw.http, &pq(&MIXED_FILTERS, &[("cursor", &cursor), ("timeout", "5")])).await?;
    assert!(b.gaps.is_empty() && !b.more, "{b:?}");
    let got: Vec<(String, proto::Envelope)> = b.raw_messages.iter().cloned().zip(b.messages.iter().cloned()).collect();
    assert_mixed(&got, &want);

    // Nothing for the unmatched channels either: the next poll holds until
    // the sentinel and answers it alone.
    let sentinel = ws_publish(&mut ws, "s/9", b"sentinel").await?;
    let b = poll(&gw.http, &pq(&MIXED_FILTERS, &[("cursor", &b.cursor), ("timeout", "5")])).await?;
    assert_eq!(b.messages.iter().map(Sent::of).collect::<Vec<_>>(), [sentinel]);
    Ok(())
}

const CHS: [&str; 3] = ["lp/a", "lp/b", "lp/c"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursor_chain_collects_every_message_once_while_publishing() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let mut cursor = start_cursor(&gw.http, &CHS).await?;
    let mut publisher = WsClient::connect(&gw.ws, Codec::Proto, "pub").await?;
    let mut sent = publish_round_robin(&mut publisher, &CHS, 5, "before").await?;
    // Publishing goes on concurrently with the polls.
    let background = tokio::spawn(async move {
        let sent = publish_round_robin(&mut publisher, &CHS, 40, "during").await?;
        anyhow::Ok((publisher, sent))
    });
    let mut got = Vec::new();
    let mut polls = 0;
    let mut collect = async |want: usize, got: &mut Vec<proto::Envelope>, cursor: &mut String| {
        tokio::time::timeout(WAIT, async {
            while got.len() < want {
                let b = poll(&gw.http, &pq(&CHS, &[("cursor", cursor), ("timeout", "5")])).await?;
                // `more` may be true: publishes outrun the polls at times.
                assert!(b.gaps.is_empty(), "{b:?}");
                assert!(!b.messages.is_empty(), "a poll returned empty before its timeout");
                got.extend(b.messages);
                *cursor = b.cursor;
                polls += 1;
            }
            anyhow::Ok(())
        })
        .await
        .map_err(|_| anyhow::anyhow!("only {} of {want} messages within {WAIT:?}", got.len()))?
    };
    collect(15, &mut got, &mut cursor).await?;
    let (mut publisher, during) = background.await??;
    sent.extend(during);
    collect(sent.len(), &mut got, &mut cursor).await?;
    // And with publishes in between polls.
    for round in 0..3 {
        sent.extend(publish_round_robin(&mut publisher, &CHS, 2, &format!("between{round}")).await?);
        collect(sent.len(), &mut got, &mut cursor).await?;
    }
    assert_eq!(sent.len(), 15 + 120 + 18);
    assert_same_per_channel(&got, &sent);
    assert!(polls >= 5, "{polls} polls");

    // Nothing more: a timed-out poll answers an empty batch at the same position.
    let b = poll(&gw.http, &pq(&CHS, &[("cursor", &cursor), ("timeout", "0")])).await?;
    assert!(b.messages.is_empty() && b.gaps.is_empty() && !b.more, "{b:?}");
    assert_eq!(b.cursor, cursor);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_batches_split_at_batch_max() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|cfg| cfg.poll.batch_max = 7).await?;
    let mut cursor = start_cursor(&gw.http, &CHS).await?;
    let mut publisher = WsClient::connect(&gw.ws, Codec::Proto, "pub").await?;
    let sent = publish_round_robin(&mut publisher, &CHS, 10, "m").await?;
    let mut got = Vec::new();
    let mut shape = Vec::new();
    for _ in 0..5 {
        let b = poll(&gw.http, &pq(&CHS, &[("cursor", &cursor), ("timeout", "5")])).await?;
        assert!(b.gaps.is_empty(), "{b:?}");
        shape.push((b.messages.len(), b.more));
        got.extend(b.messages);
        cursor = b.cursor;
    }
    assert_eq!(shape, [(7, true), (7, true), (7, true), (7, true), (2, false)]);
    assert_same_per_channel(&got, &sent);
    let b = poll(&gw.http, &pq(&CHS, &[("cursor", &cursor), ("timeout", "0")])).await?;
    assert_eq!((b.messages.len(), b.more, b.cursor), (0, false, cursor));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trimmed_history_is_reported_in_gaps() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|cfg| cfg.channels.history_size = 5).await?;
    let chs = ["g/1", "g/2"];
    let cursor = start_cursor(&gw.http, &chs).await?;
    let mut publisher = WsClient::connect(&gw.ws, Codec::Proto, "pub").await?;
    let first = publish_round_robin(&mut publisher, &chs, 3, "m").await?;
    let b = poll(&gw.http, &pq(&chs, &[("cursor", &cursor), ("timeout", "5")])).await?;
    assert_same_per_channel(&b.messages, &first);
    let epoch = first[0].epoch.clone();

    publish_round_robin(&mut publisher, &["g/1"], 20, "away").await?;
    let kept = publish_round_robin(&mut publisher, &["g/2"], 2, "away").await?;
    let b = poll(&gw.http, &pq(&chs, &[("cursor", &b.cursor), ("timeout", "5")])).await?;
    let want = proto::Gap {
        channel: "g/1".into(),
        from: Some(proto::Position { epoch: epoch.clone(), serial: 3 }),
        to: Some(proto::Position { epoch: epoch.clone(), serial: 23 }),
        reason: "trimmed".into(),
    };
    assert_eq!(b.gaps, [want]);
    assert_eq!(b.messages.iter().map(Sent::of).collect::<Vec<_>>(), kept);
    assert!(!b.more);

    // The polls go on from after the gap.
    let live = publish_round_robin(&mut publisher, &chs, 1, "live").await?;
    let b = poll(&gw.http, &pq(&chs, &[("cursor", &b.cursor), ("timeout", "5")])).await?;
    assert!(b.gaps.is_empty(), "{b:?}");
    assert_eq!(b.messages.iter().map(Sent::of).collect::<Vec<_>>(), live);
    assert_eq!(live[0].serial, 24);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_cursor_delivers_channels_that_appear_later() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let cursor = start_cursor(&gw.http, &["w/+"]).await?;
    let mut publisher = WsClient::connect(&gw.ws, Codec::Proto, "pub").await?;
    let first = publish_round_robin(&mut publisher, &["w/1"], 2, "m").await?;
    let b = poll(&gw.http, &pq(&["w/+"], &[("cursor", &cursor), ("timeout", "5")])).await?;
    assert_eq!(b.messages.iter().map(Sent::of).collect::<Vec<_>>(), first);

    let mut want = publish_round_robin(&mut publisher, &["w/2", "w/1"], 2, "later").await?;
    ws_publish(&mut publisher, "w/2/deep", b"not matched").await?;
    want.extend(publish_round_robin(&mut publisher, &["w/3"], 1, "later").await?);
    let b = poll(&gw.http, &pq(&["w/+"], &[("cursor", &b.cursor), ("timeout", "5")])).await?;
    assert!(b.gaps.is_empty(), "{b:?}");
    assert_same_per_channel(&b.messages, &want);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_filters_deliver_each_message_once() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let filters = ["o/+", "o/1", "o/#"];
    let mut cursor = start_cursor(&gw.http, &filters).await?;
    let mut publisher = WsClient::connect(&gw.ws, Codec::Proto, "pub").await?;
    for round in 0..2 {
        let sent = publish_round_robin(&mut publisher, &["o/1", "o/2", "o/1/x"], 3, &format!("r{round}")).await?;
        let b = poll(&gw.http, &pq(&filters, &[("cursor", &cursor), ("timeout", "5")])).await?;
        assert_same_per_channel(&b.messages, &sent);
        cursor = b.cursor;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursor_is_stateless_across_connections_and_gateways() -> anyhow::Result<()> {
    const CH: &str = "state/less";
    let gw1 = TestGateway::start().await?;
    // Every poll below goes over a new client, hence a new connection.
    let cursor = start_cursor(&gw1.http, &[CH]).await?;
    let mut acks = Vec::new();
    for i in 0..3 {
        let (status, ack) = rest_publish(&gw1.http, CH, format!("m{i}"), &[]).await?;
        assert_eq!(status, 200, "{ack}");
        acks.push((ack["epoch"].as_str().unwrap_or_default().to_string(), ack["serial"].as_u64().unwrap_or(0)));
    }
    let epoch1 = acks[0].0.clone();
    let b = poll(&gw1.http, &pq(&[CH], &[("cursor", &cursor), ("timeout", "5")])).await?;
    let got: Vec<(String, u64)> = b.messages.iter().map(|e| (e.epoch.clone(), e.serial)).collect();
    assert_eq!(got, acks);
    // The same cursor again, on yet another connection, answers the same.
    let again = poll(&gw1.http, &pq(&[CH], &[("cursor", &cursor), ("timeout", "5")])).await?;
    assert_eq!((again.messages, again.cursor.as_str()), (b.messages.clone(), b.cursor.as_str()));
    let (status, _) = rest_publish(&gw1.http, CH, "m3", &[]).await?;
    assert_eq!(status, 200);
    let b = poll(&gw1.http, &pq(&[CH], &[("cursor", &b.cursor), ("timeout", "5")])).await?;
    assert_eq!(b.messages.iter().map(|e| (&e.payload[..], e.serial)).collect::<Vec<_>>(), [(&b"m3"[..], 4)]);

    // A second gateway process (new memory, new epochs) honours the cursor
    // with an explicit gap, not an error or silence, followed by what the
    // new epoch already holds, from its first message.
    let gw2 = TestGateway::start().await?;
    let (status, early) = rest_publish(&gw2.http, CH, "early", &[]).await?;
    assert_eq!(status, 200, "{early}");
    let epoch2 = early["epoch"].as_str().unwrap_or_default().to_string();
    assert_ne!(epoch2, epoch1);
    let (status, body) = poll_raw(&gw2.http, &pq(&[CH], &[("cursor", &b.cursor), ("timeout", "5")])).await?;
    assert_eq!(status, 200, "{body}");
    let b2 = parse_batch(&body)?;
    assert_eq!(b2.gaps.len(), 1, "{b2:?}");
    let gap = &b2.gaps[0];
    assert_eq!((gap.channel.as_str(), gap.reason.as_str()), (CH, "epoch_changed"));
    assert_eq!(gap.from, Some(proto::Position { epoch: epoch1.clone(), serial: 4 }));
    assert_eq!(gap.to, Some(proto::Position { epoch: epoch2.clone(), serial: 0 }));
    assert_eq!(
        b2.messages.iter().map(|e| (&e.payload[..], e.epoch.as_str(), e.serial)).collect::<Vec<_>>(),
        [(&b"early"[..], epoch2.as_str(), 1)],
        "the new epoch from its first"
    );
    assert_ne!(b2.cursor, b.cursor);
    // Its cursor carries on in the new epoch.
    let (status, ack) = rest_publish(&gw2.http, CH, "fresh", &[]).await?;
    assert_eq!(status, 200);
    assert_eq!((ack["epoch"].as_str(), ack["serial"].as_u64()), (Some(epoch2.as_str()), Some(2)));
    let b3 = poll(&gw2.http, &pq(&[CH], &[("cursor", &b2.cursor), ("timeout", "5")])).await?;
    assert!(b3.gaps.is_empty(), "{b3:?}");
    assert_eq!(
        b3.messages.iter().map(|e| (&e.payload[..], e.epoch.as_str(), e.serial)).collect::<Vec<_>>(),
        [(&b"fresh"[..], epoch2.as_str(), 2)]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_poll_answers_as_soon_as_a_message_arrives() -> anyhow::Result<()> {
    const CH: &str = "wait/here";
    let gw = TestGateway::start().await?;
    let cursor = start_cursor(&gw.http, &[CH]).await?;
    let http = gw.http.clone();
    let q = pq(&[CH], &[("cursor", &cursor), ("timeout", "8")]);
    let started = tokio::time::Instant::now();
    let pending = tokio::spawn(async move { poll(&http, &q).await });
    // The poll holds a session while it waits; REST publishes hold none.
    eventually(WAIT, "the poll to wait", || async { gw.sessions() == 1 }).await?;
    let (status, ack) = rest_publish(&gw.http, CH, "wake up", &[]).await?;
    assert_eq!(status, 200, "{ack}");
    let b = tokio::time::timeout(WAIT, pending).await???;
    assert_eq!(b.messages.iter().map(|e| (&e.payload[..], e.serial)).collect::<Vec<_>>(), [(&b"wake up"[..], 1)]);
    assert!(started.elapsed() < Duration::from_secs(8), "answered at the timeout, not on the message");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_poll_returns_an_empty_batch_and_a_usable_cursor() -> anyhow::Result<()> {
    const CH: &str = "quiet";
    let gw = TestGateway::start().await?;
    // A fresh subscription that times out...
    let first = poll(&gw.http, &pq(&[CH], &[("timeout", "1")])).await?;
    assert!(first.messages.is_empty() && first.gaps.is_empty() && !first.more, "{first:?}");
    // ...and one resumed from a cursor that times out: same position back.
    let second = poll(&gw.http, &pq(&[CH], &[("cursor", &first.cursor), ("timeout", "1")])).await?;
    assert!(second.messages.is_empty() && second.gaps.is_empty() && !second.more, "{second:?}");
    assert_eq!(second.cursor, first.cursor);
    let (status, _) = rest_publish(&gw.http, CH, "later", &[]).await?;
    assert_eq!(status, 200);
    let third = poll(&gw.http, &pq(&[CH], &[("cursor", &second.cursor), ("timeout", "5")])).await?;
    assert_eq!(third.messages.iter().map(|e| (&e.payload[..], e.serial)).collect::<Vec<_>>(), [(&b"later"[..], 1)]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_above_the_maximum_is_capped() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|cfg| {
        cfg.poll.max_timeout = Duration::from_secs(1);
        cfg.poll.default_timeout = Duration::from_secs(1);
    })
    .await?;
    // `poll` gives up after WAIT (10 s): a 30 s wait would fail it.
    let b = poll(&gw.http, &pq(&["capped"], &[("timeout", "30")])).await?;
    assert!(b.messages.is_empty() && b.gaps.is_empty() && !b.more, "{b:?}");
    // No timeout given: the default applies.
    let b = poll(&gw.http, &pq(&["capped"], &[])).await?;
    assert!(b.messages.is_empty() && b.gaps.is_empty() && !b.more, "{b:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_takes_json_and_form_bodies() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let check = |(status, body): (u16, String)| -> anyhow::Result<PollBatch> {
        assert_eq!(status, 200, "{body}");
        parse_batch(&body)
    };
    let empty =
        check(poll_post(&gw.http, "application/json", r#"{"channel":["p/a","p/b"],"timeout":1}"#.into()).await?)?;
    assert!(empty.messages.is_empty() && !empty.more, "{empty:?}");

    let mut publisher = WsClient::connect(&gw.ws, Codec::Proto, "pub").await?;
    let sent = publish_round_robin(&mut publisher, &["p/a", "p/b", "p/c"], 2, "m").await?;
    let want: Vec<Sent> = sent.iter().filter(|s| s.channel != "p/c").cloned().collect();
    let json = serde_json::json!({"channel": ["p/a", "p/b"], "cursor": empty.cursor, "timeout": 5}).to_string();
    let b = check(poll_post(&gw.http, "application/json", json).await?)?;
    assert_same_per_channel(&b.messages, &want);

    let sent = publish_round_robin(&mut publisher, &["p/b", "p/c", "p/a"], 1, "form").await?;
    let want: Vec<Sent> = sent.iter().filter(|s| s.channel != "p/c").cloned().collect();
    let form = pq(&["p/a", "p/b"], &[("cursor", &b.cursor), ("timeout", "5")]);
    let b = check(poll_post(&gw.http, "application/x-www-form-urlencoded", form).await?)?;
    assert_same_per_channel(&b.messages, &want);

    let form = pq(&["p/a", "p/b"], &[("cursor", &b.cursor), ("timeout", "1")]);
    let quiet = check(poll_post(&gw.http, "application/x-www-form-urlencoded", form).await?)?;
    assert!(quiet.messages.is_empty() && !quiet.more, "{quiet:?}");
    assert_eq!(quiet.cursor, b.cursor);

    // A body that is not a JSON object is refused.
    let (status, body) = poll_post(&gw.http, "application/json", r#"["p/a"]"#.into()).await?;
    assert_error(status, &body, "bad_request", "JSON array body");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_clear_400s() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|cfg| {
        cfg.limits.max_stream_channels = 3;
        cfg.limits.max_query_len = 512;
    })
    .await?;
    let start = start_cursor(&gw.http, &["a"]).await?;
    let (status, _) = rest_publish(&gw.http, "a", "x", &[]).await?;
    assert_eq!(status, 200);
    let b = poll(&gw.http, &pq(&["a"], &[("cursor", &start), ("timeout", "5")])).await?;
    assert_eq!(b.messages.len(), 1);
    let cursor = b.cursor;
    let long = "x".repeat(600);
    let tampered = tamper(&cursor);
    let cases: Vec<(&str, String, &str)> = vec![
        ("garbage cursor", query(&[("channel", "a"), ("cursor", "not a cursor!")]), "bad_cursor"),
        ("garbage lastEventId", query(&[("channel", "a"), ("lastEventId", "AAAA")]), "bad_cursor"),
        ("tampered cursor", query(&[("channel", "a"), ("cursor", &tampered)]), "bad_cursor"),
        ("cursor of another stream", query(&[("channel", "b"), ("cursor", &cursor)]), "bad_cursor"),
        ("invalid filter", query(&[("channel", "a/#/b"), ("timeout", "0")]), "invalid_filter"),
        ("no channel", query(&[("timeout", "1")]), "bad_request"),
        ("empty query", String::new(), "bad_request"),
        ("too many channels", pq(&["a", "b", "c", "d"], &[]), "too_many_subscriptions"),
        ("oversized query", query(&[("channel", &long)]), "query_too_large"),
        ("unknown parameter", query(&[("channel", "a"), ("bogus", "1")]), "bad_request"),
        ("bad rewind", query(&[("channel", "a"), ("rewind", "10x")]), "bad_request"),
        ("bad timeout", query(&[("channel", "a"), ("timeout", "soon")]), "bad_request"),
        ("negative timeout", query(&[("channel", "a"), ("timeout", "-1")]), "bad_request"),
    ];
    for (what, q, code) in &cases {
        let (status, body) = poll_raw(&gw.http, q).await?;
        assert_error(status, &body, code, &format!("GET {what}"));
        // The same parameters in a form body.
        let (status, body) = poll_post(&gw.http, "application/x-www-form-urlencoded", q.clone()).await?;
        assert_error(status, &body, code, &format!("POST {what}"));
    }
    let json = |v: serde_json::Value| v.to_string();
    let (status, body) =
        poll_post(&gw.http, "application/json", json(serde_json::json!({"channel": "a", "cursor": tampered}))).await?;
    assert_error(status, &body, "bad_cursor", "JSON body with a tampered cursor");
    let (status, body) =
        poll_post(&gw.http, "application/json", json(serde_json::json!({"channel": ["a/#/b"]}))).await?;
    assert_error(status, &body, "invalid_filter", "JSON body with an invalid filter");
    let (status, body) = poll_post(&gw.http, "application/json", format!(r#"{{"channel":"{long}"}}"#)).await?;
    assert_error(status, &body, "query_too_large", "oversized JSON body");
    // The real cursor is fine, and no refusal left a session behind (the
    // last good poll's session goes with its connection, which the client
    // closed).
    let ok = poll(&gw.http, &pq(&["a"], &[("cursor", &cursor), ("timeout", "0")])).await?;
    assert_eq!((ok.messages.len(), ok.cursor), (0, cursor));
    eventually(WAIT, "no session left", || async { gw.sessions() == 0 }).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_polls_free_their_sessions() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let mut pending = Vec::new();
    for i in 0..4 {
        // A long timeout: the session must go when the client does, not at
        // the end of the wait.
        let q = pq(&[&format!("gone/{i}"), "gone/+"], &[("timeout", "30")]);
        let http = gw.http.clone();
        pending.push(tokio::spawn(async move { poll_raw(&http, &q).await }));
    }
    eventually(WAIT, "four polls to wait", || async { gw.sessions() == 4 }).await?;
    for p in &pending {
        p.abort();
    }
    for p in pending {
        assert!(p.await.is_err_and(|e| e.is_cancelled()), "the poll was still pending");
    }
    eventually(WAIT, "abandoned polls to close their sessions", || async { gw.sessions() == 0 }).await?;
    // Their subscriptions went with them.
    let (status, stats) = get_json(&format!("{}/v1/stats", gw.admin)).await?;
    assert_eq!(status, 200);
    assert_eq!((stats["sessions"].as_u64(), stats["subscriptions"].as_u64()), (Some(0), Some(0)), "{stats}");
    Ok(())
}

/// One HTTP/1.1 keep-alive connection that polls go over one after another
/// (a pooling client may open a second connection when a response's
/// return to its pool races the next request). Dropping it closes it.
#[derive(Clone)]
struct KeepAlive {
    sender: std::sync::Arc<
        tokio::sync::Mutex<hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>>,
    >,
    /// Held so that the connection lives as long as the last clone.
    _conn: std::sync::Arc<AbortOnDrop>,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl KeepAlive {
    async fn open(http: &str) -> anyhow::Result<Self> {
        let stream = tokio::net::TcpStream::connect(http.trim_start_matches("http://")).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(KeepAlive {
            sender: std::sync::Arc::new(tokio::sync::Mutex::new(sender)),
            _conn: std::sync::Arc::new(AbortOnDrop(conn)),
        })
    }

    /// One `GET /v1/poll?{query}` on this connection.
    async fn poll(self, query: String) -> anyhow::Result<PollBatch> {
        use http_body_util::BodyExt as _;
        let req = hyper::Request::get(format!("/v1/poll?{query}"))
            .header(hyper::header::HOST, "gateway")
            .body(http_body_util::Empty::new())?;
        let mut sender = self.sender.lock().await;
        sender.ready().await?;
        let resp = tokio::time::timeout(WAIT, sender.send_request(req)).await??;
        let body = tokio::time::timeout(WAIT, resp.into_body().collect()).await??.to_bytes();
        parse_batch(std::str::from_utf8(&body)?)
    }
}

/// Polls on one keep-alive connection that continue from the cursor they
/// were just given are served by one kept session (no re-subscribe, no
/// replay), and every message still arrives exactly once, published during
/// or between polls. A poll with any other cursor starts afresh from it; the
/// kept session goes with its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_poller_keeps_its_session_between_polls() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let client = KeepAlive::open(&gw.http).await?;
    let get = |q: String| client.clone().poll(q);
    let q =
        |cursor: &str, timeout: &str| pq(&CHS, &[("cursor", cursor), ("timeout", timeout), ("client_id", "keeper")]);
    let keeper = || -> Vec<String> {
        let sessions = gw.gateway.router.sessions();
        sessions.into_iter().filter(|s| s.client_id == "keeper").map(|s| s.connection_id).collect()
    };

    let first = get(pq(&CHS, &[("timeout", "0"), ("client_id", "keeper")])).await?;
    let kept = keeper();
    assert_eq!(kept.len(), 1, "the first poll's session is kept while its connection is open");
    let mut publisher = WsClient::connect(&gw.ws, Codec::Proto, "pub").await?;
    let (mut sent, mut got, mut cursor) = (Vec::new(), Vec::new(), first.cursor.clone());
    for round in 0..4 {
        // Published between polls: queued in the kept session meanwhile.
        sent.extend(publish_round_robin(&mut publisher, &CHS, 3, &format!("between{round}")).await?);
        while got.len() < sent.len() {
            let b = get(q(&cursor, "5")).await?;
            assert!(b.gaps.is_empty() && !b.messages.is_empty(), "{b:?}");
            got.extend(b.messages);
            cursor = b.cursor;
        }
        assert_eq!(keeper(), kept, "round {round}: the kept session served the poll");
    }
    // Published while a poll waits.
    let waiting = tokio::spawn(get(q(&cursor, "5")));
    eventually(WAIT, "the poll to wait", || async { gw.gateway.router.sessions().len() == 2 }).await?;
    let last = publish_round_robin(&mut publisher, &CHS, 1, "during").await?;
    sent.extend(last);
    let b = waiting.await??;
    got.extend(b.messages);
    cursor = b.cursor;
    // The poll answered with the first of them; the rest wait in the session.
    while got.len() < sent.len() {
        let b = get(q(&cursor, "5")).await?;
        got.extend(b.messages);
        cursor = b.cursor;
    }
    assert_same_per_channel(&got, &sent);
    assert_eq!(keeper(), kept);

    // An older cursor is not a continuation: a fresh session replays from it.
    let again = get(q(&first.cursor, "0")).await?;
    assert_same_per_channel(&again.messages, &sent);
    let fresh = keeper();
    assert_eq!(fresh.len(), 1);
    assert_ne!(fresh, kept, "an older cursor reused the kept session");
    // The session goes with the connection.
    drop(client);
    eventually(WAIT, "the kept session to close with its connection", || async { keeper().is_empty() }).await?;
    Ok(())
}

/// A kept session whose slow-consumer policy dropped messages between polls
/// (here `drop-oldest` on a tiny queue) is not continued: the next poll
/// starts afresh from its cursor and gets every message from history, as a
/// poll on a new connection would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_session_that_dropped_messages_is_not_continued() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|cfg| {
        cfg.limits.max_message_size = 1024;
        cfg.limits.outbox_bytes = 2048;
        cfg.channels.slow_consumer = switchboard::edge::config::SlowConsumer::DropOldest;
    })
    .await?;
    let client = KeepAlive::open(&gw.http).await?;
    let get = |q: String| client.clone().poll(q);
    let first = get(pq(&["drop/a"], &[("timeout", "0"), ("client_id", "slow")])).await?;
    let mut publisher = WsClient::connect(&gw.ws, Codec::Proto, "pub").await?;
    // ~60 × 150 bytes: far more than the 2 KiB queue holds between polls.
    let sent = publish_round_robin(&mut publisher, &["drop/a"], 60, &"x".repeat(150)).await?;
    let dropped = gw.gateway.router.sessions().iter().filter(|s| s.client_id == "slow").map(|s| s.dropped).sum::<u64>();
    assert!(dropped > 0, "the kept session's queue overflowed");
    let mut got = Vec::new();
    let mut cursor = first.cursor;
    while got.len() < sent.len() {
        let b = get(pq(&["drop/a"], &[("cursor", &cursor), ("timeout", "5"), ("client_id", "slow")])).await?;
        assert!(b.gaps.is_empty(), "{b:?}");
        got.extend(b.messages);
        cursor = b.cursor;
    }
    assert_same_per_channel(&got, &sent);
    Ok(())
}

/// A poll that names its session (`session=`, empty at first, then each
/// answer's `connection_id`) continues it from any connection: every poll
/// here goes on a fresh connection, yet one session serves them all, and
/// presence entered for it over REST (`X-Connection-Id`) stays one member.
/// Another client naming it gets a fresh session and leaves the parked one
/// to its owner; the owner naming it from another place (an older cursor)
/// gets a fresh session, and the parked one ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_session_continues_on_any_connection_and_keeps_its_presence() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let named = || -> Vec<String> {
        let sessions = gw.gateway.router.sessions();
        sessions.into_iter().filter(|s| s.client_id == "named").map(|s| s.connection_id).collect()
    };
    let q = |session: &str, cursor: &str, timeout: &str| {
        pq(&CHS, &[("session", session), ("cursor", cursor), ("timeout", timeout), ("client_id", "named")])
    };
    let first = poll(&gw.http, &pq(&CHS, &[("session", ""), ("timeout", "0"), ("client_id", "named")])).await?;
    let id = first.connection_id.clone();
    assert_eq!(named(), std::slice::from_ref(&id), "the first poll's session is parked after its answer");

    let http = reqwest::Client::new();
    let enter = http
        .post(format!("{}/v1/channels/lp%2Fa/presence", gw.http))
        .header("x-connection-id", &id)
        .header("content-type", "application/json")
        .body(r#"{"data":{"n":1}}"#)
        .send()
        .await?;
    assert_eq!(enter.status().as_u16(), 200, "presence for the parked session");
    let members = || async {
        let v: serde_json::Value =
            http.get(format!("{}/v1/channels/lp%2Fa/presence", gw.http)).send().await?.json().await?;
        anyhow::Ok(
            v["members"].as_array().map(|m| m.iter().map(|m| m["connection_id"].to_string()).collect::<Vec<_>>()),
        )
    };

    let mut publisher = WsClient::connect(&gw.ws, Codec::Proto, "pub").await?;
    let (mut sent, mut got, mut cursor) = (Vec::new(), Vec::new(), first.cursor.clone());
    for round in 0..3 {
        sent.extend(publish_round_robin(&mut publisher, &CHS, 2, &format!("r{round}")).await?);
        while got.len() < sent.len() {
            // `poll` opens a new connection each time.
            let b = poll(&gw.http, &q(&id, &cursor, "5")).await?;
            assert_eq!(b.connection_id, id, "round {round}: the named session answered");
            got.extend(b.messages);
            cursor = b.cursor;
        }
        assert_eq!(named(), std::slice::from_ref(&id), "round {round}: one session throughout");
        assert_eq!(members().await?, Some(vec![format!("{id:?}")]), "round {round}: one member");
    }
    assert_same_per_channel(&got, &sent);

    // Another client naming it gets a fresh session of its own; the parked
    // one stays for its owner, who continues it.
    let intruder =
        pq(&CHS, &[("session", &id), ("cursor", &first.cursor), ("timeout", "0"), ("client_id", "intruder")]);
    let other = poll(&gw.http, &intruder).await?;
    assert_ne!(other.connection_id, id);
    assert_same_per_channel(&other.messages, &sent);
    assert_eq!(named(), std::slice::from_ref(&id), "the parked session stays for its owner");
    let tail = publish_round_robin(&mut publisher, &CHS, 1, "tail").await?;
    let mut more = Vec::new();
    while more.len() < tail.len() {
        let b = poll(&gw.http, &q(&id, &cursor, "5")).await?;
        assert_eq!(b.connection_id, id, "the owner continues its session");
        more.extend(b.messages);
        cursor = b.cursor;
    }
    assert_same_per_channel(&more, &tail);

    // The owner going back to an older cursor: a fresh session replays from
    // it, and the parked one ends at once.
    let back = poll(&gw.http, &q(&id, &first.cursor, "0")).await?;
    assert_ne!(back.connection_id, id);
    sent.extend(tail);
    assert_same_per_channel(&back.messages, &sent);
    eventually(WAIT, "the replaced session to end", || async { named() == std::slice::from_ref(&back.connection_id) })
        .await?;
    Ok(())
}
