#!/usr/bin/env bash
# Profiles `switchboard dev` (pinned to CPU 0) under one bench fan-out
# (pinned to CPU 1) with `perf record -g`, and prints the top of the report.
# Usage: tests/bench/profile.sh OUT_DIR BENCH_FLAGS...
#   tests/bench/profile.sh /tmp/prof-mqtt --proto mqtt --mqtt-version 3 \
#       --channels 50 --subs-per-channel 100 --pubs 4 --rate 1000 --duration 8s
# The gateway listens on 127.0.0.1:61300 (HTTP), :61301 (MQTT), :61302 (admin);
# perf samples it for 4 s starting 3 s into the publishing (after setup).
set -euo pipefail
out=$1
shift
bin=${SWITCHBOARD_BIN:-$(cd "$(dirname "$0")/../.." && pwd)/target/release/switchboard}
mkdir -p "$out"
SWITCHBOARD_LIMITS__PUBLISH_RATE=0 SWITCHBOARD_LIMITS__MAX_CONNECTIONS_PER_IP=0 \
SWITCHBOARD_LIMITS__NEW_CONNECTIONS_PER_SEC=0 SWITCHBOARD_LIMITS__NEW_CONNECTIONS_PER_IP_PER_SEC=0 RUST_LOG=warn \
    taskset -c 0 "$bin" dev --http 127.0.0.1:61300 --mqtt 127.0.0.1:61301 --admin 127.0.0.1:61302 \
    --https '' --mqtts '' --quic '' \
    >"$out/gateway.log" 2>&1 &
gw=$!
trap 'kill "$gw" 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    (exec 3<>/dev/tcp/127.0.0.1/61300) 2>/dev/null && break
    sleep 0.1
done
taskset -c 1 "$bin" bench fanout --url http://127.0.0.1:61300 --mqtt-url mqtt://127.0.0.1:61301 \
    --server-pid "$gw" "$@" >"$out/bench.txt" 2>&1 &
bench=$!
# Wait for the publishing to start (the bench prints nothing before the end,
# so watch the gateway's CPU: setup is short at these sizes), then sample.
sleep "${PROFILE_DELAY:-5}"
perf record -F 999 -g -p "$gw" -o "$out/perf.data" -- sleep 4 >/dev/null 2>&1
wait "$bench"
cat "$out/bench.txt"
perf report -i "$out/perf.data" --no-children --percent-limit 1.5 --stdio 2>/dev/null \
    | grep -v '^$' | head -120 >"$out/report.txt"
perf report -i "$out/perf.data" --no-children --sort dso,sym --stdio -g none --percent-limit 0.7 2>/dev/null \
    | grep -v '^#' | grep -v '^$' | head -50 >"$out/flat.txt"
cat "$out/flat.txt"
