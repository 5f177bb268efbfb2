#!/usr/bin/env bash
# Runs the daemon against the local Redis (127.0.0.1:6379) and PostgreSQL, starting (and, on
# Debian/Ubuntu, installing) them when they are not running. The socket is ./run/sidebus.sock;
# in another terminal (the release binary this script built):
#   export PATH=$PWD/target/release:$PATH SIDEBUS_SOCKET=$PWD/run/sidebus.sock
#   sidebus tail order.created --group analytics
#   sidebus publish order.created --data '{"orderId":"o-1"}'
# Extra arguments go to `sidebus run` (e.g. --log-level sidebus=debug).
set -euo pipefail
cd "$(dirname "$0")/.."

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
as_postgres() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi
}

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v pg_ctlcluster >/dev/null 2>&1 || command -v pg_isready >/dev/null 2>&1 || missing+=(postgresql)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "==> installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if ! (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; then
  echo "==> starting redis-server on 127.0.0.1:6379"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
fi

if [ -z "${SIDEBUS_DATABASE_URL:-}" ]; then
  if ! pg_isready -q 2>/dev/null; then
    echo "==> starting PostgreSQL"
    for version in $(ls /etc/postgresql 2>/dev/null); do
      $sudo pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    done
    for _ in $(seq 50); do pg_isready -q 2>/dev/null && break; sleep 0.2; done
  fi
  # Connect over the local socket as a role named after this user (peer authentication), which
  # is created with the right to create the sidebus database.
  user="$(id -un)"
  if ! as_postgres psql -qtAc "SELECT 1 FROM pg_roles WHERE rolname = '$user'" | grep -q 1; then
    echo "==> creating the PostgreSQL role $user"
    as_postgres psql -qc "CREATE ROLE \"$user\" LOGIN CREATEDB"
  fi
  export SIDEBUS_DATABASE_URL="postgres:///sidebus?host=/var/run/postgresql&user=$user"
fi

mkdir -p run
exec cargo run --release -- run --socket ./run/sidebus.sock --data-dir ./run/data "$@"
