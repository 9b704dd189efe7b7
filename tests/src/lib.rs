//! Test harness: the real gateway on `127.0.0.1:0`, real clients
//! (tokio-tungstenite for WebSocket in both subprotocols, reqwest for REST),
//! and a bounded `eventually` helper instead of sleeps.

use std::collections::VecDeque;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use switchboard::edge::config::Config;
use switchboard::edge::server::Gateway;
use switchboard_proto::{self as proto, client_frame, server_frame};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a test waits for anything before failing.
pub const WAIT: Duration = Duration::from_secs(10);

/// A gateway running in this process on ephemeral loopback ports.
pub struct TestGateway {
    /// The running gateway.
    pub gateway: Gateway,
    /// `http://127.0.0.1:PORT`.
    pub http: String,
    /// `ws://127.0.0.1:PORT`.
    pub ws: String,
    /// `http://127.0.0.1:ADMINPORT`.
    pub admin: String,
    /// MQTT listener address (`127.0.0.1:PORT`).
    pub mqtt: std::net::SocketAddr,
}

impl TestGateway {
    /// Starts with dev defaults.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(|_| {}).await
    }

    /// Starts with dev defaults changed by `tweak`.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> anyhow::Result<Self> {
        let mut cfg = Config::from_toml("", Vec::new())?;
        cfg.listen.http = "127.0.0.1:0".into();
        cfg.listen.admin = "127.0.0.1:0".into();
        cfg.listen.mqtt = "127.0.0.1:0".into();
        cfg.echo.enabled = true;
        // In memory unless a test asks for a store (and names its directory).
        cfg.storage.kind = switchboard::edge::config::StorageKind::Memory;
        tweak(&mut cfg);
        cfg.validate()?;
        let gateway = Gateway::start(cfg).await?;
        let http_addr = gateway.http_addr.context("http listener")?;
        let admin_addr = gateway.admin_addr.context("admin listener")?;
        let mqtt = gateway.mqtt_addr.context("mqtt listener")?;
        Ok(TestGateway {
            http: format!("http://{http_addr}"),
            ws: format!("ws://{http_addr}"),
            admin: format!("http://{admin_addr}"),
            mqtt,
            gateway,
        })
    }

    /// Number of open sessions.
    pub fn sessions(&self) -> usize {
        self.gateway.router.session_count()
    }
}

/// Waits until `check` returns true, polling every 10 ms, for at most `within`.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// WebSocket subprotocol to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// `switchboard.v1.json` (text frames).
    Json,
    /// `switchboard.v1.proto` (binary frames).
    Proto,
}

/// The raw WebSocket stream type.
pub type RawWs = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Opens a raw WebSocket to `/v1/ws` with the given subprotocol header.
pub async fn raw_ws(base: &str, subprotocol: Option<&str>) -> anyhow::Result<RawWs> {
    let mut request = format!("{base}/v1/ws").into_client_request()?;
    if let Some(p) = subprotocol {
        request.headers_mut().insert("sec-websocket-protocol", p.parse()?);
    }
    let (ws, _) = tokio_tungstenite::connect_async(request).await?;
    Ok(ws)
}

/// A Switchboard WebSocket client speaking either subprotocol.
pub struct WsClient {
    ws: RawWs,
    codec: Codec,
    next_req: u64,
    /// Pushed frames (messages, gaps) received while waiting for replies.
    pending: VecDeque<proto::ServerFrame>,
    /// The connected reply.
    pub connected: proto::Connected,
    /// Close frame received, if any.
    pub close: Option<CloseFrame>,
}

/// JSON text of a client frame (the documented JSON mapping).
pub fn client_frame_json(f: &proto::ClientFrame) -> String {
    use serde_json::json;
    // Payload fields are spliced in as text at the end so that a JSON
    // payload stays verbatim (a serde_json::Value would re-format it).
    let frame = f.frame.as_ref().expect("frame");
    let raw_payload: Option<&Bytes> = match frame {
        client_frame::Frame::Publish(p) => Some(&p.payload),
        client_frame::Frame::PresenceEnter(p) => Some(&p.data),
        client_frame::Frame::PresenceUpdate(p) => Some(&p.data),
        _ => None,
    };
    let payload = |_: &Bytes| json!({});
    let mut v = match frame {
        client_frame::Frame::Connect(c) => json!({"type": "connect", "client_id": c.client_id, "token": c.token}),
        client_frame::Frame::Subscribe(s) => {
            let positions: serde_json::Map<String, serde_json::Value> =
                s.positions.iter().map(|(k, p)| (k.clone(), json!({"epoch": p.epoch, "serial": p.serial}))).collect();
            let mut v = json!({"type": "subscribe", "filter": s.filter, "positions": positions, "presence": s.presence, "retained": s.retained});
            if let Some(r) = &s.rewind {
                v["rewind"] = json!({"count": r.count, "duration_ms": r.duration_ms});
            }
            v
        }
        client_frame::Frame::Unsubscribe(u) => json!({"type": "unsubscribe", "filter": u.filter}),
        client_frame::Frame::Publish(p) => {
            let mut v = payload(&p.payload);
            v["type"] = "publish".into();
            v["channel"] = p.channel.clone().into();
            v["id"] = p.id.clone().into();
            v["retain"] = p.retain.into();
            v["content_type"] = p.content_type.clone().into();
            v["headers"] = serde_json::to_value(&p.headers).expect("headers");
            v
        }
        client_frame::Frame::PresenceEnter(p) => {
            let mut v = payload(&p.data);
            v["type"] = "presence.enter".into();
            v["channel"] = p.channel.clone().into();
            v
        }
        client_frame::Frame::PresenceUpdate(p) => {
            let mut v = payload(&p.data);
            v["type"] = "presence.update".into();
            v["channel"] = p.channel.clone().into();
            v
        }
        client_frame::Frame::PresenceLeave(p) => json!({"type": "presence.leave", "channel": p.channel}),
        client_frame::Frame::PresenceGet(p) => json!({"type": "presence.get", "channel": p.channel}),
        client_frame::Frame::History(h) => {
            let mut v = json!({"type": "history", "channel": h.channel, "limit": h.limit, "reverse": h.reverse});
            if let Some(s) = &h.since {
                v["since"] = json!({"epoch": s.epoch, "serial": s.serial});
            }
            v
        }
        client_frame::Frame::Refresh(r) => json!({"type": "refresh", "token": r.token}),
        client_frame::Frame::Ping(_) => json!({"type": "ping"}),
    };
    v["req"] = f.req.into();
    let text = v.to_string();
    match raw_payload {
        None => text,
        Some(b) => {
            let fields = serde_json::to_string(&proto::json::JsonPayload::new(b)).expect("payload json");
            let inner = &fields[1..fields.len() - 1];
            if inner.is_empty() { text } else { format!("{},{inner}}}", &text[..text.len() - 1]) }
        }
    }
}

impl WsClient {
    /// Connects to `base` (`ws://HOST:PORT`) and sends `connect`.
    pub async fn connect(base: &str, codec: Codec, client_id: &str) -> anyhow::Result<Self> {
        Self::connect_as(base, codec, client_id, "").await
    }

    /// Connects with a connection token (token auth).
    pub async fn connect_with_token(base: &str, codec: Codec, token: &str) -> anyhow::Result<Self> {
        Self::connect_as(base, codec, "", token).await
    }

    async fn connect_as(base: &str, codec: Codec, client_id: &str, token: &str) -> anyhow::Result<Self> {
        let sub = match codec {
            Codec::Json => "switchboard.v1.json",
            Codec::Proto => "switchboard.v1.proto",
        };
        let ws = raw_ws(base, Some(sub)).await?;
        let mut c =
            WsClient { ws, codec, next_req: 0, pending: VecDeque::new(), connected: Default::default(), close: None };
        let reply = c
            .request(client_frame::Frame::Connect(proto::Connect { token: token.into(), client_id: client_id.into() }))
            .await?;
        match reply.frame {
            Some(server_frame::Frame::Connected(conn)) => c.connected = conn,
            other => bail!("expected connected, got {other:?}"),
        }
        Ok(c)
    }

    /// Sends a raw WebSocket message.
    pub async fn send_raw(&mut self, m: Message) -> anyhow::Result<()> {
        self.ws.send(m).await?;
        Ok(())
    }

    /// Sends a frame with the next request id; returns that id.
    pub async fn send(&mut self, frame: client_frame::Frame) -> anyhow::Result<u64> {
        self.next_req += 1;
        let f = proto::ClientFrame { req: self.next_req, frame: Some(frame) };
        let m = match self.codec {
            Codec::Json => Message::text(client_frame_json(&f)),
            Codec::Proto => Message::binary(f.encode_to_vec()),
        };
        self.ws.send(m).await?;
        Ok(self.next_req)
    }

    /// Receives the next server frame from the socket (not from `pending`).
    pub async fn recv_frame(&mut self) -> anyhow::Result<proto::ServerFrame> {
        loop {
            let m =
                tokio::time::timeout(WAIT, self.ws.next()).await.map_err(|_| anyhow!("no frame within {WAIT:?}"))?;
            match m {
                Some(Ok(Message::Text(t))) => {
                    assert_eq!(self.codec, Codec::Json, "text frame on the proto subprotocol");
                    return proto::json::decode_server_frame(t.as_str())
                        .map_err(|e| anyhow!("bad JSON from server: {e}: {t}"));
                }
                Some(Ok(Message::Binary(b))) => {
                    assert_eq!(self.codec, Codec::Proto, "binary frame on the JSON subprotocol");
                    return Ok(proto::ServerFrame::decode(b)?);
                }
                Some(Ok(Message::Close(c))) => {
                    self.close = c.clone();
                    bail!("closed: {c:?}");
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => bail!("websocket error: {e}"),
                None => bail!("connection ended"),
            }
        }
    }

    /// Sends a request and waits for the reply with its id, keeping pushed
    /// frames for [`WsClient::next_push`].
    pub async fn request(&mut self, frame: client_frame::Frame) -> anyhow::Result<proto::ServerFrame> {
        let req = self.send(frame).await?;
        loop {
            let f = self.recv_frame().await?;
            if f.req == req {
                return Ok(f);
            }
            if f.req != 0 {
                bail!("reply for request {} while waiting for {req}: {f:?}", f.req);
            }
            self.pending.push_back(f);
        }
    }

    /// The next pushed frame (message, gap, disconnect).
    pub async fn next_push(&mut self) -> anyhow::Result<proto::ServerFrame> {
        if let Some(f) = self.pending.pop_front() {
            return Ok(f);
        }
        self.recv_frame().await
    }

    /// The next pushed message envelope (skipping nothing: anything else is an error).
    pub async fn next_message(&mut self) -> anyhow::Result<proto::Envelope> {
        match self.next_push().await?.frame {
            Some(server_frame::Frame::Message(e)) => Ok(e),
            other => bail!("expected a message, got {other:?}"),
        }
    }

    /// Collects `n` messages.
    pub async fn messages(&mut self, n: usize) -> anyhow::Result<Vec<proto::Envelope>> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.next_message().await?);
        }
        Ok(out)
    }

    /// Subscribes; returns the `subscribed` reply (or the error frame as Err).
    pub async fn subscribe(&mut self, sub: proto::Subscribe) -> anyhow::Result<proto::Subscribed> {
        match self.request(client_frame::Frame::Subscribe(sub)).await?.frame {
            Some(server_frame::Frame::Subscribed(s)) => Ok(s),
            other => bail!("subscribe failed: {other:?}"),
        }
    }

    /// Subscribes to a filter with no options.
    pub async fn subscribe_to(&mut self, filter: &str) -> anyhow::Result<proto::Subscribed> {
        self.subscribe(proto::Subscribe { filter: filter.into(), ..Default::default() }).await
    }

    /// Publishes; returns the reply frame (ack or error).
    pub async fn publish_frame(&mut self, p: proto::Publish) -> anyhow::Result<proto::ServerFrame> {
        self.request(client_frame::Frame::Publish(p)).await
    }

    /// Publishes and expects an ack.
    pub async fn publish(&mut self, channel: &str, payload: &[u8], id: &str) -> anyhow::Result<proto::PublishAck> {
        let p = proto::Publish {
            channel: channel.into(),
            payload: Bytes::copy_from_slice(payload),
            id: id.into(),
            ..Default::default()
        };
        match self.publish_frame(p).await?.frame {
            Some(server_frame::Frame::PublishAck(a)) => Ok(a),
            other => bail!("publish failed: {other:?}"),
        }
    }

    /// Waits for the server to close; returns the close code.
    pub async fn closed_with(&mut self) -> anyhow::Result<u16> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(c) = &self.close {
                return Ok(u16::from(c.code));
            }
            let m = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .map_err(|_| anyhow!("not closed within {WAIT:?}"))?;
            match m {
                Some(Ok(Message::Close(Some(c)))) => return Ok(u16::from(c.code)),
                Some(Ok(Message::Close(None))) => return Ok(1005),
                Some(Ok(_)) => continue,
                Some(Err(e)) => bail!("connection failed without a close frame: {e}"),
                None => bail!("connection ended without a close frame"),
            }
        }
    }

    /// Closes cleanly.
    pub async fn close(mut self) -> anyhow::Result<()> {
        self.ws.close(None).await?;
        Ok(())
    }

    /// Drops the TCP connection without a close frame (abrupt).
    pub fn drop_abruptly(self) {
        drop(self.ws);
    }
}

/// Publishes over REST with optional headers; returns (status, JSON body).
pub async fn rest_publish(
    http: &str,
    channel: &str,
    body: impl Into<reqwest::Body>,
    headers: &[(&str, &str)],
) -> anyhow::Result<(u16, serde_json::Value)> {
    let mut req = reqwest::Client::new().post(format!("{http}/v1/channels/{channel}/messages")).body(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let json = resp.json().await.unwrap_or(serde_json::Value::Null);
    Ok((status, json))
}

/// GETs a URL; returns (status, JSON body).
pub async fn get_json(url: &str) -> anyhow::Result<(u16, serde_json::Value)> {
    let resp = reqwest::get(url).await?;
    let status = resp.status().as_u16();
    let json = resp.json().await.unwrap_or(serde_json::Value::Null);
    Ok((status, json))
}

// ---------------------------------------------------------------------------
// WebTransport: the QUIC listener and a client (the gateway's own, on
// wtransport).

/// Config tweak: the QUIC listener on a free UDP port, with the certificate
/// `dev` generates (ECDSA P-256, 14 days: accepted by its hash).
pub fn with_quic(cfg: &mut Config) {
    cfg.dev = true;
    cfg.listen.quic = "127.0.0.1:0".into();
}

impl TestGateway {
    /// Client options for the QUIC listener of a gateway started with
    /// [`with_quic`]: `https://127.0.0.1:PORT`, the certificate checked by
    /// its SHA-256.
    pub fn wt_options(&self) -> anyhow::Result<switchboard::tooling::client_wt::WtOptions> {
        let addr = self.gateway.quic_addr.context("no QUIC listener: start with with_quic")?;
        let hash = self.gateway.tls.as_ref().and_then(|t| t.cert_hash()).context("no certificate")?;
        Ok(switchboard::tooling::client_wt::WtOptions::new(
            format!("https://{addr}"),
            switchboard::tooling::client_wt::CertCheck::Hash(hash),
        ))
    }

    /// A connected WebTransport client (open mode) with `client_id`.
    pub async fn wt_client(&self, client_id: &str) -> anyhow::Result<switchboard::tooling::client_wt::WtClient> {
        let mut opts = self.wt_options()?;
        opts.client_id = client_id.into();
        Ok(switchboard::tooling::client_wt::WtClient::connect(&opts).await?)
    }
}

/// The next server-opened (channel) stream of `c`, within [`WAIT`].
pub async fn wt_accept(
    c: &switchboard::tooling::client_wt::WtClient,
) -> anyhow::Result<switchboard::tooling::client_wt::FrameReader> {
    Ok(tokio::time::timeout(WAIT, c.accept_stream()).await.map_err(|_| anyhow!("no stream within {WAIT:?}"))??)
}

/// The next frame of a stream, within [`WAIT`].
pub async fn wt_next(r: &mut switchboard::tooling::client_wt::FrameReader) -> anyhow::Result<proto::ServerFrame> {
    tokio::time::timeout(WAIT, r.next())
        .await
        .map_err(|_| anyhow!("no frame within {WAIT:?}"))??
        .context("the stream finished")
}

/// The next message envelope of a stream (anything else is an error).
pub async fn wt_message(r: &mut switchboard::tooling::client_wt::FrameReader) -> anyhow::Result<proto::Envelope> {
    match wt_next(r).await?.frame {
        Some(server_frame::Frame::Message(e)) => Ok(e),
        other => bail!("expected a message, got {other:?}"),
    }
}

/// How a WebTransport session ended: the application close code and reason
/// (within [`WAIT`]).
pub async fn wt_closed(conn: &wtransport::Connection) -> anyhow::Result<(u64, String)> {
    match tokio::time::timeout(WAIT, conn.closed()).await.map_err(|_| anyhow!("not closed within {WAIT:?}"))? {
        wtransport::error::ConnectionError::ApplicationClosed(c) => {
            Ok((c.code().into_inner(), String::from_utf8_lossy(c.reason()).into_owned()))
        }
        other => bail!("closed without an application close: {other}"),
    }
}
