//! #13 item 10: one history policy on every protocol. Recovering what a
//! client missed — from a position or by time — needs only `subscribe`
//! within the recovery window; older messages need `history`. Before the
//! fix, WebSocket `since_ms: 1`, `positions` with serial 0 and a forged
//! SSE / long-poll cursor replayed the whole history to a token without
//! `history`.

use super::common_auth::*;
use super::common_sse::SseClient;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;
use switchboard_proto::{self as proto, server_frame};
use switchboard_protocols::cursor::Cursor;
use switchboard_tests::*;

/// What a replay showed: `not_granted` gaps (their `to` serial) and the
/// message serials, in order.
#[derive(Debug, PartialEq)]
enum Seen {
    Gap(String, u64),
    Msg(u64),
}

/// Reads a WebSocket replay of `n` items.
async fn ws_replay(c: &mut WsClient, n: usize) -> anyhow::Result<Vec<Seen>> {
    let mut seen = Vec::new();
    for _ in 0..n {
        match c.next_push().await?.frame {
            Some(server_frame::Frame::Message(e)) => seen.push(Seen::Msg(e.serial)),
            Some(server_frame::Frame::Gap(g)) => seen.push(Seen::Gap(g.reason, g.to.map_or(0, |p| p.serial))),
            other => anyhow::bail!("expected a replay item, got {other:?}"),
        }
    }
    Ok(seen)
}

#[tokio::test]
async fn without_history_a_resume_reads_no_further_back_than_the_recovery_window() -> anyhow::Result<()> {
    let gw = gateway_with(|cfg| cfg.channels.recovery_window = Duration::from_millis(1_500)).await?;
    let key = [("x-api-key", API_KEY)];
    let mut epoch = String::new();
    for i in 1..=3 {
        let (status, body) = rest_publish(&gw.http, "h/a", format!("old{i}"), &key).await?;
        assert_eq!(status, 200);
        epoch = body["epoch"].as_str().unwrap_or_default().to_string();
    }
    tokio::time::sleep(Duration::from_millis(1_700)).await;
    for i in 4..=5 {
        assert_eq!(rest_publish(&gw.http, "h/a", format!("new{i}"), &key).await?.0, 200);
    }
    let expected = vec![Seen::Gap("not_granted".into(), 3), Seen::Msg(4), Seen::Msg(5)];

    // WebSocket (protobuf: the test helper's JSON encoder leaves `since_ms`
    // out), subscribe only: by time from the beginning, and from a position
    // before the first message — both forged.
    let narrow = token("reader", 60, json!({"h/#": "subscribe"}));
    let by_time = proto::Subscribe { filter: "h/a".into(), since_ms: 1, ..Default::default() };
    let at_zero = proto::Subscribe {
        filter: "h/a".into(),
        positions: BTreeMap::from([("h/a".to_string(), proto::Position { epoch: epoch.clone(), serial: 0 })]),
        ..Default::default()
    };
    for sub in [by_time.clone(), at_zero.clone()] {
        let mut c = WsClient::connect_with_token(&gw.ws, Codec::Proto, &narrow).await?;
        c.subscribe(sub.clone()).await?;
        assert_eq!(ws_replay(&mut c, 3).await?, expected, "{sub:?}");
    }
    // Within the window a position recovers exactly, gap-free.
    let mut c = WsClient::connect_with_token(&gw.ws, Codec::Proto, &narrow).await?;
    let at_four = proto::Subscribe {
        filter: "h/a".into(),
        positions: BTreeMap::from([("h/a".to_string(), proto::Position { epoch: epoch.clone(), serial: 4 })]),
        ..Default::default()
    };
    let subscribed = c.subscribe(at_four).await?;
    assert!(subscribed.channels[0].recovered);
    assert_eq!(ws_replay(&mut c, 1).await?, vec![Seen::Msg(5)]);

    // With `history`, the same requests read everything.
    let wide = token("historian", 60, json!({"h/#": "subscribe,history"}));
    for sub in [by_time, at_zero] {
        let mut c = WsClient::connect_with_token(&gw.ws, Codec::Proto, &wide).await?;
        c.subscribe(sub.clone()).await?;
        let all: Vec<Seen> = (1..=5).map(Seen::Msg).collect();
        assert_eq!(ws_replay(&mut c, 5).await?, all, "{sub:?}");
    }

    // SSE and long polling with a forged cursor (`since` 1, no channel).
    let forged = Cursor::new(1).encode();
    let mut sse = SseClient::connect(&gw.http, &format!("channel=h/a&token={narrow}"), Some(&forged)).await?;
    let mut seen = Vec::new();
    for _ in 0..3 {
        let ev = sse.next_event().await?;
        match ev.frame.frame {
            Some(server_frame::Frame::Message(e)) => seen.push(Seen::Msg(e.serial)),
            Some(server_frame::Frame::Gap(g)) => seen.push(Seen::Gap(g.reason, g.to.map_or(0, |p| p.serial))),
            other => anyhow::bail!("SSE: expected a replay item, got {} {other:?}", ev.name),
        }
    }
    assert_eq!(seen, expected, "SSE");
    let (status, body) =
        get_json(&format!("{}/v1/poll?channel=h/a&token={narrow}&cursor={forged}&timeout=0", gw.http)).await?;
    assert_eq!(status, 200, "{body}");
    let serials: Vec<u64> = body["messages"]
        .as_array()
        .map(|m| m.iter().filter_map(|e| e["serial"].as_u64()).collect())
        .unwrap_or_default();
    assert_eq!(serials, [4, 5], "{body}");
    assert_eq!(body["gaps"][0]["reason"], "not_granted", "{body}");
    assert_eq!(body["gaps"][0]["to"]["serial"], 3, "{body}");
    Ok(())
}
