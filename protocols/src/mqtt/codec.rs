//! MQTT wire codec: version detection, one inbound packet type for both
//! protocol levels, and encoding of the packets a server sends.
//!
//! Parsing and serialisation of the packets themselves is rumqttc's
//! `mqttbytes` (v4 = MQTT 3.1.1, v5 = MQTT 5.0). This module adds what a
//! server needs on top: it reads the fixed header itself so that an oversize
//! packet is refused from its remaining length before its body is buffered,
//! detects the protocol level from the CONNECT, works around v5 packets that
//! the library does not accept in their shortest form (a DISCONNECT with
//! remaining length 0, MQTT 5 §3.14.2.1), and flattens both versions into
//! [`Packet`] so that the connection logic is written once.
//!
//! It is pure: [`decode`] takes a buffer and returns `Ok(None)` when more
//! bytes are needed; [`encode`] appends to a buffer. No I/O, no async.
//!
//! AUTH (MQTT 5 §3.15) is decoded and encoded here by hand: rumqttc 0.25's
//! reader does not dispatch packet type 15, and its `AuthProperties`
//! miscounts string properties. The connection uses it for re-authentication
//! with the `jwt` method (see the module docs of [`super`]).
//!
//! It deliberately does not validate topic names or filters (the connection
//! does, with the reason codes of its table), nor decide what an AUTH means.

use bytes::{Buf, Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::v5::mqttbytes::v5;

/// The protocol level of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1.1 (protocol level 4).
    V4,
    /// MQTT 5.0 (protocol level 5).
    V5,
}

/// Why bytes could not be decoded. Each maps to one close in the module's
/// table (MQTT 5: DISCONNECT 0x81 malformed packet, 0x95 too large).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The packet's total size exceeds the limit (checked from the fixed
    /// header, before the body is buffered).
    #[error("packet of {size} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Announced size of the whole packet.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The first packet is a CONNECT with a protocol level this server does
    /// not speak (3 = MQTT 3.1 is refused too).
    #[error("unsupported protocol level {0}")]
    UnsupportedVersion(u8),
    /// The first packet is not a CONNECT, or has a protocol name other than
    /// `MQTT`.
    #[error("not an MQTT CONNECT: {0}")]
    NotConnect(&'static str),
    /// Anything else the packet parser rejected.
    #[error("malformed packet: {0}")]
    Malformed(String),
}

/// Properties of a PUBLISH (and of a will) that travel with the message.
/// All empty on MQTT 3.1.1.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishProps {
    /// Payload format indicator 1: the payload is UTF-8 (MQTT 5 §3.3.2.3.2).
    pub payload_utf8: bool,
    /// Message expiry interval in seconds (§3.3.2.3.3).
    pub message_expiry: Option<u32>,
    /// Topic alias (§3.3.2.3.4).
    pub topic_alias: Option<u16>,
    /// Response topic (§3.3.2.3.5).
    pub response_topic: Option<String>,
    /// Correlation data (§3.3.2.3.6).
    pub correlation_data: Option<Bytes>,
    /// User properties, in order, duplicates kept (§3.3.2.3.7).
    pub user_properties: Vec<(String, String)>,
    /// Subscription identifiers (§3.3.2.3.8); outbound only.
    pub subscription_ids: Vec<u32>,
    /// Content type (§3.3.2.3.9).
    pub content_type: Option<String>,
}

/// A PUBLISH in either direction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Publish {
    /// Redelivery flag.
    pub dup: bool,
    /// 0, 1 or 2.
    pub qos: u8,
    /// Retain flag.
    pub retain: bool,
    /// Topic name bytes, not yet validated as UTF-8 (empty with an alias).
    pub topic: Bytes,
    /// Packet id (0 for QoS 0).
    pub pkid: u16,
    /// Application payload.
    pub payload: Bytes,
    /// MQTT 5 properties.
    pub props: PublishProps,
}

/// A will message from the CONNECT (MQTT 3.1.1 §3.1.2.5, MQTT 5 §3.1.3.2).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Will {
    /// Will topic bytes (validated by the connection).
    pub topic: Bytes,
    /// Will payload.
    pub payload: Bytes,
    /// Will QoS.
    pub qos: u8,
    /// Will retain.
    pub retain: bool,
    /// MQTT 5 will delay interval in seconds.
    pub delay: u32,
    /// MQTT 5 will properties.
    pub props: PublishProps,
}

/// A CONNECT of either version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// Protocol level.
    pub version: Version,
    /// Client identifier (may be empty).
    pub client_id: String,
    /// Clean session (3.1.1) / clean start (5).
    pub clean: bool,
    /// Keep alive in seconds (0 = none).
    pub keep_alive: u16,
    /// User name, if any (accepted and ignored for now).
    pub username: Option<String>,
    /// Password, if any: passed to the core as the connection token.
    pub password: Option<String>,
    /// The will.
    pub will: Option<Will>,
    /// MQTT 5 session expiry interval (0 = ends with the connection).
    pub session_expiry: u32,
    /// MQTT 5 receive maximum of the client (how many QoS 1/2 we may have in
    /// flight towards it).
    pub receive_maximum: Option<u16>,
    /// MQTT 5 maximum packet size the client accepts.
    pub max_packet_size: Option<u32>,
    /// MQTT 5 topic alias maximum of the client (aliases we may assign).
    pub topic_alias_max: u16,
    /// MQTT 5 Authentication Method (property 0x15), e.g. `jwt`.
    pub auth_method: Option<String>,
    /// MQTT 5 Authentication Data (property 0x16).
    pub auth_data: Option<Bytes>,
}

/// An AUTH packet (MQTT 5 §3.15).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    /// 0x00 success, 0x18 continue authentication, 0x19 re-authenticate.
    pub reason: u8,
    /// Authentication Method (property 0x15).
    pub method: Option<String>,
    /// Authentication Data (property 0x16).
    pub data: Option<Bytes>,
}

/// One filter of a SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubFilter {
    /// Topic filter, as sent.
    pub filter: String,
    /// Maximum QoS.
    pub qos: u8,
    /// MQTT 5 no local.
    pub no_local: bool,
    /// MQTT 5 retain as published.
    pub retain_as_published: bool,
    /// MQTT 5 retain handling: 0 send retained, 1 only if new, 2 never.
    pub retain_handling: u8,
}

/// A SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    /// Packet id.
    pub pkid: u16,
    /// Filters with options.
    pub filters: Vec<SubFilter>,
    /// MQTT 5 subscription identifier.
    pub id: Option<u32>,
    /// MQTT 5 user properties (`rewind` is read from here).
    pub user_properties: Vec<(String, String)>,
}

/// A packet received from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// CONNECT.
    Connect(Box<Connect>),
    /// PUBLISH.
    Publish(Publish),
    /// PUBACK (its reason code is not needed: the flow ends either way).
    PubAck {
        /// Packet id.
        pkid: u16,
    },
    /// PUBREC; `failed` when its reason code is ≥ 0x80 (MQTT 5 §4.3.3).
    PubRec {
        /// Packet id.
        pkid: u16,
        /// The flow ends here.
        failed: bool,
    },
    /// PUBREL.
    PubRel {
        /// Packet id.
        pkid: u16,
    },
    /// PUBCOMP.
    PubComp {
        /// Packet id.
        pkid: u16,
    },
    /// SUBSCRIBE.
    Subscribe(Subscribe),
    /// UNSUBSCRIBE.
    Unsubscribe {
        /// Packet id.
        pkid: u16,
        /// Filters.
        filters: Vec<String>,
    },
    /// PINGREQ.
    PingReq,
    /// DISCONNECT.
    Disconnect {
        /// MQTT 5 reason code (0 on 3.1.1).
        reason: u8,
        /// MQTT 5 new session expiry interval.
        session_expiry: Option<u32>,
    },
    /// AUTH (MQTT 5 only).
    Auth(Auth),
    /// A packet only a server sends (CONNACK, SUBACK, ...).
    Unexpected(&'static str),
}

/// MQTT 5 reason codes this server sends (MQTT 5 §2.4).
pub mod reason {
    /// Success / normal disconnection / granted QoS 0.
    pub const SUCCESS: u8 = 0x00;
    /// DISCONNECT: disconnect with will message (client side).
    pub const DISCONNECT_WITH_WILL: u8 = 0x04;
    /// UNSUBACK: no subscription existed.
    pub const NO_SUBSCRIPTION_EXISTED: u8 = 0x11;
    /// AUTH: continue authentication (a step of a multi-step method).
    pub const CONTINUE_AUTHENTICATION: u8 = 0x18;
    /// AUTH: re-authenticate (client to server).
    pub const REAUTHENTICATE: u8 = 0x19;
    /// Unspecified error.
    pub const UNSPECIFIED: u8 = 0x80;
    /// Malformed packet.
    pub const MALFORMED: u8 = 0x81;
    /// Protocol error.
    pub const PROTOCOL_ERROR: u8 = 0x82;
    /// CONNACK: unsupported protocol version.
    pub const UNSUPPORTED_VERSION: u8 = 0x84;
    /// CONNACK: client identifier not valid.
    pub const CLIENT_ID_INVALID: u8 = 0x85;
    /// CONNACK: bad user name or password (the connection token).
    pub const BAD_USER_NAME_OR_PASSWORD: u8 = 0x86;
    /// Not authorized.
    pub const NOT_AUTHORIZED: u8 = 0x87;
    /// Server unavailable.
    pub const SERVER_UNAVAILABLE: u8 = 0x88;
    /// Server busy.
    pub const SERVER_BUSY: u8 = 0x89;
    /// DISCONNECT: server shutting down.
    pub const SHUTTING_DOWN: u8 = 0x8B;
    /// Bad authentication method.
    pub const BAD_AUTHENTICATION_METHOD: u8 = 0x8C;
    /// DISCONNECT: keep alive timeout.
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    /// DISCONNECT: session taken over.
    pub const SESSION_TAKEN_OVER: u8 = 0x8E;
    /// Topic filter invalid.
    pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
    /// Topic name invalid.
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    /// Receive maximum exceeded.
    pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
    /// Topic alias invalid.
    pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
    /// Packet too large.
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    /// Quota exceeded.
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    /// DISCONNECT: administrative action.
    pub const ADMINISTRATIVE_ACTION: u8 = 0x98;
    /// Payload format invalid.
    pub const PAYLOAD_FORMAT_INVALID: u8 = 0x99;
    /// Maximum connect time (the connection token expired).
    pub const MAXIMUM_CONNECT_TIME: u8 = 0xA0;
}

/// A packet this server sends. Reason codes are MQTT 5 values; on 3.1.1 the
/// encoder maps them (CONNACK) or drops them (acks, which have none there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outgoing {
    /// CONNACK. On 3.1.1 `code` is the 3.1.1 return code (0..=5).
    ConnAck {
        /// Session present.
        session_present: bool,
        /// Return / reason code.
        code: u8,
        /// MQTT 5 properties.
        props: Option<Box<v5::ConnAckProperties>>,
    },
    /// PUBLISH.
    Publish(Publish),
    /// PUBACK.
    PubAck(u16, u8),
    /// PUBREC.
    PubRec(u16, u8),
    /// PUBREL.
    PubRel(u16),
    /// PUBCOMP.
    PubComp(u16),
    /// SUBACK with one code per filter (granted QoS or a failure).
    SubAck(u16, Vec<u8>),
    /// UNSUBACK with one reason per filter (MQTT 5 only).
    UnsubAck(u16, Vec<u8>),
    /// PINGRESP.
    PingResp,
    /// DISCONNECT (MQTT 5 only; 3.1.1 servers just close).
    Disconnect(u8),
    /// AUTH with a reason and the Authentication Method (MQTT 5 only; 3.1.1
    /// has no AUTH, so nothing is written there).
    Auth {
        /// Reason code (0x00 success after a re-authentication).
        reason: u8,
        /// Authentication Method, the one the client used.
        method: String,
    },
}

/// Reads the fixed header: `Ok(None)` if incomplete, else (packet byte 1,
/// header length, remaining length). MQTT 3.1.1 §2.2.3 / MQTT 5 §1.5.5: at
/// most four length bytes.
fn fixed_header(buf: &[u8]) -> Result<Option<(u8, usize, usize)>, CodecError> {
    let Some(&byte1) = buf.first() else { return Ok(None) };
    let mut len = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else { return Ok(None) };
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((byte1, 2 + i, len)));
        }
    }
    Err(CodecError::Malformed("remaining length longer than four bytes".into()))
}

/// The protocol level of a complete CONNECT in `packet` (after the fixed
/// header of `header_len` bytes), MQTT 3.1.1 §3.1.2.1-2.
fn protocol_level(packet: &[u8], header_len: usize) -> Result<u8, CodecError> {
    let body = &packet[header_len..];
    if body.len() < 2 {
        return Err(CodecError::NotConnect("truncated protocol name"));
    }
    let name_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
    let name = body.get(2..2 + name_len).ok_or(CodecError::NotConnect("truncated protocol name"))?;
    let level = *body.get(2 + name_len).ok_or(CodecError::NotConnect("missing protocol level"))?;
    match (name, level) {
        (b"MQTT", _) => Ok(level),
        // MQTT 3.1 used "MQIsdp" and level 3: recognised so that it gets a
        // proper refusal instead of a silent close.
        (b"MQIsdp", _) => Ok(level),
        _ => Err(CodecError::NotConnect("protocol name is not MQTT")),
    }
}

/// The name of a packet type only a server sends (MQTT 5 §2.1.2, 3.1.1
/// §2.2.1): CONNACK, SUBACK, UNSUBACK, PINGRESP.
fn server_only(packet_type: u8) -> Option<&'static str> {
    match packet_type {
        2 => Some("CONNACK"),
        9 => Some("SUBACK"),
        11 => Some("UNSUBACK"),
        13 => Some("PINGRESP"),
        _ => None,
    }
}

/// Decodes one packet from the front of `buf`.
///
/// `version` is `None` until the CONNECT arrived: then only a CONNECT is
/// accepted and its protocol level picks the parser. `max` bounds the whole
/// packet (fixed header included); an oversize packet is refused from its
/// fixed header alone, before its body is buffered.
pub fn decode(buf: &mut BytesMut, version: Option<Version>, max: usize) -> Result<Option<Packet>, CodecError> {
    // Before the CONNECT, the first byte alone can refuse the connection:
    // no need to wait for the body of, say, an HTTP request read as MQTT.
    if version.is_none() && buf.first().is_some_and(|b| b >> 4 != 1) {
        return Err(CodecError::NotConnect("the first packet must be CONNECT"));
    }
    let Some((byte1, header_len, remaining)) = fixed_header(buf)? else {
        return Ok(None);
    };
    let size = header_len + remaining;
    if size > max {
        return Err(CodecError::TooLarge { size, max });
    }
    if buf.len() < size {
        // Reserve once for the rest of this packet; bounded by `max`.
        buf.reserve(size - buf.len());
        return Ok(None);
    }
    let packet_type = byte1 >> 4;
    let version = match version {
        Some(v) => {
            if packet_type == 1 {
                // A second CONNECT is a protocol violation (§3.1: "a Client
                // can only send the CONNECT packet once").
                buf.advance(size);
                return Ok(Some(Packet::Unexpected("second CONNECT")));
            }
            if let Some(name) = server_only(packet_type) {
                // Known from the type alone, whatever the body: a protocol
                // error (0x82), not a malformed packet (0x81) because the
                // body is not what a server would have sent.
                buf.advance(size);
                return Ok(Some(Packet::Unexpected(name)));
            }
            v
        }
        None => {
            if packet_type != 1 {
                return Err(CodecError::NotConnect("the first packet must be CONNECT"));
            }
            match protocol_level(&buf[..size], header_len)? {
                4 => Version::V4,
                5 => Version::V5,
                other => return Err(CodecError::UnsupportedVersion(other)),
            }
        }
    };
    match version {
        Version::V4 => {
            let p = v4::Packet::read(buf, max).map_err(|e| CodecError::Malformed(e.to_string()))?;
            Ok(Some(from_v4(p)))
        }
        Version::V5 => {
            if packet_type == 15 {
                // AUTH (MQTT 5 §3.15): rumqttc's reader does not know the
                // type, hence decoded here.
                let auth = decode_auth(byte1, &buf[header_len..size]);
                buf.advance(size);
                return auth.map(|a| Some(Packet::Auth(a)));
            }
            if packet_type == 14 && remaining <= 1 {
                // rumqttc refuses the two- and three-byte DISCONNECT forms,
                // which MQTT 5 §3.14.2.1 allows (reason 0x00 when absent; no
                // properties when the remaining length is below 2).
                let r = if remaining == 1 { buf[header_len] } else { reason::SUCCESS };
                buf.advance(size);
                return Ok(Some(Packet::Disconnect { reason: r, session_expiry: None }));
            }
            let max32 = u32::try_from(max).unwrap_or(u32::MAX);
            let p = v5::Packet::read(buf, Some(max32)).map_err(|e| CodecError::Malformed(e.to_string()))?;
            Ok(Some(from_v5(p)))
        }
    }
}

/// Reads an MQTT 5 UTF-8 string or binary (two-byte length prefix).
fn read_prefixed<'a>(body: &mut &'a [u8]) -> Result<&'a [u8], CodecError> {
    let short = || CodecError::Malformed("AUTH: truncated property".into());
    let (len, rest) = body.split_first_chunk::<2>().ok_or_else(short)?;
    let len = usize::from(u16::from_be_bytes(*len));
    let (value, rest) = rest.split_at_checked(len).ok_or_else(short)?;
    *body = rest;
    Ok(value)
}

/// Decodes the body of an AUTH packet (MQTT 5 §3.15). A remaining length of
/// 0 means reason 0x00 and no properties (§3.15.2.1); only the properties
/// AUTH may carry are accepted, each at most once where the spec says so.
fn decode_auth(byte1: u8, body: &[u8]) -> Result<Auth, CodecError> {
    let bad = |m: &str| CodecError::Malformed(format!("AUTH: {m}"));
    if byte1 & 0x0F != 0 {
        return Err(bad("reserved flags set"));
    }
    let mut auth = Auth { reason: reason::SUCCESS, method: None, data: None };
    let Some((&code, mut rest)) = body.split_first() else { return Ok(auth) };
    if !matches!(code, reason::SUCCESS | reason::CONTINUE_AUTHENTICATION | reason::REAUTHENTICATE) {
        return Err(bad("unknown reason code"));
    }
    auth.reason = code;
    if rest.is_empty() {
        return Ok(auth);
    }
    let props_len = read_varint(&mut rest).ok_or_else(|| bad("bad property length"))?;
    if rest.len() != props_len {
        return Err(bad("property length does not match the packet"));
    }
    while let Some((&id, tail)) = rest.split_first() {
        rest = tail;
        match id {
            0x15 => {
                let m = read_prefixed(&mut rest)?;
                let m = std::str::from_utf8(m).map_err(|_| bad("method is not UTF-8"))?;
                if auth.method.replace(m.to_string()).is_some() {
                    return Err(bad("two authentication methods"));
                }
            }
            0x16 => {
                let d = Bytes::copy_from_slice(read_prefixed(&mut rest)?);
                if auth.data.replace(d).is_some() {
                    return Err(bad("two authentication data"));
                }
            }
            // Reason string: informative only.
            0x1F => {
                read_prefixed(&mut rest)?;
            }
            // User property: a key and a value, ignored.
            0x26 => {
                read_prefixed(&mut rest)?;
                read_prefixed(&mut rest)?;
            }
            other => return Err(bad(&format!("property 0x{other:02X} not allowed"))),
        }
    }
    Ok(auth)
}

/// Reads an MQTT variable byte integer of at most four bytes.
fn read_varint(body: &mut &[u8]) -> Option<usize> {
    let mut n = 0usize;
    for i in 0..4 {
        let (&b, rest) = body.split_first()?;
        *body = rest;
        n |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some(n);
        }
    }
    None
}

/// Appends an AUTH packet: reason code and the Authentication Method.
fn encode_auth(reason: u8, method: &str, buf: &mut BytesMut) -> Result<(), CodecError> {
    let method_len = u16::try_from(method.len()).map_err(|_| CodecError::Malformed("method too long".into()))?;
    let props_len = 3 + usize::from(method_len);
    let mut body = Vec::with_capacity(5 + props_len);
    body.push(reason);
    push_varint(props_len, &mut body);
    body.push(0x15);
    body.extend_from_slice(&method_len.to_be_bytes());
    body.extend_from_slice(method.as_bytes());
    buf.extend_from_slice(&[0xF0]);
    let mut len = Vec::with_capacity(4);
    push_varint(body.len(), &mut len);
    buf.extend_from_slice(&len);
    buf.extend_from_slice(&body);
    Ok(())
}

/// Appends an MQTT variable byte integer (MQTT 5 §1.5.5).
fn push_varint(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

/// A payload in an allocation of its own. The decoder hands out a slice of
/// the connection's read buffer, and history keeps a message for as long as
/// it likes: a slice would pin the whole buffer (measured: ~9 KB per 200-byte
/// message kept), so it is copied once here.
fn owned(payload: Bytes) -> Bytes {
    Bytes::copy_from_slice(&payload)
}

fn from_v4(p: v4::Packet) -> Packet {
    match p {
        v4::Packet::Connect(c) => {
            let will = c.last_will.map(|w| Will {
                topic: Bytes::from(w.topic.into_bytes()),
                payload: owned(w.message),
                qos: w.qos as u8,
                retain: w.retain,
                delay: 0,
                props: PublishProps::default(),
            });
            Packet::Connect(Box::new(Connect {
                version: Version::V4,
                client_id: c.client_id,
                clean: c.clean_session,
                keep_alive: c.keep_alive,
                username: c.login.as_ref().map(|l| l.username.clone()).filter(|u| !u.is_empty()),
                password: c.login.map(|l| l.password).filter(|p| !p.is_empty()),
                will,
                session_expiry: 0,
                receive_maximum: None,
                max_packet_size: None,
                topic_alias_max: 0,
                auth_method: None,
                auth_data: None,
            }))
        }
        v4::Packet::Publish(p) => Packet::Publish(Publish {
            dup: p.dup,
            qos: p.qos as u8,
            retain: p.retain,
            topic: Bytes::from(p.topic.into_bytes()),
            pkid: p.pkid,
            payload: owned(p.payload),
            props: PublishProps::default(),
        }),
        v4::Packet::PubAck(a) => Packet::PubAck { pkid: a.pkid },
        v4::Packet::PubRec(a) => Packet::PubRec { pkid: a.pkid, failed: false },
        v4::Packet::PubRel(a) => Packet::PubRel { pkid: a.pkid },
        v4::Packet::PubComp(a) => Packet::PubComp { pkid: a.pkid },
        v4::Packet::Subscribe(s) => Packet::Subscribe(Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| SubFilter {
                    filter: f.path,
                    qos: f.qos as u8,
                    no_local: false,
                    retain_as_published: false,
                    retain_handling: 0,
                })
                .collect(),
            id: None,
            user_properties: Vec::new(),
        }),
        v4::Packet::Unsubscribe(u) => Packet::Unsubscribe { pkid: u.pkid, filters: u.topics },
        v4::Packet::PingReq => Packet::PingReq,
        v4::Packet::Disconnect => Packet::Disconnect { reason: reason::SUCCESS, session_expiry: None },
        v4::Packet::ConnAck(_) => Packet::Unexpected("CONNACK"),
        v4::Packet::SubAck(_) => Packet::Unexpected("SUBACK"),
        v4::Packet::UnsubAck(_) => Packet::Unexpected("UNSUBACK"),
        v4::Packet::PingResp => Packet::Unexpected("PINGRESP"),
    }
}

fn props_from_v5(p: Option<v5::PublishProperties>) -> PublishProps {
    let Some(p) = p else { return PublishProps::default() };
    PublishProps {
        payload_utf8: p.payload_format_indicator == Some(1),
        message_expiry: p.message_expiry_interval,
        topic_alias: p.topic_alias,
        response_topic: p.response_topic,
        correlation_data: p.correlation_data.map(owned),
        user_properties: p.user_properties,
        subscription_ids: p.subscription_identifiers.into_iter().map(|i| i as u32).collect(),
        content_type: p.content_type,
    }
}

fn props_to_v5(p: &PublishProps) -> Option<v5::PublishProperties> {
    if *p == PublishProps::default() {
        return None;
    }
    Some(v5::PublishProperties {
        payload_format_indicator: p.payload_utf8.then_some(1),
        message_expiry_interval: p.message_expiry,
        topic_alias: p.topic_alias,
        response_topic: p.response_topic.clone(),
        correlation_data: p.correlation_data.clone(),
        user_properties: p.user_properties.clone(),
        subscription_identifiers: p.subscription_ids.iter().map(|&i| i as usize).collect(),
        content_type: p.content_type.clone(),
    })
}

fn from_v5(p: v5::Packet) -> Packet {
    match p {
        v5::Packet::Connect(c, will, login) => {
            let props = c.properties.unwrap_or_default_props();
            let will = will.map(|w| {
                let wp = w.properties.unwrap_or_else(empty_will_props);
                Will {
                    topic: w.topic,
                    payload: owned(w.message),
                    qos: w.qos as u8,
                    retain: w.retain,
                    delay: wp.delay_interval.unwrap_or(0),
                    props: PublishProps {
                        payload_utf8: wp.payload_format_indicator == Some(1),
                        message_expiry: wp.message_expiry_interval,
                        topic_alias: None,
                        response_topic: wp.response_topic,
                        correlation_data: wp.correlation_data.map(owned),
                        user_properties: wp.user_properties,
                        subscription_ids: Vec::new(),
                        content_type: wp.content_type,
                    },
                }
            });
            Packet::Connect(Box::new(Connect {
                version: Version::V5,
                client_id: c.client_id,
                clean: c.clean_start,
                keep_alive: c.keep_alive,
                username: login.as_ref().map(|l| l.username.clone()).filter(|u| !u.is_empty()),
                password: login.map(|l| l.password).filter(|p| !p.is_empty()),
                will,
                session_expiry: props.session_expiry_interval.unwrap_or(0),
                receive_maximum: props.receive_maximum,
                max_packet_size: props.max_packet_size,
                topic_alias_max: props.topic_alias_max.unwrap_or(0),
                auth_method: props.auth_method,
                auth_data: props.auth_data,
            }))
        }
        v5::Packet::Publish(p) => Packet::Publish(Publish {
            dup: p.dup,
            qos: p.qos as u8,
            retain: p.retain,
            topic: p.topic,
            pkid: p.pkid,
            payload: owned(p.payload),
            props: props_from_v5(p.properties),
        }),
        v5::Packet::PubAck(a) => Packet::PubAck { pkid: a.pkid },
        v5::Packet::PubRec(a) => Packet::PubRec {
            pkid: a.pkid,
            failed: !matches!(a.reason, v5::PubRecReason::Success | v5::PubRecReason::NoMatchingSubscribers),
        },
        v5::Packet::PubRel(a) => Packet::PubRel { pkid: a.pkid },
        v5::Packet::PubComp(a) => Packet::PubComp { pkid: a.pkid },
        v5::Packet::Subscribe(s) => {
            let (id, user_properties) = match s.properties {
                Some(p) => (p.id.map(|i| i as u32), p.user_properties),
                None => (None, Vec::new()),
            };
            Packet::Subscribe(Subscribe {
                pkid: s.pkid,
                filters: s
                    .filters
                    .into_iter()
                    .map(|f| SubFilter {
                        filter: f.path,
                        qos: f.qos as u8,
                        no_local: f.nolocal,
                        retain_as_published: f.preserve_retain,
                        retain_handling: match f.retain_forward_rule {
                            v5::RetainForwardRule::OnEverySubscribe => 0,
                            v5::RetainForwardRule::OnNewSubscribe => 1,
                            v5::RetainForwardRule::Never => 2,
                        },
                    })
                    .collect(),
                id,
                user_properties,
            })
        }
        v5::Packet::Unsubscribe(u) => Packet::Unsubscribe { pkid: u.pkid, filters: u.filters },
        v5::Packet::PingReq(_) => Packet::PingReq,
        v5::Packet::Disconnect(d) => Packet::Disconnect {
            reason: d.reason_code as u8,
            session_expiry: d.properties.and_then(|p| p.session_expiry_interval),
        },
        v5::Packet::Auth(_) => Packet::Unexpected("AUTH"),
        v5::Packet::ConnAck(_) => Packet::Unexpected("CONNACK"),
        v5::Packet::SubAck(_) => Packet::Unexpected("SUBACK"),
        v5::Packet::UnsubAck(_) => Packet::Unexpected("UNSUBACK"),
        v5::Packet::PingResp(_) => Packet::Unexpected("PINGRESP"),
    }
}

/// The CONNECT properties we read, with defaults when absent.
struct ConnectProps {
    session_expiry_interval: Option<u32>,
    receive_maximum: Option<u16>,
    max_packet_size: Option<u32>,
    topic_alias_max: Option<u16>,
    auth_method: Option<String>,
    auth_data: Option<Bytes>,
}

trait UnwrapProps {
    fn unwrap_or_default_props(self) -> ConnectProps;
}

impl UnwrapProps for Option<v5::ConnectProperties> {
    fn unwrap_or_default_props(self) -> ConnectProps {
        match self {
            Some(p) => ConnectProps {
                session_expiry_interval: p.session_expiry_interval,
                receive_maximum: p.receive_maximum,
                max_packet_size: p.max_packet_size,
                topic_alias_max: p.topic_alias_max,
                auth_method: p.authentication_method,
                auth_data: p.authentication_data,
            },
            None => ConnectProps {
                session_expiry_interval: None,
                receive_maximum: None,
                max_packet_size: None,
                topic_alias_max: None,
                auth_method: None,
                auth_data: None,
            },
        }
    }
}

fn empty_will_props() -> v5::LastWillProperties {
    v5::LastWillProperties {
        delay_interval: None,
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: None,
        response_topic: None,
        correlation_data: None,
        user_properties: Vec::new(),
    }
}

fn qos4(q: u8) -> rumqttc::mqttbytes::QoS {
    match q {
        0 => rumqttc::mqttbytes::QoS::AtMostOnce,
        1 => rumqttc::mqttbytes::QoS::AtLeastOnce,
        _ => rumqttc::mqttbytes::QoS::ExactlyOnce,
    }
}

fn qos5(q: u8) -> QoS5 {
    match q {
        0 => QoS5::AtMostOnce,
        1 => QoS5::AtLeastOnce,
        _ => QoS5::ExactlyOnce,
    }
}

fn connack_code5(code: u8) -> v5::ConnectReturnCode {
    use v5::ConnectReturnCode as C;
    match code {
        0x00 => C::Success,
        0x81 => C::MalformedPacket,
        0x82 => C::ProtocolError,
        0x84 => C::UnsupportedProtocolVersion,
        0x85 => C::ClientIdentifierNotValid,
        0x86 => C::BadUserNamePassword,
        0x87 => C::NotAuthorized,
        0x88 => C::ServerUnavailable,
        0x89 => C::ServerBusy,
        0x8C => C::BadAuthenticationMethod,
        0x95 => C::PacketTooLarge,
        0x97 => C::QuotaExceeded,
        0x9F => C::ConnectionRateExceeded,
        _ => C::UnspecifiedError,
    }
}

fn connack_code4(code: u8) -> v4::ConnectReturnCode {
    use v4::ConnectReturnCode as C;
    match code {
        0 => C::Success,
        1 => C::RefusedProtocolVersion,
        2 => C::BadClientId,
        4 => C::BadUserNamePassword,
        5 => C::NotAuthorized,
        _ => C::ServiceUnavailable,
    }
}

fn puback_reason(code: u8) -> v5::PubAckReason {
    use v5::PubAckReason as R;
    match code {
        0x00 => R::Success,
        0x10 => R::NoMatchingSubscribers,
        0x83 => R::ImplementationSpecificError,
        0x87 => R::NotAuthorized,
        0x90 => R::TopicNameInvalid,
        0x91 => R::PacketIdentifierInUse,
        0x97 => R::QuotaExceeded,
        0x99 => R::PayloadFormatInvalid,
        _ => R::UnspecifiedError,
    }
}

fn pubrec_reason(code: u8) -> v5::PubRecReason {
    use v5::PubRecReason as R;
    match code {
        0x00 => R::Success,
        0x10 => R::NoMatchingSubscribers,
        0x83 => R::ImplementationSpecificError,
        0x87 => R::NotAuthorized,
        0x90 => R::TopicNameInvalid,
        0x91 => R::PacketIdentifierInUse,
        0x97 => R::QuotaExceeded,
        0x99 => R::PayloadFormatInvalid,
        _ => R::UnspecifiedError,
    }
}

fn suback_code5(code: u8) -> v5::SubscribeReasonCode {
    use v5::SubscribeReasonCode as S;
    match code {
        0..=2 => S::Success(qos5(code)),
        0x83 => S::ImplementationSpecific,
        0x87 => S::NotAuthorized,
        0x8F => S::TopicFilterInvalid,
        0x97 => S::QuotaExceeded,
        0x9E => S::SharedSubscriptionsNotSupported,
        0xA1 => S::SubscriptionIdNotSupported,
        0xA2 => S::WildcardSubscriptionsNotSupported,
        _ => S::Unspecified,
    }
}

fn unsuback_reason5(code: u8) -> v5::UnsubAckReason {
    use v5::UnsubAckReason as U;
    match code {
        0x00 => U::Success,
        0x11 => U::NoSubscriptionExisted,
        0x87 => U::NotAuthorized,
        0x8F => U::TopicFilterInvalid,
        _ => U::UnspecifiedError,
    }
}

/// The encoded size of an outbound PUBLISH, to honour a client's Maximum
/// Packet Size (MQTT 5 §3.1.2.11.4) before encoding it.
pub fn publish_size(version: Version, p: &Publish) -> usize {
    match version {
        Version::V4 => v4::Publish {
            dup: p.dup,
            qos: qos4(p.qos),
            retain: p.retain,
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            pkid: p.pkid.max(1),
            payload: p.payload.clone(),
        }
        .size(),
        Version::V5 => publish5(p).size(),
    }
}

fn publish5(p: &Publish) -> v5::Publish {
    v5::Publish {
        dup: p.dup,
        qos: qos5(p.qos),
        retain: p.retain,
        topic: p.topic.clone(),
        // rumqttc sizes a QoS 1/2 packet without its id when the id is 0.
        pkid: if p.qos > 0 { p.pkid.max(1) } else { 0 },
        payload: p.payload.clone(),
        properties: props_to_v5(&p.props),
    }
}

/// Appends `packet` to `buf` in the connection's version. Fails only for
/// packets the library cannot represent (never for what this server builds).
pub fn encode(version: Version, packet: &Outgoing, buf: &mut BytesMut) -> Result<(), CodecError> {
    let err = |e: String| CodecError::Malformed(e);
    match version {
        Version::V4 => {
            let p = match packet {
                Outgoing::ConnAck { session_present, code, .. } => {
                    v4::Packet::ConnAck(v4::ConnAck::new(connack_code4(*code), *session_present))
                }
                Outgoing::Publish(p) => v4::Packet::Publish(v4::Publish {
                    dup: p.dup,
                    qos: qos4(p.qos),
                    retain: p.retain,
                    topic: String::from_utf8_lossy(&p.topic).into_owned(),
                    pkid: p.pkid,
                    payload: p.payload.clone(),
                }),
                Outgoing::PubAck(pkid, _) => v4::Packet::PubAck(v4::PubAck::new(*pkid)),
                Outgoing::PubRec(pkid, _) => v4::Packet::PubRec(v4::PubRec::new(*pkid)),
                Outgoing::PubRel(pkid) => v4::Packet::PubRel(v4::PubRel::new(*pkid)),
                Outgoing::PubComp(pkid) => v4::Packet::PubComp(v4::PubComp::new(*pkid)),
                Outgoing::SubAck(pkid, codes) => v4::Packet::SubAck(v4::SubAck::new(
                    *pkid,
                    codes
                        .iter()
                        .map(|&c| {
                            if c <= 2 {
                                v4::SubscribeReasonCode::Success(qos4(c))
                            } else {
                                v4::SubscribeReasonCode::Failure
                            }
                        })
                        .collect(),
                )),
                Outgoing::UnsubAck(pkid, _) => v4::Packet::UnsubAck(v4::UnsubAck::new(*pkid)),
                Outgoing::PingResp => v4::Packet::PingResp,
                // MQTT 3.1.1 has no server DISCONNECT (the server just
                // closes) and no AUTH.
                Outgoing::Disconnect(_) | Outgoing::Auth { .. } => return Ok(()),
            };
            p.write(buf, usize::MAX).map(|_| ()).map_err(|e| err(e.to_string()))
        }
        Version::V5 => {
            let p = match packet {
                Outgoing::ConnAck { session_present, code, props } => v5::Packet::ConnAck(v5::ConnAck {
                    session_present: *session_present,
                    code: connack_code5(*code),
                    properties: props.as_deref().cloned(),
                }),
                Outgoing::Publish(p) => v5::Packet::Publish(publish5(p)),
                Outgoing::PubAck(pkid, r) => {
                    v5::Packet::PubAck(v5::PubAck { pkid: *pkid, reason: puback_reason(*r), properties: None })
                }
                Outgoing::PubRec(pkid, r) => {
                    v5::Packet::PubRec(v5::PubRec { pkid: *pkid, reason: pubrec_reason(*r), properties: None })
                }
                Outgoing::PubRel(pkid) => v5::Packet::PubRel(v5::PubRel::new(*pkid, None)),
                Outgoing::PubComp(pkid) => v5::Packet::PubComp(v5::PubComp::new(*pkid, None)),
                Outgoing::SubAck(pkid, codes) => v5::Packet::SubAck(v5::SubAck {
                    pkid: *pkid,
                    return_codes: codes.iter().map(|&c| suback_code5(c)).collect(),
                    properties: None,
                }),
                Outgoing::UnsubAck(pkid, reasons) => v5::Packet::UnsubAck(v5::UnsubAck {
                    pkid: *pkid,
                    reasons: reasons.iter().map(|&r| unsuback_reason5(r)).collect(),
                    properties: None,
                }),
                Outgoing::PingResp => v5::Packet::PingResp(v5::PingResp),
                Outgoing::Disconnect(r) => {
                    // Written by hand: rumqttc 0.25 miscounts a DISCONNECT
                    // with a reason and no properties. Reason code plus an
                    // empty property length is the MQTT 5 §3.14.2 form every
                    // client parses.
                    buf.extend_from_slice(&[0xe0, 0x02, *r, 0x00]);
                    return Ok(());
                }
                Outgoing::Auth { reason, method } => return encode_auth(*reason, method, buf),
            };
            p.write(buf, None).map(|_| ()).map_err(|e| err(e.to_string()))
        }
    }
}

/// Encodes a CONNACK refusing an unsupported protocol level in the 3.1.1
/// form (the client's version is unknown; MQTT 3.1.1 §3.1.2.2 return code
/// 0x01, which MQTT 5 §3.1.2.2 also allows).
pub fn refuse_version(buf: &mut BytesMut) {
    let _ = encode(Version::V4, &Outgoing::ConnAck { session_present: false, code: 1, props: None }, buf);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v5_connect(id: &str) -> BytesMut {
        let mut b = BytesMut::new();
        let c = v5::Connect { keep_alive: 30, client_id: id.into(), clean_start: true, properties: None };
        v5::Packet::Connect(c, None, None).write(&mut b, None).unwrap();
        b
    }

    #[test]
    fn needs_more_bytes_is_none() {
        let full = v5_connect("abc");
        for cut in 0..full.len() {
            let mut part = BytesMut::from(&full[..cut]);
            assert_eq!(decode(&mut part, None, 1024), Ok(None), "cut at {cut}");
        }
        let mut b = full.clone();
        let Some(Packet::Connect(c)) = decode(&mut b, None, 1024).unwrap() else { panic!() };
        assert_eq!((c.version, c.client_id.as_str()), (Version::V5, "abc"));
        assert!(b.is_empty());
    }

    #[test]
    fn detects_v4_and_refuses_other_levels() {
        let mut b = BytesMut::new();
        v4::Packet::Connect(v4::Connect::new("x")).write(&mut b, 1024).unwrap();
        let Some(Packet::Connect(c)) = decode(&mut b.clone(), None, 1024).unwrap() else { panic!() };
        assert_eq!(c.version, Version::V4);
        // Patch the level byte (after the 2-byte fixed header and "MQTT").
        for level in [3u8, 6] {
            let mut p = b.clone();
            p[8] = level;
            assert_eq!(decode(&mut p, None, 1024), Err(CodecError::UnsupportedVersion(level)));
        }
    }

    #[test]
    fn oversize_is_refused_from_the_header() {
        // PUBLISH announcing 1 MiB remaining, with only the header present.
        let mut b = BytesMut::from(&[0x30u8, 0x80, 0x80, 0x40][..]);
        assert_eq!(decode(&mut b, Some(Version::V4), 4096), Err(CodecError::TooLarge { size: 1_048_580, max: 4096 }));
        let mut b = BytesMut::from(&[0x30u8, 0xff, 0xff, 0xff, 0xff, 0x01][..]);
        assert!(matches!(decode(&mut b, Some(Version::V4), 4096), Err(CodecError::Malformed(_))));
    }

    #[test]
    fn non_connect_first_and_second_connect() {
        let mut b = BytesMut::from(&[0xc0u8, 0x00][..]);
        assert!(matches!(decode(&mut b, None, 1024), Err(CodecError::NotConnect(_))));
        let mut b = v5_connect("a");
        assert_eq!(decode(&mut b, Some(Version::V5), 1024), Ok(Some(Packet::Unexpected("second CONNECT"))));
    }

    #[test]
    fn server_only_packets_are_unexpected_whatever_their_body() {
        // A 3.1.1-form CONNACK on MQTT 5 (no property length), an unknown
        // return code, a SUBACK without codes, an UNSUBACK, a PINGRESP with
        // a body: each one packet, consumed, then the next decodes.
        let cases: [(&[u8], &str); 5] = [
            (&[0x20, 0x02, 0x00, 0x00], "CONNACK"),
            (&[0x20, 0x03, 0x00, 0xFF, 0x00], "CONNACK"),
            (&[0x90, 0x02, 0x00, 0x01], "SUBACK"),
            (&[0xB0, 0x02, 0x00, 0x01], "UNSUBACK"),
            (&[0xD0, 0x01, 0x00], "PINGRESP"),
        ];
        for version in [Version::V4, Version::V5] {
            for (bytes, name) in cases {
                let mut b = BytesMut::from(bytes);
                b.extend_from_slice(&[0xC0, 0x00]);
                assert_eq!(decode(&mut b, Some(version), 1024), Ok(Some(Packet::Unexpected(name))), "{bytes:02x?}");
                assert_eq!(decode(&mut b, Some(version), 1024), Ok(Some(Packet::PingReq)), "{bytes:02x?}");
            }
        }
    }

    #[test]
    fn short_v5_disconnect_decodes() {
        let mut b = BytesMut::from(&[0xe0u8, 0x00, 0xe0, 0x01, 0x04][..]);
        assert_eq!(
            decode(&mut b, Some(Version::V5), 1024),
            Ok(Some(Packet::Disconnect { reason: 0, session_expiry: None }))
        );
        assert_eq!(
            decode(&mut b, Some(Version::V5), 1024),
            Ok(Some(Packet::Disconnect { reason: 4, session_expiry: None }))
        );
    }

    /// An AUTH packet from its reason and raw property bytes.
    fn auth_packet(byte1: u8, reason: u8, props: &[u8]) -> BytesMut {
        let mut body = vec![reason];
        push_varint(props.len(), &mut body);
        body.extend_from_slice(props);
        let mut b = BytesMut::from(&[byte1][..]);
        let mut len = Vec::new();
        push_varint(body.len(), &mut len);
        b.extend_from_slice(&len);
        b.extend_from_slice(&body);
        b
    }

    fn prop(id: u8, value: &[u8]) -> Vec<u8> {
        let mut v = vec![id];
        v.extend_from_slice(&(value.len() as u16).to_be_bytes());
        v.extend_from_slice(value);
        v
    }

    #[test]
    fn auth_decodes_and_round_trips() {
        let mut props = prop(0x15, b"jwt");
        props.extend(prop(0x16, b"a.b.c"));
        props.extend(prop(0x1F, b"why"));
        props.extend(prop(0x26, b"k"));
        props.extend_from_slice(&[0x00, 0x01, b'v']);
        let mut b = auth_packet(0xF0, 0x19, &props);
        let want = Auth { reason: 0x19, method: Some("jwt".into()), data: Some(Bytes::from_static(b"a.b.c")) };
        assert_eq!(decode(&mut b, Some(Version::V5), 1024), Ok(Some(Packet::Auth(want))));
        assert!(b.is_empty());
        // Short forms: no properties; no reason either (= 0x00).
        let mut b = BytesMut::from(&[0xF0u8, 0x01, 0x18, 0xF0, 0x00][..]);
        let cont = Auth { reason: 0x18, method: None, data: None };
        assert_eq!(decode(&mut b, Some(Version::V5), 1024), Ok(Some(Packet::Auth(cont))));
        let ok = Auth { reason: 0x00, method: None, data: None };
        assert_eq!(decode(&mut b, Some(Version::V5), 1024), Ok(Some(Packet::Auth(ok))));
        // What the server sends decodes to what it meant.
        let mut b = BytesMut::new();
        encode(Version::V5, &Outgoing::Auth { reason: 0x00, method: "jwt".into() }, &mut b).unwrap();
        let back = Auth { reason: 0x00, method: Some("jwt".into()), data: None };
        assert_eq!(decode(&mut b, Some(Version::V5), 1024), Ok(Some(Packet::Auth(back))));
        let mut b = BytesMut::new();
        encode(Version::V4, &Outgoing::Auth { reason: 0x00, method: "jwt".into() }, &mut b).unwrap();
        assert!(b.is_empty(), "3.1.1 has no AUTH");
    }

    #[test]
    fn bad_auth_packets_are_malformed() {
        let method = prop(0x15, b"jwt");
        let twice = [method.clone(), method.clone()].concat();
        let cases: Vec<(&str, BytesMut)> = vec![
            ("reserved flags", auth_packet(0xF1, 0x19, &method)),
            ("unknown reason", auth_packet(0xF0, 0x20, &method)),
            ("two methods", auth_packet(0xF0, 0x19, &twice)),
            ("property not allowed in AUTH", auth_packet(0xF0, 0x19, &[0x01, 0x01])),
            ("truncated string", auth_packet(0xF0, 0x19, &method[..3])),
            ("method not UTF-8", auth_packet(0xF0, 0x19, &prop(0x15, b"\xff"))),
            ("property length past the end", BytesMut::from(&[0xF0u8, 0x03, 0x19, 0x05, 0x15][..])),
        ];
        for (case, mut b) in cases {
            assert!(matches!(decode(&mut b, Some(Version::V5), 1024), Err(CodecError::Malformed(_))), "{case}");
        }
    }

    #[test]
    fn connect_carries_the_authentication_method_and_data() {
        let mut b = BytesMut::new();
        let props = v5::ConnectProperties {
            authentication_method: Some("jwt".into()),
            authentication_data: Some(Bytes::from_static(b"tok")),
            ..v5::ConnectProperties::new()
        };
        let c = v5::Connect { keep_alive: 30, client_id: "a".into(), clean_start: true, properties: Some(props) };
        v5::Packet::Connect(c, None, None).write(&mut b, None).unwrap();
        let Some(Packet::Connect(c)) = decode(&mut b, None, 1024).unwrap() else { panic!() };
        assert_eq!((c.auth_method.as_deref(), c.auth_data.as_deref()), (Some("jwt"), Some(&b"tok"[..])));
    }

    #[test]
    fn encodes_both_versions() {
        let mut b = BytesMut::new();
        encode(Version::V4, &Outgoing::SubAck(7, vec![1, 0x80]), &mut b).unwrap();
        assert_eq!(&b[..], &[0x90, 0x04, 0x00, 0x07, 0x01, 0x80]);
        let mut b = BytesMut::new();
        encode(Version::V4, &Outgoing::Disconnect(0x8e), &mut b).unwrap();
        assert!(b.is_empty(), "3.1.1 has no server DISCONNECT");
        let mut b = BytesMut::new();
        encode(Version::V5, &Outgoing::Disconnect(0x8e), &mut b).unwrap();
        assert_eq!(b[0], 0xe0);
        assert!(b.contains(&0x8e));
        let p = Publish { qos: 1, pkid: 3, topic: Bytes::from_static(b"a/b"), ..Default::default() };
        let mut b = BytesMut::new();
        encode(Version::V5, &Outgoing::Publish(p.clone()), &mut b).unwrap();
        assert_eq!(b.len(), publish_size(Version::V5, &p));
        let Some(Packet::Publish(back)) = decode(&mut b, Some(Version::V5), 1024).unwrap() else { panic!() };
        assert_eq!(back, p);
    }
}
