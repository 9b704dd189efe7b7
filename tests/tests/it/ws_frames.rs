//! The WebSocket frame layer against the real gateway, with a client that
//! writes its frames by hand: permessage-deflate is negotiated and carries
//! messages both ways on `/v1/ws`, `/mqtt` and `/v1/ws-echo`; a
//! decompression bomb, RSV1 without the extension and
//! invalid UTF-8 get their close codes — the UTF-8 one while the client has
//! not sent the rest of its frame (before the layer, tungstenite waited for
//! the whole frame first). A bystander is served throughout.

use super::common_b;

use anyhow::{Context, bail};
use bytes::Bytes;
use common_b::Bystander;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use switchboard_proto::{self as proto, client_frame, server_frame};
use switchboard_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MASK: [u8; 4] = [0x12, 0x34, 0x56, 0x78];

/// A WebSocket client of raw frames: masks what it sends, compresses when
/// asked (keeping its context unless told not to), inflates what has RSV1.
struct RawClient {
    tcp: TcpStream,
    /// Bytes read and not yet parsed.
    buf: Vec<u8>,
    /// The response's `Sec-WebSocket-Extensions`, if any.
    extensions: Option<String>,
    compress: Compress,
}

impl RawClient {
    async fn connect(gw: &TestGateway, path: &str, extensions: Option<&str>) -> anyhow::Result<Self> {
        Self::connect_with(gw, path, extensions, None).await
    }

    async fn connect_with(
        gw: &TestGateway,
        path: &str,
        extensions: Option<&str>,
        subprotocol: Option<&str>,
    ) -> anyhow::Result<Self> {
        let addr = gw.http.trim_start_matches("http://");
        let mut tcp = TcpStream::connect(addr).await?;
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        );
        if let Some(e) = extensions {
            req.push_str(&format!("Sec-WebSocket-Extensions: {e}\r\n"));
        }
        if let Some(p) = subprotocol {
            req.push_str(&format!("Sec-WebSocket-Protocol: {p}\r\n"));
        }
        req.push_str("\r\n");
        tcp.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 1024];
            let n = tokio::time::timeout(WAIT, tcp.read(&mut chunk)).await??;
            if n == 0 {
                bail!("closed during the handshake");
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8(buf[..end].to_vec())?;
        anyhow::ensure!(head.starts_with("HTTP/1.1 101"), "{head}");
        let extensions = head
            .lines()
            .find_map(|l| l.split_once(':').filter(|(n, _)| n.eq_ignore_ascii_case("sec-websocket-extensions")))
            .map(|(_, v)| v.trim().to_string());
        buf.drain(..end);
        Ok(RawClient { tcp, buf, extensions, compress: Compress::new(Compression::default(), false) })
    }

    async fn send_frame(&mut self, first: u8, payload: &[u8]) -> anyhow::Result<()> {
        self.tcp.write_all(&frame(first, payload)).await?;
        Ok(())
    }

    /// One compressed message (RFC 7692 §7.2.1), in one frame.
    async fn send_compressed(&mut self, opcode: u8, data: &[u8]) -> anyhow::Result<()> {
        if self.extensions.as_deref().is_some_and(|e| e.contains("client_no_context_takeover")) {
            self.compress.reset();
        }
        let body = deflate(&mut self.compress, data);
        self.send_frame(0x80 | 0x40 | opcode, &body).await
    }

    /// The next frame: (first byte, payload).
    async fn read_frame(&mut self) -> anyhow::Result<(u8, Vec<u8>)> {
        loop {
            if let Some((first, len, at)) = parse(&self.buf)
                && self.buf.len() >= at + len
            {
                let payload = self.buf[at..at + len].to_vec();
                self.buf.drain(..at + len);
                return Ok((first, payload));
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = tokio::time::timeout(WAIT, self.tcp.read(&mut chunk)).await.context("no frame in time")??;
            if n == 0 {
                bail!("connection closed");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next data message as JSON (inflated if it has RSV1; the server
    /// resets its context per message): (was compressed, frame).
    async fn recv_json(&mut self) -> anyhow::Result<(bool, proto::ServerFrame)> {
        let (first, payload) = self.read_frame().await?;
        anyhow::ensure!(first & 0x0f == 1, "expected a text message, got {first:#x}");
        let compressed = first & 0x40 != 0;
        let text = if compressed { inflate(&payload)? } else { payload };
        Ok((compressed, proto::json::decode_server_frame(std::str::from_utf8(&text)?)?))
    }

    /// Reads until the close frame; its code.
    async fn close_code(&mut self) -> anyhow::Result<u16> {
        loop {
            let (first, payload) = self.read_frame().await?;
            if first & 0x0f == 0x8 {
                anyhow::ensure!(payload.len() >= 2, "close without a code");
                return Ok(u16::from_be_bytes([payload[0], payload[1]]));
            }
        }
    }
}

/// A masked client frame.
fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut b = vec![first];
    match payload.len() {
        n @ 0..=125 => b.push(0x80 | n as u8),
        n @ 126..=0xffff => {
            b.push(0x80 | 126);
            b.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            b.push(0x80 | 127);
            b.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    b.extend_from_slice(&MASK);
    b.extend(payload.iter().enumerate().map(|(i, p)| p ^ MASK[i % 4]));
    b
}

/// A server frame's (first byte, payload length, payload offset), once
/// its header is complete.
fn parse(b: &[u8]) -> Option<(u8, usize, usize)> {
    let (len, at) = match *b.get(1)? & 0x7f {
        126 => (u16::from_be_bytes(b.get(2..4)?.try_into().ok()?) as usize, 4),
        127 => (u64::from_be_bytes(b.get(2..10)?.try_into().ok()?) as usize, 10),
        n => (usize::from(n), 2),
    };
    Some((b[0], len, at))
}

fn deflate(c: &mut Compress, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 1024);
    let start = c.total_in();
    loop {
        let at = (c.total_in() - start) as usize;
        c.compress_vec(&data[at..], &mut out, FlushCompress::Sync).expect("compress");
        if out.len() < out.capacity() {
            break;
        }
        out.reserve(out.capacity());
    }
    out.truncate(out.len() - 4);
    out
}

fn inflate(payload: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut d = Decompress::new(false);
    let input = [payload, &[0, 0, 0xff, 0xff]].concat();
    let mut out = Vec::with_capacity(input.len() * 8 + 1024);
    loop {
        let at = d.total_in() as usize;
        d.decompress_vec(&input[at..], &mut out, FlushDecompress::Sync)?;
        if d.total_in() as usize == input.len() && out.len() < out.capacity() {
            return Ok(out);
        }
        out.reserve(out.capacity());
    }
}

fn publish_json(req: u64, channel: &str, payload: &[u8]) -> String {
    client_frame_json(&proto::ClientFrame {
        req,
        frame: Some(client_frame::Frame::Publish(proto::Publish {
            channel: channel.into(),
            payload: Bytes::copy_from_slice(payload),
            ..Default::default()
        })),
    })
}

fn subscribe_json(req: u64, filter: &str) -> String {
    client_frame_json(&proto::ClientFrame {
        req,
        frame: Some(client_frame::Frame::Subscribe(proto::Subscribe { filter: filter.into(), ..Default::default() })),
    })
}

/// The headline case: deflate negotiated on `/v1/ws`, compressed requests
/// in, compressed deliveries out, up to a payload at the size limit; small
/// replies go uncompressed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permessage_deflate_carries_messages_both_ways() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let bystander = Bystander::join(&gw).await?;
    let offer = "permessage-deflate; client_max_window_bits";
    let mut c = RawClient::connect(&gw, "/v1/ws?client_id=deflater", Some(offer)).await?;
    assert_eq!(
        c.extensions.as_deref(),
        Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover")
    );
    let (_, hello) = c.recv_json().await?;
    assert!(matches!(hello.frame, Some(server_frame::Frame::Connected(_))), "{hello:?}");
    c.send_compressed(1, subscribe_json(1, "deflate/#").as_bytes()).await?;
    let (compressed, sub) = c.recv_json().await?;
    assert!(!compressed, "a small reply goes uncompressed");
    assert!(matches!(sub.frame, Some(server_frame::Frame::Subscribed(_))), "{sub:?}");
    // Compressible payloads of growing size, the last just under the
    // router's message limit (64 KiB by default, channel name included).
    let limit = gw.gateway.router.limits().max_message_size - "deflate/a".len() - 8;
    for (i, size) in [300usize, 20_000, limit].into_iter().enumerate() {
        let payload: Vec<u8> = b"{\"temp\":21.5,\"unit\":\"C\"}".iter().copied().cycle().take(size).collect();
        let req = 10 + i as u64;
        c.send_compressed(1, publish_json(req, "deflate/a", &payload).as_bytes()).await?;
        let mut saw = (false, false);
        while saw != (true, true) {
            let (compressed, f) = c.recv_json().await?;
            match f.frame {
                Some(server_frame::Frame::PublishAck(a)) => {
                    assert_eq!((f.req, a.channel.as_str()), (req, "deflate/a"));
                    saw.0 = true;
                }
                Some(server_frame::Frame::Message(m)) => {
                    assert_eq!(m.payload.len(), size);
                    assert_eq!(&m.payload[..], &payload[..]);
                    assert!(compressed, "a delivery of {size} bytes is compressed");
                    saw.1 = true;
                }
                other => bail!("unexpected {other:?}"),
            }
        }
    }
    // Uncompressed messages still work on a deflate connection.
    c.send_frame(0x81, publish_json(20, "deflate/b", b"plain").as_bytes()).await?;
    let (_, ack) = c.recv_json().await?;
    assert_eq!(ack.req, 20);
    bystander.still_served(&gw).await
}

/// A compressed message that inflates beyond the message limit closes with
/// 1009 while inflating, and nothing is allocated for the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decompression_bomb_closes_1009() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let bystander = Bystander::join(&gw).await?;
    let mut c = RawClient::connect(&gw, "/v1/ws?client_id=bomber", Some("permessage-deflate")).await?;
    assert!(c.extensions.is_some());
    let bomb = deflate(&mut Compress::new(Compression::best(), false), &vec![b'a'; 256 << 20]);
    assert!(bomb.len() < 1 << 20, "the bomb is {} bytes", bomb.len());
    c.send_frame(0xc1, &bomb).await?;
    assert_eq!(c.close_code().await?, 1009);
    bystander.still_served(&gw).await
}

/// RSV1 on a connection that did not negotiate permessage-deflate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsv1_without_negotiation_closes_1002() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let bystander = Bystander::join(&gw).await?;
    let mut c = RawClient::connect(&gw, "/v1/ws?client_id=rsv", None).await?;
    assert_eq!(c.extensions, None);
    let body = deflate(&mut Compress::new(Compression::default(), false), b"{\"type\":\"ping\",\"req\":1}");
    c.send_frame(0xc1, &body).await?;
    assert_eq!(c.close_code().await?, 1002);
    // An offer the server cannot honour is declined, not half accepted.
    let c =
        RawClient::connect(&gw, "/v1/ws?client_id=rsv2", Some("permessage-deflate; server_max_window_bits=9")).await?;
    assert_eq!(c.extensions, None);
    bystander.still_served(&gw).await
}

/// The regression test of #13 item 19: invalid UTF-8 in the first bytes of
/// a large text frame closes with 1007 while the rest of the frame has not
/// been sent (tungstenite alone waited for the whole frame); the same for
/// the first fragment of a long fragmented message, and inside a compressed
/// message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_closes_1007_before_the_message_is_complete() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let bystander = Bystander::join(&gw).await?;

    // One 512 KiB frame, of which only the header and 64 bytes are sent.
    let mut c = RawClient::connect(&gw, "/v1/ws?client_id=utf8a", None).await?;
    let mut payload = vec![b'a'; 512 * 1024];
    payload[40] = 0xff;
    let whole = frame(0x81, &payload);
    c.tcp.write_all(&whole[..14 + 64]).await?;
    assert_eq!(c.close_code().await?, 1007, "closed with the rest of the frame unsent");

    // The first fragment of a message announced as long.
    let mut c = RawClient::connect(&gw, "/v1/ws?client_id=utf8b", None).await?;
    c.send_frame(0x01, b"{\"type\":\"publish\",\"text\":\"\xc3\x28").await?;
    assert_eq!(c.close_code().await?, 1007, "closed before the other fragments");

    // Inside a compressed message, also with the rest unsent.
    let mut c = RawClient::connect(&gw, "/v1/ws?client_id=utf8c", Some("permessage-deflate")).await?;
    let body = deflate(&mut Compress::new(Compression::default(), false), b"{\"type\":\"\xfe");
    c.send_frame(0x41, &body).await?;
    assert_eq!(c.close_code().await?, 1007);
    bystander.still_served(&gw).await
}

/// The echo route negotiates deflate through the same upgrade.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_route_speaks_deflate() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let mut c = RawClient::connect(&gw, "/v1/ws-echo", Some("permessage-deflate")).await?;
    assert!(c.extensions.is_some());
    let big = "echo ".repeat(50_000);
    c.send_compressed(1, big.as_bytes()).await?;
    let (first, payload) = c.read_frame().await?;
    assert_eq!(first, 0xc1, "a compressed, final text frame");
    assert_eq!(inflate(&payload)?, big.as_bytes());
    Ok(())
}

/// MQTT over WebSocket (`/mqtt`) negotiates deflate through the same
/// upgrade: a compressed CONNECT and SUBSCRIBE are understood, and a PUBLISH
/// of 1 000 bytes comes back compressed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_websocket_speaks_deflate() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let mut c = RawClient::connect_with(&gw, "/mqtt", Some("permessage-deflate"), Some("mqtt")).await?;
    assert!(c.extensions.is_some());
    // MQTT 3.1.1 CONNECT, clean session, keep alive 60, empty client id.
    c.send_compressed(2, &[0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 0]).await?;
    assert_eq!(c.read_frame().await?, (0x82, vec![0x20, 2, 0, 0]), "CONNACK, uncompressed (small)");
    c.send_compressed(2, &[0x82, 6, 0, 1, 0, 1, b't', 0]).await?;
    assert_eq!(c.read_frame().await?, (0x82, vec![0x90, 3, 0, 1, 0]), "SUBACK");
    let payload: Vec<u8> = b"mqtt over deflate ".iter().copied().cycle().take(1000).collect();
    // PUBLISH QoS 0 to `t`: remaining length 1 003 = varint EB 07.
    let publish = [&[0x30, 0xeb, 0x07, 0, 1, b't'][..], &payload].concat();
    c.send_compressed(2, &publish).await?;
    let (first, body) = c.read_frame().await?;
    assert_eq!(first, 0xc2, "a compressed binary message");
    assert_eq!(inflate(&body)?, publish);
    Ok(())
}
