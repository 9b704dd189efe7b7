//! The MQTT rules this front end applies, as pure functions: which topics and
//! filters are valid, how a PUBLISH becomes the core's publish request, and
//! the tables from core refusals to MQTT reason and return codes.

use super::*;
use switchboard_proto::topic::is_reserved;

/// Validates a topic name for PUBLISH (MQTT 3.1.1 §4.7.3, MQTT 5 §4.7.3,
/// and the gateway's reserved first levels `$SYS`, `$share`, `$presence`:
/// [`is_reserved`]). `$presence/<channel>` is allowed: it is how MQTT
/// clients enter presence. Other `$` topics (`$aws/things/1`) are ordinary
/// channels.
pub(crate) fn topic_error(topic: &str) -> Option<&'static str> {
    if topic.is_empty() {
        return Some("empty topic");
    }
    if topic.contains(['+', '#']) {
        return Some("wildcard in a topic name");
    }
    if topic.contains('\0') {
        return Some("NUL in a topic name");
    }
    if is_reserved(topic) && presence_target(topic).is_none() {
        return Some("topics under $SYS, $share and $presence are reserved");
    }
    None
}

/// The channel of a `$presence/<channel>` topic.
pub(crate) fn presence_target(topic: &str) -> Option<&str> {
    topic.strip_prefix("$presence/").filter(|c| !c.is_empty() && !is_reserved(c))
}

/// Validates a subscription filter (MQTT 3.1.1 §4.7.1, MQTT 5 §4.7.1 and
/// §4.8.2 for `$share/{group}/{filter}`).
pub(crate) fn valid_filter(filter: &str) -> bool {
    let inner = match filter.strip_prefix("$share/") {
        Some(rest) => match rest.split_once('/') {
            Some((group, inner)) if !group.is_empty() && !group.contains(['+', '#']) => inner,
            _ => return false,
        },
        None => filter,
    };
    if inner.is_empty() || inner.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = inner.split('/').collect();
    levels.iter().enumerate().all(|(i, l)| match *l {
        "#" => i == levels.len() - 1,
        "+" => true,
        l => !l.contains(['+', '#']),
    })
}

/// SUBACK code for a core refusal.
pub(crate) fn suback_code(version: Version, code: ErrorCode) -> u8 {
    let r = match code {
        ErrorCode::InvalidFilter | ErrorCode::InvalidChannel => reason::TOPIC_FILTER_INVALID,
        // A reserved `$` filter is refused to everyone: not authorized.
        ErrorCode::PermissionDenied | ErrorCode::Unauthorized | ErrorCode::ReservedChannel => reason::NOT_AUTHORIZED,
        ErrorCode::TooManySubscriptions | ErrorCode::RateLimited => reason::QUOTA_EXCEEDED,
        _ => reason::UNSPECIFIED,
    };
    // 3.1.1 has one failure code (§3.9.3).
    if version == Version::V4 { 0x80 } else { r }
}

/// PUBACK/PUBREC reason for a core refusal.
pub(crate) fn publish_reason(code: ErrorCode) -> u8 {
    match code {
        ErrorCode::InvalidChannel | ErrorCode::ReservedChannel => reason::TOPIC_NAME_INVALID,
        ErrorCode::PermissionDenied | ErrorCode::Unauthorized | ErrorCode::NoIdentity => reason::NOT_AUTHORIZED,
        ErrorCode::RateLimited | ErrorCode::MessageTooLarge => reason::QUOTA_EXCEEDED,
        _ => reason::UNSPECIFIED,
    }
}

/// CONNACK code for a refused `open`: (3.1.1 return code, MQTT 5 reason).
pub(crate) fn connack_refusal(code: ErrorCode) -> (u8, u8) {
    match code {
        ErrorCode::Unauthorized => (4, 0x86),
        ErrorCode::PermissionDenied => (5, reason::NOT_AUTHORIZED),
        ErrorCode::RateLimited => (3, 0x9F),
        ErrorCode::Unavailable => (3, reason::SERVER_UNAVAILABLE),
        _ => (3, reason::UNSPECIFIED),
    }
}

/// DISCONNECT reason for a close decided by the core.
pub(crate) fn close_reason(r: CloseReason) -> u8 {
    if r == CloseReason::SLOW {
        reason::QUOTA_EXCEEDED
    } else if r == CloseReason::SHUTDOWN {
        reason::SHUTTING_DOWN
    } else if r == CloseReason::KICKED {
        reason::ADMINISTRATIVE_ACTION
    } else if r == CloseReason::UNAUTHORIZED {
        reason::NOT_AUTHORIZED
    } else if r == CloseReason::TOKEN_EXPIRED {
        // MQTT 5 §3.14.2.1: 0xA0 Maximum connect time — the connection
        // outlived what the server allows (its token's expiry).
        reason::MAXIMUM_CONNECT_TIME
    } else {
        reason::UNSPECIFIED
    }
}

/// User properties as headers: a repeated key keeps its last value (the
/// envelope's headers are a map).
pub(crate) fn headers_of(props: &[(String, String)]) -> BTreeMap<String, String> {
    props.iter().cloned().collect()
}

/// The decode-and-translate step of an inbound PUBLISH, as one pure
/// function (also the fuzz target's entry point): the topic (already
/// resolved from a topic alias) must be valid UTF-8 and a valid topic name,
/// and the packet becomes the core's publish request.
pub fn translate_publish(topic: &[u8], p: &codec::Publish) -> Result<proto::Publish, &'static str> {
    let topic = std::str::from_utf8(topic).map_err(|_| "topic is not UTF-8")?;
    if let Some(why) = topic_error(topic) {
        return Err(why);
    }
    if p.props.payload_utf8 && std::str::from_utf8(&p.payload).is_err() {
        return Err("payload format indicator says UTF-8, payload is not");
    }
    Ok(publish_request(topic.to_string(), p))
}

pub(crate) fn publish_request(topic: String, p: &codec::Publish) -> proto::Publish {
    let props = &p.props;
    proto::Publish {
        channel: topic,
        payload: p.payload.clone(),
        id: props.user_properties.iter().rev().find(|(k, _)| k == "id").map(|(_, v)| v.clone()).unwrap_or_default(),
        content_type: props.content_type.clone().unwrap_or_default(),
        headers: headers_of(&props.user_properties),
        retain: p.retain,
        qos: Some(u32::from(p.qos)),
        message_expiry: props.message_expiry.unwrap_or(0),
        response_topic: props.response_topic.clone().unwrap_or_default(),
        correlation_data: props.correlation_data.clone().unwrap_or_default(),
        payload_utf8: props.payload_utf8,
    }
}
