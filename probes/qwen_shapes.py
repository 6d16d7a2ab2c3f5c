"""Qwen-Image's cost model: tokens, FLOPs, weight bytes and activation memory for one workload.

Pure Python (no torch): the attention_truth and memory_plan probes and `qwendoctor bench` share it, so the model
of a step lives in one place. The constants are the 20B MMDiT transformer's (dual stream: separate image and text
weights, joint attention over image + text tokens) with true CFG (two transformer passes per denoising step);
`flops_per_step_from_config` prices any transformer config of that shape, which the 20B functions call too.
"""

from __future__ import annotations

from typing import Any, Mapping


GIB = 1024**3

# The 20B transformer's config.json (diffusers' QwenImageTransformer2DModel).
QWEN_IMAGE_TRANSFORMER = {"num_layers": 60, "num_attention_heads": 24, "attention_head_dim": 128}
MLP_RATIO = 4  # diffusers' FeedForward default, which Qwen-Image's blocks use

BLOCKS = QWEN_IMAGE_TRANSFORMER["num_layers"]
HEADS = QWEN_IMAGE_TRANSFORMER["num_attention_heads"]
HEAD_DIM = QWEN_IMAGE_TRANSFORMER["attention_head_dim"]
HIDDEN = HEADS * HEAD_DIM  # 3072
MLP = MLP_RATIO * HIDDEN  # 12288
PASSES_PER_STEP = 2  # true CFG: a conditional and an unconditional pass

TRANSFORMER_PARAMS = 20.43e9
TEXT_ENCODER_PARAMS = 8.29e9  # Qwen2.5-VL-7B
VAE_PARAMS = 0.127e9

# Linear weights inside the 60 blocks, both streams: q/k/v/out (4 H^2), MLP (2 H M), AdaLN modulation
# (H -> 6H). torchao's FP8 configs quantize these; embeddings, norms and the output head stay bf16.
BLOCK_LINEAR_PARAMS = BLOCKS * 2 * (4 * HIDDEN**2 + 2 * HIDDEN * MLP + 6 * HIDDEN**2)  # 20.38e9

# Activation memory is estimated per placement in probes/memory_plan, fitted on peaks measured with the
# full pipeline (benchmarks/h200/memory).


def image_tokens(width: int, height: int) -> int:
    """VAE 8x down, 2x2 patches: 1328x1328 -> 83 * 83 = 6889."""
    return (height // 16) * (width // 16)


def seq_len(width: int, height: int, text_tokens: int) -> int:
    """Joint attention sequence: image + text tokens (7017 at 1328x1328 with 128 text tokens)."""
    return image_tokens(width, height) + text_tokens


def linear_flops(tokens: int, blocks: int, hidden: int, mlp: int) -> float:
    """Matmul FLOPs of `blocks` blocks' q/k/v/out (4 H^2) and MLP (2 H M) for `tokens` tokens, batch 1."""
    return 2.0 * blocks * (4 * hidden**2 + 2 * hidden * mlp) * tokens


def linear_flops_per_pass(tokens: int) -> float:
    """Matmul FLOPs of the 60 blocks' q/k/v/out and MLP for `tokens` (image + text) tokens, batch 1."""
    return linear_flops(tokens, BLOCKS, HIDDEN, MLP)


def attention_flops_one_call(s: int, heads: int = HEADS, head_dim: int = HEAD_DIM) -> float:
    """QK^T and PV of one attention call, batch 1: 2 matmuls * 2 FLOP * S^2 * H * D."""
    return 4.0 * s * s * heads * head_dim


def attention_flops_per_pass(s: int) -> float:
    return BLOCKS * attention_flops_one_call(s)


def flops_per_step_from_config(config: Mapping[str, Any], width: int, height: int, text_tokens: int,
                               passes: int, image_tokens: int | None = None) -> dict[str, float]:
    """Matmul and attention FLOPs of one denoising step of any MMDiT transformer of this shape, from its
    config (num_layers, num_attention_heads, attention_head_dim; the MLP is MLP_RATIO x hidden, as diffusers'
    FeedForward): {"linear", "attention", "total"}. `passes`: transformer calls a step (2 with true CFG).
    `image_tokens`: the pass's image tokens where they are not the output's alone (an edit appends its inputs')."""
    blocks, heads, head_dim = (int(config[name]) for name in ("num_layers", "num_attention_heads",
                                                               "attention_head_dim"))
    hidden = heads * head_dim
    s = seq_len(width, height, text_tokens) if image_tokens is None else image_tokens + text_tokens
    linear = linear_flops(s, blocks, hidden, MLP_RATIO * hidden)
    attention = blocks * attention_flops_one_call(s, heads, head_dim)
    return {"linear": passes * linear, "attention": passes * attention, "total": passes * (linear + attention)}


def flops_per_pass(width: int, height: int, text_tokens: int) -> dict[str, float]:
    return flops_per_step_from_config(QWEN_IMAGE_TRANSFORMER, width, height, text_tokens, passes=1)


def flops_per_step(width: int, height: int, text_tokens: int) -> dict[str, float]:
    return flops_per_step_from_config(QWEN_IMAGE_TRANSFORMER, width, height, text_tokens, passes=PASSES_PER_STEP)


def weight_bytes(params: float, bytes_per_param: float = 2.0) -> float:
    return params * bytes_per_param


def transformer_bytes(fp8: bool = False) -> float:
    """bf16: 2 B/param everywhere; FP8: 1 B/param for the blocks' linear weights, the rest stays bf16."""
    if not fp8:
        return weight_bytes(TRANSFORMER_PARAMS)
    quantized = min(BLOCK_LINEAR_PARAMS, TRANSFORMER_PARAMS)
    return weight_bytes(quantized, 1.0) + weight_bytes(TRANSFORMER_PARAMS - quantized)

