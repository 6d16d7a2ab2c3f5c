#!/usr/bin/env python3
"""Does the quick start's confirmed speed-up hold when generate runs, on a machine that is busy?

    python benchmarks/tools/quickstart_busy.py --out benchmarks/cpu [--hogs 1] [--images 5]

Starts `--hogs` CPU-bound processes (a Python loop each), then, in a scratch directory: the quick start's
`qwendoctor tune` (defaults: tiny, 20 trials), then `qwendoctor generate --num-images N --json` with the lock and
with a copy of the lock whose profile is the default, alternately, twice each. Compares the lock's
`confirmed_speedup` (and the study's `speedup`) with the ratio of generate's median seconds per image. Writes
quickstart_busy.json into --out and prints a short table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time


def hog() -> None:
    while True:
        pass


def run(command: list[str], cwd: str) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}): {result.stderr[-2000:]}")
    return time.perf_counter() - started, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--hogs", type=int, default=1)
    parser.add_argument("--images", type=int, default=5)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    hogs = [multiprocessing.Process(target=hog, daemon=True) for _ in range(args.hogs)]
    for process in hogs:
        process.start()
    try:
        with tempfile.TemporaryDirectory() as scratch:
            env_cache = {"QWENDOCTOR_CACHE": os.path.join(scratch, "cache")}
            os.environ.update(env_cache)
            cli = [sys.executable, "-c", "from qwendoctor.cli import main; main()"]
            tune_s, tune_out = run([*cli, "tune", "--json"], scratch)
            tuned = json.loads(tune_out)
            from qwendoctor import lockfile
            from qwendoctor.profile import Profile

            lock = lockfile.read_lock(os.path.join(scratch, "qwendoctor.lock"))
            default_lock = os.path.join(scratch, "default.lock")
            lock.profile = Profile()
            lockfile.write_lock(default_lock, lock)
            seconds = {"tuned": [], "default": []}
            prompt = "a large red circle at the top left on a blue background"
            for round_ in range(2):
                for name, path in (("default", default_lock), ("tuned", "qwendoctor.lock")):
                    _, out = run([*cli, "generate", prompt, "--lock", path, "--num-images", str(args.images),
                                  "--seed", str(100 * round_), "--out", f"out-{name}", "--json"], scratch)
                    seconds[name] += [image["seconds"] for image in json.loads(out)["images"]]
    finally:
        for process in hogs:
            process.terminate()
    generate_ratio = statistics.median(seconds["default"]) / statistics.median(seconds["tuned"])
    confirmed = tuned["measured"].get("confirmed_speedup")
    result = {
        "machine": {"cpus": os.cpu_count(), "hogs": args.hogs},
        "tune_wall_s": tune_s, "profile": tuned["profile"], "study_speedup": tuned["measured"]["speedup"],
        "confirmed_speedup": confirmed, "confirmed_spread": tuned["measured"].get("confirmed_spread"),
        "confirm_rounds": tuned["study"].get("confirm_rounds"),
        "generate_seconds": seconds, "generate_speedup": generate_ratio,
        "confirmed_vs_generate": None if confirmed is None else confirmed / generate_ratio - 1,
    }
    with open(os.path.join(args.out, "quickstart_busy.json"), "w") as handle:
        json.dump(result, handle, indent=1)
    print(f"tune {tune_s:.1f} s with {args.hogs} CPU hog(s) on {os.cpu_count()} CPUs")
    print("| figure | value |\n|---|---|")
    print(f"| study speed-up | {result['study_speedup']:.2f}x |")
    if confirmed is not None:
        print(f"| confirmed speed-up | {confirmed:.2f}x (+/-{result['confirmed_spread']:.0%}, "
              f"{result['confirm_rounds']} rounds) |")
        print(f"| confirmed against generate | {result['confirmed_vs_generate']:+.0%} |")
    print(f"| generate: default / tuned s per image (median of {len(seconds['tuned'])}) | "
          f"{statistics.median(seconds['default']):.3f} / {statistics.median(seconds['tuned']):.3f} = "
          f"{generate_ratio:.2f}x |")


if __name__ == "__main__":
    main()
