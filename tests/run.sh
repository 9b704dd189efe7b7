#!/usr/bin/env bash
# The test command (README): installs whatever the tests need that is missing,
# then runs the whole suite. Today every client the tests use is a Rust crate
# (tokio-tungstenite, reqwest), so only the Rust toolchain is required; later
# suites add their installers here.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null; then
    echo "cargo is required (https://rustup.rs)" >&2
    exit 1
fi
cargo test --workspace --locked "$@"
