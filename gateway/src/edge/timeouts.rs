//! HTTP timeouts on the connections hyper serves: the request head, idle
//! keep-alive connections and response writes (the request body's is the
//! handlers': [`crate::edge::http`] reads bodies within `[http]
//! body_read_timeout`). The front door ([`crate::edge::front`]) applies the
//! same settings to the requests it serves itself.
//!
//! hyper has no usable timeouts of its own here: its HTTP/1.1 header timeout
//! also runs while a keep-alive connection waits for its next request (so it
//! cannot tell a slow head from an idle connection), and its HTTP/2 server
//! has none. So every connection hyper serves gets a [`Watch`], shared by
//! three observers:
//! - [`TimedIo`], below hyper: notes the first byte of an HTTP/1.1 request
//!   head, and fails a write (or flush) that makes no progress for the
//!   write timeout — a client that stops reading;
//! - [`Tracked`], around the service: counts requests in flight (from the
//!   head to the end of the response body) and notes, per response body,
//!   when a frame was handed to hyper and the next one is not asked for —
//!   an HTTP/2 stream whose client stops sending WINDOW_UPDATEs, which no
//!   socket write shows;
//! - [`Watchdog`], raced against the connection in its task: resolves at
//!   the earliest deadline that applies.
//!
//! | state | deadline | then |
//! |---|---|---|
//! | no request in flight, no byte of a next one (HTTP/2: no stream open) | `idle_timeout` after the last response ended | graceful close (HTTP/2: GOAWAY), dropped after `write_timeout` more |
//! | HTTP/1.1: part of a request head read | `header_read_timeout` after its first byte (a connection's first request: after the accept; if nothing came, it counts as idle) | dropped |
//! | a response frame not taken, or a write not progressing | `write_timeout` | dropped |
//!
//! A request in flight is never cut by the idle or header timeouts: a long
//! poll waits up to its own timeout, an SSE stream lasts as long as its
//! client reads, and an upgraded connection (WebSocket) leaves hyper and
//! these deadlines behind ([`Watch::release`]; WebSocket has its own). Each
//! expiry counts in `switchboard_http_timeouts_total{kind}` and logs
//! ([`expired`]).
//!
//! Not covered: an HTTP/2 request whose HEADERS frame arrives slowly waits
//! under the idle deadline, not the header one (between requests an HTTP/2
//! connection carries pings and settings, so a byte read is no sign of a
//! request).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http::{Request, Response};
use hyper::body::{Frame, Incoming, SizeHint};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::edge::http::Body;

/// The `[http]` timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpTimeouts {
    /// A request head must be whole within this of its first byte.
    pub header_read: Duration,
    /// A request body must be whole within this of its head.
    pub body_read: Duration,
    /// A keep-alive connection without a request is closed after this.
    pub idle: Duration,
    /// A response write that makes no progress for this drops the connection.
    pub write: Duration,
}

/// Which timeout expired: the `kind` label of
/// `switchboard_http_timeouts_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// The request head did not arrive in time.
    Header,
    /// The request body did not arrive in time.
    Body,
    /// The connection stayed without a request.
    Idle,
    /// The client did not take a response write.
    Write,
}

impl Expired {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Expired::Header => "header",
            Expired::Body => "body",
            Expired::Idle => "idle",
            Expired::Write => "write",
        }
    }
}

/// Counts an expired timeout in `switchboard_http_timeouts_total{kind}` and
/// logs it: `debug` for an idle connection (closing those is routine),
/// `info` for the others (a slow or stalled client).
pub fn expired(kind: Expired, peer: SocketAddr) {
    metrics::counter!("switchboard_http_timeouts_total", "kind" => kind.label()).increment(1);
    match kind {
        Expired::Idle => tracing::debug!(%peer, kind = kind.label(), "HTTP connection idle: closed"),
        _ => tracing::info!(%peer, kind = kind.label(), "HTTP timeout: connection closed"),
    }
}

/// One connection's state, as far as its deadlines go.
pub struct Watch {
    timeouts: HttpTimeouts,
    peer: SocketAddr,
    /// HTTP/2: bytes between requests are frames (pings, settings), not a
    /// request head, so only the idle deadline applies between requests.
    h2: bool,
    state: Mutex<State>,
    /// The connection left hyper (upgraded) or ended: no more deadlines.
    /// Outside the lock: an upgraded stream's reads and writes check it.
    released: AtomicBool,
    /// The connection's task (its [`Watchdog`]), woken when a deadline may
    /// have come nearer: HTTP/2 streams run in tasks of their own.
    waker: AtomicWaker,
}

struct State {
    /// Requests whose response has not ended (HTTP/1.1: 0 or 1; HTTP/2:
    /// open streams).
    active: usize,
    /// When `active` last fell to 0, or the connection started.
    idle_since: Instant,
    /// HTTP/1.1: since when the next request head is due (its first byte,
    /// or for a connection's first request the accept).
    head_since: Option<Instant>,
    /// Whether any byte of that head arrived: a connection that never sent
    /// one is counted as idle when its deadline passes.
    head_bytes: bool,
    /// Response bodies that handed hyper a frame and have not been asked
    /// for the next one yet, with the instant they did (by body id). A few
    /// at most: one per stream writing at this moment.
    handed: Vec<(u64, Instant)>,
    next_body: u64,
}

impl Watch {
    /// A connection starting now. HTTP/1.1 counts as reading its first head
    /// from the start; HTTP/2 as idle until its first request.
    pub fn new(timeouts: HttpTimeouts, peer: SocketAddr, h2: bool) -> Arc<Watch> {
        let now = Instant::now();
        Arc::new(Watch {
            timeouts,
            peer,
            h2,
            state: Mutex::new(State {
                active: 0,
                idle_since: now,
                head_since: (!h2).then_some(now),
                head_bytes: false,
                handed: Vec::new(),
                next_body: 0,
            }),
            released: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        })
    }

    /// The connection left hyper: an upgraded stream (a WebSocket) keeps
    /// [`TimedIo`] but has timeouts of its own.
    pub fn release(&self) {
        self.released.store(true, Ordering::Relaxed);
    }

    fn released(&self) -> bool {
        self.released.load(Ordering::Relaxed)
    }

    /// The earliest deadline that applies, and what expires then.
    fn deadline(&self) -> Option<(Instant, Expired)> {
        if self.released() {
            return None;
        }
        let s = self.state.lock();
        let t = &self.timeouts;
        let write = s.handed.iter().map(|(_, at)| (*at + t.write, Expired::Write)).min_by_key(|(at, _)| *at);
        let between = (s.active == 0).then(|| match s.head_since {
            Some(at) => (at + t.header_read, if s.head_bytes { Expired::Header } else { Expired::Idle }),
            None => (s.idle_since + t.idle, Expired::Idle),
        });
        [write, between].into_iter().flatten().min_by_key(|(at, _)| *at)
    }

    /// Bytes arrived: between HTTP/1.1 requests, the next head has begun.
    fn bytes_read(&self) {
        if self.h2 || self.released() {
            return;
        }
        let mut s = self.state.lock();
        if s.active > 0 || s.head_bytes {
            return;
        }
        s.head_bytes = true;
        if s.head_since.is_none() {
            s.head_since = Some(Instant::now());
            drop(s);
            self.waker.wake();
        }
    }

    /// A request head was read: in flight until the guard drops.
    fn begin(self: &Arc<Self>) -> InFlight {
        let mut s = self.state.lock();
        s.active += 1;
        s.head_since = None;
        s.head_bytes = false;
        InFlight { watch: self.clone() }
    }

    fn body_id(&self) -> u64 {
        let mut s = self.state.lock();
        s.next_body += 1;
        s.next_body
    }

    fn handed(&self, body: u64) {
        let mut s = self.state.lock();
        s.handed.push((body, Instant::now()));
        let first = s.handed.len() == 1;
        drop(s);
        if first {
            self.waker.wake();
        }
    }

    fn taken(&self, body: u64) {
        self.state.lock().handed.retain(|(id, _)| *id != body);
    }
}

/// A request in flight, from its head to the end of its response body (or
/// until hyper drops the request).
struct InFlight {
    watch: Arc<Watch>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut s = self.watch.state.lock();
        s.active -= 1;
        if s.active == 0 {
            s.idle_since = Instant::now();
            drop(s);
            self.watch.waker.wake();
        }
    }
}

/// Resolves with the timeout that expired first; pending while none
/// applies (a request in flight whose response is taken as written).
/// Cancel-safe: its only state is the timer, re-armed at each poll.
pub struct Watchdog {
    watch: Arc<Watch>,
    sleep: Pin<Box<Sleep>>,
    armed: Option<Instant>,
}

impl Watchdog {
    /// Watches `watch`'s deadlines.
    pub fn new(watch: Arc<Watch>) -> Watchdog {
        Watchdog { watch, sleep: Box::pin(tokio::time::sleep(Duration::ZERO)), armed: None }
    }
}

impl Future for Watchdog {
    type Output = Expired;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Expired> {
        let this = &mut *self;
        this.watch.waker.register(cx.waker());
        loop {
            let Some((at, kind)) = this.watch.deadline() else {
                this.armed = None;
                return Poll::Pending;
            };
            if Instant::now() >= at {
                return Poll::Ready(kind);
            }
            if this.armed != Some(at) {
                this.sleep.as_mut().reset(at);
                this.armed = Some(at);
            }
            if this.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }
}

/// The connection under hyper: notes request heads beginning and bounds
/// writes (see the module doc).
pub struct TimedIo<IO> {
    io: IO,
    watch: Arc<Watch>,
    /// Set while a write waits for the socket; boxed and only then, so a
    /// connection that writes at once carries no timer.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<IO> TimedIo<IO> {
    /// Wraps `io`.
    pub fn new(io: IO, watch: Arc<Watch>) -> TimedIo<IO> {
        TimedIo { io, watch, stalled: None }
    }

    /// A write's outcome, failed with `TimedOut` once it has waited for
    /// the write timeout.
    fn bound<T>(&mut self, cx: &mut Context<'_>, polled: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        if self.watch.released() {
            self.stalled = None;
            return Poll::Pending;
        }
        let limit = self.watch.timeouts.write;
        let timer = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if timer.as_mut().poll(cx).is_ready() {
            self.stalled = None;
            expired(Expired::Write, self.watch.peer);
            return Poll::Ready(Err(io::ErrorKind::TimedOut.into()));
        }
        Poll::Pending
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for TimedIo<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.watch.bytes_read();
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for TimedIo<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.bound(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.bound(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.bound(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_shutdown(cx);
        self.bound(cx, polled)
    }
}

/// A service whose requests are counted in flight and whose response
/// bodies report frames hyper has not taken (see the module doc).
pub struct Tracked<S> {
    inner: S,
    watch: Arc<Watch>,
}

impl<S> Tracked<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, watch: Arc<Watch>) -> Tracked<S> {
        Tracked { inner, watch }
    }
}

impl<S> hyper::service::Service<Request<Incoming>> for Tracked<S>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = std::convert::Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, std::convert::Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let in_flight = self.watch.begin();
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = response.await?;
            let id = in_flight.watch.body_id();
            Ok(response.map(|inner| {
                http_body_util::BodyExt::boxed_unsync(TrackedBody { inner, in_flight, id, handed: false })
            }))
        })
    }
}

/// A response body that keeps its request in flight and reports a frame
/// handed to hyper until hyper asks for the next.
struct TrackedBody {
    inner: Body,
    in_flight: InFlight,
    id: u64,
    /// A frame was handed over and the next not asked for yet.
    handed: bool,
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::convert::Infallible>>> {
        let this = &mut *self;
        if std::mem::take(&mut this.handed) {
            this.in_flight.watch.taken(this.id);
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        // The last frame is not waited on: hyper asks for nothing after it.
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && frame.data_ref().is_some_and(|d| !d.is_empty())
            && !this.inner.is_end_stream()
        {
            this.in_flight.watch.handed(this.id);
            this.handed = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        if self.handed {
            self.in_flight.watch.taken(self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: HttpTimeouts = HttpTimeouts {
        header_read: Duration::from_secs(10),
        body_read: Duration::from_secs(30),
        idle: Duration::from_secs(60),
        write: Duration::from_secs(30),
    };

    fn peer() -> SocketAddr {
        "127.0.0.1:1".parse().expect("address")
    }

    /// The deadline table of the module doc, step by step on a paused
    /// clock.
    #[tokio::test(start_paused = true)]
    async fn deadlines_follow_the_connection_state() {
        let t0 = Instant::now();
        let w = Watch::new(T, peer(), false);
        assert_eq!(w.deadline(), Some((t0 + T.header_read, Expired::Idle)), "HTTP/1.1 waits for a head, silent");
        w.bytes_read();
        assert_eq!(w.deadline(), Some((t0 + T.header_read, Expired::Header)), "from the accept, not the byte");
        let request = w.begin();
        assert_eq!(w.deadline(), None, "a request in flight waits as long as it needs");
        tokio::time::advance(Duration::from_secs(100)).await;
        let id = w.body_id();
        w.handed(id);
        let t1 = Instant::now();
        assert_eq!(w.deadline(), Some((t1 + T.write, Expired::Write)), "a frame hyper has not taken");
        w.taken(id);
        assert_eq!(w.deadline(), None);
        drop(request);
        assert_eq!(w.deadline(), Some((t1 + T.idle, Expired::Idle)), "idle from the end of the response");
        tokio::time::advance(Duration::from_secs(5)).await;
        w.bytes_read();
        assert_eq!(w.deadline(), Some((t1 + Duration::from_secs(5) + T.header_read, Expired::Header)));
        w.release();
        assert_eq!(w.deadline(), None, "an upgraded connection has no HTTP deadlines");

        let h2 = Watch::new(T, peer(), true);
        h2.bytes_read();
        assert_eq!(h2.deadline(), Some((t1 + Duration::from_secs(5) + T.idle, Expired::Idle)), "pings are no head");
    }

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_resolves_at_the_earliest_deadline() {
        let w = Watch::new(T, peer(), true);
        let t0 = Instant::now();
        assert_eq!(Watchdog::new(w.clone()).await, Expired::Idle);
        assert_eq!(Instant::now(), t0 + T.idle);
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_that_waits_too_long_fails() {
        let (_client, server) = tokio::io::duplex(8);
        let w = Watch::new(T, peer(), false);
        let mut io = TimedIo::new(server, w);
        let t0 = Instant::now();
        let err = tokio::io::AsyncWriteExt::write_all(&mut io, &[0u8; 64]).await.expect_err("the peer reads nothing");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(Instant::now(), t0 + T.write);
    }
}
