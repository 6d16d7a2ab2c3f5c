"""FA4 (flash-attn-4, flash_attn.cute) against cuDNN attention on a GPU, at Qwen-Image's shapes and in a step.

    python benchmarks/tools/fa4_h100.py --out benchmarks/fa4/fa4_h100.json

1. Attention alone, B=1 H=24 D=128 bf16, S = 4224 (1024x1024: 64x64 image tokens + 128 text) and
   S = 7017 (1328x1328): FA4 vs SDPA's cuDNN backend vs default SDPA, triton's do_bench (median, L2 flushed),
   after 1 s of load, in alternating rounds so clock drift under the power limit hits every kernel alike.
2. A W1 denoising step (synthetic full-size transformer, 1328x1328, true CFG, eager): diffusers' `native`
   attention vs qwendoctor's registered `fa4` backend, median ms per step after warm-up, and PSNR between them.
"""

import argparse
import gc
import json
import statistics
import time

import torch
import triton.testing

from qwendoctor import fingerprint, quality, runner
from qwendoctor.levers import attention
from qwendoctor.capabilities import detect_capabilities
from qwendoctor.profile import Profile, Workload

H, D = 24, 128
SHAPES = {"1024x1024": 64 * 64 + 128, "1328x1328": 83 * 83 + 128}


def attention_alone(rounds: int = 3) -> dict:
    from flash_attn.cute import flash_attn_func
    from torch.nn.attention import SDPBackend, sdpa_kernel

    results = {}
    for label, s in SHAPES.items():
        q, k, v = (torch.randn(1, s, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

        def fa4():
            out = flash_attn_func(q, k, v)
            return out[0] if isinstance(out, (tuple, list)) else out

        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)

        def native():
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)

        reference = native().transpose(1, 2).float()
        error = float((fa4().float() - reference).abs().max() / reference.abs().max())
        until = time.perf_counter() + 1.0
        while time.perf_counter() < until:
            native()
            torch.cuda.synchronize()
        samples = {"fa4": [], "cudnn": [], "native": []}
        for _ in range(rounds):
            for name, call in (("fa4", fa4), ("cudnn", cudnn), ("native", native)):
                samples[name].append(triton.testing.do_bench(call, warmup=50, rep=200, return_mode="median"))
        flops = 4 * s * s * H * D
        results[label] = {"S": s, "fa4_rel_err_vs_native": error, **{
            name: {"ms": statistics.median(v), "tflops": flops / statistics.median(v) / 1e9}
            for name, v in samples.items()}}
        print(label, json.dumps(results[label]), flush=True)
    return results


def in_a_step(steps: int) -> dict:
    workload = Workload(model="synthetic", width=1328, height=1328, reference_steps=steps, dtype="bfloat16")
    capabilities = detect_capabilities()
    rows, reference = {}, None
    for backend in ("native", "fa4"):
        profile = Profile(attention_backend=backend)
        model = runner.build(workload, profile, capabilities)
        measurement = runner.measure(model, workload, profile, ["a red fox in the snow"], [0])
        if reference is None:
            reference = measurement.images
        rows[backend] = {**measurement.summary(), **quality.compare(measurement.images, reference)}
        print(backend, json.dumps(rows[backend]), flush=True)
        del model, measurement
        gc.collect()
        torch.cuda.empty_cache()
    rows["fa4_speedup_vs_native"] = rows["native"]["step_ms"] / rows["fa4"]["step_ms"]
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    if not attention.register_fa4_backend():
        raise SystemExit("flash_attn.cute does not import: install it with ./install_flash_attention.sh --which fa4")
    import importlib.metadata

    result = {
        "command": f"python benchmarks/tools/fa4_h100.py --out {args.out} --steps {args.steps}",
        "flash_attn_4": importlib.metadata.version("flash-attn-4"),
        "fingerprint": fingerprint.machine_fingerprint("synthetic", None),
        "attention_alone": attention_alone(),
        "w1_step": in_a_step(args.steps),
    }
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=2, default=str)
    print(f"\n{'shape':<10} {'FA4 TF/s':>9} {'cuDNN TF/s':>10} {'native TF/s':>11} {'FA4/cuDNN':>9}")
    for label, row in result["attention_alone"].items():
        print(f"{label:<10} {row['fa4']['tflops']:9.0f} {row['cudnn']['tflops']:10.0f} {row['native']['tflops']:11.0f} "
              f"{row['fa4']['tflops'] / row['cudnn']['tflops']:9.3f}")
    step = result["w1_step"]
    print(f"W1 step: native {step['native']['step_ms']:.1f} ms, fa4 {step['fa4']['step_ms']:.1f} ms "
          f"({step['fa4_speedup_vs_native']:.3f}x), PSNR fa4 vs native {step['fa4']['psnr_db']:.1f} dB")


if __name__ == "__main__":
    main()
