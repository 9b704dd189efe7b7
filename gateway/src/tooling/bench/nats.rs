//! A minimal NATS core client for comparing against nats-server: the text
//! protocol (`INFO`, `CONNECT`, `SUB`, `PUB`, `MSG`, `PING`/`PONG`, `+OK`,
//! `-ERR`) over TCP (`--proto nats`) or inside WebSocket binary frames as
//! nats-server's `websocket` listener speaks it (`--proto nats-ws`).
//!
//! The codec ([`decode`], the `encode_*` functions, [`subject_for`]) is pure:
//! no I/O, no clock; "need more bytes" is `Ok(None)`. The clients around it
//! ([`NatsSub`], [`NatsPub`]) connect with `verbose: false, pedantic: false,
//! headers: false`, so the server never acknowledges a `PUB` and never sends
//! `HMSG` (it is still parsed, for robustness). A subscription is confirmed
//! with a `PING` after the `SUB`: the server handles a connection's commands
//! in order, so its `PONG` means the `SUB` is in place.
//!
//! JetStream (`bench publish --proto nats-js`, [`NatsJsPub`]) is the core
//! protocol too: a publish is `PUB subject reply payload` into a subject a
//! stream captures, and the stream's acknowledgement — JSON
//! `{"stream":..,"seq":..}` or `{"error":{..}}` ([`parse_js_ack`]) — arrives as
//! a `MSG` on the reply subject. Each publisher subscribes to its own inbox
//! `_INBOX.<id>.*` and numbers its replies `_INBOX.<id>.<ticket>`
//! ([`reply_ticket`]), so acks are matched to publishes in any order. The
//! stream is created with a `$JS.API.STREAM.CREATE.<name>` request
//! ([`stream_config`]). This is a load client, not a NATS library: no
//! reconnects, no TLS, no auth, no general request/reply.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use super::BenchError;
use super::clients::{self, HANDSHAKE_TIMEOUT, Target};

/// Longest control line accepted (nats-server's own default `max_control_line` is 4 KiB).
pub const MAX_CONTROL_LINE: usize = 4096;
/// Largest payload accepted (nats-server's default `max_payload` is 1 MiB).
pub const MAX_PAYLOAD: usize = 64 << 20;

/// One operation the server sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerOp {
    /// `INFO {json}`: the JSON text.
    Info(String),
    /// `MSG subject sid [reply] n` (or `HMSG`, whose headers are dropped).
    Msg {
        /// Subject the message was published on.
        subject: Bytes,
        /// Subscription id it matched.
        sid: u64,
        /// Reply subject, if the publisher gave one.
        reply: Option<Bytes>,
        /// The payload (headers excluded).
        payload: Bytes,
    },
    /// `PING`: answer with `PONG`.
    Ping,
    /// `PONG`.
    Pong,
    /// `+OK` (only in verbose mode).
    Ok,
    /// `-ERR 'message'`: the message without quotes.
    Err(String),
}

/// A malformed server stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// No `\r\n` within [`MAX_CONTROL_LINE`] bytes.
    #[error("NATS control line longer than {MAX_CONTROL_LINE} bytes")]
    LineTooLong,
    /// An operation this client does not know.
    #[error("unknown NATS operation {0:?}")]
    UnknownOp(String),
    /// Arguments that do not parse.
    #[error("bad NATS {op} arguments {line:?}")]
    BadArgs {
        /// The operation.
        op: &'static str,
        /// The control line.
        line: String,
    },
    /// A payload not followed by `\r\n`.
    #[error("NATS payload not terminated by CRLF")]
    Unterminated,
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

fn parse_usize(s: &[u8]) -> Option<usize> {
    if s.is_empty() || s.len() > 19 {
        return None;
    }
    s.iter().try_fold(0usize, |n, &b| b.is_ascii_digit().then(|| n * 10 + usize::from(b - b'0')))
}

/// Decodes the next server operation from `buf`, consuming it; `Ok(None)`
/// when `buf` holds only part of one (nothing is consumed then).
pub fn decode(buf: &mut BytesMut) -> Result<Option<ServerOp>, CodecError> {
    let Some(eol) = find_crlf(buf) else {
        return if buf.len() > MAX_CONTROL_LINE { Err(CodecError::LineTooLong) } else { Ok(None) };
    };
    if eol > MAX_CONTROL_LINE {
        return Err(CodecError::LineTooLong);
    }
    let line = &buf[..eol];
    let op_end = line.iter().position(|b| *b == b' ' || *b == b'\t').unwrap_or(line.len());
    let op = line[..op_end].to_ascii_uppercase();
    let bad = |op: &'static str, line: &[u8]| CodecError::BadArgs { op, line: String::from_utf8_lossy(line).into() };
    match op.as_slice() {
        b"MSG" | b"HMSG" => {
            let headers = op.as_slice() == b"HMSG";
            let name = if headers { "HMSG" } else { "MSG" };
            let args: Vec<&[u8]> =
                line[op_end..].split(|b| *b == b' ' || *b == b'\t').filter(|a| !a.is_empty()).collect();
            // MSG subject sid [reply] n; HMSG subject sid [reply] header_n total_n.
            let sizes = if headers { 2 } else { 1 };
            if args.len() != 2 + sizes && args.len() != 3 + sizes {
                return Err(bad(name, line));
            }
            let has_reply = args.len() == 3 + sizes;
            let sid = parse_usize(args[1]).ok_or_else(|| bad(name, line))? as u64;
            let total = parse_usize(args[args.len() - 1]).ok_or_else(|| bad(name, line))?;
            let header_len =
                if headers { parse_usize(args[args.len() - 2]).ok_or_else(|| bad(name, line))? } else { 0 };
            if total > MAX_PAYLOAD || header_len > total {
                return Err(bad(name, line));
            }
            // Offsets into the line, so the owned slices can be cut after it is split off.
            let offset = |a: &[u8]| a.as_ptr() as usize - buf.as_ptr() as usize;
            let subject_range = (offset(args[0]), args[0].len());
            let reply_range = has_reply.then(|| (offset(args[2]), args[2].len()));
            if buf.len() < eol + 2 + total + 2 {
                return Ok(None);
            }
            if &buf[eol + 2 + total..eol + 2 + total + 2] != b"\r\n" {
                return Err(CodecError::Unterminated);
            }
            let frame = buf.split_to(eol + 2 + total + 2).freeze();
            let slice = |(start, len): (usize, usize)| frame.slice(start..start + len);
            Ok(Some(ServerOp::Msg {
                subject: slice(subject_range),
                sid,
                reply: reply_range.map(slice),
                payload: frame.slice(eol + 2 + header_len..eol + 2 + total),
            }))
        }
        b"PING" => {
            buf.advance(eol + 2);
            Ok(Some(ServerOp::Ping))
        }
        b"PONG" => {
            buf.advance(eol + 2);
            Ok(Some(ServerOp::Pong))
        }
        b"+OK" => {
            buf.advance(eol + 2);
            Ok(Some(ServerOp::Ok))
        }
        b"-ERR" => {
            let msg = String::from_utf8_lossy(&line[op_end..]).trim().trim_matches('\'').to_string();
            buf.advance(eol + 2);
            Ok(Some(ServerOp::Err(msg)))
        }
        b"INFO" => {
            let json = String::from_utf8_lossy(&line[op_end..]).trim().to_string();
            buf.advance(eol + 2);
            Ok(Some(ServerOp::Info(json)))
        }
        _ => Err(CodecError::UnknownOp(String::from_utf8_lossy(&op).into())),
    }
}

/// The NATS subject for a bench channel name: MQTT-style `/` levels become
/// `.` tokens; nothing else changes.
///
/// | channel | subject |
/// |---|---|
/// | `bench/1a2b3c4d/0` | `bench.1a2b3c4d.0` |
/// | `bench/1a2b3c4d/idle/63` | `bench.1a2b3c4d.idle.63` |
/// | `demo` | `demo` |
///
/// The bench's own channel names have no `.`, spaces or empty levels, so
/// the mapping is one-to-one for them (it is not for arbitrary channels:
/// `a.b` and `a/b` would meet).
pub fn subject_for(channel: &str) -> String {
    channel.replace('/', ".")
}

/// `CONNECT` for a quiet client: no `+OK` per command, no headers, no echo
/// of its own messages (publishers do not subscribe anyway).
pub fn encode_connect(name: &str) -> Vec<u8> {
    let opts = serde_json::json!({
        "verbose": false,
        "pedantic": false,
        "tls_required": false,
        "name": name,
        "lang": "rust",
        "version": env!("CARGO_PKG_VERSION"),
        "protocol": 1,
        "echo": false,
        "headers": false,
        "no_responders": false,
    });
    format!("CONNECT {opts}\r\n").into_bytes()
}

/// `SUB subject sid` followed by `PING` (whose `PONG` confirms the `SUB`).
pub fn encode_sub_ping(subject: &str, sid: u64) -> Vec<u8> {
    format!("SUB {subject} {sid}\r\nPING\r\n").into_bytes()
}

/// Appends `PUB subject n\r\npayload\r\n` to `out`.
pub fn encode_pub(out: &mut BytesMut, subject: &str, payload: &[u8]) {
    out.reserve(subject.len() + payload.len() + 32);
    out.put_slice(b"PUB ");
    out.put_slice(subject.as_bytes());
    out.put_u8(b' ');
    out.put_slice(payload.len().to_string().as_bytes());
    out.put_slice(b"\r\n");
    out.put_slice(payload);
    out.put_slice(b"\r\n");
}

/// Appends `PUB subject reply n\r\npayload\r\n` to `out`: a publish whose
/// receiver (a JetStream stream) answers on `reply`.
pub fn encode_pub_reply(out: &mut BytesMut, subject: &str, reply: &str, payload: &[u8]) {
    out.reserve(subject.len() + reply.len() + payload.len() + 32);
    out.put_slice(b"PUB ");
    out.put_slice(subject.as_bytes());
    out.put_u8(b' ');
    out.put_slice(reply.as_bytes());
    out.put_u8(b' ');
    out.put_slice(payload.len().to_string().as_bytes());
    out.put_slice(b"\r\n");
    out.put_slice(payload);
    out.put_slice(b"\r\n");
}

/// The ticket of a reply subject `<inbox>.<ticket>` (decimal); `None` for
/// any other subject.
///
/// | subject | inbox | ticket |
/// |---|---|---|
/// | `_INBOX.ab12.17` | `_INBOX.ab12` | `Some(17)` |
/// | `_INBOX.ab12.api` | `_INBOX.ab12` | `None` (the stream request) |
/// | `_INBOX.ab1.17` | `_INBOX.ab12` | `None` |
pub fn reply_ticket(subject: &[u8], inbox: &str) -> Option<u64> {
    let token = subject.strip_prefix(inbox.as_bytes())?.strip_prefix(b".")?;
    parse_usize(token).map(|n| n as u64)
}

/// A JetStream publish acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsAck {
    /// The stream that stored the message.
    pub stream: String,
    /// Its sequence in the stream.
    pub seq: u64,
    /// The message id was seen before (only with a `Nats-Msg-Id` header).
    pub duplicate: bool,
}

/// What a JetStream API reply reports instead of success.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsError {
    /// `{"error":{"code":..,"err_code":..,"description":..}}`.
    #[error("JetStream error {code} ({err_code}): {description}")]
    Api {
        /// HTTP-like status (400, 503, ...).
        code: u16,
        /// JetStream's own error code (10058: stream name already in use, ...).
        err_code: u32,
        /// What went wrong.
        description: String,
    },
    /// Not the JSON a JetStream reply is.
    #[error("malformed JetStream reply: {0}")]
    Malformed(String),
}

/// The fields of a JetStream reply the bench reads; everything else is ignored.
#[derive(serde::Deserialize)]
struct JsReply {
    #[serde(default)]
    error: Option<JsReplyError>,
    #[serde(default)]
    stream: Option<String>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    duplicate: bool,
}

#[derive(serde::Deserialize)]
struct JsReplyError {
    #[serde(default)]
    code: u16,
    #[serde(default)]
    err_code: u32,
    #[serde(default)]
    description: String,
}

fn js_reply(payload: &[u8]) -> Result<JsReply, JsError> {
    let reply: JsReply = serde_json::from_slice(payload).map_err(|e| {
        JsError::Malformed(format!("{e} in {:?}", String::from_utf8_lossy(&payload[..payload.len().min(200)])))
    })?;
    match reply.error {
        Some(e) => Err(JsError::Api { code: e.code, err_code: e.err_code, description: e.description }),
        None => Ok(reply),
    }
}

/// Parses the reply to a JetStream publish: `{"stream":"S","seq":7}` (and
/// `"duplicate":true` for a repeated message id) or an API error.
pub fn parse_js_ack(payload: &[u8]) -> Result<JsAck, JsError> {
    let r = js_reply(payload)?;
    match (r.stream, r.seq) {
        (Some(stream), Some(seq)) => Ok(JsAck { stream, seq, duplicate: r.duplicate }),
        _ => Err(JsError::Malformed(format!("no stream/seq in {:?}", String::from_utf8_lossy(payload)))),
    }
}

/// Checks the reply to a JetStream API request (stream create): success is
/// any reply without an `error`.
pub fn check_js_api(payload: &[u8]) -> Result<(), JsError> {
    js_reply(payload).map(|_| ())
}

/// The configuration of the stream `bench publish --proto nats-js` writes
/// to: file storage, one replica, the subjects `subjects`, and limits like
/// the gateway's history defaults (`[channels] history_size = 1000` per
/// channel, `history_ttl = "10m"`): at most `max_msgs_per_subject` messages
/// per subject, none older than `max_age`, the oldest discarded first.
/// Creating a stream that exists with this same configuration succeeds, so
/// runs against one server share it.
pub fn stream_config(name: &str, subjects: &str, max_msgs_per_subject: u64, max_age: Duration) -> serde_json::Value {
    serde_json::json!({
        "name": name,
        "subjects": [subjects],
        "retention": "limits",
        "storage": "file",
        "num_replicas": 1,
        "discard": "old",
        "max_msgs_per_subject": max_msgs_per_subject,
        "max_age": max_age.as_nanos() as u64,
    })
}

/// `PING`.
pub const PING: &[u8] = b"PING\r\n";
/// `PONG`.
pub const PONG: &[u8] = b"PONG\r\n";

/// A WebSocket to nats-server.
type NatsWs = WebSocketStream<TcpStream>;

/// How NATS bytes travel: a TCP stream, or WebSocket binary frames.
pub enum Transport {
    /// `--proto nats`.
    Tcp(TcpStream),
    /// `--proto nats-ws` (boxed: the socket state is large).
    Ws(Box<NatsWs>),
}

impl Transport {
    /// Connects: plain TCP to the NATS listener, or a WebSocket to `ws://{http}/`.
    pub async fn open(ws: bool, t: &Target) -> Result<Transport, BenchError> {
        if ws {
            let stream = clients::tcp_connect(&t.http, t.next_source()).await?;
            let request = format!("ws://{}/", t.http).into_client_request()?;
            let (ws, _) = tokio_tungstenite::client_async(request, stream).await?;
            Ok(Transport::Ws(Box::new(ws)))
        } else {
            Ok(Transport::Tcp(clients::tcp_connect(&t.nats, t.next_source()).await?))
        }
    }

    /// Appends what arrives next to `buf`; `Ok(false)` at end of stream.
    async fn read(&mut self, buf: &mut BytesMut) -> Result<bool, BenchError> {
        match self {
            Transport::Tcp(s) => {
                buf.reserve(64 * 1024);
                Ok(s.read_buf(buf).await? > 0)
            }
            Transport::Ws(ws) => ws_read(ws.as_mut(), buf).await,
        }
    }

    /// Writes `bytes` (one WebSocket binary frame on `nats-ws`).
    async fn write(&mut self, bytes: impl Into<Bytes>) -> Result<(), BenchError> {
        let bytes = bytes.into();
        match self {
            Transport::Tcp(s) => Ok(s.write_all(&bytes).await?),
            Transport::Ws(ws) => Ok(ws.send(Message::binary(bytes)).await?),
        }
    }
}

/// Reads WebSocket messages until one carries bytes; `Ok(false)` on close.
async fn ws_read(
    ws: &mut (impl futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin),
    buf: &mut BytesMut,
) -> Result<bool, BenchError> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => {
                buf.extend_from_slice(&b);
                return Ok(true);
            }
            Some(Ok(Message::Text(t))) => {
                buf.extend_from_slice(t.as_bytes());
                return Ok(true);
            }
            Some(Ok(Message::Close(_))) | None => return Ok(false),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
        }
    }
}

fn protocol_err(e: CodecError) -> BenchError {
    BenchError::Protocol(e.to_string())
}

/// Reads until the server sends `PONG` (answering its `PING`s); fails on `-ERR`.
async fn expect_pong(io: &mut Transport, buf: &mut BytesMut, what: &str) -> Result<(), BenchError> {
    let wait = async {
        loop {
            while let Some(op) = decode(buf).map_err(protocol_err)? {
                match op {
                    ServerOp::Pong => return Ok(()),
                    ServerOp::Ping => io.write(PONG).await?,
                    ServerOp::Err(e) => return Err(BenchError::Protocol(format!("NATS -ERR during {what}: {e}"))),
                    _ => {}
                }
            }
            if !io.read(buf).await? {
                return Err(BenchError::Protocol(format!("NATS closed during {what}")));
            }
        }
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, wait)
        .await
        .map_err(|_| BenchError::Protocol(format!("NATS: no PONG for {what} within {HANDSHAKE_TIMEOUT:?}")))?
}

/// Connects: waits for `INFO`, sends `CONNECT` and `PING`, waits for `PONG`.
async fn handshake(ws: bool, t: &Target, name: &str) -> Result<(Transport, BytesMut), BenchError> {
    let mut io = Transport::open(ws, t).await?;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let info = async {
        loop {
            if let Some(op) = decode(&mut buf).map_err(protocol_err)? {
                return match op {
                    ServerOp::Info(_) => Ok(()),
                    other => Err(BenchError::Protocol(format!("NATS: expected INFO, got {other:?}"))),
                };
            }
            if !io.read(&mut buf).await? {
                return Err(BenchError::Protocol("NATS closed before INFO".into()));
            }
        }
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, info).await.map_err(|_| BenchError::Protocol("NATS: no INFO".into()))??;
    let mut hello = encode_connect(name);
    hello.extend_from_slice(PING);
    io.write(hello).await?;
    expect_pong(&mut io, &mut buf, "CONNECT").await?;
    Ok((io, buf))
}

/// A subscribed NATS connection.
pub struct NatsSub {
    io: Transport,
    buf: BytesMut,
}

impl NatsSub {
    /// Connects and subscribes to the subject of `channel`; returns once the
    /// server confirmed the `SUB` (by answering the `PING` after it).
    pub async fn open(ws: bool, t: &Target, channel: &str, name: &str) -> Result<NatsSub, BenchError> {
        let (mut io, mut buf) = handshake(ws, t, name).await?;
        io.write(encode_sub_ping(&subject_for(channel), 1)).await?;
        expect_pong(&mut io, &mut buf, "SUB").await?;
        Ok(NatsSub { io, buf })
    }

    /// Waits for more bytes and appends every complete message's payload to
    /// `out`, answering `PING`s; `Ok(false)` at end of stream. Cancel-safe:
    /// partial operations stay in the connection's buffer.
    pub async fn next(&mut self, out: &mut Vec<Bytes>) -> Result<bool, BenchError> {
        loop {
            // Bytes left over from the handshake or the last read come first.
            let (before, mut pongs) = (out.len(), 0);
            while let Some(op) = decode(&mut self.buf).map_err(protocol_err)? {
                match op {
                    ServerOp::Msg { payload, .. } => out.push(payload),
                    ServerOp::Ping => pongs += 1,
                    ServerOp::Err(e) => return Err(BenchError::Protocol(format!("NATS -ERR: {e}"))),
                    _ => {}
                }
            }
            if pongs > 0 {
                self.io.write(PONG.repeat(pongs)).await?;
            }
            if out.len() > before {
                return Ok(true);
            }
            if !self.io.read(&mut self.buf).await? {
                return Ok(false);
            }
        }
    }
}

/// The write side of a publisher.
enum PubWriter {
    Tcp(OwnedWriteHalf),
    Ws(SplitSink<NatsWs, Message>),
}

/// What the publisher's reader task reports.
#[derive(Default)]
struct PubSignals {
    /// `PING`s received and not yet answered.
    pings: AtomicU64,
    /// `PONG`s received.
    pongs: AtomicU64,
    /// `-ERR`s received.
    errors: AtomicU64,
    /// Woken on every `PONG`.
    pong: tokio::sync::Notify,
}

/// A NATS publisher: `PUB`s go out one write each (the bench is open loop and
/// NATS does not acknowledge them); a task reads what the server sends.
pub struct NatsPub {
    writer: PubWriter,
    signals: Arc<PubSignals>,
    reader: tokio::task::JoinHandle<()>,
    buf: BytesMut,
}

impl NatsPub {
    /// Connects a publisher.
    pub async fn open(ws: bool, t: &Target, name: &str) -> Result<NatsPub, BenchError> {
        let (io, buf) = handshake(ws, t, name).await?;
        let signals = Arc::new(PubSignals::default());
        let (writer, reader) = match io {
            Transport::Tcp(s) => {
                let (r, w) = s.into_split();
                (PubWriter::Tcp(w), tokio::spawn(read_tcp(r, buf, signals.clone())))
            }
            Transport::Ws(ws) => {
                let (w, r) = (*ws).split();
                (PubWriter::Ws(w), tokio::spawn(read_ws(r, buf, signals.clone())))
            }
        };
        Ok(NatsPub { writer, signals, reader, buf: BytesMut::with_capacity(4096) })
    }

    async fn write(&mut self) -> Result<(), BenchError> {
        let bytes = self.buf.split();
        match &mut self.writer {
            PubWriter::Tcp(w) => w.write_all(&bytes).await?,
            PubWriter::Ws(w) => w.send(Message::binary(bytes.freeze())).await?,
        }
        Ok(())
    }

    /// Sends one `PUB` (with any `PONG`s owed to the server in the same write).
    pub async fn publish(&mut self, channel: &str, payload: &[u8]) -> Result<(), BenchError> {
        let owed = self.signals.pings.swap(0, Ordering::Relaxed);
        for _ in 0..owed {
            self.buf.put_slice(PONG);
        }
        encode_pub(&mut self.buf, &subject_for(channel), payload);
        self.write().await
    }

    /// Sends `PING`, waits (bounded) for its `PONG` so every `PUB` before it
    /// was processed, then closes; returns the `-ERR`s the server sent.
    pub async fn close(mut self) -> u64 {
        let before = self.signals.pongs.load(Ordering::Relaxed);
        self.buf.put_slice(PING);
        if self.write().await.is_ok() {
            let signals = self.signals.clone();
            let _ = tokio::time::timeout(Duration::from_secs(5), async move {
                while signals.pongs.load(Ordering::Relaxed) == before {
                    let notified = signals.pong.notified();
                    if signals.pongs.load(Ordering::Relaxed) != before {
                        break;
                    }
                    notified.await;
                }
            })
            .await;
        }
        match &mut self.writer {
            PubWriter::Tcp(w) => {
                let _ = w.shutdown().await;
            }
            PubWriter::Ws(w) => {
                let _ = tokio::time::timeout(Duration::from_secs(2), w.close()).await;
            }
        }
        self.reader.abort();
        self.signals.errors.load(Ordering::Relaxed)
    }
}

/// How long a JetStream API request (stream create) may take.
const JS_API_TIMEOUT: Duration = Duration::from_secs(10);
/// The reply token of the stream request (acks use numbers).
const API_TOKEN: &str = "api";

/// A publisher into a JetStream stream over TCP: `PUB`s with a reply
/// subject in its own inbox, and the acks read back from it. One task
/// drives it: queue publishes, flush, read acks.
pub struct NatsJsPub {
    io: Transport,
    /// Bytes read and not yet decoded.
    buf: BytesMut,
    /// `PUB`s (and owed `PONG`s) queued for the next flush.
    out: BytesMut,
    /// `_INBOX.<id>`: replies arrive on `<inbox>.<ticket>`.
    inbox: String,
}

impl NatsJsPub {
    /// Connects and subscribes to the inbox `_INBOX.<id>.*` (`id`: letters
    /// and digits); returns once the server confirmed the `SUB`.
    pub async fn open(t: &Target, name: &str, id: &str) -> Result<NatsJsPub, BenchError> {
        let (mut io, mut buf) = handshake(false, t, name).await?;
        let inbox = format!("_INBOX.{id}");
        io.write(encode_sub_ping(&format!("{inbox}.*"), 1)).await?;
        expect_pong(&mut io, &mut buf, "SUB").await?;
        Ok(NatsJsPub { io, buf, out: BytesMut::with_capacity(16 * 1024), inbox })
    }

    /// Creates the stream `config` describes (`$JS.API.STREAM.CREATE.<name>`);
    /// an existing stream with the same configuration is fine. Call before
    /// publishing: replies to publishes that arrive meanwhile are dropped.
    pub async fn create_stream(&mut self, config: &serde_json::Value) -> Result<(), BenchError> {
        let name = config["name"].as_str().unwrap_or_default();
        let reply = format!("{}.{API_TOKEN}", self.inbox);
        let body = config.to_string();
        encode_pub_reply(&mut self.out, &format!("$JS.API.STREAM.CREATE.{name}"), &reply, body.as_bytes());
        self.flush().await?;
        let wait = async {
            loop {
                while let Some(op) = decode(&mut self.buf).map_err(protocol_err)? {
                    match op {
                        ServerOp::Msg { subject, payload, .. } if subject == reply.as_bytes() => return Ok(payload),
                        ServerOp::Ping => self.io.write(PONG).await?,
                        ServerOp::Err(e) => return Err(BenchError::Protocol(format!("NATS -ERR: {e}"))),
                        _ => {}
                    }
                }
                if !self.io.read(&mut self.buf).await? {
                    return Err(BenchError::Protocol("NATS closed during the stream request".into()));
                }
            }
        };
        let payload = tokio::time::timeout(JS_API_TIMEOUT, wait).await.map_err(|_| {
            BenchError::Protocol(format!(
                "no answer to $JS.API.STREAM.CREATE.{name} within {JS_API_TIMEOUT:?}: is JetStream on (nats-server -js)?"
            ))
        })??;
        check_js_api(&payload).map_err(|e| BenchError::Protocol(format!("creating stream {name}: {e}")))
    }

    /// Queues one publish to `subject`, acknowledged on reply ticket `ticket`.
    pub fn queue(&mut self, ticket: u64, subject: &str, payload: &[u8]) {
        let reply = format!("{}.{ticket}", self.inbox);
        encode_pub_reply(&mut self.out, subject, &reply, payload);
    }

    /// Writes everything queued, in one write.
    pub async fn flush(&mut self) -> Result<(), BenchError> {
        if !self.out.is_empty() {
            let bytes = self.out.split().freeze();
            self.io.write(bytes).await?;
        }
        Ok(())
    }

    /// Waits for the next ack on the inbox: its ticket and what the stream
    /// said. Answers server `PING`s; a `-ERR` or end of stream is an error.
    /// Cancel-safe: partial operations stay in the connection's buffer.
    pub async fn next_ack(&mut self) -> Result<(u64, Result<JsAck, JsError>), BenchError> {
        loop {
            while let Some(op) = decode(&mut self.buf).map_err(protocol_err)? {
                match op {
                    ServerOp::Msg { subject, payload, .. } => {
                        if let Some(ticket) = reply_ticket(&subject, &self.inbox) {
                            return Ok((ticket, parse_js_ack(&payload)));
                        }
                    }
                    ServerOp::Ping => self.io.write(PONG).await?,
                    ServerOp::Err(e) => return Err(BenchError::Protocol(format!("NATS -ERR: {e}"))),
                    _ => {}
                }
            }
            if !self.io.read(&mut self.buf).await? {
                return Err(BenchError::Protocol("NATS closed".into()));
            }
        }
    }

    /// Closes the connection.
    pub async fn close(mut self) {
        if let Transport::Tcp(s) = &mut self.io {
            let _ = s.shutdown().await;
        }
    }
}

/// Counts what a publisher's server sends (`PING`, `PONG`, `-ERR`).
fn observe(buf: &mut BytesMut, s: &PubSignals) -> Result<(), CodecError> {
    while let Some(op) = decode(buf)? {
        match op {
            ServerOp::Ping => {
                s.pings.fetch_add(1, Ordering::Relaxed);
            }
            ServerOp::Pong => {
                s.pongs.fetch_add(1, Ordering::Relaxed);
                s.pong.notify_waiters();
            }
            ServerOp::Err(e) => {
                tracing::warn!(error = %e, "NATS publisher -ERR");
                s.errors.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }
    Ok(())
}

async fn read_tcp(mut r: OwnedReadHalf, mut buf: BytesMut, s: Arc<PubSignals>) {
    loop {
        if observe(&mut buf, &s).is_err() {
            s.errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        buf.reserve(4096);
        match r.read_buf(&mut buf).await {
            Ok(n) if n > 0 => {}
            _ => return,
        }
    }
}

async fn read_ws(mut r: SplitStream<NatsWs>, mut buf: BytesMut, s: Arc<PubSignals>) {
    loop {
        if observe(&mut buf, &s).is_err() {
            s.errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match ws_read(&mut r, &mut buf).await {
            Ok(true) => {}
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(bytes: &[u8]) -> (Vec<ServerOp>, BytesMut) {
        let mut buf = BytesMut::from(bytes);
        let mut ops = Vec::new();
        while let Some(op) = decode(&mut buf).expect("valid stream") {
            ops.push(op);
        }
        (ops, buf)
    }

    fn msg(subject: &str, sid: u64, reply: Option<&str>, payload: &str) -> ServerOp {
        ServerOp::Msg {
            subject: Bytes::copy_from_slice(subject.as_bytes()),
            sid,
            reply: reply.map(|r| Bytes::copy_from_slice(r.as_bytes())),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
        }
    }

    #[test]
    fn info_ping_pong_ok_err() {
        let (ops, rest) = all(
            b"INFO {\"server_id\":\"X\",\"max_payload\":1048576}\r\nPING\r\npong\r\n+OK\r\n-ERR 'Unknown Protocol Operation'\r\n",
        );
        assert_eq!(
            ops,
            vec![
                ServerOp::Info("{\"server_id\":\"X\",\"max_payload\":1048576}".into()),
                ServerOp::Ping,
                ServerOp::Pong,
                ServerOp::Ok,
                ServerOp::Err("Unknown Protocol Operation".into()),
            ]
        );
        assert!(rest.is_empty());
        let info: serde_json::Value = match &ops[0] {
            ServerOp::Info(j) => serde_json::from_str(j).unwrap(),
            _ => unreachable!(),
        };
        assert_eq!(info["max_payload"], 1_048_576);
    }

    #[test]
    fn msg_with_and_without_reply() {
        let (ops, rest) = all(b"MSG bench.a.0 1 5\r\nhello\r\nMSG a.b 12 _INBOX.x 2\r\nhi\r\nMSG e 3 0\r\n\r\n");
        assert_eq!(
            ops,
            vec![msg("bench.a.0", 1, None, "hello"), msg("a.b", 12, Some("_INBOX.x"), "hi"), msg("e", 3, None, "")]
        );
        assert!(rest.is_empty());
    }

    #[test]
    fn payload_may_contain_crlf_and_headers_are_dropped() {
        let (ops, _) = all(b"MSG s 1 4\r\n\r\n\r\n\r\n");
        assert_eq!(ops, vec![msg("s", 1, None, "\r\n\r\n")]);
        // HMSG subject sid [reply] header_len total_len: the payload follows the headers.
        let (ops, _) = all(b"HMSG s 2 r 12 14\r\nNATS/1.0\r\n\r\nhi\r\n");
        assert_eq!(ops, vec![msg("s", 2, Some("r"), "hi")]);
    }

    #[test]
    fn split_across_reads_at_every_byte() {
        let stream: &[u8] = b"INFO {}\r\nMSG x.y 7 r.z 11\r\nSB1:payload\r\nPING\r\nMSG x.y 7 3\r\nabc\r\n";
        let want = all(stream).0;
        for cut in 0..=stream.len() {
            let mut buf = BytesMut::from(&stream[..cut]);
            let mut got = Vec::new();
            while let Some(op) = decode(&mut buf).unwrap() {
                got.push(op);
            }
            buf.extend_from_slice(&stream[cut..]);
            while let Some(op) = decode(&mut buf).unwrap() {
                got.push(op);
            }
            assert_eq!(got, want, "cut at {cut}");
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn partial_and_malformed() {
        // A control line with no end yet, and a payload not fully arrived: nothing consumed.
        for partial in [&b"MSG a 1 5\r\nhel"[..], b"MSG a 1", b"PIN"] {
            let mut buf = BytesMut::from(partial);
            assert_eq!(decode(&mut buf), Ok(None));
            assert_eq!(&buf[..], partial);
        }
        let mut buf = BytesMut::from(&b"MSG a 1 2\r\nhiXX"[..]);
        assert_eq!(decode(&mut buf), Err(CodecError::Unterminated));
        for bad in [&b"MSG a x 2\r\nhi\r\n"[..], b"MSG a 1\r\n", b"MSG a 1 r s 2\r\n", b"MSG a 1 -2\r\n"] {
            assert!(matches!(decode(&mut BytesMut::from(bad)), Err(CodecError::BadArgs { .. })), "{bad:?}");
        }
        assert_eq!(decode(&mut BytesMut::from(&b"HELLO\r\n"[..])), Err(CodecError::UnknownOp("HELLO".into())));
        assert_eq!(decode(&mut BytesMut::from(&[b'x'; MAX_CONTROL_LINE + 1][..])), Err(CodecError::LineTooLong));
    }

    /// A scripted NATS server on a real socket: the subscriber completes the
    /// handshake, confirms its SUB, answers a server PING with PONG while
    /// messages arrive split across writes, and sees end of stream.
    #[tokio::test]
    async fn subscriber_handshake_ping_pong_and_split_messages() {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move {
            let (sock, _) = listener.accept().await.unwrap();
            let (r, mut w) = sock.into_split();
            let mut lines = BufReader::new(r).lines();
            w.write_all(b"INFO {\"server_id\":\"fake\",\"max_payload\":1048576}\r\n").await.unwrap();
            let connect = lines.next_line().await.unwrap().unwrap();
            assert!(connect.starts_with("CONNECT {"), "{connect}");
            assert_eq!(lines.next_line().await.unwrap().unwrap(), "PING");
            w.write_all(b"PONG\r\n").await.unwrap();
            assert_eq!(lines.next_line().await.unwrap().unwrap(), "SUB bench.ab.0 1");
            assert_eq!(lines.next_line().await.unwrap().unwrap(), "PING");
            // The PONG and the first message in one write, then a PING and a message cut in three.
            w.write_all(b"PONG\r\nMSG bench.ab.0 1 3\r\none\r\n").await.unwrap();
            for part in [&b"PING\r\nMSG bench.ab.0 1 _INBOX.r "[..], b"3\r\ntw", b"o\r\n"] {
                w.write_all(part).await.unwrap();
                w.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // The client answers the PING.
            assert_eq!(lines.next_line().await.unwrap().unwrap(), "PONG");
            drop(w);
        });
        let mut t = Target::new("127.0.0.1:1".into(), "127.0.0.1:1".into(), 1);
        t.nats = addr;
        let mut sub = NatsSub::open(false, &t, "bench/ab/0", "test").await.expect("subscribed");
        let mut got = Vec::new();
        while got.len() < 2 {
            assert!(sub.next(&mut got).await.expect("next"), "stream ended early");
        }
        assert_eq!(got, vec![Bytes::from_static(b"one"), Bytes::from_static(b"two")]);
        server.await.expect("server script");
        assert!(!sub.next(&mut got).await.expect("clean end"), "end of stream");
    }

    #[test]
    fn jetstream_acks_and_errors() {
        let ack = |stream: &str, seq, duplicate| Ok(JsAck { stream: stream.into(), seq, duplicate });
        assert_eq!(parse_js_ack(br#"{"stream":"SWITCHBOARD_BENCH","seq":42}"#), ack("SWITCHBOARD_BENCH", 42, false));
        assert_eq!(parse_js_ack(br#"{"stream":"S","domain":"hub","seq":7,"duplicate":true}"#), ack("S", 7, true));
        // A refusal: the stream is full under `discard: new`, or nothing stores the subject.
        assert_eq!(
            parse_js_ack(br#"{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}"#),
            Err(JsError::Api { code: 503, err_code: 10077, description: "maximum messages exceeded".into() })
        );
        for bad in [&br#"{"stream":"S"}"#[..], b"{\"seq\":1}", b"+OK", b""] {
            assert!(matches!(parse_js_ack(bad), Err(JsError::Malformed(_))), "{bad:?}");
        }
        // Stream create: any reply without an error is success (a new stream, or the same one again).
        let created =
            br#"{"type":"io.nats.jetstream.api.v1.stream_create_response","config":{"name":"S"},"did_create":true}"#;
        assert_eq!(check_js_api(created), Ok(()));
        let clash = br#"{"type":"io.nats.jetstream.api.v1.stream_create_response","error":{"code":400,"err_code":10058,"description":"stream name already in use with a different configuration"}}"#;
        assert!(matches!(check_js_api(clash), Err(JsError::Api { code: 400, err_code: 10058, .. })));
    }

    #[test]
    fn reply_tickets_and_publishes_with_a_reply() {
        for (subject, inbox, ticket) in [
            ("_INBOX.ab12.17", "_INBOX.ab12", Some(17)),
            ("_INBOX.ab12.0", "_INBOX.ab12", Some(0)),
            ("_INBOX.ab12.api", "_INBOX.ab12", None),
            ("_INBOX.ab1.17", "_INBOX.ab12", None),
            ("_INBOX.ab12", "_INBOX.ab12", None),
            ("_INBOX.ab12x17", "_INBOX.ab12", None),
            ("_INBOX.ab12.1.2", "_INBOX.ab12", None),
        ] {
            assert_eq!(reply_ticket(subject.as_bytes(), inbox), ticket, "{subject}");
        }
        let mut out = BytesMut::new();
        encode_pub_reply(&mut out, "bench.a.0", "_INBOX.x.3", b"SB1:x");
        assert_eq!(&out[..], b"PUB bench.a.0 _INBOX.x.3 5\r\nSB1:x\r\n");
        let config = stream_config("S", "bench.>", 1000, Duration::from_secs(600));
        assert_eq!(config["subjects"], serde_json::json!(["bench.>"]));
        assert_eq!((config["storage"].as_str(), config["max_msgs_per_subject"].as_u64()), (Some("file"), Some(1000)));
        assert_eq!(config["max_age"].as_u64(), Some(600_000_000_000), "nanoseconds");
    }

    /// A scripted JetStream server on a real socket: the publisher creates
    /// the stream, publishes three messages in one write, and matches acks
    /// that come back out of order (one a refusal, split across writes,
    /// behind a server PING it must answer and a message it must skip).
    #[tokio::test]
    async fn jetstream_publisher_creates_its_stream_and_matches_acks() {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move {
            let (sock, _) = listener.accept().await.unwrap();
            let (r, mut w) = sock.into_split();
            let mut lines = BufReader::new(r).lines();
            let mut line = async || lines.next_line().await.unwrap().unwrap();
            w.write_all(b"INFO {\"server_id\":\"fake\",\"jetstream\":true}\r\n").await.unwrap();
            assert!(line().await.starts_with("CONNECT {"));
            assert_eq!(line().await, "PING");
            w.write_all(b"PONG\r\n").await.unwrap();
            assert_eq!(line().await, "SUB _INBOX.tok.* 1");
            assert_eq!(line().await, "PING");
            w.write_all(b"PONG\r\n").await.unwrap();
            let create = line().await;
            let json = line().await;
            assert_eq!(create, format!("PUB $JS.API.STREAM.CREATE.BENCH _INBOX.tok.api {}", json.len()));
            let config: serde_json::Value = serde_json::from_str(&json).unwrap();
            assert_eq!((config["name"].as_str(), config["storage"].as_str()), (Some("BENCH"), Some("file")));
            let reply = r#"{"type":"io.nats.jetstream.api.v1.stream_create_response","config":{"name":"BENCH"}}"#;
            w.write_all(format!("MSG _INBOX.tok.api 1 {}\r\n{reply}\r\n", reply.len()).as_bytes()).await.unwrap();
            for (subject, ticket, payload) in
                [("bench.ab.0", 1, "one"), ("bench.ab.1", 2, "two"), ("bench.ab.0", 3, "three")]
            {
                assert_eq!(line().await, format!("PUB {subject} _INBOX.tok.{ticket} {}", payload.len()));
                assert_eq!(line().await, payload);
            }
            // Acks for 2 then 1 in one write, a stray message, a PING, then a refusal of 3 in pieces.
            let (a2, a1) = (r#"{"stream":"BENCH","seq":11}"#, r#"{"stream":"BENCH","seq":10}"#);
            let both =
                format!("MSG _INBOX.tok.2 1 {}\r\n{a2}\r\nMSG _INBOX.tok.1 1 {}\r\n{a1}\r\n", a2.len(), a1.len());
            w.write_all(both.as_bytes()).await.unwrap();
            let refusal = r#"{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}"#;
            let rest =
                format!("MSG other.subject 1 2\r\nhi\r\nPING\r\nMSG _INBOX.tok.3 1 {}\r\n{refusal}\r\n", refusal.len());
            let (x, y) = rest.split_at(30);
            let (y, z) = y.split_at(50);
            for part in [x, y, z] {
                w.write_all(part.as_bytes()).await.unwrap();
                w.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert_eq!(line().await, "PONG");
        });
        let mut t = Target::new("127.0.0.1:1".into(), "127.0.0.1:1".into(), 1);
        t.nats = addr;
        let mut p = NatsJsPub::open(&t, "test", "tok").await.expect("connected");
        p.create_stream(&stream_config("BENCH", "bench.>", 1000, Duration::from_secs(600))).await.expect("stream");
        p.queue(1, "bench.ab.0", b"one");
        p.queue(2, "bench.ab.1", b"two");
        p.queue(3, "bench.ab.0", b"three");
        p.flush().await.expect("flush");
        let ack = |seq| Ok(JsAck { stream: "BENCH".into(), seq, duplicate: false });
        assert_eq!(p.next_ack().await.expect("ack"), (2, ack(11)));
        assert_eq!(p.next_ack().await.expect("ack"), (1, ack(10)));
        let (ticket, refused) = p.next_ack().await.expect("refusal");
        assert_eq!(ticket, 3);
        assert!(matches!(refused, Err(JsError::Api { code: 503, .. })), "{refused:?}");
        server.await.expect("server script");
        assert!(p.next_ack().await.is_err(), "the server hung up");
    }

    #[test]
    fn encoders_and_subjects() {
        let mut out = BytesMut::new();
        encode_pub(&mut out, "bench.a.0", b"SB1:x");
        assert_eq!(&out[..], b"PUB bench.a.0 5\r\nSB1:x\r\n");
        assert_eq!(encode_sub_ping("a.b", 3), b"SUB a.b 3\r\nPING\r\n");
        let connect = String::from_utf8(encode_connect("bench")).unwrap();
        let json: serde_json::Value =
            serde_json::from_str(connect.strip_prefix("CONNECT ").unwrap().strip_suffix("\r\n").unwrap()).unwrap();
        assert_eq!((json["verbose"].as_bool(), json["pedantic"].as_bool()), (Some(false), Some(false)));
        assert_eq!(json["headers"], false);
        for (channel, subject) in [
            ("bench/1a2b3c4d/0", "bench.1a2b3c4d.0"),
            ("bench/1a2b3c4d/idle/63", "bench.1a2b3c4d.idle.63"),
            ("demo", "demo"),
        ] {
            assert_eq!(subject_for(channel), subject);
        }
    }
}
