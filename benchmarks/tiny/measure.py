"""Measure the trained tiny model: does it draw its prompts, where do step-count floors bite, what does it cost.

    OMP_NUM_THREADS=1 python benchmarks/tiny/measure.py [--out benchmarks/tiny] [--weights DIR]

(a) adherence: 50 held-out prompts at the default 50 steps and true CFG 4.0, judged by `shapes.check`;
(b) fidelity: PSNR and SSIM (qwendoctor.quality.compare, torchmetrics) of 4..40-step renders against the 50-step
    render of the same prompt and seed, so one can see where floors such as PSNR >= 30 dB or SSIM >= 0.95 bite;
(c) cost: CPU seconds per true-CFG 128x128 image on one thread.
Writes results.json and grid.png (held-out prompts, their renders) into --out and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from qwendoctor.models import quiet_libraries  # noqa: E402
from qwendoctor.quality import compare  # noqa: E402
from qwendoctor.tiny import shapes  # noqa: E402
from qwendoctor.tiny.trained import WEIGHT_FILES, load_trained_tiny, read_config, revision, shipped_dir  # noqa: E402

SIZE = 128
STEPS = 50
TRUE_CFG = 4.0
FEW_STEPS = (4, 6, 8, 10, 15, 20, 30, 40)
ATTRIBUTES = ("background", "colour", "position", "size", "shape", "pass", "all")


def render(pipe, prompt: str, seed: int, steps: int) -> np.ndarray:
    """One image as the product renders it: HxWx3 floats in [0, 1]."""
    return pipe(prompt=prompt, negative_prompt=" ", width=SIZE, height=SIZE, num_inference_steps=steps,
                true_cfg_scale=TRUE_CFG, generator=torch.Generator().manual_seed(seed), output_type="np").images[0]


def to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def timed_render(pipe, prompt: str, seed: int, steps: int) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    image = render(pipe, prompt, seed, steps)
    return image, time.perf_counter() - start


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def held_out_prompts(count: int, split_seed: int) -> list[str]:
    return shapes.held_out_prompts(split_seed)[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--weights", type=Path, default=None, help="a train.py output dir (default: the shipped one)")
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--fidelity-prompts", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    quiet_libraries()

    weights_dir = args.weights or shipped_dir()
    config = read_config(weights_dir)
    pipe = load_trained_tiny("cpu", "float32", args.weights)
    prompts = held_out_prompts(args.prompts, config["training"]["seed"])
    render(pipe, prompts[0], 0, 2)  # warm-up: first-call allocations are not the model's cost

    verdicts, references, seconds = [], [], []
    for seed, prompt in enumerate(prompts):
        image, elapsed = timed_render(pipe, prompt, seed, STEPS)
        references.append(image)
        seconds.append(elapsed)
        verdicts.append(shapes.check(to_uint8(image), prompt))
        print(f"{seed:2d} {'PASS' if verdicts[-1]['pass'] else 'fail'} {elapsed:.2f}s {prompt}", flush=True)
    adherence = {key: float(np.mean([verdict[key] for verdict in verdicts])) for key in ATTRIBUTES}
    failures = [{"prompt": prompt, "seed": seed, **{k: bool(v) for k, v in verdict.items()}}
                for seed, (prompt, verdict) in enumerate(zip(prompts, verdicts)) if not verdict["pass"]]

    fidelity, step_seconds = {}, {}
    for steps in FEW_STEPS:
        images, costs = [], []
        for seed, prompt in enumerate(prompts[:args.fidelity_prompts]):
            image, elapsed = timed_render(pipe, prompt, seed, steps)
            images.append(image)
            costs.append(elapsed)
        fidelity[steps] = compare(images, references[:args.fidelity_prompts])
        fidelity[steps]["checker_pass"] = float(np.mean([shapes.check(to_uint8(image), prompt)["pass"]
                                                         for image, prompt in zip(images, prompts)]))
        step_seconds[steps] = statistics.median(costs)
        print(f"{steps:2d} steps: {fidelity[steps]}", flush=True)

    columns = 4
    tiles = [to_uint8(image) for image in references[:2 * columns]]
    grid = np.concatenate([np.concatenate(tiles[row * columns:(row + 1) * columns], 1) for row in range(2)], 0)
    # 128 colours keep the flat shapes as they are and the file a few tens of KB
    Image.fromarray(grid).quantize(colors=128, dither=Image.Dither.NONE).save(args.out / "grid.png", optimize=True)
    (args.out / "grid_prompts.txt").write_text("".join(f"{prompt}\n" for prompt in prompts[:2 * columns]))

    results = {
        "date": datetime.date.today().isoformat(),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "model": {"revision": revision(args.weights), "training": config["training"],
                  "transformer_blocks": len(pipe.transformer.transformer_blocks),
                  "weight_bytes": sum((weights_dir / name).stat().st_size for name in WEIGHT_FILES)},
        "workload": {"size": SIZE, "steps": STEPS, "true_cfg_scale": TRUE_CFG, "negative_prompt": " "},
        "adherence": {"prompts": len(prompts), **adherence, "failures": failures},
        "fidelity_vs_50_steps": {"prompts": args.fidelity_prompts, **{str(k): v for k, v in fidelity.items()}},
        "seconds_per_image": {"trained_50_steps_median": statistics.median(seconds),
                              **{f"trained_{k}_steps_median": v for k, v in step_seconds.items()}},
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")

    print(f"\nadherence over {len(prompts)} held-out prompts: " +
          ", ".join(f"{key} {value:.0%}" for key, value in adherence.items()))
    print("\n| steps | PSNR mean (dB) | PSNR worst | SSIM mean | SSIM worst | checker pass | s/image |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for steps in FEW_STEPS:
        row = fidelity[steps]
        print(f"| {steps} | {row['psnr_db']:.1f} | {row['psnr_db_min']:.1f} | {row['ssim']:.3f} | "
              f"{row['ssim_min']:.3f} | {row['checker_pass']:.0%} | {step_seconds[steps]:.2f} |")
    print(f"\n50-step true-CFG image: {statistics.median(seconds):.2f} s on one thread")


if __name__ == "__main__":
    main()
