#!/usr/bin/env bash
# The quick check tier before and after the fix the `bytecode` probe prints, on the device machine. Run from
# the repo root:
#
#     OUT=<dir> bash benchmarks/tools/check_h100_bytecode.sh
#
# 1. `check` as the machine comes (its image sets PYTHONDONTWRITEBYTECODE=1 and ships no .pyc files):
#    CHECK_RUNS_BEFORE (default quick_warm_1,quick_warm_2) into $OUT/before/.
# 2. The bytecode finding's `fix`, run as printed and timed: $OUT/fix.txt.
# 3. `check` again: CHECK_RUNS_AFTER (default quick_cold,quick_warm_1,quick_warm_2,bench) into $OUT/after/.
# Each step writes what benchmarks/tools/check_h100_quick.sh writes (timing.txt, timing.json, check-runs.tgz).
set -euo pipefail

: "${OUT:?set OUT to an output directory}"
here="$(cd "$(dirname "$0")" && pwd)"
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"

CHECK_RUNS="${CHECK_RUNS_BEFORE:-quick_warm_1,quick_warm_2}" OUT="$OUT/before" bash "$here/check_h100_quick.sh"

fix="$(python3 -m qwendoctor check --only bytecode --json | python3 -c '
import json, sys
finding = json.load(sys.stdin)["findings"][0]
print(finding["fix"] or "")
print(finding["summary"], file=sys.stderr)')"
{
  echo "PYTHONDONTWRITEBYTECODE=${PYTHONDONTWRITEBYTECODE:-}"
  echo "fix: ${fix:-none}"
  if [ -n "$fix" ]; then
    started=$(date +%s.%N)
    bash -c "$fix"
    echo "fix took $(python3 -c "import time; print(round(time.time() - $started, 1))") s"
  fi
  python3 -m qwendoctor check --only bytecode
} > "$OUT/fix.txt" 2>&1 || true
cat "$OUT/fix.txt"

CHECK_RUNS="${CHECK_RUNS_AFTER:-quick_cold,quick_warm_1,quick_warm_2,bench}" OUT="$OUT/after" bash "$here/check_h100_quick.sh"
