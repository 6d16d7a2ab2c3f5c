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


DEFAULT_TRUE_CFG_SCALE = 4.0  # diffusers' Qwen-Image pipelines' default


def default_true_cfg_scale(model: str, task: str) -> float:
    """The true CFG scale a workload runs at when --true-cfg-scale is not given: diffusers' default, except for
    tiny's edit model, which records the scale it was trained for (its config.json, read without importing
    diffusers: a usage error is answered before torch loads)."""
    if model == "tiny" and task == "edit":
        config = json.loads(resources.files("qwendoctor.tiny").joinpath("edit", "config.json").read_text())
        return float(config.get("reference_true_cfg_scale", DEFAULT_TRUE_CFG_SCALE))
    return DEFAULT_TRUE_CFG_SCALE
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
    # a pipeline without a text encoder (the `synthetic` config's "text_encoder": null): prompts map to seeded
    # random embeddings of this many tokens
    synthetic_text_tokens: int | None = None

    @property
    def has_text_encoder(self) -> bool:
        return self.synthetic_text_tokens is None


# diffusers' pipeline for each task (probes.workload.TASKS); all of them call the same QwenImageTransformer2DModel.
TASK_PIPELINES = {"generate": "QwenImagePipeline", "edit": "QwenImageEditPipeline",
                  "img2img": "QwenImageImg2ImgPipeline", "inpaint": "QwenImageInpaintPipeline"}
# A checkpoint's pipeline class (model_index.json) that edits, and how many input images it takes.
EDIT_PIPELINES = {"QwenImageEditPipeline": 1, "QwenImageEditPlusPipeline": None}


def check_task(model: str, task: str) -> int | None:
    """Refuse, before anything loads, a task this model has no pipeline for; for an edit, the input images its
    pipeline takes (None: any number up to the workload's limit)."""
    if task != "edit":
        return None
    if model in BUILTIN_MODELS:  # tiny's edit model (qwendoctor/tiny/edit) and synthetic's: one input image
        return EDIT_PIPELINES[TASK_PIPELINES["edit"]]
    # The device only decides whether synthetic can run: any names where a checkpoint is.
    return EDIT_PIPELINES[_edit_pipeline_name(model, resolve_model(model, "cuda"))]


def _edit_pipeline_name(model: str, path: str) -> str:
    """The edit pipeline a checkpoint names in its model_index.json, or a one-line refusal."""
    index = os.path.join(path, "model_index.json")
    try:
        name = json.loads(open(index, encoding="utf-8").read()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        raise UsageError(f"model {model!r}: no readable model_index.json in {path}; --task edit needs a "
                         "diffusers checkpoint of Qwen-Image-Edit") from None
    if name not in EDIT_PIPELINES:
        raise UsageError(f"model {model!r} is a {name} checkpoint, not an edit model; --task edit needs "
                         "Qwen/Qwen-Image-Edit (QwenImageEditPipeline) or Qwen/Qwen-Image-Edit-2509 "
                         "(QwenImageEditPlusPipeline)")
    return name


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


def transformer_config(model_id: str) -> dict[str, Any] | None:
    """The built-in models' transformer configs, as they ship; None for other models."""
    if model_id == "tiny":
        from qwendoctor.tiny import trained

        return dict(trained.read_config()["model"]["transformer"])
    if model_id == "synthetic":
        return dict(_package_json("qwendoctor", "synthetic.json")["transformer"])
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


def load_model(model: str, device: str, dtype: str, on_cpu: frozenset[str] = frozenset(),
               task: str = "generate") -> LoadedModel:
    """Build the pipeline of `task` (diffusers' own: TASK_PIPELINES) for `model` on `device` in `dtype`, raising a
    one-line UsageError if it cannot.

    `on_cpu`: components left in host memory (levers.load_on_cpu), for a placement that moves them itself: a
    card that cannot hold the whole pipeline must never receive it whole."""
    check_diffusers_env()
    quiet_libraries()
    if model == "tiny":
        loaded = _load_tiny(device, dtype, task)
    elif model == "synthetic":
        loaded = _load_synthetic(device, dtype, on_cpu, task)
    else:
        loaded = _load_pretrained(model, device, dtype, on_cpu, task)
    # Where the pipeline runs, for placement levers that find a component in host memory (levers.target_device).
    object.__setattr__(loaded.pipe, "_qwendoctor_device", device)
    return loaded


def _torch_dtype(dtype: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]


def _package_json(package: str, name: str) -> dict[str, Any]:
    return json.loads(resources.files(package).joinpath(name).read_text())


def task_pipeline(task: str, components: dict[str, Any]):
    """diffusers' pipeline of `task` from a text-to-image pipeline's components (and, for an edit, a processor)."""
    import diffusers

    pipe = getattr(diffusers, TASK_PIPELINES[task])(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_tiny(device: str, dtype: str, task: str = "generate") -> LoadedModel:
    from qwendoctor.tiny import trained

    if task == "edit":  # its own transformer, fine-tuned on the shapes world's edits (qwendoctor.tiny.edit_train)
        from qwendoctor.tiny import edit

        return LoadedModel(pipe=edit.load_tiny_edit_pipeline(device, dtype), model_id="tiny",
                           revision=edit.revision(), device=device, dtype=dtype)
    pipe = trained.load_trained_tiny(device, dtype)
    if task != "generate":  # image-to-image and inpainting take the text-to-image components as they are
        pipe = task_pipeline(task, dict(pipe.components))
    return LoadedModel(pipe=pipe, model_id="tiny", revision=trained.revision(), device=device, dtype=dtype)


def _load_synthetic(device: str, dtype: str, on_cpu: frozenset[str] = frozenset(),
                    task: str = "generate") -> LoadedModel:
    resolve_model("synthetic", device)
    return build_synthetic(_package_json("qwendoctor", "synthetic.json"), device, dtype, on_cpu, task)


def build_synthetic(config: dict[str, Any], device: str, dtype: str, on_cpu: frozenset[str] = frozenset(),
                    task: str = "generate") -> LoadedModel:
    """The `synthetic` pipeline of `task` from `config` (synthetic.json, or the same layout at toy size for the
    CPU tests). For an edit the text encoder runs its vision tower on the input image, as Qwen-Image-Edit's does:
    the prompt's embeddings then hold about 1,400 tokens of it at 1 MP (edit_processor)."""
    import torch
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler

    where = {name: "cpu" if name in on_cpu else device for name in ("transformer", "text_encoder", "vae")}
    transformer = build_synthetic_transformer(config["transformer"], device, _torch_dtype(dtype), seed=0,
                                              storage=where["transformer"])
    text_encoder = tokenizer = processor = None
    if config["text_encoder"] is not None:
        tokenizer, encoder_config = synthetic_tokenizer(), config["text_encoder"]
        if task == "edit":
            tokenizer, encoder_config = with_vision_tokens(tokenizer, encoder_config)
            processor = edit_processor(tokenizer)
        text_encoder = build_synthetic_text_encoder(encoder_config, device, _torch_dtype(dtype), seed=2,
                                                    storage=where["text_encoder"])
    torch.manual_seed(1)
    vae = AutoencoderKLQwenImage(**config["vae"]).to(device=where["vae"], dtype=_torch_dtype(dtype))
    scheduler = FlowMatchEulerDiscreteScheduler(**config["scheduler"])
    components = dict(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                      transformer=transformer)
    if task == "edit":
        components["processor"] = processor
    pipe = task_pipeline(task, components)
    if task == "edit" and tokenizer is not None:
        pipe.prompt_template_encode_start_idx = edit_template_start(pipe, tokenizer)
    return LoadedModel(pipe=pipe, model_id="synthetic", revision=_config_revision(config), device=device,
                       dtype=dtype, synthetic_text_tokens=None if text_encoder is not None else config["text_tokens"])


# Qwen2-VL's vision markers, which the edit prompt template holds and Qwen's tokenizer has as special tokens.
VISION_TOKENS = {"vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
                 "vision_token_id": "<|vision_pad|>", "image_token_id": "<|image_pad|>",
                 "video_token_id": "<|video_pad|>"}
# Qwen2.5-VL-7B-Instruct's preprocessor_config.json, which Qwen-Image-Edit ships as its processor: a 1024x1024
# input becomes 74x74 patches of 14 px, merged 2x2 into 1,369 tokens of the prompt.
EDIT_IMAGE_PROCESSOR = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                        "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                        "image_std": [0.26862954, 0.26130258, 0.27577711]}


def with_vision_tokens(tokenizer, encoder_config: dict[str, Any]):
    """The synthetic tokenizer with Qwen2-VL's vision markers added, and the text encoder's config naming the ids
    they got (the text-to-image vocabulary of tiny has none; the random encoder reads any id alike)."""
    tokenizer.add_tokens(list(VISION_TOKENS.values()), special_tokens=True)
    config = dict(encoder_config)
    config.update({field: tokenizer.convert_tokens_to_ids(token) for field, token in VISION_TOKENS.items()})
    return tokenizer, config


def edit_processor(tokenizer):
    """QwenImageEditPipeline's processor built here (Qwen's own cannot be downloaded): transformers' Qwen2-VL
    processor with the PIL image processor at Qwen2.5-VL-7B's settings. It is given no video processor, which
    transformers' class check would refuse (and cannot look up without torchvision); an edit passes images only."""
    from transformers import Qwen2VLProcessor

    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil as ImageProcessor)
    except ImportError:  # a transformers before the PIL backend had its own class: the plain one is PIL's
        from transformers import Qwen2VLImageProcessor as ImageProcessor

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return ImageOnlyQwen2VLProcessor(image_processor=ImageProcessor(**EDIT_IMAGE_PROCESSOR), tokenizer=tokenizer)


def edit_template_start(pipe, tokenizer) -> int:
    """Where the edit pipeline's embeddings start, counted in this tokenizer's tokens: diffusers drops the
    template's system prompt (64 of Qwen's tokens, up to the vision markers); the synthetic tokenizer spells the
    same words in other tokens, and dropping 64 of them would keep part of the system prompt in the sequence."""
    system = pipe.prompt_template_encode.split("<|vision_start|>")[0]
    return len(tokenizer(system)["input_ids"])


def synthetic_tokenizer():
    """The tokenizer shipped with `tiny`: Qwen's chat-template special tokens and a word-level vocabulary of 425
    (Qwen2's own, 151k entries, is not shipped). Its ids are valid in Qwen2.5-VL's 152,064-row embedding, and
    the template's system prompt is the 34 tokens the pipeline drops, as with Qwen2's tokenizer."""
    from transformers import Qwen2Tokenizer

    from qwendoctor.tiny import trained

    return Qwen2Tokenizer.from_pretrained(trained.tokenizer_dir())


def _fill_random(module, device: str, seed: int) -> None:
    """Seeded random weights drawn on `device` (fast on a GPU) into `module`'s parameters wherever they live:
    matrices normal with std 1/sqrt(fan_in), norm weights 1, biases 0. The values depend on the seed only, not
    on where the parameters are stored, so a placement that keeps a component in host memory gets the same
    weights as one that keeps it on the GPU."""
    import torch

    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim >= 2:
                fan_in = math.prod(param.shape[1:])
                drawn = torch.empty(param.shape, dtype=param.dtype, device=device)
                drawn.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=generator)
                param.copy_(drawn)
                del drawn
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)


def build_synthetic_transformer(config: dict[str, Any], device: str, dtype, seed: int, storage: str | None = None):
    """The transformer with random weights made on `device` in `dtype`, stored on `storage` (default: `device`):
    no full-precision copy, and no GPU copy when it is stored in host memory.

    Built on the meta device, then each parameter is allocated where it is stored and filled (_fill_random).
    """
    import torch
    from diffusers import QwenImageTransformer2DModel

    with torch.device("meta"):
        transformer = QwenImageTransformer2DModel(**config)
    transformer = transformer.to(dtype=dtype).to_empty(device=storage or device)
    _fill_random(transformer, device, seed)
    return rebuild_rotary_tables(transformer).eval()


def build_synthetic_text_encoder(config: dict[str, Any], device: str, dtype, seed: int, storage: str | None = None):
    """Qwen2.5-VL-7B's architecture (8.29B parameters: the 28-layer language model, its vision tower and LM head)
    with random weights, stored on `storage` (default: `device`). It is built there directly, in `dtype`, so that
    its rotary tables (buffers computed in __init__) are right; then filled as the transformer is."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        # Skipping transformers' own initialisation: _fill_random replaces every parameter.
        with torch.device(storage or device), _no_init():
            encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config))
    finally:
        torch.set_default_dtype(previous)
    _fill_random(encoder, device, seed)
    return encoder.eval()


def _no_init():
    """transformers' context that skips weight initialisation, from whichever module its version keeps it in."""
    import contextlib

    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


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

    # Where the loader stored it: a placement that keeps it in host memory (levers.load_on_cpu) never has it on
    # the GPU whole. Called right after loading, before any lever moved it.
    storage = next(model.pipe.transformer.parameters()).device.type
    if model.model_id == "synthetic":
        config = _package_json("qwendoctor", "synthetic.json")["transformer"]
        return lambda: build_synthetic_transformer(config, model.device, _torch_dtype(model.dtype), seed=0,
                                                   storage=storage)
    original = model.pipe.transformer
    kind, config = type(original), dict(original.config)
    # Non-persistent buffers are not in the state dict: they are kept too.
    persistent = {name: tensor.detach().to("cpu", copy=True) for name, tensor in original.state_dict().items()}
    buffers = {name: tensor.detach().to("cpu", copy=True) for name, tensor in original.named_buffers()
               if name not in persistent}

    def fresh():
        with torch.device("meta"):
            transformer = kind.from_config(config)
        transformer = transformer.to(dtype=_torch_dtype(model.dtype)).to_empty(device=storage)
        transformer.load_state_dict(persistent)
        for name, tensor in buffers.items():
            owner, _, leaf = name.rpartition(".")
            transformer.get_submodule(owner).register_buffer(leaf, tensor.to(storage), persistent=False)
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


def _load_pretrained(model: str, device: str, dtype: str, on_cpu: frozenset[str] = frozenset(),
                     task: str = "generate") -> LoadedModel:
    import diffusers
    import torch

    path = resolve_model(model, device)
    name = _edit_pipeline_name(model, path) if task == "edit" else TASK_PIPELINES[task]
    try:
        pipe = getattr(diffusers, name).from_pretrained(path, torch_dtype=_torch_dtype(dtype), local_files_only=True)
    except (OSError, ValueError) as error:
        raise UsageError(f"model {model!r} is not available offline as a {name} ({first_line(error, 160)}); "
                         f"download it first: huggingface-cli download {model}") from None
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module) and name not in on_cpu:
            component.to(device)
    pipe.set_progress_bar_config(disable=True)
    return LoadedModel(pipe=pipe, model_id=model, revision=_pretrained_revision(pipe), device=device, dtype=dtype)


def builtin_revision(model_id: str, task: str = "generate") -> str | None:
    """A built-in model's revision without building it (None for other models): what a cached reference render
    must have been made with."""
    if model_id == "tiny" and task == "edit":
        from qwendoctor.tiny import edit

        return edit.revision()
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
    """The pipeline's text inputs: the strings, or, for a pipeline without a text encoder, random embeddings seeded by
    the text."""
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
