//! The README's promise, end to end with the real binary: `switchboard dev`
//! starts and prints its endpoints, `switchboard sub` receives what
//! `switchboard pub` sends (over REST and over WebSocket), `check` validates
//! configs, and SIGTERM shuts down cleanly.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");
const WAIT: Duration = Duration::from_secs(15);

/// A child process killed on drop, whose stdout lines arrive on a channel.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    fn spawn(args: &[&str]) -> Proc {
        let mut child = Command::new(BIN)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn switchboard");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc { child, lines }
    }

    /// The next stdout line containing `needle`.
    fn line_with(&self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => continue,
                Err(e) => panic!("no line containing {needle:?}: {e}"),
            }
        }
    }

    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "process did not exit within {WAIT:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN).args(args).output().expect("run switchboard");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// The address after `prefix` in a banner line, e.g. `ws://127.0.0.1:PORT`.
fn addr_after(line: &str, prefix: &str) -> String {
    let start = line.find(prefix).expect("prefix") + prefix.len();
    line[start..].split('/').next().expect("addr").to_string()
}

#[test]
fn pub_reaches_sub_and_sigterm_shuts_down() {
    let mut gw = Proc::spawn(&["dev", "--http", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--mqtt", "127.0.0.1:0"]);
    let ws_line = gw.line_with("WebSocket");
    let http = addr_after(&ws_line, "ws://");
    let admin_line = gw.line_with("admin");
    let admin = addr_after(&admin_line, "http://");
    let http_url = format!("http://{http}");
    let ws_url = format!("ws://{http}");

    let subs: Vec<Proc> = ["ws", "sse", "poll"]
        .iter()
        .map(|via| Proc::spawn(&["sub", "tour/#", "--via", via, "--url", &http_url, "--count", "3"]))
        .collect();
    // The subscribers are registered once the admin API counts them.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let sessions =
            reqwest::blocking::get(format!("http://{admin}/v1/stats")).and_then(|r| r.json::<serde_json::Value>());
        if sessions.is_ok_and(|v| v["subscriptions"].as_u64() == Some(3)) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "subscriber never subscribed");
        std::thread::sleep(Duration::from_millis(20));
    }

    let (ok, out, err) = run(&["pub", "tour/a", "hello", "--url", &http_url]);
    assert!(ok, "pub over REST failed: {err}");
    assert!(out.starts_with("tour/a ") && out.trim_end().ends_with(":1"), "{out}");
    let (ok, out, err) = run(&["pub", "tour/b", "{\"x\": 1}", "--url", &ws_url, "--id", "k"]);
    assert!(ok, "pub over WebSocket failed: {err}");
    assert!(out.trim_end().ends_with(":1"), "{out}");
    let (ok, out, _) = run(&["pub", "tour/b", "{\"x\": 1}", "--url", &http_url, "--id", "k"]);
    assert!(ok && out.contains("(duplicate)"), "same id over REST is a duplicate: {out}");
    let (ok, _, _) = run(&["pub", "tour/a", "bye", "--url", &http_url]);
    assert!(ok);

    for (via, mut sub) in ["ws", "sse", "poll"].into_iter().zip(subs) {
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
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dev_refuses_non_loopback() {
    let (ok, _, err) = run(&["dev", "--http", "0.0.0.0:0", "--mqtt", "127.0.0.1:0"]);
    assert!(!ok);
    assert!(err.contains("loopback"), "{err}");
}
