"""Issue 29 on tiny, measured end to end: `qwendoctor tune --task edit` on tiny's edit model, then the locked profile
on held-out edits (through `qwendoctor.load_pipeline`, as a user's code runs it) beside the default profile.

    OMP_NUM_THREADS=1 python benchmarks/tiny/edit_tune.py --out benchmarks/tiny [--trials 16] [--edits 50]

(a) tune, as a user runs it (the CLI, its built-in prompts: the instructions of tiny's stand-in input): the locked
    profile, its confirmed speed-up and the study's trials;
(b) the first `--edits` of `edit_data.held_out_edits(0)` (edits of scenes no training saw), each input rendered with
    the seeds benchmarks/tiny/edit.py uses (no training used them), edited through the lock's pipeline and
    through the same pipeline with the default profile (the reference steps and CFG), each judged by
    `edit_data.edit_check`; the median seconds per edit of each and their ratio, in this process.
Seconds are wall time on whatever else the machine ran: the JSON records the thread count.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from edit import BENCH_SEED, SIZE  # noqa: E402
from measure import cpu_name  # noqa: E402

VERDICTS = ("pass", "made", "kept", "copied")


def run_tune(out: Path, trials: int, extra: list[str]) -> dict:
    work = Path(tempfile.mkdtemp())
    argv = [sys.executable, "-m", "qwendoctor", "tune", "--model", "tiny", "--task", "edit", "--trials", str(trials),
            "--lock", str(out / "edit.lock"), "--storage", f"sqlite:///{work / 'study.db'}", "--json", *extra]
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise SystemExit(f"tune failed ({done.returncode}): {done.stderr[-2000:]}")
    result = json.loads(done.stdout)
    return {"command": " ".join(["qwendoctor", *argv[3:]]).replace(str(work), "$TMP"),
            "seconds": round(time.perf_counter() - started, 1), "profile": result["profile"],
            "measured": result["measured"], "trials": [
                {key: row.get(key) for key in ("number", "profile", "state", "latency_s", "psnr_db")}
                for row in result["trials"]],
            "log_tail": done.stderr[-3000:]}


def edit_all(pipeline, edits, sources: list[Path], first: int) -> tuple[list[dict], float]:
    from qwendoctor.tiny import edit_data

    pipeline(edits[0].instruction, seed=0, image=sources[0])  # warm-up
    verdicts, seconds = [], []
    for index, (edit, source) in enumerate(zip(edits, sources), start=first):
        started = time.perf_counter()
        output = np.asarray(pipeline(edit.instruction, seed=index, image=source))
        seconds.append(time.perf_counter() - started)
        verdicts.append({"kind": edit.kind, **edit_data.edit_check(np.asarray(Image.open(source)), edit.target,
                                                                   output, edit.instruction)})
    return verdicts, float(np.median(seconds))


def rates(verdicts: list[dict]) -> dict:
    from qwendoctor.tiny import edit_data

    def share(key, subset):
        return round(float(np.mean([row[key] for row in subset])), 4) if subset else None

    return {**{key: share(key, verdicts) for key in VERDICTS},
            "by_kind": {kind: {key: share(key, [row for row in verdicts if row["kind"] == kind])
                               for key in ("pass", "made", "kept")} for kind in edit_data.KINDS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--edits", type=int, default=50)
    parser.add_argument("--first", type=int, default=0, help="start at this held-out edit (as benchmarks/tiny/edit.py)")
    parser.add_argument("--tune-arg", action="append", default=[], help="passed on to tune (repeatable)")
    parser.add_argument("--reuse-lock", action="store_true",
                        help="judge --out's edit.lock again instead of tuning (writes edit_tune-FIRST-EDITS.json)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from qwendoctor import load_pipeline
    from qwendoctor.generate import load_tuned
    from qwendoctor.profile import Profile
    from qwendoctor.tiny import edit_data

    document = {"date": datetime.date.today().isoformat(), "machine": {
        "cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__}}
    if args.reuse_lock:
        document["tune"] = "benchmarks/tiny/edit_tune.json's (its edit.lock, judged again here)"
    else:
        tuned = run_tune(args.out, args.trials, args.tune_arg)
        document["tune"] = tuned
        print(f"tune: {tuned['profile']}; confirmed {tuned['measured'].get('confirmed_speedup')}", flush=True)

    edits = edit_data.held_out_edits(0)[args.first:args.first + args.edits]
    inputs_dir = Path(tempfile.mkdtemp())
    sources = []
    for index, edit in enumerate(edits, start=args.first):
        source, _ = edit_data.render_pair(edit, [BENCH_SEED, index], SIZE)
        sources.append(inputs_dir / f"{index}.png")
        Image.fromarray(source).save(sources[-1])
    lock = str(args.out / "edit.lock")
    locked = load_pipeline(lock)
    locked_verdicts, locked_s = edit_all(locked, edits, sources, args.first)
    del locked
    reference = load_tuned(lock, profile=Profile())
    reference_verdicts, reference_s = edit_all(reference, edits, sources, args.first)
    workload = reference.workload
    document["held_out"] = {
        "edits": len(edits), "first": args.first,
        "seeds": "the edit's index (inputs: [1000, index], as benchmarks/tiny/edit.py)",
        "default_profile": {"steps": workload.reference_steps, "true_cfg_scale": workload.true_cfg_scale,
                            **rates(reference_verdicts), "seconds_per_edit_median": round(reference_s, 4)},
        "locked_profile": {"profile": reference.lock.profile.describe(), **rates(locked_verdicts),
                           "seconds_per_edit_median": round(locked_s, 4),
                           "wall_ratio": round(reference_s / locked_s, 3)}}
    print(json.dumps(document["held_out"], indent=1), flush=True)
    name = f"edit_tune-{args.first}-{args.edits}.json" if args.reuse_lock else "edit_tune.json"
    (args.out / name).write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
