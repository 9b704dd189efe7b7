//! The WebSocket frame layer beneath tungstenite: permessage-deflate
//! (RFC 7692) and UTF-8 checked as the bytes arrive.
//!
//! tungstenite 0.28 has no permessage-deflate (it refuses any frame with
//! RSV1 set) and checks a text frame's UTF-8 only once the whole frame is
//! in, so a client could make the gateway buffer a megabyte of a message
//! that is invalid from its first bytes. [`FrameLayer`] sits between the upgraded socket and
//! tungstenite and reads the client's frames itself:
//!
//! - **Inbound.** Frames of uncompressed messages and control frames go up
//!   unchanged as they arrive. A message whose first frame has RSV1 set (once
//!   permessage-deflate was negotiated) is inflated as its bytes arrive
//!   (§7.2.2: the payloads, then `00 00 FF FF`) and handed up as plain
//!   masked frames of at most [`UP_FRAGMENT`] bytes, RSV1 clear: tungstenite
//!   never sees compression. The inflated size is counted while inflating,
//!   so a decompression bomb stops at the message limit, not at the
//!   allocator.
//! - **UTF-8.** The payload of every text message, compressed or not, is
//!   validated as it arrives (across fragments, and within a frame only
//!   partly received, keeping an incomplete trailing sequence for the next
//!   bytes): the first invalid byte fails the read at once.
//! - **Outbound** (only when negotiated). tungstenite's data frames of at
//!   least [`Deflate::min_size`] bytes are compressed (§7.2.1: sync flush,
//!   the trailing `00 00 FF FF` dropped) and sent with RSV1; smaller ones and
//!   control frames go out unchanged, which the RFC allows per message.
//!   Without server context takeover a payload compresses to the same bytes
//!   on every connection, so a delivery fanned out to many subscribers is
//!   compressed once: recently compressed payloads are kept node-wide
//!   (bounded: 64 entries, 4 MiB) and found by a cheap fingerprint, then
//!   compared in full.
//!
//! A violation is an `io::Error` of kind `InvalidData` wrapping a
//! [`FrameError`], which carries the close code; the front end maps it
//! ([`FrameError::of`]). After one, reads pass the raw socket through, so
//! a lingering close ([`crate::linger`]) can drain the rest.
//!
//! # Memory
//!
//! Nothing is allocated for compression until a message needs it. Without
//! context takeover (the default: the answer says
//! `server_no_context_takeover; client_no_context_takeover`, which RFC 7692
//! lets a server add unasked) each message is compressed or inflated on its
//! own, with a compressor or inflater borrowed from a small node-wide pool
//! and reset after it: an idle connection holds none, and negotiated
//! deflate costs a connection about what plain WebSocket does. With
//! [`DeflateConfig::context_takeover`] both sides keep their window between
//! messages (better ratios on chatty streams): about 230 KiB more per
//! connection once compressed messages went both ways. Measured numbers are
//! in docs/protocol.md.
//!
//! It deliberately does not: check what tungstenite checks anyway (control
//! frame lengths and FIN, close codes), fragment or reorder outbound
//! messages, or support a server window below 15 bits (the pure-Rust
//! `miniz_oxide` backend has none; [`negotiate`] declines such offers).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The extension's name in `Sec-WebSocket-Extensions`.
pub const PERMESSAGE_DEFLATE: &str = "permessage-deflate";

/// Largest frame the layer hands up for an inflated message: output is
/// handed up as it is produced, in pieces of this size, so the layer never
/// holds a whole inflated message (tungstenite assembles it, under its own
/// message limit).
pub const UP_FRAGMENT: usize = 16 * 1024;

/// The `[ws]` settings of permessage-deflate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeflateConfig {
    /// Accept a client's offer (default true).
    pub enabled: bool,
    /// Keep the compression context between messages, on both sides
    /// (default false: `server_no_context_takeover` and
    /// `client_no_context_takeover` are always answered, and no compressor
    /// or inflater outlives a message).
    pub context_takeover: bool,
    /// Outbound data messages smaller than this go uncompressed (default
    /// 256 bytes): on small frames deflate saves little and costs CPU.
    pub min_size: usize,
}

impl Default for DeflateConfig {
    fn default() -> Self {
        DeflateConfig { enabled: true, context_takeover: false, min_size: 256 }
    }
}

/// What one connection agreed to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deflate {
    /// The server keeps its compression context between messages.
    pub server_context_takeover: bool,
    /// The client may keep its context: the inflater lives as long as the
    /// connection.
    pub client_context_takeover: bool,
    /// Outbound data messages smaller than this go uncompressed.
    pub min_size: usize,
}

/// Picks the first acceptable permessage-deflate offer among the values of
/// the request's `Sec-WebSocket-Extensions` headers and returns the agreed
/// parameters with the response header's value. `None`: no offer, deflate
/// disabled, or every offer declined.
///
/// With context takeover off (the default), every answer says
/// `server_no_context_takeover; client_no_context_takeover`; with it on,
/// only what the client asked for.
///
/// | offer | answer (context takeover off / on) |
/// |---|---|
/// | `permessage-deflate` | `permessage-deflate; server_no_context_takeover; client_no_context_takeover` / `permessage-deflate` |
/// | `permessage-deflate; client_max_window_bits` (browsers) | the same: any client window inflates |
/// | `permessage-deflate; client_no_context_takeover` | `...; server_no_context_takeover; client_no_context_takeover` / `permessage-deflate; client_no_context_takeover` |
/// | `permessage-deflate; server_max_window_bits=15` | accepted |
/// | `permessage-deflate; server_max_window_bits=10` | declined (no window below 15 bits), next offer tried |
/// | unknown, repeated or malformed parameter, bad value | declined |
/// | `x-webkit-deflate-frame`, other extensions | ignored |
pub fn negotiate(headers: &[&str], cfg: &DeflateConfig) -> Option<(Deflate, String)> {
    if !cfg.enabled {
        return None;
    }
    headers.iter().flat_map(|h| h.split(',')).find_map(|offer| accept_offer(offer, cfg))
}

/// One offer: `permessage-deflate; name[=value]; ...`.
fn accept_offer(offer: &str, cfg: &DeflateConfig) -> Option<(Deflate, String)> {
    let mut parts = offer.split(';');
    if !parts.next()?.trim().eq_ignore_ascii_case(PERMESSAGE_DEFLATE) {
        return None;
    }
    let (mut server_nct, mut client_nct, mut server_bits, mut client_bits) = (false, false, false, false);
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((n, v)) => (n.trim(), Some(unquote(v.trim())?)),
            None => (param.trim(), None),
        };
        let seen = match name {
            "server_no_context_takeover" if value.is_none() => &mut server_nct,
            "client_no_context_takeover" if value.is_none() => &mut client_nct,
            // No window below 15 bits: decline rather than overrun the
            // client's smaller window.
            "server_max_window_bits" if window_bits(value?)? == 15 => &mut server_bits,
            "client_max_window_bits" if value.is_none_or(|v| window_bits(v).is_some()) => &mut client_bits,
            _ => return None,
        };
        if std::mem::replace(seen, true) {
            return None;
        }
    }
    // Without context takeover neither side keeps a window between
    // messages: both parameters may be answered unasked (§7.1.1.1,
    // §7.1.1.2), and then no connection holds an inflater or a compressor
    // while it is idle.
    let server_context_takeover = cfg.context_takeover && !server_nct;
    let client_context_takeover = cfg.context_takeover && !client_nct;
    let mut answer = String::from(PERMESSAGE_DEFLATE);
    if !server_context_takeover {
        answer.push_str("; server_no_context_takeover");
    }
    if !client_context_takeover {
        answer.push_str("; client_no_context_takeover");
    }
    let agreed = Deflate { server_context_takeover, client_context_takeover, min_size: cfg.min_size };
    Some((agreed, answer))
}

/// A parameter value: a token, or a quoted string holding one.
fn unquote(v: &str) -> Option<&str> {
    let v = match v.strip_prefix('"') {
        Some(rest) => rest.strip_suffix('"')?,
        None => v,
    };
    let token = !v.is_empty() && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    token.then_some(v)
}

/// `8`..=`15`, no leading zero (RFC 7692 §7.1.2).
fn window_bits(v: &str) -> Option<u8> {
    let bits: u8 = v.parse().ok()?;
    ((8..=15).contains(&bits) && !v.starts_with('0')).then_some(bits)
}

/// Why the layer fails a connection; each maps to one close code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A framing violation (close 1002).
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// A text message's bytes are not UTF-8 (close 1007).
    #[error("invalid UTF-8 in a text message")]
    InvalidUtf8,
    /// Compressed data that does not inflate (close 1007).
    #[error("invalid compressed data")]
    BadDeflate,
    /// A frame or an inflated message above the limit (close 1009).
    #[error("message too large")]
    TooLarge,
}

impl FrameError {
    /// The layer's error inside an I/O error, if that is what it is.
    pub fn of(e: &io::Error) -> Option<FrameError> {
        e.get_ref().and_then(|inner| inner.downcast_ref::<FrameError>()).copied()
    }

    /// The WebSocket close code.
    pub fn close_code(self) -> u16 {
        match self {
            FrameError::Protocol(_) => 1002,
            FrameError::InvalidUtf8 | FrameError::BadDeflate => 1007,
            FrameError::TooLarge => 1009,
        }
    }
}

/// Incremental UTF-8 validation: whole chunks through `str::from_utf8`,
/// with at most three bytes of an incomplete sequence carried to the next.
#[derive(Debug, Default)]
struct Utf8Check {
    tail: [u8; 4],
    tail_len: u8,
}

impl Utf8Check {
    fn feed(&mut self, mut data: &[u8]) -> Result<(), FrameError> {
        if self.tail_len > 0 {
            let have = usize::from(self.tail_len);
            let width = match self.tail[0] {
                0xc0..=0xdf => 2,
                0xe0..=0xef => 3,
                _ => 4,
            };
            let take = (width - have).min(data.len());
            self.tail[have..have + take].copy_from_slice(&data[..take]);
            data = &data[take..];
            let now = have + take;
            match std::str::from_utf8(&self.tail[..now]) {
                Ok(_) => self.tail_len = 0,
                Err(e) if e.error_len().is_none() => {
                    self.tail_len = now as u8;
                    return Ok(());
                }
                Err(_) => return Err(FrameError::InvalidUtf8),
            }
        }
        match std::str::from_utf8(data) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_none() => {
                let rest = &data[e.valid_up_to()..];
                self.tail[..rest.len()].copy_from_slice(rest);
                self.tail_len = rest.len() as u8;
                Ok(())
            }
            Err(_) => Err(FrameError::InvalidUtf8),
        }
    }

    /// The message ended: an incomplete sequence is invalid.
    fn finish(&mut self) -> Result<(), FrameError> {
        let complete = self.tail_len == 0;
        self.tail_len = 0;
        if complete { Ok(()) } else { Err(FrameError::InvalidUtf8) }
    }
}

/// Compressors and inflaters no connection holds between messages. Each
/// is reset before it goes back; the pool is bounded, so its memory is too.
struct Pool<T> {
    free: Mutex<Vec<Box<T>>>,
}

/// Pooled objects kept; more in use at once are allocated and dropped.
const POOL_KEEP: usize = 16;

impl<T> Pool<T> {
    const fn new() -> Self {
        Pool { free: Mutex::new(Vec::new()) }
    }

    fn take(&self, make: impl FnOnce() -> T) -> Box<T> {
        self.free.lock().pop().unwrap_or_else(|| Box::new(make()))
    }

    fn give(&self, item: Box<T>) {
        let mut free = self.free.lock();
        if free.len() < POOL_KEEP {
            free.push(item);
        }
    }
}

static COMPRESSORS: Pool<Compress> = Pool::new();
static INFLATERS: Pool<Decompress> = Pool::new();

/// Compression level: 1 is the fast path of `miniz_oxide` (a real-time
/// gateway compresses per subscriber; level 6 costs about three times the
/// CPU for a few percent more).
fn new_compressor() -> Compress {
    Compress::new(Compression::new(1), false)
}

fn new_inflater() -> Decompress {
    Decompress::new(false)
}

/// The largest frame header: 2 bytes, 8 of extended length, 4 of mask.
const MAX_HEADER: usize = 14;

/// A frame header, parsed.
#[derive(Clone, Copy, Debug)]
struct Header {
    fin: bool,
    rsv1: bool,
    rsv23: bool,
    opcode: u8,
    mask: Option<[u8; 4]>,
    len: u64,
}

/// A frame header arriving in pieces, in both directions.
#[derive(Debug, Default)]
struct HeaderBuf {
    /// The header's bytes; they stay here after it is whole (until the
    /// next one starts), for whoever passes it on.
    bytes: [u8; MAX_HEADER],
    len: usize,
}

impl HeaderBuf {
    /// Takes header bytes from the front of `input`: once the header is
    /// whole, it and its length, `input` then starting at its payload.
    fn feed(&mut self, input: &mut &[u8]) -> Option<(Header, usize)> {
        let take = (MAX_HEADER - self.len).min(input.len());
        self.bytes[self.len..self.len + take].copy_from_slice(&input[..take]);
        let Some((h, used)) = parse_header(&self.bytes[..self.len + take]) else {
            self.len += take;
            *input = &input[take..];
            return None;
        };
        // Only the header's bytes are consumed; the rest of `take` is
        // payload, read again by the caller.
        *input = &input[used - self.len..];
        self.len = 0;
        Some((h, used))
    }

    /// The bytes of the header just parsed.
    fn header(&self, len: usize) -> &[u8] {
        &self.bytes[..len]
    }
}

/// Parses a header from the start of `b`; `None` until it is complete.
fn parse_header(b: &[u8]) -> Option<(Header, usize)> {
    if b.len() < 2 {
        return None;
    }
    let masked = b[1] & 0x80 != 0;
    let (len, mut at) = match b[1] & 0x7f {
        126 => (u64::from(u16::from_be_bytes(b.get(2..4)?.try_into().ok()?)), 4),
        127 => (u64::from_be_bytes(b.get(2..10)?.try_into().ok()?), 10),
        n => (u64::from(n), 2),
    };
    let mask = if masked {
        let m: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
        at += 4;
        Some(m)
    } else {
        None
    };
    let h = Header {
        fin: b[0] & 0x80 != 0,
        rsv1: b[0] & 0x40 != 0,
        rsv23: b[0] & 0x30 != 0,
        opcode: b[0] & 0x0f,
        mask,
        len,
    };
    Some((h, at))
}

/// Where encoded or decoded bytes go.
pub trait Sink {
    /// Appends `bytes`.
    fn put_bytes(&mut self, bytes: &[u8]);
}

impl Sink for BytesMut {
    fn put_bytes(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// Appends a frame header: `first` carries FIN, RSV1 and the opcode.
fn put_header(out: &mut impl Sink, first: u8, len: usize, mask: Option<[u8; 4]>) {
    let mut head = [0u8; MAX_HEADER];
    let m = if mask.is_some() { 0x80 } else { 0 };
    head[0] = first;
    let mut at = match len {
        0..=125 => {
            head[1] = m | len as u8;
            2
        }
        126..=0xffff => {
            head[1] = m | 126;
            head[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            4
        }
        _ => {
            head[1] = m | 127;
            head[2..10].copy_from_slice(&(len as u64).to_be_bytes());
            10
        }
    };
    if let Some(mask) = mask {
        head[at..at + 4].copy_from_slice(&mask);
        at += 4;
    }
    out.put_bytes(&head[..at]);
}

const OP_CONTINUATION: u8 = 0;
const OP_TEXT: u8 = 1;
const OP_BINARY: u8 = 2;

/// The message being received, between its first and its final frame.
#[derive(Debug)]
struct InMessage {
    text: bool,
    compressed: bool,
    /// Inflated bytes so far (compressed messages).
    inflated: usize,
    /// Inflated frames already handed up (the next one is a continuation).
    handed_up: bool,
}

/// Where the decoder is within a frame.
#[derive(Debug)]
enum InState {
    Header,
    Payload { remaining: u64, mask: [u8; 4], at: usize, kind: PayloadKind, fin: bool, control: bool },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PayloadKind {
    /// Handed up as is (binary data, control frames).
    Pass,
    /// Handed up as is, and validated.
    Text,
    /// Inflated; the output goes up.
    Compressed,
}

/// The client-to-server direction: a pure decoder (bytes in, bytes for
/// tungstenite out), without I/O.
#[derive(Debug)]
pub struct Inbound {
    deflate: Option<Deflate>,
    max_message: usize,
    head: HeaderBuf,
    state: InState,
    message: Option<InMessage>,
    utf8: Utf8Check,
    inflater: Option<Box<Decompress>>,
    /// Inflated output not yet handed up (less than [`UP_FRAGMENT`]).
    inflated: Vec<u8>,
    /// Compressed messages received since [`Inbound::take_inflated_count`].
    inflated_count: u64,
}

impl Inbound {
    /// A decoder for one connection; frames and inflated messages above
    /// `max_message` bytes fail with [`FrameError::TooLarge`].
    pub fn new(deflate: Option<Deflate>, max_message: usize) -> Self {
        Inbound {
            deflate,
            max_message,
            head: HeaderBuf::default(),
            state: InState::Header,
            message: None,
            utf8: Utf8Check::default(),
            inflater: None,
            inflated: Vec::new(),
            inflated_count: 0,
        }
    }

    /// Compressed messages received since the last call (for a metric).
    pub fn take_inflated_count(&mut self) -> u64 {
        std::mem::take(&mut self.inflated_count)
    }

    /// Consumes all of `input` (the client's bytes, in order) and appends
    /// what tungstenite should read to `up`. An error is final.
    pub fn decode(&mut self, mut input: &[u8], up: &mut impl Sink) -> Result<(), FrameError> {
        while !input.is_empty() {
            match &mut self.state {
                InState::Header => {
                    let Some((h, used)) = self.head.feed(&mut input) else { continue };
                    self.start_frame(h, used, up)?;
                }
                InState::Payload { remaining, mask, at, kind, fin, control } => {
                    let n = (*remaining).min(input.len() as u64) as usize;
                    let (chunk, rest) = input.split_at(n);
                    input = rest;
                    *remaining -= n as u64;
                    let (kind, mask, offset, fin, control, done) = (*kind, *mask, *at, *fin, *control, *remaining == 0);
                    if let InState::Payload { at, .. } = &mut self.state {
                        *at = (offset + n) % 4;
                    }
                    match kind {
                        PayloadKind::Pass => up.put_bytes(chunk),
                        PayloadKind::Text => {
                            up.put_bytes(chunk);
                            unmasked(chunk, mask, offset, |plain| self.utf8.feed(plain))?;
                        }
                        PayloadKind::Compressed => {
                            unmasked(chunk, mask, offset, |plain| self.inflate(plain, up))?;
                        }
                    }
                    if done {
                        self.state = InState::Header;
                        self.end_frame(kind, fin, control, up)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Checks a complete header and decides where its payload goes.
    fn start_frame(&mut self, h: Header, header_len: usize, up: &mut impl Sink) -> Result<(), FrameError> {
        let Some(mask) = h.mask else { return Err(FrameError::Protocol("unmasked client frame")) };
        if h.rsv23 {
            return Err(FrameError::Protocol("reserved bits set"));
        }
        if h.len > self.max_message as u64 {
            return Err(FrameError::TooLarge);
        }
        let kind = match h.opcode {
            0x8..=0xa => {
                if h.rsv1 {
                    return Err(FrameError::Protocol("RSV1 on a control frame"));
                }
                PayloadKind::Pass
            }
            OP_CONTINUATION => {
                let Some(m) = &self.message else {
                    return Err(FrameError::Protocol("continuation frame without a message"));
                };
                if h.rsv1 {
                    return Err(FrameError::Protocol("RSV1 on a continuation frame"));
                }
                match (m.compressed, m.text) {
                    (true, _) => PayloadKind::Compressed,
                    (false, true) => PayloadKind::Text,
                    (false, false) => PayloadKind::Pass,
                }
            }
            OP_TEXT | OP_BINARY => {
                if self.message.is_some() {
                    return Err(FrameError::Protocol("data frame inside a fragmented message"));
                }
                if h.rsv1 && self.deflate.is_none() {
                    return Err(FrameError::Protocol("RSV1 without permessage-deflate"));
                }
                let text = h.opcode == OP_TEXT;
                self.message = Some(InMessage { text, compressed: h.rsv1, inflated: 0, handed_up: false });
                match (h.rsv1, text) {
                    (true, _) => PayloadKind::Compressed,
                    (false, true) => PayloadKind::Text,
                    (false, false) => PayloadKind::Pass,
                }
            }
            _ => return Err(FrameError::Protocol("reserved opcode")),
        };
        if kind != PayloadKind::Compressed {
            // The header bytes are still at the start of `head`.
            up.put_bytes(self.head.header(header_len));
        }
        let control = h.opcode >= 0x8;
        self.state = InState::Payload { remaining: h.len, mask, at: 0, kind, fin: h.fin, control };
        if h.len == 0 {
            self.state = InState::Header;
            self.end_frame(kind, h.fin, control, up)?;
        }
        Ok(())
    }

    /// A frame's last payload byte arrived; on a final data frame, so did
    /// its message's.
    fn end_frame(&mut self, kind: PayloadKind, fin: bool, control: bool, up: &mut impl Sink) -> Result<(), FrameError> {
        if !fin || control {
            return Ok(());
        }
        match kind {
            PayloadKind::Pass => {}
            PayloadKind::Text => self.utf8.finish()?,
            PayloadKind::Compressed => {
                self.inflate(&[0, 0, 0xff, 0xff], up)?;
                if self.message.as_ref().is_some_and(|m| m.text) {
                    self.utf8.finish()?;
                }
                self.hand_up(true, up);
                let keep = self.deflate.is_some_and(|d| d.client_context_takeover);
                if !keep && let Some(mut inflater) = self.inflater.take() {
                    inflater.reset(false);
                    INFLATERS.give(inflater);
                }
                // Nothing of a message stays allocated after it.
                self.inflated = Vec::new();
                self.inflated_count += 1;
            }
        }
        self.message = None;
        Ok(())
    }

    /// Inflates `plain` (compressed payload bytes, unmasked), counting and
    /// validating the output and handing it up in [`UP_FRAGMENT`] pieces.
    fn inflate(&mut self, mut plain: &[u8], up: &mut impl Sink) -> Result<(), FrameError> {
        let inflater = self.inflater.get_or_insert_with(|| INFLATERS.take(new_inflater));
        let Some(message) = &mut self.message else { return Ok(()) };
        let mut out = [0u8; 8 * 1024];
        loop {
            let (before_in, before_out) = (inflater.total_in(), inflater.total_out());
            let status =
                inflater.decompress(plain, &mut out, FlushDecompress::Sync).map_err(|_| FrameError::BadDeflate)?;
            let consumed = (inflater.total_in() - before_in) as usize;
            let produced = (inflater.total_out() - before_out) as usize;
            plain = &plain[consumed..];
            if produced > 0 {
                message.inflated += produced;
                if message.inflated > self.max_message {
                    return Err(FrameError::TooLarge);
                }
                if message.text {
                    self.utf8.feed(&out[..produced])?;
                }
                self.inflated.extend_from_slice(&out[..produced]);
            }
            if self.inflated.len() >= UP_FRAGMENT {
                hand_up(message, &mut self.inflated, false, up);
            }
            if status == Status::StreamEnd {
                // A final block (BFINAL) ends the deflate stream; what
                // follows starts a new one.
                inflater.reset(false);
                if !plain.is_empty() {
                    continue;
                }
            }
            if (plain.is_empty() && produced < out.len()) || (consumed == 0 && produced == 0) {
                return Ok(());
            }
        }
    }

    fn hand_up(&mut self, fin: bool, up: &mut impl Sink) {
        if let Some(message) = &mut self.message {
            hand_up(message, &mut self.inflated, fin, up);
        }
    }
}

/// Hands inflated bytes up as one masked frame (mask 0: tungstenite's
/// server role wants masked frames, and a zero mask leaves them as they are).
fn hand_up(message: &mut InMessage, inflated: &mut Vec<u8>, fin: bool, up: &mut impl Sink) {
    for (i, piece) in inflated.chunks(UP_FRAGMENT).enumerate() {
        let last = fin && (i + 1) * UP_FRAGMENT >= inflated.len();
        let opcode = match (message.handed_up, message.text) {
            (true, _) => OP_CONTINUATION,
            (false, true) => OP_TEXT,
            (false, false) => OP_BINARY,
        };
        put_header(up, u8::from(last) << 7 | opcode, piece.len(), Some([0; 4]));
        up.put_bytes(piece);
        message.handed_up = true;
    }
    if fin && inflated.is_empty() {
        let opcode = if message.handed_up {
            OP_CONTINUATION
        } else if message.text {
            OP_TEXT
        } else {
            OP_BINARY
        };
        put_header(up, 0x80 | opcode, 0, Some([0; 4]));
    }
    inflated.clear();
}

/// Calls `f` with `chunk` unmasked, in pieces (`offset`: the mask position
/// of its first byte). Eight bytes at a time: this runs over every byte of
/// every text message.
fn unmasked(
    chunk: &[u8],
    mask: [u8; 4],
    offset: usize,
    mut f: impl FnMut(&[u8]) -> Result<(), FrameError>,
) -> Result<(), FrameError> {
    // A multiple of 8, so every piece starts at the same mask position.
    let mut buf = [0u8; 2048];
    let m: [u8; 8] = std::array::from_fn(|i| mask[(offset + i) % 4]);
    let m64 = u64::from_ne_bytes(m);
    for piece in chunk.chunks(buf.len()) {
        let out = &mut buf[..piece.len()];
        let mut words = out.chunks_exact_mut(8);
        let mut input = piece.chunks_exact(8);
        for (o, i) in (&mut words).zip(&mut input) {
            let word = u64::from_ne_bytes(i.try_into().expect("chunks of 8"));
            o.copy_from_slice(&(word ^ m64).to_ne_bytes());
        }
        for (k, (o, i)) in words.into_remainder().iter_mut().zip(input.remainder()).enumerate() {
            *o = i ^ m[k];
        }
        f(out)?;
    }
    Ok(())
}

/// Where the encoder is within a frame tungstenite wrote.
#[derive(Debug)]
enum OutState {
    Header,
    Pass { remaining: u64 },
    Compress { remaining: u64, opcode: u8 },
}

/// The server-to-client direction when permessage-deflate was negotiated:
/// a pure encoder (tungstenite's frames in, frames for the socket out).
#[derive(Debug)]
pub struct Outbound {
    deflate: Deflate,
    head: HeaderBuf,
    state: OutState,
    compressor: Option<Box<Compress>>,
    /// The compressed payload of the frame being encoded.
    compressed: Vec<u8>,
    /// Without context takeover: the payload being collected, compressed
    /// (or found in [`RECENT`]) once whole.
    raw: Vec<u8>,
    /// Compressed messages sent since [`Outbound::take_compressed_count`].
    compressed_count: u64,
}

/// Messages compressed lately without context takeover, by any connection.
/// A delivery reaches its subscribers as the same bytes (encoded once per
/// wire format), and without context takeover the same bytes compress to
/// the same message: the first subscriber's connection compresses it, the
/// others find it here. Bounded in entries and bytes; messages above
/// [`RECENT_MAX_MESSAGE`] are not kept.
struct Recent {
    entries: std::collections::VecDeque<RecentEntry>,
    bytes: usize,
}

struct RecentEntry {
    fingerprint: u64,
    raw: Vec<u8>,
    compressed: Bytes,
}

static RECENT: Mutex<Recent> = Mutex::new(Recent { entries: std::collections::VecDeque::new(), bytes: 0 });

/// Entries [`RECENT`] keeps.
const RECENT_ENTRIES: usize = 64;
/// Bytes [`RECENT`] keeps (payloads and their compressed forms).
const RECENT_BYTES: usize = 4 * 1024 * 1024;
/// Largest payload [`RECENT`] keeps.
const RECENT_MAX_MESSAGE: usize = 64 * 1024;

/// A cheap hash of a payload, eight bytes at a time (FxHash's mixing):
/// [`RECENT`] compares payloads in full only when this matches.
fn fingerprint(b: &[u8]) -> u64 {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let mut h = b.len() as u64;
    let mut words = b.chunks_exact(8);
    for w in &mut words {
        h = (h.rotate_left(5) ^ u64::from_le_bytes(w.try_into().expect("chunks of 8"))).wrapping_mul(K);
    }
    for &x in words.remainder() {
        h = (h.rotate_left(5) ^ u64::from(x)).wrapping_mul(K);
    }
    h
}

impl Recent {
    fn find(&self, fingerprint: u64, raw: &[u8]) -> Option<Bytes> {
        let e = self.entries.iter().rev().find(|e| e.fingerprint == fingerprint && e.raw == raw)?;
        Some(e.compressed.clone())
    }

    fn keep(&mut self, fingerprint: u64, raw: &[u8], compressed: &Bytes) {
        if raw.len() > RECENT_MAX_MESSAGE {
            return;
        }
        self.bytes += raw.len() + compressed.len();
        self.entries.push_back(RecentEntry { fingerprint, raw: raw.to_vec(), compressed: compressed.clone() });
        while self.entries.len() > RECENT_ENTRIES || self.bytes > RECENT_BYTES {
            let Some(old) = self.entries.pop_front() else { break };
            self.bytes -= old.raw.len() + old.compressed.len();
        }
    }
}

impl Outbound {
    /// An encoder for one connection.
    pub fn new(deflate: Deflate) -> Self {
        Outbound {
            deflate,
            head: HeaderBuf::default(),
            state: OutState::Header,
            compressor: None,
            compressed: Vec::new(),
            raw: Vec::new(),
            compressed_count: 0,
        }
    }

    /// Compressed messages sent since the last call (for a metric).
    pub fn take_compressed_count(&mut self) -> u64 {
        std::mem::take(&mut self.compressed_count)
    }

    /// Consumes all of `input` (frames as tungstenite wrote them, in
    /// order) and appends what goes on the wire to `out`.
    pub fn encode(&mut self, mut input: &[u8], out: &mut BytesMut) {
        while !input.is_empty() {
            match &mut self.state {
                OutState::Header => {
                    let Some((h, used)) = self.head.feed(&mut input) else { continue };
                    let data = h.opcode == OP_TEXT || h.opcode == OP_BINARY;
                    let plain = h.fin && !h.rsv1 && !h.rsv23 && h.mask.is_none();
                    if data && plain && h.len >= self.deflate.min_size as u64 {
                        self.state = OutState::Compress { remaining: h.len, opcode: h.opcode };
                        if self.deflate.server_context_takeover {
                            self.compressor.get_or_insert_with(|| Box::new(new_compressor()));
                        }
                    } else {
                        out.put_slice(self.head.header(used));
                        self.state = OutState::Pass { remaining: h.len };
                    }
                    if h.len == 0 {
                        self.end_frame(out);
                    }
                }
                OutState::Pass { remaining } => {
                    let n = (*remaining).min(input.len() as u64) as usize;
                    out.put_slice(&input[..n]);
                    input = &input[n..];
                    *remaining -= n as u64;
                    if *remaining == 0 {
                        self.state = OutState::Header;
                    }
                }
                OutState::Compress { remaining, .. } => {
                    let n = (*remaining).min(input.len() as u64) as usize;
                    *remaining -= n as u64;
                    let done = *remaining == 0;
                    if self.deflate.server_context_takeover {
                        self.compress(&input[..n], FlushCompress::None);
                    } else {
                        self.raw.extend_from_slice(&input[..n]);
                    }
                    input = &input[n..];
                    if done {
                        self.end_frame(out);
                    }
                }
            }
        }
    }

    fn compress(&mut self, mut data: &[u8], flush: FlushCompress) {
        let Some(c) = &mut self.compressor else { return };
        loop {
            self.compressed.reserve(data.len() / 2 + 64);
            let before = c.total_in();
            // Writing into a Vec cannot fail; a level and window that
            // miniz_oxide accepts were chosen above.
            let _ = c.compress_vec(data, &mut self.compressed, flush);
            data = &data[(c.total_in() - before) as usize..];
            // Done when the input is in and the output had room left.
            if data.is_empty() && self.compressed.len() < self.compressed.capacity() {
                return;
            }
        }
    }

    fn end_frame(&mut self, out: &mut BytesMut) {
        let OutState::Compress { opcode, .. } = self.state else {
            self.state = OutState::Header;
            return;
        };
        self.state = OutState::Header;
        let body = if self.deflate.server_context_takeover {
            self.compress(&[], FlushCompress::Sync);
            let body = self.compressed.strip_suffix(&[0, 0, 0xff, 0xff]).unwrap_or(&self.compressed);
            Bytes::copy_from_slice(body)
        } else {
            self.compress_alone()
        };
        put_header(out, 0x80 | 0x40 | opcode, body.len(), None);
        out.put_slice(&body);
        self.compressed_count += 1;
        // Nothing of a message stays allocated after it.
        self.compressed = Vec::new();
        self.raw = Vec::new();
    }

    /// The collected payload compressed on its own: from [`RECENT`], or
    /// with a pooled compressor (then kept in [`RECENT`]).
    fn compress_alone(&mut self) -> Bytes {
        let raw = std::mem::take(&mut self.raw);
        let fp = fingerprint(&raw);
        if let Some(hit) = RECENT.lock().find(fp, &raw) {
            return hit;
        }
        self.compressor = Some(COMPRESSORS.take(new_compressor));
        self.compress(&raw, FlushCompress::Sync);
        if let Some(mut c) = self.compressor.take() {
            c.reset();
            COMPRESSORS.give(c);
        }
        let body =
            Bytes::copy_from_slice(self.compressed.strip_suffix(&[0, 0, 0xff, 0xff]).unwrap_or(&self.compressed));
        RECENT.lock().keep(fp, &raw, &body);
        body
    }
}

/// Bytes the write side buffers before it waits for the socket.
const WRITE_HIGH_WATER: usize = 64 * 1024;

/// The upgraded socket as tungstenite should see it: see the module doc.
pub struct FrameLayer<S> {
    io: S,
    inbound: Inbound,
    /// `None`: no deflate; writes go straight to the socket. Boxed: a
    /// connection without deflate does not carry its size.
    outbound: Option<Box<Outbound>>,
    /// Decoded bytes tungstenite has not read yet.
    up: BytesMut,
    /// Encoded bytes the socket has not taken yet.
    down: BytesMut,
    /// A violation was reported: reads are the raw socket's from now on.
    failed: bool,
}

impl<S> FrameLayer<S> {
    /// Wraps an upgraded server-side socket. `max_message`: the largest
    /// frame, and inflated message, accepted.
    pub fn new(io: S, deflate: Option<Deflate>, max_message: usize) -> Self {
        FrameLayer {
            io,
            inbound: Inbound::new(deflate, max_message),
            outbound: deflate.map(|d| Box::new(Outbound::new(d))),
            up: BytesMut::new(),
            down: BytesMut::new(),
            failed: false,
        }
    }
}

/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 4 * 1024;

/// Decoded bytes go straight into the reader's buffer; what does not fit
/// (inflated output) waits in `up`, in order.
struct Spill<'a, 'b> {
    buf: &'a mut ReadBuf<'b>,
    up: &'a mut BytesMut,
}

impl Sink for Spill<'_, '_> {
    fn put_bytes(&mut self, bytes: &[u8]) {
        let n = if self.up.is_empty() { bytes.len().min(self.buf.remaining()) } else { 0 };
        self.buf.put_slice(&bytes[..n]);
        if n < bytes.len() {
            self.up.extend_from_slice(&bytes[n..]);
        }
    }
}

/// `switchboard_ws_compressed_messages_total{direction}`: messages that
/// travelled compressed, `in` (inflated) or `out` (deflated).
fn count_compressed(direction: &'static str, n: u64) {
    if n > 0 {
        // Per compressed message at most, beside the cost of deflate itself.
        metrics::counter!("switchboard_ws_compressed_messages_total", "direction" => direction).increment(n);
    }
}

/// Drops what it is given: the decoder's output when it equals its input.
struct Discard;

impl Sink for Discard {
    fn put_bytes(&mut self, _: &[u8]) {}
}

impl<S: AsyncRead + Unpin> AsyncRead for FrameLayer<S> {
    /// Without deflate, reads straight into `buf` and scans what arrived
    /// (plain frames go up as they came). With it, reads at most what fits
    /// in `buf`, so that plain frames still never need `up`; only inflated
    /// output can spill there. No memory is held between reads.
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.failed {
                return Pin::new(&mut this.io).poll_read(cx, buf);
            }
            if buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if !this.up.is_empty() {
                let n = this.up.len().min(buf.remaining());
                buf.put_slice(&this.up[..n]);
                this.up.advance(n);
                if this.up.is_empty() {
                    this.up = BytesMut::new();
                }
                return Poll::Ready(Ok(()));
            }
            if this.inbound.deflate.is_none() {
                // Without deflate what goes up is exactly what came in: read
                // straight into `buf` and only look at the bytes.
                let before = buf.filled().len();
                ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
                if let Err(e) = this.inbound.decode(&buf.filled()[before..], &mut Discard) {
                    this.failed = true;
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
                }
                return Poll::Ready(Ok(()));
            }
            let mut raw = [0u8; READ_CHUNK];
            let want = buf.remaining().min(READ_CHUNK);
            let mut rb = ReadBuf::new(&mut raw[..want]);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                return Poll::Ready(Ok(()));
            }
            let before = buf.filled().len();
            let decoded = this.inbound.decode(rb.filled(), &mut Spill { buf, up: &mut this.up });
            if let Err(e) = decoded {
                this.failed = true;
                this.up = BytesMut::new();
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
            }
            count_compressed("in", this.inbound.take_inflated_count());
            if buf.filled().len() > before {
                return Poll::Ready(Ok(()));
            }
            // Only compressed bytes so far, nothing to hand up yet.
        }
    }
}

impl<S: AsyncWrite + Unpin> FrameLayer<S> {
    /// Writes `down` to the socket until it is empty or would block.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.down.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.down))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.down.advance(n);
        }
        if self.down.capacity() > 2 * WRITE_HIGH_WATER {
            self.down = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FrameLayer<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.outbound.is_none() {
            return Pin::new(&mut this.io).poll_write(cx, buf);
        }
        if this.down.len() >= WRITE_HIGH_WATER {
            ready!(this.poll_drain(cx))?;
        }
        if let Some(outbound) = &mut this.outbound {
            outbound.encode(buf, &mut this.down);
            count_compressed("out", outbound.take_compressed_count());
        }
        // Start the write now; the flush finishes it.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    /// A masked client frame; `first` is FIN, RSV and opcode.
    fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut b = BytesMut::new();
        put_header(&mut b, first, payload.len(), Some(MASK));
        b.extend(payload.iter().enumerate().map(|(i, p)| p ^ MASK[i % 4]));
        b.to_vec()
    }

    /// RFC 7692 §7.2.1 with `c` (keeping its context or not).
    fn deflate_with(c: &mut Compress, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len() + 64);
        let start = c.total_in();
        loop {
            let at = (c.total_in() - start) as usize;
            c.compress_vec(&data[at..], &mut out, FlushCompress::Sync).expect("compress");
            if out.len() < out.capacity() {
                break;
            }
            out.reserve(1024);
        }
        assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
        out.truncate(out.len() - 4);
        out
    }

    fn deflate(data: &[u8]) -> Vec<u8> {
        deflate_with(&mut Compress::new(Compression::default(), false), data)
    }

    fn inflate(d: &mut Decompress, data: &[u8]) -> Vec<u8> {
        let mut input = data.to_vec();
        input.extend_from_slice(&[0, 0, 0xff, 0xff]);
        let mut out = Vec::with_capacity(input.len() * 4 + 64);
        let start = d.total_in();
        loop {
            let at = (d.total_in() - start) as usize;
            d.decompress_vec(&input[at..], &mut out, FlushDecompress::Sync).expect("inflate");
            if (d.total_in() - start) as usize == input.len() && out.len() < out.capacity() {
                return out;
            }
            out.reserve(out.capacity());
        }
    }

    /// Frames in `up`: (first byte, unmasked payload).
    fn frames(mut b: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut v = Vec::new();
        while !b.is_empty() {
            let (h, used) = parse_header(b).expect("whole header");
            let len = h.len as usize;
            let mask = h.mask.unwrap_or([0; 4]);
            let payload = b[used..used + len].iter().enumerate().map(|(i, p)| p ^ mask[i % 4]).collect();
            v.push((b[0], payload));
            b = &b[used + len..];
        }
        v
    }

    /// The messages in `up`: (opcode, payload), fragments joined.
    fn messages(up: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out: Vec<(u8, Vec<u8>)> = Vec::new();
        let mut open = false;
        for (first, payload) in frames(up) {
            let op = first & 0x0f;
            assert_eq!(first & 0x70, 0, "no RSV bit goes up");
            if op >= 8 {
                out.push((op, payload));
                continue;
            }
            if open {
                assert_eq!(op, OP_CONTINUATION);
                let i = out.iter().rposition(|(o, _)| *o < 8).expect("message");
                out[i].1.extend(payload);
            } else {
                out.push((op, payload));
            }
            open = first & 0x80 == 0;
        }
        out
    }

    fn agreed(client_context_takeover: bool) -> Option<Deflate> {
        Some(Deflate { server_context_takeover: false, client_context_takeover, min_size: 16 })
    }

    /// Feeds `input` in pieces of `step` bytes.
    fn decode_in(d: &mut Inbound, input: &[u8], step: usize) -> Result<BytesMut, FrameError> {
        let mut up = BytesMut::new();
        for piece in input.chunks(step) {
            d.decode(piece, &mut up)?;
        }
        Ok(up)
    }

    #[test]
    fn negotiation_accepts_the_first_acceptable_offer() {
        const BOTH: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
        let on = DeflateConfig::default();
        let ok = |h: &[&str]| negotiate(h, &on).map(|(_, answer)| answer);
        assert_eq!(ok(&[]), None);
        assert_eq!(ok(&["x-webkit-deflate-frame"]), None);
        assert_eq!(ok(&["permessage-deflate"]).as_deref(), Some(BOTH));
        // What Chromium and Firefox send.
        assert_eq!(ok(&["permessage-deflate; client_max_window_bits"]).as_deref(), Some(BOTH));
        assert_eq!(
            ok(&["permessage-deflate;client_no_context_takeover; server_no_context_takeover"]).as_deref(),
            Some(BOTH)
        );
        assert!(ok(&["permessage-deflate; server_max_window_bits=15; client_max_window_bits=\"10\""]).is_some());
        // Declined offers fall through to the next, in the same header or
        // the next one.
        for declined in [
            "permessage-deflate; server_max_window_bits=10",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=015",
            "permessage-deflate; client_max_window_bits=16",
            "permessage-deflate; client_max_window_bits=\"7\"",
            "permessage-deflate; client_max_window_bits=\"",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; unknown_param",
            "permessage-deflate; =",
        ] {
            assert_eq!(ok(&[declined]), None, "{declined}");
            let answer = ok(&[&format!("{declined}, permessage-deflate; client_no_context_takeover")]);
            assert_eq!(answer.as_deref(), Some(BOTH), "{declined}");
            let answer = ok(&[declined, "foo", "permessage-deflate"]);
            assert_eq!(answer.as_deref(), Some(BOTH), "{declined}");
        }
        let (d, _) = negotiate(&["permessage-deflate"], &on).expect("accepted");
        assert_eq!(d, Deflate { server_context_takeover: false, client_context_takeover: false, min_size: 256 });
        // Context takeover kept when configured, on the sides the client
        // did not decline it for.
        let keep = DeflateConfig { context_takeover: true, ..on };
        let (d, answer) = negotiate(&["permessage-deflate"], &keep).expect("accepted");
        assert_eq!(answer, "permessage-deflate");
        assert!(d.server_context_takeover && d.client_context_takeover);
        let (d, answer) = negotiate(&["permessage-deflate; server_no_context_takeover"], &keep).expect("accepted");
        assert_eq!(answer, "permessage-deflate; server_no_context_takeover");
        assert!(!d.server_context_takeover && d.client_context_takeover);
        let (d, answer) = negotiate(&["permessage-deflate; client_no_context_takeover"], &keep).expect("accepted");
        assert_eq!(answer, "permessage-deflate; client_no_context_takeover");
        assert!(d.server_context_takeover && !d.client_context_takeover);
        assert_eq!(negotiate(&["permessage-deflate"], &DeflateConfig { enabled: false, ..on }), None);
    }

    #[test]
    fn utf8_check_carries_sequences_across_pieces() {
        let text = "ascii é € 𝄞 end".as_bytes();
        for step in 1..=text.len() {
            let mut c = Utf8Check::default();
            for piece in text.chunks(step) {
                c.feed(piece).expect("valid");
            }
            c.finish().expect("complete");
        }
        let mut c = Utf8Check::default();
        c.feed(&[0xe2, 0x82]).expect("a prefix");
        assert_eq!(c.finish(), Err(FrameError::InvalidUtf8), "cut at the end");
        for bad in [&[0xe2, 0x28][..], &[0xff], &[0xc0, 0x80], &[0xed, 0xa0, 0x80], &[0xf4, 0x90]] {
            let mut c = Utf8Check::default();
            let failed = bad.iter().any(|b| c.feed(&[*b]).is_err());
            assert!(failed, "{bad:x?}");
        }
    }

    #[test]
    fn plain_frames_go_up_byte_identical() {
        let mut input = client_frame(0x81, "héllo".as_bytes());
        input.extend(client_frame(0x02, b"\x00\xff"));
        input.extend(client_frame(0x89, b"ping"));
        input.extend(client_frame(0x80, b"\x01"));
        input.extend(client_frame(0x88, &[0x03, 0xe8]));
        for step in [1, 3, 7, input.len()] {
            let up = decode_in(&mut Inbound::new(None, 1024), &input, step).expect("valid");
            assert_eq!(&up[..], &input[..], "step {step}");
        }
    }

    #[test]
    fn invalid_utf8_fails_before_the_frame_is_complete() {
        // A 1 MiB text frame of which only the header and 3 bytes arrived.
        let mut frame = client_frame(0x81, &[b'a'; 1 << 20]);
        frame[14..17].copy_from_slice(&[b'o' ^ MASK[0], 0xff ^ MASK[1], b'k' ^ MASK[2]]);
        let mut d = Inbound::new(None, 2 << 20);
        assert_eq!(decode_in(&mut d, &frame[..14 + 3], 5).unwrap_err(), FrameError::InvalidUtf8);
        // The first fragment of a long fragmented message.
        let mut d = Inbound::new(None, 1024);
        assert_eq!(decode_in(&mut d, &client_frame(0x01, b"ok\xc3\x28"), 64).unwrap_err(), FrameError::InvalidUtf8);
        // A sequence split between fragments is fine; cut at the end is not.
        let mut d = Inbound::new(None, 1024);
        let mut input = client_frame(0x01, b"\xe2\x82");
        input.extend(client_frame(0x89, b""));
        input.extend(client_frame(0x80, b"\xac"));
        decode_in(&mut d, &input, 1).expect("split euro sign");
        let mut d = Inbound::new(None, 1024);
        assert_eq!(decode_in(&mut d, &client_frame(0x81, b"\xe2\x82"), 1).unwrap_err(), FrameError::InvalidUtf8);
        // Binary messages are not checked.
        decode_in(&mut Inbound::new(None, 1024), &client_frame(0x82, b"\xff"), 1).expect("binary");
    }

    #[test]
    fn framing_violations_are_protocol_errors() {
        let cases: [(&[u8], Option<Deflate>); 7] = [
            (&client_frame(0xc1, &deflate(b"hi")), None),
            (&[client_frame(0x41, &deflate(b"hi")), client_frame(0xc0, b"")].concat(), agreed(true)),
            (&client_frame(0xc9, b""), agreed(true)),
            (&client_frame(0x80, b"x"), None),
            (&[client_frame(0x01, b"a"), client_frame(0x81, b"b")].concat(), None),
            (&client_frame(0xa1, b"x"), None),
            (&[0x81, 0x01, b'x'], None),
        ];
        for (i, (input, deflate)) in cases.iter().enumerate() {
            let err = decode_in(&mut Inbound::new(*deflate, 1024), input, 1).unwrap_err();
            assert!(matches!(err, FrameError::Protocol(_)), "case {i}: {err:?}");
            assert_eq!(err.close_code(), 1002);
        }
    }

    #[test]
    fn compressed_messages_inflate_into_plain_frames() {
        let big: Vec<u8> = (0..200_000u32).flat_map(|i| format!("{{\"n\":{}}}", i % 97).into_bytes()).collect();
        for client_context_takeover in [true, false] {
            let mut c = Compress::new(Compression::default(), false);
            let mut input = Vec::new();
            let mut expected = Vec::new();
            for (op, msg) in [(OP_TEXT, "héllo".as_bytes()), (OP_BINARY, &[0u8, 0xff][..]), (OP_TEXT, &big)] {
                if !client_context_takeover {
                    c.reset();
                }
                let body = deflate_with(&mut c, msg);
                // Fragmented in three, with a ping in the middle.
                let (a, rest) = body.split_at(body.len() / 3);
                let (b, z) = rest.split_at(rest.len() / 2);
                input.extend(client_frame(0x40 | op, a));
                input.extend(client_frame(0x00, b));
                input.extend(client_frame(0x89, b"p"));
                input.extend(client_frame(0x80, z));
                expected.push((0x9, b"p".to_vec()));
                expected.push((op, msg.to_vec()));
            }
            // An uncompressed message between compressed ones.
            input.extend(client_frame(0x81, b"plain"));
            expected.push((OP_TEXT, b"plain".to_vec()));
            for step in [1, 1000, input.len()] {
                let mut d = Inbound::new(agreed(client_context_takeover), 4 << 20);
                let up = decode_in(&mut d, &input, step).expect("valid");
                assert!(frames(&up).iter().all(|(_, p)| p.len() <= UP_FRAGMENT));
                // A ping may go up inside a message's fragments or after it.
                let (mut got, mut expected) = (messages(&up), expected.clone());
                got.sort_by_key(|(op, _)| *op >= 8);
                expected.sort_by_key(|(op, _)| *op >= 8);
                let summary = |m: &[(u8, Vec<u8>)]| {
                    m.iter().map(|(o, p)| (*o, p.len(), p.get(..8).map(<[u8]>::to_vec))).collect::<Vec<_>>()
                };
                assert!(
                    got == expected,
                    "step {step}, takeover {client_context_takeover}: {:?} != {:?}",
                    summary(&got),
                    summary(&expected)
                );
            }
        }
    }

    #[test]
    fn a_decompression_bomb_stops_at_the_limit() {
        let bomb = deflate(&vec![0u8; 64 << 20]);
        assert!(bomb.len() < 100 * 1024, "{}", bomb.len());
        let mut d = Inbound::new(agreed(true), 1 << 20);
        let mut up = BytesMut::new();
        let mut most = 0;
        let mut result = Ok(());
        for piece in client_frame(0xc2, &bomb).chunks(READ_CHUNK) {
            result = d.decode(piece, &mut up);
            most = most.max(up.len());
            up.clear();
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(FrameError::TooLarge));
        assert_eq!(result.unwrap_err().close_code(), 1009);
        assert!(most <= (1 << 20) + 2 * UP_FRAGMENT, "handed up {most} bytes at once");
        // Invalid UTF-8 inside a compressed text message fails while
        // inflating; garbage fails as bad data.
        let mut d = Inbound::new(agreed(true), 1 << 20);
        let bad = deflate(&[b"ok\xff".as_slice(), &[b'a'; 100_000]].concat());
        assert_eq!(decode_in(&mut d, &client_frame(0x41, &bad[..bad.len() / 2]), 64), Err(FrameError::InvalidUtf8));
        let mut d = Inbound::new(agreed(true), 1 << 20);
        assert_eq!(decode_in(&mut d, &client_frame(0xc2, &[0xff; 16]), 64), Err(FrameError::BadDeflate));
    }

    /// tungstenite's server frames: FIN, unmasked.
    fn server_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut b = BytesMut::new();
        put_header(&mut b, first, payload.len(), None);
        b.put_slice(payload);
        b.to_vec()
    }

    #[test]
    fn outbound_data_messages_are_compressed() {
        let big = "{\"channel\":\"a\",\"payload\":\"xxxxxxxxxxxxxxxxxxxx\"}".repeat(2000);
        for server_context_takeover in [false, true] {
            let deflate = Deflate { server_context_takeover, client_context_takeover: true, min_size: 16 };
            let mut input = server_frame(0x81, big.as_bytes());
            input.extend(server_frame(0x81, b"tiny"));
            input.extend(server_frame(0x89, b"ping"));
            input.extend(server_frame(0x82, big.as_bytes()));
            input.extend(server_frame(0x81, big.as_bytes()));
            for step in [1, 777, input.len()] {
                let mut e = Outbound::new(deflate);
                let mut out = BytesMut::new();
                for piece in input.chunks(step) {
                    e.encode(piece, &mut out);
                }
                let got = frames(&out);
                let firsts: Vec<u8> = got.iter().map(|(f, _)| *f).collect();
                assert_eq!(firsts, [0xc1, 0x81, 0x89, 0xc2, 0xc1]);
                assert!(got[0].1.len() < big.len() / 20, "compressed to {}", got[0].1.len());
                let mut d = Decompress::new(false);
                for (first, payload) in &got {
                    let plain = if first & 0x40 != 0 {
                        if !server_context_takeover {
                            d.reset(false);
                        }
                        inflate(&mut d, payload)
                    } else {
                        payload.clone()
                    };
                    assert!([big.as_bytes(), b"tiny", b"ping"].contains(&plain.as_slice()));
                }
            }
        }
    }

    /// A delivery reaches many connections as the same bytes: the first
    /// compresses it, the others reuse that (without context takeover).
    #[test]
    fn the_same_message_is_compressed_once_for_every_connection() {
        let payload = format!("{{\"channel\":\"fan/out\",\"n\":{}}}", "7".repeat(5000)).into_bytes();
        let deflate = Deflate { server_context_takeover: false, client_context_takeover: false, min_size: 16 };
        let (mut a, mut b) = (Outbound::new(deflate), Outbound::new(deflate));
        let (mut out_a, mut out_b) = (BytesMut::new(), BytesMut::new());
        a.encode(&server_frame(0x81, &payload), &mut out_a);
        assert!(RECENT.lock().find(fingerprint(&payload), &payload).is_some(), "kept after the first");
        b.encode(&server_frame(0x81, &payload), &mut out_b);
        assert_eq!(out_a, out_b);
        // A different payload of the same length is not mistaken for it.
        let mut other = payload.clone();
        other[20] = b'8';
        let mut out_c = BytesMut::new();
        b.encode(&server_frame(0x81, &other), &mut out_c);
        assert_ne!(out_a, out_c);
        assert_eq!(inflate(&mut Decompress::new(false), &frames(&out_c)[0].1), other);
    }

    /// The layer under tungstenite: a compressed client message arrives as
    /// a text message; the reply leaves compressed.
    #[tokio::test]
    async fn frame_layer_under_tungstenite() {
        use futures_util::{SinkExt, StreamExt};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio_tungstenite::WebSocketStream;
        use tokio_tungstenite::tungstenite::Message;
        use tokio_tungstenite::tungstenite::protocol::Role;

        let (server_io, mut client) = tokio::io::duplex(1 << 20);
        let layer = FrameLayer::new(server_io, agreed(true), 1 << 20);
        let mut ws = WebSocketStream::from_raw_socket(layer, Role::Server, None).await;
        let text = "grüße ".repeat(10_000);
        client.write_all(&client_frame(0xc1, &deflate(text.as_bytes()))).await.expect("write");
        let got = ws.next().await.expect("a message").expect("valid");
        assert_eq!(got, Message::text(text.clone()));
        ws.send(Message::text(text.clone())).await.expect("send");
        let mut head = [0u8; 4];
        client.read_exact(&mut head).await.expect("header");
        assert_eq!((head[0], head[1]), (0xc1, 126), "compressed, 16-bit length");
        let mut body = vec![0u8; usize::from(u16::from_be_bytes([head[2], head[3]]))];
        client.read_exact(&mut body).await.expect("payload");
        assert_eq!(inflate(&mut Decompress::new(false), &body), text.as_bytes());

        // Invalid UTF-8: the read fails with the layer's error, at once.
        client.write_all(&client_frame(0x81, b"\xff")[..7]).await.expect("write");
        let err = ws.next().await.expect("an error").expect_err("invalid");
        let tokio_tungstenite::tungstenite::Error::Io(io) = err else { panic!("{err:?}") };
        assert_eq!(FrameError::of(&io), Some(FrameError::InvalidUtf8));
    }
}
