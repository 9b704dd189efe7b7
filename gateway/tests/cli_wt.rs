//! `switchboard sub --via wt` and `switchboard pub --via wt` with the real
//! binary against `switchboard dev`: the certificate trusted by the hash the
//! banner prints (or not checked, with `--insecure`), a wrong hash refused,
//! and `sub` reconnecting and recovering after an administrator closes its
//! session, as it does over WebSocket.

mod common;

use std::process::Command;

use common::{BIN, DevGateway, Proc, WAIT};

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN).args(args).output().expect("run switchboard");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn wt_sessions(admin: &str) -> Vec<serde_json::Value> {
    let v: serde_json::Value =
        reqwest::blocking::get(format!("http://{admin}/v1/sessions")).and_then(|r| r.json()).unwrap_or_default();
    v["sessions"].as_array().cloned().unwrap_or_default().into_iter().filter(|s| s["protocol"] == "wt").collect()
}

#[test]
fn pub_and_sub_over_webtransport() {
    let gw = DevGateway::start();
    let quic = format!("https://{}", gw.quic.clone().expect("the dev banner lists WebTransport"));
    let hash = gw.cert_hash.clone();
    let admin = gw.admin.clone();
    let mut sub = Proc::spawn(&["sub", "wt/#", "--via", "wt", "--url", &quic, "--cert-hash", &hash, "--count", "4"]);
    common::eventually("the WebTransport subscriber", || wt_sessions(&admin).len() == 1);

    let (ok, out, err) = run(&["pub", "wt/a", "one", "--via", "wt", "--url", &quic, "--cert-hash", &hash]);
    assert!(ok, "pub --via wt failed: {err}");
    assert!(out.starts_with("wt/a ") && out.trim_end().ends_with(":1"), "{out}");
    let (ok, out, err) = run(&["pub", "wt/b", "two", "--via", "wt", "--url", &quic, "--insecure", "--id", "k"]);
    assert!(ok, "pub --via wt --insecure failed: {err}");
    assert!(out.trim_end().ends_with(":1"), "{out}");
    let (ok, out, _) = run(&["pub", "wt/b", "two", "--via", "wt", "--url", &quic, "--insecure", "--id", "k"]);
    assert!(ok && out.contains("(duplicate)"), "{out}");
    // A certificate with another hash is refused.
    let wrong = "00".repeat(32);
    let (ok, _, err) = run(&["pub", "wt/a", "x", "--via", "wt", "--url", &quic, "--cert-hash", &wrong]);
    assert!(!ok && err.contains("certificate"), "{err}");

    let got: Vec<String> = (0..2).map(|_| sub.lines.recv_timeout(WAIT).expect("sub output")).collect();
    assert!(got[0].starts_with("wt/a ") && got[0].ends_with(" one"), "{got:?}");
    assert!(got[1].starts_with("wt/b ") && got[1].ends_with(" two"), "{got:?}");

    // An administrator closes the session; `sub` comes back and recovers
    // what was published while it was away.
    let id = wt_sessions(&admin).first().and_then(|s| s["id"].as_u64()).expect("the sub's session");
    let closed = reqwest::blocking::Client::new()
        .post(format!("http://{admin}/v1/sessions/{id}/close"))
        .send()
        .expect("admin close");
    assert!(closed.status().is_success());
    let http = format!("http://{}", gw.http);
    let (ok, _, err) = run(&["pub", "wt/a", "three", "--url", &http]);
    assert!(ok, "{err}");
    common::eventually("the reconnect", || wt_sessions(&admin).iter().any(|s| s["id"].as_u64() != Some(id)));
    let (ok, _, err) = run(&["pub", "wt/a", "four", "--url", &http]);
    assert!(ok, "{err}");
    let got: Vec<String> = (0..2).map(|_| sub.lines.recv_timeout(WAIT).expect("sub output")).collect();
    assert!(got[0].starts_with("wt/a ") && got[0].ends_with(":2 three"), "{got:?}");
    assert!(got[1].ends_with(":3 four"), "{got:?}");
    assert!(sub.wait_exit().success(), "sub --count 4 exits 0");
}
