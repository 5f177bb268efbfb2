#!/usr/bin/env bash
# Tests the Go client: installs Go and Debian's MessagePack library when they are missing,
# checks formatting (gofmt) and go vet, runs the unit and vector tests, and builds the
# conformance runner into bin/conformance (where clients/conformance/run.py starts it).
# Everything builds offline against Debian's source tree (see go.mod); no module proxy is used.
set -euo pipefail
cd "$(dirname "$0")"

msgpack_src=/usr/share/gocode/src/github.com/vmihailenco/msgpack/v5
missing=()
command -v go >/dev/null 2>&1 || missing+=(golang-go)
[ -d "$msgpack_src" ] || missing+=(golang-github-vmihailenco-msgpack.v5-dev)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "==> installing ${missing[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

export GOPROXY=off GOFLAGS=-mod=mod GOTOOLCHAIN=local
# The client needs no cgo; the race detector does, so it runs only where gcc is installed.
race=-race
if ! command -v gcc >/dev/null 2>&1; then
  export CGO_ENABLED=0
  race=""
fi
# Go needs a build cache; without $HOME it has none ("off").
if [ "$(go env GOCACHE)" = "off" ]; then
  export GOCACHE=/tmp/sidebus-go-cache
fi

echo "==> gofmt"
unformatted=$(gofmt -l . ../../examples/shop/inventory)
if [ -n "$unformatted" ]; then
  echo "gofmt would change: $unformatted" >&2
  exit 1
fi
echo "==> go vet"
go vet ./...
echo "==> go test"
go test $race -count=1 ./...
echo "==> building the conformance runner and the bench"
mkdir -p bin
go build -o bin/conformance ./cmd/conformance
go build -o bin/bench ./cmd/bench
echo "==> building examples/shop/inventory"
(cd ../../examples/shop/inventory && go vet ./... && go build -o /dev/null .)
echo "go client: ok"
