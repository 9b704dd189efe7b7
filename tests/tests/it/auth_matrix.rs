//! The auth matrix (issue #6), table-driven, with real clients on every
//! protocol: WebSocket (token in the `connect` frame and as `?token=`), SSE
//! (`?token=` and `Authorization: Bearer`), long polling, REST, MQTT 3.1.1
//! (rumqttc v4, token as password), MQTT 5 (rumqttc v5, token as password)
//! and MQTT 5 with Authentication Method `jwt` (raw packets, token as
//! Authentication Data).
//!
//! - every bad token (none, expired, not yet valid, wrong signature,
//!   `alg: none`, HS/RS confusion, unknown `kid`, no `exp`, no `kid` among
//!   several keys, not a JWT) gets
//!   each protocol's documented refusal, and a valid token of every
//!   algorithm (HS256, RS256, ES256 from a file, EdDSA from a JWKS file) is
//!   accepted everywhere;
//! - each operation (subscribe, publish, presence, history — in every form a
//!   protocol offers it) is allowed exactly where the caps grant every
//!   operation it needs: a channel missing one cap refuses just the actions
//!   needing it, `chat/+` grants neither `chat/a/b` nor `$presence/...` of
//!   other channels, filters are granted only when covered;
//! - reserved `$` names are refused even with a `#` cap;
//! - MQTT: the client id is the token's `sub` (or empty, then assigned).
//!
//! Refresh and expiry are in `auth.rs`. WebTransport repeats these tables
//! in its own tests.

use super::common_auth;
use super::common_mqtt;

use common_auth::Op::{History as H, Presence as Pr, Publish as P, Subscribe as S};
use common_auth::*;
use common_mqtt::{Raw, RawPacket, Ver, publish_packet};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use switchboard_proto::{self as proto, client_frame, server_frame};
use switchboard_tests::*;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// The subject of every token here.
const SUB: &str = "carol";
/// The subject of the MQTT 3.1.1 client next to `SUB`'s MQTT 5 client.
const SUB_311: &str = "carol-311";

/// How a client presents its token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// WebSocket `connect` frame.
    WsFrame,
    /// WebSocket `?token=` on the upgrade.
    WsQuery,
    /// SSE `?token=`.
    SseQuery,
    /// SSE `Authorization: Bearer`.
    SseBearer,
    /// Long poll, `Authorization: Bearer`.
    Poll,
    /// REST `Authorization: Bearer` (history read).
    Rest,
    /// MQTT 3.1.1 (rumqttc), password.
    Mqtt311,
    /// MQTT 5 (rumqttc), password.
    Mqtt5,
    /// MQTT 5, Authentication Method `jwt`, token as Authentication Data.
    Mqtt5Jwt,
}

const VIAS: [Via; 9] = [
    Via::WsFrame,
    Via::WsQuery,
    Via::SseQuery,
    Via::SseBearer,
    Via::Poll,
    Via::Rest,
    Via::Mqtt311,
    Via::Mqtt5,
    Via::Mqtt5Jwt,
];

/// The refusal docs/protocol.md documents for a bad token.
fn documented_refusal(via: Via) -> &'static str {
    match via {
        Via::WsFrame | Via::WsQuery => "error unauthorized, close 4001",
        Via::SseQuery | Via::SseBearer | Via::Poll | Via::Rest => "HTTP 401 unauthorized",
        Via::Mqtt311 => "CONNACK 0x04",
        Via::Mqtt5 | Via::Mqtt5Jwt => "CONNACK 0x86",
    }
}

/// What a connection attempt got.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// A session opened for `client_id`.
    Accepted(String),
    /// Refused, as described.
    Refused(String),
}

/// An HTTP answer as "HTTP STATUS CODE".
async fn http_refusal(resp: reqwest::Response) -> anyhow::Result<String> {
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    Ok(format!("HTTP {status} {}", body["error"]["code"].as_str().unwrap_or("?")))
}

/// The next WebSocket text frame, decoded.
async fn ws_frame(ws: &mut RawWs) -> anyhow::Result<proto::ServerFrame> {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await? {
            Some(Ok(Message::Text(t))) => return Ok(proto::json::decode_server_frame(t.as_str())?),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => anyhow::bail!("expected a frame, got {other:?}"),
        }
    }
}

/// Connected, or "error CODE, close CODE".
async fn ws_outcome(ws: &mut RawWs) -> anyhow::Result<Outcome> {
    let f = ws_frame(ws).await?;
    match f.frame {
        Some(server_frame::Frame::Connected(c)) => Ok(Outcome::Accepted(c.client_id)),
        Some(server_frame::Frame::Error(e)) => {
            let close = loop {
                match tokio::time::timeout(WAIT, ws.next()).await? {
                    Some(Ok(Message::Close(Some(c)))) => break u16::from(c.code),
                    Some(Ok(_)) => continue,
                    other => anyhow::bail!("no close frame: {other:?}"),
                }
            };
            Ok(Outcome::Refused(format!("error {}, close {close}", e.code().slug())))
        }
        other => anyhow::bail!("unexpected first frame {other:?}"),
    }
}

async fn ws_connect_frame(gw: &TestGateway, token: &str) -> anyhow::Result<Outcome> {
    let mut ws = raw_ws(&gw.ws, Some("switchboard.v1.json")).await?;
    let frame = json!({"type": "connect", "req": 1, "token": token, "client_id": "someone-else"});
    ws.send(Message::text(frame.to_string())).await?;
    ws_outcome(&mut ws).await
}

async fn ws_query(gw: &TestGateway, token: &str) -> anyhow::Result<Outcome> {
    if token.is_empty() {
        // No token at all: nothing to put in the query.
        return ws_connect_frame(gw, token).await;
    }
    let mut request = format!("{}/v1/ws?token={token}", gw.ws).into_client_request()?;
    request.headers_mut().insert("sec-websocket-protocol", "switchboard.v1.json".parse()?);
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await?;
    ws_outcome(&mut ws).await
}

fn with_bearer(req: reqwest::RequestBuilder, token: &str) -> reqwest::RequestBuilder {
    if token.is_empty() { req } else { req.bearer_auth(token) }
}

async fn sse(gw: &TestGateway, token: &str, bearer: bool) -> anyhow::Result<Outcome> {
    let http = reqwest::Client::new();
    let req = if bearer {
        with_bearer(http.get(format!("{}/v1/sse?channel=m/x", gw.http)), token)
    } else {
        http.get(format!("{}/v1/sse?channel=m/x&token={token}", gw.http))
    };
    let resp = tokio::time::timeout(WAIT, req.send()).await??;
    if resp.status() != 200 {
        return Ok(Outcome::Refused(http_refusal(resp).await?));
    }
    let mut events = eventsource_stream::Eventsource::eventsource(resp.bytes_stream());
    let ev = tokio::time::timeout(WAIT, events.next()).await?.ok_or_else(|| anyhow::anyhow!("no event"))??;
    anyhow::ensure!(ev.event == "connected", "first event {ev:?}");
    let c: Value = serde_json::from_str(&ev.data)?;
    Ok(Outcome::Accepted(c["client_id"].as_str().unwrap_or_default().into()))
}

async fn poll(gw: &TestGateway, token: &str) -> anyhow::Result<Outcome> {
    let req = with_bearer(reqwest::Client::new().get(format!("{}/v1/poll?channel=m/x&timeout=0", gw.http)), token);
    let resp = tokio::time::timeout(WAIT, req.send()).await??;
    if resp.status() != 200 {
        return Ok(Outcome::Refused(http_refusal(resp).await?));
    }
    // A poll names no client; a 200 is a session opened and closed.
    Ok(Outcome::Accepted(SUB.into()))
}

async fn rest(gw: &TestGateway, token: &str) -> anyhow::Result<Outcome> {
    let req = with_bearer(reqwest::Client::new().get(format!("{}/v1/channels/m/x/history", gw.http)), token);
    let resp = tokio::time::timeout(WAIT, req.send()).await??;
    if resp.status() != 200 {
        return Ok(Outcome::Refused(http_refusal(resp).await?));
    }
    Ok(Outcome::Accepted(SUB.into()))
}

async fn mqtt311(gw: &TestGateway, client_id: &str, token: &str) -> anyhow::Result<Outcome> {
    use rumqttc::{AsyncClient, ConnectionError, Event, MqttOptions, Packet};
    let mut opts = MqttOptions::new(client_id, gw.mqtt.ip().to_string(), gw.mqtt.port());
    if !token.is_empty() {
        opts.set_credentials("anything", token);
    }
    let (_client, mut events) = AsyncClient::new(opts, 10);
    match tokio::time::timeout(WAIT, events.poll()).await? {
        Ok(Event::Incoming(Packet::ConnAck(a))) if a.code == rumqttc::ConnectReturnCode::Success => {
            Ok(Outcome::Accepted(client_id.into()))
        }
        Err(ConnectionError::ConnectionRefused(code)) => Ok(Outcome::Refused(format!("CONNACK 0x{:02X}", code as u8))),
        other => anyhow::bail!("MQTT 3.1.1: unexpected {other:?}"),
    }
}

async fn mqtt5(gw: &TestGateway, client_id: &str, token: &str) -> anyhow::Result<Outcome> {
    use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as C;
    use rumqttc::v5::{AsyncClient, ConnectionError, Event, Incoming, MqttOptions};
    let mut opts = MqttOptions::new(client_id, gw.mqtt.ip().to_string(), gw.mqtt.port());
    opts.set_outgoing_inflight_upper_limit(16);
    if !token.is_empty() {
        opts.set_credentials("anything", token);
    }
    let (_client, mut events) = AsyncClient::new(opts, 10);
    match tokio::time::timeout(WAIT, events.poll()).await? {
        Ok(Event::Incoming(Incoming::ConnAck(a))) if a.code == C::Success => {
            let assigned = a.properties.and_then(|p| p.assigned_client_identifier);
            Ok(Outcome::Accepted(assigned.unwrap_or_else(|| client_id.into())))
        }
        Err(ConnectionError::ConnectionRefused(code)) => {
            let code = match code {
                C::BadUserNamePassword => 0x86,
                C::NotAuthorized => 0x87,
                C::ClientIdentifierNotValid => 0x85,
                other => anyhow::bail!("MQTT 5: unexpected refusal {other:?}"),
            };
            Ok(Outcome::Refused(format!("CONNACK 0x{code:02X}")))
        }
        other => anyhow::bail!("MQTT 5: unexpected {other:?}"),
    }
}

/// CONNECT with Authentication Method `jwt`, the token as data; returns the
/// outcome and, when accepted, the connection.
async fn mqtt5_jwt(gw: &TestGateway, client_id: &str, token: &str) -> anyhow::Result<(Outcome, Option<Raw>)> {
    let mut r = Raw::connect(gw.mqtt).await?;
    let data = (!token.is_empty()).then_some(token);
    r.send(&connect_with(5, client_id, 60, None, Some("jwt"), data)).await?;
    let p = r.packet().await?.ok_or_else(|| anyhow::anyhow!("closed instead of CONNACK"))?;
    match p.connack_code() {
        Some(0) => Ok((Outcome::Accepted(client_id.into()), Some(r))),
        Some(code) => {
            let rest = r.closed().await?;
            anyhow::ensure!(rest.packets.is_empty(), "after the refusal: {rest:?}");
            Ok((Outcome::Refused(format!("CONNACK 0x{code:02X}")), None))
        }
        None => anyhow::bail!("expected CONNACK, got {p:?}"),
    }
}

/// Presents `token` via `via` as client `SUB`.
async fn attempt(gw: &TestGateway, via: Via, token: &str) -> anyhow::Result<Outcome> {
    match via {
        Via::WsFrame => ws_connect_frame(gw, token).await,
        Via::WsQuery => ws_query(gw, token).await,
        Via::SseQuery => sse(gw, token, false).await,
        Via::SseBearer => sse(gw, token, true).await,
        Via::Poll => poll(gw, token).await,
        Via::Rest => rest(gw, token).await,
        Via::Mqtt311 => mqtt311(gw, SUB, token).await,
        Via::Mqtt5 => mqtt5(gw, SUB, token).await,
        Via::Mqtt5Jwt => Ok(mqtt5_jwt(gw, SUB, token).await?.0),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_token_is_refused_on_every_protocol() -> anyhow::Result<()> {
    let gw = gateway().await?;
    let caps = json!({"#": ["subscribe", "publish", "presence", "history"]});
    let mut wrong = Vec::new();
    for (case, token) in bad_tokens(SUB, &caps) {
        for via in VIAS {
            let got = attempt(&gw, via, &token).await?;
            let want = Outcome::Refused(documented_refusal(via).into());
            if got != want {
                wrong.push(format!("{case} via {via:?}: got {got:?}, want {want:?}"));
            }
        }
    }
    assert!(wrong.is_empty(), "refusals not as documented:\n{}", wrong.join("\n"));
    eventually(WAIT, "no session left open", || async { gw.sessions() == 0 }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_token_of_every_algorithm_is_accepted_on_every_protocol() -> anyhow::Result<()> {
    let gw = gateway().await?;
    let c = claims(SUB, 60, json!({"#": ["subscribe", "publish", "presence", "history"]}));
    let mut wrong = Vec::new();
    for (alg, token) in &every_algorithm(&c) {
        for via in VIAS {
            let got = attempt(&gw, via, token).await?;
            if got != Outcome::Accepted(SUB.into()) {
                wrong.push(format!("{alg} via {via:?}: {got:?}"));
            }
        }
    }
    assert!(wrong.is_empty(), "valid tokens refused:\n{}", wrong.join("\n"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_client_id_is_the_tokens_subject() -> anyhow::Result<()> {
    let gw = gateway().await?;
    let t = token("dev-9", 60, json!({"sensors/9/#": "publish"}));
    // The subject itself, or empty (MQTT 5 assigns the subject).
    assert_eq!(mqtt311(&gw, "dev-9", &t).await?, Outcome::Accepted("dev-9".into()));
    assert_eq!(mqtt5(&gw, "dev-9", &t).await?, Outcome::Accepted("dev-9".into()));
    assert_eq!(mqtt5(&gw, "", &t).await?, Outcome::Accepted("dev-9".into()), "assigned in CONNACK");
    // Another id would claim another client's persistent session: refused.
    assert_eq!(mqtt311(&gw, "victim", &t).await?, Outcome::Refused("CONNACK 0x02".into()));
    assert_eq!(mqtt5(&gw, "victim", &t).await?, Outcome::Refused("CONNACK 0x85".into()));
    eventually(WAIT, "no session left open", || async { gw.sessions() == 0 }).await
}

// ---------------------------------------------------------------------------
// Caps.

/// One way to exercise caps on a channel, and the operations it needs.
#[derive(Debug, Clone, Copy)]
enum Action {
    WsSubscribe,
    WsPublish,
    WsPresenceEnter,
    WsPresenceGet,
    /// Subscribe with `presence: true`.
    WsPresenceEvents,
    /// Subscribe to `$presence/<channel>`.
    WsPresenceChannel,
    WsHistory,
    /// Subscribe with `rewind`.
    WsRewind,
    SseSubscribe,
    SsePresenceEvents,
    SseRewind,
    /// REST publish with the stream's `X-Connection-Id`.
    SseUplinkPublish,
    /// REST presence enter with the stream's `X-Connection-Id`.
    SseUplinkPresence,
    PollSubscribe,
    PollPresenceEvents,
    PollRewind,
    RestPublish,
    RestHistory,
    RestPresenceGet,
    Mqtt5Subscribe,
    Mqtt5Publish,
    /// PUBLISH to `$presence/<channel>`.
    Mqtt5PresenceEnter,
    /// SUBSCRIBE to `$presence/<channel>`.
    Mqtt5PresenceChannel,
    /// SUBSCRIBE with user property `rewind`.
    Mqtt5Rewind,
    Mqtt311Subscribe,
    Mqtt311PresenceChannel,
}

impl Action {
    const ALL: [Action; 26] = [
        Action::WsSubscribe,
        Action::WsPublish,
        Action::WsPresenceEnter,
        Action::WsPresenceGet,
        Action::WsPresenceEvents,
        Action::WsPresenceChannel,
        Action::WsHistory,
        Action::WsRewind,
        Action::SseSubscribe,
        Action::SsePresenceEvents,
        Action::SseRewind,
        Action::SseUplinkPublish,
        Action::SseUplinkPresence,
        Action::PollSubscribe,
        Action::PollPresenceEvents,
        Action::PollRewind,
        Action::RestPublish,
        Action::RestHistory,
        Action::RestPresenceGet,
        Action::Mqtt5Subscribe,
        Action::Mqtt5Publish,
        Action::Mqtt5PresenceEnter,
        Action::Mqtt5PresenceChannel,
        Action::Mqtt5Rewind,
        Action::Mqtt311Subscribe,
        Action::Mqtt311PresenceChannel,
    ];

    fn needs(self) -> &'static [Op] {
        use Action::*;
        match self {
            WsSubscribe | SseSubscribe | PollSubscribe | Mqtt5Subscribe | Mqtt311Subscribe => &[S],
            WsPublish | SseUplinkPublish | RestPublish | Mqtt5Publish => &[P],
            WsPresenceEnter
            | WsPresenceGet
            | WsPresenceChannel
            | SseUplinkPresence
            | RestPresenceGet
            | Mqtt5PresenceEnter
            | Mqtt5PresenceChannel
            | Mqtt311PresenceChannel => &[Pr],
            WsPresenceEvents | SsePresenceEvents | PollPresenceEvents => &[S, Pr],
            WsHistory | RestHistory => &[H],
            WsRewind | SseRewind | PollRewind | Mqtt5Rewind => &[S, H],
        }
    }

    /// The documented refusal of a missing cap.
    fn refusal(self) -> &'static str {
        use Action::*;
        match self {
            WsSubscribe | WsPublish | WsPresenceEnter | WsPresenceGet | WsPresenceEvents | WsPresenceChannel
            | WsHistory | WsRewind => "permission_denied",
            SseSubscribe | SsePresenceEvents | SseRewind | SseUplinkPublish | SseUplinkPresence | PollSubscribe
            | PollPresenceEvents | PollRewind | RestPublish | RestHistory | RestPresenceGet => {
                "HTTP 403 permission_denied"
            }
            Mqtt5Subscribe | Mqtt5Publish | Mqtt5PresenceEnter | Mqtt5PresenceChannel | Mqtt5Rewind => "0x87",
            Mqtt311Subscribe | Mqtt311PresenceChannel => "0x80",
        }
    }
}

/// The clients of the caps matrix, all with the matrix token.
struct Clients {
    token: String,
    ws: WsClient,
    /// An SSE stream whose connection id the uplink actions use.
    _uplink: common_sse_stream::Stream,
    uplink_id: String,
    mqtt5: Raw,
    mqtt311: Raw,
    pkid: u16,
}

mod common_sse_stream {
    //! A held-open SSE stream (the uplink actions need its connection id).
    use futures_util::StreamExt;

    /// The event stream, kept alive.
    pub type Stream = std::pin::Pin<
        Box<
            dyn futures_util::Stream<
                    Item = Result<eventsource_stream::Event, eventsource_stream::EventStreamError<reqwest::Error>>,
                > + Send,
        >,
    >;

    /// Opens `/v1/sse?{query}`; returns the stream and its connection id.
    pub async fn open(http: &str, query: &str) -> anyhow::Result<(Stream, String)> {
        let resp = reqwest::get(format!("{http}/v1/sse?{query}")).await?;
        anyhow::ensure!(resp.status() == 200, "SSE {query}: {}", resp.status());
        let mut events: Stream = Box::pin(eventsource_stream::Eventsource::eventsource(resp.bytes_stream()));
        let ev = tokio::time::timeout(switchboard_tests::WAIT, events.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("no connected event"))??;
        let v: serde_json::Value = serde_json::from_str(&ev.data)?;
        let id = v["connection_id"].as_str().unwrap_or_default().to_string();
        Ok((events, id))
    }
}

/// The next packet that is not a PUBLISH (deliveries of the matrix's own
/// publishes arrive in between; they are QoS 0 and need no ack).
async fn next_reply(r: &mut Raw) -> anyhow::Result<RawPacket> {
    loop {
        let p = r.packet().await?.ok_or_else(|| anyhow::anyhow!("MQTT connection closed"))?;
        if p.kind() != 3 {
            return Ok(p);
        }
    }
}

/// A WS reply: `None` if it succeeded, else its error code.
fn ws_refusal(f: proto::ServerFrame) -> Option<String> {
    match f.frame {
        Some(server_frame::Frame::Error(e)) => Some(e.code().slug().to_string()),
        _ => None,
    }
}

/// An HTTP answer: `None` for 200, else "HTTP STATUS CODE".
async fn http_result(req: reqwest::RequestBuilder) -> anyhow::Result<Option<String>> {
    let resp = tokio::time::timeout(WAIT, req.send()).await??;
    if resp.status() == 200 {
        return Ok(None);
    }
    Ok(Some(http_refusal(resp).await?))
}

/// An SSE or poll request: `None` when the stream opens (200).
async fn stream_result(gw: &TestGateway, path: &str, query: &str, token: &str) -> anyhow::Result<Option<String>> {
    let url = format!("{}/v1/{path}?{query}&token={token}", gw.http);
    http_result(reqwest::Client::new().get(url)).await
}

impl Clients {
    /// Connects every client with a token for `caps` (the MQTT 3.1.1 one as
    /// another client: one MQTT client id, one connection).
    async fn open(gw: &TestGateway, caps: &Value) -> anyhow::Result<Self> {
        let token = &token(SUB, 300, caps.clone());
        let ws = WsClient::connect_with_token(&gw.ws, Codec::Json, token).await?;
        let (uplink, uplink_id) = common_sse_stream::open(&gw.http, &format!("channel=chat/a&token={token}")).await?;
        let (outcome, mqtt5) = mqtt5_jwt(gw, SUB, token).await?;
        anyhow::ensure!(outcome == Outcome::Accepted(SUB.into()), "MQTT 5: {outcome:?}");
        let mut mqtt311 = Raw::connect(gw.mqtt).await?;
        let token311 = common_auth::token(SUB_311, 300, caps.clone());
        mqtt311.send(&connect_with(4, SUB_311, 60, Some(&token311), None, None)).await?;
        let p = mqtt311.packet().await?.ok_or_else(|| anyhow::anyhow!("MQTT 3.1.1 closed"))?;
        anyhow::ensure!(p.connack_code() == Some(0), "MQTT 3.1.1: {p:?}");
        Ok(Clients {
            token: token.into(),
            ws,
            _uplink: uplink,
            uplink_id,
            mqtt5: mqtt5.ok_or_else(|| anyhow::anyhow!("no MQTT 5 connection"))?,
            mqtt311,
            pkid: 0,
        })
    }

    fn pkid(&mut self) -> u16 {
        self.pkid += 1;
        self.pkid
    }

    async fn mqtt_subscribe(
        &mut self,
        level: u8,
        filter: &str,
        props: &[(&str, &str)],
    ) -> anyhow::Result<Option<String>> {
        let pkid = self.pkid();
        let r = if level == 5 { &mut self.mqtt5 } else { &mut self.mqtt311 };
        r.send(&subscribe_with(level, pkid, filter, 0, props)).await?;
        let p = next_reply(r).await?;
        let codes = suback_codes(&p, level).ok_or_else(|| anyhow::anyhow!("expected SUBACK, got {p:?}"))?;
        Ok(match codes.as_slice() {
            [0] => None,
            [c] => Some(format!("0x{c:02X}")),
            other => anyhow::bail!("SUBACK codes {other:?}"),
        })
    }

    async fn mqtt5_publish(&mut self, topic: &str) -> anyhow::Result<Option<String>> {
        let pkid = self.pkid();
        self.mqtt5.send(&publish_packet(Ver::V5, topic.as_bytes(), 1, pkid, b"{}", &[])).await?;
        let p = next_reply(&mut self.mqtt5).await?;
        let r = puback_reason(&p).ok_or_else(|| anyhow::anyhow!("expected PUBACK, got {p:?}"))?;
        Ok((r != 0).then(|| format!("0x{r:02X}")))
    }

    /// Runs `action` on `channel`: `None` if allowed, else the refusal.
    async fn run(&mut self, gw: &TestGateway, action: Action, channel: &str) -> anyhow::Result<Option<String>> {
        use Action::*;
        let t = self.token.clone();
        let http = reqwest::Client::new();
        let sub = |filter: &str| proto::Subscribe { filter: filter.into(), ..Default::default() };
        Ok(match action {
            WsSubscribe => ws_refusal(self.ws.request(client_frame::Frame::Subscribe(sub(channel))).await?),
            WsPublish => ws_refusal(
                self.ws
                    .publish_frame(proto::Publish {
                        channel: channel.into(),
                        payload: "{}".into(),
                        ..Default::default()
                    })
                    .await?,
            ),
            WsPresenceEnter => ws_refusal(
                self.ws
                    .request(client_frame::Frame::PresenceEnter(proto::PresenceEnter {
                        channel: channel.into(),
                        data: "{}".into(),
                    }))
                    .await?,
            ),
            WsPresenceGet => ws_refusal(
                self.ws
                    .request(client_frame::Frame::PresenceGet(proto::PresenceGet { channel: channel.into() }))
                    .await?,
            ),
            WsPresenceEvents => ws_refusal(
                self.ws
                    .request(client_frame::Frame::Subscribe(proto::Subscribe { presence: true, ..sub(channel) }))
                    .await?,
            ),
            WsPresenceChannel => {
                ws_refusal(self.ws.request(client_frame::Frame::Subscribe(sub(&format!("$presence/{channel}")))).await?)
            }
            WsHistory => ws_refusal(
                self.ws
                    .request(client_frame::Frame::History(proto::History {
                        channel: channel.into(),
                        ..Default::default()
                    }))
                    .await?,
            ),
            WsRewind => {
                let rewind = Some(proto::Rewind { count: 5, duration_ms: 0 });
                ws_refusal(
                    self.ws
                        .request(client_frame::Frame::Subscribe(proto::Subscribe { rewind, ..sub(channel) }))
                        .await?,
                )
            }
            SseSubscribe => stream_result(gw, "sse", &format!("channel={channel}"), &t).await?,
            SsePresenceEvents => stream_result(gw, "sse", &format!("channel={channel}&presence=1"), &t).await?,
            SseRewind => stream_result(gw, "sse", &format!("channel={channel}&rewind=5"), &t).await?,
            SseUplinkPublish => {
                let req = http
                    .post(format!("{}/v1/channels/{channel}/messages", gw.http))
                    .header("x-connection-id", &self.uplink_id)
                    .bearer_auth(&t)
                    .body("{}");
                http_result(req).await?
            }
            SseUplinkPresence => {
                let req = http
                    .post(format!("{}/v1/channels/{channel}/presence", gw.http))
                    .header("x-connection-id", &self.uplink_id)
                    .bearer_auth(&t)
                    .body("{}");
                http_result(req).await?
            }
            PollSubscribe => stream_result(gw, "poll", &format!("channel={channel}&timeout=0"), &t).await?,
            PollPresenceEvents => {
                stream_result(gw, "poll", &format!("channel={channel}&presence=1&timeout=0"), &t).await?
            }
            PollRewind => stream_result(gw, "poll", &format!("channel={channel}&rewind=5&timeout=0"), &t).await?,
            RestPublish => {
                http_result(http.post(format!("{}/v1/channels/{channel}/messages", gw.http)).bearer_auth(&t).body("{}"))
                    .await?
            }
            RestHistory => {
                http_result(http.get(format!("{}/v1/channels/{channel}/history", gw.http)).bearer_auth(&t)).await?
            }
            RestPresenceGet => {
                http_result(http.get(format!("{}/v1/channels/{channel}/presence", gw.http)).bearer_auth(&t)).await?
            }
            Mqtt5Subscribe => self.mqtt_subscribe(5, channel, &[]).await?,
            Mqtt5Publish => self.mqtt5_publish(channel).await?,
            Mqtt5PresenceEnter => self.mqtt5_publish(&format!("$presence/{channel}")).await?,
            Mqtt5PresenceChannel => self.mqtt_subscribe(5, &format!("$presence/{channel}"), &[]).await?,
            Mqtt5Rewind => self.mqtt_subscribe(5, channel, &[("rewind", "5")]).await?,
            Mqtt311Subscribe => self.mqtt_subscribe(4, channel, &[]).await?,
            Mqtt311PresenceChannel => self.mqtt_subscribe(4, &format!("$presence/{channel}"), &[]).await?,
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_action_needs_exactly_its_caps_on_every_protocol() -> anyhow::Result<()> {
    let gw = gateway().await?;
    let mut clients = Clients::open(&gw, &matrix_caps()).await?;
    let mut wrong = Vec::new();
    let mut refused = 0;
    for channel in CHANNELS {
        let have = granted(channel);
        for action in Action::ALL {
            let allowed = action.needs().iter().all(|op| have.contains(op));
            let want = (!allowed).then(|| action.refusal().to_string());
            let got = clients.run(&gw, action, channel).await?;
            refused += usize::from(got.is_some());
            if got != want {
                wrong.push(format!("{action:?} on {channel}: got {got:?}, want {want:?}"));
            }
        }
    }
    assert!(wrong.is_empty(), "caps decided wrongly:\n{}", wrong.join("\n"));
    // 26 actions on each of chat/a/b and other; 12, 4, 11 and 6 need the
    // cap missing on no-sub/x, no-pub/x, no-pres/x and no-hist/x.
    assert_eq!(refused, 26 * 2 + 12 + 4 + 11 + 6, "every cell ran");
    // Every refusal left its connection open.
    clients.ws.request(client_frame::Frame::Ping(proto::Ping {})).await?;
    assert!(clients.mqtt_subscribe(5, "chat/b", &[]).await?.is_none());
    assert!(clients.mqtt_subscribe(4, "chat/b", &[]).await?.is_none());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_are_granted_only_when_the_cap_covers_them() -> anyhow::Result<()> {
    let gw = gateway().await?;
    let mut c = Clients::open(&gw, &json!({"chat/+": "subscribe", "sensors/#": "subscribe"})).await?;
    let token = c.token.clone();
    // (filter, granted)
    let cases = [
        ("chat/+", true),
        ("chat/#", false),
        ("chat/+/b", false),
        ("#", false),
        ("+/a", false),
        ("sensors/#", true),
        ("sensors/+/t", true),
        ("sensors", true),
        ("sensorsx", false),
        ("$share/g/chat/+", true),
        ("$share/g/chat/#", false),
    ];
    let mut wrong = Vec::new();
    for (filter, ok) in cases {
        let q = common_sse_query(filter);
        let results = [
            ("ws", c.run(&gw, Action::WsSubscribe, filter).await?, "permission_denied"),
            ("sse", stream_result(&gw, "sse", &format!("channel={q}"), &token).await?, "HTTP 403 permission_denied"),
            (
                "poll",
                stream_result(&gw, "poll", &format!("channel={q}&timeout=0"), &token).await?,
                "HTTP 403 permission_denied",
            ),
            ("mqtt5", c.mqtt_subscribe(5, filter, &[]).await?, "0x87"),
            ("mqtt311", c.mqtt_subscribe(4, filter, &[]).await?, "0x80"),
        ];
        for (proto, got, refusal) in results {
            // Shared subscriptions are MQTT's; SSE and polling take them as
            // any other filter, with the same decision.
            let want = (!ok).then(|| refusal.to_string());
            if got != want {
                wrong.push(format!("{proto} {filter}: got {got:?}, want {want:?}"));
            }
        }
    }
    assert!(wrong.is_empty(), "filter grants:\n{}", wrong.join("\n"));
    Ok(())
}

/// Percent-encodes a filter for a query (`+`, `#`, `$`, `/`).
fn common_sse_query(filter: &str) -> String {
    filter
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_channels_are_refused_even_with_every_cap() -> anyhow::Result<()> {
    let gw = gateway().await?;
    let mut c = Clients::open(&gw, &json!({"#": ["subscribe", "publish", "presence", "history"]})).await?;
    let token = c.token.clone();
    let http = reqwest::Client::new();
    let mut got = Vec::new();
    got.push(("ws publish", c.run(&gw, Action::WsPublish, "$sys/x").await?));
    got.push(("ws subscribe", c.run(&gw, Action::WsSubscribe, "$sys/#").await?));
    got.push(("ws presence", c.run(&gw, Action::WsPresenceEnter, "$sys").await?));
    got.push(("sse", stream_result(&gw, "sse", "channel=%24sys%2Fx", &token).await?));
    got.push(("poll", stream_result(&gw, "poll", "channel=%24sys%2Fx&timeout=0", &token).await?));
    let req = http.post(format!("{}/v1/channels/%24sys%2Fx/messages", gw.http)).bearer_auth(&token).body("x");
    got.push(("rest publish", http_result(req).await?));
    let req = http.post(format!("{}/v1/channels/%24sys%2Fx/messages", gw.http)).header("x-api-key", API_KEY).body("x");
    got.push(("rest publish, API key", http_result(req).await?));
    got.push(("mqtt5 subscribe", c.mqtt_subscribe(5, "$sys/#", &[]).await?));
    got.push(("mqtt311 subscribe", c.mqtt_subscribe(4, "$sys/#", &[]).await?));
    let want = [
        ("ws publish", Some("reserved_channel")),
        ("ws subscribe", Some("reserved_channel")),
        ("ws presence", Some("reserved_channel")),
        ("sse", Some("HTTP 403 reserved_channel")),
        ("poll", Some("HTTP 403 reserved_channel")),
        ("rest publish", Some("HTTP 403 reserved_channel")),
        ("rest publish, API key", Some("HTTP 403 reserved_channel")),
        ("mqtt5 subscribe", Some("0x87")),
        ("mqtt311 subscribe", Some("0x80")),
    ];
    let want: Vec<(&str, Option<String>)> = want.iter().map(|(k, v)| (*k, v.map(str::to_string))).collect();
    assert_eq!(got, want);
    // A PUBLISH to a reserved topic is a bad topic: DISCONNECT 0x90 (3.1.1: close).
    c.mqtt5.send(&publish_packet(Ver::V5, b"$sys/x", 1, 99, b"x", &[])).await?;
    assert_eq!(c.mqtt5.closed().await?.only_disconnect(), Some(0x90));
    c.mqtt311.send(&publish_packet(Ver::V4, b"$sys/x", 1, 99, b"x", &[])).await?;
    assert_eq!(c.mqtt311.closed().await?.packets, []);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_311_has_no_negative_puback_so_a_refused_publish_closes() -> anyhow::Result<()> {
    let gw = gateway().await?;
    let token = token(SUB, 300, json!({"chat/+": "publish"}));
    let mut r = Raw::connect(gw.mqtt).await?;
    r.send(&connect_with(4, SUB, 60, Some(&token), None, None)).await?;
    assert_eq!(r.packet().await?.and_then(|p| p.connack_code()), Some(0));
    r.send(&publish_packet(Ver::V4, b"chat/a", 1, 1, b"ok", &[])).await?;
    assert_eq!(r.packet().await?.and_then(|p| puback_reason(&p)), Some(0));
    for (topic, case) in [("chat/a/b", "not covered by chat/+"), ("$presence/chat/a", "no presence cap")] {
        let mut r = Raw::connect(gw.mqtt).await?;
        r.send(&connect_with(4, SUB, 60, Some(&token), None, None)).await?;
        assert_eq!(r.packet().await?.and_then(|p| p.connack_code()), Some(0));
        r.send(&publish_packet(Ver::V4, topic.as_bytes(), 1, 1, b"no", &[])).await?;
        assert_eq!(r.closed().await?.packets, [], "{case}: closed without a PUBACK");
    }
    Ok(())
}
