//! Helpers shared by the fan-out, order, recovery and idempotency tests:
//! a keep-alive REST client, pipelined WebSocket publishing, raw JSON frames
//! on the wire, and background message collectors.

use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use switchboard_proto::{self as proto, client_frame, server_frame};
use switchboard_tests::{Codec, RawWs, WAIT, WsClient, raw_ws};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

/// A request id far above anything [`WsClient`] hands out in a test, for
/// frames sent with [`WsClient::send_raw`].
pub const RAW_REQ: u64 = 1_000_000;

/// A REST client that keeps its connection alive between publishes.
#[derive(Clone)]
pub struct Rest {
    client: reqwest::Client,
    http: String,
}

impl Rest {
    /// A client for the gateway at `http` (`http://HOST:PORT`).
    pub fn new(http: &str) -> Self {
        Rest { client: reqwest::Client::new(), http: http.to_string() }
    }

    /// POSTs `body` to a channel's messages; returns (status, JSON body).
    pub async fn publish(
        &self,
        channel: &str,
        body: impl Into<reqwest::Body>,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        let mut req = self.client.post(format!("{}/v1/channels/{channel}/messages", self.http)).body(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = tokio::time::timeout(WAIT, req.send()).await.context("REST publish timed out")??;
        let status = resp.status().as_u16();
        let json = resp.json().await.unwrap_or(serde_json::Value::Null);
        Ok((status, json))
    }

    /// POSTs a JSON publish body (`{"text": ..}`, `{"data": ..}`, ...).
    pub async fn publish_json(
        &self,
        channel: &str,
        body: &serde_json::Value,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        let mut all = vec![("content-type", "application/json")];
        all.extend_from_slice(headers);
        self.publish(channel, body.to_string(), &all).await
    }

    /// Publishes a raw body and expects 200; returns the ack's (epoch, serial).
    pub async fn publish_ok(&self, channel: &str, payload: &[u8]) -> anyhow::Result<(String, u64)> {
        let (status, body) =
            self.publish(channel, payload.to_vec(), &[("content-type", "application/octet-stream")]).await?;
        if status != 200 {
            bail!("REST publish to {channel} answered {status}: {body}");
        }
        Ok(ack_position(&body))
    }

    /// GETs `path` (starting with `/`); returns (status, JSON body).
    pub async fn get(&self, path: &str) -> anyhow::Result<(u16, serde_json::Value)> {
        let resp = tokio::time::timeout(WAIT, self.client.get(format!("{}{path}", self.http)).send())
            .await
            .context("REST GET timed out")??;
        let status = resp.status().as_u16();
        let json = resp.json().await.unwrap_or(serde_json::Value::Null);
        Ok((status, json))
    }
}

/// (epoch, serial) of a REST publish answer.
pub fn ack_position(body: &serde_json::Value) -> (String, u64) {
    (body["epoch"].as_str().unwrap_or_default().to_string(), body["serial"].as_u64().unwrap_or_default())
}

/// A position.
pub fn pos(epoch: &str, serial: u64) -> proto::Position {
    proto::Position { epoch: epoch.to_string(), serial }
}

/// What must agree between two deliveries of one message.
pub fn key(e: &proto::Envelope) -> (String, Vec<u8>, String, u64) {
    (e.channel.clone(), e.payload.to_vec(), e.epoch.clone(), e.serial)
}

/// Sends a hand-written JSON frame (its `req` set to [`RAW_REQ`]) and waits
/// for the reply with that id. Pushed frames that arrive first are an error:
/// use this on a client that subscribes to nothing.
pub async fn raw_json_request(c: &mut WsClient, mut frame: serde_json::Value) -> anyhow::Result<proto::ServerFrame> {
    frame["req"] = RAW_REQ.into();
    raw_text_request(c, frame.to_string()).await
}

/// Sends `text` verbatim as a text frame (it must carry `"req":` [`RAW_REQ`])
/// and waits for the reply with that id, as [`raw_json_request`] does.
pub async fn raw_text_request(c: &mut WsClient, text: String) -> anyhow::Result<proto::ServerFrame> {
    c.send_raw(Message::text(text)).await?;
    let f = c.recv_frame().await?;
    if f.req != RAW_REQ {
        bail!("expected the reply to request {RAW_REQ}, got {f:?}");
    }
    Ok(f)
}

/// The ack in a reply frame.
pub fn expect_ack(f: proto::ServerFrame) -> anyhow::Result<proto::PublishAck> {
    match f.frame {
        Some(server_frame::Frame::PublishAck(a)) => Ok(a),
        other => bail!("expected publish_ack, got {other:?}"),
    }
}

/// The next pushed frame, which must be a gap.
pub async fn next_gap(c: &mut WsClient) -> anyhow::Result<proto::Gap> {
    match c.next_push().await?.frame {
        Some(server_frame::Frame::Gap(g)) => Ok(g),
        other => bail!("expected a gap, got {other:?}"),
    }
}

/// Publishes every payload on `channel` from `c`, keeping up to `window`
/// publishes in flight, and returns the acks in send order.
pub async fn publish_pipelined(
    c: &mut WsClient,
    channel: &str,
    payloads: impl IntoIterator<Item = Vec<u8>>,
    window: usize,
) -> anyhow::Result<Vec<proto::PublishAck>> {
    let mut payloads = payloads.into_iter().peekable();
    let mut in_flight = std::collections::VecDeque::new();
    let mut acks = Vec::new();
    while payloads.peek().is_some() || !in_flight.is_empty() {
        while in_flight.len() < window
            && let Some(p) = payloads.next()
        {
            let frame = proto::Publish { channel: channel.into(), payload: Bytes::from(p), ..Default::default() };
            in_flight.push_back(c.send(client_frame::Frame::Publish(frame)).await?);
        }
        let f = c.recv_frame().await?;
        let want = in_flight.pop_front().ok_or_else(|| anyhow!("reply with nothing in flight: {f:?}"))?;
        if f.req != want {
            bail!("expected the reply to request {want}, got {f:?}");
        }
        acks.push(expect_ack(f)?);
    }
    Ok(acks)
}

/// Reads `n` messages from `c` in a background task (so its outbox never
/// fills), then hands the client back with them.
pub fn collect(mut c: WsClient, n: usize) -> JoinHandle<anyhow::Result<(WsClient, Vec<proto::Envelope>)>> {
    tokio::spawn(async move {
        let msgs = c.messages(n).await?;
        Ok((c, msgs))
    })
}

/// Checks that `msgs` are exactly serials `from..=to` of one channel and
/// epoch, each `prev_serial` naming the one before.
pub fn assert_contiguous(msgs: &[proto::Envelope], channel: &str, epoch: &str, from: u64, to: u64) {
    let serials: Vec<u64> = msgs.iter().map(|m| m.serial).collect();
    let want: Vec<u64> = (from..=to).collect();
    assert_eq!(serials, want, "serials of {channel}");
    for m in msgs {
        assert_eq!((m.channel.as_str(), m.epoch.as_str()), (channel, epoch), "serial {}", m.serial);
        assert_eq!(m.prev_serial, m.serial - 1, "prev_serial of serial {}", m.serial);
    }
}

/// A JSON-subprotocol subscriber that hands back each frame's raw text, to
/// check what is on the wire rather than what a decoder made of it.
pub struct RawJsonSub {
    ws: RawWs,
}

impl RawJsonSub {
    /// Connects and subscribes to `filter`.
    pub async fn subscribe(base: &str, filter: &str) -> anyhow::Result<Self> {
        let mut s = RawJsonSub { ws: raw_ws(base, Some("switchboard.v1.json")).await? };
        s.ws.send(Message::text(r#"{"type":"connect","req":1,"client_id":"raw"}"#)).await?;
        let connected = s.next_text().await?;
        if !connected.contains(r#""type":"connected""#) {
            bail!("expected connected, got {connected}");
        }
        let sub = serde_json::json!({"type": "subscribe", "req": 2, "filter": filter});
        s.ws.send(Message::text(sub.to_string())).await?;
        let subscribed = s.next_text().await?;
        if !subscribed.contains(r#""type":"subscribed""#) {
            bail!("expected subscribed, got {subscribed}");
        }
        Ok(s)
    }

    /// The next text frame.
    pub async fn next_text(&mut self) -> anyhow::Result<String> {
        loop {
            let m =
                tokio::time::timeout(WAIT, self.ws.next()).await.map_err(|_| anyhow!("no frame within {WAIT:?}"))?;
            match m {
                Some(Ok(Message::Text(t))) => return Ok(t.as_str().to_string()),
                Some(Ok(Message::Binary(_))) => bail!("binary frame on the JSON subprotocol"),
                Some(Ok(Message::Close(c))) => bail!("closed: {c:?}"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => bail!("websocket error: {e}"),
                None => bail!("connection ended"),
            }
        }
    }
}

/// Connects one client per codec, each subscribed to `filter`.
pub async fn both_codecs(base: &str, filter: &str, name: &str) -> anyhow::Result<(WsClient, WsClient)> {
    let mut j = WsClient::connect(base, Codec::Json, &format!("{name}-json")).await?;
    j.subscribe_to(filter).await?;
    let mut p = WsClient::connect(base, Codec::Proto, &format!("{name}-proto")).await?;
    p.subscribe_to(filter).await?;
    Ok((j, p))
}

/// How long tests allow for effects that are not awaited directly.
pub const SHORT: Duration = Duration::from_secs(5);
