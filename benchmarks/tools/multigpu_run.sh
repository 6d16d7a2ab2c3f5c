#!/usr/bin/env bash
# Multi-GPU generation at W1 (issue 7) on a device machine with 2 or 4 GPUs: the tuned one-GPU profile against
# each strategy that uses all visible GPUs (cfg, ulysses, ring; cfg+ulysses and cfg+ring on 4), with the same
# levers; ms/step, speedup, PSNR against the one-GPU image. Runs in the repository root; diffusers/torchao
# wheels are expected in /tmp/site. Results: $OUT/multigpu.json and .md (the table is printed last).
#   bash benchmarks/tools/multigpu_run.sh [PROFILE] [multigpu_bench.py options, e.g. --timed-steps 4 --strategies cfg]
# PROFILE defaults to attention_backend=_native_cudnn,compile=regional,cfg_batching=true.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 QWENDOCTOR_CACHE=/tmp/qwendoctor-cache
# A collective that waits this long fails the row instead of eating the device budget.
export QWENDOCTOR_DIST_TIMEOUT_S="${QWENDOCTOR_DIST_TIMEOUT_S:-240}"
out="${OUT:-/tmp/out}"
mkdir -p "$out"
profile="${1:-attention_backend=_native_cudnn,compile=regional,cfg_batching=true}"
shift || true
{
  nvidia-smi --query-gpu=index,name,driver_version,power.limit,clocks.max.sm --format=csv
  nvidia-smi topo -m
} > "$out/nvidia-smi.txt" 2>&1 || true
python3 -m qwendoctor check --only gpu --only topology -v > "$out/check-topology.txt" 2>&1 || true
grep -E "topology|gpu" "$out/check-topology.txt" | head -4 || true
# SIGINT at the limit: multigpu_bench.py writes the rows that finished and prints their table. QWENDOCTOR_DEBUG=1: a
# failed row's rank output (tracebacks) lands in bench.log.
QWENDOCTOR_DEBUG=1 timeout -s INT "${BENCH_SECONDS:-470}" \
  python3 benchmarks/tools/multigpu_bench.py --profile "$profile" --out "$out" "$@" 2>&1 | tee "$out/bench.log"
