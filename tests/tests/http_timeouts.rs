//! HTTP timeouts after the front door (docs/protocol.md, "Limits"; #13
//! item 5): a slow request head, a slow request body, an idle keep-alive
//! connection and a client that stops reading are each cut after their
//! `[http]` timeout, on every HTTP path — the front door's own HTTP/1.1
//! (SSE and long-poll GETs), hyper's HTTP/1.1 (REST and everything else
//! after the first request), HTTP/2 (h2c with prior knowledge, and by ALPN
//! over TLS) and HTTPS/1.1 — and each counts in
//! `switchboard_http_timeouts_total{kind}`. Long-lived requests (a long
//! poll waiting, an SSE stream, a WebSocket) outlive the idle and header
//! timeouts.
//!
//! Raw TCP clients send half a head or half a body; hyper's HTTP/2 client
//! with small flow-control windows plays the HTTP/2 client that stops
//! reading. The timeouts are short (300 ms to 2 s) and every wait is bounded.

use std::time::Duration;

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use switchboard::edge::config::{CertPair, Config};
use switchboard_tests::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const HEADER: Duration = Duration::from_millis(300);
const BODY: Duration = Duration::from_millis(300);
/// Longer than the others, so that a close shows which timeout it was.
const IDLE: Duration = Duration::from_secs(2);
const WRITE: Duration = Duration::from_millis(500);
/// What a close may take beyond its timeout on a busy machine.
const SLACK: Duration = Duration::from_secs(2);

fn short_timeouts(c: &mut Config) {
    c.http.header_read_timeout = HEADER;
    c.http.body_read_timeout = BODY;
    c.http.idle_timeout = IDLE;
    c.http.write_timeout = WRITE;
}

/// The timeout counter is process-wide and `cargo test` runs this file's
/// tests side by side in one process: the test that asserts no timeout
/// fired holds this exclusively, every other one shares it.
static COUNTERS: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

async fn gateway() -> anyhow::Result<(TestGateway, tokio::sync::RwLockReadGuard<'static, ()>)> {
    let shared = COUNTERS.read().await;
    Ok((TestGateway::start_with(short_timeouts).await?, shared))
}

fn addr(gw: &TestGateway) -> &str {
    gw.http.trim_start_matches("http://")
}

/// `switchboard_http_timeouts_total{kind}`.
async fn timeouts(gw: &TestGateway, kind: &str) -> anyhow::Result<f64> {
    let text = reqwest::get(format!("{}/metrics", gw.admin)).await?.text().await?;
    let label = format!("kind=\"{kind}\"");
    Ok(text
        .lines()
        .filter(|l| l.starts_with("switchboard_http_timeouts_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// Reads one HTTP/1.1 response with a `content-length` body: its head and
/// body.
async fn read_response(s: &mut (impl AsyncRead + Unpin)) -> anyhow::Result<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .context("no content-length")?
                .trim()
                .parse()?;
            while buf.len() < end + 4 + len {
                ensure!(tokio::time::timeout(WAIT, s.read_buf(&mut buf)).await?? > 0, "closed mid-body");
            }
            return Ok((head, buf[end + 4..end + 4 + len].to_vec()));
        }
        ensure!(tokio::time::timeout(WAIT, s.read_buf(&mut buf)).await?? > 0, "closed before a response");
    }
}

/// Reads until the server closes (end of stream or reset) within `within`:
/// what it sent meanwhile, and when it closed.
async fn closed_within(s: &mut (impl AsyncRead + Unpin), within: Duration) -> anyhow::Result<(Vec<u8>, Instant)> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    loop {
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Err(_) => bail!("still open after {within:?} ({} bytes read)", got.len()),
            Ok(Ok(0) | Err(_)) => return Ok((got, Instant::now())),
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Sends `request` on a new connection and reads the response.
async fn keep_alive(gw: &TestGateway, request: &str) -> anyhow::Result<(TcpStream, String)> {
    let mut s = TcpStream::connect(addr(gw)).await?;
    s.write_all(request.as_bytes()).await?;
    let (head, _) = read_response(&mut s).await?;
    ensure!(head.starts_with("http/1.1 200"), "{head}");
    Ok((s, head))
}

/// An HTTP/2 connection with prior knowledge (h2c) and small windows: a
/// body this client does not read stops the server's writes after 64 KiB.
async fn h2c<B>(gw: &TestGateway) -> anyhow::Result<(http2::SendRequest<B>, tokio::task::JoinHandle<()>)>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = TcpStream::connect(addr(gw)).await?;
    h2_over(tcp).await
}

async fn h2_over<B, IO>(io: IO) -> anyhow::Result<(http2::SendRequest<B>, tokio::task::JoinHandle<()>)>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .adaptive_window(false)
        .handshake(TokioIo::new(io))
        .await?;
    // The task ends when the server closes the connection.
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((sender, conn))
}

/// Waits for an HTTP/2 connection's task to end (the server closed it).
async fn h2_closed_within(conn: tokio::task::JoinHandle<()>, within: Duration) -> anyhow::Result<Instant> {
    tokio::time::timeout(within, conn).await.context("the HTTP/2 connection is still open")??;
    Ok(Instant::now())
}

fn get(path: &str) -> anyhow::Result<hyper::Request<Empty<Bytes>>> {
    Ok(hyper::Request::get(format!("http://127.0.0.1{path}")).body(Empty::new())?)
}

/// A request head that stops halfway gets 408 and a close after the header
/// timeout: on the front door (a connection's first request) and on a
/// keep-alive connection hyper serves (after a REST request), where the
/// idle timeout would have waited much longer.
#[tokio::test]
async fn a_slow_request_head_is_cut_after_the_header_timeout() -> anyhow::Result<()> {
    let (gw, _shared) = gateway().await?;

    let mut front = TcpStream::connect(addr(&gw)).await?;
    let sent = Instant::now();
    front.write_all(b"GET /v1/poll?channel=slow HTTP/1.1\r\nHost: x\r\n").await?;
    let (answer, closed) = closed_within(&mut front, HEADER + SLACK).await?;
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 408 "), "{}", String::from_utf8_lossy(&answer));
    assert!(closed - sent >= HEADER, "closed after {:?}", closed - sent);

    let (mut kept, _) = keep_alive(&gw, "GET /v1/channels/slow/history HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    let sent = Instant::now();
    kept.write_all(b"GET /v1/channels/slow/history HTTP/1.1\r\nHo").await?;
    let (_, closed) = closed_within(&mut kept, HEADER + SLACK).await?;
    assert!(closed - sent < IDLE, "the header timeout, not the idle one: {:?}", closed - sent);

    assert!(timeouts(&gw, "header").await? >= 2.0);
    Ok(())
}

/// A request body that stops halfway gets 408 after the body timeout: over
/// HTTP/1.1 (then the connection closes) and over HTTP/2 (the stream).
#[tokio::test]
async fn a_slow_request_body_gets_408() -> anyhow::Result<()> {
    let (gw, _shared) = gateway().await?;

    let mut s = TcpStream::connect(addr(&gw)).await?;
    let sent = Instant::now();
    s.write_all(b"POST /v1/channels/slow/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        .await?;
    let (head, body) = read_response(&mut s).await?;
    assert!(head.starts_with("http/1.1 408"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert!(String::from_utf8_lossy(&body).contains("\"request_timeout\""));
    assert!(sent.elapsed() >= BODY);
    closed_within(&mut s, SLACK).await?;

    // HTTP/2: ten bytes, then a body that never ends.
    type Slow = StreamBody<futures_util::stream::BoxStream<'static, Result<Frame<Bytes>, std::convert::Infallible>>>;
    let (mut sender, _conn) = h2c::<Slow>(&gw).await?;
    use futures_util::StreamExt as _;
    let chunks = futures_util::stream::once(async { Ok(Frame::data(Bytes::from_static(b"0123456789"))) })
        .chain(futures_util::stream::pending());
    let req = hyper::Request::post("http://127.0.0.1/v1/poll").body(StreamBody::new(chunks.boxed()))?;
    let resp = tokio::time::timeout(BODY + SLACK, sender.send_request(req)).await??;
    assert_eq!(resp.status(), 408);

    assert!(timeouts(&gw, "body").await? >= 2.0);
    Ok(())
}

/// Keep-alive connections without a request are closed after the idle
/// timeout, on the front door (after a long poll's answer), on hyper's
/// HTTP/1.1 (after a REST answer) and on HTTP/2 (GOAWAY).
#[tokio::test]
async fn idle_keep_alive_connections_are_closed() -> anyhow::Result<()> {
    let (gw, _shared) = gateway().await?;
    let front = async {
        let (mut s, _) = keep_alive(&gw, "GET /v1/poll?channel=idle/a&timeout=0 HTTP/1.1\r\nHost: x\r\n\r\n").await?;
        let answered = Instant::now();
        let (_, closed) = closed_within(&mut s, IDLE + SLACK).await?;
        anyhow::Ok(closed - answered)
    };
    let hyper1 = async {
        let (mut s, _) = keep_alive(&gw, "GET /v1/channels/idle/history HTTP/1.1\r\nHost: x\r\n\r\n").await?;
        let answered = Instant::now();
        let (_, closed) = closed_within(&mut s, IDLE + SLACK).await?;
        anyhow::Ok(closed - answered)
    };
    let hyper2 = async {
        let (mut sender, conn) = h2c::<Empty<Bytes>>(&gw).await?;
        let resp = sender.send_request(get("/v1/channels/idle/history")?).await?;
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await?;
        let answered = Instant::now();
        anyhow::Ok(h2_closed_within(conn, IDLE + SLACK).await? - answered)
    };
    let (front, hyper1, hyper2) = tokio::join!(front, hyper1, hyper2);
    for (what, after) in [("front door", front?), ("HTTP/1.1", hyper1?), ("HTTP/2", hyper2?)] {
        assert!(after >= IDLE - Duration::from_millis(100), "{what}: closed after {after:?}, before the idle timeout");
    }
    assert!(timeouts(&gw, "idle").await? >= 3.0);
    Ok(())
}

/// Requests that take long are not cut by the idle or header timeouts: long
/// polls waiting past them (front door and hyper), an SSE stream over
/// HTTP/2 and a WebSocket, each quiet for longer than the idle timeout.
#[tokio::test]
async fn long_requests_outlive_the_idle_and_header_timeouts() -> anyhow::Result<()> {
    let _alone = COUNTERS.write().await;
    let gw = TestGateway::start_with(short_timeouts).await?;
    let before = timeouts(&gw, "idle").await? + timeouts(&gw, "header").await?;
    let wait = IDLE + Duration::from_secs(1);
    let secs = wait.as_secs_f64();

    let front_poll = async {
        let started = Instant::now();
        let request = format!("GET /v1/poll?channel=long/a&timeout={secs} HTTP/1.1\r\nHost: x\r\n\r\n");
        let (_, head) = keep_alive(&gw, &request).await?;
        ensure!(started.elapsed() >= wait, "answered early: {head}");
        anyhow::Ok(())
    };
    let hyper_poll = async {
        let body = format!("channel=long/b&timeout={secs}");
        let request = format!(
            "POST /v1/poll HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let started = Instant::now();
        keep_alive(&gw, &request).await?;
        ensure!(started.elapsed() >= wait, "answered early");
        anyhow::Ok(())
    };
    let sse_h2 = async {
        let (mut sender, _conn) = h2c::<Empty<Bytes>>(&gw).await?;
        let resp = sender.send_request(get("/v1/sse?channel=long/c")?).await?;
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        tokio::time::sleep(wait).await;
        let (status, _) = rest_publish(&gw.http, "long/c", "still here", &[]).await?;
        assert_eq!(status, 200);
        let mut text = String::new();
        while !text.contains("still here") {
            let frame = tokio::time::timeout(WAIT, body.frame()).await?.context("the stream ended")??;
            if let Ok(data) = frame.into_data() {
                text.push_str(&String::from_utf8_lossy(&data));
            }
        }
        anyhow::Ok(())
    };
    let ws = async {
        let mut c = WsClient::connect(&gw.ws, Codec::Json, "long-ws").await?;
        c.subscribe_to("long/d").await?;
        tokio::time::sleep(wait).await;
        c.publish("long/d", b"still here", "").await?;
        assert_eq!(c.next_message().await?.payload, Bytes::from_static(b"still here"));
        anyhow::Ok(())
    };
    let (a, b, c, d) = tokio::join!(front_poll, hyper_poll, sse_h2, ws);
    a.context("front-door long poll")?;
    b.context("POST long poll")?;
    c.context("SSE over HTTP/2")?;
    d.context("WebSocket")?;
    assert_eq!(timeouts(&gw, "idle").await? + timeouts(&gw, "header").await?, before);
    Ok(())
}

/// A client that stops reading is dropped after the write timeout: an SSE
/// stream on the front door and one over HTTP/2 (whose client stops
/// granting flow-control window, so no socket write ever blocks), and a
/// large REST answer on hyper's HTTP/1.1. Without the timeout each would
/// hold the connection, and what it buffered, for as long as the client
/// lives.
#[tokio::test]
async fn a_client_that_stops_reading_is_dropped() -> anyhow::Result<()> {
    const MIB: usize = 1024 * 1024;
    let _shared = COUNTERS.read().await;
    let gw = TestGateway::start_with(|c| {
        short_timeouts(c);
        c.limits.max_message_size = MIB;
        c.limits.max_frame_size = 2 * MIB;
        c.limits.max_body_size = 2 * MIB;
        // The outbox must not overflow first: this is about the socket.
        c.limits.outbox_bytes = 256 * MIB;
        c.channels.history_size = 24;
        c.channels.history_page_bytes = 64 * MIB;
    })
    .await?;
    let small_window = || -> anyhow::Result<tokio::net::TcpSocket> {
        let s = tokio::net::TcpSocket::new_v4()?;
        s.set_recv_buffer_size(4096)?;
        Ok(s)
    };
    let megabyte = "x".repeat(MIB - 1024);

    // SSE over HTTP/2: at most 64 KiB of window, never read.
    let (mut sender, h2_conn) = h2c::<Empty<Bytes>>(&gw).await?;
    let resp = sender.send_request(get("/v1/sse?channel=stuck/h2")?).await?;
    assert_eq!(resp.status(), 200);
    let _unread = resp.into_body();
    // SSE on the front door, with a small receive buffer, never read.
    let mut front = small_window()?.connect(addr(&gw).parse()?).await?;
    front.write_all(b"GET /v1/sse?channel=stuck/front HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    eventually(WAIT, "both streams to subscribe", || async { gw.gateway.router.stats().subscriptions == 2 }).await?;
    for _ in 0..16 {
        for channel in ["stuck/h2", "stuck/front", "stuck/rest"] {
            let (status, body) = rest_publish(&gw.http, channel, megabyte.clone(), &[]).await?;
            ensure!(status == 200, "{status} {body}");
        }
    }
    // Reading now would unblock the writes: the gateway's count tells.
    eventually(WRITE + SLACK + SLACK, "both streams' writes to time out", || async {
        timeouts(&gw, "write").await.is_ok_and(|n| n >= 2.0)
    })
    .await?;
    h2_closed_within(h2_conn, SLACK).await.context("SSE over HTTP/2")?;
    let (got, _) = closed_within(&mut front, WAIT).await.context("SSE on the front door")?;
    assert!(got.len() < 16 * megabyte.len(), "the stream was cut, not finished ({} bytes)", got.len());

    // A 16 MiB history page, never read: hyper's HTTP/1.1.
    let mut rest = small_window()?.connect(addr(&gw).parse()?).await?;
    rest.write_all(b"GET /v1/channels/stuck/rest/history?limit=16 HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    eventually(WRITE + SLACK + SLACK, "the REST answer's write to time out", || async {
        timeouts(&gw, "write").await.is_ok_and(|n| n >= 3.0)
    })
    .await?;
    let (got, _) = closed_within(&mut rest, WAIT).await.context("REST over HTTP/1.1")?;
    assert!(got.len() < 16 * megabyte.len(), "the answer was cut, not finished ({} bytes)", got.len());
    eventually(WAIT, "the streams' sessions to end", || async { gw.sessions() == 0 }).await?;
    Ok(())
}

/// The same over TLS: a slow head on HTTPS/1.1 (the front door) gets 408,
/// and an HTTP/2 connection by ALPN is closed once idle.
#[tokio::test]
async fn https_connections_time_out_too() -> anyhow::Result<()> {
    let _shared = COUNTERS.read().await;
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let dir = std::env::temp_dir().join(format!("sb-http-timeouts-{}", std::process::id()));
    let files = switchboard::edge::tls::write_dev_ca(&dir, "device", &["localhost"])?;
    let pair = CertPair { cert: files.server_cert.display().to_string(), key: files.server_key.display().to_string() };
    let gw = TestGateway::start_with(|c| {
        short_timeouts(c);
        c.listen.https = "127.0.0.1:0".into();
        c.tls.certificates = vec![pair];
    })
    .await?;
    let https = gw.gateway.https_addr.context("https listener")?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&files.ca)? {
        roots.add(cert?)?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    let connect = |alpn: &'static [u8]| {
        let mut cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
        cfg.alpn_protocols = vec![alpn.to_vec()];
        async move {
            let tcp = TcpStream::connect(https).await?;
            let name = rustls::pki_types::ServerName::try_from("localhost")?;
            let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg)).connect(name, tcp).await?;
            anyhow::Ok(tls)
        }
    };

    let mut h1 = connect(b"http/1.1").await?;
    h1.write_all(b"GET /v1/sse?channel=tls HTTP/1.1\r\nHost: x\r\n").await?;
    let (answer, _) = closed_within(&mut h1, HEADER + SLACK).await?;
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 408 "));

    let tls = connect(b"h2").await?;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) = h2_over::<Full<Bytes>, _>(tls).await?;
    let resp = sender.send_request(hyper::Request::get("https://localhost/").body(Full::default())?).await?;
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await?;
    let answered = Instant::now();
    let closed = h2_closed_within(conn, IDLE + SLACK).await?;
    assert!(closed - answered >= IDLE - Duration::from_millis(100));
    Ok(())
}
