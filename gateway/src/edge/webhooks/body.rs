//! The JSON body of a webhook request: one event, encoded once when it is
//! queued (retries send the same bytes, so the same delivery id).
//!
//! Every body has `id` (the delivery id, the same on every retry),
//! `type`, `time` (Unix ms when the gateway saw the event), `node`,
//! `protocol`, and `client_id` / `connection_id` when known; then by type
//! (docs/webhooks.md has an example of each):
//!
//! | type | more |
//! |---|---|
//! | `connect` | — |
//! | `disconnect` | `clean` (false when the connection dropped) |
//! | `subscribe`, `unsubscribe` | `filter` |
//! | `presence.enter`, `presence.update`, `presence.leave` | `channel`, the member's data as `data` / `text` / `data_b64` |
//! | `publish` | `channel`, `message` {`epoch`, `serial`, `id`, `content_type`, `headers`, `retain`, payload} |
//!
//! Payloads use the gateway's lossless JSON mapping (docs/protocol.md,
//! "Payloads in JSON"): a JSON payload inline as `data`, other UTF-8 as
//! `text`, anything else as `data_b64`.

use std::collections::BTreeMap;

use serde::Serialize;
use switchboard_proto::json::JsonPayload;

use crate::core::lifecycle::{Detail, Event};

#[derive(Serialize)]
struct Body<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    ty: &'static str,
    time: i64,
    node: &'a str,
    protocol: &'static str,
    #[serde(skip_serializing_if = "str::is_empty")]
    client_id: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    connection_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    filter: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    clean: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<Message<'a>>,
    #[serde(flatten)]
    data: JsonPayload<'a>,
}

#[derive(Serialize)]
struct Message<'a> {
    epoch: &'a str,
    serial: u64,
    #[serde(skip_serializing_if = "str::is_empty")]
    id: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    content_type: &'a str,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    headers: &'a BTreeMap<String, String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    retain: bool,
    #[serde(flatten)]
    payload: JsonPayload<'a>,
}

/// The body of `event` with delivery id `id`, sent by `node`.
pub fn encode(event: &Event, id: &str, node: &str) -> Result<Vec<u8>, serde_json::Error> {
    let mut body = Body {
        id,
        ty: event.kind.name(),
        time: event.time_ms,
        node,
        protocol: event.protocol.slug(),
        client_id: &event.client_id,
        connection_id: &event.connection_id,
        filter: None,
        channel: None,
        clean: None,
        message: None,
        data: JsonPayload::default(),
    };
    match &event.detail {
        Detail::None if event.kind.has_channel() => body.filter = Some(&event.channel),
        Detail::None => {}
        Detail::Disconnect { clean } => body.clean = Some(*clean),
        Detail::Presence { data } => {
            body.channel = Some(&event.channel);
            if !data.is_empty() {
                body.data = JsonPayload::new(data);
            }
        }
        Detail::Publish { ack, message } => {
            body.channel = Some(&event.channel);
            body.message = Some(Message {
                epoch: &ack.epoch,
                serial: ack.serial,
                id: &message.id,
                content_type: &message.content_type,
                headers: &message.headers,
                retain: message.retain,
                // Absent when empty, as the docs say (and as presence data).
                payload: if message.payload.is_empty() {
                    JsonPayload::default()
                } else {
                    JsonPayload::new(&message.payload)
                },
            });
        }
    }
    serde_json::to_vec(&body)
}

/// About how many bytes `event`'s body takes, before it is encoded (what
/// the queue's byte bound counts on the hot path).
pub fn estimate(event: &Event) -> usize {
    let payload = match &event.detail {
        Detail::Presence { data } => data.len(),
        Detail::Publish { message, .. } => {
            message.payload.len() + message.headers.iter().map(|(k, v)| k.len() + v.len() + 6).sum::<usize>()
        }
        _ => 0,
    };
    // Base64 grows a binary payload by a third; the fixed fields and their
    // names take about 200 bytes.
    256 + event.channel.len() + event.client_id.len() + event.connection_id.len() + payload * 4 / 3
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::lifecycle::EventKind;
    use bytes::Bytes;
    use switchboard_proto as proto;

    fn event(kind: EventKind, channel: &str, detail: Detail) -> Event {
        Event {
            kind,
            time_ms: 1_700_000_000_123,
            client_id: "alice".into(),
            connection_id: "n1-7".into(),
            protocol: proto::Protocol::Mqtt,
            channel: channel.into(),
            detail,
        }
    }

    fn json(e: &Event) -> serde_json::Value {
        let bytes = encode(e, "d1", "n1").unwrap();
        assert!(bytes.len() <= estimate(e) + 64, "the estimate is about right: {} vs {}", bytes.len(), estimate(e));
        serde_json::from_slice(&bytes).unwrap()
    }

    #[test]
    fn each_type_has_its_fields() {
        let base = serde_json::json!({"id": "d1", "time": 1_700_000_000_123_i64, "node": "n1", "protocol": "mqtt",
            "client_id": "alice", "connection_id": "n1-7"});
        let with = |more: serde_json::Value| {
            let mut v = base.clone();
            v.as_object_mut().unwrap().extend(more.as_object().unwrap().clone());
            v
        };
        assert_eq!(json(&event(EventKind::Connect, "", Detail::None)), with(serde_json::json!({"type": "connect"})));
        assert_eq!(
            json(&event(EventKind::Disconnect, "", Detail::Disconnect { clean: false })),
            with(serde_json::json!({"type": "disconnect", "clean": false}))
        );
        assert_eq!(
            json(&event(EventKind::Subscribe, "chat/+", Detail::None)),
            with(serde_json::json!({"type": "subscribe", "filter": "chat/+"}))
        );
        assert_eq!(
            json(&event(
                EventKind::PresenceEnter,
                "chat/1",
                Detail::Presence { data: Bytes::from_static(b"{\"a\":1}") }
            )),
            with(serde_json::json!({"type": "presence.enter", "channel": "chat/1", "data": {"a": 1}}))
        );
        assert_eq!(
            json(&event(EventKind::PresenceLeave, "chat/1", Detail::Presence { data: Bytes::new() })),
            with(serde_json::json!({"type": "presence.leave", "channel": "chat/1"}))
        );
        let message = proto::Publish {
            channel: "chat/1".into(),
            payload: Bytes::from_static(&[0, 255]),
            id: "k1".into(),
            headers: [("h".to_string(), "v".to_string())].into(),
            ..Default::default()
        };
        let ack = proto::PublishAck { channel: "chat/1".into(), epoch: "e1".into(), serial: 9, duplicate: false };
        assert_eq!(
            json(&event(EventKind::Publish, "chat/1", Detail::Publish { ack, message: Box::new(message) })),
            with(serde_json::json!({"type": "publish", "channel": "chat/1", "message": {"epoch": "e1", "serial": 9,
                "id": "k1", "headers": {"h": "v"}, "data_b64": "AP8="}}))
        );
    }
}
