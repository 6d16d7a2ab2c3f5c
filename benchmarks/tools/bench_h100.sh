#!/usr/bin/env bash
# The issue-5 H100 runs on the lent device machine. Its image lacks diffusers/torchao (carried as wheels in
# .whl/) and flash-attn-4 (.fa4/, plus its 92 MB cu13 libs wheel split in .fa4a/ and .fa4b/, because one
# call carries at most 64 MiB). Results go to /tmp/bench (kept while the machine is warm, so --resume can
# finish a ladder a 10-minute call cut short) and are copied to $OUT.
#   bash benchmarks/tools/bench_h100.sh tests   # carry .whl .fa4a: wheels, then the GPU tests of this issue
#   bash benchmarks/tools/bench_h100.sh w1      # carry .fa4 .fa4b: FA4 installed, then the W1 ladder (repeat to resume)
#   bash benchmarks/tools/bench_h100.sh 1024    # default and the W1 tiers' profiles at 1024x1024, full 50-step images
#   bash benchmarks/tools/bench_h100.sh rope    # the W1 tiers' profiles with and without real RoPE (repeat to resume)
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=device_setup.sh
. benchmarks/tools/device_setup.sh  # sets PYTHONPATH and $out, installs the carried wheels
mkdir -p /tmp/bench
case "${1:-tests}" in
  tests)
    python3 -m pytest tests/gpu/test_bench_gpu.py -v -s -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.log" ;;
  w1)
    timeout -s INT "${BENCH_SECONDS:-540}" python3 -c "from qwendoctor.cli import main; main()" bench \
      --model synthetic --timed-steps 6 --out /tmp/bench --resume 2>&1 | tee -a "$out/bench-w1.log" || true ;;
  rope)
    lossless=attention_backend=fa4,compile=regional,cfg_batching=true
    timeout -s INT "${BENCH_SECONDS:-540}" python3 -c "from qwendoctor.cli import main; main()" bench \
      --model synthetic --timed-steps 6 --no-ladder --name bench-synthetic-1328x1328-real-rope \
      --profile "$lossless" --profile "$lossless,real_rope=true" \
      --profile "$lossless,real_rope=true,quantization=fp8_rowwise" --profile "$lossless,quantization=fp8_rowwise" \
      --out /tmp/bench --resume 2>&1 | tee -a "$out/bench-rope.log" || true ;;
  1024)
    profiles=$(python3 - <<'PY'
import json
tiers = json.load(open("/tmp/bench/bench-synthetic-1328x1328.json"))["tiers"]
rows = {r["id"]: r for r in json.load(open("/tmp/bench/bench-synthetic-1328x1328.json"))["rows"]}
for tier in tiers.values():
    if tier and tier["id"] != "default":
        print(",".join(f"{k}={str(v).lower()}" for k, v in rows[tier["id"]]["profile"].items()))
PY
)
    args=()
    while read -r p; do [ -n "$p" ] && args+=(--profile "$p"); done <<< "$profiles"
    timeout -s INT "${BENCH_SECONDS:-560}" python3 -c "from qwendoctor.cli import main; main()" bench \
      --model synthetic --width 1024 --height 1024 --full-image --no-ladder "${args[@]}" --out /tmp/bench \
      --resume 2>&1 | tee -a "$out/bench-1024.log" || true ;;
esac
cp /tmp/bench/*.json /tmp/bench/*.md "$out/" 2>/dev/null || true
