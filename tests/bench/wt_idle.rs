//! Gateway memory per idle WebTransport session: N sessions (each with its
//! control stream, connected and subscribed, then silent) held open against
//! a fresh `switchboard dev`, with the gateway's VmRSS (from
//! /proc/PID/status) read before and after.
//!
//! ```sh
//! cargo build --release -p switchboard
//! cargo run --release -p switchboard-tests --example wt_idle -- --sessions 1000 --channels distinct
//! ```
//!
//! `--channels` says what each session subscribes to: `distinct` (one
//! channel each), `shared` (all the same one), `none` (connected only), or
//! `bare` (no control stream at all: the QUIC connection and WebTransport
//! session alone, which the server then holds for its handshake timeout).
//!
//! A benchmark, not a test: it asserts nothing about size and is not part of
//! `tests/run.sh`. Results go in docs/performance.md. All sessions share one
//! client UDP socket on 127.0.0.1. The baseline is read after a warm-up (20
//! sessions opened and closed) so that start-up costs are not charged to the
//! sessions; kernel socket buffers are not in the process's RSS.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::BytesMut;
use prost::Message as _;
use switchboard_proto::{self as proto, client_frame, server_frame};
use switchboard_protocols::wt::codec;
use wtransport::endpoint::endpoint_side::Client;
use wtransport::tls::Sha256Digest;
use wtransport::{ClientConfig, Connection, Endpoint, RecvStream, SendStream};

/// One idle session, kept open.
struct Idle {
    conn: Connection,
    _send: SendStream,
    _recv: RecvStream,
}

struct Args {
    sessions: usize,
    channels: String,
    binary: PathBuf,
}

fn args() -> anyhow::Result<Args> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut a = Args { sessions: 1000, channels: "distinct".into(), binary: root.join("target/release/switchboard") };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--sessions" => a.sessions = value.parse()?,
            "--channels" => a.channels = value,
            "--binary" => a.binary = value.into(),
            other => bail!("unknown flag {other} (--sessions N, --channels distinct|shared|none|bare, --binary PATH)"),
        }
    }
    Ok(a)
}

/// `switchboard dev` on free ports: the process, `host:port` of HTTP,
/// admin and QUIC, and the certificate hash.
fn start_gateway(binary: &PathBuf) -> anyhow::Result<(Child, String, String, String, [u8; 32])> {
    use std::io::BufRead;
    let free = "127.0.0.1:0";
    let mut child = Command::new(binary)
        .args(["dev", "--http", free, "--admin", free, "--mqtt", free, "--https", free, "--mqtts", free])
        .args(["--quic", free])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("start {} (cargo build --release -p switchboard)", binary.display()))?;
    let out = std::io::BufReader::new(child.stdout.take().context("stdout")?);
    let (mut http, mut admin, mut quic, mut hash) = (String::new(), String::new(), String::new(), String::new());
    let after = |line: &str, prefix: &str| {
        line.split(prefix).nth(1).and_then(|r| r.split(['/', ' ']).next()).unwrap_or_default().to_string()
    };
    for line in out.lines() {
        let line = line?;
        let l = line.trim_start();
        if l.starts_with("REST") {
            http = after(l, "http://");
        } else if l.starts_with("admin") {
            admin = after(l, "http://");
        } else if l.starts_with("WebTransport") {
            quic = after(l, "https://");
        } else if let Some(h) = l.strip_prefix("cert SHA-256 ") {
            hash = h.trim().to_string();
        } else if l.starts_with("Try:") {
            break;
        }
    }
    let mut digest = [0u8; 32];
    for (i, b) in digest.iter_mut().enumerate() {
        *b = u8::from_str_radix(hash.get(2 * i..2 * i + 2).context("cert hash in the banner")?, 16)?;
    }
    Ok((child, http, admin, quic, digest))
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("VmRSS value")?.parse()?)
}

async fn sessions_open(admin: &str) -> anyhow::Result<u64> {
    let v: serde_json::Value = reqwest::get(format!("http://{admin}/v1/stats")).await?.json().await?;
    v["sessions"].as_u64().context("stats.sessions")
}

fn framed(req: u64, frame: client_frame::Frame) -> Vec<u8> {
    let mut out = BytesMut::new();
    codec::put_frame(&mut out, &proto::ClientFrame { req, frame: Some(frame) }.encode_to_vec());
    out.to_vec()
}

/// Opens one session: control stream, `connect`, optionally `subscribe`;
/// returns once both are answered.
async fn open(endpoint: &Endpoint<Client>, url: &str, channel: Option<String>) -> anyhow::Result<Idle> {
    let conn = endpoint.connect(url).await?;
    let (mut send, mut recv) = conn.open_bi().await?.await?;
    if channel.as_deref() == Some("") {
        // `--channels bare`: the session only, no control stream.
        return Ok(Idle { conn, _send: send, _recv: recv });
    }
    let connect = proto::Connect::default();
    send.write_all(&framed(1, client_frame::Frame::Connect(connect))).await?;
    let mut want = 1;
    if let Some(filter) = channel {
        let sub = proto::Subscribe { filter, ..Default::default() };
        send.write_all(&framed(2, client_frame::Frame::Subscribe(sub))).await?;
        want = 2;
    }
    let mut buf = BytesMut::new();
    let mut got = 0;
    while got < want {
        if let Some(body) = codec::split_frame(&mut buf, 1 << 20)? {
            match proto::ServerFrame::decode(body)?.frame {
                Some(server_frame::Frame::Connected(_) | server_frame::Frame::Subscribed(_)) => got += 1,
                other => bail!("unexpected reply {other:?}"),
            }
            continue;
        }
        let chunk = recv.quic_stream_mut().read_chunk(4096, true).await?.context("control stream ended")?;
        buf.extend_from_slice(&chunk.bytes);
    }
    Ok(Idle { conn, _send: send, _recv: recv })
}

async fn open_many(
    endpoint: &Endpoint<Client>,
    url: &str,
    n: usize,
    channel: impl Fn(usize) -> Option<String>,
) -> anyhow::Result<Vec<Idle>> {
    let mut out = Vec::with_capacity(n);
    // 50 handshakes at a time.
    for start in (0..n).step_by(50) {
        let batch = (start..n.min(start + 50)).map(|i| open(endpoint, url, channel(i)));
        for r in futures_util::future::join_all(batch).await {
            out.push(r?);
        }
    }
    Ok(out)
}

async fn wait_sessions(admin: &str, n: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while sessions_open(admin).await? != n {
        if Instant::now() > deadline {
            bail!("the gateway never counted {n} sessions");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    let (mut child, _http, admin, quic, hash) = start_gateway(&a.binary)?;
    let pid = child.id();
    let run = async {
        let config = ClientConfig::builder()
            .with_bind_address("127.0.0.1:0".parse()?)
            .with_server_certificate_hashes([Sha256Digest::new(hash)])
            .build();
        let endpoint = Endpoint::client(config)?;
        let url = format!("https://{quic}/v1/wt");
        let channel = |i: usize| match a.channels.as_str() {
            "distinct" => Some(format!("idle/{i}")),
            "shared" => Some("idle/all".to_string()),
            "bare" => Some(String::new()),
            _ => None,
        };

        let warm = open_many(&endpoint, &url, 20, &channel).await?;
        for s in &warm {
            s.conn.close(0u32.into(), b"");
        }
        drop(warm);
        wait_sessions(&admin, 0).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before = rss_kib(pid)?;

        let started = Instant::now();
        let idle = open_many(&endpoint, &url, a.sessions, &channel).await?;
        // Bare sessions never open a core session (and are closed after the
        // handshake timeout, 10 s: the reading below comes well before).
        let counted = if a.channels == "bare" { 0 } else { a.sessions as u64 };
        wait_sessions(&admin, counted).await?;
        let opened_in = started.elapsed();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = rss_kib(pid)?;
        let per = (after.saturating_sub(before)) * 1024 / a.sessions as u64;
        println!(
            "{}",
            serde_json::json!({
                "sessions": a.sessions,
                "channels": a.channels,
                "rss_before_kib": before,
                "rss_after_kib": after,
                "per_session_bytes": per,
                "opened_in_ms": opened_in.as_millis() as u64,
            })
        );
        println!(
            "{} idle WebTransport sessions ({} channels): RSS {:.1} MiB -> {:.1} MiB, {} B ({:.1} KiB) per session",
            a.sessions,
            a.channels,
            before as f64 / 1024.0,
            after as f64 / 1024.0,
            per,
            per as f64 / 1024.0
        );
        for s in &idle {
            s.conn.close(0u32.into(), b"");
        }
        anyhow::Ok(())
    };
    let result = run.await;
    // Ours, by PID.
    let _ = child.kill();
    let _ = child.wait();
    result
}
