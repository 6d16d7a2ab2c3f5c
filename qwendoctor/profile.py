"""Profile (how to run) and Workload (what to run): the single description of a configuration.

The tuner samples a Profile, the lockfile stores it, `generate` applies it. Every check of a value or of a
combination lives here, so a bad configuration is refused before any weights load.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from qwendoctor.errors import UnavailableLever, UsageError

# diffusers' dispatcher names (diffusers.models.attention_dispatch.AttentionBackendName) that make sense for
# Qwen-Image on one device; "native" is torch SDPA choosing its own kernel (cuDNN on torch 2.11 + H100).
ATTENTION_BACKENDS = (
    "native",
    "_native_cudnn",
    "_native_flash",
    "_native_efficient",
    "_native_math",
    "flash",
    "_flash_3",
    "fa4",  # flash-attn-4 (flash_attn.cute), registered by qwendoctor.attention
    "flex",
)
COMPILE_MODES = ("none", "regional", "full")
# torch.compile's CUDA-graph mode ("reduce-overhead") is left out until it works here: on an H100 it failed with
# "accessing tensor output of CUDAGraphs that has been overwritten by a subsequent run"
# (benchmarks/gpu_tests_h100.log); the cause (the 60 blocks sharing one captured graph, or the cond output
# outliving the uncond pass) is not established yet.
COMPILE_OPTIONS = ("default", "max-autotune-no-cudagraphs", "coordinate-descent")
QUANTIZATIONS = ("none", "fp8_rowwise", "fp8_tensorwise", "fp8_weight_only")
CACHES = ("none", "first_block")
DTYPES = ("bfloat16", "float32")
# Multi-GPU strategies (qwendoctor.parallel). cfg: true CFG's two passes on two GPUs; ulysses / ring: diffusers'
# context parallelism, the sequence split over the GPUs; cfg+X: two groups of GPUs, one per CFG pass, X inside each.
PARALLEL_STRATEGIES = ("none", "cfg", "ulysses", "ring", "cfg+ulysses", "cfg+ring")
# diffusers 0.42's backends registered with supports_context_parallel=True, among ATTENTION_BACKENDS; ring also
# needs the kernel's log-sum-exp to merge partial results, which "native" (plain SDPA) does not return.
ULYSSES_BACKENDS = ("native", "_native_cudnn", "_native_flash", "flash")
RING_BACKENDS = ("_native_cudnn", "_native_flash", "flash")
# Kernels that exist only on CUDA: on the CPU SDPA has no cuDNN or memory-efficient kernel, and the flash-attn
# packages are GPU code.
CUDA_ONLY_BACKENDS = ("_native_cudnn", "_native_efficient", "flash", "_flash_3", "fa4")
FP8_MIN_COMPUTE_CAPABILITY = (8, 9)
PIXELS_MULTIPLE = 16  # VAE downsamples by 8, then the transformer packs 2x2 patches
# Qwen-Image's scheduler stretches sigmas to shift_terminal with (1 - sigma) / (1 - last sigma): 0/0 at one step.
MIN_STEPS = 2


@dataclasses.dataclass(frozen=True)
class Profile:
    """How to run Qwen-Image. The defaults are diffusers' defaults: the reference everything is measured against."""

    attention_backend: str = "native"
    compile: str = "none"
    compile_mode: str = "default"
    quantization: str = "none"
    cache: str = "none"
    cache_threshold: float | None = None
    tf32: bool = False
    cfg_batching: bool = False  # true CFG's cond and uncond passes as one batch-2 transformer call
    real_rope: bool = False  # the rotary embedding in real arithmetic, so compile can fuse it
    steps: int | None = None  # None: the workload's reference steps
    parallel: str = "none"  # one of PARALLEL_STRATEGIES
    gpus: int = 1  # processes (one GPU each) that run the strategy; cfg takes 2 of them, context parallel the rest

    def validate(self) -> "Profile":
        _choice("profile.attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        _choice("profile.compile", self.compile, COMPILE_MODES)
        _choice("profile.compile_mode", self.compile_mode, COMPILE_OPTIONS)
        _choice("profile.quantization", self.quantization, QUANTIZATIONS)
        _choice("profile.cache", self.cache, CACHES)
        for name in ("tf32", "cfg_batching", "real_rope"):
            if not isinstance(getattr(self, name), bool):
                raise UsageError(f"profile.{name}: expected true or false, got {getattr(self, name)!r}")
        if self.steps is not None and (not _is_int(self.steps) or self.steps < MIN_STEPS):
            raise UsageError(f"profile.steps: must be an integer >= {MIN_STEPS}, got {self.steps!r}")
        if self.compile == "none" and self.compile_mode != "default":
            raise UsageError(f"profile.compile_mode: {self.compile_mode!r} needs compile = regional or full")
        if self.cache == "none" and self.cache_threshold is not None:
            raise UsageError("profile.cache_threshold: set without a cache")
        if self.cache != "none":
            if not _is_number(self.cache_threshold) or not 0 < self.cache_threshold <= 1:
                raise UsageError(f"profile.cache_threshold: must be in (0, 1] for cache {self.cache!r}, "
                                 f"got {self.cache_threshold!r}")
            if self.compile != "none":
                # diffusers' cache hooks decide per step in Python whether to skip blocks: a compiled graph
                # around them either breaks on the decision or bakes one branch in.
                raise UsageError(f"profile: cache {self.cache!r} cannot be combined with compile {self.compile!r}")
        self._validate_parallel()
        return self

    def _validate_parallel(self) -> None:
        _choice("profile.parallel", self.parallel, PARALLEL_STRATEGIES)
        if not _is_int(self.gpus) or self.gpus < 1:
            raise UsageError(f"profile.gpus: must be an integer >= 1, got {self.gpus!r}")
        if self.parallel == "none":
            if self.gpus != 1:
                raise UsageError(f"profile.gpus: {self.gpus} GPUs need a parallel strategy "
                                 f"({', '.join(PARALLEL_STRATEGIES[1:])})")
            return
        if self.parallel == "cfg" and self.gpus != 2:
            raise UsageError(f"profile.gpus: parallel 'cfg' runs the two CFG passes on exactly 2 GPUs, got "
                             f"{self.gpus}; use cfg+ulysses or cfg+ring for more")
        if "+" in self.parallel and (self.gpus < 4 or self.gpus % 2):
            raise UsageError(f"profile.gpus: parallel {self.parallel!r} needs an even count >= 4 (2 CFG groups of "
                             f">= 2 GPUs), got {self.gpus}")
        if self.gpus < 2:
            raise UsageError(f"profile.gpus: parallel {self.parallel!r} needs at least 2 GPUs, got {self.gpus}")
        if self.cfg_degree == 2 and self.cfg_batching:
            raise UsageError(f"profile.cfg_batching: parallel {self.parallel!r} already runs the two CFG passes on "
                             "separate GPUs; set cfg_batching = false")
        if self.parallel == "ring" and self.cfg_batching:
            # CFG batching masks the shorter of the two prompts; diffusers' ring attention for sequences that
            # do not split evenly (ring_anything) refuses any attention mask.
            raise UsageError("profile.cfg_batching: parallel 'ring' takes no text mask, which CFG batching needs "
                             "for prompts of different lengths; set cfg_batching = false")
        if self.context_degree > 1 and self.compile == "full":
            # The whole model would trace diffusers' output gather, which Dynamo cannot (see
            # qwendoctor.parallel); regional compile leaves it outside the compiled blocks.
            raise UsageError(f"profile.compile: parallel {self.parallel!r} takes compile = regional, not full")
        if self.context_degree > 1 and self.cache != "none":
            # Each rank would decide to skip blocks from its own shard of the sequence: ranks that decide
            # differently issue different collectives and the run deadlocks.
            raise UsageError(f"profile: cache {self.cache!r} cannot be combined with parallel {self.parallel!r}")

    @property
    def cfg_degree(self) -> int:
        """GPUs the CFG passes are split over: 2 for the cfg strategies, else 1."""
        return 2 if self.parallel.startswith("cfg") else 1

    @property
    def context_degree(self) -> int:
        """GPUs one transformer pass's sequence is split over (Ulysses or ring); 1 without context parallelism."""
        return self.gpus // self.cfg_degree

    def describe(self) -> str:
        parts = [f"attn={self.attention_backend}"]
        if self.compile != "none":
            parts.append(f"compile={self.compile}" + ("" if self.compile_mode == "default" else f"/{self.compile_mode}"))
        if self.quantization != "none":
            parts.append(self.quantization)
        if self.cache != "none":
            parts.append(f"{self.cache}({self.cache_threshold:g})")
        if self.tf32:
            parts.append("tf32")
        if self.real_rope:
            parts.append("real-rope")
        if self.cfg_batching:
            parts.append("cfg-batch")
        if self.steps is not None:
            parts.append(f"steps={self.steps}")
        if self.parallel != "none":
            parts.append(f"parallel={self.parallel}/{self.gpus}")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        data = _without_none(dataclasses.asdict(self))
        if self.parallel == "none" and self.gpus == 1:
            # One-GPU profiles read and write as they did before multi-GPU existed.
            del data["parallel"], data["gpus"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Profile":
        return cls(**_known_fields(cls, data, "profile")).validate()

    @classmethod
    def from_text(cls, text: str) -> "Profile":
        """`compile=regional,cfg_batching=true,steps=30`, as typed on a command line."""
        data: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not key:
                raise UsageError(f"profile {text!r}: expected name=value pairs separated by commas, got {part!r}")
            kind = {f.name: f.type for f in dataclasses.fields(cls)}.get(key)
            if kind is None:
                raise UsageError(f"profile.{key}: unknown field")
            if "bool" in str(kind):
                if value.lower() not in ("true", "false"):
                    raise UsageError(f"profile.{key}: expected true or false, got {value!r}")
                data[key] = value.lower() == "true"
            elif "int" in str(kind) or "float" in str(kind):
                try:
                    data[key] = int(value) if "int" in str(kind) else float(value)
                except ValueError:
                    raise UsageError(f"profile.{key}: expected a number, got {value!r}") from None
            else:
                data[key] = value
        return cls.from_dict(data)


@dataclasses.dataclass(frozen=True)
class Workload:
    """What is being generated; a lock is only valid for the workload it was tuned on."""

    model: str = "tiny"
    width: int = 1328
    height: int = 1328
    true_cfg_scale: float = 4.0
    negative_prompt: str = " "
    reference_steps: int = 50
    dtype: str = "bfloat16"
    loras: tuple[str, ...] = ()

    def validate(self) -> "Workload":
        if not isinstance(self.model, str) or not self.model:
            raise UsageError("workload.model: must be a non-empty string")
        for name in ("width", "height"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0 or value % PIXELS_MULTIPLE:
                raise UsageError(f"{name} must be a positive multiple of {PIXELS_MULTIPLE}, got {value!r}")
        if not _is_int(self.reference_steps) or self.reference_steps < MIN_STEPS:
            raise UsageError(f"steps must be an integer >= {MIN_STEPS} (the scheduler yields NaN at 1), "
                             f"got {self.reference_steps!r}")
        if not _is_number(self.true_cfg_scale) or self.true_cfg_scale < 1:
            raise UsageError(f"true_cfg_scale must be >= 1 (1 turns CFG off), got {self.true_cfg_scale!r}")
        if not isinstance(self.negative_prompt, str):
            raise UsageError("workload.negative_prompt: must be a string")
        _choice("workload.dtype", self.dtype, DTYPES)
        if self.loras:
            # LoRA fusion is a later lever; refusing beats tuning a workload we would then run without them.
            raise UsageError("workload.loras: LoRAs are not supported yet")
        return self

    @property
    def does_cfg(self) -> bool:
        return self.true_cfg_scale > 1

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["loras"] = list(self.loras)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Workload":
        fields = _known_fields(cls, data, "workload")
        if "loras" in fields:
            if not isinstance(fields["loras"], list):
                raise UsageError("workload.loras: must be a list")
            fields["loras"] = tuple(fields["loras"])
        return cls(**fields).validate()


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What this machine can run, from probes; used to refuse levers it cannot run before anything loads."""

    device: str = "cpu"  # "cuda" or "cpu"
    compute_capability: tuple[int, int] | None = None
    has_torchao: bool = False  # torchao imports and FP8 GEMMs run (the fp8 probe passed, where it ran)
    working_attention_backends: tuple[str, ...] | None = None  # None: not probed
    compile_works: bool | None = None  # the compile probe's verdict; None: not probed
    # ms of one attention call at the workload's shapes per dispatcher backend (attention_truth); None: not timed
    attention_ms: tuple[tuple[str, float], ...] | None = None
    native_attention: str | None = None  # the dispatcher backend whose kernel `native` runs here (attention_truth)
    gpu_count: int | None = None  # visible CUDA devices; None on the CPU, where gloo runs any number of ranks

    @property
    def has_fp8(self) -> bool:
        return (self.device == "cuda" and self.compute_capability is not None
                and tuple(self.compute_capability) >= FP8_MIN_COMPUTE_CAPABILITY and self.has_torchao)


def check_runnable(profile: Profile, workload: Workload, capabilities: Capabilities) -> None:
    """Raise if this machine cannot run `profile` on `workload`; called before the pipeline is built."""
    profile.validate()
    workload.validate()
    if profile.quantization != "none":
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
    if profile.cfg_batching and not workload.does_cfg:
        raise UsageError("profile.cfg_batching batches true CFG's two passes; this workload has no CFG "
                         f"(true_cfg_scale {workload.true_cfg_scale:g})")
    if profile.attention_backend in CUDA_ONLY_BACKENDS and capabilities.device != "cuda":
        raise UnavailableLever(f"attention backend {profile.attention_backend!r} needs a CUDA GPU; this machine runs "
                               "on the CPU")
    if profile.tf32 and capabilities.device != "cuda":
        raise UnavailableLever("tf32 is a CUDA matmul mode; it does nothing on the CPU")
    if profile.cfg_degree == 2 and not workload.does_cfg:
        raise UsageError(f"profile.parallel {profile.parallel!r} splits true CFG's two passes; this workload has no "
                         f"CFG (true_cfg_scale {workload.true_cfg_scale:g})")
    if profile.context_degree > 1:
        backends = RING_BACKENDS if profile.parallel.endswith("ring") else ULYSSES_BACKENDS
        if profile.attention_backend not in backends:
            raise UnavailableLever(f"parallel {profile.parallel!r} needs an attention backend diffusers can split "
                                   f"({', '.join(backends)}), not {profile.attention_backend!r}")
    if capabilities.gpu_count is not None and profile.gpus > capabilities.gpu_count:
        raise UsageError(f"profile.gpus: {profile.gpus} GPUs asked for, {capabilities.gpu_count} visible")
    working = capabilities.working_attention_backends
    if working is not None and profile.attention_backend not in working:
        raise UnavailableLever(f"attention backend {profile.attention_backend!r} did not pass the check here "
                               f"(working: {', '.join(working)})")


def _choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"{field}: {value!r} is not one of {', '.join(choices)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _without_none(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if v is not None}


def _known_fields(cls, data: dict[str, Any], section: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise UsageError(f"{section}: expected a table")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UsageError(f"{section}.{unknown[0]}: unknown field")
    return dict(data)
