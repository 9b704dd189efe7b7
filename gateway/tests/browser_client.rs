//! The browser client (`/v1/client.js`) and the demo page (`/`) in headless
//! Chromium against the real binary (`tests/browser/client.mjs`,
//! `tests/browser/demo.mjs`, through playwright-core):
//!
//! - each transport forced in turn — WebTransport, WebSocket, SSE, long
//!   polling — subscribes, publishes (acknowledged at the positions then
//!   delivered), receives every message once in order, enters presence (the
//!   event, and exactly one member: this client), reads history, receives on
//!   a subscription made while it was connecting, and gets a new
//!   subscription's rewind of messages another subscription already had;
//! - fallback through a proxy the script runs: no QUIC listener → WebSocket;
//!   WebSocket upgrades refused → SSE; streamed responses held back as a
//!   buffering proxy does → long polling; everything allowed again → back up
//!   to WebSocket; every message at every stage;
//! - recovery: the page goes offline while messages are published and while
//!   it publishes itself, and comes back to every message once, in order,
//!   its queued publishes acknowledged; then the same across a forced change
//!   of transport (WebSocket refused meanwhile: back on SSE);
//! - gaps: on every transport, a `trimmed` gap (history kept less than the
//!   page missed while offline) reaches the page, with the positions;
//! - a dead path: a proxy stops carrying anything on the open connections
//!   (nothing closes); WebSocket pings, SSE `ping` events and a poll's
//!   deadline notice it, and the client recovers every message;
//! - drain: the node drains, the client is told to go (1012) and, once a
//!   second node is up on the same address and store, recovers every
//!   message with no gap;
//! - tokens: in token mode, a client per transport with `getToken` and
//!   3-second tokens refreshes in place and never drops over 8 s;
//! - the demo page loads from the gateway alone, shows one `switchboard pub`
//!   message at the same position in all five panes, and `mosquitto_sub`
//!   gets it too, over HTTP and over HTTPS; screenshots are kept in
//!   `target/browser-artifacts/`.
//!
//! Needs `node`, `/usr/bin/chromium`, `tests/browser/node_modules` and
//! `mosquitto_sub`; `bash tests/run.sh` installs them. Never skips.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{BIN, DevGateway, WAIT, plain_dev, repo_root, require_browser, run_browser_script};
use serde_json::Value;

/// client.mjs bounds itself at 90 s; this only catches a hung `node`.
const CLIENT_SCRIPT_WAIT: Duration = Duration::from_secs(120);

fn client_scenario(scenario: &str, http: &str) -> Value {
    let root = repo_root();
    require_browser(&root);
    run_browser_script(&root, "client.mjs", &[scenario.to_string(), format!("http://{http}")], CLIENT_SCRIPT_WAIT)
}

#[test]
fn each_transport_forced_subscribes_publishes_and_has_presence_and_history() {
    let gw = DevGateway::start();
    let result = client_scenario("forced", &gw.http);
    let last = result.to_string();
    for transport in ["webtransport", "websocket", "sse", "poll"] {
        let r = &result["results"][transport];
        assert_eq!(r["transport"], transport, "{transport} was forced: {last}");
        assert_eq!(r["messages"], 5, "{transport}: {last}");
        assert_eq!(r["serials"], serde_json::json!([1, 2, 3, 4, 5]), "{transport}: {last}");
        let me = format!("page-{transport}");
        let members = r["presence"]["members"].as_array().expect("members");
        assert_eq!(members.len(), 1, "{transport}: exactly one member, this client: {last}");
        assert_eq!(members[0]["client_id"], me.as_str(), "{transport}: {last}");
        assert_eq!(members[0]["data"]["role"], "tester", "{transport}: {last}");
        assert_eq!(r["presence"]["enter"]["client_id"], me.as_str(), "{transport}: {last}");
        assert_eq!(r["history"]["serial"], 5, "{transport}: {last}");
        assert_eq!(
            r["history"]["texts"],
            serde_json::json!(["page 1", "page 2", "page 3", "rest 4", "rest 5"]),
            "{transport}: {last}"
        );
        assert_eq!(r["early"], 1, "{transport}: a subscription made while connecting: {last}");
        assert_eq!(r["rewound"], serde_json::json!(["page 3", "rest 4", "rest 5"]), "{transport}: {last}");
    }
}

#[test]
fn the_client_falls_back_when_transports_are_blocked_and_climbs_back() {
    // No QUIC listener: WebTransport is not offered at all.
    let (_gw, banner) = plain_dev(&[], None, &[], WAIT);
    let result = client_scenario("fallback", &banner.http);
    let last = result.to_string();
    let stages = &result["stages"];
    for (stage, transport) in
        [("no_quic", "websocket"), ("no_websocket", "sse"), ("no_streaming", "poll"), ("climb_back", "websocket")]
    {
        assert_eq!(stages[stage]["transport"], transport, "{stage}: {last}");
    }
    for stage in ["no_quic", "no_websocket", "no_streaming"] {
        assert_eq!(stages[stage]["messages"], 5, "{stage}: {last}");
    }
    assert_eq!(stages["climb_back"]["messages"], 8, "{last}");
    // Each stage tried the better transports first, in order.
    let states =
        |s: &str| stages[s]["states"].as_array().expect("states").iter().map(|v| v.to_string()).collect::<Vec<_>>();
    let tried = |s: &str, t: &str| states(s).iter().any(|x| x.contains(&format!("connecting:{t}")));
    assert!(tried("no_websocket", "websocket") && tried("no_streaming", "sse"), "{last}");
}

#[test]
fn the_client_recovers_every_message_after_going_offline_and_across_a_transport_change() {
    let (_gw, banner) = plain_dev(&[], None, &[], WAIT);
    let result = client_scenario("recovery", &banner.http);
    let last = result.to_string();
    assert_eq!(result["first"], "websocket", "{last}");
    assert_eq!(result["back"], "websocket", "{last}");
    assert_eq!(result["switched"], "sse", "{last}");
    // 3 before, 4 away, 2 queued by the page, 2 after, 4 during the switch, 1 on SSE.
    assert_eq!(result["messages"], 16, "{last}");
    assert_eq!(result["gaps"], 0, "nothing was lost, so no gap: {last}");
    let acks = result["acks"].as_array().expect("acks");
    assert_eq!(acks.len(), 2, "{last}");
    for ack in acks {
        assert_eq!(ack["duplicate"], false, "sent once after the reconnect: {last}");
    }
}

#[test]
fn a_gap_history_cannot_fill_reaches_the_page_on_every_transport() {
    let gw = DevGateway::start_env(&[("SWITCHBOARD_CHANNELS__HISTORY_SIZE", "3")]);
    let result = client_scenario("gaps", &gw.http);
    let last = result.to_string();
    for transport in ["webtransport", "websocket", "sse", "poll"] {
        let r = &result["results"][transport];
        // Serials 3..8 were published while away; history kept 6..8, too
        // late for a position at 2: a `trimmed` gap from 2 to 8, then live.
        assert_eq!(r["gaps"], serde_json::json!([{"reason": "trimmed", "from": 2, "to": 8}]), "{transport}: {last}");
        assert_eq!(r["texts"], serde_json::json!(["kept 1", "kept 2", "after"]), "{transport}: {last}");
        assert_eq!(r["serials"], serde_json::json!([1, 2, 9]), "{transport}: {last}");
    }
}

#[test]
fn a_path_that_dies_in_silence_is_noticed_and_recovered() {
    let (_gw, banner) = plain_dev(&[], None, &[("SWITCHBOARD_SSE__KEEPALIVE", "1s")], WAIT);
    let result = client_scenario("silent", &banner.http);
    let last = result.to_string();
    for transport in ["websocket", "sse", "poll"] {
        assert_eq!(result["results"][transport]["messages"], 5, "{transport}: {last}");
    }
    // WebSocket and SSE end the dead transport and reconnect; a poll past
    // its deadline is simply polled again.
    for transport in ["websocket", "sse"] {
        let d = &result["results"][transport]["disconnects"];
        assert!(d.as_array().is_some_and(|d| !d.is_empty()), "{transport}: {last}");
    }
}

#[test]
fn the_client_reconnects_and_recovers_across_a_drain() {
    let root = repo_root();
    require_browser(&root);
    let dir = common::DataDir::new("browser-drain");
    let mut first = common::Node::start(&dir.0, None, &[]);
    let (http, admin, mqtt) = (first.http.clone(), first.admin.clone(), first.mqtt.clone());
    let script = {
        let (root, http, admin) = (root.clone(), http.clone(), admin.clone());
        std::thread::spawn(move || {
            run_browser_script(
                &root,
                "client.mjs",
                &["drain".to_string(), format!("http://{http}"), format!("http://{admin}")],
                CLIENT_SCRIPT_WAIT,
            )
        })
    };
    // The script asks for the drain; the node exits within its grace.
    common::wait_child(&mut first.proc.child, Duration::from_secs(60), "the draining node");
    let _second = common::Node::start(&dir.0, Some((&http, &admin, &mqtt)), &[]);
    let result = script.join().expect("the script thread");
    let last = result.to_string();
    assert_eq!(result["told"], 1012, "told to reconnect elsewhere: {last}");
    assert_eq!(result["messages"], 6, "{last}");
    assert_eq!(result["gaps"], serde_json::json!([]), "same store: nothing lost, no gap: {last}");
}

#[test]
fn every_transport_refreshes_its_token_in_place_before_it_expires() {
    let secret = "browser-client-secret-browser-client";
    let keys = format!("[{{ kid = \"k1\", alg = \"HS256\", secret = \"{secret}\" }}]");
    let gw = DevGateway::start_env(&[
        ("SWITCHBOARD_AUTH__MODE", "token"),
        ("SWITCHBOARD_AUTH__KEYS", &keys),
        ("SWITCHBOARD_AUTH__LEEWAY", "0s"),
    ]);
    let root = repo_root();
    require_browser(&root);
    let result = run_browser_script(
        &root,
        "client.mjs",
        &["tokens".to_string(), format!("http://{}", gw.http), secret.to_string()],
        CLIENT_SCRIPT_WAIT,
    );
    let last = result.to_string();
    for transport in ["webtransport", "websocket", "sse", "poll"] {
        let r = &result["results"][transport];
        // Tokens live 3 s and the run lasts 8 s: the first token and at
        // least two refreshes, each taken in place.
        assert!(r["minted"].as_u64().is_some_and(|n| n >= 3), "{transport}: {last}");
        let states = r["states"].as_array().expect("states");
        let connects = states.iter().filter(|s| s.as_str().is_some_and(|s| s.starts_with("connected:"))).count();
        assert_eq!(connects, 1, "{transport} never dropped: {last}");
        assert!(
            !states.iter().any(|s| s.as_str().is_some_and(|s| s.starts_with("disconnected"))),
            "{transport}: {last}"
        );
        assert_eq!(r["errors"], serde_json::json!([]), "{transport}: {last}");
    }
}

#[test]
fn the_demo_page_shows_one_message_on_every_transport_and_on_mqtt() {
    demo_page(false);
}

/// The same page from the HTTPS listener (HTTP/2; dev's certificate).
#[test]
fn the_demo_page_works_over_https() {
    demo_page(true);
}

fn demo_page(https: bool) {
    let root = repo_root();
    require_browser(&root);
    let gw = DevGateway::start();
    let text = format!("hello-{}-{https}", std::process::id());
    let (host, port) = gw.mqtt.rsplit_once(':').expect("host:port");
    let mosquitto = Command::new("mosquitto_sub")
        .args(["-h", host, "-p", port, "-t", "demo", "-v", "-C", "1", "-W", "60"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub (Debian mosquitto-clients; bash tests/run.sh installs it)");
    wait_for_subscription(&gw.admin);

    let dir = root.join("target/browser-artifacts");
    std::fs::create_dir_all(&dir).expect("artefact directory");
    let shot = dir.join(if https { "demo-https.png" } else { "demo.png" });
    let _ = std::fs::remove_file(&shot);
    let page = if https { format!("https://{}", gw.https) } else { format!("http://{}", gw.http) };
    let result = run_browser_script(
        &root,
        "demo.mjs",
        &[format!("http://{}", gw.http), BIN.to_string(), text.clone(), shot.display().to_string(), page],
        CLIENT_SCRIPT_WAIT,
    );
    let last = result.to_string();
    for (pane, transport) in [
        ("webtransport", "webtransport"),
        ("websocket", "websocket"),
        ("sse", "sse"),
        ("poll", "poll"),
        ("auto", "webtransport"),
    ] {
        assert_eq!(result["transports"][pane], transport, "{pane}: {last}");
    }
    let positions = result["positions"].as_object().expect("positions");
    let first = &positions["websocket"];
    for (pane, p) in positions {
        assert_eq!((&p["serial"], &p["epoch"]), (&first["serial"], &first["epoch"]), "{pane}: {last}");
    }
    assert_eq!(result["shown"], 5, "on screen in every pane: {last}");
    assert_eq!(result["foreign"], serde_json::json!([]), "no request left the gateway: {last}");
    assert_eq!(result["page_errors"], serde_json::json!([]), "{last}");
    let published = result["published"].as_str().expect("pub output");
    assert_eq!(published, format!("demo {}:{}", first["epoch"].as_str().expect("epoch"), first["serial"]));

    let out = mosquitto.wait_with_output().expect("mosquitto_sub ran");
    assert!(out.status.success(), "mosquitto_sub: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("demo {text}"));
    let png = std::fs::read(&shot).expect("the screenshot was written");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "a real screenshot: {} bytes", png.len());
}

/// Waits until the gateway holds a subscription (mosquitto_sub's).
fn wait_for_subscription(admin: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let stats: Option<Value> =
            reqwest::blocking::get(format!("http://{admin}/v1/stats")).ok().and_then(|r| r.json().ok());
        if stats.is_some_and(|s| s["subscriptions"].as_u64() >= Some(1)) {
            return;
        }
        assert!(Instant::now() < deadline, "mosquitto_sub did not subscribe within {WAIT:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
