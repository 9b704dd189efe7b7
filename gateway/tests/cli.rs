//! The README's promise, end to end with the real binary: `switchboard dev`
//! starts and prints its endpoints, `switchboard sub` receives what
//! `switchboard pub` sends (over REST, WebSocket and MQTT; subscribers on
//! WebSocket, SSE, long polling and MQTT), `check` validates
//! configs, and SIGTERM shuts down cleanly.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{BIN, DevGateway, Proc, WAIT};

fn run(args: &[&str]) -> (bool, String, String) {
    run_env(args, &[])
}

fn run_env(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(BIN).args(args).envs(env.iter().copied()).output().expect("run switchboard");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn pub_reaches_sub_and_sigterm_shuts_down() {
    let gw = DevGateway::start();
    let (http, admin, mqtt) = (gw.http.clone(), gw.admin.clone(), gw.mqtt.clone());
    let mqtt_url = format!("mqtt://{mqtt}");
    let mut gw = gw.proc;
    let http_url = format!("http://{http}");
    let ws_url = format!("ws://{http}");

    let vias = ["ws", "sse", "poll", "mqtt"];
    let subs: Vec<Proc> = vias
        .iter()
        .map(|via| {
            let url = if *via == "mqtt" { &mqtt_url } else { &http_url };
            Proc::spawn(&["sub", "tour/#", "--via", via, "--url", url, "--count", "3"])
        })
        .collect();
    // The subscribers are registered once the admin API counts them.
    common::eventually("the four subscribers to subscribe", || {
        reqwest::blocking::get(format!("http://{admin}/v1/stats"))
            .and_then(|r| r.json::<serde_json::Value>())
            .is_ok_and(|v| v["subscriptions"].as_u64() == Some(4))
    });

    let (ok, out, err) = run(&["pub", "tour/a", "hello", "--url", &http_url]);
    assert!(ok, "pub over REST failed: {err}");
    assert!(out.starts_with("tour/a ") && out.trim_end().ends_with(":1"), "{out}");
    let (ok, out, err) = run(&["pub", "tour/b", "{\"x\": 1}", "--url", &ws_url, "--id", "k"]);
    assert!(ok, "pub over WebSocket failed: {err}");
    assert!(out.trim_end().ends_with(":1"), "{out}");
    let (ok, out, _) = run(&["pub", "tour/b", "{\"x\": 1}", "--url", &http_url, "--id", "k"]);
    assert!(ok && out.contains("(duplicate)"), "same id over REST is a duplicate: {out}");
    let (ok, out, err) = run(&["pub", "tour/a", "bye", "--via", "mqtt", "--url", &mqtt_url, "--qos", "2"]);
    assert!(ok, "pub over MQTT failed: {err}");
    assert!(out.contains("published over MQTT"), "{out}");

    for (via, mut sub) in vias.into_iter().zip(subs) {
        let got: Vec<String> = (0..3).map(|_| sub.lines.recv_timeout(WAIT).expect("sub output")).collect();
        let fields: Vec<(String, String)> = got
            .iter()
            .map(|l| {
                let mut it = l.splitn(3, ' ');
                let ch = it.next().unwrap_or_default().to_string();
                let _pos = it.next();
                (ch, it.next().unwrap_or_default().to_string())
            })
            .collect();
        assert_eq!(
            fields,
            vec![
                ("tour/a".to_string(), "hello".to_string()),
                ("tour/b".to_string(), "{\"x\": 1}".to_string()),
                ("tour/a".to_string(), "bye".to_string()),
            ],
            "sub --via {via} printed {got:?}"
        );
        assert!(sub.wait_exit().success(), "sub --via {via} --count 3 exits 0");
    }

    // SIGTERM: graceful shutdown, exit status 0.
    let status = Command::new("kill").args(["-TERM", &gw.child.id().to_string()]).status().expect("kill");
    assert!(status.success());
    assert!(gw.wait_exit().success(), "dev exits 0 on SIGTERM");
}

#[test]
fn check_validates_configs() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/switchboard.example.toml");
    let (ok, out, err) = run(&["check", "-c", example]);
    assert!(ok, "example config must pass check: {err}");
    assert!(out.contains(": ok"), "{out}");

    let dir = std::env::temp_dir().join(format!("switchboard-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");

    // The cluster node config of deploy/ (compose) and the one in the
    // Kubernetes ConfigMap: both pass, on the NATS engine.
    let cluster = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/cluster.toml");
    let (ok, out, err) = run(&["check", "-c", cluster]);
    assert!(ok && out.contains("engine nats nats://nats-1:4222"), "deploy/cluster.toml: {out} {err}");
    let k8s = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/k8s/switchboard.yaml")).unwrap();
    let start = k8s.find("cluster.toml: |\n").expect("the ConfigMap's cluster.toml") + "cluster.toml: |\n".len();
    let toml: String = k8s[start..]
        .lines()
        .take_while(|l| !l.starts_with("---"))
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    let in_map = dir.join("configmap.toml");
    std::fs::write(&in_map, toml).expect("write");
    let (ok, out, err) = run_env(
        &["check", "-c", in_map.to_str().unwrap()],
        &[("SWITCHBOARD_ADMIN__TOKEN", "a-token-from-the-secret-0123")],
    );
    assert!(ok && out.contains("engine nats"), "the Kubernetes ConfigMap's config: {out} {err}");

    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[limits]\nmax_message_size = 0\n").expect("write");
    let (ok, _, err) = run(&["check", "-c", bad.to_str().expect("utf-8 path")]);
    assert!(!ok);
    assert!(err.contains("max_message_size"), "{err}");
    std::fs::write(&bad, "[listen]\nhtttp = \"127.0.0.1:1\"\n").expect("write");
    let (ok, _, err) = run(&["check", "-c", bad.to_str().expect("utf-8 path")]);
    assert!(!ok);
    assert!(err.contains("htttp"), "unknown keys are named: {err}");
    let (ok, _, err) = run(&["check", "-c", "/nonexistent/switchboard.toml"]);
    assert!(!ok && err.contains("cannot read"), "{err}");
    // Open auth on a non-loopback address is refused unless insecure = true.
    std::fs::write(&bad, "[listen]\nhttp = \"0.0.0.0:0\"\n").expect("write");
    let (ok, _, err) = run(&["check", "-c", bad.to_str().expect("utf-8 path")]);
    assert!(!ok && err.contains("insecure = true"), "{err}");
    std::fs::write(&bad, "insecure = true\n[listen]\nhttp = \"0.0.0.0:0\"\n").expect("write");
    let (ok, _, err) = run(&["check", "-c", bad.to_str().expect("utf-8 path")]);
    assert!(ok, "insecure = true accepts the risk: {err}");
    // The admin API off loopback needs a token; insecure does not lift that.
    let exposed = "insecure = true\n[listen]\nadmin = \"0.0.0.0:9090\"\n";
    std::fs::write(&bad, exposed).expect("write");
    let (ok, _, err) = run(&["check", "-c", bad.to_str().expect("utf-8 path")]);
    assert!(!ok && err.contains("listen.admin") && err.contains("[admin] token"), "{err}");
    std::fs::write(&bad, format!("{exposed}[admin]\ntoken = \"an-admin-token-0123456789\"\n")).expect("write");
    let (ok, _, err) = run(&["check", "-c", bad.to_str().expect("utf-8 path")]);
    assert!(ok, "a token guards the admin API: {err}");
    std::fs::write(&bad, "[http]\nallowed_origins = [\"app.example.com\"]\n").expect("write");
    let (ok, _, err) = run(&["check", "-c", bad.to_str().expect("utf-8 path")]);
    assert!(!ok && err.contains("http.allowed_origins"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn token_mints_what_the_gateway_accepts() {
    let dir = std::env::temp_dir().join(format!("switchboard-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let cfg = dir.join("auth.toml");
    let secret = "cli-secret-cli-secret-cli-secret-xx";
    std::fs::write(
        &cfg,
        format!("[auth]\nmode = \"token\"\n[[auth.keys]]\nkid = \"k1\"\nalg = \"HS256\"\nsecret = \"{secret}\"\n"),
    )
    .expect("write");
    let path = cfg.to_str().expect("utf-8 path");
    let (ok, out, err) = run(&[
        "token",
        "-c",
        path,
        "--sub",
        "alice",
        "--cap",
        "chat/#=subscribe,publish",
        "--cap",
        "x=history",
        "--ttl",
        "10m",
    ]);
    assert!(ok, "{err}");
    let key = switchboard::core::auth::KeyConfig {
        kid: Some("k1".into()),
        alg: "HS256".into(),
        secret: Some(secret.into()),
        ..Default::default()
    };
    let p = switchboard::core::auth::Verifier::new(&[key], None, 0)
        .expect("verifier")
        .verify(out.trim())
        .expect("valid token");
    assert_eq!(p.client_id, "alice");
    assert!(p.caps.allows(switchboard::core::auth::Op::Publish, "chat/a/b"));
    assert!(p.caps.allows(switchboard::core::auth::Op::History, "x"));
    assert!(!p.caps.allows(switchboard::core::auth::Op::Subscribe, "x"));
    let (ok, _, err) = run(&["token", "-c", path, "--sub", "a", "--cap", "chat/#=fly"]);
    assert!(!ok && err.contains("fly"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dev_refuses_non_loopback() {
    let (ok, _, err) = run(&["dev", "--http", "0.0.0.0:0", "--mqtt", "127.0.0.1:0"]);
    assert!(!ok);
    assert!(err.contains("loopback"), "{err}");
}

/// The hex SHA-256 of the first certificate in a PEM file.
fn leaf_hash(path: &std::path::Path) -> String {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let leaf = CertificateDer::pem_file_iter(path).expect("read").next().expect("a certificate").expect("PEM");
    switchboard::edge::tls::hex(&switchboard::edge::tls::cert_sha256(&leaf))
}

#[test]
fn cert_dev_writes_a_ca_and_sighup_reloads_the_certificate() {
    let dir = std::env::temp_dir().join(format!("sb-cli-cert-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (a, b, live) = (dir.join("a"), dir.join("b"), dir.join("live"));
    for out in [&a, &b] {
        let (ok, stdout, err) = run(&["cert", "dev", "--out", out.to_str().unwrap(), "--device", "sensor-1"]);
        assert!(ok, "{err}");
        assert!(stdout.contains("never for production"), "{stdout}");
        for f in ["ca.pem", "ca.key", "server.pem", "server.key", "client.pem", "client.key"] {
            assert!(out.join(f).is_file(), "{f} missing");
        }
    }
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(a.join("server.key")).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "keys are private to their owner");
    std::fs::create_dir_all(&live).unwrap();
    let install = |from: &std::path::Path| {
        for f in ["server.pem", "server.key"] {
            std::fs::copy(from.join(f), live.join(f)).unwrap();
        }
    };
    install(&a);
    let certs = format!(
        "[{{ cert = {:?}, key = {:?} }}]",
        live.join("server.pem").display().to_string(),
        live.join("server.key").display().to_string()
    );
    // File polling off: only SIGHUP reloads.
    let mut gw =
        DevGateway::start_env(&[("SWITCHBOARD_TLS__CERTIFICATES", &certs), ("SWITCHBOARD_TLS__RELOAD_INTERVAL", "0s")]);
    assert_eq!(gw.cert_hash, leaf_hash(&a.join("server.pem")), "the banner shows the configured certificate");
    let current = || -> String {
        let v: serde_json::Value =
            reqwest::blocking::get(format!("http://{}/v1/wt/cert-hash", gw.http)).unwrap().json().unwrap();
        v["hex"].as_str().unwrap().to_string()
    };
    let curl_ok = |ca: &std::path::Path| {
        Command::new("curl")
            .args(["-s", "-o", "/dev/null", "--max-time", "5", "--cacert", ca.to_str().unwrap()])
            .arg(format!("https://127.0.0.1:{}/v1/wt/cert-hash", gw.https.rsplit(':').next().unwrap()))
            .status()
            .expect("curl (installed by tests/run.sh)")
            .success()
    };
    assert!(curl_ok(&a.join("ca.pem")), "HTTPS presents certificate A");

    install(&b);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(current(), leaf_hash(&a.join("server.pem")), "no reload without SIGHUP when polling is off");
    let status = Command::new("kill").args(["-HUP", &gw.pid().to_string()]).status().unwrap();
    assert!(status.success());
    let want = leaf_hash(&b.join("server.pem"));
    let deadline = Instant::now() + WAIT;
    while current() != want {
        assert!(Instant::now() < deadline, "SIGHUP did not reload the certificate");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(curl_ok(&b.join("ca.pem")), "HTTPS presents certificate B after SIGHUP");
    assert!(!curl_ok(&a.join("ca.pem")), "A's CA no longer verifies");
    assert!(gw.proc.child.try_wait().unwrap().is_none(), "SIGHUP does not stop the gateway");
    let _ = std::fs::remove_dir_all(&dir);
}
