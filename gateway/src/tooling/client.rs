//! Clients of a Switchboard gateway, used by `switchboard pub` and
//! `switchboard sub`: REST publish, WebSocket publish, and a WebSocket
//! subscriber that reconnects and recovers from its last positions.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use switchboard_proto::{self as proto, client_frame, server_frame};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// HTTP transport failure.
    #[error("HTTP: {0}")]
    Http(#[from] reqwest::Error),
    /// WebSocket transport failure.
    #[error("WebSocket: {0}")]
    Ws(#[from] tokio_tungstenite::tungstenite::Error),
    /// The gateway answered with an error.
    #[error("gateway error {code}: {message}")]
    Gateway {
        /// Error code name.
        code: String,
        /// Detail.
        message: String,
    },
    /// The gateway closed the connection.
    #[error("connection closed{0}")]
    Closed(String),
    /// Something unexpected came back.
    #[error("unexpected reply: {0}")]
    Unexpected(String),
    /// A bad URL or argument.
    #[error("{0}")]
    Usage(String),
    /// WebTransport (QUIC, HTTP/3) failure.
    #[error("WebTransport: {0}")]
    Wt(String),
}

/// Publishes over REST; returns the JSON acknowledgement.
pub async fn publish_rest(
    base: &str,
    channel: &str,
    payload: Bytes,
    id: Option<&str>,
    api_key: Option<&str>,
) -> Result<serde_json::Value, ClientError> {
    let encoded: String = channel
        .split('/')
        .map(|l| percent_encoding::utf8_percent_encode(l, percent_encoding::NON_ALPHANUMERIC).to_string())
        .collect::<Vec<_>>()
        .join("/");
    let url = format!("{}/v1/channels/{encoded}/messages", base.trim_end_matches('/'));
    let mut req = reqwest::Client::new().post(url).header("content-type", "application/octet-stream").body(payload);
    if let Some(id) = id {
        req = req.header("idempotency-key", id);
    }
    if let Some(k) = api_key {
        req = req.header("x-api-key", k);
    }
    let resp = req.send().await?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await?;
    if !status.is_success() {
        let code = body["error"]["code"].as_str().unwrap_or("unknown").to_string();
        let message = body["error"]["message"].as_str().unwrap_or_default().to_string();
        return Err(ClientError::Gateway { code, message });
    }
    Ok(body)
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_connect(base: &str, client_id: &str) -> Result<Ws, ClientError> {
    let url = format!("{}/v1/ws", base.trim_end_matches('/'));
    let mut request = url.into_client_request()?;
    request.headers_mut().insert("sec-websocket-protocol", http::HeaderValue::from_static("switchboard.v1.json"));
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await?;
    let connect = proto::ClientFrame {
        req: 1,
        frame: Some(client_frame::Frame::Connect(proto::Connect { token: String::new(), client_id: client_id.into() })),
    };
    send(&mut ws, &connect).await?;
    match recv(&mut ws).await?.frame {
        Some(server_frame::Frame::Connected(_)) => Ok(ws),
        other => Err(ClientError::Unexpected(format!("{other:?}"))),
    }
}

fn client_frame_json(f: &proto::ClientFrame) -> String {
    use serde_json::json;
    let Some(frame) = &f.frame else { return "{}".into() };
    let mut v = match frame {
        client_frame::Frame::Connect(c) => json!({"type": "connect", "client_id": c.client_id, "token": c.token}),
        client_frame::Frame::Subscribe(s) => {
            let positions: BTreeMap<_, _> =
                s.positions.iter().map(|(k, p)| (k.clone(), json!({"epoch": p.epoch, "serial": p.serial}))).collect();
            let mut v = json!({"type": "subscribe", "filter": s.filter, "positions": positions, "presence": s.presence, "retained": s.retained});
            if let Some(r) = &s.rewind {
                v["rewind"] = json!({"count": r.count, "duration_ms": r.duration_ms});
            }
            v
        }
        client_frame::Frame::Publish(p) => {
            // Serialised through a struct so a JSON payload stays verbatim.
            #[derive(serde::Serialize)]
            struct PublishJson<'a> {
                #[serde(rename = "type")]
                ty: &'static str,
                req: u64,
                channel: &'a str,
                #[serde(skip_serializing_if = "str::is_empty")]
                id: &'a str,
                #[serde(flatten)]
                payload: proto::json::JsonPayload<'a>,
            }
            let body = PublishJson {
                ty: "publish",
                req: f.req,
                channel: &p.channel,
                id: &p.id,
                payload: proto::json::JsonPayload::new(&p.payload),
            };
            return serde_json::to_string(&body).unwrap_or_default();
        }
        other => return format!("{{\"type\":\"unsupported\",\"debug\":{:?}}}", format!("{other:?}")),
    };
    v["req"] = f.req.into();
    v.to_string()
}

async fn send(ws: &mut Ws, f: &proto::ClientFrame) -> Result<(), ClientError> {
    ws.send(Message::text(client_frame_json(f))).await?;
    Ok(())
}

async fn recv(ws: &mut Ws) -> Result<proto::ServerFrame, ClientError> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                return proto::json::decode_server_frame(t.as_str())
                    .map_err(|e| ClientError::Unexpected(e.to_string()));
            }
            Some(Ok(Message::Close(c))) => {
                return Err(ClientError::Closed(
                    c.map(|c| format!(": {} {}", u16::from(c.code), c.reason)).unwrap_or_default(),
                ));
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => return Err(ClientError::Closed(String::new())),
        }
    }
}

/// Publishes over WebSocket; returns the ack.
pub async fn publish_ws(
    base: &str,
    channel: &str,
    payload: Bytes,
    id: Option<&str>,
) -> Result<proto::PublishAck, ClientError> {
    let mut ws = ws_connect(base, "").await?;
    let f = proto::ClientFrame {
        req: 2,
        frame: Some(client_frame::Frame::Publish(proto::Publish {
            channel: channel.into(),
            payload,
            id: id.unwrap_or_default().into(),
            ..Default::default()
        })),
    };
    send(&mut ws, &f).await?;
    let reply = recv(&mut ws).await?;
    let _ = ws.close(None).await;
    match reply.frame {
        Some(server_frame::Frame::PublishAck(a)) => Ok(a),
        Some(server_frame::Frame::Error(e)) => {
            Err(ClientError::Gateway { code: e.code().slug().into(), message: e.message })
        }
        other => Err(ClientError::Unexpected(format!("{other:?}"))),
    }
}

/// What `sub` does with each event.
#[derive(Debug, Clone)]
pub enum SubEvent {
    /// A message or presence event.
    Message(Box<proto::Envelope>),
    /// A recovery gap.
    Gap(proto::Gap),
    /// Connected (or reconnected) and subscribed.
    Subscribed(proto::Subscribed),
    /// The connection dropped; reconnecting.
    Reconnecting(String),
}

/// A connection `sub` reads server frames from and can reconnect: the
/// WebSocket and WebTransport subscribers share [`resubscribe`].
pub(crate) trait FrameSource: Sized {
    /// The next server frame, or why the connection ended.
    fn next_frame(&mut self) -> impl Future<Output = Result<proto::ServerFrame, ClientError>>;
    /// Ends the connection cleanly.
    fn finish(self) -> impl Future<Output = ()>;
}

impl FrameSource for Ws {
    async fn next_frame(&mut self) -> Result<proto::ServerFrame, ClientError> {
        recv(self).await
    }

    async fn finish(mut self) {
        let _ = self.close(None).await;
    }
}

/// Subscribes until `on_event` returns false. `connect` opens a connection
/// and sends the subscribe it is given; on a dropped connection this
/// reconnects (with backoff) and resubscribes from the last position of
/// every channel seen, so nothing is lost or repeated while history holds
/// the gap. A gateway error ends it; so does a failed first connect.
pub(crate) async fn resubscribe<S, C, Fut>(
    filter: &str,
    rewind: Option<u32>,
    mut connect: C,
    mut on_event: impl FnMut(SubEvent) -> bool,
) -> Result<(), ClientError>
where
    S: FrameSource,
    C: FnMut(proto::Subscribe) -> Fut,
    Fut: Future<Output = Result<S, ClientError>>,
{
    let mut positions: BTreeMap<String, proto::Position> = BTreeMap::new();
    let mut backoff = Duration::from_millis(100);
    let mut first = true;
    loop {
        let sub = proto::Subscribe {
            filter: filter.into(),
            positions: positions.clone(),
            rewind: if first { rewind.map(|count| proto::Rewind { count, duration_ms: 0 }) } else { None },
            ..Default::default()
        };
        let mut source = match connect(sub).await {
            Ok(source) => source,
            Err(ClientError::Gateway { code, message }) => return Err(ClientError::Gateway { code, message }),
            Err(e) if first => return Err(e),
            Err(e) => {
                if !on_event(SubEvent::Reconnecting(e.to_string())) {
                    return Ok(());
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        first = false;
        backoff = Duration::from_millis(100);
        let err = loop {
            let frame = match source.next_frame().await {
                Ok(f) => f,
                Err(e) => break e,
            };
            let keep_going = match frame.frame {
                Some(server_frame::Frame::Message(env)) => {
                    positions
                        .insert(env.channel.clone(), proto::Position { epoch: env.epoch.clone(), serial: env.serial });
                    on_event(SubEvent::Message(Box::new(env)))
                }
                Some(server_frame::Frame::Gap(g)) => {
                    if let Some(to) = &g.to {
                        positions.insert(g.channel.clone(), to.clone());
                    }
                    on_event(SubEvent::Gap(g))
                }
                Some(server_frame::Frame::Subscribed(s)) => {
                    for c in &s.channels {
                        positions
                            .entry(c.channel.clone())
                            .or_insert(proto::Position { epoch: c.epoch.clone(), serial: c.serial });
                    }
                    on_event(SubEvent::Subscribed(s))
                }
                Some(server_frame::Frame::Error(e)) => {
                    return Err(ClientError::Gateway { code: e.code().slug().into(), message: e.message });
                }
                _ => true,
            };
            if !keep_going {
                source.finish().await;
                return Ok(());
            }
        };
        if !on_event(SubEvent::Reconnecting(err.to_string())) {
            return Ok(());
        }
        tokio::time::sleep(backoff).await;
    }
}

/// Subscribes over WebSocket until `on_event` returns false, reconnecting
/// and recovering as [`resubscribe`] does.
pub async fn subscribe_ws(
    base: &str,
    filter: &str,
    rewind: Option<u32>,
    on_event: impl FnMut(SubEvent) -> bool,
) -> Result<(), ClientError> {
    let connect = |sub: proto::Subscribe| async move {
        let mut ws = ws_connect(base, "").await?;
        send(&mut ws, &proto::ClientFrame { req: 2, frame: Some(client_frame::Frame::Subscribe(sub)) }).await?;
        Ok::<_, ClientError>(ws)
    };
    resubscribe(filter, rewind, connect, on_event).await
}

fn stream_url(base: &str, path: &str, filter: &str, rewind: Option<u32>) -> String {
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    q.append_pair("channel", filter);
    if let Some(n) = rewind {
        q.append_pair("rewind", &n.to_string());
    }
    format!("{}{path}?{}", base.trim_end_matches('/'), q.finish())
}

async fn error_of(resp: reqwest::Response) -> ClientError {
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    ClientError::Gateway {
        code: body["error"]["code"].as_str().unwrap_or(status.as_str()).to_string(),
        message: body["error"]["message"].as_str().unwrap_or_default().to_string(),
    }
}

/// Subscribes over Server-Sent Events until `on_event` returns false. A
/// dropped stream reconnects with `Last-Event-ID` = the last event's id (the
/// cursor over every channel), exactly as a browser's EventSource does.
pub async fn subscribe_sse(
    base: &str,
    filter: &str,
    rewind: Option<u32>,
    mut on_event: impl FnMut(SubEvent) -> bool,
) -> Result<(), ClientError> {
    use eventsource_stream::Eventsource;
    let client = reqwest::Client::new();
    let mut last_id: Option<String> = None;
    let mut retry = Duration::from_secs(1);
    loop {
        let url = stream_url(base, "/v1/sse", filter, if last_id.is_none() { rewind } else { None });
        let mut req = client.get(url).header("accept", "text/event-stream");
        if let Some(id) = &last_id {
            req = req.header("last-event-id", id);
        }
        let why = match req.send().await {
            Ok(resp) if resp.status().is_success() => {
                let mut events = resp.bytes_stream().eventsource();
                loop {
                    match events.next().await {
                        Some(Ok(ev)) => {
                            if let Some(r) = ev.retry {
                                retry = r;
                            }
                            if !ev.id.is_empty() {
                                last_id = Some(ev.id.clone());
                            }
                            let frame = match proto::json::decode_server_frame(&ev.data) {
                                Ok(f) => f,
                                Err(e) => break format!("bad event data: {e}"),
                            };
                            let keep_going = match frame.frame {
                                Some(server_frame::Frame::Message(env)) => on_event(SubEvent::Message(Box::new(env))),
                                Some(server_frame::Frame::Gap(g)) => on_event(SubEvent::Gap(g)),
                                Some(server_frame::Frame::Connected(_)) => {
                                    on_event(SubEvent::Subscribed(proto::Subscribed {
                                        filter: filter.to_string(),
                                        channels: Vec::new(),
                                    }))
                                }
                                Some(server_frame::Frame::Disconnect(d)) => {
                                    break format!("server closed: {} {}", d.code, d.reason);
                                }
                                _ => true,
                            };
                            if !keep_going {
                                return Ok(());
                            }
                        }
                        Some(Err(e)) => break e.to_string(),
                        None => break "stream ended".to_string(),
                    }
                }
            }
            // A refused request will be refused again: report, don't loop.
            Ok(resp) if resp.status().is_client_error() => return Err(error_of(resp).await),
            Ok(resp) => format!("HTTP {}", resp.status()),
            Err(e) if last_id.is_none() => return Err(e.into()),
            Err(e) => e.to_string(),
        };
        if !on_event(SubEvent::Reconnecting(why)) {
            return Ok(());
        }
        tokio::time::sleep(retry).await;
    }
}

#[derive(serde::Deserialize)]
struct PollBody<'a> {
    #[serde(borrow)]
    messages: Vec<&'a serde_json::value::RawValue>,
    #[serde(borrow, default)]
    gaps: Vec<&'a serde_json::value::RawValue>,
    cursor: String,
}

/// Subscribes by long polling until `on_event` returns false, passing each
/// response's cursor to the next poll.
pub async fn subscribe_poll(
    base: &str,
    filter: &str,
    rewind: Option<u32>,
    mut on_event: impl FnMut(SubEvent) -> bool,
) -> Result<(), ClientError> {
    let client = reqwest::Client::new();
    let mut cursor: Option<String> = None;
    let mut backoff = Duration::from_millis(200);
    loop {
        let mut url = stream_url(base, "/v1/poll", filter, if cursor.is_none() { rewind } else { None });
        url.push_str("&timeout=25");
        if let Some(c) = &cursor {
            url.push_str("&cursor=");
            url.push_str(c);
        }
        let resp = match client.get(url).send().await {
            Ok(r) if r.status().is_success() => r,
            Ok(r) if r.status().is_client_error() => return Err(error_of(r).await),
            Ok(r) => {
                if !on_event(SubEvent::Reconnecting(format!("HTTP {}", r.status()))) {
                    return Ok(());
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
            Err(e) if cursor.is_none() => return Err(e.into()),
            Err(e) => {
                if !on_event(SubEvent::Reconnecting(e.to_string())) {
                    return Ok(());
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(200);
        let text = resp.text().await?;
        let body: PollBody<'_> = serde_json::from_str(&text).map_err(|e| ClientError::Unexpected(e.to_string()))?;
        for g in body.gaps {
            if let Ok(proto::ServerFrame { frame: Some(server_frame::Frame::Gap(g)), .. }) =
                proto::json::decode_server_frame(g.get())
                && !on_event(SubEvent::Gap(g))
            {
                return Ok(());
            }
        }
        for m in body.messages {
            let env = proto::json::decode_envelope(m.get()).map_err(|e| ClientError::Unexpected(e.to_string()))?;
            if !on_event(SubEvent::Message(Box::new(env))) {
                return Ok(());
            }
        }
        cursor = Some(body.cursor);
    }
}

fn mqtt_options(url: &str, client_id: &str) -> Result<rumqttc::v5::MqttOptions, ClientError> {
    let rest = url.strip_prefix("mqtt://").ok_or_else(|| ClientError::Usage("MQTT URLs start with mqtt://".into()))?;
    let (host, port) = match rest.trim_end_matches('/').rsplit_once(':') {
        Some((h, p)) => (h, p.parse().map_err(|_| ClientError::Usage(format!("bad port in {url}")))?),
        None => (rest.trim_end_matches('/'), 1883),
    };
    let mut opts = rumqttc::v5::MqttOptions::new(client_id, host, port);
    opts.set_keep_alive(Duration::from_secs(30));
    // rumqttc sizes its in-flight table by this limit up front (16 MB at
    // its default of 65 535); the CLI never has more than 100 requests queued.
    opts.set_outgoing_inflight_upper_limit(100);
    Ok(opts)
}

fn mqtt_qos(q: u8) -> rumqttc::v5::mqttbytes::QoS {
    match q {
        0 => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        1 => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        _ => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
    }
}

fn mqtt_error(e: impl std::fmt::Display) -> ClientError {
    ClientError::Unexpected(format!("MQTT: {e}"))
}

/// Publishes one message over MQTT 5 and waits until the gateway has it
/// (PUBACK / PUBCOMP for QoS 1 / 2; the flush for QoS 0).
pub async fn publish_mqtt(url: &str, channel: &str, payload: Bytes, qos: u8, retain: bool) -> Result<(), ClientError> {
    use rumqttc::v5::{Event, Incoming};
    let id = format!("switchboard-pub-{}", std::process::id());
    let (client, mut events) = rumqttc::v5::AsyncClient::new(mqtt_options(url, &id)?, 10);
    client.publish(channel, mqtt_qos(qos), retain, payload).await.map_err(mqtt_error)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let ev = tokio::time::timeout_at(deadline, events.poll())
            .await
            .map_err(|_| ClientError::Unexpected("no acknowledgement within 10 s".into()))?
            .map_err(mqtt_error)?;
        let done = match ev {
            Event::Incoming(Incoming::PubAck(a)) => {
                if a.reason != rumqttc::v5::mqttbytes::v5::PubAckReason::Success {
                    return Err(ClientError::Gateway {
                        code: format!("{:?}", a.reason),
                        message: "publish refused".into(),
                    });
                }
                qos == 1
            }
            Event::Incoming(Incoming::PubComp(_)) => qos == 2,
            Event::Outgoing(rumqttc::Outgoing::Publish(_)) => qos == 0,
            Event::Incoming(Incoming::Disconnect(d)) => {
                return Err(ClientError::Closed(format!(": {:?}", d.reason_code)));
            }
            _ => false,
        };
        if done {
            let _ = client.disconnect().await;
            // Let the DISCONNECT go out.
            let _ = tokio::time::timeout(Duration::from_millis(500), events.poll()).await;
            return Ok(());
        }
    }
}

/// Subscribes over MQTT 5 (QoS 1, clean start) until `on_event` returns
/// false. MQTT carries no positions: envelopes have the topic and payload
/// only (epoch `-`, serial 0).
pub async fn subscribe_mqtt(
    url: &str,
    filter: &str,
    mut on_event: impl FnMut(SubEvent) -> bool,
) -> Result<(), ClientError> {
    use rumqttc::v5::{Event, Incoming};
    let id = format!("switchboard-sub-{}", std::process::id());
    let (client, mut events) = rumqttc::v5::AsyncClient::new(mqtt_options(url, &id)?, 100);
    client.subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce).await.map_err(mqtt_error)?;
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Incoming::SubAck(ack))) => {
                let refused = ack
                    .return_codes
                    .iter()
                    .any(|c| !matches!(c, rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)));
                if refused {
                    return Err(ClientError::Gateway {
                        code: format!("{:?}", ack.return_codes),
                        message: "subscribe refused".into(),
                    });
                }
                if !on_event(SubEvent::Subscribed(proto::Subscribed { filter: filter.into(), channels: Vec::new() })) {
                    return Ok(());
                }
            }
            Ok(Event::Incoming(Incoming::Publish(p))) => {
                let env = proto::Envelope {
                    channel: String::from_utf8_lossy(&p.topic).into_owned(),
                    payload: p.payload.clone(),
                    epoch: "-".into(),
                    ..Default::default()
                };
                if !on_event(SubEvent::Message(Box::new(env))) {
                    let _ = client.disconnect().await;
                    let _ = tokio::time::timeout(Duration::from_millis(500), events.poll()).await;
                    return Ok(());
                }
            }
            Ok(_) => {}
            Err(e) => {
                // rumqttc reconnects on the next poll; say so and go on.
                if !on_event(SubEvent::Reconnecting(e.to_string())) {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
