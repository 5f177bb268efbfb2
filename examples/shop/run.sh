#!/usr/bin/env bash
# Runs the example shop against a running sidebus daemon (socket: $SIDEBUS_SOCKET, else
# /run/sidebus/sidebus.sock): builds what is missing, starts the three consumers (inventory in
# Go, notifications in Python, analytics in Rust), waits until each has subscribed, then runs the
# orders service (TypeScript), which publishes five order.created events and exits. Every line a
# service prints is prefixed with its name. After orders has finished, the consumers keep
# running for $SHOP_LINGER seconds (default 8: the notifications retries of the order with a bad
# address take about 2 s before it is dead-lettered), then everything is stopped with SIGTERM
# (each service closes gracefully) and the group's dead letters are listed when a `sidebus`
# binary is at hand. Ctrl-C stops everything at any time.
#
#   examples/shop/run.sh                  # one pass
#   examples/shop/run.sh --keep-running   # consumers stay until Ctrl-C
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
socket="${SIDEBUS_SOCKET:-/run/sidebus/sidebus.sock}"
linger="${SHOP_LINGER:-8}"
keep_running=false
for arg in "$@"; do
  case "$arg" in
    --keep-running) keep_running=true ;;
    -h | --help)
      sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "run.sh: unknown argument $arg (try --help)" >&2
      exit 64
      ;;
  esac
done
export SIDEBUS_SOCKET="$socket"

say() { printf '[%-13s] %s\n' shop "$*"; }
die() {
  printf '[%-13s] %s\n' shop "$*" >&2
  exit 1
}

# ---- the daemon must be there ----

socket_answers() {
  python3 - "$socket" <<'PY' 2>/dev/null
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(2)
s.connect(sys.argv[1])
PY
}
if ! socket_answers; then
  die "no sidebus daemon answers on $socket. Start one (see examples/shop/README.md, e.g. ./scripts/run-local.sh) and set SIDEBUS_SOCKET to its socket."
fi

# ---- build what is missing ----

missing=()

# analytics (Rust): an example of the Rust client.
analytics=""
for b in "$root/target/debug/examples/shop_analytics" "$root/target/release/examples/shop_analytics"; do
  if [ -x "$b" ]; then
    analytics="$b"
    break
  fi
done
if [ -z "$analytics" ]; then
  if command -v cargo >/dev/null 2>&1; then
    say "building analytics: cargo build -p sidebus-client --example shop_analytics"
    (cd "$root" && cargo build -q -p sidebus-client --example shop_analytics)
    analytics="$root/target/debug/examples/shop_analytics"
  else
    missing+=("analytics needs a Rust toolchain: cargo build -p sidebus-client --example shop_analytics")
  fi
fi

# inventory (Go): built offline against Debian's MessagePack sources, as clients/go/test.sh does.
inventory="$root/target/shop/inventory"
if [ ! -x "$inventory" ] || [ -n "$(find "$here/inventory" "$root/clients/go" -name '*.go' -newer "$inventory" 2>/dev/null | head -1)" ]; then
  if command -v go >/dev/null 2>&1 && [ -d /usr/share/gocode/src/github.com/vmihailenco/msgpack/v5 ]; then
    say "building inventory: go build (examples/shop/inventory -> target/shop/inventory)"
    mkdir -p "$root/target/shop"
    gocache="$(go env GOCACHE)"
    [ "$gocache" != "off" ] || export GOCACHE=/tmp/sidebus-go-cache
    (cd "$here/inventory" && GOPROXY=off GOFLAGS=-mod=mod GOTOOLCHAIN=local CGO_ENABLED=0 go build -o "$inventory" .)
  else
    missing+=("inventory needs Go and Debian's MessagePack library: run clients/go/test.sh, which installs them")
  fi
fi

# notifications (Python): the client and msgpack live in clients/python/.venv.
python="$root/clients/python/.venv/bin/python"
if ! [ -x "$python" ] || ! "$python" -c 'import sidebus, msgpack' >/dev/null 2>&1; then
  missing+=("notifications needs clients/python/.venv: run clients/python/test.sh, which creates it")
fi

# orders (TypeScript): orders/run.sh installs and builds it (and the client) when needed.
command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 ||
  missing+=("orders needs Node 20+ and npm")

if [ "${#missing[@]}" -gt 0 ]; then
  for m in "${missing[@]}"; do say "$m"; done
  exit 1
fi

# ---- run ----

work="$(mktemp -d -t sidebus-shop.XXXXXX)"
pids=()     # the services
printers=() # what prefixes their output
stopping=false

# Prints each line of the standard input as "[name] line", at once (a line that starts with
# "name: " already, as the services' own lines do, loses that part).
prefix() {
  local name="$1" line
  while IFS= read -r line || [ -n "$line" ]; do
    printf '[%-13s] %s\n' "$name" "${line#"$name: "}"
  done
}

# start NAME COMMAND...: runs the command with its output prefixed with NAME (and copied to a
# log, where wait_ready looks for the line saying it is ready). Its pid is the command's own, so
# that SIGTERM reaches the service itself. The prefixing ignores Ctrl-C and SIGTERM: it ends when
# the service closes its output, so the lines of a graceful close are still printed.
start() {
  local name="$1"
  shift
  mkfifo "$work/$name.out"
  (
    trap '' INT TERM
    tee "$work/$name.log" <"$work/$name.out" | prefix "$name"
  ) &
  printers+=("$!")
  "$@" >"$work/$name.out" 2>&1 &
  pids+=("$!")
}

wait_ready() {
  local name="$1" text="$2" i pid
  pid="${pids[$((${#pids[@]} - 1))]}"
  for ((i = 0; i < 300; i++)); do
    grep -q "$text" "$work/$name.log" 2>/dev/null && return 0
    kill -0 "$pid" 2>/dev/null || die "$name exited before it was ready"
    sleep 0.1
  done
  die "$name did not say \"$text\" within 30 s"
}

stop_all() {
  $stopping && return
  stopping=true
  local pid i
  [ -z "$pause_pid" ] || kill "$pause_pid" 2>/dev/null || true
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  # Graceful close: running handlers finish and are acked; give them 15 s, then kill.
  for ((i = 0; i < 150; i++)); do
    local alive=false
    for pid in "${pids[@]}"; do
      if kill -0 "$pid" 2>/dev/null; then alive=true; fi
    done
    $alive || break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do
    kill -KILL "$pid" 2>/dev/null || true
  done
  # The printers end once the services' output is closed.
  wait "${pids[@]}" "${printers[@]}" 2>/dev/null || true
  rm -rf "$work"
}
# Sleeps in the background and waits for it: a signal's trap then runs at once (bash runs it only
# after a foreground command has ended).
pause_pid=""
pause() {
  sleep "$1" &
  pause_pid=$!
  wait "$pause_pid" || true
  pause_pid=""
}
trap stop_all EXIT
trap 'say "interrupted: stopping"; exit 130' INT TERM

say "daemon at $socket"
start inventory "$inventory"
wait_ready inventory "waiting for order.created"
start notifications "$python" -u "$here/notifications/main.py"
wait_ready notifications "subscribed to order.created"
start analytics "$analytics"
wait_ready analytics "counting order.created"
say "consumers subscribed; starting orders"

start orders "$here/orders/run.sh"
orders_pid="${pids[$((${#pids[@]} - 1))]}"
set +e
wait "$orders_pid"
orders_status=$?
set -e
if [ "$orders_status" -ne 0 ]; then
  say "orders exited with status $orders_status"
fi

if $keep_running; then
  say "orders finished; the consumers keep running until Ctrl-C"
  while true; do pause 3600; done
fi
say "orders finished; the consumers run $linger s more (retries, dead letters), then stop"
pause "$linger"
say "stopping the consumers"
stop_all

# The dead letters the notifications group collected, when a sidebus binary is at hand.
sidebus=""
for b in "$(command -v sidebus 2>/dev/null || true)" "$root/target/release/sidebus" "$root/target/debug/sidebus"; do
  if [ -n "$b" ] && [ -x "$b" ]; then
    sidebus="$b"
    break
  fi
done
if [ -n "$sidebus" ]; then
  say "sidebus dlq list order.created --group notifications"
  "$sidebus" dlq list order.created --group notifications 2>&1 | prefix dlq || true
fi
exit "$orders_status"
