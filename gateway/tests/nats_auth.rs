//! How a gateway node reaches NATS (#12 item 1): user and password, a
//! token, an NKey, a `.creds` file (operator mode) and TLS with a client
//! certificate, each against a real `nats-server` that demands it; wrong
//! credentials and an untrusted server stop the start with an error that
//! names the cause.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::DataDir;
use common::cluster::{ClusterNode, http_get_json, nats_server_bin};

/// One `nats-server` with JetStream and `extra` flags, killed on drop.
struct Single {
    child: Child,
    port: u16,
}

impl Drop for Single {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<std::net::TcpListener> =
        (0..N).map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a free port")).collect();
    std::array::from_fn(|i| held[i].local_addr().expect("port").port())
}

fn single(store: &Path, extra: &[&str]) -> Single {
    let [port, monitor] = free_ports::<2>();
    let child = Command::new(nats_server_bin())
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-m", &monitor.to_string(), "-js"])
        .args(["-sd", &store.display().to_string()])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(if std::env::var_os("SBTEST_STDERR").is_some() { Stdio::inherit() } else { Stdio::null() })
        .spawn()
        .expect("nats-server (bash tests/run.sh installs it)");
    let deadline = Instant::now() + Duration::from_secs(15);
    while http_get_json(monitor, "/healthz").is_none_or(|v| v["status"] != "ok") {
        assert!(Instant::now() < deadline, "nats-server did not become healthy");
        std::thread::sleep(Duration::from_millis(50));
    }
    Single { child, port }
}

/// `switchboard dev --nats URL` that must fail: its exit status and stderr.
fn refused(url: &str, env: &[(&str, &str)]) -> String {
    let out = Command::new(common::BIN)
        .args(["dev", "--http", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--mqtt", "127.0.0.1:0"])
        .args(["--https", "", "--mqtts", "", "--quic", "", "--nats", url])
        .envs([("SWITCHBOARD_NATS__REPLICAS", "1"), ("SWITCHBOARD_NATS__CONNECT_TIMEOUT", "2s")])
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("run switchboard");
    assert!(!out.status.success(), "the start is refused");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A publish through the node answers 200 with a position.
fn publishes(node: &ClusterNode) {
    let r = reqwest::blocking::Client::new()
        .post(format!("{}/v1/channels/auth/check/messages", node.base()))
        .body("hello")
        .send()
        .expect("REST publish");
    assert_eq!(r.status(), 200, "{:?}", r.text());
}

#[test]
fn user_password_and_token_are_sent_and_wrong_ones_refused() {
    let dir = DataDir::new("nats-auth");
    let nats = single(&dir.0.join("user"), &["--user", "sb", "--pass", "s3cret-pass"]);
    let url = format!("nats://127.0.0.1:{}", nats.port);
    let env = [("SWITCHBOARD_NATS__REPLICAS", "1"), ("SWITCHBOARD_NATS__USER", "sb")];
    let node =
        ClusterNode::start("auth-1", &url, None, &[env[0], env[1], ("SWITCHBOARD_NATS__PASSWORD", "s3cret-pass")]);
    publishes(&node);
    drop(node);
    let err = refused(&url, &[env[1], ("SWITCHBOARD_NATS__PASSWORD", "wrong")]);
    assert!(err.contains("cannot connect to NATS") && err.to_lowercase().contains("authoriz"), "{err}");
    drop(nats);

    let nats = single(&dir.0.join("token"), &["--auth", "a-long-token-0123456789"]);
    let url = format!("nats://127.0.0.1:{}", nats.port);
    let node = ClusterNode::start(
        "auth-2",
        &url,
        None,
        &[("SWITCHBOARD_NATS__REPLICAS", "1"), ("SWITCHBOARD_NATS__TOKEN", "a-long-token-0123456789")],
    );
    publishes(&node);
    drop(node);
    let err = refused(&url, &[("SWITCHBOARD_NATS__TOKEN", "not-the-token")]);
    assert!(err.contains("cannot connect to NATS"), "{err}");
}

#[test]
fn an_nkey_seed_signs_the_connection() {
    let dir = DataDir::new("nats-nkey");
    std::fs::create_dir_all(&dir.0).unwrap();
    let user = nkeys::KeyPair::new_user();
    let conf = dir.0.join("nats.conf");
    std::fs::write(&conf, format!("authorization {{ users = [ {{ nkey: \"{}\" }} ] }}\n", user.public_key())).unwrap();
    let nats = single(&dir.0.join("js"), &["-c", &conf.display().to_string()]);
    let url = format!("nats://127.0.0.1:{}", nats.port);
    let seed = dir.0.join("user.nk");
    std::fs::write(&seed, format!("{}\n", user.seed().unwrap())).unwrap();
    let seed = seed.display().to_string();
    let node = ClusterNode::start(
        "nkey-1",
        &url,
        None,
        &[("SWITCHBOARD_NATS__REPLICAS", "1"), ("SWITCHBOARD_NATS__NKEY_SEED_FILE", seed.as_str())],
    );
    publishes(&node);
    drop(node);
    // Another key is not a user of this server.
    let other = dir.0.join("other.nk");
    std::fs::write(&other, nkeys::KeyPair::new_user().seed().unwrap()).unwrap();
    let err = refused(&url, &[("SWITCHBOARD_NATS__NKEY_SEED_FILE", &other.display().to_string())]);
    assert!(err.contains("cannot connect to NATS"), "{err}");
}

#[test]
fn tls_with_a_client_certificate_and_an_untrusted_server_refused() {
    let dir = DataDir::new("nats-tls");
    let certs = dir.0.join("certs");
    let f = switchboard::edge::tls::write_dev_ca(&certs, "gateway", &switchboard::edge::tls::DEV_NAMES)
        .expect("development certificates");
    let (ca, cert, key) =
        (f.ca.display().to_string(), f.server_cert.display().to_string(), f.server_key.display().to_string());
    // The server demands TLS and a client certificate from the CA.
    let nats =
        single(&dir.0.join("js"), &["--tls", "--tlscert", &cert, "--tlskey", &key, "--tlsverify", "--tlscacert", &ca]);
    let url = format!("tls://127.0.0.1:{}", nats.port);
    let (ccert, ckey) = (f.client_cert.display().to_string(), f.client_key.display().to_string());
    let env = [
        ("SWITCHBOARD_NATS__REPLICAS", "1"),
        ("SWITCHBOARD_NATS__TLS_CA", ca.as_str()),
        ("SWITCHBOARD_NATS__TLS_CERT", ccert.as_str()),
        ("SWITCHBOARD_NATS__TLS_KEY", ckey.as_str()),
        ("SWITCHBOARD_NATS__TLS_REQUIRED", "true"),
    ];
    let node = ClusterNode::start("tls-1", &url, None, &env);
    publishes(&node);
    drop(node);
    // Without the CA the server's certificate is not trusted.
    let err = refused(&url, &[env[3], env[2], env[4]]);
    assert!(err.contains("cannot connect to NATS"), "{err}");
    // Without a client certificate the server refuses the handshake.
    let err = refused(&url, &[env[1], env[4]]);
    assert!(err.contains("cannot connect to NATS"), "{err}");
}

/// A NATS JWT: `claims` (with `iss`, `sub`, `iat`, `jti` filled in) signed
/// by `issuer`, as NATS's decentralised auth reads them.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    use base64::Engine as _;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let iat = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let claims = serde_json::json!({
        "jti": format!("test{iat}{}", &subject[..8]),
        "iat": iat,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let signed = format!("{}.{}", b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#), b64(claims.to_string().as_bytes()));
    let signature = issuer.sign(signed.as_bytes()).expect("sign");
    format!("{signed}.{}", b64(&signature))
}

/// A `.creds` file: the user's JWT and its NKey seed, framed as `nsc`
/// writes them.
fn creds(user_jwt: &str, seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n"
    )
}

/// Decentralised auth (an operator, an account with JetStream, a user):
/// the node connects with the user's `.creds` file; a user the account did
/// not sign is refused.
#[test]
fn a_creds_file_signs_in_as_a_user_of_an_operator() {
    let dir = DataDir::new("nats-creds");
    std::fs::create_dir_all(&dir.0).unwrap();
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let operator_jwt =
        jwt(&operator, &operator.public_key(), "op", serde_json::json!({"type": "operator", "version": 2}));
    let unlimited = serde_json::json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": true, "conn": -1,
        "leaf": -1, "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
    });
    let account_jwt = jwt(
        &operator,
        &account.public_key(),
        "switchboard",
        serde_json::json!({"limits": unlimited, "type": "account", "version": 2}),
    );
    // JetStream wants a system account.
    let system = nkeys::KeyPair::new_account();
    let system_jwt = jwt(&operator, &system.public_key(), "SYS", serde_json::json!({"type": "account", "version": 2}));
    let user_claims =
        serde_json::json!({"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2});
    let user_jwt = jwt(&account, &user.public_key(), "gateway", user_claims.clone());
    let conf = dir.0.join("nats.conf");
    std::fs::write(
        &conf,
        format!(
            "operator: \"{operator_jwt}\"\nsystem_account: {sys}\nresolver: MEMORY\n\
             resolver_preload: {{\n  {acc}: \"{account_jwt}\"\n  {sys}: \"{system_jwt}\"\n}}\n",
            acc = account.public_key(),
            sys = system.public_key(),
        ),
    )
    .unwrap();
    let nats = single(&dir.0.join("js"), &["-c", &conf.display().to_string()]);
    let url = format!("nats://127.0.0.1:{}", nats.port);
    let file = dir.0.join("gateway.creds");
    std::fs::write(&file, creds(&user_jwt, &user.seed().unwrap())).unwrap();
    let file = file.display().to_string();
    let node = ClusterNode::start(
        "creds-1",
        &url,
        None,
        &[("SWITCHBOARD_NATS__REPLICAS", "1"), ("SWITCHBOARD_NATS__CREDS_FILE", file.as_str())],
    );
    publishes(&node);
    drop(node);
    // A user signed by another account key is not trusted.
    let stranger = nkeys::KeyPair::new_user();
    let forged = jwt(&nkeys::KeyPair::new_account(), &stranger.public_key(), "stranger", user_claims);
    let other = dir.0.join("stranger.creds");
    std::fs::write(&other, creds(&forged, &stranger.seed().unwrap())).unwrap();
    let err = refused(&url, &[("SWITCHBOARD_NATS__CREDS_FILE", &other.display().to_string())]);
    assert!(err.contains("cannot connect to NATS"), "{err}");
}
