//! TLS at the edge, against real clients: rustls on HTTPS (HTTP/1.1 and
//! HTTP/2 chosen by ALPN, and a WebSocket over TLS) and on MQTTS; curl,
//! `openssl s_client` and `mosquitto_sub` / `mosquitto_pub` as clients that
//! share no code with the gateway; SNI; hot reload of the certificate files
//! with connections kept open; and mTLS, where a device's client
//! certificate names its MQTT client id. WebTransport on QUIC shares the
//! certificate store: a wtransport client that trusts the dev CA (a root
//! store, as a browser would, not a pinned hash) subscribes over `/v1/wt`,
//! SNI picks the certificate by name, and a reload reaches new QUIC
//! handshakes while open sessions go on.
//!
//! Certificates come from `switchboard::edge::tls::write_dev_ca` (what
//! `switchboard cert dev` writes), one CA per set, in a temporary folder.
//! curl, openssl and mosquitto-clients are installed by `tests/run.sh`; when
//! one is missing the test fails and says so. It never skips.

#[allow(dead_code)] // each test binary uses part of it
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
use switchboard::edge::config::{CertPair, ClientAuth, Config};
use switchboard::edge::tls::{DEV_NAMES, DevFiles, write_dev_ca};
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
    switchboard::edge::tls::hex(&switchboard::edge::tls::cert_sha256(der))
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
    let reload_errors = "switchboard_tls_reloads_total{result=\"error\"}";
    let errors_before = metric(&gw, reload_errors).await?;
    std::fs::write(&live.files.server_cert, "-----BEGIN CERTIFICATE-----\nnot base64\n")?;
    eventually(WAIT, "the broken file's reload to fail", || async {
        metric(&gw, reload_errors).await.is_ok_and(|n| n > errors_before)
    })
    .await?;
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
        c.auth.mode = switchboard::edge::config::AuthMode::Token;
        c.auth.keys = vec![switchboard::core::auth::KeyConfig {
            kid: Some("k1".into()),
            alg: "HS256".into(),
            secret: Some("0123456789abcdef0123456789abcdef".into()),
            ..Default::default()
        }];
        c.auth.cert_caps =
            [("devices/{client_id}/#".to_string(), switchboard::core::auth::OpsSpec::Csv("subscribe,publish".into()))]
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

// ---------------------------------------------------------------------------
// QUIC: WebTransport at /v1/wt on the same certificate store.

/// Resolves every host name to the gateway's QUIC address, so a URL's host
/// is only what the client sends as SNI and verifies the certificate
/// against.
#[derive(Debug)]
struct ToGateway(std::net::SocketAddr);

impl wtransport::config::DnsResolver for ToGateway {
    fn resolve(&self, _host: &str) -> std::pin::Pin<Box<dyn wtransport::config::DnsLookupFuture>> {
        let addr = self.0;
        Box::pin(async move { Ok(Some(addr)) })
    }
}

/// A gateway serving HTTPS, MQTTS and QUIC with `certs`.
async fn quic_gateway(certs: &[&CertDir]) -> anyhow::Result<TestGateway> {
    tls_gateway(certs, |c| c.listen.quic = "127.0.0.1:0".into()).await
}

fn quic(gw: &TestGateway) -> std::net::SocketAddr {
    gw.gateway.quic_addr.expect("quic listener")
}

/// A WebTransport session of a client trusting the CAs of `tls` (ALPN h3),
/// at `https://NAME:PORT/v1/wt`: `name` is the SNI and the name verified.
/// Open auth: `connect` as `client_id`.
struct QuicSession {
    // Keeps the UDP socket alive with the session.
    _endpoint: wtransport::Endpoint<wtransport::endpoint::endpoint_side::Client>,
    conn: wtransport::Connection,
    send: wtransport::SendStream,
    control: switchboard::tooling::client_wt::FrameReader,
    next_req: u64,
}

/// Opens the QUIC connection and the session, no more.
async fn quic_connect(
    gw: &TestGateway,
    name: &str,
    tls: &Arc<rustls::ClientConfig>,
) -> anyhow::Result<(wtransport::Endpoint<wtransport::endpoint::endpoint_side::Client>, wtransport::Connection)> {
    let mut config = wtransport::ClientConfig::builder()
        .with_bind_address("127.0.0.1:0".parse()?)
        .with_custom_tls(rustls::ClientConfig::clone(tls))
        .build();
    config.set_dns_resolver(ToGateway(quic(gw)));
    let endpoint = wtransport::Endpoint::client(config)?;
    let url = format!("https://{name}:{}/v1/wt", quic(gw).port());
    let conn = tokio::time::timeout(WAIT, endpoint.connect(url)).await??;
    Ok((endpoint, conn))
}

impl QuicSession {
    async fn open(
        gw: &TestGateway,
        name: &str,
        tls: &Arc<rustls::ClientConfig>,
        client_id: &str,
    ) -> anyhow::Result<QuicSession> {
        let (endpoint, conn) = quic_connect(gw, name, tls).await?;
        let (send, recv) = conn.open_bi().await?.await?;
        let control = switchboard::tooling::client_wt::FrameReader::new(recv);
        let mut s = QuicSession { _endpoint: endpoint, conn, send, control, next_req: 0 };
        let connect = switchboard_proto::Connect { client_id: client_id.into(), token: String::new() };
        let reply = s.request(switchboard_proto::client_frame::Frame::Connect(connect)).await?;
        ensure!(
            matches!(reply.frame, Some(switchboard_proto::server_frame::Frame::Connected(_))),
            "expected connected, got {reply:?}"
        );
        Ok(s)
    }

    /// Sends a request on the control stream; its reply.
    async fn request(
        &mut self,
        frame: switchboard_proto::client_frame::Frame,
    ) -> anyhow::Result<switchboard_proto::ServerFrame> {
        use prost::Message as _;
        self.next_req += 1;
        let req = self.next_req;
        let mut out = bytes::BytesMut::new();
        let body = switchboard_proto::ClientFrame { req, frame: Some(frame) }.encode_to_vec();
        switchboard_protocols::wt::codec::put_frame(&mut out, &body);
        self.send.write_all(&out).await?;
        loop {
            let f = switchboard_tests::wt_next(&mut self.control).await?;
            if f.req == req {
                return Ok(f);
            }
        }
    }

    async fn subscribe(&mut self, filter: &str) -> anyhow::Result<()> {
        let sub = switchboard_proto::Subscribe { filter: filter.into(), ..Default::default() };
        let reply = self.request(switchboard_proto::client_frame::Frame::Subscribe(sub)).await?;
        ensure!(
            matches!(reply.frame, Some(switchboard_proto::server_frame::Frame::Subscribed(_))),
            "subscribe {filter}: {reply:?}"
        );
        Ok(())
    }

    /// The next message on the next channel stream the gateway opens.
    async fn next_message_on_new_stream(&self) -> anyhow::Result<switchboard_proto::Envelope> {
        let stream = tokio::time::timeout(WAIT, self.conn.accept_uni()).await??;
        let mut reader = switchboard::tooling::client_wt::FrameReader::new(stream);
        switchboard_tests::wt_message(&mut reader).await
    }
}

/// The leaf certificate the gateway presented on a QUIC connection.
fn quic_presented(conn: &wtransport::Connection) -> anyhow::Result<CertificateDer<'static>> {
    let chain = conn.peer_identity().context("no server certificate")?;
    let leaf = chain.as_ref().first().context("an empty chain")?;
    Ok(CertificateDer::from(leaf.der().to_vec()))
}

/// The value of one metric series (name and labels as exported), 0 when absent.
async fn metric(gw: &TestGateway, series: &str) -> anyhow::Result<f64> {
    let text = reqwest::get(format!("{}/metrics", gw.admin)).await?.text().await?;
    let line = format!("{series} ");
    Ok(text.lines().find_map(|l| l.strip_prefix(&line)).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0))
}

/// `switchboard_tls_handshake_failures_total{listener="quic",reason="error"}`.
async fn quic_handshake_failures(gw: &TestGateway) -> anyhow::Result<f64> {
    metric(gw, "switchboard_tls_handshake_failures_total{listener=\"quic\",reason=\"error\"}").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webtransport_verifies_the_ca_signed_chain_and_delivers() -> anyhow::Result<()> {
    let certs = cert_set("quic", "dev-device", &DEV_NAMES);
    let gw = quic_gateway(&[&certs]).await?;
    let trust = client_config(&[&certs.files.ca], &[b"h3"], None);
    let leaf = leaf_of(&certs.files.server_cert);
    let ca = leaf_of(&certs.files.ca);

    // By name (SNI localhost) and by address (the certificate's IP name):
    // the chain verifies against the dev CA; the leaf is the CA's, not a
    // self-signed one.
    for name in ["localhost", "127.0.0.1"] {
        let mut s = QuicSession::open(&gw, name, &trust, &format!("quic-{name}")).await?;
        let chain = s.conn.peer_identity().context("no chain")?;
        let chain: Vec<&[u8]> = chain.as_ref().iter().map(|c| c.der()).collect();
        ensure!(chain.first() == Some(&leaf.as_ref()) && chain.get(1) == Some(&ca.as_ref()), "{name}: leaf + CA");
        ensure!(leaf != ca, "the leaf is not the CA");
        let channel = format!("secure/{name}");
        s.subscribe(&channel).await?;
        let (status, _) = rest_publish(&gw.http, &channel, "over quic", &[]).await?;
        ensure!(status == 200, "REST publish {status}");
        let m = s.next_message_on_new_stream().await?;
        ensure!((m.channel.as_str(), &m.payload[..]) == (channel.as_str(), &b"over quic"[..]), "{m:?}");
    }

    // A client that trusts another CA refuses the handshake; the gateway
    // counts the failed handshake.
    let before = quic_handshake_failures(&gw).await?;
    let other = cert_set("quic-other", "x", &DEV_NAMES);
    let wrong = client_config(&[&other.files.ca], &[b"h3"], None);
    let err = quic_connect(&gw, "localhost", &wrong).await.err().map(|e| e.to_string());
    // (Both dev CAs have the same name: the signature is what fails.)
    ensure!(err.as_deref().is_some_and(|e| e.contains("invalid peer certificate")), "an untrusted chain: {err:?}");
    eventually(WAIT, "the failed handshake counted", || async {
        quic_handshake_failures(&gw).await.is_ok_and(|n| n > before)
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_on_quic_chooses_the_certificate_by_name() -> anyhow::Result<()> {
    let main = cert_set("quic-sni-main", "d", &DEV_NAMES);
    let api = cert_set("quic-sni-api", "d", &["api.example.test", "*.tenants.example.test"]);
    let gw = quic_gateway(&[&main, &api]).await?;
    let trust = client_config(&[&main.files.ca, &api.files.ca], &[b"h3"], None);
    let main_leaf = leaf_of(&main.files.server_cert);
    let api_leaf = leaf_of(&api.files.server_cert);
    // The URL's host is the SNI (no SNI for an address: the default).
    for (name, want) in [
        ("api.example.test", &api_leaf),
        ("acme.tenants.example.test", &api_leaf),
        ("localhost", &main_leaf),
        ("127.0.0.1", &main_leaf),
    ] {
        let mut s =
            QuicSession::open(&gw, name, &trust, &format!("sni-{name}")).await.with_context(|| name.to_string())?;
        ensure!(quic_presented(&s.conn)? == *want, "{name} got the wrong certificate");
        let pong = s.request(switchboard_proto::client_frame::Frame::Ping(switchboard_proto::Ping {})).await?;
        ensure!(matches!(pong.frame, Some(switchboard_proto::server_frame::Frame::Pong(_))), "{name}: {pong:?}");
    }
    // A name no certificate lists gets the default, which does not cover it.
    let main_only = client_config(&[&main.files.ca], &[b"h3"], None);
    let err = quic_connect(&gw, "unknown.example.test", &main_only).await.err().map(|e| e.to_string());
    ensure!(err.as_deref().is_some_and(|e| e.contains("not valid for name")), "{err:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_reaches_new_quic_handshakes_and_keeps_open_sessions() -> anyhow::Result<()> {
    let live = cert_set("quic-reload-live", "d", &DEV_NAMES);
    let a = cert_set("quic-reload-a", "d", &DEV_NAMES);
    let b = cert_set("quic-reload-b", "d", &DEV_NAMES);
    let copy = |from: &CertDir| -> anyhow::Result<()> {
        std::fs::copy(&from.files.server_cert, &live.files.server_cert)?;
        std::fs::copy(&from.files.server_key, &live.files.server_key)?;
        Ok(())
    };
    copy(&a)?;
    let gw = quic_gateway(&[&live]).await?;
    let trust_a = client_config(&[&a.files.ca], &[b"h3"], None);
    let trust_b = client_config(&[&b.files.ca], &[b"h3"], None);
    let leaf_b = leaf_of(&b.files.server_cert);

    // A session opened under certificate A.
    let mut kept = QuicSession::open(&gw, "localhost", &trust_a, "kept").await?;
    kept.subscribe("reload/quic").await?;
    ensure!(quic_connect(&gw, "localhost", &trust_b).await.is_err(), "B trusted before the reload");

    copy(&b)?;
    eventually(WAIT, "new QUIC handshakes to present certificate B", || async {
        quic_connect(&gw, "localhost", &trust_b).await.is_ok()
    })
    .await?;
    let (_endpoint, conn) = quic_connect(&gw, "localhost", &trust_b).await?;
    ensure!(quic_presented(&conn)? == leaf_b, "QUIC still presents the old certificate");
    // The reload forgot every session made under A: neither the client that
    // holds a ticket from before it (which would otherwise resume without
    // seeing any certificate) nor a fresh one gets in trusting only A.
    ensure!(quic_connect(&gw, "localhost", &trust_a).await.is_err(), "QUIC resumed a session made under A");
    let fresh_a = client_config(&[&a.files.ca], &[b"h3"], None);
    ensure!(quic_connect(&gw, "localhost", &fresh_a).await.is_err(), "QUIC still accepts A's chain");
    let mut fresh = QuicSession::open(&gw, "localhost", &trust_b, "fresh").await?;
    fresh.subscribe("reload/quic").await?;

    // The session opened under A goes on, as does the new one.
    let (status, _) = rest_publish(&gw.http, "reload/quic", "after reload", &[]).await?;
    ensure!(status == 200, "REST publish {status}");
    for (who, s) in [("kept", &kept), ("fresh", &fresh)] {
        let m = s.next_message_on_new_stream().await?;
        ensure!(&m.payload[..] == b"after reload", "{who}: {m:?}");
    }
    let pong = kept.request(switchboard_proto::client_frame::Frame::Ping(switchboard_proto::Ping {})).await?;
    ensure!(matches!(pong.frame, Some(switchboard_proto::server_frame::Frame::Pong(_))), "{pong:?}");
    Ok(())
}
