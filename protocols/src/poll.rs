//! HTTP long polling front end: `GET /v1/poll` and `POST /v1/poll`.
//!
//! Stateless: a poll opens a session, resumes every channel from the
//! request's cursor (see [`crate::stream`]), answers at once when messages
//! exist after it, and otherwise waits up to the timeout for new ones. The
//! response carries a new self-contained cursor, so any connection can
//! serve the next poll — no sticky session, no server-side mailbox. As an
//! optimisation only, the session may be kept for the next poll on the same
//! keep-alive connection ([`KeptPoll`]).
//!
//! Response body:
//!
//! ```json
//! {"messages":[<message frames>],"gaps":[<gap frames>],"cursor":"...","more":false,"connection_id":"..."}
//! ```
//!
//! `messages` are the same JSON `message` frames WebSocket and SSE send;
//! `gaps` says which channels history could not fill (as SSE's `gap` event);
//! `more` is true when the batch was cut at the batch limit and the next poll
//! will answer at once; `connection_id` names the poll's session, which a
//! client sends as `X-Connection-Id` to publish or enter presence over REST
//! as that session while it lives (kept between polls of one keep-alive
//! connection, see [`KeptPoll`]). A timeout answers an empty batch and the
//! same position.

use std::sync::Arc;
use std::time::Duration;

use switchboard_proto::{self as proto, server_frame};
use tokio::sync::watch;

use crate::port::{Core, CoreError};
use crate::stream::{StreamEvent, StreamRequest, StreamSession};

/// Long-poll settings.
#[derive(Debug, Clone)]
pub struct PollConfig {
    /// Wait when the request gives no `timeout=`.
    pub default_timeout: Duration,
    /// Largest `timeout=` honoured.
    pub max_timeout: Duration,
    /// Most events in one response.
    pub batch_max: usize,
}

impl Default for PollConfig {
    fn default() -> Self {
        PollConfig { default_timeout: Duration::from_secs(25), max_timeout: Duration::from_secs(60), batch_max: 100 }
    }
}

/// A poller's session kept between its polls — on the keep-alive connection
/// it was served on, or, when the poll named it (`session=`), parked on the
/// node for the next poll on any connection: a next poll that continues
/// exactly where the last response left it (same stream parameters, the
/// cursor it was just given) drains it instead of opening, resubscribing
/// and replaying from history. Anything else — a
/// different request, an older cursor, a session the core closed or whose
/// slow-consumer policy dropped messages meanwhile — opens afresh from the
/// request's cursor, as every poll on another connection or node does.
/// Dropping it closes the session (clean, as a finished poll).
pub struct KeptPoll {
    session: StreamSession,
    /// The request it served, cursor aside.
    request: StreamRequest,
    /// Items the outbox had dropped when the session was kept.
    dropped: u64,
}

impl std::fmt::Debug for KeptPoll {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeptPoll").field("session", &self.session).finish_non_exhaustive()
    }
}

impl KeptPoll {
    /// The session's connection id (what the response named).
    pub fn connection_id(&self) -> &str {
        &self.session.handle.connection_id
    }

    /// The core's id of the session.
    pub fn session_id(&self) -> crate::port::SessionId {
        self.session.handle.id
    }

    /// Whether `req` continues exactly where this session left off.
    pub fn continues(&self, req: &StreamRequest) -> bool {
        self.request.token == req.token && self.continues_but_token(req)
    }

    /// Whether `req` continues where this session left off, but with a
    /// token of its own: once the core refreshed the session with it
    /// ([`KeptPoll::refreshed`]), the session continues.
    pub fn continues_but_token(&self, req: &StreamRequest) -> bool {
        let (a, b) = (&self.request, req);
        req.cursor.as_ref() == Some(&self.session.cursor)
            && a.filters == b.filters
            && a.presence == b.presence
            && a.retained == b.retained
            && a.client_id == b.client_id
            && self.session.handle.outbox.closed().is_none()
            && self.session.handle.outbox.dropped() == self.dropped
    }

    /// Whether `req` comes from this session's own client (the same client
    /// id and token): a poll of its owner that does not continue it (new
    /// filters, another cursor) replaces it.
    pub fn owned_by(&self, req: &StreamRequest) -> bool {
        self.request.client_id == req.client_id && self.request.token == req.token
    }

    /// The core took `token` for this session (a refresh): polls carrying
    /// it continue the session from now on.
    pub fn refreshed(&mut self, token: &str) {
        self.request.token = token.to_string();
    }
}

/// Serves one poll, continuing `kept` when the request allows it (see
/// [`KeptPoll`]); returns the JSON response body and the session to keep
/// for the connection's next poll (none when the batch was cut short).
///
/// The kept session is passed boxed: a pending poll's future would
/// otherwise hold a session's size for it while it waits.
pub async fn poll_kept(
    core: Arc<dyn Core>,
    req: &StreamRequest,
    cfg: &PollConfig,
    mut shutdown: watch::Receiver<bool>,
    now_ms: u64,
    kept: Option<Box<KeptPoll>>,
) -> Result<(String, Option<Box<KeptPoll>>), CoreError> {
    let (mut session, replay) = match kept {
        Some(k) if k.continues(req) => (k.session, Vec::new()),
        other => {
            // A finished poll's session: clean, as if it had ended then.
            drop(other);
            StreamSession::open(core, req, proto::Protocol::Poll, now_ms).await?
        }
    };
    let batch_max = cfg.batch_max.max(1);
    let mut batch: Vec<StreamEvent> = replay;
    let sendable = |b: &[StreamEvent]| b.iter().any(|ev| !matches!(ev, StreamEvent::Seed(_)));
    if !sendable(&batch) {
        let wait = req.timeout.unwrap_or(cfg.default_timeout).min(cfg.max_timeout);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if session.drain(&mut batch).is_err() || sendable(&batch) {
                break;
            }
            tokio::select! {
                () = session.handle.outbox.ready() => {}
                () = tokio::time::sleep_until(deadline) => break,
                _ = shutdown.changed() => break,
            }
        }
        // Anything that arrived with the wake-up.
        let _ = session.drain(&mut batch);
    }
    session.end_clean();
    // Seeds count as nothing: `batch_max` counts what the client gets.
    let mut sendable = 0;
    let cut = batch
        .iter()
        .position(|ev| {
            sendable += usize::from(!matches!(ev, StreamEvent::Seed(_)));
            sendable > batch_max
        })
        .unwrap_or(batch.len());
    let more = cut < batch.len();
    batch.truncate(cut);
    // The one cursor of the response: after its last event.
    let cursor = session.sent_past(&batch);
    let body = render(&batch, &cursor, more, &session.handle.connection_id);
    // Kept only when the cursor returned is the session's own: a cut batch
    // leaves accepted events behind it.
    let keep = !more && session.handle.outbox.closed().is_none() && !*shutdown.borrow();
    let kept = keep.then(|| {
        let mut request = req.clone();
        request.cursor = None;
        let dropped = session.handle.outbox.dropped();
        Box::new(KeptPoll { session, request, dropped })
    });
    Ok((body, kept))
}

fn render(batch: &[StreamEvent], cursor: &str, more: bool, connection_id: &str) -> String {
    let mut messages = String::from("[");
    let mut gaps = String::from("[");
    for ev in batch {
        match ev {
            StreamEvent::Message(d) => {
                if messages.len() > 1 {
                    messages.push(',');
                }
                messages.push_str(d.json_frame());
            }
            StreamEvent::Gap(g) => {
                if gaps.len() > 1 {
                    gaps.push(',');
                }
                let frame = proto::ServerFrame { req: 0, frame: Some(server_frame::Frame::Gap(g.clone())) };
                gaps.push_str(&proto::json::encode_server_frame(&frame));
            }
            StreamEvent::Seed(_) => {}
        }
    }
    messages.push(']');
    gaps.push(']');
    // The cursor is base64url: no JSON escaping needed; the connection id
    // is the gateway's own (node name and a number), escaped all the same.
    let connection_id = serde_json::Value::from(connection_id);
    format!(
        "{{\"messages\":{messages},\"gaps\":{gaps},\"cursor\":\"{cursor}\",\"more\":{more},\"connection_id\":{connection_id}}}"
    )
}
