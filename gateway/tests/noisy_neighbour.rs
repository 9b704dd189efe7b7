//! The noisy-neighbour test of #13: one client runs each attack of the
//! hardening issue in turn against the release binary, with ordinary
//! (dev) credentials, while a victim subscriber on another channel keeps
//! receiving a steady publish stream. For every attack the victim's p99
//! delivery latency stays within twice its quiet value just before (or 80 ms, the
//! noise floor of a shared 2-core machine that is also compiling — one
//! attack (unread history) took it to 195 ms before its fix — whichever is larger), it loses
//! nothing, and the gateway's RSS stays under 512 MB (docs/security.md).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::DevGateway;
use parking_lot::Mutex;
use switchboard::tooling::client;

/// The documented RSS bound of the node under these attacks.
const RSS_BOUND: u64 = 512 * 1024 * 1024;

fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// A WebSocket connection opened by hand (JSON subprotocol), connected as
/// `client_id`; the attacker decides what, if anything, it reads.
fn raw_ws(http: &str, client_id: &str) -> Option<TcpStream> {
    let mut s = TcpStream::connect(http).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET /v1/ws HTTP/1.1\r\nHost: {http}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: switchboard.v1.json\r\n\r\n"
    )
    .ok()?;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).ok()?;
        head.push(b[0]);
    }
    if !head.starts_with(b"HTTP/1.1 101") {
        return None;
    }
    s.write_all(&text_frame(&format!(r#"{{"type":"connect","req":1,"client_id":"{client_id}"}}"#))).ok()?;
    Some(s)
}

/// A masked client text frame (mask key 0).
fn text_frame(text: &str) -> Vec<u8> {
    let p = text.as_bytes();
    let mut f = vec![0x81];
    if p.len() < 126 {
        f.push(0x80 | p.len() as u8);
    } else {
        f.push(0x80 | 126);
        f.extend_from_slice(&(p.len() as u16).to_be_bytes());
    }
    f.extend_from_slice(&[0, 0, 0, 0]);
    f.extend_from_slice(p);
    f
}

/// The victim's latencies, microseconds, and the serials it saw.
#[derive(Default)]
struct Victim {
    latencies: Vec<u64>,
    serials: Vec<u64>,
}

fn p99(mut v: Vec<u64>) -> u64 {
    if v.is_empty() {
        return u64::MAX;
    }
    v.sort_unstable();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

/// Each attack: a name and what it does for about two seconds.
type Attack = (&'static str, Box<dyn Fn(&str) + Send + Sync>);

fn attacks() -> Vec<Attack> {
    vec![
        // Item 1: shared groups on many connections.
        (
            "shared groups",
            Box::new(|http: &str| {
                let conns: Vec<TcpStream> = (0..20)
                    .filter_map(|c| {
                        let mut s = raw_ws(http, &format!("share{c}"))?;
                        for g in 0..256 {
                            let f =
                                format!(r#"{{"type":"subscribe","req":{},"filter":"$share/g{c}x{g}/jobs/#"}}"#, g + 2);
                            s.write_all(&text_frame(&f)).ok()?;
                        }
                        Some(s)
                    })
                    .collect();
                std::thread::sleep(Duration::from_secs(2));
                drop(conns);
            }),
        ),
        // Item 2: forged cursors over many channels.
        (
            "forged cursors",
            Box::new(|http: &str| {
                let since1 = switchboard_protocols::cursor::Cursor::new(1).encode();
                let c = reqwest::blocking::Client::new();
                let until = Instant::now() + Duration::from_secs(2);
                while Instant::now() < until {
                    let _ = c.get(format!("http://{http}/v1/poll?channel=q/%23&cursor={since1}&timeout=0")).send();
                }
            }),
        ),
        // Item 4: pipelined history requests never read, and REST history
        // responses never read.
        (
            "unread history",
            Box::new(|http: &str| {
                let mut held = Vec::new();
                for c in 0..8 {
                    if let Some(mut s) = raw_ws(http, &format!("hist{c}")) {
                        for req in 2..66 {
                            let f = format!(r#"{{"type":"history","req":{req},"channel":"big","limit":300}}"#);
                            let _ = s.write_all(&text_frame(&f));
                        }
                        held.push(s);
                    }
                }
                for _ in 0..40 {
                    if let Ok(mut s) = TcpStream::connect(http) {
                        let _ = write!(s, "GET /v1/channels/big/history?limit=300 HTTP/1.1\r\nHost: x\r\n\r\n");
                        held.push(s);
                    }
                }
                std::thread::sleep(Duration::from_secs(2));
            }),
        ),
        // Item 6: channels through positions, presence entries.
        (
            "channels and presence",
            Box::new(|http: &str| {
                let Some(mut s) = raw_ws(http, "hoarder") else { return };
                let until = Instant::now() + Duration::from_secs(2);
                let mut req = 2;
                while Instant::now() < until && req < 2_000 {
                    let positions: Vec<String> =
                        (0..1000).map(|i| format!(r#""h{req}/{i}":{{"epoch":"E","serial":0}}"#)).collect();
                    let f = format!(
                        r#"{{"type":"subscribe","req":{req},"filter":"h{req}/#","positions":{{{}}}}}"#,
                        positions.join(",")
                    );
                    if s.write_all(&text_frame(&f)).is_err() {
                        break;
                    }
                    let p = format!(r#"{{"type":"presence.enter","req":{},"channel":"p/{req}","data":"x"}}"#, req + 1);
                    let _ = s.write_all(&text_frame(&p));
                    req += 2;
                }
            }),
        ),
        // Item 8: one IP churning connections.
        (
            "connection churn",
            Box::new(|http: &str| {
                let until = Instant::now() + Duration::from_secs(2);
                while Instant::now() < until {
                    drop(TcpStream::connect(http));
                }
            }),
        ),
        // A subscriber of the victim's own channel that never reads.
        (
            "a subscriber that never reads",
            Box::new(|http: &str| {
                let s = raw_ws(http, "sloth").map(|mut s| {
                    let _ = s.write_all(&text_frame(r#"{"type":"subscribe","req":2,"filter":"victim"}"#));
                    s
                });
                std::thread::sleep(Duration::from_secs(2));
                drop(s);
            }),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_hostile_client_does_not_starve_another() {
    let gw = DevGateway::start();
    let http = gw.http.clone();
    let base = format!("http://{http}");
    // Material for the attacks: a channel of 300 × 60 KiB, 2 000 channels
    // under q/.
    {
        let http = http.clone();
        tokio::task::spawn_blocking(move || {
            let c = reqwest::blocking::Client::new();
            let big = "z".repeat(60 * 1024);
            for _ in 0..300 {
                c.post(format!("http://{http}/v1/channels/big/messages")).body(big.clone()).send().unwrap();
            }
            for i in 0..2_000 {
                c.post(format!("http://{http}/v1/channels/q/{i}/messages")).body("x").send().unwrap();
            }
        })
        .await
        .unwrap();
    }

    // The victim: a WebSocket subscriber of `victim`; a publisher sends the
    // publish time every 5 ms over one keep-alive connection.
    let victim = Arc::new(Mutex::new(Victim::default()));
    let seen = victim.clone();
    let ws_base = format!("ws://{http}");
    let sub = tokio::spawn(async move {
        let _ = client::subscribe_ws(&ws_base, "victim", None, |e| {
            if let client::SubEvent::Message(m) = e {
                let sent: u64 = std::str::from_utf8(&m.payload).ok().and_then(|t| t.parse().ok()).unwrap_or(0);
                let mut v = seen.lock();
                v.latencies.push(now_us().saturating_sub(sent));
                v.serials.push(m.serial);
            }
            true
        })
        .await;
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let stop = stop.clone();
        let base = base.clone();
        tokio::spawn(async move {
            let c = reqwest::Client::new();
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let url = format!("{base}/v1/channels/victim/messages");
                if c.post(url).body(now_us().to_string()).send().await.is_ok_and(|r| r.status().is_success()) {
                    sent += 1;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            sent
        })
    };

    // Quiet, then each attack in turn.
    let measure = |what: &'static str| {
        let victim = victim.clone();
        async move {
            let from = victim.lock().latencies.len();
            tokio::time::sleep(Duration::from_secs(2)).await;
            let v = victim.lock();
            (what, p99(v.latencies[from..].to_vec()))
        }
    };
    // Each attack is measured against the quiet period just before it, and
    // gets a second try when the first is over the bound: a machine shared
    // with other work can be loaded through one window, while an attack that
    // starves the victim does so every time.
    let mut peak_rss = 0;
    for (name, attack) in attacks() {
        let attack: Arc<dyn Fn(&str) + Send + Sync> = Arc::from(attack);
        for attempt in 1..=2 {
            let (_, quiet) = measure("quiet").await;
            assert!(quiet < 1_000_000, "the victim receives at all (quiet p99 {quiet} µs)");
            let bound = (2 * quiet).max(80_000);
            let (h, attack) = (http.clone(), attack.clone());
            let running = tokio::task::spawn_blocking(move || attack(&h));
            let (_, during) = measure(name).await;
            running.await.unwrap();
            peak_rss = peak_rss.max(rss(gw.pid()));
            eprintln!("{name}: the victim's p99 {during} µs (quiet {quiet} µs), RSS {} MB", peak_rss >> 20);
            assert!(peak_rss < RSS_BOUND, "{name}: RSS {} MB", peak_rss / (1024 * 1024));
            if during <= bound {
                break;
            }
            assert!(
                attempt < 2,
                "{name}: the victim's p99 was {during} µs twice over its bound (quiet {quiet} µs, bound {bound} µs)"
            );
        }
    }

    // Nothing lost, nothing twice, in order.
    stop.store(true, Ordering::Relaxed);
    let sent = publisher.await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    sub.abort();
    let v = victim.lock();
    assert_eq!(v.serials.len() as u64, sent, "the victim got every message once");
    assert!(v.serials.windows(2).all(|w| w[1] == w[0] + 1), "in order, no gap");
}
