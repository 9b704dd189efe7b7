//! A WebTransport client of a Switchboard gateway, used by `switchboard pub
//! --via wt`, `switchboard sub --via wt` and the integration tests.
//!
//! [`WtClient`] opens a session at `/v1/wt` (wtransport on quinn), opens the
//! control stream and connects; requests and replies travel on the control
//! stream, deliveries arrive on server-opened unidirectional streams (one
//! per channel, [`WtClient::accept_stream`]) and, for datagram
//! subscriptions, as datagrams ([`WtClient::recv_datagram`]). Frames are
//! length-delimited protobuf, read with the gateway's own codec.
//! [`SerialTracker`] tells a datagram receiver what it missed.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use prost::Message as _;
use switchboard_proto::{self as proto, client_frame, server_frame};
use switchboard_protocols::wt::codec;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use wtransport::config::QuicTransportConfig;
use wtransport::endpoint::ConnectOptions;
use wtransport::endpoint::endpoint_side::Client;
use wtransport::tls::Sha256Digest;
use wtransport::{ClientConfig, Connection, Endpoint, RecvStream, SendStream, VarInt};

use crate::tooling::client::{ClientError, FrameSource, SubEvent, resubscribe};

/// Largest server frame the client accepts (a whole history reply).
pub const MAX_FRAME: usize = 16 * 1024 * 1024;
/// How long connecting (QUIC, HTTP/3, session, `connected`) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

fn wt_err(e: impl std::fmt::Display) -> ClientError {
    ClientError::Wt(e.to_string())
}

/// How the client checks the gateway's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertCheck {
    /// The platform's trusted roots (a real certificate).
    System,
    /// Only a certificate with this SHA-256 (as browsers'
    /// `serverCertificateHashes`: ECDSA P-256, valid at most 14 days), such
    /// as the one `switchboard dev` generates and prints.
    Hash([u8; 32]),
    /// No check at all (dev only).
    Insecure,
}

impl CertCheck {
    /// Parses `--cert-hash`: 64 hex digits, `:` separators allowed.
    pub fn from_hex(hex: &str) -> Result<CertCheck, ClientError> {
        let digits: String = hex.chars().filter(|c| *c != ':').collect();
        let bad = || ClientError::Usage(format!("--cert-hash wants 64 hex digits (SHA-256), got {hex:?}"));
        if digits.len() != 64 || !digits.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&digits[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(CertCheck::Hash(out))
    }
}

/// Where and how to open a session.
#[derive(Clone)]
pub struct WtOptions {
    /// `https://HOST:PORT` or a full URL with path (and query); without a
    /// path, `/v1/wt` is used.
    pub url: String,
    /// Certificate check.
    pub cert: CertCheck,
    /// Client id for `connect` (open mode).
    pub client_id: String,
    /// Connection token for `connect`.
    pub token: String,
    /// Extra request headers (e.g. `authorization`).
    pub headers: Vec<(String, String)>,
    /// Send no `connect`: the URL carries the credentials (`?token=`,
    /// `?client_id=`) and the server says `connected` first.
    pub query_auth: bool,
    /// QUIC transport settings instead of quinn's defaults (tests use small
    /// windows to make a stalled reader bite).
    pub transport: Option<Arc<QuicTransportConfig>>,
}

impl std::fmt::Debug for WtOptions {
    // Hand-written so that a token never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WtOptions")
            .field("url", &self.url)
            .field("cert", &self.cert)
            .field("client_id", &self.client_id)
            .field("token", &if self.token.is_empty() { "" } else { "<redacted>" })
            .field("query_auth", &self.query_auth)
            .finish_non_exhaustive()
    }
}

impl WtOptions {
    /// Options for `url` with a certificate check and nothing else.
    pub fn new(url: impl Into<String>, cert: CertCheck) -> WtOptions {
        WtOptions {
            url: url.into(),
            cert,
            client_id: String::new(),
            token: String::new(),
            headers: Vec::new(),
            query_auth: false,
            transport: None,
        }
    }

    /// The session URL: `/v1/wt` appended when the URL has no path.
    pub fn session_url(&self) -> String {
        let url = self.url.trim_end_matches('/');
        let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
        if after_scheme.contains('/') { url.to_string() } else { format!("{url}/v1/wt") }
    }
}

/// The wtransport endpoint (a UDP socket of the right family) and its
/// configuration for `opts`.
async fn endpoint(opts: &WtOptions, url: &str) -> Result<Endpoint<Client>, ClientError> {
    let parsed = url::Url::parse(url).map_err(|e| ClientError::Usage(format!("bad URL {url:?}: {e}")))?;
    if parsed.scheme() != "https" {
        return Err(ClientError::Usage(format!("WebTransport URLs start with https://, got {url:?}")));
    }
    let host = parsed.host_str().unwrap_or("127.0.0.1").trim_matches(['[', ']']).to_string();
    let port = parsed.port().unwrap_or(443);
    // Bind the family the server is reached on (a dual-stack socket may be
    // unavailable where IPv6 is off).
    let target = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| wt_err(format!("cannot resolve {host}: {e}")))?
        .next()
        .ok_or_else(|| wt_err(format!("{host} resolves to nothing")))?;
    let bind: SocketAddr = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().map_err(wt_err)?;
    client_endpoint(bind, opts.cert, opts.transport.clone())
}

/// A client endpoint (one UDP socket and its quinn driver) bound to `bind`,
/// checking the server's certificate with `cert`; many sessions may share
/// it. Must run inside the tokio runtime.
pub fn client_endpoint(
    bind: SocketAddr,
    cert: CertCheck,
    transport: Option<Arc<QuicTransportConfig>>,
) -> Result<Endpoint<Client>, ClientError> {
    let builder = ClientConfig::builder().with_bind_address(bind);
    let builder = match cert {
        CertCheck::System => builder.with_native_certs(),
        CertCheck::Hash(h) => builder.with_server_certificate_hashes([Sha256Digest::new(h)]),
        CertCheck::Insecure => builder.with_no_cert_validation(),
    };
    let mut config = builder.build();
    if let Some(t) = transport {
        config.quic_config_mut().transport_config(t);
    }
    Endpoint::client(config).map_err(wt_err)
}

/// Opens a bare session (no control stream): for tests that speak the
/// protocol by hand. The endpoint must outlive the connection.
pub async fn open_session(opts: &WtOptions) -> Result<(Endpoint<Client>, Connection), ClientError> {
    let url = opts.session_url();
    let endpoint = endpoint(opts, &url).await?;
    let mut request = ConnectOptions::builder(url);
    for (k, v) in &opts.headers {
        request = request.add_header(k, v);
    }
    let conn = tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect(request.build()))
        .await
        .map_err(|_| wt_err("connect timed out"))?
        .map_err(wt_err)?;
    Ok((endpoint, conn))
}

/// Reads length-delimited server frames from one stream.
#[derive(Debug)]
pub struct FrameReader {
    stream: RecvStream,
    buf: BytesMut,
}

impl FrameReader {
    /// Frames of `stream`.
    pub fn new(stream: RecvStream) -> FrameReader {
        FrameReader { stream, buf: BytesMut::new() }
    }

    /// The next frame's bytes; `None` when the stream finished cleanly.
    pub async fn next_raw(&mut self) -> Result<Option<Bytes>, ClientError> {
        loop {
            if let Some(body) = codec::split_frame(&mut self.buf, MAX_FRAME).map_err(wt_err)? {
                return Ok(Some(body));
            }
            match self.stream.quic_stream_mut().read_chunk(64 * 1024, true).await.map_err(wt_err)? {
                Some(chunk) => self.buf.extend_from_slice(&chunk.bytes),
                None if self.buf.is_empty() => return Ok(None),
                None => return Err(wt_err("stream ended inside a frame")),
            }
        }
    }

    /// The next frame; `None` when the stream finished cleanly.
    pub async fn next(&mut self) -> Result<Option<proto::ServerFrame>, ClientError> {
        match self.next_raw().await? {
            Some(body) => proto::ServerFrame::decode(body).map(Some).map_err(wt_err),
            None => Ok(None),
        }
    }

    /// The stream itself (to stop it, or to read raw).
    pub fn stream_mut(&mut self) -> &mut RecvStream {
        &mut self.stream
    }
}

/// Appends `frame` as one length-delimited frame to `out`.
fn put(out: &mut BytesMut, frame: &proto::ClientFrame) {
    codec::put_frame(out, &frame.encode_to_vec());
}

/// A Switchboard session over WebTransport.
pub struct WtClient {
    conn: Connection,
    // Keeps the UDP socket (and quinn's driver) alive with the session.
    _endpoint: Endpoint<Client>,
    send: SendStream,
    control: FrameReader,
    next_req: u64,
    /// Frames pushed on the control stream while waiting for a reply.
    pending: VecDeque<proto::ServerFrame>,
    /// The `connected` reply.
    pub connected: proto::Connected,
}

impl WtClient {
    /// Opens a session, the control stream, and connects (a `connect`
    /// frame, or with `query_auth` the server's own `connected`).
    pub async fn connect(opts: &WtOptions) -> Result<WtClient, ClientError> {
        tokio::time::timeout(CONNECT_TIMEOUT, Self::connect_inner(opts))
            .await
            .map_err(|_| wt_err("connect timed out"))?
    }

    async fn connect_inner(opts: &WtOptions) -> Result<WtClient, ClientError> {
        let (endpoint, conn) = open_session(opts).await?;
        let (send, recv) = conn.open_bi().await.map_err(wt_err)?.await.map_err(wt_err)?;
        let mut c = WtClient {
            conn,
            _endpoint: endpoint,
            send,
            control: FrameReader::new(recv),
            next_req: 0,
            pending: VecDeque::new(),
            connected: proto::Connected::default(),
        };
        let reply = if opts.query_auth {
            // The stream becomes visible to the server with its first bytes.
            c.request(client_frame::Frame::Ping(proto::Ping {})).await?;
            c.pending.pop_front().ok_or_else(|| ClientError::Unexpected("no connected frame".into()))?
        } else {
            let connect = proto::Connect { token: opts.token.clone(), client_id: opts.client_id.clone() };
            c.request(client_frame::Frame::Connect(connect)).await?
        };
        match reply.frame {
            Some(server_frame::Frame::Connected(conn)) => c.connected = conn,
            Some(server_frame::Frame::Error(e)) => {
                return Err(ClientError::Gateway { code: e.code().slug().into(), message: e.message });
            }
            other => return Err(ClientError::Unexpected(format!("{other:?}"))),
        }
        Ok(c)
    }

    /// The WebTransport session.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Writes raw bytes on the control stream.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.send.write_all(bytes).await.map_err(wt_err)
    }

    /// Sends a frame with the next request id; returns that id.
    pub async fn send(&mut self, frame: client_frame::Frame) -> Result<u64, ClientError> {
        self.next_req += 1;
        let mut buf = BytesMut::new();
        put(&mut buf, &proto::ClientFrame { req: self.next_req, frame: Some(frame) });
        self.send_raw(&buf).await?;
        Ok(self.next_req)
    }

    /// The next frame on the control stream (not from the pushed queue).
    pub async fn recv_control(&mut self) -> Result<proto::ServerFrame, ClientError> {
        self.control.next().await?.ok_or_else(|| ClientError::Closed(": control stream finished".into()))
    }

    /// Sends a request and waits for its reply, keeping frames pushed
    /// meanwhile for [`WtClient::next_pushed`].
    pub async fn request(&mut self, frame: client_frame::Frame) -> Result<proto::ServerFrame, ClientError> {
        let req = self.send(frame).await?;
        loop {
            let f = self.recv_control().await?;
            if f.req == req {
                return Ok(f);
            }
            self.pending.push_back(f);
        }
    }

    /// The next frame pushed on the control stream (`disconnect`, or an
    /// `error` for a datagram publish).
    pub async fn next_pushed(&mut self) -> Result<proto::ServerFrame, ClientError> {
        match self.pending.pop_front() {
            Some(f) => Ok(f),
            None => self.recv_control().await,
        }
    }

    /// Subscribes; the `subscribed` reply, or the error as `Err`.
    pub async fn subscribe(&mut self, sub: proto::Subscribe) -> Result<proto::Subscribed, ClientError> {
        match self.request(client_frame::Frame::Subscribe(sub)).await?.frame {
            Some(server_frame::Frame::Subscribed(s)) => Ok(s),
            Some(server_frame::Frame::Error(e)) => {
                Err(ClientError::Gateway { code: e.code().slug().into(), message: e.message })
            }
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Publishes with an ack.
    pub async fn publish(&mut self, p: proto::Publish) -> Result<proto::PublishAck, ClientError> {
        match self.request(client_frame::Frame::Publish(p)).await?.frame {
            Some(server_frame::Frame::PublishAck(a)) => Ok(a),
            Some(server_frame::Frame::Error(e)) => {
                Err(ClientError::Gateway { code: e.code().slug().into(), message: e.message })
            }
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Publishes as one datagram (QoS 0, no ack). A refusal comes back as
    /// an `error` pushed on the control stream when `req` is not 0.
    pub fn publish_datagram(&self, req: u64, p: proto::Publish) -> Result<(), ClientError> {
        let frame = proto::ClientFrame { req, frame: Some(client_frame::Frame::Publish(p)) };
        self.conn.send_datagram(frame.encode_to_vec()).map_err(wt_err)
    }

    /// The next server-opened stream (a channel's deliveries).
    pub async fn accept_stream(&self) -> Result<FrameReader, ClientError> {
        self.conn.accept_uni().await.map(FrameReader::new).map_err(wt_err)
    }

    /// The next datagram, decoded.
    pub async fn recv_datagram(&self) -> Result<proto::ServerFrame, ClientError> {
        let dg = self.conn.receive_datagram().await.map_err(wt_err)?;
        proto::ServerFrame::decode(dg.payload()).map_err(wt_err)
    }

    /// Closes the session (application code 0).
    pub fn close(&self) {
        self.conn.close(VarInt::from_u32(0), b"bye");
    }

    /// Reads every stream and datagram of the session from background
    /// tasks into one queue of frames (for `sub`).
    pub fn into_events(self) -> WtEvents {
        // Bounded: a consumer that falls behind stalls the readers, and so
        // QUIC flow control, rather than growing memory.
        let (tx, rx) = mpsc::channel(1024);
        let mut tasks = Vec::new();
        let mut control = self.control;
        let ctl_tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let next = control.next().await.and_then(|f| f.ok_or_else(|| ClientError::Closed(String::new())));
                let failed = next.is_err();
                if ctl_tx.send(next).await.is_err() || failed {
                    break;
                }
            }
        }));
        let conn = self.conn.clone();
        let uni_tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            while let Ok(stream) = conn.accept_uni().await {
                let tx = uni_tx.clone();
                tokio::spawn(async move {
                    let mut reader = FrameReader::new(stream);
                    while let Ok(Some(f)) = reader.next().await {
                        if tx.send(Ok(f)).await.is_err() {
                            break;
                        }
                    }
                });
            }
        }));
        let conn = self.conn.clone();
        tasks.push(tokio::spawn(async move {
            while let Ok(dg) = conn.receive_datagram().await {
                if let Ok(f) = proto::ServerFrame::decode(dg.payload())
                    && tx.send(Ok(f)).await.is_err()
                {
                    break;
                }
            }
        }));
        let pending = self.pending;
        WtEvents { conn: self.conn, _endpoint: self._endpoint, _send: self.send, rx, tasks, pending }
    }
}

/// Every frame of a session, from its control stream, channel streams and
/// datagrams (see [`WtClient::into_events`]). Dropping it closes the session.
pub struct WtEvents {
    conn: Connection,
    _endpoint: Endpoint<Client>,
    // Held open: finishing the control stream ends the session.
    _send: SendStream,
    rx: mpsc::Receiver<Result<proto::ServerFrame, ClientError>>,
    tasks: Vec<JoinHandle<()>>,
    pending: VecDeque<proto::ServerFrame>,
}

impl WtEvents {
    /// The next frame from anywhere; `Err` once the session is gone.
    pub async fn next(&mut self) -> Result<proto::ServerFrame, ClientError> {
        if let Some(f) = self.pending.pop_front() {
            return Ok(f);
        }
        let closed = self.conn.closed();
        tokio::select! {
            biased;
            f = self.rx.recv() => f.unwrap_or_else(|| Err(ClientError::Closed(String::new()))),
            e = closed => Err(ClientError::Closed(format!(": {e}"))),
        }
    }
}

impl Drop for WtEvents {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.conn.close(VarInt::from_u32(0), b"bye");
    }
}

impl FrameSource for WtEvents {
    async fn next_frame(&mut self) -> Result<proto::ServerFrame, ClientError> {
        let f = self.next().await?;
        if let Some(server_frame::Frame::Disconnect(d)) = &f.frame {
            return Err(ClientError::Closed(format!(": {} {}", d.code, d.reason)));
        }
        Ok(f)
    }

    async fn finish(self) {}
}

/// Publishes over WebTransport; returns the ack.
pub async fn publish_wt(
    opts: &WtOptions,
    channel: &str,
    payload: Bytes,
    id: Option<&str>,
) -> Result<proto::PublishAck, ClientError> {
    let mut c = WtClient::connect(opts).await?;
    let p =
        proto::Publish { channel: channel.into(), payload, id: id.unwrap_or_default().into(), ..Default::default() };
    let ack = c.publish(p).await;
    c.close();
    ack
}

/// Subscribes over WebTransport until `on_event` returns false. On a
/// dropped session it reconnects (with backoff) and resubscribes from the
/// last position of every channel seen, as `sub --via ws` does.
pub async fn subscribe_wt(
    opts: &WtOptions,
    filter: &str,
    rewind: Option<u32>,
    on_event: impl FnMut(SubEvent) -> bool,
) -> Result<(), ClientError> {
    let connect = |sub: proto::Subscribe| async move {
        let mut c = WtClient::connect(opts).await?;
        // The reply comes back among the events, like every other frame.
        c.send(client_frame::Frame::Subscribe(sub)).await?;
        Ok::<_, ClientError>(c.into_events())
    };
    resubscribe(filter, rewind, connect, on_event).await
}

/// What a message says about the ones before it on its channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// The first message seen of this channel (or of a new epoch).
    First,
    /// The next one: nothing was missed.
    Next,
    /// Messages after serial `after` up to and including `through` were
    /// missed (lost datagrams, or dropped by a slow-consumer policy).
    Missed {
        /// The last serial received before the hole.
        after: u64,
        /// The last serial of the hole (the message's `prev_serial`).
        through: u64,
    },
    /// Older than what was already received (a late datagram): skip it.
    Stale,
}

/// Follows `(epoch, serial, prev_serial)` per channel, for receivers of
/// unreliable (datagram) delivery: each message is reported as the next
/// one, a hole, or stale.
#[derive(Debug, Default)]
pub struct SerialTracker {
    last: HashMap<String, (String, u64)>,
}

impl SerialTracker {
    /// Starts `channel` from a known position (e.g. a `subscribed` reply's
    /// channel state), so a loss right at the start is seen too.
    pub fn seed(&mut self, channel: &str, epoch: &str, serial: u64) {
        self.last.insert(channel.to_string(), (epoch.to_string(), serial));
    }

    /// Classifies `env` and remembers it unless it is stale.
    pub fn observe(&mut self, env: &proto::Envelope) -> Seen {
        let seen = match self.last.get(&env.channel) {
            Some((epoch, last)) if *epoch == env.epoch => {
                if env.serial <= *last {
                    return Seen::Stale;
                }
                if env.prev_serial <= *last {
                    Seen::Next
                } else {
                    Seen::Missed { after: *last, through: env.prev_serial }
                }
            }
            _ => Seen::First,
        };
        self.last.insert(env.channel.clone(), (env.epoch.clone(), env.serial));
        seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(serial: u64, prev: u64) -> proto::Envelope {
        proto::Envelope { channel: "c".into(), epoch: "E".into(), serial, prev_serial: prev, ..Default::default() }
    }

    #[test]
    fn tracker_reports_holes_and_stale_messages() {
        let mut t = SerialTracker::default();
        assert_eq!(t.observe(&env(3, 2)), Seen::First);
        assert_eq!(t.observe(&env(4, 3)), Seen::Next);
        assert_eq!(t.observe(&env(7, 6)), Seen::Missed { after: 4, through: 6 });
        assert_eq!(t.observe(&env(5, 4)), Seen::Stale, "late");
        assert_eq!(t.observe(&env(7, 6)), Seen::Stale, "duplicate");
        assert_eq!(t.observe(&env(8, 7)), Seen::Next);
        let fresh = proto::Envelope { epoch: "F".into(), ..env(1, 0) };
        assert_eq!(t.observe(&fresh), Seen::First, "a new epoch starts over");
        t.seed("c", "F", 1);
        assert_eq!(
            t.observe(&proto::Envelope { epoch: "F".into(), ..env(3, 2) }),
            Seen::Missed { after: 1, through: 2 }
        );
    }

    #[test]
    fn cert_hash_parses_hex_with_or_without_colons() {
        let hex = "ab".repeat(32);
        assert_eq!(CertCheck::from_hex(&hex).unwrap(), CertCheck::Hash([0xab; 32]));
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(CertCheck::from_hex(&colons).unwrap(), CertCheck::Hash([0xab; 32]));
        assert!(CertCheck::from_hex("abc").is_err());
        assert!(CertCheck::from_hex(&"zz".repeat(32)).is_err());
        assert!(CertCheck::from_hex(&"é".repeat(32)).is_err());
    }

    #[test]
    fn session_url_defaults_the_path() {
        let url = |u: &str| WtOptions::new(u, CertCheck::Insecure).session_url();
        assert_eq!(url("https://127.0.0.1:8443"), "https://127.0.0.1:8443/v1/wt");
        assert_eq!(url("https://127.0.0.1:8443/"), "https://127.0.0.1:8443/v1/wt");
        assert_eq!(url("https://h:1/v1/wt?token=x"), "https://h:1/v1/wt?token=x");
        assert_eq!(url("https://h:1/elsewhere"), "https://h:1/elsewhere");
    }
}
