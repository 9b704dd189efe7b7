//! Smoke runs of `switchboard bench` against a real `switchboard dev`: tiny
//! loads, checking that the bench runs on every protocol and that its
//! accounting adds up. No timing thresholds (CI machines are noisy), and
//! `invalid` is not asserted for the same reason.

mod common;

use std::time::Duration;

use common::{DevGateway, run_to_end};

fn bench_json(args: &[&str]) -> serde_json::Value {
    let (status, out) = run_to_end(args, Duration::from_secs(90));
    assert!(status.success(), "bench {args:?} exited with {status}; stdout: {out}");
    let line = out.lines().rev().find(|l| l.starts_with('{')).unwrap_or_else(|| panic!("no JSON in {out:?}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("bad JSON {line:?}: {e}"))
}

fn fanout(proto: &str) {
    let gw = DevGateway::start();
    let (url, mqtt, pid) = (format!("http://{}", gw.http), format!("mqtt://{}", gw.mqtt), gw.pid().to_string());
    let args = [
        "bench",
        "fanout",
        "--proto",
        proto,
        "--channels",
        "2",
        "--subs-per-channel",
        "3",
        "--pubs",
        "2",
        "--rate",
        "50",
        "--duration",
        "2s",
        "--size",
        "100",
        "--url",
        &url,
        "--mqtt-url",
        &mqtt,
        "--json",
        "--server-pid",
        &pid,
    ];
    let r = bench_json(&args);
    assert_eq!(r["lost"], 0, "{r}");
    assert_eq!(r["duplicated"], 0, "{r}");
    assert_eq!(r["reordered"], 0, "{r}");
    assert_eq!(r["unexpected"], 0, "{r}");
    let published = r["published"].as_u64().expect("published");
    assert!(published > 0, "{r}");
    // Every message goes to one channel of three subscribers.
    assert_eq!(r["deliveries"].as_u64(), Some(published * 3), "{r}");
    assert_eq!(r["expected_deliveries"].as_u64(), Some(published * 3), "{r}");
    for k in ["p50_us", "p99_us", "p999_us", "max_us", "deliveries_per_sec", "publishes_per_sec", "invalid"] {
        assert!(!r[k].is_null(), "{k} missing in {r}");
    }
    for k in ["server_cpu_us_per_delivery", "deliveries_per_server_cpu_sec", "writes_per_delivery", "rss_bytes"] {
        assert!(r.get(k).is_some(), "{k} missing in {r}");
    }
    assert!(r["rss_bytes"].as_u64().is_some_and(|b| b > 0), "{r}");
}

#[test]
fn fanout_ws() {
    fanout("ws");
}

#[test]
fn fanout_mqtt() {
    fanout("mqtt");
}

#[test]
fn fanout_sse() {
    fanout("sse");
}

#[test]
fn fanout_poll() {
    fanout("poll");
}

#[test]
fn recovery_ws_is_exactly_once() {
    let gw = DevGateway::start();
    let url = format!("http://{}", gw.http);
    let r =
        bench_json(&["bench", "recovery", "--proto", "ws", "--subs", "5", "--missed", "20", "--url", &url, "--json"]);
    assert_eq!(r["exactly_once"], true, "{r}");
    assert_eq!(r["lost"], 0, "{r}");
    assert_eq!(r["duplicated"], 0, "{r}");
    assert_eq!(r["deliveries"].as_u64(), Some(100), "{r}");
}

#[test]
fn cross_mqtt_to_sse() {
    let gw = DevGateway::start();
    let (url, mqtt) = (format!("http://{}", gw.http), format!("mqtt://{}", gw.mqtt));
    let r = bench_json(&[
        "bench",
        "cross",
        "--pub-proto",
        "mqtt",
        "--sub-proto",
        "sse",
        "--channels",
        "2",
        "--subs-per-channel",
        "2",
        "--rate",
        "40",
        "--duration",
        "1s",
        "--url",
        &url,
        "--mqtt-url",
        &mqtt,
        "--json",
    ]);
    assert_eq!(
        (r["lost"].as_u64(), r["duplicated"].as_u64(), r["reordered"].as_u64()),
        (Some(0), Some(0), Some(0)),
        "{r}"
    );
    assert_eq!(r["deliveries"].as_u64(), r["published"].as_u64().map(|p| p * 2), "{r}");
}

#[test]
fn idle_and_churn_complete() {
    let gw = DevGateway::start();
    let url = format!("http://{}", gw.http);
    let r =
        bench_json(&["bench", "idle", "--proto", "ws", "--conns", "20", "--hold", "200ms", "--url", &url, "--json"]);
    assert_eq!(r["connections"], 20, "{r}");
    assert_eq!(r["client_errors"], 0, "{r}");
    let r =
        bench_json(&["bench", "churn", "--proto", "sse", "--rate", "20", "--duration", "1s", "--url", &url, "--json"]);
    assert_eq!(r["lost"], 0, "{r}");
    assert_eq!(r["deliveries"], r["published"], "{r}");
}
