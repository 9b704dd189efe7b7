//! TLS at the edge, against real clients: rustls on HTTPS (HTTP/1.1 and
//! HTTP/2 chosen by ALPN, and a WebSocket over TLS) and on MQTTS; curl,
//! `openssl s_client` and `mosquitto_sub` / `mosquitto_pub` as clients that
//! share no code with the gateway; SNI; hot reload of the certificate files
//! with connections kept open; and mTLS, where a device's client
//! certificate names its MQTT client id.
//!
//! Certificates come from `switchboard::tls::write_dev_ca` (what
//! `switchboard cert dev` writes), one CA per set, in a temporary folder.
//! curl, openssl and mosquitto-clients are installed by `tests/run.sh`; when
//! one is missing the test fails and says so. It never skips.

mod common_mqtt;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use common_mqtt::{Raw, RawPacket, Ver, connect_packet, subscribe_packet};
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use switchboard::config::{CertPair, ClientAuth, Config};
use switchboard::tls::{DEV_NAMES, DevFiles, write_dev_ca};
use switchboard_tests::{TestGateway, WAIT, eventually, rest_publish};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// A folder of certificates, removed on drop.
struct CertDir {
    dir: PathBuf,
    files: DevFiles,
}

impl Drop for CertDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn cert_set(tag: &str, device: &str, names: &[&str]) -> CertDir {
    let dir = std::env::temp_dir().join(format!("sb-tls-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let files = write_dev_ca(&dir, device, names).expect("write certificates");
    CertDir { dir, files }
}

fn pair(c: &CertDir) -> CertPair {
    CertPair { cert: c.files.server_cert.display().to_string(), key: c.files.server_key.display().to_string() }
}

fn leaf_of(path: &Path) -> CertificateDer<'static> {
    CertificateDer::pem_file_iter(path).expect("read chain").next().expect("a certificate").expect("PEM")
}

/// A gateway serving HTTPS and MQTTS with `certs` (the first is the default).
async fn tls_gateway(certs: &[&CertDir], tweak: impl FnOnce(&mut Config)) -> anyhow::Result<TestGateway> {
    let pairs: Vec<CertPair> = certs.iter().map(|c| pair(c)).collect();
    TestGateway::start_with(move |c| {
        c.listen.https = "127.0.0.1:0".into();
        c.listen.mqtts = "127.0.0.1:0".into();
        c.tls.certificates = pairs;
        c.tls.reload_interval = Duration::from_millis(100);
        tweak(c);
    })
    .await
}

fn https(gw: &TestGateway) -> std::net::SocketAddr {
    gw.gateway.https_addr.expect("https listener")
}

fn mqtts(gw: &TestGateway) -> std::net::SocketAddr {
    gw.gateway.mqtts_addr.expect("mqtts listener")
}

/// A rustls client trusting `cas`, offering `alpn`, optionally presenting a
/// client certificate.
fn client_config(cas: &[&Path], alpn: &[&[u8]], identity: Option<(&Path, &Path)>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        for cert in CertificateDer::pem_file_iter(ca).expect("read CA") {
            roots.add(cert.expect("CA PEM")).expect("add CA");
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots);
    let mut cfg = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_file_iter(cert).expect("client cert").map(|c| c.expect("PEM")).collect();
            let key = PrivateKeyDer::from_pem_file(key).expect("client key");
            builder.with_client_auth_cert(chain, key).expect("client identity")
        }
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

async fn tls_connect(
    addr: std::net::SocketAddr,
    server_name: &str,
    cfg: Arc<rustls::ClientConfig>,
) -> anyhow::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(server_name.to_string())?;
    let tls = tokio::time::timeout(WAIT, tokio_rustls::TlsConnector::from(cfg).connect(name, tcp)).await??;
    Ok(tls)
}

fn presented(tls: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    tls.get_ref().1.peer_certificates().and_then(|c| c.first()).expect("a server certificate").clone().into_owned()
}

/// GET over an established TLS stream with hyper (HTTP/2 or HTTP/1.1).
async fn get_over(tls: TlsStream<TcpStream>, h2: bool, path: &str) -> anyhow::Result<(u16, String)> {
    use http_body_util::BodyExt as _;
    let io = hyper_util::rt::TokioIo::new(tls);
    let req =
        hyper::Request::get(format!("https://127.0.0.1{path}")).body(http_body_util::Empty::<bytes::Bytes>::new())?;
    let resp = if h2 {
        let (mut send, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        send.send_request(req).await?
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        send.send_request(req).await?
    };
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn hex_sha256(der: &CertificateDer<'_>) -> String {
    switchboard::tls::hex(&switchboard::tls::cert_sha256(der))
}

#[tokio::test]
async fn https_speaks_http2_and_http1_by_alpn_and_carries_websockets() -> anyhow::Result<()> {
    let certs = cert_set("alpn", "dev-device", &DEV_NAMES);
    let gw = tls_gateway(&[&certs], |_| {}).await?;
    let ca = certs.files.ca.as_path();
    let leaf_hash = hex_sha256(&leaf_of(&certs.files.server_cert));

    // HTTP/2 by ALPN.
    let tls = tls_connect(https(&gw), "localhost", client_config(&[ca], &[b"h2", b"http/1.1"], None)).await?;
    ensure!(tls.get_ref().1.alpn_protocol() == Some(b"h2"), "ALPN chose {:?}", tls.get_ref().1.alpn_protocol());
    let (status, body) = get_over(tls, true, "/v1/wt/cert-hash").await?;
    ensure!(status == 200 && body.contains(&leaf_hash), "{status} {body}");

    // HTTP/1.1 by ALPN, and with no ALPN at all; SNI by IP address.
    for alpn in [&[b"http/1.1".as_slice()][..], &[]] {
        let tls = tls_connect(https(&gw), "127.0.0.1", client_config(&[ca], alpn, None)).await?;
        let (status, body) = get_over(tls, false, "/v1/channels/tls/history").await?;
        ensure!(status == 200, "{status} {body}");
    }

    // A WebSocket over TLS (wss://): subscribe, receive a REST publication.
    let tls = tls_connect(https(&gw), "localhost", client_config(&[ca], &[b"http/1.1"], None)).await?;
    let mut request = format!("wss://localhost:{}/v1/ws", https(&gw).port()).into_client_request()?;
    request.headers_mut().insert("sec-websocket-protocol", "switchboard.v1.json".parse()?);
    let (mut ws, _) = tokio_tungstenite::client_async(request, tls).await?;
    ws.send(Message::text(r#"{"type":"connect","req":1,"client_id":"wss-client"}"#)).await?;
    ws.send(Message::text(r#"{"type":"subscribe","req":2,"filter":"secure"}"#)).await?;
    let mut seen = Vec::new();
    let mut published = false;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next()).await?.context("closed")??;
        let frame: serde_json::Value = serde_json::from_str(msg.to_text()?)?;
        seen.push(frame["type"].as_str().unwrap_or_default().to_string());
        if frame["type"] == "subscribed" && !published {
            let (status, _) = rest_publish(&gw.http, "secure", "over tls", &[]).await?;
            ensure!(status == 200, "REST publish {status}");
            published = true;
        }
        if frame["type"] == "message" {
            ensure!(frame["text"] == "over tls" || frame["data"] == "over tls", "{frame}");
            break;
        }
    }
    ensure!(seen.starts_with(&["connected".to_string(), "subscribed".to_string()]), "{seen:?}");
    Ok(())
}

/// CONNECT over `stream` and return the CONNACK code.
async fn mqtt_connect(raw: &mut Raw, ver: Ver, client_id: &str, password: Option<&str>) -> anyhow::Result<Option<u8>> {
    let mut packet = connect_packet(ver.level(), client_id, 30, None, &[]);
    if let Some(pw) = password {
        packet = connect_with_password(ver, client_id, pw);
    }
    raw.send(&packet).await?;
    Ok(raw.packet().await?.and_then(|p| p.connack_code()))
}

/// A CONNECT with the password flag (3.1.1 needs the username flag with it).
fn connect_with_password(ver: Ver, client_id: &str, password: &str) -> Vec<u8> {
    let mut body = Vec::new();
    common_mqtt::mqtt_str(b"MQTT", &mut body);
    body.push(ver.level());
    body.push(0x02 | 0x80 | 0x40); // clean, username, password
    body.extend_from_slice(&30u16.to_be_bytes());
    if ver == Ver::V5 {
        body.push(0);
    }
    common_mqtt::mqtt_str(client_id.as_bytes(), &mut body);
    common_mqtt::mqtt_str(b"device", &mut body);
    common_mqtt::mqtt_str(password.as_bytes(), &mut body);
    common_mqtt::packet(0x10, &body)
}

/// Subscribes at QoS 0 and returns the SUBACK's first return code.
async fn mqtt_subscribe(raw: &mut Raw, ver: Ver, pkid: u16, filter: &str) -> anyhow::Result<u8> {
    raw.send(&subscribe_packet(ver, pkid, filter, 0)).await?;
    let p = raw.packet().await?.context("closed instead of SUBACK")?;
    ensure!(p.kind() == 9, "expected SUBACK, got {p:?}");
    // 3.1.1: pkid then codes; 5: pkid, properties length (0), codes.
    let at = if ver == Ver::V5 { 3 } else { 2 };
    p.body.get(at).copied().context("SUBACK without a code")
}

async fn next_publish(raw: &mut Raw) -> anyhow::Result<RawPacket> {
    loop {
        let p = raw.packet().await?.context("closed instead of PUBLISH")?;
        if p.kind() == 3 {
            return Ok(p);
        }
    }
}

#[tokio::test]
async fn mqtts_round_trip_with_a_rustls_client() -> anyhow::Result<()> {
    let certs = cert_set("mqtts", "dev-device", &DEV_NAMES);
    let gw = tls_gateway(&[&certs], |_| {}).await?;
    let cfg = client_config(&[&certs.files.ca], &[], None);
    for ver in [Ver::V4, Ver::V5] {
        let mut raw = Raw::over(tls_connect(mqtts(&gw), "localhost", cfg.clone()).await?);
        ensure!(mqtt_connect(&mut raw, ver, "tls-sub", None).await? == Some(0), "CONNACK");
        ensure!(mqtt_subscribe(&mut raw, ver, 1, "sensors/+").await? == 0, "SUBACK");
        let (status, _) = rest_publish(&gw.http, "sensors/t1", "21.5", &[]).await?;
        ensure!(status == 200, "REST publish {status}");
        let p = next_publish(&mut raw).await?;
        ensure!(p.body.ends_with(b"21.5"), "{p:?}");
    }
    // A client that does not trust the gateway's CA refuses the handshake.
    let other = cert_set("mqtts-other", "x", &DEV_NAMES);
    let wrong = client_config(&[&other.files.ca], &[], None);
    ensure!(tls_connect(mqtts(&gw), "localhost", wrong).await.is_err(), "an untrusted certificate was accepted");
    Ok(())
}

#[tokio::test]
async fn sni_chooses_the_certificate_by_name() -> anyhow::Result<()> {
    let main = cert_set("sni-main", "d", &DEV_NAMES);
    let api = cert_set("sni-api", "d", &["api.example.test", "*.tenants.example.test"]);
    let gw = tls_gateway(&[&main, &api], |_| {}).await?;
    let cfg = client_config(&[&main.files.ca, &api.files.ca], &[], None);
    let main_leaf = leaf_of(&main.files.server_cert);
    let api_leaf = leaf_of(&api.files.server_cert);
    for (name, want) in [
        ("api.example.test", &api_leaf),
        ("acme.tenants.example.test", &api_leaf),
        ("localhost", &main_leaf),
        ("127.0.0.1", &main_leaf),
    ] {
        for addr in [https(&gw), mqtts(&gw)] {
            let tls = tls_connect(addr, name, cfg.clone()).await.with_context(|| format!("{name} on {addr}"))?;
            ensure!(presented(&tls) == *want, "{name} on {addr} got the wrong certificate");
        }
    }
    Ok(())
}

#[tokio::test]
async fn reload_swaps_certificates_for_new_handshakes_and_keeps_open_connections() -> anyhow::Result<()> {
    let live = cert_set("reload-live", "d", &DEV_NAMES);
    let a = cert_set("reload-a", "d", &DEV_NAMES);
    let b = cert_set("reload-b", "d", &DEV_NAMES);
    // The gateway reads the "live" paths; start them as set A.
    let copy = |from: &CertDir| -> anyhow::Result<()> {
        std::fs::copy(&from.files.server_cert, &live.files.server_cert)?;
        std::fs::copy(&from.files.server_key, &live.files.server_key)?;
        Ok(())
    };
    copy(&a)?;
    let gw = tls_gateway(&[&live], |_| {}).await?;
    let trust_a = client_config(&[&a.files.ca], &[], None);
    let trust_b = client_config(&[&b.files.ca], &[], None);
    let leaf_b = leaf_of(&b.files.server_cert);

    // An MQTTS subscriber opened under certificate A.
    let mut raw = Raw::over(tls_connect(mqtts(&gw), "localhost", trust_a.clone()).await?);
    ensure!(mqtt_connect(&mut raw, Ver::V5, "kept", None).await? == Some(0), "CONNACK");
    ensure!(mqtt_subscribe(&mut raw, Ver::V5, 1, "reload").await? == 0, "SUBACK");
    ensure!(tls_connect(https(&gw), "localhost", trust_b.clone()).await.is_err(), "B trusted before the reload");

    // A broken file (half written) is refused; A stays in service.
    std::fs::write(&live.files.server_cert, "-----BEGIN CERTIFICATE-----\nnot base64\n")?;
    tokio::time::sleep(Duration::from_millis(400)).await;
    tls_connect(https(&gw), "localhost", trust_a.clone()).await.context("A after a broken reload")?;

    copy(&b)?;
    eventually(WAIT, "new handshakes present certificate B", || {
        let cfg = trust_b.clone();
        let addr = https(&gw);
        async move { tls_connect(addr, "localhost", cfg).await.is_ok() }
    })
    .await?;
    for addr in [https(&gw), mqtts(&gw)] {
        let tls = tls_connect(addr, "localhost", trust_b.clone()).await?;
        ensure!(presented(&tls) == leaf_b, "{addr} still presents the old certificate");
        ensure!(tls_connect(addr, "localhost", trust_a.clone()).await.is_err(), "{addr} still accepts A's chain");
    }

    // The connection opened under A still works.
    let (status, _) = rest_publish(&gw.http, "reload", "after reload", &[]).await?;
    ensure!(status == 200, "REST publish {status}");
    let p = next_publish(&mut raw).await?;
    ensure!(p.body.ends_with(b"after reload"), "{p:?}");
    Ok(())
}

#[tokio::test]
async fn mtls_maps_the_certificate_to_the_client_id_and_refuses_unknown_cas() -> anyhow::Result<()> {
    let certs = cert_set("mtls", "sensor-7", &DEV_NAMES);
    let stranger = cert_set("mtls-stranger", "sensor-7", &DEV_NAMES);
    let ca = certs.files.ca.display().to_string();
    let gw = tls_gateway(&[&certs], |c| {
        c.tls.client_ca = ca;
        c.tls.mqtt_client_auth = ClientAuth::Required;
    })
    .await?;
    let device = client_config(
        &[&certs.files.ca],
        &[],
        Some((certs.files.client_cert.as_path(), certs.files.client_key.as_path())),
    );

    // The certificate's id, given or left empty, opens the session as that id.
    for (ver, asked) in [(Ver::V4, "sensor-7"), (Ver::V5, ""), (Ver::V5, "sensor-7")] {
        let mut raw = Raw::over(tls_connect(mqtts(&gw), "localhost", device.clone()).await?);
        ensure!(mqtt_connect(&mut raw, ver, asked, None).await? == Some(0), "{ver:?} {asked:?}");
        let (_, sessions) = switchboard_tests::get_json(&format!("{}/v1/sessions", gw.admin)).await?;
        ensure!(sessions.to_string().contains("sensor-7"), "{sessions}");
        raw.send(&common_mqtt::disconnect_packet(ver, 0)).await?;
    }
    // Another id is refused: 3.1.1 code 2, MQTT 5 0x85.
    for (ver, code) in [(Ver::V4, 2), (Ver::V5, 0x85)] {
        let mut raw = Raw::over(tls_connect(mqtts(&gw), "localhost", device.clone()).await?);
        ensure!(mqtt_connect(&mut raw, ver, "sensor-8", None).await? == Some(code), "{ver:?} posing as another id");
    }

    // No certificate, or one from an unknown CA: no session (TLS 1.3 reports
    // the refusal after the client's side of the handshake).
    let anonymous = client_config(&[&certs.files.ca], &[], None);
    let unknown = client_config(
        &[&certs.files.ca],
        &[],
        Some((stranger.files.client_cert.as_path(), stranger.files.client_key.as_path())),
    );
    for cfg in [anonymous, unknown] {
        if let Ok(tls) = tls_connect(mqtts(&gw), "localhost", cfg).await {
            let mut raw = Raw::over(tls);
            let outcome = async {
                raw.send(&connect_packet(4, "sensor-7", 30, None, &[])).await?;
                raw.packet().await
            }
            .await;
            ensure!(!matches!(outcome, Ok(Some(_))), "a refused certificate got {outcome:?}");
        }
    }
    // HTTPS does not ask for client certificates.
    tls_connect(https(&gw), "localhost", client_config(&[&certs.files.ca], &[], None)).await?;
    Ok(())
}

#[tokio::test]
async fn with_token_auth_a_certificate_alone_gets_cert_caps() -> anyhow::Result<()> {
    let certs = cert_set("certcaps", "sensor-9", &DEV_NAMES);
    let ca = certs.files.ca.display().to_string();
    let gw = tls_gateway(&[&certs], |c| {
        c.tls.client_ca = ca;
        c.tls.mqtt_client_auth = ClientAuth::Optional;
        c.auth.mode = switchboard::config::AuthMode::Token;
        c.auth.keys = vec![switchboard::auth::KeyConfig {
            kid: Some("k1".into()),
            alg: "HS256".into(),
            secret: Some("0123456789abcdef0123456789abcdef".into()),
            ..Default::default()
        }];
        c.auth.cert_caps =
            [("devices/{client_id}/#".to_string(), switchboard::auth::OpsSpec::Csv("subscribe,publish".into()))]
                .into_iter()
                .collect();
    })
    .await?;
    let device = client_config(
        &[&certs.files.ca],
        &[],
        Some((certs.files.client_cert.as_path(), certs.files.client_key.as_path())),
    );
    let mut raw = Raw::over(tls_connect(mqtts(&gw), "localhost", device).await?);
    ensure!(mqtt_connect(&mut raw, Ver::V4, "sensor-9", None).await? == Some(0), "certificate alone");
    ensure!(mqtt_subscribe(&mut raw, Ver::V4, 1, "devices/sensor-9/cmd").await? == 0, "own topic");
    ensure!(mqtt_subscribe(&mut raw, Ver::V4, 2, "devices/sensor-8/cmd").await? == 0x80, "another device's topic");
    ensure!(mqtt_subscribe(&mut raw, Ver::V4, 3, "devices/+/cmd").await? == 0x80, "a wildcard over devices");

    // Without a certificate (optional mode) and without a token: refused.
    let anonymous = client_config(&[&certs.files.ca], &[], None);
    let mut raw = Raw::over(tls_connect(mqtts(&gw), "localhost", anonymous).await?);
    let code = mqtt_connect(&mut raw, Ver::V4, "sensor-9", None).await?;
    ensure!(code == Some(5) || code == Some(4), "anonymous without token got {code:?}");
    Ok(())
}

fn tool(name: &str) -> anyhow::Result<()> {
    let found = Command::new("sh").arg("-c").arg(format!("command -v {name}")).output()?.status.success();
    if !found {
        bail!("{name} is missing: run `bash tests/run.sh`, which installs it");
    }
    Ok(())
}

/// Runs a command with a deadline; returns (success, stdout, stderr).
fn run_bounded(cmd: &mut Command, limit: Duration) -> anyhow::Result<(bool, String, String)> {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let deadline = std::time::Instant::now() + limit;
    loop {
        if child.try_wait()?.is_some() {
            let out = child.wait_with_output()?;
            return Ok((
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ));
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_openssl_and_mosquitto_speak_to_the_tls_listeners() -> anyhow::Result<()> {
    for t in ["curl", "openssl", "mosquitto_sub", "mosquitto_pub"] {
        tool(t)?;
    }
    let certs = cert_set("independent", "sensor-1", &DEV_NAMES);
    let ca = certs.files.ca.display().to_string();
    let gw = tls_gateway(&[&certs], |c| {
        c.tls.client_ca = ca.clone();
        c.tls.mqtt_client_auth = ClientAuth::Optional;
    })
    .await?;
    let (https_port, mqtts_port) = (https(&gw).port().to_string(), mqtts(&gw).port().to_string());

    // curl over HTTP/2, verifying the chain against the dev CA.
    let url = format!("https://127.0.0.1:{https_port}/v1/wt/cert-hash");
    let (ok, out, err) = tokio::task::block_in_place(|| {
        run_bounded(
            Command::new("curl").args(["-sS", "--http2", "--cacert", &ca, "-w", "\n%{http_version}", &url]),
            WAIT,
        )
    })?;
    ensure!(ok && out.trim_end().ends_with('2') && out.contains("sha-256"), "curl: {out} {err}");

    // openssl s_client: TLS 1.3, verified, ALPN h2.
    let connect = format!("127.0.0.1:{https_port}");
    let (_, out, err) = tokio::task::block_in_place(|| {
        run_bounded(
            Command::new("openssl").args([
                "s_client",
                "-connect",
                &connect,
                "-CAfile",
                &ca,
                "-alpn",
                "h2",
                "-servername",
                "localhost",
            ]),
            WAIT,
        )
    })?;
    let text = format!("{out}{err}");
    ensure!(text.contains("TLSv1.3") && text.contains("ALPN protocol: h2"), "openssl s_client: {text}");
    ensure!(text.contains("Verify return code: 0 (ok)"), "openssl did not verify the chain: {text}");

    // mosquitto_sub over MQTTS (server verified by --cafile) receives what
    // mosquitto_pub publishes with a client certificate (mTLS).
    let mut sub = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &mqtts_port, "--cafile", &ca, "-t", "plant/+", "-C", "1", "-W", "10", "-V"])
        .arg("mqttv311")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("mosquitto_sub")?;
    let pid = sub.id();
    let result = async {
        eventually(WAIT, "mosquitto_sub's subscription", || async {
            let (_, s) = switchboard_tests::get_json(&format!("{}/v1/stats", gw.admin)).await.unwrap_or_default();
            s["subscriptions"].as_u64().unwrap_or(0) >= 1
        })
        .await?;
        let (cert, key) = (certs.files.client_cert.display().to_string(), certs.files.client_key.display().to_string());
        let (ok, out, err) = tokio::task::block_in_place(|| {
            run_bounded(
                Command::new("mosquitto_pub").args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &mqtts_port,
                    "--cafile",
                    &ca,
                    "--cert",
                    &cert,
                    "--key",
                    &key,
                    "-i",
                    "sensor-1",
                    "-t",
                    "plant/boiler",
                    "-m",
                    "hot",
                ]),
                WAIT,
            )
        })?;
        ensure!(ok, "mosquitto_pub with a client certificate: {out} {err}");
        anyhow::Ok(())
    }
    .await;
    let output = tokio::task::block_in_place(|| {
        let deadline = std::time::Instant::now() + WAIT;
        while sub.try_wait().ok().flatten().is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if sub.try_wait().ok().flatten().is_none() {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
        sub.wait_with_output()
    })?;
    result?;
    let out = String::from_utf8_lossy(&output.stdout);
    ensure!(out.trim() == "hot", "mosquitto_sub printed {out:?} ({})", String::from_utf8_lossy(&output.stderr));
    Ok(())
}
