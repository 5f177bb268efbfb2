#!/usr/bin/env python3
"""The client benchmark: each client library's pipelined publish and consume rates through one
release daemon, in one run, set against the Rust client's.

    python3 bench/clients.py [--count 50000] [--rounds 3] [--client rust --client go ...]
                             [--out bench/results-clients.json] [--no-profile]

It starts a private Redis and PostgreSQL (the conformance suite's helpers, from
clients/conformance/run.py) and one release daemon (target/release/sidebus), runs one warm-up,
then each client's bench in rounds, interleaved (rust, typescript, go, python, rust, ...), all
with the same --count. Each bench subscribes a fresh group to a fresh event type, publishes N
events (`{"n": i, "pad": 200 × "x"}`, durability local, up to 1,000 in flight) while the group
consumes them, and prints one JSON line {client, count, publish_per_s, consume_per_s}. The
table holds each client's median over the rounds and its ratio to the Rust client's median.
Then the Python bench runs once more under cProfile and its time is summed by where it goes.

Beside the rates, every run records the client process's CPU time per event (user + system, of
the bench process as the kernel accounts it) and the cores the daemon used, since the client,
the daemon, Postgres and Redis share the machine's cores.

Only the Python standard library is used, like run.py. The benches must be built first (the
clients' test.sh scripts build them; the message says which is missing). Exits non-zero when a
bench fails.
"""

import argparse
import datetime
import importlib.util
import json
import os
import platform
import pstats
import resource
import secrets
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _load_conformance():
    """clients/conformance/run.py as a module (its Redis, Postgres and Daemon helpers)."""
    path = os.path.join(ROOT, "clients", "conformance", "run.py")
    spec = importlib.util.spec_from_file_location("sidebus_conformance_run", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


conf = _load_conformance()

ORDER = ["rust", "typescript", "go", "python"]
PY = os.path.join(ROOT, "clients", "python", ".venv", "bin", "python")

# Each client's bench, what it needs, what builds it, and the sources it is built from (a bench
# older than its sources gets a warning: it may not measure the code as it is).
BENCHES = {
    "rust": {
        "cmd": [os.path.join(ROOT, "target", "release", "examples", "bench")],
        "needs": [os.path.join(ROOT, "target", "release", "examples", "bench")],
        "build": "cargo build --release -p sidebus-client --example bench",
        "sources": [os.path.join(ROOT, "clients", "rust", "src"), os.path.join(ROOT, "clients", "rust", "examples", "bench.rs"),
                    os.path.join(ROOT, "protocol", "src")],
    },
    "typescript": {
        "cmd": ["node", os.path.join(ROOT, "clients", "typescript", "bench", "bench.mjs")],
        "needs": [os.path.join(ROOT, "clients", "typescript", "dist", "index.js")],
        "build": "clients/typescript/test.sh (npm ci, then builds dist/)",
        "sources": [os.path.join(ROOT, "clients", "typescript", "src")],
        "built": os.path.join(ROOT, "clients", "typescript", "dist", "index.js"),
    },
    "go": {
        "cmd": [os.path.join(ROOT, "clients", "go", "bin", "bench")],
        "needs": [os.path.join(ROOT, "clients", "go", "bin", "bench")],
        "build": "clients/go/test.sh (builds bin/bench)",
        "sources": [os.path.join(ROOT, "clients", "go")],
        "source_ext": ".go",
    },
    "python": {
        "cmd": [PY, os.path.join(ROOT, "clients", "python", "bench", "bench.py")],
        "needs": [PY],
        "build": "clients/python/test.sh (creates clients/python/.venv with the client and msgpack)",
        "sources": [],
    },
}


def log(msg=""):
    print(msg, file=sys.stderr, flush=True)


def newest_mtime(paths, ext=None):
    newest = 0.0
    for p in paths:
        if os.path.isfile(p):
            newest = max(newest, os.path.getmtime(p))
            continue
        for d, dirs, files in os.walk(p):
            dirs[:] = [x for x in dirs if x not in ("node_modules", "dist", "bin", ".venv")]
            for f in files:
                if ext is None or f.endswith(ext):
                    newest = max(newest, os.path.getmtime(os.path.join(d, f)))
    return newest


def mtime_utc(path):
    return datetime.datetime.fromtimestamp(os.path.getmtime(path), datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def check_benches(clients):
    """Exits with one message per missing bench or toolchain. Returns what each bench was built
    at and the warnings about builds older than their sources (they may not measure the code as
    it is now)."""
    problems = []
    builds = {}
    warnings = []
    for c in clients:
        b = BENCHES[c]
        if not os.path.isabs(b["cmd"][0]) and shutil.which(b["cmd"][0]) is None:
            problems.append(f"{c}: `{b['cmd'][0]}` is not on PATH (the {c} toolchain is missing); then run {b['build']}")
            continue
        missing = [p for p in b["needs"] if not os.path.exists(p)]
        if missing:
            problems.append(f"{c}: {os.path.relpath(missing[0], ROOT)} is missing; build it with: {b['build']}")
            continue
        built = b.get("built") or (b["needs"][0] if b["needs"] else None)
        if built is None:
            continue
        builds[c] = {"file": os.path.relpath(built, ROOT), "modified": mtime_utc(built)}
        if b["sources"] and newest_mtime(b["sources"], b.get("source_ext")) > os.path.getmtime(built):
            warnings.append(f"{os.path.relpath(built, ROOT)} (built {builds[c]['modified']}) is older than the {c} "
                            f"client's sources; rebuild with: {b['build']}")
    if "python" in clients:
        if os.path.exists(PY) and subprocess.run([PY, "-c", "import sidebus, msgpack"], capture_output=True).returncode != 0:
            problems.append(f"python: {os.path.relpath(PY, ROOT)} cannot import sidebus and msgpack; run {BENCHES['python']['build']}")
    if problems:
        for p in problems:
            log(f"cannot bench {p}")
        sys.exit(2)
    return builds, warnings


# ---- the machine ----

def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mem_total_gib():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def loadavg():
    return [round(x, 2) for x in os.getloadavg()]


def version_of(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return None


def machine():
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "mem_gib": mem_total_gib(),
        "kernel": platform.release(),
        "os": platform.freedesktop_os_release().get("PRETTY_NAME") if hasattr(platform, "freedesktop_os_release") else None,
    }


def toolchains(clients):
    v = {"python3 (this script)": platform.python_version()}
    if "typescript" in clients:
        v["node"] = version_of(["node", "--version"])
    if "python" in clients:
        v["python (client venv)"] = version_of([PY, "-c", "import sys, msgpack; print(sys.version.split()[0], 'msgpack', "
                                                    "msgpack.version, 'C extension' if msgpack.Packer.__module__ != "
                                                    "'msgpack.fallback' else 'pure Python')"])
    if "go" in clients and shutil.which("go"):
        v["go (bin/bench built with)"] = version_of(["go", "version", BENCHES["go"]["cmd"][0]])
    v["redis-server"] = version_of([conf.find_binary("redis-server"), "--version"])
    v["postgres"] = version_of([conf.find_binary("postgres"), "--version"])
    return v


# ---- running the benches ----

def cpu_seconds_of(pid):
    """utime + stime of a process, in seconds (from /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_bench(client, socket_path, count, daemon, extra=(), timeout=None, cmd=None):
    """Runs one bench; returns its JSON line with what this script measured around it."""
    cmd = (cmd or BENCHES[client]["cmd"]) + ["--socket", socket_path, "--count", str(count)] + list(extra)
    load_before = loadavg()
    daemon_cpu = cpu_seconds_of(daemon.proc.pid)
    child_cpu = children_cpu()
    started = time.monotonic()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout or max(300, count / 100))
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"the {client} bench took longer than {e.timeout:.0f} s; its stderr:\n{(e.stderr or b'')[-3000:]}")
    wall = time.monotonic() - started
    daemon_cpu = cpu_seconds_of(daemon.proc.pid) - daemon_cpu
    child_cpu = children_cpu() - child_cpu
    if p.returncode != 0:
        raise RuntimeError(f"the {client} bench exited with {p.returncode}: {' '.join(cmd)}\n"
                           f"stdout: {p.stdout[-2000:]}\nstderr: {p.stderr[-4000:]}")
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    try:
        out = json.loads(lines[-1])
    except (IndexError, ValueError):
        raise RuntimeError(f"the {client} bench printed no JSON line: {' '.join(cmd)}\nstdout: {p.stdout[-2000:]}\n"
                           f"stderr: {p.stderr[-2000:]}")
    for k in ("publish_per_s", "consume_per_s"):
        if not isinstance(out.get(k), (int, float)) or out[k] <= 0:
            raise RuntimeError(f"the {client} bench's {k} is {out.get(k)!r}: {lines[-1]}")
    if out.get("count") != count or out.get("client") != BENCHES[client].get("reports_as", client):
        raise RuntimeError(f"the {client} bench reported client {out.get('client')!r}, count {out.get('count')!r}: {lines[-1]}")
    return {
        "client": client,
        "publish_per_s": round(out["publish_per_s"]),
        "consume_per_s": round(out["consume_per_s"]),
        "wall_s": round(wall, 2),
        # CPU of the bench process (and anything it waited for), per event published and consumed.
        "client_cpu_us_per_event": round(child_cpu / count * 1e6, 1),
        "daemon_cores": round(daemon_cpu / wall, 2),
        "load_before": load_before,
        "load_after": loadavg(),
        "bench_output": out,
        "stderr": p.stderr[-4000:],
    }


# ---- where the Python client's time goes ----

# Runs the Python bench under its --profile with msgpack's two calls wrapped in Python functions
# named msgpack_pack and msgpack_unpackb: msgpack's C extension is invisible to cProfile (its
# time would count as the caller's), the wrappers make it a line of its own. Arguments: the
# bench, the client's src directory, then the bench's arguments.
PROFILE_DRIVER = r"""
import runpy, sys, types
bench, src = sys.argv[1], sys.argv[2]
sys.argv = [bench] + sys.argv[3:]
sys.path.insert(0, src)
import msgpack
import sidebus.client, sidebus.protocol

_unpackb = msgpack.unpackb

def msgpack_unpackb(*args, **kwargs):
    return _unpackb(*args, **kwargs)

class Packer:
    def __init__(self, *args, **kwargs):
        self._packer = msgpack.Packer(*args, **kwargs)

    def msgpack_pack(self, obj):
        return self._packer.pack(obj)

    pack = msgpack_pack

def shim(**replaced):
    ns = types.SimpleNamespace(**{n: getattr(msgpack, n) for n in dir(msgpack) if not n.startswith("__")})
    ns.__dict__.update(replaced)
    return ns

sidebus.protocol.msgpack = shim(unpackb=msgpack_unpackb)
sidebus.client.msgpack = shim(Packer=Packer)
runpy.run_path(bench, run_name="__main__")
"""

def python_time_split(prof_path, count):
    """Sums a cProfile's own time (tottime; wall clock, as cProfile measures) into a few places."""
    st = pstats.Stats(prof_path)
    groups = {}
    calls = {}
    total = 0.0
    for (path, _line, fn), (_cc, nc, tt, _ct, _callers) in st.stats.items():
        total += tt
        low = fn.lower()
        if "epoll" in low or "method 'select'" in low or "method 'poll'" in low:
            g = "idle: waiting in epoll (the daemon's turn)"
        elif fn == "msgpack_unpackb":
            g = "msgpack decode (unpackb of every frame received)"
        elif fn in ("msgpack_pack", "__init__") and path == "<string>":
            g = "msgpack encode (Packer.pack of every request)"
        elif path == "<string>":
            g = "the profiling driver"
        elif "sidebus" in path and "bench" not in path:
            g = "client code (sidebus: framing, requests, routing, handlers, acks)"
        elif "bench" in path:
            g = "the bench's own code"
        elif "_socket" in fn or "'send'" in fn or "'recv'" in fn or "sendmsg" in low:
            g = "socket send/recv system calls"
        elif "asyncio" in path or "_asyncio" in fn or "_contextvars" in fn or "weakref" in path or "selectors" in path:
            g = "asyncio event loop and machinery (tasks, futures, callbacks, handles)"
        else:
            g = "builtins and the rest (dict, list, len, bytes joins, ...)"
        groups[g] = groups.get(g, 0.0) + tt
        calls[g] = calls.get(g, 0) + nc
    split = [{"where": g, "seconds": round(t, 3), "share": round(t / total, 4), "us_per_event": round(t / count * 1e6, 1),
              "calls": calls[g]} for g, t in sorted(groups.items(), key=lambda kv: -kv[1])]
    top = []
    for (path, line, fn), (_cc, nc, tt, _ct, _callers) in sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:15]:
        top.append({"function": f"{os.path.basename(path)}:{line}({fn})" if path != "~" else fn, "calls": nc,
                    "tottime_s": round(tt, 3)})
    return {"total_s": round(total, 3), "split": split, "top": top}


# msgpack's cost per event measured directly, without a profiler (timeit, in the client's venv):
# the frames one bench event makes the client decode (a deliver, the publish's ok, the ack's ok)
# and encode (the publish, the ack), shaped as the bench's and the daemon's.
MSGPACK_TIMEIT = r"""
import json, timeit, msgpack
pad = "x" * 200
eid = "01a232ac-eb07-7277-a714-f034b4673519"
deliver = msgpack.packb({"op": "deliver", "sub": 1, "tag": 1234, "attempt": 1, "event": {
    "specversion": "1.0", "id": eid, "type": "bench.py.0123456789", "source": "bench-producer",
    "time": "2026-12-01T17:35:22.887563Z", "correlationid": eid, "data": {"n": 1234, "pad": pad}}})
ok_publish = msgpack.packb({"op": "ok", "id": 1234, "event_id": eid, "status": "spooled"})
ok_ack = msgpack.packb({"op": "ok", "id": 1235})
publish = {"op": "publish", "id": 1234, "type": "bench.py.0123456789", "data": {"n": 1234, "pad": pad}, "durability": "local"}
ack = {"op": "ack", "id": 1235, "tag": 1234}
packer = msgpack.Packer(use_bin_type=True)
unpack = lambda b: msgpack.unpackb(b, raw=False, strict_map_key=False)
n = 100000
t = lambda f: min(timeit.repeat(f, number=n, repeat=3)) / n * 1e6
decode = t(lambda: unpack(deliver)) + t(lambda: unpack(ok_publish)) + t(lambda: unpack(ok_ack))
encode = t(lambda: packer.pack(publish)) + t(lambda: packer.pack(ack))
print(json.dumps({"decode_us_per_event": round(decode, 2), "encode_us_per_event": round(encode, 2)}))
"""


# ---- the report ----

def fmt(n):
    return f"{n:,.0f}"


def table(results, clients):
    rust = results.get("rust")
    rows = ["| client | publish/s | publish vs Rust | consume/s | consume vs Rust | client CPU µs/event | daemon cores | publish/s of each run |",
            "|---|---:|---:|---:|---:|---:|---:|---|"]
    for c in clients:
        r = results[c]
        pr = f"{r['publish_per_s'] / rust['publish_per_s']:.2f}" if rust else ""
        cr = f"{r['consume_per_s'] / rust['consume_per_s']:.2f}" if rust else ""
        runs = ", ".join(fmt(x["publish_per_s"]) for x in r["runs"])
        rows.append(f"| {c} | {fmt(r['publish_per_s'])} | {pr} | {fmt(r['consume_per_s'])} | {cr} | "
                    f"{r['client_cpu_us_per_event']:.1f} | {r['daemon_cores']:.2f} | {runs} |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=50000, help="events per bench run (default 50,000)")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each client, interleaved (default 3)")
    ap.add_argument("--client", action="append", choices=ORDER, help="a client to bench (default: all; rust is "
                                                                        "always run, as the reference)")
    ap.add_argument("--warmup", type=int, default=10000, help="events of one Rust run before the rounds, not counted (0: none)")
    ap.add_argument("--daemon", default=os.path.join(ROOT, "target", "release", "sidebus"), help="the sidebus binary")
    ap.add_argument("--out", default=os.path.join(HERE, "results-clients.json"), help="where to write every figure")
    ap.add_argument("--no-profile", action="store_true", help="skip the profiled Python run")
    ap.add_argument("--profile-count", type=int, default=20000, help="events of the profiled Python run (default 20,000)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, data, the profile)")
    ap.add_argument("--also", action="append", default=[], metavar="LABEL=COMMAND",
                    help="one more bench in the rounds, e.g. a client's build before a change: "
                         "'typescript-before=node /tmp/old/bench/bench.mjs' (run right after the client its label "
                         "starts with; it gets --socket and --count like the others)")
    args = ap.parse_args()
    if args.count <= 0 or args.rounds <= 0:
        sys.exit("--count and --rounds must be positive")
    clients = [c for c in ORDER if c == "rust" or not args.client or c in args.client]
    for extra in args.also:
        label, sep, command = extra.partition("=")
        if not sep or not label or not command.strip() or label in BENCHES:
            sys.exit(f"--also {extra!r}: expected a new LABEL=COMMAND")
        cmd = shlex.split(command)
        BENCHES[label] = {"cmd": cmd, "needs": [c for c in cmd if os.path.isabs(c)], "build": f"(given by --also {label})",
                          "sources": [], "reports_as": label.split("-")[0]}
        base = [i for i, c in enumerate(clients) if label.startswith(c + "-")]
        clients.insert(base[-1] + 1 if base else len(clients), label)
    if not os.path.exists(args.daemon):
        sys.exit(f"no daemon binary at {args.daemon}: build it with `cargo build --release -p sidebus`")
    builds, warnings = check_benches(clients)
    builds["daemon"] = {"file": os.path.relpath(os.path.abspath(args.daemon), ROOT), "modified": mtime_utc(args.daemon)}
    daemon_sources = [os.path.join(ROOT, "src"), os.path.join(ROOT, "protocol", "src"), os.path.join(ROOT, "Cargo.lock")]
    if newest_mtime(daemon_sources, ".rs") > os.path.getmtime(args.daemon):
        warnings.append(f"the daemon {builds['daemon']['file']} (built {builds['daemon']['modified']}) is older than "
                        "src/ or protocol/src; rebuild with: cargo build --release -p sidebus")
    for w in warnings:
        log(f"warning: {w}")

    # SIGTERM and SIGHUP end the run through the finally blocks, so the servers stop.
    def interrupted(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)

    command = "python3 " + " ".join([os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)] + sys.argv[1:])
    started_at = datetime.datetime.now(datetime.timezone.utc)
    commit = version_of(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"])
    dirty = bool(subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True).stdout.strip())
    mach = machine()
    mach["load_before"] = loadavg()
    log(f"machine: {mach['nproc']} CPUs ({mach['cpu_model']}), {mach['mem_gib']} GiB, Linux {mach['kernel']}, "
        f"load {mach['load_before']}")

    workdir = tempfile.mkdtemp(prefix="sidebus-bench-clients-")
    if conf.is_root():
        os.chmod(workdir, 0o755)
    runs = []
    profile = None
    pg = redis = daemon = None
    failed = None
    try:
        pg = conf.Postgres(workdir)
        redis = conf.Redis(workdir)
        ns = f"bc{secrets.token_hex(4)}"
        daemon = conf.Daemon(args.daemon, workdir, "sidebus", {
            "database-url": pg.url(f"bench_clients_{ns}"), "redis-url": redis.url(), "namespace": ns,
            "node": "bench-clients", "log-level": "warn"})
        log(f"daemon {args.daemon} on {daemon.socket} (Redis {redis.url()}, Postgres port {pg.port})")
        if args.warmup > 0:
            r = run_bench("rust", daemon.socket, args.warmup, daemon)
            log(f"warm-up  rust        {fmt(r['publish_per_s']):>9} publish/s {fmt(r['consume_per_s']):>9} consume/s")
        for rnd in range(1, args.rounds + 1):
            for c in clients:
                r = run_bench(c, daemon.socket, args.count, daemon)
                r["round"] = rnd
                runs.append(r)
                log(f"round {rnd}  {c:<10} {fmt(r['publish_per_s']):>9} publish/s {fmt(r['consume_per_s']):>9} consume/s  "
                    f"client {r['client_cpu_us_per_event']:5.1f} µs/event  daemon {r['daemon_cores']:.2f} cores  "
                    f"load {r['load_after'][0]}")
        if "python" in clients and not args.no_profile:
            prof_path = os.path.join(workdir, "python-bench.prof")
            r = run_bench("python", daemon.socket, args.profile_count, daemon, extra=["--profile", prof_path],
                          cmd=[PY, "-c", PROFILE_DRIVER, BENCHES["python"]["cmd"][1],
                               os.path.join(ROOT, "clients", "python", "src")])
            profile = python_time_split(prof_path, args.profile_count)
            profile.update({
                "command": f"clients/python/.venv/bin/python clients/python/bench/bench.py --socket SOCKET "
                           f"--count {args.profile_count} --profile FILE",
                "count": args.profile_count, "publish_per_s_profiled": r["publish_per_s"],
                "consume_per_s_profiled": r["consume_per_s"],
            })
            direct = subprocess.run([PY, "-c", MSGPACK_TIMEIT], capture_output=True, text=True, timeout=300)
            if direct.returncode == 0:
                profile["msgpack_direct"] = json.loads(direct.stdout.strip().splitlines()[-1])
            log(f"profiled python run ({args.profile_count} events): {fmt(r['publish_per_s'])} publish/s "
                f"(profiling slows it), own time by place:")
            for s in profile["split"]:
                log(f"  {100 * s['share']:5.1f} %  {s['seconds']:7.2f} s  {s['us_per_event']:6.1f} µs/event  {s['where']}")
    except (RuntimeError, KeyboardInterrupt) as e:
        failed = e
    finally:
        for part in (daemon, redis, pg):
            if part is not None:
                try:
                    part.stop()
                except Exception as e:  # stopping the rest matters more
                    log(f"stopping {type(part).__name__}: {e}")
        if failed is not None and daemon is not None:
            try:
                with open(daemon.log, errors="replace") as f:
                    tail = f.read()[-3000:]
                if tail.strip():
                    log(f"---- the daemon's log (last lines) ----\n{tail}")
            except OSError:
                pass
        if args.keep or failed is not None:
            log(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if failed is not None:
        log(f"bench FAILED: {failed}")
        sys.exit(1)
    mach["load_after"] = loadavg()

    results = {}
    for c in clients:
        rs = [r for r in runs if r["client"] == c]
        results[c] = {
            "publish_per_s": round(statistics.median(r["publish_per_s"] for r in rs)),
            "consume_per_s": round(statistics.median(r["consume_per_s"] for r in rs)),
            "client_cpu_us_per_event": statistics.median(r["client_cpu_us_per_event"] for r in rs),
            "daemon_cores": statistics.median(r["daemon_cores"] for r in rs),
            "runs": [{k: r[k] for k in ("round", "publish_per_s", "consume_per_s", "client_cpu_us_per_event",
                                          "daemon_cores", "wall_s", "load_before", "load_after")} for r in rs],
        }
    rust = results["rust"]
    for c in clients:
        results[c]["publish_vs_rust"] = round(results[c]["publish_per_s"] / rust["publish_per_s"], 3)
        results[c]["consume_vs_rust"] = round(results[c]["consume_per_s"] / rust["consume_per_s"], 3)
    if profile and "python" in results:
        # msgpack's own time is C code, which the profiler does not slow down: set against what
        # the client costs per event without the profiler, it is a fair share.
        mp = sum(x["us_per_event"] for x in profile["split"] if x["where"].startswith("msgpack"))
        profile["msgpack_us_per_event"] = round(mp, 1)
        profile["client_cpu_us_per_event_unprofiled"] = results["python"]["client_cpu_us_per_event"]
    verdicts = {}
    for c in ("typescript", "go"):
        if c in results:
            ratio = results[c]["publish_vs_rust"]
            verdicts[c] = {"publish_vs_rust": ratio, "within_2x": ratio >= 0.5}

    doc = {
        "command": command,
        "started_utc": started_at.strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit + (" (with uncommitted changes)" if dirty else "") if commit else None,
        "count": args.count,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "order": clients,
        "machine": mach,
        "toolchains": toolchains(clients),
        "builds": builds,
        "warnings": warnings,
        "servers": "private redis-server (no persistence) and PostgreSQL (fsync off, as in the conformance suite), "
                   "one release daemon with default settings (spool fsynced), all on this machine",
        "results": results,
        "within_2x_of_rust_publish": verdicts,
        "python_profile": profile,
        "runs": [{k: v for k, v in r.items() if k != "stderr"} for r in runs],
    }
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")

    m = mach
    print(f"Run of {doc['started_utc']}, commit {doc['commit']}, `{command}`: {args.count:,} events per run, "
          f"median of {args.rounds} interleaved runs.\n")
    print(f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['mem_gib']} GiB, Linux {m['kernel']}; "
          f"load average {m['load_before'][0]} before, {m['load_after'][0]} after.\n")
    for w in warnings:
        print(f"Warning: {w}.\n")
    print(table(results, clients))
    print()
    for c, v in verdicts.items():
        print(f"- {c}: publish {v['publish_vs_rust']:.2f} of Rust's: "
              f"{'within 2x' if v['within_2x'] else 'NOT within 2x'}")
    if profile:
        print(f"\nPython, profiled ({profile['count']:,} events, {fmt(profile['publish_per_s_profiled'])} publish/s under "
              f"cProfile), own time by place:\n")
        for s in profile["split"]:
            print(f"- {100 * s['share']:.1f} % ({s['us_per_event']:.1f} µs/event) {s['where']}")
        if "msgpack_us_per_event" in profile:
            print(f"\nmsgpack (encode and decode) under the profiler: {profile['msgpack_us_per_event']:.1f} µs per "
                  f"event, of the {profile['client_cpu_us_per_event_unprofiled']:.1f} µs of CPU the Python client "
                  f"uses per event unprofiled (median of the rounds).")
        if "msgpack_direct" in profile:
            d = profile["msgpack_direct"]
            print(f"msgpack measured alone (timeit, the frames of one event): decode {d['decode_us_per_event']:.1f} µs, "
                  f"encode {d['encode_us_per_event']:.1f} µs per event.")
    log(f"wrote {os.path.relpath(args.out, os.getcwd())}")


if __name__ == "__main__":
    main()
