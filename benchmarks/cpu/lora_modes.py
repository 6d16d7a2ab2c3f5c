"""Issue 27 on the CPU: what holding a LoRA unfused or fused costs tiny per image, against no LoRA, and whether a
hotswap under compile makes a new graph. A seeded random rank-8 LoRA on every attention and MLP Linear of the
8 blocks (made here with peft, saved with diffusers' writer, loaded through qwendoctor's lever).

    OMP_NUM_THREADS=1 python benchmarks/cpu/lora_modes.py --out benchmarks/cpu/lora_modes.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
           "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"]
PROMPT = "a small red circle at the top left on a blue background"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--images", type=int, default=5)
    arguments = parser.parse_args()

    import numpy as np
    import torch
    from torch._dynamo.testing import CompileCounter

    import test_lora
    from qwendoctor import levers, models, runner
    from qwendoctor.capabilities import detect_capabilities
    from qwendoctor.levers import lora
    from qwendoctor.profile import Profile, Workload

    test_lora.TARGETS = TARGETS
    directory = Path(tempfile.mkdtemp())
    first = lora.parse_spec(f"{test_lora.make_lora(directory / 'a', rank=8, seed=0)}:0.8", "tiny")
    second = lora.parse_spec(str(test_lora.make_lora(directory / 'b', rank=4, seed=1)), "tiny")
    base = Workload(model="tiny", width=128, height=128, reference_steps=50, dtype="float32")
    rows, images = {}, {}
    for name, loras, profile in (("no LoRA", (), Profile()), ("unfused", (first,), Profile()),
                                 ("fused", (first,), Profile(lora_mode="fused"))):
        workload = Workload(**{**base.__dict__, "loras": loras}).validate()
        model = runner.build(workload, profile, detect_capabilities())
        runner.render(model, workload, profile, PROMPT, 0)  # warm-up
        seconds = []
        for _ in range(arguments.images):
            started = time.perf_counter()
            images[name] = runner.render(model, workload, profile, PROMPT, 0)
            seconds.append(time.perf_counter() - started)
        rows[name] = {"s_per_image_median": statistics.median(seconds), "s_per_image": seconds}
        print(name, f"{statistics.median(seconds):.3f} s/image", flush=True)
    for name in ("unfused", "fused"):
        rows[name]["vs_no_lora"] = rows[name]["s_per_image_median"] / rows["no LoRA"]["s_per_image_median"]
    rows["fused"]["max_abs_diff_vs_unfused"] = float(np.abs(images["fused"] - images["unfused"]).max())
    rows["unfused"]["max_abs_diff_vs_no_lora"] = float(np.abs(images["unfused"] - images["no LoRA"]).max())

    workload = Workload(**{**base.__dict__, "reference_steps": 4, "loras": (first,)}).validate()
    model = models.load_model("tiny", "cpu", "float32")
    levers.optimize(model.pipe, Profile(), workload=workload)
    counter = CompileCounter()
    model.pipe.transformer.compile_repeated_blocks(fullgraph=True, backend=counter)
    runner.render(model, workload, Profile(), PROMPT, 0)
    compiled = counter.frame_count
    lora.hotswap(model.pipe, (second,), "tiny")
    runner.render(model, workload, Profile(), PROMPT, 0)
    hotswap = {"graphs_before": compiled, "graphs_after_hotswap": counter.frame_count,
               "note": "dynamo graphs counted with a counting backend (no inductor): a hotswap from rank 8 to a "
                       "rank-4 LoRA at another scale"}
    print("hotswap", hotswap, flush=True)
    document = {"command": "OMP_NUM_THREADS=1 python benchmarks/cpu/lora_modes.py --out " + arguments.out,
                "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                "threads": torch.get_num_threads(), "images_each": arguments.images,
                "workload": "tiny 128x128, 50 steps, true CFG 4.0", "lora": "seeded random, rank 8, scale 0.8, "
                "on the 12 attention and MLP Linears of each of the 8 blocks", "rows": rows, "hotswap": hotswap}
    Path(arguments.out).write_text(json.dumps(document, indent=1) + "\n")


if __name__ == "__main__":
    main()
