"""Why FP8 row-wise fails on the 20B transformer (issue 28: CUBLAS_STATUS_NOT_SUPPORTED in
cublasLtMatmulAlgoGetHeuristic on an H100, 1024x1024, while the same lever ran on `tiny`).

Three layers, cheapest first, each row written to OUT/fp8_diagnose.jsonl the moment it lands:
1. torch._scaled_mm with row-wise scales at Qwen-Image's GEMM shapes, for token counts M that are and are not
   multiples of 16 (a prompt through the text encoder gives any M; the old random embeddings gave 128);
2. torchao's Float8DynamicActivationFloat8WeightConfig(PerRow) on one Linear, 2-D and 3-D inputs, batch 1 and 2;
3. the `synthetic` pipeline at 1024x1024 with the lever, two steps, its traceback kept.

    python3 benchmarks/tools/fp8_diagnose.py --out $OUT [--skip-pipeline]
"""

import argparse
import json
import os
import sys
import time
import traceback

import torch

SHAPES = ((3072, 3072), (3072, 12288), (12288, 3072), (3072, 18432))  # (K, N) of the blocks' Linears
TOKENS = (4096, 4096 + 37, 37, 48, 4096 + 48, 1, 7)


def record(out, row):
    print(json.dumps(row), flush=True)
    with open(os.path.join(out, "fp8_diagnose.jsonl"), "a") as handle:
        handle.write(json.dumps(row) + "\n")


def first_line(error):
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]


def scaled_mm_rows(out):
    for m in TOKENS:
        for k, n in SHAPES:
            a = torch.randn(m, k, device="cuda").to(torch.float8_e4m3fn)
            b = torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn).t()
            scale_a = torch.rand(m, 1, device="cuda") + 0.5
            scale_b = torch.rand(1, n, device="cuda") + 0.5
            try:
                torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)
                torch.cuda.synchronize()
                status = "ok"
            except Exception as error:  # noqa: BLE001 - each failure is the finding
                status = first_line(error)
            record(out, {"layer": "scaled_mm_rowwise", "m": m, "k": k, "n": n, "status": status})


def scaled_mm_bias_rows(out):
    # The first run failed only in txt_mlp's down projection (K=12288, N=3072, M = the prompt's tokens) with a bias;
    # raw row-wise products without a bias passed at every M.
    for m in (1, 7, 20, 37, 48, 128, 4096):
        for k, n in ((12288, 3072), (3072, 3072), (3072, 12288)):
            a = torch.randn(m, k, device="cuda").to(torch.float8_e4m3fn)
            b = torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn).t()
            scale_a = torch.rand(m, 1, device="cuda") + 0.5
            scale_b = torch.rand(1, n, device="cuda") + 0.5
            bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
            try:
                torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, bias=bias, out_dtype=torch.bfloat16)
                torch.cuda.synchronize()
                status = "ok"
            except Exception as error:  # noqa: BLE001
                status = first_line(error)
            record(out, {"layer": "scaled_mm_rowwise_bias", "m": m, "k": k, "n": n, "status": status})


def torchao_rows(out):
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    for shape in ((1, 4096 + 37, 3072), (2, 37, 3072), (1, 37, 12288), (1, 20, 12288), (1, 48, 12288),
                  (1, 128, 12288), (1, 4096, 12288)):
        linear = torch.nn.Linear(shape[-1], 3072, device="cuda", dtype=torch.bfloat16)
        quantize_(linear, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False))
        x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
        for compiled in (False, True):
            fn = torch.compile(linear) if compiled else linear
            try:
                with torch.no_grad():
                    fn(x)
                torch.cuda.synchronize()
                status = "ok"
            except Exception as error:  # noqa: BLE001
                status = first_line(error)
            record(out, {"layer": "torchao_linear", "shape": list(shape), "compiled": compiled, "status": status})


TEXT_STREAM = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "txt_mlp")


def pipeline_rows(out, variants):
    from qwendoctor import runner
    from qwendoctor.levers import quantization
    from qwendoctor.capabilities import detect_capabilities
    from qwendoctor.profile import Profile, Workload

    workload = Workload(model="synthetic", width=1024, height=1024, reference_steps=4, dtype="bfloat16")
    capabilities = detect_capabilities()
    block_linear = quantization.is_block_linear
    reference, failed = None, False
    for variant, text in variants:
        profile = Profile.from_text(text) if text else Profile()
        started = time.perf_counter()
        # txt_bf16: the text stream's Linears (M = the prompt's tokens) left out of torchao's quantization.
        quantization.is_block_linear = block_linear if variant == "as_is" else (
            lambda module, fqn: block_linear(module, fqn) and not any(part in fqn for part in TEXT_STREAM))
        torch._dynamo.reset()
        try:
            model = runner.build(workload, profile, capabilities)
            if variant == "txt_wo":  # the text stream's Linears FP8 weight-only: FP8's memory, bf16 products
                from torchao.quantization import Float8WeightOnlyConfig, quantize_

                quantize_(model.pipe.transformer.transformer_blocks, Float8WeightOnlyConfig(set_inductor_config=False),
                          filter_fn=lambda module, fqn: block_linear(module, fqn) and any(
                              part in fqn for part in TEXT_STREAM))
            tokens = model.pipe.encode_prompt(prompt="a red fox in the snow", device="cuda")[0].shape
            measurement = runner.measure(model, workload, profile, ["a red fox in the snow"], [0])
            status = "ok"
            extra = {**measurement.summary(), "text_tokens": str(tuple(tokens))}
            if reference is None:
                reference = measurement.images
            from qwendoctor import quality
            extra["psnr_db_vs_first"] = quality.compare(measurement.images, reference)["psnr_db"]
        except Exception as error:  # noqa: BLE001
            status = first_line(error)
            extra = {"traceback": traceback.format_exc()[-6000:]}
        record(out, {"layer": "pipeline", "variant": variant, "profile": text, "status": status, "s": time.perf_counter() - started,
                     **{k: v for k, v in extra.items() if isinstance(v, (int, float, str))}})
        # The pipeline holds reference cycles: without a collection the next row's 41 GB transformer finds the
        # last one still on the card (the first H100 run of this script lost four of five rows to that).
        model = None
        runner.release_memory()
        failed = failed or status != "ok"
    return failed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument("--variants", default="as_is:,as_is:quantization=fp8_rowwise",
                        help="VARIANT:PROFILE;... with VARIANT as_is, txt_bf16 or txt_wo")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    record(args.out, {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(),
                      "cublaslt_env": {k: v for k, v in os.environ.items() if "CUBLAS" in k}})
    if not args.skip_kernels:
        scaled_mm_bias_rows(args.out)
        torchao_rows(args.out)
    if not args.skip_pipeline and pipeline_rows(args.out, [tuple(v.split(":", 1))
                                                            for v in args.variants.split(";")]):
        return 1  # a failed row leaves the task owed (benchmarks/tools/gpu_owed.py)
    return 0


if __name__ == "__main__":
    sys.exit(main())
