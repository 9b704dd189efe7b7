//! SSE and long polling over HTTP/2 (cleartext, prior knowledge, with
//! hyper's own HTTP/2 client): the HTTP listener serves HTTP/1.1 and HTTP/2
//! on one port, and a stream over HTTP/2 delivers exactly as over HTTP/1.1.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use switchboard_proto::{json, server_frame};
use switchboard_tests::*;

type Sender = http2::SendRequest<Empty<Bytes>>;

async fn h2_connect(gw: &TestGateway) -> anyhow::Result<Sender> {
    let addr = gw.http.trim_start_matches("http://");
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn get(
    sender: &mut Sender,
    gw: &TestGateway,
    path: &str,
) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
    let req = hyper::Request::get(format!("{}{path}", gw.http)).body(Empty::<Bytes>::new())?;
    Ok(sender.send_request(req).await?)
}

/// Reads body frames until `n` complete SSE events of type `message` arrived;
/// returns their (channel, serial, payload) in order.
async fn messages(body: &mut hyper::body::Incoming, n: usize) -> anyhow::Result<Vec<(String, u64, String)>> {
    let mut buf = String::new();
    let mut out = Vec::new();
    while out.len() < n {
        let frame =
            tokio::time::timeout(WAIT, body.frame()).await?.ok_or_else(|| anyhow::anyhow!("stream ended"))??;
        let Ok(data) = frame.into_data() else { continue };
        buf.push_str(std::str::from_utf8(&data)?);
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            if !event.lines().any(|l| l == "event: message") {
                continue;
            }
            assert!(event.lines().any(|l| l.starts_with("id: ") && l.len() > 4), "every event has an id: {event}");
            let data = event.lines().find_map(|l| l.strip_prefix("data: ")).unwrap_or_default();
            let Some(server_frame::Frame::Message(env)) = json::decode_server_frame(data)?.frame else {
                anyhow::bail!("not a message: {data}");
            };
            out.push((env.channel, env.serial, String::from_utf8(env.payload.to_vec())?));
        }
    }
    Ok(out)
}

#[tokio::test]
async fn sse_and_poll_work_over_http2() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let mut sender = h2_connect(&gw).await?;

    let resp = get(&mut sender, &gw, "/v1/sse?channel=h2/a&channel=h2/%2B").await?;
    assert_eq!(resp.version(), hyper::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    assert_eq!(resp.headers()["cache-control"], "no-cache");
    let mut body = resp.into_body();
    // The stream is subscribed once the admin API counts its filters.
    eventually(WAIT, "the HTTP/2 stream to subscribe", || async { gw.gateway.router.stats().subscriptions == 2 })
        .await?;

    let mut acks = Vec::new();
    for (ch, payload) in [("h2/a", "one"), ("h2/b", "two"), ("h2/a", "three")] {
        let (status, ack) = rest_publish(&gw.http, ch, payload, &[]).await?;
        assert_eq!(status, 200, "{ack}");
        acks.push((ch.to_string(), ack["serial"].as_u64().unwrap_or_default(), payload.to_string()));
    }
    assert_eq!(messages(&mut body, 3).await?, acks);

    // Long polling over the same HTTP/2 connection (another stream on it).
    let poll = get(&mut sender, &gw, "/v1/poll?channel=h2/%2B&rewind=3&timeout=1").await?;
    assert_eq!(poll.version(), hyper::Version::HTTP_2);
    let bytes = poll.into_body().collect().await?.to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&bytes)?;
    let got: Vec<(String, u64)> = v["messages"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| (m["channel"].as_str().unwrap_or("").to_string(), m["serial"].as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(got, vec![("h2/a".into(), 1), ("h2/a".into(), 2), ("h2/b".into(), 1)]);
    Ok(())
}
