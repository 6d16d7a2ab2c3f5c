#!/usr/bin/env bash
# `qwendoctor check` wall clock on the device machine: the quick tier once cold, three times warm, then
# `--bench` once. Run from the repo root:
#
#     OUT=<dir> bash benchmarks/tools/check_h100_quick.sh
#
# Assumes diffusers/optuna/torchao wheels are installed under /tmp/site (PYTHONPATH=/tmp/site:$PWD) and
# python3 has torch; PYTHON=<interpreter> picks another one (without torch in python3 it tries the checkout's
# .venv; on a CPU box the GPU probes report skip). Writes under $OUT: quick_cold.json, quick_warm_{1,2,3}.json, bench.json (each `check --json`
# as printed; in check-runs.tgz with the traces), trace_*.jsonl (when each worker started, asked for the GPU, got it, and each finding came
# back), timing.json (wall seconds and each probe's elapsed_s per run) and timing.txt (the table, printed
# last). Each run is capped at 300 s; the whole script takes about 2-4 minutes on an H100. CHECK_RUNS=a,b
# runs only those (names as above).
set -euo pipefail

: "${OUT:?set OUT to an output directory}"
mkdir -p "$OUT"
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    # On a development box python3 may have no torch: then the venv of this checkout, or of the checkout
    # this git worktree belongs to.
    if ! python3 -c "import torch" 2>/dev/null; then
        common="$(git rev-parse --path-format=absolute --git-common-dir 2>/dev/null || true)"
        for candidate in .venv/bin/python "${common:+$common/../.venv/bin/python}"; do
            if [ -n "$candidate" ] && [ -x "$candidate" ]; then PYTHON="$candidate"; break; fi
        done
    fi
fi
echo "python: $PYTHON" >&2

"$PYTHON" - "$OUT" <<'EOF'
import json
import os
import platform
import subprocess
import sys
import time

out = sys.argv[1]
CHECK = [sys.executable, "-c", "from qwendoctor.cli import main; main()", "check", "--json"]
RUNS = [("quick_cold", []), ("quick_warm_1", []), ("quick_warm_2", []), ("quick_warm_3", []),
        ("bench", ["--bench"])]
if os.environ.get("CHECK_RUNS"):  # a subset, e.g. CHECK_RUNS=quick_cold,quick_warm_1
    wanted = os.environ["CHECK_RUNS"].split(",")
    RUNS = [run for run in RUNS if run[0] in wanted]


def machine() -> str:
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip() or "no GPU"
    except (OSError, subprocess.TimeoutExpired):
        gpu = "no nvidia-smi"
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:  # no git on the machine
        rev = ""
    return f"{gpu}; {os.cpu_count()} CPUs; Python {platform.python_version()}; commit {rev or '?'}"


results = {"machine": machine(), "runs": {}}
for name, extra in RUNS:
    trace = os.path.join(out, f"trace_{name}.jsonl")
    if os.path.exists(trace):
        os.remove(trace)
    env = dict(os.environ, QWENDOCTOR_CHECK_TRACE=trace)
    started = time.perf_counter()
    try:
        proc = subprocess.run(CHECK + extra, capture_output=True, text=True, timeout=300, env=env)
        wall, code, stdout, stderr = time.perf_counter() - started, proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        wall, code = time.perf_counter() - started, "timeout"
        stdout, stderr = exc.stdout or "", exc.stderr or ""
        stdout, stderr = (s.decode() if isinstance(s, bytes) else s for s in (stdout, stderr))
    with open(os.path.join(out, f"{name}.json"), "w") as fh:
        fh.write(stdout)
    try:
        findings = json.loads(stdout)["findings"]
    except (ValueError, KeyError):
        findings = []
        print(f"{name}: no JSON (exit {code}); stderr tail:\n{stderr[-2000:]}", file=sys.stderr)
    results["runs"][name] = {"wall_s": round(wall, 2), "exit": code,
                             "probes": {f["id"]: [f["status"], f["elapsed_s"]] for f in findings}}
    print(f"{name}: {wall:.1f} s, exit {code}", file=sys.stderr, flush=True)

with open(os.path.join(out, "timing.json"), "w") as fh:
    json.dump(results, fh, indent=2)

names = [name for name, _ in RUNS]
probe_ids = []
for name in names:
    probe_ids += [p for p in results["runs"][name]["probes"] if p not in probe_ids]
width = max([len(p) for p in probe_ids] + [len("wall clock")])
lines = [f"# qwendoctor check on {results['machine']}",
         "# wall clock of the whole command, then each probe's elapsed_s (status when not ok), seconds",
         f"{'':<{width}}  " + "  ".join(f"{n:>14}" for n in names)]


def cell(name, probe_id):
    status, elapsed = results["runs"][name]["probes"].get(probe_id, ["-", None])
    text = "-" if elapsed is None else f"{elapsed:.2f}"
    return text if status in ("ok", "-") else f"{text} {status}"


lines.append(f"{'wall clock':<{width}}  " + "  ".join(
    f"{results['runs'][n]['wall_s']:>14.1f}" for n in names))
lines.append(f"{'exit code':<{width}}  " + "  ".join(f"{str(results['runs'][n]['exit']):>14}" for n in names))
for probe_id in probe_ids:
    lines.append(f"{probe_id:<{width}}  " + "  ".join(f"{cell(n, probe_id):>14}" for n in names))
table = "\n".join(lines)
with open(os.path.join(out, "timing.txt"), "w") as fh:
    fh.write(table + "\n")
print(table)
EOF
# The device returns at most 8 files from a call: the per-run JSON and the traces travel as one archive.
(
  cd "$OUT"
  shopt -s nullglob
  runs=(trace_*.jsonl quick_*.json bench.json)
  runs=("${runs[@]/#/./}")
  existing=()
  for f in "${runs[@]}"; do [ -e "$f" ] && existing+=("$f"); done
  if [ "${#existing[@]}" -gt 0 ]; then tar czf check-runs.tgz "${existing[@]}" && rm -f "${existing[@]}"; fi
)
