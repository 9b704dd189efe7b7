//! Shared by the tests that run the real `switchboard` binary: a child
//! process killed (by PID) on drop whose stdout lines arrive on a channel,
//! and `switchboard dev` on free loopback ports with its banner parsed.
// Each test binary uses a different part of this module.
#![allow(dead_code)]

pub mod cluster;
pub mod webhooks;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_switchboard");
/// How long anything here waits.
pub const WAIT: Duration = Duration::from_secs(15);

/// A child process killed on drop, whose stdout lines arrive on a channel.
pub struct Proc {
    /// The process.
    pub child: Child,
    /// Its stdout, line by line.
    pub lines: mpsc::Receiver<String>,
}

impl Proc {
    /// Runs the binary with `args` (stderr discarded, or passed through when
    /// `SBTEST_STDERR` is set: the logs of a failing test).
    pub fn spawn(args: &[&str]) -> Proc {
        Self::spawn_env(args, &[])
    }

    /// [`Proc::spawn`] with extra environment variables.
    pub fn spawn_env(args: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut child = Command::new(BIN)
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(if std::env::var_os("SBTEST_STDERR").is_some() { Stdio::inherit() } else { Stdio::null() })
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
    pub fn line_with(&self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => continue,
                Err(e) => panic!("no line containing {needle:?}: {e}"),
            }
        }
    }

    /// Waits (bounded) for the process to exit.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        wait_child(&mut self.child, WAIT, "switchboard")
    }

    /// Sends `sig` (as `kill` spells it) and waits for the exit.
    pub fn signal(&mut self, sig: &str) {
        let status = Command::new("kill").args([sig, &self.child.id().to_string()]).status().expect("kill");
        assert!(status.success());
        self.wait_exit();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits at most `within` for `child` to exit; panics naming `what` if not.
pub fn wait_child(child: &mut Child, within: Duration, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        assert!(Instant::now() < deadline, "{what} did not exit within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `cond` (every 20 ms) until it holds, for at most [`WAIT`].
pub fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// [`eventually`] for async tests: polls `cond` every 20 ms until it holds,
/// for at most [`WAIT`], without blocking the runtime (the clients under
/// test run on it).
pub async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `host:port` after `prefix` in a banner line.
pub fn addr_after(line: &str, prefix: &str) -> String {
    let start = line.find(prefix).expect("prefix") + prefix.len();
    line[start..].split(['/', ' ']).next().expect("addr").to_string()
}

/// What `switchboard dev`'s banner lists, up to its last line (`Try:`).
#[derive(Debug, Default)]
pub struct Banner {
    /// HTTP listener `host:port`.
    pub http: String,
    /// Admin listener `host:port`.
    pub admin: String,
    /// MQTT listener `host:port`.
    pub mqtt: String,
    /// HTTPS listener `host:port`.
    pub https: String,
    /// MQTTS listener `host:port`.
    pub mqtts: String,
    /// QUIC (WebTransport) listener `host:port`.
    pub quic: Option<String>,
    /// Hex SHA-256 of the generated certificate.
    pub cert_hash: String,
    /// The `storage` line.
    pub storage: String,
    /// The `engine` line.
    pub engine: String,
}

impl Banner {
    /// Reads `proc`'s banner, for at most `within`.
    pub fn read(proc: &Proc, within: Duration) -> Banner {
        let mut b = Banner::default();
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = proc.lines.recv_timeout(left).expect("the dev banner, ending with a Try: line");
            let l = line.trim_start();
            if l.starts_with("REST") {
                b.http = addr_after(l, "http://");
            } else if l.starts_with("admin") {
                b.admin = addr_after(l, "http://");
            } else if l.starts_with("MQTT ") {
                b.mqtt = addr_after(l, "mqtt://");
            } else if l.starts_with("HTTPS") {
                b.https = addr_after(l, "https://");
            } else if l.starts_with("MQTTS") {
                b.mqtts = addr_after(l, "mqtts://");
            } else if l.starts_with("WebTransport") {
                b.quic = Some(addr_after(l, "https://"));
            } else if let Some(hash) = l.strip_prefix("cert SHA-256 ") {
                b.cert_hash = hash.trim().to_string();
            } else if l.starts_with("storage") {
                b.storage = l.to_string();
            } else if l.starts_with("engine") {
                b.engine = l.to_string();
            } else if l.starts_with("Try:") {
                return b;
            }
        }
    }
}

/// `switchboard dev` with every listener on a free loopback port (never the
/// standard ones), its addresses read from the banner.
pub struct DevGateway {
    /// The process (killed on drop).
    pub proc: Proc,
    /// HTTP listener `host:port`.
    pub http: String,
    /// Admin listener `host:port`.
    pub admin: String,
    /// MQTT listener `host:port`.
    pub mqtt: String,
    /// HTTPS listener `host:port`.
    pub https: String,
    /// MQTTS listener `host:port`.
    pub mqtts: String,
    /// QUIC (WebTransport) listener `host:port`, once the banner lists it.
    pub quic: Option<String>,
    /// Hex SHA-256 of the generated certificate.
    pub cert_hash: String,
}

impl DevGateway {
    /// Starts it and waits for the banner (its last line starts `Try:`).
    pub fn start() -> DevGateway {
        Self::start_env(&[])
    }

    /// [`DevGateway::start`] with `SWITCHBOARD_*` overrides in the environment.
    pub fn start_env(env: &[(&str, &str)]) -> DevGateway {
        let free = "127.0.0.1:0";
        let proc = Proc::spawn_env(
            &["dev", "--http", free, "--admin", free, "--mqtt", free, "--https", free, "--mqtts", free, "--quic", free],
            env,
        );
        let b = Banner::read(&proc, WAIT);
        let gw = DevGateway {
            proc,
            http: b.http,
            admin: b.admin,
            mqtt: b.mqtt,
            https: b.https,
            mqtts: b.mqtts,
            quic: b.quic,
            cert_hash: b.cert_hash,
        };
        for (what, v) in [("http", &gw.http), ("admin", &gw.admin), ("mqtt", &gw.mqtt), ("https", &gw.https)] {
            assert!(!v.is_empty(), "the dev banner lists no {what} address");
        }
        assert!(!gw.mqtts.is_empty() && gw.cert_hash.len() == 64, "the dev banner lists MQTTS and the cert hash");
        gw
    }
}

/// Headless Chromium, driven by tests/browser's playwright-core.
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// A browser script bounds itself at 30 s; this only catches a hung `node`.
pub const SCRIPT_WAIT: Duration = Duration::from_secs(60);

/// Fails (never skips) when something a browser test needs is not
/// installed.
pub fn require_browser(root: &Path) {
    let fix = "run `bash tests/run.sh` (it installs chromium, node and tests/browser/node_modules)";
    let node = Command::new("node").arg("--version").output();
    assert!(node.is_ok_and(|o| o.status.success()), "`node` is not on PATH: {fix}");
    assert!(Path::new(CHROMIUM).exists(), "{CHROMIUM} is missing: {fix}");
    let pw = root.join("tests/browser/node_modules/playwright-core");
    assert!(pw.exists(), "{} is missing: {fix}", pw.display());
}

/// Runs `tests/browser/SCRIPT` with `args` to its end (bounded by
/// `wait`) and returns its last stdout line as JSON, after
/// asserting that it succeeded.
pub fn run_browser_script(root: &Path, script: &str, args: &[String], wait: Duration) -> serde_json::Value {
    let mut node = Command::new("node")
        .arg(root.join("tests/browser").join(script))
        .args(args)
        .current_dir(root)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn node");
    let out = read_all(node.stdout.take().expect("stdout"));
    let err = read_all(node.stderr.take().expect("stderr"));
    let status = wait_or_kill(&mut node, wait, script);
    let out = out.join().expect("stdout reader");
    let err = err.join().expect("stderr reader");
    let last = out.lines().last().unwrap_or_default();
    assert!(status.success(), "{script} failed ({status}): {last}\nstderr:\n{err}");
    let result: serde_json::Value = serde_json::from_str(last).expect("result line is JSON");
    assert_eq!(result["ok"], true, "{last}");
    result
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

impl DevGateway {
    /// The gateway's process id (for `bench --server-pid`).
    pub fn pid(&self) -> u32 {
        self.proc.child.id()
    }
}

/// Runs the binary with `args` to completion (bounded by `limit`); returns
/// its exit status and stdout.
pub fn run_to_end(args: &[&str], limit: Duration) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn switchboard");
    let reader = read_all(child.stdout.take().expect("stdout"));
    let status = wait_or_kill(&mut child, limit, &format!("switchboard {args:?}"));
    (status, reader.join().expect("stdout reader"))
}

/// Reads a child's pipe to its end on a thread of its own (so a full pipe
/// never stalls the child).
fn read_all(mut pipe: impl std::io::Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = pipe.read_to_string(&mut s);
        s
    })
}

/// Waits at most `limit` for `child` to exit; past it, kills it (by PID)
/// and panics naming `what`.
fn wait_or_kill(child: &mut Child, limit: Duration, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A directory for one test's store, removed afterwards.
pub struct DataDir(pub PathBuf);

impl DataDir {
    /// A fresh, empty directory named after `tag` and this process.
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("sb-storage-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        DataDir(dir)
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `switchboard dev` with plain listeners only, on free ports or on the
/// given `(http, admin, mqtt)`, where `store` (`--data DIR`, `--nats URL`)
/// says where channel state lives; the process and its banner, read for at
/// most `within`.
pub fn plain_dev(
    store: &[&str],
    on: Option<(&str, &str, &str)>,
    env: &[(&str, &str)],
    within: Duration,
) -> (Proc, Banner) {
    let (http, admin, mqtt) = on.unwrap_or(("127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0"));
    let mut args =
        vec!["dev", "--http", http, "--admin", admin, "--mqtt", mqtt, "--https", "", "--mqtts", "", "--quic", ""];
    args.extend_from_slice(store);
    let proc = Proc::spawn_env(&args, env);
    let banner = Banner::read(&proc, within);
    (proc, banner)
}

/// `switchboard dev --data DIR` (plain listeners only), its addresses read
/// from the banner.
pub struct Node {
    /// The process (killed on drop).
    pub proc: Proc,
    /// HTTP listener `host:port`.
    pub http: String,
    /// Admin listener `host:port`.
    pub admin: String,
    /// MQTT listener `host:port`.
    pub mqtt: String,
}

impl Node {
    /// Starts on free ports, or on the given `(http, admin, mqtt)`.
    pub fn start(dir: &Path, on: Option<(&str, &str, &str)>, env: &[(&str, &str)]) -> Node {
        let data = dir.display().to_string();
        let (proc, b) = plain_dev(&["--data", &data], on, env, WAIT);
        assert!(b.storage.contains(&data), "the banner names the store: {}", b.storage);
        Node { proc, http: b.http, admin: b.admin, mqtt: b.mqtt }
    }

    /// `http://` + the HTTP listener.
    pub fn base(&self) -> String {
        format!("http://{}", self.http)
    }

    /// `mqtt://` + the MQTT listener.
    pub fn mqtt_url(&self) -> String {
        format!("mqtt://{}", self.mqtt)
    }

    /// Sends `sig` (as `kill` spells it) and waits for the exit.
    pub fn signal(&mut self, sig: &str) {
        self.proc.signal(sig);
    }
}
