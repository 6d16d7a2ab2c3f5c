#!/usr/bin/env bash
# The issue-4 H100 run on the lent device machine: a full `qwendoctor tune` at W1 (synthetic, 1328x1328,
# 50 steps, true CFG), 25 trials, in 10-minute calls that resume the same study. The image lacks diffusers,
# optuna and torchao (carried in .whl/), flash-attn-4 (.fa4/, its cu13 libs wheel split in .fa4a/ + .fa4b/)
# and matplotlib (.mpl/). The study, the reference renders and inductor's cache live in /tmp, kept while the
# machine is warm between calls.
#   bash benchmarks/tools/tune_h100.sh tests   # carry .whl .fa4a: wheels, then the GPU tests of this issue
#   bash benchmarks/tools/tune_h100.sh study   # carry .fa4 .fa4b (first) or .mpl (later): the study, resumed
#   bash benchmarks/tools/tune_h100.sh compile-cost [PROFILES]   # what a regional compile's warm-up spends, by profile
#                                        # (benchmarks/tools/fp8_compile.py; fa4_bf16 needs FA4 installed)
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=device_setup.sh
. benchmarks/tools/device_setup.sh  # sets PYTHONPATH and $out, installs the carried wheels
mkdir -p /tmp/tune
case "${1:-tests}" in
  tests)
    python3 -m pytest tests/gpu/test_tune_gpu.py -v -s -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.log" ;;
  compile-cost)
    TORCH_LOGS=recompiles python3 benchmarks/tools/fp8_compile.py --out "$out/compile-cost.json" \
      --profiles "${2:-bf16,fp8_rowwise}" --blocks "${BLOCKS:-4,8}" 2>&1 | tee "$out/compile-cost.log" ;;
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
# What benchmarks/ keeps of a study: its JSON export (benchmarks/README.md), not the SQLite file.
if [ -f /tmp/tune/study.db ]; then
  python3 benchmarks/tools/study_export.py /tmp/tune/study.db "$out/study.json" || true
fi
cp /tmp/tune/qwendoctor.lock /tmp/tune/qwendoctor-tune.png "$out/" 2>/dev/null || true
