//! Helpers shared by the presence, slow-consumer, bad-input and lifecycle
//! tests: a JSON client on a socket with a tiny receive buffer (to make a
//! slow consumer quickly), a bystander that proves the gateway still serves
//! other clients, and readers for the admin API and `/metrics`.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use switchboard_proto::{self as proto, ErrorCode, client_frame, server_frame};
use switchboard_tests::{Codec, TestGateway, WAIT, WsClient, client_frame_json, get_json, rest_publish};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// Current Unix time in milliseconds (the clock the gateway stamps with).
pub fn unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// The error code and `req` of an error frame; fails on anything else.
pub fn error_of(f: &proto::ServerFrame) -> anyhow::Result<(ErrorCode, u64)> {
    match &f.frame {
        Some(server_frame::Frame::Error(e)) => Ok((e.code(), f.req)),
        other => bail!("expected an error frame, got {other:?}"),
    }
}

/// The `disconnect` frame's fields; fails on anything else.
pub fn disconnect_of(f: &proto::ServerFrame) -> anyhow::Result<(u32, String, bool)> {
    match &f.frame {
        Some(server_frame::Frame::Disconnect(d)) => Ok((d.code, d.reason.clone(), d.reconnect)),
        other => bail!("expected a disconnect frame, got {other:?}"),
    }
}

/// A JSON-subprotocol client on a TCP socket whose receive buffer is 4 KiB,
/// so that the server's writes back up after a few kilobytes once the test
/// stops reading.
pub struct SmallBufClient {
    ws: WebSocketStream<TcpStream>,
    next_req: u64,
}

impl SmallBufClient {
    /// Connects to `/v1/ws` with `switchboard.v1.json` and sends `connect`.
    pub async fn connect(addr: SocketAddr, client_id: &str) -> anyhow::Result<Self> {
        let socket = TcpSocket::new_v4()?;
        // Before connect, so the advertised window starts small too.
        socket.set_recv_buffer_size(4096)?;
        let stream = socket.connect(addr).await?;
        let mut request = format!("ws://{addr}/v1/ws").into_client_request()?;
        request.headers_mut().insert("sec-websocket-protocol", "switchboard.v1.json".parse()?);
        let (ws, _) = tokio_tungstenite::client_async(request, stream).await?;
        let mut c = SmallBufClient { ws, next_req: 0 };
        let reply = c
            .request(client_frame::Frame::Connect(proto::Connect { token: String::new(), client_id: client_id.into() }))
            .await?;
        match reply.frame {
            Some(server_frame::Frame::Connected(_)) => Ok(c),
            other => bail!("expected connected, got {other:?}"),
        }
    }

    /// Sends a frame and returns the next frame, which must answer it.
    pub async fn request(&mut self, frame: client_frame::Frame) -> anyhow::Result<proto::ServerFrame> {
        self.next_req += 1;
        let req = self.next_req;
        let text = client_frame_json(&proto::ClientFrame { req, frame: Some(frame) });
        self.ws.send(Message::text(text)).await?;
        let f = self.recv().await?;
        if f.req != req {
            bail!("expected the reply to {req}, got {f:?}");
        }
        Ok(f)
    }

    /// Subscribes to `filter` (no options).
    pub async fn subscribe_to(&mut self, filter: &str) -> anyhow::Result<()> {
        let f = self
            .request(client_frame::Frame::Subscribe(proto::Subscribe { filter: filter.into(), ..Default::default() }))
            .await?;
        match f.frame {
            Some(server_frame::Frame::Subscribed(_)) => Ok(()),
            other => bail!("subscribe failed: {other:?}"),
        }
    }

    /// The next server frame; a close frame is an error carrying its code.
    pub async fn recv(&mut self) -> anyhow::Result<proto::ServerFrame> {
        loop {
            let m =
                tokio::time::timeout(WAIT, self.ws.next()).await.map_err(|_| anyhow!("no frame within {WAIT:?}"))?;
            match m {
                Some(Ok(Message::Text(t))) => {
                    return proto::json::decode_server_frame(t.as_str())
                        .map_err(|e| anyhow!("bad JSON from server: {e}"));
                }
                Some(Ok(Message::Close(c))) => bail!("closed: {c:?}"),
                Some(Ok(Message::Binary(_))) => bail!("binary frame on the JSON subprotocol"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => bail!("websocket error: {e}"),
                None => bail!("connection ended"),
            }
        }
    }

    /// Reads until the close frame; returns its code.
    pub async fn closed_with(&mut self) -> anyhow::Result<u16> {
        loop {
            let m =
                tokio::time::timeout(WAIT, self.ws.next()).await.map_err(|_| anyhow!("not closed within {WAIT:?}"))?;
            match m {
                Some(Ok(Message::Close(Some(c)))) => return Ok(u16::from(c.code)),
                Some(Ok(Message::Close(None))) => return Ok(1005),
                Some(Ok(Message::Text(t))) => bail!("expected the close frame, got {t}"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => bail!("connection failed without a close frame: {e}"),
                None => bail!("connection ended without a close frame"),
            }
        }
    }
}

/// A subscriber on an unrelated channel that must keep being served while
/// other clients misbehave.
pub struct Bystander {
    client: WsClient,
}

/// The bystander's channel.
pub const BYSTANDER_CHANNEL: &str = "bystander/feed";

impl Bystander {
    /// Connects (protobuf codec) and subscribes to [`BYSTANDER_CHANNEL`].
    pub async fn join(gw: &TestGateway) -> anyhow::Result<Self> {
        let mut client = WsClient::connect(&gw.ws, Codec::Proto, "bystander").await?;
        client.subscribe_to(BYSTANDER_CHANNEL).await?;
        Ok(Bystander { client })
    }

    /// Publishes over REST and expects exactly that message as the
    /// bystander's next frame; then checks `/healthz`.
    pub async fn still_served(mut self, gw: &TestGateway) -> anyhow::Result<()> {
        let (status, body) = rest_publish(&gw.http, BYSTANDER_CHANNEL, "still here", &[]).await?;
        assert_eq!(status, 200, "REST publish after the bad input: {body}");
        let m = self.client.next_message().await.context("bystander message")?;
        assert_eq!((m.channel.as_str(), &m.payload[..]), (BYSTANDER_CHANNEL, &b"still here"[..]));
        assert_eq!(Some(m.serial), body["serial"].as_u64());
        assert_eq!(m.prev_serial + 1, m.serial);
        let ack = self.client.publish(BYSTANDER_CHANNEL, b"and again", "").await?;
        assert_eq!(ack.serial, m.serial + 1);
        let again = self.client.next_message().await?;
        assert_eq!((&again.payload[..], again.serial), (&b"and again"[..], ack.serial));
        let health = get_json(&format!("{}/healthz", gw.admin)).await?;
        assert_eq!(health, (200, serde_json::json!({"status": "ok"})));
        Ok(())
    }
}

/// The admin API's session list.
pub async fn admin_sessions(gw: &TestGateway) -> anyhow::Result<Vec<serde_json::Value>> {
    let (status, body) = get_json(&format!("{}/v1/sessions", gw.admin)).await?;
    assert_eq!(status, 200, "GET /v1/sessions: {body}");
    body["sessions"].as_array().cloned().context("sessions array")
}

/// A `u64` field of an admin session object.
pub fn field(session: &serde_json::Value, name: &str) -> u64 {
    session[name].as_u64().unwrap_or_else(|| panic!("session field {name} in {session}"))
}

/// The admin session of `client_id` (the first one, by id).
pub async fn admin_session(gw: &TestGateway, client_id: &str) -> anyhow::Result<serde_json::Value> {
    admin_sessions(gw)
        .await?
        .into_iter()
        .find(|s| s["client_id"] == client_id)
        .with_context(|| format!("no admin session for {client_id:?}"))
}

/// `/metrics` as text.
pub async fn metrics_text(gw: &TestGateway) -> anyhow::Result<String> {
    let resp = reqwest::get(format!("{}/metrics", gw.admin)).await?;
    assert_eq!(resp.status().as_u16(), 200);
    Ok(resp.text().await?)
}

/// The value of the sample `name{labels}` (labels exactly as rendered, e.g.
/// `protocol="ws"`), or `None` if the exposition has no such line.
pub fn metric(text: &str, name: &str, labels: &str) -> Option<f64> {
    let prefix = format!("{name}{{{labels}}} ");
    text.lines().find_map(|l| l.strip_prefix(prefix.as_str())).and_then(|v| v.trim().parse().ok())
}

/// Waits up to `within` for a connection to `addr` to be refused.
pub async fn refuses_connections(addr: SocketAddr, within: Duration) -> anyhow::Result<()> {
    switchboard_tests::eventually(within, "the port to refuse connections", || async {
        matches!(TcpStream::connect(addr).await, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
    })
    .await
}
