"""A short H100 measurement of the issue-2 levers at Qwen-Image's real shape (W1: 1328x1328, true CFG).

Not the ablation ladder (that is `qwendoctor bench`): it times a few denoising steps per profile on the
`synthetic` model, after a warm-up that absorbs compilation, and writes one JSON file.

    python benchmarks/tools/gpu_smoke.py --out benchmarks/smoke/gpu_smoke_h100.json
"""

import argparse
import gc
import json
import platform
import time

import torch

from qwendoctor import fingerprint, quality, runner
from qwendoctor.capabilities import detect_capabilities
from qwendoctor.profile import Profile, Workload

PROFILES = {
    "default (native attention, eager)": Profile(),
    "cuDNN attention, eager": Profile(attention_backend="_native_cudnn"),
    "regional compile": Profile(compile="regional"),
    "FP8 row-wise, eager": Profile(quantization="fp8_rowwise"),
    "FP8 row-wise + regional compile": Profile(quantization="fp8_rowwise", compile="regional"),
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--size", type=int, default=1328)
    parser.add_argument("--only", nargs="*")
    args = parser.parse_args()

    workload = Workload(model="synthetic", width=args.size, height=args.size, reference_steps=args.steps,
                        dtype="bfloat16")
    capabilities = detect_capabilities()
    rows, reference = [], None
    for label, profile in PROFILES.items():
        if args.only and not any(o in label for o in args.only):
            continue
        torch._dynamo.reset()
        started = time.perf_counter()
        model = runner.build(workload, profile, capabilities)
        build_s = time.perf_counter() - started
        measurement = runner.measure(model, workload, profile, ["a red fox in the snow"], [0])
        summary = measurement.summary()
        if reference is None:
            reference = measurement.images
        fidelity = quality.compare(measurement.images, reference)
        rows.append({"profile": label, "settings": profile.to_dict(), "build_s": build_s, **summary,
                     "psnr_db_vs_first": fidelity["psnr_db"], "ssim_vs_first": fidelity["ssim"]})
        print(json.dumps(rows[-1]), flush=True)
        del model, measurement
        gc.collect()
        torch.cuda.empty_cache()

    base = rows[0]["step_ms"]
    for row in rows:
        row["speedup_vs_first"] = base / row["step_ms"]
    result = {
        "command": f"python benchmarks/tools/gpu_smoke.py --out {args.out} --steps {args.steps} --size {args.size}",
        "workload": workload.to_dict(),
        "note": "synthetic (random) weights: PSNR/SSIM speak for numerical fidelity only; step_ms is the median "
                "of the timed steps after a 2-step warm-up that absorbs compilation (warmup_s)",
        "fingerprint": fingerprint.machine_fingerprint("synthetic", None),
        "host": platform.node(),
        "rows": rows,
    }
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=2, default=str)
    print(f"\n{'profile':<36} {'ms/step':>8} {'x':>5} {'warmup s':>9} {'peak GiB':>9} {'PSNR':>6}")
    for row in rows:
        print(f"{row['profile']:<36} {row['step_ms']:8.1f} {row['speedup_vs_first']:5.2f} {row['warmup_s']:9.1f} "
              f"{row.get('peak_memory_gib', 0):9.1f} {row['psnr_db_vs_first']:6.1f}")


if __name__ == "__main__":
    main()
