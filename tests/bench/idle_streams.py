#!/usr/bin/env python3
"""Gateway memory per idle connection: N idle SSE streams, N pending long
polls, held open against a fresh `switchboard dev`, with the gateway's VmRSS
(from /proc/PID/status) read before and after.

    cargo build --release -p switchboard
    python3 tests/bench/idle_streams.py --mode sse  --streams 5000
    python3 tests/bench/idle_streams.py --mode poll --streams 5000

A benchmark, not a test: it asserts nothing about speed or size and is not
part of `tests/run.sh`. Results go in docs/performance.md.

Every connection comes from 127.0.0.1 (or from 127.0.0.2.. when `--sources`
is above 1, for runs larger than one source address's ephemeral ports). Each
SSE stream counts as open once its `connected` event arrived; each poll once
the admin API counts its session. The baseline is read after a warm-up (a few
streams opened and closed) so that runtime start-up costs are not charged to
the streams. Kernel socket buffers are not in the process's RSS and so not in
these figures.
"""

import argparse
import asyncio
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
import urllib.request

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def vm_kib(pid: int) -> dict:
    """VmRSS and VmHWM of `pid`, in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0])
    return out


def start_gateway(binary: str):
    """`switchboard dev` on free loopback ports (TLS listeners off); returns
    (proc, http, admin, mqtt)."""
    proc = subprocess.Popen(
        [binary, "dev", "--http", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--mqtt", "127.0.0.1:0",
         "--https", "", "--mqtts", "", "--quic", ""],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    http = admin = mqtt = None
    deadline = time.monotonic() + 15
    while (http is None or admin is None or mqtt is None) and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        word = line.strip().split(" ", 1)[0]
        if word == "MQTT":
            mqtt = line.split("mqtt://", 1)[1].split(" ", 1)[0].strip()
        if word in ("REST", "admin"):
            addr = line.split("http://", 1)[1].split("/", 1)[0]
            if word == "REST":
                http = addr
            else:
                admin = addr
    if http is None or admin is None:
        proc.kill()
        sys.exit("gateway banner did not list the REST and admin addresses")
    # Keep draining stdout so the gateway never blocks on a full pipe.
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    return proc, http, admin, mqtt


def stats(admin: str) -> dict:
    with urllib.request.urlopen(f"http://{admin}/v1/stats", timeout=10) as r:
        return json.load(r)


async def open_sse(host, port, src, path):
    reader, writer = await asyncio.open_connection(host, port, local_addr=(src, 0))
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n\r\n".encode())
    await writer.drain()
    buf = b""
    # The `connected` event is complete at its blank line (the body is
    # chunked, so the chunk's own CRLF may follow).
    while b"\n\n" not in buf.partition(b"event: connected")[2]:
        chunk = await reader.read(4096)
        if not chunk:
            raise ConnectionError(f"stream closed before `connected`: {buf[:200]!r}")
        buf += chunk
    if not buf.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(buf[:200])
    return reader, writer


async def open_poll(host, port, src, path):
    reader, writer = await asyncio.open_connection(host, port, local_addr=(src, 0))
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


def mqtt_str(b: bytes) -> bytes:
    return len(b).to_bytes(2, "big") + b


async def open_mqtt(host, port, src, path, i):
    """MQTT 3.1.1: CONNECT (clean session, keep alive 600 s), SUBSCRIBE
    QoS 0 to the path's channel; open once the SUBACK arrived."""
    reader, writer = await asyncio.open_connection(host, port, local_addr=(src, 0))
    body = mqtt_str(b"MQTT") + b"\x04\x02" + (600).to_bytes(2, "big") + mqtt_str(f"idle-{i}".encode())
    writer.write(bytes([0x10, len(body)]) + body)
    channel = path.split("channel=", 1)[1].split("&", 1)[0].encode()
    sub = (1).to_bytes(2, "big") + mqtt_str(channel) + b"\x00"
    writer.write(bytes([0x82, len(sub)]) + sub)
    await writer.drain()
    got = b""
    while len(got) < 4 + 5:
        chunk = await reader.read(64)
        if not chunk:
            raise ConnectionError(f"closed before SUBACK: {got!r}")
        got += chunk
    if got[0] != 0x20 or got[3] != 0 or got[4] != 0x90:
        raise ConnectionError(f"refused: {got!r}")
    return reader, writer


async def open_all(mode, http, n, sources, channels, parallel):
    host, port = http.rsplit(":", 1)
    port = int(port)
    sem = asyncio.Semaphore(parallel)
    opener = {"sse": open_sse, "poll": open_poll}.get(mode)

    async def one(i):
        channel = f"bench/idle/{i}" if channels == "distinct" else "bench/idle"
        path = f"/v1/{mode}?channel={channel}"
        if mode == "poll":
            path += "&timeout=60"
        src = f"127.0.0.{1 + i % sources}"
        async with sem:
            if opener is None:
                return await open_mqtt(host, port, src, path, i)
            return await opener(host, port, src, path)

    return await asyncio.gather(*(one(i) for i in range(n)))


def wait_sessions(admin, done, timeout=30):
    """Polls the admin API until `done(sessions)`; returns the last count."""
    deadline = time.monotonic() + timeout
    while True:
        s = stats(admin)["sessions"]
        if done(s) or time.monotonic() > deadline:
            return s
        time.sleep(0.2)


async def run(args):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.streams + 1024
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    proc, http, admin, mqtt = start_gateway(args.bin)  # inherits the raised limit
    target = mqtt if args.mode == "mqtt" else http
    rounds = []
    try:
        # Warm-up: the runtime's worker threads, allocator arenas and the
        # router's first tables are start-up costs, not per-stream costs.
        warm = await open_all(args.mode, target, 20, 1, args.channels, 20)
        for _, w in warm:
            w.close()
        wait_sessions(admin, lambda s: s == 0)
        await asyncio.sleep(1)
        before = vm_kib(proc.pid)

        # Round 2 and later reopen the same number of connections: an RSS
        # that keeps growing round after round would be a leak; one that
        # stays put is the allocator keeping freed memory for reuse.
        for _ in range(args.rounds):
            conns = await open_all(args.mode, target, args.streams, args.sources, args.channels, args.parallel)
            wait_sessions(admin, lambda s: s >= args.streams)
            await asyncio.sleep(args.settle)
            held = vm_kib(proc.pid)
            sessions_at_read = stats(admin)["sessions"]
            for _, w in conns:
                w.close()
            wait_sessions(admin, lambda s: s == 0)
            await asyncio.sleep(1)
            closed = vm_kib(proc.pid)
            rounds.append({"sessions": sessions_at_read, "rss_kib": held["VmRSS"], "rss_after_close_kib": closed["VmRSS"]})
    finally:
        proc.kill()
        proc.wait()

    first = rounds[0]
    result = {
        "mode": args.mode,
        "streams": args.streams,
        "channels": args.channels,
        "rss_before_kib": before["VmRSS"],
        "rounds": rounds,
        "bytes_per_stream": round((first["rss_kib"] - before["VmRSS"]) * 1024 / args.streams),
        "machine": f"{platform.system()} {platform.release()} {platform.machine()}, {os.cpu_count()} cpus",
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    print(json.dumps(result))
    return 0 if all(r["sessions"] >= args.streams for r in rounds) else 1


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["sse", "poll", "mqtt"], default="sse")
    p.add_argument("--streams", type=int, default=5000)
    p.add_argument("--channels", choices=["shared", "distinct"], default="distinct",
                   help="every stream on its own channel (default) or all on one")
    p.add_argument("--sources", type=int, default=1, help="source addresses 127.0.0.1..N")
    p.add_argument("--parallel", type=int, default=200, help="connections being opened at once")
    p.add_argument("--rounds", type=int, default=1, help="open, read, close this many times")
    p.add_argument("--settle", type=float, default=3.0, help="seconds between the last open and the reading")
    p.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "switchboard"))
    args = p.parse_args()
    if args.mode == "poll" and args.settle >= 50:
        sys.exit("--settle must stay well under the polls' 60 s timeout")
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
