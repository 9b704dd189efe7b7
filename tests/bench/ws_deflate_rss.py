#!/usr/bin/env python3
"""Gateway memory per WebSocket connection with permessage-deflate: N
connections to `/v1/ws` of a fresh `switchboard dev`, each subscribed, each
receiving compressed deliveries and sending one compressed publish, with the
gateway's VmRSS (from /proc/PID/status) read before and after.

    cargo build --release -p switchboard
    ulimit -n 8192
    python3 tests/bench/ws_deflate_rss.py --mode plain    --conns 1000
    python3 tests/bench/ws_deflate_rss.py --mode deflate  --conns 1000
    python3 tests/bench/ws_deflate_rss.py --mode takeover --conns 1000

Modes: `plain` offers no extension; `deflate` offers permessage-deflate the
way browsers do (`client_max_window_bits`) to the default configuration (no
context takeover either way); `takeover` does the same against
`[websocket] deflate_context_takeover = true` (both sides keep their
window).

A benchmark, not a test: it asserts nothing about size and is not part of
`tests/run.sh`. Results go in docs/protocol.md and docs/security.md. Only
the Python standard library is needed (zlib speaks raw deflate).
"""

import argparse
import asyncio
import json
import os
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import zlib

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
OFFER = "permessage-deflate; client_max_window_bits"


def vm_kib(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, value = line.split(":", 1)
                out[name] = int(value.split()[0])
    return out


def start_gateway(binary: str, mode: str):
    env = dict(os.environ)
    if mode == "takeover":
        env["SWITCHBOARD_WEBSOCKET__DEFLATE_CONTEXT_TAKEOVER"] = "true"
    proc = subprocess.Popen(
        [binary, "dev", "--http", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--mqtt", "127.0.0.1:0",
         "--https", "", "--mqtts", "", "--quic", ""],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )
    http = None
    deadline = time.monotonic() + 15
    while http is None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.strip().startswith("REST"):
            http = line.split("http://", 1)[1].split("/", 1)[0]
    if http is None:
        proc.kill()
        sys.exit("gateway banner did not list the REST address")
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    return proc, http


def frame(first: int, payload: bytes) -> bytes:
    """A masked client frame (mask 0: the bytes stay readable in captures)."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", first, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, n)
    return head + b"\0\0\0\0" + payload


class Conn:
    def __init__(self, reader, writer, deflate: bool):
        self.reader, self.writer, self.deflate = reader, writer, deflate
        # The client keeps its context unless the answer said otherwise.
        self.fresh_context = False
        self.compress = zlib.compressobj(6, zlib.DEFLATED, -15)
        self.compressed_in = 0

    async def send_text(self, text: str):
        data = text.encode()
        if self.deflate:
            if self.fresh_context:
                self.compress = zlib.compressobj(6, zlib.DEFLATED, -15)
            body = self.compress.compress(data) + self.compress.flush(zlib.Z_SYNC_FLUSH)
            self.writer.write(frame(0xC1, body[:-4]))
        else:
            self.writer.write(frame(0x81, data))
        await self.writer.drain()

    async def recv_json(self) -> dict:
        first, second = await self.reader.readexactly(2)
        n = second & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
        payload = await self.reader.readexactly(n)
        if first & 0x40:
            self.compressed_in += 1
            # No server context takeover in the default mode; with it, one
            # inflater per connection would be needed (see --mode takeover).
            payload = self.inflate(payload)
        return json.loads(payload)

    def inflate(self, payload: bytes) -> bytes:
        if not hasattr(self, "inflater") or not self.keep_inflater:
            self.inflater = zlib.decompressobj(-15)
        return self.inflater.decompress(payload + b"\0\0\xff\xff")


async def open_ws(host, port, i, mode):
    reader, writer = await asyncio.open_connection(host, port)
    ext = f"Sec-WebSocket-Extensions: {OFFER}\r\n" if mode != "plain" else ""
    writer.write(
        (f"GET /v1/ws?client_id=rss{i} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
         f"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
         f"Sec-WebSocket-Version: 13\r\n{ext}\r\n").encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(head[:200])
    answer = ""
    for line in head.decode().split("\r\n"):
        if line.lower().startswith("sec-websocket-extensions:"):
            answer = line.split(":", 1)[1].strip()
    c = Conn(reader, writer, bool(answer))
    c.keep_inflater = bool(answer) and "server_no_context_takeover" not in answer
    c.fresh_context = "client_no_context_takeover" in answer
    c.answer = answer
    hello = await c.recv_json()
    assert hello.get("type") == "connected", hello
    return c


async def run(args):
    binary = args.binary or os.path.join(ROOT, "target", "release", "switchboard")
    proc, http = start_gateway(binary, args.mode)
    host, port = http.rsplit(":", 1)
    port = int(port)
    try:
        # Warm-up: runtime and pools start-up are not charged to connections.
        warm = [await open_ws(host, port, f"w{i}", args.mode) for i in range(8)]
        for c in warm:
            c.writer.close()
        time.sleep(1)
        before = vm_kib(proc.pid)
        conns = []
        for i in range(args.conns):
            c = await open_ws(host, port, i, args.mode)
            await c.send_text(json.dumps({"type": "subscribe", "req": 1, "filter": "rss/out"}))
            reply = await c.recv_json()
            assert reply.get("type") == "subscribed", reply
            conns.append(c)
        payload = json.dumps([{"sensor": f"s{i}", "temp": 21.5, "unit": "C"} for i in range(60)])
        for n in range(args.messages):
            req = urllib.request.Request(f"http://{http}/v1/channels/rss/out/messages", data=payload.encode(),
                                         method="POST")
            urllib.request.urlopen(req, timeout=10).read()
        for c in conns:
            for n in range(args.messages):
                m = await c.recv_json()
                assert m.get("type") == "message", m
        # One compressed publish from every client (the server inflates).
        for c in conns:
            await c.send_text(json.dumps({"type": "publish", "req": 2, "channel": "rss/in", "text": payload}))
        for c in conns:
            ack = await c.recv_json()
            assert ack.get("type") == "publish_ack", ack
        time.sleep(1)
        after = vm_kib(proc.pid)
        per = (after["VmRSS"] - before["VmRSS"]) / args.conns
        print(json.dumps({
            "mode": args.mode,
            "conns": args.conns,
            "negotiated": conns[0].answer,
            "compressed_deliveries_per_conn": conns[0].compressed_in,
            "rss_before_kib": before["VmRSS"],
            "rss_after_kib": after["VmRSS"],
            "kib_per_conn": round(per, 1),
        }))
    finally:
        proc.kill()
        proc.wait()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["plain", "deflate", "takeover"], default="deflate")
    p.add_argument("--conns", type=int, default=1000)
    p.add_argument("--messages", type=int, default=3)
    p.add_argument("--binary", help="switchboard binary (default target/release/switchboard)")
    args = p.parse_args()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
