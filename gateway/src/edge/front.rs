//! The HTTP/1.1 front door: long-lived streams without hyper's buffers.
//!
//! An SSE stream or a pending long poll is an idle connection most of its
//! life, and hyper keeps about 30 KiB per HTTP/1.1 connection (a read buffer
//! of 8 to 16 KiB, an 8 KiB header buffer, the connection state) for as long
//! as the response lasts. The front door reads each request head itself;
//! `GET /v1/sse` and `GET /v1/poll` are served here, with the same handlers
//! hyper's routes use ([`crate::edge::http::stream_get`]) and no per-connection
//! buffer while they wait. Everything else — WebSocket and MQTT upgrades,
//! REST, `POST /v1/poll`, HTTP/2 (h2c preface or ALPN), anything this
//! module does not understand — goes to hyper untouched: the bytes already
//! read are replayed in front of the connection ([`Prefixed`]).
//!
//! Served here, per HTTP/1.1 (RFC 9112):
//! - keep-alive: after a complete response (a long poll's answer, an
//!   error) the next request head is read on the same connection, so a
//!   polling client reuses it; `Connection: close` and HTTP/1.0 close after
//!   the response;
//! - SSE bodies are sent chunked (HTTP/1.0: delimited by the close), one
//!   write per event batch, each within `[http] write_timeout` (else the
//!   connection is dropped); a peer that closes its side ends the stream;
//! - a head must be whole within `[http] header_read_timeout` of its first
//!   byte (the first request's: of the accept), else `408` and close, and
//!   be at most [`MAX_HEAD`] bytes (larger heads go to hyper, which answers
//!   431); between requests a connection waits at most `[http]
//!   idle_timeout` for the next one. Each expiry counts in
//!   `switchboard_http_timeouts_total{kind}` ([`crate::edge::timeouts`],
//!   which bounds what hyper serves the same way).

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{Request, Response};
use http_body_util::BodyExt as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::edge::http::{Body, HttpState};
use crate::edge::timeouts::{self, Expired};

/// Largest request head the front door reads; a longer one goes to hyper.
pub const MAX_HEAD: usize = 8 * 1024;

/// Headers the front door parses at most; more go to hyper.
const MAX_HEADERS: usize = 64;

/// What became of a connection.
pub enum Outcome<IO> {
    /// Served to the end (closed, or the peer went away).
    Done,
    /// Not for the front door: serve it with hyper, bytes already read
    /// first. The long poller's session kept on the connection goes along:
    /// a request hyper serves next (a REST call acting for that session, or
    /// the next poll) finds it there instead of ending it.
    Hyper(Prefixed<IO>, crate::edge::http::PollSlot),
}

/// A connection with bytes already read from it, replayed first.
pub struct Prefixed<IO> {
    prefix: Bytes,
    io: IO,
}

impl<IO> Prefixed<IO> {
    /// Whether the connection starts with the HTTP/2 preface (h2c with
    /// prior knowledge, or HTTP/2 over TLS without ALPN).
    pub fn is_h2_preface(&self) -> bool {
        self.prefix.starts_with(b"PRI * HTTP/2.0")
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                // Release the buffer now: an upgraded connection (a
                // WebSocket) keeps this wrapper for its whole life.
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A parsed head the front door serves.
struct Head {
    request: Request<()>,
    /// Bytes of the head (the rest of the buffer is the next request).
    len: usize,
    /// Keep the connection open after the response.
    keep_alive: bool,
    /// HTTP/1.1 (chunked bodies) rather than 1.0.
    http11: bool,
}

/// What the bytes read so far are.
enum Parsed {
    /// Not complete yet.
    Partial,
    /// Not ours (or not understood): hyper's.
    Hyper,
    /// A request the front door serves.
    Ours(Box<Head>),
}

/// What the front door makes of the bytes of a request head, for the fuzz
/// target `http_front_door` and tests.
#[doc(hidden)]
#[derive(Debug, PartialEq, Eq)]
pub enum Classified {
    /// Not complete yet (and under [`MAX_HEAD`]).
    Partial,
    /// Handed to hyper.
    Hyper,
    /// Served here: the head's length, whether the connection stays open,
    /// and the request's path with its query.
    Ours {
        /// Bytes of the head.
        len: usize,
        /// Keep-alive after the response.
        keep_alive: bool,
        /// Path and query.
        path: String,
    },
}

/// Classifies `buf` as the front door does (see [`Classified`]).
#[doc(hidden)]
pub fn classify(buf: &[u8]) -> Classified {
    match parse(buf) {
        Parsed::Partial => Classified::Partial,
        Parsed::Hyper => Classified::Hyper,
        Parsed::Ours(h) => Classified::Ours {
            len: h.len,
            keep_alive: h.keep_alive,
            path: h.request.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default(),
        },
    }
}

fn parse(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Parsed::Partial,
        _ => return Parsed::Hyper,
    };
    let (Some("GET"), Some(path), Some(version)) = (req.method, req.path, req.version) else {
        return Parsed::Hyper;
    };
    let route = path.split('?').next().unwrap_or_default();
    if route != "/v1/sse" && route != "/v1/poll" {
        return Parsed::Hyper;
    }
    let mut builder = Request::get(path);
    let mut close = version == 0;
    for h in req.headers.iter() {
        let name = h.name;
        // A body, an upgrade or an expectation: hyper knows what to do.
        if name.eq_ignore_ascii_case("content-length") && h.value != b"0"
            || name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("upgrade")
            || name.eq_ignore_ascii_case("expect")
        {
            return Parsed::Hyper;
        }
        if name.eq_ignore_ascii_case("connection") {
            let v = String::from_utf8_lossy(h.value).to_ascii_lowercase();
            if v.split(',').any(|t| t.trim() == "close") {
                close = true;
            } else if v.split(',').any(|t| t.trim() == "keep-alive") && version == 0 {
                close = false;
            }
        }
        builder = builder.header(name, h.value);
    }
    match builder.version(if version == 1 { http::Version::HTTP_11 } else { http::Version::HTTP_10 }).body(()) {
        Ok(request) => Parsed::Ours(Box::new(Head { request, len, keep_alive: !close, http11: version == 1 })),
        Err(_) => Parsed::Hyper,
    }
}

/// Serves the connection's requests until one is not for the front door
/// (returned for hyper) or the connection ends.
pub async fn serve<IO: AsyncRead + AsyncWrite + Unpin + Send>(
    mut io: IO,
    state: HttpState,
    peer: SocketAddr,
) -> Outcome<IO> {
    let timeouts = state.config.http.timeouts();
    let write_timeout = timeouts.write;
    let mut buf = BytesMut::new();
    // A long poller's session between its polls on this connection.
    let poll_slot = crate::edge::http::PollSlot::default();
    let mut first = true;
    loop {
        // After a response, the next request may take the idle timeout to
        // start (unless it is here already, pipelined); its head then has
        // the header timeout. The first request's head has it from the
        // accept.
        if !std::mem::take(&mut first) && buf.is_empty() {
            match tokio::time::timeout(timeouts.idle, read_first(&mut io, &mut buf)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Outcome::Done,
                Err(_) => {
                    timeouts::expired(Expired::Idle, peer);
                    return Outcome::Done;
                }
            }
        }
        let head = match tokio::time::timeout(timeouts.header_read, read_head(&mut io, &mut buf)).await {
            Ok(Ok(Some(head))) => head,
            Ok(Ok(None)) => return Outcome::Hyper(Prefixed { prefix: buf.freeze(), io }, poll_slot),
            Ok(Err(_)) => return Outcome::Done,
            // Nothing at all came: an idle connection, closed in silence.
            Err(_) if buf.is_empty() => {
                timeouts::expired(Expired::Idle, peer);
                return Outcome::Done;
            }
            Err(_) => {
                // A head that never finished: tell the client, then close.
                timeouts::expired(Expired::Header, peer);
                let _ = write_all(&mut io, TIMEOUT_RESPONSE, write_timeout).await;
                return Outcome::Done;
            }
        };
        let (keep_alive, http11) = (head.keep_alive, head.http11);
        let Some(response) = answer(&mut io, &mut buf, &state, peer, &poll_slot, head).await else {
            return Outcome::Done;
        };
        let keep_alive = keep_alive && !*state.shutdown.borrow();
        match respond(&mut io, response, keep_alive, http11, write_timeout).await {
            Ok(true) => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                // The client stopped reading: drop it, without waiting more.
                timeouts::expired(Expired::Write, peer);
                return Outcome::Done;
            }
            Ok(false) | Err(_) => {
                let _ = tokio::time::timeout(Duration::from_secs(1), io.shutdown()).await;
                return Outcome::Done;
            }
        }
    }
}

/// Runs the handler for one request head: `None` when the peer went away
/// first (a client that leaves while its poll waits ends the wait, and its
/// session). Its own future, so that what the handler needed (the request
/// and its header map) is gone before the response is sent.
async fn answer<IO: AsyncRead + Unpin>(
    io: &mut IO,
    buf: &mut BytesMut,
    state: &HttpState,
    peer: SocketAddr,
    poll_slot: &crate::edge::http::PollSlot,
    head: Box<Head>,
) -> Option<Response<Body>> {
    let Head { mut request, len, .. } = *head;
    request.extensions_mut().insert(poll_slot.clone());
    buf.advance(len);
    if buf.is_empty() {
        // An idle connection holds no read buffer.
        *buf = BytesMut::new();
    }
    // Boxed: the handler's state is needed only until the response starts.
    let handler = Box::pin(crate::edge::http::stream_get(state.clone(), peer, &request));
    tokio::select! {
        r = handler => r,
        () = peer_gone(io, buf) => None,
    }
}

/// Resolves when the peer closes or resets the connection. Bytes it sends
/// meanwhile (a pipelined next request) are kept in `buf`, up to
/// [`MAX_HEAD`]; beyond that reading stops until the response is out.
async fn peer_gone<IO: AsyncRead + Unpin>(io: &mut IO, buf: &mut BytesMut) {
    loop {
        if buf.len() >= MAX_HEAD {
            return std::future::pending().await;
        }
        let mut bytes = [0u8; 64];
        match io.read(&mut bytes).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&bytes[..n]),
        }
    }
}

const TIMEOUT_RESPONSE: &[u8] = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";

/// Reads until a complete head: `Some` when the front door serves it,
/// `None` when it goes to hyper (the bytes stay in `buf`).
async fn read_head<IO: AsyncRead + Unpin>(io: &mut IO, buf: &mut BytesMut) -> std::io::Result<Option<Box<Head>>> {
    loop {
        if buf.is_empty() {
            read_first(io, buf).await?;
        }
        match parse(buf) {
            Parsed::Partial => {}
            Parsed::Hyper => return Ok(None),
            Parsed::Ours(head) => return Ok(Some(head)),
        }
        buf.reserve(1024.min(MAX_HEAD.saturating_sub(buf.len())).max(64));
        if io.read_buf(buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// Waits for the first bytes of a request into the empty `buf`. The wait
/// reads into a few bytes inline, so an idle keep-alive connection holds
/// no buffer.
async fn read_first<IO: AsyncRead + Unpin>(io: &mut IO, buf: &mut BytesMut) -> std::io::Result<()> {
    let mut first = [0u8; 64];
    let n = io.read(&mut first).await?;
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    buf.reserve(1024);
    buf.put_slice(&first[..n]);
    Ok(())
}

async fn write_all<IO: AsyncWrite + Unpin>(io: &mut IO, bytes: &[u8], limit: Duration) -> std::io::Result<()> {
    match tokio::time::timeout(limit, async {
        io.write_all(bytes).await?;
        io.flush().await
    })
    .await
    {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// Writes a response. A body of known length is sent with
/// `content-length` and the connection may go on (`Ok(true)`); a stream is
/// sent chunked (HTTP/1.0: until the close) while the peer stays.
///
/// Not an `async fn`: the response head is rendered before the future is
/// built, so the future (and the task of an idle stream) does not keep the
/// response's parts.
fn respond<'a, IO: AsyncRead + AsyncWrite + Unpin>(
    io: &'a mut IO,
    response: Response<Body>,
    keep_alive: bool,
    http11: bool,
    write_timeout: Duration,
) -> impl Future<Output = std::io::Result<bool>> + 'a {
    use hyper::body::Body as _;
    let (parts, mut body) = response.into_parts();
    let exact = body.size_hint().exact();
    let streaming = exact.is_none();
    // HTTP/1.0 has no chunked encoding: its stream ends with the connection.
    let keep_alive = keep_alive && (http11 || !streaming);
    let mut out = head(&parts, exact, keep_alive, http11);
    drop(parts);
    async move {
        if !streaming {
            while let Some(Ok(frame)) = body.frame().await {
                if let Ok(data) = frame.into_data() {
                    out.put_slice(&data);
                }
            }
            send(io, &out, write_timeout).await?;
            return Ok(keep_alive);
        }
        send(io, &out, write_timeout).await?;
        drop(out);
        stream_body(io, body, http11, write_timeout).await?;
        Ok(false)
    }
}

/// The status line and headers of a response, in a buffer with room for a
/// body of known length after them (up to 64 KiB): written in place, without
/// a temporary string per line or a reallocation for the body.
fn head(parts: &http::response::Parts, exact: Option<u64>, keep_alive: bool, http11: bool) -> BytesMut {
    use std::fmt::Write as _;
    const ROOM: usize = 256;
    let body = exact.map_or(0, |n| usize::try_from(n).unwrap_or(usize::MAX).min(64 * 1024));
    let mut out = BytesMut::with_capacity(ROOM + body);
    let version = if http11 { "HTTP/1.1" } else { "HTTP/1.0" };
    let reason = parts.status.canonical_reason().unwrap_or("");
    // Writing to a `BytesMut` cannot fail.
    let _ = write!(out, "{version} {} {reason}\r\n", parts.status.as_u16());
    for (name, value) in &parts.headers {
        out.put_slice(name.as_str().as_bytes());
        out.put_slice(b": ");
        out.put_slice(value.as_bytes());
        out.put_slice(b"\r\n");
    }
    let _ = write!(out, "date: {}\r\n", httpdate::HttpDate::from(std::time::SystemTime::now()));
    match exact {
        Some(len) => {
            let _ = write!(out, "content-length: {len}\r\n");
        }
        None if http11 => out.put_slice(b"transfer-encoding: chunked\r\n"),
        None => {}
    }
    out.put_slice(if keep_alive { b"connection: keep-alive\r\n\r\n" } else { b"connection: close\r\n\r\n" });
    out
}

/// Sends a streaming body (chunked on HTTP/1.1) until it ends or the peer
/// goes. The wait between events is what an idle stream's task holds for
/// its whole life, so it holds only the body and a small probe buffer:
/// writes that do not complete at once continue in a future of their own.
async fn stream_body<IO: AsyncRead + AsyncWrite + Unpin>(
    io: &mut IO,
    mut body: Body,
    http11: bool,
    write_timeout: Duration,
) -> std::io::Result<()> {
    let mut probe = [0u8; 16];
    loop {
        let frame = tokio::select! {
            frame = body.frame() => frame,
            // The peer closing its side (or resetting) ends the stream;
            // anything it sends meanwhile is ignored.
            r = io.read(&mut probe) => match r {
                Ok(0) | Err(_) => return Ok(()),
                Ok(_) => continue,
            },
        };
        let Some(Ok(frame)) = frame else { break };
        let Ok(data) = frame.into_data() else { continue };
        if data.is_empty() {
            continue;
        }
        if http11 {
            let mut chunk = BytesMut::with_capacity(data.len() + 12);
            let _ = std::fmt::Write::write_fmt(&mut chunk, format_args!("{:x}\r\n", data.len()));
            chunk.put_slice(&data);
            chunk.put_slice(b"\r\n");
            send(io, &chunk, write_timeout).await?;
        } else {
            send(io, &data, write_timeout).await?;
        }
    }
    if http11 {
        send(io, b"0\r\n\r\n", write_timeout).await?;
    }
    Ok(())
}

/// Writes and flushes `bytes`: at once when the socket takes them all (the
/// usual case: no timer, no allocation), otherwise in a boxed
/// [`write_all`] bounded by `limit`. The idea of
/// [`switchboard_protocols::deadline`], with the rest of the write boxed
/// too: this future is part of every idle SSE stream's state.
async fn send<IO: AsyncWrite + Unpin>(io: &mut IO, bytes: &[u8], limit: Duration) -> std::io::Result<()> {
    use futures_util::FutureExt as _;
    let mut rest = bytes;
    while !rest.is_empty() {
        match io.write(rest).now_or_never() {
            Some(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
            Some(Ok(n)) => rest = &rest[n..],
            Some(Err(e)) => return Err(e),
            None => break,
        }
    }
    if rest.is_empty() && matches!(io.flush().now_or_never(), Some(Ok(()))) {
        return Ok(());
    }
    Box::pin(write_all(io, rest, limit)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_gets_are_ours_everything_else_goes_to_hyper() {
        let ours = |raw: &str| matches!(parse(raw.as_bytes()), Parsed::Ours(_));
        let hyper = |raw: &str| matches!(parse(raw.as_bytes()), Parsed::Hyper);
        assert!(ours("GET /v1/sse?channel=a HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(ours("GET /v1/poll?channel=a HTTP/1.0\r\n\r\n"));
        assert!(hyper("GET /v1/ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n"));
        assert!(hyper("GET /v1/sse HTTP/1.1\r\nUpgrade: h2c\r\n\r\n"));
        assert!(hyper("POST /v1/poll HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"));
        assert!(hyper("GET /v1/sse HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"));
        assert!(hyper("GET /v1/channels/a/history HTTP/1.1\r\n\r\n"));
        assert!(hyper("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
        assert!(hyper("\x16\x03\x01 binary"));
        assert!(matches!(parse(b"GET /v1/sse HTTP/1.1\r\nHost"), Parsed::Partial));
        let long = format!("GET /v1/sse?{} HTTP/1.1\r\n", "a".repeat(MAX_HEAD));
        assert!(hyper(&long), "an oversize head is hyper's (431)");
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection_header() {
        let head = |raw: &str| match parse(raw.as_bytes()) {
            Parsed::Ours(h) => h,
            _ => panic!("not ours: {raw}"),
        };
        assert!(head("GET /v1/poll HTTP/1.1\r\n\r\n").keep_alive);
        assert!(!head("GET /v1/poll HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(!head("GET /v1/poll HTTP/1.0\r\n\r\n").keep_alive);
        assert!(head("GET /v1/poll HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive);
        let h = head("GET /v1/poll?channel=a%2Fb HTTP/1.1\r\nLast-Event-ID: x\r\n\r\n");
        assert_eq!(h.request.uri().query(), Some("channel=a%2Fb"));
        assert_eq!(h.request.headers()["last-event-id"], "x");
    }

    /// An idle stream's memory is mostly its connection's task, and a task
    /// is as large as its future's largest state. The request's handling
    /// (`answer`) and slow writes (`send`) are futures of their own, and the
    /// response head is rendered before the streaming future is built, so
    /// the state an SSE stream waits in stays small (1 408 bytes before).
    #[test]
    fn an_idle_stream_waits_in_a_small_future() {
        fn size<Fut>(_f: impl FnOnce(tokio::io::DuplexStream, HttpState) -> Fut) -> usize {
            std::mem::size_of::<Fut>()
        }
        let peer: SocketAddr = "127.0.0.1:1".parse().expect("address");
        let serve = size(|io, state| serve(io, state, peer));
        let (_client, mut io) = tokio::io::duplex(64);
        let stream = std::mem::size_of_val(&stream_body(&mut io, crate::edge::http::full(""), true, Duration::ZERO));
        assert!(stream <= 400, "stream_body's future is {stream} bytes");
        assert!(serve <= 800, "serve's future is {serve} bytes");
    }

    #[tokio::test]
    async fn send_finishes_a_partial_write_and_times_out_on_a_stuck_peer() {
        // The socket takes 8 bytes at once; the rest goes once the peer reads.
        let (mut client, mut server) = tokio::io::duplex(8);
        let bytes: Vec<u8> = (0..64).collect();
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; 64];
            client.read_exact(&mut got).await.map(|_| (got, client))
        });
        send(&mut server, &bytes, Duration::from_secs(5)).await.expect("sent");
        let (got, mut client) = reader.await.expect("reader").expect("read");
        assert_eq!(got, bytes);
        // A peer that reads nothing: the write ends at the limit.
        let err = send(&mut server, &bytes, Duration::from_millis(50)).await.expect_err("stuck");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        let mut first = [0u8; 8];
        client.read_exact(&mut first).await.expect("the first 8 bytes");
        assert_eq!(&first[..], &bytes[..8]);
    }

    #[test]
    fn a_response_head_is_complete_and_leaves_room_for_its_body() {
        let mut r = Response::new(());
        r.headers_mut().insert("content-type", http::HeaderValue::from_static("application/json"));
        let (parts, ()) = r.into_parts();
        let text = |b: &BytesMut| String::from_utf8(b.to_vec()).expect("ascii");
        let fixed = head(&parts, Some(1000), true, true);
        let t = text(&fixed);
        assert!(t.starts_with("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ndate: "), "{t}");
        assert!(t.ends_with("GMT\r\ncontent-length: 1000\r\nconnection: keep-alive\r\n\r\n"), "{t}");
        assert!(fixed.capacity() >= fixed.len() + 1000, "room for the body");
        let stream = text(&head(&parts, None, false, true));
        assert!(stream.ends_with("\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"), "{stream}");
        let old = text(&head(&parts, None, false, false));
        assert!(old.starts_with("HTTP/1.0 200 OK\r\n") && !old.contains("chunked"), "{old}");
    }

    #[tokio::test]
    async fn a_prefixed_connection_replays_what_was_read() {
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b" world").await.unwrap();
        let mut p = Prefixed { prefix: Bytes::from_static(b"hello"), io: server };
        let mut got = vec![0u8; 11];
        p.read_exact(&mut got).await.unwrap();
        assert_eq!(got, b"hello world");
    }
}
