//! Lifecycle events: what happened to a client, as the core sees it —
//! connected, disconnected, subscribed, unsubscribed, entered, updated or
//! left a channel's presence, published.
//!
//! Each event has one place in the core where it happens, whatever the
//! protocol: the [`Router`](crate::core::router::Router) opens and closes
//! sessions, subscribes, unsubscribes and accepts publishes; presence
//! changes happen in the engine (the same function that appends to
//! `$presence/<channel>`, so a leave after the grace period, a clean
//! close's leave and an explicit leave are all seen once — on the NATS
//! engine, by the node that wins the member's removal). The core hands each
//! event to a [`Lifecycle`] sink, which must not block: the edge's webhooks
//! (`edge::webhooks`) push it onto a bounded queue with `try_send`.
//!
//! What this module does not do: encode, filter by endpoint or deliver
//! anything. It only says what happened.

use std::sync::Arc;

use bytes::Bytes;
use switchboard_proto as proto;

/// What kind of thing happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    /// A session opened.
    Connect,
    /// A session closed (its subscriptions end with it).
    Disconnect,
    /// A subscription was made.
    Subscribe,
    /// A subscription was removed by the client.
    Unsubscribe,
    /// A member entered a channel's presence.
    PresenceEnter,
    /// A member changed its presence data.
    PresenceUpdate,
    /// A member left (explicitly, with a clean close, or after the grace
    /// period of an abrupt one).
    PresenceLeave,
    /// A message was accepted on a channel (duplicates not included).
    Publish,
}

impl EventKind {
    /// Every kind, in the order the docs list them.
    pub const ALL: [EventKind; 8] = [
        EventKind::Connect,
        EventKind::Disconnect,
        EventKind::Subscribe,
        EventKind::Unsubscribe,
        EventKind::PresenceEnter,
        EventKind::PresenceUpdate,
        EventKind::PresenceLeave,
        EventKind::Publish,
    ];

    /// The kind's name in config, in the event's `type` and in the
    /// `Switchboard-Event` header.
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Connect => "connect",
            EventKind::Disconnect => "disconnect",
            EventKind::Subscribe => "subscribe",
            EventKind::Unsubscribe => "unsubscribe",
            EventKind::PresenceEnter => "presence.enter",
            EventKind::PresenceUpdate => "presence.update",
            EventKind::PresenceLeave => "presence.leave",
            EventKind::Publish => "publish",
        }
    }

    /// The kind named `name`, if any.
    pub fn from_name(name: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Whether events of this kind name a channel (or a filter) that a
    /// channel filter can select; connect and disconnect do not.
    pub fn has_channel(self) -> bool {
        !matches!(self, EventKind::Connect | EventKind::Disconnect)
    }
}

/// What an event carries beyond who and where.
#[derive(Debug, Clone)]
pub enum Detail {
    /// Nothing more (connect, subscribe, unsubscribe).
    None,
    /// How the session ended.
    Disconnect {
        /// The client said goodbye (or the server closed it); false when the
        /// connection dropped.
        clean: bool,
    },
    /// The member's presence data.
    Presence {
        /// As entered or updated (empty when none).
        data: Bytes,
    },
    /// The accepted message and where it went.
    Publish {
        /// Its position.
        ack: proto::PublishAck,
        /// The message as published.
        message: Box<proto::Publish>,
    },
}

/// One lifecycle event.
#[derive(Debug, Clone)]
pub struct Event {
    /// What happened.
    pub kind: EventKind,
    /// Unix milliseconds when the core saw it.
    pub time_ms: i64,
    /// The client's identity (empty for an anonymous REST publish).
    pub client_id: Arc<str>,
    /// The connection (empty for REST publishes without a stream).
    pub connection_id: Arc<str>,
    /// The front end.
    pub protocol: proto::Protocol,
    /// The channel (presence, publish) or the filter (subscribe,
    /// unsubscribe); empty for connect and disconnect.
    pub channel: String,
    /// Kind-specific data.
    pub detail: Detail,
}

/// Where the core hands lifecycle events. Implementations must return at
/// once: they are called on the hot paths (session open and close,
/// subscribe, publish), some of them under a channel's lock.
pub trait LifecycleSink: Send + Sync + 'static {
    /// Whether any consumer takes events of `kind` (on `channel`, when the
    /// kind has one), so the core builds no event nobody wants.
    fn wants(&self, kind: EventKind, channel: &str) -> bool;
    /// Queues one event without blocking.
    fn emit(&self, event: Event);
}

/// The core's handle on the sink: none by default (no webhooks), and then
/// every call is a branch on `None`.
#[derive(Clone, Default)]
pub struct Lifecycle(Option<Arc<dyn LifecycleSink>>);

impl std::fmt::Debug for Lifecycle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Lifecycle(on)" } else { "Lifecycle(off)" })
    }
}

impl Lifecycle {
    /// A handle on `sink`.
    pub fn new(sink: Arc<dyn LifecycleSink>) -> Self {
        Lifecycle(Some(sink))
    }

    /// Whether any sink is attached (a webhook is configured).
    pub fn is_on(&self) -> bool {
        self.0.is_some()
    }

    /// Whether an event of `kind` on `channel` would be taken.
    pub fn wants(&self, kind: EventKind, channel: &str) -> bool {
        self.0.as_ref().is_some_and(|s| s.wants(kind, channel))
    }

    /// Builds and hands over the event `make` returns, only if it is
    /// wanted (`channel` as [`LifecycleSink::wants`] takes it).
    pub fn emit_with(&self, kind: EventKind, channel: &str, make: impl FnOnce() -> Event) {
        if let Some(sink) = &self.0
            && sink.wants(kind, channel)
        {
            sink.emit(make());
        }
    }
}

impl Event {
    /// An event of `kind` by `caller`, now, without kind-specific data.
    pub fn of(kind: EventKind, caller: &crate::core::engine::Caller, channel: &str, time_ms: i64) -> Event {
        Event {
            kind,
            time_ms,
            client_id: caller.client_id.clone(),
            connection_id: caller.connection_id.clone(),
            protocol: caller.protocol,
            channel: channel.to_string(),
            detail: Detail::None,
        }
    }
}

/// Hands a presence change to `lifecycle`: the one call every engine
/// makes where it announces an enter, update or leave on
/// `$presence/<channel>`. `member` is (client id, connection id).
pub fn emit_presence(
    lifecycle: &Lifecycle,
    kind: proto::Kind,
    channel: &str,
    member: &(Arc<str>, Arc<str>),
    protocol: proto::Protocol,
    data: &Bytes,
    time_ms: i64,
) {
    let kind = match kind {
        proto::Kind::PresenceEnter => EventKind::PresenceEnter,
        proto::Kind::PresenceUpdate => EventKind::PresenceUpdate,
        proto::Kind::PresenceLeave => EventKind::PresenceLeave,
        _ => return,
    };
    lifecycle.emit_with(kind, channel, || Event {
        kind,
        time_ms,
        client_id: member.0.clone(),
        connection_id: member.1.clone(),
        protocol,
        channel: channel.to_string(),
        detail: Detail::Presence { data: data.clone() },
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_only_connect_and_disconnect_have_no_channel() {
        for k in EventKind::ALL {
            assert_eq!(EventKind::from_name(k.name()), Some(k));
        }
        assert_eq!(EventKind::from_name("presence.join"), None);
        let without: Vec<_> = EventKind::ALL.into_iter().filter(|k| !k.has_channel()).collect();
        assert_eq!(without, [EventKind::Connect, EventKind::Disconnect]);
    }
}
