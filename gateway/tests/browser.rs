//! A real browser's `EventSource` against the real binary: headless Chromium
//! (driven by `tests/browser/eventsource.mjs` through playwright-core)
//! subscribes to two channels, the server ends the stream halfway through
//! (admin `POST /v1/sessions/{id}/close`), and the browser's own reconnect
//! with `Last-Event-ID` must leave the page with every message exactly once,
//! in per-channel order — with no client code for the reconnect.
//!
//! `browser_websocket_negotiates_permessage_deflate`: Chromium's WebSocket
//! negotiates permessage-deflate and round-trips messages both ways.
//!
//! Needs `node`, `/usr/bin/chromium` and `tests/browser/node_modules`; when
//! one is missing the test fails and says to run `bash tests/run.sh`, which
//! installs them. It never skips silently.

mod common;

use std::io::Read;
use std::time::Duration;

use common::{DevGateway, SCRIPT_WAIT, repo_root, require_browser};

fn run_script(root: &std::path::Path, script: &str, args: &[String]) -> serde_json::Value {
    common::run_browser_script(root, script, args, SCRIPT_WAIT)
}

#[test]
fn eventsource_resumes_by_itself_after_the_server_drops_it() {
    let root = repo_root();
    require_browser(&root);
    let gw = DevGateway::start();
    let result = run_script(&root, "eventsource.mjs", &[format!("http://{}", gw.http), format!("http://{}", gw.admin)]);
    let last = result.to_string();
    assert_eq!(result["messages"], 12, "{last}");
    assert_eq!(result["connected"], 2, "one stream, then the browser's own reconnect: {last}");
    assert_eq!(result["sse_requests"], 2, "{last}");
    assert_eq!(result["disconnect"]["code"], 4003, "{last}");
    assert!(result["last_event_id_on_reconnect"].as_str().is_some_and(|s| !s.is_empty()), "{last}");
}

/// Chromium's own WebSocket negotiates permessage-deflate with the gateway
/// (no context takeover either way, the default) and round-trips messages
/// up to just under the message limit, compressible and not
/// (`tests/browser/ws_deflate.mjs`).
#[test]
fn browser_websocket_negotiates_permessage_deflate() {
    let root = repo_root();
    require_browser(&root);
    let gw = DevGateway::start();
    let result = run_script(&root, "ws_deflate.mjs", &[format!("http://{}", gw.http)]);
    let last = result.to_string();
    assert_eq!(
        result["extensions"], "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
        "{last}"
    );
    assert_eq!(result["round_trips"], 6, "{last}");
    assert_eq!(result["close"]["code"], 1000, "{last}");
    // Compressed both ways: Chromium compressed what it sent, the gateway
    // what it delivered (the small acknowledgements went uncompressed).
    let metrics = http_get(&gw.admin, "/metrics");
    for direction in ["in", "out"] {
        let line = format!("switchboard_ws_compressed_messages_total{{direction=\"{direction}\"}} ");
        let count: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {line} in /metrics:\n{metrics}"));
        assert!(count >= 5, "{direction}: {count} compressed messages");
    }
}

/// A plain HTTP/1.1 GET; the response body.
fn http_get(addr: &str, path: &str) -> String {
    use std::io::Write as _;
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default()
}
