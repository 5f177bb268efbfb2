#!/usr/bin/env bash
# Checks the deployment files offline (no cluster runs here, and systemd is not PID 1):
# - deploy/kubernetes/: kustomization.yaml lists every YAML file of the directory, and each is
#   validated by PyPI's kubernetes-validate, strictly (an unknown field fails; so does a kind
#   without a schema), against Kubernetes 1.29, the oldest with native sidecars. Then what a
#   schema cannot say: the sidecar is native and probed with `sidebus health --socket-only`,
#   the spool is on a per-pod claim, the security context and resources, the grace period.
# - systemd/: sidebus.sysusers makes the user and group in an empty root; `systemd-analyze
#   verify` has nothing to say about sidebus.service (run with ExecStart pointed at the built
#   binary, which it requires to exist); `systemd-analyze security` rates it below 3.0 and
#   README.md states that figure.
# - Every SIDEBUS_* variable these files and the Dockerfile set, and every key of their
#   sidebus.toml, is one `sidebus run` knows; the Dockerfile's dependency layer copies every
#   workspace member's manifest.
# The validator is installed into a virtual environment under target/check-deploy/. SIDEBUS_BIN
# may name a built sidebus; otherwise this builds target/debug/sidebus.
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_VERSION=1.29.0
VALIDATOR_VERSION=1.37.0
MAX_EXPOSURE_TENTHS=29 # fail at 3.0 and above
WORK=target/check-deploy
mkdir -p "$WORK"
fail() {
  echo "check-deploy: $*" >&2
  exit 1
}

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
missing=()
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
/usr/bin/python3 -c 'import ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "==> installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

venv="$WORK/venv"
if [ "$("$venv/bin/kubernetes-validate" --version 2>/dev/null)" != "$VALIDATOR_VERSION" ]; then
  rm -rf "$venv"
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "kubernetes-validate==$VALIDATOR_VERSION"
fi

if [ -z "${SIDEBUS_BIN:-}" ]; then
  cargo build --locked -q --bin sidebus
  SIDEBUS_BIN=target/debug/sidebus
fi
SIDEBUS_BIN="$(realpath "$SIDEBUS_BIN")"
"$SIDEBUS_BIN" run --help >"$WORK/run-help.txt"

echo "==> deploy/kubernetes: kubernetes-validate $VALIDATOR_VERSION --strict, Kubernetes $K8S_VERSION"
# The files kustomization.yaml lists, once it lists every YAML file of the directory.
listed="$("$venv/bin/python" - <<'EOF'
import os, sys, yaml
d = "deploy/kubernetes"
listed = yaml.safe_load(open(f"{d}/kustomization.yaml")).get("resources") or []
present = sorted(f for f in os.listdir(d) if f.endswith((".yaml", ".yml")) and f != "kustomization.yaml")
if sorted(listed) != present:
    sys.exit(f"kustomization.yaml lists {sorted(listed)}, the directory holds {present}")
print("\n".join(f"{d}/{f}" for f in listed))
EOF
)" || fail "deploy/kubernetes/kustomization.yaml does not list every YAML file"
[ -n "$listed" ] || fail "no resources to validate"
mapfile -t resources <<<"$listed"
out="$("$venv/bin/kubernetes-validate" --strict -k "$K8S_VERSION" "${resources[@]}" 2>&1)" || {
  echo "$out" >&2
  fail "a manifest does not validate"
}
echo "$out"
# A kind without a schema is only a warning to the validator; here it fails.
if grep -q '^WARN' <<<"$out"; then fail "kubernetes-validate warned"; fi

echo "==> deploy/kubernetes: the sidecar as README.md describes it; config keys and variables"
"$venv/bin/python" - "$WORK/run-help.txt" "${resources[@]}" <<'EOF'
import re, sys, tomllib, yaml

help_text = open(sys.argv[1]).read()
known_env = set(re.findall(r"\[env: (SIDEBUS_[A-Z0-9_]+)", help_text))
known_keys = {e.removeprefix("SIDEBUS_").lower() for e in known_env} | {"groups", "access"}
if "SIDEBUS_DATABASE_PASSWORD_FILE" not in known_env:
    sys.exit(f"{sys.argv[1]}: no config variables found in `sidebus run --help`")
docs = [d for f in sys.argv[2:] for d in yaml.safe_load_all(open(f)) if d]
problems = []

def check(ok, what):
    if not ok:
        problems.append(what)

def toml_keys(where, text):
    for k in tomllib.loads(text):
        check(k in known_keys, f"{where}: unknown key {k}")

# Variables anywhere the files set them, and the configs' keys.
for path in ["Dockerfile", "systemd/sidebus.service", *sys.argv[2:]]:
    for name in sorted(set(re.findall(r"\bSIDEBUS_[A-Z0-9_]+", open(path).read()))):
        check(name in known_env, f"{path}: {name} is not a variable `sidebus run` reads")
toml_keys("systemd/sidebus.toml", open("systemd/sidebus.toml").read())
config = {}
for d in docs:
    if d["kind"] == "ConfigMap" and "sidebus.toml" in d.get("data", {}):
        toml_keys(f"ConfigMap {d['metadata']['name']}", d["data"]["sidebus.toml"])
        config = tomllib.loads(d["data"]["sidebus.toml"])

sets = [d for d in docs if d["kind"] == "StatefulSet"]
check(len(sets) == 1, "one StatefulSet")
sts = sets[0]
pod = sts["spec"]["template"]["spec"]
sidecars = [c for c in pod.get("initContainers", []) if c["name"] == "sidebus"]
check(len(sidecars) == 1, "an init container named sidebus")
c = sidecars[0]
probe = ["sidebus", "health", "--socket-only"]
check(c.get("restartPolicy") == "Always", "sidebus is a native sidecar (restartPolicy: Always)")
for p in ["startupProbe", "livenessProbe"]:
    check(c.get(p, {}).get("exec", {}).get("command") == probe, f"{p} runs {' '.join(probe)}")
sc = c.get("securityContext", {})
for k, v in {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "readOnlyRootFilesystem": True,
             "allowPrivilegeEscalation": False}.items():
    check(sc.get(k) == v, f"securityContext.{k}: {v}")
check(sc.get("capabilities", {}).get("drop") == ["ALL"], "capabilities drop ALL")
check(sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", "seccompProfile RuntimeDefault")
for k in ["requests", "limits"]:
    r = c.get("resources", {}).get(k, {})
    check({"memory", "ephemeral-storage"} <= set(r), f"resources.{k} has memory and ephemeral-storage")
mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
claims = {t["metadata"]["name"] for t in sts["spec"].get("volumeClaimTemplates", [])}
check(mounts.get("/var/lib/sidebus") in claims, "the spool (the image's data_dir) is on a volumeClaimTemplate")
volumes = {v["name"]: v for v in pod.get("volumes", [])}
socket_volume = mounts.get("/run/sidebus")
check("emptyDir" in volumes.get(socket_volume, {}), "the socket's directory is an emptyDir")
for app in pod["containers"]:
    check(any(m["name"] == socket_volume for m in app.get("volumeMounts", [])), f"{app['name']} mounts the socket")
env = {e["name"]: e.get("value") for e in c.get("env", [])}
for k in ["database_password", "redis_password"]:
    path = env.get(f"SIDEBUS_{k.upper()}_FILE") or ""
    mount = next((m for m in mounts if path.startswith(m + "/")), None)
    check("secret" in volumes.get(mounts.get(mount), {}), f"SIDEBUS_{k.upper()}_FILE is a file of a Secret volume")
grace_ms = int(config.get("shutdown_grace_ms", 10000))
check(pod.get("terminationGracePeriodSeconds", 30) * 1000 > grace_ms, f"terminationGracePeriodSeconds above shutdown_grace_ms ({grace_ms})")

if problems:
    sys.exit("\n".join(f"deploy/kubernetes: not so: {p}" for p in problems))
print("sidecar, probes, spool, socket, secrets, security context, resources, grace period: as described")
EOF

echo "==> Dockerfile: the dependency layer copies every workspace member's manifest"
"$venv/bin/python" - <<'EOF'
import re, sys, tomllib
members = tomllib.load(open("Cargo.toml", "rb"))["workspace"]["members"]
docker = open("Dockerfile").read()
missing = [m for m in members if m != "." and not re.search(rf"^COPY {re.escape(m)}/Cargo\.toml ", docker, re.M)]
if missing:
    sys.exit(f"Dockerfile: no `COPY <member>/Cargo.toml` for {missing}")
print(f"members: {', '.join(members)}")
EOF

echo "==> systemd: sidebus.sysusers, systemd-analyze verify and security ($(systemd-analyze --version | head -1))"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/root/etc/sysusers.d"
cp systemd/sidebus.sysusers "$tmp/root/etc/sysusers.d/sidebus.conf"
# systemd-sysusers reports a bad line and goes on with exit 0: any output but what it made fails.
out="$(systemd-sysusers --root="$tmp/root" 2>&1)" || fail "systemd-sysusers: $out"
out="$(grep -Ev "^Creating (group|user) 'sidebus'" <<<"$out" || true)"
[ -z "$out" ] || fail "systemd-sysusers: $out"
grep -q '^sidebus:' "$tmp/root/etc/passwd" || fail "sidebus.sysusers makes no user sidebus"
grep -q '^sidebus:' "$tmp/root/etc/group" || fail "sidebus.sysusers makes no group sidebus"
for k in User Group; do
  grep -qx "$k=sidebus" systemd/sidebus.service || fail "sidebus.service: $k= is not sidebus (the sysusers.d user)"
done
# verify needs ExecStart's binary to exist; it warns (exit 0) about unknown keys and bad values,
# so any output fails too.
sed "s|^ExecStart=/usr/local/bin/sidebus |ExecStart=$SIDEBUS_BIN |" systemd/sidebus.service >"$tmp/sidebus.service"
grep -q "^ExecStart=$SIDEBUS_BIN " "$tmp/sidebus.service" || fail "sidebus.service: ExecStart is not /usr/local/bin/sidebus …"
out="$(systemd-analyze verify "$tmp/sidebus.service" 2>&1)" || fail "systemd-analyze verify: $out"
[ -z "$out" ] || fail "systemd-analyze verify: $out"
security="$(systemd-analyze security --offline=yes "$tmp/sidebus.service" 2>&1)" || true
figure="$(sed -n 's/.*Overall exposure level for sidebus.service: \([0-9.]*\).*/\1/p' <<<"$security")"
[ -n "$figure" ] || fail "systemd-analyze security gave no exposure level: $security"
echo "sidebus.service: exposure level $figure"
systemd-analyze security --offline=yes --threshold="$MAX_EXPOSURE_TENTHS" "$tmp/sidebus.service" >/dev/null 2>&1 || {
  grep '✗' <<<"$security" >&2
  fail "sidebus.service: exposure $figure is not below 3.0"
}
grep -q "exposure level of $figure\b" README.md || fail "README.md does not state the exposure level $figure"
echo "deploy checks passed"
