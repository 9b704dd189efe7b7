//! A real browser's WebTransport against the real binary: headless Chromium
//! (driven by `tests/browser/wt.mjs` through playwright-core, with QUIC
//! enabled) opens `new WebTransport(...)` on `switchboard dev`'s QUIC
//! listener, trusting the generated certificate by its SHA-256 through
//! `serverCertificateHashes`, speaks the protobuf frames, receives REST
//! publishes on a channel stream and as datagrams, and publishes a message
//! that a WebSocket subscriber here receives.
//!
//! Needs `node`, `/usr/bin/chromium` and `tests/browser/node_modules`; when
//! one is missing the test fails and says to run `bash tests/run.sh`, which
//! installs them. It never skips silently.

mod common;

use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{DevGateway, SCRIPT_WAIT, repo_root, require_browser};
use switchboard::tooling::client::{SubEvent, subscribe_ws};

/// Subscribes to `channel` over WebSocket on a thread of its own: the first
/// message's payload arrives on the returned channel, after a unit on the
/// first one once the subscription is in place.
fn ws_subscriber(http: &str, channel: &str) -> (mpsc::Receiver<()>, mpsc::Receiver<Vec<u8>>) {
    let (ready_tx, ready) = mpsc::channel();
    let (got_tx, got) = mpsc::channel();
    let base = format!("ws://{http}");
    let channel = channel.to_string();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async move {
            let on_event = |ev| match ev {
                SubEvent::Subscribed(_) => ready_tx.send(()).is_ok(),
                SubEvent::Message(m) => {
                    let _ = got_tx.send(m.payload.to_vec());
                    false
                }
                _ => true,
            };
            let _ = tokio::time::timeout(SCRIPT_WAIT, subscribe_ws(&base, &channel, None, on_event)).await;
        });
    });
    (ready, got)
}

#[test]
fn chromium_webtransport_streams_datagrams_and_publishes() {
    let root = repo_root();
    require_browser(&root);
    let gw = DevGateway::start();
    let quic = gw.quic.clone().expect("the dev banner lists the WebTransport listener");
    let (ready, from_browser) = ws_subscriber(&gw.http, "browser/out");
    ready.recv_timeout(Duration::from_secs(15)).expect("the WebSocket subscription is in place");

    let node = Command::new("node")
        .arg(root.join("tests/browser/wt.mjs"))
        .arg(format!("http://{}", gw.http))
        .arg(&quic)
        .arg(&gw.cert_hash)
        .current_dir(&root)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn node");
    let pid = node.id();
    let (done_tx, done) = mpsc::channel();
    std::thread::spawn(move || done_tx.send(node.wait_with_output()));
    let Ok(output) = done.recv_timeout(SCRIPT_WAIT) else {
        // Ours, by PID: the script bounds itself, so this is a hang.
        let _ = Command::new("kill").arg(pid.to_string()).status();
        panic!("wt.mjs did not exit within {SCRIPT_WAIT:?}");
    };
    let output = output.expect("node ran");
    let (status, out, err) =
        (output.status, String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    let last = out.lines().last().unwrap_or_default();
    assert!(status.success(), "wt.mjs failed ({status}): {last}\nstderr:\n{err}");
    let result: serde_json::Value = serde_json::from_str(last).expect("result line is JSON");
    assert_eq!(result["ok"], true, "{last}");
    assert_eq!(result["messages"], 3, "{last}");
    assert_eq!(result["datagrams"], 3, "{last}");
    let payload = from_browser.recv_timeout(Duration::from_secs(15)).expect("the browser's publish reached WebSocket");
    assert_eq!(payload, b"hello from chromium");
}
