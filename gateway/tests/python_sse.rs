//! SSE read by an independent client: `tests/python/sse_client.py`
//! (sseclient-py over Python's own HTTP client) against the real binary.
//! Messages published over REST — text with a line break, a JSON document,
//! raw bytes — must reach it exactly, in order, with the payload mapping of
//! docs/protocol.md.
//!
//! Needs `python3` with `sseclient-py`; when it is missing the test fails and
//! says to run `bash tests/run.sh`, which installs it. It never skips.

mod common;

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{DevGateway, eventually, repo_root, wait_child};

use serde_json::{Value, json};

/// The client fails by itself after 20 s without data; this catches a hang.
const CLIENT_WAIT: Duration = Duration::from_secs(30);
const CHANNEL: &str = "py/x";

/// A child process killed (by PID) on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Fails (never skips) when python3 or sseclient-py is not installed. The
/// `events` attribute tells sseclient-py from the unrelated `sseclient`
/// package, which has the same module name.
fn require_prerequisites() {
    let fix = "run `bash tests/run.sh` (it installs sseclient-py)";
    let probe = Command::new("python3").args(["-c", "import sseclient; sseclient.SSEClient.events"]).output();
    match probe {
        Err(e) => panic!("cannot run python3 ({e}): {fix}"),
        Ok(o) => assert!(
            o.status.success(),
            "python3 has no sseclient-py module: {fix}\n{}",
            String::from_utf8_lossy(&o.stderr)
        ),
    }
}

#[test]
fn sseclient_py_reads_rest_publishes_in_order() {
    require_prerequisites();
    let gw = DevGateway::start();
    let http = reqwest::blocking::Client::new();

    // (raw payload published, the payload field the client must print)
    let mut cases: Vec<(Vec<u8>, (&str, Value))> =
        (1..=20).map(|n| (format!("py #{n}").into_bytes(), ("text", json!(format!("py #{n}"))))).collect();
    cases.push((b"two\nlines".to_vec(), ("text", json!("two\nlines"))));
    cases.push((br#"{"t":21.5,"ok":[true,null]}"#.to_vec(), ("data", json!({"t": 21.5, "ok": [true, null]}))));
    cases.push((vec![0x00, 0xff, 0x80], ("data_b64", json!("AP+A"))));
    cases.push(("grüße ✓".as_bytes().to_vec(), ("text", json!("grüße ✓"))));

    let mut client = Killed(
        Command::new("python3")
            .arg(repo_root().join("tests/python/sse_client.py"))
            .arg(format!("http://{}", gw.http))
            .arg(cases.len().to_string())
            .arg(CHANNEL)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn python3"),
    );
    let mut out = client.0.stdout.take().expect("stdout");
    let mut err = client.0.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });

    // Publish only once the client's stream is subscribed.
    eventually("the Python client's SSE session", || {
        reqwest::blocking::get(format!("http://{}/v1/stats", gw.admin))
            .and_then(|r| r.json::<Value>())
            .is_ok_and(|v| v["subscriptions"].as_u64() == Some(1))
    });
    for (n, (body, _)) in cases.iter().enumerate() {
        let ack: Value = http
            .post(format!("http://{}/v1/channels/{CHANNEL}/messages", gw.http))
            .body(body.clone())
            .send()
            .and_then(|r| r.error_for_status())
            .and_then(|r| r.json())
            .expect("publish over REST");
        assert_eq!(ack["serial"], n as u64 + 1, "{ack}");
    }

    let status = wait_child(&mut client.0, CLIENT_WAIT, "sse_client.py");
    let out = out.join().expect("stdout reader");
    let err = err.join().expect("stderr reader");
    assert!(status.success(), "sse_client.py failed ({status}):\n{err}");

    let got: Vec<Value> = serde_json::from_str(out.trim()).expect("client prints one JSON array");
    assert_eq!(got.len(), cases.len(), "{out}");
    for (i, (m, (_, (field, want)))) in got.iter().zip(&cases).enumerate() {
        assert_eq!(m["channel"], CHANNEL, "{m}");
        assert_eq!(m["serial"], i as u64 + 1, "in order: {m}");
        assert_eq!(&m[*field], want, "payload of message {}: {m}", i + 1);
        assert!(m["id"].as_str().is_some_and(|s| !s.is_empty()), "every event carries a cursor id: {m}");
    }
}
