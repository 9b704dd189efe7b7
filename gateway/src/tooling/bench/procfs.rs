//! Reading `/proc/PID/{stat,io,status}`: CPU time, write syscalls, RSS; and
//! [`ServerProbe`], which brackets a scenario's measured window with those
//! readings of the server's PIDs (summed: nginx is a master and a worker)
//! and, with `--syscalls perf`, exact write syscall counts
//! ([`super::syscalls`]).
//!
//! The parsers take the file text, so they are tested on sample text; only
//! [`ProcSample::read`] touches the file system. Linux only; on anything
//! else (or without permission) the fields are simply absent.

use std::collections::BTreeMap;

use super::syscalls::PerfCounter;
use super::{BenchError, CommonArgs, SyscallSource};

/// Clock ticks per second of `utime`/`stime`. Linux fixes USER_HZ at 100 in
/// its ABI on every mainstream architecture; reading `sysconf(_SC_CLK_TCK)`
/// would need `unsafe` FFI, which this workspace forbids.
pub const CLOCK_TICKS_PER_SEC: u64 = 100;

/// One reading of a process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcSample {
    /// User + system CPU time, µs.
    pub cpu_us: Option<u64>,
    /// Write-like syscalls so far (`syscw`).
    pub syscw: Option<u64>,
    /// Resident set size, bytes.
    pub rss_bytes: Option<u64>,
    /// Threads (`Threads:` in status).
    pub threads: Option<u64>,
}

/// `utime + stime` in µs from `/proc/PID/stat` text.
///
/// The command name (field 2) is in parentheses and may itself contain
/// spaces and parentheses, so the fields are counted from the LAST `)`.
pub fn parse_stat_cpu_us(text: &str) -> Option<u64> {
    let after = &text[text.rfind(')')? + 1..];
    // After the name: state(3) ppid(4) ... utime(14) stime(15); index 0 is field 3.
    let mut fields = after.split_ascii_whitespace();
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) * (1_000_000 / CLOCK_TICKS_PER_SEC))
}

/// `syscw` from `/proc/PID/io` text.
pub fn parse_io_syscw(text: &str) -> Option<u64> {
    field_value(text, "syscw:")
}

/// `VmRSS` in bytes from `/proc/PID/status` text.
pub fn parse_status_rss_bytes(text: &str) -> Option<u64> {
    // The value is in kB ("VmRSS:     1234 kB").
    field_value(text, "VmRSS:").map(|kb| kb * 1024)
}

/// `Threads` from `/proc/PID/status` text.
pub fn parse_status_threads(text: &str) -> Option<u64> {
    field_value(text, "Threads:")
}

fn field_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.split_ascii_whitespace().next())?.parse().ok()
}

impl ProcSample {
    /// Reads `/proc/<pid>/...` (`pid` = `"self"` for this process).
    pub fn read(pid: &str) -> ProcSample {
        let read = |f: &str| std::fs::read_to_string(format!("/proc/{pid}/{f}")).ok();
        let status = read("status");
        ProcSample {
            cpu_us: read("stat").as_deref().and_then(parse_stat_cpu_us),
            syscw: read("io").as_deref().and_then(parse_io_syscw),
            rss_bytes: status.as_deref().and_then(parse_status_rss_bytes),
            threads: status.as_deref().and_then(parse_status_threads),
        }
    }

    /// Reads every PID and sums the fields (a field is absent if any PID lacks it).
    pub fn read_pids(pids: &[u32]) -> ProcSample {
        let add = |a: Option<u64>, b: Option<u64>| Some(a? + b?);
        let zero = ProcSample { cpu_us: Some(0), syscw: Some(0), rss_bytes: Some(0), threads: Some(0) };
        pids.iter().map(|p| ProcSample::read(&p.to_string())).fold(zero, |acc, s| ProcSample {
            cpu_us: add(acc.cpu_us, s.cpu_us),
            syscw: add(acc.syscw, s.syscw),
            rss_bytes: add(acc.rss_bytes, s.rss_bytes),
            threads: add(acc.threads, s.threads),
        })
    }
}

/// The change between two samples.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcDelta {
    /// CPU µs used in between.
    pub cpu_us: Option<u64>,
    /// Write syscalls in between.
    pub syscw: Option<u64>,
    /// RSS at the end.
    pub rss_bytes: Option<u64>,
    /// RSS at the start.
    pub rss_start_bytes: Option<u64>,
    /// Write syscalls by name, counted by perf (`--syscalls perf`).
    pub write_syscalls: Option<BTreeMap<String, u64>>,
}

/// `after - before`, field by field.
pub fn delta(before: &ProcSample, after: &ProcSample) -> ProcDelta {
    let d = |a: Option<u64>, b: Option<u64>| Some(a?.saturating_sub(b?));
    ProcDelta {
        cpu_us: d(after.cpu_us, before.cpu_us),
        syscw: d(after.syscw, before.syscw),
        rss_bytes: after.rss_bytes,
        rss_start_bytes: before.rss_bytes,
        write_syscalls: None,
    }
}

/// Brackets a measured window: `/proc` readings of the server's PIDs at both
/// ends and, with `--syscalls perf`, perf counting only in between. Without
/// `--server-pid` it measures nothing and every figure stays absent.
pub struct ServerProbe {
    pids: Vec<u32>,
    before: Option<ProcSample>,
    perf: Option<PerfCounter>,
}

impl ServerProbe {
    /// Prepares (perf is started and attached, counting off).
    pub async fn prepare(common: &CommonArgs) -> Result<ServerProbe, BenchError> {
        let pids = common.server_pid.clone();
        let perf = if common.syscalls == SyscallSource::Perf {
            if pids.is_empty() {
                return Err(BenchError::Usage("--syscalls perf needs --server-pid".into()));
            }
            let p = pids.clone();
            Some(tokio::task::spawn_blocking(move || PerfCounter::start(&p)).await.map_err(std::io::Error::other)??)
        } else {
            None
        };
        Ok(ServerProbe { pids, before: None, perf })
    }

    /// The window opens: first reading, perf counting on.
    pub async fn open(&mut self) -> Result<(), BenchError> {
        if self.pids.is_empty() {
            return Ok(());
        }
        if let Some(mut perf) = self.perf.take() {
            self.perf = Some(
                tokio::task::spawn_blocking(move || perf.enable().map(|()| perf))
                    .await
                    .map_err(std::io::Error::other)??,
            );
        }
        self.before = Some(ProcSample::read_pids(&self.pids));
        Ok(())
    }

    /// The window closes: second reading, perf counts. `None` without PIDs.
    pub async fn close(self) -> Result<Option<ProcDelta>, BenchError> {
        let Some(before) = self.before else { return Ok(None) };
        let after = ProcSample::read_pids(&self.pids);
        let mut d = delta(&before, &after);
        if let Some(perf) = self.perf {
            d.write_syscalls =
                Some(tokio::task::spawn_blocking(move || perf.finish()).await.map_err(std::io::Error::other)??);
        }
        Ok(Some(d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_spaces_and_parentheses_in_the_name() {
        let text = "4242 (my (weird) proc) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 75 0 0 20 0 8 0 123 456789 100 \
                    18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n";
        assert_eq!(parse_stat_cpu_us(text), Some((250 + 75) * 10_000));
        let plain = "1 (switchboard) R 0 1 1 0 -1 0 0 0 0 0 7 3 0 0 20 0 1 0 1 1 1";
        assert_eq!(parse_stat_cpu_us(plain), Some(100_000));
        assert_eq!(parse_stat_cpu_us("1 (x) R 0"), None);
        assert_eq!(parse_stat_cpu_us("garbage"), None);
    }

    #[test]
    fn io_and_status() {
        let io = "rchar: 100\nwchar: 200\nsyscr: 5\nsyscw: 77\nread_bytes: 0\nwrite_bytes: 0\n";
        assert_eq!(parse_io_syscw(io), Some(77));
        assert_eq!(parse_io_syscw("rchar: 1\n"), None);
        let status = "Name:\tswitchboard\nVmPeak:\t  9000 kB\nVmRSS:\t    1234 kB\nThreads:\t3\n";
        assert_eq!(parse_status_rss_bytes(status), Some(1234 * 1024));
        assert_eq!(parse_status_threads(status), Some(3));
    }

    #[test]
    fn delta_and_self_read() {
        let a = ProcSample { cpu_us: Some(10), syscw: Some(5), rss_bytes: Some(100), threads: None };
        let b = ProcSample { cpu_us: Some(30), syscw: Some(9), rss_bytes: Some(200), threads: None };
        let d = delta(&a, &b);
        assert_eq!((d.cpu_us, d.syscw, d.rss_bytes, d.rss_start_bytes), (Some(20), Some(4), Some(200), Some(100)));
        assert_eq!(delta(&ProcSample::default(), &b).cpu_us, None);
        if cfg!(target_os = "linux") {
            let me = ProcSample::read("self");
            assert!(me.cpu_us.is_some() && me.rss_bytes.is_some());
            // Two PIDs sum; one that does not exist makes the sum absent.
            let pid = std::process::id();
            let twice = ProcSample::read_pids(&[pid, pid]);
            assert!(twice.rss_bytes.is_some_and(|r| r >= me.rss_bytes.unwrap()));
            assert_eq!(ProcSample::read_pids(&[pid, u32::MAX]).rss_bytes, None);
        }
    }
}
