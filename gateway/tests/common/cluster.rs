//! A JetStream cluster of real `nats-server` processes on loopback, and
//! `switchboard dev --nats` gateway nodes on it.
//!
//! Every port is one the kernel picked as free just before; a server
//! restarted after a kill comes back on the same ports, so clients and
//! routes find it again. Readiness is the meta leader reported
//! by `/jsz` on each server's monitoring port, never a sleep.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::{DataDir, Proc, WAIT, plain_dev};

/// The server binary: `NATS_SERVER` if set (a second version in the test
/// matrix), else Debian's.
pub fn nats_server_bin() -> String {
    std::env::var("NATS_SERVER").unwrap_or_else(|_| "/usr/sbin/nats-server".into())
}

/// One server's ports.
#[derive(Debug, Clone, Default)]
pub struct Ports {
    /// Client port.
    pub client: u16,
    /// Route (cluster) port.
    pub route: u16,
    /// Monitoring port.
    pub monitor: u16,
}

/// One `nats-server` process.
pub struct Server {
    /// Its name (`n1`…).
    pub name: String,
    /// Its ports, once known.
    pub ports: Ports,
    /// The process, while running.
    pub child: Option<Child>,
    store: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Server {
    /// SIGKILL, by PID, and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The process id (for `kill`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

/// A 3-server JetStream cluster.
pub struct NatsCluster {
    /// The servers.
    pub servers: Vec<Server>,
    _dir: DataDir,
    cluster: String,
}

/// Starts one server on `ports`.
fn spawn_server(bin: &str, name: &str, store: &Path, cluster: &str, ports: &Ports, routes: &[u16]) -> Server {
    let port = |p: u16| p.to_string();
    let routes: Vec<String> = routes.iter().map(|p| format!("nats://127.0.0.1:{p}")).collect();
    let mut cmd = Command::new(bin);
    cmd.args(["-a", "127.0.0.1", "-p", &port(ports.client), "-m", &port(ports.monitor), "-js"])
        .args(["-sd", &store.display().to_string(), "-n", name, "--cluster_name", cluster])
        .args(["--cluster", &format!("nats://127.0.0.1:{}", port(ports.route))]);
    if !routes.is_empty() {
        cmd.args(["--routes", &routes.join(",")]);
    }
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap_or_else(|e| {
        panic!("cannot run {bin}: {e} (bash tests/run.sh installs nats-server)");
    });
    let err = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // The ports are given: wait only until the server says it listens (or
    // gives up, e.g. on a port taken meanwhile: the cluster then does not
    // form, and [`NatsCluster::start`] tries again).
    let deadline = Instant::now() + WAIT;
    while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        if line.contains("Server is ready") {
            break;
        }
    }
    // Keep draining the log so the server never blocks on a full pipe.
    std::thread::spawn(move || while rx.recv().is_ok() {});
    Server { name: name.to_string(), ports: ports.clone(), child: Some(child), store: store.to_path_buf() }
}

impl NatsCluster {
    /// Three servers with JetStream, routed to each other, with a meta
    /// leader elected. JetStream clustering wants every route configured up
    /// front, so all nine ports are picked first: the kernel's free ports,
    /// let go just before the servers take them. Should another process
    /// take one in between, the cluster does not form, and it starts again
    /// on fresh ports (at most three times).
    pub fn start(tag: &str) -> NatsCluster {
        let bin = nats_server_bin();
        for attempt in 1..=3 {
            let dir = DataDir::new(&format!("nats-{tag}-{attempt}"));
            let cluster = format!("sb-{tag}");
            let free: Vec<u16> = {
                let held: Vec<std::net::TcpListener> =
                    (0..9).map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a free port")).collect();
                held.iter().map(|l| l.local_addr().expect("port").port()).collect()
            };
            let ports: Vec<Ports> =
                (0..3).map(|i| Ports { client: free[i], route: free[3 + i], monitor: free[6 + i] }).collect();
            let servers: Vec<Server> = (0..3)
                .map(|i| {
                    let others: Vec<u16> = (0..3).filter(|j| *j != i).map(|j| ports[j].route).collect();
                    let store = dir.0.join(format!("n{}", i + 1));
                    spawn_server(&bin, &format!("n{}", i + 1), &store, &cluster, &ports[i], &others)
                })
                .collect();
            let c = NatsCluster { servers, _dir: dir, cluster };
            if c.ready_within(Duration::from_secs(20)) {
                return c;
            }
            eprintln!("NATS cluster {tag}: no meta leader on attempt {attempt}; starting again on fresh ports");
        }
        panic!("NATS cluster {tag}: no JetStream meta leader in three attempts");
    }

    /// Every server's client URL, comma-separated.
    pub fn urls(&self) -> String {
        let urls: Vec<String> = self.servers.iter().map(|s| format!("nats://127.0.0.1:{}", s.ports.client)).collect();
        urls.join(",")
    }

    /// Restarts server `i` (killed before) on its old ports and store.
    pub fn restart(&mut self, i: usize) {
        let routes: Vec<u16> =
            self.servers.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, s)| s.ports.route).collect();
        let s = &self.servers[i];
        assert!(s.child.is_none(), "server {} is still running", s.name);
        let fresh = spawn_server(&nats_server_bin(), &s.name, &s.store, &self.cluster, &s.ports, &routes);
        self.servers[i] = fresh;
    }

    /// Waits until every running server reports a JetStream meta leader.
    pub fn wait_ready(&self) {
        assert!(self.ready_within(Duration::from_secs(30)), "no JetStream meta leader within 30 s");
    }

    /// Whether every running server reports a JetStream meta leader within
    /// `limit`.
    fn ready_within(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        for s in self.servers.iter().filter(|s| s.child.is_some()) {
            loop {
                let leader = http_get_json(s.ports.monitor, "/jsz")
                    .and_then(|v| v["meta_cluster"]["leader"].as_str().map(str::to_string))
                    .filter(|l| !l.is_empty());
                if leader.is_some() {
                    break;
                }
                if Instant::now() >= deadline {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        true
    }
}

/// `GET path` on a loopback port, the body as JSON (plain std I/O: this
/// runs inside the tests' async runtime, where a blocking client may not).
pub fn http_get_json(port: u16, path: &str) -> Option<serde_json::Value> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    serde_json::from_str(raw.split_once("\r\n\r\n")?.1).ok()
}

/// `switchboard dev --nats` (plain listeners only), its addresses read from
/// the banner.
pub struct ClusterNode {
    /// The process (killed on drop).
    pub proc: Proc,
    /// Its node name.
    pub name: String,
    /// HTTP listener `host:port`.
    pub http: String,
    /// Admin listener `host:port`.
    pub admin: String,
    /// MQTT listener `host:port`.
    pub mqtt: String,
}

impl ClusterNode {
    /// Starts node `name` on `nats` (URLs), R3 streams, on free ports or
    /// on the given `(http, admin, mqtt)`.
    pub fn start(name: &str, nats: &str, on: Option<(&str, &str, &str)>, env: &[(&str, &str)]) -> ClusterNode {
        let mut all_env = vec![("SWITCHBOARD_NODE__NAME", name), ("SWITCHBOARD_NATS__REPLICAS", "3")];
        all_env.extend_from_slice(env);
        let (proc, b) = plain_dev(&["--nats", nats], on, &all_env, Duration::from_secs(30));
        assert!(b.engine.contains("NATS JetStream"), "the banner names the engine: {}", b.engine);
        ClusterNode { proc, name: name.into(), http: b.http, admin: b.admin, mqtt: b.mqtt }
    }

    /// `http://` + the HTTP listener.
    pub fn base(&self) -> String {
        format!("http://{}", self.http)
    }

    /// SIGKILL, by PID, and reap.
    pub fn kill(&mut self) {
        let _ = self.proc.child.kill();
        let _ = self.proc.child.wait();
    }
}
