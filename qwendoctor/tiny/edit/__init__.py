"""The `tiny` edit model: diffusers' QwenImageEditPipeline over tiny's components, its transformer fine-tuned by
`python -m qwendoctor.tiny.edit_train` on the procedural edits of `qwendoctor.tiny.edit_data`.

Only the transformer is new (`transformer.safetensors` here, fp16); the VAE and the text encoder (with its
vision tower, random and frozen as tiny built it) are tiny's own files in `qwendoctor/tiny/trained/`. The
tokenizer is tiny's with Qwen2-VL's vision markers added and the image processor is built locally at
Qwen2.5-VL-7B's settings (`qwendoctor.models.edit_processor`): nothing is downloaded.
"""

from __future__ import annotations

import copy
import hashlib
import json
import threading
from importlib import resources
from pathlib import Path
from typing import Any

from diffusers import QwenImageEditPipeline
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit

WEIGHT_FILE = "transformer.safetensors"
IMAGE_SIZE = 128
_area_lock = threading.Lock()


class QwenImageEditPipelineTiny(QwenImageEditPipeline):
    """QwenImageEditPipeline, with the input image kept at `input_area` pixels instead of ~1 MP.

    diffusers resizes the input to `calculate_dimensions(1024 * 1024, ratio)` inside `__call__`, a module-level
    function no argument reaches; the output size follows it unless height/width are given, and the image
    latents' place in `img_shapes` always does. tiny sees 128x128 (64 latent tokens): at 1 MP the input alone
    would be 4,096 tokens the model never trained on. So this subclass changes only that function's target area,
    for the duration of its own call (under a lock: the function is shared by every pipeline in the process);
    everything else is diffusers' own pipeline. Its name begins with diffusers' class name because libraries find
    their support for a pipeline by that prefix (cache-dit's BlockAdapterRegister: "QwenImage")."""

    input_area = IMAGE_SIZE * IMAGE_SIZE

    def __call__(self, *args, **kwargs):
        original = pipeline_qwenimage_edit.calculate_dimensions
        with _area_lock:
            pipeline_qwenimage_edit.calculate_dimensions = lambda target_area, ratio: original(self.input_area, ratio)
            try:
                return super().__call__(*args, **kwargs)
            finally:
                pipeline_qwenimage_edit.calculate_dimensions = original


def shipped_dir() -> Path:
    return Path(str(resources.files("qwendoctor.tiny").joinpath("edit")))


def edit_model_config(base_config: dict[str, Any], tokenizer) -> dict[str, Any]:
    """tiny's model config with the text encoder naming the ids the vision markers got in `tokenizer`."""
    from qwendoctor.models import with_vision_tokens

    config = copy.deepcopy(base_config)
    _, config["text_encoder"] = with_vision_tokens(tokenizer, config["text_encoder"])
    return config


def make_edit_pipeline(components: dict[str, Any]) -> QwenImageEditPipelineTiny:
    """The edit pipeline over tiny's components (from `trained.build_components`), its tokenizer given the
    vision markers, its processor built locally and the template's drop index counted in this tokenizer."""
    from qwendoctor.models import edit_processor, edit_template_start

    tokenizer = components["tokenizer"]
    if "<|image_pad|>" not in tokenizer.get_vocab():
        raise ValueError("the tokenizer has no vision markers: build the components from edit_model_config")
    pipe = QwenImageEditPipelineTiny(**components, processor=edit_processor(tokenizer))
    pipe.prompt_template_encode_start_idx = edit_template_start(pipe, tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def base_components(base_dir: Path | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(components, model config): tiny's trained components, the text encoder configured for vision markers
    the tokenizer now has. The trainer's starting point; the loader then swaps in the edit transformer."""
    from safetensors.torch import load_model
    from transformers import Qwen2Tokenizer

    from qwendoctor.tiny import trained

    base_dir = base_dir or trained.shipped_dir()
    tokenizer = Qwen2Tokenizer.from_pretrained(trained.tokenizer_dir())
    config = edit_model_config(trained.read_config(base_dir)["model"], tokenizer)
    components = trained.build_components(config)
    components["tokenizer"] = tokenizer
    for name in ("transformer", "vae", "text_encoder"):
        load_model(components[name], str(base_dir / f"{name}.safetensors"), strict=True)
    return components, config


def read_config(directory: Path | None = None) -> dict[str, Any]:
    return json.loads(((directory or shipped_dir()) / "config.json").read_text())


def revision(directory: Path | None = None) -> str:
    """A hash of the edit transformer, its config and the tiny files it runs with."""
    from qwendoctor.tiny import trained

    directory = directory or shipped_dir()
    digest = hashlib.sha256(trained.revision().encode())
    for name in ("config.json", WEIGHT_FILE):
        digest.update(name.encode())
        digest.update((directory / name).read_bytes())
    return "edit-" + digest.hexdigest()[:12]


def load_tiny_edit_pipeline(device: str = "cpu", dtype: str = "float32", directory: Path | None = None):
    """A ready QwenImageEditPipelineTiny (progress bar off) from the shipped files, on `device` in `dtype`: give
    it a 128x128 image and an instruction, get a 128x128 edit."""
    import torch
    from safetensors.torch import load_model

    directory = directory or shipped_dir()
    components, _ = base_components()
    # strict: a shipped file that no longer matches the class must fail here, not draw noise later
    load_model(components["transformer"], str(directory / WEIGHT_FILE), strict=True)
    pipe = make_edit_pipeline(components)
    pipe.to(device=device, dtype={"float32": torch.float32, "bfloat16": torch.bfloat16,
                                  "float16": torch.float16}[dtype])
    return pipe
