"""The lever table: every optimization qwendoctor knows, declared once, in the order `optimize()` applies them.

A lever is one function, `apply_<lever>(pipe, profile) -> pipe`, plus everything the rest of qwendoctor needs to
know about it, declared beside it in one `Lever` (qwendoctor.levers.base):

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

Each lever lives in a module of this package with its mechanism (levers/<module>.py, named in brackets below);
this module only orders them and reads the table as a whole.

Order of application (LEVERS), and why:
  1. tf32               process-wide matmul precision; first so everything after sees it [tf32]
  2. attention backend  diffusers' dispatcher; before compile so the compiled graph traces the chosen kernel
                        [attention]
  3. real RoPE          rotary embedding in real arithmetic; before compile, which cannot fuse complex ops
                        [real_rope]
  4. lora               the workload's LoRAs, loaded with diffusers' loader and held unfused (peft layers, set up
                        for hotswap) or fused into the weights; before fused qkv, which replaces the Linears peft
                        wraps, before quantization (fused in bf16, then quantized: no FP8 artifacts) and before
                        compile (hotswap is enabled before the first load and compile) [lora]
  5. distilled          a few-step distilled LoRA run as its maker declared: its weights join the LoRAs of 4,
                        its step count is 18's, true CFG off; here its scheduler replaces the base's [distilled]
  6. fused qkv          one q/k/v GEMM per stream; before quantization and weight storage, so they see the fused
                        Linears, and before compile [fused_qkv]
  7. gelu epilogue      the MLP's GELU in its first GEMM's cuBLASLt epilogue; before weight storage and offload,
                        whose hooks then wrap the fused Linear, and before compile [gelu_epilogue]
  8. quantization       torchao swaps Linear weights; before compile so inductor fuses the activation quantization
                        [quantization]
  9. weight storage     diffusers' layerwise casting (FP8 storage, upcast per layer); never with 8; before offload,
                        whose groups then move the FP8 copies, and before compile [weight_storage]
 10. cache              cache-dit's block cache or diffusers' FirstBlockCache around the blocks; before compile
                        [cache]
 11. offload            diffusers' group offloading of the transformer, or its model / sequential CPU offload of
                        the pipeline; after the levers that change the blocks, before compile, which traces its hooks
                        [offload]
 12. text encoder       where the text encoder lives (resident, offloaded, on the CPU); it runs once per call
                        [text_encoder]
 13. context parallel   diffusers' Ulysses / ring hooks; before compile, which traces them [parallel]
 14. compile            it traces whatever the steps above left [compile]
 15. cfg batching       it intercepts the transformer's call, outside the compiled model [cfg_batching]
 16. cfg parallel       the same interception with the two passes on two GPUs (never together with 15) [parallel]
 17. vae decode         tiled or sliced decoding; touches the VAE only [vae_decode]
 18. steps              not a change to the pipeline: an argument of each call (`qwendoctor.runner.call_arguments`)
                        [steps]

Memory levers (9, 11, 12, 17) trade speed for memory: tune does not search them (they are not in SEARCH_ORDER and
offer their defaults only); a memory plan chooses them (qwendoctor.levers.memory).

A value at its field's default leaves the pipeline as diffusers built it. How to add a lever (one new module and
one line in LEVERS): README, "Adding a lever". This package imports nothing of qwendoctor.profile or
qwendoctor.parallel: the profile is made from this table, and the launcher uses it.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

# The names below are this package's public surface: `from qwendoctor.levers import X` for each of them.
from qwendoctor.errors import UsageError  # noqa: F401 (re-exported)
from qwendoctor.levers.attention import (  # noqa: F401
    ATTENTION, ATTENTION_SLACK, FAST_ATTENTION, _slower_than_slack, apply_attention_backend)
from qwendoctor.levers.base import (  # noqa: F401
    BenchRow, Field, IntRange, LadderStep, Lever, Offer, SpaceContext, runs_true_cfg)
from qwendoctor.levers.cache import (  # noqa: F401
    CACHE, CACHE_DIT_INSTALL, CACHE_THRESHOLD_RANGE, CACHES, DBCACHE_DEFAULTS, DBCACHE_FIELDS, TAYLORSEER_ORDERS,
    apply_cache, cached_steps, fixed_schedule, separate_cfg_passes)
from qwendoctor.levers.cfg_batching import CFG_BATCHING, apply_cfg_batching  # noqa: F401
from qwendoctor.levers.compile import (  # noqa: F401
    COMPILE, COMPILE_MODES, COMPILE_OPTION_CONFIG, COMPILE_OPTIONS, CUDA_GRAPHS, MODE_RULES, apply_compile)
from qwendoctor.levers.distilled import DISTILLED, apply_distilled  # noqa: F401
from qwendoctor.levers.fused_qkv import FUSED_QKV, apply_fused_qkv  # noqa: F401
from qwendoctor.levers.gelu_epilogue import GELU_EPILOGUE, apply_gelu_epilogue  # noqa: F401
from qwendoctor.levers.lora import LORA, LORA_MODES, apply_lora  # noqa: F401
from qwendoctor.levers.memory import load_on_cpu, target_device  # noqa: F401
from qwendoctor.levers.offload import DEFAULT_BLOCKS_PER_GROUP, OFFLOAD, OFFLOADS, apply_offload  # noqa: F401
from qwendoctor.levers.parallel import (  # noqa: F401
    CFG_PARALLEL, CONTEXT_PARALLEL, PARALLEL_STRATEGIES, apply_cfg_parallel, apply_context_parallel)
from qwendoctor.levers.quantization import (  # noqa: F401
    BF16_END_BLOCKS, FP8_MIN_COMPUTE_CAPABILITY, QUANTIZATION, QUANTIZATIONS, TEXT_STREAMS, _block_linear_between,
    apply_quantization, in_text_stream)
from qwendoctor.levers.real_rope import REAL_ROPE, apply_real_rope  # noqa: F401
from qwendoctor.levers.steps import STEPS  # noqa: F401
from qwendoctor.levers.text_encoder import TEXT_ENCODER, TEXT_ENCODER_PLACEMENTS, apply_text_encoder  # noqa: F401
from qwendoctor.levers.tf32 import TF32, apply_tf32  # noqa: F401
from qwendoctor.levers.vae_decode import VAE_DECODE, VAE_DECODES, apply_vae_decode  # noqa: F401
from qwendoctor.levers.weight_storage import WEIGHT_STORAGE, WEIGHT_STORAGES, apply_weight_storage  # noqa: F401

if TYPE_CHECKING:
    from qwendoctor.profile import Profile, Workload

LEVERS = (TF32, ATTENTION, REAL_ROPE, LORA, DISTILLED, FUSED_QKV, GELU_EPILOGUE, QUANTIZATION, WEIGHT_STORAGE, CACHE,
          OFFLOAD, TEXT_ENCODER, CONTEXT_PARALLEL, COMPILE, CFG_BATCHING, CFG_PARALLEL, VAE_DECODE, STEPS)
# The order tune asks Optuna for values: compile first, since whether quantization, cache and real RoPE are
# offered depends on it. (Changing it changes which profiles a seeded study proposes.)
# The memory levers are not searched: they cost speed, and a memory plan chooses them.
# STEPS before CACHE: a cache's warm-up is drawn below the step count (cache._cache_warmup).
# LoRA last: how it can be held depends on fused q/k/v and quantization; last, it changes no earlier draw.
# DISTILLED before STEPS: with the adapter, the step count is drawn from the counts it was distilled for; and
# before CFG_BATCHING, which has no CFG to batch then.
SEARCH_ORDER = (ATTENTION, COMPILE, QUANTIZATION, DISTILLED, STEPS, CACHE, TF32, CFG_BATCHING, REAL_ROPE, FUSED_QKV,
                GELU_EPILOGUE, LORA)
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
