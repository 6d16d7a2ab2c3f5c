#!/usr/bin/env python3
"""Does feature caching compose with regional compile and FP8 on Qwen-Image, and what does a cached step cost?

Issue 15 asks for block caching (compute the first Fn and last Bn blocks, reuse the middle's residual) and
TaylorSeer that stack with the lossless tier (regional compile + real RoPE) and the FP8 tier, from cache-dit or
diffusers' own hooks, whichever composes with compile and measures faster. This measures, in one process on one
card: each tier without a cache (the baseline of its rows), cache-dit's DBCache with nothing cached (the
overhead of its decisions), DBCache on a fixed schedule of 50% and 70% cached steps (the static step mask, so the
fraction does not depend on random weights), the same with TaylorSeer forecasting, and diffusers'
FirstBlockCache around regionally compiled blocks. Per row: ms of a computed and of a cached step, s/image,
warm-up, graphs compiled, PSNR against the tier's uncached image. On `synthetic` (random weights) PSNR speaks for
numerical fidelity only, never for whether a cached image is good.

    python benchmarks/tools/cache_compose.py --out DIR [--size 1024] [--steps 50] [--model synthetic]
                                             [--tiers lossless,fp8]

CFG runs as two batch-1 passes (cache-dit keeps a cache per pass, enable_separate_cfg), then as one batch-2 pass
(CFG batching through qwendoctor's levers: one cache decision for both).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="synthetic")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--no-compile", action="store_true", help="eager only (a CPU check of the wiring)")
    parser.add_argument("--no-fp8", action="store_true")
    parser.add_argument("--tiers", default="lossless,fp8",
                        help="which tiers to run (one device call each fits 1328x1328 in 10 minutes)")
    args = parser.parse_args()

    import torch

    import cache_dit
    from probes import timing
    from qwendoctor import compile_stats, levers, models, quality, runner
    from qwendoctor.profile import Profile, Workload

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("cache_dit"):
            logging.getLogger(name).setLevel(logging.ERROR)
    os.makedirs(args.out, exist_ok=True)
    device = models.default_device()
    dtype = "bfloat16" if device == "cuda" else "float32"
    workload = Workload(model=args.model, width=args.size, height=args.size, reference_steps=args.steps,
                        dtype=dtype).validate()
    prompt, seed = "a red fox in the snow", 0
    rows: list[dict] = []

    def save() -> None:
        with open(os.path.join(args.out, f"cache_compose-{args.size}-{args.tiers.replace(',', '-')}.json"),
                  "w") as handle:
            json.dump({"workload": workload.to_dict(), "device": torch.cuda.get_device_name(0) if device == "cuda"
                       else "cpu", "rows": rows}, handle, indent=1)

    def render(model, steps: int | None = None):
        clock = timing.StepClock(model.device)
        clock.start()
        image = runner.render(model, workload, Profile(steps=steps), prompt, seed, clock=clock)
        timing.synchronize(model.device)
        return image, clock.step_seconds

    def measure(label: str, model, reference, cached_steps=lambda: set(), renders: int = 2, **extra) -> dict:
        row: dict = {"row": label, **extra}
        before = compile_stats.snapshot()
        try:
            started = time.perf_counter()
            for _ in range(renders - 1):  # the first call pays any recompile the cache causes
                render(model)
            row["warmup_s"] = time.perf_counter() - started
            image, step_s = render(model)
        except Exception as error:  # a cache that does not compose is this row's result
            row["failed"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
            rows.append(row)
            save()
            print(f"{label}: FAILED {row['failed']}", flush=True)
            return row
        cached = cached_steps()
        computed_ms = [1000 * s for i, s in enumerate(step_s) if i not in cached]
        cached_ms = [1000 * s for i, s in enumerate(step_s) if i in cached]
        row.update(s_per_image=sum(step_s), cached_fraction=len(cached) / len(step_s),
                   computed_step_ms=statistics.median(computed_ms) if computed_ms else None,
                   cached_step_ms=statistics.median(cached_ms) if cached_ms else None,
                   compile=compile_stats.since(before) or None)
        if reference is not None:
            row.update(quality.compare([image], [reference], with_lpips=False))
        rows.append(row)
        save()
        print(f"{label}: {row['s_per_image']:.2f} s/image, computed {row['computed_step_ms']} ms, cached "
              f"{row['cached_step_ms']} ms, {row['cached_fraction']:.0%} cached, PSNR {row.get('psnr_db')}",
              flush=True)
        return {**row, "image": image}

    def dit_cached() -> set[int]:
        stats = cache_dit.summary(model.pipe)[0]
        # A step is cached when both CFG passes reused their residual (the last render's steps).
        cond = set(getattr(stats, "cached_steps", None) or [])
        uncond = set(getattr(stats, "cfg_cached_steps", None) or cond)
        return cond & uncond

    def with_dbcache(label: str, reference, mask=None, threshold: float = 0.0, taylorseer: bool = False) -> None:
        config = cache_dit.DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=threshold,
                                         max_warmup_steps=5, num_inference_steps=args.steps,
                                         steps_computation_mask=mask,
                                         steps_computation_policy="static" if mask else "dynamic")
        calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1) if taylorseer else None
        cache_dit.enable_cache(model.pipe, cache_config=config, calibrator_config=calibrator)
        try:
            measure(label, model, reference, dit_cached, library="cache-dit", Fn=1, Bn=0, threshold=threshold,
                    mask_cached=None if mask is None else mask.count(0), taylorseer=taylorseer)
        finally:
            cache_dit.disable_cache(model.pipe)

    tiers = [("lossless", Profile(compile="regional", real_rope=True))]
    if not args.no_fp8 and device == "cuda":
        tiers.append(("fp8", Profile(compile="regional", real_rope=True, quantization="fp8_rowwise")))
    tiers = [(tier, profile) for tier, profile in tiers if tier in args.tiers.split(",")]
    if args.no_compile:
        tiers = [("eager", Profile())]
    for tier, profile in tiers:
        torch._dynamo.reset()
        model = models.load_model(args.model, device, dtype)
        if tier == "lossless" or args.no_compile:
            _, default_steps = render(model, steps=min(args.steps, 10))
            rows.append({"row": "default (eager, diffusers)", "timed_steps": len(default_steps),
                         "computed_step_ms": 1000 * statistics.median(default_steps[1:] or default_steps)})
        levers.optimize(model.pipe, profile, workload=workload)
        base = measure(f"{tier}: no cache", model, None, tier=tier, profile=profile.describe())
        reference = base.get("image")
        with_dbcache(f"{tier}: DBCache F1B0, 0 cached (threshold 0)", reference, threshold=0.0)
        for fraction in (0.5, 0.7):
            with_dbcache(f"{tier}: DBCache F1B0, {fraction:.0%} cached (fixed schedule)", reference,
                         mask=levers.fixed_schedule(args.steps, fraction, 5))
        with_dbcache(f"{tier}: DBCache F1B0 + TaylorSeer order 1, 70% cached (fixed schedule)", reference,
                     mask=levers.fixed_schedule(args.steps, 0.7, 5), taylorseer=True)
        if workload.does_cfg:
            # CFG batching through qwendoctor's own levers: one batch-2 call a step, one cache decision for both
            # passes (enable_separate_cfg off), the mask from levers.fixed_schedule.
            batched = dataclasses.replace(profile, cfg_batching=True)
            levers.optimize(model.pipe, batched, undoable_only=True, workload=workload)
            batched_base = measure(f"{tier} + CFG batching: no cache", model, None, tier=tier,
                                   profile=batched.describe())
            for fraction in (0.5, 0.7):
                cached = dataclasses.replace(batched, cache="dbcache", cache_schedule=fraction, cache_warmup=5)
                levers.optimize(model.pipe, cached, undoable_only=True, workload=workload)
                mask = levers.fixed_schedule(args.steps, fraction, 5)
                measure(f"{tier} + CFG batching + DBCache F1B0, {fraction:.0%} cached (fixed schedule)", model,
                        batched_base.get("image"), lambda: {i for i, m in enumerate(mask) if not m},
                        library="cache-dit via qwendoctor levers", profile=cached.describe())
            levers.optimize(model.pipe, profile, undoable_only=True, workload=workload)
        if tier == "lossless":
            from diffusers.hooks import FirstBlockCacheConfig

            for threshold in (1e-6, 1.0):
                model.pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
                try:
                    measure(f"{tier}: diffusers FirstBlockCache threshold {threshold:g}", model, reference,
                            library="diffusers", threshold=threshold)
                finally:
                    model.pipe.transformer.disable_cache()
        del model
        torch.cuda.empty_cache() if device == "cuda" else None

    print("\n| row | s / image | computed ms | cached ms | cached | PSNR dB | graphs |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        if "failed" in row:
            print(f"| {row['row']} | failed: {row['failed']} | | | | | |")
            continue
        graphs = (row.get("compile") or {}).get("graphs", "")
        print(f"| {row['row']} | {row.get('s_per_image', 0):.2f} | {row.get('computed_step_ms') or 0:.1f} | "
              f"{row.get('cached_step_ms') or 0:.1f} | {row.get('cached_fraction', 0):.0%} | "
              f"{row.get('psnr_db', '')} | {graphs} |")


if __name__ == "__main__":
    main()
