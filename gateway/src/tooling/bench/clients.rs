//! Minimal, fast clients for the bench: WebSocket (protobuf subprotocol),
//! SSE, long polling, MQTT (rumqttc, 5 or 3.1.1) and REST publish, with
//! optional source address spreading over 127.0.0.x. The peers' own clients
//! (NATS, Nchan) are in [`super::nats`] and [`super::nchan`].
//!
//! Unlike [`crate::tooling::client`] these do not reconnect or print: a failure is
//! counted by the scenario, never retried behind its back, so a lossy run
//! shows up as loss. Each subscriber yields raw payload bytes; the scenario
//! decodes them.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, Stream, StreamExt};
use prost::Message as _;
use switchboard_proto::{self as proto, client_frame, server_frame};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use super::{BenchError, Flavour, MqttVersion};

/// How long any handshake step may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the gateway is, and which local addresses connect to it.
#[derive(Debug)]
pub struct Target {
    /// HTTP listener `host:port`.
    pub http: String,
    /// MQTT listener `host:port`.
    pub mqtt: String,
    /// NATS client listener `host:port` (`--proto nats`).
    pub nats: String,
    /// MQTT version the MQTT clients speak.
    pub mqtt_version: MqttVersion,
    /// What serves SSE, long polling and REST publishes at `http`.
    pub flavour: Flavour,
    /// The WebTransport endpoint (`--proto wt` runs only).
    pub wt: Option<super::wt::WtTarget>,
    /// HTTP clients speak HTTP/2 (`--http2`, through the TLS shim).
    pub http2: bool,
    /// Source addresses 127.0.0.1..=127.0.0.N, or none (let the kernel choose).
    sources: SourceCycle,
}

/// Source addresses 127.0.0.1..=127.0.0.N, round robin (`--src-addrs`).
#[derive(Debug)]
pub struct SourceCycle {
    count: u8,
    next: AtomicUsize,
}

impl SourceCycle {
    /// Over `count` addresses (1: none, the kernel chooses).
    pub fn new(count: u8) -> SourceCycle {
        SourceCycle { count, next: AtomicUsize::new(0) }
    }

    /// The next source address, if spreading is on.
    pub fn next(&self) -> Option<IpAddr> {
        if self.count <= 1 {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % usize::from(self.count);
        Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + i as u8)))
    }
}

impl Target {
    /// A target; `src_addrs` > 1 spreads connections over 127.0.0.1..=N
    /// (only when the gateway is on loopback).
    pub fn new(http: String, mqtt: String, src_addrs: u8) -> Target {
        Target {
            http,
            mqtt,
            nats: "127.0.0.1:4222".into(),
            mqtt_version: MqttVersion::V5,
            flavour: Flavour::Switchboard,
            wt: None,
            http2: false,
            sources: SourceCycle::new(src_addrs),
        }
    }

    /// The next source address, round robin, if spreading is on.
    pub fn next_source(&self) -> Option<IpAddr> {
        self.sources.next()
    }

    /// The WebTransport endpoint; an error when the run was not set up for it.
    pub fn wt(&self) -> Result<&super::wt::WtTarget, BenchError> {
        self.wt.as_ref().ok_or_else(|| BenchError::Usage("no WebTransport target (a run without --proto wt)".into()))
    }

    /// Base URL of the HTTP listener.
    pub fn http_base(&self) -> String {
        format!("http://{}", self.http)
    }
}

async fn resolve(hostport: &str) -> Result<SocketAddr, BenchError> {
    tokio::net::lookup_host(hostport)
        .await?
        .next()
        .ok_or_else(|| BenchError::Usage(format!("{hostport} does not resolve")))
}

/// A TCP connection from `src` (if given) with Nagle off.
pub async fn tcp_connect(hostport: &str, src: Option<IpAddr>) -> Result<TcpStream, BenchError> {
    let addr = resolve(hostport).await?;
    let sock = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if let Some(ip) = src {
        sock.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = sock.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A WebSocket with the protobuf subprotocol.
pub type Ws = WebSocketStream<TcpStream>;

fn frame_message(frame: client_frame::Frame, req: u64) -> Message {
    Message::binary(proto::ClientFrame { req, frame: Some(frame) }.encode_to_vec())
}

/// The next server frame; `Ok(None)` when the socket closed.
pub async fn ws_recv(
    ws: &mut (impl Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin),
) -> Result<Option<proto::ServerFrame>, BenchError> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => {
                return proto::ServerFrame::decode(b).map(Some).map_err(|e| BenchError::Protocol(e.to_string()));
            }
            Some(Ok(Message::Close(_))) | None => return Ok(None),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
        }
    }
}

/// The next binary message; `Ok(None)` when the socket closed.
pub async fn ws_recv_raw(
    ws: &mut (impl Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin),
) -> Result<Option<Bytes>, BenchError> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => return Ok(Some(b)),
            Some(Ok(Message::Close(_))) | None => return Ok(None),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
        }
    }
}

/// Protobuf field number of `ServerFrame.message`.
const SERVER_FRAME_MESSAGE: u64 = 6;
/// Protobuf field number of `Envelope.payload`.
const ENVELOPE_PAYLOAD: u64 = 2;

/// Iterates the length-delimited field `field` of a protobuf message,
/// skipping every other field; `None` if absent or malformed.
fn find_len_field(buf: &Bytes, field: u64) -> Option<Bytes> {
    use prost::encoding::decode_varint;
    let mut cur: &[u8] = buf;
    let mut found = None;
    while !cur.is_empty() {
        let key = decode_varint(&mut cur).ok()?;
        let (num, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                decode_varint(&mut cur).ok()?;
            }
            1 => cur = cur.get(8..)?,
            5 => cur = cur.get(4..)?,
            2 => {
                let len = usize::try_from(decode_varint(&mut cur).ok()?).ok()?;
                let start = buf.len() - cur.len();
                let body = cur.get(..len)?;
                if num == field {
                    // The last occurrence wins, as in protobuf.
                    found = Some(buf.slice(start..start + body.len()));
                }
                cur = &cur[len..];
            }
            _ => return None,
        }
    }
    found
}

/// The payload of a `ServerFrame { message }` without decoding the rest of
/// the envelope (the bench's hot path); `None` for any other frame.
pub fn message_payload(frame: &Bytes) -> Option<Bytes> {
    let env = find_len_field(frame, SERVER_FRAME_MESSAGE)?;
    Some(find_len_field(&env, ENVELOPE_PAYLOAD).unwrap_or_default())
}

async fn ws_expect(ws: &mut Ws, what: &str) -> Result<proto::ServerFrame, BenchError> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, ws_recv(ws)).await {
        Err(_) => Err(BenchError::Protocol(format!("no {what} within {HANDSHAKE_TIMEOUT:?}"))),
        Ok(Ok(None)) => Err(BenchError::Protocol(format!("closed before {what}"))),
        Ok(Ok(Some(f))) => match f.frame {
            Some(server_frame::Frame::Error(e)) => {
                Err(BenchError::Protocol(format!("{}: {}", e.code().slug(), e.message)))
            }
            _ => Ok(f),
        },
        Ok(Err(e)) => Err(e),
    }
}

/// Opens `/v1/ws` with `switchboard.v1.proto` and completes `connect`.
pub async fn ws_open(t: &Target, client_id: &str) -> Result<Ws, BenchError> {
    let stream = tcp_connect(&t.http, t.next_source()).await?;
    let mut request = format!("ws://{}/v1/ws", t.http).into_client_request()?;
    request.headers_mut().insert("sec-websocket-protocol", http::HeaderValue::from_static("switchboard.v1.proto"));
    let (mut ws, _) = tokio_tungstenite::client_async(request, stream).await?;
    let connect = proto::Connect { token: String::new(), client_id: client_id.into() };
    ws.send(frame_message(client_frame::Frame::Connect(connect), 1)).await?;
    match ws_expect(&mut ws, "connected").await?.frame {
        Some(server_frame::Frame::Connected(_)) => Ok(ws),
        other => Err(BenchError::Protocol(format!("expected connected, got {other:?}"))),
    }
}

/// Subscribes to `channel` (from `position`, if any); returns the channel's position then.
pub async fn ws_subscribe(
    ws: &mut Ws,
    channel: &str,
    position: Option<proto::Position>,
) -> Result<proto::Position, BenchError> {
    ws.send(frame_message(subscribe_frame(channel, position), 2)).await?;
    subscribed_position(ws_expect(ws, "subscribed").await?, channel)
}

/// A `subscribe` to `channel`, from `position` if any.
pub fn subscribe_frame(channel: &str, position: Option<proto::Position>) -> client_frame::Frame {
    let mut sub = proto::Subscribe { filter: channel.into(), ..Default::default() };
    if let Some(p) = position {
        sub.positions.insert(channel.into(), p);
    }
    client_frame::Frame::Subscribe(sub)
}

/// The channel's position in a `subscribed` reply (anything else is an error).
pub fn subscribed_position(reply: proto::ServerFrame, channel: &str) -> Result<proto::Position, BenchError> {
    match reply.frame {
        Some(server_frame::Frame::Subscribed(s)) => Ok(s
            .channels
            .into_iter()
            .find(|c| c.channel == channel)
            .map(|c| proto::Position { epoch: c.epoch, serial: c.serial })
            .unwrap_or_default()),
        other => Err(BenchError::Protocol(format!("expected subscribed, got {other:?}"))),
    }
}

/// A `publish` frame for `channel`; its `publish_ack` (or `error`) carries `req`.
pub fn publish_frame(channel: &str, payload: Vec<u8>, req: u64) -> Message {
    let p = proto::Publish { channel: channel.into(), payload: payload.into(), ..Default::default() };
    frame_message(client_frame::Frame::Publish(p), req)
}

/// A WebSocket publisher: frames go out on the sink; a task drains acks.
pub struct WsPublisher {
    sink: SplitSink<Ws, Message>,
    req: u64,
    drain: tokio::task::JoinHandle<u64>,
}

impl WsPublisher {
    /// Wraps an open, connected socket.
    pub fn new(ws: Ws) -> WsPublisher {
        let (sink, stream) = ws.split();
        let drain = tokio::spawn(drain_acks(stream));
        WsPublisher { sink, req: 10, drain }
    }

    /// Sends one publish frame (not waiting for its ack: the bench is open loop).
    pub async fn publish(&mut self, channel: &str, payload: Vec<u8>) -> Result<(), BenchError> {
        self.req += 1;
        self.sink.send(publish_frame(channel, payload, self.req)).await?;
        Ok(())
    }

    /// Closes the socket; returns the error frames the gateway sent.
    pub async fn close(mut self) -> u64 {
        // Give the last acks a moment, then close; a slow close is not the gateway's fault to count.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.sink.close()).await;
        match tokio::time::timeout(Duration::from_secs(5), &mut self.drain).await {
            Ok(Ok(n)) => n,
            _ => {
                self.drain.abort();
                0
            }
        }
    }
}

async fn drain_acks(mut stream: SplitStream<Ws>) -> u64 {
    let mut errors = 0;
    while let Ok(Some(f)) = ws_recv(&mut stream).await {
        if let Some(server_frame::Frame::Error(e)) = f.frame {
            tracing::warn!(code = e.code().slug(), message = %e.message, "publish refused");
            errors += 1;
        }
    }
    errors
}

/// The TLS configuration every bench HTTP client is built with: none is
/// ever used (the bench speaks plain HTTP; TLS targets go through
/// [`super::tls`]'s shim), but without one reqwest builds its own for each
/// client, loading the platform's root certificates every time — about as
/// much CPU per client as a reconnect costs, which made a storm of SSE
/// reconnects measure the bench.
fn no_tls() -> rustls::ClientConfig {
    static CONFIG: std::sync::OnceLock<rustls::ClientConfig> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("aws-lc-rs supports the default versions")
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        })
        .clone()
}

/// An HTTP client (keep-alive), bound to the next source address.
pub fn http_client(t: &Target) -> Result<reqwest::Client, BenchError> {
    let mut b = reqwest::Client::builder()
        .tls_backend_preconfigured(no_tls())
        .tcp_nodelay(true)
        .pool_max_idle_per_host(4)
        .timeout(Duration::from_secs(90));
    if let Some(ip) = t.next_source() {
        b = b.local_address(ip);
    }
    if t.http2 {
        // To the shim in clear text; it negotiated h2 with the server.
        b = b.http2_prior_knowledge();
    }
    Ok(b.build()?)
}

fn channel_path(channel: &str) -> String {
    channel
        .split('/')
        .map(|l| percent_encoding::utf8_percent_encode(l, percent_encoding::NON_ALPHANUMERIC).to_string())
        .collect::<Vec<_>>()
        .join("/")
}

/// The REST publish URL of `channel` (`{base}/v1/channels/{channel}/messages`).
pub fn publish_url(base: &str, channel: &str) -> String {
    format!("{base}/v1/channels/{}/messages", channel_path(channel))
}

/// POSTs `payload` (raw body) to a publish URL and reads the whole response,
/// so the connection goes back to the pool; returns its status. An error
/// is the connection's, never the status's.
pub async fn rest_post(
    client: &reqwest::Client,
    url: &str,
    payload: Vec<u8>,
) -> Result<reqwest::StatusCode, BenchError> {
    let resp = client.post(url).header("content-type", "application/octet-stream").body(payload).send().await?;
    let status = resp.status();
    let _ = resp.bytes().await?;
    Ok(status)
}

/// Publishes over REST (raw body) and waits for the 200.
pub async fn rest_publish(
    client: &reqwest::Client,
    base: &str,
    channel: &str,
    payload: Vec<u8>,
) -> Result<(), BenchError> {
    let status = rest_post(client, &publish_url(base, channel), payload).await?;
    if !status.is_success() {
        return Err(BenchError::Protocol(format!("REST publish: HTTP {status}")));
    }
    Ok(())
}

/// Server-sent events as parsed by `eventsource-stream`.
pub type SseEvents = Pin<
    Box<
        dyn Stream<Item = Result<eventsource_stream::Event, eventsource_stream::EventStreamError<reqwest::Error>>>
            + Send,
    >,
>;

/// Opens `/v1/sse?channel=...` (resuming from `last_event_id`) and waits for
/// the `connected` event; returns the stream and that event's id (the cursor).
pub async fn sse_open(
    client: &reqwest::Client,
    base: &str,
    channel: &str,
    last_event_id: Option<&str>,
) -> Result<(SseEvents, String), BenchError> {
    use eventsource_stream::Eventsource;
    // The serializer is not Send: finish it before any await.
    let query = url::form_urlencoded::Serializer::new(String::new()).append_pair("channel", channel).finish();
    let mut req = client.get(format!("{base}/v1/sse?{query}")).header("accept", "text/event-stream");
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id);
    }
    let resp = req.send().await?;
    if !resp.status().is_success() {
        return Err(BenchError::Protocol(format!("SSE: HTTP {}", resp.status())));
    }
    let mut events: SseEvents = Box::pin(resp.bytes_stream().eventsource());
    let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, events.next())
        .await
        .map_err(|_| BenchError::Protocol("no SSE connected event".into()))?;
    match first {
        Some(Ok(ev)) if ev.event == "connected" => Ok((events, ev.id)),
        Some(Ok(ev)) => Err(BenchError::Protocol(format!("SSE: expected connected, got {}", ev.event))),
        Some(Err(e)) => Err(BenchError::Protocol(format!("SSE: {e}"))),
        None => Err(BenchError::Protocol("SSE stream ended".into())),
    }
}

/// The payload of an SSE `message` event (`None` for other events).
pub fn sse_payload(ev: &eventsource_stream::Event) -> Result<Option<Bytes>, BenchError> {
    if ev.event != "message" {
        return Ok(None);
    }
    proto::json::decode_envelope(&ev.data).map(|e| Some(e.payload)).map_err(|e| BenchError::Protocol(e.to_string()))
}

#[derive(serde::Deserialize)]
struct PollBody<'a> {
    #[serde(borrow)]
    messages: Vec<&'a serde_json::value::RawValue>,
    cursor: String,
}

/// One long poll; returns the payloads and the next cursor.
pub async fn poll_once(
    client: &reqwest::Client,
    base: &str,
    channel: &str,
    cursor: Option<&str>,
    timeout_s: u32,
) -> Result<(Vec<Bytes>, String), BenchError> {
    let query = {
        // The serializer is not Send: finish it before any await.
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        q.append_pair("channel", channel).append_pair("timeout", &timeout_s.to_string());
        if let Some(c) = cursor {
            q.append_pair("cursor", c);
        }
        q.finish()
    };
    let resp = client.get(format!("{base}/v1/poll?{query}")).send().await?;
    if !resp.status().is_success() {
        return Err(BenchError::Protocol(format!("poll: HTTP {}", resp.status())));
    }
    let text = resp.bytes().await?;
    let body: PollBody<'_> = serde_json::from_slice(&text).map_err(|e| BenchError::Protocol(e.to_string()))?;
    let mut out = Vec::with_capacity(body.messages.len());
    for m in body.messages {
        out.push(proto::json::decode_envelope(m.get()).map_err(|e| BenchError::Protocol(e.to_string()))?.payload);
    }
    Ok((out, body.cursor))
}

/// MQTT QoS from 0..=2.
pub fn mqtt_qos(q: u8) -> rumqttc::v5::mqttbytes::QoS {
    match q {
        0 => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        1 => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        _ => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
    }
}

/// Outgoing QoS 1/2 publishes a bench MQTT 5 subscriber may have in flight
/// (it publishes none). rumqttc sizes a table by this limit when the client
/// is created, about 250 bytes a slot: left at its default (65 535) that is
/// 16 MB per connection, and a few thousand subscribers exhaust the memory.
pub const MQTT_SUB_INFLIGHT: u16 = 16;

/// Outgoing QoS 1/2 publishes a bench MQTT 5 publisher may have in flight:
/// as many as its request queue holds.
pub const MQTT_PUB_INFLIGHT: u16 = 1024;

/// MQTT 5 client options; `session_expiry` > 0 asks for a persistent
/// session; `inflight` bounds the client's outgoing QoS 1/2 publishes in
/// flight (the broker's Receive Maximum may lower it further).
///
/// rumqttc opens its own sockets, so MQTT connections do not take part in
/// source address spreading.
pub fn mqtt_options(
    t: &Target,
    client_id: &str,
    session_expiry: u32,
    inflight: u16,
) -> Result<rumqttc::v5::MqttOptions, BenchError> {
    let (host, port) =
        t.mqtt.rsplit_once(':').ok_or_else(|| BenchError::Usage(format!("bad MQTT address {}", t.mqtt)))?;
    let port = port.parse().map_err(|_| BenchError::Usage(format!("bad MQTT port in {}", t.mqtt)))?;
    let mut opts = rumqttc::v5::MqttOptions::new(client_id, host, port);
    opts.set_keep_alive(Duration::from_secs(60));
    opts.set_outgoing_inflight_upper_limit(inflight);
    opts.set_network_options(mqtt_network_options());
    // The bench sends far more than rumqttc's 10 KiB default packet limit allows for large --size.
    opts.set_max_packet_size(Some(1 << 20));
    if session_expiry > 0 {
        opts.set_clean_start(false);
        let mut props = rumqttc::v5::mqttbytes::v5::ConnectProperties::new();
        props.session_expiry_interval = Some(session_expiry);
        opts.set_connect_properties(props);
    }
    Ok(opts)
}

/// Socket options for every bench MQTT connection: Nagle off, as on every
/// other bench socket. rumqttc leaves Nagle on by default, and then a small
/// PUBLISH written while an earlier segment awaits its (delayed) ACK waits
/// for it: tens of milliseconds of client-made latency in the tail.
pub fn mqtt_network_options() -> rumqttc::NetworkOptions {
    let mut n = rumqttc::NetworkOptions::new();
    n.set_tcp_nodelay(true);
    n
}

/// A 3.1.1 client and its event loop with [`mqtt_network_options`].
pub fn mqtt3_client(opts: rumqttc::MqttOptions, cap: usize) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    let (client, mut events) = rumqttc::AsyncClient::new(opts, cap);
    events.set_network_options(mqtt_network_options());
    (client, events)
}

/// MQTT 3.1.1 client options (clean session, QoS per call).
///
/// For brokers that speak only 3.1.1 (nats-server's MQTT listener) and for
/// comparing brokers with one client: `--mqtt-version 3`.
pub fn mqtt3_options(t: &Target, client_id: &str) -> Result<rumqttc::MqttOptions, BenchError> {
    let (host, port) =
        t.mqtt.rsplit_once(':').ok_or_else(|| BenchError::Usage(format!("bad MQTT address {}", t.mqtt)))?;
    let port = port.parse().map_err(|_| BenchError::Usage(format!("bad MQTT port in {}", t.mqtt)))?;
    let mut opts = rumqttc::MqttOptions::new(client_id, host, port);
    opts.set_keep_alive(Duration::from_secs(60));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    Ok(opts)
}

/// MQTT 3.1.1 QoS from 0..=2.
pub fn mqtt3_qos(q: u8) -> rumqttc::QoS {
    match q {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        _ => rumqttc::QoS::ExactlyOnce,
    }
}

/// Polls a 3.1.1 event loop until `done` says so (bounded by the handshake timeout).
pub async fn mqtt3_wait(
    events: &mut rumqttc::EventLoop,
    mut done: impl FnMut(&rumqttc::Event) -> Result<bool, BenchError>,
) -> Result<(), BenchError> {
    let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
    loop {
        let ev = tokio::time::timeout_at(deadline, events.poll())
            .await
            .map_err(|_| BenchError::Protocol("MQTT handshake timed out".into()))?
            .map_err(|e| BenchError::Protocol(format!("MQTT: {e}")))?;
        if done(&ev)? {
            return Ok(());
        }
    }
}

/// MQTT 3.1.1: connects and subscribes; returns once the SUBACK granted it.
pub async fn mqtt3_subscribe(
    t: &Target,
    client_id: &str,
    channel: &str,
    qos: u8,
) -> Result<(rumqttc::AsyncClient, rumqttc::EventLoop), BenchError> {
    use rumqttc::{Event, Incoming, SubscribeReasonCode};
    let (client, mut events) = mqtt3_client(mqtt3_options(t, client_id)?, 64);
    client.subscribe(channel, mqtt3_qos(qos)).await.map_err(|e| BenchError::Protocol(format!("MQTT: {e}")))?;
    mqtt3_wait(&mut events, |ev| match ev {
        Event::Incoming(Incoming::SubAck(ack)) => {
            if ack.return_codes.iter().all(|c| matches!(c, SubscribeReasonCode::Success(_))) {
                Ok(true)
            } else {
                Err(BenchError::Protocol(format!("SUBACK {:?}", ack.return_codes)))
            }
        }
        _ => Ok(false),
    })
    .await?;
    Ok((client, events))
}

/// Polls `events` until `done` says so (bounded by the handshake timeout).
pub async fn mqtt_wait(
    events: &mut rumqttc::v5::EventLoop,
    mut done: impl FnMut(&rumqttc::v5::Event) -> Result<bool, BenchError>,
) -> Result<(), BenchError> {
    let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
    loop {
        let ev = tokio::time::timeout_at(deadline, events.poll())
            .await
            .map_err(|_| BenchError::Protocol("MQTT handshake timed out".into()))?
            .map_err(|e| BenchError::Protocol(format!("MQTT: {e}")))?;
        if done(&ev)? {
            return Ok(());
        }
    }
}

/// Connects and subscribes; returns once the SUBACK granted the subscription.
pub async fn mqtt_subscribe(
    t: &Target,
    client_id: &str,
    channel: &str,
    qos: u8,
    session_expiry: u32,
) -> Result<(rumqttc::v5::AsyncClient, rumqttc::v5::EventLoop), BenchError> {
    use rumqttc::v5::{Event, Incoming};
    let (client, mut events) =
        rumqttc::v5::AsyncClient::new(mqtt_options(t, client_id, session_expiry, MQTT_SUB_INFLIGHT)?, 64);
    client.subscribe(channel, mqtt_qos(qos)).await.map_err(|e| BenchError::Protocol(format!("MQTT: {e}")))?;
    mqtt_wait(&mut events, |ev| match ev {
        Event::Incoming(Incoming::SubAck(ack)) => {
            if ack.return_codes.iter().all(|c| matches!(c, rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)))
            {
                Ok(true)
            } else {
                Err(BenchError::Protocol(format!("SUBACK {:?}", ack.return_codes)))
            }
        }
        _ => Ok(false),
    })
    .await?;
    Ok((client, events))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_payload_matches_the_full_decode() {
        let env = proto::Envelope {
            channel: "a/b".into(),
            payload: Bytes::from_static(b"SB1:payload"),
            epoch: "e1".into(),
            serial: 300,
            prev_serial: 299,
            timestamp: -5,
            publisher: Some(proto::Publisher { client_id: "c".into(), ..Default::default() }),
            headers: [("k".to_string(), "v".to_string())].into(),
            ..Default::default()
        };
        let frame = proto::encode_message_frame(&env);
        assert_eq!(message_payload(&frame), Some(env.payload.clone()));
        let empty = proto::encode_message_frame(&proto::Envelope { channel: "x".into(), ..Default::default() });
        assert_eq!(message_payload(&empty), Some(Bytes::new()));
        let pong = proto::encode_server_frame(&proto::ServerFrame {
            req: 7,
            frame: Some(server_frame::Frame::Pong(proto::Pong {})),
        });
        assert_eq!(message_payload(&pong), None);
        assert_eq!(message_payload(&Bytes::from_static(&[0x32, 0x05, 0x00])), None, "truncated");
    }
}
