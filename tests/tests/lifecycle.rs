//! Lifecycle: admin health and readiness, Prometheus metrics after real
//! traffic, session accounting, the handshake deadline, and graceful
//! shutdown (close 1012, bounded by the grace, listeners closed).
//!
//! Metrics are process-wide, so every test here that opens WebSocket
//! connections holds [`SERIAL`]: the metrics test can then assert exact
//! deltas.

#[allow(dead_code)] // each test binary uses part of it
mod common_b;

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use common_b::{admin_sessions, disconnect_of, metric, metrics_text, refuses_connections};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use switchboard_proto::{self as proto, client_frame, server_frame};
use switchboard_tests::*;
use tokio_tungstenite::tungstenite::Message;

/// Serialises the tests that move the process-wide WebSocket metrics.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const WS: &str = r#"protocol="ws""#;

/// A JSON client that counts the data bytes it sends and receives, to check
/// the byte counters exactly.
struct Counting {
    ws: RawWs,
    next_req: u64,
    frames_sent: u64,
    bytes_sent: u64,
    bytes_received: u64,
}

impl Counting {
    async fn connect(gw: &TestGateway, client_id: &str) -> anyhow::Result<Self> {
        let ws = raw_ws(&gw.ws, Some("switchboard.v1.json")).await?;
        let mut c = Counting { ws, next_req: 0, frames_sent: 0, bytes_sent: 0, bytes_received: 0 };
        let connect =
            client_frame::Frame::Connect(proto::Connect { token: String::new(), client_id: client_id.into() });
        match c.request(connect).await?.frame {
            Some(server_frame::Frame::Connected(_)) => Ok(c),
            other => bail!("expected connected, got {other:?}"),
        }
    }

    async fn request(&mut self, frame: client_frame::Frame) -> anyhow::Result<proto::ServerFrame> {
        self.next_req += 1;
        let text = client_frame_json(&proto::ClientFrame { req: self.next_req, frame: Some(frame) });
        self.frames_sent += 1;
        self.bytes_sent += text.len() as u64;
        self.ws.send(Message::text(text)).await?;
        let f = self.recv().await?;
        assert_eq!(f.req, self.next_req, "{f:?}");
        Ok(f)
    }

    async fn recv(&mut self) -> anyhow::Result<proto::ServerFrame> {
        loop {
            match tokio::time::timeout(WAIT, self.ws.next()).await? {
                Some(Ok(Message::Text(t))) => {
                    self.bytes_received += t.len() as u64;
                    return Ok(proto::json::decode_server_frame(t.as_str())?);
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => bail!("expected a text frame, got {other:?}"),
            }
        }
    }
}

/// The ws-labelled samples the metrics test checks.
#[derive(Debug, Clone, Copy, PartialEq)]
struct WsCounters {
    connections: f64,
    messages_in: f64,
    messages_out: f64,
    bytes_in: f64,
    bytes_out: f64,
    frames_in: f64,
    rest_messages_in: f64,
}

impl WsCounters {
    async fn read(gw: &TestGateway) -> anyhow::Result<Self> {
        let t = metrics_text(gw).await?;
        let v = |name: &str, labels: &str| metric(&t, name, labels).unwrap_or(0.0);
        Ok(WsCounters {
            connections: v("switchboard_connections", WS),
            messages_in: v("switchboard_messages_in_total", WS),
            messages_out: v("switchboard_messages_out_total", WS),
            bytes_in: v("switchboard_bytes_in_total", WS),
            bytes_out: v("switchboard_bytes_out_total", WS),
            frames_in: v("switchboard_frames_in_total", WS),
            rest_messages_in: v("switchboard_messages_in_total", r#"protocol="rest""#),
        })
    }
}

#[tokio::test]
async fn admin_health_readiness_and_stats() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let a = &gw.admin;
    assert_eq!(get_json(&format!("{a}/healthz")).await?, (200, json!({"status": "ok"})));
    assert_eq!(get_json(&format!("{a}/readyz")).await?, (200, json!({"status": "ready"})));
    assert_eq!(
        get_json(&format!("{a}/v1/stats")).await?,
        (200, json!({"node": "node-1", "sessions": 0, "channels": 0, "subscriptions": 0, "presence_members": 0}))
    );
    assert_eq!(get_json(&format!("{a}/v1/sessions")).await?, (200, json!({"sessions": []})));
    let (status, body) = get_json(&format!("{a}/nope")).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("not_found")));
    let resp = reqwest::get(format!("{a}/metrics")).await?;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers().get("content-type").and_then(|v| v.to_str().ok()), Some("text/plain; version=0.0.4"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_websocket_traffic_exactly() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let gw = TestGateway::start().await?;
    let before = WsCounters::read(&gw).await?;

    let mut sub = Counting::connect(&gw, "sub").await?;
    let subscribe =
        client_frame::Frame::Subscribe(proto::Subscribe { filter: "metrics/ch".into(), ..Default::default() });
    assert!(matches!(sub.request(subscribe).await?.frame, Some(server_frame::Frame::Subscribed(_))));
    let mut publisher = Counting::connect(&gw, "pub").await?;
    for i in 0..3 {
        let p = proto::Publish { channel: "metrics/ch".into(), payload: format!("m{i}").into(), ..Default::default() };
        assert!(matches!(
            publisher.request(client_frame::Frame::Publish(p)).await?.frame,
            Some(server_frame::Frame::PublishAck(_))
        ));
    }
    for i in 0..3 {
        match sub.recv().await?.frame {
            Some(server_frame::Frame::Message(m)) => assert_eq!(&m.payload[..], format!("m{i}").as_bytes()),
            other => bail!("expected a message, got {other:?}"),
        }
    }
    let (status, _) = rest_publish(&gw.http, "metrics/ch", "rest", &[]).await?;
    assert_eq!(status, 200);
    match sub.recv().await?.frame {
        Some(server_frame::Frame::Message(m)) => assert_eq!(&m.payload[..], b"rest"),
        other => bail!("expected a message, got {other:?}"),
    }

    let want = WsCounters {
        connections: before.connections + 2.0,
        messages_in: before.messages_in + 3.0,
        messages_out: before.messages_out + 4.0,
        bytes_in: before.bytes_in + (sub.bytes_sent + publisher.bytes_sent) as f64,
        bytes_out: before.bytes_out + (sub.bytes_received + publisher.bytes_received) as f64,
        frames_in: before.frames_in + (sub.frames_sent + publisher.frames_sent) as f64,
        rest_messages_in: before.rest_messages_in + 1.0,
    };
    // Counters move right after the flush, so the client can be faster.
    eventually(WAIT, "the counters to catch up", || async {
        WsCounters::read(&gw).await.is_ok_and(|now| now.bytes_out >= want.bytes_out)
    })
    .await?;
    assert_eq!(WsCounters::read(&gw).await?, want);

    drop(sub);
    drop(publisher);
    eventually(WAIT, "both sessions to end", || async { gw.sessions() == 0 }).await?;
    assert_eq!(WsCounters::read(&gw).await?.connections, before.connections);
    let text = metrics_text(&gw).await?;
    for name in [
        "switchboard_connections",
        "switchboard_messages_in_total",
        "switchboard_messages_out_total",
        "switchboard_bytes_in_total",
        "switchboard_bytes_out_total",
    ] {
        assert!(text.contains(&format!("# TYPE {name} ")), "{name} has no TYPE line");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_listed_and_return_to_zero() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let gw = TestGateway::start().await?;
    let mut a = WsClient::connect(&gw.ws, Codec::Json, "a").await?;
    a.subscribe_to("s/1").await?;
    a.subscribe_to("s/#").await?;
    let b = WsClient::connect(&gw.ws, Codec::Proto, "b").await?;
    let mut c = WsClient::connect(&gw.ws, Codec::Json, "c").await?;
    // Upgraded but never connected: not a session.
    let _raw = raw_ws(&gw.ws, Some("switchboard.v1.json")).await?;
    assert_eq!(gw.sessions(), 3);
    let listed: Vec<(String, String, u64)> = admin_sessions(&gw)
        .await?
        .iter()
        .map(|s| {
            (
                s["client_id"].as_str().unwrap_or("").into(),
                s["protocol"].as_str().unwrap_or("").into(),
                s["subscriptions"].as_u64().unwrap_or(99),
            )
        })
        .collect();
    assert_eq!(listed, vec![("a".into(), "ws".into(), 2), ("b".into(), "ws".into(), 0), ("c".into(), "ws".into(), 0)]);
    let (_, stats) = get_json(&format!("{}/v1/stats", gw.admin)).await?;
    assert_eq!((stats["sessions"].as_u64(), stats["subscriptions"].as_u64()), (Some(3), Some(2)));

    // Three ways to end: a clean close, an abrupt drop, a server-side close.
    a.close().await?;
    b.drop_abruptly();
    c.send_raw(Message::binary(vec![1u8])).await?;
    assert_eq!(c.closed_with().await?, 1003);
    eventually(WAIT, "every session to end", || async { gw.sessions() == 0 }).await?;
    assert_eq!(admin_sessions(&gw).await?, Vec::<serde_json::Value>::new());
    let (_, stats) = get_json(&format!("{}/v1/stats", gw.admin)).await?;
    assert_eq!((stats["sessions"].as_u64(), stats["subscriptions"].as_u64()), (Some(0), Some(0)));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_must_arrive_within_the_handshake_timeout() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let gw = TestGateway::start_with(|cfg| cfg.websocket.handshake_timeout = Duration::from_millis(200)).await?;
    let mut ws = raw_ws(&gw.ws, Some("switchboard.v1.json")).await?;
    let started = Instant::now();
    let frame = match tokio::time::timeout(WAIT, ws.next()).await? {
        Some(Ok(Message::Text(t))) => proto::json::decode_server_frame(t.as_str())?,
        other => bail!("expected the disconnect frame, got {other:?}"),
    };
    assert_eq!(disconnect_of(&frame)?, (4002, "connect expected".into(), false));
    match tokio::time::timeout(WAIT, ws.next()).await? {
        Some(Ok(Message::Close(Some(c)))) => assert_eq!(u16::from(c.code), 4002),
        other => bail!("expected close 4002, got {other:?}"),
    }
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(150) && waited < Duration::from_secs(5), "closed after {waited:?}");
    assert_eq!(gw.sessions(), 0);
    Ok(())
}

/// Expects the shutdown sequence on a session: `disconnect` 1012, close 1012.
async fn sees_shutdown(mut c: WsClient) -> anyhow::Result<()> {
    let f = c.next_push().await?;
    assert_eq!(disconnect_of(&f)?, (1012, "server shutting down".into(), true));
    assert_eq!(c.closed_with().await?, 1012);
    // Dropping the client ends the TCP connection, so the server need not
    // linger for a close reply.
    drop(c);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_closes_1012_within_the_grace_and_stops_listening() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let grace = Duration::from_secs(8);
    let gw = TestGateway::start_with(|cfg| cfg.shutdown.grace = grace).await?;
    let http_addr = gw.gateway.http_addr.ok_or_else(|| anyhow!("http"))?;
    let admin_addr = gw.gateway.admin_addr.ok_or_else(|| anyhow!("admin"))?;
    let mut a = WsClient::connect(&gw.ws, Codec::Json, "a").await?;
    a.subscribe_to("x").await?;
    let b = WsClient::connect(&gw.ws, Codec::Proto, "b").await?;
    let (mut echo, _) = tokio_tungstenite::connect_async(format!("{}/v1/ws-echo", gw.ws)).await?;
    echo.send(Message::text("hi")).await?;
    assert_eq!(
        tokio::time::timeout(WAIT, echo.next()).await?.ok_or_else(|| anyhow!("echo ended"))??,
        Message::text("hi")
    );
    let router = gw.gateway.router.clone();
    assert_eq!(router.session_count(), 2);

    let started = Instant::now();
    let echo_closed = async {
        match tokio::time::timeout(WAIT, echo.next()).await? {
            Some(Ok(Message::Close(Some(c)))) => Ok(u16::from(c.code)),
            other => bail!("expected the echo route's close, got {other:?}"),
        }
    };
    let ((), ra, rb, re) = tokio::join!(gw.gateway.shutdown(), sees_shutdown(a), sees_shutdown(b), echo_closed);
    let took = started.elapsed();
    ra?;
    rb?;
    assert_eq!(re?, 1012);
    assert!(took < Duration::from_secs(3), "shutdown took {took:?} (grace {grace:?})");
    assert_eq!(router.session_count(), 0);
    refuses_connections(http_addr, Duration::from_secs(2)).await?;
    refuses_connections(admin_addr, Duration::from_secs(2)).await?;
    Ok(())
}
