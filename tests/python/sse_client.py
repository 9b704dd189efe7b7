#!/usr/bin/env python3
"""An independent SSE client for Switchboard: sseclient-py over the standard
library's HTTP client, nothing of ours.

    python3 tests/python/sse_client.py HTTP_BASE N [CHANNEL]

Opens ``GET HTTP_BASE/v1/sse?channel=CHANNEL`` (default ``py/x``), reads
events until it has N ``message`` events, and prints ONE line: a JSON array
with, per message in arrival order, its channel, serial and payload field
exactly as the gateway sent it (``text``, ``data`` or ``data_b64``; see
docs/protocol.md). Exits 0 then; exits 1 with a reason on stderr if the
stream ends or stalls first. gateway/tests/python_sse.rs runs it.
"""

import json
import sys
import urllib.parse
import urllib.request

import sseclient  # PyPI: sseclient-py (installed by tests/run.sh)

# A read that waits longer than this fails the run; the gateway's keep-alive
# comment comes every 15 s, so an open stream never stalls this long.
READ_TIMEOUT_S = 20
PAYLOAD_FIELDS = ("text", "data", "data_b64")


def main() -> int:
    if len(sys.argv) not in (3, 4):
        print(__doc__, file=sys.stderr)
        return 2
    base, want = sys.argv[1], int(sys.argv[2])
    channel = sys.argv[3] if len(sys.argv) == 4 else "py/x"
    url = f"{base}/v1/sse?" + urllib.parse.urlencode({"channel": channel})
    req = urllib.request.Request(url, headers={"Accept": "text/event-stream"})
    got = []
    with urllib.request.urlopen(req, timeout=READ_TIMEOUT_S) as resp:
        ctype = resp.headers.get("content-type", "")
        if not ctype.startswith("text/event-stream"):
            print(f"content-type {ctype!r}, want text/event-stream", file=sys.stderr)
            return 1
        for event in sseclient.SSEClient(resp).events():
            if event.event == "disconnect":
                print(f"server ended the stream: {event.data}", file=sys.stderr)
                return 1
            if event.event != "message":
                continue
            frame = json.loads(event.data)
            entry = {"channel": frame["channel"], "serial": frame["serial"], "id": event.id}
            entry.update({k: frame[k] for k in PAYLOAD_FIELDS if k in frame})
            got.append(entry)
            if len(got) == want:
                print(json.dumps(got), flush=True)
                return 0
    print(f"stream ended after {len(got)} of {want} messages", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
