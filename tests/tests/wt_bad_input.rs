//! Hostile and broken WebTransport clients: wrong paths and missing or
//! invalid tokens are refused with an HTTP status before the session is
//! accepted; malformed, oversize and out-of-order control frames, extra
//! streams, stopped streams, datagram floods, slow readers and silence end
//! in the documented error frame or close code; and nobody else notices.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use prost::Message as _;
use switchboard::core::auth::KeyConfig;
use switchboard::edge::config::{AuthMode, Config};
use switchboard::tooling::client_wt::{WtClient, WtOptions, open_session};
use switchboard_proto::{self as proto, ErrorCode, client_frame, server_frame};
use switchboard_protocols::wt::{REFUSED_STREAM, codec, stream_error_code};
use switchboard_tests::*;

const SECRET: &str = "wt-test-secret-wt-test-secret-wt-test!";

fn hs256() -> KeyConfig {
    KeyConfig { kid: Some("k1".into()), alg: "HS256".into(), secret: Some(SECRET.into()), ..Default::default() }
}

fn token_mode(cfg: &mut Config) {
    with_quic(cfg);
    cfg.auth.mode = AuthMode::Token;
    cfg.auth.keys = vec![hs256()];
}

/// A token for `sub` allowed everything under `wt/`.
fn token(sub: &str) -> String {
    let caps: BTreeMap<String, Vec<String>> =
        [("wt/#".to_string(), vec!["subscribe".to_string(), "publish".to_string()])].into_iter().collect();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    switchboard::core::auth::mint(&hs256(), sub, &caps, 600, now).expect("mint a test token")
}

async fn refused_count(gw: &TestGateway, reason: &str) -> anyhow::Result<f64> {
    let text = reqwest::get(format!("{}/metrics", gw.admin)).await?.text().await?;
    let prefix = format!("switchboard_connections_refused_total{{listener=\"quic\",reason=\"{reason}\"}} ");
    Ok(text.lines().find_map(|l| l.strip_prefix(prefix.as_str())).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0))
}

fn with_path(opts: &WtOptions, path: &str) -> WtOptions {
    WtOptions { url: format!("{}{path}", opts.url), ..opts.clone() }
}

/// A round trip through the gateway on a fresh client: others are fine.
async fn still_served(gw: &TestGateway) -> anyhow::Result<()> {
    let mut c = gw.wt_client("bystander").await?;
    c.subscribe(proto::Subscribe { filter: "wt/ok".into(), ..Default::default() }).await?;
    c.publish(proto::Publish { channel: "wt/ok".into(), payload: Bytes::from_static(b"ok"), ..Default::default() })
        .await?;
    let mut s = wt_accept(&c).await?;
    assert_eq!(&wt_message(&mut s).await?.payload[..], b"ok");
    c.close();
    Ok(())
}

/// Opens a session and its control stream without connecting.
async fn raw_control(
    gw: &TestGateway,
) -> anyhow::Result<(
    wtransport::Endpoint<wtransport::endpoint::endpoint_side::Client>,
    wtransport::Connection,
    wtransport::SendStream,
    switchboard::tooling::client_wt::FrameReader,
)> {
    let (endpoint, conn) = open_session(&gw.wt_options()?).await?;
    let (send, recv) = conn.open_bi().await?.await?;
    Ok((endpoint, conn, send, switchboard::tooling::client_wt::FrameReader::new(recv)))
}

fn framed(frame: &proto::ClientFrame) -> Vec<u8> {
    let mut out = BytesMut::new();
    codec::put_frame(&mut out, &frame.encode_to_vec());
    out.to_vec()
}

fn disconnect_code(f: &proto::ServerFrame) -> Option<u32> {
    match &f.frame {
        Some(server_frame::Frame::Disconnect(d)) => Some(d.code),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_path_is_refused_with_404() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(with_quic).await?;
    let opts = gw.wt_options()?;
    for path in ["/v1/ws", "/v1/wt/extra", "/x"] {
        let err = open_session(&with_path(&opts, path)).await.err().map(|e| e.to_string());
        assert!(err.as_deref().is_some_and(|e| e.contains("rejected")), "{path}: {err:?}");
    }
    let text = reqwest::get(format!("{}/metrics", gw.admin)).await?.text().await?;
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("refused")).collect();
    assert!(refused_count(&gw, "not_found").await? >= 3.0, "{lines:?}");
    assert_eq!(gw.sessions(), 0);
    still_served(&gw).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_mode_refuses_missing_and_invalid_tokens_with_403() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(token_mode).await?;
    let opts = gw.wt_options()?;
    let err = open_session(&with_path(&opts, "/v1/wt")).await.err().map(|e| e.to_string());
    assert!(err.as_deref().is_some_and(|e| e.contains("rejected")), "{err:?}");
    assert_eq!(refused_count(&gw, "missing_token").await?, 1.0);
    let err = open_session(&with_path(&opts, "/v1/wt?token=not-a-jwt")).await.err().map(|e| e.to_string());
    assert!(err.as_deref().is_some_and(|e| e.contains("rejected")), "{err:?}");
    assert_eq!(refused_count(&gw, "unauthorized").await?, 1.0);
    assert_eq!(gw.sessions(), 0);

    // A valid token in the query or an Authorization header opens the
    // session before the accept; `connected` comes first.
    let by_query = WtOptions { query_auth: true, ..with_path(&opts, &format!("/v1/wt?token={}", token("q"))) };
    assert_eq!(WtClient::connect(&by_query).await?.connected.client_id, "q");
    let by_header = WtOptions {
        query_auth: true,
        headers: vec![("authorization".into(), format!("Bearer {}", token("h")))],
        ..with_path(&opts, "/v1/wt")
    };
    let mut h = WtClient::connect(&by_header).await?;
    assert_eq!(h.connected.client_id, "h");
    // The caps apply; a refresh for the same client works, another's not.
    let denied = h.publish(proto::Publish { channel: "elsewhere".into(), ..Default::default() }).await;
    assert!(denied.as_ref().err().is_some_and(|e| e.to_string().contains("permission_denied")), "{denied:?}");
    let refreshed = h.request(client_frame::Frame::Refresh(proto::Refresh { token: token("h") })).await?;
    assert_eq!(refreshed.frame, Some(server_frame::Frame::Refreshed(proto::Refreshed {})));
    let other = h.request(client_frame::Frame::Refresh(proto::Refresh { token: token("x") })).await?;
    assert!(
        matches!(&other.frame, Some(server_frame::Frame::Error(e)) if e.code() == ErrorCode::Unauthorized),
        "{other:?}"
    );

    // `?auth=connect` defers to the connect frame.
    let deferred = WtOptions { token: token("c"), ..with_path(&opts, "/v1/wt?auth=connect") };
    assert_eq!(WtClient::connect(&deferred).await?.connected.client_id, "c");
    let forged = WtOptions { token: "forged".into(), ..deferred.clone() };
    let err = WtClient::connect(&forged).await.err().map(|e| e.to_string());
    assert!(err.as_deref().is_some_and(|e| e.contains("unauthorized")), "{err:?}");
    // On the wire: the error, then disconnect 4001, then the close.
    let (_endpoint, conn) = open_session(&deferred).await?;
    let (mut send, recv) = conn.open_bi().await?.await?;
    let mut control = switchboard::tooling::client_wt::FrameReader::new(recv);
    let connect = proto::Connect { token: "forged".into(), client_id: String::new() };
    send.write_all(&framed(&proto::ClientFrame { req: 1, frame: Some(client_frame::Frame::Connect(connect)) })).await?;
    let f = wt_next(&mut control).await?;
    assert!(matches!(&f.frame, Some(server_frame::Frame::Error(e)) if e.code() == ErrorCode::Unauthorized), "{f:?}");
    assert_eq!(disconnect_code(&wt_next(&mut control).await?), Some(4001));
    assert_eq!(wt_closed(&conn).await?, (4001, "unauthorized".to_string()));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_control_frames_are_answered_and_framing_violations_close() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|cfg| {
        with_quic(cfg);
        cfg.limits.max_frame_size = 64 * 1024;
    })
    .await?;
    // After connect: garbage and empty frames are answered, the session stays.
    let mut c = gw.wt_client("m").await?;
    let mut garbage = BytesMut::new();
    codec::put_frame(&mut garbage, &[0xff, 0xff, 0xff]);
    c.send_raw(&garbage).await?;
    let f = c.recv_control().await?;
    assert!(matches!(&f.frame, Some(server_frame::Frame::Error(e)) if e.code() == ErrorCode::BadFrame), "{f:?}");
    c.send_raw(&framed(&proto::ClientFrame { req: 9, frame: None })).await?;
    let f = c.recv_control().await?;
    assert!(matches!(&f.frame, Some(server_frame::Frame::Error(e)) if e.code() == ErrorCode::UnknownFrame), "{f:?}");
    let pong = c.request(client_frame::Frame::Ping(proto::Ping {})).await?;
    assert_eq!(pong.frame, Some(server_frame::Frame::Pong(proto::Pong {})));

    // A length prefix that is no varint: 1002.
    c.send_raw(&[0xff; 11]).await?;
    assert_eq!(wt_closed(c.connection()).await?.0, 1002);

    // A frame announced above limits.max_frame_size: 1009, at the prefix.
    let c = gw.wt_client("big").await?;
    let mut prefix = Vec::new();
    prost::encoding::encode_varint(10 * 1024 * 1024, &mut prefix);
    let mut c = c;
    c.send_raw(&prefix).await?;
    assert_eq!(wt_closed(c.connection()).await?.0, 1009);

    // A frame before connect: not_connected, then 4002.
    let (_endpoint, conn, mut send, mut control) = raw_control(&gw).await?;
    let publish = proto::Publish { channel: "wt/x".into(), ..Default::default() };
    send.write_all(&framed(&proto::ClientFrame { req: 3, frame: Some(client_frame::Frame::Publish(publish)) })).await?;
    let f = wt_next(&mut control).await?;
    assert!(
        matches!(&f.frame, Some(server_frame::Frame::Error(e)) if e.code() == ErrorCode::NotConnected) && f.req == 3,
        "{f:?}"
    );
    assert_eq!(disconnect_code(&wt_next(&mut control).await?), Some(4002));
    assert_eq!(wt_closed(&conn).await?.0, 4002);
    assert_eq!(gw.sessions(), 0, "no session was opened by the bad clients");
    still_served(&gw).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silence_after_the_handshake_closes_4002() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|cfg| {
        with_quic(cfg);
        cfg.websocket.handshake_timeout = Duration::from_millis(300);
    })
    .await?;
    // No control stream at all.
    let (_endpoint, conn) = open_session(&gw.wt_options()?).await?;
    assert_eq!(wt_closed(&conn).await?, (4002, "connect expected".to_string()));
    // A control stream (made visible by half a frame) but no connect.
    let (_endpoint, conn, mut send, _control) = raw_control(&gw).await?;
    send.write_all(&[5, 0]).await?;
    assert_eq!(wt_closed(&conn).await?.0, 4002);
    still_served(&gw).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extra_streams_are_refused_and_too_many_close_4007() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(with_quic).await?;
    let c = gw.wt_client("streams").await?;
    let conn = c.connection().clone();
    // A second bidirectional stream: refused with the documented code.
    let (mut send, mut recv) = conn.open_bi().await?.await?;
    // The refusal may stop the stream before this write completes.
    let _ = send.write_all(b"x").await;
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(WAIT, recv.read(&mut buf)).await?;
    let code = match read {
        Err(wtransport::error::StreamReadError::Reset(code)) => code.into_inner(),
        other => anyhow::bail!("expected a reset, got {other:?}"),
    };
    assert_eq!(code, stream_error_code(REFUSED_STREAM));
    // Unidirectional streams, one after another, until the session closes.
    let opener = tokio::spawn(async move {
        for _ in 0..64 {
            let Ok(opening) = conn.open_uni().await else { break };
            let Ok(mut s) = opening.await else { break };
            let _ = s.write_all(b"x").await;
        }
    });
    assert_eq!(wt_closed(c.connection()).await?, (4007, "too many streams".to_string()));
    opener.abort();
    still_served(&gw).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_datagram_flood_is_dropped_and_hurts_nobody() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(with_quic).await?;
    let mut c = gw.wt_client("flood").await?;
    // Before the flood, a datagram from a session-less client is dropped too.
    let (_endpoint, bare) = open_session(&gw.wt_options()?).await?;
    bare.send_datagram(b"\x2a\x00")?;
    let junk = [0xffu8; 512];
    for i in 0..20_000u32 {
        // quinn drops the oldest when its buffer is full; errors are fine.
        let _ = c.connection().send_datagram(&junk[..(i % 500) as usize + 1]);
        if i % 1000 == 0 {
            tokio::task::yield_now().await;
        }
    }
    let pong = c.request(client_frame::Frame::Ping(proto::Ping {})).await?;
    assert_eq!(pong.frame, Some(server_frame::Frame::Pong(proto::Pong {})));
    eventually(WAIT, "bad datagrams counted", || async {
        let text = reqwest::get(format!("{}/metrics", gw.admin)).await.ok();
        let text = match text {
            Some(r) => r.text().await.unwrap_or_default(),
            None => String::new(),
        };
        text.contains("switchboard_protocol_errors_total{protocol=\"wt\",code=\"bad_datagram\"}")
    })
    .await?;
    still_served(&gw).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_a_channel_stream_closes_4008() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(with_quic).await?;
    let mut c = gw.wt_client("stopper").await?;
    c.subscribe(proto::Subscribe { filter: "wt/stop".into(), ..Default::default() }).await?;
    rest_publish(&gw.http, "wt/stop", "one", &[]).await?;
    let mut s = wt_accept(&c).await?;
    wt_message(&mut s).await?;
    let _ = s.stream_mut().quic_stream_mut().stop(wtransport::quinn::VarInt::from_u32(7));
    // The first write after the server learns of the stop ends the session;
    // STOP_SENDING may arrive after the next publication is written, so keep
    // publishing (bounded) until the session closes.
    let closed = wt_closed(c.connection());
    tokio::pin!(closed);
    for i in 0..100 {
        rest_publish(&gw.http, "wt/stop", format!("more {i}"), &[]).await?;
        tokio::select! {
            r = &mut closed => {
                assert_eq!(r?.0, 4008);
                return still_served(&gw).await;
            }
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    anyhow::bail!("the session did not close after its channel stream was stopped")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_reading_is_a_slow_consumer() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|cfg| {
        with_quic(cfg);
        cfg.limits.outbox_bytes = 128 * 1024;
    })
    .await?;
    let mut transport = wtransport::config::QuicTransportConfig::default();
    transport.stream_receive_window(wtransport::quinn::VarInt::from_u32(8 * 1024));
    let mut opts = gw.wt_options()?;
    opts.client_id = "slow".into();
    opts.transport = Some(Arc::new(transport));
    let mut c = WtClient::connect(&opts).await?;
    c.subscribe(proto::Subscribe { filter: "wt/slow".into(), ..Default::default() }).await?;
    let chunk = vec![b'z'; 4 * 1024];
    for _ in 0..200 {
        let (status, _) = rest_publish(&gw.http, "wt/slow", chunk.clone(), &[]).await?;
        assert_eq!(status, 200);
        if c.connection().quic_connection().close_reason().is_some() {
            break;
        }
    }
    assert_eq!(wt_closed(c.connection()).await?, (4000, "slow consumer".to_string()));
    still_served(&gw).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_sessions_1012() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(with_quic).await?;
    let mut c = gw.wt_client("bye").await?;
    let conn = c.connection().clone();
    let gateway = gw.gateway;
    let stop = tokio::spawn(gateway.shutdown());
    let f = tokio::time::timeout(WAIT, c.next_pushed()).await??;
    assert_eq!(disconnect_code(&f), Some(1012));
    assert_eq!(wt_closed(&conn).await?, (1012, "server shutting down".to_string()));
    tokio::time::timeout(WAIT, stop).await??;
    Ok(())
}
