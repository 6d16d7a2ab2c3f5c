"""Issue 27 on tiny, measured end to end: `qwendoctor tune --distilled tiny:distilled` (does the search pick the
adapter where it meets the floor, and at what confirmed speed-up against the base default), the locked profile's
checker pass rate on held-out prompts no tune image used, and whether the frame style LoRA's effect survives
fusion and each lossless lever.

    python benchmarks/tiny/distilled_tune.py --out benchmarks/tiny [--trials 16] [--prompts 50] [--style-prompts 20]

(a) tune, as a user runs it (the CLI, its default prompts and seeds), with the distilled adapter offered; its
    JSON: the locked profile, the confirmed speed-up and what it is against;
(b) the lock through `qwendoctor.load_pipeline` on `--prompts` held-out prompts (after the first 10, which tune's
    study and held-out check draw from; seed = the prompt's index): the checker's pass (colours and position),
    beside the base reference's (50 steps, true CFG 4.0) on the same prompts and seeds;
(c) the frame style LoRA at 50 steps, true CFG 4.0, unfused, fused, and fused with each lossless lever this
    machine can run: how often `shapes.style_present` reads the frame, and the checker's pass inside the frame.
Seconds are wall time on whatever else the machine ran: the JSON records the thread count; ratios are of runs in
this process.
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
from measure import cpu_name, to_uint8  # noqa: E402

STUDY_PROMPTS = 10  # tune's study and held-out check take theirs from the front of the same list
LOSSLESS_WITH_STYLE = (  # each lossless lever that runs on the CPU, on top of the fused LoRA
    ("fused", "lora_mode=fused"),
    ("fused + fused q/k/v", "lora_mode=fused,fused_qkv=true"),
    ("fused + CFG batching", "lora_mode=fused,cfg_batching=true"),
    ("fused + math attention", "lora_mode=fused,attention_backend=_native_math"),
    ("fused + all three", "lora_mode=fused,fused_qkv=true,cfg_batching=true,attention_backend=_native_math"),
)


def run_tune(out: Path, trials: int) -> dict:
    work = Path(tempfile.mkdtemp())
    argv = [sys.executable, "-m", "qwendoctor", "tune", "--model", "tiny", "--distilled", "tiny:distilled",
            "--trials", str(trials), "--floor", "fast", "--lock", str(out / "distilled.lock"),
            "--storage", f"sqlite:///{work / 'study.db'}", "--json"]
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise SystemExit(f"tune failed ({done.returncode}): {done.stderr[-2000:]}")
    result = json.loads(done.stdout)
    return {"command": " ".join(["qwendoctor", *argv[3:]]), "seconds": time.perf_counter() - started,
            "profile": result["profile"], "measured": result["measured"], "speedup_against": result["speedup_against"],
            "trials": [{key: row.get(key) for key in ("number", "profile", "state", "latency_s", "psnr_db")}
                       for row in result["trials"]],
            "log_tail": done.stderr[-3000:]}


def checker(images, prompts, style=None) -> float:
    from qwendoctor.tiny import shapes

    return float(np.mean([shapes.check(to_uint8(image), prompt, style)["pass"]
                          for image, prompt in zip(images, prompts)]))


def style_rate(images) -> float:
    from qwendoctor.tiny import shapes

    return float(np.mean([shapes.style_present(to_uint8(image)) for image in images]))


def render_profile(workload, profile, prompts) -> tuple[list, float]:
    from qwendoctor import runner
    from qwendoctor.capabilities import detect_capabilities

    model = runner.build(workload, profile, detect_capabilities())
    runner.render(model, workload, profile, prompts[0], 0)  # warm-up
    images, seconds = [], []
    for seed, prompt in enumerate(prompts):
        started = time.perf_counter()
        images.append(runner.render(model, workload, profile, prompt, seed))
        seconds.append(time.perf_counter() - started)
    return images, float(np.median(seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--style-prompts", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from qwendoctor import load_pipeline
    from qwendoctor.levers import lora
    from qwendoctor.profile import Profile, Workload
    from qwendoctor.prompts import default_prompts

    document = {"date": datetime.date.today().isoformat(), "machine": {"cpu": cpu_name(), "cores": os.cpu_count(),
                "torch_threads": torch.get_num_threads(), "torch": torch.__version__}}
    tuned = run_tune(args.out, args.trials)
    document["tune"] = tuned
    print(f"tune: {tuned['profile']}; speed-up {tuned['measured']['speedup']:.2f}x against the "
          f"{tuned['speedup_against']}", flush=True)

    prompts = default_prompts("tiny")[STUDY_PROMPTS:STUDY_PROMPTS + args.prompts]
    tuned_pipeline = load_pipeline(str(args.out / "distilled.lock"))
    base_workload = Workload(model="tiny", width=128, height=128, dtype="float32")
    references, reference_s = render_profile(base_workload, Profile(), prompts)
    tuned_images, tuned_s = render_profile(tuned_pipeline.workload, tuned_pipeline.profile, prompts)
    document["held_out"] = {
        "prompts": len(prompts), "seeds": "the prompt's index",
        "base_reference": {"steps": 50, "true_cfg_scale": 4.0, "checker_pass": checker(references, prompts),
                           "seconds_per_image_median": reference_s},
        "locked_profile": {"profile": tuned_pipeline.profile.describe(), "checker_pass": checker(tuned_images, prompts),
                           "seconds_per_image_median": tuned_s, "wall_ratio": reference_s / tuned_s}}
    print(f"held out: {document['held_out']}", flush=True)

    style_prompts = prompts[:args.style_prompts]
    frame = lora.parse_spec("tiny:frame", "tiny")
    styled = Workload(model="tiny", width=128, height=128, dtype="float32", loras=(frame,)).validate()
    rows = {}
    for label, text in (("unfused", ""),) + LOSSLESS_WITH_STYLE:
        images, seconds = render_profile(styled, Profile.from_text(text) if text else Profile(), style_prompts)
        rows[label] = {"profile": text or "(default)", "style_present": style_rate(images),
                       "checker_pass_inside_frame": checker(images, style_prompts, "frame"),
                       "seconds_per_image_median": seconds}
        print(f"frame style, {label}: {rows[label]}", flush=True)
    document["style"] = {"prompts": len(style_prompts), "without_lora_style_present": style_rate(
        references[:args.style_prompts]), "rows": rows}
    (args.out / "distilled_tune.json").write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {args.out / 'distilled_tune.json'}")


if __name__ == "__main__":
    main()
