//! Counting a server's write syscalls over the measured window with
//! `perf stat` (`--syscalls perf`).
//!
//! Why not `/proc/PID/io`: its `syscw` counts the `write`/`writev` family
//! only. Socket writes made with `send`/`sendto`/`sendmsg` — what Rust's
//! `TcpStream::write` (and so tokio) uses for one buffer — are not counted,
//! so `syscw` under-reports some servers and not others. `perf stat` counts
//! the kernel's syscall-entry tracepoints per thread of any PID (threads
//! created later included, as perf's counters are inherited), the same way
//! for every server, at the cost of one counter increment per syscall.
//! `strace -c` would give the same counts but stops the traced process on
//! every syscall, which distorts its CPU figures badly.
//!
//! perf runs as a child with its counters disabled (`-D -1`) and a control
//! FIFO (`--control fifo:CTL,ACK`): the bench writes `enable` when the window
//! opens and `disable` when it closes, each acknowledged, then stops perf
//! with SIGINT (`kill -INT`, as this workspace forbids `unsafe` FFI) and
//! parses its CSV output. Needs `perf` (Debian `linux-perf`) and permission
//! to trace the PIDs (root, or `kernel.perf_event_paranoid` ≤ -1 / CAP_PERFMON
//! for tracepoints). The parser is pure and tested on sample output.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::BenchError;

/// The syscalls counted as writes: every way a server puts bytes on a
/// socket (and `write` also counts eventfd/pipe wake-ups and log lines —
/// those are write syscalls too). `sendfile64`/`splice` are left out: no
/// server here sends messages from files.
pub const WRITE_SYSCALLS: &[&str] = &["write", "writev", "sendto", "sendmsg", "sendmmsg"];

/// How long perf may take to attach or to acknowledge a command.
const PERF_TIMEOUT: Duration = Duration::from_secs(15);

/// Counts per syscall name from `perf stat -x,` output (`count,unit,event,...`
/// lines; `# started on` and blank lines ignored). `<not counted>` counts
/// as 0; an event perf reports `<not supported>` is an error.
pub fn parse_perf_csv(text: &str) -> Result<BTreeMap<String, u64>, String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split(',');
        let (Some(count), Some(_unit), Some(event)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        let Some(name) = event.strip_prefix("syscalls:sys_enter_") else { continue };
        let n = match count {
            "<not counted>" => 0,
            c => c.parse::<u64>().map_err(|_| format!("perf reported {count:?} for {event}"))?,
        };
        *out.entry(name.to_string()).or_insert(0) += n;
    }
    if out.is_empty() {
        return Err(format!("no syscall counts in perf output {text:?}"));
    }
    Ok(out)
}

/// A running `perf stat` with counting disabled until [`PerfCounter::enable`].
pub struct PerfCounter {
    child: Child,
    ctl: std::fs::File,
    acks: mpsc::Receiver<String>,
    dir: PathBuf,
    output: PathBuf,
}

impl PerfCounter {
    /// Starts perf on `pids` (all their threads) with counting off, and waits
    /// until it answers on its control FIFO (so it is attached).
    pub fn start(pids: &[u32]) -> Result<PerfCounter, BenchError> {
        if pids.is_empty() {
            return Err(BenchError::Usage("--syscalls perf needs --server-pid".into()));
        }
        let dir =
            std::env::temp_dir().join(format!("sb-bench-perf-{}-{:08x}", std::process::id(), rand::random::<u32>()));
        std::fs::create_dir_all(&dir)?;
        let (ctl_path, ack_path, output) = (dir.join("ctl"), dir.join("ack"), dir.join("out.csv"));
        for fifo in [&ctl_path, &ack_path] {
            let ok = Command::new("mkfifo").arg(fifo).status().map(|s| s.success()).unwrap_or(false);
            if !ok {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(BenchError::Usage(format!("mkfifo {} failed", fifo.display())));
            }
        }
        let events: Vec<String> = WRITE_SYSCALLS.iter().map(|s| format!("syscalls:sys_enter_{s}")).collect();
        let pid_list: Vec<String> = pids.iter().map(u32::to_string).collect();
        let child = Command::new("perf")
            .args(["stat", "-x,", "-D", "-1", "--no-big-num"])
            .arg("--control")
            .arg(format!("fifo:{},{}", ctl_path.display(), ack_path.display()))
            .arg("-o")
            .arg(&output)
            .args(["-e", &events.join(",")])
            .args(["-p", &pid_list.join(",")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                BenchError::Usage(format!("--syscalls perf: cannot run perf ({e}); apt-get install linux-perf"))
            });
        let child = match child {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        // Read+write opens never block on a FIFO (Linux), whichever side comes first.
        let open_rw = |p: &PathBuf| std::fs::OpenOptions::new().read(true).write(true).open(p);
        let ctl = open_rw(&ctl_path)?;
        let ack = open_rw(&ack_path)?;
        let (tx, acks) = mpsc::channel();
        // Blocks on the FIFO; ends with the process (perf's acks are few).
        std::thread::Builder::new().name("bench-perf-ack".into()).spawn(move || {
            for line in BufReader::new(ack).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        })?;
        let mut counter = PerfCounter { child, ctl, acks, dir, output };
        // `ping` is acknowledged once perf reads its control FIFO, i.e. once it is attached.
        if let Err(e) = counter.command("ping") {
            counter.kill();
            return Err(e);
        }
        Ok(counter)
    }

    fn command(&mut self, cmd: &str) -> Result<(), BenchError> {
        writeln!(self.ctl, "{cmd}")?;
        match self.acks.recv_timeout(PERF_TIMEOUT) {
            Ok(_) => Ok(()),
            Err(_) => {
                let exited = self.child.try_wait().ok().flatten();
                Err(BenchError::Usage(format!(
                    "perf did not acknowledge {cmd:?} within {PERF_TIMEOUT:?} (exited: {exited:?}); is tracing allowed \
                     (root, or kernel.perf_event_paranoid <= -1)?"
                )))
            }
        }
    }

    /// Starts counting (the window opens).
    pub fn enable(&mut self) -> Result<(), BenchError> {
        self.command("enable")
    }

    /// Stops counting, ends perf and returns the counts per syscall name.
    pub fn finish(mut self) -> Result<BTreeMap<String, u64>, BenchError> {
        let disabled = self.command("disable");
        let _ = Command::new("kill").args(["-INT", &self.child.id().to_string()]).status();
        let deadline = std::time::Instant::now() + PERF_TIMEOUT;
        while self.child.try_wait().ok().flatten().is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        disabled?;
        let text = std::fs::read_to_string(&self.output)?;
        let counts = parse_perf_csv(&text).map_err(BenchError::Protocol);
        self.kill();
        counts
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perf_csv() {
        let text = "# started on Sat Nov 28 21:23:10 2026\n\n\
                    52,,syscalls:sys_enter_write,8567986,100.00,,\n\
                    100,,syscalls:sys_enter_sendto,8567986,100.00,,\n\
                    <not counted>,,syscalls:sys_enter_sendmsg,0,100.00,,\n\
                    3,,syscalls:sys_enter_writev,8567986,100.00,,\n";
        let c = parse_perf_csv(text).unwrap();
        assert_eq!(c.get("write"), Some(&52));
        assert_eq!(c.get("sendto"), Some(&100));
        assert_eq!(c.get("sendmsg"), Some(&0));
        assert_eq!(c.get("writev"), Some(&3));
        assert_eq!(c.values().sum::<u64>(), 155);
        assert!(parse_perf_csv("<not supported>,,syscalls:sys_enter_write,0,100.00,,\n").is_err());
        assert!(parse_perf_csv("# started on x\n\n").is_err());
    }
}
