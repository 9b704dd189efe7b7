//! Nchan (nginx with the nchan module) as a peer for SSE and long-poll
//! fan-out: `--target nchan`.
//!
//! The nginx side is `tests/bench/nginx-nchan.conf`: a publisher location
//! `/pub/<channel>` (`nchan_publisher`; a POST publishes its body, a GET
//! answers the channel's info) and a subscriber location `/sub/<channel>`
//! (`nchan_subscriber`, with `nchan_longpoll_multipart_response raw`). The
//! bench's channel names go into those paths as they are (`bench/<run>/<c>`).
//!
//! - SSE: `GET /sub/<channel>` with `Accept: text/event-stream`. Nchan sends
//!   its headers and a `: hi` comment once the subscriber is registered,
//!   then one event per message whose `data:` is the published body.
//! - Long polling: `GET /sub/<channel>`; a response carries the messages
//!   after the request's `If-Modified-Since` / `If-None-Match` (Nchan's
//!   message id), the next id comes back as `Last-Modified` / `Etag`. With
//!   `raw`, several messages share one response, each followed by `\n` (a
//!   single message is sent unmodified); the bench payload has no newline.
//!
//! The parsing here is pure and tested without a server; the functions that
//! talk HTTP are thin. Nothing here follows redirects, reconnects or retries:
//! a failure is the run's to count.

use std::time::Duration;

use bytes::Bytes;

use super::BenchError;
use super::clients::HANDSHAKE_TIMEOUT;

/// Where a long poll resumes: Nchan's message id as HTTP validators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// `Last-Modified` of the last response, sent back as `If-Modified-Since`.
    pub last_modified: String,
    /// `Etag` of the last response, sent back as `If-None-Match`.
    pub etag: String,
}

/// The cursor a long-poll response's headers give, if both are present.
pub fn cursor_from_headers(last_modified: Option<&str>, etag: Option<&str>) -> Option<Cursor> {
    Some(Cursor { last_modified: last_modified?.to_string(), etag: etag?.to_string() })
}

/// The messages of one `raw` long-poll response body: each message followed
/// by `\n`, or a single message with nothing after it. Empty pieces are not
/// messages.
pub fn split_raw_body(body: &Bytes) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, b) in body.iter().enumerate() {
        if *b == b'\n' {
            if i > start {
                out.push(body.slice(start..i));
            }
            start = i + 1;
        }
    }
    if start < body.len() {
        out.push(body.slice(start..));
    }
    out
}

/// The published body an Nchan EventSource event carries; `None` for events
/// that are not messages (Nchan's optional `ping` events, empty data).
pub fn sse_payload(ev: &eventsource_stream::Event) -> Option<Bytes> {
    (ev.event == "message" && !ev.data.is_empty()).then(|| Bytes::copy_from_slice(ev.data.as_bytes()))
}

/// `subscribers` from the channel info a publisher location answers with
/// `Accept: application/json` (`{"messages": 2, "requested": 0,
/// "subscribers": 1, "last_message_id": "1795900927:1" }`).
pub fn info_subscribers(json: &str) -> Option<u64> {
    serde_json::from_str::<serde_json::Value>(json).ok()?.get("subscribers")?.as_u64()
}

fn channel_path(channel: &str) -> String {
    channel
        .split('/')
        .map(|l| percent_encoding::utf8_percent_encode(l, percent_encoding::NON_ALPHANUMERIC).to_string())
        .collect::<Vec<_>>()
        .join("/")
}

/// `{base}/sub/<channel>`.
pub fn sub_url(base: &str, channel: &str) -> String {
    format!("{base}/sub/{}", channel_path(channel))
}

/// `{base}/pub/<channel>`.
pub fn pub_url(base: &str, channel: &str) -> String {
    format!("{base}/pub/{}", channel_path(channel))
}

/// Publishes `payload` (POST to the publisher location) and reads the answer.
pub async fn publish(client: &reqwest::Client, base: &str, channel: &str, payload: Vec<u8>) -> Result<(), BenchError> {
    let resp = client.post(pub_url(base, channel)).header("content-type", "text/plain").body(payload).send().await?;
    if !resp.status().is_success() {
        return Err(BenchError::Protocol(format!("Nchan publish: HTTP {}", resp.status())));
    }
    // Read the channel info so the connection goes back to the pool.
    let _ = resp.bytes().await?;
    Ok(())
}

/// Subscribers Nchan counts on `channel` (0 for a channel it does not know yet).
pub async fn subscribers(client: &reqwest::Client, base: &str, channel: &str) -> Result<u64, BenchError> {
    let resp = client.get(pub_url(base, channel)).header("accept", "application/json").send().await?;
    if resp.status() == reqwest::StatusCode::NOT_FOUND {
        return Ok(0);
    }
    if !resp.status().is_success() {
        return Err(BenchError::Protocol(format!("Nchan channel info: HTTP {}", resp.status())));
    }
    let text = resp.text().await?;
    info_subscribers(&text)
        .ok_or_else(|| BenchError::Protocol(format!("Nchan channel info without subscribers: {text}")))
}

/// Waits (bounded by the handshake timeout) until Nchan counts at least `n`
/// subscribers on `channel`: a long-poll subscriber has no other sign that
/// its request is registered before the first message.
pub async fn wait_subscribers(client: &reqwest::Client, base: &str, channel: &str, n: u64) -> Result<(), BenchError> {
    let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
    loop {
        let have = subscribers(client, base, channel).await?;
        if have >= n {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(BenchError::Protocol(format!("Nchan counts {have} of {n} subscribers on {channel}")));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Opens an EventSource subscription; returns once the headers arrived (Nchan
/// sends them when the subscriber is registered).
pub async fn sse_open(
    client: &reqwest::Client,
    base: &str,
    channel: &str,
) -> Result<super::clients::SseEvents, BenchError> {
    use eventsource_stream::Eventsource;
    let resp = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        client.get(sub_url(base, channel)).header("accept", "text/event-stream").send(),
    )
    .await
    .map_err(|_| BenchError::Protocol("Nchan SSE: no response headers".into()))??;
    if !resp.status().is_success() {
        return Err(BenchError::Protocol(format!("Nchan SSE: HTTP {}", resp.status())));
    }
    Ok(Box::pin(resp.bytes_stream().eventsource()))
}

/// One long poll from `cursor` (none: from the channel's oldest buffered
/// message, which for a fresh channel means the first one published).
/// Returns the messages and the cursor to send next; a 304 or 408 (the poll
/// timed out) returns no messages and the same cursor.
pub async fn poll_once(
    client: &reqwest::Client,
    url: &str,
    cursor: Option<&Cursor>,
) -> Result<(Vec<Bytes>, Option<Cursor>), BenchError> {
    let mut req = client.get(url);
    if let Some(c) = cursor {
        req = req.header("if-modified-since", &c.last_modified).header("if-none-match", &c.etag);
    }
    let resp = req.send().await?;
    let status = resp.status();
    if status == reqwest::StatusCode::NOT_MODIFIED || status == reqwest::StatusCode::REQUEST_TIMEOUT {
        let _ = resp.bytes().await?;
        return Ok((Vec::new(), cursor.cloned()));
    }
    if !status.is_success() {
        return Err(BenchError::Protocol(format!("Nchan long poll: HTTP {status}")));
    }
    let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let next = cursor_from_headers(header("last-modified").as_deref(), header("etag").as_deref())
        .ok_or_else(|| BenchError::Protocol("Nchan long poll: no Last-Modified / Etag".into()))?;
    let body = resp.bytes().await?;
    Ok((split_raw_body(&body), Some(next)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    #[test]
    fn raw_long_poll_bodies() {
        let b = |s: &'static str| Bytes::from_static(s.as_bytes());
        // (body, messages)
        let cases: &[(&str, &[&str])] = &[
            ("SB1:one", &["SB1:one"]),
            ("SB1:one\nSB1:two\nSB1:three\n", &["SB1:one", "SB1:two", "SB1:three"]),
            ("SB1:one\nSB1:two", &["SB1:one", "SB1:two"]),
            ("", &[]),
            ("\n", &[]),
        ];
        for (body, want) in cases {
            let got = split_raw_body(&b(body));
            assert_eq!(got, want.iter().map(|w| b(w)).collect::<Vec<_>>(), "{body:?}");
        }
    }

    #[test]
    fn cursor_and_channel_info() {
        assert_eq!(
            cursor_from_headers(Some("Sat, 28 Nov 2026 21:22:07 GMT"), Some("2")),
            Some(Cursor { last_modified: "Sat, 28 Nov 2026 21:22:07 GMT".into(), etag: "2".into() })
        );
        assert_eq!(cursor_from_headers(None, Some("2")), None);
        assert_eq!(cursor_from_headers(Some("x"), None), None);
        let info = r#"{"messages": 2, "requested": 0, "subscribers": 7, "last_message_id": "1795900927:1" }"#;
        assert_eq!(info_subscribers(info), Some(7));
        assert_eq!(info_subscribers("queued messages: 1\nactive subscribers: 2\n"), None);
        assert_eq!(sub_url("http://h:1", "bench/ab/0"), "http://h:1/sub/bench/ab/0");
        assert_eq!(pub_url("http://h:1", "bench/a b/0"), "http://h:1/pub/bench/a%20b/0");
    }

    #[tokio::test]
    async fn event_stream_split_across_reads() {
        use eventsource_stream::Eventsource;
        // What Nchan sends on an EventSource subscription: a `: hi` comment, then
        // one event per message (its id is Nchan's `time:tag`), here cut at odd places.
        let raw: &[u8] = b": hi\n\nid: 1795900927:0\ndata: SB1:hello1\n\nevent: ping\ndata: \n\nid: 1795900927:1\ndata: SB1:hello2\n\n";
        for cut in [1, 3, 7, 20, 33, 50, raw.len() - 1] {
            let chunks: Vec<Result<Bytes, std::io::Error>> =
                vec![Ok(Bytes::copy_from_slice(&raw[..cut])), Ok(Bytes::copy_from_slice(&raw[cut..]))];
            let events: Vec<_> = futures_util::stream::iter(chunks).eventsource().collect().await;
            let payloads: Vec<Bytes> =
                events.iter().map(|e| e.as_ref().expect("event")).filter_map(sse_payload).collect();
            assert_eq!(
                payloads,
                vec![Bytes::from_static(b"SB1:hello1"), Bytes::from_static(b"SB1:hello2")],
                "cut {cut}"
            );
        }
    }
}
