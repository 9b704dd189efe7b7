//! HTTP long polling front end: `GET /v1/poll` and `POST /v1/poll`.
//!
//! Stateless: each poll opens a short session, resumes every channel from
//! the request's cursor (see [`crate::stream`]), answers at once when
//! messages exist after it, and otherwise waits up to the timeout for new
//! ones. The response carries a new self-contained cursor, so any gateway
//! node can serve the next poll — no sticky session, no server-side mailbox.
//!
//! Response body:
//!
//! ```json
//! {"messages":[<message frames>],"gaps":[<gap frames>],"cursor":"...","more":false}
//! ```
//!
//! `messages` are the same JSON `message` frames WebSocket and SSE send;
//! `gaps` says which channels history could not fill (as SSE's `gap` event);
//! `more` is true when the batch was cut at the batch limit and the next poll
//! will answer at once. A timeout answers an empty batch and the same
//! position.

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

/// Serves one poll; returns the JSON response body.
pub async fn poll(
    core: Arc<dyn Core>,
    req: &StreamRequest,
    cfg: &PollConfig,
    mut shutdown: watch::Receiver<bool>,
    now_ms: u64,
) -> Result<String, CoreError> {
    let (mut session, replay) = StreamSession::open(core, req, proto::Protocol::Poll, now_ms).await?;
    let batch_max = cfg.batch_max.max(1);
    // The cursor to return if the batch ends after event i: replayed and
    // drained events carry the cursor after themselves.
    let mut batch: Vec<StreamEvent> = replay;
    let start_cursor = session.cursor.encode();
    if batch.is_empty() {
        let wait = req.timeout.unwrap_or(cfg.default_timeout).min(cfg.max_timeout);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if session.drain(&mut batch).is_err() || !batch.is_empty() {
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
    let more = batch.len() > batch_max;
    batch.truncate(batch_max);
    let cursor = match batch.last() {
        Some(StreamEvent::Message(_, c) | StreamEvent::Gap(_, c)) => c.clone(),
        None => start_cursor,
    };
    Ok(render(&batch, &cursor, more))
}

fn render(batch: &[StreamEvent], cursor: &str, more: bool) -> String {
    let mut messages = String::from("[");
    let mut gaps = String::from("[");
    for ev in batch {
        match ev {
            StreamEvent::Message(d, _) => {
                if messages.len() > 1 {
                    messages.push(',');
                }
                messages.push_str(d.json_frame().as_str());
            }
            StreamEvent::Gap(g, _) => {
                if gaps.len() > 1 {
                    gaps.push(',');
                }
                let frame = proto::ServerFrame { req: 0, frame: Some(server_frame::Frame::Gap(g.clone())) };
                gaps.push_str(&proto::json::encode_server_frame(&frame));
            }
        }
    }
    messages.push(']');
    gaps.push(']');
    // The cursor is base64url: no JSON escaping needed.
    format!("{{\"messages\":{messages},\"gaps\":{gaps},\"cursor\":\"{cursor}\",\"more\":{more}}}")
}
