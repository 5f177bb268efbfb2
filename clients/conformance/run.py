#!/usr/bin/env python3
"""The conformance orchestrator: starts a private Redis, PostgreSQL and sidebus daemons, drives
each client's runner through scenarios.json over JSON lines, and checks what the runner
observed against the scenarios' expectations. See README.md next to this file.

Only the Python standard library is used, so it runs before any client's dependencies exist.
"""

import argparse
import base64
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

# How each client's runner is started (from the repository root). scripts/test.sh builds and
# installs what they need first.
RUNNERS = {
    "rust": [os.path.join(ROOT, "target", "debug", "examples", "conformance")],
    "typescript": ["node", os.path.join(ROOT, "clients", "typescript", "conformance", "runner.mjs")],
    "python": [os.path.join(ROOT, "clients", "python", ".venv", "bin", "python"),
               os.path.join(ROOT, "clients", "python", "conformance", "runner.py")],
    "go": [os.path.join(ROOT, "clients", "go", "bin", "conformance")],
}

INSTALL_HINT = "install them with: apt-get install -y redis-server postgresql"
SCENARIO_TIMEOUT = 180


def log(msg):
    print(msg, flush=True)


def find_binary(name):
    path = shutil.which(name)
    if path:
        return path
    base = "/usr/lib/postgresql"
    if os.path.isdir(base):
        for version in sorted(os.listdir(base), reverse=True):
            candidate = os.path.join(base, version, "bin", name)
            if os.path.exists(candidate):
                return candidate
    sys.exit(f"`{name}` is not installed; the conformance suite starts its own servers; {INSTALL_HINT}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what, check, timeout, proc=None, logfile=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.05)
    text = ""
    if logfile and os.path.exists(logfile):
        with open(logfile, errors="replace") as f:
            text = f.read()[-4000:]
    raise RuntimeError(f"{what} did not become ready; its log:\n{text}")


def is_root():
    return os.geteuid() == 0


def as_postgres(cmd):
    if is_root():
        return ["setpriv", "--reuid", "postgres", "--regid", "postgres", "--init-groups"] + cmd
    return cmd


class Postgres:
    def __init__(self, workdir):
        self.dir = os.path.join(workdir, "pg")
        os.makedirs(self.dir)
        if is_root():
            subprocess.run(["chown", "-R", "postgres:postgres", self.dir], check=True)
        subprocess.run(as_postgres([find_binary("initdb"), "-D", os.path.join(self.dir, "data"), "-U", "postgres",
                                    "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions"]),
                       check=True, stdout=subprocess.DEVNULL)
        self.port = free_port()
        self.log = os.path.join(self.dir, "postgres.log")
        out = open(self.log, "w")
        if is_root():
            subprocess.run(["chown", "postgres:postgres", self.log], check=True)
        self.proc = subprocess.Popen(as_postgres([
            find_binary("postgres"), "-D", os.path.join(self.dir, "data"), "-k", self.dir, "-p", str(self.port),
            "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
            "-c", "full_page_writes=off", "-c", "max_connections=200"]), stdout=subprocess.DEVNULL, stderr=out)

        def ready():
            with open(self.log, errors="replace") as f:
                return "ready to accept connections" in f.read()
        wait_until("postgres", ready, 30, self.proc, self.log)

    def url(self, database):
        return f"postgres://postgres@127.0.0.1:{self.port}/{database}"

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Redis:
    def __init__(self, workdir):
        self.port = free_port()
        self.dir = os.path.join(workdir, f"redis-{self.port}")
        os.makedirs(self.dir)
        self.log = os.path.join(self.dir, "redis.log")
        self.proc = subprocess.Popen([find_binary("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no", "--dir", self.dir, "--logfile", self.log],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def ready():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    return s.recv(7) == b"+PONG\r\n"
            except OSError:
                return False
        wait_until("redis-server", ready, 10, self.proc, self.log)

    def url(self):
        return f"redis://127.0.0.1:{self.port}"

    def stop(self):
        self.proc.kill()
        self.proc.wait()


class Daemon:
    """A sidebus daemon; `restart` stops it with SIGTERM and starts it again with the same flags."""

    def __init__(self, binary, workdir, name, flags):
        self.binary = binary
        self.socket = os.path.join(workdir, f"{name}.sock")
        self.log = os.path.join(workdir, f"{name}.log")
        self.args = [binary, "run", "--socket", self.socket, "--data-dir", os.path.join(workdir, f"{name}-data")]
        for k, v in flags.items():
            self.args += [f"--{k}", str(v)]
        self.start()

    def start(self):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIDEBUS_")}
        out = open(self.log, "a")
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=out, env=env)

        def ready():
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(self.socket)
                    return True
            except OSError:
                return False
        wait_until("the sidebus daemon", ready, 60, self.proc, self.log)

    def restart(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.start()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---- values and expectations ----

def normalize(v):
    """{"$int": "123"} becomes 123; everything else is kept (a {"$bin"} stays as it is)."""
    if isinstance(v, dict):
        if set(v) == {"$int"}:
            return int(v["$int"])
        return {k: normalize(x) for k, x in v.items()}
    if isinstance(v, list):
        return [normalize(x) for x in v]
    return v


_MISSING = object()


def resolve(observed, path):
    cur = observed
    for part in path.split("."):
        if part == "#":
            return len(cur) if isinstance(cur, list) else _MISSING
        if isinstance(cur, list):
            try:
                cur = cur[int(part)]
            except (ValueError, IndexError):
                return _MISSING
        elif isinstance(cur, dict):
            if part not in cur:
                return _MISSING
            cur = cur[part]
        else:
            return _MISSING
    return cur


def same(a, b):
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def matches(value, pattern, observed):
    if isinstance(pattern, dict):
        if "$present" in pattern:
            return value is not _MISSING
        if "$contains" in pattern:
            return isinstance(value, str) and pattern["$contains"] in value
        if "$ref" in pattern:
            return value is not _MISSING and same(value, resolve(observed, pattern["$ref"]))
        if "$bin" in pattern:
            return isinstance(value, dict) and value.get("$bin") is not None and \
                base64.b64decode(value["$bin"]) == base64.b64decode(pattern["$bin"])
        if not isinstance(value, dict):
            return False
        return all(matches(value.get(k, _MISSING), p, observed) for k, p in pattern.items())
    if isinstance(pattern, list):
        return isinstance(value, list) and len(value) == len(pattern) and \
            all(matches(v, p, observed) for v, p in zip(value, pattern))
    return value is not _MISSING and same(value, pattern)


def ids_of(observed, spec):
    paths = spec if isinstance(spec, list) else [spec]
    out = []
    for p in paths:
        v = resolve(observed, p)
        if v is _MISSING or v is None:
            raise AssertionError(f"{p} is missing")
        out.extend(v if isinstance(v, list) else [v])
    return out


def deliveries(observed, subs):
    names = subs if isinstance(subs, list) else [subs]
    out = []
    for n in names:
        sub = observed.get("subs", {}).get(n)
        if sub is None:
            raise AssertionError(f"no subscription {n} was observed")
        out.extend(sub.get("deliveries", []))
    return out


def check(observed, e):
    """Raises AssertionError saying what failed."""
    if "path" in e:
        v = resolve(observed, e["path"])
        if "eq" in e and not matches(v, e["eq"], observed):
            raise AssertionError(f"{e['path']} is {short(v)}, expected {short(e['eq'])}")
        if "min" in e and (not isinstance(v, (int, float)) or v < e["min"]):
            raise AssertionError(f"{e['path']} is {short(v)}, expected at least {e['min']}")
        if "max" in e and (not isinstance(v, (int, float)) or v > e["max"]):
            raise AssertionError(f"{e['path']} is {short(v)}, expected at most {e['max']}")
        if "matches" in e and not matches(v, e["matches"], observed):
            raise AssertionError(f"{e['path']} is {short(v)}, expected to match {short(e['matches'])}")
        if "any" in e and not (isinstance(v, list) and any(matches(x, e["any"], observed) for x in v)):
            raise AssertionError(f"no element of {e['path']} matches {short(e['any'])}; it is {short(v)}")
        return
    if "every_delivered" in e:
        got = {d["event"].get("id") for d in deliveries(observed, e["every_delivered"])}
        missing = [i for i in ids_of(observed, e["ids"]) if i not in got]
        if missing:
            raise AssertionError(f"{len(missing)} ids never delivered, e.g. {missing[:3]}")
        return
    if "delivered_once" in e:
        ds = deliveries(observed, e["delivered_once"])
        want = ids_of(observed, e["ids"])
        seen = {}
        for d in ds:
            seen.setdefault(d["event"].get("id"), []).append(d.get("attempt"))
        missing = [i for i in want if i not in seen]
        extra = [i for i in seen if i not in set(want)]
        twice = {i: a for i, a in seen.items() if a != [1]}
        if missing or extra or twice:
            raise AssertionError(f"delivered_once: {len(missing)} missing {missing[:3]}, {len(extra)} unexpected {extra[:3]}, "
                                 f"{len(twice)} not exactly once at attempt 1 {list(twice.items())[:3]}")
        return
    if "at_most_extra" in e:
        ds = deliveries(observed, e["at_most_extra"])
        want = ids_of(observed, e["ids"])
        got = [d["event"].get("id") for d in ds]
        missing = [i for i in want if i not in set(got)]
        if missing:
            raise AssertionError(f"{len(missing)} ids never delivered, e.g. {missing[:3]}")
        extra = len(got) - len(set(got))
        if extra > e["n"]:
            raise AssertionError(f"{extra} repeated deliveries, at most {e['n']} allowed")
        return
    if "attempts" in e:
        [event_id] = ids_of(observed, e["id"])
        got = [d.get("attempt") for d in deliveries(observed, e["attempts"]) if d["event"].get("id") == event_id]
        if got != e["eq"]:
            raise AssertionError(f"attempts of {event_id}: {got}, expected {e['eq']}")
        return
    raise AssertionError(f"unknown expectation {e}")


def short(v, n=300):
    if v is _MISSING:
        return "missing"
    s = json.dumps(v, default=str)
    return s if len(s) <= n else s[:n] + "…"


def substitute(v, token):
    if isinstance(v, str):
        return v.replace("${run}", token)
    if isinstance(v, list):
        return [substitute(x, token) for x in v]
    if isinstance(v, dict):
        return {k: substitute(x, token) for k, x in v.items()}
    return v


# ---- one client ----

def run_client(client, scenarios, pg, binary, workdir, verbose):
    cmd = RUNNERS[client]
    missing = [c for c in cmd if os.path.isabs(c) and not os.path.exists(c)] or ([] if shutil.which(cmd[0]) else [cmd[0]])
    if missing:
        raise RuntimeError(f"the {client} runner needs {missing[0]}, which is missing: run ./scripts/test.sh, which builds it")
    cdir = os.path.join(workdir, client)
    os.makedirs(cdir)
    redis = Redis(cdir)
    ns = f"c{secrets.token_hex(4)}"
    common = {"database-url": pg.url(f"conf_{client}_{ns}"), "namespace": ns, "backoff-initial-ms": 100,
              "backoff-max-ms": 1000, "shutdown-grace-ms": 5000, "log-level": "sidebus=debug,info"}
    main = Daemon(binary, cdir, "main", dict(common, **{"redis-url": redis.url(), "node": f"{client}-main"}))
    degraded = Daemon(binary, cdir, "degraded", dict(common, **{
        "redis-url": f"redis://127.0.0.1:{free_port()}", "node": f"{client}-degraded",
        "spool-max-bytes": 1048576, "publish-timeout-ms": 1000}))
    env = dict(os.environ, SIDEBUS_SOCKET=main.socket, SIDEBUS_DEGRADED_SOCKET=degraded.socket)
    stderr_path = os.path.join(cdir, "runner.stderr")
    stderr = open(stderr_path, "w")
    runner = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, env=env,
                              text=True, bufsize=1, cwd=ROOT)
    failures = []
    try:
        for sc in scenarios:
            token = f"{client[:2]}{secrets.token_hex(3)}"
            steps = substitute(sc["steps"], token)
            expect = normalize(substitute(sc.get("expect", []), token))
            started = time.monotonic()
            runner.stdin.write(json.dumps({"scenario": sc["name"], "steps": steps}) + "\n")
            runner.stdin.flush()
            result = None
            while result is None:
                line = runner.stdout.readline()
                if not line:
                    raise RuntimeError(f"the {client} runner exited during {sc['name']}; its stderr:\n"
                                       + open(stderr_path, errors="replace").read()[-4000:])
                msg = json.loads(line)
                if msg.get("control") == "restart_daemon":
                    main.restart()
                    runner.stdin.write(json.dumps({"control": "done"}) + "\n")
                    runner.stdin.flush()
                elif msg.get("scenario") == sc["name"]:
                    result = msg
                if time.monotonic() - started > SCENARIO_TIMEOUT:
                    raise RuntimeError(f"{sc['name']} took longer than {SCENARIO_TIMEOUT} s")
            took = time.monotonic() - started
            if "error" in result:
                failures.append((sc["name"], f"the runner could not run it: {result['error']}"))
                log(f"FAIL {client:<10} {sc['name']} ({took:.1f} s): the runner could not run it: {result['error']}")
                continue
            observed = normalize(result.get("observed", {}))
            problems = []
            for e in expect:
                try:
                    check(observed, e)
                except AssertionError as err:
                    problems.append(str(err))
            if problems:
                failures.append((sc["name"], "; ".join(problems)))
                log(f"FAIL {client:<10} {sc['name']} ({took:.1f} s)")
                for p in problems:
                    log(f"     {p}")
                if verbose:
                    log("     observed: " + short(observed, 4000))
            else:
                log(f"ok   {client:<10} {sc['name']} ({took:.1f} s)")
        runner.stdin.close()
        try:
            code = runner.wait(30)
        except subprocess.TimeoutExpired:
            runner.kill()
            code = "killed after 30 s"
        if code != 0:
            failures.append(("(exit)", f"the runner exited with {code}"))
            log(f"FAIL {client:<10} the runner exited with {code}")
    finally:
        if runner.poll() is None:
            runner.kill()
        main.stop()
        degraded.stop()
        redis.stop()
    if failures:
        log(f"---- {client}: the runner's stderr ({stderr_path}) ----")
        log(open(stderr_path, errors="replace").read()[-6000:])
        log(f"---- {client}: the main daemon's log (last lines) ----")
        log(open(main.log, errors="replace").read()[-6000:])
    return failures


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--client", action="append", choices=sorted(RUNNERS), help="a client to check (default: all)")
    ap.add_argument("--scenario", action="append", help="only these scenarios")
    ap.add_argument("--daemon", default=os.path.join(ROOT, "target", "debug", "sidebus"), help="the sidebus binary")
    ap.add_argument("--verbose", action="store_true", help="print what was observed when a scenario fails")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, data)")
    args = ap.parse_args()
    if not os.path.exists(args.daemon):
        sys.exit(f"no daemon binary at {args.daemon}: build it with `cargo build` or pass --daemon")
    with open(os.path.join(HERE, "scenarios.json")) as f:
        scenarios = json.load(f)["scenarios"]
    if args.scenario:
        unknown = set(args.scenario) - {s["name"] for s in scenarios}
        if unknown:
            sys.exit(f"unknown scenarios: {sorted(unknown)}")
        scenarios = [s for s in scenarios if s["name"] in args.scenario]
    clients = args.client or sorted(RUNNERS)
    workdir = tempfile.mkdtemp(prefix="sidebus-conformance-")
    if is_root():
        os.chmod(workdir, 0o755)
    pg = Postgres(workdir)
    total = {}
    try:
        for c in clients:
            started = time.monotonic()
            try:
                total[c] = run_client(c, scenarios, pg, args.daemon, workdir, args.verbose)
            except RuntimeError as e:
                total[c] = [("(setup)", str(e))]
                log(f"FAIL {c:<10} {e}")
            setup_failed = any(f[0] == "(setup)" for f in total[c])
            passed = 0 if setup_failed else len(scenarios) - len([f for f in total[c] if not f[0].startswith("(")])
            log(f"---- {c}: {passed}/{len(scenarios)} scenarios passed in {time.monotonic() - started:.0f} s")
    finally:
        pg.stop()
        if args.keep:
            log(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    failed = {c: f for c, f in total.items() if f}
    if failed:
        log("conformance FAILED: " + ", ".join(f"{c} ({len(f)})" for c, f in failed.items()))
        sys.exit(1)
    log("conformance passed: " + ", ".join(clients))


if __name__ == "__main__":
    main()
