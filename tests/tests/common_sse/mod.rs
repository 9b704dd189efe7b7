//! Helpers shared by the SSE and long-poll tests: an SSE client built from
//! reqwest's byte stream and `eventsource-stream`, a long-poll client that
//! decodes the documented response body, query encoding, and a WebSocket
//! publisher that records its acks.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use eventsource_stream::{Event, EventStreamError, Eventsource};
use futures_util::{Stream, StreamExt};
use serde_json::value::RawValue;
use switchboard_proto::{self as proto, server_frame};
use switchboard_tests::{WAIT, WsClient};

/// Percent-encodes query pairs (everything but RFC 3986 unreserved bytes),
/// so `+`, `#` and `/` in filters reach the gateway as written.
pub fn query(pairs: &[(&str, &str)]) -> String {
    fn enc(s: &str) -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect()
    }
    pairs.iter().map(|(k, v)| format!("{}={}", enc(k), enc(v))).collect::<Vec<_>>().join("&")
}

/// `channel=` pairs for each name plus `extra`.
pub fn channels_query(channels: &[&str], extra: &[(&str, &str)]) -> String {
    let mut pairs: Vec<(&str, &str)> = channels.iter().map(|c| ("channel", *c)).collect();
    pairs.extend_from_slice(extra);
    query(&pairs)
}

type Events = Pin<Box<dyn Stream<Item = Result<Event, EventStreamError<reqwest::Error>>> + Send>>;

/// Sends `GET /v1/sse?{query}` (with `Last-Event-ID` if given) and returns
/// the response as is, for status and header checks.
pub async fn sse_request(http: &str, query: &str, last_event_id: Option<&str>) -> anyhow::Result<reqwest::Response> {
    let mut req = reqwest::Client::new().get(format!("{http}/v1/sse?{query}"));
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id);
    }
    tokio::time::timeout(WAIT, req.send())
        .await
        .map_err(|_| anyhow!("no SSE response within {WAIT:?}"))?
        .map_err(Into::into)
}

/// An open SSE stream.
pub struct SseClient {
    events: Events,
    /// The `connected` event's frame.
    pub connected: proto::Connected,
    /// The `connected` event's `id:` (the starting cursor).
    pub start_id: String,
    /// The last `id:` received (what a browser would send as `Last-Event-ID`).
    pub last_id: String,
}

/// One decoded SSE event.
#[derive(Debug, Clone)]
pub struct SseEvent {
    /// `event:` name.
    pub name: String,
    /// `id:` (the cursor after this event; empty for `disconnect`).
    pub id: String,
    /// The `data:` text, as received.
    pub data: String,
    /// The decoded frame.
    pub frame: proto::ServerFrame,
}

impl SseClient {
    /// Opens a stream and reads its `connected` event; a non-200 answer is
    /// an error carrying the status and body.
    pub async fn connect(http: &str, query: &str, last_event_id: Option<&str>) -> anyhow::Result<Self> {
        let resp = sse_request(http, query, last_event_id).await?;
        let status = resp.status().as_u16();
        if status != 200 {
            let body = resp.text().await.unwrap_or_default();
            bail!("GET /v1/sse?{query}: {status} {body}");
        }
        let events: Events = Box::pin(resp.bytes_stream().eventsource());
        let mut c =
            SseClient { events, connected: Default::default(), start_id: String::new(), last_id: String::new() };
        let first = c.next_event().await?;
        match first.frame.frame {
            Some(server_frame::Frame::Connected(conn)) if first.name == "connected" => {
                c.connected = conn;
                c.start_id = first.id;
            }
            other => bail!("expected a connected event first, got {} {other:?}", first.name),
        }
        Ok(c)
    }

    /// The next event within `within`; `Ok(None)` when the stream ended.
    pub async fn next_event_within(&mut self, within: Duration) -> anyhow::Result<Option<SseEvent>> {
        let next = tokio::time::timeout(within, self.events.next())
            .await
            .map_err(|_| anyhow!("no SSE event within {within:?}"))?;
        let Some(ev) = next else { return Ok(None) };
        let ev = ev.map_err(|e| anyhow!("SSE stream error: {e}"))?;
        // The parser carries the last id over to events without one (as a
        // browser does); only events that carry their own id name a cursor.
        let frame = proto::json::decode_server_frame(&ev.data)
            .map_err(|e| anyhow!("bad JSON in SSE event {}: {e}: {}", ev.event, ev.data))?;
        if !ev.id.is_empty() {
            self.last_id = ev.id.clone();
        }
        Ok(Some(SseEvent { name: ev.event, id: ev.id, data: ev.data, frame }))
    }

    /// The next event, waiting at most [`WAIT`]; the stream ending is an error.
    pub async fn next_event(&mut self) -> anyhow::Result<SseEvent> {
        self.next_event_within(WAIT).await?.ok_or_else(|| anyhow!("SSE stream ended"))
    }

    /// The next event, which must be a `message` event; returns its envelope.
    pub async fn next_message(&mut self) -> anyhow::Result<proto::Envelope> {
        let ev = self.next_event().await?;
        match ev.frame.frame {
            Some(server_frame::Frame::Message(e)) if ev.name == "message" && e.kind() == proto::Kind::Message => Ok(e),
            other => bail!("expected a message event, got {} {other:?}", ev.name),
        }
    }

    /// Collects `n` message events (anything else is an error).
    pub async fn messages(&mut self, n: usize) -> anyhow::Result<Vec<proto::Envelope>> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.next_message().await?);
        }
        Ok(out)
    }

    /// The next event, which must be a `presence` event; returns its envelope.
    pub async fn next_presence(&mut self) -> anyhow::Result<proto::Envelope> {
        let ev = self.next_event().await?;
        match ev.frame.frame {
            Some(server_frame::Frame::Message(e)) if ev.name == "presence" && e.kind() != proto::Kind::Message => Ok(e),
            other => bail!("expected a presence event, got {} {other:?}", ev.name),
        }
    }

    /// Drops the connection (the client goes away without a word).
    pub fn drop_connection(self) {
        drop(self.events);
    }
}

/// A decoded long-poll response.
#[derive(Debug, Clone)]
pub struct PollBatch {
    /// Envelopes of `messages`, decoded with the JSON frame decoder.
    pub messages: Vec<proto::Envelope>,
    /// The raw JSON text of each message frame.
    pub raw_messages: Vec<String>,
    /// `gaps`.
    pub gaps: Vec<proto::Gap>,
    /// `cursor`.
    pub cursor: String,
    /// `more`.
    pub more: bool,
    /// `connection_id`: the poll's session.
    pub connection_id: String,
}

/// Decodes a long-poll body, keeping message frames verbatim for the frame
/// decoder (a `serde_json::Value` round trip would reformat JSON payloads).
pub fn parse_batch(body: &str) -> anyhow::Result<PollBatch> {
    let top: BTreeMap<String, Box<RawValue>> =
        serde_json::from_str(body).with_context(|| format!("poll body is not a JSON object: {body}"))?;
    let keys: Vec<&str> = top.keys().map(String::as_str).collect();
    assert_eq!(keys, ["connection_id", "cursor", "gaps", "messages", "more"], "poll body fields: {body}");
    let list = |k: &str| -> anyhow::Result<Vec<Box<RawValue>>> { Ok(serde_json::from_str(top[k].get())?) };
    let mut messages = Vec::new();
    let mut raw_messages = Vec::new();
    for m in list("messages")? {
        match proto::json::decode_server_frame(m.get())?.frame {
            Some(server_frame::Frame::Message(e)) => messages.push(e),
            other => bail!("expected a message frame in messages, got {other:?}"),
        }
        raw_messages.push(m.get().to_string());
    }
    let mut gaps = Vec::new();
    for g in list("gaps")? {
        match proto::json::decode_server_frame(g.get())?.frame {
            Some(server_frame::Frame::Gap(g)) => gaps.push(g),
            other => bail!("expected a gap frame in gaps, got {other:?}"),
        }
    }
    let cursor: String = serde_json::from_str(top["cursor"].get())?;
    let more: bool = serde_json::from_str(top["more"].get())?;
    let connection_id: String = serde_json::from_str(top["connection_id"].get())?;
    Ok(PollBatch { messages, raw_messages, gaps, cursor, more, connection_id })
}

/// `GET /v1/poll?{query}` on a fresh client (no connection reuse: any
/// connection may carry any poll); returns (status, body text), waiting at
/// most [`WAIT`].
pub async fn poll_raw(http: &str, query: &str) -> anyhow::Result<(u16, String)> {
    let send = async {
        let resp = reqwest::Client::new().get(format!("{http}/v1/poll?{query}")).send().await?;
        let status = resp.status().as_u16();
        anyhow::Ok((status, resp.text().await?))
    };
    tokio::time::timeout(WAIT, send).await.map_err(|_| anyhow!("no poll response within {WAIT:?}"))?
}

/// `POST /v1/poll` with a body of the given content type; (status, body text).
pub async fn poll_post(http: &str, content_type: &str, body: String) -> anyhow::Result<(u16, String)> {
    let send = async {
        let resp = reqwest::Client::new()
            .post(format!("{http}/v1/poll"))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await?;
        let status = resp.status().as_u16();
        anyhow::Ok((status, resp.text().await?))
    };
    tokio::time::timeout(WAIT, send).await.map_err(|_| anyhow!("no poll response within {WAIT:?}"))?
}

/// A poll that must answer 200; returns the decoded batch.
pub async fn poll(http: &str, query: &str) -> anyhow::Result<PollBatch> {
    let (status, body) = poll_raw(http, query).await?;
    if status != 200 {
        bail!("GET /v1/poll?{query}: {status} {body}");
    }
    parse_batch(&body)
}

/// Asserts a 400 with the documented error shape and `code`.
pub fn assert_error(status: u16, body: &str, code: &str, what: &str) {
    assert_eq!(status, 400, "{what}: {body}");
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{what}: body not JSON ({e}): {body}"));
    assert_eq!(v["error"]["code"].as_str(), Some(code), "{what}: {body}");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "{what}: error without a message: {body}");
}

/// What a test published: channel, payload, and the ack's position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// Channel.
    pub channel: String,
    /// Payload bytes.
    pub payload: Bytes,
    /// Ack epoch.
    pub epoch: String,
    /// Ack serial.
    pub serial: u64,
}

impl Sent {
    /// The (channel, payload, epoch, serial) of a received envelope.
    pub fn of(e: &proto::Envelope) -> Sent {
        Sent { channel: e.channel.clone(), payload: e.payload.clone(), epoch: e.epoch.clone(), serial: e.serial }
    }
}

/// Publishes over WebSocket and records the ack.
pub async fn ws_publish(p: &mut WsClient, channel: &str, payload: &[u8]) -> anyhow::Result<Sent> {
    let ack = p.publish(channel, payload, "").await?;
    assert_eq!(ack.channel, channel);
    Ok(Sent { channel: channel.into(), payload: Bytes::copy_from_slice(payload), epoch: ack.epoch, serial: ack.serial })
}

/// Publishes `per_channel` messages round-robin over `channels`
/// (`"{channel}#{i}"`), returning what was sent in publish order.
pub async fn publish_round_robin(
    p: &mut WsClient,
    channels: &[&str],
    per_channel: usize,
    tag: &str,
) -> anyhow::Result<Vec<Sent>> {
    let mut sent = Vec::with_capacity(channels.len() * per_channel);
    for i in 0..per_channel {
        for ch in channels {
            sent.push(ws_publish(p, ch, format!("{ch}#{tag}{i}").as_bytes()).await?);
        }
    }
    Ok(sent)
}

/// Checks that `got` holds exactly `want`'s messages of every channel, each
/// once and in serial order (channels may interleave differently).
pub fn assert_same_per_channel(got: &[proto::Envelope], want: &[Sent]) {
    let split = |items: Vec<Sent>| {
        let mut m: BTreeMap<String, Vec<Sent>> = BTreeMap::new();
        for s in items {
            m.entry(s.channel.clone()).or_default().push(s);
        }
        m
    };
    let got = split(got.iter().map(Sent::of).collect());
    let want = split(want.to_vec());
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "channels delivered");
    for (ch, w) in &want {
        let g = &got[ch];
        let serials = |v: &[Sent]| v.iter().map(|s| s.serial).collect::<Vec<_>>();
        assert_eq!(serials(g), serials(w), "serials of {ch}");
        assert_eq!(g, w, "messages of {ch}");
    }
}

/// A published message and the text its JSON `message` frame must contain
/// verbatim (`"data_b64":…`, `"data":…` or `"text":…`).
#[derive(Debug, Clone)]
pub struct Mixed {
    /// What was sent, with the ack's position.
    pub sent: Sent,
    /// Expected payload fragment of the frame.
    pub fragment: String,
    /// Expected publisher (client id, protocol).
    pub publisher: (String, proto::Protocol),
}

/// The channels [`publish_mixed`] publishes to that `a`, `b`, `s/+` match.
pub const MIXED_FILTERS: [&str; 3] = ["a", "b", "s/+"];

async fn rest_sent(http: &str, channel: &str, body: &'static str, content_type: &str) -> anyhow::Result<Sent> {
    let (status, ack) = switchboard_tests::rest_publish(http, channel, body, &[("content-type", content_type)]).await?;
    assert_eq!(status, 200, "REST publish to {channel}: {ack}");
    assert_eq!(ack["channel"].as_str(), Some(channel), "{ack}");
    Ok(Sent {
        channel: channel.into(),
        payload: Bytes::new(),
        epoch: ack["epoch"].as_str().context("ack epoch")?.into(),
        serial: ack["serial"].as_u64().context("ack serial")?,
    })
}

/// Publishes binary, JSON and text payloads over WebSocket (`ws`, which must
/// use the proto codec so any bytes pass) and REST to channels matched by
/// [`MIXED_FILTERS`], with messages to unmatched channels in between.
/// Returns the matched ones in publish order.
pub async fn publish_mixed(http: &str, ws: &mut WsClient) -> anyhow::Result<Vec<Mixed>> {
    let ws_id = ws.connected.client_id.clone();
    let from_ws = |sent: Sent, fragment: &str| Mixed {
        sent,
        fragment: fragment.into(),
        publisher: (ws_id.clone(), proto::Protocol::Ws),
    };
    let from_rest = |sent: Sent, payload: &'static [u8], fragment: &str| Mixed {
        sent: Sent { payload: Bytes::from_static(payload), ..sent },
        fragment: fragment.into(),
        publisher: (String::new(), proto::Protocol::Rest),
    };
    let mut out = Vec::new();
    out.push(from_ws(ws_publish(ws, "a", &[0x00, 0x9f, 0x92, 0x96, 0xff, 0x01]).await?, r#""data_b64":"AJ+Slv8B""#));
    ws_publish(ws, "c", b"not for this stream").await?;
    let json = br#"{"k": [1, 2.50, "x"],  "n":null}"#;
    out.push(from_ws(ws_publish(ws, "b", json).await?, r#""data":{"k": [1, 2.50, "x"],  "n":null}"#));
    ws_publish(ws, "s/1/deep", b"too deep for s/+").await?;
    out.push(from_ws(ws_publish(ws, "s/1", b"hello, text").await?, r#""text":"hello, text""#));
    ws_publish(ws, "a/b", b"not a").await?;
    let sent = rest_sent(http, "s/2", r#"{"data": [true, {"z" : 0}] }"#, "application/json").await?;
    out.push(from_rest(sent, br#"[true, {"z" : 0}]"#, r#""data":[true, {"z" : 0}]"#));
    let sent = rest_sent(http, "a", r#"{"data_b64":"AP+AAQ=="}"#, "application/json").await?;
    out.push(from_rest(sent, &[0x00, 0xff, 0x80, 0x01], r#""data_b64":"AP+AAQ==""#));
    rest_sent(http, "s", "no level under s", "text/plain").await?;
    let sent = rest_sent(http, "b", "grüße, text", "text/plain").await?;
    out.push(from_rest(sent, "grüße, text".as_bytes(), r#""text":"grüße, text""#));
    let sent = rest_sent(http, "s/2", "{not json", "text/plain").await?;
    out.push(from_rest(sent, b"{not json", r#""text":"{not json""#));
    Ok(out)
}

/// Checks received message frames (raw JSON text and decoded envelope)
/// against [`publish_mixed`]'s list: same order per channel, same position,
/// byte-identical payload, verbatim payload JSON, same publisher.
pub fn assert_mixed(got: &[(String, proto::Envelope)], want: &[Mixed]) {
    let envelopes: Vec<proto::Envelope> = got.iter().map(|(_, e)| e.clone()).collect();
    let sent: Vec<Sent> = want.iter().map(|m| m.sent.clone()).collect();
    assert_same_per_channel(&envelopes, &sent);
    for m in want {
        let (raw, e) =
            got.iter().find(|(_, e)| e.channel == m.sent.channel && e.serial == m.sent.serial).expect("checked above");
        assert!(raw.contains(&m.fragment), "frame of {}#{} lacks {}: {raw}", e.channel, e.serial, m.fragment);
        let p = e.publisher.as_ref().expect("publisher");
        assert_eq!((p.client_id.clone(), p.protocol()), m.publisher, "publisher of {raw}");
        assert_eq!(e.kind(), proto::Kind::Message);
    }
}

/// The same cursor with one character changed (still base64url).
pub fn tamper(cursor: &str) -> String {
    let mut b = cursor.as_bytes().to_vec();
    let i = b.len() / 2;
    b[i] = if b[i] == b'A' { b'B' } else { b'A' };
    String::from_utf8(b).expect("ascii")
}
