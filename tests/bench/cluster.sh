#!/usr/bin/env bash
# A 3-server NATS JetStream cluster and three gateway nodes on it, on
# loopback, for benchmarks (docs/cluster.md, tests/bench/RESULTS.md):
#   bash tests/bench/cluster.sh 'target/release/switchboard bench fanout ... --url $GW1 --sub-url $GW2,$GW3 --server-pid $PIDS'
# The command runs with GW1..GW3 (HTTP URLs), MQTT1..MQTT3, GW_PIDS (the
# gateways' PIDs), NATS_PIDS and PIDS (all six, comma-separated); everything
# is stopped and the stores removed afterwards. Ports are fixed, none of them
# standard: NATS 14221-14223 (routes 16221-16223, monitoring 18221-18223),
# gateways HTTP 18081-18083, MQTT 11881-11883, admin 19091-19093.
# Six servers share this machine's cores with the bench: NATS_GOMAXPROCS sets
# each nats-server's GOMAXPROCS and GW_WORKERS each gateway's tokio worker
# threads (TOKIO_WORKER_THREADS); unset, each takes one per core.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${SWITCHBOARD:-target/release/switchboard}
NATS_SERVER=${NATS_SERVER:-nats-server}
dir=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT
routes=nats://127.0.0.1:16221,nats://127.0.0.1:16222,nats://127.0.0.1:16223
for i in 1 2 3; do
    env ${NATS_GOMAXPROCS:+GOMAXPROCS=$NATS_GOMAXPROCS} "$NATS_SERVER" -a 127.0.0.1 -p 1422$i -m 1822$i -js -sd "$dir/n$i" -n n$i \
        --cluster_name bench --cluster nats://127.0.0.1:1622$i --routes $routes >"$dir/n$i.log" 2>&1 &
    pids+=($!)
done
nats_pids=$(IFS=,; echo "${pids[*]}")
for i in 1 2 3; do
    for _ in $(seq 100); do
        curl -s "http://127.0.0.1:1822$i/jsz" | grep -q '"leader":"n' && break
        sleep 0.1
    done
done
gw_pids=()
for i in 1 2 3; do
    env ${GW_WORKERS:+TOKIO_WORKER_THREADS=$GW_WORKERS} SWITCHBOARD_NODE__NAME=gw$i SWITCHBOARD_NATS__REPLICAS=3 "$BIN" dev \
        --nats nats://127.0.0.1:14221,nats://127.0.0.1:14222,nats://127.0.0.1:14223 \
        --http 127.0.0.1:1808$i --mqtt 127.0.0.1:1188$i --admin 127.0.0.1:1909$i \
        --https '' --mqtts '' --quic '' >"$dir/gw$i.log" 2>&1 &
    pids+=($!)
    gw_pids+=($!)
done
for i in 1 2 3; do
    ready=
    for _ in $(seq 300); do
        curl -sf "http://127.0.0.1:1909$i/readyz" >/dev/null && ready=1 && break
        sleep 0.1
    done
    if [ -z "$ready" ]; then
        echo "gateway gw$i is not ready:" >&2
        tail -n 20 "$dir/gw$i.log" >&2
        exit 1
    fi
done
export BENCH_DIR="$dir"
export GW1=http://127.0.0.1:18081 GW2=http://127.0.0.1:18082 GW3=http://127.0.0.1:18083
export MQTT1=mqtt://127.0.0.1:11881 MQTT2=mqtt://127.0.0.1:11882 MQTT3=mqtt://127.0.0.1:11883
GW_PIDS=$(IFS=,; echo "${gw_pids[*]}")
export GW_PIDS NATS_PIDS=$nats_pids PIDS="$GW_PIDS,$nats_pids"
bash -c "$*"
