//! Server-Sent Events front end: `GET /v1/sse`.
//!
//! [`open`] opens a stream session (see [`crate::stream`]) and returns the
//! response body as a stream of byte chunks, which the gateway's HTTP layer
//! sends with `content-type: text/event-stream`. Every event carries as its
//! `id:` the cursor over ALL channels of the stream, so the browser's own
//! reconnect (`Last-Event-ID`) resumes every channel with no client code.
//!
//! | `event:` | `data:` (one JSON line) |
//! |---|---|
//! | `connected` | `{"type":"connected","client_id","connection_id","node","version"}` — first; its `id:` is the starting cursor |
//! | `message` | the JSON `message` frame (envelope), `kind` = `message` |
//! | `presence` | the same, `kind` = `presence.enter` / `presence.update` / `presence.leave` (with `presence=1`) |
//! | `gap` | `{"type":"gap","channel","from","to","reason"}`: history could not fill what was missed; the stream continues |
//! | `disconnect` | `{"type":"disconnect","code","reason","reconnect"}`: the server ends the stream (4000 slow consumer, 1012 drain, 4003 closed by an administrator, 4005 cursor full); a browser's `EventSource` reconnects and resumes whatever `reconnect` says — the field is for clients that can decide |
//!
//! A `retry:` line opens the stream, and a `: keep-alive` comment goes out
//! whenever nothing else did for [`SseConfig::keepalive`] — or, when the
//! request says `heartbeat=1`, a `ping` event (`data: {"type":"ping"}`, no
//! `id:`, so `Last-Event-ID` is unchanged), which a page can watch to notice
//! a connection that died without a word (`EventSource` hides comments). Whatever is ready
//! is written as one chunk (one write), and messages reuse the JSON frame the
//! WebSocket front end sends, encoded once per publication.
//!
//! This module does not parse HTTP or set headers; the gateway does.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::Stream;
use switchboard_proto::{self as proto, server_frame};
use tokio::sync::watch;

use crate::port::{CloseReason, Core, CoreError};
use crate::stream::{StreamEvent, StreamRequest, StreamSession};

/// SSE settings.
#[derive(Debug, Clone)]
pub struct SseConfig {
    /// A keep-alive comment goes out after this much silence.
    pub keepalive: Duration,
    /// The `retry:` the browser waits before reconnecting.
    pub retry: Duration,
}

impl Default for SseConfig {
    fn default() -> Self {
        SseConfig { keepalive: Duration::from_secs(15), retry: Duration::from_secs(1) }
    }
}

/// Appends one event. `data` is split on line breaks into `data:` lines, as
/// the SSE format requires (JSON frames never contain raw line breaks, but
/// this keeps the writer correct for any text).
pub fn write_event(out: &mut BytesMut, id: Option<&str>, event: &str, data: &str) {
    if let Some(id) = id {
        out.put_slice(b"id: ");
        out.put_slice(id.as_bytes());
        out.put_u8(b'\n');
    }
    out.put_slice(b"event: ");
    out.put_slice(event.as_bytes());
    out.put_u8(b'\n');
    let mut rest = data;
    loop {
        let cut = rest.find(['\r', '\n']);
        let (line, tail) = match cut {
            Some(i) => {
                let skip = if rest[i..].starts_with("\r\n") { 2 } else { 1 };
                (&rest[..i], Some(&rest[i + skip..]))
            }
            None => (rest, None),
        };
        out.put_slice(b"data: ");
        out.put_slice(line.as_bytes());
        out.put_u8(b'\n');
        match tail {
            Some(t) => rest = t,
            None => break,
        }
    }
    out.put_u8(b'\n');
}

/// Writes one event with the cursor after it as its `id:` (a seed writes
/// nothing: it only moves the cursor).
fn write_stream_event(out: &mut BytesMut, ev: &StreamEvent, id: &str) {
    match ev {
        StreamEvent::Message(d) => {
            let name = if d.envelope.kind() == proto::Kind::Message { "message" } else { "presence" };
            write_event(out, Some(id), name, d.json_frame());
        }
        StreamEvent::Gap(g) => {
            let frame = proto::ServerFrame { req: 0, frame: Some(server_frame::Frame::Gap(g.clone())) };
            write_event(out, Some(id), "gap", &proto::json::encode_server_frame(&frame));
        }
        StreamEvent::Seed(_) => {}
    }
}

/// Bytes of events one chunk of the stream holds before it is handed to
/// the connection: a long replay goes out in pieces the client reads,
/// never as one buffer.
const CHUNK_BYTES: usize = 64 * 1024;

fn write_disconnect(out: &mut BytesMut, reason: CloseReason) {
    let frame = proto::ServerFrame {
        req: 0,
        frame: Some(server_frame::Frame::Disconnect(proto::Disconnect {
            code: u32::from(reason.code),
            reason: reason.reason.into(),
            reconnect: reason.reconnect,
        })),
    };
    write_event(out, None, "disconnect", &proto::json::encode_server_frame(&frame));
}

/// Closed when a stream's cursor outgrows what `Last-Event-ID` may carry.
pub const CURSOR_FULL: CloseReason =
    CloseReason { code: 4005, reason: "cursor full: too many channels", reconnect: false };

struct State {
    session: StreamSession,
    first: Option<Bytes>,
    /// Fires at the earliest moment a keep-alive may be due; moved forward
    /// only when it fires (not per event: a timer reset per delivery costs
    /// more than the delivery's own work).
    keepalive: tokio::time::Interval,
    /// When the stream last sent anything.
    last_sent: tokio::time::Instant,
    /// Keep-alives as `ping` events (`heartbeat=1`).
    heartbeat: bool,
    shutdown: watch::Receiver<bool>,
    /// Accepted, not yet written, oldest first.
    events: std::collections::VecDeque<StreamEvent>,
    /// Why the stream ends once `events` are written.
    closing: Option<CloseReason>,
    done: bool,
}

impl State {
    /// Renders what is ready — the events accepted so far, then whatever
    /// the outbox holds — up to [`CHUNK_BYTES`] (plus a final
    /// `disconnect`), each event with the cursor after it as its `id:`.
    fn render_ready(&mut self) -> Option<Bytes> {
        if self.closing.is_none() {
            let mut fresh = Vec::new();
            self.closing = self.session.drain(&mut fresh).err();
            self.events.extend(fresh);
            if self.closing.is_none() && self.session.cursor_too_long() {
                self.closing = Some(CURSOR_FULL);
            }
        }
        if self.closing.is_none() && self.events.is_empty() {
            return None;
        }
        let mut out = BytesMut::new();
        while out.len() < CHUNK_BYTES {
            let Some(ev) = self.events.pop_front() else { break };
            let id = self.session.sent_past(std::slice::from_ref(&ev));
            write_stream_event(&mut out, &ev, &id);
        }
        if self.events.is_empty()
            && let Some(reason) = self.closing
        {
            write_disconnect(&mut out, reason);
            self.done = true;
        }
        // Only seeds: nothing to send.
        (!out.is_empty()).then(|| out.freeze())
    }
}

/// Opens the stream: the session is subscribed (and any replay rendered)
/// before this returns, so errors become an HTTP status, not a broken stream.
pub async fn open(
    core: Arc<dyn Core>,
    req: &StreamRequest,
    cfg: &SseConfig,
    shutdown: watch::Receiver<bool>,
    now_ms: u64,
) -> Result<impl Stream<Item = Bytes> + Send + 'static + use<>, CoreError> {
    // The `connected` event names the position BEFORE the replay: a client
    // cut off before the replayed events arrive must get them again.
    let (session, replay) = StreamSession::open(core, req, proto::Protocol::Sse, now_ms).await?;
    let start = session.start.encode();
    let mut first = BytesMut::new();
    first.put_slice(format!("retry: {}\n\n", cfg.retry.as_millis()).as_bytes());
    let connected = proto::ServerFrame {
        req: 0,
        frame: Some(server_frame::Frame::Connected(proto::Connected {
            client_id: session.handle.client_id.clone(),
            connection_id: session.handle.connection_id.clone(),
            node: session.handle.node.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
        })),
    };
    write_event(&mut first, Some(&start), "connected", &proto::json::encode_server_frame(&connected));
    let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + cfg.keepalive, cfg.keepalive);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let state = State {
        session,
        first: Some(first.freeze()),
        keepalive,
        last_sent: tokio::time::Instant::now(),
        heartbeat: req.heartbeat,
        shutdown,
        events: replay.into(),
        closing: None,
        done: false,
    };
    Ok(futures_util::stream::unfold(state, |mut st| async move {
        if let Some(first) = st.first.take() {
            return Some((first, st));
        }
        if st.done {
            return None;
        }
        loop {
            if let Some(chunk) = st.render_ready() {
                st.last_sent = tokio::time::Instant::now();
                return Some((chunk, st));
            }
            tokio::select! {
                biased;
                changed = st.shutdown.changed() => {
                    if changed.is_ok() && !*st.shutdown.borrow_and_update() {
                        continue;
                    }
                    let mut out = BytesMut::new();
                    write_disconnect(&mut out, CloseReason::SHUTDOWN);
                    st.done = true;
                    return Some((out.freeze(), st));
                }
                () = st.session.handle.outbox.ready() => {}
                _ = st.keepalive.tick() => {
                    let due = st.last_sent + st.keepalive.period();
                    if tokio::time::Instant::now() < due {
                        // Something was sent since: not silent for a whole period yet.
                        st.keepalive.reset_at(due);
                        continue;
                    }
                    st.last_sent = tokio::time::Instant::now();
                    let beat: &'static [u8] =
                        if st.heartbeat { b"event: ping\ndata: {\"type\":\"ping\"}\n\n" } else { b": keep-alive\n\n" };
                    return Some((Bytes::from_static(beat), st));
                }
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(f: impl FnOnce(&mut BytesMut)) -> String {
        let mut b = BytesMut::new();
        f(&mut b);
        String::from_utf8(b.to_vec()).unwrap()
    }

    #[test]
    fn events_are_framed_and_multiline_data_split() {
        assert_eq!(text(|b| write_event(b, Some("c1"), "message", "{}")), "id: c1\nevent: message\ndata: {}\n\n");
        assert_eq!(
            text(|b| write_event(b, None, "x", "a\nb\r\nc\rd")),
            "event: x\ndata: a\ndata: b\ndata: c\ndata: d\n\n"
        );
        assert_eq!(text(|b| write_event(b, None, "x", "")), "event: x\ndata: \n\n");
        assert_eq!(text(|b| write_event(b, None, "x", "end\n")), "event: x\ndata: end\ndata: \n\n");
    }

    #[test]
    fn disconnect_event_names_the_code() {
        let t = text(|b| write_disconnect(b, CloseReason::SLOW));
        assert!(t.starts_with("event: disconnect\ndata: {\"type\":\"disconnect\",\"code\":4000"), "{t}");
    }
}
