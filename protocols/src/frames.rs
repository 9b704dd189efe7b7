//! What the framed front ends (WebSocket, WebTransport) share: how a client
//! request becomes one core call and one reply, the session guard that
//! tells the core exactly once that a session ended, how a refused `open`
//! maps to a close, and the per-connection metric handles.
//!
//! It does no I/O and knows no wire format: each front end decodes its
//! frames, calls [`answer`], and encodes what comes back its own way.

use std::sync::Arc;

use metrics::Counter;
use switchboard_proto as proto;
use switchboard_proto::server_frame::Frame as Reply;
use switchboard_proto::{ErrorCode, client_frame};

use crate::port::{CloseKind, CloseReason, Core, CoreError, SessionHandle, SessionId, SubscribeOutcome};

/// Counter handles of one connection, looked up once (label `protocol`).
pub(crate) struct Counters {
    /// Deliveries written.
    pub messages_out: Counter,
    /// Bytes of data written.
    pub bytes_out: Counter,
    /// Bytes of data received.
    pub bytes_in: Counter,
    /// Frames (or data messages) received.
    pub frames_in: Counter,
}

impl Counters {
    /// The handles for `protocol` (`"ws"`, `"wt"`).
    pub fn new(protocol: &'static str) -> Self {
        Counters {
            messages_out: metrics::counter!("switchboard_messages_out_total", "protocol" => protocol),
            bytes_out: metrics::counter!("switchboard_bytes_out_total", "protocol" => protocol),
            bytes_in: metrics::counter!("switchboard_bytes_in_total", "protocol" => protocol),
            frames_in: metrics::counter!("switchboard_frames_in_total", "protocol" => protocol),
        }
    }

    /// Counts one received frame of `len` bytes.
    pub fn count_in(&self, len: usize) {
        self.frames_in.increment(1);
        self.bytes_in.increment(len as u64);
    }
}

/// An open session. Dropping it tells the core, so `core.close` runs exactly
/// once however the connection ends, even if the task is cancelled.
pub(crate) struct Session {
    /// What the core gave back on open.
    pub handle: SessionHandle,
    /// The core to tell.
    pub core: Arc<dyn Core>,
    /// Abrupt until the peer says goodbye.
    pub end: CloseKind,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.core.close(self.handle.id, self.end);
    }
}

/// The close for a refused `open`: 4001 for `unauthorized`, otherwise 1008
/// with the error code's name as the reason.
pub(crate) fn refusal(code: ErrorCode) -> CloseReason {
    if code == ErrorCode::Unauthorized {
        return CloseReason::UNAUTHORIZED;
    }
    CloseReason {
        code: 1008,
        reason: code.slug(),
        // Only transient refusals are worth retrying.
        reconnect: matches!(code, ErrorCode::Unavailable | ErrorCode::RateLimited | ErrorCode::Internal),
    }
}

/// The `connected` reply for a freshly opened session.
pub(crate) fn connected(handle: &SessionHandle) -> Reply {
    Reply::Connected(proto::Connected {
        client_id: handle.client_id.clone(),
        connection_id: handle.connection_id.clone(),
        node: handle.node.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
    })
}

/// What a request on an open session comes back with.
pub(crate) enum Answer {
    /// One reply frame body (boxed: some bodies are large, and an answer
    /// lives only until it is encoded).
    Reply(Box<Reply>),
    /// A subscription: the `subscribed` reply, then its replay, both ahead
    /// of anything the outbox holds.
    Subscribed(SubscribeOutcome),
}

/// Answers one request of an open session: one core call, one reply. A
/// second `connect` is `already_connected`; presence requests are
/// acknowledged with a `publish_ack` that has only `channel` set. A
/// `subscribe` is in effect from `arrived_ns`, when its bytes reached the
/// gateway ([`Core::subscribe_arrived`]).
pub(crate) async fn answer(
    core: &dyn Core,
    id: SessionId,
    frame: client_frame::Frame,
    arrived_ns: u64,
) -> Result<Answer, CoreError> {
    let ack = |channel: String| Reply::PublishAck(proto::PublishAck { channel, ..Default::default() });
    let reply = match frame {
        client_frame::Frame::Connect(_) => {
            return Err(CoreError::new(ErrorCode::AlreadyConnected, "the session is already open"));
        }
        client_frame::Frame::Subscribe(s) => {
            return core.subscribe_arrived(id, s, arrived_ns).await.map(Answer::Subscribed);
        }
        client_frame::Frame::Unsubscribe(u) => core
            .unsubscribe(id, &u.filter)
            .await
            .map(|()| Reply::Unsubscribed(proto::Unsubscribed { filter: u.filter })),
        client_frame::Frame::Publish(p) => core.publish(id, p).await.map(Reply::PublishAck),
        client_frame::Frame::PresenceEnter(p) => {
            core.presence_enter(id, &p.channel, p.data, false).await.map(|()| ack(p.channel))
        }
        client_frame::Frame::PresenceUpdate(p) => {
            core.presence_enter(id, &p.channel, p.data, true).await.map(|()| ack(p.channel))
        }
        client_frame::Frame::PresenceLeave(p) => core.presence_leave(id, &p.channel).await.map(|()| ack(p.channel)),
        client_frame::Frame::PresenceGet(p) => core.presence_members(id, &p.channel).await.map(Reply::Presence),
        client_frame::Frame::History(h) => core.history(id, h).await.map(Reply::History),
        client_frame::Frame::Refresh(r) => {
            core.refresh(id, &r.token).await.map(|()| Reply::Refreshed(proto::Refreshed {}))
        }
        client_frame::Frame::Ping(_) => Ok(Reply::Pong(proto::Pong {})),
    };
    reply.map(|r| Answer::Reply(Box::new(r)))
}
