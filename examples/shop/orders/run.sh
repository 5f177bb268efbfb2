#!/usr/bin/env bash
# Builds (when needed) and runs the orders service against the daemon at $SIDEBUS_SOCKET: the
# TypeScript client in clients/typescript first, then this service, then `node dist/orders.js`.
set -euo pipefail
cd "$(dirname "$0")"
client=../../../clients/typescript

install() {
  if [ ! -f "$1/node_modules/.package-lock.json" ] || [ "$1/package-lock.json" -nt "$1/node_modules/.package-lock.json" ]; then
    (cd "$1" && npm ci --no-audit --no-fund --loglevel=error >&2)
  fi
}

install "$client"
[ -f "$client/dist/index.js" ] || (cd "$client" && npm run --silent build)
install .
npm run --silent build
exec node dist/orders.js
