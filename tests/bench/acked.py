#!/usr/bin/env python3
"""Acknowledged publishes on the gateway's storage engines and on JetStream's
file store, and the gateway's restart time with a full history.

Orchestration only: every publish is sent by `switchboard bench publish`
(Rust); this script starts the servers, runs the bench, reads the gateway's
storage metrics and does the arithmetic. Servers run on CPU 0
(`taskset -c 0`), the bench on CPU 1, both under `nice` (default 10: the
machine is shared), everything on 127.0.0.1 and high ports.

Targets (each run on a freshly started server with an empty store):
  memory    switchboard dev                                 (ws, mqtt, rest)
  interval  switchboard dev --data DIR   (sync = interval, 100 ms)
  always    switchboard dev --data DIR   SWITCHBOARD_STORAGE__SYNC=always
  jetstream nats-server -js -sd DIR      (file store; nats-js)

Rounds are interleaved: for each round, for each window, every target and
protocol once. Then the restart measurement: fill a `dev --data DIR` gateway
with CHANNELS x MESSAGES of history through `bench publish`, stop it
(SIGTERM, or SIGKILL), start it again and time until `/readyz` answers 200
and until a history read of one channel returns all its messages.

Usage:
  python3 tests/bench/acked.py --out /tmp/acked            # everything
  python3 tests/bench/acked.py --rounds 1 --duration 3s --no-restart   # a quick look
  python3 tests/bench/acked.py --summarize /tmp/acked/results.json
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402  (machine state, server processes, medians)
from compare import busy_pct, cpu_times, log, median, wait_port, wait_quiet  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PORTS = {"http": 18080, "admin": 19090, "mqtt": 11883, "nats": 14222}
GATEWAY_PROTOS = ["ws", "mqtt", "rest"]
TARGETS = ["memory", "interval", "always", "jetstream"]
# Bench load must not be shaped by the gateway's abuse limits.
GATEWAY_ENV = {
    "SWITCHBOARD_LIMITS__PUBLISH_RATE": "0",
    "SWITCHBOARD_LIMITS__MAX_CONNECTIONS_PER_IP": "0",
    "SWITCHBOARD_LIMITS__NEW_CONNECTIONS_PER_SEC": "0",
    "SWITCHBOARD_LIMITS__NEW_CONNECTIONS_PER_IP_PER_SEC": "0",
    "RUST_LOG": "warn",
}


def gateway_argv(bin_path, data=None):
    argv = [str(bin_path), "dev",
            "--http", f"127.0.0.1:{PORTS['http']}",
            "--admin", f"127.0.0.1:{PORTS['admin']}",
            "--mqtt", f"127.0.0.1:{PORTS['mqtt']}",
            "--https", "", "--mqtts", "", "--quic", ""]
    if data is not None:
        argv += ["--data", str(data)]
    return argv


def start_target(target, bin_path, workdir):
    """A fresh server for `target` in `workdir` (its store inside it)."""
    if target == "jetstream":
        argv = ["/usr/sbin/nats-server", "-js", "-sd", str(workdir / "jetstream"),
                "-a", "127.0.0.1", "-p", str(PORTS["nats"])]
        return compare.Server("nats-server", argv, [PORTS["nats"]], workdir)
    env = dict(GATEWAY_ENV)
    data = None
    if target in ("interval", "always"):
        data = workdir / "data"
        env["SWITCHBOARD_STORAGE__SYNC"] = target
    return compare.Server("switchboard", gateway_argv(bin_path, data), [PORTS["http"], PORTS["mqtt"]], workdir, env=env)


def listening(port):
    """Something accepts connections on 127.0.0.1:port (TIME-WAIT leftovers
    of an earlier run do not count: the servers bind with SO_REUSEADDR)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def http_get(url, timeout=2.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


def storage_metrics():
    """Sums and counts of the gateway's storage histograms (Prometheus text)."""
    try:
        _, body = http_get(f"http://127.0.0.1:{PORTS['admin']}/metrics")
    except OSError:
        return None
    out = {}
    for line in body.decode().splitlines():
        m = re.match(r"^(switchboard_storage_(?:write|sync)_seconds)_(sum|count) (\S+)$", line)
        if m:
            out[f"{m.group(1)}_{m.group(2)}"] = float(m.group(3))
        m = re.match(r'^(switchboard_storage_(?:write|sync)_seconds)\{quantile="(0\.5|0\.99|1)"\} (\S+)$', line)
        if m:
            out[f"{m.group(1)}_q{m.group(2)}"] = float(m.group(3))
    return out


def run_bench(bin_path, argv, logfile, timeout=300):
    cmd = compare.NICE + ["taskset", "-c", compare.BENCH_CPU, str(bin_path), "bench"] + argv + ["--json"]
    with open(logfile, "a") as lf:
        lf.write("$ " + " ".join(cmd) + "\n")
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        lf.write(p.stdout + p.stderr)
    line = next((l for l in reversed(p.stdout.splitlines()) if l.startswith("{")), None)
    if p.returncode != 0 or line is None:
        return {"_error": f"exit {p.returncode}: {p.stderr.strip()[-400:]}", "_cmd": cmd}
    r = json.loads(line)
    r["_cmd"] = cmd
    return r


def publish_argv(proto, window, a, extra=()):
    argv = ["publish", "--proto", proto, "--publishers", str(a.publishers), "--window", str(window),
            "--duration", a.duration, "--size", str(a.size), "--channels", str(a.channels)]
    if proto == "nats-js":
        argv += ["--nats-url", f"nats://127.0.0.1:{PORTS['nats']}"]
    else:
        argv += ["--url", f"http://127.0.0.1:{PORTS['http']}", "--mqtt-url", f"mqtt://127.0.0.1:{PORTS['mqtt']}"]
    return argv + list(extra)


def one_run(a, bin_path, target, proto, window, out_dir):
    quiet = wait_quiet(a.quiet_cpu, a.quiet_wait) if a.quiet_cpu > 0 else None
    load1 = os.getloadavg()[0]
    wd = Path(tempfile.mkdtemp(prefix=f"sb-acked-{target}-", dir=out_dir))
    server = start_target(target, bin_path, wd)
    try:
        time.sleep(0.3)
        argv = publish_argv(proto, window, a, ["--server-pid", str(server.proc.pid)])
        before = cpu_times()
        r = run_bench(bin_path, argv, out_dir / f"{target}.{proto}.w{window}.log")
        cores = busy_pct(before, cpu_times())
        if target in ("interval", "always"):
            r["_storage"] = storage_metrics()
    finally:
        server.stop()
        shutil.rmtree(wd, ignore_errors=True)
    r.update({"_target": target, "_window": window, "_load1": load1, "_busy_before_pct": quiet,
              "_cpu_busy_pct": {f"cpu{compare.SERVER_CPU}": cores.get(f"cpu{compare.SERVER_CPU}"),
                                f"cpu{compare.BENCH_CPU}": cores.get(f"cpu{compare.BENCH_CPU}")}})
    return r


def disturbed(r):
    """Cores busier than the server and the bench account for: other work ran there."""
    return compare.disturbed(r)


# --------------------------------------------------------------------- restart


def wait_http(url, ok, deadline):
    """Polls `url` every 5 ms until ok(status, body); returns the time it first held."""
    while time.monotonic() < deadline:
        try:
            status, body = http_get(url, timeout=1.0)
            if ok(status, body):
                return time.monotonic()
        except OSError:
            pass
        time.sleep(0.005)
    return None


def restart_once(a, bin_path, out_dir, how):
    """Fill a fresh store, stop the gateway with `how` (TERM or KILL), start it
    again and time readiness and the first full history read."""
    wd = Path(tempfile.mkdtemp(prefix=f"sb-restart-{how}-", dir=out_dir))
    data = wd / "data"
    argv = gateway_argv(bin_path, data)
    env = dict(GATEWAY_ENV)
    server = compare.Server("switchboard", argv, [PORTS["http"], PORTS["mqtt"]], wd, env=env)
    res = {"how": how, "channels": a.restart_channels, "messages": a.restart_messages}
    try:
        # Enough publishes that every channel holds `messages`: the bench cycles
        # its publishers over the channels, so each gets total/channels +- P.
        want = a.restart_channels * a.restart_messages
        fill_argv = ["publish", "--proto", "ws", "--publishers", "4", "--window", "16",
                     "--channels", str(a.restart_channels), "--size", "200",
                     "--duration", a.restart_fill, "--url", f"http://127.0.0.1:{PORTS['http']}",
                     "--server-pid", str(server.proc.pid)]
        fill = run_bench(bin_path, fill_argv, out_dir / "restart.fill.log", timeout=900)
        res["fill"] = {k: fill.get(k) for k in ("acked", "acked_per_sec", "refused", "unacked", "_error")}
        if "_error" in fill or (fill.get("acked") or 0) < want * 1.01:
            res["_error"] = f"fill too small: {res['fill']} (want >= {want * 1.01:.0f}; raise --restart-fill)"
            return res
        prefix = fill["channel_prefix"]
        res["store_bytes"] = sum(f.stat().st_size for f in data.rglob("*") if f.is_file())
        t0 = time.monotonic()
        if how == "TERM":
            server.proc.send_signal(signal.SIGTERM)
        else:
            server.proc.kill()
        server.proc.wait(timeout=60)
        res["stop_s"] = time.monotonic() - t0
        server.log.close()
        res["store_bytes_stopped"] = sum(f.stat().st_size for f in data.rglob("*") if f.is_file())
        time.sleep(0.5)
        t0 = time.monotonic()
        server = compare.Server.__new__(compare.Server)
        server.name, server.workdir, server.children = "switchboard", wd, False
        server.log = open(wd / "switchboard.log", "ab")
        full_env = dict(os.environ)
        full_env.update(env)
        server.proc = subprocess.Popen(compare.NICE + ["taskset", "-c", compare.SERVER_CPU] + argv,
                                       stdout=server.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=full_env, cwd=wd)
        deadline = t0 + 120
        ready = wait_http(f"http://127.0.0.1:{PORTS['admin']}/readyz", lambda s, b: s == 200, deadline)
        channel = f"{prefix}/{a.restart_channels // 2}"
        url = f"http://127.0.0.1:{PORTS['http']}/v1/channels/{channel}/history?limit={a.restart_messages}"

        def full(status, body):
            return status == 200 and len(json.loads(body).get("messages", [])) == a.restart_messages

        history = wait_http(url, full, deadline)
        res["ready_s"] = None if ready is None else ready - t0
        res["history_s"] = None if history is None else history - t0
        _, body = http_get(f"http://127.0.0.1:{PORTS['admin']}/v1/stats", timeout=30.0)
        res["channels_after"] = json.loads(body).get("channels")
        res["rss_after_bytes"] = compare_rss(server.proc.pid)
    finally:
        server.stop()
        shutil.rmtree(wd, ignore_errors=True)
    return res


def compare_rss(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# --------------------------------------------------------------------- summary


def fmt(v, digits=0):
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def summarize(results):
    runs = results["runs"]
    rows = {}
    for r in runs:
        key = (r["_target"], r.get("pub_proto") or r["_cmd"][r["_cmd"].index("--proto") + 1], r["_window"])
        rows.setdefault(key, []).append(r)
    table = {}
    for key, rs in rows.items():
        ok = [r for r in rs if "_error" not in r]
        # INVALID runs stay in: closed loop, a saturated bench means the
        # server acknowledges at least that fast (the table counts them).
        clean = [r for r in ok if not disturbed(r)] or ok
        rates = [r["acked_per_sec"] for r in clean]
        table[key] = {
            "n": len(clean), "of": len(rs),
            "invalid": sum(1 for r in ok if r.get("invalid")),
            "disturbed": sum(1 for r in ok if disturbed(r)),
            "errors": sum(1 for r in rs if "_error" in r),
            "acked_per_sec": median(rates),
            "min": min(rates) if rates else None, "max": max(rates) if rates else None,
            "p50_us": median([r.get("p50_us") for r in clean]),
            "p99_us": median([r.get("p99_us") for r in clean]),
            "max_us": median([r.get("max_us") for r in clean]),
            "cpu_us": median([r.get("server_cpu_us_per_publish") for r in clean]),
            "server_cpu_pct": median([r.get("server_cpu_pct") for r in clean]),
            "bench_cpu_pct": median([r.get("bench_cpu_pct") for r in clean]),
            "writes": median([r.get("writes_per_publish") for r in clean]),
            "refused": sum(r.get("refused") or 0 for r in ok),
            "unacked": sum(r.get("unacked") or 0 for r in ok),
        }
    return table


def print_table(table, results):
    print("| engine | proto | window | acked/s median (range) | p50 µs | p99 µs | server CPU µs/publish | "
          "server CPU % | bench CPU % | runs |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    order = {t: i for i, t in enumerate(TARGETS)}
    for (target, proto, window), s in sorted(table.items(), key=lambda kv: (kv[0][2], order[kv[0][0]], kv[0][1])):
        note = f"{s['n']}/{s['of']}"
        if s["invalid"]:
            note += f", {s['invalid']} INVALID"
        if s["disturbed"]:
            note += f", {s['disturbed']} disturbed"
        print(f"| {target} | {proto} | {window} | {fmt(s['acked_per_sec'])} ({fmt(s['min'])}–{fmt(s['max'])}) | "
              f"{fmt(s['p50_us'])} | {fmt(s['p99_us'])} | {fmt(s['cpu_us'], 1)} | {fmt(s['server_cpu_pct'])} | "
              f"{fmt(s['bench_cpu_pct'])} | {note} |")
    print()
    for window in sorted({k[2] for k in table}):
        js = table.get(("jetstream", "nats-js", window), {}).get("acked_per_sec")
        for proto in GATEWAY_PROTOS:
            mem = table.get(("memory", proto, window), {}).get("acked_per_sec")
            iv = table.get(("interval", proto, window), {}).get("acked_per_sec")
            al = table.get(("always", proto, window), {}).get("acked_per_sec")
            cpu = {t: table.get((t, proto, window), {}).get("cpu_us") for t in ("memory", "interval")}
            if mem and iv:
                print(f"window {window} {proto}: interval/memory {iv / mem:.2f} (target >= 0.70: "
                      f"{'met' if iv / mem >= 0.7 else 'MISSED'}; per server CPU-second "
                      f"{cpu['memory'] / cpu['interval']:.2f}); always/memory {al / mem if al else 0:.2f}; "
                      f"interval/jetstream {iv / js if js else 0:.2f} (target >= 1: "
                      f"{'met' if js and iv >= js else 'MISSED'})")
    for r in results.get("restart", []):
        print(f"restart after SIG{r['how']}: " + json.dumps({k: v for k, v in r.items() if k != 'how'}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=str(ROOT / "target/release/switchboard"))
    ap.add_argument("--out", default=None, help="directory for logs and results.json (default: a temp dir)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--windows", default="1,16")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--protos", default=",".join(GATEWAY_PROTOS), help="gateway protocols")
    ap.add_argument("--publishers", type=int, default=4)
    ap.add_argument("--channels", type=int, default=100)
    ap.add_argument("--size", type=int, default=200)
    ap.add_argument("--duration", default="10s")
    ap.add_argument("--nice", type=int, default=10)
    ap.add_argument("--quiet-cpu", type=float, default=50.0, help="wait until both CPUs are below this busy %%")
    ap.add_argument("--quiet-wait", type=float, default=60.0)
    ap.add_argument("--no-restart", action="store_true")
    ap.add_argument("--only-restart", action="store_true")
    ap.add_argument("--restart-reps", type=int, default=2)
    ap.add_argument("--restart-channels", type=int, default=1000)
    ap.add_argument("--restart-messages", type=int, default=1000)
    ap.add_argument("--restart-fill", default="90s", help="how long the fill publishes (must reach 1.01 x C x M)")
    ap.add_argument("--summarize", default=None, help="print the table of an earlier results.json")
    a = ap.parse_args()
    if a.summarize:
        results = json.loads(Path(a.summarize).read_text())
        print_table(summarize(results), results)
        return
    compare.NICE[2] = str(a.nice)
    for name, port in PORTS.items():
        if listening(port):
            sys.exit(f"something listens on port {port} ({name})")
    out = Path(a.out or tempfile.mkdtemp(prefix="sb-acked-"))
    out.mkdir(parents=True, exist_ok=True)
    bin_path = Path(a.bin)
    version = subprocess.run([str(bin_path), "--version"], capture_output=True, text=True).stdout.strip()
    nats_version = subprocess.run(["/usr/sbin/nats-server", "--version"], capture_output=True, text=True).stdout.strip()
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    results = {"args": vars(a), "switchboard": version, "nats_server": nats_version, "commit": commit,
               "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "runs": [], "restart": []}
    targets = a.targets.split(",")
    protos = a.protos.split(",")
    windows = [int(w) for w in a.windows.split(",")]

    def save():
        results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        (out / "results.json").write_text(json.dumps(results, indent=1))

    if not a.only_restart:
        for rnd in range(a.rounds):
            for window in windows:
                for target in targets:
                    for proto in (["nats-js"] if target == "jetstream" else protos):
                        r = one_run(a, bin_path, target, proto, window, out)
                        r["_round"] = rnd
                        results["runs"].append(r)
                        log(f"round {rnd} w{window} {target:9} {proto:7} acked/s {fmt(r.get('acked_per_sec'))} "
                            f"p99 {r.get('p99_us')} µs cpu/pub {fmt(r.get('server_cpu_us_per_publish'), 1)} µs "
                            f"load1 {r['_load1']:.2f} {'INVALID ' if r.get('invalid') else ''}"
                            f"{'DISTURBED ' if disturbed(r) else ''}{r.get('_error', '')}")
                        save()
    if not a.no_restart:
        for rep in range(a.restart_reps):
            for how in ("TERM", "KILL"):
                wait_quiet(a.quiet_cpu, a.quiet_wait)
                r = restart_once(a, bin_path, out, how)
                r["_load1"] = os.getloadavg()[0]
                results["restart"].append(r)
                log(f"restart SIG{how}: {json.dumps(r)}")
                save()
    save()
    print_table(summarize(results), results)
    log(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
