#!/usr/bin/env bash
# The issue-4 H100 run on the lent device machine: a full `qwendoctor tune` at W1 (synthetic, 1328x1328,
# 50 steps, true CFG), 25 trials, in 10-minute calls that resume the same study. The image lacks diffusers,
# optuna and torchao (carried in .whl/), flash-attn-4 (.fa4/, its cu13 libs wheel split in .fa4a/ + .fa4b/)
# and matplotlib (.mpl/). The study, the reference renders and inductor's cache live in /tmp, kept while the
# machine is warm between calls.
#   bash benchmarks/tune/h100.sh tests   # carry .whl .fa4a: wheels, then the GPU tests of this issue
#   bash benchmarks/tune/h100.sh study   # carry .fa4 .fa4b (first) or .mpl (later): the study, resumed
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 QWENDOCTOR_CACHE=/tmp/qwendoctor-cache
out="${OUT:-/tmp/out}"
mkdir -p "$out" /tmp/tune /tmp/fa4w
qd() { python3 -c "from qwendoctor.cli import main; main()" "$@"; }
if [ -d .whl ] && [ ! -d /tmp/site/diffusers ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
fi
if [ -d .mpl ] && [ ! -d /tmp/site/matplotlib ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .mpl/*.whl
fi
[ -d .fa4a ] && cp .fa4a/cu13.part.aa /tmp/fa4w/
if [ -d .fa4b ] && ! python3 -c "import flash_attn.cute" 2>/dev/null; then
  cat /tmp/fa4w/cu13.part.aa .fa4b/cu13.part.ab \
    > /tmp/fa4w/nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
  rm /tmp/fa4w/cu13.part.aa
  cp .fa4/*.whl /tmp/fa4w/
  ./install_flash_attention.sh --which fa4 --wheelhouse /tmp/fa4w > "$out/fa4-install.log" 2>&1 || tail -5 "$out/fa4-install.log"
fi
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.sm,clocks.max.sm --format=csv | tee "$out/nvidia-smi.txt"
case "${1:-tests}" in
  tests)
    python3 -m pytest tests/gpu/test_tune_gpu.py -v -s -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.log" ;;
  study)
    # SIGINT ends the call like Ctrl-C: the running trial is queued again, and the next call resumes the study.
    started=$(date +%s)
    timeout -s INT "${TUNE_SECONDS:-540}" python3 -c "from qwendoctor.cli import main; main()" tune \
      --model synthetic --trials 25 --lock /tmp/tune/qwendoctor.lock --storage sqlite:////tmp/tune/study.db \
      --json > /tmp/tune/tune.json 2> >(tee -a /tmp/tune/tune.log >&2) && status=0 || status=$?
    echo "call: tune exited $status after $(( $(date +%s) - started )) s" | tee -a /tmp/tune/tune.log
    [ "$status" -eq 0 ] && cp /tmp/tune/tune.json "$out/" ;;
esac
cp /tmp/tune/tune.log /tmp/tune/study.db "$out/" 2>/dev/null || true
cp /tmp/tune/qwendoctor.lock /tmp/tune/qwendoctor-tune.png "$out/" 2>/dev/null || true
