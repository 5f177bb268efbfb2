#!/usr/bin/env bash
# Runs every fuzz target of fuzz/ for SECS seconds each (default 60), starting from its committed
# corpus (fuzz/corpus/<target>, read only: what a run finds goes to target/fuzz-corpus/), with
# libFuzzer's checks: a panic, a run over 10 s, or more than 2 GiB of memory is a failure, and
# the input that caused it is kept under fuzz/artifacts/<target>/. cargo-fuzz is installed when
# missing; it runs on the stable toolchain through RUSTC_BOOTSTRAP=1, without a sanitizer (the
# code has no unsafe: a panic, a hang or a huge allocation is what there is to find).
#
#   scripts/fuzz.sh                  # every target, 60 s each
#   SECS=3600 scripts/fuzz.sh frame  # one target for an hour
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${SECS:-60}"
targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=(frame request data_json spool)

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "==> installing cargo-fuzz"
  cargo install cargo-fuzz --locked --quiet
fi

export RUSTC_BOOTSTRAP=1
echo "==> building the fuzz targets"
cargo fuzz build -s none
for t in "${targets[@]}"; do
  work="target/fuzz-corpus/$t"
  mkdir -p "$work"
  rm -rf "fuzz/artifacts/$t"
  echo "==> fuzz $t for ${secs}s"
  # -jobs 1: the machine's cores are shared; the summary line is libFuzzer's own.
  cargo fuzz run -s none "$t" "$work" "fuzz/corpus/$t" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=2048 -print_final_stats=1 2>&1 |
    grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|Done|==|SUMMARY|INFO: Running with)|panicked|crash-|timeout-|oom-' || true
  # grep hides libFuzzer's exit status: an artifact is the sign of a finding.
  if compgen -G "fuzz/artifacts/$t/*" >/dev/null; then
    echo "fuzz: $t found an input that fails: $(ls fuzz/artifacts/"$t")" >&2
    exit 1
  fi
done
echo "fuzz: every target ran ${secs}s without a finding"
