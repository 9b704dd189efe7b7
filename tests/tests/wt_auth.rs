//! The auth matrix of issue #6 on WebTransport, with `common_auth`'s tables
//! (the cases `auth_matrix.rs` runs on every other protocol) and the
//! gateway's own wtransport client:
//!
//! - every bad token is refused with HTTP 403 before the accept when it
//!   travels on the session request (`?token=`, `Authorization: Bearer`; no
//!   token at all is 403 `missing_token`), and with an `unauthorized` error,
//!   `disconnect` 4001 and close 4001 when it travels in the `connect` frame
//!   (`?auth=connect`); a valid token of every algorithm opens a session
//!   each way, as its `sub`;
//! - each operation (subscribe, publish on the control stream and as a
//!   datagram, presence enter / members / events / `$presence/<channel>`,
//!   history, rewind) is allowed on each matrix channel exactly where the
//!   caps grant every operation it needs; filters are granted only when a
//!   cap covers them; reserved `$` names are refused whatever the caps;
//! - `refresh` narrows, widens and extends the session in place, a refused
//!   refresh keeps the session's rights, and expiry without a refresh ends
//!   the session with `disconnect` 4006 and close 4006.
//!
//! wtransport's client reports every refused session request as
//! `SessionRejected`, without its status, so [`session_status`] reads the
//! status with a minimal HTTP/3 client (quinn, and wtransport's own HTTP/3
//! frames and QPACK headers).

#[allow(dead_code)] // each test binary uses part of it
mod common_auth;
#[allow(dead_code)]
mod common_mqtt;

use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use bytes::BytesMut;
use common_auth::Op::{History as H, Presence as Pr, Publish as P, Subscribe as S};
use common_auth::*;
use prost::Message as _;
use serde_json::json;
use switchboard::tooling::client_wt::{CertCheck, FrameReader, WtClient, WtOptions, open_session};
use switchboard_proto::{self as proto, ErrorCode, client_frame, server_frame};
use switchboard_protocols::wt::codec;
use switchboard_tests::*;
use tokio::time::Instant;

/// The subject of the matrix tokens.
const SUB: &str = "carol";

/// A token-auth gateway (one key per algorithm) with the QUIC listener.
async fn wt_gateway() -> anyhow::Result<TestGateway> {
    gateway_with(with_quic).await
}

/// How a client presents its token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// `?token=` on the session request.
    Query,
    /// `Authorization: Bearer` on the session request.
    Bearer,
    /// `?auth=connect`, then the `connect` frame's `token`.
    ConnectFrame,
}

const VIAS: [Via; 3] = [Via::Query, Via::Bearer, Via::ConnectFrame];

/// The refusal docs/protocol.md documents for a bad token.
fn documented_refusal(via: Via) -> &'static str {
    match via {
        Via::Query | Via::Bearer => "HTTP 403",
        Via::ConnectFrame => "error unauthorized, disconnect 4001, close 4001",
    }
}

/// The session request's path (with query) and headers for `token`; no
/// token leaves both bare.
fn request_of(via: Via, token: &str) -> (String, Vec<(String, String)>) {
    match via {
        Via::Query if !token.is_empty() => (format!("/v1/wt?token={token}"), Vec::new()),
        Via::Bearer if !token.is_empty() => {
            ("/v1/wt".into(), vec![("authorization".to_string(), format!("Bearer {token}"))])
        }
        Via::Query | Via::Bearer => ("/v1/wt".into(), Vec::new()),
        Via::ConnectFrame => ("/v1/wt?auth=connect".into(), Vec::new()),
    }
}

/// Client options presenting `token` via `via` (a `connect` frame also
/// asks for another client id, which the token's `sub` overrides).
fn options(gw: &TestGateway, via: Via, token: &str) -> anyhow::Result<WtOptions> {
    let base = gw.wt_options()?;
    let (path, headers) = request_of(via, token);
    let url = format!("{}{path}", base.url);
    Ok(match via {
        Via::Query | Via::Bearer => WtOptions { url, headers, query_auth: true, ..base },
        Via::ConnectFrame => {
            WtOptions { url, token: token.into(), client_id: "someone-else".into(), query_auth: false, ..base }
        }
    })
}

/// A connected client presenting `token` via `via`.
async fn client(gw: &TestGateway, via: Via, token: &str) -> anyhow::Result<WtClient> {
    WtClient::connect(&options(gw, via, token)?).await.with_context(|| format!("connect via {via:?}"))
}

/// The HTTP status the gateway answers a session request (an extended
/// CONNECT of `path` with `headers`) with. wtransport's client turns every
/// status but 2xx into `SessionRejected`, so this speaks just enough
/// HTTP/3 by hand: the control stream with a WebTransport client's
/// SETTINGS, then one HEADERS frame on a request stream, and the HEADERS
/// of the answer.
async fn session_status(gw: &TestGateway, path: &str, headers: &[(String, String)]) -> anyhow::Result<u16> {
    use wtransport::proto::frame::{Frame, FrameKind};
    use wtransport::proto::headers::Headers;
    use wtransport::proto::session::SessionRequest;
    use wtransport::proto::settings::Settings;
    use wtransport::proto::stream_header::StreamHeader;
    use wtransport::{VarInt, quinn};

    let h3 = |what: &str, e: &dyn std::fmt::Debug| anyhow!("HTTP/3 {what}: {e:?}");
    let addr = gw.gateway.quic_addr.context("no QUIC listener")?;
    let CertCheck::Hash(hash) = gw.wt_options()?.cert else { bail!("the test gateway's certificate has no hash") };
    // wtransport's client TLS (ALPN h3, the certificate checked by its hash).
    let tls = wtransport::ClientConfig::builder()
        .with_bind_default()
        .with_server_certificate_hashes([wtransport::tls::Sha256Digest::new(hash)])
        .build();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    let connecting = endpoint.connect_with(tls.quic_config().clone(), addr, "127.0.0.1")?;
    let conn = tokio::time::timeout(WAIT, connecting).await.context("QUIC handshake timed out")??;

    let mut control = Vec::new();
    StreamHeader::new_control().write(&mut control).map_err(|e| h3("stream header", &e))?;
    let settings = Settings::builder()
        .qpack_max_table_capacity(VarInt::from_u32(0))
        .qpack_blocked_streams(VarInt::from_u32(0))
        .enable_connect_protocol()
        .enable_webtransport()
        .enable_h3_datagrams()
        .webtransport_max_sessions(VarInt::from_u32(1))
        .build();
    settings.generate_frame().write(&mut control).map_err(|e| h3("settings", &e))?;
    // Kept open to the end: finishing the control stream is an HTTP/3 error.
    let mut control_stream = conn.open_uni().await?;
    control_stream.write_all(&control).await?;

    let mut request =
        SessionRequest::new(format!("https://127.0.0.1:{}{path}", addr.port())).map_err(|e| h3("request URL", &e))?;
    for (k, v) in headers {
        request.insert(k.as_str(), v.as_str()).map_err(|e| h3("header", &e))?;
    }
    let mut head = Vec::new();
    request.headers().generate_frame().write(&mut head).map_err(|e| h3("headers", &e))?;
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&head).await?;

    let mut answer = Vec::new();
    let status = loop {
        let chunk = tokio::time::timeout(WAIT, recv.read_chunk(4096, true))
            .await
            .context("no answer to the session request")??
            .context("the request stream ended without an answer")?;
        answer.extend_from_slice(&chunk.bytes);
        let mut reader = answer.as_slice();
        match Frame::read(&mut reader).map_err(|e| h3("answer", &e))? {
            None => continue,
            Some(frame) if matches!(frame.kind(), FrameKind::Headers) => {
                let headers = Headers::with_frame(&frame).map_err(|e| h3("QPACK", &e))?;
                break headers.get(":status").context("an answer without :status")?.parse::<u16>()?;
            }
            Some(frame) => bail!("expected HEADERS, got {:?}", frame.kind()),
        }
    };
    conn.close(quinn::VarInt::from_u32(0), b"done");
    drop(control_stream);
    Ok(status)
}

/// `frame` as one length-delimited control frame.
fn framed(frame: &proto::ClientFrame) -> Vec<u8> {
    let mut out = BytesMut::new();
    codec::put_frame(&mut out, &frame.encode_to_vec());
    out.to_vec()
}

/// What a session attempt got.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// A session opened for `client_id`.
    Accepted(String),
    /// Refused, as described.
    Refused(String),
}

/// A session request carrying `token`: "HTTP STATUS" when refused before
/// the accept (and wtransport's client rejected too), else the session.
async fn request_outcome(gw: &TestGateway, via: Via, token: &str) -> anyhow::Result<Outcome> {
    let (path, headers) = request_of(via, token);
    let status = session_status(gw, &path, &headers).await?;
    let opts = options(gw, via, token)?;
    if status != 200 {
        let err = open_session(&opts).await.err().map(|e| e.to_string()).unwrap_or_default();
        anyhow::ensure!(err.contains("rejected"), "status {status}, but wtransport's client got {err:?}");
        return Ok(Outcome::Refused(format!("HTTP {status}")));
    }
    let c = WtClient::connect(&opts).await?;
    c.close();
    Ok(Outcome::Accepted(c.connected.client_id.clone()))
}

/// `?auth=connect`, then a `connect` frame with `token` (asking for
/// another client id): the session, or "error CODE, disconnect CODE, close
/// CODE" as the control stream and the QUIC close say.
async fn connect_frame_outcome(gw: &TestGateway, token: &str) -> anyhow::Result<Outcome> {
    let (_endpoint, conn) = open_session(&options(gw, Via::ConnectFrame, token)?).await?;
    let (mut send, recv) = conn.open_bi().await?.await?;
    let mut control = FrameReader::new(recv);
    let connect = proto::Connect { token: token.into(), client_id: "someone-else".into() };
    send.write_all(&framed(&proto::ClientFrame { req: 1, frame: Some(client_frame::Frame::Connect(connect)) })).await?;
    let first = wt_next(&mut control).await?;
    match first.frame {
        Some(server_frame::Frame::Connected(c)) => {
            conn.close(wtransport::VarInt::from_u32(0), b"bye");
            Ok(Outcome::Accepted(c.client_id))
        }
        Some(server_frame::Frame::Error(e)) => {
            let next = wt_next(&mut control).await?;
            let Some(server_frame::Frame::Disconnect(d)) = next.frame else {
                bail!("expected disconnect, got {next:?}")
            };
            let (code, _) = wt_closed(&conn).await?;
            Ok(Outcome::Refused(format!("error {}, disconnect {}, close {code}", e.code().slug(), d.code)))
        }
        other => bail!("unexpected first frame {other:?}"),
    }
}

async fn attempt(gw: &TestGateway, via: Via, token: &str) -> anyhow::Result<Outcome> {
    match via {
        Via::Query | Via::Bearer => request_outcome(gw, via, token).await,
        Via::ConnectFrame => connect_frame_outcome(gw, token).await,
    }
}

/// `switchboard_connections_refused_total{listener="quic",reason}`.
async fn refused_count(gw: &TestGateway, reason: &str) -> anyhow::Result<f64> {
    let text = reqwest::get(format!("{}/metrics", gw.admin)).await?.text().await?;
    let prefix = format!("switchboard_connections_refused_total{{listener=\"quic\",reason=\"{reason}\"}} ");
    Ok(text.lines().find_map(|l| l.strip_prefix(prefix.as_str())).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_token_is_refused_as_documented() -> anyhow::Result<()> {
    let gw = wt_gateway().await?;
    // The statuses are read as sent: a wrong path is 404.
    assert_eq!(session_status(&gw, "/v1/ws", &[]).await?, 404);
    let caps = json!({"#": ["subscribe", "publish", "presence", "history"]});
    let mut wrong = Vec::new();
    for (case, token) in bad_tokens(SUB, &caps) {
        for via in VIAS {
            // On the request, each attempt is refused twice (by hand and
            // with wtransport's client), counted with its reason.
            let reason = if token.is_empty() { "missing_token" } else { "unauthorized" };
            let before = refused_count(&gw, reason).await?;
            let got = attempt(&gw, via, &token).await?;
            let want = Outcome::Refused(documented_refusal(via).into());
            if got != want {
                wrong.push(format!("{case} via {via:?}: got {got:?}, want {want:?}"));
            }
            let counted = refused_count(&gw, reason).await? - before;
            let want_counted = if via == Via::ConnectFrame { 0.0 } else { 2.0 };
            if counted != want_counted {
                wrong.push(format!("{case} via {via:?}: {counted} refusals counted as {reason}"));
            }
        }
    }
    assert!(wrong.is_empty(), "refusals not as documented:\n{}", wrong.join("\n"));
    eventually(WAIT, "no session left open", || async { gw.sessions() == 0 }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_token_of_every_algorithm_is_accepted_every_way() -> anyhow::Result<()> {
    let gw = wt_gateway().await?;
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
    eventually(WAIT, "every session to end", || async { gw.sessions() == 0 }).await
}

// ---------------------------------------------------------------------------
// Caps.

/// One way to exercise caps on a channel over WebTransport.
#[derive(Debug, Clone, Copy)]
enum Action {
    Subscribe,
    /// `publish` on the control stream (acknowledged).
    Publish,
    /// `publish` as a datagram with a request id (a refusal is an error on
    /// the control stream; an accepted one lands in history).
    DatagramPublish,
    PresenceEnter,
    PresenceGet,
    /// Subscribe with `presence: true`.
    PresenceEvents,
    /// Subscribe to `$presence/<channel>`.
    PresenceChannel,
    History,
    /// Subscribe with `rewind`.
    Rewind,
}

impl Action {
    const ALL: [Action; 9] = [
        Action::Subscribe,
        Action::Publish,
        Action::DatagramPublish,
        Action::PresenceEnter,
        Action::PresenceGet,
        Action::PresenceEvents,
        Action::PresenceChannel,
        Action::History,
        Action::Rewind,
    ];

    fn needs(self) -> &'static [Op] {
        match self {
            Action::Subscribe => &[S],
            Action::Publish | Action::DatagramPublish => &[P],
            Action::PresenceEnter | Action::PresenceGet | Action::PresenceChannel => &[Pr],
            Action::PresenceEvents => &[S, Pr],
            Action::History => &[H],
            Action::Rewind => &[S, H],
        }
    }
}

/// A reply: `None` if it succeeded, else its error code (or what came
/// instead).
fn refusal(f: &proto::ServerFrame) -> Option<String> {
    match &f.frame {
        Some(server_frame::Frame::Error(e)) => Some(e.code().slug().to_string()),
        Some(server_frame::Frame::Disconnect(d)) => Some(format!("disconnect {}", d.code)),
        _ => None,
    }
}

fn sub(filter: &str) -> proto::Subscribe {
    proto::Subscribe { filter: filter.into(), ..Default::default() }
}

/// A client and the request ids of its datagram publishes (far above the
/// control stream's own, so the two never meet).
struct Session {
    c: WtClient,
    next_datagram_req: u64,
}

impl Session {
    async fn open(gw: &TestGateway, via: Via, token: &str) -> anyhow::Result<Session> {
        Ok(Session { c: client(gw, via, token).await?, next_datagram_req: 1_000_000 })
    }

    /// Runs `action` on `channel`: `None` if allowed, else the refusal.
    async fn run(&mut self, gw: &TestGateway, action: Action, channel: &str) -> anyhow::Result<Option<String>> {
        use client_frame::Frame as F;
        let frame = match action {
            Action::Subscribe => F::Subscribe(sub(channel)),
            Action::Publish => {
                F::Publish(proto::Publish { channel: channel.into(), payload: "{}".into(), ..Default::default() })
            }
            Action::DatagramPublish => return self.publish_datagram(gw, channel).await,
            Action::PresenceEnter => {
                F::PresenceEnter(proto::PresenceEnter { channel: channel.into(), data: "{}".into() })
            }
            Action::PresenceGet => F::PresenceGet(proto::PresenceGet { channel: channel.into() }),
            Action::PresenceEvents => F::Subscribe(proto::Subscribe { presence: true, ..sub(channel) }),
            Action::PresenceChannel => F::Subscribe(sub(&format!("$presence/{channel}"))),
            Action::History => F::History(proto::History { channel: channel.into(), ..Default::default() }),
            Action::Rewind => F::Subscribe(proto::Subscribe {
                rewind: Some(proto::Rewind { count: 5, duration_ms: 0 }),
                ..sub(channel)
            }),
        };
        Ok(refusal(&self.c.request(frame).await?))
    }

    /// Publishes a datagram (`req` set) on `channel`: `None` once it is in
    /// the channel's history, the error code once one with its `req` comes
    /// on the control stream. Datagrams may be lost: up to five tries.
    async fn publish_datagram(&mut self, gw: &TestGateway, channel: &str) -> anyhow::Result<Option<String>> {
        let mut sent = Vec::new();
        for _ in 0..5 {
            self.next_datagram_req += 1;
            let req = self.next_datagram_req;
            sent.push(req);
            let p =
                proto::Publish { channel: channel.into(), payload: format!("dg-{req}").into(), ..Default::default() };
            self.c.publish_datagram(req, p)?;
            let until = Instant::now() + Duration::from_secs(1);
            while Instant::now() < until {
                // An error frame, maybe one for an earlier datagram (skipped).
                if let Ok(f) = tokio::time::timeout(Duration::from_millis(50), self.c.next_pushed()).await {
                    let f = f?;
                    if sent.contains(&f.req) {
                        return Ok(Some(refusal(&f).unwrap_or_else(|| format!("{f:?}"))));
                    }
                    anyhow::ensure!(f.req >= 1_000_000, "unexpected frame on the control stream: {f:?}");
                    continue;
                }
                let history = reqwest::Client::new()
                    .get(format!("{}/v1/channels/{channel}/history", gw.http))
                    .header("x-api-key", API_KEY)
                    .send()
                    .await?;
                let text = if history.status() == 200 { history.text().await? } else { String::new() };
                if sent.iter().any(|r| text.contains(&format!("dg-{r}"))) {
                    return Ok(None);
                }
            }
        }
        bail!("datagram publish on {channel}: neither refused nor delivered")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_action_needs_exactly_its_caps() -> anyhow::Result<()> {
    let gw = wt_gateway().await?;
    let token = token(SUB, 300, matrix_caps());
    let mut wrong = Vec::new();
    let mut refused = 0;
    for via in VIAS {
        let mut s = Session::open(&gw, via, &token).await?;
        for channel in CHANNELS {
            let have = granted(channel);
            for action in Action::ALL {
                let allowed = action.needs().iter().all(|op| have.contains(op));
                let want = (!allowed).then(|| "permission_denied".to_string());
                let got = s.run(&gw, action, channel).await?;
                refused += usize::from(got.is_some());
                if got != want {
                    wrong.push(format!("{via:?}: {action:?} on {channel}: got {got:?}, want {want:?}"));
                }
            }
        }
        // Every refusal left the session open.
        let pong = s.c.request(client_frame::Frame::Ping(proto::Ping {})).await?;
        assert_eq!(pong.frame, Some(server_frame::Frame::Pong(proto::Pong {})), "{via:?}");
    }
    assert!(wrong.is_empty(), "caps decided wrongly:\n{}", wrong.join("\n"));
    // Per session: 9 actions on each of chat/a/b and other; 3, 2, 4 and 2
    // need the cap missing on no-sub/x, no-pub/x, no-pres/x and no-hist/x.
    assert_eq!(refused, 3 * (9 * 2 + 3 + 2 + 4 + 2), "every cell ran");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_are_granted_only_when_a_cap_covers_them() -> anyhow::Result<()> {
    let gw = wt_gateway().await?;
    let token = token(SUB, 300, json!({"chat/+": "subscribe,presence", "sensors/#": "subscribe"}));
    // (filter, granted): `chat/+` grants neither `chat/a/b` nor another
    // channel's presence.
    let cases = [
        ("chat/+", true),
        ("chat/a", true),
        ("chat/a/b", false),
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
        ("$presence/chat/a", true),
        ("$presence/chat/+", true),
        ("$presence/chat/a/b", false),
        ("$presence/sensors/x", false),
        ("$presence/other", false),
    ];
    let mut wrong = Vec::new();
    for via in VIAS {
        let mut s = Session::open(&gw, via, &token).await?;
        for (filter, ok) in cases {
            let got = refusal(&s.c.request(client_frame::Frame::Subscribe(sub(filter))).await?);
            let want = (!ok).then(|| "permission_denied".to_string());
            if got != want {
                wrong.push(format!("{via:?} {filter}: got {got:?}, want {want:?}"));
            }
        }
    }
    assert!(wrong.is_empty(), "filter grants:\n{}", wrong.join("\n"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_channels_are_refused_even_with_every_cap() -> anyhow::Result<()> {
    let gw = wt_gateway().await?;
    let token = token(SUB, 300, json!({"#": ["subscribe", "publish", "presence", "history"]}));
    for via in VIAS {
        let mut s = Session::open(&gw, via, &token).await?;
        let got = [
            ("publish", s.run(&gw, Action::Publish, "$sys/x").await?),
            ("datagram publish", s.run(&gw, Action::DatagramPublish, "$sys/x").await?),
            ("subscribe", s.run(&gw, Action::Subscribe, "$sys/#").await?),
            ("presence enter", s.run(&gw, Action::PresenceEnter, "$sys").await?),
        ];
        for (what, got) in got {
            assert_eq!(got.as_deref(), Some("reserved_channel"), "{via:?} {what}");
        }
        // A refused datagram publish without a request id is answered by
        // nothing at all.
        for _ in 0..3 {
            s.c.publish_datagram(0, proto::Publish { channel: "$sys/x".into(), ..Default::default() })?;
        }
        let pong = s.c.request(client_frame::Frame::Ping(proto::Ping {})).await?;
        assert_eq!(pong.frame, Some(server_frame::Frame::Pong(proto::Pong {})), "{via:?}");
        let late = tokio::time::timeout(Duration::from_millis(300), s.c.next_pushed()).await;
        assert!(late.is_err(), "{via:?}: a frame for a req 0 datagram: {late:?}");
        // The same session may do the rest.
        assert_eq!(s.run(&gw, Action::Publish, "fine").await?, None, "{via:?}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Refresh and expiry.

fn refresh(token: String) -> client_frame::Frame {
    client_frame::Frame::Refresh(proto::Refresh { token })
}

fn error_code(f: &proto::ServerFrame) -> Option<ErrorCode> {
    match &f.frame {
        Some(server_frame::Frame::Error(e)) => Some(e.code()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_narrows_and_widens_and_a_refused_one_keeps_the_rights() -> anyhow::Result<()> {
    let gw = wt_gateway().await?;
    for via in VIAS {
        let who = format!("bob-{via:?}");
        let caps = json!({"chat/+": ["subscribe", "publish"], "rooms/#": "presence,history"});
        let mut s = Session::open(&gw, via, &token(&who, 60, caps)).await?;
        let denied = |r: Option<String>| r.as_deref() == Some("permission_denied");
        assert_eq!(s.run(&gw, Action::Publish, "chat/a").await?, None, "{via:?}");

        // Narrower: publishing to chat/a is refused from now on, on the
        // control stream and as a datagram.
        let f = s.c.request(refresh(token(&who, 60, json!({"chat/+": "subscribe"})))).await?;
        assert!(matches!(f.frame, Some(server_frame::Frame::Refreshed(_))), "{via:?}: {f:?}");
        assert!(denied(s.run(&gw, Action::Publish, "chat/a").await?), "{via:?}: narrowed");
        assert!(denied(s.run(&gw, Action::DatagramPublish, "chat/a").await?), "{via:?}: narrowed, datagram");
        assert_eq!(s.run(&gw, Action::Subscribe, "chat/a").await?, None, "{via:?}: still subscribes");
        // Wider.
        let f = s.c.request(refresh(token(&who, 60, json!({"chat/#": ["subscribe", "publish"]})))).await?;
        assert!(matches!(f.frame, Some(server_frame::Frame::Refreshed(_))), "{via:?}: {f:?}");
        assert_eq!(s.run(&gw, Action::Publish, "chat/a").await?, None, "{via:?}: widened");
        assert_eq!(s.run(&gw, Action::DatagramPublish, "chat/a/b").await?, None, "{via:?}: widened, datagram");
        assert_eq!(s.run(&gw, Action::Subscribe, "chat/#").await?, None, "{via:?}: widened filter");
        // A token for someone else, or an invalid one, is refused; the
        // session keeps its rights.
        let all = json!({"#": ["subscribe", "publish"]});
        let refusals = [
            ("another client", token("mallory", 60, all.clone())),
            ("expired", token(&who, -120, all.clone())),
            ("alg: none", alg_none(&claims(&who, 60, all.clone()))),
            ("HS/RS confusion", hs_rs_confusion(&claims(&who, 60, all.clone()))),
            ("not a JWT", "not-a-token".into()),
        ];
        for (case, t) in refusals {
            let f = s.c.request(refresh(t)).await?;
            assert_eq!(error_code(&f), Some(ErrorCode::Unauthorized), "{via:?} {case}: {f:?}");
            assert_eq!(s.run(&gw, Action::Publish, "chat/b").await?, None, "{via:?} {case}: rights kept");
            assert!(denied(s.run(&gw, Action::Publish, "other").await?), "{via:?} {case}: not widened");
        }
    }
    Ok(())
}

/// When a session opened now with a token of `ttl` seconds is surely closed
/// if not refreshed: `exp` counts whole seconds, the session ends once the
/// clock is past it (no leeway here), and the sweeper runs every second.
fn past_expiry(ttl: u64) -> Instant {
    Instant::now() + Duration::from_secs(ttl) + Duration::from_millis(3000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_closes_4006_unless_a_refresh_extended_the_session() -> anyhow::Result<()> {
    let gw = wt_gateway().await?;
    let caps = json!({"ext/#": ["subscribe", "publish"]});
    let short = |sub: &str| token(sub, 2, caps.clone());
    let long = |sub: &str| token(sub, 120, caps.clone());
    let started = Instant::now();
    let deadline = past_expiry(2);

    // One session each way that refreshes in time, one that does not.
    let mut kept = Vec::new();
    let mut expiring = Vec::new();
    for via in VIAS {
        let who = format!("kept-{via:?}");
        let mut s = Session::open(&gw, via, &short(&who)).await?;
        s.c.subscribe(sub(&format!("ext/{via:?}"))).await?;
        let f = s.c.request(refresh(long(&who))).await?;
        assert!(matches!(f.frame, Some(server_frame::Frame::Refreshed(_))), "{via:?}: {f:?}");
        kept.push((via, s));
        expiring.push((via, Session::open(&gw, via, &short(&format!("gone-{via:?}"))).await?));
    }

    // Without a refresh: `disconnect` 4006 (reconnect with a fresh token),
    // then the close 4006 `token expired`.
    for (via, s) in &mut expiring {
        let f = tokio::time::timeout(WAIT, s.c.next_pushed()).await.context("no disconnect")??;
        let Some(server_frame::Frame::Disconnect(d)) = f.frame else {
            bail!("{via:?}: expected disconnect, got {f:?}")
        };
        assert_eq!((d.code, d.reason.as_str(), d.reconnect), (4006, "token expired", true), "{via:?}");
        assert_eq!(wt_closed(s.c.connection()).await?, (4006, "token expired".to_string()), "{via:?}");
    }
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(1) && Instant::now() < deadline, "closed after {waited:?}");

    // Past the first tokens' expiry (and a sweep), the refreshed sessions
    // go on: they receive and may publish.
    tokio::time::sleep_until(deadline).await;
    for (via, s) in &mut kept {
        let channel = format!("ext/{via:?}");
        let (status, _) = rest_publish(&gw.http, &channel, "after expiry", &[("x-api-key", API_KEY)]).await?;
        assert_eq!(status, 200);
        let mut stream = wt_accept(&s.c).await?;
        assert_eq!(&wt_message(&mut stream).await?.payload[..], b"after expiry", "{via:?}");
        assert_eq!(s.run(&gw, Action::Publish, &channel).await?, None, "{via:?}");
    }
    eventually(WAIT, "only the refreshed sessions left", || async { gw.sessions() == kept.len() }).await
}
