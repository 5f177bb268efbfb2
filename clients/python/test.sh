#!/usr/bin/env bash
# Builds and tests the Python client: creates clients/python/.venv when missing (installing
# Debian's python3-venv first if `python3 -m venv` cannot work), installs the package and msgpack
# into it, runs the unit tests (the golden vectors included), and checks that the conformance
# runner and the benchmark compile against the installed package. Quiet when all is in place;
# exits non-zero on any failure.
set -euo pipefail

cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
VENV=.venv

"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "python client: $PY is $("$PY" --version 2>&1); 3.11 or newer is needed" >&2
    exit 1
}

if [ ! -x "$VENV/bin/python" ]; then
    # Debian splits ensurepip (which venv needs) into python3-venv.
    if ! "$PY" -c 'import ensurepip' >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            echo "python client: installing python3-venv" >&2
            apt-get update -qq >/dev/null
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        else
            echo "python client: $PY cannot create a virtual environment; install python3-venv" >&2
            exit 1
        fi
    fi
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
fi

# Reinstall only when the packaging changed (an editable install picks up source changes).
STAMP="$VENV/.sidebus-installed"
WANT="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ] || ! "$VENV/bin/python" -c 'import sidebus, msgpack' >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e . "msgpack>=1,<2"
    echo "$WANT" > "$STAMP"
fi

# The runner and the benchmark must at least compile and import the installed package.
"$VENV/bin/python" - conformance/runner.py bench/bench.py ../../examples/shop/notifications/main.py <<'PY'
import sys
for path in sys.argv[1:]:
    with open(path) as f:
        compile(f.read(), path, "exec")  # compiles without leaving __pycache__ behind
PY
"$VENV/bin/python" -c 'import sidebus, sidebus.sync, sidebus.protocol'

LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT
set +e
"$VENV/bin/python" -m unittest discover -s tests -t . >"$LOG" 2>&1
status=$?
set -e
ran="$(sed -n 's/^Ran \([0-9]*\) tests\{0,1\}.*/\1/p' "$LOG" | tail -1)"
failed="$(grep -oE '^FAILED \(.*\)' "$LOG" | grep -oE '(failures|errors|unexpected successes)=[0-9]+' | cut -d= -f2 | awk '{s += $1} END {print s + 0}' || true)"
if [ "$status" != 0 ] || [ -z "$ran" ]; then
    cat "$LOG"
    echo "python client: ${ran:-0} tests run, unit tests FAILED" >&2
    echo "python: $(( ${ran:-0} - ${failed:-0} )) passed, ${failed:-1} failed"
    exit 1
fi
tail -3 "$LOG"
echo "python: $ran passed, 0 failed"
