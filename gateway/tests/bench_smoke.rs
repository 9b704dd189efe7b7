//! Smoke runs of `switchboard bench` against a real `switchboard dev` and
//! against the peers it is compared with (nats-server over TCP, WebSocket
//! and JetStream, nginx + Nchan for SSE and long polling): tiny loads, checking
//! that the bench runs on every protocol and that its accounting adds up.
//! No timing thresholds (CI machines are noisy), and `invalid` is not
//! asserted for the same reason. The peers are Debian packages that
//! `tests/run.sh` installs; a missing one fails the test, naming it.

mod common;

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{DevGateway, repo_root, run_to_end};

fn bench_json(args: &[&str]) -> serde_json::Value {
    let (status, out) = run_to_end(args, Duration::from_secs(90));
    assert!(status.success(), "bench {args:?} exited with {status}; stdout: {out}");
    let line = out.lines().rev().find(|l| l.starts_with('{')).unwrap_or_else(|| panic!("no JSON in {out:?}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("bad JSON {line:?}: {e}"))
}

fn fanout(proto: &str) {
    let gw = DevGateway::start();
    let (url, mqtt, pid) = (format!("http://{}", gw.http), format!("mqtt://{}", gw.mqtt), gw.pid().to_string());
    fanout_with(&["--proto", proto, "--url", &url, "--mqtt-url", &mqtt, "--server-pid", &pid]);
}

/// A tiny fan-out (2 channels × 3 subscribers, 2 publishers) with `extra`
/// flags; asserts exact accounting and a complete report.
fn fanout_with(extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "bench",
        "fanout",
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
        "--json",
    ];
    args.extend_from_slice(extra);
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
    r
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

/// `--proto wt` against the dev gateway's QUIC listener, the certificate
/// hash read from its `/v1/wt/cert-hash` (no `--cert-hash` given).
fn wt_args(gw: &DevGateway) -> Vec<String> {
    let quic = gw.quic.as_deref().expect("the dev banner lists a WebTransport address");
    vec!["--url".into(), format!("http://{}", gw.http), "--wt-url".into(), format!("https://{quic}/v1/wt")]
}

#[test]
fn fanout_wt() {
    let gw = DevGateway::start();
    let pid = gw.pid().to_string();
    let mut extra = vec!["--proto".to_string(), "wt".into(), "--server-pid".into(), pid];
    extra.extend(wt_args(&gw));
    let r = fanout_with(&extra.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(r["sub_proto"], "wt", "{r}");
    assert_eq!(r["pub_proto"], "wt", "{r}");
}

#[test]
fn recovery_wt_is_exactly_once() {
    let gw = DevGateway::start();
    let mut args = vec!["bench", "recovery", "--proto", "wt", "--subs", "5", "--missed", "20", "--json"];
    let wt = wt_args(&gw);
    args.extend(wt.iter().map(String::as_str));
    let r = bench_json(&args);
    assert_eq!(r["exactly_once"], true, "{r}");
    assert_eq!((r["lost"].as_u64(), r["duplicated"].as_u64()), (Some(0), Some(0)), "{r}");
    assert_eq!(r["deliveries"].as_u64(), Some(100), "{r}");
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
    // And over WebTransport, whose sessions share the bench's endpoints.
    let wt = wt_args(&gw);
    let wt: Vec<&str> = wt.iter().map(String::as_str).collect();
    let r = bench_json(
        &[&["bench", "idle", "--proto", "wt", "--conns", "20", "--hold", "200ms", "--json"], &wt[..]].concat(),
    );
    assert_eq!(r["connections"], 20, "{r}");
    assert_eq!(r["client_errors"], 0, "{r}");
    let r = bench_json(
        &[&["bench", "churn", "--proto", "wt", "--rate", "20", "--duration", "1s", "--json"], &wt[..]].concat(),
    );
    assert_eq!(r["lost"], 0, "{r}");
    assert_eq!(r["deliveries"], r["published"], "{r}");
}

/// Every TCP protocol over TLS (`https://`, `mqtts://`, dev's certificate
/// with `--insecure`): exact accounting as in plain runs, and one full
/// handshake per connection in the report's `tls` figures.
#[test]
fn fanout_over_tls_on_every_tcp_protocol() {
    let gw = DevGateway::start();
    let (https, mqtts, pid) = (format!("https://{}", gw.https), format!("mqtts://{}", gw.mqtts), gw.pid().to_string());
    for proto in ["ws", "sse", "poll", "mqtt"] {
        let r =
            fanout_with(&["--proto", proto, "--url", &https, "--mqtt-url", &mqtts, "--insecure", "--server-pid", &pid]);
        let tls = &r["tls"];
        // 6 subscribers and 2 publishers, each on its own TLS connection
        // (REST publishers may open a few more from their pool).
        let n = tls["handshakes"].as_u64().expect("tls.handshakes");
        assert!(n >= 8, "{proto}: {r}");
        assert_eq!(tls["failed"], 0, "{proto}: {r}");
        assert_eq!(tls["full"].as_u64(), Some(n - tls["resumed"].as_u64().unwrap_or(0)), "{proto}: {r}");
        assert!(tls["p50_us"].as_u64().is_some_and(|v| v > 0), "{proto}: {r}");
    }
}

/// With `--ca` the bench verifies the server's chain: a gateway serving
/// `switchboard cert dev`'s server certificate is reached with that CA, and
/// another CA is refused (every handshake fails, counted).
#[test]
fn a_tls_target_is_verified_against_the_ca_given() {
    let dir = temp_dir("bench-ca");
    let (a, b) = (dir.join("a"), dir.join("b"));
    for out in [&a, &b] {
        let (status, _) = run_to_end(&["cert", "dev", "--out", out.to_str().unwrap()], Duration::from_secs(30));
        assert!(status.success());
    }
    let certs = format!(
        "[{{ cert = {:?}, key = {:?} }}]",
        a.join("server.pem").display().to_string(),
        a.join("server.key").display().to_string()
    );
    let gw = DevGateway::start_env(&[("SWITCHBOARD_TLS__CERTIFICATES", &certs)]);
    let https = format!("https://{}", gw.https);
    let idle = |ca: &Path| {
        bench_json(&[
            "bench",
            "idle",
            "--proto",
            "sse",
            "--conns",
            "3",
            "--hold",
            "100ms",
            "--url",
            &https,
            "--ca",
            ca.to_str().unwrap(),
            "--json",
        ])
    };
    let good = idle(&a.join("ca.pem"));
    assert_eq!((good["connections"].as_u64(), good["client_errors"].as_u64()), (Some(3), Some(0)), "{good}");
    assert_eq!(good["tls"]["failed"], 0, "{good}");
    let (status, out) = run_to_end(
        &[
            "bench",
            "idle",
            "--proto",
            "sse",
            "--conns",
            "1",
            "--hold",
            "100ms",
            "--url",
            &https,
            "--ca",
            b.join("ca.pem").to_str().unwrap(),
            "--json",
        ],
        Duration::from_secs(90),
    );
    let refused =
        out.lines().rev().find(|l| l.starts_with('{')).map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap());
    assert!(
        !status.success() || refused.as_ref().is_some_and(|r| r["tls"]["failed"].as_u64() >= Some(1)),
        "another CA must not verify: {status} {out}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// SSE and long polling over HTTP/2 (`--http2`, ALPN h2): exact accounting,
/// and every TLS connection negotiated h2.
#[test]
fn fanout_over_http2() {
    let gw = DevGateway::start();
    let (https, pid) = (format!("https://{}", gw.https), gw.pid().to_string());
    for proto in ["sse", "poll"] {
        let r = fanout_with(&["--proto", proto, "--url", &https, "--insecure", "--http2", "--server-pid", &pid]);
        let tls = &r["tls"];
        assert_eq!(tls["h2"], tls["handshakes"], "{proto}: {r}");
        assert!(tls["h2"].as_u64().is_some_and(|n| n >= 7), "{proto}: {r}");
    }
    let (status, _) = run_to_end(
        &["bench", "fanout", "--proto", "ws", "--url", &https, "--insecure", "--http2", "--duration", "1s"],
        Duration::from_secs(30),
    );
    assert!(!status.success(), "WebSocket over --http2 is refused");
}

/// Reconnects over TLS resume their sessions unless `--tls-resumption off`.
#[test]
fn churn_over_tls_resumes_sessions_unless_told_not_to() {
    let gw = DevGateway::start();
    let https = format!("https://{}", gw.https);
    let churn = |resumption: &str| {
        bench_json(&[
            "bench",
            "churn",
            "--proto",
            "ws",
            "--rate",
            "20",
            "--duration",
            "1s",
            "--url",
            &https,
            "--insecure",
            "--tls-resumption",
            resumption,
            "--json",
        ])
    };
    let on = churn("on");
    assert_eq!(on["lost"], 0, "{on}");
    assert!(on["tls"]["resumed"].as_u64().is_some_and(|n| n > 0), "{on}");
    let off = churn("off");
    assert_eq!(off["tls"]["resumed"], 0, "{off}");
    assert!(off["tls"]["full"].as_u64().is_some_and(|n| n > 1), "{off}");
    // A TLS target with neither --ca nor --insecure is refused, clearly.
    let (status, _) =
        run_to_end(&["bench", "idle", "--proto", "ws", "--conns", "1", "--url", &https], Duration::from_secs(30));
    assert!(!status.success());
}

#[test]
fn fanout_mqtt_3_1_1() {
    let gw = DevGateway::start();
    let (mqtt, pid) = (format!("mqtt://{}", gw.mqtt), gw.pid().to_string());
    fanout_with(&["--proto", "mqtt", "--mqtt-version", "3", "--mqtt-url", &mqtt, "--server-pid", &pid]);
}

#[test]
fn syscalls_perf_counts_socket_writes() {
    let gw = DevGateway::start();
    let (url, pid) = (format!("http://{}", gw.http), gw.pid().to_string());
    let r = fanout_with(&["--proto", "ws", "--url", &url, "--server-pid", &pid, "--syscalls", "perf"]);
    assert_eq!(r["writes_source"], "perf", "{r}");
    let by_name = r["write_syscalls"].as_object().unwrap_or_else(|| panic!("no write_syscalls in {r}"));
    let total: u64 = by_name.values().filter_map(|v| v.as_u64()).sum();
    // Every delivery left the gateway through some write syscall (several may share one).
    assert!(total > 0, "{r}");
    assert!(r["writes_per_delivery"].as_f64().is_some_and(|w| w > 0.0), "{r}");
}

/// A short `bench publish` (2 publishers, 5 channels, 1 s) with `extra`
/// flags; asserts that every publish sent was acknowledged and the report
/// is complete.
fn publish_with(extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["bench", "publish", "--publishers", "2", "--channels", "5", "--duration", "1s", "--json"];
    args.extend_from_slice(extra);
    let r = bench_json(&args);
    assert_eq!(r["scenario"], "publish", "{r}");
    let acked = r["acked"].as_u64().unwrap_or_else(|| panic!("no acked in {r}"));
    assert!(acked > 0, "{r}");
    assert_eq!(r["published"].as_u64(), Some(acked), "every publish acknowledged: {r}");
    for k in ["refused", "unacked", "unexpected", "client_errors"] {
        assert_eq!(r[k].as_u64(), Some(0), "{k} in {r}");
    }
    for k in ["acked_per_sec", "p50_us", "p99_us", "max_us", "window", "server_cpu_us_per_publish", "invalid"] {
        assert!(!r[k].is_null(), "{k} missing in {r}");
    }
    r
}

/// The gateway's per-connection publish rate limit is off, as for any
/// bench run (`docs/bench.md`).
const NO_PUBLISH_LIMIT: (&str, &str) = ("SWITCHBOARD_LIMITS__PUBLISH_RATE", "0");

fn publish(proto: &str, window: &str) {
    let gw = DevGateway::start_env(&[NO_PUBLISH_LIMIT]);
    let (url, mqtt, pid) = (format!("http://{}", gw.http), format!("mqtt://{}", gw.mqtt), gw.pid().to_string());
    let r =
        publish_with(&["--proto", proto, "--window", window, "--url", &url, "--mqtt-url", &mqtt, "--server-pid", &pid]);
    assert_eq!(r["pub_proto"], proto, "{r}");
    let connections = if proto == "rest" { 2 * window.parse::<u64>().unwrap() } else { 2 };
    assert_eq!(r["connections"].as_u64(), Some(connections), "{r}");
}

#[test]
fn publish_ws() {
    publish("ws", "1");
    publish("ws", "16");
}

#[test]
fn publish_rest() {
    publish("rest", "4");
}

#[test]
fn publish_mqtt() {
    publish("mqtt", "1");
    publish("mqtt", "16");
}

/// A gateway that refuses most publishes (1 a second after a burst of 5):
/// refusals are counted, not acks, and do not stop the publishers.
#[test]
fn publish_counts_refusals() {
    let gw =
        DevGateway::start_env(&[("SWITCHBOARD_LIMITS__PUBLISH_RATE", "1"), ("SWITCHBOARD_LIMITS__PUBLISH_BURST", "5")]);
    let url = format!("http://{}", gw.http);
    let r = bench_json(&[
        "bench",
        "publish",
        "--proto",
        "ws",
        "--publishers",
        "2",
        "--window",
        "4",
        "--duration",
        "500ms",
        "--url",
        &url,
        "--json",
    ]);
    let (acked, refused) = (r["acked"].as_u64().unwrap(), r["refused"].as_u64().unwrap());
    assert!((1..=14).contains(&acked), "about 5 + 1 per publisher: {r}");
    assert!(refused > 0, "{r}");
    assert_eq!(r["published"].as_u64(), Some(acked + refused), "{r}");
    assert_eq!((r["unacked"].as_u64(), r["client_errors"].as_u64()), (Some(0), Some(0)), "{r}");
    let problems = r["problems"].to_string();
    assert!(problems.contains("REFUSED") && problems.contains("rate_limited"), "{r}");
}

/// A peer server (nats-server, nginx) on free loopback ports, killed (by
/// PID) on drop.
struct Peer {
    child: Child,
    dir: std::path::PathBuf,
}

impl Drop for Peer {
    fn drop(&mut self) {
        // SIGTERM first: nginx's master then stops its workers (a SIGKILLed
        // master would leave them running, holding the port).
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A loopback port nothing listens on now (the OS's choice, never a standard one).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

fn require(path: &str, package: &str) {
    assert!(
        Path::new(path).exists(),
        "{path} is missing: install the Debian package {package} (bash tests/run.sh does)"
    );
}

impl Peer {
    fn start(program: &str, args: &[&str], dir: std::path::PathBuf, ports: &[u16]) -> Peer {
        let child = Command::new(program)
            .args(args)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
        let peer = Peer { child, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        for port in ports {
            while TcpStream::connect(("127.0.0.1", *port)).is_err() {
                assert!(Instant::now() < deadline, "{program} does not listen on {port}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        peer
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("sb-bench-smoke-{name}-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// nats-server with its client and WebSocket listeners; returns it and the two ports.
fn nats_server() -> (Peer, u16, u16) {
    require("/usr/sbin/nats-server", "nats-server");
    let (client, ws) = (free_port(), free_port());
    let dir = temp_dir("nats");
    let conf = dir.join("nats.conf");
    std::fs::write(
        &conf,
        format!("listen: 127.0.0.1:{client}\nwebsocket {{ listen: \"127.0.0.1:{ws}\", no_tls: true }}\n"),
    )
    .expect("write nats.conf");
    let conf = conf.to_string_lossy().into_owned();
    (Peer::start("/usr/sbin/nats-server", &["-c", &conf], dir, &[client, ws]), client, ws)
}

#[test]
fn fanout_nats() {
    let (nats, client, _) = nats_server();
    let url = format!("nats://127.0.0.1:{client}");
    let r = fanout_with(&["--proto", "nats", "--nats-url", &url, "--server-pid", &nats.pid()]);
    assert_eq!(r["sub_proto"], "nats", "{r}");
}

#[test]
fn fanout_nats_ws() {
    let (nats, _, ws) = nats_server();
    let url = format!("http://127.0.0.1:{ws}");
    let r = fanout_with(&["--proto", "nats-ws", "--url", &url, "--server-pid", &nats.pid()]);
    assert_eq!(r["sub_proto"], "nats-ws", "{r}");
}

/// `nats-server -js` with its file store in a temporary directory; returns
/// it and its client port.
fn jetstream_server() -> (Peer, u16) {
    require("/usr/sbin/nats-server", "nats-server");
    let port = free_port();
    let dir = temp_dir("jetstream");
    let store = dir.join("store").to_string_lossy().into_owned();
    let args = ["-js", "-sd", &store, "-a", "127.0.0.1", "-p", &port.to_string()];
    (Peer::start("/usr/sbin/nats-server", &args, dir, &[port]), port)
}

#[test]
fn publish_nats_jetstream() {
    let (nats, port) = jetstream_server();
    let url = format!("nats://127.0.0.1:{port}");
    for window in ["1", "16"] {
        // The second run finds the stream the first created (same configuration: accepted).
        let r =
            publish_with(&["--proto", "nats-js", "--window", window, "--nats-url", &url, "--server-pid", &nats.pid()]);
        assert_eq!(r["pub_proto"], "nats-js", "{r}");
    }
}

/// nginx + Nchan with tests/bench/nginx-nchan.conf; returns it and its port.
fn nchan() -> (Peer, u16) {
    require("/usr/sbin/nginx", "nginx-light");
    let module = "/usr/lib/nginx/modules/ngx_nchan_module.so";
    require(module, "libnginx-mod-nchan");
    let port = free_port();
    let dir = temp_dir("nchan");
    // nginx's worker (nobody, when started as root) reaches its temp paths.
    let _ = Command::new("chmod").arg("755").arg(&dir).status();
    let template = std::fs::read_to_string(repo_root().join("tests/bench/nginx-nchan.conf")).expect("nginx-nchan.conf");
    let conf = template
        .replace("@DIR@", &dir.to_string_lossy())
        .replace("@LISTEN@", &format!("127.0.0.1:{port}"))
        .replace("@MODULE@", module);
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).expect("write nginx.conf");
    let (prefix, path) = (dir.to_string_lossy().into_owned(), path.to_string_lossy().into_owned());
    (Peer::start("/usr/sbin/nginx", &["-p", &prefix, "-c", &path, "-g", "daemon off;"], dir, &[port]), port)
}

fn fanout_nchan(proto: &str) {
    let (nginx, port) = nchan();
    let url = format!("http://127.0.0.1:{port}");
    // The master's PID is enough here: the figures only need to be present.
    let r = fanout_with(&["--proto", proto, "--target", "nchan", "--url", &url, "--server-pid", &nginx.pid()]);
    assert_eq!(r["sub_proto"], proto, "{r}");
}

#[test]
fn fanout_nchan_sse() {
    fanout_nchan("sse");
}

#[test]
fn fanout_nchan_poll() {
    fanout_nchan("poll");
}

#[test]
fn peers_refuse_scenarios_they_cannot_run() {
    for args in [
        &["bench", "churn", "--proto", "nats", "--duration", "1s"][..],
        &["bench", "recovery", "--proto", "sse", "--target", "nchan"],
        &["bench", "recovery", "--proto", "mqtt", "--mqtt-version", "3"],
        &["bench", "fanout", "--proto", "ws", "--target", "nchan"],
    ] {
        let (status, out) = run_to_end(args, Duration::from_secs(30));
        assert!(!status.success(), "{args:?} should be refused; stdout: {out}");
    }
}
