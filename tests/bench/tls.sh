#!/usr/bin/env bash
# TLS against plain TCP on one gateway (#16): server CPU per delivery in
# fan-out over WebSocket, MQTT 3.1.1, SSE and long polling, idle RSS per
# connection (MQTT, WebSocket, SSE; with and without session resumption),
# connection churn over WSS, and reconnect storms with recovery. The gateway (`switchboard dev`, a generated
# ECDSA P-256 certificate, HTTPS and MQTTS on) runs on core 0, the bench on
# core 1; every run gets a fresh gateway. One JSON report per run in OUT.
#
#   cargo build --release -p switchboard
#   bash tests/bench/tls.sh [OUT]       # default OUT=/tmp/tlsbench
#
# Uses ports 38080, 38443, 38883, 31883 and 39090 on 127.0.0.1.
set -u
cd "$(dirname "$0")/../.."
BIN=$PWD/target/release/switchboard
OUT=${1:-/tmp/tlsbench}
mkdir -p "$OUT"
export SWITCHBOARD_LIMITS__PUBLISH_RATE=0 SWITCHBOARD_LIMITS__MAX_CONNECTIONS_PER_IP=0 SWITCHBOARD_LIMITS__NEW_CONNECTIONS_PER_SEC=0 SWITCHBOARD_LIMITS__NEW_CONNECTIONS_PER_IP_PER_SEC=0 RUST_LOG=warn
start() {
  taskset -c 0 $BIN dev --http 127.0.0.1:38080 --admin 127.0.0.1:39090 --mqtt 127.0.0.1:31883 --https 127.0.0.1:38443 --mqtts 127.0.0.1:38883 --quic '' > $OUT/gw.log 2>&1 &
  GW=$!
  for i in $(seq 50); do curl -s -o /dev/null http://127.0.0.1:38080/v1/transports && break; sleep 0.1; done
}
stop() { kill $GW; wait $GW 2>/dev/null; }
B="taskset -c 1 $BIN bench"
run() { # name args...
  local name=$1; shift
  start
  $B "$@" --server-pid $GW --json > $OUT/$name.json 2>$OUT/$name.err
  stop
  sleep 2
}
L="--channels 50 --subs-per-channel 100 --pubs 4 --rate 250 --duration 10s --size 64"
for round in 1 2; do
run ws-plain-$round fanout --proto ws --url http://127.0.0.1:38080 $L
run ws-tls-$round fanout --proto ws --url https://127.0.0.1:38443 --insecure $L
run mqtt-plain-$round fanout --proto mqtt --mqtt-version 3 --mqtt-url mqtt://127.0.0.1:31883 $L
run mqtt-tls-$round fanout --proto mqtt --mqtt-version 3 --mqtt-url mqtts://127.0.0.1:38883 --insecure $L
run sse-plain-$round fanout --proto sse --url http://127.0.0.1:38080 $L
run sse-tls-$round fanout --proto sse --url https://127.0.0.1:38443 --insecure $L
done
P="--channels 10 --subs-per-channel 100 --pubs 2 --rate 100 --duration 10s --size 64"
for round in 1 2; do
run poll-plain-$round fanout --proto poll --url http://127.0.0.1:38080 $P
run poll-tls-$round fanout --proto poll --url https://127.0.0.1:38443 --insecure $P
done
for p in mqtt ws sse; do
  if [ $p = mqtt ]; then U1="--mqtt-version 3 --mqtt-url mqtt://127.0.0.1:31883"; U2="--mqtt-version 3 --mqtt-url mqtts://127.0.0.1:38883 --insecure"; else U1="--url http://127.0.0.1:38080"; U2="--url https://127.0.0.1:38443 --insecure"; fi
  run idle-$p-plain idle --proto $p --conns 2000 --hold 3s $U1
  run idle-$p-tls idle --proto $p --conns 2000 --hold 3s $U2
  run idle-$p-tls-full idle --proto $p --conns 2000 --hold 3s $U2 --tls-resumption off
done
for r in on off; do
  run churn-ws-tls-$r churn --proto ws --rate 500 --duration 10s --url https://127.0.0.1:38443 --insecure --tls-resumption $r
done
run churn-ws-plain churn --proto ws --rate 500 --duration 10s --url http://127.0.0.1:38080
# Reconnect storms with recovery: 5 000 subscribers drop, 10 messages are
# published, all reconnect (256 at a time) with their positions.
for p in ws sse mqtt; do
  P="--url http://127.0.0.1:38080"; T="--url https://127.0.0.1:38443 --insecure"
  if [ $p = mqtt ]; then P="$P --mqtt-url mqtt://127.0.0.1:31883"; T="--url http://127.0.0.1:38080 --mqtt-url mqtts://127.0.0.1:38883 --insecure"; fi
  run storm-$p-plain recovery --proto $p --subs 5000 --missed 10 $P
  run storm-$p-tls-on recovery --proto $p --subs 5000 --missed 10 $T --tls-resumption on
  run storm-$p-tls-off recovery --proto $p --subs 5000 --missed 10 $T --tls-resumption off
done
echo finished
