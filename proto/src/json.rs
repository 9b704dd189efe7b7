//! The JSON mapping of the client and server frames.
//!
//! Every frame is one JSON object whose `type` names the frame; `req` (the
//! request id) is echoed on replies and absent on pushed frames. Field names
//! are the protobuf field names; enums use snake_case names ([`crate::ErrorCode::slug`],
//! [`crate::Kind::slug`], [`crate::Protocol::slug`]); payloads use the
//! lossless `data` / `text` / `data_b64` forms of [`crate::payload`]. Fields
//! at their default value are omitted on output and optional on input;
//! unknown fields are ignored (forward compatibility). docs/protocol.md has
//! the full table with examples.
//!
//! This module maps; it does not validate channel names or limits — that is
//! the core's job, once, for every protocol.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::payload::{self, PayloadForm};
use crate::{client_frame, server_frame, *};

/// Why a JSON frame could not be mapped.
#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    /// Not JSON, or a field has the wrong type.
    #[error("malformed JSON frame: {0}")]
    Malformed(#[from] serde_json::Error),
    /// The `type` field is missing or names no frame.
    #[error("unknown frame type {0:?}")]
    UnknownType(String),
    /// A field the frame needs is missing.
    #[error("frame {frame:?} needs field {field:?}")]
    MissingField {
        /// Frame type.
        frame: &'static str,
        /// Missing field.
        field: &'static str,
    },
    /// More than one of `data`, `text`, `data_b64`, or bad base64.
    #[error("bad payload: {0}")]
    BadPayload(String),
    /// An enum name that is not known.
    #[error("unknown value {value:?} for {field:?}")]
    UnknownValue {
        /// Field name.
        field: &'static str,
        /// The value given.
        value: String,
    },
}

/// A position in JSON: `{"epoch": "...", "serial": 12}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JsonPosition {
    /// Channel epoch.
    #[serde(default)]
    pub epoch: String,
    /// Serial within the epoch.
    #[serde(default)]
    pub serial: u64,
}

impl From<&Position> for JsonPosition {
    fn from(p: &Position) -> Self {
        JsonPosition { epoch: p.epoch.clone(), serial: p.serial }
    }
}

impl From<JsonPosition> for Position {
    fn from(p: JsonPosition) -> Self {
        Position { epoch: p.epoch, serial: p.serial }
    }
}

#[derive(Debug, Deserialize, Default)]
struct JsonRewind {
    #[serde(default)]
    count: u32,
    #[serde(default)]
    duration_ms: u64,
}

/// Every field any client frame may carry; `type` says which apply.
#[derive(Deserialize)]
struct RawClientFrame<'a> {
    #[serde(rename = "type")]
    ty: Option<String>,
    #[serde(default)]
    req: u64,
    channel: Option<String>,
    filter: Option<String>,
    #[serde(default)]
    token: String,
    #[serde(default)]
    client_id: String,
    #[serde(default)]
    positions: BTreeMap<String, JsonPosition>,
    rewind: Option<JsonRewind>,
    #[serde(default)]
    presence: bool,
    #[serde(default)]
    retained: bool,
    #[serde(default)]
    since_ms: u64,
    #[serde(default)]
    no_local: bool,
    qos: Option<u32>,
    #[serde(default)]
    message_expiry: u32,
    #[serde(default)]
    response_topic: String,
    correlation_data: Option<String>,
    #[serde(default)]
    payload_utf8: bool,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    text: Option<String>,
    data_b64: Option<String>,
    #[serde(default)]
    id: String,
    #[serde(default)]
    content_type: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    retain: bool,
    since: Option<JsonPosition>,
    #[serde(default)]
    limit: u32,
    #[serde(default)]
    reverse: bool,
}

impl RawClientFrame<'_> {
    fn payload(&self) -> Result<Bytes, JsonError> {
        decode_payload(self.data, self.text.as_deref(), self.data_b64.as_deref())
    }

    fn need(opt: &Option<String>, frame: &'static str, field: &'static str) -> Result<String, JsonError> {
        opt.clone().ok_or(JsonError::MissingField { frame, field })
    }
}

/// Turns the three payload fields into bytes (at most one may be present).
pub fn decode_payload(data: Option<&RawValue>, text: Option<&str>, data_b64: Option<&str>) -> Result<Bytes, JsonError> {
    match (data, text, data_b64) {
        (None, None, None) => Ok(Bytes::new()),
        (Some(raw), None, None) => Ok(Bytes::copy_from_slice(raw.get().as_bytes())),
        (None, Some(t), None) => Ok(Bytes::copy_from_slice(t.as_bytes())),
        (None, None, Some(b)) => payload::decode_b64(b)
            .map(Bytes::from)
            .map_err(|e| JsonError::BadPayload(format!("data_b64 is not base64: {e}"))),
        _ => Err(JsonError::BadPayload("give at most one of data, text, data_b64".into())),
    }
}

/// Decodes an optional base64 field into bytes.
fn decode_b64_field(field: &'static str, v: Option<&str>) -> Result<Bytes, JsonError> {
    match v {
        None => Ok(Bytes::new()),
        Some(t) => payload::decode_b64(t)
            .map(Bytes::from)
            .map_err(|e| JsonError::BadPayload(format!("{field} is not base64: {e}"))),
    }
}

fn is_zero_u32(n: &u32) -> bool {
    *n == 0
}

/// Decodes a client frame from JSON text.
pub fn decode_client_frame(text: &str) -> Result<ClientFrame, JsonError> {
    let raw: RawClientFrame<'_> = serde_json::from_str(text)?;
    let ty = raw.ty.clone().unwrap_or_default();
    let frame = match ty.as_str() {
        "connect" => {
            client_frame::Frame::Connect(Connect { token: raw.token.clone(), client_id: raw.client_id.clone() })
        }
        "subscribe" => client_frame::Frame::Subscribe(Subscribe {
            filter: RawClientFrame::need(&raw.filter, "subscribe", "filter")?,
            positions: raw.positions.clone().into_iter().map(|(k, v)| (k, v.into())).collect(),
            rewind: raw.rewind.as_ref().map(|r| Rewind { count: r.count, duration_ms: r.duration_ms }),
            presence: raw.presence,
            retained: raw.retained,
            since_ms: raw.since_ms,
            no_local: raw.no_local,
            // The JSON mapping serves single-stream transports: always stream.
            delivery: DeliveryMode::Stream as i32,
        }),
        "unsubscribe" => client_frame::Frame::Unsubscribe(Unsubscribe {
            filter: RawClientFrame::need(&raw.filter, "unsubscribe", "filter")?,
        }),
        "publish" => client_frame::Frame::Publish(Publish {
            channel: RawClientFrame::need(&raw.channel, "publish", "channel")?,
            payload: raw.payload()?,
            id: raw.id.clone(),
            content_type: raw.content_type.clone(),
            headers: raw.headers.clone(),
            retain: raw.retain,
            qos: raw.qos,
            message_expiry: raw.message_expiry,
            response_topic: raw.response_topic.clone(),
            correlation_data: decode_b64_field("correlation_data", raw.correlation_data.as_deref())?,
            payload_utf8: raw.payload_utf8,
        }),
        "presence.enter" => client_frame::Frame::PresenceEnter(PresenceEnter {
            channel: RawClientFrame::need(&raw.channel, "presence.enter", "channel")?,
            data: raw.payload()?,
        }),
        "presence.update" => client_frame::Frame::PresenceUpdate(PresenceUpdate {
            channel: RawClientFrame::need(&raw.channel, "presence.update", "channel")?,
            data: raw.payload()?,
        }),
        "presence.leave" => client_frame::Frame::PresenceLeave(PresenceLeave {
            channel: RawClientFrame::need(&raw.channel, "presence.leave", "channel")?,
        }),
        "presence.get" => client_frame::Frame::PresenceGet(PresenceGet {
            channel: RawClientFrame::need(&raw.channel, "presence.get", "channel")?,
        }),
        "history" => client_frame::Frame::History(History {
            channel: RawClientFrame::need(&raw.channel, "history", "channel")?,
            since: raw.since.clone().map(Into::into),
            limit: raw.limit,
            reverse: raw.reverse,
        }),
        "refresh" => client_frame::Frame::Refresh(Refresh { token: raw.token.clone() }),
        "ping" => client_frame::Frame::Ping(Ping {}),
        _ => return Err(JsonError::UnknownType(ty)),
    };
    Ok(ClientFrame { req: raw.req, frame: Some(frame) })
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A payload as JSON fields, flattened into its parent object.
#[derive(Serialize, Default)]
pub struct JsonPayload<'a> {
    /// Verbatim JSON payload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<&'a RawValue>,
    /// UTF-8 text payload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<&'a str>,
    /// Base64 of a binary payload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_b64: Option<String>,
}

impl<'a> JsonPayload<'a> {
    /// The JSON form of `bytes` (see [`crate::payload`]).
    pub fn new(bytes: &'a [u8]) -> Self {
        match payload::classify(bytes) {
            PayloadForm::Json(raw) => JsonPayload { data: Some(raw), ..Default::default() },
            PayloadForm::Text(t) => JsonPayload { text: Some(t), ..Default::default() },
            PayloadForm::Binary => JsonPayload { data_b64: Some(payload::encode_b64(bytes)), ..Default::default() },
        }
    }
}

/// Publisher in JSON.
#[derive(Serialize)]
pub struct JsonPublisher<'a> {
    /// Client id.
    #[serde(skip_serializing_if = "str::is_empty")]
    pub client_id: &'a str,
    /// Protocol short name.
    pub protocol: &'static str,
    /// Gateway node.
    #[serde(skip_serializing_if = "str::is_empty")]
    pub node: &'a str,
    /// Connection id.
    #[serde(skip_serializing_if = "str::is_empty")]
    pub connection_id: &'a str,
}

/// An envelope in JSON (the body of a `message` frame, an SSE event, a
/// history entry, a long-poll message).
#[derive(Serialize)]
pub struct JsonEnvelope<'a> {
    /// Channel name.
    pub channel: &'a str,
    /// Channel epoch.
    pub epoch: &'a str,
    /// Serial.
    pub serial: u64,
    /// Serial of the previous envelope in the channel.
    pub prev_serial: u64,
    /// Unix milliseconds.
    pub timestamp: i64,
    /// Kind name.
    pub kind: &'static str,
    /// Idempotency key.
    #[serde(skip_serializing_if = "str::is_empty")]
    pub id: &'a str,
    /// Publisher.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publisher: Option<JsonPublisher<'a>>,
    /// Content type.
    #[serde(skip_serializing_if = "str::is_empty")]
    pub content_type: &'a str,
    /// Headers.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: &'a BTreeMap<String, String>,
    /// Retained flag.
    #[serde(skip_serializing_if = "is_false")]
    pub retain: bool,
    /// MQTT QoS of the publish, when it came from MQTT.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qos: Option<u32>,
    /// MQTT 5 message expiry interval, seconds.
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub message_expiry: u32,
    /// MQTT 5 response topic.
    #[serde(skip_serializing_if = "str::is_empty")]
    pub response_topic: &'a str,
    /// MQTT 5 correlation data, base64.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_data: Option<String>,
    /// MQTT 5 payload format indicator (payload is UTF-8).
    #[serde(skip_serializing_if = "is_false")]
    pub payload_utf8: bool,
    /// Payload.
    #[serde(flatten)]
    pub payload: JsonPayload<'a>,
}

impl<'a> JsonEnvelope<'a> {
    /// Borrows an envelope for serialisation.
    pub fn new(e: &'a Envelope) -> Self {
        JsonEnvelope {
            channel: &e.channel,
            epoch: &e.epoch,
            serial: e.serial,
            prev_serial: e.prev_serial,
            timestamp: e.timestamp,
            kind: e.kind().slug(),
            id: &e.id,
            publisher: e.publisher.as_ref().map(|p| JsonPublisher {
                client_id: &p.client_id,
                protocol: p.protocol().slug(),
                node: &p.node,
                connection_id: &p.connection_id,
            }),
            content_type: &e.content_type,
            headers: &e.headers,
            retain: e.retain,
            qos: e.qos,
            message_expiry: e.message_expiry,
            response_topic: &e.response_topic,
            correlation_data: (!e.correlation_data.is_empty()).then(|| payload::encode_b64(&e.correlation_data)),
            payload_utf8: e.payload_utf8,
            payload: JsonPayload::new(&e.payload),
        }
    }
}

#[derive(Serialize)]
struct Tagged<'a, T: Serialize> {
    #[serde(rename = "type")]
    ty: &'static str,
    #[serde(skip_serializing_if = "is_zero")]
    req: u64,
    #[serde(flatten)]
    body: &'a T,
}

#[derive(Serialize)]
struct JsonChannelState<'a> {
    channel: &'a str,
    epoch: &'a str,
    serial: u64,
    recovered: bool,
}

#[derive(Serialize)]
struct JsonMember<'a> {
    client_id: &'a str,
    connection_id: &'a str,
    protocol: &'static str,
    #[serde(flatten)]
    payload: JsonPayload<'a>,
}

fn to_string<T: Serialize>(ty: &'static str, req: u64, body: &T) -> String {
    // Typed structs with string keys and verbatim payloads: serde_json has
    // nothing to refuse here. Should that ever change, the peer gets an
    // error frame, never a panic.
    serde_json::to_string(&Tagged { ty, req, body }).unwrap_or_else(|e| {
        format!(r#"{{"type":"error","req":{req},"code":"internal","message":"cannot encode a {ty} frame: {}"}}"#, {
            e.to_string().replace(['"', '\\'], "'")
        })
    })
}

/// The body of a `history` frame. Typed, so payloads stay verbatim: a
/// `serde_json::Value` in between would re-parse every `data` payload.
#[derive(Serialize)]
struct JsonHistory<'a> {
    channel: &'a str,
    epoch: &'a str,
    serial: u64,
    messages: Vec<JsonEnvelope<'a>>,
}

/// The body of a `presence` frame (typed, as [`JsonHistory`]).
#[derive(Serialize)]
struct JsonMembers<'a> {
    channel: &'a str,
    members: Vec<JsonMember<'a>>,
}

/// Encodes `{"type":"message", ...envelope}`: the hot path, once per message.
pub fn encode_message_frame(envelope: &Envelope) -> String {
    to_string("message", 0, &JsonEnvelope::new(envelope))
}

/// Encodes any server frame as JSON text.
pub fn encode_server_frame(frame: &ServerFrame) -> String {
    use serde_json::json;
    let req = frame.req;
    let Some(f) = &frame.frame else {
        return to_string("error", req, &json!({"code": "internal", "message": "empty frame"}));
    };
    match f {
        server_frame::Frame::Connected(c) => to_string(
            "connected",
            req,
            &json!({"client_id": c.client_id, "connection_id": c.connection_id, "node": c.node, "version": c.version}),
        ),
        server_frame::Frame::Subscribed(s) => {
            let channels: Vec<_> = s
                .channels
                .iter()
                .map(|c| JsonChannelState {
                    channel: &c.channel,
                    epoch: &c.epoch,
                    serial: c.serial,
                    recovered: c.recovered,
                })
                .collect();
            to_string("subscribed", req, &json!({"filter": s.filter, "channels": channels}))
        }
        server_frame::Frame::Unsubscribed(u) => to_string("unsubscribed", req, &json!({"filter": u.filter})),
        server_frame::Frame::PublishAck(a) => to_string(
            "publish_ack",
            req,
            &json!({"channel": a.channel, "epoch": a.epoch, "serial": a.serial, "duplicate": a.duplicate}),
        ),
        server_frame::Frame::Message(e) => to_string("message", req, &JsonEnvelope::new(e)),
        server_frame::Frame::Gap(g) => to_string(
            "gap",
            req,
            &json!({
                "channel": g.channel,
                "from": g.from.as_ref().map(JsonPosition::from),
                "to": g.to.as_ref().map(JsonPosition::from),
                "reason": g.reason,
            }),
        ),
        server_frame::Frame::Presence(p) => {
            let members: Vec<_> = p
                .members
                .iter()
                .map(|m| JsonMember {
                    client_id: &m.client_id,
                    connection_id: &m.connection_id,
                    protocol: m.protocol().slug(),
                    payload: JsonPayload::new(&m.data),
                })
                .collect();
            to_string("presence", req, &JsonMembers { channel: &p.channel, members })
        }
        server_frame::Frame::History(h) => {
            let messages: Vec<_> = h.messages.iter().map(JsonEnvelope::new).collect();
            to_string("history", req, &JsonHistory { channel: &h.channel, epoch: &h.epoch, serial: h.serial, messages })
        }
        server_frame::Frame::Pong(_) => to_string("pong", req, &json!({})),
        server_frame::Frame::Error(e) => {
            to_string("error", req, &json!({"code": e.code().slug(), "message": e.message}))
        }
        server_frame::Frame::Disconnect(d) => {
            to_string("disconnect", req, &json!({"code": d.code, "reason": d.reason, "reconnect": d.reconnect}))
        }
        server_frame::Frame::Refreshed(_) => to_string("refreshed", req, &json!({})),
    }
}

// ---- decoding server frames (clients: the CLI, tests, SDKs) ----

#[derive(Deserialize)]
struct RawPublisher {
    #[serde(default)]
    client_id: String,
    #[serde(default)]
    protocol: String,
    #[serde(default)]
    node: String,
    #[serde(default)]
    connection_id: String,
}

/// Every field an envelope object may carry.
#[derive(Deserialize)]
struct RawEnvelope<'a> {
    #[serde(default)]
    channel: String,
    #[serde(default)]
    epoch: String,
    #[serde(default)]
    serial: u64,
    #[serde(default)]
    prev_serial: u64,
    #[serde(default)]
    timestamp: i64,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    id: String,
    publisher: Option<RawPublisher>,
    #[serde(default)]
    content_type: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    retain: bool,
    qos: Option<u32>,
    #[serde(default)]
    message_expiry: u32,
    #[serde(default)]
    response_topic: String,
    correlation_data: Option<String>,
    #[serde(default)]
    payload_utf8: bool,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    text: Option<String>,
    data_b64: Option<String>,
}

impl RawEnvelope<'_> {
    fn into_envelope(self) -> Result<Envelope, JsonError> {
        let kind = match self.kind.as_deref() {
            None => Kind::Message,
            Some(k) => Kind::from_slug(k).ok_or_else(|| JsonError::UnknownValue { field: "kind", value: k.into() })?,
        };
        let payload = decode_payload(self.data, self.text.as_deref(), self.data_b64.as_deref())?;
        let publisher = match self.publisher {
            None => None,
            Some(p) => Some(Publisher {
                protocol: Protocol::from_slug(&p.protocol).unwrap_or(Protocol::Unspecified) as i32,
                client_id: p.client_id,
                node: p.node,
                connection_id: p.connection_id,
            }),
        };
        Ok(Envelope {
            channel: self.channel,
            payload,
            id: self.id,
            epoch: self.epoch,
            serial: self.serial,
            prev_serial: self.prev_serial,
            timestamp: self.timestamp,
            publisher,
            content_type: self.content_type,
            headers: self.headers,
            kind: kind as i32,
            retain: self.retain,
            qos: self.qos,
            message_expiry: self.message_expiry,
            response_topic: self.response_topic,
            correlation_data: decode_b64_field("correlation_data", self.correlation_data.as_deref())?,
            payload_utf8: self.payload_utf8,
        })
    }
}

/// Decodes one envelope object (as in SSE `data:`, history and poll bodies).
pub fn decode_envelope(text: &str) -> Result<Envelope, JsonError> {
    let raw: RawEnvelope<'_> = serde_json::from_str(text)?;
    raw.into_envelope()
}

/// Decodes a server frame from JSON text (for clients of the gateway).
pub fn decode_server_frame(text: &str) -> Result<ServerFrame, JsonError> {
    use serde_json::Value;
    #[derive(Deserialize)]
    struct Head {
        #[serde(rename = "type")]
        ty: String,
        #[serde(default)]
        req: u64,
    }
    let head: Head = serde_json::from_str(text)?;
    let req = head.req;
    if head.ty == "message" {
        let env = decode_envelope(text)?;
        return Ok(ServerFrame { req, frame: Some(server_frame::Frame::Message(env)) });
    }
    let v: Value = serde_json::from_str(text)?;
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
    let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or_default();
    let b = |k: &str| v.get(k).and_then(Value::as_bool).unwrap_or_default();
    let pos = |k: &str| -> Option<Position> {
        v.get(k).and_then(|p| serde_json::from_value::<JsonPosition>(p.clone()).ok()).map(Into::into)
    };
    let frame = match head.ty.as_str() {
        "connected" => server_frame::Frame::Connected(Connected {
            client_id: s("client_id"),
            connection_id: s("connection_id"),
            node: s("node"),
            version: s("version"),
        }),
        "subscribed" => {
            let channels = v
                .get("channels")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .map(|c| ChannelState {
                            channel: c.get("channel").and_then(Value::as_str).unwrap_or_default().into(),
                            epoch: c.get("epoch").and_then(Value::as_str).unwrap_or_default().into(),
                            serial: c.get("serial").and_then(Value::as_u64).unwrap_or_default(),
                            recovered: c.get("recovered").and_then(Value::as_bool).unwrap_or_default(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            server_frame::Frame::Subscribed(Subscribed { filter: s("filter"), channels })
        }
        "unsubscribed" => server_frame::Frame::Unsubscribed(Unsubscribed { filter: s("filter") }),
        "publish_ack" => server_frame::Frame::PublishAck(PublishAck {
            channel: s("channel"),
            epoch: s("epoch"),
            serial: n("serial"),
            duplicate: b("duplicate"),
        }),
        "gap" => server_frame::Frame::Gap(Gap {
            channel: s("channel"),
            from: pos("from"),
            to: pos("to"),
            reason: s("reason"),
        }),
        "presence" => {
            #[derive(Deserialize)]
            struct RawMember<'a> {
                #[serde(default)]
                client_id: String,
                #[serde(default)]
                connection_id: String,
                #[serde(default)]
                protocol: String,
                #[serde(borrow)]
                data: Option<&'a RawValue>,
                text: Option<String>,
                data_b64: Option<String>,
            }
            #[derive(Deserialize)]
            struct RawPresence<'a> {
                #[serde(default)]
                channel: String,
                #[serde(borrow, default)]
                members: Vec<RawMember<'a>>,
            }
            let raw: RawPresence<'_> = serde_json::from_str(text)?;
            let mut members = Vec::with_capacity(raw.members.len());
            for m in raw.members {
                members.push(Member {
                    data: decode_payload(m.data, m.text.as_deref(), m.data_b64.as_deref())?,
                    protocol: Protocol::from_slug(&m.protocol).unwrap_or(Protocol::Unspecified) as i32,
                    client_id: m.client_id,
                    connection_id: m.connection_id,
                });
            }
            server_frame::Frame::Presence(PresenceMembers { channel: raw.channel, members })
        }
        "history" => {
            #[derive(Deserialize)]
            struct RawHistory<'a> {
                #[serde(default)]
                channel: String,
                #[serde(default)]
                epoch: String,
                #[serde(default)]
                serial: u64,
                #[serde(borrow, default)]
                messages: Vec<RawEnvelope<'a>>,
            }
            let raw: RawHistory<'_> = serde_json::from_str(text)?;
            let messages = raw.messages.into_iter().map(RawEnvelope::into_envelope).collect::<Result<_, _>>()?;
            server_frame::Frame::History(HistoryResult {
                channel: raw.channel,
                epoch: raw.epoch,
                serial: raw.serial,
                messages,
            })
        }
        "pong" => server_frame::Frame::Pong(Pong {}),
        "error" => {
            let code = s("code");
            server_frame::Frame::Error(Error {
                code: ErrorCode::from_slug(&code).unwrap_or(ErrorCode::Unspecified) as i32,
                message: s("message"),
            })
        }
        "disconnect" => server_frame::Frame::Disconnect(Disconnect {
            code: n("code") as u32,
            reason: s("reason"),
            reconnect: b("reconnect"),
        }),
        "refreshed" => server_frame::Frame::Refreshed(Refreshed {}),
        other => return Err(JsonError::UnknownType(other.into())),
    };
    Ok(ServerFrame { req, frame: Some(frame) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(payload: &'static [u8]) -> Envelope {
        Envelope {
            channel: "sensors/1/temp".into(),
            payload: Bytes::from_static(payload),
            id: "abc".into(),
            epoch: "E".into(),
            serial: 3,
            prev_serial: 2,
            timestamp: 1_700_000_000_000,
            publisher: Some(Publisher {
                client_id: "dev1".into(),
                protocol: Protocol::Mqtt as i32,
                node: "n1".into(),
                connection_id: "c1".into(),
            }),
            content_type: "application/json".into(),
            headers: [("k".to_string(), "v".to_string())].into(),
            kind: Kind::Message as i32,
            retain: true,
            qos: Some(1),
            message_expiry: 60,
            response_topic: "replies/dev1".into(),
            correlation_data: Bytes::from_static(b"\x01\x02"),
            payload_utf8: true,
        }
    }

    #[test]
    fn envelope_round_trips_every_payload_form() {
        for p in [&b"{\"a\": 1}"[..], b"hello\nworld", b"", b"null", b" 5", b"\x00\x01\xfe\xff", b"\"quoted\""] {
            let e = env(Box::leak(p.to_vec().into_boxed_slice()));
            let text = encode_message_frame(&e);
            let back = decode_server_frame(&text).unwrap();
            assert_eq!(back.frame, Some(server_frame::Frame::Message(e)), "payload {p:?}: {text}");
        }
    }

    #[test]
    fn json_payload_is_inline_and_verbatim() {
        let text = encode_message_frame(&env(b"{\"a\": [1, 2]}"));
        assert!(text.contains(r#""data":{"a": [1, 2]}"#), "{text}");
        let text = encode_message_frame(&env(b"\x00\xff"));
        assert!(text.contains(r#""data_b64":"AP8=""#), "{text}");
    }

    /// Payloads that JSON parsers refuse or change never panic an encoder
    /// and come back byte for byte from every frame that carries one.
    #[test]
    fn hostile_json_payloads_round_trip_in_every_frame() {
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        for p in [&b"1e999"[..], br#""\ud800""#, deep.as_bytes(), br#"{"a":1e999}"#, b"-", b"\xff"] {
            let payload = Bytes::copy_from_slice(p);
            let e = Envelope { channel: "c".into(), payload: payload.clone(), ..Default::default() };
            let frames = [
                ServerFrame { req: 0, frame: Some(server_frame::Frame::Message(e.clone())) },
                ServerFrame {
                    req: 1,
                    frame: Some(server_frame::Frame::History(HistoryResult {
                        channel: "c".into(),
                        messages: vec![e.clone()],
                        ..Default::default()
                    })),
                },
                ServerFrame {
                    req: 2,
                    frame: Some(server_frame::Frame::Presence(PresenceMembers {
                        channel: "c".into(),
                        members: vec![Member { client_id: "m".into(), data: payload.clone(), ..Default::default() }],
                    })),
                },
            ];
            for f in frames {
                let text = encode_server_frame(&f);
                assert_eq!(decode_server_frame(&text).expect("decodes"), f, "{text}");
            }
            assert_eq!(
                decode_server_frame(&encode_message_frame(&e)).unwrap().frame,
                Some(server_frame::Frame::Message(e))
            );
        }
    }

    #[test]
    fn client_frames_decode() {
        let f = decode_client_frame(
            r#"{"type":"subscribe","req":4,"filter":"a/+","positions":{"a/b":{"epoch":"E","serial":9}},"rewind":{"count":5},"presence":true}"#,
        )
        .unwrap();
        let Some(client_frame::Frame::Subscribe(s)) = f.frame else { panic!() };
        assert_eq!(f.req, 4);
        assert_eq!(s.filter, "a/+");
        assert_eq!(s.positions["a/b"], Position { epoch: "E".into(), serial: 9 });
        assert_eq!(s.rewind, Some(Rewind { count: 5, duration_ms: 0 }));
        assert!(s.presence);

        let f = decode_client_frame(r#"{"type":"publish","channel":"c","data":{"x": 1},"id":"i"}"#).unwrap();
        let Some(client_frame::Frame::Publish(p)) = f.frame else { panic!() };
        assert_eq!(&p.payload[..], b"{\"x\": 1}");
        assert_eq!(p.id, "i");

        let f = decode_client_frame(r#"{"type":"publish","channel":"c","data_b64":"AP8="}"#).unwrap();
        let Some(client_frame::Frame::Publish(p)) = f.frame else { panic!() };
        assert_eq!(&p.payload[..], b"\x00\xff");
    }

    #[test]
    fn bad_client_frames_are_errors() {
        assert!(matches!(decode_client_frame("{"), Err(JsonError::Malformed(_))));
        assert!(matches!(decode_client_frame("[]"), Err(JsonError::Malformed(_))));
        assert!(matches!(decode_client_frame(r#"{"type":"nope"}"#), Err(JsonError::UnknownType(_))));
        assert!(matches!(decode_client_frame(r#"{"req":1}"#), Err(JsonError::UnknownType(_))));
        assert!(matches!(decode_client_frame(r#"{"type":"publish"}"#), Err(JsonError::MissingField { .. })));
        assert!(matches!(
            decode_client_frame(r#"{"type":"publish","channel":"a","text":"x","data":1}"#),
            Err(JsonError::BadPayload(_))
        ));
        assert!(matches!(
            decode_client_frame(r#"{"type":"publish","channel":"a","data_b64":"!!"}"#),
            Err(JsonError::BadPayload(_))
        ));
        assert!(matches!(decode_client_frame(r#"{"type":"subscribe","filter":5}"#), Err(JsonError::Malformed(_))));
    }

    #[test]
    fn server_frames_round_trip() {
        let frames = vec![
            ServerFrame {
                req: 1,
                frame: Some(server_frame::Frame::PublishAck(PublishAck {
                    channel: "a".into(),
                    epoch: "E".into(),
                    serial: 2,
                    duplicate: true,
                })),
            },
            ServerFrame {
                req: 0,
                frame: Some(server_frame::Frame::Gap(Gap {
                    channel: "a".into(),
                    from: Some(Position { epoch: "E".into(), serial: 1 }),
                    to: Some(Position { epoch: "F".into(), serial: 9 }),
                    reason: "epoch_changed".into(),
                })),
            },
            ServerFrame {
                req: 3,
                frame: Some(server_frame::Frame::Error(Error {
                    code: ErrorCode::InvalidChannel as i32,
                    message: "bad".into(),
                })),
            },
            ServerFrame {
                req: 4,
                frame: Some(server_frame::Frame::Presence(PresenceMembers {
                    channel: "a".into(),
                    members: vec![Member {
                        client_id: "u".into(),
                        connection_id: "c".into(),
                        data: Bytes::from_static(b"{\"s\":1}"),
                        protocol: Protocol::Ws as i32,
                    }],
                })),
            },
            ServerFrame {
                req: 5,
                frame: Some(server_frame::Frame::History(HistoryResult {
                    channel: "a".into(),
                    epoch: "E".into(),
                    serial: 3,
                    messages: vec![env(b"x")],
                })),
            },
        ];
        for f in frames {
            let text = encode_server_frame(&f);
            assert_eq!(decode_server_frame(&text).unwrap(), f, "{text}");
        }
    }
}
