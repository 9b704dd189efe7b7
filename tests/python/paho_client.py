#!/usr/bin/env python3
"""An independent MQTT client for Switchboard: Eclipse Paho (paho-mqtt 2.x),
nothing of ours.

    python3 tests/python/paho_client.py sub HOST PORT TOPIC N --v5|--v311 [--id ID] [--qos Q]
    python3 tests/python/paho_client.py pub HOST PORT TOPIC PAYLOAD QOS --v5|--v311 [--id ID] [--prop K=V]...

``sub`` connects (clean session), subscribes to the filter TOPIC at QoS Q
(default 2) and prints, one JSON object per line on stdout:

- ``{"event": "subscribed", "granted": [CODE, ...]}`` once the SUBACK is in
  (a test publishes only after this line);
- then per received message ``{"event": "message", "topic", "qos",
  "retain", "payload_hex", "text", "user_properties"}`` (``text`` is the
  payload as UTF-8 or null; ``user_properties`` a list of [key, value] pairs,
  MQTT 5 only), until N messages; then it disconnects and exits 0.

``pub`` connects, publishes PAYLOAD (UTF-8 text, or ``hex:...`` for raw
bytes) at QOS with the MQTT 5 user properties given by ``--prop``, waits
until the QoS flow completed, prints ``{"event": "published"}``,
disconnects and exits 0.

Either exits 1 with the reason on stderr if the connection is refused or
lost, or when nothing finishes within 20 s. tests/tests/it/mqtt_independent.rs
runs it; tests/run.sh installs paho-mqtt.
"""

import argparse
import json
import sys
import time

import paho.mqtt.client as mqtt  # PyPI: paho-mqtt 2.x (installed by tests/run.sh)
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

DEADLINE_S = 20


def emit(obj):
    print(json.dumps(obj), flush=True)


def fail(reason):
    print(f"paho_client: {reason}", file=sys.stderr, flush=True)
    sys.exit(1)


def new_client(args):
    protocol = mqtt.MQTTv5 if args.v5 else mqtt.MQTTv311
    kwargs = {"callback_api_version": mqtt.CallbackAPIVersion.VERSION2, "client_id": args.id, "protocol": protocol}
    if not args.v5:
        kwargs["clean_session"] = True
    client = mqtt.Client(**kwargs)
    state = {"connected": False, "done": False, "error": None}

    def on_connect(_c, _u, _flags, reason_code, _props):
        if reason_code.is_failure:
            state["error"] = f"CONNACK refused: {reason_code}"
        else:
            state["connected"] = True

    def on_disconnect(_c, _u, _flags, reason_code, _props):
        if not state["done"]:
            state["error"] = f"disconnected: {reason_code}"

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.connect(args.host, args.port, keepalive=30)
    return client, state


def run_until(client, state, what, cond):
    deadline = time.monotonic() + DEADLINE_S
    while not cond():
        if state["error"]:
            fail(state["error"])
        if time.monotonic() > deadline:
            fail(f"timed out waiting for {what}")
        client.loop(timeout=0.05)


def sub(args):
    client, state = new_client(args)
    got = []
    granted = []

    def on_subscribe(_c, _u, _mid, reason_codes, _props):
        granted.extend(rc.value for rc in reason_codes)
        emit({"event": "subscribed", "granted": granted})

    def on_message(_c, _u, msg):
        try:
            text = msg.payload.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        props = getattr(msg.properties, "UserProperty", None) if msg.properties else None
        emit(
            {
                "event": "message",
                "topic": msg.topic,
                "qos": msg.qos,
                "retain": bool(msg.retain),
                "payload_hex": msg.payload.hex(),
                "text": text,
                "user_properties": [list(p) for p in props or []],
            }
        )
        got.append(msg)

    client.on_subscribe = on_subscribe
    client.on_message = on_message
    run_until(client, state, "CONNACK", lambda: state["connected"])
    client.subscribe(args.topic, qos=args.qos)
    run_until(client, state, "SUBACK", lambda: granted)
    run_until(client, state, f"{args.n} messages", lambda: len(got) >= args.n)
    state["done"] = True
    client.disconnect()
    return 0


def pub(args):
    client, state = new_client(args)
    run_until(client, state, "CONNACK", lambda: state["connected"])
    payload = bytes.fromhex(args.payload[4:]) if args.payload.startswith("hex:") else args.payload.encode("utf-8")
    props = None
    if args.prop:
        if not args.v5:
            fail("--prop needs --v5")
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [tuple(p.split("=", 1)) for p in args.prop]
    info = client.publish(args.topic, payload, qos=args.qos, properties=props)
    run_until(client, state, "the publish to complete", info.is_published)
    state["done"] = True
    emit({"event": "published"})
    client.disconnect()
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("sub", "pub"):
        p = commands.add_parser(name)
        p.add_argument("host")
        p.add_argument("port", type=int)
        p.add_argument("topic")
        if name == "sub":
            p.add_argument("n", type=int)
            p.add_argument("--qos", type=int, default=2)
        else:
            p.add_argument("payload")
            p.add_argument("qos", type=int)
            p.add_argument("--prop", action="append", default=[], help="MQTT 5 user property K=V")
        version = p.add_mutually_exclusive_group(required=True)
        version.add_argument("--v5", action="store_true")
        version.add_argument("--v311", action="store_true")
        p.add_argument("--id", default=f"paho-{name}")
    args = parser.parse_args()
    try:
        return sub(args) if args.command == "sub" else pub(args)
    except OSError as e:
        fail(f"{type(e).__name__}: {e}")


if __name__ == "__main__":
    sys.exit(main())
