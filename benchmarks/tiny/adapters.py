"""Measure tiny's shipped LoRA adapters against the base model on held-out prompts.

    OMP_NUM_THREADS=1 python benchmarks/tiny/adapters.py [--out benchmarks/tiny] [--prompts 50] [--adapters DIR]

On the first `--prompts` held-out prompts (seed = the prompt's index, as benchmarks/tiny/measure.py):
(a) the base reference: 50 steps, true CFG 4.0, tiny's scheduler; the checker's pass, and how often
    `shapes.style_present` (wrongly) sees the frame style on it;
(b) the distilled adapter at each declared step count, CFG off, with its declared scheduler: checker pass, PSNR
    and SSIM against (a), transformer passes and seconds per image against (a); and, for contrast, the base at the
    same step counts with CFG off, and the adapter under tiny's own scheduler (its declaration ignored);
(c) the frame style adapter at the reference setting, unfused and fused (`pipe.fuse_lora`): how often the style
    reads, and the checker's pass inside the frame.
Writes adapters.json into --out and prints markdown tables. Seconds are wall time on whatever else the machine
was running: reported, not promised.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from measure import cpu_name, to_uint8  # noqa: E402

from qwendoctor.models import quiet_libraries  # noqa: E402
from qwendoctor.quality import compare  # noqa: E402
from qwendoctor.tiny import adapters, shapes  # noqa: E402
from qwendoctor.tiny.lora import METADATA_NAME, WEIGHT_NAME, scheduler_for  # noqa: E402
from qwendoctor.tiny.trained import load_trained_tiny, read_config, revision  # noqa: E402

SIZE = 128
REFERENCE_STEPS = 50
REFERENCE_CFG = 4.0


def render_all(pipe, prompts, steps: int, cfg: float) -> tuple[list[np.ndarray], list[float]]:
    images, seconds = [], []
    for seed, prompt in enumerate(prompts):
        extra = {"negative_prompt": " "} if cfg > 1 else {}
        start = time.perf_counter()
        image = pipe(prompt=prompt, width=SIZE, height=SIZE, num_inference_steps=steps, true_cfg_scale=cfg,
                     generator=torch.Generator().manual_seed(seed), output_type="np", **extra).images[0]
        seconds.append(time.perf_counter() - start)
        images.append(image)
    return images, seconds


def pass_rate(images, prompts, style=None) -> float:
    return float(np.mean([shapes.check(to_uint8(image), prompt, style)["pass"]
                          for image, prompt in zip(images, prompts)]))


def style_rate(images) -> float:
    return float(np.mean([shapes.style_present(to_uint8(image)) for image in images]))


def adapter_file(directory: Path | None, name: str) -> Path:
    return (directory / name / WEIGHT_NAME) if directory else adapters.path(name)


def adapter_metadata(directory: Path | None, name: str) -> dict:
    if directory is None:
        return adapters.metadata(name)
    data = json.loads((directory / name / METADATA_NAME).read_text())
    adapters.validate(data)
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--adapters", type=Path, default=None,
                        help="a directory with distilled/ and frame/ (default: the shipped adapters)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    quiet_libraries()

    pipe = load_trained_tiny("cpu", "float32")
    base_scheduler = pipe.scheduler
    prompts = shapes.held_out_prompts(read_config()["training"]["seed"])[:args.prompts]
    render_all(pipe, prompts[:1], 2, REFERENCE_CFG)  # warm-up: first-call allocations are not the model's cost

    references, reference_seconds = render_all(pipe, prompts, REFERENCE_STEPS, REFERENCE_CFG)
    base = {"steps": REFERENCE_STEPS, "true_cfg_scale": REFERENCE_CFG, "transformer_passes": 2 * REFERENCE_STEPS,
            "checker_pass": pass_rate(references, prompts), "style_present": style_rate(references),
            "seconds_per_image_median": statistics.median(reference_seconds)}
    print(f"base reference: {base}", flush=True)

    distilled_meta = adapter_metadata(args.adapters, "distilled")
    distilled = {"metadata": distilled_meta, "sha256": None, "runs": {}}
    base_few, wrong_scheduler = {}, {}
    for steps in distilled_meta["steps"]:
        images, _ = render_all(pipe, prompts, steps, 1.0)
        base_few[steps] = {"checker_pass": pass_rate(images, prompts), **compare(images, references)}
    pipe.load_lora_weights(str(adapter_file(args.adapters, "distilled")), adapter_name="distilled")
    for steps in distilled_meta["steps"]:
        images, _ = render_all(pipe, prompts, steps, 1.0)
        wrong_scheduler[steps] = {"checker_pass": pass_rate(images, prompts), **compare(images, references)}
    pipe.scheduler = scheduler_for(pipe, distilled_meta["scheduler"])
    for steps in distilled_meta["steps"]:
        images, seconds = render_all(pipe, prompts, steps, distilled_meta["true_cfg_scale"])
        median = statistics.median(seconds)
        distilled["runs"][steps] = {
            "checker_pass": pass_rate(images, prompts), **compare(images, references),
            "transformer_passes": steps, "pass_ratio": 2 * REFERENCE_STEPS / steps,
            "seconds_per_image_median": median, "wall_ratio": base["seconds_per_image_median"] / median}
        print(f"distilled {steps} steps: {distilled['runs'][steps]}", flush=True)
    pipe.delete_adapters("distilled")
    pipe.scheduler = base_scheduler

    frame_meta = adapter_metadata(args.adapters, "frame")
    pipe.load_lora_weights(str(adapter_file(args.adapters, "frame")), adapter_name="frame")
    styled, styled_seconds = render_all(pipe, prompts, REFERENCE_STEPS, REFERENCE_CFG)
    pipe.fuse_lora(adapter_names=["frame"])
    pipe.unload_lora_weights()  # the fused weights stay; the LoRA layers go, as when a lever fuses then compiles
    fused, _ = render_all(pipe, prompts, REFERENCE_STEPS, REFERENCE_CFG)
    style = {"metadata": frame_meta,
             "unfused": {"style_present": style_rate(styled), "checker_pass_inside_frame": pass_rate(
                 styled, prompts, "frame"), "checker_pass_as_plain": pass_rate(styled, prompts),
                 "seconds_per_image_median": statistics.median(styled_seconds)},
             "fused": {"style_present": style_rate(fused), "checker_pass_inside_frame": pass_rate(
                 fused, prompts, "frame"), **{f"vs_unfused_{k}": v for k, v in compare(fused, styled).items()}},
             "base_style_present": base["style_present"]}
    print(f"frame style: {style}", flush=True)

    for name, record in (("distilled", distilled), ("frame", style)):
        import hashlib

        record["sha256"] = hashlib.sha256(adapter_file(args.adapters, name).read_bytes()).hexdigest()
    results = {
        "date": datetime.date.today().isoformat(),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "model": {"revision": revision()},
        "prompts": len(prompts), "seeds": "the prompt's index", "size": SIZE,
        "base_reference": base,
        "base_cfg_off": {str(k): v for k, v in base_few.items()},
        "distilled": distilled | {"runs": {str(k): v for k, v in distilled["runs"].items()},
                                  "without_its_scheduler": {str(k): v for k, v in wrong_scheduler.items()}},
        "frame": style,
    }
    (args.out / "adapters.json").write_text(json.dumps(results, indent=1) + "\n")

    print(f"\nheld-out prompts: {len(prompts)}; base 50 steps true CFG 4.0: checker pass {base['checker_pass']:.0%}, "
          f"{base['seconds_per_image_median']:.2f} s/image, style read on {base['style_present']:.0%}")
    print("\n| run | steps | CFG | transformer passes | checker pass | PSNR mean (dB) | PSNR worst | SSIM mean | "
          "SSIM worst | s/image | wall speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for steps, row in distilled["runs"].items():
        print(f"| distilled LoRA | {steps} | off | {steps} | {row['checker_pass']:.0%} | {row['psnr_db']:.1f} | "
              f"{row['psnr_db_min']:.1f} | {row['ssim']:.3f} | {row['ssim_min']:.3f} | "
              f"{row['seconds_per_image_median']:.3f} | {row['wall_ratio']:.1f}x |")
    for label, table in (("distilled LoRA, tiny's scheduler", wrong_scheduler), ("base, no LoRA", base_few)):
        for steps, row in table.items():
            print(f"| {label} | {steps} | off | {steps} | {row['checker_pass']:.0%} | {row['psnr_db']:.1f} | "
                  f"{row['psnr_db_min']:.1f} | {row['ssim']:.3f} | {row['ssim_min']:.3f} | | |")
    print(f"\nframe style at 50 steps, true CFG 4.0: read on {style['unfused']['style_present']:.0%} unfused, "
          f"{style['fused']['style_present']:.0%} fused, {base['style_present']:.0%} without the LoRA; checker pass "
          f"inside the frame {style['unfused']['checker_pass_inside_frame']:.0%} unfused, "
          f"{style['fused']['checker_pass_inside_frame']:.0%} fused")


if __name__ == "__main__":
    main()
