#!/usr/bin/env bash
# Run the GPU tests (and optionally the smoke benchmark) on the lent device machine.
# Wheels for what its image lacks are carried in .whl/ (see README, "GPU tests").
#   bash tests/gpu/run_on_device.sh tests        # pytest tests/gpu
#   bash tests/gpu/run_on_device.sh smoke        # benchmarks/gpu_smoke.py
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ ! -d /tmp/site/diffusers ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 QWENDOCTOR_CACHE=/tmp/qwendoctor-cache
out="${OUT:-/tmp/out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.sm,clocks.max.sm --format=csv | tee "$out/nvidia-smi.txt"
case "${1:-tests}" in
  tests) python3 -m pytest tests/gpu -v -s -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.log" ;;
  smoke) python3 benchmarks/gpu_smoke.py --out "$out/gpu_smoke_h100.json" "${@:2}" 2>&1 | tee "$out/gpu-smoke.log" ;;
  check) python3 -c "from qwendoctor.cli import main; main()" check -v 2>&1 | tee "$out/check.txt" ;;
  doctor) python3 benchmarks/check_h100.py --out "$out" 2>&1 | tee "$out/check-bench.log" ;;
esac
