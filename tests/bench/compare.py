#!/usr/bin/env python3
"""Switchboard against its peers, the same scenarios on each (issue #7).

Orchestration only: every byte of load is sent by `switchboard bench` (Rust);
this script installs and starts the servers, runs the bench, and does the
arithmetic. Each server runs alone on CPU 0 (`taskset -c 0`), the bench on
CPU 1 (`taskset -c 1`), everything on 127.0.0.1 and non-standard ports.

Scenarios (ours / peer):
  mqtt-nats       MQTT 3.1.1 fan-out, QoS 0 / nats-server's MQTT listener
  mqtt-mosquitto  MQTT 3.1.1 fan-out, QoS 0 / mosquitto (MQTT only)
  ws-natsws       WebSocket fan-out (switchboard.v1.proto) / NATS protocol over
                  nats-server's WebSocket listener
  sse-nchan       SSE fan-out / Nchan EventSource (nginx-light + nchan)
  poll-nchan      long-poll fan-out / Nchan long poll (raw multi-message)
  wt-ws           WebTransport fan-out (QUIC, channel streams) / our own
                  WebSocket path, both on one gateway with a QUIC listener

For every scenario and round, A (Switchboard) then B (peer), each on a
freshly started server:
  1. fanout at the fixed load: deliveries per server CPU-second, p99;
  2. idle: N held subscriptions on a fresh server: RSS per connection;
  3. fanout again with `--syscalls perf`: write syscalls per delivery
     (a separate run, so perf's per-syscall cost stays out of the CPU figures).
Rounds repeat that A/B/A/B (default 3). The table gives medians and the ratio
ours/peer. Raw results (every run's JSON report) go to --out.

Usage:
  python3 tests/bench/compare.py                 # everything, default scale
  python3 tests/bench/compare.py --summarize DIR1/results.json DIR2/results.json   # pool sessions
  python3 tests/bench/compare.py --only mqtt-nats,ws-natsws --rounds 3 --duration 5s
  python3 tests/bench/compare.py --scale 0.2     # a quick look (fewer subscribers)
"""

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SERVER_CPU = "0"
BENCH_CPU = "1"
# Priority of the servers and the bench (`nice -n`), set from --nice: on a
# shared machine it keeps other work (a build) from taking their cores.
NICE = ["nice", "-n", "0"]

# The fixed load per scenario: every server must stay below saturation and the
# bench (one core) valid. Measured on the 2-core machine of RESULTS.md: the
# bench's own ceiling on one core is ~50k deliveries/s (MQTT, SSE), less for
# WebSocket (tungstenite) and far less for long polling (an HTTP exchange per
# response). Flags on the command line override these for every scenario.
LOADS = {
    "mqtt-nats": {"channels": 50, "subs_per_channel": 100, "rate": 250.0},
    "mqtt-mosquitto": {"channels": 50, "subs_per_channel": 100, "rate": 250.0},
    "ws-natsws": {"channels": 50, "subs_per_channel": 100, "rate": 250.0},
    "sse-nchan": {"channels": 50, "subs_per_channel": 100, "rate": 250.0},
    "poll-nchan": {"channels": 10, "subs_per_channel": 100, "rate": 100.0},
    # The bench stays valid here too (its WebTransport client ~45 % of a core).
    "wt-ws": {"channels": 50, "subs_per_channel": 100, "rate": 250.0},
}
# What the peer column is, where the starter's name does not say it.
PEER_LABELS = {"wt-ws": "Switchboard's WebSocket"}
APT_PACKAGES = {
    "nats-server": "/usr/sbin/nats-server",
    "mosquitto": "/usr/sbin/mosquitto",
    "nginx-light": "/usr/sbin/nginx",
    "libnginx-mod-nchan": "/usr/lib/nginx/modules/ngx_nchan_module.so",
    "linux-perf": "/usr/bin/perf",
}
NCHAN_MODULE = "/usr/lib/nginx/modules/ngx_nchan_module.so"

# Issue #7's targets, for the "target" column (goals, not assertions).
TARGETS = {
    ("mqtt-nats", "dps"): ">= 2x",
    ("mqtt-mosquitto", "dps"): ">= 10x",
    ("ws-natsws", "dps"): ">= 1.5x",
    ("sse-nchan", "dps"): ">= 2x",
    ("poll-nchan", "dps"): ">= 2x",
    ("mqtt-nats", "p99"): "<= 0.5x and <= 2 ms",
    ("ws-natsws", "p99"): "<= 0.5x and <= 2 ms",
    ("mqtt-nats", "rss"): "ours <= 1 KiB",
    ("mqtt-mosquitto", "rss"): "ours <= 1 KiB",
    ("ws-natsws", "rss"): "ours <= 4 KiB",
    ("sse-nchan", "rss"): "ours <= 4 KiB",
}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- installing


def install_peers():
    """apt-get install whatever is missing (one `apt-get update` first)."""
    missing = [pkg for pkg, path in APT_PACKAGES.items() if not os.path.exists(path)]
    if not missing:
        return
    log(f"installing {' '.join(missing)}")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    # Debian starts mosquitto and nginx on their standard ports when installed,
    # where services may start; a policy-rc.d that says 101 keeps them down.
    policy = Path("/usr/sbin/policy-rc.d")
    added_policy = False
    if not policy.exists():
        subprocess.run(sudo + ["sh", "-c", f"printf '#!/bin/sh\\nexit 101\\n' > {policy} && chmod +x {policy}"], check=True)
        added_policy = True
    try:
        subprocess.run(sudo + ["apt-get", "update", "-qq"], check=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(sudo + ["apt-get", "install", "-y", "-qq", "--no-install-recommends"] + missing, check=True, env=env)
    finally:
        if added_policy:
            subprocess.run(sudo + ["rm", "-f", str(policy)], check=False)


def version_of(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (out.stdout + out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


def dpkg_version(pkg):
    out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True)
    return out.stdout.strip() or "?"


# ------------------------------------------------------------- machine state


def cpu_times():
    """Per-CPU (busy, total) jiffies from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *vals = line.split()
                vals = [int(v) for v in vals]
                idle = vals[3] + vals[4]  # idle + iowait
                out[name] = (sum(vals) - idle, sum(vals))
    return out


def busy_pct(before, after):
    """Per-CPU busy % between two cpu_times() readings."""
    res = {}
    for cpu in after:
        b0, t0 = before.get(cpu, (0, 0))
        b1, t1 = after[cpu]
        res[cpu] = 100.0 * (b1 - b0) / (t1 - t0) if t1 > t0 else None
    return res


def wait_quiet(threshold, max_wait):
    """Waits (at most max_wait s) until both CPUs together are busier than
    `threshold` % for less than a second: another build on the machine would
    otherwise share the server's or the bench's core. Returns the last busy %."""
    deadline = time.monotonic() + max_wait
    while True:
        a = cpu_times()
        time.sleep(1.0)
        b = cpu_times()
        pct = busy_pct(a, b)
        total = sum(v for v in pct.values() if v is not None) / max(1, len(pct))
        if total < threshold or time.monotonic() >= deadline:
            return total


# ------------------------------------------------------------------- servers


def wait_port(port, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def port_free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


class Server:
    """One server process pinned to SERVER_CPU; stopped (by PID) on exit."""

    def __init__(self, name, argv, ports, workdir, env=None, children=False):
        self.name = name
        self.workdir = workdir
        self.log = open(workdir / f"{name}.log", "ab")
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            NICE + ["taskset", "-c", SERVER_CPU] + argv,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            cwd=workdir,
        )
        try:
            for p in ports:
                wait_port(p)
        except RuntimeError:
            self.stop()
            raise
        self.children = children

    def pids(self):
        """The server's PID, plus its children's (nginx: the worker)."""
        pids = [self.proc.pid]
        if self.children:
            out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
            pids += [int(p) for p in out.stdout.split()]
        return pids

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def start_switchboard(bin_path, ports, workdir, quic=False):
    env = {
        # Bench load must not be shaped by the gateway's abuse limits.
        "SWITCHBOARD_LIMITS__PUBLISH_RATE": "0",
        "SWITCHBOARD_LIMITS__MAX_CONNECTIONS_PER_IP": "0",
        "SWITCHBOARD_LIMITS__NEW_CONNECTIONS_PER_SEC": "0",
        "SWITCHBOARD_LIMITS__NEW_CONNECTIONS_PER_IP_PER_SEC": "0",
        "RUST_LOG": "warn",
    }
    argv = [
        str(bin_path),
        "dev",
        "--http", f"127.0.0.1:{ports['sb_http']}",
        "--mqtt", f"127.0.0.1:{ports['sb_mqtt']}",
        "--admin", f"127.0.0.1:{ports['sb_admin']}",
        # The TLS listeners are off: the comparisons are plaintext, and
        # nothing may land on 8443/8883.
        "--https", "",
        "--mqtts", "",
        # wt-ws: QUIC on a non-standard UDP port, with dev's generated
        # certificate (the bench reads its hash from /v1/wt/cert-hash).
        "--quic", f"127.0.0.1:{ports['sb_quic']}" if quic else "",
    ]
    return Server("switchboard", argv, [ports["sb_http"], ports["sb_mqtt"]], workdir, env=env)


def start_nats(ports, workdir):
    store = workdir / "jetstream"
    conf = workdir / "nats.conf"
    # server_name and JetStream are what the MQTT listener needs.
    conf.write_text(
        f"""server_name: sb_bench_peer
listen: 127.0.0.1:{ports['nats']}
max_connections: 100000
jetstream {{ store_dir: "{store}" }}
mqtt {{ listen: 127.0.0.1:{ports['nats_mqtt']} }}
websocket {{ listen: "127.0.0.1:{ports['nats_ws']}", no_tls: true }}
"""
    )
    return Server("nats-server", ["nats-server", "-c", str(conf)],
                  [ports["nats"], ports["nats_mqtt"], ports["nats_ws"]], workdir)


def start_mosquitto(ports, workdir):
    conf = workdir / "mosquitto.conf"
    # MQTT only: Debian's 2.0.11 binds a WebSocket listener to every address
    # whatever the config says.
    conf.write_text(
        f"""listener {ports['mosquitto']} 127.0.0.1
allow_anonymous true
persistence false
max_connections -1
log_dest stderr
log_type error
log_type warning
"""
    )
    return Server("mosquitto", ["mosquitto", "-c", str(conf)], [ports["mosquitto"]], workdir)


def start_nginx(ports, workdir):
    conf = (HERE / "nginx-nchan.conf").read_text()
    conf = conf.replace("@DIR@", str(workdir)).replace("@LISTEN@", f"127.0.0.1:{ports['nginx']}")
    conf = conf.replace("@MODULE@", NCHAN_MODULE)
    (workdir / "nginx.conf").write_text(conf)
    return Server("nginx", ["nginx", "-p", str(workdir), "-c", str(workdir / "nginx.conf"), "-g", "daemon off;"],
                  [ports["nginx"]], workdir, children=True)


# ----------------------------------------------------------------- scenarios


def scenarios(ports):
    """name -> (ours, peer): each side is (server starter key, bench flags)."""
    sb_http = f"http://127.0.0.1:{ports['sb_http']}"
    sb_mqtt = f"mqtt://127.0.0.1:{ports['sb_mqtt']}"
    mqtt3 = ["--proto", "mqtt", "--mqtt-version", "3"]
    return {
        "mqtt-nats": (
            ("switchboard", mqtt3 + ["--mqtt-url", sb_mqtt]),
            ("nats", mqtt3 + ["--mqtt-url", f"mqtt://127.0.0.1:{ports['nats_mqtt']}"]),
        ),
        "mqtt-mosquitto": (
            ("switchboard", mqtt3 + ["--mqtt-url", sb_mqtt]),
            ("mosquitto", mqtt3 + ["--mqtt-url", f"mqtt://127.0.0.1:{ports['mosquitto']}"]),
        ),
        "ws-natsws": (
            ("switchboard", ["--proto", "ws", "--url", sb_http]),
            ("nats", ["--proto", "nats-ws", "--url", f"http://127.0.0.1:{ports['nats_ws']}"]),
        ),
        "sse-nchan": (
            ("switchboard", ["--proto", "sse", "--url", sb_http]),
            ("nginx", ["--proto", "sse", "--target", "nchan", "--url", f"http://127.0.0.1:{ports['nginx']}"]),
        ),
        "poll-nchan": (
            ("switchboard", ["--proto", "poll", "--url", sb_http]),
            ("nginx", ["--proto", "poll", "--target", "nchan", "--url", f"http://127.0.0.1:{ports['nginx']}"]),
        ),
        # Both sides on the same gateway build and configuration (QUIC on):
        # what WebTransport costs over the WebSocket path.
        "wt-ws": (
            ("switchboard-quic", ["--proto", "wt", "--url", sb_http,
                                  "--wt-url", f"https://127.0.0.1:{ports['sb_quic']}/v1/wt"]),
            ("switchboard-quic", ["--proto", "ws", "--url", sb_http]),
        ),
    }


# -------------------------------------------------------------------- running


def run_bench(bin_path, argv, logfile, timeout):
    cmd = NICE + ["taskset", "-c", BENCH_CPU, str(bin_path), "bench"] + argv + ["--json"]
    with open(logfile, "a") as lf:
        lf.write("$ " + " ".join(cmd) + "\n")
        lf.flush()
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=lf, text=True, timeout=timeout)
        lf.write(out.stdout)
    line = next((l for l in reversed(out.stdout.splitlines()) if l.startswith("{")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"bench failed ({out.returncode}): {' '.join(cmd)}; see {logfile}")
    report = json.loads(line)
    report["_cmd"] = " ".join(cmd)
    return report


class Runner:
    def __init__(self, args, bin_path, ports, out_dir):
        self.args = args
        self.bin = bin_path
        self.ports = ports
        self.out = out_dir
        self.starters = {
            "switchboard": lambda wd: start_switchboard(bin_path, ports, wd),
            "switchboard-quic": lambda wd: start_switchboard(bin_path, ports, wd, quic=True),
            "nats": lambda wd: start_nats(ports, wd),
            "mosquitto": lambda wd: start_mosquitto(ports, wd),
            "nginx": lambda wd: start_nginx(ports, wd),
        }
        self.loads = []

    def load(self, scen):
        """The scenario's load: LOADS, with command-line overrides, scaled."""
        a = self.args
        load = dict(LOADS[scen])
        for k in ("channels", "subs_per_channel", "rate"):
            if getattr(a, k) is not None:
                load[k] = getattr(a, k)
        load["subs_per_channel"] = max(1, round(load["subs_per_channel"] * a.scale))
        return load

    def fresh(self, key, fn):
        """Runs fn(server) against a freshly started server, then stops it."""
        wd = Path(tempfile.mkdtemp(prefix=f"sb-cmp-{key}-", dir=self.out))
        # nginx's worker runs as nobody and must reach its temp paths.
        os.chmod(wd, 0o755)
        server = self.starters[key](wd)
        try:
            time.sleep(0.3)
            return fn(server)
        finally:
            server.stop()
            shutil.rmtree(wd / "jetstream", ignore_errors=True)

    def bench(self, kind, scen, side, server_key, flags):
        a = self.args
        quiet = wait_quiet(a.quiet_cpu, a.quiet_wait) if a.quiet_cpu > 0 else None
        load1 = os.getloadavg()[0]
        self.loads.append(load1)
        logfile = self.out / f"{scen}.{side}.log"

        def go(server):
            pids = ",".join(str(p) for p in server.pids())
            common = ["--server-pid", pids]
            load = self.load(scen)
            if kind == "idle":
                argv = ["idle"] + flags + ["--conns", str(a.idle_conns), "--hold", a.idle_hold] + common
            else:
                argv = ["fanout"] + flags + [
                    "--channels", str(load["channels"]),
                    "--subs-per-channel", str(load["subs_per_channel"]),
                    "--pubs", str(a.pubs),
                    "--rate", f"{load['rate']:g}",
                    "--size", str(a.size),
                    "--duration", a.duration if kind == "fanout" else a.writes_duration,
                    "--drain", a.drain,
                ] + common
                if kind == "writes":
                    argv += ["--syscalls", "perf"]
            before = cpu_times()
            r = run_bench(self.bin, argv, logfile, timeout=600)
            cores = busy_pct(before, cpu_times())
            r["_load1"] = load1
            r["_busy_before_pct"] = quiet
            # Busy % of the server's and the bench's CPU over the whole bench
            # run (setup included): far above the server's and the bench's own
            # CPU means something else ran there.
            r["_cpu_busy_pct"] = {f"cpu{SERVER_CPU}": cores.get(f"cpu{SERVER_CPU}"),
                                  f"cpu{BENCH_CPU}": cores.get(f"cpu{BENCH_CPU}")}
            return r

        return self.fresh(server_key, go)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(v, unit=""):
    if v is None:
        return "-"
    if abs(v) >= 1000:
        return f"{v:,.0f}{unit}"
    if abs(v) >= 10:
        return f"{v:.1f}{unit}"
    return f"{v:.3g}{unit}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


# A run is "disturbed" when its cores were much busier than the server and the
# bench account for (percentage points over the whole bench run, setup
# included, so there is slack for the setup's own CPU): other work ran there.
DISTURBED_PP = 35.0


def disturbed(r):
    busy = r.get("_cpu_busy_pct") or {}
    server, bench = busy.get(f"cpu{SERVER_CPU}"), busy.get(f"cpu{BENCH_CPU}")
    if server is None or bench is None:
        return False
    return (server - (r.get("server_cpu_pct") or 0) > DISTURBED_PP
            or bench - (r.get("bench_cpu_pct") or 0) > DISTURBED_PP)


def clean(runs):
    """The runs that measured the server: not failed, not INVALID, not
    disturbed; all completed runs if none is clean (the table says so)."""
    done = [r for r in runs if "_error" not in r]
    good = [r for r in done if not r.get("invalid") and not disturbed(r)]
    return good or done


def summarize(results):
    """Medians (over clean runs) per scenario and side, and the ratios ours/peer."""
    rows = []
    for scen, sides in results.items():
        med = {}
        for side in ("ours", "peer"):
            runs = sides[side]
            fan, idle, writes = clean(runs["fanout"]), clean(runs["idle"]), clean(runs["writes"])
            med[side] = {
                "dps": median([r.get("deliveries_per_server_cpu_sec") for r in fan]),
                "p99": median([r.get("p99_us") for r in fan]),
                "cpu_pct": median([r.get("server_cpu_pct") for r in fan]),
                "dels": median([r.get("deliveries_per_sec") for r in fan]),
                "rss": median([r.get("rss_per_conn_bytes") for r in idle]),
                "writes": median([r.get("writes_per_delivery") for r in writes]),
                # Over the perf runs' own CPU: what counting every syscall cost.
                "dps_perf": median([r.get("deliveries_per_server_cpu_sec") for r in writes]),
                "used": f"{len(fan)}/{len(idle)}/{len(writes)}",
                "disturbed": sum(1 for k in runs for r in runs[k] if disturbed(r)),
                "failed": sum(1 for k in runs for r in runs[k] if "_error" in r),
                "invalid": sum(1 for k in runs for r in runs[k] if r.get("invalid")),
                "lost": sum(r.get("lost") or 0 for k in ("fanout", "writes") for r in runs[k]),
                "errors": sum(r.get("client_errors") or 0 for k in runs for r in runs[k]),
                "n": len(runs["fanout"]),
            }
        rows.append((scen, med))
    return rows


def table(rows, peer_names):
    lines = []
    lines.append("| scenario | metric | ours | peer | ours/peer | target |")
    lines.append("|---|---|---|---|---|---|")
    for scen, med in rows:
        o, p = med["ours"], med["peer"]
        metrics = [
            ("dps", "deliveries / server CPU-s (higher is better)", ""),
            ("p99", "p99 latency µs at the fixed load (lower is better)", ""),
            ("rss", "RSS / idle connection, bytes (lower is better)", ""),
            ("writes", "write syscalls / delivery (lower is better)", ""),
        ]
        for key, label, unit in metrics:
            r = ratio(o[key], p[key])
            target = TARGETS.get((scen, key), "")
            lines.append(
                f"| {scen} (vs {peer_names[scen]}) | {label} | {fmt(o[key], unit)} | {fmt(p[key], unit)} | "
                f"{'-' if r is None else f'{r:.2f}x'} | {target} |"
            )
        notes = []
        for side in ("ours", "peer"):
            m = med[side]
            notes.append(
                f"{side}: server CPU {fmt(m['cpu_pct'])}% of a core at {fmt(m['dels'])} deliveries/s; "
                f"runs used (fanout/idle/writes) {m['used']} of {m['n']} each; {m['invalid']} INVALID, "
                f"{m['disturbed']} disturbed, {m['failed']} failed; {m['lost']} lost, {m['errors']} client errors; "
                f"deliveries/CPU-s under perf {fmt(m['dps_perf'])}"
            )
        lines.append(f"| {scen} | runs | {notes[0]} | {notes[1]} | | |")
    return "\n".join(lines)


def summarize_files(paths):
    """--summarize: one table over the runs of several results.json files
    (e.g. two sessions of A/B rounds on a shared machine; only clean runs
    count, as always)."""
    results, peer_names = {}, {}
    for path in paths:
        d = json.loads(Path(path).read_text())
        for scen, sides in d["runs"].items():
            into = results.setdefault(scen, {side: {"fanout": [], "idle": [], "writes": []} for side in sides})
            for side, kinds in sides.items():
                for kind, runs in kinds.items():
                    into[side][kind].extend(runs)
            peer_names[scen] = PEER_LABELS.get(scen, scen.split("-", 1)[1])
        print(f"{path}: {d['date']}, load1 median {fmt(d.get('load1_median'))}, versions {d['versions']}")
    print()
    print(table(summarize(results), peer_names))


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--summarize":
        summarize_files(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated scenarios (default: all)")
    ap.add_argument("--rounds", type=int, default=3, help="A/B rounds per scenario (>= 3 for the record)")
    ap.add_argument("--channels", type=int, default=None, help="override LOADS for every scenario")
    ap.add_argument("--subs-per-channel", type=int, default=None, help="override LOADS for every scenario")
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies subscribers per channel and --idle-conns")
    ap.add_argument("--rate", type=float, default=None,
                    help="publishes/s in total, override LOADS (deliveries/s = rate x subs/channel)")
    ap.add_argument("--nice", type=int, default=-10 if os.geteuid() == 0 else 0,
                    help="nice value of the servers and the bench (default -10 as root: other work on the "
                         "machine yields their cores)")
    ap.add_argument("--pubs", type=int, default=4)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--duration", default="5s", help="fan-out publishing time per run")
    ap.add_argument("--writes-duration", default="3s", help="publishing time of the perf (write count) run")
    ap.add_argument("--drain", default="3s")
    ap.add_argument("--idle-conns", type=int, default=5000)
    ap.add_argument("--idle-hold", default="2s")
    ap.add_argument("--port-base", type=int, default=61100, help="first of 11 ports; keep them outside net.ipv4.ip_local_port_range")
    ap.add_argument("--bin", default=str(ROOT / "target" / "release" / "switchboard"))
    ap.add_argument("--no-build", action="store_true", help="do not run cargo build --release")
    ap.add_argument("--no-install", action="store_true")
    ap.add_argument("--quiet-cpu", type=float, default=0.0,
                    help="before each run, wait until the machine is less busy than this %% (0: do not wait)")
    ap.add_argument("--quiet-wait", type=float, default=120.0, help="longest wait for --quiet-cpu, seconds")
    ap.add_argument("--out", default="", help="directory for logs and raw JSON (default: a new temp dir)")
    a = ap.parse_args()
    a.idle_conns = max(1, round(a.idle_conns * a.scale))
    NICE[2] = str(a.nice)

    if (os.cpu_count() or 1) < 2:
        sys.exit("needs 2 CPUs: the server on CPU 0, the bench on CPU 1")
    if not a.no_install:
        install_peers()
    bin_path = Path(a.bin)
    if not a.no_build:
        log("cargo build --release -p switchboard")
        subprocess.run(["cargo", "build", "--release", "--locked", "-p", "switchboard"], cwd=ROOT, check=True)
    if not bin_path.exists():
        sys.exit(f"no binary at {bin_path}")

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if a.idle_conns + 256 > hard:
        log(f"warning: open-file hard limit {hard} < {a.idle_conns + 256} connections needed")

    names = ["sb_http", "sb_mqtt", "sb_admin", "sb_https", "sb_mqtts", "nats", "nats_mqtt", "nats_ws", "mosquitto", "nginx",
             "sb_quic"]
    ports = {n: a.port_base + i for i, n in enumerate(names)}
    busy = [p for p in ports.values() if not port_free(p)]
    if busy:
        sys.exit(f"ports in use: {busy} (choose another --port-base)")

    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="sb-compare-"))
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o755)
    all_scen = scenarios(ports)
    chosen = [s for s in a.only.split(",") if s] or list(all_scen)
    for s in chosen:
        if s not in all_scen:
            sys.exit(f"unknown scenario {s}; known: {', '.join(all_scen)}")

    runner = Runner(a, bin_path, ports, out)
    peer_names = {s: PEER_LABELS.get(s, all_scen[s][1][0]) for s in chosen}
    results = {s: {side: {"fanout": [], "idle": [], "writes": []} for side in ("ours", "peer")} for s in chosen}
    started = time.time()
    log(f"load average at start: {os.getloadavg()}; results in {out}")
    for rnd in range(1, a.rounds + 1):
        for scen in chosen:
            for kind in ("fanout", "idle", "writes"):
                for side, (key, flags) in zip(("ours", "peer"), all_scen[scen]):
                    t0 = time.time()
                    try:
                        r = runner.bench(kind, scen, side, key, flags)
                    except Exception as e:  # a failed run is recorded, the comparison goes on
                        log(f"!! round {rnd} {scen} {kind} {side}: {e}")
                        r = {"_error": str(e)}
                    results[scen][side][kind].append(r)
                    log(
                        f"round {rnd} {scen:<15} {kind:<6} {side:<4} ({key}): "
                        f"dps={fmt(r.get('deliveries_per_server_cpu_sec'))} p99={r.get('p99_us')}µs "
                        f"rss/conn={fmt(r.get('rss_per_conn_bytes'))} writes/del={fmt(r.get('writes_per_delivery'))} "
                        f"lost={r.get('lost')} invalid={r.get('invalid')} disturbed={disturbed(r)} "
                        f"load1={fmt(r.get('_load1'))} "
                        f"busy={ {k: fmt(v) for k, v in (r.get('_cpu_busy_pct') or {}).items()} } "
                        f"[{time.time() - t0:.0f}s]"
                    )
    elapsed = time.time() - started

    versions = {
        "switchboard": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                      text=True).stdout.strip(),
        "nats-server": version_of(["nats-server", "--version"]),
        "mosquitto": dpkg_version("mosquitto"),
        "nginx": version_of(["nginx", "-v"]),
        "libnginx-mod-nchan": dpkg_version("libnginx-mod-nchan"),
        "perf": version_of(["perf", "--version"]),
    }
    rows = summarize(results)
    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "elapsed_s": round(elapsed),
        "nproc": os.cpu_count(),
        "kernel": os.uname().release,
        "load1_max": max(runner.loads) if runner.loads else None,
        "load1_median": median(runner.loads),
        "versions": versions,
        "args": vars(a),
        "loads": {s: runner.load(s) for s in chosen},
        "medians": {s: m for s, m in rows},
        "runs": results,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"# Switchboard vs peers — {summary['date']}, {elapsed / 60:.1f} min, "
          f"load1 median {fmt(summary['load1_median'])} max {fmt(summary['load1_max'])}")
    for s in chosen:
        ld = runner.load(s)
        print(f"fixed load {s}: {ld['channels']} channels x {ld['subs_per_channel']} subscribers, {ld['rate']:g} "
              f"publishes/s ({ld['rate'] * ld['subs_per_channel']:,.0f} deliveries/s), {a.pubs} publishers, "
              f"{a.size} B, {a.duration}")
    print(f"idle: {a.idle_conns} connections held {a.idle_hold}; {a.rounds} A/B rounds; nice {a.nice}; "
          f"server on CPU {SERVER_CPU}, bench on CPU {BENCH_CPU}")
    print(f"versions: {versions}")
    print()
    print(table(rows, peer_names))
    print(f"\nraw results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
