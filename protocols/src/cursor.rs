//! The stream cursor: one compact, URL-safe token naming a position in every
//! channel of an SSE stream or a long-poll subscription.
//!
//! SSE sends it as each event's `id:`, so a browser's automatic reconnect
//! (`Last-Event-ID`) resumes every channel of the stream with no client code;
//! long polling returns it in each response and takes it back on the next
//! poll. It is self-contained: the gateway resumes from it on any
//! connection, with no server-side state.
//!
//! # Format (version 1)
//!
//! base64url without padding of:
//!
//! | bytes | field |
//! |---|---|
//! | 1 | version, `1` |
//! | varint | `since`: Unix ms when the stream first subscribed. Channels matching the stream's filters but absent from the cursor (never delivered) are replayed from history from this time on resume |
//! | varint | number of channels *n* |
//! | *n* × | varint name length, name (UTF-8), 1 byte epoch length, epoch, varint serial |
//! | 4 | FNV-1a 32-bit checksum of everything before it, big-endian |
//!
//! Varints are LEB128 (7 bits a byte, low first). Channels are sorted by name
//! so equal positions give equal cursors. The checksum catches truncated or
//! altered cursors; it is not a signature — a cursor grants nothing, and every
//! position in it is validated like any other position.

use std::collections::BTreeMap;

use base64::Engine as _;

const VERSION: u8 = 1;

/// Largest encoded cursor accepted or produced, in characters. Keeps
/// `Last-Event-ID` and query strings well under common header limits.
pub const MAX_CURSOR_LEN: usize = 4096;

/// A channel's position inside a cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelPos {
    /// Channel epoch.
    pub epoch: String,
    /// Last serial delivered.
    pub serial: u64,
}

/// Positions of every channel a stream has delivered from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Cursor {
    /// Unix ms when the stream first subscribed.
    pub since_ms: u64,
    /// Per channel, the last position delivered.
    pub channels: BTreeMap<String, ChannelPos>,
}

/// Why a cursor was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CursorError {
    /// Not base64url.
    #[error("cursor is not base64url")]
    Encoding,
    /// Ends early, bad lengths, bad UTF-8.
    #[error("cursor is truncated or malformed")]
    Malformed,
    /// Unknown version byte.
    #[error("cursor version {0} is not supported")]
    Version(u8),
    /// Checksum mismatch: altered or corrupted.
    #[error("cursor checksum does not match (altered or corrupted)")]
    Checksum,
    /// Longer than [`MAX_CURSOR_LEN`].
    #[error("cursor longer than {MAX_CURSOR_LEN} characters")]
    TooLong,
}

fn fnv1a(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Result<u8, CursorError> {
        let (b, rest) = self.buf.split_first().ok_or(CursorError::Malformed)?;
        self.buf = rest;
        Ok(*b)
    }

    fn varint(&mut self) -> Result<u64, CursorError> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(CursorError::Malformed)
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], CursorError> {
        if n > self.buf.len() {
            return Err(CursorError::Malformed);
        }
        let (b, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(b)
    }

    fn string(&mut self, n: usize) -> Result<String, CursorError> {
        std::str::from_utf8(self.bytes(n)?).map(str::to_string).map_err(|_| CursorError::Malformed)
    }
}

impl Cursor {
    /// A cursor for a stream that subscribed at `since_ms`.
    pub fn new(since_ms: u64) -> Self {
        Cursor { since_ms, channels: BTreeMap::new() }
    }

    /// Records a delivered position.
    pub fn advance(&mut self, channel: &str, epoch: &str, serial: u64) {
        match self.channels.get_mut(channel) {
            Some(p) => {
                if p.epoch != epoch {
                    p.epoch = epoch.to_string();
                }
                p.serial = serial;
            }
            None => {
                self.channels.insert(channel.to_string(), ChannelPos { epoch: epoch.to_string(), serial });
            }
        }
    }

    /// Records a channel's position at subscribe time, once the stream has
    /// been given everything up to it: moves the channel forward (never
    /// back, never across epochs). A channel with no message yet (serial 0)
    /// stays out, so it keeps resuming by time: whatever it gets later is
    /// after the subscribe, even if the channel is dropped and comes back
    /// under a new epoch meanwhile.
    pub fn seed(&mut self, channel: &str, epoch: &str, serial: u64) {
        if serial == 0 {
            return;
        }
        match self.channels.get(channel) {
            Some(p) if p.epoch != epoch || p.serial >= serial => {}
            _ => self.advance(channel, epoch, serial),
        }
    }

    /// The token (base64url, no padding).
    pub fn encode(&self) -> String {
        let mut raw = Vec::with_capacity(16 + self.channels.len() * 24);
        raw.push(VERSION);
        put_varint(&mut raw, self.since_ms);
        put_varint(&mut raw, self.channels.len() as u64);
        for (name, pos) in &self.channels {
            put_varint(&mut raw, name.len() as u64);
            raw.extend_from_slice(name.as_bytes());
            // Epochs are short ASCII ids; longer ones are cut to keep the
            // one-byte length honest (never happens with gateway epochs).
            let epoch = &pos.epoch.as_bytes()[..pos.epoch.len().min(255)];
            raw.push(epoch.len() as u8);
            raw.extend_from_slice(epoch);
            put_varint(&mut raw, pos.serial);
        }
        let sum = fnv1a(&raw);
        raw.extend_from_slice(&sum.to_be_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    }

    /// Length of [`Cursor::encode`]'s output, without encoding.
    pub fn encoded_len(&self) -> usize {
        let varint_len = |v: u64| (64 - v.max(1).leading_zeros() as usize).div_ceil(7).max(1);
        let mut n = 1 + varint_len(self.since_ms) + varint_len(self.channels.len() as u64) + 4;
        for (name, pos) in &self.channels {
            n += varint_len(name.len() as u64) + name.len() + 1 + pos.epoch.len().min(255) + varint_len(pos.serial);
        }
        (n * 4).div_ceil(3)
    }

    /// Parses a token.
    pub fn decode(token: &str) -> Result<Cursor, CursorError> {
        if token.len() > MAX_CURSOR_LEN {
            return Err(CursorError::TooLong);
        }
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token).map_err(|_| CursorError::Encoding)?;
        if raw.len() < 5 {
            return Err(CursorError::Malformed);
        }
        let (body, sum) = raw.split_at(raw.len() - 4);
        let mut r = Reader { buf: body };
        let version = r.byte()?;
        if version != VERSION {
            return Err(CursorError::Version(version));
        }
        if u32::from_be_bytes([sum[0], sum[1], sum[2], sum[3]]) != fnv1a(body) {
            return Err(CursorError::Checksum);
        }
        let since_ms = r.varint()?;
        let n = r.varint()?;
        // Each entry takes at least 3 bytes: a count above that is a lie.
        if n > (body.len() / 3) as u64 {
            return Err(CursorError::Malformed);
        }
        let mut channels = BTreeMap::new();
        for _ in 0..n {
            let len = r.varint()? as usize;
            let name = r.string(len)?;
            let elen = r.byte()? as usize;
            let epoch = r.string(elen)?;
            let serial = r.varint()?;
            channels.insert(name, ChannelPos { epoch, serial });
        }
        if !r.buf.is_empty() {
            return Err(CursorError::Malformed);
        }
        Ok(Cursor { since_ms, channels })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Cursor {
        let mut c = Cursor::new(1_764_345_600_000);
        c.advance("chat/lobby", "k3x9q0a1zz", 42);
        c.advance("sensors/1/temp", "a0b1c2d3e4", 300);
        c.advance("$presence/chat/lobby", "zz00zz00zz", 7);
        c
    }

    #[test]
    fn round_trip_and_url_safe() {
        let c = sample();
        let t = c.encode();
        assert!(t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "{t}");
        assert_eq!(t.len(), c.encoded_len());
        assert_eq!(Cursor::decode(&t).unwrap(), c);
        let empty = Cursor::new(0);
        assert_eq!(Cursor::decode(&empty.encode()).unwrap(), empty);
        assert_eq!(empty.encode().len(), empty.encoded_len());
    }

    #[test]
    fn advance_updates_in_place() {
        let mut c = sample();
        c.advance("chat/lobby", "k3x9q0a1zz", 43);
        c.advance("chat/lobby", "newepoch00", 1);
        assert_eq!(c.channels["chat/lobby"], ChannelPos { epoch: "newepoch00".into(), serial: 1 });
        assert_eq!(c.channels.len(), 3);
    }

    #[test]
    fn seeding_only_moves_forward_within_an_epoch() {
        let mut c = Cursor::new(9);
        c.seed("empty", "E", 0);
        assert!(!c.channels.contains_key("empty"), "a channel with no message resumes by time");
        c.seed("a", "E", 4);
        assert_eq!(c.channels["a"], ChannelPos { epoch: "E".into(), serial: 4 });
        c.seed("a", "E", 2);
        assert_eq!(c.channels["a"].serial, 4, "never back");
        c.seed("a", "F", 7);
        assert_eq!(c.channels["a"], ChannelPos { epoch: "E".into(), serial: 4 }, "never across epochs");
        c.seed("a", "E", 6);
        assert_eq!(c.channels["a"].serial, 6);
    }

    #[test]
    fn tampering_is_detected() {
        let t = sample().encode();
        let mut raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(&t).unwrap();
        for i in 1..raw.len() {
            raw[i] ^= 0x01;
            let bad = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw);
            assert!(Cursor::decode(&bad).is_err(), "flipped byte {i} accepted");
            raw[i] ^= 0x01;
        }
        assert_eq!(Cursor::decode("!!!"), Err(CursorError::Encoding));
        assert_eq!(Cursor::decode(""), Err(CursorError::Malformed));
        assert!(Cursor::decode(&t[..t.len() - 3]).is_err());
        assert_eq!(Cursor::decode(&"A".repeat(MAX_CURSOR_LEN + 1)), Err(CursorError::TooLong));
        raw[0] = 9;
        let v9 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw);
        assert_eq!(Cursor::decode(&v9), Err(CursorError::Version(9)));
    }

    #[test]
    fn hostile_counts_do_not_allocate() {
        // version, since=0, n = 2^62 (varint), no entries, valid checksum.
        let mut raw = vec![VERSION, 0];
        put_varint(&mut raw, 1 << 62);
        let sum = fnv1a(&raw);
        raw.extend_from_slice(&sum.to_be_bytes());
        let t = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw);
        assert_eq!(Cursor::decode(&t), Err(CursorError::Malformed));
    }

    #[test]
    fn varint_edges() {
        for v in [0u64, 1, 127, 128, 16_383, 16_384, u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(Reader { buf: &out }.varint().unwrap(), v);
        }
    }
}
