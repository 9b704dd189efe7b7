//! The WebSocket frame layer (`protocols::ws_frames`), both directions.
//!
//! Decoder: client bytes (the first byte picks deflate and context
//! takeover, the second how the bytes are cut into pieces) through
//! `Inbound`: never a panic; the outcome does not depend on how the bytes
//! were cut; what goes up to tungstenite is well-formed: a fresh decoder
//! without deflate accepts it as it is (masked frames, no RSV bit, valid
//! UTF-8 in text messages, no frame above the limit).
//!
//! Encoder round trip: the rest, split into messages at 0xff bytes, sent as
//! server frames (text when UTF-8, else binary) through `Outbound`: every
//! message inflates back to itself, with or without context takeover.
#![no_main]

use bytes::{BufMut, BytesMut};
use flate2::{Decompress, FlushDecompress};
use libfuzzer_sys::fuzz_target;
use switchboard_protocols::ws_frames::{Deflate, FrameError, Inbound, Outbound};

/// A small limit, so oversize frames and bombs are reached too.
const MAX: usize = 4096;

fn decode(deflate: Option<Deflate>, data: &[u8], step: usize) -> (BytesMut, Result<(), FrameError>) {
    let mut d = Inbound::new(deflate, MAX);
    let mut up = BytesMut::new();
    for piece in data.chunks(step.max(1)) {
        if let Err(e) = d.decode(piece, &mut up) {
            return (up, Err(e));
        }
    }
    (up, Ok(()))
}

/// A server frame as tungstenite writes it: final, unmasked.
fn server_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.push(0x80 | opcode);
    match payload.len() {
        n @ 0..=125 => out.push(n as u8),
        n @ 126..=0xffff => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}

/// Frames on the wire: (first byte, payload).
fn frames(mut b: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut v = Vec::new();
    while !b.is_empty() {
        assert_eq!(b[1] & 0x80, 0, "server frames are unmasked");
        let (len, at) = match b[1] & 0x7f {
            126 => (usize::from(u16::from_be_bytes([b[2], b[3]])), 4),
            127 => (u64::from_be_bytes(b[2..10].try_into().expect("8 bytes")) as usize, 10),
            n => (usize::from(n), 2),
        };
        v.push((b[0], b[at..at + len].to_vec()));
        b = &b[at + len..];
    }
    v
}

fn inflate(d: &mut Decompress, payload: &[u8]) -> Vec<u8> {
    let input = [payload, &[0, 0, 0xff, 0xff]].concat();
    let mut out = Vec::with_capacity(input.len() * 4 + 64);
    let start = d.total_in();
    loop {
        let at = (d.total_in() - start) as usize;
        d.decompress_vec(&input[at..], &mut out, FlushDecompress::Sync).expect("our own output inflates");
        if (d.total_in() - start) as usize == input.len() && out.len() < out.capacity() {
            return out;
        }
        out.reserve(out.capacity());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let Some((&step, rest)) = rest.split_first() else { return };
    let deflate = (flags & 1 != 0).then_some(Deflate {
        server_context_takeover: flags & 2 != 0,
        client_context_takeover: flags & 4 != 0,
        min_size: usize::from(flags >> 3),
    });

    let (whole_up, whole) = decode(deflate, rest, rest.len());
    let (cut_up, cut) = decode(deflate, rest, usize::from(step));
    assert_eq!(whole.is_ok(), cut.is_ok(), "{whole:?} / {cut:?}");
    if whole.is_ok() {
        assert_eq!(whole_up, cut_up, "the output must not depend on how the bytes arrive");
        let (_, again) = decode(None, &whole_up, whole_up.len());
        assert_eq!(again, Ok(()), "what goes up is plain, well-formed frames");
    }

    let Some(deflate) = deflate else { return };
    let messages: Vec<&[u8]> = rest.split(|b| *b == 0xff).collect();
    let mut input = Vec::new();
    for m in &messages {
        server_frame(&mut input, if std::str::from_utf8(m).is_ok() { 1 } else { 2 }, m);
    }
    let mut e = Outbound::new(deflate);
    let mut wire = BytesMut::new();
    for piece in input.chunks(usize::from(step).max(1)) {
        e.encode(piece, &mut wire);
    }
    wire.put_slice(&[]);
    let sent = frames(&wire);
    assert_eq!(sent.len(), messages.len());
    let mut d = Decompress::new(false);
    for ((first, payload), m) in sent.iter().zip(&messages) {
        let plain = if first & 0x40 != 0 {
            assert!(m.len() >= deflate.min_size, "only messages of min_size or more are compressed");
            if !deflate.server_context_takeover {
                d.reset(false);
            }
            inflate(&mut d, payload)
        } else {
            assert!(m.len() < deflate.min_size);
            payload.clone()
        };
        assert_eq!(&plain[..], *m);
    }
});
