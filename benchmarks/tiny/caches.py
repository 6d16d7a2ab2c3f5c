"""Where does the floor bite for caches on a model that draws? The trained tiny model, 50 steps, true CFG 4.0.

    OMP_NUM_THREADS=1 python benchmarks/tiny/caches.py [--out benchmarks/tiny] [--prompts 10]

For each cache (cache-dit's DBCache at several thresholds, with and without TaylorSeer and CFG batching;
diffusers' FirstBlockCache), over held-out prompts the model never trained on: the fraction of steps that reused
cached blocks, PSNR and SSIM against the uncached 50-step render of the same prompt and seed, and whether the
shapes checker still passes (colours and position). Writes caches.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from qwendoctor import levers, models, quality, runner  # noqa: E402
from qwendoctor.profile import Profile, Workload  # noqa: E402
from qwendoctor.tiny import shapes, trained  # noqa: E402

STEPS = 50
PROFILES = [
    Profile(cache="dbcache", cache_threshold=0.05),
    Profile(cache="dbcache", cache_threshold=0.1),
    Profile(cache="dbcache", cache_threshold=0.2),
    Profile(cache="dbcache", cache_threshold=0.3),
    Profile(cache="dbcache", cache_threshold=0.5, cache_warmup=4),
    Profile(cache="dbcache", cache_threshold=1.0, cache_warmup=2),
    Profile(cache="dbcache", cache_threshold=0.3, taylorseer_order=1),
    Profile(cache="dbcache", cache_threshold=0.3, cfg_batching=True),
    Profile(cache="dbcache", cache_threshold=0.3, cache_fn=2, cache_bn=1),
    Profile(cache="first_block", cache_threshold=0.1),
    Profile(cache="first_block", cache_threshold=0.3),
    Profile(steps=10),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--prompts", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    workload = Workload(model="tiny", width=128, height=128, reference_steps=STEPS, dtype="float32").validate()
    model = models.load_model("tiny", "cpu", "float32")
    prompts = shapes.held_out_prompts(trained.read_config()["training"]["seed"])[-args.prompts:]

    def render_all(profile: Profile):
        levers.optimize(model.pipe, profile, workload=workload)
        images, cached, seconds = [], [], []
        for seed, prompt in enumerate(prompts):
            started = time.perf_counter()
            images.append(runner.render(model, workload, profile, prompt, seed))
            seconds.append(time.perf_counter() - started)
            count = levers.cached_steps(model.pipe)
            if count is not None:
                cached.append(count / (profile.steps or STEPS))
        return images, cached, seconds

    references, _, reference_seconds = render_all(Profile())
    rows = [{"profile": "default (no cache)", "s_per_image": statistics.median(reference_seconds),
             "checker_pass": float(np.mean([shapes.check(image, p)["pass"] for image, p in zip(references, prompts)]))}]
    for profile in PROFILES:
        images, cached, seconds = render_all(profile)
        row = {"profile": profile.describe(), **quality.compare(images, references, with_lpips=False),
               "cached_fraction": statistics.mean(cached) if cached else None,
               "s_per_image": statistics.median(seconds),
               "checker_pass": float(np.mean([shapes.check(image, p)["pass"] for image, p in zip(images, prompts)]))}
        rows.append(row)
        print(json.dumps(row), flush=True)
    levers.optimize(model.pipe, Profile(), workload=workload)
    (args.out / "caches.json").write_text(json.dumps(
        {"model_revision": trained.revision(), "workload": workload.to_dict(), "prompts": prompts,
         "torch_threads": 1, "rows": rows}, indent=1) + "\n")
    print("\n| profile | cached | PSNR mean (dB) | PSNR worst | SSIM mean | checker pass | s/image (1 thread) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        cached = "" if row.get("cached_fraction") is None else f"{row['cached_fraction']:.0%}"
        psnr = f"{row['psnr_db']:.1f} | {row['psnr_db_min']:.1f} | {row['ssim']:.3f}" if "psnr_db" in row else "- | - | -"
        print(f"| {row['profile']} | {cached} | {psnr} | {row['checker_pass']:.0%} | {row['s_per_image']:.2f} |")


if __name__ == "__main__":
    main()
