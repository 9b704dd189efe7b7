//! Length-delimited frames, as on every WebTransport stream of a session.
//!
//! A frame is a varint length (unsigned LEB128, 1..=10 bytes: what prost's
//! `encode_length_delimited` writes) followed by that many bytes of one
//! protobuf message (`ClientFrame` client to server, `ServerFrame` server to
//! client). A zero-length frame is a valid, empty message.
//!
//! Pure: no I/O, no async. [`split_frame`] takes bytes as they arrive and
//! answers `Ok(None)` until a whole frame is there; a length above the limit
//! is refused as soon as its prefix is complete, before any body is
//! buffered.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Longest varint prefix (a u64).
pub const MAX_PREFIX_LEN: usize = 10;

/// Why a stream's bytes cannot be split into frames. Both end the stream's
/// framing: nothing after them can be trusted to start a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length prefix is not a varint of at most 64 bits.
    #[error("malformed frame length prefix")]
    BadPrefix,
    /// The announced length is above the limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Announced length.
        len: u64,
        /// The limit.
        max: usize,
    },
}

/// Reads a varint prefix from the start of `buf`: `Ok(None)` if it is not
/// complete yet, else its value and length.
fn read_prefix(buf: &[u8]) -> Result<Option<(u64, usize)>, FrameError> {
    let mut value = 0u64;
    for (i, &b) in buf.iter().take(MAX_PREFIX_LEN).enumerate() {
        let bits = u64::from(b & 0x7f);
        // The tenth byte may only carry the top bit of a u64.
        if i == MAX_PREFIX_LEN - 1 && b > 1 {
            return Err(FrameError::BadPrefix);
        }
        value |= bits << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    if buf.len() >= MAX_PREFIX_LEN { Err(FrameError::BadPrefix) } else { Ok(None) }
}

/// Splits the next whole frame's body off the front of `buf`. `Ok(None)`:
/// more bytes are needed (nothing is consumed).
pub fn split_frame(buf: &mut BytesMut, max: usize) -> Result<Option<Bytes>, FrameError> {
    let Some((len, prefix)) = read_prefix(buf)? else { return Ok(None) };
    if len > max as u64 {
        return Err(FrameError::TooLarge { len, max });
    }
    // `len <= max`, a usize.
    let len = len as usize;
    let have = buf.len() - prefix;
    if have < len {
        // Reserve once for the rest of the frame rather than growing per
        // chunk (`len` is at most `max`, a configured limit).
        buf.reserve(len - have);
        return Ok(None);
    }
    buf.advance(prefix);
    Ok(Some(buf.split_to(len).freeze()))
}

/// Appends `body` as one frame (prefix, then the bytes) to `out`.
pub fn put_frame(out: &mut BytesMut, body: &[u8]) {
    let mut len = body.len() as u64;
    while len >= 0x80 {
        out.put_u8((len as u8) | 0x80);
        len >>= 7;
    }
    out.put_u8(len as u8);
    out.put_slice(body);
}

/// Bytes [`put_frame`] adds for `body_len` bytes of body.
pub fn framed_len(body_len: usize) -> usize {
    let bits = usize::BITS - (body_len | 1).leading_zeros();
    bits.div_ceil(7) as usize + body_len
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;
    use switchboard_proto as proto;

    #[test]
    fn matches_prost_length_delimited() {
        for len in [0usize, 1, 127, 128, 300, 16_383, 16_384, 70_000] {
            let body = vec![7u8; len];
            let mut ours = BytesMut::new();
            put_frame(&mut ours, &body);
            assert_eq!(ours.len(), framed_len(len), "{len}");
            let mut want = Vec::new();
            prost::encoding::encode_varint(len as u64, &mut want);
            want.extend_from_slice(&body);
            assert_eq!(&ours[..], &want[..], "{len}");
        }
        let frame = proto::ClientFrame { req: 9, frame: Some(proto::client_frame::Frame::Ping(proto::Ping {})) };
        let mut buf = BytesMut::from(&frame.encode_length_delimited_to_vec()[..]);
        let body = split_frame(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(proto::ClientFrame::decode(body).unwrap(), frame);
        assert!(buf.is_empty());
    }

    #[test]
    fn partial_input_waits_byte_by_byte() {
        let mut whole = BytesMut::new();
        put_frame(&mut whole, &[1u8; 200]);
        put_frame(&mut whole, b"");
        put_frame(&mut whole, b"ab");
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in whole.iter() {
            buf.put_u8(*b);
            while let Some(f) = split_frame(&mut buf, 1024).unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got.iter().map(Bytes::len).collect::<Vec<_>>(), vec![200, 0, 2]);
        assert!(buf.is_empty());
    }

    #[test]
    fn oversize_is_refused_from_the_prefix_alone() {
        let mut buf = BytesMut::new();
        prost::encoding::encode_varint(1_000_000, &mut buf);
        assert_eq!(split_frame(&mut buf, 1024), Err(FrameError::TooLarge { len: 1_000_000, max: 1024 }));
        let mut exact = BytesMut::new();
        put_frame(&mut exact, &[0u8; 1024]);
        assert_eq!(split_frame(&mut exact, 1024).unwrap().map(|b| b.len()), Some(1024));
    }

    #[test]
    fn malformed_prefixes_are_refused() {
        let mut eleven = BytesMut::from(&[0xffu8; 11][..]);
        assert_eq!(split_frame(&mut eleven, usize::MAX), Err(FrameError::BadPrefix));
        // Ten bytes whose last carries more than a u64's top bit.
        let mut overflow = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02][..]);
        assert_eq!(split_frame(&mut overflow, usize::MAX), Err(FrameError::BadPrefix));
        // Nine continuation bytes are merely incomplete.
        let mut nine = BytesMut::from(&[0x80u8; 9][..]);
        assert_eq!(split_frame(&mut nine, 10), Ok(None));
        // u64::MAX is a valid prefix, refused by size.
        let mut max = BytesMut::new();
        prost::encoding::encode_varint(u64::MAX, &mut max);
        assert!(matches!(split_frame(&mut max, 1 << 30), Err(FrameError::TooLarge { .. })));
    }
}
