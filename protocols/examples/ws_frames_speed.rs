//! What the WebSocket frame layer costs on the read path: client frames
//! read through tungstenite alone, and through
//! [`FrameLayer`](switchboard_protocols::ws_frames::FrameLayer) (without
//! deflate: the plain path every `/v1/ws` connection takes; and with
//! compressed messages), from memory, on one thread. Also the cost of
//! compressing outbound messages.
//!
//! ```sh
//! cargo run --release -p switchboard-protocols --example ws_frames_speed
//! ```
//!
//! A benchmark, not a test: it prints numbers and asserts only that every
//! message arrived. Results are recorded in docs/protocol.md.

use std::io::Cursor;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use flate2::{Compress, Compression, FlushCompress};
use futures_util::StreamExt;
use switchboard_protocols::ws_frames::{Deflate, FrameLayer, Outbound};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

const MASK: [u8; 4] = [0x12, 0x34, 0x56, 0x78];
const LIMIT: usize = 1 << 20;

fn frame(out: &mut Vec<u8>, first: u8, payload: &[u8]) {
    out.push(first);
    match payload.len() {
        n @ 0..=125 => out.push(0x80 | n as u8),
        n @ 126..=0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&MASK);
    out.extend(payload.iter().enumerate().map(|(i, p)| p ^ MASK[i % 4]));
}

fn deflate(c: &mut Compress, data: &[u8]) -> Vec<u8> {
    c.reset();
    let mut out = Vec::with_capacity(data.len() + 64);
    loop {
        let at = c.total_in() as usize;
        c.compress_vec(&data[at..], &mut out, FlushCompress::Sync).expect("compress");
        if out.len() < out.capacity() {
            break;
        }
        out.reserve(out.capacity());
    }
    out.truncate(out.len() - 4);
    out
}

/// Reads every message of `io` through tungstenite; the time it took.
async fn read_all<S: AsyncRead + AsyncWrite + Unpin>(io: S, messages: usize) -> Duration {
    let cfg =
        WebSocketConfig::default().read_buffer_size(4096).max_message_size(Some(LIMIT)).max_frame_size(Some(LIMIT));
    let start = Instant::now();
    let mut ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(cfg)).await;
    let mut n = 0;
    // The input ends without a close frame: an error after the last message.
    while let Some(Ok(_)) = ws.next().await {
        n += 1;
    }
    assert_eq!(n, messages);
    start.elapsed()
}

fn report(what: &str, messages: usize, bytes: usize, took: Duration) {
    let s = took.as_secs_f64();
    println!("{what:<58} {:>10.0} msg/s {:>8.1} MB/s", messages as f64 / s, bytes as f64 / s / 1e6);
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let json = br#"{"type":"publish","req":12345,"channel":"sensors/kitchen/temp","text":"{\"temp\":21.5,\"unit\":\"C\",\"ts\":1733580000}"}"#;
    let big: Vec<u8> = json.iter().copied().cycle().take(64 * 1024).collect();
    for (what, first, payload, count) in [
        ("text, 120 B (JSON publish)", 0x81u8, &json[..], 400_000usize),
        ("binary, 120 B", 0x82, &json[..], 400_000),
        ("text, 64 KiB", 0x81, &big[..], 2_000),
    ] {
        let mut wire = Vec::new();
        for _ in 0..count {
            frame(&mut wire, first, payload);
        }
        let bytes = wire.len();
        // Best of three, each way.
        let mut plain = Duration::MAX;
        let mut layered = Duration::MAX;
        for _ in 0..3 {
            plain = plain.min(read_all(Cursor::new(wire.clone()), count).await);
            layered = layered.min(read_all(FrameLayer::new(Cursor::new(wire.clone()), None, LIMIT), count).await);
        }
        report(&format!("{what}: tungstenite alone"), count, bytes, plain);
        report(&format!("{what}: through the frame layer"), count, bytes, layered);
        println!("{:<58} {:>+9.1} %", "  difference", (layered.as_secs_f64() / plain.as_secs_f64() - 1.0) * 100.0);
    }

    // Compressed inbound (no context takeover: a fresh window per message).
    let deflate_params = Deflate { server_context_takeover: false, client_context_takeover: false, min_size: 256 };
    let delivery: Vec<u8> = br#"{"type":"message","channel":"sensors/kitchen/temp","serial":1234,"text":"{\"temp\":21.5}"},"#
        .iter()
        .copied()
        .cycle()
        .take(2600)
        .collect();
    let mut c = Compress::new(Compression::default(), false);
    let body = deflate(&mut c, &delivery);
    let count = 50_000;
    let mut wire = Vec::new();
    for _ in 0..count {
        frame(&mut wire, 0xc1, &body);
    }
    let mut took = Duration::MAX;
    for _ in 0..3 {
        took = took.min(read_all(FrameLayer::new(Cursor::new(wire.clone()), Some(deflate_params), LIMIT), count).await);
    }
    report(
        &format!("compressed text, 2.6 KiB ({} B on the wire), inflated", body.len()),
        count,
        count * delivery.len(),
        took,
    );

    // Outbound compression, as tungstenite writes the frames: distinct
    // messages (each compressed), then one message to many connections (a
    // fan-out: compressed once, then found among the recent ones).
    let frame_of = |payload: &[u8]| {
        let mut f = vec![0x81, 126];
        f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        f.extend_from_slice(payload);
        f
    };
    let mut e = Outbound::new(deflate_params);
    let mut out = BytesMut::new();
    let mut distinct = delivery.clone();
    let start = Instant::now();
    for i in 0..count {
        distinct[..8].copy_from_slice(&(i as u64).to_le_bytes());
        e.encode(&frame_of(&distinct), &mut out);
        out.clear();
    }
    report(
        "compressed text, 2.6 KiB, deflated, every message new (level 1)",
        count,
        count * delivery.len(),
        start.elapsed(),
    );
    let same = frame_of(&delivery);
    let start = Instant::now();
    for _ in 0..count {
        Outbound::new(deflate_params).encode(&same, &mut out);
        out.clear();
    }
    report("compressed text, 2.6 KiB, one message to many connections", count, count * delivery.len(), start.elapsed());
}
