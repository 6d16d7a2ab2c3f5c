"""torch.compile of the transformer: regional (one of the identical blocks, compiled once) or the whole model,
with inductor's modes (max-autotune, coordinate descent, CUDA graphs).

Applied after every lever that changes the transformer, so it traces what they left; it captures the whole profile
(qwendoctor.pool builds a new transformer for another one).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from qwendoctor.errors import UsageError
from qwendoctor.levers.base import (BenchRow, Field, LadderStep, Lever, Offer, SpaceContext, has_transformer,
                                    runs_true_cfg)

if TYPE_CHECKING:
    from qwendoctor.profile import Profile


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
    if not has_transformer(pipe, profile, "compile", profile.compile != "none") or profile.compile == "none":
        return pipe
    # Under context parallelism attention runs eagerly between compiled pieces (qwendoctor.levers.parallel): a break.
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
    if profile.compile_mode == CUDA_GRAPHS and runs_true_cfg(workload, profile) and not profile.cfg_batching:
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
    return [BenchRow("compile:regional", "regional compile", {"compile": "regional"})] if _can_compile(
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
