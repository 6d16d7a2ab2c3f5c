"""The levers: one function each, `apply_<lever>(pipe, profile) -> pipe`, applied by `optimize` in a fixed order.

Order, and why:
  1. tf32               process-wide matmul precision; first so everything after sees it
  2. attention backend  diffusers' dispatcher; before compile so the compiled graph traces the chosen kernel
  3. real RoPE          rotary embedding in real arithmetic; before compile, which cannot fuse complex ops
  4. quantization       torchao swaps Linear weights; before compile so inductor fuses the activation quantization
  5. cache              diffusers' hooks around the blocks (never together with compile: Profile.validate)
  6. context parallel   diffusers' Ulysses / ring hooks (qwendoctor.parallel); before compile, which traces them
  7. compile            it traces whatever the steps above left
  8. cfg batching       it wraps the call the pipeline makes, around the compiled model
  9. cfg parallel       the same interception with the two passes on two GPUs (never together with 8)

A profile value at its default leaves the pipeline as diffusers built it. tf32, attention, real RoPE, cache
and CFG batching set their state both ways (REAPPLICABLE), so they can be re-applied to a used pipeline;
quantization and compile cannot be undone, so the tuner's pool (qwendoctor.pool) gives a trial that needs them
gone a new transformer with the original weights. Steps are not a lever on the pipeline but an argument of each
call (`qwendoctor.runner.call_arguments`).
"""

from __future__ import annotations

from qwendoctor.profile import Profile

# Compile modes that are inductor settings rather than torch.compile modes.
COMPILE_OPTION_CONFIG = {
    # Tunes each generated Triton kernel's block sizes by benchmarking neighbours at its first run (what
    # torchao's quantization configs switch on for the process unless told not to).
    "coordinate-descent": {"coordinate_descent_tuning": True, "coordinate_descent_check_all_directions": True},
}


def apply_tf32(pipe, profile: Profile):
    import torch

    # "high" lets fp32 matmuls use TF32; bf16 matmuls are unaffected, so this matters only for fp32 parts.
    torch.set_float32_matmul_precision("high" if profile.tf32 else "highest")
    return pipe


def apply_attention_backend(pipe, profile: Profile):
    from qwendoctor.attention import ensure_backend

    ensure_backend(profile.attention_backend)  # FA4 is registered with diffusers' dispatcher on first use
    pipe.transformer.set_attention_backend(profile.attention_backend)
    return pipe


def apply_real_rope(pipe, profile: Profile):
    from qwendoctor import rope

    # Process-wide, like tf32: diffusers' attention processor looks the function up in its module.
    (rope.enable if profile.real_rope else rope.disable)()
    return pipe


def apply_quantization(pipe, profile: Profile):
    if profile.quantization == "none":
        return pipe
    import torch
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        PerRow,
        PerTensor,
        quantize_,
    )

    # set_inductor_config=False: by default torchao turns on inductor's coordinate-descent kernel tuning for the
    # whole process, and never off. On an H100 that tuning added 75-175 s to the warm-up of every compiled
    # FP8 graph and of every graph compiled after it, bf16 too (benchmarks/tune/compile-cost). It is the
    # `coordinate-descent` compile mode here, a choice of its own.
    config = {
        "fp8_rowwise": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(),
                                                                         set_inductor_config=False),
        "fp8_tensorwise": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerTensor(),
                                                                            set_inductor_config=False),
        "fp8_weight_only": lambda: Float8WeightOnlyConfig(set_inductor_config=False),
    }[profile.quantization]()

    def is_block_linear(module, _fqn):
        # FP8 GEMMs need both dimensions divisible by 16; the embedders and the final projection stay bf16.
        return (isinstance(module, torch.nn.Linear)
                and module.in_features % 16 == 0 and module.out_features % 16 == 0)

    quantize_(pipe.transformer.transformer_blocks, config, filter_fn=is_block_linear)
    return pipe


def apply_cache(pipe, profile: Profile):
    if getattr(pipe.transformer, "is_cache_enabled", False):
        pipe.transformer.disable_cache()
    if profile.cache == "first_block":
        from diffusers.hooks import FirstBlockCacheConfig

        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=profile.cache_threshold))
    return pipe


def apply_compile(pipe, profile: Profile):
    if profile.compile == "none":
        return pipe
    # Under context parallelism attention runs eagerly between compiled pieces (qwendoctor.parallel): a break.
    options: dict = {"fullgraph": profile.context_degree == 1}
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


def apply_cfg_batching(pipe, profile: Profile):
    from qwendoctor import cfg_batching

    if profile.cfg_batching:
        cfg_batching.enable(pipe)
    else:
        cfg_batching.disable(pipe)
    return pipe


def apply_context_parallel(pipe, profile: Profile):
    from qwendoctor import parallel

    return parallel.apply_context_parallel(pipe, profile)


def apply_cfg_parallel(pipe, profile: Profile):
    from qwendoctor import parallel

    return parallel.apply_cfg_parallel(pipe, profile)


LEVERS = (apply_tf32, apply_attention_backend, apply_real_rope, apply_quantization, apply_cache,
          apply_context_parallel, apply_compile, apply_cfg_batching, apply_cfg_parallel)
# The levers that set their state both ways: re-applying them to a used pipeline leaves it as a fresh one would be.
REAPPLICABLE = (apply_tf32, apply_attention_backend, apply_real_rope, apply_cache, apply_cfg_batching)


def optimize(pipe, profile: Profile, only: tuple | None = None):
    """Apply the levers of `profile` to `pipe` in the documented order (`only`: a subset, such as REAPPLICABLE)."""
    profile.validate()
    for lever in LEVERS:
        if only is None or lever in only:
            pipe = lever(pipe, profile)
    return pipe
