"""Where an FP8 regional compile's minutes go (issue 4: FP8 trials spent 100-133 s in warm-up, bf16 ones 6-16 s).

Builds `synthetic` with fewer blocks (the blocks are identical, so a regional compile's cost should not grow
with their number), applies one profile at a time in one process, warms up at W1 and prints, per profile, the
graphs dynamo captured, the FX-graph-cache answers and the seconds of tracing, AOTAutograd and inductor
(qwendoctor.compile_stats). If an FP8 profile captured one graph per block, each block recompiled.

    python3 benchmarks/tools/fp8_compile.py --out $OUT/fp8_compile.json [--blocks 4,8]

Run with TORCH_LOGS=recompiles to have dynamo say why it recompiled.
"""

from __future__ import annotations

import argparse
import json
import time

from qwendoctor import compile_stats, models, runner
from qwendoctor.levers import optimize
from qwendoctor.profile import Profile, Workload

PROFILES = {
    "bf16": Profile(compile="regional", real_rope=True, cfg_batching=True),
    "fp8_rowwise": Profile(compile="regional", real_rope=True, cfg_batching=True, quantization="fp8_rowwise"),
    "fp8_tensorwise": Profile(compile="regional", real_rope=True, cfg_batching=True,
                              quantization="fp8_tensorwise"),
    "fa4_bf16": Profile(compile="regional", real_rope=True, cfg_batching=True, attention_backend="fa4"),
}


def with_blocks(blocks: int):
    """models._package_json, with the synthetic transformer cut to `blocks` blocks."""
    original = models._package_json

    def patched(package, name):
        data = original(package, name)
        if name == "synthetic.json":
            data = json.loads(json.dumps(data))
            data["transformer"]["num_layers"] = blocks
        return data

    return patched


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--blocks", default="4,8")
    parser.add_argument("--profiles", default="bf16,fp8_rowwise,fp8_tensorwise")
    args = parser.parse_args()
    workload = Workload(model="synthetic", reference_steps=50)
    rows = []
    for blocks in [int(b) for b in args.blocks.split(",")]:
        models._package_json = with_blocks(blocks)
        for name in args.profiles.split(","):
            profile = PROFILES[name].validate()
            started = time.perf_counter()
            model = models.load_model("synthetic", "cuda", "bfloat16")
            optimize(model.pipe, profile)
            build_s = time.perf_counter() - started
            before = compile_stats.snapshot()
            speed = runner.time_steps(model, workload, profile, "a cat", 0, 3)
            stats = compile_stats.since(before)
            row = {"blocks": blocks, "profile": name, "build_s": round(build_s, 1),
                   "warmup_s": round(speed.warmup_s, 1), "step_ms": round(1000 * speed.step_median_s, 1),
                   **stats}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del model
            import gc

            import torch

            gc.collect()
            torch.cuda.empty_cache()
    with open(args.out, "w") as fh:
        json.dump(rows, fh, indent=2)
    keys = ["blocks", "profile", "warmup_s", "graphs", "frames", "compile_s", "trace_s", "aot_s", "inductor_s",
            "fx_cache_hits", "fx_cache_misses", "step_ms"]
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(str(row.get(k, "")) for k in keys))


if __name__ == "__main__":
    main()
