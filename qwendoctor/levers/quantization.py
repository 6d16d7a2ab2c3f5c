"""FP8 quantization of the transformer blocks' Linear layers with torchao (row-wise, tensor-wise or weight-only).

Applied before compile, so inductor fuses the activation quantization into the kernels around the GEMMs, and
before weight storage and offload (never together with weight storage: both replace the same weights). Lossy: its
quality is judged against the floor, and tune may keep a few blocks at each end in bf16.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from qwendoctor.errors import UnavailableLever, UsageError
from qwendoctor.levers.base import BenchRow, Field, LadderStep, Lever, Offer, SpaceContext, has_transformer

if TYPE_CHECKING:
    from qwendoctor.profile import Profile

FP8_MIN_COMPUTE_CAPABILITY = (8, 9)

QUANTIZATIONS = ("none", "fp8_rowwise", "fp8_tensorwise", "fp8_weight_only")
# What the blocks' text stream gets under FP8: FP8 weights multiplied in bf16 (the memory FP8 promises), or its
# bf16 weights left alone. On an H100, `synthetic`'s 20B pipeline at 1024x1024 with FP8 row-wise and regional
# compile, an 11-token prompt: 214.0 ms/step with the text stream in bf16 against 246.7 with it weight-only
# (1.15x), peak 45.3 against 39.0 GiB, PSNR against the default 39.4 and 39.5 dB (random weights: numerical
# fidelity only; benchmarks/gpu-owed/runs/2026-12-08-h100/fp8_diagnose.jsonl). torchao 0.18's weight-only linear
# is `matmul(input, weight.dequantize())`: the weights are dequantized at every call. tune measures both (on a
# card without the memory, the bf16 trial's out-of-memory error fails that trial and the study goes on).
TEXT_STREAMS = ("fp8_weight_only", "bf16")


def apply_quantization(pipe, profile: "Profile"):
    if not has_transformer(pipe, profile, "quantization", profile.quantization != "none") or (
            profile.quantization == "none"):
        return pipe
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        PerRow,
        PerTensor,
        quantize_,
    )

    # set_inductor_config=False: by default torchao turns on inductor's coordinate-descent kernel tuning for the
    # whole process, and never off. On an H100 that tuning added 75-175 s to the warm-up of every compiled
    # FP8 graph and of every graph compiled after it, bf16 too (benchmarks/README.md, "compile cost"). It is
    # the `coordinate-descent` compile mode here, a choice of its own.
    config = {
        "fp8_rowwise": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(),
                                                                         set_inductor_config=False),
        "fp8_tensorwise": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerTensor(),
                                                                            set_inductor_config=False),
        "fp8_weight_only": lambda: Float8WeightOnlyConfig(set_inductor_config=False),
    }[profile.quantization]()

    blocks = pipe.transformer.transformer_blocks
    kept = profile.quantization_bf16_blocks
    if 2 * kept >= len(blocks):
        raise UsageError(f"profile.quantization_bf16_blocks: {kept} at each end of {len(blocks)} blocks leaves none "
                         "to quantize")
    between = _block_linear_between(kept, len(blocks) - kept)
    text_in_fp8 = profile.quantization_text_stream == "fp8_weight_only"
    if profile.quantization == "fp8_weight_only" and text_in_fp8:
        quantize_(blocks, config, filter_fn=between)
    else:
        quantize_(blocks, config, filter_fn=lambda module, fqn: between(module, fqn) and not in_text_stream(fqn))
        if text_in_fp8:
            quantize_(blocks, Float8WeightOnlyConfig(set_inductor_config=False),
                      filter_fn=lambda module, fqn: between(module, fqn) and in_text_stream(fqn))
    keep_quantized_weights_as_they_are(pipe, f"quantization {profile.quantization!r}", "FP8")
    return pipe


def _block_linear_between(first: int, end: int):
    """The filter for blocks[first:end]: the blocks at either end stay bf16. tune searches how many to keep
    against the quality floor."""
    def quantizable(module, fqn: str) -> bool:
        # torchao passes names relative to the ModuleList it was given: "<block>.attn.to_q".
        return is_block_linear(module, fqn) and first <= int(fqn.split(".", 1)[0]) < end

    return quantizable


# The text stream's Linears in a Qwen-Image block. Their rows are the prompt's tokens (tens, any count, against
# 4096 image tokens at 1024x1024: under 1% of the block's GEMM FLOPs). On an H100 (torch 2.11, cuBLAS 13.1)
# cuBLASLt refused the row-wise product of the text MLP's down projection (CUBLAS_STATUS_NOT_SUPPORTED), so every
# FP8 profile of the 20B transformer failed (benchmarks/h100/fp8-diagnose/; whether the token count or the bias is
# what it refuses was not isolated). So they never take the dynamic FP8 config: TEXT_STREAMS says what they take
# (tests/gpu/test_fp8_synthetic_gpu.py passed on an H100 with the weight-only one).
TEXT_STREAM = ("add_q_proj", "add_k_proj", "add_v_proj", "to_added_qkv", "to_add_out", "txt_mlp")


def in_text_stream(fqn: str) -> bool:
    return any(part in TEXT_STREAM for part in fqn.split("."))


def is_block_linear(module, _fqn) -> bool:
    # FP8 GEMMs need both dimensions divisible by 16; the embedders and the final projection stay bf16 (they are
    # outside the blocks torchao is given).
    import torch

    return isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0


def keep_quantized_weights_as_they_are(pipe, setting: str, kind: str) -> None:
    """torchao's FP8 (and int8) weights are tensor subclasses diffusers knows nothing of: `.to(dtype)` leaves them in the
    model's dtype while the rest moves (a model of two dtypes), and `save_pretrained` breaks off inside
    safetensors. Both are refused in one line instead, by the transformer and, before any other component has
    moved or been written, by the pipeline; device moves go through. Quantization cannot be undone, so the
    refusals go with this transformer: a pipeline given another one works as diffusers' again."""
    import weakref

    import torch

    transformer = pipe.transformer
    dtype, move = transformer.dtype, transformer.to
    # Weak: the pool frees a quantized transformer before it builds the next (two do not fit on one card).
    quantized = weakref.ref(transformer)

    def still_quantized() -> bool:
        return pipe.transformer is not None and pipe.transformer is quantized()

    def refuse_dtype(wanted) -> None:
        if wanted is not None and wanted != dtype:
            raise UsageError(f"{setting}: to({wanted}) cannot convert the {kind} weights; build the "
                             f"pipeline in {str(wanted).removeprefix('torch.')} and apply the profile to it")

    def refuse_save(*_args, **_kwargs) -> None:
        raise UsageError(f"{setting}: save_pretrained cannot write the {kind} weights; save the "
                         "pipeline before applying the profile (the lock applies it again on load)")

    def transformer_to(*args, **kwargs):
        refuse_dtype(torch._C._nn._parse_to(*args, **kwargs)[1])
        return move(*args, **kwargs)

    def pipeline_to(*args, **kwargs):
        if still_quantized():
            refuse_dtype(kwargs.get("dtype", next((a for a in args if isinstance(a, torch.dtype)), None)))
        return type(pipe).to(pipe, *args, **kwargs)

    def save_pretrained(*args, **kwargs):
        if still_quantized():
            refuse_save()
        return type(pipe).save_pretrained(pipe, *args, **kwargs)

    # Plain attribute writes, as CFG batching's: neither becomes a component or a submodule.
    object.__setattr__(transformer, "to", transformer_to)
    object.__setattr__(transformer, "save_pretrained", refuse_save)
    object.__setattr__(pipe, "to", pipeline_to)
    object.__setattr__(pipe, "save_pretrained", save_pretrained)


def _quantization_runnable(profile, workload, capabilities) -> None:
    if profile.quantization == "none":
        return
    if capabilities.device != "cuda":
        raise UnavailableLever(f"{profile.quantization} needs a CUDA GPU; this machine runs on the CPU")
    cc = capabilities.compute_capability
    if cc is None or tuple(cc) < FP8_MIN_COMPUTE_CAPABILITY:
        raise UnavailableLever(f"{profile.quantization} needs compute capability >= 8.9, this GPU has "
                               f"{'.'.join(map(str, cc)) if cc else 'unknown'}")
    if not capabilities.has_torchao:
        raise UnavailableLever(f"{profile.quantization} needs torchao: pip install 'qwendoctor[fp8]'")
    if workload.dtype != "bfloat16":
        raise UsageError(f"{profile.quantization} quantizes a bfloat16 model, workload dtype is {workload.dtype}")


# How many blocks at each end tune may keep in bf16 under FP8. Which of Qwen-Image's blocks FP8 hurts most has not
# been measured here; the ends are what this lever can keep, and the floor decides whether keeping any pays.
BF16_END_BLOCKS = (0, 1, 2)


def _quantization_check(profile) -> None:
    if profile.quantization_bf16_blocks and profile.quantization == "none":
        raise UsageError(f"profile.quantization_bf16_blocks: {profile.quantization_bf16_blocks} keeps blocks out of "
                         "FP8, and quantization is 'none'")
    if profile.quantization_text_stream != "fp8_weight_only" and profile.quantization == "none":
        raise UsageError(f"profile.quantization_text_stream: {profile.quantization_text_stream!r} keeps the text "
                         "stream out of FP8, and quantization is 'none'")


def _quantization_offer(ctx: SpaceContext) -> Offer:
    if not ctx.capabilities.has_fp8:
        return Offer({"quantization": ("none",), "quantization_bf16_blocks": (0,),
                      "quantization_text_stream": ("fp8_weight_only",)}, options={"eager": True})
    measured = None if ctx.exhaustive or not ctx.can_compile else ctx.evidence("eager-fp8")
    left_out = (f"FP8 without compile: {measured}",) if measured else ()
    ends = tuple(n for n in BF16_END_BLOCKS if ctx.blocks is None or 2 * n < ctx.blocks)
    return Offer({"quantization": QUANTIZATIONS, "quantization_bf16_blocks": ends,
                  "quantization_text_stream": TEXT_STREAMS}, left_out, options={"eager": not measured})


def _quantization_sample(trial, offer: Offer, chosen: dict[str, Any], ctx: SpaceContext) -> dict[str, Any]:
    if chosen["compile"] == "none" and not offer.options["eager"]:
        return {"quantization": "none"}
    quantization = trial.suggest_categorical("quantization", offer.values["quantization"])
    if quantization == "none":
        return {"quantization": quantization}
    chosen = {"quantization": quantization}
    for name in ("quantization_bf16_blocks", "quantization_text_stream"):
        if len(offer.values[name]) > 1:
            chosen[name] = trial.suggest_categorical(name, offer.values[name])
    return chosen


def _describe_quantization(p) -> str | None:
    if p.quantization == "none":
        return None
    kept = [f"bf16 ends {p.quantization_bf16_blocks}"] if p.quantization_bf16_blocks else []
    if p.quantization_text_stream == "bf16":
        kept.append("bf16 text stream")
    return p.quantization + (f"({', '.join(kept)})" if kept else "")


def _quantization_bench(capabilities, workload) -> list[BenchRow]:
    if not capabilities.has_fp8:
        return []
    return [BenchRow("fp8_rowwise", "FP8 row-wise, eager", {"quantization": "fp8_rowwise"}),
            BenchRow("fp8_rowwise_text_bf16", "FP8 row-wise, the text stream in bf16, eager",
                     {"quantization": "fp8_rowwise", "quantization_text_stream": "bf16"})]


QUANTIZATION = Lever(
    name="quantization", apply=apply_quantization, undoable=False,
    fields=(Field("quantization", str, "none", choices=QUANTIZATIONS),
            # Blocks at each end of the transformer left in bf16 under FP8.
            Field("quantization_bf16_blocks", int, 0, low=0, omit_default=True),
            Field("quantization_text_stream", str, "fp8_weight_only", choices=TEXT_STREAMS, omit_default=True)),
    check=_quantization_check,
    runnable=_quantization_runnable, offer=_quantization_offer, sample=_quantization_sample,
    lossy=lambda p: p.quantization != "none", packages=lambda p: ("torchao",) if p.quantization != "none" else (),
    describe=_describe_quantization,
    bench_alone=_quantization_bench,
    ladder=(LadderStep(8, "stack:+fp8_rowwise", "+ FP8 row-wise",
                       # torchao's FP8 weights have no GELU epilogue: the GELU goes back to its own kernel.
                       lambda p: dataclasses.replace(p, quantization="fp8_rowwise", gelu_epilogue=False),
                       lambda c, w: c.has_fp8),),
)
