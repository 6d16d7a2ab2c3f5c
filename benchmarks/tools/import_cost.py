"""What the quick check tier's worker processes pay before they run a kernel: the import chains, timed.

    python3 benchmarks/tools/import_cost.py OUT_DIR [--repeats 3]

Each chain is a fresh interpreter running `import ...` (wall clock of the whole process, so interpreter start
and library loading count), first alone and one after another, then all chains at once as `check` starts its
workers, which shows what they cost each other. `python -X importtime` of each chain names the modules that
take the time. Writes OUT_DIR/import_cost.json and OUT_DIR/importtime_<chain>.txt; prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CHAINS = {
    "python": "pass",
    "torch": "import torch",
    "torch_cuda": "import torch; torch.empty(1, device='cuda'); torch.cuda.current_blas_handle()",
    "dynamo": "import torch; import torch._dynamo",
    "triton": "import torch; import triton",
    "diffusers_dispatch": "import torch; import diffusers.models.attention_dispatch",
    "inductor": "import torch; import torch._inductor.compile_fx",
    "torchao": "import torch; import torchao.quantization",
    "fa4": "import torch; import flash_attn.cute",
}


def timed(code: str) -> float:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        return float("nan")
    return seconds


def top_modules(code: str, path: str, n: int = 25) -> list[tuple[str, float]]:
    """The modules with the largest cumulative import time (microseconds -> seconds), from -X importtime."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True)
    with open(path, "w") as fh:
        fh.write(proc.stderr)
    rows = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative_us, name = line.removeprefix("import time:").split("|", 2)
        try:
            rows.append((name.rstrip(), int(cumulative_us) / 1e6))
        except ValueError:
            continue
    rows.sort(key=lambda row: -row[1])
    return [(name, round(seconds, 3)) for name, seconds in rows[:n]]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)

    alone = {name: [] for name in CHAINS}
    for _ in range(args.repeats):
        for name, code in CHAINS.items():
            alone[name].append(round(timed(code), 3))

    together = {name: [] for name in CHAINS if name not in ("python", "torch")}
    for _ in range(args.repeats):
        started = time.perf_counter()
        procs = {name: subprocess.Popen([sys.executable, "-c", CHAINS[name] + "; import time, sys; "
                                        "sys.stdout.write(str(time.perf_counter()))"],
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                 for name in together}
        for name, proc in procs.items():
            proc.wait()
            together[name].append(round(time.perf_counter() - started, 3) if proc.returncode == 0 else float("nan"))

    importtime = {name: top_modules(code, os.path.join(args.out, f"importtime_{name}.txt"))
                  for name, code in CHAINS.items() if name not in ("python", "torch_cuda")}
    result = {"python": sys.version.split()[0], "cpus": os.cpu_count(), "alone_s": alone,
              "together_s": together, "importtime_top": importtime}
    with open(os.path.join(args.out, "import_cost.json"), "w") as fh:
        json.dump(result, fh, indent=2)

    print(f"# import chains, wall seconds of a fresh interpreter (median of {args.repeats}); {os.cpu_count()} CPUs")
    print(f"{'chain':<20} {'alone':>8} {'together':>9}")
    for name in CHAINS:
        both = together.get(name)
        print(f"{name:<20} {statistics.median(alone[name]):>8.2f} "
              f"{statistics.median(both) if both else float('nan'):>9.2f}")
    for name, rows in importtime.items():
        print(f"## {name}: " + ", ".join(f"{module} {seconds:.2f}" for module, seconds in rows[:8]))


if __name__ == "__main__":
    main()
