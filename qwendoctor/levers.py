"""The lever table: every optimization qwendoctor knows, declared once, and `optimize()`, which applies them.

A lever is one function, `apply_<lever>(pipe, profile) -> pipe`, plus everything the rest of qwendoctor needs to
know about it, declared beside it in one `Lever`:

  fields     the Profile fields it owns (type, choices, default): `qwendoctor.profile.Profile` is built from them
  check      combinations it refuses, from the profile alone (before anything loads)
  runnable   what it needs from this machine and workload (`profile.check_runnable`)
  undoable   whether applying it again with other values leaves a used pipeline as a fresh one would be
             (the tuner's pool re-applies these; the others need a new transformer)
  lossy      whether a setting changes the image beyond rounding (FP8, a cache, fewer steps): its quality is
             only verified on a model that draws (qwendoctor.models.draws)
  offer      which values the tuner's search space offers here, and on what evidence it leaves one out
  sample     how a trial draws its values from what was offered
  bench      its rows in `qwendoctor bench`: alone against the default, and its step in the cumulative ladder

Order of application (LEVERS), and why:
  1. tf32               process-wide matmul precision; first so everything after sees it
  2. attention backend  diffusers' dispatcher; before compile so the compiled graph traces the chosen kernel
  3. real RoPE          rotary embedding in real arithmetic; before compile, which cannot fuse complex ops
  4. fused qkv          one q/k/v GEMM per stream (qwendoctor.fused_projections); before quantization and weight
                        storage, so they see the fused Linears, and before compile
  5. gelu epilogue     the MLP's GELU in its first GEMM's cuBLASLt epilogue (qwendoctor.gelu_epilogue); before
                        weight storage and offload, whose hooks then wrap the fused Linear, and before compile
  6. quantization       torchao swaps Linear weights; before compile so inductor fuses the activation quantization
  7. weight storage     diffusers' layerwise casting (FP8 storage, upcast per layer); never with 6; before offload,
                        whose groups then move the FP8 copies, and before compile
  8. cache              cache-dit's block cache or diffusers' FirstBlockCache around the blocks; before compile
  9. offload            diffusers' group offloading of the transformer, or its model / sequential CPU offload of
                        the pipeline; after the levers that change the blocks, before compile, which traces its hooks
 10. text encoder       where the text encoder lives (resident, offloaded, on the CPU); it runs once per call
 11. context parallel   diffusers' Ulysses / ring hooks (qwendoctor.parallel); before compile, which traces them
 12. compile            it traces whatever the steps above left
 13. cfg batching       it intercepts the transformer's call, outside the compiled model
 14. cfg parallel       the same interception with the two passes on two GPUs (never together with 13)
 15. vae decode         tiled or sliced decoding; touches the VAE only
 16. steps              not a change to the pipeline: an argument of each call (`qwendoctor.runner.call_arguments`)

Memory levers (7, 9, 10, 15) trade speed for memory: tune does not search them (they are not in SEARCH_ORDER and
offer their defaults only); a memory plan chooses them.

A value at its field's default leaves the pipeline as diffusers built it. How to add a lever: README, "Adding a
lever".
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Callable

from probes.backends import (
    ATTENTION_BACKENDS,
    BY_NAME,
    CUDA_ONLY_BACKENDS,
    REFERENCE_ONLY_BACKENDS,
    RING_BACKENDS,
    ULYSSES_BACKENDS,
)
from probes.workload import MIN_STEPS
from qwendoctor.errors import EXIT_USAGE, UnavailableLever, UsageError

if TYPE_CHECKING:
    from qwendoctor.capabilities import Capabilities
    from qwendoctor.profile import Profile, Workload

FP8_MIN_COMPUTE_CAPABILITY = (8, 9)


@dataclasses.dataclass(frozen=True)
class Field:
    """One Profile field. `choices` for names; `low` for numbers (inclusive); `optional`: None is allowed."""

    name: str
    kind: type
    default: Any
    choices: tuple | None = None
    low: float | None = None
    optional: bool = False
    # Left out of a lock when at its default, so older locks and their readers are unchanged by the field.
    omit_default: bool = False


@dataclasses.dataclass(frozen=True)
class IntRange:
    """An integer search dimension: low..high by step."""

    low: int
    high: int
    step: int

    def __str__(self) -> str:
        return f"{self.low}..{self.high} by {self.step}"


@dataclasses.dataclass(frozen=True)
class Offer:
    """What the search space offers of one lever on this machine: values per field, and what it left out."""

    values: dict[str, tuple | IntRange]
    left_out: tuple[str, ...] = ()
    # Lever-specific facts its `sample` reads (whether FP8 is searched without compile, say).
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class SpaceContext:
    """What a lever's offer may look at: the probed machine, the workload, `--exhaustive`, and the measured
    reasons to leave a choice out (`evidence(rule)`: a sentence naming this GPU model's measurement, or None
    when this GPU model was not measured, and then the choice stays in the space)."""

    capabilities: "Capabilities"
    workload: "Workload"
    exhaustive: bool
    evidence: Callable[[str], str | None]
    # The model draws what it is asked (trained weights): only then does quality against the reference judge a
    # lossy setting. Random weights draw noise, and PSNR/SSIM on noise speak for numerical fidelity alone.
    draws: bool = True
    blocks: int | None = None  # the transformer's blocks (60 in Qwen-Image), where the model's config says

    @property
    def on_gpu(self) -> bool:
        return self.capabilities.device == "cuda"

    @property
    def can_compile(self) -> bool:
        return self.on_gpu and self.capabilities.compile_works is not False


@dataclasses.dataclass(frozen=True)
class BenchRow:
    """One row of the bench's "alone" group: the lever by itself against the default."""

    id: str
    label: str
    profile: "Profile"


@dataclasses.dataclass(frozen=True)
class LadderStep:
    """One step of the bench's cumulative stack. `order` is the ladder's, not the table's: cheap lossless levers
    first, so each later one is judged against the best stack without it, and FP8 last."""

    order: int
    id: str
    label: str
    change: Callable[["Profile"], "Profile"]
    applies: Callable[["Capabilities", "Workload"], bool]


def _nothing(*_args) -> None:
    return None


def _has_transformer(pipe, profile: "Profile", field: str, asked: bool) -> bool:
    """Whether a lever that changes the transformer has one to change. A pipeline built without one (encode-only,
    transformer=None) leaves such a lever nothing to do at its default, and refuses it when asked for: skipping
    it would hand back a pipeline that is not what the profile says."""
    if pipe.transformer is not None:
        return True
    if asked:
        raise UsageError(f"profile.{field} = {getattr(profile, field)!r} changes the pipeline's transformer, and "
                         "this pipeline has none (transformer=None)")
    return False


def target_device(pipe):
    """Where the pipeline runs: the loader's device (models.load_model records it), else the first CUDA device a
    component's weights are on, else diffusers' execution device. A placement lever may find its component in
    host memory (load_on_cpu) and must still know where it is to run."""
    import torch

    recorded = getattr(pipe, "_qwendoctor_device", None)
    if recorded is not None:
        return torch.device(recorded)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            parameter = next(component.parameters(), None)
            if parameter is not None and parameter.device.type == "cuda":
                return parameter.device
    return pipe._execution_device


def load_on_cpu(profile: "Profile") -> frozenset[str]:
    """The components a profile's placement keeps in host memory at load (models.load_model's `on_cpu`): those
    it offloads, and a transformer whose weights go to 8 bits before they reach the GPU. A card that can only
    hold the placed pipeline must never receive the whole one."""
    if profile.offload in ("model", "sequential"):
        return frozenset({"transformer", "text_encoder", "vae"})
    on_cpu = set()
    if profile.offload == "group" or profile.weight_storage != "bf16":
        on_cpu.add("transformer")
    if profile.text_encoder != "resident":
        on_cpu.add("text_encoder")
    return frozenset(on_cpu)


@dataclasses.dataclass(frozen=True)
class Lever:
    name: str
    apply: Callable[[Any, "Profile"], Any] | None  # None: not a change to the pipeline (steps)
    undoable: bool
    fields: tuple[Field, ...] = ()
    check: Callable[["Profile"], None] = _nothing
    runnable: Callable[["Profile", "Workload", "Capabilities"], None] = _nothing
    offer: Callable[[SpaceContext], Offer] | None = None  # None: not searched by tune
    sample: Callable[[Any, Offer, dict[str, Any], SpaceContext], dict[str, Any]] | None = None
    # A compiled graph (or a parallel hook) depends on every other lever it traced: once this is applied, the
    # whole profile but its steps is what the transformer carries (qwendoctor.pool).
    captures_profile: bool = False
    # Its state lives in pipeline components besides the transformer (accelerate's offload hooks, where the text
    # encoder is): a lever of this kind that cannot be undone needs a new pipeline, not a new transformer.
    pipeline_wide: bool = False
    lossy: Callable[["Profile"], bool] = lambda profile: False
    # Fingerprint fields (qwendoctor.fingerprint) a setting depends on beyond torch and diffusers: a lock whose
    # profile uses the lever is stale when they change, one that does not use it is not.
    packages: Callable[["Profile"], tuple[str, ...]] = lambda profile: ()
    describe: Callable[["Profile"], str | None] = _nothing
    bench_alone: Callable[["Capabilities", "Workload"], list[BenchRow]] = lambda c, w: []
    ladder: tuple[LadderStep, ...] = ()

    def is_on(self, profile: "Profile") -> bool:
        return any(getattr(profile, f.name) != f.default for f in self.fields)


# ---- 1. tf32 --------------------------------------------------------------------------------------------

def apply_tf32(pipe, profile: "Profile"):
    import torch

    # "high" lets fp32 matmuls use TF32; bf16 matmuls are unaffected, so this matters only for fp32 parts.
    torch.set_float32_matmul_precision("high" if profile.tf32 else "highest")
    return pipe


def _tf32_runnable(profile, workload, capabilities) -> None:
    if profile.tf32 and capabilities.device != "cuda":
        raise UnavailableLever("tf32 is a CUDA matmul mode; it does nothing on the CPU")


def _tf32_offer(ctx: SpaceContext) -> Offer:
    searched = ctx.on_gpu and (ctx.exhaustive or ctx.workload.dtype == "float32")
    left_out = ("TF32 in a bf16 pipeline (its matmuls are bf16: the flag changes nothing they run)",) if (
        ctx.on_gpu and not searched) else ()
    return Offer({"tf32": (False, True) if searched else (False,)}, left_out)


TF32 = Lever(
    name="tf32", apply=apply_tf32, undoable=True,
    fields=(Field("tf32", bool, False),),
    runnable=_tf32_runnable, offer=_tf32_offer,
    sample=lambda trial, offer, chosen, ctx: {"tf32": trial.suggest_categorical("tf32", offer.values["tf32"])},
    describe=lambda p: "tf32" if p.tf32 else None,
)


# ---- 2. attention backend -------------------------------------------------------------------------------

# A backend measured (attention_truth, at this workload's shapes) this much slower than the fastest is left
# out: attention is about a third of a W1 step, so 15% slower attention costs about 5% of a step.
ATTENTION_SLACK = 0.15
# The kernels worth a bench row: SDPA's own choices plus the flash-attn and SageAttention packages where they
# import.
FAST_ATTENTION = ("_native_cudnn", "_native_flash", "fa4", "_flash_3", "flash", "sageattn")


def apply_attention_backend(pipe, profile: "Profile"):
    from qwendoctor.attention import ensure_backend

    if not _has_transformer(pipe, profile, "attention_backend", profile.attention_backend != "native"):
        return pipe
    ensure_backend(profile.attention_backend)  # FA4 is registered with diffusers' dispatcher on first use
    pipe.transformer.set_attention_backend(profile.attention_backend)
    return pipe


def _attention_runnable(profile, workload, capabilities) -> None:
    # Exit 2: a lock or --profile naming a kernel this machine lacks is bad input here, like an unknown value.
    if profile.attention_backend in CUDA_ONLY_BACKENDS and capabilities.device != "cuda":
        raise UnavailableLever(f"attention backend {profile.attention_backend!r} needs a CUDA GPU; this machine runs "
                               "on the CPU", exit_code=EXIT_USAGE)
    working = capabilities.working_attention_backends
    if working is not None and profile.attention_backend not in working:
        backend = BY_NAME[profile.attention_backend]
        needs = f"; it needs {backend.package}: {backend.install}" if backend.install else ""
        raise UnavailableLever(f"attention backend {profile.attention_backend!r} did not pass the check here "
                               f"(working: {', '.join(working)}){needs}", exit_code=EXIT_USAGE)


def _attention_offer(ctx: SpaceContext) -> Offer:
    """Only backends this machine's probes saw work, less those its own timings show cannot win."""
    capabilities = ctx.capabilities
    working = capabilities.working_attention_backends or ("native",)
    # On a GPU, math attention only serves as a numerical reference: it is never the fast choice.
    attention = tuple(b for b in working if not (ctx.on_gpu and b in REFERENCE_ONLY_BACKENDS))
    timed = dict(capabilities.attention_ms or ())
    slow = () if ctx.exhaustive else _slower_than_slack(attention, timed)
    # `native` already runs this backend's kernel (SDPA's own choice): forcing it is the same kernel again.
    same_as_native = capabilities.native_attention if (
        not ctx.exhaustive and capabilities.native_attention in attention and "native" in attention) else None
    left_out = []
    if same_as_native:
        left_out.append(f"attention {same_as_native} (the kernel `native` already runs here, measured by "
                        "attention_truth)")
    if slow:
        # A slow backend is exact: the only 8-bit one is never slower than the fastest of its kind, itself.
        fastest = min((b for b in timed if not (b in BY_NAME and BY_NAME[b].lossy)), key=timed.get)
        left_out.append(f"attention {', '.join(f'{b} ({timed[b] / timed[fastest]:.2f}x)' for b in slow)}"
                        f" (more than {ATTENTION_SLACK:.0%} slower than {fastest} at this workload's shapes, "
                        "measured by attention_truth)")
    kept = tuple(b for b in attention if b not in slow and b != same_as_native)
    return Offer({"attention_backend": kept or ("native",)}, tuple(left_out))


def _slower_than_slack(backends: tuple[str, ...], timed_ms: dict[str, float]) -> tuple[str, ...]:
    """The backends measured more than ATTENTION_SLACK slower than the fastest of their kind; untimed ones stay.
    Of their kind: an 8-bit kernel may miss the quality floor, so it never pushes an exact one out."""
    def fastest(lossy: bool) -> float | None:
        return min((ms for b, ms in timed_ms.items() if b in BY_NAME and BY_NAME[b].lossy == lossy), default=None)

    slow = []
    for b in backends:
        bound = fastest(BY_NAME[b].lossy) if b in BY_NAME else None
        if b != "native" and b in timed_ms and bound is not None and timed_ms[b] > (1 + ATTENTION_SLACK) * bound:
            slow.append(b)
    return tuple(slow)


def _attention_bench(capabilities, workload) -> list[BenchRow]:
    from qwendoctor.profile import Profile

    working = capabilities.working_attention_backends or ("native",)
    return [BenchRow(f"attn:{backend}", f"attention {backend}", Profile(attention_backend=backend))
            for backend in FAST_ATTENTION if backend in working]


ATTENTION = Lever(
    name="attention_backend", apply=apply_attention_backend, undoable=True,
    fields=(Field("attention_backend", str, "native", choices=ATTENTION_BACKENDS),),
    runnable=_attention_runnable, offer=_attention_offer,
    sample=lambda trial, offer, chosen, ctx: {
        "attention_backend": trial.suggest_categorical("attention_backend", offer.values["attention_backend"])},
    describe=lambda p: f"attn={p.attention_backend}",
    lossy=lambda p: BY_NAME[p.attention_backend].lossy,  # 8-bit attention
    bench_alone=_attention_bench,
    # Last, on top of the FP8 tier: 8-bit attention is where that tier's bound lies, and it is lossy too.
    ladder=(LadderStep(10, "stack:+sageattn", "+ 8-bit attention (SageAttention)",
                       lambda p: dataclasses.replace(p, attention_backend="sageattn"),
                       lambda c, w: "sageattn" in (c.working_attention_backends or ())),),
    # A backend from a flash-attn package; SDPA's own kernels come with torch.
    packages=lambda p: ("attention_packages",) if BY_NAME[p.attention_backend].package else (),
)


# ---- 3. real RoPE ---------------------------------------------------------------------------------------

def apply_real_rope(pipe, profile: "Profile"):
    from qwendoctor import rope

    # Process-wide, like tf32: diffusers' attention processor looks the function up in its module.
    (rope.enable if profile.real_rope else rope.disable)()
    return pipe


def _real_rope_offer(ctx: SpaceContext) -> Offer:
    # Real RoPE only pays under compile (it lets inductor fuse the rotation); eager it is the same math.
    if not ctx.can_compile:
        return Offer({"real_rope": (False,)})
    measured = None if ctx.exhaustive else ctx.evidence("complex-rope")
    if measured:
        return Offer({"real_rope": (True,)}, (f"complex RoPE under compile: {measured}; compiled profiles always "
                                              "use real RoPE",))
    return Offer({"real_rope": (False, True)})


def _real_rope_sample(trial, offer: Offer, chosen: dict[str, Any], ctx: SpaceContext) -> dict[str, Any]:
    values = offer.values["real_rope"]
    if chosen["compile"] == "none":
        return {"real_rope": False}
    return {"real_rope": trial.suggest_categorical("real_rope", values) if len(values) > 1 else values[0]}


REAL_ROPE = Lever(
    name="real_rope", apply=apply_real_rope, undoable=True,
    fields=(Field("real_rope", bool, False),),
    offer=_real_rope_offer, sample=_real_rope_sample,
    describe=lambda p: "real-rope" if p.real_rope else None,
    ladder=(LadderStep(3, "stack:+real_rope", "+ real RoPE (fusable rotary embedding)",
                       lambda p: dataclasses.replace(p, real_rope=True) if p.compile != "none" else p,
                       lambda c, w: c.device == "cuda" and c.compile_works is not False),),
)


# ---- 4. fused projections -------------------------------------------------------------------------------

def _fuse_modules(pipe, profile: "Profile", field: str, fusion, what: str):
    """A fusion lever's apply (`fusion`: a module with `fuse(transformer) -> count` and `is_fused(module)`). At the
    default nothing is done: fused modules are not unfused (undoable=False), the pool replaces the transformer."""
    if not getattr(profile, field) or not _has_transformer(pipe, profile, field, True):
        return pipe
    already = any(fusion.is_fused(module) for module in pipe.transformer.modules())
    if fusion.fuse(pipe.transformer) == 0 and not already:
        raise UsageError(f"profile.{field}: this transformer has no {what} to fuse")
    return pipe


def apply_fused_qkv(pipe, profile: "Profile"):
    from qwendoctor import fused_projections

    return _fuse_modules(pipe, profile, "fused_qkv", fused_projections,
                         "Qwen-Image attention (diffusers' QwenDoubleStreamAttnProcessor2_0)")


FUSED_QKV = Lever(
    name="fused_qkv", apply=apply_fused_qkv, undoable=False,
    fields=(Field("fused_qkv", bool, False, omit_default=True),),
    # Searched everywhere: what it saves (four GEMM launches and two reads of each stream per block) is measured,
    # not assumed, and rounding is all it changes.
    offer=lambda ctx: Offer({"fused_qkv": (False, True)}),
    sample=lambda trial, offer, chosen, ctx: {
        "fused_qkv": trial.suggest_categorical("fused_qkv", offer.values["fused_qkv"])
        if len(offer.values["fused_qkv"]) > 1 else offer.values["fused_qkv"][0]},
    describe=lambda p: "fused-qkv" if p.fused_qkv else None,
    bench_alone=lambda c, w: [BenchRow("fused_qkv", "fused q/k/v projections (one GEMM per stream)",
                                       _profile(fused_qkv=True))],
    ladder=(LadderStep(4, "stack:+fused_qkv", "+ fused q/k/v projections",
                       lambda p: dataclasses.replace(p, fused_qkv=True), lambda c, w: True),),
)


def _profile(**fields) -> "Profile":
    from qwendoctor.profile import Profile

    return Profile(**fields)


# ---- 5. GELU epilogue -----------------------------------------------------------------------------------

def apply_gelu_epilogue(pipe, profile: "Profile"):
    from qwendoctor import gelu_epilogue

    return _fuse_modules(pipe, profile, "gelu_epilogue", gelu_epilogue,
                         "MLP with a biased projection and a tanh GELU (diffusers' GELU block)")


def _gelu_epilogue_check(profile) -> None:
    if not profile.gelu_epilogue:
        return
    if profile.quantization != "none":
        raise UsageError(f"profile.gelu_epilogue: quantization={profile.quantization} replaces the MLP's weights by "
                         "torchao tensors, which have no GELU epilogue; use one of the two")
    if profile.weight_storage == "int8_weight_only":
        raise UsageError("profile.gelu_epilogue: weight_storage=int8_weight_only replaces the MLP's weights by "
                         "torchao int8 tensors, which have no GELU epilogue; use one of the two")


def _gelu_epilogue_runnable(profile, workload, capabilities) -> None:
    if profile.gelu_epilogue and capabilities.device != "cuda":
        raise UnavailableLever("gelu_epilogue needs a CUDA GPU (cuBLASLt's GELU epilogue); on the CPU torch's fused "
                               "op computes the exact GELU, not the tanh approximation Qwen-Image's MLP uses",
                               exit_code=EXIT_USAGE)


def _gelu_epilogue_sample(trial, offer: Offer, chosen: dict[str, Any], ctx: SpaceContext) -> dict[str, Any]:
    values = offer.values["gelu_epilogue"]
    if chosen.get("quantization", "none") != "none":
        return {"gelu_epilogue": False}  # refused with torchao's weights (_gelu_epilogue_check)
    return {"gelu_epilogue": trial.suggest_categorical("gelu_epilogue", values) if len(values) > 1 else values[0]}


GELU_EPILOGUE = Lever(
    name="gelu_epilogue", apply=apply_gelu_epilogue, undoable=False,
    fields=(Field("gelu_epilogue", bool, False, omit_default=True),),
    check=_gelu_epilogue_check, runnable=_gelu_epilogue_runnable,
    # Searched wherever a GPU is: whether cuBLASLt's epilogue kernel beats its plain GEMM plus Inductor's GELU
    # kernel is measured, not assumed; rounding is all it changes.
    offer=lambda ctx: Offer({"gelu_epilogue": (False, True) if ctx.on_gpu else (False,)}),
    sample=_gelu_epilogue_sample,
    describe=lambda p: "gelu-epilogue" if p.gelu_epilogue else None,
    bench_alone=lambda c, w: [BenchRow("gelu_epilogue", "MLP GELU in the GEMM epilogue (cuBLASLt)",
                                       _profile(gelu_epilogue=True))] if c.device == "cuda" else [],
    ladder=(LadderStep(5, "stack:+gelu_epilogue", "+ MLP GELU in the GEMM epilogue",
                       lambda p: dataclasses.replace(p, gelu_epilogue=True) if p.quantization == "none" else p,
                       lambda c, w: c.device == "cuda"),),
)


# ---- 6. quantization ------------------------------------------------------------------------------------

QUANTIZATIONS = ("none", "fp8_rowwise", "fp8_tensorwise", "fp8_weight_only")


def apply_quantization(pipe, profile: "Profile"):
    if not _has_transformer(pipe, profile, "quantization", profile.quantization != "none") or (
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
    quantize_(blocks, config, filter_fn=_block_linear_between(kept, len(blocks) - kept))
    _keep_quantized_weights_as_they_are(pipe, f"quantization {profile.quantization!r}", "FP8")
    return pipe


def _block_linear_between(first: int, end: int):
    """The filter for blocks[first:end]: the blocks at either end stay bf16. tune searches how many to keep
    against the quality floor."""
    def quantizable(module, fqn: str) -> bool:
        # torchao passes names relative to the ModuleList it was given: "<block>.attn.to_q".
        return _is_block_linear(module, fqn) and first <= int(fqn.split(".", 1)[0]) < end

    return quantizable


def _is_block_linear(module, _fqn) -> bool:
    # FP8 GEMMs need both dimensions divisible by 16; the embedders and the final projection stay bf16 (they are
    # outside the blocks torchao is given).
    import torch

    return isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0


def _keep_quantized_weights_as_they_are(pipe, setting: str, kind: str) -> None:
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


def _quantization_offer(ctx: SpaceContext) -> Offer:
    if not ctx.capabilities.has_fp8:
        return Offer({"quantization": ("none",), "quantization_bf16_blocks": (0,)}, options={"eager": True})
    measured = None if ctx.exhaustive or not ctx.can_compile else ctx.evidence("eager-fp8")
    left_out = (f"FP8 without compile: {measured}",) if measured else ()
    ends = tuple(n for n in BF16_END_BLOCKS if ctx.blocks is None or 2 * n < ctx.blocks)
    return Offer({"quantization": QUANTIZATIONS, "quantization_bf16_blocks": ends}, left_out,
                 options={"eager": not measured})


def _quantization_sample(trial, offer: Offer, chosen: dict[str, Any], ctx: SpaceContext) -> dict[str, Any]:
    if chosen["compile"] == "none" and not offer.options["eager"]:
        return {"quantization": "none"}
    quantization = trial.suggest_categorical("quantization", offer.values["quantization"])
    ends = offer.values["quantization_bf16_blocks"]
    if quantization == "none" or len(ends) < 2:
        return {"quantization": quantization}
    return {"quantization": quantization,
            "quantization_bf16_blocks": trial.suggest_categorical("quantization_bf16_blocks", ends)}


def _describe_quantization(p) -> str | None:
    if p.quantization == "none":
        return None
    return p.quantization + (f"(bf16 ends {p.quantization_bf16_blocks})" if p.quantization_bf16_blocks else "")


def _quantization_bench(capabilities, workload) -> list[BenchRow]:
    from qwendoctor.profile import Profile

    if not capabilities.has_fp8:
        return []
    return [BenchRow("fp8_rowwise", "FP8 row-wise, eager", Profile(quantization="fp8_rowwise"))]


QUANTIZATION = Lever(
    name="quantization", apply=apply_quantization, undoable=False,
    fields=(Field("quantization", str, "none", choices=QUANTIZATIONS),
            # Blocks at each end of the transformer left in bf16 under FP8.
            Field("quantization_bf16_blocks", int, 0, low=0, omit_default=True)),
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


# ---- 7. weight storage ---------------------------------------------------------------------------------

# bf16: the weights in the workload's dtype, as diffusers loads them. fp8_storage: diffusers' layerwise casting,
# each layer's weights kept in float8_e4m3fn and cast up to the model's dtype for its own forward: half the weight
# memory, the same matmuls, rounding of the weights to FP8 (lossy). torchao's quantization replaces the same
# weights by FP8 tensors of its own, so the two are never combined.
# int8_weight_only: torchao's int8 weight-only quantization of the blocks' linear layers (per-row scales), the
# activations in the model's dtype: the same memory as FP8 storage without FP8 hardware (Ampere cards), lossy.
# Tested on the CPU only; not measured on a GPU, so the memory plan does not choose it.
WEIGHT_STORAGES = ("bf16", "fp8_storage", "int8_weight_only")


def apply_weight_storage(pipe, profile: "Profile"):
    asked = profile.weight_storage != "bf16"
    if not _has_transformer(pipe, profile, "weight_storage", asked) or not asked:
        return pipe
    import torch

    transformer = pipe.transformer
    if profile.weight_storage == "int8_weight_only":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        # set_inductor_config=False: see apply_quantization.
        quantize_(transformer.transformer_blocks, Int8WeightOnlyConfig(set_inductor_config=False),
                  filter_fn=_is_block_linear)
        _keep_quantized_weights_as_they_are(pipe, "weight_storage 'int8_weight_only'", "int8")
    else:
        # The model's skip list (norms, rotary embedding) and diffusers' (the output projection) stay in the
        # model's dtype: the layers where FP8 rounding would cost the most.
        transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=transformer.dtype)
    # Loaded in host memory (load_on_cpu) so the bf16 weights never occupy the card: they go to it cast. Under
    # offloading the offload lever moves them.
    if profile.offload == "none":
        transformer.to(target_device(pipe))
    return pipe


def _weight_storage_check(profile) -> None:
    if profile.weight_storage != "bf16" and profile.quantization != "none":
        raise UsageError(f"profile.weight_storage: {profile.weight_storage!r} and quantization "
                         f"{profile.quantization!r} both replace the transformer's weights; choose one")
    if profile.weight_storage == "int8_weight_only" and profile.offload != "none":
        raise UsageError(f"profile.weight_storage: 'int8_weight_only' with offload {profile.offload!r} is not "
                         "supported here (torchao's int8 weights are tensor subclasses the offload hooks were not "
                         "tested with); use fp8_storage with offloading")


def _weight_storage_runnable(profile, workload, capabilities) -> None:
    import importlib.util

    if profile.weight_storage == "int8_weight_only" and importlib.util.find_spec("torchao") is None:
        raise UnavailableLever("weight_storage 'int8_weight_only' needs torchao: python -m pip install torchao")


WEIGHT_STORAGE = Lever(
    # Not undoable: the cast drops the weights' low bits, so the pool builds a new transformer.
    name="weight_storage", apply=apply_weight_storage, undoable=False,
    fields=(Field("weight_storage", str, "bf16", choices=WEIGHT_STORAGES, omit_default=True),),
    check=_weight_storage_check, runnable=_weight_storage_runnable,
    packages=lambda p: ("torchao",) if p.weight_storage == "int8_weight_only" else (),
    offer=lambda ctx: Offer({"weight_storage": ("bf16",)}),
    sample=lambda trial, offer, chosen, ctx: {"weight_storage": "bf16"},
    lossy=lambda p: p.weight_storage != "bf16",
    describe=lambda p: {"fp8_storage": "fp8-storage", "int8_weight_only": "int8-storage"}.get(p.weight_storage),
)


# ---- 8. cache ----------------------------------------------------------------------------------------------

# first_block: diffusers' FirstBlockCache hooks, eager only. dbcache: cache-dit's block cache (compute the first Fn
# and last Bn blocks, reuse the middle's residual while the first blocks' output changes less than the threshold),
# optionally with TaylorSeer forecasting; its decisions run in Python around the blocks, so it composes with
# regional compile and FP8 (measured on an H200: benchmarks/h200/cache-compose), where diffusers' hooks do not.
CACHES = ("none", "first_block", "dbcache")
CACHE_THRESHOLD_RANGE = (0.05, 0.3)  # what the search draws from; a lock may hold any value in (0, 1]
# cache-dit's own defaults for what a dbcache profile leaves unset (DBCacheConfig).
DBCACHE_DEFAULTS = {"cache_fn": 1, "cache_bn": 0, "cache_warmup": 8}
DBCACHE_FIELDS = ("cache_fn", "cache_bn", "cache_warmup", "cache_max_run", "taylorseer_order", "cache_schedule")
TAYLORSEER_ORDERS = (1, 2)
CACHE_DIT_INSTALL = "pip install 'qwendoctor[cache]'"


def apply_cache(pipe, profile: "Profile"):
    from qwendoctor import cfg_batching

    if not _has_transformer(pipe, profile, "cache", profile.cache != "none"):
        return pipe
    # CFG batching's interception from an earlier profile goes first: the caches are set up on the plain
    # transformer, and CFG batching (later in the order) intercepts the call around whatever they hook.
    cfg_batching.disable(pipe)
    if getattr(pipe.transformer, "is_cache_enabled", False):
        pipe.transformer.disable_cache()
    if getattr(pipe, "_qwendoctor_cache_dit", False):
        import cache_dit

        cache_dit.disable_cache(pipe)
        pipe._qwendoctor_cache_dit = False
    if profile.cache == "first_block":
        from diffusers.hooks import FirstBlockCacheConfig

        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=profile.cache_threshold))
    elif profile.cache == "dbcache":
        _enable_dbcache(pipe, profile)
    return pipe


def _enable_dbcache(pipe, profile: "Profile") -> None:
    import os

    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")  # read when cache_dit is first imported
    import cache_dit

    value = {name: getattr(profile, name) for name in DBCACHE_FIELDS}
    always = (value["cache_fn"] or DBCACHE_DEFAULTS["cache_fn"]) + (value["cache_bn"] or 0)
    blocks = len(pipe.transformer.transformer_blocks)
    if always >= blocks:
        raise UsageError(f"profile.cache_fn + cache_bn: {always} blocks always computed leave none of this "
                         f"transformer's {blocks} to reuse")
    warmup = DBCACHE_DEFAULTS["cache_warmup"] if value["cache_warmup"] is None else value["cache_warmup"]
    schedule = {}
    if value["cache_schedule"] is not None:
        workload = getattr(pipe, "_qwendoctor_workload", None)
        if workload is None:
            raise UsageError("profile.cache_schedule: a fixed schedule needs the workload's step count")
        steps = profile.steps or workload.reference_steps
        # cache-dit's static policy: the mask alone decides which steps reuse, whatever the residuals do.
        schedule = {"steps_computation_mask": fixed_schedule(steps, value["cache_schedule"], warmup),
                    "steps_computation_policy": "static", "num_inference_steps": steps}
    config = cache_dit.DBCacheConfig(
        Fn_compute_blocks=value["cache_fn"] or DBCACHE_DEFAULTS["cache_fn"],
        Bn_compute_blocks=DBCACHE_DEFAULTS["cache_bn"] if value["cache_bn"] is None else value["cache_bn"],
        residual_diff_threshold=profile.cache_threshold or 0.0,
        max_warmup_steps=warmup,
        max_continuous_cached_steps=value["cache_max_run"] or -1,
        **schedule,
        # One cache per CFG pass when the pipeline calls the transformer twice a step; with CFG batching (one
        # batch-2 call) or without CFG each call is a step, and one decision covers the whole batch.
        enable_separate_cfg=separate_cfg_passes(pipe, profile))
    calibrator = (cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=value["taylorseer_order"])
                  if value["taylorseer_order"] else None)
    cache_dit.enable_cache(pipe, cache_config=config, calibrator_config=calibrator)
    pipe._qwendoctor_cache_dit = True
    pipe._qwendoctor_separate_cfg = config.enable_separate_cfg


def separate_cfg_passes(pipe, profile: "Profile") -> bool:
    """Whether each denoising step calls the transformer twice (true CFG, not batched). Under CFG-parallel each
    rank makes one call per step (its own pass): a cache set up for two compared residuals two steps apart."""
    workload = getattr(pipe, "_qwendoctor_workload", None)
    return ((workload is None or workload.does_cfg) and not profile.cfg_batching
            and getattr(profile, "cfg_degree", 1) == 1)


def fixed_schedule(steps: int, cached_fraction: float, warmup: int) -> list[int]:
    """A step mask (1 computes, 0 reuses) caching `cached_fraction` of `steps`: the first `warmup` steps (fewer
    where the fraction leaves fewer computed) and the last are computed, the others spread evenly between them."""
    computed = min(steps, max(2, round(steps * (1 - cached_fraction))))
    warmup = min(warmup, computed - 1)
    spread = computed - warmup - 1
    picks = {warmup + round(i * (steps - 1 - warmup) / max(spread, 1)) for i in range(spread)}
    keep = set(range(min(warmup, steps))) | picks | {steps - 1}
    return [1 if step in keep else 0 for step in range(steps)]


def cached_steps(pipe) -> int | None:
    """Denoising steps the last call reused cached blocks for in both CFG passes (cache-dit's record); None for
    a cache that keeps no record (diffusers' FirstBlockCache) or no cache."""
    if not getattr(pipe, "_qwendoctor_cache_dit", False):
        return None
    import cache_dit

    # logging=False: a record, not a report.
    stats = cache_dit.summary(pipe.transformer, logging=False)[0]
    cond = set(getattr(stats, "cached_steps", None) or [])
    if not pipe._qwendoctor_separate_cfg:
        return len(cond)
    return len(cond & set(getattr(stats, "cfg_cached_steps", None) or []))


def _cache_check(profile) -> None:
    if profile.cache != "dbcache":
        for name in DBCACHE_FIELDS:
            if getattr(profile, name) is not None:
                raise UsageError(f"profile.{name}: set without cache = dbcache")
    if profile.cache == "none":
        if profile.cache_threshold is not None:
            raise UsageError("profile.cache_threshold: set without a cache")
        return
    threshold = profile.cache_threshold
    if profile.cache == "dbcache" and profile.cache_schedule is not None:
        fraction = profile.cache_schedule
        if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 < fraction < 1:
            raise UsageError(f"profile.cache_schedule: the fraction of steps cached must be in (0, 1), got "
                             f"{fraction!r}")
        if threshold is not None:
            raise UsageError("profile.cache_threshold: a fixed cache_schedule decides which steps reuse; leave the "
                             "threshold unset")
    elif not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0 < threshold <= 1:
        raise UsageError(f"profile.cache_threshold: must be in (0, 1] for cache {profile.cache!r}, got {threshold!r}")
    if profile.cache == "first_block" and profile.compile != "none":
        # Its hooks wrap each block's forward, so the compiled block traces into a function diffusers marks
        # torch.compiler.disable(): dynamo refuses it (benchmarks/h200/cache-compose).
        raise UsageError(f"profile: cache 'first_block' cannot be combined with compile {profile.compile!r}; "
                         "cache = dbcache can")
    if profile.cache == "dbcache":
        if profile.compile == "full":
            raise UsageError("profile: cache 'dbcache' runs with compile = regional (measured), not full")
    if profile.context_degree > 1:
        # Each rank would decide to skip blocks from its own shard of the sequence: ranks that decide
        # differently issue different collectives and the run deadlocks.
        raise UsageError(f"profile: cache {profile.cache!r} cannot be combined with parallel {profile.parallel!r}")


def _cache_runnable(profile, workload, capabilities) -> None:
    if profile.cache == "dbcache" and not capabilities.has_cache_dit:
        raise UnavailableLever(f"cache 'dbcache' needs cache-dit: {CACHE_DIT_INSTALL}")


def _cache_offer(ctx: SpaceContext) -> Offer:
    if not ctx.draws:
        return Offer({"cache": ("none",)}, (f"caches: {ctx.workload.model} has random weights, so whether a skipped "
                                            "step hurts the image cannot be judged on it",))
    offered = tuple(c for c in CACHES if c != "dbcache" or ctx.capabilities.has_cache_dit)
    left_out = () if ctx.capabilities.has_cache_dit else (f"cache dbcache: cache-dit is not installed "
                                                          f"({CACHE_DIT_INSTALL})",)
    return Offer({"cache": offered}, left_out)


def _cache_sample(trial, offer: Offer, chosen: dict[str, Any], ctx: SpaceContext) -> dict[str, Any]:
    nothing = {"cache": "none", "cache_threshold": None, **dict.fromkeys(DBCACHE_FIELDS)}
    # diffusers' hooks do not survive compile (_cache_check): under compile only cache-dit's cache is drawn.
    offered = tuple(c for c in offer.values["cache"] if chosen["compile"] == "none" or c != "first_block")
    if chosen["compile"] == "full" or offered == ("none",):
        return nothing
    cache = trial.suggest_categorical("cache" if chosen["compile"] == "none" else "cache_compiled", offered)
    if cache == "none":
        return nothing
    drawn = {**nothing, "cache": cache,
             "cache_threshold": trial.suggest_float("cache_threshold", *CACHE_THRESHOLD_RANGE)}
    if cache == "dbcache":
        # The first Fn and last Bn blocks always run: they must leave blocks to reuse.
        fn_max = min(4, ctx.blocks - 1) if ctx.blocks else 4
        bn_max = min(2, ctx.blocks - 1 - fn_max) if ctx.blocks else 2
        drawn.update(cache_fn=trial.suggest_int("cache_fn", 1, fn_max),
                     cache_bn=trial.suggest_int("cache_bn", 0, bn_max),
                     cache_warmup=_cache_warmup(trial, chosen, ctx),
                     cache_max_run=trial.suggest_categorical("cache_max_run", (None, 2, 3, 5)),
                     taylorseer_order=trial.suggest_categorical("taylorseer_order", (None, *TAYLORSEER_ORDERS)))
    return drawn


def _cache_warmup(trial, chosen: dict[str, Any], ctx: SpaceContext) -> int:
    """A warm-up below the trial's step count (STEPS is drawn before CACHE): cache-dit computes every warm-up
    step, so a warm-up of 8 at 8 steps cached nothing and was the uncached profile bit for bit."""
    steps = chosen.get("steps") or ctx.workload.reference_steps
    high = min(8, steps - 1)
    low = min(2, high)
    return trial.suggest_int("cache_warmup", low, low + (high - low) // 2 * 2, step=2)


def _describe_cache(p) -> str | None:
    if p.cache == "none":
        return None
    if p.cache == "first_block":
        return f"first_block({p.cache_threshold:g})"
    when = f"{p.cache_threshold:g}" if p.cache_schedule is None else f"fixed {p.cache_schedule:.0%}"
    parts = [when, f"F{p.cache_fn or DBCACHE_DEFAULTS['cache_fn']}"
             f"B{DBCACHE_DEFAULTS['cache_bn'] if p.cache_bn is None else p.cache_bn}"]
    if p.cache_warmup is not None:
        parts.append(f"warmup {p.cache_warmup}")
    if p.cache_max_run:
        parts.append(f"runs <= {p.cache_max_run}")
    if p.taylorseer_order:
        parts.append(f"taylorseer {p.taylorseer_order}")
    return f"dbcache({', '.join(parts)})"


CACHE = Lever(
    name="cache", apply=apply_cache, undoable=True,
    fields=(Field("cache", str, "none", choices=CACHES), Field("cache_threshold", float, None, optional=True),
            Field("cache_fn", int, None, low=1, optional=True), Field("cache_bn", int, None, low=0, optional=True),
            Field("cache_warmup", int, None, low=0, optional=True),
            Field("cache_max_run", int, None, low=1, optional=True),
            Field("taylorseer_order", int, None, choices=TAYLORSEER_ORDERS, optional=True),
            # this fraction of the steps reused on a fixed schedule instead of a threshold: measures a cache's
            # speed where quality cannot judge it (random weights); never drawn by the search
            Field("cache_schedule", float, None, optional=True, omit_default=True)),
    check=_cache_check, runnable=_cache_runnable, offer=_cache_offer, sample=_cache_sample,
    lossy=lambda p: p.cache != "none", describe=_describe_cache,
    packages=lambda p: ("cache_dit",) if p.cache == "dbcache" else (),
)


# ---- 9. offload ----------------------------------------------------------------------------------------

# group: diffusers' group offloading of the transformer: its blocks live on the CPU and come to the GPU a group
# at a time, the next group copied on a CUDA stream while the current one computes. model: diffusers' model CPU
# offload (accelerate): each component comes to the GPU whole when called and leaves when the next one is.
# sequential: accelerate streams every layer in at its call, the least memory and by far the slowest.
OFFLOADS = ("none", "group", "model", "sequential")
# Blocks per group when the profile leaves it unset: one block's weights on the GPU at a time (plus the next,
# prefetched): the least memory group offloading can hold.
DEFAULT_BLOCKS_PER_GROUP = 1


def apply_offload(pipe, profile: "Profile"):
    if profile.offload == "none":
        return pipe
    import torch

    device = target_device(pipe)
    if profile.offload == "group":
        if not _has_transformer(pipe, profile, "offload", True):
            return pipe
        pipe.transformer.enable_group_offload(
            onload_device=device, offload_device=torch.device("cpu"), offload_type="block_level",
            num_blocks_per_group=profile.offload_blocks_per_group or DEFAULT_BLOCKS_PER_GROUP,
            # A CPU has no copy stream to overlap with; on CUDA the next group arrives while this one computes.
            use_stream=device.type == "cuda")
    elif profile.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.enable_sequential_cpu_offload(device=device)
    return pipe


def _offload_check(profile) -> None:
    if profile.offload_blocks_per_group is not None and profile.offload != "group":
        raise UsageError("profile.offload_blocks_per_group: set without offload = group")
    if profile.offload == "none":
        return
    if profile.offload == "sequential" and profile.compile != "none":
        raise UsageError(f"profile.offload: 'sequential' moves each layer's weights in at its call, which compile "
                         f"{profile.compile!r} cannot trace; use offload = group or model with compile")
    if profile.parallel != "none":
        # Each rank holds its own pipeline on its own GPU; diffusers' offload hooks and the parallel hooks are not
        # made to work together.
        raise UsageError(f"profile.offload: {profile.offload!r} cannot be combined with parallel "
                         f"{profile.parallel!r}")


def _offload_runnable(profile, workload, capabilities) -> None:
    if profile.offload != "none" and capabilities.device != "cuda":
        raise UnavailableLever(f"offload {profile.offload!r} moves weights between the CPU and a GPU; this machine "
                               "runs on the CPU")


def _describe_offload(p) -> str | None:
    if p.offload == "none":
        return None
    if p.offload == "group":
        return f"offload=group({p.offload_blocks_per_group or DEFAULT_BLOCKS_PER_GROUP})"
    return f"offload={p.offload}"


OFFLOAD = Lever(
    # Not undoable: diffusers has no public way to take group offloading off a model (its weights stay where the
    # hooks last put them); model and sequential offload hooks span the whole pipeline, so it is rebuilt.
    name="offload", apply=apply_offload, undoable=False, pipeline_wide=True,
    fields=(Field("offload", str, "none", choices=OFFLOADS, omit_default=True),
            Field("offload_blocks_per_group", int, None, low=1, optional=True, omit_default=True)),
    check=_offload_check, runnable=_offload_runnable,
    offer=lambda ctx: Offer({"offload": ("none",), "offload_blocks_per_group": (None,)}),
    sample=lambda trial, offer, chosen, ctx: {"offload": "none", "offload_blocks_per_group": None},
    describe=_describe_offload,
)


# ---- 10. text encoder -----------------------------------------------------------------------------------

# resident: on the GPU with the rest, as diffusers builds it. offload: diffusers' group offloading of the text
# encoder; its top level has no block list (Qwen2.5-VL's layers sit one module down), so block-level offloading
# makes it one group: the whole encoder comes to the GPU for its forward and goes back to the CPU after, which
# leaves the denoising loop without it. cpu: it runs on the CPU (accelerate's device hook moves its inputs there
# and its hidden states back), the GPU never holds it.
TEXT_ENCODER_PLACEMENTS = ("resident", "offload", "cpu")


def apply_text_encoder(pipe, profile: "Profile"):
    encoder = getattr(pipe, "text_encoder", None)
    # A pipeline without a text encoder (prompts given as embeddings) has nothing to place; an encoder already
    # placed so (the pool gave its pipeline a new transformer) is left as it is: group offloading cannot be
    # applied twice.
    if (encoder is None or profile.text_encoder == "resident"
            or getattr(encoder, "_qwendoctor_placement", None) == profile.text_encoder):
        return pipe
    import torch

    device = target_device(pipe)
    object.__setattr__(encoder, "_qwendoctor_placement", profile.text_encoder)
    if profile.text_encoder == "offload":
        from diffusers.hooks import apply_group_offloading

        apply_group_offloading(encoder, onload_device=device, offload_device=torch.device("cpu"),
                               offload_type="block_level", num_blocks_per_group=1,
                               use_stream=device.type == "cuda")
        return pipe
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    encoder.to("cpu")
    add_hook_to_module(encoder, AlignDevicesHook(execution_device=torch.device("cpu"), io_same_device=True))
    # diffusers takes the pipeline's execution device from accelerate hooks it finds on components; this one's
    # device is the CPU, which is not where the pipeline runs.
    pipe._exclude_from_cpu_offload = [*pipe._exclude_from_cpu_offload, "text_encoder"]
    return pipe


def _text_encoder_check(profile) -> None:
    if profile.text_encoder != "resident" and profile.offload in ("model", "sequential"):
        raise UsageError(f"profile.text_encoder: {profile.text_encoder!r} with offload {profile.offload!r}, which "
                         "already moves the text encoder; leave text_encoder = resident")


def _text_encoder_runnable(profile, workload, capabilities) -> None:
    if profile.text_encoder != "resident" and capabilities.device != "cuda":
        raise UnavailableLever(f"text_encoder {profile.text_encoder!r} keeps it off a GPU; this machine runs on the "
                               "CPU already")


TEXT_ENCODER = Lever(
    # Not undoable: group offloading has no public removal (see OFFLOAD), and the placement is a component's.
    name="text_encoder", apply=apply_text_encoder, undoable=False, pipeline_wide=True,
    fields=(Field("text_encoder", str, "resident", choices=TEXT_ENCODER_PLACEMENTS, omit_default=True),),
    check=_text_encoder_check, runnable=_text_encoder_runnable,
    offer=lambda ctx: Offer({"text_encoder": ("resident",)}),
    sample=lambda trial, offer, chosen, ctx: {"text_encoder": "resident"},
    describe=lambda p: f"te={p.text_encoder}" if p.text_encoder != "resident" else None,
)


# ---- 11. context parallel (and the fields of both multi-GPU levers) --------------------------------------

# cfg: true CFG's two passes on two GPUs; ulysses / ring: diffusers' context parallelism, the sequence split over
# the GPUs; cfg+X: two groups of GPUs, one per CFG pass, X inside each. `tune --gpus` measures them after the
# study (qwendoctor.strategies), so they are not dimensions of the search.
PARALLEL_STRATEGIES = ("none", "cfg", "ulysses", "ring", "cfg+ulysses", "cfg+ring")


def apply_context_parallel(pipe, profile: "Profile"):
    from qwendoctor import parallel

    if not _has_transformer(pipe, profile, "parallel", profile.context_degree > 1):
        return pipe
    return parallel.apply_context_parallel(pipe, profile)


def _parallel_check(profile) -> None:
    if profile.parallel == "none":
        if profile.gpus != 1:
            raise UsageError(f"profile.gpus: {profile.gpus} GPUs need a parallel strategy "
                             f"({', '.join(PARALLEL_STRATEGIES[1:])})")
        return
    if profile.parallel == "cfg" and profile.gpus != 2:
        raise UsageError(f"profile.gpus: parallel 'cfg' runs the two CFG passes on exactly 2 GPUs, got "
                         f"{profile.gpus}; use cfg+ulysses or cfg+ring for more")
    if "+" in profile.parallel and (profile.gpus < 4 or profile.gpus % 2):
        raise UsageError(f"profile.gpus: parallel {profile.parallel!r} needs an even count >= 4 (2 CFG groups of "
                         f">= 2 GPUs), got {profile.gpus}")
    if profile.gpus < 2:
        raise UsageError(f"profile.gpus: parallel {profile.parallel!r} needs at least 2 GPUs, got {profile.gpus}")
    if profile.cfg_degree == 2 and profile.cfg_batching:
        raise UsageError(f"profile.cfg_batching: parallel {profile.parallel!r} already runs the two CFG passes on "
                         "separate GPUs; set cfg_batching = false")
    if profile.parallel == "ring" and profile.cfg_batching:
        # CFG batching masks the shorter of the two prompts; diffusers' ring attention for sequences that do not
        # split evenly (ring_anything) refuses any attention mask.
        raise UsageError("profile.cfg_batching: parallel 'ring' takes no text mask, which CFG batching needs for "
                         "prompts of different lengths; set cfg_batching = false")
    if profile.context_degree > 1 and profile.compile == "full":
        # The whole model would trace diffusers' output gather, which Dynamo cannot (see qwendoctor.parallel);
        # regional compile leaves it outside the compiled blocks.
        raise UsageError(f"profile.compile: parallel {profile.parallel!r} takes compile = regional, not full")


def _parallel_runnable(profile, workload, capabilities) -> None:
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


CONTEXT_PARALLEL = Lever(
    name="context_parallel", apply=apply_context_parallel, undoable=False, captures_profile=True,
    fields=(Field("parallel", str, "none", choices=PARALLEL_STRATEGIES, omit_default=True),
            Field("gpus", int, 1, low=1, omit_default=True)),
    check=_parallel_check, runnable=_parallel_runnable,
    describe=lambda p: f"parallel={p.parallel}/{p.gpus}" if p.parallel != "none" else None,
)


# ---- 12. compile ----------------------------------------------------------------------------------------

COMPILE_MODES = ("none", "regional", "full")
# torch.compile's CUDA-graph mode ("reduce-overhead"). On an H100, under regional compile, it failed with
# "accessing tensor output of CUDAGraphs that has been overwritten by a subsequent run", the tensor being a block's
# output (`hidden_states + img_gate2 * img_mlp_output`; benchmarks/README.md, "GPU tests"). The explanation
# followed here, from PyTorch's documentation and not yet confirmed on a GPU (tests/gpu/test_cuda_graphs_gpu.py
# reproduces the failure first): CUDA Graph Trees start "a new iteration ... on each invocation of torch.compile"
# (torch.compiler.cudagraph_mark_step_begin), and a new iteration frees the tensors of the one before. Regional
# compile makes each of the 60 block calls an invocation, so a block's replay may overwrite the previous block's
# outputs, which are its own inputs. A whole-transformer compile makes one invocation per transformer call; there
# the one output the pipeline keeps across calls is the cond pass's noise prediction, which the uncond pass's
# replay may overwrite, so true CFG needs CFG batching (one call per step). Not searched by tune until the bench
# has measured it (ladder steps `stack:+cuda_graphs*`); the lever refuses the combinations above. (The caches are
# refused with a whole-transformer compile by the cache lever already.)
CUDA_GRAPHS = "reduce-overhead"
COMPILE_OPTIONS = ("default", "max-autotune-no-cudagraphs", "coordinate-descent", CUDA_GRAPHS)
# Compile modes that are inductor settings rather than torch.compile modes.
COMPILE_OPTION_CONFIG = {
    # Tunes each generated Triton kernel's block sizes by benchmarking neighbours at its first run (what
    # torchao's quantization configs switch on for the process unless told not to).
    "coordinate-descent": {"coordinate_descent_tuning": True, "coordinate_descent_check_all_directions": True},
}
# compile_mode -> the rule under which a measurement may leave it out of the default space (probes/measured.toml)
MODE_RULES = {"max-autotune-no-cudagraphs": "max-autotune", "coordinate-descent": "coordinate-descent"}


def apply_compile(pipe, profile: "Profile"):
    if not _has_transformer(pipe, profile, "compile", profile.compile != "none") or profile.compile == "none":
        return pipe
    # Under context parallelism attention runs eagerly between compiled pieces (qwendoctor.parallel): a break.
    # Group offloading's onload is torch.compiler.disable()d and layerwise casting makes Parameters in its hooks:
    # both inside each block, where fullgraph=True refuses them (dynamo: "Skip inlining torch.compiler.disable()d
    # function", "Attempted to use torch.nn.Parameter() constructor"); a graph break at each instead.
    options: dict = {"fullgraph": profile.context_degree == 1 and profile.offload != "group"
                     and profile.weight_storage == "bf16"}
    if profile.compile_mode in COMPILE_OPTION_CONFIG:
        # Inductor settings for this compile only (baked into the code it generates), not process-wide.
        options["options"] = dict(COMPILE_OPTION_CONFIG[profile.compile_mode])
    elif profile.compile_mode != "default":
        options["mode"] = profile.compile_mode
    if profile.compile == "regional":
        # The 60 blocks share one code path: compile it once instead of the whole model (seconds, not minutes).
        pipe.transformer.compile_repeated_blocks(**options)
    else:
        pipe.transformer.compile(**options)
    return pipe


def _compile_check(profile) -> None:
    if profile.compile == "none" and profile.compile_mode != "default":
        raise UsageError(f"profile.compile_mode: {profile.compile_mode!r} needs compile = regional or full")
    if profile.compile_mode != CUDA_GRAPHS:
        return
    if profile.compile != "full":
        raise UsageError(f"profile.compile_mode: {CUDA_GRAPHS} needs compile = full: under regional compile each "
                         "block's call starts a new CUDA-graph iteration, whose replay can overwrite the previous "
                         "block's outputs")
    if profile.offload != "none":
        raise UsageError(f"profile.compile_mode: {CUDA_GRAPHS} with offload={profile.offload}: offload moves the "
                         "weights to new addresses at each call, and a CUDA graph replays the recorded ones")
    # Layerwise casting breaks the transformer's graph (apply_compile's fullgraph=False) into pieces, each its own
    # compiled function and so its own CUDA-graph iteration: regional compile's failure again. (Context parallelism,
    # the other graph breaker, takes regional compile only.)
    if profile.weight_storage != "bf16":
        raise UsageError(f"profile.compile_mode: {CUDA_GRAPHS} with weight_storage={profile.weight_storage}: it breaks "
                         "the compiled graph into pieces, and each piece's call starts a new CUDA-graph iteration")


def _compile_runnable(profile, workload, capabilities) -> None:
    if profile.compile_mode == CUDA_GRAPHS and workload.does_cfg and not profile.cfg_batching:
        raise UsageError(f"profile.compile_mode: {CUDA_GRAPHS} with true CFG needs cfg_batching = true: the "
                         "pipeline keeps the cond pass's output, which the uncond pass's replay can overwrite")


def _compile_offer(ctx: SpaceContext) -> Offer:
    # Inductor on the CPU compiles the tiny model for longer than a whole CPU tune takes, and CPU speed is not
    # what this tool tunes for: compile is searched where it pays, on CUDA.
    if not ctx.can_compile:
        return Offer({"compile": ("none",), "compile_mode": ("default",)})
    # CUDA graphs wait for the bench's measurement (see CUDA_GRAPHS); the sampler never draws them.
    left_out, modes = [f"{CUDA_GRAPHS} (CUDA graphs): not yet measured here; qwendoctor bench's stack:+cuda_graphs "
                       "row measures it"], ["default"]
    for mode, rule in MODE_RULES.items():
        measured = None if ctx.exhaustive else ctx.evidence(rule)
        if measured:
            left_out.append(f"{mode}: {measured}")
        else:
            modes.append(mode)
    if ctx.exhaustive:
        compile_ = COMPILE_MODES
    else:
        # Not a measurement but the model's structure: every model here is a QwenImageTransformer2DModel, whose
        # identical blocks regional compile compiles once, for the same kernels a full compile makes in each.
        compile_ = ("none", "regional")
        left_out.insert(0, "full-model compile (regional compile compiles one of the identical blocks instead of "
                           "all, for the same kernels in each)")
    return Offer({"compile": compile_, "compile_mode": tuple(modes)}, tuple(left_out))


def _compile_sample(trial, offer: Offer, chosen: dict[str, Any], ctx: SpaceContext) -> dict[str, Any]:
    compile_ = trial.suggest_categorical("compile", offer.values["compile"])
    modes = offer.values["compile_mode"]
    mode = trial.suggest_categorical("compile_mode", modes) if compile_ != "none" and len(modes) > 1 else "default"
    return {"compile": compile_, "compile_mode": mode}


def _describe_compile(p) -> str | None:
    if p.compile == "none":
        return None
    return f"compile={p.compile}" + ("" if p.compile_mode == "default" else f"/{p.compile_mode}")


def _can_compile(capabilities, workload) -> bool:
    return capabilities.device == "cuda" and capabilities.compile_works is not False


def _with_cuda_graphs(p):
    """The ladder's CUDA-graph step: the stack's compile made whole-transformer with reduce-overhead, where the
    lever allows it (an unchanged profile is not tried)."""
    if p.compile == "none" or p.cache != "none" or p.offload != "none":
        return p
    return dataclasses.replace(p, compile="full", compile_mode=CUDA_GRAPHS)


def _compile_bench(capabilities, workload) -> list[BenchRow]:
    from qwendoctor.profile import Profile

    return [BenchRow("compile:regional", "regional compile", Profile(compile="regional"))] if _can_compile(
        capabilities, workload) else []


COMPILE = Lever(
    name="compile", apply=apply_compile, undoable=False, captures_profile=True,
    fields=(Field("compile", str, "none", choices=COMPILE_MODES),
            Field("compile_mode", str, "default", choices=COMPILE_OPTIONS)),
    check=_compile_check, runnable=_compile_runnable, offer=_compile_offer, sample=_compile_sample,
    describe=_describe_compile,
    bench_alone=_compile_bench,
    ladder=(LadderStep(2, "stack:+compile", "+ regional compile",
                       lambda p: dataclasses.replace(p, compile="regional"), _can_compile),
            LadderStep(6, "stack:+max_autotune", "+ max-autotune (no CUDA graphs)",
                       lambda p: dataclasses.replace(p, compile_mode="max-autotune-no-cudagraphs")
                       if p.compile != "none" else p, _can_compile),
            # The whole transformer as one CUDA graph per call (see CUDA_GRAPHS); after the ladder's CFG batching.
            # Tried on both tiers: graphs remove GPU idle time, and the committed H100 compiled steps idle 0 to 12 ms
            # in bf16 (1328x1328 and 1024x1024) and 17 to 20 ms under FP8 (1328x1328).
            LadderStep(7, "stack:+cuda_graphs", "+ CUDA graphs (whole-transformer compile, reduce-overhead)",
                       _with_cuda_graphs, _can_compile),
            LadderStep(9, "stack:+cuda_graphs_fp8", "+ CUDA graphs on the FP8 stack", _with_cuda_graphs,
                       _can_compile)),
)


# ---- 13. CFG batching -----------------------------------------------------------------------------------

def apply_cfg_batching(pipe, profile: "Profile"):
    from qwendoctor import cfg_batching

    if profile.cfg_batching and _has_transformer(pipe, profile, "cfg_batching", True):
        cfg_batching.enable(pipe)
    else:
        cfg_batching.disable(pipe)
    return pipe


def _cfg_batching_runnable(profile, workload, capabilities) -> None:
    if profile.cfg_batching and not workload.does_cfg:
        raise UsageError("profile.cfg_batching batches true CFG's two passes; this workload has no CFG "
                         f"(true_cfg_scale {workload.true_cfg_scale:g})")


def _cfg_batching_bench(capabilities, workload) -> list[BenchRow]:
    from qwendoctor.profile import Profile

    return [BenchRow("cfg_batching", "CFG batching (batch-2 pass)", Profile(cfg_batching=True))] if (
        workload.does_cfg) else []


CFG_BATCHING = Lever(
    name="cfg_batching", apply=apply_cfg_batching, undoable=True,
    fields=(Field("cfg_batching", bool, False),),
    runnable=_cfg_batching_runnable,
    offer=lambda ctx: Offer({"cfg_batching": (False, True) if ctx.workload.does_cfg else (False,)}),
    sample=lambda trial, offer, chosen, ctx: {
        "cfg_batching": trial.suggest_categorical("cfg_batching", offer.values["cfg_batching"])},
    describe=lambda p: "cfg-batch" if p.cfg_batching else None,
    bench_alone=_cfg_batching_bench,
    ladder=(LadderStep(1, "stack:+cfg_batching", "+ CFG batching",
                       lambda p: dataclasses.replace(p, cfg_batching=True), lambda c, w: w.does_cfg),),
)


# ---- 14. CFG parallel -----------------------------------------------------------------------------------

def apply_cfg_parallel(pipe, profile: "Profile"):
    from qwendoctor import parallel

    if not _has_transformer(pipe, profile, "parallel", profile.cfg_degree == 2):
        return pipe
    return parallel.apply_cfg_parallel(pipe, profile)


# Its fields (parallel, gpus) are the context-parallel lever's: one strategy names both.
CFG_PARALLEL = Lever(name="cfg_parallel", apply=apply_cfg_parallel, undoable=False, captures_profile=True)


# ---- 15. VAE decode ------------------------------------------------------------------------------------

# tiled: diffusers decodes the latents in overlapping tiles (256 px, stride 192) and blends the seams: peak memory
# bounded by a tile instead of the image, the image close to the full decode but not equal (the seams are blended).
# sliced: one image of a batch at a time; a batch of one decodes exactly as `full`.
VAE_DECODES = ("full", "tiled", "sliced")


def apply_vae_decode(pipe, profile: "Profile"):
    vae = getattr(pipe, "vae", None)
    if vae is None:
        if profile.vae_decode != "full":
            raise UsageError(f"profile.vae_decode = {profile.vae_decode!r} changes the pipeline's VAE, and this "
                             "pipeline has none (vae=None)")
        return pipe
    # Both ways, so a used pipeline can be re-applied.
    (vae.enable_tiling if profile.vae_decode == "tiled" else vae.disable_tiling)()
    (vae.enable_slicing if profile.vae_decode == "sliced" else vae.disable_slicing)()
    return pipe


VAE_DECODE = Lever(
    name="vae_decode", apply=apply_vae_decode, undoable=True,
    fields=(Field("vae_decode", str, "full", choices=VAE_DECODES, omit_default=True),),
    offer=lambda ctx: Offer({"vae_decode": ("full",)}),
    sample=lambda trial, offer, chosen, ctx: {"vae_decode": "full"},
    lossy=lambda p: p.vae_decode == "tiled",
    describe=lambda p: f"vae={p.vae_decode}" if p.vae_decode != "full" else None,
)


# ---- 16. steps ------------------------------------------------------------------------------------------

def _steps_offer(ctx: SpaceContext) -> Offer:
    """From the reference down to a fifth of it, in strides of a tenth: the floor, not the range, decides how
    few steps are enough (on the trained tiny model 4 of 50 already miss PSNR 30 dB, benchmarks/tiny). Only the
    reference on a model that does not draw."""
    reference = ctx.workload.reference_steps
    if not ctx.draws:
        return Offer({"steps": IntRange(reference, reference, 1)},
                     (f"fewer steps than {reference}: {ctx.workload.model} has random weights, so quality against "
                      "the reference says nothing about steps",))
    stride = max(1, reference // 10)
    low = reference - stride * ((reference - max(MIN_STEPS, math.ceil(reference / 5))) // stride)
    return Offer({"steps": IntRange(low, reference, stride)})


def _steps_sample(trial, offer: Offer, chosen: dict[str, Any], ctx: SpaceContext) -> dict[str, Any]:
    values = offer.values["steps"]
    steps = trial.suggest_int("steps", values.low, values.high, step=values.step)
    return {"steps": None if steps == ctx.workload.reference_steps else steps}


STEPS = Lever(
    name="steps", apply=None, undoable=True,
    fields=(Field("steps", int, None, low=MIN_STEPS, optional=True),),  # None: the workload's reference steps
    offer=_steps_offer, sample=_steps_sample, lossy=lambda p: p.steps is not None,
    describe=lambda p: f"steps={p.steps}" if p.steps is not None else None,
)


LEVERS = (TF32, ATTENTION, REAL_ROPE, FUSED_QKV, GELU_EPILOGUE, QUANTIZATION, WEIGHT_STORAGE, CACHE, OFFLOAD,
          TEXT_ENCODER, CONTEXT_PARALLEL, COMPILE, CFG_BATCHING, CFG_PARALLEL, VAE_DECODE, STEPS)
# The order tune asks Optuna for values: compile first, since whether quantization, cache and real RoPE are
# offered depends on it. (Changing it changes which profiles a seeded study proposes.)
# The memory levers are not searched: they cost speed, and a memory plan chooses them.
# STEPS before CACHE: a cache's warm-up is drawn below the step count (_cache_warmup).
SEARCH_ORDER = (ATTENTION, COMPILE, QUANTIZATION, STEPS, CACHE, TF32, CFG_BATCHING, REAL_ROPE, FUSED_QKV,
                GELU_EPILOGUE)
FIELDS = tuple(field for lever in LEVERS for field in lever.fields)


def optimize(pipe, profile: "Profile", undoable_only: bool = False, workload: "Workload | None" = None):
    """Apply the levers of `profile` to `pipe` in the documented order. `undoable_only`: just the levers that
    set their state both ways, to re-apply a profile to a pipeline a trial already used (qwendoctor.pool).
    `workload`: what the pipeline will be called with; a cache must know in advance whether each step runs true
    CFG's two passes, and a fixed cache schedule how many steps there are."""
    profile.validate()
    if workload is not None:
        object.__setattr__(pipe, "_qwendoctor_workload", workload)
    for lever in LEVERS:
        if lever.apply is not None and (lever.undoable or not undoable_only):
            pipe = lever.apply(pipe, profile)
    return pipe


def fingerprint_fields(profile: "Profile") -> tuple[str, ...]:
    """The fingerprint fields `profile` depends on beyond the always-matched ones (levers' `packages`)."""
    return tuple(dict.fromkeys(field for lever in LEVERS for field in lever.packages(profile)))


def is_lossy(profile: "Profile", reference: "Profile | None" = None) -> bool:
    """Whether `profile` changes the image beyond rounding (levers' `lossy`), against diffusers' default or, given
    `reference`, against that profile's images: a lossy lever `reference` sets the same way (FP8 weight storage in
    a memory plan's placement, say) changes nothing in the comparison."""
    def same_as_reference(lever: Lever) -> bool:
        return reference is not None and all(getattr(profile, f.name) == getattr(reference, f.name)
                                             for f in lever.fields)
    return any(lever.lossy(profile) and not same_as_reference(lever) for lever in LEVERS)


def pipeline_wide_part(profile: "Profile") -> dict[str, Any]:
    """The fields of the levers whose state lives beyond the transformer (`pipeline_wide`)."""
    return {f.name: getattr(profile, f.name) for lever in LEVERS if lever.pipeline_wide for f in lever.fields}


def baked_part(profile: "Profile") -> dict[str, Any] | None:
    """What of `profile` cannot be taken off a transformer once applied; None when all of it can."""
    baked = [lever for lever in LEVERS if not lever.undoable and lever.is_on(profile)]
    if any(lever.captures_profile for lever in baked):
        return dataclasses.replace(profile, steps=None).to_dict()
    return {f.name: getattr(profile, f.name) for lever in baked for f in lever.fields} or None
