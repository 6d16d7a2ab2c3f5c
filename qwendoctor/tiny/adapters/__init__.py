"""The LoRA adapters shipped for `tiny`, and what each declares about how it must be run.

A user of Qwen-Image runs LoRAs: few-step distilled ones to go fast, style ones for the look. The built-in model
ships one of each so that every LoRA path of qwendoctor (loading, fusing, hotswapping, the distilled-adapter lever
and its floor against the base's reference) can be exercised and judged on the CPU:

- `distilled` (`python -m qwendoctor.tiny.distill`): 4 or 8 steps, true CFG off, with the scheduler overrides it
  declares (Qwen-Image-Lightning's), the sigmas it was trained at.
- `frame` (`python -m qwendoctor.tiny.style`): draws every picture inside a border; `shapes.style_present` reads
  it from the pixels.

Each lives in `<name>/`: `pytorch_lora_weights.safetensors` (diffusers' LoRA format: `pipe.load_lora_weights(
path(name))` loads it through peft) and `adapter.json` (`metadata(name)`).
"""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path
from typing import Any

from qwendoctor.tiny.lora import METADATA_NAME, WEIGHT_NAME

NAMES = ("distilled", "frame")
KINDS = ("distilled", "style")


def directory(name: str) -> Path:
    if name not in NAMES:
        raise KeyError(f"no tiny adapter {name!r}; shipped: {', '.join(NAMES)}")
    return Path(str(resources.files("qwendoctor.tiny.adapters").joinpath(name)))


def path(name: str) -> Path:
    """The adapter's safetensors file, as `pipe.load_lora_weights` and `--lora PATH` take it."""
    return directory(name) / WEIGHT_NAME


def metadata(name: str) -> dict[str, Any]:
    """The adapter's declaration, validated: kind ("distilled" or "style"), the step counts it is meant for,
    true_cfg_scale (1.0 means CFG off: pass no negative prompt), scheduler (overrides of the pipeline's scheduler
    config, {} for none), rank, and how it was trained."""
    data = json.loads((directory(name) / METADATA_NAME).read_text())
    validate(data)
    return data


def validate(data: dict[str, Any]) -> None:
    """ValueError, in one line, for a declaration a runner could not follow."""
    if data.get("kind") not in KINDS:
        raise ValueError(f"adapter kind must be one of {KINDS}, got {data.get('kind')!r}")
    steps = data.get("steps")
    if not steps or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in steps):
        raise ValueError(f"adapter steps must be a non-empty list of positive integers, got {steps!r}")
    scale = data.get("true_cfg_scale")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) or scale < 1.0:
        raise ValueError(f"adapter true_cfg_scale must be a finite number >= 1, got {scale!r}")
    if data["kind"] == "distilled" and scale != 1.0:
        raise ValueError("a distilled adapter runs with CFG off: true_cfg_scale must be 1.0")
    if not isinstance(data.get("scheduler"), dict):
        raise ValueError(f"adapter scheduler must be a dict of config overrides, got {data.get('scheduler')!r}")
    rank = data.get("rank")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(f"adapter rank must be a positive integer, got {rank!r}")


def sha256(name: str) -> str:
    import hashlib

    return hashlib.sha256(path(name).read_bytes()).hexdigest()


def scheduler(pipe, name: str):
    """`pipe`'s scheduler with the adapter's declared overrides (a new object; `pipe` is not changed)."""
    from qwendoctor.tiny.lora import scheduler_for

    return scheduler_for(pipe, metadata(name)["scheduler"])


def load(pipe, name: str, adapter_name: str | None = None):
    """Load the adapter into `pipe` with diffusers' loader and install its scheduler overrides; returns the keyword
    arguments a render needs (num_inference_steps: its first step count; true_cfg_scale; negative_prompt only when
    CFG is on)."""
    data = metadata(name)
    pipe.load_lora_weights(str(path(name)), adapter_name=adapter_name or name)
    pipe.scheduler = scheduler(pipe, name)
    kwargs: dict[str, Any] = {"num_inference_steps": data["steps"][0], "true_cfg_scale": data["true_cfg_scale"]}
    if data["true_cfg_scale"] > 1.0:
        kwargs["negative_prompt"] = " "
    return kwargs
