"""Model sources for `--model`: `tiny`, `synthetic`, or a local path / Hugging Face id already in the cache.

Everything here is offline: weights are never downloaded, `trust_remote_code` is never set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from importlib import resources
from typing import Any

from probes.context import first_line
from qwendoctor.errors import UsageError

BUILTIN_MODELS = ("tiny", "synthetic")
# Image side when --width/--height are not given: tiny's VAE and transformer are sized for 128x128; Qwen-Image's
# default is 1328x1328.
DEFAULT_SIDES = {"tiny": 128}
DEFAULT_SIDE = 1328


def default_side(model: str) -> int:
    return DEFAULT_SIDES.get(model, DEFAULT_SIDE)
# Built-in models with random weights draw noise: PSNR/SSIM against their reference renders speak for numerical
# fidelity only, never for what fewer steps or a cache do to an image. `tiny` is trained (qwendoctor.tiny) and draws.
RANDOM_WEIGHTS = ("synthetic",)


@dataclasses.dataclass
class LoadedModel:
    """A built pipeline plus what the runner needs to feed it."""

    pipe: Any  # diffusers.QwenImagePipeline
    model_id: str
    revision: str | None
    device: str
    dtype: str
    # synthetic has no text encoder: prompts map to seeded random embeddings of this many tokens
    synthetic_text_tokens: int | None = None

    @property
    def has_text_encoder(self) -> bool:
        return self.synthetic_text_tokens is None


def draws(model_id: str) -> bool:
    """Whether the model draws what it is asked (trained weights), so that quality judges lossy settings."""
    return model_id not in RANDOM_WEIGHTS


def transformer_blocks(model_id: str) -> int | None:
    """The built-in models' transformer block counts, from the configs they ship; None for other models."""
    if model_id == "tiny":
        from qwendoctor.tiny import trained

        return trained.read_config()["model"]["transformer"]["num_layers"]
    if model_id == "synthetic":
        return _package_json("qwendoctor", "synthetic.json")["transformer"]["num_layers"]
    return None


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> str:
    # bf16 on the CPU is emulated and several times slower than float32: the tiny model runs in float32 there.
    return "bfloat16" if device == "cuda" else "float32"


def quiet_libraries() -> None:
    """diffusers and transformers log at warning level about things that are expected here (attention
    backends being experimental, a dtype cast of random weights); keep the user's terminal for our output."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()


ATTENTION_ENV = "DIFFUSERS_ATTN_BACKEND"


def check_diffusers_env() -> None:
    """diffusers reads DIFFUSERS_ATTN_BACKEND when its models are first imported and refuses a name it does not
    know with an import error ("look up to see its traceback") whose cause is chained below it: named here, in
    one line, before anything loads."""
    value = os.environ.get(ATTENTION_ENV)
    if value is None:
        return
    try:
        import diffusers.models.attention_dispatch  # noqa: F401
    except Exception as error:
        cause = root_cause(error)
        if value not in str(cause) and "AttentionBackendName" not in str(cause):
            raise
        raise UsageError(f"{ATTENTION_ENV}={value!r}: diffusers refuses it ({first_line(cause)}); unset it "
                         "(qwendoctor sets the tuned attention backend itself)") from None


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception of a chain: what libraries that re-raise as "failed to import X" hide."""
    seen = {id(error)}
    while (error.__cause__ or error.__context__) is not None and id(error.__cause__ or error.__context__) not in seen:
        error = error.__cause__ or error.__context__
        seen.add(id(error))
    return error


def load_model(model: str, device: str, dtype: str) -> LoadedModel:
    """Build the pipeline for `model` on `device` in `dtype`, raising a one-line UsageError if it cannot."""
    check_diffusers_env()
    quiet_libraries()
    if model == "tiny":
        return _load_tiny(device, dtype)
    if model == "synthetic":
        return _load_synthetic(device, dtype)
    return _load_pretrained(model, device, dtype)


def _torch_dtype(dtype: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]


def _package_json(package: str, name: str) -> dict[str, Any]:
    return json.loads(resources.files(package).joinpath(name).read_text())


def _load_tiny(device: str, dtype: str) -> LoadedModel:
    from qwendoctor.tiny import trained

    pipe = trained.load_trained_tiny(device, dtype)
    return LoadedModel(pipe=pipe, model_id="tiny", revision=trained.revision(), device=device, dtype=dtype)


def _load_synthetic(device: str, dtype: str) -> LoadedModel:
    import torch
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    resolve_model("synthetic", device)
    config = _package_json("qwendoctor", "synthetic.json")
    transformer = build_synthetic_transformer(config["transformer"], device, _torch_dtype(dtype), seed=0)
    torch.manual_seed(1)
    vae = AutoencoderKLQwenImage(**config["vae"]).to(device=device, dtype=_torch_dtype(dtype))
    scheduler = FlowMatchEulerDiscreteScheduler(**config["scheduler"])
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
                             transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return LoadedModel(pipe=pipe, model_id="synthetic", revision=_config_revision(config), device=device,
                       dtype=dtype, synthetic_text_tokens=config["text_tokens"])


def build_synthetic_transformer(config: dict[str, Any], device: str, dtype, seed: int):
    """The transformer with random weights made on `device` in `dtype`: no full-precision or CPU copy.

    Built on the meta device, then each parameter is allocated where it runs and filled there (matrices
    normal with std 1/sqrt(fan_in), norm weights 1, biases 0).
    """
    import torch
    from diffusers import QwenImageTransformer2DModel

    with torch.device("meta"):
        transformer = QwenImageTransformer2DModel(**config)
    transformer = transformer.to(dtype=dtype).to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if param.ndim >= 2:
                fan_in = math.prod(param.shape[1:])
                param.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=generator)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)
    return rebuild_rotary_tables(transformer).eval()


def rebuild_rotary_tables(transformer):
    """The rotary tables are plain tensor attributes (complex, not buffers): a transformer built on the meta
    device has them empty, and neither `to_empty` nor `load_state_dict` fills them. Make them again."""
    rope = transformer.pos_embed
    transformer.pos_embed = type(rope)(theta=rope.theta, axes_dim=list(rope.axes_dim), scale_rope=rope.scale_rope)
    return transformer


def pristine_transformer_source(model: LoadedModel):
    """A function that returns a new transformer with `model`'s original weights, on its device.

    The tuner quantizes and compiles the transformer in place; neither can be undone, so a later trial that
    needs it bf16 and eager gets a new one from here instead of loading the whole pipeline again. `synthetic`
    regenerates its seeded weights on the GPU (faster than any copy); other models keep a CPU copy of the
    weights, made now, before any lever touched them (41 GB of host memory for the full Qwen-Image)."""
    import torch

    if model.model_id == "synthetic":
        config = _package_json("qwendoctor", "synthetic.json")["transformer"]
        return lambda: build_synthetic_transformer(config, model.device, _torch_dtype(model.dtype), seed=0)
    original = model.pipe.transformer
    kind, config = type(original), dict(original.config)
    # Non-persistent buffers are not in the state dict: they are kept too.
    persistent = {name: tensor.detach().to("cpu", copy=True) for name, tensor in original.state_dict().items()}
    buffers = {name: tensor.detach().to("cpu", copy=True) for name, tensor in original.named_buffers()
               if name not in persistent}

    def fresh():
        with torch.device("meta"):
            transformer = kind.from_config(config)
        transformer = transformer.to(dtype=_torch_dtype(model.dtype)).to_empty(device=model.device)
        transformer.load_state_dict(persistent)
        for name, tensor in buffers.items():
            owner, _, leaf = name.rpartition(".")
            transformer.get_submodule(owner).register_buffer(leaf, tensor.to(model.device), persistent=False)
        return rebuild_rotary_tables(transformer).eval()

    return fresh


def resolve_model(model: str, device: str) -> str:
    """Where `model`'s weights are, checked before any work starts: a builtin name, a directory, or the
    snapshot of a Hugging Face id in the local cache. Raises a one-line UsageError saying how to get it."""
    if model == "synthetic" and device != "cuda":
        raise UsageError("model 'synthetic' is the full 20B transformer (41 GB in bf16) and needs a CUDA GPU; "
                         "use --model tiny on this machine")
    if model in BUILTIN_MODELS:
        return model
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        return path
    if "/" not in model or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise UsageError(f"unknown model {model!r}: use tiny, synthetic, a local directory, or a Hugging Face id "
                         "already downloaded (huggingface-cli download Qwen/Qwen-Image)")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model, local_files_only=True)
    except Exception:  # not in the cache (offline: never fetched here)
        raise UsageError(f"model {model!r} is not in the local Hugging Face cache; download it first: "
                         f"huggingface-cli download {model}") from None


def _load_pretrained(model: str, device: str, dtype: str) -> LoadedModel:
    from diffusers import QwenImagePipeline

    path = resolve_model(model, device)
    try:
        pipe = QwenImagePipeline.from_pretrained(path, torch_dtype=_torch_dtype(dtype), local_files_only=True)
    except (OSError, ValueError) as error:
        raise UsageError(f"model {model!r} is not available offline ({first_line(error, 160)}); "
                         f"download it first: huggingface-cli download {model}") from None
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return LoadedModel(pipe=pipe, model_id=model, revision=_pretrained_revision(pipe), device=device, dtype=dtype)


def builtin_revision(model_id: str) -> str | None:
    """A built-in model's revision without building it (None for other models): what a cached reference render
    must have been made with."""
    if model_id == "tiny":
        from qwendoctor.tiny import trained

        return trained.revision()
    if model_id == "synthetic":
        return _config_revision(_package_json("qwendoctor", "synthetic.json"))
    return None


def _config_revision(config: dict[str, Any]) -> str:
    """A revision for built-in models: the hash of their config, so a changed config invalidates old locks."""
    return "config-" + hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def _pretrained_revision(pipe) -> str | None:
    name_or_path = getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path")
    if name_or_path and "snapshots" in str(name_or_path):
        return os.path.basename(os.path.normpath(str(name_or_path)))
    return None


def prompt_inputs(model: LoadedModel, prompt: str, negative_prompt: str | None) -> dict[str, Any]:
    """The pipeline's text inputs: the strings, or for `synthetic` random embeddings seeded by the text."""
    if model.has_text_encoder:
        inputs = {"prompt": prompt}
        if negative_prompt is not None:
            inputs["negative_prompt"] = negative_prompt
        return inputs
    inputs = {"prompt_embeds": _synthetic_embeddings(model, prompt)}
    if negative_prompt is not None:
        inputs["negative_prompt_embeds"] = _synthetic_embeddings(model, negative_prompt)
    return inputs


def _synthetic_embeddings(model: LoadedModel, text: str):
    import torch

    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    width = model.pipe.transformer.config.joint_attention_dim
    embeddings = torch.randn(1, model.synthetic_text_tokens, width, generator=generator)
    return embeddings.to(device=model.device, dtype=_torch_dtype(model.dtype))
