#!/usr/bin/env bash
# Builds and tests the TypeScript client: installs its npm packages when they are missing or
# older than package-lock.json, compiles src/ to dist/ (which the conformance runner imports),
# and runs the unit tests, the golden vectors included. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")"

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "test.sh: node and npm (Node 20 or newer) are required" >&2
  exit 1
fi
major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$major" -lt 20 ]; then
  echo "test.sh: Node 20 or newer is required, found $(node --version)" >&2
  exit 1
fi

# npm writes node_modules/.package-lock.json on every install: when package-lock.json is newer,
# what is installed is stale.
if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund --loglevel=error
fi

npm run --silent build
npm test --silent
