//! The bench's WebTransport client (`--proto wt`): sessions at the gateway's
//! QUIC listener, a control stream each, deliveries read from the channel
//! streams the gateway opens.
//!
//! Sessions share a small pool of client endpoints ([`ENDPOINTS`] UDP
//! sockets, one quinn driver each) instead of one socket per session, so
//! that thousands of sessions cost the generator neither thousands of
//! drivers nor thousands of file descriptors. The certificate check is the
//! browser's: `--cert-hash`, or the hash the gateway serves at
//! `GET /v1/wt/cert-hash` on its HTTP listener (what `switchboard dev`
//! generates); `--insecure` skips it. Endpoints, the certificate check and
//! frame reading are [`crate::tooling::client_wt`]'s; what is the bench's own is the
//! lean session handling around them (no background tasks per session).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use prost::Message as _;
use switchboard_proto::{self as proto, client_frame, server_frame};
use switchboard_protocols::wt::codec;
use wtransport::endpoint::endpoint_side::Client;
use wtransport::{Connection, Endpoint, SendStream};

pub use crate::tooling::client_wt::CertCheck;
use crate::tooling::client_wt::{FrameReader, client_endpoint};

use super::BenchError;
use super::clients::{HANDSHAKE_TIMEOUT, subscribe_frame, subscribed_position};

/// Client endpoints (UDP sockets) the sessions are spread over.
pub const ENDPOINTS: usize = 8;
fn wt_err(what: &str, e: impl std::fmt::Display) -> BenchError {
    BenchError::Protocol(format!("WebTransport {what}: {e}"))
}

/// Where the gateway's WebTransport endpoint is and how sessions reach it.
pub struct WtTarget {
    url: String,
    endpoints: Vec<Endpoint<Client>>,
    next: AtomicUsize,
}

impl std::fmt::Debug for WtTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WtTarget").field("url", &self.url).field("endpoints", &self.endpoints.len()).finish()
    }
}

impl WtTarget {
    /// Endpoints for `url` (`https://HOST:PORT/v1/wt`) checking `cert`.
    /// Must run inside the tokio runtime (quinn spawns its drivers).
    pub fn new(url: &str, cert: CertCheck) -> Result<WtTarget, BenchError> {
        let parsed = url::Url::parse(url).map_err(|e| BenchError::Usage(format!("bad --wt-url {url:?}: {e}")))?;
        if parsed.scheme() != "https" {
            return Err(BenchError::Usage(format!("--wt-url starts with https://, got {url:?}")));
        }
        let ipv6 = matches!(parsed.host(), Some(url::Host::Ipv6(_)));
        let bind: SocketAddr = if ipv6 { "[::]:0" } else { "0.0.0.0:0" }.parse().expect("a socket address");
        let mut endpoints = Vec::with_capacity(ENDPOINTS);
        for _ in 0..ENDPOINTS {
            endpoints.push(client_endpoint(bind, cert, None).map_err(|e| wt_err("endpoint", e))?);
        }
        Ok(WtTarget { url: url.to_string(), endpoints, next: AtomicUsize::new(0) })
    }

    /// Opens a session, its control stream, and connects as `client_id`.
    pub async fn open(&self, client_id: &str) -> Result<WtSession, BenchError> {
        tokio::time::timeout(HANDSHAKE_TIMEOUT, self.open_inner(client_id))
            .await
            .map_err(|_| BenchError::Protocol(format!("WebTransport: no session within {HANDSHAKE_TIMEOUT:?}")))?
    }

    async fn open_inner(&self, client_id: &str) -> Result<WtSession, BenchError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len();
        let conn = self.endpoints[i].connect(self.url.as_str()).await.map_err(|e| wt_err("connect", e))?;
        let (send, recv) = conn.open_bi().await.map_err(|e| wt_err("open", e))?.await.map_err(|e| wt_err("open", e))?;
        let mut s = WtSession { conn, send, control: FrameReader::new(recv), req: 0 };
        let connect = proto::Connect { token: String::new(), client_id: client_id.into() };
        match s.request(client_frame::Frame::Connect(connect)).await?.frame {
            Some(server_frame::Frame::Connected(_)) => Ok(s),
            other => Err(BenchError::Protocol(format!("expected connected, got {other:?}"))),
        }
    }
}

/// Fetches the certificate hash `switchboard dev` serves at
/// `GET {http_base}/v1/wt/cert-hash`.
pub async fn fetch_cert_hash(http_base: &str) -> Result<CertCheck, BenchError> {
    let url = format!("{http_base}/v1/wt/cert-hash");
    let resp = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?.get(&url).send().await?;
    if !resp.status().is_success() {
        return Err(BenchError::Usage(format!(
            "GET {url}: HTTP {} (give --cert-hash, or --insecure for a certificate you trust anyway)",
            resp.status()
        )));
    }
    let body: serde_json::Value = resp.json().await?;
    let hex = body["hex"].as_str().ok_or_else(|| BenchError::Protocol(format!("GET {url}: no \"hex\" in {body}")))?;
    parse_hash(hex)
}

/// Parses `--cert-hash`: 64 hex digits, `:` separators allowed.
pub fn parse_hash(hex: &str) -> Result<CertCheck, BenchError> {
    CertCheck::from_hex(hex).map_err(|e| BenchError::Usage(e.to_string()))
}

/// The next frame's bytes on `reader`; `None` when the stream finished cleanly.
async fn next_raw(reader: &mut FrameReader) -> Result<Option<Bytes>, BenchError> {
    reader.next_raw().await.map_err(|e| BenchError::Protocol(e.to_string()))
}

fn decode(raw: Bytes) -> Result<proto::ServerFrame, BenchError> {
    proto::ServerFrame::decode(raw).map_err(|e| wt_err("decode", e))
}

/// A connected session: the control stream, its request counter.
pub struct WtSession {
    conn: Connection,
    // Held open: finishing the control stream ends the session.
    send: SendStream,
    control: FrameReader,
    req: u64,
}

impl WtSession {
    async fn send(&mut self, frame: client_frame::Frame) -> Result<u64, BenchError> {
        self.req += 1;
        let mut out = BytesMut::new();
        codec::put_frame(&mut out, &proto::ClientFrame { req: self.req, frame: Some(frame) }.encode_to_vec());
        self.send.write_all(&out).await.map_err(|e| wt_err("write", e))?;
        Ok(self.req)
    }

    /// Sends `frame` and waits for the reply with its `req` (an `error`
    /// reply is an `Err`).
    async fn request(&mut self, frame: client_frame::Frame) -> Result<proto::ServerFrame, BenchError> {
        let req = self.send(frame).await?;
        loop {
            let raw = tokio::time::timeout(HANDSHAKE_TIMEOUT, next_raw(&mut self.control))
                .await
                .map_err(|_| BenchError::Protocol(format!("WebTransport: no reply within {HANDSHAKE_TIMEOUT:?}")))??
                .ok_or_else(|| BenchError::Protocol("WebTransport control stream finished".into()))?;
            let f = decode(raw)?;
            match f.frame {
                Some(server_frame::Frame::Error(e)) => {
                    return Err(BenchError::Protocol(format!("{}: {}", e.code().slug(), e.message)));
                }
                Some(server_frame::Frame::Disconnect(d)) => {
                    return Err(BenchError::Protocol(format!("disconnected: {} {}", d.code, d.reason)));
                }
                _ if f.req == req => return Ok(f),
                _ => {}
            }
        }
    }

    /// Subscribes to `channel` (from `position`, if any); the channel's
    /// position then.
    pub async fn subscribe(
        &mut self,
        channel: &str,
        position: Option<proto::Position>,
    ) -> Result<proto::Position, BenchError> {
        let reply = self.request(subscribe_frame(channel, position)).await?;
        subscribed_position(reply, channel)
    }

    /// Ends the session (application code 0).
    pub fn close(&self) {
        self.conn.close(wtransport::VarInt::from_u32(0), b"bench done");
    }
}

/// A subscriber: a session subscribed to one channel, reading that
/// channel's stream.
pub struct WtSub {
    session: WtSession,
    stream: Option<FrameReader>,
}

impl WtSub {
    /// A session subscribed to `channel` (from `position`, if any), and
    /// the channel's position at the subscribe.
    pub async fn open(
        t: &WtTarget,
        channel: &str,
        id: &str,
        position: Option<proto::Position>,
    ) -> Result<(WtSub, proto::Position), BenchError> {
        let mut session = t.open(id).await?;
        let at = session.subscribe(channel, position).await?;
        Ok((WtSub { session, stream: None }, at))
    }

    /// Waits for the next payload(s); `Ok(false)` when the session ended.
    /// A `gap` or a `disconnect` is an error. The bench subscribes to one
    /// channel per session, so once that channel's stream is open it is the
    /// only one read.
    pub async fn next(&mut self, out: &mut Vec<Bytes>) -> Result<bool, BenchError> {
        let WtSub { session, stream } = self;
        let raw = match stream {
            None => tokio::select! {
                s = session.conn.accept_uni() => {
                    *stream = Some(FrameReader::new(s.map_err(|e| wt_err("session", e))?));
                    return Ok(true);
                }
                f = next_raw(&mut session.control) => return control_frame(f?),
            },
            // Only the channel stream from here on (the hot path): if the
            // gateway ends the session, the read fails with its close code
            // and reason.
            Some(reader) => match next_raw(reader).await? {
                Some(raw) => raw,
                None => return Err(BenchError::Protocol("WebTransport: the channel stream finished".into())),
            },
        };
        if let Some(p) = super::clients::message_payload(&raw) {
            out.push(p);
            return Ok(true);
        }
        match decode(raw)?.frame {
            Some(server_frame::Frame::Gap(g)) => {
                Err(BenchError::Protocol(format!("gap on {}: {}", g.channel, g.reason)))
            }
            _ => Ok(true),
        }
    }

    /// Ends the session.
    pub fn close(&self) {
        self.session.close();
    }
}

/// What a frame on a subscriber's control stream means for it.
fn control_frame(raw: Option<Bytes>) -> Result<bool, BenchError> {
    let Some(raw) = raw else { return Ok(false) };
    match decode(raw)?.frame {
        Some(server_frame::Frame::Disconnect(d)) => {
            Err(BenchError::Protocol(format!("disconnected: {} {}", d.code, d.reason)))
        }
        Some(server_frame::Frame::Error(e)) => Err(BenchError::Protocol(format!("{}: {}", e.code().slug(), e.message))),
        _ => Ok(true),
    }
}

/// A publisher: publish frames on the control stream, acks drained by a
/// task that counts refusals.
pub struct WtPub {
    send: SendStream,
    req: u64,
    conn: Connection,
    /// Highest `req` the gateway answered, as the drain task sees them.
    answered: tokio::sync::watch::Receiver<u64>,
    /// Refusals among them (shared, so an aborted drain loses no count).
    refused: Arc<AtomicU64>,
    drain: tokio::task::JoinHandle<()>,
}

impl WtPub {
    /// A connected session for publishing.
    pub async fn open(t: &WtTarget, id: &str) -> Result<WtPub, BenchError> {
        let WtSession { conn, send, mut control, req } = t.open(id).await?;
        let (answered_tx, answered) = tokio::sync::watch::channel(req);
        let refused = Arc::new(AtomicU64::new(0));
        let drain = {
            let refused = refused.clone();
            tokio::spawn(async move {
                while let Ok(Some(raw)) = next_raw(&mut control).await {
                    let Ok(f) = decode(raw) else { continue };
                    if let Some(server_frame::Frame::Error(e)) = &f.frame {
                        tracing::warn!(code = e.code().slug(), message = %e.message, "publish refused");
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                    answered_tx.send_if_modified(|a| {
                        let higher = f.req > *a;
                        *a = (*a).max(f.req);
                        higher
                    });
                }
            })
        };
        Ok(WtPub { send, req, conn, answered, refused, drain })
    }

    /// Sends one publish frame (not waiting for its ack: open loop).
    pub async fn publish(&mut self, channel: &str, payload: Vec<u8>) -> Result<(), BenchError> {
        self.req += 1;
        let p = proto::Publish { channel: channel.into(), payload: payload.into(), ..Default::default() };
        let frame = proto::ClientFrame { req: self.req, frame: Some(client_frame::Frame::Publish(p)) };
        let mut out = BytesMut::new();
        codec::put_frame(&mut out, &frame.encode_to_vec());
        self.send.write_all(&out).await.map_err(|e| wt_err("write", e))
    }

    /// Waits (at most 5 s) until every publish was answered, then ends the
    /// session; returns the refusals the gateway sent.
    pub async fn close(mut self) -> u64 {
        let req = self.req;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.answered.wait_for(|a| *a >= req)).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.send.finish()).await;
        if tokio::time::timeout(Duration::from_secs(2), &mut self.drain).await.is_err() {
            self.drain.abort();
        }
        self.conn.close(wtransport::VarInt::from_u32(0), b"bench done");
        self.refused.load(Ordering::Relaxed)
    }
}
