"""Qwen-Image's cost model: tokens, FLOPs, weight bytes and activation memory for one workload.

Pure Python (no torch): the attention_truth, memory_plan and roofline probes share it, so the model of a step
lives in one place. Numbers are for the 20B MMDiT transformer (dual stream: separate image and text weights,
joint attention over image + text tokens) with true CFG (two transformer passes per denoising step).
"""

from __future__ import annotations

GIB = 1024**3

BLOCKS = 60
HEADS = 24
HEAD_DIM = 128
HIDDEN = HEADS * HEAD_DIM  # 3072
MLP = 12288
PASSES_PER_STEP = 2  # true CFG: a conditional and an unconditional pass

TRANSFORMER_PARAMS = 20.43e9
TEXT_ENCODER_PARAMS = 8.29e9  # Qwen2.5-VL-7B
VAE_PARAMS = 0.127e9

# Linear weights inside the 60 blocks, both streams: q/k/v/out (4 H^2), MLP (2 H M), AdaLN modulation
# (H -> 6H). torchao's FP8 configs quantize these; embeddings, norms and the output head stay bf16.
BLOCK_LINEAR_PARAMS = BLOCKS * 2 * (4 * HIDDEN**2 + 2 * HIDDEN * MLP + 6 * HIDDEN**2)  # 20.38e9

# Activation + allocator overhead, calibrated on REFERENCE.md's end-to-end peaks of the default bf16 pipeline
# (transformer + VAE on the GPU, no text encoder): 58 GiB at 1024x1024 (4096 image tokens) and 71 GiB at
# 1328x1328 (6889). Minus the bf16 weights (20.557e9 params * 2 B = 38.29 GiB) that leaves 19.71 and 32.71 GiB:
# ~4.65 MiB per image token (the VAE decode at full resolution dominates the peak) plus ~0.65 GiB fixed.
# Interpolated linearly in image tokens, extrapolated outside [4096, 6889], never below the fixed part.
_CAL_TOKENS = (64 * 64, 83 * 83)
_CAL_PEAK_GIB = (58.0, 71.0)


def image_tokens(width: int, height: int) -> int:
    """VAE 8x down, 2x2 patches: 1328x1328 -> 83 * 83 = 6889."""
    return (height // 16) * (width // 16)


def seq_len(width: int, height: int, text_tokens: int) -> int:
    """Joint attention sequence: image + text tokens (7017 at 1328x1328 with 128 text tokens)."""
    return image_tokens(width, height) + text_tokens


def linear_flops_per_pass(tokens: int) -> float:
    """Matmul FLOPs of the 60 blocks' q/k/v/out and MLP for `tokens` (image + text) tokens, batch 1."""
    return 2.0 * BLOCKS * (4 * HIDDEN**2 + 2 * HIDDEN * MLP) * tokens


def attention_flops_one_call(s: int, heads: int = HEADS, head_dim: int = HEAD_DIM) -> float:
    """QK^T and PV of one attention call, batch 1: 2 matmuls * 2 FLOP * S^2 * H * D."""
    return 4.0 * s * s * heads * head_dim


def attention_flops_per_pass(s: int) -> float:
    return BLOCKS * attention_flops_one_call(s)


def flops_per_pass(width: int, height: int, text_tokens: int) -> dict[str, float]:
    s = seq_len(width, height, text_tokens)
    linear, attention = linear_flops_per_pass(s), attention_flops_per_pass(s)
    return {"linear": linear, "attention": attention, "total": linear + attention}


def flops_per_step(width: int, height: int, text_tokens: int) -> dict[str, float]:
    return {k: PASSES_PER_STEP * v for k, v in flops_per_pass(width, height, text_tokens).items()}


def weight_bytes(params: float, bytes_per_param: float = 2.0) -> float:
    return params * bytes_per_param


def transformer_bytes(fp8: bool = False) -> float:
    """bf16: 2 B/param everywhere; FP8: 1 B/param for the blocks' linear weights, the rest stays bf16."""
    if not fp8:
        return weight_bytes(TRANSFORMER_PARAMS)
    quantized = min(BLOCK_LINEAR_PARAMS, TRANSFORMER_PARAMS)
    return weight_bytes(quantized, 1.0) + weight_bytes(TRANSFORMER_PARAMS - quantized)


def activation_gib(width: int, height: int) -> float:
    """Activation + overhead peak (GiB) of a bf16 pipeline at this size, from the calibration above."""
    base = (weight_bytes(TRANSFORMER_PARAMS) + weight_bytes(VAE_PARAMS)) / GIB
    (t0, t1), (p0, p1) = _CAL_TOKENS, _CAL_PEAK_GIB
    a0, a1 = p0 - base, p1 - base
    slope = (a1 - a0) / (t1 - t0)
    fixed = a0 - slope * t0
    return max(fixed, a0 + slope * (image_tokens(width, height) - t0))
