#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints, unit, property and integration tests of the
# daemon; the deployment files, checked offline (scripts/check-deploy.sh); each client library's
# own tests (TypeScript, Python, Go); and the conformance suite, which drives all four clients
# through the same scenarios against a real daemon.
# The integration tests start their own private redis-server and PostgreSQL from the binaries;
# this script installs those (Debian/Ubuntu packages) when they are missing, and each client's
# test.sh installs what it needs (npm packages from the lockfile, a Python virtual environment,
# Debian's Go and its MessagePack library).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
# The TLS tests make a throwaway CA with openssl.
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  missing+=(postgresql)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  echo "==> installing ${missing[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

echo "==> cargo fmt --check"
cargo fmt --all --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo test"
cargo test --workspace --locked
echo "==> deployment files: Kubernetes manifests, systemd unit, Dockerfile"
# With the binary cargo test just built: building it alone would rebuild much of the tree, as
# the workspace-wide build unifies other members' features (tokio's, for one) into it.
SIDEBUS_BIN=target/debug/sidebus ./scripts/check-deploy.sh
echo "==> client libraries"
./clients/typescript/test.sh
./clients/python/test.sh
./clients/go/test.sh
echo "==> conformance: every client against a real daemon"
cargo build --locked -q -p sidebus-client --example conformance
python3 clients/conformance/run.py
