//! Hostile clients against the real binary (#13): each test runs an attack
//! a client with ordinary credentials could run and checks the gateway's
//! memory (its RSS, read from /proc) stays bounded while another client is
//! still served.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::DevGateway;

/// The gateway's resident memory, bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kb * 1024
}

/// Fills channel `big` with 300 messages of 60 KiB over REST.
fn fill_big_channel(http: &str) {
    let client = reqwest::blocking::Client::new();
    let body = "z".repeat(60 * 1024);
    for _ in 0..300 {
        let r = client.post(format!("http://{http}/v1/channels/big/messages")).body(body.clone()).send().unwrap();
        assert!(r.status().is_success(), "{}", r.status());
    }
}

/// A WebSocket connection opened by hand, so the test decides exactly what
/// it reads (nothing, here).
fn raw_ws(http: &str) -> TcpStream {
    let mut s = TcpStream::connect(http).unwrap();
    write!(
        s,
        "GET /v1/ws HTTP/1.1\r\nHost: {http}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: switchboard.v1.json\r\n\r\n"
    )
    .unwrap();
    // Read the 101 response head, byte by byte so nothing after it is taken.
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).unwrap();
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    s
}

/// A masked client text frame (mask key 0: the payload is sent as is).
fn text_frame(text: &str) -> Vec<u8> {
    let p = text.as_bytes();
    let mut f = vec![0x81];
    match p.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    f.extend_from_slice(&[0, 0, 0, 0]);
    f.extend_from_slice(p);
    f
}

/// Whether a bystander still gets a REST publish acknowledged and reads it
/// back, within a second.
fn bystander_served(http: &str) -> bool {
    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(1)).build().unwrap();
    let started = Instant::now();
    let ok = client
        .post(format!("http://{http}/v1/channels/bystander/messages"))
        .body("still here")
        .send()
        .is_ok_and(|r| r.status().is_success())
        && client
            .get(format!("http://{http}/v1/channels/bystander/history?limit=1&reverse=1"))
            .send()
            .is_ok_and(|r| r.status().is_success());
    ok && started.elapsed() < Duration::from_secs(1)
}

/// #13 item 4: 64 pipelined WebSocket `history` requests on a channel of
/// 300 × 60 KiB, never read, grew the gateway by 1.2 GB; 40 REST history
/// GETs never read pinned 806 MB. Pages are now bounded in bytes and a
/// batch of replies in bytes, so both stay within tens of MB.
#[test]
fn unread_history_replies_do_not_pin_memory() {
    let gw = DevGateway::start();
    fill_big_channel(&gw.http);
    let before = rss(gw.pid());

    let mut ws = raw_ws(&gw.http);
    ws.write_all(&text_frame(r#"{"type":"connect","req":1,"client_id":"hog"}"#)).unwrap();
    for req in 2..66 {
        let frame = format!(r#"{{"type":"history","req":{req},"channel":"big","limit":300}}"#);
        ws.write_all(&text_frame(&frame)).unwrap();
    }
    let mut rest: Vec<TcpStream> = (0..40)
        .map(|_| {
            let mut s = TcpStream::connect(&gw.http).unwrap();
            write!(s, "GET /v1/channels/big/history?limit=300 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    let grown = rss(gw.pid()).saturating_sub(before);
    assert!(bystander_served(&gw.http), "another client is served meanwhile");
    assert!(grown < 150 * 1024 * 1024, "the gateway grew by {} MB", grown / (1024 * 1024));
    drop((ws, rest.drain(..)));
}
