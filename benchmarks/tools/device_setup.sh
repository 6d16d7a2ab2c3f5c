# shellcheck shell=bash
# Sourced by the device scripts (bench_h100.sh, tune_h100.sh in benchmarks/tools/) from the repo root: the lent
# machine has no package index, so the wheels travel with the call. .whl/ (diffusers, optuna, torchao, ...) and
# .mpl/ (matplotlib) install into /tmp/site; flash-attn-4 comes as .fa4/ plus its 92 MB cu13 libs wheel split in
# .fa4a/ and .fa4b/ (one call carries at most 64 MiB): the first part waits in /tmp/fa4w for the call that brings
# the second. Sets PYTHONPATH and $out ($OUT, else /tmp/out); writes $out/fa4-install.log and
# $out/nvidia-smi.txt.
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 QWENDOCTOR_CACHE=/tmp/qwendoctor-cache
out="${OUT:-/tmp/out}"
mkdir -p "$out" /tmp/fa4w
if [ -d .whl ] && [ ! -d /tmp/site/diffusers ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
fi
if [ -d .mpl ] && [ ! -d /tmp/site/matplotlib ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .mpl/*.whl
fi
if [ -d .fa4a ]; then cp .fa4a/cu13.part.aa /tmp/fa4w/; fi
if [ -d .fa4b ] && ! python3 -c "import flash_attn.cute" 2>/dev/null; then
  cat /tmp/fa4w/cu13.part.aa .fa4b/cu13.part.ab \
    > /tmp/fa4w/nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
  rm /tmp/fa4w/cu13.part.aa
  cp .fa4/*.whl /tmp/fa4w/
  ./install_flash_attention.sh --which fa4 --wheelhouse /tmp/fa4w > "$out/fa4-install.log" 2>&1 \
    || tail -5 "$out/fa4-install.log"
fi
# The machine's image sets PYTHONDONTWRITEBYTECODE=1 and ships no .pyc files: without this every process (each
# torchrun rank, each check worker) compiles torch's source again, 2-7 s (benchmarks/check/README.md, the
# `bytecode` probe). Once per machine, ~9 s.
if [ ! -e /tmp/.qwendoctor-bytecode ]; then
  python3 -m compileall -q -j 0 "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    /tmp/site > /dev/null 2>&1 || true
  touch /tmp/.qwendoctor-bytecode
fi
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.sm,clocks.max.sm --format=csv | tee "$out/nvidia-smi.txt"
