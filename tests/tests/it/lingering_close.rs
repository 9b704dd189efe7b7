//! A lingering close: when the gateway closes a connection for a protocol
//! violation while the client is still sending (the rest of an oversize
//! message, more packets), the client still gets the reason — the MQTT 5
//! DISCONNECT, a refusing CONNACK, the WebSocket close frame — followed by
//! an orderly end of stream, and its own writes are not reset: the gateway
//! shuts its write side down and drains the client's input (bounded) before
//! it closes, instead of closing with unread input, which the kernel
//! answers with a TCP reset.

use super::common_mqtt::{connect_packet, packet, varint};

use std::time::Duration;

use anyhow::{Context, bail};
use switchboard_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_tungstenite::MaybeTlsStream;

/// How the client keeps sending after its violation: a chunk every 5 ms for
/// 300 ms (well inside the gateway's linger bounds of 1 s and 256 KiB).
const CHUNK: usize = 512;
const CHUNKS: usize = 60;
const EVERY: Duration = Duration::from_millis(5);

/// Writes `chunk` every [`EVERY`], [`CHUNKS`] times: a client that has not
/// noticed it is being closed. Err with the first write error.
async fn keep_sending(mut wr: OwnedWriteHalf, chunk: Vec<u8>) -> std::io::Result<()> {
    for _ in 0..CHUNKS {
        wr.write_all(&chunk).await?;
        tokio::time::sleep(EVERY).await;
    }
    // Done: close our side, as a client that read the server's EOF does.
    wr.shutdown().await
}

/// Reads everything until the server's end of stream; an error (a reset)
/// instead of EOF is the failure this file is about.
async fn read_to_eof(rd: &mut OwnedReadHalf, buf: &mut Vec<u8>) -> anyhow::Result<()> {
    let read = async {
        loop {
            let mut chunk = [0u8; 4096];
            match rd.read(&mut chunk).await {
                Ok(0) => return Ok(()),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) => bail!("{e} (kind {:?}) after {buf:02x?} instead of an orderly end of stream", e.kind()),
            }
        }
    };
    tokio::time::timeout(WAIT, read).await.context("no end of stream")?
}

/// Sends `violation`, then keeps sending `more`; returns what the server
/// sent (beyond `before`, bytes already read), once it ended the stream and
/// the client's writes all went through.
async fn close_while_sending(
    stream: TcpStream,
    before: Vec<u8>,
    violation: Vec<u8>,
    more: Vec<u8>,
) -> anyhow::Result<Vec<u8>> {
    let (mut rd, mut wr) = stream.into_split();
    wr.write_all(&violation).await?;
    let writer = tokio::spawn(keep_sending(wr, more));
    let mut got = before;
    let skip = got.len();
    read_to_eof(&mut rd, &mut got).await?;
    tokio::time::timeout(WAIT, writer)
        .await
        .context("writer stuck")??
        .context("the client's writes after the close were reset")?;
    Ok(got.split_off(skip))
}

/// An MQTT 5 connection after a successful CONNECT; returns what was read
/// beyond the CONNACK.
async fn mqtt5_connected(gw: &TestGateway, id: &str) -> anyhow::Result<(TcpStream, Vec<u8>)> {
    let mut s = TcpStream::connect(gw.mqtt).await?;
    s.set_nodelay(true)?;
    s.write_all(&connect_packet(5, id, 30, None, &[])).await?;
    let mut buf = Vec::new();
    while buf.len() < 2 || buf.len() < 2 + usize::from(buf[1]) {
        let mut chunk = [0u8; 256];
        let n = tokio::time::timeout(WAIT, s.read(&mut chunk)).await.context("no CONNACK")??;
        anyhow::ensure!(n > 0, "closed instead of CONNACK");
        buf.extend_from_slice(&chunk[..n]);
    }
    anyhow::ensure!(buf[0] == 0x20 && buf[3] == 0, "expected a successful CONNACK, got {buf:02x?}");
    let rest = buf.split_off(2 + usize::from(buf[1]));
    Ok((s, rest))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_disconnect_reaches_a_client_still_sending_an_oversize_packet() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|cfg| cfg.mqtt.max_packet_size = 1024).await?;
    let (stream, rest) = mqtt5_connected(&gw, "linger-big").await?;
    // A PUBLISH announcing 64 KiB: refused from its fixed header (0x95)
    // while its body is still on the way.
    let mut header = vec![0x30];
    varint(64 * 1024, &mut header);
    let got = close_while_sending(stream, rest, header, vec![b'x'; CHUNK]).await?;
    assert_eq!(got, [0xE0, 0x02, 0x95, 0x00], "DISCONNECT 0x95 (packet too large), then EOF");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_disconnect_reaches_a_client_that_keeps_publishing() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let (stream, rest) = mqtt5_connected(&gw, "linger-topic").await?;
    // PUBLISH QoS 0 to `a/+` (a wildcard: 0x90), then more publishes.
    let publish = |topic: &[u8]| {
        let mut b = Vec::new();
        b.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        b.extend_from_slice(topic);
        b.push(0); // no properties
        b.extend_from_slice(b"payload");
        packet(0x30, &b)
    };
    let more: Vec<u8> = std::iter::repeat_n(publish(b"ok/1"), CHUNK / 16).flatten().collect();
    let got = close_while_sending(stream, rest, publish(b"a/+"), more).await?;
    assert_eq!(got, [0xE0, 0x02, 0x90, 0x00], "DISCONNECT 0x90 (topic name invalid), then EOF");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_connack_refusal_reaches_a_client_that_keeps_sending() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let stream = TcpStream::connect(gw.mqtt).await?;
    stream.set_nodelay(true)?;
    // Protocol level 3 (MQTT 3.1): CONNACK 0x01, then close.
    let got =
        close_while_sending(stream, Vec::new(), connect_packet(3, "old", 30, None, &[]), vec![0xC0, 0x00]).await?;
    assert_eq!(got, [0x20, 0x02, 0x00, 0x01], "CONNACK 0x01, then EOF");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_close_frame_reaches_a_client_still_sending_an_oversize_message() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|cfg| cfg.limits.max_frame_size = 64 * 1024).await?;
    let ws = raw_ws(&gw.ws, Some("switchboard.v1.proto")).await?;
    let MaybeTlsStream::Plain(stream) = ws.into_inner() else { bail!("expected plain TCP") };
    stream.set_nodelay(true)?;
    // A masked binary frame announcing 1 MiB (over the 64 KiB limit: 1009),
    // whose payload keeps coming.
    let mut header = vec![0x82, 0x80 | 127];
    header.extend_from_slice(&(1u64 << 20).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    let got = close_while_sending(stream, Vec::new(), header, vec![0u8; CHUNK]).await?;
    // One unmasked close frame: 1009 `message too large`.
    let reason = b"message too large";
    let mut want = vec![0x88, 2 + reason.len() as u8];
    want.extend_from_slice(&1009u16.to_be_bytes());
    want.extend_from_slice(reason);
    assert_eq!(got, want, "close 1009, then EOF");
    Ok(())
}
