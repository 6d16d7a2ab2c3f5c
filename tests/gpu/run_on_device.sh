#!/usr/bin/env bash
# Run the GPU tests (and optionally the smoke benchmark) on the lent device machine.
# Wheels for what its image lacks are carried in .whl/ (see README, "GPU tests").
#   bash tests/gpu/run_on_device.sh tests tests/gpu      # pytest tests/gpu (or some of its files)
#   bash tests/gpu/run_on_device.sh smoke        # benchmarks/tools/gpu_smoke.py
#   bash tests/gpu/run_on_device.sh memory ROWS.json [ARGS]   # benchmarks/tools/memory_bench.py
#   bash tests/gpu/run_on_device.sh cli NAME ARGS...   # qwendoctor ARGS, its output in $OUT/NAME.log
#   bash tests/gpu/run_on_device.sh owed [--seconds 540]   # benchmarks/tools/gpu_owed.py: what is owed, by value
#   bash tests/gpu/run_on_device.sh py SECONDS SCRIPT ARGS...   # one script under a time limit, e.g. --out $OUT/x
#   bash tests/gpu/run_on_device.sh sage2 DIR   # build SageAttention 2 from checkout DIR into the machine's python
#                                               # (carry DIR, e.g. `git archive` of thu-ml/SageAttention in .src/)
set -euo pipefail
cd "$(dirname "$0")/../.."
# What the machine lacks, and the version diffusers 0.42.1 requires of safetensors (>= 0.8); not huggingface_hub,
# whose 1.x there is what its transformers needs; not the rest: a carried copy of a package it already has (numpy,
# requests) would shadow the version its torch and transformers were installed with.
# Checked wheel by wheel, not once per machine: a warm machine keeps /tmp/site from an earlier call, and a wheel
# carried since (peft and what it imports, for the LoRA rows) must still go in.
carried_here() {  # an earlier call installed this distribution into /tmp/site
  local want="${1,,}" info
  for info in /tmp/site/*.dist-info; do
    info=${info##*/}
    [[ "${info,,}" == "$want"-* ]] && return 0
  done
  return 1
}
mkdir -p /tmp/site
missing=()
for wheel in .whl/*.whl; do
  [ -e "$wheel" ] || continue
  name=${wheel##*/}; dist=${name%%-*}
  if carried_here "$dist" || grep -qxF "$name" /tmp/site/.on-the-machine 2>/dev/null; then continue; fi
  case "$dist" in
    diffusers|optuna|torchao|safetensors) missing+=("$wheel"); continue ;;
  esac
  if python3 -m pip show -q "$dist" >/dev/null 2>&1; then
    echo "$name" >> /tmp/site/.on-the-machine  # the machine's own copy: not checked again
  else
    missing+=("$wheel")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${#missing[@]} carried wheel(s): ${missing[*]##*/}"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "${missing[@]}"
fi
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 QWENDOCTOR_CACHE=/tmp/qwendoctor-cache
out="${OUT:-/tmp/out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.sm,clocks.max.sm --format=csv | tee "$out/nvidia-smi.txt"
case "${1:-tests}" in
  tests) python3 -m pytest -v -s -p no:cacheprovider "${@:2}" 2>&1 | tee "$out/gpu-tests.log" ;;
  smoke) python3 benchmarks/tools/gpu_smoke.py --out "$out/gpu_smoke_h100.json" "${@:2}" 2>&1 | tee "$out/gpu-smoke.log" ;;
  check) python3 -c "from qwendoctor.cli import main; main()" check -v 2>&1 | tee "$out/check.txt" ;;
  memory) python3 benchmarks/tools/memory_bench.py --out "$out" --rows "${@:2}" 2>&1 | tee "$out/memory-bench.log" ;;
  cli) python3 -m qwendoctor "${@:3}" 2>&1 | tee "$out/$2.log" ;;
  doctor) python3 benchmarks/tools/check_h100.py --out "$out" 2>&1 | tee "$out/check-bench.log" ;;
  owed) python3 benchmarks/tools/gpu_owed.py --out "$out" "${@:2}" 2>&1 | tee "$out/gpu-owed.log" ;;
  # A script that writes its results under $OUT itself, row by row: what landed comes back even when the call's
  # time runs out mid-script (the owed runner packs a task's results only once the task ends).
  py) timeout "$2" python3 "${@:3}" 2>&1 | tee -a "$out/py.log" ;;
  sage2) PATH="/tmp/site/bin:$PATH" bash install_flash_attention.sh --which sage2 --source "$2" 2>&1 \
           | tee "$out/sage2-install.log" ;;
esac
