//! The bench payload: scheduled send time, publisher id and sequence,
//! padded to the requested size.
//!
//! The payload is printable ASCII on purpose, so it travels unchanged over
//! every protocol: WebSocket (protobuf) and MQTT carry the bytes as they are,
//! SSE and long polling carry them in the JSON `text` field (not `data_b64`),
//! and no protocol pays a base64 cost the others do not. It is never valid
//! JSON (it starts with `SB1:`), so the gateway never inlines it as `data`.
//!
//! Layout (fixed width, lowercase hex):
//! `SB1:<sched_ns:16>:<publisher:8>:<seq:16>:` then `.` up to the size.
//! This module does no I/O and reads no clock.

/// Bytes before the padding; the smallest payload the bench sends.
pub const HEADER_LEN: usize = 4 + 16 + 1 + 8 + 1 + 16 + 1;

const MAGIC: &[u8; 4] = b"SB1:";

/// What a bench payload carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// When the message was scheduled to be sent, ns since the bench epoch.
    pub sched_ns: u64,
    /// Which publisher sent it.
    pub publisher: u32,
    /// Sequence of this message among the publisher's messages on its channel.
    pub seq: u64,
}

/// The payload size actually used for a requested `--size`.
pub fn effective_size(requested: usize) -> usize {
    requested.max(HEADER_LEN)
}

fn put_hex(out: &mut Vec<u8>, v: u64, digits: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for i in (0..digits).rev() {
        out.push(HEX[((v >> (i * 4)) & 0xf) as usize]);
    }
}

/// Encodes `stamp` padded with `.` to `effective_size(size)` bytes.
pub fn encode(stamp: Stamp, size: usize) -> Vec<u8> {
    let size = effective_size(size);
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(MAGIC);
    put_hex(&mut out, stamp.sched_ns, 16);
    out.push(b':');
    put_hex(&mut out, u64::from(stamp.publisher), 8);
    out.push(b':');
    put_hex(&mut out, stamp.seq, 16);
    out.push(b':');
    out.resize(size, b'.');
    out
}

fn hex_field(bytes: &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for &b in bytes {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            _ => return None,
        };
        v = (v << 4) | u64::from(d);
    }
    Some(v)
}

/// Decodes a payload; `None` for anything the bench did not send.
pub fn decode(bytes: &[u8]) -> Option<Stamp> {
    if bytes.len() < HEADER_LEN || &bytes[..4] != MAGIC || bytes[20] != b':' || bytes[29] != b':' || bytes[46] != b':' {
        return None;
    }
    Some(Stamp {
        sched_ns: hex_field(&bytes[4..20])?,
        publisher: u32::try_from(hex_field(&bytes[21..29])?).ok()?,
        seq: hex_field(&bytes[30..46])?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_at_several_sizes() {
        let s = Stamp { sched_ns: 0x0123_4567_89ab_cdef, publisher: 7, seq: u64::MAX };
        for size in [0, 10, HEADER_LEN, 100, 4096] {
            let p = encode(s, size);
            assert_eq!(p.len(), effective_size(size));
            assert!(p.iter().all(u8::is_ascii_graphic), "payload stays printable ASCII");
            assert_eq!(decode(&p), Some(s));
        }
    }

    #[test]
    fn is_not_json_and_rejects_foreign_payloads() {
        let p = encode(Stamp { sched_ns: 1, publisher: 0, seq: 0 }, 64);
        assert!(serde_json::from_slice::<serde_json::Value>(&p).is_err());
        assert_eq!(decode(b"hello"), None);
        assert_eq!(decode(&p[..HEADER_LEN - 1]), None);
        let mut bad = p.clone();
        bad[5] = b'G';
        assert_eq!(decode(&bad), None);
    }
}
