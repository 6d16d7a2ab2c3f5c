"""GELU epilogue: Qwen-Image's MLP activation computed in the epilogue of the GEMM before it.

Each of the 60 blocks runs two MLPs, one per stream: `Linear(3072, 12288)`, GELU (tanh approximation), then
`Linear(12288, 3072)`. Under regional compile Inductor leaves the first GEMM to cuBLAS and runs the GELU as a kernel
of its own, which reads and writes the block's widest activation once more: `triton_poi_fused_gelu_view_13`, 15.3 ms
of a 479 ms step in the H100 bench of benchmarks/bench/bench-synthetic-1328x1328-real-rope.json.

torch's `_addmm_activation(bias, input, weight.t(), use_gelu=True)` asks cuBLASLt for its GELU_BIAS epilogue: the
bias and the GELU are applied before the GEMM writes, and it writes the activated result (where cuBLASLt declines,
torch runs the GEMM and then its own GELU kernel; tests/gpu/test_gelu_epilogue_gpu.py checks which). Inductor keeps
the op whole: its lowering registers it as a fallback (`make_fallback(aten._addmm_activation)` in
torch/_inductor/lowering.py) rather than decomposing it into a GEMM and a pointwise kernel.

The op's GELU depends on the device: on CUDA it is the tanh approximation Qwen-Image's MLP uses (torch's own
decomposition, `_addmm_activation` in torch/_decomp/decompositions.py, says so), on the CPU the exact GELU, another
function. So the lever needs a CUDA GPU.

The swap keeps the modules and their parameters: `proj` stays an `nn.Linear` (a subclass), called as a module, so
hooks registered on it later run as before (diffusers' layerwise casting casts its FP8-stored weight up before its
forward: tested on the CPU; offload's hooks are registered the same way, untested with this lever), and the state
dict is diffusers'. Quantized weights (torchao's FP8 and
int8 tensors) have no such epilogue: `profile.check` refuses those combinations. Applied before weight storage
and offload, whose hooks then wrap the fused Linear, and before compile.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any

from qwendoctor.errors import EXIT_USAGE, UnavailableLever, UsageError
from qwendoctor.levers.base import BenchRow, Field, LadderStep, Lever, Offer, SpaceContext, fuse_modules

if TYPE_CHECKING:
    from qwendoctor.profile import Profile


def _activations():
    from diffusers.models import activations

    return activations


@functools.cache  # one class each: torch.compile guards on a module's type
def _classes():
    import torch

    diffusers_gelu = _activations().GELU

    class LinearGELU(torch.nn.Linear):
        """A Linear whose output is GELU(tanh)(x @ W.T + b), from one cuBLASLt GEMM with a GELU_BIAS epilogue."""

        def forward(self, hidden_states):
            flat = hidden_states.reshape(-1, hidden_states.shape[-1])
            # At call time: a test may stand in for the op on a machine without cuBLASLt.
            out = torch._addmm_activation(self.bias, flat, self.weight.t(), use_gelu=True)
            return out.view(*hidden_states.shape[:-1], self.out_features)

    class EpilogueGELU(diffusers_gelu):
        """diffusers' GELU block whose activation already happened in its projection's epilogue."""

        def forward(self, hidden_states):
            return self.proj(hidden_states)

    return LinearGELU, EpilogueGELU


def is_fused(module) -> bool:
    return type(module) is _classes()[1]


def fusable(module) -> bool:
    """A diffusers GELU block this lever can fuse: the tanh approximation (the epilogue's) and a projection with
    a bias (GELU_BIAS; Qwen-Image's have one)."""
    import torch

    return (type(module) is _activations().GELU and module.approximate == "tanh"
            and type(module.proj) is torch.nn.Linear and module.proj.bias is not None)


def fuse(transformer) -> int:
    """Move the activation of every fusable GELU block of `transformer` into its GEMM (in place, idempotent);
    returns how many were fused now."""
    linear_gelu, epilogue_gelu = _classes()
    fused = 0
    for module in transformer.modules():
        if fusable(module):
            module.proj.__class__ = linear_gelu
            module.__class__ = epilogue_gelu
            fused += 1
    return fused


# ---- the lever ------------------------------------------------------------------------------------------

def apply_gelu_epilogue(pipe, profile: "Profile"):
    return fuse_modules(pipe, profile, "gelu_epilogue", fuse, is_fused,
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
                                       {"gelu_epilogue": True})] if c.device == "cuda" else [],
    ladder=(LadderStep(5, "stack:+gelu_epilogue", "+ MLP GELU in the GEMM epilogue",
                       lambda p: dataclasses.replace(p, gelu_epilogue=True) if p.quantization == "none" else p,
                       lambda c, w: c.device == "cuda"),),
)
