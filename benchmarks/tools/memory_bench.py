#!/usr/bin/env python3
"""Memory placements of Qwen-Image, measured: each row's peak GPU memory and s/image, under a memory limit.

Each row is a profile (qwendoctor's levers: placement and speed) and an optional memory limit in GiB. The row
loads the pipeline as `qwendoctor generate` does (components the placement keeps in host memory load there),
applies the limit with torch.cuda.set_per_process_memory_fraction, warms up (compile lands there), then renders
one image of `--steps` steps at each size, timing every step and the whole call.

s/image at the reference steps is extrapolated from that render, and the JSON says so: the measured image of
`--steps` steps plus (reference - steps) times its median step. A step's cost does not depend on how many
there are (model offload pays its transfer once per image, in the first step, which is why the first step is
kept whole, not replaced by the median).

Peaks are torch's max_memory_allocated (tensors) and max_memory_reserved (the caching allocator's hold, which
is what the limit caps) over the measured render, prompt encoding and VAE decode included.

Also recorded: the host link (PCIe generation and width from NVML, and measured host-to-device GB/s from pinned
and from pageable memory), the card, driver, torch and diffusers.

    python benchmarks/tools/memory_bench.py --out DIR --rows ROWS.json [--sizes 1024,1328] [--steps 3]
        [--reference-steps 50] [--model synthetic]

ROWS.json: [{"name": "resident", "profile": "", "limit_gib": null}, {"name": "fp8 24", "profile":
"weight_storage=fp8_storage,offload=group,text_encoder=offload", "limit_gib": 24}, ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

GIB = 2**30
PROMPT = "a lighthouse on a cliff at sunset, dramatic clouds, waves breaking on the rocks below"


def host_link() -> dict:
    """PCIe generation and width as NVML reports them, and measured host-to-device bandwidth."""
    import torch

    facts: dict = {}
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        for key, call in (("pcie_gen_current", pynvml.nvmlDeviceGetCurrPcieLinkGeneration),
                          ("pcie_gen_max", pynvml.nvmlDeviceGetMaxPcieLinkGeneration),
                          ("pcie_width_current", pynvml.nvmlDeviceGetCurrPcieLinkWidth),
                          ("pcie_width_max", pynvml.nvmlDeviceGetMaxPcieLinkWidth)):
            try:
                facts[key] = int(call(handle))
            except Exception as error:  # not every platform reports each
                facts[key] = f"unavailable: {type(error).__name__}"
        pynvml.nvmlShutdown()
    except Exception as error:
        facts["nvml"] = f"unavailable: {type(error).__name__}: {error}"
    size = GIB
    device_buffer = torch.empty(size, dtype=torch.uint8, device="cuda")
    for kind, host in (("pinned", torch.ones(size, dtype=torch.uint8).pin_memory()),
                       ("pageable", torch.ones(size, dtype=torch.uint8))):
        device_buffer.copy_(host, non_blocking=True)  # first touch out of the timing
        torch.cuda.synchronize()
        seconds = []
        for _ in range(5):
            started = time.perf_counter()
            device_buffer.copy_(host, non_blocking=True)
            torch.cuda.synchronize()
            seconds.append(time.perf_counter() - started)
        facts[f"h2d_{kind}_gb_s"] = round(size / statistics.median(seconds) / 1e9, 1)
        del host
    del device_buffer
    torch.cuda.empty_cache()
    return facts


def free() -> None:
    import torch

    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


def run_row(row: dict, sizes: list[int], steps: int, reference_steps: int, model_id: str, on_entry=None) -> dict:
    import torch

    from probes import timing
    from qwendoctor import levers, models, runner
    from qwendoctor.profile import Profile, Workload

    profile = Profile.from_text(row.get("profile", ""))
    total = torch.cuda.get_device_properties(0).total_memory
    limit = row.get("limit_gib")
    torch.cuda.set_per_process_memory_fraction(min(1.0, limit * GIB / total) if limit else 1.0, 0)
    result: dict = {"name": row["name"], "profile": profile.to_dict(), "describe": profile.describe(),
                    "limit_gib": limit, "sizes": {}}
    model = None
    try:
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        workload = Workload(model=model_id, width=sizes[0], height=sizes[0], reference_steps=reference_steps,
                            dtype="bfloat16")
        model = models.load_model(model_id, "cuda", "bfloat16", on_cpu=levers.load_on_cpu(profile))
        levers.optimize(model.pipe, profile, workload=workload)
        torch.cuda.synchronize()
        result["load_s"] = round(time.perf_counter() - started, 2)
        result["after_load_gib"] = round(torch.cuda.memory_allocated() / GIB, 2)
        result["load_peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
        for size in row.get("sizes") or sizes:
            workload = Workload(model=model_id, width=size, height=size, reference_steps=reference_steps,
                                dtype="bfloat16")
            entry: dict = {}
            result["sizes"][str(size)] = entry
            try:
                # "warmup": false for rows with nothing to compile and slow steps (sequential offload): the
                # measured render's first step then carries any lazy initialisation, and stays out of the median.
                if row.get("warmup", True):
                    entry["warmup_s"] = round(runner.warm_up(model, workload, profile, PROMPT, 0), 2)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                clock = timing.StepClock("cuda")
                clock.start()
                row_steps = row.get("steps") or steps
                runner.render(model, workload, dataclasses.replace(profile, steps=row_steps), PROMPT, 0, clock=clock)
                torch.cuda.synchronize()
                image_s = time.perf_counter() - clock.stamps[0]
                step_s = clock.step_seconds
                median_step = statistics.median(step_s[1:] if len(step_s) > 1 else step_s)
                entry.update({
                    "state": "ok",
                    "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 2),
                    "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2),
                    "measured_steps": row_steps,
                    "measured_image_s": round(image_s, 3),
                    "step_ms": [round(1000 * s, 1) for s in step_s],
                    "median_step_ms": round(1000 * median_step, 1),
                    "outside_steps_s": round(image_s - sum(step_s), 3),
                    f"s_per_image_{reference_steps}_steps_extrapolated": round(
                        image_s + (reference_steps - row_steps) * median_step, 2),
                })
            except torch.OutOfMemoryError as error:
                entry.update({"state": "out_of_memory",
                              "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 2),
                              "error": str(error).splitlines()[0][:200]})
                free()
            print(f"  {row['name']} @ {size}: {json.dumps(entry)}", flush=True)
            if on_entry is not None:
                on_entry(result)
    except torch.OutOfMemoryError as error:
        result.update({"state": "out_of_memory_at_load", "error": str(error).splitlines()[0][:200],
                       "load_peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 2)})
    except Exception as error:
        result.update({"state": "error", "error": f"{type(error).__name__}: {error}"[:400],
                       "traceback": traceback.format_exc()[-2000:]})
        print(result["traceback"], flush=True)
    finally:
        del model
        free()
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", required=True)
    parser.add_argument("--sizes", default="1024,1328")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--reference-steps", type=int, default=50)
    parser.add_argument("--model", default="synthetic")
    parser.add_argument("--name", default="memory_bench")
    args = parser.parse_args()

    import diffusers
    import torch

    from qwendoctor import models

    models.quiet_libraries()
    os.makedirs(args.out, exist_ok=True)
    rows = json.load(open(args.rows))
    sizes = [int(s) for s in args.sizes.split(",")]
    properties = torch.cuda.get_device_properties(0)
    report = {
        "command": " ".join(sys.argv),
        "card": properties.name, "card_memory_gib": round(properties.total_memory / GIB, 1),
        "torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "model": args.model, "steps_measured": args.steps,
        "reference_steps": args.reference_steps, "true_cfg_scale": 4.0, "prompt": PROMPT,
        "extrapolation": f"s/image at {args.reference_steps} steps = the measured image of {args.steps} steps + "
                         f"({args.reference_steps} - {args.steps}) x its median step (the first step excluded "
                         "from the median)",
        "host_link": host_link(), "rows": [],
    }
    print(json.dumps(report["host_link"]), flush=True)
    path = os.path.join(args.out, f"{args.name}.json")
    for row in rows:
        started = time.perf_counter()
        print(f"row {row['name']} ({row.get('profile', '')}, limit {row.get('limit_gib')}) at "
              f"{time.strftime('%H:%M:%S')}", flush=True)
        def save(partial, final=False):
            # after every image: a run cut short keeps what it measured
            rows_so_far = report["rows"] + [partial]
            with open(path, "w") as handle:
                json.dump({**report, "rows": rows_so_far}, handle, indent=1)

        result = run_row(row, sizes, args.steps, args.reference_steps, args.model, on_entry=save)
        result["row_wall_s"] = round(time.perf_counter() - started, 1)
        report["rows"].append(result)
        with open(path, "w") as handle:
            json.dump(report, handle, indent=1)
    print_table(report, sizes, args.reference_steps)


def print_table(report: dict, sizes: list[int], reference_steps: int) -> None:
    key = f"s_per_image_{reference_steps}_steps_extrapolated"
    print(f"\n{'row':34} {'limit':>5} " + " ".join(f"{s:>7}px: peak GiB  ms/step  s/img" for s in sizes))
    for result in report["rows"]:
        cells = []
        for size in sizes:
            entry = result["sizes"].get(str(size), {})
            if entry.get("state") == "ok":
                cells.append(f"{entry['peak_allocated_gib']:>17.1f} {entry['median_step_ms']:>8.0f} "
                             f"{entry[key]:>6.1f}")
            else:
                cells.append(f"{entry.get('state') or result.get('state', '-'):>33}")
        print(f"{result['name'][:34]:34} {str(result['limit_gib'] or '-'):>5} " + " ".join(cells))


if __name__ == "__main__":
    main()
