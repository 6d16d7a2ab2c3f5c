"""What the two adapter trainers of `tiny` share: which linears a LoRA adapts, how it is saved, how a pipeline
renders with it.

The adapters must load with diffusers' own LoRA loader (`pipe.load_lora_weights(path)`, peft underneath), the way
a user loads a Qwen-Image LoRA, so they are attached with diffusers' `add_adapter` and saved with
`QwenImagePipeline.save_lora_weights`: the keys are then the ones the loader expects (`transformer.<module>.lora_A
.weight`). lora_alpha equals the rank, so the loader's default scale (alpha/rank = 1) is the trained one even
without the peft metadata.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

# The base model's own prompt encoding, so the adapters train on the embeddings it was trained on.
from qwendoctor.tiny.train import encode_prompts  # noqa: F401  (lora.encode_prompts)

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_NAME = "adapter.json"
# Every linear of the 8 blocks: attention of both streams, both MLPs and the timestep modulations (a few-step
# student must change how each block responds to the noise level, and that enters through img_mod/txt_mod).
TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                  "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
                  "img_mod.1", "txt_mod.1"]
IMAGE_SIZE = 128
NEGATIVE_PROMPT = " "


def trainer_arguments(parser, steps: int, steps_help: str, eval_every: int, eval_help: str) -> None:
    """The options both adapter trainers take (seed, output, optimizer, progress); each adds its own."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=steps, help=steps_help)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-every", type=int, default=eval_every, help=eval_help)
    parser.add_argument("--eval-prompts", type=int, default=16)


def load_base():
    """tiny's trained pipeline on one CPU thread (the trainers' reproducibility is a one-thread claim), and the
    seed of its train/held-out split."""
    import os

    import torch

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    from qwendoctor.models import quiet_libraries
    from qwendoctor.tiny.trained import load_trained_tiny, read_config

    quiet_libraries()
    return load_trained_tiny("cpu", "float32"), read_config()["training"]["seed"]


def progress_prompts(split_seed: int, count: int) -> list[str] | None:
    """Held-out prompts from the back of the list (the benchmarks measure the front), never trained on: for the
    trainers' progress lines only."""
    from qwendoctor.tiny import shapes

    return shapes.held_out_prompts(split_seed)[-count:] if count else None


def attach(transformer, rank: int, seed: int):
    """A fresh LoRA on `transformer` (its base weights frozen); returns the trainable parameters. lora_B starts at
    zero, so the adapted model starts as the base; lora_A's init is drawn from the seeded torch RNG."""
    import torch
    from peft import LoraConfig

    transformer.requires_grad_(False)
    torch.manual_seed(seed)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True,
                                       target_modules=TARGET_MODULES))
    return [parameter for name, parameter in transformer.named_parameters() if "lora_" in name]


def save(transformer, directory: Path, metadata: dict[str, Any]) -> None:
    from diffusers import QwenImagePipeline
    from peft.utils import get_peft_model_state_dict

    directory.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().clone().contiguous() for key, value in get_peft_model_state_dict(transformer).items()}
    QwenImagePipeline.save_lora_weights(str(directory), transformer_lora_layers=state, weight_name=WEIGHT_NAME)
    (directory / METADATA_NAME).write_text(json.dumps(metadata, indent=1) + "\n")


def scheduler_for(pipe, overrides: dict[str, Any]):
    """The pipeline's scheduler with `overrides` applied to its config (what a distilled LoRA declares)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(dict(pipe.scheduler.config) | overrides)


def sigmas_for(pipe, steps: int, overrides: dict[str, Any] | None = None, tokens: int = 64):
    """The N+1 sigmas (the last 0) that `QwenImagePipeline` visits at `steps` steps with these overrides."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    scheduler = scheduler_for(pipe, overrides or {})
    config = scheduler.config
    mu = calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                         config.get("base_shift", 0.5), config.get("max_shift", 1.15))
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return scheduler.sigmas.clone()


def cosine_lr(base: float, step: int, total: int, warmup: int = 50) -> float:
    return base * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / total)))
