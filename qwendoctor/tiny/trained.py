"""The `tiny` model: Qwen-Image's diffusers/transformers classes at toy size, with weights that draw.

A model with random weights draws noise, so a quality floor measured on it says nothing about fewer steps or
caches. These weights were trained by `python -m qwendoctor.tiny.train` on the procedural shapes of
`qwendoctor.tiny.shapes` and draw what their prompts ask. Everything is read from files shipped in
`qwendoctor/tiny/trained/`: no network, no seeded re-initialisation.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any

WEIGHT_FILES = ("transformer.safetensors", "vae.safetensors", "text_encoder.safetensors")


def shipped_dir() -> Path:
    return Path(str(resources.files("qwendoctor.tiny").joinpath("trained")))


def tokenizer_dir() -> str:
    """The tokenizer shipped with the random tiny model: the trained one reads prompts the same way."""
    return str(resources.files("qwendoctor.tiny"))


def build_components(config: dict[str, Any]) -> dict[str, Any]:
    """The pipeline's components for `config` with freshly initialised weights (the trainer's starting point,
    and the shells the loader fills)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    return {
        "transformer": QwenImageTransformer2DModel(**config["transformer"]),
        "vae": AutoencoderKLQwenImage(**config["vae"]),
        "text_encoder": Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config["text_encoder"])).eval(),
        "tokenizer": Qwen2Tokenizer.from_pretrained(tokenizer_dir()),
        "scheduler": FlowMatchEulerDiscreteScheduler(**config["scheduler"]),
    }


def make_pipeline(components: dict[str, Any]):
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def read_config(directory: Path | None = None) -> dict[str, Any]:
    return json.loads(((directory or shipped_dir()) / "config.json").read_text())


def revision(directory: Path | None = None) -> str:
    """A hash of the shipped weights and config: a retrained model invalidates locks made with the old one."""
    directory = directory or shipped_dir()
    digest = hashlib.sha256()
    for name in ("config.json", *WEIGHT_FILES):
        digest.update(name.encode())
        digest.update((directory / name).read_bytes())
    return "trained-" + digest.hexdigest()[:12]


def load_trained_tiny(device: str = "cpu", dtype: str = "float32", directory: Path | None = None):
    """A ready QwenImagePipeline (progress bar off) from the shipped files, on `device` in `dtype`."""
    import torch
    from safetensors.torch import load_model

    directory = directory or shipped_dir()
    components = build_components(read_config(directory)["model"])
    for name in ("transformer", "vae", "text_encoder"):
        # strict: a shipped file that no longer matches the classes must fail here, not draw noise later
        load_model(components[name], str(directory / f"{name}.safetensors"), strict=True)
    pipe = make_pipeline(components)
    pipe.to(device=device, dtype={"float32": torch.float32, "bfloat16": torch.bfloat16,
                                  "float16": torch.float16}[dtype])
    return pipe
