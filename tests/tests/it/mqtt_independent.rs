//! MQTT clients that share no code with the gateway: Eclipse Paho for
//! Python (`tests/python/paho_client.py`) and Eclipse Mosquitto's
//! `mosquitto_sub` / `mosquitto_pub`, each over MQTT 3.1.1 and 5,
//! publishing and subscribing, cross-checked with rumqttc and WebSocket
//! peers.
//!
//! Needs `python3` with paho-mqtt and Debian's mosquitto-clients; when one
//! is missing the test fails and says to run `bash tests/run.sh`, which
//! installs them. It never skips. Every spawned process is killed (by PID)
//! when its handle drops, and every wait is bounded.

use super::common_mqtt;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use common_mqtt::*;
use serde_json::{Value, json};
use switchboard_proto::{self as proto, Protocol, server_frame};
use switchboard_tests::*;
use tokio::sync::mpsc;

const PAHO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/python/paho_client.py");
/// The clients give up by themselves after 20 s; this catches a hang.
const CLIENT_WAIT: Duration = Duration::from_secs(30);

fn require_paho() {
    let ok = Command::new("python3")
        .args(["-c", "import paho.mqtt.client"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "python3 with paho-mqtt is missing: run `bash tests/run.sh`, which installs it");
}

fn require_mosquitto() {
    for tool in ["mosquitto_sub", "mosquitto_pub"] {
        let found = Command::new(tool).arg("--help").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
        assert!(found, "{tool} (Debian mosquitto-clients) is missing: run `bash tests/run.sh`, which installs it");
    }
}

/// A client process: its stdout lines, its stderr for error messages;
/// killed by PID when dropped.
struct Proc {
    name: String,
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    stderr: Arc<Mutex<String>>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn spawn(name: &str, program: &str, args: &[&str], stdin: Option<&[u8]>) -> anyhow::Result<Self> {
        let mut child = Command::new(program)
            .args(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawn {program}: run `bash tests/run.sh`"))?;
        let out = child.stdout.take().context("stdout")?;
        let mut err = child.stderr.take().context("stderr")?;
        let input = child.stdin.take();
        // Owned by `Proc` from here on, so a failure below still kills it.
        let (tx, lines) = mpsc::unbounded_channel();
        let stderr = Arc::new(Mutex::new(String::new()));
        let p = Proc { name: name.into(), child, lines, stderr: Arc::clone(&stderr) };
        if let (Some(mut input), Some(bytes)) = (input, stdin) {
            input.write_all(bytes)?;
        }
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            *stderr.lock().expect("stderr lock") = s;
        });
        Ok(p)
    }

    fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The next stdout line.
    async fn line(&mut self) -> anyhow::Result<String> {
        match tokio::time::timeout(CLIENT_WAIT, self.lines.recv()).await {
            Ok(Some(l)) => Ok(l),
            Ok(None) => {
                let status = self.exited().await;
                bail!("{}: output ended ({status:?}); stderr: {}", self.name, self.stderr())
            }
            Err(_) => bail!("{}: no output within {CLIENT_WAIT:?}; stderr: {}", self.name, self.stderr()),
        }
    }

    /// The next stdout line as JSON.
    async fn json(&mut self) -> anyhow::Result<Value> {
        let l = self.line().await?;
        serde_json::from_str(&l).map_err(|e| anyhow!("{}: not JSON ({e}): {l}", self.name))
    }

    async fn exited(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let mut status = None;
        let child = &mut self.child;
        eventually(CLIENT_WAIT, "the client to exit", || {
            if status.is_none() {
                status = child.try_wait().ok().flatten();
            }
            let done = status.is_some();
            async move { done }
        })
        .await?;
        status.ok_or_else(|| anyhow!("no exit status"))
    }

    /// Waits for the process to exit with status 0.
    async fn success(&mut self) -> anyhow::Result<()> {
        let status = self.exited().await?;
        if !status.success() {
            bail!("{} failed: {status}; stderr: {}", self.name, self.stderr());
        }
        Ok(())
    }
}

fn flag(ver: Ver) -> &'static str {
    match ver {
        Ver::V4 => "--v311",
        Ver::V5 => "--v5",
    }
}

fn mosquitto_version(ver: Ver) -> &'static str {
    match ver {
        Ver::V4 => "mqttv311",
        Ver::V5 => "mqttv5",
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

const BINARY: &[u8] = &[0x00, 0xff, 0xfe, 0x80, b'\n', 0x41];

/// Paho subscribes; rumqttc (same version) and WebSocket publish.
async fn paho_subscribes(ver: Ver) -> anyhow::Result<()> {
    require_paho();
    let gw = TestGateway::start().await?;
    let base = format!("ind/paho-sub/{ver:?}");
    let port = gw.mqtt.port().to_string();
    let filter = format!("{base}/#");
    let args = ["-u", PAHO, "sub", "127.0.0.1", &port, &filter, "4", flag(ver), "--id", "paho-sub"];
    let mut sub = Proc::spawn("paho sub", "python3", &args, None)?;
    assert_eq!(sub.json().await?, json!({"event": "subscribed", "granted": [2]}));

    let mut p = Mqtt::connect(gw.mqtt, ver, "rumqttc-pub").await?;
    p.publish_ok(&format!("{base}/a"), 0, BINARY).await?;
    p.publish_ok(&format!("{base}/b"), 1, "grüße").await?;
    p.publish_ok(&format!("{base}/c"), 2, "{\"n\": 1}").await?;
    let mut ws = WsClient::connect(&gw.ws, Codec::Proto, "ws-pub").await?;
    let publish = proto::Publish {
        channel: format!("{base}/ws"),
        payload: Bytes::from_static(b"from ws"),
        headers: BTreeMap::from([("h".to_string(), "1".to_string())]),
        ..Default::default()
    };
    let reply = ws.publish_frame(publish).await?;
    assert!(matches!(reply.frame, Some(server_frame::Frame::PublishAck(_))), "{reply:?}");

    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(sub.json().await?);
    }
    let msg = |topic: &str, qos: u8, payload: &[u8], props: Value| {
        json!({
            "event": "message",
            "topic": format!("{base}/{topic}"),
            "qos": qos,
            "retain": false,
            "payload_hex": hex(payload),
            "text": std::str::from_utf8(payload).ok(),
            "user_properties": props,
        })
    };
    // WebSocket headers become user properties (MQTT 5 only); a WebSocket
    // publish reaches the subscriber at its QoS.
    let ws_props = if ver == Ver::V5 { json!([["h", "1"]]) } else { json!([]) };
    let want = [
        msg("a", 0, BINARY, json!([])),
        msg("b", 1, "grüße".as_bytes(), json!([])),
        msg("c", 2, b"{\"n\": 1}", json!([])),
        msg("ws", 2, b"from ws", ws_props),
    ];
    assert_eq!(got, want);
    sub.success().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_subscribes_v311() -> anyhow::Result<()> {
    paho_subscribes(Ver::V4).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_subscribes_v5() -> anyhow::Result<()> {
    paho_subscribes(Ver::V5).await
}

/// Paho publishes; rumqttc and WebSocket subscribers receive.
async fn paho_publishes(ver: Ver) -> anyhow::Result<()> {
    require_paho();
    let gw = TestGateway::start().await?;
    let topic = format!("ind/paho-pub/{ver:?}");
    let port = gw.mqtt.port().to_string();
    let mut sub = Mqtt::connect(gw.mqtt, Ver::V5, "rumqttc-sub").await?;
    sub.sub(&topic, 2).await?;
    let mut ws = WsClient::connect(&gw.ws, Codec::Proto, "ws-sub").await?;
    ws.subscribe_to(&topic).await?;

    let payload = format!("hex:{}", hex(BINARY));
    let mut args = vec!["-u", PAHO, "pub", "127.0.0.1", &port, &topic, &payload, "2", flag(ver), "--id", "paho-pub"];
    if ver == Ver::V5 {
        args.extend(["--prop", "trace=p-1"]);
    }
    let mut p = Proc::spawn("paho pub", "python3", &args, None)?;
    assert_eq!(p.json().await?, json!({"event": "published"}));
    p.success().await?;
    let args = ["-u", PAHO, "pub", "127.0.0.1", &port, &topic, "second ✓", "1", flag(ver), "--id", "paho-pub"];
    let mut p = Proc::spawn("paho pub", "python3", &args, None)?;
    p.success().await?;

    let props: Vec<(String, String)> = if ver == Ver::V5 { vec![("trace".into(), "p-1".into())] } else { Vec::new() };
    let m = sub.next_msg().await?;
    assert_eq!((m.topic.as_str(), &m.payload[..], m.qos, m.retain), (topic.as_str(), BINARY, 2, false));
    assert_eq!(m.user_properties(), props);
    let m = sub.next_msg().await?;
    assert_eq!((m.text().as_str(), m.qos), ("second ✓", 1));

    let e = ws.next_message().await?;
    assert_eq!((&e.payload[..], e.serial, e.headers.into_iter().collect::<Vec<_>>()), (BINARY, 1, props));
    let who = e.publisher.expect("publisher");
    assert_eq!((who.client_id.as_str(), who.protocol()), ("paho-pub", Protocol::Mqtt));
    let e = ws.next_message().await?;
    assert_eq!((&e.payload[..], e.serial), ("second ✓".as_bytes(), 2));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_publishes_v311() -> anyhow::Result<()> {
    paho_publishes(Ver::V4).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_publishes_v5() -> anyhow::Result<()> {
    paho_publishes(Ver::V5).await
}

/// `mosquitto_sub` subscribes; rumqttc publishes. A retained message,
/// published before it starts, tells when its subscription is in place.
async fn mosquitto_subscribes(ver: Ver) -> anyhow::Result<()> {
    require_mosquitto();
    let gw = TestGateway::start().await?;
    let base = format!("ind/mosq-sub/{ver:?}");
    let mut p = Mqtt::connect(gw.mqtt, ver, "rumqttc-pub").await?;
    assert_eq!(p.publish(&format!("{base}/ready"), 1, true, "ready").await?, 0);

    let port = gw.mqtt.port().to_string();
    let filter = format!("{base}/#");
    let args = [
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-t",
        &filter,
        "-q",
        "2",
        "-C",
        "4",
        "-W",
        "20",
        "-V",
        mosquitto_version(ver),
        "-i",
        "mosq-sub",
        "-F",
        "%t|%q|%r|%x",
    ];
    let mut sub = Proc::spawn("mosquitto_sub", "mosquitto_sub", &args, None)?;
    assert_eq!(sub.line().await?, format!("{base}/ready|1|1|{}", hex(b"ready")), "the retained value first");
    p.publish_ok(&format!("{base}/a"), 0, BINARY).await?;
    p.publish_ok(&format!("{base}/b"), 1, "grüße").await?;
    p.publish_ok(&format!("{base}/c/d"), 2, "deep").await?;
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(sub.line().await?);
    }
    let want = [
        format!("{base}/a|0|0|{}", hex(BINARY)),
        format!("{base}/b|1|0|{}", hex("grüße".as_bytes())),
        format!("{base}/c/d|2|0|{}", hex(b"deep")),
    ];
    assert_eq!(got, want);
    sub.success().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_subscribes_v311() -> anyhow::Result<()> {
    mosquitto_subscribes(Ver::V4).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_subscribes_v5() -> anyhow::Result<()> {
    mosquitto_subscribes(Ver::V5).await
}

/// `mosquitto_pub` publishes (binary from stdin; a retained text); rumqttc
/// and WebSocket subscribers receive.
async fn mosquitto_publishes(ver: Ver) -> anyhow::Result<()> {
    require_mosquitto();
    let gw = TestGateway::start().await?;
    let topic = format!("ind/mosq-pub/{ver:?}");
    let port = gw.mqtt.port().to_string();
    let mut sub = Mqtt::connect(gw.mqtt, ver, "rumqttc-sub").await?;
    sub.sub(&topic, 2).await?;
    let mut ws = WsClient::connect(&gw.ws, Codec::Json, "ws-sub").await?;
    ws.subscribe_to(&topic).await?;

    let common = ["-h", "127.0.0.1", "-p", &port, "-t", &topic, "-V", mosquitto_version(ver), "-i", "mosq-pub"];
    let mut args: Vec<&str> = common.to_vec();
    args.extend(["-q", "1", "-s"]);
    if ver == Ver::V5 {
        args.extend(["-D", "publish", "user-property", "trace", "m-1"]);
    }
    Proc::spawn("mosquitto_pub", "mosquitto_pub", &args, Some(BINARY))?.success().await?;
    let mut args: Vec<&str> = common.to_vec();
    args.extend(["-q", "2", "-r", "-m", "retained ✓"]);
    Proc::spawn("mosquitto_pub", "mosquitto_pub", &args, None)?.success().await?;

    let props: Vec<(String, String)> = if ver == Ver::V5 { vec![("trace".into(), "m-1".into())] } else { Vec::new() };
    let m = sub.next_msg().await?;
    assert_eq!((m.topic.as_str(), &m.payload[..], m.qos, m.retain), (topic.as_str(), BINARY, 1, false));
    assert_eq!(m.user_properties(), props);
    let m = sub.next_msg().await?;
    assert_eq!((m.text().as_str(), m.qos, m.retain), ("retained ✓", 2, false));

    let e = ws.next_message().await?;
    assert_eq!((&e.payload[..], e.serial, e.headers.into_iter().collect::<Vec<_>>()), (BINARY, 1, props));
    let who = e.publisher.expect("publisher");
    assert_eq!((who.client_id.as_str(), who.protocol()), ("mosq-pub", Protocol::Mqtt));
    let e = ws.next_message().await?;
    assert_eq!((&e.payload[..], e.serial, e.retain), ("retained ✓".as_bytes(), 2, true));

    // The retained one is the value a new subscriber gets.
    let mut late = Mqtt::connect(gw.mqtt, ver, "late").await?;
    late.sub(&topic, 2).await?;
    let m = late.next_msg().await?;
    assert_eq!((m.text().as_str(), m.qos, m.retain), ("retained ✓", 2, true));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_publishes_v311() -> anyhow::Result<()> {
    mosquitto_publishes(Ver::V4).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_publishes_v5() -> anyhow::Result<()> {
    mosquitto_publishes(Ver::V5).await
}
